//! Postgres text-format values -> Avro binary, checking the contract on the way.
//!
//! pgoutput (without `binary`) and `COPY ... TO STDOUT` both hand us every column in its text
//! output form. Each [`FieldPlan`] parses that text straight into Avro bytes; a value that does
//! not fit the contract becomes a [`Violation`], which the producer dead-letters with its reason.
//! The same parser reads keys typed by people (URLs, CLI arguments), so "42" means the same
//! everywhere.

use std::fmt;

use serde_json::Value as Json;

use crate::binary;
use crate::plan::{Bound, FieldKind, FieldPlan};

/// Why a row breaks its contract. `Display` never includes the offending value: reasons are
/// logged and counted, while the row itself goes only to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// NULL (or a missing value) in a field the contract requires.
    Null { field: String },
    /// The text does not parse as the field's type.
    Unparseable { field: String, expected: String },
    /// The value parses but breaks a bound, a precision or a range.
    OutOfRange { field: String, rule: String },
    /// The value is not one of the enum's symbols.
    BadEnum { field: String, symbols: String },
    /// An update left a TOASTed value unchanged, so the stream does not carry it.
    UnchangedToast { field: String },
    /// The table has no column for a field of the contract (dropped or renamed).
    MissingColumn { field: String },
    /// The key columns of the row are incomplete, so the row cannot be placed.
    MissingKey { field: String },
}

impl Violation {
    /// Every [`Violation::code`], so metrics can start each at zero (a counter that appears at
    /// its first increment is invisible to `increase()` in alert rules).
    pub const CODES: &'static [&'static str] = &[
        "null_in_required_field",
        "unparseable",
        "out_of_range",
        "bad_enum",
        "unchanged_toast",
        "missing_column",
        "missing_key",
    ];

    /// A stable, low-cardinality code for metrics and the dead-letter record.
    pub fn code(&self) -> &'static str {
        match self {
            Violation::Null { .. } => "null_in_required_field",
            Violation::Unparseable { .. } => "unparseable",
            Violation::OutOfRange { .. } => "out_of_range",
            Violation::BadEnum { .. } => "bad_enum",
            Violation::UnchangedToast { .. } => "unchanged_toast",
            Violation::MissingColumn { .. } => "missing_column",
            Violation::MissingKey { .. } => "missing_key",
        }
    }

    /// The contract field the violation is about.
    pub fn field(&self) -> &str {
        match self {
            Violation::Null { field }
            | Violation::Unparseable { field, .. }
            | Violation::OutOfRange { field, .. }
            | Violation::BadEnum { field, .. }
            | Violation::UnchangedToast { field }
            | Violation::MissingColumn { field }
            | Violation::MissingKey { field } => field,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Null { field } => {
                write!(f, "{field} is NULL but the contract requires a value")
            }
            Violation::Unparseable { field, expected } => {
                write!(f, "{field} does not parse as {expected}")
            }
            Violation::OutOfRange { field, rule } => write!(f, "{field} is {rule}"),
            Violation::BadEnum { field, symbols } => {
                write!(f, "{field} is not one of the contract's symbols [{symbols}]")
            }
            Violation::UnchangedToast { field } => write!(
                f,
                "{field} is an unchanged TOASTed value that the update does not carry, and the row \
                 had changed again before it could be re-read; set REPLICA IDENTITY FULL on the table \
                 so updates carry every column"
            ),
            Violation::MissingColumn { field } => {
                write!(f, "the table has no column {field}, which the contract requires (dropped or renamed?)")
            }
            Violation::MissingKey { field } => {
                write!(f, "key column {field} is missing, so the row has no key")
            }
        }
    }
}

impl std::error::Error for Violation {}

