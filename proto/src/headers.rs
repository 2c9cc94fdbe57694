//! Update headers (DESIGN.md §4) and their grammar. Header names and values count against the
//! server's `max_payload` together with the payload.
//!
//! | header | value |
//! |---|---|
//! | `Shoal-Round` | decimal digits: the round the update is for |
//! | `Shoal-Base-Version` | decimal digits: the model version trained from |
//! | `Shoal-Num-Examples` | decimal digits, 1 to the job's `max_num_examples` |
//! | `Shoal-Kind` | `parameters` (default when absent) or `delta` |
//! | `Shoal-Upload-Chunks` | upload path only: the number of chunks (≥ 1) |
//! | `Shoal-Upload-Bytes` | upload path only: the payload's length in bytes |
//! | `Shoal-Digest` | upload path only: `sha256:<64 lowercase hex digits>` of the payload |
//! | `Nats-Msg-Id` | optional: `<job>.<round>.<client>.<16 hex>[.<nonce>]` ([`update_msg_id`]) |

use crate::ids::{ClientId, JobId, ModelVersion, RoundId};
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
/// Header of the retired object-store path; a client update carrying it is refused as
/// `malformed_headers` (uploads go through [`HDR_UPLOAD_CHUNKS`]).
pub const HDR_OBJECT: &str = "Shoal-Object";
/// Header: the number of chunks of an upload.
pub const HDR_UPLOAD_CHUNKS: &str = "Shoal-Upload-Chunks";
/// Header: the byte length of an upload.
pub const HDR_UPLOAD_BYTES: &str = "Shoal-Upload-Bytes";
/// Header: `sha256:<hex>` of the payload of an upload.
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
    /// The upload the payload travels in, when it is not inline.
    pub upload: Option<Upload>,
    /// `Nats-Msg-Id`, as sent.
    pub msg_id: Option<String>,
}

/// An update's payload on the upload path: `chunks` messages on
/// `<prefix>.<job>.upload.<client>.<round>.<i>`, `bytes` long in all, with SHA-256 `sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// Chunks (≥ 1).
    pub chunks: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// The payload's SHA-256, 64 lowercase hex digits.
    pub sha256: String,
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
        let num_examples = parse_decimal(n).ok_or_else(|| invalid_weight(not_decimal("num_examples", n)))?;
        let malformed = |detail: String| HeaderError { reason: RejectReason::MalformedHeaders, detail };
        if get(HDR_OBJECT).is_some() {
            return Err(malformed(
                "Shoal-Object is not supported: large updates take the upload path".into(),
            ));
        }
        let upload = match get(HDR_UPLOAD_CHUNKS) {
            None => None,
            Some(_) => Some(Upload {
                chunks: decimal(&get, HDR_UPLOAD_CHUNKS)?,
                bytes: decimal(&get, HDR_UPLOAD_BYTES)?,
                sha256: get(HDR_DIGEST)
                    .and_then(|d| d.strip_prefix("sha256:"))
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| {
                        malformed("Shoal-Digest must be sha256:<64 hex digits> on the upload path".into())
                    })?
                    .to_ascii_lowercase(),
            }),
        };
        if upload.as_ref().is_some_and(|u| u.chunks == 0) {
            return Err(malformed("Shoal-Upload-Chunks must be at least 1".into()));
        }
        Ok(UpdateHeaders {
            round,
            base_version,
            num_examples,
            kind,
            upload,
            msg_id: get(HDR_MSG_ID).map(str::to_owned),
        })
    }

    /// Just the round header, when it parses (named in a refusal of the rest).
    pub fn round_of<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<RoundId> {
        get(HDR_ROUND).and_then(parse_decimal).map(RoundId)
    }
}

/// How an update's payload travels, as the message id names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// In the message.
    Inline,
    /// On the upload path, in `chunks` chunks of `bytes` bytes in all.
    Upload {
        /// Chunks.
        chunks: u64,
        /// Bytes.
        bytes: u64,
    },
}

/// The fields of an update its `Nats-Msg-Id` covers.
#[derive(Debug, Clone, Copy)]
pub struct MsgIdFields<'a> {
    /// Job.
    pub job: &'a JobId,
    /// Round header.
    pub round: RoundId,
    /// Sender.
    pub client: &'a ClientId,
    /// Base version header.
    pub base_version: ModelVersion,
    /// `num_examples` header.
    pub num_examples: u64,
    /// Kind header.
    pub kind: UpdateKind,
    /// How the payload travels.
    pub transport: Transport,
    /// The payload's SHA-256, 64 lowercase hex digits.
    pub payload_sha256: &'a str,
}

/// The `Nats-Msg-Id` of an update: `<job>.<round>.<client>.<h>`, `<h>` the first 16 lowercase
/// hex digits of SHA-256 over `"shoal-msg-id/1\n" + round + "\n" + base_version + "\n" +
/// num_examples + "\n" + kind + "\n" + transport + "\n" + payload_sha256 + "\n"` (`transport`:
/// `inline` or `upload:<chunks>:<bytes>`). A retry that changes any header that matters, the path
/// or the bytes gets a new id; a byte-identical retry is deduplicated by JetStream.
pub fn update_msg_id(f: &MsgIdFields<'_>) -> String {
    use sha2::{Digest, Sha256};
    let transport = match f.transport {
        Transport::Inline => "inline".to_owned(),
        Transport::Upload { chunks, bytes } => format!("upload:{chunks}:{bytes}"),
    };
    let text = format!(
        "shoal-msg-id/1\n{}\n{}\n{}\n{}\n{transport}\n{}\n",
        f.round,
        f.base_version,
        f.num_examples,
        f.kind.as_str(),
        f.payload_sha256
    );
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{}.{}.{}.{hex}", f.job, f.round, f.client)
}

