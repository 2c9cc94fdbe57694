//! The upload path of an update (docs/protocol.md, "Uploads"): the payload was published in
//! chunks on `<prefix>.<job>.upload.<client>.<round>.<i>` (stream `UPLOADS_<job>`), and the
//! message names their count, length and SHA-256. The gateway reads only the publishing
//! client's own upload for the message's round (the subject is its authenticated identity),
//! refuses one larger than the job allows before reading a chunk, reads every chunk with a
//! bounded direct get, and checks the lengths and the digest.
//!
//! [`stage_upload`] is the gateway's path: each chunk goes straight into the update's
//! shared-memory slot ([`StreamStager`]) and the SHA-256 is computed in the same pass, so an
//! uploaded update is never assembled in the gateway's heap (memory O(model), one copy).

use std::time::Duration;

use shoal_client::uploads::{self, SinkOr, UploadReadError};
use shoal_functions::tensor::StreamStager;
use shoal_functions::ModelManifest;
use shoal_proto::headers::Upload;
use shoal_proto::{ClientId, JobId, JobSpec, RejectReason, RoundId};

use super::reject::Refusal;
use crate::nats::Infra;

/// Reads `client`'s upload for `round` as `upload` declares it, within `timeout`, staging it
/// into `slot` as the chunks arrive: the schema is checked at the header (a mismatch stops the
/// read), the digest after the last chunk, NaN/Inf at the end. Returns the stream sequence just
/// past the chunks read (what to purge once the update is settled). On a refusal the chunks
/// read are purged here and the slot's content is unspecified (the caller releases it).
///
/// # Errors
/// A [`Refusal`]: `payload_too_large` from the declared size, `object_unavailable` for a
/// missing chunk (or a read slower than `timeout`), `malformed` for chunks that do not add up,
/// `digest_mismatch` for bytes that do not match; or the validation's reason (`schema_mismatch`,
/// `malformed`, `non_finite`, `too_many_tensors`).
pub async fn stage_upload(
    infra: &Infra,
    who: (&JobId, &ClientId, RoundId),
    upload: &Upload,
    spec: &JobSpec,
    (manifest, slot): (&ModelManifest, &mut [u8]),
    timeout: Duration,
) -> Result<u64, Refusal> {
    let job = who.0;
    let max_payload = infra.max_payload() as u64;
    let limits = (spec.chunk_limit(max_payload), spec.update_byte_limit());
    let stream = infra.js.get_stream_no_info(infra.subjects.uploads_stream(job)).await.map_err(|e| {
        Refusal::new(RejectReason::ObjectUnavailable, format!("the job's upload stream: {e}"))
    })?;
    let validation =
        |e: &shoal_functions::ValidationError| Refusal::new(RejectReason::from(e), e.to_string());
    let mut last_seq = 0;
    let read = async {
        let mut stager = StreamStager::new(manifest, slot, upload.bytes).map_err(|e| validation(&e))?;
        let mut sink = |chunk: &[u8]| stager.push(chunk);
        uploads::read_into(&stream, &infra.subjects, who, upload, limits, &mut last_seq, &mut sink)
            .await
            .map_err(|e| match e {
                SinkOr::Sink(e) => validation(&e),
                SinkOr::Read(e) => read_refusal(e),
            })?;
        stager.finish().map_err(|e| validation(&e))
    };
    let refusal = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => return Ok(last_seq + 1),
        Ok(Err(refusal)) => refusal,
        Err(_) => {
            Refusal::new(RejectReason::ObjectUnavailable, format!("upload not read within {timeout:?}"))
        }
    };
    if last_seq > 0 {
        uploads::purge(&stream, &infra.subjects, who, Some(last_seq + 1)).await;
    }
    Err(refusal)
}

/// The refusal for an upload that cannot be read as declared.
fn read_refusal(e: UploadReadError) -> Refusal {
    let reason = match e {
        UploadReadError::TooLarge { .. } => RejectReason::PayloadTooLarge,
        UploadReadError::Digest { .. } => RejectReason::DigestMismatch,
        UploadReadError::Malformed(_) => RejectReason::Malformed,
        UploadReadError::MissingChunk { .. } => RejectReason::ObjectUnavailable,
    };
    Refusal::new(reason, e.to_string())
}
