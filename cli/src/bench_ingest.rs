//! `shoal bench ingest`: end-to-end ingest throughput of one node (NATS → staged → folded →
//! committed) against a raw JetStream consumer reading the same bytes from the same nats-server
//! in the same run (the limit).
//!
//! Two paths, each against its own private nats-server:
//! - **inline**: many small updates (`--inline-updates` × `--inline-params` f32), the payload in
//!   the update message;
//! - **upload**: a few large updates (`--upload-updates` × `--upload-params` f32), published as
//!   chunks into the job's upload stream, the update message carrying only the reference.
//!
//! Each path runs in three steps. (1) The job is created and every update published before any
//! node runs, so that neither side is limited by the publisher. (2) The limit: the update
//! messages are also published, with the same headers and payloads, into a scratch stream; a
//! plain pull consumer with the node's pull sizes (`--pull-batch`, `--pull-max-mib`) reads and
//! acks them, and for the upload path an ordered consumer then reads every chunk of the job's
//! upload stream. (3) A node starts in process; the figure is the time from the round's opening
//! to its commit (the node's start-up — connecting, taking the job's top lease, opening the
//! round — is printed apart). The ratio is limit time / node time: 1.0 means the node ingests
//! as fast as NATS can hand the bytes to anyone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{consumer, stream};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use shoal_client::{ConnectOptions, ShoalClient};
use shoal_functions::{DType, JobId, ModelManifest, ModelVersion, NodeId, RoundId, TensorSpec};
use shoal_natsd::{NatsOptions, NatsServer};
use shoal_proto::config::NodeConfig;
use shoal_runtime::node::{self, NodeOptions};

/// `shoal bench ingest` flags.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Updates (clients) of the inline path.
    #[arg(long, default_value_t = 20_000)]
    pub inline_updates: u32,
    /// f32 parameters per inline update.
    #[arg(long, default_value_t = 1_000)]
    pub inline_params: usize,
    /// Updates (clients) of the upload path.
    #[arg(long, default_value_t = 16)]
    pub upload_updates: u32,
    /// f32 parameters per upload-path update (4M = 16 MiB).
    #[arg(long, default_value_t = 4 << 20)]
    pub upload_params: usize,
    /// The node's `--pull-batch` (the raw consumer uses the same).
    #[arg(long, default_value_t = NodeConfig::default().pull_batch)]
    pub pull_batch: u32,
    /// The node's `--pull-max-mib` (the raw consumer uses the same).
    #[arg(long, default_value_t = NodeConfig::default().pull_max_mib)]
    pub pull_max_mib: u64,
    /// Only the inline path (`inline`) or the upload path (`upload`); default both.
    #[arg(long, value_parser = ["inline", "upload"])]
    pub only: Option<String>,
    /// Root of the benchmark's shared-memory directories.
    #[arg(long, default_value = "/dev/shm/shoal-bench-ingest")]
    pub shm_dir: std::path::PathBuf,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// What one path measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathReport {
    /// `inline` or `upload`.
    pub path: &'static str,
    /// Updates in the round.
    pub updates: u32,
    /// Tensor bytes per update.
    pub update_bytes: u64,
    /// Bytes the raw consumer read (messages and, for the upload path, chunks).
    pub raw_bytes: u64,
    /// The raw consumer's time, seconds.
    pub raw_s: f64,
    /// The node's start to the round's opening, seconds (not part of the ratio).
    pub node_startup_s: f64,
    /// The round's opening to its commit, seconds.
    pub node_s: f64,
    /// `raw_s / node_s`.
    pub ratio: f64,
    /// Updates per second through the node.
    pub node_updates_per_s: f64,
    /// Update bytes per second through the node.
    pub node_bytes_per_s: f64,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// nats-server missing, NATS or shared-memory errors (with context).
pub async fn ingest(a: IngestArgs) -> Result<()> {
    anyhow::ensure!(a.inline_updates >= 1 && a.upload_updates >= 1, "--*-updates must be at least 1");
    anyhow::ensure!(a.inline_params >= 1 && a.upload_params >= 1, "--*-params must be at least 1");
    anyhow::ensure!(
        a.pull_batch >= 1 && a.pull_max_mib >= 1,
        "--pull-batch and --pull-max-mib must be at least 1"
    );
    let mut reports = Vec::new();
    if a.only.as_deref() != Some("upload") {
        reports.push(run_path(&a, false).await.context("inline path")?);
    }
    if a.only.as_deref() != Some("inline") {
        reports.push(run_path(&a, true).await.context("upload path")?);
    }
    let _ = std::fs::remove_dir(&a.shm_dir);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for r in &reports {
        println!(
            "{:6}: {} x {:.1} KB   raw consumer {:.3} s ({:.0} MB/s)   node {:.3} s ({:.0} updates/s, {:.0} MB/s; start-up {:.2} s)",
            r.path,
            r.updates,
            r.update_bytes as f64 / 1e3,
            r.raw_s,
            r.raw_bytes as f64 / r.raw_s / 1e6,
            r.node_s,
            r.node_updates_per_s,
            r.node_bytes_per_s / 1e6,
            r.node_startup_s,
        );
    }
    for r in &reports {
        println!("{} ingest ratio (raw consumer time / node time): {:.2}", r.path, r.ratio);
    }
    Ok(())
}

