//! Arrival traces: CSV `time_s,node,job,updates,bytes` (one row per node, job and time bin),
//! their parser and writer, and a generator of synthetic FL workloads.
//!
//! A row says that `updates` client updates of `job`, `bytes` bytes in all, were staged on
//! `node` at `time_s` seconds from the start of the trace. Rows may come in any order.

use std::fmt::Write as _;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};

use crate::error::{Error, Result};
use crate::node::NodeName;

/// The CSV header.
pub const HEADER: &str = "time_s,node,job,updates,bytes";

/// One row of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    /// Seconds from the start of the trace (finite, ≥ 0).
    pub time_s: f64,
    /// Where the updates were staged.
    pub node: NodeName,
    /// The job (1–64 characters from `[A-Za-z0-9_-]`, Shoal's job-id rule).
    pub job: String,
    /// Number of client updates.
    pub updates: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// A trace, sorted by time (then node, then job).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trace {
    /// The rows.
    pub arrivals: Vec<Arrival>,
}

fn valid_job(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Trace {
    /// Builds a trace from rows in any order.
    pub fn new(mut arrivals: Vec<Arrival>) -> Self {
        arrivals
            .sort_by(|a, b| a.time_s.total_cmp(&b.time_s).then(a.node.cmp(&b.node)).then(a.job.cmp(&b.job)));
        Trace { arrivals }
    }

    /// Parses the CSV text of a trace (a header line first; blank lines and `#` comments
    /// allowed).
    ///
    /// # Errors
    /// [`Error::Trace`] with the line number for a wrong header, a wrong column count, a
    /// negative or non-finite time, an invalid node or job, or a non-integer count.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
        let bad = |line: usize, reason: String| Error::Trace { line: line + 1, reason };
        match lines.next() {
            Some((_, header)) if header.trim() == HEADER => {}
            Some((i, header)) => return Err(bad(i, format!("header {header:?}, expected {HEADER:?}"))),
            None => return Err(bad(0, format!("empty trace, expected the header {HEADER:?}"))),
        }
        let mut arrivals = Vec::new();
        for (i, line) in lines {
            let cols: Vec<&str> = line.split(',').map(str::trim).collect();
            let [time, node, job, updates, bytes] = cols[..] else {
                return Err(bad(i, format!("{} columns, expected 5", cols.len())));
            };
            let time_s: f64 = time.parse().map_err(|_| bad(i, format!("time_s {time:?} is not a number")))?;
            if !time_s.is_finite() || time_s < 0.0 {
                return Err(bad(i, format!("time_s {time} must be finite and >= 0")));
            }
            let node = NodeName::new(node).map_err(|e| bad(i, e.to_string()))?;
            if !valid_job(job) {
                return Err(bad(i, format!("job {job:?}: use 1-64 characters from [A-Za-z0-9_-]")));
            }
            let updates: u64 =
                updates.parse().map_err(|_| bad(i, format!("updates {updates:?} is not a count")))?;
            let bytes: u64 = bytes.parse().map_err(|_| bad(i, format!("bytes {bytes:?} is not a count")))?;
            arrivals.push(Arrival { time_s, node, job: job.to_owned(), updates, bytes });
        }
        Ok(Trace::new(arrivals))
    }

    /// Reads and parses a trace file.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Trace::parse`]'s errors.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Trace::parse(&text)
    }

    /// The CSV text of the trace.
    pub fn to_csv(&self) -> String {
        let mut out = String::with_capacity(32 * (self.arrivals.len() + 1));
        out.push_str(HEADER);
        out.push('\n');
        for a in &self.arrivals {
            let _ = writeln!(out, "{},{},{},{},{}", a.time_s, a.node, a.job, a.updates, a.bytes);
        }
        out
    }

    /// Time of the last row (0 for an empty trace).
    pub fn end_s(&self) -> f64 {
        self.arrivals.last().map_or(0.0, |a| a.time_s)
    }
}

/// Workload shapes of [`generate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceKind {
    /// Arrivals spread evenly over each round (asynchronous FL, FedBuff-like): constant rate.
    Steady,
    /// Synchronous rounds whose clients all report within `jitter` seconds of the round start
    /// (LIFL's arrival jitter U[0, N] s, N ∈ {5, 30, 60}; default 5).
    Bursty,
    /// Rounds with 30 s jitter whose participation follows one sine period over the trace
    /// (10 %–100 % of the clients per round): a day of phones charging at night.
    Diurnal,
    /// 90 % of the clients within 10 s of the round start, 10 % late (10 s + exponential,
    /// mean 15 s, cut at the round's end).
    Stragglers,
    /// 30 s jitter, with 30 % of every round's clients staged on one node.
    HotNode,
}

