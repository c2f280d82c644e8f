//! The producer's Prometheus metrics. Names are constants so dashboards and alerts can refer
//! to them; labels are low-cardinality (table, op, reason code, kind), never keys or values.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub const EVENTS_TOTAL: &str = "walcache_producer_events_total";
pub const BYTES_TOTAL: &str = "walcache_producer_bytes_total";
pub const TRANSACTIONS_TOTAL: &str = "walcache_producer_transactions_total";
pub const DELIVERY_SECONDS: &str = "walcache_producer_delivery_seconds";
pub const COMMIT_TO_ACK_SECONDS: &str = "walcache_producer_commit_to_ack_seconds";
pub const IN_FLIGHT: &str = "walcache_producer_in_flight_messages";
pub const CONFIRMED_LSN: &str = "walcache_producer_confirmed_lsn";
pub const SLOT_LAG_BYTES: &str = "walcache_producer_slot_lag_bytes";
pub const DEAD_LETTERS_TOTAL: &str = "walcache_producer_dead_letters_total";
pub const UNAVAILABLE_MARKERS_TOTAL: &str = "walcache_producer_unavailable_markers_total";
pub const TOAST_RESELECTS_TOTAL: &str = "walcache_producer_toast_reselects_total";
pub const SNAPSHOT_ROWS_TOTAL: &str = "walcache_producer_snapshot_rows_total";
pub const SNAPSHOT_PROGRESS: &str = "walcache_producer_snapshot_progress_ratio";
pub const SNAPSHOT_ROWS_ESTIMATED: &str = "walcache_producer_snapshot_rows_estimated";
pub const SNAPSHOT_ETA_SECONDS: &str = "walcache_producer_snapshot_eta_seconds";
pub const SNAPSHOT_CHUNKS_TOTAL: &str = "walcache_producer_snapshot_chunks_total";
pub const SNAPSHOT_ROWS_SUPERSEDED_TOTAL: &str = "walcache_producer_snapshot_rows_superseded_total";
pub const SNAPSHOT_JOBS: &str = "walcache_producer_snapshot_jobs";
pub const WATERMARKS_TOTAL: &str = "walcache_producer_watermarks_total";
pub const RESTARTS_TOTAL: &str = "walcache_producer_session_restarts_total";
pub const LEADER: &str = "walcache_producer_leader";
pub const SCHEMA_WARNINGS_TOTAL: &str = "walcache_producer_schema_warnings_total";

