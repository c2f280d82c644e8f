//! Unchanged TOAST values, re-read by key only when the re-read is exact.
//!
//! Under `REPLICA IDENTITY DEFAULT`, an UPDATE that leaves a value stored out of line (TOAST,
//! values over about 2 kB) unchanged streams that column as "unchanged" ('u'), without its
//! value. The event cannot be built from the stream alone, so the row is read again by key
//! on the control connection, together with `xmin`, the transaction that wrote the visible
//! row version:
//!
//! ```text
//!  UPDATE (txid X) with 'u' columns
//!      └─► SELECT xmin, <'u' columns> FROM table WHERE key = ...
//!             xmin = X  ──► the row exactly as X committed it: fill the columns, publish
//!             otherwise ──► None: the row changed again since X (or was deleted, or X wrote
//!                           it in a subtransaction); the caller sets the change aside and
//!                           consumers hold the key as unknown until its next change
//! ```
//!
//! Why `xmin`: a plain re-read (Debezium's reselect post-processor) returns the row as it is
//! now, which may already hold a later transaction's values, published under X's position
//! as if X had written them. Only the version X itself wrote is exact as of X. A producer that
//! lags far behind the primary re-reads mostly superseded rows; `REPLICA IDENTITY FULL`
//! carries the old values in the stream instead and needs no re-read.

use tokio_postgres::SimpleQueryMessage;

use crate::ProducerError;
use crate::binding::Binding;
use crate::pgoutput::{ColumnKind, ColumnRef};
use crate::postgres::{Control, quote_ident};

/// A tuple whose unchanged TOAST columns were filled: the original message with the values
/// appended, and column references into it.
#[derive(Debug)]
pub struct Filled {
    pub message: Vec<u8>,
    pub columns: Vec<ColumnRef>,
}

/// Why a re-read could not fill a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFilled {
    /// The key is not in the tuple (it is itself an unchanged TOAST value).
    NoKey,
    /// The visible row version is not the one the transaction wrote, or there is none.
    Superseded,
}

/// Every outcome label of `walcache_producer_toast_reselects_total`.
pub const OUTCOMES: [&str; 4] = [FILLED, NotFilled::NoKey.as_str(), NotFilled::Superseded.as_str(), FAILED];
/// The values were read back exactly as the update's transaction committed them.
pub const FILLED: &str = "filled";
/// The re-read failed with a definite error; the change was set aside.
pub const FAILED: &str = "failed";

impl NotFilled {
    pub const fn as_str(self) -> &'static str {
        match self {
            NotFilled::NoKey => "no_key",
            NotFilled::Superseded => "superseded",
        }
    }
}

/// Fills the unchanged TOAST columns `unchanged` of `columns` (an update of transaction
/// `xid`) with the values that transaction committed, read by key.
pub async fn fill_unchanged_toast(
    control: &Control,
    binding: &Binding,
    message: &[u8],
    columns: &[ColumnRef],
    unchanged: &[usize],
    xid: u64,
) -> Result<Result<Filled, NotFilled>, ProducerError> {
    let Some(key) = binding.key_text(message, columns) else {
        return Ok(Err(NotFilled::NoKey));
    };
    let relation = &binding.relation;
    let select = unchanged.iter().map(|&c| quote_ident(&relation.columns[c].name)).collect::<Vec<_>>().join(", ");
    let filter = key
        .iter()
        .map(|(name, value)| format!("{} = {}", quote_ident(name), escaped_literal(value)))
        .collect::<Vec<_>>()
        .join(" AND ");
    // The literal is untyped, so Postgres reads it as the key column's type and the primary
    // key index serves the lookup. Text results come out under the control connection's
    // pinned settings, the same the replication stream uses.
    let sql = format!(
        "SELECT xmin::text, {select} FROM {}.{} WHERE {filter} LIMIT 2",
        quote_ident(&binding.table.spec.schema),
        quote_ident(&binding.table.spec.name),
    );
    let messages = control.client().simple_query(&sql).await.map_err(|e| {
        ProducerError::pg(format!("re-reading an unchanged TOAST value of {}", binding.table.qualified), e)
    })?;
    let mut rows = messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let (Some(row), None) = (rows.next(), rows.next()) else {
        return Ok(Err(NotFilled::Superseded));
    };
    // Both are 32-bit transaction ids: pgoutput's BEGIN carries the top-level xid.
    if row.get(0).and_then(|x| x.parse::<u64>().ok()) != Some(xid) {
        return Ok(Err(NotFilled::Superseded));
    }
    let mut filled = Filled { message: message.to_vec(), columns: columns.to_vec() };
    for (i, &c) in unchanged.iter().enumerate() {
        filled.columns[c] = match row.get(i + 1) {
            None => ColumnRef { kind: ColumnKind::Null, start: 0, len: 0 },
            Some(value) => {
                let start = filled.message.len();
                filled.message.extend_from_slice(value.as_bytes());
                let (Ok(start), Ok(len)) = (u32::try_from(start), u32::try_from(value.len())) else {
                    return Ok(Err(NotFilled::Superseded));
                };
                ColumnRef { kind: ColumnKind::Text, start, len }
            }
        };
    }
    Ok(Ok(filled))
}

/// `value` as an escape-string literal (`E'...'`): quotes and backslashes escaped, so it
/// reads the same whatever `standard_conforming_strings` says.
fn escaped_literal(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("E'");
    for ch in text.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(escaped_literal(b"plain"), "E'plain'");
        assert_eq!(escaped_literal(b"it's"), "E'it''s'");
        assert_eq!(escaped_literal(br"a\'b"), r"E'a\\''b'");
    }
}
