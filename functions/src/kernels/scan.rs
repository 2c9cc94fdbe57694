//! Zero-copy, blocked scans over the cohort's tensors, shared by RFFL and Bristle: a typed
//! dispatch over [`TensorData`] ([`visit`]) and f64-accumulating kernels with eight independent
//! lanes per update (AVX2 when the CPU has it; f32 updates are read four at a time, which gives
//! the memory system several streams). Results do not depend on the CPU path: both run the
//! same operations in the same order (the portable bodies here are the reference twins of the
//! explicit f32 intrinsics in `x86`).

use half::{bf16, f16};

use super::{dispatch, Kernel};
use crate::tensor::TensorData;

/// Elements per tile of the tiled passes: 4 Ki elements, so 20 f32 update tiles (320 KiB)
/// and the f64 aggregate tile (32 KiB) stay in L2 between the fold and the dot products.
pub(crate) const TILE: usize = 4096;

/// One reduction of an update's elements `x`, in f64, over the common length with the operand.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ScanOp<'u> {
    /// `Σ x²`.
    SumSq,
    /// `Σ x·u`.
    Dot(&'u [f64]),
    /// `Σ (x − o)²`.
    DistSq(&'u [f64]),
}

/// An element type that decodes to f64.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The value in f64 (exact except for 64-bit integers beyond 2^53).
    fn to_f64(self) -> f64;
    /// The typed slice of a view of this dtype.
    fn slice(t: TensorData<'_>) -> Option<&[Self]>;
    /// `acc += Σ_k w_k x_k`, updates in order.
    fn fold(acc: &mut [f64], xs: &[(&[Self], f64)]) {
        for (x, w) in xs {
            axpy(acc, x, *w);
        }
    }
    /// `op` over `x` (overridden by f32 with explicit AVX2 code).
    fn scan(op: ScanOp<'_>, x: &[Self]) -> f64 {
        dispatch(Scan { op, x })
    }
    /// `out[k] += scan(op, xs[k])` for every update `k`; same result as [`Self::scan`] each.
    fn scan_many(op: ScanOp<'_>, xs: &[&[Self]], out: &mut [f64]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o += Self::scan(op, x);
        }
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn slice(t: TensorData<'_>) -> Option<&[f32]> {
        match t {
            TensorData::F32(x) => Some(x),
            _ => None,
        }
    }
    fn fold(acc: &mut [f64], xs: &[(&[f32], f64)]) {
        super::fold_f32_tiled(acc, xs);
    }
    fn scan(op: ScanOp<'_>, x: &[f32]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = super::x86::f32_scan(op, x) {
            return v;
        }
        scan_body(op, x)
    }
    /// Four updates at a time (four read streams), the rest one by one.
    fn scan_many(op: ScanOp<'_>, xs: &[&[f32]], out: &mut [f64]) {
        let mut groups = xs.chunks_exact(4);
        let mut outs = out.chunks_exact_mut(4);
        for (g, o) in (&mut groups).zip(&mut outs) {
            let r = scan4_f32(op, [g[0], g[1], g[2], g[3]]);
            o.iter_mut().zip(r).for_each(|(o, r)| *o += r);
        }
        for (o, x) in outs.into_remainder().iter_mut().zip(groups.remainder()) {
            *o += Self::scan(op, x);
        }
    }
}

/// [`Elem::scan`] of four f32 updates of one length, read concurrently where AVX2 is present.
fn scan4_f32(op: ScanOp<'_>, xs: [&[f32]; 4]) -> [f64; 4] {
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = super::x86::f32_scan4(op, xs) {
        return r;
    }
    xs.map(|x| scan_body(op, x))
}

macro_rules! elem {
    ($t:ty, $variant:ident, $conv:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn to_f64(self) -> f64 {
                $conv(self)
            }
            fn slice(t: TensorData<'_>) -> Option<&[$t]> {
                match t {
                    TensorData::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}
elem!(f64, F64, |v: f64| v);
elem!(f16, F16, |v: f16| v.to_f64());
elem!(bf16, BF16, |v: bf16| v.to_f64());
elem!(i64, I64, |v: i64| v as f64);
elem!(i32, I32, f64::from);
elem!(i16, I16, f64::from);
elem!(i8, I8, f64::from);
elem!(u64, U64, |v: u64| v as f64);
elem!(u32, U32, f64::from);
elem!(u16, U16, f64::from);
elem!(u8, U8, f64::from);

/// A computation over the typed slices of one tensor of several updates.
pub(crate) trait Visitor {
    /// The result.
    type Out;
    /// Runs on slices of one element type (all of the tensor's length).
    fn visit<T: Elem>(self, xs: &[&[T]]) -> Self::Out;
}

fn typed<'a, T: Elem>(views: &[TensorData<'a>]) -> Vec<&'a [T]> {
    views.iter().filter_map(|v| T::slice(*v)).collect()
}

