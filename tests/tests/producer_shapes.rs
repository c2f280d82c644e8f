//! The producer on the table shapes, settings and faults that real databases have: generated
//! columns, database-level output settings, partitioned tables, rows over the broker's message
//! limit, renamed tables and publications that leave operations out.
//!
//! The oracle is Postgres read through Postgres (`TestDb::contract_view`), never the producer's
//! own parser, and every comparison covers every field of every row.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value as Json};
use walcache_common::config::Secret;
use walcache_common::dead_letter::DeadLetter;
use walcache_producer::ProducerError;
use walcache_tests::events::{Event, check_order_per_key, decode_all, materialize};
use walcache_tests::kafka::read_all;
use walcache_tests::{Pipeline, TestDb, wait_for};

type View = BTreeMap<i64, Map<String, Json>>;

async fn topic_events(p: &Pipeline) -> Vec<Event> {
    decode_all(&read_all(&p.kafka, &p.topic).await)
}

/// Waits until the topic, folded by position, equals `expected()` (the table read through
/// Postgres), and returns the events.
async fn converge_to(p: &Pipeline, expected: impl AsyncFn() -> View) -> Vec<Event> {
    let mut last = String::new();
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let events = topic_events(p).await;
            let view = materialize(&events);
            let table = expected().await;
            if view == table {
                return events;
            }
            let differ: Vec<String> = table
                .iter()
                .filter(|(k, v)| view.get(k) != Some(*v))
                .take(2)
                .map(|(k, v)| format!("key {k}: table {v:?}, topic {:?}", view.get(k)))
                .collect();
            last = format!(
                "table {} rows, topic {} rows, {} extra; {}",
                table.len(),
                view.len(),
                view.keys().filter(|k| !table.contains_key(k)).count(),
                differ.join("; ")
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    outcome.unwrap_or_else(|_| panic!("the topic never matched the table: {last}"))
}

async fn dead_letters(p: &Pipeline) -> Vec<(DeadLetter, usize)> {
    read_all(&p.kafka, &p.dead_letter)
        .await
        .iter()
        .filter_map(|r| {
            let v = r.value.as_deref()?;
            Some((serde_json::from_slice::<DeadLetter>(v).expect("dead letters are JSON"), v.len()))
        })
        .collect()
}

/// The courier_performance columns with a stored generated column in front of them, the
/// way a reporting team adds one.
const WITH_GENERATED_COLUMN: &str = "
CREATE TABLE courier_performance (
  score           bigint GENERATED ALWAYS AS (deliveries * 10 - cancellations) STORED,
  courier_id      bigint PRIMARY KEY,
  city            text NOT NULL,
  zone            text,
  tier            text NOT NULL,
  label           text GENERATED ALWAYS AS (city || '/' || tier) STORED,
  rating          numeric(3,2),
  deliveries      integer NOT NULL DEFAULT 0,
  on_time_rate    double precision NOT NULL,
  acceptance_rate double precision,
  cancellations   integer NOT NULL DEFAULT 0,
  active          boolean NOT NULL DEFAULT true,
  notes           text,
  updated_at      timestamptz NOT NULL DEFAULT now()
)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_do_not_shift_the_snapshot() {
    let db = TestDb::create_with_table(WITH_GENERATED_COLUMN).await;
    db.seed(1, 200).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let client = db.client().await;
    client
        .batch_execute(
            "UPDATE courier_performance SET deliveries = deliveries + 7, notes = 'streamed' WHERE courier_id <= 20; \
             DELETE FROM courier_performance WHERE courier_id BETWEEN 21 AND 25",
        )
        .await
        .expect("stream changes");
    db.seed(1_000, 10).await;
    let events = converge_to(&p, || db.contract_view()).await;
    assert_eq!(events.iter().filter(|e| e.op == Some(walcache_schemas::Op::Snapshot)).count(), 200);
    assert!(dead_letters(&p).await.is_empty(), "every row fits the contract: nothing is dead-lettered");
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_and_role_settings_do_not_change_the_values() {
    let db = TestDb::create().await;
    let admin = db.client().await;
    // Every setting that changes how Postgres prints a value, set the unusual way for the
    // database and for the role the producer connects as.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET DateStyle = 'SQL, DMY'; \
             ALTER DATABASE \"{db}\" SET TimeZone = 'America/New_York'; \
             ALTER DATABASE \"{db}\" SET IntervalStyle = 'sql_standard'; \
             ALTER DATABASE \"{db}\" SET bytea_output = 'escape'; \
             ALTER ROLE postgres IN DATABASE \"{db}\" SET extra_float_digits = -3",
            db = db.name
        ))
        .await
        .expect("database settings");
    db.seed(1, 300).await;
    // Doubles that only survive with full precision, timestamps with microseconds.
    db.client()
        .await
        .batch_execute(
            "UPDATE courier_performance SET on_time_rate = 0.1234567890123456789, acceptance_rate = 1e-300, \
             updated_at = '2026-01-02 03:04:05.678901+00' WHERE courier_id <= 10",
        )
        .await
        .expect("precise values");
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    db.client()
        .await
        .batch_execute(
            "UPDATE courier_performance SET on_time_rate = 2.0/3.0, updated_at = '2026-12-31 23:59:59.000001+00' \
             WHERE courier_id BETWEEN 11 AND 20",
        )
        .await
        .expect("streamed precise values");
    converge_to(&p, || db.contract_view()).await;
    assert!(dead_letters(&p).await.is_empty(), "no value fails to parse");
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_are_copied_and_streamed_under_their_own_name() {
    let db = TestDb::create_with_table(
        "CREATE TABLE courier_performance (
           courier_id bigint PRIMARY KEY, city text NOT NULL, zone text, tier text NOT NULL, rating numeric(3,2),
           deliveries integer NOT NULL DEFAULT 0, on_time_rate double precision NOT NULL,
           acceptance_rate double precision, cancellations integer NOT NULL DEFAULT 0,
           active boolean NOT NULL DEFAULT true, notes text, updated_at timestamptz NOT NULL DEFAULT now()
         ) PARTITION BY HASH (courier_id);
         CREATE TABLE courier_performance_p0 PARTITION OF courier_performance FOR VALUES WITH (MODULUS 3, REMAINDER 0);
         CREATE TABLE courier_performance_p1 PARTITION OF courier_performance FOR VALUES WITH (MODULUS 3, REMAINDER 1);
         CREATE TABLE courier_performance_p2 PARTITION OF courier_performance FOR VALUES WITH (MODULUS 3, REMAINDER 2);",
    )
    .await;
    db.seed(1, 300).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let client = db.client().await;
    client
        .batch_execute(
            "UPDATE courier_performance SET deliveries = deliveries + 1 WHERE courier_id <= 30; \
             DELETE FROM courier_performance WHERE courier_id BETWEEN 31 AND 40; \
             UPDATE courier_performance SET courier_id = 5000 WHERE courier_id = 41",
        )
        .await
        .expect("stream changes");
    db.seed(1_000, 20).await;
    let events = converge_to(&p, || db.contract_view()).await;
    check_order_per_key(&events).expect("order per key");
    assert_eq!(events.iter().filter(|e| e.op == Some(walcache_schemas::Op::Snapshot)).count(), 300);
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_over_the_message_limit_is_set_aside_and_the_pipeline_moves_on() {
    let db = TestDb::create().await;
    db.seed(1, 50).await;
    let big = |id: i64, rating: &str| {
        format!(
            "INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate, notes) \
             VALUES ({id}, 'Lisbon', 'gold', {rating}, 0.9, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 100000) g))"
        )
    };
    let client = db.client().await;
    // One in the snapshot, two streamed: one that fits the contract, one that also breaks it.
    client.batch_execute(&big(900, "4.5")).await.expect("big row before the snapshot");
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    client.batch_execute(&big(901, "4.5")).await.expect("big row");
    client.batch_execute(&big(902, "NULL")).await.expect("big row breaking the contract");
    client.batch_execute("UPDATE courier_performance SET deliveries = 77 WHERE courier_id = 1").await.expect("after");
    let after = db.current_lsn().await;

    // Everything else arrives; the three big rows do not (they are not in the view).
    converge_to(&p, || async {
        let mut view = db.contract_view().await;
        for big in [900, 901] {
            view.remove(&big);
        }
        view
    })
    .await;
    wait_for("the slot to move past the big rows", Duration::from_secs(60), || async {
        db.slot_confirmed(&p.slot).await.filter(|c| *c >= after)
    })
    .await;
    // Read again: the view can match while a partition's marker is not acknowledged yet; once
    // the slot is confirmed past them, every event before `after` is.
    let events = topic_events(&p).await;
    let letters = dead_letters(&p).await;
    let by_key: BTreeMap<String, &(DeadLetter, usize)> =
        letters.iter().map(|l| (l.0.key.as_ref().map(Json::to_string).unwrap_or_default(), l)).collect();
    assert_eq!(letters.len(), 3, "{letters:#?}");
    for id in [900, 901, 902] {
        let (letter, size) = by_key.get(&format!("{{\"courier_id\":\"{id}\"}}")).expect("a dead letter per big row");
        assert!(*size < 10_000, "the dead letter is small enough to deliver ({size} bytes)");
        assert!(letter.row.is_none(), "no values in an oversized row's dead letter");
        assert!(letter.lsn.is_some() && letter.txid.is_some(), "{letter:?}");
        let expected = if id == 902 { "null_in_required_field" } else { "too_large" };
        assert_eq!(letter.reason_code, expected, "{letter:?}");
    }
    assert!(by_key["{\"courier_id\":\"900\"}"].0.op.as_deref() == Some("snapshot"));
    // On the table topic, each big row's key says "changed here, row not available", at the
    // dead letter's position, so no consumer serves an older row of it as current.
    for id in [900, 901, 902] {
        let (letter, _) = by_key[&format!("{{\"courier_id\":\"{id}\"}}")];
        let marker = events
            .iter()
            .find(|e| {
                e.key == Some(id) && e.op.is_some_and(|op| op != walcache_schemas::Op::Delete) && e.after.is_none()
            })
            .unwrap_or_else(|| panic!("no row-unavailable marker for {id}"));
        let position = marker.position.expect("a position");
        assert_eq!((Some(position.lsn), Some(position.txid)), (letter.lsn, letter.txid), "{id}");
    }
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_table_stops_the_producer_before_its_changes_are_confirmed() {
    let (p, producer) = Pipeline::streaming(20).await;
    let db = &p.db;
    let client = db.client().await;
    client.batch_execute("UPDATE courier_performance SET deliveries = 1 WHERE courier_id = 1").await.expect("before");
    let before = db.current_lsn().await;
    wait_for("the change before the rename to be confirmed", Duration::from_secs(60), || async {
        db.slot_confirmed(&p.slot).await.filter(|c| *c >= before)
    })
    .await;
    client
        .batch_execute(
            "ALTER TABLE courier_performance RENAME TO courier_performance_2025; \
             UPDATE courier_performance_2025 SET deliveries = 2 WHERE courier_id = 2",
        )
        .await
        .expect("rename and change");
    let change = db.current_lsn().await;
    let error = producer.exited(Duration::from_secs(60)).await.expect_err("the producer stops");
    assert!(matches!(error, ProducerError::Unroutable { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("public.courier_performance is now called public.courier_performance_2025")
            && message.contains("tables.table"),
        "{message}"
    );
    assert!(!error.is_transient(), "an operator must decide: {message}");
    let confirmed = db.slot_confirmed(&p.slot).await.expect("slot");
    assert!(confirmed < change, "nothing at or after the unroutable change is confirmed ({confirmed} vs {change})");
    let events = topic_events(&p).await;
    assert!(!events.iter().any(|e| e.key == Some(2) && e.op == Some(walcache_schemas::Op::Update)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_that_leaves_out_deletes_is_refused() {
    let db = TestDb::create().await;
    db.seed(1, 5).await;
    let p = Pipeline::new(&db);
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE courier_performance WITH (publish = 'insert, update')",
            p.slot
        ))
        .await
        .expect("publication");
    let report = walcache_producer::check::run_check(&p.config()).await;
    let text = report.to_string();
    assert!(report.failed(), "{text}");
    assert!(text.contains("does not publish delete, truncate") && text.contains("ALTER PUBLICATION"), "{text}");
    let producer = p.start_in_process();
    let error = producer.exited(Duration::from_secs(60)).await.expect_err("refused at start");
    assert!(error.to_string().contains("does not publish delete, truncate"), "{error}");
    assert!(!error.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_changed_while_streaming_stops_the_producer_before_it_vouches_for_filtered_changes() {
    let (p, producer) = Pipeline::streaming(20).await;
    let pg = p.db.client().await;
    pg.batch_execute("UPDATE courier_performance SET deliveries = 1 WHERE courier_id = 1").await.expect("before");
    wait_for("the change before to be confirmed", Duration::from_secs(30), || async {
        let on_topic = topic_events(&p).await.iter().any(|e| e.after.as_ref().is_some_and(|a| a["deliveries"] == 1));
        on_topic.then_some(())
    })
    .await;
    // An operator narrows the publication; Postgres now filters deletes out of the stream.
    pg.batch_execute(&format!("ALTER PUBLICATION {} SET (publish = 'insert, update')", p.slot)).await.expect("alter");
    let before_delete = p.db.current_lsn().await;
    pg.batch_execute(
        "DELETE FROM courier_performance WHERE courier_id = 3; \
         UPDATE courier_performance SET deliveries = 2 WHERE courier_id = 4",
    )
    .await
    .expect("changes after");
    let error = producer.exited(Duration::from_secs(60)).await.expect_err("stops");
    let text = error.to_string();
    assert!(!error.is_transient(), "{text}");
    assert!(text.contains("no longer publishes deletes") && text.contains("pg_drop_replication_slot"), "{text}");
    // Neither the slot nor the consumers were told that anything after the change is complete.
    let confirmed = p.db.slot_confirmed(&p.slot).await.expect("slot");
    assert!(confirmed <= before_delete, "slot confirmed to {confirmed}, past the filtered delete ({before_delete})");
    let registry = walcache_schemas::Registry::builtin().expect("registry");
    let newest_watermark = read_all(&p.kafka, &p.watermarks)
        .await
        .iter()
        .filter_map(|r| walcache_schemas::Watermark::decode(registry, r.value.as_deref()?).ok())
        .map(|w| w.lsn)
        .max()
        .expect("watermarks");
    assert!(newest_watermark <= before_delete, "a watermark at {newest_watermark} vouches past {before_delete}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definite_kafka_error_stops_the_producer_instead_of_replaying_for_ever() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let db = TestDb::create().await;
    db.seed(1, 20).await;
    let p = Pipeline::with_kafka(&db, &mock.bootstrap_servers());
    for (topic, partitions) in p.topics() {
        mock.create_topic(topic, partitions, 1).expect("mock topic");
    }
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    // The broker now refuses this producer's writes: no retry can fix that.
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50]);
    db.client()
        .await
        .batch_execute("UPDATE courier_performance SET deliveries = 5 WHERE courier_id = 1")
        .await
        .expect("change");
    let metrics = producer.metrics.clone();
    let error = producer.exited(Duration::from_secs(120)).await.expect_err("the producer stops");
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("uthorization"), "{error}");
    assert_eq!(metrics.restarts.with_label_values(&["transient"]).get(), 0, "no session was replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_is_unsafe_about_existing_topics() {
    use walcache_common::kafka::{Metadata, TopicSpec, ensure_topics};
    use walcache_producer::check::{Level, run_check};
    let db = TestDb::create().await;
    db.seed(1, 5).await;
    let p = Pipeline::new(&db);
    let mut config = p.config();
    // Someone created the table topic by hand with the broker's default policy.
    let metadata = Metadata::new(&config.kafka, "walcache-test").expect("metadata");
    let by_hand = TopicSpec {
        name: p.topic.clone(),
        partitions: p.partitions,
        replication_factor: 1,
        configs: vec![("cleanup.policy".into(), "delete".into())],
    };
    ensure_topics(&config.kafka, &metadata, &[by_hand]).await.expect("create the topic");
    let report = run_check(&config).await;
    let text = report.to_string();
    let fail = report.findings.iter().find(|f| f.level == Level::Fail).unwrap_or_else(|| panic!("{text}"));
    assert!(
        fail.problem.contains(&format!("topic {} has cleanup.policy=delete", p.topic))
            && fail.fix.contains("--add-config cleanup.policy=compact"),
        "{text}"
    );
    // The production default asks for three replicas: a one-broker topic is called out.
    config.topics.replication_factor = 3;
    let text = run_check(&config).await.to_string();
    assert!(
        text.contains(&format!("WARN topic {} has replication factor 1, below topics.replication_factor (3)", p.topic)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_verified_and_used_on_every_connection() {
    let db = TestDb::create().await;
    db.seed(1, 20).await;
    let p = Pipeline::new(&db);
    // The oracle is the server's own rule: it rejects every plaintext connection of the
    // producer's role to this database, the replication connection included (a logical one
    // names its database). The test reads Postgres as another role, in plaintext.
    let pg = db.client().await;
    let role = format!("{}_tls", db.name);
    pg.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{}'",
        db.env.pg_password.replace('\'', "''")
    ))
    .await
    .expect("role");
    let hba_file: String = pg.query_one("SHOW hba_file", &[]).await.expect("hba_file").get(0);
    let hba = std::fs::read_to_string(&hba_file).expect("read pg_hba.conf");
    let rule = format!("hostnossl {} {role} all reject\n", db.name);
    std::fs::write(&hba_file, format!("{rule}{hba}")).expect("write pg_hba.conf");
    pg.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    let plaintext = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={role} password={} dbname={}",
            db.env.pg_port, db.env.pg_password, db.name
        ),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(plaintext.is_err(), "the server still accepts plaintext connections of {role}");

    let url = |mode: &str, host: &str, ca: &std::path::Path| {
        format!("postgres://{role}@{host}:{}/{}?sslmode={mode}&sslrootcert={}", db.env.pg_port, db.name, ca.display())
    };
    // A CA that did not sign the server's certificate: a definite error that names TLS and
    // what to check, not a retry loop.
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut config = p.config();
    config.postgres.url = Secret::new(url("verify-full", "localhost", &walcache_tests::unrelated_ca(scratch.path())));
    let error = p.start_in_process_with(config).exited(Duration::from_secs(60)).await.expect_err("refused");
    let text = error.to_string();
    assert!(!error.is_transient(), "{text}");
    assert!(text.contains("TLS") && text.contains("sslrootcert") && text.contains("verify-full"), "{text}");

    // sslmode=disable means plaintext, which the rule refuses.
    let mut config = p.config();
    config.postgres.url = Secret::new(url("disable", "127.0.0.1", &db.env.pg_ca));
    let error = p.start_in_process_with(config).exited(Duration::from_secs(60)).await.expect_err("refused");
    assert!(format!("{error:?}").contains("no encryption"), "{error:?}");

    // The right CA: control, snapshot and replication connections all pass the rule, so the
    // snapshot arrives and a streamed change follows it.
    for (mode, host) in [("verify-full", "localhost"), ("verify-ca", "127.0.0.1")] {
        let mut config = p.config();
        config.postgres.url = Secret::new(url(mode, host, &db.env.pg_ca));
        let producer = p.start_in_process_with(config);
        producer.wait_ready(Duration::from_secs(60)).await;
        pg.batch_execute(&format!("UPDATE courier_performance SET notes = 'over TLS ({mode})' WHERE courier_id = 3"))
            .await
            .expect("update");
        converge_to(&p, || db.contract_view()).await;
        let encrypted: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = current_database() AND a.application_name LIKE 'walcache-producer-%' AND s.ssl",
                &[],
            )
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert!(encrypted >= 2, "control and replication connections are encrypted ({encrypted})");
        producer.stop().await.expect("drain");
    }
}
