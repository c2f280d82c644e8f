//! Turns SIGTERM and SIGINT into a cancellation of the daemon's root token. A second signal
//! while draining exits at once (status 130), for an operator who cannot wait.

use tokio_util::sync::CancellationToken;

/// Spawns the signal watcher.
pub fn watch_signals(root: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler; use SIGINT to stop");
                return;
            }
        };
        for round in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "cannot wait for SIGINT");
                        return;
                    }
                }
            }
            if round == 0 {
                tracing::info!("shutdown requested: draining (signal again to exit at once)");
                root.cancel();
            } else {
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(130);
            }
        }
    })
}
