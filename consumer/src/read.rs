//! Reads of the view, before any transport: the consistency checks every answer passes and
//! what the view holds for one key. The HTTP API writes these as JSON or Avro;
//! `walcache-client`'s embedded view hands them to service code in-process.
//!
//! ```text
//!  Consistency { min_lsn, wait, max_staleness }
//!     ─► consistent_view: blocked? ready? wait for min_lsn (bounded) ─► too stale?
//!            ├─ Refusal (blocked | not_ready | too_many_waiting | min_lsn_not_reached | too_stale)
//!            └─ ViewAsOf (coverage + staleness) ─► key_answer(key) ─► KeyAnswer { state, row, position, reason }
//! ```
//!
//! One code path for every transport, so a remote answer and an embedded one cannot drift.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use walcache_schemas::{Lsn, Position, now_micros};

use crate::metrics::Metrics;
use crate::store::Lookup;
use crate::view::{TableView, View};
use crate::watermark::Coverage;

/// Why a key of a table no watermark covers yet reads unknown.
pub const NOT_COVERED: &str = "not_covered";

/// What a read demands of the view.
#[derive(Debug, Clone, Copy, Default)]
pub struct Consistency {
    /// The view must cover this LSN (read your writes)...
    pub min_lsn: Option<Lsn>,
    /// ...within this long.
    pub wait: Duration,
    /// Refuse when the view's newest covered commit is older than this.
    pub max_staleness: Option<Duration>,
}

/// The view's side of an answer: how far the table is complete, and how old that is.
#[derive(Debug, Clone, Copy)]
pub struct ViewAsOf {
    pub coverage: Option<Coverage>,
    pub staleness_ms: Option<i64>,
}

impl ViewAsOf {
    pub fn of(coverage: Option<Coverage>) -> Self {
        ViewAsOf { coverage, staleness_ms: coverage.map(|c| ((now_micros() - c.commit_ts_micros) / 1000).max(0)) }
    }
}

/// Why the view refuses to answer: asked for more consistency than it has. The caller falls
/// back; none of these is a failure of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A message the view must not step over stopped it.
    Blocked {
        message: String,
    },
    /// Still restoring from the topics.
    NotReady {
        message: String,
    },
    /// Too many reads already wait for a `min_lsn`.
    TooManyWaiting,
    MinLsnNotReached {
        min_lsn: Lsn,
        view_lsn: Option<Lsn>,
        waited: Duration,
    },
    TooStale {
        staleness_ms: Option<i64>,
        max_staleness_ms: u64,
    },
}

impl Refusal {
    /// The stable code (the HTTP API's `error`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Blocked { .. } => "blocked",
            Refusal::NotReady { .. } => "not_ready",
            Refusal::TooManyWaiting => "too_many_waiting",
            Refusal::MinLsnNotReached { .. } => "min_lsn_not_reached",
            Refusal::TooStale { .. } => "too_stale",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Blocked { message } | Refusal::NotReady { message } => f.write_str(message),
            Refusal::TooManyWaiting => {
                f.write_str("too many reads are waiting for a min_lsn; retry, or read without min_lsn")
            }
            Refusal::MinLsnNotReached { min_lsn, waited, .. } => {
                write!(f, "the view did not reach LSN {min_lsn} within {} ms", waited.as_millis())
            }
            Refusal::TooStale { staleness_ms: Some(s), max_staleness_ms } => {
                write!(f, "the view is {s} ms old, more than the {max_staleness_ms} ms asked for")
            }
            Refusal::TooStale { staleness_ms: None, .. } => {
                f.write_str("the view has no watermark yet, so its age is unknown")
            }
        }
    }
}

