//! What a slot has copied and still has to copy: the snapshot state, persisted as one JSON
//! record per slot (key = slot name) on the compacted `topics.snapshots` topic.
//!
//! ```text
//!  slot created ──► every configured table gets an `initial` job (at_creation)
//!  table added to the configuration later ──► an `initial` job of its own
//!  `walcache-producer backfill` (a WAL signal) ──► a `backfill` job (optionally a key range)
//!  chunk delivered ──► job.after = chunk's last key, rows += n ──► record re-published
//!  last chunk delivered ──► job removed; an initial job adds its table to `complete`
//! ```
//!
//! The record is sent through the sink's ordered queue, so a position after it is confirmed
//! to the slot only once the record is in Kafka: a backfill signal is never confirmed away
//! before the job it created is durable.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use walcache_common::config::KafkaConfig;
use walcache_common::kafka::{Metadata, read_to_end};

use crate::ProducerError;

/// Format version of the record.
const STATE_VERSION: u32 = 1;

/// A slot's snapshot state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    pub version: u32,
    /// Tables whose initial copy completed on this slot (`schema.table`).
    pub complete: BTreeSet<String>,
    /// Jobs not finished yet, in the order they run.
    pub jobs: Vec<Job>,
    /// Next job id.
    pub next_id: u64,
    /// LSN of the newest backfill signal taken in: a replay of the stream repeats older ones.
    pub last_signal_lsn: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// The table's first copy: its topic carries no coverage until it completes, and it
    /// starts with a floor marker (rows older than the floor that it does not copy are gone).
    Initial,
    /// A repair copy of a table (or a key range) that is already complete: it only upserts.
    Backfill,
}

