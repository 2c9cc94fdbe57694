//! RFFL: robust and fair federated learning with reputations (Xu & Lyu, arXiv 2011.10464,
//! FL-ICML'21; reference code `XinyiYS/Robust-and-Fair-Federated-Learning` @ 1bd73d7).
//! Specification: `algorithms.md` §A.
//!
//! Every round each participant uploads a gradient `g_i` (a model delta, one vector over all
//! `mean` tensors of the manifest, split into layers = tensors). The server
//!
//! 1. clips (reference code) or normalises (paper) each upload to norm Γ;
//! 2. aggregates `u = Σ_i a_i g_i` with `a_i = s_i` (data shares) in round 0 and the previous
//!    round's reputations afterwards;
//! 3. scores each upload by its cosine with `u` (`φ_i`), updates the reputations with an EMA
//!    (`α`), normalises them, and after a warm-up removes every participant whose reputation
//!    is below `rth / |R|`;
//! 4. rewards participant `i` with the layer-wise top-`q_i` entries of `u`, where
//!    `q_i = r_i / max_j r_j` (collaborative fairness).
//!
//! # Server model in Shoal
//! RFFL itself has no global model: every participant keeps its own model and applies its
//! reward. Shoal serves `u` to everyone as the global step (`Strategy::aggregate_cohort` returns
//! `global + u`, updates are always **deltas**), and the per-participant reward gradients on
//! request ([`RfflRound::reward`], also after `aggregate_cohort` through [`Rffl::last_round`]).
//!
//! # Keyed by participant, never by position
//! Every per-participant quantity (data share, reputation, membership of the reputable set,
//! rewards) is keyed by [`ClientId`], and the cohort is processed in `ClientId` order whatever
//! its arrival order, so permuting a cohort gives bit-identical results. The reference code's
//! index mismatch between adversaries and honest participants (§A.6-1) cannot occur.
//!
//! # Differences from the reference code, by design (§A.7)
//! - **Negative reputations never become negative aggregation weights.** The reference code
//!   uses the signed previous reputation as the weight, which *flips* an anti-aligned attacker's
//!   gradient into the aggregate (test vector A-2). Here `a_i = max(0, r_i)`; the weights are not
//!   renormalised after clamping, so honest weights are exactly the reference code's.
//! - **Non-positive normalisers are typed errors**: `Σ r̃ ≤ 0` (a majority anti-aligned with
//!   `u`) is [`RfflError::NonPositiveReputationSum`], never inf/NaN/flipped reputations; the round
//!   fails and no state changes.
//! - **Removed participants stay removed and their updates are ignored** (weight 0, no `φ`,
//!   reported in [`RfflRound::ignored`]); the reference code keeps computing their `φ` and only
//!   zeroes their reputation, which has the same effect on everything else.
//! - **Participants are the round-0 cohort** (their `num_examples`, the updates' `weight`, give
//!   the data shares `s_i`). Later updates from unknown clients are ignored like removed ones. A
//!   reputable participant absent from a round counts as a zero upload (`φ = 0`), so its
//!   reputation decays like a participant that never moves (§A.7).
//! - **Non-finite uploads** (NaN/Inf, normally rejected at ingest) count as zero uploads and are
//!   flagged in [`ClientRound::non_finite`]; they never reach `u`.
//! - A layer with a single entry keeps it under the reference-code top-k (which crashes there).
//!
//! # Tensors and policies
//! The gradient is the concatenation of the manifest's `mean` tensors (norms and cosines run over
//! all of them together, rewards are sparsified tensor by tensor). `skip` tensors are not
//! aggregated (the global value stands); `max` and `first` tensors get FedAvg's delta semantics
//! over the accepted updates (element-wise maximum, value of the lowest `ClientId`).
//!
//! # Cost
//! Two passes over the cohort's memory and no copy of it: pass 1 computes the squared norms (f64,
//! eight lanes per update, f32 updates read four at a time); pass 2 walks the model in tiles of
//! `scan::TILE` (4 Ki) elements, folds the weighted updates into the aggregate tile
//! ([`crate::kernels::fold_f32_tiled`] for f32) and then takes every update's dot product with
//! that tile while both are still in L2. The clip factors depend on the full norms, so two passes
//! are the minimum. Allocations per round: the f64 aggregate (one model) and O(cohort) scalars.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ids::ClientId;
use crate::strategy::{Mergeability, PartialAggregate, Strategy, UpdateView};
use crate::tensor::{AggregationPolicy, ModelManifest, Parameters, TensorData};

/// The cosine's denominator floor (`max(‖g‖·‖u‖, ε)` in the reference code).
pub const COSINE_EPSILON: f64 = 1e-10;

/// Added to the norm before clipping in the reference code (`Γ · g / (‖g‖ + 1e-7)`).
pub const CLIP_EPSILON: f64 = 1e-7;

/// Which specification of RFFL to follow where the paper and the reference code differ
/// (`algorithms.md` §A.6). The paper's rules are `[paper-unverified]` in the spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The reference code (default, the verifiable behaviour): uploads are **clipped** to norm
    /// Γ only when `‖g‖ + 1e-7 > Γ`; the reward keeps every entry with `|u| ≥ τ`, τ being the
    /// `k' = min(k, d − 1)`-th largest `|u|` of the layer (ties at τ kept, so even `q = 1` loses
    /// the smallest entry of each layer).
    #[default]
    ReferenceCode,
    /// The paper: every upload is **normalised** to norm Γ (a zero upload stays zero); the
    /// reward keeps exactly the `k = ⌈d·q⌉` largest `|u|` of each layer, ties broken by the lower
    /// element index, so `q = 1` receives the whole of `u`.
    Paper,
}

/// RFFL hyperparameters (`algorithms.md` §A.3).
#[derive(Debug, Clone, PartialEq)]
pub struct RfflConfig {
    /// Paper or reference-code semantics.
    pub mode: Mode,
    /// α, the reputation EMA decay, in [0, 1] (0.95).
    pub alpha: f64,
    /// Γ, the upload clip (or normalisation) norm, > 0 (default 0.5, the reference code's MNIST
    /// setting; 0.15 for CIFAR-10, 1 for SST and MR). `f64::INFINITY` disables clipping in
    /// [`Mode::ReferenceCode`]; [`Mode::Paper`] needs a finite Γ.
    pub gamma: f64,
    /// rth, the removal threshold coefficient: `β_t = rth / |R_{t-1}|`, in [0, 1] (1/3). With
    /// rth ≤ 1 at least one participant always survives.
    pub rth: f64,
    /// Rounds without removal: removal starts at round index `warmup_rounds` (10, reference code
    /// since commit 9e9fa37; 0 gives the original behaviour).
    pub warmup_rounds: u64,
    /// The "altruism degree" the maintainer says the paper's numbers rely on (issue #4, §A.6-4):
    /// after removal, `r ← r / max r; r ← tanh(δ·r); r ← r / max r`, and the transformed `r` is
    /// kept as state. `None` (default) matches the published code.
    pub altruism_degree: Option<f64>,
    /// Whether rewards are sparsified (default true); without it every reputable participant is
    /// rewarded with the whole of `u`.
    pub sparsify: bool,
}

impl Default for RfflConfig {
    fn default() -> Self {
        RfflConfig {
            mode: Mode::ReferenceCode,
            alpha: 0.95,
            gamma: 0.5,
            rth: 1.0 / 3.0,
            warmup_rounds: 10,
            altruism_degree: None,
            sparsify: true,
        }
    }
}

impl RfflConfig {
    /// Checks the hyperparameters' ranges.
    ///
    /// # Errors
    /// [`RfflError::InvalidConfig`] naming the first bad value.
    pub fn validate(&self) -> Result<(), RfflError> {
        let bad = |s: String| Err(RfflError::InvalidConfig(s));
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad(format!("alpha {} must be in [0, 1]", self.alpha));
        }
        if self.gamma.is_nan() || self.gamma <= 0.0 || (self.mode == Mode::Paper && !self.gamma.is_finite()) {
            return bad(format!("gamma {} must be > 0 (and finite in paper mode)", self.gamma));
        }
        if !(0.0..=1.0).contains(&self.rth) {
            return bad(format!("rth {} must be in [0, 1]", self.rth));
        }
        if let Some(d) = self.altruism_degree {
            if !(d.is_finite() && d > 0.0) {
                return bad(format!("altruism degree {d} must be finite and > 0"));
            }
        }
        Ok(())
    }
}

