//! The top of a job's hierarchy: opens rounds, closes them when the cohort is complete (summing
//! the leaves' progress) or at the deadline, collects the leaves' partials
//! ([`crate::cluster::leaf`]), applies the strategy's server step and commits. One node per job
//! runs it: the holder of the job's top lease (`crate::cluster::lease`).
//!
//! Commit order (DESIGN.md §2, step 6): model version `v+1` into `shoal-models` (idempotent),
//! job state by compare-and-set on its KV revision (with the [`CommitRecord`](shoal_proto::cluster::CommitRecord) naming the
//! collection), `RoundClosed`/`RoundOpened` events; each leaf then acks the updates of its
//! snapshot. A crash before the compare-and-set loses nothing (the updates are un-acked; the
//! next top collects them again); a crash after it applies nothing twice (leaves ack exactly
//! what the record names; redeliveries are for a closed round).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::factory::{self, StrategyPlugins};
use shoal_functions::{
    JobId, JobSpec, Mergeability, ModelManifest, NodeId, Parameters, PartialAggregate, RoundId, UpdateView,
};
use tokio_util::sync::CancellationToken;

pub mod round;

use self::round::RoundClock;
use crate::clock::now_ms;
use crate::cluster::leaf::{self, Partial};
use crate::cluster::lease;
use crate::error::{Error, Result};
use crate::jobs::{self, CasOutcome};
use crate::metrics::{JobLabel, JobOutcomeLabel};
use crate::nats::Infra;
use crate::node::NodeContext;
use shoal_proto::cluster::CohortEntry;
use shoal_proto::cluster::CollectRequest;
use shoal_proto::cluster::LeafProgress;
use shoal_proto::config::ms;
use shoal_proto::JobPhase;
use shoal_proto::JobState;
use shoal_proto::RoundEvent;
use shoal_proto::RoundOutcome;

/// Supplies [`StrategyPlugins`] for a job: an application embedding a node (the demo, a
/// deployment with a server-held validation split) implements it to give Bristle a per-class
/// evaluator. Called once per job when its top starts.
pub trait PluginFactory: Send + Sync + std::fmt::Debug {
    /// The pieces for `spec`'s strategy (`StrategyPlugins::default()` for none).
    fn plugins(&self, spec: &JobSpec) -> StrategyPlugins;
}

/// Competes for the top lease of `job` and runs the top while holding it, until the job ends or
/// the node shuts down.
///
/// # Errors
/// Persistent NATS errors.
pub async fn run_top(ctx: NodeContext, job: JobId) -> Result<()> {
    let instance = shoal_proto::InstanceId(rand::random::<u64>());
    let key = shoal_proto::subjects::top_lease_key(&job);
    let timings = &ctx.config.timings;
    let incarnation = ctx.directory.get(&job).map_or(0, |e| e.incarnation);
    loop {
        if ctx.cancel.is_cancelled() {
            return Ok(());
        }
        // Ended (finished, failed, cancelled) or deleted: nothing to lead.
        if !ctx.directory.runs(&job, incarnation) {
            return Ok(());
        }
        match lease::try_acquire(&ctx.infra, &ctx.liveness, &key, &ctx.node, instance, timings).await? {
            lease::Attempt::HeldBy(holder) => {
                ctx.directory.set_top(&job, Some(holder.node));
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(timings.lease_renew()) => continue,
                }
            }
            lease::Attempt::Acquired(held) => {
                ctx.directory.set_top(&job, Some(ctx.node.clone()));
                tracing::info!(%job, node = %ctx.node, "this node is the job's top");
                let stop = CancellationToken::new();
                let lost = ctx.cancel.child_token();
                let continuity = held.continuity.clone();
                let keeper = tokio::spawn(lease::keep(
                    ctx.infra.clone(),
                    held,
                    timings.clone(),
                    stop.clone(),
                    lost.clone(),
                ));
                let gauge = ctx.metrics.tier("top");
                gauge.inc();
                let result = run(&ctx, job.clone(), incarnation, lost.clone(), continuity).await;
                gauge.dec();
                ctx.local.unregister(&job);
                stop.cancel();
                let _ = keeper.await;
                ctx.directory.set_top(&job, None);
                result?;
                if lost.is_cancelled() && !ctx.cancel.is_cancelled() {
                    tracing::warn!(%job, "top lease lost; competing again");
                    continue;
                }
                return Ok(());
            }
        }
    }
}

/// The subscriptions a top listens on.
struct Inbox {
    rewards: async_nats::Subscriber,
    progress: async_nats::Subscriber,
    partials: async_nats::Subscriber,
    shard_results: async_nats::Subscriber,
    phase_answers: async_nats::Subscriber,
    local: tokio::sync::mpsc::UnboundedReceiver<Partial>,
}

/// One job's top: its spec, strategy, state and global model.
struct Top<'a> {
    ctx: &'a NodeContext,
    job: JobId,
    cancel: CancellationToken,
    /// Whether the top lease has been held without a gap (nothing is committed otherwise).
    lease: lease::Continuity,
    spec: Arc<JobSpec>,
    manifest: Arc<ModelManifest>,
    strategy: Box<dyn shoal_functions::Strategy>,
    state: JobState,
    revision: u64,
    /// The global model, when held: a streaming strategy's top lets it go between rounds (the
    /// close reloads it from the object store) so that a node holds the accumulator and the
    /// slots in use, not a model more (memory O(model), `shoal bench memory`).
    global: Option<Parameters>,
    /// The model a streaming strategy computes from the round's accumulator as it is stored
    /// (`Strategy::finish_streamed`), between the step and the commit.
    streamed: Option<shoal_functions::tensor::AccumulatorModel>,
    inbox: Inbox,
    exchange_failures: u32,
    /// RFFL and Bristle: this node's share of their two-phase exchanges (built on first use).
    share: Option<crate::cluster::twophase::NodeShare>,
    /// Set at start when the committed strategy state cannot be restored: the job fails.
    restore_failure: Option<StateFailure>,
    /// The job's incarnation in this node's directory (a job deleted and created again under
    /// the same id is another one).
    incarnation: u64,
    /// Wakes the top when a job's state changes in the directory (a cancel, a delete).
    changes: tokio::sync::watch::Receiver<u64>,
}

