//! The error type of `shoal-operator`: the pure core's (policy validation, traces, reports) and
//! the reconcile loop's (API server, NATS, finalizer).

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the operator core. Policy and trace errors name the offending field or line so a
/// reconcile can put them in a condition message and a user can fix their file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy field is out of its documented range or inconsistent with another field.
    #[error("invalid policy field {field}: {reason}")]
    InvalidPolicy {
        /// The field's path in the CRD spelling, e.g. `autoscaling.stableWindow` or
        /// `autoscaling.behavior.scaleUp.policies[1].periodSeconds`.
        field: String,
        /// What is wrong, with the accepted range.
        reason: String,
    },
    /// A duration string is not of the form `60s`, `1m30s`, `500ms`, `1h`.
    #[error("invalid duration {value:?}: {reason}")]
    InvalidDuration {
        /// The rejected text (truncated to 80 characters).
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A node name is not a Kubernetes node name (RFC 1123 subdomain).
    #[error(
        "invalid node name {0:?}: use 1-253 characters from [a-z0-9.-], starting and ending alphanumeric"
    )]
    InvalidNodeName(String),
    /// A line of an arrival trace could not be parsed.
    #[error("trace line {line}: {reason}")]
    Trace {
        /// 1-based line number (the header is line 1).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A policy or trace file could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A simulator or generator parameter is unusable (e.g. zero nodes).
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The parameter (as spelled on the command line).
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Drawing a plot failed (font missing, encoder error).
    #[error("plot {plot}: {source}")]
    Plot {
        /// The plot's file name.
        plot: String,
        /// The drawing backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A Kubernetes API call failed.
    #[error("kubernetes {op}: {source}")]
    Kube {
        /// What was attempted (`apply Deployment`, `patch status`, ...).
        op: &'static str,
        /// The client's error (an API status such as 404 or 409, or a transport error).
        #[source]
        source: Box<kube::Error>,
    },
    /// A NATS job-store operation failed.
    #[error("NATS {op}: {source}")]
    Nats {
        /// What was attempted (`create job`, `load job state`, ...).
        op: &'static str,
        /// The SDK's error.
        #[source]
        source: Box<shoal_client::Error>,
    },
    /// The object lacks a field the API server always sets (`name`, `namespace`).
    #[error("FederatedJob has no {0}")]
    MissingObjectKey(&'static str),
    /// The finalizer helper failed: adding or removing the finalizer, or the wrapped apply or
    /// cleanup (whose error it carries).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Cancelling the job lost every compare-and-set race on its state.
    #[error("cancel job {job}: its state changed {attempts} times while cancelling")]
    CancelConflict {
        /// The job.
        job: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// A small `Copy` classification of [`Error`], for callers that branch on the kind (a reconcile
/// choosing a condition reason) and for bounded metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// See [`Error::InvalidPolicy`].
    InvalidPolicy,
    /// See [`Error::InvalidDuration`].
    InvalidDuration,
    /// See [`Error::InvalidNodeName`].
    InvalidNodeName,
    /// See [`Error::Trace`].
    Trace,
    /// See [`Error::Parse`].
    Parse,
    /// See [`Error::InvalidParameter`].
    InvalidParameter,
    /// See [`Error::Io`].
    Io,
    /// See [`Error::Plot`].
    Plot,
    /// See [`Error::Kube`].
    Kube,
    /// See [`Error::Nats`].
    Nats,
    /// See [`Error::MissingObjectKey`].
    MissingObjectKey,
    /// See [`Error::Finalizer`] (adding or removing the finalizer itself).
    Finalizer,
    /// See [`Error::CancelConflict`].
    CancelConflict,
}

impl Error {
    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidPolicy { .. } => ErrorKind::InvalidPolicy,
            Error::InvalidDuration { .. } => ErrorKind::InvalidDuration,
            Error::InvalidNodeName(_) => ErrorKind::InvalidNodeName,
            Error::Trace { .. } => ErrorKind::Trace,
            Error::Parse { .. } => ErrorKind::Parse,
            Error::InvalidParameter { .. } => ErrorKind::InvalidParameter,
            Error::Io { .. } => ErrorKind::Io,
            Error::Plot { .. } => ErrorKind::Plot,
            Error::Kube { .. } => ErrorKind::Kube,
            Error::Nats { .. } => ErrorKind::Nats,
            Error::MissingObjectKey(_) => ErrorKind::MissingObjectKey,
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.kind(),
                _ => ErrorKind::Finalizer,
            },
            Error::CancelConflict { .. } => ErrorKind::CancelConflict,
        }
    }

    /// The policy field an [`Error::InvalidPolicy`] names, for a condition message.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidPolicy { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn policy(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidPolicy { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn kube(op: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Error::Kube { op, source: Box::new(source) }
    }

    pub(crate) fn nats(op: &'static str) -> impl FnOnce(shoal_client::Error) -> Self {
        move |source| Error::Nats { op, source: Box::new(source) }
    }

    /// The HTTP status of an [`Error::Kube`] the API server answered (404, 409, ...).
    pub fn api_status(&self) -> Option<u16> {
        match self {
            Error::Kube { source, .. } => match &**source {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

impl ErrorKind {
    /// A bounded label for metrics and condition reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidPolicy => "invalid_policy",
            ErrorKind::InvalidDuration => "invalid_duration",
            ErrorKind::InvalidNodeName => "invalid_node_name",
            ErrorKind::Trace => "trace",
            ErrorKind::Parse => "parse",
            ErrorKind::InvalidParameter => "invalid_parameter",
            ErrorKind::Io => "io",
            ErrorKind::Plot => "plot",
            ErrorKind::Kube => "kube",
            ErrorKind::Nats => "nats",
            ErrorKind::MissingObjectKey => "missing_object_key",
            ErrorKind::Finalizer => "finalizer",
            ErrorKind::CancelConflict => "cancel_conflict",
        }
    }
}
