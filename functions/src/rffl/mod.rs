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
//! # Across nodes
//! [`twophase`] runs the same round on a cohort spread over several nodes without moving any
//! update: each node measures its updates and folds its share of `u`, the top admits, merges and
//! sends `u` back, each node returns its updates' dot products, the top concludes. The
//! reputations, removals and rewards are this module's, computed by the same functions.
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
//! over the accepted updates (element-wise maximum, value of the lowest `ClientId`);
//! `statistic` and `variance` tensors (running statistics) get `global` plus the
//! `num_examples`-weighted mean delta of the accepted finite updates, never clipped nor
//! reputation-weighted, variances clamped at 0.
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

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::ClientId;
use crate::kernels::scan;
use crate::state::{mismatch, F64s};
use crate::strategy::{Mergeability, PartialAggregate, Strategy, UpdateView};
use crate::tensor::{AggregationPolicy, ModelManifest, Parameters, TensorData};

pub mod twophase;

/// The cosine's denominator floor (`max(‖g‖·‖u‖, ε)` in the reference code).
pub const COSINE_EPSILON: f64 = 1e-10;

/// Added to the norm before clipping in the reference code (`Γ · g / (‖g‖ + 1e-7)`).
pub const CLIP_EPSILON: f64 = 1e-7;

/// Which specification of RFFL to follow where the paper and the reference code differ
/// (`algorithms.md` §A.6). The paper's rules are `[paper-unverified]` in the spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// A node's two-phase message does not fit the round the top is running (another round
    /// index, a client its node accepted and the top did not or the other way round, a dot
    /// missing): the node ran phase 1 from another round's opening ([`twophase`]).
    #[error("two-phase message does not fit the round: {0}")]
    Protocol(String),
}

/// A `Copy` classification of [`RfflError`] for callers and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RfflErrorKind {
    /// See [`RfflError::InvalidConfig`].
    InvalidConfig,
    /// See [`RfflError::EmptyCohort`].
    EmptyCohort,
    /// See [`RfflError::DuplicateClient`].
    DuplicateClient,
    /// See [`RfflError::InvalidWeight`].
    InvalidWeight,
    /// See [`RfflError::NonPositiveShareSum`].
    NonPositiveShareSum,
    /// See [`RfflError::NonPositiveReputationSum`].
    NonPositiveReputationSum,
    /// See [`RfflError::NonPositiveMaxReputation`].
    NonPositiveMaxReputation,
    /// See [`RfflError::NoReputableUpdate`].
    NoReputableUpdate,
    /// See [`RfflError::ManifestMismatch`].
    ManifestMismatch,
    /// See [`RfflError::Misaligned`].
    Misaligned,
    /// See [`RfflError::UnknownClient`].
    UnknownClient,
    /// See [`RfflError::Protocol`].
    Protocol,
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
            RfflError::Protocol(_) => RfflErrorKind::Protocol,
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
            RfflErrorKind::Protocol => "protocol",
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
            RfflError::Protocol(detail) => Error::Strategy { strategy: "rffl", detail },
        }
    }
}

