//! `StreamStager` (the upload path's chunk-by-chunk staging) against `stage_update` (the whole
//! payload at once) as the oracle: on generated payloads — tensors in any order in the file,
//! several dtypes, `__metadata__`, any chunking — the two accept the same payloads with the same
//! slot bytes, and refuse the same corrupted ones (a changed byte, mostly in the header, or a
//! truncation) with the same reason.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;

use proptest::prelude::*;
use shoal_functions::tensor::{stage_update, StreamStager, ValidationError};
use shoal_functions::{DType, ModelManifest, Parameters, TensorSpec};
use shoal_proto::RejectReason;

/// A manifest of `shapes.len()` tensors `t0, t1, ...` with the given dtypes and shapes.
fn manifest(tensors: &[(DType, Vec<usize>)]) -> ModelManifest {
    ModelManifest::new(
        tensors
            .iter()
            .enumerate()
            .map(|(i, (d, s))| TensorSpec::new(format!("t{i}"), *d, s.clone()))
            .collect(),
    )
    .unwrap()
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I64 => safetensors::Dtype::I64,
        DType::I32 => safetensors::Dtype::I32,
        _ => safetensors::Dtype::U8,
    }
}

/// A safetensors file of the manifest's tensors filled from `fill` (finite values), with or
/// without `__metadata__`. safetensors writes the data sorted by dtype, then name, so
/// the file order often differs from the manifest's (slot) order.
fn payload(m: &ModelManifest, fill: u8, metadata: bool) -> Vec<u8> {
    let data: Vec<Vec<u8>> = m
        .tensors()
        .iter()
        .map(|t| {
            let numel: usize = t.shape.iter().product();
            let size = t.dtype.size();
            // Small positive values of every dtype: a byte pattern in the low bytes only keeps
            // floats finite (exponent bits stay 0: subnormal or zero).
            (0..numel * size)
                .map(|k| if k % size == 0 { fill.wrapping_add(k as u8) & 0x3F } else { 0 })
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = m
        .tensors()
        .iter()
        .zip(&data)
        .map(|(t, d)| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta = metadata.then(|| HashMap::from([("format".to_owned(), "pt".to_owned())]));
    safetensors::serialize(views, &meta).unwrap()
}

fn streamed(m: &ModelManifest, p: &[u8], cuts: &[usize]) -> Result<Vec<u8>, ValidationError> {
    let mut slot = vec![0xAAu8; m.slot_bytes()];
    let mut s = StreamStager::new(m, &mut slot, p.len() as u64)?;
    let mut at = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (p.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(p.len());
    for c in cuts {
        s.push(&p[at..c])?;
        at = c;
    }
    s.finish()?;
    Ok(slot)
}

fn whole(m: &ModelManifest, p: &[u8]) -> Result<Vec<u8>, ValidationError> {
    let mut slot = vec![0x55u8; m.slot_bytes()];
    stage_update(m, p, &mut slot)?;
    Ok(slot)
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::F16), Just(DType::BF16), Just(DType::I64)]
}

fn tensors() -> impl Strategy<Value = Vec<(DType, Vec<usize>)>> {
    prop::collection::vec((dtype(), prop::collection::vec(1usize..5, 0..3)), 1..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_chunking_stages_the_same_bytes(
        ts in tensors(), fill in any::<u8>(), metadata in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let m = manifest(&ts);
        let p = payload(&m, fill, metadata);
        let want = whole(&m, &p).unwrap();
        let got = streamed(&m, &p, &cuts).unwrap();
        prop_assert_eq!(got, want);
        if !metadata {
            // The pieces a model is stored from are safetensors' own file, byte for byte.
            let params = Parameters::from_safetensors(std::sync::Arc::new(m.clone()), &p).unwrap();
            prop_assert_eq!(params.to_safetensors().unwrap(), p);
        }
    }

    #[test]
    fn corrupted_payloads_get_the_same_verdict(
        ts in tensors(), fill in any::<u8>(), at in any::<usize>(), byte in any::<u8>(),
        cut in any::<usize>(), truncate in any::<bool>(),
    ) {
        let m = manifest(&ts);
        let mut p = payload(&m, fill, false);
        if truncate {
            p.truncate(at % p.len());
        } else {
            // Mostly in the header, where a byte changes the verdict.
            let hdr = 8 + u64::from_le_bytes(p[..8].try_into().unwrap()) as usize;
            let i = if at % 4 == 0 { at % p.len() } else { at % hdr };
            p[i] = byte;
        }
        let want = whole(&m, &p);
        let got = streamed(&m, &p, &[cut]);
        match (&got, &want) {
            (Ok(g), Ok(w)) => prop_assert_eq!(g, w),
            (Err(g), Err(w)) => prop_assert_eq!(RejectReason::from(g), RejectReason::from(w), "{} vs {}", g, w),
            _ => prop_assert!(false, "streamed {:?}, whole {:?}", got.as_ref().err(), want.as_ref().err()),
        }
    }
}

#[test]
fn a_payload_longer_than_declared_is_refused_at_the_extra_byte() {
    let m = manifest(&[(DType::F32, vec![3])]);
    let p = payload(&m, 1, false);
    let mut slot = vec![0u8; m.slot_bytes()];
    let mut s = StreamStager::new(&m, &mut slot, p.len() as u64 - 1).unwrap();
    let e = s.push(&p).unwrap_err();
    assert!(matches!(e, ValidationError::Malformed(ref d) if d.contains("more than")), "{e}");
}

#[test]
fn a_wrong_schema_is_refused_before_any_data_arrives() {
    let m = manifest(&[(DType::F32, vec![3])]);
    let other = manifest(&[(DType::F64, vec![3])]);
    let p = payload(&other, 1, false);
    let hdr = 8 + u64::from_le_bytes(p[..8].try_into().unwrap()) as usize;
    let mut slot = vec![0u8; m.slot_bytes()];
    let mut s = StreamStager::new(&m, &mut slot, p.len() as u64).unwrap();
    let e = s.push(&p[..hdr]).unwrap_err();
    assert!(matches!(e, ValidationError::DTypeMismatch { .. }), "{e}");
}
