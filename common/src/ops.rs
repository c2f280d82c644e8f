//! The ops HTTP surface every daemon exposes: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive and its loop turns) and `/readyz` (it can do its job now; 503 with the
//! reason otherwise), and [`probe`], the client side of the probes for container health checks
//! in images without a shell or curl.
//!
//! `/readyz?standby=ok` also answers 200 for a daemon that is healthy but waiting for its turn
//! (a producer standing by for the slot's leader lock, or leading but still copying the initial
//! snapshot). Orchestrators need that form: a rolling update waits for each new instance to be
//! ready, and a standby that never is would stall every update of a leader/standby pair.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::CommonError;

/// Readiness as the daemon reports it.
#[derive(Debug)]
pub struct Health {
    state: Mutex<Readiness>,
}

#[derive(Debug, Clone)]
struct Readiness {
    ready: bool,
    /// Not doing its job, but healthy and waiting for its turn (see the module docs).
    standing_by: bool,
    reason: String,
}

impl Default for Health {
    fn default() -> Self {
        Health { state: Mutex::new(Readiness { ready: false, standing_by: false, reason: "starting".into() }) }
    }
}

impl Health {
    pub fn set_ready(&self) {
        self.set(true, false, "ready");
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.set(false, false, reason);
    }

    /// Not ready, but healthy and waiting for its turn: `/readyz` answers 503 with `reason`,
    /// `/readyz?standby=ok` answers 200.
    pub fn set_standing_by(&self, reason: impl Into<String>) {
        self.set(false, true, reason);
    }

    fn set(&self, ready: bool, standing_by: bool, reason: impl Into<String>) {
        if let Ok(mut s) = self.state.lock() {
            *s = Readiness { ready, standing_by, reason: reason.into() };
        }
    }

    pub fn get(&self) -> (bool, String) {
        let r = self.readiness();
        (r.ready, r.reason)
    }

    fn readiness(&self) -> Readiness {
        self.state.lock().map(|s| s.clone()).unwrap_or(Readiness {
            ready: false,
            standing_by: false,
            reason: "health state poisoned".into(),
        })
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

#[derive(Debug, serde::Deserialize)]
struct ReadyzQuery {
    /// `ok`: a daemon standing by counts as ready.
    standby: Option<String>,
}

async fn readyz(State(state): State<OpsState>, Query(query): Query<ReadyzQuery>) -> Response {
    let r = state.health.readiness();
    let standby_ok = query.standby.as_deref() == Some("ok");
    let status =
        if r.ready || (standby_ok && r.standing_by) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({ "ready": r.ready, "standing_by": r.standing_by, "reason": r.reason });
    (status, axum::Json(body)).into_response()
}

/// Probes a daemon's own ops endpoint, as a container health check does: `GET path` on
/// `listen` (an unspecified address such as `0.0.0.0` is probed on loopback) must answer 200
/// within `timeout`. The error says what answered instead.
pub async fn probe(listen: SocketAddr, path: &str, timeout: std::time::Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut target = listen;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let exchange = async {
        let mut stream =
            tokio::net::TcpStream::connect(target).await.map_err(|e| format!("connecting to {target}: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending to {target}: {e}"))?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(|e| format!("reading from {target}: {e}"))?;
        let text = String::from_utf8_lossy(&response);
        let status_line = text.lines().next().unwrap_or_default().to_string();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
        match status_line.split_whitespace().nth(1) {
            Some("200") => Ok(()),
            _ => Err(format!("{path} on {target} answered {status_line:?}: {body}")),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!("{path} on {target} did not answer within {timeout:?}")),
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn standby_is_ready_only_when_the_probe_accepts_it() {
        let health = Arc::new(Health::default());
        let cancel = CancellationToken::new();
        let (addr, _task) =
            serve(([127, 0, 0, 1], 0).into(), probes_router(Arc::clone(&health)), cancel.clone()).await.expect("serve");
        let unspecified: SocketAddr = ([0, 0, 0, 0], addr.port()).into();
        let probe = |path: &'static str| probe(unspecified, path, Duration::from_secs(10));

        probe("/healthz").await.expect("alive from the start");
        let starting = probe("/readyz?standby=ok").await.expect_err("starting is not standing by");
        assert!(starting.contains("503") && starting.contains("starting"), "{starting}");

        health.set_standing_by("standby: another producer leads this slot");
        let plain = probe("/readyz").await.expect_err("a standby does not do the job");
        assert!(plain.contains("standby: another producer"), "{plain}");
        probe("/readyz?standby=ok").await.expect("a healthy standby passes the orchestrator's probe");

        health.set_not_ready("restarting after: connection refused");
        probe("/readyz?standby=ok").await.expect_err("a failing daemon is not standing by");

        health.set_ready();
        probe("/readyz").await.expect("ready");
        probe("/readyz?standby=ok").await.expect("ready");
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_probe_of_nothing_fails_in_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts (the kernel's backlog) but never answers.
        let error = probe(addr, "/healthz", Duration::from_millis(200)).await.expect_err("no answer");
        assert!(error.contains("did not answer"), "{error}");
        drop(listener);
    }
}
