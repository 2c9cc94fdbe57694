//! `shoal demo`: a real federated training run, end to end, on one machine.
//!
//! Starts a private `nats-server` (or uses `--nats-url`), starts a node in this process (gateway,
//! shared-memory staging, on-demand aggregator actors, round coordinator), creates a FedAvg job,
//! and runs simulated clients that each hold a Dirichlet(α) non-IID share of the UCI digits
//! training split: every round they fetch the global model from the object store, train a
//! softmax-regression classifier locally ([`crate::sim`]) and publish their parameters over NATS
//! (one client in ten on the upload path, the others inline). After each commit the
//! global model is evaluated on the held-out test split. Finally the same model is trained
//! centrally on the pooled training data for the same number of epochs, and both accuracies are
//! printed as the last two lines (scripts read them).
//!
//! With `--strategy` and `--attack`, a fraction `--byzantine` of the clients attack (sign flip
//! with scaling, Gaussian noise, free riding, label flipping, scaling by 100) and the chosen
//! aggregation strategy defends; `--matrix` runs every strategy against every attack and prints
//! (and writes) a Markdown table of final test accuracies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shoal_functions::asynchronous;
use shoal_functions::bristle::{Candidate, ClassAxis, ClassEvaluator, EvaluatorError, IntegratorConfig};
use shoal_functions::factory::StrategyPlugins;
use shoal_functions::server_opt::ServerOptimizerSpec;
use shoal_functions::spec::{FedFixClient, SpecMode};
use shoal_functions::tensor::encode_safetensors;
use shoal_functions::tensor::TensorData;
use shoal_functions::{
    ClientId, DType, JobId, JobSpec, ModelManifest, ModelVersion, NodeId, Parameters, RoundId, RoundPolicy,
    StrategySpec, TensorSpec, UpdateKind,
};

use crate::sim::{self, Dataset, LocalTraining, SoftmaxParams};
use shoal_client::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_natsd::NatsServer;
use shoal_proto::config::NodeConfig;
use shoal_proto::RoundOutcome;
use shoal_runtime::cluster::top::PluginFactory;
use shoal_runtime::node::{self, NodeOptions};

/// Attacks a Byzantine client can mount. Each is applied to the client's honest delta
/// `d = local − global` (label flipping changes the training data instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// No attack.
    None,
    /// Sends `−10 · d` (sign flip with scaling).
    SignFlip,
    /// Sends Gaussian noise N(0, 1) per coordinate instead of a delta.
    Gaussian,
    /// Sends a random vector U(−1, 1) per coordinate without training (free rider).
    FreeRider,
    /// Trains honestly on flipped labels (y → 9 − y).
    LabelFlip,
    /// Sends `100 · d`.
    Scale,
}

impl Attack {
    const ALL: [Attack; 6] = [
        Attack::None,
        Attack::SignFlip,
        Attack::Gaussian,
        Attack::FreeRider,
        Attack::LabelFlip,
        Attack::Scale,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::None => "none",
            Attack::SignFlip => "sign-flip",
            Attack::Gaussian => "gaussian",
            Attack::FreeRider => "free-rider",
            Attack::LabelFlip => "label-flip",
            Attack::Scale => "scale",
        }
    }
}

/// `shoal demo` flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Use this NATS server (JetStream enabled) instead of starting a private nats-server.
    #[arg(long, env = "SHOAL_NATS_URL")]
    pub nats_url: Option<String>,
    /// Simulated clients.
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Nodes, all in this process (distinct node ids and shared-memory directories). With more
    /// than one, the run is made first on one node, then again on all of them (the work queue
    /// spreads the updates), and both accuracies are printed: RFFL and Bristle run the
    /// two-phase protocol across the nodes and should give the same accuracy.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Rounds.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Dirichlet concentration of the non-IID split (smaller = more skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Seed of the split, of local training and of the attacks.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Round deadline in seconds.
    #[arg(long, default_value_t = 60)]
    pub deadline_secs: u64,
    /// Root of the node's shared-memory directory.
    #[arg(long, default_value = "/dev/shm/shoal")]
    pub shm_dir: std::path::PathBuf,
    /// Aggregation strategy: FedAvg, FedAvg with a server optimizer, FedBuff/FedFix (synchronous
    /// rounds), RFFL, Bristle, or a robust rule.
    #[arg(long, default_value = "fedavg", value_parser = clap::builder::PossibleValuesParser::new(STRATEGIES))]
    pub strategy: String,
    /// Attack mounted by the Byzantine clients.
    #[arg(long, value_enum, default_value_t = Attack::None)]
    pub attack: Attack,
    /// Fraction of clients that attack (when `--attack` is not `none`).
    #[arg(long, default_value_t = 0.2)]
    pub byzantine: f64,
    /// Run every strategy against every attack and print a table of final accuracies.
    #[arg(long)]
    pub matrix: bool,
    /// Local epochs per round (default: the simulator's tuned setting).
    #[arg(long)]
    pub local_epochs: Option<usize>,
    /// Local mini-batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Local SGD learning rate.
    #[arg(long)]
    pub learning_rate: Option<f32>,
    /// Where `--matrix` writes its Markdown table.
    #[arg(long, default_value = "docs/robustness-matrix.md")]
    pub matrix_out: std::path::PathBuf,
}

