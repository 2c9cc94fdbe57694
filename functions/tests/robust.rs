//! Tests of the robust strategies (`shoal_functions::robust`):
//!
//! - Flower's numeric cross-check vectors #14-#25 (flower.md §5.1), with the expected numbers
//!   written out and derived by hand in comments;
//! - bug-cases.md row 11 (one site scaling its update ×1000): the robust rules stay within ε of
//!   the honest statistics, FedAvg does not;
//! - configuration and cohort-size validation of every constructor, and the runtime errors;
//! - per-tensor policies (`max`/`first`/`skip`, integer and 16-bit float tensors);
//! - properties (proptest, <= 64 cases, small sizes): order independence, agreement with a plain
//!   sorting reference written here (copies into `Vec<Vec<f64>>` and sorts), and the Gram-form
//!   Krum distances against naive pairwise distances.
//!
//! Flower vector #16 (median on NaN, 1, 2 gives NaN) has no test: NaN cannot reach a strategy,
//! because `tensor::stage_update` rejects non-finite floats at ingest (`ValidationError::NonFinite`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_functions::robust::{
    pairwise_sq_distances, Bulyan, CoordinateMedian, Krum, RobustConfigError, RobustConfigKind, TrimmedMean,
    COHORT_TOO_SMALL, NETWORK_MAX,
};
use shoal_functions::Strategy as _;
use shoal_functions::{
    AggregationPolicy, ClientId, DType, Error, ErrorKind, FedAvg, Mergeability, ModelManifest, Parameters,
    PartialAggregate, TensorSpec, UpdateView,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type DynStrategy = Box<dyn shoal_functions::Strategy>;

fn cid(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

/// `client-000`, `client-001`, ...: the ids sort like their index.
fn client(k: usize) -> ClientId {
    ClientId::new(format!("client-{k:03}")).unwrap()
}

fn manifest(specs: Vec<TensorSpec>) -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(specs).unwrap())
}

/// A one-scalar f32 model (Flower's "scalars" vectors).
fn scalar_manifest() -> Arc<ModelManifest> {
    manifest(vec![TensorSpec::new("x", DType::F32, vec![])])
}

fn params(m: &Arc<ModelManifest>, values: &[Vec<f64>]) -> Parameters {
    Parameters::from_f64(Arc::clone(m), values).unwrap()
}

fn views<'a>(ps: &'a [Parameters], ids: &'a [ClientId], weights: &[f64]) -> Vec<UpdateView<'a>> {
    ps.iter().zip(ids).zip(weights).map(|((p, c), &w)| p.as_update(c, w)).collect()
}

/// Aggregates scalar updates `values` (ids `client-000`.. in that order, weights given).
fn scalar_run(s: &mut dyn shoal_functions::Strategy, values: &[f64], weights: &[f64]) -> f64 {
    let m = scalar_manifest();
    let ps: Vec<Parameters> = values.iter().map(|&v| params(&m, &[vec![v]])).collect();
    let ids: Vec<ClientId> = (0..values.len()).map(client).collect();
    let out = s.aggregate_cohort(&views(&ps, &ids, weights), &Parameters::zeros(Arc::clone(&m))).unwrap();
    out.tensor_f64(0)[0]
}

fn ones(n: usize) -> Vec<f64> {
    vec![1.0; n]
}

// ---------------------------------------------------------------------------------------------
// Flower cross-check vectors (flower.md §5.1)
// ---------------------------------------------------------------------------------------------

/// A = [[1,2],[[0]]], B = [[3,6],[[4]]], C = [[5,10],[[8]]] (float32), as in flower.md §5.1.
fn flower_abc() -> (Arc<ModelManifest>, Vec<Parameters>) {
    let m = manifest(vec![
        TensorSpec::new("l0", DType::F32, vec![2]),
        TensorSpec::new("l1", DType::F32, vec![1, 1]),
    ]);
    let ps = vec![
        params(&m, &[vec![1.0, 2.0], vec![0.0]]),
        params(&m, &[vec![3.0, 6.0], vec![4.0]]),
        params(&m, &[vec![5.0, 10.0], vec![8.0]]),
    ];
    (m, ps)
}

/// #14: median of A (n=1), B (n=100), C (n=1) is B = [[3,6],[[4]]]: weights are ignored.
#[test]
fn flower_14_median_ignores_weights() {
    let (m, ps) = flower_abc();
    let ids = [cid("a"), cid("b"), cid("c")];
    let mut s = CoordinateMedian::new(3).unwrap();
    let out = s.aggregate_cohort(&views(&ps, &ids, &[1.0, 100.0, 1.0]), &Parameters::zeros(m)).unwrap();
    assert_eq!(out.tensor_f64(0), vec![3.0, 6.0]);
    assert_eq!(out.tensor_f64(1), vec![4.0]);
}

/// #15: median of A and B (even count) is the mean of the middle pair: [[2,4],[[2]]].
#[test]
fn flower_15_median_of_two_is_the_midpoint() {
    let (m, ps) = flower_abc();
    let ids = [cid("a"), cid("b")];
    let mut s = CoordinateMedian::new(2).unwrap();
    let out = s.aggregate_cohort(&views(&ps[..2], &ids, &[1.0, 1.0]), &Parameters::zeros(m)).unwrap();
    assert_eq!(out.tensor_f64(0), vec![2.0, 4.0]);
    assert_eq!(out.tensor_f64(1), vec![2.0]);
}

/// #17: β = 0.2 on 1, 2, 3, 4, 100: ⌊0.2·5⌋ = 1 value cut at each end (1 and 100), mean of
/// 2, 3, 4 = 3.0.
#[test]
fn flower_17_trimmed_mean() {
    let mut s = TrimmedMean::new(0.2, 5).unwrap();
    assert_eq!(s.trim_count(5), 1);
    assert_eq!(scalar_run(&mut s, &[1.0, 2.0, 3.0, 4.0, 100.0], &ones(5)), 3.0);
    // With k = 2, ⌊0.4⌋ = 0: nothing is cut, the plain mean (flower.md §5 table).
    let mut s = TrimmedMean::new(0.2, 2).unwrap();
    assert_eq!(scalar_run(&mut s, &[1.0, 4.0], &ones(2)), 2.5);
}

/// #18: β = 0.5 is refused (and so is anything outside [0, 0.5) or non-finite).
#[test]
fn flower_18_trimmed_mean_beta_half_is_a_config_error() {
    for beta in [0.5, 0.7, -0.1, f64::NAN, f64::INFINITY] {
        let e = TrimmedMean::new(beta, 5).unwrap_err();
        assert_eq!(e.kind(), RobustConfigKind::BetaOutOfRange, "beta {beta}");
    }
    assert!(TrimmedMean::new(0.0, 1).is_ok());
    assert!(TrimmedMean::new(0.499, 1).is_ok());
}

