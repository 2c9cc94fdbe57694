//! The `shoal` command line (clap).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_functions::{ClientId, JobId, JobSpec, NodeId, Parameters, UpdateKind};

use shoal_client::auth::{NatsAuth, NatsTls, Secret};
use shoal_client::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_proto::config::NodeConfig;
use shoal_proto::{JobPhase, RoundOutcome};
use shoal_runtime::http::{HttpListener, Probe};
use shoal_runtime::node::{self, NodeOptions};

/// Shoal: a serverless federated-learning aggregation platform on NATS.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "SHOAL_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// NATS connection flags shared by every command that connects: URL, prefix, credentials, TLS.
///
/// Pass secrets through the environment (`SHOAL_NATS_PASSWORD`, `SHOAL_NATS_TOKEN`) or files
/// (`--nats-creds`, `--nats-nkey`): command-line values show in `ps`. `--help` never prints
/// the values of the secret variables, and neither do logs.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated (`nats://` or `tls://`).
    #[arg(long, env = "SHOAL_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The deployment's prefix: names its subjects, streams, buckets and consumer (1-32 of
    /// [a-z0-9_-]; see README, "Prefixes and NATS clusters"). Use the nodes' prefix.
    #[arg(long, env = "SHOAL_PREFIX", default_value = shoal_proto::subjects::DEFAULT_PREFIX)]
    pub prefix: String,
    /// NATS user (with a password).
    #[arg(long, env = "SHOAL_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (prefer the environment variable).
    #[arg(long, env = "SHOAL_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,
    /// NATS token (prefer the environment variable).
    #[arg(long, env = "SHOAL_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,
    /// NATS `.creds` file (user JWT + nkey seed).
    #[arg(long, env = "SHOAL_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey user seed (`SU...`).
    #[arg(long, env = "SHOAL_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate (turns TLS on).
    #[arg(long, env = "SHOAL_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with --nats-key).
    #[arg(long, env = "SHOAL_NATS_CERT")]
    pub nats_cert: Option<PathBuf>,
    /// PEM private key of --nats-cert.
    #[arg(long, env = "SHOAL_NATS_KEY")]
    pub nats_key: Option<PathBuf>,
    /// Refuse a server that does not offer TLS.
    #[arg(long, env = "SHOAL_NATS_REQUIRE_TLS")]
    pub nats_require_tls: bool,
    /// Inbox prefix for replies (`shoal client` defaults to `_INBOX_<client-id>`, the inbox its
    /// least permissions allow).
    #[arg(long, env = "SHOAL_NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
}

impl NatsArgs {
    /// The SDK's connection options from these flags.
    ///
    /// # Errors
    /// Contradictory credentials (two at once), URLs with differing credentials.
    pub fn options(&self, name: &str) -> shoal_client::Result<ConnectOptions> {
        let auth = NatsAuth {
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            nkey_seed_file: self.nats_nkey.clone(),
        };
        auth.validate()?;
        ConnectOptions {
            url: self.nats_url.clone(),
            prefix: self.prefix.clone(),
            name: name.into(),
            auth,
            tls: NatsTls {
                ca_file: self.nats_ca.clone(),
                client_cert: self.nats_cert.clone(),
                client_key: self.nats_key.clone(),
                require: self.nats_require_tls,
            },
            inbox_prefix: self.nats_inbox_prefix.clone(),
            ..Default::default()
        }
        .without_url_credentials()
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: gateway + function host + a leaf per job, and the top of the jobs whose top
    /// lease it holds. Start several (distinct --node-id and --shm-dir) on one NATS server.
    Node(NodeArgs),
    /// Run a node's gateway alone: NATS ingest, staging into its segments, the leaf and top
    /// roles, and descriptor dispatch to separate `shoal function-host` processes (spawned on
    /// demand and stopped when idle, or started by the operator and registering).
    Gateway(GatewayArgs),
    /// Run a function host: the aggregator actors of this node's jobs, fed by the gateway's
    /// descriptor channel (segments mapped read-only). Started by `shoal gateway` or the
    /// operator.
    FunctionHost(FunctionHostArgs),
    /// Create, list, inspect, cancel and delete jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Take a job's models out of the object store.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Publish one client update for a job's open round.
    Client(ClientArgs),
    /// Train a real model federatedly, end to end, and compare with centralized training.
    Demo(crate::demo::DemoArgs),
    /// NATS authentication helpers.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// System benchmarks (each starts its own nats-server).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `shoal bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Round completion latency (last update to commit) with eager aggregation vs waiting for
    /// the whole cohort, and the aggregator's cold-start and warm-reuse times.
    Hierarchy(crate::bench::HierarchyArgs),
    /// A node's peak resident memory (VmHWM) against the model for FedAvg, with where the
    /// bytes go (accumulator, slots, process). Example: `shoal bench memory --updates 8
    /// --params 16777216` (8 x 64 MiB).
    Memory(crate::bench_memory::MemoryArgs),
    /// Descriptor delivery between gateway and function host: p50/p99 round trip and round
    /// trips per second in process, over loopback TCP and through the eBPF sidecar's SK_MSG
    /// redirect, with their ratios.
    Dataplane(crate::bench_dataplane::DataplaneArgs),
    /// End-to-end ingest (NATS -> staged -> folded -> committed) of one node against a raw
    /// JetStream consumer of the same bytes, inline path and upload path, as ratios.
    /// Example: `shoal bench ingest --inline-updates 5000 --upload-updates 8`.
    Ingest(crate::bench_ingest::IngestArgs),
    /// Clients per round: one node, one synchronous FedAvg round of `--clients` inline updates;
    /// round time, updates/s and where the time goes (publish, gateway, claims, fold, commit).
    /// Example: `shoal bench scale --clients 10000`.
    Scale(crate::bench_scale::ScaleArgs),
}

/// `shoal auth ...`
#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print the nats-server `authorization { users = [...] }` block for one job: a node user
    /// with every permission and one least-privilege user per client.
    ///
    /// Passwords are read by nats-server from the environment (`password:
    /// $SHOAL_NATS_PASSWORD_<USER>`), so the output holds no secret. With --nkeys-dir, every
    /// user gets an nkey pair instead: the seeds are written there (mode 0600) and the config
    /// lists only public keys.
    NatsConfig(NatsConfigArgs),
}

