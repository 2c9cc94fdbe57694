//! The wire contract as the runtime uses it: `shoal_proto`'s messages, headers and envelope, with
//! decoding errors as the runtime's [`Error`].

use serde::de::DeserializeOwned;
pub use shoal_proto::cluster::*;
pub use shoal_proto::envelope::{encode, frame, PROTOCOL_VERSION};
pub use shoal_proto::headers::*;
pub use shoal_proto::messages::*;

use crate::error::{Error, Result};

/// Decodes a control message ([`shoal_proto::decode`]).
///
/// # Errors
/// [`Error::Decode`] for malformed bytes or an unknown envelope version.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    Ok(shoal_proto::decode(what, bytes)?)
}

/// Splits a framed message ([`shoal_proto::envelope::unframe`]).
///
/// # Errors
/// [`Error::Decode`] for a truncated message or a malformed header.
pub fn unframe<'a, T: DeserializeOwned>(what: &'static str, bytes: &'a [u8]) -> Result<(T, &'a [u8])> {
    Ok(shoal_proto::envelope::unframe(what, bytes)?)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl From<shoal_proto::DecodeError> for Error {
    fn from(e: shoal_proto::DecodeError) -> Self {
        Error::Decode { what: e.what, detail: e.detail }
    }
}
