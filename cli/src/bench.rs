//! `shoal bench hierarchy`: round completion latency (the last update's arrival at the function
//! host to the commit) with eager aggregation (each update folded as it arrives) against waiting
//! for the whole cohort (every update folded at the close), on one machine, each against its own
//! private nats-server; plus the aggregator's cold-start and warm-reuse times.
//!
//! Both modes run the same job: FedAvg over `--updates` updates of `--params` f32 parameters
//! (defaults: 100 × 11.2M, ResNet-18's size), published on the upload path. The figure of
//! merit is the ratio of the two latencies, measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use shoal_functions::{
    ClientId, DType, JobId, ModelManifest, ModelVersion, NodeId, RoundId, TensorSpec, UpdateKind,
};

use shoal_client::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_natsd::NatsServer;
use shoal_proto::config::NodeConfig;
use shoal_runtime::metrics::{scrape, scrape_sum};
use shoal_runtime::node::{self, NodeOptions};

/// `shoal bench hierarchy` flags.
#[derive(Debug, Args)]
pub struct HierarchyArgs {
    /// Updates per round.
    #[arg(long, default_value_t = 100)]
    pub updates: u32,
    /// f32 parameters per update (11.2M ≈ ResNet-18).
    #[arg(long, default_value_t = 11_200_000)]
    pub params: usize,
    /// Root of the benchmark's shared-memory directories.
    #[arg(long, default_value = "/dev/shm/shoal-bench")]
    pub shm_dir: std::path::PathBuf,
    /// Warm reuses to time (rounds of a one-update job after its cold start).
    #[arg(long, default_value_t = 20)]
    pub reuse_rounds: u64,
}

