//! HTTP on a real `shoal node` process: `/healthz` answers from the start, `/readyz` only once
//! NATS and the shared-memory directory are up, and `/metrics` parses with a Prometheus text
//! parser (`prometheus-parse`, independent of the `prometheus-client` encoder the node uses) and
//! counts a real round. The NATS request/reply metrics subject still answers beside it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus_parse::{LineInfo, Scrape, Value};
use shoal_client::UpdateRequest;
use shoal_functions::{ClientId, DType, JobId, RoundId, UpdateKind};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_testkit::*;

async fn wait_for_http_addr(node: &NodeProcess) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(a) = node.http_addr() {
            return a;
        }
        assert!(Instant::now() < deadline, "no HTTP listener logged; log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Parses a `/metrics` body, insisting that every line is a comment or a well-formed sample of
/// a family declared by a `# TYPE` line before it (the parser alone skips lines it cannot read).
fn parse_strictly(text: &str) -> Scrape {
    let mut families = HashSet::new();
    let mut sample_lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match LineInfo::parse(line) {
            LineInfo::Type { metric_name, metric_alias, .. } => {
                families.insert(metric_alias.unwrap_or(metric_name));
            }
            LineInfo::Sample { metric_name, value, .. } => {
                assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
                let family = ["_total", "_bucket", "_sum", "_count", "_created"]
                    .iter()
                    .find_map(|s| metric_name.strip_suffix(s).filter(|f| families.contains(*f)))
                    .unwrap_or(metric_name);
                assert!(families.contains(family), "sample without a # TYPE: {line}");
                sample_lines += 1;
            }
            LineInfo::Doc { .. } => {}
            LineInfo::Empty | LineInfo::Ignored => assert!(line.starts_with('#'), "unparsable line: {line}"),
        }
    }
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF at the end");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let parsed = scrape.samples.iter().filter(|s| !matches!(s.value, Value::Histogram(_))).count();
    assert!(parsed > 0 && parsed <= sample_lines);
    scrape
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let matches = s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
        match (&s.value, matches) {
            (Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v), true) => Some(*v),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_metrics_and_turns_ready_only_once_nats_is_up() {
    init_logging();
    let mut nats = NatsServer::start().unwrap();
    let url = nats.url();
    // The node starts while NATS is down: it retries for 10 s, and its listener answers meanwhile.
    nats.kill();
    let mut node = NodeProcess::launch(&url, "h1", &["--ack-wait-ms", "3000"]);
    let addr = wait_for_http_addr(&node).await;
    assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
    let (code, body) = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "ready before NATS is up: {body}");
    assert!(body.contains("NATS"), "{body}");

    nats.restart().unwrap();
    node.wait_ready(&url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/readyz").await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "not ready with NATS up; log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.shm_dir().is_dir(), "ready before the shared-memory directory exists");

    // One real round of two updates.
    let client = connect(&url).await;
    let m = manifest(&[("w", DType::F32, &[16]), ("b", DType::F32, &[4])]);
    let job = JobId::new("http").unwrap();
    let spec = job_spec("http", (*m).clone(), 2, 2, 60_000, 1);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    for c in 0..2u64 {
        let values = as_sent(&m, &random_values(&m, c));
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new(format!("c{c}")).unwrap(),
                round: state.round,
                base_version: state.model_version,
                num_examples: 10 + c,
                kind: UpdateKind::Parameters,
                payload: payload(&m, &values),
                force_upload: false,
            })
            .await
            .unwrap();
    }
    let after = client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { .. })), "{after:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let (code, text) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        let scrape = parse_strictly(&text);
        if value(&scrape, "shoal_rounds_total", &[("outcome", "committed")]) == Some(1.0) {
            break scrape;
        }
        assert!(Instant::now() < deadline, "the commit never reached /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&scrape, "shoal_updates_staged_total", &[]), Some(2.0));
    assert_eq!(value(&scrape, "shoal_updates_rejected_total", &[("reason", "duplicate")]), Some(0.0));
    assert!(scrape.docs.contains_key("shoal_updates_staged"), "HELP lines are served");

    // The NATS request/reply subject serves the same registry.
    let nats_text = node.metrics(&client.connection().client).await;
    assert_eq!(value(&parse_strictly(&nats_text), "shoal_updates_staged_total", &[]), Some(2.0));

    // SIGTERM: the listener goes away with the process.
    assert!(node.terminate().success());
    assert!(http_get(addr, "/healthz").await.is_err(), "the listener outlived the node");
}
