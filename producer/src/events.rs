//! Turns decoded changes into Kafka messages: envelope events, tombstones, truncate markers
//! and dead letters. Shared by the snapshot copy and the replication stream, so both apply the
//! contract the same way.
//!
//! ```text
//!  insert/update/snapshot ─► key + envelope(after, before?)              ─► table topic
//!  update that moves a key ─► delete(old key) + tombstone, insert(new key)
//!  delete                  ─► envelope(op=delete, before?) + tombstone    ─► table topic
//!  truncate                ─► envelope(op=truncate) under TRUNCATE_KEY    ─► table topic
//!  contract violation      ─► DeadLetter JSON (table, key, LSN, reason)   ─► dead-letter topic
//!   (or too large)           + key + envelope(op, no row), header        ─► table topic
//!                              walcache.unavailable = reason: consumers hold the key as
//!                              unknown from this position, never its older row as current
//! ```

use std::sync::Arc;

use walcache_common::dead_letter::{DeadLetter, Stage};
use walcache_schemas::{Op, Position, UNAVAILABLE_HEADER, Violation, micros_to_rfc3339, now_micros, write_envelope};

use crate::ProducerError;
use crate::binding::{Binding, TableRuntime};
use crate::metrics::Metrics;
use crate::pgoutput::{ColumnRef, OldTuple};
use crate::sink::{DeliveryTag, Sink, TopicId};

/// The key of truncate markers. Not an Avro key: consumers recognise `op = truncate` first.
/// Compaction keeps the newest marker, which is all a consumer needs (a truncate floor).
pub const TRUNCATE_KEY: &[u8] = b"\0walcache.truncate";

/// Reusable buffers and per-table counters.
pub struct Emitter {
    key: Vec<u8>,
    key_message: Vec<u8>,
    row: Vec<u8>,
    before: Vec<u8>,
    message: Vec<u8>,
    dead_letter_topic: TopicId,
    producer_name: String,
    metrics: Metrics,
    /// `[table][op]` delivery counters, resolved once.
    tags: Vec<Vec<DeliveryTag>>,
    dead_letter_tags: Vec<std::collections::HashMap<&'static str, DeliveryTag>>,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter").field("dead_letter_topic", &self.dead_letter_topic).finish_non_exhaustive()
    }
}

impl Emitter {
    /// `tables[i]` writes to topic id `i`; the dead-letter topic is `dead_letter_topic`.
    pub fn new(
        tables: &[Arc<TableRuntime>],
        dead_letter_topic: TopicId,
        producer_name: &str,
        metrics: Metrics,
    ) -> Self {
        let tags = tables
            .iter()
            .map(|t| {
                Op::ALL
                    .iter()
                    .map(|op| DeliveryTag {
                        events: Some(metrics.events.with_label_values(&[&t.qualified, op.as_str()])),
                        bytes: Some(metrics.bytes.with_label_values(&[&t.qualified])),
                    })
                    .collect()
            })
            .collect();
        Emitter {
            key: Vec::with_capacity(32),
            key_message: Vec::with_capacity(48),
            row: Vec::with_capacity(256),
            before: Vec::with_capacity(256),
            message: Vec::with_capacity(512),
            dead_letter_topic,
            producer_name: producer_name.to_string(),
            metrics,
            tags,
            dead_letter_tags: vec![Default::default(); tables.len()],
        }
    }

    fn tag(&self, table: &TableRuntime, op: Op) -> DeliveryTag {
        self.tags[table.index][op as usize].clone()
    }

    /// A snapshot row, insert or update: key and row from `new`. `old` is the update's old
    /// tuple, used for `before` (full rows), unchanged TOAST values and key moves.
    #[allow(clippy::too_many_arguments)]
    pub async fn upsert(
        &mut self,
        sink: &mut Sink,
        binding: &Binding,
        op: Op,
        message: &[u8],
        new: &[ColumnRef],
        old: Option<(OldTuple, &[ColumnRef])>,
        position: &mut Position,
    ) -> Result<(), ProducerError> {
        let table = Arc::clone(&binding.table);
        if let Err(v) = binding.encode_key(message, new, &mut self.key) {
            return self.dead_letter(sink, binding, &v, op, message, new, position, KeyState::Unreadable).await;
        }
        let mut op = op;
        let full_old = old.and_then(|(k, cols)| (k == OldTuple::Full).then_some(cols));
        // An update that changes the key: the old key is deleted, the new one inserted.
        if let Some((_, old_cols)) = old {
            let mut old_key = Vec::new();
            if binding.encode_key(message, old_cols, &mut old_key).is_ok() && old_key != self.key {
                let new_key = std::mem::replace(&mut self.key, old_key);
                self.emit_delete(sink, binding, message, full_old, position).await?;
                self.key = new_key;
                op = Op::Insert;
            }
        }
        if let Err(v) = binding.encode_row(message, new, full_old, &mut self.row) {
            return self.dead_letter(sink, binding, &v, op, message, new, position, KeyState::Encoded).await;
        }
        let with_before = full_old
            .is_some_and(|cols| op == Op::Update && binding.encode_row(message, cols, None, &mut self.before).is_ok());
        self.key_message.clear();
        self.key_message.extend_from_slice(&table.spec.contract.key.header);
        self.key_message.extend_from_slice(&self.key);
        match self.send_event(sink, &table, op, with_before, true, position).await {
            Ok(()) => {
                position.index += 1;
                Ok(())
            }
            // Even without `before` it does not fit: set aside, without values, as a dead
            // letter small enough to deliver (set_aside advances the position).
            Err(ProducerError::MessageTooLarge { bytes, .. }) => {
                let key = binding.key_json(message, new);
                let reason = too_large(bytes, sink.max_message_bytes());
                self.set_aside(sink, binding, op, key, position, reason, KeyState::Encoded).await
            }
            Err(e) => Err(e),
        }
    }

