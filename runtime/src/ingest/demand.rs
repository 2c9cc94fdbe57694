//! The node's demand signal for the autoscaler (issue 10 item 4, reference/kubernetes.md R2.3):
//! every `timings.demand_report_ms` the gateway publishes a [`DemandReport`] on
//! `<prefix>.node.<node>.demand`, which the operator reads without Prometheus
//! (`operator/src/demand.rs`). Per job this node serves:
//! - `arrivals_per_second`: updates staged per second, an exponentially weighted moving average
//!   with time constant `timings.demand_ewma_tau_ms` ([`ewma_step`]);
//! - `backlog`: updates staged and handed to a function host but not yet folded (or refused) by
//!   an aggregator: each [`crate::host::Delivery`] carries an [`Unfolded`] token that counts
//!   it until it is dropped, so no path can leave the count behind;
//! - `hosts`: function hosts serving the job on this node.
//!
//! And once per node: the work-queue consumer's `num_pending` (updates not yet delivered to any
//! node). Not `num_ack_pending`: Shoal acks at the commit, so those are already staged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use shoal_proto::cluster::{DemandReport, JobDemand};
use shoal_proto::config::ms;
use shoal_proto::{JobId, JobPhase};

use crate::node::capacity::Admission;
use crate::node::NodeContext;

/// Arrivals and unfolded updates per job, counted by the gateway and the aggregators.
#[derive(Debug, Default)]
pub struct DemandTally {
    jobs: Mutex<HashMap<JobId, JobCounts>>,
}

#[derive(Debug, Default, Clone)]
struct JobCounts {
    arrivals: u64,
    unfolded: Arc<AtomicU64>,
}

/// One staged update not yet folded; the count drops with the token.
#[derive(Debug, Default)]
pub struct Unfolded(Option<Arc<AtomicU64>>);

impl Unfolded {
    /// A token that counts nothing (a delivery whose backlog another process counts).
    pub fn uncounted() -> Unfolded {
        Unfolded(None)
    }
}

impl Drop for Unfolded {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl DemandTally {
    /// Counts one update of `job` staged on this node; it stays in the backlog until the
    /// returned token is dropped.
    pub fn arrived(&self, job: &JobId) -> Unfolded {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let counts = jobs.entry(job.clone()).or_default();
        counts.arrivals += 1;
        counts.unfolded.fetch_add(1, Ordering::AcqRel);
        Unfolded(Some(Arc::clone(&counts.unfolded)))
    }

    /// (updates staged since the start, updates unfolded now) of `job`.
    pub fn counts(&self, job: &JobId) -> (u64, u64) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(job).map_or((0, 0), |c| (c.arrivals, c.unfolded.load(Ordering::Acquire)))
    }

    /// Forgets the jobs `keep` refuses whose backlog is empty (ended jobs).
    pub fn retain(&self, keep: impl Fn(&JobId) -> bool) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.retain(|job, c| keep(job) || c.unfolded.load(Ordering::Acquire) > 0);
    }
}

/// One step of the arrival-rate EWMA: `arrived` updates in the last `dt`, time constant `tau`.
/// The weight of the new sample is `1 − e^(−dt/τ)`, so the average does not depend on how often
/// it is sampled; a zero `dt` leaves it unchanged.
pub fn ewma_step(rate: f64, arrived: u64, dt: Duration, tau: Duration) -> f64 {
    let dt_s = dt.as_secs_f64();
    if dt_s <= 0.0 {
        return rate;
    }
    let alpha = if tau.is_zero() { 1.0 } else { 1.0 - (-dt_s / tau.as_secs_f64()).exp() };
    rate + alpha * (arrived as f64 / dt_s - rate)
}

/// Per-job EWMA state of the publisher.
#[derive(Debug, Default)]
struct Rate {
    per_second: f64,
    arrivals: u64,
}

