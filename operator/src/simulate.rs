//! The what-if simulator: replays an arrival trace tick by tick through the [`Autoscaler`] and
//! placement, with a deliberately simple model of a function host.
//!
//! ## Host model
//! - Time advances in ticks of `tickInterval`. In tick `[t, t + dt)` the trace's arrivals with
//!   `time_s` in that interval are staged on their node (FIFO per node and job), then served,
//!   then the autoscaler observes the tick (arrivals/dt and the backlog left per node, with
//!   `num_pending` = 0: the model stages every update on arrival) and its decision is applied.
//! - A host folds `target.updatesPerSecondPerHost` updates/s of updates staged on its own node.
//!   A host added by a decision is ready `cold_start` later (its time before that is paid for
//!   but serves nothing); a removed host stops at once (not-yet-ready hosts go first).
//! - Each node's ready hosts serve its own queue first (one fluid FIFO server of
//!   `ready hosts × rate`). Updates a node cannot serve locally are served by hosts on other nodes
//!   with spare time in the same tick, oldest first, at a cost of `1/rate + bytes/
//!   cross_node_bandwidth` host-seconds each (the update travels over NATS, DESIGN.md §9:
//!   0.5–1.4 GB/s); their bytes count as cross-node.
//! - Queueing delay of an update = time it is served − time it was staged (fluid: a chunk served
//!   over `[a, b]` is recorded as four equal parts at the quarter points).
//! - Host-seconds = Σ hosts asked for × dt (starting hosts included). A cold start = one host
//!   added on a node. Jobs are independent (each has its autoscaler and per-node cap).
//! - The run continues after the last arrival until every queue is empty and every job is
//!   back at `minHosts`, or `drain_limit` after the last arrival.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::autoscaler::{Autoscaler, EventReason, LimitReason, Mode, NodeObservation, Observation};
use crate::error::{Error, Result};
use crate::node::NodeName;
use crate::policy::{PlacementStrategy, ScalingSpec};
use crate::trace::Trace;

/// Parameters of the host model.
#[derive(Debug, Clone, PartialEq)]
pub struct HostModel {
    /// Time from a decision adding a host to the host serving.
    pub cold_start: Duration,
    /// Bytes per second one update moves between nodes (1 GB/s: NATS on loopback).
    pub cross_node_bandwidth: f64,
    /// How long after the last arrival the run may continue to drain queues and scale down.
    pub drain_limit: Duration,
}

impl Default for HostModel {
    fn default() -> Self {
        HostModel {
            cold_start: Duration::from_secs(2),
            cross_node_bandwidth: 1e9,
            drain_limit: Duration::from_secs(600),
        }
    }
}

/// One tick of a run, summed over jobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TickRecord {
    /// End of the tick, seconds.
    pub time_s: f64,
    /// Whether any job is in panic mode.
    pub panic: bool,
    /// Hosts asked for after this tick's decision.
    pub hosts: u32,
    /// Hosts that were ready (serving) at the end of the tick.
    pub ready_hosts: u32,
    /// The autoscalers' raw recommendations.
    pub recommended: u32,
    /// Arrivals in the tick, updates/s.
    pub arrivals_per_s: f64,
    /// Updates staged and not yet served at the end of the tick.
    pub backlog: u64,
    /// Hosts added by this tick's decision.
    pub cold_starts: u32,
    /// Cumulative host-seconds.
    pub host_seconds: f64,
    /// Cumulative update bytes served by a host on their own node.
    pub bytes_local: f64,
    /// Cumulative update bytes served across nodes.
    pub bytes_cross: f64,
    /// A limit that held a job back (`ScalingLimited`), if any.
    pub limited: Option<LimitReason>,
    /// Events of this tick.
    pub events: Vec<EventReason>,
}

/// Totals of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The placement strategy.
    pub strategy: String,
    /// Σ hosts × seconds.
    pub host_seconds: f64,
    /// Hosts started.
    pub cold_starts: u64,
    /// Updates in the trace.
    pub updates: u64,
    /// Updates still queued when the run stopped.
    pub unserved: u64,
    /// Median queueing delay, seconds.
    pub delay_p50_s: f64,
    /// 99th-percentile queueing delay, seconds.
    pub delay_p99_s: f64,
    /// Mean queueing delay, seconds.
    pub delay_mean_s: f64,
    /// Fraction of served update bytes folded on the node that staged them.
    pub local_fraction: f64,
    /// Most hosts at once.
    pub peak_hosts: u32,
    /// Seconds with some job in panic mode.
    pub panic_s: f64,
    /// Simulated seconds.
    pub duration_s: f64,
}

