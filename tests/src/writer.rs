//! A simulated Incentives writer: small transactions in a loop, each one's id recorded, so a
//! test can prove that every committed change reached the topic.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::TestDb;
use crate::events::Event;

/// One committed transaction of the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub txid: u64,
    pub key: i64,
    pub kind: &'static str,
}

/// Writes until stopped; returns the transactions it committed.
#[derive(Debug)]
pub struct Writer {
    committed: Arc<AtomicUsize>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Vec<Committed>>,
}

impl Writer {
    /// Updates keys in `1..=keys`, inserts new keys from `first_new`, deletes one now and
    /// then; pauses `pause` between transactions.
    pub async fn start(db: &TestDb, keys: i64, first_new: i64, pause: Duration) -> Writer {
        let client = db.client().await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let committed = Arc::new(AtomicUsize::new(0));
        let count = committed.clone();
        let handle = tokio::spawn(async move {
            let mut txids = Vec::new();
            let mut next_new = first_new;
            let mut n: u64 = 0;
            while !token.is_cancelled() {
                n += 1;
                let key = 1 + (rand::random::<u64>() % keys as u64) as i64;
                let kind = if n.is_multiple_of(50) {
                    "delete"
                } else if n.is_multiple_of(10) {
                    next_new += 1;
                    "insert"
                } else {
                    "update"
                };
                let row =
                    match kind {
                        "delete" => client
                            .query_opt(
                                "DELETE FROM courier_performance WHERE courier_id = $1 RETURNING txid_current()::int8",
                                &[&key],
                            )
                            .await,
                        "insert" => {
                            client
                                .query_opt(
                                    "INSERT INTO courier_performance (courier_id, city, tier, rating, on_time_rate) \
                                 VALUES ($1, 'Lisbon', 'silver', 4.20, 0.91) RETURNING txid_current()::int8",
                                    &[&next_new],
                                )
                                .await
                        }
                        _ => {
                            client
                                .query_opt(
                                    "UPDATE courier_performance SET deliveries = deliveries + 1, updated_at = now() \
                                 WHERE courier_id = $1 RETURNING txid_current()::int8",
                                    &[&key],
                                )
                                .await
                        }
                    };
                match row {
                    Ok(Some(r)) => {
                        txids.push(Committed {
                            txid: r.get::<_, i64>(0) as u64,
                            key: if kind == "insert" { next_new } else { key },
                            kind,
                        });
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {}
                    Err(e) => panic!("writer transaction failed: {e}"),
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            txids
        });
        Writer { committed, stop, handle }
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> Vec<Committed> {
        self.stop.cancel();
        self.handle.await.expect("writer task")
    }
}

/// Panics unless every committed transaction has its own event on the topic. The test
/// broker does not compact (see `test_broker_maintenance`), so nothing excuses a missing one.
pub fn assert_all_on_topic(events: &[Event], committed: &[Committed]) {
    assert_on_topic(events, committed, false);
}

/// [`assert_all_on_topic`] for a topic the broker compacted (it restarted): a missing
/// transaction is excused only by a later transaction of the writer on the same key that is on
/// the topic (the writer commits one transaction at a time, so a higher txid of its own is a
/// later commit), which compaction keeps instead.
pub fn assert_all_on_compacted_topic(events: &[Event], committed: &[Committed]) {
    assert_on_topic(events, committed, true);
}

fn assert_on_topic(events: &[Event], committed: &[Committed], compacted: bool) {
    let seen: std::collections::HashSet<u64> = events.iter().filter_map(|e| e.position.map(|p| p.txid)).collect();
    let mut newest_on_topic: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
    for c in committed.iter().filter(|c| seen.contains(&c.txid)) {
        let newest = newest_on_topic.entry(c.key).or_default();
        *newest = (*newest).max(c.txid);
    }
    let missing: Vec<&Committed> = committed
        .iter()
        .filter(|c| !seen.contains(&c.txid))
        .filter(|c| !compacted || newest_on_topic.get(&c.key).is_none_or(|&n| n <= c.txid))
        .collect();
    if missing.is_empty() {
        return;
    }
    let detail: Vec<String> = missing
        .iter()
        .take(5)
        .map(|m| {
            let of_key: Vec<String> = events
                .iter()
                .filter(|e| e.key == Some(m.key))
                .map(|e| {
                    format!(
                        "{}@{}/{} {:?} tx{:?}",
                        e.op.map_or("tombstone", |o| o.as_str()),
                        e.partition,
                        e.offset,
                        e.position.map(|p| p.lsn),
                        e.position.map(|p| p.txid)
                    )
                })
                .collect();
            format!("{m:?}: key events {of_key:?}")
        })
        .collect();
    panic!(
        "{} of {} committed transactions are missing from the topic:\n{}",
        missing.len(),
        committed.len(),
        detail.join("\n")
    );
}

/// Events whose (key, position) appears more than once.
pub fn duplicates(events: &[Event]) -> Vec<&Event> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| e.op.is_some())
        .filter(|e| !seen.insert((e.key, e.position.map(|p| p.order_key()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use walcache_schemas::{Lsn, Op, Position};

    use super::*;

    fn event(key: i64, txid: u64, lsn: u64) -> Event {
        let position = Position { lsn: Lsn(lsn), index: 0, txid, commit_ts_micros: 0, snapshot: false };
        Event {
            partition: 0,
            offset: 0,
            key: Some(key),
            op: Some(Op::Update),
            position: Some(position),
            after: None,
            before: None,
        }
    }

    fn committed(key: i64, txid: u64) -> Committed {
        Committed { txid, key, kind: "update" }
    }

    #[test]
    fn a_lost_intermediate_change_is_caught_unless_the_topic_was_compacted() {
        // Key 7 changed by transactions 10, 11 and 12; 11's event is not on the topic.
        let events = [event(7, 10, 100), event(7, 12, 300)];
        let writes = [committed(7, 10), committed(7, 11), committed(7, 12)];
        let strict = std::panic::catch_unwind(|| assert_all_on_topic(&events, &writes));
        assert!(strict.is_err(), "a missing transaction must not be excused on an uncompacted topic");
        assert_all_on_compacted_topic(&events, &writes);
        // The newest change of a key is never excused, compacted or not.
        let lost_last = [committed(7, 10), committed(7, 12), committed(7, 13)];
        assert!(std::panic::catch_unwind(|| assert_all_on_compacted_topic(&events, &lost_last)).is_err());
    }
}