    /// Sends the envelope of the key in `self.key_message`: `before` from `self.before` when
    /// `with_before`, `after` from `self.row` when `with_after`. `before` is optional, so an
    /// envelope too large with it goes without it; `MessageTooLarge` means it does not fit
    /// even then. Does not advance `position` (the caller decides what else belongs to it).
    async fn send_event(
        &mut self,
        sink: &mut Sink,
        table: &TableRuntime,
        op: Op,
        with_before: bool,
        with_after: bool,
        position: &Position,
    ) -> Result<(), ProducerError> {
        let mut include_before = with_before;
        loop {
            self.message.clear();
            write_envelope(
                &mut self.message,
                &table.version.doc.header,
                op,
                include_before.then_some(&self.before[..]),
                with_after.then_some(&self.row[..]),
                position,
                &table.qualified,
            );
            let tag = self.tag(table, op);
            match sink.send(table.index, &self.key_message, Some(&self.message), tag).await {
                Err(ProducerError::MessageTooLarge { .. }) if include_before => include_before = false,
                other => return other,
            }
        }
    }

    /// A delete: key from the old tuple (key columns or the full row).
    pub async fn delete(
        &mut self,
        sink: &mut Sink,
        binding: &Binding,
        message: &[u8],
        old_kind: OldTuple,
        old: &[ColumnRef],
        position: &mut Position,
    ) -> Result<(), ProducerError> {
        if let Err(v) = binding.encode_key(message, old, &mut self.key) {
            return self.dead_letter(sink, binding, &v, Op::Delete, message, old, position, KeyState::Unreadable).await;
        }
        let full = (old_kind == OldTuple::Full).then_some(old);
        self.emit_delete(sink, binding, message, full, position).await
    }

    /// The delete event and its tombstone for the key in `self.key`.
    async fn emit_delete(
        &mut self,
        sink: &mut Sink,
        binding: &Binding,
        message: &[u8],
        full_old: Option<&[ColumnRef]>,
        position: &mut Position,
    ) -> Result<(), ProducerError> {
        let table = Arc::clone(&binding.table);
        let with_before =
            full_old.is_some_and(|cols| binding.encode_row(message, cols, None, &mut self.before).is_ok());
        self.key_message.clear();
        self.key_message.extend_from_slice(&table.spec.contract.key.header);
        self.key_message.extend_from_slice(&self.key);
        // A delete needs only its key and position, so it fits whatever its old row's size.
        self.send_event(sink, &table, Op::Delete, with_before, false, position).await?;
        // The tombstone lets compaction forget the key. Compaction may also drop the delete
        // event before it, so the tombstone carries the same position in a header.
        let no_count = DeliveryTag { events: None, bytes: None };
        sink.send_with_position(table.index, &self.key_message, None, position, no_count).await?;
        position.index += 1;
        Ok(())
    }

    /// A truncate marker: consumers drop every row of the table older than `position`. A
    /// snapshot opens with one (its position flagged `snapshot`): consumers apply that floor
    /// once a `streaming` watermark covers the snapshot, so a half-done snapshot never hides
    /// rows it has not copied yet.
    pub async fn truncate(
        &mut self,
        sink: &mut Sink,
        table: &TableRuntime,
        position: &mut Position,
    ) -> Result<(), ProducerError> {
        self.message.clear();
        write_envelope(
            &mut self.message,
            &table.version.doc.header,
            Op::Truncate,
            None,
            None,
            position,
            &table.qualified,
        );
        let tag = self.tag(table, Op::Truncate);
        sink.send(table.index, TRUNCATE_KEY, Some(&self.message), tag).await?;
        position.index += 1;
        Ok(())
    }