/// #19: Krum f = 1 on 1, 2, 3, 4, 100. n = 5, each score sums the n − f − 2 = 2 smallest
/// squared distances to the others:
///   1: {1, 4, 9, 9801} → 1 + 4 = 5      2: {1, 1, 4, 9604} → 1 + 1 = 2
///   3: {4, 1, 1, 9409} → 1 + 1 = 2      4: {9, 4, 1, 9216} → 1 + 4 = 5
///   100: 9216 + 9409 = 18625.
/// 2 and 3 tie at 2. Flower takes the lowest list position; Shoal the lowest `ClientId`, which is
/// the update holding 2 when ids follow the values' order: 2.0.
#[test]
fn flower_19_krum_ties_go_to_the_lowest_client_id() {
    let values = [1.0, 2.0, 3.0, 4.0, 100.0];
    let mut s = Krum::new(1, 0, 5).unwrap();
    assert_eq!(scalar_run(&mut s, &values, &ones(5)), 2.0);

    // The tie rule follows the ids, not the cohort order: reversed cohort order, same answer...
    let m = scalar_manifest();
    let ps: Vec<Parameters> = values.iter().map(|&v| params(&m, &[vec![v]])).collect();
    let ids: Vec<ClientId> = (0..5).map(client).collect();
    let mut vs = views(&ps, &ids, &ones(5));
    vs.reverse();
    let out = s.aggregate_cohort(&vs, &Parameters::zeros(Arc::clone(&m))).unwrap();
    assert_eq!(out.tensor_f64(0), vec![2.0]);
    assert_eq!(s.select(&vs).unwrap(), vec![3], "position of the update holding 2 in the reversed slice");

    // ...and if the update holding 3 has the lower id, it wins.
    let swapped = [client(0), client(2), client(1), client(3), client(4)];
    let out = s.aggregate_cohort(&views(&ps, &swapped, &ones(5)), &Parameters::zeros(m)).unwrap();
    assert_eq!(out.tensor_f64(0), vec![3.0]);
}

