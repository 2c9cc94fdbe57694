//! The user-facing policy: the `autoscaling` and `placement` blocks of a `FederatedJob` spec.
//!
//! Field names and defaults are those of reference/kubernetes.md R2.1, chosen so that an
//! operator who knows Knative's KPA, KEDA or HPA v2 recognises them. Every type derives serde
//! (camelCase, unknown fields refused, defaults filled in) and `schemars::JsonSchema` so the CRD
//! can embed them unchanged; ranges that JSON Schema can express are in the schema, and
//! [`ScalingSpec::validate`] checks all of them plus the cross-field rules.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::KubeDuration;
use crate::error::{Error, Result};

/// The scaling and placement policy of one job: what `shoal-operator simulate --policy` reads,
/// and what the `FederatedJob` CRD embeds as `spec.autoscaling` and `spec.placement`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingSpec {
    /// How many function hosts to run (R2.1).
    #[serde(default)]
    pub autoscaling: AutoscalingPolicy,
    /// Where to run them (R1.4).
    #[serde(default)]
    pub placement: PlacementPolicy,
}

/// The `autoscaling` block (reference/kubernetes.md R2.1). Anchors: KPA = Knative Pod
/// Autoscaler, KEDA, HPA = Kubernetes HorizontalPodAutoscaler v2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalingPolicy {
    /// Fewest function hosts for the job, cluster-wide (KEDA `minReplicaCount` default 0, KPA
    /// `min-scale` 0). 0 allows scale to zero.
    #[serde(default)]
    pub min_hosts: u32,
    /// Most function hosts for the job, cluster-wide (KEDA `maxReplicaCount` default 100).
    #[serde(default = "defaults::max_hosts")]
    #[schemars(range(min = 1))]
    pub max_hosts: u32,
    /// Most function hosts of this job on one node: the per-node capacity placement packs into
    /// (Shoal-specific; LIFL's per-node "service capacity"). `placement.maxHostsPerNode`, when
    /// set, overrides it.
    #[serde(default = "defaults::max_hosts_per_node")]
    #[schemars(range(min = 1))]
    pub max_hosts_per_node: u32,
    /// The per-host target.
    #[serde(default)]
    pub target: ScalingTarget,
    /// At zero hosts, the staged-but-unfolded backlog (updates, cluster-wide, plus the work
    /// queue's `num_pending`) above which the job is activated to at least one host (KEDA
    /// `activationLagThreshold`, default 0: any backlog activates).
    #[serde(default)]
    pub activation_backlog: u64,
    /// Window of the stable average arrival rate (KPA `stable-window`, default `60s`,
    /// 6s..1h). Also how long panic mode lasts after its last trigger.
    #[serde(default = "defaults::stable_window")]
    pub stable_window: KubeDuration,
    /// Panic window as a percentage of the stable window (KPA `panic-window-percentage`,
    /// default 10, 1..100): 6 s by default. Also the time the backlog term plans to drain a
    /// backlog in (see [`AutoscalingPolicy::backlog_drain_time`]).
    #[serde(default = "defaults::panic_window_percentage")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub panic_window_percentage: f64,
    /// Enter panic mode when the panic-window demand reaches this percentage of the current
    /// capacity (KPA `panic-threshold-percentage`, default 200, 110..1000).
    #[serde(default = "defaults::panic_threshold_percentage")]
    #[schemars(range(min = 110.0, max = 1000.0))]
    pub panic_threshold_percentage: f64,
    /// Scale to zero only after this long with no arrivals, no backlog and nothing pending
    /// (KPA `scale-to-zero-grace-period`, default `30s`, at most 1h).
    #[serde(default = "defaults::scale_to_zero_grace_period")]
    pub scale_to_zero_grace_period: KubeDuration,
    /// How often the autoscaler decides (KPA `tick-interval`, default `2s`, at most
    /// `stableWindow`). The stable and panic averages are means of one sample per tick; a
    /// window shorter than a tick holds the current sample only.
    #[serde(default = "defaults::tick_interval")]
    pub tick_interval: KubeDuration,
    /// Relative change of the recommendation below which the host count is left alone (HPA
    /// `--horizontal-pod-autoscaler-tolerance`, default 0.1, 0..1).
    #[serde(default = "defaults::tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
    /// Smoothing factor of the per-node arrival-rate EWMA: `rate = α·observed + (1-α)·rate`
    /// (default 0.7, in (0, 1]; LIFL-derived, provenance unverified, reference R1.1/R1.2).
    #[serde(default = "defaults::ewma_alpha")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub ewma_alpha: f64,
    /// Rate limits and stabilization in the shape and field names of HPA v2's `behavior`.
    #[serde(default)]
    pub behavior: ScalingBehavior,
}

