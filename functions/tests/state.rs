//! Strategy state that survives a change of top (`Strategy::save_state` / `restore_state`,
//! `shoal_functions::state`):
//!
//! - FedAdam and FedAvgM jobs (built from their job spec by the factory) over 8 rounds: saving
//!   after every round and restoring into a freshly built strategy at chosen rounds gives the
//!   uninterrupted run's model sequence bit for bit, and both follow an independent f64 oracle
//!   of the optimizer;
//! - RFFL over 8 rounds with a free rider removed after the warm-up: the same for the models,
//!   the reputations, the reputable set and every client's reward;
//! - Bristle: the seeded draws continue from the restored round counter;
//! - corrupt, wrong-version, wrong-strategy and mismatched states are refused with
//!   `ErrorKind::InvalidState` and the right `StateError`, and the strategy goes on unchanged.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_functions::bristle::{Bristle, BristleConfig, Prioritizer};
use shoal_functions::factory::build_strategy;
use shoal_functions::rffl::{Rffl, RfflConfig};
use shoal_functions::state::{StateError, STATE_FORMAT};
use shoal_functions::{
    ClientId, DType, Error, ErrorKind, JobSpec, ModelManifest, Parameters, Strategy, TensorSpec, UpdateView,
};

mod common;
use common::cid;

const ROUNDS: usize = 8;
const CLIENTS: usize = 5;

fn manifest() -> Arc<ModelManifest> {
    Arc::new(
        ModelManifest::new(vec![
            TensorSpec::new("w", DType::F32, vec![6]),
            TensorSpec::new("b", DType::F32, vec![2]),
        ])
        .unwrap(),
    )
}

fn spec(strategy: &str, optimizer: Option<&str>) -> JobSpec {
    let mut v = serde_json::json!({
        "job": "failover",
        "manifest": &*manifest(),
        "strategy": serde_json::from_str::<serde_json::Value>(strategy).unwrap(),
        "round_policy": { "mode": "sync", "cohort_size": CLIENTS, "min_clients": CLIENTS, "deadline_ms": 30000 },
        "update_kind": "delta",
        "rounds": ROUNDS
    });
    if let Some(o) = optimizer {
        v["server_optimizer"] = serde_json::from_str(o).unwrap();
    }
    serde_json::from_value(v).unwrap()
}

const FEDADAM: &str = r#"{"name": "fedadam", "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}"#;
const FEDAVGM: &str = r#"{"name": "fedavgm", "lr": 0.5, "momentum": 0.9}"#;

/// The cohort of round `r`: client k's delta and weight, the same in every run.
struct Round {
    ids: Vec<ClientId>,
    deltas: Vec<Parameters>,
    weights: Vec<f64>,
}

impl Round {
    fn new(r: usize, free_rider: bool) -> Round {
        let m = manifest();
        let mut rng = StdRng::seed_from_u64(1000 + r as u64);
        let direction: Vec<f64> =
            (0..8).map(|e| 0.1 * (e as f64 + 1.0) * if e % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let ids: Vec<ClientId> = (0..CLIENTS).map(|k| cid(&format!("client-{k}"))).collect();
        let deltas = (0..CLIENTS)
            .map(|k| {
                let flat: Vec<f64> = if free_rider && k == CLIENTS - 1 {
                    (0..8).map(|_| rng.gen_range(-1.0..1.0)).collect()
                } else {
                    direction.iter().map(|d| d + rng.gen_range(-0.05..0.05)).collect()
                };
                Parameters::from_f64(Arc::clone(&m), &[flat[..6].to_vec(), flat[6..].to_vec()]).unwrap()
            })
            .collect();
        let weights = (0..CLIENTS).map(|k| 10.0 * (k + 1) as f64).collect();
        Round { ids, deltas, weights }
    }

    fn views(&self) -> Vec<UpdateView<'_>> {
        self.ids.iter().zip(&self.deltas).zip(&self.weights).map(|((c, d), &w)| d.as_update(c, w)).collect()
    }
}

