//! The materialised view: every table's store, the truncate floors, the coverage from
//! watermarks, readiness and partition positions, shared by the applier and the query API.
//!
//! ```text
//!  applier ──apply_table_message──► TableView.store (position-aware)            ◄── API reads
//!          ──set_coverage(table)──► TableView.coverage (watch) ─► min_lsn waiters ◄── API waits
//!          ──set_partition────────► positions, lag                              ◄── /v1/status
//!          ──block────────────────► not ready, with the reason (a message it must not step over)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::Value as Json;
use tokio::sync::watch;
use walcache_common::ops::Health;
use walcache_schemas::{Lsn, Op, Position, Registry, SchemaError};

use crate::config::{CacheConfig, TableSpec};
use crate::metrics::Metrics;
use crate::store::{Applied, Change, TableStore};
use crate::watermark::Coverage;

/// The key producers use for truncate markers.
pub const TRUNCATE_KEY: &[u8] = b"\0walcache.truncate";

/// One table of the view.
#[derive(Debug)]
pub struct TableView {
    pub spec: TableSpec,
    pub store: TableStore,
    /// Events at or below this position are ignored (a truncate happened after them).
    floor: Mutex<Option<Position>>,
    /// A snapshot's floor, applied once a watermark covers the snapshot.
    pending_snapshot_floor: Mutex<Option<Position>>,
    /// How far this table is complete, from the watermarks of the producer that feeds it.
    coverage: watch::Sender<Option<Coverage>>,
    /// That producer's name, once seen.
    producer: Mutex<Option<String>>,
    /// The highest LSN of a change applied (0: none): a replica whose coverage is below it
    /// may not hold every change this view announced, or announced before a stream began.
    applied: AtomicU64,
}

impl TableView {
    pub fn coverage(&self) -> Option<Coverage> {
        *self.coverage.borrow()
    }

    pub fn subscribe_coverage(&self) -> watch::Receiver<Option<Coverage>> {
        self.coverage.subscribe()
    }

    /// Reads waiting for this table's coverage to reach their `min_lsn`.
    pub fn waiting_readers(&self) -> usize {
        self.coverage.receiver_count()
    }

    pub fn producer(&self) -> Option<String> {
        self.producer.lock().ok().and_then(|p| p.clone())
    }

    /// The highest LSN of a change this view applied (a key change, a truncate, a snapshot
    /// floor); a key made unknown without a position counts as just past the coverage.
    pub fn applied_lsn(&self) -> Option<Lsn> {
        Some(Lsn(self.applied.load(Ordering::Acquire))).filter(|l| l.0 > 0)
    }

    pub fn floor(&self) -> Option<Position> {
        self.floor.lock().ok().and_then(|f| *f)
    }

    fn raise_floor(&self, position: Position) -> usize {
        if let Ok(mut f) = self.floor.lock()
            && f.is_none_or(|old| position.is_newer_than(&old))
        {
            *f = Some(position);
        }
        self.store.remove_older_than(&position)
    }
}

/// What one table-topic message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event changed the view; its position.
    Applied(Op, Position),
    /// The key changed at this position but its row is not available (the producer set the
    /// change aside): the key now reads unknown.
    Unavailable(Position),
    /// Valid, but it changed nothing (`not_newer`, `below_floor`, ...).
    Ignored(&'static str),
    /// Invalid: to be dead-lettered with this reason. Its key, when readable, now reads
    /// unknown.
    Bad(BadMessage),
    /// Invalid, and without a key it could make unknown (or an unreadable truncate marker):
    /// stepping over it could leave any key old, so coverage must stop here.
    Blocking(BadMessage),
}

/// Why a message was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage {
    pub reason_code: &'static str,
    pub reason: String,
    pub key: Option<Json>,
}

fn blocking(reason_code: &'static str, reason: impl Into<String>) -> Outcome {
    Outcome::Blocking(BadMessage { reason_code, reason: reason.into(), key: None })
}

