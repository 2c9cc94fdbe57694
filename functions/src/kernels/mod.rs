//! The numeric kernels: every loop whose speed matters, and the crate's only `unsafe`.
//!
//! - This module: the fold kernels, `acc[i] += w * x[i]` with `x` decoded from the update's
//!   dtype and `acc` in f64, and the memory-read baselines of the benchmarks.
//! - `scan` (crate-internal): blocked scans over a cohort's tensors (squared norms, dot
//!   products, distances, the fused fold-and-dot of RFFL), shared by RFFL and Bristle.
//! - `gram` (crate-internal): the cache-blocked Gram sub-tile of Krum's distances.
//! - `x86` (private, x86-64 only): the `#[target_feature]` twins, the run-time CPU check and the
//!   explicit AVX2 intrinsics. It is the one module of the crate allowed `unsafe` code; every
//!   block states its `// SAFETY:` argument.
//!
//! **One body, compiled twice.** A kernel's body is written once, as the `#[inline(always)]`
//! `Kernel::run` of a small struct (crate-internal). `dispatch` runs it either inside a function compiled
//! with `#[target_feature(enable = "avx2,fma")]` (when the CPU has both, checked at run time)
//! or plainly, so both paths compute the same expressions in the same order: results are
//! bit-identical by construction (Rust never contracts `a * b + c` into an FMA on its own).
//! Every optimised kernel also has a plain reference twin ([`reference`](mod@reference), the
//! portable bodies of `scan` and `gram`) that the tests compare it with bit for bit.
//!
//! The optimised f32 fold is that body compiled for AVX2+FMA, and [`fold_f32_tiled`] folds
//! several updates tile by tile so the accumulator tile stays in L1/L2 while the updates stream
//! from memory once. Accumulating in f64 keeps FedAvg exact to the last f32 bit for realistic
//! cohorts, which the end-to-end tests check against an f64 oracle at 1e-6 relative.

use half::{bf16, f16};

use crate::tensor::TensorData;

pub(crate) mod gram;
pub(crate) mod scan;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // the crate's only unsafe: target-feature calls and AVX2 intrinsics
mod x86;

/// A kernel body written once ([`dispatch`] compiles it twice). Implementations mark
/// [`Kernel::run`] `#[inline(always)]`, so that the body is compiled into the AVX2+FMA twin
/// rather than called from it.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The body.
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for AVX2 and FMA when the CPU has both (checked at run time, a cached
/// feature test), else compiled for the baseline target. Both compile the same body, so they
/// return the same bits.
#[inline]
pub(crate) fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        x86::dispatch(kernel)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        kernel.run()
    }
}

/// Elements per tile in [`fold_f32_tiled`]: 8 Ki f64 = 64 KiB of accumulator, inside L2 next to
/// eight 32 KiB update tiles.
pub const TILE: usize = 8 * 1024;

/// Plain, obviously-correct kernels. The optimised ones must agree with these exactly.
pub mod reference {
    use super::*;

    /// `acc[i] += w * x[i]` for f32 input.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn scaled_add_f32(acc: &mut [f64], x: &[f32], w: f64) {
        assert_eq!(acc.len(), x.len());
        for i in 0..acc.len() {
            acc[i] += w * f64::from(x[i]);
        }
    }

    /// `acc[i] += w * x[i]` for any dtype, decoded element by element.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn scaled_add(acc: &mut [f64], x: TensorData<'_>, w: f64) {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += w * x.get_f64(i);
        }
    }

    /// `acc[i] = max(acc[i], x[i])`.
    pub fn max_assign(acc: &mut [f64], x: TensorData<'_>) {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = a.max(x.get_f64(i));
        }
    }
}

#[inline(always)]
fn scaled_add_f32_body(acc: &mut [f64], x: &[f32], w: f64) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * f64::from(v);
    }
}

/// `acc += w · x` ([`scaled_add_f32`]'s body).
struct ScaledAddF32<'a> {
    acc: &'a mut [f64],
    x: &'a [f32],
    w: f64,
}

