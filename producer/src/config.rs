//! The producer's configuration: `walcache-producer.toml` plus `WALCACHE_*` overrides.
//!
//! ```toml
//! [postgres]
//! url = "postgres://walcache@db:5432/incentives"   # password from WALCACHE_POSTGRES__PASSWORD
//! password_file = "/run/secrets/pg-password"       # ... or from a file
//! slot = "walcache"
//! publication = "walcache"
//!
//! [kafka]
//! bootstrap_servers = "kafka:9092"
//! [kafka.properties]                                # passed to librdkafka as they are
//! "linger.ms" = "5"
//!
//! [[tables]]
//! table = "public.courier_performance"
//! contract = "courier_performance"
//! ```
//!
//! `validate()` catches everything that can be known without connecting; `check` connects.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use walcache_common::config::{KafkaConfig, OpsConfig, Secret};
use walcache_schemas::{Contract, Registry};

use crate::ProducerError;
use crate::tls::{PgTls, SslMode, split_tls_params};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerConfig {
    pub postgres: PostgresConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub topics: TopicsConfig,
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default = "default_ops")]
    pub ops: OpsConfig,
}

fn default_ops() -> OpsConfig {
    OpsConfig { listen: ([127, 0, 0, 1], 9187).into() }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database` (a password here works but prefer the env or a file).
    pub url: Secret,
    /// Password, normally from `WALCACHE_POSTGRES__PASSWORD`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (Kubernetes secret, systemd credential).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Logical replication slot (created if missing; owned by walcache).
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication (created for the configured tables if missing).
    #[serde(default = "default_slot")]
    pub publication: String,
    /// libpq's `sslmode` (default `prefer`); `sslmode` in the URL works too.
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// PEM file of the CA that signed the server's certificate, for `verify-ca` and
    /// `verify-full`; `sslrootcert` in the URL works too.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
}

fn default_slot() -> String {
    "walcache".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Table topics are `<prefix>.<schema>.<table>` unless a table names its own.
    pub prefix: String,
    /// Partitions of table topics created by walcache.
    pub partitions: i32,
    /// Replicas of topics walcache creates. 3 by default: with `acks=all` a change is
    /// confirmed to Postgres only once every in-sync replica has it.
    pub replication_factor: i32,
    /// `min.insync.replicas` of topics walcache creates (default: 2, or 1 when the
    /// replication factor is below 3), so `acks=all` means at least this many copies.
    pub min_insync_replicas: Option<i32>,
    pub watermarks: String,
    pub dead_letter: String,
    /// Compacted topic holding each slot's snapshot and backfill progress (key = slot), so a
    /// restart continues a copy from its last delivered chunk.
    pub snapshots: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            prefix: "incentives".into(),
            partitions: 6,
            replication_factor: 3,
            min_insync_replicas: None,
            watermarks: "walcache.watermarks".into(),
            dead_letter: "walcache.dlq".into(),
            snapshots: "walcache.snapshots".into(),
        }
    }
}

impl TopicsConfig {
    /// The `min.insync.replicas` walcache sets on topics it creates.
    pub fn effective_min_insync_replicas(&self) -> i32 {
        self.min_insync_replicas.unwrap_or(if self.replication_factor >= 3 { 2 } else { 1 })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `schema.table`.
    pub table: String,
    /// Contract name in the schemas crate.
    pub contract: String,
    /// Contract version to write (default: the newest).
    #[serde(default)]
    pub contract_version: Option<u32>,
    /// Topic override.
    #[serde(default)]
    pub topic: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy existing rows when the slot is created (default).
    #[default]
    Initial,
    /// Only stream changes from the slot's creation on.
    Never,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    pub mode: SnapshotMode,
    /// Chunks copied at once, across and within tables (each on its own connection).
    pub parallelism: usize,
    /// Rows per chunk: the unit of progress (a restart repeats at most `parallelism` chunks
    /// per table) and of memory (at most `2 x parallelism` chunks wait for their high
    /// watermark).
    pub chunk_rows: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig { mode: SnapshotMode::Initial, parallelism: 2, chunk_rows: 10_000 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Messages handed to Kafka but not yet acknowledged; beyond this the producer stops
    /// reading the slot (invariant 6).
    pub max_in_flight: usize,
    /// Minimum time between two watermark records while changes flow.
    #[serde(with = "humantime_serde")]
    pub watermark_interval: Duration,
    /// How often an idle database gets a heartbeat message through the slot.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often the confirmed position is reported to Postgres.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// SIGTERM: how long flushing and confirming may take before the process gives up.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How often slot lag is measured.
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
    /// Least time between two checks that the publication still publishes every operation of
    /// every table; a position is confirmed and marked complete only after such a check.
    #[serde(with = "humantime_serde")]
    pub publication_check_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_in_flight: 20_000,
            watermark_interval: Duration::from_millis(20),
            heartbeat_interval: Duration::from_secs(1),
            status_interval: Duration::from_millis(500),
            shutdown_timeout: Duration::from_secs(30),
            lag_interval: Duration::from_secs(5),
            publication_check_interval: Duration::from_millis(10),
        }
    }
}

/// Session settings that change how Postgres writes values as text, pinned on every
/// connection the producer opens (control, snapshot, replication). Startup-packet options
/// take precedence over `ALTER DATABASE/ROLE ... SET` and postgresql.conf, so the contract
/// parsers see one format whatever the server, database or role defaults are.
pub const PINNED_TEXT_SETTINGS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres \
     -c extra_float_digits=3 -c bytea_output=hex";

/// Connection settings parsed from the URL, with the password resolved.
#[derive(Debug, Clone)]
pub struct PgConnection {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
    pub tls: PgTls,
}

impl PgConnection {
    /// A tokio-postgres config for control-plane connections.
    pub fn tokio_config(&self, application: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name(application)
            .options(PINNED_TEXT_SETTINGS)
            .ssl_mode(self.tls.tokio_ssl_mode())
            .connect_timeout(Duration::from_secs(10));
        if !self.password.is_empty() {
            c.password(self.password.expose());
        }
        c
    }

    /// Where we connect, without secrets, for messages.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }
}

/// A configured table resolved against the registry.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub schema: String,
    pub name: String,
    pub topic: String,
    pub contract: &'static Contract,
    pub version: u32,
}

impl TableSpec {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl ProducerConfig {
    /// Everything that can be checked without connecting.
    pub fn validate(&self) -> Result<(), ProducerError> {
        self.kafka.validate()?;
        self.pg_connection()?;
        self.table_specs()?;
        let ident_ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ident_ok(&self.postgres.slot) {
            return Err(ProducerError::Config(format!(
                "postgres.slot {:?}: use lower-case letters, digits and underscores (Postgres slot name rules)",
                self.postgres.slot
            )));
        }
        if !ident_ok(&self.postgres.publication) {
            return Err(ProducerError::Config(format!(
                "postgres.publication {:?}: use lower-case letters, digits and underscores",
                self.postgres.publication
            )));
        }
        if self.topics.partitions < 1 || self.topics.replication_factor < 1 {
            return Err(ProducerError::Config(
                "topics.partitions and topics.replication_factor must be at least 1".into(),
            ));
        }
        let min_isr = self.topics.effective_min_insync_replicas();
        if min_isr < 1 || min_isr > self.topics.replication_factor {
            return Err(ProducerError::Config(format!(
                "topics.min_insync_replicas = {min_isr} must be between 1 and topics.replication_factor ({}); \
                 above it no write could ever be acknowledged",
                self.topics.replication_factor
            )));
        }
        if !(1..=64).contains(&self.snapshot.parallelism) {
            return Err(ProducerError::Config(format!(
                "snapshot.parallelism = {} must be between 1 and 64 (each chunk in flight holds a Postgres connection)",
                self.snapshot.parallelism
            )));
        }
        if !(100..=1_000_000).contains(&self.snapshot.chunk_rows) {
            return Err(ProducerError::Config(format!(
                "snapshot.chunk_rows = {} must be between 100 and 1000000",
                self.snapshot.chunk_rows
            )));
        }
        if self.pipeline.max_in_flight < 1 {
            return Err(ProducerError::Config("pipeline.max_in_flight must be at least 1".into()));
        }
        let p = &self.pipeline;
        for (key, value, at_least) in [
            ("pipeline.watermark_interval", p.watermark_interval, Duration::from_millis(1)),
            ("pipeline.heartbeat_interval", p.heartbeat_interval, Duration::from_millis(10)),
            ("pipeline.status_interval", p.status_interval, Duration::from_millis(10)),
            ("pipeline.shutdown_timeout", p.shutdown_timeout, Duration::from_secs(1)),
            ("pipeline.lag_interval", p.lag_interval, Duration::from_millis(100)),
            ("pipeline.publication_check_interval", p.publication_check_interval, Duration::from_millis(1)),
            ("kafka.request_timeout", self.kafka.request_timeout, Duration::from_millis(100)),
        ] {
            if value < at_least {
                return Err(ProducerError::Config(format!(
                    "{key} = {value:?} is too short: use at least {at_least:?} (durations are written like \"500ms\" or \"5s\")"
                )));
            }
        }
        if self.pipeline.status_interval > Duration::from_secs(30) {
            return Err(ProducerError::Config(
                "pipeline.status_interval above 30s risks wal_sender_timeout disconnects; use 10s or less".into(),
            ));
        }
        Ok(())
    }

    /// The Postgres connection with its password resolved from env or file.
    pub fn pg_connection(&self) -> Result<PgConnection, ProducerError> {
        let (url, url_mode, url_root) = split_tls_params(self.postgres.url.expose());
        let parsed: tokio_postgres::Config = url.parse().map_err(|e| {
            ProducerError::Config(format!(
                "postgres.url does not parse ({e}); expected postgres://user@host:port/database"
            ))
        })?;
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = parsed.get_ports().first().copied().unwrap_or(5432);
        let user = parsed.get_user().map(str::to_string).ok_or_else(|| {
            ProducerError::Config("postgres.url names no user; use postgres://user@host/database".into())
        })?;
        let database = parsed.get_dbname().map(str::to_string).unwrap_or_else(|| user.clone());
        let password = match (&self.postgres.password, &self.postgres.password_file, parsed.get_password()) {
            (Some(p), _, _) => p.clone(),
            (None, Some(file), _) => Secret::from_file(file)?,
            (None, None, Some(p)) => Secret::new(String::from_utf8_lossy(p).into_owned()),
            (None, None, None) => Secret::default(),
        };
        let url_mode =
            url_mode.as_deref().map(SslMode::parse).transpose().map_err(|e| ProducerError::Config(e.to_string()))?;
        let mode = match (self.postgres.sslmode, url_mode) {
            (Some(a), Some(b)) if a != b => {
                return Err(ProducerError::Config(format!(
                    "postgres.sslmode ({a:?}) and sslmode in postgres.url ({b:?}) disagree; set one of them"
                )));
            }
            (Some(mode), _) | (None, Some(mode)) => mode,
            (None, None) => SslMode::default(),
        };
        let root_cert = self.postgres.sslrootcert.clone().or(url_root.map(PathBuf::from));
        let tls = PgTls::new(mode, root_cert).map_err(|e| ProducerError::Config(e.to_string()))?;
        Ok(PgConnection { host, port, user, password, database, tls })
    }

    /// The configured tables resolved against the contracts.
    pub fn table_specs(&self) -> Result<Vec<TableSpec>, ProducerError> {
        if self.tables.is_empty() {
            return Err(ProducerError::Config(
                "no [[tables]] configured; add at least one table and its contract".into(),
            ));
        }
        let registry = Registry::builtin()?;
        let mut specs: Vec<TableSpec> = Vec::new();
        for t in &self.tables {
            let (schema, name) = t.table.split_once('.').ok_or_else(|| {
                ProducerError::Config(format!(
                    "tables.table {:?}: write it schema-qualified, like public.{}",
                    t.table, t.table
                ))
            })?;
            let contract =
                registry.contract(&t.contract).map_err(|e| ProducerError::Config(format!("table {}: {e}", t.table)))?;
            let version = match t.contract_version {
                Some(v) => {
                    contract
                        .version(v)
                        .ok_or_else(|| {
                            ProducerError::Config(format!(
                                "table {}: contract {} has no version {v} (known: {})",
                                t.table,
                                contract.name,
                                contract.versions.iter().map(|v| v.version.to_string()).collect::<Vec<_>>().join(", ")
                            ))
                        })?
                        .version
                }
                None => contract.latest().version,
            };
            let topic = t.topic.clone().unwrap_or_else(|| format!("{}.{}.{}", self.topics.prefix, schema, name));
            if specs.iter().any(|s| s.qualified() == t.table) {
                return Err(ProducerError::Config(format!("table {} is configured twice", t.table)));
            }
            if specs.iter().any(|s| s.topic == topic) {
                return Err(ProducerError::Config(format!("topic {topic} is used by two tables")));
            }
            specs.push(TableSpec { schema: schema.to_string(), name: name.to_string(), topic, contract, version });
        }
        Ok(specs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Format;

    fn base() -> ProducerConfig {
        toml_config(
            r#"
            [postgres]
            url = "postgres://walcache@db:5433/incentives"
            [kafka]
            bootstrap_servers = "k:9092"
            [[tables]]
            table = "public.courier_performance"
            contract = "courier_performance"
            "#,
        )
    }

    fn toml_config(text: &str) -> ProducerConfig {
        figment::Figment::new().merge(figment::providers::Toml::string(text)).extract().expect("parses")
    }

    #[test]
    fn defaults_fill_in_and_validate() {
        let cfg = base();
        cfg.validate().expect("valid");
        let conn = cfg.pg_connection().expect("conn");
        assert_eq!((conn.host.as_str(), conn.port, conn.database.as_str()), ("db", 5433, "incentives"));
        let specs = cfg.table_specs().expect("specs");
        assert_eq!(specs[0].topic, "incentives.public.courier_performance");
        assert_eq!(specs[0].version, 2);
    }

    #[test]
    fn mistakes_are_reported_with_what_to_do() {
        let mut cfg = base();
        cfg.tables[0].contract = "nope".into();
        let e = cfg.validate().expect_err("unknown contract").to_string();
        assert!(e.contains("unknown contract") && e.contains("courier_performance"), "{e}");

        let mut cfg = base();
        cfg.tables[0].table = "courier_performance".into();
        assert!(cfg.validate().expect_err("unqualified").to_string().contains("schema-qualified"));

        let mut cfg = base();
        cfg.postgres.slot = "Bad-Slot".into();
        assert!(cfg.validate().expect_err("slot").to_string().contains("postgres.slot"));

        let unknown = figment::Figment::new()
            .merge(figment::providers::Toml::string(
                "[postgres]\nurl='postgres://u@h/d'\nslott='x'\n[kafka]\nbootstrap_servers='k:1'\n[[tables]]\ntable='public.t'\ncontract='courier_performance'",
            ))
            .extract::<ProducerConfig>();
        assert!(unknown.expect_err("unknown field").to_string().contains("slott"));
    }

    #[test]
    fn topics_are_durable_by_default_and_min_isr_fits_the_replicas() {
        let cfg = base();
        assert_eq!((cfg.topics.replication_factor, cfg.topics.effective_min_insync_replicas()), (3, 2));
        let mut cfg = base();
        cfg.topics.replication_factor = 1;
        assert_eq!(cfg.topics.effective_min_insync_replicas(), 1, "a local single broker lowers both explicitly");
        cfg.validate().expect("valid");
        cfg.topics.min_insync_replicas = Some(2);
        let e = cfg.validate().expect_err("more in-sync replicas than replicas").to_string();
        assert!(e.contains("topics.min_insync_replicas = 2"), "{e}");
    }

    #[test]
    fn zero_durations_are_refused_with_the_key_named() {
        for key in [
            "watermark_interval",
            "heartbeat_interval",
            "status_interval",
            "shutdown_timeout",
            "lag_interval",
            "publication_check_interval",
        ] {
            let cfg = toml_config(&format!(
                "[postgres]\nurl='postgres://u@h/d'\n[kafka]\nbootstrap_servers='k:1'\n[pipeline]\n{key} = '0s'\n\
                 [[tables]]\ntable='public.t'\ncontract='courier_performance'"
            ));
            let e = cfg.validate().expect_err("zero is refused").to_string();
            assert!(e.contains(&format!("pipeline.{key}")) && e.contains("too short"), "{e}");
        }
        let mut cfg = base();
        cfg.kafka.request_timeout = Duration::ZERO;
        assert!(cfg.validate().expect_err("zero").to_string().contains("kafka.request_timeout"));
    }

    #[test]
    fn partial_sections_take_defaults() {
        let cfg = toml_config(
            r#"
            [postgres]
            url = "postgres://walcache@db/incentives"
            [kafka]
            bootstrap_servers = "k:9092"
            [topics]
            prefix = "payments"
            [pipeline]
            max_in_flight = 10
            [[tables]]
            table = "public.courier_performance"
            contract = "courier_performance"
            "#,
        );
        assert_eq!(cfg.topics.partitions, 6);
        assert_eq!(cfg.pipeline.shutdown_timeout, std::time::Duration::from_secs(30));
        assert_eq!(cfg.table_specs().expect("specs")[0].topic, "payments.public.courier_performance");
    }

    #[test]
    fn the_password_never_prints() {
        let mut cfg = base();
        cfg.postgres.password = Some(Secret::new("s3cret-pw"));
        let shown = format!("{cfg:?} {:?}", cfg.pg_connection().expect("conn"));
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert_eq!(cfg.pg_connection().expect("conn").password.expose(), "s3cret-pw");
    }
}