impl DemoArgs {
    fn local_training(&self) -> LocalTraining {
        let d = LocalTraining::default();
        LocalTraining {
            epochs: self.local_epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
            ..d
        }
    }
}

/// Strategy names accepted by `--strategy`.
pub const STRATEGIES: [&str; 14] = [
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedbuff",
    "fedfix",
    "rffl",
    "bristle",
    "median",
    "trimmed-mean",
    "krum",
    "multi-krum",
    "bulyan",
];

const TEST_FRACTION: f64 = 0.2;
const VALIDATION_FRACTION: f64 = 0.07;
const TEST_SPLIT_SEED: u64 = 7;
const MIN_PER_CLIENT: usize = 10;

fn manifest() -> anyhow::Result<Arc<ModelManifest>> {
    Ok(Arc::new(ModelManifest::new(vec![
        TensorSpec::new("fc.weight", DType::F32, vec![Dataset::NUM_CLASSES, Dataset::NUM_FEATURES]),
        TensorSpec::new("fc.bias", DType::F32, vec![Dataset::NUM_CLASSES]),
    ])?))
}

fn to_params(p: &Parameters) -> SoftmaxParams {
    let f = |i: usize| p.tensor_f64(i).into_iter().map(|v| v as f32).collect();
    SoftmaxParams { weight: f(0), bias: f(1) }
}

/// How a strategy name becomes a job: strategy, optional server optimizer, and the update kind
/// its clients send.
struct StrategyChoice {
    strategy: StrategySpec,
    optimizer: Option<ServerOptimizerSpec>,
    kind: UpdateKind,
}

