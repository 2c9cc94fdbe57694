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

use shoal_client::uploads::{self, ChunkSink, SinkOr, UploadReadError};
use shoal_functions::tensor::{StreamPlan, StreamStager};
use shoal_functions::ModelManifest;
use shoal_proto::headers::Upload;
use shoal_proto::{ClientId, JobId, JobSpec, RejectReason, RoundId};

use super::reject::Refusal;
use crate::nats::Infra;
use crate::staging::stream::SlotWriter;

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
    let stager = StreamStager::new(manifest, slot, upload.bytes).map_err(|e| validation(&e))?;
    read_upload(infra, who, upload, spec, &mut Whole(Some(stager)), timeout).await
}

/// [`stage_upload`] into a slot that the function host folds while it is written
/// (fold-while-staging, [`crate::staging::stream`]): after each chunk the slot's final prefix
/// is published; the read stops early when the reader has stopped (it refused the update, or
/// dropped it). NaN/Inf are the reader's to find (it checks each piece before folding it).
///
/// # Errors
/// As [`stage_upload`]; when the reader stopped, a refusal the caller replaces with the
/// reader's own reason ([`SlotWriter::reader_stopped`]).
pub async fn stream_upload(
    infra: &Infra,
    who: (&JobId, &ClientId, RoundId),
    upload: &Upload,
    spec: &JobSpec,
    (manifest, writer): (&ModelManifest, &SlotWriter),
    timeout: Duration,
) -> Result<u64, Refusal> {
    let plan = StreamPlan::new(manifest, upload.bytes).map_err(|e| validation(&e))?;
    for r in plan.padding() {
        writer.zero(r.start, r.end);
    }
    read_upload(infra, who, upload, spec, &mut Streamed { plan, writer }, timeout).await
}

/// Where an upload's chunks go as they arrive, and the check once all came.
trait Target: ChunkSink<Error = Refusal> {
    fn finish(&mut self) -> Result<(), Refusal>;
}

/// A slot the gateway owns until the update is staged whole.
struct Whole<'a>(Option<StreamStager<'a>>);

impl ChunkSink for Whole<'_> {
    type Error = Refusal;
    fn push(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        match &mut self.0 {
            Some(s) => s.push(chunk).map_err(|e| validation(&e)),
            None => Err(Refusal::new(RejectReason::Malformed, "a chunk after the end")),
        }
    }
}

impl Target for Whole<'_> {
    fn finish(&mut self) -> Result<(), Refusal> {
        match self.0.take() {
            Some(s) => s.finish().map_err(|e| validation(&e)),
            None => Ok(()),
        }
    }
}

/// A slot the function host folds while it is written.
struct Streamed<'a> {
    plan: StreamPlan<'a>,
    writer: &'a SlotWriter,
}

impl Streamed<'_> {
    fn reader_stopped(&self) -> Result<(), Refusal> {
        match self.writer.reader_stopped() {
            None => Ok(()),
            Some(why) => Err(Refusal::new(
                why.as_ref().map_or(RejectReason::ObjectUnavailable, |w| w.reason),
                why.map_or_else(|| "the function host stopped reading the update".into(), |w| w.detail),
            )),
        }
    }
}

impl ChunkSink for Streamed<'_> {
    type Error = Refusal;
    fn push(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        let writer = self.writer;
        let mut inside = true;
        self.plan.push(chunk, |at, src| inside &= writer.write(at, src)).map_err(|e| validation(&e))?;
        if !inside {
            return Err(Refusal::new(RejectReason::Malformed, "tensor data past the slot"));
        }
        writer.advance(self.plan.staged_prefix());
        self.reader_stopped()
    }

    /// Staging stays at most [`STREAM_AHEAD_BYTES`] ahead of what the host has folded, so the
    /// slot's resident part stays a few chunks, not the update.
    fn ready(&mut self) -> impl std::future::Future<Output = ()> + Send {
        self.writer.until_folded_within(STREAM_AHEAD_BYTES)
    }
}

impl Target for Streamed<'_> {
    fn finish(&mut self) -> Result<(), Refusal> {
        self.plan.finish().map_err(|e| validation(&e))?;
        self.writer.advance(self.plan.staged_prefix());
        self.reader_stopped()
    }
}

/// How far the gateway stages an update ahead of the host's fold (fold-while-staging).
pub const STREAM_AHEAD_BYTES: usize = 8 << 20;

fn validation(e: &shoal_functions::ValidationError) -> Refusal {
    Refusal::new(RejectReason::from(e), e.to_string())
}

/// Reads the upload into `target` within `timeout`; on a refusal purges the chunks read.
async fn read_upload(
    infra: &Infra,
    who: (&JobId, &ClientId, RoundId),
    upload: &Upload,
    spec: &JobSpec,
    target: &mut impl Target,
    timeout: Duration,
) -> Result<u64, Refusal> {
    let job = who.0;
    let max_payload = infra.max_payload() as u64;
    let limits = (spec.chunk_limit(max_payload), spec.update_byte_limit());
    let stream = infra.js.get_stream_no_info(infra.subjects.uploads_stream(job)).await.map_err(|e| {
        Refusal::new(RejectReason::ObjectUnavailable, format!("the job's upload stream: {e}"))
    })?;
    let mut last_seq = 0;
    let read = async {
        uploads::read_into(&stream, &infra.subjects, who, upload, limits, &mut last_seq, target)
            .await
            .map_err(|e| match e {
                SinkOr::Sink(r) => r,
                SinkOr::Read(e) => read_refusal(e),
            })?;
        target.finish()
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
