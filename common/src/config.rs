//! Configuration loading: a TOML file, then `WALCACHE_*` environment overrides.
//!
//! ```text
//!  walcache.toml ──┐
//!                  ├─ figment ──► serde struct (deny_unknown_fields) ──► validate() ──► daemon
//!  WALCACHE_A__B ──┘   (env wins; `__` separates levels: WALCACHE_POSTGRES__URL -> postgres.url)
//! ```
//!
//! Only variables with a `__` are read as overrides, so helper variables such as
//! `WALCACHE_CONFIG` or `WALCACHE_LOCAL_*` never collide with settings. Secrets come from the
//! environment or from files and print as `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::CommonError;

/// Loads a daemon's configuration from `path` (optional) and the environment.
pub fn load<T: DeserializeOwned>(path: Option<&Path>) -> Result<T, CommonError> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.exists() {
            return Err(CommonError::Config(format!(
                "config file {} does not exist (pass --config or set WALCACHE_CONFIG)",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed("WALCACHE_").filter(|key| key.as_str().contains("__")).split("__"));
    figment.extract().map_err(|e| CommonError::Config(describe_figment_error(e)))
}

fn describe_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|err| {
            let path = if err.path.is_empty() { String::new() } else { format!("{}: ", err.path.join(".")) };
            let source = err.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            format!("{path}{}{source}", err.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads a secret from a file (trailing newline removed), as mounted by Kubernetes or systemd.
    pub fn from_file(path: &Path) -> Result<Self, CommonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CommonError::Io { context: format!("reading secret file {}", path.display()), source })?;
        Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// Kafka connection settings shared by both daemons.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// librdkafka settings passed through as they are (`security.protocol`, `sasl.username`,
    /// `linger.ms`...). From the environment, `_` stands for `.` in the name:
    /// `WALCACHE_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`.
    #[serde(default)]
    pub properties: BTreeMap<String, Secret>,
    /// Files whose contents become librdkafka settings, for secrets mounted as files:
    /// `{ "sasl.password" = "/run/secrets/kafka" }`.
    #[serde(default)]
    pub property_files: BTreeMap<String, PathBuf>,
    /// How long admin and metadata calls may take.
    #[serde(default = "default_kafka_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_kafka_timeout() -> Duration {
    Duration::from_secs(10)
}

impl KafkaConfig {
    /// The pass-through properties with names normalized (`_` -> `.`) and files read.
    pub fn resolved_properties(&self) -> Result<BTreeMap<String, Secret>, CommonError> {
        let mut out: BTreeMap<String, Secret> =
            self.properties.iter().map(|(k, v)| (k.replace('_', "."), v.clone())).collect();
        for (name, path) in &self.property_files {
            out.insert(name.replace('_', "."), Secret::from_file(path)?);
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<(), CommonError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(CommonError::Config(
                "kafka.bootstrap_servers is empty; set it to host:port of your brokers".into(),
            ));
        }
        Ok(())
    }
}

/// The ops HTTP endpoint of a daemon.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` listen; port 0 picks a free port.
    pub listen: std::net::SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(serde_json::to_string(&s).expect("serialize"), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn property_names_from_the_environment_become_dotted() {
        let cfg = KafkaConfig {
            bootstrap_servers: "x:1".into(),
            properties: [("sasl_password".to_string(), Secret::new("p"))].into(),
            property_files: BTreeMap::new(),
            request_timeout: default_kafka_timeout(),
        };
        let props = cfg.resolved_properties().expect("resolves");
        assert_eq!(props.get("sasl.password").map(Secret::expose), Some("p"));
    }
}
