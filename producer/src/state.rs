//! What an earlier run left behind: the newest watermark record of this producer (keyed by
//! slot name on the compacted watermarks topic). Its `state` decides whether an existing slot
//! can be resumed (`streaming`) or was created by a snapshot that never finished
//! (`snapshotting`), in which case the slot is dropped and the snapshot starts over.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use walcache_common::config::KafkaConfig;
use walcache_common::kafka::{Metadata, client_config};
use walcache_schemas::{Registry, Watermark};

use crate::ProducerError;

/// Reads the newest watermark `producer` wrote to `topic`, if any.
pub async fn last_watermark(
    kafka: &KafkaConfig,
    metadata: &Metadata,
    topic: &str,
    producer: &str,
) -> Result<Option<Watermark>, ProducerError> {
    let mut ends = Vec::new();
    for partition in metadata.partitions(topic).await? {
        let (low, high) = metadata.watermarks(topic, partition).await?;
        if high > low {
            ends.push((partition, high));
        }
    }
    if ends.is_empty() {
        return Ok(None);
    }
    let cfg = client_config(
        kafka,
        &[
            ("group.id", format!("walcache-producer-{producer}-state")),
            ("enable.auto.commit", "false".into()),
            ("enable.partition.eof", "false".into()),
        ],
        &[],
    )?;
    let consumer: BaseConsumer = cfg.create().map_err(|e| {
        ProducerError::Common(walcache_common::CommonError::Config(format!("creating a consumer: {e}")))
    })?;
    let topic_name = topic.to_string();
    let producer_name = producer.to_string();
    let budget = kafka.request_timeout * 3;
    let found = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, String> {
        let mut tpl = TopicPartitionList::new();
        for (p, _) in &ends {
            tpl.add_partition_offset(&topic_name, *p, Offset::Beginning).map_err(|e| e.to_string())?;
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let mut remaining: Vec<(i32, i64)> = ends;
        let mut newest = None;
        let started = Instant::now();
        while !remaining.is_empty() {
            if started.elapsed() > budget {
                return Err(format!("reading {topic_name} took longer than {budget:?}"));
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(msg)) => {
                    if msg.key() == Some(producer_name.as_bytes())
                        && let Some(payload) = msg.payload()
                    {
                        newest = Some(payload.to_vec());
                    }
                    let (p, off) = (msg.partition(), msg.offset());
                    remaining.retain(|&(rp, high)| !(rp == p && off + 1 >= high));
                }
            }
        }
        Ok(newest)
    })
    .await
    .map_err(|e| ProducerError::Config(format!("state reader task failed: {e}")))?
    .map_err(|e| {
        ProducerError::Common(walcache_common::CommonError::Topic {
            topic: topic.to_string(),
            problem: format!("could not read the producer state: {e}"),
        })
    })?;
    match found {
        None => Ok(None),
        Some(bytes) => Ok(Some(Watermark::decode(Registry::builtin()?, &bytes)?)),
    }
}
