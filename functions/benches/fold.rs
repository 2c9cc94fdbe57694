//! Fold throughput: FedAvg over a cohort larger than L3, against a pure memory-read baseline.
//!
//! Cohort: 16 updates of 1,048,576 f32 (4 MiB each, 64 MiB in all), 64-byte aligned; the
//! accumulator is a `PartialAggregate` of a one-tensor F32 manifest (8 MiB of f64).
//!
//! Group `fedavg_fold_1M_f32` (throughput = the 64 MiB of update bytes):
//! - `read_baseline`: `kernels::read_baseline` over the 16 update buffers (the roofline);
//! - `fold_tiled`: one `PartialAggregate::fold_batch` of the 16 views (tiled kernel);
//! - `fold_one_by_one`: 16 `PartialAggregate::fold` calls;
//! - `reference_kernel`: 16 `kernels::reference::scaled_add_f32` into a `Vec<f64>`.
//!
//! The fold benchmarks use `iter_custom`: `PartialAggregate::reset` (an 8 MiB fill) runs before
//! each iteration and is **not** timed; only the fold is. No allocation happens per iteration.
//!
//! After the groups, one line `fold/read ratio: X.XX (fold_tiled A GB/s, read_baseline B GB/s)`
//! is printed from best-of-5 `Instant` timings taken in this process (GB = 10^9 bytes; criterion
//! prints GiB/s), and one line `fedavg call/read ratio: X.XX (...)` for the whole FedAvg call as
//! the top makes it: `PartialAggregate::new` (zeroed pages from the allocator), the tiled fold,
//! and `finish_streamed`: the finiteness pass and the model file read out 1 MiB at a time (f64
//! → f32 as the object store reads it), against the same limit.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shoal_functions::kernels::{self, reference};
use shoal_functions::{FedAvg, PartialAggregate, Strategy};

mod common;
use common::{best_of, timed_fold, uniform_cohort, Cohort};

/// Elements per update.
const N: usize = 1 << 20;
/// Updates per cohort.
const COHORT: usize = 16;
/// Update bytes read per fold of the cohort.
const BYTES: u64 = (COHORT * 4 * N) as u64;

fn f32_updates(c: &Cohort) -> Vec<(&[f32], f64)> {
    c.updates.iter().zip(&c.weights).map(|(u, &w)| (bytemuck::cast_slice(u.words()), w)).collect()
}

fn read_all_tiled(c: &Cohort) -> u64 {
    let bufs: Vec<&[u64]> = c.updates.iter().map(|u| u.words()).collect();
    kernels::read_baseline_tiled(black_box(&bufs))
}

fn read_all(c: &Cohort) -> u64 {
    c.updates.iter().fold(0u64, |s, u| s.wrapping_add(kernels::read_baseline(black_box(u.words()))))
}

fn fold_group(c: &mut Criterion, cohort: &Cohort) {
    let views = cohort.views();
    let mut partial = PartialAggregate::new(Arc::clone(&cohort.manifest));
    let mut g = c.benchmark_group("fedavg_fold_1M_f32");
    g.throughput(Throughput::Bytes(BYTES))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    g.bench_function("read_baseline", |b| b.iter(|| black_box(read_all(cohort))));

    g.bench_function("fold_tiled", |b| {
        b.iter_custom(|iters| {
            let mut fold = |p: &mut PartialAggregate| p.fold_batch(black_box(&views)).expect("fold_batch");
            (0..iters).map(|_| timed_fold(&mut partial, &mut fold)).sum()
        })
    });

    g.bench_function("fold_one_by_one", |b| {
        b.iter_custom(|iters| {
            let mut fold = |p: &mut PartialAggregate| {
                for v in &views {
                    p.fold(black_box(v)).expect("fold");
                }
            };
            (0..iters).map(|_| timed_fold(&mut partial, &mut fold)).sum()
        })
    });

    let updates = f32_updates(cohort);
    let mut acc = vec![0.0f64; N];
    g.bench_function("reference_kernel", |b| {
        b.iter(|| {
            for (x, w) in &updates {
                reference::scaled_add_f32(&mut acc, black_box(x), *w);
            }
            black_box(&acc);
        })
    });
    g.finish();
}

fn gbps(d: Duration) -> f64 {
    BYTES as f64 / d.as_secs_f64() / 1e9
}

/// The acceptance line, from timings taken in this process.
fn ratio_summary(cohort: &Cohort) {
    let views = cohort.views();
    let mut partial = PartialAggregate::new(Arc::clone(&cohort.manifest));
    let mut fold = |p: &mut PartialAggregate| p.fold_batch(&views).expect("fold_batch");
    // Warm up both (page faults, frequency) before the best-of-5.
    black_box(read_all(cohort));
    timed_fold(&mut partial, &mut fold);
    let read = best_of(5, || {
        let t = Instant::now();
        black_box(read_all(cohort));
        t.elapsed()
    });
    let read_tiled = best_of(5, || {
        let t = Instant::now();
        black_box(read_all_tiled(cohort));
        t.elapsed()
    });
    let tiled = best_of(5, || timed_fold(&mut partial, &mut fold));
    let mut fedavg = FedAvg::parameters();
    let mut chunk = vec![0u8; 1 << 20];
    let call = best_of(5, || {
        let t = Instant::now();
        let mut p = PartialAggregate::new(Arc::clone(&cohort.manifest));
        p.fold_batch(&views).expect("fold_batch");
        // The model computed from the accumulator as the object store reads it, 1 MiB at a time.
        let mut model = fedavg.finish_streamed(&Arc::new(p)).expect("streams").expect("finish_streamed");
        model.check_finite().expect("finite");
        while model.read(&mut chunk) > 0 {
            black_box(&chunk);
        }
        t.elapsed()
    });
    // The limit is the faster of the two read patterns measured here.
    let limit = read.min(read_tiled);
    println!(
        "fold/read ratio: {:.2} (fold_tiled {:.2} GB/s, read_baseline {:.2} GB/s, read_baseline_tiled {:.2} GB/s)",
        limit.as_secs_f64() / tiled.as_secs_f64(),
        gbps(tiled),
        gbps(read),
        gbps(read_tiled)
    );
    println!(
        "fedavg call/read ratio: {:.2} (new + fold_batch + finish_streamed read out {:.2} GB/s of update bytes; the fold alone {:.2})",
        limit.as_secs_f64() / call.as_secs_f64(),
        gbps(call),
        gbps(tiled)
    );
}

fn main() {
    common::run(&uniform_cohort(COHORT, N), fold_group, ratio_summary);
}
