//! In-memory federated-learning simulation used by `shoal demo`.
//!
//! The module bundles everything the demo needs to simulate a federation of
//! clients training a multinomial logistic-regression ("softmax regression")
//! classifier, with no networking involved:
//!
//! * [`dataset`]: the embedded digits dataset ([`Dataset::digits`]) and
//!   row subsetting.
//! * [`split`]: a seeded, class-stratified train/test split
//!   ([`train_test_split`]) and the classic per-class Dirichlet(alpha)
//!   non-IID partition of a training set over clients ([`dirichlet_split`]).
//! * [`model`]: the softmax-regression parameters ([`SoftmaxParams`]),
//!   mini-batch SGD ([`train`]) and evaluation ([`accuracy`], [`loss`]).
//!
//! Everything is deterministic given the seeds (ChaCha8 generators), so a demo
//! run is reproducible across machines.
//!
//! # Dataset
//!
//! The data is the UCI ML *Optical Recognition of Handwritten Digits* test
//! set: 1797 grey-scale 8x8 images (pixel counts 0..=16) of the digits 0..9,
//! by E. Alpaydin and C. Kaynak (1998), UCI Machine Learning Repository
//! (file `optdigits.tes`), licensed CC BY 4.0. The copy embedded
//! here (`data/digits.csv.gz`, one image per line: 64 pixels then the label)
//! is the one shipped with scikit-learn as
//! `sklearn/datasets/data/digits.csv.gz`.
#![warn(missing_docs)]

pub mod dataset;
pub mod model;
pub mod split;

pub use self::dataset::Dataset;
pub use self::model::{accuracy, class_f1, loss, train, LocalTraining, SoftmaxParams};
pub use self::split::{dirichlet_split, powerlaw_split, train_test_split};

/// Errors raised by the simulation module.
///
/// Only the parsing of the embedded data (and the explicit shape checks
/// [`Dataset::check`] / [`SoftmaxParams::check`]) can fail; everything else in
/// the module is infallible by construction.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The embedded gzip stream could not be decompressed or is not UTF-8.
    #[error("cannot decompress the digits data: {0}")]
    Decompress(#[source] std::io::Error),
    /// The data contains no rows at all.
    #[error("the digits data contains no rows")]
    Empty,
    /// A line does not have 64 pixel fields followed by one label field.
    #[error("line {line}: expected {expected} comma-separated fields, found {found}")]
    FieldCount {
        /// 1-based line number in the decompressed file.
        line: usize,
        /// Number of fields a line must have (65).
        expected: usize,
        /// Number of fields actually found.
        found: usize,
    },
    /// A field is not a non-negative integer.
    #[error("line {line}, field {field}: {value:?} is not an integer")]
    NotAnInteger {
        /// 1-based line number in the decompressed file.
        line: usize,
        /// 1-based field (column) number.
        field: usize,
        /// The offending text (truncated to 32 characters).
        value: String,
    },
    /// A pixel value is outside `0..=16`.
    #[error("line {line}, field {field}: pixel value {value} is outside 0..=16")]
    PixelOutOfRange {
        /// 1-based line number in the decompressed file.
        line: usize,
        /// 1-based field (column) number.
        field: usize,
        /// The parsed value.
        value: u64,
    },
    /// A label is outside `0..=9`.
    #[error("line {line}: label {value} is outside 0..=9")]
    LabelOutOfRange {
        /// 1-based line number in the decompressed file.
        line: usize,
        /// The parsed value.
        value: u64,
    },
    /// A dataset or parameter set does not have the shapes the module expects.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Result type of the simulation module, defaulting to [`SimError`].
pub type Result<T, E = SimError> = std::result::Result<T, E>;
