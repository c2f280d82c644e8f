//! One producer session and the supervisor that restarts it.
//!
//! ```text
//!  run ──► session ─┬─ leader lock (advisory lock per slot; standby until it is free)
//!     ▲             ├─ publication, topics, sink offsets
//!     │             ├─ slot state: resume | (re)create + snapshot
//!     │             ├─ stream: slot ──decode──► emitter ──► sink ──acks──► confirm LSN, watermarks
//!     │             └─ SIGTERM: stop reading, flush, confirm, wait for the slot to show it
//!     └── transient error: backoff, new session (the slot replays from its confirmed LSN)
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use walcache_common::kafka::{Metadata, TopicSpec, ensure_topics};
use walcache_common::ops::Health;
use walcache_schemas::position::PG_EPOCH_OFFSET_MICROS;
use walcache_schemas::{Lsn, Op, Position, ProducerState, now_micros};

use crate::ProducerError;
use crate::binding::{Binding, TableRuntime};
use crate::config::{PINNED_TEXT_SETTINGS, PgConnection, ProducerConfig, SnapshotMode};
use crate::events::Emitter;
use crate::metrics::Metrics;
use crate::pgoutput::{self, Change, OldTuple, Tuples};
use crate::postgres::{Control, HEARTBEAT_PREFIX, parse_lsn, quote_ident};
use crate::publication::{self, PublicationGuard, Verified};
use crate::sink::{Checkpoint, CheckpointKind, Sink};
use crate::snapshot::copier::SNAPSHOT_MESSAGE_PREFIX;
use crate::snapshot::jobs::{self, JobKind, SnapshotState};
use crate::snapshot::run::{SIGNAL_PREFIX, Snapshots};
use crate::{check, reselect, state};

/// A configured producer, ready to run.
pub struct Producer {
    config: ProducerConfig,
    pg: PgConnection,
    tables: Vec<Arc<TableRuntime>>,
    metrics: Metrics,
    health: Arc<Health>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("slot", &self.config.postgres.slot).finish_non_exhaustive()
    }
}

