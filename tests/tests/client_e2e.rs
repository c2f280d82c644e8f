//! walcache-client against a real consumer: fallback and circuit breaker, staleness, verify
//! and the operator CLI.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use walcache_client::verify::{Verdict, VerifyOptions, verify};
use walcache_client::{
    BreakerConfig, BreakerState, Client, ClientError, ClientOptions, CourierPerformance, Fallback, FallbackReason,
    NearCacheOptions, ReadOptions, RowState, Source, Wire,
};
use walcache_schemas::{Op, Position, Registry, now_micros, write_envelope};
use walcache_tests::kafka::produce;
use walcache_tests::net::{BlackHole, LaggingReplicaFront};
use walcache_tests::{Pipeline, TestDb, binary, free_port, wait_for};

/// How long the test client's breaker stays open: far longer than any step of the test on a
/// busy machine, so "open" is observed as open; the test waits for the half-open state rather
/// than sleeping past this.
const OPEN_FOR: Duration = Duration::from_secs(5);

/// A client whose attempt timeout is a limit for hangs, not a latency target: a healthy cache
/// on a busy machine must never be mistaken for a failing one.
fn client(base: &str) -> Client {
    Client::new(
        base,
        ClientOptions::default().timeout(Duration::from_secs(2)).retries(1).breaker(BreakerConfig::new(3, OPEN_FOR)),
    )
    .expect("client")
}

