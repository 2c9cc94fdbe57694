//! RFFL's collaborative fairness and robustness on real data (algorithms.md §A.5): 10 clients
//! on a power-law split of the digits training set, each keeping its own softmax-regression
//! model as in RFFL (the server exchanges only deltas). The Pearson correlation between each
//! client's standalone accuracy and the accuracy of its own model after collaboration (built from
//! its per-client reward) must exceed 0.5; two free riders (random uploads) must be removed
//! within a few rounds after the warm-up.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_cli::sim::{self, Dataset, LocalTraining, SoftmaxParams};
use shoal_functions::rffl::{pearson, upload_scale, Mode, Rffl, RfflConfig};
use shoal_functions::tensor::encode_safetensors;
use shoal_functions::{ClientId, DType, ModelManifest, Parameters, TensorSpec};

const ROUNDS: usize = 20;
const HONEST: usize = 10;
const FREE_RIDERS: usize = 2;
const WARMUP: u64 = 10;

fn manifest() -> Arc<ModelManifest> {
    Arc::new(
        ModelManifest::new(vec![
            TensorSpec::new("fc.weight", DType::F32, vec![10, 64]),
            TensorSpec::new("fc.bias", DType::F32, vec![10]),
        ])
        .unwrap(),
    )
}

fn flat(p: &SoftmaxParams) -> Vec<f64> {
    p.weight.iter().chain(&p.bias).map(|&v| f64::from(v)).collect()
}

fn from_flat(v: &[f64]) -> SoftmaxParams {
    SoftmaxParams {
        weight: v[..640].iter().map(|&x| x as f32).collect(),
        bias: v[640..].iter().map(|&x| x as f32).collect(),
    }
}

fn as_parameters(m: &Arc<ModelManifest>, v: &[f64]) -> Parameters {
    let bytes = encode_safetensors(m, &[v[..640].to_vec(), v[640..].to_vec()]).unwrap();
    Parameters::from_safetensors(Arc::clone(m), &bytes).unwrap()
}

#[test]
fn rffl_rewards_are_fair_and_free_riders_are_removed() {
    let data = Dataset::digits().unwrap();
    let (train, test) = sim::train_test_split(&data, 0.2, 7);
    let shards: Vec<Dataset> =
        sim::powerlaw_split(train.len(), HONEST, 11).iter().map(|i| train.subset(i)).collect();
    let local = LocalTraining { epochs: 1, batch_size: 16, learning_rate: 0.5, l2: 0.0 };
    let m = manifest();

    // Standalone: each honest client alone, for as many epochs as it trains in the federation.
    let standalone: Vec<f64> = shards
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut p = SoftmaxParams::zeros();
            let cfg = LocalTraining { epochs: ROUNDS * local.epochs, ..local };
            sim::train(&mut p, d, &cfg, &mut ChaCha8Rng::seed_from_u64(100 + i as u64));
            sim::accuracy(&p, &test)
        })
        .collect();

    let config = RfflConfig { gamma: 0.5, warmup_rounds: WARMUP, ..RfflConfig::default() };
    let gamma = config.gamma;
    let mut rffl = Rffl::new(config).unwrap();
    let ids: Vec<ClientId> =
        (0..HONEST + FREE_RIDERS).map(|i| ClientId::new(format!("c{i:02}")).unwrap()).collect();
    let mut models: Vec<Vec<f64>> = vec![flat(&SoftmaxParams::zeros()); HONEST];
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut removed_at: Vec<Option<usize>> = vec![None; FREE_RIDERS];
    for round in 0..ROUNDS {
        // Each honest client trains from its own model and uploads its delta, then keeps the
        // clipped delta applied (the reference code resets w_i to w_before + clipped g_i).
        let mut uploads: Vec<Parameters> = Vec::new();
        for (i, d) in shards.iter().enumerate() {
            let before = models[i].clone();
            let mut p = from_flat(&before);
            sim::train(&mut p, d, &local, &mut ChaCha8Rng::seed_from_u64((round * 100 + i) as u64));
            let g: Vec<f64> = flat(&p).iter().zip(&before).map(|(a, b)| a - b).collect();
            let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            let s = upload_scale(Mode::ReferenceCode, gamma, norm);
            models[i] = before.iter().zip(&g).map(|(b, x)| b + s * x).collect();
            uploads.push(as_parameters(&m, &g));
        }
        for _ in 0..FREE_RIDERS {
            let g: Vec<f64> = (0..650).map(|_| rng.gen_range(-1.0..1.0)).collect();
            uploads.push(as_parameters(&m, &g));
        }
        let weights: Vec<f64> = shards.iter().map(|d| d.len() as f64).chain([600.0; FREE_RIDERS]).collect();
        let views: Vec<_> =
            uploads.iter().zip(&ids).zip(&weights).map(|((u, c), &w)| u.as_update(c, w)).collect();
        let r = rffl.step(&views).unwrap();
        for (k, at) in removed_at.iter_mut().enumerate() {
            if at.is_none() && r.removed().contains(&ids[HONEST + k]) {
                *at = Some(round);
            }
        }
        // Each honest client adds its reward (the top-q_i sparsified aggregate).
        for (i, model) in models.iter_mut().enumerate() {
            let reward = r.reward(&ids[i]).unwrap();
            let v: Vec<f64> = reward.tensor_f64(0).into_iter().chain(reward.tensor_f64(1)).collect();
            model.iter_mut().zip(&v).for_each(|(w, x)| *w += x);
        }
    }
    let collaborative: Vec<f64> = models.iter().map(|w| sim::accuracy(&from_flat(w), &test)).collect();
    let rho = pearson(&standalone, &collaborative).unwrap();
    eprintln!("standalone    {standalone:.3?}\ncollaborative {collaborative:.3?}\npearson {rho:.3}");
    eprintln!("free riders removed at rounds {removed_at:?}");
    assert!(rho > 0.5, "fairness (Pearson) {rho} <= 0.5");
    for (k, at) in removed_at.iter().enumerate() {
        let at = at.unwrap_or_else(|| panic!("free rider {k} never removed"));
        assert!(at >= WARMUP as usize && at <= WARMUP as usize + 3, "free rider {k} removed at round {at}");
    }
    // Collaboration helps the honest clients on average.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&collaborative) > mean(&standalone), "{} vs {}", mean(&collaborative), mean(&standalone));
}
