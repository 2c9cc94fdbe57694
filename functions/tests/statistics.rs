//! Running statistics (BatchNorm) under server optimizers and asynchronous steps
//! (`shoal_functions::statistics`, the `statistic` and `variance` policies):
//!
//! - the failure first: under the default `mean` policy FedAdam drives `bn.running_var`
//!   negative from a zero start (first step exactly Flower's bias-corrected η, 0.0742), and
//!   `statistic_warnings` flags that manifest;
//! - FedAdam, FedYogi, FedAvgM and FedBuff with stale clients over 5 rounds on
//!   `{w, bn.running_mean, bn.running_var, bn.num_batches_tracked}`: `running_var` stays ≥ 0 and
//!   finite and equals the weighted mean of the clients' values (an independent f64 oracle), the
//!   key set is preserved, the counter follows its `max` policy;
//! - the clamp, the robust and RFFL paths, and the warnings' cases.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_functions::asynchronous::{FedBuff, FedBuffNormalisation, Staleness, StalenessWeight};
use shoal_functions::server_opt::{ServerOptimizer, ServerOptimizerSpec, WithServerOptimizer};
use shoal_functions::statistics::{statistic_warnings, RunningStatistic, StatisticRisk};
use shoal_functions::{
    AggregationPolicy, ClientId, DType, FedAvg, JobSpec, ModelManifest, Parameters, PartialAggregate,
    Strategy, TensorSpec,
};

mod common;
use common::cid;

const W: usize = 0;
const MEAN: usize = 1;
const VAR: usize = 2;
const COUNT: usize = 3;

/// `{w [4], bn.running_mean [3], bn.running_var [3], bn.num_batches_tracked []}` with the given
/// policies for the two float statistics (the counter is `max`).
fn bn_manifest(mean: AggregationPolicy, var: AggregationPolicy) -> Arc<ModelManifest> {
    let spec = |name: &str, dtype, shape, policy| TensorSpec { name: name.into(), dtype, shape, policy };
    Arc::new(
        ModelManifest::new(vec![
            spec("w", DType::F32, vec![4], AggregationPolicy::Mean),
            spec("bn.running_mean", DType::F32, vec![3], mean),
            spec("bn.running_var", DType::F32, vec![3], var),
            spec("bn.num_batches_tracked", DType::I64, vec![], AggregationPolicy::Max),
        ])
        .unwrap(),
    )
}

fn params(m: &Arc<ModelManifest>, values: &[Vec<f64>]) -> Parameters {
    Parameters::from_f64(Arc::clone(m), values).unwrap()
}

/// One client's state after local training: its parameters' values (what it computed) and its
/// weight.
struct ClientValues {
    values: Vec<Vec<f64>>,
    num_examples: u64,
}

/// Values a client computes in round `t` from `base`: `w` moves, the running statistics are
/// fresh estimates (variances in [0, 0.2], some near 0), the counter advances.
fn train(rng: &mut StdRng, base: &Parameters) -> ClientValues {
    let w: Vec<f64> = base.tensor_f64(W).iter().map(|x| x + rng.gen_range(-0.5..0.5)).collect();
    let mean: Vec<f64> = (0..3).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let var: Vec<f64> =
        (0..3).map(|e| if e == 0 { rng.gen_range(0.0..1e-4) } else { rng.gen_range(0.0..0.2) }).collect();
    let count = vec![base.tensor_f64(COUNT)[0] + f64::from(rng.gen_range(1u32..50))];
    ClientValues { values: vec![w, mean, var, count], num_examples: rng.gen_range(1..500) }
}

/// The delta a client sends: its values minus the base it trained from, rounded to the dtypes.
fn delta(m: &Arc<ModelManifest>, c: &ClientValues, base: &Parameters) -> Parameters {
    let d: Vec<Vec<f64>> = c
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| v.iter().zip(base.tensor_f64(i)).map(|(x, b)| x - b).collect())
        .collect();
    params(m, &d)
}

/// The f64 oracle of a statistic tensor: `Σ w_k (base_k + Δ_k) / Σ w_k`, the weighted mean of
/// the values the clients sent (base and delta as they are on the wire, decoded exactly).
fn oracle(i: usize, folded: &[(f64, &Parameters, &Parameters)]) -> Vec<f64> {
    let total: f64 = folded.iter().map(|(w, _, _)| w).sum();
    let n = folded[0].1.tensor_f64(i).len();
    (0..n)
        .map(|e| {
            folded.iter().map(|(w, base, d)| w * (base.tensor_f64(i)[e] + d.tensor_f64(i)[e])).sum::<f64>()
                / total
        })
        .collect()
}

