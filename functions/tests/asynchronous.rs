//! Tests of `shoal_functions::asynchronous`: FedFix, asynchronous FedAvg and FedBuff.
//!
//! - The test vectors of `reference/algorithms.md` §C.8 (C-1 to C-5) are reproduced **exactly**
//!   by the integer-tick simulator run in the exact rational type [`Ratio`] below, and then
//!   replayed through the real strategies (`Strategy::fold` / `finish` on `Parameters`) in f64,
//!   which must agree within 1e-12.
//! - `bug-cases.md` row 26 (FedBuff normalisation) for each `FedBuffNormalisation`, plus the
//!   partial-flush and overshoot rules.
//! - The §C.5 reference numbers (M = 10, F-80) in integer ticks of 1/90 time unit.
//! - Property: FedFix with a period at least the slowest client's compute time is synchronous
//!   FedAvg (exactly, in rationals; and against `FedAvg::deltas` in f64).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fmt;
use std::ops::{Add, Div, Mul, Sub};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use shoal_functions::asynchronous::sim::{simulate, Scheme, SimClient, SimStep};
use shoal_functions::asynchronous::{
    async_fedavg_weight, participation_period, AsyncError, AsyncErrorKind, AsyncFedAvg, AsyncFedAvgWeighting,
    AsyncWeighting, ClientProfile, ClientProfiles, ExampleWeight, FedBuff, FedBuffNormalisation, FedFix,
    SimScalar, Staleness, StalenessWeight,
};
use shoal_functions::tensor::AggregationPolicy;
use shoal_functions::{
    ClientId, DType, ErrorKind, FedAvg, Mergeability, ModelManifest, ModelVersion, Parameters,
    PartialAggregate, Strategy, TensorSpec,
};

// ---------------------------------------------------------------------------------------------
// Exact rationals
// ---------------------------------------------------------------------------------------------

/// num/den in lowest terms, den > 0. Overflow panics (checked arithmetic).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Ratio {
    num: i128,
    den: i128,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs()
}

impl Ratio {
    fn new(num: i128, den: i128) -> Ratio {
        assert!(den != 0, "zero denominator");
        let g = gcd(num, den).max(1);
        let s = if den < 0 { -1 } else { 1 };
        Ratio { num: s * num / g, den: s * den / g }
    }

    fn int(n: i128) -> Ratio {
        Ratio::new(n, 1)
    }

    fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

fn r(num: i128, den: i128) -> Ratio {
    Ratio::new(num, den)
}

impl fmt::Debug for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.num, self.den)
    }
}

fn mul(a: i128, b: i128) -> i128 {
    a.checked_mul(b).expect("rational overflow")
}

impl Add for Ratio {
    type Output = Ratio;
    fn add(self, o: Ratio) -> Ratio {
        Ratio::new(mul(self.num, o.den).checked_add(mul(o.num, self.den)).unwrap(), mul(self.den, o.den))
    }
}

impl Sub for Ratio {
    type Output = Ratio;
    fn sub(self, o: Ratio) -> Ratio {
        self + Ratio { num: -o.num, den: o.den }
    }
}

impl Mul for Ratio {
    type Output = Ratio;
    fn mul(self, o: Ratio) -> Ratio {
        let (g1, g2) = (gcd(self.num, o.den).max(1), gcd(o.num, self.den).max(1));
        Ratio::new(mul(self.num / g1, o.num / g2), mul(self.den / g2, o.den / g1))
    }
}

impl Div for Ratio {
    type Output = Ratio;
    fn div(self, o: Ratio) -> Ratio {
        assert!(o.num != 0, "division by zero");
        self * Ratio::new(o.den, o.num)
    }
}

impl SimScalar for Ratio {
    fn from_i64(n: i64) -> Ratio {
        Ratio::int(i128::from(n))
    }
}

// ---------------------------------------------------------------------------------------------
// The common setup of §C.8
// ---------------------------------------------------------------------------------------------

/// τ = (5, 3, 1) ticks.
const TAU: [u64; 3] = [5, 3, 1];
/// Client optima c = (6, 3, −3); local work is one gradient step with lr ½ on ½(θ − c_i)².
const C: [i128; 3] = [6, 3, -3];

fn setup() -> Vec<SimClient<Ratio>> {
    TAU.iter().map(|&t| SimClient { compute_ticks: t, importance: r(1, 3) }).collect()
}

/// Δ_i = ½(c_i − θ_start).
fn local_work(i: usize, theta: &Ratio) -> Ratio {
    r(1, 2) * (Ratio::int(C[i]) - *theta)
}

fn run(scheme: Scheme, steps: usize) -> Vec<SimStep<Ratio>> {
    simulate(&setup(), scheme, Ratio::int(1), Ratio::int(0), steps, local_work).unwrap()
}

/// (client, base model index, delay) of each participant of a step.
fn who(step: &SimStep<Ratio>) -> Vec<(usize, usize, usize)> {
    step.participants.iter().map(|p| (p.client, p.base, p.delay)).collect()
}

/// d_i · Δ_i of each participant.
fn contributions(step: &SimStep<Ratio>) -> Vec<Ratio> {
    step.participants.iter().map(|p| p.weight * p.delta).collect()
}

fn cid(i: usize) -> ClientId {
    ClientId::new(format!("c{i}")).unwrap()
}

fn profiles(taus: &[u64], importance: &[f64]) -> ClientProfiles {
    let mut p = ClientProfiles::new();
    for (i, (&t, &imp)) in taus.iter().zip(importance).enumerate() {
        p.set(cid(i), ClientProfile { compute_ticks: t, importance: imp }).unwrap();
    }
    p
}

