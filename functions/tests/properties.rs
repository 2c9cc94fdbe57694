//! Property tests of `shoal-functions`:
//!
//! - FedAvg does not depend on arrival order, nor on batch vs one-by-one folding;
//! - `PartialAggregate::merge` is associative and commutative;
//! - FedAvg agrees with an independent oracle (compensated f64 sums, exact integer arithmetic);
//! - the optimised kernels agree bit for bit with `kernels::reference`;
//! - `stage_update` round-trips encoded updates and never panics on corrupted payloads.
//!
//! Sizes are small on purpose (<= 3 tensors of <= 50 elements, <= 8 updates, <= 64 cases per
//! property) so the file runs in a few seconds in a debug build.
//!
//! The tests at the end reproduce problems found while writing these properties (rounding of
//! 16-bit floats, an overflow panic inside safetensors, overflow in the delta step); each is
//! fixed and stays as a regression test.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_functions::kernels::{self, reference, TILE};
use shoal_functions::tensor::{check_finite, encode_safetensors, stage_update, TensorData};
use shoal_functions::Strategy as _;
use shoal_functions::{
    ClientId, DType, FedAvg, ModelManifest, Parameters, PartialAggregate, TensorSpec, ValidationError,
};

// ---------------------------------------------------------------------------------------------
// Configuration and generators
// ---------------------------------------------------------------------------------------------

/// At most 64 cases per property, and no regression files written next to this test.
fn config() -> ProptestConfig {
    ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() }
}

/// The dtypes FedAvg's `mean` policy is exercised with.
const MEAN_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64];

/// Every dtype the manifest accepts (ingest tests).
const ALL_DTYPES: &[DType] = &[
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U64,
    DType::U32,
    DType::U16,
    DType::U8,
];

/// Shapes of at most 50 elements, including scalars. Empty tensors (a zero dimension) are
/// refused by the manifest since issue 16 (`proto` test `zero_dimensions_are_refused`).
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        1 => Just(vec![]),
        4 => (1usize..=50).prop_map(|n| vec![n]),
        2 => (1usize..=7, 1usize..=7).prop_map(|(a, b)| vec![a, b]),
        1 => (1usize..=3, 1usize..=4, 1usize..=4).prop_map(|(a, b, c)| vec![a, b, c]),
    ]
}

/// A manifest of 1-3 tensors (mean policy) with dtypes from `dtypes`.
fn specs(dtypes: &'static [DType]) -> impl Strategy<Value = Vec<TensorSpec>> {
    prop::collection::vec((prop::sample::select(dtypes), shape()), 1..=3).prop_map(|ts| {
        ts.into_iter().enumerate().map(|(i, (d, s))| TensorSpec::new(format!("layer{i}.w"), d, s)).collect()
    })
}

/// Any finite f16 (subnormals and ±0 included): non-finite bit patterns get their exponent cleared.
fn finite_f16(bits: u16) -> f16 {
    let h = f16::from_bits(bits);
    if h.is_finite() {
        h
    } else {
        f16::from_bits(bits & 0x83ff)
    }
}

/// Any finite f32 (subnormals and ±0 included).
fn finite_f32(bits: u32) -> f32 {
    let x = f32::from_bits(bits);
    if x.is_finite() {
        x
    } else {
        f32::from_bits(bits & 0x807f_ffff)
    }
}

/// A finite value exactly representable in `dtype`, as f64.
///
/// For F32, BF16, F16 and I64 the values are chosen so that every partial sum `Σ w_i x_i` with
/// integer weights `w_i <= 1000` (10 bits) over <= 8 updates is **exact** in f64, whatever the
/// order: the products and sums span at most 53 significant bits.
/// - F32: `m · 2^e`, |m| < 2^24, e in [-31, -16]: bits from 2^-31 up to 8·1000·2^8 < 2^21.
/// - BF16: `m · 2^e`, |m| < 2^8, e in [-30, 0]: bits from 2^-30 up to 2^21.
/// - F16: every finite f16: bits from 2^-24 (smallest subnormal) up to 8·1000·65504 < 2^29.
/// - I64: |x| <= 10^9: sums < 8·10^12 < 2^53.
///
/// F64 values have full 53-bit mantissas, so their sums are rounded and order-dependent.
///
/// With `bounded`, F16 magnitudes are kept <= 16384 so `global + lr · mean` (lr < 2) stays below
/// f16::MAX (see `ignored_fedavg_delta_overflows_f16_to_infinity`).
fn value(dtype: DType, bounded: bool) -> BoxedStrategy<f64> {
    match dtype {
        DType::F32 => prop_oneof![
            1 => Just(0.0),
            9 => (-(1i32 << 24) + 1..(1i32 << 24), -31i32..=-16).prop_map(|(m, e)| f64::from(m) * 2f64.powi(e)),
        ]
        .boxed(),
        DType::BF16 => (-255i32..=255, -30i32..=0).prop_map(|(m, e)| f64::from(m) * 2f64.powi(e)).boxed(),
        DType::F16 => any::<u16>()
            .prop_map(move |b| {
                let x = finite_f16(b).to_f64();
                if bounded && x.abs() > 16384.0 {
                    x / 4.0
                } else {
                    x
                }
            })
            .boxed(),
        DType::F64 => prop_oneof![1 => Just(0.0), 9 => -1e6f64..1e6].boxed(),
        DType::I64 => (-1_000_000_000i64..=1_000_000_000).prop_map(|v| v as f64).boxed(),
        DType::I32 => any::<i32>().prop_map(f64::from).boxed(),
        DType::I16 => any::<i16>().prop_map(f64::from).boxed(),
        DType::I8 => any::<i8>().prop_map(f64::from).boxed(),
        // 64-bit integers beyond 2^53 are rounded by the f64 interface of `encode_safetensors`;
        // any f64 value of the dtype's range round-trips, including the saturated extremes.
        DType::U64 => any::<u64>().prop_map(|v| v as f64).boxed(),
        DType::U32 => any::<u32>().prop_map(f64::from).boxed(),
        DType::U16 => any::<u16>().prop_map(f64::from).boxed(),
        DType::U8 => any::<u8>().prop_map(f64::from).boxed(),
    }
}

