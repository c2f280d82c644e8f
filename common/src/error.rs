//! The common crate's error type, split into transient and definite like every walcache error.

use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// The configuration is unusable; the message says which setting and what to do.
    #[error("configuration: {0}")]
    Config(String),

    /// A Kafka call failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },

    /// A topic exists with settings that break walcache's guarantees.
    #[error("kafka topic {topic}: {problem}")]
    Topic { topic: String, problem: String },

    #[error("i/o: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CommonError {
    /// Whether retrying with backoff may succeed (broker unreachable, timeouts), as opposed to
    /// errors that need an operator (bad config, a topic with the wrong cleanup policy).
    pub fn is_transient(&self) -> bool {
        match self {
            CommonError::Kafka { source, .. } => !matches!(
                source.rdkafka_error_code(),
                Some(
                    rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::ClusterAuthorizationFailed
                        | rdkafka::types::RDKafkaErrorCode::InvalidConfig
                        | rdkafka::types::RDKafkaErrorCode::PolicyViolation
                )
            ),
            CommonError::Io { .. } => true,
            CommonError::Config(_) | CommonError::Topic { .. } => false,
        }
    }

    pub(crate) fn kafka(context: impl Into<String>, source: KafkaError) -> Self {
        CommonError::Kafka { context: context.into(), source }
    }
}
