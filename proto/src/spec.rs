//! The job specification as plain data: model manifest, strategy and its hyperparameters,
//! round policy, server optimizer and limits. Stored in KV `shoal-jobs` (msgpack), written by
//! users as JSON (`shoal job create --spec`), and wrapped by the operator's `FederatedJob` CRD
//! (feature `schema`).
//!
//! The structural checks live here ([`JobSpec::validate`]); the checks that need the maths
//! (Krum's `f` against the cohort, RFFL's reputation parameters, ...) are
//! `shoal_functions::factory::validate`, which calls this one first.

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, JobId, Staleness};
use crate::manifest::ModelManifest;

/// What the tensors of a client update hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// The client's full model parameters after local training.
    #[default]
    Parameters,
    /// Client parameters minus the base global model.
    Delta,
}

impl UpdateKind {
    /// The `Shoal-Kind` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Parameters => "parameters",
            UpdateKind::Delta => "delta",
        }
    }

    /// Parses a `Shoal-Kind` header value.
    pub fn parse(s: &str) -> Option<UpdateKind> {
        match s {
            "parameters" => Some(UpdateKind::Parameters),
            "delta" => Some(UpdateKind::Delta),
            _ => None,
        }
    }
}

fn one() -> f64 {
    1.0
}

fn default_beta() -> f64 {
    0.2
}

fn default_gamma() -> f64 {
    0.5
}

fn default_rffl_alpha() -> f64 {
    0.95
}

fn default_rth() -> f64 {
    1.0 / 3.0
}

fn default_warmup() -> u64 {
    10
}

fn yes() -> bool {
    true
}

fn default_tertile_alpha() -> f64 {
    0.4
}

fn default_tertile_beta() -> usize {
    10
}

/// Where the paper and the reference code of RFFL or Bristle differ, which to follow
/// (`algorithms.md` §A.6, §B.6); the reference code is the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum SpecMode {
    /// The reference implementation's behaviour.
    #[default]
    ReferenceCode,
    /// The paper's rules.
    Paper,
}

/// One client of a FedFix job: its compute time and importance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FedFixClient {
    /// The client.
    pub client: ClientId,
    /// τ_i, its time per local round, in ticks (≥ 1).
    pub compute_ticks: u64,
    /// p_i; `None` gives every declared client 1/M.
    #[serde(default)]
    pub importance: Option<f64>,
}

/// Which strategy aggregates the job, with its hyperparameters. Every configuration is checked
/// when the job is created ([`JobSpec::validate`]), never mid-round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum StrategySpec {
    /// FedAvg (McMahan et al., AISTATS 2017): the `num_examples`-weighted mean.
    Fedavg {
        /// η_s for delta updates (default 1).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// FedBuff (Nguyen et al., AISTATS 2022, [`FedBuffSpec`]): buffered asynchronous
    /// aggregation of deltas with staleness weights.
    Fedbuff(FedBuffSpec),
    /// FedFix (Fraboni et al., JMLR 2023): a step every period, client
    /// `i` weighted ⌈τ_i/Δt⌉·p_i. The job declares its clients.
    Fedfix {
        /// Δt in ticks.
        period_ticks: u64,
        /// η_g (default 1).
        #[serde(default = "one")]
        server_learning_rate: f64,
        /// The federation's clients.
        clients: Vec<FedFixClient>,
    },
    /// Coordinate-wise median (Yin et al., ICML 2018); weights ignored.
    Median,
    /// Coordinate-wise trimmed mean dropping ⌊β·n⌋ lowest and highest values (Yin et al. 2018).
    TrimmedMean {
        /// β in [0, 0.5) (default 0.2).
        #[serde(default = "default_beta")]
        beta: f64,
    },
    /// Krum (Blanchard et al., NeurIPS 2017): the update closest to its n − f − 2 neighbours.
    Krum {
        /// f, the Byzantine clients tolerated (needs n ≥ 2f + 3).
        byzantine: usize,
    },
    /// Multi-Krum: the `num_examples`-weighted mean of the `keep` best Krum scores.
    MultiKrum {
        /// f.
        byzantine: usize,
        /// m, the updates averaged (≤ n).
        keep: usize,
    },
    /// Bulyan (El Mhamdi et al., ICML 2018) over Krum selection (needs n ≥ 4f + 3).
    Bulyan {
        /// f.
        byzantine: usize,
    },
    /// RFFL (Xu & Lyu, FL-ICML 2021): reputation-weighted aggregation of clipped deltas, removal
    /// of low-reputation clients, per-client sparsified rewards.
    Rffl {
        /// Γ, the upload clip norm (default 0.5).
        #[serde(default = "default_gamma")]
        gamma: f64,
        /// α, the reputation EMA decay (default 0.95).
        #[serde(default = "default_rffl_alpha")]
        alpha: f64,
        /// rth, the removal threshold coefficient (default 1/3).
        #[serde(default = "default_rth")]
        rth: f64,
        /// Rounds without removal (default 10).
        #[serde(default = "default_warmup")]
        warmup_rounds: u64,
        /// The maintainer's altruism degree (default none, as the published code).
        #[serde(default)]
        altruism_degree: Option<f64>,
        /// Sparsified rewards (default true).
        #[serde(default = "yes")]
        sparsify: bool,
        /// Reference code or paper semantics.
        #[serde(default)]
        mode: SpecMode,
    },
    /// Bristle (Verbraeken et al., arXiv 2110.11006): distance-based selection with an
    /// explore/exploit split, then (when the runtime supplies a per-class evaluator) the
    /// performance-based integrator.
    Bristle {
        /// α, the exploration ratio of the tertile prioritizer (default 0.4).
        #[serde(default = "default_tertile_alpha")]
        alpha: f64,
        /// β, the updates selected (default 10).
        #[serde(default = "default_tertile_beta")]
        beta: usize,
        /// Seed of the selection's random draws.
        #[serde(default)]
        seed: u64,
        /// Reference code or paper semantics.
        #[serde(default)]
        mode: SpecMode,
    },
}

