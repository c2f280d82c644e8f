//! The contracts as data: our hand-written encoder agrees with apache-avro, every version reads
//! the previous one's data and vice versa, and bad input fails with the right reason.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::types::Value;
use walcache_schemas::{
    CourierPerformance, Lsn, Op, Position, Registry, SchemaError, ValueVersion, Violation, framing, write_envelope,
};

/// Postgres text values for one row of `version`'s row schema, by field name.
fn sample_text(field: &str, courier_id: i64) -> Option<String> {
    Some(match field {
        "courier_id" => courier_id.to_string(),
        "city" => "Lisbon".into(),
        "zone" => "Alfama".into(),
        "tier" => "gold".into(),
        "rating" => "4.87".into(),
        "deliveries" => "1234".into(),
        "on_time_rate" => "0.93".into(),
        "acceptance_rate" => return None,
        "cancellations" => "3".into(),
        "active" => "t".into(),
        "notes" => "prefers morning shifts".into(),
        "updated_at" => "2026-11-22 03:47:00.123456+00".into(),
        other => panic!("sample has no value for field {other}"),
    })
}

fn encode_row(version: &ValueVersion, courier_id: i64) -> Vec<u8> {
    let mut out = Vec::new();
    for field in &version.row.fields {
        match sample_text(&field.name, courier_id) {
            Some(text) => field.write_text(&mut out, text.as_bytes()).expect("sample fits the contract"),
            None => field.write_null(&mut out).expect("nullable"),
        }
    }
    out
}

fn message(version: &ValueVersion, op: Op, row: &[u8], pos: &Position) -> Vec<u8> {
    let mut out = Vec::new();
    write_envelope(&mut out, &version.doc.header, op, None, Some(row), pos, "public.courier_performance");
    out
}

fn field<'a>(record: &'a Value, name: &str) -> &'a Value {
    let Value::Record(fields) = record else { panic!("not a record: {record:?}") };
    &fields.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no field {name}")).1
}

#[test]
fn our_encoder_agrees_with_apache_avro_for_every_version() {
    let registry = Registry::builtin().expect("embedded schemas load");
    let contract = registry.contract("courier_performance").expect("contract");
    let pos = Position {
        lsn: Lsn(0x16_B374_D848),
        index: 3,
        txid: 771,
        commit_ts_micros: 1_795_319_220_000_000,
        snapshot: false,
    };
    for version in &contract.versions {
        let row = encode_row(version, 42);
        let msg = message(version, Op::Update, &row, &pos);
        let (fp, body) = framing::split(&msg).expect("framed");
        assert_eq!(fp, version.doc.fingerprint);
        let reader = GenericDatumReader::builder(&version.doc.schema).build().expect("reader");
        let value = reader.read_value(&mut &body[..]).expect("apache-avro decodes our bytes");
        assert_eq!(field(&value, "op"), &Value::Enum(2, "update".into()));
        assert_eq!(field(&value, "before"), &Value::Union(0, Box::new(Value::Null)));
        let Value::Union(1, after) = field(&value, "after") else { panic!("after is set") };
        assert_eq!(field(after, "courier_id"), &Value::Long(42));
        assert_eq!(field(after, "tier"), &Value::Enum(2, "gold".into()));
        assert_eq!(field(after, "updated_at"), &Value::TimestampMicros(1_795_319_220_123_456));
        let Value::Decimal(rating) = field(after, "rating") else { panic!("rating is a decimal") };
        let rating_bytes: Vec<u8> = rating.try_into().expect("decimal bytes");
        assert_eq!(rating_bytes, 487i16.to_be_bytes().to_vec());
        let source = field(&value, "source");
        assert_eq!(field(source, "lsn"), &Value::Long(0x16_B374_D848));
        assert_eq!(field(source, "txid"), &Value::Long(771));

        // And our reader agrees with our writer.
        let decoded = registry.decode_value(contract, &msg).expect("decodes");
        assert_eq!(decoded.version.version, version.version);
        assert_eq!(decoded.envelope.op, Op::Update);
        assert_eq!(decoded.envelope.position, pos);
        assert_eq!(decoded.envelope.after, Some(&row[..]));
        let json = version.row.row_to_json(&row).expect("json");
        assert_eq!(json["rating"], "4.87");
        assert_eq!(json["updated_at"], "2026-11-22T03:47:00.123456Z");
        assert_eq!(json["acceptance_rate"], serde_json::Value::Null);
    }
}

