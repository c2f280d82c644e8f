//! Snapshot jobs inside a streaming session: starts the workers, releases chunks at their
//! high watermark, turns deliveries into progress, takes backfill signals in.
//!
//! ```text
//!  session start ─► floor markers of initial jobs ─► planner.add(job) ─► workers
//!  stream: [low c] open window · change of t: touched key · [high c] release chunk c
//!          walcache.signal {backfill} ─► job (state record queued before its commit)
//!  checkpoint past chunk c completes ─► job.after = c.upper ─► state record (compacted topic)
//! ```

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use walcache_schemas::{Lsn, Op, Position, ProducerState, now_micros};

use super::copier::{Chunk, Lower, Planner, Workers};
use super::jobs::{JobKind, SnapshotState};
use super::parse_copy_line;
use super::reconcile::{Mark, Reconciler, Redo, Release};
use crate::ProducerError;
use crate::binding::TableRuntime;
use crate::config::PgConnection;
use crate::events::Emitter;
use crate::metrics::Metrics;
use crate::pgoutput::ColumnRef;
use crate::sink::{DeliveryTag, Sink, TopicId};

/// Prefix of the logical messages `walcache-producer backfill` writes.
pub const SIGNAL_PREFIX: &str = "walcache.signal";

/// Outcomes of `walcache_producer_snapshot_chunks_total`.
pub const CHUNK_OUTCOMES: [&str; 4] = ["emitted", "unseen_transaction", "unkeyed_change", "no_window"];

/// How often a running job reports its progress in the log.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A backfill request, as `walcache-producer backfill` writes it into the WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillSignal {
    pub slot: String,
    pub table: String,
    #[serde(default)]
    pub from_key: Option<Vec<String>>,
    #[serde(default)]
    pub to_key: Option<Vec<String>>,
}

/// A chunk emitted into the sink, waiting for Kafka to acknowledge it.
#[derive(Debug)]
struct Emitted {
    /// Commit LSN of its high watermark: a completed checkpoint past it covers the rows.
    lsn: Lsn,
    job: u64,
    seq: u64,
    upper: Option<Vec<String>>,
    last: bool,
    rows: u64,
}

#[derive(Debug, Default)]
struct JobProgress {
    next_seq: u64,
    delivered: BTreeMap<u64, (Option<Vec<String>>, bool, u64)>,
    session_rows: u64,
    session_started: Option<Instant>,
}

/// The snapshot side of one streaming session.
pub struct Snapshots {
    pub state: SnapshotState,
    tables: Vec<Arc<TableRuntime>>,
    slot: String,
    state_topic: TopicId,
    reconciler: Reconciler,
    planner: Arc<Planner>,
    workers: Option<Workers>,
    tasks: TaskTracker,
    stop: CancellationToken,
    emitted: VecDeque<Emitted>,
    progress: HashMap<u64, JobProgress>,
    metrics: Metrics,
    last_log: Instant,
    parallelism: usize,
    line: Vec<u8>,
    columns: Vec<ColumnRef>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots").field("jobs", &self.state.jobs.len()).finish_non_exhaustive()
    }
}

impl Snapshots {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: SnapshotState,
        tables: Vec<Arc<TableRuntime>>,
        pg: &PgConnection,
        slot: &str,
        state_topic: TopicId,
        parallelism: usize,
        chunk_rows: usize,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Self {
        let session = rand::random::<u64>();
        let (to_stream, from_workers) = mpsc::channel(2 * parallelism);
        let planner = Arc::new(Planner::default());
        let workers = Workers {
            pg: pg.clone(),
            slot: slot.to_string(),
            session,
            chunk_rows,
            planner: Arc::clone(&planner),
            permits: Arc::new(Semaphore::new(2 * parallelism)),
            to_stream,
        };
        Snapshots {
            reconciler: Reconciler::new(slot, session, tables.len(), from_workers),
            state,
            tables,
            slot: slot.to_string(),
            state_topic,
            planner,
            workers: Some(workers),
            tasks: TaskTracker::new(),
            stop,
            emitted: VecDeque::new(),
            progress: HashMap::new(),
            metrics,
            last_log: Instant::now(),
            parallelism,
            line: Vec::with_capacity(512),
            columns: Vec::with_capacity(16),
            key: Vec::with_capacity(32),
        }
    }