/// Handles to every producer metric, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events: IntCounterVec,
    pub bytes: IntCounterVec,
    pub transactions: IntCounter,
    pub delivery_seconds: Histogram,
    pub commit_to_ack_seconds: Histogram,
    pub in_flight: IntGauge,
    pub confirmed_lsn: Gauge,
    pub slot_lag_bytes: Gauge,
    pub dead_letters: IntCounterVec,
    pub unavailable_markers: IntCounterVec,
    pub toast_reselects: IntCounterVec,
    pub snapshot_rows: IntCounterVec,
    pub snapshot_progress: GaugeVec,
    pub snapshot_estimated: GaugeVec,
    pub snapshot_eta: GaugeVec,
    pub snapshot_chunks: IntCounterVec,
    pub snapshot_superseded: IntCounterVec,
    pub snapshot_jobs: IntGaugeVec,
    pub watermarks: IntCounterVec,
    pub restarts: IntCounterVec,
    pub leader: IntGauge,
    pub schema_warnings: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let latency_buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let m = Metrics {
            events: IntCounterVec::new(Opts::new(EVENTS_TOTAL, "Change events delivered to Kafka"), &["table", "op"])?,
            bytes: IntCounterVec::new(Opts::new(BYTES_TOTAL, "Key and value bytes delivered to Kafka"), &["table"])?,
            transactions: IntCounter::new(TRANSACTIONS_TOTAL, "Source transactions confirmed to the slot")?,
            delivery_seconds: Histogram::with_opts(
                HistogramOpts::new(DELIVERY_SECONDS, "Time from handing a message to Kafka to its acknowledgement")
                    .buckets(latency_buckets.clone()),
            )?,
            commit_to_ack_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    COMMIT_TO_ACK_SECONDS,
                    "Time from a transaction's commit in Postgres to the acknowledgement of all its events",
                )
                .buckets(latency_buckets),
            )?,
            in_flight: IntGauge::new(IN_FLIGHT, "Messages handed to Kafka and not yet acknowledged")?,
            confirmed_lsn: Gauge::new(CONFIRMED_LSN, "Last LSN confirmed to the replication slot")?,
            slot_lag_bytes: Gauge::new(
                SLOT_LAG_BYTES,
                "WAL bytes between the server's current position and the slot's confirmed position",
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(DEAD_LETTERS_TOTAL, "Rows set aside on the dead-letter topic"),
                &["table", "reason"],
            )?,
            unavailable_markers: IntCounterVec::new(
                Opts::new(
                    UNAVAILABLE_MARKERS_TOTAL,
                    "Row-unavailable markers acknowledged on table topics (one per set-aside change with a key)",
                ),
                &["table"],
            )?,
            toast_reselects: IntCounterVec::new(
                Opts::new(
                    TOAST_RESELECTS_TOTAL,
                    "Updates with unchanged TOAST values re-read by key; outcome filled, or superseded \
                     (the row changed again since: set aside as unavailable)",
                ),
                &["table", "outcome"],
            )?,
            snapshot_rows: IntCounterVec::new(
                Opts::new(SNAPSHOT_ROWS_TOTAL, "Rows copied by snapshots and backfills (emitted as op=snapshot)"),
                &["table"],
            )?,
            snapshot_progress: GaugeVec::new(
                Opts::new(
                    SNAPSHOT_PROGRESS,
                    "Snapshot progress per table, 0 to 1 (rows delivered / pg_class estimate)",
                ),
                &["table"],
            )?,
            snapshot_estimated: GaugeVec::new(
                Opts::new(SNAPSHOT_ROWS_ESTIMATED, "Rows the running snapshot of a table expects (pg_class estimate)"),
                &["table"],
            )?,
            snapshot_eta: GaugeVec::new(
                Opts::new(SNAPSHOT_ETA_SECONDS, "Seconds the running snapshot of a table needs at its current rate"),
                &["table"],
            )?,
            snapshot_chunks: IntCounterVec::new(
                Opts::new(
                    SNAPSHOT_CHUNKS_TOTAL,
                    "Snapshot chunks by outcome: emitted, or copied again (unseen_transaction, unkeyed_change, no_window)",
                ),
                &["table", "outcome"],
            )?,
            snapshot_superseded: IntCounterVec::new(
                Opts::new(
                    SNAPSHOT_ROWS_SUPERSEDED_TOTAL,
                    "Copied rows not emitted because the stream changed their key while the chunk was copied",
                ),
                &["table"],
            )?,
            snapshot_jobs: IntGaugeVec::new(
                Opts::new(SNAPSHOT_JOBS, "Snapshot jobs not finished, by kind (initial, backfill)"),
                &["kind"],
            )?,
            watermarks: IntCounterVec::new(Opts::new(WATERMARKS_TOTAL, "Watermark records published"), &["kind"])?,
            restarts: IntCounterVec::new(
                Opts::new(RESTARTS_TOTAL, "Sessions restarted after a transient error"),
                &["cause"],
            )?,
            leader: IntGauge::new(LEADER, "1 while this instance holds the slot's leader lock")?,
            schema_warnings: IntCounterVec::new(
                Opts::new(SCHEMA_WARNINGS_TOTAL, "Relation changes that do not match the contract"),
                &["table", "kind"],
            )?,
            registry,
        };
        m.registry.register(Box::new(m.events.clone()))?;
        m.registry.register(Box::new(m.bytes.clone()))?;
        m.registry.register(Box::new(m.transactions.clone()))?;
        m.registry.register(Box::new(m.delivery_seconds.clone()))?;
        m.registry.register(Box::new(m.commit_to_ack_seconds.clone()))?;
        m.registry.register(Box::new(m.in_flight.clone()))?;
        m.registry.register(Box::new(m.confirmed_lsn.clone()))?;
        m.registry.register(Box::new(m.slot_lag_bytes.clone()))?;
        m.registry.register(Box::new(m.dead_letters.clone()))?;
        m.registry.register(Box::new(m.unavailable_markers.clone()))?;
        m.registry.register(Box::new(m.toast_reselects.clone()))?;
        m.registry.register(Box::new(m.snapshot_rows.clone()))?;
        m.registry.register(Box::new(m.snapshot_progress.clone()))?;
        m.registry.register(Box::new(m.snapshot_estimated.clone()))?;
        m.registry.register(Box::new(m.snapshot_eta.clone()))?;
        m.registry.register(Box::new(m.snapshot_chunks.clone()))?;
        m.registry.register(Box::new(m.snapshot_superseded.clone()))?;
        m.registry.register(Box::new(m.snapshot_jobs.clone()))?;
        for kind in ["initial", "backfill"] {
            m.snapshot_jobs.with_label_values(&[kind]);
        }
        m.registry.register(Box::new(m.watermarks.clone()))?;
        m.registry.register(Box::new(m.restarts.clone()))?;
        m.registry.register(Box::new(m.leader.clone()))?;
        m.registry.register(Box::new(m.schema_warnings.clone()))?;
        m.restarts.with_label_values(&["transient"]);
        for kind in ["snapshotting", "streaming"] {
            m.watermarks.with_label_values(&[kind]);
        }
        Ok(m)
    }

    /// Starts `table`'s labelled series at zero, so dashboards show a zero instead of no data and
    /// alert rules see a table's first dead letter as an increase.
    pub fn init_table(&self, table: &str) {
        for op in ["snapshot", "insert", "update", "delete", "truncate"] {
            self.events.with_label_values(&[table, op]);
        }
        self.bytes.with_label_values(&[table]);
        for reason in walcache_schemas::Violation::CODES.iter().chain(&[crate::events::TOO_LARGE]) {
            self.dead_letters.with_label_values(&[table, reason]);
        }
        self.unavailable_markers.with_label_values(&[table]);
        for outcome in crate::reselect::OUTCOMES {
            self.toast_reselects.with_label_values(&[table, outcome]);
        }
        self.snapshot_rows.with_label_values(&[table]);
        self.snapshot_superseded.with_label_values(&[table]);
        for outcome in crate::snapshot::run::CHUNK_OUTCOMES {
            self.snapshot_chunks.with_label_values(&[table, outcome]);
        }
        for kind in crate::binding::BindingWarning::KINDS {
            self.schema_warnings.with_label_values(&[table, kind]);
        }
    }
}
