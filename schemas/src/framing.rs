//! Avro single-object encoding: `C3 01` + 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint
//! of the writer schema's canonical form + the Avro binary body.
//!
//! The fingerprint is how a reader finds the writer schema without a registry service; a
//! fingerprint no embedded contract has is [`SchemaError::UnknownSchema`].

use crate::SchemaError;

/// Length of the single-object header.
pub const HEADER_LEN: usize = 10;
const MARKER: [u8; 2] = [0xC3, 0x01];

/// The header for a schema with `fingerprint`.
pub fn header(fingerprint: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..2].copy_from_slice(&MARKER);
    out[2..].copy_from_slice(&fingerprint.to_le_bytes());
    out
}

/// Splits a single-object message into its writer fingerprint and body.
pub fn split(message: &[u8]) -> Result<(u64, &[u8]), SchemaError> {
    if message.len() < HEADER_LEN || message[..2] != MARKER {
        return Err(SchemaError::NotSingleObject);
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&message[2..HEADER_LEN]);
    Ok((u64::from_le_bytes(fp), &message[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut msg = header(0x0102_0304_0506_0708).to_vec();
        msg.push(42);
        let (fp, body) = split(&msg).expect("valid");
        assert_eq!(fp, 0x0102_0304_0506_0708);
        assert_eq!(body, &[42]);
    }

    #[test]
    fn garbage_is_not_single_object() {
        assert!(matches!(split(b"hello world"), Err(SchemaError::NotSingleObject)));
        assert!(matches!(split(&[0xC3]), Err(SchemaError::NotSingleObject)));
    }
}
