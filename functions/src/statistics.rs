//! Running statistics (BatchNorm `running_mean`, `running_var`, `num_batches_tracked`): the
//! arithmetic of the `statistic` and `variance` policies ([`AggregationPolicy`]), and the
//! warnings `shoal job create` prints when a job's configuration can invalidate a tensor that
//! is named like a running statistic but aggregated as a parameter.
//!
//! Why it matters (Flower #1060, APPFL #131): a running variance under the default `mean`
//! policy is a "parameter" to every server step. FedAdam moves it by about η per round
//! whatever the clients sent (0 → 0.0742 → 0.0107 → −0.0491 from a zero start), and FedBuff
//! adds a stale delta to a newer base; both leave values no client had, and a negative
//! variance makes BatchNorm divide by the square root of a negative number.

use shoal_proto::spec::{JobSpec, StrategySpec, UpdateKind};

use crate::tensor::{AggregationPolicy, DType, Parameters, TensorData};

/// Writes tensor `i` of `out` as a running statistic from its accumulator `acc` (`Σ w·x`) and
/// the fold weights' sum `total`: `acc / total`, plus `base` (the global model the deltas are
/// relative to) for delta updates; every element of a `variance` tensor is clamped at 0
/// (NaN stays NaN, for the caller's finiteness check to refuse). `total` must be > 0.
pub(crate) fn write_statistic(
    out: &mut Parameters,
    i: usize,
    policy: AggregationPolicy,
    acc: &[f64],
    total: f64,
    base: Option<TensorData<'_>>,
) {
    let value = |e: usize, s: f64| statistic_value(policy, base.map_or(0.0, |b| b.get_f64(e)), s, total);
    out.write_tensor_f64(i, acc.iter().enumerate().map(|(e, &s)| value(e, s)));
}

/// One element of a running statistic: `base + s / total`, clamped at 0 for a `variance`
/// tensor (NaN stays NaN). `base` is 0 for full-parameter updates.
pub(crate) fn statistic_value(policy: AggregationPolicy, base: f64, s: f64, total: f64) -> f64 {
    let v = base + s / total;
    if policy == AggregationPolicy::Variance && v < 0.0 {
        0.0
    } else {
        v
    }
}

/// Which running statistic a tensor name looks like ([`RunningStatistic::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunningStatistic {
    /// A running mean (`running_mean`, `moving_mean`).
    Mean,
    /// A running variance (`running_var`, `running_variance`, `moving_var`, `moving_variance`).
    Variance,
    /// A counter (`num_batches_tracked`).
    Counter,
}

impl RunningStatistic {
    /// The kind of running statistic `name` looks like, if any: its last component after a `.`
    /// (PyTorch) or `/` (TensorFlow), without a `:N` output suffix, compared case-insensitively.
    pub fn of(name: &str) -> Option<RunningStatistic> {
        let last = name.rsplit(['.', '/']).next().unwrap_or(name);
        let last = last.split(':').next().unwrap_or(last).to_ascii_lowercase();
        match last.as_str() {
            "running_mean" | "moving_mean" => Some(RunningStatistic::Mean),
            "running_var" | "running_variance" | "moving_var" | "moving_variance" => {
                Some(RunningStatistic::Variance)
            }
            "num_batches_tracked" => Some(RunningStatistic::Counter),
            _ => None,
        }
    }

    /// The policy such a tensor should have: `variance` for variances, `statistic` for means,
    /// `max` for counters.
    pub fn suggested_policy(self) -> AggregationPolicy {
        match self {
            RunningStatistic::Mean => AggregationPolicy::Statistic,
            RunningStatistic::Variance => AggregationPolicy::Variance,
            RunningStatistic::Counter => AggregationPolicy::Max,
        }
    }
}