    fn table(&self, qualified: &str) -> Option<&Arc<TableRuntime>> {
        self.tables.iter().find(|t| t.qualified == qualified)
    }

    /// Watermarks say `snapshotting` until the slot's creation snapshot is complete.
    pub fn watermark_state(&self) -> ProducerState {
        if self.state.creating() { ProducerState::Snapshotting } else { ProducerState::Streaming }
    }

    pub fn creating(&self) -> bool {
        self.state.creating()
    }

    /// Sink topics of tables whose first copy has not completed.
    pub fn unvouched_topics(&self) -> Vec<TopicId> {
        let incomplete = self.state.incomplete_tables();
        self.tables.iter().filter(|t| incomplete.contains(t.qualified.as_str())).map(|t| t.index).collect()
    }

    /// Queues the state record (ordered with everything else in the sink).
    pub async fn persist(&mut self, sink: &mut Sink) -> Result<(), ProducerError> {
        let tag = DeliveryTag { events: None, bytes: None };
        let bytes = self.state.encode();
        sink.send(self.state_topic, self.slot.as_bytes(), Some(&bytes), tag).await?;
        sink.set_unvouched(self.unvouched_topics());
        for kind in [JobKind::Initial, JobKind::Backfill] {
            let label = if kind == JobKind::Initial { "initial" } else { "backfill" };
            let n = self.state.jobs.iter().filter(|j| j.kind == kind).count();
            self.metrics.snapshot_jobs.with_label_values(&[label]).set(n as i64);
        }
        Ok(())
    }

    /// Session start: floor markers for initial jobs, every job to the planner, workers on.
    pub async fn start(&mut self, sink: &mut Sink, emitter: &mut Emitter) -> Result<(), ProducerError> {
        for job in self.state.jobs.clone() {
            let Some(table) = self.table(&job.table).cloned() else { continue };
            if job.kind == JobKind::Initial {
                // Rows older than the floor that the copy does not write again were deleted
                // while nothing streamed them: consumers drop them once the table is covered.
                let mut floor = Position {
                    lsn: Lsn(job.floor_lsn.unwrap_or(0)),
                    index: 0,
                    txid: 0,
                    commit_ts_micros: job.created_at,
                    snapshot: true,
                };
                emitter.truncate(sink, &table, &mut floor).await?;
            }
            let lower = match (&job.after, &job.from_key) {
                (Some(after), _) => Lower::Excluded(after.clone()),
                (None, Some(from)) => Lower::Included(from.clone()),
                (None, None) => Lower::Unbounded,
            };
            tracing::info!(table = %job.table, job = job.id, kind = ?job.kind, rows = job.rows, resumed = job.after.is_some(), "snapshot job queued");
            self.planner.add(job.id, table, lower, job.to_key.clone()).await;
        }
        // Every table has a progress figure from the start: complete ones 1, others what the
        // state says, so a dashboard shows a copy that has not delivered a chunk yet as 0.
        for table in &self.tables {
            let whole = self
                .state
                .jobs
                .iter()
                .find(|j| j.table == table.qualified && j.from_key.is_none() && j.to_key.is_none());
            let ratio = match whole {
                Some(job) => job.ratio().unwrap_or(0.0),
                None if self.state.complete.contains(&table.qualified) => 1.0,
                None => continue,
            };
            self.metrics.snapshot_progress.with_label_values(&[&table.qualified]).set(ratio);
        }
        self.persist(sink).await?;
        if let Some(workers) = self.workers.clone() {
            for worker in 0..self.parallelism {
                let (w, stop) = (workers.clone(), self.stop.clone());
                self.tasks.spawn(w.run(worker, stop).instrument(tracing::info_span!("snapshot", worker)));
            }
        }
        self.tasks.close();
        Ok(())
    }

    /// Stops the workers (chunks not emitted are copied again by the next session).
    pub async fn stop(&mut self) {
        self.stop.cancel();
        self.workers = None;
        self.tasks.wait().await;
    }

    pub fn begin(&mut self, xid: u32) {
        self.reconciler.begin(xid);
    }

    /// Keys a streamed change of `table` (when a window is open on it).
    pub fn tracking(&self, table: usize) -> bool {
        self.reconciler.tracking(table)
    }