/// `shoal auth nats-config` flags.
#[derive(Debug, Args)]
pub struct NatsConfigArgs {
    /// Job id.
    #[arg(long)]
    job: String,
    /// Client ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    clients: Vec<String>,
    /// The deployment's prefix (the permissions name its subjects, streams and buckets).
    #[arg(long, env = "SHOAL_PREFIX", default_value = shoal_proto::subjects::DEFAULT_PREFIX)]
    prefix: String,
    /// The node's user name.
    #[arg(long, default_value = "shoal-node")]
    node_user: String,
    /// Generate nkey pairs and write each user's seed to `<dir>/<user>.nk`.
    #[arg(long)]
    nkeys_dir: Option<PathBuf>,
}

/// `shoal node` flags. Defaults come from `shoal_proto::config::NodeConfig::default()`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// This node's id (1-64 of [A-Za-z0-9_-]); names its shared-memory directory.
    #[arg(long, env = "SHOAL_NODE_ID", default_value_t = NodeConfig::default().node_id.to_string())]
    node_id: String,
    /// Root of the shared-memory directories (a tmpfs).
    #[arg(long, env = "SHOAL_SHM_DIR", default_value_os_t = NodeConfig::default().shm_dir)]
    shm_dir: PathBuf,
    /// JetStream ack wait for updates held until their round commits, in milliseconds (at least
    /// 300; in-progress acks go out at a third of it).
    #[arg(long, default_value_t = NodeConfig::default().ack_wait_ms)]
    ack_wait_ms: u64,
    /// Stop aggregators idle this long, in milliseconds.
    #[arg(long, default_value_t = NodeConfig::default().idle_timeout_ms)]
    idle_timeout_ms: u64,
    /// Shared-memory budget per job, in MiB (at least 1).
    #[arg(long, default_value_t = NodeConfig::default().shm_budget_mib)]
    shm_budget_mib: u64,
    /// Updates the gateway asks JetStream for per pull request (at least 1). Small batches
    /// spread a burst over several nodes; large ones cut round trips on a single node.
    #[arg(long, default_value_t = NodeConfig::default().pull_batch)]
    pull_batch: u32,
    /// Bytes the gateway asks JetStream for per pull request, in MiB (1-1024; never less than
    /// one whole update message). About twice this is in flight at once: keep it well below
    /// nats-server's max_pending (64 MiB by default), past which the server cuts the node off as
    /// a slow consumer (counted in shoal_nats_disconnects_total).
    #[arg(long, default_value_t = NodeConfig::default().pull_max_mib)]
    pull_max_mib: u64,
    /// Un-acked updates the shared consumer allows across all jobs and nodes (updates are acked
    /// at their round's commit). Jobs whose rounds take more are refused at creation and at
    /// start. The last node started sets it for all.
    #[arg(long, default_value_t = NodeConfig::default().max_ack_pending)]
    max_ack_pending: u64,
    /// Replicas of every JetStream stream and bucket Shoal creates (1-5): 1 on a single
    /// nats-server, 3 on a JetStream cluster of three or more servers (survives the loss of
    /// one). Existing streams and buckets are brought to it when the node starts; job upload
    /// streams take the updates stream's.
    #[arg(long, env = "SHOAL_JS_REPLICAS", default_value_t = NodeConfig::default().jetstream_replicas)]
    js_replicas: u32,
    /// Byte limit of the updates stream (MiB; default: none). When it is full, clients' publishes
    /// fail until rounds commit and their updates are acked.
    #[arg(long, env = "SHOAL_UPDATES_MAX_MIB")]
    updates_max_mib: Option<u64>,
    /// Byte limit of the models bucket (MiB; default: none). Each job keeps its last few
    /// versions.
    #[arg(long, env = "SHOAL_MODELS_MAX_MIB")]
    models_max_mib: Option<u64>,
    /// Byte limit of the node-to-node transfers bucket (MiB; default: none).
    #[arg(long, env = "SHOAL_TRANSFERS_MAX_MIB")]
    transfers_max_mib: Option<u64>,
    /// How long the top (or a middle) waits for the partials of a round before asking again, in
    /// milliseconds (at least 100).
    #[arg(long, default_value_t = NodeConfig::default().collect_timeout_ms)]
    collect_timeout_ms: u64,
    /// Fold a round's updates only when it closes instead of as they arrive (the "wait for the
    /// whole cohort" baseline; for measurements, not production).
    #[arg(long)]
    lazy_aggregation: bool,
    /// Fault injection, for backpressure tests: aggregators sleep this long per update they
    /// fold, in milliseconds (0: off; not for production).
    #[arg(long, default_value_t = NodeConfig::default().fold_delay_ms)]
    fold_delay_ms: u64,
    /// Fold-while-staging: an update sent on the upload path whose model is at least this many
    /// MiB is read twice: once to check it (digest, schema, NaN/Inf), then folded piece by piece
    /// as its chunks arrive, so the node holds the f64 accumulator plus a few MiB instead of the
    /// accumulator plus the whole update. `0`: every upload; `off`: never (stage whole, then
    /// fold). Only in `shoal node` (not with function hosts in their own processes), for
    /// synchronous FedAvg-like strategies (FedAvg, FedAdam, FedYogi, FedAdagrad, FedAvgM) over
    /// f32 tensors; other updates are staged whole.
    #[arg(long, default_value = "16", value_parser = parse_mib_or_off)]
    fold_while_staging_min_mib: MibOrOff,
    /// Most running jobs this node serves at once (default: no limit). A job beyond it waits
    /// for a free slot (logged, counted in shoal_jobs_refused_total); meanwhile its updates go
    /// to a node that serves it, or are refused as node_at_capacity.
    #[arg(long, env = "SHOAL_MAX_JOBS", value_parser = clap::value_parser!(u32).range(1..))]
    max_jobs: Option<u32>,
    #[command(flatten)]
    http: HttpArgs,
    /// How the gateway hands descriptors to the function host: `in-process` (an actix
    /// message), or `loopback-tcp`, the descriptor channel of separate gateway and
    /// function-host processes run inside this one (read-only slot mappings, release records;
    /// for tests and measurements of that path).
    #[arg(long, value_enum, default_value_t = ChannelArg::InProcess)]
    descriptor_channel: ChannelArg,
    #[command(flatten)]
    ebpf: EbpfArgs,
}

