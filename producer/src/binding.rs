//! Binds a table as pgoutput describes it (a [`Relation`]) to its contract, and turns tuples
//! into Avro key and row bytes.
//!
//! ```text
//!  Relation (columns by position) ──Binding::new──► field i -> column j, key field k -> column j
//!  tuple (ColumnRef per column)   ──encode_row───► Avro row bytes | Violation (dead-letter)
//! ```
//!
//! A Relation message arrives again after `ALTER TABLE`, so a binding is rebuilt then: columns
//! the contract does not know are ignored (with a warning); a contract field whose column is
//! gone makes every row of the table a dead letter until the table or the contract is fixed.

use std::sync::Arc;

use serde_json::{Map, Value as Json};
use walcache_schemas::{FieldKind, Violation};

use crate::config::TableSpec;
use crate::pgoutput::{ColumnKind, ColumnRef, Relation};

/// Whether a Postgres type (by OID) can feed a contract field of `kind`. Unknown OIDs (user
/// enums, domains) are accepted: their text form is checked row by row.
pub fn pg_type_fits(type_oid: u32, kind: &FieldKind) -> bool {
    use FieldKind as K;
    match type_oid {
        16 => matches!(kind, K::Boolean),
        20 => matches!(kind, K::Long),
        21 | 23 => matches!(kind, K::Int | K::Long),
        700 | 701 => matches!(kind, K::Float | K::Double),
        1700 => matches!(kind, K::Decimal { .. } | K::Double),
        25 | 1043 | 1042 => matches!(kind, K::String | K::Enum { .. } | K::Uuid),
        1114 => matches!(kind, K::TimestampMicros | K::TimestampMillis | K::LocalTimestampMicros),
        1184 => matches!(kind, K::TimestampMicros | K::TimestampMillis),
        1082 => matches!(kind, K::Date),
        2950 => matches!(kind, K::Uuid | K::String),
        17 => matches!(kind, K::Bytes),
        114 | 3802 => matches!(kind, K::String),
        oid if oid >= 16384 => true,
        _ => false,
    }
}

/// Types whose values Postgres may store out of line (TOAST): an update that leaves them
/// unchanged does not carry them unless the table has REPLICA IDENTITY FULL.
pub fn pg_type_is_toastable(type_oid: u32) -> bool {
    matches!(type_oid, 25 | 1043 | 1042 | 17 | 114 | 3802 | 1700) || type_oid >= 16384
}

/// Something about a relation that does not match its contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingWarning {
    /// A column the contract does not have: ignored.
    ExtraColumn(String),
    /// A contract field without a column: every row dead-letters.
    MissingColumn(String),
    /// A column whose type cannot feed its field: rows will not parse.
    TypeMismatch { column: String, type_oid: u32, expected: String },
}

impl BindingWarning {
    /// Every [`BindingWarning::kind`].
    pub const KINDS: [&'static str; 3] = ["extra_column", "missing_column", "type_mismatch"];

    pub fn kind(&self) -> &'static str {
        match self {
            BindingWarning::ExtraColumn(_) => "extra_column",
            BindingWarning::MissingColumn(_) => "missing_column",
            BindingWarning::TypeMismatch { .. } => "type_mismatch",
        }
    }
}

/// A relation bound to its table's contract.
#[derive(Debug)]
pub struct Binding {
    pub table: Arc<TableRuntime>,
    pub relation: Relation,
    row_columns: Vec<Option<usize>>,
    key_columns: Vec<Option<usize>>,
}

/// Per-table state the pipeline needs on every event.
#[derive(Debug)]
pub struct TableRuntime {
    /// Position in the configured table list; also the table's topic id in the sink.
    pub index: usize,
    pub spec: TableSpec,
    pub qualified: String,
    pub version: &'static walcache_schemas::ValueVersion,
}

impl TableRuntime {
    pub fn new(index: usize, spec: TableSpec) -> Option<Self> {
        let version = spec.contract.version(spec.version)?;
        Some(TableRuntime { index, qualified: spec.qualified(), spec, version })
    }
}

impl Binding {
    pub fn new(table: Arc<TableRuntime>, relation: Relation) -> (Binding, Vec<BindingWarning>) {
        let mut warnings = Vec::new();
        let column_of = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let row = &table.version.row;
        let row_columns: Vec<Option<usize>> = row
            .fields
            .iter()
            .map(|f| {
                let col = column_of(&f.name);
                match col {
                    None => warnings.push(BindingWarning::MissingColumn(f.name.clone())),
                    Some(c) if !pg_type_fits(relation.columns[c].type_oid, &f.kind) => {
                        warnings.push(BindingWarning::TypeMismatch {
                            column: f.name.clone(),
                            type_oid: relation.columns[c].type_oid,
                            expected: f.kind.describe(),
                        });
                    }
                    Some(_) => {}
                }
                col
            })
            .collect();
        for c in &relation.columns {
            if row.index_of(&c.name).is_none() {
                warnings.push(BindingWarning::ExtraColumn(c.name.clone()));
            }
        }
        let key_columns = table.spec.contract.key_plan.fields.iter().map(|f| column_of(&f.name)).collect();
        (Binding { table, relation, row_columns, key_columns }, warnings)
    }

