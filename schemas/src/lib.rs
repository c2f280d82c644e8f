//! walcache's event contracts: the Avro schemas both sides of the pipeline share.
//!
//! ```text
//!  producer: Postgres text ──FieldPlan::write_text──► row bytes ──write_envelope──► single-object message
//!  consumer: message ──Registry::decode_value──► EnvelopeRef { op, before, after (bytes), position }
//!  API:      row bytes ──RowPlan::row_to_json──► JSON ──serde──► typed rows (CourierPerformance)
//! ```
//!
//! - [`registry`]: the embedded `.avsc` files, fingerprints, versions and resolution between them.
//! - [`plan`] and [`text`]: the compiled row schema, Postgres text parsing with contract checks.
//! - [`envelope`]: the change envelope with its [`Position`].
//! - [`watermark`]: producer progress records.
//! - [`framing`]: Avro single-object encoding (`C3 01` + fingerprint).
//! - [`wire`]: the query API's binary (Avro) answer for one key.

pub mod binary;
pub mod courier;
pub mod envelope;
mod error;
pub mod framing;
pub mod plan;
pub mod position;
pub mod registry;
pub mod text;
pub mod watermark;
pub mod wire;

pub use courier::{CourierPerformance, TableContract, Tier};
pub use envelope::{EnvelopeRef, Op, UNAVAILABLE_HEADER, read_envelope, write_envelope};
pub use error::SchemaError;
pub use plan::{FieldKind, FieldPlan, RowPlan};
pub use position::{Lsn, POSITION_HEADER, Position, micros_to_rfc3339, now_micros};
pub use registry::{Contract, DecodedValue, Registry, Role, SchemaDoc, ValueVersion};
pub use text::Violation;
pub use watermark::{PartitionOffset, ProducerState, Watermark};
