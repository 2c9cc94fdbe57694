//! The Rust client SDK: fetch the global model, publish an update (inline or through the object
//! store, chosen by size), and wait for rounds. Used by the CLI, the demo's simulated clients and
//! the tests. The wire protocol it speaks is in [`crate::protocol`] and DESIGN.md §4, so clients
//! in other languages can do the same.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shoal_functions::{ClientId, JobId, JobSpec, ModelVersion, RoundId, UpdateKind};

use crate::error::{Error, Result};
use crate::infra::{ConnectOptions, Infra};
use crate::jobs;
use crate::protocol::{self, JobPhase, JobState};
use crate::subjects;

/// How an update travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// In the message payload.
    Inline,
    /// Through object store `shoal-updates`, the message carrying only name and digest.
    ObjectStore,
}

/// One update to publish.
#[derive(Debug, Clone)]
pub struct UpdateRequest {
    /// Job.
    pub job: JobId,
    /// Sender (must match the NATS user's permissions in secured deployments).
    pub client: ClientId,
    /// Round the update is for.
    pub round: RoundId,
    /// Model version trained from.
    pub base_version: ModelVersion,
    /// Local training examples (the FedAvg weight).
    pub num_examples: u64,
    /// `parameters` or `delta`.
    pub kind: UpdateKind,
    /// The tensors, as a safetensors file.
    pub payload: Bytes,
    /// Use the object store even if the payload would fit inline.
    pub force_object_store: bool,
}

/// A Shoal client.
#[derive(Debug, Clone)]
pub struct ShoalClient {
    infra: Infra,
    inline_limit: usize,
}

impl ShoalClient {
    /// Connects (and ensures the JetStream resources exist).
    ///
    /// # Errors
    /// As [`Infra::connect`].
    pub async fn connect(opts: &ConnectOptions) -> Result<ShoalClient> {
        Ok(Self::from_infra(Infra::connect(opts).await?))
    }

    /// A client over existing NATS handles.
    pub fn from_infra(infra: Infra) -> ShoalClient {
        // Leave room for headers under the server's max_payload.
        let inline_limit = infra.max_payload().saturating_sub(16 * 1024);
        ShoalClient { infra, inline_limit }
    }

    /// Overrides the size above which updates go through the object store.
    pub fn with_inline_limit(mut self, bytes: usize) -> ShoalClient {
        self.inline_limit = bytes;
        self
    }

    /// The NATS handles.
    pub fn infra(&self) -> &Infra {
        &self.infra
    }

    /// The job's spec.
    ///
    /// # Errors
    /// [`Error::UnknownJob`], NATS errors.
    pub async fn job_spec(&self, job: &JobId) -> Result<JobSpec> {
        jobs::load_spec(&self.infra, job).await
    }

    /// The job's current state.
    ///
    /// # Errors
    /// [`Error::UnknownJob`], NATS errors.
    pub async fn job_state(&self, job: &JobId) -> Result<JobState> {
        Ok(jobs::load_state(&self.infra, job).await?.0)
    }

    /// The global model `version` as safetensors bytes.
    ///
    /// # Errors
    /// NATS errors (a missing version included).
    pub async fn fetch_model(&self, job: &JobId, version: ModelVersion) -> Result<Vec<u8>> {
        jobs::get_model_bytes(&self.infra, job, version).await
    }

    /// This client's personal reward from the last committed round (RFFL: the top-q_i
    /// sparsified aggregate delta, to add to its own model), as safetensors bytes.
    ///
    /// # Errors
    /// [`Error::Nats`] when no coordinator answers; [`Error::Decode`] carrying the coordinator's
    /// reason when it refuses (strategy without rewards, unknown participant, no round yet).
    pub async fn fetch_reward(&self, job: &JobId, client: &ClientId) -> Result<Vec<u8>> {
        let m = self
            .infra
            .client
            .request(self.infra.subjects.reward(job, client), Bytes::new())
            .await
            .map_err(|e| Error::nats("request reward", e))?;
        if let Some(why) = m.headers.as_ref().and_then(|h| h.get(protocol::HDR_ERROR)) {
            return Err(Error::Decode { what: "reward", detail: why.to_string() });
        }
        Ok(m.payload.to_vec())
    }

