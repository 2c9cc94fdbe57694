//! Tests of RFFL (`shoal_functions::rffl`):
//!
//! - every test vector of `algorithms.md` §A.8 (A-1 to A-6), numbers written out, tolerance 1e-6
//!   (§D.6);
//! - robustness: free riders removed soon after the warm-up in a synthetic run, negative
//!   reputations never become negative weights, a non-positive reputation sum is a typed error;
//! - keying by `ClientId`: permuting the cohort gives bit-identical results (also a proptest);
//! - rewards: ties at τ kept, a one-entry layer does not crash, `q ≤ 0` gives zeros;
//! - the `Strategy` adapter (`global + u`, policies, error mapping).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_functions::rffl::{
    pearson, reward_count, sparsify_layer, update_reputations, upload_scale, Mode, Rffl, RfflConfig,
    RfflErrorKind, RfflRound,
};
use shoal_functions::Strategy as _;
use shoal_functions::{
    AggregationPolicy, ClientId, DType, ErrorKind, ModelManifest, Parameters, PartialAggregate, TensorSpec,
};

mod common;
use common::{cid, close, close_all};

/// One f64 tensor of `d` elements (exact arithmetic for the hand-checked vectors).
fn manifest(d: usize) -> Arc<ModelManifest> {
    common::vector_manifest("g", d)
}

/// The test-vector configuration: α = 0.95, Γ = ∞, reference code, warm-up 10.
fn vector_config() -> RfflConfig {
    RfflConfig { gamma: f64::INFINITY, ..RfflConfig::default() }
}

/// Runs one step on `(client, weight, gradient)` triples (single-tensor manifest `m`).
fn step(r: &mut Rffl, m: &Arc<ModelManifest>, cohort: &[(&str, f64, Vec<f64>)]) -> RfflRound {
    try_step(r, m, cohort).unwrap()
}

fn try_step(
    r: &mut Rffl,
    m: &Arc<ModelManifest>,
    cohort: &[(&str, f64, Vec<f64>)],
) -> Result<RfflRound, shoal_functions::rffl::RfflError> {
    let ids: Vec<ClientId> = cohort.iter().map(|(c, _, _)| cid(c)).collect();
    let ps: Vec<Parameters> = cohort
        .iter()
        .map(|(_, _, g)| Parameters::from_f64(Arc::clone(m), std::slice::from_ref(g)).unwrap())
        .collect();
    let views: Vec<_> =
        ps.iter().zip(&ids).zip(cohort).map(|((p, id), (_, w, _))| p.as_update(id, *w)).collect();
    r.step(&views)
}

fn field(
    round: &RfflRound,
    ids: &[&str],
    f: impl Fn(&shoal_functions::rffl::ClientRound) -> f64,
) -> Vec<f64> {
    ids.iter().map(|c| f(round.client(&cid(c)).unwrap())).collect()
}

fn reward_values(round: &RfflRound, c: &str) -> Vec<f64> {
    round.reward(&cid(c)).unwrap().tensor_f64(0)
}

// ---------------------------------------------------------------------------------------------
// §A.8 test vectors
// ---------------------------------------------------------------------------------------------

