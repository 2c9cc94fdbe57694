//! The job store in NATS: creating a job (spec, initial model, state), reading a job's spec
//! and state, the compare-and-set of the state, and the models in `shoal-models`.
//!
//! Reads of the spec and state are JetStream *direct gets* of the KV key's last message
//! ([`read_key`]): they need no stream information and fit a client's least permissions.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use shoal_functions::Parameters;
use shoal_proto::subjects::{self, Subjects};
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
/// [`Error::Spec`] for an invalid spec (or limits that do not fit the server's `max_payload`,
/// or rounds larger than the gateway consumer's `max_ack_pending`),
/// [`Error::PayloadTooLarge`] for a spec larger than the server's `max_payload` (nothing is
/// written), [`Error::JobExists`], NATS errors.
pub async fn create_job(infra: &Infra, spec: &JobSpec, initial: Option<&Parameters>) -> Result<()> {
    shoal_functions::factory::validate(spec)?;
    check_ack_pending(infra, spec).await?;
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
    // As many replicas as the updates stream a node provisioned.
    let replicas = infra.updates.cached_info().config.num_replicas;
    crate::uploads::ensure_stream(&infra.js, &infra.subjects, spec, replicas).await?;
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

/// What reading a deployment's job keys needs: JetStream, and the deployment's names (its
/// prefix names the KV bucket). [`Infra`] and [`crate::Connection`] have both.
pub trait JobKeys {
    /// The JetStream context.
    fn js(&self) -> &jetstream::Context;
    /// The deployment's names.
    fn subjects(&self) -> &Subjects;
}

impl<T: JobKeys + ?Sized> JobKeys for &T {
    fn js(&self) -> &jetstream::Context {
        (**self).js()
    }
    fn subjects(&self) -> &Subjects {
        (**self).subjects()
    }
}

impl JobKeys for Infra {
    fn js(&self) -> &jetstream::Context {
        &self.js
    }
    fn subjects(&self) -> &Subjects {
        &self.subjects
    }
}

impl JobKeys for crate::Connection {
    fn js(&self) -> &jetstream::Context {
        &self.js
    }
    fn subjects(&self) -> &Subjects {
        &self.subjects
    }
}

/// Refuses a job whose rounds take more updates than the gateway consumer lets stay un-acked
/// (its `max_ack_pending`, `shoal node --max-ack-pending`): each update is acked only when its
/// round commits, so such a round could never complete. Nothing to check before a node has
/// created the consumer (the node checks again when the job starts).
///
/// # Errors
/// [`Error::Spec`] naming both numbers.
async fn check_ack_pending(infra: &Infra, spec: &JobSpec) -> Result<()> {
    let Ok(info) = infra.updates.consumer_info(infra.subjects.gateway_consumer()).await else {
        return Ok(());
    };
    let allowed = info.config.max_ack_pending;
    let per_round = spec.updates_per_round();
    if allowed > 0 && per_round > allowed as u64 {
        return Err(Error::Spec(shoal_proto::SpecError(format!(
            "a round of job {} takes {per_round} updates, each un-acked until the round commits, but the nodes' \
             gateway consumer allows {allowed} un-acked updates (shoal node --max-ack-pending)",
            spec.job
        ))));
    }
    Ok(())
}

/// Loads a job's spec.
///
/// # Errors
/// [`Error::UnknownJob`], [`Error::Decode`], NATS errors.
pub async fn load_spec(at: &impl JobKeys, job: &JobId) -> Result<JobSpec> {
    let (bytes, _) = read_key(at.js(), &at.subjects().jobs_bucket(), &subjects::job_spec_key(job))
        .await?
        .ok_or_else(|| Error::UnknownJob(job.to_string()))?;
    Ok(shoal_proto::decode("job spec", &bytes)?)
}

/// Loads a job's state and its KV revision.
///
/// # Errors
/// [`Error::UnknownJob`], [`Error::Decode`], NATS errors.
pub async fn load_state(at: &impl JobKeys, job: &JobId) -> Result<(JobState, u64)> {
    let (bytes, revision) = read_key(at.js(), &at.subjects().jobs_bucket(), &subjects::job_state_key(job))
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
    // Streamed from the parameters themselves: the file is never assembled (memory O(model)).
    let (header, mut parts) = params.safetensors_parts().map_err(Error::Model)?;
    parts.insert(0, &header);
    let chunk = chunk_size(infra.max_payload());
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: subjects::model_object(job, version),
        chunk_size: Some(chunk),
        ..Default::default()
    };
    let mut reader = PartsReader { parts, at: 0 };
    infra.models.put(meta, &mut reader).await.map_err(|e| Error::nats("store model", e))?;
    Ok(())
}