/// What one mode measured.
#[derive(Debug, Clone, Copy)]
pub struct ModeResult {
    /// Last update's arrival to commit, seconds.
    pub latency_s: f64,
    /// First publish to commit, seconds.
    pub round_s: f64,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// nats-server missing, NATS or shared-memory errors (with context).
pub async fn hierarchy(a: HierarchyArgs) -> Result<()> {
    anyhow::ensure!(a.updates >= 1, "--updates must be at least 1");
    anyhow::ensure!(a.params >= 1, "--params must be at least 1");
    let bytes = a.params * 4;
    println!(
        "shoal bench hierarchy: {} updates x {} f32 ({:.1} MB each, {:.2} GB per round)",
        a.updates,
        a.params,
        bytes as f64 / 1e6,
        bytes as f64 * f64::from(a.updates) / 1e9
    );
    let eager = run_mode(&a, true).await?;
    println!(
        "eager aggregation:     last update -> commit {:8.1} ms   (round {:.2} s)",
        eager.latency_s * 1e3,
        eager.round_s
    );
    let lazy = run_mode(&a, false).await?;
    println!(
        "wait for whole cohort: last update -> commit {:8.1} ms   (round {:.2} s)",
        lazy.latency_s * 1e3,
        lazy.round_s
    );
    println!("ratio (whole cohort / eager): {:.2}", lazy.latency_s / eager.latency_s.max(1e-6));
    let (cold, warm) = start_times(&a).await?;
    println!("aggregator cold start: {cold:.0} us (first descriptor to a new actor handling it)");
    println!("aggregator warm reuse: {warm:.0} us (mean over {} rounds)", a.reuse_rounds);
    // Leave no empty directories behind (the nodes removed their segments).
    for id in ["bench-eager", "bench-lazy", "bench-start"] {
        let _ = std::fs::remove_dir(a.shm_dir.join(id));
    }
    let _ = std::fs::remove_dir(&a.shm_dir);
    Ok(())
}

async fn start_node(
    a: &HierarchyArgs,
    url: &str,
    id: &str,
    eager: bool,
    budget: usize,
) -> Result<node::NodeHandle> {
    let config = NodeConfig {
        node_id: NodeId::new(id)?,
        nats_url: url.into(),
        shm_dir: a.shm_dir.clone(),
        shm_budget_mib: budget.div_ceil(1 << 20).max(1) as u64,
        lazy_aggregation: !eager,
        ack_wait_ms: 120_000,
        ..NodeConfig::default()
    };
    Ok(node::start(NodeOptions::new(config)).await?)
}

pub(crate) fn spec(job: &str, manifest: ModelManifest, cohort: u32, rounds: u64) -> shoal_functions::JobSpec {
    shoal_functions::JobSpec {
        job: JobId::new(job).unwrap_or_else(|_| unreachable!("constant job id")),
        manifest,
        strategy: shoal_functions::StrategySpec::Fedavg { server_learning_rate: 1.0 },
        round_policy: shoal_functions::RoundPolicy::Sync {
            cohort_size: cohort,
            min_clients: cohort,
            deadline_ms: 3_600_000,
        },
        update_kind: UpdateKind::Parameters,
        rounds,
        max_num_examples: 1_000_000,
        max_failed_rounds: 1,
        fan_in: 0,
        server_optimizer: None,
        max_update_bytes: None,
        max_clients_per_round: None,
        inline_limit_bytes: None,
        chunk_bytes: None,
        upload_quota_bytes: None,
    }
}

async fn run_mode(a: &HierarchyArgs, eager: bool) -> Result<ModeResult> {
    let nats = NatsServer::start().context("cannot start nats-server")?;
    let url = nats.url();
    let model_bytes = a.params * 4;
    let budget = (model_bytes + (1 << 20)) * (a.updates as usize + 2);
    let node = start_node(a, &url, if eager { "bench-eager" } else { "bench-lazy" }, eager, budget).await?;
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![a.params])])?;
    let m = Arc::new(manifest.clone());
    let job = JobId::new("bench")?;
    shoal_client::jobs::create_job(&admin, &spec("bench", manifest, a.updates, 1), None).await?;
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(60)).await?;
    let bar = ProgressBar::new(u64::from(a.updates)).with_style(
        ProgressStyle::with_template(&format!(
            "{} {{bar:40}} {{pos}}/{{len}} updates published",
            if eager { "eager" } else { "whole cohort" }
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    publish_round(&client, &job, &m, a.updates, true, &bar).await?;
    client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(3600)).await?;
    let round_s = started.elapsed().as_secs_f64();
    let text = node.metrics.encode();
    // Labelled by job since the metrics carry one.
    let latency_s =
        scrape_sum(&text, "shoal_round_latency_seconds_sum").context("no round latency recorded")?;
    node.shutdown().await;
    // The clients go before their server (else they log a lost connection).
    drop(client);
    drop(admin);
    drop(nats);
    Ok(ModeResult { latency_s, round_s })
}

/// Publishes round 1 of `job`: `updates` clients `c0, c1, ...` (`num_examples` 1 + c mod 7)
/// each sending the same model of one f32 tensor (values `(i mod 1000) · 1e-3`), on the upload
/// path when `force_upload` (else inline when it fits), ticking `bar` per update.
///
/// # Errors
/// Encoding or NATS errors.
pub(crate) async fn publish_round(
    client: &ShoalClient,
    job: &JobId,
    m: &Arc<ModelManifest>,
    updates: u32,
    force_upload: bool,
    bar: &ProgressBar,
) -> Result<()> {
    let params = m.slots().first().map_or(0, |s| s.numel);
    let values: Vec<f64> = (0..params).map(|i| ((i % 1000) as f64) * 1e-3).collect();
    let payload = Bytes::from(shoal_functions::tensor::encode_safetensors(m, &[values])?);
    for c in 0..updates {
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new(format!("c{c}"))?,
                round: RoundId(1),
                base_version: ModelVersion(0),
                num_examples: 1 + u64::from(c % 7),
                kind: UpdateKind::Parameters,
                payload: payload.clone(),
                force_upload,
            })
            .await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Cold start and mean warm reuse, µs: a one-update job over `reuse_rounds + 1` rounds.
async fn start_times(a: &HierarchyArgs) -> Result<(f64, f64)> {
    let nats = NatsServer::start().context("cannot start nats-server")?;
    let url = nats.url();
    let node = start_node(a, &url, "bench-start", true, 64 << 20).await?;
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![1024])])?;
    let m = Arc::new(manifest.clone());
    let job = JobId::new("starts")?;
    let rounds = a.reuse_rounds + 1;
    shoal_client::jobs::create_job(&admin, &spec("starts", manifest, 1, rounds), None).await?;
    let payload = Bytes::from(shoal_functions::tensor::encode_safetensors(&m, &[vec![0.5; 1024]])?);
    for r in 1..=rounds {
        let st = client.wait_for_open_round(&job, RoundId(r), Duration::from_secs(60)).await?;
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new("c")?,
                round: RoundId(r),
                base_version: st.model_version,
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
    let cold = get("shoal_aggregator_cold_start_seconds_sum")
        / get("shoal_aggregator_cold_start_seconds_count").max(1.0);
    let warm = get("shoal_aggregator_warm_reuse_seconds_sum")
        / get("shoal_aggregator_warm_reuse_seconds_count").max(1.0);
    node.shutdown().await;
    Ok((cold * 1e6, warm * 1e6))
}
