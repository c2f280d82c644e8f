//! The materialised view: every table's store, the truncate floors, the coverage from
//! watermarks, readiness and partition positions, shared by the applier and the query API.
//!
//! ```text
//!  applier ──apply_table_message──► TableView.store (position-aware)      ◄── API reads
//!          ──set_coverage─────────► coverage (watch) ─► min_lsn waiters   ◄── API waits
//!          ──set_partition────────► positions, lag                        ◄── /v1/status
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::Value as Json;
use tokio::sync::watch;
use walcache_common::ops::Health;
use walcache_schemas::{Op, Position, Registry, SchemaError};

use crate::config::{CacheConfig, TableSpec};
use crate::metrics::Metrics;
use crate::store::{Applied, TableStore};
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
}

impl TableView {
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
    /// Valid, but it changed nothing (`not_newer`, `below_floor`, ...).
    Ignored(&'static str),
    /// Invalid: to be dead-lettered with this reason.
    Bad(BadMessage),
}

/// Why a message was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage {
    pub reason_code: &'static str,
    pub reason: String,
    pub key: Option<Json>,
}

fn bad(reason_code: &'static str, reason: impl Into<String>) -> Outcome {
    Outcome::Bad(BadMessage { reason_code, reason: reason.into(), key: None })
}

fn schema_bad(e: &SchemaError) -> Outcome {
    let code = match e {
        SchemaError::NotSingleObject => "not_single_object",
        SchemaError::UnknownSchema { .. } => "unknown_schema",
        SchemaError::WrongSchema { .. } => "wrong_schema",
        SchemaError::Avro(_) => "unresolvable",
        _ => "malformed",
    };
    bad(code, e.to_string())
}

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

/// The view.
#[derive(Debug)]
pub struct View {
    pub tables: Vec<TableView>,
    by_name: HashMap<String, usize>,
    by_topic: HashMap<String, usize>,
    coverage: watch::Sender<Option<Coverage>>,
    ready: AtomicBool,
    restore: Mutex<Restore>,
    partitions: Mutex<BTreeMap<(String, i32), PartitionState>>,
    pub dead_letters: AtomicU64,
    pub metrics: Metrics,
    pub health: std::sync::Arc<Health>,
}

