//! RFFL and Bristle across nodes (`rffl::twophase`, `bristle::twophase`): the two-phase
//! protocol against the single-node strategies.
//!
//! - property tests: 1, 2, 3 and 5 "nodes" (a random partition of the same cohort, each node's
//!   updates in random order, a new partition every round) over several rounds give the
//!   single-node `aggregate_cohort` result within 1e-6 relative: RFFL in both modes (models,
//!   every participant's scores and reputations, removals, rewards), Bristle with and without
//!   the integrator, over parameters and deltas (models, the selection bit for bit, the
//!   assessments);
//! - the fixed vectors A-1 and A-2 of `algorithms.md` through two and three nodes;
//! - every message crosses a real encoding (`shoal_proto::encode`/`decode`, partials rebuilt
//!   from their parts), and the bytes that cross nodes grow with the cohort only by per-client
//!   scalars, never with the model's size;
//! - messages of another round, duplicated clients and missing dots are typed errors.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_functions::bristle::twophase::{node_distances, node_integrate};
use shoal_functions::bristle::{
    Bristle, BristleConfig, BristleErrorKind, Candidate, ClassAxis, ClassEvaluator, EvaluatorError,
    IntegratorConfig, Prioritizer,
};
use shoal_functions::rffl::twophase::{node_dots, node_uploads};
use shoal_functions::rffl::{Mode, Rffl, RfflConfig, RfflErrorKind};
use shoal_functions::{
    AggregationPolicy, ClientId, DType, ModelManifest, Parameters, PartialAggregate, Strategy, TensorSpec,
    UpdateKind, UpdateView,
};

mod common;
use common::{cid, close, close_all};

/// Bytes that crossed nodes, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    /// Per-client scalar messages and decisions.
    scalars: usize,
    /// Model-sized transfers (partials, RFFL's aggregate), counted as 8 bytes per value.
    models: usize,
}

/// A control message crossing nodes: encoded, counted and decoded as the runtime would.
fn wire<T: Serialize + DeserializeOwned>(msg: &T, t: &mut Traffic) -> T {
    let bytes = shoal_proto::encode(msg);
    t.scalars += bytes.len();
    shoal_proto::decode("two-phase message", &bytes).unwrap()
}

/// A message from the top to each of `nodes` nodes (counted once per node).
fn broadcast<T: Serialize + DeserializeOwned>(msg: &T, nodes: usize, t: &mut Traffic) -> T {
    t.scalars += shoal_proto::encode(msg).len() * nodes.saturating_sub(1);
    wire(msg, t)
}

/// A partial crossing nodes: its parts, rebuilt on the other side.
fn wire_partial(p: &PartialAggregate, t: &mut Traffic) -> PartialAggregate {
    t.models += 8 * p.values().len();
    PartialAggregate::from_parts(
        Arc::clone(p.manifest()),
        p.values().to_vec(),
        p.first_owners().to_vec(),
        p.total_weight(),
        p.count(),
    )
    .unwrap()
}

/// One RFFL round over `nodes` (each node's local updates).
fn rffl_cluster_round(
    top: &mut Rffl,
    m: &Arc<ModelManifest>,
    nodes: &[Vec<UpdateView<'_>>],
    global: &Parameters,
    t: &mut Traffic,
) -> shoal_functions::Result<Parameters> {
    let config = top.config().clone();
    let open = broadcast(&top.round_open(), nodes.len(), t);
    let (mut uploads, mut partials) = (Vec::new(), Vec::new());
    for node in nodes {
        let (u, p) = node_uploads(&config, &open, m, node)?;
        uploads.push(wire(&u, t));
        partials.push(wire_partial(&p, t));
    }
    let collected = top.collect_uploads(m, &uploads, &partials)?;
    let u = collected.aggregate_values();
    let mut dots = Vec::new();
    for node in nodes {
        t.models += 8 * u.len();
        dots.push(wire(&node_dots(&open, m, &u, node)?, t));
    }
    top.finish_dots(collected, &dots, global)
}

/// A random partition of `views` over `k` nodes, each node's updates shuffled.
fn partition<'a>(views: &[UpdateView<'a>], k: usize, rng: &mut StdRng) -> Vec<Vec<UpdateView<'a>>> {
    let mut nodes: Vec<Vec<UpdateView<'a>>> = vec![Vec::new(); k];
    for v in views {
        nodes[rng.gen_range(0..k)].push(*v);
    }
    nodes.iter_mut().for_each(|n| n.shuffle(rng));
    nodes
}