fn schema_code(e: &SchemaError) -> &'static str {
    match e {
        SchemaError::NotSingleObject => "not_single_object",
        SchemaError::UnknownSchema { .. } => "unknown_schema",
        SchemaError::WrongSchema { .. } => "wrong_schema",
        SchemaError::Avro(_) => "unresolvable",
        _ => "malformed",
    }
}

/// Every reason an event is ignored for (`walcache_consumer_ignored_total`), started at zero.
pub const IGNORED_REASONS: [&str; 5] =
    ["marker_tombstone", "tombstone_without_position", "below_floor", "not_newer", "older_than_forgotten"];

/// Every reason code a consumer dead letter can carry, so its counter starts each at zero.
pub const DEAD_LETTER_REASONS: [&str; 7] =
    ["not_single_object", "unknown_schema", "wrong_schema", "unresolvable", "malformed", "missing_key", "key_mismatch"];

/// The reason code a marker without the `walcache.unavailable` header gets.
pub const ROW_UNAVAILABLE: &str = "row_unavailable";

/// Per-partition state for status and lag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// Next offset to read.
    pub next: i64,
    /// High watermark when last measured.
    pub high: i64,
    /// High watermark at start (restore target).
    pub target: i64,
}

/// Restore progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restore {
    pub total: i64,
    pub done: i64,
    pub events: u64,
    pub seconds: f64,
}

/// A message the view must not step over, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// A change a near-cache must hear about, in the order the view applied it: every key event
/// before the coverage that includes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The key of table `table` changed (or became unknown) at `position` (None: unknown).
    Key { table: usize, key: Box<[u8]>, position: Option<Position> },
    /// Table `table` is complete up to `coverage`: every change up to it was announced before.
    Coverage { table: usize, coverage: Coverage },
    /// Drop everything of table `table` (a truncate or a snapshot floor at `lsn` removed rows).
    Reset { table: usize, lsn: Lsn },
}

/// The view.
#[derive(Debug)]
pub struct View {
    pub tables: Vec<TableView>,
    by_name: HashMap<String, usize>,
    by_topic: HashMap<String, usize>,
    ready: AtomicBool,
    blocked: Mutex<Option<Blocked>>,
    is_blocked: AtomicBool,
    restore: Mutex<Restore>,
    partitions: Mutex<BTreeMap<(String, i32), PartitionState>>,
    pub dead_letters: AtomicU64,
    pub metrics: Metrics,
    pub health: std::sync::Arc<Health>,
    invalidations: tokio::sync::broadcast::Sender<Invalidation>,
}

impl View {
    /// Every change from now on, in apply order ([`Invalidation`]).
    pub fn subscribe_invalidations(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
        self.invalidations.subscribe()
    }

    /// Counts a change of a key as applied and announces it.
    fn changed_key(&self, index: usize, key: &[u8], position: Option<Position>) {
        let table = &self.tables[index];
        let lsn = position.map_or_else(|| Lsn(table.coverage().map_or(0, |c| c.lsn.0) + 1), |p| p.lsn);
        table.applied.fetch_max(lsn.0, Ordering::AcqRel);
        self.announce(|| Invalidation::Key { table: index, key: key.into(), position });
    }

    /// Counts a table-wide removal at `lsn` as applied and announces it.
    fn reset(&self, index: usize, lsn: Lsn) {
        self.tables[index].applied.fetch_max(lsn.0, Ordering::AcqRel);
        self.announce(|| Invalidation::Reset { table: index, lsn });
    }

    /// Announces a change; free while nobody listens (the common case, and every restore).
    fn announce(&self, make: impl FnOnce() -> Invalidation) {
        if self.invalidations.receiver_count() > 0 {
            let _ = self.invalidations.send(make());
        }
    }

