//! The Kafka side of the producer: an ordered in-flight queue that turns acknowledgements into
//! confirmable source positions.
//!
//! ```text
//!  send(ev) send(ev) checkpoint(commit 0/1A0) send(ev) checkpoint(commit 0/1C8) ...
//!     │        │            │                    │            │
//!     ▼        ▼            ▼                    ▼            ▼
//!  [ ack? ][ ack? ][ CP 0/1A0 ][ ack? ][ CP 0/1C8 ]  <- FIFO; only the head is awaited
//!                        └─ completes once every delivery before it is acknowledged:
//!                           then (and only then) 0/1A0 may be confirmed to the slot
//! ```
//!
//! Every message (row events, tombstones, dead letters) goes through the queue, so a position
//! is confirmed only after everything at or before it is in Kafka (invariant 1). The queue is
//! bounded by `max_in_flight`: when Kafka is slow, `send` waits and the pipeline stops reading
//! the slot (invariant 6). Acknowledged offsets per partition feed the watermark records.

use std::collections::{BTreeMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use prometheus::IntCounter;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use walcache_common::config::KafkaConfig;
use walcache_common::kafka::{Metadata, client_config};
use walcache_schemas::{
    Lsn, POSITION_HEADER, PartitionOffset, Position, ProducerState, Registry, Watermark, now_micros,
};

use crate::ProducerError;
use crate::metrics::Metrics;

/// Index into the sink's topic table.
pub type TopicId = usize;

/// Why a position may be confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// A transaction's commit (its end LSN).
    Commit,
    /// The end of the initial snapshot (the slot's consistent point).
    Snapshot,
    /// A keepalive while no transaction was open: everything before it has been sent.
    Idle,
}

impl CheckpointKind {
    pub fn label(self) -> &'static str {
        match self {
            CheckpointKind::Commit => "commit",
            CheckpointKind::Snapshot => "snapshot",
            CheckpointKind::Idle => "idle",
        }
    }
}

/// A source position that becomes confirmable once everything queued before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub lsn: Lsn,
    /// Commit (or server) time of the position, Unix microseconds.
    pub commit_ts_micros: i64,
    pub kind: CheckpointKind,
}

/// Counters bumped when a message is acknowledged.
#[derive(Debug, Clone)]
pub struct DeliveryTag {
    pub events: Option<IntCounter>,
    pub bytes: Option<IntCounter>,
}

enum Pending {
    Delivery { future: DeliveryFuture, topic: TopicId, tag: DeliveryTag, size: u64, enqueued: Instant },
    Checkpoint(Checkpoint),
}

/// The producer's Kafka sink.
pub struct Sink {
    producer: FutureProducer,
    topics: Vec<String>,
    queue: VecDeque<Pending>,
    in_flight: usize,
    max_in_flight: usize,
    /// Next offset after the last acknowledged message, per (topic, partition).
    offsets: BTreeMap<(TopicId, i32), i64>,
    completed: Option<Checkpoint>,
    watermark_deliveries: VecDeque<DeliveryFuture>,
    watermark_topic: String,
    producer_name: String,
    max_message_bytes: usize,
    metrics: Metrics,
    /// Topics left out of watermarks: tables whose first copy is not complete (no coverage).
    unvouched: std::collections::BTreeSet<TopicId>,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("topics", &self.topics)
            .field("in_flight", &self.in_flight)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// `topics` are the topics this sink writes to, addressed by index afterwards.
    pub fn new(
        kafka: &KafkaConfig,
        producer_name: &str,
        topics: Vec<String>,
        watermark_topic: &str,
        max_in_flight: usize,
        metrics: Metrics,
    ) -> Result<Self, ProducerError> {
        let queue_messages = (max_in_flight * 2).max(100_000);
        let cfg = client_config(
            kafka,
            &[
                ("client.id", format!("walcache-producer-{producer_name}")),
                ("linger.ms", "5".into()),
                ("message.timeout.ms", "300000".into()),
                ("queue.buffering.max.messages", queue_messages.to_string()),
                // The partitioner of the Java client, so every tool agrees where a key lives.
                ("partitioner", "murmur2_random".into()),
                // One request in flight per broker, like Kafka Connect's source producers: a
                // broker whose idempotence is imperfect (tansu) could otherwise accept a later
                // batch after failing an earlier one. Apache Kafka's idempotence makes 5 safe.
                ("max.in.flight.requests.per.connection", "1".into()),
            ],
            &[
                ("acks", "all", "a change is confirmed to Postgres only once every replica has it"),
                ("enable.idempotence", "true", "retries must not duplicate or reorder a key's events"),
                (
                    "enable.gapless.guarantee",
                    "true",
                    "a failed batch must stop the batches after it, or a key's events could be reordered",
                ),
            ],
        )?;
        let max_message_bytes =
            cfg.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        let producer: FutureProducer = cfg.create().map_err(|e| {
            ProducerError::Common(walcache_common::CommonError::Config(format!("creating the Kafka producer: {e}")))
        })?;
        Ok(Sink {
            producer,
            topics,
            queue: VecDeque::new(),
            in_flight: 0,
            max_in_flight,
            offsets: BTreeMap::new(),
            completed: None,
            watermark_deliveries: VecDeque::new(),
            watermark_topic: watermark_topic.to_string(),
            producer_name: producer_name.to_string(),
            max_message_bytes,
            metrics,
            unvouched: Default::default(),
        })
    }