impl Producer {
    pub fn new(config: ProducerConfig, metrics: Metrics, health: Arc<Health>) -> Result<Self, ProducerError> {
        config.validate()?;
        let pg = config.pg_connection()?;
        let tables = config
            .table_specs()?
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                TableRuntime::new(i, spec)
                    .map(Arc::new)
                    .ok_or_else(|| ProducerError::Config("contract version vanished".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for table in &tables {
            metrics.init_table(&table.qualified);
        }
        Ok(Producer { config, pg, tables, metrics, health })
    }

    /// Runs sessions until `cancel` fires (then drains and returns `Ok`) or a definite error.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), ProducerError> {
        let mut backoff = Duration::from_millis(500);
        loop {
            let started = Instant::now();
            let span = tracing::info_span!("session", slot = %self.config.postgres.slot);
            // SIGTERM must end the process within shutdown_timeout even when the session is
            // stuck waiting on Kafka or Postgres: the drain gets that long, then the session
            // is dropped (what it had not confirmed is sent again on the next start).
            let shutdown_timeout = self.config.pipeline.shutdown_timeout;
            let deadline = async {
                cancel.cancelled().await;
                tokio::time::sleep(shutdown_timeout).await;
            };
            let outcome = tokio::select! {
                result = self.session(&cancel).instrument(span) => result,
                () = deadline => Err(ProducerError::ShutdownDeadline { after: shutdown_timeout }),
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && !cancel.is_cancelled() => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(500);
                    }
                    self.metrics.restarts.with_label_values(&["transient"]).inc();
                    self.health.set_not_ready(format!("restarting after: {e}"));
                    let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
                    tracing::warn!(error = %e, retry_in_ms = (backoff + jitter).as_millis() as u64, "session failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff + jitter) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) if cancel.is_cancelled() && e.is_transient() => {
                    tracing::warn!(error = %e, "session ended during shutdown");
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn replication_config(&self) -> ReplicationConfig {
        let p = &self.config.pipeline;
        ReplicationConfig::new(
            self.pg.host.clone(),
            self.pg.user.clone(),
            self.pg.password.expose().to_string(),
            self.pg.database.clone(),
            self.config.postgres.slot.clone(),
            self.config.postgres.publication.as_str(),
        )
        .with_port(self.pg.port)
        .with_status_interval(p.status_interval)
        .with_wakeup_interval(Duration::from_secs(10))
        .with_buffer_size(8192)
        // Text output the contract parsers expect, whatever the server's defaults.
        .with_options(PINNED_TEXT_SETTINGS)
        .with_application_name(format!("walcache-producer-{}", self.config.postgres.slot))
        .with_tls(crate::tls::replication(&self.pg.tls, &self.pg.host))
    }

    async fn session(&self, cancel: &CancellationToken) -> Result<(), ProducerError> {
        let slot = self.config.postgres.slot.as_str();
        self.health.set_not_ready("connecting to Postgres");
        let control = Control::connect(&self.pg, &format!("walcache-producer-{slot}-control")).await?;

        // One leader per slot: the others wait here and take over when it goes.
        let mut announced = false;
        while !control.try_lock_leader(slot).await? {
            if !announced {
                let holder = control.leader_pid(slot).await?;
                tracing::info!(holder_pid = ?holder, "another producer leads this slot; standing by to take over");
                self.health.set_standing_by("standby: another producer leads this slot");
                announced = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = control.lost.cancelled() => return Err(lost_control()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let _leader = LeaderGauge::new(&self.metrics);
        tracing::info!("leading the slot");

        check::require_streaming_prerequisites(&control, &self.pg, &self.config, &self.tables).await?;
        let specs: Vec<_> = self.tables.iter().map(|t| t.spec.clone()).collect();
        let publication = &self.config.postgres.publication;

        let kafka = &self.config.kafka;
        let metadata = Metadata::new(kafka, &format!("walcache-producer-{slot}"))?;
        ensure_topics(kafka, &metadata, &self.topic_specs()).await?;
        let mut topics: Vec<String> = self.tables.iter().map(|t| t.spec.topic.clone()).collect();
        topics.push(self.config.topics.dead_letter.clone());
        topics.push(self.config.topics.snapshots.clone());
        let state_topic = self.tables.len() + 1;
        let mut sink = Sink::new(
            kafka,
            slot,
            topics,
            &self.config.topics.watermarks,
            self.config.pipeline.max_in_flight,
            self.metrics.clone(),
        )?;
        sink.init_offsets(&metadata).await?;
        let emitter = Emitter::new(&self.tables, self.tables.len(), slot, self.metrics.clone());

        let marker = state::last_watermark(kafka, &metadata, &self.config.topics.watermarks, slot).await?;
        let recorded = jobs::load(kafka, &metadata, &self.config.topics.snapshots, slot).await?;
        let existing = control.slot_info(slot).await?;
        if let Some(info) = &existing {
            let plugin_ok = info.plugin.as_deref() == Some("pgoutput");
            let db_ok = info.database.as_deref() == Some(self.pg.database.as_str());
            if !plugin_ok || !db_ok {
                return Err(ProducerError::Prerequisite {
                    problem: format!(
                        "slot {slot} exists for database {:?} with plugin {:?}",
                        info.database, info.plugin
                    ),
                    fix: format!(
                        "walcache needs a pgoutput slot in {}: choose another postgres.slot or drop this one",
                        self.pg.database
                    ),
                });
            }
        }
        let names: Vec<String> = self.tables.iter().map(|t| t.qualified.clone()).collect();
        let copy = self.config.snapshot.mode == SnapshotMode::Initial;
        let now = now_micros();
        let (client, state) = match &existing {
            Some(info) => {
                let mut state = match recorded {
                    Some(state) => state,
                    // Written by a version that snapshotted inside the slot's exported snapshot
                    // and streamed only once it was complete.
                    None if marker.as_ref().is_some_and(|m| m.state == ProducerState::Streaming) => {
                        SnapshotState::all_complete(&names)
                    }
                    None => {
                        tracing::warn!(
                            "the slot's initial snapshot never completed; copying every table while streaming"
                        );
                        SnapshotState::for_new_slot(&names, copy, now)
                    }
                };
                let added = state.reconcile(&names, copy, now);
                control.ensure_publication(publication, &specs).await?;
                if !added.is_empty() {
                    tracing::info!(tables = ?added, "tables joined the configuration: they are copied while the others stream");
                    control.wait_for_transactions_in_progress(cancel).await?;
                }
                // Rows older than the slot's confirmed position that a first copy does not
                // write again are gone: every later change streams.
                let floor = info.confirmed_flush.map_or(0, |l| l.0);
                for job in state.jobs.iter_mut().filter(|j| j.floor_lsn.is_none() && j.kind == JobKind::Initial) {
                    job.floor_lsn = Some(floor);
                }
                tracing::info!(confirmed = ?info.confirmed_flush, "resuming from the slot's confirmed position");
                let mut client = ReplicationClient::connect(self.replication_config())
                    .await
                    .map_err(|e| ProducerError::repl("connecting for replication", e))?;
                client.wait_started().await.map_err(|e| ProducerError::repl("starting replication", e))?;
                (client, state)
            }
            None => {
                if marker.is_some() {
                    tracing::warn!(
                        "the slot is gone (dropped?); creating a new one, which needs a new initial snapshot"
                    );
                }
                control.ensure_publication(publication, &specs).await?;
                self.create_slot(&mut sink, state_topic, SnapshotState::for_new_slot(&names, copy, now)).await?
            }
        };
        self.stream(client, &control, sink, emitter, state, state_topic, cancel).await
    }

    fn topic_specs(&self) -> Vec<TopicSpec> {
        let t = &self.config.topics;
        let min_isr = ("min.insync.replicas".to_string(), t.effective_min_insync_replicas().to_string());
        let mut specs: Vec<TopicSpec> = self
            .tables
            .iter()
            .map(|table| TopicSpec {
                name: table.spec.topic.clone(),
                partitions: t.partitions,
                replication_factor: t.replication_factor,
                configs: vec![("cleanup.policy".into(), "compact".into()), min_isr.clone()],
            })
            .collect();
        specs.push(TopicSpec {
            name: t.watermarks.clone(),
            partitions: 1,
            replication_factor: t.replication_factor,
            configs: vec![("cleanup.policy".into(), "compact".into()), min_isr.clone()],
        });
        specs.push(TopicSpec {
            name: t.snapshots.clone(),
            partitions: 1,
            replication_factor: t.replication_factor,
            configs: vec![("cleanup.policy".into(), "compact".into()), min_isr.clone()],
        });
        specs.push(TopicSpec {
            name: t.dead_letter.clone(),
            partitions: 1,
            replication_factor: t.replication_factor,
            configs: vec![("cleanup.policy".into(), "delete".into()), min_isr],
        });
        specs
    }

    /// Creates the slot and starts streaming from its consistent point; the tables are copied
    /// while it streams. The state record (every table to copy) and a `snapshotting` watermark
    /// are in Kafka before the slot exists, so a crash at any point leaves a slot whose state
    /// says what is still to copy.
    async fn create_slot(
        &self,
        sink: &mut Sink,
        state_topic: usize,
        mut state: SnapshotState,
    ) -> Result<(ReplicationClient, SnapshotState), ProducerError> {
        let slot = &self.config.postgres.slot;
        let tag = crate::sink::DeliveryTag { events: None, bytes: None };
        sink.send(state_topic, slot.as_bytes(), Some(&state.encode()), tag).await?;
        sink.flush(tokio::time::Instant::now() + self.config.kafka.request_timeout * 3).await?;
        let start = Checkpoint { lsn: Lsn::ZERO, commit_ts_micros: now_micros(), kind: CheckpointKind::Snapshot };
        sink.publish_watermark(&sink.watermark(&start, ProducerState::Snapshotting), true).await?;
        sink.take_completed();

        let mut client = ReplicationClient::connect_gated(self.replication_config())
            .await
            .map_err(|e| ProducerError::repl("connecting for replication", e))?;
        let rows = client
            .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT", quote_ident(slot)))
            .await
            .map_err(|e| ProducerError::repl(format!("creating slot {slot}"), e))?;
        let row =
            rows.first().ok_or_else(|| ProducerError::Config("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let consistent_point =
            row.get(1).and_then(|v| v.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        let consistent_point = parse_lsn(&consistent_point)?;
        tracing::info!(%consistent_point, tables = state.jobs.len(), "created the replication slot; tables are copied while it streams");
        for job in &mut state.jobs {
            job.floor_lsn = Some(consistent_point.0);
        }
        client.start().await.map_err(|e| ProducerError::repl("starting replication", e))?;
        client.wait_started().await.map_err(|e| ProducerError::repl("starting replication", e))?;
        Ok((client, state))
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        mut client: ReplicationClient,
        control: &Control,
        mut sink: Sink,
        mut emitter: Emitter,
        state: SnapshotState,
        state_topic: usize,
        cancel: &CancellationToken,
    ) -> Result<(), ProducerError> {
        let tasks = TaskTracker::new();
        let background = cancel.child_token();
        tasks.spawn(
            background_chores(control.clone(), self.config.clone(), self.metrics.clone(), background.clone())
                .instrument(tracing::info_span!("chores")),
        );
        let mut snapshots = Snapshots::new(
            state,
            self.tables.clone(),
            &self.pg,
            &self.config.postgres.slot,
            state_topic,
            self.config.snapshot.parallelism,
            self.config.snapshot.chunk_rows,
            self.metrics.clone(),
            background.child_token(),
        );
        snapshots.start(&mut sink, &mut emitter).await?;
        if snapshots.creating() {
            self.health.set_standing_by("initial snapshot in progress");
        } else {
            self.health.set_ready();
        }
        tracing::info!("streaming changes");
        let mut stream = Stream {
            snapshots,
            producer: self,
            bindings: HashMap::new(),
            unrouted: HashMap::new(),
            tuples: Tuples::default(),
            tx: None,
            last_queued: Lsn::ZERO,
            unpublished: None,
            last_watermark: Instant::now(),
            confirmed: None,
            held: None,
            guard: PublicationGuard::start(
                control.clone(),
                &self.config.postgres.publication,
                self.tables.iter().map(|t| t.spec.clone()).collect(),
                self.config.pipeline.publication_check_interval,
            ),
        };
        let result = stream.run(&mut client, control, &mut sink, &mut emitter, cancel).await;
        stream.snapshots.stop().await;
        let result = match result {
            Ok(()) => stream.drain(&mut client, control, &mut sink).await,
            Err(e) => Err(e),
        };
        background.cancel();
        tasks.close();
        tasks.wait().await;
        client.stop();
        self.health.set_not_ready("stopped");
        result
    }
}

/// Sets the leader gauge while alive.
struct LeaderGauge(prometheus::IntGauge);

impl LeaderGauge {
    fn new(metrics: &Metrics) -> Self {
        metrics.leader.set(1);
        LeaderGauge(metrics.leader.clone())
    }
}

impl Drop for LeaderGauge {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

fn lost_control() -> ProducerError {
    ProducerError::Common(walcache_common::CommonError::Io {
        context: "the control connection to Postgres ended, and with it the leader lock".into(),
        source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "control connection lost"),
    })
}

/// Heartbeats through the WAL and slot-lag measurement, beside the stream.
async fn background_chores(control: Control, config: ProducerConfig, metrics: Metrics, cancel: CancellationToken) {
    let slot = config.postgres.slot.clone();
    let mut heartbeat = tokio::time::interval(config.pipeline.heartbeat_interval);
    let mut lag = tokio::time::interval(config.pipeline.lag_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = heartbeat.tick() => {
                if let Err(e) = control.emit_heartbeat(&slot).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
            _ = lag.tick() => match control.slot_lag_bytes(&slot).await {
                Ok(Some(bytes)) => metrics.slot_lag_bytes.set(bytes),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "measuring slot lag failed"),
            },
        }
    }
}

/// Tells open snapshot windows which keys a streamed change touched (both keys of an update
/// that moves its key; `None` when a key cannot be read).
fn track_keys(snapshots: &mut Snapshots, binding: &Binding, data: &[u8], change: &Change, t: &Tuples) {
    let table = binding.table.index;
    let mut key = Vec::with_capacity(32);
    let mut touch = |columns: &[pgoutput::ColumnRef], snapshots: &mut Snapshots| match binding
        .encode_key(data, columns, &mut key)
    {
        Ok(()) => snapshots.touched(table, Some(&key)),
        Err(_) => snapshots.touched(table, None),
    };
    match change {
        Change::Insert { .. } => touch(&t.new, snapshots),
        Change::Update { old_kind, .. } => {
            touch(&t.new, snapshots);
            if old_kind.is_some() {
                touch(&t.old, snapshots);
            }
        }
        Change::Delete { .. } => touch(&t.old, snapshots),
        Change::Relation(_) | Change::Truncate { .. } | Change::Ignored(_) => {}
    }
}

/// A relation the stream described that maps to no configured table.
struct Unrouted {
    /// Its name now.
    now: String,
    /// The configured table it was bound to before (a rename or a move).
    was: Option<String>,
}

/// State of the streaming loop.
struct Stream<'p> {
    producer: &'p Producer,
    snapshots: Snapshots,
    bindings: HashMap<u32, Binding>,
    unrouted: HashMap<u32, Unrouted>,
    tuples: Tuples,
    /// Position of the next change of the open transaction.
    tx: Option<Position>,
    /// Highest LSN queued as a checkpoint.
    last_queued: Lsn,
    unpublished: Option<Checkpoint>,
    last_watermark: Instant,
    /// The newest checkpoint confirmed to the slot.
    confirmed: Option<Checkpoint>,
    /// The newest acknowledged checkpoint waiting for a publication check to cover it.
    held: Option<Checkpoint>,
    guard: PublicationGuard,
}

fn to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

impl Stream<'_> {
    async fn run(
        &mut self,
        client: &mut ReplicationClient,
        control: &Control,
        sink: &mut Sink,
        emitter: &mut Emitter,
        cancel: &CancellationToken,
    ) -> Result<(), ProducerError> {
        let mut ticker = tokio::time::interval(self.producer.config.pipeline.watermark_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(cp) = sink.take_completed() {
                self.confirmable(cp, sink).await?;
            }
            tokio::select! {
                // A transaction whose events are partly sent is read to its commit first, so the
                // drain can confirm it and a restart repeats nothing (shutdown_timeout bounds it).
                _ = cancel.cancelled(), if self.tx.is_none() => return Ok(()),
                _ = control.lost.cancelled() => return Err(lost_control()),
                done = sink.wait_completions(), if sink.has_pending() => { done?; }
                event = client.recv(), if sink.has_room() => match event {
                    Ok(Some(event)) => self.handle(event, control, sink, emitter).await?,
                    Ok(None) => {
                        return Err(ProducerError::repl(
                            "the replication stream ended",
                            pgwire_replication::PgWireError::Task("stream closed by the server".into()),
                        ));
                    }
                    Err(e) => return Err(ProducerError::repl("receiving changes", e)),
                },
                _ = ticker.tick() => self.publish_pending(sink).await?,
                verified = self.guard.changed() => self.on_verified(verified, client, sink).await?,
                Some(message) = self.snapshots.next_message() => self.snapshots.keep(message)?,
            }
        }
    }

    async fn handle(
        &mut self,
        event: ReplicationEvent,
        control: &Control,
        sink: &mut Sink,
        emitter: &mut Emitter,
    ) -> Result<(), ProducerError> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.snapshots.begin(xid);
                self.tx = Some(Position {
                    lsn: Lsn(final_lsn.as_u64()),
                    index: 0,
                    txid: u64::from(xid),
                    commit_ts_micros: to_unix_micros(commit_time_micros),
                    snapshot: false,
                });
            }
            ReplicationEvent::Commit { end_lsn, commit_time_micros, .. } => {
                self.tx = None;
                let lsn = Lsn(end_lsn.as_u64());
                self.last_queued = self.last_queued.max(lsn);
                sink.checkpoint(Checkpoint {
                    lsn,
                    commit_ts_micros: to_unix_micros(commit_time_micros),
                    kind: CheckpointKind::Commit,
                });
            }
            ReplicationEvent::XLogData { data, .. } => self.change(&data, control, sink, emitter).await?,
            ReplicationEvent::KeepAlive { wal_end, server_time_micros, .. } => {
                // Between transactions everything before wal_end has been sent to us, so once
                // it is all in Kafka the view is complete up to wal_end.
                let lsn = Lsn(wal_end.as_u64());
                if self.tx.is_none() && lsn > self.last_queued {
                    self.last_queued = lsn;
                    sink.checkpoint(Checkpoint {
                        lsn,
                        commit_ts_micros: to_unix_micros(server_time_micros),
                        kind: CheckpointKind::Idle,
                    });
                }
            }
            ReplicationEvent::Message { prefix, content, lsn, .. } => match prefix.as_str() {
                HEARTBEAT_PREFIX => {}
                SNAPSHOT_MESSAGE_PREFIX => self.snapshots.on_mark(&content, self.tx, sink, emitter).await?,
                SIGNAL_PREFIX => self.snapshots.on_signal(&content, Lsn(lsn.as_u64()), sink).await?,
                _ => tracing::trace!(%prefix, "ignoring a logical message"),
            },
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    async fn change(
        &mut self,
        data: &[u8],
        control: &Control,
        sink: &mut Sink,
        emitter: &mut Emitter,
    ) -> Result<(), ProducerError> {
        let change = pgoutput::decode(data, &mut self.tuples)?;
        let relation = match &change {
            Change::Relation(r) => {
                self.bind(r.clone());
                return Ok(());
            }
            Change::Insert { relation } | Change::Update { relation, .. } | Change::Delete { relation, .. } => {
                *relation
            }
            Change::Truncate { relations, .. } => {
                let mut position = self.open_tx()?;
                if let Some(oid) = relations.iter().find(|oid| !self.bindings.contains_key(oid)) {
                    return Err(self.unroutable(*oid));
                }
                for oid in relations {
                    if let Some(b) = self.bindings.get(oid) {
                        self.snapshots.touched(b.table.index, None);
                        tracing::warn!(table = %b.table.qualified, lsn = %position.lsn, "table truncated; consumers drop its older rows");
                        emitter.truncate(sink, &b.table, &mut position).await?;
                    }
                }
                self.tx = Some(position);
                return Ok(());
            }
            Change::Ignored(_) => return Ok(()),
        };
        let Some(binding) = self.bindings.get(&relation) else {
            return Err(self.unroutable(relation));
        };
        let mut position = self.open_tx()?;
        let t = &self.tuples;
        if self.snapshots.tracking(binding.table.index) {
            track_keys(&mut self.snapshots, binding, data, &change, t);
        }
        match change {
            Change::Insert { .. } => {
                emitter.upsert(sink, binding, Op::Insert, data, &t.new, None, &mut position).await?;
            }
            Change::Update { old_kind, .. } => {
                let old = old_kind.map(|k| (k, &t.old[..]));
                // A full old row (REPLICA IDENTITY FULL) carries unchanged TOAST values itself.
                let unchanged =
                    if old_kind == Some(OldTuple::Full) { Vec::new() } else { binding.unchanged_toast_columns(&t.new) };
                let filled = if unchanged.is_empty() {
                    None
                } else {
                    let outcome =
                        reselect::fill_unchanged_toast(control, binding, data, &t.new, &unchanged, position.txid).await;
                    let reselects = &self.producer.metrics.toast_reselects;
                    match outcome {
                        Ok(Ok(filled)) => {
                            reselects.with_label_values(&[&binding.table.qualified, reselect::FILLED]).inc();
                            Some(filled)
                        }
                        // Set aside below as an unchanged-TOAST dead letter: consumers hold
                        // the key as unknown until its next change.
                        Ok(Err(why)) => {
                            reselects.with_label_values(&[&binding.table.qualified, why.as_str()]).inc();
                            None
                        }
                        Err(e) if e.is_transient() => return Err(e),
                        Err(e) => {
                            tracing::warn!(table = %binding.table.qualified, error = %e, "cannot re-read an unchanged TOAST value; the change is set aside");
                            reselects.with_label_values(&[&binding.table.qualified, reselect::FAILED]).inc();
                            None
                        }
                    }
                };
                match &filled {
                    Some(f) => {
                        emitter.upsert(sink, binding, Op::Update, &f.message, &f.columns, old, &mut position).await?
                    }
                    None => emitter.upsert(sink, binding, Op::Update, data, &t.new, old, &mut position).await?,
                }
            }
            Change::Delete { old_kind, .. } => {
                emitter.delete(sink, binding, data, old_kind, &t.old, &mut position).await?;
            }
            Change::Relation(_) | Change::Truncate { .. } | Change::Ignored(_) => {}
        }
        self.tx = Some(position);
        Ok(())
    }

    fn open_tx(&self) -> Result<Position, ProducerError> {
        self.tx.ok_or_else(|| {
            ProducerError::Decode(pgoutput::DecodeError("a change arrived outside a transaction".into()))
        })
    }

    /// Why a change of relation `oid` cannot be routed, for the operator.
    fn unroutable(&self, oid: u32) -> ProducerError {
        let publication = &self.producer.config.postgres.publication;
        match self.unrouted.get(&oid) {
            Some(Unrouted { now, was: Some(was) }) => ProducerError::Unroutable {
                problem: format!("table {was} is now called {now} (renamed or moved to another schema)"),
                fix: format!(
                    "Point tables.table at {now} (and its topic, if it should stay) and restart; or rename the table back"
                ),
            },
            Some(Unrouted { now, was: None }) => ProducerError::Unroutable {
                problem: format!("publication {publication} publishes {now}, which walcache is not configured for"),
                fix: format!(
                    "Add {now} to [[tables]] with its contract, or remove it: ALTER PUBLICATION {publication} DROP TABLE {now}"
                ),
            },
            None => ProducerError::Unroutable {
                problem: format!("a change arrived for relation oid {oid}, which the stream never described"),
                fix: "This breaks the pgoutput protocol; restart the producer, and report it if it happens again"
                    .into(),
            },
        }
    }

    fn bind(&mut self, relation: pgoutput::Relation) {
        let qualified = relation.qualified_name();
        let Some(table) = self.producer.tables.iter().find(|t| t.qualified == qualified) else {
            let was = self.bindings.remove(&relation.oid).map(|b| b.table.qualified.clone());
            self.unrouted.insert(relation.oid, Unrouted { now: qualified, was });
            return;
        };
        let oid = relation.oid;
        self.unrouted.remove(&oid);
        let (binding, warnings) = Binding::new(Arc::clone(table), relation);
        for w in warnings {
            self.producer.metrics.schema_warnings.with_label_values(&[&table.qualified, w.kind()]).inc();
            match &w {
                crate::binding::BindingWarning::ExtraColumn(c) => {
                    tracing::warn!(table = %qualified, column = %c, "column is not in the contract; ignored")
                }
                other => tracing::error!(
                    table = %qualified,
                    problem = ?other,
                    "table no longer matches its contract; its rows go to the dead-letter topic until the table or contract is fixed"
                ),
            }
        }
        self.bindings.insert(oid, binding);
    }

    /// A checkpoint whose every earlier message is in Kafka: snapshot chunks before it are
    /// delivered; it is held until a publication check covers it, then confirmed to the slot.
    async fn confirmable(&mut self, cp: Checkpoint, sink: &mut Sink) -> Result<(), ProducerError> {
        let was_creating = self.snapshots.creating();
        self.snapshots.delivered(cp.lsn, sink).await?;
        if was_creating && !self.snapshots.creating() {
            self.producer.health.set_ready();
        }
        self.held = Some(cp);
        self.guard.request(cp.lsn);
        Ok(())
    }

    async fn on_verified(
        &mut self,
        verified: Verified,
        client: &ReplicationClient,
        sink: &mut Sink,
    ) -> Result<(), ProducerError> {
        match verified {
            Verified::Upto(lsn) => match self.held {
                Some(cp) if cp.lsn <= lsn => {
                    self.held = None;
                    self.confirm(client, sink, cp).await
                }
                _ => Ok(()),
            },
            Verified::Broken(problem) => {
                let vouched = self.confirmed.map_or(Lsn::ZERO, |c| c.lsn);
                Err(publication::broken(&problem, &self.producer.config.postgres.slot, vouched))
            }
        }
    }

    /// Confirms a checkpoint the publication check covered: to the slot, then to consumers.
    async fn confirm(
        &mut self,
        client: &ReplicationClient,
        sink: &mut Sink,
        cp: Checkpoint,
    ) -> Result<(), ProducerError> {
        client.update_applied_lsn(pgwire_replication::Lsn::from_u64(cp.lsn.0));
        let m = &self.producer.metrics;
        m.confirmed_lsn.set(cp.lsn.0 as f64);
        if cp.kind == CheckpointKind::Commit {
            m.transactions.inc();
            m.commit_to_ack_seconds.observe(((now_micros() - cp.commit_ts_micros).max(0) as f64) / 1e6);
        }
        self.unpublished = Some(cp);
        self.confirmed = Some(cp);
        if self.last_watermark.elapsed() >= self.producer.config.pipeline.watermark_interval {
            self.publish_pending(sink).await?;
        }
        Ok(())
    }

    async fn publish_pending(&mut self, sink: &mut Sink) -> Result<(), ProducerError> {
        if let Some(cp) = self.unpublished.take() {
            sink.publish_watermark(&sink.watermark(&cp, self.snapshots.watermark_state()), false).await?;
            self.last_watermark = Instant::now();
        }
        Ok(())
    }

    /// SIGTERM: nothing more is read; what is in flight is delivered and confirmed.
    async fn drain(
        &mut self,
        client: &mut ReplicationClient,
        control: &Control,
        sink: &mut Sink,
    ) -> Result<(), ProducerError> {
        let cfg = &self.producer.config;
        let deadline = tokio::time::Instant::now() + cfg.pipeline.shutdown_timeout;
        tracing::info!("draining: flushing in-flight messages to Kafka");
        sink.flush(deadline).await?;
        if let Some(cp) = sink.take_completed() {
            self.confirmable(cp, sink).await?;
        }
        if let Some(cp) = self.held {
            let verified = self.guard.verify_now(cp.lsn).await?;
            self.on_verified(verified, client, sink).await?;
        }
        self.publish_pending(sink).await?;
        if let Some(cp) = self.confirmed {
            tracing::info!(lsn = %cp.lsn, "waiting for the slot to show the confirmed position");
            control.wait_confirmed(&cfg.postgres.slot, cp.lsn, deadline).await?;
            tracing::info!(lsn = %cp.lsn, "slot confirmed; shutdown complete");
        } else {
            tracing::info!("nothing new to confirm; shutdown complete");
        }
        sink.flush_client(Duration::from_secs(2));
        Ok(())
    }
}
