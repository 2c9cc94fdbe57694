//! The job specification: model manifest, strategy, round policy and limits. Shared by the
//! runtime (stored in KV `shoal-jobs`) and the operator (the `FederatedJob` CRD, later).

use serde::{Deserialize, Serialize};

use crate::fedavg::FedAvg;
use crate::ids::JobId;
use crate::strategy::Strategy;
use crate::tensor::ModelManifest;

/// What the tensors of a client update hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
pub struct FedFixClient {
    /// The client.
    pub client: crate::ClientId,
    /// τ_i, its time per local round, in ticks (≥ 1).
    pub compute_ticks: u64,
    /// p_i; `None` gives every declared client 1/M.
    #[serde(default)]
    pub importance: Option<f64>,
}

/// Which strategy aggregates the job, with its hyperparameters. Every configuration is checked
/// when the job is created ([`JobSpec::validate`]), never mid-round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum StrategySpec {
    /// [`FedAvg`]: the `num_examples`-weighted mean.
    Fedavg {
        /// η_s for delta updates (default 1).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// [`crate::asynchronous::FedBuff`] (Nguyen et al., AISTATS 2022): buffered asynchronous
    /// aggregation of deltas with staleness weights.
    Fedbuff(crate::asynchronous::FedBuff),
    /// [`crate::asynchronous::FedFix`] (Fraboni et al., JMLR 2023): a step every period, client
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
    pub server_optimizer: Option<crate::server_opt::ServerOptimizerConfig>,
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
}

fn default_max_examples() -> u64 {
    1_000_000_000
}

fn default_max_failed() -> u32 {
    5
}

/// Job-specific pieces the runtime plugs into a strategy.
#[derive(Debug, Default)]
pub struct StrategyPlugins {
    /// Bristle's performance-based integrator: which tensor to integrate class by class, and the
    /// evaluator scoring candidate models per class on a server-held validation split. Without
    /// it Bristle averages the updates its prioritizer selects.
    pub bristle_integrator:
        Option<(crate::bristle::IntegratorConfig, Box<dyn crate::bristle::ClassEvaluator>)>,
}

/// Why a job spec is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: {0}")]
pub struct SpecError(pub String);