/// The eBPF sidecar flags of a process that owns descriptor listeners (`shoal node` with a TCP
/// descriptor channel; the gateway).
#[derive(Debug, Clone, Args)]
pub struct EbpfArgs {
    /// The eBPF sidecar on TCP descriptor channels (sock_ops + SK_MSG redirect, per-function
    /// counters): `auto` loads it when this process may (root or CAP_BPF + CAP_NET_ADMIN, cgroup
    /// v2) and otherwise warns once and uses plain TCP; `required` fails to start instead;
    /// `off` never loads it. Kill switch at run time: SIGUSR1 turns redirect off, SIGUSR2 on.
    #[arg(long, env = "SHOAL_EBPF", default_value_t = shoal_ebpf::EbpfMode::Auto)]
    pub ebpf: shoal_ebpf::EbpfMode,
    /// The cgroup v2 directory the sock_ops program attaches to (default: the cgroup this
    /// process runs in, under the cgroup2 mount). The descriptor sockets must be created in it
    /// or below.
    #[arg(long, env = "SHOAL_EBPF_CGROUP")]
    pub ebpf_cgroup: Option<PathBuf>,
}

impl EbpfArgs {
    /// The data-plane configuration these flags ask for.
    pub fn config(&self) -> shoal_runtime::dataplane::DataplaneConfig {
        shoal_runtime::dataplane::DataplaneConfig {
            ebpf: self.ebpf,
            cgroup: self.ebpf_cgroup.clone(),
            ..Default::default()
        }
    }
}

/// `shoal gateway` flags: every `shoal node` flag (`--descriptor-channel` aside: the gateway
/// always uses the channel) and who starts the function hosts.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Who starts function hosts: `spawn` (this gateway, on a job's first update; stopped after
    /// --host-idle-timeout-ms) or `external` (the operator's pods, which register here).
    #[arg(long, value_enum, env = "SHOAL_FUNCTION_HOSTS", default_value_t = HostsArg::Spawn)]
    function_hosts: HostsArg,
    /// Address of the descriptor channel function hosts connect to (port 0: a free one; hosts
    /// started without --gateway ask for it over NATS).
    #[arg(long, env = "SHOAL_CHANNEL_LISTEN", default_value = "127.0.0.1:0")]
    channel_listen: std::net::SocketAddr,
    /// Stop a spawned function host after this long without work, in milliseconds (scale to
    /// zero; at least 1).
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    host_idle_timeout_ms: u64,
    /// How long an update waits for a function host (a spawned one to connect, an external one
    /// to register) before it is handed back to JetStream, in milliseconds (at least 1).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    host_wait_ms: u64,
    /// How long a harvest waits for a function host's answer before the host is abandoned as
    /// hung (killed if spawned; what it held goes back to JetStream), in milliseconds (default:
    /// half the collect timeout, so the top's collection is still answered).
    #[arg(long)]
    host_harvest_timeout_ms: Option<u64>,
}

/// `--function-hosts` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HostsArg {
    /// The gateway spawns them.
    Spawn,
    /// Someone else starts them.
    External,
}

