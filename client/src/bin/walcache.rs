//! `walcache`: the operator's CLI for a running consumer.
//!
//! ```text
//!  walcache get courier_performance 42      one row with its as-of       exit 0 present, 3 absent/deleted, 4 unknown
//!  walcache status                          readiness, watermark, lag    exit 0 ready, 3 not ready
//!  walcache verify --postgres URL           view vs a Postgres snapshot  exit 0 healthy, 1 drift, 3 inconclusive
//! ```
//! Errors exit 2 (usage) or 5 (cannot reach the cache or Postgres), with what to check.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value as Json;
use walcache_client::verify::{Verdict, VerifyOptions, verify};
use walcache_client::{Client, ClientError, ClientOptions, Lsn, ReadOptions};

#[derive(Parser)]
#[command(name = "walcache", version, about = "Inspect and verify a walcache consumer")]
struct Cli {
    /// The consumer's query API.
    #[arg(long, env = "WALCACHE_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// Bearer token, if the consumer requires one.
    #[arg(long, env = "WALCACHE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read one row with the moment it is true as of.
    Get {
        table: String,
        key: String,
        /// Wait until the view covers this LSN (read your writes).
        #[arg(long)]
        min_lsn: Option<Lsn>,
        /// Refuse answers older than this many milliseconds.
        #[arg(long)]
        max_staleness_ms: Option<u64>,
    },
    /// Readiness, watermark, staleness, entries and lag.
    Status,
    /// Compare the view with a consistent snapshot of the Postgres table.
    Verify {
        /// Postgres connection (postgres://user:password@host/db).
        #[arg(long, env = "WALCACHE_VERIFY_POSTGRES_URL", hide_env_values = true)]
        postgres: String,
        /// Source table, schema-qualified.
        #[arg(long, default_value = "public.courier_performance")]
        source_table: String,
        /// Table (contract) name in the query API.
        #[arg(long, default_value = "courier_performance")]
        table: String,
        /// How long to wait for the view to reach the snapshot, in seconds.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
        /// Keys to list per kind of difference.
        #[arg(long, default_value_t = 10)]
        sample: usize,
    },
}

const EXIT_UNREACHABLE: u8 = 5;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    runtime.block_on(run(cli))
}

fn explain(url: &str, e: &ClientError) -> String {
    match e {
        ClientError::Transport(_) | ClientError::Timeout(_) | ClientError::CircuitOpen(_) => {
            format!("{e}\n  is walcache-consumer running at {url}? (--url or WALCACHE_URL)")
        }
        ClientError::Rejected { status: 401, .. } => {
            format!("{e}\n  pass the consumer's token with --token or WALCACHE_TOKEN")
        }
        _ => e.to_string(),
    }
}

async fn run(cli: Cli) -> ExitCode {
    let mut options = ClientOptions::default().timeout(Duration::from_secs(10)).retries(1);
    if let Some(token) = &cli.token {
        options = options.token(token.clone());
    }
    let client = match Client::new(&cli.url, options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Get { table, key, min_lsn, max_staleness_ms } => {
            let mut read = ReadOptions::default();
            if let Some(lsn) = min_lsn {
                read = read.min_lsn(lsn).wait(Duration::from_secs(5));
            }
            if let Some(ms) = max_staleness_ms {
                read = read.max_staleness(Duration::from_millis(ms));
            }
            match client.get_json(&table, &key, &read).await {
                Ok(answer) => {
                    let state = answer["state"].as_str().unwrap_or("unknown").to_string();
                    if cli.json {
                        println!("{answer}");
                    } else {
                        print_answer(&answer);
                    }
                    match state.as_str() {
                        "present" => ExitCode::SUCCESS,
                        "unknown" => ExitCode::from(4),
                        _ => ExitCode::from(3),
                    }
                }
                Err(e) => {
                    eprintln!("error: {}", explain(&cli.url, &e));
                    ExitCode::from(match e {
                        ClientError::Rejected { .. } => 2,
                        ClientError::NotReady(_) | ClientError::TooStale(_) | ClientError::MinLsnNotReached(_) => 3,
                        _ => EXIT_UNREACHABLE,
                    })
                }
            }
        }
        Command::Status => match client.status().await {
            Ok(status) => {
                if cli.json {
                    println!("{status}");
                } else {
                    print_status(&status);
                }
                if status["ready"] == true { ExitCode::SUCCESS } else { ExitCode::from(3) }
            }
            Err(e) => {
                eprintln!("error: {}", explain(&cli.url, &e));
                ExitCode::from(EXIT_UNREACHABLE)
            }
        },
        Command::Verify { postgres, source_table, table, wait_secs, sample } => {
            run_verify(&cli.url, &client, &postgres, source_table, table, wait_secs, sample, cli.json).await
        }
    }
}