/// Whether `msg_id` is one that `client` of `job` may send for `round`: it starts with
/// `<job>.<round>.<client>.`, then 16 hex digits, then optionally `.<nonce>` (1–16 of
/// `[A-Za-z0-9]`). The gateway refuses an update whose id names another client or round.
pub fn msg_id_is_own(msg_id: &str, job: &JobId, round: RoundId, client: &ClientId) -> bool {
    let prefix = format!("{job}.{round}.{client}.");
    let Some(rest) = msg_id.strip_prefix(&prefix) else { return false };
    let (hash, nonce) = match rest.split_once('.') {
        Some((h, n)) => (h, Some(n)),
        None => (rest, None),
    };
    hash.len() == 16
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && nonce.is_none_or(|n| (1..=16).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn decimal<'a>(get: &impl Fn(&str) -> Option<&'a str>, name: &str) -> Result<u64, HeaderError> {
    let malformed = |detail: String| HeaderError { reason: RejectReason::MalformedHeaders, detail };
    let v = get(name).ok_or_else(|| malformed(format!("header {name} missing")))?;
    parse_decimal(v).ok_or_else(|| malformed(not_decimal(&format!("header {name}"), v)))
}

/// Why `v` is not a value [`parse_decimal`] takes: not digits only, or too large for a `u64`.
fn not_decimal(what: &str, v: &str) -> String {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        format!("{what} {v:?} is larger than {} (the largest u64)", u64::MAX)
    } else {
        format!("{what} {v:?} is not a decimal integer (digits only)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(h: &[(&'static str, &'static str)]) -> Result<UpdateHeaders, HeaderError> {
        UpdateHeaders::parse(|n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    }

    #[test]
    fn uploads_need_their_three_headers_and_the_object_path_is_refused() {
        let digest = format!("sha256:{}", "aB".repeat(32));
        let base = [(HDR_ROUND, "3"), (HDR_BASE_VERSION, "2"), (HDR_NUM_EXAMPLES, "6")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let all: Vec<(&'static str, &'static str)> = base.iter().chain(extra).copied().collect();
            UpdateHeaders::parse(|n| all.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
        };
        let d: &'static str = Box::leak(digest.into_boxed_str());
        let up = with(&[(HDR_UPLOAD_CHUNKS, "2"), (HDR_UPLOAD_BYTES, "2000"), (HDR_DIGEST, d)]).unwrap();
        assert_eq!(up.upload, Some(Upload { chunks: 2, bytes: 2000, sha256: "ab".repeat(32) }));
        for bad in [
            vec![(HDR_UPLOAD_CHUNKS, "2"), (HDR_UPLOAD_BYTES, "2000")],
            vec![(HDR_UPLOAD_CHUNKS, "0"), (HDR_UPLOAD_BYTES, "0"), (HDR_DIGEST, d)],
            vec![(HDR_UPLOAD_CHUNKS, "2"), (HDR_DIGEST, d)],
            vec![(HDR_UPLOAD_CHUNKS, "2"), (HDR_UPLOAD_BYTES, "9"), (HDR_DIGEST, "sha256:abc")],
            vec![(HDR_OBJECT, "j/3/c")],
        ] {
            assert_eq!(with(&bad).unwrap_err().reason, RejectReason::MalformedHeaders, "{bad:?}");
        }
    }

    #[test]
    fn message_ids_cover_the_headers_the_path_and_the_bytes() {
        let (job, client) = (JobId::new("mnist").unwrap(), ClientId::new("c1").unwrap());
        let sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let f = MsgIdFields {
            job: &job,
            round: RoundId(3),
            client: &client,
            base_version: ModelVersion(2),
            num_examples: 600,
            kind: UpdateKind::Parameters,
            transport: Transport::Inline,
            payload_sha256: sha,
        };
        // SHA-256("shoal-msg-id/1\n3\n2\n600\nparameters\ninline\n<sha>\n"), computed
        // independently with Python's hashlib.
        assert_eq!(update_msg_id(&f), "mnist.3.c1.196037ecbc8a1080");
        let changed = [
            MsgIdFields { num_examples: 5, ..f },
            MsgIdFields { base_version: ModelVersion(1), ..f },
            MsgIdFields { kind: UpdateKind::Delta, ..f },
            MsgIdFields { transport: Transport::Upload { chunks: 1, bytes: 0 }, ..f },
        ];
        for g in changed {
            assert_ne!(update_msg_id(&g), update_msg_id(&f));
        }
        let id = update_msg_id(&f);
        assert!(msg_id_is_own(&id, &job, RoundId(3), &client));
        assert!(msg_id_is_own(&format!("{id}.n0nce"), &job, RoundId(3), &client));
        assert!(!msg_id_is_own(&id, &job, RoundId(4), &client));
        assert!(!msg_id_is_own(&id, &job, RoundId(3), &ClientId::new("c2").unwrap()));
        assert!(!msg_id_is_own(&format!("{id}.bad-nonce"), &job, RoundId(3), &client));
        assert!(!msg_id_is_own("mnist.3.c1.zz", &job, RoundId(3), &client));
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
        assert_eq!((ok.kind, ok.upload, ok.msg_id), (UpdateKind::Parameters, None, None));
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