/// One value vector per tensor of `specs`.
fn values_for(specs: &[TensorSpec], bounded: bool) -> Vec<BoxedStrategy<Vec<f64>>> {
    specs.iter().map(|t| prop::collection::vec(value(t.dtype, bounded), t.numel()).boxed()).collect()
}

/// A FedAvg round: manifest, 1-8 updates with integer weights in [1, 1000], a global model and a
/// server learning rate for the delta form.
#[derive(Debug, Clone)]
struct Case {
    specs: Vec<TensorSpec>,
    /// `updates[k][i][e]`: update k, tensor i, element e.
    updates: Vec<Vec<Vec<f64>>>,
    weights: Vec<f64>,
    global: Vec<Vec<f64>>,
    lr: f64,
}

fn case(dtypes: &'static [DType], bounded: bool) -> impl Strategy<Value = Case> {
    (specs(dtypes), 1usize..=8).prop_flat_map(move |(specs, n)| {
        let updates = prop::collection::vec(values_for(&specs, bounded), n);
        let weights = prop::collection::vec((1u32..=1000).prop_map(f64::from), n);
        let global = values_for(&specs, true);
        let lr = prop_oneof![Just(1.0), 0.05f64..2.0];
        (Just(specs), updates, weights, global, lr).prop_map(|(specs, updates, weights, global, lr)| Case {
            specs,
            updates,
            weights,
            global,
            lr,
        })
    })
}