/// Parameters of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorParams {
    /// The shape.
    pub kind: TraceKind,
    /// Number of nodes (`node-000`...).
    pub nodes: u32,
    /// Clients reporting per round (the peak for `diurnal`).
    pub clients_per_round: u32,
    /// Number of rounds.
    pub rounds: u32,
    /// Seed of the generator (same seed, same trace).
    pub seed: u64,
    /// Seconds between round starts.
    pub round_interval_s: f64,
    /// Size of one client update in bytes (44.8 MB: ResNet-18, LIFL's small workload).
    pub update_bytes: u64,
    /// Zipf exponent of how clients spread over nodes (0 = evenly; 1 = node i gets ∝ 1/i).
    pub node_skew: f64,
    /// The job name in the trace.
    pub job: String,
    /// Width of a time bin in seconds (rows are aggregated per bin, node and job).
    pub bin_s: f64,
    /// `bursty`'s arrival jitter N: offsets U[0, N] s from the round start (capped at the
    /// round interval).
    pub jitter_s: f64,
}

impl Default for GeneratorParams {
    fn default() -> Self {
        GeneratorParams {
            kind: TraceKind::Steady,
            nodes: 100,
            clients_per_round: 10_000,
            rounds: 10,
            seed: 1,
            round_interval_s: 60.0,
            update_bytes: 44_800_000,
            node_skew: 0.5,
            job: "job-a".to_owned(),
            bin_s: 1.0,
            jitter_s: 5.0,
        }
    }
}

