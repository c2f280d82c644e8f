//! Payments: adjust each courier's delivery payment by their performance, and decide on data
//! whether the cache can replace the synchronous call to Incentives.
//!
//! ```text
//!  delivery ─► performance(courier) ─► Experiment "courier-performance"
//!                 control:   SELECT ... FROM courier_performance   (the old synchronous read; its answer is used)
//!                 candidate: walcache-client get                   (in the background: adds no latency)
//!                 mismatch?  by position: cache row newer than the control's read -> ahead;
//!                            cache older -> recheck at the control's LSN: agrees -> stale;
//!                            both true at the same LSN -> divergent
//!            ─► adjustment = base x tier + on-time bonus - cancellation penalty
//! ```
//!
//! `--mode experiment` (default) runs the experiment and prints its summary; `--mode cache`
//! reads cache-first with the old call as fallback and reports which path answered.
//!
//! `--paths` picks the cache's read paths the experiment measures, each a candidate beside the
//! control: `avro` (remote, binary), `json` (remote), `near` (remote with a near-cache that
//! follows the consumer's invalidations),
//! `embedded` (the view in this process; needs `--embedded`, the consumer's TOML config). In
//! `--mode cache`, `--embedded` makes the cache reads embedded.
//!
//! cargo run -p walcache-client --features cli,embedded --example payments -- \
//!     --postgres postgres://... --cache http://127.0.0.1:8080 [--embedded consumer.toml --paths avro,embedded]

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rust_decimal::Decimal;
use serde::Serialize;
use tokio::sync::Semaphore;
use walcache_client::experiment::{Experiment, ObservedAt, PrometheusPublisher, Publisher, SummaryPublisher};
use walcache_client::{
    Client, ClientOptions, CourierPerformance, EmbeddedView, Fallback, Lsn, NearCacheOptions, ReadOptions, RowState,
    Source, Tier, Wire,
};
use walcache_schemas::Registry;

#[derive(Parser)]
struct Args {
    /// Incentives' database (the old synchronous path).
    #[arg(long, env = "PAYMENTS_POSTGRES_URL")]
    postgres: String,
    /// The walcache consumer.
    #[arg(long, env = "PAYMENTS_CACHE_URL", default_value = "http://127.0.0.1:8080")]
    cache: String,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Couriers have ids 1..=couriers.
    #[arg(long, default_value_t = 5000)]
    couriers: i64,
    /// Deliveries paid per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value = "experiment")]
    mode: String,
    /// The cache's read paths to measure as candidates: avro, json, near, embedded.
    #[arg(long, value_delimiter = ',', default_value = "avro")]
    paths: Vec<String>,
    /// Run the consumer's view in this process from this consumer config (TOML: kafka, tables,
    /// watermarks, cache).
    #[arg(long)]
    embedded: Option<std::path::PathBuf>,
    /// Where the experiment summary is written.
    #[arg(long, default_value = "payments-experiment.json")]
    summary_file: std::path::PathBuf,
}

/// A performance read and when it was true.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Performance {
    courier: Option<CourierPerformance>,
    #[serde(skip)]
    at: ObservedAt,
}

/// The adjustment for one delivery: base x tier, on-time bonus, cancellation penalty.
fn adjustment(p: Option<&CourierPerformance>) -> Decimal {
    let base = Decimal::new(450, 2);
    let Some(p) = p else { return base };
    if !p.active {
        return Decimal::ZERO;
    }
    let tier = match p.tier {
        Tier::Bronze => Decimal::new(100, 2),
        Tier::Silver => Decimal::new(105, 2),
        Tier::Gold => Decimal::new(110, 2),
        Tier::Platinum => Decimal::new(120, 2),
    };
    let bonus =
        if p.on_time_rate >= 0.95 && p.rating >= Decimal::new(450, 2) { Decimal::new(50, 2) } else { Decimal::ZERO };
    let penalty = Decimal::new(10, 2) * Decimal::from(p.cancellations.clamp(0, 10));
    (base * tier + bonus - penalty).round_dp(2)
}

