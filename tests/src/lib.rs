//! The test kit: real Postgres (wal_level=logical) and a real Kafka-protocol broker (tansu),
//! shared by every test binary, with a database, slot and topics of its own for each test.
//!
//! ```text
//!  Env::get() ──► deploy/local/walcache-env up --dir .walcache/test   (idempotent, flock'd)
//!     ├─ TestDb::create("name")   a fresh database with the courier_performance table
//!     ├─ Pipeline::new(&db)       unique slot, publication, topics; a ProducerConfig
//!     │     ├─ .start_in_process()     Producer::run in this process (metrics, cancel)
//!     │     └─ .spawn()                the walcache-producer binary (kill -9, SIGTERM)
//!     └─ kafka::read_all / events::materialize   what reached the topics, decoded
//! ```
//!
//! `make test` starts the environment once and stops it at the end; a plain `cargo test`
//! starts it on first use and leaves it running for the next run.

pub mod broker;
pub mod consumer;
pub mod events;
pub mod kafka;
pub mod net;
pub mod pipeline;
pub mod postgres;
pub mod writer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use pipeline::{InProcess, Pipeline, ProducerProcess};
pub use postgres::TestDb;

/// The shared environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub repo: PathBuf,
    pub dir: PathBuf,
    pub pg_port: u16,
    pub pg_password_file: PathBuf,
    pub pg_password: String,
    /// The CA that signed the local cluster's server certificate (for localhost, 127.0.0.1).
    pub pg_ca: PathBuf,
    pub kafka: String,
}

static ENV: OnceLock<Env> = OnceLock::new();

impl Env {
    /// Starts (or finds) the shared environment.
    pub fn get() -> &'static Env {
        ENV.get_or_init(|| {
            let repo = repo_root();
            let dir = std::env::var_os("WALCACHE_TEST_ENV_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo.join(".walcache/test"));
            let env = load_env(&repo, &dir, "up");
            init_tracing();
            env
        })
    }
}

/// Brings up an environment with `command` (`up`, or `pg-up` for Postgres only) and reads it.
pub fn load_env(repo: &Path, dir: &Path, command: &str) -> Env {
    let status = Command::new(repo.join("deploy/local/walcache-env"))
        .args([command, "--dir"])
        .arg(dir)
        .env(BROKER_MAINTENANCE_VAR, test_broker_maintenance())
        .status()
        .expect("deploy/local/walcache-env runs");
    assert!(status.success(), "walcache-env {command} failed; see the logs under {}", dir.display());
    let text = std::fs::read_to_string(dir.join("env")).expect("walcache-env wrote its env file");
    let var = |name: &str| -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(&format!("export {name}="))).map(|v| v.trim_matches('\'').to_string())
    };
    let pg_password_file = PathBuf::from(var("WALCACHE_LOCAL_PG_PASSWORD_FILE").expect("password file"));
    Env {
        repo: repo.to_path_buf(),
        dir: dir.to_path_buf(),
        pg_port: var("WALCACHE_LOCAL_PG_PORT").and_then(|p| p.parse().ok()).expect("pg port"),
        pg_password: std::fs::read_to_string(&pg_password_file).expect("password").trim().to_string(),
        pg_password_file,
        pg_ca: var("WALCACHE_LOCAL_PG_CA").map(PathBuf::from).expect("the local cluster's CA"),
        kafka: var("WALCACHE_LOCAL_KAFKA").unwrap_or_default(),
    }
}

const BROKER_MAINTENANCE_VAR: &str = "WALCACHE_BROKER_MAINTENANCE_INTERVAL";

/// How often a test broker compacts: practically never (the Makefile says the same), so that
/// a topic read back holds every event the producer wrote. A broker restart still compacts.
pub fn test_broker_maintenance() -> String {
    std::env::var(BROKER_MAINTENANCE_VAR).unwrap_or_else(|_| "30days".into())
}

/// A CA of its own (self-signed) in `dir`, that signed nothing the server presents.
pub fn unrelated_ca(dir: &std::path::Path) -> std::path::PathBuf {
    let pem = dir.join("other-ca.pem");
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=not the server's CA"])
        .arg("-keyout")
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&pem)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs (deploy/local/install-tools.sh installs it)");
    assert!(status.success(), "openssl made no CA");
    pem
}

/// The workspace root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn init_tracing() {
    // Quiet by default; WALCACHE_TEST_LOG=info (or WALCACHE_LOG) shows the pipeline's logs.
    let filter = std::env::var("WALCACHE_TEST_LOG").unwrap_or_else(|_| "warn".into());
    walcache_common::telemetry::init(&filter);
}

/// A name no other test (or earlier run) uses: `prefix_<pid>_<n>_<random>`, lower-case.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}_{}_{}_{:04x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), rand::random::<u16>())
}

/// Polls `check` until it returns `Some` or `timeout` passes (then panics with `what`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Builds the workspace binaries and examples once per test process (a no-op when they are
/// fresh) and returns the path of binary `name`.
pub fn binary(name: &str) -> PathBuf {
    built("debug", name)
}

/// The path of example `name` (built like [`binary`]).
pub fn example(name: &str) -> PathBuf {
    built("debug/examples", name)
}

fn built(dir: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--workspace", "--bins", "--examples"])
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the workspace binaries failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let path = target.join(dir).join(name);
    assert!(path.exists(), "{} is missing after the build", path.display());
    path
}

/// A TCP port that was free a moment ago, for a server a test starts next.
///
/// Not an ephemeral port: the kernel hands those out to every outgoing connection (to Postgres,
/// to the broker), so one picked with `bind(:0)` and released can be taken by a client socket
/// before the server binds it. Ports come from below the ephemeral range instead, from a
/// per-process sequence so that two tests of one binary never get the same one, starting at an
/// offset derived from the process id so that two processes rarely walk the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|low| *low > FIRST + 1_000)
        .unwrap_or(32_768);
    let span = ephemeral_low - FIRST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port between {FIRST} and {ephemeral_low}")
}

/// One metric's value in a Prometheus text exposition, summed over its series: what a
/// scraper reads, not the exporter's own bookkeeping.
pub fn metric_in(exposition: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = exposition
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// One metric's value in a registry, summed over the series whose labels include `labels`
/// (counters and gauges), as the service's own `/metrics` would show it.
pub fn registry_value(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)))
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}
