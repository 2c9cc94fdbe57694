//! Bristle across nodes without moving updates: the two-phase protocol (DESIGN.md §5; messages
//! in `shoal_proto::twophase`).
//!
//! | step | where | computes | crosses nodes |
//! |---|---|---|---|
//! | open | top | [`Bristle::round_open`] | [`BristleRoundOpen`]; the own model (slot bytes) once per node when it is the reference |
//! | 1 | node | [`node_distances`]: `‖M_j − M_ref‖²` of each staged update | [`BristleDistances`]: id + ~20 B per update |
//! | decide | top | [`Bristle::select_distances`]: rank by (distance, client), the round's seeded draws, the reference model's F1 | [`BristleSelection`]: id per selected update + 8 B per class, to every node |
//! | 2 | node | [`node_integrate`]: the FedAvg partial of its selected updates; with the integrator, their F1 and their share of the output layer's integration | [`BristleIntegration`]: id + 8 B per class per selected update, and per node an output-tensor-sized numerator; one partial aggregate (8 B per parameter) per node |
//! | finish | top | [`Bristle::finish_integration`]: weighted mean, per-class integration, centring | — |
//!
//! # Exactness
//! Each update's distance is computed alone, so the distances, the ranking and the seeded
//! draws are the single-node ones bit for bit, however the cohort is split. The weighted mean
//! and the integration's numerator and denominators are sums of per-node sums: equal to the
//! single-node values up to f64 rounding.
//!
//! # The integrator: exact if every node can evaluate
//! The integrator scores each selected *model* per class (§B.2 step 2): an evaluator has to run
//! the candidate `M_j` (or `global + Δ_j`), which is the update itself. Without moving updates
//! this is exact only if the evaluation runs on the node that holds the update: every node
//! needs the same [`ClassEvaluator`] over the same server-held validation split, and the
//! evaluator must be deterministic (the same F1 for the same bytes on any node). Given that,
//! everything else is a sum of per-node shares: the class weights `ω_{j,c}`, `Ω_j` follow from
//! the peer's F1 and the reference F1 the top sends, and `Σ_j w_{j,c} M_j[:, c]`, `Σ_j w_{j,c}`
//! add up over nodes. If the validation split may live only on the top, no exact design avoids
//! moving the selected updates: the closest one moves only the selected updates' **output
//! layer** (h × C values each, not the whole model) when the evaluator needs no other tensor,
//! and otherwise the selected models themselves; this module does not implement that variant.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_proto::twophase::{
    BristleDistance, BristleDistances, BristleIntegration, BristlePeerF1, BristleRoundOpen, BristleSelection,
};

use super::{
    assess_peer, check_views, distances_sq, evaluate, integrate_peers, same_manifest, write_output, Bristle,
    BristleConfig, BristleError, BristleRound, Candidate, ClassEvaluator, IntegratorConfig, OutputPlan,
    Selection,
};
use crate::fedavg::FedAvg;
use crate::ids::ClientId;
use crate::spec::UpdateKind;
use crate::strategy::{PartialAggregate, Strategy as _, UpdateView};
use crate::tensor::Parameters;

fn protocol(detail: impl Into<String>) -> BristleError {
    BristleError::Protocol(detail.into())
}

