//! `walcache verify`: is the view what the source says, apart from what changed since?
//!
//! ```text
//!  Postgres: BEGIN REPEATABLE READ; first statement takes the snapshot S and the WAL position L
//!  view:     wait until it covers L (every change visible in S is then in the view)
//!  compare:  each source row ─► same value ........................ match
//!                             ├► view row written by a tx not in S .. changed after the snapshot (not drift)
//!                             ├► view says unknown .................. unknown (the view admits it cannot vouch)
//!                             ├► view has another value ............. different   (drift)
//!                             ├► view has no row / a delete in S .... missing     (drift)
//!                             └► row breaks the contract ............ contract violation (dead-lettered); the
//!                                view must say unknown for it: a row or "absent" there is drift
//!            each view row the source lacks, written in S ........... extra       (drift)
//! ```
//!
//! Visibility is exact: the view's rows carry the writing transaction's id, and S's
//! `pg_current_snapshot()` says which transactions it sees. If the view cannot reach L in
//! time (pipeline stopped), differences are reported but the verdict is inconclusive.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value as Json;
use tokio_postgres::SimpleQueryMessage;
use walcache_schemas::{Lsn, Registry};

use crate::client::Client;
use crate::error::ClientError;

/// What to compare.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Source table, schema-qualified.
    pub source_table: String,
    /// Table (contract) name in the query API.
    pub table: String,
    /// How long to wait for the view to reach the snapshot.
    pub wait: Duration,
    /// How many keys to list per kind of difference.
    pub sample: usize,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Healthy,
    Drift,
    /// The view did not reach the snapshot: differences may be lag.
    Inconclusive,
}

/// Counts and samples of one kind of difference.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Finding {
    pub count: u64,
    pub sample: Vec<Json>,
}

impl Finding {
    fn add(&mut self, key: &Json, limit: usize) {
        self.count += 1;
        if self.sample.len() < limit {
            self.sample.push(key.clone());
        }
    }
}

/// What verify found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub verdict: Verdict,
    pub snapshot_lsn: Lsn,
    pub view_lsn: Option<Lsn>,
    pub source_rows: u64,
    pub matching: u64,
    pub missing: Finding,
    pub extra: Finding,
    pub different: Finding,
    /// Rows written after the snapshot (by transactions it does not see): not drift.
    pub changed_after_snapshot: u64,
    /// Source rows the view says it cannot vouch for (evicted, or their change was set
    /// aside): not drift, and not verified either.
    pub unknown: u64,
    /// Source rows that break the contract (they are on the dead-letter topic, not in the view).
    pub contract_violations: Finding,
}

/// A Postgres snapshot's visibility (`xmin:xmax:xip,...`).
#[derive(Debug, Clone)]
struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: HashSet<u64>,
}

impl Snapshot {
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress =
            parts.next().unwrap_or("").split(',').filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
        Some(Snapshot { xmin, xmax, in_progress })
    }

    /// Whether a 32-bit xid (as pgoutput reports it; 0 for snapshot rows) is visible.
    /// Like Postgres, 32-bit xids compare modulo 2^32: the xid is taken as the 64-bit one
    /// nearest to the snapshot's xmax.
    fn sees(&self, xid32: u64) -> bool {
        if xid32 == 0 {
            return true;
        }
        let diff = (xid32 as u32).wrapping_sub(self.xmax as u32) as i32;
        let full = self.xmax.wrapping_add_signed(i64::from(diff));
        full < self.xmin || (full < self.xmax && !self.in_progress.contains(&full))
    }
}

fn pg(e: tokio_postgres::Error) -> ClientError {
    ClientError::Postgres(e.to_string())
}

