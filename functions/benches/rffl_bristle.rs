//! RFFL and Bristle on a cohort larger than L3, against a FedAvg fold of the same cohort.
//!
//! Cohort: 20 updates of 1,048,576 f32 (4 MiB each, 80 MiB in all), 64-byte aligned, one-tensor
//! F32 manifest. Honest-looking data: each update is a common direction plus noise, so RFFL's
//! reputations and Bristle's distances are not degenerate.
//!
//! Group `rffl_bristle_20x1M_f32` (throughput = the 80 MiB of update bytes):
//! - `fedavg_fold_batch`: one `PartialAggregate::fold_batch` of the 20 views (the baseline; the
//!   `reset` before each iteration is not timed);
//! - `rffl_step`: one `Rffl::step` (round 0 of a fresh server, Γ = 1 so every upload is clipped):
//!   norm pass, fold + dot pass, reputations, and the 8 MiB f64 aggregate it returns;
//! - `bristle_filter`: one `Bristle::select` (distances to the global model, α-tertile draw);
//! - `bristle_aggregate`: `Bristle::aggregate_cohort` without an evaluator (filter + weighted mean
//!   of the selection + the new model).
//!
//! With `--bench`, one line per strategy is printed after the groups, from best-of-5 `Instant`
//! timings in this process: `<name>/fold ratio: X.XX (<name> A ms, fold B ms)`.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shoal_functions::bristle::{Bristle, BristleConfig};
use shoal_functions::rffl::{Rffl, RfflConfig};
use shoal_functions::PartialAggregate;
use shoal_functions::Strategy as _;

mod common;
use common::{best_of, next_uniform, timed_fold_batch, Cohort};

/// Elements per update.
const N: usize = 1 << 20;
/// Updates per cohort.
const COHORT: usize = 20;
/// Update bytes read per pass over the cohort.
const BYTES: u64 = (COHORT * 4 * N) as u64;

fn rffl_config() -> RfflConfig {
    RfflConfig { gamma: 1.0, ..RfflConfig::default() }
}

fn timed(f: &mut impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn groups(c: &mut Criterion, cohort: &Cohort) {
    let views = cohort.views();
    let mut partial = PartialAggregate::new(Arc::clone(&cohort.manifest));
    let mut g = c.benchmark_group("rffl_bristle_20x1M_f32");
    g.throughput(Throughput::Bytes(BYTES))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    g.bench_function("fedavg_fold_batch", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| timed_fold_batch(&mut partial, &views)).sum())
    });
    g.bench_function("rffl_step", |b| {
        b.iter(|| {
            let mut r = Rffl::new(rffl_config()).unwrap();
            black_box(r.step(black_box(&views)).unwrap())
        })
    });
    let filter = Bristle::new(BristleConfig::default()).unwrap();
    g.bench_function("bristle_filter", |b| {
        b.iter(|| black_box(filter.select(black_box(&views), &cohort.global).unwrap()))
    });
    let mut bristle = Bristle::new(BristleConfig::default()).unwrap();
    g.bench_function("bristle_aggregate", |b| {
        b.iter(|| black_box(bristle.aggregate_cohort(black_box(&views), &cohort.global).unwrap()))
    });
    g.finish();
}

/// The ratio lines, from timings taken in this process.
fn ratio_summary(cohort: &Cohort) {
    let views = cohort.views();
    let mut partial = PartialAggregate::new(Arc::clone(&cohort.manifest));
    let filter = Bristle::new(BristleConfig::default()).unwrap();
    let mut bristle = Bristle::new(BristleConfig::default()).unwrap();
    let mut rffl = || {
        let mut r = Rffl::new(rffl_config()).unwrap();
        black_box(r.step(&views).unwrap());
    };
    let mut select = || {
        black_box(filter.select(&views, &cohort.global).unwrap());
    };
    let mut aggregate = || {
        black_box(bristle.aggregate_cohort(&views, &cohort.global).unwrap());
    };
    // Warm up (page faults, frequency) before the best-of-5.
    timed_fold_batch(&mut partial, &views);
    timed(&mut rffl);
    timed(&mut select);
    timed(&mut aggregate);
    let fold = best_of(5, || timed_fold_batch(&mut partial, &views));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (name, d) in [
        ("rffl_step", best_of(5, || timed(&mut rffl))),
        ("bristle_filter", best_of(5, || timed(&mut select))),
        ("bristle_aggregate", best_of(5, || timed(&mut aggregate))),
    ] {
        println!(
            "{name}/fold ratio: {:.2} ({name} {:.2} ms, fold {:.2} ms)",
            d.as_secs_f64() / fold.as_secs_f64(),
            ms(d),
            ms(fold)
        );
    }
}

fn main() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let direction: Vec<f32> = (0..N).map(|_| next_uniform(&mut state) * 1e-3).collect();
    let cohort = Cohort::new(COHORT, N, |_, xs| {
        xs.iter_mut().zip(&direction).for_each(|(x, d)| *x = d + next_uniform(&mut state) * 5e-4)
    });
    common::run(&cohort, groups, ratio_summary);
}
