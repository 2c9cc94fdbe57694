//! `shoal gateway` with function hosts in processes of their own (issue 10): the gateway spawns
//! `shoal function-host` on a job's first update, the round's partial crosses the descriptor
//! channel back to the gateway's leaf, a SIGKILLed host loses nothing, and an idle host is
//! stopped (scale to zero) and cold-started again by the next update.
//!
//! The same job commits bit-identical models in three modes: the all-in-one node, the gateway
//! with spawned hosts on plain TCP, and the same with the eBPF sidecar redirecting the host
//! channels (`--ebpf required`, where the machine allows loading programs; elsewhere that mode
//! is skipped with the reason printed). There the sidecar's per-function counters equal the
//! frames the gateway wrote and read, and the descriptors and releases among them equal the
//! updates the test sent, sized by hand from the frame layout (runtime/src/host/channel.rs):
//! `u32 length ‖ u8 type ‖ body`, a descriptor or release body being the 208-byte record.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_functions::{DType, JobId, ModelManifest, ModelVersion, RoundId};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[64, 40]), ("fc.bias", DType::F32, &[40])])
}

/// How the node runs.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// `shoal node`: gateway and aggregators in one process.
    AllInOne,
    /// `shoal gateway` spawning `shoal function-host` processes, `--ebpf <mode>`.
    GatewaySpawn { ebpf: &'static str },
}

async fn start(mode: Mode, nats: &str, node: &str, extra: &[&str]) -> NodeProcess {
    match mode {
        Mode::AllInOne => NodeProcess::start(nats, node, extra).await,
        Mode::GatewaySpawn { ebpf } => {
            let mut args = vec!["--ebpf", ebpf];
            args.extend_from_slice(extra);
            NodeProcess::start_gateway(nats, node, &args).await
        }
    }
}

/// `u32` length + type byte + the 208-byte descriptor (or release) record.
const DESCRIPTOR_FRAME: f64 = (4 + 1 + 208) as f64;
/// The gateway's welcome: length, type, version `u16`.
const WELCOME_FRAME: f64 = (4 + 1 + 2) as f64;
/// A spawned host's hello for job `sp`: length, type, magic, version `u16`, function id `u32`,
/// job length byte, the job id.
const HELLO_SP_FRAME: f64 = (4 + 1 + 4 + 2 + 4 + 1 + 2) as f64;

/// The sum of family `name`'s samples whose labels include every `labels` pair.
fn sum_of(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.split_once("} "))
        .filter(|(set, _)| labels.iter().all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\""))))
        .map(|(_, v)| v.trim().parse::<f64>().unwrap())
        .sum()
}

/// Process ids of the function hosts `parent` spawned (from /proc).
fn function_hosts_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid != Some(parent) || state == Some("Z") {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("function-host") {
            out.push(pid);
        }
    }
    out
}

