//! The control-message envelope (DESIGN.md §4): msgpack with named fields
//! (`rmp_serde::to_vec_named`) inside `{v, body}`, so other languages can read the messages and
//! later versions can add fields; and the frame of messages that carry bulk bytes after their
//! metadata (partial aggregates, shard exchanges).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of the control-message envelope (`v`).
pub const PROTOCOL_VERSION: u16 = 1;

/// Why bytes are not a valid control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {what}: {detail}")]
pub struct DecodeError {
    /// What was being decoded (`job state`, `round event`, ...).
    pub what: &'static str,
    /// The decoder's message.
    pub detail: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u16,
    body: T,
}

/// Encodes a control message: msgpack, named fields, in the versioned envelope.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    // Serialising plain data structs into a Vec cannot fail.
    rmp_serde::to_vec_named(&Envelope { v: PROTOCOL_VERSION, body }).unwrap_or_default()
}

/// Decodes a control message.
///
/// # Errors
/// [`DecodeError`] for malformed bytes or an unknown envelope version.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let env: Envelope<T> =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError { what, detail: e.to_string() })?;
    if env.v != PROTOCOL_VERSION {
        return Err(DecodeError { what, detail: format!("unknown protocol version {}", env.v) });
    }
    Ok(env.body)
}

/// Frames a control header with a raw body, for messages that carry bulk data after their
/// metadata: `u32 LE length ‖ encoded header ‖ body`.
pub fn frame<T: Serialize>(header: &T, body: &[u8]) -> Vec<u8> {
    let h = encode(header);
    let mut out = Vec::with_capacity(4 + h.len() + body.len());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out
}

/// Splits a [`frame`]d message into its header and body.
///
/// # Errors
/// [`DecodeError`] for a truncated message or a malformed header.
pub fn unframe<'a, T: DeserializeOwned>(
    what: &'static str,
    bytes: &'a [u8],
) -> Result<(T, &'a [u8]), DecodeError> {
    let bad = |d: &str| DecodeError { what, detail: d.to_owned() };
    let len = bytes.get(..4).ok_or_else(|| bad("shorter than its length prefix"))?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let h = bytes.get(4..4 + len).ok_or_else(|| bad("header truncated"))?;
    Ok((decode(what, h)?, &bytes[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_back_and_refuse_truncation() {
        let framed = frame(&7u32, b"body");
        let (h, body): (u32, &[u8]) = unframe("test", &framed).unwrap();
        assert_eq!((h, body), (7, &b"body"[..]));
        assert!(unframe::<u32>("test", &framed[..3]).is_err());
        assert!(unframe::<u32>("test", &framed[..6]).is_err());
        let wrong_version = rmp_serde::to_vec_named(&Envelope { v: 2, body: 7u32 }).unwrap();
        assert!(decode::<u32>("test", &wrong_version).unwrap_err().detail.contains("version 2"));
    }
}
