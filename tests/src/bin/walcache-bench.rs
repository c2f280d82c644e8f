//! `make bench`: walcache's throughput, freshness, read and memory figures, each measured
//! side by side with the baseline the brief names, in one run on one fresh environment.
//!
//! ```text
//!  drain      pg_recvlogical (pgoutput)        vs  the producer's decode+encode path, same WAL
//!  produce    raw rdkafka 200 B, acks=all      vs  producer end to end (commit -> confirmed)
//!  consume    raw rdkafka read of the topic    vs  consumer restore (to ready)
//!  freshness  raw produce->consume latency     vs  commit -> visible in the cache at 5k updates/s (Sequin/Debezium published p99 in docs)
//!  freshness-mock   the same two, on librdkafka's mock cluster over TCP: a broker with a
//!             negligible floor, so commit->visible minus raw is walcache's own share
//!  snapshot   one plain COPY TO STDOUT          vs  the producer's chunked copy (planner + workers),
//!             (tokio-postgres, same table)          and its whole initial snapshot to every chunk
//!                                                   acknowledged by the mock cluster; parallelism 1, 4
//!  read       tokio-postgres PK query, redis   vs  walcache-client get (HTTP Avro, HTTP JSON; near-cache;
//!             embedded), and the floors with no walcache: axum + reqwest, plain tokio TCP
//!  memory     moka, one entry per row          vs  the consumer's paged store, RSS per row
//! ```
//!
//! Usage: walcache-bench [--rows N] [--events N] [--snapshot-rows N] [--seconds S]
//!        [--skip drain,freshness,freshness-mock,snapshot,read,memory]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use walcache_producer::binding::{Binding, TableRuntime};
use walcache_producer::config::TableSpec;
use walcache_producer::pgoutput::{self, Change, Tuples};
use walcache_schemas::{Lsn, Op, Position, Registry, write_envelope};
use walcache_tests::{Env, Pipeline, TestDb, free_port, load_env, repo_root};

struct Args {
    rows: i64,
    events: i64,
    snapshot_rows: i64,
    seconds: u64,
    skip: Vec<String>,
    child: Option<String>,
}

fn args() -> Args {
    let mut a =
        Args { rows: 1_000_000, events: 200_000, snapshot_rows: 300_000, seconds: 5, skip: Vec::new(), child: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--rows" => a.rows = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.rows),
            "--events" => a.events = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.events),
            "--snapshot-rows" => a.snapshot_rows = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.snapshot_rows),
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.seconds),
            "--skip" => a.skip = it.next().unwrap_or_default().split(',').map(str::to_string).collect(),
            "--memory-child" => a.child = it.next(),
            other => eprintln!("ignoring unknown argument {other}"),
        }
    }
    a
}

/// One line of the report.
struct Line {
    what: String,
    baseline: String,
    ours: String,
    ratio: Option<f64>,
    target: String,
    ok: Option<bool>,
}

fn rate(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64().max(1e-9)
}

fn k(v: f64) -> String {
    if v >= 1000.0 { format!("{:.1}k", v / 1000.0) } else { format!("{v:.0}") }
}

