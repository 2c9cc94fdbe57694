//! The inner kernel of Krum's cache-blocked Gram matrix (`crate::robust`): all dot products of
//! one sub-tile of [`GRAM_SUB`] elements of every update, accumulated into four f64 lanes per
//! pair. [`sub_tile`] runs the AVX2 FMA version when the CPU has it and [`sub_portable`], its
//! reference twin, otherwise; the two agree bit for bit on f32-decoded data (tested).

/// Elements per sub-tile of the Gram computation: `rows × GRAM_SUB` f64 (20 updates: 20 KiB)
/// stay in L1 while all the sub-tile's dot products run.
pub(crate) const GRAM_SUB: usize = 128;
/// Chunks of four f64 per row of a sub-tile.
pub(crate) const SUB_CHUNKS: usize = GRAM_SUB / 4;

/// Row `r` of a sub-tile (rows of [`SUB_CHUNKS`] chunks, row-major).
#[inline(always)]
pub(crate) fn sub_row(sub: &[[f64; 4]], r: usize) -> &[[f64; 4]; SUB_CHUNKS] {
    match sub[r * SUB_CHUNKS..(r + 1) * SUB_CHUNKS].try_into() {
        Ok(row) => row,
        Err(_) => unreachable!("a sub-tile row is SUB_CHUNKS chunks long"),
    }
}

/// `acc[i·rows + j] += ⟨row i, row j⟩` lane by lane for every pair with `i / 4 <= j / 4`
/// (`rows` a multiple of 4), with the AVX2 kernel when available.
pub(crate) fn sub_tile(sub: &[[f64; 4]], rows: usize, acc: &mut [[f64; 4]]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::gram_sub(sub, rows, acc) {
        return;
    }
    sub_portable(sub, rows, acc);
}

/// The reference twin: the same sums as the AVX2 kernel, in the same order (four lanes per
/// product).
pub(crate) fn sub_portable(sub: &[[f64; 4]], rows: usize, acc: &mut [[f64; 4]]) {
    for bj in (0..rows).step_by(4) {
        for i in 0..bj + 4 {
            let a = sub_row(sub, i);
            for j in bj..bj + 4 {
                let b = sub_row(sub, j);
                let t = &mut acc[i * rows + j];
                for (x, y) in a.iter().zip(b) {
                    for l in 0..4 {
                        t[l] += x[l] * y[l];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable Gram kernel and the AVX2 one give identical sums on f32-decoded data.
    #[test]
    fn gram_kernels_agree() {
        let rows = 12;
        let sub: Vec<[f64; 4]> = (0..rows * SUB_CHUNKS)
            .map(|c| std::array::from_fn(|l| f64::from(((c * 4 + l) * 7919 % 2003) as f32 * 0.37 - 300.0)))
            .collect();
        let mut a = vec![[0.0; 4]; rows * rows];
        sub_portable(&sub, rows, &mut a);
        let mut b = vec![[0.0; 4]; rows * rows];
        sub_tile(&sub, rows, &mut b);
        for i in 0..rows {
            for j in 0..rows {
                if i / 4 <= j / 4 {
                    assert_eq!(a[i * rows + j], b[i * rows + j], "({i}, {j})");
                }
            }
        }
    }
}
