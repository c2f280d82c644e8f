//! walcache-client: read the cache from service code, and prove the switch on data.
//!
//! ```text
//!  payment code ─► Fallback::get ─┬─ Client::get (near-cache, breaker, retries) ─► walcache-consumer
//!                                 └─ your synchronous call, when the cache cannot answer
//!  Experiment: control (old call) + candidates (cache), compared, classified, published
//! ```
//!
//! - [`Client`]: typed reads with their [`AsOf`]; [`ReadOptions`] for read-your-writes
//!   (`min_lsn`) and freshness (`max_staleness`).
//! - [`Fallback`]: cache first, your function when the cache is unavailable, not ready, too
//!   stale or unsure; every answer says which path gave it.
//! - [`experiment`]: Scientist-style experiments with lag-aware classification.

pub mod breaker;
mod client;
#[cfg(feature = "embedded")]
pub mod embedded;
mod error;
pub mod experiment;
mod fallback;
pub mod metrics;
mod near;
#[cfg(feature = "postgres")]
pub mod verify;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
#[cfg(feature = "postgres")]
pub use client::current_lsn;
pub use client::{AsOf, Client, ClientOptions, NearCacheOptions, Read, ReadOptions, RowState, Wire};
#[cfg(feature = "embedded")]
pub use embedded::EmbeddedView;
pub use error::ClientError;
pub use fallback::{Answer, Fallback, FallbackError, FallbackReason, OnRejected, Source};
pub use metrics::ClientMetrics;
pub use walcache_schemas::{CourierPerformance, Lsn, TableContract, Tier};
