//! The top of a job's hierarchy: opens rounds, closes them when the cohort is complete (summing
//! the leaves' progress) or at the deadline, collects the leaves' partials
//! ([`crate::cluster::leaf`]), applies the strategy's server step and commits. One node per job
//! runs it: the holder of the job's top lease (`crate::cluster::lease`).
//!
//! Commit order (DESIGN.md §2, step 6): model version `v+1` into `shoal-models` (idempotent),
//! job state by compare-and-set on its KV revision (with the [`CommitRecord`] naming the
//! collection), `RoundClosed`/`RoundOpened` events; each leaf then acks the updates of its
//! snapshot. A crash before the compare-and-set loses nothing (the updates are un-acked; the
//! next top collects them again); a crash after it applies nothing twice (leaves ack exactly
//! what the record names; redeliveries are for a closed round).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::factory::{self, StrategyPlugins};
use shoal_functions::{
    JobId, JobSpec, Mergeability, ModelManifest, NodeId, Parameters, PartialAggregate, RoundId, UpdateView,
};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::cluster::leaf::{self, LocalLinks, Partial};
use crate::cluster::lease;
use crate::error::{Error, Result};
use crate::jobs::{self, CasOutcome, JobDirectory};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::nats::Infra;
use shoal_proto::cluster::CohortEntry;
use shoal_proto::cluster::CollectRequest;
use shoal_proto::cluster::CommitRecord;
use shoal_proto::cluster::LeafProgress;
use shoal_proto::JobPhase;
use shoal_proto::JobState;
use shoal_proto::RoundEvent;
use shoal_proto::RoundOutcome;

