//! The function host: an actix system of [`Aggregator`] actors started on demand.
//!
//! The gateway hands the [`FunctionHost`] one [`Staged`] descriptor per accepted update. The
//! host routes it to the leaf aggregator of (job, round): a running one, a warm idle one of the
//! same job (reused: no cold start), or a new one (cold start). Aggregators fold on a blocking
//! thread (`spawn_blocking`), never on an async worker, batching whatever queued meanwhile; they
//! keep the round's JetStream acks alive with in-progress acks until the coordinator closes the
//! round and takes the [`RoundHarvest`]. An aggregator idle past the idle timeout stops.
//!
//! Mailboxes are bounded, so a slow aggregator pushes back on the gateway instead of buffering.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_functions::{
    ClientId, JobId, JobSpec, ModelManifest, PartialAggregate, RoundId, Strategy, UpdateView,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::RejectReason;
use crate::ingest::reject::{AckHandle, Rejector};
use crate::metrics::Metrics;
use crate::staging::Slot;

/// Mailbox capacity of host and aggregators.
pub const MAILBOX: usize = 64;

/// An accepted, staged update on its way to an aggregator.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Staged {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Sender (from the subject).
    pub client: ClientId,
    /// FedAvg weight (`num_examples`).
    pub weight: f64,
    /// The shared-memory slot holding the tensors.
    pub slot: Slot,
    /// Acks the JetStream message once the round commits.
    pub acker: AckHandle,
    /// JetStream stream sequence (identifies redeliveries).
    pub stream_seq: u64,
    /// Object name when the payload came through the object store.
    pub object: Option<String>,
    /// The job's spec.
    pub spec: Arc<JobSpec>,
    /// The job's manifest (shared).
    pub manifest: Arc<ModelManifest>,
    /// Model versions between the update's base and the current model (0 in sync rounds).
    pub staleness: u64,
    /// Whether the job runs an asynchronous mode: an update that misses its round is handed
    /// back to JetStream for the next one instead of being rejected as late.
    pub asynchronous: bool,
    /// When the gateway handed it over (cold-start and warm-reuse timing).
    pub received: Instant,
    /// Set by the host when this update started or woke an aggregator.
    pub start: Option<StartKind>,
}

/// How an update found its aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// A new actor was started for it.
    Cold,
    /// An idle actor of the same job was reused.
    Warm,
}

/// An update folded into a round, waiting for the commit to be acked.
#[derive(Debug)]
pub struct Held {
    /// Sender.
    pub client: ClientId,
    /// Its message's acker.
    pub acker: AckHandle,
    /// Object to delete after the commit.
    pub object: Option<String>,
    /// The update's weight (`num_examples`).
    pub weight: f64,
    /// The staged bytes, kept for whole-cohort strategies (median, Krum, RFFL, ...), which read
    /// them in place at the close; `None` once a streaming strategy has folded them.
    pub slot: Option<Arc<Slot>>,
    /// Whether the job runs an asynchronous mode (see [`Staged::asynchronous`]).
    pub asynchronous: bool,
    /// Its message's stream sequence (named in the commit record when the round applies it).
    pub stream_seq: u64,
}

/// What a closed round hands to the coordinator.
#[derive(Debug, Default)]
pub struct RoundHarvest {
    /// The round's partial aggregate (`None` if nothing was folded).
    pub partial: Option<PartialAggregate>,
    /// The folded updates, to ack after the commit.
    pub held: Vec<Held>,
    /// When the round's last update reached the function host.
    pub last_fold: Option<Instant>,
}

/// Progress of an open round on this node, sent to the job's leaf agent after each fold.
#[derive(Debug, Clone, Copy)]
pub struct RoundProgress {
    /// Round.
    pub round: RoundId,
    /// Updates accepted for the round on this node so far (across snapshots).
    pub accepted: u32,
}

/// Function host configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Stop an aggregator idle this long.
    pub idle_timeout: Duration,
    /// Interval of in-progress acks for held messages (under the consumer's ack wait).
    pub progress_interval: Duration,
    /// Fold each update as it arrives (eager aggregation, the default). When false, a
    /// streaming aggregator keeps every update staged and folds them all when the round
    /// closes ("wait for the whole cohort"), the baseline of `shoal bench hierarchy`.
    pub eager: bool,
    /// Fault injection (`shoal node --fold-delay-ms`): sleep this long per update folded, on
    /// the blocking fold thread (zero: off, nothing is checked on the fold path but this).
    pub fold_delay: Duration,
}

