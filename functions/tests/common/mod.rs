//! Helpers shared by the integration tests (`mod common;` in each test file): client ids,
//! tolerance checks and small manifests. Not every test uses every helper.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use shoal_functions::{ClientId, DType, ModelManifest, TensorSpec};

/// The tolerance of the hand-checked vectors of `algorithms.md` (§D.6).
pub const TOL: f64 = 1e-6;

/// A client id (panics on an invalid one: test input).
pub fn cid(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

/// `|got − want| ≤ TOL`.
pub fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= TOL, "{what}: got {got}, want {want}");
}

/// [`close`] element by element, with equal lengths.
pub fn close_all(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL, "{what}[{k}]: got {g}, want {w} (all: {got:?})");
    }
}

/// One f64 tensor `name` of `d` elements (exact arithmetic for the hand-checked vectors).
pub fn vector_manifest(name: &str, d: usize) -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new(name, DType::F64, vec![d])]).unwrap())
}