/// `autoscaling.target`: the load one function host is sized for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingTarget {
    /// Updates per second one host folds at full load (analogue of KPA's target /
    /// `requests-per-second-target`; default 10, > 0). The simulator uses it as a host's
    /// service rate.
    #[serde(default = "defaults::updates_per_second_per_host")]
    // OpenAPI v3.0 (what a CRD schema is): `exclusiveMinimum` is a flag on `minimum`.
    #[schemars(range(min = 0.0), extend("exclusiveMinimum" = true))]
    pub updates_per_second_per_host: f64,
    /// Fraction of that rate to plan for, in percent (KPA
    /// `container-concurrency-target-percentage`, default 70, (0, 100]).
    #[serde(default = "defaults::utilization_percentage")]
    #[schemars(range(min = 0.0, max = 100.0), extend("exclusiveMinimum" = true))]
    pub utilization_percentage: f64,
}

/// `autoscaling.behavior`: HPA v2's `HorizontalPodAutoscalerBehavior`, field for field.
///
/// Defaults (when a direction or one of its fields is left out) are HPA's, except
/// `scaleDown.stabilizationWindowSeconds`, which is **60 s instead of HPA's 300 s**, the KPA
/// stable window: FL rounds are short, and a five-minute scale-down hold is usually longer than
/// a round, so HPA's default would keep a round's peak for the next several rounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingBehavior {
    /// Scale-up rules. Default: no stabilization, `selectPolicy: Max`, at most +4 hosts or
    /// +100 % per 15 s, whichever is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,
    /// Scale-down rules. Default: 60 s stabilization (the highest recommendation of the last
    /// 60 s wins), `selectPolicy: Max`, up to 100 % per 15 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

/// HPA v2's `HPAScalingRules`. Fields left out take the direction's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingRules {
    /// Seconds of past recommendations considered: for scale-up the lowest wins, for
    /// scale-down the highest (0..3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: Option<u32>,
    /// Which policy wins when several allow different changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<SelectPolicy>,
    /// Rate limits; each allows a change per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<ScalingPolicy>>,
}

/// HPA v2's `ScalingPolicySelect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectPolicy {
    /// The policy allowing the largest change wins (HPA default).
    Max,
    /// The policy allowing the smallest change wins.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// HPA v2's `HPAScalingPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingPolicy {
    /// `Pods` (a number of hosts) or `Percent` (of the hosts at the start of the period).
    #[serde(rename = "type")]
    pub kind: ScalingPolicyKind,
    /// The amount of change allowed per period (> 0).
    #[schemars(range(min = 1))]
    pub value: u32,
    /// The period in seconds (1..1800, HPA's limit).
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: u32,
}

/// HPA v2's `HPAScalingPolicyType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ScalingPolicyKind {
    /// An absolute number of hosts ("Pods" in HPA's spelling).
    Pods,
    /// A percentage of the hosts at the start of the period.
    Percent,
}

/// [`ScalingRules`] with the direction's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRules {
    /// The stabilization window.
    pub stabilization_window: Duration,
    /// Which policy wins.
    pub select_policy: SelectPolicy,
    /// The rate limits.
    pub policies: Vec<ScalingPolicy>,
}

