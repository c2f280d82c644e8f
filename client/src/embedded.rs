//! The embedded view: the consumer's view run inside the service, no network hop (the Kafka
//! Streams GlobalKTable model). Behind the `embedded` cargo feature.
//!
//! ```text
//!  Kafka (table topics, watermarks) ──walcache_consumer::follow──► View (the consumer's store, applier)
//!                                                                   ▲
//!  Client::embedded(view).get(key) ── read::consistent_view + read::key_answer ─┘  (in-process, no HTTP)
//! ```
//!
//! The view, the applier and the read checks are the consumer crate's own ([`walcache_consumer`]),
//! not copies: an embedded answer and a remote one pass the same code, so they carry the same
//! `as_of`, honour `min_lsn` and `max_staleness` the same way and read `unknown` in the same
//! cases. Memory is bounded by the config's `cache.capacity`, like the consumer's.
//!
//! Every process that embeds the view reads every partition of the configured topics, from the
//! beginning, at start: restoring takes as long as the consumer's restore (`/v1/status`'s
//! `restore.seconds` tells you), and until then reads answer `NotReady` (a [`Fallback`] asks the
//! old call). Set `dead_letter.publish = false`: the consumers already dead-letter every bad
//! message, and each embedding process would publish it again.
//!
//! [`Fallback`]: crate::Fallback

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use walcache_consumer::read::{self, Consistency, KeyAnswer, KeyState, Refusal};
use walcache_consumer::view::{TableView, View};
use walcache_consumer::watermark::Coverage;
use walcache_consumer::{ConsumerConfig, Following, Metrics};
use walcache_schemas::{Position, TableContract};

use crate::client::{AsOf, Read, ReadOptions, RowState};
use crate::error::ClientError;

/// The server's default wait for `min_lsn`, the same in-process.
const DEFAULT_WAIT: Duration = Duration::from_millis(1000);

/// A view of the topics held in this process. Start one per process and share it
/// ([`Client::embedded`](crate::Client::embedded) takes an `Arc`).
pub struct EmbeddedView {
    view: Arc<View>,
    metrics: Metrics,
    cancel: CancellationToken,
    following: tokio::sync::Mutex<Option<Following>>,
    /// The applier's own runtime (one worker thread): a restore or a burst of changes decodes
    /// and applies there, not on the threads that serve the service's requests.
    runtime: std::sync::Mutex<Option<tokio::runtime::Runtime>>,
}

impl Drop for EmbeddedView {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(runtime) = self.runtime.lock().ok().and_then(|mut r| r.take()) {
            // Dropping a runtime blocks, which a Tokio context forbids; its tasks are cancelled.
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for EmbeddedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedView").field("tables", &self.view.table_names()).finish_non_exhaustive()
    }
}