    pub fn touched(&mut self, table: usize, key: Option<&[u8]>) {
        match key {
            Some(k) => self.reconciler.touched(table, k),
            None => self.reconciler.poison(table),
        }
    }

    /// A worker's message, for the stream's select loop.
    pub async fn next_message(&mut self) -> Option<super::copier::ChunkMessage> {
        self.reconciler.next_message().await
    }

    pub fn keep(&mut self, message: super::copier::ChunkMessage) -> Result<(), ProducerError> {
        self.reconciler.keep(message);
        self.reconciler.receive()
    }

    /// A snapshot watermark message in the stream. `tx` is the open transaction.
    pub async fn on_mark(
        &mut self,
        content: &[u8],
        tx: Option<Position>,
        sink: &mut Sink,
        emitter: &mut Emitter,
    ) -> Result<(), ProducerError> {
        match self.reconciler.parse(content) {
            Some(Mark::Low { chunk, table }) => self.reconciler.open(chunk, table),
            Some(Mark::High { chunk }) => match self.reconciler.high(chunk)? {
                None => {}
                Some(Release::Redo { chunk, why }) => self.redo(chunk, why).await,
                Some(Release::Emit { chunk, touched }) => {
                    let Some(tx) = tx else {
                        return Err(ProducerError::Config(
                            "a chunk's high watermark arrived outside a transaction".into(),
                        ));
                    };
                    self.emit(chunk, &touched, tx, sink, emitter).await?;
                }
            },
            None => {}
        }
        Ok(())
    }

    async fn redo(&mut self, chunk: Chunk, why: Redo) {
        let table = &chunk.work.table.qualified;
        self.metrics.snapshot_chunks.with_label_values(&[table, why.as_str()]).inc();
        tracing::info!(table = %table, chunk = chunk.work.chunk, reason = why.as_str(), "chunk copied again");
        let Chunk { work, .. } = chunk;
        self.planner.redo(work).await;
    }

    /// Emits a chunk's rows at its high watermark's position, except keys the stream changed.
    async fn emit(
        &mut self,
        chunk: Chunk,
        touched: &HashSet<Vec<u8>>,
        tx: Position,
        sink: &mut Sink,
        emitter: &mut Emitter,
    ) -> Result<(), ProducerError> {
        let table = Arc::clone(&chunk.work.table);
        // A copied row belongs to no transaction of the source (txid 0), like every snapshot row.
        let mut position = Position { index: 0, snapshot: true, txid: 0, ..tx };
        let (mut rows, mut superseded) = (0u64, 0u64);
        for line in chunk.copy.split(|&b| b == b'\n') {
            if line.is_empty() && rows + superseded == chunk.rows {
                break;
            }
            parse_copy_line(line, &mut self.line, &mut self.columns);
            if !touched.is_empty()
                && chunk.binding.encode_key(&self.line, &self.columns, &mut self.key).is_ok()
                && touched.contains(&self.key)
            {
                superseded += 1;
                continue;
            }
            emitter.upsert(sink, &chunk.binding, Op::Snapshot, &self.line, &self.columns, None, &mut position).await?;
            rows += 1;
        }
        let m = &self.metrics;
        m.snapshot_rows.with_label_values(&[&table.qualified]).inc_by(rows);
        m.snapshot_superseded.with_label_values(&[&table.qualified]).inc_by(superseded);
        m.snapshot_chunks.with_label_values(&[&table.qualified, "emitted"]).inc();
        if let Some(job) = self.state.job_mut(chunk.work.job)
            && job.estimate == 0
        {
            job.estimate = chunk.work.keys.estimate;
        }
        self.emitted.push_back(Emitted {
            lsn: tx.lsn,
            job: chunk.work.job,
            seq: chunk.work.seq,
            upper: chunk.work.upper.clone(),
            last: chunk.work.last,
            rows,
        });
        Ok(())
    }

