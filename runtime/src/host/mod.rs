//! The function host: an actix system of aggregator actors started on demand
//! ([`aggregator`]).
//!
//! The gateway hands the [`FunctionHost`] one [`Delivery`] per accepted update: the fixed-layout
//! update descriptor (`shoal_proto::descriptor::UpdateDescriptor`) and a read-only view of the
//! slot it names, through a [`DescriptorSink`] (in process here; over a local socket between a
//! gateway and a function-host process). The host routes it to the leaf aggregator of
//! (job, round): a running one, a warm idle one of the same job (reused: no cold start), or a new
//! one (cold start). It never acks a message or returns a slot itself: it tells the gateway's
//! ledger ([`crate::ingest::ledger`]) that a slot is released, or that an update is settled.
//!
//! Mailboxes are bounded, so a slow aggregator pushes back on the gateway instead of buffering.

pub mod aggregator;
pub mod channel;
pub mod pool;
pub mod process;
pub mod remote;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::BoxFuture;
use shoal_proto::descriptor::UpdateDescriptor;
use shoal_proto::{ClientId, JobId, RejectReason, RoundId};
use tokio::sync::mpsc;

pub use self::aggregator::Aggregator;
use self::aggregator::{Harvest, Reset};
use crate::error::{Error, Result};
use crate::ingest::ledger::{Link, Settle};
use crate::ingest::reject::Refusal;
use crate::jobs::JobDirectory;
use crate::metrics::Metrics;
use crate::staging::SlotView;

/// Mailbox capacity of host and aggregators.
pub const MAILBOX: usize = 64;

/// A staged update delivered to the function host: its descriptor and its bytes.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Delivery {
    /// Where the update lies and what it is.
    pub descriptor: UpdateDescriptor,
    /// Its slot, read-only.
    pub view: SlotView,
    /// When the gateway handed it over (cold-start and warm-reuse timing).
    pub received: Instant,
    /// Set by the host when this update started or woke an aggregator.
    pub start: Option<StartKind>,
    /// Counts the update in the node's backlog until the delivery is dropped (folded, refused
    /// or handed back): [`crate::ingest::demand`].
    pub unfolded: crate::ingest::demand::Unfolded,
    /// Fold-while-staging: the slot is still being written, and this reads what is final
    /// ([`crate::staging::stream`]); `view` must not be read before the stream ends well.
    pub stream: Option<crate::staging::stream::SlotReader>,
}

/// Where the gateway sends [`Delivery`]s: the function host in this process, or a function-host
/// process over a local socket.
pub trait DescriptorSink: Send + Sync + fmt::Debug {
    /// Delivers one staged update; it fails only when no function host can take it (the update
    /// stays in the gateway's ledger and is handed back at shutdown or redelivered).
    fn deliver(&self, d: Delivery) -> BoxFuture<'_, Result<()>>;

    /// Whether it takes deliveries whose slot is still being written
    /// ([`Delivery::stream`]: fold-while-staging needs the function host in this process).
    fn takes_streams(&self) -> bool {
        false
    }
}

/// The function host of this process.
#[derive(Debug, Clone)]
pub struct InProcess(pub Addr<FunctionHost>);

impl DescriptorSink for InProcess {
    fn deliver(&self, d: Delivery) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.0.send(d).await.map_err(|_| Error::Gone("function host")) })
    }

    fn takes_streams(&self) -> bool {
        true
    }
}

/// How a node's leaves reach the function host: the actor in this process, or the gateway's
/// pool of function-host processes ([`pool::HostPool`]).
#[derive(Debug, Clone)]
pub enum HostHandle {
    /// The function host of this process.
    Local(Addr<FunctionHost>),
    /// Function-host processes behind descriptor channels.
    Pool(pool::HostPool),
}

impl HostHandle {
    /// Registers a job's leaf for the host's round progress.
    ///
    /// # Errors
    /// [`Error::Gone`] when the local host has stopped.
    pub async fn register(&self, msg: RegisterJob) -> Result<()> {
        match self {
            HostHandle::Local(a) => a.send(msg).await.map_err(|_| Error::Gone("function host")),
            HostHandle::Pool(p) => {
                p.register(msg).await;
                Ok(())
            }
        }
    }

    /// Takes (job, round)'s harvest ([`CloseRound`]).
    ///
    /// # Errors
    /// [`Error::Gone`] when the local host has stopped. A pool answers an empty harvest when
    /// no host serves the job (what a dead host folded goes back to JetStream).
    pub async fn close(&self, msg: CloseRound) -> Result<RoundHarvest> {
        match self {
            HostHandle::Local(a) => a.send(msg).await.map_err(|_| Error::Gone("function host")),
            HostHandle::Pool(p) => Ok(p.close(msg).await),
        }
    }
}