    /// The largest message this sink may send (`message.max.bytes`), for messages.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Starts the per-partition offsets at the topics' current high watermarks: whatever is
    /// there already was written at or before the slot's confirmed position (or is a duplicate
    /// of what the slot will replay), so a watermark covering it is conservative.
    pub async fn init_offsets(&mut self, metadata: &Metadata) -> Result<(), ProducerError> {
        for (id, topic) in self.topics.iter().enumerate() {
            for (partition, high) in metadata.high_watermarks(topic).await? {
                self.offsets.insert((id, partition), high);
            }
        }
        Ok(())
    }

    pub fn topic_name(&self, id: TopicId) -> &str {
        &self.topics[id]
    }

    /// Whether another message may be queued without waiting.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.max_in_flight
    }

    /// Whether anything (deliveries or checkpoints) is queued.
    pub fn has_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Queues a message (a tombstone when `value` is `None`), waiting while the in-flight limit
    /// is reached.
    pub async fn send(
        &mut self,
        topic: TopicId,
        key: &[u8],
        value: Option<&[u8]>,
        tag: DeliveryTag,
    ) -> Result<(), ProducerError> {
        self.send_with_headers(topic, key, value, &[], tag).await
    }

    /// Like [`send`](Self::send), with the position in the `walcache.position` header (used
    /// for tombstones, which have no envelope to carry it).
    pub async fn send_with_position(
        &mut self,
        topic: TopicId,
        key: &[u8],
        value: Option<&[u8]>,
        position: &Position,
        tag: DeliveryTag,
    ) -> Result<(), ProducerError> {
        self.send_with_headers(topic, key, value, &[(POSITION_HEADER, &position.to_header()[..])], tag).await
    }

    /// Like [`send`](Self::send), with Kafka headers.
    pub async fn send_with_headers(
        &mut self,
        topic: TopicId,
        key: &[u8],
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        tag: DeliveryTag,
    ) -> Result<(), ProducerError> {
        while self.in_flight >= self.max_in_flight {
            self.wait_completions().await?;
        }
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topics[topic]).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            if !headers.is_empty() {
                let owned = headers
                    .iter()
                    .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(*value) }));
                record = record.headers(owned);
            }
            match self.producer.send_result(record) {
                Ok(future) => {
                    self.queue.push_back(Pending::Delivery {
                        future,
                        topic,
                        tag,
                        size: (key.len() + value.map_or(0, <[u8]>::len)) as u64,
                        enqueued: Instant::now(),
                    });
                    self.in_flight += 1;
                    self.metrics.in_flight.set(self.in_flight as i64);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if self.in_flight == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        self.wait_completions().await?;
                    }
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Err(ProducerError::MessageTooLarge {
                        topic: self.topics[topic].clone(),
                        bytes: key.len() + value.map_or(0, <[u8]>::len),
                    });
                }
                Err((source, _)) => {
                    return Err(self.delivery_error(self.topics[topic].clone(), source));
                }
            }
        }
    }

    /// A failed delivery as an error. librdkafka reports a broker's permanent refusal under
    /// idempotence as a generic fatal error; its real cause decides whether a new session can
    /// help.
    fn delivery_error(&self, topic: String, source: KafkaError) -> ProducerError {
        if source.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            let cause = self.producer.client().fatal_error().map_or_else(|| source.to_string(), |(_, text)| text);
            let definite = crate::error::fatal_cause_is_definite(&cause);
            return ProducerError::KafkaFatal { topic, cause, definite };
        }
        ProducerError::Delivery { topic, source }
    }

    /// Queues a position; it completes once everything queued before it is acknowledged.
    pub fn checkpoint(&mut self, checkpoint: Checkpoint) {
        if self.queue.is_empty() {
            self.completed = Some(checkpoint);
        } else {
            self.queue.push_back(Pending::Checkpoint(checkpoint));
        }
    }

    /// The newest completed checkpoint since the last call.
    pub fn take_completed(&mut self) -> Option<Checkpoint> {
        self.completed.take()
    }

    /// Waits until the head of the queue completes, then takes everything that is complete.
    /// Returns at once when nothing is queued. Cancel-safe: progress is recorded as it is
    /// observed, inside one poll.
    pub async fn wait_completions(&mut self) -> Result<usize, ProducerError> {
        poll_fn(|cx| self.poll_completions(cx)).await
    }

    fn poll_completions(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, ProducerError>> {
        self.reap_watermarks();
        let mut done = 0;
        loop {
            let Some(head) = self.queue.front_mut() else {
                return Poll::Ready(Ok(done));
            };
            match head {
                Pending::Checkpoint(cp) => {
                    self.completed = Some(*cp);
                    self.queue.pop_front();
                    done += 1;
                }
                Pending::Delivery { future, topic, tag, size, enqueued } => match Pin::new(future).poll(cx) {
                    Poll::Pending => {
                        return if done > 0 { Poll::Ready(Ok(done)) } else { Poll::Pending };
                    }
                    Poll::Ready(Ok(Ok(delivery))) => {
                        let next = delivery.offset + 1;
                        let slot = self.offsets.entry((*topic, delivery.partition)).or_insert(next);
                        *slot = (*slot).max(next);
                        self.metrics.delivery_seconds.observe(enqueued.elapsed().as_secs_f64());
                        if let Some(c) = &tag.events {
                            c.inc();
                        }
                        if let Some(c) = &tag.bytes {
                            c.inc_by(*size);
                        }
                        self.queue.pop_front();
                        self.in_flight -= 1;
                        self.metrics.in_flight.set(self.in_flight as i64);
                        done += 1;
                    }
                    Poll::Ready(Ok(Err((source, _)))) => {
                        let topic = self.topics[*topic].clone();
                        return Poll::Ready(Err(self.delivery_error(topic, source)));
                    }
                    Poll::Ready(Err(_canceled)) => {
                        return Poll::Ready(Err(ProducerError::Delivery {
                            topic: self.topics[*topic].clone(),
                            source: KafkaError::Canceled,
                        }));
                    }
                },
            }
        }
    }

    /// Waits until everything queued is acknowledged (or `deadline` passes).
    pub async fn flush(&mut self, deadline: tokio::time::Instant) -> Result<(), ProducerError> {
        while self.has_pending() {
            match tokio::time::timeout_at(deadline, self.wait_completions()).await {
                Ok(result) => {
                    result?;
                }
                Err(_) => {
                    return Err(ProducerError::Delivery {
                        topic: "(all)".into(),
                        source: KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut),
                    });
                }
            }
        }
        Ok(())
    }

    /// The watermark record for a completed checkpoint: offsets cover everything before it.
    pub fn watermark(&self, checkpoint: &Checkpoint, state: ProducerState) -> Watermark {
        Watermark {
            producer: self.producer_name.clone(),
            lsn: checkpoint.lsn,
            commit_ts_micros: checkpoint.commit_ts_micros,
            emitted_at_micros: now_micros(),
            state,
            offsets: self
                .offsets
                .iter()
                .filter(|((topic, _), _)| !self.unvouched.contains(topic))
                .map(|(&(topic, partition), &offset)| PartitionOffset {
                    topic: self.topics[topic].clone(),
                    partition,
                    offset,
                })
                .collect(),
        }
    }

    /// Leaves these topics out of watermarks from now on (their tables' first copy runs).
    pub fn set_unvouched(&mut self, topics: impl IntoIterator<Item = TopicId>) {
        self.unvouched = topics.into_iter().collect();
    }

    /// Publishes a watermark record. With `wait`, returns only once Kafka has it (used for the
    /// snapshot state records that decide what a restart does); otherwise its delivery is
    /// checked in the background of later calls.
    pub async fn publish_watermark(&mut self, watermark: &Watermark, wait: bool) -> Result<(), ProducerError> {
        let bytes = watermark.encode(Registry::builtin()?)?;
        let record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&self.watermark_topic).key(self.producer_name.as_str()).payload(&bytes[..]);
        let future = self
            .producer
            .send_result(record)
            .map_err(|(source, _)| self.delivery_error(self.watermark_topic.clone(), source))?;
        let kind = match watermark.state {
            ProducerState::Snapshotting => "snapshotting",
            ProducerState::Streaming => "streaming",
        };
        self.metrics.watermarks.with_label_values(&[kind]).inc();
        if wait {
            match future.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((source, _))) => Err(self.delivery_error(self.watermark_topic.clone(), source)),
                Err(_) => {
                    Err(ProducerError::Delivery { topic: self.watermark_topic.clone(), source: KafkaError::Canceled })
                }
            }
        } else {
            self.watermark_deliveries.push_back(future);
            // Bound the bookkeeping: a long broker outage must not grow this list.
            while self.watermark_deliveries.len() > 1024 {
                self.watermark_deliveries.pop_front();
            }
            Ok(())
        }
    }

    fn reap_watermarks(&mut self) {
        while let Some(front) = self.watermark_deliveries.front_mut() {
            match front.now_or_never() {
                None => break,
                Some(result) => {
                    if !matches!(result, Ok(Ok(_))) {
                        tracing::warn!(topic = %self.watermark_topic, "a watermark record was not delivered; the next one supersedes it");
                    }
                    self.watermark_deliveries.pop_front();
                }
            }
        }
    }

    /// Flushes librdkafka's own queue (watermarks included).
    pub fn flush_client(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "kafka flush did not finish");
        }
    }
}
