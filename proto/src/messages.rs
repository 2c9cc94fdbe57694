//! The public control messages (DESIGN.md §4): what clients read and receive. Encoded with
//! [`crate::envelope::encode`] (msgpack, named fields, versioned); the golden vectors in
//! `proto/vectors/messages/` are the normative examples.
//!
//! - [`JobState`]: KV `shoal-jobs`, key `<job>.state`;
//! - [`RoundEvent`]: subject `<prefix>.<job>.round`;
//! - [`RejectNotice`]: subject `<prefix>.<job>.rejected.<client>`.

use serde::{Deserialize, Serialize};

use crate::cluster::CommitRecord;
use crate::ids::{ClientId, JobId, ModelVersion, RoundId};

/// Lifecycle of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum JobPhase {
    /// Rounds are running.
    Running,
    /// The last round committed.
    Finished,
    /// Too many consecutive rounds failed.
    Failed {
        /// Why.
        reason: String,
    },
    /// Stopped by a user (`shoal job cancel`, or the operator's FederatedJob deleted).
    Cancelled {
        /// Why (who cancelled it).
        reason: String,
    },
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobPhase::Running => f.write_str("running"),
            JobPhase::Finished => f.write_str("finished"),
            JobPhase::Failed { reason } => write!(f, "failed ({reason})"),
            JobPhase::Cancelled { reason } => write!(f, "cancelled ({reason})"),
        }
    }
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RoundOutcome {
    /// A new global model was committed.
    Committed {
        /// The committed version.
        version: ModelVersion,
        /// Updates aggregated.
        clients: u32,
        /// Sum of their weights.
        total_weight: f64,
    },
    /// Fewer than `min_clients` updates by the deadline; the previous model stands.
    QuorumNotMet {
        /// Updates accepted.
        accepted: u32,
        /// Quorum required.
        min_clients: u32,
    },
    /// The strategy could not produce a model (e.g. zero total weight); previous model stands.
    AggregationFailed {
        /// The error.
        detail: String,
        /// Its kind (`zero_total_weight`, `non_finite_result`, ...); absent in states written
        /// before it was recorded.
        #[serde(default)]
        kind: Option<AggregationErrorKind>,
    },
}

impl std::fmt::Display for RoundOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundOutcome::Committed { version, clients, total_weight } => {
                let s = if *clients == 1 { "" } else { "s" };
                write!(f, "committed model version {version} from {clients} update{s} (total weight {total_weight})")
            }
            RoundOutcome::QuorumNotMet { accepted, min_clients } => {
                let s = if *accepted == 1 { "" } else { "s" };
                write!(
                    f,
                    "quorum not met: {accepted} update{s}, {min_clients} needed; the previous model stands"
                )
            }
            RoundOutcome::AggregationFailed { detail, .. } => {
                write!(f, "aggregation failed ({detail}); the previous model stands")
            }
        }
    }
}

/// A job's state, stored under `<job>.state` in KV `shoal-jobs` and changed only by
/// compare-and-set on its revision (one committer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Job phase.
    pub phase: JobPhase,
    /// The open round (after the job ends: the last round run).
    pub round: RoundId,
    /// Current global model version (the base clients must train from).
    pub model_version: ModelVersion,
    /// When the open round opened (ms since the Unix epoch); 0 until a node opens it.
    pub opened_at_ms: u64,
    /// The open round's deadline (ms since the Unix epoch); 0 until a node opens it.
    pub deadline_at_ms: u64,
    /// Consecutive rounds that committed nothing.
    pub failed_rounds_in_a_row: u32,
    /// How the previous round ended.
    pub last_outcome: Option<RoundOutcome>,
    /// Which collection of partials the previous round closed with: leaves ack exactly the
    /// updates of the snapshot they sent for it (absent in states written before the
    /// hierarchy).
    #[serde(default)]
    pub last_commit: Option<CommitRecord>,
}

impl JobState {
    /// The state of a new job: round 1 waiting to open, model version 0.
    pub fn new_job() -> JobState {
        JobState {
            phase: JobPhase::Running,
            round: RoundId(1),
            model_version: ModelVersion(0),
            opened_at_ms: 0,
            deadline_at_ms: 0,
            failed_rounds_in_a_row: 0,
            last_outcome: None,
            last_commit: None,
        }
    }