/// A-1, round 0: s = (0.5, 0.25, 0.25), u⁰ = (1, 1.5, 0.75, 0.75), φ and r⁰ = (19, 17, 15)/51.
/// Round 1: u¹ = (49, 36, 17, 30)/51, φ¹, r¹, q and the code-semantics reward.
#[test]
fn a1_happy_path_over_two_rounds() {
    let m = manifest(4);
    let ids = ["p1", "p2", "p3"];
    let mut r = Rffl::new(vector_config()).unwrap();
    let r0 = step(
        &mut r,
        &m,
        &[
            ("p1", 200.0, vec![1.0, 2.0, 0.0, 1.0]),
            ("p2", 100.0, vec![2.0, 1.0, 1.0, 0.0]),
            ("p3", 100.0, vec![0.0, 1.0, 2.0, 1.0]),
        ],
    );
    close_all(&field(&r0, &ids, |c| c.weight), &[0.5, 0.25, 0.25], "s");
    close_all(r0.aggregate_tensor(0), &[1.0, 1.5, 0.75, 0.75], "u0");
    close(r0.aggregate_norm(), 2.091650, "|u0|");
    close_all(&field(&r0, &ids, |c| c.norm), &[2.449490; 3], "|g|");
    close_all(&field(&r0, &ids, |c| c.contribution), &[0.927105, 0.829515, 0.731925], "phi0");
    close_all(&field(&r0, &ids, |c| c.reputation), &[19.0 / 51.0, 17.0 / 51.0, 15.0 / 51.0], "r0 exact");
    close_all(&field(&r0, &ids, |c| c.reputation), &[0.372549, 0.333333, 0.294118], "r0");
    assert_eq!(r0.threshold(), None, "warm-up: no removal in round 0");

    let r1 = step(
        &mut r,
        &m,
        &[
            ("p1", 200.0, vec![1.0, 1.0, 0.0, 0.0]),
            ("p2", 100.0, vec![0.0, 1.0, 1.0, 0.0]),
            ("p3", 100.0, vec![2.0, 0.0, 0.0, 2.0]),
        ],
    );
    close_all(&field(&r1, &ids, |c| c.weight), &[0.372549, 0.333333, 0.294118], "a1 = r0");
    close_all(r1.aggregate_tensor(0), &[49.0 / 51.0, 36.0 / 51.0, 17.0 / 51.0, 30.0 / 51.0], "u1 exact");
    close_all(r1.aggregate_tensor(0), &[0.960784, 0.705882, 0.333333, 0.588235], "u1");
    close(r1.aggregate_norm(), 1.370587, "|u1|");
    close(r1.aggregate_norm(), 4886f64.sqrt() / 51.0, "|u1| exact");
    close_all(&field(&r1, &ids, |c| c.contribution), &[0.859859, 0.536147, 0.799163], "phi1");
    close_all(
        &field(&r1, &ids, |c| c.contribution),
        &[85.0 / 9772f64.sqrt(), 53.0 / 9772f64.sqrt(), 158.0 / 39088f64.sqrt()],
        "phi1 exact",
    );
    close_all(&field(&r1, &ids, |c| c.reputation), &[0.374533, 0.324106, 0.301361], "r1");
    close_all(&field(&r1, &ids, |c| c.reward_ratio), &[1.0, 0.865360, 0.804631], "q1");
    assert!(r1.removed().is_empty());

    // Code semantics: k' = min(4, 3) = 3, cut-off 0.588235, so the 0.333333 entry is dropped.
    for c in ids {
        close_all(&reward_values(&r1, c), &[0.960784, 0.705882, 0.0, 0.588235], "code reward");
    }
    // Paper semantics: k = ceil(4q) = 4 for every participant, so everyone gets all of u¹.
    for q in field(&r1, &ids, |c| c.reward_ratio) {
        assert_eq!(reward_count(4, q), 4);
        close_all(&sparsify_layer(r1.aggregate_tensor(0), q, Mode::Paper), r1.aggregate_tensor(0), "paper");
    }
}

/// A-1's threshold illustration: with removal active, β = (1/3)/3 = 0.111111 and nobody is
/// removed; the reputations are unchanged.
#[test]
fn a1_threshold_illustration() {
    let cfg = RfflConfig { warmup_rounds: 0, ..vector_config() };
    let prev = [19.0 / 51.0, 17.0 / 51.0, 15.0 / 51.0];
    let phi = [85.0 / 9772f64.sqrt(), 53.0 / 9772f64.sqrt(), 158.0 / 39088f64.sqrt()];
    let u = update_reputations(&cfg, 1, &prev, &[true; 3], &phi).unwrap();
    close(u.threshold.unwrap(), 0.111111, "beta");
    assert!(u.removed.is_empty());
    close_all(&u.reputations, &[0.374533, 0.324106, 0.301361], "r1");
}

/// A-1 with altruism degree 2 (issue #4) applied to r¹: (1, 0.974185, 0.957494).
#[test]
fn a1_altruism_degree_two() {
    let cfg = RfflConfig { altruism_degree: Some(2.0), ..vector_config() };
    let prev = [19.0 / 51.0, 17.0 / 51.0, 15.0 / 51.0];
    let phi = [85.0 / 9772f64.sqrt(), 53.0 / 9772f64.sqrt(), 158.0 / 39088f64.sqrt()];
    let u = update_reputations(&cfg, 1, &prev, &[true; 3], &phi).unwrap();
    close_all(&u.reputations, &[1.0, 0.974185, 0.957494], "altruism r");
    close_all(&u.reward_ratios, &[1.0, 0.974185, 0.957494], "altruism q");
    // The intermediate tanh(2·r/max) = (0.964028, 0.939141, 0.923051).
    let t: Vec<f64> = [1.0, 0.865360, 0.804631].iter().map(|v: &f64| (2.0 * v).tanh()).collect();
    close_all(&t, &[0.964028, 0.939141, 0.923051], "tanh");
}

