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

/// Reads the upload once without keeping it, checking everything a fold of it could trip
/// over (fold-while-staging's first pass): its schema, lengths and digest, and that every f32
/// is finite (the job's tensors are f32 when it folds while staging). An update that passes
/// is folded piece by piece on the second read ([`stream_upload`]); one that does not is
/// refused before anything of it is folded, so a bad update never costs a node its partial.
///
/// # Errors
/// As [`stage_upload`].
pub async fn verify_upload(
    infra: &Infra,
    who: (&JobId, &ClientId, RoundId),
    upload: &Upload,
    spec: &JobSpec,
    manifest: &ModelManifest,
    timeout: Duration,
) -> Result<u64, Refusal> {
    let plan = StreamPlan::new(manifest, upload.bytes).map_err(|e| validation(&e))?;
    read_upload(infra, who, upload, spec, &mut Verify { plan, manifest, carry: Vec::new() }, timeout).await
}

/// The first pass's target: the plan and the NaN/Inf check, nothing kept.
struct Verify<'a> {
    plan: StreamPlan<'a>,
    manifest: &'a ModelManifest,
    /// The first bytes of an f32 cut by the end of a chunk.
    carry: Vec<u8>,
}

impl ChunkSink for Verify<'_> {
    type Error = Refusal;
    fn push(&mut self, chunk: &[u8]) -> Result<(), Refusal> {
        let (m, carry) = (self.manifest, &mut self.carry);
        let mut bad = None;
        self.plan
            .push(chunk, |at, src| {
                if bad.is_none() {
                    bad = check_f32_piece(m, at, src, carry).err();
                }
            })
            .map_err(|e| validation(&e))?;
        bad.map_or(Ok(()), |e| Err(validation(&e)))
    }
}

impl Target for Verify<'_> {
    fn finish(&mut self) -> Result<(), Refusal> {
        self.plan.finish().map_err(|e| validation(&e))
    }
}

/// Checks the f32 elements in `src`, the bytes of slot offset `at` on (within one tensor, in
/// order): an element cut by the end of a chunk waits in `carry` for its other bytes.
fn check_f32_piece(
    m: &ModelManifest,
    at: usize,
    mut src: &[u8],
    carry: &mut Vec<u8>,
) -> Result<(), shoal_functions::ValidationError> {
    let slots = m.slots();
    let i = slots.partition_point(|s| s.byte_offset <= at).saturating_sub(1);
    let (Some(s), Some(t)) = (slots.get(i), m.tensors().get(i)) else { return Ok(()) };
    if t.dtype != shoal_functions::DType::F32 {
        return Ok(());
    }
    let mut rel = at - s.byte_offset;
    let bad =
        |rel: usize| shoal_functions::ValidationError::NonFinite { name: t.name.clone(), index: rel / 4 };
    if !rel.is_multiple_of(4) {
        let need = (4 - rel % 4).min(src.len());
        carry.extend_from_slice(&src[..need]);
        src = &src[need..];
        rel += need;
        if carry.len() == 4 {
            let v = f32::from_le_bytes([carry[0], carry[1], carry[2], carry[3]]);
            carry.clear();
            if !v.is_finite() {
                return Err(bad(rel - 4));
            }
        }
    }
    let mut words = src.chunks_exact(4);
    for (k, w) in words.by_ref().enumerate() {
        if !f32::from_le_bytes([w[0], w[1], w[2], w[3]]).is_finite() {
            return Err(bad(rel + 4 * k));
        }
    }
    carry.extend_from_slice(words.remainder());
    Ok(())
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

/// The function host's word on a streamed update so far: `Err` once it stopped reading it
/// (with its own reason when it refused the update).
///
/// # Errors
/// The refusal, as above.
pub fn reader_verdict(writer: &SlotWriter) -> Result<(), Refusal> {
    match writer.reader_stopped() {
        None => Ok(()),
        Some(Some(why)) => Err(Refusal::new(why.reason, why.detail)),
        Some(None) => {
            Err(Refusal::new(RejectReason::ObjectUnavailable, "the function host stopped reading the update"))
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
        reader_verdict(writer)
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
        reader_verdict(self.writer)
    }
}

/// How far the gateway stages an update ahead of the host's fold (fold-while-staging).
pub const STREAM_AHEAD_BYTES: usize = 4 << 20;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_functions::{DType, TensorSpec, ValidationError};

    /// The first read's NaN check sees every f32 whole, however the chunks cut the elements.
    #[test]
    fn an_element_cut_by_a_chunk_boundary_is_checked_whole() {
        let m = ModelManifest::new(vec![TensorSpec::new("a", DType::F32, vec![6])]).unwrap();
        let mut bytes: Vec<u8> =
            [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        for cut in 0..=bytes.len() {
            let mut carry = Vec::new();
            check_f32_piece(&m, 0, &bytes[..cut], &mut carry).unwrap();
            check_f32_piece(&m, cut, &bytes[cut..], &mut carry).unwrap();
            assert!(carry.is_empty(), "cut {cut}");
        }
        // A NaN in element 2 (bytes 8..12), cut in its middle: found when its last bytes come.
        bytes[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut carry = Vec::new();
        check_f32_piece(&m, 0, &bytes[..10], &mut carry).unwrap();
        let e = check_f32_piece(&m, 10, &bytes[10..], &mut carry).unwrap_err();
        assert!(matches!(e, ValidationError::NonFinite { index: 2, .. }), "{e:?}");
    }
}
