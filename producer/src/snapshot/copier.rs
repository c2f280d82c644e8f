//! The copy side of chunked snapshots: a shared planner cuts jobs into key ranges, and
//! `snapshot.parallelism` workers copy them, each chunk between a low and a high watermark
//! written through the WAL.
//!
//! ```text
//!  planner: SELECT key FROM t WHERE key > after ORDER BY key OFFSET chunk_rows-1 LIMIT 1
//!           ──► Work { lower, upper (inclusive), last }          (index-only, one at a time)
//!  worker:  emit_message(low) ── BEGIN REPEATABLE READ ── pg_current_snapshot() (xip)
//!           COPY (SELECT cols FROM t WHERE lower < key <= upper) TO STDOUT ── COMMIT
//!           ──► Chunk to the stream (bounded) ──► emit_message(high)
//! ```
//!
//! A worker holds a permit per chunk until the stream has emitted it, so at most
//! `2 x parallelism` chunks wait in memory for their high watermark.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::relation_of;
use crate::ProducerError;
use crate::binding::{Binding, TableRuntime};
use crate::config::PgConnection;
use crate::postgres::quote_ident;

/// Prefix of the logical messages that bracket chunks in the WAL.
pub const SNAPSHOT_MESSAGE_PREFIX: &str = "walcache.snapshot";

/// Where a chunk's key range starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lower {
    Unbounded,
    /// Keys above this one.
    Excluded(Vec<String>),
    /// Keys from this one on.
    Included(Vec<String>),
}

/// How a table's rows are addressed by key in SQL.
#[derive(Debug)]
pub struct KeySql {
    /// `schema.table`, or `ONLY schema.table` for a plain table (pgoutput publishes a plain
    /// table's own rows, not its inheritance children's; a partitioned table's rows live in its
    /// partitions).
    from: String,
    /// `(k1, k2)`.
    columns: String,
    /// `k1::text, k2::text`.
    text_columns: String,
    /// SQL type of each key column, for casting literals.
    types: Vec<String>,
    pub estimate: u64,
}

impl KeySql {
    async fn load(client: &Client, table: &TableRuntime) -> Result<KeySql, ProducerError> {
        let qualified = format!("{}.{}", quote_ident(&table.spec.schema), quote_ident(&table.spec.name));
        let names: Vec<String> = table.spec.contract.key_plan.fields.iter().map(|f| f.name.clone()).collect();
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attname = ANY($2) AND NOT a.attisdropped",
                &[&qualified, &names],
            )
            .await
            .map_err(|e| ProducerError::pg(format!("reading the key columns of {}", table.qualified), e))?;
        let mut types = Vec::with_capacity(names.len());
        for name in &names {
            let found =
                rows.iter().find(|r| r.get::<_, String>(0) == *name).ok_or_else(|| ProducerError::Prerequisite {
                    problem: format!("{} has no column {name}, which its contract's key names", table.qualified),
                    fix: "add the column, or point tables.contract at the contract this table follows".into(),
                })?;
            types.push(found.get::<_, String>(1));
        }
        let size = client
            .query_one(
                "SELECT c.relkind = 'p', \
                        (SELECT coalesce(sum(greatest(l.reltuples, pg_stat_get_live_tuples(l.oid), 0)), 0)::float8 \
                         FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid WHERE t.isleaf) \
                 FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .map_err(|e| ProducerError::pg("estimating the table size", e))?;
        let (partitioned, estimate): (bool, f64) = (size.get(0), size.get(1));
        let quoted: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
        Ok(KeySql {
            from: if partitioned { qualified } else { format!("ONLY {qualified}") },
            columns: format!("({})", quoted.join(", ")),
            // Aliased: `ORDER BY k` must sort by the column, not by an output column of the
            // same name holding its text.
            text_columns: quoted
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c}::text AS walcache_k{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            types,
            estimate: estimate as u64,
        })
    }

