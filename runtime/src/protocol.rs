//! The wire protocol (DESIGN.md §4): update headers and the msgpack control messages (job state,
//! round events, rejection notices). Control messages are encoded with named fields
//! (`rmp_serde::to_vec_named`) inside a versioned envelope so other languages can read them and
//! later versions can add fields.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_functions::{ClientId, JobId, ModelVersion, NodeId, RoundId};

use crate::error::{Error, RejectReason, Result};

/// Header: round the update is for.
pub const HDR_ROUND: &str = "Shoal-Round";
/// Header: global model version the client trained from.
pub const HDR_BASE_VERSION: &str = "Shoal-Base-Version";
/// Header: number of local training examples (the FedAvg weight).
pub const HDR_NUM_EXAMPLES: &str = "Shoal-Num-Examples";
/// Header: `delta` or `parameters`.
pub const HDR_KIND: &str = "Shoal-Kind";
/// Header: object name in `shoal-updates` when the payload travels through the object store.
pub const HDR_OBJECT: &str = "Shoal-Object";
/// Header: `sha256:<hex>` of the safetensors bytes stored as [`HDR_OBJECT`].
pub const HDR_DIGEST: &str = "Shoal-Digest";

/// Header of a reply that failed (reward requests): the reason, in words.
pub const HDR_ERROR: &str = "Shoal-Error";

/// Version of the control-message envelope.
pub const PROTOCOL_VERSION: u16 = 1;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u16,
    body: T,
}

/// Encodes a control message (msgpack, named fields, versioned).
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    // Serialising plain data structs into a Vec cannot fail.
    rmp_serde::to_vec_named(&Envelope { v: PROTOCOL_VERSION, body }).unwrap_or_default()
}

/// Decodes a control message.
///
/// # Errors
/// [`Error::Decode`] for malformed bytes or an unknown envelope version.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let env: Envelope<T> =
        rmp_serde::from_slice(bytes).map_err(|e| Error::Decode { what, detail: e.to_string() })?;
    if env.v != PROTOCOL_VERSION {
        return Err(Error::Decode { what, detail: format!("unknown protocol version {}", env.v) });
    }
    Ok(env.body)
}

/// Frames a control header with a raw body, for messages that carry bulk data after their
/// metadata (partial aggregates, shard exchanges): `u32 LE length ‖ encoded header ‖ body`.
pub fn frame<T: Serialize>(header: &T, body: &[u8]) -> Vec<u8> {
    let h = encode(header);
    let mut out = Vec::with_capacity(4 + h.len() + body.len());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out
}

/// Splits a [`frame`]d message into its header and body.
///
/// # Errors
/// [`Error::Decode`] for a truncated message or a malformed header.
pub fn unframe<'a, T: DeserializeOwned>(what: &'static str, bytes: &'a [u8]) -> Result<(T, &'a [u8])> {
    let bad = |d: &str| Error::Decode { what, detail: d.to_owned() };
    let len = bytes.get(..4).ok_or_else(|| bad("shorter than its length prefix"))?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let h = bytes.get(4..4 + len).ok_or_else(|| bad("header truncated"))?;
    Ok((decode(what, h)?, &bytes[4 + len..]))
}

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
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobPhase::Running => f.write_str("running"),
            JobPhase::Finished => f.write_str("finished"),
            JobPhase::Failed { reason } => write!(f, "failed ({reason})"),
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
        kind: Option<shoal_functions::ErrorKind>,
    },
}

impl std::fmt::Display for RoundOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundOutcome::Committed { version, clients, total_weight } => {
                write!(
                    f,
                    "committed model version {version} from {clients} updates (total weight {total_weight})"
                )
            }
            RoundOutcome::QuorumNotMet { accepted, min_clients } => {
                write!(
                    f,
                    "quorum not met: {accepted} updates, {min_clients} needed; the previous model stands"
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

/// The partials a round closed with: its collection id and the nodes whose partial went in.
/// A leaf acks the updates of its snapshot for `collect` if it is listed, and treats every other
/// update it holds for `round` as late (rejected, or re-staged in the asynchronous modes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The round closed.
    pub round: RoundId,
    /// The top's collection id.
    pub collect: u64,
    /// Nodes whose partial the result includes.
    pub nodes: Vec<NodeId>,
    /// Stream sequences of the update messages the result includes, as sorted inclusive ranges
    /// ([`applied_ranges`]). A copy of one of them delivered again (its node died before
    /// acking, or nats-server lost the ack) is acked, not folded again nor refused as late.
    #[serde(default)]
    pub applied: Vec<(u64, u64)>,
}

impl CommitRecord {
    /// Whether the round's result includes the update message with stream sequence `seq`.
    pub fn includes(&self, seq: u64) -> bool {
        let i = self.applied.partition_point(|&(_, hi)| hi < seq);
        self.applied.get(i).is_some_and(|&(lo, _)| lo <= seq)
    }
}

/// Sorted inclusive ranges covering `seqs` (stream sequences; duplicates ignored).
pub fn applied_ranges(mut seqs: Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == s => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// A leaf's progress on `<prefix>.<job>.progress`: how many updates node `node` holds for
/// `round` (sent on every change and as a heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeafProgress {
    /// The leaf's node.
    pub node: NodeId,
    /// Round.
    pub round: RoundId,
    /// Updates accepted for the round on this node.
    pub accepted: u32,
}

/// The top asks every leaf (and middle) for its partial of `round`, on
/// `<prefix>.<job>.collect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectRequest {
    /// Round to close.
    pub round: RoundId,
    /// Identifies this collection (a new top, or a retry, uses a new one).
    pub collect: u64,
    /// The top's node: a leaf on the same node hands its partial over in process.
    pub top: NodeId,
    /// Live nodes, in the order that groups them under middles (`fan_in` per middle).
    pub nodes: Vec<NodeId>,
    /// Leaves per middle aggregator; 0 = every leaf sends straight to the top.
    pub fan_in: u32,
}

