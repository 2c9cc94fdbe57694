//! HTTP on a real `shoal node` process: `/healthz` answers from the start, `/readyz` only once
//! NATS and the shared-memory directory are up and 503 again during a NATS outage (the
//! counters, `shoal_nats_disconnects_total` among them, surviving it), and `/metrics` parses with a Prometheus text
//! parser (`prometheus-parse`, independent of the `prometheus-client` encoder the node uses) and
//! counts a real round. The NATS request/reply metrics subject still answers beside it. The
//! same for `shoal gateway` (ready only once NATS and its segments are up) and for a
//! `shoal function-host` process started beside it with `--function-hosts external` (ready once
//! it holds the gateway's descriptor channel; its own `/metrics`).

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
async fn node_serves_metrics_and_is_ready_only_while_nats_is_up() {
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

    // NATS goes away: /readyz says so within a few checks (500 ms apart) and turns ready again
    // once it is back (the node may fence itself and start again meanwhile); the counters
    // survive, the disconnect among them.
    drop(client);
    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = http_get(addr, "/readyz").await.unwrap();
        if code == 503 {
            assert!(body.contains("NATS"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready 5 s into a NATS outage; log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(addr, "/readyz").await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "not ready again after NATS came back; log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scrape = parse_strictly(&http_get(addr, "/metrics").await.unwrap().1);
    assert!(
        value(&scrape, "shoal_nats_disconnects_total", &[]).unwrap_or(0.0) >= 1.0,
        "the outage is not counted; log:\n{}",
        node.log()
    );
    assert_eq!(value(&scrape, "shoal_updates_staged_total", &[]), Some(2.0), "counters reset");

    // SIGTERM: the listener goes away with the process.
    assert!(node.terminate().success());
    assert!(http_get(addr, "/healthz").await.is_err(), "the listener outlived the node");
}

async fn wait_ready(addr: SocketAddr, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "/readyz").await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "{what} never ready; log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `shoal gateway --function-hosts external`: its `/readyz` turns ready only once NATS and its
/// shared-memory directory are up; a function host started beside it (as the operator would)
/// serves `/metrics` and `/readyz` of its own, ready once it holds the gateway's descriptor
/// channel, and its metrics (parsed strictly) count the aggregator it ran for a real round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_function_host_serve_http_and_turn_ready_in_order() {
    init_logging();
    let mut nats = NatsServer::start().unwrap();
    let url = nats.url();
    nats.kill();
    let mut gateway =
        NodeProcess::launch_gateway(&url, "hg", &["--function-hosts", "external", "--ebpf", "off"]);
    let gw_addr = wait_for_http_addr(&gateway).await;
    assert_eq!(http_get(gw_addr, "/healthz").await.unwrap().0, 200);
    let (code, body) = http_get(gw_addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "gateway ready before NATS is up: {body}");
    assert!(body.contains("NATS"), "{body}");
    nats.restart().unwrap();
    gateway.wait_ready(&url).await;
    wait_ready(gw_addr, "the gateway", || gateway.log()).await;
    assert!(gateway.shm_dir().is_dir(), "gateway ready before the shared-memory directory exists");

    let host = FunctionHostProcess::start(&url, &gateway, 7, "127.0.0.1:0");
    let host_addr = host.http_addr().await;
    assert_ne!(host_addr, gw_addr);
    assert_eq!(http_get(host_addr, "/healthz").await.unwrap().0, 200);
    wait_ready(host_addr, "the function host", || host.log()).await;
    assert!(gateway.log().contains("function host connected"), "ready before connecting:\n{}", gateway.log());

    let client = connect(&url).await;
    let m = manifest(&[("w", DType::F32, &[16]), ("b", DType::F32, &[4])]);
    let job = JobId::new("hg").unwrap();
    let spec = job_spec("hg", (*m).clone(), 2, 2, 60_000, 1);
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

    // The host's own registry: one aggregator started on demand, nothing refused.
    let (code, text) = http_get(host_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let scrape = parse_strictly(&text);
    assert_eq!(value(&scrape, "shoal_aggregator_cold_starts_total", &[]), Some(1.0), "{text}");
    // Counted by the aggregator as it takes the update (runtime/src/host/aggregator.rs): in a
    // split node, by the function host.
    assert_eq!(value(&scrape, "shoal_updates_staged_total", &[]), Some(2.0), "{text}");
    let refused: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "shoal_descriptor_channel_errors_total")
        .filter(|s| !matches!(s.value, Value::Counter(v) | Value::Untyped(v) if v == 0.0))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    // The gateway's: two descriptors to the one host, which serves the job.
    let (code, text) = http_get(gw_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let scrape = parse_strictly(&text);
    assert_eq!(value(&scrape, "shoal_descriptor_channel_descriptors_sent_total", &[]), Some(2.0), "{text}");
    assert_eq!(value(&scrape, "shoal_function_hosts", &[]), Some(1.0), "{text}");
    assert_eq!(value(&scrape, "shoal_function_hosts_per_job", &[("job", "hg")]), Some(1.0), "{text}");
}