impl JobSpec {
    /// Checks the spec's internal consistency, including the strategy's configuration against
    /// the round policy (e.g. Krum's f against `min_clients`).
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
        self.build_strategy().map(drop)
    }

    /// The largest update accepted, in bytes ([`Self::max_update_bytes`] or its default).
    pub fn update_byte_limit(&self) -> u64 {
        self.max_update_bytes
            .unwrap_or((self.manifest.data_bytes() + self.manifest.header_allowance()) as u64)
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

    /// Builds the strategy object (wrapped in the server optimizer, if any).
    ///
    /// # Errors
    /// [`SpecError`] for an impossible configuration.
    pub fn build_strategy(&self) -> Result<Box<dyn Strategy>, SpecError> {
        self.build_strategy_with(StrategyPlugins::default())
    }

    /// Like [`Self::build_strategy`], with job-specific pieces the runtime supplies (Bristle's
    /// per-class evaluator on a server-held validation split).
    ///
    /// # Errors
    /// [`SpecError`] for an impossible configuration.
    pub fn build_strategy_with(&self, plugins: StrategyPlugins) -> Result<Box<dyn Strategy>, SpecError> {
        use crate::{asynchronous, bristle, rffl, robust, server_opt};
        let bad = |e: &dyn std::fmt::Display| SpecError(format!("strategy: {e}"));
        let n = self.round_rule().min_clients as usize;
        let inner: Box<dyn Strategy> = match &self.strategy {
            &StrategySpec::Fedavg { server_learning_rate } => {
                if !(server_learning_rate.is_finite() && server_learning_rate > 0.0) {
                    return Err(SpecError(format!(
                        "server_learning_rate {server_learning_rate} must be finite and > 0"
                    )));
                }
                Box::new(FedAvg { update_kind: self.update_kind, server_learning_rate })
            }
            StrategySpec::Fedbuff(f) => {
                f.validate().map_err(|e| bad(&e))?;
                self.require_delta("fedbuff")?;
                Box::new(*f)
            }
            StrategySpec::Fedfix { period_ticks, server_learning_rate, clients } => {
                self.require_delta("fedfix")?;
                let mut profiles = asynchronous::ClientProfiles::new();
                let m = clients.len().max(1) as f64;
                for c in clients {
                    let profile = asynchronous::ClientProfile {
                        compute_ticks: c.compute_ticks,
                        importance: c.importance.unwrap_or(1.0 / m),
                    };
                    profiles.set(c.client.clone(), profile).map_err(|e| bad(&e))?;
                }
                let f = asynchronous::FedFix {
                    period_ticks: *period_ticks,
                    server_lr: *server_learning_rate,
                    clients: profiles,
                };
                f.validate().map_err(|e| bad(&e))?;
                Box::new(f)
            }
            StrategySpec::Median => {
                self.require_parameters("median")?;
                Box::new(robust::CoordinateMedian::new(n).map_err(|e| bad(&e))?)
            }
            &StrategySpec::TrimmedMean { beta } => {
                self.require_parameters("trimmed-mean")?;
                Box::new(robust::TrimmedMean::new(beta, n).map_err(|e| bad(&e))?)
            }
            &StrategySpec::Krum { byzantine } => {
                Box::new(robust::Krum::new(byzantine, 1, n).map_err(|e| bad(&e))?)
            }
            &StrategySpec::MultiKrum { byzantine, keep } => {
                self.require_parameters("multi-krum")?;
                Box::new(robust::Krum::new(byzantine, keep, n).map_err(|e| bad(&e))?)
            }
            &StrategySpec::Bulyan { byzantine } => {
                self.require_parameters("bulyan")?;
                Box::new(robust::Bulyan::new(byzantine, n).map_err(|e| bad(&e))?)
            }
            &StrategySpec::Rffl { gamma, alpha, rth, warmup_rounds, altruism_degree, sparsify, mode } => {
                self.require_delta("rffl")?;
                let config = rffl::RfflConfig {
                    mode: match mode {
                        SpecMode::ReferenceCode => rffl::Mode::ReferenceCode,
                        SpecMode::Paper => rffl::Mode::Paper,
                    },
                    alpha,
                    gamma,
                    rth,
                    warmup_rounds,
                    altruism_degree,
                    sparsify,
                };
                Box::new(rffl::Rffl::new(config).map_err(|e| bad(&e))?)
            }
            &StrategySpec::Bristle { alpha, beta, seed, mode } => {
                let config = bristle::BristleConfig {
                    mode: match mode {
                        SpecMode::ReferenceCode => bristle::Mode::ReferenceCode,
                        SpecMode::Paper => bristle::Mode::Paper,
                    },
                    prioritizer: bristle::Prioritizer::AlphaTertiles { alpha, beta },
                    seed,
                    update_kind: self.update_kind,
                };
                match plugins.bristle_integrator {
                    Some((integrator, evaluator)) => Box::new(
                        bristle::Bristle::with_integrator(config, integrator, evaluator)
                            .map_err(|e| bad(&e))?,
                    ),
                    None => Box::new(bristle::Bristle::new(config).map_err(|e| bad(&e))?),
                }
            }
        };
        Ok(match &self.server_optimizer {
            None => inner,
            Some(cfg) => {
                let opt = server_opt::ServerOptimizer::new(*cfg).map_err(|e| bad(&e))?;
                Box::new(server_opt::WithServerOptimizer::new(inner, opt))
            }
        })
    }

    fn require_parameters(&self, name: &str) -> Result<(), SpecError> {
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

    fn require_delta(&self, name: &str) -> Result<(), SpecError> {
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
    use crate::tensor::{DType, TensorSpec};

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
            strategy: StrategySpec::Fedbuff(crate::asynchronous::FedBuff::new(3)),
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
            strategy: StrategySpec::Fedbuff(crate::asynchronous::FedBuff::new(3)),
            update_kind: UpdateKind::Delta,
            max_clients_per_round: Some(3),
            ..spec(RoundPolicy::Buffered { max_wait_ms: 100, max_staleness: 2 })
        };
        assert!(fedbuff.validate().unwrap_err().0.contains("sync rounds"));
    }
}
