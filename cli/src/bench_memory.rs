//! `shoal bench memory`: a node's peak resident memory against the model size for a streaming
//! strategy (FedAvg), and where the bytes go.
//!
//! The node runs as a child process (`shoal node`, this executable) against a private
//! nats-server, so its `/proc/<pid>/status` holds only the node: `VmHWM` (peak resident set,
//! shared memory included) is the figure of merit, as a ratio to the model's bytes. A sampler
//! reads `RssAnon` (heap: the f64 accumulator, 2 × an f32 model, and the process), `RssShmem`
//! (the part of the shared-memory slots staged and not yet folded) and `RssFile` (the
//! executable's pages) every 5 ms and reports them at the sampled peak. The updates are
//! published on the upload path (chunks, as clients send large models) by this process, whose
//! memory is not counted.
//!
//! The design: the f64 accumulator is the only model-sized buffer, whatever the number of
//! clients. Uploads are folded while they are staged (the gateway stays a few MiB ahead of the
//! fold; `--fold-while-staging-min-mib`), and the new model is computed from the accumulator as
//! it is stored; the process's own memory (measured before the job starts) comes on top.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use shoal_client::{ConnectOptions, ShoalClient};
use shoal_functions::{DType, JobId, ModelManifest, RoundId, TensorSpec};
use shoal_natsd::NatsServer;

/// `shoal bench memory` flags.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Updates in the round (clients).
    #[arg(long, default_value_t = 8)]
    pub updates: u32,
    /// f32 parameters per update (67,108,864 = 256 MiB).
    #[arg(long, default_value_t = 64 << 20)]
    pub params: usize,
    /// Root of the node's shared-memory directory (default: a fresh directory under /dev/shm,
    /// removed at the end).
    #[arg(long)]
    pub shm_dir: Option<PathBuf>,
    /// The node's shared-memory budget (MiB); default: one slot, so the gateway stages the next
    /// update once the last is folded. Larger budgets let staging run ahead of folding (each
    /// slot staged whole ahead of the fold adds one model; an update folded while it is staged
    /// only a few MiB).
    #[arg(long)]
    pub shm_budget_mib: Option<u64>,
    /// The node's `--fold-while-staging-min-mib` (`off`: every update staged whole, then
    /// folded: the accumulator plus one slot).
    #[arg(long, default_value = "16")]
    pub fold_while_staging_min_mib: String,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// Memory figures of one process, KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rss {
    /// Anonymous memory (heap, stacks).
    pub anon_kib: u64,
    /// Shared memory (tmpfs segments).
    pub shmem_kib: u64,
    /// File-backed pages (the executable, libraries).
    pub file_kib: u64,
}

impl Rss {
    fn total(self) -> u64 {
        self.anon_kib + self.shmem_kib + self.file_kib
    }
}

/// What `shoal bench memory` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryReport {
    /// Updates folded.
    pub updates: u32,
    /// Bytes of one model (f32 tensors).
    pub model_bytes: u64,
    /// The node's peak resident set (`VmHWM`), bytes.
    pub vm_hwm_bytes: u64,
    /// The node's `--shm-budget-mib`.
    pub shm_budget_mib: u64,
    /// `vm_hwm_bytes / model_bytes`.
    pub ratio: f64,
    /// The node before the job existed (its own memory), KiB.
    pub baseline: Rss,
    /// The sample with the largest resident set, KiB.
    pub peak: Rss,
    /// (`vm_hwm` − the baseline) / model: the part the job costs.
    pub job_ratio: f64,
    /// First publish to commit, seconds.
    pub round_s: f64,
}

fn status(pid: u32) -> Result<(Rss, u64)> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("read the node's /proc status")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rss = Rss { anon_kib: field("RssAnon:"), shmem_kib: field("RssShmem:"), file_kib: field("RssFile:") };
    Ok((rss, field("VmHWM:")))
}

