//! The two-phase protocol of robust and fair strategies across nodes (DESIGN.md §5): the plain
//! data that crosses nodes so that RFFL and Bristle run on a cohort spread over several nodes
//! while every client update stays on the node that staged it. The maths is in
//! `shoal-functions` (`rffl::twophase`, `bristle::twophase`); these are trusted cluster
//! messages (node users only), encoded like every control message ([`crate::encode`]: msgpack,
//! named fields, versioned envelope).
//!
//! Model-sized data (partial sums, RFFL's aggregate) does not travel in these messages: it goes
//! as a partial aggregate (`PartialHeader` and its f64 values) or as a frame body, once per node
//! and phase. What the messages carry per client is listed with each type.
//!
//! # RFFL (two node passes, one barrier)
//! 1. Top → every node, at the round's opening: [`RfflRoundOpen`] (the aggregation weights).
//! 2. Node → top: [`RfflUploads`] (per client: weight, norm) and a partial aggregate holding
//!    `Σ a_i c_i g_i` (and the `max`/`first`/statistic tensors) of the node's accepted updates.
//! 3. Top: merges the partials into the aggregate `u`; → every node: `u` (model-sized).
//! 4. Node → top: [`RfflDots`] (per client: `⟨g_i, u⟩`).
//! 5. Top: cosines, reputations, removals, rewards, `global + u`; commits.
//!
//! # Bristle (two node passes)
//! 1. Top → every node: [`BristleRoundOpen`] (and the own model, when one is the reference).
//! 2. Node → top: [`BristleDistances`] (per client: its distance to the reference).
//! 3. Top: ranks by (distance, client), draws with the round's seeded generator, evaluates the
//!    reference model; → every node: [`BristleSelection`].
//! 4. Node → top: [`BristleIntegration`] (per selected client: its per-class F1; per node: the
//!    integrator's numerator and denominators) and the FedAvg partial of its selected updates.
//! 5. Top: weighted mean, per-class integration of the output layer; commits.

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, CollectId, ExchangeId, InstanceId, ModelVersion, NodeId, RoundId};

/// Top → every node (`<p>.<job>.phase`): one step of a round's two-phase exchange. Framed
/// (`u32 LE length ‖ msgpack ‖ body`, [`crate::envelope::frame`]); the body is model-sized
/// data of the step (RFFL's aggregate `u` as f64 LE for [`PhaseStep::RfflDots`], Bristle's own
/// model's slot bytes when it is the reference), in the object store when larger than a
/// message. Its size does not depend on the cohort beyond the step's own per-client scalars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRequest {
    /// The job round.
    pub round: RoundId,
    /// This exchange (a retry after a re-collection uses a new id).
    pub exchange: ExchangeId,
    /// The collection whose snapshot each node answers from (the updates it sent up then).
    pub collect: CollectId,
    /// The top's node (where answers go).
    pub top: NodeId,
    /// The global model version the round started from.
    pub base_version: ModelVersion,
    /// The nodes asked (those holding updates of the collection, the top's own node aside).
    pub nodes: Vec<NodeId>,
    /// What to compute.
    pub step: PhaseStep,
    /// Object in the transfer store holding the body, when too large for a message.
    pub object: Option<String>,
}

/// What a node computes in one step, over the updates of its snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PhaseStep {
    /// RFFL phase 1: norms and the partial sum.
    RfflUploads(RfflRoundOpen),
    /// RFFL phase 2: dot products with `u` (the body).
    RfflDots(RfflRoundOpen),
    /// Bristle phase 1: distances to the reference.
    BristleDistances(BristleRoundOpen),
    /// Bristle phase 2: the selected updates' partial (and integration shares).
    BristleIntegrate(BristleSelection),
}

