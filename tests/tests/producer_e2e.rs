//! The producer end to end against real Postgres and a real broker: snapshot + streaming,
//! contract violations, schema changes, truncate, and the `check` command.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value as Json;
use walcache_common::dead_letter::DeadLetter;
use walcache_producer::check::{self, Level};
use walcache_schemas::Op;
use walcache_tests::events::{Event, check_order_per_key, decode_all, materialize};
use walcache_tests::kafka::read_all;
use walcache_tests::{Pipeline, TestDb, wait_for};

async fn topic_events(p: &Pipeline) -> Vec<Event> {
    decode_all(&read_all(&p.kafka, &p.topic).await)
}

/// Waits until the topic, folded by position, equals the table as the contract sees it.
async fn wait_converged(p: &Pipeline) -> Vec<Event> {
    let mut last_diff = String::new();
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let events = topic_events(p).await;
            let view = materialize(&events);
            let table = p.db.contract_view().await;
            if view == table {
                return events;
            }
            let missing: Vec<_> = table.keys().filter(|k| !view.contains_key(k)).take(5).collect();
            let extra: Vec<_> = view.keys().filter(|k| !table.contains_key(k)).take(5).collect();
            let differ: Vec<_> =
                table.iter().filter(|(k, v)| view.get(k).is_some_and(|w| w != *v)).map(|(k, _)| k).take(5).collect();
            last_diff = format!("missing {missing:?}, extra {extra:?}, different {differ:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    result.unwrap_or_else(|_| panic!("topic never matched the table: {last_diff}"))
}

async fn txid(client: &tokio_postgres::Transaction<'_>) -> u64 {
    client.query_one("SELECT txid_current()::int8", &[]).await.expect("txid").get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_streaming_reach_the_topic_as_committed() {
    let db = TestDb::create().await;
    db.seed(1, 500).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;

    // Changes while streaming, each transaction's id noted.
    let mut client = db.client().await;
    let mut txids = Vec::new();
    for round in 0..2 {
        let tx = client.transaction().await.expect("tx");
        txids.push(txid(&tx).await);
        tx.execute("UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id <= 100", &[])
            .await
            .expect("update");
        if round == 0 {
            tx.execute("DELETE FROM courier_performance WHERE courier_id BETWEEN 401 AND 450", &[])
                .await
                .expect("delete");
        }
        tx.commit().await.expect("commit");
    }
    db.seed(501, 100).await;
    let tx = client.transaction().await.expect("tx");
    txids.push(txid(&tx).await);
    tx.execute("UPDATE courier_performance SET courier_id = 10010 WHERE courier_id = 10", &[]).await.expect("key move");
    tx.commit().await.expect("commit");

    let events = wait_converged(&p).await;
    producer.stop().await.expect("clean drain");

    check_order_per_key(&events).expect("per-key order");
    let snapshot: Vec<&Event> = events.iter().filter(|e| e.op == Some(Op::Snapshot)).collect();
    assert_eq!(snapshot.len(), 500, "one snapshot event per existing row");
    assert!(snapshot.iter().all(|e| e.position.is_some_and(|p| p.snapshot)));
    // 500 rows are one chunk: all at its high watermark's commit LSN.
    let consistent_point = snapshot[0].position.map(|p| p.lsn);
    assert!(snapshot.iter().all(|e| e.position.map(|p| p.lsn) == consistent_point));

    // Every transaction we committed is on the topic, with its position.
    let seen_txids: std::collections::HashSet<u64> = events.iter().filter_map(|e| e.position.map(|p| p.txid)).collect();
    for t in &txids {
        assert!(seen_txids.contains(t), "transaction {t} is missing from the topic");
    }
    let streamed: Vec<&Event> = events.iter().filter(|e| e.position.is_some_and(|p| !p.snapshot)).collect();
    assert!(
        streamed.iter().all(|e| e.position.map(|p| p.lsn) > consistent_point),
        "streamed changes commit after the snapshot's consistent point"
    );

    // Key 1: snapshot, then two updates, in commit order, with the values committed.
    let key1: Vec<&Event> = events.iter().filter(|e| e.key == Some(1) && e.op.is_some()).collect();
    let ops: Vec<Op> = key1.iter().filter_map(|e| e.op).collect();
    assert_eq!(ops, vec![Op::Snapshot, Op::Update, Op::Update]);
    let deliveries: Vec<i64> = key1.iter().filter_map(|e| e.after.as_ref()?["deliveries"].as_i64()).collect();
    assert_eq!(deliveries, vec![1, 2, 3]);
    let in_tx: Vec<u64> = key1.iter().skip(1).filter_map(|e| e.position.map(|p| p.txid)).collect();
    assert_eq!(in_tx, txids[..2].to_vec());

    // A delete is an event with the position, then a tombstone for compaction.
    let key401: Vec<&Event> = events.iter().filter(|e| e.key == Some(401)).collect();
    assert_eq!(key401.last().and_then(|e| e.op), None, "tombstone last");
    assert_eq!(key401[key401.len() - 2].op, Some(Op::Delete));
    assert_eq!(
        key401.last().and_then(|e| e.position),
        key401[key401.len() - 2].position,
        "the tombstone carries the delete's position in its header (it survives compaction)"
    );
    // The key move: delete of the old key, insert of the new one, in one transaction.
    let moved_old = events.iter().rev().find(|e| e.key == Some(10) && e.op.is_some()).expect("old key");
    let moved_new = events.iter().find(|e| e.key == Some(10010)).expect("new key");
    assert_eq!(moved_old.op, Some(Op::Delete));
    assert_eq!(moved_new.op, Some(Op::Insert));
    assert_eq!(moved_old.position.map(|p| p.txid), moved_new.position.map(|p| p.txid));
    assert!(moved_new.position.expect("pos").index > moved_old.position.expect("pos").index);
    // Updates under REPLICA IDENTITY DEFAULT carry no before image.
    assert!(key1[1].before.is_none());

    // After the drain the slot shows the last commit, and the watermark says so too.
    let confirmed = db.slot_confirmed(&p.slot).await.expect("slot exists");
    let newest_commit = streamed.iter().filter_map(|e| e.position.map(|p| p.lsn)).max().expect("streamed");
    assert!(confirmed > newest_commit, "confirmed {confirmed} should be past the last commit {newest_commit}");
    let watermarks = read_all(&p.kafka, &p.watermarks).await;
    let registry = walcache_schemas::Registry::builtin().expect("registry");
    let last = walcache_schemas::Watermark::decode(
        registry,
        watermarks.last().and_then(|r| r.value.as_deref()).expect("a watermark"),
    )
    .expect("decodes");
    assert_eq!(last.state, walcache_schemas::ProducerState::Streaming);
    assert!(last.lsn >= newest_commit, "the final watermark covers the last commit");
    let hw = walcache_tests::kafka::high_watermarks(&p.kafka, &p.topic).await;
    for (partition, high) in hw {
        let covered = last.offsets.iter().find(|o| o.topic == p.topic && o.partition == partition).map(|o| o.offset);
        assert_eq!(covered, Some(high), "watermark offset of partition {partition}");
    }
}

fn dead_letters(records: &[walcache_tests::kafka::Record]) -> Vec<DeadLetter> {
    records
        .iter()
        .map(|r| serde_json::from_slice(r.value.as_deref().expect("value")).expect("dead letter JSON"))
        .collect()
}

/// Notes large and incompressible enough to be stored out of line (TOAST).
const TOAST_NOTES: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 600))";