/// A run of one strategy.
#[derive(Debug, Clone)]
pub struct Run {
    /// Its totals.
    pub summary: Summary,
    /// One record per tick.
    pub ticks: Vec<TickRecord>,
    /// Every node of the trace, in name order.
    pub nodes: Vec<NodeName>,
    /// Hosts per tick and node (`hosts[tick][node index]`, summed over jobs).
    pub hosts: Vec<Vec<u32>>,
}

/// A staged chunk of updates.
#[derive(Debug, Clone, Copy)]
struct Batch {
    at: f64,
    count: f64,
    bytes_each: f64,
}

/// One job's state.
struct JobSim {
    scaler: Autoscaler,
    queues: BTreeMap<NodeName, VecDeque<Batch>>,
    /// Per node: ready times of its hosts, seconds.
    hosts: BTreeMap<NodeName, Vec<f64>>,
    arrived: BTreeMap<NodeName, f64>,
    min_hosts: u32,
}

/// Delay samples `(seconds, updates)` and byte counters.
#[derive(Default)]
struct Served {
    delays: Vec<(f64, f64)>,
    bytes_local: f64,
    bytes_cross: f64,
}

impl Served {
    fn record(&mut self, at: f64, begin: f64, end: f64, count: f64) {
        for q in [0.125, 0.375, 0.625, 0.875] {
            self.delays.push(((begin + (end - begin) * q - at).max(0.0), count / 4.0));
        }
    }
}

