//! Reads the topics into the view: restore from the beginning, then follow.
//!
//! ```text
//!  start: every partition of the table topics + the watermark topic, from offset 0
//!         (a topic that does not exist yet is waited for, not ready, with the reason)
//!         targets = high watermarks now ── ready once every partition reaches its target
//!  loop:  message ─┬─ table topic ──► View::apply_table_message ─► applied | unavailable | ignored
//!                  │                                              ├► bad ─► dead letter (key unknown)
//!                  │                                              └► blocking ─► View::block
//!                  └─ watermarks  ──► Tracker::offer
//!         positions ──► Tracker::advance ──► View::set_coverage(table) (min_lsn waiters wake)
//! ```
//!
//! This is the GlobalKTable model: every instance reads every partition, so any instance
//! answers any key. Nothing is committed to Kafka; a restart rebuilds the view from the
//! compacted topics. Within one process, a reconnect resumes from the offsets already read
//! with the same watermark tracker, so coverage never moves backwards.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use walcache_common::dead_letter::{DeadLetter, KafkaOrigin, Stage};
use walcache_common::kafka::{Metadata, QuietContext, client_config, read_to_end};
use walcache_schemas::{
    POSITION_HEADER, Position, Registry, UNAVAILABLE_HEADER, Watermark, micros_to_rfc3339, now_micros,
};

use crate::ConsumerError;
use crate::config::ConsumerConfig;
use crate::view::{BadMessage, Blocked, Outcome, Restore, View};
use crate::watermark::Tracker;

/// What has been read, kept across reconnects.
struct Progress {
    /// Next offset to read per (topic, partition): everything before it has been applied.
    next: HashMap<(String, i32), i64>,
    tracker: Tracker,
}

/// Runs until `cancel` fires; transient failures reconnect with backoff and resume from the
/// offsets already read.
pub async fn run(view: Arc<View>, config: ConsumerConfig, cancel: CancellationToken) -> Result<(), ConsumerError> {
    let mut backoff = Duration::from_millis(500);
    let mut progress = Progress {
        next: HashMap::new(),
        tracker: Tracker::new(
            config.watermarks.producer.clone(),
            view.tables.iter().map(|t| t.spec.topic.clone()).collect(),
        ),
    };
    loop {
        match session(&view, &config, &cancel, &mut progress).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && !cancel.is_cancelled() => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reading the topics failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}

fn instance_name(config: &ConsumerConfig) -> String {
    config.http.instance.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "walcache-consumer".into())
    })
}