/// What the top does after waiting for a round.
enum Step {
    /// Cancelled (node shutdown or lease lost).
    Stop,
    /// Wait again (the round stays open, or the state changed under us).
    Again,
    /// The round closed.
    Closed,
}

/// Runs the top of `job` until it finishes, fails, is cancelled or deleted, or `cancel`.
///
/// # Errors
/// NATS errors that persist, an unreadable spec or model.
async fn run(
    ctx: &NodeContext,
    job: JobId,
    incarnation: u64,
    cancel: CancellationToken,
    lease: lease::Continuity,
) -> Result<()> {
    let mut top = Top::start(ctx, job, incarnation, cancel, lease).await?;
    if let Some(why) = top.restore_failure.take() {
        return top.refuse(why.to_string()).await;
    }
    if top.state.phase == JobPhase::Running {
        if let Err(why) = top.fits_node() {
            return top.refuse(format!("refused by node {}: {why}", ctx.node)).await;
        }
    }
    // A round already open when we start was opened by a top that may have died holding staged
    // updates: adopt those from the stream by their claims rather than wait for JetStream to
    // deliver them again after their ack wait.
    if top.state.is_open() {
        let n = ctx.adoptions.adopt(&top.job, top.state.round).await;
        tracing::info!(job = %top.job, round = top.state.round.0, adopted = n, "took over an open round");
    }
    while top.state.phase == JobPhase::Running {
        if !ctx.directory.runs(&top.job, incarnation) {
            tracing::info!(job = %top.job, "the job was cancelled or deleted; its top stops");
            return Ok(());
        }
        if !top.state.is_open() && !top.open_round().await? {
            continue;
        }
        match top.play_round().await? {
            Step::Stop => return Ok(()),
            Step::Again | Step::Closed => {}
        }
    }
    Ok(())
}