/// How an update found its aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// A new actor was started for it.
    Cold,
    /// An idle actor of the same job was reused.
    Warm,
}

/// An update folded (or kept, for whole-cohort strategies) into a round, waiting for the commit.
#[derive(Debug)]
pub struct Held {
    /// Sender.
    pub client: ClientId,
    /// The update's `num_examples`.
    pub num_examples: u64,
    /// The staged bytes, kept for whole-cohort strategies (median, Krum, RFFL, ...), which read
    /// them in place at the close; `None` once a streaming strategy has folded them.
    pub slot: Option<SlotView>,
    /// Whether the job runs an asynchronous mode: an update that misses its round is handed
    /// back to JetStream for the next one instead of being refused as late.
    pub asynchronous: bool,
    /// Its message's stream sequence (the ledger's key; named in the commit record when the
    /// round applies it).
    pub stream_seq: u64,
    /// The coefficient it was folded into the partial with (the strategy's `update_weight`);
    /// 0 when its bytes are kept instead (whole-cohort strategies).
    pub fold_weight: f64,
    /// Model versions between its base and the round's base (asynchronous modes; 0 otherwise).
    pub staleness: u64,
}

/// What a closed round hands to the coordinator.
#[derive(Debug, Default)]
pub struct RoundHarvest {
    /// The round's partial aggregate (`None` if nothing was folded).
    pub partial: Option<shoal_functions::PartialAggregate>,
    /// The folded updates, to settle after the commit.
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
    /// Fold each update as it arrives (eager aggregation, the default). When false, a
    /// streaming aggregator keeps every update staged and folds them all when the round
    /// closes ("wait for the whole cohort"), the baseline of `shoal bench hierarchy`.
    pub eager: bool,
    /// Fault injection (`shoal node --fold-delay-ms`): sleep this long per update folded, on
    /// the blocking fold thread (zero: off, nothing is checked on the fold path but this).
    pub fold_delay: Duration,
    /// Nak delay of an asynchronous update that missed its buffer (staged again for the next).
    pub nak_restage: Duration,
}