/// `|a − b| ≤ 1e-6 · max(|a|, |b|)` (plus 1e-9 for values that cancel to about 0).
fn rel_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) + 1e-9
}

fn params_close(a: &Parameters, b: &Parameters, what: &str) {
    for i in 0..a.manifest().tensors().len() {
        let (x, y) = (a.tensor_f64(i), b.tensor_f64(i));
        for (e, (p, q)) in x.iter().zip(&y).enumerate() {
            assert!(rel_close(*p, *q), "{what}: tensor {i}[{e}] = {p} (cluster) vs {q} (single node)");
        }
    }
}

/// A manifest with every policy RFFL treats differently: two gradient tensors (f32, f64), a
/// `max` counter, a `first` tensor, a running statistic and a frozen one.
fn rffl_manifest() -> Arc<ModelManifest> {
    let spec =
        |name: &str, dtype, shape: Vec<usize>, policy| TensorSpec { name: name.into(), dtype, shape, policy };
    Arc::new(
        ModelManifest::new(vec![
            spec("conv", DType::F32, vec![3, 5], AggregationPolicy::Mean),
            spec("fc", DType::F64, vec![7], AggregationPolicy::Mean),
            spec("count", DType::F32, vec![2], AggregationPolicy::Max),
            spec("first", DType::F32, vec![2], AggregationPolicy::First),
            spec("bn.running_var", DType::F32, vec![3], AggregationPolicy::Variance),
            spec("frozen", DType::F32, vec![1], AggregationPolicy::Skip),
        ])
        .unwrap(),
    )
}

/// Round `r`'s cohort: honest clients around a common direction, a free rider, sometimes an
/// absent participant and a newcomer (ignored), integer weights.
fn rffl_cohort(
    m: &Arc<ModelManifest>,
    n: usize,
    r: usize,
    rng: &mut StdRng,
) -> (Vec<ClientId>, Vec<Parameters>, Vec<f64>) {
    let direction: Vec<f64> = (0..m.numel()).map(|e| ((e * 7919) % 13) as f64 * 0.1 - 0.6).collect();
    let mut ids = Vec::new();
    let mut ps = Vec::new();
    let mut ws = Vec::new();
    for k in 0..n {
        if r > 0 && k == 1 && rng.gen_bool(0.3) {
            continue; // an absent participant
        }
        let noise = if k == n - 1 { 2.0 } else { 0.2 };
        let flat: Vec<f64> = direction
            .iter()
            .map(|d| if k == n - 1 { 0.0 } else { *d } + rng.gen_range(-noise..noise))
            .collect();
        ids.push(cid(&format!("c{k:02}")));
        ps.push(unflatten(m, &flat));
        ws.push(f64::from(rng.gen_range(1u32..500)));
    }
    if r > 0 && rng.gen_bool(0.5) {
        let flat: Vec<f64> = (0..m.numel()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        ids.push(cid("newcomer"));
        ps.push(unflatten(m, &flat));
        ws.push(10.0);
    }
    (ids, ps, ws)
}

fn unflatten(m: &Arc<ModelManifest>, flat: &[f64]) -> Parameters {
    let values: Vec<Vec<f64>> =
        m.slots().iter().map(|s| flat[s.elem_offset..s.elem_offset + s.numel].to_vec()).collect();
    Parameters::from_f64(Arc::clone(m), &values).unwrap()
}

fn rffl_config(mode: Mode, gamma: f64, altruism: bool) -> RfflConfig {
    RfflConfig {
        mode,
        gamma,
        warmup_rounds: 1,
        altruism_degree: altruism.then_some(2.0),
        ..RfflConfig::default()
    }
}

/// Runs `rounds` rounds on one node and on `k` nodes (a new random partition each round) and
/// compares everything a participant or the operator sees.
fn rffl_agree(config: RfflConfig, n: usize, k: usize, rounds: usize, seed: u64) -> Result<(), TestCaseError> {
    let m = rffl_manifest();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut single, mut cluster) = (Rffl::new(config.clone()).unwrap(), Rffl::new(config).unwrap());
    let (mut g1, mut g2) = (Parameters::zeros(Arc::clone(&m)), Parameters::zeros(Arc::clone(&m)));
    for r in 0..rounds {
        let (ids, ps, ws) = rffl_cohort(&m, n, r, &mut rng);
        let mut views: Vec<UpdateView<'_>> =
            ps.iter().zip(&ids).zip(&ws).map(|((p, c), &w)| p.as_update(c, w)).collect();
        views.shuffle(&mut rng);
        let nodes = partition(&views, k, &mut rng);
        let one = single.aggregate_cohort(&views, &g1);
        let many = rffl_cluster_round(&mut cluster, &m, &nodes, &g2, &mut Traffic::default());
        match (one, many) {
            (Ok(a), Ok(b)) => {
                params_close(&b, &a, &format!("round {r}, {k} nodes"));
                (g1, g2) = (a, b);
            }
            (Err(a), Err(b)) => {
                prop_assert_eq!(a.kind(), b.kind(), "round {}: {} vs {}", r, a, b);
                return Ok(());
            }
            (a, b) => return Err(TestCaseError::fail(format!("round {r}: single {a:?}, cluster {b:?}"))),
        }
        rffl_rounds_close(&single, &cluster, r)?;
    }
    Ok(())
}

