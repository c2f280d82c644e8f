//! walcache-producer: Postgres logical replication slot -> Kafka, at least once.
//!
//! ```text
//!  Postgres ──pgoutput (pgwire-replication)──► pipeline::Stream ──► events::Emitter ──► sink::Sink ──► Kafka
//!     ▲  decode (pgoutput), bind to contract (binding), envelope (schemas)        │ acks in order
//!     └───────────── confirmed LSN (only past fully acknowledged commits) ◄───────┘ + watermarks
//! ```
//!
//! - [`pipeline`]: sessions, leader lock, snapshot-or-resume, the streaming loop, draining.
//! - [`sink`]: the ordered in-flight queue that makes confirmation safe (invariant 1).
//! - [`events`]: change -> Kafka messages (envelopes, tombstones, truncate markers, dead letters).
//! - [`pgoutput`], [`binding`]: decoding the stream and applying the contract.
//! - [`snapshot`], [`state`]: the initial snapshot and what a restart resumes from.
//! - [`reselect`]: unchanged TOAST values re-read by key, only when exact.
//! - [`publication`]: nothing is vouched for past a change of the publication.
//! - [`postgres`], [`check`]: the control plane and prerequisite checks; [`tls`]: sslmode.

pub mod binding;
pub mod check;
pub mod config;
mod error;
pub mod events;
pub mod metrics;
pub mod pgoutput;
pub mod pipeline;
pub mod postgres;
pub mod publication;
pub mod reselect;
pub mod sink;
pub mod snapshot;
pub mod state;
pub mod tls;

pub use config::ProducerConfig;
pub use error::ProducerError;
pub use metrics::Metrics;
pub use pipeline::Producer;