/// Runs `trace` with `spec`, once per strategy in `strategies` (each run starts from zero).
/// `progress(done, total)` is called every few hundred ticks of each run.
///
/// # Errors
/// [`Error::InvalidPolicy`] for an invalid spec, [`Error::InvalidParameter`] for an empty trace
/// or a non-positive bandwidth.
pub fn compare(
    trace: &Trace,
    spec: &ScalingSpec,
    model: &HostModel,
    strategies: &[PlacementStrategy],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Run>> {
    strategies
        .iter()
        .map(|s| {
            let mut spec = spec.clone();
            spec.placement.strategy = *s;
            simulate(trace, &spec, model, progress)
        })
        .collect()
}

/// Runs `trace` through one autoscaler per job with `spec` (see the module docs for the model).
///
/// # Errors
/// As [`compare`].
pub fn simulate(
    trace: &Trace,
    spec: &ScalingSpec,
    model: &HostModel,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Run> {
    spec.validate()?;
    if trace.arrivals.is_empty() {
        return Err(Error::InvalidParameter { name: "trace", reason: "has no rows".to_owned() });
    }
    if !(model.cross_node_bandwidth.is_finite() && model.cross_node_bandwidth > 0.0) {
        return Err(Error::InvalidParameter {
            name: "--cross-node-bandwidth",
            reason: "must be > 0".to_owned(),
        });
    }
    let nodes: Vec<NodeName> =
        trace.arrivals.iter().map(|a| a.node.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let job_names: BTreeSet<&str> = trace.arrivals.iter().map(|a| a.job.as_str()).collect();
    let mut jobs: BTreeMap<&str, JobSim> = BTreeMap::new();
    for job in job_names {
        let sim = JobSim {
            scaler: Autoscaler::new(spec)?,
            queues: BTreeMap::new(),
            hosts: BTreeMap::new(),
            arrived: BTreeMap::new(),
            min_hosts: spec.autoscaling.min_hosts,
        };
        jobs.insert(job, sim);
    }
    let dt = spec.autoscaling.tick_interval.as_secs_f64();
    let rate = spec.autoscaling.target.updates_per_second_per_host;
    let end_limit = trace.end_s() + dt + model.drain_limit.as_secs_f64();
    let expected_ticks = (end_limit / dt).ceil() as u64;
    let mut run =
        Run { summary: empty_summary(spec), ticks: Vec::new(), nodes: nodes.clone(), hosts: Vec::new() };
    let mut served = Served::default();
    let mut next_row = 0;
    let mut tick: u64 = 0;
    let mut totals = (0.0f64, 0u64, 0.0f64); // host-seconds, cold starts, panic seconds
    loop {
        let (start, end) = (tick as f64 * dt, (tick + 1) as f64 * dt);
        while next_row < trace.arrivals.len() && trace.arrivals[next_row].time_s < end {
            let a = &trace.arrivals[next_row];
            if let Some(job) = jobs.get_mut(a.job.as_str()) {
                let bytes_each = if a.updates == 0 { 0.0 } else { a.bytes as f64 / a.updates as f64 };
                job.queues.entry(a.node.clone()).or_default().push_back(Batch {
                    at: a.time_s,
                    count: a.updates as f64,
                    bytes_each,
                });
                *job.arrived.entry(a.node.clone()).or_default() += a.updates as f64;
            }
            next_row += 1;
        }
        for job in jobs.values_mut() {
            serve_tick(job, start, end, rate, model.cross_node_bandwidth, &mut served);
        }
        let record = decide_tick(&mut jobs, &nodes, end, dt, model, &mut totals, &served);
        let row: Vec<u32> = nodes
            .iter()
            .map(|n| jobs.values().map(|j| j.hosts.get(n).map_or(0, |h| h.len() as u32)).sum())
            .collect();
        run.hosts.push(row);
        let drained = next_row == trace.arrivals.len()
            && record.backlog == 0
            && jobs.values().all(|j| j.hosts.values().map(Vec::len).sum::<usize>() as u32 <= j.min_hosts);
        run.ticks.push(record);
        tick += 1;
        if tick.is_multiple_of(256) {
            progress(tick, expected_ticks);
        }
        if drained || end >= end_limit {
            break;
        }
    }
    progress(expected_ticks, expected_ticks);
    finish_summary(&mut run, trace, &served, totals, &jobs);
    Ok(run)
}

fn empty_summary(spec: &ScalingSpec) -> Summary {
    Summary {
        strategy: spec.placement.strategy.as_str().to_owned(),
        host_seconds: 0.0,
        cold_starts: 0,
        updates: 0,
        unserved: 0,
        delay_p50_s: 0.0,
        delay_p99_s: 0.0,
        delay_mean_s: 0.0,
        local_fraction: 0.0,
        peak_hosts: 0,
        panic_s: 0.0,
        duration_s: 0.0,
    }
}

/// Serves one job's queues during `[start, end)`: local first, then spare time across nodes.
fn serve_tick(job: &mut JobSim, start: f64, end: f64, rate: f64, bandwidth: f64, served: &mut Served) {
    let dt = end - start;
    let mut spare_host_seconds = 0.0;
    let mut busy_nodes = Vec::new();
    for (node, ready) in &job.hosts {
        // Effective hosts over the tick (a host that becomes ready mid-tick counts in part).
        let host_seconds: f64 = ready.iter().map(|r| (end - r.max(start)).clamp(0.0, dt)).sum();
        let hosts = host_seconds / dt;
        let queue = job.queues.entry(node.clone()).or_default();
        let mut clock = start;
        while hosts > 0.0 && clock < end {
            let Some(front) = queue.front_mut() else { break };
            let begin = clock.max(front.at);
            if begin >= end {
                break;
            }
            let take = front.count.min((end - begin) * hosts * rate);
            let finish = begin + take / (hosts * rate);
            served.record(front.at, begin, finish, take);
            served.bytes_local += take * front.bytes_each;
            front.count -= take;
            clock = finish;
            if front.count <= 1e-9 {
                queue.pop_front();
            }
        }
        spare_host_seconds += hosts * (end - clock).max(0.0);
        if !queue.is_empty() {
            busy_nodes.push(node.clone());
        }
    }
    for (node, queue) in &job.queues {
        if !queue.is_empty() && job.hosts.get(node).is_none_or(Vec::is_empty) {
            busy_nodes.push(node.clone());
        }
    }
    if spare_host_seconds <= 0.0 || busy_nodes.is_empty() {
        return;
    }
    // Remote service: a pooled server of the spare host time, oldest batches first.
    let pool_hosts = spare_host_seconds / dt;
    let mut heads: Vec<(f64, NodeName)> = Vec::new();
    for node in &busy_nodes {
        if let Some(front) = job.queues.get(node).and_then(|q| q.front()) {
            heads.push((front.at, node.clone()));
        }
    }
    let mut clock = start;
    while clock < end {
        heads.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let Some((_, node)) = heads.first().cloned() else { break };
        let queue = job.queues.entry(node.clone()).or_default();
        let Some(front) = queue.front_mut() else {
            heads.remove(0);
            continue;
        };
        let begin = clock.max(front.at);
        if begin >= end {
            break;
        }
        let cost = 1.0 / rate + front.bytes_each / bandwidth;
        let take = front.count.min((end - begin) * pool_hosts / cost);
        let finish = begin + take * cost / pool_hosts;
        served.record(front.at, begin, finish, take);
        served.bytes_cross += take * front.bytes_each;
        front.count -= take;
        clock = finish;
        if front.count <= 1e-9 {
            queue.pop_front();
        }
        match queue.front() {
            Some(next) => heads[0].0 = next.at,
            None => {
                heads.remove(0);
            }
        }
    }
}

/// Observes every job at `now`, applies its decision, and returns the tick's record.
fn decide_tick(
    jobs: &mut BTreeMap<&str, JobSim>,
    nodes: &[NodeName],
    now: f64,
    dt: f64,
    model: &HostModel,
    totals: &mut (f64, u64, f64),
    served: &Served,
) -> TickRecord {
    let mut record = TickRecord {
        time_s: now,
        panic: false,
        hosts: 0,
        ready_hosts: 0,
        recommended: 0,
        arrivals_per_s: 0.0,
        backlog: 0,
        cold_starts: 0,
        host_seconds: 0.0,
        bytes_local: served.bytes_local,
        bytes_cross: served.bytes_cross,
        limited: None,
        events: Vec::new(),
    };
    for job in jobs.values_mut() {
        // Host-seconds of the tick just served: hosts asked for during it.
        totals.0 += job.hosts.values().map(Vec::len).sum::<usize>() as f64 * dt;
        let observations: Vec<NodeObservation> = nodes
            .iter()
            .map(|n| NodeObservation {
                node: n.clone(),
                arrivals_per_second: job.arrived.get(n).copied().unwrap_or(0.0) / dt,
                backlog: job.queues.get(n).map_or(0.0, |q| q.iter().map(|b| b.count).sum::<f64>()).ceil()
                    as u64,
            })
            .collect();
        job.arrived.clear();
        let current: BTreeMap<NodeName, u32> = job
            .hosts
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(n, h)| (n.clone(), h.len() as u32))
            .collect();
        let obs =
            Observation { now: Duration::from_secs_f64(now), nodes: observations, num_pending: 0, current };
        let decision = job.scaler.tick(&obs);
        for (node, want) in &decision.desired {
            let hosts = job.hosts.entry(node.clone()).or_default();
            let want = *want as usize;
            if want > hosts.len() {
                record.cold_starts += (want - hosts.len()) as u32;
                hosts.resize(want, now + model.cold_start.as_secs_f64());
            } else {
                // Latest-ready first out.
                hosts.sort_by(f64::total_cmp);
                hosts.truncate(want);
            }
        }
        record.panic |= decision.mode == Mode::Panic;
        record.hosts += decision.total;
        record.ready_hosts += job.hosts.values().flatten().filter(|r| **r <= now).count() as u32;
        record.recommended += decision.recommendation;
        record.arrivals_per_s += decision.observed_rate.values().sum::<f64>();
        record.backlog += decision.backlog;
        record.limited = record.limited.or(decision.limited);
        record.events.extend(decision.events.iter().map(|e| e.reason));
    }
    totals.1 += u64::from(record.cold_starts);
    if record.panic {
        totals.2 += dt;
    }
    record.host_seconds = totals.0;
    record
}

fn finish_summary(
    run: &mut Run,
    trace: &Trace,
    served: &Served,
    totals: (f64, u64, f64),
    jobs: &BTreeMap<&str, JobSim>,
) {
    let s = &mut run.summary;
    s.host_seconds = totals.0;
    s.cold_starts = totals.1;
    s.panic_s = totals.2;
    s.updates = trace.arrivals.iter().map(|a| a.updates).sum();
    let left: f64 = jobs.values().flat_map(|j| j.queues.values().flatten()).map(|b| b.count).sum();
    s.unserved = left.ceil() as u64;
    let mut delays = served.delays.clone();
    delays.sort_by(|a, b| a.0.total_cmp(&b.0));
    let weight: f64 = delays.iter().map(|d| d.1).sum();
    s.delay_p50_s = weighted_quantile(&delays, weight, 0.50);
    s.delay_p99_s = weighted_quantile(&delays, weight, 0.99);
    s.delay_mean_s = if weight > 0.0 { delays.iter().map(|d| d.0 * d.1).sum::<f64>() / weight } else { 0.0 };
    let bytes = served.bytes_local + served.bytes_cross;
    s.local_fraction = if bytes > 0.0 { served.bytes_local / bytes } else { 1.0 };
    s.peak_hosts = run.ticks.iter().map(|t| t.hosts).max().unwrap_or(0);
    s.duration_s = run.ticks.last().map_or(0.0, |t| t.time_s);
}

/// The smallest delay whose cumulative weight reaches `q` of the total (samples sorted).
fn weighted_quantile(sorted: &[(f64, f64)], total: f64, q: f64) -> f64 {
    let mut acc = 0.0;
    for (value, w) in sorted {
        acc += w;
        if acc >= q * total - 1e-9 {
            return *value;
        }
    }
    sorted.last().map_or(0.0, |s| s.0)
}

#[cfg(test)]
mod tests;