fn bar(len: u64, what: &str) -> ProgressBar {
    ProgressBar::new(len).with_style(
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

async fn run_path(a: &IngestArgs, upload: bool) -> Result<PathReport> {
    let (updates, params, name) = if upload {
        (a.upload_updates, a.upload_params, "upload")
    } else {
        (a.inline_updates, a.inline_params, "inline")
    };
    let update_bytes = params * 4;
    // Room for every chunk of the round in the upload stream and the store.
    let nats = NatsServer::start_with(NatsOptions::default()).context("cannot start nats-server")?;
    let url = nats.url();
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![params])])?;
    let m = Arc::new(manifest.clone());
    let job = JobId::new("ingest")?;
    let mut spec = crate::bench::spec("ingest", manifest, updates, 1);
    if upload {
        spec.upload_quota_bytes = Some((update_bytes as u64 + (1 << 20)) * u64::from(updates) * 2);
    }
    shoal_client::jobs::create_job(&admin, &spec, None).await?;

    // (1) Every update into the stream before any node runs.
    let pb = bar(u64::from(updates), &format!("{name}: publishing"));
    crate::bench::publish_round(&client, &job, &m, updates, upload, &pb).await?;

    // (2) The limit: the same messages (and chunks) read by a plain consumer.
    let (raw_s, raw_bytes) = raw_consumer(a, &admin, &job, upload).await?;

    // (3) The node.
    let model_bytes = update_bytes as u64;
    let slots = if upload { u64::from(updates.min(8)) + 2 } else { u64::from(updates) + 2 };
    let config = NodeConfig {
        node_id: NodeId::new(format!("bench-ingest-{name}"))?,
        nats_url: url.clone(),
        shm_dir: a.shm_dir.clone(),
        shm_budget_mib: ((model_bytes + 4096) * slots).div_ceil(1 << 20).max(1),
        ack_wait_ms: 300_000,
        pull_batch: a.pull_batch,
        pull_max_mib: a.pull_max_mib,
        ..NodeConfig::default()
    };
    let started = Instant::now();
    let node = node::start(NodeOptions::new(config)).await?;
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(120)).await?;
    let opened = Instant::now();
    client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(3600)).await?;
    let node_s = opened.elapsed().as_secs_f64();
    let node_startup_s = (opened - started).as_secs_f64();
    let state = client.job_state(&job).await?;
    anyhow::ensure!(
        state.model_version == ModelVersion(1),
        "the round did not commit (model version {:?})",
        state.model_version
    );
    drop(client);
    drop(admin);
    node.shutdown().await;
    let _ = std::fs::remove_dir(a.shm_dir.join(format!("bench-ingest-{name}")));
    drop(nats);
    Ok(PathReport {
        path: name,
        updates,
        update_bytes: model_bytes,
        raw_bytes,
        raw_s,
        node_startup_s,
        node_s,
        ratio: raw_s / node_s.max(1e-9),
        node_updates_per_s: f64::from(updates) / node_s.max(1e-9),
        node_bytes_per_s: (model_bytes * u64::from(updates)) as f64 / node_s.max(1e-9),
    })
}

/// Copies the job's update messages into a scratch stream, then times a pull consumer with the
/// node's pull sizes reading and acking them, plus (upload path) an ordered consumer reading
/// every chunk of the job's upload stream. Returns (seconds, bytes read).
async fn raw_consumer(
    a: &IngestArgs,
    admin: &shoal_client::Infra,
    job: &JobId,
    upload: bool,
) -> Result<(f64, u64)> {
    let js = &admin.js;
    let scratch = js
        .create_stream(stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["benchraw.>".into()],
            ..Default::default()
        })
        .await
        .context("create the scratch stream")?;
    // Read the update messages back without consuming them (gets by sequence) and
    // publish copies.
    let updates = admin.updates.clone();
    let last = updates.clone().info().await.context("updates stream info")?.state.last_sequence;
    let mut acks = Vec::new();
    for seq in 1..=last {
        let Ok(msg) = updates.get_raw_message(seq).await else { continue };
        let subject = format!("benchraw.{seq}");
        acks.push(js.publish_with_headers(subject, msg.headers.clone(), msg.payload.clone()).await?);
        if acks.len() >= 256 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    let expected = scratch.clone().info().await?.state.messages;
    let cfg = NodeConfig { pull_batch: a.pull_batch, pull_max_mib: a.pull_max_mib, ..NodeConfig::default() };
    let started = Instant::now();
    let pull = scratch
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = pull
        .stream()
        .max_messages_per_batch(cfg.pull_batch as usize)
        .max_bytes_per_batch(cfg.pull_max_bytes(admin.max_payload()))
        .messages()
        .await?;
    let mut bytes = 0u64;
    for _ in 0..expected {
        let m = messages.next().await.context("raw consumer ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
        bytes += m.payload.len() as u64;
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    if upload {
        let name = admin.subjects.uploads_stream(job);
        let uploads = js.get_stream(&name).await.context("the job's upload stream")?;
        let chunks = uploads.clone().info().await?.state.messages;
        // A plain pull consumer sized like the node's pulls: an ordered consumer's default
        // batch (hundreds of 1 MiB chunks) outruns nats-server's 64 MiB per-connection
        // `max_pending`, and the server cuts the connection off as a slow consumer.
        let reader = uploads
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        let mut stream = reader
            .stream()
            .max_messages_per_batch(cfg.pull_batch as usize)
            .max_bytes_per_batch(cfg.pull_max_bytes(admin.max_payload()))
            .messages()
            .await?;
        for _ in 0..chunks {
            let m =
                stream.next().await.context("ordered consumer ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
            bytes += m.payload.len() as u64;
        }
    }
    let raw_s = started.elapsed().as_secs_f64();
    js.delete_stream("BENCH_RAW").await.ok();
    Ok((raw_s, bytes))
}