impl Default for StrategySpec {
    fn default() -> Self {
        StrategySpec::Fedavg { server_learning_rate: 1.0 }
    }
}

impl StrategySpec {
    /// Whether the strategy needs the whole cohort at once (median, Krum, RFFL, ...).
    pub fn is_whole_cohort(&self) -> bool {
        !matches!(self, StrategySpec::Fedavg { .. } | StrategySpec::Fedbuff(_) | StrategySpec::Fedfix { .. })
    }
}

/// When a round closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum RoundPolicy {
    /// Synchronous rounds: close when `cohort_size` updates are accepted, or at the deadline if
    /// at least `min_clients` were (else the round fails with `QuorumNotMet` and the previous
    /// model stands).
    Sync {
        /// Updates that complete a round.
        cohort_size: u32,
        /// Quorum at the deadline.
        min_clients: u32,
        /// Milliseconds from the round opening to its deadline.
        deadline_ms: u64,
    },
    /// FedBuff's asynchronous buffer (Nguyen et al. 2022; `algorithms.md` §C.3): a model is
    /// committed as soon as the strategy's `buffer_size` K updates are buffered, or
    /// `max_wait_ms` after the buffer opened if it holds at least one (a buffer that never fills
    /// is flushed, `bug-cases.md` row 25). Updates trained on any of the last `max_staleness`
    /// versions are folded with the staleness weight s(τ); a buffer that stays empty counts as
    /// a failed round. Needs the `fedbuff` strategy.
    Buffered {
        /// Flush a non-empty buffer this many milliseconds after it opened.
        max_wait_ms: u64,
        /// Oldest base version accepted, as versions behind the current model.
        max_staleness: u64,
    },
    /// FedFix's fixed period (Fraboni et al. 2023; `algorithms.md` §C.4): a model is committed
    /// every `period_ms` with whatever arrived (the strategy's `period_ticks` is this period;
    /// each client's compute ticks are in the same unit). An empty period commits nothing and
    /// counts as a failed round. Needs the `fedfix` strategy.
    Periodic {
        /// The period Δt, in milliseconds.
        period_ms: u64,
        /// Oldest base version accepted, as versions behind the current model.
        max_staleness: u64,
    },
}

/// Longest round deadline, FedBuff `max_wait_ms` or FedFix `period_ms` a job may set: 30 days.
pub const MAX_DEADLINE_MS: u64 = 30 * 24 * 3600 * 1000;

/// When a round of a job closes, whatever its [`RoundPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundRule {
    /// Updates that close the round at once (`u32::MAX`: none; only the deadline does).
    pub cohort_size: u32,
    /// Updates needed at the deadline to commit (else the round fails).
    pub min_clients: u32,
    /// Milliseconds from the opening to the deadline.
    pub deadline_ms: u64,
    /// Whether updates of earlier versions are folded with their staleness (asynchronous
    /// modes) instead of being rejected.
    pub asynchronous: bool,
    /// Oldest accepted base version, as versions behind the current model (0 in sync rounds).
    pub max_staleness: u64,
}

/// A job: one FL training run. Unknown fields are refused (a typo must not silently fall back
/// to a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's id (a NATS subject token).
    pub job: JobId,
    /// Every tensor of the model.
    pub manifest: ModelManifest,
    /// The aggregation strategy.
    #[serde(default)]
    pub strategy: StrategySpec,
    /// When rounds close.
    pub round_policy: RoundPolicy,
    /// What updates carry.
    #[serde(default)]
    pub update_kind: UpdateKind,
    /// Models to commit: the job is `Finished` when model version `rounds` is committed. Failed
    /// rounds (quorum not met) commit nothing and do not count, so round numbers can run ahead
    /// of versions.
    pub rounds: u64,
    /// Largest `num_examples` accepted from one update (defaults to 10^9).
    #[serde(default = "default_max_examples")]
    pub max_num_examples: u64,
    /// Consecutive failed rounds (quorum not met) after which the job fails (default 5).
    #[serde(default = "default_max_failed")]
    pub max_failed_rounds: u32,
    /// Leaves per middle aggregator across nodes (DESIGN.md §7); 0 (the default) or 1: every
    /// node's leaf sends its partial straight to the top.
    #[serde(default)]
    pub fan_in: u32,
    /// A server optimizer applied after the strategy (FedAvgM, FedAdam, FedYogi, FedAdagrad;
    /// Reddi et al., ICLR 2021). Integer and non-`mean` tensors are not put through it.
    #[serde(default)]
    pub server_optimizer: Option<ServerOptimizerSpec>,
    /// Largest update accepted, in bytes: the whole safetensors payload (header and data),
    /// inline or as an object. Default (absent): the manifest's data bytes plus its
    /// [`ModelManifest::header_allowance`]. A larger update is refused as `payload_too_large`
    /// by the SDK before it sends anything and by the gateway before it reads the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_update_bytes: Option<u64>,
    /// Most updates one synchronous round takes; a client beyond it is refused as
    /// `cohort_full`. Default (absent): `cohort_size`. Counted by each node's gateway for the
    /// updates it stages, so with several nodes a round may take up to this many per node
    /// (the top still closes the round when `cohort_size` are in). Only for `sync` rounds: a
    /// FedBuff or FedFix update that misses a buffer goes to the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clients_per_round: Option<u32>,
    /// Largest inline payload a client may publish, in bytes (headers not included; they count
    /// against the server's `max_payload` too, within [`HEADER_ALLOWANCE`]). Every node refuses
    /// a longer inline payload as `payload_too_large`; larger updates take the upload path.
    /// Filled at job creation when absent: the server's `max_payload` − [`HEADER_ALLOWANCE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_limit_bytes: Option<u64>,
    /// Bytes per chunk on the upload path (all chunks but the last have exactly this length).
    /// Filled at job creation when absent: min(1 MiB, `inline_limit_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_bytes: Option<u64>,
    /// Bytes the job's upload stream (`UPLOADS_<job>`) may hold at once: a client that floods
    /// it fills its own job's quota, no other job's. Default: twice the updates of a round
    /// (`cohort_size`, or FedBuff's `buffer_size`) × `max_update_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_quota_bytes: Option<u64>,
}