/// Metadata of a partial on `<prefix>.<job>.partial.<round>` (the message body is
/// `u32 LE length ‖ this, msgpack ‖ accumulators as f64 LE`, or the metadata alone when the
/// accumulators travel through the object store as `object`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialHeader {
    /// Node that sends it (a leaf, or a middle for its group).
    pub sender: NodeId,
    /// Where it goes: the top's node, or a middle's.
    pub to: NodeId,
    /// Whether it goes to the middle on `to` (else to the top).
    #[serde(default)]
    pub to_middle: bool,
    /// Round.
    pub round: RoundId,
    /// Collection id it answers.
    pub collect: u64,
    /// Nodes whose leaves it covers.
    pub nodes: Vec<NodeId>,
    /// Whether it holds any update (an empty leaf sends no accumulators).
    pub empty: bool,
    /// Sum of weights.
    pub total_weight: f64,
    /// Updates folded.
    pub count: u64,
    /// Their messages' stream sequences (so the commit can name what it applied: see
    /// [`CommitRecord::applied`]); 8 bytes or less per update.
    #[serde(default)]
    pub seqs: Vec<u64>,
    /// Their clients, when a sender chooses to name them (Shoal's leaves send none: client ids
    /// stay on their node, so a partial's size does not grow with the cohort).
    #[serde(default)]
    pub clients: Vec<ClientId>,
    /// Owner of each `first` tensor.
    pub first_owners: Vec<Option<ClientId>>,
    /// When its last update was staged (ms since the Unix epoch; 0 = none).
    pub last_fold_ms: u64,
    /// Object in `shoal-updates` holding the accumulators, when too large for a message.
    pub object: Option<String>,
    /// Whole-cohort strategies: the updates the nodes it covers hold, which stay on their node
    /// (see [`ShardPlan`]).
    #[serde(default)]
    pub cohort: Vec<CohortEntry>,
}

/// One update of a sharded round: who sent it, its weight, and the node that staged it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CohortEntry {
    /// Sender.
    pub client: ClientId,
    /// `num_examples`.
    pub weight: f64,
    /// Node holding it in shared memory.
    pub node: NodeId,
}

/// What a shard owner computes in an exchange step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum ShardStep {
    /// The strategy on the shard's cohort (coordinate-wise strategies).
    Aggregate,
    /// The squared distances between the shard's updates (Krum, Bulyan: step 1).
    Distances,
    /// The result for the selected positions of the cohort (Krum, Bulyan: step 2).
    Select {
        /// Positions in [`ShardPlan::cohort`].
        selected: Vec<u32>,
    },
}

/// The top's plan for a coordinate-sharded exchange (DESIGN.md §5), on `<prefix>.<job>.shard`:
/// shard `i` of the model (`shoal_functions::shard::plan(manifest, owners.len())`) is owned by
/// `owners[i]`, which receives that range of every update of `cohort` from the nodes holding
/// them, computes `step` and sends the result to the top.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// Round.
    pub round: RoundId,
    /// This exchange (a retry uses a new id).
    pub exchange: u64,
    /// The top's node (where results go).
    pub top: NodeId,
    /// The updates, sorted by client.
    pub cohort: Vec<CohortEntry>,
    /// Shard owners, in shard order.
    pub owners: Vec<NodeId>,
    /// The global model version the round started from.
    pub base_version: ModelVersion,
    /// What to compute.
    pub step: ShardStep,
}

/// Metadata of an exchange message (`u32 LE length ‖ msgpack ‖ bytes`): a slice of one update
/// for a shard owner, or an owner's result for the top.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SliceHeader {
    /// Exchange id.
    pub exchange: u64,
    /// Shard index.
    pub shard: u32,
    /// The update's client (slices), `None` for results.
    pub client: Option<ClientId>,
    /// Object in `shoal-updates` holding the bytes, when too large for a message.
    pub object: Option<String>,
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_with_named_fields() {
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

    #[test]
    fn applied_ranges_cover_exactly_the_sequences() {
        let ranges = applied_ranges(vec![9, 3, 4, 5, 12, 4, 11, 1]);
        assert_eq!(ranges, vec![(1, 1), (3, 5), (9, 9), (11, 12)]);
        let rec = CommitRecord { round: RoundId(1), collect: 7, nodes: Vec::new(), applied: ranges };
        let inside: Vec<u64> = (0..15).filter(|&s| rec.includes(s)).collect();
        assert_eq!(inside, vec![1, 3, 4, 5, 9, 11, 12]);
        assert!(!CommitRecord { applied: Vec::new(), ..rec }.includes(1));
    }
}