/// Registers a job's coordinator to receive [`RoundProgress`].
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RegisterJob {
    /// Job.
    pub job: JobId,
    /// Progress channel.
    pub progress: mpsc::UnboundedSender<RoundProgress>,
}

/// Takes (job, round)'s harvest once every queued update is folded. With `seal`, the round is
/// closed on this node: later updates for it are late. Without, it is a snapshot: the round
/// stays open and later updates start a new harvest.
#[derive(Debug, Message)]
#[rtype(result = "RoundHarvest")]
pub struct CloseRound {
    /// Job.
    pub job: JobId,
    /// Round.
    pub round: RoundId,
    /// Close the round for good.
    pub seal: bool,
}

/// Hands every update held by this host back to JetStream (negative ack, redelivery after 1 s)
/// so that the next node gets them at once instead of after the ack wait. Sent on a clean
/// shutdown.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct ReleaseHeld;

#[derive(Debug, Message)]
#[rtype(result = "()")]
struct AggregatorStopped {
    job: JobId,
    id: u64,
}

/// Routes staged updates to aggregators (see the module docs).
#[derive(Debug)]
pub struct FunctionHost {
    config: HostConfig,
    metrics: Arc<Metrics>,
    rejector: Rejector,
    active: HashMap<(JobId, RoundId), (u64, Addr<Aggregator>)>,
    idle: HashMap<JobId, Vec<(u64, Addr<Aggregator>)>>,
    closed: HashMap<JobId, RoundId>,
    progress: HashMap<JobId, mpsc::UnboundedSender<RoundProgress>>,
    latest: HashMap<JobId, RoundProgress>,
    next_id: u64,
}

/// An update left an open round for a closed one on the host's way; `Staged::asynchronous`
/// says whether it is re-staged (handed back) or rejected.
async fn refuse_late(rejector: Rejector, msg: Staged) {
    if msg.asynchronous {
        // Asynchronous modes fold a late update into the next buffer with its staleness:
        // hand it back so the gateway stages it again against the current model version.
        msg.acker.nak(Duration::from_millis(50)).await;
        return;
    }
    let detail = format!("round {} closed while the update was being staged", msg.round);
    rejector
        .reject(
            Some(msg.job.as_str()),
            Some(&msg.client),
            Some(msg.round),
            RejectReason::LateUpdate,
            detail,
            Some(&msg.acker),
        )
        .await;
}

impl FunctionHost {
    /// A host; start it with `.start()` inside an actix system.
    pub fn new(config: HostConfig, metrics: Arc<Metrics>, rejector: Rejector) -> FunctionHost {
        FunctionHost {
            config,
            metrics,
            rejector,
            active: HashMap::new(),
            idle: HashMap::new(),
            closed: HashMap::new(),
            progress: HashMap::new(),
            latest: HashMap::new(),
            next_id: 0,
        }
    }
}

impl Actor for FunctionHost {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

impl Handler<RegisterJob> for FunctionHost {
    type Result = ();
    fn handle(&mut self, msg: RegisterJob, _: &mut Context<Self>) {
        // Updates may have been folded before the coordinator registered (e.g. redeliveries
        // right after a restart): hand it the latest progress at once.
        if let Some(p) = self.latest.get(&msg.job) {
            let _ = msg.progress.send(*p);
        }
        self.progress.insert(msg.job, msg.progress);
    }
}

/// `added` more updates accepted for (job, round) by one aggregator.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Progress {
    job: JobId,
    round: RoundId,
    added: u32,
}

impl Handler<Progress> for FunctionHost {
    type Result = ();
    fn handle(&mut self, msg: Progress, _: &mut Context<Self>) {
        let latest =
            self.latest.entry(msg.job.clone()).or_insert(RoundProgress { round: msg.round, accepted: 0 });
        if latest.round < msg.round {
            *latest = RoundProgress { round: msg.round, accepted: 0 };
        }
        if latest.round == msg.round {
            latest.accepted += msg.added;
            if let Some(tx) = self.progress.get(&msg.job) {
                let _ = tx.send(*latest);
            }
        }
    }
}

