//! A producer pointed at a test database, with topics of its own.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use walcache_common::ops::Health;
use walcache_producer::{Metrics, Producer, ProducerConfig, ProducerError};

use crate::{TestDb, binary, free_port, unique};

/// Names and settings of one test pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub db: TestDb,
    pub kafka: String,
    pub slot: String,
    pub prefix: String,
    /// The courier_performance topic.
    pub topic: String,
    pub watermarks: String,
    pub dead_letter: String,
    /// The snapshot state topic.
    pub snapshots: String,
    /// Extra TOML appended to the generated configuration.
    pub extra_toml: String,
    pub partitions: i32,
    /// `pipeline.max_in_flight`.
    pub max_in_flight: usize,
}

impl Pipeline {
    /// Every topic the producer writes, with its partition count: a broker that cannot
    /// create topics with their settings (librdkafka's mock cluster) needs them made first.
    pub fn topics(&self) -> [(&str, i32); 4] {
        [(&self.topic, self.partitions), (&self.watermarks, 1), (&self.dead_letter, 1), (&self.snapshots, 1)]
    }

    /// A fresh database seeded with `rows` couriers, and a producer streaming it (its
    /// snapshot delivered).
    pub async fn streaming(rows: i64) -> (Pipeline, InProcess) {
        let db = TestDb::create().await;
        db.seed(1, rows).await;
        let pipeline = Pipeline::new(&db);
        let producer = pipeline.start_in_process();
        producer.wait_ready(Duration::from_secs(60)).await;
        (pipeline, producer)
    }

    pub fn new(db: &TestDb) -> Pipeline {
        Self::with_kafka(db, &db.env.kafka)
    }

    pub fn with_kafka(db: &TestDb, kafka: &str) -> Pipeline {
        Self::named(db, kafka, &unique("tslot"), &unique("t"))
    }

    /// A pipeline with chosen slot and topic prefix (the demo's real-looking names).
    pub fn named(db: &TestDb, kafka: &str, slot: &str, prefix: &str) -> Pipeline {
        let (slot, prefix) = (slot.to_string(), prefix.to_string());
        Pipeline {
            db: db.clone(),
            kafka: kafka.to_string(),
            topic: format!("{prefix}.public.courier_performance"),
            watermarks: format!("{prefix}.watermarks"),
            dead_letter: format!("{prefix}.dlq"),
            snapshots: format!("{prefix}.snapshots"),
            slot,
            prefix,
            extra_toml: String::new(),
            partitions: 3,
            max_in_flight: 20_000,
        }
    }

