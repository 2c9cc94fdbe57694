//! The SDK's error type and its `Copy` kind.

use shoal_proto::RejectReason;

/// Result alias for the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the SDK. Network, NATS and server input problems are all values here: nothing in
/// the SDK panics on them. Callers branch on [`Error::kind`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to NATS.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A NATS or JetStream operation failed.
    #[error("NATS {op} failed: {source}")]
    Nats {
        /// What was attempted.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The job does not exist.
    #[error("job {0} does not exist")]
    UnknownJob(String),
    /// A job with this id exists already.
    #[error("job {0} exists already")]
    JobExists(String),
    /// The job is running: it must be cancelled (`shoal job cancel`) before it is deleted.
    #[error("job {0} is running; cancel it first")]
    JobRunning(String),
    /// A model version that is not committed yet: the job's current version is lower. Retry
    /// after the round closes (wait on `<prefix>.<job>.round`).
    #[error("model version {version} of job {job} is not committed yet (the job is at version {current})")]
    ModelNotReady {
        /// Job id.
        job: String,
        /// The version asked for.
        version: u64,
        /// The job's current model version.
        current: u64,
    },
    /// A committed model version that is no longer stored (older versions are pruned: a job
    /// keeps the last `max(3, max_staleness + 2)`), or whose object cannot be read.
    #[error("model version {version} of job {job} is unavailable: {detail}")]
    ModelUnavailable {
        /// Job id.
        job: String,
        /// The version asked for.
        version: u64,
        /// Why (pruned, missing chunk, ...).
        detail: String,
    },
    /// A job spec failed validation.
    #[error(transparent)]
    Spec(#[from] shoal_proto::SpecError),
    /// The initial model does not fit the job (wrong manifest), or could not be encoded.
    #[error("model: {0}")]
    Model(#[source] shoal_functions::Error),
    /// A stored or received message (job state, event, notice) could not be decoded.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
    /// Local I/O (a credentials, seed or certificate file).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The job failed or finished while waiting.
    #[error("job {job} is {phase}")]
    JobEnded {
        /// Job id.
        job: String,
        /// Its phase.
        phase: String,
    },
    /// Waiting exceeded its timeout.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    /// NATS refused the credentials, or an operation they do not permit (a permissions
    /// violation reported by the server).
    #[error("not authorized to {op}: {detail}")]
    Unauthorized {
        /// What was attempted.
        op: &'static str,
        /// The server's message (names the refused subject).
        detail: String,
    },
    /// TLS to NATS failed: unknown CA, bad certificate or key, or no TLS where it is required.
    #[error("TLS to NATS at {url} failed: {detail}")]
    Tls {
        /// The URL tried.
        url: String,
        /// What went wrong (the TLS library's message).
        detail: String,
    },
    /// Contradictory or incomplete options (credentials, TLS files, generator input).
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The node refused the update.
    #[error("update rejected: {0}")]
    Rejected(RejectReason),
    /// The job's upload stream is full (its `upload_quota_bytes`): wait for the round to settle
    /// (settled uploads are deleted) or ask for a larger quota.
    #[error("the upload quota of job {job} is full; retry after the round settles")]
    UploadQuotaFull {
        /// The job.
        job: String,
    },
    /// A message or update is larger than a limit: the server's `max_payload` or the job's
    /// `max_update_bytes`. Found before anything was sent (a size error, never a time-out).
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes ({limit_name})")]
    PayloadTooLarge {
        /// What was too large (`update`, `job spec`, ...).
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
        /// Which limit (`max_update_bytes`, `the server's max_payload`).
        limit_name: &'static str,
    },
}

/// The `Copy` classification of [`Error`], for callers that branch on it and for bounded
/// metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// See [`Error::Connect`].
    Connect,
    /// See [`Error::Nats`].
    Nats,
    /// See [`Error::UnknownJob`].
    UnknownJob,
    /// See [`Error::JobExists`].
    JobExists,
    /// See [`Error::JobRunning`].
    JobRunning,
    /// See [`Error::ModelNotReady`].
    ModelNotReady,
    /// See [`Error::ModelUnavailable`].
    ModelUnavailable,
    /// See [`Error::Spec`].
    Spec,
    /// See [`Error::Model`].
    Model,
    /// See [`Error::Decode`].
    Decode,
    /// See [`Error::Io`].
    Io,
    /// See [`Error::JobEnded`].
    JobEnded,
    /// See [`Error::Timeout`].
    Timeout,
    /// See [`Error::Unauthorized`].
    Unauthorized,
    /// See [`Error::Tls`].
    Tls,
    /// See [`Error::InvalidOptions`].
    InvalidOptions,
    /// See [`Error::Rejected`].
    Rejected,
    /// See [`Error::PayloadTooLarge`].
    PayloadTooLarge,
    /// See [`Error::UploadQuotaFull`].
    UploadQuotaFull,
}

impl Error {
    /// Wraps a NATS error.
    pub fn nats(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Nats { op, source: Box::new(e) }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. } => ErrorKind::Connect,
            Error::Nats { .. } => ErrorKind::Nats,
            Error::UnknownJob(_) => ErrorKind::UnknownJob,
            Error::JobExists(_) => ErrorKind::JobExists,
            Error::JobRunning(_) => ErrorKind::JobRunning,
            Error::ModelNotReady { .. } => ErrorKind::ModelNotReady,
            Error::ModelUnavailable { .. } => ErrorKind::ModelUnavailable,
            Error::Spec(_) => ErrorKind::Spec,
            Error::Model(_) => ErrorKind::Model,
            Error::Decode { .. } => ErrorKind::Decode,
            Error::Io { .. } => ErrorKind::Io,
            Error::JobEnded { .. } => ErrorKind::JobEnded,
            Error::Timeout(..) => ErrorKind::Timeout,
            Error::Unauthorized { .. } => ErrorKind::Unauthorized,
            Error::Tls { .. } => ErrorKind::Tls,
            Error::InvalidOptions(_) => ErrorKind::InvalidOptions,
            Error::Rejected(_) => ErrorKind::Rejected,
            Error::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            Error::UploadQuotaFull { .. } => ErrorKind::UploadQuotaFull,
        }
    }
}

impl ErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Nats => "nats",
            ErrorKind::UnknownJob => "unknown_job",
            ErrorKind::JobExists => "job_exists",
            ErrorKind::JobRunning => "job_running",
            ErrorKind::ModelNotReady => "model_not_ready",
            ErrorKind::ModelUnavailable => "model_unavailable",
            ErrorKind::Spec => "spec",
            ErrorKind::Model => "model",
            ErrorKind::Decode => "decode",
            ErrorKind::Io => "io",
            ErrorKind::JobEnded => "job_ended",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Tls => "tls",
            ErrorKind::InvalidOptions => "invalid_options",
            ErrorKind::Rejected => "rejected",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UploadQuotaFull => "upload_quota_full",
        }
    }
}

impl From<shoal_proto::DecodeError> for Error {
    fn from(e: shoal_proto::DecodeError) -> Self {
        Error::Decode { what: e.what, detail: e.detail }
    }
}