/// Every topic's partitions, waiting (not ready, with the reason) while a topic does not
/// exist yet: in compose and Kubernetes the consumer often starts before the producer.
/// `None` when cancelled.
async fn wait_for_topics(
    view: &View,
    metadata: &Metadata,
    topics: &[String],
    cancel: &CancellationToken,
) -> Result<Option<Vec<(String, Vec<i32>)>>, ConsumerError> {
    let mut logged = false;
    loop {
        let mut found = Vec::with_capacity(topics.len());
        let mut missing = None;
        for topic in topics {
            let partitions = metadata.partitions(topic).await?;
            if partitions.is_empty() {
                missing = Some(topic.clone());
                break;
            }
            found.push((topic.clone(), partitions));
        }
        let Some(topic) = missing else {
            return Ok(Some(found));
        };
        if !view.is_ready() {
            view.health
                .set_not_ready(format!("topic {topic} does not exist yet (has the producer started?); waiting for it"));
        }
        if !logged {
            tracing::warn!(topic = %topic, "topic does not exist yet (has the producer started?); waiting for it");
            logged = true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn session(
    view: &Arc<View>,
    config: &ConsumerConfig,
    cancel: &CancellationToken,
    progress: &mut Progress,
) -> Result<(), ConsumerError> {
    let kafka = &config.kafka;
    let instance = instance_name(config);
    let metadata = Metadata::new(kafka, &format!("walcache-consumer-{instance}"))?;

    // Every partition of every topic, from where this process left off (or the beginning),
    // with its restore target.
    let mut topics: Vec<String> = view.tables.iter().map(|t| t.spec.topic.clone()).collect();
    topics.push(config.watermarks.topic.clone());
    let Some(found) = wait_for_topics(view, &metadata, &topics, cancel).await? else {
        return Ok(());
    };
    if !view.is_ready() {
        view.health.set_not_ready("restoring the view from the topics");
    }
    let mut tpl = TopicPartitionList::new();
    let mut targets: HashMap<(String, i32), i64> = HashMap::new();
    for (topic, partitions) in found {
        for p in partitions {
            let (low, high) = metadata.watermarks(&topic, p).await?;
            let key = (topic.clone(), p);
            // Nothing before the low watermark can be read: an empty partition, or one whose
            // start was deleted, counts as read up to there (watermarks pointing into it are
            // reached).
            let next = *progress.next.entry(key.clone()).and_modify(|n| *n = (*n).max(low)).or_insert(low);
            tpl.add_partition_offset(&topic, p, Offset::Offset(next))
                .map_err(|e| ConsumerError::kafka("assigning partitions", e))?;
            targets.insert(key, high);
            view.set_partition(&topic, p, |s| {
                s.target = high;
                s.high = high;
                s.next = next;
            });
        }
    }
    let consumer: StreamConsumer<QuietContext> = client_config(
        kafka,
        &[
            ("client.id", format!("walcache-consumer-{instance}")),
            ("group.id", format!("walcache-consumer-{instance}")),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("enable.partition.eof", "true".into()),
            // An offset that retention removed meanwhile: read what is left, never skip to the end.
            ("auto.offset.reset", "earliest".into()),
            // Freshness: do not let the broker hold fetches long when there is nothing new.
            ("fetch.wait.max.ms", "10".into()),
            ("fetch.min.bytes", "1".into()),
        ],
        &[],
    )?
    .create_with_context(QuietContext)
    .map_err(|e| ConsumerError::kafka("creating the consumer", e))?;
    consumer.assign(&tpl).map_err(|e| ConsumerError::kafka("assigning partitions", e))?;

    let mut dead = DeadLetters::new(config, &metadata, &instance).await?;
    let next = &mut progress.next;
    let tracker = &mut progress.tracker;
    let mut remaining: HashSet<(String, i32)> = targets
        .iter()
        .filter(|(k, high)| next.get(*k).copied().unwrap_or(0) < **high)
        .map(|(k, _)| k.clone())
        .collect();
    let total: i64 = targets.values().sum();
    let started = Instant::now();
    let mut events: u64 = 0;
    let mut last_log = Instant::now();
    if !view.is_ready() && remaining.is_empty() {
        view.set_ready();
        tracing::info!("topics are empty: the view is ready");
    }
    advance(view, tracker, next);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => dead.reap(),
            message = consumer.recv() => {
                let message = match message {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(p)) => {
                        // At the end of a partition: whatever is compacted away before the
                        // high watermark counts as read.
                        for topic in eof_topics(&consumer, p) {
                            if let Some(pos) = position_of(&consumer, &topic, p) {
                                let key = (topic.clone(), p);
                                let n = next.entry(key.clone()).or_insert(0);
                                *n = (*n).max(pos);
                                view.set_partition(&topic, p, |s| s.next = s.next.max(pos));
                            }
                            remaining.retain(|(t, rp)| !(t == &topic && *rp == p && next.get(&(t.clone(), *rp)).copied().unwrap_or(0) >= targets.get(&(t.clone(), *rp)).copied().unwrap_or(0)));
                        }
                        advance(view, tracker, next);
                        continue;
                    }
                    Err(e) => return Err(ConsumerError::kafka("receiving messages", e)),
                };
                events += 1;
                handle(view, tracker, &mut dead, &message, &config.watermarks.topic);
                let key = (message.topic().to_string(), message.partition());
                let n = message.offset() + 1;
                view.set_partition(&key.0, key.1, |s| s.next = n);
                if !remaining.is_empty() && targets.get(&key).is_some_and(|t| n >= *t) {
                    remaining.remove(&key);
                }
                next.insert(key, n);
                advance(view, tracker, next);
            }
        }
        if !view.is_ready() {
            let done: i64 = targets.iter().map(|(k, t)| next.get(k).copied().unwrap_or(0).min(*t)).sum();
            let secs = started.elapsed().as_secs_f64();
            view.set_restore(Restore { total, done, events, seconds: secs });
            if remaining.is_empty() {
                view.set_ready();
                tracing::info!(
                    events,
                    secs,
                    events_per_sec = (events as f64 / secs.max(1e-9)) as u64,
                    "view restored; ready"
                );
            } else if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                tracing::info!(
                    events,
                    events_per_sec = (events as f64 / secs.max(1e-9)) as u64,
                    percent = (100 * done / total.max(1)) as u32,
                    "restoring the view"
                );
            }
        }
    }
}