/// Bytes kept under the server's `max_payload` for an update message's headers: Shoal's headers
/// with ids of at most 64 bytes take under 600.
pub const HEADER_ALLOWANCE: u64 = 4096;

/// Most bytes per upload chunk (1 MiB).
pub const MAX_CHUNK_BYTES: u64 = 1 << 20;

fn default_max_examples() -> u64 {
    1_000_000_000
}

fn default_max_failed() -> u32 {
    5
}

/// Staleness weight s(τ) of FedBuff (Nguyen et al., "Federated Learning with Buffered
/// Asynchronous Aggregation", AISTATS 2022), as in FLSim's
/// `flsim/utils/async_trainer/async_staleness_weights.py` (`algorithms.md` §C.3).
///
/// Each function has a raw form r(τ); with `avg_staleness = Some(a)` it is normalised to
/// s(τ) = r(τ) / r(a), so s(a) = 1 (FLSim always normalises, with a = 1 by default). With
/// `None` it is r(τ) itself (the paper's s(τ) = 1/√(1+τ) is `Polynomial { exponent: 0.5,
/// avg_staleness: None }`, see [`StalenessWeight::paper`]).
///
/// The normalisation is a constant factor, so it cancels under
/// [`FedBuffNormalisation::ByWeightSum`] but scales the step under `ByBufferSize` and `Sum`
/// (by √2 for FLSim's e = 0.5, a = 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StalenessWeight {
    /// r(τ) = 1: every update counts fully.
    Constant,
    /// r(τ) = 1 if τ ≤ `cutoff`, else `value` (≥ 0; 0 discards updates staler than `cutoff`).
    Threshold {
        /// Largest staleness weighted 1.
        cutoff: u64,
        /// Weight of staler updates, finite and ≥ 0.
        value: f64,
        /// Normalise so that s(avg_staleness) = 1 (FLSim: `Some(1.0)`).
        #[serde(default)]
        avg_staleness: Option<f64>,
    },
    /// r(τ) = 1 / (1 + τ)^exponent. FLSim restricts the exponent to [0, 1]; any finite
    /// exponent ≥ 0 is accepted here.
    Polynomial {
        /// e ≥ 0 (0.5 in the FedBuff paper).
        exponent: f64,
        /// Normalise so that s(avg_staleness) = 1 (FLSim: `Some(1.0)`).
        #[serde(default)]
        avg_staleness: Option<f64>,
    },
}

impl StalenessWeight {
    /// The FedBuff paper's s(τ) = 1/√(1+τ), not normalised.
    pub fn paper() -> StalenessWeight {
        StalenessWeight::Polynomial { exponent: 0.5, avg_staleness: None }
    }

    /// FLSim's polynomial weight, normalised at its default average staleness 1:
    /// s(τ) = (2/(1+τ))^e; for e = 0.5, s(τ) = √2/√(1+τ) (test vector C-5).
    pub fn flsim_polynomial(exponent: f64) -> StalenessWeight {
        StalenessWeight::Polynomial { exponent, avg_staleness: Some(1.0) }
    }

    /// The raw (not normalised) weight at a real staleness `tau` ≥ 0.
    fn raw(&self, tau: f64) -> f64 {
        match *self {
            StalenessWeight::Constant => 1.0,
            StalenessWeight::Threshold { cutoff, value, .. } => {
                if tau <= cutoff as f64 {
                    1.0
                } else {
                    value
                }
            }
            StalenessWeight::Polynomial { exponent, .. } => 1.0 / (1.0 + tau).powf(exponent),
        }
    }

    fn avg_staleness(&self) -> Option<f64> {
        match *self {
            StalenessWeight::Constant => None,
            StalenessWeight::Threshold { avg_staleness, .. }
            | StalenessWeight::Polynomial { avg_staleness, .. } => avg_staleness,
        }
    }