/// Node → top (`<p>.<job>.phase-answer.<top>`): one node's answer to a step. Framed like the
/// request; the body is the node's partial aggregate (f64 LE, `numel` values) when the step
/// has one (RFFL phase 1, Bristle phase 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseAnswer {
    /// The exchange answered.
    pub exchange: ExchangeId,
    /// The answering node.
    pub node: NodeId,
    /// Its process (membership lease instance): must be the one that sent the collection's
    /// partial.
    pub instance: InstanceId,
    /// The clients whose updates the answer covers, sorted (must be what the node's partial
    /// listed for the collection).
    pub clients: Vec<ClientId>,
    /// The step's per-client scalars.
    pub report: PhaseReport,
    /// The partial aggregate's metadata, when the body holds one.
    pub partial: Option<PartialMeta>,
    /// Object in the transfer store holding the body, when too large for a message.
    pub object: Option<String>,
}

/// The per-client part of a [`PhaseAnswer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PhaseReport {
    /// RFFL phase 1.
    RfflUploads(RfflUploads),
    /// RFFL phase 2.
    RfflDots(RfflDots),
    /// Bristle phase 1.
    BristleDistances(BristleDistances),
    /// Bristle phase 2 (`None` without the integrator).
    BristleIntegration(Option<BristleIntegration>),
}

/// Metadata of a partial aggregate travelling as a body (its values are the body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialMeta {
    /// Σ of the folded updates' `num_examples`.
    pub total_weight: f64,
    /// Updates folded.
    pub count: u64,
    /// Per tensor, the client whose values a `first` tensor holds.
    pub first_owners: Vec<Option<ClientId>>,
}

/// RFFL, top → every node at the opening of round `round`: what phase 1 needs besides the job
/// spec. One [`RfflWeight`] per reputable participant (client id + 8 bytes), the same message
/// to every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfflRoundOpen {
    /// RFFL's round index t (0 for the first round).
    pub round: u64,
    /// The aggregation weight `a_i = max(0, r_i)` of every reputable participant, in
    /// `ClientId` order. Empty in round 0, where every client is a new participant folded with
    /// its `num_examples` (the top divides by their sum).
    pub weights: Vec<RfflWeight>,
}

/// One reputable participant's aggregation weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfflWeight {
    /// The participant.
    pub client: ClientId,
    /// `max(0, r_i^{t-1})`, dimensionless.
    pub weight: f64,
}

/// RFFL phase 1, node → top: one record per update the node staged for the round (client id,
/// two f64 and two flags: about 70 bytes plus the id with named fields). The node's partial sum
/// travels beside it as a partial aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfflUploads {
    /// RFFL's round index t.
    pub round: u64,
    /// The node's updates, in `ClientId` order.
    pub uploads: Vec<RfflUpload>,
}

/// One update as RFFL's top sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfflUpload {
    /// The sender.
    pub client: ClientId,
    /// Its `num_examples` (the data share in round 0, the statistics' weight).
    pub num_examples: f64,
    /// Whether the node folded it (a reputable participant, or anyone in round 0).
    pub accepted: bool,
    /// Whether its squared norm is finite (a non-finite upload counts as a zero upload).
    pub finite: bool,
    /// `‖g_i‖²` over the `mean` tensors, before clipping (0 when not accepted or not finite).
    pub norm_sq: f64,
}

/// RFFL phase 2, node → top: every folded update's dot product with the aggregate `u` the top
/// sent (client id + 8 bytes each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfflDots {
    /// RFFL's round index t.
    pub round: u64,
    /// One per accepted, finite update of the node, in `ClientId` order.
    pub dots: Vec<RfflDot>,
}

/// One update's `⟨g_i, u⟩`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfflDot {
    /// The sender.
    pub client: ClientId,
    /// `⟨g_i, u⟩` over the `mean` tensors, before clipping.
    pub dot: f64,
}

/// Bristle, top → every node at the opening of round `round`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristleRoundOpen {
    /// Bristle's round index (its seeded draws derive from it).
    pub round: u64,
    /// Whether the distance reference is the top's own model (sent beside this message, once
    /// per node) rather than the global model every node has.
    pub own_model: bool,
}