fn eof_topics(consumer: &StreamConsumer<QuietContext>, partition: i32) -> Vec<String> {
    // PartitionEOF carries only the partition number; check each assigned topic.
    consumer
        .assignment()
        .map(|tpl| {
            tpl.elements().iter().filter(|e| e.partition() == partition).map(|e| e.topic().to_string()).collect()
        })
        .unwrap_or_default()
}

fn position_of(consumer: &StreamConsumer<QuietContext>, topic: &str, partition: i32) -> Option<i64> {
    let tpl = consumer.position().ok()?;
    match tpl.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

fn advance(view: &View, tracker: &mut Tracker, next: &HashMap<(String, i32), i64>) {
    // A blocked partition counts as read only up to the message it could not apply.
    let moved = tracker.advance(|t, p| {
        let n = next.get(&(t.to_string(), p)).copied()?;
        Some(view.blocked_at(t, p).map_or(n, |b| n.min(b)))
    });
    for (index, coverage) in moved {
        view.set_coverage(index, coverage, tracker.feeder(index));
    }
}

fn handle(view: &View, tracker: &mut Tracker, dead: &mut DeadLetters, m: &BorrowedMessage<'_>, watermark_topic: &str) {
    let started = Instant::now();
    if m.topic() == watermark_topic {
        match m.payload().map(|p| Registry::builtin().and_then(|r| Watermark::decode(r, p))) {
            Some(Ok(wm)) => {
                tracker.offer(wm);
            }
            Some(Err(e)) => tracing::warn!(error = %e, offset = m.offset(), "undecodable watermark record ignored"),
            None => {}
        }
        return;
    }
    let Some(index) = view.table_index_of_topic(m.topic()) else { return };
    let header = |name: &str| m.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value));
    let header_position = header(POSITION_HEADER).and_then(Position::from_header);
    let unavailable = header(UNAVAILABLE_HEADER).and_then(|v| std::str::from_utf8(v).ok());
    let now = now_micros();
    let outcome = view.apply_table_message(index, m.key(), m.payload(), header_position, unavailable, now);
    let table = &view.tables[index];
    let metrics = &view.metrics;
    match outcome {
        Outcome::Applied(op, position) => {
            metrics.applied.with_label_values(&[&table.spec.name, op.as_str()]).inc();
            if view.is_ready() && !position.snapshot {
                metrics.commit_to_apply_seconds.observe(((now - position.commit_ts_micros).max(0) as f64) / 1e6);
            }
        }
        Outcome::Unavailable(_) => metrics.applied.with_label_values(&[&table.spec.name, "unavailable"]).inc(),
        Outcome::Ignored(reason) => metrics.ignored.with_label_values(&[&table.spec.name, reason]).inc(),
        Outcome::Bad(ref bad) | Outcome::Blocking(ref bad) => {
            view.dead_letters.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics.dead_letters.with_label_values(&[bad.reason_code]).inc();
            dead.publish(&table.spec.name, m, bad);
            if matches!(outcome, Outcome::Blocking(_)) {
                view.block(Blocked {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    reason: format!("{}: {}", bad.reason_code, bad.reason),
                });
            } else {
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    reason = bad.reason_code,
                    "message set aside: it cannot be applied; its key reads unknown until a newer event"
                );
            }
        }
    }
    metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
}

/// Keeps entry counts, cache bytes, staleness and lag gauges current, beside the applier (its
/// broker round trips must not hold up applying).
pub async fn refresh_gauges(view: Arc<View>, config: ConsumerConfig, cancel: CancellationToken) {
    let metadata = match Metadata::new(&config.kafka, &format!("walcache-consumer-{}-lag", instance_name(&config))) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "lag measurement disabled");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => refresh_once(&view, &metadata).await,
        }
    }
}