/// Stores a model version computed from an accumulator as it is read
/// ([`shoal_functions::tensor::AccumulatorModel`]): the file is never whole in memory, nor the
/// model beside the accumulator. Same object as [`put_model`] of the same values.
///
/// # Errors
/// NATS errors.
pub async fn put_model_streamed(
    infra: &Infra,
    job: &JobId,
    version: ModelVersion,
    model: shoal_functions::tensor::AccumulatorModel,
) -> Result<()> {
    let chunk = chunk_size(infra.max_payload());
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: subjects::model_object(job, version),
        chunk_size: Some(chunk),
        ..Default::default()
    };
    let mut reader = ModelReader(model);
    infra.models.put(meta, &mut reader).await.map_err(|e| Error::nats("store model", e))?;
    Ok(())
}

/// An [`tokio::io::AsyncRead`] over an [`shoal_functions::tensor::AccumulatorModel`].
struct ModelReader(shoal_functions::tensor::AccumulatorModel);

impl tokio::io::AsyncRead for ModelReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.0.read(buf.initialize_unfilled());
        buf.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

/// An [`tokio::io::AsyncRead`] over borrowed byte slices in order (a model's safetensors
/// header and tensors), so the object store reads its chunks from them with no copy between.
struct PartsReader<'a> {
    parts: Vec<&'a [u8]>,
    /// Bytes of `parts[0]` already read.
    at: usize,
}

impl tokio::io::AsyncRead for PartsReader<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while let Some(first) = self.parts.first().copied() {
            let rest = &first[self.at..];
            if rest.is_empty() {
                self.parts.remove(0);
                self.at = 0;
                continue;
            }
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.at += n;
            break;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Fetches model `version` straight into [`Parameters`] of `manifest`: the object's chunks are
/// validated and staged as they arrive ([`shoal_functions::tensor::StreamStager`]), so the file
/// is never held in memory beside the parameters.
///
/// # Errors
/// NATS errors (including a missing version); [`Error::Model`] when the stored bytes do not
/// match the manifest.
pub async fn load_model(
    infra: &Infra,
    job: &JobId,
    version: ModelVersion,
    manifest: &Arc<shoal_functions::ModelManifest>,
) -> Result<Parameters> {
    use tokio::io::AsyncReadExt;
    let mut obj = infra
        .models
        .get(subjects::model_object(job, version))
        .await
        .map_err(|e| Error::nats("fetch model", e))?;
    let size = obj.info().size as u64;
    let mut params = Parameters::zeros(Arc::clone(manifest));
    let invalid = |e: shoal_functions::ValidationError| Error::Model(shoal_functions::Error::Validation(e));
    let mut stager =
        shoal_functions::tensor::StreamStager::new(manifest, params.as_bytes_mut(), size).map_err(invalid)?;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = obj.read(&mut buf).await.map_err(|e| Error::io("read model object", e))?;
        if n == 0 {
            break;
        }
        stager.push(&buf[..n]).map_err(invalid)?;
    }
    stager.finish().map_err(invalid)?;
    Ok(params)
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

/// Every job in KV `shoal-jobs` (keys `<job>.state`), sorted by id, with its state. A job whose
/// state cannot be read or decoded is left out (and logged).
///
/// # Errors
/// [`Error::Nats`] when the bucket's keys cannot be listed.
pub async fn list_jobs(infra: &Infra) -> Result<Vec<(JobId, JobState)>> {
    use futures::StreamExt;
    let mut keys = infra.jobs.keys().await.map_err(|e| Error::nats("list jobs", e))?;
    let mut ids = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| Error::nats("list jobs", e))?;
        if let Some(job) = k.strip_suffix(".state").and_then(|j| JobId::new(j).ok()) {
            ids.push(job);
        }
    }
    ids.sort();
    let mut jobs = Vec::with_capacity(ids.len());
    for job in ids {
        match load_state(&infra, &job).await {
            Ok((state, _)) => jobs.push((job, state)),
            Err(Error::UnknownJob(_)) => {} // deleted meanwhile
            Err(e) => tracing::warn!(%job, error = %e, "job state unreadable; left out of the list"),
        }
    }
    Ok(jobs)
}

