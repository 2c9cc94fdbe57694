use std::path::Path;
use std::time::Duration;

use super::*;
use crate::ErrorKind;

fn parse(text: &str) -> Result<ScalingSpec> {
    ScalingSpec::from_yaml(Path::new("test.yaml"), text)
}

#[test]
fn empty_document_gives_the_r2_1_defaults() {
    let spec = parse("{}").unwrap();
    let a = &spec.autoscaling;
    // The values below are copied from reference/kubernetes.md R2.1, not from the code.
    assert_eq!(a.min_hosts, 0);
    assert_eq!(a.max_hosts, 100);
    assert_eq!(a.max_hosts_per_node, 4);
    assert_eq!(a.target.updates_per_second_per_host, 10.0);
    assert_eq!(a.target.utilization_percentage, 70.0);
    assert_eq!(a.activation_backlog, 0);
    assert_eq!(a.stable_window.get(), Duration::from_secs(60));
    assert_eq!(a.panic_window_percentage, 10.0);
    assert_eq!(a.panic_threshold_percentage, 200.0);
    assert_eq!(a.scale_to_zero_grace_period.get(), Duration::from_secs(30));
    assert_eq!(a.tick_interval.get(), Duration::from_secs(2));
    assert_eq!(a.tolerance, 0.1);
    assert_eq!(a.ewma_alpha, 0.7);
    let up = a.behavior.scale_up();
    assert_eq!(up.stabilization_window, Duration::ZERO);
    assert_eq!(up.select_policy, SelectPolicy::Max);
    assert_eq!(
        up.policies,
        vec![
            ScalingPolicy { kind: ScalingPolicyKind::Pods, value: 4, period_seconds: 15 },
            ScalingPolicy { kind: ScalingPolicyKind::Percent, value: 100, period_seconds: 15 },
        ]
    );
    let down = a.behavior.scale_down();
    assert_eq!(down.stabilization_window, Duration::from_secs(60), "60 s, not HPA's 300 s");
    assert_eq!(
        down.policies,
        vec![ScalingPolicy { kind: ScalingPolicyKind::Percent, value: 100, period_seconds: 15 }]
    );
    assert_eq!(spec.placement.strategy, PlacementStrategy::BestFit);
    assert_eq!(spec.max_hosts_per_node(), 4);
    // Derived quantities: 60 s × 10 % = 6 s; 10 × 70 % = 7 updates/s per host.
    assert_eq!(a.panic_window(), Duration::from_secs(6));
    assert_eq!(a.backlog_drain_time(), Duration::from_secs(6));
    assert!((a.planned_rate_per_host() - 7.0).abs() < 1e-12);
    assert_eq!(ScalingSpec::default(), spec);
}

#[test]
fn the_r2_1_yaml_block_parses_verbatim() {
    let text = r#"
autoscaling:
  minHosts: 0
  maxHosts: 100
  maxHostsPerNode: 4
  target:
    updatesPerSecondPerHost: 10
    utilizationPercentage: 70
  activationBacklog: 0
  stableWindow: 60s
  panicWindowPercentage: 10
  panicThresholdPercentage: 200
  scaleToZeroGracePeriod: 30s
  tickInterval: 2s
  tolerance: 0.1
  ewmaAlpha: 0.7
  behavior:
    scaleUp:   {stabilizationWindowSeconds: 0,  selectPolicy: Max,
                policies: [{type: Pods, value: 4, periodSeconds: 15}, {type: Percent, value: 100, periodSeconds: 15}]}
    scaleDown: {stabilizationWindowSeconds: 60, selectPolicy: Max,
                policies: [{type: Percent, value: 100, periodSeconds: 15}]}
placement:
  strategy: roundRobin
  maxHostsPerNode: 2
"#;
    let spec = parse(text).unwrap();
    let defaults = AutoscalingPolicy::default();
    assert_eq!(spec.autoscaling.behavior.scale_up(), defaults.behavior.scale_up());
    assert_eq!(spec.autoscaling.behavior.scale_down(), defaults.behavior.scale_down());
    assert_eq!(spec.autoscaling.stable_window, defaults.stable_window);
    assert_eq!(spec.placement.strategy, PlacementStrategy::RoundRobin);
    assert_eq!(spec.max_hosts_per_node(), 2, "placement.maxHostsPerNode overrides");
}

#[test]
fn partial_behavior_keeps_the_other_defaults() {
    let spec = parse("autoscaling: {behavior: {scaleDown: {stabilizationWindowSeconds: 10}}}").unwrap();
    let down = spec.autoscaling.behavior.scale_down();
    assert_eq!(down.stabilization_window, Duration::from_secs(10));
    assert_eq!(down.policies.len(), 1);
    assert_eq!(spec.autoscaling.behavior.scale_up().policies.len(), 2);
}

#[test]
fn unknown_and_misspelled_fields_are_refused() {
    for text in [
        "autoscaling: {stableWindowSeconds: 60}",
        "autoscaling: {target: {updatesPerSecond: 10}}",
        "placement: {strategy: bestfit}",
        "autoscaling: {behavior: {scaleUp: {policies: [{type: Replicas, value: 1, periodSeconds: 1}]}}}",
        "autoscaling: {stableWindow: 60}",
        "autoscalling: {}",
    ] {
        assert_eq!(parse(text).unwrap_err().kind(), ErrorKind::Parse, "{text}");
    }
}