/// The job configuration of strategy `name` for the demo's clients (shard sizes `sizes`), of
/// which `f` are assumed Byzantine (from `--byzantine`, whatever the attack, so every column of
/// the matrix runs the same configuration).
fn strategy_choice(name: &str, sizes: &[usize], f: usize) -> anyhow::Result<StrategyChoice> {
    let n = sizes.len();
    let plain = |strategy| StrategyChoice { strategy, optimizer: None, kind: UpdateKind::Parameters };
    let fedavg = StrategySpec::Fedavg { server_learning_rate: 1.0 };
    let optimized = |optimizer| StrategyChoice {
        strategy: StrategySpec::Fedavg { server_learning_rate: 1.0 },
        optimizer: Some(optimizer),
        kind: UpdateKind::Parameters,
    };
    Ok(match name {
        "fedavg" => plain(fedavg),
        "fedavgm" => optimized(ServerOptimizerSpec::fedavgm()),
        "fedadam" => optimized(ServerOptimizerSpec::fedadam()),
        "fedyogi" => optimized(ServerOptimizerSpec::fedyogi()),
        "fedadagrad" => optimized(ServerOptimizerSpec::fedadagrad()),
        "fedbuff" => {
            // Synchronous rounds: every update has staleness 0 and the buffer is the cohort.
            let mut fb = asynchronous::FedBuff::new(n as u32);
            fb.example_weight = asynchronous::ExampleWeight::NumExamples;
            fb.normalisation = asynchronous::FedBuffNormalisation::ByWeightSum;
            StrategyChoice {
                strategy: StrategySpec::Fedbuff(fb.into()),
                optimizer: None,
                kind: UpdateKind::Delta,
            }
        }
        "fedfix" => {
            // Every client returns within the period (Δt ≥ max τ): FedFix's weights are the
            // importances p_i = n_i / Σn.
            let total: usize = sizes.iter().sum();
            let clients = sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    Ok(FedFixClient {
                        client: ClientId::new(format!("client-{i:02}"))?,
                        compute_ticks: 1,
                        importance: Some(s as f64 / total as f64),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            StrategyChoice {
                strategy: StrategySpec::Fedfix { period_ticks: 1, server_learning_rate: 1.0, clients },
                optimizer: None,
                kind: UpdateKind::Delta,
            }
        }
        "rffl" => StrategyChoice {
            strategy: StrategySpec::Rffl {
                gamma: RFFL_GAMMA,
                alpha: 0.95,
                rth: 1.0 / 3.0,
                warmup_rounds: 10,
                altruism_degree: None,
                sparsify: true,
                mode: SpecMode::ReferenceCode,
            },
            optimizer: None,
            kind: UpdateKind::Delta,
        },
        "bristle" => {
            plain(StrategySpec::Bristle { alpha: 0.4, beta: n / 2, seed: 1, mode: SpecMode::ReferenceCode })
        }
        "median" => plain(StrategySpec::Median),
        "trimmed-mean" => plain(StrategySpec::TrimmedMean { beta: 0.2 }),
        "krum" => plain(StrategySpec::Krum { byzantine: f }),
        "multi-krum" => plain(StrategySpec::MultiKrum { byzantine: f, keep: n - f }),
        "bulyan" => plain(StrategySpec::Bulyan { byzantine: f }),
        other => anyhow::bail!("unknown strategy {other:?}; one of {STRATEGIES:?}"),
    })
}

/// RFFL's upload clip norm Γ for this task (the reference code uses 0.5 for MNIST).
const RFFL_GAMMA: f64 = 0.5;

/// The demo's strategy plug-ins: Bristle's integrator scores softmax models per class on the
/// server-held validation split.
#[derive(Debug)]
struct DemoPlugins {
    validation: Arc<Dataset>,
}

impl PluginFactory for DemoPlugins {
    fn plugins(&self, spec: &JobSpec) -> StrategyPlugins {
        match spec.strategy {
            StrategySpec::Bristle { .. } => StrategyPlugins {
                bristle_integrator: Some((
                    IntegratorConfig::new("fc.weight", ClassAxis::Rows),
                    Box::new(SoftmaxEvaluator { validation: Arc::clone(&self.validation) }),
                )),
            },
            _ => StrategyPlugins::default(),
        }
    }
}

/// Per-class F1 of a softmax-regression candidate on the validation split.
#[derive(Debug)]
struct SoftmaxEvaluator {
    validation: Arc<Dataset>,
}

impl ClassEvaluator for SoftmaxEvaluator {
    fn class_f1(&mut self, candidate: &Candidate<'_>) -> Result<Vec<f64>, EvaluatorError> {
        let f32s = |i: usize| match candidate.tensor(i) {
            Some(TensorData::F32(x)) => Ok(x.to_vec()),
            _ => Err(EvaluatorError::from("candidate tensors are not the demo's f32 softmax model")),
        };
        let params = SoftmaxParams { weight: f32s(0)?, bias: f32s(1)? };
        Ok(sim::class_f1(&params, &self.validation))
    }
}

/// What every experiment of one demo run shares.
struct Env {
    client: ShoalClient,
    admin: shoal_client::Infra,
    m: Arc<ModelManifest>,
    train_set: Arc<Dataset>,
    test_set: Arc<Dataset>,
    shards: Vec<Arc<Dataset>>,
}

/// Runs the demo.
///
/// # Errors
/// No nats-server binary (with an install hint), NATS or node failures, a failed round.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.clients >= 1 && a.rounds >= 1, "--clients and --rounds must be at least 1");
    anyhow::ensure!((0.0..0.5).contains(&a.byzantine), "--byzantine must be in [0, 0.5)");
    let _server;
    let url = match &a.nats_url {
        Some(u) => u.clone(),
        None => {
            let s = tokio::task::spawn_blocking(NatsServer::start)
                .await?
                .context("starting a private nats-server (or pass --nats-url to use a running one)")?;
            let u = s.url();
            eprintln!("started a private nats-server at {u}");
            _server = s;
            u
        }
    };
    let data = Dataset::digits()?;
    let (train_all, test_set) = sim::train_test_split(&data, TEST_FRACTION, TEST_SPLIT_SEED);
    // A small class-balanced validation split (about 10 per class) stays on the server: Bristle's
    // integrator scores candidate models on it. Clients never see it; the test split is only
    // used to report accuracy.
    let (train_set, validation) = sim::train_test_split(&train_all, VALIDATION_FRACTION, TEST_SPLIT_SEED + 1);

    let nats = ConnectOptions { url: url.clone(), ..Default::default() };
    let validation = Arc::new(validation);
    let node_opts = |i: usize| -> anyhow::Result<NodeOptions> {
        let id = if i == 0 {
            format!("demo-{}", std::process::id())
        } else {
            format!("demo-{}-{i}", std::process::id())
        };
        let node_id = NodeId::new(id)?;
        let config = NodeConfig {
            node_id,
            nats_url: url.clone(),
            shm_dir: a.shm_dir.clone(),
            ..NodeConfig::default()
        };
        Ok(NodeOptions {
            config,
            nats: nats.clone(),
            plugins: Some(Arc::new(DemoPlugins { validation: Arc::clone(&validation) })),
            probe: Default::default(),
            channel: Default::default(),
            dataplane: Default::default(),
        })
    };
    let opts = node_opts(0)?;
    let node_dir = a.shm_dir.join(opts.config.node_id.as_str());
    let node = node::start(opts).await.context("starting the node")?;

    let parts = sim::dirichlet_split(&train_set.labels, a.clients, a.alpha, a.seed, MIN_PER_CLIENT);
    let shards: Vec<Arc<Dataset>> = parts.iter().map(|idx| Arc::new(train_set.subset(idx))).collect();
    eprintln!(
        "digits: {} training / {} test examples; {} clients, Dirichlet({}) shard sizes {:?}",
        train_set.len(),
        test_set.len(),
        a.clients,
        a.alpha,
        shards.iter().map(|s| s.len()).collect::<Vec<_>>()
    );
    let admin = shoal_client::Infra::connect(&nats).await?;
    let env = Env {
        client: ShoalClient::new(admin.connection()),
        admin,
        m: manifest()?,
        train_set: Arc::new(train_set),
        test_set: Arc::new(test_set),
        shards,
    };

    let mut extra = Vec::new();
    let result = if a.matrix {
        run_matrix(&env, &a).await
    } else if a.nodes > 1 {
        run_on_nodes(&env, &a, &mut extra, node_opts).await
    } else {
        run_single(&env, &a).await
    };
    for n in extra {
        let dir = a.shm_dir.join(n.0.as_str());
        n.1.shutdown().await;
        let _ = std::fs::remove_dir(&dir);
    }
    node.shutdown().await;
    drop(env);
    // The node id is per process: leave no empty directory behind (its segments are gone).
    let _ = std::fs::remove_dir(&node_dir);
    result
}

/// The same run on one node, then on `a.nodes` nodes (the others started in `extra`).
async fn run_on_nodes(
    env: &Env,
    a: &DemoArgs,
    extra: &mut Vec<(NodeId, node::NodeHandle)>,
    node_opts: impl Fn(usize) -> anyhow::Result<NodeOptions>,
) -> anyhow::Result<()> {
    let one = run_experiment(env, a, &a.strategy, a.attack, true).await?;
    for i in 1..a.nodes {
        let opts = node_opts(i)?;
        let id = opts.config.node_id.clone();
        extra.push((id, node::start(opts).await.context("starting a node")?));
    }
    let many = run_experiment(env, a, &a.strategy, a.attack, true).await?;
    println!("accuracy on 1 node: {one:.3}");
    println!("accuracy on {} nodes: {many:.3}", a.nodes);
    Ok(())
}

async fn run_single(env: &Env, a: &DemoArgs) -> anyhow::Result<()> {
    let federated = run_experiment(env, a, &a.strategy, a.attack, true).await?;
    // Centralized baseline: the same model and optimiser on the pooled training data, for the
    // same number of epochs as each client trained in total.
    let local = a.local_training();
    let central_cfg = LocalTraining { epochs: a.rounds as usize * local.epochs, ..local };
    let (train_set, test_set, seed) = (Arc::clone(&env.train_set), Arc::clone(&env.test_set), a.seed);
    let centralized = tokio::task::spawn_blocking(move || {
        let mut p = SoftmaxParams::zeros();
        sim::train(&mut p, &train_set, &central_cfg, &mut ChaCha8Rng::seed_from_u64(seed));
        sim::accuracy(&p, &test_set)
    })
    .await?;
    println!("federated accuracy: {federated:.3}");
    println!("centralized accuracy: {centralized:.3}");
    Ok(())
}

async fn run_matrix(env: &Env, a: &DemoArgs) -> anyhow::Result<()> {
    let attacks: Vec<Attack> = Attack::ALL.to_vec();
    let pb = ProgressBar::new((STRATEGIES.len() * attacks.len()) as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} run {pos}/{len} [{bar:30}] {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut table = format!(
        "# Robustness matrix\n\nFinal test accuracy of `shoal demo` after {} rounds: {} clients, Dirichlet({}) \
         non-IID digits split, seed {}; attacked runs have {:.0}% Byzantine clients. Produced by \
         `cargo run --release -- demo --matrix`.\n\n| strategy |",
        a.rounds,
        a.clients,
        a.alpha,
        a.seed,
        a.byzantine * 100.0
    );
    for at in &attacks {
        table.push_str(&format!(" {} |", at.name()));
    }
    table.push_str("\n|---|");
    table.push_str(&"---|".repeat(attacks.len()));
    table.push('\n');
    for s in STRATEGIES {
        let mut row = format!("| {s} |");
        for &at in &attacks {
            pb.set_message(format!("{s} / {}", at.name()));
            let cell = match run_experiment(env, a, s, at, false).await {
                Ok(acc) => format!(" {acc:.3} |"),
                Err(e) => {
                    pb.suspend(|| eprintln!("{s} / {}: {e:#}", at.name()));
                    " failed |".to_string()
                }
            };
            row.push_str(&cell);
            pb.inc(1);
        }
        pb.suspend(|| println!("{row}"));
        table.push_str(&row);
        table.push('\n');
    }
    pb.finish_and_clear();
    if let Some(dir) = a.matrix_out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.matrix_out, &table).with_context(|| format!("writing {}", a.matrix_out.display()))?;
    println!("{table}");
    eprintln!("matrix written to {}", a.matrix_out.display());
    Ok(())
}

/// Which clients attack: `round(fraction · n)` of them, spread evenly over the client indices.
fn byzantine_clients(n: usize, attack: Attack, fraction: f64) -> Vec<bool> {
    let k = if attack == Attack::None { 0 } else { (fraction * n as f64).round() as usize };
    let mut out = vec![false; n];
    for j in 0..k {
        out[j * n / k.max(1)] = true;
    }
    out
}

/// One federated run; returns the final test accuracy.
async fn run_experiment(
    env: &Env,
    a: &DemoArgs,
    strategy: &str,
    attack: Attack,
    verbose: bool,
) -> anyhow::Result<f64> {
    let byz = byzantine_clients(a.clients, attack, a.byzantine);
    let sizes: Vec<usize> = env.shards.iter().map(|s| s.len()).collect();
    let assumed_byzantine = (a.byzantine * a.clients as f64).round() as usize;
    let choice = strategy_choice(strategy, &sizes, assumed_byzantine)?;
    let kind = choice.kind;
    let job = JobId::new(format!("digits-{}-{}", strategy, shoal_runtime::clock::now_ms()))?;
    let spec = JobSpec {
        job: job.clone(),
        manifest: (*env.m).clone(),
        strategy: choice.strategy,
        round_policy: RoundPolicy::Sync {
            cohort_size: a.clients as u32,
            min_clients: a.clients as u32,
            deadline_ms: a.deadline_secs * 1000,
        },
        update_kind: kind,
        rounds: a.rounds,
        max_num_examples: 1_000_000,
        max_failed_rounds: 3,
        fan_in: 0,
        server_optimizer: choice.optimizer,
        max_update_bytes: None,
        max_clients_per_round: None,
        inline_limit_bytes: None,
        chunk_bytes: None,
        upload_quota_bytes: None,
    };
    let client = &env.client;
    shoal_client::jobs::create_job(&env.admin, &spec, None).await?;
    if verbose {
        eprintln!("job {job} created: {strategy}, {} rounds of {} clients", a.rounds, a.clients);
    }

    let timeout = Duration::from_secs(a.deadline_secs + 30);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, shard) in env.shards.iter().enumerate() {
        let sim = SimClient {
            client: client.clone(),
            job: job.clone(),
            m: Arc::clone(&env.m),
            shard: Arc::clone(shard),
            index: c,
            seed: a.seed,
            timeout,
            kind,
            attack: if byz[c] { attack } else { Attack::None },
            training: a.local_training(),
        };
        tasks.spawn(async move { sim.run().await.with_context(|| format!("simulated client {c}")) });
    }

    let pb = if verbose { ProgressBar::new(a.rounds) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut accuracy = f64::NAN;
    let mut opened = Instant::now();
    // Rounds run until `rounds` models are committed (a failed round commits nothing) or the
    // job fails after `max_failed_rounds` failures in a row.
    for r in 1.. {
        let state = client.wait_for_round_closed(&job, RoundId(r), timeout).await?;
        let secs = opened.elapsed().as_secs_f64();
        opened = Instant::now();
        let line = match &state.last_outcome {
            Some(RoundOutcome::Committed { version, clients, .. }) => {
                let bytes = client.fetch_model(&job, *version).await?;
                let global = Parameters::from_safetensors(Arc::clone(&env.m), &bytes)?;
                accuracy = sim::accuracy(&to_params(&global), &env.test_set);
                format!("round {r:2} | clients {clients:2} | test accuracy {accuracy:.3} | round time {secs:.2} s")
            }
            Some(other) => format!("round {r:2} | {other} | round time {secs:.2} s"),
            None => format!("round {r:2} | closed without an outcome | round time {secs:.2} s"),
        };
        if verbose {
            pb.suspend(|| println!("{line}"));
        }
        if matches!(state.last_outcome, Some(RoundOutcome::Committed { .. })) {
            pb.inc(1);
        }
        if state.phase != shoal_proto::JobPhase::Running {
            break;
        }
    }
    pb.finish_and_clear();
    while let Some(res) = tasks.join_next().await {
        res??;
    }
    Ok(accuracy)
}

/// One simulated client of one experiment.
struct SimClient {
    client: ShoalClient,
    job: JobId,
    m: Arc<ModelManifest>,
    shard: Arc<Dataset>,
    index: usize,
    seed: u64,
    timeout: Duration,
    kind: UpdateKind,
    attack: Attack,
    training: LocalTraining,
}

impl SimClient {
    async fn run(self) -> anyhow::Result<()> {
        let me = ClientId::new(format!("client-{:02}", self.index))?;
        let shard = if self.attack == Attack::LabelFlip {
            let mut d = (*self.shard).clone();
            d.labels.iter_mut().for_each(|y| *y = (Dataset::NUM_CLASSES as u8 - 1) - *y);
            Arc::new(d)
        } else {
            Arc::clone(&self.shard)
        };
        let mut next = RoundId(1);
        loop {
            let state = match self.client.wait_for_open_round(&self.job, next, self.timeout).await {
                Ok(s) => s,
                Err(shoal_client::Error::JobEnded { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let base: ModelVersion = state.model_version;
            let bytes = self.client.fetch_model(&self.job, base).await?;
            let global = Parameters::from_safetensors(Arc::clone(&self.m), &bytes)?;
            let (shard2, round, seed, index, attack, kind, training) = (
                Arc::clone(&shard),
                state.round,
                self.seed,
                self.index,
                self.attack,
                self.kind,
                self.training,
            );
            let m = Arc::clone(&self.m);
            let payload = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
                let g = to_params(&global);
                let mut rng = ChaCha8Rng::seed_from_u64(seed + index as u64 + 1000 * (round.0 - 1));
                let mut local = g.clone();
                if attack != Attack::FreeRider && attack != Attack::Gaussian {
                    sim::train(&mut local, &shard2, &training, &mut rng);
                }
                let tensors = [(&g.weight, &local.weight), (&g.bias, &local.bias)].map(|(gv, lv)| {
                    gv.iter()
                        .zip(lv)
                        .map(|(&g, &l)| {
                            let d = f64::from(l) - f64::from(g);
                            let d = match attack {
                                Attack::None | Attack::LabelFlip => d,
                                Attack::SignFlip => -10.0 * d,
                                Attack::Scale => 100.0 * d,
                                Attack::Gaussian => {
                                    rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng)
                                }
                                Attack::FreeRider => rand::Rng::gen_range(&mut rng, -1.0..1.0),
                            };
                            match kind {
                                UpdateKind::Delta => d,
                                UpdateKind::Parameters => f64::from(g) + d,
                            }
                        })
                        .collect::<Vec<f64>>()
                });
                Ok(encode_safetensors(&m, &tensors)?)
            })
            .await??;
            self.client
                .publish_update(UpdateRequest {
                    job: self.job.clone(),
                    client: me.clone(),
                    round: state.round,
                    base_version: base,
                    num_examples: self.shard.len() as u64,
                    kind: self.kind,
                    payload: payload.into(),
                    force_upload: self.index % 10 == 9,
                })
                .await?;
            next = state.round.next();
        }
    }
}
