//! Tests of `shoal_functions::server_opt`: FedAvgM, FedAdam, FedYogi, FedAdagrad and their
//! composition with any strategy.
//!
//! - Three-step vectors for each optimiser, derived by hand in the comments (two elements,
//!   x_0 = [1, −1], pseudo-gradients Δ_1 = [1, −1/2], Δ_2 = [1/16, −1], Δ_3 = [−2, 1/2], given
//!   as `aggregated = x + Δ`). The decimals were checked with an independent float evaluation
//!   of the same formulas; tolerance 1e-9 (the comments round to 10 digits), exact for FedAvgM.
//! - `bug-cases.md` row 5 (Flower PR #885) as a property: FedYogi over 5 rounds of
//!   alternating-sign deltas with magnitudes 1e-8..1e3 keeps v_t ≥ 0 and the output finite.
//! - Integer and non-`mean` tensors are not optimised (rows 7-8).
//! - FedAvgM with momentum 0 and η = 1 is plain FedAvg.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use proptest::prelude::*;
use shoal_functions::asynchronous::{FedBuff, Staleness, StalenessWeight};
use shoal_functions::server_opt::{
    BiasCorrection, ServerOptErrorKind, ServerOptimizer, ServerOptimizerSpec, WithServerOptimizer,
};
use shoal_functions::tensor::AggregationPolicy;
use shoal_functions::{
    ClientId, DType, Error, ErrorKind, FedAvg, Mergeability, ModelManifest, Parameters, PartialAggregate,
    Result, Strategy, TensorSpec, UpdateView,
};

fn vec2() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F64, vec![2])]).unwrap())
}

fn params(m: &Arc<ModelManifest>, x: &[f64]) -> Parameters {
    Parameters::from_f64(Arc::clone(m), &[x.to_vec()]).unwrap()
}

/// The pseudo-gradients of the hand-computed vectors.
const DELTAS: [[f64; 2]; 3] = [[1.0, -0.5], [0.0625, -1.0], [-2.0, 0.5]];