/// `shoal function-host` flags (the operator's pod template passes --node-id, --job,
/// --nats-url, --shm-dir and --http).
#[derive(Debug, Args)]
pub struct FunctionHostArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The node's id (names its shared-memory directory).
    #[arg(long, env = "SHOAL_NODE_ID", default_value_t = NodeConfig::default().node_id.to_string())]
    node_id: String,
    /// Root of the shared-memory directories (the gateway's).
    #[arg(long, env = "SHOAL_SHM_DIR", default_value_os_t = NodeConfig::default().shm_dir)]
    shm_dir: PathBuf,
    /// The job this host serves (default: any the gateway gives it).
    #[arg(long, env = "SHOAL_JOB")]
    job: Option<String>,
    /// This host's function id (default: its process id).
    #[arg(long, env = "SHOAL_FUNCTION_ID")]
    function_id: Option<u32>,
    /// The gateway's descriptor channel (default: ask the node's gateway over NATS).
    #[arg(long, env = "SHOAL_GATEWAY")]
    gateway: Option<std::net::SocketAddr>,
    /// Exit when the channel ends instead of reconnecting (hosts the gateway spawns).
    #[arg(long)]
    exit_on_disconnect: bool,
    /// Stop aggregators idle this long, in milliseconds.
    #[arg(long, default_value_t = NodeConfig::default().idle_timeout_ms)]
    idle_timeout_ms: u64,
    /// Fold only when a round closes (see `shoal node --lazy-aggregation`).
    #[arg(long)]
    lazy_aggregation: bool,
    /// Fault injection: sleep this long per update folded, in milliseconds.
    #[arg(long, default_value_t = NodeConfig::default().fold_delay_ms)]
    fold_delay_ms: u64,
    /// Address of the HTTP listener serving /metrics, /healthz and /readyz (`off`: none).
    #[arg(long = "http", env = "SHOAL_HTTP", default_value = "0.0.0.0:9465", value_parser = parse_http_addr)]
    http: HttpAddr,
}

/// `--descriptor-channel` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChannelArg {
    /// An actix message in this process.
    InProcess,
    /// The inter-process descriptor channel over loopback TCP.
    LoopbackTcp,
}

impl From<ChannelArg> for node::DescriptorChannel {
    fn from(c: ChannelArg) -> Self {
        match c {
            ChannelArg::InProcess => node::DescriptorChannel::InProcess,
            ChannelArg::LoopbackTcp => node::DescriptorChannel::LoopbackTcp,
        }
    }
}

/// The HTTP listener flag of every long-running process (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address of the HTTP listener serving /metrics, /healthz and /readyz (`off`: none).
    /// The default binds every interface so that Kubernetes probes reach it; port 9464 for a
    /// node or gateway, 9465 for a function host (the operator's pod template). Two nodes on
    /// one machine need distinct ports (`127.0.0.1:0` picks a free one and logs it).
    #[arg(long = "http", env = "SHOAL_HTTP", default_value = "0.0.0.0:9464", value_parser = parse_http_addr)]
    pub http: HttpAddr,
}

/// Where a process serves HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAddr {
    /// No HTTP listener.
    Off,
    /// Listen on this address.
    On(std::net::SocketAddr),
}

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr::Off);
    }
    s.parse().map(HttpAddr::On).map_err(|e| format!("{e}: expected <ip>:<port> or `off`"))
}

impl HttpArgs {
    /// Binds the listener (see [`start_http`]).
    async fn start(
        &self,
        process: &'static str,
        cancel: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Probe> {
        start_http(self.http, process, cancel).await
    }
}

/// Binds the HTTP listener (before anything else starts, so a bad address fails at once) and
/// serves it until `cancel`; the probe the process reports to.
async fn start_http(
    http: HttpAddr,
    process: &'static str,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Probe> {
    let probe = Probe::new("start-up");
    if let HttpAddr::On(addr) = http {
        let listener = HttpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr(), process, "HTTP listening (/metrics, /healthz, /readyz)");
        tokio::spawn(listener.serve(probe.clone(), cancel));
    }
    Ok(probe)
}

/// A size in MiB, or `off`.
#[derive(Debug, Clone, Copy)]
struct MibOrOff(Option<u64>);

fn parse_mib_or_off(s: &str) -> Result<MibOrOff, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MibOrOff(None));
    }
    s.parse::<u64>()
        .map(|m| MibOrOff(Some(m)))
        .map_err(|_| format!("{s:?} is neither a size in MiB nor `off`"))
}

impl NodeArgs {
    /// The node's configuration from the flags (validated when the node starts).
    fn config(&self) -> anyhow::Result<NodeConfig> {
        Ok(NodeConfig {
            node_id: NodeId::new(&self.node_id)?,
            nats_url: self.nats.nats_url.clone(),
            prefix: self.nats.prefix.clone(),
            shm_dir: self.shm_dir.clone(),
            shm_budget_mib: self.shm_budget_mib,
            ack_wait_ms: self.ack_wait_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            collect_timeout_ms: self.collect_timeout_ms,
            pull_batch: self.pull_batch,
            pull_max_mib: self.pull_max_mib,
            max_ack_pending: self.max_ack_pending,
            jetstream_replicas: self.js_replicas,
            updates_max_mib: self.updates_max_mib,
            models_max_mib: self.models_max_mib,
            transfers_max_mib: self.transfers_max_mib,
            max_jobs: self.max_jobs,
            lazy_aggregation: self.lazy_aggregation,
            fold_delay_ms: self.fold_delay_ms,
            fold_while_staging_min_mib: self.fold_while_staging_min_mib.0,
            timings: Default::default(),
        })
    }
}

