//! Typed Rust form of the `courier_performance` contract, for code that reads the cache.
//!
//! The query API returns rows as JSON rendered from the Avro row (decimals and timestamps as
//! strings, so nothing is rounded); these types deserialize that JSON.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A table contract as seen by typed client code.
pub trait TableContract: DeserializeOwned + Send + 'static {
    /// The contract (and query API table) name.
    const CONTRACT: &'static str;
    /// The key type; serializes to a JSON scalar (one key field) or object (several).
    type Key: Serialize + Send + Sync;
}

/// Incentive tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Bronze,
    Silver,
    Gold,
    Platinum,
}

/// One courier's performance (contract `courier_performance`, v2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CourierPerformance {
    pub courier_id: i64,
    pub city: String,
    /// Added in v2; `None` for rows written by v1 producers.
    #[serde(default)]
    pub zone: Option<String>,
    pub tier: Tier,
    pub rating: Decimal,
    pub deliveries: i32,
    pub on_time_rate: f64,
    pub acceptance_rate: Option<f64>,
    pub cancellations: i32,
    pub active: bool,
    pub notes: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl TableContract for CourierPerformance {
    const CONTRACT: &'static str = "courier_performance";
    type Key = i64;
}
