//! Turns producer watermarks into "the view is complete as of LSN X".
//!
//! ```text
//!  watermark {lsn, commit_ts, offsets: [(topic, partition, next offset)]} ──offer──► pending FIFO
//!  our next offsets reach a pending watermark's offsets (for topics we read) ──advance──► coverage
//! ```
//!
//! Coverage only moves forward; a watermark written while the producer was still snapshotting
//! does not count (the topics do not hold the whole table yet).

use std::collections::{HashSet, VecDeque};

use walcache_schemas::{Lsn, ProducerState, Watermark};

/// How far the view is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    pub lsn: Lsn,
    /// Commit (or heartbeat) time at `lsn`, Unix microseconds.
    pub commit_ts_micros: i64,
}

/// Pending watermarks and the coverage reached.
#[derive(Debug)]
pub struct Tracker {
    producer: Option<String>,
    topics: HashSet<String>,
    pending: VecDeque<Watermark>,
    covered: Option<Coverage>,
}

/// Bound on remembered watermarks; when exceeded the oldest go (coverage just moves in
/// coarser steps).
const MAX_PENDING: usize = 10_000;

impl Tracker {
    pub fn new(producer: Option<String>, topics: impl IntoIterator<Item = String>) -> Self {
        Tracker { producer, topics: topics.into_iter().collect(), pending: VecDeque::new(), covered: None }
    }

    pub fn covered(&self) -> Option<Coverage> {
        self.covered
    }

    /// Takes a watermark in; returns whether it is of interest.
    pub fn offer(&mut self, mut wm: Watermark) -> bool {
        if wm.state != ProducerState::Streaming || self.producer.as_deref().is_some_and(|p| p != wm.producer) {
            return false;
        }
        let newest = self.pending.back().map(|w| w.lsn).or(self.covered.map(|c| c.lsn));
        if newest.is_some_and(|n| wm.lsn <= n) {
            return false;
        }
        wm.offsets.retain(|o| self.topics.contains(&o.topic));
        self.pending.push_back(wm);
        while self.pending.len() > MAX_PENDING {
            self.pending.pop_front();
        }
        true
    }

    /// Advances coverage given each partition's next offset (`None`: not assigned to us).
    /// Returns the new coverage when it moved.
    pub fn advance(&mut self, next_offset: impl Fn(&str, i32) -> Option<i64>) -> Option<Coverage> {
        let mut moved = None;
        while let Some(front) = self.pending.front() {
            let reached =
                front.offsets.iter().all(|o| next_offset(&o.topic, o.partition).is_some_and(|n| n >= o.offset));
            if !reached {
                break;
            }
            let c = Coverage { lsn: front.lsn, commit_ts_micros: front.commit_ts_micros };
            self.covered = Some(c);
            moved = Some(c);
            self.pending.pop_front();
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
        let mut t = Tracker::new(None, ["a".to_string()]);
        assert!(t.offer(wm(10, ProducerState::Streaming, &[("a", 0, 5), ("a", 1, 3), ("other", 0, 99)])));
        assert!(t.offer(wm(20, ProducerState::Streaming, &[("a", 0, 8), ("a", 1, 3)])));
        assert!(!t.offer(wm(15, ProducerState::Streaming, &[])), "older than what is pending");
        assert!(!t.offer(wm(30, ProducerState::Snapshotting, &[])), "snapshotting never counts");
        let next = |p0: i64, p1: i64| move |_: &str, p: i32| Some(if p == 0 { p0 } else { p1 });
        assert_eq!(t.advance(next(4, 3)), None);
        assert_eq!(t.advance(next(5, 3)).map(|c| c.lsn), Some(Lsn(10)), "topics we do not read are ignored");
        assert_eq!(t.advance(next(9, 3)).map(|c| c.lsn), Some(Lsn(20)));
        assert_eq!(t.covered().map(|c| c.lsn), Some(Lsn(20)));
        assert!(t.offer(wm(25, ProducerState::Streaming, &[])), "a heartbeat with nothing new");
        assert_eq!(t.advance(next(9, 3)).map(|c| c.lsn), Some(Lsn(25)));
    }

    #[test]
    fn unassigned_partitions_block_coverage() {
        let mut t = Tracker::new(Some("p".into()), ["a".to_string()]);
        t.offer(wm(10, ProducerState::Streaming, &[("a", 7, 1)]));
        assert_eq!(t.advance(|_, _| None), None);
        let mut other = wm(11, ProducerState::Streaming, &[]);
        other.producer = "someone-else".into();
        assert!(!t.offer(other));
    }
}
