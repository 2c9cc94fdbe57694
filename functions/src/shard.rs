//! Coordinate shards of a model, for running whole-cohort strategies over several nodes
//! (DESIGN.md §5, the coordinate-sharded exchange): each node owns one contiguous range of the
//! model's elements (all tensors flattened in manifest order) and receives only that range of
//! the other nodes' updates, so the bytes moved are spread evenly.
//!
//! A [`Shard`] is described by a *sub-manifest*: one 1-D tensor per piece of an original tensor
//! it covers (same dtype and aggregation policy, named `t<index>.<start>`), so any strategy runs
//! on a shard's cohort unchanged through ordinary [`crate::UpdateView`]s.
//! - Coordinate-wise strategies (median, trimmed mean): the strategy on a shard's cohort gives
//!   exactly that shard of the result.
//! - Distance-selecting strategies (Krum, Multi-Krum, Bulyan): squared distances are sums over
//!   coordinates, so the shards' distance matrices add up to the whole model's; the selection is
//!   made once, then each shard aggregates the selected updates.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::{ModelManifest, Parameters, TensorSpec};

/// A contiguous run of elements of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Tensor index in the full manifest.
    pub tensor: usize,
    /// First element.
    pub start: usize,
    /// Number of elements (≥ 1).
    pub len: usize,
}

/// One node's coordinate range: its pieces and their sub-manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pieces: Vec<Piece>,
    manifest: Arc<ModelManifest>,
}

/// Cuts `manifest`'s elements into `k` contiguous shards of as equal a number of elements as
/// possible (fewer when the model has fewer than `k` elements). Deterministic: every node
/// computes the same plan.
///
/// # Errors
/// [`Error::InvalidManifest`] for `k` = 0.
pub fn plan(manifest: &ModelManifest, k: usize) -> Result<Vec<Shard>> {
    if k == 0 {
        return Err(Error::InvalidManifest("a shard plan needs at least one shard".into()));
    }
    let total = manifest.numel();
    let k = k.min(total.max(1));
    let mut shards = Vec::with_capacity(k);
    let (mut t, mut off) = (0usize, 0usize);
    for s in 0..k {
        // Shard s covers global elements [s·total/k, (s+1)·total/k).
        let mut want = (s + 1) * total / k - s * total / k;
        let mut pieces = Vec::new();
        while want > 0 && t < manifest.tensors().len() {
            let numel = manifest.slots()[t].numel;
            let take = want.min(numel - off);
            if take > 0 {
                pieces.push(Piece { tensor: t, start: off, len: take });
            }
            want -= take;
            off += take;
            if off == numel {
                t += 1;
                off = 0;
            }
        }
        let specs: Vec<TensorSpec> = pieces
            .iter()
            .map(|p| {
                let full = &manifest.tensors()[p.tensor];
                TensorSpec {
                    name: format!("t{}.{}", p.tensor, p.start),
                    dtype: full.dtype,
                    shape: vec![p.len],
                    policy: full.policy,
                }
            })
            .collect();
        if specs.is_empty() {
            continue;
        }
        shards.push(Shard { pieces, manifest: Arc::new(ModelManifest::new(specs)?) });
    }
    Ok(shards)
}

impl Shard {
    /// The shard's pieces, in manifest order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The sub-manifest (one 1-D tensor per piece).
    pub fn manifest(&self) -> &Arc<ModelManifest> {
        &self.manifest
    }

    /// Copies this shard's bytes of one full slot (`full`'s layout) into `out`, a slot of the
    /// sub-manifest's layout (`self.manifest().slot_bytes()` long).
    ///
    /// # Errors
    /// [`Error::Misaligned`] when `slot` or `out` is too short.
    pub fn extract(&self, full: &ModelManifest, slot: &[u8], out: &mut [u8]) -> Result<()> {
        if slot.len() < full.slot_bytes() || out.len() < self.manifest.slot_bytes() {
            return Err(Error::Misaligned("a slot shorter than its layout".into()));
        }
        for (p, sub) in self.pieces.iter().zip(self.manifest.slots()) {
            let size = full.tensors()[p.tensor].dtype.size();
            let from = full.slots()[p.tensor].byte_offset + p.start * size;
            out[sub.byte_offset..sub.byte_offset + sub.byte_len]
                .copy_from_slice(&slot[from..from + sub.byte_len]);
        }
        Ok(())
    }

