//! Turns producer watermarks into "this table is complete as of LSN X".
//!
//! ```text
//!  watermark {producer, lsn, commit_ts, offsets: [(topic, partition, next offset)]}
//!      │ lists none of our topics ─► ignored (another producer's, sharing the topic)
//!      ▼
//!  per producer: pending FIFO ── our next offsets reach its offsets ──► producer coverage
//!      └─► every table whose topic that producer's watermarks list ──► table coverage
//! ```
//!
//! LSNs are positions in one database's WAL, so coverage is kept per producer and given to
//! the tables that producer feeds: a watermark of a producer on another database (sharing the
//! default watermark topic) never says anything about our tables. Coverage only moves
//! forward; a watermark written while the producer was still snapshotting does not count
//! (the topics do not hold the whole table yet), and a watermark covers only the tables whose
//! topics it lists (a table added to a running producer is left out until its copy is done).

use std::collections::{HashMap, VecDeque};

use walcache_schemas::{Lsn, ProducerState, Watermark};

/// How far a table is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub lsn: Lsn,
    /// Commit (or heartbeat) time at `lsn`, Unix microseconds.
    pub commit_ts_micros: i64,
}

#[derive(Debug, Default)]
struct ProducerTrack {
    pending: VecDeque<Watermark>,
    covered: Option<Coverage>,
}

/// Pending watermarks and the coverage reached, per producer.
#[derive(Debug)]
pub struct Tracker {
    /// Only this producer's watermarks count (configured), or any that list our topics.
    producer: Option<String>,
    /// Our table topics, by table index.
    topics: Vec<String>,
    producers: HashMap<String, ProducerTrack>,
    /// Which producer feeds each table (the last one whose watermark listed its topic).
    feeder: Vec<Option<String>>,
}

/// Bound on remembered watermarks per producer; when exceeded the oldest go (coverage just
/// moves in coarser steps).
const MAX_PENDING: usize = 10_000;

impl Tracker {
    /// `topics[i]` is table `i`'s topic.
    pub fn new(producer: Option<String>, topics: Vec<String>) -> Self {
        let feeder = vec![None; topics.len()];
        Tracker { producer, topics, producers: HashMap::new(), feeder }
    }

    /// The producer feeding table `index`, once one of its watermarks was seen.
    pub fn feeder(&self, index: usize) -> Option<&str> {
        self.feeder.get(index).and_then(|f| f.as_deref())
    }

    /// Takes a watermark in; returns whether it is of interest.
    pub fn offer(&mut self, mut wm: Watermark) -> bool {
        if wm.state != ProducerState::Streaming || self.producer.as_deref().is_some_and(|p| p != wm.producer) {
            return false;
        }
        wm.offsets.retain(|o| self.topics.contains(&o.topic));
        if wm.offsets.is_empty() {
            return false;
        }
        for (index, topic) in self.topics.iter().enumerate() {
            if wm.offsets.iter().any(|o| &o.topic == topic) && self.feeder[index].as_deref() != Some(&wm.producer) {
                if let Some(previous) = &self.feeder[index] {
                    tracing::warn!(topic = %topic, previous = %previous, producer = %wm.producer,
                        "another producer now writes watermarks for this topic; its coverage is followed from now on");
                }
                self.feeder[index] = Some(wm.producer.clone());
            }
        }
        let track = self.producers.entry(wm.producer.clone()).or_default();
        let newest = track.pending.back().map(|w| w.lsn).or(track.covered.map(|c| c.lsn));
        if newest.is_some_and(|n| wm.lsn <= n) {
            return false;
        }
        track.pending.push_back(wm);
        while track.pending.len() > MAX_PENDING {
            track.pending.pop_front();
        }
        true
    }

