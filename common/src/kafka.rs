//! Kafka plumbing both daemons need: client settings, topic creation, partitions, watermarks.
//!
//! librdkafka's metadata and watermark calls block, so they run on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::CommonError;
use crate::config::KafkaConfig;

/// Builds librdkafka settings: `defaults` first, then the operator's pass-through properties,
/// then `required` settings that carry a walcache guarantee. A pass-through value that
/// contradicts a required one is refused rather than silently overridden.
pub fn client_config(
    kafka: &KafkaConfig,
    defaults: &[(&str, String)],
    required: &[(&str, &str, &str)],
) -> Result<ClientConfig, CommonError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.bootstrap_servers);
    for (k, v) in defaults {
        cfg.set(*k, v);
    }
    let props = kafka.resolved_properties()?;
    for (k, v) in &props {
        cfg.set(k, v.expose());
    }
    for (k, v, why) in required {
        if let Some(given) = props.get(*k)
            && given.expose() != *v
        {
            return Err(CommonError::Config(format!(
                "kafka.properties.\"{k}\" = \"{}\" is not allowed: walcache requires {k}={v} ({why}); remove the setting",
                given.expose()
            )));
        }
        cfg.set(*k, *v);
    }
    cfg.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    Ok(cfg)
}

/// A topic walcache needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic configs such as `cleanup.policy=compact`.
    pub configs: Vec<(String, String)>,
}

/// Metadata and watermark lookups through a consumer handle that never joins a group.
#[derive(Clone)]
pub struct Metadata {
    consumer: Arc<BaseConsumer>,
    timeout: Duration,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Metadata {
    pub fn new(kafka: &KafkaConfig, client_id: &str) -> Result<Self, CommonError> {
        let cfg = client_config(
            kafka,
            &[("client.id", client_id.to_string()), ("group.id", format!("{client_id}-metadata"))],
            &[],
        )?;
        let consumer: BaseConsumer = cfg.create().map_err(|e| CommonError::kafka("creating a metadata client", e))?;
        Ok(Metadata { consumer: Arc::new(consumer), timeout: kafka.request_timeout })
    }

    /// The partition ids of `topic`, or an empty list when the topic does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Vec<i32>, CommonError> {
        let consumer = Arc::clone(&self.consumer);
        let topic_name = topic.to_string();
        let timeout = self.timeout;
        let result = tokio::task::spawn_blocking(move || consumer.fetch_metadata(Some(&topic_name), timeout))
            .await
            .map_err(|e| CommonError::Config(format!("metadata task failed: {e}")))?;
        let metadata = result.map_err(|e| CommonError::kafka(format!("fetching metadata of topic {topic}"), e))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(Vec::new());
        };
        if let Some(err) = t.error() {
            let code = RDKafkaErrorCode::from(err);
            if code == RDKafkaErrorCode::UnknownTopicOrPartition || code == RDKafkaErrorCode::UnknownTopic {
                return Ok(Vec::new());
            }
        }
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// (low, high) watermark of one partition.
    pub async fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), CommonError> {
        let consumer = Arc::clone(&self.consumer);
        let topic_name = topic.to_string();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic_name, partition, timeout))
            .await
            .map_err(|e| CommonError::Config(format!("watermark task failed: {e}")))?
            .map_err(|e| CommonError::kafka(format!("fetching watermarks of {topic}/{partition}"), e))
    }

    /// High watermarks of every partition of `topic`.
    pub async fn high_watermarks(&self, topic: &str) -> Result<Vec<(i32, i64)>, CommonError> {
        let mut out = Vec::new();
        for p in self.partitions(topic).await? {
            out.push((p, self.watermarks(topic, p).await?.1));
        }
        Ok(out)
    }

    /// Reachability check: a metadata round trip.
    pub async fn ping(&self) -> Result<usize, CommonError> {
        let consumer = Arc::clone(&self.consumer);
        let timeout = self.timeout;
        let md = tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, timeout))
            .await
            .map_err(|e| CommonError::Config(format!("metadata task failed: {e}")))?
            .map_err(|e| CommonError::kafka("reaching the brokers (metadata request)", e))?;
        Ok(md.brokers().len())
    }
}

/// Creates the topics that are missing (existing ones are left as they are) and waits until
/// the brokers list each with its partitions.
pub async fn ensure_topics(kafka: &KafkaConfig, metadata: &Metadata, specs: &[TopicSpec]) -> Result<(), CommonError> {
    let mut missing = Vec::new();
    for spec in specs {
        if metadata.partitions(&spec.name).await?.is_empty() {
            missing.push(spec);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        client_config(kafka, &[], &[])?.create().map_err(|e| CommonError::kafka("creating an admin client", e))?;
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|s| {
            let mut t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(s.replication_factor));
            for (k, v) in &s.configs {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(kafka.request_timeout));
    let results =
        admin.create_topics(new_topics.iter(), &opts).await.map_err(|e| CommonError::kafka("creating topics", e))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(CommonError::kafka(
                    format!("creating topic {name}"),
                    rdkafka::error::KafkaError::AdminOp(code),
                ));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + kafka.request_timeout;
    for spec in missing {
        while metadata.partitions(&spec.name).await?.is_empty() {
            if tokio::time::Instant::now() > deadline {
                return Err(CommonError::Topic {
                    topic: spec.name.clone(),
                    problem: "created, but the brokers do not list it yet; retrying".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
