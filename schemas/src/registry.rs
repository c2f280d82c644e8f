//! The contracts this build knows: every `.avsc` under `schemas/avro`, embedded at compile time.
//!
//! ```text
//!  avro/<contract>/key.v1.avsc      one key schema per contract, never evolved (it picks the partition)
//!  avro/<contract>/value.vN.avsc    envelope versions; writers use the newest, readers resolve older ones
//!  avro/watermark.v1.avsc           producer progress records
//! ```
//!
//! Readers find a message's writer schema by its Rabin fingerprint; a fingerprint no contract
//! has is a definite error ([`SchemaError::UnknownSchema`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use apache_avro::Schema;
use apache_avro::rabin::Rabin;

use crate::SchemaError;
use crate::envelope::{EnvelopeRef, read_envelope, row_schema_of};
use crate::framing::{self, HEADER_LEN};
use crate::plan::RowPlan;
use crate::text::Violation;

/// One embedded schema file, parsed.
#[derive(Debug)]
pub struct SchemaDoc {
    /// Path under `schemas/avro`.
    pub file: &'static str,
    /// The `.avsc` text as written.
    pub text: &'static str,
    pub schema: Schema,
    /// CRC-64-AVRO (Rabin) fingerprint of the canonical form.
    pub fingerprint: u64,
    /// The single-object header carrying the fingerprint.
    pub header: [u8; HEADER_LEN],
}

impl SchemaDoc {
    fn parse(file: &'static str, text: &'static str) -> Result<Self, SchemaError> {
        let schema = Schema::parse_str(text)
            .map_err(|e| SchemaError::InvalidSchema { file: file.to_string(), reason: e.to_string() })?;
        let fp = schema.fingerprint::<Rabin>();
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&fp.bytes[..8]);
        let fingerprint = u64::from_le_bytes(bytes);
        Ok(SchemaDoc { file, text, schema, fingerprint, header: framing::header(fingerprint) })
    }
}

/// One version of a contract's value (envelope) schema.
#[derive(Debug)]
pub struct ValueVersion {
    pub version: u32,
    pub doc: SchemaDoc,
    /// The row record inside the envelope, standalone (for schema resolution).
    pub row_schema: Schema,
    pub row: Arc<RowPlan>,
}

/// A table contract: its key schema and every version of its value schema.
#[derive(Debug)]
pub struct Contract {
    /// Contract name, as configured (`courier_performance`).
    pub name: &'static str,
    pub key: SchemaDoc,
    pub key_plan: RowPlan,
    /// Oldest first.
    pub versions: Vec<ValueVersion>,
}

impl Contract {
    /// The newest value version: what writers use.
    pub fn latest(&self) -> &ValueVersion {
        // Non-empty: the registry refuses a contract without versions.
        &self.versions[self.versions.len() - 1]
    }

    pub fn version(&self, version: u32) -> Option<&ValueVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// Encodes a key body (no header) from one text value per key field, in key order.
    pub fn key_from_text(&self, values: &[&str]) -> Result<Vec<u8>, Violation> {
        if values.len() != self.key_plan.fields.len() {
            return Err(Violation::MissingKey {
                field: self.key_plan.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(","),
            });
        }
        let mut out = Vec::with_capacity(16);
        for (field, value) in self.key_plan.fields.iter().zip(values) {
            field.write_text(&mut out, value.as_bytes())?;
        }
        Ok(out)
    }

    /// Encodes a key body from JSON: a scalar for a one-field key, or an object by field name.
    pub fn key_from_json(&self, value: &serde_json::Value) -> Result<Vec<u8>, Violation> {
        let mut out = Vec::with_capacity(16);
        match (value, self.key_plan.fields.as_slice()) {
            (serde_json::Value::Object(map), fields) => {
                for field in fields {
                    let v = map.get(&field.name).ok_or_else(|| Violation::MissingKey { field: field.name.clone() })?;
                    field.write_json(&mut out, v)?;
                }
            }
            (scalar, [field]) => field.write_json(&mut out, scalar)?,
            (_, fields) => {
                return Err(Violation::MissingKey {
                    field: fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(","),
                });
            }
        }
        Ok(out)
    }