    /// `('v1'::t1, 'v2'::t2)`.
    fn literal(&self, key: &[String]) -> String {
        let values: Vec<String> =
            key.iter().zip(&self.types).map(|(v, t)| format!("E'{}'::{t}", escape_literal(v))).collect();
        format!("({})", values.join(", "))
    }

    /// The WHERE clause of a key range.
    fn range(&self, lower: &Lower, upper: Option<&[String]>) -> String {
        let mut parts = Vec::new();
        match lower {
            Lower::Unbounded => {}
            Lower::Excluded(k) => parts.push(format!("{} > {}", self.columns, self.literal(k))),
            Lower::Included(k) => parts.push(format!("{} >= {}", self.columns, self.literal(k))),
        }
        if let Some(k) = upper {
            parts.push(format!("{} <= {}", self.columns, self.literal(k)));
        }
        if parts.is_empty() { "true".into() } else { parts.join(" AND ") }
    }
}

/// Escapes a value for an `E'...'` literal.
fn escape_literal(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\'', "''")
}

/// One key range of one job.
#[derive(Debug, Clone)]
pub struct Work {
    /// Unique within the session; names the chunk's watermark messages.
    pub chunk: u64,
    pub job: u64,
    /// Order of the chunk within its job (this session).
    pub seq: u64,
    pub table: Arc<TableRuntime>,
    pub keys: Arc<KeySql>,
    pub lower: Lower,
    /// Inclusive; `None`: to the end of the table.
    pub upper: Option<Vec<String>>,
    /// The job's final chunk.
    pub last: bool,
}

/// A copied chunk, waiting in the stream for its high watermark.
pub struct Chunk {
    pub work: Work,
    pub binding: Binding,
    /// COPY text output: one row per line.
    pub copy: Vec<u8>,
    pub rows: u64,
    /// Transactions in progress when the chunk's snapshot was taken (top-level xids).
    pub in_progress: Vec<u64>,
    pub _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk").field("work", &self.work).field("rows", &self.rows).finish_non_exhaustive()
    }
}

/// What workers tell the stream.
#[derive(Debug)]
pub enum ChunkMessage {
    Copied(Chunk),
    /// A worker stopped: the session restarts (jobs continue from their delivered chunks).
    Failed(ProducerError),
}

struct PlanJob {
    id: u64,
    table: Arc<TableRuntime>,
    keys: Option<Arc<KeySql>>,
    lower: Lower,
    to: Option<Vec<String>>,
    seq: u64,
}

#[derive(Default)]
struct PlanState {
    jobs: VecDeque<PlanJob>,
    redo: VecDeque<Work>,
    next_chunk: u64,
}

/// Cuts jobs into chunks, one boundary query at a time, for every worker.
#[derive(Default)]
pub struct Planner {
    state: Mutex<PlanState>,
    added: Notify,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner").finish_non_exhaustive()
    }
}

impl Planner {
    /// Queues a job that copies `table` from `lower` up to `to` (inclusive).
    pub async fn add(&self, id: u64, table: Arc<TableRuntime>, lower: Lower, to: Option<Vec<String>>) {
        self.state.lock().await.jobs.push_back(PlanJob { id, table, keys: None, lower, to, seq: 0 });
        self.added.notify_waiters();
    }

    /// A chunk whose copy could not be reconciled: copied again, first.
    pub async fn redo(&self, work: Work) {
        let mut state = self.state.lock().await;
        state.next_chunk += 1;
        let chunk = state.next_chunk;
        state.redo.push_back(Work { chunk, ..work });
        drop(state);
        self.added.notify_waiters();
    }