/// The server's state about one participant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
            let clamp = spec.policy == AggregationPolicy::Variance;
            let value = |e: usize, v: f64| {
                let x = g.get_f64(e) + v;
                if clamp && x < 0.0 {
                    0.0
                } else {
                    x
                }
            };
            out.write_tensor_f64(i, u.iter().enumerate().map(|(e, &v)| value(e, v)));
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

    fn compute(&self, cohort: &[UpdateView<'_>]) -> Result<Pending, RfflError> {
        let (manifest, by_client) = self.check_cohort(cohort)?;
        let present: BTreeMap<&ClientId, f64> =
            by_client.iter().map(|(c, &k)| (*c, cohort[k].weight)).collect();
        let adm = self.admit(&present)?;
        // The accepted updates' positions in the cohort, in ClientId order.
        let index: Vec<usize> = adm.accepted.iter().map(|&p| by_client[&adm.ids[p]]).collect();
        let norm_sq = norms_sq(cohort, &index, &manifest)?;
        let scaled = Scaled::new(&self.config, self.round, &adm, &norm_sq);
        let scanned = fold_and_dot(cohort, &index, &scaled, &manifest)?;
        self.conclude(adm, &scaled, scanned, |c| by_client.contains_key(c), manifest)
    }

    /// Validates the cohort: one manifest (the job's), finite non-negative weights, one update
    /// per client, readable tensors. Returns the manifest and each client's cohort position.
    fn check_cohort<'c>(
        &self,
        cohort: &'c [UpdateView<'_>],
    ) -> Result<(Arc<ModelManifest>, BTreeMap<&'c ClientId, usize>), RfflError> {
        let first = cohort.first().ok_or(RfflError::EmptyCohort)?;
        let manifest = match &self.manifest {
            Some(m) => Arc::clone(m),
            None => Arc::new(first.manifest.clone()),
        };
        let by_client = check_views(&manifest, cohort)?;
        Ok((manifest, by_client))
    }

    /// Who takes part in this round, from the clients `present` and their weights
    /// (`num_examples`): in round 0 they become the participants (data shares `s_i`), later the
    /// present reputable participants are accepted and everyone else is ignored.
    fn admit(&self, present: &BTreeMap<&ClientId, f64>) -> Result<Admission, RfflError> {
        if present.is_empty() {
            return Err(RfflError::EmptyCohort);
        }
        let participants = if self.participants.is_empty() {
            let total: f64 = present.values().sum();
            if !(total > 0.0 && total.is_finite()) {
                return Err(RfflError::NonPositiveShareSum(total));
            }
            let joining =
                |w: f64| Participant { share: w / total, reputation: 0.0, reputable: true, removed_in: None };
            present.iter().map(|(c, &w)| ((*c).clone(), joining(w))).collect()
        } else {
            self.participants.clone()
        };
        let reputable = |c: &ClientId| participants.get(c).is_some_and(|p: &Participant| p.reputable);
        let ignored: Vec<ClientId> = present.keys().filter(|c| !reputable(c)).map(|c| (*c).clone()).collect();
        let ids: Vec<ClientId> = participants.keys().cloned().collect();
        let accepted: Vec<usize> =
            (0..ids.len()).filter(|&p| reputable(&ids[p]) && present.contains_key(&ids[p])).collect();
        if accepted.is_empty() {
            return Err(RfflError::NoReputableUpdate { ignored: ignored.len() });
        }
        Ok(Admission { participants, ids, ignored, accepted })
    }

    /// The reputation arithmetic and the round's report, from the accepted updates' scales and
    /// the aggregate with their dot products.
    fn conclude(
        &self,
        mut adm: Admission,
        scaled: &Scaled,
        scanned: Scanned,
        present: impl Fn(&ClientId) -> bool,
        manifest: Arc<ModelManifest>,
    ) -> Result<Pending, RfflError> {
        let Scanned { aggregate, dots, u_norm } = scanned;
        let (cfg, t) = (&self.config, self.round);
        let ids = &adm.ids;
        let mut phi = vec![0.0f64; ids.len()];
        let mut acc_of = vec![None; ids.len()];
        for (a, &p) in adm.accepted.iter().enumerate() {
            acc_of[p] = Some(a);
            if scaled.finite[a] {
                phi[p] = contribution(scaled.scale[a] * dots[a], scaled.scale[a] * scaled.norm[a], u_norm);
            }
        }
        let previous: Vec<f64> = ids.iter().map(|c| adm.participants[c].reputation).collect();
        let reputable: Vec<bool> = ids.iter().map(|c| adm.participants[c].reputable).collect();
        let upd = update_reputations(cfg, t, &previous, &reputable, &phi)?;
        let mut clients = BTreeMap::new();
        for (p, id) in ids.iter().enumerate() {
            let a = acc_of[p];
            let part = adm.participants.get_mut(id).ok_or_else(|| RfflError::UnknownClient(id.clone()))?;
            part.reputation = upd.reputations[p];
            part.reputable = upd.reputable[p];
            if reputable[p] && !upd.reputable[p] {
                part.removed_in = Some(t);
            }
            let round = ClientRound {
                present: present(id),
                non_finite: a.is_some_and(|a| !scaled.finite[a]),
                reputable: upd.reputable[p],
                weight: a.map_or(0.0, |a| scaled.weight[a]),
                norm: a.map_or(0.0, |a| scaled.norm[a]),
                scale: a.map_or(1.0, |a| scaled.scale[a]),
                contribution: phi[p],
                reputation: upd.reputations[p],
                reward_ratio: upd.reward_ratios[p],
            };
            clients.insert(id.clone(), round);
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
            ignored: std::mem::take(&mut adm.ignored),
            threshold: upd.threshold,
        };
        Ok(Pending { round, participants: adm.participants, manifest })
    }
}