    /// s(τ), dimensionless, ≥ 0. Meaningful only for a configuration that passes
    /// [`Self::validate`] (otherwise it may be NaN, which folding rejects).
    pub fn weight(&self, staleness: Staleness) -> f64 {
        let r = self.raw(staleness.0 as f64);
        match self.avg_staleness() {
            Some(a) => r / self.raw(a),
            None => r,
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`SpecError`] for a negative or non-finite exponent or threshold value,
    /// a negative or non-finite `avg_staleness`, or a normaliser r(avg_staleness) that is 0
    /// (a threshold with value 0 and `avg_staleness > cutoff`).
    pub fn validate(&self) -> Result<(), SpecError> {
        match *self {
            StalenessWeight::Constant => {}
            StalenessWeight::Threshold { value, .. } => {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(SpecError(format!(
                        "threshold staleness value {value} must be finite and >= 0"
                    )));
                }
            }
            StalenessWeight::Polynomial { exponent, .. } => {
                if !(exponent.is_finite() && exponent >= 0.0) {
                    return Err(SpecError(format!("staleness exponent {exponent} must be finite and >= 0")));
                }
            }
        }
        if let Some(a) = self.avg_staleness() {
            if !(a.is_finite() && a >= 0.0) {
                return Err(SpecError(format!("avg_staleness {a} must be finite and >= 0")));
            }
            let r = self.raw(a);
            if !(r.is_finite() && r > 0.0) {
                return Err(SpecError(format!(
                    "staleness weight at avg_staleness {a} is {r}: cannot normalise"
                )));
            }
        }
        Ok(())
    }
}

/// Example weight of FedBuff, as FLSim's `async_example_weights.py`, normalised at its default
/// average of one example (so `Log10` is log10(1+n)/log10(2)). Every variant gives 0 for a
/// zero-example update (discard it; FLSim asserts n > 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ExampleWeight {
    /// 1 per update (FLSim's sent140 FedBuff config).
    #[default]
    Equal,
    /// n, the update's `num_examples` (FedAvg's weighting; FLSim's `Linear`).
    NumExamples,
    /// √n.
    Sqrt,
    /// log10(1 + n) / log10(2).
    Log10,
}

impl ExampleWeight {
    /// The weight of an update trained on `num_examples` examples.
    pub fn weight(self, num_examples: u64) -> f64 {
        if num_examples == 0 {
            return 0.0;
        }
        let n = num_examples as f64;
        match self {
            ExampleWeight::Equal => 1.0,
            ExampleWeight::NumExamples => n,
            ExampleWeight::Sqrt => n.sqrt(),
            ExampleWeight::Log10 => n.ln_1p() / std::f64::consts::LN_2,
        }
    }
}

/// What FedBuff divides the buffered sum Σ_k w_k Δ_k by (`algorithms.md` §D point 5,
/// `bug-cases.md` row 26). Example: deltas `[1]`, `[1]`, `[1]` at staleness 0, 1, 3 with
/// s(τ) = 1/√(1+τ), K = 3, η_g = 1: `ByBufferSize` steps (1 + 0.7071 + 0.5)/3 = 0.7357,
/// `ByWeightSum` steps 1.0, `Sum` steps 2.2071.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FedBuffNormalisation {
    /// Divide by the configured buffer size K, as the FedBuff paper's Algorithm 1 (Δ̄/K). A
    /// **partial flush** of k < K updates (after `max_wait`) still divides by K: each update's
    /// coefficient η_g·w/K does not depend on when the flush happens, and the step is k/K as
    /// long as a full buffer's. If merged partials overshoot (k > K, concurrent leaves), it
    /// divides by k instead, so a coefficient never exceeds η_g·w/K.
    #[default]
    ByBufferSize,
    /// Divide by the sum of the buffered weights Σ w_k (a weighted mean of the deltas; the
    /// alternative raised in FedScale PR #162). A partial flush takes a full-size step from the
    /// k updates it has; staleness weights then only matter relative to each other.
    ByWeightSum,
    /// No division: Σ w_k Δ_k (FLSim's default `WEIGHTED_SUM` reducer; η_g absorbs the scale).
    /// A partial flush takes a k/K-size step, as `ByBufferSize`.
    Sum,
}

/// FedBuff's configuration (Nguyen et al., AISTATS 2022; FLSim `async_aggregators.py`;
/// `algorithms.md` §C.3): each delta is folded with weight [`ExampleWeight`] ×
/// [`StalenessWeight`], and every `buffer_size` updates (or after the round policy's
/// `max_wait_ms`) the server steps θ + η_g · Σ w_k Δ_k / norm ([`FedBuffNormalisation`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FedBuffSpec {
    /// K, updates per server step (≥ 1; FLSim's sent140 example uses 10).
    pub buffer_size: u32,
    /// s(τ).
    pub staleness: StalenessWeight,
    /// What the buffered sum is divided by.
    pub normalisation: FedBuffNormalisation,
    /// The example-count part of the weight.
    pub example_weight: ExampleWeight,
    /// η_g (finite, > 0).
    pub server_lr: f64,
}