impl<'a> Top<'a> {
    async fn start(
        ctx: &'a NodeContext,
        job: JobId,
        incarnation: u64,
        cancel: CancellationToken,
        lease: lease::Continuity,
    ) -> Result<Top<'a>> {
        let spec = Arc::new(jobs::load_spec(&ctx.infra, &job).await?);
        let manifest = Arc::new(spec.manifest.clone());
        let local = ctx.local.register(&job);
        let mut strategy = fresh_strategy(ctx, &spec)?;
        let (state, revision) = jobs::load_state(&ctx.infra, &job).await?;
        let restore_failure = if state.phase == JobPhase::Running {
            restore_strategy(ctx, &job, state.model_version, &mut *strategy).await?.err()
        } else {
            None
        };
        // Whole-cohort strategies read it during the round (exchanges); streaming ones only at
        // the close.
        let global = match strategy.mergeability() {
            Mergeability::Streaming => None,
            Mergeability::WholeCohort => Some(load_global(&ctx.infra, &job, &state, &manifest).await?),
        };
        let s = &ctx.infra.subjects;
        let inbox = Inbox {
            rewards: ctx.infra.subscribe(s.all_rewards(&job), "subscribe to reward requests").await?,
            progress: ctx.infra.subscribe(s.progress(&job), "subscribe to leaf progress").await?,
            partials: ctx
                .infra
                .subscribe(s.partials_to(&job, &ctx.node, "top"), "subscribe to partials")
                .await?,
            shard_results: ctx
                .infra
                .subscribe(s.shard_results_to(&job, &ctx.node), "subscribe to shard results")
                .await?,
            phase_answers: ctx
                .infra
                .subscribe(s.phase_answers_to(&job, &ctx.node), "subscribe to two-phase answers")
                .await?,
            local,
        };
        Ok(Top {
            ctx,
            job,
            cancel,
            lease,
            spec,
            manifest,
            strategy,
            state,
            revision,
            global,
            streamed: None,
            inbox,
            exchange_failures: 0,
            share: None,
            restore_failure,
            incarnation,
            changes: ctx.directory.subscribe(),
        })
    }

    /// Whether the job fits this node (`Err`: why not). A round that does not fit would only
    /// fail at its deadline as `quorum_not_met`, so the job is refused at start instead:
    /// - the shared-memory budget must hold one update slot for a streaming strategy, a whole
    ///   round of them (`max_clients_per_round`, default `cohort_size`) for a whole-cohort
    ///   strategy or with lazy aggregation;
    /// - the gateway consumer's `max_ack_pending` must let a round's updates stay un-acked until
    ///   the round commits.
    fn fits_node(&self) -> std::result::Result<(), String> {
        let whole =
            self.strategy.mergeability() == Mergeability::WholeCohort || self.ctx.config.lazy_aggregation;
        let needed = if whole { self.spec.round_client_limit().unwrap_or(1) as usize } else { 1 };
        let layout =
            crate::staging::PoolLayout::new(self.manifest.slot_bytes(), self.ctx.config.shm_budget_bytes());
        layout.check(needed).map_err(|e| e.to_string())?;
        let per_round = self.spec.updates_per_round();
        if per_round > self.ctx.config.max_ack_pending {
            return Err(format!(
                "a round takes {per_round} updates, each un-acked until the round commits, but the gateway \
                 consumer allows {} un-acked updates (--max-ack-pending)",
                self.ctx.config.max_ack_pending
            ));
        }
        Ok(())
    }

    /// Ends a job that cannot run: its state becomes `Failed { reason }` by compare-and-set (unless
    /// another writer ended it first) and `JobEnded` is published.
    async fn refuse(&mut self, reason: String) -> Result<()> {
        tracing::error!(job = %self.job, %reason, "job refused");
        while self.state.phase == JobPhase::Running {
            let mut next = self.state.clone();
            next.phase = JobPhase::Failed { reason: reason.clone() };
            match jobs::cas_state(&self.ctx.infra, &self.job, &next, self.revision).await? {
                CasOutcome::Written(rev) => {
                    (self.state, self.revision) = (next, rev);
                    self.ctx.directory.observe_state(&self.job, None, self.state.clone(), self.revision);
                    let ended =
                        RoundEvent::JobEnded { job: self.job.clone(), phase: self.state.phase.clone() };
                    publish_event(&self.ctx.infra, &self.job, &ended).await;
                }
                CasOutcome::Conflict => {
                    (self.state, self.revision) = jobs::load_state(&self.ctx.infra, &self.job).await?;
                }
            }
        }
        Ok(())
    }

    /// Opens the round by a compare-and-set; `false` when another top changed the state first
    /// (it is reloaded).
    async fn open_round(&mut self) -> Result<bool> {
        let mut next = self.state.clone();
        next.opened_at_ms = now_ms();
        next.deadline_at_ms = next.opened_at_ms.saturating_add(self.spec.round_rule().deadline_ms);
        match jobs::cas_state(&self.ctx.infra, &self.job, &next, self.revision).await? {
            CasOutcome::Written(rev) => {
                (self.state, self.revision) = (next, rev);
                self.ctx.directory.observe_state(&self.job, None, self.state.clone(), self.revision);
                let event = RoundEvent::RoundOpened {
                    job: self.job.clone(),
                    round: self.state.round,
                    base_version: self.state.model_version,
                    deadline_at_ms: self.state.deadline_at_ms,
                };
                publish_event(&self.ctx.infra, &self.job, &event).await;
                tracing::info!(job = %self.job, round = self.state.round.0, base_version = %self.state.model_version, "round opened");
                Ok(true)
            }
            CasOutcome::Conflict => {
                (self.state, self.revision) = jobs::load_state(&self.ctx.infra, &self.job).await?;
                Ok(false)
            }
        }
    }

    /// Waits for the open round's cohort or deadline, collects, aggregates and commits.
    async fn play_round(&mut self) -> Result<Step> {
        let round = self.state.round;
        let remaining = Duration::from_millis(self.state.deadline_at_ms.saturating_sub(now_ms()));
        let fresh = ms(self.ctx.config.timings.progress_fresh_ms);
        let rule = self.spec.round_rule();
        let mut clock = RoundClock::new(tokio::time::Instant::now(), remaining, &rule, fresh);
        if !self.wait_for_cohort(&mut clock, round).await {
            return Ok(Step::Stop);
        }
        let Some(mut collected) =
            collect(self.ctx, &self.cancel, &self.job, &self.manifest, &mut self.inbox, round).await?
        else {
            return Ok(Step::Stop);
        };
        if clock.keeps_open(collected.count, tokio::time::Instant::now()) {
            tracing::info!(job = %self.job, round = round.0, collected = collected.count, "cohort incomplete at collection; waiting on");
            return Ok(Step::Again);
        }
        let Some(sharded) = self.exchange(&mut collected, round).await? else {
            return Ok(Step::Again);
        };
        self.close(collected, sharded, round).await
    }

    /// Serves reward requests and counts progress until the cohort is complete or the deadline
    /// passes; `false` when cancelled.
    async fn wait_for_cohort(&mut self, clock: &mut RoundClock, round: RoundId) -> bool {
        // A node that dies while the round is open holds updates JetStream would deliver again
        // only after their ack wait: adopt them as soon as it is seen gone.
        let mut members = self.ctx.liveness.live_nodes(&self.ctx.infra).await.unwrap_or_default();
        let mut tick = tokio::time::interval(self.ctx.config.timings.lease_renew());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Checked on every wake-up too: a change notified between two waits is not lost.
            if !self.ctx.directory.runs(&self.job, self.incarnation) {
                tracing::info!(job = %self.job, round = round.0, "the job was cancelled or deleted; its top stops");
                return false;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(clock.deadline()) => return true,
                _ = tick.tick() => {
                    let Ok(live) = self.ctx.liveness.live_nodes(&self.ctx.infra).await else { continue };
                    let gone: Vec<&NodeId> = members.iter().filter(|n| !live.contains(n)).collect();
                    if !gone.is_empty() {
                        let n = self.ctx.adoptions.adopt(&self.job, round).await;
                        tracing::info!(job = %self.job, round = round.0, ?gone, adopted = n, "nodes gone during the round");
                    }
                    members = live;
                }
                // A cancelled or deleted job stops at once, not at its deadline.
                _ = self.changes.changed() => {}
                Some(req) = self.inbox.rewards.next() => {
                    let reward = reward_bytes(&*self.strategy, &req);
                    answer_reward(&self.ctx.infra, req, reward).await;
                }
                Some(m) = self.inbox.progress.next() => {
                    let Ok(p) = shoal_proto::decode::<LeafProgress>("leaf progress", &m.payload) else { continue };
                    if p.round == round && clock.on_progress(p.node, p.accepted, tokio::time::Instant::now()) {
                        return true;
                    }
                }
            }
        }
    }

    /// Whole-cohort updates held on other nodes: a coordinate-sharded exchange when the strategy
    /// has one ([`crate::cluster::exchange`]); otherwise they are left out of this round.
    /// `Ok(None)`: the exchange came up short, collect again.
    async fn exchange(
        &mut self,
        collected: &mut Collected,
        round: RoundId,
    ) -> Result<Option<Option<std::result::Result<Parameters, String>>>> {
        let remote = collected.entries.iter().any(|e| e.node != self.ctx.node);
        if self.strategy.mergeability() != Mergeability::WholeCohort || !remote {
            self.exchange_failures = 0;
            return Ok(Some(None));
        }
        if (collected.entries.len() as u64) >= u64::from(self.spec.round_rule().min_clients)
            && self.strategy.sharding() == shoal_functions::Sharding::TwoPhase
        {
            return self.two_phase(collected, round).await;
        }
        if self.strategy.sharding() == shoal_functions::Sharding::Unsupported {
            let holders: Vec<NodeId> = collected
                .entries
                .iter()
                .filter(|e| e.node != self.ctx.node)
                .map(|e| e.node.clone())
                .collect();
            tracing::warn!(job = %self.job, round = round.0, ?holders, "whole-cohort updates staged away from the top are late");
            collected.nodes.retain(|n| !holders.contains(n));
            collected.count = collected.cohort.len() as u64;
            self.exchange_failures = 0;
            return Ok(Some(None));
        }
        if (collected.entries.len() as u64) < u64::from(self.spec.round_rule().min_clients) {
            self.exchange_failures = 0;
            return Ok(Some(None));
        }
        let mut owners = collected.nodes.clone();
        owners.sort();
        self.hold_global().await?;
        let top = crate::cluster::exchange::TopRound {
            job: &self.job,
            top: &self.ctx.node,
            round,
            base_version: self.state.model_version,
            timeout: self.ctx.config.collect_timeout(),
        };
        let global = self.global.as_ref().ok_or(Error::Gone("the top's global model"))?;
        let result = crate::cluster::exchange::run_top(
            &self.ctx.infra,
            &top,
            &mut *self.strategy,
            global,
            collected.entries.clone(),
            owners,
            &mut self.inbox.shard_results,
            &self.ctx.metrics,
        )
        .await;
        match result {
            Err(e @ Error::Timeout(..)) if self.exchange_failures < 2 => {
                self.exchange_failures += 1;
                tracing::warn!(job = %self.job, round = round.0, error = %e, "shard exchange incomplete; collecting again");
                Ok(None)
            }
            other => {
                self.exchange_failures = 0;
                Ok(Some(Some(other.map_err(|e| e.to_string()))))
            }
        }
    }

    /// RFFL and Bristle with updates on several nodes: the two-phase exchange
    /// ([`crate::cluster::twophase`]). `Ok(None)`: a node was silent, gone or inconsistent;
    /// collect again (twice, then the round fails).
    async fn two_phase(
        &mut self,
        collected: &Collected,
        round: RoundId,
    ) -> Result<Option<Option<std::result::Result<Parameters, String>>>> {
        self.hold_global().await?;
        let share = match self.share.take() {
            Some(s) => s,
            None => crate::cluster::twophase::NodeShare::new(&self.spec, self.ctx.plugins.as_ref())?,
        };
        let mut share = share;
        let r = crate::cluster::twophase::TopRound {
            job: &self.job,
            top: &self.ctx.node,
            round,
            collect: collected.collect,
            base_version: self.state.model_version,
            timeout: self.ctx.config.collect_timeout(),
            liveness_tick: self.ctx.config.timings.lease_renew(),
        };
        let cohort = crate::cluster::twophase::Cohort {
            entries: &collected.entries,
            members: &collected.members,
            local: &collected.cohort,
        };
        let Some(global) = self.global.as_ref() else {
            self.share = Some(share);
            return Err(Error::Gone("the top's global model"));
        };
        let result = crate::cluster::twophase::run_top(
            self.ctx,
            &r,
            &mut *self.strategy,
            &mut share,
            global,
            &cohort,
            &mut self.inbox.phase_answers,
        )
        .await;
        self.share = Some(share);
        match result {
            Err(e @ (Error::Timeout(..) | Error::TwoPhase { .. })) if self.exchange_failures < 2 => {
                self.exchange_failures += 1;
                self.ctx.metrics.fencing("two_phase_refused").inc();
                tracing::warn!(job = %self.job, round = round.0, error = %e, "two-phase exchange incomplete; collecting again");
                Ok(None)
            }
            other => {
                self.exchange_failures = 0;
                Ok(Some(Some(other.map_err(|e| e.to_string()))))
            }
        }
    }

    /// Applies the server step and commits the round (model, then state, then events).
    async fn close(
        &mut self,
        collected: Collected,
        sharded: Option<std::result::Result<Parameters, String>>,
        round: RoundId,
    ) -> Result<Step> {
        // Only a top that can prove it held its lease (and its node its membership) without a
        // gap goes on: after a pause another top may be committing this round already.
        if !self.continuous() {
            return Ok(Step::Again);
        }
        let accepted = collected.count as u32;
        let version = round::next_version(&self.state);
        let (collected, outcome, model) = self.server_step(collected, sharded, accepted, version).await?;
        let closing = round::Closing {
            round,
            outcome: &outcome,
            collect: collected.collect,
            nodes: &collected.nodes,
            seqs: &collected.seqs,
        };
        let next = round::next_state(&self.state, &self.spec, &closing);
        if !self.continuous() {
            self.cancel.cancel();
            return Ok(Step::Stop);
        }
        if model {
            // The strategy state this commit leaves, keyed by the version it goes with, written
            // before the job state names that version (a top taking over at `version` finds it).
            let saved = match self.strategy.save_state() {
                Ok(bytes) if bytes.len() <= shoal_functions::state::MAX_STATE_BYTES => Ok(bytes),
                Ok(bytes) => Err(format!(
                    "{} bytes, over the {}-byte limit",
                    bytes.len(),
                    shoal_functions::state::MAX_STATE_BYTES
                )),
                Err(e) => Err(e.to_string()),
            };
            match saved {
                Ok(bytes) => jobs::put_strategy_state(&self.ctx.infra, &self.job, version, &bytes).await?,
                Err(detail) => {
                    // A commit whose state a later top could not restore would fail the job then;
                    // fail it now, at the version that still has its state.
                    let why = StateFailure::Unsaved { version: version.0, detail };
                    self.refuse(why.to_string()).await?;
                    return Ok(Step::Stop);
                }
            }
            if let Some(model) = self.streamed.take() {
                jobs::put_model_streamed(&self.ctx.infra, &self.job, version, model).await?;
            } else if let Some(global) = &self.global {
                jobs::put_model(&self.ctx.infra, &self.job, version, global).await?;
            }
        }
        if !self.continuous() {
            // The model may be written over another top's (same version) only while this one
            // still holds its lease; it cannot tell now: give the lease up and compete again.
            self.cancel.cancel();
            return Ok(Step::Stop);
        }
        if self.cancel.is_cancelled() {
            return Ok(Step::Stop); // the lease was lost meanwhile: leave the commit to the new top
        }
        match jobs::cas_state(&self.ctx.infra, &self.job, &next, self.revision).await? {
            CasOutcome::Written(rev) => self.revision = rev,
            CasOutcome::Conflict => {
                // Another committer won; the leaves settle by its record.
                tracing::warn!(job = %self.job, round = round.0, "job state changed under us; reloading");
                (self.state, self.revision) = jobs::load_state(&self.ctx.infra, &self.job).await?;
                self.global = None; // the winner's model, reloaded when next needed
                                    // This top's strategy already stepped past the committed version: take the
                                    // state the winner committed with it instead.
                self.strategy = fresh_strategy(self.ctx, &self.spec)?;
                if self.state.phase == JobPhase::Running {
                    let restored =
                        restore_strategy(self.ctx, &self.job, self.state.model_version, &mut *self.strategy)
                            .await?;
                    if let Err(why) = restored {
                        self.refuse(why.to_string()).await?;
                    }
                }
                return Ok(Step::Again);
            }
        }
        self.state = next;
        self.ctx.directory.observe_state(&self.job, None, self.state.clone(), self.revision);
        self.announce(round, &outcome, &collected).await;
        drop(collected); // releases the whole-cohort slots to their leaves
        if self.strategy.mergeability() == Mergeability::Streaming {
            self.global = None; // reloaded at the next close
        }
        self.purge_uploads(round).await;
        if model {
            prune_models(
                &self.ctx.infra,
                &self.job,
                self.state.model_version,
                self.spec.round_rule().max_staleness,
            )
            .await;
        }
        Ok(Step::Closed)
    }

    /// The server step of a close on a blocking thread: the outcome, and whether
    /// `self.global` is now the new model to commit.
    async fn server_step(
        &mut self,
        collected: Collected,
        sharded: Option<std::result::Result<Parameters, String>>,
        accepted: u32,
        version: shoal_functions::ModelVersion,
    ) -> Result<(Collected, RoundOutcome, bool)> {
        let min_clients = self.spec.round_rule().min_clients;
        // The server step is CPU-bound (a whole-cohort strategy reads every staged update): run
        // it on a blocking thread, handing strategy, model and partials over and back. A panic
        // there is a bug, not bad input: crash-only, as for folds (ARCHITECTURE.md, "Panics").
        // The strategy moves to the blocking thread and back; a stateless FedAvg stands in
        // meanwhile (nothing runs on it: this task awaits the step).
        // Asked of the job's strategy (the stand-in below is FedAvg, which may not read the
        // model: asking it made server optimizers step from zeros).
        let reads_global = self.strategy.finish_reads_global(&self.manifest);
        // The global model moves to the blocking thread and back too (a streaming strategy
        // writes the new model into it in place: no model-sized copy).
        let mut global = match self.global.take() {
            Some(g) => g,
            // Zeros (untouched pages: no memory until written) when the step writes every
            // element without reading the old model.
            None if !reads_global => Parameters::zeros(Arc::clone(&self.manifest)),
            None => load_global(&self.ctx.infra, &self.job, &self.state, &self.manifest).await?,
        };
        let stand_in =
            shoal_functions::FedAvg { update_kind: self.spec.update_kind, server_learning_rate: 1.0 };
        let strategy = std::mem::replace(&mut self.strategy, Box::new(stand_in));
        let step = tokio::task::spawn_blocking(move || {
            let mut strategy = strategy;
            let (outcome, fate) = close_outcome(
                &mut *strategy,
                &collected,
                sharded,
                &mut global,
                accepted,
                min_clients,
                version,
            );
            (strategy, collected, outcome, fate, global)
        })
        .await;
        let (strategy, collected, outcome, fate, global) = step.unwrap_or_else(|e| {
            tracing::error!(job = %self.job, error = %e, "server step panicked; aborting so the round is replayed");
            std::process::abort()
        });
        self.strategy = strategy;
        // From here `self.global` is the new model when one was made (a top that stops before
        // committing it is dropped; one that loses the commit reloads the winner's).
        // The step failed part-way through writing in place: the committed model is reloaded
        // when next needed.
        let new = matches!(fate, ModelFate::New | ModelFate::Streamed(_));
        match fate {
            ModelFate::Streamed(model) => {
                // Not held: the next step that reads it loads the committed one.
                self.streamed = Some(model);
                self.global = None;
            }
            ModelFate::Clobbered => self.global = None,
            ModelFate::New | ModelFate::Unchanged => self.global = Some(global),
        }
        Ok((collected, outcome, new))
    }

    /// Loads the global model of the committed version when it was let go.
    async fn hold_global(&mut self) -> Result<()> {
        if self.global.is_none() {
            self.global = Some(load_global(&self.ctx.infra, &self.job, &self.state, &self.manifest).await?);
        }
        Ok(())
    }

    /// Removes upload chunks no update message will claim any more: when the job has ended, all
    /// of them; when a synchronous round closed, every upload of that round (a late message for
    /// it is refused before its chunks are read). Settled updates purge their own uploads at
    /// the gateway; this catches crashed clients' and retried uploads.
    async fn purge_uploads(&mut self, round: RoundId) {
        let infra = &self.ctx.infra;
        let filter = if self.state.phase != JobPhase::Running {
            infra.subjects.all_uploads(&self.job)
        } else if !self.spec.round_rule().asynchronous {
            infra.subjects.round_uploads(&self.job, round)
        } else {
            return;
        };
        match infra.js.get_stream_no_info(infra.subjects.uploads_stream(&self.job)).await {
            Ok(stream) => shoal_client::uploads::purge_matching(&stream, filter).await,
            Err(e) => tracing::debug!(error = %e, "the job's upload stream is gone; nothing to purge"),
        }
    }

    /// Whether this top may write: its lease and its node's membership held without a gap.
    fn continuous(&self) -> bool {
        let ok = self.lease.holds() && self.ctx.membership.holds();
        if !ok {
            self.ctx.metrics.fencing("commit_withheld").inc();
            tracing::warn!(job = %self.job, "top lease continuity not proven: not committing now");
        }
        ok
    }

    /// Metrics, the round's events and the log line of a committed state.
    async fn announce(&mut self, round: RoundId, outcome: &RoundOutcome, collected: &Collected) {
        let label = match outcome {
            RoundOutcome::Committed { .. } => "committed",
            RoundOutcome::QuorumNotMet { .. } => "quorum_not_met",
            RoundOutcome::AggregationFailed { .. } => "aggregation_failed",
        };
        let job = self.job.to_string();
        self.ctx.metrics.rounds.get_or_create(&JobOutcomeLabel { job: job.clone(), outcome: label }).inc();
        if let (true, RoundOutcome::Committed { .. }) = (collected.last_fold_ms > 0, outcome) {
            let ms = now_ms().saturating_sub(collected.last_fold_ms);
            self.ctx.metrics.round_latency.get_or_create(&JobLabel { job }).observe(ms as f64 / 1000.0);
        }
        let closed = RoundEvent::RoundClosed { job: self.job.clone(), round, outcome: outcome.clone() };
        publish_event(&self.ctx.infra, &self.job, &closed).await;
        tracing::info!(job = %self.job, round = round.0, %outcome, nodes = collected.nodes.len(), "round closed");
        if self.state.phase != JobPhase::Running {
            let ended = RoundEvent::JobEnded { job: self.job.clone(), phase: self.state.phase.clone() };
            publish_event(&self.ctx.infra, &self.job, &ended).await;
            tracing::info!(job = %self.job, phase = %self.state.phase, "job ended");
        }
    }
}

