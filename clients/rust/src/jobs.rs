//! The job store in NATS: creating a job (spec, initial model, state), reading a job's spec
//! and state, the compare-and-set of the state, and the models in `shoal-models`.
//!
//! Reads of the spec and state are JetStream *direct gets* of the KV key's last message
//! ([`read_key`]): they need no stream information and fit a client's least permissions.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use shoal_functions::Parameters;
use shoal_proto::subjects;
use shoal_proto::{JobId, JobSpec, JobState, ModelVersion};

use crate::error::{Error, Result};
use crate::provision::Infra;

/// The last value of KV key `key` in `bucket` and its revision, read with a direct get of the
/// last message on `$KV.<bucket>.<key>`; `None` when the key does not exist or was deleted or
/// purged.
///
/// # Errors
/// [`Error::Nats`] when the bucket's stream does not exist (no node has run) or the read fails.
pub async fn read_key(js: &jetstream::Context, bucket: &str, key: &str) -> Result<Option<(Bytes, u64)>> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let stream = js
        .get_stream_no_info(subjects::kv_stream(bucket))
        .await
        .map_err(|e| Error::nats("open KV stream (has a node run?)", e))?;
    match stream.direct_get_last_for_subject(format!("$KV.{bucket}.{key}")).await {
        Ok(m) => {
            let op = m.headers.get("KV-Operation").map(|v| v.as_str().to_owned());
            if matches!(op.as_deref(), Some("DEL" | "PURGE")) {
                return Ok(None);
            }
            Ok(Some((m.payload, m.sequence)))
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::nats("read KV key", e)),
    }
}

/// Creates a job: initial model (version 0; zeros when `initial` is `None`), spec, then state
/// (round 1 waiting to open), which makes the job exist; a node picks it up from there. A
/// create interrupted before the state was written can be run again.
///
/// The stored spec carries the limits clients must respect ([`JobSpec::with_published_limits`]:
/// the inline limit, the upload chunk size and quota), and the job's upload stream
/// (`UPLOADS_<job>`) is created with it.
///
/// # Errors
/// [`Error::Spec`] for an invalid spec (or limits that do not fit the server's `max_payload`),
/// [`Error::PayloadTooLarge`] for a spec larger than the server's `max_payload` (nothing is
/// written), [`Error::JobExists`], NATS errors.
pub async fn create_job(infra: &Infra, spec: &JobSpec, initial: Option<&Parameters>) -> Result<()> {
    shoal_functions::factory::validate(spec)?;
    // The limits a client must respect are published in the stored spec.
    let spec = &spec.clone().with_published_limits(infra.max_payload() as u64)?;
    let manifest = Arc::new(spec.manifest.clone());
    let zeros;
    let initial = match initial {
        Some(p) => {
            if **p.manifest() != *manifest {
                return Err(Error::Model(shoal_functions::Error::ManifestMismatch(
                    "initial model vs job manifest",
                )));
            }
            p
        }
        None => {
            zeros = Parameters::zeros(Arc::clone(&manifest));
            &zeros
        }
    };
    // A spec over the server's max_payload could never be stored: say so now, as a size error,
    // before anything is written.
    let encoded = Bytes::from(shoal_proto::encode(spec));
    if encoded.len() > infra.max_payload() {
        return Err(Error::PayloadTooLarge {
            what: "job spec",
            size: encoded.len(),
            limit: infra.max_payload(),
            limit_name: "the server's max_payload",
        });
    }
    // The job exists once its state exists; the state is written last. An interrupted create
    // (spec or model written, no state) is simply redone by the next create.
    let state_key = subjects::job_state_key(&spec.job);
    if infra.jobs.get(&state_key).await.map_err(|e| Error::nats("read job state", e))?.is_some() {
        return Err(Error::JobExists(spec.job.to_string()));
    }
    put_model(infra, &spec.job, ModelVersion(0), initial).await?;
    crate::uploads::ensure_stream(&infra.js, &infra.subjects, spec).await?;
    infra
        .jobs
        .put(subjects::job_spec_key(&spec.job), encoded)
        .await
        .map_err(|e| Error::nats("write job spec", e))?;
    match infra.jobs.create(&state_key, Bytes::from(shoal_proto::encode(&JobState::new_job()))).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
            Err(Error::JobExists(spec.job.to_string()))
        }
        Err(e) => Err(Error::nats("create job state", e)),
    }
}