/// Bristle phase 1, node → top: each staged update's distance to the reference (client id, an
/// f64 and a flag: about 30 bytes plus the id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristleDistances {
    /// Bristle's round index.
    pub round: u64,
    /// The node's updates, in `ClientId` order.
    pub distances: Vec<BristleDistance>,
}

/// One update's distance to the reference model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristleDistance {
    /// The sender.
    pub client: ClientId,
    /// Whether the distance is finite (a non-finite one is never selected).
    pub finite: bool,
    /// `‖M_j − M_ref‖²` over the `mean` tensors (0 when not finite).
    pub dist_sq: f64,
}

/// Bristle's decision, top → every node: the selected updates and, with the integrator, the
/// reference model's per-class F1 (one id per selected client; 8 bytes per class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristleSelection {
    /// Bristle's round index.
    pub round: u64,
    /// The selected clients, in `ClientId` order.
    pub selected: Vec<ClientId>,
    /// The reference model's F1 per class (empty without the integrator).
    pub reference_f1: Vec<f64>,
}

/// Bristle phase 2, node → top, with the integrator: each selected local update's F1 per class
/// (id + 8 bytes per class), and the node's share of the output layer's integration (an
/// output-tensor-sized numerator and one denominator per class, per node). The FedAvg partial
/// of the node's selected updates travels beside it as a partial aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristleIntegration {
    /// Bristle's round index.
    pub round: u64,
    /// One per selected update of the node, in `ClientId` order.
    pub peers: Vec<BristlePeerF1>,
    /// `Σ_j w_{j,c} M_j[e]` over the node's selected updates, per element `e` of the output
    /// tensor (C order), `c` its class.
    pub numerator: Vec<f64>,
    /// `Σ_j w_{j,c}` per class.
    pub denominator: Vec<f64>,
}

/// One selected update's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristlePeerF1 {
    /// The sender.
    pub client: ClientId,
    /// Its model's F1 per class, as the node's evaluator scored it (sanitised to [0, 1]).
    pub f1: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
        let bytes = crate::encode(msg);
        assert_eq!(crate::decode::<T>("two-phase message", &bytes).ok().as_ref(), Some(msg));
    }

    /// Every message survives the control-message envelope, and its fields keep their names.
    #[test]
    fn messages_round_trip_with_named_fields() {
        let c = |s: &str| ClientId::new(s).ok();
        let (Some(a), Some(b)) = (c("a"), c("b")) else { panic!("valid ids") };
        round_trip(&RfflRoundOpen {
            round: 3,
            weights: vec![RfflWeight { client: a.clone(), weight: 0.25 }],
        });
        let upload =
            RfflUpload { client: a.clone(), num_examples: 10.0, accepted: true, finite: true, norm_sq: 2.0 };
        round_trip(&RfflUploads { round: 3, uploads: vec![upload] });
        round_trip(&RfflDots { round: 3, dots: vec![RfflDot { client: b.clone(), dot: -1.5 }] });
        round_trip(&BristleRoundOpen { round: 1, own_model: true });
        let d = BristleDistance { client: a.clone(), finite: false, dist_sq: 0.0 };
        round_trip(&BristleDistances { round: 1, distances: vec![d] });
        round_trip(&BristleSelection {
            round: 1,
            selected: vec![a.clone(), b.clone()],
            reference_f1: vec![0.5; 3],
        });
        let peer = BristlePeerF1 { client: b, f1: vec![0.1, 0.9] };
        round_trip(&BristleIntegration {
            round: 1,
            peers: vec![peer],
            numerator: vec![1.0; 4],
            denominator: vec![2.0; 2],
        });
        let json = serde_json::to_value(RfflDot { client: a, dot: 1.0 }).ok();
        assert_eq!(json, Some(serde_json::json!({"client": "a", "dot": 1.0})));
    }
}