fn rffl_rounds_close(single: &Rffl, cluster: &Rffl, r: usize) -> Result<(), TestCaseError> {
    let (a, b) = (single.last_round().unwrap(), cluster.last_round().unwrap());
    prop_assert_eq!(a.removed(), b.removed(), "round {}: removed", r);
    prop_assert_eq!(a.ignored(), b.ignored(), "round {}: ignored", r);
    prop_assert_eq!(a.clients().keys().collect::<Vec<_>>(), b.clients().keys().collect::<Vec<_>>());
    for (c, x) in a.clients() {
        let y = &b.clients()[c];
        prop_assert_eq!((x.present, x.non_finite, x.reputable), (y.present, y.non_finite, y.reputable));
        for (what, p, q) in [
            ("weight", x.weight, y.weight),
            ("norm", x.norm, y.norm),
            ("scale", x.scale, y.scale),
            ("contribution", x.contribution, y.contribution),
            ("reputation", x.reputation, y.reputation),
            ("reward ratio", x.reward_ratio, y.reward_ratio),
        ] {
            prop_assert!(rel_close(p, q), "round {}, {} {}: {} vs {}", r, c, what, p, q);
        }
        params_close(
            &cluster.client_reward(c).unwrap().unwrap(),
            &single.client_reward(c).unwrap().unwrap(),
            &format!("round {r}, reward of {c}"),
        );
    }
    prop_assert_eq!(single.participants().len(), cluster.participants().len());
    Ok(())
}

fn proptest_config() -> ProptestConfig {
    ProptestConfig { cases: 24, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(proptest_config())]

    /// RFFL in reference-code mode (clipping at Γ, or no clipping) and paper mode
    /// (normalisation), with and without the altruism transform, over 5 rounds.
    #[test]
    fn rffl_two_phase_equals_one_node(
        n in 3usize..9,
        k in prop::sample::select(vec![1usize, 2, 3, 5]),
        paper in any::<bool>(),
        clip in any::<bool>(),
        altruism in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let config = match (paper, clip) {
            (true, _) => rffl_config(Mode::Paper, 1.0, altruism),
            (false, true) => rffl_config(Mode::ReferenceCode, 1.0, altruism),
            (false, false) => rffl_config(Mode::ReferenceCode, f64::INFINITY, altruism),
        };
        rffl_agree(config, n, k, 5, seed)?;
    }

    /// Bristle's filter with the weighted mean, with and without the integrator (every node
    /// evaluating its own selected updates), over parameters and deltas, with the α-tertile and
    /// random prioritizers, against the global model or an own model, over 4 rounds.
    #[test]
    fn bristle_two_phase_equals_one_node(
        n in 1usize..16,
        k in prop::sample::select(vec![1usize, 2, 3, 5]),
        delta in any::<bool>(),
        random in any::<bool>(),
        own in any::<bool>(),
        integrator in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let prioritizer = if random { Prioritizer::Random { k: 4 } } else { Prioritizer::AlphaTertiles { alpha: 0.4, beta: 6 } };
        let update_kind = if delta { UpdateKind::Delta } else { UpdateKind::Parameters };
        let config = BristleConfig { prioritizer, seed, update_kind, ..BristleConfig::default() };
        bristle_agree(config, integrator, own, n, k, seed)?;
    }
}