/// What the leaves sent for one round.
#[derive(Debug)]
struct Collected {
    collect: shoal_proto::CollectId,
    nodes: Vec<NodeId>,
    /// Each contributing node and the process that answered for it.
    members: Vec<(NodeId, shoal_proto::InstanceId)>,
    /// Shared with the leaf that sent it when only one partial came (no copy); merging into it
    /// copies it once.
    partial: Option<Arc<PartialAggregate>>,
    cohort: Vec<leaf::CohortMember>,
    /// Whole-cohort strategies: every update of the round and the node holding it.
    entries: Vec<CohortEntry>,
    count: u64,
    seqs: Vec<u64>,
    last_fold_ms: u64,
}

/// Asks every live node for its partial of `round` and merges the answers; asks again (a new
/// collection) when a live node does not answer within the timeout, and gives up on nodes that
/// are no longer live (after adopting their updates: [`crate::ingest::adopt`]). A collection
/// that names a stream sequence twice, or a contributor that is no longer the process that
/// answered, is refused and collected again ([`verify`]). `Ok(None)`: cancelled.
async fn collect(
    ctx: &NodeContext,
    cancel: &CancellationToken,
    job: &JobId,
    manifest: &Arc<ModelManifest>,
    inbox: &mut Inbox,
    round: RoundId,
) -> Result<Option<Collected>> {
    let fan_in = ctx.directory.get(job).map_or(0, |e| e.spec.fan_in);
    let (mut attempt, mut conflicts, mut refused) = (0, Vec::new(), 0u32);
    loop {
        attempt += 1;
        let mut nodes = ctx.liveness.live_nodes(&ctx.infra).await?;
        if !nodes.contains(&ctx.node) {
            nodes.push(ctx.node.clone());
            nodes.sort();
        }
        let req = CollectRequest {
            round,
            collect: shoal_proto::CollectId(rand::random::<u64>()),
            top: ctx.node.clone(),
            nodes: nodes.clone(),
            fan_in,
            conflicts: std::mem::take(&mut conflicts),
        };
        ctx.infra
            .client
            .publish(ctx.infra.subjects.collect(job), Bytes::from(shoal_proto::encode(&req)))
            .await
            .map_err(|e| Error::nats("publish collect request", e))?;
        let Some(got) = gather(ctx, cancel, job, manifest, inbox, &req).await? else { return Ok(None) };
        match verify(ctx, &got).await {
            Verdict::Valid => {}
            verdict => {
                refused += 1;
                let (event, detail) = match &verdict {
                    Verdict::Duplicates(d) => {
                        ("duplicate_seq", format!("stream sequences {d:?} came from two nodes"))
                    }
                    Verdict::Stale(n) => {
                        ("stale_contributor", format!("{n:?} are no longer the processes that answered"))
                    }
                    Verdict::Valid => ("", String::new()),
                };
                ctx.metrics.fencing(event).inc();
                if refused == 1 {
                    tracing::warn!(%job, %round, "collection refused, collecting again: {detail}");
                }
                if let Verdict::Duplicates(d) = verdict {
                    conflicts = d;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(ms(ctx.config.timings.nak_retry_ms)) => {}
                }
                continue;
            }
        }
        let missing: Vec<&NodeId> = nodes.iter().filter(|n| !got.nodes.contains(n)).collect();
        if missing.is_empty() {
            return Ok(Some(got));
        }
        let live = ctx.liveness.live_nodes(&ctx.infra).await?;
        let missing_live = missing.iter().any(|n| live.contains(n));
        if !missing_live && ctx.adoptions.adopt(job, round).await > 0 {
            // The updates a dead node held are now staged here: collect them.
            tracing::info!(%job, %round, ?missing, "adopted the updates of nodes that are gone; collecting again");
            continue;
        }
        if !missing_live || attempt >= 3 {
            tracing::warn!(
                %job, %round, ?missing, attempt,
                "closing the round without the partials of these nodes (their updates are late)"
            );
            return Ok(Some(got));
        }
        tracing::info!(%job, %round, ?missing, "partials missing; collecting again");
    }
}