fn main() -> Result<()> {
    let args = args();
    if let Some(mode) = &args.child {
        return memory_child(mode, args.rows);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let repo = repo_root();
    let dir = repo.join(".walcache/bench");
    let _ = Command::new(repo.join("deploy/local/walcache-env")).args(["destroy", "--dir"]).arg(&dir).output();
    let env: &'static Env = Box::leak(Box::new(load_env(&repo, &dir, "up")));
    println!(
        "walcache-bench: {} CPUs, rows {}, events {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.rows,
        args.events
    );
    let mut lines = Vec::new();
    let on = |s: &str| !args.skip.iter().any(|x| x == s);
    if on("drain") {
        lines.extend(drain(env, args.rows).await?);
    }
    let (pipeline, producer) = produce(env, args.events, &mut lines).await?;
    let consumer = consume(&pipeline, &mut lines).await?;
    if on("freshness") {
        let raw = raw_freshness(&env.kafka).await?;
        let figures = freshness(&pipeline, &producer, &consumer, args.events).await?;
        lines.push(Line {
            what: format!("commit -> cache visible at {}/s", k(figures.achieved)),
            baseline: format!("raw produce->consume p50 {:.0} ms, p99 {:.0} ms", raw.0, raw.1),
            ours: format!("p50 {:.1} ms, p99 {:.1} ms", figures.p50, figures.p99),
            ratio: Some(raw.1 / figures.p99),
            target: "p99 <= 50ms".into(),
            ok: Some(figures.p99 <= 50.0),
        });
    }
    if on("freshness-mock") {
        lines.extend(freshness_on_mock_cluster(env).await?);
    }
    if on("snapshot") {
        lines.extend(snapshot(env, args.snapshot_rows).await?);
    }
    if on("read") {
        lines.extend(read(&pipeline, &consumer, args.events, args.seconds).await?);
    }
    if on("memory") {
        lines.extend(memory(args.rows)?);
    }
    println!("\n{:<52} {:<48} {:<44} {:>8} {:>10}", "measure", "baseline (same run)", "walcache", "ratio", "target");
    for l in &lines {
        println!(
            "{:<52} {:<48} {:<44} {:>8} {:>10} {}",
            l.what,
            l.baseline,
            l.ours,
            l.ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            l.target,
            match l.ok {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            }
        );
    }
    let _ = Command::new(repo.join("deploy/local/walcache-env")).args(["destroy", "--dir"]).arg(&dir).output();
    Ok(())
}

/// pg_recvlogical and the producer's decode path drain the same WAL (one big transaction).
async fn drain(env: &'static Env, rows: i64) -> Result<Vec<Line>> {
    println!("drain: inserting {rows} rows in one transaction ...");
    let db = TestDb::create_named(env, "bench_drain").await;
    let client = db.client().await;
    // One statement per call: a slot cannot be created in a transaction that has written.
    for sql in [
        "CREATE PUBLICATION bench FOR TABLE courier_performance",
        "SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('bench_ours', 'pgoutput')",
    ] {
        client.batch_execute(sql).await?;
    }
    db.seed(1, rows).await;
    let end = db.current_lsn().await;

    let pg_bin = std::fs::read_to_string(env.dir.join("env"))?
        .lines()
        .find_map(|l| l.strip_prefix("export WALCACHE_LOCAL_PG_BIN=").map(|v| v.trim_matches('\'').to_string()))
        .unwrap_or_else(|| "/usr/bin".into());
    let started = Instant::now();
    let status = Command::new(format!("{pg_bin}/pg_recvlogical"))
        .args(["-h", "127.0.0.1", "-p", &env.pg_port.to_string(), "-U", "postgres", "-d", &db.name])
        .args(["--slot", "bench_recv", "--start", "-o", "proto_version=1", "-o", "publication_names=bench"])
        .args(["--endpos", &end.to_string(), "-f", "/dev/null", "--no-loop"])
        .env("PGPASSWORD", &env.pg_password)
        .status()?;
    let recv = started.elapsed();
    if !status.success() {
        bail!("pg_recvlogical failed");
    }

    let registry = Registry::builtin()?;
    let contract = registry.contract("courier_performance")?;
    let table = Arc::new(
        TableRuntime::new(
            0,
            TableSpec {
                schema: "public".into(),
                name: "courier_performance".into(),
                topic: "unused".into(),
                contract,
                version: contract.latest().version,
            },
        )
        .context("table")?,
    );
    let config = pgwire_replication::ReplicationConfig::new(
        "127.0.0.1",
        "postgres",
        env.pg_password.clone(),
        db.name.clone(),
        "bench_ours",
        "bench",
    )
    .with_port(env.pg_port)
    .with_stop_lsn(pgwire_replication::Lsn::from_u64(end.0))
    .with_options("-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3");
    let started = Instant::now();
    let mut repl = pgwire_replication::ReplicationClient::connect(config).await?;
    let (mut tuples, mut binding, mut events) = (Tuples::default(), None, 0u64);
    let (mut key, mut row, mut message) = (Vec::new(), Vec::new(), Vec::new());
    let mut position = Position::default();
    while let Some(ev) = repl.recv().await? {
        match ev {
            pgwire_replication::ReplicationEvent::XLogData { data, .. } => {
                match pgoutput::decode(&data, &mut tuples)? {
                    Change::Relation(r) => binding = Some(Binding::new(Arc::clone(&table), r).0),
                    Change::Insert { .. } => {
                        let b = binding.as_ref().context("relation first")?;
                        if b.encode_key(&data, &tuples.new, &mut key).is_ok()
                            && b.encode_row(&data, &tuples.new, None, &mut row).is_ok()
                        {
                            message.clear();
                            write_envelope(
                                &mut message,
                                &table.version.doc.header,
                                Op::Insert,
                                None,
                                Some(&row),
                                &position,
                                &table.qualified,
                            );
                            position.index += 1;
                            events += 1;
                        }
                    }
                    _ => {}
                }
            }
            pgwire_replication::ReplicationEvent::StoppedAt { .. } => break,
            _ => {}
        }
    }
    let ours = started.elapsed();
    drop(repl);
    let (r, o) = (rate(rows as f64, recv), rate(events as f64, ours));
    println!(
        "drain: pg_recvlogical {:.2}s, producer decode {:.2}s ({events} events)",
        recv.as_secs_f64(),
        ours.as_secs_f64()
    );
    Ok(vec![Line {
        what: format!("slot drain ({}-row tx), events/s", k(rows as f64)),
        baseline: format!("pg_recvlogical {}/s", k(r)),
        ours: format!("producer decode+encode {}/s", k(o)),
        ratio: Some(o / r),
        target: ">= 0.8x".into(),
        ok: Some(o / r >= 0.8),
    }])
}

/// A 6-partition topic for a raw baseline, and the producer settings both raw baselines share
/// (what a plain rdkafka user gets with acks=all and idempotence).
async fn raw_topic_and_producer(bootstrap: &str, topic: &str) -> Result<rdkafka::producer::FutureProducer> {
    let kafka = walcache_common::config::KafkaConfig {
        bootstrap_servers: bootstrap.to_string(),
        properties: Default::default(),
        property_files: Default::default(),
        request_timeout: Duration::from_secs(10),
    };
    let metadata = walcache_common::kafka::Metadata::new(&kafka, "bench")?;
    let spec =
        walcache_common::kafka::TopicSpec { name: topic.into(), partitions: 6, replication_factor: 1, configs: vec![] };
    walcache_common::kafka::ensure_topics(&kafka, &metadata, &[spec]).await?;
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// Raw produce of 200-byte messages vs the producer end to end on the same broker.
async fn produce(
    env: &'static Env,
    events: i64,
    lines: &mut Vec<Line>,
) -> Result<(Pipeline, walcache_tests::InProcess)> {
    use rdkafka::producer::FutureRecord;
    let topic = "bench.raw";
    let producer = raw_topic_and_producer(&env.kafka, topic).await?;
    let payload = [b'x'; 200];
    let started = Instant::now();
    let mut futures = Vec::with_capacity(events as usize);
    for i in 0..events {
        let key = i.to_be_bytes();
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(&key[..]).payload(&payload[..]);
        match producer.send_result(record) {
            Ok(f) => futures.push(f),
            Err((e, _)) => bail!("raw produce: {e}"),
        }
    }
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    let raw = rate(events as f64, started.elapsed());
    println!("produce: raw rdkafka {}/s", k(raw));

    let db = TestDb::create_named(env, "bench_produce").await;
    let p = Pipeline::named(&db, &env.kafka, "bench_produce", "bench");
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let client = db.client().await;
    let started = Instant::now();
    db.seed(1, events).await;
    let end = db.current_lsn().await;
    let committed = Instant::now();
    while (producer.metrics.confirmed_lsn.get() as u64) < end.0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let ours = rate(events as f64, elapsed);
    let bytes = producer.metrics.bytes.with_label_values(&["public.courier_performance"]).get() as f64 / events as f64;
    println!(
        "produce: producer end to end {}/s ({:.2}s from the insert, {:.2}s after commit, {:.0} B/event)",
        k(ours),
        elapsed.as_secs_f64(),
        committed.elapsed().as_secs_f64(),
        bytes
    );
    lines.push(Line {
        what: "produce to the broker, messages/s".into(),
        baseline: format!("raw rdkafka 200 B acks=all {}/s", k(raw)),
        ours: format!("producer WAL->acked {}/s ({bytes:.0} B)", k(ours)),
        ratio: Some(ours / raw),
        target: ">= 0.7x".into(),
        ok: Some(ours / raw >= 0.7),
    });
    drop(client);
    Ok((p, producer))
}

/// Raw consume of the table topic vs the consumer's restore.
async fn consume(p: &Pipeline, lines: &mut Vec<Line>) -> Result<walcache_tests::consumer::TestConsumer> {
    let started = Instant::now();
    let records = walcache_tests::kafka::read_all(&p.kafka, &p.topic).await;
    let raw = rate(records.len() as f64, started.elapsed());
    println!("consume: raw rdkafka read of {} messages {}/s", records.len(), k(raw));
    let started = Instant::now();
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(300)).await;
    let restore = consumer.running.view.restore();
    let ours = rate(restore.events as f64, started.elapsed());
    println!("consume: consumer restore of {} events {}/s", restore.events, k(ours));
    lines.push(Line {
        what: "consume / restore, messages/s".into(),
        baseline: format!("raw rdkafka consume {}/s", k(raw)),
        ours: format!("consumer restore {}/s", k(ours)),
        ratio: Some(ours / raw),
        target: ">= 0.8x".into(),
        ok: Some(ours / raw >= 0.8),
    });
    Ok(consumer)
}

/// Cumulative bucket counts of a Prometheus histogram, to take quantiles over a window.
fn buckets(h: &prometheus::Histogram) -> Vec<(f64, f64)> {
    use prometheus::core::Collector;
    let families = h.collect();
    let Some(m) = families.first().and_then(|f| f.get_metric().first()) else { return Vec::new() };
    m.get_histogram().get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count() as f64)).collect()
}