    /// Sets a row aside with its reason. Counted, logged without values, and queued like any
    /// other message: its position is confirmed only once Kafka has it.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &mut self,
        sink: &mut Sink,
        binding: &Binding,
        violation: &Violation,
        op: Op,
        message: &[u8],
        columns: &[ColumnRef],
        position: &mut Position,
        key_state: KeyState,
    ) -> Result<(), ProducerError> {
        let reason = SetAside {
            code: violation.code(),
            reason: violation.to_string(),
            field: Some(violation.field().to_string()),
            row: Some(binding.row_json(message, columns)),
        };
        let key = binding.key_json(message, columns);
        self.set_aside(sink, binding, op, key, position, reason, key_state).await
    }

    /// Writes the dead letter for a change at `position`. A record too large with the row's
    /// values in it goes without them: the key, position and reason are what an operator
    /// needs to find the row in Postgres. With the key encoded (in `self.key`), the table
    /// topic gets the key's "row unavailable" marker at the same position, so no consumer
    /// keeps serving the key's older row as current.
    #[allow(clippy::too_many_arguments)]
    async fn set_aside(
        &mut self,
        sink: &mut Sink,
        binding: &Binding,
        op: Op,
        key: Option<serde_json::Value>,
        position: &mut Position,
        reason: SetAside,
        key_state: KeyState,
    ) -> Result<(), ProducerError> {
        let table = &binding.table;
        tracing::warn!(
            table = %table.qualified,
            reason = reason.code,
            field = reason.field.as_deref().unwrap_or(""),
            lsn = %position.lsn,
            txid = position.txid,
            "row set aside on the dead-letter topic"
        );
        let mut record = DeadLetter {
            stage: Stage::Producer,
            table: Some(table.qualified.clone()),
            key,
            lsn: Some(position.lsn),
            txid: Some(position.txid),
            index: Some(position.index),
            commit_time: Some(micros_to_rfc3339(position.commit_ts_micros)),
            op: Some(op.as_str().into()),
            reason_code: reason.code.into(),
            reason: reason.reason,
            field: reason.field,
            row: reason.row,
            raw_key_base64: None,
            raw_value_base64: None,
            origin: None,
            written_by: self.producer_name.clone(),
            written_at: micros_to_rfc3339(now_micros()),
        };
        let dead_letter_key =
            format!("{}:{}", table.qualified, record.key.as_ref().map_or_else(|| "?".to_string(), |k| k.to_string()));
        let code = reason.code;
        let metrics = &self.metrics;
        let tag = self.dead_letter_tags[table.index]
            .entry(code)
            .or_insert_with(|| DeliveryTag {
                events: Some(metrics.dead_letters.with_label_values(&[&table.qualified, code])),
                bytes: None,
            })
            .clone();
        loop {
            let value = serde_json::to_vec(&record)
                .map_err(|e| ProducerError::Config(format!("serializing a dead-letter record: {e}")))?;
            match sink.send(self.dead_letter_topic, dead_letter_key.as_bytes(), Some(&value), tag.clone()).await {
                Err(ProducerError::MessageTooLarge { bytes, .. }) if record.row.is_some() => {
                    record.row = None;
                    record.reason.push_str(&format!(
                        " (the row's values are left out: with them this record was {bytes} bytes, over message.max.bytes)"
                    ));
                }
                other => break other?,
            }
        }
        if key_state == KeyState::Encoded && op != Op::Delete {
            self.key_message.clear();
            self.key_message.extend_from_slice(&table.spec.contract.key.header);
            self.key_message.extend_from_slice(&self.key);
            self.message.clear();
            write_envelope(&mut self.message, &table.version.doc.header, op, None, None, position, &table.qualified);
            let tag = DeliveryTag {
                events: Some(self.metrics.unavailable_markers.with_label_values(&[&table.qualified])),
                bytes: None,
            };
            let headers: [(&str, &[u8]); 1] = [(UNAVAILABLE_HEADER, code.as_bytes())];
            sink.send_with_headers(table.index, &self.key_message, Some(&self.message), &headers, tag).await?;
        }
        position.index += 1;
        Ok(())
    }
}

/// Whether the key of a set-aside change could be encoded (and so be marked unavailable on
/// the table topic). A change whose key cannot be encoded has no key a consumer could hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Encoded,
    Unreadable,
}

/// What a dead letter says about why a change was set aside.
struct SetAside {
    code: &'static str,
    reason: String,
    field: Option<String>,
    row: Option<serde_json::Value>,
}

/// The dead-letter reason code of a change whose event is over the message size limit.
pub const TOO_LARGE: &str = "too_large";

/// The reason for a change whose event is over the message size limit.
fn too_large(bytes: usize, limit: usize) -> SetAside {
    SetAside {
        code: TOO_LARGE,
        reason: format!(
            "the change's event is {bytes} bytes, over the producer's message.max.bytes ({limit}); its values are \
             left out. Raise kafka.properties.\"message.max.bytes\" with the topics' max.message.bytes to carry such rows"
        ),
        field: None,
        row: None,
    }
}
