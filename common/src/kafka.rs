//! Kafka plumbing both daemons need: client settings, topic creation, partitions, watermarks.
//!
//! librdkafka's metadata and watermark calls block, so they run on the blocking pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

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

/// A librdkafka client context that routes its logs through tracing at honest levels:
/// reaching the end of a partition is not an error, and a broker that is down for a moment
/// is a warning the client recovers from.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietContext;

impl rdkafka::ClientContext for QuietContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility = fac, "{message}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::PartitionEOF) => {}
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown) => {
                tracing::warn!(target: "librdkafka", error = %error, "{reason}")
            }
            _ => tracing::error!(target: "librdkafka", error = %error, "{reason}"),
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietContext {}

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
            Err((name, RDKafkaErrorCode::InvalidReplicationFactor)) => {
                let asked = missing.iter().find(|s| s.name == name).map_or(0, |s| s.replication_factor);
                return Err(CommonError::Config(format!(
                    "creating topic {name}: the cluster has fewer brokers than the replication factor {asked}; \
                     for a smaller cluster set topics.replication_factor (and topics.min_insync_replicas) knowingly, \
                     or create the topics yourself"
                )));
            }
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

/// What the cluster says about an existing topic, for `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFacts {
    pub partitions: usize,
    /// The smallest replica count of any partition.
    pub replication_factor: usize,
    /// The topic's effective configs (`cleanup.policy`, `min.insync.replicas`, ...); empty when
    /// the brokers would not describe them.
    pub configs: BTreeMap<String, String>,
    /// Why the configs could not be read, if they could not.
    pub configs_unreadable: Option<String>,
}

/// Describes `topic`, or `None` when it does not exist.
pub async fn describe_topic(
    kafka: &KafkaConfig,
    metadata: &Metadata,
    topic: &str,
) -> Result<Option<TopicFacts>, CommonError> {
    let consumer = Arc::clone(&metadata.consumer);
    let (name, timeout) = (topic.to_string(), metadata.timeout);
    let fetched = tokio::task::spawn_blocking(move || consumer.fetch_metadata(Some(&name), timeout))
        .await
        .map_err(|e| CommonError::Config(format!("metadata task failed: {e}")))?
        .map_err(|e| CommonError::kafka(format!("fetching metadata of topic {topic}"), e))?;
    let Some(t) = fetched.topics().iter().find(|t| t.name() == topic && t.error().is_none()) else {
        return Ok(None);
    };
    if t.partitions().is_empty() {
        return Ok(None);
    }
    let replication_factor = t.partitions().iter().map(|p| p.replicas().len()).min().unwrap_or(0);
    let mut facts = TopicFacts {
        partitions: t.partitions().len(),
        replication_factor,
        configs: BTreeMap::new(),
        configs_unreadable: None,
    };
    let admin: AdminClient<DefaultClientContext> =
        client_config(kafka, &[], &[])?.create().map_err(|e| CommonError::kafka("creating an admin client", e))?;
    let opts = AdminOptions::new().request_timeout(Some(kafka.request_timeout));
    match admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(resource)) => {
                facts.configs =
                    resource.entries.into_iter().filter_map(|e| Some((e.name, e.value?))).collect::<BTreeMap<_, _>>();
            }
            Some(Err(code)) => facts.configs_unreadable = Some(code.to_string()),
            None => facts.configs_unreadable = Some("no answer".into()),
        },
        Err(e) => facts.configs_unreadable = Some(e.to_string()),
    }
    Ok(Some(facts))
}

/// One record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Reads `topic` from the beginning up to the high watermarks it has now (at most `limit`
/// records, newest kept), for small state topics (watermarks, dead letters).
pub async fn read_to_end(
    kafka: &KafkaConfig,
    metadata: &Metadata,
    topic: &str,
    client_id: &str,
    limit: usize,
) -> Result<Vec<Record>, CommonError> {
    let mut ends = Vec::new();
    for partition in metadata.partitions(topic).await? {
        let (low, high) = metadata.watermarks(topic, partition).await?;
        if high > low {
            ends.push((partition, high));
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    let consumer: BaseConsumer = client_config(
        kafka,
        &[
            ("client.id", client_id.to_string()),
            ("group.id", format!("{client_id}-reader")),
            ("enable.auto.commit", "false".into()),
        ],
        &[],
    )?
    .create()
    .map_err(|e| CommonError::kafka("creating a reader", e))?;
    let topic_name = topic.to_string();
    let budget = kafka.request_timeout * 6;
    tokio::task::spawn_blocking(move || -> Result<Vec<Record>, CommonError> {
        let mut tpl = TopicPartitionList::new();
        for (p, _) in &ends {
            tpl.add_partition_offset(&topic_name, *p, Offset::Beginning)
                .map_err(|e| CommonError::kafka("assigning partitions", e))?;
        }
        consumer.assign(&tpl).map_err(|e| CommonError::kafka("assigning partitions", e))?;
        let mut remaining = ends;
        let mut out = std::collections::VecDeque::new();
        let started = std::time::Instant::now();
        while !remaining.is_empty() {
            if started.elapsed() > budget {
                return Err(CommonError::Topic {
                    topic: topic_name.clone(),
                    problem: format!("reading it to its end took longer than {budget:?}"),
                });
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => return Err(CommonError::kafka(format!("reading {topic_name}"), e)),
                Some(Ok(m)) => {
                    let (p, off) = (m.partition(), m.offset());
                    out.push_back(Record {
                        partition: p,
                        offset: off,
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                    });
                    if out.len() > limit {
                        out.pop_front();
                    }
                    remaining.retain(|&(rp, high)| !(rp == p && off + 1 >= high));
                }
            }
        }
        Ok(out.into())
    })
    .await
    .map_err(|e| CommonError::Config(format!("reader task failed: {e}")))?
}