/// Errors of RFFL. None of them changes the strategy's state: the round fails and the previous
/// global model stands.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RfflError {
    /// A hyperparameter is out of range.
    #[error("invalid RFFL configuration: {0}")]
    InvalidConfig(String),
    /// The cohort holds no update.
    #[error("the cohort is empty")]
    EmptyCohort,
    /// Two updates of one cohort come from the same client.
    #[error("client {0} sent two updates in one cohort")]
    DuplicateClient(ClientId),
    /// An update's weight (`num_examples`) is negative, NaN or infinite.
    #[error("update of client {client} has weight {weight}: it must be finite and >= 0")]
    InvalidWeight {
        /// The sender.
        client: ClientId,
        /// The rejected weight.
        weight: f64,
    },
    /// The round-0 weights (`num_examples`) sum to zero, so no data share `s_i` exists.
    #[error("the round-0 weights sum to {0}: data shares need a positive total")]
    NonPositiveShareSum(f64),
    /// `Σ_j r̃_j ≤ 0` (or not finite): a majority of the reputation mass is anti-aligned with the
    /// aggregate, and normalising would divide by zero or flip signs (§A.7).
    #[error("round {round}: the reputation sum {sum} is not positive")]
    NonPositiveReputationSum {
        /// Round index.
        round: u64,
        /// The offending sum.
        sum: f64,
    },
    /// `max_j r_j ≤ 0` when computing reward ratios or the altruism transform (cannot happen
    /// after a successful normalisation; kept as a guard, §D.4).
    #[error("round {round}: the largest reputation {max} is not positive")]
    NonPositiveMaxReputation {
        /// Round index.
        round: u64,
        /// The offending maximum.
        max: f64,
    },
    /// No update of the cohort comes from a reputable participant (all from removed or unknown
    /// clients): nothing to aggregate.
    #[error("none of the {ignored} updates comes from a reputable participant")]
    NoReputableUpdate {
        /// Updates ignored.
        ignored: usize,
    },
    /// Updates (or the global model) were built from different manifests.
    #[error("manifest mismatch: {0}")]
    ManifestMismatch(&'static str),
    /// A tensor's bytes are not aligned for its dtype or too short (a staging bug guard).
    #[error("tensor {0} of an update is misaligned or truncated")]
    Misaligned(String),
    /// A reward was asked for a client that is not a participant.
    #[error("client {0} is not an RFFL participant")]
    UnknownClient(ClientId),
}

/// A `Copy` classification of [`RfflError`] for callers and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // one variant per `RfflError` variant, same names
pub enum RfflErrorKind {
    InvalidConfig,
    EmptyCohort,
    DuplicateClient,
    InvalidWeight,
    NonPositiveShareSum,
    NonPositiveReputationSum,
    NonPositiveMaxReputation,
    NoReputableUpdate,
    ManifestMismatch,
    Misaligned,
    UnknownClient,
}

impl RfflError {
    /// The error's kind.
    pub fn kind(&self) -> RfflErrorKind {
        match self {
            RfflError::InvalidConfig(_) => RfflErrorKind::InvalidConfig,
            RfflError::EmptyCohort => RfflErrorKind::EmptyCohort,
            RfflError::DuplicateClient(_) => RfflErrorKind::DuplicateClient,
            RfflError::InvalidWeight { .. } => RfflErrorKind::InvalidWeight,
            RfflError::NonPositiveShareSum(_) => RfflErrorKind::NonPositiveShareSum,
            RfflError::NonPositiveReputationSum { .. } => RfflErrorKind::NonPositiveReputationSum,
            RfflError::NonPositiveMaxReputation { .. } => RfflErrorKind::NonPositiveMaxReputation,
            RfflError::NoReputableUpdate { .. } => RfflErrorKind::NoReputableUpdate,
            RfflError::ManifestMismatch(_) => RfflErrorKind::ManifestMismatch,
            RfflError::Misaligned(_) => RfflErrorKind::Misaligned,
            RfflError::UnknownClient(_) => RfflErrorKind::UnknownClient,
        }
    }
}

impl RfflErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RfflErrorKind::InvalidConfig => "invalid_config",
            RfflErrorKind::EmptyCohort => "empty_cohort",
            RfflErrorKind::DuplicateClient => "duplicate_client",
            RfflErrorKind::InvalidWeight => "invalid_weight",
            RfflErrorKind::NonPositiveShareSum => "non_positive_share_sum",
            RfflErrorKind::NonPositiveReputationSum => "non_positive_reputation_sum",
            RfflErrorKind::NonPositiveMaxReputation => "non_positive_max_reputation",
            RfflErrorKind::NoReputableUpdate => "no_reputable_update",
            RfflErrorKind::ManifestMismatch => "manifest_mismatch",
            RfflErrorKind::Misaligned => "misaligned",
            RfflErrorKind::UnknownClient => "unknown_client",
        }
    }
}

/// How [`Strategy::aggregate_cohort`] reports RFFL errors through the crate's error type (which
/// has no strategy-specific variant): every "no weighted aggregate exists" case becomes
/// [`Error::ZeroTotalWeight`] (the previous global model stands), a duplicate client becomes
/// [`Error::ManifestMismatch`], the rest keep their closest crate kind.
impl From<RfflError> for Error {
    fn from(e: RfflError) -> Error {
        match e {
            RfflError::EmptyCohort => Error::ZeroTotalWeight { total: 0.0, count: 0 },
            RfflError::NonPositiveShareSum(total) => Error::ZeroTotalWeight { total, count: 0 },
            RfflError::NonPositiveReputationSum { sum, .. } => {
                Error::ZeroTotalWeight { total: sum, count: 0 }
            }
            RfflError::NonPositiveMaxReputation { max, .. } => {
                Error::ZeroTotalWeight { total: max, count: 0 }
            }
            RfflError::NoReputableUpdate { .. } => Error::ZeroTotalWeight { total: 0.0, count: 0 },
            RfflError::InvalidWeight { weight, .. } => Error::InvalidWeight(weight),
            RfflError::ManifestMismatch(s) => Error::ManifestMismatch(s),
            RfflError::DuplicateClient(_) => {
                Error::ManifestMismatch("cohort holds two updates from one client")
            }
            RfflError::Misaligned(n) => Error::Misaligned(n),
            RfflError::InvalidConfig(s) => Error::InvalidManifest(format!("RFFL configuration: {s}")),
            RfflError::UnknownClient(c) => Error::InvalidManifest(format!("unknown RFFL participant {c}")),
        }
    }
}

/// The server's state about one participant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Participant {
    /// `s_i = n_i / Σ_j n_j`, from the round-0 weights.
    pub share: f64,
    /// `r_i` after the last committed round (0 before round 0 and once removed). Signed.
    pub reputation: f64,
    /// Whether the participant is in the reputable set R.
    pub reputable: bool,
    /// The round in which it was removed, if it was.
    pub removed_in: Option<u64>,
}

/// What one round did to one participant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientRound {
    /// Whether its update was in the cohort.
    pub present: bool,
    /// Whether its update held NaN/Inf (then treated as a zero upload).
    pub non_finite: bool,
    /// Whether it is still reputable after this round.
    pub reputable: bool,
    /// `a_i`, its aggregation weight this round (`s_i` in round 0, else `max(0, r_i^{t-1})`;
    /// 0 once removed).
    pub weight: f64,
    /// `‖g_i‖` of the upload as received (0 when absent).
    pub norm: f64,
    /// The clip/normalisation factor applied to the upload (`g'_i = scale · g_i`).
    pub scale: f64,
    /// `φ_i = cos(g'_i, u)`, in [-1, 1]; 0 when absent, removed or zero.
    pub contribution: f64,
    /// `r_i^t`, its reputation after this round (signed; 0 once removed).
    pub reputation: f64,
    /// `q_i = r_i / max_j r_j` (signed; the reward uses `max(0, q_i)`).
    pub reward_ratio: f64,
}

/// The outcome of one RFFL round: the aggregate `u`, every participant's scores and the rewards.
#[derive(Debug, Clone)]
pub struct RfflRound {
    round: u64,
    mode: Mode,
    sparsify: bool,
    manifest: Arc<ModelManifest>,
    aggregate: Vec<Vec<f64>>,
    aggregate_norm: f64,
    clients: BTreeMap<ClientId, ClientRound>,
    removed: Vec<ClientId>,
    ignored: Vec<ClientId>,
    threshold: Option<f64>,
}

impl RfflRound {
    /// The round index `t` (0 for the first round).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The manifest of the updates.
    pub fn manifest(&self) -> &Arc<ModelManifest> {
        &self.manifest
    }

    /// `u` for tensor `i`, in f64, with the tensor's element count: `Σ a_i g'_i` for `mean`
    /// tensors, the maximum / lowest client's value of the accepted deltas for `max` / `first`
    /// tensors. **Empty** for `skip` tensors (not aggregated).
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn aggregate_tensor(&self, i: usize) -> &[f64] {
        &self.aggregate[i]
    }

