//! Producer progress records on the watermarks topic.
//!
//! A watermark says: every change committed at or before `lsn` is in the table topics at offsets
//! below `offsets`. A consumer whose positions reach those offsets can say "my view is as of
//! `lsn`", which makes `min_lsn` reads and staleness exact even for keys that did not change.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use crate::position::Lsn;
use crate::registry::{Registry, Role};
use crate::{SchemaError, framing};

/// Where the producer is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProducerState {
    /// The initial snapshot has started but not finished: the topics do not hold the whole table.
    Snapshotting,
    /// The snapshot is complete; the producer follows the slot.
    Streaming,
}

/// The next offset of one partition that covers the watermark.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One progress record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The producer's replication slot name (also the message key).
    pub producer: String,
    pub lsn: Lsn,
    /// Commit (or heartbeat) time at `lsn`, Unix microseconds.
    pub commit_ts_micros: i64,
    pub emitted_at_micros: i64,
    pub state: ProducerState,
    pub offsets: Vec<PartitionOffset>,
}

impl Watermark {
    /// Encodes as a single-object message.
    pub fn encode(&self, registry: &Registry) -> Result<Vec<u8>, SchemaError> {
        let doc = &registry.watermark;
        let offsets = self
            .offsets
            .iter()
            .map(|o| {
                Value::Record(vec![
                    ("topic".into(), Value::String(o.topic.clone())),
                    ("partition".into(), Value::Int(o.partition)),
                    ("offset".into(), Value::Long(o.offset)),
                ])
            })
            .collect();
        let (state_index, state_symbol) = match self.state {
            ProducerState::Snapshotting => (0, "snapshotting"),
            ProducerState::Streaming => (1, "streaming"),
        };
        let value = Value::Record(vec![
            ("producer".into(), Value::String(self.producer.clone())),
            ("lsn".into(), Value::Long(self.lsn.0 as i64)),
            ("commit_ts".into(), Value::TimestampMicros(self.commit_ts_micros)),
            ("emitted_at".into(), Value::TimestampMicros(self.emitted_at_micros)),
            ("state".into(), Value::Enum(state_index, state_symbol.into())),
            ("offsets".into(), Value::Array(offsets)),
        ]);
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&doc.schema).build()?;
        let body = writer.write_value_to_vec(value)?;
        let mut out = Vec::with_capacity(framing::HEADER_LEN + body.len());
        out.extend_from_slice(&doc.header);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes a single-object watermark message.
    pub fn decode(registry: &Registry, message: &[u8]) -> Result<Watermark, SchemaError> {
        let (fingerprint, body) = framing::split(message)?;
        if registry.lookup(fingerprint)?.1 != Role::Watermark {
            return Err(SchemaError::WrongSchema {
                fingerprint,
                found: "not a watermark".into(),
                expected: "a watermark".into(),
            });
        }
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&registry.watermark.schema).build()?;
        let value = reader.read_value(&mut &body[..])?;
        let bad = |what: &str| SchemaError::malformed(format!("watermark: {what}"));
        let Value::Record(fields) = value else {
            return Err(bad("not a record"));
        };
        let mut wm = Watermark {
            producer: String::new(),
            lsn: Lsn::ZERO,
            commit_ts_micros: 0,
            emitted_at_micros: 0,
            state: ProducerState::Snapshotting,
            offsets: Vec::new(),
        };
        for (name, value) in fields {
            match (name.as_str(), value) {
                ("producer", Value::String(s)) => wm.producer = s,
                ("lsn", Value::Long(v)) => wm.lsn = Lsn(u64::try_from(v).map_err(|_| bad("negative lsn"))?),
                ("commit_ts", Value::TimestampMicros(v)) => wm.commit_ts_micros = v,
                ("emitted_at", Value::TimestampMicros(v)) => wm.emitted_at_micros = v,
                ("state", Value::Enum(i, _)) => {
                    wm.state = if i == 0 { ProducerState::Snapshotting } else { ProducerState::Streaming }
                }
                ("offsets", Value::Array(items)) => {
                    for item in items {
                        let Value::Record(f) = item else {
                            return Err(bad("offset entry is not a record"));
                        };
                        let mut o = PartitionOffset { topic: String::new(), partition: 0, offset: 0 };
                        for (n, v) in f {
                            match (n.as_str(), v) {
                                ("topic", Value::String(s)) => o.topic = s,
                                ("partition", Value::Int(p)) => o.partition = p,
                                ("offset", Value::Long(x)) => o.offset = x,
                                _ => return Err(bad("unexpected offset field")),
                            }
                        }
                        wm.offsets.push(o);
                    }
                }
                (other, _) => return Err(bad(&format!("unexpected field {other}"))),
            }
        }
        Ok(wm)
    }
}