/// The old path: read the row from Incentives' database, with the WAL position at the read.
async fn read_incentives(pg: &tokio_postgres::Client, id: i64) -> Result<Performance, String> {
    let registry = Registry::builtin().map_err(|e| e.to_string())?;
    let plan = &registry.contract("courier_performance").map_err(|e| e.to_string())?.latest().row;
    let columns = plan.fields.iter().map(|f| format!("c.{}::text", f.name)).collect::<Vec<_>>().join(", ");
    let row = pg
        .query_one(
            &format!(
                "SELECT pg_current_wal_insert_lsn()::text, (c.courier_id IS NOT NULL), {columns} \
                 FROM (SELECT 1) one LEFT JOIN courier_performance c ON c.courier_id = $1"
            ),
            &[&id],
        )
        .await
        .map_err(|e| e.to_string())?;
    let at = ObservedAt { lsn: Lsn::from_str(row.get::<_, &str>(0)).ok(), since: None, time: Some(chrono::Utc::now()) };
    if !row.get::<_, bool>(1) {
        return Ok(Performance { courier: None, at });
    }
    let mut buf = Vec::new();
    for (i, field) in plan.fields.iter().enumerate() {
        let written = match row.get::<_, Option<&str>>(i + 2) {
            Some(text) => field.write_text(&mut buf, text.as_bytes()),
            None => field.write_null(&mut buf),
        };
        written.map_err(|v| format!("the source row breaks the contract: {v}"))?;
    }
    let json = plan.row_to_json(&buf).map_err(|e| e.to_string())?;
    let courier = serde_json::from_value(json.into()).map_err(|e| e.to_string())?;
    Ok(Performance { courier: Some(courier), at })
}