/// `shoal model ...`
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write one committed model version of a job to a safetensors file.
    ///
    /// The model is read chunk by chunk (with a progress bar on a terminal) and its size and
    /// SHA-256 digest are checked against the object store's record before the file appears.
    /// Only the client's least permissions are needed.
    ///
    /// Exit codes: 0 written; 75 the version is not committed yet (retry later, or pass
    /// --wait-secs); 1 any other error (unknown job, a pruned version, ...).
    #[command(after_help = "Examples:
  shoal model get --job mnist -o mnist.safetensors                # the latest committed version
  shoal model get --job mnist --version 3 -o mnist-v3.safetensors
  shoal model get --job mnist --version 10 --wait-secs 600 -o final.safetensors
  shoal model get --job mnist -o - | python inspect.py            # to stdout")]
    Get(crate::jobs::ModelGetArgs),
}

/// `shoal job ...`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create a job from a JSON spec (see README for the format).
    #[command(after_help = "Examples:
  shoal job create --spec job.json                                # initial model: zeros
  shoal job create --spec job.json --initial pretrained.safetensors")]
    Create {
        /// NATS connection.
        #[command(flatten)]
        nats: NatsArgs,
        /// JSON job spec.
        #[arg(long)]
        spec: PathBuf,
        /// Initial model (safetensors); zeros when omitted.
        #[arg(long)]
        initial: Option<PathBuf>,
    },
    /// List every job: phase, round, model version, strategy and how its last round ended.
    #[command(after_help = "Examples:
  shoal job list
  shoal job list --json | jq -r '.[] | select(.phase == \"running\") | .job'")]
    List(crate::jobs::ListArgs),
    /// Show a job's state: phase, the open round's updates received (as the serving nodes
    /// report them) against the cohort, its deadline, the model version and its object, how the
    /// last round ended, and which nodes serve the job.
    ///
    /// Exit codes: 0 running, finished or cancelled; 3 failed (the reason is printed); 1 an
    /// error (unknown job, no connection).
    #[command(after_help = "Examples:
  shoal job status mnist
  shoal job status mnist --json | jq .received")]
    Status(crate::jobs::StatusArgs),
    /// Cancel a running job: no round opens or commits after this; the updates of the open
    /// round are refused as late_update. Its models stay readable (`shoal model get`).
    #[command(after_help = "Examples:
  shoal job cancel mnist
  shoal job cancel mnist --reason \"wrong learning rate\"")]
    Cancel(crate::jobs::CancelArgs),
    /// Delete a job and free its id: its models, spec, state (with history), top lease, strategy
    /// state, update claims, queued updates and its upload stream `UPLOADS_<job>`. A running
    /// job is cancelled first and the command waits until no node serves it. Asks for
    /// confirmation unless --yes.
    #[command(after_help = "Examples:
  shoal job delete mnist                  # asks: Delete? [y/N]
  shoal job delete mnist --yes            # for scripts
  shoal job delete mnist --yes && shoal job create --spec job.json   # start over under the same id")]
    Delete(crate::jobs::DeleteArgs),
}

/// Ends the command with this exit code; whatever it had to say is already printed.
#[derive(Debug, thiserror::Error)]
#[error("exit code {0}")]
pub struct Exit(pub u8);

/// `shoal client` flags.
#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Job id.
    #[arg(long)]
    job: String,
    /// This client's id.
    #[arg(long)]
    client_id: String,
    /// The update's tensors (safetensors file).
    #[arg(long)]
    update: PathBuf,
    /// Local training examples behind the update (its FedAvg weight).
    #[arg(long)]
    num_examples: u64,
    /// What the update holds: the trained parameters, or their delta from the base model (the
    /// job spec's `update_kind` says which the job takes).
    #[arg(long, value_enum, default_value_t = KindArg::Parameters)]
    kind: KindArg,
    /// Always take the upload path (chunks on the job's upload stream), even for an update
    /// small enough to go inline. `--object-store` is the old name.
    #[arg(long, alias = "object-store")]
    force_upload: bool,
    /// Wait for the round to close and print its outcome; says every 5 s on stderr what it
    /// waits for (the round and its deadline). Exits non-zero if the node refuses the update
    /// (the reason is printed) or the round closes without a model.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (at least 1).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Without --wait: how long to listen for an immediate refusal by the node (a second
    /// update for the same round is refused as duplicate), in milliseconds.
    #[arg(long, default_value_t = 1500)]
    linger_ms: u64,
}

/// `shoal client --kind`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// The trained parameters.
    Parameters,
    /// Trained parameters minus the base model.
    Delta,
}

impl From<KindArg> for UpdateKind {
    fn from(k: KindArg) -> UpdateKind {
        match k {
            KindArg::Parameters => UpdateKind::Parameters,
            KindArg::Delta => UpdateKind::Delta,
        }
    }
}

/// Runs the parsed command (inside an actix system).
///
/// # Errors
/// Whatever the command fails with, with context for the user.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(a) => {
            let channel = a.descriptor_channel.into();
            run_node(a, channel, "node").await
        }
        Command::Gateway(a) => run_gateway(a).await,
        Command::FunctionHost(a) => run_function_host(a).await,
        Command::Job(JobCommand::Create { nats, spec, initial }) => {
            job_create(&nats, &spec, initial.as_deref()).await
        }
        Command::Job(JobCommand::List(a)) => crate::jobs::list(a).await,
        Command::Job(JobCommand::Status(a)) => crate::jobs::status(a).await,
        Command::Job(JobCommand::Cancel(a)) => crate::jobs::cancel(a).await,
        Command::Job(JobCommand::Delete(a)) => crate::jobs::delete(a).await,
        Command::Model(ModelCommand::Get(a)) => crate::jobs::model_get(a).await,
        Command::Client(a) => run_client(a).await,
        Command::Demo(a) => crate::demo::run(a).await,
        Command::Auth(AuthCommand::NatsConfig(a)) => {
            print!("{}", nats_config(&a)?);
            Ok(())
        }
        Command::Bench(BenchCommand::Hierarchy(a)) => crate::bench::hierarchy(a).await,
        Command::Bench(BenchCommand::Memory(a)) => crate::bench_memory::memory(a).await,
        Command::Bench(BenchCommand::Dataplane(a)) => crate::bench_dataplane::dataplane(a).await,
        Command::Bench(BenchCommand::Ingest(a)) => crate::bench_ingest::ingest(a).await,
        Command::Bench(BenchCommand::Scale(a)) => crate::bench_scale::scale(a).await,
    }
}