    /// `‖u‖` over the `mean` tensors.
    pub fn aggregate_norm(&self) -> f64 {
        self.aggregate_norm
    }

    /// `u` as a delta in the manifest's dtypes (zeros for `skip` tensors).
    ///
    /// # Errors
    /// None in practice ([`RfflError::ManifestMismatch`] guards the shapes).
    pub fn aggregate(&self) -> Result<Parameters, RfflError> {
        self.parameters(|_, u| u.to_vec())
    }

    /// Every participant's outcome, in `ClientId` order.
    pub fn clients(&self) -> &BTreeMap<ClientId, ClientRound> {
        &self.clients
    }

    /// One participant's outcome.
    pub fn client(&self, id: &ClientId) -> Option<&ClientRound> {
        self.clients.get(id)
    }

    /// Participants removed in this round, in `ClientId` order.
    pub fn removed(&self) -> &[ClientId] {
        &self.removed
    }

    /// Updates of this cohort that were ignored (removed or unknown senders), in `ClientId` order.
    pub fn ignored(&self) -> &[ClientId] {
        &self.ignored
    }

    /// `β_t = rth / |R_{t-1}|` when removal ran this round (`None` during the warm-up).
    pub fn threshold(&self) -> Option<f64> {
        self.threshold
    }

    /// The reward gradient `v_i` of participant `client` as a delta in the manifest's dtypes:
    /// each `mean` tensor (layer) of `u` sparsified to its top-`max(0, q_i)` entries by
    /// [`sparsify_layer`] in this round's [`Mode`] (the whole of `u` when sparsification is off),
    /// `max`/`first` tensors as in `u`, zeros for `skip` tensors. A removed participant gets zeros.
    ///
    /// # Errors
    /// [`RfflError::UnknownClient`] if `client` is not a participant.
    pub fn reward(&self, client: &ClientId) -> Result<Parameters, RfflError> {
        let c = *self.clients.get(client).ok_or_else(|| RfflError::UnknownClient(client.clone()))?;
        let (mode, sparsify) = (self.mode, self.sparsify);
        self.parameters(|policy, u| {
            if !c.reputable {
                vec![0.0; u.len()]
            } else if policy == AggregationPolicy::Mean && sparsify {
                sparsify_layer(u, c.reward_ratio, mode)
            } else {
                u.to_vec()
            }
        })
    }

    fn parameters(
        &self,
        mut f: impl FnMut(AggregationPolicy, &[f64]) -> Vec<f64>,
    ) -> Result<Parameters, RfflError> {
        let values: Vec<Vec<f64>> = self
            .manifest
            .tensors()
            .iter()
            .zip(&self.aggregate)
            .map(|(spec, u)| {
                if spec.policy == AggregationPolicy::Skip {
                    vec![0.0; spec.numel()]
                } else {
                    f(spec.policy, u)
                }
            })
            .collect();
        Parameters::from_f64(Arc::clone(&self.manifest), &values)
            .map_err(|_| RfflError::ManifestMismatch("aggregate does not fit the manifest"))
    }

    /// `global + u` for every tensor but `skip` ones (which keep the global value).
    fn apply_to(&self, global: &Parameters) -> Result<Parameters> {
        let mut out = global.clone();
        for (i, (spec, u)) in self.manifest.tensors().iter().zip(&self.aggregate).enumerate() {
            if spec.policy == AggregationPolicy::Skip {
                continue;
            }
            let g = global.tensor(i);
            out.write_tensor_f64(i, u.iter().enumerate().map(|(e, v)| g.get_f64(e) + v));
        }
        if let Err(crate::tensor::ValidationError::NonFinite { name, .. }) =
            crate::tensor::check_finite(global.manifest(), out.as_bytes())
        {
            return Err(Error::NonFiniteResult(name));
        }
        Ok(out)
    }
}

/// The result of [`update_reputations`], on participants in the caller's order.
#[derive(Debug, Clone, PartialEq)]
pub struct ReputationUpdate {
    /// `r^t` (signed; 0 for removed participants).
    pub reputations: Vec<f64>,
    /// Membership of `R_t`.
    pub reputable: Vec<bool>,
    /// Positions removed this round.
    pub removed: Vec<usize>,
    /// `q^t = r^t / max_j r^t_j` (signed).
    pub reward_ratios: Vec<f64>,
    /// `β_t` when removal ran.
    pub threshold: Option<f64>,
}

/// The server's reputation arithmetic of round `round` (`algorithms.md` §A.2 steps 5–8 and the
/// optional altruism step §A.6-4), on participants in a fixed order:
///
/// `r̃_i = α r_i^{t-1} + (1-α) φ_i` for reputable `i` (0 otherwise); `r = r̃ / Σ r̃`; when
/// `round ≥ warmup_rounds`, every reputable `i` with `r_i < rth / |R_{t-1}|` is removed (β computed
/// once, strict inequality) and `r` renormalised; then the altruism transform if configured;
/// finally `q = r / max r`.
///
/// # Errors
/// [`RfflError::NonPositiveReputationSum`] when a normalising sum is ≤ 0 or not finite;
/// [`RfflError::NonPositiveMaxReputation`] when `max r ≤ 0`.
///
/// # Panics
/// If the three slices have different lengths.
pub fn update_reputations(
    config: &RfflConfig,
    round: u64,
    previous: &[f64],
    reputable: &[bool],
    contributions: &[f64],
) -> Result<ReputationUpdate, RfflError> {
    assert!(previous.len() == reputable.len() && previous.len() == contributions.len());
    let alpha = config.alpha;
    let mut r: Vec<f64> = (0..previous.len())
        .map(|i| if reputable[i] { alpha * previous[i] + (1.0 - alpha) * contributions[i] } else { 0.0 })
        .collect();
    normalise_sum(&mut r, round)?;
    let mut still = reputable.to_vec();
    let mut removed = Vec::new();
    let mut threshold = None;
    if round >= config.warmup_rounds {
        let members = reputable.iter().filter(|&&b| b).count().max(1);
        let beta = config.rth / members as f64;
        threshold = Some(beta);
        for i in 0..r.len() {
            if still[i] && r[i] < beta {
                still[i] = false;
                r[i] = 0.0;
                removed.push(i);
            }
        }
        normalise_sum(&mut r, round)?;
    }
    if let Some(degree) = config.altruism_degree {
        normalise_max(&mut r, round)?;
        r.iter_mut().for_each(|v| *v = (degree * *v).tanh());
        normalise_max(&mut r, round)?;
    }
    let mut reward_ratios = r.clone();
    normalise_max(&mut reward_ratios, round)?;
    Ok(ReputationUpdate { reputations: r, reputable: still, removed, reward_ratios, threshold })
}

fn normalise_sum(r: &mut [f64], round: u64) -> Result<(), RfflError> {
    let sum: f64 = r.iter().sum();
    if !(sum > 0.0 && sum.is_finite()) {
        return Err(RfflError::NonPositiveReputationSum { round, sum });
    }
    r.iter_mut().for_each(|v| *v /= sum);
    Ok(())
}

fn normalise_max(r: &mut [f64], round: u64) -> Result<(), RfflError> {
    let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !(max > 0.0 && max.is_finite()) {
        return Err(RfflError::NonPositiveMaxReputation { round, max });
    }
    r.iter_mut().for_each(|v| *v /= max);
    Ok(())
}

/// The factor an upload of norm `norm` is multiplied by before aggregation (§A.2 step 1):
/// reference code `Γ / (‖g‖ + 1e-7)` if `‖g‖ + 1e-7 > Γ`, else 1; paper `Γ / ‖g‖` (1 for a zero
/// upload, which stays zero).
pub fn upload_scale(mode: Mode, gamma: f64, norm: f64) -> f64 {
    match mode {
        Mode::ReferenceCode if norm + CLIP_EPSILON > gamma => gamma / (norm + CLIP_EPSILON),
        Mode::ReferenceCode => 1.0,
        Mode::Paper if norm > 0.0 => gamma / norm,
        Mode::Paper => 1.0,
    }
}

/// `φ = ⟨g, u⟩ / max(‖g‖·‖u‖, 1e-10)` (§A.2 step 4): 0 when either vector is zero, never NaN.
pub fn contribution(dot: f64, norm_g: f64, norm_u: f64) -> f64 {
    dot / (norm_g * norm_u).max(COSINE_EPSILON)
}

