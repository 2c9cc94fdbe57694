//! `shoal bench dataplane`: descriptor delivery between a gateway and a function host over the
//! three paths a node can use, measured in one run:
//!
//! - **in-process**: an actix message to an actor in the same process that answers with the
//!   release record (`shoal node`'s default path is an actix message to the function host);
//! - **loopback TCP**: the descriptor channel (`runtime/src/host/channel.rs`): the gateway writes
//!   a `DESCRIPTOR` frame, the host task reads and decodes it and writes back the `RELEASE`
//!   frame, which the gateway reads and decodes;
//! - **SK_MSG redirect**: the same code with the eBPF sidecar loaded for the listener's port and
//!   the connection registered (`shoal_runtime::dataplane`), so each frame is moved straight
//!   into the peer socket.
//!
//! Then the processes ([`crate::bench_split`]): round latency of a gateway with spawned
//! function hosts against the all-in-one node, and a function-host process's cold start.
//!
//! One sample is one round trip (descriptor out, its release back, both decoded and checked),
//! one at a time. Figures are ratios between paths measured in the same run; absolute times
//! depend on the machine and on what else runs on it.

use std::path::PathBuf;
use std::time::Instant;

use actix::{Actor, Context, Handler, Message, MessageResult};
use anyhow::{Context as _, Result};
use clap::Args;
use shoal_ebpf::EbpfMode;
use shoal_functions::{ClientId, JobId, RoundId, UpdateKind};
use shoal_proto::descriptor::{DescriptorKind, SegmentId, UpdateDescriptor};
use shoal_proto::{FunctionId, Staleness};
use shoal_runtime::dataplane::{Dataplane, DataplaneConfig};
use shoal_runtime::host::channel;
use shoal_runtime::ingest::ledger::Feedback;
use shoal_runtime::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream};

/// `shoal bench dataplane` flags.
#[derive(Debug, Args)]
pub struct DataplaneArgs {
    /// Round trips measured per path (after a warm-up of a tenth, 10 to 1000).
    #[arg(long, default_value_t = 20_000)]
    pub descriptors: usize,
    /// The SK_MSG path: `auto` measures it when this process may load the sidecar and says why
    /// not otherwise; `required` fails without it; `off` skips it.
    #[arg(long, default_value_t = EbpfMode::Auto)]
    pub ebpf: EbpfMode,
    /// The cgroup v2 directory for sock_ops (default: this process's own).
    #[arg(long)]
    pub ebpf_cgroup: Option<PathBuf>,
    /// Rounds run by the all-in-one node and by the gateway with spawned hosts (0: skip).
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Updates per round (FedAvg, upload path, as `shoal bench hierarchy`).
    #[arg(long, default_value_t = 20)]
    pub round_updates: u32,
    /// f32 parameters per update.
    #[arg(long, default_value_t = 1_000_000)]
    pub round_params: usize,
    /// Function-host process cold starts to time (spawn to first fold; 0: skip).
    #[arg(long, default_value_t = 5)]
    pub cold_starts: u64,
    /// Root of the shared-memory directories of those nodes.
    #[arg(long, default_value = "/dev/shm/shoal-bench-dataplane")]
    pub shm_dir: PathBuf,
}