/// What [`cancel_job`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was running; its state is now `Cancelled` (this state).
    Cancelled(JobState),
    /// The job had already ended (finished, failed or cancelled): nothing was written.
    AlreadyEnded(JobState),
}

/// Cancels a running job: its state's phase becomes `Cancelled { reason }` by compare-and-set
/// (retried when a commit races with it). The node serving the job stops it at once: no round
/// opens or commits after this, and the updates it holds for the open round are refused as
/// `late_update`. The job's models stay readable.
///
/// # Errors
/// [`Error::UnknownJob`]; [`Error::Nats`], also when ten compare-and-sets in a row lose a race.
pub async fn cancel_job(infra: &Infra, job: &JobId, reason: &str) -> Result<CancelOutcome> {
    for _ in 0..10 {
        let (mut state, revision) = load_state(&infra, job).await?;
        if state.phase != shoal_proto::JobPhase::Running {
            return Ok(CancelOutcome::AlreadyEnded(state));
        }
        state.phase = shoal_proto::JobPhase::Cancelled { reason: reason.to_owned() };
        if let CasOutcome::Written(_) = cas_state(infra, job, &state, revision).await? {
            // Clients waiting on the job's round events learn at once (they also poll the state).
            let ended = shoal_proto::RoundEvent::JobEnded { job: job.clone(), phase: state.phase.clone() };
            let subject = infra.subjects.round_events(job);
            if let Err(e) = infra.client.publish(subject, Bytes::from(shoal_proto::encode(&ended))).await {
                tracing::debug!(%job, error = %e, "publishing JobEnded failed (clients poll the state)");
            }
            return Ok(CancelOutcome::Cancelled(state));
        }
    }
    Err(Error::nats("cancel job", std::io::Error::other("the job state kept changing under ten attempts")))
}

/// Whether a node still serves `job`: the holder of its top lease, while it renews it.
/// `None` when no node holds the lease or its holder stopped renewing it (`stale`: the nodes'
/// lease stale time, `shoal_proto::config::Timings::lease_stale_ms`).
///
/// # Errors
/// [`Error::Nats`], [`Error::Decode`].
pub async fn top_holder(
    infra: &Infra,
    job: &JobId,
    stale: std::time::Duration,
) -> Result<Option<shoal_proto::NodeId>> {
    let Some(v) = infra
        .jobs
        .get(subjects::top_lease_key(job))
        .await
        .map_err(|e| Error::nats("read the top lease", e))?
    else {
        return Ok(None);
    };
    let lease: shoal_proto::cluster::Lease = shoal_proto::decode("top lease", &v)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Ok(lease.fresh(now, stale).then_some(lease.node))
}

/// What [`delete_job`] removed (bucket names are the default prefix's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteReport {
    /// Model versions (and any other object named `<job>/...`) deleted from `shoal-models`.
    pub models: usize,
    /// Node-to-node transfers (`_partials/<job>/...`, `_shards/<job>/...`) deleted from
    /// `shoal-updates`.
    pub transfers: usize,
    /// Messages purged from KV `shoal-jobs` under `<job>.`: spec, state and their history, the
    /// top lease, strategy state.
    pub keys: u64,
    /// Update claims purged from KV `shoal-claims`.
    pub claims: u64,
    /// Update messages of the job still in the updates stream, purged.
    pub updates: u64,
    /// Whether the job's upload stream `UPLOADS_<job>` existed and was deleted.
    pub upload_stream: bool,
}

