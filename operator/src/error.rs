//! The error type of `shoal-operator`'s pure core (policy validation, traces, reports).

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
        }
    }
}