    /// Everything queued before a checkpoint at `lsn` is in Kafka: chunks whose high
    /// watermark precedes it are delivered. Returns whether the state changed.
    pub async fn delivered(&mut self, lsn: Lsn, sink: &mut Sink) -> Result<bool, ProducerError> {
        let mut changed = false;
        let mut finished = Vec::new();
        while self.emitted.front().is_some_and(|e| e.lsn < lsn) {
            let Some(e) = self.emitted.pop_front() else { break };
            let p = self.progress.entry(e.job).or_default();
            p.session_started.get_or_insert_with(Instant::now);
            p.session_rows += e.rows;
            p.delivered.insert(e.seq, (e.upper, e.last, e.rows));
            let Some(job) = self.state.job_mut(e.job) else { continue };
            while let Some((upper, last, rows)) = p.delivered.remove(&p.next_seq) {
                p.next_seq += 1;
                job.rows += rows;
                job.after = upper;
                job.updated_at = now_micros();
                changed = true;
                if last {
                    finished.push(e.job);
                }
            }
            let elapsed = p.session_started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            if elapsed > 0.5 {
                job.rate = p.session_rows as f64 / elapsed;
            }
            job.eta_secs = (job.rate > 0.0 && job.estimate > job.rows)
                .then(|| ((job.estimate - job.rows) as f64 / job.rate) as u64);
            let m = &self.metrics;
            m.snapshot_estimated.with_label_values(&[&job.table]).set(job.estimate as f64);
            m.snapshot_eta.with_label_values(&[&job.table]).set(job.eta_secs.unwrap_or(0) as f64);
            if let Some(ratio) = job.ratio() {
                m.snapshot_progress.with_label_values(&[&job.table]).set(ratio);
            }
        }
        let was_creating = self.state.creating();
        for id in finished {
            if let Some(job) = self.state.finish(id) {
                self.progress.remove(&id);
                self.metrics.snapshot_eta.with_label_values(&[&job.table]).set(0.0);
                // A whole-table copy is done, even of a table too small to estimate.
                if job.from_key.is_none() && job.to_key.is_none() {
                    self.metrics.snapshot_progress.with_label_values(&[&job.table]).set(1.0);
                }
                let secs = (now_micros() - job.created_at).max(0) as f64 / 1e6;
                tracing::info!(table = %job.table, job = id, kind = ?job.kind, rows = job.rows, secs, "snapshot job complete");
            }
        }
        if was_creating && !self.state.creating() {
            tracing::info!("initial snapshot delivered: every table of the slot's creation is complete");
        }
        if changed {
            self.persist(sink).await?;
        }
        if self.last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
            self.last_log = Instant::now();
            for job in &self.state.jobs {
                tracing::info!(
                    table = %job.table,
                    job = job.id,
                    kind = ?job.kind,
                    rows = job.rows,
                    estimated_rows = job.estimate,
                    rows_per_sec = job.rate as u64,
                    eta_secs = ?job.eta_secs,
                    "snapshot progress"
                );
            }
        }
        Ok(changed)
    }

    /// A `walcache.signal` message at `lsn`: a backfill request for this slot.
    pub async fn on_signal(&mut self, content: &[u8], lsn: Lsn, sink: &mut Sink) -> Result<(), ProducerError> {
        let signal: BackfillSignal = match serde_json::from_slice(content) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %lsn, "ignoring a walcache.signal message that does not parse");
                return Ok(());
            }
        };
        if signal.slot != self.slot || lsn.0 <= self.state.last_signal_lsn {
            return Ok(());
        }
        self.state.last_signal_lsn = lsn.0;
        let Some(table) = self.table(&signal.table).cloned() else {
            tracing::error!(table = %signal.table, %lsn, "backfill requested for a table this producer does not stream; ignored");
            return self.persist(sink).await;
        };
        let arity = table.spec.contract.key_plan.fields.len();
        let bad = |k: &Option<Vec<String>>| k.as_ref().is_some_and(|k| k.len() != arity);
        if bad(&signal.from_key) || bad(&signal.to_key) {
            tracing::error!(table = %signal.table, %lsn, key_columns = arity, "backfill key range has the wrong number of key values; ignored");
            return self.persist(sink).await;
        }
        let now = now_micros();
        let id = self.state.add_backfill(&signal.table, signal.from_key.clone(), signal.to_key.clone(), now);
        let lower = signal.from_key.clone().map_or(Lower::Unbounded, Lower::Included);
        tracing::info!(table = %signal.table, job = id, %lsn, ranged = signal.from_key.is_some() || signal.to_key.is_some(), "backfill requested");
        self.planner.add(id, table, lower, signal.to_key).await;
        self.persist(sink).await
    }
}