/// One table (or key range) to copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub id: u64,
    pub table: String,
    pub kind: JobKind,
    /// Part of the slot's creation snapshot: until every such job completes, watermarks say
    /// `snapshotting` (consumers do not count them).
    pub at_creation: bool,
    /// Initial jobs: LSN of the floor marker (at or before every chunk's position).
    pub floor_lsn: Option<u64>,
    /// Lowest key to copy, inclusive (text values, key columns in contract order).
    pub from_key: Option<Vec<String>>,
    /// Highest key to copy, inclusive.
    pub to_key: Option<Vec<String>>,
    /// Every key up to and including this one has been copied and delivered.
    pub after: Option<Vec<String>>,
    /// Rows delivered so far (across restarts).
    pub rows: u64,
    /// The table's estimated row count when the job started (pg_class), 0 when unknown.
    pub estimate: u64,
    /// Rows per second over the current session, and the time it leaves at that rate.
    #[serde(default)]
    pub rate: f64,
    #[serde(default)]
    pub eta_secs: Option<u64>,
    /// When the job was created and last advanced, Unix microseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl Job {
    fn new(table: &str, kind: JobKind, now: i64) -> Job {
        Job {
            id: 0,
            table: table.to_string(),
            kind,
            at_creation: false,
            floor_lsn: None,
            from_key: None,
            to_key: None,
            after: None,
            rows: 0,
            estimate: 0,
            rate: 0.0,
            eta_secs: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Share of the estimate copied, 0 to 1 (key-range backfills have no estimate).
    pub fn ratio(&self) -> Option<f64> {
        (self.estimate > 0 && self.from_key.is_none() && self.to_key.is_none())
            .then(|| (self.rows as f64 / self.estimate as f64).min(1.0))
    }
}

impl SnapshotState {
    /// A new slot: every table gets an initial job (or none with `copy = false`).
    pub fn for_new_slot(tables: &[String], copy: bool, now: i64) -> Self {
        let mut state = SnapshotState {
            version: STATE_VERSION,
            complete: BTreeSet::new(),
            jobs: Vec::new(),
            next_id: 1,
            last_signal_lsn: 0,
        };
        for table in tables {
            if copy {
                state.add_initial(table, true, None, now);
            } else {
                state.complete.insert(table.clone());
            }
        }
        state
    }

    /// A slot an earlier version streamed from, after its snapshot completed.
    pub fn all_complete(tables: &[String]) -> Self {
        let mut state = Self::for_new_slot(tables, false, 0);
        state.complete = tables.iter().cloned().collect();
        state
    }

    pub fn add_initial(&mut self, table: &str, at_creation: bool, floor_lsn: Option<u64>, now: i64) -> u64 {
        self.push(Job { at_creation, floor_lsn, ..Job::new(table, JobKind::Initial, now) })
    }

    pub fn add_backfill(
        &mut self,
        table: &str,
        from_key: Option<Vec<String>>,
        to_key: Option<Vec<String>>,
        now: i64,
    ) -> u64 {
        self.push(Job { from_key, to_key, ..Job::new(table, JobKind::Backfill, now) })
    }

    fn push(&mut self, mut job: Job) -> u64 {
        job.id = self.next_id;
        self.next_id += 1;
        let id = job.id;
        self.jobs.push(job);
        id
    }

    pub fn job_mut(&mut self, id: u64) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    /// Removes a finished job; an initial one makes its table complete.
    pub fn finish(&mut self, id: u64) -> Option<Job> {
        let at = self.jobs.iter().position(|j| j.id == id)?;
        let job = self.jobs.remove(at);
        if job.kind == JobKind::Initial {
            self.complete.insert(job.table.clone());
        }
        Some(job)
    }

    /// Whether the slot's creation snapshot is still being copied.
    pub fn creating(&self) -> bool {
        self.jobs.iter().any(|j| j.at_creation)
    }

    /// Tables whose first copy has not completed (their topics carry no coverage yet).
    pub fn incomplete_tables(&self) -> BTreeSet<&str> {
        self.jobs.iter().filter(|j| j.kind == JobKind::Initial).map(|j| j.table.as_str()).collect()
    }

    /// Keeps the jobs of configured tables only, and gives every configured table that was
    /// never copied an initial job. Returns the tables that got one.
    pub fn reconcile(&mut self, configured: &[String], copy: bool, now: i64) -> Vec<String> {
        let before = self.jobs.len();
        self.jobs.retain(|j| configured.contains(&j.table));
        if self.jobs.len() != before {
            tracing::warn!(dropped = before - self.jobs.len(), "snapshot jobs of tables no longer configured dropped");
        }
        // A table that left the configuration missed changes meanwhile: if it comes back, it
        // is copied again.
        self.complete.retain(|t| configured.contains(t));
        let mut added = Vec::new();
        for table in configured {
            let pending = self.jobs.iter().any(|j| &j.table == table && j.kind == JobKind::Initial);
            if !self.complete.contains(table) && !pending {
                if copy {
                    self.add_initial(table, false, None, now);
                    added.push(table.clone());
                } else {
                    self.complete.insert(table.clone());
                }
            }
        }
        added
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProducerError> {
        let state: SnapshotState = serde_json::from_slice(bytes).map_err(|e| {
            ProducerError::Config(format!(
                "the snapshot state record does not parse ({e}); it was written by another version of walcache"
            ))
        })?;
        if state.version != STATE_VERSION {
            return Err(ProducerError::Config(format!(
                "the snapshot state record has version {}, this producer reads {STATE_VERSION}: run the newer version",
                state.version
            )));
        }
        Ok(state)
    }
}

/// The newest snapshot state of `slot` on `topic`, if any.
pub async fn load(
    kafka: &KafkaConfig,
    metadata: &Metadata,
    topic: &str,
    slot: &str,
) -> Result<Option<SnapshotState>, ProducerError> {
    let records = read_to_end(kafka, metadata, topic, &format!("walcache-producer-{slot}-snapshots"), 100_000).await?;
    let newest = records.iter().rev().find(|r| r.key.as_deref() == Some(slot.as_bytes()));
    match newest.and_then(|r| r.value.as_deref()) {
        None => Ok(None),
        Some(bytes) => SnapshotState::decode(bytes).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_complete_tables_and_reconcile_with_the_configuration() {
        let tables = vec!["public.a".to_string(), "public.b".to_string()];
        let mut s = SnapshotState::for_new_slot(&tables, true, 1);
        assert!(s.creating());
        assert_eq!(s.incomplete_tables().len(), 2);
        let a = s.jobs[0].id;
        s.finish(a);
        assert!(s.complete.contains("public.a"));
        let b = s.jobs[0].id;
        s.finish(b);
        assert!(!s.creating());
        let back = s.add_backfill("public.a", Some(vec!["5".into()]), None, 2);
        assert_ne!(back, a, "ids are never reused");
        assert!(s.incomplete_tables().is_empty(), "a backfill leaves its table complete");
        let added = s.reconcile(&["public.a".into(), "public.c".into()], true, 3);
        assert_eq!(added, vec!["public.c".to_string()]);
        assert_eq!(SnapshotState::decode(&s.encode()).expect("round trip"), s);
        assert!(!s.jobs.iter().any(|j| j.at_creation), "a table added later is not part of the creation snapshot");
    }
}