/// Quantile of what a histogram observed between two bucket snapshots, interpolated within
/// its bucket.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let window: Vec<(f64, f64)> =
        after.iter().enumerate().map(|(i, (b, c))| (*b, c - before.get(i).map_or(0.0, |x| x.1))).collect();
    let total = window.last().map_or(0.0, |x| x.1);
    let target = q * total;
    let (mut prev_bound, mut prev_count) = (0.0, 0.0);
    for (bound, count) in window {
        if count >= target && total > 0.0 {
            let within = if count > prev_count { (target - prev_count) / (count - prev_count) } else { 0.0 };
            return prev_bound + within * (bound - prev_bound);
        }
        (prev_bound, prev_count) = (bound, count);
    }
    f64::INFINITY
}

/// The broker's own floor: raw rdkafka produce (acks=all) -> raw consume latency at the same
/// 5k messages/s, on the same broker, as p50/p99 milliseconds.
async fn raw_freshness(bootstrap: &str) -> Result<(f64, f64)> {
    use futures::StreamExt;
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::FutureRecord;
    let topic = "bench.raw_latency";
    let producer = raw_topic_and_producer(bootstrap, topic).await?;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-raw-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..6 {
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let epoch = Instant::now();
    let seconds = 10u64;
    let sender = tokio::spawn(async move {
        // 5 messages per millisecond, in bursts of 10 every 2 ms.
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut n: u64 = 0;
        while epoch.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            for _ in 0..10 {
                let mut payload = [b'x'; 200];
                payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
                let key = n.to_be_bytes();
                n += 1;
                let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(&key[..]).payload(&payload[..]);
                let _ = producer.send_result(record);
            }
        }
        producer
    });
    // Messages sent before the consumer's first fetch wait for it: the first seconds measure
    // start-up, not the broker's path, and are left out.
    let warmup = Duration::from_secs(2);
    let mut latencies = Vec::new();
    let mut stream = consumer.stream();
    let until = Instant::now() + Duration::from_secs(seconds + 5);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until.into(), stream.next()).await {
        if let Some(sent) = message.payload().and_then(|p| p.get(..8)).and_then(|b| b.try_into().ok()) {
            let sent = Duration::from_nanos(u64::from_be_bytes(sent));
            if sent >= warmup {
                latencies.push(epoch.elapsed().saturating_sub(sent));
            }
        }
        let expected = 5000 * (seconds as usize - warmup.as_secs() as usize);
        if epoch.elapsed() > Duration::from_secs(seconds + 1) && latencies.len() >= expected {
            break;
        }
    }
    drop(sender.await);
    latencies.sort_unstable();
    let q = |p: f64| {
        latencies.get(((latencies.len().max(1) - 1) as f64 * p) as usize).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "freshness: raw produce->consume {} messages (after a 2 s warm-up), p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        q(0.5),
        q(0.99)
    );
    Ok((q(0.5), q(0.99)))
}

/// What a freshness run measured: the update rate reached and commit -> visible quantiles (ms).
struct Freshness {
    achieved: f64,
    p50: f64,
    p99: f64,
}