/// A-2: a sign-flip attacker gets r = q = −2/3, a zero reward, and (unlike the reference code)
/// a zero aggregation weight next round; once removal is active it is removed and ignored.
#[test]
fn a2_sign_flip_attacker_and_negative_reputation() {
    let m = manifest(4);
    let ids = ["p1", "p2", "p3"];
    let g1 = vec![1.0, 2.0, 0.0, 1.0];
    let g2 = vec![2.0, 1.0, 1.0, 0.0];
    let g3: Vec<f64> = g1.iter().map(|v| -v).collect();
    let cohort = [("p1", 100.0, g1.clone()), ("p2", 100.0, g2.clone()), ("p3", 100.0, g3)];
    let mut r = Rffl::new(RfflConfig { warmup_rounds: 1, ..vector_config() }).unwrap();
    let r0 = step(&mut r, &m, &cohort);
    close_all(r0.aggregate_tensor(0), &[2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0], "u = g2/3");
    close_all(&field(&r0, &ids, |c| c.contribution), &[2.0 / 3.0, 1.0, -2.0 / 3.0], "phi");
    close_all(&field(&r0, &ids, |c| c.reputation), &[2.0 / 3.0, 1.0, -2.0 / 3.0], "r");
    close_all(&field(&r0, &ids, |c| c.reward_ratio), &[2.0 / 3.0, 1.0, -2.0 / 3.0], "q");
    assert_eq!(reward_values(&r0, "p3"), vec![0.0; 4], "q < 0 is clamped to 0: zero reward");

    // Round 1, same uploads: the attacker's weight is clamped to 0 (the reference code would use
    // −2/3 and flip −g1 into +2/3·g1).
    let r1 = step(&mut r, &m, &cohort);
    close_all(&field(&r1, &ids, |c| c.weight), &[2.0 / 3.0, 1.0, 0.0], "weights clamped at 0");
    let want: Vec<f64> = g1.iter().zip(&g2).map(|(a, b)| 2.0 / 3.0 * a + b).collect();
    close_all(r1.aggregate_tensor(0), &want, "u1 = 2/3 g1 + g2");
    // Removal is active from round 1: −2/3-ish < β, the attacker is removed.
    assert_eq!(r1.removed(), &[cid("p3")]);
    assert_eq!(r1.client(&cid("p3")).unwrap().reputation, 0.0);
    assert!(!r.participants()[&cid("p3")].reputable);
    assert_eq!(r.participants()[&cid("p3")].removed_in, Some(1));

    // Round 2: its update is ignored, and it stays removed.
    let r2 = step(&mut r, &m, &cohort);
    assert_eq!(r2.ignored(), &[cid("p3")]);
    let c3 = r2.client(&cid("p3")).unwrap();
    assert!(c3.present && !c3.reputable);
    assert_eq!((c3.weight, c3.contribution, c3.reputation), (0.0, 0.0, 0.0));
    assert_eq!(reward_values(&r2, "p3"), vec![0.0; 4]);
}

/// A-2 at t ≥ 10 through the pure reputation step: −2/3 < 1/9, removed.
#[test]
fn a2_removed_at_round_ten() {
    let u = update_reputations(
        &vector_config(),
        10,
        &[2.0 / 3.0, 1.0, -2.0 / 3.0],
        &[true; 3],
        &[0.5, 1.0, -1.0],
    )
    .unwrap();
    assert_eq!(u.removed, vec![2]);
    assert_eq!(u.reputable, vec![true, true, false]);
}

/// A-3: previous r = (0.5, 0.4, 0.1), φ = (0.9, 0.8, −0.2) at t = 10: r̃ = (0.52, 0.42, 0.085),
/// r = (0.507317, 0.409756, 0.082927), β = 1/9 removes participant 3, renormalised
/// (0.553191, 0.446809, 0); next β = 1/6.
#[test]
fn a3_removal_and_renormalisation() {
    let cfg = vector_config();
    let (prev, phi) = ([0.5, 0.4, 0.1], [0.9, 0.8, -0.2]);
    let before = update_reputations(&cfg, 9, &prev, &[true; 3], &phi).unwrap();
    close_all(&before.reputations, &[0.507317, 0.409756, 0.082927], "r before removal");
    close_all(&before.reputations, &[0.52 / 1.025, 0.42 / 1.025, 0.085 / 1.025], "r exact");
    assert!(before.removed.is_empty() && before.threshold.is_none(), "round 9 is in the warm-up");

    let after = update_reputations(&cfg, 10, &prev, &[true; 3], &phi).unwrap();
    close(after.threshold.unwrap(), 0.111111, "beta");
    assert_eq!(after.removed, vec![2]);
    assert_eq!(after.reputable, vec![true, true, false]);
    close_all(&after.reputations, &[0.553191, 0.446809, 0.0], "renormalised r");
    let next = update_reputations(&cfg, 11, &after.reputations, &after.reputable, &[0.9, 0.8, 0.5]).unwrap();
    close(next.threshold.unwrap(), 0.166667, "next beta");
    assert_eq!(next.reputations[2], 0.0, "removed participants stay at 0");
}