/// The `placement` block (R1.4, R6.4).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementPolicy {
    /// How function hosts are assigned to nodes.
    #[serde(default)]
    pub strategy: PlacementStrategy,
    /// Per-node cap; overrides `autoscaling.maxHostsPerNode` when set (R6.4 puts it here, R2.1
    /// in `autoscaling`; one value is used, see [`ScalingSpec::max_hosts_per_node`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_hosts_per_node: Option<u32>,
    /// Node labels a function host's node must carry (merged into every function-host pod's
    /// `nodeSelector`; R6.4). The hostname affinity still pins each host to the node whose
    /// updates it folds, so a selector that excludes such a node leaves its hosts Pending. The
    /// simulator ignores it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to every function-host pod (R6.4), e.g. for tainted GPU or edge nodes.
    /// The simulator ignores them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// Placement strategies (R1.4). All but `roundRobin` put hosts only on nodes where updates are
/// staged, each node's own demand first; they differ in where a node's overflow (demand above
/// the per-node cap) spills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PlacementStrategy {
    /// Best-fit decreasing: overflow spills to the staged node with the least residual
    /// capacity (the default).
    #[default]
    BestFit,
    /// LIFL's public (flame) behaviour: hosts dealt to the cluster's nodes in turn, ignoring
    /// where updates are staged. Kept for comparison.
    RoundRobin,
    /// Overflow spills to the first staged node (by name) with room. Kept for comparison.
    FirstFit,
    /// Overflow spills to the staged node with the most residual capacity. Kept for comparison.
    WorstFit,
}

impl PlacementStrategy {
    /// Every strategy, in the order the simulator reports them.
    pub const ALL: [PlacementStrategy; 4] = [
        PlacementStrategy::BestFit,
        PlacementStrategy::RoundRobin,
        PlacementStrategy::FirstFit,
        PlacementStrategy::WorstFit,
    ];

    /// The CRD spelling (`bestFit`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementStrategy::BestFit => "bestFit",
            PlacementStrategy::RoundRobin => "roundRobin",
            PlacementStrategy::FirstFit => "firstFit",
            PlacementStrategy::WorstFit => "worstFit",
        }
    }
}

impl std::str::FromStr for PlacementStrategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        PlacementStrategy::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            Error::policy(
                "placement.strategy",
                format!("{s:?}: use bestFit, roundRobin, firstFit or worstFit"),
            )
        })
    }
}

mod defaults {
    use super::KubeDuration;

    pub(super) fn max_hosts() -> u32 {
        100
    }
    pub(super) fn max_hosts_per_node() -> u32 {
        4
    }
    pub(super) fn updates_per_second_per_host() -> f64 {
        10.0
    }
    pub(super) fn utilization_percentage() -> f64 {
        70.0
    }
    pub(super) fn stable_window() -> KubeDuration {
        KubeDuration::from_secs(60)
    }
    pub(super) fn panic_window_percentage() -> f64 {
        10.0
    }
    pub(super) fn panic_threshold_percentage() -> f64 {
        200.0
    }
    pub(super) fn scale_to_zero_grace_period() -> KubeDuration {
        KubeDuration::from_secs(30)
    }
    pub(super) fn tick_interval() -> KubeDuration {
        KubeDuration::from_secs(2)
    }
    pub(super) fn tolerance() -> f64 {
        0.1
    }
    pub(super) fn ewma_alpha() -> f64 {
        0.7
    }
}

impl Default for AutoscalingPolicy {
    fn default() -> Self {
        AutoscalingPolicy {
            min_hosts: 0,
            max_hosts: defaults::max_hosts(),
            max_hosts_per_node: defaults::max_hosts_per_node(),
            target: ScalingTarget::default(),
            activation_backlog: 0,
            stable_window: defaults::stable_window(),
            panic_window_percentage: defaults::panic_window_percentage(),
            panic_threshold_percentage: defaults::panic_threshold_percentage(),
            scale_to_zero_grace_period: defaults::scale_to_zero_grace_period(),
            tick_interval: defaults::tick_interval(),
            tolerance: defaults::tolerance(),
            ewma_alpha: defaults::ewma_alpha(),
            behavior: ScalingBehavior::default(),
        }
    }
}

