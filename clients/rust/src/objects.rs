//! Object-store reads and writes for clients with least permissions, in the NATS object-store
//! format (so the node reads them with the ordinary `ObjectStore` API).
//!
//! The async-nats `ObjectStore::put` first reads the existing object's metadata, and `get`
//! creates a consumer that delivers the chunks. A client may do neither: reading metadata of
//! `shoal-updates` would show other clients' object names and digests, and creating consumers
//! would let it point deliveries at subjects of its choice. So:
//! - [`put_object`] publishes the chunks to `$O.<bucket>.C.<nuid>` and then the metadata to
//!   `$O.<bucket>.M.<base64url(name)>` (with `Nats-Rollup: sub`), awaiting every ack, and reads
//!   nothing;
//! - [`read_object`] reads the metadata with a direct get of the last message on its subject,
//!   then each chunk with a direct get of the next message on the chunk subject, and checks
//!   size and SHA-256 digest. No consumer is created. [`read_object_into`] does the same into a
//!   [`ChunkSink`] (a file, with progress), so a large model need not fit in memory.

use async_nats::jetstream::object_store::{ObjectInfo, ObjectOptions};
use async_nats::HeaderMap;
use base64::Engine as _;
use bytes::Bytes;
use rand::Rng;
use sha2::{Digest, Sha256};

use async_nats::jetstream;
use shoal_proto::subjects;

use crate::error::{Error, Result};

/// A NUID-shaped random token (22 base62 characters) naming an object's chunks.
fn nuid() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..22).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// Puts `data` into object store `bucket` as `name`, in chunks of `chunk_size` bytes. Needs
/// publish permission on `$O.<bucket>.C.*` and `$O.<bucket>.M.*` only. A replaced object's
/// old chunks are not purged (the bucket's max age removes them).
///
/// # Errors
/// NATS errors (a refused publish shows as [`Error::Unauthorized`] when guarded by
/// [`crate::auth::Violations::guard`]).
pub async fn put_object(
    js: &jetstream::Context,
    bucket: &str,
    name: &str,
    data: &Bytes,
    chunk_size: usize,
) -> Result<()> {
    let chunk_size = chunk_size.max(1);
    let nuid = nuid();
    let chunk_subject = subjects::object_chunks(bucket, &nuid);
    let mut chunks = 0;
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + chunk_size).min(data.len());
        js.publish(chunk_subject.clone(), data.slice(offset..end))
            .await
            .map_err(|e| Error::nats("publish object chunk", e))?
            .await
            .map_err(|e| Error::nats("publish object chunk (ack)", e))?;
        chunks += 1;
        offset = end;
    }
    let info = ObjectInfo {
        name: name.to_owned(),
        description: None,
        metadata: Default::default(),
        headers: None,
        options: Some(ObjectOptions { link: None, max_chunk_size: Some(chunk_size) }),
        bucket: bucket.to_owned(),
        nuid,
        size: data.len(),
        chunks,
        modified: None,
        digest: Some(format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(Sha256::digest(data))
        )),
        deleted: false,
    };
    let meta = serde_json::to_vec(&info)
        .map_err(|e| Error::Decode { what: "object info", detail: e.to_string() })?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    js.publish_with_headers(subjects::object_meta(bucket, name), headers, Bytes::from(meta))
        .await
        .map_err(|e| Error::nats("publish object metadata", e))?
        .await
        .map_err(|e| Error::nats("publish object metadata (ack)", e))?;
    Ok(())
}

