//! A compiled form of a contract's record schema: one [`FieldPlan`] per field, in schema order.
//!
//! ```text
//!  .avsc --apache-avro parse--> Schema --RowPlan::from_record--> [FieldPlan; n]
//!                                                                   |  write_text  (Postgres text -> Avro, checks the contract)
//!                                                                   |  skip        (walk a row without decoding it)
//!                                                                   '  read_json   (Avro -> API JSON)
//! ```
//!
//! The plan supports the field types a table contract uses: primitives, `decimal` (bytes),
//! `timestamp-micros`/`-millis`, `local-timestamp-micros`, `date`, `uuid` (string), enums,
//! and `["null", T]` unions. Contract rules Avro cannot express travel as field attributes:
//! `walcache.min` / `walcache.max` (inclusive bounds; numbers, or strings for decimals).

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, UuidSchema};
use serde_json::{Map, Value as Json};

use crate::SchemaError;
use crate::binary::{self, Reader};
use crate::position::micros_to_rfc3339;

/// The Avro type of a field (inside its optional null union).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldKind {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Bytes,
    Decimal { precision: u32, scale: u32 },
    TimestampMicros,
    TimestampMillis,
    LocalTimestampMicros,
    Date,
    Uuid,
    Enum { symbols: Vec<String> },
}

impl FieldKind {
    /// A short name for messages ("decimal(3,2)", "enum", ...).
    pub fn describe(&self) -> String {
        match self {
            FieldKind::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            FieldKind::Enum { symbols } => format!("enum [{}]", symbols.join(", ")),
            other => format!("{other:?}").to_lowercase(),
        }
    }
}

/// An inclusive bound from `walcache.min` / `walcache.max`.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// For int, long, float and double fields.
    Number(f64),
    /// For decimal fields: the unscaled value at the field's scale.
    Unscaled(i128),
}

/// Branch indexes of a `["null", T]` (or `[T, "null"]`) union.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullUnion {
    pub null_index: i64,
    pub value_index: i64,
}

/// One field of a record, compiled.
#[derive(Debug, Clone)]
pub struct FieldPlan {
    pub name: String,
    pub kind: FieldKind,
    /// Set when the field is a union with null.
    pub nullable: Option<NullUnion>,
    pub min: Option<Bound>,
    pub max: Option<Bound>,
    /// Bound text as written in the schema, for messages.
    pub(crate) min_text: Option<String>,
    pub(crate) max_text: Option<String>,
}

/// A compiled record schema.
#[derive(Debug, Clone)]
pub struct RowPlan {
    /// Full name of the record (namespace.name).
    pub name: String,
    pub fields: Vec<FieldPlan>,
    by_name: HashMap<String, usize>,
}