impl Default for ScalingTarget {
    fn default() -> Self {
        ScalingTarget {
            updates_per_second_per_host: defaults::updates_per_second_per_host(),
            utilization_percentage: defaults::utilization_percentage(),
        }
    }
}

impl ScalingSpec {
    /// Parses a policy file (YAML or JSON) with `autoscaling:` and `placement:` blocks.
    ///
    /// # Errors
    /// [`Error::Parse`] for unknown fields or wrong types, then [`ScalingSpec::validate`]'s.
    pub fn from_yaml(path: &std::path::Path, text: &str) -> Result<Self> {
        let spec: ScalingSpec =
            serde_yaml::from_str(text).map_err(|source| Error::Parse { path: path.to_owned(), source })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every range and cross-field rule of both blocks.
    ///
    /// # Errors
    /// [`Error::InvalidPolicy`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        self.autoscaling.validate()?;
        if self.placement.max_hosts_per_node == Some(0) {
            return Err(Error::policy("placement.maxHostsPerNode", "must be at least 1"));
        }
        Ok(())
    }

    /// The per-node cap in force: `placement.maxHostsPerNode` if set, else
    /// `autoscaling.maxHostsPerNode`.
    pub fn max_hosts_per_node(&self) -> u32 {
        self.placement.max_hosts_per_node.unwrap_or(self.autoscaling.max_hosts_per_node)
    }
}

impl AutoscalingPolicy {
    /// Checks every range and cross-field rule.
    ///
    /// # Errors
    /// [`Error::InvalidPolicy`] naming the first offending field (`autoscaling.<field>`).
    pub fn validate(&self) -> Result<()> {
        let p = self;
        let field = |name: &str| format!("autoscaling.{name}");
        check(p.max_hosts >= 1, field("maxHosts"), "must be at least 1")?;
        check(
            p.min_hosts <= p.max_hosts,
            field("minHosts"),
            format!("must not exceed maxHosts ({})", p.max_hosts),
        )?;
        check(p.max_hosts_per_node >= 1, field("maxHostsPerNode"), "must be at least 1")?;
        let t = &p.target;
        check(
            t.updates_per_second_per_host.is_finite() && t.updates_per_second_per_host > 0.0,
            field("target.updatesPerSecondPerHost"),
            "must be a finite number > 0",
        )?;
        in_range(t.utilization_percentage, 0.0, false, 100.0, field("target.utilizationPercentage"))?;
        let stable = p.stable_window.get();
        check(
            (Duration::from_secs(6)..=Duration::from_secs(3600)).contains(&stable),
            field("stableWindow"),
            format!("{} is outside 6s..1h", p.stable_window),
        )?;
        in_range(p.panic_window_percentage, 1.0, true, 100.0, field("panicWindowPercentage"))?;
        in_range(p.panic_threshold_percentage, 110.0, true, 1000.0, field("panicThresholdPercentage"))?;
        check(
            p.scale_to_zero_grace_period.get() <= Duration::from_secs(3600),
            field("scaleToZeroGracePeriod"),
            "must be at most 1h",
        )?;
        let tick = p.tick_interval.get();
        check(!tick.is_zero(), field("tickInterval"), "must be greater than 0s")?;
        check(
            tick <= stable,
            field("tickInterval"),
            format!("must not exceed stableWindow ({})", p.stable_window),
        )?;
        in_range(p.tolerance, 0.0, true, 1.0, field("tolerance"))?;
        in_range(p.ewma_alpha, 0.0, false, 1.0, field("ewmaAlpha"))?;
        p.behavior.validate()
    }

