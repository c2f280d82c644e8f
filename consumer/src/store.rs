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
//! while moka still bounds memory, evicts by frequency and counts evictions.
//!
//! A slot is live (a row), deleted (a tombstone) or unknown (a change happened at its position
//! but its row is not available: dead-lettered upstream or undecodable here). An event is
//! applied only when its position is newer than the slot's (invariant 3): duplicates and
//! replays change nothing. Deletes keep the key and position as a tombstone slot for
//! `delete_retention`, so a late, older event cannot bring the row back.
//!
//! "Absent" must be exact, so the store never forgets what it held without saying so:
//! - a bitset remembers which pages were ever created. Pages leave moka only by eviction, so a
//!   missing page that was created is unknown, with no window between moka's removal and its
//!   eviction listener;
//! - a page created again after an eviction is "recreated": a miss in it is unknown, and it
//!   takes no event at or below the highest LSN the page ever held (`page_max_lsn`), since the
//!   evicted page may have held something newer for that key;
//! - once the view follows (after its restore), purging expired tombstones raises the page's
//!   `purged_lsn` in the same way, so a late replay cannot resurrect a purged delete. During a
//!   restore partitions are read at different speeds, and old keys of one partition must not
//!   be refused because of another partition's old deletes.

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
const UNKNOWN_FLAG: u32 = 1 << 29;
const INDEX_MASK: u32 = UNKNOWN_FLAG - 1;

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Live,
    Deleted,
    Unknown,
}