impl Kernel for ScaledAddF32<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        scaled_add_f32_body(self.acc, self.x, self.w);
    }
}

/// `acc[i] += w * x[i]` for f32 input, vectorised (AVX2 when available).
///
/// # Panics
/// If the lengths differ.
pub fn scaled_add_f32(acc: &mut [f64], x: &[f32], w: f64) {
    assert_eq!(acc.len(), x.len(), "accumulator and update lengths differ");
    dispatch(ScaledAddF32 { acc, x, w });
}

/// One pass over `acc` adding `B` updates in order: the accumulator is loaded and stored once
/// per `B` updates instead of once per update, with the same per-element operation order as
/// `B` successive [`scaled_add_f32`] calls (so results are bit-identical).
struct ScaledAddF32Block<'a, const B: usize> {
    acc: &'a mut [f64],
    xs: [&'a [f32]; B],
    ws: [f64; B],
}

impl<const B: usize> Kernel for ScaledAddF32Block<'_, B> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        scaled_add_f32_block_body(self.acc, self.xs, self.ws);
    }
}

/// [`ScaledAddF32Block`]'s body, a function of its own so that `acc` is a `&mut` parameter: the
/// compiler then knows it aliases no update (as it cannot for a struct field) and emits no
/// run-time overlap checks.
#[inline(always)]
fn scaled_add_f32_block_body<const B: usize>(acc: &mut [f64], xs: [&[f32]; B], ws: [f64; B]) {
    let n = acc.len();
    let xs = xs.map(|x| &x[..n]);
    for i in 0..n {
        let mut a = acc[i];
        for k in 0..B {
            a += ws[k] * f64::from(xs[k][i]);
        }
        acc[i] = a;
    }
}

/// Folds several f32 updates into `acc`, tile by tile: for each tile of [`TILE`] elements the
/// updates are added eight (then four, then one) at a time per pass, so the accumulator tile is
/// read and written from L1/L2 once per eight updates while each update is read from memory
/// exactly once. Bit-identical to successive [`reference::scaled_add_f32`] calls.
///
/// # Panics
/// If an update's length differs from the accumulator's.
pub fn fold_f32_tiled(acc: &mut [f64], updates: &[(&[f32], f64)]) {
    for (x, _) in updates {
        assert_eq!(x.len(), acc.len(), "accumulator and update lengths differ");
    }
    let mut start = 0;
    while start < acc.len() {
        let end = (start + TILE).min(acc.len());
        let tile = &mut acc[start..end];
        let mut eights = updates.chunks_exact(8);
        for c in &mut eights {
            let xs: [&[f32]; 8] = std::array::from_fn(|k| &c[k].0[start..end]);
            dispatch(ScaledAddF32Block { acc: &mut *tile, xs, ws: std::array::from_fn(|k| c[k].1) });
        }
        let mut fours = eights.remainder().chunks_exact(4);
        for c in &mut fours {
            let xs: [&[f32]; 4] = std::array::from_fn(|k| &c[k].0[start..end]);
            dispatch(ScaledAddF32Block { acc: &mut *tile, xs, ws: std::array::from_fn(|k| c[k].1) });
        }
        for (x, w) in fours.remainder() {
            scaled_add_f32(tile, &x[start..end], *w);
        }
        start = end;
    }
}

fn scaled_add_f16(acc: &mut [f64], x: &[f16], w: f64) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += w * v.to_f64();
    }
}

fn scaled_add_bf16(acc: &mut [f64], x: &[bf16], w: f64) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += w * v.to_f64();
    }
}

fn scaled_add_f64(acc: &mut [f64], x: &[f64], w: f64) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

fn scaled_add_int<T: Copy>(acc: &mut [f64], x: &[T], w: f64, f: impl Fn(T) -> f64) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * f(v);
    }
}

