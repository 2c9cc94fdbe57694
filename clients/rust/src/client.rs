//! [`ShoalClient`]: fetch the global model, publish an update (inline or through the object
//! store, chosen by size), and wait for rounds. Used by the CLI, the demo's simulated clients and
//! the tests. The wire protocol it speaks is `shoal_proto` and DESIGN.md §4, so clients in other
//! languages can do the same.
//!
//! Everything it does fits a client's least permissions
//! ([`shoal_proto::permissions::client_permissions`]): it opens no stream (no stream
//! information is read), reads only its job's KV keys (direct gets), reads
//! models and writes its large updates without creating consumers ([`crate::objects`]), and
//! waits for rounds on `<prefix>.<job>.round` plus a slow poll of the job state. Connect with
//! [`ConnectOptions::for_client`] so that replies come to the client's own inbox. An operation
//! the server refuses fails as [`Error::Unauthorized`], naming the refused subject.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shoal_proto::headers as protocol;
use shoal_proto::subjects;
use shoal_proto::{ClientId, JobId, JobPhase, JobSpec, JobState, ModelVersion, RoundId, UpdateKind};

use crate::connect::{ConnectOptions, Connection};
use crate::error::{Error, Result};
use crate::jobs;
use crate::objects;

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

/// How often a waiting client re-reads the job state when no round event arrives (events on
/// `<prefix>.<job>.round` wake it at once; the poll covers a missed event).
pub const STATE_POLL: Duration = Duration::from_millis(1000);

/// Bytes kept free for an update message's headers under the server's `max_payload` (Shoal's
/// headers take about 300).
pub const HEADER_ALLOWANCE: usize = 4096;

/// A Shoal client.
#[derive(Debug, Clone)]
pub struct ShoalClient {
    infra: Connection,
    inline_limit: usize,
    /// Each job's `max_update_bytes` (specs do not change), read once.
    update_limits: Arc<Mutex<HashMap<JobId, u64>>>,
}

impl ShoalClient {
    /// Connects. Nothing is created or opened in JetStream: a node (or the operator) must have
    /// provisioned the streams and buckets; until one has, reads fail as [`Error::Nats`].
    ///
    /// # Errors
    /// As [`Connection::connect`]: [`Error::Unauthorized`] for refused credentials,
    /// [`Error::Tls`], [`Error::Connect`].
    pub async fn connect(opts: &ConnectOptions) -> Result<ShoalClient> {
        Ok(Self::new(Connection::connect(opts).await?))
    }

    /// A client over an existing connection.
    pub fn new(infra: Connection) -> ShoalClient {
        // Leave room for headers under the server's max_payload.
        let inline_limit = infra.max_payload().saturating_sub(16 * 1024);
        ShoalClient { infra, inline_limit, update_limits: Arc::default() }
    }

    /// Overrides the size above which updates go through the object store (a payload that would
    /// not fit the server's `max_payload` with its headers goes there whatever this says).
    pub fn with_inline_limit(mut self, bytes: usize) -> ShoalClient {
        self.inline_limit = bytes;
        self
    }

    /// The NATS connection.
    pub fn connection(&self) -> &Connection {
        &self.infra
    }

    /// The job's spec.
    ///
    /// # Errors
    /// [`Error::UnknownJob`], NATS errors.
    pub async fn job_spec(&self, job: &JobId) -> Result<JobSpec> {
        self.infra.violations.guard("read the job spec", jobs::load_spec(&self.infra.js, job)).await
    }

    /// The job's current state.
    ///
    /// # Errors
    /// [`Error::UnknownJob`], NATS errors.
    pub async fn job_state(&self, job: &JobId) -> Result<JobState> {
        let state = self.infra.violations.guard("read the job state", jobs::load_state(&self.infra.js, job));
        Ok(state.await?.0)
    }

    /// The global model `version` as safetensors bytes (read with direct gets, see
    /// [`crate::objects::read_object`]).
    ///
    /// # Errors
    /// NATS errors (a missing version included), [`Error::Unauthorized`].
    pub async fn fetch_model(&self, job: &JobId, version: ModelVersion) -> Result<Vec<u8>> {
        let name = subjects::model_object(job, version);
        let read = objects::read_object(&self.infra.js, subjects::MODELS_BUCKET, &name);
        self.infra.violations.guard("read the model", read).await
    }

    /// This client's personal reward from the last committed round (RFFL: the top-q_i
    /// sparsified aggregate delta, to add to its own model), as safetensors bytes.
    ///
    /// # Errors
    /// [`Error::Nats`] when no coordinator answers; [`Error::Decode`] carrying the coordinator's
    /// reason when it refuses (strategy without rewards, unknown participant, no round yet).
    pub async fn fetch_reward(&self, job: &JobId, client: &ClientId) -> Result<Vec<u8>> {
        let request = async {
            self.infra
                .client
                .request(self.infra.subjects.reward(job, client), Bytes::new())
                .await
                .map_err(|e| Error::nats("request reward", e))
        };
        let m = self.infra.violations.guard("request the reward", request).await?;
        if let Some(why) = m.headers.as_ref().and_then(|h| h.get(protocol::HDR_ERROR)) {
            return Err(Error::Decode { what: "reward", detail: why.to_string() });
        }
        Ok(m.payload.to_vec())
    }

