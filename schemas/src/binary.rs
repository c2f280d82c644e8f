//! Avro binary primitives: zig-zag varints, length-prefixed bytes, IEEE floats, decimals.
//!
//! Hand-written because the producer's hot path encodes straight from Postgres text into these
//! bytes without building apache-avro `Value`s; tests check the output against apache-avro.

use crate::SchemaError;

#[inline]
pub fn write_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[inline]
pub fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

#[inline]
pub fn write_double(out: &mut Vec<u8>, value: f64) {
    out.extend_from_slice(&value.to_le_bytes());
}

#[inline]
pub fn write_float(out: &mut Vec<u8>, value: f32) {
    out.extend_from_slice(&value.to_le_bytes());
}

#[inline]
pub fn write_bool(out: &mut Vec<u8>, value: bool) {
    out.push(u8::from(value));
}

/// Writes an unscaled decimal as Avro `bytes`: minimal big-endian two's complement.
pub fn write_decimal(out: &mut Vec<u8>, unscaled: i128) {
    let be = unscaled.to_be_bytes();
    let mut start = 0;
    // Drop leading bytes that only repeat the sign, keeping the sign bit in the first byte.
    while start < 15 {
        let (b, next) = (be[start], be[start + 1]);
        let redundant = (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    write_bytes(out, &be[start..]);
}

/// A cursor over an Avro body.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    pub buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    #[inline]
    pub fn read_long(&mut self) -> Result<i64, SchemaError> {
        let mut n: u64 = 0;
        let mut shift = 0;
        loop {
            let (&b, rest) = self.buf.split_first().ok_or_else(|| SchemaError::malformed("varint ends early"))?;
            self.buf = rest;
            if shift >= 64 {
                return Err(SchemaError::malformed("varint longer than 10 bytes"));
            }
            n |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        Ok(((n >> 1) as i64) ^ -((n & 1) as i64))
    }

    #[inline]
    pub fn read_int(&mut self) -> Result<i32, SchemaError> {
        let v = self.read_long()?;
        i32::try_from(v).map_err(|_| SchemaError::malformed("int out of range"))
    }

    #[inline]
    pub fn read_bytes(&mut self) -> Result<&'a [u8], SchemaError> {
        let len = self.read_long()?;
        let len = usize::try_from(len).map_err(|_| SchemaError::malformed("negative length"))?;
        if len > self.buf.len() {
            return Err(SchemaError::malformed("bytes longer than the message"));
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    #[inline]
    pub fn read_str(&mut self) -> Result<&'a str, SchemaError> {
        std::str::from_utf8(self.read_bytes()?).map_err(|_| SchemaError::malformed("string is not UTF-8"))
    }

    #[inline]
    pub fn read_fixed<const N: usize>(&mut self) -> Result<[u8; N], SchemaError> {
        if self.buf.len() < N {
            return Err(SchemaError::malformed("fixed-size value ends early"));
        }
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }

    #[inline]
    pub fn read_bool(&mut self) -> Result<bool, SchemaError> {
        match self.read_fixed::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SchemaError::malformed("boolean byte is neither 0 nor 1")),
        }
    }

    pub fn read_decimal(&mut self) -> Result<i128, SchemaError> {
        let bytes = self.read_bytes()?;
        if bytes.is_empty() || bytes.len() > 16 {
            return Err(SchemaError::malformed("decimal of 0 or more than 16 bytes"));
        }
        let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0x00 };
        let mut be = [fill; 16];
        be[16 - bytes.len()..].copy_from_slice(bytes);
        Ok(i128::from_be_bytes(be))
    }
}

/// Formats an unscaled decimal with `scale` fractional digits: (487, 2) -> "4.87".
pub fn format_decimal(unscaled: i128, scale: u32) -> String {
    let negative = unscaled < 0;
    let digits = unscaled.unsigned_abs().to_string();
    let scale = scale as usize;
    let mut out = String::with_capacity(digits.len() + 3);
    if negative {
        out.push('-');
    }
    if scale == 0 {
        out.push_str(&digits);
    } else if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', scale - digits.len()));
        out.push_str(&digits);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs_round_trip_across_varint_boundaries() {
        for v in [0i64, 1, -1, 63, -64, 64, 8191, -8192, i64::MAX, i64::MIN, 1 << 40] {
            let mut out = Vec::new();
            write_long(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.read_long().expect("decodes"), v);
            assert!(r.buf.is_empty());
        }
    }

    #[test]
    fn decimals_use_minimal_twos_complement() {
        for (v, len) in [(0i128, 1), (127, 1), (128, 2), (-128, 1), (-129, 2), (487, 2), (-1, 1)] {
            let mut out = Vec::new();
            write_decimal(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.read_decimal().expect("decodes"), v, "value {v}");
            assert_eq!(out.len() - 1, len, "value {v} length");
        }
    }

    #[test]
    fn decimals_format_with_scale() {
        assert_eq!(format_decimal(487, 2), "4.87");
        assert_eq!(format_decimal(-5, 2), "-0.05");
        assert_eq!(format_decimal(500, 2), "5.00");
        assert_eq!(format_decimal(0, 2), "0.00");
        assert_eq!(format_decimal(42, 0), "42");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut r = Reader::new(&[0x80]);
        assert!(r.read_long().is_err());
        let mut r = Reader::new(&[0x0A, 1, 2]);
        assert!(r.read_bytes().is_err());
        let mut r = Reader::new(&[0xFF; 12]);
        assert!(r.read_long().is_err());
    }
}
