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
//! - [`read`]: the consistency checks and per-key answer every transport shares (the HTTP API
//!   here, `walcache-client`'s embedded view in-process, through [`follow`]).
//! - [`api`]: get, batch, export, status with as_of, min_lsn and max_staleness; the
//!   invalidation stream near-caches follow.

pub mod api;
pub mod applier;
pub mod config;
mod error;
pub mod metrics;
pub mod read;
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

/// A view following the topics, without the HTTP server: what `walcache-client`'s embedded
/// view runs in-process.
#[derive(Debug)]
pub struct Following {
    pub view: Arc<view::View>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    applier: tokio::task::JoinHandle<Result<(), ConsumerError>>,
}

impl Following {
    /// Stops reading; returns the applier's result.
    pub async fn stop(self) -> Result<(), ConsumerError> {
        stop(self.cancel, self.tasks, self.applier).await
    }

    /// Whether the applier has ended (a definite error, or `cancel`).
    pub fn applier_finished(&self) -> bool {
        self.applier.is_finished()
    }
}

/// A running consumer: its view, its HTTP address and its tasks.
#[derive(Debug)]
pub struct Running {
    pub view: Arc<view::View>,
    pub addr: SocketAddr,
    tasks: TaskTracker,
    cancel: CancellationToken,
    applier: tokio::task::JoinHandle<Result<(), ConsumerError>>,
}

async fn stop(
    cancel: CancellationToken,
    tasks: TaskTracker,
    applier: tokio::task::JoinHandle<Result<(), ConsumerError>>,
) -> Result<(), ConsumerError> {
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    applier.await.map_err(|e| ConsumerError::Config(format!("applier task failed: {e}")))?
}

impl Running {
    /// Stops reading and serving; returns the applier's result.
    pub async fn stop(self) -> Result<(), ConsumerError> {
        stop(self.cancel, self.tasks, self.applier).await
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

/// Starts following the topics into a view (restore, then follow), without serving it; `cancel`
/// stops it.
pub fn follow(config: ConsumerConfig, metrics: Metrics, cancel: CancellationToken) -> Result<Following, ConsumerError> {
    config.validate_view()?;
    let health = Arc::new(Health::default());
    let backlog = config.http.invalidation_backlog;
    let view = Arc::new(view::View::new(config.table_specs()?, &config.cache, backlog, metrics, health));
    let tasks = TaskTracker::new();
    tasks.spawn(applier::refresh_gauges(Arc::clone(&view), config.clone(), cancel.clone()));
    let applier = tokio::spawn(applier::run(Arc::clone(&view), config, cancel.clone()));
    Ok(Following { view, tasks, cancel, applier })
}

/// Starts the applier and the HTTP server; `cancel` stops both.
pub async fn start(
    config: ConsumerConfig,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<Running, ConsumerError> {
    config.validate()?;
    let http = &config.http;
    let listen = http.listen;
    let (auth_token, export_token) = (config.auth_token()?, config.export_token()?);
    let waiting = Arc::new(tokio::sync::Semaphore::new(http.max_waiting));
    let streams = Arc::new(tokio::sync::Semaphore::new(http.max_invalidation_streams));
    let (max_batch, max_wait) = (http.max_batch, http.max_wait);
    let limits = api::Limits {
        request_timeout: http.request_timeout(),
        max_concurrent_requests: http.max_concurrent_requests,
        max_body_bytes: http.max_body_bytes,
    };
    let metrics_registry = metrics.registry.clone();
    // A child token: a listener that cannot bind stops this view, not the caller's tree.
    let following = follow(config, metrics, cancel.child_token())?;
    let view = Arc::clone(&following.view);
    let api = api::Api {
        view: Arc::clone(&view),
        token: auth_token,
        export_token,
        max_batch,
        max_wait,
        waiting,
        streams,
        cancel: following.cancel.clone(),
        limits,
    };
    // Metrics name tables and topics: open on loopback, behind the token elsewhere.
    let metrics_routes = ops::metrics_router(metrics_registry);
    let metrics_routes = if listen.ip().is_loopback() || api.token.is_none() {
        metrics_routes
    } else {
        api::protect(metrics_routes, api.clone())
    };
    let router = api::router(api)
        .merge(metrics_routes)
        .merge(ops::probes_router(Arc::clone(&view.health)))
        .fallback(api::not_found);
    let Following { view, tasks, cancel, applier } = following;
    // (`cancel` is now the child token: stopping `Running` stops the server too.)
    let (addr, server) = match ops::serve(listen, router, cancel.clone()).await {
        Ok(served) => served,
        Err(e) => {
            let _ = stop(cancel, tasks, applier).await;
            return Err(e.into());
        }
    };
    tasks.spawn(async move {
        let _ = server.await;
    });
    Ok(Running { view, addr, tasks, cancel, applier })
}