    /// The next chunk to copy; waits for work, `None` once `cancel` fires.
    async fn next(
        &self,
        client: &Client,
        chunk_rows: usize,
        cancel: &CancellationToken,
    ) -> Option<Result<Work, ProducerError>> {
        loop {
            let added = self.added.notified();
            {
                let mut state = self.state.lock().await;
                if let Some(work) = state.redo.pop_front() {
                    return Some(Ok(work));
                }
                if !state.jobs.is_empty() {
                    return Some(Self::plan(&mut state, client, chunk_rows).await);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = added => {}
            }
        }
    }

    async fn plan(state: &mut PlanState, client: &Client, chunk_rows: usize) -> Result<Work, ProducerError> {
        state.next_chunk += 1;
        let chunk = state.next_chunk;
        let Some(job) = state.jobs.front_mut() else {
            return Err(ProducerError::Config("no snapshot job to plan".into()));
        };
        let keys = match &job.keys {
            Some(k) => Arc::clone(k),
            None => {
                let k = Arc::new(KeySql::load(client, &job.table).await?);
                job.keys = Some(Arc::clone(&k));
                k
            }
        };
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} OFFSET {} LIMIT 1",
            keys.text_columns,
            keys.from,
            keys.range(&job.lower, job.to.as_deref()),
            keys.columns.trim_start_matches('(').trim_end_matches(')'),
            chunk_rows.saturating_sub(1)
        );
        let boundary = client
            .query_opt(&sql, &[])
            .await
            .map_err(|e| ProducerError::pg(format!("planning the next chunk of {}", job.table.qualified), e))?;
        let mut work = Work {
            chunk,
            job: job.id,
            seq: job.seq,
            table: Arc::clone(&job.table),
            keys,
            lower: job.lower.clone(),
            upper: job.to.clone(),
            last: true,
        };
        job.seq += 1;
        match boundary {
            Some(row) => {
                let key: Vec<String> = (0..row.len()).map(|i| row.get::<_, String>(i)).collect();
                job.lower = Lower::Excluded(key.clone());
                work.upper = Some(key);
                work.last = false;
            }
            None => {
                state.jobs.pop_front();
            }
        }
        Ok(work)
    }
}

/// Everything a worker needs.
#[derive(Clone)]
pub struct Workers {
    pub pg: PgConnection,
    pub slot: String,
    pub session: u64,
    pub chunk_rows: usize,
    pub planner: Arc<Planner>,
    pub permits: Arc<Semaphore>,
    pub to_stream: mpsc::Sender<ChunkMessage>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("slot", &self.slot).field("session", &self.session).finish_non_exhaustive()
    }
}

impl Workers {
    /// The watermark message of `chunk` (`low` or `high`).
    pub fn message(slot: &str, session: u64, chunk: u64, table: usize, which: &str) -> String {
        format!("{slot}\t{session}\t{chunk}\t{table}\t{which}")
    }

    /// Runs one worker until `cancel`; a failure is reported to the stream.
    pub async fn run(self, worker: usize, cancel: CancellationToken) {
        if let Err(e) = self.work(&cancel).await
            && !cancel.is_cancelled()
        {
            tracing::warn!(worker, error = %e, "snapshot worker stopped");
            let _ = self.to_stream.send(ChunkMessage::Failed(e)).await;
        }
    }