/// Loads a job's spec.
///
/// # Errors
/// [`Error::UnknownJob`], [`Error::Decode`], NATS errors.
pub async fn load_spec(js: &jetstream::Context, job: &JobId) -> Result<JobSpec> {
    let (bytes, _) = read_key(js, subjects::JOBS_BUCKET, &subjects::job_spec_key(job))
        .await?
        .ok_or_else(|| Error::UnknownJob(job.to_string()))?;
    Ok(shoal_proto::decode("job spec", &bytes)?)
}

/// Loads a job's state and its KV revision.
///
/// # Errors
/// [`Error::UnknownJob`], [`Error::Decode`], NATS errors.
pub async fn load_state(js: &jetstream::Context, job: &JobId) -> Result<(JobState, u64)> {
    let (bytes, revision) = read_key(js, subjects::JOBS_BUCKET, &subjects::job_state_key(job))
        .await?
        .ok_or_else(|| Error::UnknownJob(job.to_string()))?;
    Ok((shoal_proto::decode("job state", &bytes)?, revision))
}

/// Outcome of a compare-and-set of the job state.
#[derive(Debug)]
pub enum CasOutcome {
    /// Written; the new revision.
    Written(u64),
    /// Someone else wrote first.
    Conflict,
}

/// Writes `state` if the stored revision is still `revision`.
///
/// # Errors
/// NATS errors other than a revision conflict.
pub async fn cas_state(infra: &Infra, job: &JobId, state: &JobState, revision: u64) -> Result<CasOutcome> {
    match infra
        .jobs
        .update(subjects::job_state_key(job), Bytes::from(shoal_proto::encode(state)), revision)
        .await
    {
        Ok(rev) => Ok(CasOutcome::Written(rev)),
        Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
            Ok(CasOutcome::Conflict)
        }
        Err(e) => Err(Error::nats("update job state", e)),
    }
}

/// Stores a model version (overwriting an identical earlier write of the same version is
/// harmless, which makes a commit retried after a crash idempotent).
///
/// # Errors
/// NATS or encoding errors.
pub async fn put_model(infra: &Infra, job: &JobId, version: ModelVersion, params: &Parameters) -> Result<()> {
    let bytes = params.to_safetensors().map_err(Error::Model)?;
    let chunk = chunk_size(infra.max_payload());
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: subjects::model_object(job, version),
        chunk_size: Some(chunk),
        ..Default::default()
    };
    infra.models.put(meta, &mut bytes.as_slice()).await.map_err(|e| Error::nats("store model", e))?;
    Ok(())
}

/// Fetches a model version as safetensors bytes.
///
/// # Errors
/// NATS errors (including a missing version).
pub async fn get_model_bytes(infra: &Infra, job: &JobId, version: ModelVersion) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut obj = infra
        .models
        .get(subjects::model_object(job, version))
        .await
        .map_err(|e| Error::nats("fetch model", e))?;
    let mut buf = Vec::with_capacity(obj.info().size);
    obj.read_to_end(&mut buf).await.map_err(|e| Error::io("read model object", e))?;
    Ok(buf)
}

/// Stores the strategy state committed with model `version` (bytes of
/// `shoal_functions::Strategy::save_state`), before the job state names that version.
///
/// # Errors
/// NATS errors.
pub async fn put_strategy_state(
    infra: &Infra,
    job: &JobId,
    version: ModelVersion,
    state: &[u8],
) -> Result<()> {
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: subjects::strategy_state_object(job, version),
        chunk_size: Some(chunk_size(infra.max_payload())),
        ..Default::default()
    };
    let mut reader = state;
    infra.models.put(meta, &mut reader).await.map_err(|e| Error::nats("store strategy state", e))?;
    Ok(())
}

/// The strategy state committed with model `version`; `Ok(None)` when none was stored (a job
/// committed before strategy state was persisted, or version 0).
///
/// # Errors
/// NATS errors other than "not found".
pub async fn get_strategy_state(
    infra: &Infra,
    job: &JobId,
    version: ModelVersion,
) -> Result<Option<Vec<u8>>> {
    use async_nats::jetstream::object_store::GetErrorKind;
    use tokio::io::AsyncReadExt;
    let mut obj = match infra.models.get(subjects::strategy_state_object(job, version)).await {
        Ok(o) => o,
        Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::nats("fetch strategy state", e)),
    };
    let mut buf = Vec::with_capacity(obj.info().size);
    obj.read_to_end(&mut buf).await.map_err(|e| Error::io("read strategy state", e))?;
    Ok(Some(buf))
}

/// Object-store chunk size for a server's `max_payload`: 1 MiB, or less when `max_payload` is
/// smaller (64 KiB kept for headers; at least 64 KiB).
pub fn chunk_size(max_payload: usize) -> usize {
    max_payload.saturating_sub(64 * 1024).clamp(64 * 1024, 1 << 20)
}