/// A-4: layer-wise top-k, code and paper semantics, and the tie example.
#[test]
fn a4_layerwise_top_k() {
    let u = [0.9, -0.8, 0.7, -0.6, 0.5, -0.4, 0.3, -0.2, 0.1, 0.05];
    let code = |q| sparsify_layer(&u, q, Mode::ReferenceCode);
    let paper = |q| sparsify_layer(&u, q, Mode::Paper);
    assert_eq!(reward_count(10, 1.0), 10);
    assert_eq!(code(1.0), vec![0.9, -0.8, 0.7, -0.6, 0.5, -0.4, 0.3, -0.2, 0.1, 0.0], "all except 0.05");
    assert_eq!(paper(1.0), u.to_vec(), "u unchanged");
    let half = vec![0.9, -0.8, 0.7, -0.6, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(reward_count(10, 0.5), 5);
    assert_eq!((code(0.5), paper(0.5)), (half.clone(), half));
    let quarter = vec![0.9, -0.8, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(reward_count(10, 0.25), 3);
    assert_eq!((code(0.25), paper(0.25)), (quarter.clone(), quarter));
    let one = vec![0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(reward_count(10, 0.05), 1);
    assert_eq!((code(0.05), paper(0.05)), (one.clone(), one));
    for q in [0.0, -0.3] {
        assert_eq!(reward_count(10, q), 0);
        assert_eq!((code(q), paper(q)), (vec![0.0; 10], vec![0.0; 10]));
    }
    // Ties: k = 1, cut-off 0.5; the code keeps every tie, the paper (lowest index) keeps one.
    let t = [0.5, -0.5, 0.5, 0.1];
    assert_eq!(sparsify_layer(&t, 0.25, Mode::ReferenceCode), vec![0.5, -0.5, 0.5, 0.0]);
    assert_eq!(sparsify_layer(&t, 0.25, Mode::Paper), vec![0.5, 0.0, 0.0, 0.0]);
}

/// A-5: g = (3, 4, 0, 0), Γ = 0.5: 0.5·g/5.0000001 = (0.29999999, 0.39999999, 0, 0). Paper mode
/// normalises to (0.3, 0.4, 0, 0).
#[test]
fn a5_clipping() {
    let scale = upload_scale(Mode::ReferenceCode, 0.5, 5.0);
    assert_eq!(scale, 0.5 / 5.0000001);
    let m = manifest(4);
    let mut r = Rffl::new(RfflConfig { gamma: 0.5, ..vector_config() }).unwrap();
    let r0 = step(&mut r, &m, &[("solo", 10.0, vec![3.0, 4.0, 0.0, 0.0])]);
    close_all(r0.aggregate_tensor(0), &[0.29999999, 0.39999999, 0.0, 0.0], "clipped");
    assert!((r0.aggregate_tensor(0)[0] - 1.5 / 5.0000001).abs() < 1e-15);
    close(r0.aggregate_norm(), 0.5, "norm about 0.5");
    let c = r0.client(&cid("solo")).unwrap();
    close(c.norm, 5.0, "uploaded norm");
    close(c.contribution, 1.0, "phi");

    let mut p = Rffl::new(RfflConfig { gamma: 0.5, mode: Mode::Paper, ..vector_config() }).unwrap();
    let p0 = step(&mut p, &m, &[("solo", 10.0, vec![3.0, 4.0, 0.0, 0.0])]);
    close_all(p0.aggregate_tensor(0), &[0.3, 0.4, 0.0, 0.0], "normalised");
    // Below Γ: the code leaves it alone, the paper scales it up to Γ.
    assert_eq!(upload_scale(Mode::ReferenceCode, 0.5, 0.1), 1.0);
    close(upload_scale(Mode::Paper, 0.5, 0.1), 5.0, "paper scales up");
    assert_eq!(upload_scale(Mode::Paper, 0.5, 0.0), 1.0, "a zero upload stays zero");
}

/// A-6: standalone (0.80, 0.85, 0.90), collaborative (0.88, 0.90, 0.95): ρ = 0.970725. FedAvg
/// (everyone equal) has no correlation.
#[test]
fn a6_fairness_metric() {
    close(pearson(&[0.80, 0.85, 0.90], &[0.88, 0.90, 0.95]).unwrap(), 0.970725, "rho");
    close(
        pearson(&[0.80, 0.85, 0.90], &[0.88, 0.90, 0.95]).unwrap(),
        0.0035 / (0.005f64 * 0.0026).sqrt(),
        "rho",
    );
    assert_eq!(pearson(&[0.80, 0.85, 0.90], &[0.9, 0.9, 0.9]), None);
    assert_eq!(pearson(&[0.8], &[0.9]), None);
    assert_eq!(pearson(&[0.8, 0.9], &[0.9]), None);
}

// ---------------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------------

/// 8 honest participants (noisy copies of one direction) and 2 free riders (U[-1, 1] vectors),
/// Γ = 1, 20 rounds, 5 000 f32 entries (two tiles): the free riders are removed in round 10,
/// the first round after the warm-up, and every honest participant survives.
#[test]
fn free_riders_are_removed_after_the_warm_up() {
    const D: usize = 5000;
    let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![D])]).unwrap());
    let mut rng = StdRng::seed_from_u64(7);
    let mut dir: Vec<f64> = (0..D).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let n = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
    dir.iter_mut().for_each(|v| *v /= n);
    let noise = (0.75f64 / D as f64).sqrt(); // noise norm about 0.5
    let honest: Vec<ClientId> = (0..8).map(|k| cid(&format!("honest-{k}"))).collect();
    let riders = [cid("rider-a"), cid("rider-b")];
    let mut r = Rffl::new(RfflConfig { gamma: 1.0, ..RfflConfig::default() }).unwrap();
    let mut last = None;
    for t in 0..20u64 {
        let mut updates = Vec::new();
        for _ in &honest {
            let g: Vec<f64> = dir.iter().map(|v| v + rng.gen_range(-noise..noise)).collect();
            updates.push(Parameters::from_f64(Arc::clone(&m), &[g]).unwrap());
        }
        for _ in &riders {
            let g: Vec<f64> = (0..D).map(|_| rng.gen_range(-1.0..1.0)).collect();
            updates.push(Parameters::from_f64(Arc::clone(&m), &[g]).unwrap());
        }
        let views: Vec<_> =
            updates.iter().zip(honest.iter().chain(&riders)).map(|(p, c)| p.as_update(c, 600.0)).collect();
        let round = r.step(&views).unwrap();
        for c in &riders {
            let phi = round.client(c).unwrap().contribution;
            // Nearly orthogonal to u; in round 0 its own share (0.1) of u is the bulk of φ.
            assert!(phi.abs() < 0.2, "round {t}: a random vector is nearly orthogonal to u ({phi})");
        }
        if t < 10 {
            assert!(round.removed().is_empty(), "no removal during the warm-up");
        }
        last = Some(round);
    }
    for c in &riders {
        assert_eq!(r.participants()[c].removed_in, Some(10), "{c} removed right after the warm-up");
        assert_eq!(r.reputation(c), Some(0.0));
    }
    for c in &honest {
        let p = r.participants()[c];
        assert!(p.reputable, "{c} survives");
        assert!((p.reputation - 1.0 / 8.0).abs() < 0.005, "{c}: honest reputations about equal");
    }
    let last = last.unwrap();
    assert_eq!(last.ignored().len(), 2, "the riders' updates are ignored once removed");
    let u = last.aggregate_tensor(0);
    let cos = u.iter().zip(&dir).map(|(a, b)| a * b).sum::<f64>() / last.aggregate_norm();
    assert!(cos > 0.95, "u follows the honest direction ({cos})");
}

