//! What walcache's daemons share, so the producer and the consumer behave alike for operators.
//!
//! - [`config`]: TOML file + `WALCACHE_*` environment overrides, secrets that never print.
//! - [`kafka`]: librdkafka client settings with pass-through properties, topic creation,
//!   partition listing and high watermarks.
//! - [`ops`]: the ops HTTP server (`/metrics`, `/healthz`, `/readyz`).
//! - [`shutdown`]: SIGTERM/SIGINT into one cancellation token.
//! - [`telemetry`]: tracing set-up.
//! - [`dead_letter`]: the dead-letter record both daemons write.

pub mod config;
pub mod dead_letter;
mod error;
pub mod kafka;
pub mod ops;
pub mod shutdown;
pub mod telemetry;

pub use error::CommonError;