/// A-1 (`algorithms.md` §A.8) through two nodes: r⁰ = (19, 17, 15)/51, r¹ = (0.374533,
/// 0.324106, 0.301361), q¹ = (1, 0.865360, 0.804631), and the code-semantics reward.
#[test]
fn a1_through_two_nodes() {
    let m = common::vector_manifest("g", 4);
    let config = RfflConfig { gamma: f64::INFINITY, ..RfflConfig::default() };
    let mut top = Rffl::new(config).unwrap();
    let ids = [cid("p1"), cid("p2"), cid("p3")];
    let rounds = [
        [[1.0, 2.0, 0.0, 1.0], [2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 2.0, 1.0]],
        [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 2.0]],
    ];
    let weights = [200.0, 100.0, 100.0];
    let mut global = Parameters::zeros(Arc::clone(&m));
    let mut t = Traffic::default();
    for (r, grads) in rounds.iter().enumerate() {
        let ps: Vec<Parameters> =
            grads.iter().map(|g| Parameters::from_f64(Arc::clone(&m), &[g.to_vec()]).unwrap()).collect();
        let views: Vec<UpdateView<'_>> =
            ps.iter().zip(&ids).zip(weights).map(|((p, c), w)| p.as_update(c, w)).collect();
        // p2 alone on one node, p3 and p1 (in that order) on the other.
        let nodes = vec![vec![views[1]], vec![views[2], views[0]]];
        global = rffl_cluster_round(&mut top, &m, &nodes, &global, &mut t).unwrap();
        let reps: Vec<f64> = ids.iter().map(|c| top.reputation(c).unwrap()).collect();
        if r == 0 {
            close_all(&reps, &[19.0 / 51.0, 17.0 / 51.0, 15.0 / 51.0], "r0");
            close_all(&global.tensor_f64(0), &[1.0, 1.5, 0.75, 0.75], "u0");
        } else {
            close_all(&reps, &[0.374533, 0.324106, 0.301361], "r1");
            let round = top.last_round().unwrap();
            let q: Vec<f64> = ids.iter().map(|c| round.client(c).unwrap().reward_ratio).collect();
            close_all(&q, &[1.0, 0.865360, 0.804631], "q1");
            close(round.aggregate_norm(), 1.370587, "|u1|");
            for c in &ids {
                let reward = top.client_reward(c).unwrap().unwrap();
                close_all(
                    &reward.tensor_f64(0),
                    &[0.960784, 0.705882, 0.0, 0.588235],
                    "reward, code semantics",
                );
            }
        }
    }
}

/// A-2 through three nodes: the sign-flip attacker's reputation is −2/3, its reward zero.
#[test]
fn a2_through_three_nodes() {
    let m = common::vector_manifest("g", 4);
    let mut top = Rffl::new(RfflConfig { gamma: f64::INFINITY, ..RfflConfig::default() }).unwrap();
    let grads = [[1.0, 2.0, 0.0, 1.0], [2.0, 1.0, 1.0, 0.0], [-1.0, -2.0, 0.0, -1.0]];
    let ids = [cid("p1"), cid("p2"), cid("p3")];
    let ps: Vec<Parameters> =
        grads.iter().map(|g| Parameters::from_f64(Arc::clone(&m), &[g.to_vec()]).unwrap()).collect();
    let views: Vec<UpdateView<'_>> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 1.0)).collect();
    let nodes: Vec<Vec<UpdateView<'_>>> = views.iter().map(|v| vec![*v]).collect();
    rffl_cluster_round(&mut top, &m, &nodes, &Parameters::zeros(Arc::clone(&m)), &mut Traffic::default())
        .unwrap();
    let reps: Vec<f64> = ids.iter().map(|c| top.reputation(c).unwrap()).collect();
    close_all(&reps, &[2.0 / 3.0, 1.0, -2.0 / 3.0], "r");
    assert_eq!(top.client_reward(&ids[2]).unwrap().unwrap().tensor_f64(0), vec![0.0; 4]);
}