/// The read paths (remote Avro over HTTP/1.1 and h2c, remote JSON, the near-cache, the embedded
/// view) say the same thing about the same topics, for every state a key can be in;
/// read-your-writes and staleness refusals travel the same way on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_path_gives_the_same_answers_in_every_state() {
    let db = TestDb::create().await;
    db.seed(1, 300).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let pg = db.client().await;
    pg.batch_execute("DELETE FROM courier_performance WHERE courier_id = 5").await.expect("delete");
    let consumer = p.start_consumer("").await;
    let view = p.start_embedded("");
    consumer.wait_ready(Duration::from_secs(60)).await;
    view.wait_ready(Duration::from_secs(60)).await.expect("the embedded view restores");
    let lsn = walcache_client::current_lsn(&pg).await.expect("lsn");
    let options = |wire| ClientOptions::default().timeout(Duration::from_secs(5)).wire(wire);
    let avro = Client::new(&consumer.base, options(Wire::Avro)).expect("client");
    let json = Client::new(&consumer.base, options(Wire::Json)).expect("client");
    let h2c = Client::new(&consumer.base, options(Wire::Avro).http2()).expect("client");
    let embedded = Client::embedded(Arc::clone(&view), ClientOptions::default()).expect("client");
    let covered = ReadOptions::default().min_lsn(lsn).wait(Duration::from_secs(30));
    // Key 11 becomes unknown: a change set aside upstream (an unavailable marker).
    let registry = Registry::builtin().expect("registry");
    let contract = registry.contract("courier_performance").expect("contract");
    let key = contract.key_message(&contract.key_from_text(&["11"]).expect("key"));
    let mut marker = Vec::new();
    let position = Position {
        lsn: walcache_client::Lsn(lsn.0 + 1),
        index: 0,
        txid: 1,
        commit_ts_micros: now_micros(),
        snapshot: false,
    };
    write_envelope(
        &mut marker,
        &contract.latest().doc.header,
        Op::Update,
        None,
        None,
        &position,
        "public.courier_performance",
    );
    produce(&p.kafka, &p.topic, None, Some(&key), Some(&marker)).await;
    for (path, client) in [("json", &json), ("embedded", &embedded)] {
        wait_for(&format!("key 11 to read unknown ({path})"), Duration::from_secs(60), || async {
            let read = client.get::<CourierPerformance>(&11, &ReadOptions::default()).await.ok()?;
            (read.state == RowState::Unknown).then_some(())
        })
        .await;
    }
    let keys = [7, 5, 99_999, 11];
    let mut states = Vec::new();
    for key in keys {
        let a = avro.get::<CourierPerformance>(&key, &covered).await.expect("avro read");
        let j = json.get::<CourierPerformance>(&key, &covered).await.expect("json read");
        let e = embedded.get::<CourierPerformance>(&key, &covered).await.expect("embedded read");
        let h = h2c.get::<CourierPerformance>(&key, &covered).await.expect("h2c read");
        for (path, other) in [("avro", &a), ("embedded", &e), ("h2c", &h)] {
            assert_eq!(other.value, j.value, "key {key}, {path} vs json");
            assert_eq!(other.state, j.state, "key {key}, {path} vs json");
            assert_eq!(
                (other.as_of.row_lsn, other.as_of.row_txid, other.as_of.row_commit_time),
                (j.as_of.row_lsn, j.as_of.row_txid, j.as_of.row_commit_time),
                "key {key}, {path} vs json"
            );
            assert!(other.as_of.view_lsn.is_some_and(|v| v >= lsn), "key {key}, {path}: {other:?}");
        }
        // The view may move on between the two reads, never back.
        assert!(a.as_of.view_lsn <= j.as_of.view_lsn, "key {key}: {a:?} {j:?}");
        states.push(a.state);
    }
    assert_eq!(states, [RowState::Present, RowState::Deleted, RowState::Absent, RowState::Unknown]);
    // The near-cache path: the same answers, held after the first read, except unknown, which
    // it never holds.
    let near = Client::new(
        &consumer.base,
        options(Wire::Avro).near_cache(NearCacheOptions::new(100, Duration::from_secs(600))),
    )
    .expect("client");
    for (key, state) in keys.iter().zip(&states) {
        let first = near.get::<CourierPerformance>(key, &ReadOptions::default()).await.expect("near read");
        let again = near.get::<CourierPerformance>(key, &ReadOptions::default()).await.expect("near read");
        let remote = json.get::<CourierPerformance>(key, &ReadOptions::default()).await.expect("json read");
        assert_eq!((first.state, again.state), (*state, *state), "key {key}");
        assert_eq!((&again.value, again.as_of.row_lsn), (&remote.value, remote.as_of.row_lsn), "key {key}");
        assert_eq!(again.from_near_cache, *state != RowState::Unknown, "key {key}: {again:?}");
    }
    let many = embedded.get_many::<CourierPerformance>(&keys, &covered).await.expect("embedded batch");
    let remote_many = json.get_many::<CourierPerformance>(&keys, &covered).await.expect("remote batch");
    assert_eq!(many.iter().map(|r| r.state).collect::<Vec<_>>(), states, "a batch answers like single reads");
    assert_eq!(
        many.iter().map(|r| (&r.value, r.as_of.row_lsn)).collect::<Vec<_>>(),
        remote_many.iter().map(|r| (&r.value, r.as_of.row_lsn)).collect::<Vec<_>>(),
        "embedded and remote batches agree"
    );
    let row = avro.get::<CourierPerformance>(&7, &covered).await.expect("read").value.expect("present");
    let deliveries: i32 =
        pg.query_one("SELECT deliveries FROM courier_performance WHERE courier_id = 7", &[]).await.expect("row").get(0);
    assert_eq!(i64::from(deliveries), i64::from(row.deliveries), "the Avro row decodes to what Postgres holds");

    // Read your writes in process: the embedded read waits for the view to cover the commit.
    pg.execute("UPDATE courier_performance SET deliveries = 4242 WHERE courier_id = 8", &[]).await.expect("update");
    let written = walcache_client::current_lsn(&pg).await.expect("lsn");
    let own = ReadOptions::default().min_lsn(written).wait(Duration::from_secs(30));
    let read = embedded.get::<CourierPerformance>(&8, &own).await.expect("read your write");
    assert_eq!(read.value.map(|v| v.deliveries), Some(4242), "{:?}", read.as_of);
    assert!(read.as_of.row_lsn.is_some_and(|l| l <= written) && read.as_of.view_lsn.is_some_and(|v| v >= written));

    // Refusals are the same errors on every path.
    let ahead =
        ReadOptions::default().min_lsn(walcache_client::Lsn(lsn.0 + (1 << 40))).wait(Duration::from_millis(200));
    for (path, client) in [("avro", &avro), ("h2c", &h2c), ("near", &near), ("embedded", &embedded)] {
        let refused = client.get::<CourierPerformance>(&7, &ahead).await;
        assert!(matches!(refused, Err(ClientError::MinLsnNotReached(_))), "{path}: {refused:?}");
        // (A view exactly 0 ms old passes a 0 ms bound: ask until a read finds it older.)
        let strict = ReadOptions::default().max_staleness(Duration::ZERO);
        wait_for(&format!("a too-stale refusal ({path})"), Duration::from_secs(30), || async {
            matches!(client.get::<CourierPerformance>(&7, &strict).await, Err(ClientError::TooStale(_))).then_some(())
        })
        .await;
    }
    assert!(
        matches!(embedded.status().await, Err(ClientError::Rejected { ref code, .. }) if code == "embedded"),
        "status needs a consumer's HTTP API"
    );
    view.stop().await.expect("the embedded view stops cleanly");
    consumer.stop().await;
    producer.stop().await.expect("drain");
}

/// An embedded view holds no more than its `cache.capacity`: past it, evicted keys read unknown,
/// never absent, and never an old value; and until it has restored it answers not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_embedded_view_says_unknown_not_absent_and_not_ready_until_restored() {
    let db = TestDb::create().await;
    db.seed(1, 20_000).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(120)).await;
    let pg = db.client().await;
    let lsn = walcache_client::current_lsn(&pg).await.expect("lsn");
    let view = p.start_embedded("[cache]\ncapacity = \"1MiB\"\npages = 4096");
    let embedded = Client::embedded(Arc::clone(&view), ClientOptions::default()).expect("client");
    let early = embedded.get::<CourierPerformance>(&1, &ReadOptions::default()).await;
    if !view.is_ready() {
        assert!(matches!(early, Err(ClientError::NotReady(_))), "before the restore: {early:?}");
    }
    view.wait_ready(Duration::from_secs(120)).await.expect("restores");
    let covered = ReadOptions::default().min_lsn(lsn).wait(Duration::from_secs(60));
    let keys: Vec<i64> = (1..=20_000).step_by(7).collect();
    let truth: std::collections::HashMap<i64, i32> = pg
        .query("SELECT courier_id, deliveries FROM courier_performance", &[])
        .await
        .expect("table")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The cache evicts in its maintenance runs, which reads drive too: read until it has.
    let mut unknown = 0;
    let started = std::time::Instant::now();
    while unknown == 0 && started.elapsed() < Duration::from_secs(60) {
        let reads = embedded.get_many::<CourierPerformance>(&keys, &covered).await.expect("batch");
        for (key, read) in keys.iter().zip(&reads) {
            match read.state {
                RowState::Unknown => unknown += 1,
                RowState::Present => assert_eq!(
                    read.value.as_ref().map(|v| v.deliveries),
                    truth.get(key).copied(),
                    "key {key}: a held value is Postgres's"
                ),
                other => panic!("key {key} exists in Postgres; the view answered {other:?}"),
            }
        }
    }
    assert!(unknown > 0, "20k rows do not fit in 1 MiB: some keys must read unknown");
    assert!(unknown < keys.len(), "the view still holds what fits");
    view.stop().await.expect("stops");
    producer.stop().await.expect("drain");
}

