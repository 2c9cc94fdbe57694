//! The chart's Grafana dashboard (`charts/shoal/files/dashboards/shoal.json`) against what the
//! code exports: every metric a query names is a family a **running `shoal node`** serves (its
//! Prometheus text, scraped over NATS after one committed round, so the job-labelled series
//! exist) or one the operator registers (`shoal_operator::metrics::Metrics`); every label a
//! node query groups or filters by is on that metric's samples (or is `node`, which the chart's
//! monitors add from the pod's node); and the JSON is a loadable Grafana dashboard (schema
//! version, unique panel ids, a 24-column grid, a datasource and a query on every panel, only
//! defined variables).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use shoal_functions::{DType, JobId, RoundId};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_testkit::*;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/shoal/files/dashboards/shoal.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every panel with its nested row panels flattened.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `(refId, expr)` of every query.
fn queries(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| (t["refId"].as_str().unwrap_or("").to_owned(), t["expr"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// PromQL words that are not metric names.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_replace",
    "label_values",
    "last_over_time",
    "ln",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "quantile",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "sum",
    "sum_over_time",
    "time",
    "topk",
    "vector",
];
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
];

/// A metric selector of a query: its name and the labels it filters on.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<String>,
}

/// The metric selectors and the grouping labels (`by (...)`) of a PromQL expression: a scanner
/// for the subset Grafana queries use (identifiers, `{...}` matchers with quoted values, `[...]`
/// ranges, `by`/`without`/`on`/`ignoring` label lists, numbers, operators).
fn scan(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let (mut selectors, mut grouping) = (Vec::new(), Vec::new());
    let mut i = 0;
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_ascii_alphanumeric() || chars[*i] == '_' || chars[*i] == ':')
        {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    // The labels inside `{...}` starting at `i` (on `{`), with `i` moved past the `}`.
    let matchers = |i: &mut usize| {
        let mut labels = Vec::new();
        *i += 1;
        loop {
            skip_ws(i);
            match chars.get(*i) {
                None => panic!("unclosed {{ in {expr}"),
                Some('}') => {
                    *i += 1;
                    return labels;
                }
                Some(',') => *i += 1,
                Some('"') => {
                    *i += 1;
                    while chars.get(*i).is_some_and(|c| *c != '"') {
                        *i += if chars[*i] == '\\' { 2 } else { 1 };
                    }
                    *i += 1;
                }
                Some(c) if c.is_ascii_alphabetic() || *c == '_' => labels.push(ident(i)),
                Some('=' | '!' | '~') => *i += 1,
                Some(c) => panic!("unexpected {c:?} in the matchers of {expr}"),
            }
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let word = ident(&mut i);
            skip_ws(&mut i);
            if ["by", "without", "on", "ignoring"].contains(&word.as_str()) {
                assert_eq!(chars.get(i), Some(&'('), "{word} without a label list in {expr}");
                i += 1;
                loop {
                    skip_ws(&mut i);
                    match chars.get(i) {
                        Some(')') => {
                            i += 1;
                            break;
                        }
                        Some(',') => i += 1,
                        Some(_) => grouping.push(ident(&mut i)),
                        None => panic!("unclosed label list in {expr}"),
                    }
                }
            } else if FUNCTIONS.contains(&word.as_str()) || KEYWORDS.contains(&word.as_str()) {
                // A function or an aggregation (`sum by (...) (...)`), not a metric.
            } else {
                let labels = if chars.get(i) == Some(&'{') { matchers(&mut i) } else { Vec::new() };
                selectors.push(Selector { metric: word, matchers: labels });
            }
        } else if c == '{' {
            panic!("a selector without a metric name in {expr}");
        } else if c == '[' {
            while chars.get(i).is_some_and(|c| *c != ']') {
                i += 1;
            }
            i += 1;
        } else if c == '$' {
            // A Grafana variable ($__rate_interval, $job): checked separately.
            i += 1;
            let _ = ident(&mut i);
        } else {
            i += 1;
        }
    }
    (selectors, grouping)
}

/// The sample names of an exposition's families (`# TYPE` lines): a counter `x` is sampled as
/// `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`, anything else as `x`.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        match kind {
            "counter" => {
                names.insert(format!("{}_total", name.trim_end_matches("_total")));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The label names on each sample name of an exposition.
fn sample_labels(exposition: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').map_or("", |(l, _)| l)),
            None => (line.split_whitespace().next().unwrap_or(""), ""),
        };
        let set = out.entry(name.to_owned()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            set.insert(pair.split('=').next().unwrap_or("").trim().to_owned());
        }
    }
    out
}