/// Checks a committed model: statistics equal the oracle, the variance is finite and ≥ 0, the
/// counter is `global + max Δ`, the key set is the manifest's.
fn check_round(
    what: &str,
    out: &Parameters,
    global: &Parameters,
    folded: &[(f64, &Parameters, &Parameters)],
) {
    for (i, name) in [(MEAN, "running_mean"), (VAR, "running_var")] {
        let got = out.tensor_f64(i);
        let want = oracle(i, folded);
        for (e, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{what}: {name}[{e}] = {g}, oracle {w}");
        }
    }
    assert!(
        out.tensor_f64(VAR).iter().all(|v| v.is_finite() && *v >= 0.0),
        "{what}: running_var {:?}",
        out.tensor_f64(VAR)
    );
    let max_delta = folded.iter().map(|(_, _, d)| d.tensor_f64(COUNT)[0]).fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(out.tensor_f64(COUNT), vec![global.tensor_f64(COUNT)[0] + max_delta], "{what}: counter");
    let bytes = out.to_safetensors().unwrap();
    let keys: Vec<String> = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut k: Vec<String> = st.names().into_iter().cloned().collect();
        k.sort();
        k
    };
    let mut want: Vec<String> = global.manifest().tensors().iter().map(|t| t.name.clone()).collect();
    want.sort();
    assert_eq!(keys, want, "{what}: key set");
}

fn synchronous(opt: ServerOptimizerSpec) -> WithServerOptimizer<FedAvg> {
    WithServerOptimizer::new(FedAvg::deltas(1.0), ServerOptimizer::new(opt).unwrap())
}

/// FedAdam over deltas, `{w, bn.*}` with every tensor `mean`: `running_var` from a zero start
/// with every client reporting 0.01 goes to exactly Flower's first-step size η·√(1−β₂²)/(1−β₁²)
/// = 0.0742, then below zero within three more rounds. With `variance` it stays 0.01.
#[test]
fn mean_policy_drives_running_var_negative_under_fedadam() {
    let run = |policy: AggregationPolicy| -> Vec<f64> {
        let m = bn_manifest(policy, policy);
        let mut s = synchronous(ServerOptimizerSpec::fedadam());
        let mut global = Parameters::zeros(Arc::clone(&m));
        let ids: Vec<ClientId> = (0..4).map(|k| cid(&format!("c{k}"))).collect();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let values = vec![vec![0.0; 4], vec![0.0; 3], vec![0.01; 3], vec![0.0]];
            let d = delta(&m, &ClientValues { values, num_examples: 1 }, &global);
            let views: Vec<_> = ids.iter().map(|c| d.as_update(c, 10.0)).collect();
            global = s.aggregate_cohort(&views, &global).unwrap();
            seen.push(global.tensor_f64(VAR)[0]);
        }
        seen
    };
    let mean = run(AggregationPolicy::Mean);
    let eta1 = 0.1 * (1.0f64 - 0.99 * 0.99).sqrt() / (1.0 - 0.9 * 0.9);
    assert!((mean[0] - eta1).abs() < 1e-6 && (mean[0] - 0.0742).abs() < 1e-4, "first step {}", mean[0]);
    assert!(mean.iter().any(|v| *v < 0.0), "running_var under `mean` + FedAdam: {mean:?}");
    let var = run(AggregationPolicy::Variance);
    assert!(var.iter().all(|v| (v - 0.01).abs() < 1e-8), "running_var under `variance`: {var:?}");

    // The warning the CLI prints at `job create` for exactly this configuration.
    let spec = job_spec(
        &bn_manifest(AggregationPolicy::Mean, AggregationPolicy::Mean),
        r#"{"name": "fedavg"}"#,
        true,
    );
    let warnings = statistic_warnings(&spec);
    let flagged: Vec<(&str, &StatisticRisk)> =
        warnings.iter().map(|w| (w.tensor.as_str(), &w.risk)).collect();
    let adam = StatisticRisk::ServerOptimizer { optimizer: "fedadam" };
    assert_eq!(flagged, vec![("bn.running_mean", &adam), ("bn.running_var", &adam)]);
    assert_eq!(warnings[1].suggested, AggregationPolicy::Variance);
    assert_eq!(warnings[0].suggested, AggregationPolicy::Statistic);
}