/// Runs `ROUNDS` rounds; before round `r`, if `failover(r)`, the strategy is replaced by a fresh
/// one from `build` restored from the state saved after round `r − 1`. Returns every model.
fn run(
    build: &dyn Fn() -> Box<dyn Strategy>,
    failover: &dyn Fn(usize) -> bool,
    free_rider: bool,
) -> Vec<Parameters> {
    let mut s = build();
    let mut global = Parameters::zeros(manifest());
    let mut saved = s.save_state().unwrap();
    let mut models = Vec::new();
    for r in 0..ROUNDS {
        if failover(r) {
            s = build();
            s.restore_state(&saved).unwrap();
        }
        let round = Round::new(r, free_rider);
        global = s.aggregate_cohort(&round.views(), &global).unwrap();
        saved = s.save_state().unwrap();
        models.push(global.clone());
    }
    models
}

fn same_bits(a: &[Parameters], b: &[Parameters], what: &str) {
    assert_eq!(a.len(), b.len());
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.as_bytes(), y.as_bytes(), "{what}: model of round {r} differs");
    }
}

/// Failover schedules: none, every round, each single round, and seeded random subsets.
fn schedules() -> Vec<Vec<bool>> {
    let mut out = vec![vec![false; ROUNDS], vec![true; ROUNDS]];
    for k in 1..ROUNDS {
        out.push((0..ROUNDS).map(|r| r == k).collect());
    }
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..4 {
        out.push((0..ROUNDS).map(|_| rng.gen_bool(0.4)).collect());
    }
    out
}

/// The f64 oracle of FedAvg over deltas (η_s = 1) followed by FedAdam (Flower's bias
/// correction) or FedAvgM, rounding the models to f32 where the strategies store them.
fn optimizer_oracle(adam: bool) -> Vec<Vec<f64>> {
    let f32r = |x: f64| f64::from(x as f32);
    let (mut x, mut m, mut v) = (vec![0.0f64; 8], vec![0.0f64; 8], vec![0.0f64; 8]);
    let mut models = Vec::new();
    for r in 0..ROUNDS {
        let round = Round::new(r, false);
        let total: f64 = round.weights.iter().sum();
        let flat: Vec<Vec<f64>> =
            round.deltas.iter().map(|d| [d.tensor_f64(0), d.tensor_f64(1)].concat()).collect();
        let t = (r + 1) as f64;
        for e in 0..8 {
            let mean_delta: f64 = flat.iter().zip(&round.weights).map(|(d, w)| w * d[e]).sum::<f64>() / total;
            let pseudo = f32r(x[e] + mean_delta) - x[e];
            x[e] = if adam {
                m[e] = 0.9 * m[e] + 0.1 * pseudo;
                v[e] = 0.99 * v[e] + 0.01 * pseudo * pseudo;
                let eta = 0.1 * (1.0 - 0.99f64.powf(t + 1.0)).sqrt() / (1.0 - 0.9f64.powf(t + 1.0));
                f32r(x[e] + eta * m[e] / (v[e].sqrt() + 1e-3))
            } else {
                m[e] = 0.9 * m[e] + pseudo;
                f32r(x[e] + 0.5 * m[e])
            };
        }
        models.push(x.clone());
    }
    models
}

#[test]
fn server_optimizer_jobs_resume_exactly() {
    for (name, opt, adam) in [("fedadam", FEDADAM, true), ("fedavgm", FEDAVGM, false)] {
        let spec = spec(r#"{"name": "fedavg"}"#, Some(opt));
        let build = || build_strategy(&spec).unwrap();
        let uninterrupted = run(&build, &|_| false, false);
        for (k, schedule) in schedules().iter().enumerate() {
            let models = run(&build, &|r| schedule[r], false);
            same_bits(&uninterrupted, &models, &format!("{name}, schedule {k} {schedule:?}"));
        }
        for (r, (got, want)) in uninterrupted.iter().zip(optimizer_oracle(adam)).enumerate() {
            let got = [got.tensor_f64(0), got.tensor_f64(1)].concat();
            for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name} round {r} [{e}]: {g} vs oracle {w}"
                );
            }
        }
    }
}

