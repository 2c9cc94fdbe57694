//! Helpers shared by the benches.

/// A buffer of `len` u64 words starting on a 64-byte boundary (a `Vec<u64>` is only 8-byte
/// aligned, and glibc's large allocations start 16 bytes into a page), like a shared-memory slot.
pub struct AlignedWords {
    raw: Vec<u64>,
    start: usize,
    len: usize,
}

#[allow(dead_code)] // not every bench uses every accessor
impl AlignedWords {
    /// `len` zero words.
    pub fn zeroed(len: usize) -> AlignedWords {
        let raw = vec![0u64; len + 8];
        let start = (64 - raw.as_ptr() as usize % 64) % 64 / 8;
        AlignedWords { raw, start, len }
    }

    /// The aligned words.
    pub fn words(&self) -> &[u64] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The aligned words, mutable.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

use std::sync::Arc;

use shoal_functions::{ClientId, DType, ModelManifest, Parameters, TensorSpec, UpdateView};

/// A benchmark cohort: `count` updates of one F32 tensor of `n` elements in aligned buffers
/// (like shared-memory slots), client ids `client-00..`, weights 100, 200, ..., and an all-zero
/// global model.
#[allow(dead_code)] // not every bench uses every field
pub struct Cohort {
    pub manifest: Arc<ModelManifest>,
    pub updates: Vec<AlignedWords>,
    pub ids: Vec<ClientId>,
    pub weights: Vec<f64>,
    pub global: Parameters,
}

#[allow(dead_code)]
impl Cohort {
    /// Fills update `k` with `fill(k, values)`.
    pub fn new(count: usize, n: usize, mut fill: impl FnMut(usize, &mut [f32])) -> Cohort {
        let manifest = Arc::new(
            ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![n])]).expect("valid manifest"),
        );
        assert_eq!(manifest.slot_bytes(), 4 * n);
        let updates = (0..count)
            .map(|k| {
                let mut buf = AlignedWords::zeroed(manifest.slot_bytes() / 8);
                fill(k, bytemuck::cast_slice_mut::<u64, f32>(buf.words_mut()));
                buf
            })
            .collect();
        let ids = (0..count).map(|k| ClientId::new(format!("client-{k:02}")).expect("valid id")).collect();
        let weights = (1..=count).map(|k| (100 * k) as f64).collect();
        let global = Parameters::zeros(Arc::clone(&manifest));
        Cohort { manifest, updates, ids, weights, global }
    }

    /// Zero-copy views of the updates.
    pub fn views(&self) -> Vec<UpdateView<'_>> {
        self.updates
            .iter()
            .zip(&self.ids)
            .zip(&self.weights)
            .map(|((u, client), &weight)| UpdateView {
                manifest: &self.manifest,
                bytes: bytemuck::cast_slice(u.words()),
                weight,
                client,
            })
            .collect()
    }
}

/// xorshift64*: a value in [-1, 1).
#[allow(dead_code)]
pub fn next_uniform(state: &mut u64) -> f32 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
    r as f32 / (1u64 << 23) as f32 - 1.0
}

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use shoal_functions::PartialAggregate;

/// Times `fold` only, after an untimed `reset` of the partial (an 8 MiB fill for 1 Mi elements).
#[allow(dead_code)]
pub fn timed_fold(p: &mut PartialAggregate, fold: &mut impl FnMut(&mut PartialAggregate)) -> Duration {
    p.reset();
    let t = Instant::now();
    fold(p);
    let d = t.elapsed();
    black_box(&*p);
    d
}

/// [`timed_fold`] of one `PartialAggregate::fold_batch` of `views`.
#[allow(dead_code)]
pub fn timed_fold_batch(p: &mut PartialAggregate, views: &[UpdateView<'_>]) -> Duration {
    timed_fold(p, &mut |p| p.fold_batch(black_box(views)).expect("fold_batch"))
}

/// The shortest of `runs` timings.
#[allow(dead_code)]
pub fn best_of(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

/// A bench's `main`: the criterion groups on `data`, then, only when benchmarking (not under
/// `cargo test --benches`), the summary lines timed in this process, then criterion's summary.
#[allow(dead_code)]
pub fn run<D>(data: &D, groups: impl FnOnce(&mut Criterion, &D), summary: impl FnOnce(&D)) {
    let mut criterion = Criterion::default().configure_from_args();
    groups(&mut criterion, data);
    if std::env::args().any(|a| a == "--bench") {
        summary(data);
    }
    criterion.final_summary();
}

/// A cohort of `count` updates of `n` f32 drawn uniformly from [-1, 1) (seeded, so every run
/// and every bench folds the same bytes).
#[allow(dead_code)]
pub fn uniform_cohort(count: usize, n: usize) -> Cohort {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    Cohort::new(count, n, |_, xs| xs.iter_mut().for_each(|x| *x = next_uniform(&mut state)))
}
