//! The gateway: pulls client updates from JetStream, decides whether to take each one
//! ([`admission`]), writes its tensor bytes once into a shared-memory slot, claims it
//! cluster-wide ([`claims`]) and hands it to the function host.
//!
//! One update, in order: the subject's ids → the headers' grammar
//! ([`shoal_proto::headers::UpdateHeaders::parse`]) → the job (from the node's directory, or KV
//! right after a restart) → [`admission::decide`] (pure) → the payload: inline, or through the
//! upload path ([`fetch`]) → a slot of the job's pool ([`crate::staging`]; waiting for one is
//! the backpressure) → `stage_update` checks the safetensors payload against the manifest while
//! copying it into the slot → the claim → the function host. Every refusal is a typed reason
//! through the one rejection path ([`reject`]). Accepted messages are **not** acked here: the
//! leaves ack them after the commit and keep them alive with in-progress acks meanwhile.

pub mod admission;
pub mod adopt;
pub mod claims;
pub mod demand;
pub mod fetch;
pub mod ledger;
pub mod reject;

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::tensor::stage_update;
use shoal_functions::{Mergeability, PartialAggregate};
use shoal_proto::config::ms;
use shoal_proto::headers::UpdateHeaders;
use shoal_proto::headers::Upload;
use shoal_proto::{subjects, ClientId, JobId, JobPhase, NodeId, RejectReason, RoundId};

use self::admission::{Admitted, Decision, Facts, Later, Seen, Service};
use self::ledger::{HeldUpdate, Settle, UploadChunks};
use self::reject::{AckHandle, Refusal, Refused};
use crate::error::{Error, Result};
use crate::host::Delivery;
use crate::jobs::{self, JobEntry};
use crate::node::capacity::Admission;
use crate::node::NodeContext;
use crate::staging::stream::StreamFailure;
use crate::staging::SlotPool;
use shoal_proto::descriptor::{DescriptorKind, UpdateDescriptor};
use shoal_proto::FunctionId;

/// The outcome of [`Gateway::claim`].
enum Claim {
    /// This message holds the claim.
    Ours,
    /// Another message of the client holds it.
    Theirs,
    /// Another live node process holds this very message (it was delivered twice): leave it
    /// alone; JetStream delivers it again if that process dies.
    HeldElsewhere(NodeId),
    /// KV did not answer: retry the message later.
    Unknown,
}

/// The environment variable that makes the gateway wait between staging a streamed upload's
/// last chunk and giving its verdict (test only: `tests/fold_while_staging.rs` lets the host
/// fold every byte of an update the gateway then refuses; never set in production).
pub const STREAM_HOLD_ENV: &str = "SHOAL_TEST_STREAM_VERDICT_HOLD_MS";
/// The environment variable that makes the gateway wait between verifying a streamed upload
/// and folding it (test only: `tests/fold_while_staging.rs` re-publishes the upload's chunks in
/// that window; never set in production).
pub const VERIFIED_HOLD_ENV: &str = "SHOAL_TEST_STREAM_VERIFIED_HOLD_MS";

/// Test-only pauses of fold-while-staging, read once from the environment.
#[derive(Debug, Default, Clone, Copy)]
struct TestHolds {
    verified: Option<std::time::Duration>,
    verdict: Option<std::time::Duration>,
}

impl TestHolds {
    fn from_env() -> TestHolds {
        let ms = |name: &str| std::env::var(name).ok()?.parse().ok().map(std::time::Duration::from_millis);
        TestHolds { verified: ms(VERIFIED_HOLD_ENV), verdict: ms(STREAM_HOLD_ENV) }
    }
}

struct Gateway {
    ctx: NodeContext,
    claims: Option<async_nats::jetstream::kv::Store>,
    pools: HashMap<JobId, Arc<SlotPool>>,
    /// Clients staged per (job, round) with their message's stream sequence (to tell a
    /// redelivery of the same message from a second update).
    seen: Seen,
    /// Jobs whose update slot is larger than the shared-memory budget (logged once).
    over_budget: std::collections::HashSet<JobId>,
    /// The incarnation (`JobEntry::incarnation`) of each job the gateway keeps state for: a job
    /// deleted and created again under its id starts with no pool, no seen clients.
    incarnations: HashMap<JobId, u64>,
    /// Whether a job's updates may be folded while they are staged, by job (with the
    /// incarnation it was decided for).
    streamable: HashMap<JobId, (u64, bool)>,
    /// Test-only pauses ([`STREAM_HOLD_ENV`], [`VERIFIED_HOLD_ENV`]).
    test_holds: TestHolds,
    /// Inline updates staged and not yet claimed: their claims go out together
    /// ([`Gateway::flush`]), one round trip's wait for the batch instead of one per update.
    batch: Vec<Unclaimed>,
}