/// FedAdam, FedYogi and FedAvgM (each after FedAvg over deltas) over 5 rounds of 6 clients:
/// the statistics are the weighted means of the clients' values, whatever the optimizer does
/// to `w`.
#[test]
fn server_optimizers_leave_statistics_at_the_weighted_mean() {
    for (name, opt) in [
        ("fedadam", ServerOptimizerSpec::fedadam()),
        ("fedyogi", ServerOptimizerSpec::fedyogi()),
        ("fedavgm", ServerOptimizerSpec::fedavgm()),
    ] {
        let m = bn_manifest(AggregationPolicy::Statistic, AggregationPolicy::Variance);
        let mut s = synchronous(opt);
        let mut rng = StdRng::seed_from_u64(7);
        let mut global = params(&m, &[vec![0.3; 4], vec![0.0; 3], vec![1.0; 3], vec![0.0]]);
        let ids: Vec<ClientId> = (0..6).map(|k| cid(&format!("c{k}"))).collect();
        for round in 0..5 {
            let clients: Vec<ClientValues> = ids.iter().map(|_| train(&mut rng, &global)).collect();
            let deltas: Vec<Parameters> = clients.iter().map(|c| delta(&m, c, &global)).collect();
            let views: Vec<_> = ids
                .iter()
                .zip(&deltas)
                .zip(&clients)
                .map(|((id, d), c)| d.as_update(id, c.num_examples as f64))
                .collect();
            let out = s.aggregate_cohort(&views, &global).unwrap();
            let folded: Vec<(f64, &Parameters, &Parameters)> =
                clients.iter().zip(&deltas).map(|(c, d)| (c.num_examples as f64, &global, d)).collect();
            check_round(&format!("{name} round {round}"), &out, &global, &folded);
            global = out;
        }
    }
}

/// FedBuff (K = 4, s(τ) = 1/√(1+τ), division by K, η_g = 0.5) with clients up to 3 versions
/// stale: the runtime folds each stale delta and rebases its statistics from the client's base
/// to the current model; the committed statistics are then the staleness-weighted means of the
/// clients' values. Without the rebase they are not (the control).
#[test]
fn fedbuff_with_stale_clients_keeps_statistics_at_the_weighted_mean() {
    let m = bn_manifest(AggregationPolicy::Statistic, AggregationPolicy::Variance);
    let mut fedbuff = FedBuff::new(4);
    fedbuff.server_lr = 0.5;
    fedbuff.staleness = StalenessWeight::paper();
    assert_eq!(fedbuff.normalisation, FedBuffNormalisation::ByBufferSize);
    let mut rng = StdRng::seed_from_u64(11);
    let mut history = vec![params(&m, &[vec![0.0; 4], vec![0.5; 3], vec![0.3; 3], vec![7.0]])];
    let ids: Vec<ClientId> = (0..4).map(|k| cid(&format!("c{k}"))).collect();
    let mut control_differs = false;
    for round in 0..5 {
        let current = history.last().unwrap().clone();
        // Each client trained from a version up to 3 behind the current one.
        let bases: Vec<usize> =
            ids.iter().map(|_| history.len() - 1 - rng.gen_range(0..history.len().min(4))).collect();
        let clients: Vec<ClientValues> = bases.iter().map(|&b| train(&mut rng, &history[b])).collect();
        let deltas: Vec<Parameters> =
            clients.iter().zip(&bases).map(|(c, &b)| delta(&m, c, &history[b])).collect();
        let weights: Vec<f64> = clients
            .iter()
            .zip(&bases)
            .map(|(c, &b)| fedbuff.update_weight(c.num_examples, Staleness((history.len() - 1 - b) as u64)))
            .collect();
        let mut partial = PartialAggregate::new(Arc::clone(&m));
        let mut control = PartialAggregate::new(Arc::clone(&m));
        for k in 0..ids.len() {
            let view = deltas[k].as_update(&ids[k], weights[k]);
            fedbuff.fold(&mut partial, &view).unwrap();
            fedbuff.fold(&mut control, &view).unwrap();
            partial.rebase_statistics(weights[k], &history[bases[k]], &current).unwrap();
        }
        assert!(fedbuff.is_full(&partial));
        let out = fedbuff.finish(&partial, &current).unwrap();
        let folded: Vec<(f64, &Parameters, &Parameters)> =
            (0..ids.len()).map(|k| (weights[k], &history[bases[k]], &deltas[k])).collect();
        check_round(&format!("fedbuff round {round}"), &out, &current, &folded);
        let without = fedbuff.finish(&control, &current).unwrap();
        control_differs |= bases.iter().any(|&b| b + 1 != history.len())
            && (without.tensor_f64(MEAN) != out.tensor_f64(MEAN));
        history.push(out);
    }
    assert!(control_differs, "some round had a stale client, and the rebase changed its statistics");
}

