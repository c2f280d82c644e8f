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
    if let Some(Command::PrintConfig) = cli.command {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
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
