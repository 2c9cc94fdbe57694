//! The leaf aggregator of one (job, round), reused warm for the job's later rounds.
//!
//! It folds on a blocking thread (`spawn_blocking`), never on an async worker, batching
//! whatever queued meanwhile, and tells the gateway's ledger when it is done with each update's
//! bytes (streaming strategies: right after the fold). Whole-cohort strategies keep the slots
//! (read-only views) until the round closes. An aggregator idle past the idle timeout stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use shoal_functions::{ModelManifest, PartialAggregate, Strategy, UpdateView};
use shoal_proto::{JobId, RejectReason, RoundId};
use tokio::sync::oneshot;

use super::{
    AggregatorStopped, Delivery, FunctionHost, Held, HostConfig, Progress, RoundHarvest, StartKind, MAILBOX,
};
use crate::ingest::ledger::{Link, Settle};
use crate::ingest::reject::Refusal;
use crate::metrics::Metrics;

/// Starts the aggregator on a new round (warm reuse).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(super) struct Reset {
    pub(super) round: RoundId,
}

/// Hands over the round's harvest once every queued update is folded.
#[derive(Debug, Message)]
#[rtype(result = "RoundHarvest")]
pub(super) struct Harvest;

/// What an aggregator starts with.
pub(super) struct Setup {
    pub(super) id: u64,
    pub(super) job: JobId,
    pub(super) round: RoundId,
    pub(super) manifest: Arc<ModelManifest>,
    pub(super) strategy: Box<dyn Strategy>,
    pub(super) asynchronous: bool,
    pub(super) config: HostConfig,
    pub(super) host: Addr<FunctionHost>,
    pub(super) link: Link,
    pub(super) metrics: Arc<Metrics>,
}

/// The leaf aggregator of one (job, round); reused for later rounds of the same job.
pub struct Aggregator {
    id: u64,
    job: JobId,
    round: RoundId,
    manifest: Arc<ModelManifest>,
    strategy: Option<Box<dyn Strategy>>,
    whole_cohort: bool,
    asynchronous: bool,
    partial: Option<PartialAggregate>,
    pending: Vec<Delivery>,
    held: Vec<Held>,
    in_fold: bool,
    closing: Vec<oneshot::Sender<RoundHarvest>>,
    last_fold: Option<Instant>,
    config: HostConfig,
    host: Addr<FunctionHost>,
    link: Link,
    metrics: Arc<Metrics>,
    idle_since: Option<Instant>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("job", &self.job).field("round", &self.round).finish()
    }
}

impl Aggregator {
    pub(super) fn new(s: Setup) -> Aggregator {
        Aggregator {
            id: s.id,
            job: s.job,
            round: s.round,
            manifest: s.manifest,
            whole_cohort: s.strategy.mergeability() == shoal_functions::Mergeability::WholeCohort,
            strategy: Some(s.strategy),
            asynchronous: s.asynchronous,
            partial: None,
            pending: Vec::new(),
            held: Vec::new(),
            in_fold: false,
            closing: Vec::new(),
            last_fold: None,
            config: s.config,
            host: s.host,
            link: s.link,
            metrics: s.metrics,
            idle_since: None,
        }
    }
}

