//! The eBPF sidecar on a real node's descriptor channel (issue 10 item 2): `shoal node
//! --descriptor-channel loopback-tcp --ebpf required` loads sock_ops + SK_MSG, its descriptors
//! are redirected socket to socket, the committed models are bit-identical to the in-process
//! node's and match the f64 oracle, and the per-function counters on `/metrics` equal what the
//! test sent, derived by hand from the frame layout (runtime/src/host/channel.rs):
//!
//! - every frame is `u32 length ‖ u8 type ‖ body`, sent with one `sendmsg`;
//! - a `DESCRIPTOR` (gateway → host) and a `RELEASE` (host → gateway) carry the 208-byte
//!   descriptor record: 4 + 1 + 208 = 213 bytes each;
//! - before registration: the host's `HELLO` (magic 4 + version 2 + function id 4 + job length
//!   1, zero for "any job": 16 bytes) and the gateway's `WELCOME` (version 2: 7 bytes), counted
//!   as `unregistered`.
//!
//! The node's single loopback function host is function 1; each update is one descriptor and,
//! once folded, one release. Tests that need to load programs run where the machine allows it
//! (root or CAP_BPF + CAP_NET_ADMIN, cgroup v2) and otherwise print why they skipped; with
//! `SHOAL_EBPF_REQUIRED=1` (set by `.ci/run` on such machines) a skip is a failure.
//!
//! Several of these nodes (and other test binaries' nodes) attach to the same cgroup at once:
//! each sidecar selects only its own listener's sockets, so they do not see each other.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::bf16;
use shoal_functions::{DType, JobId, ModelManifest, ModelVersion, RoundId};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

const ROUNDS: u64 = 2;
const CLIENTS: u64 = 6;
/// `u32` length + type byte + the 208-byte descriptor record.
const DESCRIPTOR_FRAME: u64 = 4 + 1 + 208;
/// The host's hello: length, type, magic `SHCH`, version `u16`, function id `u32`, job length
/// `u8` (0: the node's loopback host serves any job; channel version 2).
const HELLO_FRAME: u64 = 4 + 1 + 4 + 2 + 4 + 1;
/// The gateway's welcome: length, type, version `u16`.
const WELCOME_FRAME: u64 = 4 + 1 + 2;

/// How the node's gateway reaches its function host. The split-process modes (gateway +
/// function-host processes, with and without eBPF) join this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `shoal node` as is: descriptors are actix messages.
    InProcess,
    /// `--descriptor-channel loopback-tcp --ebpf <mode>`.
    LoopbackTcp { ebpf: &'static str },
}

impl Mode {
    fn node_args(self) -> Vec<&'static str> {
        match self {
            Mode::InProcess => vec![],
            Mode::LoopbackTcp { ebpf } => vec!["--descriptor-channel", "loopback-tcp", "--ebpf", ebpf],
        }
    }
}

/// What a run leaves to check.
struct Run {
    /// The committed models' safetensors bytes, version 1 first.
    models: Vec<Vec<u8>>,
    /// `/metrics` once the counters were exported after the last release.
    metrics: String,
    log: String,
}

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[
        ("fc.weight", DType::F32, &[32, 20]),
        ("fc.bias", DType::BF16, &[20]),
        ("steps", DType::I64, &[]),
    ])
}

/// f32 within 1e-6 relative, bf16 within its rounding, integers exactly (half to even).
fn assert_matches_oracle(model: &shoal_functions::Parameters, oracle: &[Vec<f64>]) {
    for (i, spec) in model.manifest().tensors().iter().enumerate() {
        for (e, (g, o)) in model.tensor_f64(i).iter().zip(&oracle[i]).enumerate() {
            let ok = match spec.dtype {
                DType::F32 => (g - o).abs() <= 1e-6 * o.abs().max(1e-30),
                DType::BF16 => (g - bf16::from_f64(*o).to_f64()).abs() <= 4e-3 * o.abs().max(1e-30),
                _ => *g == o.round_ties_even(),
            };
            assert!(ok, "{}[{e}]: committed {g}, oracle {o}", spec.name);
        }
    }
}

