//! Positions in the source: LSNs and the per-event [`Position`] that orders a key's changes.
//!
//! A position is what lets a consumer apply an event only when it is newer than what it holds
//! (invariant 3): duplicates and replays compare equal or older and change nothing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A Postgres WAL position. Displays and parses as Postgres does (`16/B374D848`).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN: expected Postgres form like 16/B374D848, or a decimal number")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    /// Accepts the Postgres form `HI/LO` (hex) and, for scripts, a plain decimal u64.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        match s.split_once('/') {
            Some((hi, lo)) => {
                let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
                let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
                Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
            }
            None => s.parse::<u64>().map(Lsn).map_err(|_| err()),
        }
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Number(u64),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Repr::Number(n) => Ok(Lsn(n)),
        }
    }
}

/// Where an event sits in the source: enough to order any two events of the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Position {
    /// Commit LSN of the transaction; for snapshot rows, the slot's consistent point.
    pub lsn: Lsn,
    /// Index of the change within its transaction (from 0).
    pub index: u64,
    /// Postgres transaction id; 0 for snapshot rows.
    pub txid: u64,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_micros: i64,
    /// Whether the event was copied by the initial snapshot.
    pub snapshot: bool,
}

impl Position {
    /// The total order of positions. A snapshot row ranks below a streamed change at the same
    /// LSN: the snapshot shows the table as of the consistent point, and every streamed change
    /// of a key was committed after it.
    #[inline]
    pub fn order_key(&self) -> (u64, u8, u64) {
        (self.lsn.0, u8::from(!self.snapshot), self.index)
    }

    /// True when `self` must replace state held at `held`.
    #[inline]
    pub fn is_newer_than(&self, held: &Position) -> bool {
        self.order_key() > held.order_key()
    }
}

/// Kafka header that carries a [`Position`] on messages without an envelope (tombstones).
/// Headers survive compaction, so a consumer restoring from a compacted topic can still order
/// a bare tombstone against what it holds.
pub const POSITION_HEADER: &str = "walcache.position";

impl Position {
    /// Fixed 33-byte form for [`POSITION_HEADER`]: lsn, index, txid, commit time (big-endian
    /// u64/i64), snapshot flag.
    pub fn to_header(&self) -> [u8; 33] {
        let mut out = [0u8; 33];
        out[0..8].copy_from_slice(&self.lsn.0.to_be_bytes());
        out[8..16].copy_from_slice(&self.index.to_be_bytes());
        out[16..24].copy_from_slice(&self.txid.to_be_bytes());
        out[24..32].copy_from_slice(&self.commit_ts_micros.to_be_bytes());
        out[32] = u8::from(self.snapshot);
        out
    }

    /// Reads [`Position::to_header`]'s form; `None` for anything else.
    pub fn from_header(bytes: &[u8]) -> Option<Position> {
        let bytes: &[u8; 33] = bytes.try_into().ok()?;
        let u = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[r]);
            b
        };
        Some(Position {
            lsn: Lsn(u64::from_be_bytes(u(0..8))),
            index: u64::from_be_bytes(u(8..16)),
            txid: u64::from_be_bytes(u(16..24)),
            commit_ts_micros: i64::from_be_bytes(u(24..32)),
            snapshot: match bytes[32] {
                0 => false,
                1 => true,
                _ => return None,
            },
        })
    }
}

/// Renders Unix-epoch microseconds as RFC 3339 UTC with microsecond precision.
pub fn micros_to_rfc3339(micros: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => micros.to_string(),
    }
}

/// The current time in Unix-epoch microseconds.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_postgres_text() {
        let lsn: Lsn = "16/B374D848".parse().expect("valid lsn");
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().expect("zero"), Lsn::ZERO);
        assert_eq!("12345".parse::<Lsn>().expect("decimal"), Lsn(12345));
        assert!("zz/1".parse::<Lsn>().is_err());
        assert!("".parse::<Lsn>().is_err());
    }

    #[test]
    fn snapshot_rows_rank_below_streamed_changes_at_the_same_lsn() {
        let snap = Position { lsn: Lsn(100), index: 7, snapshot: true, ..Position::default() };
        let streamed = Position { lsn: Lsn(100), index: 0, ..Position::default() };
        assert!(streamed.is_newer_than(&snap));
        assert!(!snap.is_newer_than(&streamed));
        assert!(!streamed.is_newer_than(&streamed), "a duplicate is not newer");
        let later = Position { lsn: Lsn(101), ..Position::default() };
        assert!(later.is_newer_than(&streamed));
    }

    #[test]
    fn positions_round_trip_through_the_header_form() {
        let pos = Position { lsn: Lsn(0x1234_5678_9ABC), index: 7, txid: 991, commit_ts_micros: -5, snapshot: true };
        assert_eq!(Position::from_header(&pos.to_header()), Some(pos));
        assert_eq!(Position::from_header(b"short"), None);
    }

    #[test]
    fn lsn_serializes_as_postgres_text_and_reads_numbers_too() {
        let json = serde_json::to_string(&Lsn(0x1_0000_0010)).expect("serialize");
        assert_eq!(json, "\"1/10\"");
        let back: Lsn = serde_json::from_str("\"1/10\"").expect("text");
        assert_eq!(back, Lsn(0x1_0000_0010));
        let num: Lsn = serde_json::from_str("4294967312").expect("number");
        assert_eq!(num, back);
    }
}