fn rffl_config() -> RfflConfig {
    RfflConfig { gamma: 1.0, warmup_rounds: 3, ..RfflConfig::default() }
}

/// Everything a participant sees of an RFFL server after a round.
#[derive(Debug, PartialEq)]
struct RfflView {
    model: Vec<u8>,
    participants: Vec<(ClientId, u64, u64, bool)>,
    rewards: Vec<Vec<u8>>,
}

fn rffl_run(failover: &dyn Fn(usize) -> bool) -> Vec<RfflView> {
    let mut s = Rffl::new(rffl_config()).unwrap();
    let mut global = Parameters::zeros(manifest());
    let mut saved = s.save_state().unwrap();
    let mut out = Vec::new();
    for r in 0..ROUNDS {
        if failover(r) {
            s = Rffl::new(rffl_config()).unwrap();
            s.restore_state(&saved).unwrap();
        }
        let round = Round::new(r, true);
        global = s.aggregate_cohort(&round.views(), &global).unwrap();
        saved = s.save_state().unwrap();
        let participants = s
            .participants()
            .iter()
            .map(|(c, p)| (c.clone(), p.share.to_bits(), p.reputation.to_bits(), p.reputable))
            .collect();
        let rewards =
            round.ids.iter().map(|c| s.client_reward(c).unwrap().unwrap().as_bytes().to_vec()).collect();
        out.push(RfflView { model: global.as_bytes().to_vec(), participants, rewards });
    }
    out
}

#[test]
fn rffl_resumes_with_the_same_reputations_and_rewards() {
    let uninterrupted = rffl_run(&|_| false);
    let last = uninterrupted.last().unwrap();
    assert!(last.participants.iter().any(|p| !p.3), "the free rider is removed after the warm-up");
    assert!(
        last.rewards.iter().collect::<std::collections::BTreeSet<_>>().len() > 1,
        "rewards differ by reputation"
    );
    for (k, schedule) in schedules().iter().enumerate() {
        let resumed = rffl_run(&|r| schedule[r]);
        for (r, (a, b)) in uninterrupted.iter().zip(&resumed).enumerate() {
            assert_eq!(a, b, "schedule {k} {schedule:?}, round {r}");
        }
    }
}

#[test]
fn bristle_draws_continue_from_the_restored_round() {
    let config = BristleConfig {
        prioritizer: Prioritizer::Random { k: 2 },
        seed: 42,
        update_kind: shoal_functions::UpdateKind::Delta,
        ..BristleConfig::default()
    };
    let build = || -> Box<dyn Strategy> { Box::new(Bristle::new(config.clone()).unwrap()) };
    let uninterrupted = run(&build, &|_| false, true);
    for (k, schedule) in schedules().iter().enumerate() {
        same_bits(&uninterrupted, &run(&build, &|r| schedule[r], true), &format!("bristle schedule {k}"));
    }
    // The control: a new top that starts from defaults (no restore) replays round 0's draws.
    let mut s = build();
    let mut global = Parameters::zeros(manifest());
    let mut differs = false;
    for (r, want) in uninterrupted.iter().enumerate() {
        if r == 4 {
            s = build();
        }
        global = s.aggregate_cohort(&Round::new(r, true).views(), &global).unwrap();
        differs |= global.as_bytes() != want.as_bytes();
    }
    assert!(differs, "forgetting the round counter changes the draws");
}

fn state_error(r: shoal_functions::Result<()>) -> StateError {
    match r {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidState, "{e}");
            match e {
                Error::InvalidState(s) => s,
                other => panic!("not a state error: {other:?}"),
            }
        }
        Ok(()) => panic!("the state was accepted"),
    }
}

/// An envelope written by hand, for versions and formats this build does not write.
#[derive(Serialize)]
struct ForeignEnvelope<'a> {
    format: &'a str,
    version: u16,
    strategy: &'a str,
}