/// Runs the comparison. `progress(done, total)` reports source rows read.
pub async fn verify(
    postgres: &mut tokio_postgres::Client,
    cache: &Client,
    options: &VerifyOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, ClientError> {
    let registry = Registry::builtin().map_err(|e| ClientError::Decode(e.to_string()))?;
    let contract = registry.contract(&options.table).map_err(|e| ClientError::Decode(e.to_string()))?;
    let plan = &contract.latest().row;
    let (schema, name) = options
        .source_table
        .split_once('.')
        .ok_or_else(|| ClientError::Postgres(format!("{} must be schema-qualified", options.source_table)))?;
    let qualified = format!("\"{}\".\"{}\"", schema.replace('"', "\"\""), name.replace('"', "\"\""));

    let tx = postgres
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg)?;
    // The first statement takes the snapshot; the WAL position read during it is at or past
    // every commit the snapshot sees.
    let row = tx
        .query_one(
            &format!(
                "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text, (SELECT count(*) FROM {qualified})"
            ),
            &[],
        )
        .await
        .map_err(pg)?;
    let snapshot = Snapshot::parse(row.get::<_, String>(0).as_str())
        .ok_or_else(|| ClientError::Postgres("unreadable pg_current_snapshot()".into()))?;
    let snapshot_lsn: Lsn = row.get::<_, String>(1).parse().map_err(|e| ClientError::Postgres(format!("{e}")))?;
    let total = row.get::<_, i64>(2) as u64;

    // Wait for the view to cover the snapshot.
    let started = Instant::now();
    let mut view_lsn: Option<Lsn>;
    loop {
        let status = cache.status().await?;
        view_lsn = table_view_lsn(&status, &options.table);
        if view_lsn.is_some_and(|v| v >= snapshot_lsn) || started.elapsed() >= options.wait {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let caught_up = view_lsn.is_some_and(|v| v >= snapshot_lsn);

    // The view, keyed by the key's JSON text.
    let mut view: HashMap<String, (HeldState, u64, Json, Json)> = HashMap::new();
    let header = cache
        .export(&options.table, |entry| {
            let key = entry["key"].clone();
            let state = match entry["state"].as_str() {
                Some("present") => HeldState::Present,
                Some("deleted") => HeldState::Deleted,
                _ => HeldState::Unknown,
            };
            let txid = entry["position"]["txid"].as_u64().unwrap_or(0);
            view.insert(key.to_string(), (state, txid, key, entry["value"].clone()));
        })
        .await?;
    let has_evicted = header["has_evicted"].as_bool().unwrap_or(false);

    let mut report = VerifyReport {
        verdict: Verdict::Healthy,
        snapshot_lsn,
        view_lsn,
        source_rows: 0,
        matching: 0,
        missing: Finding::default(),
        extra: Finding::default(),
        different: Finding::default(),
        changed_after_snapshot: 0,
        unknown: 0,
        contract_violations: Finding::default(),
    };
    let select = plan.fields.iter().map(|f| format!("\"{}\"::text", f.name)).collect::<Vec<_>>().join(", ");
    tx.batch_execute(&format!(
        "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; SET LOCAL IntervalStyle = 'postgres'; \
         SET LOCAL extra_float_digits = 3; SET LOCAL bytea_output = 'hex'; \
         DECLARE walcache_verify NO SCROLL CURSOR FOR SELECT {select} FROM {qualified}"
    ))
    .await
    .map_err(pg)?;
    let mut buf = Vec::with_capacity(256);
    loop {
        let messages = tx.simple_query("FETCH 5000 FROM walcache_verify").await.map_err(pg)?;
        let mut fetched = 0;
        for m in messages {
            let SimpleQueryMessage::Row(row) = m else { continue };
            fetched += 1;
            report.source_rows += 1;
            let texts: Vec<Option<&str>> = (0..plan.fields.len()).map(|i| row.get(i)).collect();
            let key = source_key(contract, plan, &texts);
            buf.clear();
            let valid = plan.fields.iter().zip(&texts).all(|(f, t)| match t {
                Some(t) => f.write_text(&mut buf, t.as_bytes()).is_ok(),
                None => f.write_null(&mut buf).is_ok(),
            });
            let held = view.remove(&key.to_string());
            if !valid {
                // Set aside upstream: the view must say it cannot vouch for this key.
                report.contract_violations.add(&key, options.sample);
                match held {
                    Some((HeldState::Unknown, ..)) => {}
                    None if has_evicted => {}
                    Some((_, txid, _, _)) if !snapshot.sees(txid) => {}
                    Some((HeldState::Present, ..)) => report.different.add(&key, options.sample),
                    Some((HeldState::Deleted, ..)) | None => report.missing.add(&key, options.sample),
                }
                continue;
            }
            let source = plan.row_to_json(&buf).map(Json::Object).map_err(|e| ClientError::Decode(e.to_string()))?;
            match held {
                None if has_evicted => report.unknown += 1,
                None => report.missing.add(&key, options.sample),
                Some((_, txid, _, _)) if !snapshot.sees(txid) => report.changed_after_snapshot += 1,
                Some((HeldState::Unknown, ..)) => report.unknown += 1,
                Some((HeldState::Present, _, _, value)) if value == source => report.matching += 1,
                Some((HeldState::Present, ..)) => report.different.add(&key, options.sample),
                Some((HeldState::Deleted, ..)) => report.missing.add(&key, options.sample),
            }
        }
        progress(report.source_rows, total);
        if fetched == 0 {
            break;
        }
    }
    tx.commit().await.map_err(pg)?;
    for (state, txid, key, _) in view.into_values() {
        if state != HeldState::Present {
            continue;
        }
        if snapshot.sees(txid) {
            report.extra.add(&key, options.sample);
        } else {
            report.changed_after_snapshot += 1;
        }
    }
    let drift = report.missing.count + report.extra.count + report.different.count;
    report.verdict = match (drift, caught_up) {
        (0, true) => Verdict::Healthy,
        (_, false) => Verdict::Inconclusive,
        (_, true) => Verdict::Drift,
    };
    Ok(report)
}

/// What the view holds for a key, from its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldState {
    Present,
    Deleted,
    Unknown,
}

/// The coverage of `table` in a `/v1/status` answer (each table follows the producer that
/// feeds it), or the view's shared one from an older consumer.
fn table_view_lsn(status: &Json, table: &str) -> Option<Lsn> {
    let of_table = status["tables"]
        .as_array()
        .and_then(|tables| tables.iter().find(|t| t["name"] == table))
        .map(|t| &t["view"]["view_lsn"]);
    of_table.unwrap_or(&status["view"]["view_lsn"]).as_str().and_then(|s| s.parse().ok())
}

/// The key of a source row as the query API renders it (a scalar for one key field).
fn source_key(contract: &walcache_schemas::Contract, plan: &walcache_schemas::RowPlan, texts: &[Option<&str>]) -> Json {
    let values: Option<Vec<&str>> =
        contract.key_plan.fields.iter().map(|f| plan.index_of(&f.name).and_then(|i| texts[i])).collect();
    let Some(values) = values else {
        return Json::Null;
    };
    match contract.key_from_text(&values).ok().and_then(|body| contract.key_plan.row_to_json(&body).ok()) {
        Some(map) if map.len() == 1 => map.into_iter().next().map(|(_, v)| v).unwrap_or(Json::Null),
        Some(map) => Json::Object(map),
        None => Json::String(values.join(",")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility() {
        let s = Snapshot::parse("100:105:101,103").expect("parses");
        assert!(s.sees(0) && s.sees(99) && s.sees(102) && s.sees(104));
        assert!(!s.sees(101) && !s.sees(103) && !s.sees(105) && !s.sees(200));
        // A later epoch: 32-bit xids are read as the 64-bit xid nearest to xmax.
        let s = Snapshot::parse(&format!("{}:{}:{}", (1u64 << 32) + 10, (1u64 << 32) + 20, (1u64 << 32) + 12))
            .expect("parses");
        assert!(s.sees(5) && s.sees(15), "committed before the snapshot");
        assert!(!s.sees(12), "in progress at the snapshot");
        assert!(!s.sees(22), "committed after the snapshot, even though 22 < 2^32");
        assert!(s.sees(0xFFFF_FFF0), "an xid from the previous epoch is old");
    }
}
