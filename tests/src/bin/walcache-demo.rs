//! `make demo`: the whole pipeline on a throwaway local environment.
//!
//! ```text
//!  walcache-env up (.walcache/demo) ─► incentives DB: courier_performance, 5000 rows (a few legacy rows
//!  break today's contract) ─► walcache-producer ─► walcache-consumer ─► simulated Incentives writer
//!  (updates, inserts, deletes, bad rows) beside the payments service running its experiment
//!  ─► read your writes ─► SIGTERM (drain) ─► what reached Kafka ─► experiment summary ─► verify
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use walcache_schemas::{Op, ProducerState, Registry, Watermark};
use walcache_tests::events::{decode_all, materialize};
use walcache_tests::kafka::read_all;
use walcache_tests::pipeline::http_get;
use walcache_tests::writer::Writer;
use walcache_tests::{Env, Pipeline, TestDb, binary, free_port, load_env, repo_root};

#[tokio::main]
async fn main() -> Result<()> {
    let repo = repo_root();
    let dir = repo.join(".walcache/demo");
    println!("== walcache demo ==\n");
    println!("-- 1. local environment (Postgres wal_level=logical + tansu Kafka broker), fresh");
    let script = repo.join("deploy/local/walcache-env");
    let _ = Command::new(&script).args(["destroy", "--dir"]).arg(&dir).stderr(Stdio::null()).status();
    let env: &'static Env = Box::leak(Box::new(load_env(&repo, &dir, "up")));

    println!("\n-- 2. Incentives database: courier_performance with 5000 rows");
    let db = TestDb::create_named(env, "incentives").await;
    db.seed(1, 5000).await;
    let client = db.client().await;
    // Legacy rows that break today's contract: they will be set aside, with their reason.
    client
        .batch_execute(
            "UPDATE courier_performance SET rating = NULL WHERE courier_id IN (17, 4242);
             UPDATE courier_performance SET tier = 'diamond' WHERE courier_id = 99;",
        )
        .await?;
    println!("   database {} (3 legacy rows break the contract: 2 NULL ratings, 1 unknown tier)", db.name);

    println!("\n-- 3. walcache-producer: snapshot, then streaming");
    let pipeline = Pipeline::named(&db, &env.kafka, "walcache", "incentives");
    let ops_port = free_port();
    let config_path = dir.join("producer.toml");
    std::fs::write(&config_path, pipeline.toml(ops_port))?;
    let log_path = dir.join("producer.log");
    let mut producer = Command::new(binary("walcache-producer"))
        .arg("--config")
        .arg(&config_path)
        .env("WALCACHE_LOG", "info,rdkafka=warn")
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("starting walcache-producer")?;
    let ops = format!("127.0.0.1:{ops_port}");
    let started = Instant::now();
    while !http_get(&ops, "/readyz").await.is_some_and(|b| b.contains("\"ready\":true")) {
        if started.elapsed() > Duration::from_secs(120) || producer.try_wait()?.is_some() {
            bail!("the producer did not become ready; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "   streaming after {:.1}s (config {}, log {})",
        started.elapsed().as_secs_f64(),
        config_path.display(),
        log_path.display()
    );

    println!("\n-- 4. walcache-consumer: restore the view from the topics, then follow");
    let api_port = free_port();
    let consumer_path = dir.join("consumer.toml");
    std::fs::write(
        &consumer_path,
        pipeline.consumer_toml("").replace("127.0.0.1:0", &format!("127.0.0.1:{api_port}")),
    )?;
    let mut consumer = Command::new(binary("walcache-consumer"))
        .arg("--config")
        .arg(&consumer_path)
        .env("WALCACHE_LOG", "info,rdkafka=warn")
        .stderr(std::fs::File::create(dir.join("consumer.log"))?)
        .spawn()
        .context("starting walcache-consumer")?;
    let api = format!("127.0.0.1:{api_port}");
    let started = Instant::now();
    while !http_get(&api, "/readyz").await.is_some_and(|b| b.contains("\"ready\":true")) {
        if started.elapsed() > Duration::from_secs(120) || consumer.try_wait()?.is_some() {
            bail!("the consumer did not become ready; see {}", dir.join("consumer.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cli = binary("walcache");
    let url = format!("http://{api}");
    println!("   ready after {:.1}s; `walcache status`:", started.elapsed().as_secs_f64());
    Command::new(&cli).args(["--url", &url, "status"]).status()?;
    println!("   `walcache get courier_performance 42`:");
    Command::new(&cli).args(["--url", &url, "get", "courier_performance", "42"]).status()?;

    println!("\n-- 5. 8 seconds of Incentives writes; meanwhile Payments pays deliveries with an experiment:");
    println!("      control = the old synchronous read from Postgres (its answer is used); candidates = the cache's");
    println!(
        "      read paths: remote Avro, remote JSON, near-cache (following invalidations), embedded view (in the payments process)"
    );
    let pg_url = format!("postgres://postgres:{}@127.0.0.1:{}/{}", env.pg_password, env.pg_port, db.name);
    let payments = Command::new(walcache_tests::example("payments"))
        .args(["--postgres", &pg_url, "--cache", &url, "--seconds", "8", "--rate", "150"])
        .args(["--paths", "avro,json,near,embedded", "--embedded"])
        .arg(&consumer_path)
        .args(["--summary-file"])
        .arg(dir.join("payments-experiment.json"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("payments.log"))?)
        .spawn()
        .context("starting the payments example")?;
    let writer = Writer::start(&db, 5000, 100_000, Duration::from_millis(3)).await;
    for s in 1..=8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if s == 4 {
            client
                .batch_execute(
                    "INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (90001, 'Faro', 'gold', 7.5, 0.9);
                     UPDATE courier_performance SET on_time_rate = 1.7 WHERE courier_id = 321;",
                )
                .await?;
        }
        print!(".");
        std::io::stdout().flush()?;
    }
    let committed = writer.stop().await;
    println!(" {} transactions committed (plus 2 that break the contract)", committed.len());
    let payments = payments.wait_with_output()?;
    let payments_report = String::from_utf8_lossy(&payments.stdout).into_owned();

    println!("\n-- 6. read your writes: update a courier, then ask the cache for that LSN");
    client.execute("UPDATE courier_performance SET deliveries = 9999 WHERE courier_id = 42", &[]).await?;
    let lsn: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    println!("   committed at or before LSN {lsn}; `walcache get courier_performance 42 --min-lsn {lsn}`:");
    Command::new(&cli).args(["--url", &url, "get", "courier_performance", "42", "--min-lsn", &lsn]).status()?;

    println!("\n-- 7. the experiment's summary (Payments decides the cut-over on this)");
    print!("{payments_report}");

    println!("\n-- 8. `walcache verify`: the view against a consistent snapshot of Postgres");
    let verified = Command::new(&cli).args(["--url", &url, "verify", "--postgres", &pg_url]).status()?;

    println!("\n-- 9. SIGTERM: the producer flushes Kafka, confirms the slot and exits");
    let stop = Instant::now();
    Command::new("kill").args(["-TERM", &producer.id().to_string()]).status()?;
    let status = producer.wait()?;
    println!("   {status} after {:.2}s", stop.elapsed().as_secs_f64());

    println!("\n-- 10. what reached Kafka (decoded with the schemas crate)");
    let records = read_all(&env.kafka, &pipeline.topic).await;
    let events = decode_all(&records);
    let mut by_op: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        *by_op.entry(e.op.map_or("tombstone", Op::as_str)).or_default() += 1;
    }
    let partitions: std::collections::BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
    println!("   topic {}: {} messages on {} partitions", pipeline.topic, records.len(), partitions.len());
    for (op, n) in &by_op {
        println!("     {op:<9} {n}");
    }
    if let Some(e) = events.iter().rev().find(|e| e.op == Some(Op::Update)) {
        let pos = e.position.context("position")?;
        println!(
            "   newest update: courier {} at LSN {} (tx {}, change #{} of it, committed {})",
            e.key.unwrap_or_default(),
            pos.lsn,
            pos.txid,
            pos.index,
            walcache_schemas::micros_to_rfc3339(pos.commit_ts_micros)
        );
        println!("     after = {}", serde_json::to_string(e.after.as_ref().context("after")?)?);
    }
    let dead = read_all(&env.kafka, &pipeline.dead_letter).await;
    let mut set_aside = std::collections::BTreeSet::new();
    println!("   dead-letter topic {}: {} rows set aside", pipeline.dead_letter, dead.len());
    for r in &dead {
        let letter: walcache_common::dead_letter::DeadLetter =
            serde_json::from_slice(r.value.as_deref().unwrap_or_default())?;
        if let Some(id) = letter.key.as_ref().and_then(|k| k["courier_id"].as_str()).and_then(|k| k.parse::<i64>().ok())
        {
            set_aside.insert(id);
        }
        println!(
            "     key {} at LSN {}: {} ({})",
            letter.key.map(|k| k.to_string()).unwrap_or_default(),
            letter.lsn.map(|l| l.to_string()).unwrap_or_default(),
            letter.reason,
            letter.reason_code
        );
    }
    // A key whose newest change was set aside keeps its last valid value in the topic: the
    // difference is the dead letter, visible and explained, not a silent drop.
    let mut view = materialize(&events);
    let mut table = db.contract_view().await;
    view.retain(|k, _| !set_aside.contains(k));
    table.retain(|k, _| !set_aside.contains(k));
    let matches = view == table;
    println!(
        "   topic folded by position == table, apart from the {} set-aside keys: {} ({} rows)",
        set_aside.len(),
        if matches { "yes" } else { "NO" },
        table.len()
    );
    let watermarks = read_all(&env.kafka, &pipeline.watermarks).await;
    if let Some(last) = watermarks.last().and_then(|r| r.value.as_deref()) {
        let wm = Watermark::decode(Registry::builtin()?, last)?;
        println!(
            "   last watermark: view complete up to LSN {} ({}), state {}",
            wm.lsn,
            walcache_schemas::micros_to_rfc3339(wm.commit_ts_micros),
            if wm.state == ProducerState::Streaming { "streaming" } else { "snapshotting" }
        );
    }
    Command::new("kill").args(["-TERM", &consumer.id().to_string()]).status()?;
    consumer.wait()?;
    println!("\nThe environment keeps running: deploy/local/walcache-env down --dir {}", dir.display());
    if !matches {
        bail!("the topic does not match the table");
    }
    if !verified.success() {
        bail!("verify found drift");
    }
    Ok(())
}
