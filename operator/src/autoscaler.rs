//! The autoscaler: a sans-IO state machine per job (reference/kubernetes.md R2.2).
//!
//! Each tick (every `tickInterval`) the caller passes an [`Observation`] — per node, the update
//! arrival rate and the staged-but-unfolded backlog the gateway reports, the work queue's
//! cluster-wide `num_pending`, and the hosts per node currently asked for — and gets a
//! [`Decision`]: desired hosts per node, the mode (Stable/Panic), events with reasons and
//! whether a limit held the count back. No clock, no I/O: time is the observation's `now`.
//!
//! One tick, in order (the step numbers are R2.2's):
//! 1. Per node, smooth the observed rate with an EWMA (`ewmaAlpha`) and keep one sample per
//!    tick; the stable average is the mean of the samples of the last `stableWindow`, the
//!    panic average that of the last `stableWindow × panicWindowPercentage / 100`.
//! 2. `hosts_n = ⌈avg_n / (updatesPerSecondPerHost × utilizationPercentage / 100)⌉`.
//! 3. Panic is entered when the panic-window demand reaches `panicThresholdPercentage` of the
//!    current capacity (`Σ panic_n / planned rate per host ≥ threshold/100 × max(current, 1)`,
//!    KPA's test), extended on every tick that still meets it, and left a full `stableWindow`
//!    after the last such tick. In panic the panic averages are used and the count never falls
//!    below the current one.
//! 4. Backlog term: `+⌈backlog_n / (updatesPerSecondPerHost × drain)⌉` per node and the same for
//!    `num_pending`, with `drain` = [`AutoscalingPolicy::backlog_drain_time`] (the panic
//!    window): enough extra hosts to fold what is staged within one panic window.
//! 5. Tolerance (HPA): a recommendation within `tolerance × current` of the current count keeps
//!    the current count. Then HPA's stabilization (the lowest recommendation of the scale-up
//!    window, the highest of the scale-down window) and `behavior` rate limits, with HPA's
//!    arithmetic (`Percent` rounds up when growing and down when shrinking; changes made within
//!    a policy's period count against it).
//! 6. Bounds: the total is clamped to `[minHosts, maxHosts]`, then [`crate::placement`] applies
//!    the per-node cap (spilling overflow per strategy). Placement never adds hosts, so this is
//!    R2.2's "per node, then globally" except that a node cap that leaves hosts unplaceable is
//!    reported as [`LimitReason::NodeCapacity`].
//! 7. Zero: at zero hosts the job is activated (to at least one host) only when the backlog
//!    exceeds `activationBacklog` (KEDA's activation). The count reaches zero only once nothing
//!    arrived, nothing is staged and nothing is pending for `scaleToZeroGracePeriod`, counted
//!    from the first tick that observed nothing; before that at least one host is kept. When
//!    the grace period is over the recommendation is 0 whatever the EWMA tail says, and it then
//!    passes through the scale-down stabilization like any other.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::node::NodeName;
use crate::placement::{self, PlacementInput, RoundRobinCursor};
use crate::policy::{
    AutoscalingPolicy, PlacementStrategy, ResolvedRules, ScalingPolicyKind, ScalingSpec, SelectPolicy,
};

/// What a node's gateway reported for one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeObservation {
    /// The node.
    pub node: NodeName,
    /// Updates of this job that arrived at the node since the previous tick, per second.
    pub arrivals_per_second: f64,
    /// Updates of this job staged on the node and not yet folded (R2.3: staged-unfolded, not
    /// `num_ack_pending`).
    pub backlog: u64,
}

/// The input of one tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Time since any fixed origin (monotonic; the autoscaler only takes differences).
    pub now: Duration,
    /// One entry per node running a gateway (nodes without arrivals included, with zeros; a
    /// node left out counts as zero arrivals and zero backlog).
    pub nodes: Vec<NodeObservation>,
    /// Updates of this job in the work-queue stream not yet pulled by any gateway
    /// (`num_pending` of the consumer, cluster-wide).
    pub num_pending: u64,
    /// Hosts per node the operator currently asks for (the Deployments' `replicas`).
    pub current: BTreeMap<NodeName, u32>,
}

