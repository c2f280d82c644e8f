//! A tansu broker of a test's own, to stop and start without disturbing other tests.

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
        let status =
            Command::new(script).args([command, "--dir"]).arg(self.dir.path()).status().expect("walcache-env runs");
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