    /// `backlog`: announced changes kept for slow subscribers; one further behind is told to
    /// reset.
    pub fn new(
        specs: Vec<TableSpec>,
        cache: &CacheConfig,
        backlog: usize,
        metrics: Metrics,
        health: std::sync::Arc<Health>,
    ) -> View {
        let tables: Vec<TableView> = specs
            .into_iter()
            .map(|spec| TableView {
                spec,
                store: TableStore::new(cache.capacity, cache.pages, cache.delete_retention),
                floor: Mutex::new(None),
                pending_snapshot_floor: Mutex::new(None),
                coverage: watch::channel(None).0,
                producer: Mutex::new(None),
                applied: AtomicU64::new(0),
            })
            .collect();
        let by_name = tables.iter().enumerate().map(|(i, t)| (t.spec.name.clone(), i)).collect();
        let by_topic = tables.iter().enumerate().map(|(i, t)| (t.spec.topic.clone(), i)).collect();
        health.set_not_ready("restoring the view from the topics");
        for t in &tables {
            metrics.init_table(&t.spec.name);
            for reason in IGNORED_REASONS {
                metrics.ignored.with_label_values(&[&t.spec.name, reason]);
            }
        }
        for reason in DEAD_LETTER_REASONS {
            metrics.dead_letters.with_label_values(&[reason]);
        }
        View {
            tables,
            by_name,
            by_topic,
            ready: AtomicBool::new(false),
            blocked: Mutex::new(None),
            is_blocked: AtomicBool::new(false),
            restore: Mutex::new(Restore::default()),
            partitions: Mutex::new(BTreeMap::new()),
            dead_letters: AtomicU64::new(0),
            metrics,
            health,
            invalidations: tokio::sync::broadcast::channel(backlog).0,
        }
    }

    pub fn table(&self, name: &str) -> Option<&TableView> {
        self.by_name.get(name).map(|&i| &self.tables[i])
    }

    pub fn table_index_of_topic(&self, topic: &str) -> Option<usize> {
        self.by_topic.get(topic).copied()
    }