/// `shoal gateway`: a node whose aggregators run in function-host processes.
async fn run_gateway(a: GatewayArgs) -> anyhow::Result<()> {
    let hosts = match a.function_hosts {
        HostsArg::External => shoal_runtime::host::pool::Hosts::External,
        HostsArg::Spawn => {
            let n = &a.node;
            let program =
                std::env::current_exe().context("finding this executable to spawn function hosts")?;
            let mut args: Vec<std::ffi::OsString> = vec!["function-host".into()];
            let mut flag = |k: &str, v: std::ffi::OsString| {
                args.push(format!("--{k}").into());
                args.push(v);
            };
            flag("nats-url", n.nats.nats_url.clone().into());
            flag("prefix", n.nats.prefix.clone().into());
            flag("node-id", n.node_id.clone().into());
            flag("shm-dir", n.shm_dir.clone().into());
            flag("idle-timeout-ms", n.idle_timeout_ms.to_string().into());
            flag("fold-delay-ms", n.fold_delay_ms.to_string().into());
            // Several hosts run on one node: no fixed HTTP port each (the gateway's is the node's).
            flag("http", "off".into());
            let files = [
                ("nats-creds", &n.nats.nats_creds),
                ("nats-nkey", &n.nats.nats_nkey),
                ("nats-ca", &n.nats.nats_ca),
                ("nats-cert", &n.nats.nats_cert),
                ("nats-key", &n.nats.nats_key),
            ];
            for (k, v) in files {
                if let Some(p) = v {
                    flag(k, p.clone().into());
                }
            }
            if let Some(u) = &n.nats.nats_user {
                flag("nats-user", u.clone().into());
            }
            args.push("--exit-on-disconnect".into());
            if n.lazy_aggregation {
                args.push("--lazy-aggregation".into());
            }
            if n.nats.nats_require_tls {
                args.push("--nats-require-tls".into());
            }
            // Secrets go through the environment, never the command line (`ps`).
            let mut envs: Vec<(std::ffi::OsString, std::ffi::OsString)> = Vec::new();
            if let Some(p) = &n.nats.nats_password {
                envs.push(("SHOAL_NATS_PASSWORD".into(), p.expose().into()));
            }
            if let Some(t) = &n.nats.nats_token {
                envs.push(("SHOAL_NATS_TOKEN".into(), t.expose().into()));
            }
            shoal_runtime::host::pool::Hosts::Spawn(shoal_runtime::host::pool::SpawnConfig {
                program,
                args,
                envs,
                idle_timeout: Duration::from_millis(a.host_idle_timeout_ms),
            })
        }
    };
    let channel = node::DescriptorChannel::Split(node::SplitOptions {
        listen: a.channel_listen,
        hosts,
        wait_for_host: Duration::from_millis(a.host_wait_ms),
        harvest_timeout: a.host_harvest_timeout_ms.map(Duration::from_millis),
    });
    run_node(a.node, channel, "gateway").await
}

/// `shoal function-host`: runs until SIGINT or SIGTERM (or, with --exit-on-disconnect, until
/// the gateway's channel ends).
async fn run_function_host(a: FunctionHostArgs) -> anyhow::Result<()> {
    let node_id = NodeId::new(&a.node_id)?;
    let job = a.job.as_deref().map(JobId::new).transpose()?;
    let mut nats = a.nats.options("shoal-function-host")?;
    nats.jetstream = None;
    shoal_runtime::staging::install_sigbus_guard()?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let probe = start_http(a.http, "function-host", cancel.clone()).await?;
    let defaults = NodeConfig::default();
    let config = NodeConfig {
        idle_timeout_ms: a.idle_timeout_ms,
        lazy_aggregation: a.lazy_aggregation,
        fold_delay_ms: a.fold_delay_ms,
        ..defaults
    };
    let process = shoal_runtime::host::process::HostProcess {
        node_dir: a.shm_dir.join(node_id.as_str()),
        node: node_id,
        gateway: a.gateway,
        function: shoal_proto::FunctionId(a.function_id.unwrap_or_else(std::process::id)),
        job,
        nats,
        host: node::host_config(&config),
        timings: config.timings.clone(),
        exit_on_disconnect: a.exit_on_disconnect,
        probe,
    };
    let run = shoal_runtime::host::process::run(process, cancel.clone());
    tokio::select! {
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            cancel.cancel();
            Ok(())
        }
        r = run => r.context("function host"),
    }
}

