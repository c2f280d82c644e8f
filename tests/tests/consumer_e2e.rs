//! The consumer against real Postgres, the real producer and a real broker.

use std::time::Duration;

use serde_json::{Value as Json, json};
use walcache_common::dead_letter::{DeadLetter, Stage};
use walcache_schemas::Lsn;
use walcache_tests::consumer::TestConsumer;
use walcache_tests::kafka::{produce, read_all};
use walcache_tests::{Pipeline, TestDb, wait_for};

/// Waits for the view to equal the table. A busy machine may take minutes to carry a large
/// transaction through the pipeline, so the bound is on a minute without progress (the view
/// not changing), not on the whole wait: a view that stops short of the table still fails.
async fn wait_view_matches_table(c: &TestConsumer, db: &TestDb) {
    const STALL: Duration = Duration::from_secs(60);
    const CAP: Duration = Duration::from_secs(600);
    let started = std::time::Instant::now();
    let (mut last, mut changed_at) = (None, started);
    loop {
        let view = c.present_rows().await;
        let table = db.contract_view().await;
        if view == table {
            eprintln!("the view reached the table in {:?}", started.elapsed());
            return;
        }
        if last.as_ref() != Some(&view) {
            changed_at = std::time::Instant::now();
        } else if changed_at.elapsed() > STALL || started.elapsed() > CAP {
            let extra: Vec<i64> = view.keys().filter(|k| !table.contains_key(k)).take(3).copied().collect();
            let missing: Vec<i64> = table.keys().filter(|k| !view.contains_key(k)).take(3).copied().collect();
            let stale: Vec<i64> =
                table.iter().filter(|(k, v)| view.get(k).is_some_and(|w| w != *v)).map(|(k, _)| *k).take(3).collect();
            let mut answers = Vec::new();
            for key in extra.iter().chain(&missing).chain(&stale) {
                answers.push(format!("{key}: {}", c.row(*key).await.1));
            }
            let diff = format!(
                "view {} rows, table {} rows; extra {extra:?}, missing {missing:?}, different {stale:?}; the view's answers:\n{}",
                view.len(),
                table.len(),
                answers.join("\n")
            );
            panic!(
                "the view did not reach the table (no change for {:?}, {:?} in all): {diff}\n{}",
                changed_at.elapsed(),
                started.elapsed(),
                topic_history(c, &diff).await
            );
        }
        last = Some(view);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the topic holds for the first keys named in `diff` (partition, offset, position,
/// tombstone or row): tells a lost event from one the view mis-applied.
async fn topic_history(c: &TestConsumer, diff: &str) -> String {
    let keys: Vec<i64> = diff.lines().skip(1).filter_map(|l| l.split(':').next()?.trim().parse().ok()).collect();
    let records = read_all(&c.kafka, &c.topic).await;
    let mut out = String::new();
    for key in keys {
        // An Avro long key: zigzag varint, at the end of the single-object encoding.
        let mut z = ((key << 1) ^ (key >> 63)) as u64;
        let mut body = Vec::new();
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                body.push(byte);
                break;
            }
            body.push(byte | 0x80);
        }
        out.push_str(&format!("key {key}:\n"));
        for r in records
            .iter()
            .filter(|r| r.key.as_deref().is_some_and(|k| k.len() == 10 + body.len() && k.ends_with(&body)))
        {
            let position = r.position_header.as_deref().and_then(walcache_schemas::Position::from_header);
            out.push_str(&format!(
                "  p{} @{} {} {:?}\n",
                r.partition,
                r.offset,
                if r.value.is_some() { "row" } else { "tombstone" },
                position
            ));
        }
    }
    out
}

async fn commit_lsn(client: &tokio_postgres::Client) -> Lsn {
    let text: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    text.parse().expect("lsn")
}

/// While a table's first copy runs, no watermark vouches for it: a key the copy has not
/// delivered yet exists in Postgres, so "absent" would be a lie. It reads unknown
/// (`not_covered`) until the copy completes, then absent or present as the table says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_first_copy_has_not_reached_reads_unknown_never_absent() {
    let db = TestDb::create().await;
    db.seed(1, 150_000).await;
    let mut p = Pipeline::new(&db);
    // Many small chunks, one at a time: the copy takes long enough to be read during it.
    p.extra_toml = "[snapshot]\nchunk_rows = 500\nparallelism = 1\n".into();
    let producer = p.start_in_process();
    let c = p.start_consumer("").await;
    let (last_key, never) = (150_000, 9_000_000);
    let mut not_covered = 0;
    while !producer.health.is_ready() {
        for key in [last_key, never] {
            let (status, body) = c.row(key).await;
            match (status, body["state"].as_str()) {
                (503, _) => {}
                // 409: the cache cannot vouch; the caller falls back to the source.
                (409, Some("unknown")) => {
                    assert_eq!(body["reason"], "not_covered", "{body}");
                    not_covered += 1;
                }
                (200, Some("present")) if key == last_key => {}
                other => panic!("key {key} during the first copy read {other:?}: {body}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(not_covered > 0, "the consumer answered during the copy, with unknown/not_covered");
    wait_for("the copy to be covered", Duration::from_secs(120), || async {
        let (_, body) = c.row(never).await;
        (body["state"] == "absent").then_some(())
    })
    .await;
    let (status, body) = c.row(last_key).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("present")), "{body}");
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_appear_with_their_as_of_and_read_your_writes_works() {
    let db = TestDb::create().await;
    db.seed(1, 300).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(30)).await;
    wait_view_matches_table(&c, &db).await;

    // A snapshot row: present, as of the snapshot, with the view's watermark.
    let (status, body) = c.row(7).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "present");
    assert_eq!(body["value"]["courier_id"], 7);
    assert_eq!(body["as_of"]["row_txid"], 0);
    assert!(body["as_of"]["view_lsn"].is_string() && body["staleness_ms"].is_number(), "{body}");

    // Read your writes: commit, take the LSN, ask for it.
    let client = db.client().await;
    client.execute("UPDATE courier_performance SET deliveries = 4242 WHERE courier_id = 7", &[]).await.expect("update");
    let lsn = commit_lsn(&client).await;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/7?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["value"]["deliveries"], 4242, "min_lsn must return the committed value: {body}");
    let row_lsn: Lsn = body["as_of"]["row_lsn"].as_str().expect("row lsn").parse().expect("lsn");
    let view_lsn: Lsn = body["as_of"]["view_lsn"].as_str().expect("view lsn").parse().expect("lsn");
    assert!(row_lsn < lsn && view_lsn >= lsn, "row {row_lsn}, view {view_lsn}, asked {lsn}");
    let committed: String =
        client.query_one("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')", &[]).await.expect("date").get(0);
    assert!(body["as_of"]["row_commit_time"].as_str().is_some_and(|t| t.starts_with(&committed)));

    // Batch, with a delete among the keys.
    client.execute("DELETE FROM courier_performance WHERE courier_id = 8", &[]).await.expect("delete");
    let lsn = commit_lsn(&client).await;
    let (status, body) = c
        .post(
            "/v1/tables/courier_performance/batch",
            &json!({ "keys": [7, 8, 100000], "min_lsn": lsn.to_string(), "wait_ms": 30000 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let states: Vec<&str> =
        body["results"].as_array().expect("results").iter().map(|r| r["state"].as_str().unwrap_or("")).collect();
    assert_eq!(states, vec!["present", "deleted", "absent"]);
    assert!(body["results"][1]["as_of"]["row_lsn"].is_string(), "a deleted key says when it was deleted");
    let (status, body) = c.row(8).await;
    assert_eq!((status, body["state"].as_str()), (404, Some("deleted")));

    // Staleness: on an idle database the producer's heartbeats keep moving the view past the
    // last write, again and again, so a bounded-staleness read is answered from the cache.
    let mut passed = lsn;
    for beat in 0..2 {
        passed = wait_for("a heartbeat to move the view on", Duration::from_secs(30), || async {
            let (status, body) = c.get("/v1/tables/courier_performance/rows/7?max_staleness_ms=2000").await;
            let view: Lsn = body["as_of"]["view_lsn"].as_str()?.parse().ok()?;
            (status == 200 && view > passed).then_some(view)
        })
        .await;
        assert!(passed > lsn, "heartbeat {beat} moved the view past the last write");
    }

    // A truncate empties the table in the view.
    client.batch_execute("TRUNCATE courier_performance").await.expect("truncate");
    let lsn = commit_lsn(&client).await;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/7?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!((status, body["state"].as_str()), (404, Some("absent")), "{body}");

    // Metrics moved.
    assert!(c.metrics.applied.with_label_values(&["courier_performance", "snapshot"]).get() >= 300);
    assert!(c.metrics.commit_to_apply_seconds.get_sample_count() >= 2);
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_duplicates_leave_the_view_identical_and_a_restart_rebuilds_it() {
    let db = TestDb::create().await;
    db.seed(1, 40_000).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let client = db.client().await;
    client
        .batch_execute(
            "UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id % 3 = 0;
             DELETE FROM courier_performance WHERE courier_id % 11 = 0;
             UPDATE courier_performance SET rating = 4.99 WHERE courier_id % 5 = 0;",
        )
        .await
        .expect("changes");
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(60)).await;
    wait_view_matches_table(&c, &db).await;
    let before = c.export().await;

    // Re-deliver a whole range of old events (and their tombstones) at the end of the topic.
    let records = read_all(&p.kafka, &p.topic).await;
    let replay: Vec<_> = records.iter().filter(|r| r.partition == 0).take(5_000).collect();
    futures::future::join_all(replay.iter().map(|r| produce_with_header(&p.kafka, &p.topic, r))).await;
    let target: i64 = walcache_tests::kafka::high_watermarks(&p.kafka, &p.topic).await.iter().map(|(_, h)| h).sum();
    wait_for("the consumer to read the replay", Duration::from_secs(60), || async {
        let (_, status) = c.get("/v1/status").await;
        let read: i64 = status["partitions"]
            .as_array()?
            .iter()
            .filter(|p| p["topic"] == json!(p_topic(&status)))
            .map(|p| p["next_offset"].as_i64().unwrap_or(0))
            .sum();
        (read >= target).then_some(())
    })
    .await;
    let after = c.export().await;
    assert_eq!(before, after, "replayed events change nothing");
    assert!(
        c.metrics.ignored.with_label_values(&["courier_performance", "not_newer"]).get() >= replay.len() as u64 / 2
    );
    c.stop().await;

    // A new instance rebuilds the same view; until it has, it answers 503 not_ready.
    let again = p.start_consumer("").await;
    let (status, body) = again.row(1).await;
    if !again.running.view.is_ready() {
        assert_eq!((status, body["error"].as_str()), (503, Some("not_ready")), "{body}");
    }
    again.wait_ready(Duration::from_secs(60)).await;
    assert_eq!(again.export().await, before, "a restart rebuilds the same view from the compacted topic");

    // A consumer with too little memory evicts, and says unknown rather than absent.
    let small = p.start_consumer("[cache]\ncapacity = \"1MiB\"\npages = 4096\ndelete_retention = \"1h\"").await;
    small.wait_ready(Duration::from_secs(60)).await;
    small.running.view.tables[0].store.settle();
    let (_, status) = small.get("/v1/status").await;
    assert!(status["tables"][0]["evicted_rows"].as_i64().unwrap_or(0) > 0, "{status}");
    let mut unknown = 0;
    for key in (1..40_000).step_by(97) {
        let (_, body) = small.row(key).await;
        let state = body["state"].as_str().unwrap_or_default().to_string();
        let exists = before.get(&key).is_some_and(|(s, _, _)| s == "present");
        if exists {
            assert_ne!(state, "absent", "key {key} exists: after evictions it may be unknown, never absent");
        }
        unknown += usize::from(state == "unknown");
    }
    assert!(unknown > 0, "some evicted keys read as unknown");
    small.stop().await;
    again.stop().await;
    producer.stop().await.expect("drain");
}

fn p_topic(status: &Json) -> String {
    status["tables"][0]["topic"].as_str().unwrap_or_default().to_string()
}

async fn produce_with_header(kafka: &str, topic: &str, r: &walcache_tests::kafka::Record) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    thread_local! {
        static PRODUCERS: std::cell::RefCell<std::collections::HashMap<String, FutureProducer>> = Default::default();
    }
    let producer = PRODUCERS.with(|p| {
        p.borrow_mut()
            .entry(kafka.to_string())
            .or_insert_with(|| {
                rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", kafka)
                    .set("acks", "all")
                    .create()
                    .expect("producer")
            })
            .clone()
    });
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).partition(r.partition);
    if let Some(k) = &r.key {
        rec = rec.key(k);
    }
    if let Some(v) = &r.value {
        rec = rec.payload(v);
    }
    if let Some(h) = &r.position_header {
        rec = rec.headers(
            OwnedHeaders::new().insert(Header { key: walcache_schemas::POSITION_HEADER, value: Some(&h[..]) }),
        );
    }
    producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_schemas_are_dead_lettered_once_and_the_consumer_keeps_serving() {
    let db = TestDb::create().await;
    db.seed(1, 50).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(30)).await;
    wait_view_matches_table(&c, &db).await;

    let registry = walcache_schemas::Registry::builtin().expect("registry");
    let contract = registry.contract("courier_performance").expect("contract");
    let key5 = contract.key_message(&contract.key_from_text(&["5"]).expect("key"));
    let records = read_all(&p.kafka, &p.topic).await;
    let valid_for_6 = records
        .iter()
        .find(|r| {
            r.value.is_some()
                && r.key.as_deref().is_some_and(|k| {
                    registry.decode_key(contract, k).ok() == Some(&contract.key_from_text(&["6"]).expect("key")[..])
                })
        })
        .expect("key 6 on the topic");
    let mut unknown = walcache_schemas::framing::header(0x0123_4567_89AB_CDEF).to_vec();
    unknown.extend_from_slice(b"\x02\x00\x00");
    produce(&p.kafka, &p.topic, Some(0), Some(&key5), Some(b"not avro at all")).await;
    produce(&p.kafka, &p.topic, Some(0), Some(&key5), Some(&unknown)).await;
    produce(&p.kafka, &p.topic, Some(valid_for_6.partition), Some(&key5), valid_for_6.value.as_deref()).await;

    let consumer_letters = || async {
        read_all(&p.kafka, &p.dead_letter)
            .await
            .iter()
            .filter_map(|r| serde_json::from_slice::<DeadLetter>(r.value.as_deref()?).ok())
            .filter(|l| l.stage == Stage::Consumer)
            .collect::<Vec<_>>()
    };
    let letters = wait_for("three consumer dead letters", Duration::from_secs(30), || async {
        let l = consumer_letters().await;
        (l.len() >= 3).then_some(l)
    })
    .await;
    let mut codes: Vec<&str> = letters.iter().map(|l| l.reason_code.as_str()).collect();
    codes.sort_unstable();
    assert_eq!(codes, vec!["key_mismatch", "not_single_object", "unknown_schema"]);
    assert!(letters.iter().all(|l| l.origin.is_some() && l.raw_value_base64.is_some()));
    assert_eq!(c.running.view.dead_letters.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(c.metrics.dead_letters.with_label_values(&["unknown_schema"]).get(), 1);

    // Key 5 had changes the view could not read: it cannot vouch for its old row any more.
    let (status, body) = c.row(5).await;
    assert_eq!((status, body["state"].as_str()), (409, Some("unknown")), "{body}");
    assert_eq!(body["reason"], "key_mismatch", "the last unreadable change says why: {body}");
    // Still serving, still applying: a newer valid change makes it present again.
    let client = db.client().await;
    client.execute("UPDATE courier_performance SET deliveries = 777 WHERE courier_id = 5", &[]).await.expect("update");
    let lsn = commit_lsn(&client).await;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/5?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!((status, body["value"]["deliveries"].as_i64()), (200, Some(777)), "{body}");
    let (_, body) = c.row(6).await;
    assert_eq!(body["value"]["courier_id"], 6, "the mismatched copy did not touch key 6");

    // An event without a key cannot be set aside per key: stepping over it could leave any key
    // old, so the view stops there and says so.
    produce(&p.kafka, &p.topic, Some(1), None, valid_for_6.value.as_deref()).await;
    wait_for("the keyless event to block the view", Duration::from_secs(30), || async {
        (consumer_letters().await.len() >= 4).then_some(())
    })
    .await;
    let (status, body) = wait_for("the view to say it is blocked", Duration::from_secs(30), || async {
        let (status, body) = c.row(6).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!((status, body["error"].as_str()), (503, Some("blocked")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("missing_key")), "{body}");
    let (status, body) = c.get("/v1/status").await;
    assert_eq!((status, body["ready"].as_bool()), (200, Some(false)), "{body}");
    assert_eq!(body["blocked"]["partition"], 1, "{body}");
    let (status, _) = c.get("/readyz").await;
    assert_eq!(status, 503, "a blocked view is not ready");
    c.stop().await;

    // A restart reads the garbage again but does not report it twice, and blocks again.
    let again = p.start_consumer("").await;
    again.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(again.running.view.dead_letters.load(std::sync::atomic::Ordering::Relaxed), 4, "counted again");
    assert!(again.running.view.blocked().is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(consumer_letters().await.len(), 4, "published once per message, across restarts");
    again.stop().await;
    producer.stop().await.expect("drain");
}

/// The producer's own dead letters (reason codes by courier id).
async fn producer_letters(p: &Pipeline) -> Vec<(i64, String)> {
    read_all(&p.kafka, &p.dead_letter)
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<DeadLetter>(r.value.as_deref()?).ok())
        .filter(|l| l.stage == Stage::Producer)
        .filter_map(|l| {
            // The key as Postgres printed it (text), as the dead letter keeps it.
            let id = l.key.as_ref()?.get("courier_id")?;
            let id = id.as_i64().or_else(|| id.as_str()?.parse().ok())?;
            Some((id, l.reason_code))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_set_aside_upstream_reads_unknown_never_the_old_row_as_current() {
    let db = TestDb::create().await;
    db.seed(1, 20).await;
    let client = db.client().await;
    // A row that breaks the contract before the snapshot copies it.
    client.execute("UPDATE courier_performance SET rating = NULL WHERE courier_id = 7", &[]).await.expect("break 7");
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let lsn = commit_lsn(&client).await;
    let (status, held) = c.get(&format!("/v1/tables/courier_performance/rows/5?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!(status, 200, "{held}");

    // An update that breaks the contract: set aside by the producer.
    client
        .execute("UPDATE courier_performance SET rating = NULL, deliveries = 999 WHERE courier_id = 5", &[])
        .await
        .expect("break 5");
    let lsn = commit_lsn(&client).await;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/5?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!((status, body["state"].as_str()), (409, Some("unknown")), "never the old row as current: {body}");
    assert!(body["value"].is_null(), "{body}");
    let letters = producer_letters(&p).await;
    let code_of = |id: i64| letters.iter().find(|(k, _)| *k == id).map(|(_, c)| c.clone()).expect("a dead letter");
    assert_eq!(body["reason"].as_str(), Some(code_of(5).as_str()), "the answer says why: {body}");
    let old_lsn: Lsn = held["as_of"]["row_lsn"].as_str().expect("lsn").parse().expect("lsn");
    let new_lsn: Lsn = body["as_of"]["row_lsn"].as_str().expect("the change's position").parse().expect("lsn");
    assert!(new_lsn > old_lsn && new_lsn <= lsn, "unknown from the set-aside change's position on: {body}");

    // A snapshot row that broke the contract is unknown too, not absent (which is final).
    let (status, body) = c.row(7).await;
    assert_eq!((status, body["state"].as_str()), (409, Some("unknown")), "{body}");
    assert_eq!(body["reason"].as_str(), Some(code_of(7).as_str()));
    let (_, status) = c.get("/v1/status").await;
    assert_eq!(status["tables"][0]["unknown"], 2, "{status}");

    // A restart rebuilds the same from the compacted topic: the markers are on it.
    let again = p.start_consumer("").await;
    again.wait_ready(Duration::from_secs(30)).await;
    for key in [5, 7] {
        let (status, body) = again.row(key).await;
        assert_eq!((status, body["state"].as_str()), (409, Some("unknown")), "key {key} after a restart: {body}");
    }
    again.stop().await;

    // Repaired at the source: the newer valid change is served again.
    client.execute("UPDATE courier_performance SET rating = 4.5 WHERE courier_id IN (5, 7)", &[]).await.expect("fix");
    let lsn = commit_lsn(&client).await;
    for (key, deliveries) in [(5, Some(999)), (7, None)] {
        let (status, body) =
            c.get(&format!("/v1/tables/courier_performance/rows/{key}?min_lsn={lsn}&wait_ms=30000")).await;
        assert_eq!((status, body["state"].as_str()), (200, Some("present")), "{body}");
        if let Some(d) = deliveries {
            assert_eq!(body["value"]["deliveries"], d);
        }
    }
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_partitions_do_not_hold_coverage_back() {
    let db = TestDb::create().await;
    db.seed(1, 3).await;
    let mut p = Pipeline::new(&db);
    p.partitions = 6;
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let empty =
        walcache_tests::kafka::high_watermarks(&p.kafka, &p.topic).await.iter().filter(|(_, h)| *h == 0).count();
    assert!(empty > 0, "3 rows on 6 partitions leave some empty");
    let client = db.client().await;
    client.execute("UPDATE courier_performance SET deliveries = 31 WHERE courier_id = 2", &[]).await.expect("update");
    let lsn = commit_lsn(&client).await;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/2?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!((status, body["value"]["deliveries"].as_i64()), (200, Some(31)), "{body}");
    let (status, body) = c.get("/v1/tables/courier_performance/rows/2?max_staleness_ms=5000").await;
    assert_eq!(status, 200, "{body}");
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_producers_watermarks_never_cover_this_table() {
    let db = TestDb::create().await;
    db.seed(1, 10).await;
    let other_db = TestDb::create().await;
    other_db.seed(1, 10).await;
    let p = Pipeline::new(&db);
    // A second producer on another database, sharing the watermark topic (as the default
    // `walcache.watermarks` would).
    let mut other = Pipeline::new(&other_db);
    other.watermarks = p.watermarks.clone();
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let other_producer = other.start_in_process();
    other_producer.wait_ready(Duration::from_secs(60)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let client = db.client().await;
    let lsn = commit_lsn(&client).await;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/3?min_lsn={lsn}&wait_ms=30000")).await;
    assert_eq!(status, 200, "{body}");

    // This table's producer stops; the other keeps writing heartbeats with later LSNs (one
    // cluster, one WAL). A change here is not in the view, and nothing may say it is.
    producer.stop().await.expect("drain");
    client.execute("UPDATE courier_performance SET deliveries = 55 WHERE courier_id = 3", &[]).await.expect("update");
    let lsn = commit_lsn(&client).await;
    let other_client = other_db.client().await;
    other_client
        .execute("UPDATE courier_performance SET deliveries = 1 WHERE courier_id = 1", &[])
        .await
        .expect("other");
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/3?min_lsn={lsn}&wait_ms=3000")).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("min_lsn_not_reached")), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = c.get("/v1/tables/courier_performance/rows/3?max_staleness_ms=1500").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("too_stale")), "a stopped producer's table ages: {body}");
    let (_, status) = c.get("/v1/status").await;
    assert!(status["tables"][0]["producer"].is_string(), "{status}");
    c.stop().await;
    other_producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_started_before_its_topics_waits_for_them() {
    let db = TestDb::create().await;
    db.seed(1, 5).await;
    let p = Pipeline::new(&db);
    let c = p.start_consumer("").await;
    let (status, body) = wait_for("the consumer to say what it waits for", Duration::from_secs(30), || async {
        let (status, body) = c.get("/readyz").await;
        body.to_string().contains("does not exist yet").then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!c.running.applier_finished(), "the consumer keeps waiting instead of exiting");
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    c.wait_ready(Duration::from_secs(60)).await;
    wait_view_matches_table(&c, &db).await;
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_limits_are_refused_not_queued() {
    let db = TestDb::create().await;
    db.seed(1, 5).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let far = Lsn(commit_lsn(&db.client().await).await.0 + (1 << 40));
    let waiting_read = format!("/v1/tables/courier_performance/rows/1?min_lsn={far}&wait_ms=10000");

    // One request in flight at most: a second one is shed at once with 503 overloaded.
    let one = std::sync::Arc::new(p.start_consumer("max_concurrent_requests = 1").await);
    one.wait_ready(Duration::from_secs(30)).await;
    let waiter = tokio::spawn({
        let (one, path) = (one.clone(), waiting_read.clone());
        async move { one.get(&path).await }
    });
    let (status, body) = wait_for("a request to be shed", Duration::from_secs(30), || async {
        let (status, body) = one.row(1).await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!((status, body["error"].as_str()), (503, Some("overloaded")), "{body}");
    let (status, body) = waiter.await.expect("waiter");
    assert_eq!((status, body["error"].as_str()), (503, Some("min_lsn_not_reached")), "{body}");
    assert_eq!(one.row(1).await.0, 200, "served again once the slot is free");

    // One min_lsn read waiting at most; reads that need no wait still go through.
    let c = p.start_consumer("max_waiting = 1").await;
    c.wait_ready(Duration::from_secs(30)).await;
    let (first, second) = tokio::join!(c.get(&waiting_read), async {
        wait_for("the first read to wait", Duration::from_secs(30), || async {
            (c.running.view.tables[0].waiting_readers() >= 1).then_some(())
        })
        .await;
        let second = c.get(&waiting_read).await;
        let plain = c.row(1).await;
        (second, plain)
    });
    assert_eq!(first.1["error"], "min_lsn_not_reached", "{}", first.1);
    let ((status, body), (plain, _)) = second;
    assert_eq!((status, body["error"].as_str()), (503, Some("too_many_waiting")), "{body}");
    assert_eq!(plain, 200);
    c.stop().await;
    if let Ok(one) = std::sync::Arc::try_unwrap(one) {
        one.stop().await;
    }
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_json_4xx_and_the_token_is_required() {
    let db = TestDb::create().await;
    db.seed(1, 10).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let mut c =
        p.start_consumer("auth_token = \"s3cret-token\"\nexport_token = \"export-token\"\nmax_body_bytes = 4096").await;
    c.wait_ready(Duration::from_secs(30)).await;

    let (status, body) = c.row(1).await;
    assert_eq!(status, 200, "with the token: {body}");
    let token = c.token.take();
    let (status, body) = c.row(1).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    c.token = Some("wrong".into());
    assert_eq!(c.row(1).await.0, 401);
    c.token = token;
    let (status, _) = c.get("/healthz").await;
    assert_eq!(status, 200, "probes need no token");
    // A whole table needs its own token: a payment service's read token cannot dump it.
    let (status, body) = c.get("/v1/tables/courier_performance/export").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")), "{body}");
    let read_token = c.token.replace("export-token".into());
    assert_eq!(c.export().await.len(), 10, "with the export token");
    c.token = read_token;
    let big = json!({ "keys": vec![1; 3_000] });
    let (status, _) = c.post("/v1/tables/courier_performance/batch", &big).await;
    assert_eq!(status, 413, "a body over http.max_body_bytes");

    let cases: Vec<(u16, &str, (u16, Json))> = vec![
        (400, "bad_key", c.get("/v1/tables/courier_performance/rows/not-a-number").await),
        (404, "unknown_table", c.get("/v1/tables/drivers/rows/1").await),
        (400, "bad_min_lsn", c.get("/v1/tables/courier_performance/rows/1?min_lsn=yesterday").await),
        (400, "bad_query", c.get("/v1/tables/courier_performance/rows/1?colour=red").await),
        (
            413,
            "batch_too_large",
            c.post("/v1/tables/courier_performance/batch", &json!({ "keys": (0..101).collect::<Vec<_>>() })).await,
        ),
        (400, "bad_key", c.post("/v1/tables/courier_performance/batch", &json!({ "keys": [1, "x"] })).await),
        (400, "bad_request", c.post("/v1/tables/courier_performance/batch", &json!({ "kees": [1] })).await),
        (404, "not_found", c.get("/v2/whatever").await),
    ];
    for (want, code, (status, body)) in cases {
        assert_eq!((status, body["error"].as_str()), (want, Some(code)), "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    let (status, body) = c.get("/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["ready"], true);
    assert!(body["partitions"].as_array().is_some_and(|p| p.len() == 4), "{body}");
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_error_while_serving_resumes_where_it_was_and_coverage_never_moves_back() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let db = TestDb::create().await;
    db.seed(1, 2_000).await;
    let p = Pipeline::with_kafka(&db, &mock.bootstrap_servers());
    for (topic, partitions) in p.topics() {
        mock.create_topic(topic, partitions, 1).expect("mock topic");
    }
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(60)).await;
    wait_view_matches_table(&c, &db).await;
    let view_lsn = |status: &Json| status["view"]["view_lsn"].as_str().and_then(|s| s.parse::<Lsn>().ok());
    let (_, status) = c.get("/v1/status").await;
    let mut highest = view_lsn(&status).expect("a view lsn");
    let not_newer = || c.metrics.ignored.with_label_values(&["courier_performance", "not_newer"]).get();
    let ignored_before = not_newer();

    // Fetches fail with an error librdkafka hands to the application: the reading session ends.
    mock.request_errors(RDKafkaApiKey::Fetch, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3]);
    let client = db.client().await;
    client.execute("UPDATE courier_performance SET deliveries = 9 WHERE courier_id = 9", &[]).await.expect("update");
    let lsn = commit_lsn(&client).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = c.get("/v1/status").await;
        if let Some(now) = view_lsn(&status) {
            assert!(now >= highest, "coverage moved back from {highest} to {now}");
            highest = now;
        }
        if highest >= lsn {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the view never got past the fetch errors");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = c.row(9).await;
    assert_eq!((status, body["value"]["deliveries"].as_i64()), (200, Some(9)), "{body}");
    assert!(
        not_newer() - ignored_before < 100,
        "a reconnect re-read the topics from the start ({} events seen again)",
        not_newer() - ignored_before
    );
    c.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_export_client_holds_up_neither_the_applier_nor_reads() {
    let db = TestDb::create().await;
    db.seed(1, 60_000).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(120)).await;
    let c = p.start_consumer("").await;
    c.wait_ready(Duration::from_secs(120)).await;
    wait_view_matches_table(&c, &db).await;
    // An export whose client reads nothing: its ~15 MB fill every buffer and the server waits.
    let stalled = reqwest::Client::new()
        .get(format!("{}/v1/tables/courier_performance/export", c.base))
        .send()
        .await
        .expect("export starts");
    assert_eq!(stalled.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every page changes meanwhile: whichever page the export is stuck in, the applier must
    // write it, and reads must see the result.
    let client = db.client().await;
    client.execute("UPDATE courier_performance SET deliveries = deliveries + 1", &[]).await.expect("update all");
    let lsn = commit_lsn(&client).await;
    let expected = db.courier(59_999).await.expect("row").deliveries;
    let (status, body) = c.get(&format!("/v1/tables/courier_performance/rows/59999?min_lsn={lsn}&wait_ms=60000")).await;
    assert_eq!((status, body["value"]["deliveries"].as_i64()), (200, Some(i64::from(expected))), "{body}");
    drop(stalled);
    c.stop().await;
    producer.stop().await.expect("drain");
}

/// Events of a server-sent event stream, as JSON, read on demand.
struct EventStream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl EventStream {
    fn new(response: reqwest::Response) -> EventStream {
        EventStream { body: Box::pin(response.bytes_stream()), buffer: String::new() }
    }

    /// The next event's data (keep-alive comments skipped); None when the stream ended.
    async fn next(&mut self) -> Option<Json> {
        use futures::StreamExt;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data: String = event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
                if !data.is_empty() {
                    return Some(serde_json::from_str(&data).expect("an event's data is JSON"));
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("an event within a minute")?
                .expect("the stream reads");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn metric(c: &TestConsumer, name: &str) -> f64 {
    let text = c.request(reqwest::Method::GET, "/metrics").send().await.expect("metrics").text().await.expect("text");
    walcache_tests::metric_in(&text, name).unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// The invalidation stream near-caches follow: hello, then each table's coverage, then key
/// events in apply order; streams are bounded and counted; a reader that falls further behind
/// than the stream's backlog gets a reset (drop everything), never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidation_stream_is_bounded_and_resets_a_reader_that_falls_behind() {
    // More key changes in one transaction than the backlog and the socket buffers of a reader
    // that stopped reading can hold (on loopback the consumer's send buffer grows to 4 MiB,
    // about 48,000 events).
    const ROWS: i64 = 60_000;
    let (p, producer) = Pipeline::streaming(ROWS).await;
    let c = p.start_consumer("max_invalidation_streams = 1\ninvalidation_backlog = 1024").await;
    c.wait_ready(Duration::from_secs(120)).await;
    let pg = p.db.client().await;
    let open = || c.request(reqwest::Method::GET, "/v1/invalidations").send();

    let applied_of = |event: &Json| -> Option<Lsn> { event["applied"]["courier_performance"].as_str()?.parse().ok() };
    let seeded = commit_lsn(&pg).await;
    let mut slow = EventStream::new(open().await.expect("stream"));
    let hello = slow.next().await.expect("hello");
    assert_eq!(hello["type"], "hello");
    // What the stream will not list: the changes applied before it began (the copy's rows).
    assert!(applied_of(&hello).is_some_and(|a| a.0 > 0 && a <= seeded), "{hello}");
    let coverage = slow.next().await.expect("coverage");
    assert_eq!(
        (coverage["type"].as_str(), coverage["table"].as_str()),
        (Some("coverage"), Some("courier_performance"))
    );
    assert_eq!(metric(&c, "walcache_consumer_invalidation_streams").await, 1.0);
    let refused = open().await.expect("second stream");
    assert_eq!(refused.status().as_u16(), 503);
    let body: Json = refused.json().await.expect("JSON error");
    assert_eq!(body["error"], "too_many_streams", "{body}");

    // A key change first, read promptly: its event comes with the key and the change's LSN.
    pg.execute("UPDATE courier_performance SET deliveries = 4242 WHERE courier_id = 7", &[]).await.expect("update");
    let one = commit_lsn(&pg).await;
    let key_event = loop {
        let event = slow.next().await.expect("the stream goes on");
        if event["type"] == "key" {
            break event;
        }
    };
    assert_eq!((key_event["table"].as_str(), key_event["key"].as_str()), (Some("courier_performance"), Some("7")));
    let event_lsn: Lsn = key_event["lsn"].as_str().and_then(|l| l.parse().ok()).expect("the change's LSN");
    assert!(event_lsn <= one, "{key_event}");

    // Then the reader stops reading while every row changes.
    pg.execute("UPDATE courier_performance SET deliveries = deliveries + 1", &[]).await.expect("update all");
    let all = commit_lsn(&pg).await;
    let caught_up = format!("/v1/tables/courier_performance/rows/1?min_lsn={all}&wait_ms=60000");
    wait_for("the view past the big update", Duration::from_secs(300), || async {
        (c.get(&caught_up).await.0 == 200).then_some(())
    })
    .await;
    let (mut keys, mut reset) = (0usize, false);
    loop {
        let event = slow.next().await.expect("the stream goes on");
        match event["type"].as_str() {
            Some("key") => keys += 1,
            Some("reset") => {
                assert!(event["table"].is_null(), "a lagging reader drops every table: {event}");
                // At or past every change it skipped: the big update's.
                assert!(applied_of(&event).is_some_and(|a| a > one && a <= all), "{event}");
                reset = true;
            }
            Some("coverage") => {
                let lsn: Lsn = event["lsn"].as_str().and_then(|l| l.parse().ok()).expect("coverage LSN");
                if lsn >= all {
                    break;
                }
            }
            other => panic!("unexpected event {other:?}: {event}"),
        }
    }
    eprintln!("the stopped reader read {keys} of {ROWS} key events, and a reset");
    assert!(reset, "a reader that fell behind got a reset (it read {keys} key events of {ROWS})");
    assert!(keys < ROWS as usize, "events past the backlog were dropped for the reset ({keys})");
    assert!(metric(&c, "walcache_consumer_invalidation_lagged_total").await >= 1.0);

    // The stream's slot is given back when its reader goes away.
    drop(slow);
    wait_for("the stream counted as closed", Duration::from_secs(30), || async {
        (metric(&c, "walcache_consumer_invalidation_streams").await == 0.0).then_some(())
    })
    .await;
    let mut again = EventStream::new(open().await.expect("stream"));
    assert_eq!(again.next().await.expect("hello")["type"], "hello");
    drop(again);
    c.stop().await;
    producer.stop().await.expect("drain");
}