impl Handler<Staged> for FunctionHost {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, mut msg: Staged, ctx: &mut Context<Self>) -> Self::Result {
        if self.closed.get(&msg.job).is_some_and(|&c| msg.round <= c) {
            return Box::pin(refuse_late(self.rejector.clone(), msg));
        }
        let key = (msg.job.clone(), msg.round);
        let addr = match self.active.get(&key) {
            Some((_, a)) => a.clone(),
            None => {
                let started = Instant::now();
                let (id, addr) = match self.idle.get_mut(&msg.job).and_then(|v| v.pop()) {
                    Some((id, addr)) => {
                        addr.do_send(Reset { round: msg.round });
                        msg.start = Some(StartKind::Warm);
                        self.metrics.warm_reuses.inc();
                        tracing::debug!(job = %msg.job, round = %msg.round, "aggregator reused (warm)");
                        (id, addr)
                    }
                    None => {
                        let strategy = match shoal_functions::factory::build_strategy(&msg.spec) {
                            Ok(s) => s,
                            Err(e) => {
                                // Specs are validated when the job is created; one edited in KV
                                // afterwards is refused here, update by update, without a crash.
                                let rejector = self.rejector.clone();
                                return Box::pin(async move {
                                    rejector
                                        .reject(
                                            Some(msg.job.as_str()),
                                            Some(&msg.client),
                                            Some(msg.round),
                                            RejectReason::JobNotRunning,
                                            format!("the job's strategy is misconfigured: {e}"),
                                            Some(&msg.acker),
                                        )
                                        .await;
                                });
                            }
                        };
                        self.next_id += 1;
                        let id = self.next_id;
                        let agg = Aggregator {
                            id,
                            job: msg.job.clone(),
                            round: msg.round,
                            manifest: Arc::clone(&msg.manifest),
                            whole_cohort: strategy.mergeability()
                                == shoal_functions::Mergeability::WholeCohort,
                            strategy: Some(strategy),
                            partial: None,
                            pending: Vec::new(),
                            held: Vec::new(),
                            in_fold: false,
                            closing: Vec::new(),
                            last_fold: None,
                            config: self.config.clone(),
                            host: ctx.address(),
                            rejector: self.rejector.clone(),
                            metrics: Arc::clone(&self.metrics),
                            idle_since: None,
                        };
                        let addr = agg.start();
                        msg.start = Some(StartKind::Cold);
                        self.metrics.cold_starts.inc();
                        self.metrics.tier("leaf").inc();
                        tracing::debug!(
                            job = %msg.job, round = %msg.round,
                            cold_start_us = started.elapsed().as_micros() as u64,
                            "aggregator started (cold)"
                        );
                        (id, addr)
                    }
                };
                self.active.insert(key, (id, addr.clone()));
                addr
            }
        };
        Box::pin(async move {
            if let Err(e) = addr.send(msg).await {
                tracing::error!(error = %e, "aggregator mailbox closed; update will be redelivered");
            }
        })
    }
}

impl Handler<CloseRound> for FunctionHost {
    type Result = ResponseFuture<RoundHarvest>;

    fn handle(&mut self, msg: CloseRound, _: &mut Context<Self>) -> Self::Result {
        if msg.seal {
            let closed = self.closed.entry(msg.job.clone()).or_insert(msg.round);
            *closed = (*closed).max(msg.round);
        }
        match self.active.remove(&(msg.job.clone(), msg.round)) {
            None => Box::pin(async { RoundHarvest::default() }),
            Some((id, addr)) => {
                self.idle.entry(msg.job).or_default().push((id, addr.clone()));
                Box::pin(async move { addr.send(Harvest).await.unwrap_or_default() })
            }
        }
    }
}

impl Handler<ReleaseHeld> for FunctionHost {
    type Result = ResponseFuture<usize>;
    fn handle(&mut self, _: ReleaseHeld, _: &mut Context<Self>) -> Self::Result {
        let addrs: Vec<Addr<Aggregator>> = self.active.values().map(|(_, a)| a.clone()).collect();
        Box::pin(async move {
            let mut n = 0;
            for a in addrs {
                n += a.send(ReleaseHeld).await.unwrap_or(0);
            }
            n
        })
    }
}

impl Handler<ReleaseHeld> for Aggregator {
    type Result = ResponseFuture<usize>;
    fn handle(&mut self, _: ReleaseHeld, _: &mut Context<Self>) -> Self::Result {
        let ackers: Vec<AckHandle> =
            self.held.drain(..).map(|h| h.acker).chain(self.pending.drain(..).map(|s| s.acker)).collect();
        Box::pin(async move {
            // A short delay: an immediate redelivery could go to this node's own pull request,
            // still registered at the server until the connection closes.
            for a in &ackers {
                a.nak(std::time::Duration::from_secs(1)).await;
            }
            ackers.len()
        })
    }
}

