//! Strategy state that survives a change of top ([`crate::Strategy::save_state`] and
//! [`crate::Strategy::restore_state`]).
//!
//! Some strategies carry state from one round to the next: RFFL's reputations, reputable set,
//! round counter and last round (its rewards are served after the commit), a server
//! optimizer's moments and step count, Bristle's round counter (its seeded draws depend on it)
//! and own model, FedFix's and asynchronous FedAvg's client profiles (the runtime refreshes
//! compute-time estimates). The top saves the state with each commit, tied to the model version
//! that commit produced; a top that takes over restores it and continues exactly as the
//! uninterrupted run would have.
//!
//! # Encoding
//! msgpack (rmp-serde, named fields) of one envelope:
//!
//! | field | value |
//! |---|---|
//! | `format` | [`STATE_FORMAT`], so that other bytes are refused as corrupt |
//! | `version` | [`STATE_VERSION`] (1); another version is [`StateError::UnsupportedVersion`] |
//! | `strategy` | the strategy's [`crate::Strategy::name`] (`rffl`, `fedadam`, ...); another is [`StateError::WrongStrategy`] |
//! | `digest` | FNV-1a 64 of `state`'s bytes; a mismatch is [`StateError::Corrupt`] |
//! | `state` | `bin`: msgpack (named fields) of the strategy's own fields; f64 vectors inside as `bin` of little-endian f64 (8 bytes each, bit-exact) |
//!
//! The header is checked before the state is decoded. A strategy wrapped in a server optimizer
//! nests its own envelope, as bytes, inside the optimizer's. Stateless strategies (FedAvg,
//! FedBuff, the robust rules) save an envelope with an empty state, so restoring another
//! strategy's state into them is refused too.
//!
//! # Size
//! A state is O(model + participants): FedAvgM 8 bytes per parameter, FedAdam/FedYogi/FedAdagrad
//! 16, RFFL 8 (the last aggregate, for rewards) plus about 100 bytes per participant, Bristle
//! its own model's slot bytes when one is set; nothing grows with the number of rounds.
//! [`MAX_STATE_BYTES`] bounds what `restore_state` accepts before it decodes anything, and
//! every decoded piece is checked against the strategy (lengths against the manifest, finite
//! values, the same configuration) before anything changes.
//!
//! # Errors
//! Every failure is [`crate::Error::InvalidState`] with a [`StateError`] saying which; restoring
//! never resets the state silently, and on error the strategy is unchanged.

use std::fmt;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_proto::manifest::MAX_SLOT_BYTES;

use crate::error::{Error, Result};

/// The envelope's `format` field.
pub const STATE_FORMAT: &str = "shoal-strategy-state";

/// The envelope's `version` field: the layout of the strategies' states it carries.
pub const STATE_VERSION: u16 = 1;

/// The largest state `restore_state` accepts, in bytes: four times the largest slot, room for
/// an adaptive optimizer's two f64 moments of the largest f32 model (16 bytes per parameter).
pub const MAX_STATE_BYTES: usize = 4 * MAX_SLOT_BYTES;

/// Why a saved state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The bytes are not a strategy state (not msgpack, not the envelope, truncated, a field of
    /// the wrong type).
    #[error("corrupt strategy state: {0}")]
    Corrupt(String),
    /// The state was written in another format version.
    #[error("strategy state version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// The blob's version.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The state was saved by another strategy.
    #[error("strategy state saved by {found:?} cannot be restored into {expected:?}")]
    WrongStrategy {
        /// The restoring strategy's name.
        expected: String,
        /// The name in the blob.
        found: String,
    },
    /// The blob exceeds [`MAX_STATE_BYTES`].
    #[error("strategy state of {bytes} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The blob's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The state decodes but does not fit this strategy: another configuration, moments or
    /// aggregates whose lengths do not match the manifest, non-finite values.
    #[error("strategy state does not fit: {0}")]
    Mismatch(String),
}

impl From<StateError> for Error {
    fn from(e: StateError) -> Error {
        Error::InvalidState(e)
    }
}

/// Shorthand for a [`StateError::Mismatch`] as the crate's error.
pub(crate) fn mismatch(detail: impl Into<String>) -> Error {
    Error::InvalidState(StateError::Mismatch(detail.into()))
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    format: &'a str,
    version: u16,
    strategy: &'a str,
    digest: u64,
    state: Bin,
}

#[derive(Deserialize)]
struct Header {
    format: String,
    version: u16,
    strategy: String,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    digest: u64,
    state: Bin,
}