impl CompactPosition {
    fn new(p: &Position, state: SlotState) -> Self {
        let index = p.index.min(u64::from(INDEX_MASK)) as u32;
        let mut flags = index;
        if p.snapshot {
            flags |= SNAPSHOT_FLAG;
        }
        match state {
            SlotState::Live => {}
            SlotState::Deleted => flags |= DELETED_FLAG,
            SlotState::Unknown => flags |= UNKNOWN_FLAG,
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

    fn state(&self) -> SlotState {
        if self.index_flags & DELETED_FLAG != 0 {
            SlotState::Deleted
        } else if self.index_flags & UNKNOWN_FLAG != 0 {
            SlotState::Unknown
        } else {
            SlotState::Live
        }
    }

    fn deleted(&self) -> bool {
        self.state() == SlotState::Deleted
    }
}

#[derive(Debug)]
struct Slot {
    /// `[varint key length][key][row]`: no row for a deleted key, the reason for an unknown one.
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

/// `[varint key length][key][payload]` into key and payload.
fn split_data(data: &[u8]) -> (&[u8], &[u8]) {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        len |= usize::from(b & 0x7F) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let key_end = (i + len).min(data.len());
    (&data[i..key_end], &data[key_end..])
}

impl Slot {
    fn split(&self) -> (&[u8], &[u8]) {
        split_data(&self.data)
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
    unknown: AtomicUsize,
    /// Created again after an eviction: a miss is unknown, and events at or below `floor_lsn`
    /// (the highest LSN the evicted page held) cannot be taken for keys it does not hold.
    recreated: bool,
    floor_lsn: u64,
    /// The highest LSN of a tombstone purged from this page while following.
    purged_lsn: AtomicU64,
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
    /// The view cannot say: the key changed at `position` but its row is not available
    /// (`reason` says why), or it may have been evicted (`position` None, reason "evicted").
    Unknown { position: Option<Position>, reason: String },
}

impl Lookup {
    fn evicted() -> Lookup {
        Lookup::Unknown { position: None, reason: "evicted".into() }
    }
}

/// A held key, as [`TableStore::for_each`] visits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held<'a> {
    Present { row: &'a [u8], position: Position },
    Deleted { position: Position },
    Unknown { position: Option<Position>, reason: &'a str },
}

/// A change to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// The row (Avro bytes of the reader schema).
    Upsert(&'a [u8]),
    Delete,
    /// The key changed but its row is not available; the reason code.
    Unavailable(&'a str),
}

impl Change<'_> {
    fn state(&self) -> SlotState {
        match self {
            Change::Upsert(_) => SlotState::Live,
            Change::Delete => SlotState::Deleted,
            Change::Unavailable(_) => SlotState::Unknown,
        }
    }

    fn payload(&self) -> Option<&[u8]> {
        match self {
            Change::Upsert(row) => Some(row),
            Change::Delete => None,
            Change::Unavailable(reason) => Some(reason.as_bytes()),
        }
    }
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event was newer and is now held.
    Changed,
    /// The event was not newer than what is held (a duplicate or a replay).
    Stale,
    /// The key is not held and the event is not newer than what an evicted page or a purged
    /// tombstone may have held for it: taking it could serve an old row as current, so the
    /// key stays unknown.
    BelowForgotten,
}

/// Counters a store keeps for metrics and status.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub live: AtomicI64,
    pub tombstones: AtomicI64,
    pub unknown: AtomicI64,
    pub evicted_rows: AtomicU64,
    pub evicted_pages: AtomicU64,
}

/// One table's rows.
pub struct TableStore {
    pages: moka::sync::Cache<u32, Arc<PageCell>>,
    page_count: u32,
    /// Which pages were ever created (bitset).
    created: Box<[AtomicU64]>,
    /// The highest LSN applied to each page, kept outside moka so it survives an eviction.
    page_max_lsn: Box<[AtomicU64]>,
    /// Set once the view follows the topics (restore done): purges then raise `purged_lsn`.
    following: std::sync::atomic::AtomicBool,
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
        let created = (0..page_count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let page_max_lsn = (0..page_count).map(|_| AtomicU64::new(0)).collect();
        let stats = Arc::new(StoreStats::default());
        let stats_for_listener = Arc::clone(&stats);
        let pages = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_id: &u32, cell: &Arc<PageCell>| {
                u32::try_from(cell.bytes.load(Ordering::Relaxed) + 256).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_id: Arc<u32>, cell: Arc<PageCell>, cause| {
                // Only statistics here: what a reader concludes from an eviction does not
                // depend on this listener having run (see the module docs).
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    let live = cell.live.load(Ordering::Relaxed) as i64;
                    let tomb = cell.tombstones.load(Ordering::Relaxed) as i64;
                    let unknown = cell.unknown.load(Ordering::Relaxed) as i64;
                    stats_for_listener.live.fetch_sub(live, Ordering::Relaxed);
                    stats_for_listener.tombstones.fetch_sub(tomb, Ordering::Relaxed);
                    stats_for_listener.unknown.fetch_sub(unknown, Ordering::Relaxed);
                    stats_for_listener.evicted_rows.fetch_add(live as u64, Ordering::Relaxed);
                    stats_for_listener.evicted_pages.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        TableStore {
            pages,
            page_count,
            created,
            page_max_lsn,
            following: std::sync::atomic::AtomicBool::new(false),
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

    fn was_created(&self, page: u32) -> bool {
        self.created[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Whether any page was ever evicted (misses may then be unknown).
    pub fn has_evicted(&self) -> bool {
        self.stats.evicted_pages.load(Ordering::Relaxed) > 0
    }

    /// From now on, purged tombstones refuse older events for the keys they held.
    pub fn set_following(&self) {
        self.following.store(true, Ordering::Release);
    }

    /// The page `id`, created (or recreated after an eviction) if moka does not hold it.
    fn page(&self, id: u32) -> Arc<PageCell> {
        self.pages.get_with(id, || {
            let bit = 1u64 << (id % 64);
            let before = self.created[(id / 64) as usize].fetch_or(bit, Ordering::AcqRel);
            let recreated = before & bit != 0;
            Arc::new(PageCell {
                recreated,
                floor_lsn: if recreated { self.page_max_lsn[id as usize].load(Ordering::Acquire) } else { 0 },
                ..PageCell::default()
            })
        })
    }

    /// Applies a change at `position`. `now_micros` drives the purge of expired tombstones.
    pub fn apply(&self, key: &[u8], position: &Position, change: Change<'_>, now_micros: i64) -> Applied {
        let id = self.page_of(key);
        let cell = self.page(id);
        let outcome = {
            let Ok(mut page) = cell.page.write() else {
                return Applied::Stale;
            };
            let state = change.state();
            let new_pos = CompactPosition::new(position, state);
            let outcome = match page.slots.binary_search_by(|s| s.key().cmp(key)) {
                Ok(i) => {
                    let slot = &mut page.slots[i];
                    if !position.is_newer_than(&slot.pos.position()) {
                        Applied::Stale
                    } else {
                        let before = slot.heap_bytes();
                        let was = slot.pos.state();
                        slot.data = encode_slot(key, change.payload());
                        slot.pos = new_pos;
                        self.adjust(&cell, before, slot.heap_bytes(), Some(was), state);
                        Applied::Changed
                    }
                }
                Err(_) if self.forgotten_at_or_above(&cell, position) => Applied::BelowForgotten,
                Err(i) => {
                    let slot = Slot { data: encode_slot(key, change.payload()), pos: new_pos };
                    let bytes = slot.heap_bytes();
                    page.slots.insert(i, slot);
                    self.adjust(&cell, 0, bytes, None, state);
                    Applied::Changed
                }
            };
            if cell.tombstones.load(Ordering::Relaxed) > 0 {
                self.purge_tombstones(&cell, &mut page, now_micros);
            }
            outcome
        };
        if outcome == Applied::Changed {
            self.page_max_lsn[id as usize].fetch_max(position.lsn.0, Ordering::AcqRel);
        }
        // Re-weigh when the page grew or shrank noticeably, so capacity tracks reality. A page
        // evicted meanwhile is not put back: its readers have already been told "unknown".
        let bytes = cell.bytes.load(Ordering::Relaxed);
        let weighed = cell.weighed.load(Ordering::Relaxed);
        if bytes.abs_diff(weighed) > (weighed / 4).max(512) && self.pages.contains_key(&id) {
            cell.weighed.store(bytes, Ordering::Relaxed);
            self.pages.insert(id, cell);
        }
        outcome
    }

    /// Makes `key` unknown at the position it is held at (a change to it could not be read,
    /// so its position is not known either): the next valid event newer than what was held
    /// replaces it.
    pub fn forget(&self, key: &[u8], reason: &str) {
        let id = self.page_of(key);
        let cell = self.page(id);
        let Ok(mut page) = cell.page.write() else { return };
        match page.slots.binary_search_by(|s| s.key().cmp(key)) {
            Ok(i) => {
                let slot = &mut page.slots[i];
                let before = slot.heap_bytes();
                let was = slot.pos.state();
                let position = slot.pos.position();
                slot.data = encode_slot(key, Some(reason.as_bytes()));
                slot.pos = CompactPosition::new(&position, SlotState::Unknown);
                self.adjust(&cell, before, slot.heap_bytes(), Some(was), SlotState::Unknown);
            }
            Err(i) => {
                let zero = Position { lsn: Lsn(0), index: 0, txid: 0, commit_ts_micros: 0, snapshot: true };
                let slot = Slot {
                    data: encode_slot(key, Some(reason.as_bytes())),
                    pos: CompactPosition::new(&zero, SlotState::Unknown),
                };
                let bytes = slot.heap_bytes();
                page.slots.insert(i, slot);
                self.adjust(&cell, 0, bytes, None, SlotState::Unknown);
            }
        }
    }

    /// Whether an evicted page or a purged tombstone may have held something at or above
    /// `position` for a key the page does not hold now.
    fn forgotten_at_or_above(&self, cell: &PageCell, position: &Position) -> bool {
        (cell.recreated && position.lsn.0 <= cell.floor_lsn)
            || position.lsn.0 <= cell.purged_lsn.load(Ordering::Acquire)
    }

    fn counter_of<'c>(cell: &'c PageCell, stats: &'c StoreStats, state: SlotState) -> (&'c AtomicUsize, &'c AtomicI64) {
        match state {
            SlotState::Live => (&cell.live, &stats.live),
            SlotState::Deleted => (&cell.tombstones, &stats.tombstones),
            SlotState::Unknown => (&cell.unknown, &stats.unknown),
        }
    }

    fn adjust(&self, cell: &PageCell, before: usize, after: usize, was: Option<SlotState>, now: SlotState) {
        if after >= before {
            cell.bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            cell.bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
        if was == Some(now) {
            return;
        }
        if let Some(was) = was {
            let (page, total) = Self::counter_of(cell, &self.stats, was);
            page.fetch_sub(1, Ordering::Relaxed);
            total.fetch_sub(1, Ordering::Relaxed);
        }
        let (page, total) = Self::counter_of(cell, &self.stats, now);
        page.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(1, Ordering::Relaxed);
    }

    fn purge_tombstones(&self, cell: &PageCell, page: &mut Page, now_micros: i64) {
        let horizon = now_micros.saturating_sub(self.delete_retention_micros);
        let mut freed = 0;
        let mut purged = 0;
        let mut highest = 0;
        page.slots.retain(|s| {
            let expired = s.pos.deleted() && s.pos.commit_ts_micros < horizon;
            if expired {
                freed += s.heap_bytes();
                purged += 1;
                highest = highest.max(s.pos.lsn);
            }
            !expired
        });
        if purged > 0 {
            if self.following.load(Ordering::Acquire) {
                cell.purged_lsn.fetch_max(highest, Ordering::AcqRel);
            }
            cell.bytes.fetch_sub(freed, Ordering::Relaxed);
            cell.tombstones.fetch_sub(purged, Ordering::Relaxed);
            self.stats.tombstones.fetch_sub(purged as i64, Ordering::Relaxed);
        }
    }

    pub fn get(&self, key: &[u8]) -> Lookup {
        let id = self.page_of(key);
        let Some(cell) = self.pages.get(&id) else {
            return if self.was_created(id) { Lookup::evicted() } else { Lookup::Absent };
        };
        let Ok(page) = cell.page.read() else {
            return Lookup::evicted();
        };
        match page.slots.binary_search_by(|s| s.key().cmp(key)) {
            Ok(i) => {
                let slot = &page.slots[i];
                let position = slot.pos.position();
                match slot.pos.state() {
                    SlotState::Deleted => Lookup::Deleted { position },
                    SlotState::Live => Lookup::Present { row: slot.split().1.to_vec(), position },
                    SlotState::Unknown => Lookup::Unknown {
                        position: (position.lsn.0 > 0).then_some(position),
                        reason: String::from_utf8_lossy(slot.split().1).into_owned(),
                    },
                }
            }
            Err(_) if cell.recreated => Lookup::evicted(),
            Err(_) => Lookup::Absent,
        }
    }

    /// Drops every row and tombstone whose position is older than `floor` (a truncate).
    pub fn remove_older_than(&self, floor: &Position) -> usize {
        let mut removed = 0;
        for (_, cell) in self.pages.iter() {
            let Ok(mut page) = cell.page.write() else { continue };
            let mut freed = 0;
            let (mut live, mut tomb, mut unknown) = (0, 0, 0);
            page.slots.retain(|s| {
                let keep = s.pos.position().is_newer_than(floor);
                if !keep {
                    freed += s.heap_bytes();
                    match s.pos.state() {
                        SlotState::Live => live += 1,
                        SlotState::Deleted => tomb += 1,
                        SlotState::Unknown => unknown += 1,
                    }
                }
                keep
            });
            cell.bytes.fetch_sub(freed, Ordering::Relaxed);
            cell.live.fetch_sub(live, Ordering::Relaxed);
            cell.tombstones.fetch_sub(tomb, Ordering::Relaxed);
            cell.unknown.fetch_sub(unknown, Ordering::Relaxed);
            self.stats.live.fetch_sub(live as i64, Ordering::Relaxed);
            self.stats.tombstones.fetch_sub(tomb as i64, Ordering::Relaxed);
            self.stats.unknown.fetch_sub(unknown as i64, Ordering::Relaxed);
            removed += live + tomb + unknown;
        }
        removed
    }

    /// Visits every held key, a page at a time: each page is copied out under its read lock
    /// and visited after the lock is released, so a slow visitor (an export to a slow client)
    /// never holds up the applier or readers of that page. Weakly consistent with concurrent
    /// writes; each page is seen whole.
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], Held<'_>)) {
        let mut copied: Vec<(Box<[u8]>, CompactPosition)> = Vec::new();
        for (_, cell) in self.pages.iter() {
            copied.clear();
            {
                let Ok(page) = cell.page.read() else { continue };
                copied.extend(page.slots.iter().map(|s| (s.data.clone(), s.pos)));
            }
            for (data, pos) in &copied {
                let (key, payload) = split_data(data);
                let position = pos.position();
                let held = match pos.state() {
                    SlotState::Live => Held::Present { row: payload, position },
                    SlotState::Deleted => Held::Deleted { position },
                    SlotState::Unknown => Held::Unknown {
                        position: (position.lsn.0 > 0).then_some(position),
                        reason: std::str::from_utf8(payload).unwrap_or("unreadable"),
                    },
                };
                visit(key, held);
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
        assert_eq!(s.apply(b"k1", &pos(10, 0), Change::Upsert(b"v1"), 0), Applied::Changed);
        assert_eq!(s.apply(b"k1", &pos(20, 0), Change::Upsert(b"v2"), 0), Applied::Changed);
        assert_eq!(s.apply(b"k1", &pos(10, 0), Change::Upsert(b"v1"), 0), Applied::Stale, "an older replay");
        assert_eq!(s.apply(b"k1", &pos(20, 0), Change::Upsert(b"v2"), 0), Applied::Stale, "a duplicate");
        assert_eq!(s.get(b"k1"), Lookup::Present { row: b"v2".to_vec(), position: pos(20, 0) });
        assert_eq!(s.get(b"k2"), Lookup::Absent);
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_delete_keeps_its_position_so_older_events_cannot_resurrect_the_row() {
        let s = store();
        s.apply(b"k", &pos(10, 0), Change::Upsert(b"v"), 0);
        assert_eq!(s.apply(b"k", &pos(30, 0), Change::Delete, 0), Applied::Changed);
        assert_eq!(s.get(b"k"), Lookup::Deleted { position: pos(30, 0) });
        assert_eq!(s.apply(b"k", &pos(20, 5), Change::Upsert(b"late"), 0), Applied::Stale);
        assert_eq!(s.get(b"k"), Lookup::Deleted { position: pos(30, 0) });
        assert_eq!(s.apply(b"k", &pos(40, 0), Change::Upsert(b"again"), 0), Applied::Changed, "a newer insert");
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats().tombstones.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn tombstones_expire_after_the_retention() {
        let s = TableStore::new(1 << 30, 1, Duration::from_micros(100));
        s.apply(b"gone", &pos(10, 0), Change::Delete, 0);
        assert!(matches!(s.get(b"gone"), Lookup::Deleted { .. }));
        // A later write to the same page purges it.
        s.apply(b"other", &pos(11, 0), Change::Upsert(b"x"), 5_000);
        assert_eq!(s.get(b"gone"), Lookup::Absent);
        assert_eq!(s.stats().tombstones.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn truncate_drops_only_older_rows() {
        let s = store();
        for i in 0..100u64 {
            s.apply(&i.to_be_bytes(), &pos(10 + i, 0), Change::Upsert(b"row"), 0);
        }
        let removed = s.remove_older_than(&pos(60, 0));
        assert_eq!(removed, 51);
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 49);
        assert_eq!(s.get(&5u64.to_be_bytes()), Lookup::Absent);
        assert!(matches!(s.get(&99u64.to_be_bytes()), Lookup::Present { .. }));
        let mut seen = 0;
        s.for_each(|_, held| {
            assert!(matches!(held, Held::Present { position, .. } if position.lsn.0 > 60));
            seen += 1;
        });
        assert_eq!(seen, 49);
    }

    #[test]
    fn after_evictions_a_miss_is_unknown_not_absent() {
        let s = TableStore::new(64 * 1024, 4096, Duration::from_secs(3600));
        let row = vec![0u8; 200];
        for i in 0..20_000u64 {
            s.apply(&i.to_be_bytes(), &pos(i + 1, 0), Change::Upsert(&row), 0);
        }
        s.settle();
        assert!(s.has_evicted(), "a 64 KiB store cannot hold 4 MB of rows");
        assert!(s.weighted_bytes() <= 64 * 1024 + 4096, "capacity holds: {}", s.weighted_bytes());
        let mut unknown = 0;
        let mut absent = 0;
        for i in 0..20_000u64 {
            match s.get(&i.to_be_bytes()) {
                Lookup::Unknown { position: None, .. } => unknown += 1,
                Lookup::Unknown { .. } => panic!("nothing was marked unavailable"),
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
        let c = CompactPosition::new(&p, SlotState::Deleted);
        assert_eq!(c.position(), p);
        assert!(c.deleted());
        let u = CompactPosition::new(&Position { index: u64::from(INDEX_MASK), ..p }, SlotState::Unknown);
        assert_eq!(u.state(), SlotState::Unknown);
        assert_eq!(u.position().index, u64::from(INDEX_MASK));
        assert_eq!(std::mem::size_of::<CompactPosition>(), 24);
    }

    #[test]
    fn an_unavailable_change_makes_the_key_unknown_until_a_newer_event() {
        let s = store();
        s.apply(b"k", &pos(10, 0), Change::Upsert(b"old"), 0);
        assert_eq!(s.apply(b"k", &pos(20, 0), Change::Unavailable("contract_violation"), 0), Applied::Changed);
        assert_eq!(
            s.get(b"k"),
            Lookup::Unknown { position: Some(pos(20, 0)), reason: "contract_violation".into() },
            "never the old row under a newer position"
        );
        assert_eq!(s.apply(b"k", &pos(15, 0), Change::Upsert(b"replay"), 0), Applied::Stale);
        assert!(matches!(s.get(b"k"), Lookup::Unknown { .. }));
        assert_eq!(s.stats().unknown.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats().live.load(Ordering::Relaxed), 0);
        assert_eq!(s.apply(b"k", &pos(30, 0), Change::Upsert(b"fixed"), 0), Applied::Changed);
        assert_eq!(s.get(b"k"), Lookup::Present { row: b"fixed".to_vec(), position: pos(30, 0) });
        assert_eq!(s.stats().unknown.load(Ordering::Relaxed), 0);
        // An unavailable first change of a key (a snapshot row that breaks the contract).
        s.apply(b"new", &pos(40, 0), Change::Unavailable("too_large"), 0);
        assert!(matches!(s.get(b"new"), Lookup::Unknown { position: Some(_), .. }), "not absent");
    }

    #[test]
    fn an_undecodable_change_forgets_the_key_until_a_newer_event() {
        let s = store();
        s.apply(b"k", &pos(10, 0), Change::Upsert(b"old"), 0);
        s.forget(b"k", "unknown_schema");
        assert_eq!(s.get(b"k"), Lookup::Unknown { position: Some(pos(10, 0)), reason: "unknown_schema".into() });
        s.forget(b"never-seen", "unknown_schema");
        assert_eq!(s.get(b"never-seen"), Lookup::Unknown { position: None, reason: "unknown_schema".into() });
        assert_eq!(s.apply(b"never-seen", &pos(1, 0), Change::Upsert(b"v"), 0), Applied::Changed);
        assert_eq!(s.apply(b"k", &pos(11, 0), Change::Upsert(b"new"), 0), Applied::Changed);
        assert!(matches!(s.get(b"k"), Lookup::Present { .. }));
    }

    /// Reads race the eviction of their page: every answer must be the row's value or
    /// unknown, never absent, and never another value.
    #[test]
    fn reads_during_evictions_are_the_value_or_unknown() {
        let s = Arc::new(TableStore::new(256 * 1024, 1024, Duration::from_secs(3600)));
        let value = |i: u64| format!("row-{i}-{}", "x".repeat(150)).into_bytes();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let (mut checked, mut unknown) = (0u64, 0u64);
                    let mut i = r;
                    while !stop.load(Ordering::Relaxed) {
                        // Only keys written before the reader started looking are checked.
                        let written = s.page_max_lsn.iter().map(|l| l.load(Ordering::Relaxed)).max().unwrap_or(0);
                        if written < 2 {
                            continue;
                        }
                        let key = i % (written - 1);
                        i += 7;
                        match s.get(&key.to_be_bytes()) {
                            Lookup::Present { row, .. } => assert_eq!(row, value(key), "key {key}: another value"),
                            Lookup::Unknown { position: None, .. } => unknown += 1,
                            other => panic!("key {key} was written before this read: {other:?}"),
                        }
                        checked += 1;
                    }
                    (checked, unknown)
                })
            })
            .collect();
        for i in 0..60_000u64 {
            s.apply(&i.to_be_bytes(), &pos(i + 1, 0), Change::Upsert(&value(i)), 0);
        }
        stop.store(true, Ordering::Relaxed);
        let mut total_unknown = 0;
        for r in readers {
            let (checked, unknown) = r.join().expect("reader");
            assert!(checked > 0);
            total_unknown += unknown;
        }
        s.settle();
        assert!(s.has_evicted(), "the store is far smaller than what was written");
        let _ = total_unknown;
    }

    #[test]
    fn an_evicted_page_takes_no_older_event_for_a_key_it_may_have_held() {
        let s = TableStore::new(8 * 1024, 1, Duration::from_secs(3600));
        let row = vec![7u8; 200];
        // One page: fill it past capacity so moka evicts it.
        for i in 0..200u64 {
            s.apply(&i.to_be_bytes(), &pos(100 + i, 0), Change::Upsert(&row), 0);
            s.settle();
        }
        assert!(s.has_evicted());
        // A replay of key 5's older change (its newer one, at 105, was in the evicted page).
        let replay = s.apply(&5u64.to_be_bytes(), &pos(50, 0), Change::Upsert(b"older"), 0);
        assert_eq!(replay, Applied::BelowForgotten);
        assert!(matches!(s.get(&5u64.to_be_bytes()), Lookup::Unknown { position: None, .. }));
        // Newer than anything the page held: taken.
        assert_eq!(s.apply(&5u64.to_be_bytes(), &pos(1_000, 0), Change::Upsert(b"new"), 0), Applied::Changed);
    }

    #[test]
    fn a_purged_tombstone_refuses_older_events_once_following() {
        let s = TableStore::new(1 << 30, 1, Duration::from_micros(100));
        s.set_following();
        s.apply(b"gone", &pos(10, 0), Change::Upsert(b"v"), 0);
        s.apply(b"gone", &pos(20, 0), Change::Delete, 0);
        s.apply(b"other", &pos(21, 0), Change::Upsert(b"x"), 5_000);
        assert!(matches!(s.get(b"gone"), Lookup::Absent), "purged");
        assert_eq!(
            s.apply(b"gone", &pos(10, 0), Change::Upsert(b"v"), 5_000),
            Applied::BelowForgotten,
            "a late replay"
        );
        assert_eq!(s.get(b"gone"), Lookup::Absent);
        assert_eq!(s.apply(b"gone", &pos(30, 0), Change::Upsert(b"back"), 5_000), Applied::Changed);
    }
}