/// Registers a job's leaf to receive [`RoundProgress`].
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RegisterJob {
    /// Job.
    pub job: JobId,
    /// Its incarnation (`crate::jobs::JobEntry::incarnation`): a new one clears what the host
    /// kept for an earlier job of the same id.
    pub incarnation: u64,
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

/// Routes staged updates to aggregators (see the module docs).
#[derive(Debug)]
pub struct FunctionHost {
    config: HostConfig,
    metrics: Arc<Metrics>,
    directory: JobDirectory,
    link: Link,
    active: HashMap<(JobId, RoundId), (u64, Addr<Aggregator>)>,
    idle: HashMap<JobId, Vec<(u64, Addr<Aggregator>)>>,
    closed: HashMap<JobId, RoundId>,
    progress: HashMap<JobId, mpsc::UnboundedSender<RoundProgress>>,
    latest: HashMap<JobId, RoundProgress>,
    /// The incarnation of each job the host has state for.
    incarnations: HashMap<JobId, u64>,
    next_id: u64,
}

impl FunctionHost {
    /// A host; start it with `.start()` inside an actix system. It reads job specs from
    /// `directory` and sends its feedback through `link`.
    pub fn new(
        config: HostConfig,
        metrics: Arc<Metrics>,
        directory: JobDirectory,
        link: Link,
    ) -> FunctionHost {
        FunctionHost {
            config,
            metrics,
            directory,
            link,
            active: HashMap::new(),
            idle: HashMap::new(),
            closed: HashMap::new(),
            progress: HashMap::new(),
            latest: HashMap::new(),
            incarnations: HashMap::new(),
            next_id: 0,
        }
    }

    /// Records `job`'s incarnation; a new one (the id was deleted and created again) drops what
    /// the host kept for the old job: its closed rounds, its aggregators (idle ones are not
    /// reused for the new job; they stop at their idle timeout) and its last progress.
    fn adopt(&mut self, job: &JobId, incarnation: u64) {
        match self.incarnations.insert(job.clone(), incarnation) {
            Some(old) if old != incarnation => {
                self.closed.remove(job);
                self.idle.remove(job);
                self.latest.remove(job);
                self.active.retain(|(j, _), _| j != job);
                tracing::debug!(%job, "a new job under a deleted job's id: the host's state for the old one is dropped");
            }
            _ => {}
        }
    }

    /// An update left an open round for a closed one on its way: handed back (asynchronous
    /// modes fold it into the next buffer with its staleness) or refused as late.
    fn refuse_late(&self, d: &UpdateDescriptor, asynchronous: bool) {
        let settle = if asynchronous {
            Settle::Nak(self.config.nak_restage)
        } else {
            let detail = format!("round {} closed while the update was being staged", d.round);
            Settle::Reject(Refusal::new(RejectReason::LateUpdate, detail))
        };
        self.link.settle(d.stream_seq, settle);
    }

    /// The aggregator of (job, round): running, reused warm, or started (cold). `None` when the
    /// job's strategy cannot be built (the update is refused).
    fn aggregator_for(
        &mut self,
        msg: &mut Delivery,
        entry: &crate::jobs::JobEntry,
        ctx: &Context<Self>,
    ) -> Option<Addr<Aggregator>> {
        let (job, round) = (msg.descriptor.job.clone(), msg.descriptor.round);
        if let Some((_, a)) = self.active.get(&(job.clone(), round)) {
            return Some(a.clone());
        }
        let started = Instant::now();
        let (id, addr) = match self.idle.get_mut(&job).and_then(|v| v.pop()) {
            Some((id, addr)) => {
                addr.do_send(Reset { round });
                msg.start = Some(StartKind::Warm);
                self.metrics.warm_reuses.inc();
                tracing::debug!(%job, %round, "aggregator reused (warm)");
                (id, addr)
            }
            None => {
                let strategy = match shoal_functions::factory::build_strategy(&entry.spec) {
                    Ok(s) => s,
                    Err(e) => {
                        // Specs are validated when the job is created; one edited in KV
                        // afterwards is refused here, update by update, without a crash.
                        let why = format!("the job's strategy is misconfigured: {e}");
                        self.link.settle(
                            msg.descriptor.stream_seq,
                            Settle::Reject(Refusal::new(RejectReason::JobNotRunning, why)),
                        );
                        return None;
                    }
                };
                self.next_id += 1;
                let agg = Aggregator::new(aggregator::Setup {
                    id: self.next_id,
                    job: job.clone(),
                    round,
                    manifest: Arc::clone(&entry.manifest),
                    strategy,
                    asynchronous: entry.spec.round_rule().asynchronous,
                    config: self.config.clone(),
                    host: ctx.address(),
                    link: self.link.clone(),
                    metrics: Arc::clone(&self.metrics),
                });
                msg.start = Some(StartKind::Cold);
                self.metrics.cold_starts.inc();
                self.metrics.tier("leaf").inc();
                tracing::debug!(%job, %round, cold_start_us = started.elapsed().as_micros() as u64, "aggregator started (cold)");
                (self.next_id, agg.start())
            }
        };
        self.active.insert((job, round), (id, addr.clone()));
        Some(addr)
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
        self.adopt(&msg.job, msg.incarnation);
        // Updates may have been folded before the leaf registered (e.g. redeliveries right
        // after a restart): hand it the latest progress at once.
        if let Some(p) = self.latest.get(&msg.job) {
            let _ = msg.progress.send(*p);
        }
        self.progress.insert(msg.job, msg.progress);
    }
}

/// `added` more updates accepted for (job, round) by one aggregator (negative: updates it gave
/// back, its partial spoiled by a streamed update that failed half-folded).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Progress {
    job: JobId,
    round: RoundId,
    added: i64,
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
            latest.accepted =
                u32::try_from((i64::from(latest.accepted) + msg.added).max(0)).unwrap_or(u32::MAX);
            if let Some(tx) = self.progress.get(&msg.job) {
                let _ = tx.send(*latest);
            }
        }
    }
}

impl Handler<Delivery> for FunctionHost {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, mut msg: Delivery, ctx: &mut Context<Self>) -> Self::Result {
        let d = &msg.descriptor;
        let Some(entry) = self.directory.get(&d.job) else {
            // The gateway validated the job against the same directory; a job gone since is
            // refused like any update for a job that does not run.
            let why = format!("job {} is not known to this function host", d.job);
            self.link.settle(d.stream_seq, Settle::Reject(Refusal::new(RejectReason::UnknownJob, why)));
            return Box::pin(async {});
        };
        self.adopt(&d.job, entry.incarnation);
        if self.closed.get(&d.job).is_some_and(|&c| d.round <= c) {
            self.refuse_late(d, entry.spec.round_rule().asynchronous);
            return Box::pin(async {});
        }
        let Some(addr) = self.aggregator_for(&mut msg, &entry, ctx) else { return Box::pin(async {}) };
        Box::pin(async move {
            if let Err(e) = addr.send(msg).await {
                tracing::error!(error = %e, "aggregator mailbox closed; the update is handed back at shutdown");
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

/// An aggregator stopped (idle past the timeout).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct AggregatorStopped {
    job: JobId,
    id: u64,
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
