//! The round coordinator of one job (the top of the hierarchy on a single node): opens rounds,
//! closes them when the cohort is complete or at the deadline, applies the strategy's server
//! step, commits, and only then acks the round's updates.
//!
//! Commit order (DESIGN.md §2, step 6): model version `v+1` into `shoal-models` (idempotent),
//! job state by compare-and-set on its KV revision, `RoundClosed`/`RoundOpened` events, then the
//! acks. A crash before the compare-and-set loses nothing (the updates are un-acked and
//! redelivered; the same model is rebuilt and rewritten); a crash after it applies nothing twice
//! (redelivered updates are for a closed round and are rejected as `LateUpdate`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::spec::StrategyPlugins;
use shoal_functions::{JobId, JobSpec, Mergeability, ModelManifest, Parameters, RoundPolicy, UpdateView};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::host::{CloseRound, FunctionHost, RegisterJob, RoundHarvest, RoundProgress};
use crate::infra::Infra;
use crate::jobs::{self, CasOutcome, JobDirectory};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::protocol::{self, now_ms, JobPhase, JobState, RoundEvent, RoundOutcome};

/// Everything a coordinator needs.
#[derive(Clone, Debug)]
pub struct CoordinatorContext {
    /// NATS handles.
    pub infra: Infra,
    /// Shared job view.
    pub directory: JobDirectory,
    /// The function host.
    pub host: Addr<FunctionHost>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Node shutdown.
    pub cancel: CancellationToken,
    /// Job-specific strategy pieces (e.g. Bristle's per-class evaluator), if the embedding
    /// application supplies them.
    pub plugins: Option<Arc<dyn PluginFactory>>,
    /// After a (re)start, a round whose deadline already passed stays open this long, so
    /// updates staged before a crash are redelivered before it is judged.
    pub startup_grace: Duration,
}

/// Supplies [`StrategyPlugins`] for a job: an application embedding a node (the demo, a
/// deployment with a server-held validation split) implements it to give Bristle a per-class
/// evaluator. Called once per job when its coordinator starts.
pub trait PluginFactory: Send + Sync + std::fmt::Debug {
    /// The pieces for `spec`'s strategy (`StrategyPlugins::default()` for none).
    fn plugins(&self, spec: &JobSpec) -> StrategyPlugins;
}

/// Runs job `job` until it finishes, fails, or the node shuts down.
///
/// # Errors
/// NATS errors that persist, an unreadable spec or model.
pub async fn run(ctx: CoordinatorContext, job: JobId) -> Result<()> {
    let spec = Arc::new(jobs::load_spec(&ctx.infra, &job).await?);
    let manifest = Arc::new(spec.manifest.clone());
    let (tx, mut progress) = mpsc::unbounded_channel();
    ctx.host
        .send(RegisterJob { job: job.clone(), progress: tx })
        .await
        .map_err(|e| Error::Shm(e.to_string()))?;
    let plugins = ctx.plugins.as_ref().map(|f| f.plugins(&spec)).unwrap_or_default();
    let mut strategy = spec.build_strategy_with(plugins)?;
    let (mut state, mut revision) = jobs::load_state(&ctx.infra, &job).await?;
    let mut global = load_global(&ctx.infra, &job, &state, &manifest).await?;
    let RoundPolicy::Sync { cohort_size, min_clients, deadline_ms } = spec.round_policy;
    let mut rewards = ctx
        .infra
        .client
        .subscribe(ctx.infra.subjects.all_rewards(&job))
        .await
        .map_err(|e| Error::nats("subscribe to reward requests", e))?;
    // A round already open when we start was opened by a process that may have died holding
    // staged updates: give JetStream time to redeliver them before judging the round.
    let mut earliest_close = state.is_open().then(|| tokio::time::Instant::now() + ctx.startup_grace);

    while state.phase == JobPhase::Running {
        let round = state.round;
        let span = tracing::info_span!("round", %job, round = round.0);
        // Open the round if no node has.
        if !state.is_open() {
            let mut next = state.clone();
            next.opened_at_ms = now_ms();
            next.deadline_at_ms = next.opened_at_ms + deadline_ms;
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
                    (state, revision) = jobs::load_state(&ctx.infra, &job).await?;
                    continue;
                }
            }
        }

        // Wait for the cohort or the deadline.
        let remaining = Duration::from_millis(state.deadline_at_ms.saturating_sub(now_ms()));
        let mut deadline = tokio::time::Instant::now() + remaining;
        if let Some(t) = earliest_close.take() {
            deadline = deadline.max(t);
        }
        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => break,
                Some(req) = rewards.next() => {
                    let reward = reward_bytes(&*strategy, &req);
                    answer_reward(&ctx.infra, req, reward).await;
                }
                p = progress.recv() => match p.inspect(|p| tracing::trace!(?p, "round progress")) {
                    Some(RoundProgress { round: r, accepted }) if r == round && accepted >= cohort_size => break,
                    Some(_) => {}
                    None => return Ok(()),
                },
            }
        }

        let harvest = ctx
            .host
            .send(CloseRound { job: job.clone(), round })
            .await
            .map_err(|e| Error::Shm(format!("function host gone: {e}")))?;
        let accepted = harvest.held.len() as u32;
        let next_version = state.model_version.next();
        // The server step is CPU-bound (a whole-cohort strategy reads every staged update):
        // run it on a blocking thread, handing strategy, model and harvest over and back.
        let (s, g, h, outcome, new_global) = tokio::task::spawn_blocking(move || {
            let (mut strategy, global, harvest) = (strategy, global, harvest);
            let (outcome, new_global) =
                close_outcome(&mut *strategy, &harvest, &global, accepted, min_clients, next_version);
            (strategy, global, harvest, outcome, new_global)
        })
        .await
        .map_err(|e| Error::Shm(format!("server step panicked: {e}")))?;
        (strategy, global) = (s, g);
        let harvest = h;
        let mut next = state.clone();
        next.last_outcome = Some(outcome.clone());
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
        match jobs::cas_state(&ctx.infra, &job, &next, revision).await? {
            CasOutcome::Written(rev) => {
                revision = rev;
            }
            CasOutcome::Conflict => {
                // Another committer won; our harvest stays un-acked and is redelivered to it.
                span.in_scope(|| tracing::warn!("job state changed under us; reloading"));
                (state, revision) = jobs::load_state(&ctx.infra, &job).await?;
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
        if let (Some(t), RoundOutcome::Committed { .. }) = (harvest.last_fold, &outcome) {
            ctx.metrics.round_latency.observe(t.elapsed().as_secs_f64());
        }
        publish_event(
            &ctx.infra,
            &job,
            &RoundEvent::RoundClosed { job: job.clone(), round, outcome: outcome.clone() },
        )
        .await;
        span.in_scope(|| tracing::info!(?outcome, "round closed"));
        if state.phase != JobPhase::Running {
            publish_event(
                &ctx.infra,
                &job,
                &RoundEvent::JobEnded { job: job.clone(), phase: state.phase.clone() },
            )
            .await;
            tracing::info!(%job, phase = %state.phase, "job ended");
        }
        ack_round(&ctx.infra, harvest).instrument(span).await;
        if let Some(p) = new_global {
            global = p;
        }
    }
    Ok(())
}