/// The new path: the cache, with its as-of.
async fn read_cache(cache: &Client, id: i64, options: &ReadOptions) -> Result<Performance, String> {
    let read = cache.get::<CourierPerformance>(&id, options).await.map_err(|e| e.to_string())?;
    if read.state == RowState::Unknown {
        return Err("the cache cannot vouch for this key".into());
    }
    // True from the row's last change (row_lsn) up to the view's position (view_lsn).
    let at = ObservedAt { lsn: read.as_of.view_lsn, since: read.as_of.row_lsn, time: read.as_of.view_time };
    Ok(Performance { courier: read.value, at })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (pg, connection) = tokio_postgres::connect(&args.postgres, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let pg = Arc::new(pg);
    let options = ClientOptions::default().timeout(Duration::from_millis(250));
    // Held while the consumer's invalidations flow; 200 ms when they do not.
    let near = NearCacheOptions::new(10_000, Duration::from_millis(200)).follow_invalidations(Duration::from_secs(600));
    let view = match &args.embedded {
        Some(path) => {
            let mut config: walcache_consumer::ConsumerConfig = walcache_common::config::load(Some(path))?;
            // The consumers dead-letter bad messages already; every payments process would
            // publish them again.
            config.dead_letter.publish = false;
            let view = EmbeddedView::start(config)?;
            view.wait_ready(Duration::from_secs(120)).await?;
            Some(view)
        }
        None => None,
    };
    let mut candidates: Vec<(String, Client)> = Vec::new();
    for path in &args.paths {
        let client = match (path.as_str(), &view) {
            ("avro", _) => Client::new(&args.cache, options.clone().wire(Wire::Avro))?,
            ("json", _) => Client::new(&args.cache, options.clone().wire(Wire::Json))?,
            ("near", _) => Client::new(&args.cache, options.clone().near_cache(near))?,
            ("embedded", Some(view)) => Client::embedded(Arc::clone(view), options.clone())?,
            ("embedded", None) => anyhow::bail!("--paths embedded needs --embedded <consumer.toml>"),
            (other, _) => anyhow::bail!("unknown path {other:?}: avro, json, near or embedded"),
        };
        candidates.push((format!("cache-{path}"), client));
    }
    let cache = match &view {
        Some(view) => Client::embedded(Arc::clone(view), options.clone())?,
        None if args.mode == "cache" => Client::new(&args.cache, options.clone().near_cache(near))?,
        None => Client::new(&args.cache, options.clone())?,
    };
    let summary = Arc::new(SummaryPublisher::new("courier-performance", false, 10));
    let registry = prometheus::Registry::new();
    let prometheus: Arc<dyn Publisher> = Arc::new(PrometheusPublisher::new(&registry)?);
    let exporter = summary.export_every(args.summary_file.clone(), Duration::from_secs(5));
    let limit = Arc::new(Semaphore::new(64));
    let fallback = {
        let pg = Arc::clone(&pg);
        Fallback::<CourierPerformance, _>::new(cache.clone(), move |id: i64| {
            let pg = Arc::clone(&pg);
            async move { read_incentives(&pg, id).await.map(|p| p.courier) }
        })
    };

    let started = Instant::now();
    let mut paid = Decimal::ZERO;
    let mut deliveries = 0u64;
    let mut by_source = [0u64; 2];
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.rate.max(1)));
    while started.elapsed() < Duration::from_secs(args.seconds) {
        tick.tick().await;
        let id = 1 + (rand::random::<u64>() % args.couriers as u64) as i64;
        let performance = if args.mode == "cache" {
            match fallback.get(&id, &ReadOptions::default().max_staleness(Duration::from_secs(5))).await {
                Ok(answer) => {
                    by_source[usize::from(answer.source == Source::Fallback)] += 1;
                    answer.value
                }
                Err(e) => {
                    eprintln!("courier {id}: both paths failed: {e}");
                    continue;
                }
            }
        } else {
            let (pg, recheck_c) = (Arc::clone(&pg), cache.clone());
            let mut experiment =
                Experiment::new("courier-performance").control(move || async move { read_incentives(&pg, id).await });
            for (name, client) in &candidates {
                let client = client.clone();
                experiment = experiment
                    .candidate(name, move || async move { read_cache(&client, id, &ReadOptions::default()).await });
            }
            let result = experiment
                .compare(|a: &Performance, b: &Performance| a.courier == b.courier)
                .observed_at(|p: &Performance| Some(p.at))
                .recheck(move |at: ObservedAt| {
                    let cache = recheck_c.clone();
                    async move {
                        let mut options = ReadOptions::default().wait(Duration::from_secs(2));
                        if let Some(lsn) = at.lsn {
                            options = options.min_lsn(lsn);
                        }
                        read_cache(&cache, id, &options).await
                    }
                })
                .context("courier_id", id)
                .publisher(summary.clone())
                .publisher(Arc::clone(&prometheus))
                .run_in_background(&limit)
                .await;
            match result {
                Ok(p) => p.courier,
                Err(e) => {
                    eprintln!("courier {id}: {e}");
                    continue;
                }
            }
        };
        paid += adjustment(performance.as_ref());
        deliveries += 1;
    }
    // Let background comparisons finish.
    let _ = limit.acquire_many(64).await;
    exporter.abort();
    if let Some(view) = &view {
        view.stop().await?;
    }

    println!("payments: {deliveries} deliveries paid, {} EUR in total", paid.round_dp(2));
    if args.mode == "cache" {
        println!("  answered by the cache: {}, by the old call (fallback): {}", by_source[0], by_source[1]);
        return Ok(());
    }
    let s = summary.summary();
    std::fs::write(&args.summary_file, serde_json::to_vec_pretty(&s)?)?;
    println!("experiment {}: {} runs compared, {:?} skipped", s.experiment, s.runs, s.skipped);
    for (name, c) in &s.candidates {
        let n = |k: &str| c.classes.get(k).copied().unwrap_or(0);
        println!(
            "  candidate {name}: match rate {:.2}%  (match {}, ahead {}, stale {}, unverified {}, divergent {}, candidate errors {})",
            100.0 * c.match_rate,
            n("match"),
            n("ahead"),
            n("stale"),
            n("unverified"),
            n("divergent"),
            n("candidate_error")
        );
    }
    println!("  latency per read path    p50 ms    p99 ms   p50 vs control");
    let row = |name: &str, l: &walcache_client::experiment::publish::Latency| {
        let ratio = s.control_latency.p50_ms / l.p50_ms.max(1e-6);
        println!("    {name:<22} {:>8.3}  {:>8.3}   {ratio:>6.1}x faster", l.p50_ms, l.p99_ms);
    };
    row("control (Postgres)", &s.control_latency);
    for (name, c) in &s.candidates {
        row(name, &c.latency);
    }
    for m in s.mismatch_samples.iter().take(5) {
        println!(
            "  e.g. {} {} {}",
            m.class,
            serde_json::to_string(&m.context)?,
            m.candidate_error.clone().unwrap_or_default()
        );
    }
    println!("  summary written to {}", args.summary_file.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn courier() -> CourierPerformance {
        serde_json::from_value(serde_json::json!({
            "courier_id": 1, "city": "Porto", "zone": null, "tier": "gold", "rating": "4.80",
            "deliveries": 10, "on_time_rate": 0.97, "acceptance_rate": null, "cancellations": 3,
            "active": true, "notes": null, "updated_at": "2026-11-22T00:00:00Z"
        }))
        .expect("courier")
    }

    #[test]
    fn adjustments() {
        let mut c = courier();
        assert_eq!(adjustment(Some(&c)), Decimal::new(465, 2)); // 4.50 x 1.10 + 0.50 - 0.30
        c.active = false;
        assert_eq!(adjustment(Some(&c)), Decimal::ZERO);
        assert_eq!(adjustment(None), Decimal::new(450, 2));
    }
}