#[test]
fn unreadable_states_are_refused_and_change_nothing() {
    let adam_spec = spec(r#"{"name": "fedavg"}"#, Some(FEDADAM));
    let mut adam = build_strategy(&adam_spec).unwrap();
    let mut global = Parameters::zeros(manifest());
    for r in 0..3 {
        global = adam.aggregate_cohort(&Round::new(r, false).views(), &global).unwrap();
    }
    let good = adam.save_state().unwrap();

    // Another strategy's state, both ways, and a stateless strategy's.
    let mut rffl = Rffl::new(rffl_config()).unwrap();
    assert!(
        matches!(state_error(rffl.restore_state(&good)), StateError::WrongStrategy { ref found, .. } if found == "fedadam")
    );
    let mut avgm = build_strategy(&spec(r#"{"name": "fedavg"}"#, Some(FEDAVGM))).unwrap();
    assert!(matches!(state_error(avgm.restore_state(&good)), StateError::WrongStrategy { .. }));
    let mut fedavg = build_strategy(&spec(r#"{"name": "fedavg"}"#, None)).unwrap();
    assert!(matches!(state_error(fedavg.restore_state(&good)), StateError::WrongStrategy { .. }));
    assert!(matches!(
        state_error(adam.restore_state(&fedavg.save_state().unwrap())),
        StateError::WrongStrategy { .. }
    ));

    // Another version, another format, truncation, garbage, a flipped bit.
    let v2 =
        rmp_serde::to_vec_named(&ForeignEnvelope { format: STATE_FORMAT, version: 2, strategy: "fedadam" })
            .unwrap();
    assert_eq!(
        state_error(adam.restore_state(&v2)),
        StateError::UnsupportedVersion { found: 2, supported: 1 }
    );
    let other = rmp_serde::to_vec_named(&ForeignEnvelope {
        format: "something-else",
        version: 1,
        strategy: "fedadam",
    })
    .unwrap();
    assert!(matches!(state_error(adam.restore_state(&other)), StateError::Corrupt(_)));
    assert!(matches!(state_error(adam.restore_state(&good[..good.len() / 2])), StateError::Corrupt(_)));
    assert!(matches!(state_error(adam.restore_state(&[0xc1, 0x00, 0xff])), StateError::Corrupt(_)));
    assert!(matches!(state_error(adam.restore_state(&[])), StateError::Corrupt(_)));
    for pos in [good.len() - 1, good.len() - 20, good.len() / 2] {
        let mut flipped = good.clone();
        flipped[pos] ^= 0x04;
        let e = state_error(adam.restore_state(&flipped));
        assert!(matches!(e, StateError::Corrupt(_) | StateError::Mismatch(_)), "byte {pos}: {e:?}");
    }

    // The same strategy with another configuration.
    let other_lr = FEDADAM.replace("\"lr\": 0.1", "\"lr\": 0.2");
    let mut adam_lr = build_strategy(&spec(r#"{"name": "fedavg"}"#, Some(&other_lr))).unwrap();
    assert!(matches!(state_error(adam_lr.restore_state(&good)), StateError::Mismatch(_)));
    let mut rffl_alpha = Rffl::new(RfflConfig { alpha: 0.9, ..rffl_config() }).unwrap();
    rffl.aggregate_cohort(&Round::new(0, true).views(), &Parameters::zeros(manifest())).unwrap();
    assert!(matches!(
        state_error(rffl_alpha.restore_state(&rffl.save_state().unwrap())),
        StateError::Mismatch(_)
    ));

    // After all these refusals the strategy goes on exactly as the uninterrupted run.
    let build = || build_strategy(&adam_spec).unwrap();
    let uninterrupted = run(&build, &|_| false, false);
    for (r, want) in uninterrupted.iter().enumerate().skip(3) {
        global = adam.aggregate_cohort(&Round::new(r, false).views(), &global).unwrap();
        assert_eq!(global.as_bytes(), want.as_bytes(), "round {r} after refused restores");
    }
}