/// Commit -> visible in the cache, with 5k row updates per second.
async fn freshness(
    p: &Pipeline,
    producer: &walcache_tests::InProcess,
    consumer: &walcache_tests::consumer::TestConsumer,
    keys: i64,
) -> Result<Freshness> {
    let stages = [
        ("producer commit->acked", &producer.metrics.commit_to_ack_seconds),
        ("producer send->acked", &producer.metrics.delivery_seconds),
        ("consumer commit->visible", &consumer.metrics.commit_to_apply_seconds),
    ];
    let before: Vec<_> = stages.iter().map(|(_, h)| buckets(h)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let updated = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (db, stop, updated) = (p.db.clone(), stop.clone(), updated.clone());
        tasks.push(tokio::spawn(async move {
            let client = db.client().await;
            let stmt = client
                .prepare("UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id = ANY($1)")
                .await
                .expect("prepare");
            // 4 writers x 125 transactions/s x 10 rows = 5k row updates/s.
            let mut tick = tokio::time::interval(Duration::from_millis(8));
            let mut n: i64 = w;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let ids: Vec<i64> = (0..10).map(|i| 1 + (n * 10 + i) % keys).collect();
                n += 4;
                if client.execute(&stmt, &[&ids]).await.is_ok() {
                    updated.fetch_add(10, Ordering::Relaxed);
                }
            }
        }));
    }
    let seconds = 15;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let achieved = updated.load(Ordering::Relaxed) as f64 / seconds as f64;
    let (mut p50, mut p99) = (0.0, 0.0);
    for ((name, h), before) in stages.iter().zip(&before) {
        let after = buckets(h);
        let samples = after.last().map_or(0.0, |x| x.1) - before.last().map_or(0.0, |x| x.1);
        (p50, p99) = (quantile(before, &after, 0.5) * 1000.0, quantile(before, &after, 0.99) * 1000.0);
        println!("freshness at {}/s: {name}: {samples} samples, p50 {p50:.1} ms, p99 {p99:.1} ms", k(achieved));
    }
    Ok(Freshness { achieved, p50, p99 })
}

/// Freshness without the local broker's floor: the same raw and end-to-end runs against
/// librdkafka's mock cluster (in this process, served over TCP), whose produce -> consume path
/// costs little, so commit -> visible minus raw is what walcache itself adds.
async fn freshness_on_mock_cluster(env: &'static Env) -> Result<Vec<Line>> {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(3)?;
    let bootstrap = mock.bootstrap_servers();
    mock.create_topic("bench.raw_latency", 6, 3)?;
    let raw = raw_freshness(&bootstrap).await?;

    let keys = 20_000;
    let mut lines = Vec::new();
    // As shipped (one request in flight per broker, which tansu needs for per-key order), and
    // with the five Apache Kafka's idempotent producer keeps in order (the raw path's setting).
    let runs = [
        ("bench_fresh_mock", "as shipped, max.in.flight=1", ""),
        (
            "bench_fresh_mock5",
            "max.in.flight=5, for Apache Kafka",
            "[kafka.properties]\n\"max.in.flight.requests.per.connection\" = \"5\"\n",
        ),
    ];
    for (name, label, producer_toml) in runs {
        let db = TestDb::create_named(env, name).await;
        db.seed(1, keys).await;
        let mut p = Pipeline::named(&db, &bootstrap, name, &name.replace('_', ""));
        p.extra_toml = producer_toml.to_string();
        for (topic, partitions) in p.topics() {
            mock.create_topic(topic, partitions, 3)?;
        }
        let producer = p.start_in_process();
        producer.wait_ready(Duration::from_secs(120)).await;
        let consumer = p.start_consumer("").await;
        consumer.wait_ready(Duration::from_secs(120)).await;
        let figures = freshness(&p, &producer, &consumer, keys).await?;
        consumer.stop().await;
        producer.stop().await?;
        let own_p99 = figures.p99 - raw.1;
        println!(
            "freshness on the mock cluster ({label}): raw p50 {:.1} ms p99 {:.1} ms; commit->visible p50 {:.1} ms \
             p99 {:.1} ms; walcache's own share at p99 {own_p99:.1} ms",
            raw.0, raw.1, figures.p50, figures.p99
        );
        lines.push(Line {
            what: format!("walcache's own commit -> visible at {}/s (mock cluster, {label})", k(figures.achieved)),
            baseline: format!("raw produce->consume p50 {:.1} ms, p99 {:.1} ms", raw.0, raw.1),
            ours: format!("p99 {:.1} ms - raw p99 = {own_p99:.1} ms", figures.p99),
            ratio: None,
            target: "<= 20ms".into(),
            ok: Some(own_p99 <= 20.0),
        });
    }
    Ok(lines)
}