/// Runs `v` on `views`, which must all have one dtype (they come from one manifest tensor);
/// views of another dtype than the first are skipped.
pub(crate) fn visit<V: Visitor>(views: &[TensorData<'_>], v: V) -> V::Out {
    match views.first() {
        None | Some(TensorData::F32(_)) => v.visit(&typed::<f32>(views)),
        Some(TensorData::F64(_)) => v.visit(&typed::<f64>(views)),
        Some(TensorData::F16(_)) => v.visit(&typed::<f16>(views)),
        Some(TensorData::BF16(_)) => v.visit(&typed::<bf16>(views)),
        Some(TensorData::I64(_)) => v.visit(&typed::<i64>(views)),
        Some(TensorData::I32(_)) => v.visit(&typed::<i32>(views)),
        Some(TensorData::I16(_)) => v.visit(&typed::<i16>(views)),
        Some(TensorData::I8(_)) => v.visit(&typed::<i8>(views)),
        Some(TensorData::U64(_)) => v.visit(&typed::<u64>(views)),
        Some(TensorData::U32(_)) => v.visit(&typed::<u32>(views)),
        Some(TensorData::U16(_)) => v.visit(&typed::<u16>(views)),
        Some(TensorData::U8(_)) => v.visit(&typed::<u8>(views)),
    }
}

/// Decodes `x[start..start + out.len()]` of one view into `out`.
pub(crate) struct Decode<'o> {
    /// First element.
    pub start: usize,
    /// Destination.
    pub out: &'o mut [f64],
}

impl Visitor for Decode<'_> {
    type Out = ();
    fn visit<T: Elem>(self, xs: &[&[T]]) {
        if let Some(x) = xs.first() {
            for (o, v) in self.out.iter_mut().zip(&x[self.start..]) {
                *o = v.to_f64();
            }
        }
    }
}

/// `out[k] += ‖x_k‖²`.
pub(crate) struct SumSq<'o> {
    /// One accumulator per view.
    pub out: &'o mut [f64],
}

impl Visitor for SumSq<'_> {
    type Out = ();
    fn visit<T: Elem>(self, xs: &[&[T]]) {
        T::scan_many(ScanOp::SumSq, xs, self.out);
    }
}

/// Tile by tile: `u += Σ_k w_k x_k` (zero weights skipped), then `dots[k] += ⟨x_k, u⟩` and
/// `u_sq += ‖u‖²` on the finished tile.
pub(crate) struct FoldDot<'o> {
    /// The aggregate (zeroed by the caller).
    pub u: &'o mut [f64],
    /// One weight per view.
    pub weights: &'o [f64],
    /// One dot accumulator per view.
    pub dots: &'o mut [f64],
    /// `‖u‖²` accumulator.
    pub u_sq: &'o mut f64,
}

impl Visitor for FoldDot<'_> {
    type Out = ();
    fn visit<T: Elem>(self, xs: &[&[T]]) {
        let n = self.u.len();
        let mut pairs: Vec<(&[T], f64)> = Vec::with_capacity(xs.len());
        let mut tiles: Vec<&[T]> = Vec::with_capacity(xs.len());
        let mut start = 0;
        while start < n {
            let end = (start + TILE).min(n);
            let tile = &mut self.u[start..end];
            pairs.clear();
            pairs.extend(
                xs.iter().zip(self.weights).filter(|(_, w)| **w != 0.0).map(|(x, w)| (&x[start..end], *w)),
            );
            T::fold(tile, &pairs);
            tiles.clear();
            tiles.extend(xs.iter().map(|x| &x[start..end]));
            T::scan_many(ScanOp::Dot(tile), &tiles, self.dots);
            *self.u_sq += sum_sq(tile);
            start = end;
        }
    }
}

/// `u += Σ_k w_k x_k` tile by tile (zero weights skipped), as [`FoldDot`] folds.
pub(crate) struct Fold<'o> {
    /// The accumulator (zeroed by the caller).
    pub u: &'o mut [f64],
    /// One weight per view.
    pub weights: &'o [f64],
}

impl Visitor for Fold<'_> {
    type Out = ();
    fn visit<T: Elem>(self, xs: &[&[T]]) {
        let n = self.u.len();
        let mut pairs: Vec<(&[T], f64)> = Vec::with_capacity(xs.len());
        let mut start = 0;
        while start < n {
            let end = (start + TILE).min(n);
            pairs.clear();
            pairs.extend(
                xs.iter().zip(self.weights).filter(|(_, w)| **w != 0.0).map(|(x, w)| (&x[start..end], *w)),
            );
            T::fold(&mut self.u[start..end], &pairs);
            start = end;
        }
    }
}