impl RowPlan {
    /// Compiles a record schema. `file` names the schema in errors.
    pub fn from_record(schema: &Schema, file: &str) -> Result<Self, SchemaError> {
        let invalid = |reason: String| SchemaError::InvalidSchema { file: file.to_string(), reason };
        let Schema::Record(record) = schema else {
            return Err(invalid("a table contract must be an Avro record".into()));
        };
        let mut named: HashMap<String, FieldKind> = HashMap::new();
        let mut fields = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let (inner, nullable) = match &field.schema {
                Schema::Union(union) => {
                    let variants = union.variants();
                    match variants {
                        [Schema::Null, inner] => (inner, Some(NullUnion { null_index: 0, value_index: 1 })),
                        [inner, Schema::Null] => (inner, Some(NullUnion { null_index: 1, value_index: 0 })),
                        _ => {
                            return Err(invalid(format!(
                                "field {}: only unions of null and one type are supported",
                                field.name
                            )));
                        }
                    }
                }
                other => (other, None),
            };
            let kind =
                field_kind(inner, &mut named).map_err(|reason| invalid(format!("field {}: {reason}", field.name)))?;
            let bound = |attr: &str| -> Result<(Option<Bound>, Option<String>), SchemaError> {
                let Some(raw) = field.custom_attributes.get(attr) else {
                    return Ok((None, None));
                };
                let text = match raw {
                    Json::String(s) => s.clone(),
                    Json::Number(n) => n.to_string(),
                    _ => {
                        return Err(invalid(format!("field {}: {attr} must be a number or a string", field.name)));
                    }
                };
                let parsed = match &kind {
                    FieldKind::Decimal { precision, scale } => {
                        crate::text::parse_decimal(text.as_bytes(), *precision, *scale).map(Bound::Unscaled).ok()
                    }
                    FieldKind::Int | FieldKind::Long | FieldKind::Float | FieldKind::Double => {
                        text.parse::<f64>().ok().map(Bound::Number)
                    }
                    other => {
                        return Err(invalid(format!(
                            "field {}: {attr} is not supported on {}",
                            field.name,
                            other.describe()
                        )));
                    }
                };
                match parsed {
                    Some(b) => Ok((Some(b), Some(text))),
                    None => {
                        Err(invalid(format!("field {}: {attr} {text:?} does not fit the field's type", field.name)))
                    }
                }
            };
            let (min, min_text) = bound("walcache.min")?;
            let (max, max_text) = bound("walcache.max")?;
            fields.push(FieldPlan { name: field.name.clone(), kind, nullable, min, max, min_text, max_text });
        }
        let by_name = fields.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
        Ok(RowPlan { name: record.name.to_string(), fields, by_name })
    }

    /// The index of a field by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Advances `r` past one encoded row.
    pub fn skip(&self, r: &mut Reader<'_>) -> Result<(), SchemaError> {
        for field in &self.fields {
            field.skip(r)?;
        }
        Ok(())
    }

    /// The encoded bytes of each field of one encoded row, in schema order (union branch
    /// included). Used to compare a row's key fields with a message key without decoding.
    pub fn field_slices<'a>(&self, row: &'a [u8]) -> Result<Vec<&'a [u8]>, SchemaError> {
        let mut r = Reader::new(row);
        let mut out = Vec::with_capacity(self.fields.len());
        for field in &self.fields {
            let start = r.buf;
            field.skip(&mut r)?;
            out.push(&start[..start.len() - r.buf.len()]);
        }
        if !r.buf.is_empty() {
            return Err(SchemaError::malformed("bytes left after the row"));
        }
        Ok(out)
    }

    /// Decodes one encoded row to a JSON object (the query API's representation).
    pub fn read_json(&self, r: &mut Reader<'_>) -> Result<Map<String, Json>, SchemaError> {
        let mut out = Map::with_capacity(self.fields.len());
        for field in &self.fields {
            out.insert(field.name.clone(), field.read_json(r)?);
        }
        Ok(out)
    }

    /// Decodes a whole encoded row (and nothing after it) to JSON.
    pub fn row_to_json(&self, row: &[u8]) -> Result<Map<String, Json>, SchemaError> {
        let mut r = Reader::new(row);
        let out = self.read_json(&mut r)?;
        if !r.buf.is_empty() {
            return Err(SchemaError::malformed("bytes left after the row"));
        }
        Ok(out)
    }
}

fn field_kind(schema: &Schema, named: &mut HashMap<String, FieldKind>) -> Result<FieldKind, String> {
    Ok(match schema {
        Schema::Boolean => FieldKind::Boolean,
        Schema::Int => FieldKind::Int,
        Schema::Long => FieldKind::Long,
        Schema::Float => FieldKind::Float,
        Schema::Double => FieldKind::Double,
        Schema::String => FieldKind::String,
        Schema::Bytes => FieldKind::Bytes,
        Schema::Decimal(d) => {
            if !matches!(d.inner, InnerDecimalSchema::Bytes) {
                return Err("decimal must be backed by bytes".into());
            }
            if d.precision > 38 {
                return Err("decimal precision above 38 is not supported".into());
            }
            FieldKind::Decimal { precision: d.precision as u32, scale: d.scale as u32 }
        }
        Schema::TimestampMicros => FieldKind::TimestampMicros,
        Schema::TimestampMillis => FieldKind::TimestampMillis,
        Schema::LocalTimestampMicros => FieldKind::LocalTimestampMicros,
        Schema::Date => FieldKind::Date,
        Schema::Uuid(UuidSchema::String) => FieldKind::Uuid,
        Schema::Enum(e) => {
            let kind = FieldKind::Enum { symbols: e.symbols.clone() };
            named.insert(e.name.to_string(), kind.clone());
            kind
        }
        Schema::Ref { name } => named
            .get(&name.to_string())
            .cloned()
            .ok_or_else(|| format!("reference to {name} which is not an enum defined earlier in the record"))?,
        other => {
            return Err(format!("type {other:?} is not supported in a table contract"));
        }
    })
}