/// Whether a collection may be committed.
#[derive(Debug)]
enum Verdict {
    Valid,
    /// These stream sequences were sent up by more than one node.
    Duplicates(Vec<u64>),
    /// These contributors are no longer the processes that sent their partials (restarted,
    /// gone, or this node without proven continuity).
    Stale(Vec<NodeId>),
}

/// Checks a collection before it is committed: no update twice, every contributor still the
/// live process that answered.
async fn verify(ctx: &NodeContext, got: &Collected) -> Verdict {
    let mut seqs = got.seqs.clone();
    seqs.sort_unstable();
    let mut dups: Vec<u64> = seqs.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    dups.dedup();
    if !dups.is_empty() {
        return Verdict::Duplicates(dups);
    }
    let mut stale = Vec::new();
    for (node, instance) in &got.members {
        let alive = if *node == ctx.node {
            *instance == ctx.instance && ctx.membership.holds()
        } else {
            ctx.liveness.member_alive(&ctx.infra, node, *instance).await.unwrap_or(false)
        };
        if !alive {
            stale.push(node.clone());
        }
    }
    if stale.is_empty() {
        Verdict::Valid
    } else {
        Verdict::Stale(stale)
    }
}

/// Merges the partials that answer collection `req` until every node asked has answered or
/// the collection timeout passes. `Ok(None)`: cancelled.
async fn gather(
    ctx: &NodeContext,
    cancel: &CancellationToken,
    job: &JobId,
    manifest: &Arc<ModelManifest>,
    inbox: &mut Inbox,
    req: &CollectRequest,
) -> Result<Option<Collected>> {
    let mut got = Collected {
        collect: req.collect,
        nodes: Vec::new(),
        members: Vec::new(),
        partial: None,
        cohort: Vec::new(),
        entries: Vec::new(),
        count: 0,
        seqs: Vec::new(),
        last_fold_ms: 0,
    };
    let deadline = tokio::time::Instant::now() + ctx.config.collect_timeout();
    // Nodes that die during the collection are not waited for until the timeout: the caller
    // adopts their updates and collects again.
    let mut tick = tokio::time::interval(ctx.config.timings.lease_renew());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    while !req.nodes.iter().all(|n| got.nodes.contains(n)) {
        let p = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => {
                let Ok(live) = ctx.liveness.live_nodes(&ctx.infra).await else { continue };
                if req.nodes.iter().filter(|n| !got.nodes.contains(n)).all(|n| !live.contains(n)) {
                    break;
                }
                continue;
            }
            Some(p) = inbox.local.recv() => p,
            Some(m) = inbox.partials.next() => match leaf::receive_remote(&ctx.infra, manifest, &m).await {
                Ok((h, p, bytes)) => {
                    ctx.metrics.partial_bytes_received.inc_by(bytes);
                    if h.instances.len() != h.nodes.len() {
                        tracing::warn!(%job, sender = %h.sender, "partial without its nodes' instances ignored");
                        continue;
                    }
                    Partial {
                        sender: h.sender,
                        collect: h.collect,
                        nodes: h.nodes,
                        instances: h.instances,
                        partial: p.map(Arc::new),
                        cohort: Vec::new(),
                        count: h.count,
                        seqs: h.seqs,
                        last_fold_ms: h.last_fold_ms,
                        entries: h.cohort,
                    }
                }
                Err(e) => {
                    tracing::warn!(%job, error = %e, "malformed partial ignored");
                    continue;
                }
            },
        };
        if p.collect != req.collect
            || !req.nodes.contains(&p.sender)
            || p.nodes.iter().any(|n| got.nodes.contains(n) || !req.nodes.contains(n))
        {
            continue; // an earlier collection's answer, a duplicate, or not from a node asked
        }
        got.add(p)?;
    }
    Ok(Some(got))
}

