//! The ops HTTP surface every daemon exposes: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive and its loop turns) and `/readyz` (it can do its job now; 503 with the
//! reason otherwise).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::CommonError;

/// Readiness as the daemon reports it.
#[derive(Debug)]
pub struct Health {
    state: Mutex<(bool, String)>,
}

impl Default for Health {
    fn default() -> Self {
        Health { state: Mutex::new((false, "starting".into())) }
    }
}

impl Health {
    pub fn set_ready(&self) {
        self.set(true, "ready");
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.set(false, reason);
    }

    fn set(&self, ready: bool, reason: impl Into<String>) {
        if let Ok(mut s) = self.state.lock() {
            *s = (ready, reason.into());
        }
    }

    pub fn get(&self) -> (bool, String) {
        self.state.lock().map(|s| s.clone()).unwrap_or((false, "health state poisoned".into()))
    }

    pub fn is_ready(&self) -> bool {
        self.get().0
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    health: Arc<Health>,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(registry: Registry, health: Arc<Health>) -> Router {
    metrics_router(registry).merge(probes_router(health))
}

/// `/metrics` alone (a daemon may protect it apart from the probes).
pub fn metrics_router(registry: Registry) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(OpsState { registry, health: Arc::new(Health::default()) })
}

/// `/healthz` and `/readyz`: what orchestrators probe, never behind a token.
pub fn probes_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry: Registry::new(), health })
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let (ready, reason) = state.health.get();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "ready": ready, "reason": reason }))).into_response()
}

/// Binds `listen` and serves `router` until `cancel` fires. Returns the bound address (useful
/// with port 0) and the server task.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), CommonError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| CommonError::Io {
        context: format!("binding the HTTP listener on {listen} (is another process using the port?)"),
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CommonError::Io { context: "reading the bound address".into(), source })?;
    let task = tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((addr, task))
}