    /// This shard of `full` (e.g. of the global model) as parameters of the sub-manifest.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] when `full` is not of the manifest the shard was planned on.
    pub fn sub_params(&self, full: &Parameters) -> Result<Parameters> {
        let mut sub = Parameters::zeros(Arc::clone(&self.manifest));
        self.extract(full.manifest(), full.as_bytes(), sub.as_bytes_mut())
            .map_err(|_| Error::ManifestMismatch("parameters do not fit the shard plan"))?;
        Ok(sub)
    }

    /// Writes the shard's result `sub` into `full` (the inverse of [`Self::sub_params`]).
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] when `sub` is not of this shard's sub-manifest.
    pub fn insert(&self, full: &mut Parameters, sub: &Parameters) -> Result<()> {
        if **sub.manifest() != *self.manifest {
            return Err(Error::ManifestMismatch("a shard result of another shard"));
        }
        let manifest = Arc::clone(full.manifest());
        for (p, s) in self.pieces.iter().zip(self.manifest.slots()) {
            let size = manifest.tensors()[p.tensor].dtype.size();
            let to = manifest.slots()[p.tensor].byte_offset + p.start * size;
            full.as_bytes_mut()[to..to + s.byte_len]
                .copy_from_slice(&sub.as_bytes()[s.byte_offset..s.byte_offset + s.byte_len]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tensor::DType;

    fn manifest() -> ModelManifest {
        ModelManifest::new(vec![
            TensorSpec::new("a", DType::F32, vec![5, 3]),
            TensorSpec::new("b", DType::BF16, vec![4]),
            TensorSpec::new("c", DType::I64, vec![]),
        ])
        .unwrap()
    }

    #[test]
    fn plans_cover_every_element_once_in_order() {
        let m = manifest();
        for k in 1..=25 {
            let shards = plan(&m, k).unwrap();
            assert_eq!(shards.len(), k.min(20));
            let mut next = (0usize, 0usize);
            let mut sizes = Vec::new();
            for s in &shards {
                sizes.push(s.pieces().iter().map(|p| p.len).sum::<usize>());
                for p in s.pieces() {
                    assert_eq!((p.tensor, p.start), next, "k = {k}");
                    next = if p.start + p.len == m.slots()[p.tensor].numel {
                        (p.tensor + 1, 0)
                    } else {
                        (p.tensor, p.start + p.len)
                    };
                }
            }
            assert_eq!(next, (3, 0), "k = {k}: not every element covered");
            // 20 elements: shard sizes differ by at most one.
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
        assert!(plan(&m, 0).is_err());
    }

    #[test]
    fn extract_then_insert_rebuilds_the_parameters() {
        let m = Arc::new(manifest());
        let values: Vec<Vec<f64>> =
            vec![(0..15).map(f64::from).collect(), vec![0.5, -1.0, 2.0, 3.5], vec![42.0]];
        let full = Parameters::from_f64(Arc::clone(&m), &values).unwrap();
        for k in [1, 2, 3, 7] {
            let mut rebuilt = Parameters::zeros(Arc::clone(&m));
            for s in plan(&m, k).unwrap() {
                let sub = s.sub_params(&full).unwrap();
                // Each sub-tensor holds the original's run of values.
                for (i, p) in s.pieces().iter().enumerate() {
                    assert_eq!(sub.tensor_f64(i), values[p.tensor][p.start..p.start + p.len].to_vec());
                }
                s.insert(&mut rebuilt, &sub).unwrap();
            }
            assert_eq!(rebuilt.as_bytes(), full.as_bytes(), "k = {k}");
        }
    }
}
