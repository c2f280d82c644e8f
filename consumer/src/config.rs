//! The consumer's configuration: `walcache-consumer.toml` plus `WALCACHE_*` overrides.
//!
//! ```toml
//! [kafka]
//! bootstrap_servers = "kafka:9092"
//!
//! [[tables]]
//! contract = "courier_performance"
//! topic = "incentives.public.courier_performance"
//!
//! [cache]
//! capacity = "1GiB"
//!
//! [http]
//! listen = "0.0.0.0:8080"      # token from WALCACHE_HTTP__AUTH_TOKEN, or auth_token_file
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use walcache_common::config::{KafkaConfig, Secret};
use walcache_schemas::{Contract, Registry, ValueVersion};

use crate::ConsumerError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub kafka: KafkaConfig,
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub watermarks: WatermarksConfig,
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub http: HttpConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Contract name in the schemas crate.
    pub contract: String,
    /// Name in the query API (default: the contract name).
    #[serde(default)]
    pub name: Option<String>,
    /// The compacted topic the producer writes this table to.
    pub topic: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatermarksConfig {
    pub topic: String,
    /// Only follow watermarks of this producer (slot name); default: any producer that writes
    /// the configured topics.
    #[serde(default)]
    pub producer: Option<String>,
}

impl Default for WatermarksConfig {
    fn default() -> Self {
        WatermarksConfig { topic: "walcache.watermarks".into(), producer: None }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    pub topic: String,
    /// Publish bad messages to the dead-letter topic (they are always counted and logged).
    /// With many replicas, enabling it on one is enough.
    pub publish: bool,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { topic: "walcache.dlq".into(), publish: true }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory bound for all rows of a table, in bytes (`"512MiB"`, `"2GB"` or a number).
    #[serde(deserialize_with = "bytes_size")]
    pub capacity: u64,
    /// Pages per table (rounded up to a power of two); about 16 rows per page is the sweet spot.
    pub pages: u32,
    /// How long a deleted key keeps its position (so an older replayed event cannot revive it).
    #[serde(with = "humantime_serde")]
    pub delete_retention: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { capacity: 1 << 30, pages: 65_536, delete_retention: Duration::from_secs(24 * 3600) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Query API and ops endpoints (`/metrics`, `/healthz`, `/readyz`).
    pub listen: std::net::SocketAddr,
    /// Bearer token required on `/v1/*` when set (normally from `WALCACHE_HTTP__AUTH_TOKEN`).
    /// Required when `listen` is not a loopback address, unless `allow_unauthenticated`.
    #[serde(default)]
    pub auth_token: Option<Secret>,
    #[serde(default)]
    pub auth_token_file: Option<PathBuf>,
    /// Serve `/v1/*` without a token on a non-loopback address (a network policy protects it).
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Token for `/v1/tables/*/export` (a whole table): when set, the read token is not enough.
    #[serde(default)]
    pub export_token: Option<Secret>,
    #[serde(default)]
    pub export_token_file: Option<PathBuf>,
    /// Longest any request may take (above `max_wait`; default `max_wait` + 10s).
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Requests served at once; more are refused with 503 `overloaded` at once, not queued.
    pub max_concurrent_requests: usize,
    /// `min_lsn` reads waiting at once; more are refused with 503 `too_many_waiting`.
    pub max_waiting: usize,
    /// Invalidation streams (`/v1/invalidations`, one per near-caching client process) open at
    /// once; more are refused with 503 `too_many_streams` and those clients fall back to their TTL.
    pub max_invalidation_streams: usize,
    /// Changes an invalidation stream may fall behind before it is sent a `reset` (its client
    /// drops what it holds and starts over), beyond what its socket buffers hold. Shared by
    /// every stream (one ring of this many changes).
    pub invalidation_backlog: usize,
    /// Largest request body (a batch of keys).
    pub max_body_bytes: usize,
    /// Largest batch get.
    pub max_batch: usize,
    /// Longest a `min_lsn` read may wait.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Name written into dead-letter records (default: the host name).
    #[serde(default)]
    pub instance: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: ([127, 0, 0, 1], 8080).into(),
            auth_token: None,
            auth_token_file: None,
            allow_unauthenticated: false,
            export_token: None,
            export_token_file: None,
            max_batch: 1000,
            max_wait: Duration::from_secs(10),
            request_timeout: None,
            max_concurrent_requests: 1024,
            max_waiting: 256,
            max_invalidation_streams: 256,
            invalidation_backlog: 16_384,
            max_body_bytes: 1 << 20,
            instance: None,
        }
    }
}

fn bytes_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(u64),
        Text(String),
    }
    match Repr::deserialize(d)? {
        Repr::Number(n) => Ok(n),
        Repr::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// "512MiB", "2GB", "1048576".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is not a size like 512MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit (use B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

impl HttpConfig {
    /// The request timeout in force.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or(self.max_wait + Duration::from_secs(10))
    }
}

fn token_of(inline: &Option<Secret>, file: &Option<PathBuf>) -> Result<Option<Secret>, ConsumerError> {
    Ok(match (inline, file) {
        (Some(t), _) if !t.is_empty() => Some(t.clone()),
        (_, Some(f)) => Some(Secret::from_file(f)?),
        _ => None,
    })
}

/// A configured table resolved against the contracts.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: String,
    pub topic: String,
    pub contract: &'static Contract,
    /// The version rows are held in (the newest this build knows).
    pub reader: &'static ValueVersion,
}