impl Actor for Aggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        let check = self.config.idle_timeout.min(Duration::from_secs(1)).max(Duration::from_millis(10));
        ctx.run_interval(check, |act, ctx| {
            if act.idle_since.is_some_and(|since| since.elapsed() >= act.config.idle_timeout) {
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.host.do_send(AggregatorStopped { job: self.job.clone(), id: self.id });
    }
}

/// What a fold on the blocking thread hands back: the strategy, the partial, the batch, the
/// updates it refused (position in the batch, why) and each update's fold weight (by position).
type Folded = (Box<dyn Strategy>, PartialAggregate, Vec<Delivery>, Vec<(usize, String)>, Vec<f64>);

/// Folds `batch` into `partial` (a new one when `None`) on a blocking thread: each update's
/// coefficient comes from the strategy (`num_examples` for FedAvg, scaled or replaced by
/// FedBuff/FedFix; synchronous rounds have staleness 0); an update the strategy weighs 0 or
/// refuses, or one that fails to fold, is reported back with the reason.
fn fold_on_blocking_thread(
    strategy: Box<dyn Strategy>,
    partial: Option<PartialAggregate>,
    batch: Vec<Delivery>,
    manifest: &Arc<ModelManifest>,
    fold_delay: Duration,
) -> Folded {
    if !fold_delay.is_zero() {
        std::thread::sleep(fold_delay.saturating_mul(batch.len() as u32));
    }
    let mut partial = partial.unwrap_or_else(|| PartialAggregate::new(Arc::clone(manifest)));
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut views: Vec<UpdateView<'_>> = Vec::with_capacity(batch.len());
    let mut index: Vec<usize> = Vec::with_capacity(batch.len());
    let mut weights = vec![0.0; batch.len()];
    for (i, d) in batch.iter().enumerate() {
        let (client, n, staleness) =
            (&d.descriptor.client, d.descriptor.num_examples, d.descriptor.staleness.0);
        match strategy.update_weight(client, n, staleness) {
            Ok(w) if w > 0.0 => {
                views.push(UpdateView { manifest, bytes: d.view.bytes(), weight: w, client });
                index.push(i);
                weights[i] = w;
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
    (strategy, partial, batch, failed, weights)
}

/// How a streamed update's fold ended ([`fold_streamed`]).
#[derive(Debug)]
enum Streamed {
    /// Every byte folded and the gateway's verdict good: the update counts, with this weight.
    Folded(f64),
    /// The update failed before any of it was folded: the partial is as it was.
    Clean,
    /// The update failed after some of it was folded: the partial is spoiled.
    Spoiled,
}

/// Folds a streamed update ([`Delivery::stream`]) piece by piece as the gateway stages it,
/// giving each folded piece's pages back to the kernel (fold-while-staging,
/// [`crate::staging::stream`]). Blocking: runs on the fold thread.
fn fold_streamed(
    strategy: &dyn Strategy,
    partial: &mut PartialAggregate,
    d: &Delivery,
    manifest: &Arc<ModelManifest>,
) -> Streamed {
    use crate::staging::stream::StreamFailure;
    let Some(reader) = &d.stream else { return Streamed::Clean };
    let (client, n, staleness) = (&d.descriptor.client, d.descriptor.num_examples, d.descriptor.staleness.0);
    let refuse = |reason: RejectReason, detail: String| reader.fail(StreamFailure { reason, detail });
    let weight = match strategy.update_weight(client, n, staleness) {
        Ok(w) if w > 0.0 && w.is_finite() => w,
        Ok(w) => {
            refuse(RejectReason::InvalidWeight, format!("the strategy gives this update weight {w}"));
            return Streamed::Clean;
        }
        Err(e) => {
            refuse(RejectReason::InvalidWeight, e.to_string());
            return Streamed::Clean;
        }
    };
    if !PartialAggregate::folds_by_range(manifest) {
        // The gateway streams only what folds by pieces: refuse rather than guess.
        refuse(RejectReason::Malformed, "this job's tensors cannot be folded while staged".into());
        return Streamed::Clean;
    }
    let len = manifest.slot_bytes();
    let mut folded = 0;
    loop {
        let (ready, end) = reader.wait(folded);
        if let Some(Err(_)) = end {
            // Refused: fold nothing more (the partial may still be clean).
            return spoiled_or_clean(folded);
        }
        let upto = ready / 4 * 4;
        if upto > folded {
            let Some(prefix) = reader.prefix(upto) else { return spoiled_or_clean(folded) };
            if let Err(e) = partial.fold_prefix(prefix, folded, weight) {
                let reason = match &e {
                    shoal_functions::Error::Validation(v) => RejectReason::from(v),
                    _ => RejectReason::Malformed,
                };
                refuse(reason, e.to_string());
                return spoiled_or_clean(folded);
            }
            // The page straddling the last boundary is whole now: give it back too.
            reader.release(folded.saturating_sub(4096), upto);
            folded = upto;
            reader.folded(folded);
        }
        if end.is_some() {
            // A good verdict (a bad one returned above).
            if folded < len {
                // Everything final is folded: a good verdict on a slot not all final is a
                // gateway bug, not input.
                refuse(RejectReason::Malformed, format!("staged {ready} of {len} bytes"));
                return spoiled_or_clean(folded);
            }
            return match partial.count_folded(weight, client) {
                Ok(()) => Streamed::Folded(weight),
                Err(_) => Streamed::Spoiled,
            };
        }
    }
}

fn spoiled_or_clean(folded: usize) -> Streamed {
    if folded > 0 {
        Streamed::Spoiled
    } else {
        Streamed::Clean
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
        let (Some(strategy), partial) = (self.strategy.take(), self.partial.take()) else {
            return;
        };
        self.in_fold = true;
        if self.pending[0].stream.is_some() {
            self.fold_stream(strategy, partial, ctx);
            return;
        }
        // Up to the next streamed update (folded on its own, as it is staged).
        let cut = self.pending.iter().position(|d| d.stream.is_some()).unwrap_or(self.pending.len());
        let batch: Vec<Delivery> = self.pending.drain(..cut).collect();
        let manifest = Arc::clone(&self.manifest);
        let fold_delay = self.config.fold_delay;
        let metrics = Arc::clone(&self.metrics);
        let work = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let folded = fold_on_blocking_thread(strategy, partial, batch, &manifest, fold_delay);
            metrics.fold_seconds.inc_by(started.elapsed().as_secs_f64());
            folded
        });
        ctx.spawn(work.into_actor(self).map(|res, act, ctx| {
            let Ok((strategy, partial, batch, failed, weights)) = res else {
                // A panic in a kernel is a bug, not bad input (input is validated before it is
                // staged). Crash-only: JetStream redelivers every un-acked update to the
                // restarted node, so nothing is lost or applied twice.
                tracing::error!("fold task failed; aborting so the round is replayed");
                std::process::abort();
            };
            act.strategy = Some(strategy);
            act.partial = Some(partial);
            act.in_fold = false;
            act.after_fold(batch, &failed, &weights);
            act.maybe_fold(ctx);
        }));
    }

    /// Folds the streamed update at the head of the queue on a blocking thread while the
    /// gateway stages it ([`fold_streamed`]).
    fn fold_stream(
        &mut self,
        strategy: Box<dyn Strategy>,
        partial: Option<PartialAggregate>,
        ctx: &mut Context<Self>,
    ) {
        let d = self.pending.remove(0);
        let manifest = Arc::clone(&self.manifest);
        let fold_delay = self.config.fold_delay;
        let metrics = Arc::clone(&self.metrics);
        let work = tokio::task::spawn_blocking(move || {
            if !fold_delay.is_zero() {
                std::thread::sleep(fold_delay);
            }
            // Pacing starts now, not once a new accumulator is allocated.
            if let Some(reader) = &d.stream {
                reader.folded(0);
            }
            let mut partial = partial.unwrap_or_else(|| PartialAggregate::new(Arc::clone(&manifest)));
            let started = Instant::now();
            let outcome = fold_streamed(strategy.as_ref(), &mut partial, &d, &manifest);
            metrics.fold_seconds.inc_by(started.elapsed().as_secs_f64());
            (strategy, partial, d, outcome)
        });
        ctx.spawn(work.into_actor(self).map(|res, act, ctx| {
            let Ok((strategy, partial, d, outcome)) = res else {
                tracing::error!("fold task failed; aborting so the round is replayed");
                std::process::abort();
            };
            act.strategy = Some(strategy);
            act.partial = Some(partial);
            act.in_fold = false;
            if let (Streamed::Clean | Streamed::Spoiled, Some(why)) =
                (&outcome, d.stream.as_ref().and_then(|r| r.failure()))
            {
                // Refused here: the gateway refuses it too when it is still reading (the first
                // refusal settles it); this covers a verdict it had already given.
                act.link
                    .settle(d.descriptor.stream_seq, Settle::Reject(Refusal::new(why.reason, why.detail)));
            }
            match outcome {
                Streamed::Folded(weight) => act.after_fold(vec![d], &[], &[weight]),
                // The gateway refuses it (it holds the verdict); nothing of it was folded.
                Streamed::Clean => drop(d),
                Streamed::Spoiled => {
                    drop(d);
                    act.spoil();
                }
            }
            act.maybe_fold(ctx);
        }));
    }

    /// A streamed update failed after part of it was folded: the partial cannot be trusted, so
    /// it starts again and every update folded into it goes back to JetStream, to be staged
    /// and folded again (nothing is lost, nothing counts twice). The failed update itself is
    /// refused by the gateway.
    fn spoil(&mut self) {
        if let Some(p) = &mut self.partial {
            p.reset();
        }
        let back = std::mem::take(&mut self.held);
        tracing::warn!(
            job = %self.job,
            round = self.round.0,
            handed_back = back.len(),
            "an update failed after part of it was folded; this node folds the round's updates again"
        );
        self.metrics.partials_spoiled.inc();
        for h in &back {
            self.link.settle(h.stream_seq, Settle::Nak(Duration::ZERO));
        }
        if !back.is_empty() {
            let added = -(back.len() as i64);
            self.host.do_send(Progress { job: self.job.clone(), round: self.round, added });
        }
    }

    /// Releases the folded updates' slots (a streaming strategy is done with the bytes), refuses
    /// the ones that failed, and reports progress.
    fn after_fold(&mut self, batch: Vec<Delivery>, failed: &[(usize, String)], weights: &[f64]) {
        let before = self.held.len();
        for (i, d) in batch.into_iter().enumerate() {
            let seq = d.descriptor.stream_seq;
            if let Some((_, why)) = failed.iter().find(|(j, _)| *j == i) {
                self.link.settle(seq, Settle::Reject(Refusal::new(RejectReason::InvalidWeight, why.clone())));
                continue;
            }
            drop(d.view);
            self.link.release(seq);
            self.held.push(Held {
                client: d.descriptor.client,
                num_examples: d.descriptor.num_examples,
                slot: None,
                asynchronous: self.asynchronous,
                stream_seq: seq,
                fold_weight: weights.get(i).copied().unwrap_or(0.0),
                staleness: d.descriptor.staleness.0,
            });
        }
        tracing::trace!(job = %self.job, round = self.round.0, accepted = self.held.len(), "folded");
        if self.config.eager {
            let added = (self.held.len() - before) as i64;
            self.host.do_send(Progress { job: self.job.clone(), round: self.round, added });
        }
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

impl Handler<Delivery> for Aggregator {
    type Result = ();
    fn handle(&mut self, msg: Delivery, ctx: &mut Context<Self>) {
        self.metrics.updates_staged.inc();
        self.last_fold = Some(msg.received);
        if let Some(kind) = msg.start {
            let seconds = msg.received.elapsed().as_secs_f64();
            match kind {
                StartKind::Cold => self.metrics.cold_start_seconds.observe(seconds),
                StartKind::Warm => self.metrics.warm_reuse_seconds.observe(seconds),
            }
        }
        if let (true, Some(reader)) = (self.whole_cohort, &msg.stream) {
            // The gateway streams only to streaming strategies: refuse rather than keep a slot
            // still being written.
            reader.fail(crate::staging::stream::StreamFailure {
                reason: RejectReason::Malformed,
                detail: "a whole-cohort strategy cannot fold an update while it is staged".into(),
            });
            return;
        }
        if self.whole_cohort {
            // Whole-cohort strategies need every update at once: keep the bytes in shared memory
            // (never copied) and hand them to the coordinator at the close.
            self.held.push(Held {
                client: msg.descriptor.client,
                num_examples: msg.descriptor.num_examples,
                stream_seq: msg.descriptor.stream_seq,
                slot: Some(msg.view),
                asynchronous: self.asynchronous,
                fold_weight: 0.0,
                staleness: msg.descriptor.staleness.0,
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