    /// Advances coverage given each partition's next offset (`None`: not assigned to us).
    /// Returns `(table index, coverage)` for every table whose coverage moved.
    pub fn advance(&mut self, next_offset: impl Fn(&str, i32) -> Option<i64>) -> Vec<(usize, Coverage)> {
        let mut moved: Vec<(usize, Coverage)> = Vec::new();
        for (name, track) in &mut self.producers {
            while let Some(front) = track.pending.front() {
                let reached =
                    front.offsets.iter().all(|o| next_offset(&o.topic, o.partition).is_some_and(|n| n >= o.offset));
                if !reached {
                    break;
                }
                let coverage = Coverage { lsn: front.lsn, commit_ts_micros: front.commit_ts_micros };
                track.covered = Some(coverage);
                // Only the tables this watermark lists: a producer leaves out a table whose
                // first copy is still running (its topic does not hold the table yet).
                for (index, topic) in self.topics.iter().enumerate() {
                    let fed = self.feeder[index].as_deref() == Some(name.as_str());
                    if fed && front.offsets.iter().any(|o| &o.topic == topic) {
                        match moved.iter_mut().find(|(i, _)| *i == index) {
                            Some(entry) => entry.1 = coverage,
                            None => moved.push((index, coverage)),
                        }
                    }
                }
                track.pending.pop_front();
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcache_schemas::PartitionOffset;

    fn wm(lsn: u64, state: ProducerState, offsets: &[(&str, i32, i64)]) -> Watermark {
        Watermark {
            producer: "p".into(),
            lsn: Lsn(lsn),
            commit_ts_micros: lsn as i64,
            emitted_at_micros: 0,
            state,
            offsets: offsets
                .iter()
                .map(|(t, p, o)| PartitionOffset { topic: (*t).into(), partition: *p, offset: *o })
                .collect(),
        }
    }

    #[test]
    fn coverage_follows_our_positions() {
        let mut t = Tracker::new(None, vec!["a".to_string()]);
        assert!(t.offer(wm(10, ProducerState::Streaming, &[("a", 0, 5), ("a", 1, 3), ("other", 0, 99)])));
        assert!(t.offer(wm(20, ProducerState::Streaming, &[("a", 0, 8), ("a", 1, 3)])));
        assert!(!t.offer(wm(15, ProducerState::Streaming, &[("a", 0, 8)])), "older than what is pending");
        assert!(!t.offer(wm(30, ProducerState::Snapshotting, &[("a", 0, 8)])), "snapshotting never counts");
        let next = |p0: i64, p1: i64| move |_: &str, p: i32| Some(if p == 0 { p0 } else { p1 });
        let lsns = |moved: Vec<(usize, Coverage)>| moved.into_iter().map(|(i, c)| (i, c.lsn.0)).collect::<Vec<_>>();
        assert_eq!(lsns(t.advance(next(4, 3))), vec![]);
        assert_eq!(lsns(t.advance(next(5, 3))), vec![(0, 10)], "topics we do not read are ignored");
        assert_eq!(lsns(t.advance(next(9, 3))), vec![(0, 20)]);
        assert!(t.offer(wm(25, ProducerState::Streaming, &[("a", 0, 8), ("a", 1, 3)])), "a heartbeat with nothing new");
        assert_eq!(lsns(t.advance(next(9, 3))), vec![(0, 25)]);
    }

    #[test]
    fn unassigned_partitions_block_coverage() {
        let mut t = Tracker::new(Some("p".into()), vec!["a".to_string()]);
        t.offer(wm(10, ProducerState::Streaming, &[("a", 7, 1)]));
        assert!(t.advance(|_, _| None).is_empty());
        let mut other = wm(11, ProducerState::Streaming, &[("a", 7, 0)]);
        other.producer = "someone-else".into();
        assert!(!t.offer(other));
    }

    #[test]
    fn another_producers_watermarks_say_nothing_about_our_tables() {
        let mut t = Tracker::new(None, vec!["a".to_string(), "b".to_string()]);
        let mut theirs = wm(1_000, ProducerState::Streaming, &[("their-topic", 0, 4)]);
        theirs.producer = "other-database".into();
        assert!(!t.offer(theirs), "lists none of our topics");
        assert!(t.offer(wm(10, ProducerState::Streaming, &[("a", 0, 2)])));
        let mut b = wm(5_000, ProducerState::Streaming, &[("b", 0, 1)]);
        b.producer = "q".into();
        assert!(t.offer(b), "table b is fed by another producer, on another database");
        let moved: Vec<(usize, u64)> =
            t.advance(|_, _| Some(10)).into_iter().map(|(i, c)| (i, c.lsn.0)).collect::<Vec<_>>();
        let mut moved = moved;
        moved.sort();
        assert_eq!(moved, vec![(0, 10), (1, 5_000)], "each table follows its own producer's LSNs");
        assert_eq!((t.feeder(0), t.feeder(1)), (Some("p"), Some("q")));
    }

    #[test]
    fn a_watermark_covers_only_the_tables_it_lists() {
        let mut t = Tracker::new(None, vec!["a".to_string(), "b".to_string()]);
        assert!(t.offer(wm(10, ProducerState::Streaming, &[("a", 0, 1), ("b", 0, 1)])));
        // b's copy runs again (a slot re-created, a table re-added): the producer leaves it out.
        assert!(t.offer(wm(20, ProducerState::Streaming, &[("a", 0, 2)])));
        let moved: Vec<(usize, u64)> = t.advance(|_, _| Some(2)).into_iter().map(|(i, c)| (i, c.lsn.0)).collect();
        assert_eq!(moved, vec![(0, 20), (1, 10)], "b stays at the last watermark that listed it");
    }
}