    /// Whether the open round has been opened by a node.
    pub fn is_open(&self) -> bool {
        self.phase == JobPhase::Running && self.opened_at_ms > 0
    }
}

/// Published on `<prefix>.<job>.round`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RoundEvent {
    /// A round opened: clients train from `base_version` and publish for `round`.
    RoundOpened {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// Model version to train from.
        base_version: ModelVersion,
        /// Deadline, ms since the Unix epoch.
        deadline_at_ms: u64,
    },
    /// A round closed.
    RoundClosed {
        /// Job.
        job: JobId,
        /// Round.
        round: RoundId,
        /// What happened.
        outcome: RoundOutcome,
    },
    /// The job ended (finished or failed).
    JobEnded {
        /// Job.
        job: JobId,
        /// Final phase.
        phase: JobPhase,
    },
}

/// Published on `<prefix>.<job>.rejected.<client>` when an update is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectNotice {
    /// Job (as sent; may be unknown).
    pub job: String,
    /// Client.
    pub client: ClientId,
    /// Round header, if it parsed.
    pub round: Option<RoundId>,
    /// Typed reason.
    pub reason: RejectReason,
    /// Human-readable detail.
    pub detail: String,
}

/// Why a round's aggregation produced no model, as the wire names it (the maths crate's
/// `shoal_functions::ErrorKind` is this type): serialised as its label, e.g. in a round's
/// `aggregation_failed` outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationErrorKind {
    /// The folded weights sum to zero or less (or nothing was folded).
    ZeroTotalWeight,
    /// An update weight was NaN, infinite or not positive.
    InvalidWeight,
    /// Two values built from different manifests were combined.
    ManifestMismatch,
    /// A streaming operation was asked of a whole-cohort strategy.
    NotStreaming,
    /// The server step produced NaN or ±Inf.
    NonFiniteResult,
    /// The strategy's configuration or state cannot serve the input.
    Strategy,
    /// An update failed validation against the manifest.
    Validation,
    /// The manifest is unusable.
    InvalidManifest,
    /// A buffer was not aligned for its dtype.
    Misaligned,
    /// The result could not be encoded.
    Encode,
    /// A strategy's saved state cannot be restored: corrupt, of another format version, saved
    /// by another strategy, too large, or not fitting the strategy's configuration. The state
    /// is never silently reset.
    InvalidState,
}

impl AggregationErrorKind {
    /// A bounded label for metrics (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            AggregationErrorKind::ZeroTotalWeight => "zero_total_weight",
            AggregationErrorKind::InvalidWeight => "invalid_weight",
            AggregationErrorKind::ManifestMismatch => "manifest_mismatch",
            AggregationErrorKind::NotStreaming => "not_streaming",
            AggregationErrorKind::NonFiniteResult => "non_finite_result",
            AggregationErrorKind::Strategy => "strategy",
            AggregationErrorKind::Validation => "validation",
            AggregationErrorKind::InvalidManifest => "invalid_manifest",
            AggregationErrorKind::Misaligned => "misaligned",
            AggregationErrorKind::Encode => "encode",
            AggregationErrorKind::InvalidState => "invalid_state",
        }
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

    #[test]
    fn control_messages_round_trip_with_named_fields() {
        use crate::envelope::{decode, encode};
        let s = JobState::new_job();
        let bytes = encode(&s);
        assert_eq!(decode::<JobState>("job state", &bytes).unwrap(), s);
        // Named fields: the key appears in the bytes, so other languages can read them.
        assert!(bytes.windows(13).any(|w| w == b"model_version"));
        assert!(decode::<JobState>("job state", b"\x01\x02garbage").is_err());
        let e = RoundEvent::RoundClosed {
            job: JobId::new("j").unwrap(),
            round: RoundId(3),
            outcome: RoundOutcome::QuorumNotMet { accepted: 1, min_clients: 2 },
        };
        assert_eq!(decode::<RoundEvent>("event", &encode(&e)).unwrap(), e);
    }
}