fn close_outcome(
    strategy: &mut dyn shoal_functions::Strategy,
    harvest: &RoundHarvest,
    global: &Parameters,
    accepted: u32,
    min_clients: u32,
    version: shoal_functions::ModelVersion,
) -> (RoundOutcome, Option<Parameters>) {
    if accepted < min_clients {
        return (RoundOutcome::QuorumNotMet { accepted, min_clients }, None);
    }
    let total_weight: f64 = harvest.held.iter().map(|h| h.weight).sum();
    let result = match strategy.mergeability() {
        Mergeability::Streaming => match &harvest.partial {
            Some(partial) => strategy.finish(partial, global),
            None => return (RoundOutcome::QuorumNotMet { accepted, min_clients }, None),
        },
        Mergeability::WholeCohort => {
            // The cohort is read in place from shared memory: no update is copied.
            let manifest = global.manifest();
            let views: Vec<UpdateView<'_>> = harvest
                .held
                .iter()
                .filter_map(|h| {
                    let slot = h.slot.as_ref()?;
                    Some(UpdateView { manifest, bytes: slot.bytes(), weight: h.weight, client: &h.client })
                })
                .collect();
            strategy.aggregate_cohort(&views, global)
        }
    };
    match result {
        Ok(p) => (RoundOutcome::Committed { version, clients: accepted, total_weight }, Some(p)),
        Err(e) => (RoundOutcome::AggregationFailed { detail: e.to_string() }, None),
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
            h.insert(protocol::HDR_ERROR, why.as_str());
            infra.client.publish_with_headers(reply, h, Bytes::new()).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "answering a reward request failed");
    }
}

async fn publish_event(infra: &Infra, job: &JobId, event: &RoundEvent) {
    let subject = infra.subjects.round_events(job);
    if let Err(e) = infra.client.publish(subject, Bytes::from(protocol::encode(event))).await {
        tracing::warn!(error = %e, "publishing a round event failed (clients also watch the job state)");
    }
}

async fn ack_round(infra: &Infra, harvest: RoundHarvest) {
    let started = Instant::now();
    let n = harvest.held.len();
    for h in harvest.held {
        h.acker.ack().await;
        if let Some(obj) = h.object {
            if let Err(e) = infra.update_objects.delete(&obj).await {
                tracing::debug!(object = %obj, error = %e, "deleting a consumed update object failed");
            }
        }
    }
    if let Err(e) = infra.client.flush().await {
        tracing::warn!(error = %e, "flushing acks failed; JetStream may redeliver (rejected as late)");
    }
    tracing::debug!(acked = n, elapsed_us = started.elapsed().as_micros() as u64, "round acked");
}