/// The chunked initial snapshot against one plain `COPY ... TO STDOUT` of the same table. The
/// producer's figure runs from its start (slot creation) until every chunk is acknowledged by
/// the mock cluster (a broker with a negligible floor, so the local broker's produce rate does
/// not set it) and includes parsing, contract checks and Avro encoding of every row.
async fn snapshot(env: &'static Env, rows: i64) -> Result<Vec<Line>> {
    use futures::StreamExt;
    use rdkafka::mocking::MockCluster;
    println!("snapshot: seeding {rows} rows ...");
    let db = TestDb::create_named(env, "bench_snapshot").await;
    db.seed(1, rows).await;
    let client = db.client().await;
    client.batch_execute("VACUUM ANALYZE courier_performance").await?;
    let plain = |client: tokio_postgres::Client| async move {
        let started = Instant::now();
        let stream = client.copy_out("COPY (SELECT * FROM ONLY public.courier_performance) TO STDOUT").await?;
        let mut stream = std::pin::pin!(stream);
        let mut copied = 0u64;
        while let Some(bytes) = stream.next().await {
            copied += bytes?.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        anyhow::Ok((copied, started.elapsed()))
    };
    // Warm the cache once so that neither side pays for the first read from disk.
    let (copied, _) = plain(db.client().await).await?;
    if copied != rows as u64 {
        bail!("plain COPY returned {copied} rows of {rows}");
    }
    let mut lines = Vec::new();
    for parallelism in [1usize, 4] {
        let (_, baseline) = plain(db.client().await).await?;
        let p = Pipeline::named(&db, &env.kafka, &format!("bench_copy_p{parallelism}"), "benchcopy");
        let (copied, took) = chunked_copy(&p, parallelism).await?;
        if copied != rows as u64 {
            bail!("the chunked copy returned {copied} rows of {rows}");
        }
        lines.push(against_copy(rows, baseline, took, format!("copy, parallelism {parallelism}"), Some(0.7)));

        let (_, baseline) = plain(db.client().await).await?;
        let mock = MockCluster::new(3)?;
        let bootstrap = mock.bootstrap_servers();
        let name = format!("bench_snapshot_p{parallelism}");
        let p = Pipeline::named(&db, &bootstrap, &name, &name.replace('_', ""));
        for (topic, partitions) in p.topics() {
            mock.create_topic(topic, partitions, 3)?;
        }
        let mut config = p.config();
        config.snapshot.parallelism = parallelism;
        let started = Instant::now();
        let producer = p.start_in_process_with(config);
        producer.wait_ready(Duration::from_secs(1800)).await;
        let ours = started.elapsed();
        let emitted = producer.metrics.snapshot_rows.with_label_values(&["public.courier_performance"]).get();
        producer.stop().await?;
        if emitted != rows as u64 {
            bail!("the chunked snapshot emitted {emitted} rows of {rows}");
        }
        lines.push(against_copy(rows, baseline, ours, format!("to acked (mock), parallelism {parallelism}"), None));
    }
    Ok(lines)
}

/// One snapshot line: `ours` against the plain COPY's time for the same `rows`.
fn against_copy(rows: i64, baseline: Duration, ours: Duration, what: String, target: Option<f64>) -> Line {
    let (b, o) = (rate(rows as f64, baseline), rate(rows as f64, ours));
    println!("snapshot {what}: plain COPY {:.2}s, walcache {:.2}s", baseline.as_secs_f64(), ours.as_secs_f64());
    Line {
        what: format!("snapshot {} rows {what}, rows/s", k(rows as f64)),
        baseline: format!("plain COPY TO STDOUT {}/s", k(b)),
        ours: format!("chunked {}/s", k(o)),
        ratio: Some(o / b),
        target: target.map_or_else(|| "(shown)".into(), |t| format!(">= {t}x")),
        ok: target.map(|t| o / b >= t),
    }
}

/// The copy side of the chunked snapshot alone: the producer's planner and workers (boundary
/// queries, low and high watermark messages, a REPEATABLE READ transaction and a key-range
/// COPY per chunk), with the copied chunks dropped instead of encoded and produced.
async fn chunked_copy(p: &Pipeline, parallelism: usize) -> Result<(u64, Duration)> {
    use walcache_producer::snapshot::copier::{ChunkMessage, Lower, Planner, Workers};
    let config = p.config();
    let spec = config.table_specs()?.into_iter().next().context("a table")?;
    let table = Arc::new(TableRuntime::new(0, spec).context("table")?);
    let planner = Arc::new(Planner::default());
    let (to_stream, mut copied) = tokio::sync::mpsc::channel(2 * parallelism);
    let workers = Workers {
        pg: config.pg_connection()?,
        slot: p.slot.clone(),
        session: 1,
        chunk_rows: config.snapshot.chunk_rows,
        planner: Arc::clone(&planner),
        permits: Arc::new(tokio::sync::Semaphore::new(2 * parallelism)),
        to_stream,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    planner.add(1, table, Lower::Unbounded, None).await;
    let tasks: Vec<_> = (0..parallelism).map(|w| tokio::spawn(workers.clone().run(w, cancel.clone()))).collect();
    drop(workers);
    let (mut rows, mut seqs, mut last) = (0u64, std::collections::BTreeSet::new(), None);
    while let Some(message) = copied.recv().await {
        match message {
            ChunkMessage::Copied(chunk) => {
                rows += chunk.rows;
                seqs.insert(chunk.work.seq);
                if chunk.work.last {
                    last = Some(chunk.work.seq);
                }
            }
            ChunkMessage::Failed(e) => bail!("a snapshot worker failed: {e}"),
        }
        if last.is_some_and(|l| seqs.len() as u64 == l + 1) {
            break;
        }
    }
    let took = started.elapsed();
    cancel.cancel();
    drop(copied);
    for t in tasks {
        let _ = t.await;
    }
    Ok((rows, took))
}

struct LoadResult {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn load<F, Fut>(seconds: u64, concurrency: usize, make: F) -> LoadResult
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
{
    let handles: Vec<_> = (0..concurrency).map(|i| tokio::spawn(make(i))).collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap_or_default());
    }
    all.sort_unstable();
    let q = |p: f64| all.get(((all.len().max(1) - 1) as f64 * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e6);
    LoadResult { per_sec: all.len() as f64 / seconds as f64, p50_us: q(0.5), p99_us: q(0.99) }
}

/// Key choice for a read load: uniform over every row, or a hot set (the couriers with
/// deliveries in flight, which payments reads again and again).
#[derive(Clone, Copy)]
enum Keys {
    Uniform(i64),
    Hot(i64),
}

impl Keys {
    fn pick(self) -> i64 {
        match self {
            Keys::Uniform(n) | Keys::Hot(n) => 1 + (rand::random::<u64>() % n as u64) as i64,
        }
    }

    fn label(self) -> String {
        match self {
            Keys::Uniform(n) => format!("uniform over {}", k(n as f64)),
            Keys::Hot(n) => format!("hot set of {}", k(n as f64)),
        }
    }
}

const READ_CONCURRENCY: usize = 16;

async fn pg_reads(p: &Pipeline, keys: Keys, seconds: u64) -> LoadResult {
    let db = p.db.clone();
    let until = Instant::now() + Duration::from_secs(seconds);
    load(seconds, READ_CONCURRENCY, move |_| {
        let db = db.clone();
        async move {
            let client = db.client().await;
            let stmt = client
                .prepare("SELECT courier_id, city, zone, tier, rating::text, deliveries, on_time_rate, acceptance_rate, cancellations, active, notes, updated_at::text FROM courier_performance WHERE courier_id = $1")
                .await
                .expect("prepare");
            let mut out = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let _ = client.query_opt(&stmt, &[&keys.pick()]).await;
                out.push(t.elapsed());
            }
            out
        }
    })
    .await
}

async fn client_reads(client: walcache_client::Client, keys: Keys, seconds: u64) -> LoadResult {
    let until = Instant::now() + Duration::from_secs(seconds);
    load(seconds, READ_CONCURRENCY, move |_| {
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            let options = walcache_client::ReadOptions::default();
            while Instant::now() < until {
                let t = Instant::now();
                let _ = client.get::<walcache_schemas::CourierPerformance>(&keys.pick(), &options).await;
                out.push(t.elapsed());
            }
            out
        }
    })
    .await
}

