//! The gateway: pulls client updates from JetStream, validates them, writes their tensor bytes
//! once into a shared-memory slot, and hands a descriptor to the function host.
//!
//! Validation order (cheapest first, nothing buffered before the size checks): subject ids,
//! headers (decimal digits only), job, whether this node serves it (`--max-jobs`), round, base
//! version, `num_examples` (1 to the job's maximum), update kind, duplicate, the round's
//! `max_clients_per_round`, payload size against the job's `max_update_bytes` (or the object's
//! size from its metadata, before reading a chunk), then the safetensors payload against the
//! manifest while it is copied into the slot (tensor count from the header bytes before it is
//! parsed, names, dtypes, shapes, NaN/Inf). Every refusal is a [`RejectReason`]. Accepted
//! messages are **not** acked here: the coordinator acks them after the commit; the aggregator
//! keeps them alive with in-progress acks meanwhile.

pub mod claims;
pub mod reject;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shoal_functions::tensor::stage_update;
use shoal_functions::{ClientId, JobId, RoundId, UpdateKind};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, RejectReason, Result};
use crate::host::{FunctionHost, Staged};
use crate::ingest::reject::{AckHandle, Rejector};
use crate::jobs::{self, JobDirectory, JobEntry};
use crate::metrics::Metrics;
use crate::nats::Infra;
use crate::node::capacity::{Admission, JobSlots};
use crate::staging::SlotPool;
use shoal_proto::subjects;
use shoal_proto::JobPhase;

/// How long reading one update object may take before the update is refused as
/// `object_unavailable` (each chunk is a bounded direct get; this bounds the whole object).
pub const OBJECT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The consumer's ack wait (in-progress acks are sent at a third of it).
    pub ack_wait: Duration,
    /// Outstanding un-acked updates allowed (must exceed the largest cohort).
    pub max_ack_pending: i64,
    /// Largest inline payload accepted; larger updates must use the object store.
    pub inline_limit: usize,
    /// This node's shm directory.
    pub shm_dir: PathBuf,
    /// Shared-memory budget per job, bytes.
    pub shm_budget: usize,
    /// Messages per pull request.
    pub batch: usize,
}

/// Everything the gateway needs.
#[derive(Debug, Clone)]
pub struct GatewayContext {
    /// NATS handles.
    pub infra: Infra,
    /// Job view.
    pub directory: JobDirectory,
    /// Function host.
    pub host: Addr<FunctionHost>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Rejection path.
    pub rejector: Rejector,
    /// Configuration.
    pub config: GatewayConfig,
    /// This node.
    pub node: shoal_functions::NodeId,
    /// This process (its membership lease instance), named in the claims it makes.
    pub instance: shoal_proto::InstanceId,
    /// The jobs this node serves (`--max-jobs`).
    pub slots: Arc<JobSlots>,
}

/// The outcome of [`Gateway::claim`].
enum Claim {
    /// This message holds the claim.
    Ours,
    /// Another message of the client holds it.
    Theirs,
    /// Another live node process holds this very message (it was delivered twice): leave it
    /// alone; JetStream delivers it again if that process dies.
    HeldElsewhere(shoal_functions::NodeId),
    /// KV did not answer: retry the message later.
    Unknown,
}

struct Gateway {
    ctx: GatewayContext,
    claims: Option<async_nats::jetstream::kv::Store>,
    pools: HashMap<JobId, Arc<SlotPool>>,
    /// Clients staged per (job, round) with their message's stream sequence (to tell a
    /// redelivery of the same message from a second update).
    seen: HashMap<(JobId, RoundId), HashMap<ClientId, u64>>,
}