/// `acc[i] += w * x[i]` for any dtype (f16/bf16 decoded exactly to f64; integers converted,
/// exact up to 2^53).
///
/// # Panics
/// If the lengths differ.
pub fn scaled_add(acc: &mut [f64], x: TensorData<'_>, w: f64) {
    match x {
        TensorData::F32(x) => scaled_add_f32(acc, x, w),
        TensorData::F16(x) => {
            assert_eq!(acc.len(), x.len());
            scaled_add_f16(acc, x, w)
        }
        TensorData::BF16(x) => {
            assert_eq!(acc.len(), x.len());
            scaled_add_bf16(acc, x, w)
        }
        TensorData::F64(x) => {
            assert_eq!(acc.len(), x.len());
            scaled_add_f64(acc, x, w)
        }
        other => {
            assert_eq!(acc.len(), len(other));
            match other {
                TensorData::I64(x) => scaled_add_int(acc, x, w, |v| v as f64),
                TensorData::I32(x) => scaled_add_int(acc, x, w, f64::from),
                TensorData::I16(x) => scaled_add_int(acc, x, w, f64::from),
                TensorData::I8(x) => scaled_add_int(acc, x, w, f64::from),
                TensorData::U64(x) => scaled_add_int(acc, x, w, |v| v as f64),
                TensorData::U32(x) => scaled_add_int(acc, x, w, f64::from),
                TensorData::U16(x) => scaled_add_int(acc, x, w, f64::from),
                TensorData::U8(x) => scaled_add_int(acc, x, w, f64::from),
                _ => unreachable!("float dtypes handled above"),
            }
        }
    }
}

/// `acc[i] = max(acc[i], x[i])`.
///
/// # Panics
/// If the lengths differ.
pub fn max_assign(acc: &mut [f64], x: TensorData<'_>) {
    assert_eq!(acc.len(), len(x));
    reference::max_assign(acc, x);
}

/// `acc[i] = x[i]` decoded to f64.
pub fn assign(acc: &mut [f64], x: TensorData<'_>) {
    for (i, a) in acc.iter_mut().enumerate() {
        *a = x.get_f64(i);
    }
}

/// Number of elements of a view.
pub fn len(x: TensorData<'_>) -> usize {
    match x {
        TensorData::F32(x) => x.len(),
        TensorData::F16(x) => x.len(),
        TensorData::BF16(x) => x.len(),
        TensorData::F64(x) => x.len(),
        TensorData::I64(x) => x.len(),
        TensorData::I32(x) => x.len(),
        TensorData::I16(x) => x.len(),
        TensorData::I8(x) => x.len(),
        TensorData::U64(x) => x.len(),
        TensorData::U32(x) => x.len(),
        TensorData::U16(x) => x.len(),
        TensorData::U8(x) => x.len(),
    }
}

/// The wrapping sum of `x`'s words, eight independent lanes ([`read_baseline`]'s body).
struct ReadWords<'a>(&'a [u64]);

impl Kernel for ReadWords<'_> {
    type Output = u64;
    #[inline(always)]
    fn run(self) -> u64 {
        // Eight independent lanes so the loop vectorises; wrapping adds cost nothing next to loads.
        let mut lanes = [0u64; 8];
        let mut chunks = self.0.chunks_exact(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l = l.wrapping_add(*v);
            }
        }
        let tail = chunks.remainder().iter().fold(0u64, |a, v| a.wrapping_add(*v));
        lanes.iter().fold(tail, |a, v| a.wrapping_add(*v))
    }
}

/// The memory-read baseline for benchmarks: reads every byte of `x` once (as u64 words summed
/// with wrapping adds) and returns a checksum so the read cannot be optimised away. No fold can
/// be faster than this on the same buffer.
pub fn read_baseline(x: &[u64]) -> u64 {
    dispatch(ReadWords(x))
}

/// `B` streams read side by side, four lanes each, as the blocked fold reads its updates.
struct ReadWordsBlock<'a, const B: usize>([&'a [u64]; B]);

impl<const B: usize> Kernel for ReadWordsBlock<'_, B> {
    type Output = u64;
    #[inline(always)]
    fn run(self) -> u64 {
        let xs = self.0;
        let n = xs[0].len();
        let mut lanes = [0u64; 4];
        let mut i = 0;
        while i + 4 <= n {
            for x in &xs {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    *lane = lane.wrapping_add(x[i + l]);
                }
            }
            i += 4;
        }
        let mut tail = 0u64;
        for x in &xs {
            tail = x[i..].iter().fold(tail, |a, v| a.wrapping_add(*v));
        }
        lanes.iter().fold(tail, |a, v| a.wrapping_add(*v))
    }
}