    /// Whether a key body is the key of `row` (written with `version`). Key fields are
    /// non-null row fields of the same type (checked at load), so their encodings are equal.
    pub fn key_matches_row(&self, version: &ValueVersion, key_body: &[u8], row: &[u8]) -> Result<bool, SchemaError> {
        let slices = version.row.field_slices(row)?;
        let mut expected = Vec::with_capacity(key_body.len());
        for kf in &self.key_plan.fields {
            let i =
                version.row.index_of(&kf.name).ok_or_else(|| SchemaError::malformed("key field missing from row"))?;
            expected.extend_from_slice(slices[i]);
        }
        Ok(expected == key_body)
    }

    /// A complete key message (header + body).
    pub fn key_message(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&self.key.header);
        out.extend_from_slice(body);
        out
    }

    /// Re-encodes a row written with version `from` as version `to`, by Avro schema resolution
    /// (new fields take their defaults, removed fields are dropped).
    pub fn resolve_row(&self, from: &ValueVersion, to: &ValueVersion, row: &[u8]) -> Result<Vec<u8>, SchemaError> {
        if from.version == to.version {
            return Ok(row.to_vec());
        }
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&from.row_schema)
            .reader_schema(&to.row_schema)
            .build()?;
        let value = reader.read_value(&mut &row[..])?;
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&to.row_schema).build()?;
        Ok(writer.write_value_to_vec(value)?)
    }
}

/// What a fingerprint identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Key,
    Value { version: u32 },
    Watermark,
}

/// A decoded change message: its contract, writer version and envelope (rows still encoded).
#[derive(Debug, Clone, Copy)]
pub struct DecodedValue<'a> {
    pub contract: &'a Contract,
    pub version: &'a ValueVersion,
    pub envelope: EnvelopeRef<'a>,
}

/// Every embedded contract, indexed by name and fingerprint.
#[derive(Debug)]
pub struct Registry {
    contracts: Vec<Contract>,
    by_fingerprint: HashMap<u64, (Option<usize>, Role)>,
    pub watermark: SchemaDoc,
}

struct ContractFiles {
    name: &'static str,
    key: (&'static str, &'static str),
    values: &'static [(u32, &'static str, &'static str)],
}

macro_rules! avsc {
    ($path:literal) => {
        ($path, include_str!(concat!("../avro/", $path)))
    };
    ($version:literal, $path:literal) => {
        ($version, $path, include_str!(concat!("../avro/", $path)))
    };
}

const CONTRACTS: &[ContractFiles] = &[ContractFiles {
    name: "courier_performance",
    key: avsc!("courier_performance/key.v1.avsc"),
    values: &[avsc!(1, "courier_performance/value.v1.avsc"), avsc!(2, "courier_performance/value.v2.avsc")],
}];
const WATERMARK: (&str, &str) = avsc!("watermark.v1.avsc");

static BUILTIN: LazyLock<Result<Registry, String>> = LazyLock::new(|| Registry::load().map_err(|e| e.to_string()));

