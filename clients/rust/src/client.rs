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

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::uploads;

/// How an update travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// In the message payload.
    Inline,
    /// On the upload path: in chunks on the job's upload stream, the message carrying their
    /// count, length and digest.
    Upload,
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
    /// Take the upload path even if the payload would fit inline.
    pub force_upload: bool,
}

/// How often a waiting client re-reads the job state when no round event arrives (events on
/// `<prefix>.<job>.round` wake it at once; the poll covers a missed event).
pub const STATE_POLL: Duration = Duration::from_millis(1000);

/// The limits of one job a client respects, read once from its spec (specs do not change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// The largest update in bytes (`max_update_bytes`), either path.
    pub max_update_bytes: u64,
    /// The largest inline payload in bytes (`inline_limit_bytes`).
    pub inline_limit: u64,
    /// Bytes per upload chunk (`chunk_bytes`).
    pub chunk_bytes: u64,
}

/// How long a published message id is remembered: twice the updates stream's default
/// duplicate window (10 min). JetStream answers `duplicate` only within its window, so an older
/// id can never come back as one.
pub const SENT_ID_TTL: Duration = Duration::from_secs(20 * 60);
/// Most message ids remembered (one update per round: thousands of rounds); the oldest go
/// first.
pub const SENT_ID_CAP: usize = 10_000;

/// The message ids a client object published, remembered for [`SENT_ID_TTL`] and at most
/// [`SENT_ID_CAP`] of them, so a long-lived client does not grow without limit.
#[derive(Debug)]
pub struct SentIds {
    order: VecDeque<(std::time::Instant, String)>,
    ids: HashSet<String>,
    ttl: Duration,
    cap: usize,
}

impl Default for SentIds {
    fn default() -> Self {
        SentIds::new(SENT_ID_TTL, SENT_ID_CAP)
    }
}

impl SentIds {
    /// Ids remembered for `ttl`, at most `cap` (at least 1) of them.
    pub fn new(ttl: Duration, cap: usize) -> SentIds {
        SentIds { order: VecDeque::new(), ids: HashSet::new(), ttl, cap: cap.max(1) }
    }

    /// Records `id` as published now; `false` when it was already remembered (a retry).
    pub fn insert(&mut self, id: &str, now: std::time::Instant) -> bool {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) <= self.ttl && self.order.len() < self.cap {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        if self.ids.contains(id) {
            return false;
        }
        self.ids.insert(id.to_owned());
        self.order.push_back((now, id.to_owned()));
        true
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A Shoal client.
#[derive(Debug, Clone)]
pub struct ShoalClient {
    infra: Connection,
    limits: Arc<Mutex<HashMap<JobId, JobLimits>>>,
    /// The message ids this client object published recently (to tell its own retry from
    /// another publisher's use of an id), bounded ([`SentIds`]).
    sent_ids: Arc<Mutex<SentIds>>,
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
        ShoalClient { infra, limits: Arc::default(), sent_ids: Arc::default() }
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
        self.infra.violations.guard("read the job spec", jobs::load_spec(&self.infra, job)).await
    }

    /// The job's current state.
    ///
    /// # Errors
    /// [`Error::UnknownJob`], NATS errors.
    pub async fn job_state(&self, job: &JobId) -> Result<JobState> {
        let state = self.infra.violations.guard("read the job state", jobs::load_state(&self.infra, job));
        Ok(state.await?.0)
    }

    /// The global model `version` as safetensors bytes (read with direct gets, see
    /// [`crate::objects::read_object`]).
    ///
    /// # Errors
    /// As [`Self::fetch_model_into`].
    pub async fn fetch_model(&self, job: &JobId, version: ModelVersion) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.fetch_model_into(job, version, &mut data).await?;
        Ok(data)
    }

