//! The upload path of large client updates (docs/protocol.md, "Uploads"): the payload goes in
//! chunks of the job's `chunk_bytes` to `<prefix>.<job>.upload.<client>.<round>.<i>` in the job's
//! own stream `UPLOADS_<job>`, then the update message names the chunk count, the byte length and
//! the SHA-256. A client may publish only below its own `…upload.<client>.>`; the stream allows no
//! rollup and holds at most the job's upload quota, so one client cannot touch another's upload
//! and one job cannot fill the store for others.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use shoal_proto::headers::Upload;
use shoal_proto::subjects::Subjects;
use shoal_proto::{ClientId, JobId, JobSpec, RoundId};

use crate::error::{Error, Result};

/// Creates the upload stream of `spec`'s job (`replicas` of it), idempotently:
/// one message per subject (a re-sent chunk replaces the earlier one), no rollup, new
/// messages refused once the quota is full, chunks kept at most 24 h.
///
/// # Errors
/// [`Error::Nats`] when the stream cannot be created.
pub async fn ensure_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    spec: &JobSpec,
    replicas: usize,
) -> Result<stream::Stream> {
    let config = stream::Config {
        name: subjects.uploads_stream(&spec.job),
        subjects: vec![subjects.all_uploads(&spec.job)],
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        max_bytes: i64::try_from(spec.upload_quota()).unwrap_or(i64::MAX),
        max_age: Duration::from_secs(24 * 3600),
        discard: stream::DiscardPolicy::New,
        allow_rollup: false,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    match js.get_or_create_stream(config.clone()).await {
        Ok(s) => Ok(s),
        // Created concurrently by another process: open it.
        Err(e) => {
            js.get_stream(&config.name).await.map_err(|_| Error::nats("create the job's upload stream", e))
        }
    }
}

/// Publishes `payload` as the chunks of `client`'s upload for `round`, waiting for every ack.
/// Returns the upload's description for the update message's headers.
///
/// # Errors
/// [`Error::UploadQuotaFull`] when the job's upload stream is full; other NATS errors.
pub async fn publish(
    js: &jetstream::Context,
    subjects: &Subjects,
    (job, client, round): (&JobId, &ClientId, RoundId),
    payload: &Bytes,
    chunk_bytes: u64,
    sha256: &str,
) -> Result<Upload> {
    let chunk = usize::try_from(chunk_bytes.max(1)).unwrap_or(usize::MAX);
    let mut chunks = 0u64;
    for (i, start) in (0..payload.len().max(1)).step_by(chunk).enumerate() {
        let end = (start + chunk).min(payload.len());
        let subject = subjects.upload_chunk(job, client, round, i as u64);
        let ack = js
            .publish(subject, payload.slice(start..end))
            .await
            .map_err(|e| Error::nats("publish an upload chunk", e))?;
        ack.await.map_err(|e| {
            if e.to_string().contains("maximum bytes exceeded") {
                Error::UploadQuotaFull { job: job.to_string() }
            } else {
                Error::nats("publish an upload chunk (ack)", e)
            }
        })?;
        chunks += 1;
    }
    Ok(Upload { chunks, bytes: payload.len() as u64, sha256: sha256.to_owned() })
}

/// Why an upload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UploadReadError {
    /// A chunk is missing (never published, expired, or purged). Shown counting from 1.
    #[error("upload chunk {} of {chunks} is missing ({detail})", index + 1)]
    MissingChunk {
        /// The chunk's index (from 0).
        index: u64,
        /// Chunks declared.
        chunks: u64,
        /// The store's answer.
        detail: String,
    },
    /// The declared size is over the caller's limit (found before reading any chunk).
    #[error("upload of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Declared bytes.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The chunks do not add up to the declared count and length.
    #[error("upload malformed: {0}")]
    Malformed(String),
    /// The bytes do not match the declared SHA-256.
    #[error("upload digest {got} differs from the declared {want}")]
    Digest {
        /// The digest of the bytes read.
        got: String,
        /// The declared one.
        want: String,
    },
}

/// Chunk reads [`read_into`] keeps in flight: enough to cover a direct get's round trip on
/// loopback while hashing and copying the chunk before, few enough that the chunks waiting
/// stay a few MiB (chunks are at most `max_payload`).
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// Why [`read_into`] stopped: the upload itself, or the sink refused a chunk.
#[derive(Debug)]
pub enum SinkOr<E> {
    /// The upload is missing, malformed, too large or does not match its digest.
    Read(UploadReadError),
    /// The sink refused a chunk (e.g. a header that does not match the job's manifest).
    Sink(E),
}

