//! The one error type of the schemas crate.
//!
//! Every variant is *definite*: bytes that do not decode will not decode on a retry, so callers
//! set the message aside (dead-letter it) rather than retry. [`Violation`](crate::Violation)s are
//! the per-row contract breaks; they are data, not errors of the crate.

/// Why a schema could not be loaded or a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// An embedded `.avsc` file is not a valid schema, or not of the shape walcache needs.
    #[error("schema {file}: {reason}")]
    InvalidSchema { file: String, reason: String },

    /// A message does not start with the Avro single-object marker (C3 01).
    #[error("message is not Avro single-object encoded (missing the C3 01 marker)")]
    NotSingleObject,

    /// A message names a schema fingerprint that no embedded contract has.
    #[error(
        "unknown schema fingerprint {fingerprint:016x}: the writer used a schema this build does not embed; \
         upgrade walcache (schemas crate) to a version that has it"
    )]
    UnknownSchema { fingerprint: u64 },

    /// The fingerprint is known but belongs to another contract or role (a key where a value was
    /// expected, another table's schema).
    #[error("schema fingerprint {fingerprint:016x} is {found}, expected {expected}")]
    WrongSchema { fingerprint: u64, found: String, expected: String },

    /// The bytes end early or hold an impossible value for the schema.
    #[error("malformed Avro data: {0}")]
    Malformed(String),

    /// apache-avro refused a value (schema resolution between versions, watermark records).
    #[error("avro: {0}")]
    Avro(#[from] apache_avro::Error),

    /// A contract name that the registry does not know.
    #[error("unknown contract {name:?}; known contracts: {known}")]
    UnknownContract { name: String, known: String },
}

impl SchemaError {
    pub(crate) fn malformed(what: impl Into<String>) -> Self {
        SchemaError::Malformed(what.into())
    }
}
