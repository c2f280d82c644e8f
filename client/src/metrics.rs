//! The client's own Prometheus metrics: what a service sees of the cache, registered in the
//! service's registry when it asks for them (`ClientOptions::metrics`).
//!
//! ```text
//!  call() attempt ──► requests_total{outcome}, request_seconds, breaker_state
//!  get()          ──► reads_total{state}
//!  Fallback::get  ──► answers_total{source, reason}
//!  near-cache invalidation stream ──► near_cache_stream_connected, near_cache_drops_total{reason}
//! ```

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

pub const REQUESTS_TOTAL: &str = "walcache_client_requests_total";
pub const REQUEST_SECONDS: &str = "walcache_client_request_seconds";
pub const READS_TOTAL: &str = "walcache_client_reads_total";
pub const ANSWERS_TOTAL: &str = "walcache_client_answers_total";
pub const BREAKER_STATE: &str = "walcache_client_breaker_state";
pub const NEAR_CACHE_STREAM_CONNECTED: &str = "walcache_client_near_cache_stream_connected";
pub const NEAR_CACHE_DROPS_TOTAL: &str = "walcache_client_near_cache_drops_total";

/// The client's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) request_seconds: Histogram,
    pub(crate) reads: IntCounterVec,
    pub(crate) answers: IntCounterVec,
    pub(crate) breaker_state: IntGauge,
    pub(crate) near_stream_connected: IntGauge,
    pub(crate) near_drops: IntCounterVec,
}

impl ClientMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = ClientMetrics {
            requests: IntCounterVec::new(
                Opts::new(REQUESTS_TOTAL, "HTTP attempts to the cache by outcome (ok, timeout, transport, ...)"),
                &["outcome"],
            )?,
            request_seconds: Histogram::with_opts(
                HistogramOpts::new(REQUEST_SECONDS, "Latency of one HTTP attempt to the cache")
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )?,
            reads: IntCounterVec::new(Opts::new(READS_TOTAL, "Cache answers by state"), &["state"])?,
            answers: IntCounterVec::new(
                Opts::new(ANSWERS_TOTAL, "Fallback reads by the path that answered and why the fallback did"),
                &["source", "reason"],
            )?,
            breaker_state: IntGauge::new(BREAKER_STATE, "Circuit breaker: 0 closed, 1 half-open, 2 open")?,
            near_stream_connected: IntGauge::new(
                NEAR_CACHE_STREAM_CONNECTED,
                "1 while the near-cache follows the consumer's invalidations (entries held past the TTL)",
            )?,
            near_drops: IntCounterVec::new(
                Opts::new(
                    NEAR_CACHE_DROPS_TOTAL,
                    "Times the near-cache stopped vouching for what it held: hello (the stream (re)connected) \
                     and reset (a truncate, or this client fell behind) drop it all; lost (the stream \
                     ended) leaves entries to their TTL",
                ),
                &["reason"],
            )?,
        };
        for reason in ["hello", "reset", "lost"] {
            m.near_drops.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.reads.clone()))?;
        registry.register(Box::new(m.answers.clone()))?;
        registry.register(Box::new(m.breaker_state.clone()))?;
        registry.register(Box::new(m.near_stream_connected.clone()))?;
        registry.register(Box::new(m.near_drops.clone()))?;
        Ok(m)
    }
}