/// Where [`read_into`] puts an upload's chunks, in order.
pub trait ChunkSink: Send {
    /// Why the sink refuses a chunk.
    type Error;
    /// Takes the next chunk.
    ///
    /// # Errors
    /// The sink refuses it (the read stops).
    fn push(&mut self, chunk: &[u8]) -> std::result::Result<(), Self::Error>;
    /// Awaited after each chunk: a sink that cannot take more yet holds the read back
    /// (backpressure). Ready at once by default.
    fn ready(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// Reads `client`'s upload for `round` (as the update message declares it in `upload`) with
/// direct gets, without assembling the payload: refuses before reading when the declared size
/// is over `max_bytes` or inconsistent with `chunk_bytes`, checks every chunk's length, hands
/// each chunk to `sink` as it arrives (in order) and computes the SHA-256 in the same pass.
/// `last_seq` gets the highest stream sequence read (0: none; purging below it + 1 removes
/// exactly what was read, never a chunk the client re-sent since). The digest is checked after
/// the last chunk, so a sink must treat its bytes as unverified until this returns `Ok` (the
/// gateway stages into a slot it releases on error).
///
/// # Errors
/// [`SinkOr::Read`] with the [`UploadReadError`] naming what is wrong; [`SinkOr::Sink`] with the
/// sink's error (nothing more is read).
pub async fn read_into<I, S: ChunkSink>(
    stream: &stream::Stream<I>,
    subjects: &Subjects,
    (job, client, round): (&JobId, &ClientId, RoundId),
    upload: &Upload,
    (chunk_bytes, max_bytes): (u64, u64),
    last_seq: &mut u64,
    sink: &mut S,
) -> std::result::Result<(), SinkOr<S::Error>> {
    use sha2::{Digest, Sha256};
    if upload.bytes > max_bytes {
        return Err(SinkOr::Read(UploadReadError::TooLarge { bytes: upload.bytes, limit: max_bytes }));
    }
    if upload.chunks != upload.bytes.div_ceil(chunk_bytes.max(1)).max(1) {
        let expected = upload.bytes.div_ceil(chunk_bytes.max(1)).max(1);
        return Err(SinkOr::Read(UploadReadError::Malformed(format!(
            "{} chunks declared for {} bytes in chunks of {chunk_bytes}; expected {expected}",
            upload.chunks, upload.bytes
        ))));
    }
    use futures::StreamExt as _;
    *last_seq = 0;
    let mut hasher = Sha256::new();
    // Several direct gets in flight, answers taken in chunk order: the reads overlap their round
    // trips while the sink and the hash see the same sequence as one read at a time.
    let mut gets = futures::stream::iter(0..upload.chunks)
        .map(|i| {
            let subject = subjects.upload_chunk(job, client, round, i);
            async move { (i, stream.direct_get_last_for_subject(subject).await) }
        })
        .buffered(CHUNKS_IN_FLIGHT);
    while let Some((i, got)) = gets.next().await {
        let m = got.map_err(|e| {
            SinkOr::Read(UploadReadError::MissingChunk {
                index: i,
                chunks: upload.chunks,
                detail: e.to_string(),
            })
        })?;
        *last_seq = (*last_seq).max(m.sequence);
        let want = if i + 1 < upload.chunks {
            chunk_bytes
        } else {
            upload.bytes - chunk_bytes * (upload.chunks - 1)
        };
        if m.payload.len() as u64 != want {
            return Err(SinkOr::Read(UploadReadError::Malformed(format!(
                "chunk {i} has {} bytes, {want} expected",
                m.payload.len()
            ))));
        }
        hasher.update(&m.payload);
        sink.push(&m.payload).map_err(SinkOr::Sink)?;
        sink.ready().await;
    }
    let got = hex::encode(hasher.finalize());
    if got != upload.sha256 {
        return Err(SinkOr::Read(UploadReadError::Digest { got, want: upload.sha256.clone() }));
    }
    Ok(())
}

/// Deletes the chunks of `client`'s upload for `round`: those stored below stream sequence
/// `below` (the chunks a read saw: a chunk the client re-sent since survives), or all of them
/// when `below` is `None`. Best effort: the stream's max age removes what is left.
pub async fn purge<I>(
    stream: &stream::Stream<I>,
    subjects: &Subjects,
    (job, client, round): (&JobId, &ClientId, RoundId),
    below: Option<u64>,
) {
    let filter = subjects.upload_chunks(job, client, round);
    let purge = stream.purge().filter(filter.clone());
    let result = match below {
        Some(seq) => purge.sequence(seq).await,
        None => purge.await,
    };
    if let Err(e) = result {
        tracing::debug!(%filter, error = %e, "purging a settled upload failed (its chunks expire)");
    }
}

/// Deletes the chunks matching `filter` (a subject of the job's upload stream, wildcards
/// allowed): what the node does when a synchronous round closes (every upload of it) and when
/// the job ends (all of them). Best effort: the stream's max age removes what is left.
pub async fn purge_matching<I>(stream: &stream::Stream<I>, filter: String) {
    if let Err(e) = stream.purge().filter(filter.clone()).await {
        tracing::debug!(%filter, error = %e, "purging uploads failed (they expire)");
    }
}
