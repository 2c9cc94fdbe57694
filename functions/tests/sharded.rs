//! The coordinate-sharded form of the whole-cohort strategies (`shoal_functions::shard`, the
//! exchange of DESIGN.md §5) gives the same model as the strategy on the whole cohort: for every
//! shard count, cohort order and mix of dtypes and policies, byte for byte.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_functions::robust::{pairwise_sq_distances, Bulyan, CoordinateMedian, Krum, TrimmedMean};
use shoal_functions::shard::plan;
use shoal_functions::{
    AggregationPolicy, ClientId, DType, ModelManifest, Parameters, Sharding, Strategy, TensorSpec, UpdateView,
};

fn manifest() -> Arc<ModelManifest> {
    let mut max = TensorSpec::new("steps", DType::I64, vec![]);
    max.policy = AggregationPolicy::Max;
    let mut first = TensorSpec::new("seed", DType::F32, vec![3]);
    first.policy = AggregationPolicy::First;
    Arc::new(
        ModelManifest::new(vec![
            TensorSpec::new("conv", DType::F32, vec![37, 5]),
            TensorSpec::new("bias", DType::BF16, vec![11]),
            max,
            first,
            TensorSpec::new("head", DType::F32, vec![29]),
        ])
        .unwrap(),
    )
}

fn cohort(m: &Arc<ModelManifest>, n: usize, seed: u64) -> Vec<(ClientId, Parameters, f64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Vec<(ClientId, Parameters, f64)> = (0..n)
        .map(|k| {
            let values: Vec<Vec<f64>> = m
                .tensors()
                .iter()
                .map(|t| {
                    (0..t.numel())
                        .map(|_| {
                            if t.dtype.is_float() {
                                rng.gen_range(-3.0..3.0)
                            } else {
                                rng.gen_range(0..500) as f64
                            }
                        })
                        .collect()
                })
                .collect();
            let mut p = values;
            if k == n - 1 {
                // An outlier, so the selections are not all ties.
                p.iter_mut().flatten().for_each(|v| *v *= 40.0);
            }
            (
                ClientId::new(format!("c{k:02}")).unwrap(),
                Parameters::from_f64(Arc::clone(m), &p).unwrap(),
                1.0 + k as f64,
            )
        })
        .collect();
    // Arrival order is not client order.
    out.shuffle(&mut rng);
    out
}

fn strategies() -> Vec<Box<dyn Strategy>> {
    vec![
        Box::new(CoordinateMedian::new(1).unwrap()),
        Box::new(TrimmedMean::new(0.2, 1).unwrap()),
        Box::new(Krum::new(1, 1, 5).unwrap()),
        Box::new(Krum::new(1, 4, 5).unwrap()),
        Box::new(Bulyan::new(1, 7).unwrap()),
    ]
}

/// Runs `s` shard by shard, as the nodes of a cluster would, and assembles the result.
fn sharded(
    s: &mut dyn Strategy,
    m: &Arc<ModelManifest>,
    c: &[(ClientId, Parameters, f64)],
    g: &Parameters,
    k: usize,
) -> Parameters {
    let shards = plan(m, k).unwrap();
    let clients: Vec<ClientId> = c.iter().map(|(id, _, _)| id.clone()).collect();
    let subs: Vec<Vec<Parameters>> =
        shards.iter().map(|sh| c.iter().map(|(_, p, _)| sh.sub_params(p).unwrap()).collect()).collect();
    let views = |i: usize| -> Vec<UpdateView<'_>> {
        subs[i].iter().zip(c).map(|(p, (id, _, w))| p.as_update(id, *w)).collect()
    };
    let selected = match s.sharding() {
        Sharding::Coordinatewise => None,
        Sharding::DistanceSelection => {
            let n = c.len();
            let mut d = vec![0.0; n * n];
            for i in 0..shards.len() {
                for (acc, x) in d.iter_mut().zip(pairwise_sq_distances(&views(i)).unwrap()) {
                    *acc += x;
                }
            }
            Some(s.select_by_distances(&d, &clients).unwrap())
        }
        Sharding::Unsupported | Sharding::TwoPhase => panic!("{} is not shardable", s.name()),
    };
    let mut out = g.clone();
    for (i, sh) in shards.iter().enumerate() {
        let sub_g = sh.sub_params(g).unwrap();
        let r = match &selected {
            None => s.aggregate_cohort(&views(i), &sub_g).unwrap(),
            Some(sel) => s.aggregate_selected(&views(i), sel, &sub_g).unwrap(),
        };
        sh.insert(&mut out, &r).unwrap();
    }
    out
}

#[test]
fn every_shard_count_gives_the_whole_cohort_result() {
    let m = manifest();
    let g = Parameters::from_f64(
        Arc::clone(&m),
        &m.tensors().iter().map(|t| vec![0.25; t.numel()]).collect::<Vec<_>>(),
    )
    .unwrap();
    for seed in 0..4 {
        let c = cohort(&m, 9, seed);
        let views: Vec<UpdateView<'_>> = c.iter().map(|(id, p, w)| p.as_update(id, *w)).collect();
        for mut s in strategies() {
            let whole = s.aggregate_cohort(&views, &g).unwrap();
            for k in [1, 2, 3, 5, 8] {
                let got = sharded(&mut *s, &m, &c, &g, k);
                assert_eq!(got.as_bytes(), whole.as_bytes(), "{} over {k} shards, seed {seed}", s.name());
            }
        }
    }
}

#[test]
fn a_bad_distance_matrix_or_selection_is_refused() {
    let k = Krum::new(1, 1, 5).unwrap();
    let ids: Vec<ClientId> = (0..5).map(|i| ClientId::new(format!("c{i}")).unwrap()).collect();
    assert!(k.select_by_distances(&[0.0; 24], &ids).is_err(), "not n × n");
    assert!(k.select_by_distances(&[f64::NAN; 25], &ids).is_err(), "not finite");
    assert!(k.select_by_distances(&[0.0; 16], &ids[..4]).is_err(), "below min_clients");
    let med = CoordinateMedian::new(1).unwrap();
    assert!(med.select_by_distances(&[0.0; 25], &ids).is_err(), "median does not select");
}
