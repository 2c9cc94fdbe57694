//! The crate's only `unsafe` code (x86-64): the AVX2+FMA twin of every [`Kernel`], the run-time
//! CPU check that guards it, and explicit AVX2 intrinsics for the f32 scans and the Gram
//! sub-tile. Every function here is safe to call: each checks the CPU itself and answers
//! `None`/`false` when it lacks the features, so callers fall back to the portable twin.
//!
//! Every `unsafe` block relies on one of two facts, stated where it is used: the CPU supports
//! AVX2 and FMA (checked by [`has_avx2_fma`] just before), or a pointer read stays inside a
//! fixed-size array (asserted just before).

use std::arch::x86_64::{
    __m256d, _mm256_add_pd, _mm256_cvtps_pd, _mm256_fmadd_pd, _mm256_loadu_pd, _mm256_mul_pd,
    _mm256_setzero_pd, _mm256_storeu_pd, _mm256_sub_pd, _mm_loadu_ps,
};

use super::gram::{sub_row, SUB_CHUNKS};
use super::scan::{lanes_sum, ScanOp, LANES};
use super::Kernel;

/// Whether the CPU has AVX2 and FMA (`std`'s cached feature test).
#[inline]
pub(super) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The twin of [`Kernel::run`] compiled for AVX2 and FMA: the body is `#[inline(always)]`, so
/// it is compiled here with those features enabled.
#[target_feature(enable = "avx2,fma")]
fn run_avx2_fma<K: Kernel>(kernel: K) -> K::Output {
    kernel.run()
}

/// Runs `kernel`'s AVX2+FMA twin when the CPU has both, else its plain body.
#[inline]
pub(super) fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement of
        // the target-feature function.
        unsafe { run_avx2_fma(kernel) }
    } else {
        kernel.run()
    }
}

/// `op` over one f32 update with the explicit AVX2 kernels; `None` without AVX2 and FMA.
pub(super) fn f32_scan(op: ScanOp<'_>, x: &[f32]) -> Option<f64> {
    if !has_avx2_fma() {
        return None;
    }
    // SAFETY: AVX2 and FMA are available (checked just above), the only requirement of the
    // target-feature functions.
    Some(unsafe {
        match op {
            ScanOp::SumSq => sum_sq(x),
            ScanOp::Dot(u) => dot(x, u),
            ScanOp::DistSq(o) => dist_sq(x, o),
        }
    })
}

/// `op` over four f32 updates of one length, read concurrently; `None` without AVX2 and FMA.
pub(super) fn f32_scan4(op: ScanOp<'_>, xs: [&[f32]; 4]) -> Option<[f64; 4]> {
    if !has_avx2_fma() {
        return None;
    }
    // SAFETY: AVX2 and FMA are available (checked just above).
    Some(unsafe {
        match op {
            ScanOp::SumSq => sum_sq4(xs),
            ScanOp::Dot(u) => dot4(xs, u),
            ScanOp::DistSq(o) => dist_sq4(xs, o),
        }
    })
}

/// Accumulates one Gram sub-tile with AVX2 FMAs ([`gram_sub_avx2`]); `false` (nothing done)
/// without AVX2 and FMA.
pub(super) fn gram_sub(sub: &[[f64; 4]], rows: usize, acc: &mut [[f64; 4]]) -> bool {
    if !has_avx2_fma() {
        return false;
    }
    // SAFETY: AVX2 and FMA are available (checked just above).
    unsafe { gram_sub_avx2(sub, rows, acc) };
    true
}

// ---------------------------------------------------------------------------------------------
// Explicit f32 scans. LLVM vectorises the portable bodies of `scan` with 128-bit registers
// only. Lane `4j + m` of the portable body is element `m` of register `j`, and every lane sees
// the same operations in the same order (no FMA contraction), so the results are bit-identical
// to the portable bodies, whether updates are read one or four at a time.
// ---------------------------------------------------------------------------------------------

/// Registers per update.
const REGS: usize = LANES / 4;