/// The memory-read baseline with the blocked fold's access pattern: the buffers are read tile
/// by tile, eight streams side by side (then one at a time for the rest), each byte once. A
/// fold that reads its updates the same way cannot beat it; comparing the fold with this and
/// with [`read_baseline`] shows what the read pattern alone is worth.
///
/// # Panics
/// If the buffers' lengths differ.
pub fn read_baseline_tiled(bufs: &[&[u64]]) -> u64 {
    let Some(first) = bufs.first() else { return 0 };
    let n = first.len();
    assert!(bufs.iter().all(|b| b.len() == n), "buffer lengths differ");
    let tile = TILE / 2; // f32 tiles of TILE elements are TILE/2 words
    let mut sum = 0u64;
    let mut start = 0;
    while start < n {
        let end = (start + tile).min(n);
        let mut eights = bufs.chunks_exact(8);
        for c in &mut eights {
            let xs: [&[u64]; 8] = std::array::from_fn(|k| &c[k][start..end]);
            sum = sum.wrapping_add(dispatch(ReadWordsBlock(xs)));
        }
        for b in eights.remainder() {
            sum = sum.wrapping_add(read_baseline(&b[start..end]));
        }
        start = end;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimised_f32_kernel_matches_reference_bitwise() {
        let x: Vec<f32> = (0..10_007).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.37).collect();
        let mut a = vec![0.25f64; x.len()];
        let mut b = a.clone();
        scaled_add_f32(&mut a, &x, 3.7);
        reference::scaled_add_f32(&mut b, &x, 3.7);
        assert_eq!(a, b);

        let y: Vec<f32> = x.iter().map(|v| v * 2.0 + 1.0).collect();
        let mut t = vec![0.0f64; x.len()];
        fold_f32_tiled(&mut t, &[(&x, 2.0), (&y, 0.5)]);
        let mut r = vec![0.0f64; x.len()];
        reference::scaled_add_f32(&mut r, &x, 2.0);
        reference::scaled_add_f32(&mut r, &y, 0.5);
        assert_eq!(t, r);
    }

    #[test]
    fn half_and_int_kernels_decode_exactly() {
        let h = [f16::from_f32(0.5), f16::from_f32(-2.0)];
        let mut acc = vec![1.0, 1.0];
        scaled_add(&mut acc, TensorData::F16(&h), 2.0);
        assert_eq!(acc, vec![2.0, -3.0]);
        let b = [bf16::from_f32(3.0)];
        let mut acc = vec![0.0];
        scaled_add(&mut acc, TensorData::BF16(&b), 0.5);
        assert_eq!(acc, vec![1.5]);
        let i = [10i64, -4];
        let mut acc = vec![0.0, 0.0];
        scaled_add(&mut acc, TensorData::I64(&i), 3.0);
        assert_eq!(acc, vec![30.0, -12.0]);
        let mut m = vec![5.0, 5.0];
        max_assign(&mut m, TensorData::I64(&i));
        assert_eq!(m, vec![10.0, 5.0]);
    }

    #[test]
    fn read_baseline_sums_words() {
        let x: Vec<u64> = (1..=1001).collect();
        assert_eq!(read_baseline(&x), 1001 * 1002 / 2);
        // Nine streams of 5,003 words (tiles, eights, a remainder stream, a ragged tail).
        let bufs: Vec<Vec<u64>> = (0..9u64).map(|k| (0..5003u64).map(|i| i * 7 + k).collect()).collect();
        let views: Vec<&[u64]> = bufs.iter().map(Vec::as_slice).collect();
        let expected = bufs.iter().flatten().fold(0u64, |a, v| a.wrapping_add(*v));
        assert_eq!(read_baseline_tiled(&views), expected);
    }
}