impl Collected {
    /// Merges one node's (or middle's) partial.
    fn add(&mut self, p: Partial) -> Result<()> {
        if let Some(pa) = p.partial {
            // Streaming strategies all merge by the partial's own rule (sums add, maxima max,
            // the lowest client's `first` values win).
            match &mut self.partial {
                None => self.partial = Some(pa),
                Some(acc) => Arc::make_mut(acc).merge(&pa)?,
            }
        }
        self.cohort.extend(p.cohort);
        self.entries.extend(p.entries);
        self.members.extend(p.nodes.iter().cloned().zip(p.instances));
        self.nodes.extend(p.nodes);
        self.count += p.count;
        self.seqs.extend(p.seqs);
        self.last_fold_ms = self.last_fold_ms.max(p.last_fold_ms);
        Ok(())
    }
}

/// What a server step did to the global model handed to it.
#[derive(Debug)]
enum ModelFate {
    /// It is the new model to commit.
    New,
    /// Untouched: the new model is computed from the accumulator as it is stored.
    Streamed(shoal_functions::tensor::AccumulatorModel),
    /// Untouched (no model this round).
    Unchanged,
    /// Partly overwritten by a step that failed: reload the committed one.
    Clobbered,
}

fn close_outcome(
    strategy: &mut dyn shoal_functions::Strategy,
    collected: &Collected,
    sharded: Option<std::result::Result<Parameters, String>>,
    global: &mut Parameters,
    accepted: u32,
    min_clients: u32,
    version: shoal_functions::ModelVersion,
) -> (RoundOutcome, ModelFate) {
    let failed = |e: shoal_functions::Error| RoundOutcome::AggregationFailed {
        detail: e.to_string(),
        kind: Some(e.kind()),
    };
    if accepted < min_clients {
        return (RoundOutcome::QuorumNotMet { accepted, min_clients }, ModelFate::Unchanged);
    }
    if let Some(r) = sharded {
        let total: f64 = collected.entries.iter().map(|e| e.weight).sum();
        return match r {
            Ok(p) => {
                *global = p;
                (RoundOutcome::Committed { version, clients: accepted, total_weight: total }, ModelFate::New)
            }
            Err(detail) => (RoundOutcome::AggregationFailed { detail, kind: None }, ModelFate::Unchanged),
        };
    }
    match strategy.mergeability() {
        Mergeability::Streaming => {
            let Some(partial) = &collected.partial else {
                return (RoundOutcome::QuorumNotMet { accepted, min_clients }, ModelFate::Unchanged);
            };
            let total_weight = partial.total_weight();
            // Computed from the accumulator as it is stored when the strategy can (no model-sized
            // buffer beside the accumulator); else written into the global model in place.
            match strategy.finish_streamed(partial).map(|m| m.and_then(|m| m.check_finite().map(|()| m))) {
                Some(Ok(model)) => {
                    return (
                        RoundOutcome::Committed { version, clients: accepted, total_weight },
                        ModelFate::Streamed(model),
                    );
                }
                Some(Err(e)) => return (failed(e), ModelFate::Unchanged),
                None => {}
            }
            match strategy.finish_into(partial, global) {
                Ok(()) => {
                    (RoundOutcome::Committed { version, clients: accepted, total_weight }, ModelFate::New)
                }
                Err(e) => (failed(e), ModelFate::Clobbered),
            }
        }
        Mergeability::WholeCohort => {
            // The cohort is read in place from shared memory: no update is copied.
            let manifest = Arc::clone(global.manifest());
            let views: Vec<UpdateView<'_>> = collected
                .cohort
                .iter()
                .map(|m| UpdateView {
                    manifest: &manifest,
                    bytes: m.slot.bytes(),
                    weight: m.weight,
                    client: &m.client,
                })
                .collect();
            let total_weight: f64 = views.iter().map(|v| v.weight).sum();
            match strategy.aggregate_cohort(&views, global) {
                Ok(p) => {
                    *global = p;
                    (RoundOutcome::Committed { version, clients: accepted, total_weight }, ModelFate::New)
                }
                Err(e) => (failed(e), ModelFate::Unchanged),
            }
        }
    }
}