/// An inline update staged in its slot, waiting for its claim ([`Gateway::flush`]).
struct Unclaimed {
    u: Incoming,
    entry: Arc<JobEntry>,
    admitted: Admitted,
    slot: crate::staging::Slot,
}

/// One update message on its way in.
#[derive(Clone)]
struct Incoming {
    job: JobId,
    client: ClientId,
    stream_seq: u64,
    headers: UpdateHeaders,
    payload: Bytes,
    ack: AckHandle,
}

type Consumer = async_nats::jetstream::consumer::Consumer<pull::Config>;

/// The gateway's pull subscription: (re)creates the durable consumer and its message stream.
/// An existing consumer whose ack wait or `max_ack_pending` differ from this node's flags is
/// updated to them (the last node started sets them for all). Pulls are sized by count
/// (`--pull-batch`) and by bytes (`--pull-max-mib`), so a batch of large inline updates stays
/// below nats-server's per-connection `max_pending` instead of getting the node cut off as a
/// slow consumer.
async fn open_updates(ctx: &NodeContext) -> Result<(Consumer, pull::Stream)> {
    let name = ctx.infra.subjects.gateway_consumer();
    let config = pull::Config {
        durable_name: Some(name.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: ctx.config.ack_wait(),
        max_ack_pending: i64::try_from(ctx.config.max_ack_pending).unwrap_or(i64::MAX),
        deliver_policy: DeliverPolicy::All,
        filter_subject: ctx.infra.subjects.all_updates(),
        ..Default::default()
    };
    let mut consumer = ctx
        .infra
        .updates
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| Error::nats("create gateway consumer", e))?;
    let have = &consumer.cached_info().config;
    if have.ack_wait != config.ack_wait || have.max_ack_pending != config.max_ack_pending {
        tracing::info!(
            ack_wait = ?config.ack_wait, max_ack_pending = config.max_ack_pending,
            was_ack_wait = ?have.ack_wait, was_max_ack_pending = have.max_ack_pending,
            "updating the gateway consumer to this node's flags"
        );
        consumer = ctx
            .infra
            .updates
            .update_consumer(config)
            .await
            .map_err(|e| Error::nats("update gateway consumer", e))?;
    }
    // Pull requests expire within half the lease's stale time: a node that stops (SIGSTOP, a
    // partition) stops being handed deliveries soon after, instead of absorbing them for the
    // 30 s default while others wait (the heartbeat tells a live pull from a dead one).
    let expires = ctx.config.timings.lease_stale() / 2;
    let messages = consumer
        .stream()
        .max_messages_per_batch(ctx.config.pull_batch as usize)
        .max_bytes_per_batch(ctx.config.pull_max_bytes(ctx.infra.max_payload()))
        .expires(expires)
        .heartbeat(expires / 3)
        .messages()
        .await
        .map_err(|e| Error::nats("pull updates", e))?;
    Ok((consumer, messages))
}