async fn wait_for(what: &str, within: Duration, node: &NodeProcess, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not in {within:?}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (20 s at most) until the gateway has received `n` slot releases: the host folded those
/// updates, so they are only in its partial now.
async fn wait_for_releases(
    node: &NodeProcess,
    nc: &async_nats::Client,
    n: u64,
    extra_log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = node.metrics(nc).await;
        if scrape(&text, "shoal_descriptor_channel_releases_received_total") == Some(n as f64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} releases never came:\n{text}\n{}\n{}",
            node.log(),
            extra_log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publishes client `c`'s update for `round` (weight `n`); returns what the oracle needs.
async fn send(
    client: &shoal_client::ShoalClient,
    m: &Arc<ModelManifest>,
    job: &JobId,
    state: &shoal_proto::JobState,
    c: u64,
    n: u64,
) -> (Vec<Vec<f64>>, f64) {
    send_update(client, m, job, state, (c, state.round.0 * 1000 + c, n), false).await
}

/// Two rounds of six clients in `mode`: the committed models (each checked against the f64
/// oracle) and the node's metrics.
async fn two_rounds(mode: Mode) -> (Vec<Vec<u8>>, String) {
    let nats = NatsServer::start().unwrap();
    let node = start(mode, &nats.url(), "sp", &[]).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("sp").unwrap();
    let spec = job_spec("sp", (*m).clone(), 6, 6, 60_000, 2);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let mut models = Vec::new();
    for round in 1..=2u64 {
        let state = client.wait_for_open_round(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
        let mut sent = Vec::new();
        for c in 0..6u64 {
            sent.push(send(&client, &m, &job, &state, c, 1 + (round * 37 + c * 101) % 900).await);
        }
        let after = client
            .wait_for_round_closed(&job, RoundId(round), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{mode:?} round {round}: {e}\n{}", node.log()));
        let want: f64 = sent.iter().map(|(_, w)| w).sum();
        match after.last_outcome {
            Some(RoundOutcome::Committed { clients: 6, total_weight, .. }) => assert_eq!(total_weight, want),
            other => panic!("{mode:?} round {round}: {other:?}\n{}", node.log()),
        }
        let bytes = client.fetch_model(&job, ModelVersion(round)).await.unwrap();
        let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_model_near(&model, &weighted_mean_oracle(&sent), &format!("{mode:?} round {round}"));
        models.push(bytes);
    }
    let nc = client.connection().client.clone();
    let metrics = match mode {
        Mode::GatewaySpawn { ebpf: "required" } => counters_settled(&node, &nc).await,
        _ => node.metrics(&nc).await,
    };
    (models, metrics)
}

/// The gateway's metrics once the sidecar's counters (summed every second) caught up with the
/// gateway's own frame tally, and one more tick later.
async fn counters_settled(node: &NodeProcess, nc: &async_nats::Client) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = node.metrics(nc).await;
        let caught_up = ["to_host", "to_gateway"].iter().all(|d| {
            let f = [("function", "1"), ("direction", *d)];
            let kernel = sum_of(&text, "shoal_descriptor_bytes_total", &f);
            kernel > 0.0 && kernel == sum_of(&text, "shoal_descriptor_channel_frame_bytes_total", &f)
        });
        if caught_up && scrape(&text, "shoal_descriptor_channel_releases_received_total") == Some(12.0) {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            return node.metrics(nc).await;
        }
        assert!(
            Instant::now() < deadline,
            "the eBPF counters never matched the frames:\n{text}\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sidecar counted, for the one spawned host (function 1), exactly the frames the gateway
/// wrote to it and read from it, every one after the hello redirected; among them the 12
/// descriptors and 12 releases of the test's updates, and the welcome, sized by hand.
fn assert_counted_exactly(text: &str) {
    assert_eq!(scrape(text, "shoal_ebpf_sidecar_attached"), Some(1.0), "{text}");
    assert_eq!(scrape(text, "shoal_ebpf_redirect_enabled"), Some(1.0), "{text}");
    let frames = |direction: &str, frame: &str| {
        let l = [("function", "1"), ("direction", direction), ("frame", frame)];
        (
            sum_of(text, "shoal_descriptor_channel_frames_total", &l),
            sum_of(text, "shoal_descriptor_channel_frame_bytes_total", &l),
        )
    };
    assert_eq!(frames("to_host", "descriptor"), (12.0, 12.0 * DESCRIPTOR_FRAME), "{text}");
    assert_eq!(frames("to_gateway", "release"), (12.0, 12.0 * DESCRIPTOR_FRAME), "{text}");
    assert_eq!(frames("to_host", "welcome"), (1.0, WELCOME_FRAME), "{text}");
    for direction in ["to_host", "to_gateway"] {
        let f = [("function", "1"), ("direction", direction)];
        let (msgs, bytes) = (
            sum_of(text, "shoal_descriptor_messages_total", &f),
            sum_of(text, "shoal_descriptor_bytes_total", &f),
        );
        assert_eq!(msgs, sum_of(text, "shoal_descriptor_channel_frames_total", &f), "{direction}:\n{text}");
        assert_eq!(
            bytes,
            sum_of(text, "shoal_descriptor_channel_frame_bytes_total", &f),
            "{direction}:\n{text}"
        );
        assert_eq!(
            sum_of(text, "shoal_descriptor_messages_redirected_total", &f),
            msgs,
            "every frame of a registered channel is redirected ({direction}):\n{text}"
        );
    }
    // Only the hello came before registration.
    let u = |direction: &str, family: &str| {
        sum_of(text, family, &[("function", "unregistered"), ("direction", direction)])
    };
    assert_eq!(u("to_gateway", "shoal_descriptor_messages_total"), 1.0, "{text}");
    assert_eq!(u("to_gateway", "shoal_descriptor_bytes_total"), HELLO_SP_FRAME, "{text}");
    assert_eq!(u("to_host", "shoal_descriptor_messages_total"), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_with_spawned_function_hosts_commits_the_all_in_one_nodes_models_bit_for_bit() {
    init_logging();
    let (all_in_one, _) = two_rounds(Mode::AllInOne).await;
    let mut modes = vec![Mode::GatewaySpawn { ebpf: "off" }];
    if ebpf_allowed("split::gateway_with_spawned_function_hosts (--ebpf required)") {
        modes.push(Mode::GatewaySpawn { ebpf: "required" });
    }
    for mode in modes {
        let (split, metrics) = two_rounds(mode).await;
        for (v, (a, b)) in all_in_one.iter().zip(&split).enumerate() {
            assert!(a == b, "model version {} differs between shoal node and {mode:?}", v + 1);
        }
        // The updates crossed the channel (12 descriptors, every slot released) to one spawned host.
        assert_eq!(scrape(&metrics, "shoal_descriptor_channel_descriptors_sent_total"), Some(12.0));
        assert_eq!(scrape(&metrics, "shoal_descriptor_channel_releases_received_total"), Some(12.0));
        assert_eq!(scrape(&metrics, "shoal_function_host_spawns_total"), Some(1.0));
        match mode {
            Mode::GatewaySpawn { ebpf: "required" } => assert_counted_exactly(&metrics),
            _ => assert_eq!(scrape(&metrics, "shoal_ebpf_sidecar_attached"), Some(0.0), "{mode:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_function_host_loses_nothing_and_folds_nothing_twice() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start_gateway(&nats.url(), "kill", &[]).await;
    let gateway = node.pid().unwrap();
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("kill").unwrap();
    let spec = job_spec("kill", (*m).clone(), 6, 6, 60_000, 1);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    // Client c weighs 2^c: the commit's total weight names the updates it folded.
    let mut sent = Vec::new();
    for c in 0..3u64 {
        sent.push(send(&client, &m, &job, &state, c, 1 << c).await);
    }
    let nc = client.connection().client.clone();
    // The host folded (and released) the first three: they are only in its partial now.
    wait_for_releases(&node, &nc, 3, String::new).await;
    let hosts = function_hosts_of(gateway);
    assert_eq!(hosts.len(), 1, "one function host for the job: {hosts:?}");
    // SIGKILL mid-round.
    let pid = nix_kill(hosts[0]);
    wait_for("the killed host is gone", Duration::from_secs(10), &node, || {
        !function_hosts_of(gateway).contains(&pid)
    })
    .await;
    for c in 3..6u64 {
        sent.push(send(&client, &m, &job, &state, c, 1 << c).await);
    }
    let after = client
        .wait_for_round_closed(&job, RoundId(1), Duration::from_secs(60))
        .unwrap_or_else_async(&node)
        .await;
    let Some(RoundOutcome::Committed { clients, total_weight, .. }) = after.last_outcome else {
        panic!("{:?}\n{}", after.last_outcome, node.log());
    };
    let folded = folded_by_weight(total_weight, clients, 6, "after a SIGKILL");
    assert_eq!(folded.len(), 6, "every update folded once: {folded:?}");
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(&sent), "after a SIGKILL");
    let text = node.metrics(&nc).await;
    assert_eq!(scrape(&text, "shoal_function_host_spawns_total"), Some(2.0), "a new host was cold-started");
    assert_stream_drains(&client, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_host_that_hangs_is_abandoned_killed_and_loses_nothing() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let bound_ms = 1500;
    let node = NodeProcess::start_gateway(
        &nats.url(),
        "hang",
        &["--host-harvest-timeout-ms", &bound_ms.to_string()],
    )
    .await;
    let gateway = node.pid().unwrap();
    let client = connect(&nats.url()).await;
    let nc = client.connection().client.clone();
    let m = manifest();
    let job = JobId::new("hang").unwrap();
    // The cohort waits for a fourth update, published once the host is stopped.
    let spec = job_spec("hang", (*m).clone(), 4, 4, 60_000, 1);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..3u64 {
        sent.push(send(&client, &m, &job, &state, c, 1 << c).await);
    }
    // Folded and released: the three are only in the host's partial now.
    wait_for_releases(&node, &nc, 3, String::new).await;
    let hosts = function_hosts_of(gateway);
    assert_eq!(hosts.len(), 1, "one function host for the job: {hosts:?}");
    // The host hangs (SIGSTOP): alive, connected, silent.
    let stopped = hosts[0];
    let status = std::process::Command::new("kill").args(["-STOP", &stopped.to_string()]).status().unwrap();
    assert!(status.success(), "kill -STOP {stopped}");
    let t0 = Instant::now();
    sent.push(send(&client, &m, &job, &state, 3, 1 << 3).await);
    let after = client
        .wait_for_round_closed(&job, RoundId(1), Duration::from_secs(60))
        .unwrap_or_else_async(&node)
        .await;
    let Some(RoundOutcome::Committed { clients, total_weight, .. }) = after.last_outcome else {
        panic!("{:?}\n{}", after.last_outcome, node.log());
    };
    assert!(
        t0.elapsed() >= Duration::from_millis(bound_ms),
        "the round closed before the bound: the stopped host was not what it waited for"
    );
    let folded = folded_by_weight(total_weight, clients, 4, "after a SIGSTOP");
    assert_eq!(folded.len(), 4, "every update folded once: {folded:?}");
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(&sent), "after a SIGSTOP");
    let text = node.metrics(&nc).await;
    assert_eq!(scrape(&text, "shoal_function_host_hangs_total"), Some(1.0), "one host abandoned as hung");
    assert_eq!(scrape(&text, "shoal_function_host_spawns_total"), Some(2.0), "a new host was cold-started");
    // The stopped process was killed (SIGKILL reaches a stopped process), not left behind.
    wait_for("the stopped host is killed", Duration::from_secs(10), &node, || {
        !function_hosts_of(gateway).contains(&stopped)
    })
    .await;
    assert_stream_drains(&client, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_function_host_is_stopped_and_the_next_update_cold_starts_one() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start_gateway(&nats.url(), "idle", &["--host-idle-timeout-ms", "1000"]).await;
    let gateway = node.pid().unwrap();
    let client = connect(&nats.url()).await;
    let nc = client.connection().client.clone();
    let m = manifest();
    let job = JobId::new("idle").unwrap();
    let spec = job_spec("idle", (*m).clone(), 2, 2, 60_000, 2);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    assert!(function_hosts_of(gateway).is_empty(), "no host before the first update");
    for round in 1..=2u64 {
        let state = client.wait_for_open_round(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
        let sent =
            vec![send(&client, &m, &job, &state, 0, 3).await, send(&client, &m, &job, &state, 1, 5).await];
        let after = client
            .wait_for_round_closed(&job, RoundId(round), Duration::from_secs(30))
            .unwrap_or_else_async(&node)
            .await;
        assert!(
            matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 2, total_weight, .. }) if total_weight == 8.0),
            "{:?}",
            after.last_outcome
        );
        let bytes = client.fetch_model(&job, ModelVersion(round)).await.unwrap();
        let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_model_near(&model, &weighted_mean_oracle(&sent), &format!("round {round}"));
        // Scale to zero: after the idle timeout no function-host process runs.
        wait_for("scale to zero", Duration::from_secs(15), &node, || function_hosts_of(gateway).is_empty())
            .await;
        let text = node.metrics(&nc).await;
        assert_eq!(scrape(&text, "shoal_function_host_stops_total"), Some(round as f64));
        assert_eq!(scrape(&text, "shoal_function_hosts"), Some(0.0));
    }
    let text = node.metrics(&nc).await;
    assert_eq!(scrape(&text, "shoal_function_host_spawns_total"), Some(2.0), "one cold start per round");
    // Each stopped host exited by itself when its connection ended: none had to be killed.
    let log = node.log();
    assert!(!log.contains("did not exit; killed"), "a stopped host lingered until killed:\n{log}");
}

/// A gateway SIGKILLed and started again while an external function host runs: the host (no
/// `--gateway`: it asks the node's gateway for the channel's address over NATS, so a new port
/// is found) reconnects with a fresh aggregator, the updates the dead gateway never acked come
/// back from JetStream after their ack wait, and the round commits once with the oracle's
/// model. The host process is the same one throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_gets_its_external_host_back_and_loses_nothing() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let mut node = NodeProcess::start_gateway(
        &url,
        "rs",
        &["--function-hosts", "external", "--ebpf", "off", "--ack-wait-ms", "3000"],
    )
    .await;
    let host = FunctionHostProcess::start(&url, &node, 7, "off");
    let client = connect(&url).await;
    let nc = client.connection().client.clone();
    let m = manifest();
    let job = JobId::new("rs").unwrap();
    let spec = job_spec("rs", (*m).clone(), 4, 4, 120_000, 1);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..2u64 {
        sent.push(send(&client, &m, &job, &state, c, 1 << c).await);
    }
    // Folded on the host, held (un-acked) by the gateway.
    wait_for_releases(&node, &nc, 2, || host.log()).await;
    let host_pid = host.pid();
    node.kill();
    node.restart(&url).await;
    for c in 2..4u64 {
        sent.push(send(&client, &m, &job, &state, c, 1 << c).await);
    }
    let after = client
        .wait_for_round_closed(&job, RoundId(1), Duration::from_secs(60))
        .unwrap_or_else_async(&node)
        .await;
    let Some(RoundOutcome::Committed { clients, total_weight, .. }) = after.last_outcome else {
        panic!("{:?}\n{}\n{}", after.last_outcome, node.log(), host.log());
    };
    let folded = folded_by_weight(total_weight, clients, 4, "after a gateway restart");
    assert_eq!(folded.len(), 4, "every update folded once: {folded:?}");
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(&sent), "after a gateway restart");
    // The same host process served both gateways.
    assert_eq!(host.pid(), host_pid);
    let log = host.log();
    assert_eq!(log.matches("connected to the gateway").count(), 2, "one reconnect:\n{log}");
    assert!(log.contains("reconnecting"), "{log}");
    assert_stream_drains(&client, Duration::from_secs(20)).await;
}

/// SIGKILLs `pid`; returns it.
fn nix_kill(pid: u32) -> u32 {
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -KILL {pid}");
    pid
}

/// Waiting for a round with the node's log in the failure.
trait OrLog<T> {
    async fn unwrap_or_else_async(self, node: &NodeProcess) -> T;
}

impl<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>> OrLog<T> for F {
    async fn unwrap_or_else_async(self, node: &NodeProcess) -> T {
        match self.await {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", node.log()),
        }
    }
}
