//! Chunked snapshots while streaming, against real Postgres and a real broker: a 200k-row
//! copy survives kill -9 at random points and continues where it was; a table added to a
//! running slot is copied without copying the first again; a key-range backfill under
//! concurrent writes leaves no key older than Postgres. The oracle is always Postgres, read
//! through Postgres (`contract_view_of`), against the topic folded by position.

use std::io::Write;
use std::time::Duration;

use walcache_schemas::Op;
use walcache_tests::events::{Event, check_order_per_key};
use walcache_tests::writer::{Writer, assert_all_on_topic};
use walcache_tests::{Pipeline, TestDb, binary, wait_for};

/// The log without its colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn snapshot_rows(events: &[Event]) -> usize {
    events.iter().filter(|e| e.op == Some(Op::Snapshot)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_200k_row_snapshot_continues_from_the_last_chunk_and_folds_to_the_table() {
    const ROWS: i64 = 200_000;
    let db = TestDb::create().await;
    db.seed(1, ROWS).await;
    let mut p = Pipeline::new(&db);
    // A kill repeats what was in flight and the chunks not yet delivered in order: at most
    // max_in_flight + 2 x parallelism x chunk_rows rows.
    p.max_in_flight = 5_000;
    p.extra_toml = "[snapshot]\nchunk_rows = 2000\nparallelism = 2\n".into();
    let mut producer = p.spawn();
    wait_for("the slot to exist", Duration::from_secs(60), || async { db.slot_confirmed(&p.slot).await.map(|_| ()) })
        .await;
    // Updates, inserts and deletes on the keys being copied, for the whole test.
    let writers = [
        Writer::start(&db, ROWS, 10_000_000, Duration::from_millis(1)).await,
        Writer::start(&db, ROWS, 20_000_000, Duration::from_millis(1)).await,
    ];
    let mut kills = 0;
    let mut last = p.topic_size().await;
    for _ in 0..3 {
        // A random point: after 15k to 45k more events on the topic.
        let step = 15_000 + (rand::random::<u64>() % 30_000) as i64;
        wait_for("the snapshot to move on", Duration::from_secs(120), || async {
            (p.topic_size().await >= last + step).then_some(())
        })
        .await;
        assert!(!producer.ready().await, "the kill should land mid-snapshot");
        producer.kill9();
        kills += 1;
        last = p.topic_size().await;
        producer = p.spawn();
    }
    producer.wait_ready(Duration::from_secs(300)).await;
    let log = plain(&producer.log());
    assert!(log.contains("resumed=true"), "the last start continued the copy: {log}");
    let mut committed = Vec::new();
    for writer in writers {
        committed.extend(writer.stop().await);
    }
    let events = p.converge_table(&p.topic, "courier_performance", Duration::from_secs(300)).await;
    assert_all_on_topic(&events, &committed);
    check_order_per_key(&events).expect("order per key");
    let copied = snapshot_rows(&events);
    eprintln!(
        "chunked snapshot: {ROWS} rows, {kills} kills -9, {copied} rows copied in total ({:.2}x), {} writes",
        copied as f64 / ROWS as f64,
        committed.len()
    );
    assert!(
        copied as f64 <= 1.2 * ROWS as f64,
        "{copied} rows copied for a {ROWS}-row table: the copy restarted instead of continuing"
    );
    producer.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_slot_is_copied_and_the_first_is_not_copied_again() {
    let db = TestDb::create().await;
    db.seed(1, 3_000).await;
    let mut p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    p.converge_table(&p.topic, "courier_performance", Duration::from_secs(60)).await;
    producer.stop().await.expect("clean drain");

    db.client()
        .await
        .batch_execute(
            "CREATE TABLE courier_performance_eu (LIKE courier_performance INCLUDING ALL); \
             INSERT INTO courier_performance_eu SELECT * FROM courier_performance WHERE courier_id <= 2500",
        )
        .await
        .expect("second table");
    let eu_topic = format!("{}.eu", p.prefix);
    p.extra_toml = format!(
        "[[tables]]\ntable = \"public.courier_performance_eu\"\ncontract = \"courier_performance\"\ntopic = \"{eu_topic}\"\n\
         [snapshot]\nchunk_rows = 500\n"
    );
    let producer = p.start_in_process();
    // Both tables change while the new one is copied.
    let pg = db.client().await;
    let writer = Writer::start(&db, 3_000, 10_000_000, Duration::from_millis(2)).await;
    pg.batch_execute("UPDATE courier_performance_eu SET deliveries = deliveries + 7 WHERE courier_id % 3 = 0")
        .await
        .expect("update the new table");
    let eu_events = p.converge_table(&eu_topic, "courier_performance_eu", Duration::from_secs(120)).await;
    pg.batch_execute("DELETE FROM courier_performance_eu WHERE courier_id <= 100").await.expect("delete");
    let committed = writer.stop().await;
    let eu_events = {
        let _ = eu_events;
        p.converge_table(&eu_topic, "courier_performance_eu", Duration::from_secs(60)).await
    };
    assert!(snapshot_rows(&eu_events) >= 2_400, "the new table's existing rows arrived as snapshot rows");
    let events = p.converge_table(&p.topic, "courier_performance", Duration::from_secs(60)).await;
    assert_all_on_topic(&events, &committed);
    assert_eq!(snapshot_rows(&events), 3_000, "the first table was copied once, at the slot's creation");
    assert_eq!(
        p.db.client()
            .await
            .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&p.slot])
            .await
            .expect("slots")
            .get::<_, i64>(0),
        1,
        "the slot was kept"
    );
    producer.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_range_backfill_under_concurrent_writes_leaves_no_key_older_than_postgres() {
    const ROWS: i64 = 20_000;
    let db = TestDb::create().await;
    db.seed(1, ROWS).await;
    let mut p = Pipeline::new(&db);
    p.extra_toml = "[snapshot]\nchunk_rows = 1000\nparallelism = 2\n".into();
    let mut producer = p.spawn();
    producer.wait_ready(Duration::from_secs(120)).await;
    let before = p.converge_table(&p.topic, "courier_performance", Duration::from_secs(120)).await;
    let initial = snapshot_rows(&before);
    assert_eq!(initial, ROWS as usize);

    // Writers hammer the same keys the backfill copies.
    let writers = [
        Writer::start(&db, ROWS, 10_000_000, Duration::ZERO).await,
        Writer::start(&db, ROWS, 20_000_000, Duration::ZERO).await,
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("producer.toml");
    std::fs::File::create(&config).and_then(|mut f| f.write_all(p.toml(0).as_bytes())).expect("config");
    let run = |args: &[&str]| {
        std::process::Command::new(binary("walcache-producer"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("run walcache-producer")
    };
    let wrong = run(&["backfill", "--table", "public.courier_performance", "--from-key", "1", "2"]);
    assert!(!wrong.status.success(), "a key with two values for a one-column key is refused");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("key has 1 column"), "{wrong:?}");
    let out = run(&["backfill", "--table", "public.courier_performance", "--from-key", "5000", "--to-key", "15000"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("requested"), "{out:?}");
    wait_for("the backfill to complete", Duration::from_secs(180), || async {
        producer.log().lines().any(|l| l.contains("snapshot job complete") && l.contains("Backfill")).then_some(())
    })
    .await;
    // `status` reads the job state the producer last delivered to the snapshots topic, which
    // trails the log line by whatever the producer still has queued for Kafka (the writers keep
    // it busy): it must catch up, not agree at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = run(&["status"]);
        assert!(status.status.success(), "{status:?}");
        let report = String::from_utf8_lossy(&status.stdout).into_owned();
        if report.contains("no snapshot or backfill running") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the delivered job state never showed the backfill done: {report}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut committed = Vec::new();
    for writer in writers {
        committed.extend(writer.stop().await);
    }
    // No key ends older than Postgres: the topic folds to the table, and every write is there.
    let events = p.converge_table(&p.topic, "courier_performance", Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &committed);
    check_order_per_key(&events).expect("order per key");
    let initial_chunks: std::collections::HashSet<_> =
        before.iter().filter(|e| e.op == Some(Op::Snapshot)).filter_map(|e| e.position.map(|p| p.lsn)).collect();
    let backfilled: Vec<i64> = events
        .iter()
        .filter(|e| e.op == Some(Op::Snapshot) && e.position.is_some_and(|p| !initial_chunks.contains(&p.lsn)))
        .filter_map(|e| e.key)
        .collect();
    assert!(!backfilled.is_empty(), "the backfill copied rows");
    assert!(backfilled.iter().all(|k| (5_000..=15_000).contains(k)), "the backfill stayed in its key range");
    // Keys the writers changed while their chunk was copied were left to the stream.
    assert!(backfilled.len() <= 10_001, "{} rows for 10001 keys", backfilled.len());
    producer.terminate(Duration::from_secs(30));
}