    /// Encodes the row of a tuple. `old` (a full old row) fills unchanged TOAST values.
    pub fn encode_row(
        &self,
        message: &[u8],
        columns: &[ColumnRef],
        old: Option<&[ColumnRef]>,
        out: &mut Vec<u8>,
    ) -> Result<(), Violation> {
        out.clear();
        for (field, col) in self.table.version.row.fields.iter().zip(&self.row_columns) {
            let Some(c) = *col else {
                return Err(Violation::MissingColumn { field: field.name.clone() });
            };
            let Some(value) = columns.get(c) else {
                return Err(Violation::MissingColumn { field: field.name.clone() });
            };
            match value.kind {
                ColumnKind::Null => field.write_null(out)?,
                ColumnKind::Text => field.write_text(out, value.bytes(message))?,
                ColumnKind::UnchangedToast => match old.and_then(|o| o.get(c)) {
                    Some(prev) if prev.kind == ColumnKind::Text => field.write_text(out, prev.bytes(message))?,
                    Some(prev) if prev.kind == ColumnKind::Null => field.write_null(out)?,
                    _ => {
                        return Err(Violation::UnchangedToast { field: field.name.clone() });
                    }
                },
                ColumnKind::Binary => {
                    return Err(Violation::Unparseable {
                        field: field.name.clone(),
                        expected: "text format (the producer does not request binary)".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The columns the contract reads that arrived as unchanged TOAST values (no value in the
    /// stream), by position in the relation.
    pub fn unchanged_toast_columns(&self, columns: &[ColumnRef]) -> Vec<usize> {
        self.row_columns
            .iter()
            .flatten()
            .copied()
            .filter(|&c| columns.get(c).is_some_and(|v| v.kind == ColumnKind::UnchangedToast))
            .collect()
    }

    /// The key columns as (column name, text value), when the tuple carries all of them.
    pub fn key_text<'m>(&self, message: &'m [u8], columns: &[ColumnRef]) -> Option<Vec<(&str, &'m [u8])>> {
        self.key_columns
            .iter()
            .map(|col| {
                let c = (*col)?;
                let v = columns.get(c).filter(|v| v.kind == ColumnKind::Text)?;
                Some((self.relation.columns[c].name.as_str(), v.bytes(message)))
            })
            .collect()
    }

    /// Encodes the key body (no header) from a tuple (a new row, an old row or a key tuple).
    pub fn encode_key(&self, message: &[u8], columns: &[ColumnRef], out: &mut Vec<u8>) -> Result<(), Violation> {
        out.clear();
        for (field, col) in self.table.spec.contract.key_plan.fields.iter().zip(&self.key_columns) {
            let value = col.and_then(|c| columns.get(c));
            match value {
                Some(v) if v.kind == ColumnKind::Text => field.write_text(out, v.bytes(message))?,
                _ => {
                    return Err(Violation::MissingKey { field: field.name.clone() });
                }
            }
        }
        Ok(())
    }

    /// The row as Postgres text values, for a dead-letter record.
    pub fn row_json(&self, message: &[u8], columns: &[ColumnRef]) -> Json {
        let mut map = Map::new();
        for (col, value) in self.relation.columns.iter().zip(columns) {
            let v = match value.kind {
                ColumnKind::Null => Json::Null,
                ColumnKind::UnchangedToast => Json::String("<unchanged TOAST value, not in the stream>".into()),
                ColumnKind::Text | ColumnKind::Binary => {
                    Json::String(String::from_utf8_lossy(value.bytes(message)).into_owned())
                }
            };
            map.insert(col.name.clone(), v);
        }
        Json::Object(map)
    }

    /// The key as text values, when the key columns are present.
    pub fn key_json(&self, message: &[u8], columns: &[ColumnRef]) -> Option<Json> {
        let mut map = Map::new();
        for (field, col) in self.table.spec.contract.key_plan.fields.iter().zip(&self.key_columns) {
            let v = columns.get((*col)?)?;
            if v.kind != ColumnKind::Text {
                return None;
            }
            map.insert(field.name.clone(), Json::String(String::from_utf8_lossy(v.bytes(message)).into_owned()));
        }
        Some(Json::Object(map))
    }
}
