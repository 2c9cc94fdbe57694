//! Builds a job's strategy from its spec ([`JobSpec`] is plain data in `shoal-proto`), and
//! validates a spec completely: its structure ([`JobSpec::validate`]) and the strategy's
//! configuration against the round policy (e.g. Krum's `f` against `min_clients`), which needs
//! the maths.

use shoal_proto::spec::{JobSpec, SpecError, SpecMode, StrategySpec};

use crate::fedavg::FedAvg;
use crate::strategy::Strategy;

/// Job-specific pieces the runtime plugs into a strategy.
#[derive(Debug, Default)]
pub struct StrategyPlugins {
    /// Bristle's performance-based integrator: which tensor to integrate class by class, and the
    /// evaluator scoring candidate models per class on a server-held validation split. Without
    /// it Bristle averages the updates its prioritizer selects.
    pub bristle_integrator:
        Option<(crate::bristle::IntegratorConfig, Box<dyn crate::bristle::ClassEvaluator>)>,
}

/// Checks a spec completely: [`JobSpec::validate`], then whether its strategy can be built.
/// Call it when the job is created; a node never fails a running job on its configuration.
///
/// # Errors
/// [`SpecError`] naming the first problem.
pub fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    spec.validate()?;
    build_strategy(spec).map(drop)
}

/// Builds the strategy object (wrapped in the server optimizer, if any).
///
/// # Errors
/// [`SpecError`] for an impossible configuration.
pub fn build_strategy(spec: &JobSpec) -> Result<Box<dyn Strategy>, SpecError> {
    build_strategy_with(spec, StrategyPlugins::default())
}

/// Like [`build_strategy`], with job-specific pieces the runtime supplies (Bristle's
/// per-class evaluator on a server-held validation split).
///
/// # Errors
/// [`SpecError`] for an impossible configuration.
pub fn build_strategy_with(spec: &JobSpec, plugins: StrategyPlugins) -> Result<Box<dyn Strategy>, SpecError> {
    use crate::{asynchronous, bristle, rffl, robust, server_opt};
    let bad = |e: &dyn std::fmt::Display| SpecError(format!("strategy: {e}"));
    let n = spec.round_rule().min_clients as usize;
    let inner: Box<dyn Strategy> = match &spec.strategy {
        &StrategySpec::Fedavg { server_learning_rate } => {
            if !(server_learning_rate.is_finite() && server_learning_rate > 0.0) {
                return Err(SpecError(format!(
                    "server_learning_rate {server_learning_rate} must be finite and > 0"
                )));
            }
            Box::new(FedAvg { update_kind: spec.update_kind, server_learning_rate })
        }
        StrategySpec::Fedbuff(f) => {
            f.validate().map_err(|e| bad(&e))?;
            spec.require_delta("fedbuff")?;
            Box::new(crate::asynchronous::FedBuff::from(*f))
        }
        StrategySpec::Fedfix { period_ticks, server_learning_rate, clients } => {
            spec.require_delta("fedfix")?;
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
            spec.require_parameters("median")?;
            Box::new(robust::CoordinateMedian::new(n).map_err(|e| bad(&e))?)
        }
        &StrategySpec::TrimmedMean { beta } => {
            spec.require_parameters("trimmed-mean")?;
            Box::new(robust::TrimmedMean::new(beta, n).map_err(|e| bad(&e))?)
        }
        &StrategySpec::Krum { byzantine } => {
            Box::new(robust::Krum::new(byzantine, 1, n).map_err(|e| bad(&e))?)
        }
        &StrategySpec::MultiKrum { byzantine, keep } => {
            spec.require_parameters("multi-krum")?;
            Box::new(robust::Krum::new(byzantine, keep, n).map_err(|e| bad(&e))?)
        }
        &StrategySpec::Bulyan { byzantine } => {
            spec.require_parameters("bulyan")?;
            Box::new(robust::Bulyan::new(byzantine, n).map_err(|e| bad(&e))?)
        }
        &StrategySpec::Rffl { gamma, alpha, rth, warmup_rounds, altruism_degree, sparsify, mode } => {
            spec.require_delta("rffl")?;
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
                update_kind: spec.update_kind,
            };
            match plugins.bristle_integrator {
                Some((integrator, evaluator)) => Box::new(
                    bristle::Bristle::with_integrator(config, integrator, evaluator).map_err(|e| bad(&e))?,
                ),
                None => Box::new(bristle::Bristle::new(config).map_err(|e| bad(&e))?),
            }
        }
    };
    Ok(match &spec.server_optimizer {
        None => inner,
        Some(cfg) => {
            let opt = server_opt::ServerOptimizer::new(*cfg)
                .map_err(|e| SpecError(format!("server_optimizer {}: {e}", cfg.name())))?;
            Box::new(server_opt::WithServerOptimizer::new(inner, opt))
        }
    })
}
