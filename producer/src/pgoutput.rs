//! Decoder for pgoutput protocol version 1 messages (the bytes inside XLogData).
//!
//! pgwire-replication hands us Begin/Commit/Message already parsed; everything else arrives as
//! raw pgoutput bytes, decoded here:
//!
//! ```text
//!  'R' Relation  oid, namespace, name, replica identity, columns (flags, name, type oid, typmod)
//!  'I' Insert    oid, 'N' tuple
//!  'U' Update    oid, ['K' key tuple | 'O' old tuple], 'N' tuple
//!  'D' Delete    oid, 'K' key tuple | 'O' old tuple
//!  'T' Truncate  n, options, oids
//!  'Y' Type, 'O' Origin: read and ignored; any other tag stops the stream (nothing is skipped)
//!  tuple         n, per column: 'n' null | 'u' unchanged TOAST | 't' len text | 'b' len binary
//! ```
//!
//! Tuples decode into [`ColumnRef`]s: offsets into the message, so a caller can reuse one
//! buffer across messages without tying it to a message's lifetime.

use std::fmt;

/// Why a message could not be decoded. A malformed stream is not something to retry past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// One column of a relation as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key pgoutput sends for updates and deletes).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A relation (table) description; sent before a table's first change in a session and again
/// after its schema changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// How a tuple column arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Null,
    /// An unchanged TOASTed value that the update does not carry.
    UnchangedToast,
    Text,
    Binary,
}

/// A column value: its kind and where its bytes are in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnRef {
    pub kind: ColumnKind,
    pub start: u32,
    pub len: u32,
}

impl ColumnRef {
    /// The value's bytes within `message`.
    #[inline]
    pub fn bytes<'a>(&self, message: &'a [u8]) -> &'a [u8] {
        &message[self.start as usize..(self.start + self.len) as usize]
    }
}

/// Which old tuple an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns ('K').
    Key,
    /// The whole old row ('O', REPLICA IDENTITY FULL).
    Full,
}

/// A decoded change. Tuples are written into caller-provided buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Relation(Relation),
    /// `new` holds the new tuple.
    Insert {
        relation: u32,
    },
    /// `new` holds the new tuple; `old` the old one when `old_kind` is set.
    Update {
        relation: u32,
        old_kind: Option<OldTuple>,
    },
    /// `old` holds the key or the old row.
    Delete {
        relation: u32,
        old_kind: OldTuple,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Type, Origin and other messages walcache does not act on.
    Ignored(u8),
}