/// `dots[k] += ⟨x_k, u⟩` tile by tile, in the order [`FoldDot`] accumulates them (so a given
/// `u` gives the same bits).
pub(crate) struct Dot<'o> {
    /// The operand.
    pub u: &'o [f64],
    /// One dot accumulator per view.
    pub dots: &'o mut [f64],
}

impl Visitor for Dot<'_> {
    type Out = ();
    fn visit<T: Elem>(self, xs: &[&[T]]) {
        let n = self.u.len();
        let mut tiles: Vec<&[T]> = Vec::with_capacity(xs.len());
        let mut start = 0;
        while start < n {
            let end = (start + TILE).min(n);
            tiles.clear();
            tiles.extend(xs.iter().map(|x| &x[start..end]));
            T::scan_many(ScanOp::Dot(&self.u[start..end]), &tiles, self.dots);
            start = end;
        }
    }
}

/// `out[k] += ‖x_k − o‖²` tile by tile, with `o[e] = reference[e] − base[e]` decoded one
/// tile at a time (`base` absent means 0).
pub(crate) struct DistSq<'o, 'v> {
    /// One accumulator per view.
    pub out: &'o mut [f64],
    /// The reference tensor.
    pub reference: TensorData<'v>,
    /// The base the updates are deltas from, if they are deltas.
    pub base: Option<TensorData<'v>>,
}

impl Visitor for DistSq<'_, '_> {
    type Out = ();
    fn visit<T: Elem>(self, xs: &[&[T]]) {
        let n = xs.first().map_or(0, |x| x.len());
        let mut tiles: Vec<&[T]> = Vec::with_capacity(xs.len());
        let mut o = vec![0.0f64; TILE.min(n)];
        let mut b = vec![0.0f64; if self.base.is_some() { TILE.min(n) } else { 0 }];
        let mut start = 0;
        while start < n {
            let end = (start + TILE).min(n);
            let o = &mut o[..end - start];
            visit(&[self.reference], Decode { start, out: o });
            if let Some(base) = self.base {
                let b = &mut b[..end - start];
                visit(&[base], Decode { start, out: b });
                o.iter_mut().zip(b.iter()).for_each(|(o, b)| *o -= b);
            }
            tiles.clear();
            tiles.extend(xs.iter().map(|x| &x[start..end]));
            T::scan_many(ScanOp::DistSq(o), &tiles, self.out);
            start = end;
        }
    }
}

/// Independent f64 accumulators per update: two AVX2 registers, enough to hide the add
/// latency at memory speed, and few enough that four updates can be read at once.
pub(crate) const LANES: usize = 8;

/// Pairwise sum of the lanes, in a fixed order, plus the scalar tail.
#[inline(always)]
pub(crate) fn lanes_sum(l: [f64; LANES], tail: f64) -> f64 {
    let mut w = l;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for k in 0..n {
            w[k] += w[k + n];
        }
    }
    w[0] + tail
}

#[inline(always)]
fn sum_sq_body<T: Elem>(x: &[T]) -> f64 {
    let mut l = [0.0f64; LANES];
    let (chunks, rest) = x.as_chunks::<LANES>();
    for c in chunks {
        for k in 0..LANES {
            let v = c[k].to_f64();
            l[k] += v * v;
        }
    }
    let tail = rest.iter().map(|v| v.to_f64() * v.to_f64()).fold(0.0, |a, b| a + b);
    lanes_sum(l, tail)
}

#[inline(always)]
fn dot_body<T: Elem>(x: &[T], u: &[f64]) -> f64 {
    let n = x.len().min(u.len());
    let (x, u) = (&x[..n], &u[..n]);
    let mut l = [0.0f64; LANES];
    let (xc, xt) = x.as_chunks::<LANES>();
    let (uc, ut) = u.as_chunks::<LANES>();
    for (a, b) in xc.iter().zip(uc) {
        for k in 0..LANES {
            l[k] += a[k].to_f64() * b[k];
        }
    }
    let tail = xt.iter().zip(ut).map(|(a, b)| a.to_f64() * b).fold(0.0, |a, b| a + b);
    lanes_sum(l, tail)
}