/// A near-cache that follows the consumer's invalidation stream keeps entries far past its TTL
/// and serves them as of the stream's newest coverage, yet never answers an old value as of a
/// view that includes the change; when the stream is gone it falls back to its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_following_invalidations_is_exact_as_of_every_answer() {
    let (p, producer) = Pipeline::streaming(200).await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(60)).await;
    let pg = p.db.client().await;
    let ttl = Duration::from_millis(300);
    let registry = prometheus::Registry::new();
    let near = Client::new(
        &consumer.base,
        ClientOptions::default()
            .timeout(Duration::from_secs(5))
            .metrics(walcache_client::ClientMetrics::register(&registry).expect("metrics"))
            .near_cache(NearCacheOptions::new(1000, ttl).follow_invalidations(Duration::from_secs(600))),
    )
    .expect("client");
    let metric = |name: &str, reason: Option<&str>| {
        let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
        walcache_tests::registry_value(&registry, name, &labels)
    };
    let deliveries = |read: &walcache_client::Read<CourierPerformance>| read.value.as_ref().map(|v| v.deliveries);
    // Held past the TTL once the stream is connected (its hello drops what came before).
    wait_for("key 7 and key 8 held past the TTL", Duration::from_secs(60), || async {
        let _ = near.get::<CourierPerformance>(&7, &ReadOptions::default()).await.ok()?;
        let _ = near.get::<CourierPerformance>(&8, &ReadOptions::default()).await.ok()?;
        tokio::time::sleep(ttl * 2).await;
        let a = near.get::<CourierPerformance>(&7, &ReadOptions::default()).await.ok()?;
        let b = near.get::<CourierPerformance>(&8, &ReadOptions::default()).await.ok()?;
        (a.from_near_cache && b.from_near_cache).then_some(())
    })
    .await;
    let before = near.get::<CourierPerformance>(&8, &ReadOptions::default()).await.expect("read");
    assert_eq!(metric("walcache_client_near_cache_stream_connected", None), 1.0);
    assert_eq!(metric("walcache_client_near_cache_drops_total", Some("hello")), 1.0);

    pg.execute("UPDATE courier_performance SET deliveries = 7777 WHERE courier_id = 7", &[]).await.expect("update");
    let lsn = walcache_client::current_lsn(&pg).await.expect("lsn");
    // Every answer is exact as of its as_of: one that claims a view at or past the update
    // carries the update. (One below it may already carry it too: the view applies a change
    // before a watermark covers it, and the answer's row_lsn says so.)
    let mut hits_past_the_update = 0;
    let started = std::time::Instant::now();
    loop {
        let read = near.get::<CourierPerformance>(&7, &ReadOptions::default()).await.expect("read");
        if read.as_of.view_lsn.is_some_and(|v| v >= lsn) {
            assert_eq!(
                deliveries(&read),
                Some(7777),
                "an answer as of {:?} must carry the update at {lsn}",
                read.as_of
            );
            hits_past_the_update += usize::from(read.from_near_cache);
        }
        if hits_past_the_update >= 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the update never reached the near-cache: {read:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An unchanged key stays held, and is now vouched for as of the newer coverage.
    let after = near.get::<CourierPerformance>(&8, &ReadOptions::default()).await.expect("read");
    assert!(after.from_near_cache, "an unchanged key is not dropped: {after:?}");
    assert!(after.as_of.view_lsn.is_some_and(|v| v >= lsn), "held as of the stream's coverage: {after:?}");
    assert_eq!(after.value, before.value);
    assert_eq!(after.as_of.row_lsn, before.as_of.row_lsn);
    // Read-your-writes and staleness bounds are never answered from memory alone.
    let ahead =
        ReadOptions::default().min_lsn(walcache_client::Lsn(lsn.0 + (1 << 40))).wait(Duration::from_millis(200));
    let refused = near.get::<CourierPerformance>(&8, &ahead).await;
    assert!(matches!(refused, Err(ClientError::MinLsnNotReached(_))), "a held key still asks the view: {refused:?}");
    let strict = ReadOptions::default().max_staleness(Duration::ZERO);
    wait_for("a too-stale refusal past a held entry", Duration::from_secs(30), || async {
        matches!(near.get::<CourierPerformance>(&8, &strict).await, Err(ClientError::TooStale(_))).then_some(())
    })
    .await;

    // A truncate drops every held entry (a reset): no answer as of a view past it is a row.
    pg.batch_execute("TRUNCATE courier_performance").await.expect("truncate");
    let truncated = walcache_client::current_lsn(&pg).await.expect("lsn");
    wait_for("a view past the truncate", Duration::from_secs(60), || async {
        let read = near.get::<CourierPerformance>(&8, &ReadOptions::default()).await.ok()?;
        let past = read.as_of.view_lsn.is_some_and(|v| v >= truncated);
        assert!(!past || read.state != RowState::Present, "a row served as of {:?}, past the truncate", read.as_of);
        past.then_some(())
    })
    .await;

    assert_eq!(metric("walcache_client_near_cache_drops_total", Some("reset")), 1.0, "the truncate's reset");

    // The stream gone, entries live only their TTL: the consumer is down, so a read past the
    // TTL cannot be answered from memory.
    consumer.stop().await;
    tokio::time::sleep(ttl * 2).await;
    let gone = near.get::<CourierPerformance>(&8, &ReadOptions::default()).await;
    assert!(gone.is_err(), "without invalidations an entry older than the TTL is not served: {gone:?}");
    wait_for("the lost stream counted", Duration::from_secs(30), || async {
        (metric("walcache_client_near_cache_stream_connected", None) == 0.0
            && metric("walcache_client_near_cache_drops_total", Some("lost")) == 1.0)
            .then_some(())
    })
    .await;
    producer.stop().await.expect("drain");
}

/// Reads of `key` for several TTLs while the front's read replica is frozen: every answer as
/// of a view at or past `lsn` must pass `current`. Returns (answers from below `lsn`, of which
/// served from the near-cache); on a machine too busy to read twice within a TTL, it goes on
/// until a lagging answer was served from memory.
async fn read_while_lagging(
    near: &Client,
    key: i64,
    lsn: walcache_client::Lsn,
    ttl: Duration,
    current: impl Fn(&walcache_client::Read<CourierPerformance>) -> bool,
) -> (usize, usize) {
    let started = std::time::Instant::now();
    let (mut lagging, mut from_memory) = (0, 0);
    while started.elapsed() < ttl * 5 || (from_memory == 0 && started.elapsed() < Duration::from_secs(60)) {
        let read = near.get::<CourierPerformance>(&key, &ReadOptions::default()).await.expect("read");
        if read.as_of.view_lsn.is_some_and(|v| v >= lsn) {
            assert!(
                current(&read),
                "key {key}: an answer as of {:?} must reflect the change at {lsn}: {read:?}",
                read.as_of
            );
        } else {
            lagging += 1;
            from_memory += usize::from(read.from_near_cache);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (lagging, from_memory)
}

/// Behind one URL, the invalidation stream and a read can reach different consumer replicas.
/// A read answered by a replica that has not applied a change carries the old value as of its
/// older view: the near-cache may serve it as of that view, for its TTL, never as of the
/// stream's newer coverage. Whether the stream announced the change (a key event, a truncate's
/// reset) or the change was made before the stream began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_behind_replicas_never_serves_a_lagging_replicas_answer_as_current() {
    let (p, producer) = Pipeline::streaming(200).await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(60)).await;
    let front = LaggingReplicaFront::start(&consumer.base).await;
    let pg = p.db.client().await;
    let ttl = Duration::from_millis(300);
    let options = || ClientOptions::default().timeout(Duration::from_secs(5));
    // Reads through the front without a near-cache: what the read replica will answer frozen.
    let plain = Client::new(front.base(), options()).expect("client");
    let remember = |key: i64| {
        let plain = plain.clone();
        async move { plain.get::<CourierPerformance>(&key, &ReadOptions::default()).await.expect("read") }
    };
    let applied = |lsn: walcache_client::Lsn| {
        let consumer = &consumer;
        async move {
            let path = format!("/v1/tables/courier_performance/rows/1?min_lsn={lsn}&wait_ms=60000");
            assert_eq!(consumer.get(&path).await.0, 200, "the consumer applied {lsn}");
        }
    };

    // 1. A change made before the near-cache's stream began: the stream never lists it.
    remember(5).await;
    pg.execute("UPDATE courier_performance SET deliveries = 5555 WHERE courier_id = 5", &[]).await.expect("update");
    let before_stream = walcache_client::current_lsn(&pg).await.expect("lsn");
    applied(before_stream).await;
    front.freeze();
    let near = Client::new(
        front.base(),
        options().near_cache(NearCacheOptions::new(1000, ttl).follow_invalidations(Duration::from_secs(600))),
    )
    .expect("client");
    wait_for("the near-cache's stream", Duration::from_secs(30), || async {
        (consumer.metrics.invalidation_streams.get() == 1).then_some(())
    })
    .await;
    let deliveries = |read: &walcache_client::Read<CourierPerformance>| read.value.as_ref().map(|v| v.deliveries);
    let (lagging, from_memory) =
        read_while_lagging(&near, 5, before_stream, ttl, |r| deliveries(r) == Some(5555)).await;
    assert!(lagging > 0 && from_memory > 0, "the frozen replica answered, and was held for the TTL ({lagging})");
    front.thaw();

    // 2. A change the stream announces while the read replica lags.
    let get = |key: i64| {
        let near = near.clone();
        async move { near.get::<CourierPerformance>(&key, &ReadOptions::default()).await }
    };
    wait_for("keys 7 and 8 held past the TTL", Duration::from_secs(60), || async {
        let _ = get(7).await.ok()?;
        let _ = get(8).await.ok()?;
        tokio::time::sleep(ttl * 2).await;
        let (a, b) = (get(7).await.ok()?, get(8).await.ok()?);
        (a.from_near_cache && b.from_near_cache).then_some(())
    })
    .await;
    assert_ne!(deliveries(&get(7).await.expect("read")), Some(7777));
    pg.execute("UPDATE courier_performance SET deliveries = 7777 WHERE courier_id = 7", &[]).await.expect("update");
    let lsn = walcache_client::current_lsn(&pg).await.expect("lsn");
    // The stream announced the change once an untouched held key is vouched for past it.
    wait_for("the stream's coverage past the update", Duration::from_secs(60), || async {
        let held = get(8).await.ok()?;
        (held.from_near_cache && held.as_of.view_lsn.is_some_and(|v| v >= lsn)).then_some(())
    })
    .await;
    front.freeze();
    let (lagging, from_memory) = read_while_lagging(&near, 7, lsn, ttl, |r| deliveries(r) == Some(7777)).await;
    assert!(front.stale_answers() > 0 && lagging > 0 && from_memory > 0, "the frozen replica answered ({lagging})");
    // The replica catches up: the update is held and served as of the stream's coverage.
    front.thaw();
    wait_for("the update held from a replica that applied it", Duration::from_secs(60), || async {
        let read = get(7).await.ok()?;
        let past = read.as_of.view_lsn.is_some_and(|v| v >= lsn);
        (read.from_near_cache && past && deliveries(&read) == Some(7777)).then_some(())
    })
    .await;

    // 3. A truncate (a reset on the stream) the read replica has not applied.
    remember(9).await;
    pg.batch_execute("TRUNCATE courier_performance").await.expect("truncate");
    let truncated = walcache_client::current_lsn(&pg).await.expect("lsn");
    wait_for("the near-cache past the truncate", Duration::from_secs(60), || async {
        let read = get(8).await.ok()?;
        (read.state != RowState::Present && read.as_of.view_lsn.is_some_and(|v| v >= truncated)).then_some(())
    })
    .await;
    front.freeze();
    let (lagging, from_memory) = read_while_lagging(&near, 9, truncated, ttl, |r| r.state != RowState::Present).await;
    assert!(lagging > 0 && from_memory > 0, "the frozen replica answered with the row ({lagging})");
    front.thaw();
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_answers_when_the_cache_is_down_and_the_breaker_opens_and_closes() {
    let db = TestDb::create().await;
    db.seed(1, 200).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(30)).await;
    let port = consumer.running.addr.port();

    let fallbacks = Arc::new(AtomicUsize::new(0));
    let (db2, counter) = (db.clone(), fallbacks.clone());
    let reads = Fallback::<CourierPerformance, _>::new(client(&format!("http://127.0.0.1:{port}")), move |id: i64| {
        let (db, counter) = (db2.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(db.courier(id).await)
        }
    });
    let answer = reads.get(&7, &ReadOptions::default()).await.expect("answer");
    assert_eq!(answer.source, Source::Cache);
    assert_eq!(answer.value.as_ref().map(|c| c.courier_id), Some(7));
    assert!(answer.as_of.is_some_and(|a| a.view_lsn.is_some()));
    let absent = reads.get(&99_999, &ReadOptions::default()).await.expect("answer");
    assert_eq!((absent.source, absent.value), (Source::Cache, None), "a definite absent needs no fallback");

    // The cache hangs: a listener on its port accepts connections and never answers. Answers
    // come from the old call, and after three failed attempts (each read tries twice) the
    // breaker opens.
    consumer.stop().await;
    let hung_cache = BlackHole::bind(port).await;
    let first = reads.get(&7, &ReadOptions::default()).await.expect("fallback answers");
    assert_eq!((first.source, first.value.as_ref().map(|c| c.courier_id)), (Source::Fallback, Some(7)));
    assert!(
        matches!(first.reason, Some(FallbackReason::Cache(ClientError::Transport(_) | ClientError::Timeout(_)))),
        "{:?}",
        first.reason
    );
    assert!(hung_cache.accepted() >= 1, "the attempts went to the (hung) cache");
    // The second read's first attempt is the third failure: the breaker opens and its retry
    // is refused without a request.
    let second = reads.get(&7, &ReadOptions::default()).await.expect("fallback answers");
    assert_eq!(second.source, Source::Fallback);
    assert!(matches!(second.reason, Some(FallbackReason::Cache(ClientError::CircuitOpen(_)))), "{:?}", second.reason);
    assert_eq!(reads.client().breaker().state(), BreakerState::Open);
    // An open circuit fails fast: the read goes straight to the fallback and not one
    // connection reaches the cache (the property, not how many milliseconds it took).
    let reached_before = hung_cache.accepted();
    let a = reads.get(&8, &ReadOptions::default()).await.expect("fallback answers");
    assert!(matches!(a.reason, Some(FallbackReason::Cache(ClientError::CircuitOpen(_)))), "{:?}", a.reason);
    assert_eq!((a.source, a.value.as_ref().map(|c| c.courier_id)), (Source::Fallback, Some(8)));
    assert_eq!(hung_cache.accepted(), reached_before, "an open circuit sent a request to the cache");
    assert_eq!(fallbacks.load(Ordering::SeqCst), 3);
    hung_cache.close().await;

    // It comes back: the half-open probe succeeds and the breaker closes.
    let consumer = p.start_consumer_on(port, "").await;
    consumer.wait_ready(Duration::from_secs(30)).await;
    wait_for("the breaker to let a probe through", OPEN_FOR * 6, || async {
        (reads.client().breaker().state() == BreakerState::HalfOpen).then_some(())
    })
    .await;
    let a = reads.get(&7, &ReadOptions::default()).await.expect("answer");
    assert_eq!(a.source, Source::Cache);
    assert_eq!(reads.client().breaker().state(), BreakerState::Closed);

    // A view older than the caller accepts: the fallback answers.
    producer.stop().await.expect("drain");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let a = reads.get(&7, &ReadOptions::default().max_staleness(Duration::from_millis(500))).await.expect("answer");
    assert_eq!(a.source, Source::Fallback);
    assert!(matches!(a.reason, Some(FallbackReason::Cache(ClientError::TooStale(_)))), "{:?}", a.reason);
    assert_eq!(reads.client().breaker().state(), BreakerState::Closed, "a stale view is not a failing cache");
    consumer.stop().await;
}

async fn run_verify(db: &TestDb, base: &str, wait: Duration) -> walcache_client::verify::VerifyReport {
    let mut pg = db.client().await;
    verify(
        &mut pg,
        &client(base),
        &VerifyOptions {
            source_table: "public.courier_performance".into(),
            table: "courier_performance".into(),
            wait,
            sample: 5,
        },
        |_, _| {},
    )
    .await
    .expect("verify runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_stays_quiet_on_a_healthy_view_and_finds_injected_drift() {
    let db = TestDb::create().await;
    db.seed(1, 3_000).await;
    db.client()
        .await
        .batch_execute("UPDATE courier_performance SET rating = NULL WHERE courier_id = 13")
        .await
        .expect("dirty");
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(30)).await;

    // Healthy, even with writes going on.
    // How many rows change between verify's snapshot and its read of the view depends on the
    // machine's speed; that every source row is accounted for does not.
    let writer = walcache_tests::writer::Writer::start(&db, 3_000, 10_000_000, Duration::from_millis(2)).await;
    let report = run_verify(&db, &consumer.base, Duration::from_secs(90)).await;
    let committed = writer.stop().await;
    assert_eq!(report.verdict, Verdict::Healthy, "{report:#?}");
    assert_eq!(report.contract_violations.count, 1);
    assert_eq!(report.contract_violations.sample, vec![serde_json::json!(13)]);
    assert_eq!((report.missing.count, report.extra.count, report.different.count, report.unknown), (0, 0, 0, 0));
    assert!(
        report.matching + report.changed_after_snapshot + report.contract_violations.count >= report.source_rows,
        "a source row is neither matching, nor changed after the snapshot, nor a contract violation: {report:#?}"
    );
    // Each of the writer's transactions changes one row: no more rows can have moved on.
    assert!(
        report.changed_after_snapshot <= committed.len() as u64,
        "{} rows changed after the snapshot, but the writer committed only {} transactions",
        report.changed_after_snapshot,
        committed.len()
    );
    assert!(report.matching > 0, "{report:#?}");
    // The view is honest about the row it could not take: unknown, not absent.
    let (status, body) = consumer.row(13).await;
    assert_eq!((status, body["state"].as_str()), (409, Some("unknown")), "{body}");

    // Drift 1: a row removed from the view (a delete the source never made).
    let registry = Registry::builtin().expect("registry");
    let contract = registry.contract("courier_performance").expect("contract");
    let key = contract.key_message(&contract.key_from_text(&["21"]).expect("key"));
    let mut value = Vec::new();
    let position =
        Position { lsn: db.current_lsn().await, index: 0, txid: 3, commit_ts_micros: now_micros(), snapshot: false };
    write_envelope(
        &mut value,
        &contract.latest().doc.header,
        Op::Delete,
        None,
        None,
        &position,
        "public.courier_performance",
    );
    produce(&p.kafka, &p.topic, None, Some(&key), Some(&value)).await;
    wait_for("the injected delete", Duration::from_secs(60), || async {
        (consumer.row(21).await.1["state"] == "deleted").then_some(())
    })
    .await;
    let report = run_verify(&db, &consumer.base, Duration::from_secs(90)).await;
    assert_eq!(report.verdict, Verdict::Drift, "{report:#?}");
    assert_eq!((report.missing.count, report.missing.sample.clone()), (1, vec![serde_json::json!(21)]));

    // Drift 2: a change made behind a stopped pipeline, and skipped by advancing the slot.
    producer.stop().await.expect("drain");
    let client = db.client().await;
    client
        .execute("UPDATE courier_performance SET deliveries = 31337 WHERE courier_id = 22", &[])
        .await
        .expect("update");
    // With the pipeline stopped the view cannot reach the snapshot: inconclusive, not drift.
    let report = run_verify(&db, &consumer.base, Duration::from_millis(800)).await;
    assert_eq!(report.verdict, Verdict::Inconclusive, "{report:#?}");
    client
        .execute("SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())", &[&p.slot])
        .await
        .expect("advance the slot past the change");
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let report = run_verify(&db, &consumer.base, Duration::from_secs(90)).await;
    assert_eq!(report.verdict, Verdict::Drift, "{report:#?}");
    assert_eq!(report.different.sample, vec![serde_json::json!(22)]);
    assert_eq!(report.missing.sample, vec![serde_json::json!(21)]);

    // The CLI says the same with its exit code, over TLS verified as libpq would.
    let cli_verify = |ca: &std::path::Path| {
        std::process::Command::new(binary("walcache"))
            .args(["--url", &consumer.base, "verify", "--postgres"])
            .arg(format!(
                "postgres://postgres:{}@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
                db.env.pg_password,
                db.env.pg_port,
                db.name,
                ca.display()
            ))
            .output()
            .expect("walcache verify")
    };
    let out = cli_verify(&db.env.pg_ca);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verdict: DRIFT") && stdout.contains("different: 1  e.g. 22"), "{stdout}");
    let scratch = tempfile::tempdir().expect("temp dir");
    let out = cli_verify(&walcache_tests::unrelated_ca(scratch.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("TLS to Postgres with sslmode=verify-full failed") && stderr.contains("sslrootcert"),
        "{stderr}"
    );
    consumer.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_answers_with_helpful_exit_codes() {
    let (p, producer) = Pipeline::streaming(20).await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(30)).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(binary("walcache"))
            .arg("--url")
            .arg(&consumer.base)
            .args(args)
            .output()
            .expect("cli");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = cli(&["get", "courier_performance", "5"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("courier_performance 5 is present") && out.contains("view complete to"), "{out}");
    let (code, out) = cli(&["get", "courier_performance", "5000"]);
    assert_eq!(code, Some(3), "{out}");
    let (code, out) = cli(&["get", "drivers", "5"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("unknown_table"), "{out}");
    let (code, out) = cli(&["--json", "status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(serde_json::from_str::<serde_json::Value>(out.trim()).is_ok_and(|s| s["ready"] == true), "{out}");
    let out = std::process::Command::new(binary("walcache"))
        .args(["--url", &format!("http://127.0.0.1:{}", free_port()), "status"])
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is walcache-consumer running"));
    consumer.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_half_open_probe_is_given_back() {
    let hung_cache = BlackHole::bind_any().await;
    let port = hung_cache.port();
    let client = Client::new(
        &format!("http://127.0.0.1:{port}"),
        ClientOptions::default()
            .timeout(Duration::from_millis(500))
            .retries(0)
            .breaker(BreakerConfig::new(1, Duration::from_millis(100))),
    )
    .expect("client");
    let options = ReadOptions::default();
    let read = || client.get::<CourierPerformance>(&7, &options);
    assert!(matches!(read().await, Err(ClientError::Timeout(_))));
    assert_eq!(client.breaker().state(), BreakerState::Open);
    wait_for("the breaker to half-open", Duration::from_secs(30), || async {
        (client.breaker().state() == BreakerState::HalfOpen).then_some(())
    })
    .await;
    // The probe's caller gives up (a request timeout of its own, a client disconnect).
    let reached = hung_cache.accepted();
    assert!(tokio::time::timeout(Duration::from_millis(100), read()).await.is_err(), "the probe was cancelled");
    wait_for("the probe to reach the cache", Duration::from_secs(30), || async {
        (hung_cache.accepted() > reached).then_some(())
    })
    .await;
    // The next call probes again instead of being refused for ever.
    let reached = hung_cache.accepted();
    let next = read().await;
    assert!(matches!(next, Err(ClientError::Timeout(_))), "a new probe, not a refusal: {next:?}");
    assert!(hung_cache.accepted() > reached, "the new probe reached the cache");
    hung_cache.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_on_a_lagging_view_answers_in_time_and_never_trips_the_breaker() {
    let db = TestDb::create().await;
    db.seed(1, 10).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let consumer = p.start_consumer("").await;
    consumer.wait_ready(Duration::from_secs(30)).await;
    let client = Client::new(
        &consumer.base,
        ClientOptions::default().timeout(Duration::from_secs(1)).retries(0).breaker(BreakerConfig::new(1, OPEN_FOR)),
    )
    .expect("client");
    // The caller's own commit, and its position as the client helper reads it. With
    // synchronous_commit off the commit record may not be written yet when the call returns:
    // the helper's position must still be at or past it.
    let pg = db.client().await;
    pg.batch_execute("SET synchronous_commit = off").await.expect("async commit");
    pg.execute("UPDATE courier_performance SET deliveries = 5 WHERE courier_id = 3", &[]).await.expect("update");
    let mine = walcache_client::current_lsn(&pg).await.expect("lsn");
    let read = client.get::<CourierPerformance>(&3, &ReadOptions::default().min_lsn(mine)).await.expect("read");
    assert_eq!(read.value.map(|c| c.deliveries), Some(5), "read-your-writes");
    // A position the view will not reach within the server's default wait: the answer is
    // "not reached", not a client timeout, and a lagging view is not a failing cache.
    let ahead = walcache_client::Lsn(mine.0 + (1 << 30));
    let lagging = client.get::<CourierPerformance>(&3, &ReadOptions::default().min_lsn(ahead)).await;
    assert!(matches!(lagging, Err(ClientError::MinLsnNotReached(_))), "{lagging:?}");
    assert_eq!(client.breaker().state(), BreakerState::Closed);
    consumer.stop().await;
    producer.stop().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_a_configuration_error_that_is_counted_and_can_fail() {
    use walcache_client::{ClientMetrics, FallbackError, OnRejected};
    let db = TestDb::create().await;
    db.seed(1, 10).await;
    let p = Pipeline::new(&db);
    let producer = p.start_in_process();
    producer.wait_ready(Duration::from_secs(60)).await;
    let consumer = p.start_consumer("auth_token = \"the-right-token\"").await;
    consumer.wait_ready(Duration::from_secs(30)).await;

    let registry = prometheus::Registry::new();
    let metrics = ClientMetrics::register(&registry).expect("metrics");
    let wrong =
        Client::new(&consumer.base, ClientOptions::default().token("a-stale-token").metrics(metrics)).expect("client");
    let db2 = db.clone();
    let reads = Fallback::<CourierPerformance, _>::new(wrong.clone(), move |id: i64| {
        let db = db2.clone();
        async move { Ok::<_, std::convert::Infallible>(db.courier(id).await) }
    });
    // By default the fallback answers, but the refusal is visible: reason and metrics.
    let a = reads.get(&3, &ReadOptions::default()).await.expect("fallback answers");
    assert_eq!(a.source, Source::Fallback);
    assert!(
        matches!(&a.reason, Some(FallbackReason::Cache(ClientError::Rejected { status: 401, .. }))),
        "{:?}",
        a.reason
    );
    let value = |name: &str, labels: &[(&str, &str)]| walcache_tests::registry_value(&registry, name, labels);
    assert_eq!(value("walcache_client_answers_total", &[("source", "fallback"), ("reason", "rejected")]), 1.0);
    assert_eq!(value("walcache_client_requests_total", &[("outcome", "rejected")]), 1.0, "never retried");
    // A service that wants to know at once fails instead.
    let strict = reads.on_rejected(OnRejected::Fail);
    let refused = strict.get(&3, &ReadOptions::default()).await;
    assert!(matches!(refused, Err(FallbackError::Rejected(ClientError::Rejected { status: 401, .. }))), "{refused:?}");
    // The right token: answers from the cache, counted as such.
    let right = Client::new(&consumer.base, ClientOptions::default().token("the-right-token")).expect("client");
    assert_eq!(
        right.get::<CourierPerformance>(&3, &ReadOptions::default()).await.expect("read").value.map(|c| c.courier_id),
        Some(3)
    );
    consumer.stop().await;
    producer.stop().await.expect("drain");
}

/// A stand-in consumer that answers each request with the next scripted body (as two
/// consumer instances behind a load balancer might, one of them behind the other).
async fn scripted_cache(bodies: Vec<serde_json::Value>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        for body in bodies {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await;
            let body = body.to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (base, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_never_replaces_a_newer_answer_with_an_older_one() {
    let row = |deliveries: i64, view_lsn: &str| {
        serde_json::json!({
            "state": "present",
            "value": {
                "courier_id": 7, "city": "Lisbon", "zone": null, "tier": "gold", "rating": "4.50",
                "deliveries": deliveries, "on_time_rate": 0.9, "acceptance_rate": null, "cancellations": 0,
                "active": true, "updated_at": "2026-11-30T00:00:00Z"
            },
            "as_of": { "row_lsn": "0/10", "row_commit_time": null, "row_txid": 5, "view_lsn": view_lsn, "view_time": null },
            "staleness_ms": 0
        })
    };
    // A read-your-writes read answered by an up-to-date instance, then a slower one answered by
    // a lagging instance: the near-cache must keep the newer.
    let (base, server) = scripted_cache(vec![row(20, "0/200"), row(10, "0/100")]).await;
    let client = Client::new(
        &base,
        // The scripted cache speaks JSON.
        ClientOptions::default()
            .wire(Wire::Json)
            .near_cache(walcache_client::NearCacheOptions::new(100, Duration::from_secs(60))),
    )
    .expect("client");
    let fresh = ReadOptions::default().min_lsn(walcache_client::Lsn(0x10));
    let newer = client.get::<CourierPerformance>(&7, &fresh).await.expect("first");
    let older = client.get::<CourierPerformance>(&7, &fresh).await.expect("second");
    assert_eq!((newer.value.map(|c| c.deliveries), older.value.map(|c| c.deliveries)), (Some(20), Some(10)));
    let cached = client.get::<CourierPerformance>(&7, &ReadOptions::default()).await.expect("near-cache");
    assert!(cached.from_near_cache, "served from the near-cache");
    assert_eq!(cached.value.map(|c| c.deliveries), Some(20), "the near-cache kept the newer answer");
    assert_eq!(cached.as_of.view_lsn, Some(walcache_client::Lsn(0x200)));
    server.abort();
}
