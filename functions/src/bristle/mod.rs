//! Bristle as a server-side filter and integrator (Verbraeken, de Vos & Pouwelse, arXiv
//! 2110.11006; reference code `jverbraeken/trustchain-superapp` module `fedml`, `Bristle.kt` @
//! acb2ecfc and `Node.kt`). Specification: `algorithms.md` §B.
//!
//! Bristle is a decentralised gradient aggregation rule: each peer integrates the models it
//! receives into its own. Shoal runs it on the server, in two stages:
//!
//! 1. **Distance prioritizer** (a filter, always on): the Euclidean distance of every update to
//!    a reference model (the global model by default, or the "receiver's own model" set with
//!    [`Bristle::set_own_model`]), then a selection by [`Prioritizer`]. The default is the α-tertile
//!    explore/exploit scheme: sort by distance, split into low / medium / high thirds, draw
//!    `round((1−α)²β)`, `round(2α(1−α)β)` and `round(α²β)` updates uniformly at random from each
//!    (capped at the third's size). Randomness comes from a seeded [`SplitMix64`], derived per
//!    round from the configured seed, so runs replay exactly.
//! 2. **Performance-based integrator** (optional, needs a [`ClassEvaluator`] supplied by the
//!    runtime that evaluates a candidate model per class on a server-held validation split): the
//!    output layer is integrated class by class, each selected update weighted by how its
//!    per-class F1 compares with the reference model's (§B.2 steps 2–10), then every class
//!    column is mean-centred (§B.2 step 11, `Node.kt`). The reference model keeps weight 1, so
//!    the result is always defined.
//!
//! Without an evaluator the result is the **`weight`-weighted mean of the selected updates**
//! (FedAvg over the selection, with the manifest's policies). With one, every tensor except the
//! output layer gets that same weighted mean and the output layer gets the integration.
//!
//! # Across nodes
//! [`twophase`] runs the filter and the integrator on a cohort spread over several nodes: the
//! nodes send distances, the top ranks and draws exactly as here, the nodes fold (and evaluate)
//! their selected updates. See there for what the integrator needs to be exact.
//!
//! # Modes (§B.6)
//! [`Mode`] selects the tertile scheme's variant: the reference code's own split (which never
//! selects the element at index `⌊2n/3⌋` when n is not a multiple of 3, e.g. index 6 of 10),
//! the corrected split presumed by the paper, or the third-party Python port's deterministic
//! variant. The
//! master branch of the reference code actually runs `Random { k: 10 }` (the α scheme is
//! commented out); that and the older "closest plus random" rule are other [`Prioritizer`]s.
//!
//! # Deviations, by design
//! - Ties in distance (and in F1 when choosing compared classes) are broken by `ClientId` (resp.
//!   class index), not by arrival order, so results do not depend on the cohort's order (D.3).
//! - When the compared-class count equals |F| the familiar classes F themselves are compared (the
//!   reference code compares classes `0..|F|−1`, §B.6-3).
//! - With fewer than 3 updates no tertiles exist and every update is selected (the reference
//!   code's split selects nothing from a single model).
//! - Updates whose distance is not finite (NaN/Inf, normally rejected at ingest) are never
//!   selected; they are reported in [`Selection::rejected`].
//! - F1 values are sanitised: NaN/Inf become 0 and values are clamped to [0, 1] (§B.7).
//!
//! # Cost
//! The filter reads each update once (tiles of the reference are decoded to f64 one at a time;
//! f64 accumulation, f32 updates read four at a time; `crate::kernels`' scans); the cohort is
//! never copied. The
//! integrator evaluates `1 + |selection|` candidates; with delta updates each candidate model
//! (`global + Δ`) is materialised once for the evaluator.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fedavg::FedAvg;
use crate::ids::ClientId;
use crate::kernels::scan;
use crate::spec::UpdateKind;
use crate::state::{mismatch, Bin};
use crate::strategy::{Mergeability, PartialAggregate, Strategy, UpdateView};
use crate::tensor::{AggregationPolicy, ModelManifest, Parameters, TensorData};

pub mod twophase;

/// Which variant of the α-tertile prioritizer to run (§B.2 step 1, §B.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// The scheme as written (commented out) in `Bristle.kt`: thirds
    /// `[0, n/3) | [n/3, ⌊2n/3⌋) | [n − n/3, n)` with integer division (for `n = 10` the sizes
    /// are 3 | 3 | 3 and index 6 is never eligible, §B.6-2), counts rounded half to even
    /// (Kotlin `round`), draws uniformly at random within each third, β as configured.
    #[default]
    ReferenceCode,
    /// `[paper-unverified]` The same scheme with the split corrected to sizes
    /// `(⌊n/3⌋, ⌊n/3⌋, n − 2⌊n/3⌋)`, so every update is eligible.
    Paper,
    /// The third-party PyTorch port (not authoritative; for cross-checks, §B.6-5): corrected
    /// split, counts **floored**, `β_eff = min(n, β)`, and the **closest** members of each third
    /// instead of random ones (deterministic).
    PythonPort,
}

/// How updates are selected once sorted by distance (§B.6-1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Prioritizer {
    /// The α-tertile explore/exploit scheme (default α = 0.4, β = 10). α = 0 takes only the
    /// closest third, α = 1 only the farthest.
    AlphaTertiles {
        /// Exploration ratio α in [0, 1].
        alpha: f64,
        /// β, the number of updates to prioritise (the counts may sum to β ± 1 after rounding).
        beta: usize,
    },
    /// The rule before commit acb2ecfc: the `exploit` closest plus `explore` drawn at random
    /// from the rest (20 and 5 in commit 43492302).
    ClosestPlusRandom {
        /// Closest updates always taken.
        exploit: usize,
        /// Updates drawn uniformly from the others.
        explore: usize,
    },
    /// What the reference code's master branch runs: `k` updates uniformly at random (k = 10).
    Random {
        /// Updates drawn.
        k: usize,
    },
    /// No filtering: every (finite) update is selected.
    All,
}

impl Default for Prioritizer {
    fn default() -> Self {
        Prioritizer::AlphaTertiles { alpha: 0.4, beta: 10 }
    }
}