fn scalar_manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new("theta", DType::F64, vec![])]).unwrap())
}

fn scalar(m: &Arc<ModelManifest>, x: f64) -> Parameters {
    Parameters::from_f64(Arc::clone(m), &[vec![x]]).unwrap()
}

/// Replays a simulated schedule through a real strategy in f64: at step n, every participant's
/// delta ½(c_i − θ^base) (θ^base from the replay's own history) is folded with
/// `weight(client, delay)`, then `finish(θ^n)` gives θ^{n+1}. Returns θ^1, θ^2, ...
fn replay(
    strategy: &mut dyn Strategy,
    schedule: &[SimStep<Ratio>],
    c: &[f64],
    weight: &dyn Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let m = scalar_manifest();
    let mut history = vec![scalar(&m, 0.0)];
    for step in schedule {
        let deltas: Vec<(ClientId, Parameters, f64)> = step
            .participants
            .iter()
            .map(|p| {
                let base = history[p.base].tensor_f64(0)[0];
                (cid(p.client), scalar(&m, 0.5 * (c[p.client] - base)), weight(p.client, p.delay))
            })
            .collect();
        let mut partial = PartialAggregate::new(Arc::clone(&m));
        for (id, d, w) in &deltas {
            strategy.fold(&mut partial, &d.as_update(id, *w)).unwrap();
        }
        let next = strategy.finish(&partial, &history[step.step]).unwrap();
        history.push(next);
    }
    history[1..].iter().map(|p| p.tensor_f64(0)[0]).collect()
}

const C_F64: [f64; 3] = [6.0, 3.0, -3.0];

fn assert_close(got: &[f64], want: &[Ratio], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w.to_f64()).abs() <= tol, "step {n}: got {g}, want {w:?} = {}", w.to_f64());
    }
}

// ---------------------------------------------------------------------------------------------
// C-1 .. C-4
// ---------------------------------------------------------------------------------------------

/// C-1: FedFix with Δt = 2. ⌈τ/Δt⌉ = (3, 2, 1), d = (1, 2/3, 1/3).
#[test]
fn c1_fedfix_period_2() {
    let trace = run(Scheme::FedFix { period_ticks: 2 }, 4);
    let weights: Vec<Ratio> = (0..3).map(|i| r(participation_period(TAU[i], 2) as i128, 3)).collect();
    assert_eq!(weights, vec![r(1, 1), r(2, 3), r(1, 3)]);

    // n = 0, t = 2: {2 (θ⁰, 0)}; ⅓·(−3/2) = −1/2; θ¹ = −1/2.
    assert_eq!((trace[0].time, who(&trace[0])), (2, vec![(2, 0, 0)]));
    assert_eq!(contributions(&trace[0]), vec![r(-1, 2)]);
    assert_eq!(trace[0].model, r(-1, 2));
    // n = 1, t = 4: {1 (θ⁰, 1), 2 (θ¹, 0)}; ⅔·(3/2) = 1, ⅓·(−5/4) = −5/12; θ² = 1/12.
    assert_eq!((trace[1].time, who(&trace[1])), (4, vec![(1, 0, 1), (2, 1, 0)]));
    assert_eq!(contributions(&trace[1]), vec![r(1, 1), r(-5, 12)]);
    assert_eq!(trace[1].model, r(1, 12));
    // n = 2, t = 6: {0 (θ⁰, 2), 2 (θ², 0)}; 1·3 = 3, ⅓·(−37/24) = −37/72; θ³ = 185/72.
    assert_eq!((trace[2].time, who(&trace[2])), (6, vec![(0, 0, 2), (2, 2, 0)]));
    assert_eq!(contributions(&trace[2]), vec![r(3, 1), r(-37, 72)]);
    assert_eq!(trace[2].model, r(185, 72));
    // n = 3, t = 8: {1 (θ², 1), 2 (θ³, 0)}; ⅔·(35/24) = 35/36, ⅓·(−401/144) = −401/432;
    // θ⁴ = 1129/432.
    assert_eq!((trace[3].time, who(&trace[3])), (8, vec![(1, 2, 1), (2, 3, 0)]));
    assert_eq!(contributions(&trace[3]), vec![r(35, 36), r(-401, 432)]);
    assert_eq!(trace[3].model, r(1129, 432));
    assert!((trace[2].model.to_f64() - 2.569444).abs() < 1e-6);
    assert!((trace[3].model.to_f64() - 2.613426).abs() < 1e-6);

    // Participation periods are exactly 3, 2 and 1 steps: delay = period − 1 every time.
    let long = run(Scheme::FedFix { period_ticks: 2 }, 12);
    for (i, &tau) in TAU.iter().enumerate() {
        let steps: Vec<usize> =
            long.iter().filter(|s| s.participants.iter().any(|p| p.client == i)).map(|s| s.step).collect();
        let period = participation_period(tau, 2) as usize;
        assert!(steps.windows(2).all(|w| w[1] - w[0] == period), "client {i}: {steps:?}");
        assert!(long
            .iter()
            .flat_map(|s| &s.participants)
            .filter(|p| p.client == i)
            .all(|p| p.delay == period - 1));
    }

    // The real strategy, weights from `FedFix::update_weight` keyed by client id.
    let fedfix = FedFix::new(2, profiles(&TAU, &[1.0 / 3.0; 3]));
    let w: Vec<f64> = (0..3).map(|i| fedfix.update_weight(&cid(i)).unwrap()).collect();
    let got = replay(&mut fedfix.clone(), &trace, &C_F64, &|i, _| w[i]);
    assert_close(&got, &[r(-1, 2), r(1, 12), r(185, 72), r(1129, 432)], 1e-12);
}