#[inline(always)]
fn dist_sq_body<T: Elem>(x: &[T], o: &[f64]) -> f64 {
    let n = x.len().min(o.len());
    let (x, o) = (&x[..n], &o[..n]);
    let mut l = [0.0f64; LANES];
    let (xc, xt) = x.as_chunks::<LANES>();
    let (oc, ot) = o.as_chunks::<LANES>();
    for (a, b) in xc.iter().zip(oc) {
        for k in 0..LANES {
            let d = a[k].to_f64() - b[k];
            l[k] += d * d;
        }
    }
    let tail = xt.iter().zip(ot).map(|(a, b)| (a.to_f64() - b) * (a.to_f64() - b)).fold(0.0, |a, b| a + b);
    lanes_sum(l, tail)
}

/// The portable body of every [`ScanOp`] (the reference twin of the f32 intrinsics).
#[inline(always)]
fn scan_body<T: Elem>(op: ScanOp<'_>, x: &[T]) -> f64 {
    match op {
        ScanOp::SumSq => sum_sq_body(x),
        ScanOp::Dot(u) => dot_body(x, u),
        ScanOp::DistSq(o) => dist_sq_body(x, o),
    }
}

/// [`scan_body`] as a [`Kernel`].
struct Scan<'a, 'u, T> {
    op: ScanOp<'u>,
    x: &'a [T],
}

impl<T: Elem> Kernel for Scan<'_, '_, T> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        scan_body(self.op, self.x)
    }
}

/// `acc += w·x` as a [`Kernel`].
struct Axpy<'a, T> {
    acc: &'a mut [f64],
    x: &'a [T],
    w: f64,
}

impl<T: Elem> Kernel for Axpy<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (a, v) in self.acc.iter_mut().zip(self.x) {
            *a += self.w * v.to_f64();
        }
    }
}

/// `Σ x²` in f64.
pub(crate) fn sum_sq<T: Elem>(x: &[T]) -> f64 {
    T::scan(ScanOp::SumSq, x)
}

/// `Σ x·u` in f64, over the common length.
#[cfg(test)]
pub(crate) fn dot<T: Elem>(x: &[T], u: &[f64]) -> f64 {
    T::scan(ScanOp::Dot(u), x)
}

/// `Σ (x − o)²` in f64, over the common length.
#[cfg(test)]
pub(crate) fn dist_sq<T: Elem>(x: &[T], o: &[f64]) -> f64 {
    T::scan(ScanOp::DistSq(o), x)
}

/// `acc += w·x` over the common length.
pub(crate) fn axpy<T: Elem>(acc: &mut [f64], x: &[T], w: f64) {
    dispatch(Axpy { acc, x, w });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_plain_sums() {
        let x: Vec<f32> = (0..1037).map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5).collect();
        let u: Vec<f64> = (0..1037).map(|i| ((i * 11) % 13) as f64 * 0.1 - 0.6).collect();
        let plain_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let plain_dot: f64 = x.iter().zip(&u).map(|(&a, b)| f64::from(a) * b).sum();
        let plain_dist: f64 = x.iter().zip(&u).map(|(&a, b)| (f64::from(a) - b).powi(2)).sum();
        assert!((sum_sq(&x) - plain_sq).abs() < 1e-9);
        assert!((dot(&x, &u) - plain_dot).abs() < 1e-9);
        assert!((dist_sq(&x, &u) - plain_dist).abs() < 1e-9);
        assert_eq!(sum_sq(&x), sum_sq_body(&x), "CPU paths agree bit for bit");
        assert_eq!(dot(&x, &u), dot_body(&x, &u));
        assert_eq!(dist_sq(&x, &u), dist_sq_body(&x, &u));
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(sum_sq(&x), sum_sq(&x64), "f32 and f64 paths sum in the same order");
        // Four-at-a-time reads give each update's single-read result.
        let xs: Vec<Vec<f32>> = (0..6).map(|k| x.iter().map(|v| v * (k as f32 + 1.0)).collect()).collect();
        let views: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
        let mut many = vec![0.0; 6];
        f32::scan_many(ScanOp::SumSq, &views, &mut many);
        let mut dist = vec![0.0; 6];
        f32::scan_many(ScanOp::DistSq(&u), &views, &mut dist);
        let mut dots = vec![0.0; 6];
        f32::scan_many(ScanOp::Dot(&u), &views, &mut dots);
        for k in 0..6 {
            assert_eq!(many[k], sum_sq_body(views[k]));
            assert_eq!(dots[k], dot_body(views[k], &u));
            assert_eq!(dist[k], dist_sq_body(views[k], &u));
        }
        let i: Vec<i64> = vec![3, -4];
        assert_eq!(sum_sq(&i), 25.0);
        let mut acc = vec![1.0, 1.0];
        axpy(&mut acc, &i, 2.0);
        assert_eq!(acc, vec![7.0, -7.0]);
    }
}