/// `shoal node` (and `shoal gateway`): runs until SIGINT or SIGTERM, then shuts down cleanly.
async fn run_node(
    a: NodeArgs,
    channel: node::DescriptorChannel,
    process: &'static str,
) -> anyhow::Result<()> {
    let config = a.config()?;
    config.validate().map_err(|e| match e.field.strip_prefix("timings.") {
        Some(timing) => anyhow::anyhow!("invalid node configuration: timing {timing}: {}", e.detail),
        None => {
            let flag = match e.field {
                "jetstream_replicas" => "js-replicas".to_string(),
                other => other.replace('_', "-"),
            };
            anyhow::anyhow!("invalid flag --{flag}: {}", e.detail)
        }
    })?;
    if a.ebpf.ebpf == shoal_ebpf::EbpfMode::Required {
        match &channel {
            node::DescriptorChannel::InProcess => anyhow::bail!(
                "--ebpf required needs a TCP descriptor channel (--descriptor-channel loopback-tcp): \
                 in process, descriptors never touch a socket"
            ),
            node::DescriptorChannel::Split(_) | node::DescriptorChannel::LoopbackTcp => {}
        }
    }
    let nats = a.nats.options("shoal-node")?;
    shoal_runtime::staging::install_sigbus_guard()?;
    let http_stop = tokio_util::sync::CancellationToken::new();
    let _stop_http = http_stop.clone().drop_guard();
    let probe = a.http.start(process, http_stop).await?;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let opts = NodeOptions {
            config: config.clone(),
            nats: nats.clone(),
            plugins: None,
            probe: probe.clone(),
            channel: channel.clone(),
            dataplane: a.ebpf.config(),
        };
        let handle = node::start(opts).await.context("starting the node")?;
        tokio::select! {
            () = &mut signal => {
                tracing::info!("shutting down");
                handle.shutdown().await;
                return Ok(());
            }
            why = handle.stopped() => {
                handle.shutdown().await;
                match why {
                    // Everything it held was dropped and goes back to JetStream: a new instance
                    // of the node starts clean and competes again.
                    node::Stopped::Fenced => {
                        tracing::warn!("the node fenced itself after a pause or partition; starting it again");
                    }
                    node::Stopped::LeaseLost => {
                        anyhow::bail!(
                            "another process took node id {}'s membership lease; this one stops \
                             (two nodes must not share an id)",
                            config.node_id
                        );
                    }
                }
            }
        }
    }
}

/// `shoal job create`.
async fn job_create(
    nats: &NatsArgs,
    spec: &std::path::Path,
    initial: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(spec).with_context(|| format!("reading {}", spec.display()))?;
    let spec: JobSpec = serde_json::from_str(&text).with_context(|| format!("parsing {}", spec.display()))?;
    for w in spec.manifest.statistic_warnings() {
        eprintln!("warning: {w}");
    }
    let admin = shoal_client::Infra::connect(&nats.options("shoal-cli")?).await?;
    let initial = match initial {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(Parameters::from_safetensors(Arc::new(spec.manifest.clone()), &bytes)?)
        }
        None => None,
    };
    shoal_client::jobs::create_job(&admin, &spec, initial.as_ref()).await?;
    println!("job {} created", spec.job);
    Ok(())
}

/// `shoal client`: checks the file against the job's manifest, publishes it for the open round
/// and, with `--wait`, waits for the round's outcome.
async fn run_client(a: ClientArgs) -> anyhow::Result<()> {
    let job = JobId::new(a.job)?;
    let me = ClientId::new(a.client_id)?;
    let mut opts = a.nats.options("shoal-client")?;
    if opts.inbox_prefix.is_none() {
        opts = opts.for_client(&me);
    }
    let client = ShoalClient::connect(&opts).await?;
    let kind = UpdateKind::from(a.kind);
    let timeout = Duration::from_secs(a.timeout_secs);
    // Check the file against the job's manifest before sending it anywhere.
    let spec = client.job_spec(&job).await?;
    // Read at most one byte more than the job accepts: a device or a huge file is refused
    // without reading it whole (`--update /dev/zero` used to read until memory ran out).
    let limit = spec.update_byte_limit();
    let payload = {
        use std::io::Read as _;
        let file =
            std::fs::File::open(&a.update).with_context(|| format!("opening {}", a.update.display()))?;
        let mut buf = Vec::new();
        file.take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", a.update.display()))?;
        anyhow::ensure!(
            buf.len() as u64 <= limit,
            "{} is larger than job {job} accepts ({limit} bytes, its max_update_bytes)",
            a.update.display()
        );
        buf
    };
    if a.num_examples == 0 || a.num_examples > spec.max_num_examples {
        anyhow::bail!(
            "--num-examples {} is outside 1..={} (job {job}'s max_num_examples); the node would refuse it",
            a.num_examples,
            spec.max_num_examples
        );
    }
    anyhow::ensure!(
        kind == spec.update_kind,
        "--kind {} does not match job {job}, which takes {} updates",
        kind.as_str(),
        spec.update_kind.as_str()
    );
    Parameters::from_safetensors(Arc::new(spec.manifest.clone()), &payload)
        .with_context(|| format!("{} does not match job {job}'s model manifest", a.update.display()))?;
    let state = client.wait_for_open_round(&job, shoal_functions::RoundId(1), timeout).await?;
    let mut rejections = client.rejections(&job, &me).await?;
    let via = client
        .publish_update(UpdateRequest {
            job: job.clone(),
            client: me.clone(),
            round: state.round,
            base_version: state.model_version,
            num_examples: a.num_examples,
            kind,
            payload: payload.into(),
            force_upload: a.force_upload,
        })
        .await?;
    let via = match via {
        shoal_client::Transport::Inline => "inline",
        shoal_client::Transport::Upload => "on the upload path",
    };
    println!("published for round {} ({via})", state.round);
    if !a.wait {
        // A refusal the node sends at once (a second update for the round, a wrong shape) is
        // worth a moment's wait: the publish itself cannot tell.
        let linger = tokio::time::sleep(Duration::from_millis(a.linger_ms));
        tokio::select! {
            _ = linger => {}
            Some(m) = futures::StreamExt::next(&mut rejections) => {
                let n: shoal_proto::RejectNotice = shoal_proto::decode("reject notice", &m.payload)?;
                anyhow::bail!("the node refused the update: {}: {}", n.reason, n.detail);
            }
        }
        return Ok(());
    }
    let after = wait_with_progress(&client, &job, state.round, &mut rejections, timeout).await?;
    match after.last_outcome {
        Some(o @ RoundOutcome::Committed { .. }) => println!("round {} closed: {o}", state.round),
        Some(o) => anyhow::bail!("round {} closed without a model: {o}", state.round),
        None => anyhow::bail!("round {} closed without an outcome", state.round),
    }
    if let JobPhase::Failed { reason } = after.phase {
        anyhow::bail!("job failed: {reason}");
    }
    Ok(())
}