#[test]
fn validation_names_the_field() {
    let cases = [
        ("autoscaling: {stableWindow: 5s}", "autoscaling.stableWindow"),
        ("autoscaling: {stableWindow: 2h}", "autoscaling.stableWindow"),
        ("autoscaling: {minHosts: 5, maxHosts: 4}", "autoscaling.minHosts"),
        ("autoscaling: {maxHosts: 0}", "autoscaling.maxHosts"),
        ("autoscaling: {maxHostsPerNode: 0}", "autoscaling.maxHostsPerNode"),
        ("autoscaling: {target: {updatesPerSecondPerHost: 0}}", "autoscaling.target.updatesPerSecondPerHost"),
        ("autoscaling: {target: {utilizationPercentage: 0}}", "autoscaling.target.utilizationPercentage"),
        ("autoscaling: {target: {utilizationPercentage: 101}}", "autoscaling.target.utilizationPercentage"),
        ("autoscaling: {panicWindowPercentage: 0.5}", "autoscaling.panicWindowPercentage"),
        ("autoscaling: {panicThresholdPercentage: 100}", "autoscaling.panicThresholdPercentage"),
        ("autoscaling: {scaleToZeroGracePeriod: 2h}", "autoscaling.scaleToZeroGracePeriod"),
        ("autoscaling: {tickInterval: 0s}", "autoscaling.tickInterval"),
        ("autoscaling: {tickInterval: 61s}", "autoscaling.tickInterval"),
        ("autoscaling: {tolerance: 1.5}", "autoscaling.tolerance"),
        ("autoscaling: {ewmaAlpha: 0}", "autoscaling.ewmaAlpha"),
        ("autoscaling: {ewmaAlpha: 1.01}", "autoscaling.ewmaAlpha"),
        (
            "autoscaling: {behavior: {scaleUp: {policies: [{type: Pods, value: 1, periodSeconds: 1801}]}}}",
            "autoscaling.behavior.scaleUp.policies[0].periodSeconds",
        ),
        (
            "autoscaling: {behavior: {scaleDown: {policies: [{type: Pods, value: 1, periodSeconds: 1}, {type: Percent, value: 0, periodSeconds: 1}]}}}",
            "autoscaling.behavior.scaleDown.policies[1].value",
        ),
        ("autoscaling: {behavior: {scaleDown: {policies: []}}}", "autoscaling.behavior.scaleDown.policies"),
        ("autoscaling: {behavior: {scaleUp: {stabilizationWindowSeconds: 3601}}}", "autoscaling.behavior.scaleUp.stabilizationWindowSeconds"),
        ("placement: {maxHostsPerNode: 0}", "placement.maxHostsPerNode"),
    ];
    for (text, field) in cases {
        let err = parse(text).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidPolicy, "{text}: {err}");
        assert_eq!(err.field(), Some(field), "{text}: {err}");
    }
    // Boundaries that must pass: 6 s and 1 h windows, a disabled direction with no policies.
    parse("autoscaling: {stableWindow: 6s, tickInterval: 500ms}").unwrap();
    parse("autoscaling: {stableWindow: 1h}").unwrap();
    parse("autoscaling: {behavior: {scaleDown: {selectPolicy: Disabled, policies: []}}}").unwrap();
}

#[test]
fn serialisation_round_trips() {
    let mut spec = ScalingSpec::default();
    spec.autoscaling.stable_window = KubeDuration::from_secs(10);
    spec.placement.strategy = PlacementStrategy::WorstFit;
    let yaml = serde_yaml::to_string(&spec).unwrap();
    assert_eq!(parse(&yaml).unwrap(), spec);
}

#[test]
fn schema_carries_names_and_ranges_for_the_crd() {
    let schema = serde_json::to_value(schemars::schema_for!(ScalingSpec)).unwrap();
    let text = schema.to_string();
    for needle in
        ["updatesPerSecondPerHost", "scaleToZeroGracePeriod", "stabilizationWindowSeconds", "bestFit"]
    {
        assert!(text.contains(needle), "{needle} missing from the schema");
    }
    let defs = &schema["$defs"];
    let policy = &defs["ScalingPolicy"]["properties"]["periodSeconds"];
    assert_eq!(policy["minimum"], 1);
    assert_eq!(policy["maximum"], 1800);
    let target = &defs["ScalingTarget"]["properties"]["utilizationPercentage"];
    assert_eq!(target["maximum"], 100.0);
    // OpenAPI v3.0, what a CRD schema is: `exclusiveMinimum` is a flag on `minimum`.
    assert_eq!(
        (target["minimum"].as_f64(), &target["exclusiveMinimum"]),
        (Some(0.0), &serde_json::json!(true))
    );
    let window = &defs["AutoscalingPolicy"]["properties"]["stableWindow"];
    assert_eq!(window["type"], "string");
}