#[test]
fn the_dashboard_is_loadable_grafana_json() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid: 1-40 characters");
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion set");
    assert!(schema >= 36, "schemaVersion {schema}: Grafana 9+ dashboards");
    let variables: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| {
            assert!(v["type"].is_string(), "{v}");
            v["name"].as_str().expect("variable name")
        })
        .collect();
    assert!(variables.contains("datasource"), "a datasource variable, so no uid is hard-coded");
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(g["y"].is_u64() && w >= 1 && h >= 1 && x + w <= 24, "panel {id}: gridPos {g}");
        let kind = p["type"].as_str().expect("panel type");
        assert!(["row", "timeseries", "stat", "gauge", "table", "heatmap", "text"].contains(&kind), "{kind}");
        if kind == "row" {
            continue;
        }
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "panel {id} has no title");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        let refs: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().expect("refId")).collect();
        assert_eq!(refs.len(), targets.len(), "panel {id}: refIds repeat");
    }
    for (_, expr) in queries(&d) {
        assert!(!expr.trim().is_empty());
        assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "unbalanced: {expr}");
        for var in expr.split('$').skip(1) {
            let name: String = var.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            assert!(
                name.starts_with("__") || variables.contains(name.as_str()),
                "${name} undefined in {expr}"
            );
        }
    }
    eprintln!("dashboard: schemaVersion {schema}, {} panels, {} queries", ids.len(), queries(&d).len());
}

#[test]
fn the_scanner_finds_metrics_labels_and_groupings() {
    let (s, g) = scan(
        "histogram_quantile(0.95, sum by (job, le) (rate(shoal_round_latency_seconds_bucket{job=~\"$job\", x!=\"a}b\"}[$__rate_interval]))) + on (node) shoal_jobs_served",
    );
    let names: Vec<&str> = s.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["shoal_round_latency_seconds_bucket", "shoal_jobs_served"]);
    assert_eq!(s[0].matchers, ["job", "x"]);
    assert_eq!(g, ["job", "le", "node"]);
}

/// Every metric in the dashboard's queries is exported by a running node or registered by the
/// operator, and the node metrics carry the labels the queries use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_one_the_code_exports() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "dash-node", &["--ack-wait-ms", "3000"]).await;
    let client = connect(&nats.url()).await;
    // One committed round, so that the job-labelled series have samples.
    let m = manifest(&[("w", DType::F32, &[16])]);
    let job = JobId::new("dash").unwrap();
    jobs::create_job(&infra_of(&client).await, &job_spec("dash", (*m).clone(), 1, 1, 60_000, 1), None)
        .await
        .unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    send_random(&client, &m, &job, "c1", &state, 7, 10).await;
    let after = client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { .. })), "{after:?}\n{}", node.log());
    let node_text = node.metrics(&client.connection().client).await;
    let operator_text = shoal_operator::metrics::Metrics::default().encode();
    let node_names = sample_names(&node_text);
    let operator_names = sample_names(&operator_text);
    let labels = sample_labels(&node_text);
    assert!(node_names.contains("shoal_rounds_total") && operator_names.contains("shoal_operator_leader"));

    let mut used = BTreeSet::new();
    for (ref_id, expr) in queries(&dashboard()) {
        let (selectors, grouping) = scan(&expr);
        assert!(!selectors.is_empty(), "query {ref_id} names no metric: {expr}");
        for s in &selectors {
            let from_node = node_names.contains(&s.metric);
            assert!(
                from_node || operator_names.contains(&s.metric),
                "{} (in {expr}) is exported by neither the node nor the operator",
                s.metric
            );
            used.insert(s.metric.clone());
            if !from_node {
                continue;
            }
            // Labels: what the samples carry, `le` on buckets, and `node` from the monitors.
            let have = labels.get(&s.metric).cloned().unwrap_or_default();
            for l in s.matchers.iter().chain(&grouping) {
                let ok = have.contains(l) || l == "node" || (l == "le" && s.metric.ends_with("_bucket"));
                assert!(ok, "{} has no label {l} (it has {have:?}); query: {expr}", s.metric);
            }
        }
    }
    // The panels: rounds and latency per job, staged/rejected, staleness, hosts per node
    // and autoscaler mode, cold starts, node-local vs cross-node bytes, NATS pending.
    for needed in [
        "shoal_rounds_total",
        "shoal_round_latency_seconds_bucket",
        "shoal_updates_staged_total",
        "shoal_updates_rejected_total",
        "shoal_update_staleness_bucket",
        "shoal_operator_desired_hosts",
        "shoal_operator_autoscaler_panic",
        "shoal_aggregator_cold_starts_total",
        "shoal_bytes_staged_total",
        "shoal_partial_bytes_sent_total",
        "shoal_operator_work_queue_pending_updates",
    ] {
        assert!(used.contains(needed), "the dashboard has no panel on {needed}");
    }
    eprintln!(
        "dashboard: {} metrics, all exported ({} by the node, {} by the operator)",
        used.len(),
        used.iter().filter(|m| node_names.contains(*m)).count(),
        used.iter().filter(|m| operator_names.contains(*m)).count()
    );
}