/// A case plus a random permutation of its updates.
fn case_and_permutation() -> impl Strategy<Value = (Case, Vec<usize>)> {
    case(MEAN_DTYPES, false).prop_flat_map(|c| {
        let n = c.weights.len();
        (Just(c), Just((0..n).collect::<Vec<usize>>()).prop_shuffle())
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The case's manifest, updates, client ids and global model as the crate's types.
struct Built {
    manifest: Arc<ModelManifest>,
    updates: Vec<Parameters>,
    ids: Vec<ClientId>,
    global: Parameters,
}

fn client(k: usize) -> ClientId {
    ClientId::new(format!("client-{k:03}")).expect("valid client id")
}

impl Case {
    fn build(&self) -> Built {
        let manifest = Arc::new(ModelManifest::new(self.specs.clone()).expect("valid manifest"));
        let updates = self
            .updates
            .iter()
            .map(|u| Parameters::from_f64(Arc::clone(&manifest), u).expect("values match the manifest"))
            .collect();
        let global = Parameters::from_f64(Arc::clone(&manifest), &self.global).expect("global matches");
        let ids = (0..self.updates.len()).map(client).collect();
        Built { manifest, updates, ids, global }
    }

    /// Largest magnitude FedAvg's f64 arithmetic works with for tensor `i` (inputs, global and
    /// lr-scaled mean), for absolute tolerances.
    fn scale(&self, i: usize) -> f64 {
        let max_x = self.updates.iter().flat_map(|u| u[i].iter()).fold(0f64, |a, v| a.max(v.abs()));
        let max_g = self.global[i].iter().fold(0f64, |a, v| a.max(v.abs()));
        (max_x * self.lr.max(1.0) + max_g).max(f64::MIN_POSITIVE)
    }
}

/// Folds the updates of `b` in `order`, one `fold` call each or one `fold_batch`.
fn fold_in(b: &Built, weights: &[f64], order: &[usize], batch: bool) -> PartialAggregate {
    let s = FedAvg::parameters();
    let mut p = PartialAggregate::with_client_list(Arc::clone(&b.manifest));
    let views: Vec<_> = order.iter().map(|&k| b.updates[k].as_update(&b.ids[k], weights[k])).collect();
    if batch {
        s.fold_batch(&mut p, &views).expect("fold_batch");
    } else {
        for v in &views {
            s.fold(&mut p, v).expect("fold");
        }
    }
    p
}

fn finish(strategy: FedAvg, p: &PartialAggregate, global: &Parameters) -> Parameters {
    let mut s = strategy;
    s.finish(p, global).expect("finish")
}

/// `finish`, where a delta step overflowing the dtype is an expected outcome
/// (`NonFiniteResult`); any other error fails the test.
fn try_finish(strategy: FedAvg, p: &PartialAggregate, global: &Parameters) -> Option<Parameters> {
    let mut s = strategy;
    match s.finish(p, global) {
        Ok(out) => Some(out),
        Err(e) if e.kind() == shoal_functions::ErrorKind::NonFiniteResult => None,
        Err(e) => panic!("finish: {e}"),
    }
}

/// Two outcomes agree: both overflowed, or both produced the same model.
fn assert_same_outcome(
    case: &Case,
    a: &Option<Parameters>,
    b: &Option<Parameters>,
    what: &str,
) -> Result<(), TestCaseError> {
    match (a, b) {
        (Some(a), Some(b)) => assert_same_output(case, a, b, what),
        (None, None) => Ok(()),
        _ => Err(TestCaseError::fail(format!("{what}: one order overflowed, the other did not"))),
    }
}

/// The two FedAvg forms every property is checked with.
fn strategies(case: &Case) -> [FedAvg; 2] {
    [FedAvg::parameters(), FedAvg::deltas(case.lr)]
}

fn tensor_bytes(p: &Parameters, i: usize) -> &[u8] {
    let s = p.manifest().slots()[i];
    &p.as_bytes()[s.byte_offset..s.byte_offset + s.byte_len]
}

/// The equality rule for two FedAvg results of the same inputs folded differently.
///
/// F32/F16/BF16/I64: the encoded bytes must be identical. The generators keep every partial sum
/// exact in f64 (see [`value`]), so the f64 accumulators are bit-identical whatever the order and
/// so is everything derived from them. (With arbitrary finite inputs this does not hold: see
/// `fedavg_order_error_is_bounded_for_any_finite_f32` and the ignored tests at the end.)
///
/// F64: the output *is* the f64 accumulator divided by the total weight, and f64 addition is not
/// associative, so sums in another order may differ in their last bits. Recursive summation of n
/// terms errs by at most (n-1)·2^-53·Σ|w·x|, i.e. ~1e-15 of the largest magnitude involved for
/// n <= 8; we allow 1e-12 · scale.
fn assert_same_output(case: &Case, a: &Parameters, b: &Parameters, what: &str) -> Result<(), TestCaseError> {
    for (i, spec) in case.specs.iter().enumerate() {
        if spec.dtype == DType::F64 {
            let tol = 1e-12 * case.scale(i);
            for (e, (x, y)) in a.tensor_f64(i).iter().zip(b.tensor_f64(i)).enumerate() {
                prop_assert!((x - y).abs() <= tol, "{what}: tensor {i} (F64) element {e}: {x} vs {y}");
            }
        } else {
            prop_assert_eq!(
                tensor_bytes(a, i),
                tensor_bytes(b, i),
                "{}: tensor {} ({:?}) differs",
                what,
                i,
                spec.dtype
            );
        }
    }
    Ok(())
}

/// Neumaier-compensated sum (an oracle independent of the fold kernels' summation order).
fn compensated_sum(terms: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for t in terms {
        let u = s + t;
        c += if s.abs() >= t.abs() { (s - u) + t } else { (t - u) + s };
        s = u;
    }
    s + c
}

/// `num / den` rounded to the nearest integer, ties to even (exact integer arithmetic).
fn div_round_half_even(num: i128, den: i128) -> i128 {
    let (q, r) = (num.div_euclid(den), num.rem_euclid(den));
    match (2 * r).cmp(&den) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// The neighbours of a 16-bit float (sign-magnitude bit pattern, f16 or bf16 alike).
fn half_neighbours(bits: u16) -> (u16, u16) {
    let mag = bits & 0x7fff;
    if mag == 0 {
        return (0x8001, 0x0001);
    }
    if bits & 0x8000 == 0 {
        (bits - 1, bits + 1)
    } else {
        (bits + 1, bits - 1)
    }
}

/// Checks that `out` (a 16-bit float decoded by `decode`) is the nearest value of its format to
/// the oracle `o`: no neighbour is closer than `out`, up to `slack`.
fn assert_nearest_16(
    out_bits: u16,
    decode: fn(u16) -> f64,
    o: f64,
    slack: f64,
    what: &str,
) -> Result<(), TestCaseError> {
    let out = decode(out_bits);
    let (lo, hi) = half_neighbours(out_bits);
    let d = (out - o).abs();
    for n in [decode(lo), decode(hi)] {
        prop_assert!(d <= (n - o).abs() + slack, "{what}: got {out}, but {n} is nearer to the oracle {o}");
    }
    Ok(())
}

/// Is `o` within `rel`·|o| of a midpoint between two adjacent f32 values?
fn near_f32_midpoint(o: f64, rel: f64) -> bool {
    let r = o as f32;
    [r.next_down(), r.next_up()].iter().any(|&n| {
        let mid = (f64::from(r) + f64::from(n)) / 2.0;
        (o - mid).abs() <= rel * o.abs()
    })
}

// ---------------------------------------------------------------------------------------------
// 1. FedAvg: arrival order, merge, oracle
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Folding the same cohort in another order (and with `fold_batch` instead of one `fold` per
    /// update) gives the same model, in both the parameters and the delta form.
    #[test]
    fn fedavg_does_not_depend_on_arrival_order((case, perm) in case_and_permutation()) {
        let b = case.build();
        let identity: Vec<usize> = (0..case.weights.len()).collect();
        let p1 = fold_in(&b, &case.weights, &identity, false);
        let p2 = fold_in(&b, &case.weights, &perm, true);
        prop_assert_eq!(p1.count(), p2.count());
        prop_assert_eq!(p1.total_weight(), p2.total_weight(), "integer weights sum exactly");
        for s in strategies(&case) {
            let (a, c) = (try_finish(s, &p1, &b.global), try_finish(s, &p2, &b.global));
            assert_same_outcome(&case, &a, &c, &format!("{:?} order {:?}", s.update_kind, perm))?;
        }
    }

    /// Split the cohort into three partials a, b, c (possibly empty): (a+b)+c, a+(b+c), c+(a+b)
    /// and the single sequential fold all finish to the same model.
    #[test]
    fn merge_is_associative_and_commutative(
        (case, groups) in case(MEAN_DTYPES, false).prop_flat_map(|c| {
            let n = c.weights.len();
            (Just(c), prop::collection::vec(0usize..3, n))
        })
    ) {
        let b = case.build();
        let s = FedAvg::parameters();
        let mut parts: Vec<PartialAggregate> =
            (0..3).map(|_| PartialAggregate::with_client_list(Arc::clone(&b.manifest))).collect();
        for (k, &g) in groups.iter().enumerate() {
            s.fold(&mut parts[g], &b.updates[k].as_update(&b.ids[k], case.weights[k])).expect("fold");
        }
        let [pa, pb, pc] = [&parts[0], &parts[1], &parts[2]];

        let mut ab_c = pa.clone();
        s.merge(&mut ab_c, pb).expect("merge");
        s.merge(&mut ab_c, pc).expect("merge");

        let mut bc = pb.clone();
        s.merge(&mut bc, pc).expect("merge");
        let mut a_bc = pa.clone();
        s.merge(&mut a_bc, &bc).expect("merge");

        let mut ab = pa.clone();
        s.merge(&mut ab, pb).expect("merge");
        let mut c_ab = pc.clone();
        s.merge(&mut c_ab, &ab).expect("merge");

        let identity: Vec<usize> = (0..case.weights.len()).collect();
        let seq = fold_in(&b, &case.weights, &identity, false);

        for p in [&a_bc, &c_ab, &seq] {
            prop_assert_eq!(p.count(), ab_c.count());
            prop_assert_eq!(p.total_weight(), ab_c.total_weight());
            let mut x = p.clients().to_vec();
            let mut y = ab_c.clients().to_vec();
            x.sort();
            y.sort();
            prop_assert_eq!(x, y);
        }
        for st in strategies(&case) {
            let reference = try_finish(st, &ab_c, &b.global);
            for (name, p) in [("a+(b+c)", &a_bc), ("c+(a+b)", &c_ab), ("sequential", &seq)] {
                let out = try_finish(st, p, &b.global);
                assert_same_outcome(&case, &reference, &out, &format!("{:?} {name} vs (a+b)+c", st.update_kind))?;
            }
        }
    }

    /// FedAvg equals an independent weighted mean `Σ w_i x_i / Σ w_i` (or `g + lr · mean` for
    /// deltas) computed here from the decoded inputs:
    /// - F32: exactly the oracle rounded to nearest (`as f32`), unless the oracle is within
    ///   2^-40 (relative) of an f32 rounding tie, and always within 1e-6 relative;
    /// - F64: within 1e-12 of the scale;
    /// - F16/BF16: the nearest value of the format. (A 1e-6 relative tolerance is not achievable
    ///   there: one ulp is 2^-10 resp. 2^-7 relative, so the check is "no neighbour of the output
    ///   is nearer to the oracle", with a slack of 2^-9 ulp; the slack only absorbs the f64
    ///   rounding of the oracle itself; `half_precision_mean_is_rounded_to_nearest` pins exact
    ///   rounding on hand-made ties);
    /// - I64, parameters form: exactly the rational mean rounded half to even (i128 arithmetic,
    ///   no tolerance needed); delta form: the f64 oracle rounded half to even, unless it lies
    ///   within 1e-9 of a .5 tie.
    #[test]
    fn fedavg_matches_an_independent_oracle(case in case(MEAN_DTYPES, true)) {
        let b = case.build();
        let identity: Vec<usize> = (0..case.weights.len()).collect();
        let p = fold_in(&b, &case.weights, &identity, false);
        let total: f64 = case.weights.iter().sum();
        // Decoded inputs (what the kernels see).
        let xs: Vec<Vec<Vec<f64>>> =
            b.updates.iter().map(|u| (0..case.specs.len()).map(|i| u.tensor_f64(i)).collect()).collect();
        for st in strategies(&case) {
            let out = finish(st, &p, &b.global);
            let delta = st.update_kind == shoal_functions::UpdateKind::Delta;
            for (i, spec) in case.specs.iter().enumerate() {
                let g = b.global.tensor_f64(i);
                let got = out.tensor(i);
                for e in 0..spec.numel() {
                    let what = format!("{:?} tensor {i} ({:?}) element {e}", st.update_kind, spec.dtype);
                    let m = compensated_sum(xs.iter().zip(&case.weights).map(|(x, w)| w * x[i][e])) / total;
                    let o = if delta { g[e] + case.lr * m } else { m };
                    // Error of the oracle itself and of FedAvg's f64 arithmetic before rounding.
                    let f64_slack = 1e-14 * case.scale(i);
                    match (spec.dtype, got) {
                        (DType::F32, TensorData::F32(v)) => {
                            let y = f64::from(v[e]);
                            prop_assert!((y - o).abs() <= 1e-6 * o.abs() + f64_slack, "{what}: {y} vs oracle {o}");
                            if !near_f32_midpoint(o, 2f64.powi(-40)) {
                                prop_assert_eq!(v[e], o as f32, "{}: not the nearest f32 to {}", what, o);
                            }
                        }
                        (DType::F64, TensorData::F64(v)) => {
                            prop_assert!((v[e] - o).abs() <= 1e-12 * case.scale(i), "{what}: {} vs oracle {o}", v[e]);
                        }
                        (DType::F16, TensorData::F16(v)) => {
                            let ulp = f16::EPSILON.to_f64() * o.abs().max(f16::MIN_POSITIVE.to_f64());
                            let slack = ulp * 2f64.powi(-9) + f64_slack;
                            assert_nearest_16(v[e].to_bits(), |b| f16::from_bits(b).to_f64(), o, slack, &what)?;
                        }
                        (DType::BF16, TensorData::BF16(v)) => {
                            let ulp = bf16::EPSILON.to_f64() * o.abs().max(bf16::MIN_POSITIVE.to_f64());
                            let slack = ulp * 2f64.powi(-9) + f64_slack;
                            assert_nearest_16(v[e].to_bits(), |b| bf16::from_bits(b).to_f64(), o, slack, &what)?;
                        }
                        (DType::I64, TensorData::I64(v)) => {
                            if delta {
                                let frac = o - o.floor();
                                if (frac - 0.5).abs() > 1e-9 {
                                    prop_assert_eq!(v[e] as f64, o.round_ties_even(), "{}: oracle {}", what, o);
                                }
                            } else {
                                let num: i128 = xs
                                    .iter()
                                    .zip(&case.weights)
                                    .map(|(x, w)| *w as i128 * x[i][e] as i128)
                                    .sum();
                                let exact = div_round_half_even(num, total as i128);
                                prop_assert_eq!(i128::from(v[e]), exact, "{}: {}/{}", what, num, total);
                            }
                        }
                        (d, _) => prop_assert!(false, "unexpected view for {d:?}"),
                    }
                }
            }
        }
    }

    /// With arbitrary finite f32 inputs (wide dynamic range, so f64 sums round), two arrival
    /// orders agree within one f32 ulp plus twice the classic recursive-summation bound
    /// (2·n·2^-53·Σ|w·x|/W for the two sums and divisions, doubled for slack). They are NOT
    /// always bit-identical: see
    /// `ignored_fedavg_f32_output_depends_on_arrival_order`.
    #[test]
    fn fedavg_order_error_is_bounded_for_any_finite_f32(
        (vals, weights, perm) in (1usize..=8, 1usize..=20).prop_flat_map(|(n, len)| {
            (
                prop::collection::vec(prop::collection::vec(any::<u32>().prop_map(finite_f32), len), n),
                prop::collection::vec((1u32..=1000).prop_map(f64::from), n),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
    ) {
        let len = vals[0].len();
        let manifest = Arc::new(
            ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![len])]).expect("manifest"),
        );
        let case = Case {
            specs: manifest.tensors().to_vec(),
            updates: vals.iter().map(|v| vec![v.iter().map(|&x| f64::from(x)).collect()]).collect(),
            weights: weights.clone(),
            global: vec![vec![0.0; len]],
            lr: 1.0,
        };
        let b = case.build();
        let identity: Vec<usize> = (0..weights.len()).collect();
        let x = finish(FedAvg::parameters(), &fold_in(&b, &weights, &identity, false), &b.global);
        let y = finish(FedAvg::parameters(), &fold_in(&b, &weights, &perm, false), &b.global);
        let total: f64 = weights.iter().sum();
        let n = weights.len() as f64;
        for (e, (a, c)) in x.tensor_f64(0).iter().zip(y.tensor_f64(0)).enumerate() {
            let abs_terms: f64 = vals.iter().zip(&weights).map(|(v, w)| w * f64::from(v[e]).abs()).sum();
            let big = a.abs().max(c.abs()) as f32;
            let ulp = f64::from(big.next_up()) - f64::from(big);
            let bound = ulp + 4.0 * n * 2f64.powi(-53) * abs_terms / total;
            prop_assert!((a - c).abs() <= bound, "element {e}: {a} vs {c} (bound {bound})");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Optimised kernels vs reference kernels
// ---------------------------------------------------------------------------------------------

/// An 8-byte aligned buffer of `len` random, finite elements of `dtype` (raw bytes).
fn random_elements(rng: &mut StdRng, dtype: DType, len: usize) -> Vec<u64> {
    let mut words = vec![0u64; (len * dtype.size()).div_ceil(8)];
    rng.fill(&mut words[..]);
    {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let bytes = &mut bytes[..len * dtype.size()];
        match dtype {
            DType::F32 => {
                for x in bytemuck::cast_slice_mut::<u8, u32>(bytes) {
                    *x = finite_f32(*x).to_bits();
                }
            }
            DType::F16 => {
                for x in bytemuck::cast_slice_mut::<u8, u16>(bytes) {
                    *x = finite_f16(*x).to_bits();
                }
            }
            DType::BF16 => {
                for x in bytemuck::cast_slice_mut::<u8, u16>(bytes) {
                    if !bf16::from_bits(*x).is_finite() {
                        *x &= 0x807f;
                    }
                }
            }
            DType::F64 => {
                // Exponents up to 2^1008, so w · x with w <= 1e3 stays finite.
                for x in bytemuck::cast_slice_mut::<u8, u64>(bytes) {
                    *x = (*x & !(0x7ffu64 << 52)) | (rng.gen_range(0u64..0x7f0) << 52);
                }
            }
            _ => {}
        }
    }
    words
}

fn view(dtype: DType, words: &[u64], len: usize, offset: usize) -> TensorData<'_> {
    let bytes: &[u8] = bytemuck::cast_slice(words);
    let size = dtype.size();
    TensorData::view(dtype, &bytes[offset * size..(offset + len) * size]).expect("aligned view")
}

fn random_acc(rng: &mut StdRng, len: usize) -> Vec<f64> {
    (0..len).map(|_| rng.gen_range(-1e3..1e3)).collect()
}

fn bits(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs every optimised kernel against its reference on `len` elements starting `offset`
/// elements into the buffers (so vector loops also start off their natural alignment).
fn check_kernels(seed: u64, len: usize, offset: usize, updates: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w: f64 = rng.gen_range(1e-3..1e3);
    for &dtype in ALL_DTYPES {
        let words = random_elements(&mut rng, dtype, len + offset);
        let x = view(dtype, &words, len, offset);
        let acc = random_acc(&mut rng, len);
        let (mut fast, mut slow) = (acc.clone(), acc);
        kernels::scaled_add(&mut fast, x, w);
        reference::scaled_add(&mut slow, x, w);
        assert_eq!(bits(&fast), bits(&slow), "scaled_add {dtype:?} len {len} offset {offset} seed {seed}");
    }

    // f32: the dedicated entry point and the tiled multi-update fold.
    let bufs: Vec<Vec<u64>> =
        (0..updates).map(|_| random_elements(&mut rng, DType::F32, len + offset)).collect();
    let xs: Vec<&[f32]> =
        bufs.iter().map(|b| &bytemuck::cast_slice::<u64, f32>(b)[offset..offset + len]).collect();
    let ws: Vec<f64> = (0..updates).map(|_| rng.gen_range(1e-3..1e3)).collect();
    let acc = random_acc(&mut rng, len);

    let (mut fast, mut slow) = (acc.clone(), acc.clone());
    kernels::scaled_add_f32(&mut fast, xs[0], ws[0]);
    reference::scaled_add_f32(&mut slow, xs[0], ws[0]);
    assert_eq!(bits(&fast), bits(&slow), "scaled_add_f32 len {len} offset {offset} seed {seed}");

    let batch: Vec<(&[f32], f64)> = xs.iter().copied().zip(ws.iter().copied()).collect();
    let (mut tiled, mut slow) = (acc.clone(), acc);
    kernels::fold_f32_tiled(&mut tiled, &batch);
    for (x, w) in &batch {
        reference::scaled_add_f32(&mut slow, x, *w);
    }
    assert_eq!(bits(&tiled), bits(&slow), "fold_f32_tiled x{updates} len {len} offset {offset} seed {seed}");
}

proptest! {
    #![proptest_config(config())]

    /// Small random lengths (tails of every vector width), offsets and update counts.
    #[test]
    fn optimised_kernels_match_reference_bitwise(
        seed in any::<u64>(),
        len in 0usize..200,
        offset in 0usize..4,
        updates in 1usize..=5,
    ) {
        check_kernels(seed, len, offset, updates);
    }
}

/// Lengths around the vector widths and around [`TILE`] (partial last tile, exactly one tile,
/// several tiles).
#[test]
fn optimised_kernels_match_reference_around_tile_boundaries() {
    for len in 0..=40 {
        check_kernels(len as u64, len, len % 3, 3);
    }
    for (k, len) in [TILE - 1, TILE, TILE + 1, 2 * TILE + 3, 3 * TILE - 5].into_iter().enumerate() {
        check_kernels(1000 + k as u64, len, k % 2, 3);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Ingest: stage_update
// ---------------------------------------------------------------------------------------------

/// Any manifest of 1-3 tensors of any dtype, with values representable in each dtype.
fn ingest_case() -> impl Strategy<Value = (Vec<TensorSpec>, Vec<Vec<f64>>)> {
    specs(ALL_DTYPES).prop_flat_map(|specs| {
        let values = values_for(&specs, false);
        (Just(specs), values)
    })
}

/// A slot of `bytes` bytes, 8-byte aligned, filled with garbage.
fn garbage_slot(bytes: usize) -> Vec<u64> {
    vec![0xAAAA_AAAA_AAAA_AAAAu64; bytes / 8]
}

/// Ways to corrupt a valid payload.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep only a prefix.
    Truncate(Index),
    /// Overwrite bytes anywhere.
    Bytes(Vec<(Index, u8)>),
    /// Overwrite bytes of the 8-byte length prefix or the JSON header.
    HeaderBytes(Vec<(Index, u8)>),
    /// Replace the header length prefix.
    HeaderLen(u64),
    /// Append bytes.
    Append(Vec<u8>),
    /// Edit one entry of the JSON header and re-serialise it (data left as is).
    Json(Index, JsonEdit),
}

#[derive(Debug, Clone)]
enum JsonEdit {
    Shape(Vec<u64>),
    Offsets(u64, u64),
    DType(&'static str),
    Rename(String),
    Remove,
    Duplicate(String),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let dim = prop_oneof![0u64..64, Just(u64::MAX), Just(1u64 << 32), Just(1u64 << 62), any::<u64>()];
    let off = prop_oneof![0u64..4096, Just(u64::MAX), Just(u64::MAX - 7), any::<u64>()];
    prop_oneof![
        prop::collection::vec(dim, 0..4).prop_map(JsonEdit::Shape),
        (off.clone(), off).prop_map(|(a, b)| JsonEdit::Offsets(a, b)),
        prop::sample::select(&["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XYZ"][..])
            .prop_map(JsonEdit::DType),
        "[a-z0-9._]{0,8}".prop_map(JsonEdit::Rename),
        Just(JsonEdit::Remove),
        "[a-z]{1,4}".prop_map(JsonEdit::Duplicate),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edits = || prop::collection::vec((any::<Index>(), any::<u8>()), 1..8);
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        edits().prop_map(Mutation::Bytes),
        edits().prop_map(Mutation::HeaderBytes),
        prop_oneof![0u64..4096, any::<u64>()].prop_map(Mutation::HeaderLen),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
        (any::<Index>(), json_edit()).prop_map(|(i, e)| Mutation::Json(i, e)),
    ]
}

/// The JSON header of a payload, if it has a parsable one.
fn parse_header(payload: &[u8]) -> Option<(usize, serde_json::Map<String, serde_json::Value>)> {
    let n = usize::try_from(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?)).ok()?;
    let json = payload.get(8..8usize.checked_add(n)?)?;
    Some((n, serde_json::from_slice(json).ok()?))
}

/// Applies `m` to `payload`; header-aware mutations leave a payload without a parsable header
/// unchanged.
fn apply(payload: &[u8], m: &Mutation) -> Vec<u8> {
    let mut p = payload.to_vec();
    match m {
        Mutation::Truncate(i) => p.truncate(i.index(p.len() + 1)),
        Mutation::Bytes(edits) => {
            for (i, b) in edits {
                if !p.is_empty() {
                    let k = i.index(p.len());
                    p[k] = *b;
                }
            }
        }
        Mutation::HeaderBytes(edits) => {
            if let Some((n, _)) = parse_header(payload) {
                for (i, b) in edits {
                    p[i.index(8 + n)] = *b;
                }
            }
        }
        Mutation::HeaderLen(n) => {
            if p.len() >= 8 {
                p[..8].copy_from_slice(&n.to_le_bytes());
            }
        }
        Mutation::Append(bytes) => p.extend_from_slice(bytes),
        Mutation::Json(i, edit) => {
            let Some((n, mut header)) = parse_header(payload) else { return p };
            let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
            if names.is_empty() {
                return p;
            }
            let name = names[i.index(names.len())].clone();
            match edit {
                JsonEdit::Shape(s) => header[&name]["shape"] = serde_json::json!(s),
                JsonEdit::Offsets(a, b) => header[&name]["data_offsets"] = serde_json::json!([a, b]),
                JsonEdit::DType(d) => header[&name]["dtype"] = serde_json::json!(d),
                JsonEdit::Rename(new) => {
                    if let Some(v) = header.remove(&name) {
                        header.insert(new.clone(), v);
                    }
                }
                JsonEdit::Remove => {
                    header.remove(&name);
                }
                JsonEdit::Duplicate(new) => {
                    let v = header[&name].clone();
                    header.insert(new.clone(), v);
                }
            }
            let json = serde_json::to_vec(&header).expect("serialise header");
            p = (json.len() as u64).to_le_bytes().to_vec();
            p.extend_from_slice(&json);
            p.extend_from_slice(&payload[8 + n..]);
        }
    }
    p
}

proptest! {
    #![proptest_config(config())]

    /// encode_safetensors -> stage_update -> read back: same values (bit for bit), and the slot
    /// is exactly the canonical layout (padding zeroed even if the slot held garbage).
    #[test]
    fn stage_update_round_trips((specs, values) in ingest_case()) {
        let manifest = Arc::new(ModelManifest::new(specs.clone()).expect("manifest"));
        let payload = encode_safetensors(&manifest, &values).expect("encode");
        let mut slot = garbage_slot(manifest.slot_bytes());
        let slot_bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut slot);
        prop_assert_eq!(stage_update(&manifest, &payload, slot_bytes), Ok(()));

        let expected = Parameters::from_f64(Arc::clone(&manifest), &values).expect("from_f64");
        prop_assert_eq!(&*slot_bytes, expected.as_bytes(), "slot differs from the canonical layout");
        for (i, (spec, s)) in specs.iter().zip(manifest.slots()).enumerate() {
            let t = TensorData::view(spec.dtype, &slot_bytes[s.byte_offset..s.byte_offset + s.byte_len])
                .expect("staged tensors are aligned");
            for (e, v) in values[i].iter().enumerate() {
                prop_assert_eq!(t.get_f64(e).to_bits(), v.to_bits(), "tensor {} ({:?}) element {}", i, spec.dtype, e);
            }
        }
        let again = Parameters::from_safetensors(Arc::clone(&manifest), &payload).expect("from_safetensors");
        prop_assert_eq!(again, expected);
    }

    /// Corrupted payloads (truncations, byte edits, header edits) never panic: the result is
    /// `Ok` (then the slot is valid and finite) or a typed `ValidationError`.
    #[test]
    fn stage_update_never_panics_on_corrupted_payloads(
        (specs, values) in ingest_case(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let manifest = Arc::new(ModelManifest::new(specs).expect("manifest"));
        let mut payload = encode_safetensors(&manifest, &values).expect("encode");
        for m in &mutations {
            payload = apply(&payload, m);
        }
        let mut slot = garbage_slot(manifest.slot_bytes());
        let slot_bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut slot);
        match stage_update(&manifest, &payload, slot_bytes) {
            Ok(()) => prop_assert_eq!(check_finite(&manifest, slot_bytes), Ok(())),
            Err(e) => {
                let _: &ValidationError = &e;
                prop_assert!(!e.label().is_empty());
            }
        }
    }
}

fn raw_payload(header: &str, data: &[u8]) -> Vec<u8> {
    let mut p = (header.len() as u64).to_le_bytes().to_vec();
    p.extend_from_slice(header.as_bytes());
    p.extend_from_slice(data);
    p
}

/// Hand-written headers at the limits of the size arithmetic are typed rejections.
#[test]
fn stage_update_rejects_extreme_headers() {
    let m = one_tensor(DType::U8, 4);
    let headers = [
        r#"{"t":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
        r#"{"t":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}"#,
        r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}"#,
        r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,18446744073709551615]}}"#,
        r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"u":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}"#,
        r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"t":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
        r#"{"__metadata__":{"a":"b"},"t":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}}"#,
        r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}"#,
        "",
    ];
    let mut slot = garbage_slot(m.slot_bytes());
    for h in headers {
        let r = stage_update(&m, &raw_payload(h, &[1, 2, 3, 4]), bytemuck::cast_slice_mut(&mut slot));
        assert!(r.is_err(), "{h} was accepted");
    }
    let ok = r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    assert_eq!(
        stage_update(&m, &raw_payload(ok, &[1, 2, 3, 4]), bytemuck::cast_slice_mut(&mut slot)),
        Ok(())
    );
}

/// A header whose data end is usize::MAX makes safetensors 0.4.5 compute
/// `buffer_end + 8 + n` (`read_metadata`) without overflow check: a panic ("attempt to add with
/// overflow") wherever overflow checks are on (debug/test builds); release builds wrap and then
/// reject the payload. Reachable from `stage_update` with an 80-byte client payload.
#[test]
fn stage_update_rejects_usize_max_data_end_without_panicking() {
    let m = one_tensor(DType::U8, 4);
    let h = r#"{"t":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#;
    let mut slot = garbage_slot(m.slot_bytes());
    let r = std::panic::catch_unwind(move || {
        stage_update(&m, &raw_payload(h, &[]), bytemuck::cast_slice_mut(&mut slot)).is_err()
    });
    assert!(matches!(r, Ok(true)), "stage_update panicked instead of returning a ValidationError");
}

// ---------------------------------------------------------------------------------------------
// 4. Regression tests for problems found while writing the properties
// ---------------------------------------------------------------------------------------------

fn one_tensor(dtype: DType, n: usize) -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new("t", dtype, vec![n])]).expect("manifest"))
}