/// Reads at concurrency 16, each walcache path beside a PK query through tokio-postgres on the
/// same keys: the cache over HTTP (Avro and JSON, uniform keys), the client's near-cache (hot
/// set), the embedded view (uniform keys, in this process), and redis GET throughput (when
/// redis-benchmark is installed).
async fn read(
    p: &Pipeline,
    consumer: &walcache_tests::consumer::TestConsumer,
    rows: i64,
    seconds: u64,
) -> Result<Vec<Line>> {
    use walcache_client::{Client, ClientOptions, NearCacheOptions, Wire};
    let near = NearCacheOptions::new(200_000, Duration::from_secs(1));
    let embedded_view = p.start_embedded("");
    embedded_view.wait_ready(Duration::from_secs(600)).await?;
    let remote = |options: ClientOptions| Client::new(&consumer.base, options);
    let paths = [
        ("HTTP Avro", remote(ClientOptions::default().wire(Wire::Avro))?, Keys::Uniform(rows), 10.0),
        ("HTTP JSON", remote(ClientOptions::default().wire(Wire::Json))?, Keys::Uniform(rows), 10.0),
        ("HTTP/2 (h2c) Avro", remote(ClientOptions::default().http2())?, Keys::Uniform(rows), 10.0),
        ("near-cache, 1s TTL", remote(ClientOptions::default().near_cache(near))?, Keys::Hot(1000.min(rows)), 10.0),
        (
            "embedded view",
            Client::embedded(Arc::clone(&embedded_view), ClientOptions::default())?,
            Keys::Uniform(rows),
            100.0,
        ),
    ];
    let mut results = Vec::new();
    for (label, client, keys, target) in paths {
        let pg = pg_reads(p, keys, seconds).await;
        // (A marker for profiling one path: `perf record -a` from this line for a few seconds.)
        println!("read: measuring walcache-client get ({label}) for {seconds} s");
        let ours = client_reads(client, keys, seconds).await;
        for (who, r) in [("postgres PK query", &pg), ("walcache-client get", &ours)] {
            println!(
                "read ({}): {who} ({label}) {}/s, p50 {:.0} us, p99 {:.0} us",
                keys.label(),
                k(r.per_sec),
                r.p50_us,
                r.p99_us
            );
        }
        results.push((label, keys, pg, ours, target));
    }
    let floors = [
        (
            "HTTP/1.1, axum + reqwest, fixed 180 B body",
            (pg_reads(p, Keys::Uniform(rows), seconds).await, http_floor(Keys::Uniform(rows), seconds).await?),
        ),
        (
            "TCP, tokio, 16 B request -> 180 B answer",
            (pg_reads(p, Keys::Uniform(rows), seconds).await, tcp_floor(Keys::Uniform(rows), seconds).await?),
        ),
    ];
    embedded_view.stop().await?;
    let mut lines = near_cache_freshness(p, consumer, 100).await?;
    for (label, keys, pg, r, target) in &results {
        let speedup = pg.p50_us / r.p50_us.max(0.001);
        lines.push(Line {
            what: format!("get p50, c=16, {label}, {}", keys.label()),
            baseline: format!("tokio-postgres PK query {:.0} us", pg.p50_us),
            ours: format!("{:.1} us (p99 {:.0} us, {}/s)", r.p50_us, r.p99_us, k(r.per_sec)),
            ratio: Some(speedup),
            target: format!(">= {target}x"),
            ok: Some(speedup >= *target),
        });
    }
    // The floors: what a round trip costs here with no walcache in it (measured, like the paths,
    // while the embedded view follows the topics), beside a PK query of the same moment. A
    // remote path cannot beat its floor, so ours - floor is walcache's share.
    for (label, (pg, floor)) in &floors {
        lines.push(Line {
            what: format!("floor: round trip p50, c=16, {label}"),
            baseline: format!("tokio-postgres PK query {:.0} us", pg.p50_us),
            ours: format!("{:.1} us (p99 {:.0} us, {}/s)", floor.p50_us, floor.p99_us, k(floor.per_sec)),
            ratio: Some(pg.p50_us / floor.p50_us.max(0.001)),
            target: "(no walcache)".into(),
            ok: None,
        });
    }
    match redis_get_rate(rows) {
        Some(redis) => {
            for (label, _, _, r, _) in &results {
                lines.push(Line {
                    what: format!("get throughput, c=16 ({label})"),
                    baseline: format!("redis GET (redis-benchmark) {}/s", k(redis)),
                    ours: format!("{}/s", k(r.per_sec)),
                    ratio: Some(r.per_sec / redis),
                    target: ">= 0.7x".into(),
                    ok: Some(r.per_sec / redis >= 0.7),
                });
            }
        }
        None => lines.push(Line {
            what: "get throughput vs redis".into(),
            baseline: "redis-server not installed".into(),
            ours: "-".into(),
            ratio: None,
            target: ">= 0.7x".into(),
            ok: None,
        }),
    }
    Ok(lines)
}

