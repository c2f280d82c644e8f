//! The walcache-producer daemon.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use walcache_common::ops::{self, Health};
use walcache_common::{shutdown, telemetry};
use walcache_producer::{Metrics, Producer, ProducerConfig, check, snapshot};

#[derive(Parser)]
#[command(name = "walcache-producer", version, about = "Postgres logical replication slot -> Kafka change events")]
struct Cli {
    /// TOML configuration file; WALCACHE_* variables override it (WALCACHE_POSTGRES__URL ...).
    #[arg(long, short, env = "WALCACHE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the producer (the default).
    Run,
    /// Check the configuration and the Postgres and Kafka prerequisites, then exit
    /// (status 1 when anything fails).
    Check,
    /// Print the effective configuration (secrets masked).
    PrintConfig,
    /// Ask the running producer of this slot to copy a table again (or a key range of it)
    /// while it streams. The request goes through the WAL, so it waits there if no producer
    /// runs, and it is taken in exactly once.
    Backfill {
        /// `schema.table`, as configured in [[tables]].
        #[arg(long)]
        table: String,
        /// Lowest key to copy (inclusive); one value per key column, in the contract's order.
        #[arg(long = "from-key", num_args = 1..)]
        from_key: Option<Vec<String>>,
        /// Highest key to copy (inclusive); one value per key column.
        #[arg(long = "to-key", num_args = 1..)]
        to_key: Option<Vec<String>>,
    },
    /// Print the slot's snapshot and backfill jobs: rows copied, estimate, rate, time left.
    Status,
    /// Probe this producer's own ops endpoint (`ops.listen`) and exit 0 when it answers 200:
    /// a container health check for images without a shell.
    Probe {
        /// `/healthz` (alive), `/readyz` (streaming as the leader) or `/readyz?standby=ok`.
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
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let config: ProducerConfig = walcache_common::config::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintConfig => {
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Probe { path } => Ok(probe(config.ops.listen, &path).await),
        Command::Backfill { table, from_key, to_key } => {
            let lsn = snapshot::request_backfill(&config, &table, from_key, to_key).await?;
            println!(
                "backfill of {table} requested at WAL position {lsn}; the producer of slot {} takes it in when its \
                 stream reaches it (follow it with `walcache-producer status`)",
                config.postgres.slot
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Status => {
            print!("{}", snapshot::status_report(&config).await?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Check => {
            let report = check::run_check(&config).await;
            print!("{report}");
            Ok(if report.failed() {
                println!("check failed");
                std::process::ExitCode::FAILURE
            } else {
                println!("check passed");
                std::process::ExitCode::SUCCESS
            })
        }
        Command::Run => {
            let metrics = Metrics::new().context("registering metrics")?;
            let health = Arc::new(Health::default());
            let producer = Producer::new(config.clone(), metrics.clone(), Arc::clone(&health))?;
            let root = CancellationToken::new();
            shutdown::watch_signals(root.clone());
            let ops_cancel = CancellationToken::new();
            let (addr, ops_task) =
                ops::serve(config.ops.listen, ops::router(metrics.registry.clone(), health), ops_cancel.clone())
                    .await?;
            tracing::info!(%addr, "ops endpoint listening (/metrics, /healthz, /readyz)");
            let result = producer.run(root).await;
            ops_cancel.cancel();
            let _ = ops_task.await;
            result?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

async fn probe(listen: std::net::SocketAddr, path: &str) -> std::process::ExitCode {
    match ops::probe(listen, path, std::time::Duration::from_secs(5)).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