/// Deletes an ended job so that its id can be used again: its models and other objects, its
/// node-to-node transfers, its KV keys (spec, state, their history, the top lease, strategy
/// state), its update claims, its updates still queued and its upload stream. The state key is
/// left with a purge marker, so nodes watching it forget the job. Deleting again finds nothing
/// and is not an error as long as the marker is there.
///
/// A running job is refused: cancel it ([`cancel_job`]) and wait until no node serves it
/// ([`top_holder`]) first, so that no top commits into a deleted (or re-created) job.
///
/// # Errors
/// [`Error::JobRunning`]; [`Error::UnknownJob`] when the job has neither state nor spec;
/// [`Error::Nats`].
pub async fn delete_job(infra: &Infra, job: &JobId) -> Result<DeleteReport> {
    let state = match load_state(&infra, job).await {
        Ok((s, _)) => Some(s),
        Err(Error::UnknownJob(_)) => None,
        Err(e) => return Err(e),
    };
    match &state {
        Some(s) if s.phase == shoal_proto::JobPhase::Running => {
            return Err(Error::JobRunning(job.to_string()))
        }
        Some(_) => {}
        // A create interrupted before its state (or a delete interrupted after it) leaves a spec.
        None if read_key(&infra.js, &infra.subjects.jobs_bucket(), &subjects::job_spec_key(job))
            .await?
            .is_none() =>
        {
            return Err(Error::UnknownJob(job.to_string()))
        }
        None => {}
    }
    let mut report = DeleteReport::default();
    // Objects first: the job's KV keys (which name the job) go last.
    let model_prefix = format!("{job}/");
    report.models = delete_objects(&infra.models, |n| n.starts_with(&model_prefix)).await?;
    let (partials, shards) = (format!("_partials/{job}/"), format!("_shards/{job}/"));
    report.transfers =
        delete_objects(&infra.update_objects, |n| n.starts_with(&partials) || n.starts_with(&shards)).await?;
    match infra.js.delete_stream(infra.subjects.uploads_stream(job)).await {
        Ok(_) => report.upload_stream = true,
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::context::DeleteStreamErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            // Not found (a job created before upload streams, or deleted twice).
        }
        Err(e) => return Err(Error::nats("delete the job's upload stream", e)),
    }
    report.updates =
        purge_subject(&infra.js, &infra.subjects.updates_stream(), infra.subjects.job_updates(job)).await?;
    let (claims, kv) = (infra.subjects.claims_bucket(), infra.subjects.jobs_bucket());
    report.claims =
        purge_subject(&infra.js, &subjects::kv_stream(&claims), format!("$KV.{claims}.{job}.>")).await?;
    report.keys = purge_subject(&infra.js, &subjects::kv_stream(&kv), format!("$KV.{kv}.{job}.>")).await?;
    // The marker nodes see (their watch of `*.state`); a later create writes over it.
    infra
        .jobs
        .purge(subjects::job_state_key(job))
        .await
        .map_err(|e| Error::nats("mark the job deleted", e))?;
    Ok(report)
}

/// Deletes every object of `store` whose name `matches`; returns how many.
async fn delete_objects(
    store: &async_nats::jetstream::object_store::ObjectStore,
    matches: impl Fn(&str) -> bool,
) -> Result<usize> {
    use futures::StreamExt;
    let mut list = store.list().await.map_err(|e| Error::nats("list objects", e))?;
    let mut names = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| Error::nats("list objects", e))?;
        if !info.deleted && matches(&info.name) {
            names.push(info.name);
        }
    }
    for name in &names {
        store.delete(name).await.map_err(|e| Error::nats("delete an object", e))?;
    }
    Ok(names.len())
}

/// Purges the messages of `stream` on `subject` (a filter); 0 when the stream does not exist.
async fn purge_subject(js: &jetstream::Context, stream: &str, subject: String) -> Result<u64> {
    let stream = match js.get_stream_no_info(stream).await {
        Ok(s) => s,
        Err(_) => return Ok(0),
    };
    let purged = stream.purge().filter(subject).await.map_err(|e| Error::nats("purge messages", e))?;
    Ok(purged.purged)
}
