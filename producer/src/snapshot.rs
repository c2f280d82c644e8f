//! The initial snapshot: every existing row, read inside the snapshot the slot exported at
//! creation, so that snapshot + stream contain each committed change exactly once.
//!
//! ```text
//!  CREATE_REPLICATION_SLOT .. EXPORT_SNAPSHOT ──► (consistent_point, snapshot_name)
//!        │ (replication session stays idle so the snapshot stays valid)
//!        ▼
//!  BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT 'snapshot_name';
//!  truncate marker (lsn=consistent_point, snapshot, index 0): the snapshot replaces older rows
//!  COPY schema.table TO STDOUT ──► text rows ──► Emitter::upsert(op=snapshot, lsn=consistent_point)
//!        ▼
//!  START_REPLICATION from consistent_point: only changes committed after the snapshot
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use walcache_schemas::{Op, Position};

use crate::ProducerError;
use crate::binding::{Binding, TableRuntime};
use crate::config::PgConnection;
use crate::events::Emitter;
use crate::metrics::Metrics;
use crate::pgoutput::{ColumnKind, ColumnRef, Relation, RelationColumn};
use crate::postgres::quote_ident;
use crate::sink::Sink;

/// What the snapshot of one table produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSnapshot {
    pub rows: u64,
}

/// Copies `table` as of the exported snapshot.
#[allow(clippy::too_many_arguments)]
pub async fn copy_table(
    pg: &PgConnection,
    snapshot_name: &str,
    table: &Arc<TableRuntime>,
    first: Position,
    sink: &mut Sink,
    emitter: &mut Emitter,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<TableSnapshot, ProducerError> {
    let (client, connection) = pg
        .tokio_config("walcache-producer-snapshot")
        .connect(pg.tls.connector())
        .await
        .map_err(|e| ProducerError::pg("connecting for the snapshot", e))?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "snapshot connection ended");
        }
    });
    let result = async {
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                snapshot_name.replace('\'', "''")
            ))
            .await
            .map_err(|e| ProducerError::pg("opening the exported snapshot", e))?;
        let qualified = format!("{}.{}", quote_ident(&table.spec.schema), quote_ident(&table.spec.name));
        let relation = relation_of(&client, table, &qualified).await?;
        // A partitioned table's own reltuples is -1 or 0: its rows are counted in its leaves.
        let size = client
            .query_one(
                "SELECT c.relkind = 'p', \
                        (SELECT coalesce(sum(greatest(l.reltuples, 0)), 0)::float8 \
                         FROM pg_partition_tree(c.oid) t JOIN pg_class l ON l.oid = t.relid WHERE t.isleaf) \
                 FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .map_err(|e| ProducerError::pg("estimating the table size", e))?;
        let (partitioned, estimate): (bool, f64) = (size.get(0), size.get(1));
        // The columns pgoutput streams, in its order, so one binding reads both. A query
        // rather than `COPY table`: it works on partitioned tables (their rows live in the
        // partitions), and ONLY keeps a plain table's inheritance children out, as pgoutput
        // does.
        let column_list = relation.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
        let only = if partitioned { "" } else { "ONLY " };
        let (binding, warnings) = Binding::new(Arc::clone(table), relation);
        for w in &warnings {
            tracing::warn!(table = %table.qualified, warning = ?w, "table does not match its contract");
        }
        let stream = client
            .copy_out(&format!("COPY (SELECT {column_list} FROM {only}{qualified}) TO STDOUT"))
            .await
            .map_err(|e| ProducerError::pg(format!("starting COPY of {}", table.qualified), e))?;
        let mut stream = std::pin::pin!(stream);
        let rows_metric = metrics.snapshot_rows.with_label_values(&[&table.qualified]);
        let progress = metrics.snapshot_progress.with_label_values(&[&table.qualified]);
        progress.set(0.0);
        let mut pending: Vec<u8> = Vec::with_capacity(1 << 16);
        let mut line_buf = Vec::with_capacity(512);
        let mut columns = Vec::with_capacity(16);
        let consistent_point = first.lsn;
        let mut position = first;
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut rows: u64 = 0;
        tracing::info!(table = %table.qualified, estimated_rows = estimate as u64, %consistent_point, "snapshot copy started");
        while let Some(chunk) = stream.next().await {
            if cancel.is_cancelled() {
                return Err(ProducerError::Config("snapshot interrupted by shutdown; it restarts on the next start".into()));
            }
            let chunk = chunk.map_err(|e| ProducerError::pg(format!("reading COPY of {}", table.qualified), e))?;
            pending.extend_from_slice(&chunk);
            let mut consumed = 0;
            while let Some(nl) = pending[consumed..].iter().position(|&b| b == b'\n') {
                let line = &pending[consumed..consumed + nl];
                parse_copy_line(line, &mut line_buf, &mut columns);
                emitter
                    .upsert(sink, &binding, Op::Snapshot, &line_buf, &columns, None, &mut position)
                    .await?;
                rows += 1;
                consumed += nl + 1;
            }
            pending.drain(..consumed);
            if last_log.elapsed() >= Duration::from_secs(5) {
                rows_metric.inc_by(rows - rows_metric.get());
                let ratio = if estimate > 0.0 { (rows as f64 / estimate).min(1.0) } else { 0.0 };
                progress.set(ratio);
                tracing::info!(
                    table = %table.qualified,
                    rows,
                    rows_per_sec = (rows as f64 / started.elapsed().as_secs_f64()) as u64,
                    percent = (ratio * 100.0) as u32,
                    "snapshot progress"
                );
                last_log = Instant::now();
            }
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| ProducerError::pg("closing the snapshot transaction", e))?;
        rows_metric.inc_by(rows - rows_metric.get());
        progress.set(1.0);
        tracing::info!(
            table = %table.qualified,
            rows,
            rows_per_sec = (rows as f64 / started.elapsed().as_secs_f64().max(1e-9)) as u64,
            "snapshot copy finished"
        );
        Ok(TableSnapshot { rows })
    }
    .await;
    drop(client);
    conn_task.abort();
    result
}

