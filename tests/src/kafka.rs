//! Reading topics back, whole, to compare with what should be there.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// One message as it sits in the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The `walcache.position` header, if present.
    pub position_header: Option<Vec<u8>>,
}

fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::unique("treader"))
        .set("enable.auto.commit", "false")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Error)
        .create()
        .expect("consumer")
}

/// High watermark per partition (empty when the topic does not exist).
pub async fn high_watermarks(bootstrap: &str, topic: &str) -> Vec<(i32, i64)> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c = consumer(&bootstrap);
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Vec::new();
        };
        let mut out: Vec<(i32, i64)> = t
            .partitions()
            .iter()
            .map(|p| {
                let (_, high) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(10)).expect("watermarks");
                (p.id(), high)
            })
            .collect();
        out.sort_unstable();
        out
    })
    .await
    .expect("watermark task")
}

/// Every message of `topic` up to the current high watermarks, in partition-offset order.
pub async fn read_all(bootstrap: &str, topic: &str) -> Vec<Record> {
    let ends = high_watermarks(bootstrap, topic).await;
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c = consumer(&bootstrap);
        let mut tpl = TopicPartitionList::new();
        let mut remaining: Vec<(i32, i64)> = ends.into_iter().filter(|(_, h)| *h > 0).collect();
        for (p, _) in &remaining {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning).expect("tpl");
        }
        if remaining.is_empty() {
            return Vec::new();
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let started = Instant::now();
        while !remaining.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(120), "reading {topic} took over 2 minutes");
            match c.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                Some(Ok(m)) => {
                    let (p, off) = (m.partition(), m.offset());
                    out.push(Record {
                        partition: p,
                        offset: off,
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        position_header: m.headers().and_then(|h| {
                            use rdkafka::message::Headers;
                            h.iter()
                                .find(|h| h.key == walcache_schemas::POSITION_HEADER)
                                .and_then(|h| h.value.map(<[u8]>::to_vec))
                        }),
                    });
                    remaining.retain(|&(rp, high)| !(rp == p && off + 1 >= high));
                }
            }
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    })
    .await
    .expect("reader task")
}

/// Produces raw bytes (for garbage and replay tests).
pub async fn produce(bootstrap: &str, topic: &str, partition: Option<i32>, key: Option<&[u8]>, value: Option<&[u8]>) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("acks", "all").create().expect("producer");
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(v) = value {
        record = record.payload(v);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produce");
}