fn print_answer(a: &Json) {
    let as_of = &a["as_of"];
    println!("{} {} is {}", a["table"].as_str().unwrap_or(""), a["key"], a["state"].as_str().unwrap_or("?"));
    if let Some(obj) = a["value"].as_object() {
        for (k, v) in obj {
            println!("  {k:<16} {v}");
        }
    }
    println!(
        "  as of row LSN {} ({}), view complete to {} ({}), {} ms stale",
        as_of["row_lsn"].as_str().unwrap_or("-"),
        as_of["row_commit_time"].as_str().unwrap_or("-"),
        as_of["view_lsn"].as_str().unwrap_or("-"),
        as_of["view_time"].as_str().unwrap_or("-"),
        a["staleness_ms"].as_i64().map_or("?".into(), |s| s.to_string()),
    );
}

fn print_status(s: &Json) {
    let v = &s["view"];
    println!(
        "ready: {}   view complete to {} ({}), {} ms stale   dead letters: {}",
        s["ready"],
        v["view_lsn"].as_str().unwrap_or("-"),
        v["view_time"].as_str().unwrap_or("-"),
        v["staleness_ms"].as_i64().map_or("?".into(), |x| x.to_string()),
        s["dead_letters"]
    );
    if s["ready"] != true {
        println!("restoring: {} of {} messages", s["restore"]["done"], s["restore"]["total"]);
    }
    for t in s["tables"].as_array().into_iter().flatten() {
        println!(
            "table {:<24} {} rows, {} tombstones, {} bytes, {} evicted  (contract v{})",
            t["name"].as_str().unwrap_or(""),
            t["entries"],
            t["tombstones"],
            t["bytes"],
            t["evicted_rows"],
            t["contract_version"]
        );
    }
    for p in s["partitions"].as_array().into_iter().flatten() {
        println!(
            "  {}/{}: next {} of {} (lag {})",
            p["topic"].as_str().unwrap_or(""),
            p["partition"],
            p["next_offset"],
            p["high_watermark"],
            p["lag"]
        );
    }
}

/// Connects with libpq's TLS parameters (`sslmode`, `sslrootcert`) honoured, as the producer
/// does.
async fn connect_postgres(
    url: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, walcache_pgtls::RustlsStream<tokio_postgres::Socket>>,
    ),
    String,
> {
    use walcache_pgtls::{PgTls, SslMode, split_tls_params};
    let (url, mode, root_cert) = split_tls_params(url);
    let mode = mode.as_deref().map(SslMode::parse).transpose().map_err(|e| e.to_string())?.unwrap_or_default();
    let tls = PgTls::new(mode, root_cert.map(std::path::PathBuf::from)).map_err(|e| e.to_string())?;
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| format!("the Postgres URL does not parse: {e}"))?;
    config.ssl_mode(tls.tokio_ssl_mode());
    config.connect(tls.connector()).await.map_err(|e| match walcache_pgtls::tls_failure(&e) {
        Some(chain) => {
            format!("TLS to Postgres with sslmode={} failed: {chain}\n  {}", mode.as_str(), walcache_pgtls::TLS_FIX)
        }
        None => format!("cannot connect to Postgres: {e}"),
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_verify(
    url: &str,
    client: &Client,
    postgres: &str,
    source_table: String,
    table: String,
    wait_secs: u64,
    sample: usize,
    json: bool,
) -> ExitCode {
    let (mut pg, connection) = match connect_postgres(postgres).await {
        Ok(c) => c,
        Err(message) => {
            eprintln!("error: {message}\n  check --postgres / WALCACHE_VERIFY_POSTGRES_URL");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let connection = tokio::spawn(connection);
    let bar = indicatif::ProgressBar::new(0);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} rows ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let options = VerifyOptions { source_table, table, wait: Duration::from_secs(wait_secs), sample };
    let result = verify(&mut pg, client, &options, |done, total| {
        bar.set_length(total.max(done));
        bar.set_position(done);
    })
    .await;
    bar.finish_and_clear();
    connection.abort();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", explain(url, &e));
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!(
            "snapshot at LSN {}, view complete to {}",
            report.snapshot_lsn,
            report.view_lsn.map_or("-".into(), |l| l.to_string())
        );
        println!("source rows: {}   matching: {}", report.source_rows, report.matching);
        for (name, f) in [
            ("missing from the view", &report.missing),
            ("extra in the view", &report.extra),
            ("different", &report.different),
        ] {
            println!("{name}: {}{}", f.count, sample_text(&f.sample));
        }
        println!("changed after the snapshot (not drift): {}", report.changed_after_snapshot);
        println!("unknown (evicted from the view): {}", report.unknown);
        println!(
            "rows that break the contract (on the dead-letter topic): {}{}",
            report.contract_violations.count,
            sample_text(&report.contract_violations.sample)
        );
        println!(
            "verdict: {}",
            match report.verdict {
                Verdict::Healthy => "healthy",
                Verdict::Drift => "DRIFT",
                Verdict::Inconclusive =>
                    "inconclusive: the view did not reach the snapshot in time (is the pipeline running?)",
            }
        );
    }
    match report.verdict {
        Verdict::Healthy => ExitCode::SUCCESS,
        Verdict::Drift => ExitCode::FAILURE,
        Verdict::Inconclusive => ExitCode::from(3),
    }
}

fn sample_text(sample: &[Json]) -> String {
    if sample.is_empty() {
        String::new()
    } else {
        format!("  e.g. {}", sample.iter().map(Json::to_string).collect::<Vec<_>>().join(", "))
    }
}