/// Four f32 of `c` from `4j`, widened to f64.
#[inline(always)]
fn load_ps(c: &[f32; LANES], j: usize) -> __m256d {
    assert!(4 * j + 4 <= LANES);
    // SAFETY: `c` holds LANES floats and 4j + 4 <= LANES (asserted), so the four reads are in
    // bounds; `loadu` has no alignment requirement. AVX is enabled in every caller.
    unsafe { _mm256_cvtps_pd(_mm_loadu_ps(c.as_ptr().add(4 * j))) }
}

/// Four f64 of `c` from `4j`.
#[inline(always)]
fn load_pd(c: &[f64; LANES], j: usize) -> __m256d {
    assert!(4 * j + 4 <= LANES);
    // SAFETY: as `load_ps`, for f64.
    unsafe { _mm256_loadu_pd(c.as_ptr().add(4 * j)) }
}

#[inline(always)]
fn finish(acc: [__m256d; REGS], tail: f64) -> f64 {
    let mut l = [0.0f64; LANES];
    for (j, a) in acc.iter().enumerate() {
        assert!(4 * j + 4 <= LANES);
        // SAFETY: `l` holds LANES f64 and 4j + 4 <= LANES (asserted).
        unsafe { _mm256_storeu_pd(l.as_mut_ptr().add(4 * j), *a) };
    }
    lanes_sum(l, tail)
}

#[inline(always)]
fn sq_tail(rest: &[f32]) -> f64 {
    rest.iter().map(|&v| f64::from(v) * f64::from(v)).fold(0.0, |a, b| a + b)
}

#[inline(always)]
fn dot_tail(x: &[f32], u: &[f64]) -> f64 {
    x.iter().zip(u).map(|(&a, b)| f64::from(a) * b).fold(0.0, |a, b| a + b)
}

#[inline(always)]
fn dist_tail(x: &[f32], o: &[f64]) -> f64 {
    x.iter().zip(o).map(|(&a, b)| (f64::from(a) - b) * (f64::from(a) - b)).fold(0.0, |a, b| a + b)
}

#[target_feature(enable = "avx2,fma")]
fn sum_sq(x: &[f32]) -> f64 {
    let (chunks, rest) = x.as_chunks::<LANES>();
    let mut acc = [_mm256_setzero_pd(); REGS];
    for c in chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            let v = load_ps(c, j);
            *a = _mm256_add_pd(*a, _mm256_mul_pd(v, v));
        }
    }
    finish(acc, sq_tail(rest))
}

/// [`sum_sq`] of four updates of one length, read concurrently.
#[target_feature(enable = "avx2,fma")]
fn sum_sq4(xs: [&[f32]; 4]) -> [f64; 4] {
    let n = xs.iter().map(|x| x.len()).min().unwrap_or(0);
    let split = xs.map(|x| x[..n].as_chunks::<LANES>());
    let mut acc = [[_mm256_setzero_pd(); REGS]; 4];
    for i in 0..split[0].0.len() {
        for (k, a) in acc.iter_mut().enumerate() {
            let c = &split[k].0[i];
            for (j, r) in a.iter_mut().enumerate() {
                let v = load_ps(c, j);
                *r = _mm256_add_pd(*r, _mm256_mul_pd(v, v));
            }
        }
    }
    std::array::from_fn(|k| finish(acc[k], sq_tail(split[k].1)))
}

#[target_feature(enable = "avx2,fma")]
fn dot(x: &[f32], u: &[f64]) -> f64 {
    let n = x.len().min(u.len());
    let (xc, xt) = x[..n].as_chunks::<LANES>();
    let (uc, ut) = u[..n].as_chunks::<LANES>();
    let mut acc = [_mm256_setzero_pd(); REGS];
    for (a, b) in xc.iter().zip(uc) {
        for (j, s) in acc.iter_mut().enumerate() {
            *s = _mm256_add_pd(*s, _mm256_mul_pd(load_ps(a, j), load_pd(b, j)));
        }
    }
    finish(acc, dot_tail(xt, ut))
}