/// KPA's two modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Decisions follow the stable-window average.
    Stable,
    /// A burst: decisions follow the panic-window average and never scale down.
    Panic,
}

impl Mode {
    /// `Stable` or `Panic`, as in `status.autoscaling.mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Stable => "Stable",
            Mode::Panic => "Panic",
        }
    }
}

/// Reasons of the Kubernetes Events a decision carries (R2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventReason {
    /// More hosts (from a non-zero count).
    ScaleUp,
    /// Fewer hosts (to a non-zero count).
    ScaleDown,
    /// Panic mode entered.
    PanicEntered,
    /// Panic mode left.
    PanicExited,
    /// The last host removed.
    ScaledToZero,
    /// The first host started because the backlog exceeded `activationBacklog`.
    ActivatedFromZero,
}

impl EventReason {
    /// The Event's `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            EventReason::ScaleUp => "ScaleUp",
            EventReason::ScaleDown => "ScaleDown",
            EventReason::PanicEntered => "PanicEntered",
            EventReason::PanicExited => "PanicExited",
            EventReason::ScaledToZero => "ScaledToZero",
            EventReason::ActivatedFromZero => "ActivatedFromZero",
        }
    }
}

/// One Event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingEvent {
    /// The reason.
    pub reason: EventReason,
    /// A human-readable note (`3 -> 5 hosts: ...`).
    pub message: String,
}

/// Why the count is not what the demand asks for: the reason of a `ScalingLimited=True`
/// condition (HPA's reasons, plus `NodeCapacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LimitReason {
    /// A `behavior.scaleUp` policy held growth back.
    ScaleUpLimit,
    /// A `behavior.scaleDown` policy held shrinking back.
    ScaleDownLimit,
    /// `maxHosts` reached.
    TooManyReplicas,
    /// `minHosts` reached.
    TooFewReplicas,
    /// Every node with staged updates is at its per-node cap; some hosts have no place.
    NodeCapacity,
}

impl LimitReason {
    /// The condition's `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitReason::ScaleUpLimit => "ScaleUpLimit",
            LimitReason::ScaleDownLimit => "ScaleDownLimit",
            LimitReason::TooManyReplicas => "TooManyReplicas",
            LimitReason::TooFewReplicas => "TooFewReplicas",
            LimitReason::NodeCapacity => "NodeCapacity",
        }
    }
}

/// The output of one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The observation's time.
    pub now: Duration,
    /// The mode after this tick.
    pub mode: Mode,
    /// Desired hosts per node: every observed node and every node with current hosts, zeros
    /// included (so a reconcile scales a Deployment down to 0 rather than forgetting it).
    pub desired: BTreeMap<NodeName, u32>,
    /// `Σ desired`.
    pub total: u32,
    /// `Σ current` of the observation.
    pub current_total: u32,
    /// The raw recommendation (steps 2–4) before tolerance, stabilization and limits.
    pub recommendation: u32,
    /// Smoothed (EWMA) arrival rate per node, updates/s (`status.autoscaling.observedRatePerNode`).
    pub observed_rate: BTreeMap<NodeName, f64>,
    /// Σ stable-window average rate, updates/s.
    pub stable_rate: f64,
    /// Σ panic-window average rate, updates/s.
    pub panic_rate: f64,
    /// Σ backlog + `num_pending`, updates.
    pub backlog: u64,
    /// Events to record, in order.
    pub events: Vec<ScalingEvent>,
    /// Set when a limit held the count away from the recommendation (`ScalingLimited`).
    pub limited: Option<LimitReason>,
    /// Hosts the per-node cap left without a node.
    pub unplaced: u32,
}

