//! `shoal-operator`: the operator binary. `run` (the controller: reconcile `FederatedJob`s, with
//! leader election and the `/metrics` `/healthz` `/readyz` listener), `simulate` (replay an
//! arrival trace through the autoscaler and placement) and `trace generate` (synthetic FL
//! workloads).

mod run;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use shoal_operator::policy::{PlacementStrategy, ScalingSpec};
use shoal_operator::report;
use shoal_operator::simulate::{compare, HostModel};
use shoal_operator::trace::{generate, GeneratorParams, Trace, TraceKind};
use shoal_operator::KubeDuration;

#[derive(Debug, Parser)]
#[command(name = "shoal-operator", version, about = "Shoal's Kubernetes operator and its what-if tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator: reconcile FederatedJobs against the API server (kubeconfig from
    /// $KUBECONFIG or the pod's service account) and NATS.
    Run(Box<run::RunArgs>),
    /// Replay an arrival trace through the autoscaler and every placement strategy, and write a
    /// report (CSV per tick, PNG plots, summary table).
    #[command(after_help = "\
Examples:
  shoal-operator trace generate --kind bursty --nodes 20 --clients-per-round 2000 --rounds 5 --seed 7 > bursty.csv
  shoal-operator simulate bursty.csv --out report/
  shoal-operator simulate bursty.csv --policy my-policy.yaml --strategies bestFit,roundRobin --json
  shoal-operator simulate operator/traces/hot-node.csv --cold-start 5s --no-plots

The policy file holds the FederatedJob's `autoscaling:` and `placement:` blocks (docs/autoscaling.md).")]
    Simulate(SimulateArgs),
    /// Arrival traces.
    #[command(subcommand)]
    Trace(TraceCommand),
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// The trace: CSV with the header `time_s,node,job,updates,bytes`.
    trace: PathBuf,
    /// Policy file (YAML or JSON) with `autoscaling:` and `placement:` blocks; defaults if absent.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Placement strategies to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "bestFit,roundRobin,firstFit,worstFit")]
    strategies: Vec<String>,
    /// Report directory (created if missing).
    #[arg(long, default_value = "shoal-simulation")]
    out: PathBuf,
    /// Time from a scale-up decision to the new host serving.
    #[arg(long, default_value = "2s")]
    cold_start: KubeDuration,
    /// Bytes per second an update moves between nodes when no local host folds it.
    #[arg(long, default_value_t = 1e9)]
    cross_node_bandwidth: f64,
    /// How long after the last arrival the run may continue (drain and scale down).
    #[arg(long, default_value = "10m")]
    drain_limit: KubeDuration,
    /// TrueType font for plot text (default: a system DejaVu/Liberation/Arial).
    #[arg(long)]
    font: Option<PathBuf>,
    /// Write CSV and the summary only.
    #[arg(long)]
    no_plots: bool,
    /// Print the summary as JSON (for scripts) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TraceCommand {
    /// Generate a synthetic trace (CSV on stdout or --out).
    #[command(after_help = "\
Examples:
  shoal-operator trace generate --kind steady --nodes 100 --clients-per-round 10000 --rounds 10 --seed 1 --out steady.csv
  shoal-operator trace generate --kind hot-node --nodes 10 --clients-per-round 1000 --rounds 4 --seed 3")]
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Workload shape.
    #[arg(long, value_enum, default_value = "steady")]
    kind: TraceKind,
    /// Number of nodes.
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Clients reporting per round (peak for diurnal).
    #[arg(long, default_value_t = 10_000)]
    clients_per_round: u32,
    /// Number of rounds.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Random seed (same seed, same trace).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds between round starts.
    #[arg(long, default_value_t = 60.0)]
    round_interval: f64,
    /// Bytes per client update (44.8 MB = ResNet-18, LIFL's small workload).
    #[arg(long, default_value_t = 44_800_000)]
    update_bytes: u64,
    /// Zipf exponent of the clients' spread over nodes (0 = even).
    #[arg(long, default_value_t = 0.5)]
    skew: f64,
    /// Job name in the trace.
    #[arg(long, default_value = "job-a")]
    job: String,
    /// Time-bin width in seconds.
    #[arg(long, default_value_t = 1.0)]
    bin: f64,
    /// Arrival jitter N of `bursty` rounds: clients report U[0, N] s after the round starts.
    #[arg(long, default_value_t = 5.0)]
    jitter: f64,
    /// Output file (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::main(*args),
        Command::Simulate(args) => simulate(args),
        Command::Trace(TraceCommand::Generate(args)) => trace_generate(args),
    }
}

fn simulate(args: SimulateArgs) -> Result<()> {
    let spec = match &args.policy {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            ScalingSpec::from_yaml(path, &text)?
        }
        None => ScalingSpec::default(),
    };
    let strategies: Vec<PlacementStrategy> =
        args.strategies.iter().map(|s| s.parse()).collect::<shoal_operator::Result<_>>()?;
    let trace = Trace::read(&args.trace)?;
    let model = HostModel {
        cold_start: args.cold_start.get(),
        cross_node_bandwidth: args.cross_node_bandwidth,
        drain_limit: args.drain_limit.get(),
    };
    let started = Instant::now();
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ticks").context("progress style")?,
    );
    let mut shown = false;
    let mut progress = |done: u64, total: u64| {
        // Show progress only for runs long enough to notice.
        if !shown && started.elapsed() > Duration::from_millis(500) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_message("simulating");
            shown = true;
        }
        bar.set_length(total);
        bar.set_position(done);
    };
    let runs = compare(&trace, &spec, &model, &strategies, &mut progress)?;
    bar.finish_and_clear();
    let plots = !args.no_plots;
    if plots {
        report::load_font(args.font.as_deref())?;
    }
    report::write_report(&args.out, &runs, plots)?;
    let summaries: Vec<_> = runs.iter().map(|r| &r.summary).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    } else {
        let updates = summaries.first().map_or(0, |s| s.updates);
        println!(
            "{} rows, {} updates, {} nodes; simulated in {:.2}s; report in {}\n",
            trace.arrivals.len(),
            updates,
            runs.first().map_or(0, |r| r.nodes.len()),
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
        print!("{}", report::summary_table(&summaries));
    }
    Ok(())
}

fn trace_generate(args: GenerateArgs) -> Result<()> {
    let params = GeneratorParams {
        kind: args.kind,
        nodes: args.nodes,
        clients_per_round: args.clients_per_round,
        rounds: args.rounds,
        seed: args.seed,
        round_interval_s: args.round_interval,
        update_bytes: args.update_bytes,
        node_skew: args.skew,
        job: args.job,
        bin_s: args.bin,
        jitter_s: args.jitter,
    };
    let csv = generate(&params)?.to_csv();
    match args.out {
        Some(path) => std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{csv}"),
    }
    Ok(())
}