/// C-2: FedFix with Δt = 5 ≥ max τ is synchronous FedAvg: θ = 1, 3/2, 7/4, → 2.
#[test]
fn c2_fedfix_period_5_is_sync_fedavg() {
    let trace = run(Scheme::FedFix { period_ticks: 5 }, 3);
    let sync = run(Scheme::Synchronous, 3);
    let models: Vec<Ratio> = trace.iter().map(|s| s.model).collect();
    assert_eq!(models, vec![r(1, 1), r(3, 2), r(7, 4)]);
    for (a, b) in trace.iter().zip(&sync) {
        assert_eq!(who(a), vec![(0, a.step, 0), (1, a.step, 0), (2, a.step, 0)], "all, delay 0");
        assert_eq!(a.participants, b.participants);
        assert_eq!(a.model, b.model);
        assert!(a.participants.iter().all(|p| p.weight == r(1, 3)));
    }
    // Converges to mean(c) = 2: θ^n = 2 − 2^(1−n)... check 20 steps.
    let far = run(Scheme::FedFix { period_ticks: 5 }, 20);
    assert_eq!(far[19].model, Ratio::int(2) - r(1, 1 << 19));

    // The strategy, and crate::FedAvg over the same deltas (equal num_examples), agree.
    let fedfix = FedFix::new(5, profiles(&TAU, &[1.0 / 3.0; 3]));
    let w: Vec<f64> = (0..3).map(|i| fedfix.update_weight(&cid(i)).unwrap()).collect();
    let got_fedfix = replay(&mut fedfix.clone(), &trace, &C_F64, &|i, _| w[i]);
    let got_fedavg = replay(&mut FedAvg::deltas(1.0), &trace, &C_F64, &|_, _| 1.0);
    assert_close(&got_fedfix, &models, 1e-12);
    assert_close(&got_fedavg, &models, 1e-12);
}

/// C-3: asynchronous FedAvg, weighted d = (23/9, 23/15, 23/45) and identical d = 1.
#[test]
fn c3_async_fedavg() {
    let w = run(Scheme::AsyncFedAvg { weighting: AsyncFedAvgWeighting::Weighted }, 5);
    let id = run(Scheme::AsyncFedAvg { weighting: AsyncFedAvgWeighting::Identical }, 5);
    let d: Vec<Ratio> = (0..3).map(|i| async_fedavg_weight(&TAU, TAU[i], r(1, 3))).collect();
    assert_eq!(d, vec![r(23, 9), r(23, 15), r(23, 45)]);

    // (t, client, base, delay) per row; ties at t = 3: client 1 before client 2.
    let rows = [(1, 2, 0, 0), (2, 2, 1, 0), (3, 1, 0, 2), (3, 2, 2, 1), (4, 2, 4, 0)];
    for trace in [&w, &id] {
        for (s, &(t, c, base, delay)) in trace.iter().zip(&rows) {
            assert_eq!((s.time, who(s)), (t, vec![(c, base, delay)]), "step {}", s.step);
        }
    }
    // Deltas, weighted column: −3/2, −67/60, 3/2, −4489/5400, −859663/486000.
    let deltas: Vec<Ratio> = w.iter().map(|s| s.participants[0].delta).collect();
    assert_eq!(deltas, vec![r(-3, 2), r(-67, 60), r(3, 2), r(-4489, 5400), r(-859663, 486000)]);
    let want_w = [r(-23, 30), r(-3611, 2700), r(2599, 2700), r(130663, 243000), r(-8012579, 21870000)];
    assert_eq!(w.iter().map(|s| s.model).collect::<Vec<_>>(), want_w);
    // Identical column: deltas −3/2, −3/4, 3/2, −3/8, −15/16.
    let deltas: Vec<Ratio> = id.iter().map(|s| s.participants[0].delta).collect();
    assert_eq!(deltas, vec![r(-3, 2), r(-3, 4), r(3, 2), r(-3, 8), r(-15, 16)]);
    let want_id = [r(-3, 2), r(-9, 4), r(-3, 4), r(-9, 8), r(-33, 16)];
    assert_eq!(id.iter().map(|s| s.model).collect::<Vec<_>>(), want_id);

    // Identical weights converge to the surrogate optimum Σ q_i c_i with q_i ∝ 1/τ_i, i.e.
    // (18 + 15 − 45)/23 = −12/23, pulled towards the fast client's −3 (the bias); the weighted
    // ones stay near the federated optimum 2. Long runs in f64 (rational denominators explode),
    // with η_g = 0.1: at η_g = 1 the weighted run diverges here (d_0 = 23/9 on deltas up to
    // 4 steps stale), the instability §C.5 reports.
    let f64_clients: Vec<SimClient<f64>> =
        TAU.iter().map(|&t| SimClient { compute_ticks: t, importance: 1.0 / 3.0 }).collect();
    let tail = |weighting| {
        let t = simulate(&f64_clients, Scheme::AsyncFedAvg { weighting }, 0.1, 0.0, 600, |i, th: &f64| {
            0.5 * (C_F64[i] - th)
        })
        .unwrap();
        t[300..].iter().map(|s| s.model).sum::<f64>() / 300.0
    };
    let (tail_id, tail_w) = (tail(AsyncFedAvgWeighting::Identical), tail(AsyncFedAvgWeighting::Weighted));
    assert!((tail_id + 12.0 / 23.0).abs() < 0.05, "identical weights average {tail_id}");
    assert!((tail_w - 2.0).abs() < 0.2, "weighted average {tail_w}");

    // The real strategy, weights from `AsyncFedAvg::update_weight`.
    for (weighting, trace, want) in
        [(AsyncFedAvgWeighting::Weighted, &w, &want_w), (AsyncFedAvgWeighting::Identical, &id, &want_id)]
    {
        let s = AsyncFedAvg::new(weighting, profiles(&TAU, &[1.0 / 3.0; 3]));
        let d: Vec<f64> = (0..3).map(|i| s.update_weight(&cid(i)).unwrap()).collect();
        let got = replay(&mut s.clone(), trace, &C_F64, &|i, _| d[i]);
        assert_close(&got, want, 1e-12);
    }
}