/// Checks updates against `manifest` (same manifest, finite non-negative weights, one update
/// per client, readable tensors); each client's position, in `ClientId` order.
fn check_views<'c>(
    manifest: &ModelManifest,
    cohort: &'c [UpdateView<'_>],
) -> Result<BTreeMap<&'c ClientId, usize>, RfflError> {
    let mut by_client: BTreeMap<&ClientId, usize> = BTreeMap::new();
    for (k, u) in cohort.iter().enumerate() {
        if !same_manifest(u.manifest, manifest) {
            return Err(RfflError::ManifestMismatch("an update does not match the job's manifest"));
        }
        check_weight(u.client, u.weight)?;
        if by_client.insert(u.client, k).is_some() {
            return Err(RfflError::DuplicateClient(u.client.clone()));
        }
        for i in 0..manifest.tensors().len() {
            view(u, i)?;
        }
    }
    Ok(by_client)
}

fn check_weight(client: &ClientId, weight: f64) -> Result<(), RfflError> {
    if weight.is_finite() && weight >= 0.0 {
        Ok(())
    } else {
        Err(RfflError::InvalidWeight { client: client.clone(), weight })
    }
}

/// Who takes part in a round (see [`Rffl::admit`]).
#[derive(Debug)]
struct Admission {
    /// The participants as they enter the round (the new ones in round 0).
    participants: BTreeMap<ClientId, Participant>,
    /// The participants' ids, in `ClientId` order (their positions below).
    ids: Vec<ClientId>,
    /// Present clients that are not reputable participants, in `ClientId` order.
    ignored: Vec<ClientId>,
    /// Positions in `ids` of the present, reputable participants.
    accepted: Vec<usize>,
}

/// What the server applies to each accepted update (vectors parallel to
/// [`Admission::accepted`]); non-finite uploads count as zero uploads.
#[derive(Debug)]
struct Scaled {
    /// Whether its squared norm is finite.
    finite: Vec<bool>,
    /// `‖g_i‖` (0 when not finite).
    norm: Vec<f64>,
    /// The clip/normalisation factor ([`upload_scale`]).
    scale: Vec<f64>,
    /// `a_i`: `s_i` in round 0, else `max(0, r_i^{t-1})`.
    weight: Vec<f64>,
}

impl Scaled {
    fn new(cfg: &RfflConfig, round: u64, adm: &Admission, norm_sq: &[f64]) -> Scaled {
        let n = adm.accepted.len();
        let mut s =
            Scaled { finite: vec![true; n], norm: vec![0.0; n], scale: vec![1.0; n], weight: vec![0.0; n] };
        for (a, &p) in adm.accepted.iter().enumerate() {
            let part = &adm.participants[&adm.ids[p]];
            s.weight[a] = if round == 0 { part.share } else { part.reputation.max(0.0) };
            if !norm_sq[a].is_finite() {
                s.finite[a] = false;
                continue;
            }
            s.norm[a] = norm_sq[a].sqrt();
            s.scale[a] = upload_scale(cfg.mode, cfg.gamma, s.norm[a]);
        }
        s
    }

    /// The coefficient of update `a` in `u`: `a_i · scale_i` (0 when not finite).
    fn fold_weight(&self, a: usize) -> f64 {
        if self.finite[a] {
            self.weight[a] * self.scale[a]
        } else {
            0.0
        }
    }
}

/// The aggregate `u` per tensor (see [`RfflRound::aggregate_tensor`]), the accepted updates' dot
/// products with it (parallel to [`Admission::accepted`], 0 for non-finite ones) and `‖u‖`.
struct Scanned {
    aggregate: Vec<Vec<f64>>,
    dots: Vec<f64>,
    u_norm: f64,
}