impl EmbeddedView {
    /// Starts following the topics of `config` (the consumer's configuration: `kafka`, `tables`,
    /// `watermarks`, `cache`; `http` is not used) on a thread of its own. Reads answer
    /// `NotReady` until the view has restored ([`wait_ready`](Self::wait_ready)).
    pub fn start(config: ConsumerConfig) -> Result<Arc<EmbeddedView>, ClientError> {
        let refused = |code: &str, message: String| ClientError::Rejected { status: 0, code: code.into(), message };
        let metrics =
            Metrics::new().map_err(|e| refused("metrics", format!("registering the embedded view's metrics: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("walcache-embedded")
            .enable_all()
            .build()
            .map_err(|e| refused("runtime", format!("starting the embedded view's thread: {e}")))?;
        let cancel = CancellationToken::new();
        let following = {
            let _inside = runtime.enter();
            walcache_consumer::follow(config, metrics.clone(), cancel.clone())
                .map_err(|e| refused("config", e.to_string()))?
        };
        Ok(Arc::new(EmbeddedView {
            view: Arc::clone(&following.view),
            metrics,
            cancel,
            following: tokio::sync::Mutex::new(Some(following)),
            runtime: std::sync::Mutex::new(Some(runtime)),
        }))
    }

    /// The view's metrics (the consumer's `walcache_consumer_*`): register them with your
    /// exporter.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.metrics.registry
    }

    /// Restored from the topics and not blocked.
    pub fn is_ready(&self) -> bool {
        self.view.is_ready() && self.view.blocked().is_none()
    }

    /// Waits until the view has restored; `NotReady` with the reason after `timeout`, or at
    /// once when the view stopped (its error says why).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let started = Instant::now();
        loop {
            if self.view.is_ready() {
                return Ok(());
            }
            let finished = self.following.lock().await.as_ref().is_none_or(Following::applier_finished);
            if finished {
                let why = match self.stop().await {
                    Err(e) => e.to_string(),
                    Ok(()) => "stopped".into(),
                };
                return Err(ClientError::NotReady(format!("the embedded view stopped: {why}")));
            }
            if started.elapsed() > timeout {
                let (_, why) = self.view.health.get();
                return Err(ClientError::NotReady(format!("not ready after {timeout:?}: {why}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops following the topics; reads then answer with the view as it stood.
    pub async fn stop(&self) -> Result<(), ClientError> {
        self.cancel.cancel();
        let Some(following) = self.following.lock().await.take() else { return Ok(()) };
        let stopped = following.stop().await.map_err(|e| ClientError::Server { status: 0, message: e.to_string() });
        if let Some(runtime) = self.runtime.lock().ok().and_then(|mut r| r.take()) {
            runtime.shutdown_background();
        }
        stopped
    }

    fn table(&self, name: &str) -> Result<&TableView, ClientError> {
        self.view.table(name).ok_or_else(|| ClientError::Rejected {
            status: 404,
            code: "unknown_table".into(),
            message: format!("no table {name:?}; this view holds {}", self.view.table_names().join(", ")),
        })
    }

    /// Reads keys (as JSON, like the HTTP batch) of `T`'s table, all as of one view.
    pub(crate) async fn read<T: TableContract>(
        &self,
        keys: &[Json],
        options: &ReadOptions,
    ) -> Result<Vec<Read<T>>, ClientError> {
        let t = self.table(T::CONTRACT)?;
        let bodies = keys
            .iter()
            .map(|k| {
                t.spec.contract.key_from_json(k).map_err(|v| ClientError::Rejected {
                    status: 400,
                    code: "bad_key".into(),
                    message: v.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let demand = Consistency {
            min_lsn: options.min_lsn,
            wait: options.wait.unwrap_or(DEFAULT_WAIT),
            max_staleness: options.max_staleness,
        };
        let view = read::consistent_view(&self.view, t, &demand, None).await.map_err(refusal)?;
        bodies
            .iter()
            .map(|body| {
                let KeyAnswer { state, row, position, .. } = read::key_answer(t, body, &view, &self.metrics);
                let (state, value) = match row.map(|r| t.spec.reader.row.row_to_json(&r)) {
                    Some(Ok(map)) => (
                        RowState::Present,
                        Some(
                            serde_json::from_value::<T>(Json::Object(map))
                                .map_err(|e| ClientError::Decode(format!("row of {}: {e}", T::CONTRACT)))?,
                        ),
                    ),
                    // A row the view holds but cannot read is not an answer: unknown, as on HTTP.
                    Some(Err(_)) => (RowState::Unknown, None),
                    None => (row_state(state), None),
                };
                Ok(Read { state, value, as_of: as_of(view.coverage, position), from_near_cache: false })
            })
            .collect()
    }
}

fn as_of(coverage: Option<Coverage>, row: Option<Position>) -> AsOf {
    let time = |micros: i64| DateTime::<Utc>::from_timestamp_micros(micros);
    AsOf {
        row_lsn: row.map(|p| p.lsn),
        row_commit_time: row.and_then(|p| time(p.commit_ts_micros)),
        row_txid: row.map(|p| p.txid),
        view_lsn: coverage.map(|c| c.lsn),
        view_time: coverage.and_then(|c| time(c.commit_ts_micros)),
    }
}

fn row_state(state: KeyState) -> RowState {
    match state {
        KeyState::Present => RowState::Present,
        KeyState::Deleted => RowState::Deleted,
        KeyState::Absent => RowState::Absent,
        KeyState::Unknown => RowState::Unknown,
    }
}

/// The same errors a remote read gives for the same refusal.
fn refusal(r: Refusal) -> ClientError {
    match r {
        Refusal::Blocked { .. } | Refusal::NotReady { .. } => ClientError::NotReady(r.to_string()),
        Refusal::TooStale { .. } => ClientError::TooStale(r.to_string()),
        Refusal::MinLsnNotReached { .. } => ClientError::MinLsnNotReached(r.to_string()),
        Refusal::TooManyWaiting => ClientError::Server { status: 503, message: r.to_string() },
    }
}
