//! The producer under faults: kill -9 at the worst moments (one with a transaction open across
//! keepalives), the broker going away (a real restart, injected errors, deliveries that exhaust
//! `message.timeout.ms`), Postgres going away (a restart, a terminated walsender), a standby
//! taking over, the leader lock lost mid-snapshot, a SIGTERM drain; and two tables side by side
//! (key changes, one TRUNCATE of both). In every case every committed change ends up on the topic, and duplicates
//! appear only where a position had not yet been confirmed to the slot.

use std::time::{Duration, Instant};

use walcache_schemas::{Lsn, Op};
use walcache_tests::broker::{DedicatedBroker, DedicatedPostgres};
use walcache_tests::events::{Event, check_newest_last_per_key, check_order_per_key, decode_all, materialize};
use walcache_tests::kafka::read_all;
use walcache_tests::writer::{Writer, assert_all_on_compacted_topic, assert_all_on_topic, duplicates};
use walcache_tests::{Pipeline, TestDb, wait_for};

async fn topic_events(p: &Pipeline) -> Vec<Event> {
    decode_all(&read_all(&p.kafka, &p.topic).await)
}

async fn converge(p: &Pipeline, timeout: Duration) -> Vec<Event> {
    p.converge_table(&p.topic, "courier_performance", timeout).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transaction_and_between_delivery_and_ack_loses_nothing() {
    let db = TestDb::create().await;
    db.seed(1, 60_000).await;
    let p = Pipeline::new(&db);
    let mut producer = p.spawn();
    producer.wait_ready(Duration::from_secs(120)).await;

    // Mid-transaction: one 60k-row transaction, killed while its events are going out.
    let before = converge(&p, Duration::from_secs(60)).await.len() as i64;
    let before = before.max(p.topic_size().await);
    let big_txid: i64 = {
        let mut client = db.client().await;
        let tx = client.transaction().await.expect("tx");
        let id: i64 = tx.query_one("SELECT txid_current()::int8", &[]).await.expect("txid").get(0);
        tx.execute("UPDATE courier_performance SET cancellations = cancellations + 1", &[]).await.expect("big update");
        tx.commit().await.expect("commit");
        id
    };
    wait_for("part of the big transaction on the topic", Duration::from_secs(60), || async {
        (p.topic_size().await >= before + 3_000).then_some(())
    })
    .await;
    producer.kill9();
    let confirmed = db.slot_confirmed(&p.slot).await.expect("slot");
    let delivered = p.topic_size().await - before;
    assert!(delivered < 60_000, "the kill should land mid-transaction ({delivered} delivered)");
    let events = topic_events(&p).await;
    assert!(
        events
            .iter()
            .filter_map(|e| e.position)
            .filter(|pos| pos.txid == big_txid as u64)
            .all(|pos| pos.lsn >= confirmed),
        "the big transaction was not confirmed before it was delivered"
    );

    // The restart replays the whole big transaction; let that finish and be confirmed.
    producer = p.spawn();
    producer.wait_ready(Duration::from_secs(120)).await;
    let big_lsn =
        events.iter().filter_map(|e| e.position).filter(|pos| pos.txid == big_txid as u64).map(|pos| pos.lsn).next();
    let big_lsn = big_lsn.expect("part of the big transaction was on the topic");
    wait_for("the big transaction to be confirmed", Duration::from_secs(120), || async {
        db.slot_confirmed(&p.slot).await.filter(|c| *c > big_lsn).map(|_| ())
    })
    .await;

    // Between delivery and ack: small transactions under load, killed while the last
    // delivered commits are not yet confirmed to the slot.
    let writer = Writer::start(&db, 60_000, 10_000_000, Duration::ZERO).await;
    let mut window: Option<Lsn> = None;
    for attempt in 0..5 {
        if attempt > 0 {
            producer = p.spawn();
            producer.wait_ready(Duration::from_secs(120)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        producer.kill9();
        let confirmed = db.slot_confirmed(&p.slot).await.expect("slot");
        let newest_writer_commit = topic_events(&p)
            .await
            .iter()
            .filter_map(|e| e.position)
            .filter(|pos| pos.txid != big_txid as u64)
            .map(|pos| pos.lsn)
            .max();
        if newest_writer_commit.is_some_and(|n| n >= confirmed) {
            window = Some(confirmed);
            break;
        }
    }
    let confirmed_at_kill = window.expect("a kill landed between delivery and acknowledgement");
    let mut last = p.spawn();
    last.wait_ready(Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &txids);
    assert!(events.iter().any(|e| e.position.is_some_and(|pos| pos.txid == big_txid as u64)));
    // Every row of the big transaction has its own event on the topic (the test broker does
    // not compact).
    let big_keys = events
        .iter()
        .filter(|e| e.position.is_some_and(|pos| pos.txid == big_txid as u64))
        .filter_map(|e| e.key)
        .filter(|k| (1..=60_000).contains(k))
        .collect::<std::collections::HashSet<_>>();
    assert_eq!(big_keys.len(), 60_000, "every row of the big transaction is on the topic");
    check_order_per_key(&events).expect("order per key");
    let dups = duplicates(&events);
    assert!(!dups.is_empty(), "the replays after the kills should show as duplicates");
    // Duplicates come only from positions the slot had not confirmed when a kill happened.
    // Confirmed positions only grow, so none may sit before the first kill's confirmed LSN,
    // and the last kill's replays sit at or after its own.
    for d in &dups {
        let pos = d.position.expect("position");
        assert!(pos.lsn >= confirmed, "duplicate before the first kill's confirmed position {confirmed}: {pos:?}");
    }
    let after: Vec<_> = events
        .iter()
        .filter_map(|e| e.position)
        .filter(|pos| pos.lsn >= confirmed_at_kill)
        .map(|p| (p.lsn, p.txid))
        .take(5)
        .collect();
    assert!(
        dups.iter().filter_map(|d| d.position).any(|pos| pos.lsn >= confirmed_at_kill && pos.txid != big_txid as u64),
        "the last kill's unacknowledged commits were replayed: confirmed at kill {confirmed_at_kill}, events after it {after:?}, {} dups, dup lsns {:?}",
        dups.len(),
        dups.iter().filter_map(|d| d.position).map(|p| (p.lsn, p.txid)).take(5).collect::<Vec<_>>()
    );
    last.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_broker_restart_loses_nothing_and_in_flight_stays_bounded() {
    let broker = DedicatedBroker::start();
    let db = TestDb::create().await;
    db.seed(1, 2_000).await;
    let mut p = Pipeline::with_kafka(&db, &broker.bootstrap);
    p.extra_toml = String::new();
    let toml = p.toml(0).replace("max_in_flight = 20000", "max_in_flight = 500");
    let config: walcache_producer::ProducerConfig = toml::from_str(&toml).expect("config");
    let metrics = walcache_producer::Metrics::new().expect("metrics");
    let health = std::sync::Arc::new(walcache_common::ops::Health::default());
    let producer = walcache_producer::Producer::new(config, metrics.clone(), health.clone()).expect("producer");
    let cancel = tokio_util::sync::CancellationToken::new();
    let token = cancel.clone();
    let task = tokio::spawn(async move { producer.run(token).await });
    wait_for("producer ready", Duration::from_secs(60), || async { health.is_ready().then_some(()) }).await;

    let writer = Writer::start(&db, 2_000, 10_000_000, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.stop();
    // While the broker is away: writes continue, the producer holds at most max_in_flight
    // and stops reading the slot.
    let client = db.client().await;
    client.execute("UPDATE courier_performance SET cancellations = cancellations + 1", &[]).await.expect("burst");
    let mut peak = 0;
    for _ in 0..30 {
        peak = peak.max(metrics.in_flight.get());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(peak <= 500 + 3, "in-flight messages exceeded the bound: {peak}");
    let lag = client
        .query_one(
            "SELECT (pg_current_wal_lsn() - sent_lsn)::int8 FROM pg_stat_replication WHERE application_name = $1",
            &[&format!("walcache-producer-{}", p.slot)],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(i64::MAX);
    assert!(lag > 0, "with Kafka away the producer should stop reading the slot");
    broker.resume();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_compacted_topic(&events, &txids);
    check_newest_last_per_key(&events).expect("newest change last per key");
    cancel.cancel();
    task.await.expect("task").expect("clean drain after the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_broker_faults_lose_nothing() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(3).expect("mock cluster");
    let db = TestDb::create().await;
    db.seed(1, 500).await;
    let p = Pipeline::with_kafka(&db, &mock.bootstrap_servers());
    for (topic, partitions) in p.topics() {
        mock.create_topic(topic, partitions, 3).expect("mock topic");
    }
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let writer = Writer::start(&db, 500, 10_000_000, Duration::from_millis(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Produce requests fail with retriable errors, then a leader goes down and comes back.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        ]
        .repeat(5),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    mock.broker_down(1).expect("down");
    mock.broker_round_trip_time(2, Duration::from_millis(300)).expect("slow broker");
    tokio::time::sleep(Duration::from_secs(2)).await;
    mock.broker_up(1).expect("up");
    mock.broker_round_trip_time(2, Duration::ZERO).expect("fast again");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &txids);
    check_order_per_key(&events).expect("order per key");
    producer.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies() {
    let db = TestDb::create().await;
    db.seed(1, 1_000).await;
    let p = Pipeline::new(&db);
    let mut leader = p.spawn();
    leader.wait_ready(Duration::from_secs(60)).await;
    let mut standby = p.spawn();
    wait_for("the standby to wait for the slot", Duration::from_secs(30), || async {
        standby.log().contains("standing by").then_some(())
    })
    .await;
    assert!(!standby.ready().await, "a standby is not ready");
    let writer = Writer::start(&db, 1_000, 10_000_000, Duration::from_millis(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    leader.kill9();
    standby.wait_ready(Duration::from_secs(60)).await;
    assert!(standby.log().contains("resuming from the slot's confirmed position"), "{}", standby.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(60)).await;
    assert_all_on_topic(&events, &txids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_lock_mid_snapshot_stops_and_the_new_leader_continues_the_copy() {
    let db = TestDb::create().await;
    db.seed(1, 150_000).await;
    let p = Pipeline::new(&db);
    let mut first = p.spawn();
    wait_for("the first producer to lead", Duration::from_secs(60), || async {
        first.log().contains("leading the slot").then_some(())
    })
    .await;
    let mut second = p.spawn();
    wait_for("the second producer to stand by", Duration::from_secs(30), || async {
        second.log().contains("standing by").then_some(())
    })
    .await;
    wait_for("the snapshot to be under way", Duration::from_secs(60), || async {
        (p.topic_size().await >= 10_000).then_some(())
    })
    .await;
    // The lock goes with the leader's control connection (as an idle_session_timeout or an
    // operator's pg_terminate_backend would take it) while the leader process lives on.
    let pg = db.client().await;
    let terminated: i64 = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .expect("terminate the leader's control connection")
        .get(0);
    assert_eq!(terminated, 1, "one session held the leader lock");
    let partial = p.topic_size().await;
    assert!(partial < 150_000, "the loss should land mid-snapshot (topic had {partial})");
    wait_for("the old leader to notice", Duration::from_secs(30), || async {
        first.log().contains("and with it the leader lock").then_some(())
    })
    .await;

    // One of the two leads now and completes the copy.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !first.ready().await && !second.ready().await {
        assert!(!first.has_exited() && !second.has_exited(), "{}\n---\n{}", first.log(), second.log());
        assert!(Instant::now() < deadline, "no producer became ready: {}\n---\n{}", first.log(), second.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old leader's first session never finished the copy: whatever it logged as
    // delivered, it did as leader again, in a later session.
    let log = first.log();
    let first_session = match log.match_indices("leading the slot").nth(1) {
        Some((second_lead, _)) => &log[..second_lead],
        None => &log[..],
    };
    assert!(
        !first_session.contains("initial snapshot delivered"),
        "the old leader carried on without the lock: {first_session}"
    );
    let writer = Writer::start(&db, 150_000, 10_000_000, Duration::from_millis(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &txids);
    first.terminate(Duration::from_secs(30));
    second.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_and_exits_zero_so_a_restart_repeats_nothing() {
    let db = TestDb::create().await;
    db.seed(1, 1_000).await;
    let p = Pipeline::new(&db);
    let mut producer = p.spawn();
    producer.wait_ready(Duration::from_secs(60)).await;
    let writer = Writer::start(&db, 1_000, 10_000_000, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The daemon bounds its own drain by shutdown_timeout; 30 s here only catches a hang.
    let status = producer.terminate(Duration::from_secs(30)).expect("exits within the deadline");
    assert!(status.success(), "exit status {status:?}: {}", producer.log());
    assert!(producer.log().contains("slot confirmed; shutdown complete"), "{}", producer.log());
    let confirmed = db.slot_confirmed(&p.slot).await.expect("slot");
    let events = topic_events(&p).await;
    let newest = events.iter().filter_map(|e| e.position).map(|pos| pos.lsn).max().expect("events");
    assert!(confirmed > newest, "everything delivered was confirmed (confirmed {confirmed}, newest commit {newest})");

    let mut again = p.spawn();
    again.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(60)).await;
    assert_all_on_topic(&events, &txids);
    assert!(duplicates(&events).is_empty(), "a clean drain leaves nothing to repeat");
    again.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_walsender_mid_stream_loses_nothing() {
    let (p, producer) = Pipeline::streaming(500).await;
    let writer = Writer::start(&p.db, 500, 10_000_000, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let terminated: i64 = p
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = $1",
            &[&format!("walcache-producer-{}", p.slot)],
        )
        .await
        .expect("terminate the walsender")
        .get(0);
    assert_eq!(terminated, 1, "one walsender streamed to the producer");
    let restarts = producer.metrics.restarts.with_label_values(&["transient"]);
    wait_for("the session to restart", Duration::from_secs(60), || async { (restarts.get() >= 1).then_some(()) }).await;
    producer.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &txids);
    check_order_per_key(&events).expect("order per key");
    producer.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_loses_nothing() {
    let cluster = DedicatedPostgres::start();
    let db = TestDb::create_in(cluster.env).await;
    db.seed(1, 500).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    // As fast as it goes, then Postgres goes down at once: the last commits are very likely
    // not yet confirmed to the slot, and must come again after the restart.
    let writer = Writer::start(&db, 500, 10_000_000, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = writer.stop().await;
    tokio::task::block_in_place(|| cluster.restart());
    let restarts = producer.metrics.restarts.with_label_values(&["transient"]);
    wait_for("the session to restart", Duration::from_secs(60), || async { (restarts.get() >= 1).then_some(()) }).await;
    producer.wait_ready(Duration::from_secs(120)).await;
    let writer = Writer::start(&db, 500, 20_000_000, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &before);
    assert_all_on_topic(&events, &after);
    check_order_per_key(&events).expect("order per key");
    producer.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_that_exhaust_message_timeout_restart_the_session_and_lose_nothing() {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(3).expect("mock cluster");
    let db = TestDb::create().await;
    db.seed(1, 500).await;
    let mut p = Pipeline::with_kafka(&db, &mock.bootstrap_servers());
    p.extra_toml = "[kafka.properties]\n\"message.timeout.ms\" = \"1500\"\n".into();
    for (topic, partitions) in p.topics() {
        mock.create_topic(topic, partitions, 3).expect("mock topic");
    }
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let writer = Writer::start(&db, 500, 10_000_000, Duration::from_millis(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every broker away for longer than message.timeout.ms: librdkafka gives up on the
    // messages it holds, the session ends and replays from the slot's confirmed position.
    for broker in 1..=3 {
        mock.broker_down(broker).expect("down");
    }
    let restarts = producer.metrics.restarts.with_label_values(&["transient"]);
    wait_for("a delivery to time out and the session to restart", Duration::from_secs(60), || async {
        (restarts.get() >= 1).then_some(())
    })
    .await;
    for broker in 1..=3 {
        mock.broker_up(broker).expect("up");
    }
    producer.wait_ready(Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let txids = writer.stop().await;
    let events = converge(&p, Duration::from_secs(120)).await;
    assert_all_on_topic(&events, &txids);
    check_order_per_key(&events).expect("order per key");
    producer.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_across_keepalives_survives_a_kill_9() {
    let db = TestDb::create().await;
    db.seed(1, 100).await;
    let p = Pipeline::new(&db);
    let mut first = p.spawn();
    first.wait_ready(Duration::from_secs(60)).await;
    // A long transaction on keys 81..=100, while other transactions (keys 1..=80) commit and
    // heartbeats and keepalives let the slot's confirmed position pass its first change.
    let long = db.client().await;
    long.batch_execute("BEGIN; UPDATE courier_performance SET deliveries = 7777 WHERE courier_id > 80")
        .await
        .expect("long transaction");
    let long_txid = long.query_one("SELECT txid_current()", &[]).await.expect("txid").get::<_, i64>(0) as u64;
    let opened_at = db.current_lsn().await;
    let writer = Writer::start(&db, 80, 10_000_000, Duration::from_millis(2)).await;
    wait_for("the slot to confirm past the open transaction's first change", Duration::from_secs(60), || async {
        db.slot_confirmed(&p.slot).await.is_some_and(|c| c > opened_at).then_some(())
    })
    .await;
    first.kill9();
    long.batch_execute("COMMIT").await.expect("commit");
    let txids = writer.stop().await;
    let mut second = p.spawn();
    second.wait_ready(Duration::from_secs(60)).await;
    let events = converge(&p, Duration::from_secs(120)).await;
    let long_keys: std::collections::BTreeSet<i64> = events
        .iter()
        .filter(|e| e.position.is_some_and(|pos| pos.txid & 0xFFFF_FFFF == long_txid & 0xFFFF_FFFF))
        .filter_map(|e| e.key)
        .collect();
    assert_eq!(long_keys, (81..=100).collect(), "the long transaction's every row, after the kill");
    assert_all_on_topic(&events, &txids);
    check_order_per_key(&events).expect("order per key");
    second.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_stream_side_by_side_with_key_changes_and_one_truncate_of_both() {
    let db = TestDb::create().await;
    db.seed(1, 50).await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE courier_performance_eu (LIKE courier_performance INCLUDING ALL); \
             INSERT INTO courier_performance_eu SELECT * FROM courier_performance WHERE courier_id <= 30",
        )
        .await
        .expect("second table");
    let mut p = Pipeline::new(&db);
    let eu_topic = format!("{}.eu", p.prefix);
    p.extra_toml = format!(
        "[[tables]]\ntable = \"public.courier_performance_eu\"\ncontract = \"courier_performance\"\ntopic = \"{eu_topic}\"\n"
    );
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    converge(&p, Duration::from_secs(60)).await;
    p.converge_table(&eu_topic, "courier_performance_eu", Duration::from_secs(60)).await;

    // A key change under REPLICA IDENTITY FULL on one table and under DEFAULT on the other:
    // the old key is deleted, the new one inserted with the whole row.
    let pg = db.client().await;
    pg.batch_execute(
        "ALTER TABLE courier_performance REPLICA IDENTITY FULL; \
         UPDATE courier_performance SET courier_id = 5000 WHERE courier_id = 5; \
         UPDATE courier_performance_eu SET courier_id = 6000, deliveries = 66 WHERE courier_id = 6",
    )
    .await
    .expect("key changes");
    let events = converge(&p, Duration::from_secs(60)).await;
    let eu_events = p.converge_table(&eu_topic, "courier_performance_eu", Duration::from_secs(60)).await;
    for (events, old, new) in [(&events, 5, 5000), (&eu_events, 6, 6000)] {
        let last_old = events.iter().rev().find(|e| e.key == Some(old) && e.op.is_some()).expect("old key");
        assert_eq!(last_old.op, Some(Op::Delete), "{last_old:?}");
        let last_new = events.iter().rev().find(|e| e.key == Some(new)).expect("new key");
        assert_eq!(last_new.op, Some(Op::Insert), "{last_new:?}");
        assert!(last_new.after.is_some());
    }

    // One TRUNCATE of both tables: one truncate marker on each topic, in the same transaction
    // at the same commit LSN (each marker its own index in it).
    pg.batch_execute(
        "TRUNCATE courier_performance, courier_performance_eu; \
         INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) VALUES (1, 'Porto', 'silver', 4.1, 0.7); \
         INSERT INTO courier_performance_eu (courier_id, city, tier, rating, on_time_rate) VALUES (2, 'Faro', 'gold', 4.5, 0.9)",
    )
    .await
    .expect("truncate both");
    let events = converge(&p, Duration::from_secs(60)).await;
    let eu_events = p.converge_table(&eu_topic, "courier_performance_eu", Duration::from_secs(60)).await;
    let truncate_at = |events: &[Event]| {
        events
            .iter()
            .filter_map(|e| e.position.filter(|p| e.op == Some(Op::Truncate) && !p.snapshot))
            .map(|p| (p.lsn, p.txid))
            .collect::<Vec<_>>()
    };
    let (main, eu) = (truncate_at(&events), truncate_at(&eu_events));
    assert_eq!(main.len(), 1, "{main:?}");
    assert_eq!(main, eu, "one TRUNCATE, one commit on both topics");
    assert_eq!(materialize(&events).len(), 1);
    assert_eq!(materialize(&eu_events).len(), 1);
    producer.stop().await.expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_during_50k_mixed_changes_loses_nothing() {
    const CHANGES: usize = 50_000;
    let db = TestDb::create().await;
    db.seed(1, 2_000).await;
    let p = Pipeline::new(&db);
    let mut producer = p.spawn();
    producer.wait_ready(Duration::from_secs(120)).await;
    // Two writers as fast as they go: updates, inserts and deletes on shared keys.
    let writers = [
        Writer::start(&db, 2_000, 10_000_000, Duration::ZERO).await,
        Writer::start(&db, 2_000, 20_000_000, Duration::ZERO).await,
    ];
    let mut kills = 0;
    while writers.iter().map(Writer::committed).sum::<usize>() < CHANGES {
        // Anywhere from mid-start-up to well into streaming.
        tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 2_500)).await;
        producer.kill9();
        kills += 1;
        producer = p.spawn();
    }
    let mut txids = Vec::new();
    for writer in writers {
        txids.extend(writer.stop().await);
    }
    assert!(txids.len() >= CHANGES, "only {} changes were committed", txids.len());
    producer.wait_ready(Duration::from_secs(120)).await;
    let events = converge(&p, Duration::from_secs(300)).await;
    assert_all_on_topic(&events, &txids);
    check_order_per_key(&events).expect("order per key");
    let dups = duplicates(&events).len();
    eprintln!(
        "chaos: {} committed changes, {kills} kills -9 of the producer, {} events on the topic ({dups} duplicates), nothing lost",
        txids.len(),
        events.len()
    );
    assert!(kills >= 5, "only {kills} kills");
    producer.terminate(Duration::from_secs(30));
}