#[target_feature(enable = "avx2,fma")]
fn dist_sq(x: &[f32], o: &[f64]) -> f64 {
    let n = x.len().min(o.len());
    let (xc, xt) = x[..n].as_chunks::<LANES>();
    let (oc, ot) = o[..n].as_chunks::<LANES>();
    let mut acc = [_mm256_setzero_pd(); REGS];
    for (a, b) in xc.iter().zip(oc) {
        for (j, s) in acc.iter_mut().enumerate() {
            let d = _mm256_sub_pd(load_ps(a, j), load_pd(b, j));
            *s = _mm256_add_pd(*s, _mm256_mul_pd(d, d));
        }
    }
    finish(acc, dist_tail(xt, ot))
}

/// [`dot`] of four updates with one `u`, read concurrently.
#[target_feature(enable = "avx2,fma")]
fn dot4(xs: [&[f32]; 4], u: &[f64]) -> [f64; 4] {
    let n = xs.iter().map(|x| x.len()).min().unwrap_or(0).min(u.len());
    let split = xs.map(|x| x[..n].as_chunks::<LANES>());
    let (uc, ut) = u[..n].as_chunks::<LANES>();
    let mut acc = [[_mm256_setzero_pd(); REGS]; 4];
    for (i, b) in uc.iter().enumerate() {
        for (k, a) in acc.iter_mut().enumerate() {
            let c = &split[k].0[i];
            for (j, r) in a.iter_mut().enumerate() {
                *r = _mm256_add_pd(*r, _mm256_mul_pd(load_ps(c, j), load_pd(b, j)));
            }
        }
    }
    std::array::from_fn(|k| finish(acc[k], dot_tail(split[k].1, ut)))
}

/// [`dist_sq`] of four updates against one `o`, read concurrently.
#[target_feature(enable = "avx2,fma")]
fn dist_sq4(xs: [&[f32]; 4], o: &[f64]) -> [f64; 4] {
    let n = xs.iter().map(|x| x.len()).min().unwrap_or(0).min(o.len());
    let split = xs.map(|x| x[..n].as_chunks::<LANES>());
    let (oc, ot) = o[..n].as_chunks::<LANES>();
    let mut acc = [[_mm256_setzero_pd(); REGS]; 4];
    for (i, b) in oc.iter().enumerate() {
        for (k, a) in acc.iter_mut().enumerate() {
            let c = &split[k].0[i];
            for (j, r) in a.iter_mut().enumerate() {
                let d = _mm256_sub_pd(load_ps(c, j), load_pd(b, j));
                *r = _mm256_add_pd(*r, _mm256_mul_pd(d, d));
            }
        }
    }
    std::array::from_fn(|k| finish(acc[k], dist_tail(split[k].1, ot)))
}

/// Accumulates the sub-tile's dot products into `acc` with 2 × 4 blocks of AVX2 FMAs: the same
/// sums in the same order as the portable `gram::sub_portable`. Products of f32-decoded values
/// are exact in f64, where FMA and multiply-then-add agree, so the two give identical
/// distances for f32 models.
#[target_feature(enable = "avx2,fma")]
fn gram_sub_avx2(sub: &[[f64; 4]], rows: usize, acc: &mut [[f64; 4]]) {
    for bj in (0..rows).step_by(4) {
        let b = [sub_row(sub, bj), sub_row(sub, bj + 1), sub_row(sub, bj + 2), sub_row(sub, bj + 3)];
        for bi in (0..bj + 4).step_by(2) {
            let a = [sub_row(sub, bi), sub_row(sub, bi + 1)];
            let mut t: [[__m256d; 4]; 2] = std::array::from_fn(|p| {
                std::array::from_fn(|q| bytemuck::cast(acc[(bi + p) * rows + bj + q]))
            });
            for c in 0..SUB_CHUNKS {
                let a0: __m256d = bytemuck::cast(a[0][c]);
                let a1: __m256d = bytemuck::cast(a[1][c]);
                for q in 0..4 {
                    let bq: __m256d = bytemuck::cast(b[q][c]);
                    t[0][q] = _mm256_fmadd_pd(a0, bq, t[0][q]);
                    t[1][q] = _mm256_fmadd_pd(a1, bq, t[1][q]);
                }
            }
            for (p, tp) in t.iter().enumerate() {
                for (q, v) in tp.iter().enumerate() {
                    acc[(bi + p) * rows + bj + q] = bytemuck::cast(*v);
                }
            }
        }
    }
}