/// The table's columns as pgoutput would describe them, read inside the snapshot: without
/// dropped and generated columns (pgoutput does not stream generated columns before
/// Postgres 18, and COPY of a table leaves them out).
async fn relation_of(
    client: &tokio_postgres::Client,
    table: &TableRuntime,
    qualified: &str,
) -> Result<Relation, ProducerError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, \
                    coalesce(a.attnum = ANY(i.indkey), false) \
             FROM pg_attribute a \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&qualified],
        )
        .await
        .map_err(|e| ProducerError::pg(format!("reading the columns of {}", table.qualified), e))?;
    let oid: i64 = client
        .query_one("SELECT $1::text::regclass::oid::int8", &[&qualified])
        .await
        .map_err(|e| ProducerError::pg("resolving the table oid", e))?
        .get(0);
    Ok(Relation {
        oid: oid as u32,
        namespace: table.spec.schema.clone(),
        name: table.spec.name.clone(),
        replica_identity: b'd',
        columns: rows
            .iter()
            .map(|r| RelationColumn {
                name: r.get(0),
                type_oid: r.get::<_, i64>(1) as u32,
                type_modifier: r.get(2),
                is_key: r.get(3),
            })
            .collect(),
    })
}

/// Splits one line of COPY text output into columns, undoing its escapes into `buf`.
pub fn parse_copy_line(line: &[u8], buf: &mut Vec<u8>, columns: &mut Vec<ColumnRef>) {
    buf.clear();
    columns.clear();
    for field in line.split(|&b| b == b'\t') {
        if field == b"\\N" {
            columns.push(ColumnRef { kind: ColumnKind::Null, start: buf.len() as u32, len: 0 });
            continue;
        }
        let start = buf.len();
        let mut i = 0;
        while i < field.len() {
            let b = field[i];
            if b != b'\\' || i + 1 == field.len() {
                buf.push(b);
                i += 1;
                continue;
            }
            let next = field[i + 1];
            i += 2;
            match next {
                b'b' => buf.push(0x08),
                b'f' => buf.push(0x0C),
                b'n' => buf.push(b'\n'),
                b'r' => buf.push(b'\r'),
                b't' => buf.push(b'\t'),
                b'v' => buf.push(0x0B),
                b'0'..=b'7' => {
                    let mut value = u32::from(next - b'0');
                    for _ in 0..2 {
                        match field.get(i) {
                            Some(&d @ b'0'..=b'7') => {
                                value = value * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    buf.push(value as u8);
                }
                b'x' => {
                    let mut value = 0u32;
                    let mut digits = 0;
                    while digits < 2 {
                        match field.get(i).and_then(|&d| (d as char).to_digit(16)) {
                            Some(d) => {
                                value = value * 16 + d;
                                i += 1;
                                digits += 1;
                            }
                            None => break,
                        }
                    }
                    if digits == 0 {
                        buf.push(b'x');
                    } else {
                        buf.push(value as u8);
                    }
                }
                other => buf.push(other),
            }
        }
        columns.push(ColumnRef { kind: ColumnKind::Text, start: start as u32, len: (buf.len() - start) as u32 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_unescape() {
        let mut buf = Vec::new();
        let mut cols = Vec::new();
        parse_copy_line(b"42\t\\N\ttab\\there\tnew\\nline\tback\\\\slash\t\\101\\x42", &mut buf, &mut cols);
        let texts: Vec<Option<&[u8]>> =
            cols.iter().map(|c| (c.kind == ColumnKind::Text).then(|| c.bytes(&buf))).collect();
        assert_eq!(
            texts,
            vec![
                Some(&b"42"[..]),
                None,
                Some(&b"tab\there"[..]),
                Some(&b"new\nline"[..]),
                Some(&b"back\\slash"[..]),
                Some(&b"AB"[..]),
            ]
        );
        parse_copy_line(b"", &mut buf, &mut cols);
        assert_eq!(cols.len(), 1, "an empty line is one empty text column");
    }
}