impl FedBuffSpec {
    /// The paper's form: buffer of `buffer_size`, s(τ) = 1/√(1+τ), division by K, equal
    /// example weights, η_g = 1.
    pub fn new(buffer_size: u32) -> FedBuffSpec {
        FedBuffSpec {
            buffer_size,
            staleness: StalenessWeight::paper(),
            normalisation: FedBuffNormalisation::ByBufferSize,
            example_weight: ExampleWeight::Equal,
            server_lr: 1.0,
        }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`SpecError`] for K = 0, a bad η_g or a bad staleness function.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.buffer_size == 0 {
            return Err(SpecError("buffer_size must be at least 1".into()));
        }
        if !(self.server_lr.is_finite() && self.server_lr > 0.0) {
            return Err(SpecError(format!("server_lr {} must be finite and > 0", self.server_lr)));
        }
        self.staleness.validate()
    }

    /// The weight an update is folded with: `example_weight(num_examples) · s(staleness)`,
    /// dimensionless, ≥ 0. **0 means discard** (zero examples, or a threshold function with
    /// value 0 past its cutoff).
    pub fn update_weight(&self, num_examples: u64, staleness: Staleness) -> f64 {
        self.example_weight.weight(num_examples) * self.staleness.weight(staleness)
    }
}

/// FedAdam's bias correction of the learning rate (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum BiasCorrection {
    /// η·√(1−β₂^(t+1))/(1−β₁^(t+1)), Flower's `FedAdam`.
    #[default]
    Flower,
    /// η·√(1−β₂^t)/(1−β₁^t), Kingma & Ba's α_t.
    KingmaBa,
    /// η, Reddi et al. Algorithm 2.
    Off,
}

/// Which server optimiser, with its hyperparameters. The constructors give the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "name")]
pub enum ServerOptimizerSpec {
    /// Server SGD with momentum (Hsu et al. 2019).
    #[serde(rename = "fedavgm")]
    FedAvgM {
        /// η > 0.
        lr: f64,
        /// β in [0, 1).
        momentum: f64,
    },
    /// Adam on the server (Reddi et al. 2021).
    #[serde(rename = "fedadam")]
    FedAdam {
        /// η > 0.
        lr: f64,
        /// β₁ in [0, 1).
        beta1: f64,
        /// β₂ in [0, 1).
        beta2: f64,
        /// τ > 0, the adaptivity (ε of Adam).
        tau: f64,
        /// Learning-rate bias correction.
        #[serde(default)]
        bias_correction: BiasCorrection,
    },
    /// Yogi on the server (Reddi et al. 2021).
    #[serde(rename = "fedyogi")]
    FedYogi {
        /// η > 0.
        lr: f64,
        /// β₁ in [0, 1).
        beta1: f64,
        /// β₂ in [0, 1).
        beta2: f64,
        /// τ > 0.
        tau: f64,
    },
    /// Adagrad on the server (Reddi et al. 2021).
    #[serde(rename = "fedadagrad")]
    FedAdagrad {
        /// η > 0.
        lr: f64,
        /// β₁ in [0, 1) (Flower fixes 0: m_t = Δ_t).
        beta1: f64,
        /// τ > 0.
        tau: f64,
    },
}

impl ServerOptimizerSpec {
    /// FedAvgM with momentum β = 0.9 and η = 0.1, an effective learning rate η/(1−β) = 1 (the
    /// quantity Hsu et al. 2019 sweep). Flower's `FedAvgM` defaults are η = 1, β = 0, which is
    /// plain FedAvg; pass them explicitly for that.
    pub fn fedavgm() -> ServerOptimizerSpec {
        ServerOptimizerSpec::FedAvgM { lr: 0.1, momentum: 0.9 }
    }

    /// Flower's `FedAdam` defaults: η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-9, Flower's bias
    /// correction.
    pub fn fedadam() -> ServerOptimizerSpec {
        ServerOptimizerSpec::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-9,
            bias_correction: BiasCorrection::Flower,
        }
    }

    /// Flower's `FedYogi` defaults: η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3.
    pub fn fedyogi() -> ServerOptimizerSpec {
        ServerOptimizerSpec::FedYogi { lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 }
    }

    /// Flower's `FedAdagrad` defaults: η = 0.1, β₁ = 0 (Flower passes `beta_1=0.0` to
    /// `FedOpt`), τ = 1e-9.
    pub fn fedadagrad() -> ServerOptimizerSpec {
        ServerOptimizerSpec::FedAdagrad { lr: 0.1, beta1: 0.0, tau: 1e-9 }
    }

    /// Short name (`fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`).
    pub fn name(&self) -> &'static str {
        match self {
            ServerOptimizerSpec::FedAvgM { .. } => "fedavgm",
            ServerOptimizerSpec::FedAdam { .. } => "fedadam",
            ServerOptimizerSpec::FedYogi { .. } => "fedyogi",
            ServerOptimizerSpec::FedAdagrad { .. } => "fedadagrad",
        }
    }

    /// Whether the optimiser keeps a second moment v_t.
    pub fn has_second_moment(&self) -> bool {
        !matches!(self, ServerOptimizerSpec::FedAvgM { .. })
    }

    /// Checks the hyperparameters.
    ///
    /// # Errors
    /// [`SpecError`] naming the first one out of range.
    pub fn validate(&self) -> Result<(), SpecError> {
        fn positive(name: &str, x: f64) -> Result<(), SpecError> {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(SpecError(format!("server_optimizer {name} = {x} must be finite and > 0")))
            }
        }
        fn unit(name: &str, x: f64) -> Result<(), SpecError> {
            if (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(SpecError(format!("server_optimizer {name} = {x} must be in [0, 1)")))
            }
        }
        match *self {
            ServerOptimizerSpec::FedAvgM { lr, momentum } => {
                positive("lr", lr)?;
                unit("momentum", momentum)
            }
            ServerOptimizerSpec::FedAdam { lr, beta1, beta2, tau, .. }
            | ServerOptimizerSpec::FedYogi { lr, beta1, beta2, tau } => {
                positive("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("tau", tau)
            }
            ServerOptimizerSpec::FedAdagrad { lr, beta1, tau } => {
                positive("lr", lr)?;
                unit("beta1", beta1)?;
                positive("tau", tau)
            }
        }
    }
}

