//! The query API's binary answer for one key, shared by the consumer (which writes it) and the
//! client (which reads it): no JSON on either side of the hot path.
//!
//! ```text
//!  GET /v1/tables/{t}/rows/{k}   Accept: application/vnd.walcache.avro
//!  200/404/409  body = the row's Avro datum (reader contract version), empty unless present
//!               walcache-state: present | deleted | absent | unknown
//!               walcache-reason: why unknown
//!               walcache-row-version: <contract version> <schema fingerprint, hex>
//!               walcache-row-position: <lsn> <txid> <commit micros> <index> <snapshot 0|1>
//!               walcache-view: <lsn> <commit micros>          (absent: no coverage yet)
//! ```
//!
//! Errors (503 not_ready, too_stale, ...) stay JSON, as on every other path.

use crate::position::{Lsn, Position};

/// The media type a client asks for to get the binary answer.
pub const AVRO_ROW_MEDIA_TYPE: &str = "application/vnd.walcache.avro";
pub const STATE_HEADER: &str = "walcache-state";
pub const REASON_HEADER: &str = "walcache-reason";
pub const ROW_VERSION_HEADER: &str = "walcache-row-version";
pub const ROW_POSITION_HEADER: &str = "walcache-row-position";
pub const VIEW_HEADER: &str = "walcache-view";

/// `walcache-row-version`: which schema the body is written with.
pub fn row_version_header(version: u32, fingerprint: u64) -> String {
    format!("{version} {fingerprint:016x}")
}

pub fn parse_row_version_header(text: &str) -> Option<(u32, u64)> {
    let (version, fingerprint) = text.split_once(' ')?;
    Some((version.parse().ok()?, u64::from_str_radix(fingerprint, 16).ok()?))
}

/// `walcache-row-position`: the position of the change that wrote (or deleted) the row.
pub fn position_header(p: &Position) -> String {
    format!("{} {} {} {} {}", p.lsn, p.txid, p.commit_ts_micros, p.index, u8::from(p.snapshot))
}

pub fn parse_position_header(text: &str) -> Option<Position> {
    let mut parts = text.split(' ');
    let position = Position {
        lsn: parts.next()?.parse().ok()?,
        txid: parts.next()?.parse().ok()?,
        commit_ts_micros: parts.next()?.parse().ok()?,
        index: parts.next()?.parse().ok()?,
        snapshot: match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        },
    };
    parts.next().is_none().then_some(position)
}

/// `walcache-view`: the view is complete up to `lsn`, committed at `commit_micros`.
pub fn view_header(lsn: Lsn, commit_micros: i64) -> String {
    format!("{lsn} {commit_micros}")
}

pub fn parse_view_header(text: &str) -> Option<(Lsn, i64)> {
    let (lsn, micros) = text.split_once(' ')?;
    Some((lsn.parse().ok()?, micros.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let p =
            Position { lsn: Lsn(0x1_0000_00ff), index: 7, txid: 4_000_000_000, commit_ts_micros: -5, snapshot: true };
        assert_eq!(parse_position_header(&position_header(&p)), Some(p));
        assert_eq!(parse_position_header("0/1 2 3 4 2"), None, "the snapshot flag is 0 or 1");
        assert_eq!(parse_position_header("0/1 2 3 4 1 extra"), None);
        assert_eq!(parse_row_version_header(&row_version_header(2, u64::MAX - 1)), Some((2, u64::MAX - 1)));
        assert_eq!(
            parse_view_header(&view_header(Lsn(42), 1_700_000_000_000_000)),
            Some((Lsn(42), 1_700_000_000_000_000))
        );
    }
}