/// Per-node smoothing state.
#[derive(Debug, Clone, Default)]
struct NodeState {
    ewma: Option<f64>,
    /// `(tick time, ewma)`, oldest first, at most one stable window long.
    samples: VecDeque<(Duration, f64)>,
}

/// The per-job autoscaler. Create one per job with [`Autoscaler::new`] and call
/// [`Autoscaler::tick`] every `tickInterval`.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: AutoscalingPolicy,
    strategy: PlacementStrategy,
    max_per_node: u32,
    scale_up: ResolvedRules,
    scale_down: ResolvedRules,
    nodes: BTreeMap<NodeName, NodeState>,
    mode: Mode,
    last_panic_trigger: Option<Duration>,
    /// `(time, recommendation after tolerance)` for stabilization.
    recommendations: VecDeque<(Duration, u32)>,
    /// `(time, hosts added)` / `(time, hosts removed)` for the rate limits.
    up_events: VecDeque<(Duration, u32)>,
    down_events: VecDeque<(Duration, u32)>,
    idle_since: Option<Duration>,
    round_robin: RoundRobinCursor,
}

/// Per-tick signals derived from an observation (steps 1–2).
#[derive(Debug, Default)]
struct Signals {
    /// Per node: (stable avg, panic avg, backlog).
    per_node: BTreeMap<NodeName, (f64, f64, u64)>,
    stable_total: f64,
    panic_total: f64,
    backlog_total: u64,
    idle: bool,
}

