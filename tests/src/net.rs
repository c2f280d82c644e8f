//! Network fakes for the read path's failure modes.
//!
//! [`BlackHole`] stands where a cache used to be: it accepts TCP connections, counts them and
//! never answers, like a hung or partitioned server. A test reads the count to prove that a
//! client did (or did not) reach the network, instead of timing the call.
//!
//! [`LaggingReplicaFront`] stands where a load balancer over consumer replicas would: the
//! invalidation stream reaches the live consumer, reads reach a replica that can be frozen.
//!
//! ```text
//!  client ─► front ─┬─ GET /v1/invalidations ──────────► consumer (streamed through)
//!                   └─ reads ─► live:   consumer, answer remembered per request
//!                               frozen: the answer remembered before the freeze
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A listener that accepts, counts and holds connections without ever answering.
#[derive(Debug)]
pub struct BlackHole {
    accepted: Arc<AtomicUsize>,
    port: u16,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    /// Listens on a port of its own; [`BlackHole::port`] says which.
    pub async fn bind_any() -> BlackHole {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap_or_else(|e| panic!("bind a port: {e}"));
        Self::serve(listener)
    }

    /// Listens on `127.0.0.1:port`, a port a server of the test has just given up: binding is
    /// retried for a while in case the old socket is still being torn down.
    pub async fn bind(port: u16) -> BlackHole {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(listener) => return Self::serve(listener),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(port, error = %e, "port not free yet");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("bind port {port}: {e}"),
            }
        }
    }

    fn serve(listener: TcpListener) -> BlackHole {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (count, token) = (accepted.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // Held until stop: a dropped socket would answer the client with a reset.
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    conn = listener.accept() => match conn {
                        Ok((socket, _)) => {
                            count.fetch_add(1, Ordering::SeqCst);
                            held.push(socket);
                        }
                        Err(_) => return,
                    },
                }
            }
        });
        BlackHole { accepted, port, stop, task }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener and every held connection; the port is free when this returns.
    pub async fn close(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One remembered answer: status, headers and body as the consumer sent them.
type Remembered = (reqwest::StatusCode, reqwest::header::HeaderMap, bytes::Bytes);

/// A front for one consumer playing two replicas behind one URL. A frozen replica stopped
/// applying at the freeze: it answers each read with what the consumer answered for that
/// request (method, path, query) before it, a real answer as of the older view, while the
/// invalidation stream goes on announcing the live consumer's changes.
#[derive(Debug)]
pub struct LaggingReplicaFront {
    base: String,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    stale_answers: Arc<AtomicUsize>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct FrontState {
    upstream: String,
    http: reqwest::Client,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    stale_answers: Arc<AtomicUsize>,
    remembered: Arc<std::sync::Mutex<std::collections::HashMap<String, Remembered>>>,
}

impl LaggingReplicaFront {
    /// Starts a front for the consumer at `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> LaggingReplicaFront {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap_or_else(|e| panic!("bind a port: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("local address: {e}"));
        let state = FrontState {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            frozen: Arc::default(),
            stale_answers: Arc::default(),
            remembered: Arc::default(),
        };
        let front = LaggingReplicaFront {
            base: format!("http://{addr}"),
            frozen: state.frozen.clone(),
            stale_answers: state.stale_answers.clone(),
            stop: CancellationToken::new(),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let stop = front.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        front
    }

    /// The URL clients use.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The read replica stops at the answers it gave so far.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// The read replica caught up: reads reach the consumer again.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Reads answered by the frozen replica so far.
    pub fn stale_answers(&self) -> usize {
        self.stale_answers.load(Ordering::SeqCst)
    }
}

impl Drop for LaggingReplicaFront {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn forward(
    axum::extract::State(front): axum::extract::State<FrontState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let id = format!("{} {target}", parts.method);
    let stream = parts.uri.path() == "/v1/invalidations";
    if !stream && front.frozen.load(Ordering::SeqCst) {
        let remembered = front.remembered.lock().ok().and_then(|r| r.get(&id).cloned());
        return match remembered {
            Some((status, headers, body)) => {
                front.stale_answers.fetch_add(1, Ordering::SeqCst);
                (status, headers, body).into_response()
            }
            None => {
                (reqwest::StatusCode::SERVICE_UNAVAILABLE, "the frozen replica never answered this").into_response()
            }
        };
    }
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return (reqwest::StatusCode::BAD_REQUEST, "unreadable body").into_response();
    };
    let mut upstream = front.http.request(parts.method.clone(), format!("{}{target}", front.upstream)).body(body);
    for (name, value) in &parts.headers {
        if name != reqwest::header::HOST && name != reqwest::header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(e) => return (reqwest::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status();
    let mut headers = answer.headers().clone();
    for hop in [reqwest::header::TRANSFER_ENCODING, reqwest::header::CONNECTION, reqwest::header::CONTENT_LENGTH] {
        headers.remove(hop);
    }
    if stream {
        return (status, headers, axum::body::Body::from_stream(answer.bytes_stream())).into_response();
    }
    let Ok(body) = answer.bytes().await else {
        return (reqwest::StatusCode::BAD_GATEWAY, "the consumer's answer broke off").into_response();
    };
    if let Ok(mut remembered) = front.remembered.lock() {
        remembered.insert(id, (status, headers.clone(), body.clone()));
    }
    (status, headers, body).into_response()
}
