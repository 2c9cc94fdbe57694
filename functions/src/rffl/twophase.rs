//! RFFL across nodes without moving updates: the two-phase protocol (DESIGN.md §5; messages in
//! `shoal_proto::twophase`).
//!
//! # Why two node passes, and why that is the minimum
//! An RFFL round needs, per client, `‖g_i‖` (for the clip factor `c_i`) and `⟨g_i, u⟩` (for the
//! cosine `φ_i`), and needs `u = Σ a_i c_i g_i` itself. `c_i` depends only on the client's own
//! update, and `a_i` is known before the round opens (`s_i ∝ num_examples` in round 0, the
//! previous reputations later), so a node can fold its share of `u` in the same pass that
//! measures the norms. The dot products need the whole of `u`, which exists only once every
//! node has folded: one barrier, hence a second pass. Nothing else needs update bytes.
//!
//! | step | where | computes | crosses nodes |
//! |---|---|---|---|
//! | open | top | [`Rffl::round_open`]: `a_i` of every reputable participant | [`RfflRoundOpen`] to every node: id + 8 B per reputable participant |
//! | 1 | node | [`node_uploads`]: `‖g_i‖²`, `c_i`, the partial `Σ a_i c_i g_i` (and `max`, `first`, statistics) | [`RfflUploads`] (id + ~70 B per update) and one partial aggregate (8 B per parameter) per node |
//! | merge | top | [`Rffl::collect_uploads`]: participants and shares, `u` (÷ Σ n in round 0), `‖u‖` | `u` to every node: 8 B per parameter |
//! | 2 | node | [`node_dots`]: `⟨g_i, u⟩` | [`RfflDots`]: id + ~12 B per update |
//! | finish | top | [`Rffl::finish_dots`]: `φ_i`, reputations, removals, `q_i`, `global + u` | — |
//!
//! Per client, about 2 × (id + 40) bytes cross nodes, never an update's bytes; the model-sized
//! transfers are per node (one partial up, `u` down). Rewards are served by the top from the
//! last round, as in one node.
//!
//! # Exactness
//! Norms, clip factors and the participants are the single-node values bit for bit (each update
//! is scanned alone, in the same order); `u` is a sum of partial sums, so it differs from the
//! single-node `u` by f64 rounding only (relative ~1e-16), and so do the dots, cosines and
//! reputations. The result does not depend on how the cohort is split or ordered beyond that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_proto::twophase::{RfflDot, RfflDots, RfflRoundOpen, RfflUpload, RfflUploads, RfflWeight};

use super::{
    check_views, norms_sq, upload_scale, view, Admission, Rffl, RfflConfig, RfflError, Scaled, Scanned,
};
use crate::error::Result;
use crate::ids::ClientId;
use crate::kernels::scan;
use crate::strategy::{PartialAggregate, UpdateView};
use crate::tensor::{AggregationPolicy, ModelManifest, Parameters, TensorData};

fn protocol(detail: impl Into<String>) -> RfflError {
    RfflError::Protocol(detail.into())
}

