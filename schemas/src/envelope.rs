//! The change envelope: `op`, `before`, `after`, `source` (position and table).
//!
//! Written by hand on the producer's hot path (rows are already Avro bytes, so the envelope is a
//! few varints around them) and read without decoding the rows: the consumer keeps the `after`
//! bytes as they are and decodes them only when a query asks.
//!
//! The layout is fixed and checked when the registry loads a schema: fields `op`, `before`,
//! `after`, `source` in that order, `before`/`after` as `["null", Row]`, `source` as
//! `lsn, index, txid, commit_ts, snapshot, table`. A new version may add row fields; a change to
//! the envelope itself needs a code change here, and the load check says so.

use serde::{Deserialize, Serialize};

use crate::SchemaError;
use crate::binary::{self, Reader};
use crate::framing::HEADER_LEN;
use crate::plan::RowPlan;
use crate::position::{Lsn, Position};

/// Kafka header on a "row unavailable" marker: an envelope of a non-delete op with no `after`
/// row, which says "this key changed at this position, and its row is not available" (the
/// producer set the change aside on the dead-letter topic). The header's value is the reason
/// code. A consumer holds the key as unknown from that position until a newer valid event. The
/// marker has a value, so compaction keeps it like any other latest event of its key.
pub const UNAVAILABLE_HEADER: &str = "walcache.unavailable";

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Snapshot,
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Snapshot, Op::Insert, Op::Update, Op::Delete, Op::Truncate];

    /// The Avro enum symbol (and metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    fn index(self) -> i64 {
        self as i64
    }

    fn from_index(i: i64) -> Option<Op> {
        usize::try_from(i).ok().and_then(|i| Op::ALL.get(i).copied())
    }
}

const NULL_BRANCH: i64 = 0;
const ROW_BRANCH: i64 = 1;

/// Appends a complete single-object envelope message to `out`.
#[allow(clippy::too_many_arguments)]
pub fn write_envelope(
    out: &mut Vec<u8>,
    header: &[u8; HEADER_LEN],
    op: Op,
    before: Option<&[u8]>,
    after: Option<&[u8]>,
    position: &Position,
    table: &str,
) {
    out.extend_from_slice(header);
    binary::write_long(out, op.index());
    for row in [before, after] {
        match row {
            Some(bytes) => {
                binary::write_long(out, ROW_BRANCH);
                out.extend_from_slice(bytes);
            }
            None => binary::write_long(out, NULL_BRANCH),
        }
    }
    binary::write_long(out, position.lsn.0 as i64);
    binary::write_long(out, position.index as i64);
    binary::write_long(out, position.txid as i64);
    binary::write_long(out, position.commit_ts_micros);
    binary::write_bool(out, position.snapshot);
    binary::write_bytes(out, table.as_bytes());
}

/// An envelope read in place: rows stay encoded.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeRef<'a> {
    pub op: Op,
    pub before: Option<&'a [u8]>,
    pub after: Option<&'a [u8]>,
    pub position: Position,
    pub table: &'a str,
}

/// Reads an envelope body (after the single-object header) written with `row`'s schema.
pub fn read_envelope<'a>(row: &RowPlan, body: &'a [u8]) -> Result<EnvelopeRef<'a>, SchemaError> {
    let mut r = Reader::new(body);
    let op_index = r.read_long()?;
    let op = Op::from_index(op_index).ok_or_else(|| SchemaError::malformed(format!("op index {op_index}")))?;
    let mut rows = [None, None];
    for slot in &mut rows {
        match r.read_long()? {
            NULL_BRANCH => {}
            ROW_BRANCH => {
                let start = r.buf;
                row.skip(&mut r)?;
                *slot = Some(&start[..start.len() - r.buf.len()]);
            }
            other => return Err(SchemaError::malformed(format!("row union branch {other}"))),
        }
    }
    let non_negative =
        |v: i64, what: &str| u64::try_from(v).map_err(|_| SchemaError::malformed(format!("negative {what}")));
    let lsn = Lsn(non_negative(r.read_long()?, "lsn")?);
    let index = non_negative(r.read_long()?, "index")?;
    let txid = non_negative(r.read_long()?, "txid")?;
    let commit_ts_micros = r.read_long()?;
    let snapshot = r.read_bool()?;
    let table = r.read_str()?;
    if !r.buf.is_empty() {
        return Err(SchemaError::malformed("bytes left after the envelope"));
    }
    Ok(EnvelopeRef {
        op,
        before: rows[0],
        after: rows[1],
        position: Position { lsn, index, txid, commit_ts_micros, snapshot },
        table,
    })
}

/// Checks that a value schema has the envelope layout this module reads and writes, and
/// returns the row schema inside it.
pub(crate) fn row_schema_of(schema: &apache_avro::Schema, file: &str) -> Result<apache_avro::Schema, SchemaError> {
    use apache_avro::Schema;
    let invalid = |reason: &str| SchemaError::InvalidSchema {
        file: file.to_string(),
        reason: format!(
            "{reason}; the envelope must be fields op, before, after, source \
             (source: lsn, index, txid, commit_ts, snapshot, table), see schemas/src/envelope.rs"
        ),
    };
    let Schema::Record(record) = schema else {
        return Err(invalid("not a record"));
    };
    let names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
    if names != ["op", "before", "after", "source"] {
        return Err(invalid("unexpected top-level fields"));
    }
    match &record.fields[0].schema {
        Schema::Enum(e) if e.symbols.iter().map(String::as_str).eq(Op::ALL.iter().map(|o| o.as_str())) => {}
        _ => {
            return Err(invalid("op must be the enum [snapshot, insert, update, delete, truncate]"));
        }
    }
    let row = match &record.fields[1].schema {
        Schema::Union(u) => match u.variants() {
            [Schema::Null, row @ Schema::Record(_)] => row.clone(),
            _ => return Err(invalid("before must be [\"null\", <row record>]")),
        },
        _ => return Err(invalid("before must be a union")),
    };
    match &record.fields[2].schema {
        Schema::Union(u) if matches!(u.variants(), [Schema::Null, Schema::Ref { .. } | Schema::Record(_)]) => {}
        _ => return Err(invalid("after must be [\"null\", <row record>]")),
    }
    let Schema::Record(source) = &record.fields[3].schema else {
        return Err(invalid("source must be a record"));
    };
    let expected = [
        ("lsn", "long"),
        ("index", "long"),
        ("txid", "long"),
        ("commit_ts", "timestamp"),
        ("snapshot", "boolean"),
        ("table", "string"),
    ];
    let ok = source.fields.len() == expected.len()
        && source.fields.iter().zip(expected).all(|(f, (name, kind))| {
            f.name == name
                && matches!(
                    (&f.schema, kind),
                    (Schema::Long, "long")
                        | (Schema::TimestampMicros, "timestamp")
                        | (Schema::Boolean, "boolean")
                        | (Schema::String, "string")
                )
        });
    if !ok {
        return Err(invalid("unexpected source fields"));
    }
    Ok(row)
}
