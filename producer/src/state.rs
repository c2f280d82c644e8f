//! What an earlier run left behind: the newest watermark record of this producer (keyed by
//! slot name on the compacted watermarks topic). Its `state` decides whether an existing slot
//! can be resumed (`streaming`) or was created by a snapshot that never finished
//! (`snapshotting`), in which case the slot is dropped and the snapshot starts over.

use walcache_common::config::KafkaConfig;
use walcache_common::kafka::{Metadata, read_to_end};
use walcache_schemas::{Registry, Watermark};

use crate::ProducerError;

/// Reads the newest watermark `producer` wrote to `topic`, if any.
pub async fn last_watermark(
    kafka: &KafkaConfig,
    metadata: &Metadata,
    topic: &str,
    producer: &str,
) -> Result<Option<Watermark>, ProducerError> {
    let records = read_to_end(kafka, metadata, topic, &format!("walcache-producer-{producer}-state"), 100_000).await?;
    let newest = records.iter().rev().find(|r| r.key.as_deref() == Some(producer.as_bytes()));
    match newest.and_then(|r| r.value.as_deref()) {
        None => Ok(None),
        Some(bytes) => Ok(Some(Watermark::decode(Registry::builtin()?, bytes)?)),
    }
}