/// The gateway's pull subscription: (re)creates the durable consumer and its message stream.
async fn open_updates(
    ctx: &GatewayContext,
) -> Result<(async_nats::jetstream::consumer::Consumer<pull::Config>, pull::Stream)> {
    let consumer = ctx
        .infra
        .updates
        .get_or_create_consumer(
            subjects::GATEWAY_CONSUMER,
            pull::Config {
                durable_name: Some(subjects::GATEWAY_CONSUMER.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ctx.config.ack_wait,
                max_ack_pending: ctx.config.max_ack_pending,
                deliver_policy: DeliverPolicy::All,
                filter_subject: ctx.infra.subjects.all_updates(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::nats("create gateway consumer", e))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(ctx.config.batch)
        .messages()
        .await
        .map_err(|e| Error::nats("pull updates", e))?;
    Ok((consumer, messages))
}

/// How often the gateway checks that its consumer makes progress.
const STALL_CHECK: Duration = Duration::from_secs(5);
/// Pull errors in a row after which the subscription is opened again.
const MAX_PULL_ERRORS: u32 = 5;

/// Runs the gateway until `cancel`.
///
/// A watchdog keeps the pull subscription alive (`bug-cases.md` row 37): when the message
/// stream ends, fails [`MAX_PULL_ERRORS`] times in a row, or delivers nothing for a
/// [`STALL_CHECK`] while the consumer has messages waiting, the consumer and its stream are
/// opened again (a deleted consumer is recreated; un-acked updates are redelivered, and the
/// claims keep a copy from being staged twice). Each reopening is counted in
/// `shoal_consumer_restarts_total`.
///
/// # Errors
/// NATS errors creating the consumer or its message stream at start-up.
pub async fn run(ctx: GatewayContext, cancel: CancellationToken) -> Result<()> {
    let (mut consumer, mut messages) = open_updates(&ctx).await?;
    let mut gw = Gateway { ctx, claims: None, pools: HashMap::new(), seen: HashMap::new() };
    let mut prune = tokio::time::interval(Duration::from_secs(5));
    let mut watchdog = tokio::time::interval(STALL_CHECK);
    let (mut delivered, mut errors) = (true, 0u32);
    loop {
        let reopen = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = prune.tick() => {
                gw.release_ended_jobs();
                false
            }
            _ = watchdog.tick() => {
                let stalled = !std::mem::replace(&mut delivered, false) && match consumer.info().await {
                    Ok(info) => info.num_pending > 0 && (info.num_ack_pending as i64) < gw.ctx.config.max_ack_pending,
                    // The consumer is gone (deleted, or the server lost it): open it again.
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway consumer unavailable");
                        true
                    }
                };
                stalled
            }
            m = messages.next() => match m {
                Some(Ok(m)) => {
                    (delivered, errors) = (true, 0);
                    gw.handle(m).await;
                    false
                }
                Some(Err(e)) => {
                    errors += 1;
                    tracing::warn!(error = %e, errors, "pull error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    errors >= MAX_PULL_ERRORS
                }
                None => true,
            },
        };
        if reopen {
            gw.ctx.metrics.consumer_restarts.inc();
            tracing::warn!("gateway consumer stalled or ended; opening it again");
            loop {
                match open_updates(&gw.ctx).await {
                    Ok((c, m)) => {
                        (consumer, messages) = (c, m);
                        (delivered, errors) = (true, 0);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reopening the gateway consumer failed; retrying in 1 s");
                        tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
    }
}

/// A refusal with its detail.
struct Refusal(RejectReason, String);

fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h?.get(name).map(|v| v.as_str())
}

/// A header's decimal value: ASCII digits only (1 to 20 of them) that fit a `u64`. No sign,
/// exponent, fraction, inner space or `0x`: `+100`, `1e3`, `7.0` and `7 0` are refused, where
/// `str::parse` would take `+100`. (Spaces around a value are not part of it: NATS header syntax
/// is HTTP's, and the client library strips them on receipt, so ` 7 ` arrives as `7`.)
pub fn parse_decimal(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn header_u64(h: Option<&HeaderMap>, name: &str) -> Result<u64, Refusal> {
    let v = header(h, name)
        .ok_or_else(|| Refusal(RejectReason::MalformedHeaders, format!("header {name} missing")))?;
    parse_decimal(v).ok_or_else(|| {
        Refusal(RejectReason::MalformedHeaders, format!("header {name}={v:?} is not a decimal integer"))
    })
}

impl Gateway {
    /// Unmaps the shared memory of jobs that have ended (their slots are all returned: nothing
    /// is staged for a job that no longer runs).
    fn release_ended_jobs(&mut self) {
        let dir = &self.ctx.directory;
        let running = |job: &JobId| dir.get(job).is_some_and(|e| e.state.phase == JobPhase::Running);
        self.pools.retain(|job, _| running(job));
        self.seen.retain(|(job, _), _| running(job));
    }

    async fn handle(&mut self, msg: async_nats::jetstream::Message) {
        let stream_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let message = msg.message;
        let Some(reply) = message.reply.clone() else {
            tracing::warn!(subject = %message.subject, "JetStream message without a reply subject ignored");
            return;
        };
        let ack = AckHandle::new(self.ctx.infra.client.clone(), reply);
        let parsed = self.ctx.infra.subjects.parse_update(message.subject.as_str());
        let Some((job, client)) = parsed else {
            let job = message.subject.as_str().split('.').nth(1).map(str::to_owned);
            let detail =
                format!("subject {:?} is not <prefix>.<job>.update.<client>", message.subject.as_str());
            self.ctx
                .rejector
                .reject(job.as_deref(), None, None, RejectReason::MalformedHeaders, detail, Some(&ack))
                .await;
            return;
        };
        let round = header_u64(message.headers.as_ref(), shoal_proto::headers::HDR_ROUND).ok().map(RoundId);
        match self.accept(&job, &client, stream_seq, &message, &ack).await {
            Ok(None) => {}
            Ok(Some(staged)) => {
                tracing::trace!(%job, %client, round = staged.round.0, stream_seq, "update staged");
                if let Err(e) = self.ctx.host.send(staged).await {
                    tracing::error!(error = %e, "function host unavailable; update will be redelivered");
                }
            }
            Err(Refusal(reason, detail)) => {
                self.ctx
                    .rejector
                    .reject(Some(job.as_str()), Some(&client), round, reason, detail, Some(&ack))
                    .await;
            }
        }
    }

    async fn job_entry(&self, job: &JobId) -> Option<JobEntry> {
        if let Some(e) = self.ctx.directory.get(job) {
            return Some(e);
        }
        // Not seen by the watch yet (e.g. right after a restart): ask KV before refusing.
        let spec = jobs::load_spec(&self.ctx.infra.js, job).await.ok()?;
        let (state, rev) = jobs::load_state(&self.ctx.infra.js, job).await.ok()?;
        self.ctx.directory.observe_state(job, Some(Arc::new(spec)), state, rev);
        self.ctx.directory.get(job)
    }

    /// Validates and stages one update; `Ok(None)` means "leave the message alone".
    async fn accept(
        &mut self,
        job: &JobId,
        client: &ClientId,
        stream_seq: u64,
        message: &async_nats::Message,
        ack: &AckHandle,
    ) -> Result<Option<Staged>, Refusal> {
        let h = message.headers.as_ref();
        let round = RoundId(header_u64(h, shoal_proto::headers::HDR_ROUND)?);
        let base = header_u64(h, shoal_proto::headers::HDR_BASE_VERSION)?;
        let kind = header(h, shoal_proto::headers::HDR_KIND).unwrap_or("parameters");
        let kind = UpdateKind::parse(kind).ok_or_else(|| {
            Refusal(RejectReason::MalformedHeaders, format!("Shoal-Kind {kind:?} is not delta|parameters"))
        })?;
        let num_examples = header(h, shoal_proto::headers::HDR_NUM_EXAMPLES)
            .ok_or_else(|| Refusal(RejectReason::InvalidWeight, "Shoal-Num-Examples missing".into()))?;
        let num_examples = parse_decimal(num_examples).ok_or_else(|| {
            Refusal(
                RejectReason::InvalidWeight,
                format!("num_examples {num_examples:?} is not a decimal integer (digits only)"),
            )
        })?;

        let entry = self
            .job_entry(job)
            .await
            .ok_or_else(|| Refusal(RejectReason::UnknownJob, format!("job {job} does not exist")))?;
        let (spec, state) = (&entry.spec, &entry.state);
        if let Some(applied) = self.ctx.directory.applied(job, stream_seq) {
            // A copy of an update that a committed model already includes, delivered again
            // because its node died before acking it (or nats-server lost the ack): done. Not
            // folded again, and not refused as late: the client's update did count.
            tracing::debug!(%job, %client, round = %applied, stream_seq, "update already applied; acked");
            self.ctx.metrics.updates_already_applied.inc();
            ack.ack().await;
            if let Some(name) = header(h, shoal_proto::headers::HDR_OBJECT) {
                if let Err(e) = self.ctx.infra.update_objects.delete(name).await {
                    tracing::debug!(object = %name, error = %e, "deleting an applied update's object failed");
                }
            }
            return Ok(None);
        }
        if state.phase != JobPhase::Running {
            return Err(Refusal(RejectReason::JobNotRunning, format!("job {job} is {}", state.phase)));
        }
        match self.ctx.slots.admission(job) {
            Admission::Served => {}
            Admission::Unknown => {
                // The job watch has not decided about this job yet: try again shortly.
                ack.nak(Duration::from_millis(250)).await;
                return Ok(None);
            }
            Admission::Waiting => {
                let key = subjects::top_lease_key(job);
                match crate::cluster::lease::fresh_holder(&self.ctx.infra, &key).await {
                    Ok(Some(top)) if top != self.ctx.node => {
                        // Another node serves the job: leave the update to it.
                        ack.nak(Duration::from_millis(500)).await;
                        return Ok(None);
                    }
                    _ => {
                        return Err(Refusal(
                            RejectReason::NodeAtCapacity,
                            format!(
                                "this node serves its maximum of {} jobs and no node serves job {job} yet",
                                self.ctx.slots.max().unwrap_or(0)
                            ),
                        ))
                    }
                }
            }
        }
        if entry.pinned && self.ctx.directory.top(job).as_ref() != Some(&self.ctx.node) {
            // Whole-cohort strategies without a sharded form (RFFL, Bristle) aggregate on the
            // top's node (see `hierarchy`): leave the update to that node's gateway.
            ack.nak(Duration::from_millis(100)).await;
            return Ok(None);
        }
        let rule = spec.round_rule();
        let staleness = if rule.asynchronous {
            // Asynchronous modes: an update for any round up to the open one is folded into the
            // open buffer, weighted by how many versions behind its base is.
            if round.0 > state.round.0.saturating_add(1) {
                return Err(Refusal(
                    RejectReason::WrongRound,
                    format!("round {round} is not open; round {} is", state.round),
                ));
            }
            if round > state.round || !state.is_open() {
                // The next round, or the buffer between two: our view may lag by a moment.
                ack.nak(Duration::from_millis(100)).await;
                return Ok(None);
            }
            let current = state.model_version.0;
            if base > current {
                return Err(Refusal(
                    RejectReason::WrongBaseVersion,
                    format!("trained from version {base}, newer than the current {current}"),
                ));
            }
            if current - base > rule.max_staleness {
                return Err(Refusal(
                    RejectReason::LateUpdate,
                    format!(
                        "trained from version {base}, {} versions behind; the job accepts {}",
                        current - base,
                        rule.max_staleness
                    ),
                ));
            }
            current - base
        } else {
            0
        };
        if !rule.asynchronous && round < state.round {
            return Err(Refusal(
                RejectReason::LateUpdate,
                format!("round {round} closed; round {} is open", state.round),
            ));
        }
        if round.0 == state.round.0 + 1 {
            // Our view may lag the committer by a moment: try again shortly.
            ack.nak(Duration::from_millis(250)).await;
            return Ok(None);
        }
        if round > state.round {
            return Err(Refusal(
                RejectReason::WrongRound,
                format!("round {round} is not open; round {} is", state.round),
            ));
        }
        if !rule.asynchronous && base != state.model_version.0 {
            return Err(Refusal(
                RejectReason::WrongBaseVersion,
                format!("trained from version {base}; round {round} trains from {}", state.model_version),
            ));
        }
        if num_examples == 0 || num_examples > spec.max_num_examples {
            return Err(Refusal(
                RejectReason::InvalidWeight,
                format!("num_examples {num_examples} outside 1..={}", spec.max_num_examples),
            ));
        }
        if kind != spec.update_kind {
            return Err(Refusal(
                RejectReason::SchemaMismatch,
                format!("job {job} takes {} updates, got {}", spec.update_kind.as_str(), kind.as_str()),
            ));
        }
        self.seen.retain(|(j, r), _| j != job || *r >= state.round);
        // Asynchronous modes key by the buffer the update goes to: one handed back for the next
        // buffer comes again with the same stream sequence and must be staged again.
        let seen_round = if rule.asynchronous { state.round } else { round };
        match self.seen.get(&(job.clone(), seen_round)).and_then(|m| m.get(client)) {
            Some(&seq) if seq == stream_seq => return Ok(None), // redelivery of a message we hold
            Some(_) => {
                return Err(Refusal(
                    RejectReason::Duplicate,
                    format!("client {client} already sent an update for round {round}"),
                ))
            }
            None => {}
        }
        if let Some(max) = spec.round_client_limit() {
            let staged = self.seen.get(&(job.clone(), seen_round)).map_or(0, HashMap::len);
            if staged >= max as usize {
                return Err(Refusal(
                    RejectReason::CohortFull,
                    format!("round {round} holds {staged} updates, the job's max_clients_per_round"),
                ));
            }
        }

        let manifest = &entry.manifest;
        let max_bytes = usize::try_from(spec.update_byte_limit()).unwrap_or(usize::MAX);
        let object = header(h, shoal_proto::headers::HDR_OBJECT).map(str::to_owned);
        let payload: Bytes = match &object {
            None => {
                let len = message.payload.len();
                if len > max_bytes {
                    return Err(Refusal(
                        RejectReason::PayloadTooLarge,
                        format!("update of {len} bytes exceeds the job's max_update_bytes {max_bytes}"),
                    ));
                }
                let limit = self.ctx.config.inline_limit;
                if len > limit {
                    return Err(Refusal(
                        RejectReason::PayloadTooLarge,
                        format!(
                            "inline payload of {len} bytes exceeds this node's inline limit {limit}; \
                             publish through the object store"
                        ),
                    ));
                }
                message.payload.clone()
            }
            Some(name) => self.fetch_object(job, round, client, name, h, max_bytes).await?,
        };

        let pool = self
            .pools
            .entry(job.clone())
            .or_insert_with(|| {
                SlotPool::new(
                    self.ctx.config.shm_dir.clone(),
                    job.to_string(),
                    manifest.slot_bytes(),
                    self.ctx.config.shm_budget,
                )
            })
            .clone();
        let mut slot = pool.alloc().await.map_err(|e| {
            tracing::error!(error = %e, "cannot allocate shared memory");
            Refusal(RejectReason::PayloadTooLarge, format!("no shared memory for the update: {e}"))
        })?;
        stage_update(manifest, &payload, slot.bytes_mut())
            .map_err(|e| Refusal(RejectReason::from(&e), e.to_string()))?;
        // One node stages each (job, round, client): another node may hold this very message
        // (delivered twice) or another update of the client for the round.
        match self.claim(job, seen_round, client, stream_seq).await {
            Claim::Ours => {}
            Claim::HeldElsewhere(node) => {
                tracing::debug!(%job, %client, %round, %node, stream_seq, "update held by another node; left alone");
                return Ok(None);
            }
            Claim::Theirs => {
                return Err(Refusal(
                    RejectReason::Duplicate,
                    format!("client {client} already sent an update for round {round}"),
                ))
            }
            Claim::Unknown => {
                ack.nak(Duration::from_secs(1)).await;
                return Ok(None);
            }
        }
        self.ctx.metrics.bytes_staged.inc_by(manifest.data_bytes() as u64);
        self.seen.entry((job.clone(), seen_round)).or_default().insert(client.clone(), stream_seq);
        Ok(Some(Staged {
            job: job.clone(),
            round: state.round,
            staleness,
            asynchronous: rule.asynchronous,
            received: std::time::Instant::now(),
            start: None,
            client: client.clone(),
            weight: num_examples as f64,
            slot,
            acker: ack.clone(),
            stream_seq,
            object,
            manifest: Arc::clone(manifest),
            spec: Arc::clone(spec),
        }))
    }

    /// Claims (job, round, client) for the message at `stream_seq` in KV `shoal-claims`
    /// (`crate::ingest::claims`): the first message claims it; a redelivery of that message finds its
    /// own claim when this process made it or the process that made it is gone, and is left to
    /// its live holder otherwise; any other message of the client for the round is a duplicate,
    /// whichever node pulled the first.
    async fn claim(&mut self, job: &JobId, round: RoundId, client: &ClientId, stream_seq: u64) -> Claim {
        let claims = match &self.claims {
            Some(c) => c.clone(),
            None => match self.ctx.infra.claims(crate::ingest::claims::MAX_AGE).await {
                Ok(c) => {
                    self.claims = Some(c.clone());
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, "update claims unavailable; retrying the update");
                    return Claim::Unknown;
                }
            },
        };
        let who = (job, round, client);
        match crate::ingest::claims::claim(
            &claims,
            &self.ctx.infra,
            who,
            &self.ctx.node,
            self.ctx.instance,
            stream_seq,
        )
        .await
        {
            Ok(crate::ingest::claims::Claim::Mine) => Claim::Ours,
            Ok(crate::ingest::claims::Claim::HeldBy(node)) => Claim::HeldElsewhere(node),
            Ok(crate::ingest::claims::Claim::Other(_)) => Claim::Theirs,
            Err(e) => {
                tracing::warn!(error = %e, "claiming an update failed; retrying the update");
                Claim::Unknown
            }
        }
    }

    async fn fetch_object(
        &self,
        job: &JobId,
        round: RoundId,
        client: &ClientId,
        name: &str,
        h: Option<&HeaderMap>,
        max_bytes: usize,
    ) -> Result<Bytes, Refusal> {
        use shoal_client::objects::ObjectReadError as E;
        let own = subjects::update_object(job, round, client);
        if name != own {
            return Err(Refusal(
                RejectReason::Unauthorized,
                format!("object {name:?} is not this client's ({own:?})"),
            ));
        }
        let digest = header(h, shoal_proto::headers::HDR_DIGEST)
            .and_then(|d| d.strip_prefix("sha256:"))
            .ok_or_else(|| {
                Refusal(RejectReason::MalformedHeaders, "Shoal-Digest sha256:<hex> missing".into())
            })?
            .to_ascii_lowercase();
        // Size from the metadata first (nothing is read for an oversized object), then every
        // chunk by a bounded direct get: a missing chunk is a refusal, not a stalled gateway.
        let read = shoal_client::objects::read_object_checked(
            &self.ctx.infra.js,
            subjects::UPDATES_BUCKET,
            name,
            max_bytes,
        );
        let buf = match tokio::time::timeout(OBJECT_READ_TIMEOUT, read).await {
            Err(_) => {
                return Err(Refusal(
                    RejectReason::ObjectUnavailable,
                    format!("object {name:?} not read within {OBJECT_READ_TIMEOUT:?}"),
                ))
            }
            Ok(Ok(buf)) => buf,
            Ok(Err(e)) => {
                let reason = match e {
                    E::TooLarge { .. } => RejectReason::PayloadTooLarge,
                    E::Corrupt { .. } => RejectReason::DigestMismatch,
                    E::Missing { .. } | E::MissingChunk { .. } => RejectReason::ObjectUnavailable,
                };
                return Err(Refusal(reason, e.to_string()));
            }
        };
        let got = hex::encode(Sha256::digest(&buf));
        if got != digest {
            return Err(Refusal(
                RejectReason::DigestMismatch,
                format!("object digest {got} != header {digest}"),
            ));
        }
        Ok(Bytes::from(buf))
    }
}
