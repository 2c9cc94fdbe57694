//! The process half of `shoal bench dataplane`: the same rounds run by the all-in-one node
//! (`shoal node`: aggregators in process) and by a gateway whose aggregators run in
//! `shoal function-host` processes it spawns (`shoal gateway`), each against its own private
//! nats-server; and a function-host process's cold start, spawn to first fold.
//!
//! Both nodes are started through the library (`shoal_runtime::node`), the gateway with the
//! split channel ([`node::DescriptorChannel::Split`]) spawning this very executable as
//! `shoal function-host`, exactly as `shoal gateway` does. The workload is the hierarchy
//! bench's: FedAvg over `--round-updates` updates of `--round-params` f32 parameters each,
//! published on the upload path, for `--rounds` rounds. Figures are means over the rounds and
//! the ratio gateway / all-in-one measured in the same run.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use shoal_client::{ConnectOptions, ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, NodeId, RoundId, TensorSpec, UpdateKind};
use shoal_natsd::NatsServer;
use shoal_proto::config::NodeConfig;
use shoal_runtime::host::pool::{Hosts, SpawnConfig};
use shoal_runtime::metrics::scrape;
use shoal_runtime::node::{self, DescriptorChannel, NodeOptions, SplitOptions};

/// The sizes of the process comparison.
#[derive(Debug, Clone)]
pub struct SplitBench {
    /// Updates per round.
    pub updates: u32,
    /// f32 parameters per update.
    pub params: usize,
    /// Rounds per node.
    pub rounds: u64,
    /// Function-host cold starts to time.
    pub cold_starts: u64,
    /// Root of the shared-memory directories.
    pub shm_dir: PathBuf,
}

/// What one node measured over its rounds (means).
#[derive(Debug, Clone, Copy)]
pub struct RoundsReport {
    /// The node's `shoal_round_latency_seconds` (last update's fold to commit), mean.
    pub latency_s: f64,
    /// Seen by the client: the last update's publish acknowledged to the round closed, mean.
    pub client_s: f64,
    /// First publish to the round closed, mean.
    pub round_s: f64,
}

/// Runs both nodes and the cold starts; prints the report.
///
/// # Errors
/// nats-server missing, NATS or shared-memory errors, this executable not found.
pub async fn run(b: &SplitBench) -> Result<()> {
    anyhow::ensure!(b.updates >= 1 && b.params >= 1, "--round-updates and --round-params must be at least 1");
    if b.rounds > 0 {
        compare(b).await?;
    }
    if b.cold_starts > 0 {
        let (handshake, first_fold, n) = cold_starts(b).await?;
        println!(
            "function-host process cold start (mean of {n}): spawn -> handshake {:.1} ms, spawn -> first fold {:.1} ms",
            handshake * 1e3,
            first_fold * 1e3
        );
    }
    for id in ["bench-dp-node", "bench-dp-gateway", "bench-dp-cold"] {
        let _ = std::fs::remove_dir(b.shm_dir.join(id));
    }
    let _ = std::fs::remove_dir(&b.shm_dir);
    Ok(())
}

/// The same rounds on both nodes; prints their means and ratios.
async fn compare(b: &SplitBench) -> Result<()> {
    println!(
        "rounds: {} rounds of {} updates x {} f32 ({:.1} MB each), FedAvg, upload path",
        b.rounds,
        b.updates,
        b.params,
        b.params as f64 * 4.0 / 1e6
    );
    let all_in_one = rounds(b, false).await?;
    print_rounds("all-in-one node (in process)", &all_in_one);
    let split = rounds(b, true).await?;
    print_rounds("gateway + spawned hosts", &split);
    println!(
        "ratio gateway + hosts / all-in-one: round latency {:.2}x, client-seen {:.2}x, whole round {:.2}x (target <= 1.1x)",
        split.latency_s / all_in_one.latency_s.max(1e-9),
        split.client_s / all_in_one.client_s.max(1e-9),
        split.round_s / all_in_one.round_s.max(1e-9)
    );
    Ok(())
}

fn print_rounds(name: &str, r: &RoundsReport) {
    println!(
        "  {name:<30} round latency {:8.1} ms   last publish -> closed {:8.1} ms   round {:8.1} ms",
        r.latency_s * 1e3,
        r.client_s * 1e3,
        r.round_s * 1e3
    );
}

/// Starts the all-in-one node, or a gateway spawning this executable as its function hosts
/// (stopped after `idle`).
async fn start(b: &SplitBench, url: &str, id: &str, split: bool, idle: Duration) -> Result<node::NodeHandle> {
    let budget = (b.params * 4 + (1 << 20)) * (b.updates as usize + 2);
    let config = NodeConfig {
        node_id: NodeId::new(id)?,
        nats_url: url.into(),
        shm_dir: b.shm_dir.clone(),
        shm_budget_mib: budget.div_ceil(1 << 20).max(64) as u64,
        ack_wait_ms: 120_000,
        ..NodeConfig::default()
    };
    let mut options = NodeOptions::new(config.clone());
    if split {
        let program = std::env::current_exe().context("finding this executable to spawn function hosts")?;
        let args: Vec<OsString> = vec![
            "function-host".into(),
            "--nats-url".into(),
            url.into(),
            "--prefix".into(),
            config.prefix.clone().into(),
            "--node-id".into(),
            id.into(),
            "--shm-dir".into(),
            b.shm_dir.clone().into(),
            "--idle-timeout-ms".into(),
            config.idle_timeout_ms.to_string().into(),
            "--http".into(),
            "off".into(),
            "--exit-on-disconnect".into(),
        ];
        options.channel = DescriptorChannel::Split(SplitOptions {
            listen: "127.0.0.1:0".parse()?,
            hosts: Hosts::Spawn(SpawnConfig { program, args, envs: Vec::new(), idle_timeout: idle }),
            wait_for_host: Duration::from_secs(30),
            harvest_timeout: None,
        });
    }
    Ok(node::start(options).await?)
}

