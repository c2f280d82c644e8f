//! The producer's one error type.
//!
//! Transient errors (network, broker or server unavailable, slot held by a dying predecessor,
//! a failed delivery) restart the session with backoff: the slot replays from the last
//! confirmed LSN, so nothing is lost and the consumer drops the duplicates. Definite errors
//! (configuration, prerequisites, a contract the table cannot meet) stop the daemon with a
//! message that says what to change. Rows that break their contract are not errors at all:
//! they are dead-lettered and the pipeline moves on.

use pgwire_replication::PgWireError;
use rdkafka::error::KafkaError;
use walcache_common::CommonError;
use walcache_schemas::SchemaError;

use crate::pgoutput::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// Unusable configuration.
    #[error("configuration: {0}")]
    Config(String),

    /// Postgres is not set up for logical decoding by this role; `fix` says how.
    #[error("{problem}; {fix}")]
    Prerequisite { problem: String, fix: String },

    /// A Postgres query or connection failed.
    #[error("postgres: {context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// The replication connection failed or was refused.
    #[error("replication: {context}: {source}")]
    Replication {
        context: String,
        #[source]
        source: PgWireError,
    },

    /// The replication stream broke the pgoutput protocol.
    #[error("replication stream: {0}")]
    Decode(#[from] DecodeError),

    /// Kafka set-up or metadata failed.
    #[error(transparent)]
    Common(#[from] CommonError),

    /// A message could not be delivered (after librdkafka's own retries).
    #[error("kafka delivery to {topic} failed: {source}; the session restarts from the last confirmed LSN")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },

    /// The embedded contracts could not be used.
    #[error(transparent)]
    Schema(#[from] SchemaError),

    /// The slot did not confirm the delivered position before the shutdown deadline.
    #[error(
        "slot {slot} still shows {shown} after the shutdown deadline (wanted {wanted}); those changes will be sent again on restart"
    )]
    ConfirmTimeout { slot: String, shown: String, wanted: String },
}

impl ProducerError {
    /// Whether the session should be retried with backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            ProducerError::Postgres { source, .. } => postgres_is_transient(source),
            ProducerError::Replication { source, .. } => replication_is_transient(source),
            ProducerError::Common(e) => e.is_transient(),
            ProducerError::Delivery { .. } | ProducerError::ConfirmTimeout { .. } => true,
            ProducerError::Config(_)
            | ProducerError::Prerequisite { .. }
            | ProducerError::Decode(_)
            | ProducerError::Schema(_) => false,
        }
    }

    pub(crate) fn pg(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        ProducerError::Postgres { context: context.into(), source }
    }

    pub(crate) fn repl(context: impl Into<String>, source: PgWireError) -> Self {
        ProducerError::Replication { context: context.into(), source }
    }
}

/// Connection-level failures, server shutdowns, resource limits and lock conflicts pass;
/// authentication, privileges and missing objects need an operator.
pub(crate) fn postgres_is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection broke or never opened.
        return true;
    };
    let code = db.code().code();
    code.starts_with("08")   // connection exception
        || code.starts_with("53") // insufficient resources (too many connections)
        || code.starts_with("57") // operator intervention (admin shutdown, cannot connect now)
        || code.starts_with("40") // transaction rollback (serialization, deadlock)
        || code == "55006"        // object in use: the slot is held by another process
        || code == "55P03" // lock not available
}

fn replication_is_transient(e: &PgWireError) -> bool {
    match e {
        PgWireError::Server(msg) => {
            // The server's SQLSTATE is in the message ("... (SQLSTATE 55006)").
            ["SQLSTATE 08", "SQLSTATE 53", "SQLSTATE 57", "SQLSTATE 55006", "SQLSTATE 40"]
                .iter()
                .any(|code| msg.contains(code))
        }
        PgWireError::Auth(_) | PgWireError::Tls(_) => false,
        _ => true,
    }
}