/// Bristle's filter configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BristleConfig {
    /// Variant of the α-tertile scheme.
    pub mode: Mode,
    /// The selection rule.
    pub prioritizer: Prioritizer,
    /// Seed of the selection's random draws (the reference code seeds each node with its index).
    pub seed: u64,
    /// Whether updates are full parameters (Bristle's own setting) or deltas from the global
    /// model (then update `j` stands for the model `global + Δ_j`).
    pub update_kind: UpdateKind,
}

impl Default for BristleConfig {
    fn default() -> Self {
        BristleConfig {
            mode: Mode::ReferenceCode,
            prioritizer: Prioritizer::default(),
            seed: 0,
            update_kind: UpdateKind::Parameters,
        }
    }
}

/// Which axis of the 2-D output tensor indexes classes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ClassAxis {
    /// Shape `[h, C]`, class `c` is column `c` (DL4J, the reference code).
    #[default]
    Columns,
    /// Shape `[C, h]`, class `c` is row `c` (PyTorch `nn.Linear.weight`).
    Rows,
}

/// The performance-based integrator's configuration (§B.2 steps 2–11).
#[derive(Debug, Clone, PartialEq)]
pub struct IntegratorConfig {
    /// Name of the output-layer weight tensor (2-D) that is integrated class by class.
    pub output_tensor: String,
    /// Which axis of it indexes classes.
    pub class_axis: ClassAxis,
    /// The familiar classes F (those the validation split represents well). `None`: all
    /// classes, so there is no foreign class.
    pub familiar_classes: Option<Vec<usize>>,
    /// φ, the number of familiar classes compared per peer (the PSI-CA overlap; 3 in the
    /// simulator). `None` or `≥ |F|`: all of F.
    pub compared_classes: Option<usize>,
    /// Mean-centre every class column after integration (`Node.kt`, default true).
    pub center_columns: bool,
}

impl IntegratorConfig {
    /// Integrates tensor `output_tensor` with class axis `class_axis`, all classes familiar,
    /// columns centred.
    pub fn new(output_tensor: impl Into<String>, class_axis: ClassAxis) -> IntegratorConfig {
        IntegratorConfig {
            output_tensor: output_tensor.into(),
            class_axis,
            familiar_classes: None,
            compared_classes: None,
            center_columns: true,
        }
    }
}

/// A model offered to a [`ClassEvaluator`]: bytes in the manifest's canonical slot layout,
/// viewed in place.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The layout of `bytes`.
    pub manifest: &'a ModelManifest,
    /// Slot bytes ([`ModelManifest::slot_bytes`] long, 8-byte aligned).
    pub bytes: &'a [u8],
    /// Whose model this is: `None` for the reference (global or own) model.
    pub client: Option<&'a ClientId>,
}

impl<'a> Candidate<'a> {
    /// Typed view of tensor `i` (`None` if out of range or misaligned).
    pub fn tensor(&self, i: usize) -> Option<TensorData<'a>> {
        let s = self.manifest.slots().get(i)?;
        let spec = &self.manifest.tensors()[i];
        TensorData::view(spec.dtype, self.bytes.get(s.byte_offset..s.byte_offset + s.byte_len)?)
    }

    /// Typed view of the tensor called `name`.
    pub fn tensor_by_name(&self, name: &str) -> Option<TensorData<'a>> {
        self.tensor(self.manifest.position(name)?)
    }
}

/// An evaluator's failure, passed through as the source of [`BristleError::Evaluator`].
pub type EvaluatorError = Box<dyn std::error::Error + Send + Sync>;

