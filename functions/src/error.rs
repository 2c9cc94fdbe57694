//! The error type of `shoal-functions`.

use crate::state::StateError;
use crate::tensor::ValidationError;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the aggregation maths. Every variant is a caller or input problem; kernels never
/// panic on data that passed [`crate::tensor::stage_update`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The weights of the folded updates sum to zero or less (or nothing was folded), so no
    /// weighted mean exists. The previous global model must stand (Flower #7645 returns NaN here).
    #[error("total weight {total} is not positive ({count} updates folded)")]
    ZeroTotalWeight {
        /// Sum of the weights folded.
        total: f64,
        /// Number of updates folded.
        count: u64,
    },
    /// A weight was NaN, infinite or not positive.
    #[error("invalid update weight {0}: must be finite and > 0")]
    InvalidWeight(f64),
    /// Two values built from different manifests were combined.
    #[error("manifest mismatch: {0}")]
    ManifestMismatch(&'static str),
    /// A streaming operation (`fold`, `merge`) was asked of a whole-cohort strategy.
    #[error("strategy {0} needs the whole cohort and cannot fold updates one at a time")]
    NotStreaming(&'static str),
    /// The server step produced NaN or ±Inf in the new model (e.g. a delta step overflowing a
    /// 16-bit float); no model is committed.
    #[error("the new model's tensor {0:?} is not finite (overflow in the server step)")]
    NonFiniteResult(String),
    /// A strategy's configuration or state cannot serve this input (e.g. FedFix without a
    /// profile of the client, RFFL with a non-positive reputation sum). The message says which.
    #[error("{strategy}: {detail}")]
    Strategy {
        /// Strategy name.
        strategy: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// An update failed validation against the manifest.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The manifest itself is unusable (duplicate names, empty, unsupported dtype...).
    #[error("invalid model manifest: {0}")]
    InvalidManifest(String),
    /// A byte buffer was not aligned for its dtype (staging always aligns; this is a bug guard).
    #[error("buffer for tensor {0} is not aligned for its dtype")]
    Misaligned(String),
    /// safetensors could not encode the result.
    #[error("safetensors encoding failed: {0}")]
    Encode(#[source] safetensors::SafeTensorError),
    /// A saved strategy state cannot be restored ([`crate::Strategy::restore_state`]): the
    /// [`StateError`] says why. The strategy's state is unchanged, never reset.
    #[error(transparent)]
    InvalidState(StateError),
}

/// The `Copy` classification of [`Error`], for callers that branch on the kind and for bounded
/// metric labels. It is the wire's [`shoal_proto::AggregationErrorKind`] (a round's
/// `aggregation_failed` outcome names it), so the maths crate's error never travels itself.
pub use shoal_proto::AggregationErrorKind as ErrorKind;

impl Error {
    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ZeroTotalWeight { .. } => ErrorKind::ZeroTotalWeight,
            Error::InvalidWeight(_) => ErrorKind::InvalidWeight,
            Error::ManifestMismatch(_) => ErrorKind::ManifestMismatch,
            Error::NotStreaming(_) => ErrorKind::NotStreaming,
            Error::NonFiniteResult(_) => ErrorKind::NonFiniteResult,
            Error::Strategy { .. } => ErrorKind::Strategy,
            Error::Validation(_) => ErrorKind::Validation,
            Error::InvalidManifest(_) => ErrorKind::InvalidManifest,
            Error::Misaligned(_) => ErrorKind::Misaligned,
            Error::Encode(_) => ErrorKind::Encode,
            Error::InvalidState(_) => ErrorKind::InvalidState,
        }
    }
}

impl From<shoal_proto::ManifestError> for Error {
    fn from(e: shoal_proto::ManifestError) -> Self {
        Error::InvalidManifest(e.0)
    }
}