impl View {
    pub fn new(specs: Vec<TableSpec>, cache: &CacheConfig, metrics: Metrics, health: std::sync::Arc<Health>) -> View {
        let tables: Vec<TableView> = specs
            .into_iter()
            .map(|spec| TableView {
                spec,
                store: TableStore::new(cache.capacity, cache.pages, cache.delete_retention),
                floor: Mutex::new(None),
                pending_snapshot_floor: Mutex::new(None),
            })
            .collect();
        let by_name = tables.iter().enumerate().map(|(i, t)| (t.spec.name.clone(), i)).collect();
        let by_topic = tables.iter().enumerate().map(|(i, t)| (t.spec.topic.clone(), i)).collect();
        health.set_not_ready("restoring the view from the topics");
        View {
            tables,
            by_name,
            by_topic,
            coverage: watch::channel(None).0,
            ready: AtomicBool::new(false),
            restore: Mutex::new(Restore::default()),
            partitions: Mutex::new(BTreeMap::new()),
            dead_letters: AtomicU64::new(0),
            metrics,
            health,
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
        self.metrics.ready.set(1);
        self.metrics.restore_progress.set(1.0);
        self.health.set_ready();
    }

    pub fn coverage(&self) -> Option<Coverage> {
        *self.coverage.borrow()
    }

    pub fn subscribe_coverage(&self) -> watch::Receiver<Option<Coverage>> {
        self.coverage.subscribe()
    }

    /// New coverage from the watermarks; also applies snapshot floors it completes.
    pub fn set_coverage(&self, coverage: Coverage) {
        for t in &self.tables {
            let due =
                t.pending_snapshot_floor.lock().ok().and_then(|mut p| p.take_if(|floor| floor.lsn <= coverage.lsn));
            if let Some(floor) = due {
                let removed = t.raise_floor(floor);
                tracing::info!(table = %t.spec.name, removed, snapshot_lsn = %floor.lsn, "snapshot complete: rows it did not copy again are gone");
            }
        }
        self.metrics.view_lsn.set(coverage.lsn.0 as f64);
        self.coverage.send_replace(Some(coverage));
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
    /// `walcache.position` header (tombstones).
    pub fn apply_table_message(
        &self,
        index: usize,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        header_position: Option<Position>,
        now_micros: i64,
    ) -> Outcome {
        let table = &self.tables[index];
        let contract = table.spec.contract;
        let registry = match Registry::builtin() {
            Ok(r) => r,
            Err(e) => return schema_bad(&e),
        };
        let Some(value) = value else {
            // A tombstone. After compaction it may be all that is left of a delete.
            let Some(key) = key else {
                return bad("missing_key", "a tombstone without a key");
            };
            if key == TRUNCATE_KEY {
                return Outcome::Ignored("marker_tombstone");
            }
            let body = match registry.decode_key(contract, key) {
                Ok(b) => b,
                Err(e) => return schema_bad(&e),
            };
            let Some(position) = header_position else {
                return Outcome::Ignored("tombstone_without_position");
            };
            return self.store(table, body, &position, None, Op::Delete, now_micros);
        };
        let decoded = match registry.decode_value(contract, value) {
            Ok(d) => d,
            Err(e) => return schema_bad(&e),
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
                if let Some(c) = self.coverage()
                    && c.lsn >= env.position.lsn
                {
                    self.set_coverage(c);
                }
            } else {
                let removed = table.raise_floor(env.position);
                tracing::info!(table = %table.spec.name, removed, lsn = %env.position.lsn, "table truncated at the source");
            }
            return Outcome::Applied(Op::Truncate, env.position);
        }
        let Some(key) = key else {
            return bad("missing_key", "a change event without a key");
        };
        let body = match registry.decode_key(contract, key) {
            Ok(b) => b,
            Err(e) => return schema_bad(&e),
        };
        let key_json = || contract.key_plan.row_to_json(body).ok().map(Json::Object);
        let image = if env.op == Op::Delete { env.before } else { env.after };
        if env.op != Op::Delete && env.after.is_none() {
            return Outcome::Bad(BadMessage {
                reason_code: "missing_row",
                reason: format!("a {} event without its row", env.op.as_str()),
                key: key_json(),
            });
        }
        if let Some(row) = image {
            match contract.key_matches_row(decoded.version, body, row) {
                Ok(true) => {}
                Ok(false) => {
                    return Outcome::Bad(BadMessage {
                        reason_code: "key_mismatch",
                        reason: "the message key is not the key of the row it carries".into(),
                        key: key_json(),
                    });
                }
                Err(e) => return schema_bad(&e),
            }
        }
        let row = match (env.op, env.after) {
            (Op::Delete, _) | (_, None) => None,
            (_, Some(after)) if decoded.version.version == table.spec.reader.version => {
                Some(std::borrow::Cow::Borrowed(after))
            }
            (_, Some(after)) => match contract.resolve_row(decoded.version, table.spec.reader, after) {
                Ok(r) => Some(std::borrow::Cow::Owned(r)),
                Err(e) => return schema_bad(&e),
            },
        };
        self.store(table, body, &env.position, row.as_deref(), env.op, now_micros)
    }

    fn store(
        &self,
        table: &TableView,
        key: &[u8],
        position: &Position,
        row: Option<&[u8]>,
        op: Op,
        now: i64,
    ) -> Outcome {
        if table.floor().is_some_and(|f| !position.is_newer_than(&f)) {
            return Outcome::Ignored("below_floor");
        }
        match table.store.apply(key, position, row, now) {
            Applied::Changed => Outcome::Applied(op, *position),
            Applied::Stale => Outcome::Ignored("not_newer"),
        }
    }
}
