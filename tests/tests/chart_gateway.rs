//! The chart's gateway DaemonSet runs what exists today: its node-mode container (command,
//! arguments and environment exactly as `helm template` renders them, with every optional node
//! flag set) starts a real `shoal node` against a real nats-server, which logs JSON as the chart
//! asks and answers its metrics subject. Kubernetes' part is played by hand: `$(NODE_NAME)` is
//! expanded and the shared-memory directory is a private one.
//!
//! helm (`$SHOAL_TOOLS/bin/helm`, `tools/build-go-tools.sh`) missing: the test says so loudly and
//! passes, unless `SHOAL_CHART_TOOLS_REQUIRED=1` or `CI` is set (`.ci/run`), where it fails.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use shoal_testkit::{shoal_bin, NatsServer};

fn helm() -> Option<PathBuf> {
    let dir =
        std::env::var_os("SHOAL_TOOLS").map_or_else(|| PathBuf::from("/var/tmp/shoal-tools"), PathBuf::from);
    let helm = dir.join("bin/helm");
    if helm.is_file() {
        return Some(helm);
    }
    let required = std::env::var("SHOAL_CHART_TOOLS_REQUIRED").is_ok_and(|v| v == "1")
        || std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(!required, "{} missing: build it with tools/build-go-tools.sh helm", helm.display());
    eprintln!("\n!!! SKIPPED: {} missing (tools/build-go-tools.sh helm)\n", helm.display());
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_daemonset_runs_a_real_node() {
    let Some(helm) = helm() else { return };
    let nats = NatsServer::start().unwrap();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/shoal");
    let url = format!("nats.url={}", nats.url());
    let out = Command::new(&helm)
        .args(["template", "shoal", &chart.to_string_lossy(), "--namespace", "shoal-system"])
        .args(["--show-only", "templates/gateway/daemonset.yaml"])
        .args(["--values", &chart.join("ci/custom-values.yaml").to_string_lossy()])
        .args(["--set", "nats.enabled=false", "--set", &url, "--set", "gateway.idleTimeoutMs=60000"])
        .args(["--set", "gateway.maxAckPending=5000", "--set", "gateway.collectTimeoutMs=5000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let daemonset: Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["shoal"]));
    let shm = tempfile::Builder::new().prefix("shoal-chart-").tempdir_in("/dev/shm").unwrap();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(NODE_NAME)", "chart-node")
                .replace("/dev/shm/shoal", &shm.path().to_string_lossy())
        })
        .collect();
    for flag in ["--max-jobs=4", "--ack-wait-ms=60000", "--pull-batch=16", "--idle-timeout-ms=60000"] {
        assert!(args.iter().any(|a| a == flag), "{flag} not rendered: {args:?}");
    }
    let mut command = Command::new(shoal_bin());
    command.args(&args).env_clear();
    for e in container["env"].as_array().unwrap() {
        if let Some(value) = e["value"].as_str() {
            command.env(e["name"].as_str().unwrap(), value);
        }
    }
    let log = shm.path().join("gateway.log");
    let file = std::fs::File::create(&log).unwrap();
    command.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
    let mut child = shoal_natsd::spawn_tied_to_process(command).unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the gateway exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        let request = client.request("shoal.node.chart-node.metrics", Bytes::new());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_millis(500), request).await {
            break String::from_utf8_lossy(&reply.payload).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics after 20 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(metrics.contains("shoal_updates_staged_total"), "{metrics}");
    let text = std::fs::read_to_string(&log).unwrap();
    let first = text.lines().next().unwrap_or_default();
    assert!(serde_json::from_str::<Value>(first).is_ok(), "gateway.logFormat json: {first}");
    eprintln!("the chart's gateway command ran a node: shoal {}", args.join(" "));
}