#[test]
fn every_version_reads_the_previous_versions_data_and_vice_versa() {
    let registry = Registry::builtin().expect("embedded schemas load");
    for contract in registry.contracts() {
        assert!(contract.versions.len() >= 2, "{} should show an evolution", contract.name);
        for pair in contract.versions.windows(2) {
            let (old, new) = (&pair[0], &pair[1]);
            let compat = SchemaCompatibility::mutual_read(&old.doc.schema, &new.doc.schema)
                .unwrap_or_else(|e| panic!("{} v{} <-> v{}: {e}", contract.name, old.version, new.version));
            assert_eq!(compat, Compatibility::Full, "{} v{} <-> v{}", contract.name, old.version, new.version);

            // Old data, new reader: new fields take their defaults.
            let old_row = encode_row(old, 7);
            let as_new = contract.resolve_row(old, new, &old_row).expect("new reads old");
            let json = new.row.row_to_json(&as_new).expect("resolved row decodes with the new plan");
            assert_eq!(json["courier_id"], 7);
            for f in &new.row.fields {
                if old.row.index_of(&f.name).is_none() {
                    assert_eq!(json[&f.name], serde_json::Value::Null, "added field {} defaults to null", f.name);
                }
            }
            // New data, old reader: added fields are dropped, the rest survives.
            let new_row = encode_row(new, 8);
            let as_old = contract.resolve_row(new, old, &new_row).expect("old reads new");
            let json_old = old.row.row_to_json(&as_old).expect("decodes");
            let json_new = new.row.row_to_json(&new_row).expect("decodes");
            for f in &old.row.fields {
                assert_eq!(json_old[&f.name], json_new[&f.name], "field {}", f.name);
            }
            // Typed client code reads both.
            let typed_old: CourierPerformance = serde_json::from_value(json.into()).expect("typed v(old)");
            assert_eq!(typed_old.zone, None);
            let typed_new: CourierPerformance = serde_json::from_value(json_new.into()).expect("typed v(new)");
            assert_eq!(typed_new.courier_id, 8);
        }
        // The key never evolves: one key schema per contract.
        assert!(contract.key.file.ends_with("key.v1.avsc"));
    }
}

