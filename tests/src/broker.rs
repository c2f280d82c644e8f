//! A tansu broker, or a Postgres cluster, of a test's own, to stop and start without
//! disturbing other tests. tansu compacts compacted topics when it starts, so after
//! [`DedicatedBroker::resume`] a topic may have lost events that a later event of the same key
//! superseded.

use std::path::PathBuf;
use std::process::Command;

use crate::Env;

#[derive(Debug)]
pub struct DedicatedBroker {
    dir: tempfile::TempDir,
    pub bootstrap: String,
}

impl DedicatedBroker {
    pub fn start() -> DedicatedBroker {
        let mut broker = DedicatedBroker { bootstrap: String::new(), dir: tempfile::tempdir().expect("temp dir") };
        broker.run("broker-start");
        let port = std::fs::read_to_string(broker.dir.path().join("broker/port")).expect("broker port");
        broker.bootstrap = format!("127.0.0.1:{}", port.trim());
        broker
    }

    fn run(&self, command: &str) {
        let script: PathBuf = Env::get().repo.join("deploy/local/walcache-env");
        let status = Command::new(script)
            .args([command, "--dir"])
            .arg(self.dir.path())
            .env("WALCACHE_BROKER_MAINTENANCE_INTERVAL", crate::test_broker_maintenance())
            .status()
            .expect("walcache-env runs");
        assert!(status.success(), "walcache-env {command} failed");
    }

    /// Stops the broker (its data stays).
    pub fn stop(&self) {
        self.run("broker-stop");
    }

    /// Starts it again on the same port and storage.
    pub fn resume(&self) {
        self.run("broker-start");
    }
}

impl Drop for DedicatedBroker {
    fn drop(&mut self) {
        self.run("broker-stop");
    }
}

/// A Postgres cluster of a test's own (`wal_level=logical`, TLS on, like the shared one).
#[derive(Debug)]
pub struct DedicatedPostgres {
    dir: tempfile::TempDir,
    /// Its settings, with the shared environment's broker.
    pub env: &'static Env,
}

impl DedicatedPostgres {
    pub fn start() -> DedicatedPostgres {
        let shared = Env::get();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut env = crate::load_env(&shared.repo, dir.path(), "pg-up");
        env.kafka = shared.kafka.clone();
        // One cluster per test that asks for it: a handful of small leaks per run.
        DedicatedPostgres { dir, env: Box::leak(Box::new(env)) }
    }

    fn run(&self, command: &str) {
        let script: PathBuf = self.env.repo.join("deploy/local/walcache-env");
        let status =
            Command::new(script).args([command, "--dir"]).arg(self.dir.path()).status().expect("walcache-env runs");
        assert!(status.success(), "walcache-env {command} failed");
    }

    /// A fast shutdown (every session is terminated), then a start on the same data and port.
    pub fn restart(&self) {
        self.run("pg-stop");
        self.run("pg-start");
    }
}

impl Drop for DedicatedPostgres {
    fn drop(&mut self) {
        self.run("destroy");
    }
}
