//! The object-store path of an update: the payload was put into `shoal-updates` as
//! `<job>/<round>/<client>` and the message carries its name and SHA-256. The gateway accepts
//! only the publishing client's own object, refuses one larger than the job allows before
//! reading a chunk, reads every chunk with a bounded direct get, and checks the bytes against
//! the message's digest.

use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use shoal_client::objects::{self, ObjectReadError};
use shoal_proto::{subjects, ClientId, JobId, RejectReason, RoundId};

use super::reject::Refusal;
use crate::nats::Infra;

/// Which object an update names, and what its message says of it.
#[derive(Debug, Clone, Copy)]
pub struct ObjectRef<'a> {
    /// The job.
    pub job: &'a JobId,
    /// The update's round header.
    pub round: RoundId,
    /// The publishing client.
    pub client: &'a ClientId,
    /// `Shoal-Object`.
    pub name: &'a str,
    /// `Shoal-Digest`, as sent.
    pub digest: Option<&'a str>,
}

/// Reads the update object `o` names, at most `max_bytes` long, within `timeout`.
///
/// # Errors
/// A [`Refusal`]: `unauthorized` for another client's object, `malformed_headers` without a
/// `sha256:<hex>` digest, `payload_too_large` from the metadata, `object_unavailable` for a
/// missing object, metadata or chunk (or a read that takes longer than `timeout`),
/// `digest_mismatch` for bytes that do not match.
pub async fn fetch_object(
    infra: &Infra,
    o: ObjectRef<'_>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, Refusal> {
    let own = subjects::update_object(o.job, o.round, o.client);
    if o.name != own {
        return Err(Refusal::new(
            RejectReason::Unauthorized,
            format!("object {:?} is not this client's ({own:?})", o.name),
        ));
    }
    let digest = o
        .digest
        .and_then(|d| d.strip_prefix("sha256:"))
        .ok_or_else(|| Refusal::new(RejectReason::MalformedHeaders, "Shoal-Digest sha256:<hex> missing"))?
        .to_ascii_lowercase();
    // Size from the metadata first (nothing is read for an oversized object), then every chunk
    // by a bounded direct get: a missing chunk is a refusal, not a stalled gateway.
    let read = objects::read_object_checked(&infra.js, subjects::UPDATES_BUCKET, o.name, max_bytes);
    let buf = match tokio::time::timeout(timeout, read).await {
        Err(_) => {
            return Err(Refusal::new(
                RejectReason::ObjectUnavailable,
                format!("object {:?} not read within {timeout:?}", o.name),
            ))
        }
        Ok(Ok(buf)) => buf,
        Ok(Err(e)) => {
            let reason = match e {
                ObjectReadError::TooLarge { .. } => RejectReason::PayloadTooLarge,
                ObjectReadError::Corrupt { .. } => RejectReason::DigestMismatch,
                ObjectReadError::Missing { .. } | ObjectReadError::MissingChunk { .. } => {
                    RejectReason::ObjectUnavailable
                }
            };
            return Err(Refusal::new(reason, e.to_string()));
        }
    };
    let got = hex::encode(Sha256::digest(&buf));
    if got != digest {
        return Err(Refusal::new(
            RejectReason::DigestMismatch,
            format!("object digest {got} != header {digest}"),
        ));
    }
    Ok(Bytes::from(buf))
}