/// `variance` clamps at 0 where `statistic` keeps the weighted mean (here of a client sending
/// a negative "variance"); both ignore η_s.
#[test]
fn variance_clamps_and_statistic_does_not() {
    for (policy, want) in [(AggregationPolicy::Variance, 0.0), (AggregationPolicy::Statistic, -0.2)] {
        let m = bn_manifest(AggregationPolicy::Statistic, policy);
        let global = Parameters::zeros(Arc::clone(&m));
        let a = params(&m, &[vec![0.0; 4], vec![0.0; 3], vec![-0.5; 3], vec![0.0]]);
        let b = params(&m, &[vec![0.0; 4], vec![0.0; 3], vec![0.1; 3], vec![0.0]]);
        let (ca, cb) = (cid("a"), cid("b"));
        let out = FedAvg::deltas(0.25)
            .aggregate_cohort(&[a.as_update(&ca, 1.0), b.as_update(&cb, 1.0)], &global)
            .unwrap();
        for v in out.tensor_f64(VAR) {
            assert!((v - want).abs() < 1e-7, "{policy:?}: {v}");
        }
    }
}

/// The whole-cohort strategies: the coordinate-wise median's statistics are the weighted mean of
/// the whole cohort's values, RFFL's are `global` plus the `num_examples`-weighted mean delta of
/// its accepted updates (never clipped).
#[test]
fn robust_and_rffl_statistics_are_weighted_means() {
    let m = bn_manifest(AggregationPolicy::Statistic, AggregationPolicy::Variance);
    let vals = [(2.0, 0.2, -0.1), (1.0, 0.5, 0.4), (1.0, 0.1, 0.9)];
    // `w` moves the same way for everyone, so RFFL's reputations stay positive.
    let ps: Vec<Parameters> = vals
        .iter()
        .map(|&(_, mean, var)| params(&m, &[vec![1.0; 4], vec![mean; 3], vec![var; 3], vec![0.0]]))
        .collect();
    let ids: Vec<ClientId> = (0..3).map(|k| cid(&format!("c{k}"))).collect();
    let views: Vec<_> = ps.iter().zip(&ids).zip(&vals).map(|((p, c), v)| p.as_update(c, v.0)).collect();
    let total: f64 = vals.iter().map(|v| v.0).sum();
    let mean_oracle: f64 = vals.iter().map(|v| v.0 * v.1).sum::<f64>() / total;
    let var_oracle: f64 = (vals.iter().map(|v| v.0 * v.2).sum::<f64>() / total).max(0.0);
    let zero = Parameters::zeros(Arc::clone(&m));
    let median =
        shoal_functions::robust::CoordinateMedian::new(3).unwrap().aggregate_cohort(&views, &zero).unwrap();
    let mut rffl = shoal_functions::rffl::Rffl::new(shoal_functions::rffl::RfflConfig {
        gamma: 1e-3,
        ..Default::default()
    })
    .unwrap();
    let rffl_out = rffl.aggregate_cohort(&views, &zero).unwrap();
    for (what, out) in [("median", &median), ("rffl", &rffl_out)] {
        assert!(
            out.tensor_f64(MEAN).iter().all(|v| (v - mean_oracle).abs() < 1e-6),
            "{what}: {:?}",
            out.tensor_f64(MEAN)
        );
        assert!(
            out.tensor_f64(VAR).iter().all(|v| (v - var_oracle).abs() < 1e-6),
            "{what}: {:?}",
            out.tensor_f64(VAR)
        );
    }
}