/// Postgres's own text of one row's notes, for comparison with what the topic carries.
async fn notes_of(client: &tokio_postgres::Client, id: i64) -> Option<String> {
    client.query_one("SELECT notes FROM courier_performance WHERE courier_id = $1", &[&id]).await.expect("notes").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_re_read_when_exact_and_set_aside_when_not() {
    let (p, producer) = Pipeline::streaming(20).await;
    let db = &p.db;
    let client = db.client().await;
    client
        .batch_execute(&format!("UPDATE courier_performance SET notes = {TOAST_NOTES} WHERE courier_id IN (7, 8, 9)"))
        .await
        .expect("large notes");
    // An update that leaves the large note alone: the stream does not carry the note, and
    // the row, read by key, is still the version this update wrote.
    client
        .batch_execute("UPDATE courier_performance SET deliveries = 4242 WHERE courier_id = 7")
        .await
        .expect("update");
    let events = wait_converged(&p).await;
    let seven = events.iter().rev().find(|e| e.key == Some(7)).expect("key 7");
    let after = seven.after.as_ref().expect("the update arrives with its row");
    assert_eq!(after["deliveries"], 4242);
    let notes = notes_of(&client, 7).await.expect("notes");
    assert_eq!(notes.len(), 19_200);
    assert_eq!(after["notes"].as_str(), Some(notes.as_str()), "the note as Postgres holds it");
    let filled = producer.metrics.toast_reselects.with_label_values(&["public.courier_performance", "filled"]);
    assert_eq!(filled.get(), 1);

    // While no producer runs, 8 is updated twice and 9 updated then deleted. When the first
    // update of each is decoded, the row has moved on: re-reading it would publish a later
    // transaction's values under the first update's position. Those two are set aside (the
    // key reads unknown at their positions); the later changes carry the truth.
    producer.stop().await.expect("drain");
    let txid = |sql: &'static str| {
        let client = &client;
        async move {
            client.batch_execute(&format!("BEGIN; {sql}")).await.expect("change");
            let id: i64 = client.query_one("SELECT txid_current()", &[]).await.expect("txid").get(0);
            client.batch_execute("COMMIT").await.expect("commit");
            id
        }
    };
    let first8 = txid("UPDATE courier_performance SET deliveries = 1 WHERE courier_id = 8;").await;
    txid("UPDATE courier_performance SET deliveries = 2 WHERE courier_id = 8;").await;
    let first9 = txid("UPDATE courier_performance SET deliveries = 3 WHERE courier_id = 9;").await;
    txid("DELETE FROM courier_performance WHERE courier_id = 9;").await;
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let events = wait_converged(&p).await;
    let letters = wait_for("two dead letters", Duration::from_secs(30), || async {
        let l = dead_letters(&read_all(&p.kafka, &p.dead_letter).await);
        (l.len() >= 2).then_some(l)
    })
    .await;
    let mut set_aside: Vec<(Option<Json>, Option<u64>, &str)> =
        letters.iter().map(|l| (l.key.clone(), l.txid, l.reason_code.as_str())).collect();
    set_aside.sort_by_key(|(_, txid, _)| *txid);
    let mask = |t: i64| Some(t as u64 & 0xFFFF_FFFF);
    assert_eq!(
        set_aside,
        vec![
            (Some(serde_json::json!({"courier_id": "8"})), mask(first8), "unchanged_toast"),
            (Some(serde_json::json!({"courier_id": "9"})), mask(first9), "unchanged_toast"),
        ]
    );
    let toast = &letters[0];
    assert_eq!(toast.field.as_deref(), Some("notes"));
    assert!(toast.reason.contains("REPLICA IDENTITY FULL"), "{}", toast.reason);
    // On the topic: 8's first update is a "row unavailable" marker, its second the full row.
    let eight: Vec<_> = events.iter().filter(|e| e.key == Some(8) && e.position.is_some_and(|p| !p.snapshot)).collect();
    let shapes: Vec<_> = eight.iter().map(|e| e.after.as_ref().map(|a| a["deliveries"].clone())).collect();
    assert_eq!(shapes[shapes.len() - 2..], [None, Some(Json::from(2))], "{eight:#?}");
    assert_eq!(
        eight.last().and_then(|e| e.after.as_ref()).map(|a| a["notes"].clone()),
        Some(Json::from(notes_of(&client, 8).await))
    );
    let superseded = producer.metrics.toast_reselects.with_label_values(&["public.courier_performance", "superseded"]);
    assert_eq!(superseded.get(), 2);

    // With REPLICA IDENTITY FULL the unchanged value comes from the old row, no re-read.
    client
        .batch_execute(
            "ALTER TABLE courier_performance REPLICA IDENTITY FULL;
             UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id = 7;",
        )
        .await
        .expect("identity full");
    let events = wait_converged(&p).await;
    let last7 = events.iter().rev().find(|e| e.key == Some(7)).expect("key 7");
    assert_eq!(last7.op, Some(Op::Update));
    assert!(last7.before.is_some(), "REPLICA IDENTITY FULL gives a before image");
    assert_eq!(last7.after.as_ref().map(|a| a["deliveries"].clone()), Some(Json::from(4243)));
    let filled = producer.metrics.toast_reselects.with_label_values(&["public.courier_performance", "filled"]);
    assert_eq!(filled.get(), 1, "only 8's second update was re-read in this run");
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_break_the_contract_go_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let (p, producer) = Pipeline::streaming(20).await;
    let db = &p.db;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1001, 'Faro', 'gold', NULL, 0.9);
             INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1002, 'Faro', 'gold', 7.5, 0.9);
             INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1003, 'Faro', 'diamond', 4.5, 0.9);
             BEGIN;
             INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1004, 'Faro', 'gold', 4.5, 1.5);
             INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1005, 'Faro', 'gold', 4.5, 0.5);
             COMMIT;
             INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate, deliveries) VALUES (1006, 'Faro', 'gold', 4.5, 0.5, -1);",
        )
        .await
        .expect("dirty rows");
    let expected: BTreeMap<&str, usize> = [("null_in_required_field", 1), ("out_of_range", 3), ("bad_enum", 1)].into();
    let letters = wait_for("five dead letters", Duration::from_secs(30), || async {
        let l = dead_letters(&read_all(&p.kafka, &p.dead_letter).await);
        (l.len() >= 5).then_some(l)
    })
    .await;
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &letters {
        *by_reason.entry(l.reason_code.as_str()).or_default() += 1;
        assert_eq!(l.table.as_deref(), Some("public.courier_performance"));
        assert!(l.lsn.is_some() && l.txid.is_some() && !l.reason.is_empty());
        assert!(l.row.is_some(), "the row travels with its reason");
    }
    assert_eq!(by_reason, expected.iter().map(|(k, v)| (*k, *v)).collect());
    let range = letters.iter().find(|l| l.key == Some(serde_json::json!({"courier_id": "1002"}))).expect("1002");
    assert_eq!(range.field.as_deref(), Some("rating"));
    assert_eq!(range.row.as_ref().map(|r| r["rating"].clone()), Some(Json::String("7.50".into())));

    // The good row of the mixed transaction arrived; counters match. (Dead letters and table
    // events are acknowledged separately: wait for the table topic's share.)
    let events = wait_for("the mixed transaction's good row and the markers", Duration::from_secs(30), || async {
        let events = topic_events(&p).await;
        let markers = events.iter().filter(|e| matches!(e.key, Some(1001..=1004 | 1006))).count();
        (markers >= 5 && events.iter().any(|e| e.key == Some(1005))).then_some(events)
    })
    .await;
    assert!(events.iter().any(|e| e.key == Some(1005) && e.op == Some(Op::Insert)));
    // What the set-aside rows left on the table topic is one "row unavailable" marker each (no
    // row), at the dead letter's position, so consumers never serve an older row of theirs.
    let markers: Vec<&_> = events.iter().filter(|e| matches!(e.key, Some(1001..=1004 | 1006))).collect();
    assert_eq!(markers.len(), 5, "{markers:#?}");
    for m in markers {
        assert!(m.after.is_none() && m.op.is_some_and(|op| op != Op::Delete), "{m:?}");
        let position = m.position.expect("position");
        assert!(
            letters.iter().any(|l| l.lsn == Some(position.lsn) && l.txid == Some(position.txid)),
            "a marker without its dead letter: {m:?}"
        );
    }
    let counted: u64 = ["null_in_required_field", "out_of_range", "bad_enum"]
        .iter()
        .map(|r| producer.metrics.dead_letters.with_label_values(&["public.courier_performance", r]).get())
        .sum();
    assert_eq!(counted, 5);

    // Schema changes: an extra column is ignored, a dropped contract column dead-letters.
    client
        .batch_execute(
            "ALTER TABLE courier_performance ADD COLUMN vehicle text DEFAULT 'bike';
             UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id = 8;",
        )
        .await
        .expect("add column");
    let events = wait_converged(&p).await;
    assert_eq!(events.iter().rev().find(|e| e.key == Some(8)).and_then(|e| e.op), Some(Op::Update));
    assert!(
        producer.metrics.schema_warnings.with_label_values(&["public.courier_performance", "extra_column"]).get() >= 1
    );
    client
        .batch_execute(
            "ALTER TABLE courier_performance DROP COLUMN cancellations;
             UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id = 9;",
        )
        .await
        .expect("drop column");
    wait_for("a missing_column dead letter", Duration::from_secs(30), || async {
        let l = dead_letters(&read_all(&p.kafka, &p.dead_letter).await);
        l.iter().any(|l| l.reason_code == "missing_column" && l.field.as_deref() == Some("cancellations")).then_some(())
    })
    .await;
    client
        .batch_execute("ALTER TABLE courier_performance ADD COLUMN cancellations integer NOT NULL DEFAULT 0")
        .await
        .expect("restore");

    // Truncate: consumers drop every older row of the table.
    client.batch_execute("TRUNCATE courier_performance; INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1, 'Porto', 'silver', 4.1, 0.7)").await.expect("truncate");
    let events = wait_converged(&p).await;
    assert!(events.iter().any(|e| e.op == Some(Op::Truncate) && e.key.is_none()));
    assert_eq!(materialize(&events).len(), 1);
    assert!(!producer.is_finished(), "the producer keeps running through all of it");
    producer.stop().await.expect("drain");
}