/// #20: Multi-Krum f = 1, m = 3 on 1..5 with num_examples 1..5. Scores as in #19 (1: 5, 2: 2,
/// 3: 2, 4: 5, 100: 18625); the three best are 2, 3 and then 1 (tie with 4, lower id), so the
/// result is FedAvg of {1, 2, 3} with weights {1, 2, 3}: (1·1 + 2·2 + 3·3) / 6 = 14/6 = 2.3333,
/// stored as the f32 nearest to 7/3.
#[test]
fn flower_20_multi_krum_is_the_weighted_mean_of_the_best() {
    let mut s = Krum::new(1, 3, 5).unwrap();
    let got = scalar_run(&mut s, &[1.0, 2.0, 3.0, 4.0, 100.0], &[1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(got, f64::from(2.333_333_3_f32));
    assert_eq!(got, 2.3333332538604736);
}

/// #21: Bulyan f = 1 on 1..6, 100 (k = 7): θ = k − 2f = 5 Krum selections, then per coordinate
/// the mean of the β = θ − 2f = 3 values closest to the median.
///
/// Selection (score = sum of the max(1, k − f − 2) smallest squared distances, k = updates
/// left; ties to the lowest id, ids in value order):
/// 1. k = 7, c = 4: 1: 1+4+9+16 = 30, 2: 1+1+4+9 = 15, 3: 1+1+4+4 = 10, 4: 1+1+4+4 = 10,
///    5: 15, 6: 30, 100: huge. Tie 3/4 → 3.
/// 2. k = 6, c = 3 on {1,2,4,5,6,100}: 1: 1+9+16 = 26, 2: 1+4+9 = 14, 4: 1+4+4 = 9,
///    5: 1+1+9 = 11, 6: 1+4+16 = 21 → 4.
/// 3. k = 5, c = 2 on {1,2,5,6,100}: 1: 1+16 = 17, 2: 1+9 = 10, 5: 1+9 = 10, 6: 1+16 = 17.
///    Tie 2/5 → 2.
/// 4. k = 4, c = 1 on {1,5,6,100}: 1: 16, 5: 1, 6: 1 → 5.
/// 5. k = 3, c = max(1, 0) = 1 on {1,6,100}: 1: 25, 6: 25 → 1 (with c = 0 all scores would be 0
///    and the lowest id, 1, would win too).
///
/// Selected {3, 4, 2, 5, 1}: median 3; the 3 values closest to it are 3, 2 and 4 (2 and 4 are
/// at distance 1, 1 and 5 at distance 2): (2 + 3 + 4) / 3 = 3.0, Flower's number. The reading
/// that matters is El Mhamdi et al.'s: the attacker (100) is never selected, and the closest-β
/// average is over the selection, not the whole cohort.
#[test]
fn flower_21_bulyan() {
    let mut s = Bulyan::new(1, 7).unwrap();
    let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0];
    assert_eq!(scalar_run(&mut s, &values, &ones(7)), 3.0);
}

/// #22: Bulyan f = 1 needs k >= 4f + 3 = 7: configuring for 6 is refused, and a cohort of 6 for a
/// strategy configured for 7 is a typed error at aggregation time.
#[test]
fn flower_22_bulyan_needs_4f_plus_3() {
    let e = Bulyan::new(1, 6).unwrap_err();
    assert_eq!(e.kind(), RobustConfigKind::TooFewClients);
    assert_eq!(e, RobustConfigError::TooFewClients { strategy: "bulyan", f: 1, min_clients: 6, need: 7 });

    let s = Bulyan::new(1, 7).unwrap();
    let e = s.check_cohort(6).unwrap_err();
    assert_eq!(e, RobustConfigError::CohortTooSmall { strategy: "bulyan", got: 6, need: 7 });
    let m = scalar_manifest();
    let ps: Vec<Parameters> = (1..=6).map(|v| params(&m, &[vec![f64::from(v)]])).collect();
    let ids: Vec<ClientId> = (0..6).map(client).collect();
    let e = s.clone().aggregate_cohort(&views(&ps, &ids, &ones(6)), &Parameters::zeros(m)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ManifestMismatch);
    assert!(matches!(e, Error::ManifestMismatch(msg) if msg == COHORT_TOO_SMALL));
}

/// #25: Multi-Krum f = 0 on 1, 2, 3 (equal weights). Every score is 1 (c = 3 − 0 − 2 = 1 nearest
/// neighbour at distance 1), so the order is the id order 1, 2, 3: m = 1, 2, 3 give 1.0, 1.5, 2.0
/// as in Flower. m = 4 and 5 wrap around in Flower (1.0, 1.5); Shoal refuses them.
#[test]
fn flower_25_multi_krum_m_above_k_is_a_config_error() {
    for (m, want) in [(1, 1.0), (2, 1.5), (3, 2.0)] {
        let mut s = Krum::new(0, m, 3).unwrap();
        assert_eq!(scalar_run(&mut s, &[1.0, 2.0, 3.0], &ones(3)), want, "m = {m}");
    }
    for m in [4, 5] {
        let e = Krum::new(0, m, 3).unwrap_err();
        assert_eq!(e, RobustConfigError::KeepExceedsCohort { m, min_clients: 3 });
        assert_eq!(e.kind().as_str(), "keep_exceeds_cohort");
    }
}

/// Bulyan's tie rule: equal distances to the median go to the smaller value. f = 1 on 7, 8, 9,
/// 10, 11, 13, 30, 1000, 2000 (k = 9, ids in value order): the θ = 7 Krum selections take the
/// seven small values (the two far ones score worst in every round; with k = 3, c = 1, 30 and
/// 1000 tie on 970² and the lower id wins). Median of the seven: 10; β = θ − 2f = 5 closest:
/// 10 (0), 9 and 11 (1), 8 (2), then 7 and 13 tie at distance 3 → 7. Mean
/// (7 + 8 + 9 + 10 + 11) / 5 = 9 (13 would give 10.2). Checked on the f32 network path and the
/// f64 selection path.
#[test]
fn bulyan_distance_ties_go_to_the_smaller_value() {
    let values = [7.0, 8.0, 9.0, 10.0, 11.0, 13.0, 30.0, 1000.0, 2000.0];
    let mut s = Bulyan::new(1, 9).unwrap();
    assert_eq!(scalar_run(&mut s, &values, &ones(9)), 9.0);
    let m = manifest(vec![TensorSpec::new("x", DType::F64, vec![])]);
    let ps: Vec<Parameters> = values.iter().map(|&v| params(&m, &[vec![v]])).collect();
    let ids: Vec<ClientId> = (0..9).map(client).collect();
    let out = s.aggregate_cohort(&views(&ps, &ids, &ones(9)), &Parameters::zeros(Arc::clone(&m))).unwrap();
    assert_eq!(out.tensor_f64(0), vec![9.0]);
}

// ---------------------------------------------------------------------------------------------
// bug-cases.md row 11: one site scales its update ×1000
// ---------------------------------------------------------------------------------------------

/// Standard normal samples (Box-Muller) from a seeded generator.
fn normals(rng: &mut StdRng, d: usize) -> Vec<f64> {
    (0..d)
        .map(|_| {
            let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// MediSwarm #529: honest sites train the same model, so their updates agree up to local noise:
/// honest_i = w + 0.01·z_i with w, z_i ~ N(0, 1)^1000 (so each honest update is itself ~N(0, 1)
/// element-wise). Site x (0.6 % of the data, n = 190) sends its update ×1000.
///
/// Expectations are computed here from the honest updates only (sorted copies):
/// - median of the 6: between the honest min and max of every coordinate (the outlier sits on
///   one side, so the median is the mean of two adjacent honest order statistics) and within
///   ε = 0.05 of the honest median;
/// - trimmed mean (β = 0.2 → one value cut each side): within ε of the honest mean;
/// - Krum (f = 1): exactly one honest update, within ε of the honest mean;
/// - Multi-Krum (f = 1, m = 5): the weighted mean of the five honest updates;
/// - Bulyan (f = 1, needs 7: a sixth honest site is added): within ε of the honest mean;
/// - FedAvg: 190/31090 of ×1000 ≈ 6·w pulls it far away (relative error > 1, as the 5.5 of the
///   report).
#[test]
fn bug_case_11_scaled_update_is_contained() {
    const D: usize = 1000;
    const EPS: f64 = 0.05;
    let mut rng = StdRng::seed_from_u64(529);
    let w = normals(&mut rng, D);
    let honest_values: Vec<Vec<f64>> =
        (0..6).map(|_| normals(&mut rng, D).iter().zip(&w).map(|(z, w)| w + 0.01 * z).collect()).collect();
    let attacker: Vec<f64> =
        normals(&mut rng, D).iter().zip(&w).map(|(z, w)| 1000.0 * (w + 0.01 * z)).collect();
    let honest_weights = [3000.0, 5000.0, 8000.0, 12000.0, 2900.0, 4000.0];

    let m = manifest(vec![TensorSpec::new("w", DType::F32, vec![D])]);
    // Work with the f32-rounded values the strategies see.
    let honest: Vec<Parameters> = honest_values.iter().map(|h| params(&m, std::slice::from_ref(h))).collect();
    let bad = params(&m, &[attacker]);
    let h: Vec<Vec<f64>> = honest.iter().map(|p| p.tensor_f64(0)).collect();

    // The honest statistics over the first five sites (the 6-update cohort).
    let honest_median: Vec<f64> = (0..D)
        .map(|c| {
            let mut v: Vec<f64> = h[..5].iter().map(|u| u[c]).collect();
            v.sort_by(f64::total_cmp);
            v[2]
        })
        .collect();
    let mean_of = |us: &[Vec<f64>]| -> Vec<f64> {
        (0..D).map(|c| us.iter().map(|u| u[c]).sum::<f64>() / us.len() as f64).collect()
    };
    let honest_mean = mean_of(&h[..5]);
    let total5: f64 = honest_weights[..5].iter().sum();
    let honest_weighted: Vec<f64> =
        (0..D).map(|c| (0..5).map(|k| honest_weights[k] * h[k][c]).sum::<f64>() / total5).collect();

    let ids: Vec<ClientId> = ["site-a", "site-b", "site-c", "site-d", "site-e", "site-f", "site-x"]
        .iter()
        .map(|s| cid(s))
        .collect();
    let mut cohort: Vec<UpdateView<'_>> =
        (0..5).map(|k| honest[k].as_update(&ids[k], honest_weights[k])).collect();
    cohort.push(bad.as_update(&ids[6], 190.0));
    let global = Parameters::zeros(Arc::clone(&m));
    let run = |s: &mut dyn shoal_functions::Strategy, c: &[UpdateView<'_>]| {
        s.aggregate_cohort(c, &global).unwrap().tensor_f64(0)
    };

    let median = run(&mut CoordinateMedian::new(6).unwrap(), &cohort);
    for c in 0..D {
        let lo = h[..5].iter().map(|u| u[c]).fold(f64::INFINITY, f64::min);
        let hi = h[..5].iter().map(|u| u[c]).fold(f64::NEG_INFINITY, f64::max);
        assert!(lo <= median[c] && median[c] <= hi, "coordinate {c}: {} outside [{lo}, {hi}]", median[c]);
    }
    assert!(max_abs_diff(&median, &honest_median) < EPS);

    let trimmed = run(&mut TrimmedMean::new(0.2, 6).unwrap(), &cohort);
    assert!(max_abs_diff(&trimmed, &honest_mean) < EPS);

    let krum = run(&mut Krum::new(1, 1, 6).unwrap(), &cohort);
    assert!(h[..5].contains(&krum), "Krum returns one honest update unchanged");
    assert!(max_abs_diff(&krum, &honest_mean) < EPS);

    let multi = run(&mut Krum::new(1, 5, 6).unwrap(), &cohort);
    assert!(max_abs_diff(&multi, &honest_weighted) < 1e-6, "the five honest updates, FedAvg-weighted");

    let mut cohort7 = cohort.clone();
    cohort7.push(honest[5].as_update(&ids[5], honest_weights[5]));
    let bulyan = run(&mut Bulyan::new(1, 7).unwrap(), &cohort7);
    assert!(max_abs_diff(&bulyan, &mean_of(&h)) < EPS);

    let fedavg = run(&mut FedAvg::parameters(), &cohort);
    assert!(max_abs_diff(&fedavg, &honest_weighted) > 1.0, "FedAvg is dragged by the scaled update");
    assert!(rel_l2(&fedavg, &honest_weighted) > 1.0);
    for robust in [&median, &trimmed, &krum, &multi] {
        assert!(rel_l2(robust, &honest_weighted) < 0.01);
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration, cohort size, errors
// ---------------------------------------------------------------------------------------------

#[test]
fn constructors_validate_against_the_expected_cohort() {
    // Median and trimmed mean: at least one client.
    assert_eq!(CoordinateMedian::new(0).unwrap_err().kind(), RobustConfigKind::TooFewClients);
    assert_eq!(CoordinateMedian::new(1).unwrap().min_clients(), 1);
    assert_eq!(TrimmedMean::new(0.1, 0).unwrap_err().kind(), RobustConfigKind::TooFewClients);
    let t = TrimmedMean::new(0.25, 8).unwrap();
    assert_eq!((t.beta(), t.min_clients(), t.trim_count(8), t.trim_count(11)), (0.25, 8, 2, 2));

    // Krum: n > 2f + 2, i.e. min_clients >= 2f + 3; m <= min_clients.
    assert_eq!(
        Krum::new(2, 1, 6).unwrap_err(),
        RobustConfigError::TooFewClients { strategy: "krum", f: 2, min_clients: 6, need: 7 }
    );
    assert_eq!(
        Krum::new(2, 3, 6).unwrap_err(),
        RobustConfigError::TooFewClients { strategy: "multi-krum", f: 2, min_clients: 6, need: 7 }
    );
    let k = Krum::new(2, 7, 7).unwrap();
    assert_eq!((k.f(), k.m(), k.min_clients()), (2, 7, 7));
    assert_eq!(Krum::new(2, 8, 7).unwrap_err().kind(), RobustConfigKind::KeepExceedsCohort);
    assert!(Krum::new(0, 0, 3).is_ok());
    assert_eq!(Krum::new(0, 0, 2).unwrap_err().kind(), RobustConfigKind::TooFewClients);
    assert_eq!(Krum::new(usize::MAX, 0, usize::MAX).unwrap_err().kind(), RobustConfigKind::TooFewClients);

    // Bulyan: min_clients >= 4f + 3.
    assert!(Bulyan::new(0, 3).is_ok());
    assert!(Bulyan::new(2, 11).is_ok());
    assert_eq!(Bulyan::new(2, 10).unwrap_err().kind(), RobustConfigKind::TooFewClients);
    assert_eq!(Bulyan::new(usize::MAX / 2, usize::MAX).unwrap_err().kind(), RobustConfigKind::TooFewClients);
    assert_eq!(Bulyan::new(4, 19).unwrap().f(), 4);

    // Kinds and labels.
    let labels: Vec<&str> = [
        RobustConfigKind::BetaOutOfRange,
        RobustConfigKind::KeepExceedsCohort,
        RobustConfigKind::TooFewClients,
        RobustConfigKind::CohortTooSmall,
    ]
    .iter()
    .map(|k| k.as_str())
    .collect();
    assert_eq!(labels, ["beta_out_of_range", "keep_exceeds_cohort", "too_few_clients", "cohort_too_small"]);
    assert!(Bulyan::new(1, 6).unwrap_err().to_string().contains("needs min_clients >= 7"));
}

/// Fewer updates than `min_clients` is a typed error for every strategy; an empty cohort is
/// `ZeroTotalWeight`, as for FedAvg.
#[test]
fn cohort_smaller_than_configured_is_a_typed_error() {
    let m = scalar_manifest();
    let ps: Vec<Parameters> = (0..4).map(|v| params(&m, &[vec![f64::from(v)]])).collect();
    let ids: Vec<ClientId> = (0..4).map(client).collect();
    let vs = views(&ps, &ids, &ones(4));
    let global = Parameters::zeros(Arc::clone(&m));
    let mut strategies: Vec<(DynStrategy, RobustConfigError)> = vec![
        (
            Box::new(CoordinateMedian::new(5).unwrap()),
            CoordinateMedian::new(5).unwrap().check_cohort(4).unwrap_err(),
        ),
        (
            Box::new(TrimmedMean::new(0.1, 5).unwrap()),
            TrimmedMean::new(0.1, 5).unwrap().check_cohort(4).unwrap_err(),
        ),
        (Box::new(Krum::new(1, 0, 5).unwrap()), Krum::new(1, 0, 5).unwrap().check_cohort(4).unwrap_err()),
        (Box::new(Bulyan::new(0, 5).unwrap()), Bulyan::new(0, 5).unwrap().check_cohort(4).unwrap_err()),
    ];
    for (s, config_error) in &mut strategies {
        assert_eq!(config_error.kind(), RobustConfigKind::CohortTooSmall);
        let e = s.aggregate_cohort(&vs, &global).unwrap_err();
        assert!(matches!(e, Error::ManifestMismatch(msg) if msg == COHORT_TOO_SMALL), "{}: {e}", s.name());
        let e = s.aggregate_cohort(&[], &global).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ZeroTotalWeight, "{}", s.name());
    }
    assert_eq!(
        Krum::new(1, 0, 5).unwrap().select(&vs).unwrap_err().kind(),
        ErrorKind::ManifestMismatch,
        "select checks the cohort size too"
    );
}

fn all_strategies(n: usize) -> Vec<DynStrategy> {
    vec![
        Box::new(CoordinateMedian::new(n).unwrap()),
        Box::new(TrimmedMean::new(0.2, n).unwrap()),
        Box::new(Krum::new(0, 1, n).unwrap()),
        Box::new(Krum::new(0, 2, n).unwrap()),
        Box::new(Bulyan::new(0, n).unwrap()),
    ]
}

#[test]
fn whole_cohort_strategies_refuse_streaming() {
    let m = scalar_manifest();
    let p = params(&m, &[vec![1.0]]);
    let c = cid("a");
    let mut partial = PartialAggregate::new(Arc::clone(&m));
    let names: Vec<&str> = all_strategies(3).iter().map(|s| s.name()).collect();
    assert_eq!(names, ["coordinate-median", "trimmed-mean", "krum", "multi-krum", "bulyan"]);
    for mut s in all_strategies(3) {
        assert_eq!(s.mergeability(), Mergeability::WholeCohort);
        let name = s.name();
        assert!(
            matches!(s.fold(&mut partial, &p.as_update(&c, 1.0)), Err(Error::NotStreaming(n)) if n == name)
        );
        let other = partial.clone();
        assert_eq!(s.merge(&mut partial, &other).unwrap_err().kind(), ErrorKind::NotStreaming);
        assert_eq!(s.finish(&partial, &p).unwrap_err().kind(), ErrorKind::NotStreaming);
        assert_eq!(
            s.fold_batch(&mut partial, &[p.as_update(&c, 1.0)]).unwrap_err().kind(),
            ErrorKind::NotStreaming
        );
    }
}

/// Weights must be finite and positive (also where they are ignored), and every update must
/// come from the global model's manifest.
#[test]
fn invalid_weights_and_foreign_manifests_are_rejected() {
    let m = scalar_manifest();
    let other = manifest(vec![TensorSpec::new("y", DType::F32, vec![])]);
    let ps: Vec<Parameters> = (0..3).map(|v| params(&m, &[vec![f64::from(v)]])).collect();
    let foreign = params(&other, &[vec![1.0]]);
    let ids: Vec<ClientId> = (0..3).map(client).collect();
    let global = Parameters::zeros(Arc::clone(&m));
    for mut s in all_strategies(3) {
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = s.aggregate_cohort(&views(&ps, &ids, &[1.0, w, 1.0]), &global).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidWeight, "{} weight {w}", s.name());
        }
        let mut vs = views(&ps, &ids, &ones(3));
        vs[1] = foreign.as_update(&ids[1], 1.0);
        assert_eq!(s.aggregate_cohort(&vs, &global).unwrap_err().kind(), ErrorKind::ManifestMismatch);
        // A short slot is reported, not a panic.
        let mut vs = views(&ps, &ids, &ones(3));
        vs[2].bytes = &vs[2].bytes[..2];
        assert_eq!(s.aggregate_cohort(&vs, &global).unwrap_err().kind(), ErrorKind::Misaligned);
    }
}

// ---------------------------------------------------------------------------------------------
// Policies and dtypes
// ---------------------------------------------------------------------------------------------

/// `max`, `first` and `skip` tensors are aggregated over the whole cohort as FedAvg does, for
/// every robust strategy; the robust rule applies to the `mean` tensor only.
#[test]
fn non_mean_policies_follow_fedavg() {
    let mut specs = vec![
        TensorSpec::new("w", DType::F32, vec![1]),
        TensorSpec::new("bn.num_batches_tracked", DType::I64, vec![]),
        TensorSpec::new("first", DType::F32, vec![1]),
        TensorSpec::new("frozen", DType::F32, vec![1]),
    ];
    specs[1].policy = AggregationPolicy::Max;
    specs[2].policy = AggregationPolicy::First;
    specs[3].policy = AggregationPolicy::Skip;
    let m = manifest(specs);
    // Cohort order d, b, c, a; "a" sent 40 for `first`.
    let ids: Vec<ClientId> = ["d", "b", "c", "a"].iter().map(|s| cid(s)).collect();
    let ps: Vec<Parameters> =
        [10.0, 20.0, 30.0, 40.0].iter().map(|&v| params(&m, &[vec![v], vec![v], vec![v], vec![v]])).collect();
    let global = params(&m, &[vec![0.0], vec![0.0], vec![0.0], vec![7.0]]);
    let vs = views(&ps, &ids, &ones(4));
    let fed = FedAvg::parameters().aggregate_cohort(&vs, &global).unwrap();
    // Expected `w`: median of 10..40 = 25; trimmed (β=0.25, cut 1) = 25; Krum f=0, c=2: scores
    // 10: 100+400, 20: 100+100, 30: 100+100, 40: 100+400 → tie 20 ("b") / 30 ("c") → "b" = 20;
    // Bulyan f=0: θ = 4, β = 4: the plain mean, 25.
    let cases: Vec<(DynStrategy, f64)> = vec![
        (Box::new(CoordinateMedian::new(4).unwrap()), 25.0),
        (Box::new(TrimmedMean::new(0.25, 4).unwrap()), 25.0),
        (Box::new(Krum::new(0, 1, 4).unwrap()), 20.0),
        (Box::new(Bulyan::new(0, 4).unwrap()), 25.0),
    ];
    for (mut s, w) in cases {
        let out = s.aggregate_cohort(&vs, &global).unwrap();
        assert_eq!(out.tensor_f64(0), vec![w], "{}", s.name());
        for i in 1..4 {
            assert_eq!(out.tensor_f64(i), fed.tensor_f64(i), "{} tensor {i}", s.name());
        }
        assert_eq!(out.tensor_f64(1), vec![40.0]);
        assert_eq!(out.tensor_f64(2), vec![40.0]);
        assert_eq!(out.tensor_f64(3), vec![7.0]);
    }
}

/// Integer tensors are decoded to f64 and the result rounded half to even (median of 10 and 21
/// is 15.5 → 16; of 10 and 13 is 11.5 → 12); f16 and bf16 tensors are exact.
#[test]
fn integer_and_half_precision_tensors() {
    let m = manifest(vec![
        TensorSpec::new("n", DType::I64, vec![2]),
        TensorSpec::new("u", DType::U8, vec![1]),
        TensorSpec::new("h", DType::F16, vec![2]),
        TensorSpec::new("b", DType::BF16, vec![2]),
    ]);
    let a = params(&m, &[vec![10.0, 10.0], vec![200.0], vec![0.5, -2.0], vec![1.0, 3.0]]);
    let b = params(&m, &[vec![21.0, 13.0], vec![255.0], vec![0.25, 6.0], vec![2.0, 5.0]]);
    let ids = [cid("a"), cid("b")];
    let out = CoordinateMedian::new(2)
        .unwrap()
        .aggregate_cohort(&views(&[a, b], &ids, &[1.0, 5.0]), &Parameters::zeros(Arc::clone(&m)))
        .unwrap();
    assert_eq!(out.tensor_f64(0), vec![16.0, 12.0]);
    assert_eq!(out.tensor_f64(1), vec![228.0], "227.5 rounds to the even 228");
    assert_eq!(out.tensor_f64(2), vec![0.375, 2.0]);
    assert_eq!(out.tensor_f64(3), vec![1.5, 4.0]);
}

/// Krum's distance is over all `mean` tensors flattened together (a `max` tensor does not
/// count), whatever their dtypes.
#[test]
fn krum_distances_span_all_mean_tensors() {
    let mut specs = vec![
        TensorSpec::new("a", DType::F32, vec![2]),
        TensorSpec::new("b", DType::F16, vec![1]),
        TensorSpec::new("c", DType::I64, vec![1]),
    ];
    specs[2].policy = AggregationPolicy::Max;
    let m = manifest(specs);
    let p = [
        params(&m, &[vec![0.0, 0.0], vec![0.0], vec![1000.0]]),
        params(&m, &[vec![3.0, 0.0], vec![4.0], vec![0.0]]),
        params(&m, &[vec![1.0, 1.0], vec![-1.0], vec![5.0]]),
    ];
    let ids: Vec<ClientId> = (0..3).map(client).collect();
    let d = pairwise_sq_distances(&views(&p, &ids, &ones(3))).unwrap();
    // |p0 - p1|² = 9 + 16 = 25; |p0 - p2|² = 1 + 1 + 1 = 3; |p1 - p2|² = 4 + 1 + 25 = 30.
    assert_eq!(d, vec![0.0, 25.0, 3.0, 25.0, 0.0, 30.0, 3.0, 30.0, 0.0]);
    assert!(pairwise_sq_distances(&[]).unwrap().is_empty());
}

/// Near-duplicate updates far from the origin: the Gram form cancels catastrophically, is
/// clamped at 0 and stays within the documented absolute bound d·2^-53·(‖a‖² + ‖b‖²).
#[test]
fn gram_distance_of_near_duplicates_is_bounded_and_non_negative() {
    const D: usize = 3000;
    let m = manifest(vec![TensorSpec::new("w", DType::F32, vec![D])]);
    let a: Vec<f64> = (0..D).map(|i| 1000.0 + (i % 7) as f64).collect();
    let mut b = a.clone();
    b[17] += 1.0 / 64.0;
    let p = [params(&m, std::slice::from_ref(&a)), params(&m, std::slice::from_ref(&b))];
    let ids: Vec<ClientId> = (0..2).map(client).collect();
    let d = pairwise_sq_distances(&views(&p, &ids, &ones(2))).unwrap();
    let naive = 1.0 / 4096.0;
    let norms: f64 = a.iter().chain(&b).map(|x| x * x).sum();
    let bound = D as f64 * f64::EPSILON / 2.0 * norms;
    assert!(d[1] >= 0.0 && d[1] == d[2]);
    assert!((d[1] - naive).abs() <= bound, "{} vs {naive} (bound {bound})", d[1]);
}

// ---------------------------------------------------------------------------------------------
// The sorting reference
// ---------------------------------------------------------------------------------------------

/// Which robust rule, with its parameters.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Median,
    Trimmed(f64),
    Krum { f: usize, m: usize },
    Bulyan { f: usize },
}

impl Rule {
    /// The strategy, configured for exactly `n` clients (None if `n` is too small for it).
    fn build(self, n: usize) -> Option<DynStrategy> {
        Some(match self {
            Rule::Median => Box::new(CoordinateMedian::new(n).ok()?),
            Rule::Trimmed(beta) => Box::new(TrimmedMean::new(beta, n).ok()?),
            Rule::Krum { f, m } => Box::new(Krum::new(f, m, n).ok()?),
            Rule::Bulyan { f } => Box::new(Bulyan::new(f, n).ok()?),
        })
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_unstable_by(f64::total_cmp);
    v
}

fn mean(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, x| a + x) / v.len() as f64
}

fn median(v: Vec<f64>) -> f64 {
    let v = sorted(v);
    let h = v.len() / 2;
    if !v.len().is_multiple_of(2) {
        v[h]
    } else {
        (v[h - 1] + v[h]) / 2.0
    }
}

/// Flattened `mean` tensors of update k.
fn flat(specs: &[TensorSpec], u: &[Vec<f64>]) -> Vec<f64> {
    specs
        .iter()
        .zip(u)
        .filter(|(s, _)| s.policy == AggregationPolicy::Mean)
        .flat_map(|(_, v)| v.clone())
        .collect()
}

/// Naive squared distances between the flattened updates.
fn naive_distances(x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    x.iter()
        .map(|a| x.iter().map(|b| a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum()).collect())
        .collect()
}

/// Krum's order of the `active` updates (indices = client order), best first: sum of the c
/// smallest distances to the other active updates, ties to the lower index (= lower
/// `ClientId`).
fn krum_order(d: &[Vec<f64>], active: &[usize], f: usize) -> Vec<usize> {
    let k = active.len();
    let c = k.saturating_sub(f + 2).max(1).min(k - 1);
    let score = |i: usize| -> f64 {
        let to_others: Vec<f64> = active.iter().filter(|&&j| j != i).map(|&j| d[i][j]).collect();
        sorted(to_others)[..c].iter().sum()
    };
    let mut order: Vec<(f64, usize)> = active.iter().map(|&i| (score(i), i)).collect();
    order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    order.into_iter().map(|(_, i)| i).collect()
}

/// The expected new model, per tensor, from plain copies (`updates[k][i][e]`, client k has the
/// k-th lowest id).
fn reference(
    rule: Rule,
    specs: &[TensorSpec],
    updates: &[Vec<Vec<f64>>],
    weights: &[f64],
    global: &[Vec<f64>],
) -> Vec<Vec<f64>> {
    let n = updates.len();
    let column =
        |ks: &[usize], i: usize, e: usize| -> Vec<f64> { ks.iter().map(|&k| updates[k][i][e]).collect() };
    let all: Vec<usize> = (0..n).collect();
    let xs: Vec<Vec<f64>> = updates.iter().map(|u| flat(specs, u)).collect();
    let d = naive_distances(&xs);
    // Rule-specific: the mean tensors' values.
    let mean_tensor = |i: usize| -> Vec<f64> {
        let numel = specs[i].numel();
        match rule {
            Rule::Median => (0..numel).map(|e| median(column(&all, i, e))).collect(),
            Rule::Trimmed(beta) => {
                let cut = (beta * n as f64).floor() as usize;
                (0..numel).map(|e| mean(&sorted(column(&all, i, e))[cut..n - cut])).collect()
            }
            Rule::Krum { f, m } => {
                let order = krum_order(&d, &all, f);
                if m <= 1 {
                    updates[order[0]][i].clone()
                } else {
                    let kept = &order[..m];
                    let total: f64 = kept.iter().map(|&k| weights[k]).sum();
                    (0..numel)
                        .map(|e| kept.iter().map(|&k| weights[k] * updates[k][i][e]).sum::<f64>() / total)
                        .collect()
                }
            }
            Rule::Bulyan { f } => {
                let theta = n - 2 * f;
                let beta = theta - 2 * f;
                let mut remaining = all.clone();
                let mut selected = Vec::new();
                while selected.len() < theta {
                    let best = krum_order(&d, &remaining, f)[0];
                    remaining.retain(|&k| k != best);
                    selected.push(best);
                }
                (0..numel)
                    .map(|e| {
                        let v = column(&selected, i, e);
                        let med = median(v.clone());
                        let mut by_distance: Vec<(f64, f64)> =
                            v.iter().map(|&x| ((x - med).abs(), x)).collect();
                        by_distance.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
                        let closest: Vec<f64> = by_distance[..beta].iter().map(|p| p.1).collect();
                        mean(&closest)
                    })
                    .collect()
            }
        }
    };
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| match spec.policy {
            AggregationPolicy::Mean => mean_tensor(i),
            AggregationPolicy::Max => (0..spec.numel())
                .map(|e| column(&all, i, e).into_iter().fold(f64::NEG_INFINITY, f64::max))
                .collect(),
            AggregationPolicy::First => updates[0][i].clone(),
            AggregationPolicy::Skip => global[i].clone(),
            AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                let total = weights.iter().fold(0.0, |a, w| a + w);
                (0..spec.numel())
                    .map(|e| {
                        let sum = column(&all, i, e).iter().zip(weights).fold(0.0, |a, (x, w)| a + w * x);
                        let m = sum / total;
                        if spec.policy == AggregationPolicy::Variance && m < 0.0 {
                            0.0
                        } else {
                            m
                        }
                    })
                    .collect()
            }
        })
        .collect()
}