/// Why a job spec is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: {0}")]
pub struct SpecError(pub String);

impl JobSpec {
    /// Checks the spec's internal consistency: the round policy against the strategy, the
    /// deadlines, limits, the update kind each strategy needs, FedBuff's and the server
    /// optimizer's ranges. The checks that need the maths (Krum's `f` against `min_clients`,
    /// RFFL's and Bristle's parameters, FedFix's client profiles) are
    /// `shoal_functions::factory::validate`, which calls this first.
    ///
    /// # Errors
    /// [`SpecError`] naming the first problem.
    pub fn validate(&self) -> Result<(), SpecError> {
        match (&self.round_policy, &self.strategy) {
            (&RoundPolicy::Sync { cohort_size, min_clients, .. }, _) => {
                if cohort_size == 0 || min_clients == 0 || min_clients > cohort_size {
                    return Err(SpecError(format!(
                        "need 1 <= min_clients ({min_clients}) <= cohort_size ({cohort_size})"
                    )));
                }
            }
            (RoundPolicy::Buffered { .. }, StrategySpec::Fedbuff(_)) => {}
            (RoundPolicy::Periodic { .. }, StrategySpec::Fedfix { .. }) => {}
            (RoundPolicy::Buffered { .. }, _) => {
                return Err(SpecError("round_policy mode buffered needs the fedbuff strategy".into()));
            }
            (RoundPolicy::Periodic { .. }, _) => {
                return Err(SpecError("round_policy mode periodic needs the fedfix strategy".into()));
            }
        }
        let deadline_ms = self.round_rule().deadline_ms;
        if deadline_ms == 0 || deadline_ms > MAX_DEADLINE_MS {
            return Err(SpecError(format!(
                "the round policy's deadline_ms, max_wait_ms or period_ms is {deadline_ms}; it must be \
                 between 1 and {MAX_DEADLINE_MS} (30 days)"
            )));
        }
        if let StrategySpec::Fedfix { clients, .. } = &self.strategy {
            if clients.is_empty() {
                return Err(SpecError(
                    "fedfix needs its clients listed (compute_ticks, importance): an unlisted client's \
                     update cannot be weighted"
                        .into(),
                ));
            }
        }
        if self.rounds == 0 {
            return Err(SpecError("rounds must be at least 1".into()));
        }
        if self.max_num_examples == 0 {
            return Err(SpecError("max_num_examples must be positive".into()));
        }
        if self.max_failed_rounds == 0 {
            return Err(SpecError("max_failed_rounds must be at least 1".into()));
        }
        if let Some(max) = self.max_update_bytes {
            let least = self.manifest.data_bytes() as u64 + 8;
            if max < least {
                return Err(SpecError(format!(
                    "max_update_bytes {max} cannot hold the model ({least} bytes of tensors and length prefix)"
                )));
            }
        }
        match (self.max_clients_per_round, &self.round_policy) {
            (None, _) => {}
            (Some(max), &RoundPolicy::Sync { min_clients, .. }) => {
                if max < min_clients {
                    return Err(SpecError(format!(
                        "max_clients_per_round {max} is below min_clients {min_clients}: no round could commit"
                    )));
                }
            }
            (Some(_), _) => return Err(SpecError(
                "max_clients_per_round applies to sync rounds; the buffer size bounds an asynchronous round"
                    .into(),
            )),
        }
        if let StrategySpec::MultiKrum { keep: 0 | 1, .. } = self.strategy {
            return Err(SpecError("multi-krum needs keep >= 2 (keep = 1 is krum)".into()));
        }
        self.validate_strategy_kind()?;
        match &self.server_optimizer {
            Some(opt) => opt.validate(),
            None => Ok(()),
        }
    }

    /// The strategy's own ranges that need no maths, and the update kind it aggregates.
    fn validate_strategy_kind(&self) -> Result<(), SpecError> {
        match &self.strategy {
            &StrategySpec::Fedavg { server_learning_rate } => {
                if !(server_learning_rate.is_finite() && server_learning_rate > 0.0) {
                    return Err(SpecError(format!(
                        "server_learning_rate {server_learning_rate} must be finite and > 0"
                    )));
                }
                Ok(())
            }
            StrategySpec::Fedbuff(f) => {
                f.validate().map_err(|e| SpecError(format!("strategy: {}", e.0)))?;
                self.require_delta("fedbuff")
            }
            StrategySpec::Fedfix { .. } => self.require_delta("fedfix"),
            StrategySpec::Rffl { .. } => self.require_delta("rffl"),
            StrategySpec::Median => self.require_parameters("median"),
            StrategySpec::TrimmedMean { .. } => self.require_parameters("trimmed-mean"),
            StrategySpec::MultiKrum { .. } => self.require_parameters("multi-krum"),
            StrategySpec::Bulyan { .. } => self.require_parameters("bulyan"),
            StrategySpec::Krum { .. } | StrategySpec::Bristle { .. } => Ok(()),
        }
    }