/// C-4: FedBuff-2 with identical weights d = ½ (Fraboni's simulation).
#[test]
fn c4_fedbuff_2() {
    let trace = run(Scheme::FedBuff { buffer_size: 2 }, 3);
    // n = 0, t = 3: {2, 1} from θ⁰; Δ = (−3/2, 3/2); θ¹ = 0.
    assert_eq!((trace[0].time, who(&trace[0])), (3, vec![(2, 0, 0), (1, 0, 0)]));
    assert_eq!(trace[0].participants.iter().map(|p| p.delta).collect::<Vec<_>>(), vec![r(-3, 2), r(3, 2)]);
    assert_eq!(trace[0].model, r(0, 1));
    // n = 1, t = 5: {2 (θ¹, 0), 0 (θ⁰, 1)}; Δ = (−3/2, 3); θ² = 3/4.
    assert_eq!((trace[1].time, who(&trace[1])), (5, vec![(2, 1, 0), (0, 0, 1)]));
    assert_eq!(trace[1].participants.iter().map(|p| p.delta).collect::<Vec<_>>(), vec![r(-3, 2), r(3, 1)]);
    assert_eq!(trace[1].model, r(3, 4));
    // n = 2, t = 6 (tie at 6): {1 (θ¹, 1), 2 (θ², 0)}; Δ = (3/2, −15/8); θ³ = 9/16.
    assert_eq!((trace[2].time, who(&trace[2])), (6, vec![(1, 1, 1), (2, 2, 0)]));
    assert_eq!(trace[2].participants.iter().map(|p| p.delta).collect::<Vec<_>>(), vec![r(3, 2), r(-15, 8)]);
    assert_eq!(trace[2].model, r(9, 16));
    assert!(trace.iter().flat_map(|s| &s.participants).all(|p| p.weight == r(1, 2)));

    // Fraboni's FedBuff mapping = FedBuff with constant staleness weight, K = 2, division by
    // K, η_g = 1 (§C.3). Folded with `FedBuff::update_weight(num_examples, staleness)`.
    let fedbuff = FedBuff { staleness: StalenessWeight::Constant, ..FedBuff::new(2) };
    let mut strategy = fedbuff;
    let got =
        replay(&mut strategy, &trace, &C_F64, &|_, delay| fedbuff.update_weight(10, Staleness(delay as u64)));
    assert_close(&got, &[r(0, 1), r(3, 4), r(9, 16)], 1e-12);
}

// ---------------------------------------------------------------------------------------------
// C-5 and FedBuff normalisation (bug-cases row 26)
// ---------------------------------------------------------------------------------------------