/// `k = ⌈d · max(0, q)⌉`, clamped to `[0, d]`, computed with a relative tolerance of 1e-9 so
/// that floating-point products just above an integer do not round up (`100 × 0.07` =
/// 7.000000000000001 gives 7, not 8; §A.7). NaN gives 0.
pub fn reward_count(d: usize, q: f64) -> usize {
    if q.is_nan() || q <= 0.0 {
        return 0;
    }
    if q >= 1.0 {
        return d;
    }
    let x = d as f64 * q;
    let nearest = x.round();
    let k = if nearest >= 1.0 && (x - nearest).abs() <= 1e-9 * x { nearest } else { x.ceil() };
    (k as usize).min(d)
}

/// The reward of one layer (§A.2 step 9): `u` with all but its largest-magnitude entries set to
/// zero, keeping `k = reward_count(d, q)` of them (none when `q ≤ 0`).
///
/// - [`Mode::ReferenceCode`]: τ = the `k' = min(k, d − 1)`-th largest `|u|`; every entry with
///   `|u| ≥ τ` is kept, **ties at τ included** (so more than `k'` entries may survive). A layer
///   with `d = 1` keeps its entry (the reference code crashes there).
/// - [`Mode::Paper`]: exactly the `k` largest `|u|`, ties broken by the **lower index**.
///
/// Costs O(d) time and one O(d) scratch allocation (selection, no sort).
pub fn sparsify_layer(u: &[f64], q: f64, mode: Mode) -> Vec<f64> {
    let d = u.len();
    let k = reward_count(d, q);
    if k == 0 {
        return vec![0.0; d];
    }
    match mode {
        Mode::ReferenceCode => {
            if d == 1 {
                return u.to_vec();
            }
            let kp = k.min(d - 1);
            let mut mags: Vec<f64> = u.iter().map(|v| v.abs()).collect();
            let (_, tau, _) = mags.select_nth_unstable_by(kp - 1, |a, b| b.total_cmp(a));
            let tau = *tau;
            u.iter().map(|&v| if v.abs() >= tau { v } else { 0.0 }).collect()
        }
        Mode::Paper => {
            if k >= d {
                return u.to_vec();
            }
            let mut idx: Vec<usize> = (0..d).collect();
            idx.select_nth_unstable_by(k - 1, |&a, &b| u[b].abs().total_cmp(&u[a].abs()).then(a.cmp(&b)));
            let mut out = vec![0.0; d];
            for &e in &idx[..k] {
                out[e] = u[e];
            }
            out
        }
    }
}

/// Pearson's correlation coefficient, RFFL's fairness metric (maintainer, issue #5): between
/// the participants' standalone accuracies `x` and their accuracies after collaboration `y`.
/// `None` when the lengths differ, there are fewer than two points, or a variance is zero (as
/// for FedAvg, where everyone gets the same model).
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 {
        return None;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let den = (sxx * syy).sqrt();
    (den > 0.0 && den.is_finite()).then(|| sxy / den)
}

/// RFFL's server state: reputations, the reputable set and the round counter, keyed by
/// [`ClientId`]. Implements [`Strategy`] as a whole-cohort strategy (see the module docs for the
/// server model).
#[derive(Debug)]
pub struct Rffl {
    config: RfflConfig,
    round: u64,
    participants: BTreeMap<ClientId, Participant>,
    manifest: Option<Arc<ModelManifest>>,
    last: Option<RfflRound>,
}

/// A computed but not yet committed round.
struct Pending {
    round: RfflRound,
    participants: BTreeMap<ClientId, Participant>,
    manifest: Arc<ModelManifest>,
}

fn same_manifest(a: &ModelManifest, b: &ModelManifest) -> bool {
    std::ptr::eq(a, b) || a == b
}

fn view<'a>(u: &UpdateView<'a>, i: usize) -> Result<TensorData<'a>, RfflError> {
    u.tensor(i).map_err(|_| RfflError::Misaligned(u.manifest.tensors()[i].name.clone()))
}

impl Rffl {
    /// A fresh RFFL server: no participant yet, round 0. The participants are the clients of the
    /// first cohort given to [`Self::step`] (or `aggregate_cohort`).
    ///
    /// # Errors
    /// [`RfflError::InvalidConfig`] for out-of-range hyperparameters.
    pub fn new(config: RfflConfig) -> Result<Rffl, RfflError> {
        config.validate()?;
        Ok(Rffl { config, round: 0, participants: BTreeMap::new(), manifest: None, last: None })
    }

    /// The configuration.
    pub fn config(&self) -> &RfflConfig {
        &self.config
    }

    /// The index of the next round (the number of rounds committed so far).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Every participant's state, in `ClientId` order (empty before round 0).
    pub fn participants(&self) -> &BTreeMap<ClientId, Participant> {
        &self.participants
    }

    /// The reputation `r_i` of `client` after the last round.
    pub fn reputation(&self, client: &ClientId) -> Option<f64> {
        self.participants.get(client).map(|p| p.reputation)
    }

    /// The last round committed by `aggregate_cohort` (for serving rewards). [`Self::step`]
    /// returns its round instead of keeping it.
    pub fn last_round(&self) -> Option<&RfflRound> {
        self.last.as_ref()
    }