    async fn work(&self, cancel: &CancellationToken) -> Result<(), ProducerError> {
        let (client, connection) = self
            .pg
            .tokio_config(&format!("walcache-producer-{}-snapshot", self.slot))
            .connect(self.pg.tls.connector())
            .await
            .map_err(|e| ProducerError::pg("connecting for the snapshot", e))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "snapshot connection ended");
            }
        });
        let result = async {
            // Watermark messages need their place in the WAL, not a flush each: two waits for
            // fsync per chunk were the largest fixed cost of a chunk. A crash that loses an
            // unflushed watermark also ends the session, and its chunk is copied again.
            client
                .batch_execute("SET synchronous_commit TO off")
                .await
                .map_err(|e| ProducerError::pg("configuring the snapshot connection", e))?;
            loop {
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    p = Arc::clone(&self.permits).acquire_owned() => p.map_err(|_| ProducerError::Config("snapshot permits closed".into()))?,
                };
                let Some(work) = self.planner.next(&client, self.chunk_rows, cancel).await else {
                    return Ok(());
                };
                let chunk = self.copy(&client, work?, permit).await?;
                let (table, id) = (chunk.work.table.index, chunk.work.chunk);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    sent = self.to_stream.send(ChunkMessage::Copied(chunk)) => {
                        if sent.is_err() {
                            return Ok(());
                        }
                    }
                }
                self.emit(&client, id, table, "high").await?;
            }
        }
        .await;
        connection.abort();
        result
    }

    async fn emit(&self, client: &Client, chunk: u64, table: usize, which: &str) -> Result<(), ProducerError> {
        let content = Self::message(&self.slot, self.session, chunk, table, which);
        client
            .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&SNAPSHOT_MESSAGE_PREFIX, &content])
            .await
            .map_err(|e| ProducerError::pg(format!("writing a chunk's {which} watermark"), e))?;
        Ok(())
    }

    /// Copies one chunk between its watermarks (the high one is written by the caller, after
    /// the stream has the chunk).
    async fn copy(&self, client: &Client, work: Work, permit: OwnedSemaphorePermit) -> Result<Chunk, ProducerError> {
        let table = &work.table;
        self.emit(client, work.chunk, table.index, "low").await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| ProducerError::pg("opening a chunk's snapshot", e))?;
        let result = async {
            // The first statement takes the snapshot the COPY below reads.
            let snapshot: String = client
                .query_one("SELECT pg_current_snapshot()::text", &[])
                .await
                .map_err(|e| ProducerError::pg("reading a chunk's snapshot", e))?
                .get(0);
            let qualified = format!("{}.{}", quote_ident(&table.spec.schema), quote_ident(&table.spec.name));
            let relation = relation_of(client, table, &qualified).await?;
            let column_list = relation.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
            let (binding, warnings) = Binding::new(Arc::clone(table), relation);
            if work.seq == 0 {
                for w in &warnings {
                    tracing::warn!(table = %table.qualified, warning = ?w, "table does not match its contract");
                }
            }
            let sql = format!(
                "COPY (SELECT {column_list} FROM {} WHERE {}) TO STDOUT",
                work.keys.from,
                work.keys.range(&work.lower, work.upper.as_deref())
            );
            let stream = client
                .copy_out(&sql)
                .await
                .map_err(|e| ProducerError::pg(format!("copying a chunk of {}", table.qualified), e))?;
            let mut stream = std::pin::pin!(stream);
            let mut copy = Vec::with_capacity(self.chunk_rows * 64);
            use futures::StreamExt;
            while let Some(bytes) = stream.next().await {
                let bytes =
                    bytes.map_err(|e| ProducerError::pg(format!("reading a chunk of {}", table.qualified), e))?;
                copy.extend_from_slice(&bytes);
            }
            let rows = copy.iter().filter(|&&b| b == b'\n').count() as u64;
            Ok::<_, ProducerError>((binding, copy, rows, parse_in_progress(&snapshot)))
        }
        .await;
        let commit = client.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
        let (binding, copy, rows, in_progress) = result?;
        commit.map_err(|e| ProducerError::pg("closing a chunk's snapshot", e))?;
        Ok(Chunk { work, binding, copy, rows, in_progress, _permit: permit })
    }
}

/// The in-progress transactions of a `pg_snapshot` text (`xmin:xmax:xip,xip`).
pub fn parse_in_progress(snapshot: &str) -> Vec<u64> {
    snapshot
        .rsplit(':')
        .next()
        .map(|xip| xip.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_list_their_in_progress_transactions() {
        assert_eq!(parse_in_progress("100:105:100,102"), vec![100, 102]);
        assert!(parse_in_progress("100:100:").is_empty());
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(escape_literal(r"it's a \ path"), r"it''s a \\ path");
    }
}