/// Cross-node bytes: the per-client messages grow by a constant per client and do not depend
/// on the model's size; the model-sized transfers are per node.
#[test]
fn rffl_cross_node_bytes_are_per_client_scalars() {
    let measure = |n: usize, numel: usize| -> Traffic {
        let m = common::vector_manifest("g", numel);
        let mut top = Rffl::new(RfflConfig { gamma: 1.0, ..RfflConfig::default() }).unwrap();
        let mut global = Parameters::zeros(Arc::clone(&m));
        let mut t = Traffic::default();
        for r in 0..2 {
            let ps: Vec<Parameters> = (0..n)
                .map(|k| {
                    Parameters::from_f64(
                        Arc::clone(&m),
                        &[(0..numel).map(|e| ((e + k + r) % 5) as f64 + 1.0).collect()],
                    )
                    .unwrap()
                })
                .collect();
            let ids: Vec<ClientId> = (0..n).map(|k| cid(&format!("client-{k:04}"))).collect();
            let views: Vec<UpdateView<'_>> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 50.0)).collect();
            let nodes: Vec<Vec<UpdateView<'_>>> = views.chunks(n.div_ceil(3)).map(<[_]>::to_vec).collect();
            global = rffl_cluster_round(&mut top, &m, &nodes, &global, &mut t).unwrap();
        }
        t
    };
    let (small, big) = (measure(20, 16), measure(20, 4096));
    assert_eq!(small.scalars, big.scalars, "scalar messages do not depend on the model's size");
    let more = measure(40, 4096);
    let per_client_round = (more.scalars - big.scalars) as f64 / 20.0 / 2.0;
    eprintln!("RFFL: {per_client_round} scalar bytes per client per round on 3 nodes (id of 11 bytes)");
    assert!(per_client_round < 200.0, "{per_client_round} bytes per client and round");
    assert_eq!(more.models, big.models, "model-sized transfers are per node (3 nodes), not per client");
}

/// Messages of another round, a client reported by two nodes and a missing dot are refused.
#[test]
fn rffl_protocol_errors_are_typed() {
    let m = common::vector_manifest("g", 3);
    let config = RfflConfig { gamma: 1.0, ..RfflConfig::default() };
    let top = Rffl::new(config.clone()).unwrap();
    let ps: Vec<Parameters> =
        (0..3).map(|k| Parameters::from_f64(Arc::clone(&m), &[vec![1.0, k as f64, 2.0]]).unwrap()).collect();
    let ids: Vec<ClientId> = (0..3).map(|k| cid(&format!("c{k}"))).collect();
    let views: Vec<UpdateView<'_>> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 1.0)).collect();
    let mut open = top.round_open();
    let (u, p) = node_uploads(&config, &open, &m, &views).unwrap();
    let twice = top.collect_uploads(&m, &[u.clone(), u.clone()], &[p.clone(), p.clone()]).unwrap_err();
    assert_eq!(twice.kind(), RfflErrorKind::DuplicateClient);
    open.round = 3;
    let (stale, _) = node_uploads(&config, &open, &m, &views).unwrap();
    assert_eq!(
        top.collect_uploads(&m, &[stale], std::slice::from_ref(&p)).unwrap_err().kind(),
        RfflErrorKind::Protocol
    );
    let mut wrong = u.clone();
    wrong.uploads[0].accepted = false;
    assert_eq!(
        top.collect_uploads(&m, &[wrong], std::slice::from_ref(&p)).unwrap_err().kind(),
        RfflErrorKind::Protocol
    );
    let mut top = top;
    let collected = top.collect_uploads(&m, &[u], &[p]).unwrap();
    let mut dots = node_dots(&top.round_open(), &m, &collected.aggregate_values(), &views).unwrap();
    dots.dots.pop();
    let e = top.finish_dots(collected, &[dots], &Parameters::zeros(Arc::clone(&m))).unwrap_err();
    assert_eq!(e.kind(), shoal_functions::ErrorKind::Strategy, "{e}");
    assert_eq!(top.round(), 0, "nothing committed");
}

// ---------------------------------------------------------------------------------------------
// Bristle
// ---------------------------------------------------------------------------------------------

/// Scores a candidate per class from its output tensor alone (a pure function of the bytes, as
/// every node's copy of a server-held validation split would be).
#[derive(Debug, Clone, Copy)]
struct OutputEvaluator;

impl ClassEvaluator for OutputEvaluator {
    fn class_f1(&mut self, c: &Candidate<'_>) -> Result<Vec<f64>, EvaluatorError> {
        let out = c.tensor_by_name("out").ok_or("no output tensor")?;
        let (rows, classes) = (3, 4);
        Ok((0..classes)
            .map(|k| {
                let col: f64 = (0..rows).map(|r| out.get_f64(r * classes + k)).sum::<f64>() / rows as f64;
                1.0 / (1.0 + (-3.0 * col).exp())
            })
            .collect())
    }
}