/// Kills the node child when the bench ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Samples the node's memory every 5 ms until `stop`; returns the largest sample.
fn sample_peak(pid: u32, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<Rss> {
    std::thread::spawn(move || {
        let mut peak = Rss::default();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((r, _)) = status(pid) {
                if r.total() > peak.total() {
                    peak = r;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    })
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// nats-server missing, the node not starting, NATS errors, a round that does not commit.
pub async fn memory(a: MemoryArgs) -> Result<()> {
    anyhow::ensure!(a.updates >= 1, "--updates must be at least 1");
    anyhow::ensure!(
        (1..=1 << 32).contains(&a.params),
        "--params must be between 1 and 4294967296 (16 GiB of f32), got {}",
        a.params
    );
    let model_bytes = a.params as u64 * 4;
    let own_dir = match &a.shm_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("shoal-bench-memory-")
                .tempdir_in("/dev/shm")
                .context("a directory under /dev/shm (pass --shm-dir)")?,
        ),
    };
    let shm_dir = a
        .shm_dir
        .clone()
        .or_else(|| own_dir.as_ref().map(|t| t.path().join("node")))
        .context("no shared-memory directory")?;
    if !a.json {
        println!(
            "shoal bench memory: FedAvg over {} updates of {} f32 ({:.1} MiB each), one node, --fold-while-staging-min-mib {}",
            a.updates,
            a.params,
            model_bytes as f64 / f64::from(1 << 20),
            a.fold_while_staging_min_mib
        );
    }
    let nats = NatsServer::start().context("cannot start nats-server")?;
    let url = nats.url();
    let exe = std::env::current_exe().context("this executable's path")?;
    // One slot: the model plus the slot layout's padding and the segment header, rounded up.
    let budget_mib = a.shm_budget_mib.unwrap_or((model_bytes + (1 << 20)).div_ceil(1 << 20));
    let node = Child(
        std::process::Command::new(exe)
            .args(["node", "--nats-url", &url, "--node-id", "bench-memory", "--http", "off"])
            .arg("--shm-dir")
            .arg(&shm_dir)
            .args(["--shm-budget-mib", &budget_mib.to_string()])
            .args(["--fold-while-staging-min-mib", &a.fold_while_staging_min_mib])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("start the node")?,
    );
    let pid = node.0.id();
    let admin =
        shoal_client::Infra::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await?;
    let client = ShoalClient::new(admin.connection());
    let manifest = ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![a.params])])?;
    let m = Arc::new(manifest.clone());
    let job = JobId::new("bench-memory")?;
    // The node is up once it serves: give it a moment, then take its own memory as baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (baseline, _) = status(pid)?;
    shoal_client::jobs::create_job(&admin, &crate::bench::spec("bench-memory", manifest, a.updates, 1), None)
        .await?;
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(60)).await?;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_peak(pid, Arc::clone(&stop));
    let bar = if a.json { ProgressBar::hidden() } else { ProgressBar::new(u64::from(a.updates)) };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} updates published")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    crate::bench::publish_round(&client, &job, &m, a.updates, true, &bar).await?;
    client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(3600)).await?;
    let round_s = started.elapsed().as_secs_f64();
    // The commit is announced after the model is stored: the peak is behind us.
    let (_, hwm_kib) = status(pid)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;
    drop(node);
    drop(client);
    drop(admin);
    drop(nats);
    let _ = std::fs::remove_dir_all(&shm_dir);
    drop(own_dir);
    let vm_hwm_bytes = hwm_kib * 1024;
    let report = MemoryReport {
        updates: a.updates,
        model_bytes,
        vm_hwm_bytes,
        shm_budget_mib: budget_mib,
        ratio: vm_hwm_bytes as f64 / model_bytes as f64,
        baseline,
        peak,
        job_ratio: vm_hwm_bytes.saturating_sub(baseline.total() * 1024) as f64 / model_bytes as f64,
        round_s,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &MemoryReport) {
    let model = r.model_bytes as f64;
    let of = |kib: u64| kib as f64 * 1024.0 / model;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "round: {:.2} s (first publish to commit), shared-memory budget {} MiB",
        r.round_s, r.shm_budget_mib
    );
    println!(
        "peak resident set (VmHWM): {:.1} MiB = {:.2} x the model ({:.2} x without the node's own {:.1} MiB)",
        r.vm_hwm_bytes as f64 / f64::from(1 << 20),
        r.ratio,
        r.job_ratio,
        mib(r.baseline.total())
    );
    println!(
        "where it goes, at the largest sample (design: the f64 accumulator, 2.00 x, plus a few MiB staged ahead of the fold, or one slot with --fold-while-staging-min-mib off):"
    );
    println!(
        "  heap (RssAnon):          {:8.1} MiB  {:.2} x   (f64 accumulator; the node's own {:.1} MiB)",
        mib(r.peak.anon_kib),
        of(r.peak.anon_kib),
        mib(r.baseline.anon_kib)
    );
    println!(
        "  shared memory (RssShmem):{:8.1} MiB  {:.2} x   (staged, not yet folded)",
        mib(r.peak.shmem_kib),
        of(r.peak.shmem_kib)
    );
    println!("  executable (RssFile):    {:8.1} MiB  {:.2} x", mib(r.peak.file_kib), of(r.peak.file_kib));
}
