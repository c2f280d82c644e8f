//! The walcache-consumer daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use walcache_common::{shutdown, telemetry};
use walcache_consumer::{ConsumerConfig, Metrics};

#[derive(Parser)]
#[command(name = "walcache-consumer", version, about = "Materialised view of walcache change events, with a query API")]
struct Cli {
    /// TOML configuration file; WALCACHE_* variables override it (WALCACHE_HTTP__AUTH_TOKEN ...).
    #[arg(long, short, env = "WALCACHE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the consumer (the default).
    Run,
    /// Print the effective configuration (secrets masked).
    PrintConfig,
    /// Probe this consumer's own endpoint (`http.listen`) and exit 0 when it answers 200: a
    /// container health check for images without a shell.
    Probe {
        /// `/healthz` (alive) or `/readyz` (restored and not blocked).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
}

fn main() -> std::process::ExitCode {
    telemetry::init("info,rdkafka=warn");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config: ConsumerConfig = walcache_common::config::load(cli.config.as_deref())?;
    match cli.command {
        Some(Command::PrintConfig) => {
            println!("{}", serde_json::to_string_pretty(&config)?);
            return Ok(());
        }
        Some(Command::Probe { path }) => {
            return walcache_common::ops::probe(config.http.listen, &path, std::time::Duration::from_secs(5))
                .await
                .map_err(|e| anyhow::anyhow!("probe failed: {e}"));
        }
        Some(Command::Run) | None => {}
    }
    let metrics = Metrics::new().context("registering metrics")?;
    let cancel = CancellationToken::new();
    shutdown::watch_signals(cancel.clone());
    let mut running = walcache_consumer::start(config, metrics, cancel.clone()).await?;
    tracing::info!(addr = %running.addr, "query API listening (/v1/..., /metrics, /healthz, /readyz)");
    tokio::select! {
        _ = cancel.cancelled() => {}
        result = running.wait() => {
            result?;
        }
    }
    running.stop().await.ok();
    tracing::info!("stopped");
    Ok(())
}
