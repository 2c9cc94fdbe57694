//! `shoal gateway` with function hosts in processes of their own (issue 10): the gateway spawns
//! `shoal function-host` on a job's first update, the round's partial crosses the descriptor
//! channel back to the gateway's leaf, a SIGKILLed host loses nothing, and an idle host is
//! stopped (scale to zero) and cold-started again by the next update.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_client::UpdateRequest;
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, RoundId, UpdateKind};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[64, 40]), ("fc.bias", DType::F32, &[40])])
}

/// How the node runs. An eBPF-redirect mode is meant to join as a third case.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// `shoal node`: gateway and aggregators in one process.
    AllInOne,
    /// `shoal gateway` spawning `shoal function-host` processes.
    GatewaySpawn,
}

async fn start(mode: Mode, nats: &str, node: &str, extra: &[&str]) -> NodeProcess {
    match mode {
        Mode::AllInOne => NodeProcess::start(nats, node, extra).await,
        Mode::GatewaySpawn => NodeProcess::start_gateway(nats, node, extra).await,
    }
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

/// Publishes client `c`'s update for `round` (weight `n`); returns what the oracle needs.
async fn send(
    client: &shoal_client::ShoalClient,
    m: &Arc<ModelManifest>,
    job: &JobId,
    state: &shoal_proto::JobState,
    c: u64,
    n: u64,
) -> (Vec<Vec<f64>>, f64) {
    let values = as_sent(m, &random_values(m, state.round.0 * 1000 + c));
    client
        .publish_update(UpdateRequest {
            job: job.clone(),
            client: ClientId::new(format!("client-{c}")).unwrap(),
            round: state.round,
            base_version: state.model_version,
            num_examples: n,
            kind: UpdateKind::Parameters,
            payload: payload(m, &values),
            force_upload: false,
        })
        .await
        .unwrap();
    (values, n as f64)
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
    let metrics = node.metrics(&client.connection().client).await;
    (models, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_with_spawned_function_hosts_commits_the_all_in_one_nodes_models_bit_for_bit() {
    init_logging();
    let (all_in_one, _) = two_rounds(Mode::AllInOne).await;
    let (split, metrics) = two_rounds(Mode::GatewaySpawn).await;
    for (v, (a, b)) in all_in_one.iter().zip(&split).enumerate() {
        assert!(a == b, "model version {} differs between shoal node and gateway + function hosts", v + 1);
    }
    // The updates crossed the channel (12 descriptors, every slot released) to one spawned host.
    assert_eq!(scrape(&metrics, "shoal_descriptor_channel_descriptors_sent_total"), Some(12.0));
    assert_eq!(scrape(&metrics, "shoal_descriptor_channel_releases_received_total"), Some(12.0));
    assert_eq!(scrape(&metrics, "shoal_function_host_spawns_total"), Some(1.0));
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = node.metrics(&nc).await;
        if scrape(&text, "shoal_descriptor_channel_releases_received_total") == Some(3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "three releases never came:\n{text}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
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