/// Builds a job spec around `manifest` and a strategy given as JSON (delta updates), with or
/// without FedAdam.
fn job_spec(manifest: &ModelManifest, strategy: &str, fedadam: bool) -> JobSpec {
    let mut spec = serde_json::json!({
        "job": "bn",
        "manifest": manifest,
        "strategy": serde_json::from_str::<serde_json::Value>(strategy).unwrap(),
        "round_policy": { "mode": "sync", "cohort_size": 4, "min_clients": 4, "deadline_ms": 30000 },
        "update_kind": "delta",
        "rounds": 5
    });
    if fedadam {
        spec["server_optimizer"] =
            serde_json::json!({"name": "fedadam", "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9});
    }
    serde_json::from_value(spec).unwrap()
}

/// Which configurations the job-create warnings flag, and which they leave alone.
#[test]
fn warnings_name_the_risk_per_configuration() {
    let mean = bn_manifest(AggregationPolicy::Mean, AggregationPolicy::Mean);
    let risks = |m: &ModelManifest, strategy: &str, fedadam: bool| -> Vec<(String, StatisticRisk)> {
        statistic_warnings(&job_spec(m, strategy, fedadam)).into_iter().map(|w| (w.tensor, w.risk)).collect()
    };
    // FedAvg over deltas, η_s = 1, no optimizer: a weighted mean, nothing to say.
    assert!(risks(&mean, r#"{"name": "fedavg"}"#, false).is_empty());
    // η_s ≠ 1 scales the mean delta of every mean tensor, the counter included.
    let lr = risks(&mean, r#"{"name": "fedavg", "server_learning_rate": 0.5}"#, false);
    assert_eq!(lr.len(), 2, "{lr:?}"); // running_mean, running_var; the counter is `max`
    assert!(lr.iter().all(|(_, r)| *r == StatisticRisk::ServerLearningRate { server_learning_rate: 0.5 }));
    // FedBuff and RFFL.
    let fedbuff = risks(
        &mean,
        r#"{"name": "fedbuff", "buffer_size": 4, "staleness": {"kind": "polynomial", "exponent": 0.5}, "normalisation": "by_buffer_size", "example_weight": "equal", "server_lr": 1.0}"#,
        false,
    );
    assert!(
        fedbuff.iter().all(|(_, r)| *r == StatisticRisk::AsynchronousStep { strategy: "fedbuff" })
            && fedbuff.len() == 2
    );
    let rffl = risks(&mean, r#"{"name": "rffl", "gamma": 0.5}"#, false);
    assert!(
        rffl.iter().all(|(_, r)| *r == StatisticRisk::GradientStrategy { strategy: "rffl" })
            && rffl.len() == 2
    );
    // Declared statistics are safe under every configuration; a variance under `statistic` is
    // told to clamp.
    let declared = bn_manifest(AggregationPolicy::Statistic, AggregationPolicy::Variance);
    assert!(risks(&declared, r#"{"name": "fedbuff", "buffer_size": 4, "staleness": {"kind": "polynomial", "exponent": 0.5}, "normalisation": "by_buffer_size", "example_weight": "equal", "server_lr": 1.0}"#, true).is_empty());
    let unclamped = bn_manifest(AggregationPolicy::Statistic, AggregationPolicy::Statistic);
    assert_eq!(
        risks(&unclamped, r#"{"name": "fedavg"}"#, true),
        vec![("bn.running_var".to_string(), StatisticRisk::UnclampedVariance)]
    );
    // Names: PyTorch, Keras and counters.
    assert_eq!(RunningStatistic::of("layer1.0.bn1.running_var"), Some(RunningStatistic::Variance));
    assert_eq!(
        RunningStatistic::of("batch_normalization/moving_variance:0"),
        Some(RunningStatistic::Variance)
    );
    assert_eq!(RunningStatistic::of("bn.moving_variance"), Some(RunningStatistic::Variance));
    assert_eq!(RunningStatistic::of("bn.Moving_Mean"), Some(RunningStatistic::Mean));
    assert_eq!(RunningStatistic::of("bn.num_batches_tracked"), Some(RunningStatistic::Counter));
    assert_eq!(RunningStatistic::of("fc.weight"), None);
}
