//! Trusted cluster messages between nodes (DESIGN.md §5, §7): leases, claims, leaf progress,
//! collections of partial aggregates, commit records and the coordinate-sharded exchange. Only
//! node users may publish them (`shoal auth nats-config` gives clients no access).

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, CollectId, ExchangeId, InstanceId, ModelVersion, NodeId, RoundId};

/// The partials a round closed with: its collection id and the nodes whose partial went in.
/// A leaf acks the updates of its snapshot for `collect` if it is listed, and treats every other
/// update it holds for `round` as late (rejected, or re-staged in the asynchronous modes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The round closed.
    pub round: RoundId,
    /// The top's collection id.
    pub collect: CollectId,
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
    pub collect: CollectId,
    /// The top's node: a leaf on the same node hands its partial over in process.
    pub top: NodeId,
    /// Live nodes, in the order that groups them under middles (`fan_in` per middle).
    pub nodes: Vec<NodeId>,
    /// Leaves per middle aggregator; 0 = every leaf sends straight to the top.
    pub fan_in: u32,
    /// Stream sequences the previous collection got from more than one node (a claim lost in
    /// a nats-server restart): a leaf holding one checks the claim and, when the stored claim
    /// is not its own, drops everything it holds (it restarts) instead of answering.
    #[serde(default)]
    pub conflicts: Vec<u64>,
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
    pub collect: CollectId,
    /// Nodes whose leaves it covers.
    pub nodes: Vec<NodeId>,
    /// The process (membership lease instance) of each node in `nodes`, in the same order: the
    /// top refuses a collection in which a contributor is no longer that process.
    #[serde(default)]
    pub instances: Vec<InstanceId>,
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
    pub exchange: ExchangeId,
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
    pub exchange: ExchangeId,
    /// Shard index.
    pub shard: u32,
    /// The update's client (slices), `None` for results.
    pub client: Option<ClientId>,
    /// Object in `shoal-updates` holding the bytes, when too large for a message.
    pub object: Option<String>,
}

/// Who holds a lease in KV `shoal-jobs`: a node's membership (`_node.<id>`) or a job's top
/// (`<job>.top`). Written by compare-and-set on its KV revision and renewed periodically; a
/// lease not renewed for the configured stale time may be taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Holder's node.
    pub node: NodeId,
    /// Holder's process (random per start).
    pub instance: InstanceId,
    /// Last renewal, ms since the Unix epoch.
    pub renewed_ms: u64,
}

impl Lease {
    /// Whether the lease was renewed less than `stale` before `now_ms` (ms since the epoch).
    pub fn fresh(&self, now_ms: u64, stale: std::time::Duration) -> bool {
        now_ms.saturating_sub(self.renewed_ms) < stale.as_millis() as u64
    }
}

/// The value of a claim in KV `shoal-claims`, key `<job>.<round>.<client>`: which node process
/// staged the client's update for the round, and which message it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimValue {
    /// Node that staged the update.
    pub node: NodeId,
    /// Its process (membership lease instance).
    pub instance: InstanceId,
    /// The update message's stream sequence.
    pub stream_seq: u64,
}

/// A node's demand signal for the autoscaler, published every tick on
/// `<prefix>.node.<node>.demand` ([`crate::subjects::Subjects::demand`]) so the operator can
/// read it without Prometheus (reference/kubernetes.md R2.3: `num_pending` of the work queue,
/// not `num_ack_pending`, plus what each node holds staged but not yet folded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemandReport {
    /// The reporting node.
    pub node: NodeId,
    /// When it was measured, ms since the Unix epoch.
    pub at_ms: u64,
    /// Updates in the work queue not yet delivered to any node (the gateway consumer's
    /// `num_pending`; the same cluster-wide number from every node).
    pub num_pending: u64,
    /// Per job served by this node.
    pub jobs: Vec<JobDemand>,
}

/// One job's demand on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDemand {
    /// Job.
    pub job: crate::ids::JobId,
    /// Updates staged per second on this node, an exponentially weighted moving average.
    pub arrivals_per_second: f64,
    /// Updates staged on this node but not yet folded.
    pub backlog: u64,
    /// Function hosts serving the job on this node now.
    pub hosts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_ranges_cover_exactly_the_sequences() {
        let ranges = applied_ranges(vec![9, 3, 4, 5, 12, 4, 11, 1]);
        assert_eq!(ranges, vec![(1, 1), (3, 5), (9, 9), (11, 12)]);
        let rec =
            CommitRecord { round: RoundId(1), collect: CollectId(7), nodes: Vec::new(), applied: ranges };
        let inside: Vec<u64> = (0..15).filter(|&s| rec.includes(s)).collect();
        assert_eq!(inside, vec![1, 3, 4, 5, 9, 11, 12]);
        assert!(!CommitRecord { applied: Vec::new(), ..rec }.includes(1));
    }

    #[test]
    fn a_lease_is_fresh_until_its_stale_time() {
        let l = Lease { node: NodeId::new("n").unwrap(), instance: InstanceId(1), renewed_ms: 1000 };
        let stale = std::time::Duration::from_secs(3);
        assert!(l.fresh(3999, stale));
        assert!(!l.fresh(4000, stale));
        assert!(l.fresh(0, stale), "a clock behind the renewal counts as fresh");
    }
}
