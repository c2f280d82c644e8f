//! The stream side of chunked snapshots: which keys changed while a chunk was copied, and
//! whether a chunk may be emitted when its high watermark arrives.
//!
//! ```text
//!  stream:  ... T1 ... [low c] ... T2(k5) ... T3(k9) ... [high c] ...
//!                         │ window c open: keys of table t changed ─┘ │
//!                         └── ring mark: transactions seen before ──  ▼
//!  release at high: drop rows whose key changed in the window (the stream has them, newer);
//!                   redo the chunk if a transaction its snapshot did not see was streamed
//!                   before the window opened (a commit visible in the WAL before it was in
//!                   snapshots), or if the window saw a change it could not key or a TRUNCATE
//! ```

use std::collections::{HashMap, HashSet, VecDeque};

use super::copier::{Chunk, ChunkMessage};

/// How many streamed transactions are remembered for the visibility check.
const RING_CAPACITY: usize = 65_536;

/// The xids of recently streamed transactions, in stream order.
#[derive(Debug, Default)]
struct XidRing {
    xids: VecDeque<u32>,
    /// How many were ever pushed: the absolute index of the next one.
    pushed: u64,
}

impl XidRing {
    fn push(&mut self, xid: u32) {
        self.xids.push_back(xid);
        self.pushed += 1;
        if self.xids.len() > RING_CAPACITY {
            self.xids.pop_front();
        }
    }

    /// Whether `xid` was streamed before absolute index `mark`.
    fn seen_before(&self, xid: u32, mark: u64) -> bool {
        let first = self.pushed - self.xids.len() as u64;
        let upto = mark.saturating_sub(first).min(self.xids.len() as u64) as usize;
        self.xids.iter().take(upto).any(|&x| x == xid)
    }
}

#[derive(Debug)]
struct Window {
    table: usize,
    touched: HashSet<Vec<u8>>,
    /// A change in the window could not be keyed, or the table was truncated.
    poisoned: bool,
    ring_mark: u64,
}

/// Why a chunk cannot be emitted as copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redo {
    /// Its snapshot missed a transaction the stream delivered before the window opened.
    UnseenTransaction,
    /// A change in the window had no readable key, or the table was truncated meanwhile.
    Unkeyed,
    /// The high watermark arrived without its low one (a stream replayed from between).
    NoWindow,
}

impl Redo {
    pub fn as_str(self) -> &'static str {
        match self {
            Redo::UnseenTransaction => "unseen_transaction",
            Redo::Unkeyed => "unkeyed_change",
            Redo::NoWindow => "no_window",
        }
    }
}

/// A chunk ready at its high watermark.
#[derive(Debug)]
pub enum Release {
    /// Emit the chunk's rows except those whose key is in `touched`.
    Emit {
        chunk: Chunk,
        touched: HashSet<Vec<u8>>,
    },
    Redo {
        chunk: Chunk,
        why: Redo,
    },
}

/// Open windows and copied chunks of this session.
pub struct Reconciler {
    slot: String,
    session: u64,
    windows: HashMap<u64, Window>,
    copied: HashMap<u64, Chunk>,
    open_per_table: Vec<u32>,
    ring: XidRing,
    from_workers: tokio::sync::mpsc::Receiver<ChunkMessage>,
    failed: Option<crate::ProducerError>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").field("windows", &self.windows.len()).finish_non_exhaustive()
    }
}

/// A parsed snapshot watermark message of this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Low { chunk: u64, table: usize },
    High { chunk: u64 },
}

impl Reconciler {
    pub fn new(
        slot: &str,
        session: u64,
        tables: usize,
        from_workers: tokio::sync::mpsc::Receiver<ChunkMessage>,
    ) -> Self {
        Reconciler {
            slot: slot.to_string(),
            session,
            windows: HashMap::new(),
            copied: HashMap::new(),
            open_per_table: vec![0; tables],
            ring: XidRing::default(),
            from_workers,
            failed: None,
        }
    }