/// Σ r̃ ≤ 0 (most of the weight anti-aligned with u) is a typed error, and nothing changes.
#[test]
fn non_positive_reputation_sum_is_an_error() {
    let m = manifest(2);
    let g = vec![1.0, 1.0];
    let neg = vec![-1.0, -1.0];
    let mut r = Rffl::new(vector_config()).unwrap();
    // u = 0.6 g − 0.2 g − 0.2 g = 0.2 g, φ = (1, −1, −1), Σ r̃ = 0.05·(−1) < 0.
    let e = try_step(&mut r, &m, &[("a", 60.0, g), ("b", 20.0, neg.clone()), ("c", 20.0, neg)]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::NonPositiveReputationSum);
    assert_eq!(r.round(), 0, "nothing committed");
    assert!(r.participants().is_empty());
    // Through the Strategy adapter: the crate's "no weighted aggregate" kind.
    let ids = [cid("a"), cid("b"), cid("c")];
    let ps: Vec<Parameters> = [1.0, -1.0, -1.0]
        .iter()
        .map(|&v| Parameters::from_f64(Arc::clone(&m), &[vec![v, v]]).unwrap())
        .collect();
    let views: Vec<_> =
        ps.iter().zip(&ids).zip([60.0, 20.0, 20.0]).map(|((p, c), w)| p.as_update(c, w)).collect();
    let e = r.aggregate_cohort(&views, &Parameters::zeros(Arc::clone(&m))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ZeroTotalWeight);
}

