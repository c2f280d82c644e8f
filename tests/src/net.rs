//! Network fakes for the read path's failure modes.
//!
//! [`BlackHole`] stands where a cache used to be: it accepts TCP connections, counts them and
//! never answers, like a hung or partitioned server. A test reads the count to prove that a
//! client did (or did not) reach the network, instead of timing the call.

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