impl FieldPlan {
    /// Appends the Avro encoding of a Postgres text value. On `Err`, `out` holds a partial row
    /// and must be discarded.
    pub fn write_text(&self, out: &mut Vec<u8>, text: &[u8]) -> Result<(), Violation> {
        self.write_value_branch(out);
        let unparseable = || Violation::Unparseable { field: self.name.clone(), expected: self.kind.describe() };
        match &self.kind {
            FieldKind::Boolean => {
                let v = match text {
                    b"t" | b"true" | b"TRUE" | b"True" => true,
                    b"f" | b"false" | b"FALSE" | b"False" => false,
                    _ => return Err(unparseable()),
                };
                binary::write_bool(out, v);
            }
            FieldKind::Int => {
                let v = parse_i64(text).ok_or_else(unparseable)?;
                let v = i32::try_from(v).map_err(|_| self.out_of_range("outside the 32-bit int range".into()))?;
                self.check_number(f64::from(v))?;
                binary::write_long(out, i64::from(v));
            }
            FieldKind::Long => {
                let v = parse_i64(text).ok_or_else(unparseable)?;
                self.check_number(v as f64)?;
                binary::write_long(out, v);
            }
            FieldKind::Float | FieldKind::Double => {
                let s = std::str::from_utf8(text).map_err(|_| unparseable())?;
                let v: f64 = s.parse().map_err(|_| unparseable())?;
                self.check_number(v)?;
                if self.kind == FieldKind::Float {
                    binary::write_float(out, v as f32);
                } else {
                    binary::write_double(out, v);
                }
            }
            FieldKind::String => {
                std::str::from_utf8(text).map_err(|_| unparseable())?;
                binary::write_bytes(out, text);
            }
            FieldKind::Uuid => {
                if !is_uuid(text) {
                    return Err(unparseable());
                }
                binary::write_bytes(out, text);
            }
            FieldKind::Bytes => {
                let bytes = parse_bytea_hex(text).ok_or_else(unparseable)?;
                binary::write_bytes(out, &bytes);
            }
            FieldKind::Decimal { precision, scale } => {
                let v = parse_decimal(text, *precision, *scale).map_err(|e| match e {
                    DecimalError::Unparseable => unparseable(),
                    DecimalError::Rule(rule) => self.out_of_range(rule),
                })?;
                self.check_unscaled(v)?;
                binary::write_decimal(out, v);
            }
            FieldKind::TimestampMicros | FieldKind::LocalTimestampMicros => {
                let micros = self.timestamp(text)?;
                binary::write_long(out, micros);
            }
            FieldKind::TimestampMillis => {
                let micros = self.timestamp(text)?;
                binary::write_long(out, micros.div_euclid(1000));
            }
            FieldKind::Date => {
                let days = parse_date(text).ok_or_else(|| self.timestamp_error(text))?;
                let days = i32::try_from(days).map_err(|_| self.out_of_range("outside the Avro date range".into()))?;
                binary::write_long(out, i64::from(days));
            }
            FieldKind::Enum { symbols } => {
                let index = symbols
                    .iter()
                    .position(|s| s.as_bytes() == text)
                    .ok_or_else(|| Violation::BadEnum { field: self.name.clone(), symbols: symbols.join(", ") })?;
                binary::write_long(out, index as i64);
            }
        }
        Ok(())
    }

    /// Appends the Avro encoding of a JSON scalar (keys from the query API, typed tests).
    pub fn write_json(&self, out: &mut Vec<u8>, value: &Json) -> Result<(), Violation> {
        match value {
            Json::Null => self.write_null(out),
            Json::Bool(b) => self.write_text(out, if *b { b"t" } else { b"f" }),
            Json::Number(n) => self.write_text(out, n.to_string().as_bytes()),
            Json::String(s) => self.write_text(out, s.as_bytes()),
            Json::Array(_) | Json::Object(_) => {
                Err(Violation::Unparseable { field: self.name.clone(), expected: self.kind.describe() })
            }
        }
    }

    fn timestamp(&self, text: &[u8]) -> Result<i64, Violation> {
        parse_timestamp_micros(text).ok_or_else(|| self.timestamp_error(text))
    }

    fn timestamp_error(&self, text: &[u8]) -> Violation {
        // Postgres prints these for values Avro's long micros cannot hold.
        if text.eq_ignore_ascii_case(b"infinity") || text.eq_ignore_ascii_case(b"-infinity") || text.ends_with(b" BC") {
            self.out_of_range("infinite or before the common era, which the contract cannot represent".into())
        } else {
            Violation::Unparseable { field: self.name.clone(), expected: self.kind.describe() }
        }
    }

    fn out_of_range(&self, rule: String) -> Violation {
        Violation::OutOfRange { field: self.name.clone(), rule }
    }

    fn check_number(&self, v: f64) -> Result<(), Violation> {
        if v.is_nan() && (self.min.is_some() || self.max.is_some()) {
            return Err(self.out_of_range("not a number, so it cannot lie between the contract's bounds".into()));
        }
        if let (Some(Bound::Number(min)), Some(text)) = (&self.min, &self.min_text)
            && v < *min
        {
            return Err(self.out_of_range(format!("below the minimum {text}")));
        }
        if let (Some(Bound::Number(max)), Some(text)) = (&self.max, &self.max_text)
            && v > *max
        {
            return Err(self.out_of_range(format!("above the maximum {text}")));
        }
        Ok(())
    }

    fn check_unscaled(&self, v: i128) -> Result<(), Violation> {
        if let (Some(Bound::Unscaled(min)), Some(text)) = (&self.min, &self.min_text)
            && v < *min
        {
            return Err(self.out_of_range(format!("below the minimum {text}")));
        }
        if let (Some(Bound::Unscaled(max)), Some(text)) = (&self.max, &self.max_text)
            && v > *max
        {
            return Err(self.out_of_range(format!("above the maximum {text}")));
        }
        Ok(())
    }
}