/// The local updates a node folds, from the round's opening: every one in round 0, else those
/// of reputable participants, each with its aggregation coefficient (`num_examples` in round 0,
/// `a_i` later), as `(cohort position, coefficient)` in `ClientId` order.
fn accepted_locally(
    open: &RfflRoundOpen,
    by_client: &BTreeMap<&ClientId, usize>,
    local: &[UpdateView<'_>],
) -> Vec<(usize, f64)> {
    if open.round == 0 {
        return by_client.values().map(|&k| (k, local[k].weight)).collect();
    }
    let weights: BTreeMap<&ClientId, f64> = open.weights.iter().map(|w| (&w.client, w.weight)).collect();
    by_client.iter().filter_map(|(c, &k)| weights.get(c).map(|&a| (k, a))).collect()
}

/// Phase 1 on one node, over the updates it staged (`local`, any order; it may be empty): every
/// update's `num_examples` and `‖g‖²`, and the partial aggregate of the accepted, finite ones —
/// `Σ coefficient_i · c_i · g_i` for `mean` tensors, the maximum / lowest client's value for
/// `max` / `first`, `Σ n_i x_i` for statistics, with `total_weight = Σ n_i` and `count` the
/// number folded. `config` gives Γ and the mode (the job spec's, as on the top).
///
/// # Errors
/// [`RfflError::ManifestMismatch`], [`RfflError::InvalidWeight`],
/// [`RfflError::DuplicateClient`], [`RfflError::Misaligned`] for the local updates.
pub fn node_uploads(
    config: &RfflConfig,
    open: &RfflRoundOpen,
    manifest: &Arc<ModelManifest>,
    local: &[UpdateView<'_>],
) -> Result<(RfflUploads, PartialAggregate), RfflError> {
    let by_client = check_views(manifest, local)?;
    let accepted = accepted_locally(open, &by_client, local);
    let index: Vec<usize> = accepted.iter().map(|a| a.0).collect();
    let norm_sq = norms_sq(local, &index, manifest)?;
    let mut folded: Vec<(usize, f64)> = Vec::with_capacity(accepted.len());
    let mut record: BTreeMap<usize, (bool, f64)> = BTreeMap::new();
    for (&(k, coefficient), &n2) in accepted.iter().zip(&norm_sq) {
        let finite = n2.is_finite();
        record.insert(k, (finite, if finite { n2 } else { 0.0 }));
        if finite {
            folded.push((k, coefficient * upload_scale(config.mode, config.gamma, n2.sqrt())));
        }
    }
    let partial = node_partial(manifest, local, &folded)?;
    let uploads = by_client
        .iter()
        .map(|(c, &k)| {
            let (finite, norm_sq) = record.get(&k).copied().unwrap_or((false, 0.0));
            let accepted = record.contains_key(&k);
            RfflUpload { client: (*c).clone(), num_examples: local[k].weight, accepted, finite, norm_sq }
        })
        .collect();
    Ok((RfflUploads { round: open.round, uploads }, partial))
}

/// The node's partial aggregate of the updates at `folded` (cohort position, fold weight), in
/// `ClientId` order.
fn node_partial(
    manifest: &Arc<ModelManifest>,
    local: &[UpdateView<'_>],
    folded: &[(usize, f64)],
) -> Result<PartialAggregate, RfflError> {
    let weights: Vec<f64> = folded.iter().map(|f| f.1).collect();
    let mut values = vec![0.0f64; manifest.numel()];
    let mut owners: Vec<Option<ClientId>> = vec![None; manifest.tensors().len()];
    let mut views: Vec<TensorData<'_>> = Vec::with_capacity(folded.len());
    for (i, (spec, s)) in manifest.tensors().iter().zip(manifest.slots()).enumerate() {
        views.clear();
        for &(k, _) in folded {
            views.push(view(&local[k], i)?);
        }
        let acc = &mut values[s.elem_offset..s.elem_offset + s.numel];
        match spec.policy {
            AggregationPolicy::Mean => scan::visit(&views, scan::Fold { u: acc, weights: &weights }),
            AggregationPolicy::Max => {
                acc.fill(f64::NEG_INFINITY);
                views.iter().for_each(|v| crate::kernels::max_assign(acc, *v));
            }
            AggregationPolicy::First => {
                if let (Some(v), Some(&(k, _))) = (views.first(), folded.first()) {
                    crate::kernels::assign(acc, *v);
                    owners[i] = Some(local[k].client.clone());
                }
            }
            AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                for (v, &(k, _)) in views.iter().zip(folded) {
                    crate::kernels::scaled_add(acc, *v, local[k].weight);
                }
            }
            AggregationPolicy::Skip => {}
        }
    }
    let sizes: f64 = folded.iter().map(|&(k, _)| local[k].weight).sum();
    PartialAggregate::from_parts(Arc::clone(manifest), values, owners, sizes, folded.len() as u64)
        .map_err(|_| RfflError::ManifestMismatch("node partial does not fit the manifest"))
}

/// Phase 2 on one node: `⟨g_i, u⟩` over the `mean` tensors for each of its accepted updates
/// (those with a finite dot product), `u` being [`RfflCollected::aggregate_values`] as the top
/// sent it. Accumulated tile by tile in the order the single-node pass uses.
///
/// # Errors
/// The local updates' errors as [`node_uploads`]; [`RfflError::ManifestMismatch`] when `u` is
/// not [`ModelManifest::numel`] long.
pub fn node_dots(
    open: &RfflRoundOpen,
    manifest: &Arc<ModelManifest>,
    u: &[f64],
    local: &[UpdateView<'_>],
) -> Result<RfflDots, RfflError> {
    if u.len() != manifest.numel() {
        return Err(RfflError::ManifestMismatch("the aggregate does not fit the manifest"));
    }
    let by_client = check_views(manifest, local)?;
    let accepted = accepted_locally(open, &by_client, local);
    let mut dots = vec![0.0f64; accepted.len()];
    let mut views: Vec<TensorData<'_>> = Vec::with_capacity(accepted.len());
    for (i, (spec, s)) in manifest.tensors().iter().zip(manifest.slots()).enumerate() {
        if spec.policy != AggregationPolicy::Mean {
            continue;
        }
        views.clear();
        for &(k, _) in &accepted {
            views.push(view(&local[k], i)?);
        }
        scan::visit(&views, scan::Dot { u: &u[s.elem_offset..s.elem_offset + s.numel], dots: &mut dots });
    }
    let dots = accepted
        .iter()
        .zip(dots)
        .filter(|(_, d)| d.is_finite())
        .map(|(&(k, _), dot)| RfflDot { client: local[k].client.clone(), dot })
        .collect();
    Ok(RfflDots { round: open.round, dots })
}

/// What the top holds between RFFL's two node phases: the participants, the accepted updates'
/// clip factors and weights, and the aggregate `u`.
#[derive(Debug)]
pub struct RfflCollected {
    round: u64,
    manifest: Arc<ModelManifest>,
    adm: Admission,
    scaled: Scaled,
    present: BTreeSet<ClientId>,
    aggregate: Vec<Vec<f64>>,
    u_norm: f64,
}

impl RfflCollected {
    /// `u` as the nodes need it for phase 2: [`ModelManifest::numel`] f64 in slot element order,
    /// `Σ a_i c_i g_i` on the `mean` tensors and 0 elsewhere.
    pub fn aggregate_values(&self) -> Vec<f64> {
        let mut out = vec![0.0f64; self.manifest.numel()];
        for ((spec, s), u) in self.manifest.tensors().iter().zip(self.manifest.slots()).zip(&self.aggregate) {
            if spec.policy == AggregationPolicy::Mean {
                out[s.elem_offset..s.elem_offset + s.numel].copy_from_slice(u);
            }
        }
        out
    }

    /// `‖u‖` over the `mean` tensors.
    pub fn aggregate_norm(&self) -> f64 {
        self.u_norm
    }
}

impl Rffl {
    /// The opening of the next round for every node ([`node_uploads`]): the round index and the
    /// aggregation weight `max(0, r_i)` of every reputable participant (none in round 0).
    pub fn round_open(&self) -> RfflRoundOpen {
        let weights = self
            .participants
            .iter()
            .filter(|(_, p)| p.reputable)
            .map(|(c, p)| RfflWeight { client: c.clone(), weight: p.reputation.max(0.0) })
            .collect();
        RfflRoundOpen { round: self.round, weights }
    }

    /// The top after phase 1: checks every node's uploads against the round, admits the
    /// participants exactly as [`Rffl::step`] does, merges the nodes' partials and finishes `u`
    /// (divided by `Σ num_examples` in round 0). Changes nothing yet.
    ///
    /// # Errors
    /// [`RfflError::Protocol`] for another round's messages or a node that accepted other
    /// clients than the top; [`RfflError::DuplicateClient`] for a client on two nodes; the
    /// admission errors of [`Rffl::step`]; [`RfflError::ManifestMismatch`] for partials of
    /// another manifest.
    pub fn collect_uploads(
        &self,
        manifest: &Arc<ModelManifest>,
        uploads: &[RfflUploads],
        partials: &[PartialAggregate],
    ) -> Result<RfflCollected, RfflError> {
        if self.manifest.as_ref().is_some_and(|m| **m != **manifest) {
            return Err(RfflError::ManifestMismatch("the uploads' manifest is not the job's"));
        }
        let all = self.gather_uploads(uploads)?;
        let present: BTreeMap<&ClientId, f64> = all.iter().map(|(c, u)| (*c, u.num_examples)).collect();
        let adm = self.admit(&present)?;
        let accepted: BTreeSet<&ClientId> = adm.accepted.iter().map(|&p| &adm.ids[p]).collect();
        if let Some((c, _)) = all.iter().find(|(c, u)| u.accepted != accepted.contains(*c)) {
            return Err(protocol(format!(
                "client {c} was accepted by its node but not by the top, or the reverse"
            )));
        }
        let norm_sq: Vec<f64> = accepted.iter().map(|c| norm_sq_or_nan(all[c])).collect();
        let scaled = Scaled::new(&self.config, self.round, &adm, &norm_sq);
        let divisor = if self.round == 0 { present.values().sum::<f64>() } else { 1.0 };
        let (aggregate, u_norm) = merged_aggregate(manifest, partials, divisor)?;
        let present = present.keys().map(|c| (*c).clone()).collect();
        Ok(RfflCollected {
            round: self.round,
            manifest: Arc::clone(manifest),
            adm,
            scaled,
            present,
            aggregate,
            u_norm,
        })
    }

    /// Every node's uploads by client, checked for the round and for duplicates.
    fn gather_uploads<'u>(
        &self,
        uploads: &'u [RfflUploads],
    ) -> Result<BTreeMap<&'u ClientId, &'u RfflUpload>, RfflError> {
        let mut all = BTreeMap::new();
        for node in uploads {
            if node.round != self.round {
                return Err(protocol(format!(
                    "uploads of round {}, the top runs round {}",
                    node.round, self.round
                )));
            }
            for u in &node.uploads {
                super::check_weight(&u.client, u.num_examples)?;
                if all.insert(&u.client, u).is_some() {
                    return Err(RfflError::DuplicateClient(u.client.clone()));
                }
            }
        }
        Ok(all)
    }

    /// The top after phase 2: the cosines from every node's dots, then the reputations, removals
    /// and reward ratios exactly as [`Rffl::step`]; commits the round (kept for
    /// [`Rffl::last_round`] and the rewards) and returns `global + u`.
    ///
    /// # Errors
    /// [`RfflError::Protocol`] for another round's dots or a missing one (as
    /// `Error::Strategy`); the normalisation errors of [`super::update_reputations`];
    /// [`crate::Error::NonFiniteResult`] on overflow. Nothing is committed on error.
    pub fn finish_dots(
        &mut self,
        collected: RfflCollected,
        dots: &[RfflDots],
        global: &Parameters,
    ) -> Result<Parameters> {
        if collected.round != self.round || dots.iter().any(|d| d.round != self.round) {
            return Err(protocol(format!("dots or uploads not of round {}", self.round)).into());
        }
        if **global.manifest() != *collected.manifest {
            return Err(crate::Error::ManifestMismatch("the global model's manifest is not the round's"));
        }
        let by_client: BTreeMap<&ClientId, f64> =
            dots.iter().flat_map(|d| &d.dots).map(|d| (&d.client, d.dot)).collect();
        let RfflCollected { manifest, adm, scaled, present, aggregate, u_norm, .. } = collected;
        let mut accepted_dots = Vec::with_capacity(adm.accepted.len());
        for (a, &p) in adm.accepted.iter().enumerate() {
            let dot = match (scaled.finite[a], by_client.get(&adm.ids[p])) {
                (false, _) => 0.0,
                (true, Some(&d)) => d,
                (true, None) => {
                    return Err(protocol(format!("no dot product for client {}", adm.ids[p])).into())
                }
            };
            accepted_dots.push(dot);
        }
        let scanned = Scanned { aggregate, dots: accepted_dots, u_norm };
        let pending = self.conclude(adm, &scaled, scanned, |c| present.contains(c), manifest)?;
        let out = pending.round.apply_to(global)?;
        self.commit(pending, true);
        Ok(out)
    }
}

/// `‖g‖²` of an upload as the single-node pass sees it: NaN for a non-finite upload.
fn norm_sq_or_nan(u: &RfflUpload) -> f64 {
    if u.finite {
        u.norm_sq
    } else {
        f64::NAN
    }
}

/// Merges the nodes' partials into `u` per tensor (see [`super::RfflRound::aggregate_tensor`]):
/// `mean` tensors divided by `divisor`, `max` tensors 0 where nothing was folded, statistics
/// divided by their weight sum; and `‖u‖` over the `mean` tensors, summed tile by tile as the
/// single-node pass does.
fn merged_aggregate(
    manifest: &Arc<ModelManifest>,
    partials: &[PartialAggregate],
    divisor: f64,
) -> Result<(Vec<Vec<f64>>, f64), RfflError> {
    let mut merged = PartialAggregate::new(Arc::clone(manifest));
    for p in partials {
        merged.merge(p).map_err(|_| RfflError::ManifestMismatch("a node's partial has another manifest"))?;
    }
    let (mut aggregate, mut u_sq) = (Vec::with_capacity(manifest.tensors().len()), 0.0f64);
    for (i, spec) in manifest.tensors().iter().enumerate() {
        let acc = merged.tensor_values(i);
        aggregate.push(match spec.policy {
            AggregationPolicy::Mean => {
                let u: Vec<f64> = acc.iter().map(|v| v / divisor).collect();
                u.chunks(scan::TILE).for_each(|tile| u_sq += scan::sum_sq(tile));
                u
            }
            AggregationPolicy::Max if merged.count() == 0 => vec![0.0; acc.len()],
            AggregationPolicy::Max | AggregationPolicy::First => acc.to_vec(),
            AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                let total = merged.total_weight();
                let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
                acc.iter().map(|v| v * scale).collect()
            }
            AggregationPolicy::Skip => Vec::new(),
        });
    }
    Ok((aggregate, u_sq.sqrt()))
}