/// Why [`read_object_checked`] could not return an object's bytes.
#[derive(Debug, thiserror::Error)]
pub enum ObjectReadError {
    /// The object (its metadata) does not exist, was deleted, or could not be read.
    #[error("object {name:?} is unavailable: {detail}")]
    Missing {
        /// Object name.
        name: String,
        /// Why.
        detail: String,
    },
    /// The metadata lists more chunks than the store holds (a chunk was lost or purged, or the
    /// upload never finished).
    #[error("object {name:?}: chunk {index} of {chunks} is missing ({detail})")]
    MissingChunk {
        /// Object name.
        name: String,
        /// 1-based index of the first missing chunk.
        index: usize,
        /// Chunks the metadata lists.
        chunks: usize,
        /// The store's answer.
        detail: String,
    },
    /// The object is larger than the caller accepts (from its metadata, before any chunk is read).
    #[error("object {name:?} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Object name.
        name: String,
        /// Size from the metadata.
        size: usize,
        /// The caller's limit.
        limit: usize,
    },
    /// The chunks read do not add up to the recorded size and SHA-256 digest.
    #[error("object {name:?}: {detail}")]
    Corrupt {
        /// Object name.
        name: String,
        /// What differs.
        detail: String,
    },
    /// The [`ChunkSink`] failed (e.g. the output file could not be written).
    #[error("object {name:?}: writing it failed: {source}")]
    Sink {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Reads object `name` of object store `bucket` with direct gets only. Needs publish permission
/// on `$JS.API.DIRECT.GET.OBJ_<bucket>` and `$JS.API.DIRECT.GET.OBJ_<bucket>.>`.
///
/// # Errors
/// [`Error::Nats`] when the object is missing or deleted or a read fails; [`Error::Decode`]
/// when the chunks do not add up to the recorded size and digest.
pub async fn read_object(js: &jetstream::Context, bucket: &str, name: &str) -> Result<Vec<u8>> {
    read_object_checked(js, bucket, name, usize::MAX).await.map_err(|e| match e {
        ObjectReadError::Corrupt { .. } => Error::Decode { what: "object", detail: e.to_string() },
        other => Error::nats("read object", other),
    })
}

/// Where [`read_object_into`] puts an object's bytes, chunk by chunk.
pub trait ChunkSink {
    /// Called once with the object's size (from its metadata) before the first chunk.
    ///
    /// # Errors
    /// An I/O error ends the read.
    fn start(&mut self, size: usize) -> std::io::Result<()> {
        let _ = size;
        Ok(())
    }

    /// Called with each chunk, in order.
    ///
    /// # Errors
    /// An I/O error ends the read.
    fn chunk(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

impl ChunkSink for Vec<u8> {
    fn start(&mut self, size: usize) -> std::io::Result<()> {
        self.reserve_exact(size);
        Ok(())
    }

    fn chunk(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// Reads object `name` of `bucket` chunk by chunk with direct gets, refusing one whose metadata
/// says it is larger than `limit` before reading any chunk. Every read is a bounded request: a
/// missing chunk is an error, never a wait (an ordered consumer would wait for it forever).
///
/// # Errors
/// The [`ObjectReadError`] naming what went wrong.
pub async fn read_object_checked(
    js: &jetstream::Context,
    bucket: &str,
    name: &str,
    limit: usize,
) -> Result<Vec<u8>, ObjectReadError> {
    let mut data = Vec::new();
    read_object_into(js, bucket, name, limit, &mut data).await?;
    Ok(data)
}

/// [`read_object_checked`] into any [`ChunkSink`] (a file, with progress): the chunks go to
/// `sink` as they arrive, and the size and SHA-256 digest recorded in the object's metadata are
/// checked over what was written. Returns the object's metadata. A sink that fails ends the read
/// with [`ObjectReadError::Sink`]; what it holds then is incomplete.
///
/// # Errors
/// The [`ObjectReadError`] naming what went wrong.
pub async fn read_object_into(
    js: &jetstream::Context,
    bucket: &str,
    name: &str,
    limit: usize,
    sink: &mut impl ChunkSink,
) -> Result<ObjectInfo, ObjectReadError> {
    let missing = |detail: String| ObjectReadError::Missing { name: name.to_owned(), detail };
    let corrupt = |detail: String| ObjectReadError::Corrupt { name: name.to_owned(), detail };
    let sink_error = |source: std::io::Error| ObjectReadError::Sink { name: name.to_owned(), source };
    let stream = js
        .get_stream_no_info(subjects::object_stream(bucket))
        .await
        .map_err(|e| missing(format!("open object stream: {e}")))?;
    let meta = stream
        .direct_get_last_for_subject(subjects::object_meta(bucket, name))
        .await
        .map_err(|e| missing(format!("read object info: {e}")))?;
    let info: ObjectInfo =
        serde_json::from_slice(&meta.payload).map_err(|e| corrupt(format!("object info: {e}")))?;
    if info.deleted {
        return Err(missing("it was deleted".into()));
    }
    if info.size > limit {
        return Err(ObjectReadError::TooLarge { name: name.to_owned(), size: info.size, limit });
    }
    if info.chunks > info.size.max(1) {
        return Err(corrupt(format!("{} chunks for {} bytes", info.chunks, info.size)));
    }
    sink.start(info.size).map_err(sink_error)?;
    let chunk_subject = subjects::object_chunks(bucket, &info.nuid);
    let mut hasher = Sha256::new();
    let mut read = 0usize;
    let mut seq = 1;
    for index in 1..=info.chunks {
        let chunk =
            stream.direct_get_next_for_subject(chunk_subject.clone(), Some(seq)).await.map_err(|e| {
                ObjectReadError::MissingChunk {
                    name: name.to_owned(),
                    index,
                    chunks: info.chunks,
                    detail: e.to_string(),
                }
            })?;
        if read + chunk.payload.len() > info.size {
            return Err(corrupt(format!("chunks hold more than the recorded {} bytes", info.size)));
        }
        hasher.update(&chunk.payload);
        sink.chunk(&chunk.payload).map_err(sink_error)?;
        read += chunk.payload.len();
        seq = chunk.sequence + 1;
    }
    let digest = format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(hasher.finalize()));
    if read != info.size {
        return Err(corrupt(format!("{read} bytes read, {} recorded", info.size)));
    }
    if info.digest.as_deref().is_some_and(|d| d != digest) {
        return Err(corrupt(format!("the chunks' digest {digest} differs from the recorded one")));
    }
    Ok(info)
}