#[inline]
fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut acc: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        acc = acc.checked_mul(10)?;
        acc = if negative { acc.checked_sub(i64::from(b - b'0'))? } else { acc.checked_add(i64::from(b - b'0'))? };
    }
    Some(acc)
}

/// Why a decimal text does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecimalError {
    Unparseable,
    /// Parses, but breaks the precision or scale (the message says how).
    Rule(String),
}

/// Parses a decimal text ("-12.340") into its unscaled value at `scale`, checking that it fits
/// `precision` digits. Extra fractional digits are accepted only when they are zeros: a value
/// is never rounded silently.
pub fn parse_decimal(text: &[u8], precision: u32, scale: u32) -> Result<i128, DecimalError> {
    let (negative, body) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    let (int_part, frac_part) = match body.iter().position(|&b| b == b'.') {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &body[..0]),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.iter().all(u8::is_ascii_digit)
        || !frac_part.iter().all(u8::is_ascii_digit)
    {
        if text.eq_ignore_ascii_case(b"nan")
            || text.eq_ignore_ascii_case(b"infinity")
            || text.eq_ignore_ascii_case(b"-infinity")
        {
            return Err(DecimalError::Rule("not a finite number".into()));
        }
        return Err(DecimalError::Unparseable);
    }
    let scale_us = scale as usize;
    if frac_part.len() > scale_us && frac_part[scale_us..].iter().any(|&b| b != b'0') {
        return Err(DecimalError::Rule(format!("more precise than {scale} decimal places")));
    }
    let overflow = || DecimalError::Rule(format!("more than {precision} significant digits"));
    let mut acc: i128 = 0;
    let mut significant = 0u32;
    let frac_used = &frac_part[..frac_part.len().min(scale_us)];
    let padding = scale_us - frac_used.len();
    for &b in int_part.iter().chain(frac_used.iter()) {
        acc = acc.checked_mul(10).and_then(|a| a.checked_add(i128::from(b - b'0'))).ok_or_else(overflow)?;
        if acc != 0 {
            significant += 1;
        }
    }
    for _ in 0..padding {
        acc = acc.checked_mul(10).ok_or_else(overflow)?;
        if acc != 0 {
            significant += 1;
        }
    }
    if significant > precision {
        return Err(overflow());
    }
    Ok(if negative { -acc } else { acc })
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Reads `n` ASCII digits.
fn digits(text: &[u8], n: usize) -> Option<u32> {
    if text.len() < n {
        return None;
    }
    text[..n].iter().try_fold(0u32, |acc, &b| b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0')))
}

/// Parses `YYYY-MM-DD` (4 or more year digits) and returns (days since epoch, rest).
fn parse_date_prefix(text: &[u8]) -> Option<(i64, &[u8])> {
    let year_len = text.iter().position(|&b| b == b'-')?;
    if year_len < 4 {
        return None;
    }
    let year = i64::from(digits(text, year_len)?);
    let rest = &text[year_len + 1..];
    let month = digits(rest, 2)?;
    if rest.get(2) != Some(&b'-') {
        return None;
    }
    let day = digits(&rest[3..], 2)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some((days_from_civil(year, month, day), &rest[5..]))
}

/// Parses a date (`2026-11-22`) into days since 1970-01-01.
pub fn parse_date(text: &[u8]) -> Option<i64> {
    match parse_date_prefix(text)? {
        (days, []) => Some(days),
        _ => None,
    }
}

/// Parses a timestamp as Postgres prints it (`2026-11-22 03:47:00.123456+00`, `+05:30`) or as
/// RFC 3339 (`2026-11-22T03:47:00Z`) into microseconds since the Unix epoch (UTC). A timestamp
/// without an offset is taken as UTC.
pub fn parse_timestamp_micros(text: &[u8]) -> Option<i64> {
    let (days, rest) = parse_date_prefix(text)?;
    let rest = match rest {
        [] => return days.checked_mul(86_400_000_000),
        [b' ' | b'T', rest @ ..] => rest,
        _ => return None,
    };
    let hour = digits(rest, 2)?;
    let minute = digits(rest.get(3..)?, 2)?;
    let second = digits(rest.get(6..)?, 2)?;
    if rest[2] != b':' || rest[5] != b':' || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &rest[8..];
    let mut micros_frac: i64 = 0;
    if let [b'.', frac @ ..] = rest {
        let n = frac.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        let mut value = 0i64;
        for (i, &b) in frac[..n].iter().enumerate() {
            if i < 6 {
                value = value * 10 + i64::from(b - b'0');
            }
        }
        for _ in n..6 {
            value *= 10;
        }
        micros_frac = value;
        rest = &frac[n..];
    }
    let offset_secs: i64 = match rest {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), off @ ..] => {
            let h = i64::from(digits(off, 2)?);
            let (m, s) = match &off[2..] {
                [] => (0, 0),
                [b':', mm @ ..] if mm.len() == 2 => (i64::from(digits(mm, 2)?), 0),
                [b':', mm @ ..] if mm.len() == 5 && mm[2] == b':' => {
                    (i64::from(digits(mm, 2)?), i64::from(digits(&mm[3..], 2)?))
                }
                mm if mm.len() == 2 => (i64::from(digits(mm, 2)?), 0),
                _ => return None,
            };
            let total = h * 3600 + m * 60 + s;
            if *sign == b'-' { -total } else { total }
        }
        _ => return None,
    };
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset_secs;
    secs.checked_mul(1_000_000)?.checked_add(micros_frac)
}