/// `⌈x⌉` for a host count, ignoring float noise below 1e-9 (so 14.000000000001 / 7 is 2).
fn ceil_hosts(x: f64) -> u32 {
    if !x.is_finite() || x <= 1e-9 {
        return 0;
    }
    let c = (x - 1e-9).ceil();
    if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

impl Autoscaler {
    /// An autoscaler for one job.
    ///
    /// # Errors
    /// [`crate::Error::InvalidPolicy`] when the spec does not validate.
    pub fn new(spec: &ScalingSpec) -> Result<Self> {
        spec.validate()?;
        Ok(Autoscaler {
            policy: spec.autoscaling.clone(),
            strategy: spec.placement.strategy,
            max_per_node: spec.max_hosts_per_node(),
            scale_up: spec.autoscaling.behavior.scale_up(),
            scale_down: spec.autoscaling.behavior.scale_down(),
            nodes: BTreeMap::new(),
            mode: Mode::Stable,
            last_panic_trigger: None,
            recommendations: VecDeque::new(),
            up_events: VecDeque::new(),
            down_events: VecDeque::new(),
            idle_since: None,
            round_robin: RoundRobinCursor::default(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &AutoscalingPolicy {
        &self.policy
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One decision. Call once per `tickInterval` with non-decreasing `now`.
    pub fn tick(&mut self, obs: &Observation) -> Decision {
        let now = obs.now;
        let current: u32 = obs.current.values().sum();
        let mut events = Vec::new();
        let signals = self.observe(obs);
        events.extend(self.update_mode(now, signals.panic_total, current));
        let (recommendation, per_node) = self.recommend(&signals, obs.num_pending, current);
        let tolerated = self.apply_tolerance(recommendation, current);
        let wanted = self.apply_idle(now, &signals, tolerated, current);
        let stabilized = self.stabilize(now, wanted, current);
        let (mut total, mut limited) = self.rate_limit(now, stabilized, current);
        if current == 0 && self.policy.min_hosts == 0 {
            if signals.backlog_total + obs.num_pending > self.policy.activation_backlog {
                total = total.max(1);
            } else {
                total = 0;
            }
        }
        let demand = distribute(total, &per_node, &obs.current, &signals);
        let staged: BTreeSet<NodeName> = signals
            .per_node
            .iter()
            .filter(|(_, (stable, panic, backlog))| *stable > 0.0 || *panic > 0.0 || *backlog > 0)
            .map(|(n, _)| n.clone())
            .collect();
        let cluster: BTreeSet<NodeName> = obs.nodes.iter().map(|n| n.node.clone()).collect();
        let placed = placement::place(
            &PlacementInput {
                demand: &demand,
                staged: &staged,
                cluster: &cluster,
                current: &obs.current,
                max_per_node: self.max_per_node,
                strategy: self.strategy,
            },
            &mut self.round_robin,
        );
        if placed.unplaced > 0 {
            limited = Some(LimitReason::NodeCapacity);
        }
        let placed_total: u32 = placed.hosts.values().sum();
        events.extend(self.record_scale(now, current, placed_total, recommendation));
        let mut desired: BTreeMap<NodeName, u32> =
            cluster.iter().chain(obs.current.keys()).map(|n| (n.clone(), 0)).collect();
        desired.extend(placed.hosts);
        Decision {
            now,
            mode: self.mode,
            desired,
            total: placed_total,
            current_total: current,
            recommendation,
            observed_rate: self.nodes.iter().map(|(n, s)| (n.clone(), s.ewma.unwrap_or(0.0))).collect(),
            stable_rate: signals.stable_total,
            panic_rate: signals.panic_total,
            backlog: signals.backlog_total + obs.num_pending,
            events,
            limited,
            unplaced: placed.unplaced,
        }
    }

    /// Step 1: EWMA per node, window samples, stable and panic averages.
    fn observe(&mut self, obs: &Observation) -> Signals {
        let now = obs.now;
        let alpha = self.policy.ewma_alpha;
        let stable_window = self.policy.stable_window.get();
        let panic_window = self.policy.panic_window();
        let reported: BTreeMap<&NodeName, &NodeObservation> =
            obs.nodes.iter().map(|n| (&n.node, n)).collect();
        for node in reported.keys() {
            self.nodes.entry((*node).clone()).or_default();
        }
        let mut signals = Signals { idle: obs.num_pending == 0, ..Signals::default() };
        self.nodes.retain(|name, state| {
            let (rate, backlog) =
                reported.get(name).map_or((0.0, 0), |o| (o.arrivals_per_second.max(0.0), o.backlog));
            let ewma = match state.ewma {
                Some(prev) => alpha * rate + (1.0 - alpha) * prev,
                None => rate,
            };
            // Snap the geometric tail to zero so an idle node's average can reach 0.
            let ewma = if ewma < 1e-9 { 0.0 } else { ewma };
            state.ewma = Some(ewma);
            state.samples.push_back((now, ewma));
            while state.samples.front().is_some_and(|(t, _)| now.saturating_sub(*t) >= stable_window) {
                state.samples.pop_front();
            }
            let mean = |window: Duration| {
                let (sum, n) = state
                    .samples
                    .iter()
                    .filter(|(t, _)| now.saturating_sub(*t) < window)
                    .fold((0.0, 0u32), |(s, n), (_, v)| (s + v, n + 1));
                if n == 0 {
                    0.0
                } else {
                    sum / f64::from(n)
                }
            };
            let (stable, panic) = (mean(stable_window), mean(panic_window));
            signals.idle &= rate == 0.0 && backlog == 0;
            signals.stable_total += stable;
            signals.panic_total += panic;
            signals.backlog_total += backlog;
            signals.per_node.insert(name.clone(), (stable, panic, backlog));
            // Forget a node that no longer reports and whose window holds only zeros.
            reported.contains_key(name) || stable > 0.0 || backlog > 0
        });
        signals
    }

    /// Step 3: KPA's panic entry, extension and exit.
    fn update_mode(&mut self, now: Duration, panic_total: f64, current: u32) -> Option<ScalingEvent> {
        let threshold = self.policy.panic_threshold_percentage / 100.0;
        let over = panic_total / self.policy.planned_rate_per_host() >= threshold * f64::from(current.max(1));
        match (self.mode, over) {
            (Mode::Stable, true) => {
                self.mode = Mode::Panic;
                self.last_panic_trigger = Some(now);
                Some(ScalingEvent {
                    reason: EventReason::PanicEntered,
                    message: format!(
                        "panic-window demand {panic_total:.1} updates/s is at least {:.0}% of the capacity of {current} hosts",
                        self.policy.panic_threshold_percentage
                    ),
                })
            }
            (Mode::Panic, true) => {
                self.last_panic_trigger = Some(now);
                None
            }
            (Mode::Panic, false) => {
                let since = now.saturating_sub(self.last_panic_trigger.unwrap_or(now));
                if since >= self.policy.stable_window.get() {
                    self.mode = Mode::Stable;
                    self.last_panic_trigger = None;
                    Some(ScalingEvent {
                        reason: EventReason::PanicExited,
                        message: format!(
                            "no panic trigger for a full stable window ({})",
                            self.policy.stable_window
                        ),
                    })
                } else {
                    None
                }
            }
            (Mode::Stable, false) => None,
        }
    }

    /// Steps 2 and 4: the raw recommendation (total, and per node for distribution). Each
    /// node's demand in hosts is `rate / planned rate per host + backlog / (rate per host ×
    /// drain)` (fractional); [`placement::pack_demand`] packs it best-fit-decreasing into whole
    /// hosts (a leaf per node with demand, remainders spilled into spare capacity where they
    /// fit), and `num_pending`'s term is added on top.
    fn recommend(&self, signals: &Signals, num_pending: u64, current: u32) -> (u32, BTreeMap<NodeName, u32>) {
        let per_host = self.policy.planned_rate_per_host();
        let drain =
            self.policy.target.updates_per_second_per_host * self.policy.backlog_drain_time().as_secs_f64();
        let demand: BTreeMap<NodeName, f64> = signals
            .per_node
            .iter()
            .map(|(node, (stable, panic, backlog))| {
                let rate = if self.mode == Mode::Panic { *panic } else { *stable };
                (node.clone(), rate / per_host + *backlog as f64 / drain)
            })
            .collect();
        let (packed, _) = placement::pack_demand(&demand);
        let per_node: BTreeMap<NodeName, u32> =
            signals.per_node.keys().map(|n| (n.clone(), packed.get(n).copied().unwrap_or(0))).collect();
        let mut total = per_node.values().fold(0u32, |a, b| a.saturating_add(*b));
        total = total.saturating_add(ceil_hosts(num_pending as f64 / drain));
        if self.mode == Mode::Panic {
            total = total.max(current);
        }
        (total, per_node)
    }

    /// Step 5a: HPA's tolerance.
    fn apply_tolerance(&self, recommendation: u32, current: u32) -> u32 {
        let within =
            f64::from(recommendation.abs_diff(current)) <= self.policy.tolerance * f64::from(current);
        if current > 0 && within {
            current
        } else {
            recommendation
        }
    }

    /// Step 7 (the scale-to-zero half): track the idle stretch and apply the grace period.
    fn apply_idle(&mut self, now: Duration, signals: &Signals, wanted: u32, current: u32) -> u32 {
        self.idle_since = if signals.idle { Some(self.idle_since.unwrap_or(now)) } else { None };
        let grace_over = self
            .idle_since
            .is_some_and(|since| now.saturating_sub(since) >= self.policy.scale_to_zero_grace_period.get());
        if grace_over {
            0
        } else if wanted == 0 && current > 0 {
            1
        } else {
            wanted
        }
    }

    /// Step 5b: HPA's stabilization windows.
    fn stabilize(&mut self, now: Duration, wanted: u32, current: u32) -> u32 {
        let up_cutoff = self.scale_up.stabilization_window;
        let down_cutoff = self.scale_down.stabilization_window;
        let mut up = wanted;
        let mut down = wanted;
        for (t, rec) in &self.recommendations {
            let age = now.saturating_sub(*t);
            if age < up_cutoff {
                up = up.min(*rec);
            }
            if age < down_cutoff {
                down = down.max(*rec);
            }
        }
        self.recommendations.push_back((now, wanted));
        let keep = up_cutoff.max(down_cutoff);
        while self.recommendations.front().is_some_and(|(t, _)| now.saturating_sub(*t) >= keep) {
            self.recommendations.pop_front();
        }
        current.max(up).min(down)
    }

    /// Step 5c and the global half of step 6: HPA's rate limits and `[minHosts, maxHosts]`.
    fn rate_limit(&mut self, now: Duration, desired: u32, current: u32) -> (u32, Option<LimitReason>) {
        let (min, max) = (self.policy.min_hosts, self.policy.max_hosts);
        let longest = |rules: &ResolvedRules| {
            rules
                .policies
                .iter()
                .map(|p| Duration::from_secs(p.period_seconds.into()))
                .max()
                .unwrap_or_default()
        };
        let keep = longest(&self.scale_up).max(longest(&self.scale_down));
        for events in [&mut self.up_events, &mut self.down_events] {
            while events.front().is_some_and(|(t, _)| now.saturating_sub(*t) >= keep) {
                events.pop_front();
            }
        }
        let (result, reason) = if desired > current {
            let limit = self.scale_up_limit(now, current).max(current);
            if limit < max && desired > limit {
                (limit, Some(LimitReason::ScaleUpLimit))
            } else if desired > max {
                (max, Some(LimitReason::TooManyReplicas))
            } else {
                (desired, None)
            }
        } else if desired < current {
            let limit = self.scale_down_limit(now, current).min(current);
            if limit > min && desired < limit {
                (limit, Some(LimitReason::ScaleDownLimit))
            } else if desired < min {
                (min, Some(LimitReason::TooFewReplicas))
            } else {
                (desired, None)
            }
        } else {
            (desired, None)
        };
        if result > max {
            (max, Some(LimitReason::TooManyReplicas))
        } else if result < min {
            (min, Some(LimitReason::TooFewReplicas))
        } else {
            (result, reason)
        }
    }

    /// Hosts at the start of `period`: current minus what was added plus what was removed
    /// since (HPA's `periodStartReplicas`).
    fn period_start(&self, now: Duration, current: u32, period_seconds: u32) -> i64 {
        let period = Duration::from_secs(period_seconds.into());
        let within = |events: &VecDeque<(Duration, u32)>| -> i64 {
            events.iter().filter(|(t, _)| now.saturating_sub(*t) < period).map(|(_, n)| i64::from(*n)).sum()
        };
        i64::from(current) - within(&self.up_events) + within(&self.down_events)
    }

    fn scale_up_limit(&self, now: Duration, current: u32) -> u32 {
        let rules = &self.scale_up;
        if rules.select_policy == SelectPolicy::Disabled {
            return current;
        }
        let proposals = rules.policies.iter().map(|p| {
            let start = self.period_start(now, current, p.period_seconds);
            match p.kind {
                ScalingPolicyKind::Pods => start + i64::from(p.value),
                // HPA rounds up so a small count can still grow.
                ScalingPolicyKind::Percent => {
                    (start as f64 * (1.0 + f64::from(p.value) / 100.0)).ceil() as i64
                }
            }
        });
        let chosen = match rules.select_policy {
            SelectPolicy::Min => proposals.min(),
            _ => proposals.max(),
        };
        clamp_u32(chosen.unwrap_or(i64::from(current)))
    }

    fn scale_down_limit(&self, now: Duration, current: u32) -> u32 {
        let rules = &self.scale_down;
        if rules.select_policy == SelectPolicy::Disabled {
            return current;
        }
        let proposals = rules.policies.iter().map(|p| {
            let start = self.period_start(now, current, p.period_seconds);
            match p.kind {
                ScalingPolicyKind::Pods => start - i64::from(p.value),
                // HPA truncates (int32 conversion) when shrinking.
                ScalingPolicyKind::Percent => (start as f64 * (1.0 - f64::from(p.value) / 100.0)) as i64,
            }
        });
        // For scale-down the largest change is the lowest count.
        let chosen = match rules.select_policy {
            SelectPolicy::Min => proposals.max(),
            _ => proposals.min(),
        };
        clamp_u32(chosen.unwrap_or(i64::from(current)))
    }

    /// Records the change for the rate limits and returns its event.
    fn record_scale(
        &mut self,
        now: Duration,
        current: u32,
        total: u32,
        recommendation: u32,
    ) -> Option<ScalingEvent> {
        let (reason, delta) = match total.cmp(&current) {
            std::cmp::Ordering::Greater if current == 0 => (EventReason::ActivatedFromZero, total),
            std::cmp::Ordering::Greater => (EventReason::ScaleUp, total - current),
            std::cmp::Ordering::Less if total == 0 => (EventReason::ScaledToZero, current),
            std::cmp::Ordering::Less => (EventReason::ScaleDown, current - total),
            std::cmp::Ordering::Equal => return None,
        };
        if total > current {
            self.up_events.push_back((now, delta));
        } else {
            self.down_events.push_back((now, delta));
        }
        Some(ScalingEvent {
            reason,
            message: format!(
                "{current} -> {total} hosts (recommended {recommendation}, mode {})",
                self.mode.as_str()
            ),
        })
    }
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Spreads a total over nodes, moving as few hosts as possible (R1.5: a running host is
/// preferred to a new one): each node first keeps its current hosts up to its own
/// recommendation; what is left of the total covers the other nodes' unmet recommendations (by
/// largest remainder when it cannot cover them all); hosts beyond every recommendation (held by
/// stabilization, tolerance, panic or `minHosts`) stay where hosts already run, then go to the
/// busiest nodes, one each in turn.
fn distribute(
    total: u32,
    recs: &BTreeMap<NodeName, u32>,
    current: &BTreeMap<NodeName, u32>,
    signals: &Signals,
) -> BTreeMap<NodeName, u32> {
    let kept: BTreeMap<NodeName, u32> =
        recs.iter().map(|(n, r)| (n.clone(), (*r).min(current.get(n).copied().unwrap_or(0)))).collect();
    let kept_sum: u32 = kept.values().sum();
    if total <= kept_sum {
        return placement::apportion(total, &kept);
    }
    let deficit: BTreeMap<NodeName, u32> =
        recs.iter().map(|(n, r)| (n.clone(), r - kept[n])).filter(|(_, d)| *d > 0).collect();
    let deficit_sum: u32 = deficit.values().sum();
    let mut demand = kept;
    for (node, add) in placement::apportion((total - kept_sum).min(deficit_sum), &deficit) {
        *demand.entry(node).or_default() += add;
    }
    let mut extra = total.saturating_sub(kept_sum + deficit_sum);
    for (node, have) in current {
        let slot = demand.entry(node.clone()).or_default();
        let keep = have.saturating_sub(*slot).min(extra);
        *slot += keep;
        extra -= keep;
    }
    if extra > 0 {
        // Busiest first: stable rate, then backlog, then name.
        let mut order: Vec<(&NodeName, f64, u64)> =
            signals.per_node.iter().map(|(n, (stable, _, backlog))| (n, *stable, *backlog)).collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(b.0)));
        if order.is_empty() {
            order.extend(current.keys().map(|n| (n, 0.0, 0)));
        }
        for i in 0..extra as usize {
            let Some((node, _, _)) = order.get(i % order.len().max(1)) else { break };
            *demand.entry((*node).clone()).or_default() += 1;
        }
    }
    demand
}

#[cfg(test)]
mod tests;