    /// The panic window: `stableWindow × panicWindowPercentage / 100` (6 s by default), rounded
    /// to whole milliseconds.
    pub fn panic_window(&self) -> Duration {
        let ms = self.stable_window.get().as_millis() as f64 * self.panic_window_percentage / 100.0;
        Duration::from_millis(ms.round() as u64)
    }

    /// The time the backlog term plans to fold a staged backlog in (R2.2 step 4's
    /// `drainSeconds`): one panic window, the horizon on which the autoscaler already reacts
    /// to bursts. Derived rather than a field of its own so that R2.1's field set stays
    /// exactly KPA/HPA's; 6 s by default.
    pub fn backlog_drain_time(&self) -> Duration {
        self.panic_window()
    }

    /// Updates per second one host is planned for: `target.updatesPerSecondPerHost ×
    /// target.utilizationPercentage / 100` (7 by default).
    pub fn planned_rate_per_host(&self) -> f64 {
        self.target.updates_per_second_per_host * self.target.utilization_percentage / 100.0
    }
}

impl ScalingBehavior {
    fn validate(&self) -> Result<()> {
        for (name, rules) in [("scaleUp", &self.scale_up), ("scaleDown", &self.scale_down)] {
            let Some(rules) = rules else { continue };
            let base = format!("autoscaling.behavior.{name}");
            if let Some(w) = rules.stabilization_window_seconds {
                check(w <= 3600, format!("{base}.stabilizationWindowSeconds"), "must be 0..3600")?;
            }
            for (i, p) in rules.policies.iter().flatten().enumerate() {
                check(p.value > 0, format!("{base}.policies[{i}].value"), "must be greater than 0")?;
                check(
                    (1..=1800).contains(&p.period_seconds),
                    format!("{base}.policies[{i}].periodSeconds"),
                    "must be 1..1800",
                )?;
            }
            if rules.policies.as_ref().is_some_and(Vec::is_empty)
                && rules.select_policy != Some(SelectPolicy::Disabled)
            {
                return Err(Error::policy(
                    format!("{base}.policies"),
                    "must list at least one policy (or set selectPolicy: Disabled)",
                ));
            }
        }
        Ok(())
    }

    /// Scale-up rules with HPA's defaults filled in.
    pub fn scale_up(&self) -> ResolvedRules {
        resolve(
            self.scale_up.as_ref(),
            0,
            &[
                ScalingPolicy { kind: ScalingPolicyKind::Pods, value: 4, period_seconds: 15 },
                ScalingPolicy { kind: ScalingPolicyKind::Percent, value: 100, period_seconds: 15 },
            ],
        )
    }

    /// Scale-down rules with the defaults filled in (60 s stabilization; see the type's docs).
    pub fn scale_down(&self) -> ResolvedRules {
        resolve(
            self.scale_down.as_ref(),
            60,
            &[ScalingPolicy { kind: ScalingPolicyKind::Percent, value: 100, period_seconds: 15 }],
        )
    }
}

fn resolve(rules: Option<&ScalingRules>, window: u32, policies: &[ScalingPolicy]) -> ResolvedRules {
    let rules = rules.cloned().unwrap_or_default();
    ResolvedRules {
        stabilization_window: Duration::from_secs(
            rules.stabilization_window_seconds.unwrap_or(window).into(),
        ),
        select_policy: rules.select_policy.unwrap_or(SelectPolicy::Max),
        policies: rules.policies.unwrap_or_else(|| policies.to_vec()),
    }
}

fn check(ok: bool, field: String, reason: impl Into<String>) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::policy(field, reason))
    }
}

/// `value` in `(low, high]` (or `[low, high]` when `low_inclusive`), finite.
fn in_range(value: f64, low: f64, low_inclusive: bool, high: f64, field: String) -> Result<()> {
    let above = if low_inclusive { value >= low } else { value > low };
    let open = if low_inclusive { '[' } else { '(' };
    check(
        value.is_finite() && above && value <= high,
        field,
        format!("{value} is outside {open}{low}, {high}]"),
    )
}

#[cfg(test)]
mod tests;