/// Per-class evaluation of candidate models on a server-held, class-balanced validation split
/// (Bristle's "small set of i.i.d. test samples", κ = 10 per class in the reference code).
/// Supplied by the runtime; the maths here never runs a model.
pub trait ClassEvaluator: Send + fmt::Debug {
    /// The F1 score of every class of `candidate`, indexed by class (length = the number of
    /// classes of the output tensor), each in [0, 1]. A class with no prediction and no sample
    /// should score 0 (§B.7); NaN/Inf are read as 0 anyway.
    ///
    /// # Errors
    /// Any evaluation failure; the round then fails with [`BristleError::Evaluator`].
    fn class_f1(&mut self, candidate: &Candidate<'_>) -> Result<Vec<f64>, EvaluatorError>;
}

/// Errors of Bristle. None of them changes the strategy's state.
#[derive(Debug, thiserror::Error)]
pub enum BristleError {
    /// A parameter is out of range, or the integrator does not fit the manifest.
    #[error("invalid Bristle configuration: {0}")]
    InvalidConfig(String),
    /// The cohort holds no update.
    #[error("the cohort is empty")]
    EmptyCohort,
    /// Two updates of one cohort come from the same client.
    #[error("client {0} sent two updates in one cohort")]
    DuplicateClient(ClientId),
    /// Updates, the global model or the own model come from different manifests.
    #[error("manifest mismatch: {0}")]
    ManifestMismatch(&'static str),
    /// A tensor's bytes are not aligned for its dtype or too short (a staging bug guard).
    #[error("tensor {0} of an update is misaligned or truncated")]
    Misaligned(String),
    /// The prioritizer selected nothing (e.g. β too small for its rounding, or every update
    /// non-finite).
    #[error("nothing selected from {received} updates ({rejected} with non-finite distances)")]
    NothingSelected {
        /// Updates received.
        received: usize,
        /// Updates rejected for non-finite distances.
        rejected: usize,
    },
    /// The evaluator failed.
    #[error("class evaluator failed on {}", candidate_name(.client.as_ref()))]
    Evaluator {
        /// The candidate's client (`None` for the reference model).
        client: Option<ClientId>,
        /// The evaluator's error.
        #[source]
        source: EvaluatorError,
    },
    /// The evaluator returned a score vector of the wrong length.
    #[error("class evaluator returned {got} F1 scores, the output tensor has {expected} classes")]
    F1Length {
        /// Classes of the output tensor.
        expected: usize,
        /// Scores returned.
        got: usize,
    },
    /// Building the weighted mean failed (e.g. a non-positive update weight).
    #[error(transparent)]
    Aggregate(#[from] Error),
    /// A node's two-phase message does not fit the round the top is running (another round
    /// index, a selected client missing or reported twice, partials that do not hold the
    /// selection): see [`twophase`].
    #[error("two-phase message does not fit the round: {0}")]
    Protocol(String),
}

fn candidate_name(client: Option<&ClientId>) -> String {
    client.map_or_else(|| "the reference model".to_string(), |c| format!("client {c}"))
}

/// A `Copy` classification of [`BristleError`] for callers and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BristleErrorKind {
    /// See [`BristleError::InvalidConfig`].
    InvalidConfig,
    /// See [`BristleError::EmptyCohort`].
    EmptyCohort,
    /// See [`BristleError::DuplicateClient`].
    DuplicateClient,
    /// See [`BristleError::ManifestMismatch`].
    ManifestMismatch,
    /// See [`BristleError::Misaligned`].
    Misaligned,
    /// See [`BristleError::NothingSelected`].
    NothingSelected,
    /// See [`BristleError::Evaluator`].
    Evaluator,
    /// See [`BristleError::F1Length`].
    F1Length,
    /// See [`BristleError::Aggregate`].
    Aggregate,
    /// See [`BristleError::Protocol`].
    Protocol,
}

impl BristleError {
    /// The error's kind.
    pub fn kind(&self) -> BristleErrorKind {
        match self {
            BristleError::InvalidConfig(_) => BristleErrorKind::InvalidConfig,
            BristleError::EmptyCohort => BristleErrorKind::EmptyCohort,
            BristleError::DuplicateClient(_) => BristleErrorKind::DuplicateClient,
            BristleError::ManifestMismatch(_) => BristleErrorKind::ManifestMismatch,
            BristleError::Misaligned(_) => BristleErrorKind::Misaligned,
            BristleError::NothingSelected { .. } => BristleErrorKind::NothingSelected,
            BristleError::Evaluator { .. } => BristleErrorKind::Evaluator,
            BristleError::F1Length { .. } => BristleErrorKind::F1Length,
            BristleError::Aggregate(_) => BristleErrorKind::Aggregate,
            BristleError::Protocol(_) => BristleErrorKind::Protocol,
        }
    }
}

impl BristleErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BristleErrorKind::InvalidConfig => "invalid_config",
            BristleErrorKind::EmptyCohort => "empty_cohort",
            BristleErrorKind::DuplicateClient => "duplicate_client",
            BristleErrorKind::ManifestMismatch => "manifest_mismatch",
            BristleErrorKind::Misaligned => "misaligned",
            BristleErrorKind::NothingSelected => "nothing_selected",
            BristleErrorKind::Evaluator => "evaluator",
            BristleErrorKind::F1Length => "f1_length",
            BristleErrorKind::Aggregate => "aggregate",
            BristleErrorKind::Protocol => "protocol",
        }
    }
}

/// How [`Strategy::aggregate_cohort`] reports Bristle errors through the crate's error type
/// (which has no strategy-specific variant): "no aggregate exists" cases become
/// [`Error::ZeroTotalWeight`] (the previous global model stands), a duplicate client
/// [`Error::ManifestMismatch`], configuration and evaluator problems [`Error::InvalidManifest`]
/// with the message.
impl From<BristleError> for Error {
    fn from(e: BristleError) -> Error {
        match e {
            BristleError::EmptyCohort => Error::ZeroTotalWeight { total: 0.0, count: 0 },
            BristleError::NothingSelected { .. } => Error::ZeroTotalWeight { total: 0.0, count: 0 },
            BristleError::DuplicateClient(_) => {
                Error::ManifestMismatch("cohort holds two updates from one client")
            }
            BristleError::ManifestMismatch(s) => Error::ManifestMismatch(s),
            BristleError::Misaligned(n) => Error::Misaligned(n),
            BristleError::Aggregate(e) => e,
            BristleError::Protocol(detail) => Error::Strategy { strategy: "bristle", detail },
            e @ (BristleError::InvalidConfig(_)
            | BristleError::Evaluator { .. }
            | BristleError::F1Length { .. }) => Error::InvalidManifest(format!("bristle: {e}")),
        }
    }
}

/// SplitMix64 (Steele, Lea & Flood, OOPSLA 2014; the generator of `java.util.SplittableRandom`):
/// a 64-bit state advanced by the golden-ratio increment and finalised by two xor-shift-multiply
/// rounds. Small, fast and statistically sound for selection draws; **not** cryptographic. The
/// test vectors of §B.8 do not depend on any particular random stream (they only constrain which
/// group a draw comes from), and the reference code's Kotlin stream cannot be reproduced anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The generator of round `round` under `seed`: independent streams per round, so a round
    /// replays identically whatever happened before it.
    pub fn for_round(seed: u64, round: u64) -> SplitMix64 {
        SplitMix64::new(Self::mix(seed ^ Self::mix(round.wrapping_add(Self::GAMMA))))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        Self::mix(self.state)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-and-reject, unbiased).
    ///
    /// # Panics
    /// If `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "empty range");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The low / medium / high distance thirds of `n` updates sorted by distance (§B.2 step 1,
/// §B.6-2). [`Mode::ReferenceCode`]: `[0, n/3) | [n/3, ⌊2n/3⌋) | [n − n/3, n)`; the others:
/// sizes `(⌊n/3⌋, ⌊n/3⌋, n − 2⌊n/3⌋)`.
pub fn tertiles(n: usize, mode: Mode) -> [Range<usize>; 3] {
    let third = n / 3;
    match mode {
        Mode::ReferenceCode => [0..third, third..(2 * n) / 3, n - third..n],
        Mode::Paper | Mode::PythonPort => [0..third, third..2 * third, 2 * third..n],
    }
}