async fn http_metrics(node: &NodeProcess) -> String {
    let addr = node.http_addr().expect("the node logs its HTTP address");
    let (code, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

fn counter(text: &str, name: &str, function: &str, direction: &str) -> f64 {
    scrape(text, &format!("{name}{{function=\"{function}\",direction=\"{direction}\"}}")).unwrap_or(0.0)
}

/// Polls the node's log until it contains `what` (10 s).
async fn wait_for_log(node: &NodeProcess, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log().contains(what) {
        assert!(Instant::now() < deadline, "no {what:?} in the log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `ROUNDS` FedAvg rounds of `CLIENTS` clients on one node in `mode` (each model checked
/// against the oracle). With `kill_switch_at`, SIGUSR1 turns redirect off before that round.
async fn run(mode: Mode, extra: &[&str], kill_switch_at: Option<u64>) -> Run {
    let nats = NatsServer::start().unwrap();
    let mut args = mode.node_args();
    args.extend_from_slice(extra);
    let node = NodeProcess::start(&nats.url(), "ebpf", &args).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("ebpf").unwrap();
    let spec = job_spec("ebpf", (*m).clone(), CLIENTS as u32, CLIENTS as u32, 60_000, ROUNDS);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let mut models = Vec::new();
    for round in 1..=ROUNDS {
        let state = client.wait_for_open_round(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
        if kill_switch_at == Some(round) {
            let pid = node.pid().unwrap();
            assert_eq!(
                std::process::Command::new("kill").args(["-USR1", &pid.to_string()]).status().unwrap().code(),
                Some(0)
            );
            wait_for_log(&node, "descriptor redirect turned off").await;
        }
        let mut sent = Vec::new();
        for c in 0..CLIENTS {
            let n = 1 + (round * 37 + c * 101) % 900;
            sent.push(send_update(&client, &m, &job, &state, (c, round * 100 + c, n), c == 0).await);
        }
        let after = client
            .wait_for_round_closed(&job, RoundId(round), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", node.log()));
        assert!(
            matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 6, .. })),
            "round {round}: {:?}\n{}",
            after.last_outcome,
            node.log()
        );
        let bytes = client.fetch_model(&job, ModelVersion(round)).await.unwrap();
        let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_matches_oracle(&model, &weighted_mean_oracle(&sent));
        models.push(bytes);
    }
    // Every slot came back over the channel, and the counter tick (1 s) exported the kernel's
    // sums after the last release.
    let updates = (ROUNDS * CLIENTS) as f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = http_metrics(&node).await;
        let done = match mode {
            Mode::InProcess => true,
            Mode::LoopbackTcp { .. } => {
                let released =
                    scrape(&text, "shoal_descriptor_channel_releases_received_total") == Some(updates);
                let counted = text.contains("shoal_ebpf_sidecar_attached 0")
                    || counter(&text, "shoal_descriptor_messages_total", "1", "to_gateway") >= updates;
                released && counted
            }
        };
        if done {
            // One more tick, so a count that is still growing shows up as a mismatch.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            break http_metrics(&node).await;
        }
        assert!(Instant::now() < deadline, "slots or counters never settled:\n{text}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("shoal_descriptor_channel_errors_total") && !l.ends_with(" 0"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    Run { models, metrics, log: node.log() }
}

/// The counters of a node whose sidecar carried every message of the job: `redirected_to_host`
/// of the `ROUNDS * CLIENTS` descriptors went by SK_MSG redirect, the rest by TCP.
fn assert_counted_exactly(run: &Run, redirected_to_host: u64) {
    let text = &run.metrics;
    let updates = ROUNDS * CLIENTS;
    assert_eq!(scrape(text, "shoal_ebpf_sidecar_attached"), Some(1.0), "{text}");
    let want = [
        // (function, direction, messages, bytes)
        ("1", "to_host", updates, updates * DESCRIPTOR_FRAME),
        ("1", "to_gateway", updates, updates * DESCRIPTOR_FRAME),
        ("unregistered", "to_host", 1, WELCOME_FRAME),
        ("unregistered", "to_gateway", 1, HELLO_FRAME),
    ];
    for (function, direction, msgs, bytes) in want {
        assert_eq!(
            counter(text, "shoal_descriptor_messages_total", function, direction),
            msgs as f64,
            "messages of function {function} {direction}:\n{text}"
        );
        assert_eq!(
            counter(text, "shoal_descriptor_bytes_total", function, direction),
            bytes as f64,
            "bytes of function {function} {direction}:\n{text}"
        );
    }
    assert_eq!(
        counter(text, "shoal_descriptor_messages_redirected_total", "1", "to_host"),
        redirected_to_host as f64,
        "{text}"
    );
    // Handshakes come before registration: never redirected.
    assert_eq!(counter(text, "shoal_descriptor_messages_redirected_total", "unregistered", "to_host"), 0.0);
    // The gateway's own count agrees with the kernel's.
    assert_eq!(scrape(text, "shoal_descriptor_channel_descriptors_sent_total"), Some(updates as f64));
}

fn assert_same_models(a: &Run, b: &Run, what: &str) {
    assert_eq!(a.models.len(), ROUNDS as usize);
    for (v, (x, y)) in a.models.iter().zip(&b.models).enumerate() {
        assert!(x == y, "model version {} differs: {what}", v + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_redirected_by_the_sidecar_commit_the_in_process_models_and_are_counted_exactly() {
    init_logging();
    if !ebpf_allowed("ebpf::descriptors_redirected_by_the_sidecar") {
        return;
    }
    let in_process = run(Mode::InProcess, &[], None).await;
    assert_eq!(scrape(&in_process.metrics, "shoal_ebpf_sidecar_attached"), Some(0.0));
    let redirected = run(Mode::LoopbackTcp { ebpf: "required" }, &[], None).await;
    assert!(redirected.log.contains("eBPF sidecar attached"), "{}", redirected.log);
    assert_same_models(&in_process, &redirected, "in process vs SK_MSG redirect");
    assert_counted_exactly(&redirected, ROUNDS * CLIENTS);
    assert_eq!(scrape(&redirected.metrics, "shoal_ebpf_redirect_enabled"), Some(1.0));

    // The kill switch before round 2: its descriptors take plain TCP, nothing is lost or
    // reordered, the models are the same.
    let switched = run(Mode::LoopbackTcp { ebpf: "required" }, &[], Some(2)).await;
    assert_same_models(&in_process, &switched, "in process vs redirect switched off before round 2");
    assert_counted_exactly(&switched, CLIENTS);
    assert_eq!(scrape(&switched.metrics, "shoal_ebpf_redirect_enabled"), Some(0.0));
}

/// `auto` on a machine (here: a cgroup path) where the programs cannot attach: one warning,
/// plain TCP, the same models; `required` there: the node refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_plain_tcp_with_one_warning_and_required_fails_clearly() {
    init_logging();
    let not_a_cgroup = tempfile::tempdir().unwrap();
    let path = not_a_cgroup.path().to_str().unwrap();
    let auto = run(Mode::LoopbackTcp { ebpf: "auto" }, &["--ebpf-cgroup", path], None).await;
    assert_eq!(auto.log.matches("eBPF sidecar not loaded (--ebpf auto)").count(), 1, "{}", auto.log);
    assert!(auto.log.contains("not a cgroup v2 directory"), "{}", auto.log);
    assert_eq!(scrape(&auto.metrics, "shoal_ebpf_sidecar_attached"), Some(0.0));
    assert!(
        !auto.metrics.contains("shoal_descriptor_messages_total{"),
        "nothing counted without the sidecar"
    );
    let off = run(Mode::LoopbackTcp { ebpf: "off" }, &[], None).await;
    assert!(!off.log.contains("eBPF"), "off never loads:\n{}", off.log);
    assert_same_models(&off, &auto, "--ebpf off vs auto fallen back");

    let nats = NatsServer::start().unwrap();
    let args = ["--descriptor-channel", "loopback-tcp", "--ebpf", "required", "--ebpf-cgroup", path];
    let mut node = NodeProcess::launch(&nats.url(), "ebpf-required", &args);
    let status = node
        .exited(Duration::from_secs(20))
        .await
        .expect("a required sidecar that cannot attach stops the node");
    assert!(!status.success());
    let log = node.log();
    assert!(log.contains("eBPF sidecar") && log.contains("not a cgroup v2 directory"), "{log}");
    assert!(log.contains("mount cgroup2 or configure the cgroup path"), "the diagnosis is printed:\n{log}");

    // In process, descriptors never touch a socket: `required` there is a mistake, said at once.
    let mut node = NodeProcess::launch(&nats.url(), "ebpf-in-process", &["--ebpf", "required"]);
    let status = node.exited(Duration::from_secs(20)).await.expect("refused at start");
    assert!(!status.success());
    assert!(node.log().contains("--ebpf required needs a TCP descriptor channel"), "{}", node.log());
}