fn bristle_manifest() -> Arc<ModelManifest> {
    let spec =
        |name: &str, dtype, shape: Vec<usize>, policy| TensorSpec { name: name.into(), dtype, shape, policy };
    Arc::new(
        ModelManifest::new(vec![
            spec("body", DType::F32, vec![9], AggregationPolicy::Mean),
            spec("out", DType::F64, vec![3, 4], AggregationPolicy::Mean),
            spec("count", DType::I64, vec![], AggregationPolicy::Max),
            spec("bn.running_mean", DType::F32, vec![2], AggregationPolicy::Statistic),
        ])
        .unwrap(),
    )
}

fn integrator_config() -> IntegratorConfig {
    IntegratorConfig {
        familiar_classes: Some(vec![0, 2, 3]),
        compared_classes: Some(2),
        ..IntegratorConfig::new("out", ClassAxis::Columns)
    }
}

/// One Bristle round over `nodes`; each node has its own copy of the evaluator.
fn bristle_cluster_round(
    top: &mut Bristle,
    config: &BristleConfig,
    integrator: bool,
    nodes: &[Vec<UpdateView<'_>>],
    global: &Parameters,
    t: &mut Traffic,
) -> shoal_functions::Result<Parameters> {
    let open = broadcast(&top.round_open(), nodes.len(), t);
    let own = top.own_model().cloned();
    let mut reports = Vec::new();
    for node in nodes {
        reports.push(wire(&node_distances(config, &open, own.as_ref(), global, node)?, t));
    }
    let decision = top.select_distances(global, &reports)?;
    let selection = broadcast(&decision.message(), nodes.len(), t);
    let (mut shares, mut partials) = (Vec::new(), Vec::new());
    let icfg = integrator_config();
    for node in nodes {
        let mut evaluator = OutputEvaluator;
        let plugin = integrator.then_some((&icfg, &mut evaluator as &mut dyn ClassEvaluator));
        let (share, partial) = node_integrate(config, plugin, &selection, global, node)?;
        shares.extend(share.map(|s| wire(&s, t)));
        partials.push(wire_partial(&partial, t));
    }
    Ok(top.finish_integration(decision, global, &partials, &shares)?)
}

fn bristle_strategy(config: &BristleConfig, integrator: bool) -> Bristle {
    if integrator {
        Bristle::with_integrator(config.clone(), integrator_config(), Box::new(OutputEvaluator)).unwrap()
    } else {
        Bristle::new(config.clone()).unwrap()
    }
}

fn bristle_agree(
    config: BristleConfig,
    integrator: bool,
    own: bool,
    n: usize,
    k: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let m = bristle_manifest();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let (mut single, mut cluster) =
        (bristle_strategy(&config, integrator), bristle_strategy(&config, integrator));
    let random = |rng: &mut StdRng, scale: f64| -> Vec<Vec<f64>> {
        m.slots().iter().map(|s| (0..s.numel).map(|_| rng.gen_range(-scale..scale) / 8.0).collect()).collect()
    };
    if own {
        let model = Parameters::from_f64(Arc::clone(&m), &random(&mut rng, 4.0)).unwrap();
        single.set_own_model(Some(model.clone()));
        cluster.set_own_model(Some(model));
    }
    // Both sides start every round from the same global model (the single node's), so that the
    // candidates the evaluators score are the same bytes; the round counters carry over.
    let mut global = Parameters::from_f64(Arc::clone(&m), &random(&mut rng, 4.0)).unwrap();
    for r in 0..4 {
        let ids: Vec<ClientId> = (0..n).map(|j| cid(&format!("peer-{j:02}"))).collect();
        let ps: Vec<Parameters> = (0..n)
            .map(|j| Parameters::from_f64(Arc::clone(&m), &random(&mut rng, 8.0 + j as f64)).unwrap())
            .collect();
        let ws: Vec<f64> = (0..n).map(|_| f64::from(rng.gen_range(1u32..100))).collect();
        let mut views: Vec<UpdateView<'_>> =
            ps.iter().zip(&ids).zip(&ws).map(|((p, c), &w)| p.as_update(c, w)).collect();
        views.shuffle(&mut rng);
        let nodes = partition(&views, k, &mut rng);
        let one = single.aggregate_cohort(&views, &global);
        let many = bristle_cluster_round(
            &mut cluster,
            &config,
            integrator,
            &nodes,
            &global,
            &mut Traffic::default(),
        );
        match (one, many) {
            (Ok(a), Ok(b)) => {
                params_close(&b, &a, &format!("round {r}, {k} nodes"));
                global = a;
            }
            (Err(a), Err(b)) => {
                prop_assert_eq!(a.kind(), b.kind(), "round {}: {} vs {}", r, a, b);
                return Ok(());
            }
            (a, b) => return Err(TestCaseError::fail(format!("round {r}: single {a:?}, cluster {b:?}"))),
        }
        let (a, b) = (single.last_round().unwrap(), cluster.last_round().unwrap());
        prop_assert_eq!(&a.selection, &b.selection, "round {}: the selection, bit for bit", r);
        prop_assert_eq!(&a.reference_f1, &b.reference_f1);
        prop_assert_eq!(&a.assessments, &b.assessments, "round {}: assessments", r);
        prop_assert_eq!(single.round(), cluster.round());
    }
    Ok(())
}

/// Cross-node bytes of Bristle: per client, the distance (phase 1) and, with the integrator,
/// the selected ones' F1 (phase 2); nothing grows with the model.
#[test]
fn bristle_cross_node_bytes_are_per_client_scalars() {
    let measure = |n: usize| -> Traffic {
        let m = bristle_manifest();
        let config = BristleConfig { prioritizer: Prioritizer::All, ..BristleConfig::default() };
        let mut top = bristle_strategy(&config, true);
        let ps: Vec<Parameters> = (0..n)
            .map(|j| {
                Parameters::from_f64(
                    Arc::clone(&m),
                    &m.slots().iter().map(|s| vec![(j % 7) as f64 * 0.1; s.numel]).collect::<Vec<_>>(),
                )
                .unwrap()
            })
            .collect();
        let ids: Vec<ClientId> = (0..n).map(|j| cid(&format!("client-{j:04}"))).collect();
        let views: Vec<UpdateView<'_>> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 1.0)).collect();
        let nodes: Vec<Vec<UpdateView<'_>>> = views.chunks(n.div_ceil(3)).map(<[_]>::to_vec).collect();
        let mut t = Traffic::default();
        bristle_cluster_round(&mut top, &config, true, &nodes, &Parameters::zeros(Arc::clone(&m)), &mut t)
            .unwrap();
        t
    };
    let (a, b) = (measure(30), measure(60));
    let per_client = (b.scalars - a.scalars) as f64 / 30.0;
    eprintln!(
        "Bristle: {per_client} scalar bytes per client per round on 3 nodes, all selected, 4 classes (id of 11 bytes)"
    );
    assert!(per_client < 200.0, "{per_client}");
    assert_eq!(a.models, b.models, "partials are per node");
}

/// Bristle's protocol checks: another round's distances, a client on two nodes, partials that
/// miss a selected update.
#[test]
fn bristle_protocol_errors_are_typed() {
    let m = bristle_manifest();
    let config = BristleConfig { prioritizer: Prioritizer::All, ..BristleConfig::default() };
    let mut top = Bristle::new(config.clone()).unwrap();
    let global = Parameters::zeros(Arc::clone(&m));
    let ps: Vec<Parameters> = (0..3)
        .map(|j| {
            Parameters::from_f64(
                Arc::clone(&m),
                &m.slots().iter().map(|s| vec![j as f64; s.numel]).collect::<Vec<_>>(),
            )
            .unwrap()
        })
        .collect();
    let ids: Vec<ClientId> = (0..3).map(|j| cid(&format!("p{j}"))).collect();
    let views: Vec<UpdateView<'_>> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 1.0)).collect();
    let mut open = top.round_open();
    let d = node_distances(&config, &open, None, &global, &views).unwrap();
    assert_eq!(
        top.select_distances(&global, &[d.clone(), d.clone()]).unwrap_err().kind(),
        BristleErrorKind::DuplicateClient
    );
    open.round = 1;
    let stale = node_distances(&config, &open, None, &global, &views).unwrap();
    assert_eq!(top.select_distances(&global, &[stale]).unwrap_err().kind(), BristleErrorKind::Protocol);
    let decision = top.select_distances(&global, &[d]).unwrap();
    let (_, partial) = node_integrate(&config, None, &decision.message(), &global, &views[..2]).unwrap();
    let e = top.finish_integration(decision, &global, &[partial], &[]).unwrap_err();
    assert_eq!(e.kind(), BristleErrorKind::Protocol, "{e}");
    assert_eq!(top.round(), 0, "nothing committed");
}