fn spec(
    job: &str,
    params: usize,
    cohort: u32,
    rounds: u64,
) -> Result<(shoal_functions::JobSpec, Arc<ModelManifest>)> {
    let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![params])])?;
    let m = Arc::new(manifest.clone());
    Ok((crate::bench::spec(job, manifest, cohort, rounds), m))
}

/// `b.rounds` rounds on one node; means over them.
async fn rounds(b: &SplitBench, split: bool) -> Result<RoundsReport> {
    let nats = NatsServer::start().context("cannot start nats-server")?;
    let url = nats.url();
    let id = if split { "bench-dp-gateway" } else { "bench-dp-node" };
    let node = start(b, &url, id, split, Duration::from_secs(600)).await?;
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let job = JobId::new("bench")?;
    let (spec, m) = spec("bench", b.params, b.updates, b.rounds)?;
    shoal_client::jobs::create_job(&admin, &spec, None).await?;
    let values: Vec<f64> = (0..b.params).map(|i| ((i % 1000) as f64) * 1e-3).collect();
    let payload = Bytes::from(shoal_functions::tensor::encode_safetensors(&m, &[values])?);
    let (mut client_s, mut round_s) = (0.0, 0.0);
    for r in 1..=b.rounds {
        let state = client.wait_for_open_round(&job, RoundId(r), Duration::from_secs(120)).await?;
        let started = Instant::now();
        for c in 0..b.updates {
            client
                .publish_update(UpdateRequest {
                    job: job.clone(),
                    client: ClientId::new(format!("c{c}"))?,
                    round: state.round,
                    base_version: state.model_version,
                    num_examples: 1 + u64::from(c % 7),
                    kind: UpdateKind::Parameters,
                    payload: payload.clone(),
                    force_upload: true,
                })
                .await?;
        }
        let last = Instant::now();
        client.wait_for_round_closed(&job, RoundId(r), Duration::from_secs(600)).await?;
        client_s += last.elapsed().as_secs_f64();
        round_s += started.elapsed().as_secs_f64();
    }
    let text = node.metrics.encode();
    let get = |name: &str| scrape(&text, name).unwrap_or(0.0);
    let count = get("shoal_round_latency_seconds_count{job=\"bench\"}");
    anyhow::ensure!(
        count >= b.rounds as f64,
        "{id}: {count} round latencies recorded, {} rounds run",
        b.rounds
    );
    if split {
        anyhow::ensure!(
            get("shoal_function_host_spawns_total") >= 1.0,
            "the gateway spawned no function host"
        );
    }
    let latency_s = get("shoal_round_latency_seconds_sum{job=\"bench\"}") / count;
    node.shutdown().await;
    drop(nats);
    let n = b.rounds as f64;
    Ok(RoundsReport { latency_s, client_s: client_s / n, round_s: round_s / n })
}

/// `b.cold_starts` rounds of a one-update job on a gateway whose hosts stop after 200 ms idle:
/// each round cold-starts a function-host process. Means of spawn → handshake and spawn →
/// first fold (the gateway's histograms), and how many spawns they cover.
async fn cold_starts(b: &SplitBench) -> Result<(f64, f64, u64)> {
    let nats = NatsServer::start().context("cannot start nats-server")?;
    let url = nats.url();
    let idle = Duration::from_millis(200);
    let node = start(b, &url, "bench-dp-cold", true, idle).await?;
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let job = JobId::new("cold")?;
    let (spec, m) = spec("cold", 1024, 1, b.cold_starts)?;
    shoal_client::jobs::create_job(&admin, &spec, None).await?;
    let payload = Bytes::from(shoal_functions::tensor::encode_safetensors(&m, &[vec![0.5; 1024]])?);
    for r in 1..=b.cold_starts {
        let state = client.wait_for_open_round(&job, RoundId(r), Duration::from_secs(60)).await?;
        // Scale to zero first: the update below finds no host and starts one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while scrape(&node.metrics.encode(), "shoal_function_hosts").unwrap_or(0.0) > 0.0 {
            anyhow::ensure!(Instant::now() < deadline, "the function host never stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new("c")?,
                round: state.round,
                base_version: state.model_version,
                num_examples: 1,
                kind: UpdateKind::Parameters,
                payload: payload.clone(),
                force_upload: false,
            })
            .await?;
        client.wait_for_round_closed(&job, RoundId(r), Duration::from_secs(60)).await?;
    }
    let text = node.metrics.encode();
    let get = |name: &str| scrape(&text, name).unwrap_or(0.0);
    let spawns = get("shoal_function_host_spawns_total");
    let handshakes = get("shoal_function_host_cold_start_seconds_count");
    let folds = get("shoal_function_host_first_fold_seconds_count");
    anyhow::ensure!(
        spawns == b.cold_starts as f64 && handshakes == spawns && folds == spawns,
        "{spawns} spawns, {handshakes} handshakes and {folds} first folds for {} rounds",
        b.cold_starts
    );
    let handshake = get("shoal_function_host_cold_start_seconds_sum") / handshakes;
    let first_fold = get("shoal_function_host_first_fold_seconds_sum") / folds;
    node.shutdown().await;
    drop(nats);
    Ok((handshake, first_fold, b.cold_starts))
}