/// FNV-1a (64-bit) of `bytes`: detects accidental corruption of a stored state (a flipped bit,
/// a truncated or spliced value), not tampering; the KV bucket is written only by nodes.
fn digest(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Encodes `state` of strategy `strategy` in the versioned envelope.
///
/// # Errors
/// [`StateError::Corrupt`] if the state cannot be encoded (not for the plain data structs this
/// crate saves).
pub(crate) fn save<T: Serialize>(strategy: &str, state: &T) -> Result<Vec<u8>> {
    let corrupt = |e: rmp_serde::encode::Error| Error::from(StateError::Corrupt(e.to_string()));
    let body = rmp_serde::to_vec_named(state).map_err(corrupt)?;
    let env = EnvelopeOut {
        format: STATE_FORMAT,
        version: STATE_VERSION,
        strategy,
        digest: digest(&body),
        state: Bin(body),
    };
    rmp_serde::to_vec_named(&env).map_err(corrupt)
}

/// Decodes a state saved by [`save`] for `strategy`: size, format, version and strategy are
/// checked before anything else is decoded, then the digest, then the state.
///
/// # Errors
/// [`Error::InvalidState`] with the [`StateError`] saying what is wrong.
pub(crate) fn load<T: DeserializeOwned>(strategy: &str, bytes: &[u8]) -> Result<T> {
    load_bounded(strategy, bytes, MAX_STATE_BYTES)
}

fn load_bounded<T: DeserializeOwned>(strategy: &str, bytes: &[u8], max: usize) -> Result<T> {
    if bytes.len() > max {
        return Err(StateError::TooLarge { bytes: bytes.len(), max }.into());
    }
    let corrupt = |e: rmp_serde::decode::Error| Error::from(StateError::Corrupt(e.to_string()));
    let header: Header = rmp_serde::from_slice(bytes).map_err(corrupt)?;
    if header.format != STATE_FORMAT {
        return Err(StateError::Corrupt(format!("format {:?} is not {STATE_FORMAT:?}", header.format)).into());
    }
    if header.version != STATE_VERSION {
        return Err(StateError::UnsupportedVersion { found: header.version, supported: STATE_VERSION }.into());
    }
    if header.strategy != strategy {
        return Err(StateError::WrongStrategy { expected: strategy.into(), found: header.strategy }.into());
    }
    let env: EnvelopeIn = rmp_serde::from_slice(bytes).map_err(corrupt)?;
    if digest(&env.state.0) != env.digest {
        return Err(StateError::Corrupt("the state's digest does not match its bytes".into()).into());
    }
    rmp_serde::from_slice(&env.state.0).map_err(corrupt)
}

/// Bytes saved as msgpack `bin` (a nested state, a model's slot bytes), not as an array of
/// integers.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Bin(pub Vec<u8>);

impl Serialize for Bin {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

struct BinVisitor;

impl<'de> Visitor<'de> for BinVisitor {
    type Value = Vec<u8>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }
    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> std::result::Result<Vec<u8>, E> {
        Ok(v)
    }
}

impl<'de> Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Bin, D::Error> {
        d.deserialize_bytes(BinVisitor).map(Bin)
    }
}

/// f64 values saved as msgpack `bin` of little-endian f64: 8 bytes each, bit-exact (NaN
/// payloads and signed zeros included).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct F64s(pub Vec<f64>);

impl Serialize for F64s {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|v| v.to_le_bytes()).collect();
        s.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for F64s {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<F64s, D::Error> {
        let bytes = d.deserialize_bytes(BinVisitor)?;
        if bytes.len() % 8 != 0 {
            return Err(serde::de::Error::invalid_length(bytes.len(), &"a multiple of 8 bytes"));
        }
        let values =
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes(std::array::from_fn(|k| c[k]))).collect();
        Ok(F64s(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        n: u64,
        xs: F64s,
        nested: Bin,
    }

    #[test]
    fn envelope_round_trip_and_refusals() {
        let s = Sample { n: 7, xs: F64s(vec![1.5, -0.0, f64::MAX]), nested: Bin(vec![0, 255, 3]) };
        let blob = save("fedadam", &s).unwrap();
        assert_eq!(load::<Sample>("fedadam", &blob).unwrap(), s);
        let kind = |r: Result<Sample>| match r {
            Err(Error::InvalidState(e)) => e,
            other => panic!("expected a state error, got {other:?}"),
        };
        assert!(matches!(kind(load("rffl", &blob)), StateError::WrongStrategy { .. }));
        assert!(matches!(kind(load_bounded("fedadam", &blob, blob.len() - 1)), StateError::TooLarge { .. }));
        assert!(matches!(kind(load("fedadam", &blob[..blob.len() - 2])), StateError::Corrupt(_)));
        assert!(matches!(kind(load("fedadam", b"not msgpack at all")), StateError::Corrupt(_)));
        // One flipped bit inside the f64 data still decodes, but not past the digest.
        let pos = blob.windows(8).position(|w| w == 1.5f64.to_le_bytes()).unwrap();
        let mut flipped = blob.clone();
        flipped[pos + 3] ^= 0x10;
        assert!(matches!(kind(load("fedadam", &flipped)), StateError::Corrupt(_)));
        // f64 vectors take 8 bytes each (plus the bin header), not msgpack's 9.
        let big = save("x", &F64s(vec![0.25; 1000])).unwrap();
        assert!(big.len() < 8000 + 100, "{}", big.len());
    }
}