/// How often `shoal client --wait` says what it waits for.
const WAIT_REPORT: Duration = Duration::from_secs(5);

/// `shoal client --wait`: waits for the round's outcome (or the node's refusal), saying on
/// stderr what it waits for when it starts and every [`WAIT_REPORT`]: the round, its deadline,
/// and once the deadline has passed, that the round is being closed.
async fn wait_with_progress(
    client: &ShoalClient,
    job: &JobId,
    round: shoal_functions::RoundId,
    rejections: &mut async_nats::Subscriber,
    timeout: Duration,
) -> anyhow::Result<shoal_proto::JobState> {
    let outcome = client.wait_for_outcome(job, round, rejections, timeout);
    tokio::pin!(outcome);
    let mut report = tokio::time::interval(WAIT_REPORT);
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            r = &mut outcome => {
                return r.map_err(|e| match e {
                    shoal_client::Error::Rejected(reason) => {
                        anyhow::anyhow!("the node refused the update: {reason}")
                    }
                    other => other.into(),
                });
            }
            _ = report.tick() => {
                let Ok(s) = client.job_state(job).await else { continue };
                if s.round != round || !s.is_open() {
                    continue;
                }
                let now = crate::jobs::now_ms();
                let when = if s.deadline_at_ms >= now {
                    format!("deadline in {}", crate::jobs::human(s.deadline_at_ms - now))
                } else {
                    format!("deadline passed {} ago; the round is being closed", crate::jobs::human(now - s.deadline_at_ms))
                };
                let waited = started.elapsed();
                if waited < Duration::from_secs(1) {
                    eprintln!("waiting for round {round} of job {job} to close ({when})");
                } else {
                    let waited = crate::jobs::human(waited.as_millis() as u64);
                    eprintln!("waiting for round {round} of job {job} to close ({when}; waited {waited})");
                }
            }
        }
    }
}

/// The text `shoal auth nats-config` prints (and, with --nkeys-dir, the seed files it writes).
fn nats_config(a: &NatsConfigArgs) -> anyhow::Result<String> {
    use shoal_client::auth::{self, UserCredential};
    shoal_proto::subjects::validate_prefix(&a.prefix)
        .map_err(|why| anyhow::anyhow!("invalid flag --prefix: {why}"))?;
    let job = JobId::new(&a.job)?;
    let clients = a.clients.iter().map(ClientId::new).collect::<Result<Vec<_>, _>>()?;
    let mut seeds = Vec::new();
    let users = auth::job_users(&a.prefix, &job, &a.node_user, &clients, |user| match &a.nkeys_dir {
        None => UserCredential::PasswordEnv(auth::password_env_var(user)),
        Some(_) => {
            let pair = nkeys::KeyPair::new_user();
            let public = pair.public_key();
            seeds.push((user.to_owned(), pair));
            UserCredential::Nkey(public)
        }
    })?;
    let mut text = format!(
        "# nats-server authorization for Shoal job {job} (prefix {}), from `shoal auth nats-config`.\n",
        a.prefix
    );
    match &a.nkeys_dir {
        None => {
            text.push_str("# nats-server reads each password from the environment variable named below.\n");
        }
        Some(dir) => {
            write_seeds(dir, &seeds)?;
            text.push_str(&format!(
                "# nkey users; seeds in {} (pass them with --nats-nkey <dir>/<user>.nk).\n",
                dir.display()
            ));
        }
    }
    text.push_str(&auth::authorization_block(&users)?);
    Ok(text)
}

/// Writes `<dir>/<user>.nk` (mode 0600, in a directory created with mode 0700) for each seed.
fn write_seeds(dir: &std::path::Path, seeds: &[(String, nkeys::KeyPair)]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    for (user, pair) in seeds {
        let path = dir.join(format!("{user}.nk"));
        let seed = pair.seed().map_err(|e| anyhow::anyhow!("nkey seed for {user}: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        writeln!(f, "{seed}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// An error and its causes on one line, each cause once: a library error whose message
/// already includes its source's text (`NATS read failed: timed out` caused by `timed out`)
/// does not repeat it.
pub fn error_report(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Sets up `tracing` (env filter `RUST_LOG`, else `default_level`; text or JSON) on stderr.
pub fn init_tracing(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