    pub fn table_names(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.spec.name.as_str()).collect()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.metrics.restore_progress.set(1.0);
        for t in &self.tables {
            t.store.set_following();
        }
        if self.blocked().is_none() {
            self.metrics.ready.set(1);
            self.health.set_ready();
        }
    }

    /// A message the view cannot apply and must not step over: coverage stops before it and
    /// the view answers "not ready" with the reason, until an operator deals with it.
    pub fn block(&self, blocked: Blocked) {
        let Ok(mut slot) = self.blocked.lock() else { return };
        if slot.is_some() {
            return;
        }
        tracing::error!(topic = %blocked.topic, partition = blocked.partition, offset = blocked.offset,
            reason = %blocked.reason, "a message cannot be applied and has no key to set aside: the view stops covering here");
        self.health.set_not_ready(format!(
            "blocked at {}/{}/{}: {}; see docs/operations.md, \"A blocked view\"",
            blocked.topic, blocked.partition, blocked.offset, blocked.reason
        ));
        self.metrics.ready.set(0);
        *slot = Some(blocked);
        self.is_blocked.store(true, Ordering::Release);
    }

    pub fn blocked(&self) -> Option<Blocked> {
        self.blocked.lock().ok().and_then(|b| b.clone())
    }

    /// The offset of `topic`/`partition` that coverage must not pass, if blocked there.
    /// Asked for every partition of every watermark, on every message: no lock, no copy
    /// while nothing is blocked.
    pub fn blocked_at(&self, topic: &str, partition: i32) -> Option<i64> {
        if !self.is_blocked.load(Ordering::Acquire) {
            return None;
        }
        let slot = self.blocked.lock().ok()?;
        slot.as_ref().filter(|b| b.topic == topic && b.partition == partition).map(|b| b.offset)
    }

    /// The coverage of table `index`.
    pub fn coverage(&self, index: usize) -> Option<Coverage> {
        self.tables[index].coverage()
    }

    /// The coverage every table shares (one producer feeds them all), for status and
    /// single-table views; None when tables follow different producers.
    pub fn shared_coverage(&self) -> Option<Coverage> {
        let first = self.tables.first()?;
        let producer = first.producer();
        self.tables.iter().all(|t| t.producer() == producer).then(|| first.coverage()).flatten()
    }

    /// New coverage for table `index` from its producer's watermarks; also applies the
    /// snapshot floor it completes.
    pub fn set_coverage(&self, index: usize, coverage: Coverage, producer: Option<&str>) {
        let t = &self.tables[index];
        // Never backwards, whatever the watermarks replay (same LSN: a newer heartbeat time).
        if t.coverage().is_some_and(|held| held.lsn > coverage.lsn) {
            return;
        }
        if let Some(name) = producer
            && let Ok(mut p) = t.producer.lock()
            && p.as_deref() != Some(name)
        {
            *p = Some(name.to_string());
        }
        let due = t.pending_snapshot_floor.lock().ok().and_then(|mut p| p.take_if(|floor| floor.lsn <= coverage.lsn));
        if let Some(floor) = due {
            let removed = t.raise_floor(floor);
            self.reset(index, floor.lsn);
            tracing::info!(table = %t.spec.name, removed, snapshot_lsn = %floor.lsn, "snapshot complete: rows it did not copy again are gone");
        }
        self.metrics.view_lsn.with_label_values(&[&t.spec.name]).set(coverage.lsn.0 as f64);
        t.coverage.send_replace(Some(coverage));
        self.announce(|| Invalidation::Coverage { table: index, coverage });
    }

    pub fn restore(&self) -> Restore {
        self.restore.lock().map(|r| *r).unwrap_or_default()
    }

    pub fn set_restore(&self, restore: Restore) {
        if restore.total > 0 {
            self.metrics.restore_progress.set((restore.done as f64 / restore.total as f64).min(1.0));
        }
        if let Ok(mut r) = self.restore.lock() {
            *r = restore;
        }
    }

    pub fn set_partition(&self, topic: &str, partition: i32, update: impl FnOnce(&mut PartitionState)) {
        if let Ok(mut map) = self.partitions.lock() {
            update(map.entry((topic.to_string(), partition)).or_default());
        }
    }

    pub fn partitions(&self) -> BTreeMap<(String, i32), PartitionState> {
        self.partitions.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Applies one message of table `index`'s topic. `header_position` is the
    /// `walcache.position` header (tombstones); `unavailable` the `walcache.unavailable`
    /// header (the reason a producer set the change aside).
    pub fn apply_table_message(
        &self,
        index: usize,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        header_position: Option<Position>,
        unavailable: Option<&str>,
        now_micros: i64,
    ) -> Outcome {
        let table = &self.tables[index];
        let contract = table.spec.contract;
        let registry = match Registry::builtin() {
            Ok(r) => r,
            Err(e) => return blocking(schema_code(&e), e.to_string()),
        };
        // The key first: whatever is wrong with the value, a readable key can be made unknown.
        let key_body = match key {
            Some(TRUNCATE_KEY) | None => None,
            Some(k) => match registry.decode_key(contract, k) {
                Ok(body) => Some(body),
                Err(e) => return blocking(schema_code(&e), format!("unreadable key: {e}")),
            },
        };
        let key_json = || key_body.and_then(|b| contract.key_plan.row_to_json(b).ok()).map(Json::Object);
        // Not applied, but the key is known: it reads unknown until a newer valid event.
        let unreadable = |code: &'static str, reason: String| {
            if let Some(body) = key_body {
                table.store.forget(body, code);
                self.changed_key(index, body, None);
            }
            Outcome::Bad(BadMessage { reason_code: code, reason, key: key_json() })
        };
        let Some(value) = value else {
            // A tombstone. After compaction it may be all that is left of a delete.
            if key == Some(TRUNCATE_KEY) {
                return Outcome::Ignored("marker_tombstone");
            }
            let Some(body) = key_body else {
                return blocking("missing_key", "a tombstone without a key");
            };
            let Some(position) = header_position else {
                return Outcome::Ignored("tombstone_without_position");
            };
            return self.store(index, body, &position, Change::Delete, Op::Delete, now_micros);
        };
        let decoded = match registry.decode_value(contract, value) {
            Ok(d) => d,
            Err(e) if key_body.is_some() => return unreadable(schema_code(&e), e.to_string()),
            Err(e) if key == Some(TRUNCATE_KEY) => {
                return blocking(schema_code(&e), format!("unreadable truncate marker: {e}"));
            }
            Err(e) => return blocking(schema_code(&e), format!("unreadable event without a key: {e}")),
        };
        let env = decoded.envelope;
        if env.op == Op::Truncate {
            if env.position.snapshot {
                if let Ok(mut pending) = table.pending_snapshot_floor.lock()
                    && pending.is_none_or(|p| env.position.is_newer_than(&p))
                {
                    *pending = Some(env.position);
                }
                // Already covered (a restore that reads the marker after the watermark)?
                if let Some(c) = table.coverage()
                    && c.lsn >= env.position.lsn
                {
                    self.set_coverage(index, c, None);
                }
            } else {
                let removed = table.raise_floor(env.position);
                self.reset(index, env.position.lsn);
                tracing::info!(table = %table.spec.name, removed, lsn = %env.position.lsn, "table truncated at the source");
            }
            return Outcome::Applied(Op::Truncate, env.position);
        }
        let Some(body) = key_body else {
            return blocking("missing_key", "a change event without a key");
        };
        if env.op != Op::Delete && env.after.is_none() {
            // The producer's "this key changed here, and its row is not available" marker.
            let reason = unavailable.unwrap_or(ROW_UNAVAILABLE);
            if table.floor().is_some_and(|f| !env.position.is_newer_than(&f)) {
                return Outcome::Ignored("below_floor");
            }
            return match table.store.apply(body, &env.position, Change::Unavailable(reason), now_micros) {
                Applied::Changed => {
                    self.changed_key(index, body, Some(env.position));
                    Outcome::Unavailable(env.position)
                }
                Applied::Stale => Outcome::Ignored("not_newer"),
                Applied::BelowForgotten => Outcome::Ignored("older_than_forgotten"),
            };
        }
        let image = if env.op == Op::Delete { env.before } else { env.after };
        if let Some(row) = image {
            match contract.key_matches_row(decoded.version, body, row) {
                Ok(true) => {}
                Ok(false) => {
                    return unreadable("key_mismatch", "the message key is not the key of the row it carries".into());
                }
                Err(e) => return unreadable(schema_code(&e), e.to_string()),
            }
        }
        let row = match (env.op, env.after) {
            (Op::Delete, _) | (_, None) => None,
            (_, Some(after)) if decoded.version.version == table.spec.reader.version => {
                Some(std::borrow::Cow::Borrowed(after))
            }
            (_, Some(after)) => match contract.resolve_row(decoded.version, table.spec.reader, after) {
                Ok(r) => Some(std::borrow::Cow::Owned(r)),
                Err(e) => return unreadable(schema_code(&e), e.to_string()),
            },
        };
        let change = match row.as_deref() {
            Some(r) => Change::Upsert(r),
            None => Change::Delete,
        };
        self.store(index, body, &env.position, change, env.op, now_micros)
    }

    fn store(&self, index: usize, key: &[u8], position: &Position, change: Change<'_>, op: Op, now: i64) -> Outcome {
        let table = &self.tables[index];
        if table.floor().is_some_and(|f| !position.is_newer_than(&f)) {
            return Outcome::Ignored("below_floor");
        }
        match table.store.apply(key, position, change, now) {
            Applied::Changed => {
                self.changed_key(index, key, Some(*position));
                Outcome::Applied(op, *position)
            }
            Applied::Stale => Outcome::Ignored("not_newer"),
            Applied::BelowForgotten => Outcome::Ignored("older_than_forgotten"),
        }
    }
}
