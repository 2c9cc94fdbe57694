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

/// Which strategy aggregates the job, with its hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum StrategySpec {
    /// [`FedAvg`].
    Fedavg {
        /// η_s for delta updates (default 1).
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
}

impl Default for StrategySpec {
    fn default() -> Self {
        StrategySpec::Fedavg { server_learning_rate: 1.0 }
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
}

/// A job: one FL training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Rounds to run; the job is `Finished` after the last one commits.
    pub rounds: u64,
    /// Largest `num_examples` accepted from one update (defaults to 10^9).
    #[serde(default = "default_max_examples")]
    pub max_num_examples: u64,
    /// Consecutive failed rounds (quorum not met) after which the job fails (default 5).
    #[serde(default = "default_max_failed")]
    pub max_failed_rounds: u32,
}

fn default_max_examples() -> u64 {
    1_000_000_000
}

fn default_max_failed() -> u32 {
    5
}

/// Why a job spec is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: {0}")]
pub struct SpecError(pub String);

impl JobSpec {
    /// Checks the spec's internal consistency.
    ///
    /// # Errors
    /// [`SpecError`] naming the first problem.
    pub fn validate(&self) -> Result<(), SpecError> {
        let RoundPolicy::Sync { cohort_size, min_clients, deadline_ms } = self.round_policy;
        if cohort_size == 0 || min_clients == 0 || min_clients > cohort_size {
            return Err(SpecError(format!(
                "need 1 <= min_clients ({min_clients}) <= cohort_size ({cohort_size})"
            )));
        }
        if deadline_ms == 0 {
            return Err(SpecError("deadline_ms must be positive".into()));
        }
        if self.rounds == 0 {
            return Err(SpecError("rounds must be at least 1".into()));
        }
        if self.max_num_examples == 0 {
            return Err(SpecError("max_num_examples must be positive".into()));
        }
        let StrategySpec::Fedavg { server_learning_rate } = self.strategy;
        if !(server_learning_rate.is_finite() && server_learning_rate > 0.0) {
            return Err(SpecError(format!(
                "server_learning_rate {server_learning_rate} must be finite and > 0"
            )));
        }
        Ok(())
    }

    /// Builds the strategy object.
    pub fn build_strategy(&self) -> Box<dyn Strategy> {
        match self.strategy {
            StrategySpec::Fedavg { server_learning_rate } => {
                Box::new(FedAvg { update_kind: self.update_kind, server_learning_rate })
            }
        }
    }
}