/// C-5: FLSim polynomial, e = 0.5, avg_staleness = 1: w(τ) = √2/√(1+τ).
#[test]
fn c5_staleness_weights() {
    let w = StalenessWeight::flsim_polynomial(0.5);
    w.validate().unwrap();
    let at = |t: u64| w.weight(Staleness(t));
    assert!((at(0) - std::f64::consts::SQRT_2).abs() < 1e-12);
    assert!((at(1) - 1.0).abs() < 1e-12);
    assert!((at(3) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
    // The vector's printed 6-decimal values.
    #[allow(clippy::approx_constant)]
    let printed = [(0, 1.414214), (1, 1.0), (3, 0.707107)];
    for (t, want) in printed {
        assert!((at(t) - want).abs() < 5e-7, "w({t}) = {}", at(t));
    }
    // The paper's form is not normalised: 1, 1/√2, 1/2.
    let p = StalenessWeight::paper();
    for (t, want) in [(0, 1.0), (1, std::f64::consts::FRAC_1_SQRT_2), (3, 0.5)] {
        assert!((p.weight(Staleness(t)) - want).abs() < 1e-15);
    }
    // Threshold, FLSim-normalised at 1 (cutoff 2, value 0.25): 1 up to 2, then 0.25.
    let th = StalenessWeight::Threshold { cutoff: 2, value: 0.25, avg_staleness: Some(1.0) };
    assert_eq!([0, 2, 3, 100].map(|t| th.weight(Staleness(t))), [1.0, 1.0, 0.25, 0.25]);
    // Normalised where the raw weight is 0.25 (avg staleness past the cutoff): all ×4.
    let th4 = StalenessWeight::Threshold { cutoff: 2, value: 0.25, avg_staleness: Some(5.0) };
    assert_eq!([0, 3].map(|t| th4.weight(Staleness(t))), [4.0, 1.0]);
    assert_eq!(StalenessWeight::Constant.weight(Staleness(u64::MAX)), 1.0);

    // Invalid configurations are typed errors.
    for bad in [
        StalenessWeight::Polynomial { exponent: -0.5, avg_staleness: None },
        StalenessWeight::Polynomial { exponent: f64::NAN, avg_staleness: None },
        StalenessWeight::Polynomial { exponent: 0.5, avg_staleness: Some(-1.0) },
        StalenessWeight::Threshold { cutoff: 1, value: -1.0, avg_staleness: None },
        StalenessWeight::Threshold { cutoff: 1, value: 0.0, avg_staleness: Some(2.0) },
    ] {
        assert_eq!(
            AsyncError::from(bad.validate().unwrap_err()).kind(),
            AsyncErrorKind::InvalidConfig,
            "{bad:?}"
        );
    }
}

/// Builds a FedBuff buffer of scalar deltas `[1]` at the given staleness values and returns the
/// step from θ = 0.
fn fedbuff_step(fedbuff: FedBuff, staleness: &[u64]) -> f64 {
    let m = scalar_manifest();
    let one = scalar(&m, 1.0);
    let ids: Vec<ClientId> = (0..staleness.len()).map(cid).collect();
    let mut partial = PartialAggregate::new(Arc::clone(&m));
    let mut s = fedbuff;
    for (id, &t) in ids.iter().zip(staleness) {
        let w = s.update_weight(1, Staleness(t));
        s.fold(&mut partial, &one.as_update(id, w)).unwrap();
    }
    s.finish(&partial, &scalar(&m, 0.0)).unwrap().tensor_f64(0)[0]
}

/// bug-cases.md row 26: deltas [1], [1], [1] at staleness 0, 1, 3 with s(τ) = 1/√(1+τ).
#[test]
fn row26_fedbuff_normalisation() {
    let base = FedBuff::new(3);
    assert_eq!(base.staleness, StalenessWeight::paper());
    let by_k =
        fedbuff_step(FedBuff { normalisation: FedBuffNormalisation::ByBufferSize, ..base }, &[0, 1, 3]);
    let by_w = fedbuff_step(FedBuff { normalisation: FedBuffNormalisation::ByWeightSum, ..base }, &[0, 1, 3]);
    let sum = fedbuff_step(FedBuff { normalisation: FedBuffNormalisation::Sum, ..base }, &[0, 1, 3]);
    // Σ s_i Δ_i / K = (1 + 0.7071 + 0.5)/3 = 0.7357.
    assert!((by_k - (1.0 + std::f64::consts::FRAC_1_SQRT_2 + 0.5) / 3.0).abs() < 1e-12);
    assert!((by_k - 0.7357).abs() < 5e-5);
    // Σ s_i Δ_i / Σ s_i = 1.0.
    assert!((by_w - 1.0).abs() < 1e-12);
    // FLSim's weighted sum: 2.2071.
    assert!((sum - 2.2071).abs() < 5e-5);

    // FLSim's normalised weight (×√2) scales ByBufferSize but cancels in ByWeightSum.
    let flsim = FedBuff { staleness: StalenessWeight::flsim_polynomial(0.5), ..base };
    let by_k_flsim = fedbuff_step(flsim, &[0, 1, 3]);
    assert!((by_k_flsim - std::f64::consts::SQRT_2 * by_k).abs() < 1e-12);
    let by_w_flsim =
        fedbuff_step(FedBuff { normalisation: FedBuffNormalisation::ByWeightSum, ..flsim }, &[0, 1, 3]);
    assert!((by_w_flsim - 1.0).abs() < 1e-12);

    // Server learning rate scales the step.
    let half = fedbuff_step(FedBuff { server_lr: 0.5, ..base }, &[0, 1, 3]);
    assert!((half - by_k / 2.0).abs() < 1e-15);
}

/// Partial flush after max_wait (bug-cases row 25): ByBufferSize still divides by K, ByWeightSum
/// by the weights present. Overshoot (merged partials above K) divides by the count.
#[test]
fn fedbuff_partial_flush_and_overshoot() {
    let base = FedBuff { staleness: StalenessWeight::Constant, ..FedBuff::new(4) };
    // 2 of 4: each update keeps coefficient 1/4.
    assert_eq!(fedbuff_step(base, &[0, 0]), 0.5);
    assert_eq!(
        fedbuff_step(FedBuff { normalisation: FedBuffNormalisation::ByWeightSum, ..base }, &[0, 5]),
        1.0
    );
    assert_eq!(fedbuff_step(FedBuff { normalisation: FedBuffNormalisation::Sum, ..base }, &[0, 0]), 2.0);
    // 6 folded into a buffer of 4 (concurrent leaves): mean of the 6.
    assert_eq!(fedbuff_step(base, &[0; 6]), 1.0);

    let m = scalar_manifest();
    let mut partial = PartialAggregate::new(Arc::clone(&m));
    let wait = Duration::from_millis(500);
    assert!(!base.should_flush(&partial, Duration::from_secs(3600), wait), "never flush an empty buffer");
    let one = scalar(&m, 1.0);
    let ids: Vec<ClientId> = (0..4).map(cid).collect();
    for id in &ids[..3] {
        base.fold(&mut partial, &one.as_update(id, 1.0)).unwrap();
    }
    assert!(!base.is_full(&partial));
    assert!(!base.should_flush(&partial, Duration::from_millis(499), wait));
    assert!(base.should_flush(&partial, wait, wait));
    base.fold(&mut partial, &one.as_update(&ids[3], 1.0)).unwrap();
    assert!(base.is_full(&partial) && base.should_flush(&partial, Duration::ZERO, wait));
    assert_eq!(base.normaliser(&partial), 4.0);
}

/// Weights: example × staleness; 0 means discard (and folding it is refused).
#[test]
fn fedbuff_update_weight() {
    let fb = FedBuff {
        example_weight: ExampleWeight::NumExamples,
        staleness: StalenessWeight::flsim_polynomial(0.5),
        ..FedBuff::new(10)
    };
    fb.validate().unwrap();
    assert!((fb.update_weight(50, Staleness(1)) - 50.0).abs() < 1e-12);
    assert!((fb.update_weight(50, Staleness(3)) - 50.0 / std::f64::consts::SQRT_2).abs() < 1e-12);
    assert_eq!(fb.update_weight(0, Staleness(0)), 0.0);
    assert_eq!(ExampleWeight::Equal.weight(1000), 1.0);
    assert_eq!(ExampleWeight::Sqrt.weight(16), 4.0);
    assert!((ExampleWeight::Log10.weight(1) - 1.0).abs() < 1e-15);
    assert!((ExampleWeight::Log10.weight(99) - 2.0 / 2f64.log10()).abs() < 1e-12);
    assert_eq!(ExampleWeight::Equal.weight(0), 0.0);

    // A threshold of 0 discards stale updates; the fold refuses weight 0.
    let drop_stale = FedBuff {
        staleness: StalenessWeight::Threshold { cutoff: 2, value: 0.0, avg_staleness: None },
        ..FedBuff::new(2)
    };
    drop_stale.validate().unwrap();
    assert_eq!(drop_stale.update_weight(5, Staleness(2)), 1.0);
    assert_eq!(drop_stale.update_weight(5, Staleness(3)), 0.0);
    let m = scalar_manifest();
    let one = scalar(&m, 1.0);
    let id = cid(0);
    let mut partial = PartialAggregate::new(Arc::clone(&m));
    let e = drop_stale.fold(&mut partial, &one.as_update(&id, 0.0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidWeight);

    // The uniform runtime hook gives the same numbers.
    let via_trait = AsyncWeighting::fold_weight(&fb, &id, 50, Staleness(3)).unwrap();
    assert_eq!(via_trait, fb.update_weight(50, Staleness(3)));

    for bad in [
        FedBuff::new(0),
        FedBuff { server_lr: 0.0, ..FedBuff::new(1) },
        FedBuff { server_lr: f64::NAN, ..FedBuff::new(1) },
    ] {
        assert_eq!(bad.validate().unwrap_err().kind(), AsyncErrorKind::InvalidConfig);
    }
}

/// Staleness = current version − base version; a base from the future is rejected.
#[test]
fn staleness_between_versions() {
    assert_eq!(Staleness::between(ModelVersion(7), ModelVersion(4)).unwrap(), Staleness(3));
    assert_eq!(Staleness::between(ModelVersion(7), ModelVersion(7)).unwrap(), Staleness(0));
    let e = AsyncError::from(Staleness::between(ModelVersion(3), ModelVersion(4)).unwrap_err());
    assert_eq!(e.kind(), AsyncErrorKind::FutureBase);
    assert_eq!(e.kind().as_str(), "future_base");
}

/// Streaming: the buffer split over two partials and merged gives the same step; empty is
/// ZeroTotalWeight; per-tensor policies (int mean, max counter, skip) follow FedAvg's delta mode.
#[test]
fn streaming_merge_policies_and_errors() {
    let mut specs = vec![
        TensorSpec::new("w", DType::F32, vec![2]),
        TensorSpec::new("steps", DType::I64, vec![]),
        TensorSpec::new("bn.num_batches_tracked", DType::I64, vec![]),
        TensorSpec::new("frozen", DType::F32, vec![1]),
    ];
    specs[2].policy = AggregationPolicy::Max;
    specs[3].policy = AggregationPolicy::Skip;
    let m = Arc::new(ModelManifest::new(specs).unwrap());
    let global =
        Parameters::from_f64(Arc::clone(&m), &[vec![1.0, 2.0], vec![100.0], vec![40.0], vec![7.0]]).unwrap();
    let deltas: Vec<Parameters> = [[2.0, -2.0, 3.0, 10.0], [4.0, 2.0, 4.0, 30.0], [0.0, 6.0, 5.0, 20.0]]
        .iter()
        .map(|d| {
            Parameters::from_f64(Arc::clone(&m), &[vec![d[0], d[1]], vec![d[2]], vec![d[3]], vec![9.0]])
                .unwrap()
        })
        .collect();
    let ids: Vec<ClientId> = (0..3).map(cid).collect();
    let mut fb = FedBuff { staleness: StalenessWeight::Constant, ..FedBuff::new(3) };
    assert_eq!(fb.mergeability(), Mergeability::Streaming);
    assert_eq!(fb.name(), "fedbuff");

    let mut whole = PartialAggregate::new(Arc::clone(&m));
    let views: Vec<_> = deltas.iter().zip(&ids).map(|(d, id)| d.as_update(id, 1.0)).collect();
    fb.fold_batch(&mut whole, &views).unwrap();
    let mut a = PartialAggregate::new(Arc::clone(&m));
    let mut b = PartialAggregate::new(Arc::clone(&m));
    fb.fold(&mut a, &views[2]).unwrap();
    fb.fold_batch(&mut b, &views[..2]).unwrap();
    fb.merge(&mut b, &a).unwrap();
    let x = fb.finish(&whole, &global).unwrap();
    let y = fb.finish(&b, &global).unwrap();
    assert_eq!(x, y);
    // w: [1 + 6/3, 2 + 6/3] = [3, 4]; steps (i64 mean): 100 + 12/3 = 104; counter (max of
    // deltas): 40 + 30 = 70; frozen (skip): 7.
    assert_eq!(x.tensor_f64(0), vec![3.0, 4.0]);
    assert_eq!(x.tensor_f64(1), vec![104.0]);
    assert_eq!(x.tensor_f64(2), vec![70.0]);
    assert_eq!(x.tensor_f64(3), vec![7.0]);

    let empty = PartialAggregate::new(Arc::clone(&m));
    assert_eq!(fb.finish(&empty, &global).unwrap_err().kind(), ErrorKind::ZeroTotalWeight);
    let mut ff = FedFix::new(2, profiles(&TAU, &[1.0 / 3.0; 3]));
    assert_eq!(ff.finish(&empty, &global).unwrap_err().kind(), ErrorKind::ZeroTotalWeight);

    // Overflow of the output dtype is a typed error, not an Inf model.
    let big =
        Parameters::from_f64(Arc::clone(&m), &[vec![3e38, 0.0], vec![0.0], vec![0.0], vec![0.0]]).unwrap();
    let mut p = PartialAggregate::new(Arc::clone(&m));
    fb.fold(&mut p, &big.as_update(&ids[0], 1.0)).unwrap();
    let mut sum = FedBuff { normalisation: FedBuffNormalisation::Sum, ..fb };
    assert_eq!(sum.finish(&p, &big).unwrap_err().kind(), ErrorKind::NonFiniteResult);
}

/// FedFix / async FedAvg client bookkeeping: keyed by ClientId, typed errors.
#[test]
fn client_profiles_and_errors() {
    let mut fedfix = FedFix::new(2, profiles(&TAU, &[0.5, 0.25, 0.25]));
    assert_eq!(fedfix.participation_period(&cid(0)).unwrap(), 3);
    assert_eq!(fedfix.update_weight(&cid(0)).unwrap(), 1.5);
    assert_eq!(fedfix.step_time(0), 2);
    assert_eq!(fedfix.step_time(3), 8);
    let stranger = ClientId::new("stranger").unwrap();
    assert_eq!(fedfix.update_weight(&stranger).unwrap_err().kind(), AsyncErrorKind::UnknownClient);
    // A new compute-time estimate from the runtime changes the weight.
    fedfix.clients.set_compute_ticks(&cid(0), 2).unwrap();
    assert_eq!(fedfix.update_weight(&cid(0)).unwrap(), 0.5);
    assert_eq!(
        AsyncWeighting::fold_weight(&fedfix, &cid(0), 999, Staleness(9)).unwrap(),
        fedfix.update_weight(&cid(0)).unwrap()
    );
    let zero_period = FedFix::new(0, profiles(&TAU, &[0.5, 0.25, 0.25]));
    assert_eq!(zero_period.update_weight(&cid(0)).unwrap_err().kind(), AsyncErrorKind::InvalidConfig);

    let mut p = ClientProfiles::new();
    let e = p.set(cid(0), ClientProfile { compute_ticks: 0, importance: 1.0 }).unwrap_err();
    assert_eq!(e.kind(), AsyncErrorKind::InvalidConfig);
    let e = p.set(cid(0), ClientProfile { compute_ticks: 1, importance: -1.0 }).unwrap_err();
    assert_eq!(e.kind(), AsyncErrorKind::InvalidConfig);
    assert!(p.is_empty());
    let u = ClientProfiles::uniform((0..4).map(|i| (cid(i), 10 + i as u64))).unwrap();
    assert!(u.iter().all(|(_, p)| p.importance == 0.25));

    let af = AsyncFedAvg::new(AsyncFedAvgWeighting::Identical, profiles(&TAU, &[1.0 / 3.0; 3]));
    assert_eq!(af.update_weight(&stranger).unwrap_err().kind(), AsyncErrorKind::UnknownClient);
    assert_eq!(af.name(), "async-fedavg");

    // Simulator input errors.
    let none: Vec<SimClient<f64>> = vec![];
    let e = simulate(&none, Scheme::Synchronous, 1.0, 0.0, 1, |_, _| 0.0).unwrap_err();
    assert_eq!(e.kind(), AsyncErrorKind::InvalidConfig);
    let three: Vec<SimClient<f64>> =
        TAU.iter().map(|&t| SimClient { compute_ticks: t, importance: 1.0 / 3.0 }).collect();
    for scheme in [
        Scheme::FedBuff { buffer_size: 4 },
        Scheme::FedBuff { buffer_size: 0 },
        Scheme::FedFix { period_ticks: 0 },
    ] {
        assert!(simulate(&three, scheme, 1.0, 0.0, 1, |_, _| 0.0).is_err(), "{scheme:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// §C.5 reference numbers
// ---------------------------------------------------------------------------------------------

/// M = 10, F-80: τ_i = 1 − i·0.8/9, i.e. (90 − 8i) ticks of 1/90 time unit, p_i = 1/10.
#[test]
fn c5_reference_numbers_m10_f80() {
    let taus: Vec<u64> = (0..10).map(|i| 90 - 8 * i).collect();
    let p = profiles(&taus, &[0.1; 10]);
    // Σ1/τ = 21.2806 (per time unit: 90 × Σ 1/ticks).
    assert!((90.0 * p.inverse_time_sum() - 21.2806).abs() < 5e-5);
    // Exactly, in rationals: Σ 90/(90 − 8i).
    let exact = (0..10).fold(Ratio::int(0), |s, i| s + r(90, 90 - 8 * i));
    assert!((exact.to_f64() - 21.280592).abs() < 1e-6);

    let af = AsyncFedAvg::new(AsyncFedAvgWeighting::Weighted, p.clone());
    let want = [2.128, 1.939, 1.750, 1.561, 1.371, 1.182, 0.993, 0.804, 0.615, 0.426];
    for (i, w) in want.iter().enumerate() {
        let d = af.update_weight(&cid(i)).unwrap();
        assert!((d - w).abs() < 5e-4, "client {i}: d = {d}, want {w}");
    }
    // The weights make E[ω_i] ∝ p_i: d_i × (participation share (1/τ_i)/Σ(1/τ_j)) = p_i.
    for (i, &t) in taus.iter().enumerate() {
        let share = (1.0 / t as f64) / p.inverse_time_sum();
        assert!((af.update_weight(&cid(i)).unwrap() * share - 0.1).abs() < 1e-15);
    }

    // FedFix-0.5 (45 ticks): ⌈τ/Δt⌉ = (2 ×6, 1 ×4), d = (0.2 ×6, 0.1 ×4).
    let ff = FedFix::new(45, p.clone());
    let periods: Vec<u64> = (0..10).map(|i| ff.participation_period(&cid(i)).unwrap()).collect();
    assert_eq!(periods, [2, 2, 2, 2, 2, 2, 1, 1, 1, 1]);
    let d: Vec<f64> = (0..10).map(|i| ff.update_weight(&cid(i)).unwrap()).collect();
    assert_eq!(d, [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1]);
    // FedFix-0.2 (18 ticks): (5, 5, 5, 4, 4, 3, 3, 2, 2, 1). The last, τ = Δt = 0.2 exactly, is
    // the boundary §C.6 point 4 warns about: in integer ticks it is exactly 1.
    let ff = FedFix::new(18, p);
    let periods: Vec<u64> = (0..10).map(|i| ff.participation_period(&cid(i)).unwrap()).collect();
    assert_eq!(periods, [5, 5, 5, 4, 4, 3, 3, 2, 2, 1]);
}

// ---------------------------------------------------------------------------------------------
// Property: a period at least the slowest client's time is synchronous FedAvg
// ---------------------------------------------------------------------------------------------

fn config() -> ProptestConfig {
    ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// For random τ (1-8 ticks), importances p_i = n_i/Σn, optima c_i and Δt ≥ max τ:
    /// FedFix's trajectory equals synchronous FedAvg's exactly (rationals), and the FedFix
    /// strategy equals `FedAvg::deltas(1)` weighted by n_i (f64). For any Δt, every client takes
    /// part exactly every ⌈τ_i/Δt⌉ steps with delay ⌈τ_i/Δt⌉ − 1.
    #[test]
    fn period_at_least_slowest_is_sync_fedavg(
        clients in prop::collection::vec((1u64..=8, 1i128..=6, -10i128..=10), 1..=4),
        extra in 0u64..=4,
        any_period in 1u64..=8,
    ) {
        let total: i128 = clients.iter().map(|c| c.1).sum();
        let sim_clients: Vec<SimClient<Ratio>> =
            clients.iter().map(|&(t, n, _)| SimClient { compute_ticks: t, importance: r(n, total) }).collect();
        let c: Vec<i128> = clients.iter().map(|c| c.2).collect();
        let work = |i: usize, th: &Ratio| r(1, 2) * (Ratio::int(c[i]) - *th);
        let max_tau = clients.iter().map(|c| c.0).max().unwrap();
        let steps = 4;
        let fedfix = simulate(&sim_clients, Scheme::FedFix { period_ticks: max_tau + extra }, Ratio::int(1),
            Ratio::int(0), steps, work).unwrap();
        let sync = simulate(&sim_clients, Scheme::Synchronous, Ratio::int(1), Ratio::int(0), steps, work).unwrap();
        for (a, b) in fedfix.iter().zip(&sync) {
            prop_assert_eq!(&a.participants, &b.participants);
            prop_assert_eq!(a.model, b.model);
        }

        // f64: the FedFix strategy vs crate::FedAvg over the same deltas.
        let taus: Vec<u64> = clients.iter().map(|c| c.0).collect();
        let imp: Vec<f64> = clients.iter().map(|c| c.1 as f64 / total as f64).collect();
        let s = FedFix::new(max_tau + extra, profiles(&taus, &imp));
        let d: Vec<f64> = (0..clients.len()).map(|i| s.update_weight(&cid(i)).unwrap()).collect();
        let cf: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        let got_fedfix = replay(&mut s.clone(), &fedfix, &cf, &|i, _| d[i]);
        let n: Vec<f64> = clients.iter().map(|c| c.1 as f64).collect();
        let got_fedavg = replay(&mut FedAvg::deltas(1.0), &fedfix, &cf, &|i, _| n[i]);
        for ((x, y), want) in got_fedfix.iter().zip(&got_fedavg).zip(&fedfix) {
            prop_assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "fedfix {} fedavg {}", x, y);
            prop_assert!((x - want.model.to_f64()).abs() <= 1e-12 * (1.0 + x.abs()));
        }

        // Participation periods for an arbitrary Δt. Only who takes part, and when, is checked:
        // no work, so the exact rationals of 12 steps cannot overflow i128 (they did, with
        // `work`, for 4 clients with Δt = 1).
        let idle = |_: usize, _: &Ratio| Ratio::int(0);
        let trace = simulate(&sim_clients, Scheme::FedFix { period_ticks: any_period }, Ratio::int(1),
            Ratio::int(0), 12, idle).unwrap();
        for (i, &t) in taus.iter().enumerate() {
            let period = participation_period(t, any_period) as usize;
            let mut steps_in = Vec::new();
            for s in &trace {
                for p in s.participants.iter().filter(|p| p.client == i) {
                    prop_assert_eq!(p.delay, period - 1);
                    steps_in.push(s.step);
                }
            }
            prop_assert_eq!(steps_in, (period - 1..12).step_by(period).collect::<Vec<_>>());
        }
    }
}