    /// Waits until the job state satisfies `done` (checked on the current state, then on every
    /// change, through a KV watch, so a missed event cannot strand a client).
    ///
    /// # Errors
    /// [`Error::Timeout`]; [`Error::JobEnded`] if the job ends before `done` holds.
    pub async fn wait_for_state(
        &self,
        job: &JobId,
        timeout: Duration,
        what: &'static str,
        done: impl Fn(&JobState) -> bool,
    ) -> Result<JobState> {
        // An unknown job is an error now, not a wait until the timeout.
        self.job_state(job).await?;
        let fut = async {
            let key = subjects::job_state_key(job);
            let mut watch = self
                .infra
                .jobs
                .watch_with_history(&key)
                .await
                .map_err(|e| Error::nats("watch job state", e))?;
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| Error::nats("watch job state", e))?;
                let state: JobState = protocol::decode("job state", &entry.value)?;
                if done(&state) {
                    return Ok(state);
                }
                if state.phase != JobPhase::Running {
                    return Err(Error::JobEnded { job: job.to_string(), phase: state.phase.to_string() });
                }
            }
            Err(Error::nats("watch job state", std::io::Error::other("watch ended")))
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| Error::Timeout(timeout, what))?
    }

    /// Waits for round `round` (or a later one) to be open; returns the state (its
    /// `model_version` is the base to train from).
    ///
    /// # Errors
    /// As [`Self::wait_for_state`].
    pub async fn wait_for_open_round(
        &self,
        job: &JobId,
        round: RoundId,
        timeout: Duration,
    ) -> Result<JobState> {
        self.wait_for_state(job, timeout, "the round to open", |s| s.round >= round && s.is_open()).await
    }

    /// Waits for round `round` to close; returns the state after it (see `last_outcome`).
    ///
    /// # Errors
    /// As [`Self::wait_for_state`], except that a job ending *with* this round is success.
    pub async fn wait_for_round_closed(
        &self,
        job: &JobId,
        round: RoundId,
        timeout: Duration,
    ) -> Result<JobState> {
        match self
            .wait_for_state(job, timeout, "the round to close", |s| {
                s.round > round || (s.phase != JobPhase::Running && s.round >= round)
            })
            .await
        {
            Err(Error::JobEnded { .. }) => self.job_state(job).await,
            other => other,
        }
    }

    /// Subscribes to the rejection notices of `client` in `job` (subscribe before publishing, then
    /// pass the subscriber to [`Self::wait_for_outcome`]).
    ///
    /// # Errors
    /// NATS errors.
    pub async fn rejections(&self, job: &JobId, client: &ClientId) -> Result<async_nats::Subscriber> {
        let sub = self
            .infra
            .client
            .subscribe(self.infra.subjects.rejected(job, client))
            .await
            .map_err(|e| Error::nats("subscribe to rejections", e))?;
        self.infra.client.flush().await.map_err(|e| Error::nats("flush", e))?;
        Ok(sub)
    }

    /// Waits until `round` closes or the node refuses this client's update, whichever comes
    /// first.
    ///
    /// # Errors
    /// [`Error::Rejected`] with the node's reason, or as [`Self::wait_for_round_closed`].
    pub async fn wait_for_outcome(
        &self,
        job: &JobId,
        round: RoundId,
        rejections: &mut async_nats::Subscriber,
        timeout: Duration,
    ) -> Result<JobState> {
        tokio::select! {
            state = self.wait_for_round_closed(job, round, timeout) => state,
            Some(m) = rejections.next() => {
                let notice: crate::protocol::RejectNotice = protocol::decode("reject notice", &m.payload)?;
                tracing::warn!(reason = %notice.reason, "update refused: {}", notice.detail);
                Err(Error::Rejected(notice.reason))
            }
        }
    }

    /// Publishes an update and waits for JetStream to persist it. Payloads above the inline
    /// limit go through the object store first (`<job>/<round>/<client>`, digest in the header).
    ///
    /// # Errors
    /// NATS errors (including the server refusing an oversized inline payload).
    pub async fn publish_update(&self, u: UpdateRequest) -> Result<Transport> {
        let digest = hex::encode(Sha256::digest(&u.payload));
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", subjects::update_msg_id(&u.job, u.round, &u.client, &digest).as_str());
        headers.insert(protocol::HDR_ROUND, u.round.to_string().as_str());
        headers.insert(protocol::HDR_BASE_VERSION, u.base_version.to_string().as_str());
        headers.insert(protocol::HDR_NUM_EXAMPLES, u.num_examples.to_string().as_str());
        headers.insert(protocol::HDR_KIND, u.kind.as_str());
        let (payload, transport) = if u.force_object_store || u.payload.len() > self.inline_limit {
            let name = subjects::update_object(&u.job, u.round, &u.client);
            let meta = async_nats::jetstream::object_store::ObjectMetadata {
                name: name.clone(),
                chunk_size: Some(jobs::chunk_size(&self.infra)),
                ..Default::default()
            };
            self.infra
                .update_objects
                .put(meta, &mut u.payload.as_ref())
                .await
                .map_err(|e| Error::nats("put update object", e))?;
            headers.insert(protocol::HDR_OBJECT, name.as_str());
            headers.insert(protocol::HDR_DIGEST, format!("sha256:{digest}").as_str());
            (Bytes::new(), Transport::ObjectStore)
        } else {
            (u.payload, Transport::Inline)
        };
        let subject = self.infra.subjects.update(&u.job, &u.client);
        let ack = self
            .infra
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| Error::nats("publish update", e))?
            .await
            .map_err(|e| Error::nats("publish update (ack)", e))?;
        if ack.duplicate {
            // The same bytes were already published for this round (JetStream's dedupe window):
            // a retry of an update the node has, or had and refused.
            return Err(Error::Rejected(crate::error::RejectReason::Duplicate));
        }
        Ok(transport)
    }
}
