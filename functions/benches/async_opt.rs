//! Server optimiser step and FedBuff fold, against FedAvg's fold of the same data.
//!
//! Model: one F32 tensor of 1,048,576 elements (4 MiB per update, 64-byte aligned).
//!
//! Group `server_opt_step_1M_f32` (throughput = one model's bytes):
//! - `fedadam_step`, `fedyogi_step`, `fedavgm_step`: `ServerOptimizer::step(global, aggregated)`
//!   with the state already allocated (the first step runs before timing). Includes the
//!   allocation and copy of the output `Parameters`, which is part of the API.
//!
//! Group `fedbuff_fold_20x1M_f32` (throughput = the 80 MiB of update bytes):
//! - `fedbuff_fold_batch`: `FedBuff::fold_batch` of 20 views weighted by
//!   `FedBuff::update_weight(num_examples, staleness)` (staleness 0..4, FLSim polynomial);
//! - `fedbuff_fold_one_by_one`: 20 `FedBuff::fold` calls (the runtime's arrival order);
//! - `fedavg_fold_batch`: `FedAvg::fold_batch` of the same 20 updates weighted by num_examples;
//! - `fedbuff_finish`: `FedBuff::finish` of the full buffer (θ + η Σ w Δ / K).
//!
//! Folds use `iter_custom`: `PartialAggregate::reset` runs before each iteration, untimed.
//!
//! With `--bench`, two lines follow from best-of-5 `Instant` timings in this process:
//! `fedbuff/fedavg fold ratio: ...` and `fedadam step / fedavg fold: ...` (the step against the
//! FedAvg fold of the 20-update cohort and of one update).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shoal_functions::asynchronous::{ExampleWeight, FedBuff, Staleness, StalenessWeight};
use shoal_functions::server_opt::{ServerOptimizer, ServerOptimizerSpec};

mod common;
use common::{best_of, timed_fold, AlignedWords};
use shoal_functions::{
    ClientId, DType, FedAvg, ModelManifest, Parameters, PartialAggregate, Strategy, TensorSpec, UpdateView,
};

/// Elements per update.
const N: usize = 1 << 20;
/// Updates per FedBuff buffer.
const K: usize = 20;

/// xorshift64*: values in [-1, 1).
fn fill(state: &mut u64, out: &mut [f32]) {
    for x in out {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        *x = r as f32 / (1u64 << 23) as f32 - 1.0;
    }
}

struct Data {
    manifest: Arc<ModelManifest>,
    updates: Vec<AlignedWords>,
    ids: Vec<ClientId>,
    num_examples: Vec<u64>,
    staleness: Vec<Staleness>,
    global: Parameters,
    aggregated: Parameters,
    fedbuff: FedBuff,
}

impl Data {
    fn new() -> Data {
        let manifest =
            Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![N])]).expect("manifest"));
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let updates = (0..K)
            .map(|_| {
                let mut buf = AlignedWords::zeroed(manifest.slot_bytes() / 8);
                fill(&mut state, bytemuck::cast_slice_mut(buf.words_mut()));
                buf
            })
            .collect();
        let mut values = vec![0f32; N];
        fill(&mut state, &mut values);
        let global =
            Parameters::from_f64(Arc::clone(&manifest), &[values.iter().map(|&x| f64::from(x)).collect()])
                .expect("global");
        fill(&mut state, &mut values);
        let aggregated = Parameters::from_f64(
            Arc::clone(&manifest),
            &[values.iter().map(|&x| f64::from(x) * 0.01).collect()],
        )
        .expect("aggregated");
        let fedbuff = FedBuff {
            buffer_size: K as u32,
            staleness: StalenessWeight::flsim_polynomial(0.5),
            example_weight: ExampleWeight::NumExamples,
            ..FedBuff::new(K as u32)
        };
        Data {
            ids: (0..K).map(|k| ClientId::new(format!("client-{k:02}")).expect("id")).collect(),
            num_examples: (1..=K as u64).map(|k| 100 * k).collect(),
            staleness: (0..K as u64).map(|k| Staleness(k % 5)).collect(),
            manifest,
            updates,
            global,
            aggregated,
            fedbuff,
        }
    }

    fn views(&self, weight: impl Fn(usize) -> f64) -> Vec<UpdateView<'_>> {
        self.updates
            .iter()
            .zip(&self.ids)
            .enumerate()
            .map(|(k, (u, client))| UpdateView {
                manifest: &self.manifest,
                bytes: bytemuck::cast_slice(u.words()),
                weight: weight(k),
                client,
            })
            .collect()
    }

    fn fedbuff_views(&self) -> Vec<UpdateView<'_>> {
        self.views(|k| self.fedbuff.update_weight(self.num_examples[k], self.staleness[k]))
    }

    fn fedavg_views(&self) -> Vec<UpdateView<'_>> {
        self.views(|k| self.num_examples[k] as f64)
    }

    /// An optimiser whose state is allocated (one step taken).
    fn optimiser(&self, config: ServerOptimizerSpec) -> ServerOptimizer {
        let mut opt = ServerOptimizer::new(config).expect("config");
        opt.step(&self.global, &self.aggregated).expect("step");
        opt
    }
}

