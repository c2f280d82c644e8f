//! Keeps the publication honest while the producer streams.
//!
//! Postgres filters changes through the publication as it stood when each change was made:
//! after `ALTER PUBLICATION ... SET (publish = 'insert, update')` or `... DROP TABLE`, the
//! deletes (or the table's changes) made since simply never arrive, and no restart of the slot
//! brings them back. The producer cannot see the ALTER in the stream, so it checks the
//! publication's catalog row before it vouches for a position: a checkpoint is confirmed to
//! the slot and marked complete in a watermark only after a check that started once the
//! checkpoint had been received. The ALTER committed before the checkpoint was received, so that
//! check sees it.
//!
//! ```text
//!  stream loop ──request(lsn)──► guard task: SELECT pg_publication (+ its tables) ──┐
//!      ▲                          at most one check per `publication_check_interval`  │
//!      └──── Verified::Upto(lsn): confirm + watermark up to lsn ◄──────────────────────┘
//!            Verified::Broken(why): stop; nothing past the last verified LSN vouched for
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;
use walcache_schemas::Lsn;

use crate::ProducerError;
use crate::config::TableSpec;
use crate::postgres::Control;

/// What the guard last established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Every checkpoint at or before this LSN was received before a good check.
    Upto(Lsn),
    /// The publication no longer covers what walcache needs: why.
    Broken(String),
}

/// What the guard checks: a publication and the tables it must publish, with every operation.
#[derive(Debug)]
struct Expected {
    control: Control,
    publication: String,
    tables: Vec<TableSpec>,
}

impl Expected {
    /// `None` when the publication still publishes every operation of every table.
    async fn problem(&self) -> Result<Option<String>, ProducerError> {
        let schemas: Vec<&str> = self.tables.iter().map(|t| t.schema.as_str()).collect();
        let names: Vec<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
        let row = self
            .control
            .client()
            .query_opt(
                "SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, \
                   ARRAY(SELECT t.s || '.' || t.r FROM unnest($2::text[], $3::text[]) AS t(s, r) \
                         WHERE NOT p.puballtables AND NOT EXISTS ( \
                           SELECT 1 FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid \
                           JOIN pg_namespace n ON n.oid = c.relnamespace \
                           WHERE pr.prpubid = p.oid AND n.nspname = t.s AND c.relname = t.r)) \
                 FROM pg_publication p WHERE p.pubname = $1",
                &[&self.publication, &schemas, &names],
            )
            .await
            .map_err(|e| ProducerError::pg("checking the publication", e))?;
        let Some(row) = row else {
            return Ok(Some(format!("publication {} was dropped", self.publication)));
        };
        let ops: [(bool, &str); 4] =
            [(row.get(0), "insert"), (row.get(1), "update"), (row.get(2), "delete"), (row.get(3), "truncate")];
        let mut gone: Vec<String> = ops.iter().filter(|(on, _)| !on).map(|(_, op)| format!("{op}s")).collect();
        gone.extend(row.get::<_, Vec<String>>(4).into_iter().map(|t| format!("table {t}")));
        Ok((!gone.is_empty())
            .then(|| format!("publication {} no longer publishes {}", self.publication, gone.join(", "))))
    }
}

/// Checks the publication on request, in a task beside the stream.
#[derive(Debug)]
pub struct PublicationGuard {
    expected: Arc<Expected>,
    requested: watch::Sender<Lsn>,
    verified: watch::Receiver<Verified>,
    _stop: DropGuard,
}

impl PublicationGuard {
    /// `interval` bounds how often the catalog is read while changes flow (none while idle).
    pub fn start(control: Control, publication: &str, tables: Vec<TableSpec>, interval: Duration) -> Self {
        let expected = Arc::new(Expected { control, publication: publication.to_string(), tables });
        let (requested, mut requests) = watch::channel(Lsn::ZERO);
        let (report, verified) = watch::channel(Verified::Upto(Lsn::ZERO));
        let stop = CancellationToken::new();
        let (token, task_expected) = (stop.clone(), Arc::clone(&expected));
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        changed = requests.changed() => if changed.is_err() { return },
                    }
                    // Read before the check starts: everything up to it was received by now.
                    let lsn = *requests.borrow_and_update();
                    match task_expected.problem().await {
                        Ok(None) => {
                            report.send_replace(Verified::Upto(lsn));
                        }
                        Ok(Some(problem)) => {
                            report.send_replace(Verified::Broken(problem));
                            return;
                        }
                        // The control connection is failing; the session notices that on its
                        // own. Nothing is vouched for meanwhile; the next request retries.
                        Err(e) => tracing::warn!(error = %e, "cannot check the publication"),
                    }
                    tokio::time::sleep(interval).await;
                }
            }
            .instrument(tracing::info_span!("publication")),
        );
        PublicationGuard { expected, requested, verified, _stop: stop.drop_guard() }
    }

    /// Asks for a check covering checkpoints up to `lsn` (received already).
    pub fn request(&self, lsn: Lsn) {
        self.requested.send_if_modified(|current| {
            let newer = lsn > *current;
            if newer {
                *current = lsn;
            }
            newer
        });
    }

    /// The next result of the guard.
    pub async fn changed(&mut self) -> Verified {
        if self.verified.changed().await.is_err() {
            return Verified::Broken("the publication check stopped".into());
        }
        self.verified.borrow_and_update().clone()
    }

    /// Checks now, for a drain: covers everything received before the call.
    pub async fn verify_now(&self, lsn: Lsn) -> Result<Verified, ProducerError> {
        Ok(match self.expected.problem().await? {
            None => Verified::Upto(lsn),
            Some(problem) => Verified::Broken(problem),
        })
    }
}

/// The definite error for a publication that changed under a streaming slot.
pub fn broken(problem: &str, slot: &str, vouched: Lsn) -> ProducerError {
    ProducerError::Prerequisite {
        problem: format!(
            "{problem} (changed while streaming). Postgres filters changes through the publication as it stood \
             when each change was made, so those made since never reached walcache and a restart cannot bring \
             them back; nothing after {vouched} was confirmed to the slot or marked complete"
        ),
        fix: format!(
            "restore the publication (ALTER PUBLICATION ... SET (publish = 'insert, update, delete, truncate'), \
             ALTER PUBLICATION ... ADD TABLE ...), then copy the tables again: stop every producer of this slot \
             and run SELECT pg_drop_replication_slot('{slot}')"
        ),
    }
}
