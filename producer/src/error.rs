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
use rdkafka::types::RDKafkaErrorCode;
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

    /// A change the producer cannot route to a configured table (a renamed or moved table,
    /// a table walcache does not know in its publication). Nothing at or after it is
    /// confirmed: the daemon stops until an operator decides.
    #[error("{problem}; nothing from this change on has been confirmed to the slot. {fix}")]
    Unroutable { problem: String, fix: String },

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

    /// librdkafka stopped the producer instance (idempotence or the gapless guarantee could
    /// not be kept). `cause` is librdkafka's account of why; `definite` when that cause is a
    /// broker refusal no retry can fix.
    #[error("kafka producer stopped on a fatal error while writing {topic}: {cause}{}", if *definite { "; fix the cause, then restart" } else { "; the session restarts from the last confirmed LSN" })]
    KafkaFatal { topic: String, cause: String, definite: bool },

    /// A message is larger than the producer may send (`message.max.bytes`). The emitter
    /// turns this into a dead letter without values; it only surfaces as an error when even
    /// that is too large.
    #[error(
        "a {bytes}-byte message for {topic} is over the producer's message.max.bytes; raise kafka.properties.\"message.max.bytes\" together with the topic's max.message.bytes, or keep such rows out"
    )]
    MessageTooLarge { topic: String, bytes: usize },

    /// The embedded contracts could not be used.
    #[error(transparent)]
    Schema(#[from] SchemaError),

    /// SIGTERM's drain did not finish within `pipeline.shutdown_timeout`.
    #[error(
        "shutdown: the drain did not finish within pipeline.shutdown_timeout ({after:?}); changes not yet confirmed to the slot will be sent again on restart"
    )]
    ShutdownDeadline { after: std::time::Duration },

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
            ProducerError::Delivery { source, .. } => !kafka_error_is_definite(source),
            ProducerError::ConfirmTimeout { .. } | ProducerError::ShutdownDeadline { .. } => true,
            ProducerError::MessageTooLarge { .. } => false,
            ProducerError::KafkaFatal { definite, .. } => !definite,
            ProducerError::Config(_)
            | ProducerError::Prerequisite { .. }
            | ProducerError::Unroutable { .. }
            | ProducerError::Decode(_)
            | ProducerError::Schema(_) => false,
        }
    }

    pub(crate) fn pg(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        ProducerError::Postgres { context: context.into(), source }
    }

    pub(crate) fn repl(context: impl Into<String>, source: PgWireError) -> Self {
        if let PgWireError::Tls(cause) = &source {
            return ProducerError::Prerequisite {
                problem: format!("replication: {}: TLS failed: {cause}", context.into()),
                fix: crate::tls::TLS_FIX.into(),
            };
        }
        ProducerError::Replication { context: context.into(), source }
    }
}

/// Kafka errors that a retry cannot fix: the same message, topic or credentials fail the
/// same way again, so restarting the session would replay the same changes for ever while
/// WAL piles up on the primary. Everything else (timeouts, leader moves, brokers down,
/// not enough replicas) is transient.
const DEFINITE_KAFKA_ERRORS: [RDKafkaErrorCode; 17] = {
    use RDKafkaErrorCode as C;
    [
        C::MessageSizeTooLarge,
        C::InvalidMessageSize,
        C::TopicAuthorizationFailed,
        C::ClusterAuthorizationFailed,
        C::TransactionalIdAuthorizationFailed,
        C::SaslAuthenticationFailed,
        C::Authentication,
        C::UnknownTopicOrPartition,
        C::UnknownTopic,
        C::InvalidConfig,
        C::InvalidRequiredAcks,
        C::InvalidTopic,
        C::UnsupportedVersion,
        C::UnsupportedForMessageFormat,
        C::PolicyViolation,
        C::InvalidRecord,
        C::InvalidReplicationFactor,
    ]
};

/// Whether a Kafka error is one [`DEFINITE_KAFKA_ERRORS`] names (or the client could not be
/// created at all).
pub(crate) fn kafka_error_is_definite(e: &KafkaError) -> bool {
    matches!(e, KafkaError::ClientCreation(_))
        || e.rdkafka_error_code().is_some_and(|code| DEFINITE_KAFKA_ERRORS.contains(&code))
}

/// Whether librdkafka's account of a fatal error names a definite broker error: under
/// idempotence it reports a permanent refusal as a generic fatal error quoting the broker's
/// text, such as "Broker: Topic authorization failed".
pub(crate) fn fatal_cause_is_definite(cause: &str) -> bool {
    DEFINITE_KAFKA_ERRORS.iter().any(|code| {
        // Displayed as "TopicAuthorizationFailed (Broker: Topic authorization failed)"; the
        // fatal error quotes the part in brackets.
        let shown = code.to_string();
        let description = shown.split_once(" (").map_or(shown.as_str(), |(_, d)| d.trim_end_matches(')'));
        cause.contains(description)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_causes_are_classified_by_the_broker_error_they_quote() {
        assert!(fatal_cause_is_definite(
            "ProduceRequest for t [0] with 1 message(s) failed: Broker: Topic authorization failed (broker 1)"
        ));
        assert!(!fatal_cause_is_definite(
            "ProduceRequest for t [0] with 1 message(s) failed: Broker: Not enough in-sync replicas (broker 1)"
        ));
        assert!(!fatal_cause_is_definite("Local: Message timed out"));
    }
}