/// Checks the view can answer with `demand` for `table`, waiting (at most `demand.wait`) for
/// `min_lsn`. `waiting` bounds the reads that wait at once (None: unbounded, for in-process
/// callers that bound their own concurrency).
pub async fn consistent_view(
    view: &View,
    table: &TableView,
    demand: &Consistency,
    waiting: Option<&Arc<Semaphore>>,
) -> Result<ViewAsOf, Refusal> {
    if let Some(b) = view.blocked() {
        return Err(Refusal::Blocked {
            message: format!(
                "the view stopped at {}/{}/{}: {}; it cannot vouch for anything past it",
                b.topic, b.partition, b.offset, b.reason
            ),
        });
    }
    if !view.is_ready() {
        let r = view.restore();
        return Err(Refusal::NotReady {
            message: format!(
                "the view is restoring from the topics ({}%); answers would be incomplete",
                if r.total > 0 { 100 * r.done / r.total } else { 0 }
            ),
        });
    }
    if let Some(min) = demand.min_lsn {
        let already = table.coverage().is_some_and(|c| c.lsn >= min);
        // A read that has to wait holds a permit: waiting reads are cheap, but not free.
        let _permit = match waiting {
            Some(permits) if !already => {
                Some(Arc::clone(permits).try_acquire_owned().map_err(|_| Refusal::TooManyWaiting)?)
            }
            _ => None,
        };
        let started = Instant::now();
        let mut rx = table.subscribe_coverage();
        let reached = tokio::time::timeout(demand.wait, async {
            loop {
                if rx.borrow_and_update().is_some_and(|c| c.lsn >= min) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false);
        if !reached {
            return Err(Refusal::MinLsnNotReached {
                min_lsn: min,
                view_lsn: table.coverage().map(|c| c.lsn),
                waited: started.elapsed(),
            });
        }
    }
    let now = ViewAsOf::of(table.coverage());
    if let Some(max) = demand.max_staleness {
        let max_ms = max.as_millis() as u64;
        if now.staleness_ms.is_none_or(|s| s > max_ms as i64) {
            return Err(Refusal::TooStale { staleness_ms: now.staleness_ms, max_staleness_ms: max_ms });
        }
    }
    Ok(now)
}

/// What the view knows about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Present,
    /// Deleted at the answer's position.
    Deleted,
    /// No such row as of the view's LSN.
    Absent,
    /// The view cannot vouch for the key (the reason says why).
    Unknown,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Present => "present",
            KeyState::Deleted => "deleted",
            KeyState::Absent => "absent",
            KeyState::Unknown => "unknown",
        }
    }
}

/// What the view holds for one key, before it is written as JSON, Avro or a typed value.
#[derive(Debug, Clone)]
pub struct KeyAnswer {
    pub state: KeyState,
    /// The row's Avro datum (the table's reader version), when present.
    pub row: Option<Vec<u8>>,
    pub position: Option<Position>,
    pub reason: Option<String>,
}

/// One key's answer as of `view` (from [`consistent_view`]), counted in `lookups`.
pub fn key_answer(t: &TableView, key_body: &[u8], view: &ViewAsOf, metrics: &Metrics) -> KeyAnswer {
    let answer = match t.store.get(key_body) {
        Lookup::Present { row, position } => {
            KeyAnswer { state: KeyState::Present, row: Some(row), position: Some(position), reason: None }
        }
        Lookup::Deleted { position } => {
            KeyAnswer { state: KeyState::Deleted, row: None, position: Some(position), reason: None }
        }
        // Absent means "no such row as of the view's LSN": without coverage (the table's first
        // copy still runs) there is no such LSN to vouch for.
        Lookup::Absent if view.coverage.is_none() => {
            KeyAnswer { state: KeyState::Unknown, row: None, position: None, reason: Some(NOT_COVERED.to_string()) }
        }
        Lookup::Absent => KeyAnswer { state: KeyState::Absent, row: None, position: None, reason: None },
        Lookup::Unknown { position, reason } => {
            KeyAnswer { state: KeyState::Unknown, row: None, position, reason: Some(reason) }
        }
    };
    metrics.lookups.with_label_values(&[&t.spec.name, answer.state.as_str()]).inc();
    answer
}
