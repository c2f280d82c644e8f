//! The client's one error type: transient (retried, counted by the breaker) or definite.

/// Why a cache read did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request took longer than its timeout.
    #[error("the cache did not answer within {0:?}")]
    Timeout(std::time::Duration),

    /// The connection failed (refused, reset, DNS).
    #[error("cannot reach the cache: {0}")]
    Transport(String),

    /// The circuit breaker is open after repeated failures; no request was sent.
    #[error("circuit open after repeated failures; retrying in {0:?}")]
    CircuitOpen(std::time::Duration),

    /// The view is restoring from the topics.
    #[error("the cache is not ready: {0}")]
    NotReady(String),

    /// The view is older than `max_staleness`.
    #[error("the cache is too stale: {0}")]
    TooStale(String),

    /// The view did not reach `min_lsn` within the wait budget.
    #[error("the cache did not reach the requested LSN: {0}")]
    MinLsnNotReached(String),

    /// The server refused the request (bad key, unknown table, auth); retrying cannot help.
    #[error("the cache refused the request ({status} {code}): {message}")]
    Rejected { status: u16, code: String, message: String },

    /// The server failed (5xx other than the consistency answers above).
    #[error("the cache failed ({status}): {message}")]
    Server { status: u16, message: String },

    /// A Postgres query of `verify` failed.
    #[error("postgres: {0}")]
    Postgres(String),

    /// The answer did not have the expected shape (version skew?).
    #[error("unexpected answer from the cache: {0}")]
    Decode(String),
}

impl ClientError {
    /// Worth retrying after a backoff.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout(_) | ClientError::Transport(_) | ClientError::NotReady(_) | ClientError::Server { .. }
        )
    }

    /// Counts against the circuit breaker: the cache is unhealthy, not merely behind.
    pub fn is_failure(&self) -> bool {
        matches!(self, ClientError::Timeout(_) | ClientError::Transport(_) | ClientError::Server { .. })
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ClientError::Timeout(_) => "timeout",
            ClientError::Transport(_) => "transport",
            ClientError::CircuitOpen(_) => "circuit_open",
            ClientError::NotReady(_) => "not_ready",
            ClientError::TooStale(_) => "too_stale",
            ClientError::MinLsnNotReached(_) => "min_lsn_not_reached",
            ClientError::Rejected { .. } => "rejected",
            ClientError::Server { .. } => "server",
            ClientError::Decode(_) => "decode",
            ClientError::Postgres(_) => "postgres",
        }
    }
}