    /// The largest update accepted, in bytes ([`Self::max_update_bytes`] or its default).
    pub fn update_byte_limit(&self) -> u64 {
        self.max_update_bytes
            .unwrap_or((self.manifest.data_bytes() + self.manifest.header_allowance()) as u64)
    }

    /// The largest inline payload ([`Self::inline_limit_bytes`]), once the job exists (job
    /// creation fills it); `max_payload − HEADER_ALLOWANCE` for a spec that has none.
    pub fn inline_limit(&self, max_payload: u64) -> u64 {
        self.inline_limit_bytes.unwrap_or(max_payload.saturating_sub(HEADER_ALLOWANCE))
    }

    /// Bytes per upload chunk ([`Self::chunk_bytes`], or its default from the inline limit).
    pub fn chunk_limit(&self, max_payload: u64) -> u64 {
        self.chunk_bytes.unwrap_or(MAX_CHUNK_BYTES.min(self.inline_limit(max_payload))).max(1)
    }

    /// The updates one round takes: `cohort_size` (sync), `buffer_size` (FedBuff), the listed
    /// clients (FedFix); at least 1. Each stays un-acked in JetStream until its round commits.
    pub fn updates_per_round(&self) -> u64 {
        let n = match (&self.round_policy, &self.strategy) {
            (RoundPolicy::Sync { cohort_size, .. }, _) => u64::from(*cohort_size),
            (_, StrategySpec::Fedbuff(f)) => u64::from(f.buffer_size),
            (RoundPolicy::Periodic { .. }, StrategySpec::Fedfix { clients, .. }) => clients.len() as u64,
            _ => 1,
        };
        n.max(1)
    }

    /// The job's upload quota ([`Self::upload_quota_bytes`], or twice a round of updates).
    pub fn upload_quota(&self) -> u64 {
        self.upload_quota_bytes
            .unwrap_or(self.updates_per_round().saturating_mul(2).saturating_mul(self.update_byte_limit()))
    }

    /// Fills the limits a client must respect ([`Self::inline_limit_bytes`], [`Self::chunk_bytes`],
    /// [`Self::upload_quota_bytes`]) for a server whose `max_payload` is `max_payload` (job
    /// creation does this, so clients read them from the stored spec).
    ///
    /// # Errors
    /// [`SpecError`] when a given inline limit or chunk size does not fit `max_payload` with its
    /// headers, or is zero.
    pub fn with_published_limits(mut self, max_payload: u64) -> Result<JobSpec, SpecError> {
        let most = max_payload.saturating_sub(HEADER_ALLOWANCE);
        let inline = self.inline_limit(max_payload);
        if inline == 0 || inline > most {
            return Err(SpecError(format!(
                "inline_limit_bytes {inline} must be between 1 and {most} (the server's max_payload {max_payload} \
                 minus {HEADER_ALLOWANCE} bytes of headers)"
            )));
        }
        if self.chunk_bytes == Some(0) {
            return Err(SpecError(
                "chunk_bytes 0: an upload chunk holds at least one byte (omit it for the default)".into(),
            ));
        }
        let chunk = self.chunk_limit(max_payload);
        if chunk > most.min(MAX_CHUNK_BYTES) {
            return Err(SpecError(format!(
                "chunk_bytes {chunk} must be at most {} (1 MiB, and max_payload minus headers)",
                most.min(MAX_CHUNK_BYTES)
            )));
        }
        if let Some(q) = self.upload_quota_bytes {
            // A quota below one update would refuse every upload with "retry later", forever.
            let one = self.update_byte_limit();
            if one > inline && q < one {
                return Err(SpecError(format!(
                    "upload_quota_bytes {q} is below one update on the upload path ({one} bytes): every upload \
                     would be refused; omit it for the default (two rounds of updates)"
                )));
            }
        }
        self.inline_limit_bytes = Some(inline);
        self.chunk_bytes = Some(chunk);
        self.upload_quota_bytes = Some(self.upload_quota());
        Ok(self)
    }

    /// Most updates a round takes ([`Self::max_clients_per_round`], default `cohort_size`);
    /// `None` for asynchronous rounds.
    pub fn round_client_limit(&self) -> Option<u32> {
        match self.round_policy {
            RoundPolicy::Sync { cohort_size, .. } => Some(self.max_clients_per_round.unwrap_or(cohort_size)),
            _ => None,
        }
    }

    /// When this job's rounds close.
    pub fn round_rule(&self) -> RoundRule {
        match self.round_policy {
            RoundPolicy::Sync { cohort_size, min_clients, deadline_ms } => {
                RoundRule { cohort_size, min_clients, deadline_ms, asynchronous: false, max_staleness: 0 }
            }
            RoundPolicy::Buffered { max_wait_ms, max_staleness } => RoundRule {
                cohort_size: match &self.strategy {
                    StrategySpec::Fedbuff(f) => f.buffer_size,
                    _ => u32::MAX,
                },
                min_clients: 1,
                deadline_ms: max_wait_ms,
                asynchronous: true,
                max_staleness,
            },
            RoundPolicy::Periodic { period_ms, max_staleness } => RoundRule {
                cohort_size: u32::MAX,
                min_clients: 1,
                deadline_ms: period_ms,
                asynchronous: true,
                max_staleness,
            },
        }
    }