/// Zero-norm uploads score φ = 0, never NaN; an all-zero cohort has u = 0.
#[test]
fn zero_norm_updates_score_zero() {
    let m = manifest(3);
    let mut r = Rffl::new(vector_config()).unwrap();
    let r0 = step(&mut r, &m, &[("a", 1.0, vec![1.0, 0.0, 0.0]), ("z", 1.0, vec![0.0; 3])]);
    assert_eq!(r0.client(&cid("z")).unwrap().contribution, 0.0);
    close(r0.client(&cid("a")).unwrap().contribution, 1.0, "phi a");
    let e = try_step(&mut Rffl::new(vector_config()).unwrap(), &m, &[("z", 1.0, vec![0.0; 3])]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::NonPositiveReputationSum, "all-zero cohort: Σ r̃ = 0");
}

/// NaN uploads (which ingest normally rejects) count as zero uploads and are flagged.
#[test]
fn non_finite_updates_are_zero_uploads() {
    let m = manifest(2);
    let mut r = Rffl::new(vector_config()).unwrap();
    let r0 = step(&mut r, &m, &[("a", 1.0, vec![1.0, 2.0]), ("n", 1.0, vec![f64::NAN, 0.0])]);
    let n = r0.client(&cid("n")).unwrap();
    assert!(n.non_finite);
    assert_eq!(n.contribution, 0.0);
    close_all(r0.aggregate_tensor(0), &[0.5, 1.0], "u = 0.5 a");
    assert!(r0.aggregate_tensor(0).iter().all(|v| v.is_finite()));
}

#[test]
fn input_errors_are_typed() {
    let m = manifest(2);
    let mut r = Rffl::new(vector_config()).unwrap();
    let e = try_step(&mut r, &m, &[("a", 1.0, vec![1.0, 0.0]), ("a", 1.0, vec![0.0, 1.0])]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::DuplicateClient);
    let e = try_step(&mut r, &m, &[("a", -1.0, vec![1.0, 0.0])]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::InvalidWeight);
    let e = try_step(&mut r, &m, &[("a", 0.0, vec![1.0, 0.0])]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::NonPositiveShareSum);
    assert_eq!(r.step(&[]).unwrap_err().kind(), RfflErrorKind::EmptyCohort);
    let other = manifest(3);
    step(&mut r, &m, &[("a", 1.0, vec![1.0, 0.0])]);
    let e = try_step(&mut r, &other, &[("a", 1.0, vec![1.0, 0.0, 0.0])]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::ManifestMismatch);
    // Only unknown clients: nothing reputable to aggregate.
    let e = try_step(&mut r, &m, &[("stranger", 1.0, vec![1.0, 0.0])]).unwrap_err();
    assert_eq!(e.kind(), RfflErrorKind::NoReputableUpdate);
    let round = step(&mut r, &m, &[("a", 1.0, vec![1.0, 0.0]), ("stranger", 1.0, vec![1.0, 0.0])]);
    assert_eq!(round.ignored(), &[cid("stranger")], "unknown clients are ignored after round 0");
    assert_eq!(round.reward(&cid("stranger")).unwrap_err().kind(), RfflErrorKind::UnknownClient);
}

/// A reputable participant absent from a round counts as a zero upload: φ = 0, its reputation
/// decays relative to the others.
#[test]
fn absent_participants_decay() {
    let m = manifest(2);
    let mut r = Rffl::new(vector_config()).unwrap();
    step(&mut r, &m, &[("a", 1.0, vec![1.0, 0.0]), ("b", 1.0, vec![1.0, 0.0])]);
    let r1 = step(&mut r, &m, &[("a", 1.0, vec![1.0, 0.0])]);
    let b = r1.client(&cid("b")).unwrap();
    assert!(!b.present && b.reputable);
    assert_eq!(b.contribution, 0.0);
    // r̃ = (0.95·0.5 + 0.05, 0.95·0.5) = (0.525, 0.475).
    close(b.reputation, 0.475, "r_b");
}

// ---------------------------------------------------------------------------------------------
// Keyed by ClientId
// ---------------------------------------------------------------------------------------------

fn assert_same_round(a: &RfflRound, b: &RfflRound) {
    assert_eq!(a.clients(), b.clients());
    assert_eq!(a.removed(), b.removed());
    assert_eq!(a.ignored(), b.ignored());
    for i in 0..a.manifest().tensors().len() {
        let (x, y) = (a.aggregate_tensor(i), b.aggregate_tensor(i));
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "aggregate bits differ");
    }
}