/// What in a job's configuration can invalidate a running statistic aggregated as `mean`.
#[derive(Debug, Clone, PartialEq)]
pub enum StatisticRisk {
    /// A server optimizer (FedAvgM, FedAdam, FedYogi, FedAdagrad) steps every floating-point
    /// `mean` tensor with its own momentum and scaling: the result is no client's value and a
    /// variance can go negative.
    ServerOptimizer {
        /// The optimizer's name.
        optimizer: &'static str,
    },
    /// FedAvg over deltas with a server learning rate other than 1 scales the mean delta.
    ServerLearningRate {
        /// η_s.
        server_learning_rate: f64,
    },
    /// An asynchronous server step (FedBuff, FedFix) adds stale deltas to a newer model and
    /// scales their sum (by η_g, by 1/K or not at all): not a mean of the clients' values.
    AsynchronousStep {
        /// The strategy's name.
        strategy: &'static str,
    },
    /// RFFL clips (or normalises) each upload over all `mean` tensors together and weights
    /// it by reputation: statistics would be clipped and count in the cosines.
    GradientStrategy {
        /// The strategy's name.
        strategy: &'static str,
    },
    /// The tensor is a variance under `statistic`: the weighted mean is right but not clamped
    /// at 0 (`variance` clamps).
    UnclampedVariance,
}

/// One warning of [`statistic_warnings`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatisticWarning {
    /// The tensor's name.
    pub tensor: String,
    /// What its name says it is.
    pub kind: RunningStatistic,
    /// Its policy in the manifest.
    pub policy: AggregationPolicy,
    /// What can invalidate it.
    pub risk: StatisticRisk,
    /// The policy to declare instead.
    pub suggested: AggregationPolicy,
}

impl std::fmt::Display for StatisticWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match &self.risk {
            StatisticRisk::ServerOptimizer { optimizer } => {
                format!("the server optimizer {optimizer} steps it")
            }
            StatisticRisk::ServerLearningRate { server_learning_rate } => {
                format!("the server learning rate {server_learning_rate} scales its mean delta")
            }
            StatisticRisk::AsynchronousStep { strategy } => {
                format!("{strategy} adds (stale) deltas to it with a step that is not a mean")
            }
            StatisticRisk::GradientStrategy { strategy } => format!("{strategy} clips and reweights it"),
            StatisticRisk::UnclampedVariance => "a variance is not clamped at 0 under `statistic`".into(),
        };
        write!(
            f,
            "tensor {:?} looks like a running statistic but has policy {:?}: {why}; declare it {:?}",
            self.tensor, self.policy, self.suggested
        )
    }
}

/// The warnings for a job about to be created: one per tensor named like a running statistic
/// ([`RunningStatistic::of`]) whose policy the configured strategy, server optimizer or update
/// kind can invalidate. Tensors declared `statistic`, `variance`, `max`, `first` or `skip` are
/// safe (only a variance under `statistic` is flagged, [`StatisticRisk::UnclampedVariance`]);
/// integer counters are out of a server optimizer's reach (it steps float tensors only). An
/// empty list means nothing to warn about. Pure: no I/O, the CLI prints them.
pub fn statistic_warnings(spec: &JobSpec) -> Vec<StatisticWarning> {
    let mut out = Vec::new();
    for t in spec.manifest.tensors() {
        let Some(kind) = RunningStatistic::of(&t.name) else { continue };
        let risk = match t.policy {
            AggregationPolicy::Mean => mean_risk(spec, t.dtype),
            AggregationPolicy::Statistic if kind == RunningStatistic::Variance => {
                Some(StatisticRisk::UnclampedVariance)
            }
            _ => None,
        };
        if let Some(risk) = risk {
            let suggested = kind.suggested_policy();
            out.push(StatisticWarning { tensor: t.name.clone(), kind, policy: t.policy, risk, suggested });
        }
    }
    out
}

/// What can invalidate a `mean` tensor of `dtype` in `spec`, if anything.
fn mean_risk(spec: &JobSpec, dtype: DType) -> Option<StatisticRisk> {
    if let Some(opt) = &spec.server_optimizer {
        if dtype.is_float() {
            return Some(StatisticRisk::ServerOptimizer { optimizer: opt.name() });
        }
    }
    let delta = spec.update_kind == UpdateKind::Delta;
    match &spec.strategy {
        &StrategySpec::Fedavg { server_learning_rate } if delta && server_learning_rate != 1.0 => {
            Some(StatisticRisk::ServerLearningRate { server_learning_rate })
        }
        StrategySpec::Fedbuff(_) => Some(StatisticRisk::AsynchronousStep { strategy: "fedbuff" }),
        StrategySpec::Fedfix { .. } => Some(StatisticRisk::AsynchronousStep { strategy: "fedfix" }),
        StrategySpec::Rffl { .. } => Some(StatisticRisk::GradientStrategy { strategy: "rffl" }),
        _ => None,
    }
}