/// Publishes the node's [`DemandReport`] every tick until the node shuts down.
pub async fn publish(ctx: NodeContext) {
    let t = ctx.config.timings.clone();
    let (tick, tau) = (ms(t.demand_report_ms), ms(t.demand_ewma_tau_ms));
    let subject = ctx.infra.subjects.demand(&ctx.node);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rates: HashMap<JobId, Rate> = HashMap::new();
    let mut last = Instant::now();
    let mut num_pending = 0;
    let mut consumer = None;
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let (now, dt) = (Instant::now(), last.elapsed());
        last = now;
        if let Some(n) = pending(&ctx, &mut consumer).await {
            num_pending = n;
        }
        let served = |job: &JobId| {
            ctx.directory.get(job).is_some_and(|e| e.state.phase == JobPhase::Running)
                && ctx.slots.admission(job) == Admission::Served
        };
        ctx.demand.retain(served);
        let mut jobs: Vec<JobId> = ctx.directory.jobs().into_iter().filter(served).collect();
        jobs.sort();
        rates.retain(|job, _| jobs.contains(job));
        let jobs = jobs
            .into_iter()
            .map(|job| {
                let (arrivals, backlog) = ctx.demand.counts(&job);
                // A job seen for the first time: its arrivals (counted from its first one)
                // all fall in this tick.
                let rate = rates.entry(job.clone()).or_default();
                rate.per_second = ewma_step(rate.per_second, arrivals.saturating_sub(rate.arrivals), dt, tau);
                rate.arrivals = arrivals;
                JobDemand { job, arrivals_per_second: rate.per_second, backlog, hosts: 1 }
            })
            .collect();
        let report =
            DemandReport { node: ctx.node.clone(), at_ms: crate::clock::now_ms(), num_pending, jobs };
        if let Err(e) = ctx.infra.client.publish(subject.clone(), shoal_proto::encode(&report).into()).await {
            tracing::debug!(error = %e, "demand report not published");
        }
    }
}

/// The work-queue consumer's `num_pending`, `None` when it cannot be read now.
async fn pending(
    ctx: &NodeContext,
    consumer: &mut Option<async_nats::jetstream::consumer::Consumer<pull::Config>>,
) -> Option<u64> {
    if consumer.is_none() {
        *consumer = ctx.infra.updates.get_consumer(&ctx.infra.subjects.gateway_consumer()).await.ok();
    }
    match consumer.as_mut()?.info().await {
        Ok(info) => Some(info.num_pending),
        Err(e) => {
            tracing::debug!(error = %e, "work-queue consumer info unavailable for the demand report");
            *consumer = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ewma_converges_to_a_steady_rate_whatever_the_sampling() {
        let tau = Duration::from_secs(10);
        for step_ms in [100u64, 2000] {
            let (mut rate, mut t) = (0.0, 0);
            while t < 120_000 {
                // 5 updates per second: one every other 100 ms step, or 10 per 2 s step.
                let arrived = if step_ms == 100 { u64::from(t % 200 == 0) } else { 10 };
                rate = ewma_step(rate, arrived, ms(step_ms), tau);
                t += step_ms;
            }
            assert!((rate - 5.0).abs() < 0.05, "step {step_ms} ms: {rate}");
        }
        // After one time constant without arrivals, e^-1 of the rate is left.
        let decayed = ewma_step(5.0, 0, tau, tau);
        assert!((decayed - 5.0 * (-1.0f64).exp()).abs() < 1e-12, "{decayed}");
        assert_eq!(ewma_step(3.0, 7, Duration::ZERO, tau), 3.0);
    }

    #[test]
    fn the_backlog_counts_tokens_until_they_drop() {
        let tally = DemandTally::default();
        let job = JobId::new("j").expect("job id");
        let a = tally.arrived(&job);
        let b = tally.arrived(&job);
        assert_eq!(tally.counts(&job), (2, 2));
        drop(a);
        assert_eq!(tally.counts(&job), (2, 1));
        tally.retain(|_| false);
        assert_eq!(tally.counts(&job), (2, 1), "a job with a backlog is kept");
        drop(b);
        drop(Unfolded::uncounted());
        assert_eq!(tally.counts(&job), (2, 0));
        tally.retain(|_| false);
        assert_eq!(tally.counts(&job), (0, 0));
    }
}