impl Handler<AggregatorStopped> for FunctionHost {
    type Result = ();
    fn handle(&mut self, msg: AggregatorStopped, _: &mut Context<Self>) {
        if let Some(v) = self.idle.get_mut(&msg.job) {
            v.retain(|(id, _)| *id != msg.id);
        }
        self.metrics.tier("leaf").dec();
    }
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Reset {
    round: RoundId,
}

#[derive(Debug, Message)]
#[rtype(result = "RoundHarvest")]
struct Harvest;

/// The leaf aggregator of one (job, round); reused for later rounds of the same job.
pub struct Aggregator {
    id: u64,
    job: JobId,
    round: RoundId,
    manifest: Arc<ModelManifest>,
    strategy: Option<Box<dyn Strategy>>,
    whole_cohort: bool,
    partial: Option<PartialAggregate>,
    pending: Vec<Staged>,
    held: Vec<Held>,
    in_fold: bool,
    closing: Vec<oneshot::Sender<RoundHarvest>>,
    last_fold: Option<Instant>,
    config: HostConfig,
    host: Addr<FunctionHost>,
    rejector: Rejector,
    metrics: Arc<Metrics>,
    idle_since: Option<Instant>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("job", &self.job).field("round", &self.round).finish()
    }
}

impl Actor for Aggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        ctx.run_interval(self.config.progress_interval, |act, ctx| {
            // Keep the round's messages from being redelivered while it is open.
            let ackers: Vec<AckHandle> = act
                .held
                .iter()
                .map(|h| h.acker.clone())
                .chain(act.pending.iter().map(|s| s.acker.clone()))
                .collect();
            if !ackers.is_empty() {
                ctx.spawn(
                    async move {
                        for a in ackers {
                            a.progress().await;
                        }
                    }
                    .into_actor(act),
                );
            }
            if let Some(since) = act.idle_since {
                if since.elapsed() >= act.config.idle_timeout {
                    ctx.stop();
                }
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.host.do_send(AggregatorStopped { job: self.job.clone(), id: self.id });
    }
}

impl Aggregator {
    fn maybe_fold(&mut self, ctx: &mut Context<Self>) {
        if self.in_fold || self.pending.is_empty() {
            self.maybe_answer_close();
            return;
        }
        if !self.config.eager && self.closing.is_empty() {
            // Lazy baseline: keep the updates staged until the round closes.
            return;
        }
        let (Some(strategy), mut partial) = (self.strategy.take(), self.partial.take()) else {
            return;
        };
        self.in_fold = true;
        let batch = std::mem::take(&mut self.pending);
        let manifest = Arc::clone(&self.manifest);
        let fold_delay = self.config.fold_delay;
        let work = tokio::task::spawn_blocking(move || {
            if !fold_delay.is_zero() {
                std::thread::sleep(fold_delay.saturating_mul(batch.len() as u32));
            }
            let mut partial = partial.take().unwrap_or_else(|| PartialAggregate::new(Arc::clone(&manifest)));
            // Each update's coefficient comes from the strategy (num_examples for FedAvg, scaled
            // or replaced by FedBuff/FedFix); sync rounds have staleness 0.
            let mut failed: Vec<(usize, String)> = Vec::new();
            let mut views: Vec<UpdateView<'_>> = Vec::with_capacity(batch.len());
            let mut index: Vec<usize> = Vec::with_capacity(batch.len());
            for (i, s) in batch.iter().enumerate() {
                match strategy.update_weight(&s.client, s.weight as u64, s.staleness) {
                    Ok(w) if w > 0.0 => {
                        views.push(UpdateView {
                            manifest: &manifest,
                            bytes: s.slot.bytes(),
                            weight: w,
                            client: &s.client,
                        });
                        index.push(i);
                    }
                    Ok(w) => failed.push((i, format!("the strategy gives this update weight {w}"))),
                    Err(e) => failed.push((i, e.to_string())),
                }
            }
            if strategy.fold_batch(&mut partial, &views).is_err() {
                // Find the culprits one by one; nothing was folded by the failed batch call.
                for (v, &i) in views.iter().zip(&index) {
                    if let Err(e) = strategy.fold(&mut partial, v) {
                        failed.push((i, e.to_string()));
                    }
                }
            }
            drop(views);
            (strategy, partial, batch, failed)
        });
        ctx.spawn(work.into_actor(self).map(|res, act, ctx| {
            let (strategy, partial, batch, failed) = match res {
                Ok(r) => r,
                Err(e) => {
                    // A panic in a kernel is a bug, not bad input (input is validated before it is
                    // staged). Crash-only: JetStream redelivers every un-acked update to the
                    // restarted node, so nothing is lost or applied twice.
                    tracing::error!(error = %e, "fold task failed; aborting so the round is replayed");
                    std::process::abort();
                }
            };
            act.strategy = Some(strategy);
            act.partial = Some(partial);
            act.in_fold = false;
            let before = act.held.len();
            for (i, s) in batch.into_iter().enumerate() {
                if let Some((_, why)) = failed.iter().find(|(j, _)| *j == i) {
                    let rejector = act.rejector.clone();
                    let why = why.clone();
                    ctx.spawn(
                        async move {
                            rejector
                                .reject(
                                    Some(s.job.as_str()),
                                    Some(&s.client),
                                    Some(s.round),
                                    RejectReason::InvalidWeight,
                                    why,
                                    Some(&s.acker),
                                )
                                .await;
                        }
                        .into_actor(act),
                    );
                } else {
                    // Streaming strategies are done with the bytes: the slot goes back to the pool.
                    act.held.push(Held {
                        client: s.client,
                        acker: s.acker,
                        object: s.object,
                        weight: s.weight,
                        slot: None,
                        asynchronous: s.asynchronous,
                        stream_seq: s.stream_seq,
                    });
                }
            }
            tracing::trace!(job = %act.job, round = act.round.0, accepted = act.held.len(), "folded");
            if act.config.eager {
                act.host.do_send(Progress {
                    job: act.job.clone(),
                    round: act.round,
                    added: (act.held.len() - before) as u32,
                });
            }
            act.maybe_fold(ctx);
        }));
    }

    fn maybe_answer_close(&mut self) {
        if self.in_fold || !self.pending.is_empty() || self.closing.is_empty() {
            return;
        }
        let harvest = RoundHarvest {
            partial: self.partial.take(),
            held: std::mem::take(&mut self.held),
            last_fold: self.last_fold.take(),
        };
        self.idle_since = Some(Instant::now());
        let mut waiters = std::mem::take(&mut self.closing);
        if let Some(first) = waiters.pop() {
            let _ = first.send(harvest);
        }
        for w in waiters {
            let _ = w.send(RoundHarvest::default());
        }
    }
}

impl Handler<Staged> for Aggregator {
    type Result = ();
    fn handle(&mut self, msg: Staged, ctx: &mut Context<Self>) {
        self.metrics.updates_staged.inc();
        self.last_fold = Some(msg.received);
        if let Some(kind) = msg.start {
            let us = msg.received.elapsed().as_secs_f64();
            match kind {
                StartKind::Cold => self.metrics.cold_start_seconds.observe(us),
                StartKind::Warm => self.metrics.warm_reuse_seconds.observe(us),
            }
        }
        if self.whole_cohort {
            // Whole-cohort strategies need every update at once: keep the bytes in shared memory
            // (never copied) and hand them to the coordinator at the close.
            self.held.push(Held {
                client: msg.client,
                acker: msg.acker,
                object: msg.object,
                weight: msg.weight,
                stream_seq: msg.stream_seq,
                slot: Some(Arc::new(msg.slot)),
                asynchronous: msg.asynchronous,
            });
            self.host.do_send(Progress { job: self.job.clone(), round: self.round, added: 1 });
            return;
        }
        if !self.config.eager {
            // Counted when it arrives: the lazy baseline folds only at the close.
            self.host.do_send(Progress { job: self.job.clone(), round: self.round, added: 1 });
        }
        self.pending.push(msg);
        self.maybe_fold(ctx);
    }
}

impl Handler<Reset> for Aggregator {
    type Result = ();
    fn handle(&mut self, msg: Reset, _: &mut Context<Self>) {
        self.round = msg.round;
        self.idle_since = None;
        if let Some(p) = &mut self.partial {
            p.reset();
        }
    }
}

impl Handler<Harvest> for Aggregator {
    type Result = ResponseFuture<RoundHarvest>;
    fn handle(&mut self, _: Harvest, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.closing.push(tx);
        self.maybe_fold(ctx);
        Box::pin(async move { rx.await.unwrap_or_default() })
    }
}