/// Pass 1: `‖g‖²` over the `mean` tensors of the updates at `index` (cohort positions).
fn norms_sq(
    cohort: &[UpdateView<'_>],
    index: &[usize],
    manifest: &ModelManifest,
) -> Result<Vec<f64>, RfflError> {
    let mut norm_sq = vec![0.0f64; index.len()];
    let mut views: Vec<TensorData<'_>> = Vec::with_capacity(index.len());
    for (i, spec) in manifest.tensors().iter().enumerate() {
        if spec.policy != AggregationPolicy::Mean {
            continue;
        }
        views.clear();
        for &k in index {
            views.push(view(&cohort[k], i)?);
        }
        scan::visit(&views, scan::SumSq { out: &mut norm_sq });
    }
    Ok(norm_sq)
}

/// Pass 2: `u = Σ a_i c_i g_i` tile by tile over the finite updates at `index`, with every one's
/// dot product with `u` and `‖u‖`. `max` and `first` tensors get the maximum / lowest client's
/// value of the finite updates; `skip` tensors an empty vector.
fn fold_and_dot(
    cohort: &[UpdateView<'_>],
    index: &[usize],
    scaled: &Scaled,
    manifest: &ModelManifest,
) -> Result<Scanned, RfflError> {
    let live: Vec<usize> = (0..index.len()).filter(|&a| scaled.finite[a]).collect();
    let weights: Vec<f64> = live.iter().map(|&a| scaled.fold_weight(a)).collect();
    let sizes: Vec<f64> = live.iter().map(|&a| cohort[index[a]].weight).collect();
    let mut aggregate: Vec<Vec<f64>> = Vec::with_capacity(manifest.tensors().len());
    let mut live_dots = vec![0.0f64; live.len()];
    let mut u_sq = 0.0f64;
    let mut views: Vec<TensorData<'_>> = Vec::with_capacity(live.len());
    for (i, spec) in manifest.tensors().iter().enumerate() {
        views.clear();
        for &a in &live {
            views.push(view(&cohort[index[a]], i)?);
        }
        let numel = manifest.slots()[i].numel;
        aggregate.push(match spec.policy {
            AggregationPolicy::Mean => {
                let mut u = vec![0.0f64; numel];
                let fold =
                    scan::FoldDot { u: &mut u, weights: &weights, dots: &mut live_dots, u_sq: &mut u_sq };
                scan::visit(&views, fold);
                u
            }
            policy => non_gradient(policy, &views, &sizes, numel),
        });
    }
    let mut dots = vec![0.0f64; index.len()];
    for (l, &a) in live.iter().enumerate() {
        dots[a] = live_dots[l];
    }
    Ok(Scanned { aggregate, dots, u_norm: u_sq.sqrt() })
}

/// The aggregate of a tensor that is not part of the gradient, over the finite accepted
/// updates (`views`, in `ClientId` order, of weights `sizes` = `num_examples`): element-wise
/// maximum (`max`; 0 without updates), the lowest client's value (`first`), the
/// `num_examples`-weighted mean delta (`statistic`, `variance`; 0 when the weights sum to 0),
/// nothing (`skip`).
fn non_gradient(
    policy: AggregationPolicy,
    views: &[TensorData<'_>],
    sizes: &[f64],
    numel: usize,
) -> Vec<f64> {
    let mut u = vec![0.0f64; numel];
    match policy {
        AggregationPolicy::Max if !views.is_empty() => {
            u.fill(f64::NEG_INFINITY);
            views.iter().for_each(|v| crate::kernels::max_assign(&mut u, *v));
        }
        AggregationPolicy::Max | AggregationPolicy::First => {
            if let Some(v) = views.first() {
                crate::kernels::assign(&mut u, *v);
            }
        }
        AggregationPolicy::Statistic | AggregationPolicy::Variance => {
            views.iter().zip(sizes).for_each(|(v, &w)| crate::kernels::scaled_add(&mut u, *v, w));
            let total: f64 = sizes.iter().sum();
            let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
            u.iter_mut().for_each(|x| *x *= scale);
        }
        AggregationPolicy::Mean | AggregationPolicy::Skip => return Vec::new(),
    }
    u
}

/// The persisted form of an [`Rffl`] ([`crate::state`]): configuration (checked on restore),
/// round counter, participants, manifest and the last round (for its rewards).
#[derive(Serialize, Deserialize)]
struct RfflState {
    config: RfflConfig,
    round: u64,
    participants: Vec<(ClientId, Participant)>,
    manifest: Option<ModelManifest>,
    last: Option<LastRound>,
}

/// An [`RfflRound`] without what the state holds once (mode, sparsify, manifest).
#[derive(Serialize, Deserialize)]
struct LastRound {
    round: u64,
    aggregate: Vec<F64s>,
    aggregate_norm: f64,
    clients: Vec<(ClientId, ClientRound)>,
    removed: Vec<ClientId>,
    ignored: Vec<ClientId>,
    threshold: Option<f64>,
}

impl Rffl {
    fn to_state(&self) -> RfflState {
        let last = self.last.as_ref().map(|r| LastRound {
            round: r.round,
            aggregate: r.aggregate.iter().map(|u| F64s(u.clone())).collect(),
            aggregate_norm: r.aggregate_norm,
            clients: r.clients.iter().map(|(c, x)| (c.clone(), *x)).collect(),
            removed: r.removed.clone(),
            ignored: r.ignored.clone(),
            threshold: r.threshold,
        });
        RfflState {
            config: self.config.clone(),
            round: self.round,
            participants: self.participants.iter().map(|(c, p)| (c.clone(), *p)).collect(),
            manifest: self.manifest.as_deref().cloned(),
            last,
        }
    }

    /// The server `s` describes, checked against this one's configuration.
    fn with_state(&self, s: RfflState) -> Result<Rffl> {
        if s.config != self.config {
            return Err(mismatch(format!("saved with {:?}, this server has {:?}", s.config, self.config)));
        }
        let finite = |p: &Participant| p.share.is_finite() && p.share >= 0.0 && p.reputation.is_finite();
        if let Some((c, _)) = s.participants.iter().find(|(_, p)| !finite(p)) {
            return Err(mismatch(format!("participant {c} has a non-finite share or reputation")));
        }
        let participants: BTreeMap<ClientId, Participant> = s.participants.into_iter().collect();
        let manifest = s.manifest.map(Arc::new);
        let last = match (s.last, &manifest) {
            (None, _) => None,
            (Some(_), None) => return Err(mismatch("a last round without a manifest")),
            (Some(l), Some(m)) => Some(self.last_round_from(l, m, &participants)?),
        };
        let config = self.config.clone();
        Ok(Rffl { config, round: s.round, participants, manifest, last })
    }

    fn last_round_from(
        &self,
        l: LastRound,
        manifest: &Arc<ModelManifest>,
        participants: &BTreeMap<ClientId, Participant>,
    ) -> Result<RfflRound> {
        let fits = l.aggregate.len() == manifest.tensors().len()
            && manifest.tensors().iter().zip(manifest.slots()).zip(&l.aggregate).all(|((t, s), u)| {
                u.0.len() == if t.policy == AggregationPolicy::Skip { 0 } else { s.numel }
            });
        if !fits {
            return Err(mismatch("the last aggregate does not fit the manifest"));
        }
        if l.clients.iter().any(|(c, _)| !participants.contains_key(c)) {
            return Err(mismatch("the last round names a client that is not a participant"));
        }
        Ok(RfflRound {
            round: l.round,
            mode: self.config.mode,
            sparsify: self.config.sparsify,
            manifest: Arc::clone(manifest),
            aggregate: l.aggregate.into_iter().map(|u| u.0).collect(),
            aggregate_norm: l.aggregate_norm,
            clients: l.clients.into_iter().collect(),
            removed: l.removed,
            ignored: l.ignored,
            threshold: l.threshold,
        })
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

    /// Across nodes by the two-phase protocol ([`twophase`]).
    fn sharding(&self) -> crate::strategy::Sharding {
        crate::strategy::Sharding::TwoPhase
    }

    fn two_phase(&mut self) -> Option<crate::strategy::TwoPhase<'_>> {
        Some(crate::strategy::TwoPhase::Rffl(self))
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

    /// Reputations, reputable set, shares, round counter, manifest and the last round (its
    /// aggregate and per-client outcomes, from which rewards are served).
    fn save_state(&self) -> Result<Vec<u8>> {
        crate::state::save(self.name(), &self.to_state())
    }

    /// # Errors
    /// As [`Strategy::restore_state`]; also a state saved with another [`RfflConfig`], a
    /// non-finite reputation, a last aggregate that does not fit the manifest.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let state = crate::state::load(self.name(), bytes)?;
        *self = self.with_state(state)?;
        Ok(())
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