impl FieldPlan {
    /// Writes the null branch, or reports that the contract forbids null here.
    #[inline]
    pub fn write_null(&self, out: &mut Vec<u8>) -> Result<(), crate::Violation> {
        match self.nullable {
            Some(u) => {
                binary::write_long(out, u.null_index);
                Ok(())
            }
            None => Err(crate::Violation::Null { field: self.name.clone() }),
        }
    }

    /// Writes the union branch for a present value (nothing for a non-null field).
    #[inline]
    pub(crate) fn write_value_branch(&self, out: &mut Vec<u8>) {
        if let Some(u) = self.nullable {
            binary::write_long(out, u.value_index);
        }
    }

    fn skip(&self, r: &mut Reader<'_>) -> Result<(), SchemaError> {
        if let Some(u) = self.nullable {
            let branch = r.read_long()?;
            if branch == u.null_index {
                return Ok(());
            }
            if branch != u.value_index {
                return Err(SchemaError::malformed(format!("field {}: union branch {branch}", self.name)));
            }
        }
        match &self.kind {
            FieldKind::Boolean => {
                r.read_bool()?;
            }
            FieldKind::Int
            | FieldKind::Long
            | FieldKind::TimestampMicros
            | FieldKind::TimestampMillis
            | FieldKind::LocalTimestampMicros
            | FieldKind::Date
            | FieldKind::Enum { .. } => {
                r.read_long()?;
            }
            FieldKind::Float => {
                r.read_fixed::<4>()?;
            }
            FieldKind::Double => {
                r.read_fixed::<8>()?;
            }
            FieldKind::String | FieldKind::Bytes | FieldKind::Decimal { .. } | FieldKind::Uuid => {
                r.read_bytes()?;
            }
        }
        Ok(())
    }

    fn read_json(&self, r: &mut Reader<'_>) -> Result<Json, SchemaError> {
        if let Some(u) = self.nullable {
            let branch = r.read_long()?;
            if branch == u.null_index {
                return Ok(Json::Null);
            }
            if branch != u.value_index {
                return Err(SchemaError::malformed(format!("field {}: union branch {branch}", self.name)));
            }
        }
        Ok(match &self.kind {
            FieldKind::Boolean => Json::Bool(r.read_bool()?),
            FieldKind::Int => Json::from(r.read_int()?),
            FieldKind::Long => Json::from(r.read_long()?),
            FieldKind::Float => float_json(f64::from(f32::from_le_bytes(r.read_fixed::<4>()?))),
            FieldKind::Double => float_json(f64::from_le_bytes(r.read_fixed::<8>()?)),
            FieldKind::String | FieldKind::Uuid => Json::String(r.read_str()?.to_string()),
            FieldKind::Bytes => {
                use base64::Engine;
                Json::String(base64::engine::general_purpose::STANDARD.encode(r.read_bytes()?))
            }
            FieldKind::Decimal { scale, .. } => Json::String(binary::format_decimal(r.read_decimal()?, *scale)),
            FieldKind::TimestampMicros => Json::String(micros_to_rfc3339(r.read_long()?)),
            FieldKind::TimestampMillis => Json::String(micros_to_rfc3339(r.read_long()?.saturating_mul(1000))),
            FieldKind::LocalTimestampMicros => {
                let text = micros_to_rfc3339(r.read_long()?);
                Json::String(text.trim_end_matches('Z').to_string())
            }
            FieldKind::Date => {
                let days = r.read_int()?;
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::days(i64::from(days))));
                match date {
                    Some(d) => Json::String(d.format("%Y-%m-%d").to_string()),
                    None => return Err(SchemaError::malformed("date out of range")),
                }
            }
            FieldKind::Enum { symbols } => {
                let index = r.read_long()?;
                let symbol = usize::try_from(index).ok().and_then(|i| symbols.get(i));
                match symbol {
                    Some(s) => Json::String(s.clone()),
                    None => {
                        return Err(SchemaError::malformed(format!("field {}: enum index {index}", self.name)));
                    }
                }
            }
        })
    }
}

/// JSON has no NaN or infinities; they are rendered as strings so nothing is lost.
fn float_json(v: f64) -> Json {
    serde_json::Number::from_f64(v).map_or_else(|| Json::String(v.to_string()), Json::Number)
}
