//! Robust strategies against FedAvg's fold, on a cohort larger than L3.
//!
//! Cohort: 20 updates of 1,048,576 f32 (4 MiB each, 80 MiB in all), 64-byte aligned, one-tensor
//! F32 manifest, weights 100..2000.
//!
//! Group `robust_20x1M_f32` (throughput = the 80 MiB of update bytes):
//! - `fedavg_fold`: one `PartialAggregate::fold_batch` of the 20 views (the reference
//!   throughput; the untimed `reset` runs before each iteration, as in `benches/fold.rs`);
//! - `median`: `CoordinateMedian::aggregate_cohort`;
//! - `trimmed_mean`: `TrimmedMean` with β = 0.2 (4 values cut at each end);
//! - `krum`: `Krum` f = 2, m = 1;
//! - `multi_krum`: `Krum` f = 2, m = 10;
//! - `bulyan`: `Bulyan` f = 2 (θ = 16 selected, β = 12 averaged per coordinate).
//!
//! The robust benchmarks time the whole `aggregate_cohort` call, including the output model's
//! allocation and the finiteness check.
//!
//! With `--bench`, three lines follow, from best-of-3 `Instant` timings in this process:
//! `median/fedavg throughput ratio: X`, `trimmed_mean/fedavg ratio: X` (targets >= 0.1) and
//! `krum time / fedavg time: X` (target <= 10).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shoal_functions::robust::{Bulyan, CoordinateMedian, Krum, TrimmedMean};

mod common;
use common::{best_of, timed_fold_batch, uniform_cohort, Cohort};
use shoal_functions::{Parameters, PartialAggregate, Strategy, UpdateView};

/// Elements per update.
const N: usize = 1 << 20;
/// Updates per cohort.
const COHORT: usize = 20;
/// Update bytes read per aggregation of the cohort.
const BYTES: u64 = (COHORT * 4 * N) as u64;

/// Times `fold_batch` only, after an untimed `reset` of the partial.
fn timed_aggregate(s: &mut dyn Strategy, views: &[UpdateView<'_>], global: &Parameters) -> Duration {
    let t = Instant::now();
    let out = s.aggregate_cohort(black_box(views), global).expect("aggregate_cohort");
    let d = t.elapsed();
    black_box(&out);
    d
}

/// The strategies benchmarked, by name.
fn strategies() -> Vec<(&'static str, Box<dyn Strategy>)> {
    vec![
        ("median", Box::new(CoordinateMedian::new(COHORT).unwrap())),
        ("trimmed_mean", Box::new(TrimmedMean::new(0.2, COHORT).unwrap())),
        ("krum", Box::new(Krum::new(2, 1, COHORT).unwrap())),
        ("multi_krum", Box::new(Krum::new(2, 10, COHORT).unwrap())),
        ("bulyan", Box::new(Bulyan::new(2, COHORT).unwrap())),
    ]
}

fn robust_group(c: &mut Criterion, cohort: &Cohort) {
    let views = cohort.views();
    let mut partial = PartialAggregate::new(Arc::clone(&cohort.manifest));
    let mut g = c.benchmark_group("robust_20x1M_f32");
    g.throughput(Throughput::Bytes(BYTES))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    g.bench_function("fedavg_fold", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| timed_fold_batch(&mut partial, &views)).sum())
    });
    for (name, mut s) in strategies() {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters).map(|_| timed_aggregate(s.as_mut(), &views, &cohort.global)).sum()
            })
        });
    }
    g.finish();
}

/// The acceptance lines, from timings taken in this process.
fn ratio_summary(cohort: &Cohort) {
    let views = cohort.views();
    let mut partial = PartialAggregate::new(Arc::clone(&cohort.manifest));
    timed_fold_batch(&mut partial, &views); // warm-up
    let fold = best_of(3, || timed_fold_batch(&mut partial, &views));
    let time = |s: &mut dyn Strategy| {
        timed_aggregate(s, &views, &cohort.global); // warm-up
        best_of(3, || timed_aggregate(s, &views, &cohort.global))
    };
    let median = time(&mut CoordinateMedian::new(COHORT).unwrap());
    let trimmed = time(&mut TrimmedMean::new(0.2, COHORT).unwrap());
    let krum = time(&mut Krum::new(2, 1, COHORT).unwrap());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let gbps = |d: Duration| BYTES as f64 / d.as_secs_f64() / 1e9;
    println!(
        "fedavg_fold: {:.2} ms ({:.2} GB/s); median: {:.2} ms ({:.2} GB/s); trimmed_mean: {:.2} ms \
         ({:.2} GB/s); krum: {:.2} ms",
        ms(fold),
        gbps(fold),
        ms(median),
        gbps(median),
        ms(trimmed),
        gbps(trimmed),
        ms(krum)
    );
    println!("median/fedavg throughput ratio: {:.3}", fold.as_secs_f64() / median.as_secs_f64());
    println!("trimmed_mean/fedavg ratio: {:.3}", fold.as_secs_f64() / trimmed.as_secs_f64());
    println!("krum time / fedavg time: {:.2}", krum.as_secs_f64() / fold.as_secs_f64());
}

fn main() {
    common::run(&uniform_cohort(COHORT, N), robust_group, ratio_summary);
}
