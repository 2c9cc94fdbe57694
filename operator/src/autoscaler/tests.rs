//! Every rule of R2.2 on a hand-computed trace. The expected numbers are derived in the comments
//! from the policy's definitions, not taken from a run of the code.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::*;

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn spec(yaml: &str) -> ScalingSpec {
    ScalingSpec::from_yaml(Path::new("test.yaml"), yaml).unwrap()
}

/// Feeds an autoscaler tick by tick and applies each decision as the next tick's `current`,
/// the way the reconcile and the simulator do.
struct Driver {
    scaler: Autoscaler,
    current: BTreeMap<NodeName, u32>,
}

impl Driver {
    fn new(yaml: &str, current: &[(&str, u32)]) -> Self {
        Driver {
            scaler: Autoscaler::new(&spec(yaml)).unwrap(),
            current: current.iter().map(|(n, h)| (node(n), *h)).collect(),
        }
    }

    /// One tick at `t` seconds; `nodes` = (name, arrivals/s, backlog).
    fn tick_pending(&mut self, t: u64, nodes: &[(&str, f64, u64)], num_pending: u64) -> Decision {
        let obs = Observation {
            now: Duration::from_secs(t),
            nodes: nodes
                .iter()
                .map(|(n, rate, backlog)| NodeObservation {
                    node: node(n),
                    arrivals_per_second: *rate,
                    backlog: *backlog,
                })
                .collect(),
            num_pending,
            current: self.current.clone(),
        };
        let d = self.scaler.tick(&obs);
        self.current = d.desired.iter().filter(|(_, h)| **h > 0).map(|(n, h)| (n.clone(), *h)).collect();
        d
    }

    fn tick(&mut self, t: u64, nodes: &[(&str, f64, u64)]) -> Decision {
        self.tick_pending(t, nodes, 0)
    }

    fn hosts(&self, name: &str) -> u32 {
        self.current.get(&node(name)).copied().unwrap_or(0)
    }
}

