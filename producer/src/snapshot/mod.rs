//! Chunked snapshots while streaming (the DBLog watermark algorithm), used for the initial
//! copy of every table, for tables added later and for on-demand backfills.
//!
//! ```text
//!  WAL / stream:   ──T1──[low c]──T2(k5)──T3(k9)──[high c]──T4──►
//!  chunk worker:          │ BEGIN RR; snapshot S; COPY rows lo < key <= hi; COMMIT │
//!                         └─ window: keys the stream changed (k5, k9) ─────────────┘
//!  at [high c] the stream emits the chunk's rows (op = snapshot, position = high's commit
//!  LSN, ranked below streamed changes at that LSN) except k5 and k9: their streamed events
//!  are as new or newer. T4 commits after: its events follow, newer by position.
//! ```
//!
//! - [`jobs`]: what the slot has copied and still has to (persisted, resumable by chunk).
//! - [`copier`]: the planner that cuts a job into key ranges and the workers that copy them.
//! - [`reconcile`]: the windows between watermarks and the release of a chunk at its high one.
//!
//! Why a chunk row never overwrites a newer change: every transaction visible to S committed
//! before the high watermark (it was written after S), so the row is at least as new as any
//! of those; a transaction S did not see either commits inside the window (its keys are
//! dropped from the chunk), after the high watermark (its events come later, with a higher
//! position), or, in the moment between its commit record and its visibility, before the low
//! watermark: then the stream delivered it before the window opened, its xid is in S's
//! in-progress list, and the chunk is copied again.

pub mod copier;
pub mod jobs;
pub mod reconcile;
pub mod run;

use walcache_common::kafka::Metadata;

use crate::ProducerError;
use crate::binding::TableRuntime;
use crate::config::ProducerConfig;
use crate::pgoutput::{ColumnKind, ColumnRef, Relation, RelationColumn};
use crate::postgres::Control;

/// Writes a backfill request for `table` into the WAL (see [`run::BackfillSignal`]); returns
/// its LSN.
pub async fn request_backfill(
    config: &ProducerConfig,
    table: &str,
    from_key: Option<Vec<String>>,
    to_key: Option<Vec<String>>,
) -> Result<String, ProducerError> {
    config.validate()?;
    let specs = config.table_specs()?;
    let spec = specs.iter().find(|s| s.qualified() == table).ok_or_else(|| {
        ProducerError::Config(format!(
            "{table} is not in this configuration's [[tables]] ({}); name it as schema.table",
            specs.iter().map(|s| s.qualified()).collect::<Vec<_>>().join(", ")
        ))
    })?;
    let key_columns: Vec<&str> = spec.contract.key_plan.fields.iter().map(|f| f.name.as_str()).collect();
    for (flag, key) in [("--from-key", &from_key), ("--to-key", &to_key)] {
        if let Some(k) = key
            && k.len() != key_columns.len()
        {
            return Err(ProducerError::Config(format!(
                "{flag} has {} value(s); {table}'s key has {} column(s): {}",
                k.len(),
                key_columns.len(),
                key_columns.join(", ")
            )));
        }
    }
    let signal = run::BackfillSignal { slot: config.postgres.slot.clone(), table: table.to_string(), from_key, to_key };
    let content = serde_json::to_string(&signal).map_err(|e| ProducerError::Config(e.to_string()))?;
    let pg = config.pg_connection()?;
    let control = Control::connect(&pg, "walcache-producer-backfill").await?;
    let lsn: String = control
        .client()
        .query_one("SELECT pg_logical_emit_message(true, $1, $2)::text", &[&run::SIGNAL_PREFIX, &content])
        .await
        .map_err(|e| ProducerError::pg("writing the backfill request", e))?
        .get(0);
    Ok(lsn)
}

/// The slot's snapshot jobs as a table for people.
pub async fn status_report(config: &ProducerConfig) -> Result<String, ProducerError> {
    use std::fmt::Write;
    let slot = &config.postgres.slot;
    let metadata = Metadata::new(&config.kafka, &format!("walcache-producer-{slot}-status"))?;
    let state = jobs::load(&config.kafka, &metadata, &config.topics.snapshots, slot).await?;
    let mut out = String::new();
    let Some(state) = state else {
        let _ = writeln!(out, "slot {slot}: no snapshot state on {} (never started?)", config.topics.snapshots);
        return Ok(out);
    };
    let _ = writeln!(
        out,
        "slot {slot}: complete tables: {}",
        state.complete.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    if state.jobs.is_empty() {
        let _ = writeln!(out, "no snapshot or backfill running");
    }
    for job in &state.jobs {
        let range = match (&job.from_key, &job.to_key) {
            (None, None) => "whole table".to_string(),
            (from, to) => format!("keys {:?} to {:?}", from, to),
        };
        let percent = job.ratio().map_or_else(|| "-".to_string(), |r| format!("{:.1}%", r * 100.0));
        let eta = job.eta_secs.map_or_else(|| "-".to_string(), |s| format!("{}m{:02}s", s / 60, s % 60));
        let _ = writeln!(
            out,
            "job {} {:?} {} ({range}): {} rows of ~{} ({percent}), {:.0} rows/s, {eta} left, copied up to {:?}",
            job.id, job.kind, job.table, job.rows, job.estimate, job.rate, job.after
        );
    }
    Ok(out)
}

/// The table's columns as pgoutput would describe them, read inside the snapshot: without
/// dropped and generated columns (pgoutput does not stream generated columns before
/// Postgres 18, and COPY of a table leaves them out).
pub(crate) async fn relation_of(
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
