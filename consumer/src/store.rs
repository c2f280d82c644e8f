//! One table's materialised rows: moka manages pages of rows, each row keeps its position.
//!
//! ```text
//!  key ──hash──► page id ──moka (weigher = page bytes, capacity in bytes)──► PageCell
//!                                                                            └─ RwLock<Vec<Slot>> sorted by key
//!  Slot = one allocation [varint key_len][key][row]  +  24-byte compact position (+ deleted flag)
//! ```
//!
//! Why pages: moka keeps ~450 bytes of bookkeeping per entry (measured), more than a whole
//! courier row. Grouping ~16 rows per moka entry brings the total under the brief's 250 B/row
//! while moka still bounds memory, evicts by frequency and counts evictions. It also makes
//! "unknown" exact: a bitset remembers which pages were ever evicted, so a miss in a page that
//! never was is a true "absent".
//!
//! An event is applied only when its position is newer than the slot's (invariant 3): duplicates
//! and replays change nothing. Deletes keep the key and position as a tombstone slot for
//! `delete_retention`, so a late, older event cannot bring the row back.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use moka::notification::RemovalCause;
use walcache_schemas::{Lsn, Position};

/// A position in 24 bytes: lsn, commit time, txid (Postgres xids are 32-bit) and index with
/// the snapshot and deleted flags in its top bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CompactPosition {
    lsn: u64,
    commit_ts_micros: i64,
    txid: u32,
    index_flags: u32,
}

const SNAPSHOT_FLAG: u32 = 1 << 31;
const DELETED_FLAG: u32 = 1 << 30;
const INDEX_MASK: u32 = DELETED_FLAG - 1;

impl CompactPosition {
    fn new(p: &Position, deleted: bool) -> Self {
        let index = p.index.min(u64::from(INDEX_MASK)) as u32;
        let mut flags = index;
        if p.snapshot {
            flags |= SNAPSHOT_FLAG;
        }
        if deleted {
            flags |= DELETED_FLAG;
        }
        CompactPosition {
            lsn: p.lsn.0,
            commit_ts_micros: p.commit_ts_micros,
            txid: p.txid.min(u64::from(u32::MAX)) as u32,
            index_flags: flags,
        }
    }

    fn position(&self) -> Position {
        Position {
            lsn: Lsn(self.lsn),
            index: u64::from(self.index_flags & INDEX_MASK),
            txid: u64::from(self.txid),
            commit_ts_micros: self.commit_ts_micros,
            snapshot: self.index_flags & SNAPSHOT_FLAG != 0,
        }
    }

    fn deleted(&self) -> bool {
        self.index_flags & DELETED_FLAG != 0
    }
}

#[derive(Debug)]
struct Slot {
    /// `[varint key length][key][row]`; no row for a deleted key.
    data: Box<[u8]>,
    pos: CompactPosition,
}

fn encode_slot(key: &[u8], row: Option<&[u8]>) -> Box<[u8]> {
    let mut data = Vec::with_capacity(5 + key.len() + row.map_or(0, <[u8]>::len));
    let mut n = key.len();
    while n >= 0x80 {
        data.push((n as u8) | 0x80);
        n >>= 7;
    }
    data.push(n as u8);
    data.extend_from_slice(key);
    if let Some(r) = row {
        data.extend_from_slice(r);
    }
    data.into_boxed_slice()
}

impl Slot {
    fn split(&self) -> (&[u8], &[u8]) {
        let mut len = 0usize;
        let mut shift = 0;
        let mut i = 0;
        while i < self.data.len() {
            let b = self.data[i];
            len |= usize::from(b & 0x7F) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let key_end = (i + len).min(self.data.len());
        (&self.data[i..key_end], &self.data[key_end..])
    }

    fn key(&self) -> &[u8] {
        self.split().0
    }

    fn heap_bytes(&self) -> usize {
        self.data.len() + std::mem::size_of::<Slot>()
    }
}

#[derive(Debug, Default)]
struct Page {
    slots: Vec<Slot>,
}

/// A page as moka holds it. The byte count lives outside the lock so the weigher can read it
/// while a writer holds the page.
#[derive(Debug, Default)]
pub struct PageCell {
    page: RwLock<Page>,
    bytes: AtomicUsize,
    /// Bytes when moka last weighed the page.
    weighed: AtomicUsize,
    live: AtomicUsize,
    tombstones: AtomicUsize,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The row (Avro bytes of the table's reader schema) and the position that wrote it.
    Present { row: Vec<u8>, position: Position },
    /// Deleted at `position` (kept for the delete retention).
    Deleted { position: Position },
    /// Never seen (and its page was never evicted).
    Absent,
    /// Not held, and it may have been evicted: the view cannot say.
    Unknown,
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event was newer and is now held.
    Changed,
    /// The event was not newer than what is held (a duplicate or a replay).
    Stale,
}

/// Counters a store keeps for metrics and status.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub live: AtomicI64,
    pub tombstones: AtomicI64,
    pub evicted_rows: AtomicU64,
    pub evicted_pages: AtomicU64,
}

/// One table's rows.
pub struct TableStore {
    pages: moka::sync::Cache<u32, Arc<PageCell>>,
    page_count: u32,
    evicted: Arc<[AtomicU64]>,
    stats: Arc<StoreStats>,
    delete_retention_micros: i64,
    hasher: BuildHasherDefault<DefaultHasher>,
}

impl std::fmt::Debug for TableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableStore").field("page_count", &self.page_count).finish_non_exhaustive()
    }
}