impl ConsumerConfig {
    pub fn validate(&self) -> Result<(), ConsumerError> {
        self.validate_view()?;
        if self.http.max_batch == 0 {
            return Err(ConsumerError::Config("http.max_batch must be at least 1".into()));
        }
        let http = &self.http;
        if self.auth_token()?.is_none() && !http.listen.ip().is_loopback() && !http.allow_unauthenticated {
            return Err(ConsumerError::Config(format!(
                "http.listen = {} is reachable from other hosts and no token is set: set http.auth_token \
                 (WALCACHE_HTTP__AUTH_TOKEN) or http.auth_token_file, or http.allow_unauthenticated = true if a \
                 network policy protects the port",
                http.listen
            )));
        }
        self.export_token()?;
        if let Some(timeout) = http.request_timeout
            && timeout <= http.max_wait
        {
            return Err(ConsumerError::Config(format!(
                "http.request_timeout ({timeout:?}) must be longer than http.max_wait ({:?}), or min_lsn waits time out",
                http.max_wait
            )));
        }
        if http.max_concurrent_requests == 0
            || http.max_waiting == 0
            || http.max_invalidation_streams == 0
            || http.max_body_bytes < 1024
        {
            return Err(ConsumerError::Config(
                "http.max_concurrent_requests, http.max_waiting and http.max_invalidation_streams must be at least 1, \
                 http.max_body_bytes at least 1KiB"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks what a view needs (Kafka, tables, cache), not the HTTP server: an embedded view
    /// has none.
    pub fn validate_view(&self) -> Result<(), ConsumerError> {
        self.kafka.validate()?;
        self.table_specs()?;
        if self.cache.capacity < 1 << 20 {
            return Err(ConsumerError::Config("cache.capacity below 1MiB leaves no room for a view".into()));
        }
        if !(16..=1 << 22).contains(&self.http.invalidation_backlog) {
            return Err(ConsumerError::Config(format!(
                "http.invalidation_backlog is {}; set it between 16 and 4194304 changes (default 16384)",
                self.http.invalidation_backlog
            )));
        }
        Ok(())
    }

    pub fn auth_token(&self) -> Result<Option<Secret>, ConsumerError> {
        token_of(&self.http.auth_token, &self.http.auth_token_file)
    }

    pub fn export_token(&self) -> Result<Option<Secret>, ConsumerError> {
        token_of(&self.http.export_token, &self.http.export_token_file)
    }

    pub fn table_specs(&self) -> Result<Vec<TableSpec>, ConsumerError> {
        if self.tables.is_empty() {
            return Err(ConsumerError::Config("no [[tables]] configured; add a contract and its topic".into()));
        }
        let registry = Registry::builtin()?;
        let mut out: Vec<TableSpec> = Vec::new();
        for t in &self.tables {
            let contract = registry.contract(&t.contract).map_err(|e| ConsumerError::Config(e.to_string()))?;
            let name = t.name.clone().unwrap_or_else(|| contract.name.to_string());
            if out.iter().any(|o| o.name == name || o.topic == t.topic) {
                return Err(ConsumerError::Config(format!("table {name} or topic {} is configured twice", t.topic)));
            }
            out.push(TableSpec { name, topic: t.topic.clone(), contract, reader: contract.latest() });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Format;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn a_minimal_config_validates_and_unknown_keys_are_refused() {
        let cfg: ConsumerConfig = figment::Figment::new()
            .merge(figment::providers::Toml::string(
                "[kafka]\nbootstrap_servers='k:1'\n[[tables]]\ncontract='courier_performance'\ntopic='t'\n[cache]\ncapacity='64MiB'\npages=1024\ndelete_retention='1h'",
            ))
            .extract()
            .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.table_specs().expect("specs")[0].name, "courier_performance");
        let bad = figment::Figment::new()
            .merge(figment::providers::Toml::string(
                "[kafka]\nbootstrap_servers='k:1'\n[[tables]]\ncontract='courier_performance'\ntopic='t'\ntopik='x'",
            ))
            .extract::<ConsumerConfig>();
        assert!(bad.expect_err("unknown key").to_string().contains("topik"));
        let partial: ConsumerConfig = figment::Figment::new()
            .merge(figment::providers::Toml::string(
                "[kafka]\nbootstrap_servers='k:1'\n[[tables]]\ncontract='courier_performance'\ntopic='t'\n[http]\nlisten='0.0.0.0:9000'\n[dead_letter]\ntopic='d'",
            ))
            .extract()
            .expect("a partial section takes defaults for the rest");
        assert_eq!(partial.http.max_batch, 1000);
        assert!(partial.dead_letter.publish);
        let open = partial.validate().expect_err("a non-loopback listener without a token").to_string();
        assert!(open.contains("http.auth_token") && open.contains("allow_unauthenticated"), "{open}");
        let mut allowed = partial.clone();
        allowed.http.allow_unauthenticated = true;
        allowed.validate().expect("explicitly allowed");
        let mut slow = allowed.clone();
        slow.http.request_timeout = Some(slow.http.max_wait);
        assert!(slow.validate().is_err(), "a request timeout at or below max_wait");
        let mut no_backlog = allowed.clone();
        no_backlog.http.invalidation_backlog = 0;
        let refused = no_backlog.validate_view().expect_err("an empty backlog").to_string();
        assert!(refused.contains("http.invalidation_backlog"), "{refused}");
    }
}