/// What one path measured.
#[derive(Debug, Clone, Copy)]
pub struct PathReport {
    /// Median round trip, nanoseconds.
    pub p50_ns: u64,
    /// 99th-percentile round trip, nanoseconds.
    pub p99_ns: u64,
    /// Round trips per second.
    pub per_sec: f64,
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// A bad flag; a socket failure; with `--ebpf required`, a sidecar that cannot load.
pub async fn dataplane(a: DataplaneArgs) -> Result<()> {
    anyhow::ensure!(a.descriptors >= 1, "--descriptors must be at least 1");
    let warmup = (a.descriptors / 10).clamp(10, 1000);
    println!(
        "shoal bench dataplane: {} descriptor round trips per path (descriptor to the function host, its release back), after {warmup} warm-up",
        a.descriptors
    );
    let in_process = in_process(warmup, a.descriptors).await?;
    print_path("in-process (actix message)", &in_process, None);
    let tcp = over_tcp(None, warmup, a.descriptors).await?.0;
    print_path("loopback TCP", &tcp, Some(("in-process", &in_process)));
    let redirect = if a.ebpf == EbpfMode::Off {
        println!("  SK_MSG redirect: skipped (--ebpf off)");
        None
    } else {
        // Loaded as `required` so a refusal comes back with its reason.
        let config =
            DataplaneConfig { ebpf: EbpfMode::Required, cgroup: a.ebpf_cgroup.clone(), ..Default::default() };
        match over_tcp(Some(&config), warmup, a.descriptors).await {
            Ok((report, redirected)) => {
                print_path("SK_MSG redirect", &report, Some(("loopback TCP", &tcp)));
                println!(
                    "    (the sidecar redirected {redirected} of {} descriptors)",
                    warmup + a.descriptors
                );
                Some(report)
            }
            Err(e) if a.ebpf == EbpfMode::Auto => {
                println!("  SK_MSG redirect: skipped ({e:#})");
                None
            }
            Err(e) => return Err(e),
        }
    };
    let ratio = |x: f64, y: f64| x / y.max(f64::MIN_POSITIVE);
    println!(
        "ratios: loopback TCP / in-process p50 {:.2}, p99 {:.2}, msgs/s {:.2}",
        ratio(tcp.p50_ns as f64, in_process.p50_ns as f64),
        ratio(tcp.p99_ns as f64, in_process.p99_ns as f64),
        ratio(tcp.per_sec, in_process.per_sec)
    );
    if let Some(r) = redirect {
        println!(
            "ratios: SK_MSG redirect / loopback TCP p50 {:.2}, p99 {:.2}, msgs/s {:.2}; / in-process p50 {:.2}",
            ratio(r.p50_ns as f64, tcp.p50_ns as f64),
            ratio(r.p99_ns as f64, tcp.p99_ns as f64),
            ratio(r.per_sec, tcp.per_sec),
            ratio(r.p50_ns as f64, in_process.p50_ns as f64)
        );
    }
    if a.rounds > 0 || a.cold_starts > 0 {
        let rounds = crate::bench_split::SplitBench {
            updates: a.round_updates,
            params: a.round_params,
            rounds: a.rounds,
            cold_starts: a.cold_starts,
            shm_dir: a.shm_dir.clone(),
        };
        crate::bench_split::run(&rounds).await?;
    }
    Ok(())
}

fn print_path(name: &str, r: &PathReport, against: Option<(&str, &PathReport)>) {
    let vs = against.map_or(String::new(), |(other, o)| {
        format!("  (p50 {:.2}x {other})", r.p50_ns as f64 / (o.p50_ns as f64).max(1.0))
    });
    println!(
        "  {name:<28} p50 {:>8.2} µs  p99 {:>8.2} µs  {:>9.0} round trips/s{vs}",
        r.p50_ns as f64 / 1e3,
        r.p99_ns as f64 / 1e3,
        r.per_sec
    );
}

/// A descriptor as the gateway sends one (only `stream_seq` changes between samples).
fn descriptor(seq: u64) -> Result<UpdateDescriptor> {
    Ok(UpdateDescriptor {
        kind: DescriptorKind::Update,
        function: FunctionId(1),
        segment: SegmentId(1),
        slot: (seq % 64) as u32,
        generation: 1,
        offset: 4096,
        length: 1 << 20,
        job: JobId::new("bench-dataplane")?,
        round: RoundId(1),
        client: ClientId::new("client-0000")?,
        num_examples: 100,
        staleness: Staleness(0),
        update_kind: UpdateKind::Parameters,
        stream_seq: seq,
    })
}

/// Collects the timings of `warmup + n` round trips; the first `warmup` are not kept.
struct Samples {
    warmup: usize,
    latencies: Vec<u64>,
    started: Option<Instant>,
}

impl Samples {
    fn new(warmup: usize, n: usize) -> Samples {
        Samples { warmup, latencies: Vec::with_capacity(n), started: None }
    }

