//! The runtime's error type and the typed reasons an update is rejected for.

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runtime errors. NATS, shared-memory and input problems are all values here: nothing in the
/// runtime panics on them.
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
    /// A job spec failed validation.
    #[error(transparent)]
    Spec(#[from] shoal_proto::SpecError),
    /// An SDK operation (job store, objects, connection) failed.
    #[error(transparent)]
    Client(#[from] shoal_client::Error),
    /// Aggregation maths failed.
    #[error(transparent)]
    Functions(#[from] shoal_functions::Error),
    /// A stored message (job state, event) could not be decoded.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Decoder message.
        detail: String,
    },
    /// A shared-memory segment problem.
    #[error("shared memory: {0}")]
    Shm(String),
    /// Local I/O.
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
    /// Another node already serves this NATS server.
    #[error("{0}")]
    NodeBusy(String),
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
    /// The update was rejected (client SDK view of a [`RejectReason`]).
    #[error("update rejected: {0}")]
    Rejected(RejectReason),
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

impl Error {
    /// Wraps a NATS error.
    pub fn nats(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Nats { op, source: Box::new(e) }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

pub use shoal_proto::RejectReason;

impl From<shoal_proto::DecodeError> for Error {
    fn from(e: shoal_proto::DecodeError) -> Self {
        Error::Decode { what: e.what, detail: e.detail }
    }
}