fn step_group(c: &mut Criterion, data: &Data) {
    let mut g = c.benchmark_group("server_opt_step_1M_f32");
    g.throughput(Throughput::Bytes((4 * N) as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, config) in [
        ("fedadam_step", ServerOptimizerSpec::fedadam()),
        ("fedyogi_step", ServerOptimizerSpec::fedyogi()),
        ("fedavgm_step", ServerOptimizerSpec::fedavgm()),
    ] {
        let mut opt = data.optimiser(config);
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(opt.step(black_box(&data.global), black_box(&data.aggregated)).expect("step"))
            })
        });
    }
    g.finish();
}

fn fold_group(c: &mut Criterion, data: &Data) {
    let fb_views = data.fedbuff_views();
    let avg_views = data.fedavg_views();
    let mut partial = PartialAggregate::new(Arc::clone(&data.manifest));
    let mut g = c.benchmark_group("fedbuff_fold_20x1M_f32");
    g.throughput(Throughput::Bytes((K * 4 * N) as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let fedbuff = data.fedbuff;
    g.bench_function("fedbuff_fold_batch", |b| {
        b.iter_custom(|iters| {
            let mut fold =
                |p: &mut PartialAggregate| fedbuff.fold_batch(p, black_box(&fb_views)).expect("fold");
            (0..iters).map(|_| timed_fold(&mut partial, &mut fold)).sum()
        })
    });
    g.bench_function("fedbuff_fold_one_by_one", |b| {
        b.iter_custom(|iters| {
            let mut fold = |p: &mut PartialAggregate| {
                for v in &fb_views {
                    fedbuff.fold(p, black_box(v)).expect("fold");
                }
            };
            (0..iters).map(|_| timed_fold(&mut partial, &mut fold)).sum()
        })
    });
    let fedavg = FedAvg::deltas(1.0);
    g.bench_function("fedavg_fold_batch", |b| {
        b.iter_custom(|iters| {
            let mut fold =
                |p: &mut PartialAggregate| fedavg.fold_batch(p, black_box(&avg_views)).expect("fold");
            (0..iters).map(|_| timed_fold(&mut partial, &mut fold)).sum()
        })
    });
    partial.reset();
    fedbuff.fold_batch(&mut partial, &fb_views).expect("fold");
    let mut finisher = fedbuff;
    g.bench_function("fedbuff_finish", |b| {
        b.iter(|| black_box(finisher.finish(black_box(&partial), &data.global).expect("finish")))
    });
    g.finish();
}

/// The summary lines, from timings taken in this process.
fn ratio_summary(data: &Data) {
    let fb_views = data.fedbuff_views();
    let avg_views = data.fedavg_views();
    let mut partial = PartialAggregate::new(Arc::clone(&data.manifest));
    let fedbuff = data.fedbuff;
    let fedavg = FedAvg::deltas(1.0);
    let mut fb_fold = |p: &mut PartialAggregate| fedbuff.fold_batch(p, &fb_views).expect("fold");
    let mut avg_fold = |p: &mut PartialAggregate| fedavg.fold_batch(p, &avg_views).expect("fold");
    let mut avg_fold_one = |p: &mut PartialAggregate| fedavg.fold_batch(p, &avg_views[..1]).expect("fold");
    timed_fold(&mut partial, &mut fb_fold);
    timed_fold(&mut partial, &mut avg_fold);
    let fb = best_of(5, || timed_fold(&mut partial, &mut fb_fold));
    let avg = best_of(5, || timed_fold(&mut partial, &mut avg_fold));
    let avg_one = best_of(5, || timed_fold(&mut partial, &mut avg_fold_one));
    let mut opt = data.optimiser(ServerOptimizerSpec::fedadam());
    let adam = best_of(5, || {
        let t = Instant::now();
        black_box(opt.step(&data.global, &data.aggregated).expect("step"));
        t.elapsed()
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "fedbuff/fedavg fold ratio: {:.2} (fedbuff {:.2} ms, fedavg {:.2} ms for {K} x 1M f32)",
        fb.as_secs_f64() / avg.as_secs_f64(),
        ms(fb),
        ms(avg)
    );
    println!(
        "fedadam step / fedavg fold: {:.3} of the {K}-update fold, {:.2} of a 1-update fold \
         (step {:.2} ms, 1-update fold {:.2} ms)",
        adam.as_secs_f64() / avg.as_secs_f64(),
        adam.as_secs_f64() / avg_one.as_secs_f64(),
        ms(adam),
        ms(avg_one)
    );
}

fn main() {
    common::run(
        &Data::new(),
        |c, data| {
            step_group(c, data);
            fold_group(c, data);
        },
        ratio_summary,
    );
}