    /// Streams the global model `version` into `sink` chunk by chunk (a file, with progress: a
    /// large model need not fit in memory) and checks its size and SHA-256 digest against the
    /// object's metadata. Returns that metadata (`size`, `digest`).
    ///
    /// # Errors
    /// [`Error::ModelNotReady`] for a version not committed yet (above the job's current one);
    /// [`Error::ModelUnavailable`] for a committed version no longer stored (pruned) or a
    /// missing chunk; [`Error::Decode`] when the bytes do not match the recorded size and digest;
    /// [`Error::Io`] when `sink` fails; [`Error::UnknownJob`]; [`Error::Unauthorized`].
    pub async fn fetch_model_into(
        &self,
        job: &JobId,
        version: ModelVersion,
        sink: &mut impl objects::ChunkSink,
    ) -> Result<async_nats::jetstream::object_store::ObjectInfo> {
        use objects::ObjectReadError as E;
        let name = subjects::model_object(job, version);
        let read = async {
            let bucket = self.infra.subjects.models_bucket();
            Ok(objects::read_object_into(&self.infra.js, &bucket, &name, usize::MAX, sink).await)
        };
        let unavailable =
            |detail: String| Error::ModelUnavailable { job: job.to_string(), version: version.0, detail };
        match self.infra.violations.guard("read the model", read).await? {
            Ok(info) => Ok(info),
            Err(E::Missing { detail, .. }) => {
                let current = self.job_state(job).await?.model_version;
                if version > current {
                    return Err(Error::ModelNotReady {
                        job: job.to_string(),
                        version: version.0,
                        current: current.0,
                    });
                }
                Err(unavailable(format!(
                    "{detail} (the job is at version {current}; older versions are pruned as new ones commit)"
                )))
            }
            Err(e @ E::MissingChunk { .. }) => Err(unavailable(e.to_string())),
            Err(e @ (E::Corrupt { .. } | E::TooLarge { .. })) => {
                Err(Error::Decode { what: "model object", detail: e.to_string() })
            }
            Err(E::Sink { name, source }) => Err(Error::io(format!("writing model {name}"), source)),
        }
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
                let state = jobs::load_state(&self.infra, job).await?.0;
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

    /// The job's limits (from its spec, published at job creation), read once per job.
    ///
    /// # Errors
    /// As [`Self::job_spec`].
    pub async fn limits(&self, job: &JobId) -> Result<JobLimits> {
        if let Some(&l) = self.limits.lock().unwrap_or_else(|p| p.into_inner()).get(job) {
            return Ok(l);
        }
        let spec = self.job_spec(job).await?;
        let max_payload = self.infra.max_payload() as u64;
        let limits = JobLimits {
            max_update_bytes: spec.update_byte_limit(),
            inline_limit: spec.inline_limit(max_payload),
            chunk_bytes: spec.chunk_limit(max_payload),
        };
        self.limits.lock().unwrap_or_else(|p| p.into_inner()).insert(job.clone(), limits);
        Ok(limits)
    }

    /// The job's largest update in bytes (its spec's `max_update_bytes`), read once per job.
    ///
    /// # Errors
    /// As [`Self::job_spec`].
    pub async fn update_limit(&self, job: &JobId) -> Result<u64> {
        Ok(self.limits(job).await?.max_update_bytes)
    }

    /// Publishes an update and waits for JetStream to persist it. Payloads above the job's
    /// `inline_limit_bytes` (published in its spec) take the upload path first
    /// ([`crate::uploads`]: chunks in the job's upload stream, then a message naming them), so no
    /// message this sends exceeds `max_payload`. The message id covers the headers that matter,
    /// the path and the bytes (`shoal_proto::headers::update_msg_id`); when JetStream already
    /// holds that id from another publisher, the update goes out again under a fresh id.
    ///
    /// # Errors
    /// [`Error::PayloadTooLarge`] at once, before anything is sent, when the payload exceeds the
    /// job's `max_update_bytes`; [`Error::UploadQuotaFull`]; [`Error::UnknownJob`];
    /// [`Error::Unauthorized`] when the credentials do not allow publishing as `u.client`;
    /// [`Error::Rejected`] with `duplicate` when this client already published this very
    /// update; other NATS errors.
    pub async fn publish_update(&self, u: UpdateRequest) -> Result<Transport> {
        self.infra.violations.guard("publish the update", self.publish_update_inner(u)).await
    }

    async fn publish_update_inner(&self, u: UpdateRequest) -> Result<Transport> {
        let limits = self.limits(&u.job).await?;
        if u.payload.len() as u64 > limits.max_update_bytes {
            return Err(Error::PayloadTooLarge {
                what: "update",
                size: u.payload.len(),
                limit: usize::try_from(limits.max_update_bytes).unwrap_or(usize::MAX),
                limit_name: "the job's max_update_bytes",
            });
        }
        let digest = hex::encode(Sha256::digest(&u.payload));
        let upload = u.force_upload || u.payload.len() as u64 > limits.inline_limit;
        let (payload, transport, mut headers) = if upload {
            let who = (&u.job, &u.client, u.round);
            let up = uploads::publish(
                &self.infra.js,
                &self.infra.subjects,
                who,
                &u.payload,
                limits.chunk_bytes,
                &digest,
            )
            .await?;
            let mut h = HeaderMap::new();
            h.insert(protocol::HDR_UPLOAD_CHUNKS, up.chunks.to_string().as_str());
            h.insert(protocol::HDR_UPLOAD_BYTES, up.bytes.to_string().as_str());
            h.insert(protocol::HDR_DIGEST, format!("sha256:{digest}").as_str());
            let t = protocol::Transport::Upload { chunks: up.chunks, bytes: up.bytes };
            (Bytes::new(), t, h)
        } else {
            (u.payload.clone(), protocol::Transport::Inline, HeaderMap::new())
        };
        headers.insert(protocol::HDR_ROUND, u.round.to_string().as_str());
        headers.insert(protocol::HDR_BASE_VERSION, u.base_version.to_string().as_str());
        headers.insert(protocol::HDR_NUM_EXAMPLES, u.num_examples.to_string().as_str());
        headers.insert(protocol::HDR_KIND, u.kind.as_str());
        let id = protocol::update_msg_id(&protocol::MsgIdFields {
            job: &u.job,
            round: u.round,
            client: &u.client,
            base_version: u.base_version,
            num_examples: u.num_examples,
            kind: u.kind,
            transport,
            payload_sha256: &digest,
        });
        let first = self.publish_message(&u, headers.clone(), &id, payload.clone()).await?;
        if first {
            return Ok(if upload { Transport::Upload } else { Transport::Inline });
        }
        // JetStream already holds a message with this id, and not from this client object: some
        // other publisher used it first (an id is just a header). Publish again under an id no one
        // can have used; the node still counts one update per client and round.
        tracing::warn!(
            job = %u.job, client = %u.client, round = %u.round, msg_id = %id,
            "JetStream holds another message with this update's id; publishing again under a fresh id"
        );
        let nonce: String = (0..12).map(|_| char::from(b'a' + rand::random::<u8>() % 26)).collect();
        let fresh = format!("{id}.{nonce}");
        if self.publish_message(&u, headers, &fresh, payload).await? {
            Ok(if upload { Transport::Upload } else { Transport::Inline })
        } else {
            Err(Error::Rejected(shoal_proto::RejectReason::Duplicate))
        }
    }

    /// Publishes the update message under `id`. `Ok(true)`: JetStream stored it, or already held
    /// it from an earlier publish of this client object (a retry: counted once, reported as
    /// [`Error::Rejected`] with `duplicate`). `Ok(false)`: JetStream already held a message with
    /// this id that this object never published.
    async fn publish_message(
        &self,
        u: &UpdateRequest,
        mut headers: HeaderMap,
        id: &str,
        payload: Bytes,
    ) -> Result<bool> {
        headers.insert(protocol::HDR_MSG_ID, id);
        // Recorded before sending: an attempt whose ack was lost (the server stored it, then the
        // connection dropped) makes the retry's `duplicate` answer ours, not a squatter's.
        let mine = {
            let mut sent = self.sent_ids.lock().unwrap_or_else(|p| p.into_inner());
            !sent.insert(id, std::time::Instant::now())
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
        match (ack.duplicate, mine) {
            (false, _) => Ok(true),
            // The same update was already published by this client object (JetStream's dedupe
            // window): a retry of an update the node has, or had and refused.
            (true, true) => Err(Error::Rejected(shoal_proto::RejectReason::Duplicate)),
            (true, false) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-lived client remembers a bounded number of ids: old ones expire after the TTL,
    /// and beyond the cap the oldest go first; a retry within both is still recognised.
    #[test]
    fn sent_ids_are_bounded_by_age_and_count() {
        let t0 = std::time::Instant::now();
        let mut s = SentIds::new(Duration::from_secs(60), 3);
        assert!(s.insert("a", t0));
        assert!(!s.insert("a", t0 + Duration::from_secs(1)), "a retry is recognised");
        assert!(s.insert("b", t0 + Duration::from_secs(2)));
        assert!(s.insert("c", t0 + Duration::from_secs(3)));
        assert!(s.insert("d", t0 + Duration::from_secs(4)), "the cap evicts the oldest");
        assert_eq!(s.len(), 3);
        assert!(s.insert("a", t0 + Duration::from_secs(5)), "a was evicted");
        // Past the TTL everything older goes.
        assert!(s.insert("e", t0 + Duration::from_secs(200)));
        assert_eq!(s.len(), 1);
        // A million publishes keep at most the cap.
        let mut s = SentIds::default();
        for i in 0..1_000_000u64 {
            s.insert(&format!("job.{i}.c.0123456789abcdef"), t0);
        }
        assert_eq!(s.len(), SENT_ID_CAP);
    }
}