/// Bytes of the floors' answer: about one courier row with its headers' worth of as-of, the
/// size redis-benchmark is given too.
const FLOOR_ANSWER_BYTES: usize = 180;

/// The HTTP floor: a fixed body from an axum route through a pooled reqwest client, in this
/// process, the same stacks a remote walcache read goes through with none of walcache's work.
async fn http_floor(keys: Keys, seconds: u64) -> Result<LoadResult> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let answer = bytes::Bytes::from(vec![7u8; FLOOR_ANSWER_BYTES]);
    let app = axum::Router::new().route(
        "/v1/floor/{key}",
        axum::routing::get(move || {
            let answer = answer.clone();
            async move { ([("content-type", "application/octet-stream")], answer) }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder().build()?;
    println!("read: measuring the HTTP floor for {seconds} s");
    let until = Instant::now() + Duration::from_secs(seconds);
    let floor = load(seconds, READ_CONCURRENCY, move |_| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let key = keys.pick();
                if let Ok(answer) = http.get(format!("{base}/v1/floor/{key}")).send().await {
                    let _ = answer.bytes().await;
                }
                out.push(t.elapsed());
            }
            out
        }
    })
    .await;
    server.abort();
    Ok(floor)
}

/// The floor of any protocol over loopback TCP here: one connection per reader, a 16-byte
/// request and a 180-byte answer, no parsing (what a pipelined binary protocol could reach).
async fn tcp_floor(keys: Keys, seconds: u64) -> Result<LoadResult> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let (mut request, answer) = ([0u8; 16], [7u8; FLOOR_ANSWER_BYTES]);
                while socket.read_exact(&mut request).await.is_ok() {
                    if socket.write_all(&answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    println!("read: measuring the TCP floor for {seconds} s");
    let until = Instant::now() + Duration::from_secs(seconds);
    let floor = load(seconds, READ_CONCURRENCY, move |_| async move {
        let mut out = Vec::new();
        let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else { return out };
        let _ = socket.set_nodelay(true);
        let mut answer = [0u8; FLOOR_ANSWER_BYTES];
        while Instant::now() < until {
            let t = Instant::now();
            let mut request = [0u8; 16];
            request[..8].copy_from_slice(&keys.pick().to_be_bytes());
            if socket.write_all(&request).await.is_err() || socket.read_exact(&mut answer).await.is_err() {
                break;
            }
            out.push(t.elapsed());
        }
        out
    })
    .await;
    server.abort();
    Ok(floor)
}

/// Commit -> visible for single-row updates, side by side: through the consumer's API (polled,
/// no near-cache) and through a near-cache that follows the invalidation stream (polled; its
/// entry for the key is held before each update). Target: the near-cache's p99 within 2x the
/// consumer's.
async fn near_cache_freshness(
    p: &Pipeline,
    consumer: &walcache_tests::consumer::TestConsumer,
    updates: usize,
) -> Result<Vec<Line>> {
    use walcache_client::{Client, ClientOptions, CourierPerformance, NearCacheOptions, ReadOptions};
    let remote = Client::new(&consumer.base, ClientOptions::default())?;
    let near_options =
        NearCacheOptions::new(10_000, Duration::from_secs(1)).follow_invalidations(Duration::from_secs(600));
    let near = Client::new(&consumer.base, ClientOptions::default().near_cache(near_options))?;
    let keys: Vec<i64> = (1..=20).collect();
    // Connected once entries outlive the 1 s TTL.
    let connected = Instant::now();
    loop {
        for k in &keys {
            let _ = near.get::<CourierPerformance>(k, &ReadOptions::default()).await;
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let held = near.get::<CourierPerformance>(&keys[0], &ReadOptions::default()).await;
        if held.is_ok_and(|r| r.from_near_cache) {
            break;
        }
        if connected.elapsed() > Duration::from_secs(60) {
            bail!("the near-cache never followed the invalidation stream");
        }
    }
    async fn visible(client: &Client, key: i64, deliveries: i32, since: Instant) -> Duration {
        loop {
            let read = client.get::<CourierPerformance>(&key, &ReadOptions::default()).await;
            if read.ok().and_then(|r| r.value).is_some_and(|v| v.deliveries == deliveries)
                || since.elapsed() > Duration::from_secs(30)
            {
                return since.elapsed();
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let pg = p.db.client().await;
    let (mut via_api, mut via_near) = (Vec::new(), Vec::new());
    for i in 0..updates {
        let key = keys[i % keys.len()];
        let read = near.get::<CourierPerformance>(&key, &ReadOptions::default()).await?;
        if !read.from_near_cache {
            let _ = near.get::<CourierPerformance>(&key, &ReadOptions::default()).await?;
        }
        let deliveries = 1_000_000 + i as i32;
        pg.execute("UPDATE courier_performance SET deliveries = $1 WHERE courier_id = $2", &[&deliveries, &key])
            .await?;
        let since = Instant::now();
        let (a, n) = tokio::join!(visible(&remote, key, deliveries, since), visible(&near, key, deliveries, since));
        via_api.push(a);
        via_near.push(n);
    }
    let p99 = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * 0.99) as usize].as_secs_f64() * 1e3
    };
    let p50 = |v: &[Duration]| v[v.len() / 2].as_secs_f64() * 1e3;
    let (api_p99, near_p99) = (p99(&mut via_api), p99(&mut via_near));
    println!(
        "near-cache freshness: {updates} updates, commit -> visible via the API p50 {:.1} ms p99 {api_p99:.1} ms, via the near-cache p50 {:.1} ms p99 {near_p99:.1} ms",
        p50(&via_api),
        p50(&via_near)
    );
    let ratio = near_p99 / api_p99.max(0.001);
    Ok(vec![Line {
        what: "update reflected in a near-cache, p99".into(),
        baseline: format!("consumer commit -> visible p99 {api_p99:.1} ms"),
        ours: format!("near-cache with invalidations {near_p99:.1} ms"),
        ratio: Some(ratio),
        target: "<= 2x".into(),
        ok: Some(ratio <= 2.0),
    }])
}

/// redis GET requests/s at concurrency 16 (redis-benchmark), or None without redis.
fn redis_get_rate(keys: i64) -> Option<f64> {
    let server = which("redis-server")?;
    let bench = which("redis-benchmark")?;
    let port = free_port().to_string();
    let mut child = Command::new(server)
        .args(["--port", &port, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let run = |test: &str| {
        Command::new(&bench)
            .args([
                "-p",
                &port,
                "-t",
                test,
                "-n",
                "300000",
                "-c",
                "16",
                "-r",
                &keys.to_string(),
                "-d",
                "180",
                "--csv",
                "-q",
            ])
            .output()
            .ok()
    };
    run("set");
    let out = run("get");
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&out?.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("GET"))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

fn which(name: &str) -> Option<String> {
    let out = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// RSS per row: measured in a fresh child process per store, so allocations do not mix.
fn memory(rows: i64) -> Result<Vec<Line>> {
    let me = std::env::current_exe()?;
    let measure = |mode: &str| -> Result<f64> {
        let out = Command::new(&me).args(["--memory-child", mode, "--rows", &rows.to_string()]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().with_context(|| format!("memory child said {text:?}"))
    };
    let paged = measure("paged")?;
    let naive = measure("moka-per-row")?;
    println!("memory: paged store {paged:.0} B/row, moka one entry per row {naive:.0} B/row");
    Ok(vec![Line {
        what: format!("RSS per cached row at {} rows", k(rows as f64)),
        baseline: format!("moka, one entry per row: {naive:.0} B"),
        ours: format!("consumer store: {paged:.0} B"),
        ratio: Some(paged / naive),
        target: "<= 250 B".into(),
        ok: Some(paged <= 250.0),
    }])
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn memory_child(mode: &str, rows: i64) -> Result<()> {
    let registry = Registry::builtin()?;
    let contract = registry.contract("courier_performance")?;
    let plan = &contract.latest().row;
    let row_of = |g: i64, buf: &mut Vec<u8>| {
        buf.clear();
        let texts: Vec<Option<String>> = vec![
            Some(g.to_string()),
            Some(["Lisbon", "Porto", "Braga"][(g % 3) as usize].into()),
            Some(format!("z{}", g % 7)),
            Some(["bronze", "silver", "gold", "platinum"][(g % 4) as usize].into()),
            Some(format!("{}.{:02}", 3 + (g % 200) / 100, (g % 200) % 100)),
            Some((g % 500).to_string()),
            Some(format!("0.{}", 80 + g % 20)),
            (g % 2 == 0).then(|| "0.5".to_string()),
            Some("0".into()),
            Some("t".into()),
            (g % 5 == 0).then(|| format!("note {g}")),
            Some("2026-11-22 03:47:00.123456+00".into()),
        ];
        for (f, t) in plan.fields.iter().zip(&texts) {
            let _ = match t {
                Some(t) => f.write_text(buf, t.as_bytes()),
                None => f.write_null(buf),
            };
        }
    };
    let base = rss_bytes();
    let mut buf = Vec::with_capacity(256);
    let position = |g: i64| Position {
        lsn: Lsn(1_000_000 + g as u64),
        index: 0,
        txid: 1000 + g as u64,
        commit_ts_micros: 1_795_000_000_000_000,
        snapshot: false,
    };
    let used = match mode {
        "paged" => {
            let store = walcache_consumer::store::TableStore::new(8 << 30, 65_536, Duration::from_secs(86_400));
            for g in 1..=rows {
                row_of(g, &mut buf);
                let key = contract.key_from_text(&[&g.to_string()]).map_err(|e| anyhow::anyhow!("{e}"))?;
                store.apply(&key, &position(g), walcache_consumer::store::Change::Upsert(&buf), 0);
            }
            store.settle();
            let used = rss_bytes() - base;
            std::hint::black_box(&store);
            used
        }
        _ => {
            type Entry = Arc<(Position, Box<[u8]>)>;
            #[allow(clippy::borrowed_box)] // moka's weigher takes &K, and K is Box<[u8]>
            fn weigh(key: &Box<[u8]>, entry: &Entry) -> u32 {
                (key.len() + entry.1.len() + 64) as u32
            }
            let cache: moka::sync::Cache<Box<[u8]>, Entry> =
                moka::sync::Cache::builder().max_capacity(8 << 30).weigher(weigh).build();
            for g in 1..=rows {
                row_of(g, &mut buf);
                let key = contract.key_from_text(&[&g.to_string()]).map_err(|e| anyhow::anyhow!("{e}"))?;
                cache.insert(key.into_boxed_slice(), Arc::new((position(g), buf.clone().into_boxed_slice())));
            }
            cache.run_pending_tasks();
            let used = rss_bytes() - base;
            std::hint::black_box(&cache);
            used
        }
    };
    println!("{:.1}", used as f64 / rows as f64);
    Ok(())
}