    /// A message of ours (this slot, this session); others (an earlier session's, another
    /// slot's on the same database) are ignored.
    pub fn parse(&self, content: &[u8]) -> Option<Mark> {
        let text = std::str::from_utf8(content).ok()?;
        let mut parts = text.split('\t');
        let (slot, session, chunk, table, which) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if slot != self.slot || session.parse::<u64>().ok()? != self.session {
            return None;
        }
        let chunk = chunk.parse().ok()?;
        match which {
            "low" => Some(Mark::Low { chunk, table: table.parse().ok()? }),
            "high" => Some(Mark::High { chunk }),
            _ => None,
        }
    }

    /// A transaction began in the stream.
    pub fn begin(&mut self, xid: u32) {
        self.ring.push(xid);
    }

    /// Whether changes of table `index` need keying (a window is open on it).
    pub fn tracking(&self, table: usize) -> bool {
        self.open_per_table.get(table).is_some_and(|&n| n > 0)
    }

    /// A change of `table` to `key`, streamed while a window is open.
    pub fn touched(&mut self, table: usize, key: &[u8]) {
        for w in self.windows.values_mut().filter(|w| w.table == table) {
            if !w.touched.contains(key) {
                w.touched.insert(key.to_vec());
            }
        }
    }

    /// A change of `table` whose key cannot be read, or a TRUNCATE.
    pub fn poison(&mut self, table: usize) {
        for w in self.windows.values_mut().filter(|w| w.table == table) {
            w.poisoned = true;
        }
    }

    pub fn open(&mut self, chunk: u64, table: usize) {
        if table >= self.open_per_table.len() {
            return;
        }
        self.open_per_table[table] += 1;
        self.windows
            .insert(chunk, Window { table, touched: HashSet::new(), poisoned: false, ring_mark: self.ring.pushed });
    }

    /// Takes in what the workers sent; a worker failure is returned once.
    pub fn receive(&mut self) -> Result<(), crate::ProducerError> {
        while let Ok(message) = self.from_workers.try_recv() {
            match message {
                ChunkMessage::Copied(chunk) => {
                    self.copied.insert(chunk.work.chunk, chunk);
                }
                ChunkMessage::Failed(e) => self.failed = Some(e),
            }
        }
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for a worker's message (for the stream's select loop); `None` when no worker runs.
    pub async fn next_message(&mut self) -> Option<ChunkMessage> {
        self.from_workers.recv().await
    }

    pub fn keep(&mut self, message: ChunkMessage) {
        match message {
            ChunkMessage::Copied(chunk) => {
                self.copied.insert(chunk.work.chunk, chunk);
            }
            ChunkMessage::Failed(e) => self.failed = Some(e),
        }
    }

    /// The high watermark of `chunk` arrived: what to do with it.
    pub fn high(&mut self, chunk: u64) -> Result<Option<Release>, crate::ProducerError> {
        self.receive()?;
        let window = self.windows.remove(&chunk);
        if let Some(w) = &window {
            self.open_per_table[w.table] -= 1;
        }
        let Some(copied) = self.copied.remove(&chunk) else {
            // Its worker failed between the copy and the message: the session restarts.
            return Ok(None);
        };
        let Some(window) = window else {
            return Ok(Some(Release::Redo { chunk: copied, why: Redo::NoWindow }));
        };
        if window.poisoned {
            return Ok(Some(Release::Redo { chunk: copied, why: Redo::Unkeyed }));
        }
        // A transaction the chunk's snapshot did not see, but the stream delivered before
        // the window opened: its changes are older than the window, so they would not
        // overrule the chunk's older rows.
        let unseen = copied.in_progress.iter().any(|&xid| self.ring.seen_before(xid as u32, window.ring_mark));
        if unseen {
            return Ok(Some(Release::Redo { chunk: copied, why: Redo::UnseenTransaction }));
        }
        Ok(Some(Release::Emit { chunk: copied, touched: window.touched }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_answers_only_for_transactions_before_the_mark() {
        let mut ring = XidRing::default();
        ring.push(10);
        ring.push(11);
        let mark = ring.pushed;
        ring.push(12);
        assert!(ring.seen_before(10, mark));
        assert!(ring.seen_before(11, mark));
        assert!(!ring.seen_before(12, mark), "streamed inside the window: tracked by key instead");
        for x in 0..RING_CAPACITY as u32 {
            ring.push(1000 + x);
        }
        assert!(!ring.seen_before(10, mark), "forgotten after the ring wrapped");
    }
}