/// Everything a top needs.
#[derive(Clone, Debug)]
pub struct CoordinatorContext {
    /// NATS handles.
    pub infra: Infra,
    /// Shared job view.
    pub directory: JobDirectory,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Stops this top (node shutdown, or the top lease lost).
    pub cancel: CancellationToken,
    /// Job-specific strategy pieces (e.g. Bristle's per-class evaluator), if the embedding
    /// application supplies them.
    pub plugins: Option<Arc<dyn PluginFactory>>,
    /// After taking over an open round, the top waits this long before judging it, so that
    /// updates a dead node held are redelivered to the live ones first.
    pub startup_grace: Duration,
    /// This node.
    pub node: NodeId,
    /// In-process links from this node's leaves.
    pub local: LocalLinks,
    /// How long to wait for the leaves' partials before asking again.
    pub collect_timeout: Duration,
}

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
pub async fn run_top(ctx: CoordinatorContext, job: JobId) -> Result<()> {
    let instance = shoal_proto::InstanceId(rand::random::<u64>());
    let key = shoal_proto::subjects::top_lease_key(&job);
    loop {
        if ctx.cancel.is_cancelled() {
            return Ok(());
        }
        if ctx.directory.get(&job).is_some_and(|e| e.state.phase != JobPhase::Running) {
            return Ok(());
        }
        match lease::try_acquire(&ctx.infra, &key, &ctx.node, instance).await? {
            lease::Attempt::HeldBy(holder) => {
                ctx.directory.set_top(&job, Some(holder.node));
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(lease::RENEW) => continue,
                }
            }
            lease::Attempt::Acquired(held) => {
                ctx.directory.set_top(&job, Some(ctx.node.clone()));
                tracing::info!(%job, node = %ctx.node, "this node is the job's top");
                let stop = CancellationToken::new();
                let lost = ctx.cancel.child_token();
                let keeper = tokio::spawn(lease::keep(ctx.infra.clone(), held, stop.clone(), lost.clone()));
                let gauge = ctx.metrics.tier("top");
                gauge.inc();
                let mut top_ctx = ctx.clone();
                top_ctx.cancel = lost.clone();
                let result = run(top_ctx, job.clone()).await;
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

/// Runs the top of `job` until it finishes, fails, or `ctx.cancel`.
///
/// # Errors
/// NATS errors that persist, an unreadable spec or model.
pub async fn run(ctx: CoordinatorContext, job: JobId) -> Result<()> {
    let spec = Arc::new(jobs::load_spec(&ctx.infra.js, &job).await?);
    let manifest = Arc::new(spec.manifest.clone());
    let mut local = ctx.local.register(&job);
    let plugins = ctx.plugins.as_ref().map(|f| f.plugins(&spec)).unwrap_or_default();
    let mut strategy = factory::build_strategy_with(&spec, plugins)?;
    let (mut state, mut revision) = jobs::load_state(&ctx.infra.js, &job).await?;
    let mut global = load_global(&ctx.infra, &job, &state, &manifest).await?;
    let rule = spec.round_rule();
    let mut rewards =
        ctx.infra.subscribe(ctx.infra.subjects.all_rewards(&job), "subscribe to reward requests").await?;
    let mut progress =
        ctx.infra.subscribe(ctx.infra.subjects.progress(&job), "subscribe to leaf progress").await?;
    let mut partials = ctx
        .infra
        .subscribe(ctx.infra.subjects.partials_to(&job, &ctx.node, "top"), "subscribe to partials")
        .await?;
    let mut shard_results = ctx
        .infra
        .subscribe(ctx.infra.subjects.shard_results_to(&job, &ctx.node), "subscribe to shard results")
        .await?;
    let mut exchange_failures = 0u32;
    // A round already open when we start was opened by a top that may have died holding
    // staged updates: give JetStream time to redeliver them before judging the round.
    let mut earliest_close = state.is_open().then(|| tokio::time::Instant::now() + ctx.startup_grace);

    while state.phase == JobPhase::Running {
        let round = state.round;
        let span = tracing::info_span!("round", %job, round = round.0);
        // Open the round if no top has.
        if !state.is_open() {
            let mut next = state.clone();
            next.opened_at_ms = now_ms();
            next.deadline_at_ms = next.opened_at_ms.saturating_add(rule.deadline_ms);
            match jobs::cas_state(&ctx.infra, &job, &next, revision).await? {
                CasOutcome::Written(rev) => {
                    state = next;
                    revision = rev;
                    ctx.directory.observe_state(&job, None, state.clone(), revision);
                    publish_event(
                        &ctx.infra,
                        &job,
                        &RoundEvent::RoundOpened {
                            job: job.clone(),
                            round,
                            base_version: state.model_version,
                            deadline_at_ms: state.deadline_at_ms,
                        },
                    )
                    .await;
                    span.in_scope(|| tracing::info!(base_version = %state.model_version, "round opened"));
                }
                CasOutcome::Conflict => {
                    (state, revision) = jobs::load_state(&ctx.infra.js, &job).await?;
                    continue;
                }
            }
        }

        // Wait for the cohort (the sum of the leaves' progress) or the deadline.
        let remaining = Duration::from_millis(state.deadline_at_ms.saturating_sub(now_ms()));
        let mut deadline = tokio::time::Instant::now() + remaining;
        if let Some(t) = earliest_close.take() {
            deadline = deadline.max(t);
        }
        // Each node's latest count and when it came: a node that stopped reporting (dead, or
        // handed its updates back) no longer counts once its heartbeats lapse.
        let mut per_node: HashMap<NodeId, (u32, tokio::time::Instant)> = HashMap::new();
        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => break,
                Some(req) = rewards.next() => {
                    let reward = reward_bytes(&*strategy, &req);
                    answer_reward(&ctx.infra, req, reward).await;
                }
                Some(m) = progress.next() => {
                    let Ok(p) = shoal_proto::decode::<LeafProgress>("leaf progress", &m.payload) else { continue };
                    if p.round == round {
                        let now = tokio::time::Instant::now();
                        per_node.insert(p.node, (p.accepted, now));
                        let fresh = per_node
                            .values()
                            .filter(|(_, at)| now.duration_since(*at) < PROGRESS_FRESH)
                            .map(|&(n, _)| u64::from(n))
                            .sum::<u64>();
                        if fresh >= u64::from(rule.cohort_size) {
                            break;
                        }
                    }
                }
            }
        }

        let Some(mut collected) = collect(&ctx, &job, &manifest, &mut local, &mut partials, round).await?
        else {
            return Ok(()); // cancelled
        };
        if tokio::time::Instant::now() < deadline && collected.count < u64::from(rule.cohort_size) {
            // The progress counted updates the collection did not find (a node that died or
            // handed them back since): keep the round open; they come back through JetStream.
            span.in_scope(|| {
                tracing::info!(collected = collected.count, "cohort incomplete at collection; waiting on")
            });
            continue;
        }
        // Whole-cohort updates held on other nodes: a coordinate-sharded exchange, when the
        // strategy has one (crate::cluster::exchange); otherwise they are left out of this round.
        let remote = collected.entries.iter().any(|e| e.node != ctx.node);
        let mut sharded = None;
        if strategy.mergeability() == Mergeability::WholeCohort && remote {
            if strategy.sharding() == shoal_functions::Sharding::Unsupported {
                let holders: Vec<NodeId> =
                    collected.entries.iter().filter(|e| e.node != ctx.node).map(|e| e.node.clone()).collect();
                span.in_scope(|| {
                    tracing::warn!(?holders, "whole-cohort updates staged away from the top are late")
                });
                collected.nodes.retain(|n| !holders.contains(n));
                collected.count = collected.cohort.len() as u64;
            } else if collected.entries.len() as u64 >= u64::from(rule.min_clients) {
                let mut owners = collected.nodes.clone();
                owners.sort();
                let result = crate::cluster::exchange::run_top(
                    &ctx.infra,
                    &job,
                    &ctx.node,
                    &mut *strategy,
                    &global,
                    round,
                    state.model_version,
                    collected.entries.clone(),
                    owners,
                    &mut shard_results,
                    ctx.collect_timeout,
                    &ctx.metrics,
                )
                .await;
                match result {
                    Err(e @ Error::Timeout(..)) if exchange_failures < 2 => {
                        exchange_failures += 1;
                        span.in_scope(
                            || tracing::warn!(error = %e, "shard exchange incomplete; collecting again"),
                        );
                        continue;
                    }
                    other => sharded = Some(other.map_err(|e| e.to_string())),
                }
            }
        }
        exchange_failures = 0;
        let accepted = collected.count as u32;
        let next_version = state.model_version.next();
        // The server step is CPU-bound (a whole-cohort strategy reads every staged update):
        // run it on a blocking thread, handing strategy, model and partials over and back.
        let min_clients = rule.min_clients;
        let (s, g, c, outcome, new_global) = tokio::task::spawn_blocking(move || {
            let (mut strategy, global, collected) = (strategy, global, collected);
            let (outcome, new_global) = close_outcome(
                &mut *strategy,
                &collected,
                sharded,
                &global,
                accepted,
                min_clients,
                next_version,
            );
            (strategy, global, collected, outcome, new_global)
        })
        .await
        .map_err(|e| Error::Shm(format!("server step panicked: {e}")))?;
        (strategy, global) = (s, g);
        let collected = c;
        let mut next = state.clone();
        next.last_outcome = Some(outcome.clone());
        next.last_commit = Some(CommitRecord {
            round,
            collect: collected.collect,
            nodes: collected.nodes.clone(),
            applied: shoal_proto::cluster::applied_ranges(collected.seqs.clone()),
        });
        next.round = round.next();
        next.opened_at_ms = 0;
        next.deadline_at_ms = 0;
        if let Some(p) = &new_global {
            jobs::put_model(&ctx.infra, &job, next_version, p).await?;
            next.model_version = next_version;
            next.failed_rounds_in_a_row = 0;
        } else {
            next.failed_rounds_in_a_row += 1;
        }
        if new_global.is_some() && next_version.0 >= spec.rounds {
            next.phase = JobPhase::Finished;
            next.round = round;
        } else if next.failed_rounds_in_a_row >= spec.max_failed_rounds {
            next.phase = JobPhase::Failed {
                reason: format!("{} consecutive rounds committed nothing", next.failed_rounds_in_a_row),
            };
            next.round = round;
        }
        if ctx.cancel.is_cancelled() {
            return Ok(()); // the lease was lost meanwhile: leave the commit to the new top
        }
        match jobs::cas_state(&ctx.infra, &job, &next, revision).await? {
            CasOutcome::Written(rev) => {
                revision = rev;
            }
            CasOutcome::Conflict => {
                // Another committer won; the leaves settle by its record.
                span.in_scope(|| tracing::warn!("job state changed under us; reloading"));
                (state, revision) = jobs::load_state(&ctx.infra.js, &job).await?;
                global = load_global(&ctx.infra, &job, &state, &manifest).await?;
                continue;
            }
        }
        state = next;
        ctx.directory.observe_state(&job, None, state.clone(), revision);
        let label = match &outcome {
            RoundOutcome::Committed { .. } => "committed",
            RoundOutcome::QuorumNotMet { .. } => "quorum_not_met",
            RoundOutcome::AggregationFailed { .. } => "aggregation_failed",
        };
        ctx.metrics.rounds.get_or_create(&OutcomeLabel { outcome: label }).inc();
        if let (true, RoundOutcome::Committed { .. }) = (collected.last_fold_ms > 0, &outcome) {
            let ms = now_ms().saturating_sub(collected.last_fold_ms);
            ctx.metrics.round_latency.observe(ms as f64 / 1000.0);
        }
        publish_event(
            &ctx.infra,
            &job,
            &RoundEvent::RoundClosed { job: job.clone(), round, outcome: outcome.clone() },
        )
        .await;
        span.in_scope(|| tracing::info!(%outcome, nodes = collected.nodes.len(), "round closed"));
        if state.phase != JobPhase::Running {
            publish_event(
                &ctx.infra,
                &job,
                &RoundEvent::JobEnded { job: job.clone(), phase: state.phase.clone() },
            )
            .await;
            tracing::info!(%job, phase = %state.phase, "job ended");
        }
        drop(collected); // releases the whole-cohort slots to their leaves
        if let Some(p) = new_global {
            global = p;
            prune_models(&ctx.infra, &job, state.model_version, rule.max_staleness).await;
        }
    }
    Ok(())
}

/// A leaf's progress counts toward the cohort this long after it arrived (leaves report every
/// 500 ms).
const PROGRESS_FRESH: Duration = Duration::from_millis(1500);

/// What the leaves sent for one round.
#[derive(Debug)]
struct Collected {
    collect: shoal_proto::CollectId,
    nodes: Vec<NodeId>,
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
/// are no longer live. `Ok(None)`: cancelled.
async fn collect(
    ctx: &CoordinatorContext,
    job: &JobId,
    manifest: &Arc<ModelManifest>,
    local: &mut tokio::sync::mpsc::UnboundedReceiver<Partial>,
    remote: &mut async_nats::Subscriber,
    round: RoundId,
) -> Result<Option<Collected>> {
    let fan_in = ctx.directory.get(job).map_or(0, |e| e.spec.fan_in);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut nodes = lease::live_nodes(&ctx.infra).await?;
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
        };
        ctx.infra
            .client
            .publish(ctx.infra.subjects.collect(job), Bytes::from(shoal_proto::encode(&req)))
            .await
            .map_err(|e| Error::nats("publish collect request", e))?;
        let mut got = Collected {
            collect: req.collect,
            nodes: Vec::new(),
            partial: None,
            cohort: Vec::new(),
            entries: Vec::new(),
            count: 0,
            seqs: Vec::new(),
            last_fold_ms: 0,
        };
        let deadline = tokio::time::Instant::now() + ctx.collect_timeout;
        while !nodes.iter().all(|n| got.nodes.contains(n)) {
            let p = tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep_until(deadline) => break,
                Some(p) = local.recv() => p,
                Some(m) = remote.next() => match leaf::receive_remote(&ctx.infra, manifest, &m).await {
                    Ok((h, p, bytes)) => {
                        ctx.metrics.partial_bytes_received.inc_by(bytes);
                        Partial {
                            sender: h.sender,
                            collect: h.collect,
                            nodes: h.nodes,
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
                || !nodes.contains(&p.sender)
                || p.nodes.iter().any(|n| got.nodes.contains(n) || !nodes.contains(n))
            {
                continue; // an earlier collection's answer, a duplicate, or not from a node asked
            }
            if let Some(pa) = p.partial {
                // Streaming strategies all merge by the partial's own rule (sums add, maxima
                // max, the lowest client's `first` values win).
                match &mut got.partial {
                    None => got.partial = Some(pa),
                    Some(acc) => Arc::make_mut(acc).merge(&pa)?,
                }
            }
            got.cohort.extend(p.cohort);
            got.entries.extend(p.entries);
            got.nodes.extend(p.nodes);
            got.count += p.count;
            got.seqs.extend(p.seqs);
            got.last_fold_ms = got.last_fold_ms.max(p.last_fold_ms);
        }
        let missing: Vec<&NodeId> = nodes.iter().filter(|n| !got.nodes.contains(n)).collect();
        if missing.is_empty() {
            return Ok(Some(got));
        }
        let live = lease::live_nodes(&ctx.infra).await?;
        let missing_live = missing.iter().any(|n| live.contains(n));
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

fn close_outcome(
    strategy: &mut dyn shoal_functions::Strategy,
    collected: &Collected,
    sharded: Option<std::result::Result<Parameters, String>>,
    global: &Parameters,
    accepted: u32,
    min_clients: u32,
    version: shoal_functions::ModelVersion,
) -> (RoundOutcome, Option<Parameters>) {
    if accepted < min_clients {
        return (RoundOutcome::QuorumNotMet { accepted, min_clients }, None);
    }
    if let Some(r) = sharded {
        let total: f64 = collected.entries.iter().map(|e| e.weight).sum();
        return match r {
            Ok(p) => (RoundOutcome::Committed { version, clients: accepted, total_weight: total }, Some(p)),
            Err(detail) => (RoundOutcome::AggregationFailed { detail, kind: None }, None),
        };
    }
    let result = match strategy.mergeability() {
        Mergeability::Streaming => match &collected.partial {
            Some(partial) => strategy.finish(partial, global).map(|p| (p, partial.total_weight())),
            None => return (RoundOutcome::QuorumNotMet { accepted, min_clients }, None),
        },
        Mergeability::WholeCohort => {
            // The cohort is read in place from shared memory: no update is copied.
            let manifest = global.manifest();
            let views: Vec<UpdateView<'_>> = collected
                .cohort
                .iter()
                .map(|m| UpdateView { manifest, bytes: m.slot.bytes(), weight: m.weight, client: &m.client })
                .collect();
            let total: f64 = views.iter().map(|v| v.weight).sum();
            strategy.aggregate_cohort(&views, global).map(|p| (p, total))
        }
    };
    match result {
        Ok((p, total_weight)) => {
            (RoundOutcome::Committed { version, clients: accepted, total_weight }, Some(p))
        }
        Err(e) => (RoundOutcome::AggregationFailed { detail: e.to_string(), kind: Some(e.kind()) }, None),
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
    let name = shoal_proto::subjects::model_object(job, shoal_functions::ModelVersion(old));
    if let Err(e) = infra.models.delete(&name).await {
        tracing::debug!(object = %name, error = %e, "pruning an old model version failed");
    }
}

async fn load_global(
    infra: &Infra,
    job: &JobId,
    state: &JobState,
    manifest: &Arc<ModelManifest>,
) -> Result<Parameters> {
    let bytes = jobs::get_model_bytes(infra, job, state.model_version).await?;
    Ok(Parameters::from_safetensors(Arc::clone(manifest), &bytes)?)
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