/// Phase 1 on one node: each staged update's squared distance to the reference (`own_model` if
/// the opening says the top has one, else `global`), in `ClientId` order.
///
/// # Errors
/// [`BristleError::Protocol`] when `own_model` disagrees with the opening;
/// [`BristleError::ManifestMismatch`], [`BristleError::DuplicateClient`],
/// [`BristleError::Misaligned`] for the local updates.
pub fn node_distances(
    config: &BristleConfig,
    open: &BristleRoundOpen,
    own_model: Option<&Parameters>,
    global: &Parameters,
    local: &[UpdateView<'_>],
) -> Result<BristleDistances, BristleError> {
    if open.own_model != own_model.is_some() {
        return Err(protocol("the opening and the node disagree on the own model"));
    }
    if own_model.is_some_and(|o| !same_manifest(o.manifest(), global.manifest())) {
        return Err(BristleError::ManifestMismatch("own model and global model differ in manifest"));
    }
    check_views(global.manifest(), local)?;
    let delta = config.update_kind == UpdateKind::Delta;
    let sq = distances_sq(own_model, global, delta, local)?;
    let mut distances: Vec<BristleDistance> = local
        .iter()
        .zip(sq)
        .map(|(u, d)| BristleDistance {
            client: u.client.clone(),
            finite: d.is_finite(),
            dist_sq: if d.is_finite() { d } else { 0.0 },
        })
        .collect();
    distances.sort_by(|a, b| a.client.cmp(&b.client));
    Ok(BristleDistances { round: open.round, distances })
}

/// Phase 2 on one node: the FedAvg partial (weights = the updates' `weight`) of its selected
/// updates in `ClientId` order, and, when the job has the integrator, each one's F1 from the
/// node's `evaluator` and the node's share of the output layer's integration against the
/// reference F1 the top sent.
///
/// # Errors
/// The local updates' errors as [`node_distances`]; [`BristleError::InvalidConfig`] when the
/// integrator does not fit the manifest; [`BristleError::Evaluator`],
/// [`BristleError::F1Length`]; [`BristleError::Aggregate`] for a non-positive weight.
pub fn node_integrate(
    config: &BristleConfig,
    integrator: Option<(&IntegratorConfig, &mut dyn ClassEvaluator)>,
    selection: &BristleSelection,
    global: &Parameters,
    local: &[UpdateView<'_>],
) -> Result<(Option<BristleIntegration>, PartialAggregate), BristleError> {
    let manifest = global.manifest();
    check_views(manifest, local)?;
    let chosen: BTreeSet<&ClientId> = selection.selected.iter().collect();
    let mut selected: Vec<UpdateView<'_>> =
        local.iter().filter(|u| chosen.contains(u.client)).copied().collect();
    selected.sort_by(|a, b| a.client.cmp(b.client));
    let mut partial = PartialAggregate::new(Arc::clone(manifest));
    partial.fold_batch(&selected)?;
    let Some((cfg, evaluator)) = integrator else { return Ok((None, partial)) };
    let plan = OutputPlan::new(cfg, manifest)?;
    let delta = config.update_kind == UpdateKind::Delta;
    let share = integrate_peers(evaluator, &plan, &selection.reference_f1, &selected, global, delta)?;
    let peers = share.f1.into_iter().map(|(client, f1)| BristlePeerF1 { client, f1 }).collect();
    let integration = BristleIntegration {
        round: selection.round,
        peers,
        numerator: share.numerator,
        denominator: share.denominator,
    };
    Ok((Some(integration), partial))
}

/// The top's decision between Bristle's two node phases: the selection and, with the
/// integrator, the reference model's F1.
#[derive(Debug, Clone, PartialEq)]
pub struct BristleDecision {
    round: u64,
    selection: Selection,
    reference_f1: Vec<f64>,
}

impl BristleDecision {
    /// The ranking and the selection (as [`Bristle::select`] would give on one node).
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The message every node needs for phase 2.
    pub fn message(&self) -> BristleSelection {
        let mut selected: Vec<ClientId> = self.selection.selected().cloned().collect();
        selected.sort();
        BristleSelection { round: self.round, selected, reference_f1: self.reference_f1.clone() }
    }
}

impl Bristle {
    /// The opening of the next round for every node ([`node_distances`]); when it says
    /// `own_model`, nodes also need [`Bristle::own_model`].
    pub fn round_open(&self) -> BristleRoundOpen {
        BristleRoundOpen { round: self.round, own_model: self.own_model.is_some() }
    }

    /// The "receiver's own model" set with [`Bristle::set_own_model`], if any.
    pub fn own_model(&self) -> Option<&Parameters> {
        self.own_model.as_ref()
    }

    /// The top after phase 1: ranks every node's distances by (distance, client), selects with
    /// this round's seeded draws and, with the integrator, evaluates the reference model.
    /// Changes nothing but the evaluator's own state.
    ///
    /// # Errors
    /// [`BristleError::Protocol`] for another round's reports; [`BristleError::DuplicateClient`]
    /// for a client on two nodes; [`BristleError::EmptyCohort`];
    /// [`BristleError::NothingSelected`]; the evaluator's errors.
    pub fn select_distances(
        &mut self,
        global: &Parameters,
        reports: &[BristleDistances],
    ) -> Result<BristleDecision, BristleError> {
        let mut entries: BTreeMap<ClientId, f64> = BTreeMap::new();
        for node in reports {
            if node.round != self.round {
                return Err(protocol(format!(
                    "distances of round {}, the top runs {}",
                    node.round, self.round
                )));
            }
            for d in &node.distances {
                let distance = if d.finite { d.dist_sq.sqrt() } else { f64::NAN };
                if entries.insert(d.client.clone(), distance).is_some() {
                    return Err(BristleError::DuplicateClient(d.client.clone()));
                }
            }
        }
        if entries.is_empty() {
            return Err(BristleError::EmptyCohort);
        }
        let received = entries.len();
        let selection = self.rank(entries.into_iter().collect());
        if selection.selected().next().is_none() {
            return Err(BristleError::NothingSelected { received, rejected: selection.rejected.len() });
        }
        let reference_f1 = match self.integrator.as_mut() {
            None => Vec::new(),
            Some(integrator) => {
                let reference = self.own_model.as_ref().unwrap_or(global);
                let plan = OutputPlan::new(&integrator.config, reference.manifest())?;
                let candidate =
                    Candidate { manifest: reference.manifest(), bytes: reference.as_bytes(), client: None };
                evaluate(integrator.evaluator.as_mut(), plan.layout.classes, candidate)?
            }
        };
        Ok(BristleDecision { round: self.round, selection, reference_f1 })
    }

    /// The top after phase 2: merges the nodes' partials into the weighted mean of the
    /// selection and, with the integrator, sums the nodes' shares into the integrated output
    /// layer (re-assessing every peer from its reported F1 for the report). Commits the round
    /// (counter and report) and returns the new model.
    ///
    /// # Errors
    /// [`BristleError::Protocol`] for another round's messages, partials that do not hold
    /// exactly the selection, a selected client's F1 missing or reported twice, shares of the
    /// wrong size; FedAvg's errors ([`BristleError::Aggregate`]). Nothing is committed on error.
    pub fn finish_integration(
        &mut self,
        decision: BristleDecision,
        global: &Parameters,
        partials: &[PartialAggregate],
        integrations: &[BristleIntegration],
    ) -> Result<Parameters, BristleError> {
        if decision.round != self.round || integrations.iter().any(|i| i.round != self.round) {
            return Err(protocol(format!("messages not of round {}", self.round)));
        }
        let mut merged = PartialAggregate::new(Arc::clone(global.manifest()));
        for p in partials {
            merged.merge(p)?;
        }
        let selected = decision.selection.selected().count() as u64;
        if merged.count() != selected {
            return Err(protocol(format!(
                "the partials hold {} updates, {selected} were selected",
                merged.count()
            )));
        }
        let mut out = FedAvg { update_kind: self.config.update_kind, server_learning_rate: 1.0 }
            .finish(&merged, global)?;
        let mut report = BristleRound {
            round: self.round,
            selection: decision.selection,
            reference_f1: decision.reference_f1,
            assessments: BTreeMap::new(),
        };
        if let Some(integrator) = self.integrator.as_ref() {
            let reference = self.own_model.as_ref().unwrap_or(global);
            let plan = OutputPlan::new(&integrator.config, reference.manifest())?;
            let (num, den) = sum_shares(&plan, integrations)?;
            report.assessments = reassess(&plan, &report, integrations)?;
            write_output(&mut out, plan.index, plan.finish(&integrator.config, reference, &num, &den))?;
        }
        self.round += 1;
        self.last = Some(report);
        Ok(out)
    }
}

/// The integration's numerator and denominators summed over the nodes.
fn sum_shares(
    plan: &OutputPlan,
    integrations: &[BristleIntegration],
) -> Result<(Vec<f64>, Vec<f64>), BristleError> {
    let numel = plan.layout.rows * plan.layout.classes;
    let (mut num, mut den) = (vec![0.0f64; numel], vec![0.0f64; plan.layout.classes]);
    for i in integrations {
        if i.numerator.len() != numel || i.denominator.len() != den.len() {
            return Err(protocol("an integration share does not fit the output tensor"));
        }
        num.iter_mut().zip(&i.numerator).for_each(|(a, b)| *a += b);
        den.iter_mut().zip(&i.denominator).for_each(|(a, b)| *a += b);
    }
    Ok((num, den))
}

/// Every selected peer's assessment, from the F1 its node reported (exactly one report each).
fn reassess(
    plan: &OutputPlan,
    report: &BristleRound,
    integrations: &[BristleIntegration],
) -> Result<BTreeMap<ClientId, super::PeerAssessment>, BristleError> {
    let chosen: BTreeSet<&ClientId> = report.selection.selected().collect();
    let mut out = BTreeMap::new();
    for peer in integrations.iter().flat_map(|i| &i.peers) {
        if !chosen.contains(&peer.client) {
            return Err(protocol(format!("client {} was not selected", peer.client)));
        }
        let a = assess_peer(&report.reference_f1, &peer.f1, &plan.familiar, plan.compared);
        if out.insert(peer.client.clone(), a).is_some() {
            return Err(protocol(format!("client {} reported twice", peer.client)));
        }
    }
    if out.len() != chosen.len() {
        return Err(protocol(format!(
            "{} of {} selected clients reported their F1",
            out.len(),
            chosen.len()
        )));
    }
    Ok(out)
}