    /// Waits until `topic`, folded by position, equals `table` read through Postgres; returns
    /// the topic's events.
    pub async fn converge_table(&self, topic: &str, table: &str, timeout: Duration) -> Vec<crate::events::Event> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let events = crate::events::decode_all(&crate::kafka::read_all(&self.kafka, topic).await);
            let rows = self.db.contract_view_of(table).await;
            let view = crate::events::materialize(&events);
            if view == rows {
                return events;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{topic} did not converge to {table}: table {} rows, view {} rows, {} differ",
                rows.len(),
                view.len(),
                rows.iter().filter(|(k, v)| view.get(k) != Some(*v)).count()
                    + view.keys().filter(|k| !rows.contains_key(k)).count()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Messages on the courier_performance topic (sum of its partitions' high watermarks).
    pub async fn topic_size(&self) -> i64 {
        crate::kafka::high_watermarks(&self.kafka, &self.topic).await.iter().map(|(_, h)| h).sum()
    }

    /// The configuration as a file would hold it; `ops_port` 0 picks any port.
    pub fn toml(&self, ops_port: u16) -> String {
        format!(
            r#"
[postgres]
url = "{url}"
password_file = "{password_file}"
slot = "{slot}"
publication = "{slot}"

[kafka]
bootstrap_servers = "{kafka}"

[topics]
prefix = "{prefix}"
partitions = {partitions}
replication_factor = 1
watermarks = "{watermarks}"
dead_letter = "{dead_letter}"
snapshots = "{snapshots}"

[[tables]]
table = "public.courier_performance"
contract = "courier_performance"

[pipeline]
heartbeat_interval = "200ms"
status_interval = "200ms"
watermark_interval = "10ms"
shutdown_timeout = "20s"
lag_interval = "1s"
max_in_flight = {max_in_flight}

[ops]
listen = "127.0.0.1:{ops_port}"
{extra}
"#,
            url = self.db.url(),
            password_file = self.db.env.pg_password_file.display(),
            slot = self.slot,
            kafka = self.kafka,
            prefix = self.prefix,
            partitions = self.partitions,
            watermarks = self.watermarks,
            dead_letter = self.dead_letter,
            snapshots = self.snapshots,
            max_in_flight = self.max_in_flight,
            extra = self.extra_toml,
        )
    }

    pub fn config(&self) -> ProducerConfig {
        toml::from_str(&self.toml(0)).expect("test configuration parses")
    }

    /// Runs the producer in this process.
    pub fn start_in_process(&self) -> InProcess {
        self.start_in_process_with(self.config())
    }

    /// Runs the producer in this process with a configuration the test changed.
    pub fn start_in_process_with(&self, config: ProducerConfig) -> InProcess {
        let metrics = Metrics::new().expect("metrics");
        let health = Arc::new(Health::default());
        let producer = Producer::new(config, metrics.clone(), Arc::clone(&health)).expect("valid config");
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let handle = tokio::spawn(async move { producer.run(token).await });
        InProcess { metrics, health, cancel, handle }
    }

    /// Runs the walcache-producer binary.
    pub fn spawn(&self) -> ProducerProcess {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("producer.toml");
        std::fs::File::create(&config).and_then(|mut f| f.write_all(self.toml(port).as_bytes())).expect("write config");
        let log = dir.path().join("producer.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary("walcache-producer"))
            .arg("--config")
            .arg(&config)
            .env("WALCACHE_LOG", "info,rdkafka=warn")
            .env_remove("WALCACHE_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn walcache-producer");
        ProducerProcess { child: Some(child), ops: format!("127.0.0.1:{port}"), log, _dir: dir }
    }
}

/// A producer running as a task of the test.
#[derive(Debug)]
pub struct InProcess {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), ProducerError>>,
}

impl InProcess {
    /// Waits until the producer streams (ready), failing early if it stopped.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.health.is_ready() {
            assert!(!self.handle.is_finished(), "the producer stopped before it was ready");
            assert!(Instant::now() < deadline, "producer not ready after {timeout:?}: {:?}", self.health.get());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM's equivalent: cancel and wait for the drain.
    pub async fn stop(self) -> Result<(), ProducerError> {
        self.cancel.cancel();
        self.handle.await.expect("producer task")
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the producer to stop on its own (a definite error), up to `timeout`.
    pub async fn exited(self, timeout: Duration) -> Result<(), ProducerError> {
        match tokio::time::timeout(timeout, self.handle).await {
            Ok(joined) => joined.expect("producer task"),
            Err(_) => panic!("the producer was still running after {timeout:?}"),
        }
    }
}

/// The producer binary running as a child process.
#[derive(Debug)]
pub struct ProducerProcess {
    child: Option<Child>,
    /// host:port of its ops endpoint.
    pub ops: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProducerProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// kill -9: no drain, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits until `/readyz` answers 200; fails the test if the process exits first.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.ready().await {
            assert!(!self.has_exited(), "producer exited: {}", self.log());
            assert!(std::time::Instant::now() < deadline, "producer not ready: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One metric's value from the ops endpoint (summed over labels), if it answers.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        crate::metric_in(&http_get(&self.ops, "/metrics").await?, name)
    }

    pub async fn ready(&self) -> bool {
        http_get(&self.ops, "/readyz").await.is_some_and(|b| b.contains("\"ready\":true"))
    }
}

impl Drop for ProducerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 GET; the body, or None when nothing answers.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}