fn is_uuid(text: &[u8]) -> bool {
    text.len() == 36
        && text.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Decodes Postgres' hex bytea output (`\x0a1b`).
fn parse_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |b: u8| (b as char).to_digit(16);
    hex.chunks_exact(2).map(|pair| Some((nibble(pair[0])? * 16 + nibble(pair[1])?) as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_postgres_and_rfc3339_forms() {
        let base = parse_timestamp_micros(b"2026-11-22 03:47:00+00").expect("pg form");
        assert_eq!(base, 1_795_319_220_000_000);
        assert_eq!(parse_timestamp_micros(b"2026-11-22T03:47:00Z"), Some(base));
        assert_eq!(parse_timestamp_micros(b"2026-11-22 05:47:00+02"), Some(base));
        assert_eq!(parse_timestamp_micros(b"2026-11-22 09:17:00+05:30"), Some(base));
        assert_eq!(parse_timestamp_micros(b"2026-11-21 19:47:00-08"), Some(base));
        assert_eq!(parse_timestamp_micros(b"2026-11-22 03:47:00.5+00"), Some(base + 500_000));
        assert_eq!(parse_timestamp_micros(b"2026-11-22 03:47:00.123456+00"), Some(base + 123_456));
        assert_eq!(parse_timestamp_micros(b"1969-12-31 23:59:59.999999"), Some(-1));
        assert_eq!(parse_timestamp_micros(b"2024-02-29 00:00:00"), Some(1_709_164_800_000_000));
        assert_eq!(parse_timestamp_micros(b"2023-02-29 00:00:00"), None);
        assert_eq!(parse_timestamp_micros(b"infinity"), None);
        assert_eq!(parse_timestamp_micros(b"2026-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp_micros(b"2026-11-22 03:47"), None);
    }

    #[test]
    fn dates_parse() {
        assert_eq!(parse_date(b"1970-01-01"), Some(0));
        assert_eq!(parse_date(b"2000-03-01"), Some(11_017));
        assert_eq!(parse_date(b"1969-12-31"), Some(-1));
        assert_eq!(parse_date(b"2000-3-1"), None);
    }

    #[test]
    fn decimals_parse_without_silent_rounding() {
        assert_eq!(parse_decimal(b"4.87", 3, 2), Ok(487));
        assert_eq!(parse_decimal(b"4.8", 3, 2), Ok(480));
        assert_eq!(parse_decimal(b"5", 3, 2), Ok(500));
        assert_eq!(parse_decimal(b"-0.05", 3, 2), Ok(-5));
        assert_eq!(parse_decimal(b"4.870", 3, 2), Ok(487));
        assert!(matches!(parse_decimal(b"4.875", 3, 2), Err(DecimalError::Rule(_))));
        assert!(matches!(parse_decimal(b"12.00", 3, 2), Err(DecimalError::Rule(_))));
        assert!(matches!(parse_decimal(b"NaN", 3, 2), Err(DecimalError::Rule(_))));
        assert_eq!(parse_decimal(b"abc", 3, 2), Err(DecimalError::Unparseable));
        assert_eq!(parse_decimal(b".", 3, 2), Err(DecimalError::Unparseable));
        assert_eq!(parse_decimal(b"0.00", 3, 2), Ok(0));
    }

    #[test]
    fn integers_reject_overflow_and_junk() {
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"12a"), None);
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"-"), None);
    }

    #[test]
    fn bytea_and_uuid() {
        assert_eq!(parse_bytea_hex(b"\\x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_bytea_hex(b"0aff"), None);
        assert!(is_uuid(b"123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_uuid(b"123e4567e89b12d3a456426614174000"));
    }
}
