//! The dead-letter record: what was set aside, where it came from, and why.
//!
//! Both daemons write these as JSON to the dead-letter topic (people read them; tools can
//! replay them). The record carries the row, so it is data: it goes to Kafka, never to logs.

use serde::{Deserialize, Serialize};
use walcache_schemas::Lsn;

/// Which component set the message aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// A Postgres row that broke its contract on the way into Kafka.
    Producer,
    /// A Kafka message the consumer could not apply.
    Consumer,
}

/// Where in Kafka a consumer-side dead letter was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaOrigin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One set-aside message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stage: Stage,
    /// Source table (`public.courier_performance`) or, consumer-side, the topic's table if known.
    pub table: Option<String>,
    /// The key as JSON text values, when it could be read.
    pub key: Option<serde_json::Value>,
    /// Commit LSN of the change, when known.
    pub lsn: Option<Lsn>,
    pub txid: Option<u64>,
    /// Index of the change within its transaction.
    pub index: Option<u64>,
    pub commit_time: Option<String>,
    pub op: Option<String>,
    /// Stable reason code (`out_of_range`, `unknown_schema`...), also a metrics label.
    pub reason_code: String,
    /// What was wrong and what to do about it.
    pub reason: String,
    /// The contract field concerned, if any.
    pub field: Option<String>,
    /// The row as Postgres text values (producer), or null.
    pub row: Option<serde_json::Value>,
    /// The raw Kafka message, base64 (consumer).
    pub raw_key_base64: Option<String>,
    pub raw_value_base64: Option<String>,
    pub origin: Option<KafkaOrigin>,
    /// Who wrote it (slot name or consumer instance).
    pub written_by: String,
    pub written_at: String,
}