#[test]
fn an_unknown_schema_id_is_a_clear_error() {
    let registry = Registry::builtin().expect("embedded schemas load");
    let contract = registry.contract("courier_performance").expect("contract");
    let mut msg = framing::header(0xDEAD_BEEF_0000_0001).to_vec();
    msg.extend_from_slice(&[0, 0, 0]);
    let err = registry.decode_value(contract, &msg).expect_err("unknown fingerprint");
    assert!(matches!(err, SchemaError::UnknownSchema { fingerprint: 0xDEAD_BEEF_0000_0001 }));
    assert!(err.to_string().contains("unknown schema fingerprint deadbeef00000001"), "{err}");

    let err = registry.decode_value(contract, b"not avro at all").expect_err("garbage");
    assert!(matches!(err, SchemaError::NotSingleObject));

    let key = contract.key_message(&contract.key_from_text(&["5"]).expect("key"));
    let err = registry.decode_value(contract, &key).expect_err("a key is not a value");
    assert!(matches!(err, SchemaError::WrongSchema { .. }), "{err}");

    // A known fingerprint with a truncated body is malformed, not a panic.
    let latest = contract.latest();
    let row = encode_row(latest, 1);
    let msg = message(latest, Op::Insert, &row, &Position::default());
    for cut in [framing::HEADER_LEN + 1, msg.len() / 2, msg.len() - 1] {
        assert!(registry.decode_value(contract, &msg[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn rows_that_break_the_contract_say_why() {
    let registry = Registry::builtin().expect("embedded schemas load");
    let row = &registry.contract("courier_performance").expect("contract").latest().row;
    let f = |name: &str| &row.fields[row.index_of(name).expect("field")];
    let mut out = Vec::new();
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("rating", None, "null_in_required_field"),
        ("rating", Some("7.50"), "out_of_range"),
        ("rating", Some("-0.01"), "out_of_range"),
        ("rating", Some("4.875"), "out_of_range"),
        ("rating", Some("four"), "unparseable"),
        ("tier", Some("diamond"), "bad_enum"),
        ("deliveries", Some("-1"), "out_of_range"),
        ("deliveries", Some("3000000000"), "out_of_range"),
        ("on_time_rate", Some("1.5"), "out_of_range"),
        ("on_time_rate", Some("NaN"), "out_of_range"),
        ("updated_at", Some("infinity"), "out_of_range"),
        ("updated_at", Some("yesterday"), "unparseable"),
        ("active", Some("maybe"), "unparseable"),
    ];
    for (name, value, code) in cases {
        out.clear();
        let result = match value {
            Some(v) => f(name).write_text(&mut out, v.as_bytes()),
            None => f(name).write_null(&mut out),
        };
        let violation: Violation = result.expect_err("breaks the contract");
        assert_eq!(violation.code(), code, "{name} = {value:?}: {violation}");
        assert_eq!(violation.field(), name);
        if let Some(v) = value {
            assert!(!violation.to_string().contains(v), "the reason must not carry the value: {violation}");
        }
    }
    // Nullable fields take null, bounds are inclusive.
    f("acceptance_rate").write_null(&mut out).expect("nullable");
    f("rating").write_text(&mut out, b"5.00").expect("max is inclusive");
    f("rating").write_text(&mut out, b"0").expect("min is inclusive");
}

#[test]
fn watermarks_round_trip() {
    use walcache_schemas::{PartitionOffset, ProducerState, Watermark};
    let registry = Registry::builtin().expect("embedded schemas load");
    let wm = Watermark {
        producer: "walcache".into(),
        lsn: Lsn(99),
        commit_ts_micros: 1_795_319_220_000_000,
        emitted_at_micros: 1_795_319_220_000_100,
        state: ProducerState::Streaming,
        offsets: vec![PartitionOffset {
            topic: "incentives.public.courier_performance".into(),
            partition: 3,
            offset: 1200,
        }],
    };
    let bytes = wm.encode(registry).expect("encode");
    assert_eq!(Watermark::decode(registry, &bytes).expect("decode"), wm);
}

#[test]
fn keys_from_text_and_json_agree() {
    let registry = Registry::builtin().expect("embedded schemas load");
    let contract = registry.contract("courier_performance").expect("contract");
    let a = contract.key_from_text(&["42"]).expect("text");
    let b = contract.key_from_json(&serde_json::json!(42)).expect("json number");
    let c = contract.key_from_json(&serde_json::json!({"courier_id": "42"})).expect("json object");
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(contract.key_from_text(&["x"]).expect_err("bad").code(), "unparseable");
    let msg = contract.key_message(&a);
    assert_eq!(registry.decode_key(contract, &msg).expect("decodes"), &a[..]);
    let latest = contract.latest();
    let row = encode_row(latest, 42);
    assert!(contract.key_matches_row(latest, &a, &row).expect("row walks"));
    let other = contract.key_from_text(&["43"]).expect("key");
    assert!(!contract.key_matches_row(latest, &other, &row).expect("row walks"));
}