    fn record(&mut self, i: usize, t0: Instant) {
        if i == self.warmup {
            self.started = Some(t0);
        }
        if i >= self.warmup {
            self.latencies.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }

    fn report(mut self) -> PathReport {
        let elapsed = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        self.latencies.sort_unstable();
        PathReport {
            p50_ns: percentile(&self.latencies, 50),
            p99_ns: percentile(&self.latencies, 99),
            per_sec: self.latencies.len() as f64 / elapsed.max(f64::MIN_POSITIVE),
        }
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (pct * sorted.len()).div_ceil(100).max(1);
    sorted[(rank - 1).min(sorted.len() - 1)]
}

/// The in-process function host of the benchmark: answers each descriptor with its release.
struct EchoHost;

impl Actor for EchoHost {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "UpdateDescriptor")]
struct Deliver(UpdateDescriptor);

impl Handler<Deliver> for EchoHost {
    type Result = MessageResult<Deliver>;

    fn handle(&mut self, m: Deliver, _: &mut Context<Self>) -> MessageResult<Deliver> {
        MessageResult(m.0.release())
    }
}

async fn in_process(warmup: usize, n: usize) -> Result<PathReport> {
    let host = EchoHost.start();
    let mut samples = Samples::new(warmup, n);
    for i in 0..warmup + n {
        let d = descriptor(i as u64)?;
        let t0 = Instant::now();
        let release = host.send(Deliver(d)).await.context("the in-process host stopped")?;
        anyhow::ensure!(
            release.kind == DescriptorKind::Release && release.stream_seq == i as u64,
            "wrong release"
        );
        samples.record(i, t0);
    }
    Ok(samples.report())
}

/// Round trips over a loopback descriptor channel, with the sidecar when `ebpf` is given; the
/// report and the descriptors the sidecar redirected (0 without it).
async fn over_tcp(ebpf: Option<&DataplaneConfig>, warmup: usize, n: usize) -> Result<(PathReport, u64)> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind")?;
    let port = listener.local_addr()?.port();
    let plane = match ebpf {
        Some(config) => Dataplane::load(config, &[port])?,
        None => Dataplane::plain(),
    };
    let (host, accepted) = tokio::join!(TcpStream::connect(("127.0.0.1", port)), listener.accept());
    let (mut host, (mut gateway, _)) = (host.context("connect")?, accepted.context("accept")?);
    host.set_nodelay(true)?;
    gateway.set_nodelay(true)?;
    let metrics = Metrics::default();
    let timeout = std::time::Duration::from_secs(5);
    let (welcomed, said) = tokio::join!(
        channel::accept(&mut gateway, timeout, &metrics),
        channel::hello(&mut host, FunctionId(1))
    );
    let function = welcomed?;
    said?;
    let registered = plane.register(&gateway, function)?;
    let host_task = tokio::spawn(async move {
        loop {
            let (kind, body) = channel::read_frame(&mut host).await?;
            let d = channel::decode_descriptor(kind, &body)?;
            channel::send_release(&mut host, &d).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), channel::ChannelError>(())
    });
    let mut samples = Samples::new(warmup, n);
    for i in 0..warmup + n {
        let d = descriptor(i as u64)?;
        let t0 = Instant::now();
        channel::send_descriptor(&mut gateway, &d).await?;
        let (kind, body) = channel::read_frame(&mut gateway).await?;
        let released = channel::decode_feedback(kind, &body)?;
        anyhow::ensure!(
            released == Feedback::Release { stream_seq: i as u64 },
            "wrong release: {released:?}"
        );
        samples.record(i, t0);
    }
    let redirected = match plane.counters()? {
        Some(c) => c.function(shoal_ebpf::FunctionId::new(1).context("function 1")?).to_host.redirected,
        None => 0,
    };
    drop(gateway);
    let _ = host_task.await;
    drop(registered);
    Ok((samples.report(), redirected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!((percentile(&v, 50), percentile(&v, 99)), (50, 99));
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
