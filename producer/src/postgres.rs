//! The producer's regular (non-replication) Postgres connection: the control plane.
//!
//! It holds the leader lock (a session advisory lock keyed by the slot name, so exactly one
//! producer per slot snapshots, drops or streams), manages the publication and the slot,
//! emits heartbeats through the WAL, measures slot lag, and on shutdown waits until the slot
//! shows the confirmed position. The lock lives as long as this connection: if the connection
//! breaks, the session stops, because another instance may already have taken over.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walcache_schemas::Lsn;

use crate::ProducerError;
use crate::config::{PgConnection, TableSpec};

/// Advisory lock class for walcache leader locks ("WALC").
const LOCK_CLASS: i32 = 0x5741_4C43;

/// Prefix of the logical messages the producer writes as heartbeats.
pub const HEARTBEAT_PREFIX: &str = "walcache.heartbeat";

/// What `pg_replication_slots` says about a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
}

/// A control-plane connection.
#[derive(Clone)]
pub struct Control {
    client: Arc<Client>,
    /// Cancelled when the connection ends (and with it, any lock it held).
    pub lost: CancellationToken,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

pub(crate) fn parse_lsn(text: &str) -> Result<Lsn, ProducerError> {
    text.parse().map_err(|e| ProducerError::Config(format!("server returned an LSN that does not parse: {e}")))
}

impl Control {
    pub async fn connect(conn: &PgConnection, application: &str) -> Result<Control, ProducerError> {
        let (client, connection) = conn.tokio_config(application).connect(conn.tls.connector()).await.map_err(|e| {
            crate::tls::tls_failure(&conn.describe(), conn.tls.mode, &e)
                .unwrap_or_else(|| ProducerError::pg(format!("connecting to {}", conn.describe()), e))
        })?;
        let lost = CancellationToken::new();
        let lost_signal = lost.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "control connection to Postgres ended");
            }
            lost_signal.cancel();
        });
        Ok(Control { client: Arc::new(client), lost })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Tries to become the slot's leader; `false` when another session holds the lock.
    pub async fn try_lock_leader(&self, slot: &str) -> Result<bool, ProducerError> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_CLASS, &slot])
            .await
            .map_err(|e| ProducerError::pg("taking the leader lock", e))?;
        Ok(row.get(0))
    }

    /// Whether this connection still holds the slot's leader lock. A query on the control
    /// connection also keeps it from counting as idle (`idle_session_timeout`).
    pub async fn holds_leader_lock(&self, slot: &str) -> Result<bool, ProducerError> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid \
                 AND objid = hashtext($2)::oid AND pid = pg_backend_pid() AND granted)",
                &[&LOCK_CLASS, &slot],
            )
            .await
            .map_err(|e| ProducerError::pg("checking the leader lock", e))?;
        Ok(row.get(0))
    }

    /// The pid of the session holding the leader lock, for messages.
    pub async fn leader_pid(&self, slot: &str) -> Result<Option<i32>, ProducerError> {
        let row = self
            .client
            .query_opt(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid \
                 AND objid = hashtext($2)::oid AND granted LIMIT 1",
                &[&LOCK_CLASS, &slot],
            )
            .await
            .map_err(|e| ProducerError::pg("looking up the leader", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>, ProducerError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| ProducerError::pg("reading pg_replication_slots", e))?;
        row.map(|r| {
            let confirmed: Option<String> = r.get(3);
            Ok(SlotInfo {
                plugin: r.get(0),
                database: r.get(1),
                active_pid: r.get(2),
                confirmed_flush: confirmed.as_deref().map(parse_lsn).transpose()?,
            })
        })
        .transpose()
    }

    pub async fn drop_slot(&self, slot: &str) -> Result<(), ProducerError> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|e| ProducerError::pg(format!("dropping slot {slot}"), e))?;
        Ok(())
    }

    /// Creates the publication for the tables, or adds tables it lacks.
    pub async fn ensure_publication(&self, name: &str, tables: &[TableSpec]) -> Result<(), ProducerError> {
        let exists = self
            .client
            .query_opt("SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(|e| ProducerError::pg("reading pg_publication", e))?;
        let quoted = |t: &TableSpec| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        match exists {
            None => {
                // Via the root: a partitioned table's changes arrive under its own name (and
                // its snapshot copies the root), not under the names of its partitions.
                let list = tables.iter().map(quoted).collect::<Vec<_>>().join(", ");
                self.client
                    .batch_execute(&format!(
                        "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
                        quote_ident(name)
                    ))
                    .await
                    .map_err(|e| publication_error(name, e))?;
                tracing::info!(publication = name, "created publication");
            }
            Some(row) if row.get::<_, bool>(0) => {}
            Some(row) => {
                if !row.get::<_, bool>(1) && self.any_partitioned(tables).await? {
                    self.client
                        .batch_execute(&format!(
                            "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                            quote_ident(name)
                        ))
                        .await
                        .map_err(|e| publication_error(name, e))?;
                    tracing::info!(publication = name, "publication now publishes partitioned tables via their root");
                }
                for t in tables {
                    let present = self
                        .client
                        .query_opt(
                            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                            &[&name, &t.schema, &t.name],
                        )
                        .await
                        .map_err(|e| ProducerError::pg("reading pg_publication_tables", e))?;
                    if present.is_none() {
                        self.client
                            .batch_execute(&format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(name), quoted(t)))
                            .await
                            .map_err(|e| publication_error(name, e))?;
                        tracing::info!(publication = name, table = %t.qualified(), "added table to publication");
                    }
                }
            }
        }
        Ok(())
    }

    /// The configured tables publication `name` does not publish (all of them when it does
    /// not exist). On a slot that already streams, such a table's existing rows were never
    /// copied.
    pub async fn tables_missing_from_publication(
        &self,
        name: &str,
        tables: &[TableSpec],
    ) -> Result<Vec<String>, ProducerError> {
        let mut missing = Vec::new();
        for t in tables {
            // pg_publication_tables lists a partitioned table under its root only when the
            // publication publishes via the root; either way the table itself is covered.
            let listed = self
                .client
                .query_opt(
                    "SELECT 1 FROM pg_publication p \
                     WHERE p.pubname = $1 AND (p.puballtables OR EXISTS ( \
                       SELECT 1 FROM pg_publication_rel r JOIN pg_class c ON c.oid = r.prrelid \
                       JOIN pg_namespace n ON n.oid = c.relnamespace \
                       WHERE r.prpubid = p.oid AND n.nspname = $2 AND c.relname = $3))",
                    &[&name, &t.schema, &t.name],
                )
                .await
                .map_err(|e| ProducerError::pg("reading the publication's tables", e))?;
            if listed.is_none() {
                missing.push(t.qualified());
            }
        }
        Ok(missing)
    }

    /// Whether any of `tables` is partitioned.
    async fn any_partitioned(&self, tables: &[TableSpec]) -> Result<bool, ProducerError> {
        for t in tables {
            let row = self
                .client
                .query_opt(
                    "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[&t.schema, &t.name],
                )
                .await
                .map_err(|e| ProducerError::pg("reading pg_class", e))?;
            if row.is_some_and(|r| r.get::<_, bool>(0)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Waits until every transaction in progress now has ended (as `CREATE INDEX
    /// CONCURRENTLY` does). After a table joins the publication, a transaction that wrote
    /// it before the change but becomes visible only after it would be neither streamed nor
    /// seen by the table's first chunk.
    pub async fn wait_for_transactions_in_progress(&self, cancel: &CancellationToken) -> Result<(), ProducerError> {
        let snapshot: String = self
            .client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(|e| ProducerError::pg("reading the current snapshot", e))?
            .get(0);
        let mut waited = 0u32;
        loop {
            let running: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot) x \
                     WHERE NOT pg_visible_in_snapshot(x, pg_current_snapshot())",
                    &[&snapshot],
                )
                .await
                .map_err(|e| ProducerError::pg("waiting for transactions in progress", e))?
                .get(0);
            if running == 0 {
                return Ok(());
            }
            if waited.is_multiple_of(50) {
                tracing::info!(
                    transactions = running,
                    "waiting for transactions older than the publication change to end before copying new tables \
                     (see pg_stat_activity for long-running ones)"
                );
            }
            waited += 1;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Writes a heartbeat through the WAL: a transactional logical message, so it reaches the
    /// slot as a (tiny) transaction with a commit time even when no table changes.
    pub async fn emit_heartbeat(&self, slot: &str) -> Result<(), ProducerError> {
        self.client
            .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&HEARTBEAT_PREFIX, &slot])
            .await
            .map_err(|e| ProducerError::pg("writing a heartbeat", e))?;
        Ok(())
    }

    /// WAL bytes retained for the slot beyond its confirmed position.
    pub async fn slot_lag_bytes(&self, slot: &str) -> Result<Option<f64>, ProducerError> {
        let row = self
            .client
            .query_opt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| ProducerError::pg("measuring slot lag", e))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Waits until the slot's confirmed_flush_lsn reaches `lsn`, or `deadline` passes.
    pub async fn wait_confirmed(
        &self,
        slot: &str,
        lsn: Lsn,
        deadline: tokio::time::Instant,
    ) -> Result<(), ProducerError> {
        loop {
            let shown = self.slot_info(slot).await?.and_then(|s| s.confirmed_flush);
            if shown.is_some_and(|s| s >= lsn) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProducerError::ConfirmTimeout {
                    slot: slot.to_string(),
                    shown: shown.map_or("nothing".into(), |l| l.to_string()),
                    wanted: lsn.to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn publication_error(name: &str, e: tokio_postgres::Error) -> ProducerError {
    if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
        return ProducerError::Prerequisite {
            problem: format!("this role may not create or change publication {name}"),
            fix: format!(
                "create it as the tables' owner: CREATE PUBLICATION {name} FOR TABLE <tables>; or grant this role ownership"
            ),
        };
    }
    ProducerError::pg(format!("creating publication {name}"), e)
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