    /// Refuses delta updates for a strategy that returns its aggregate as the new model.
    ///
    /// # Errors
    /// [`SpecError`] naming the strategy.
    pub fn require_parameters(&self, name: &str) -> Result<(), SpecError> {
        // The robust rules return their aggregate as the new model: over deltas that would
        // commit a delta as parameters.
        if self.update_kind == UpdateKind::Parameters {
            Ok(())
        } else {
            Err(SpecError(format!(
                "strategy {name} aggregates full parameters: set \"update_kind\": \"parameters\""
            )))
        }
    }

    /// Refuses full-parameter updates for a strategy that steps with deltas.
    ///
    /// # Errors
    /// [`SpecError`] naming the strategy.
    pub fn require_delta(&self, name: &str) -> Result<(), SpecError> {
        if self.update_kind == UpdateKind::Delta {
            Ok(())
        } else {
            Err(SpecError(format!("strategy {name} aggregates deltas: set \"update_kind\": \"delta\"")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DType, TensorSpec};

    fn spec(policy: RoundPolicy) -> JobSpec {
        let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![250])]).unwrap();
        serde_json::from_value(serde_json::json!({
            "job": "j", "manifest": manifest, "round_policy": policy, "rounds": 1
        }))
        .unwrap()
    }

    fn sync() -> RoundPolicy {
        RoundPolicy::Sync { cohort_size: 4, min_clients: 2, deadline_ms: 1000 }
    }

    /// The limits' defaults: 1000 data bytes + 64 KiB + 256 + 6 (one tensor named "w"); the
    /// cohort size; no limit in asynchronous rounds. Absent limits are not serialised, so a
    /// spec without them reads the same in a node that predates them.
    #[test]
    fn limits_default_from_the_manifest_and_the_cohort() {
        let s = spec(sync());
        assert_eq!(s.max_update_bytes, None);
        assert_eq!(s.update_byte_limit(), 1000 + 65_536 + 262);
        assert_eq!(s.round_client_limit(), Some(4));
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("max_update_bytes") && !json.contains("max_clients_per_round"), "{json}");
        let fedbuff = JobSpec {
            strategy: StrategySpec::Fedbuff(FedBuffSpec::new(3)),
            update_kind: UpdateKind::Delta,
            ..spec(RoundPolicy::Buffered { max_wait_ms: 100, max_staleness: 2 })
        };
        fedbuff.validate().unwrap();
        assert_eq!(fedbuff.round_client_limit(), None);
        let explicit = JobSpec { max_update_bytes: Some(5000), max_clients_per_round: Some(3), ..s.clone() };
        explicit.validate().unwrap();
        assert_eq!((explicit.update_byte_limit(), explicit.round_client_limit()), (5000, Some(3)));
    }

    /// Deadlines beyond 30 days (where `opened_at + deadline` could wrap) and a FedFix job
    /// without its client list are refused when the job is created.
    #[test]
    fn unbounded_deadlines_and_unweighted_fedfix_are_refused() {
        let huge = spec(RoundPolicy::Sync { cohort_size: 4, min_clients: 2, deadline_ms: u64::MAX });
        assert!(huge.validate().unwrap_err().0.contains("30 days"), "{:?}", huge.validate());
        let month = spec(RoundPolicy::Sync { cohort_size: 4, min_clients: 2, deadline_ms: MAX_DEADLINE_MS });
        month.validate().unwrap();
        let fedfix = |clients: serde_json::Value| JobSpec {
            strategy: serde_json::from_value(
                serde_json::json!({"name": "fedfix", "period_ticks": 2, "clients": clients}),
            )
            .unwrap(),
            update_kind: UpdateKind::Delta,
            ..spec(RoundPolicy::Periodic { period_ms: 1000, max_staleness: 2 })
        };
        assert!(fedfix(serde_json::json!([])).validate().unwrap_err().0.contains("clients listed"));
        fedfix(serde_json::json!([{"client": "a", "compute_ticks": 1}])).validate().unwrap();
    }

    /// Limits that no update or round could satisfy are refused when the job is created.
    #[test]
    fn impossible_limits_are_refused() {
        let s = spec(sync());
        let small = JobSpec { max_update_bytes: Some(1007), ..s.clone() };
        assert!(small.validate().unwrap_err().0.contains("cannot hold the model"));
        JobSpec { max_update_bytes: Some(1008), ..s.clone() }.validate().unwrap();
        let few = JobSpec { max_clients_per_round: Some(1), ..s.clone() };
        assert!(few.validate().unwrap_err().0.contains("below min_clients"));
        let fedbuff = JobSpec {
            strategy: StrategySpec::Fedbuff(FedBuffSpec::new(3)),
            update_kind: UpdateKind::Delta,
            max_clients_per_round: Some(3),
            ..spec(RoundPolicy::Buffered { max_wait_ms: 100, max_staleness: 2 })
        };
        assert!(fedbuff.validate().unwrap_err().0.contains("sync rounds"));
    }
}