/// The target counts `(f_l, f_m, f_h)` = `((1−α)²β, 2α(1−α)β, α²β)`, rounded half to even
/// (reference code and paper) or floored ([`Mode::PythonPort`]). They may sum to β ± 1.
pub fn tertile_counts(alpha: f64, beta: usize, mode: Mode) -> [usize; 3] {
    let b = beta as f64;
    let raw = [(1.0 - alpha) * (1.0 - alpha) * b, 2.0 * alpha * (1.0 - alpha) * b, alpha * alpha * b];
    raw.map(|x| {
        let r = if mode == Mode::PythonPort { x.floor() } else { x.round_ties_even() };
        r.max(0.0) as usize
    })
}

/// Draws `count` distinct elements of `range` uniformly (partial Fisher–Yates), or all of them.
fn draw(range: Range<usize>, count: usize, rng: &mut SplitMix64, out: &mut Vec<usize>) {
    let mut pool: Vec<usize> = range.collect();
    let count = count.min(pool.len());
    for i in 0..count {
        let j = i + rng.below((pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    out.extend_from_slice(&pool[..count]);
}

/// The selected ranks (positions in ascending-distance order) among `n` updates, ascending.
/// Deterministic given `rng`'s state. With fewer than 3 updates the α-tertile scheme selects
/// every update.
pub fn select_ranks(n: usize, prioritizer: Prioritizer, mode: Mode, rng: &mut SplitMix64) -> Vec<usize> {
    let mut out = Vec::new();
    match prioritizer {
        Prioritizer::All => out.extend(0..n),
        Prioritizer::Random { k } => draw(0..n, k, rng, &mut out),
        Prioritizer::ClosestPlusRandom { exploit, explore } => {
            let e = exploit.min(n);
            out.extend(0..e);
            draw(e..n, explore, rng, &mut out);
        }
        Prioritizer::AlphaTertiles { .. } if n < 3 => out.extend(0..n),
        Prioritizer::AlphaTertiles { alpha, beta } => {
            let beta = if mode == Mode::PythonPort { beta.min(n) } else { beta };
            let counts = tertile_counts(alpha, beta, mode);
            for (range, count) in tertiles(n, mode).into_iter().zip(counts) {
                if mode == Mode::PythonPort {
                    let end = range.start + count.min(range.len());
                    out.extend(range.start..end);
                } else {
                    draw(range, count, rng, &mut out);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// One update's place in the distance ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// The sender.
    pub client: ClientId,
    /// `‖M_j − M_ref‖₂` over the `mean` tensors.
    pub distance: f64,
    /// Whether the prioritizer selected it.
    pub selected: bool,
}

/// The filter's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Finite-distance updates in ascending distance (ties by `ClientId`).
    pub ranked: Vec<Ranked>,
    /// Updates whose distance is NaN or infinite (never selected), in `ClientId` order.
    pub rejected: Vec<ClientId>,
}

impl Selection {
    /// The selected clients, in ascending distance.
    pub fn selected(&self) -> impl Iterator<Item = &ClientId> {
        self.ranked.iter().filter(|r| r.selected).map(|r| &r.client)
    }
}

/// The integrator's assessment of one peer (§B.2 steps 3–9).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAssessment {
    /// The peer's sanitised F1 per class.
    pub f1: Vec<f64>,
    /// `S_j`, the compared familiar classes (in F's order, or by descending peer F1 when only
    /// some are compared).
    pub selected_classes: Vec<usize>,
    /// `s_{j,c}`, unbounded, parallel to `selected_classes`.
    pub scores: Vec<f64>,
    /// `κ_j = max(0, mean − std)` of the peer's F1 over `S_j` (population std).
    pub certainty: f64,
    /// `ω_{j,c}`, parallel to `selected_classes`, in `[0, 6κ_j]`.
    pub class_weights: Vec<f64>,
    /// `Ω_j`, the weight of the peer's foreign-class columns.
    pub foreign_weight: f64,
}

impl PeerAssessment {
    /// `ω_{j,c}` (0 when `c ∉ S_j`).
    pub fn class_weight(&self, class: usize) -> f64 {
        self.selected_classes.iter().position(|&c| c == class).map_or(0.0, |k| self.class_weights[k])
    }
}

fn sanitise_f1(v: f64) -> f64 {
    if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `max(0, 10·σ(x/100) − 4)`: the score-to-weight map, 1 at `x = 0`, 0 below `100·ln(2/3)`.
pub fn score_weight(score: f64) -> f64 {
    (10.0 * sigmoid(score / 100.0) - 4.0).max(0.0)
}

/// Assesses one peer from the reference model's F1 (`own_f1`) and the peer's (`peer_f1`), both
/// indexed by class (§B.2 steps 3–9):
///
/// - `S_j` = F when `compared ≥ |F|`, else the `compared` classes of F with the highest peer F1
///   (ties by F's order);
/// - `δ = 10·|f_c − f_{j,c}|`; `s = δ^(3+f_c)` if the peer is better on `c`, else `−δ^(4+f_c)`;
///   `ŝ = max(−100, s)`;
/// - `κ_j = max(0, mean − std)` of the peer's F1 over `S_j`;
/// - `ω_{j,c} = κ_j · score_weight(ŝ_{j,c})`; `Ω_j = κ_j · score_weight(Σ_c s_{j,c})`.
///
/// F1 values are sanitised (NaN → 0, clamped to [0, 1]); classes beyond a vector's length score 0.
pub fn assess_peer(own_f1: &[f64], peer_f1: &[f64], familiar: &[usize], compared: usize) -> PeerAssessment {
    let f = |v: &[f64], c: usize| sanitise_f1(v.get(c).copied().unwrap_or(0.0));
    let selected_classes: Vec<usize> = if compared >= familiar.len() {
        familiar.to_vec()
    } else {
        let mut s = familiar.to_vec();
        s.sort_by(|&a, &b| f(peer_f1, b).total_cmp(&f(peer_f1, a)));
        s.truncate(compared);
        s
    };
    let scores: Vec<f64> = selected_classes
        .iter()
        .map(|&c| {
            let (mine, theirs) = (f(own_f1, c), f(peer_f1, c));
            let delta = 10.0 * (mine - theirs).abs();
            if theirs > mine {
                delta.powf(3.0 + mine)
            } else {
                -delta.powf(4.0 + mine)
            }
        })
        .collect();
    let values: Vec<f64> = selected_classes.iter().map(|&c| f(peer_f1, c)).collect();
    let certainty = if values.is_empty() {
        0.0
    } else {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean - var.sqrt()).max(0.0)
    };
    let class_weights = scores.iter().map(|&s| certainty * score_weight(s.max(-100.0))).collect();
    let foreign_weight = certainty * score_weight(scores.iter().sum());
    PeerAssessment {
        f1: (0..own_f1.len().max(peer_f1.len())).map(|c| f(peer_f1, c)).collect(),
        selected_classes,
        scores,
        certainty,
        class_weights,
        foreign_weight,
    }
}

/// The shape of the output tensor: `rows` hidden units × `classes`, classes along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLayout {
    /// Hidden units h.
    pub rows: usize,
    /// Classes C.
    pub classes: usize,
    /// The class axis.
    pub axis: ClassAxis,
}

impl OutputLayout {
    /// The layout of a 2-D tensor of `shape` with classes along `axis`.
    pub fn of(shape: &[usize], axis: ClassAxis) -> Option<OutputLayout> {
        match (shape, axis) {
            (&[h, c], ClassAxis::Columns) | (&[c, h], ClassAxis::Rows) => {
                Some(OutputLayout { rows: h, classes: c, axis })
            }
            _ => None,
        }
    }

    /// The class of flat element `e` (C order).
    pub fn class_of(&self, e: usize) -> usize {
        match self.axis {
            ClassAxis::Columns => e % self.classes,
            ClassAxis::Rows => e / self.rows.max(1),
        }
    }
}

/// Integrates the output layer (§B.2 steps 8 and 10): for a familiar class `c`
/// `M′[:,c] = (M[:,c] + Σ_j ω_{j,c} M_j[:,c]) / (1 + Σ_j ω_{j,c})`, for a foreign class
/// `M″[:,c] = (M[:,c] + Σ_j Ω_j M_j[:,c]) / (1 + Σ_j Ω_j)`. `own` is the reference model's
/// output tensor (flat, C order); each peer gives its output tensor (same length) and its
/// assessment. One pass over each peer tensor.
///
/// # Panics
/// If a peer tensor is shorter than `own`.
pub fn integrate_output(
    own: &[f64],
    layout: OutputLayout,
    familiar: &[usize],
    peers: &[(TensorData<'_>, &PeerAssessment)],
) -> Vec<f64> {
    let mut num = vec![0.0f64; own.len()];
    let mut den = vec![0.0f64; layout.classes];
    accumulate_output(&mut num, &mut den, layout, familiar, peers);
    finish_output(own, &num, &den, layout)
}

/// The peers' share of [`integrate_output`]: `num[e] += w_{j,c} M_j[e]` (`c` the class of `e`,
/// zero weights skipped) and `den[c] += w_{j,c}`, peer after peer. Sums from several sets of
/// peers add up (the two-phase protocol sums the nodes' shares).
///
/// # Panics
/// If a peer tensor is shorter than `num`.
pub fn accumulate_output(
    num: &mut [f64],
    den: &mut [f64],
    layout: OutputLayout,
    familiar: &[usize],
    peers: &[(TensorData<'_>, &PeerAssessment)],
) {
    let classes = layout.classes;
    let is_familiar: Vec<bool> = (0..classes).map(|c| familiar.contains(&c)).collect();
    let mut w = vec![0.0f64; classes];
    for (x, a) in peers {
        for (c, wc) in w.iter_mut().enumerate() {
            *wc = if is_familiar[c] { a.class_weight(c) } else { a.foreign_weight };
            den[c] += *wc;
        }
        for (e, n) in num.iter_mut().enumerate() {
            let wc = w[layout.class_of(e)];
            if wc > 0.0 {
                *n += wc * x.get_f64(e);
            }
        }
    }
}

/// `(own[e] + num[e]) / (1 + den[c])`, `c` the class of `e` (the reference model keeps weight 1).
pub fn finish_output(own: &[f64], num: &[f64], den: &[f64], layout: OutputLayout) -> Vec<f64> {
    own.iter().zip(num).enumerate().map(|(e, (m, n))| (m + n) / (1.0 + den[layout.class_of(e)])).collect()
}

/// Subtracts from every class column its mean over the hidden units (`Node.kt` post-processing,
/// §B.2 step 11).
pub fn center_columns(m: &mut [f64], layout: OutputLayout) {
    if layout.rows == 0 {
        return;
    }
    let mut mean = vec![0.0f64; layout.classes];
    for (e, v) in m.iter().enumerate() {
        mean[layout.class_of(e)] += v;
    }
    mean.iter_mut().for_each(|s| *s /= layout.rows as f64);
    for (e, v) in m.iter_mut().enumerate() {
        *v -= mean[layout.class_of(e)];
    }
}

/// One Bristle round's report.
#[derive(Debug, Clone, PartialEq)]
pub struct BristleRound {
    /// Round index.
    pub round: u64,
    /// The filter's outcome.
    pub selection: Selection,
    /// The reference model's F1 per class (empty without an evaluator).
    pub reference_f1: Vec<f64>,
    /// Every selected peer's assessment (empty without an evaluator).
    pub assessments: BTreeMap<ClientId, PeerAssessment>,
}

struct Integrator {
    config: IntegratorConfig,
    evaluator: Box<dyn ClassEvaluator>,
}

impl fmt::Debug for Integrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Integrator")
            .field("config", &self.config)
            .field("evaluator", &self.evaluator)
            .finish()
    }
}

/// Bristle on the server: the distance prioritizer as a filter, then either the performance-based
/// integrator (with a [`ClassEvaluator`]) or the weighted mean of the selection. Implements
/// [`Strategy`] as a whole-cohort strategy.
#[derive(Debug)]
pub struct Bristle {
    config: BristleConfig,
    integrator: Option<Integrator>,
    own_model: Option<Parameters>,
    round: u64,
    last: Option<BristleRound>,
}

fn same_manifest(a: &ModelManifest, b: &ModelManifest) -> bool {
    std::ptr::eq(a, b) || a == b
}

fn view<'a>(u: &UpdateView<'a>, i: usize) -> Result<TensorData<'a>, BristleError> {
    u.tensor(i).map_err(|_| BristleError::Misaligned(u.manifest.tensors()[i].name.clone()))
}

/// Checks updates against `manifest`: same manifest, one update per client, readable tensors.
fn check_views(manifest: &ModelManifest, cohort: &[UpdateView<'_>]) -> Result<(), BristleError> {
    let mut seen = BTreeSet::new();
    for u in cohort {
        if !same_manifest(u.manifest, manifest) {
            return Err(BristleError::ManifestMismatch("update and global model differ in manifest"));
        }
        if !seen.insert(u.client) {
            return Err(BristleError::DuplicateClient(u.client.clone()));
        }
        for i in 0..manifest.tensors().len() {
            view(u, i)?;
        }
    }
    Ok(())
}

/// `‖M_j − M_ref‖²` over the `mean` tensors for every update of `cohort` (in its order), the
/// reference being `own` if set, else `global`. With delta updates, update `j` stands for
/// `global + Δ_j` (and against `global` itself the distance is `‖Δ_j‖`). One pass over each
/// update; each update's sum is computed alone, so it does not depend on the rest of the cohort.
fn distances_sq(
    own: Option<&Parameters>,
    global: &Parameters,
    delta: bool,
    cohort: &[UpdateView<'_>],
) -> Result<Vec<f64>, BristleError> {
    let m = global.manifest();
    let mut sq = vec![0.0f64; cohort.len()];
    let mut views = Vec::with_capacity(cohort.len());
    for (i, spec) in m.tensors().iter().enumerate() {
        if spec.policy != AggregationPolicy::Mean {
            continue;
        }
        views.clear();
        for u in cohort {
            views.push(view(u, i)?);
        }
        match own {
            // ‖(global + Δ) − global‖ = ‖Δ‖.
            None if delta => scan::visit(&views, scan::SumSq { out: &mut sq }),
            _ => {
                let reference = own.unwrap_or(global).tensor(i);
                let base = delta.then(|| global.tensor(i));
                scan::visit(&views, scan::DistSq { out: &mut sq, reference, base });
            }
        }
    }
    Ok(sq)
}

impl Bristle {
    /// The filter alone: the selected updates are averaged with their weights.
    ///
    /// # Errors
    /// [`BristleError::InvalidConfig`] for α outside [0, 1].
    pub fn new(config: BristleConfig) -> Result<Bristle, BristleError> {
        if let Prioritizer::AlphaTertiles { alpha, .. } = config.prioritizer {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(BristleError::InvalidConfig(format!("alpha {alpha} must be in [0, 1]")));
            }
        }
        Ok(Bristle { config, integrator: None, own_model: None, round: 0, last: None })
    }

    /// The filter followed by the performance-based integrator of `integrator.output_tensor`,
    /// scored by `evaluator`. The tensor's shape is checked against each round's manifest.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_integrator(
        config: BristleConfig,
        integrator: IntegratorConfig,
        evaluator: Box<dyn ClassEvaluator>,
    ) -> Result<Bristle, BristleError> {
        let mut b = Bristle::new(config)?;
        b.integrator = Some(Integrator { config: integrator, evaluator });
        Ok(b)
    }

    /// The configuration.
    pub fn config(&self) -> &BristleConfig {
        &self.config
    }

    /// The index of the next round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Sets (or clears, with `None`) the "receiver's own model" used as the distance reference
    /// and as the integrator's own model instead of the global model.
    pub fn set_own_model(&mut self, model: Option<Parameters>) {
        self.own_model = model;
    }

    /// The last round's report.
    pub fn last_round(&self) -> Option<&BristleRound> {
        self.last.as_ref()
    }

    fn validate(&self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<(), BristleError> {
        if cohort.is_empty() {
            return Err(BristleError::EmptyCohort);
        }
        let m = global.manifest();
        if self.own_model.as_ref().is_some_and(|o| !same_manifest(o.manifest(), m)) {
            return Err(BristleError::ManifestMismatch("own model and global model differ in manifest"));
        }
        check_views(m, cohort)
    }

    /// The distance of every update of `cohort` (in cohort order) to the reference model (the own
    /// model if set, else `global`), over the `mean` tensors. With delta updates, update `j`
    /// stands for `global + Δ_j`. One pass over each update.
    ///
    /// # Errors
    /// [`BristleError::EmptyCohort`], [`BristleError::DuplicateClient`],
    /// [`BristleError::ManifestMismatch`], [`BristleError::Misaligned`].
    pub fn distances(
        &self,
        cohort: &[UpdateView<'_>],
        global: &Parameters,
    ) -> Result<Vec<f64>, BristleError> {
        self.validate(cohort, global)?;
        let delta = self.config.update_kind == UpdateKind::Delta;
        let sq = distances_sq(self.own_model.as_ref(), global, delta, cohort)?;
        Ok(sq.into_iter().map(f64::sqrt).collect())
    }

    /// The filter: ranks the cohort by distance to the reference and selects with the
    /// configured prioritizer, drawing from this round's seeded generator. Does not change state.
    ///
    /// # Errors
    /// As [`Self::distances`].
    pub fn select(&self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Selection, BristleError> {
        let d = self.distances(cohort, global)?;
        Ok(self.rank(cohort.iter().zip(d).map(|(u, d)| (u.client.clone(), d)).collect()))
    }

    /// Ranks `(client, distance)` pairs (any order) by (distance, client), sets aside the
    /// non-finite ones and selects with this round's seeded draws: the same selection however
    /// the pairs were gathered.
    fn rank(&self, entries: Vec<(ClientId, f64)>) -> Selection {
        let (mut ranked, mut rejected): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|(_, d)| d.is_finite());
        ranked.sort_by(|(a, x), (b, y)| x.total_cmp(y).then_with(|| a.cmp(b)));
        rejected.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rng = SplitMix64::for_round(self.config.seed, self.round);
        let ranks = select_ranks(ranked.len(), self.config.prioritizer, self.config.mode, &mut rng);
        let mut ranked: Vec<Ranked> = ranked
            .into_iter()
            .map(|(client, distance)| Ranked { client, distance, selected: false })
            .collect();
        for r in ranks {
            ranked[r].selected = true;
        }
        Selection { ranked, rejected: rejected.into_iter().map(|r| r.0).collect() }
    }

    fn run(
        &mut self,
        cohort: &[UpdateView<'_>],
        global: &Parameters,
    ) -> Result<(Parameters, BristleRound), BristleError> {
        let selection = self.select(cohort, global)?;
        let chosen: BTreeSet<&ClientId> = selection.selected().collect();
        if chosen.is_empty() {
            return Err(BristleError::NothingSelected {
                received: cohort.len(),
                rejected: selection.rejected.len(),
            });
        }
        // Selected updates in ClientId order, so sums do not depend on the cohort's order.
        let mut selected: Vec<UpdateView<'_>> =
            cohort.iter().filter(|u| chosen.contains(u.client)).copied().collect();
        selected.sort_by(|a, b| a.client.cmp(b.client));
        let manifest = Arc::clone(global.manifest());
        let mut partial = PartialAggregate::new(Arc::clone(&manifest));
        partial.fold_batch(&selected)?;
        let mut out = FedAvg { update_kind: self.config.update_kind, server_learning_rate: 1.0 }
            .finish(&partial, global)?;
        let mut report = BristleRound {
            round: self.round,
            selection,
            reference_f1: Vec::new(),
            assessments: BTreeMap::new(),
        };
        if let Some(integrator) = self.integrator.as_mut() {
            let reference = self.own_model.as_ref().unwrap_or(global);
            let delta = self.config.update_kind == UpdateKind::Delta;
            let done = integrate(integrator, &selected, reference, global, delta)?;
            write_output(&mut out, done.index, done.values)?;
            report.reference_f1 = done.reference_f1;
            report.assessments = done.assessments;
        }
        Ok((out, report))
    }
}

/// Writes the integrated output tensor `index` into `out` and checks it finite: FedAvg's
/// `finish` checked every other tensor, the integrated one may overflow its dtype (e.g. f16).
fn write_output(out: &mut Parameters, index: usize, values: Vec<f64>) -> Result<(), BristleError> {
    out.write_tensor_f64(index, values.into_iter());
    if out.tensor_f64(index).iter().any(|v| !v.is_finite()) {
        let name = out.manifest().tensors()[index].name.clone();
        return Err(BristleError::Aggregate(Error::NonFiniteResult(name)));
    }
    Ok(())
}

/// The integrator's result: the output tensor's index and values, and the report's parts.
struct Integrated {
    index: usize,
    values: Vec<f64>,
    reference_f1: Vec<f64>,
    assessments: BTreeMap<ClientId, PeerAssessment>,
}

/// What the integrator needs to know about a manifest: the output tensor's index and layout,
/// the familiar classes F (sorted, distinct) and φ, the classes compared per peer.
#[derive(Debug, Clone)]
struct OutputPlan {
    index: usize,
    layout: OutputLayout,
    familiar: Vec<usize>,
    compared: usize,
}

impl OutputPlan {
    fn new(cfg: &IntegratorConfig, manifest: &ModelManifest) -> Result<OutputPlan, BristleError> {
        let index = manifest.position(&cfg.output_tensor).ok_or_else(|| {
            BristleError::InvalidConfig(format!("no tensor {:?} in the manifest", cfg.output_tensor))
        })?;
        let layout = OutputLayout::of(&manifest.tensors()[index].shape, cfg.class_axis).ok_or_else(|| {
            BristleError::InvalidConfig(format!("output tensor {:?} is not 2-D", cfg.output_tensor))
        })?;
        let classes = layout.classes;
        let familiar: Vec<usize> = match &cfg.familiar_classes {
            None => (0..classes).collect(),
            Some(f) => {
                let set: BTreeSet<usize> = f.iter().copied().collect();
                if set.iter().any(|&c| c >= classes) {
                    return Err(BristleError::InvalidConfig(format!("a familiar class is >= {classes}")));
                }
                set.into_iter().collect()
            }
        };
        let compared = cfg.compared_classes.unwrap_or(familiar.len());
        Ok(OutputPlan { index, layout, familiar, compared })
    }

    /// The integrated output tensor from the peers' summed share (§B.2 steps 8, 10 and 11):
    /// [`finish_output`] on the reference model's tensor, then column centring if configured.
    fn finish(&self, cfg: &IntegratorConfig, reference: &Parameters, num: &[f64], den: &[f64]) -> Vec<f64> {
        let own = reference.tensor_f64(self.index);
        let mut values = finish_output(&own, num, den, self.layout);
        if cfg.center_columns {
            center_columns(&mut values, self.layout);
        }
        values
    }
}

/// The evaluator's F1 per class of `candidate`, checked for length and sanitised.
fn evaluate(
    evaluator: &mut dyn ClassEvaluator,
    classes: usize,
    candidate: Candidate<'_>,
) -> Result<Vec<f64>, BristleError> {
    let f1 = evaluator
        .class_f1(&candidate)
        .map_err(|source| BristleError::Evaluator { client: candidate.client.cloned(), source })?;
    if f1.len() != classes {
        return Err(BristleError::F1Length { expected: classes, got: f1.len() });
    }
    Ok(f1.into_iter().map(sanitise_f1).collect())
}

/// A set of peers' share of the integration: each one's F1 and assessment, and their
/// [`accumulate_output`] sums.
struct PeerShare {
    f1: Vec<(ClientId, Vec<f64>)>,
    assessments: BTreeMap<ClientId, PeerAssessment>,
    numerator: Vec<f64>,
    denominator: Vec<f64>,
}

/// Evaluates every update of `selected` (in its order; with delta updates the candidate is
/// `global + Δ`, materialised one at a time), assesses it against `reference_f1` and
/// accumulates its share of the output layer's integration.
fn integrate_peers(
    evaluator: &mut dyn ClassEvaluator,
    plan: &OutputPlan,
    reference_f1: &[f64],
    selected: &[UpdateView<'_>],
    global: &Parameters,
    delta: bool,
) -> Result<PeerShare, BristleError> {
    let manifest = global.manifest();
    let numel = manifest.slots()[plan.index].numel;
    let mut share = PeerShare {
        f1: Vec::with_capacity(selected.len()),
        assessments: BTreeMap::new(),
        numerator: vec![0.0; numel],
        denominator: vec![0.0; plan.layout.classes],
    };
    for u in selected {
        let materialised = if delta { Some(candidate_model(u, global)?) } else { None };
        let bytes = materialised.as_ref().map_or(u.bytes, |p| p.as_bytes());
        let f1 =
            evaluate(evaluator, plan.layout.classes, Candidate { manifest, bytes, client: Some(u.client) })?;
        let assessment = assess_peer(reference_f1, &f1, &plan.familiar, plan.compared);
        let tensor = match &materialised {
            Some(p) => p.tensor(plan.index),
            None => view(u, plan.index)?,
        };
        let (num, den) = (&mut share.numerator, &mut share.denominator);
        accumulate_output(num, den, plan.layout, &plan.familiar, &[(tensor, &assessment)]);
        share.assessments.insert(u.client.clone(), assessment);
        share.f1.push((u.client.clone(), f1));
    }
    Ok(share)
}

/// The model a delta update stands for: `global + Δ`, rounded to the manifest's dtypes.
fn candidate_model(u: &UpdateView<'_>, global: &Parameters) -> Result<Parameters, BristleError> {
    let manifest = global.manifest();
    let mut p = Parameters::zeros(Arc::clone(manifest));
    for t in 0..manifest.tensors().len() {
        let (g, x) = (global.tensor(t), view(u, t)?);
        p.write_tensor_f64(t, (0..manifest.slots()[t].numel).map(|e| g.get_f64(e) + x.get_f64(e)));
    }
    Ok(p)
}

/// §B.2 steps 2–11 on the selected updates (in `ClientId` order).
fn integrate(
    integrator: &mut Integrator,
    selected: &[UpdateView<'_>],
    reference: &Parameters,
    global: &Parameters,
    delta: bool,
) -> Result<Integrated, BristleError> {
    let plan = OutputPlan::new(&integrator.config, reference.manifest())?;
    let evaluator = integrator.evaluator.as_mut();
    let reference_f1 = evaluate(
        evaluator,
        plan.layout.classes,
        Candidate { manifest: reference.manifest(), bytes: reference.as_bytes(), client: None },
    )?;
    let share = integrate_peers(evaluator, &plan, &reference_f1, selected, global, delta)?;
    let values = plan.finish(&integrator.config, reference, &share.numerator, &share.denominator);
    Ok(Integrated { index: plan.index, values, reference_f1, assessments: share.assessments })
}

/// The persisted form of a [`Bristle`] ([`crate::state`]): the configuration (checked on
/// restore), the round counter the seeded draws derive from, and the own model if one is set.
/// The last round's report is a diagnostic and is not kept.
#[derive(Serialize, Deserialize)]
struct BristleState {
    config: BristleConfig,
    round: u64,
    own_model: Option<(ModelManifest, Bin)>,
}

impl Bristle {
    fn to_state(&self) -> BristleState {
        BristleState {
            config: self.config.clone(),
            round: self.round,
            own_model: self
                .own_model
                .as_ref()
                .map(|p| ((**p.manifest()).clone(), Bin(p.as_bytes().to_vec()))),
        }
    }

    /// The round counter and own model of `s`, checked against this configuration.
    fn state_parts(&self, s: BristleState) -> Result<(u64, Option<Parameters>)> {
        if s.config != self.config {
            return Err(mismatch(format!("saved with {:?}, this filter has {:?}", s.config, self.config)));
        }
        let own = match s.own_model {
            None => None,
            Some((manifest, bytes)) => {
                let mut p = Parameters::zeros(Arc::new(manifest));
                if bytes.0.len() != p.as_bytes().len() {
                    return Err(mismatch("the own model's bytes do not fit its manifest"));
                }
                p.as_bytes_mut().copy_from_slice(&bytes.0);
                crate::tensor::check_finite(p.manifest(), p.as_bytes())
                    .map_err(|e| mismatch(e.to_string()))?;
                Some(p)
            }
        };
        Ok((s.round, own))
    }
}

impl Strategy for Bristle {
    fn name(&self) -> &'static str {
        "bristle"
    }

    fn mergeability(&self) -> Mergeability {
        Mergeability::WholeCohort
    }

    fn finish(&mut self, _partial: &PartialAggregate, _global: &Parameters) -> Result<Parameters> {
        Err(Error::NotStreaming("bristle"))
    }

    /// Across nodes by the two-phase protocol ([`twophase`]).
    fn sharding(&self) -> crate::strategy::Sharding {
        crate::strategy::Sharding::TwoPhase
    }

    fn two_phase(&mut self) -> Option<crate::strategy::TwoPhase<'_>> {
        Some(crate::strategy::TwoPhase::Bristle(self))
    }

    /// Filter, then integrate (or average) the selection; the round counter advances and the
    /// report is kept for [`Bristle::last_round`] only on success.
    ///
    /// # Errors
    /// [`BristleError`]s mapped by `From<BristleError> for Error`; FedAvg's errors for the
    /// weighted mean (e.g. [`Error::InvalidWeight`]); [`Error::NonFiniteResult`].
    fn aggregate_cohort(&mut self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Parameters> {
        let (out, report) = self.run(cohort, global)?;
        self.round += 1;
        self.last = Some(report);
        Ok(out)
    }

    /// The round counter (the seeded draws of round t derive from it) and the own model.
    fn save_state(&self) -> Result<Vec<u8>> {
        crate::state::save(self.name(), &self.to_state())
    }

    /// # Errors
    /// As [`Strategy::restore_state`]; also a state saved with another [`BristleConfig`] or an
    /// own model whose bytes do not fit its manifest or are not finite.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let state = crate::state::load(self.name(), bytes)?;
        (self.round, self.own_model) = self.state_parts(state)?;
        self.last = None;
        Ok(())
    }
}
