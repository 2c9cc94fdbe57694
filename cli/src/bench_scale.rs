//! `shoal bench scale`: how many clients one node takes in one synchronous round, and where the
//! round's time goes.
//!
//! One node runs in process against a private nats-server; a FedAvg job waits for a cohort of
//! `--clients` updates of `--params` f32 each (inline). This process publishes them with
//! `--publishers` publishes in flight (each waits for JetStream's ack, as the SDK does) while the
//! node ingests, and reports the round time (first publish to commit), updates per second, and
//! from the node's metrics: the gateway's busy time (`shoal_ingest_stage_seconds`, of which
//! claims `shoal_ingest_claim_seconds`), the leaves' fold time (`shoal_fold_seconds`) and the
//! commit (`shoal_round_latency_seconds`: the last accepted update to the commit). The goal of
//! issue 16 is 100,000 × 1,000 f32 in at most 30 s on a 2-core machine.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use shoal_client::{ConnectOptions, ShoalClient, UpdateRequest};
use shoal_functions::{
    ClientId, DType, JobId, ModelManifest, ModelVersion, NodeId, RoundId, TensorSpec, UpdateKind,
};
use shoal_natsd::NatsServer;
use shoal_proto::config::NodeConfig;
use shoal_runtime::metrics::scrape;
use shoal_runtime::node::{self, NodeOptions};

/// `shoal bench scale` flags.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Clients (updates) in the round.
    #[arg(long, default_value_t = 100_000)]
    pub clients: u32,
    /// f32 parameters per update.
    #[arg(long, default_value_t = 1_000)]
    pub params: usize,
    /// Publishes in flight at once (the clients' concurrency).
    #[arg(long, default_value_t = 64)]
    pub publishers: usize,
    /// Root of the benchmark's shared-memory directory.
    #[arg(long, default_value = "/dev/shm/shoal-bench-scale")]
    pub shm_dir: std::path::PathBuf,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// What `shoal bench scale` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleReport {
    /// Clients in the round.
    pub clients: u32,
    /// Tensor bytes per update.
    pub update_bytes: u64,
    /// First publish to commit, seconds.
    pub round_s: f64,
    /// `clients / round_s`.
    pub updates_per_s: f64,
    /// First publish to the last publish's ack, seconds.
    pub publish_s: f64,
    /// The gateway's time taking updates in, seconds (summed over updates).
    pub stage_s: f64,
    /// Of `stage_s`, claims in KV.
    pub claim_s: f64,
    /// The leaves' fold time, seconds (summed over batches).
    pub fold_s: f64,
    /// The last accepted update to the commit, seconds.
    pub commit_s: f64,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// nats-server missing, NATS or shared-memory errors (with context).
pub async fn scale(a: ScaleArgs) -> Result<()> {
    anyhow::ensure!(a.clients >= 1 && a.params >= 1, "--clients and --params must be at least 1");
    anyhow::ensure!(a.publishers >= 1, "--publishers must be at least 1");
    let nats = NatsServer::start().context("cannot start nats-server")?;
    let url = nats.url();
    let update_bytes = a.params * 4;
    let config = NodeConfig {
        node_id: NodeId::new("bench-scale")?,
        nats_url: url.clone(),
        shm_dir: a.shm_dir.clone(),
        ack_wait_ms: 300_000,
        ..NodeConfig::default()
    };
    let node = node::start(NodeOptions::new(config)).await?;
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![a.params])])?;
    let m = std::sync::Arc::new(manifest.clone());
    let job = JobId::new("scale")?;
    shoal_client::jobs::create_job(&admin, &crate::bench::spec("scale", manifest, a.clients, 1), None)
        .await?;
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(120)).await?;
    let values: Vec<f64> = (0..a.params).map(|i| ((i % 1000) as f64) * 1e-3).collect();
    let payload = Bytes::from(shoal_functions::tensor::encode_safetensors(&m, &[values])?);
    let bar = ProgressBar::new(u64::from(a.clients)).with_style(
        ProgressStyle::with_template("publishing {bar:40} {pos}/{len} updates")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut published = futures::stream::iter(0..a.clients)
        .map(|c| {
            let (client, job, payload) = (&client, job.clone(), payload.clone());
            async move {
                client
                    .publish_update(UpdateRequest {
                        job,
                        client: ClientId::new(format!("c{c}"))?,
                        round: RoundId(1),
                        base_version: ModelVersion(0),
                        num_examples: 1 + u64::from(c % 7),
                        kind: UpdateKind::Parameters,
                        payload,
                        force_upload: false,
                    })
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(a.publishers);
    while let Some(r) = published.next().await {
        r?;
        bar.inc(1);
    }
    drop(published);
    let publish_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(3600)).await?;
    let round_s = started.elapsed().as_secs_f64();
    let state = client.job_state(&job).await?;
    anyhow::ensure!(
        state.model_version == ModelVersion(1),
        "the round did not commit ({:?})",
        state.model_version
    );
    let text = node.metrics.encode();
    let get = |name: &str| scrape(&text, name).unwrap_or(0.0);
    // `shoal_round_latency_seconds` is labelled by job: the sum of the series' sums.
    let labelled = |name: &str| shoal_runtime::metrics::scrape_sum(&text, name).unwrap_or(0.0);
    let r = ScaleReport {
        clients: a.clients,
        update_bytes: update_bytes as u64,
        round_s,
        updates_per_s: f64::from(a.clients) / round_s,
        publish_s,
        stage_s: get("shoal_ingest_stage_seconds_total"),
        claim_s: get("shoal_ingest_claim_seconds_total"),
        fold_s: get("shoal_fold_seconds_total"),
        commit_s: labelled("shoal_round_latency_seconds_sum"),
    };
    drop(client);
    drop(admin);
    node.shutdown().await;
    drop(nats);
    let _ = std::fs::remove_dir(a.shm_dir.join("bench-scale"));
    let _ = std::fs::remove_dir(&a.shm_dir);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print_report(&r, &a);
    Ok(())
}

fn print_report(r: &ScaleReport, a: &ScaleArgs) {
    println!(
        "shoal bench scale: {} clients x {} f32 ({:.1} KB each) in one round",
        r.clients,
        a.params,
        r.update_bytes as f64 / 1e3
    );
    println!("round (first publish -> commit): {:.2} s   {:.0} updates/s", r.round_s, r.updates_per_s);
    println!("publish (first -> last ack, {} in flight): {:.2} s", a.publishers, r.publish_s);
    println!(
        "gateway busy: {:.2} s ({:.0}% of the round; {:.1} us per update), of which claims {:.2} s",
        r.stage_s,
        100.0 * r.stage_s / r.round_s,
        1e6 * r.stage_s / f64::from(r.clients),
        r.claim_s
    );
    println!("fold: {:.2} s ({:.0}% of the round)", r.fold_s, 100.0 * r.fold_s / r.round_s);
    println!("last update -> commit: {:.3} s", r.commit_s);
}