/// Runs three steps from x_0 = [1, −1], `aggregated = x + Δ_t`; returns x_1..x_3 and the
/// optimiser.
fn three_steps(config: ServerOptimizerSpec) -> (Vec<Vec<f64>>, ServerOptimizer) {
    let m = vec2();
    let mut opt = ServerOptimizer::new(config).unwrap();
    let mut x = params(&m, &[1.0, -1.0]);
    let mut out = Vec::new();
    for d in DELTAS {
        let xv = x.tensor_f64(0);
        let agg = params(&m, &[xv[0] + d[0], xv[1] + d[1]]);
        x = opt.step(&x, &agg).unwrap();
        out.push(x.tensor_f64(0));
    }
    (out, opt)
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "{what}: got {got:?}, want {want:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-computed vectors
// ---------------------------------------------------------------------------------------------

/// FedAvgM, η = 1/2, β = 1/2 (all values binary fractions, so exact):
/// t=1: m = Δ_1 = [1, −1/2];                    x_1 = [1, −1] + ½m = [1.5, −1.25]
/// t=2: m = ½[1, −½] + [1/16, −1] = [0.5625, −1.25]; x_2 = [1.78125, −1.875]
/// t=3: m = ½[0.5625, −1.25] + [−2, ½] = [−1.71875, −0.125]; x_3 = [0.921875, −1.9375]
#[test]
fn fedavgm_three_steps() {
    let (x, opt) = three_steps(ServerOptimizerSpec::FedAvgM { lr: 0.5, momentum: 0.5 });
    assert_eq!(x, vec![vec![1.5, -1.25], vec![1.78125, -1.875], vec![0.921875, -1.9375]]);
    assert_eq!(opt.first_moment().unwrap(), &[-1.71875, -0.125]);
    assert!(opt.second_moment().is_none());
    assert_eq!(opt.steps(), 3);
}

/// FedAdam, Flower's defaults η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-9, Flower's bias correction
/// η_t = η√(1−β₂^(t+1))/(1−β₁^(t+1)):
/// t=1: m = 0.1Δ = [0.1, −0.05]; v = 0.01Δ² = [0.01, 0.0025]; √v = [0.1, 0.05];
///      η_1 = 0.1·√(1−0.99²)/(1−0.9²) = 0.1·√0.0199/0.19 = 0.0742459788;
///      x_1 = x_0 + η_1·[0.1/(0.1+τ), −0.05/(0.05+τ)] = [1.0742459781, −1.0742459774]
/// t=2: m = 0.9m + 0.1Δ = [0.09625, −0.145]; v = 0.99v + 0.01Δ² = [0.0099390625, 0.012475];
///      η_2 = 0.1·√(1−0.99³)/(1−0.9³) = 0.1·√0.029701/0.271 = 0.0635940150;
///      x_2 = x_1 + η_2·m/(√v+τ) = x_1 + [0.0613966, −0.0825589] = [1.1356425705, −1.1568048903]
/// t=3: m = [0.086625 − 0.2, −0.1305 + 0.05] = [−0.113375, −0.0805];
///      v = [0.009839671875 + 0.04, 0.01235025 + 0.0025] = [0.049839671875, 0.01485025];
///      η_3 = 0.1·√(1−0.99⁴)/(1−0.9⁴) = 0.0577215420;
///      x_3 = x_2 + η_3·m/(√v+τ) = [1.1063290733, −1.1949349003]
#[test]
fn fedadam_three_steps() {
    let (x, opt) = three_steps(ServerOptimizerSpec::fedadam());
    assert_close(&x[0], &[1.0742459781, -1.0742459774], 1e-9, "x1");
    assert_close(&x[1], &[1.1356425705, -1.1568048903], 1e-9, "x2");
    assert_close(&x[2], &[1.1063290733, -1.1949349003], 1e-9, "x3");
    assert_close(opt.first_moment().unwrap(), &[-0.113375, -0.0805], 1e-12, "m3");
    assert_close(opt.second_moment().unwrap(), &[0.049839671875, 0.01485025], 1e-12, "v3");

    // Kingma & Ba's correction (exponent t): η_1 = 0.1·√0.01/0.1 = 0.1, so
    // x_1 = x_0 + 0.1·[0.1/(0.1+τ), −0.05/(0.05+τ)] = [1.099999999, −1.099999998].
    // Reddi et al. (no correction) gives the same first step, since √(1−β₂)/(1−β₁) = 1 here.
    for bias_correction in [BiasCorrection::KingmaBa, BiasCorrection::Off] {
        let c = ServerOptimizerSpec::FedAdam { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-9, bias_correction };
        let (x, _) = three_steps(c);
        assert_close(&x[0], &[1.099999999, -1.099999998], 1e-12, "x1 (Kingma & Ba / off)");
    }
    // ... but not the same second step: Kingma & Ba's η_2 = 0.1·√0.0199/0.19 = η_1 (Flower).
    let kb = ServerOptimizerSpec::FedAdam {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        tau: 1e-9,
        bias_correction: BiasCorrection::KingmaBa,
    };
    let (x, _) = three_steps(kb);
    assert_close(&x[1], &[1.1716804881, -1.1963874852], 1e-9, "x2 (Kingma & Ba)");
}

/// FedYogi, Flower's defaults η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3, no bias correction;
/// v_t = v − (1−β₂)Δ² sign(v − Δ²):
/// t=1: m = [0.1, −0.05]; v = 0 + 0.01Δ² = [0.01, 0.0025] (v < Δ²);
///      x_1 = x_0 + 0.01·[0.1/0.101, −0.05/0.051] = [1.0099009901, −1.0098039216]
/// t=2: Δ² = [1/256, 1]. Element 0: v = 0.01 > 0.00390625, so v = 0.01 − 0.01/256 = 0.0099609375
///      (Yogi shrinks v, unlike Adam's 0.0099390625); element 1: v = 0.0025 < 1, so
///      v = 0.0025 + 0.01 = 0.0125. m = [0.09625, −0.145];
///      x_2 = x_1 + 0.01·m/(√v + 0.001) = [1.0194491753, −1.0226581442]
/// t=3: Δ² = [4, 1/4] > v: v = [0.0099609375 + 0.04, 0.0125 + 0.0025] = [0.0499609375, 0.015];
///      m = [−0.113375, −0.0805]; x_3 = [1.0143995011, −1.0291777096]
#[test]
fn fedyogi_three_steps() {
    let (x, opt) = three_steps(ServerOptimizerSpec::fedyogi());
    assert_close(&x[0], &[1.0099009901, -1.0098039216], 1e-9, "x1");
    assert_close(&x[1], &[1.0194491753, -1.0226581442], 1e-9, "x2");
    assert_close(&x[2], &[1.0143995011, -1.0291777096], 1e-9, "x3");
    assert_close(opt.second_moment().unwrap(), &[0.0499609375, 0.015], 1e-12, "v3");
}

/// FedAdagrad, Flower's defaults η = 0.1, β₁ = 0 (m = Δ), τ = 1e-9; v_t = v + Δ²:
/// t=1: v = [1, 0.25]; x_1 = x_0 + 0.1·[1/(1+τ), −0.5/(0.5+τ)] = [1.0999999999, −1.0999999998]
/// t=2: v = [1.00390625, 1.25]; x_2 = x_1 + 0.1·[0.0625/1.0019512, −1/1.1180340]
///      = [1.1062378285, −1.1894427188]
/// t=3: v = [5.00390625, 1.5]; x_3 = x_2 + 0.1·[−2/2.2369413, 0.5/1.2247449]
///      = [1.0168300276, −1.1486178898]
#[test]
fn fedadagrad_three_steps() {
    let (x, opt) = three_steps(ServerOptimizerSpec::fedadagrad());
    assert_close(&x[0], &[1.0999999999, -1.0999999998], 1e-9, "x1");
    assert_close(&x[1], &[1.1062378285, -1.1894427188], 1e-9, "x2");
    assert_close(&x[2], &[1.0168300276, -1.1486178898], 1e-9, "x3");
    assert_close(opt.second_moment().unwrap(), &[5.00390625, 1.5], 1e-12, "v3");
    assert_close(opt.first_moment().unwrap(), &[-2.0, 0.5], 1e-12, "m3");
}

/// The defaults are Flower's (flower.md §5 point 5) where Flower has them.
#[test]
fn defaults() {
    assert_eq!(
        ServerOptimizerSpec::fedadam(),
        ServerOptimizerSpec::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-9,
            bias_correction: BiasCorrection::Flower
        }
    );
    assert_eq!(
        ServerOptimizerSpec::fedyogi(),
        ServerOptimizerSpec::FedYogi { lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 }
    );
    assert_eq!(
        ServerOptimizerSpec::fedadagrad(),
        ServerOptimizerSpec::FedAdagrad { lr: 0.1, beta1: 0.0, tau: 1e-9 }
    );
    assert_eq!(ServerOptimizerSpec::fedavgm(), ServerOptimizerSpec::FedAvgM { lr: 0.1, momentum: 0.9 });
    // The job-spec form.
    let json = serde_json::to_string(&ServerOptimizerSpec::fedyogi()).unwrap();
    assert_eq!(json, r#"{"name":"fedyogi","lr":0.01,"beta1":0.9,"beta2":0.99,"tau":0.001}"#);
    let back: ServerOptimizerSpec =
        serde_json::from_str(r#"{"name":"fedadam","lr":0.1,"beta1":0.9,"beta2":0.99,"tau":1e-9}"#).unwrap();
    assert_eq!(back, ServerOptimizerSpec::fedadam());
}

// ---------------------------------------------------------------------------------------------
// bug-cases row 5: FedYogi never produces a negative v_t or a non-finite model
// ---------------------------------------------------------------------------------------------

fn config() -> ProptestConfig {
    ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// 5 rounds; in round r every element's delta is (−1)^r · s_e · 10^k with k uniform in
    /// [−8, 3] (fresh per round and element) and a random initial sign s_e; τ = 1e-3 (Flower's
    /// FedYogi default). f64 and f32 tensors (in f32 the tiniest deltas vanish against the
    /// model, which must also be fine).
    #[test]
    fn fedyogi_v_nonnegative_and_output_finite(
        x0 in prop::collection::vec(-1.0f64..1.0, 12),
        signs in prop::collection::vec(any::<bool>(), 12),
        exps in prop::collection::vec(prop::collection::vec(-8.0f64..=3.0, 12), 5),
    ) {
        let m = Arc::new(ModelManifest::new(vec![
            TensorSpec::new("a", DType::F64, vec![6]),
            TensorSpec::new("b", DType::F32, vec![2, 3]),
        ]).unwrap());
        let mut opt = ServerOptimizer::new(ServerOptimizerSpec::fedyogi()).unwrap();
        let mut x = Parameters::from_f64(Arc::clone(&m), &[x0[..6].to_vec(), x0[6..].to_vec()]).unwrap();
        for (round, e) in exps.iter().enumerate() {
            let xs: Vec<f64> = (0..2).flat_map(|i| x.tensor_f64(i)).collect();
            let agg: Vec<f64> = (0..12).map(|k| {
                let s = if signs[k] == (round % 2 == 0) { 1.0 } else { -1.0 };
                xs[k] + s * 10f64.powf(e[k])
            }).collect();
            let agg = Parameters::from_f64(Arc::clone(&m), &[agg[..6].to_vec(), agg[6..].to_vec()]).unwrap();
            x = opt.step(&x, &agg).unwrap();
            let v = opt.second_moment().unwrap();
            prop_assert!(v.iter().all(|v| v.is_finite() && *v >= 0.0), "round {}: v = {:?}", round, v);
            for i in 0..2 {
                prop_assert!(x.tensor_f64(i).iter().all(|y| y.is_finite()), "round {}", round);
            }
        }
        prop_assert_eq!(opt.steps(), 5);
    }
}

/// A scalar oracle of the four rules, written from the module's table (m_0 = v_0 = 0, t from 1,
/// Flower's bias correction).
struct Oracle {
    config: ServerOptimizerSpec,
    t: f64,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Oracle {
    fn new(config: ServerOptimizerSpec, n: usize) -> Oracle {
        Oracle { config, t: 0.0, m: vec![0.0; n], v: vec![0.0; n] }
    }

    fn step(&mut self, x: &[f64], a: &[f64]) -> Vec<f64> {
        self.t += 1.0;
        let (t, m, v) = (self.t, &mut self.m, &mut self.v);
        (0..x.len())
            .map(|e| {
                let d = a[e] - x[e];
                match self.config {
                    ServerOptimizerSpec::FedAvgM { lr, momentum } => {
                        m[e] = momentum * m[e] + d;
                        x[e] + lr * m[e]
                    }
                    ServerOptimizerSpec::FedAdam { lr, beta1, beta2, tau, .. } => {
                        m[e] = beta1 * m[e] + (1.0 - beta1) * d;
                        v[e] = beta2 * v[e] + (1.0 - beta2) * (d * d);
                        let lr_t = lr * (1.0 - beta2.powf(t + 1.0)).sqrt() / (1.0 - beta1.powf(t + 1.0));
                        x[e] + lr_t * m[e] / (v[e].sqrt() + tau)
                    }
                    ServerOptimizerSpec::FedYogi { lr, beta1, beta2, tau } => {
                        m[e] = beta1 * m[e] + (1.0 - beta1) * d;
                        let d2 = d * d;
                        let s = if v[e] > d2 {
                            1.0
                        } else if v[e] < d2 {
                            -1.0
                        } else {
                            0.0
                        };
                        v[e] -= (1.0 - beta2) * d2 * s;
                        x[e] + lr * m[e] / (v[e].sqrt() + tau)
                    }
                    ServerOptimizerSpec::FedAdagrad { lr, beta1, tau } => {
                        m[e] = beta1 * m[e] + (1.0 - beta1) * d;
                        v[e] += d * d;
                        x[e] + lr * m[e] / (v[e].sqrt() + tau)
                    }
                }
            })
            .collect()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The in-place f32/f64 kernels and the generic path (f16, bf16) agree bit for bit with the
    /// scalar oracle, rounded to each dtype as `Parameters::from_f64` rounds, over three steps
    /// of every optimiser. The oracle sees the model and aggregates as stored (dtype-rounded).
    #[test]
    fn kernels_match_scalar_oracle(
        x0 in prop::collection::vec(-4.0f64..4.0, 14),
        aggs in prop::collection::vec(prop::collection::vec(-4.0f64..4.0, 14), 3),
    ) {
        let m = Arc::new(ModelManifest::new(vec![
            TensorSpec::new("a", DType::F32, vec![5]),
            TensorSpec::new("b", DType::F64, vec![3]),
            TensorSpec::new("c", DType::F16, vec![4]),
            TensorSpec::new("d", DType::BF16, vec![2]),
        ]).unwrap());
        let split = |v: &[f64]| vec![v[..5].to_vec(), v[5..8].to_vec(), v[8..12].to_vec(), v[12..].to_vec()];
        let to_params = |v: &[f64]| Parameters::from_f64(Arc::clone(&m), &split(v)).unwrap();
        let flat = |p: &Parameters| (0..4).flat_map(|i| p.tensor_f64(i)).collect::<Vec<f64>>();
        for config in [
            ServerOptimizerSpec::FedAvgM { lr: 0.7, momentum: 0.9 },
            ServerOptimizerSpec::fedadam(),
            ServerOptimizerSpec::fedyogi(),
            ServerOptimizerSpec::FedAdagrad { lr: 0.1, beta1: 0.5, tau: 1e-9 },
        ] {
            let mut opt = ServerOptimizer::new(config).unwrap();
            let mut oracle = Oracle::new(config, 14);
            let mut x = to_params(&x0);
            for a in &aggs {
                let a = to_params(a);
                let want = to_params(&oracle.step(&flat(&x), &flat(&a)));
                x = opt.step(&x, &a).unwrap();
                prop_assert_eq!(&x, &want, "{}", config.name());
            }
            prop_assert_eq!(opt.second_moment().map(<[f64]>::to_vec), config.has_second_moment().then(|| oracle.v.clone()));
            prop_assert_eq!(opt.first_moment().unwrap(), &oracle.m[..]);
        }
    }
}

/// Yogi's sign(0) = 0: when Δ² equals v exactly, v is unchanged (`f64::signum(0.0)` = 1 would
/// shrink it). β₂ = 0.75, Δ_1 = 1: v_1 = 0.25·1 = 0.25; Δ_2 = 0.5: Δ² = 0.25 = v_1, so v_2 = 0.25.
#[test]
fn fedyogi_sign_zero_keeps_v() {
    let m = vec2();
    let cfg = ServerOptimizerSpec::FedYogi { lr: 0.01, beta1: 0.9, beta2: 0.75, tau: 1e-3 };
    let mut opt = ServerOptimizer::new(cfg).unwrap();
    let x0 = params(&m, &[0.0, 0.0]);
    let x1 = opt.step(&x0, &params(&m, &[1.0, 1.0])).unwrap();
    assert_eq!(opt.second_moment().unwrap(), &[0.25, 0.25]);
    let x1v = x1.tensor_f64(0);
    let agg = params(&m, &[x1v[0] + 0.5, x1v[1] + 0.5]);
    // The recomputed Δ = agg − x1 must be exactly 0.5 for the check to mean anything.
    assert_eq!(agg.tensor_f64(0)[0] - x1v[0], 0.5);
    opt.step(&x1, &agg).unwrap();
    assert_eq!(opt.second_moment().unwrap(), &[0.25, 0.25]);
}

// ---------------------------------------------------------------------------------------------
// Integer and counter tensors
// ---------------------------------------------------------------------------------------------

fn mixed_manifest() -> Arc<ModelManifest> {
    let mut specs = vec![
        TensorSpec::new("w", DType::F32, vec![3]),
        TensorSpec::new("steps", DType::I64, vec![]),
        TensorSpec::new("bn.num_batches_tracked", DType::I64, vec![]),
        TensorSpec::new("frozen", DType::F32, vec![1]),
        TensorSpec::new("head", DType::F32, vec![2]),
        TensorSpec::new("h", DType::F16, vec![2]),
    ];
    specs[2].policy = AggregationPolicy::Max;
    specs[3].policy = AggregationPolicy::Skip;
    specs[4].policy = AggregationPolicy::First;
    Arc::new(ModelManifest::new(specs).unwrap())
}

/// bug-cases rows 7-8: integer tensors (even with the `mean` policy) and max/first/skip tensors
/// take the aggregated value as is; their moments stay 0. Float mean tensors (f32, f16) move.
#[test]
fn integer_and_counter_tensors_untouched() {
    let m = mixed_manifest();
    let global = Parameters::from_f64(
        Arc::clone(&m),
        &[vec![1.0, 2.0, 3.0], vec![7.0], vec![10.0], vec![5.0], vec![0.5, 0.5], vec![1.0, -1.0]],
    )
    .unwrap();
    let aggregated = Parameters::from_f64(
        Arc::clone(&m),
        &[vec![2.0, 2.0, 1.0], vec![16.0], vec![40.0], vec![5.0], vec![0.75, 0.25], vec![2.0, -2.0]],
    )
    .unwrap();
    for config in [
        ServerOptimizerSpec::fedadam(),
        ServerOptimizerSpec::fedyogi(),
        ServerOptimizerSpec::fedadagrad(),
        ServerOptimizerSpec::fedavgm(),
    ] {
        let mut opt = ServerOptimizer::new(config).unwrap();
        let out = opt.step(&global, &aggregated).unwrap();
        for i in 1..=4 {
            assert_eq!(out.tensor_f64(i), aggregated.tensor_f64(i), "{} tensor {i}", config.name());
        }
        assert_eq!(out.tensor_f64(1), vec![16.0], "i64 stays an integer, not a float step");
        // The f32 tensor moved towards the aggregate, but not onto it (w[1]: Δ = 0 stays).
        let w = out.tensor_f64(0);
        assert!(w[0] > 1.0 && w[0] < 2.0 && w[1] == 2.0 && w[2] < 3.0 && w[2] > 1.0, "{w:?}");
        let h = out.tensor_f64(5);
        assert!(h[0] > 1.0 && h[1] < -1.0, "{h:?}");
        // Moments: elements of w (0..3) and h (last 2) only.
        let mo = opt.first_moment().unwrap();
        assert_eq!(mo.len(), m.numel());
        let h_off = m.slots()[5].elem_offset;
        for (e, v) in mo.iter().enumerate() {
            let optimised = e < 3 || e >= h_off;
            assert_eq!(*v == 0.0, !optimised || e == 1, "{}: m[{e}] = {v}", config.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Composition
// ---------------------------------------------------------------------------------------------

fn cid(i: usize) -> ClientId {
    ClientId::new(format!("c{i}")).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// FedAvgM with momentum 0 and η = 1 is plain FedAvg, round after round, bit for bit: the
    /// optimised tensors are f32 and f16, so aggregated − global (two such values of moderate
    /// magnitude) is exact in f64 and global + (aggregated − global) = aggregated.
    #[test]
    fn fedavgm_momentum_zero_is_fedavg(
        rounds in prop::collection::vec(
            prop::collection::vec((prop::collection::vec(-800i32..=800, 8), 1u32..=100), 1..=4), 1..=3),
        deltas in any::<bool>(),
    ) {
        let mut specs = vec![
            TensorSpec::new("w", DType::F32, vec![4]),
            TensorSpec::new("b", DType::F16, vec![2]),
            TensorSpec::new("n", DType::I64, vec![1]),
            TensorSpec::new("c", DType::I64, vec![1]),
        ];
        specs[3].policy = AggregationPolicy::Max;
        let m = Arc::new(ModelManifest::new(specs).unwrap());
        let to_params = |v: &[i32]| {
            let f: Vec<f64> = v.iter().map(|&x| f64::from(x) / 8.0).collect();
            let n = f64::from(v[6]);
            Parameters::from_f64(Arc::clone(&m), &[f[..4].to_vec(), f[4..6].to_vec(), vec![n], vec![f64::from(v[7])]])
                .unwrap()
        };
        let plain = if deltas { FedAvg::deltas(1.0) } else { FedAvg::parameters() };
        let opt = ServerOptimizer::new(ServerOptimizerSpec::FedAvgM { lr: 1.0, momentum: 0.0 }).unwrap();
        let mut wrapped = WithServerOptimizer::new(plain, opt);
        let mut reference = plain;
        let mut global = Parameters::zeros(Arc::clone(&m));
        for cohort in &rounds {
            let ps: Vec<Parameters> = cohort.iter().map(|(v, _)| to_params(v)).collect();
            let ids: Vec<ClientId> = (0..ps.len()).map(cid).collect();
            let views: Vec<UpdateView<'_>> =
                ps.iter().zip(&ids).zip(cohort).map(|((p, id), (_, w))| p.as_update(id, f64::from(*w))).collect();
            let a = reference.aggregate_cohort(&views, &global).unwrap();
            let mut partial = PartialAggregate::new(Arc::clone(&m));
            for v in &views {
                wrapped.fold(&mut partial, v).unwrap();
            }
            let b = wrapped.finish(&partial, &global).unwrap();
            prop_assert_eq!(&a, &b);
            global = a;
        }
    }
}

/// A whole-cohort strategy for the composition test: the coordinate-wise median of an odd cohort.
#[derive(Debug)]
struct Median;

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }
    fn mergeability(&self) -> Mergeability {
        Mergeability::WholeCohort
    }
    fn fold(&self, _: &mut PartialAggregate, _: &UpdateView<'_>) -> Result<()> {
        Err(Error::NotStreaming("median"))
    }
    fn merge(&self, _: &mut PartialAggregate, _: &PartialAggregate) -> Result<()> {
        Err(Error::NotStreaming("median"))
    }
    fn finish(&mut self, _: &PartialAggregate, _: &Parameters) -> Result<Parameters> {
        Err(Error::NotStreaming("median"))
    }
    fn aggregate_cohort(&mut self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Parameters> {
        let m = global.manifest();
        let values: Vec<Vec<f64>> = (0..m.tensors().len())
            .map(|i| {
                (0..m.slots()[i].numel)
                    .map(|e| {
                        let mut col: Vec<f64> =
                            cohort.iter().map(|u| u.tensor(i).unwrap().get_f64(e)).collect();
                        col.sort_by(f64::total_cmp);
                        col[col.len() / 2]
                    })
                    .collect()
            })
            .collect();
        Parameters::from_f64(Arc::clone(m), &values)
    }
}

/// WithServerOptimizer over a whole-cohort strategy (median) and a streaming one (FedBuff):
/// result = optimiser.step(global, inner result); mergeability is the inner one's; a failing
/// inner strategy leaves the optimiser untouched.
#[test]
fn composition_whole_cohort_and_streaming() {
    let m = vec2();
    let global = params(&m, &[1.0, -1.0]);
    let ups = [params(&m, &[0.0, 5.0]), params(&m, &[3.0, -2.0]), params(&m, &[10.0, 0.0])];
    let ids: Vec<ClientId> = (0..3).map(cid).collect();
    let views: Vec<_> = ups.iter().zip(&ids).map(|(p, id)| p.as_update(id, 1.0)).collect();

    let mut wrapped =
        WithServerOptimizer::new(Median, ServerOptimizer::new(ServerOptimizerSpec::fedadam()).unwrap());
    assert_eq!(wrapped.mergeability(), Mergeability::WholeCohort);
    assert_eq!(wrapped.name(), "fedadam");
    let got = wrapped.aggregate_cohort(&views, &global).unwrap();
    let median = Median.aggregate_cohort(&views, &global).unwrap();
    assert_eq!(median.tensor_f64(0), vec![3.0, 0.0]);
    let mut alone = ServerOptimizer::new(ServerOptimizerSpec::fedadam()).unwrap();
    assert_eq!(got, alone.step(&global, &median).unwrap());
    let mut p = PartialAggregate::new(Arc::clone(&m));
    assert_eq!(wrapped.fold(&mut p, &views[0]).unwrap_err().kind(), ErrorKind::NotStreaming);

    // FedBuff (K = 3, deltas at staleness 0, 1, 3) followed by FedAdam.
    let fb = FedBuff { staleness: StalenessWeight::flsim_polynomial(0.5), ..FedBuff::new(3) };
    let mut wrapped =
        WithServerOptimizer::new(fb, ServerOptimizer::new(ServerOptimizerSpec::fedadam()).unwrap());
    assert_eq!(wrapped.mergeability(), Mergeability::Streaming);
    let mut partial = PartialAggregate::new(Arc::clone(&m));
    for ((u, id), s) in ups.iter().zip(&ids).zip([0, 1, 3]) {
        wrapped.fold(&mut partial, &u.as_update(id, fb.update_weight(1, Staleness(s)))).unwrap();
    }
    let got = wrapped.finish(&partial, &global).unwrap();
    let inner = { fb }.finish(&partial, &global).unwrap();
    let mut alone = ServerOptimizer::new(ServerOptimizerSpec::fedadam()).unwrap();
    assert_eq!(got, alone.step(&global, &inner).unwrap());
    assert_eq!(wrapped.optimizer.steps(), 1);

    // An empty buffer: the inner strategy fails, the optimiser does not step.
    let empty = PartialAggregate::new(Arc::clone(&m));
    assert_eq!(wrapped.finish(&empty, &global).unwrap_err().kind(), ErrorKind::ZeroTotalWeight);
    assert_eq!(wrapped.optimizer.steps(), 1);
}

// ---------------------------------------------------------------------------------------------
// Errors and state
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_configs_are_rejected() {
    for bad in [
        ServerOptimizerSpec::FedAvgM { lr: 0.0, momentum: 0.9 },
        ServerOptimizerSpec::FedAvgM { lr: 1.0, momentum: 1.0 },
        ServerOptimizerSpec::FedAvgM { lr: f64::NAN, momentum: 0.0 },
        ServerOptimizerSpec::FedAdam {
            lr: 0.1,
            beta1: -0.1,
            beta2: 0.99,
            tau: 1e-9,
            bias_correction: BiasCorrection::Flower,
        },
        ServerOptimizerSpec::FedYogi { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.0 },
        ServerOptimizerSpec::FedAdagrad { lr: f64::INFINITY, beta1: 0.0, tau: 1e-9 },
    ] {
        let e = ServerOptimizer::new(bad).unwrap_err();
        assert_eq!(e.kind(), ServerOptErrorKind::InvalidConfig, "{bad:?}");
    }
}

/// A step that would overflow the dtype is NonFiniteResult and changes nothing; mismatched
/// manifests are refused; a restored checkpoint continues identically.
#[test]
fn failed_step_keeps_state_and_restore_continues() {
    let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("h", DType::F16, vec![2])]).unwrap());
    let mut opt = ServerOptimizer::new(ServerOptimizerSpec::FedAvgM { lr: 1.0, momentum: 0.9 }).unwrap();
    let g = Parameters::from_f64(Arc::clone(&m), &[vec![0.0, 0.0]]).unwrap();
    let a = Parameters::from_f64(Arc::clone(&m), &[vec![30000.0, 1.0]]).unwrap();
    let x1 = opt.step(&g, &a).unwrap();
    assert_eq!(x1.tensor_f64(0), vec![30000.0, 1.0]);
    let before = opt.clone();
    // m = 0.9·30000 + 30000 = 57000; 30000 + 57000 overflows f16 (max 65504).
    let a2 = Parameters::from_f64(Arc::clone(&m), &[vec![60000.0, 2.0]]).unwrap();
    let e = opt.step(&x1, &a2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NonFiniteResult);
    assert_eq!(opt, before, "state unchanged by a failed step");

    // A fresh optimiser whose first step fails stays fresh.
    let mut fresh = ServerOptimizer::new(ServerOptimizerSpec::FedAvgM { lr: 10.0, momentum: 0.0 }).unwrap();
    assert_eq!(fresh.step(&g, &a).unwrap_err().kind(), ErrorKind::NonFiniteResult);
    assert_eq!((fresh.steps(), fresh.first_moment()), (0, None));

    // Manifest mismatches.
    let other = vec2();
    let o = params(&other, &[0.0, 0.0]);
    assert_eq!(opt.step(&g, &o).unwrap_err().kind(), ErrorKind::ManifestMismatch);
    assert_eq!(opt.step(&o, &o).unwrap_err().kind(), ErrorKind::ManifestMismatch);

    // Checkpoint / restore: continuing from a restored FedAdam state equals continuing live.
    let m2 = vec2();
    let mut live = ServerOptimizer::new(ServerOptimizerSpec::fedadam()).unwrap();
    let x0 = params(&m2, &[1.0, -1.0]);
    let x1 = live.step(&x0, &params(&m2, &[2.0, -1.5])).unwrap();
    let mut restored = ServerOptimizer::new(ServerOptimizerSpec::fedadam()).unwrap();
    restored
        .restore(
            Arc::clone(&m2),
            live.steps(),
            live.first_moment().unwrap().to_vec(),
            live.second_moment().map(<[f64]>::to_vec),
        )
        .unwrap();
    let a2 = params(&m2, &[0.5, 0.5]);
    assert_eq!(live.step(&x1, &a2).unwrap(), restored.step(&x1, &a2).unwrap());
    let e = restored.restore(Arc::clone(&m2), 1, vec![0.0; 3], Some(vec![0.0; 2])).unwrap_err();
    assert_eq!(e.kind(), ServerOptErrorKind::StateMismatch);
    let e = restored.restore(Arc::clone(&m2), 1, vec![0.0; 2], None).unwrap_err();
    assert_eq!(e.kind(), ServerOptErrorKind::StateMismatch);
    let e = restored.restore(Arc::clone(&m2), 1, vec![0.0; 2], Some(vec![-1.0, 0.0])).unwrap_err();
    assert_eq!(e.kind(), ServerOptErrorKind::StateMismatch);
    restored.reset();
    assert_eq!((restored.steps(), restored.first_moment()), (0, None));
}
