//! The runtime's error type and the typed reasons an update is rejected for.

use serde::{Deserialize, Serialize};
use shoal_functions::ValidationError;

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
    Spec(#[from] shoal_functions::spec::SpecError),
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

/// Why the gateway refused an update. Each reason is counted in
/// `shoal_updates_rejected_total{reason}`, logged once per cause, and published to the client on
/// `<prefix>.<job>.rejected.<client>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Subject or headers missing or unparsable.
    MalformedHeaders,
    /// The job does not exist.
    UnknownJob,
    /// The job is finished or failed.
    JobNotRunning,
    /// The update is for a round that has closed.
    LateUpdate,
    /// The update is for a round that has not opened (more than one round ahead).
    WrongRound,
    /// Trained from another model version than the round's base.
    WrongBaseVersion,
    /// A second, different update from the same client in the same round.
    Duplicate,
    /// `num_examples` zero, unparsable or above the job's maximum.
    InvalidWeight,
    /// Inline payload over the inline limit, or object larger than the model can be.
    PayloadTooLarge,
    /// The payload's tensors do not match the manifest (names, dtypes, shapes, kind).
    SchemaMismatch,
    /// A float tensor holds NaN or Inf.
    NonFinite,
    /// The payload is not valid safetensors (truncated, bad header).
    Malformed,
    /// The object-store path failed: the object, its metadata or one of its chunks is missing
    /// or unreadable.
    ObjectUnavailable,
    /// The object named is not the sender's own `<job>/<round>/<client>`.
    Unauthorized,
    /// The bytes read do not match their digest: the message's `Shoal-Digest`, or the object
    /// store's own SHA-256 of the chunks (an object overwritten or corrupted in between).
    DigestMismatch,
    /// The safetensors header declares more tensors than the job's manifest has.
    TooManyTensors,
    /// The round already holds the job's `max_clients_per_round` updates on this node.
    CohortFull,
    /// This node serves its `--max-jobs` jobs already and no other node serves this one.
    NodeAtCapacity,
}

impl RejectReason {
    /// Every reason, for metrics initialisation.
    pub const ALL: [RejectReason; 18] = [
        RejectReason::MalformedHeaders,
        RejectReason::UnknownJob,
        RejectReason::JobNotRunning,
        RejectReason::LateUpdate,
        RejectReason::WrongRound,
        RejectReason::WrongBaseVersion,
        RejectReason::Duplicate,
        RejectReason::InvalidWeight,
        RejectReason::PayloadTooLarge,
        RejectReason::SchemaMismatch,
        RejectReason::NonFinite,
        RejectReason::Malformed,
        RejectReason::ObjectUnavailable,
        RejectReason::Unauthorized,
        RejectReason::DigestMismatch,
        RejectReason::TooManyTensors,
        RejectReason::CohortFull,
        RejectReason::NodeAtCapacity,
    ];

    /// Bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MalformedHeaders => "malformed_headers",
            RejectReason::UnknownJob => "unknown_job",
            RejectReason::JobNotRunning => "job_not_running",
            RejectReason::LateUpdate => "late_update",
            RejectReason::WrongRound => "wrong_round",
            RejectReason::WrongBaseVersion => "wrong_base_version",
            RejectReason::Duplicate => "duplicate",
            RejectReason::InvalidWeight => "invalid_weight",
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::SchemaMismatch => "schema_mismatch",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Malformed => "malformed",
            RejectReason::ObjectUnavailable => "object_unavailable",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::DigestMismatch => "digest_mismatch",
            RejectReason::TooManyTensors => "too_many_tensors",
            RejectReason::CohortFull => "cohort_full",
            RejectReason::NodeAtCapacity => "node_at_capacity",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&ValidationError> for RejectReason {
    fn from(e: &ValidationError) -> Self {
        match e {
            ValidationError::Malformed(_) | ValidationError::SlotSize { .. } => RejectReason::Malformed,
            ValidationError::NonFinite { .. } => RejectReason::NonFinite,
            ValidationError::TooManyTensors { .. } => RejectReason::TooManyTensors,
            ValidationError::MissingTensor(_)
            | ValidationError::ExtraTensor(_)
            | ValidationError::DTypeMismatch { .. }
            | ValidationError::ShapeMismatch { .. } => RejectReason::SchemaMismatch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason is in `ALL` once, with a distinct label that serde uses too.
    #[test]
    fn reasons_are_bounded_and_distinct() {
        let labels: std::collections::HashSet<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
        for r in RejectReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }
}
