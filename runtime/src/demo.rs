//! `shoal demo`: a real federated training run, end to end, on one machine.
//!
//! Starts a private `nats-server` (or uses `--nats-url`), starts a node in this process (gateway,
//! shared-memory staging, on-demand aggregator actors, round coordinator), creates a FedAvg job,
//! and runs simulated clients that each hold a Dirichlet(α) non-IID share of the UCI digits
//! training split: every round they fetch the global model from the object store, train a
//! softmax-regression classifier locally ([`crate::sim`]) and publish their parameters over NATS
//! (one client in ten through the object store, the others inline). After each commit the
//! global model is evaluated on the held-out test split. Finally the same model is trained
//! centrally on the pooled training data for the same number of epochs, and both accuracies are
//! printed as the last two lines (scripts read them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shoal_functions::tensor::encode_safetensors;
use shoal_functions::{
    ClientId, DType, JobId, JobSpec, ModelManifest, ModelVersion, NodeId, Parameters, RoundId, RoundPolicy,
    StrategySpec, TensorSpec, UpdateKind,
};

use crate::client::{ShoalClient, UpdateRequest};
use crate::infra::ConnectOptions;
use crate::nats_server::NatsServer;
use crate::node::{self, NodeConfig};
use crate::protocol::RoundOutcome;
use crate::sim::{self, Dataset, LocalTraining, SoftmaxParams};

/// `shoal demo` flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Use this NATS server (JetStream enabled) instead of starting a private nats-server.
    #[arg(long, env = "SHOAL_NATS_URL")]
    pub nats_url: Option<String>,
    /// Simulated clients.
    #[arg(long, default_value_t = 20)]
    pub clients: usize,
    /// Rounds.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Dirichlet concentration of the non-IID split (smaller = more skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Seed of the split and of local training.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Round deadline in seconds.
    #[arg(long, default_value_t = 60)]
    pub deadline_secs: u64,
    /// Root of the node's shared-memory directory.
    #[arg(long, default_value = "/dev/shm/shoal")]
    pub shm_dir: std::path::PathBuf,
}

const TEST_FRACTION: f64 = 0.2;
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

fn to_safetensors(m: &Arc<ModelManifest>, p: &SoftmaxParams) -> anyhow::Result<Vec<u8>> {
    let f = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    Ok(encode_safetensors(m, &[f(&p.weight), f(&p.bias)])?)
}

/// Runs the demo.
///
/// # Errors
/// No nats-server binary (with an install hint), NATS or node failures, a failed round.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.clients >= 1 && a.rounds >= 1, "--clients and --rounds must be at least 1");
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
    let nats = ConnectOptions { url: url.clone(), ..Default::default() };
    let mut cfg = NodeConfig::new(NodeId::new(format!("demo-{}", std::process::id()))?);
    cfg.nats = nats.clone();
    cfg.shm_root = a.shm_dir.clone();
    let node = node::start(cfg).await.context("starting the node")?;

    let data = Dataset::digits()?;
    let (train_set, test_set) = sim::train_test_split(&data, TEST_FRACTION, TEST_SPLIT_SEED);
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

    let m = manifest()?;
    let job = JobId::new(format!("digits-{}", crate::protocol::now_ms()))?;
    let spec = JobSpec {
        job: job.clone(),
        manifest: (*m).clone(),
        strategy: StrategySpec::Fedavg { server_learning_rate: 1.0 },
        round_policy: RoundPolicy::Sync {
            cohort_size: a.clients as u32,
            min_clients: a.clients as u32,
            deadline_ms: a.deadline_secs * 1000,
        },
        update_kind: UpdateKind::Parameters,
        rounds: a.rounds,
        max_num_examples: 1_000_000,
        max_failed_rounds: 3,
    };
    let client = ShoalClient::connect(&nats).await?;
    crate::jobs::create_job(client.infra(), &spec, None).await?;
    eprintln!("job {job} created: FedAvg, {} rounds of {} clients", a.rounds, a.clients);

    let timeout = Duration::from_secs(a.deadline_secs + 30);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, shard) in shards.iter().enumerate() {
        let (client, job, m, shard, seed, rounds) =
            (client.clone(), job.clone(), Arc::clone(&m), Arc::clone(shard), a.seed, a.rounds);
        tasks.spawn(async move {
            run_client(client, job, m, shard, c, seed, rounds, timeout)
                .await
                .with_context(|| format!("simulated client {c}"))
        });
    }

    let pb = ProgressBar::new(a.rounds);
    pb.set_style(
        ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut federated = 0.0;
    let mut opened = Instant::now();
    for r in 1..=a.rounds {
        let state = client.wait_for_round_closed(&job, RoundId(r), timeout).await?;
        let secs = opened.elapsed().as_secs_f64();
        opened = Instant::now();
        let line = match state.last_outcome {
            Some(RoundOutcome::Committed { version, clients, .. }) => {
                let bytes = client.fetch_model(&job, version).await?;
                let global = Parameters::from_safetensors(Arc::clone(&m), &bytes)?;
                federated = sim::accuracy(&to_params(&global), &test_set);
                format!("round {r:2} | clients {clients:2} | test accuracy {federated:.3} | round time {secs:.2} s")
            }
            other => format!("round {r:2} | no model committed: {other:?} | round time {secs:.2} s"),
        };
        pb.suspend(|| println!("{line}"));
        pb.inc(1);
    }
    pb.finish_and_clear();
    while let Some(res) = tasks.join_next().await {
        res??;
    }
    node.shutdown().await;

    // Centralized baseline: the same model and optimiser on the pooled training data, for the
    // same number of epochs as each client trained in total.
    let local = LocalTraining::default();
    let central_cfg = LocalTraining { epochs: a.rounds as usize * local.epochs, ..local };
    let centralized = tokio::task::spawn_blocking(move || {
        let mut p = SoftmaxParams::zeros();
        sim::train(&mut p, &train_set, &central_cfg, &mut ChaCha8Rng::seed_from_u64(a.seed));
        sim::accuracy(&p, &test_set)
    })
    .await?;
    drop(client);
    println!("federated accuracy: {federated:.3}");
    println!("centralized accuracy: {centralized:.3}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_client(
    client: ShoalClient,
    job: JobId,
    m: Arc<ModelManifest>,
    shard: Arc<Dataset>,
    index: usize,
    seed: u64,
    rounds: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let me = ClientId::new(format!("client-{index:02}"))?;
    let mut next = RoundId(1);
    while next.0 <= rounds {
        let state = match client.wait_for_open_round(&job, next, timeout).await {
            Ok(s) => s,
            Err(crate::Error::JobEnded { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let base: ModelVersion = state.model_version;
        let bytes = client.fetch_model(&job, base).await?;
        let global = Parameters::from_safetensors(Arc::clone(&m), &bytes)?;
        let (shard2, round) = (Arc::clone(&shard), state.round);
        let local = tokio::task::spawn_blocking(move || {
            let mut p = to_params(&global);
            let mut rng = ChaCha8Rng::seed_from_u64(seed + index as u64 + 1000 * (round.0 - 1));
            sim::train(&mut p, &shard2, &LocalTraining::default(), &mut rng);
            p
        })
        .await?;
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: me.clone(),
                round: state.round,
                base_version: base,
                num_examples: shard.len() as u64,
                kind: UpdateKind::Parameters,
                payload: to_safetensors(&m, &local)?.into(),
                force_object_store: index % 10 == 9,
            })
            .await?;
        next = state.round.next();
    }
    Ok(())
}
