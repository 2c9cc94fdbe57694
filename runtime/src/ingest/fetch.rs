//! The upload path of an update (docs/protocol.md, "Uploads"): the payload was published in
//! chunks on `<prefix>.<job>.upload.<client>.<round>.<i>` (stream `UPLOADS_<job>`), and the
//! message names their count, length and SHA-256. The gateway reads only the publishing
//! client's own upload for the message's round (the subject is its authenticated identity),
//! refuses one larger than the job allows before reading a chunk, reads every chunk with a
//! bounded direct get, and checks the lengths and the digest.

use std::time::Duration;

use bytes::Bytes;
use shoal_client::uploads::{self, UploadBuf, UploadReadError};
use shoal_proto::headers::Upload;
use shoal_proto::{ClientId, JobId, JobSpec, RejectReason, RoundId};

use super::reject::Refusal;
use crate::nats::Infra;

/// Reads `client`'s upload for `round` as `upload` declares it, within `timeout`. Returns the
/// payload and the stream sequence just past the chunks read (what to purge below once the
/// update is settled). A refused upload's chunks that were read are purged here.
///
/// # Errors
/// A [`Refusal`]: `payload_too_large` from the declared size, `object_unavailable` for a
/// missing chunk (or a read slower than `timeout`), `malformed` for chunks that do not add up,
/// `digest_mismatch` for bytes that do not match.
pub async fn fetch_upload(
    infra: &Infra,
    who: (&JobId, &ClientId, RoundId),
    upload: &Upload,
    spec: &JobSpec,
    timeout: Duration,
) -> Result<(Bytes, u64), Refusal> {
    let job = who.0;
    let max_payload = infra.max_payload() as u64;
    let limits = (spec.chunk_limit(max_payload), spec.update_byte_limit());
    let stream = infra.js.get_stream_no_info(infra.subjects.uploads_stream(job)).await.map_err(|e| {
        Refusal::new(RejectReason::ObjectUnavailable, format!("the job's upload stream: {e}"))
    })?;
    let mut buf = UploadBuf::default();
    let read = uploads::read(&stream, &infra.subjects, who, upload, limits, &mut buf);
    let refusal = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => return Ok((Bytes::from(buf.bytes), buf.last_seq + 1)),
        Err(_) => {
            Refusal::new(RejectReason::ObjectUnavailable, format!("upload not read within {timeout:?}"))
        }
        Ok(Err(e)) => {
            let reason = match e {
                UploadReadError::TooLarge { .. } => RejectReason::PayloadTooLarge,
                UploadReadError::Digest { .. } => RejectReason::DigestMismatch,
                UploadReadError::Malformed(_) => RejectReason::Malformed,
                UploadReadError::MissingChunk { .. } => RejectReason::ObjectUnavailable,
            };
            Refusal::new(reason, e.to_string())
        }
    };
    if buf.last_seq > 0 {
        uploads::purge(&stream, &infra.subjects, who, Some(buf.last_seq + 1)).await;
    }
    Err(refusal)
}
