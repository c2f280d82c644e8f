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

/// A key's events all live on one partition (invariant 2).
fn one_partition(partition_of: &mut HashMap<i64, i32>, key: i64, partition: i32) -> Result<(), String> {
    match partition_of.insert(key, partition) {
        Some(p) if p != partition => Err(format!("key {key} is on partitions {p} and {partition}")),
        _ => Ok(()),
    }
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
        one_partition(&mut partition_of, key, e.partition)?;
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

/// A weaker form of [`check_order_per_key`] for a broker that restarted: each key on one
/// partition, and its last event on the topic is its newest change, which is what compaction
/// keeps and what a reader that takes the last record per key needs. (tansu has, across a
/// restart, lost or refused a batch while accepting the next one; the session's replay then
/// puts the older change on the topic after the newer one, and the newer one again after it.)
pub fn check_newest_last_per_key(events: &[Event]) -> Result<(), String> {
    let mut partition_of: HashMap<i64, i32> = HashMap::new();
    let mut newest: HashMap<i64, Position> = HashMap::new();
    let mut last: HashMap<i64, (Position, i64)> = HashMap::new();
    for e in events.iter().filter(|e| e.op.is_some()) {
        let (Some(key), Some(pos)) = (e.key, e.position) else {
            continue;
        };
        one_partition(&mut partition_of, key, e.partition)?;
        let n = newest.entry(key).or_insert(pos);
        if pos.is_newer_than(n) {
            *n = pos;
        }
        last.insert(key, (pos, e.offset));
    }
    for (key, (pos, offset)) in last {
        let n = newest[&key];
        if n.is_newer_than(&pos) {
            return Err(format!("key {key}: the last event (offset {offset}, {pos:?}) is older than {n:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod restart_order_tests {
    use walcache_schemas::Lsn;

    use super::*;

    fn update(offset: i64, lsn: u64, txid: u64) -> Event {
        let position = Position { lsn: Lsn(lsn), index: 0, txid, commit_ts_micros: 0, snapshot: false };
        Event {
            partition: 1,
            offset,
            key: Some(1110),
            op: Some(Op::Update),
            position: Some(position),
            after: None,
            before: None,
        }
    }

    #[test]
    fn a_re_sent_older_change_passes_only_the_restart_check_and_only_if_the_newest_comes_last() {
        // The trail seen across a tansu restart: newer, older (first time), newer again.
        let trail = [update(712, 200, 4670), update(719, 100, 4665), update(723, 200, 4670)];
        assert!(check_order_per_key(&trail).is_err());
        assert!(check_newest_last_per_key(&trail).is_ok());
        let older_last = [update(712, 200, 4670), update(719, 100, 4665)];
        assert!(check_newest_last_per_key(&older_last).is_err());
    }
}