async fn refresh_once(view: &View, metadata: &Metadata) {
    for t in &view.tables {
        let s = t.store.stats();
        let labels = [t.spec.name.as_str()];
        view.metrics.entries.with_label_values(&labels).set(s.live.load(std::sync::atomic::Ordering::Relaxed));
        view.metrics.tombstones.with_label_values(&labels).set(s.tombstones.load(std::sync::atomic::Ordering::Relaxed));
        view.metrics.unknown_keys.with_label_values(&labels).set(s.unknown.load(std::sync::atomic::Ordering::Relaxed));
        if let Some(c) = t.coverage() {
            view.metrics
                .view_staleness
                .with_label_values(&labels)
                .set(((now_micros() - c.commit_ts_micros).max(0) as f64) / 1e6);
        }
        view.metrics.cache_bytes.with_label_values(&labels).set(t.store.weighted_bytes() as i64);
        view.metrics
            .evicted_rows
            .with_label_values(&labels)
            .set(s.evicted_rows.load(std::sync::atomic::Ordering::Relaxed) as i64);
    }
    for ((topic, p), state) in view.partitions() {
        if let Ok((_, high)) = metadata.watermarks(&topic, p).await {
            view.set_partition(&topic, p, |s| s.high = high);
            view.metrics.lag.with_label_values(&[&topic, &p.to_string()]).set((high - state.next).max(0));
        }
    }
}

/// Publishes dead letters without ever blocking the applier, once per Kafka origin (it reads
/// the dead-letter topic at start, so a restart does not report the same garbage again).
struct DeadLetters {
    producer: Option<FutureProducer>,
    topic: String,
    instance: String,
    known: HashSet<(String, i32, i64)>,
    pending: VecDeque<DeliveryFuture>,
}

impl DeadLetters {
    async fn new(config: &ConsumerConfig, metadata: &Metadata, instance: &str) -> Result<Self, ConsumerError> {
        let cfg = &config.dead_letter;
        let mut known = HashSet::new();
        let producer = if cfg.publish {
            let records =
                read_to_end(&config.kafka, metadata, &cfg.topic, &format!("walcache-consumer-{instance}-dlq"), 200_000)
                    .await?;
            for r in records {
                if let Some(letter) = r.value.as_deref().and_then(|v| serde_json::from_slice::<DeadLetter>(v).ok())
                    && letter.stage == Stage::Consumer
                    && let Some(o) = letter.origin
                {
                    known.insert((o.topic, o.partition, o.offset));
                }
            }
            let p: FutureProducer = client_config(
                &config.kafka,
                &[("client.id", format!("walcache-consumer-{instance}-dlq")), ("linger.ms", "20".into())],
                &[("acks", "all", "a dead letter must not be lost")],
            )?
            .create()
            .map_err(|e| ConsumerError::kafka("creating the dead-letter producer", e))?;
            Some(p)
        } else {
            None
        };
        Ok(DeadLetters {
            producer,
            topic: cfg.topic.clone(),
            instance: instance.to_string(),
            known,
            pending: VecDeque::new(),
        })
    }

    fn publish(&mut self, table: &str, m: &BorrowedMessage<'_>, bad: &BadMessage) {
        let Some(producer) = &self.producer else { return };
        let origin = (m.topic().to_string(), m.partition(), m.offset());
        if !self.known.insert(origin.clone()) {
            return;
        }
        let b64 = |b: Option<&[u8]>| b.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        let letter = DeadLetter {
            stage: Stage::Consumer,
            table: Some(table.to_string()),
            key: bad.key.clone(),
            lsn: None,
            txid: None,
            index: None,
            commit_time: None,
            op: None,
            reason_code: bad.reason_code.into(),
            reason: bad.reason.clone(),
            field: None,
            row: None,
            raw_key_base64: b64(m.key()),
            raw_value_base64: b64(m.payload()),
            origin: Some(KafkaOrigin { topic: origin.0.clone(), partition: origin.1, offset: origin.2 }),
            written_by: self.instance.clone(),
            written_at: micros_to_rfc3339(now_micros()),
        };
        let Ok(value) = serde_json::to_vec(&letter) else { return };
        let key = format!("consumer:{}:{}:{}", origin.0, origin.1, origin.2);
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic).key(key.as_str()).payload(&value[..]);
        match producer.send_result(record) {
            Ok(f) => {
                self.pending.push_back(f);
                if self.pending.len() > 1000 {
                    self.pending.pop_front();
                }
            }
            Err((e, _)) => tracing::warn!(error = %e, "could not queue a dead letter; it is counted and logged only"),
        }
    }

    fn reap(&mut self) {
        use futures::FutureExt;
        while let Some(front) = self.pending.front_mut() {
            match front.now_or_never() {
                None => break,
                Some(Ok(Ok(_))) => {
                    self.pending.pop_front();
                }
                Some(_) => {
                    tracing::warn!(topic = %self.topic, "a dead letter was not delivered; it is counted and logged only");
                    self.pending.pop_front();
                }
            }
        }
    }
}