/// Runs `rule` on the case (cohort in `order`) and compares with the reference, byte for byte.
fn check_against_reference(
    rule: Rule,
    specs: &[TensorSpec],
    updates: &[Vec<Vec<f64>>],
    weights: &[f64],
    global: &[Vec<f64>],
) -> Result<(), TestCaseError> {
    let n = updates.len();
    let Some(mut s) = rule.build(n) else { return Ok(()) };
    let m = manifest(specs.to_vec());
    let ps: Vec<Parameters> = updates.iter().map(|u| params(&m, u)).collect();
    let ids: Vec<ClientId> = (0..n).map(client).collect();
    let g = params(&m, global);
    let out =
        s.aggregate_cohort(&views(&ps, &ids, weights), &g).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let want = params(&m, &reference(rule, specs, updates, weights, global));
    for (i, spec) in specs.iter().enumerate() {
        prop_assert_eq!(out.tensor_f64(i), want.tensor_f64(i), "{:?} tensor {} ({:?})", rule, i, spec);
    }
    prop_assert_eq!(out.as_bytes(), want.as_bytes(), "{:?}", rule);
    Ok(())
}

/// Above `NETWORK_MAX` updates, f32 and f16 tensors go through the per-coordinate
/// `select_nth_unstable` path too: median and trimmed mean must agree with the reference there.
/// (Krum has a single path; Bulyan's selection path is covered by the F64/I64 tensors of the
/// properties below, and the unit tests in `robust.rs` check the f32 selection path against the
/// network path for every rule.)
#[test]
fn large_cohorts_use_selection_and_agree_with_the_reference() {
    let n = NETWORK_MAX + 3;
    let mut specs = vec![
        TensorSpec::new("w", DType::F32, vec![3]),
        TensorSpec::new("h", DType::F16, vec![2]),
        TensorSpec::new("n", DType::I64, vec![1]),
        TensorSpec::new("m", DType::F32, vec![1]),
    ];
    specs[3].policy = AggregationPolicy::Max;
    let mut rng = StdRng::seed_from_u64(7);
    let updates: Vec<Vec<Vec<f64>>> = (0..n)
        .map(|_| {
            specs
                .iter()
                .map(|s| (0..s.numel()).map(|_| f64::from(rng.gen_range(-300i32..=300)) / 8.0).collect())
                .collect()
        })
        .collect();
    let weights: Vec<f64> = (0..n).map(|_| f64::from(rng.gen_range(1u32..=1000))).collect();
    let global = vec![vec![0.0; 3], vec![0.0; 2], vec![0.0], vec![0.0]];
    for rule in [Rule::Median, Rule::Trimmed(0.1), Rule::Trimmed(0.0)] {
        check_against_reference(rule, &specs, &updates, &weights, &global).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn config() -> ProptestConfig {
    ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() }
}

/// Values exact on a 2^-6 grid with magnitude <= 1000 (bf16: 8 significant bits), or small
/// integers (to make ties in order statistics and Krum scores frequent). Every sum of products
/// the strategies and the reference compute is then exact in f64, so results agree bit for bit
/// whatever the summation order.
fn value(dtype: DType) -> BoxedStrategy<f64> {
    let small = (-3i32..=3).prop_map(f64::from);
    match dtype {
        DType::BF16 => prop_oneof![
            2 => (-255i32..=255, -6i32..=0).prop_map(|(m, e)| f64::from(m) * 2f64.powi(e)),
            2 => small,
        ]
        .boxed(),
        DType::I64 => prop_oneof![2 => (-1000i32..=1000).prop_map(f64::from), 2 => small].boxed(),
        _ => prop_oneof![
            2 => (-1000i32..=1000, -6i32..=0).prop_map(|(m, e)| f64::from(m) * 2f64.powi(e)),
            2 => small,
        ]
        .boxed(),
    }
}

fn spec() -> impl Strategy<Value = (DType, Vec<usize>, AggregationPolicy)> {
    let dtype = prop::sample::select(vec![DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64]);
    let shape = prop_oneof![
        Just(vec![]),
        (1usize..=12).prop_map(|n| vec![n]),
        (1usize..=3, 1usize..=4).prop_map(|(a, b)| vec![a, b])
    ];
    let policy = prop_oneof![
        5 => Just(AggregationPolicy::Mean),
        1 => Just(AggregationPolicy::Max),
        1 => Just(AggregationPolicy::First),
        1 => Just(AggregationPolicy::Skip),
        1 => Just(AggregationPolicy::Statistic),
        1 => Just(AggregationPolicy::Variance),
    ];
    (dtype, shape, policy)
}

/// A cohort: 1-3 tensors, 1-11 updates with integer weights, a global model, and the rules'
/// parameters (β index, f, m).
#[derive(Debug, Clone)]
struct Case {
    specs: Vec<TensorSpec>,
    updates: Vec<Vec<Vec<f64>>>,
    weights: Vec<f64>,
    global: Vec<Vec<f64>>,
    beta: f64,
    f: usize,
    m: usize,
}

impl Case {
    /// Every rule that accepts a cohort of this size.
    fn rules(&self) -> Vec<Rule> {
        let n = self.updates.len();
        let mut rules = vec![Rule::Median, Rule::Trimmed(self.beta)];
        if n >= 2 * self.f + 3 {
            rules.push(Rule::Krum { f: self.f, m: self.m % (n + 1) });
        }
        // Bulyan with the largest f the cohort allows, and f = 0.
        if n >= 3 {
            rules.push(Rule::Bulyan { f: 0 });
        }
        if n >= 7 {
            rules.push(Rule::Bulyan { f: (n - 3) / 4 });
        }
        rules
    }
}

fn case() -> impl Strategy<Value = Case> {
    (prop::collection::vec(spec(), 1..=3), 1usize..=11).prop_flat_map(|(specs, n)| {
        let specs: Vec<TensorSpec> = specs
            .into_iter()
            .enumerate()
            .map(|(i, (d, shape, policy))| TensorSpec { name: format!("t{i}"), dtype: d, shape, policy })
            .collect();
        let tensor_values = |specs: &[TensorSpec]| -> Vec<BoxedStrategy<Vec<f64>>> {
            specs.iter().map(|s| prop::collection::vec(value(s.dtype), s.numel()).boxed()).collect()
        };
        let updates = prop::collection::vec(tensor_values(&specs), n);
        let weights = prop::collection::vec((1u32..=1000).prop_map(f64::from), n);
        let global = tensor_values(&specs);
        let beta = prop::sample::select(vec![0.0, 0.1, 0.2, 0.25, 0.34, 0.49]);
        (Just(specs), updates, weights, global, beta, 0usize..=2, 0usize..=11).prop_map(
            |(specs, updates, weights, global, beta, f, m)| Case {
                specs,
                updates,
                weights,
                global,
                beta,
                f,
                m,
            },
        )
    })
}

fn case_and_permutation() -> impl Strategy<Value = (Case, Vec<usize>)> {
    case().prop_flat_map(|c| {
        let n = c.updates.len();
        (Just(c), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
    })
}

proptest! {
    #![proptest_config(config())]

    /// Permuting the cohort (each update keeps its `ClientId`) gives the same model, bit for bit,
    /// for every rule.
    #[test]
    fn results_do_not_depend_on_cohort_order((case, perm) in case_and_permutation()) {
        let n = case.updates.len();
        let m = manifest(case.specs.clone());
        let ps: Vec<Parameters> = case.updates.iter().map(|u| params(&m, u)).collect();
        let ids: Vec<ClientId> = (0..n).map(client).collect();
        let g = params(&m, &case.global);
        let straight = views(&ps, &ids, &case.weights);
        let permuted: Vec<UpdateView<'_>> = perm.iter().map(|&k| straight[k]).collect();
        for rule in case.rules() {
            let mut s = rule.build(n).unwrap();
            let a = s.aggregate_cohort(&straight, &g).unwrap();
            let b = s.aggregate_cohort(&permuted, &g).unwrap();
            prop_assert_eq!(a.as_bytes(), b.as_bytes(), "{:?} under {:?}", rule, perm);
        }
    }

    /// Every rule agrees with the sorting reference above, bit for bit.
    #[test]
    fn results_agree_with_the_sorting_reference(case in case()) {
        for rule in case.rules() {
            check_against_reference(rule, &case.specs, &case.updates, &case.weights, &case.global)?;
        }
    }

    /// Gram-form distances (cache-blocked, f64) against naive Σ (a − b)² over the flattened
    /// `mean` tensors: within 1e-9 relative (exactly 0 for identical updates). Tensors up to 5000
    /// elements cross the 2048-element tiles and 128-element sub-tiles.
    #[test]
    fn gram_distances_match_naive_pairwise(
        (numel, n, values, dup) in (1usize..=5000, 2usize..=6).prop_flat_map(|(numel, n)| {
            (
                Just(numel),
                Just(n),
                prop::collection::vec(prop::collection::vec(-1000f32..1000f32, numel + 3), n),
                prop::option::of(0usize..n),
            )
        })
    ) {
        let m = manifest(vec![
            TensorSpec::new("w", DType::F32, vec![numel]),
            TensorSpec::new("v", DType::F64, vec![3]),
        ]);
        let mut updates: Vec<Vec<Vec<f64>>> = values
            .iter()
            .map(|u| vec![u[..numel].iter().map(|&x| f64::from(x)).collect(), u[numel..].iter().map(|&x| f64::from(x) * 1.1).collect()])
            .collect();
        if let Some(k) = dup {
            updates[(k + 1) % n] = updates[k].clone();
        }
        let ps: Vec<Parameters> = updates.iter().map(|u| params(&m, u)).collect();
        let ids: Vec<ClientId> = (0..n).map(client).collect();
        let d = pairwise_sq_distances(&views(&ps, &ids, &ones(n))).unwrap();
        let xs: Vec<Vec<f64>> = ps.iter().map(|p| [p.tensor_f64(0), p.tensor_f64(1)].concat()).collect();
        for i in 0..n {
            for j in 0..n {
                let naive: f64 = xs[i].iter().zip(&xs[j]).map(|(a, b)| (a - b) * (a - b)).sum();
                let got = d[i * n + j];
                prop_assert!((got - naive).abs() <= 1e-9 * naive, "({i}, {j}): {got} vs {naive}");
                prop_assert_eq!(got, d[j * n + i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Non-finite distances (issue 16, item 13)
// ---------------------------------------------------------------------------------------------

/// A distance that is not a number must not become 0 (the closest possible): an update holding
/// NaN (ingest refuses it, but API callers can pass one) or f64 values whose squares overflow
/// (ingest accepts those) is infinitely far from every other. Krum, Multi-Krum and Bulyan never
/// select it, on the whole-cohort path and on the sharded path (`select_by_distances`); with too
/// few finite scores they refuse the round rather than return it.
#[test]
fn nan_and_overflowing_updates_are_infinitely_far_and_never_selected() {
    let m = manifest(vec![TensorSpec::new("w", DType::F64, vec![2])]);
    // client-000 holds NaN and client-001 values whose squares overflow: both sort before the
    // honest clients, so any tie (0 == 0) would select them.
    let values =
        [[f64::NAN, 0.0], [1e200, -1e200], [1.0, 1.0], [1.1, 0.9], [0.9, 1.2], [1.0, 1.05], [1.05, 1.0]];
    let ps: Vec<Parameters> = values.iter().map(|v| params(&m, &[v.to_vec()])).collect();
    let ids: Vec<ClientId> = (0..values.len()).map(client).collect();
    let vs = views(&ps, &ids, &ones(values.len()));
    let n = values.len();
    let d = pairwise_sq_distances(&vs).unwrap();
    for j in 1..n {
        assert_eq!(d[j], f64::INFINITY, "NaN update to {j}");
        assert_eq!(d[j * n], f64::INFINITY, "{j} to the NaN update");
    }
    for j in 2..n {
        assert_eq!(d[n + j], f64::INFINITY, "overflowing update to {j}");
    }
    assert!(d.iter().all(|x| !x.is_nan()));
    let global = Parameters::zeros(Arc::clone(&m));
    let honest = |picks: &[usize]| picks.iter().all(|&k| k >= 2);

    // Krum (f = 2, n = 7 ≥ 2f + 3) and Multi-Krum keeping the 5 honest updates.
    let krum = Krum::new(2, 0, n).unwrap();
    assert!(honest(&krum.select(&vs).unwrap()));
    assert!(honest(&krum.select_by_distances(&d, &ids).unwrap()), "sharded path");
    let out = Krum::new(2, 0, n).unwrap().aggregate_cohort(&vs, &global).unwrap();
    assert!(
        out.tensor_f64(0).iter().all(|x| x.is_finite() && (0.8..1.3).contains(x)),
        "{:?}",
        out.tensor_f64(0)
    );
    let multi = Krum::new(2, 5, n).unwrap();
    let picks = multi.select_by_distances(&d, &ids).unwrap();
    assert_eq!(picks.len(), 5);
    assert!(honest(&picks));
    let out = Krum::new(2, 5, n).unwrap().aggregate_cohort(&vs, &global).unwrap();
    assert!(out.tensor_f64(0).iter().all(|x| x.is_finite()));
    // Keeping 6 would need one of the two: refused, not selected.
    let e = Krum::new(2, 6, n).unwrap().aggregate_cohort(&vs, &global).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    assert!(Krum::new(2, 6, n).unwrap().select_by_distances(&d, &ids).is_err());

    // Bulyan (f = 1, n = 7 ≥ 4f + 3) with the NaN update alone: θ = 5 of the 6 honest.
    let bulyan = Bulyan::new(1, n).unwrap();
    let mut one_bad = values;
    one_bad[1] = [1.02, 1.01];
    let ps1: Vec<Parameters> = one_bad.iter().map(|v| params(&m, &[v.to_vec()])).collect();
    let vs1 = views(&ps1, &ids, &ones(n));
    let d1 = pairwise_sq_distances(&vs1).unwrap();
    let picks = bulyan.select_by_distances(&d1, &ids).unwrap();
    assert_eq!(picks.len(), 5);
    assert!(!picks.contains(&0));
    let out = Bulyan::new(1, n).unwrap().aggregate_cohort(&vs1, &global).unwrap();
    assert!(out.tensor_f64(0).iter().all(|x| x.is_finite()));

    // Krum with every score infinite (two NaN updates of three): an error, not a NaN model.
    let three: Vec<Parameters> =
        [[f64::NAN, 0.0], [0.0, f64::NAN], [1.0, 1.0]].iter().map(|v| params(&m, &[v.to_vec()])).collect();
    let vs3 = views(&three, &ids[..3], &ones(3));
    let e = Krum::new(0, 0, 3).unwrap().aggregate_cohort(&vs3, &global).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Strategy, "{e}");
    // NaN and negative distances are refused on the sharded path; +∞ is a distance.
    let mut bad = d.clone();
    bad[1] = f64::NAN;
    assert!(krum.select_by_distances(&bad, &ids).is_err());
    bad[1] = -1.0;
    assert!(krum.select_by_distances(&bad, &ids).is_err());
}