/// Runs `rounds` (lists of (client, weight, gradient)) on two servers, the second seeing every
/// cohort in the order given by `perm`, and checks the rounds are identical.
fn run_permuted(
    m: &Arc<ModelManifest>,
    cfg: &RfflConfig,
    rounds: &[Vec<(String, f64, Vec<f64>)>],
    seed: u64,
) {
    let mut a = Rffl::new(cfg.clone()).unwrap();
    let mut b = Rffl::new(cfg.clone()).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for cohort in rounds {
        let mut shuffled: Vec<_> = cohort.iter().collect();
        shuffled.shuffle(&mut rng);
        let as_refs = |c: &[&(String, f64, Vec<f64>)]| -> Vec<(String, f64, Vec<f64>)> {
            c.iter().map(|x| (*x).clone()).collect()
        };
        let first: Vec<_> = cohort.iter().map(|(c, w, g)| (c.as_str(), *w, g.clone())).collect();
        let owned = as_refs(&shuffled);
        let second: Vec<_> = owned.iter().map(|(c, w, g)| (c.as_str(), *w, g.clone())).collect();
        match (try_step(&mut a, m, &first), try_step(&mut b, m, &second)) {
            (Ok(x), Ok(y)) => assert_same_round(&x, &y),
            (Err(x), Err(y)) => assert_eq!(x, y),
            (x, y) => panic!("orders disagree: {x:?} vs {y:?}"),
        }
    }
}