/// Runs the gateway until the node shuts down.
///
/// A watchdog keeps the pull subscription alive (`bug-cases.md` row 37): when the message
/// stream ends, fails `timings.max_pull_errors` times in a row, or delivers nothing for a
/// `timings.consumer_stall_check_ms` while the consumer has messages waiting, the consumer and
/// its stream are opened again (a deleted consumer is recreated; un-acked updates are
/// redelivered, and the claims keep a copy from being staged twice). Each reopening is counted
/// in `shoal_consumer_restarts_total`.
///
/// # Errors
/// NATS errors creating the consumer or its message stream at start-up.
pub async fn run(ctx: NodeContext) -> Result<()> {
    let (mut consumer, mut messages) = open_updates(&ctx).await?;
    let t = ctx.config.timings.clone();
    let cancel = ctx.cancel.clone();
    let mut adoptions = ctx.adoptions.take_receiver();
    let mut gw = Gateway {
        ctx,
        claims: None,
        pools: HashMap::new(),
        seen: Seen::new(),
        over_budget: Default::default(),
        incarnations: HashMap::new(),
        streamable: HashMap::new(),
        batch: Vec::new(),
        test_holds: TestHolds::from_env(),
    };
    let mut prune = tokio::time::interval(ms(t.prune_interval_ms));
    let mut watchdog = tokio::time::interval(ms(t.consumer_stall_check_ms));
    let (mut delivered, mut errors) = (true, 0u32);
    loop {
        let reopen = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = prune.tick() => {
                gw.release_ended_jobs();
                false
            }
            Some(req) = adopt::next(&mut adoptions) => {
                let n = gw.adopt(&req.job, req.round).await;
                gw.flush().await;
                let _ = req.done.send(n);
                false
            }
            _ = watchdog.tick() => !std::mem::replace(&mut delivered, false) && stalled(&gw.ctx, &mut consumer).await,
            m = messages.next() => match m {
                Some(Ok(m)) => {
                    (delivered, errors) = (true, 0);
                    gw.handle(m).await;
                    // The messages already here join the batch; their claims go out together.
                    let mut ended = false;
                    for _ in 1..BATCH_MAX {
                        match futures::FutureExt::now_or_never(messages.next()) {
                            Some(Some(Ok(m))) => gw.handle(m).await,
                            Some(Some(Err(e))) => {
                                tracing::warn!(error = %e, "pull error; retrying");
                                break;
                            }
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    gw.flush().await;
                    ended
                }
                Some(Err(e)) => {
                    errors += 1;
                    tracing::warn!(error = %e, errors, "pull error; retrying");
                    tokio::time::sleep(ms(t.pull_error_backoff_ms)).await;
                    errors >= t.max_pull_errors
                }
                None => true,
            },
        };
        if reopen {
            gw.ctx.metrics.consumer_restarts.inc();
            tracing::warn!("gateway consumer stalled or ended; opening it again");
            let Some((c, m)) = reopen_updates(&gw.ctx).await else { return Ok(()) };
            (consumer, messages, delivered, errors) = (c, m, true, 0);
        }
    }
}

/// Whether a consumer that delivered nothing since the last check is stuck: messages wait and
/// it has room for them, or it is gone (deleted, or the server lost it).
async fn stalled(ctx: &NodeContext, consumer: &mut Consumer) -> bool {
    match consumer.info().await {
        Ok(info) => info.num_pending > 0 && (info.num_ack_pending as u64) < ctx.config.max_ack_pending,
        Err(e) => {
            tracing::warn!(error = %e, "gateway consumer unavailable");
            true
        }
    }
}

/// Opens the consumer again, retrying until it works; `None` when the node shuts down first.
async fn reopen_updates(ctx: &NodeContext) -> Option<(Consumer, pull::Stream)> {
    loop {
        match open_updates(ctx).await {
            Ok(opened) => return Some(opened),
            Err(e) => {
                let retry = ms(ctx.config.timings.retry_ms);
                tracing::warn!(error = %e, ?retry, "reopening the gateway consumer failed; retrying");
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return None,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

impl Gateway {
    /// Unmaps the shared memory of jobs that have ended (their slots are all returned: nothing
    /// is staged for a job that no longer runs).
    fn release_ended_jobs(&mut self) {
        let dir = &self.ctx.directory;
        let running = |job: &JobId| dir.get(job).is_some_and(|e| e.state.phase == JobPhase::Running);
        self.pools.retain(|job, _| running(job));
        self.over_budget.retain(|job| running(job));
        self.incarnations.retain(|job, _| dir.get(job).is_some());
        self.seen.retain(|job, _| running(job));
        self.streamable.retain(|job, _| running(job));
    }

    async fn handle(&mut self, msg: async_nats::jetstream::Message) {
        let stream_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let message = msg.message;
        let Some(reply) = message.reply.clone() else {
            tracing::warn!(subject = %message.subject, "JetStream message without a reply subject ignored");
            return;
        };
        let ack = AckHandle::new(self.ctx.infra.client.clone(), reply);
        self.process(message.subject.as_str(), message.headers.as_ref(), message.payload, stream_seq, ack)
            .await;
    }

    /// Parses an update message (delivered, or adopted) and decides about it.
    async fn process(
        &mut self,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: Bytes,
        stream_seq: u64,
        ack: AckHandle,
    ) {
        let Some((job, client)) = self.ctx.infra.subjects.parse_update(subject) else {
            let job = subject.split('.').nth(1);
            let detail = format!("subject {subject:?} is not <prefix>.<job>.update.<client>");
            let refusal = Refusal::new(RejectReason::MalformedHeaders, detail);
            self.ctx.rejector.reject(Refused { job, ..Refused::default() }, refusal, Some(&ack)).await;
            return;
        };
        let get = |name: &str| headers?.get(name).map(|v| v.as_str());
        let round = UpdateHeaders::round_of(get);
        let headers = match UpdateHeaders::parse(get) {
            Ok(h) => h,
            Err(e) => {
                let who = Refused { job: Some(job.as_str()), client: Some(&client), round };
                let refusal = Refusal::new(e.reason, e.detail);
                self.ctx.rejector.reject(who, refusal, Some(&ack)).await;
                return;
            }
        };
        let update = Incoming { job, client, stream_seq, headers, payload, ack };
        if let Err(refusal) = self.accept(&update).await {
            let who = Refused { job: Some(update.job.as_str()), client: Some(&update.client), round };
            self.ctx.rejector.reject(who, refusal, Some(&update.ack)).await;
        }
    }

    async fn job_entry(&self, job: &JobId) -> Option<Arc<JobEntry>> {
        if let Some(e) = self.ctx.directory.get(job) {
            return Some(e);
        }
        // Not seen by the watch yet (e.g. right after a restart): ask KV before refusing.
        let spec = jobs::load_spec(&self.ctx.infra, job).await.ok()?;
        let (state, rev) = jobs::load_state(&self.ctx.infra, job).await.ok()?;
        self.ctx.directory.observe_state(job, Some(Arc::new(spec)), state, rev);
        self.ctx.directory.get(job)
    }

    /// Whether this node serves `job`, asking KV for the job's top when it waits for a slot.
    async fn service(&self, job: &JobId) -> Service {
        match self.ctx.slots.admission(job) {
            Admission::Served => Service::Served,
            Admission::Unknown => Service::Unknown,
            Admission::Waiting => {
                let key = subjects::top_lease_key(job);
                let top = self.ctx.liveness.holder(&self.ctx.infra, &key).await;
                Service::Waiting { top: top.ok().flatten().map(|l| l.node) }
            }
        }
    }

    /// Decides about one update and carries the decision out; `Err` is a refusal for the
    /// caller to send.
    async fn accept(&mut self, u: &Incoming) -> Result<(), Refusal> {
        let entry = self
            .job_entry(&u.job)
            .await
            .ok_or_else(|| Refusal::new(RejectReason::UnknownJob, format!("job {} does not exist", u.job)))?;
        if self.incarnations.insert(u.job.clone(), entry.incarnation).is_some_and(|i| i != entry.incarnation)
        {
            self.pools.remove(&u.job);
            self.seen.remove(&u.job);
            self.over_budget.remove(&u.job);
            self.streamable.remove(&u.job);
        }
        let state_round = entry.state.round;
        if let Some(rounds) = self.seen.get_mut(&u.job) {
            // Rounds before the open one are settled: forget them.
            *rounds = rounds.split_off(&state_round);
            // An update this gateway handed back (its function host died, or refused its
            // descriptor) is not held any more: its redelivery is staged again.
            if self.ctx.ledger.take_handed_back(u.stream_seq) {
                for clients in rounds.values_mut() {
                    clients.retain(|_, seq| *seq != u.stream_seq);
                }
            }
        }
        let service = self.service(&u.job).await;
        let top = self.ctx.directory.top(&u.job);
        let decision = admission::decide(&Facts {
            client: &u.client,
            stream_seq: u.stream_seq,
            headers: &u.headers,
            payload_len: u.payload.len(),
            spec: &entry.spec,
            state: &entry.state,
            pinned: entry.pinned,
            applied: self.ctx.directory.applied(&u.job, u.stream_seq),
            service: &service,
            node: &self.ctx.node,
            top: top.as_ref(),
            max_payload: self.ctx.infra.max_payload() as u64,
            seen: &self.seen,
            max_jobs: self.ctx.slots.max(),
        });
        match decision {
            Decision::Refuse(r) => Err(r),
            Decision::Later(why) => {
                u.ack.nak(self.nak_delay(why)).await;
                Ok(())
            }
            Decision::Redelivery => Ok(()),
            Decision::AlreadyApplied(round) => {
                self.already_applied(u, round).await;
                Ok(())
            }
            Decision::Stage(admitted) => {
                let started = std::time::Instant::now();
                let staged = match self.stage(u, &entry, admitted).await {
                    Ok(Some(delivery)) => {
                        tracing::trace!(job = %u.job, client = %u.client, round = admitted.round.0, "update staged");
                        self.hand_on(delivery).await;
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(refusal) => Err(refusal),
                };
                self.ctx.metrics.ingest_stage_seconds.inc_by(started.elapsed().as_secs_f64());
                staged
            }
        }
    }

    fn nak_delay(&self, why: Later) -> std::time::Duration {
        let t = &self.ctx.config.timings;
        ms(match why {
            Later::Lagging | Later::Undecided => t.nak_lagging_ms,
            Later::Handoff => t.nak_handoff_ms,
            Later::Pinned => t.nak_pinned_ms,
        })
    }

    /// A copy of an update that a committed model already includes, delivered again because its
    /// node died before acking it (or nats-server lost the ack): done. Not folded again, and not
    /// refused as late: the client's update did count.
    async fn already_applied(&self, u: &Incoming, round: RoundId) {
        tracing::debug!(job = %u.job, client = %u.client, %round, stream_seq = u.stream_seq, "update already applied; acked");
        self.ctx.metrics.updates_already_applied.inc();
        u.ack.ack().await;
        if u.headers.upload.is_some() {
            ledger::purge_upload_of(&self.ctx.infra, (&u.job, &u.client, u.headers.round), None).await;
        }
    }

    /// Reads the payload, stages it into a slot (validating it against the manifest), claims it
    /// and records it in the ledger; returns its delivery for the function host. `Ok(None)`:
    /// leave the message alone (held elsewhere, or retried later).
    async fn stage(
        &mut self,
        u: &Incoming,
        entry: &Arc<JobEntry>,
        admitted: Admitted,
    ) -> Result<Option<Delivery>, Refusal> {
        let manifest = &entry.manifest;
        let Some(pool) = self.pool(&u.job, manifest.slot_bytes()) else {
            // Not one update of the job fits this node's shared-memory budget: another node may
            // take it (the job's top refuses a job that fits no budget, `cluster::top`).
            u.ack.nak(ms(self.ctx.config.timings.nak_handoff_ms)).await;
            return Ok(None);
        };
        let no_shm = |e: crate::Error| {
            tracing::error!(error = %e, "cannot allocate shared memory");
            Refusal::new(RejectReason::PayloadTooLarge, format!("no shared memory for the update: {e}"))
        };
        let free = pool.try_alloc().map_err(no_shm)?;
        if u.headers.upload.is_some() || free.is_none() {
            // An upload is read, and a full pool waited for, with no claim outstanding: the
            // batch's updates go to the host first (their slots come back as they are folded).
            self.flush().await;
        }
        let mut slot = match free {
            Some(slot) => slot,
            None => pool.alloc().await.map_err(no_shm)?,
        };
        let Some(upload) = &u.headers.upload else {
            stage_update(manifest, &u.payload, slot.bytes_mut())
                .map_err(|e| Refusal::new(RejectReason::from(&e), e.to_string()))?;
            // Counted as staged now (what admission reads: a second update of the client, the
            // round's client limit), taken back at the flush if the claim is not this node's.
            let seen_round = admission::seen_round(admitted, u.headers.round);
            self.seen_insert(u, seen_round);
            self.batch.push(Unclaimed { u: u.clone(), entry: Arc::clone(entry), admitted, slot });
            return Ok(None);
        };
        if self.folds_while_staging(entry) {
            return self.stage_streamed(u, entry, admitted, slot, upload).await;
        }
        // The upload path: chunks go straight into the slot (refused chunks are purged there).
        let who = (&u.job, &u.client, u.headers.round);
        let timeout = ms(self.ctx.config.timings.object_read_timeout_ms);
        let below_seq = fetch::stage_upload(
            &self.ctx.infra,
            who,
            upload,
            &entry.spec,
            (manifest, slot.bytes_mut()),
            timeout,
        )
        .await?;
        let chunks = UploadChunks { round: u.headers.round, below_seq };
        let staged = self.stage_payload(u, entry, admitted, slot, Some(chunks)).await;
        if let Err(refusal) = &staged {
            // Refused after reading (a second update of the client): the chunks read go now,
            // not at the stream's max age.
            tracing::trace!(reason = %refusal.reason.as_str(), "purging a refused upload");
            ledger::purge_upload_of(&self.ctx.infra, who, Some(below_seq)).await;
        }
        staged
    }

    /// [`Self::stage`] once the update's bytes are in `slot`: claims it, records it in the
    /// ledger and makes its delivery.
    async fn stage_payload(
        &mut self,
        u: &Incoming,
        entry: &JobEntry,
        admitted: Admitted,
        slot: crate::staging::Slot,
        upload: Option<UploadChunks>,
    ) -> Result<Option<Delivery>, Refusal> {
        // One node stages each (job, round, client): another node may hold this very message
        // (delivered twice) or another update of the client for the round.
        let seen_round = admission::seen_round(admitted, u.headers.round);
        if !self.claim_update(u, seen_round).await? {
            return Ok(None);
        }
        Ok(Some(self.staged(u, entry, admitted, slot, upload)))
    }

    /// A claimed update, staged in `slot`: counted, remembered for its round, held in the ledger
    /// (before the host can answer about it), and its delivery made.
    fn staged(
        &mut self,
        u: &Incoming,
        entry: &JobEntry,
        admitted: Admitted,
        slot: crate::staging::Slot,
        upload: Option<UploadChunks>,
    ) -> Delivery {
        self.note_staged(u, entry, admitted, admission::seen_round(admitted, u.headers.round));
        self.hold(u, admitted, upload);
        let at = slot.location();
        self.delivery(u, admitted, at, slot.into_view(), None)
    }

    /// The delivery of an update staged at `at`, whose bytes `view` shows (and `stream` reads
    /// while they are still written).
    fn delivery(
        &self,
        u: &Incoming,
        admitted: Admitted,
        at: crate::staging::SlotLocation,
        view: crate::staging::SlotView,
        stream: Option<crate::staging::stream::SlotReader>,
    ) -> Delivery {
        Delivery {
            descriptor: descriptor(u, admitted, at),
            view,
            received: std::time::Instant::now(),
            start: None,
            unfolded: self.ctx.demand.arrived(&u.job),
            stream,
        }
    }

    /// Hands a delivery to the function host.
    async fn hand_on(&self, delivery: Delivery) {
        if let Err(e) = self.ctx.sink.deliver(delivery).await {
            tracing::error!(error = %e, "no function host takes the update; it is handed back at shutdown");
        }
    }

    /// Whether `entry`'s uploads are folded while they are staged
    /// ([`crate::staging::stream`]): the function host is in this process, the node's
    /// threshold admits the slot, the rounds are synchronous and eager, the strategy streams
    /// and every tensor folds by pieces.
    fn folds_while_staging(&mut self, entry: &JobEntry) -> bool {
        let config = &self.ctx.config;
        let Some(min_mib) = config.fold_while_staging_min_mib else { return false };
        if !self.ctx.sink.takes_streams()
            || config.lazy_aggregation
            || (entry.manifest.slot_bytes() as u64) < min_mib.saturating_mul(1 << 20)
        {
            return false;
        }
        let job = &entry.spec.job;
        match self.streamable.get(job) {
            Some(&(incarnation, yes)) if incarnation == entry.incarnation => yes,
            _ => {
                let yes = !entry.spec.round_rule().asynchronous
                    && PartialAggregate::folds_by_range(&entry.manifest)
                    && shoal_functions::factory::build_strategy(&entry.spec)
                        .is_ok_and(|s| s.mergeability() == Mergeability::Streaming);
                self.streamable.insert(job.clone(), (entry.incarnation, yes));
                yes
            }
        }
    }

    /// Fold-while-staging: reads the upload once to check it (a bad one is refused as any
    /// update is, nothing of it folded), claims it (folded bytes cannot be taken back, so a
    /// duplicate must never be folded), holds it and hands it to the function host, then reads
    /// the upload again into the slot while the host folds what is staged. The verdict goes to
    /// the host at the end; an update refused then is refused here (through the ledger) and its
    /// claim given up, so the client may send it again.
    async fn stage_streamed(
        &mut self,
        u: &Incoming,
        entry: &JobEntry,
        admitted: Admitted,
        slot: crate::staging::Slot,
        upload: &Upload,
    ) -> Result<Option<Delivery>, Refusal> {
        // First pass: read it once, keeping nothing, and refuse it as any update is refused if
        // it is bad (digest, schema, NaN/Inf): nothing of a bad update is ever folded.
        let who = (&u.job, &u.client, u.headers.round);
        let timeout = ms(self.ctx.config.timings.object_read_timeout_ms);
        fetch::verify_upload(&self.ctx.infra, who, upload, &entry.spec, &entry.manifest, timeout).await?;
        if let Some(hold) = self.test_holds.verified {
            tracing::warn!(
                hold_ms = hold.as_millis() as u64,
                "upload verified; holding before folding it ({VERIFIED_HOLD_ENV})"
            );
            tokio::time::sleep(hold).await;
        }
        let seen_round = admission::seen_round(admitted, u.headers.round);
        if !self.claim_update(u, seen_round).await? {
            return Ok(None);
        }
        let at = slot.location();
        let (writer, reader, view) = slot.into_streamed();
        self.hold(u, admitted, None);
        self.hand_on(self.delivery(u, admitted, at, view, Some(reader))).await;
        let mut read = fetch::stream_upload(
            &self.ctx.infra,
            who,
            upload,
            &entry.spec,
            (&entry.manifest, &writer),
            timeout,
        )
        .await;
        if read.is_ok() {
            // The host's word too: wait until it has folded every byte, or stopped.
            writer.until_folded_within(0).await;
            if let Err(refusal) = fetch::reader_verdict(&writer) {
                read = Err(refusal);
            }
        }
        if let Some(hold) = self.test_holds.verdict {
            tracing::warn!(
                hold_ms = hold.as_millis() as u64,
                "upload staged; holding its verdict ({STREAM_HOLD_ENV})"
            );
            tokio::time::sleep(hold).await;
        }
        let link = self.ctx.ledger.link();
        match read {
            Ok(below_seq) => {
                self.ctx.ledger.set_upload(u.stream_seq, UploadChunks { round: u.headers.round, below_seq });
                self.note_staged(u, entry, admitted, seen_round);
                self.ctx.metrics.updates_folded_while_staged.inc();
                writer.end(Ok(()));
            }
            Err(refusal) => match writer.reader_stopped() {
                // The host dropped it: it refused it (and settled it), or gave it back.
                Some(None) => {
                    writer.end(Err(StreamFailure { reason: refusal.reason, detail: refusal.detail }));
                    link.settle(u.stream_seq, Settle::Nak(ms(self.ctx.config.timings.nak_retry_ms)));
                }
                // Refused by the gateway's read or by the host (its reason is in `refusal`).
                _ => {
                    tracing::debug!(job = %u.job, client = %u.client, reason = %refusal.reason.as_str(), "streamed update refused");
                    writer.end(Err(StreamFailure { reason: refusal.reason, detail: refusal.detail.clone() }));
                    if let Some(kv) = self.claims_store().await {
                        if let Err(e) =
                            claims::release(&kv, (&u.job, seen_round, &u.client), u.stream_seq).await
                        {
                            tracing::debug!(error = %e, "releasing the claim of a refused update failed");
                        }
                    }
                    link.settle(u.stream_seq, Settle::Reject(refusal));
                }
            },
        }
        Ok(None)
    }

    /// Claims the batch's updates together (one round trip's wait for all) and delivers the
    /// ones this node holds, in the order they came; refuses the duplicates, leaves the others.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let started = std::time::Instant::now();
        let claims: Vec<Claim> = match self.claims_store().await {
            Some(kv) => {
                let claimant = claims::Claimant {
                    node: &self.ctx.node,
                    instance: self.ctx.instance,
                    liveness: &self.ctx.liveness,
                };
                let infra = &self.ctx.infra;
                let asks = batch.iter().map(|b| {
                    let seen_round = admission::seen_round(b.admitted, b.u.headers.round);
                    let who = (&b.u.job, seen_round, &b.u.client);
                    claims::claim(&kv, infra, who, claimant, b.u.stream_seq)
                });
                futures::future::join_all(asks).await.into_iter().map(claim_of).collect()
            }
            None => batch.iter().map(|_| Claim::Unknown).collect(),
        };
        self.ctx.metrics.ingest_claim_seconds.inc_by(started.elapsed().as_secs_f64());
        for (b, claim) in batch.into_iter().zip(claims) {
            let Unclaimed { u, entry, admitted, slot } = b;
            let seen_round = admission::seen_round(admitted, u.headers.round);
            if !matches!(claim, Claim::Ours) {
                self.seen_forget(&u, seen_round);
            }
            let staged = match self.claim_outcome(&u, claim).await {
                Ok(true) => {
                    let delivery = self.staged(&u, &entry, admitted, slot, None);
                    self.hand_on(delivery).await;
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(refusal) => Err(refusal),
            };
            if let Err(refusal) = staged {
                let who = Refused {
                    job: Some(u.job.as_str()),
                    client: Some(&u.client),
                    round: Some(u.headers.round),
                };
                self.ctx.rejector.reject(who, refusal, Some(&u.ack)).await;
            }
        }
        self.ctx.metrics.ingest_stage_seconds.inc_by(started.elapsed().as_secs_f64());
    }

    /// Claims (job, round, client) for the update; `Ok(true)`: this node stages it;
    /// `Ok(false)`: leave the message alone (held elsewhere, or handed back to try later).
    ///
    /// # Errors
    /// `duplicate`: the client's round is claimed by another of its messages.
    async fn claim_update(&mut self, u: &Incoming, seen_round: RoundId) -> Result<bool, Refusal> {
        let claiming = std::time::Instant::now();
        let claim = self.claim(&u.job, seen_round, &u.client, u.stream_seq).await;
        self.ctx.metrics.ingest_claim_seconds.inc_by(claiming.elapsed().as_secs_f64());
        self.claim_outcome(u, claim).await
    }

    /// What a claim means for the update (see [`Self::claim_update`]).
    async fn claim_outcome(&self, u: &Incoming, claim: Claim) -> Result<bool, Refusal> {
        match claim {
            Claim::Ours => Ok(true),
            Claim::HeldElsewhere(node) => {
                tracing::debug!(job = %u.job, client = %u.client, %node, "update held by another node; left alone");
                Ok(false)
            }
            Claim::Theirs => {
                let round = u.headers.round;
                Err(Refusal::new(
                    RejectReason::Duplicate,
                    format!("client {} already sent an update for round {round}", u.client),
                ))
            }
            Claim::Unknown => {
                u.ack.nak(ms(self.ctx.config.timings.nak_retry_ms)).await;
                Ok(false)
            }
        }
    }

    /// Counts a staged update and remembers its message for the round.
    fn note_staged(&mut self, u: &Incoming, entry: &JobEntry, admitted: Admitted, seen_round: RoundId) {
        self.ctx.metrics.bytes_staged.inc_by(entry.manifest.data_bytes() as u64);
        self.ctx.metrics.update_staleness.observe(admitted.staleness.0 as f64);
        self.seen_insert(u, seen_round);
    }

    /// Remembers the update's message as the client's for the round.
    fn seen_insert(&mut self, u: &Incoming, seen_round: RoundId) {
        match self.seen.get_mut(&u.job) {
            Some(rounds) => rounds.entry(seen_round).or_default(),
            None => self.seen.entry(u.job.clone()).or_default().entry(seen_round).or_default(),
        }
        .insert(u.client.clone(), u.stream_seq);
    }

    /// Forgets the update's message as the client's for the round, if it still is.
    fn seen_forget(&mut self, u: &Incoming, seen_round: RoundId) {
        if let Some(clients) = self.seen.get_mut(&u.job).and_then(|r| r.get_mut(&seen_round)) {
            if clients.get(&u.client) == Some(&u.stream_seq) {
                clients.remove(&u.client);
            }
        }
    }

    /// Records the staged update in the ledger.
    fn hold(&self, u: &Incoming, admitted: Admitted, upload: Option<UploadChunks>) {
        self.ctx.ledger.hold(HeldUpdate {
            job: u.job.clone(),
            round: admitted.round,
            client: u.client.clone(),
            stream_seq: u.stream_seq,
            ack: u.ack.clone(),
            slot: None,
            upload,
        });
    }

    /// The claims bucket, opened on first use; `None` (logged) while NATS does not answer.
    async fn claims_store(&mut self) -> Option<async_nats::jetstream::kv::Store> {
        if let Some(c) = &self.claims {
            return Some(c.clone());
        }
        match self.ctx.infra.claims(claims::MAX_AGE).await {
            Ok(c) => {
                self.claims = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(error = %e, "update claims unavailable; retrying the update");
                None
            }
        }
    }

    /// The job's slot pool, created on first use within the node's shared-memory budget; `None`
    /// (logged once per job) when not one slot fits the budget.
    fn pool(&mut self, job: &JobId, slot_bytes: usize) -> Option<Arc<SlotPool>> {
        if let Some(p) = self.pools.get(job) {
            return Some(Arc::clone(p));
        }
        let (dir, budget) = (self.ctx.shm_dir.clone(), self.ctx.config.shm_budget_bytes());
        // Segment files are named after the job's incarnation too: a deleted job's segments
        // may outlive it for a moment, and a job created again under its id must not collide.
        let incarnation = self.incarnations.get(job).copied().unwrap_or(0);
        match SlotPool::for_incarnation(dir, job, incarnation, slot_bytes, budget) {
            Ok(p) => {
                self.pools.insert(job.clone(), Arc::clone(&p));
                Some(p)
            }
            Err(e) => {
                if self.over_budget.insert(job.clone()) {
                    tracing::error!(%job, error = %e, "the job's updates cannot be staged on this node; handed to other nodes");
                }
                None
            }
        }
    }

    /// Claims (job, round, client) for the message at `stream_seq` in KV `shoal-claims`
    /// ([`claims`]): the first message claims it; a redelivery of that message finds its
    /// own claim when this process made it or the process that made it is gone, and is left to
    /// its live holder otherwise; any other message of the client for the round is a duplicate,
    /// whichever node pulled the first.
    async fn claim(&mut self, job: &JobId, round: RoundId, client: &ClientId, stream_seq: u64) -> Claim {
        let Some(kv) = self.claims_store().await else { return Claim::Unknown };
        let claimant = claims::Claimant {
            node: &self.ctx.node,
            instance: self.ctx.instance,
            liveness: &self.ctx.liveness,
        };
        claim_of(claims::claim(&kv, &self.ctx.infra, (job, round, client), claimant, stream_seq).await)
    }
}

/// The descriptor of an update staged at `at`.
fn descriptor(u: &Incoming, admitted: Admitted, at: crate::staging::SlotLocation) -> UpdateDescriptor {
    UpdateDescriptor {
        kind: DescriptorKind::Update,
        function: FunctionId(1),
        segment: at.segment,
        slot: at.index,
        generation: at.generation,
        offset: at.offset,
        length: at.length,
        job: u.job.clone(),
        round: admitted.round,
        client: u.client.clone(),
        num_examples: u.headers.num_examples,
        staleness: admitted.staleness,
        update_kind: u.headers.kind,
        stream_seq: u.stream_seq,
    }
}

/// The gateway's reading of a claim's answer.
fn claim_of(r: Result<claims::Claim>) -> Claim {
    match r {
        Ok(claims::Claim::Mine) => Claim::Ours,
        Ok(claims::Claim::HeldBy(node)) => Claim::HeldElsewhere(node),
        Ok(claims::Claim::Other(_)) => Claim::Theirs,
        Err(e) => {
            tracing::warn!(error = %e, "claiming an update failed; retrying the update");
            Claim::Unknown
        }
    }
}

/// Most messages taken into one batch of claims (those already delivered to the gateway).
const BATCH_MAX: usize = 64;