/// Model versions kept in `shoal-models`: enough for clients that trained on any version the
/// job still accepts (`max_staleness` behind) and for a reader a round behind.
pub fn kept_versions(max_staleness: u64) -> u64 {
    max_staleness.saturating_add(2).max(3)
}

/// Deletes the version that just fell out of [`kept_versions`] (best effort: a failure leaves
/// an old model behind, nothing else).
async fn prune_models(
    infra: &Infra,
    job: &JobId,
    current: shoal_functions::ModelVersion,
    max_staleness: u64,
) {
    let Some(old) = current.0.checked_sub(kept_versions(max_staleness)) else { return };
    let old = shoal_functions::ModelVersion(old);
    for name in [
        shoal_proto::subjects::model_object(job, old),
        shoal_proto::subjects::strategy_state_object(job, old),
    ] {
        if let Err(e) = infra.models.delete(&name).await {
            tracing::debug!(object = %name, error = %e, "pruning an old model version failed");
        }
    }
}

/// The job's strategy as its spec (and the node's plugins) build it, with default state.
fn fresh_strategy(ctx: &NodeContext, spec: &JobSpec) -> Result<Box<dyn shoal_functions::Strategy>> {
    let plugins = ctx.plugins.as_ref().map(|f| f.plugins(spec)).unwrap_or_default();
    Ok(factory::build_strategy_with(spec, plugins)?)
}