fn reasons(d: &Decision) -> Vec<EventReason> {
    d.events.iter().map(|e| e.reason).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Policy knobs that switch off the rules a test is not about.
const QUIET: &str = "panicThresholdPercentage: 1000, tolerance: 0, maxHostsPerNode: 100, maxHosts: 1000";
const FREE_LIMITS: &str = "behavior: {scaleUp: {policies: [{type: Pods, value: 1000, periodSeconds: 1}]}, \
     scaleDown: {stabilizationWindowSeconds: 0, policies: [{type: Percent, value: 100, periodSeconds: 1}]}}";

#[test]
fn ewma_and_the_stable_and_panic_window_means() {
    // α = 0.7 (default). Observed 10, 0, 20, 0 at t = 0, 2, 4, 6:
    //   ewma = 10 (the first sample is taken as is), 0.7·0 + 0.3·10 = 3,
    //          0.7·20 + 0.3·3 = 14.9, 0.7·0 + 0.3·14.9 = 4.47.
    // At t = 6 the stable window (60 s) holds all four: (10 + 3 + 14.9 + 4.47) / 4 = 8.0925;
    // the panic window (6 s) holds ages < 6 s, i.e. t = 2, 4, 6: (3 + 14.9 + 4.47) / 3 = 7.45667.
    let mut d = Driver::new(&format!("autoscaling: {{{QUIET}}}"), &[("a", 2)]);
    for (t, rate) in [(0, 10.0), (2, 0.0), (4, 20.0)] {
        d.tick(t, &[("a", rate, 0)]);
    }
    let last = d.tick(6, &[("a", 0.0, 0)]);
    assert!(close(last.observed_rate[&node("a")], 4.47), "{:?}", last.observed_rate);
    assert!(close(last.stable_rate, 8.0925), "{}", last.stable_rate);
    assert!(close(last.panic_rate, 22.37 / 3.0), "{}", last.panic_rate);
}

#[test]
fn desired_is_the_ceiling_of_rate_over_planned_rate_per_host() {
    // Planned rate per host = 10 × 70 % = 7 updates/s. From 3 hosts (no panic: 21/7 = 3 < 2 × 3):
    // 21 updates/s → ⌈3⌉ = 3 hosts; 21.7 → ⌈3.1⌉ = 4; 7.7 → ⌈1.1⌉ = 2.
    for (rate, want) in [(21.0, 3), (21.7, 4), (7.7, 2)] {
        let mut d = Driver::new(
            &format!("autoscaling: {{tolerance: 0, maxHostsPerNode: 10, {FREE_LIMITS}}}"),
            &[("a", 3)],
        );
        let dec = d.tick(0, &[("a", rate, 0)]);
        assert_eq!(dec.recommendation, want, "rate {rate}");
        assert_eq!(dec.total, want, "rate {rate}");
        assert_eq!(dec.mode, Mode::Stable);
    }
}

#[test]
fn tolerance_keeps_the_count_for_small_changes() {
    // From 10 hosts with tolerance 0.1: a change of at most 0.1 × 10 = 1 host is ignored.
    // 75.6 / 7 = 10.8 → 11 (|11 − 10| = 1 ≤ 1: keep 10); 77.7 / 7 = 11.1 → 12 (2 > 1: scale).
    let policy =
        format!("autoscaling: {{maxHostsPerNode: 20, panicThresholdPercentage: 1000, {FREE_LIMITS}}}");
    let mut d = Driver::new(&policy, &[("a", 10)]);
    let dec = d.tick(0, &[("a", 75.6, 0)]);
    assert_eq!((dec.recommendation, dec.total), (11, 10));
    assert!(dec.events.is_empty());
    let mut d = Driver::new(&policy, &[("a", 10)]);
    let dec = d.tick(0, &[("a", 77.7, 0)]);
    assert_eq!((dec.recommendation, dec.total), (12, 12));
    assert_eq!(reasons(&dec), vec![EventReason::ScaleUp]);
}

#[test]
fn panic_is_entered_at_the_threshold_of_current_capacity() {
    // Two hosts plan for 2 × 7 = 14 updates/s; the 200 % threshold is 28 updates/s.
    let policy = format!("autoscaling: {{maxHostsPerNode: 20, {FREE_LIMITS}}}");
    let mut d = Driver::new(&policy, &[("a", 2)]);
    assert_eq!(d.tick(0, &[("a", 27.9, 0)]).mode, Mode::Stable);
    let mut d = Driver::new(&policy, &[("a", 2)]);
    let dec = d.tick(0, &[("a", 28.0, 0)]);
    assert_eq!(dec.mode, Mode::Panic);
    // In panic the panic average is used: ⌈28 / 7⌉ = 4.
    assert_eq!(dec.total, 4);
    assert_eq!(reasons(&dec), vec![EventReason::PanicEntered, EventReason::ScaleUp]);
}

#[test]
fn panic_never_scales_down_and_ends_a_stable_window_after_the_last_trigger() {
    // α = 1 (EWMA = observed), stable window 10 s, panic window 20 % = 2 s (the current
    // sample only), no stabilization or rate limits.
    let policy = format!(
        "autoscaling: {{ewmaAlpha: 1, stableWindow: 10s, panicWindowPercentage: 20, tolerance: 0, \
         maxHostsPerNode: 20, {FREE_LIMITS}}}"
    );
    let mut d = Driver::new(&policy, &[("a", 1)]);
    // t=0: 70/7 = 10 ≥ 2 × 1 → panic (last trigger t=0); ⌈70/7⌉ = 10 hosts.
    let dec = d.tick(0, &[("a", 70.0, 0)]);
    assert_eq!((dec.mode, dec.total), (Mode::Panic, 10));
    // t=2..8: 14/7 = 2 < 2 × 10, no new trigger; the panic recommendation ⌈14/7⌉ = 2 is held
    // at the current 10 (never scale down in panic).
    for t in [2, 4, 6, 8] {
        let dec = d.tick(t, &[("a", 14.0, 0)]);
        assert_eq!((dec.mode, dec.total), (Mode::Panic, 10), "t={t}");
        assert!(dec.events.is_empty(), "t={t}");
    }
    // t=10: 10 s since the last trigger → stable. The stable window holds t=2..10 (age < 10 s),
    // all 14 → ⌈14/7⌉ = 2 hosts.
    let dec = d.tick(10, &[("a", 14.0, 0)]);
    assert_eq!((dec.mode, dec.total), (Mode::Stable, 2));
    assert_eq!(reasons(&dec), vec![EventReason::PanicExited, EventReason::ScaleDown]);
}

#[test]
fn a_new_trigger_extends_panic() {
    // As above, but a second burst at t=6 moves the exit to t=16.
    let policy = format!(
        "autoscaling: {{ewmaAlpha: 1, stableWindow: 10s, panicWindowPercentage: 20, tolerance: 0, \
         maxHostsPerNode: 100, maxHosts: 1000, {FREE_LIMITS}}}"
    );
    let mut d = Driver::new(&policy, &[("a", 1)]);
    d.tick(0, &[("a", 70.0, 0)]); // 10 hosts
    d.tick(2, &[("a", 14.0, 0)]);
    d.tick(4, &[("a", 14.0, 0)]);
    // t=6: 140/7 = 20 ≥ 2 × 10 → trigger again; ⌈140/7⌉ = 20 hosts.
    let dec = d.tick(6, &[("a", 140.0, 0)]);
    assert_eq!((dec.mode, dec.total), (Mode::Panic, 20));
    for t in [8, 10, 12, 14] {
        assert_eq!(d.tick(t, &[("a", 14.0, 0)]).mode, Mode::Panic, "t={t}");
    }
    // t=16: 10 s after t=6. Stable window t=8..16 all 14 → 2 hosts.
    let dec = d.tick(16, &[("a", 14.0, 0)]);
    assert_eq!((dec.mode, dec.total), (Mode::Stable, 2));
}

#[test]
fn backlog_adds_hosts_to_drain_it_within_the_panic_window() {
    // Drain time = panic window = 6 s; one host folds 10 updates/s → 60 updates per host.
    // Node a: no arrivals, backlog 61 → ⌈61/60⌉ = 2; num_pending 120 → ⌈120/60⌉ = 2; total 4.
    // From 1 host the scale-up limit is max(1 + 4, ⌈1 × 2⌉) = 5 ≥ 4.
    let mut d = Driver::new("autoscaling: {}", &[("a", 1)]);
    let dec = d.tick_pending(0, &[("a", 0.0, 61)], 120);
    assert_eq!(dec.recommendation, 4);
    assert_eq!(dec.backlog, 181);
    assert_eq!(dec.desired[&node("a")], 4, "the pending share goes to the busiest node");
    // A backlog of exactly 60 needs exactly one host.
    let mut d = Driver::new("autoscaling: {}", &[("a", 1)]);
    assert_eq!(d.tick(0, &[("a", 0.0, 60)]).recommendation, 1);
}

#[test]
fn scale_up_follows_hpa_rate_limits() {
    // Default scale-up: Pods 4 / 15 s and Percent 100 / 15 s, selectPolicy Max.
    // Demand 700/7 = 100 hosts from 1 (panic, which does not lift the limits):
    //   t=0:  start 1 → max(1 + 4, ⌈1 × 2⌉) = 5.
    //   t=2..14: the +4 of t=0 is within 15 s → start 5 − 4 = 1 → limit 5.
    //   t=16: t=0 is 16 s old → start 5 → max(9, 10) = 10.
    //   t=18..30: the +5 of t=16 is within 15 s → limit 10.
    //   t=32: start 10 → max(14, 20) = 20.
    let mut d = Driver::new("autoscaling: {maxHostsPerNode: 1000, maxHosts: 1000}", &[("a", 1)]);
    let mut seen = Vec::new();
    for t in (0..=32).step_by(2) {
        let dec = d.tick(t, &[("a", 700.0, 0)]);
        assert_eq!(dec.limited, Some(LimitReason::ScaleUpLimit), "t={t}");
        seen.push(dec.total);
    }
    let want: Vec<u32> = [5; 8].into_iter().chain([10; 8]).chain([20]).collect();
    assert_eq!(seen, want);
    // selectPolicy Min: min(1 + 4, ⌈1 × 2⌉) = 2.
    let mut d = Driver::new(
        "autoscaling: {maxHostsPerNode: 1000, behavior: {scaleUp: {selectPolicy: Min}}}",
        &[("a", 1)],
    );
    assert_eq!(d.tick(0, &[("a", 700.0, 0)]).total, 2);
}

#[test]
fn scale_down_keeps_the_highest_recommendation_of_its_window() {
    // α = 1, stable window 6 s (ages < 6 s: the last three samples), scale-down stabilization
    // 10 s, no rate limit, no tolerance, no panic.
    let policy = format!(
        "autoscaling: {{ewmaAlpha: 1, stableWindow: 6s, {QUIET}, behavior: {{scaleDown: \
         {{stabilizationWindowSeconds: 10, policies: [{{type: Percent, value: 100, periodSeconds: 1}}]}}}}}}"
    );
    let mut d = Driver::new(&policy, &[("a", 6)]);
    // Recommendations: t=0 mean(42) = 42 → 6; t=2 mean(42, 0) = 21 → 3; t=4 mean(42, 0, 0) = 14
    // → 2; t=6.. mean(0, 0, 0) = 0 → 0, held at 1 within the scale-to-zero grace period.
    // Kept = max of the recommendations less than 10 s old:
    //   t=0..8 include t=0's 6 → 6; t=10: {3, 2, 1, 1, 1} → 3; t=12: {2, 1, ...} → 2; t=14: 1.
    let rates = [42.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let want = [6, 6, 6, 6, 6, 3, 2, 1];
    for (i, (rate, want)) in rates.iter().zip(want).enumerate() {
        let t = 2 * i as u64;
        assert_eq!(d.tick(t, &[("a", *rate, 0)]).total, want, "t={t}");
    }
}

#[test]
fn scale_down_follows_hpa_rate_limits() {
    // Percent 50 / 10 s, no stabilization; demand 7/7 = 1 host from 8 (HPA truncates):
    //   t=0: start 8 → ⌊8 × 0.5⌋ = 4.   t=2..8: the −4 of t=0 counts → start 8 → 4.
    //   t=10: t=0 is 10 s old → start 4 → 2.   t=12..18: start 2 + 2 = 4 → 2.
    //   t=20: start 2 → 1, which is the demand: not limited.
    let mut d = Driver::new(
        "autoscaling: {ewmaAlpha: 1, tolerance: 0, maxHostsPerNode: 10, behavior: {scaleDown: \
         {stabilizationWindowSeconds: 0, policies: [{type: Percent, value: 50, periodSeconds: 10}]}}}",
        &[("a", 8)],
    );
    let mut seen = Vec::new();
    for t in (0..=20).step_by(2) {
        let dec = d.tick(t, &[("a", 7.0, 0)]);
        seen.push(dec.total);
        let limited = if t < 20 { Some(LimitReason::ScaleDownLimit) } else { None };
        assert_eq!(dec.limited, limited, "t={t}");
    }
    assert_eq!(seen, vec![4, 4, 4, 4, 4, 2, 2, 2, 2, 2, 1]);
}

#[test]
fn activation_from_zero_needs_backlog_above_the_threshold() {
    let policy = "autoscaling: {activationBacklog: 10}";
    let mut d = Driver::new(policy, &[]);
    // Nothing staged, or 10 staged (not above 10): stay at zero, no event.
    assert_eq!(d.tick(0, &[("a", 0.0, 0)]).total, 0);
    let dec = d.tick(2, &[("a", 5.0, 10)]);
    assert_eq!(dec.total, 0);
    assert!(dec.events.is_empty());
    // 11 staged: EWMA samples 0, 0.7·5 = 3.5, 0.7·5 + 0.3·3.5 = 4.55, stable mean
    // 8.05/3 = 2.68 updates/s → 2.68/7 = 0.383 hosts, plus the backlog's 11/60 = 0.183: node
    // a's demand is 0.566 of a host, i.e. one host (its leaf).
    let dec = d.tick(4, &[("a", 5.0, 11)]);
    assert_eq!(dec.total, 1);
    assert_eq!(reasons(&dec), vec![EventReason::ActivatedFromZero]);
    // From zero the HPA limit is max(0 + 4, ⌈0 × 2⌉) = 4: a 300-update backlog (⌈300/60⌉ = 5)
    // activates to 4.
    let mut d = Driver::new("autoscaling: {}", &[]);
    let dec = d.tick(0, &[("a", 0.0, 300)]);
    assert_eq!((dec.total, dec.limited), (4, Some(LimitReason::ScaleUpLimit)));
}

#[test]
fn scale_to_zero_only_after_the_grace_period_of_nothing() {
    // α = 1, stable window 6 s, grace 10 s, scale-down stabilization 4 s, no rate limit.
    let policy = "autoscaling: {ewmaAlpha: 1, stableWindow: 6s, scaleToZeroGracePeriod: 10s, \
         behavior: {scaleDown: {stabilizationWindowSeconds: 4, policies: [{type: Percent, value: 100, periodSeconds: 1}]}}}";
    let mut d = Driver::new(policy, &[("a", 1)]);
    // t=0: 7/s → 1 host. From t=2 nothing arrives; idle since t=2.
    // t=2: mean(7, 0) → 1; t=4: mean(7, 0, 0) → 1; t=6..10: mean 0 → 0, held at 1 (grace).
    // t=12: idle 10 s ≥ grace → 0, but the scale-down window (ages < 4 s) still holds t=10's 1.
    // t=14: the window holds t=12's and t=14's 0 → zero.
    d.tick(0, &[("a", 7.0, 0)]);
    for t in [2, 4, 6, 8, 10, 12] {
        let dec = d.tick(t, &[("a", 0.0, 0)]);
        assert_eq!(dec.total, 1, "t={t}");
    }
    let dec = d.tick(14, &[("a", 0.0, 0)]);
    assert_eq!(dec.total, 0);
    assert_eq!(reasons(&dec), vec![EventReason::ScaledToZero]);
}

#[test]
fn backlog_or_pending_restarts_the_grace_period() {
    let policy = "autoscaling: {ewmaAlpha: 1, stableWindow: 6s, scaleToZeroGracePeriod: 10s, \
         behavior: {scaleDown: {stabilizationWindowSeconds: 4, policies: [{type: Percent, value: 100, periodSeconds: 1}]}}}";
    let mut d = Driver::new(policy, &[("a", 1)]);
    d.tick(0, &[("a", 7.0, 0)]);
    d.tick(2, &[("a", 0.0, 0)]);
    d.tick(4, &[("a", 0.0, 0)]);
    // t=6: one staged update; t=8: one pending in the stream. Idle again from t=10, so the
    // grace ends at t=20 and the scale-down window lets the count reach 0 at t=22.
    d.tick(6, &[("a", 0.0, 1)]);
    d.tick_pending(8, &[("a", 0.0, 0)], 1);
    for t in (10..=20).step_by(2) {
        assert_eq!(d.tick(t, &[("a", 0.0, 0)]).total, 1, "t={t}");
    }
    assert_eq!(d.tick(22, &[("a", 0.0, 0)]).total, 0);
}

#[test]
fn per_node_cap_spills_to_staged_nodes_then_the_global_cap_applies() {
    // a: 42/s → 6 hosts, b: 7/s → 1 host, c: nothing (not staged). Cap 4 per node (default).
    // Best fit: a keeps 4, its overflow of 2 goes to b (the only staged node with room) → b 3.
    let policy = format!("autoscaling: {{panicThresholdPercentage: 1000, {FREE_LIMITS}}}");
    let mut d = Driver::new(&policy, &[("a", 2), ("b", 1)]);
    let dec = d.tick(0, &[("a", 42.0, 0), ("b", 7.0, 0), ("c", 0.0, 0)]);
    assert_eq!(dec.total, 7);
    assert_eq!((d.hosts("a"), d.hosts("b"), d.hosts("c")), (4, 3, 0));
    assert_eq!(dec.desired[&node("c")], 0, "observed nodes are listed with 0");
    // maxHosts 5: 5 hosts apportioned 6 : 1 by largest remainder: a 30/7 = 4 r 2, b 5/7 = 0 r 5
    // → b gets the remaining host → a 4, b 1.
    let policy = format!("autoscaling: {{maxHosts: 5, panicThresholdPercentage: 1000, {FREE_LIMITS}}}");
    let mut d = Driver::new(&policy, &[("a", 2), ("b", 1)]);
    let dec = d.tick(0, &[("a", 42.0, 0), ("b", 7.0, 0), ("c", 0.0, 0)]);
    assert_eq!((dec.total, dec.limited), (5, Some(LimitReason::TooManyReplicas)));
    assert_eq!((d.hosts("a"), d.hosts("b")), (4, 1));
    // Only a is staged: its 2 overflow hosts have no place.
    let mut d = Driver::new(&policy.replace("maxHosts: 5", "maxHosts: 100"), &[("a", 2)]);
    let dec = d.tick(0, &[("a", 42.0, 0), ("c", 0.0, 0)]);
    assert_eq!((dec.total, dec.unplaced, dec.limited), (4, 2, Some(LimitReason::NodeCapacity)));
}

#[test]
fn min_hosts_keeps_a_warm_pool() {
    // No traffic; minHosts 2 over nodes a and b (equally idle: name order, one each).
    let mut d = Driver::new("autoscaling: {minHosts: 2}", &[]);
    let dec = d.tick(0, &[("a", 0.0, 0), ("b", 0.0, 0)]);
    assert_eq!((dec.total, dec.limited), (2, Some(LimitReason::TooFewReplicas)));
    assert_eq!((d.hosts("a"), d.hosts("b")), (1, 1));
}

#[test]
fn round_robin_policy_deals_hosts_over_the_cluster() {
    // roundRobin ignores where the demand is: 3 hosts for node c's 21/s go to a, b, c in turn.
    let policy = format!("{{autoscaling: {{panicThresholdPercentage: 1000, {FREE_LIMITS}}}, placement: {{strategy: roundRobin}}}}");
    let mut d = Driver::new(&policy, &[]);
    d.tick_pending(0, &[("a", 0.0, 0), ("b", 0.0, 0), ("c", 21.0, 1)], 0);
    // ⌈21/7⌉ + ⌈1/60⌉ = 4 hosts, but from zero... activation then the scale-up limit of 4: 4.
    assert_eq!((d.hosts("a"), d.hosts("b"), d.hosts("c")), (2, 1, 1));
}