impl Registry {
    /// The registry of embedded contracts, loaded once.
    pub fn builtin() -> Result<&'static Registry, SchemaError> {
        BUILTIN
            .as_ref()
            .map_err(|reason| SchemaError::InvalidSchema { file: "embedded schemas".into(), reason: reason.clone() })
    }

    fn load() -> Result<Registry, SchemaError> {
        let mut contracts = Vec::new();
        let mut by_fingerprint = HashMap::new();
        for files in CONTRACTS {
            let key = SchemaDoc::parse(files.key.0, files.key.1)?;
            let key_plan = RowPlan::from_record(&key.schema, key.file)?;
            let mut versions = Vec::new();
            for &(version, file, text) in files.values {
                let doc = SchemaDoc::parse(file, text)?;
                let row_schema = row_schema_of(&doc.schema, file)?;
                let row = Arc::new(RowPlan::from_record(&row_schema, file)?);
                for kf in &key_plan.fields {
                    match row.index_of(&kf.name) {
                        Some(i) if row.fields[i].kind == kf.kind && row.fields[i].nullable.is_none() => {}
                        _ => {
                            return Err(SchemaError::InvalidSchema {
                                file: file.to_string(),
                                reason: format!("key field {} must be a non-null row field of the same type", kf.name),
                            });
                        }
                    }
                }
                versions.push(ValueVersion { version, doc, row_schema, row });
            }
            if versions.is_empty() {
                return Err(SchemaError::InvalidSchema {
                    file: files.name.to_string(),
                    reason: "a contract needs at least one value version".into(),
                });
            }
            let index = contracts.len();
            by_fingerprint.insert(key.fingerprint, (Some(index), Role::Key));
            for v in &versions {
                by_fingerprint.insert(v.doc.fingerprint, (Some(index), Role::Value { version: v.version }));
            }
            contracts.push(Contract { name: files.name, key, key_plan, versions });
        }
        let watermark = SchemaDoc::parse(WATERMARK.0, WATERMARK.1)?;
        by_fingerprint.insert(watermark.fingerprint, (None, Role::Watermark));
        Ok(Registry { contracts, by_fingerprint, watermark })
    }

    pub fn contracts(&self) -> &[Contract] {
        &self.contracts
    }

    pub fn contract(&self, name: &str) -> Result<&Contract, SchemaError> {
        self.contracts.iter().find(|c| c.name == name).ok_or_else(|| SchemaError::UnknownContract {
            name: name.to_string(),
            known: self.contracts.iter().map(|c| c.name).collect::<Vec<_>>().join(", "),
        })
    }

    /// What a fingerprint identifies.
    pub fn lookup(&self, fingerprint: u64) -> Result<(Option<&Contract>, Role), SchemaError> {
        let (index, role) = self.by_fingerprint.get(&fingerprint).ok_or(SchemaError::UnknownSchema { fingerprint })?;
        Ok((index.map(|i| &self.contracts[i]), *role))
    }

    /// Decodes a change message of `expected` contract.
    pub fn decode_value<'a>(&'a self, expected: &Contract, message: &'a [u8]) -> Result<DecodedValue<'a>, SchemaError> {
        let (fingerprint, body) = framing::split(message)?;
        let (contract, role) = self.lookup(fingerprint)?;
        let (contract, version) = match (contract, role) {
            (Some(c), Role::Value { version }) if c.name == expected.name => (c, version),
            (found, role) => {
                return Err(SchemaError::WrongSchema {
                    fingerprint,
                    found: describe(found, role),
                    expected: format!("a value of {}", expected.name),
                });
            }
        };
        let version = contract.version(version).ok_or(SchemaError::UnknownSchema { fingerprint })?;
        let envelope = read_envelope(&version.row, body)?;
        Ok(DecodedValue { contract, version, envelope })
    }

    /// Checks a key message of `expected` contract and returns its body.
    pub fn decode_key<'a>(&self, expected: &Contract, message: &'a [u8]) -> Result<&'a [u8], SchemaError> {
        let (fingerprint, body) = framing::split(message)?;
        if fingerprint != expected.key.fingerprint {
            let found = self.lookup(fingerprint).map(|(c, r)| describe(c, r))?;
            return Err(SchemaError::WrongSchema {
                fingerprint,
                found,
                expected: format!("a key of {}", expected.name),
            });
        }
        let mut r = crate::binary::Reader::new(body);
        expected.key_plan.skip(&mut r)?;
        if !r.buf.is_empty() {
            return Err(SchemaError::malformed("bytes left after the key"));
        }
        Ok(body)
    }
}

fn describe(contract: Option<&Contract>, role: Role) -> String {
    match (contract, role) {
        (Some(c), Role::Key) => format!("the key of {}", c.name),
        (Some(c), Role::Value { version }) => format!("value v{version} of {}", c.name),
        (_, Role::Watermark) => "a watermark".into(),
        (None, _) => "unknown".into(),
    }
}