async fn findings(p: &Pipeline) -> Vec<(Level, String)> {
    check::run_check(&p.config())
        .await
        .findings
        .into_iter()
        .map(|f| (f.level, format!("{} -> {}", f.problem, f.fix)))
        .collect()
}

fn has_failure(findings: &[(Level, String)], needle: &str) -> bool {
    findings.iter().any(|(l, m)| *l == Level::Fail && m.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_misconfiguration_with_what_to_do() {
    let db = TestDb::create().await;
    let p = Pipeline::new(&db);
    let healthy = findings(&p).await;
    assert!(!healthy.iter().any(|(l, _)| *l == Level::Fail), "{healthy:#?}");
    assert!(healthy.iter().any(|(l, m)| *l == Level::Warn && m.contains("rating allows NULL")));

    let client = db.client().await;
    let cases: Vec<(&str, &str, &str)> = vec![
        (
            "ALTER TABLE courier_performance REPLICA IDENTITY NOTHING",
            "REPLICA IDENTITY NOTHING",
            "ALTER TABLE courier_performance REPLICA IDENTITY DEFAULT",
        ),
        (
            "ALTER TABLE courier_performance DROP CONSTRAINT courier_performance_pkey",
            "has no primary key",
            "ALTER TABLE courier_performance ADD PRIMARY KEY (courier_id)",
        ),
        (
            "ALTER TABLE courier_performance DROP CONSTRAINT courier_performance_pkey; ALTER TABLE courier_performance ADD PRIMARY KEY (courier_id, city)",
            "is keyed by (courier_id)",
            "ALTER TABLE courier_performance DROP CONSTRAINT courier_performance_pkey; ALTER TABLE courier_performance ADD PRIMARY KEY (courier_id)",
        ),
        (
            "ALTER TABLE courier_performance DROP COLUMN zone",
            "has no column zone",
            "ALTER TABLE courier_performance ADD COLUMN zone text",
        ),
        (
            "ALTER TABLE courier_performance ALTER COLUMN deliveries TYPE text",
            "cannot feed contract field deliveries",
            "ALTER TABLE courier_performance ALTER COLUMN deliveries TYPE integer USING deliveries::integer",
        ),
        (
            "ALTER TABLE courier_performance RENAME TO courier_perf",
            "does not exist in database",
            "ALTER TABLE courier_perf RENAME TO courier_performance",
        ),
    ];
    for (break_it, expected, fix_it) in cases {
        client.batch_execute(break_it).await.expect(break_it);
        let found = findings(&p).await;
        assert!(
            has_failure(&found, expected),
            "after `{break_it}` expected a failure mentioning {expected:?}: {found:#?}"
        );
        client.batch_execute(fix_it).await.expect(fix_it);
    }
    assert!(!findings(&p).await.iter().any(|(l, _)| *l == Level::Fail), "everything fixed again");

    // A role without REPLICATION or SELECT.
    let role = walcache_tests::unique("trole");
    client.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{}'", db.env.pg_password)).await.expect("role");
    let mut weak = p.clone();
    weak.extra_toml = String::new();
    let toml = weak.toml(0).replace("postgres://postgres@", &format!("postgres://{role}@"));
    let config: walcache_producer::ProducerConfig = toml::from_str(&toml).expect("config");
    let found: Vec<(Level, String)> = check::run_check(&config)
        .await
        .findings
        .into_iter()
        .map(|f| (f.level, format!("{} -> {}", f.problem, f.fix)))
        .collect();
    assert!(has_failure(&found, "lacks the REPLICATION attribute"), "{found:#?}");
    assert!(has_failure(&found, "may not SELECT"), "{found:#?}");
    assert!(has_failure(&found, &format!("ALTER ROLE \"{role}\" REPLICATION")), "{found:#?}");

    // Kafka unreachable.
    let mut offline = p.clone();
    offline.kafka = format!("127.0.0.1:{}", walcache_tests::free_port());
    let mut config = offline.config();
    config.kafka.request_timeout = Duration::from_secs(2);
    let found = check::run_check(&config).await;
    assert!(found.findings.iter().any(|f| f.level == Level::Fail && f.problem.contains("cannot reach Kafka")));
    let _ = HashMap::<(), ()>::new();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_non_zero_when_wal_level_is_not_logical() {
    let repo = walcache_tests::repo_root();
    let dir = tempfile::tempdir().expect("dir");
    // SAFETY-free env change: set for the child process only.
    let status = std::process::Command::new(repo.join("deploy/local/walcache-env"))
        .args(["pg-up", "--dir"])
        .arg(dir.path())
        .env("WALCACHE_PG_WAL_LEVEL", "replica")
        .status()
        .expect("script");
    assert!(status.success());
    let env: &'static walcache_tests::Env = Box::leak(Box::new(walcache_tests::load_env(&repo, dir.path(), "pg-up")));
    let db = TestDb::create_in(env).await;
    let mut p = Pipeline::with_kafka(&db, &walcache_tests::Env::get().kafka);
    p.extra_toml = String::new();
    let config_path = dir.path().join("producer.toml");
    std::fs::write(&config_path, p.toml(0)).expect("config");
    let out = std::process::Command::new(walcache_tests::binary("walcache-producer"))
        .arg("--config")
        .arg(&config_path)
        .arg("check")
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let _ = std::process::Command::new(repo.join("deploy/local/walcache-env"))
        .args(["destroy", "--dir"])
        .arg(dir.path())
        .status();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL wal_level is 'replica'"), "{stdout}");
    assert!(stdout.contains("set wal_level = logical in postgresql.conf and restart Postgres"), "{stdout}");
}

/// As root (CI images, `sudo make test`), the cluster runs as `postgres`, which cannot enter a
/// checkout under a root-only directory such as a `mktemp -d` folder or /root: the local
/// environment must still come up there, and `destroy` must take everything with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_environment_comes_up_in_a_directory_postgres_cannot_enter() {
    let is_root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !is_root {
        eprintln!("not root: Postgres runs as this user, so every directory it needs is reachable");
        return;
    }
    let repo = walcache_tests::repo_root();
    let private = tempfile::Builder::new().prefix("walcache-private").tempdir().expect("dir");
    std::fs::set_permissions(private.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let reachable = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(private.path())
        .status()
        .expect("runuser");
    assert!(!reachable.success(), "the postgres user must not be able to enter {}", private.path().display());
    let dir = private.path().join("env");
    let env = walcache_tests::load_env(&repo, &dir, "pg-up");
    let pg = walcache_tests::postgres::connect(&env, "postgres").await;
    let wal_level: String = pg.query_one("SHOW wal_level", &[]).await.expect("query").get(0);
    assert_eq!(wal_level, "logical");
    let cluster = std::fs::read_link(dir.join("pg")).expect("the cluster lives outside and DIR/pg points to it");
    assert!(cluster.join("data/PG_VERSION").exists());
    let status = std::process::Command::new(repo.join("deploy/local/walcache-env"))
        .args(["destroy", "--dir"])
        .arg(&dir)
        .status();
    assert!(status.is_ok_and(|s| s.success()));
    assert!(!dir.exists() && !cluster.exists(), "destroy removes the environment and the cluster's files");
}
