//! The consumer's Prometheus metrics; names are constants, labels low-cardinality.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub const APPLIED_TOTAL: &str = "walcache_consumer_applied_total";
pub const IGNORED_TOTAL: &str = "walcache_consumer_ignored_total";
pub const APPLY_SECONDS: &str = "walcache_consumer_apply_seconds";
pub const COMMIT_TO_APPLY_SECONDS: &str = "walcache_consumer_commit_to_apply_seconds";
pub const LAG_MESSAGES: &str = "walcache_consumer_lag_messages";
pub const ENTRIES: &str = "walcache_consumer_entries";
pub const TOMBSTONES: &str = "walcache_consumer_tombstones";
pub const UNKNOWN_KEYS: &str = "walcache_consumer_unknown_keys";
pub const CACHE_BYTES: &str = "walcache_consumer_cache_bytes";
pub const EVICTED_ROWS: &str = "walcache_consumer_evicted_rows";
pub const LOOKUPS_TOTAL: &str = "walcache_consumer_lookups_total";
pub const DEAD_LETTERS_TOTAL: &str = "walcache_consumer_dead_letters_total";
pub const VIEW_LSN: &str = "walcache_consumer_view_lsn";
pub const VIEW_STALENESS: &str = "walcache_consumer_view_staleness_seconds";
pub const RESTORE_PROGRESS: &str = "walcache_consumer_restore_progress_ratio";
pub const READY: &str = "walcache_consumer_ready";
pub const REQUESTS_TOTAL: &str = "walcache_consumer_http_requests_total";
pub const REQUEST_SECONDS: &str = "walcache_consumer_http_request_seconds";
pub const INVALIDATION_STREAMS: &str = "walcache_consumer_invalidation_streams";
pub const INVALIDATION_LAGGED_TOTAL: &str = "walcache_consumer_invalidation_lagged_total";

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub applied: IntCounterVec,
    pub ignored: IntCounterVec,
    pub apply_seconds: Histogram,
    pub commit_to_apply_seconds: Histogram,
    pub lag: IntGaugeVec,
    pub entries: IntGaugeVec,
    pub tombstones: IntGaugeVec,
    pub unknown_keys: IntGaugeVec,
    pub cache_bytes: IntGaugeVec,
    pub evicted_rows: IntGaugeVec,
    pub lookups: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub view_lsn: GaugeVec,
    pub view_staleness: GaugeVec,
    pub restore_progress: Gauge,
    pub ready: IntGauge,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub invalidation_streams: IntGauge,
    pub invalidation_lagged: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let fast = vec![0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1];
        // Fine below 100 ms: freshness targets live there.
        let slow = vec![
            0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            applied: IntCounterVec::new(Opts::new(APPLIED_TOTAL, "Events that changed the view"), &["table", "op"])?,
            ignored: IntCounterVec::new(
                Opts::new(IGNORED_TOTAL, "Events that did not change the view (not newer, below a truncate floor)"),
                &["table", "reason"],
            )?,
            apply_seconds: Histogram::with_opts(
                HistogramOpts::new(APPLY_SECONDS, "Time to decode and apply one message").buckets(fast.clone()),
            )?,
            commit_to_apply_seconds: Histogram::with_opts(
                HistogramOpts::new(COMMIT_TO_APPLY_SECONDS, "Postgres commit to visible in this view (after restore)")
                    .buckets(slow),
            )?,
            lag: IntGaugeVec::new(
                Opts::new(LAG_MESSAGES, "Messages behind the partition's high watermark"),
                &["topic", "partition"],
            )?,
            entries: IntGaugeVec::new(Opts::new(ENTRIES, "Rows held"), &["table"])?,
            tombstones: IntGaugeVec::new(Opts::new(TOMBSTONES, "Deleted keys held with their position"), &["table"])?,
            unknown_keys: IntGaugeVec::new(
                Opts::new(UNKNOWN_KEYS, "Keys held as unknown: their last change could not be applied"),
                &["table"],
            )?,
            cache_bytes: IntGaugeVec::new(Opts::new(CACHE_BYTES, "Bytes held, as the cache weighs them"), &["table"])?,
            evicted_rows: IntGaugeVec::new(
                Opts::new(EVICTED_ROWS, "Rows evicted for capacity (reads of them say unknown)"),
                &["table"],
            )?,
            lookups: IntCounterVec::new(Opts::new(LOOKUPS_TOTAL, "Row lookups by outcome"), &["table", "state"])?,
            dead_letters: IntCounterVec::new(Opts::new(DEAD_LETTERS_TOTAL, "Messages set aside"), &["reason"])?,
            view_lsn: GaugeVec::new(
                Opts::new(VIEW_LSN, "LSN up to which the table is complete (from its producer's watermarks)"),
                &["table"],
            )?,
            view_staleness: GaugeVec::new(
                Opts::new(VIEW_STALENESS, "Now minus the commit time the table is complete up to"),
                &["table"],
            )?,
            restore_progress: Gauge::new(
                RESTORE_PROGRESS,
                "Restore progress towards the high watermarks seen at start",
            )?,
            ready: IntGauge::new(READY, "1 once the view caught up with the topics as they stood at start")?,
            requests: IntCounterVec::new(Opts::new(REQUESTS_TOTAL, "HTTP requests"), &["route", "status"])?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(REQUEST_SECONDS, "HTTP request latency").buckets(fast),
                &["route"],
            )?,
            invalidation_streams: IntGauge::new(INVALIDATION_STREAMS, "Invalidation streams (near-caches) open")?,
            invalidation_lagged: IntCounter::new(
                INVALIDATION_LAGGED_TOTAL,
                "Resets sent to a near-cache that fell behind the stream (it drops what it holds)",
            )?,
            registry: Registry::new(),
        };
        let r = &m.registry;
        r.register(Box::new(m.applied.clone()))?;
        r.register(Box::new(m.ignored.clone()))?;
        r.register(Box::new(m.apply_seconds.clone()))?;
        r.register(Box::new(m.commit_to_apply_seconds.clone()))?;
        r.register(Box::new(m.lag.clone()))?;
        r.register(Box::new(m.entries.clone()))?;
        r.register(Box::new(m.tombstones.clone()))?;
        r.register(Box::new(m.unknown_keys.clone()))?;
        r.register(Box::new(m.cache_bytes.clone()))?;
        r.register(Box::new(m.evicted_rows.clone()))?;
        r.register(Box::new(m.lookups.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        r.register(Box::new(m.view_lsn.clone()))?;
        r.register(Box::new(m.view_staleness.clone()))?;
        r.register(Box::new(m.restore_progress.clone()))?;
        r.register(Box::new(m.ready.clone()))?;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.request_seconds.clone()))?;
        r.register(Box::new(m.invalidation_streams.clone()))?;
        r.register(Box::new(m.invalidation_lagged.clone()))?;
        Ok(m)
    }

    /// Starts `table`'s labelled series at zero: dashboards show a zero instead of no data and
    /// alert rules see a first occurrence as an increase.
    pub fn init_table(&self, table: &str) {
        for op in ["snapshot", "insert", "update", "delete", "truncate", "unavailable"] {
            self.applied.with_label_values(&[table, op]);
        }
        for state in ["present", "deleted", "absent", "unknown"] {
            self.lookups.with_label_values(&[table, state]);
        }
    }
}