    /// Waits until the job state satisfies `done`: checked on the current state, then whenever
    /// an event arrives on `<prefix>.<job>.round` (published after every commit), and at least
    /// every [`STATE_POLL`], so a missed event cannot strand a client.
    ///
    /// # Errors
    /// [`Error::Timeout`]; [`Error::JobEnded`] if the job ends before `done` holds;
    /// [`Error::Unauthorized`].
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
            let mut events = self
                .infra
                .client
                .subscribe(self.infra.subjects.round_events(job))
                .await
                .map_err(|e| Error::nats("subscribe to round events", e))?;
            self.infra.client.flush().await.map_err(|e| Error::nats("flush", e))?;
            loop {
                let state = jobs::load_state(&self.infra.js, job).await?.0;
                if done(&state) {
                    return Ok(state);
                }
                if state.phase != JobPhase::Running {
                    return Err(Error::JobEnded { job: job.to_string(), phase: state.phase.to_string() });
                }
                tokio::select! {
                    m = events.next() => {
                        if m.is_none() {
                            return Err(Error::nats("round events", std::io::Error::other("subscription ended")));
                        }
                    }
                    _ = tokio::time::sleep(STATE_POLL) => {}
                }
            }
        };
        let fut = self.infra.violations.guard("wait for the job state", fut);
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
        let subscribe = async {
            let sub = self
                .infra
                .client
                .subscribe(self.infra.subjects.rejected(job, client))
                .await
                .map_err(|e| Error::nats("subscribe to rejections", e))?;
            self.infra.client.flush().await.map_err(|e| Error::nats("flush", e))?;
            Ok(sub)
        };
        self.infra.violations.guard("subscribe to rejections", subscribe).await
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
                let notice: shoal_proto::RejectNotice = shoal_proto::decode("reject notice", &m.payload)?;
                tracing::warn!(reason = %notice.reason, "update refused: {}", notice.detail);
                Err(Error::Rejected(notice.reason))
            }
        }
    }

    /// The job's largest update in bytes (its spec's `max_update_bytes`), read once per job.
    ///
    /// # Errors
    /// As [`Self::job_spec`].
    pub async fn update_limit(&self, job: &JobId) -> Result<u64> {
        if let Some(&l) = self.update_limits.lock().unwrap_or_else(|p| p.into_inner()).get(job) {
            return Ok(l);
        }
        let limit = self.job_spec(job).await?.update_byte_limit();
        self.update_limits.lock().unwrap_or_else(|p| p.into_inner()).insert(job.clone(), limit);
        Ok(limit)
    }

    /// Publishes an update and waits for JetStream to persist it. Payloads above the inline
    /// limit, or too large for the server's `max_payload` with their headers, go through the
    /// object store first (`<job>/<round>/<client>`, digest in the header), so no message this
    /// sends exceeds `max_payload`.
    ///
    /// # Errors
    /// [`Error::PayloadTooLarge`] at once, before anything is sent, when the payload exceeds the
    /// job's `max_update_bytes`; [`Error::UnknownJob`]; [`Error::Unauthorized`] when the
    /// credentials do not allow publishing as `u.client`; [`Error::Rejected`] with `duplicate`
    /// when JetStream already holds these exact bytes for this round; other NATS errors.
    pub async fn publish_update(&self, u: UpdateRequest) -> Result<Transport> {
        self.infra.violations.guard("publish the update", self.publish_update_inner(u)).await
    }

    async fn publish_update_inner(&self, u: UpdateRequest) -> Result<Transport> {
        let limit = self.update_limit(&u.job).await?;
        if u.payload.len() as u64 > limit {
            return Err(Error::PayloadTooLarge {
                what: "update",
                size: u.payload.len(),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
                limit_name: "the job's max_update_bytes",
            });
        }
        let digest = hex::encode(Sha256::digest(&u.payload));
        let mut headers = HeaderMap::new();
        headers.insert(
            protocol::HDR_MSG_ID,
            subjects::update_msg_id(&u.job, u.round, &u.client, &digest).as_str(),
        );
        headers.insert(protocol::HDR_ROUND, u.round.to_string().as_str());
        headers.insert(protocol::HDR_BASE_VERSION, u.base_version.to_string().as_str());
        headers.insert(protocol::HDR_NUM_EXAMPLES, u.num_examples.to_string().as_str());
        headers.insert(protocol::HDR_KIND, u.kind.as_str());
        let inline_max = self.inline_limit.min(self.infra.max_payload().saturating_sub(HEADER_ALLOWANCE));
        let (payload, transport) = if u.force_object_store || u.payload.len() > inline_max {
            let name = subjects::update_object(&u.job, u.round, &u.client);
            let chunk = jobs::chunk_size(self.infra.max_payload());
            objects::put_object(&self.infra.js, subjects::UPDATES_BUCKET, &name, &u.payload, chunk).await?;
            headers.insert(protocol::HDR_OBJECT, name.as_str());
            headers.insert(protocol::HDR_DIGEST, format!("sha256:{digest}").as_str());
            (Bytes::new(), Transport::ObjectStore)
        } else {
            (u.payload, Transport::Inline)
        };
        let subject = self.infra.subjects.update(&u.job, &u.client);
        let size = payload.len();
        let ack = self
            .infra
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| match e.kind() {
                // async-nats checks the message against the server's max_payload before sending.
                PublishErrorKind::MaxPayloadExceeded => Error::PayloadTooLarge {
                    what: "update message",
                    size,
                    limit: self.infra.max_payload(),
                    limit_name: "the server's max_payload",
                },
                _ => Error::nats("publish update", e),
            })?
            .await
            .map_err(|e| Error::nats("publish update (ack)", e))?;
        if ack.duplicate {
            // The same bytes were already published for this round (JetStream's dedupe window):
            // a retry of an update the node has, or had and refused.
            return Err(Error::Rejected(shoal_proto::RejectReason::Duplicate));
        }
        Ok(transport)
    }
}