/// Tuple buffers reused across messages.
#[derive(Debug, Default)]
pub struct Tuples {
    pub old: Vec<ColumnRef>,
    pub new: Vec<ColumnRef>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> DecodeError {
        DecodeError(format!("{what} at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(self.err("message ends early"));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(self.i32()? as u32)
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| self.err("unterminated string"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self, out: &mut Vec<ColumnRef>) -> Result<(), DecodeError> {
        out.clear();
        let n = self.i16()?;
        if n < 0 {
            return Err(self.err("negative column count"));
        }
        for _ in 0..n {
            let kind = match self.u8()? {
                b'n' => ColumnKind::Null,
                b'u' => ColumnKind::UnchangedToast,
                b't' => ColumnKind::Text,
                b'b' => ColumnKind::Binary,
                other => {
                    return Err(self.err(&format!("unknown tuple column kind {:?}", other as char)));
                }
            };
            let (start, len) = if matches!(kind, ColumnKind::Text | ColumnKind::Binary) {
                let len = self.i32()?;
                let len = usize::try_from(len).map_err(|_| self.err("negative value length"))?;
                let start = self.pos;
                self.take(len)?;
                (start, len)
            } else {
                (self.pos, 0)
            };
            out.push(ColumnRef {
                kind,
                start: u32::try_from(start).map_err(|_| self.err("message over 4 GiB"))?,
                len: len as u32,
            });
        }
        Ok(())
    }
}

/// Decodes one pgoutput message (not Begin/Commit/Message, which arrive parsed).
pub fn decode(message: &[u8], tuples: &mut Tuples) -> Result<Change, DecodeError> {
    let mut c = Cursor { buf: message, pos: 0 };
    let tag = c.u8()?;
    let change = match tag {
        b'R' => {
            let oid = c.u32()?;
            let namespace = c.cstr()?;
            let name = c.cstr()?;
            let replica_identity = c.u8()?;
            let n = c.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = c.u8()?;
                let name = c.cstr()?;
                let type_oid = c.u32()?;
                let type_modifier = c.i32()?;
                columns.push(RelationColumn { is_key: flags & 1 == 1, name, type_oid, type_modifier });
            }
            Change::Relation(Relation {
                oid,
                // pgoutput sends an empty namespace for pg_catalog only.
                namespace: if namespace.is_empty() { "pg_catalog".into() } else { namespace },
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = c.u32()?;
            if c.u8()? != b'N' {
                return Err(c.err("insert without a new tuple"));
            }
            c.tuple(&mut tuples.new)?;
            Change::Insert { relation }
        }
        b'U' => {
            let relation = c.u32()?;
            let mut old_kind = None;
            let mut marker = c.u8()?;
            if marker == b'K' || marker == b'O' {
                old_kind = Some(if marker == b'K' { OldTuple::Key } else { OldTuple::Full });
                c.tuple(&mut tuples.old)?;
                marker = c.u8()?;
            } else {
                tuples.old.clear();
            }
            if marker != b'N' {
                return Err(c.err("update without a new tuple"));
            }
            c.tuple(&mut tuples.new)?;
            Change::Update { relation, old_kind }
        }
        b'D' => {
            let relation = c.u32()?;
            let old_kind = match c.u8()? {
                b'K' => OldTuple::Key,
                b'O' => OldTuple::Full,
                _ => return Err(c.err("delete without a key or old tuple")),
            };
            c.tuple(&mut tuples.old)?;
            Change::Delete { relation, old_kind }
        }
        b'T' => {
            let n = c.i32()?;
            let options = c.u8()?;
            let mut relations = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                relations.push(c.u32()?);
            }
            Change::Truncate { relations, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        // Type and Origin describe what follows; logical messages (heartbeats) normally
        // arrive parsed, but are harmless here too.
        tag @ (b'Y' | b'O' | b'M') => Change::Ignored(tag),
        // Anything else is a message this decoder does not understand (a newer protocol
        // version, streamed transactions): skipping it could skip a change, so it stops.
        other => {
            return Err(DecodeError(format!(
                "unknown pgoutput message tag {:?} (0x{other:02x}); nothing past it is confirmed. \
                 This walcache speaks pgoutput protocol version 1 without streaming: upgrade walcache, \
                 or report the Postgres version and this message",
                char::from(other)
            )));
        }
    };
    Ok(change)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages for tests.
    #[derive(Default)]
    pub struct MessageBuilder(pub Vec<u8>);

    impl MessageBuilder {
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        /// A tuple of text values (None = null).
        pub fn tuple(mut self, cols: &[Option<&str>]) -> Self {
            self = self.i16(cols.len() as i16);
            for col in cols {
                self = match col {
                    None => self.u8(b'n'),
                    Some("\u{0}TOAST") => self.u8(b'u'),
                    Some(v) => {
                        let s = self.u8(b't').i32(v.len() as i32);
                        let mut s = s;
                        s.0.extend_from_slice(v.as_bytes());
                        s
                    }
                };
            }
            self
        }
    }

    #[test]
    fn unknown_tags_stop_the_stream_known_ones_are_skipped() {
        let mut tuples = Tuples::default();
        // A stream-start message ('S'): only sent with streaming, which walcache never asks for.
        let e = decode(&MessageBuilder::default().u8(b'S').i32(7).u8(1).0, &mut tuples).expect_err("unknown tag");
        assert!(e.to_string().contains("unknown pgoutput message tag 'S'"), "{e}");
        let origin = MessageBuilder::default().u8(b'O').i32(0).i32(0).cstr("node").0;
        assert_eq!(decode(&origin, &mut tuples), Ok(Change::Ignored(b'O')));
        let ty = MessageBuilder::default().u8(b'Y').i32(16500).cstr("public").cstr("mood").0;
        assert_eq!(decode(&ty, &mut tuples), Ok(Change::Ignored(b'Y')));
    }

    #[test]
    fn relation_and_changes_decode() {
        let rel = MessageBuilder::default()
            .u8(b'R')
            .i32(16384)
            .cstr("public")
            .cstr("t")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr("id")
            .i32(20)
            .i32(-1)
            .u8(0)
            .cstr("name")
            .i32(25)
            .i32(-1)
            .0;
        let mut tuples = Tuples::default();
        let Change::Relation(r) = decode(&rel, &mut tuples).expect("relation") else { panic!("not a relation") };
        assert_eq!(r.qualified_name(), "public.t");
        assert!(r.columns[0].is_key && !r.columns[1].is_key);
        assert_eq!(r.columns[1].type_oid, 25);

        let upd = MessageBuilder::default()
            .u8(b'U')
            .i32(16384)
            .u8(b'K')
            .tuple(&[Some("1"), None])
            .u8(b'N')
            .tuple(&[Some("2"), Some("\u{0}TOAST")])
            .0;
        let change = decode(&upd, &mut tuples).expect("update");
        assert_eq!(change, Change::Update { relation: 16384, old_kind: Some(OldTuple::Key) });
        assert_eq!(tuples.old[0].bytes(&upd), b"1");
        assert_eq!(tuples.old[1].kind, ColumnKind::Null);
        assert_eq!(tuples.new[0].bytes(&upd), b"2");
        assert_eq!(tuples.new[1].kind, ColumnKind::UnchangedToast);

        let trunc = MessageBuilder::default().u8(b'T').i32(2).u8(3).i32(1).i32(2).0;
        assert_eq!(
            decode(&trunc, &mut tuples).expect("truncate"),
            Change::Truncate { relations: vec![1, 2], cascade: true, restart_identity: true }
        );
    }

    #[test]
    fn truncated_messages_are_errors() {
        let ins = MessageBuilder::default().u8(b'I').i32(1).u8(b'N').tuple(&[Some("hello")]).0;
        let mut tuples = Tuples::default();
        decode(&ins, &mut tuples).expect("whole message decodes");
        for cut in 1..ins.len() {
            assert!(decode(&ins[..cut], &mut tuples).is_err(), "cut at {cut}");
        }
    }
}
