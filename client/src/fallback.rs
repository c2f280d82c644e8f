//! Cache first, the old synchronous call when the cache cannot answer, and say which.
//!
//! ```text
//!  get(key) ─► Client::get ─┬─ present / deleted / absent ──────────► Answer { source: Cache, as_of }
//!                           ├─ unknown (evicted, cannot vouch) ─┐
//!                           └─ error (down, not ready, too stale,├──► your function ─► Answer { source: Fallback, reason }
//!                              circuit open, timeout) ──────────┘
//! ```

use std::future::Future;
use std::marker::PhantomData;

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
/// # async fn demo() -> Result<(), std::io::Error> {
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
        Fallback { client, call, _row: PhantomData }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The cache's answer when it has one it can vouch for, otherwise the fallback's.
    pub async fn get(&self, key: &T::Key, options: &ReadOptions) -> Result<Answer<T>, E> {
        let reason = match self.client.get::<T>(key, options).await {
            Ok(read) if read.state != RowState::Unknown => {
                return Ok(Answer { value: read.value, source: Source::Cache, as_of: Some(read.as_of), reason: None });
            }
            Ok(_) => FallbackReason::Unknown,
            Err(e) => FallbackReason::Cache(e),
        };
        let value = (self.call)(key.clone()).await?;
        Ok(Answer { value, source: Source::Fallback, as_of: None, reason: Some(reason) })
    }
}