/// Participants are keyed by id: with adversaries listed first (the reference code's order,
/// §A.6-1) or last, round-0 weights, reputations and rewards are the same.
#[test]
fn permuting_the_cohort_gives_identical_results() {
    let m = manifest(4);
    let mk = |c: &str, w: f64, g: [f64; 4]| (c.to_string(), w, g.to_vec());
    let round = |s: f64| {
        vec![
            mk("adv-0", 600.0, [-s, 0.5, -0.2, 0.3]),
            mk("honest-0", 300.0, [1.0, 2.0 * s, 0.0, 1.0]),
            mk("honest-1", 150.0, [2.0, 1.0, 1.0 * s, 0.0]),
            mk("honest-2", 50.0, [0.0, 1.0, 2.0, 1.0 * s]),
        ]
    };
    let rounds: Vec<_> = (0..6).map(|t| round(1.0 + 0.1 * t as f64)).collect();
    let cfg = RfflConfig { warmup_rounds: 3, ..vector_config() };
    for seed in 0..5 {
        run_permuted(&m, &cfg, &rounds, seed);
    }
    // And the shares follow the ids, not the positions.
    let mut r = Rffl::new(cfg).unwrap();
    let first: Vec<_> = rounds[0].iter().rev().map(|(c, w, g)| (c.as_str(), *w, g.clone())).collect();
    let r0 = step(&mut r, &m, &first);
    close(r0.client(&cid("adv-0")).unwrap().weight, 600.0 / 1100.0, "adversary share");
    close(r0.client(&cid("honest-2")).unwrap().weight, 50.0 / 1100.0, "honest-2 share");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arrival order never matters, in either mode, over several rounds with removal active.
    #[test]
    fn order_independence(
        d in 1usize..12,
        clients in 2usize..6,
        rounds in 1usize..4,
        paper in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let m = manifest(d);
        let mut rng = StdRng::seed_from_u64(seed);
        let data: Vec<Vec<(String, f64, Vec<f64>)>> = (0..rounds)
            .map(|_| {
                (0..clients)
                    .map(|k| {
                        let g = (0..d).map(|_| rng.gen_range(-2.0..2.0)).collect();
                        (format!("c{k}"), f64::from(rng.gen_range(1u32..1000)), g)
                    })
                    .collect()
            })
            .collect();
        let mode = if paper { Mode::Paper } else { Mode::ReferenceCode };
        let cfg = RfflConfig { mode, gamma: 1.5, warmup_rounds: 1, ..RfflConfig::default() };
        run_permuted(&m, &cfg, &data, seed ^ 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Rewards
// ---------------------------------------------------------------------------------------------

/// Rewards through `RfflRound::reward` on a multi-tensor manifest: ties at τ are kept, a layer
/// with one entry does not crash (and keeps its entry), q ≤ 0 gives zeros, sparsification off
/// gives the whole of u.
#[test]
fn rewards_ties_single_entry_layers_and_zero_ratio() {
    let m = Arc::new(
        ModelManifest::new(vec![
            TensorSpec::new("tied", DType::F64, vec![4]),
            TensorSpec::new("bias", DType::F64, vec![1]),
        ])
        .unwrap(),
    );
    let ids = [cid("a"), cid("b")];
    let a = Parameters::from_f64(Arc::clone(&m), &[vec![0.5, -0.5, 0.5, 0.1], vec![0.3]]).unwrap();
    let b = Parameters::from_f64(Arc::clone(&m), &[vec![0.0, 0.0, 0.0, 0.0], vec![0.0]]).unwrap();
    let mut r = Rffl::new(vector_config()).unwrap();
    // b has no data share and a zero upload: q_b = 0. a has q = 1: code k' = 3 keeps the ties.
    let round = r.step(&[a.as_update(&ids[0], 10.0), b.as_update(&ids[1], 0.0)]).unwrap();
    close_all(round.aggregate_tensor(0), &[0.5, -0.5, 0.5, 0.1], "u");
    let ra = round.reward(&ids[0]).unwrap();
    assert_eq!(ra.tensor_f64(0), vec![0.5, -0.5, 0.5, 0.0], "ties at tau all kept, 0.1 dropped");
    assert_eq!(ra.tensor_f64(1), vec![0.3], "a one-entry layer keeps its entry");
    assert_eq!(round.client(&ids[1]).unwrap().reward_ratio, 0.0);
    let rb = round.reward(&ids[1]).unwrap();
    assert_eq!((rb.tensor_f64(0), rb.tensor_f64(1)), (vec![0.0; 4], vec![0.0]), "q = 0 gives zeros");
    assert_eq!(sparsify_layer(&[0.7], 1.0, Mode::ReferenceCode), vec![0.7]);
    assert_eq!(sparsify_layer(&[0.7], 1.0, Mode::Paper), vec![0.7]);
    assert_eq!(sparsify_layer(&[], 1.0, Mode::ReferenceCode), Vec::<f64>::new());

    let mut plain = Rffl::new(RfflConfig { sparsify: false, ..vector_config() }).unwrap();
    let round = plain.step(&[a.as_update(&ids[0], 10.0), b.as_update(&ids[1], 0.0)]).unwrap();
    assert_eq!(round.reward(&ids[1]).unwrap().tensor_f64(0), vec![0.5, -0.5, 0.5, 0.1]);
}

// ---------------------------------------------------------------------------------------------
// Strategy adapter
// ---------------------------------------------------------------------------------------------

/// `aggregate_cohort` returns global + u (skip tensors keep the global value, max tensors get the
/// maximum delta), keeps the round for rewards, and refuses streaming calls.
#[test]
fn strategy_returns_global_plus_u() {
    let mut specs = vec![
        TensorSpec::new("w", DType::F32, vec![3]),
        TensorSpec::new("frozen", DType::F32, vec![2]),
        TensorSpec::new("steps", DType::I64, vec![]),
    ];
    specs[1].policy = AggregationPolicy::Skip;
    specs[2].policy = AggregationPolicy::Max;
    let m = Arc::new(ModelManifest::new(specs).unwrap());
    let global =
        Parameters::from_f64(Arc::clone(&m), &[vec![1.0, 1.0, 1.0], vec![7.0, 7.0], vec![100.0]]).unwrap();
    let ids = [cid("a"), cid("b")];
    let da = Parameters::from_f64(Arc::clone(&m), &[vec![0.5, 0.0, 0.0], vec![9.0, 9.0], vec![3.0]]).unwrap();
    let db =
        Parameters::from_f64(Arc::clone(&m), &[vec![0.0, 0.25, 0.0], vec![9.0, 9.0], vec![5.0]]).unwrap();
    let mut r = Rffl::new(vector_config()).unwrap();
    assert_eq!(r.mergeability(), shoal_functions::Mergeability::WholeCohort);
    let out = r.aggregate_cohort(&[da.as_update(&ids[0], 1.0), db.as_update(&ids[1], 3.0)], &global).unwrap();
    // u = 0.25·(0.5, 0, 0) + 0.75·(0, 0.25, 0).
    assert_eq!(out.tensor_f64(0), vec![1.125, 1.1875, 1.0]);
    assert_eq!(out.tensor_f64(1), vec![7.0, 7.0], "skip keeps the global value");
    assert_eq!(out.tensor_f64(2), vec![105.0], "max delta added");
    assert_eq!(r.round(), 1);
    let last = r.last_round().unwrap();
    assert_eq!(last.aggregate_tensor(1), &[] as &[f64], "skip tensors are not aggregated");
    assert_eq!(last.reward(&ids[0]).unwrap().tensor_f64(1), vec![0.0, 0.0]);

    let mut p = PartialAggregate::new(Arc::clone(&m));
    assert_eq!(r.fold(&mut p, &da.as_update(&ids[0], 1.0)).unwrap_err().kind(), ErrorKind::NotStreaming);
    assert_eq!(r.finish(&p, &global).unwrap_err().kind(), ErrorKind::NotStreaming);
    let other = manifest(3);
    let e = r.aggregate_cohort(&[da.as_update(&ids[0], 1.0)], &Parameters::zeros(other)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ManifestMismatch);
    assert_eq!(r.round(), 1, "a failed round commits nothing");
}
