//! walcache-consumer: materialises change events into a position-aware cache and answers
//! queries with the moment each answer is true as of.
//!
//! ```text
//!  Kafka (table topics, watermarks) ──applier──► View { TableStore per table, coverage } ◄── api (axum)
//!                                        └─ bad messages ──► dead-letter topic
//! ```
//!
//! - [`store`]: rows in moka-managed pages, applied only when newer (invariant 3).
//! - [`view`]: the tables, truncate floors, coverage, readiness.
//! - [`watermark`]: producer watermarks -> "complete as of LSN X" (invariant 4).
//! - [`applier`]: restore then follow; ready once caught up with the topics as they stood.
//! - [`api`]: get, batch, export, status with as_of, min_lsn and max_staleness.

pub mod api;
pub mod applier;
pub mod config;
mod error;
pub mod metrics;
pub mod store;
pub mod view;
pub mod watermark;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::ConsumerConfig;
pub use error::ConsumerError;
pub use metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walcache_common::ops::{self, Health};

/// A running consumer: its view, its HTTP address and its tasks.
#[derive(Debug)]
pub struct Running {
    pub view: Arc<view::View>,
    pub addr: SocketAddr,
    tasks: TaskTracker,
    cancel: CancellationToken,
    applier: tokio::task::JoinHandle<Result<(), ConsumerError>>,
}

impl Running {
    /// Stops reading and serving; returns the applier's result.
    pub async fn stop(self) -> Result<(), ConsumerError> {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.applier.await.map_err(|e| ConsumerError::Config(format!("applier task failed: {e}")))?
    }

    /// Whether the applier has ended (a definite error, or `cancel`).
    pub fn applier_finished(&self) -> bool {
        self.applier.is_finished()
    }

    /// Waits until the applier ends (a definite error, or `cancel`).
    pub async fn wait(&mut self) -> Result<(), ConsumerError> {
        (&mut self.applier).await.map_err(|e| ConsumerError::Config(format!("applier task failed: {e}")))?
    }
}

/// Starts the applier and the HTTP server; `cancel` stops both.
pub async fn start(
    config: ConsumerConfig,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<Running, ConsumerError> {
    config.validate()?;
    let health = Arc::new(Health::default());
    let view = Arc::new(view::View::new(config.table_specs()?, &config.cache, metrics.clone(), Arc::clone(&health)));
    let http = &config.http;
    let api = api::Api {
        view: Arc::clone(&view),
        token: config.auth_token()?,
        export_token: config.export_token()?,
        max_batch: http.max_batch,
        max_wait: http.max_wait,
        waiting: Arc::new(tokio::sync::Semaphore::new(http.max_waiting)),
        limits: api::Limits {
            request_timeout: http.request_timeout(),
            max_concurrent_requests: http.max_concurrent_requests,
            max_body_bytes: http.max_body_bytes,
        },
    };
    // Metrics name tables and topics: open on loopback, behind the token elsewhere.
    let metrics_routes = ops::metrics_router(metrics.registry.clone());
    let metrics_routes = if http.listen.ip().is_loopback() || api.token.is_none() {
        metrics_routes
    } else {
        api::protect(metrics_routes, api.clone())
    };
    let router = api::router(api).merge(metrics_routes).merge(ops::probes_router(health)).fallback(api::not_found);
    let tasks = TaskTracker::new();
    let (addr, server) = ops::serve(config.http.listen, router, cancel.clone()).await?;
    tasks.spawn(async move {
        let _ = server.await;
    });
    tasks.spawn(applier::refresh_gauges(Arc::clone(&view), config.clone(), cancel.clone()));
    let applier = tokio::spawn(applier::run(Arc::clone(&view), config, cancel.clone()));
    Ok(Running { view, addr, tasks, cancel, applier })
}