impl TableStore {
    /// `capacity_bytes` bounds the store; `pages` is rounded up to a power of two.
    pub fn new(capacity_bytes: u64, pages: u32, delete_retention: Duration) -> Self {
        let page_count = pages.max(1).next_power_of_two();
        let evicted: Arc<[AtomicU64]> = (0..page_count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let stats = Arc::new(StoreStats::default());
        let (evicted_for_listener, stats_for_listener) = (Arc::clone(&evicted), Arc::clone(&stats));
        let pages = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_id: &u32, cell: &Arc<PageCell>| {
                u32::try_from(cell.bytes.load(Ordering::Relaxed) + 256).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |id: Arc<u32>, cell: Arc<PageCell>, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    evicted_for_listener[(*id / 64) as usize].fetch_or(1 << (*id % 64), Ordering::Release);
                    let live = cell.live.load(Ordering::Relaxed) as i64;
                    let tomb = cell.tombstones.load(Ordering::Relaxed) as i64;
                    stats_for_listener.live.fetch_sub(live, Ordering::Relaxed);
                    stats_for_listener.tombstones.fetch_sub(tomb, Ordering::Relaxed);
                    stats_for_listener.evicted_rows.fetch_add(live as u64, Ordering::Relaxed);
                    stats_for_listener.evicted_pages.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        TableStore {
            pages,
            page_count,
            evicted,
            stats,
            delete_retention_micros: i64::try_from(delete_retention.as_micros()).unwrap_or(i64::MAX),
            hasher: BuildHasherDefault::default(),
        }
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    fn page_of(&self, key: &[u8]) -> u32 {
        (self.hasher.hash_one(key) as u32) & (self.page_count - 1)
    }

    fn was_evicted(&self, page: u32) -> bool {
        self.evicted[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Whether any page was ever evicted (misses may then be unknown).
    pub fn has_evicted(&self) -> bool {
        self.stats.evicted_pages.load(Ordering::Relaxed) > 0
    }

    /// Applies an event: `row` for an upsert, `None` for a delete. `now_micros` drives the
    /// purge of expired tombstones.
    pub fn apply(&self, key: &[u8], position: &Position, row: Option<&[u8]>, now_micros: i64) -> Applied {
        let id = self.page_of(key);
        let cell = self.pages.get_with(id, || Arc::new(PageCell::default()));
        let outcome = {
            let Ok(mut page) = cell.page.write() else {
                return Applied::Stale;
            };
            let deleted = row.is_none();
            let new_pos = CompactPosition::new(position, deleted);
            let outcome = match page.slots.binary_search_by(|s| s.key().cmp(key)) {
                Ok(i) => {
                    let slot = &mut page.slots[i];
                    if !position.is_newer_than(&slot.pos.position()) {
                        Applied::Stale
                    } else {
                        let before = slot.heap_bytes();
                        let was_deleted = slot.pos.deleted();
                        slot.data = encode_slot(key, row);
                        slot.pos = new_pos;
                        self.adjust(&cell, before, slot.heap_bytes(), was_deleted, deleted);
                        Applied::Changed
                    }
                }
                Err(i) => {
                    let slot = Slot { data: encode_slot(key, row), pos: new_pos };
                    let bytes = slot.heap_bytes();
                    page.slots.insert(i, slot);
                    cell.bytes.fetch_add(bytes, Ordering::Relaxed);
                    if deleted {
                        cell.tombstones.fetch_add(1, Ordering::Relaxed);
                        self.stats.tombstones.fetch_add(1, Ordering::Relaxed);
                    } else {
                        cell.live.fetch_add(1, Ordering::Relaxed);
                        self.stats.live.fetch_add(1, Ordering::Relaxed);
                    }
                    Applied::Changed
                }
            };
            if cell.tombstones.load(Ordering::Relaxed) > 0 {
                self.purge_tombstones(&cell, &mut page, now_micros);
            }
            outcome
        };
        // Re-weigh when the page grew or shrank noticeably, so capacity tracks reality.
        let bytes = cell.bytes.load(Ordering::Relaxed);
        let weighed = cell.weighed.load(Ordering::Relaxed);
        if bytes.abs_diff(weighed) > (weighed / 4).max(512) {
            cell.weighed.store(bytes, Ordering::Relaxed);
            self.pages.insert(id, cell);
        }
        outcome
    }

    fn adjust(&self, cell: &PageCell, before: usize, after: usize, was_deleted: bool, deleted: bool) {
        if after >= before {
            cell.bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            cell.bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
        match (was_deleted, deleted) {
            (false, true) => {
                cell.live.fetch_sub(1, Ordering::Relaxed);
                cell.tombstones.fetch_add(1, Ordering::Relaxed);
                self.stats.live.fetch_sub(1, Ordering::Relaxed);
                self.stats.tombstones.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                cell.tombstones.fetch_sub(1, Ordering::Relaxed);
                cell.live.fetch_add(1, Ordering::Relaxed);
                self.stats.tombstones.fetch_sub(1, Ordering::Relaxed);
                self.stats.live.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn purge_tombstones(&self, cell: &PageCell, page: &mut Page, now_micros: i64) {
        let horizon = now_micros.saturating_sub(self.delete_retention_micros);
        let mut freed = 0;
        let mut purged = 0;
        page.slots.retain(|s| {
            let expired = s.pos.deleted() && s.pos.commit_ts_micros < horizon;
            if expired {
                freed += s.heap_bytes();
                purged += 1;
            }
            !expired
        });
        if purged > 0 {
            cell.bytes.fetch_sub(freed, Ordering::Relaxed);
            cell.tombstones.fetch_sub(purged, Ordering::Relaxed);
            self.stats.tombstones.fetch_sub(purged as i64, Ordering::Relaxed);
        }
    }

    pub fn get(&self, key: &[u8]) -> Lookup {
        let id = self.page_of(key);
        let Some(cell) = self.pages.get(&id) else {
            return if self.was_evicted(id) { Lookup::Unknown } else { Lookup::Absent };
        };
        let Ok(page) = cell.page.read() else {
            return Lookup::Unknown;
        };
        match page.slots.binary_search_by(|s| s.key().cmp(key)) {
            Ok(i) => {
                let slot = &page.slots[i];
                if slot.pos.deleted() {
                    Lookup::Deleted { position: slot.pos.position() }
                } else {
                    Lookup::Present { row: slot.split().1.to_vec(), position: slot.pos.position() }
                }
            }
            Err(_) if self.was_evicted(id) => Lookup::Unknown,
            Err(_) => Lookup::Absent,
        }
    }

    /// Drops every row and tombstone whose position is older than `floor` (a truncate).
    pub fn remove_older_than(&self, floor: &Position) -> usize {
        let mut removed = 0;
        for (_, cell) in self.pages.iter() {
            let Ok(mut page) = cell.page.write() else { continue };
            let mut freed = 0;
            let (mut live, mut tomb) = (0, 0);
            page.slots.retain(|s| {
                let keep = s.pos.position().is_newer_than(floor);
                if !keep {
                    freed += s.heap_bytes();
                    if s.pos.deleted() {
                        tomb += 1;
                    } else {
                        live += 1;
                    }
                }
                keep
            });
            cell.bytes.fetch_sub(freed, Ordering::Relaxed);
            cell.live.fetch_sub(live, Ordering::Relaxed);
            cell.tombstones.fetch_sub(tomb, Ordering::Relaxed);
            self.stats.live.fetch_sub(live as i64, Ordering::Relaxed);
            self.stats.tombstones.fetch_sub(tomb as i64, Ordering::Relaxed);
            removed += live + tomb;
        }
        removed
    }

    /// Visits every held key: `(key, position, row)`, `row` None for a tombstone. Weakly
    /// consistent with concurrent writes; each page is seen whole.
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], Position, Option<&[u8]>)) {
        for (_, cell) in self.pages.iter() {
            let Ok(page) = cell.page.read() else { continue };
            for slot in &page.slots {
                let (key, row) = slot.split();
                visit(key, slot.pos.position(), (!slot.pos.deleted()).then_some(row));
            }
        }
    }

    /// Bytes held, as moka weighs them.
    pub fn weighted_bytes(&self) -> u64 {
        self.pages.run_pending_tasks();
        self.pages.weighted_size()
    }

    /// Lets moka apply pending evictions now (tests, status).
    pub fn settle(&self) {
        self.pages.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(lsn: u64, index: u64) -> Position {
        Position { lsn: Lsn(lsn), index, txid: 7, commit_ts_micros: 1_000, snapshot: false }
    }

    fn store() -> TableStore {
        TableStore::new(1 << 30, 64, Duration::from_secs(3600))
    }

    #[test]
    fn newer_positions_win_and_replays_change_nothing() {
        let s = store();
        assert_eq!(s.apply(b"k1", &pos(10, 0), Some(b"v1"), 0), Applied::Changed);
        assert_eq!(s.apply(b"k1", &pos(20, 0), Some(b"v2"), 0), Applied::Changed);
        assert_eq!(s.apply(b"k1", &pos(10, 0), Some(b"v1"), 0), Applied::Stale, "an older replay");
        assert_eq!(s.apply(b"k1", &pos(20, 0), Some(b"v2"), 0), Applied::Stale, "a duplicate");
        assert_eq!(s.get(b"k1"), Lookup::Present { row: b"v2".to_vec(), position: pos(20, 0) });
        assert_eq!(s.get(b"k2"), Lookup::Absent);
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_delete_keeps_its_position_so_older_events_cannot_resurrect_the_row() {
        let s = store();
        s.apply(b"k", &pos(10, 0), Some(b"v"), 0);
        assert_eq!(s.apply(b"k", &pos(30, 0), None, 0), Applied::Changed);
        assert_eq!(s.get(b"k"), Lookup::Deleted { position: pos(30, 0) });
        assert_eq!(s.apply(b"k", &pos(20, 5), Some(b"late"), 0), Applied::Stale);
        assert_eq!(s.get(b"k"), Lookup::Deleted { position: pos(30, 0) });
        assert_eq!(s.apply(b"k", &pos(40, 0), Some(b"again"), 0), Applied::Changed, "a newer insert");
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats().tombstones.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn tombstones_expire_after_the_retention() {
        let s = TableStore::new(1 << 30, 1, Duration::from_micros(100));
        s.apply(b"gone", &pos(10, 0), None, 0);
        assert!(matches!(s.get(b"gone"), Lookup::Deleted { .. }));
        // A later write to the same page purges it.
        s.apply(b"other", &pos(11, 0), Some(b"x"), 5_000);
        assert_eq!(s.get(b"gone"), Lookup::Absent);
        assert_eq!(s.stats().tombstones.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn truncate_drops_only_older_rows() {
        let s = store();
        for i in 0..100u64 {
            s.apply(&i.to_be_bytes(), &pos(10 + i, 0), Some(b"row"), 0);
        }
        let removed = s.remove_older_than(&pos(60, 0));
        assert_eq!(removed, 51);
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 49);
        assert_eq!(s.get(&5u64.to_be_bytes()), Lookup::Absent);
        assert!(matches!(s.get(&99u64.to_be_bytes()), Lookup::Present { .. }));
        let mut seen = 0;
        s.for_each(|_, p, row| {
            assert!(p.lsn.0 > 60 && row.is_some());
            seen += 1;
        });
        assert_eq!(seen, 49);
    }

    #[test]
    fn after_evictions_a_miss_is_unknown_not_absent() {
        let s = TableStore::new(64 * 1024, 4096, Duration::from_secs(3600));
        let row = vec![0u8; 200];
        for i in 0..20_000u64 {
            s.apply(&i.to_be_bytes(), &pos(i + 1, 0), Some(&row), 0);
        }
        s.settle();
        assert!(s.has_evicted(), "a 64 KiB store cannot hold 4 MB of rows");
        assert!(s.weighted_bytes() <= 64 * 1024 + 4096, "capacity holds: {}", s.weighted_bytes());
        let mut unknown = 0;
        let mut absent = 0;
        for i in 0..20_000u64 {
            match s.get(&i.to_be_bytes()) {
                Lookup::Unknown => unknown += 1,
                Lookup::Absent => absent += 1,
                Lookup::Present { .. } => {}
                Lookup::Deleted { .. } => panic!("nothing was deleted"),
            }
        }
        assert!(unknown > 0);
        assert_eq!(absent, 0, "a key that was written and evicted must never read as absent");
        let held = s.stats().live.load(Ordering::Relaxed) as u64;
        assert_eq!(held + s.stats().evicted_rows.load(Ordering::Relaxed), 20_000);
    }

    #[test]
    fn compact_positions_round_trip() {
        let p = Position {
            lsn: Lsn(u64::MAX - 5),
            index: 12345,
            txid: 4_000_000_000,
            commit_ts_micros: -17,
            snapshot: true,
        };
        let c = CompactPosition::new(&p, true);
        assert_eq!(c.position(), p);
        assert!(c.deleted());
        assert_eq!(std::mem::size_of::<CompactPosition>(), 24);
    }
}
