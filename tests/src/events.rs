//! Decoding what reached the table topic and folding it into a view, the way a
//! position-aware consumer would.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value as Json};
use walcache_schemas::{Op, Position, Registry};

use crate::kafka::Record;

/// One decoded table-topic message.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub partition: i32,
    pub offset: i64,
    /// `courier_id`, or None for a truncate marker.
    pub key: Option<i64>,
    /// None for a tombstone.
    pub op: Option<Op>,
    pub position: Option<Position>,
    pub after: Option<Map<String, Json>>,
    pub before: Option<Map<String, Json>>,
}

/// Decodes every record of a courier_performance topic; panics on anything undecodable
/// (the producer must never write it).
pub fn decode_all(records: &[Record]) -> Vec<Event> {
    let registry = Registry::builtin().expect("registry");
    let contract = registry.contract("courier_performance").expect("contract");
    records
        .iter()
        .map(|r| {
            let key = r.key.as_deref().and_then(|k| {
                let body = registry.decode_key(contract, k).ok()?;
                let json = contract.key_plan.row_to_json(body).ok()?;
                json["courier_id"].as_i64()
            });
            let Some(value) = &r.value else {
                return Event {
                    partition: r.partition,
                    offset: r.offset,
                    key,
                    op: None,
                    position: r.position_header.as_deref().and_then(Position::from_header),
                    after: None,
                    before: None,
                };
            };
            let decoded = registry
                .decode_value(contract, value)
                .unwrap_or_else(|e| panic!("undecodable message at {}/{}: {e}", r.partition, r.offset));
            let env = decoded.envelope;
            let row = |bytes: Option<&[u8]>| bytes.map(|b| decoded.version.row.row_to_json(b).expect("row decodes"));
            Event {
                partition: r.partition,
                offset: r.offset,
                key,
                op: Some(env.op),
                position: Some(env.position),
                after: row(env.after),
                before: row(env.before),
            }
        })
        .collect()
}

/// Applies events by position (newer wins, deletes remove, truncates drop older rows),
/// regardless of duplicates and replays.
pub fn materialize(events: &[Event]) -> BTreeMap<i64, Map<String, Json>> {
    let mut held: HashMap<i64, (Position, Option<Map<String, Json>>)> = HashMap::new();
    let mut truncated_at: Option<Position> = None;
    for e in events {
        if e.op.is_none() {
            // A tombstone: after compaction it may be all that is left of a delete.
            if let (Some(key), Some(pos)) = (e.key, e.position)
                && held.get(&key).is_none_or(|(p, _)| !p.is_newer_than(&pos))
            {
                held.insert(key, (pos, None));
            }
            continue;
        }
        let (Some(op), Some(pos)) = (e.op, e.position) else {
            continue;
        };
        if op == Op::Truncate {
            if truncated_at.is_none_or(|t| pos.is_newer_than(&t)) {
                truncated_at = Some(pos);
            }
            continue;
        }
        let Some(key) = e.key else { continue };
        let newer = held.get(&key).is_none_or(|(p, _)| pos.is_newer_than(p));
        if newer {
            let state = if op == Op::Delete { None } else { e.after.clone() };
            held.insert(key, (pos, state));
        }
    }
    held.into_iter()
        .filter(|(_, (pos, _))| truncated_at.is_none_or(|t| pos.is_newer_than(&t)))
        .filter_map(|(k, (_, row))| row.map(|r| (k, r)))
        .collect()
}

/// Checks invariant 2: each key on one partition, its distinct events in commit order.
/// Replays after a restart repeat a suffix of what was there; they never put an older
/// change after a newer one for the first time.
pub fn check_order_per_key(events: &[Event]) -> Result<(), String> {
    let mut partition_of: HashMap<i64, i32> = HashMap::new();
    let mut newest: HashMap<i64, (Position, i64)> = HashMap::new();
    let mut seen: HashMap<i64, Vec<Position>> = HashMap::new();
    for e in events.iter().filter(|e| e.op.is_some()) {
        let (Some(key), Some(pos)) = (e.key, e.position) else {
            continue;
        };
        if let Some(p) = partition_of.insert(key, e.partition)
            && p != e.partition
        {
            return Err(format!("key {key} is on partitions {p} and {}", e.partition));
        }
        let history = seen.entry(key).or_default();
        if history.contains(&pos) {
            continue;
        }
        if let Some((n, at)) = newest.get(&key)
            && !pos.is_newer_than(n)
        {
            // Everything about the key, so a rare failure can be understood from the log.
            let trail: Vec<String> = events
                .iter()
                .filter(|x| x.key == Some(key))
                .map(|x| format!("offset {} {:?} {:?}", x.offset, x.op, x.position.map(|p| (p.lsn.0, p.index, p.txid))))
                .collect();
            return Err(format!(
                "key {key}: new event at offset {} {pos:?} arrived after offset {at} {n:?}; partition {} holds {} events; \
                 the key's events:\n  {}",
                e.offset,
                e.partition,
                events.iter().filter(|x| x.partition == e.partition).count(),
                trail.join("\n  ")
            ));
        }
        history.push(pos);
        newest.insert(key, (pos, e.offset));
    }
    Ok(())
}