/// Generates a synthetic trace: every round, each client is staged on a node drawn from a
/// Zipf-like popularity (`node_skew`; for `hot-node` one node also takes 30 % of the clients) and
/// arrives at an offset from the round start drawn from the kind's jitter.
///
/// # Errors
/// [`Error::InvalidParameter`] for zero nodes, rounds or clients, a non-positive interval or
/// bin, or an invalid job name.
pub fn generate(p: &GeneratorParams) -> Result<Trace> {
    let invalid = |name, reason: &str| Err(Error::InvalidParameter { name, reason: reason.to_owned() });
    if p.nodes == 0 || p.nodes > 100_000 {
        return invalid("--nodes", "must be 1..100000");
    }
    if p.rounds == 0 || p.clients_per_round == 0 {
        return invalid("--rounds/--clients-per-round", "must be at least 1");
    }
    if !(p.round_interval_s > 0.0 && p.bin_s > 0.0 && p.round_interval_s.is_finite() && p.bin_s.is_finite()) {
        return invalid("--round-interval/--bin", "must be finite and > 0");
    }
    if !(p.jitter_s.is_finite() && p.jitter_s > 0.0) {
        return invalid("--jitter", "must be finite and > 0");
    }
    if !(p.node_skew.is_finite() && p.node_skew >= 0.0 && valid_job(&p.job)) {
        return invalid("--skew/--job", "skew must be >= 0 and the job 1-64 characters from [A-Za-z0-9_-]");
    }
    let width = p.nodes.saturating_sub(1).to_string().len().max(3);
    let names: Vec<NodeName> =
        (0..p.nodes).map(|i| NodeName::new(format!("node-{i:0width$}"))).collect::<Result<_>>()?;
    // Cumulative node popularity, node i ∝ 1 / (i + 1)^skew.
    let mut cumulative: Vec<f64> = Vec::with_capacity(names.len());
    let mut acc = 0.0;
    for i in 0..p.nodes {
        acc += 1.0 / f64::from(i + 1).powf(p.node_skew);
        cumulative.push(acc);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let late =
        Exp::new(1.0 / 15.0).map_err(|e| Error::InvalidParameter { name: "kind", reason: e.to_string() })?;
    let mut bins: std::collections::BTreeMap<(u64, usize), u64> = std::collections::BTreeMap::new();
    for round in 0..p.rounds {
        let start = f64::from(round) * p.round_interval_s;
        let phase = std::f64::consts::TAU * f64::from(round) / f64::from(p.rounds);
        let clients = match p.kind {
            TraceKind::Diurnal => {
                (f64::from(p.clients_per_round) * (0.55 - 0.45 * phase.cos())).round() as u32
            }
            _ => p.clients_per_round,
        };
        for _ in 0..clients {
            let node = if p.kind == TraceKind::HotNode && rng.gen_bool(0.3) {
                0
            } else {
                let x = rng.gen_range(0.0..acc);
                cumulative.partition_point(|c| *c <= x).min(names.len() - 1)
            };
            let offset = match p.kind {
                TraceKind::Steady => rng.gen_range(0.0..p.round_interval_s),
                TraceKind::Bursty => rng.gen_range(0.0..p.jitter_s.min(p.round_interval_s)),
                TraceKind::Diurnal | TraceKind::HotNode => {
                    rng.gen_range(0.0..30.0f64.min(p.round_interval_s))
                }
                TraceKind::Stragglers if rng.gen_bool(0.9) => {
                    rng.gen_range(0.0..10.0f64.min(p.round_interval_s))
                }
                TraceKind::Stragglers => (10.0f64 + late.sample(&mut rng)).min(p.round_interval_s * 0.999),
            };
            let bin = ((start + offset) / p.bin_s).floor() as u64;
            *bins.entry((bin, node)).or_default() += 1;
        }
    }
    let arrivals = bins
        .into_iter()
        .map(|((bin, node), updates)| Arrival {
            time_s: bin as f64 * p.bin_s,
            node: names[node].clone(),
            job: p.job.clone(),
            updates,
            bytes: updates * p.update_bytes,
        })
        .collect();
    Ok(Trace::new(arrivals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_write_round_trip() {
        let text =
            "time_s,node,job,updates,bytes\n# a comment\n1.5,node-b,job-a,3,300\n0,node-a,job-a,1,100\n\n";
        let trace = Trace::parse(text).unwrap();
        assert_eq!(trace.arrivals.len(), 2);
        assert_eq!(trace.arrivals[0].node.as_str(), "node-a", "sorted by time");
        assert_eq!(trace.end_s(), 1.5);
        assert_eq!(Trace::parse(&trace.to_csv()).unwrap(), trace);
    }

    #[test]
    fn parse_errors_name_the_line() {
        for (text, line) in [
            ("time,node,job,updates,bytes\n", 1),
            ("time_s,node,job,updates,bytes\n0,node-a,job-a,1\n", 2),
            ("time_s,node,job,updates,bytes\n0,node-a,job-a,1,1\n-1,node-a,job-a,1,1\n", 3),
            ("time_s,node,job,updates,bytes\n0,Node_A,job-a,1,1\n", 2),
            ("time_s,node,job,updates,bytes\n0,node-a,job a,1,1\n", 2),
            ("time_s,node,job,updates,bytes\n0,node-a,job-a,1.5,1\n", 2),
            ("time_s,node,job,updates,bytes\nNaN,node-a,job-a,1,1\n", 2),
        ] {
            match Trace::parse(text) {
                Err(Error::Trace { line: got, .. }) => assert_eq!(got, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn generator_counts_clients_and_is_seeded() {
        let p =
            GeneratorParams { nodes: 10, clients_per_round: 500, rounds: 3, ..GeneratorParams::default() };
        let trace = generate(&p).unwrap();
        let total: u64 = trace.arrivals.iter().map(|a| a.updates).sum();
        assert_eq!(total, 1_500);
        assert!(trace.arrivals.iter().all(|a| a.bytes == a.updates * 44_800_000));
        assert_eq!(generate(&p).unwrap(), trace, "same seed, same trace");
        assert_ne!(generate(&GeneratorParams { seed: 2, ..p.clone() }).unwrap(), trace);
        // Bursty: every arrival within 5 s of its round start.
        let bursty = generate(&GeneratorParams { kind: TraceKind::Bursty, ..p.clone() }).unwrap();
        assert!(bursty.arrivals.iter().all(|a| a.time_s % 60.0 < 5.0));
        // Hot node: node-000 holds at least 30 % minus sampling noise (expected 30 % + its
        // Zipf share of the remaining 70 %).
        let hot = generate(&GeneratorParams { kind: TraceKind::HotNode, ..p }).unwrap();
        let on_hot: u64 =
            hot.arrivals.iter().filter(|a| a.node.as_str() == "node-000").map(|a| a.updates).sum();
        assert!(on_hot as f64 > 0.3 * 1_500.0, "{on_hot}");
    }

    #[test]
    fn diurnal_participation_follows_the_sine() {
        // Round r of R has round(C × (0.55 − 0.45 cos(2π r / R))) clients: R = 4, C = 1000 →
        // 100, 550, 1000, 550.
        let p = GeneratorParams {
            kind: TraceKind::Diurnal,
            nodes: 5,
            clients_per_round: 1_000,
            rounds: 4,
            ..GeneratorParams::default()
        };
        let trace = generate(&p).unwrap();
        let per_round: Vec<u64> = (0..4)
            .map(|r| {
                let (lo, hi) = (60.0 * f64::from(r), 60.0 * f64::from(r + 1));
                trace.arrivals.iter().filter(|a| a.time_s >= lo && a.time_s < hi).map(|a| a.updates).sum()
            })
            .collect();
        assert_eq!(per_round, vec![100, 550, 1_000, 550]);
    }
}