/// Why a top cannot carry the job's strategy state on: the job fails with this as its reason
/// (`JobPhase::Failed { reason }` starts with [`StateFailure::as_str`]) rather than continue
/// from default state, a model sequence no uninterrupted run would produce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFailure {
    /// The state stored with the committed version is refused by the strategy: corrupt bytes, a
    /// format version this build does not read, another strategy's or configuration's state.
    #[error("strategy_state_unreadable: the strategy state stored with model version {version} cannot be restored: {source}")]
    Unreadable {
        /// The committed model version the state belongs to.
        version: u64,
        /// What the strategy found wrong.
        #[source]
        source: shoal_functions::state::StateError,
    },
    /// No state is stored with the committed version (every commit stores one before the job
    /// state names its version, so it was deleted or never written).
    #[error("strategy_state_missing: no strategy state is stored with model version {version}")]
    Missing {
        /// The committed model version.
        version: u64,
    },
    /// The state this commit leaves cannot be stored (too large, or the strategy cannot encode
    /// it): the commit is refused, as a later top could not continue from it.
    #[error(
        "strategy_state_unsaved: the strategy state for model version {version} cannot be stored: {detail}"
    )]
    Unsaved {
        /// The model version the commit would produce.
        version: u64,
        /// Why.
        detail: String,
    },
}

impl StateFailure {
    /// The bounded label of this failure (the prefix of the job's failure reason).
    pub fn as_str(&self) -> &'static str {
        match self {
            StateFailure::Unreadable { .. } => "strategy_state_unreadable",
            StateFailure::Missing { .. } => "strategy_state_missing",
            StateFailure::Unsaved { .. } => "strategy_state_unsaved",
        }
    }
}

/// Restores the strategy state committed with `version` (reputations, optimizer moments), so a
/// top that takes over continues the uninterrupted run's sequence. `Ok(Err(_))`: the state is
/// missing or refused, and the job must fail with that reason (it is never reset to defaults
/// silently); each outcome is counted in `shoal_strategy_state_restores_total{event}`
/// (`restored`, `refused`, `missing`, `unreadable`).
///
/// # Errors
/// NATS errors reading the object (transient: the caller gives up this attempt, not the job).
async fn restore_strategy(
    ctx: &NodeContext,
    job: &JobId,
    version: shoal_functions::ModelVersion,
    strategy: &mut dyn shoal_functions::Strategy,
) -> Result<std::result::Result<(), StateFailure>> {
    if version.0 == 0 {
        return Ok(Ok(())); // nothing committed yet: the defaults are the state
    }
    let (event, outcome) = match jobs::get_strategy_state(&ctx.infra, job, version).await {
        Ok(Some(bytes)) => match strategy.restore_state(&bytes) {
            Ok(()) => {
                tracing::info!(%job, %version, bytes = bytes.len(), "strategy state restored");
                ("restored", Ok(()))
            }
            Err(e) => {
                let source = match e {
                    shoal_functions::Error::InvalidState(s) => s,
                    other => shoal_functions::state::StateError::Mismatch(other.to_string()),
                };
                ("refused", Err(StateFailure::Unreadable { version: version.0, source }))
            }
        },
        Ok(None) => ("missing", Err(StateFailure::Missing { version: version.0 })),
        Err(e) => {
            ctx.metrics.strategy_state_restores("unreadable").inc();
            tracing::warn!(%job, %version, error = %e, "reading the strategy state failed");
            return Err(e.into());
        }
    };
    if let Err(why) = &outcome {
        tracing::error!(%job, %version, error = %why, "strategy state cannot be restored: the job fails");
    }
    ctx.metrics.strategy_state_restores(event).inc();
    Ok(outcome)
}

async fn load_global(
    infra: &Infra,
    job: &JobId,
    state: &JobState,
    manifest: &Arc<ModelManifest>,
) -> Result<Parameters> {
    Ok(jobs::load_model(infra, job, state.model_version, manifest).await?)
}

/// The reward requested on `<p>.<job>.reward.<client>`, as safetensors, or why not.
fn reward_bytes(
    strategy: &dyn shoal_functions::Strategy,
    req: &async_nats::Message,
) -> Result<Vec<u8>, String> {
    let client = req
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .and_then(|c| shoal_functions::ClientId::new(c).ok())
        .ok_or_else(|| "malformed reward subject".to_string())?;
    match strategy.client_reward(&client) {
        None => Err(format!(
            "strategy {} serves no per-client rewards (or no round has committed yet)",
            strategy.name()
        )),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(p)) => p.to_safetensors().map_err(|e| e.to_string()),
    }
}

/// Replies with the reward, or an empty body and a `Shoal-Error` header saying why not.
async fn answer_reward(infra: &Infra, req: async_nats::Message, reward: Result<Vec<u8>, String>) {
    let Some(reply) = req.reply else { return };
    let sent = match reward {
        Ok(bytes) if bytes.len() <= infra.max_payload() => {
            infra.client.publish(reply, Bytes::from(bytes)).await
        }
        other => {
            let why = match other {
                Ok(bytes) => format!("the reward is {} bytes, over the server's max_payload", bytes.len()),
                Err(e) => e,
            };
            let mut h = async_nats::HeaderMap::new();
            h.insert(shoal_proto::headers::HDR_ERROR, why.as_str());
            infra.client.publish_with_headers(reply, h, Bytes::new()).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "answering a reward request failed");
    }
}

async fn publish_event(infra: &Infra, job: &JobId, event: &RoundEvent) {
    let subject = infra.subjects.round_events(job);
    if let Err(e) = infra.client.publish(subject, Bytes::from(shoal_proto::encode(event))).await {
        tracing::warn!(error = %e, "publishing a round event failed (clients also watch the job state)");
    }
}
