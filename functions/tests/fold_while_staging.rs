//! Fold-while-staging (`StreamPlan::staged_prefix` + `PartialAggregate::fold_prefix`): a slot
//! folded piece by piece while its payload arrives in chunks gives the same accumulator bits as
//! staging the payload whole and folding it with `PartialAggregate::fold` (the oracle), for any
//! chunking and tensors in any order in the file; a NaN in a piece is refused before anything of
//! that piece is folded.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use proptest::prelude::*;
use shoal_functions::tensor::{stage_update, StreamPlan, ValidationError};
use shoal_functions::{ClientId, DType, Error, ModelManifest, PartialAggregate, TensorSpec, UpdateView};

/// Tensors `a` (3×5), `b` (7) and `c` (2×2×3), f32; in the slot `c` first (`file_order`
/// false: the slot's prefix grows only once `c`, last in the file, arrives) or in the file's
/// order (the prefix grows with every chunk).
fn manifest(file_order: bool) -> ModelManifest {
    let (a, b, c) = (
        TensorSpec::new("a", DType::F32, vec![3, 5]),
        TensorSpec::new("b", DType::F32, vec![7]),
        TensorSpec::new("c", DType::F32, vec![2, 2, 3]),
    );
    ModelManifest::new(if file_order { vec![a, b, c] } else { vec![c, a, b] }).unwrap()
}

fn payload(m: &ModelManifest, seed: u32, nan_at: Option<(usize, usize)>) -> Vec<u8> {
    let data: Vec<Vec<u8>> = m
        .tensors()
        .iter()
        .enumerate()
        .map(|(t, spec)| {
            let n: usize = spec.shape.iter().product();
            (0..n)
                .flat_map(|i| {
                    let v = if nan_at == Some((t, i)) {
                        f32::NAN
                    } else {
                        ((seed as f32) * 0.37 + (t * 100 + i) as f32 * 1.013).sin() * 3.0
                    };
                    v.to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<_> = m
        .tensors()
        .iter()
        .zip(&data)
        .map(|(t, d)| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    // safetensors writes `a`, `b`, `c` (by name): not the manifest's slot order `c`, `a`, `b`.
    safetensors::serialize(views, &None).unwrap()
}

/// Stages `p` chunk by chunk into a slot, folding what is staged after every chunk.
fn fold_while_staging(
    m: &Arc<ModelManifest>,
    acc: &mut PartialAggregate,
    p: &[u8],
    cuts: &[usize],
    weight: f64,
) -> Result<(), Error> {
    let mut slot = vec![0xAAu8; m.slot_bytes()];
    let mut plan = StreamPlan::new(m, p.len() as u64)?;
    for r in plan.padding() {
        slot[r].fill(0);
    }
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (p.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(p.len());
    let (mut at, mut folded) = (0, 0);
    for c in cuts {
        plan.push(&p[at..c], |o, src| slot[o..o + src.len()].copy_from_slice(src))?;
        at = c;
        let ready = plan.staged_prefix() / 4 * 4;
        acc.fold_prefix(&slot[..ready], folded, weight)?;
        folded = ready;
    }
    plan.finish()?;
    assert_eq!(folded, m.slot_bytes(), "the whole slot was folded");
    acc.count_folded(weight, &ClientId::new("c").unwrap())
}

proptest! {
    #[test]
    fn folding_pieces_as_they_are_staged_equals_folding_the_staged_slot(
        seeds in proptest::collection::vec(0u32..1000, 1..4),
        cuts in proptest::collection::vec(0usize..2000, 0..12),
        file_order: bool,
    ) {
        let m = Arc::new(manifest(file_order));
        let client = ClientId::new("c").unwrap();
        let mut streamed = PartialAggregate::new(Arc::clone(&m));
        let mut oracle = PartialAggregate::new(Arc::clone(&m));
        for (k, &seed) in seeds.iter().enumerate() {
            let p = payload(&m, seed, None);
            let w = 1.0 + k as f64 * 3.0;
            fold_while_staging(&m, &mut streamed, &p, &cuts, w).unwrap();
            let mut slot = vec![0u8; m.slot_bytes()];
            stage_update(&m, &p, &mut slot).unwrap();
            oracle.fold(&UpdateView { manifest: &m, bytes: &slot, weight: w, client: &client }).unwrap();
        }
        let bits = |p: &PartialAggregate| p.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&streamed), bits(&oracle));
        prop_assert_eq!(streamed.count(), oracle.count());
        prop_assert_eq!(streamed.total_weight().to_bits(), oracle.total_weight().to_bits());
    }
}

#[test]
fn a_nan_is_refused_before_its_piece_is_folded() {
    let m = Arc::new(manifest(true));
    // `b` element 4 (`b` is tensor 1): `a` arrives and is folded in the first chunk, the piece
    // holding the NaN in the second.
    let p = payload(&m, 7, Some((1, 4)));
    let a_end = p.len() - (7 + 12) * 4;
    let mut acc = PartialAggregate::new(Arc::clone(&m));
    let e = fold_while_staging(&m, &mut acc, &p, &[a_end], 2.0).unwrap_err();
    match e {
        Error::Validation(ValidationError::NonFinite { name, index }) => {
            assert_eq!((name.as_str(), index), ("b", 4));
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // `a` was folded; nothing of the piece with the NaN went in: `b` and `c` untouched, the
    // update not counted.
    assert!(acc.tensor_values(0).iter().all(|v| *v != 0.0));
    assert!(acc.tensor_values(2).iter().all(|v| *v == 0.0));
    let b = acc.tensor_values(1);
    assert!(b.iter().all(|v| *v == 0.0), "{b:?}");
    assert_eq!(acc.count(), 0);
}

#[test]
fn a_manifest_with_other_policies_or_dtypes_is_not_folded_by_pieces() {
    let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("h", DType::F16, vec![4])]).unwrap());
    assert!(!PartialAggregate::folds_by_range(&m));
    let mut acc = PartialAggregate::new(Arc::clone(&m));
    let slot = vec![0u8; m.slot_bytes()];
    assert!(matches!(acc.fold_prefix(&slot, 0, 1.0), Err(Error::ManifestMismatch(_))));
    assert!(PartialAggregate::folds_by_range(&manifest(false)));
}
