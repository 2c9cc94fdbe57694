//! Update headers (DESIGN.md §4) and their grammar. Header names and values count against the
//! server's `max_payload` together with the payload.
//!
//! | header | value |
//! |---|---|
//! | `Shoal-Round` | decimal digits: the round the update is for |
//! | `Shoal-Base-Version` | decimal digits: the model version trained from |
//! | `Shoal-Num-Examples` | decimal digits, 1 to the job's `max_num_examples` |
//! | `Shoal-Kind` | `parameters` (default when absent) or `delta` |
//! | `Shoal-Object` | object-store path only: `<job>/<round>/<client>` in `shoal-updates` |
//! | `Shoal-Digest` | object-store path only: `sha256:<64 hex digits>` of the payload |
//! | `Nats-Msg-Id` | optional: JetStream's duplicate detection |

use crate::ids::{ModelVersion, RoundId};
use crate::messages::RejectReason;
use crate::spec::UpdateKind;

/// Header: round the update is for.
pub const HDR_ROUND: &str = "Shoal-Round";
/// Header: global model version the client trained from.
pub const HDR_BASE_VERSION: &str = "Shoal-Base-Version";
/// Header: number of local training examples (the FedAvg weight).
pub const HDR_NUM_EXAMPLES: &str = "Shoal-Num-Examples";
/// Header: `delta` or `parameters`.
pub const HDR_KIND: &str = "Shoal-Kind";
/// Header: object name in `shoal-updates` when the payload travels through the object store.
pub const HDR_OBJECT: &str = "Shoal-Object";
/// Header: `sha256:<hex>` of the safetensors bytes stored as [`HDR_OBJECT`].
pub const HDR_DIGEST: &str = "Shoal-Digest";
/// Header: JetStream's message id (duplicate detection within the stream's window).
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";
/// Header of a reply that failed (reward requests): the reason, in words.
pub const HDR_ERROR: &str = "Shoal-Error";

/// A header's decimal value: ASCII digits only (1 to 20 of them) that fit a `u64`. No sign,
/// exponent, fraction, inner space or `0x`: `+100`, `1e3`, `7.0` and `7 0` are refused, where
/// `str::parse` would take `+100`. (Spaces around a value are not part of it: NATS header syntax
/// is HTTP's, and client libraries strip them on receipt, so ` 7 ` arrives as `7`.)
pub fn parse_decimal(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Why an update's headers are refused, with the reason the client is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct HeaderError {
    /// `malformed_headers`, or `invalid_weight` for `Shoal-Num-Examples`.
    pub reason: RejectReason,
    /// Which header and why.
    pub detail: String,
}

/// The headers of one update message, parsed and checked against their grammar (not against
/// the job: that is the node's admission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateHeaders {
    /// `Shoal-Round`.
    pub round: RoundId,
    /// `Shoal-Base-Version`.
    pub base_version: ModelVersion,
    /// `Shoal-Num-Examples` (range-checked later, against the job).
    pub num_examples: u64,
    /// `Shoal-Kind`.
    pub kind: UpdateKind,
    /// `Shoal-Object`, when the payload is in the object store.
    pub object: Option<String>,
    /// `Shoal-Digest` as sent (checked on the object path).
    pub digest: Option<String>,
}

impl UpdateHeaders {
    /// Parses the headers `get` returns by name, in the order a client's mistakes are reported:
    /// round, base version, kind, then `num_examples`.
    ///
    /// # Errors
    /// [`HeaderError`] with `malformed_headers` for a missing or non-decimal round or base
    /// version or an unknown kind, `invalid_weight` for a missing or non-decimal
    /// `num_examples`.
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<UpdateHeaders, HeaderError> {
        let round = RoundId(decimal(&get, HDR_ROUND)?);
        let base_version = ModelVersion(decimal(&get, HDR_BASE_VERSION)?);
        let kind = get(HDR_KIND).unwrap_or("parameters");
        let kind = UpdateKind::parse(kind).ok_or_else(|| HeaderError {
            reason: RejectReason::MalformedHeaders,
            detail: format!("Shoal-Kind {kind:?} is not delta|parameters"),
        })?;
        let invalid_weight = |detail: String| HeaderError { reason: RejectReason::InvalidWeight, detail };
        let n = get(HDR_NUM_EXAMPLES).ok_or_else(|| invalid_weight("Shoal-Num-Examples missing".into()))?;
        let num_examples = parse_decimal(n).ok_or_else(|| {
            invalid_weight(format!("num_examples {n:?} is not a decimal integer (digits only)"))
        })?;
        Ok(UpdateHeaders {
            round,
            base_version,
            num_examples,
            kind,
            object: get(HDR_OBJECT).map(str::to_owned),
            digest: get(HDR_DIGEST).map(str::to_owned),
        })
    }

    /// Just the round header, when it parses (named in a refusal of the rest).
    pub fn round_of<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<RoundId> {
        get(HDR_ROUND).and_then(parse_decimal).map(RoundId)
    }
}

fn decimal<'a>(get: &impl Fn(&str) -> Option<&'a str>, name: &str) -> Result<u64, HeaderError> {
    let malformed = |detail: String| HeaderError { reason: RejectReason::MalformedHeaders, detail };
    let v = get(name).ok_or_else(|| malformed(format!("header {name} missing")))?;
    parse_decimal(v).ok_or_else(|| malformed(format!("header {name}={v:?} is not a decimal integer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(h: &[(&'static str, &'static str)]) -> Result<UpdateHeaders, HeaderError> {
        UpdateHeaders::parse(|n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    }

    #[test]
    fn decimals_are_digits_only() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "+100", "1e3", "7.0", "7 0", "0x10", "-1", "18446744073709551616", "１"] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn headers_parse_in_order_with_the_reason_the_client_gets() {
        let ok = parse(&[(HDR_ROUND, "3"), (HDR_BASE_VERSION, "2"), (HDR_NUM_EXAMPLES, "600")]).unwrap();
        assert_eq!((ok.round, ok.base_version, ok.num_examples), (RoundId(3), ModelVersion(2), 600));
        assert_eq!((ok.kind, ok.object, ok.digest), (UpdateKind::Parameters, None, None));
        let e = parse(&[(HDR_BASE_VERSION, "2")]).unwrap_err();
        assert_eq!(
            (e.reason, e.detail.as_str()),
            (RejectReason::MalformedHeaders, "header Shoal-Round missing")
        );
        let e = parse(&[(HDR_ROUND, "3"), (HDR_BASE_VERSION, "2"), (HDR_KIND, "weights")]).unwrap_err();
        assert_eq!(e.reason, RejectReason::MalformedHeaders);
        let e = parse(&[(HDR_ROUND, "3"), (HDR_BASE_VERSION, "2")]).unwrap_err();
        assert_eq!(e.reason, RejectReason::InvalidWeight);
        let e = parse(&[(HDR_ROUND, "3"), (HDR_BASE_VERSION, "2"), (HDR_NUM_EXAMPLES, "1e3")]).unwrap_err();
        assert_eq!(e.reason, RejectReason::InvalidWeight);
        let delta =
            parse(&[(HDR_ROUND, "1"), (HDR_BASE_VERSION, "0"), (HDR_NUM_EXAMPLES, "1"), (HDR_KIND, "delta")]);
        assert_eq!(delta.unwrap().kind, UpdateKind::Delta);
    }
}