    /// Runs one round on `cohort` (deltas) and commits the new reputations, reputable set and
    /// round counter. Updates are read in place, twice each (see the module docs).
    ///
    /// # Errors
    /// Input errors ([`RfflError::EmptyCohort`], [`RfflError::DuplicateClient`],
    /// [`RfflError::InvalidWeight`], [`RfflError::ManifestMismatch`], [`RfflError::Misaligned`]),
    /// [`RfflError::NonPositiveShareSum`] in round 0, [`RfflError::NoReputableUpdate`], and the
    /// normalisation errors of [`update_reputations`]. On error nothing is committed.
    pub fn step(&mut self, cohort: &[UpdateView<'_>]) -> Result<RfflRound, RfflError> {
        let pending = self.compute(cohort)?;
        Ok(self.commit(pending, false))
    }

    fn commit(&mut self, p: Pending, keep: bool) -> RfflRound {
        self.participants = p.participants;
        self.manifest = Some(p.manifest);
        self.round += 1;
        if keep {
            self.last = Some(p.round.clone());
        }
        p.round
    }

    #[allow(clippy::too_many_lines)] // TEMP: the functions branch splits it
    fn compute(&self, cohort: &[UpdateView<'_>]) -> Result<Pending, RfflError> {
        let first = cohort.first().ok_or(RfflError::EmptyCohort)?;
        let manifest = match &self.manifest {
            Some(m) => Arc::clone(m),
            None => Arc::new(first.manifest.clone()),
        };
        let mut by_client: BTreeMap<&ClientId, usize> = BTreeMap::new();
        for (k, u) in cohort.iter().enumerate() {
            if !same_manifest(u.manifest, &manifest) {
                return Err(RfflError::ManifestMismatch("an update does not match the job's manifest"));
            }
            if !(u.weight.is_finite() && u.weight >= 0.0) {
                return Err(RfflError::InvalidWeight { client: u.client.clone(), weight: u.weight });
            }
            if by_client.insert(u.client, k).is_some() {
                return Err(RfflError::DuplicateClient(u.client.clone()));
            }
            for i in 0..manifest.tensors().len() {
                view(u, i)?;
            }
        }
        let t = self.round;
        let mut participants = if self.participants.is_empty() {
            let total: f64 = by_client.values().map(|&k| cohort[k].weight).sum();
            if !(total > 0.0 && total.is_finite()) {
                return Err(RfflError::NonPositiveShareSum(total));
            }
            by_client
                .iter()
                .map(|(c, &k)| {
                    let p = Participant {
                        share: cohort[k].weight / total,
                        reputation: 0.0,
                        reputable: true,
                        removed_in: None,
                    };
                    ((*c).clone(), p)
                })
                .collect()
        } else {
            self.participants.clone()
        };
        let ignored: Vec<ClientId> = by_client
            .keys()
            .filter(|c| participants.get(**c).is_none_or(|p| !p.reputable))
            .map(|c| (*c).clone())
            .collect();

        // Accepted updates: (participant position, cohort index), in ClientId order.
        let ids: Vec<ClientId> = participants.keys().cloned().collect();
        let accepted: Vec<(usize, usize)> = ids
            .iter()
            .enumerate()
            .filter(|(_, c)| participants[*c].reputable)
            .filter_map(|(p, c)| by_client.get(c).map(|&k| (p, k)))
            .collect();
        if accepted.is_empty() {
            return Err(RfflError::NoReputableUpdate { ignored: ignored.len() });
        }

        // Pass 1: squared norms over the mean tensors.
        let mean: Vec<usize> = (0..manifest.tensors().len())
            .filter(|&i| manifest.tensors()[i].policy == AggregationPolicy::Mean)
            .collect();
        let mut norm_sq = vec![0.0f64; accepted.len()];
        let mut views: Vec<TensorData<'_>> = Vec::with_capacity(accepted.len());
        for &i in &mean {
            views.clear();
            for &(_, k) in &accepted {
                views.push(view(&cohort[k], i)?);
            }
            scan::visit(&views, scan::SumSq { out: &mut norm_sq });
        }

        // Scales and aggregation weights; non-finite uploads count as zero uploads.
        let cfg = &self.config;
        let n_acc = accepted.len();
        let mut finite = vec![true; n_acc];
        let mut norm = vec![0.0; n_acc];
        let mut scale = vec![1.0; n_acc];
        let mut weight = vec![0.0; n_acc];
        let mut fold_weight = vec![0.0; n_acc];
        for (a, &(p, _)) in accepted.iter().enumerate() {
            let part = &participants[&ids[p]];
            weight[a] = if t == 0 { part.share } else { part.reputation.max(0.0) };
            if !norm_sq[a].is_finite() {
                finite[a] = false;
                continue;
            }
            norm[a] = norm_sq[a].sqrt();
            scale[a] = upload_scale(cfg.mode, cfg.gamma, norm[a]);
            fold_weight[a] = weight[a] * scale[a];
        }
        let live: Vec<usize> = (0..n_acc).filter(|&a| finite[a]).collect();

        // Pass 2: u = Σ a_i c_i g_i tile by tile, with every update's dot product with u.
        let mut aggregate: Vec<Vec<f64>> = Vec::with_capacity(manifest.tensors().len());
        let mut dots = vec![0.0f64; live.len()];
        let live_weights: Vec<f64> = live.iter().map(|&a| fold_weight[a]).collect();
        let mut u_sq = 0.0f64;
        for (i, spec) in manifest.tensors().iter().enumerate() {
            let numel = manifest.slots()[i].numel;
            views.clear();
            for &a in &live {
                views.push(view(&cohort[accepted[a].1], i)?);
            }
            let u = match spec.policy {
                AggregationPolicy::Mean => {
                    let mut u = vec![0.0f64; numel];
                    scan::visit(
                        &views,
                        scan::FoldDot { u: &mut u, weights: &live_weights, dots: &mut dots, u_sq: &mut u_sq },
                    );
                    u
                }
                AggregationPolicy::Max => {
                    let mut u = vec![f64::NEG_INFINITY; numel];
                    views.iter().for_each(|v| crate::kernels::max_assign(&mut u, *v));
                    if views.is_empty() {
                        u.fill(0.0);
                    }
                    u
                }
                AggregationPolicy::First => {
                    let mut u = vec![0.0f64; numel];
                    if let Some(v) = views.first() {
                        crate::kernels::assign(&mut u, *v);
                    }
                    u
                }
                AggregationPolicy::Skip => Vec::new(),
            };
            aggregate.push(u);
        }
        let u_norm = u_sq.sqrt();

        // Contributions per participant (0 for absent, removed and non-finite).
        let mut phi = vec![0.0f64; ids.len()];
        let mut acc_of = vec![None; ids.len()];
        for (a, &(p, _)) in accepted.iter().enumerate() {
            acc_of[p] = Some(a);
        }
        for (l, &a) in live.iter().enumerate() {
            phi[accepted[a].0] = contribution(scale[a] * dots[l], scale[a] * norm[a], u_norm);
        }
        let previous: Vec<f64> = ids.iter().map(|c| participants[c].reputation).collect();
        let reputable: Vec<bool> = ids.iter().map(|c| participants[c].reputable).collect();
        let upd = update_reputations(cfg, t, &previous, &reputable, &phi)?;

        let mut clients = BTreeMap::new();
        for (p, id) in ids.iter().enumerate() {
            let a = acc_of[p];
            let part = participants.get_mut(id).ok_or_else(|| RfflError::UnknownClient(id.clone()))?;
            part.reputation = upd.reputations[p];
            part.reputable = upd.reputable[p];
            if reputable[p] && !upd.reputable[p] {
                part.removed_in = Some(t);
            }
            clients.insert(
                id.clone(),
                ClientRound {
                    present: by_client.contains_key(id),
                    non_finite: a.is_some_and(|a| !finite[a]),
                    reputable: upd.reputable[p],
                    weight: a.map_or(0.0, |a| weight[a]),
                    norm: a.map_or(0.0, |a| norm[a]),
                    scale: a.map_or(1.0, |a| scale[a]),
                    contribution: phi[p],
                    reputation: upd.reputations[p],
                    reward_ratio: upd.reward_ratios[p],
                },
            );
        }
        let removed = upd.removed.iter().map(|&p| ids[p].clone()).collect();
        let round = RfflRound {
            round: t,
            mode: cfg.mode,
            sparsify: cfg.sparsify,
            manifest: Arc::clone(&manifest),
            aggregate,
            aggregate_norm: u_norm,
            clients,
            removed,
            ignored,
            threshold: upd.threshold,
        };
        Ok(Pending { round, participants, manifest })
    }
}

impl Strategy for Rffl {
    fn name(&self) -> &'static str {
        "rffl"
    }

    /// The last committed round's reward for `client`: the top-q_i sparsified aggregate delta,
    /// to add to the client's own model.
    fn client_reward(&self, client: &ClientId) -> Option<Result<Parameters>> {
        let round = self.last_round()?;
        Some(round.reward(client).map_err(crate::Error::from))
    }

    fn mergeability(&self) -> Mergeability {
        Mergeability::WholeCohort
    }

    fn finish(&mut self, _partial: &PartialAggregate, _global: &Parameters) -> Result<Parameters> {
        Err(Error::NotStreaming("rffl"))
    }

    /// One RFFL round on `cohort` (deltas): returns `global + u` (`skip` tensors keep the global
    /// value) and keeps the round for [`Rffl::last_round`]. The state is committed only when the
    /// new model is finite.
    ///
    /// # Errors
    /// As [`Rffl::step`] (mapped by `From<RfflError> for Error`), [`Error::ManifestMismatch`] if
    /// the global model's manifest differs, [`Error::NonFiniteResult`] on overflow.
    fn aggregate_cohort(&mut self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Parameters> {
        if cohort.iter().any(|u| !same_manifest(u.manifest, global.manifest())) {
            return Err(Error::ManifestMismatch("update and global model come from different manifests"));
        }
        let pending = self.compute(cohort)?;
        let out = pending.round.apply_to(global)?;
        self.commit(pending, true);
        Ok(out)
    }
}

/// Zero-copy, blocked scans over the cohort's tensors, shared by RFFL and Bristle: a typed
/// dispatch over [`TensorData`] and f64-accumulating kernels with eight independent lanes per
/// update (AVX2 when the CPU has it; f32 updates are read four at a time, which gives the memory
/// system several streams). Results do not depend on the CPU path: both run
/// the same operations in the same order.
pub(crate) mod scan {
    use half::{bf16, f16};

    use crate::tensor::TensorData;

    /// Elements per tile of the tiled passes: 4 Ki elements, so 20 f32 update tiles (320 KiB)
    /// and the f64 aggregate tile (32 KiB) stay in L2 between the fold and the dot products.
    pub(crate) const TILE: usize = 4096;

    /// An element type that decodes to f64.
    pub(crate) trait Elem: Copy + Send + Sync + 'static {
        /// The value in f64 (exact except for 64-bit integers beyond 2^53).
        fn to_f64(self) -> f64;
        /// The typed slice of a view of this dtype.
        fn slice(t: TensorData<'_>) -> Option<&[Self]>;
        /// `acc += Σ_k w_k x_k`, updates in order.
        fn fold(acc: &mut [f64], xs: &[(&[Self], f64)]) {
            for (x, w) in xs {
                axpy(acc, x, *w);
            }
        }
        /// `Σ x²` (overridden by f32 with explicit AVX2 code).
        fn sum_sq(x: &[Self]) -> f64 {
            generic_sum_sq(x)
        }
        /// `Σ x·u` over the common length.
        fn dot(x: &[Self], u: &[f64]) -> f64 {
            generic_dot(x, u)
        }
        /// `Σ (x − o)²` over the common length.
        fn dist_sq(x: &[Self], o: &[f64]) -> f64 {
            generic_dist_sq(x, o)
        }
        /// `out[k] += Σ xs[k]²` for every update `k`; same result as [`Self::sum_sq`] each.
        fn sum_sq_many(xs: &[&[Self]], out: &mut [f64]) {
            for (o, x) in out.iter_mut().zip(xs) {
                *o += Self::sum_sq(x);
            }
        }
        /// `out[k] += ⟨xs[k], u⟩` for every update `k`; same result as [`Self::dot`] each.
        fn dot_many(xs: &[&[Self]], u: &[f64], out: &mut [f64]) {
            for (d, x) in out.iter_mut().zip(xs) {
                *d += Self::dot(x, u);
            }
        }
        /// `out[k] += Σ (xs[k] − o)²` for every update `k`; same result as [`Self::dist_sq`] each.
        fn dist_sq_many(xs: &[&[Self]], o: &[f64], out: &mut [f64]) {
            for (d, x) in out.iter_mut().zip(xs) {
                *d += Self::dist_sq(x, o);
            }
        }
    }

    impl Elem for f32 {
        #[inline(always)]
        fn to_f64(self) -> f64 {
            f64::from(self)
        }
        fn slice(t: TensorData<'_>) -> Option<&[f32]> {
            match t {
                TensorData::F32(x) => Some(x),
                _ => None,
            }
        }
        fn fold(acc: &mut [f64], xs: &[(&[f32], f64)]) {
            crate::kernels::fold_f32_tiled(acc, xs);
        }
        fn sum_sq(x: &[f32]) -> f64 {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement
                // of the target-feature function.
                return unsafe { avx2_f32::sum_sq(x) };
            }
            sum_sq_body(x)
        }
        fn dot(x: &[f32], u: &[f64]) -> f64 {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2 and FMA are available (checked just above).
                return unsafe { avx2_f32::dot(x, u) };
            }
            dot_body(x, u)
        }
        fn dist_sq(x: &[f32], o: &[f64]) -> f64 {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2 and FMA are available (checked just above).
                return unsafe { avx2_f32::dist_sq(x, o) };
            }
            dist_sq_body(x, o)
        }
        fn sum_sq_many(xs: &[&[f32]], out: &mut [f64]) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                let mut groups = xs.chunks_exact(4);
                let mut outs = out.chunks_exact_mut(4);
                for (g, o) in (&mut groups).zip(&mut outs) {
                    // SAFETY: AVX2 and FMA are available (checked just above).
                    let r = unsafe { avx2_f32::sum_sq4([g[0], g[1], g[2], g[3]]) };
                    o.iter_mut().zip(r).for_each(|(o, r)| *o += r);
                }
                for (o, x) in outs.into_remainder().iter_mut().zip(groups.remainder()) {
                    *o += Self::sum_sq(x);
                }
                return;
            }
            for (o, x) in out.iter_mut().zip(xs) {
                *o += Self::sum_sq(x);
            }
        }
        fn dot_many(xs: &[&[f32]], u: &[f64], out: &mut [f64]) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                let mut groups = xs.chunks_exact(4);
                let mut outs = out.chunks_exact_mut(4);
                for (g, o) in (&mut groups).zip(&mut outs) {
                    // SAFETY: AVX2 and FMA are available (checked just above).
                    let r = unsafe { avx2_f32::dot4([g[0], g[1], g[2], g[3]], u) };
                    o.iter_mut().zip(r).for_each(|(o, r)| *o += r);
                }
                for (o, x) in outs.into_remainder().iter_mut().zip(groups.remainder()) {
                    *o += Self::dot(x, u);
                }
                return;
            }
            for (d, x) in out.iter_mut().zip(xs) {
                *d += Self::dot(x, u);
            }
        }
        fn dist_sq_many(xs: &[&[f32]], ref_: &[f64], out: &mut [f64]) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                let mut groups = xs.chunks_exact(4);
                let mut outs = out.chunks_exact_mut(4);
                for (g, o) in (&mut groups).zip(&mut outs) {
                    // SAFETY: AVX2 and FMA are available (checked just above).
                    let r = unsafe { avx2_f32::dist_sq4([g[0], g[1], g[2], g[3]], ref_) };
                    o.iter_mut().zip(r).for_each(|(o, r)| *o += r);
                }
                for (o, x) in outs.into_remainder().iter_mut().zip(groups.remainder()) {
                    *o += Self::dist_sq(x, ref_);
                }
                return;
            }
            for (d, x) in out.iter_mut().zip(xs) {
                *d += Self::dist_sq(x, ref_);
            }
        }
    }

    macro_rules! elem {
        ($t:ty, $variant:ident, $conv:expr) => {
            impl Elem for $t {
                #[inline(always)]
                fn to_f64(self) -> f64 {
                    $conv(self)
                }
                fn slice(t: TensorData<'_>) -> Option<&[$t]> {
                    match t {
                        TensorData::$variant(x) => Some(x),
                        _ => None,
                    }
                }
            }
        };
    }
    elem!(f64, F64, |v: f64| v);
    elem!(f16, F16, |v: f16| v.to_f64());
    elem!(bf16, BF16, |v: bf16| v.to_f64());
    elem!(i64, I64, |v: i64| v as f64);
    elem!(i32, I32, f64::from);
    elem!(i16, I16, f64::from);
    elem!(i8, I8, f64::from);
    elem!(u64, U64, |v: u64| v as f64);
    elem!(u32, U32, f64::from);
    elem!(u16, U16, f64::from);
    elem!(u8, U8, f64::from);

    /// A computation over the typed slices of one tensor of several updates.
    pub(crate) trait Visitor {
        /// The result.
        type Out;
        /// Runs on slices of one element type (all of the tensor's length).
        fn visit<T: Elem>(self, xs: &[&[T]]) -> Self::Out;
    }

    fn typed<'a, T: Elem>(views: &[TensorData<'a>]) -> Vec<&'a [T]> {
        views.iter().filter_map(|v| T::slice(*v)).collect()
    }

    /// Runs `v` on `views`, which must all have one dtype (they come from one manifest tensor);
    /// views of another dtype than the first are skipped.
    pub(crate) fn visit<V: Visitor>(views: &[TensorData<'_>], v: V) -> V::Out {
        match views.first() {
            None | Some(TensorData::F32(_)) => v.visit(&typed::<f32>(views)),
            Some(TensorData::F64(_)) => v.visit(&typed::<f64>(views)),
            Some(TensorData::F16(_)) => v.visit(&typed::<f16>(views)),
            Some(TensorData::BF16(_)) => v.visit(&typed::<bf16>(views)),
            Some(TensorData::I64(_)) => v.visit(&typed::<i64>(views)),
            Some(TensorData::I32(_)) => v.visit(&typed::<i32>(views)),
            Some(TensorData::I16(_)) => v.visit(&typed::<i16>(views)),
            Some(TensorData::I8(_)) => v.visit(&typed::<i8>(views)),
            Some(TensorData::U64(_)) => v.visit(&typed::<u64>(views)),
            Some(TensorData::U32(_)) => v.visit(&typed::<u32>(views)),
            Some(TensorData::U16(_)) => v.visit(&typed::<u16>(views)),
            Some(TensorData::U8(_)) => v.visit(&typed::<u8>(views)),
        }
    }

    /// Decodes `x[start..start + out.len()]` of one view into `out`.
    pub(crate) struct Decode<'o> {
        /// First element.
        pub start: usize,
        /// Destination.
        pub out: &'o mut [f64],
    }

    impl Visitor for Decode<'_> {
        type Out = ();
        fn visit<T: Elem>(self, xs: &[&[T]]) {
            if let Some(x) = xs.first() {
                for (o, v) in self.out.iter_mut().zip(&x[self.start..]) {
                    *o = v.to_f64();
                }
            }
        }
    }

    /// `out[k] += ‖x_k‖²`.
    pub(crate) struct SumSq<'o> {
        /// One accumulator per view.
        pub out: &'o mut [f64],
    }

    impl Visitor for SumSq<'_> {
        type Out = ();
        fn visit<T: Elem>(self, xs: &[&[T]]) {
            T::sum_sq_many(xs, self.out);
        }
    }

    /// Tile by tile: `u += Σ_k w_k x_k` (zero weights skipped), then `dots[k] += ⟨x_k, u⟩` and
    /// `u_sq += ‖u‖²` on the finished tile.
    pub(crate) struct FoldDot<'o> {
        /// The aggregate (zeroed by the caller).
        pub u: &'o mut [f64],
        /// One weight per view.
        pub weights: &'o [f64],
        /// One dot accumulator per view.
        pub dots: &'o mut [f64],
        /// `‖u‖²` accumulator.
        pub u_sq: &'o mut f64,
    }

    impl Visitor for FoldDot<'_> {
        type Out = ();
        fn visit<T: Elem>(self, xs: &[&[T]]) {
            let n = self.u.len();
            let mut pairs: Vec<(&[T], f64)> = Vec::with_capacity(xs.len());
            let mut tiles: Vec<&[T]> = Vec::with_capacity(xs.len());
            let mut start = 0;
            while start < n {
                let end = (start + TILE).min(n);
                let tile = &mut self.u[start..end];
                pairs.clear();
                pairs.extend(
                    xs.iter()
                        .zip(self.weights)
                        .filter(|(_, w)| **w != 0.0)
                        .map(|(x, w)| (&x[start..end], *w)),
                );
                T::fold(tile, &pairs);
                tiles.clear();
                tiles.extend(xs.iter().map(|x| &x[start..end]));
                T::dot_many(&tiles, tile, self.dots);
                *self.u_sq += sum_sq(tile);
                start = end;
            }
        }
    }

    /// `out[k] += ‖x_k − o‖²` tile by tile, with `o[e] = reference[e] − base[e]` decoded one
    /// tile at a time (`base` absent means 0).
    pub(crate) struct DistSq<'o, 'v> {
        /// One accumulator per view.
        pub out: &'o mut [f64],
        /// The reference tensor.
        pub reference: TensorData<'v>,
        /// The base the updates are deltas from, if they are deltas.
        pub base: Option<TensorData<'v>>,
    }

    impl Visitor for DistSq<'_, '_> {
        type Out = ();
        fn visit<T: Elem>(self, xs: &[&[T]]) {
            let n = xs.first().map_or(0, |x| x.len());
            let mut tiles: Vec<&[T]> = Vec::with_capacity(xs.len());
            let mut o = vec![0.0f64; TILE.min(n)];
            let mut b = vec![0.0f64; if self.base.is_some() { TILE.min(n) } else { 0 }];
            let mut start = 0;
            while start < n {
                let end = (start + TILE).min(n);
                let o = &mut o[..end - start];
                visit(&[self.reference], Decode { start, out: o });
                if let Some(base) = self.base {
                    let b = &mut b[..end - start];
                    visit(&[base], Decode { start, out: b });
                    o.iter_mut().zip(b.iter()).for_each(|(o, b)| *o -= b);
                }
                tiles.clear();
                tiles.extend(xs.iter().map(|x| &x[start..end]));
                T::dist_sq_many(&tiles, o, self.out);
                start = end;
            }
        }
    }

    /// Independent f64 accumulators per update: two AVX2 registers, enough to hide the add
    /// latency at memory speed, and few enough that four updates can be read at once.
    const LANES: usize = 8;

    /// Pairwise sum of the lanes, in a fixed order, plus the scalar tail.
    #[inline(always)]
    fn lanes_sum(l: [f64; LANES], tail: f64) -> f64 {
        let mut w = l;
        let mut n = LANES;
        while n > 1 {
            n /= 2;
            for k in 0..n {
                w[k] += w[k + n];
            }
        }
        w[0] + tail
    }

    #[inline(always)]
    fn sum_sq_body<T: Elem>(x: &[T]) -> f64 {
        let mut l = [0.0f64; LANES];
        let (chunks, rest) = x.as_chunks::<LANES>();
        for c in chunks {
            for k in 0..LANES {
                let v = c[k].to_f64();
                l[k] += v * v;
            }
        }
        let tail = rest.iter().map(|v| v.to_f64() * v.to_f64()).fold(0.0, |a, b| a + b);
        lanes_sum(l, tail)
    }

    #[inline(always)]
    fn dot_body<T: Elem>(x: &[T], u: &[f64]) -> f64 {
        let n = x.len().min(u.len());
        let (x, u) = (&x[..n], &u[..n]);
        let mut l = [0.0f64; LANES];
        let (xc, xt) = x.as_chunks::<LANES>();
        let (uc, ut) = u.as_chunks::<LANES>();
        for (a, b) in xc.iter().zip(uc) {
            for k in 0..LANES {
                l[k] += a[k].to_f64() * b[k];
            }
        }
        let tail = xt.iter().zip(ut).map(|(a, b)| a.to_f64() * b).fold(0.0, |a, b| a + b);
        lanes_sum(l, tail)
    }

    #[inline(always)]
    fn dist_sq_body<T: Elem>(x: &[T], o: &[f64]) -> f64 {
        let n = x.len().min(o.len());
        let (x, o) = (&x[..n], &o[..n]);
        let mut l = [0.0f64; LANES];
        let (xc, xt) = x.as_chunks::<LANES>();
        let (oc, ot) = o.as_chunks::<LANES>();
        for (a, b) in xc.iter().zip(oc) {
            for k in 0..LANES {
                let d = a[k].to_f64() - b[k];
                l[k] += d * d;
            }
        }
        let tail =
            xt.iter().zip(ot).map(|(a, b)| (a.to_f64() - b) * (a.to_f64() - b)).fold(0.0, |a, b| a + b);
        lanes_sum(l, tail)
    }

    #[inline(always)]
    fn axpy_body<T: Elem>(acc: &mut [f64], x: &[T], w: f64) {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += w * v.to_f64();
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use super::Elem;

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn sum_sq<T: Elem>(x: &[T]) -> f64 {
            super::sum_sq_body(x)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn dot<T: Elem>(x: &[T], u: &[f64]) -> f64 {
            super::dot_body(x, u)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn dist_sq<T: Elem>(x: &[T], o: &[f64]) -> f64 {
            super::dist_sq_body(x, o)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn axpy<T: Elem>(acc: &mut [f64], x: &[T], w: f64) {
            super::axpy_body(acc, x, w)
        }
    }

    /// Explicit AVX2 kernels for f32 updates (LLVM vectorises the portable bodies with 128-bit
    /// registers only). Lane `4j + m` of the portable body is element `m` of register `j`, and
    /// every lane sees the same operations in the same order (no FMA contraction), so the results
    /// are bit-identical to the portable bodies, whether updates are read one or four at a time.
    #[cfg(target_arch = "x86_64")]
    mod avx2_f32 {
        use std::arch::x86_64::{
            __m256d, _mm256_add_pd, _mm256_cvtps_pd, _mm256_loadu_pd, _mm256_mul_pd, _mm256_setzero_pd,
            _mm256_storeu_pd, _mm256_sub_pd, _mm_loadu_ps,
        };

        use super::{lanes_sum, LANES};

        /// Registers per update.
        const REGS: usize = LANES / 4;

        /// Four f32 of `c` from `4j`, widened to f64.
        #[inline(always)]
        fn load_ps(c: &[f32; LANES], j: usize) -> __m256d {
            assert!(4 * j + 4 <= LANES);
            // SAFETY: `c` holds LANES floats and 4j + 4 <= LANES (asserted), so the four reads are
            // in bounds; `loadu` has no alignment requirement. AVX is enabled in every caller.
            unsafe { _mm256_cvtps_pd(_mm_loadu_ps(c.as_ptr().add(4 * j))) }
        }

        /// Four f64 of `c` from `4j`.
        #[inline(always)]
        fn load_pd(c: &[f64; LANES], j: usize) -> __m256d {
            assert!(4 * j + 4 <= LANES);
            // SAFETY: as `load_ps`, for f64.
            unsafe { _mm256_loadu_pd(c.as_ptr().add(4 * j)) }
        }

        #[inline(always)]
        fn finish(acc: [__m256d; REGS], tail: f64) -> f64 {
            let mut l = [0.0f64; LANES];
            for (j, a) in acc.iter().enumerate() {
                assert!(4 * j + 4 <= LANES);
                // SAFETY: `l` holds LANES f64 and 4j + 4 <= LANES (asserted).
                unsafe { _mm256_storeu_pd(l.as_mut_ptr().add(4 * j), *a) };
            }
            lanes_sum(l, tail)
        }

        #[inline(always)]
        fn sq_tail(rest: &[f32]) -> f64 {
            rest.iter().map(|&v| f64::from(v) * f64::from(v)).fold(0.0, |a, b| a + b)
        }

        #[inline(always)]
        fn dist_tail(x: &[f32], o: &[f64]) -> f64 {
            x.iter().zip(o).map(|(&a, b)| (f64::from(a) - b) * (f64::from(a) - b)).fold(0.0, |a, b| a + b)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn sum_sq(x: &[f32]) -> f64 {
            let (chunks, rest) = x.as_chunks::<LANES>();
            let mut acc = [_mm256_setzero_pd(); REGS];
            for c in chunks {
                for (j, a) in acc.iter_mut().enumerate() {
                    let v = load_ps(c, j);
                    *a = _mm256_add_pd(*a, _mm256_mul_pd(v, v));
                }
            }
            finish(acc, sq_tail(rest))
        }

        /// [`sum_sq`] of four updates of one length, read concurrently.
        #[target_feature(enable = "avx2,fma")]
        pub(super) fn sum_sq4(xs: [&[f32]; 4]) -> [f64; 4] {
            let n = xs.iter().map(|x| x.len()).min().unwrap_or(0);
            let split = xs.map(|x| x[..n].as_chunks::<LANES>());
            let mut acc = [[_mm256_setzero_pd(); REGS]; 4];
            for i in 0..split[0].0.len() {
                for (k, a) in acc.iter_mut().enumerate() {
                    let c = &split[k].0[i];
                    for (j, r) in a.iter_mut().enumerate() {
                        let v = load_ps(c, j);
                        *r = _mm256_add_pd(*r, _mm256_mul_pd(v, v));
                    }
                }
            }
            std::array::from_fn(|k| finish(acc[k], sq_tail(split[k].1)))
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn dot(x: &[f32], u: &[f64]) -> f64 {
            let n = x.len().min(u.len());
            let (xc, xt) = x[..n].as_chunks::<LANES>();
            let (uc, ut) = u[..n].as_chunks::<LANES>();
            let mut acc = [_mm256_setzero_pd(); REGS];
            for (a, b) in xc.iter().zip(uc) {
                for (j, s) in acc.iter_mut().enumerate() {
                    *s = _mm256_add_pd(*s, _mm256_mul_pd(load_ps(a, j), load_pd(b, j)));
                }
            }
            let tail = xt.iter().zip(ut).map(|(&a, b)| f64::from(a) * b).fold(0.0, |a, b| a + b);
            finish(acc, tail)
        }

        #[target_feature(enable = "avx2,fma")]
        pub(super) fn dist_sq(x: &[f32], o: &[f64]) -> f64 {
            let n = x.len().min(o.len());
            let (xc, xt) = x[..n].as_chunks::<LANES>();
            let (oc, ot) = o[..n].as_chunks::<LANES>();
            let mut acc = [_mm256_setzero_pd(); REGS];
            for (a, b) in xc.iter().zip(oc) {
                for (j, s) in acc.iter_mut().enumerate() {
                    let d = _mm256_sub_pd(load_ps(a, j), load_pd(b, j));
                    *s = _mm256_add_pd(*s, _mm256_mul_pd(d, d));
                }
            }
            finish(acc, dist_tail(xt, ot))
        }

        /// [`dot`] of four updates with one `u`, read concurrently.
        #[target_feature(enable = "avx2,fma")]
        pub(super) fn dot4(xs: [&[f32]; 4], u: &[f64]) -> [f64; 4] {
            let n = xs.iter().map(|x| x.len()).min().unwrap_or(0).min(u.len());
            let split = xs.map(|x| x[..n].as_chunks::<LANES>());
            let (uc, ut) = u[..n].as_chunks::<LANES>();
            let mut acc = [[_mm256_setzero_pd(); REGS]; 4];
            for (i, b) in uc.iter().enumerate() {
                for (k, a) in acc.iter_mut().enumerate() {
                    let c = &split[k].0[i];
                    for (j, r) in a.iter_mut().enumerate() {
                        *r = _mm256_add_pd(*r, _mm256_mul_pd(load_ps(c, j), load_pd(b, j)));
                    }
                }
            }
            std::array::from_fn(|k| {
                let tail = split[k].1.iter().zip(ut).map(|(&a, b)| f64::from(a) * b).fold(0.0, |a, b| a + b);
                finish(acc[k], tail)
            })
        }

        /// [`dist_sq`] of four updates against one `o`, read concurrently.
        #[target_feature(enable = "avx2,fma")]
        pub(super) fn dist_sq4(xs: [&[f32]; 4], o: &[f64]) -> [f64; 4] {
            let n = xs.iter().map(|x| x.len()).min().unwrap_or(0).min(o.len());
            let split = xs.map(|x| x[..n].as_chunks::<LANES>());
            let (oc, ot) = o[..n].as_chunks::<LANES>();
            let mut acc = [[_mm256_setzero_pd(); REGS]; 4];
            for (i, b) in oc.iter().enumerate() {
                for (k, a) in acc.iter_mut().enumerate() {
                    let c = &split[k].0[i];
                    for (j, r) in a.iter_mut().enumerate() {
                        let d = _mm256_sub_pd(load_ps(c, j), load_pd(b, j));
                        *r = _mm256_add_pd(*r, _mm256_mul_pd(d, d));
                    }
                }
            }
            std::array::from_fn(|k| finish(acc[k], dist_tail(split[k].1, ot)))
        }
    }

    #[inline]
    fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `Σ x²` in f64.
    pub(crate) fn sum_sq<T: Elem>(x: &[T]) -> f64 {
        T::sum_sq(x)
    }

    fn generic_sum_sq<T: Elem>(x: &[T]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above), the only requirement
            // of the target-feature function.
            return unsafe { avx2::sum_sq(x) };
        }
        sum_sq_body(x)
    }

    fn generic_dot<T: Elem>(x: &[T], u: &[f64]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA are available (checked just above).
            return unsafe { avx2::dot(x, u) };
        }
        dot_body(x, u)
    }

    fn generic_dist_sq<T: Elem>(x: &[T], o: &[f64]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA are available (checked just above).
            return unsafe { avx2::dist_sq(x, o) };
        }
        dist_sq_body(x, o)
    }

    /// `acc += w·x` over the common length.
    pub(crate) fn axpy<T: Elem>(acc: &mut [f64], x: &[T], w: f64) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA are available (checked just above).
            return unsafe { avx2::axpy(acc, x, w) };
        }
        axpy_body(acc, x, w)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn kernels_match_plain_sums() {
            let x: Vec<f32> = (0..1037).map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5).collect();
            let u: Vec<f64> = (0..1037).map(|i| ((i * 11) % 13) as f64 * 0.1 - 0.6).collect();
            let plain_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let plain_dot: f64 = x.iter().zip(&u).map(|(&a, b)| f64::from(a) * b).sum();
            let plain_dist: f64 = x.iter().zip(&u).map(|(&a, b)| (f64::from(a) - b).powi(2)).sum();
            assert!((sum_sq(&x) - plain_sq).abs() < 1e-9);
            assert!((f32::dot(&x, &u) - plain_dot).abs() < 1e-9);
            assert!((f32::dist_sq(&x, &u) - plain_dist).abs() < 1e-9);
            assert_eq!(sum_sq(&x), sum_sq_body(&x), "CPU paths agree bit for bit");
            assert_eq!(f32::dot(&x, &u), dot_body(&x, &u));
            assert_eq!(f32::dist_sq(&x, &u), dist_sq_body(&x, &u));
            let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            assert_eq!(sum_sq(&x), sum_sq(&x64), "f32 and f64 paths sum in the same order");
            // Four-at-a-time reads give each update's single-read result.
            let xs: Vec<Vec<f32>> =
                (0..6).map(|k| x.iter().map(|v| v * (k as f32 + 1.0)).collect()).collect();
            let views: Vec<&[f32]> = xs.iter().map(|v| v.as_slice()).collect();
            let mut many = vec![0.0; 6];
            f32::sum_sq_many(&views, &mut many);
            let mut dist = vec![0.0; 6];
            f32::dist_sq_many(&views, &u, &mut dist);
            let mut dots = vec![0.0; 6];
            f32::dot_many(&views, &u, &mut dots);
            for k in 0..6 {
                assert_eq!(many[k], sum_sq_body(views[k]));
                assert_eq!(dots[k], dot_body(views[k], &u));
                assert_eq!(dist[k], dist_sq_body(views[k], &u));
            }
            let i: Vec<i64> = vec![3, -4];
            assert_eq!(sum_sq(&i), 25.0);
            let mut acc = vec![1.0, 1.0];
            axpy(&mut acc, &i, 2.0);
            assert_eq!(acc, vec![7.0, -7.0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_count_tolerates_float_products() {
        assert_eq!(reward_count(100, 0.07), 7, "100 x 0.07 = 7.000000000000001");
        assert_eq!(reward_count(10, 0.25), 3);
        assert_eq!(reward_count(10, 1e-12), 1, "a tiny positive ratio still gets one entry");
        assert_eq!(reward_count(10, 0.0), 0);
        assert_eq!(reward_count(10, -0.3), 0);
        assert_eq!(reward_count(10, f64::NAN), 0);
        assert_eq!(reward_count(0, 0.5), 0);
    }

    #[test]
    fn config_validation() {
        assert!(RfflConfig::default().validate().is_ok());
        let bad = [
            RfflConfig { alpha: 1.5, ..RfflConfig::default() },
            RfflConfig { gamma: 0.0, ..RfflConfig::default() },
            RfflConfig { gamma: f64::INFINITY, mode: Mode::Paper, ..RfflConfig::default() },
            RfflConfig { rth: 2.0, ..RfflConfig::default() },
            RfflConfig { altruism_degree: Some(f64::NAN), ..RfflConfig::default() },
        ];
        for c in bad {
            assert_eq!(Rffl::new(c).unwrap_err().kind(), RfflErrorKind::InvalidConfig);
        }
    }
}