/// FedAvg with updates `vals[k]` (one scalar each), weights `ws`, folded in `order`.
fn fedavg_scalar(dtype: DType, vals: &[f64], ws: &[f64], order: &[usize], s: FedAvg, g: f64) -> f64 {
    let m = one_tensor(dtype, 1);
    let ps: Vec<Parameters> =
        vals.iter().map(|&v| Parameters::from_f64(Arc::clone(&m), &[vec![v]]).expect("from_f64")).collect();
    let ids: Vec<ClientId> = (0..vals.len()).map(client).collect();
    let mut p = PartialAggregate::new(Arc::clone(&m));
    for &k in order {
        s.fold(&mut p, &ps[k].as_update(&ids[k], ws[k])).expect("fold");
    }
    let global = Parameters::from_f64(Arc::clone(&m), &[vec![g]]).expect("global");
    finish(s, &p, &global).tensor_f64(0)[0]
}

/// `write_f64_as` documents "floats round to nearest", but `half`'s `f16::from_f64` goes through
/// f32 on CPUs with F16C (double rounding), and `bf16::from_f64` drops the low 32 bits of the f64
/// before rounding (lost sticky bits). Means just above a tie of the 16-bit format round down.
///
/// f16: x = [1.0, 1.0009765625 (1 + 2^-10), 2^-24], w = [1, 1, 2]: exact mean
/// 0.5 + 2^-12 + 2^-25, nearest f16 0.50048828125; FedAvg returns 0.5.
/// bf16: x = [1.0, 1.0078125 (1 + 2^-7), 2^-21], w = [1, 1, 2]: exact mean 0.5 + 2^-9 + 2^-22,
/// nearest bf16 0.50390625; FedAvg returns 0.5.
#[test]
fn half_precision_mean_is_rounded_to_nearest() {
    let f16_mean = fedavg_scalar(
        DType::F16,
        &[1.0, 1.0 + 2f64.powi(-10), 2f64.powi(-24)],
        &[1.0, 1.0, 2.0],
        &[0, 1, 2],
        FedAvg::parameters(),
        0.0,
    );
    let bf16_mean = fedavg_scalar(
        DType::BF16,
        &[1.0, 1.0 + 2f64.powi(-7), 2f64.powi(-21)],
        &[1.0, 1.0, 2.0],
        &[0, 1, 2],
        FedAvg::parameters(),
        0.0,
    );
    assert_eq!((f16_mean, bf16_mean), (0.5 + 2f64.powi(-11), 0.5 + 2f64.powi(-8)));
}

/// FedAvg's delta form `global + lr · mean` can overflow a 16-bit float (f16 global 60000 plus
/// a delta of 10000 exceeds f16's 65504): that is a typed error, never an Inf model.
#[test]
fn fedavg_delta_overflow_is_a_typed_error() {
    let m = one_tensor(DType::F16, 1);
    let d = Parameters::from_f64(Arc::clone(&m), &[vec![10_000.0]]).unwrap();
    let g = Parameters::from_f64(Arc::clone(&m), &[vec![60_000.0]]).unwrap();
    let c = client(0);
    let mut s = FedAvg::deltas(1.0);
    let e = s.aggregate_cohort(&[d.as_update(&c, 1.0)], &g).unwrap_err();
    assert_eq!(e.kind(), shoal_functions::ErrorKind::NonFiniteResult);
}
