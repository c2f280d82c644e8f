//! The consumer's one error type. Transient errors (broker unreachable, metadata timeouts)
//! are retried with backoff by the applier; definite ones (configuration) stop the daemon.
//! Bad messages are not errors: they are dead-lettered, counted and skipped.

use walcache_common::CommonError;
use walcache_schemas::SchemaError;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("configuration: {0}")]
    Config(String),

    #[error(transparent)]
    Common(#[from] CommonError),

    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl ConsumerError {
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumerError::Common(e) => e.is_transient(),
            ConsumerError::Kafka { .. } => true,
            ConsumerError::Config(_) | ConsumerError::Schema(_) => false,
        }
    }

    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        ConsumerError::Kafka { context: context.into(), source }
    }
}
