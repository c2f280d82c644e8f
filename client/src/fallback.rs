//! Cache first, the old synchronous call when the cache cannot answer, and say which.
//!
//! ```text
//!  get(key) ─► Client::get ─┬─ present / deleted / absent ──────────► Answer { source: Cache, as_of }
//!                           ├─ unknown (evicted, cannot vouch) ─┐
//!                           ├─ error (down, not ready, too stale,├──► your function ─► Answer { source: Fallback, reason }
//!                           │  circuit open, timeout) ──────────┘
//!                           └─ refused (401, unknown table, bad key): a configuration error. Logged
//!                              once per kind and counted; falls back, or fails with
//!                              OnRejected::Fail so it cannot go unnoticed
//! ```

use std::collections::HashSet;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Mutex;

use walcache_schemas::TableContract;

use crate::client::{AsOf, Client, ReadOptions, RowState};
use crate::error::ClientError;

/// Which path answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Fallback,
}

/// Why the fallback answered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The cache answered `unknown` for the key.
    Unknown,
    /// The cache could not answer (the error says why: down, not ready, too stale...).
    Cache(ClientError),
}

impl FallbackReason {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FallbackReason::Unknown => "unknown",
            FallbackReason::Cache(e) => e.label(),
        }
    }
}

/// What to do when the cache refuses a request (401, unknown table, bad key): a configuration
/// error, not an outage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnRejected {
    /// Answer from the fallback (logged once per kind, counted in the client's metrics).
    #[default]
    Fallback,
    /// Return [`FallbackError::Rejected`].
    Fail,
}

/// Why [`Fallback::get`] has no answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum FallbackError<E> {
    /// The fallback call failed.
    Call(E),
    /// The cache refused the request and [`OnRejected::Fail`] is set.
    Rejected(ClientError),
}

impl<E: std::fmt::Display> std::fmt::Display for FallbackError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FallbackError::Call(e) => write!(f, "the fallback call failed: {e}"),
            FallbackError::Rejected(e) => write!(f, "{e} (a configuration error: fix the token, table or key)"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for FallbackError<E> {}

/// An answer and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<T> {
    pub value: Option<T>,
    pub source: Source,
    /// As of when the cache's answer is true (cache answers only).
    pub as_of: Option<AsOf>,
    pub reason: Option<FallbackReason>,
}

/// A cache client with a synchronous fallback.
///
/// ```no_run
/// use walcache_client::{Client, ClientOptions, CourierPerformance, Fallback, ReadOptions, Source};
///
/// /// The old synchronous path: ask the Incentives service (or its database) directly.
/// async fn load_from_incentives(id: i64) -> Result<Option<CourierPerformance>, std::io::Error> {
///     # let _ = id;
///     Ok(None)
/// }
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = Client::new("http://walcache-consumer:8080", ClientOptions::default()).expect("url");
/// let reads = Fallback::<CourierPerformance, _>::new(cache, load_from_incentives);
/// let answer = reads.get(&42, &ReadOptions::default()).await?;
/// if answer.source == Source::Fallback {
///     tracing::info!(reason = answer.reason.as_ref().map(|r| r.label()), "served by the old call");
/// }
/// # Ok(())
/// # }
/// ```
pub struct Fallback<T: TableContract, F> {
    client: Client,
    call: F,
    on_rejected: OnRejected,
    /// Kinds of refusal already logged.
    logged: Mutex<HashSet<String>>,
    _row: PhantomData<fn() -> T>,
}

impl<T: TableContract, F> std::fmt::Debug for Fallback<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback").field("client", &self.client).finish_non_exhaustive()
    }
}

impl<T, F, Fut, E> Fallback<T, F>
where
    T: TableContract,
    T::Key: Clone,
    F: Fn(T::Key) -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    pub fn new(client: Client, call: F) -> Self {
        Fallback {
            client,
            call,
            on_rejected: OnRejected::default(),
            logged: Mutex::new(HashSet::new()),
            _row: PhantomData,
        }
    }

    /// What a refused request does (default: fall back, logged once per kind and counted).
    pub fn on_rejected(mut self, policy: OnRejected) -> Self {
        self.on_rejected = policy;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The cache's answer when it has one it can vouch for, otherwise the fallback's.
    pub async fn get(&self, key: &T::Key, options: &ReadOptions) -> Result<Answer<T>, FallbackError<E>> {
        let reason = match self.client.get::<T>(key, options).await {
            Ok(read) if read.state != RowState::Unknown => {
                self.client.count_answer("cache", "none");
                return Ok(Answer { value: read.value, source: Source::Cache, as_of: Some(read.as_of), reason: None });
            }
            Ok(_) => FallbackReason::Unknown,
            Err(e @ ClientError::Rejected { .. }) => {
                self.report_rejected(&e);
                if self.on_rejected == OnRejected::Fail {
                    return Err(FallbackError::Rejected(e));
                }
                FallbackReason::Cache(e)
            }
            Err(e) => FallbackReason::Cache(e),
        };
        self.client.count_answer("fallback", reason.label());
        let value = (self.call)(key.clone()).await.map_err(FallbackError::Call)?;
        Ok(Answer { value, source: Source::Fallback, as_of: None, reason: Some(reason) })
    }

    fn report_rejected(&self, e: &ClientError) {
        let ClientError::Rejected { status, code, .. } = e else { return };
        let first = self.logged.lock().map(|mut seen| seen.insert(format!("{status} {code}"))).unwrap_or(false);
        if first {
            tracing::error!(table = T::CONTRACT, status, code = %code, error = %e,
                "the cache refused the request: a configuration error (token, table name, key type), not an outage; \
                 reads go to the fallback until it is fixed (logged once per kind)");
        }
    }
}
