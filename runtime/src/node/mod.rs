//! A node: gateway + function host + one leaf per job + the top of the jobs whose top lease it
//! holds, in one process (`shoal node`), with one shutdown path (a `CancellationToken`
//! broadcast, a `TaskTracker` to wait on). Any number of nodes (distinct ids and shm
//! directories) share one NATS: each stages the updates its gateway pulls, and partials cross
//! nodes ([`crate::cluster::leaf`]).

pub mod capacity;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::leaf::{self, LeafContext, LocalLinks};
use crate::cluster::lease;
use crate::cluster::top::{self, CoordinatorContext};
use crate::error::{Error, Result};
use crate::host::{FunctionHost, HostConfig};
use crate::ingest::reject::Rejector;
use crate::ingest::{self, GatewayConfig, GatewayContext};
use crate::jobs::{self, JobDirectory};
use crate::metrics::Metrics;
use crate::nats::{ConnectOptions, Infra};
use crate::node::capacity::{JobSlots, Offer};
use crate::staging;
use shoal_proto::JobPhase;

/// Node configuration (the `shoal node` flags).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// NATS connection.
    pub nats: ConnectOptions,
    /// This node's id (names its shm directory).
    pub node_id: NodeId,
    /// Root of the shm directories (`/dev/shm/shoal`).
    pub shm_root: PathBuf,
    /// JetStream ack wait for held updates.
    pub ack_wait: Duration,
    /// Largest inline update; `None` = the server's `max_payload`.
    pub inline_limit: Option<usize>,
    /// Idle aggregators stop after this long.
    pub idle_timeout: Duration,
    /// Shared-memory budget per job, bytes.
    pub shm_budget: usize,
    /// Job-specific strategy pieces (Bristle's evaluator), when embedding a node.
    pub plugins: Option<Arc<dyn top::PluginFactory>>,
    /// Fold updates as they arrive (default); `false` folds a round's updates only when it
    /// closes (the baseline of `shoal bench hierarchy`).
    pub eager: bool,
    /// How long a top (or middle) waits for the partials of a round before asking again.
    pub collect_timeout: Duration,
    /// Updates per JetStream pull request.
    pub pull_batch: usize,
    /// Fault injection: the aggregators sleep this long per update they fold (zero: off), to
    /// play a slow aggregator in backpressure tests.
    pub fold_delay: Duration,
    /// Most running jobs this node serves at once (`None`: no limit); see [`crate::node::capacity`].
    pub max_jobs: Option<usize>,
}

impl NodeConfig {
    /// Defaults for node `id`.
    pub fn new(id: NodeId) -> NodeConfig {
        NodeConfig {
            nats: ConnectOptions::default(),
            node_id: id,
            shm_root: PathBuf::from("/dev/shm/shoal"),
            ack_wait: Duration::from_secs(30),
            inline_limit: None,
            idle_timeout: Duration::from_secs(300),
            shm_budget: 1 << 30,
            plugins: None,
            eager: true,
            collect_timeout: Duration::from_secs(10),
            pull_batch: 64,
            fold_delay: Duration::ZERO,
            max_jobs: None,
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    cancel: CancellationToken,
    host: actix::Addr<FunctionHost>,
    tracker: TaskTracker,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// The node's NATS handles.
    pub infra: Infra,
}

/// Starts a node. Must run inside an actix system (see `actix::System::with_tokio_rt`).
///
/// # Errors
/// NATS connection or resource errors; shm directory errors.
pub async fn start(config: NodeConfig) -> Result<NodeHandle> {
    let metrics = Arc::new(Metrics::default());
    let mut nats = config.nats.clone();
    nats.name = format!("shoal-node-{}", config.node_id);
    nats.slow_consumer_events = Some(metrics.slow_consumer_events.clone());
    let infra = Infra::connect(&nats).await?;
    // Before touching shared memory: another live process of this node id may still use it.
    let membership = lease::join(&infra, &config.node_id).await?;
    let instance = membership.lease.instance;
    let shm_dir = staging::prepare_node_dir(&config.shm_root, config.node_id.as_str())?;
    let rejector = Rejector::new(infra.client.clone(), infra.subjects.clone(), Arc::clone(&metrics));
    let host = FunctionHost::new(
        HostConfig {
            idle_timeout: config.idle_timeout,
            progress_interval: config.ack_wait / 3,
            eager: config.eager,
            fold_delay: config.fold_delay,
        },
        Arc::clone(&metrics),
        rejector.clone(),
    )
    .start();
    let host_addr = host.clone();
    let directory = JobDirectory::default();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Losing the membership lease (another process took this node id) stops the node.
    tracker.spawn(lease::keep(infra.clone(), membership, cancel.clone(), cancel.clone()));

    let local = LocalLinks::default();
    let coord_ctx = CoordinatorContext {
        infra: infra.clone(),
        directory: directory.clone(),
        metrics: Arc::clone(&metrics),
        cancel: cancel.clone(),
        startup_grace: config.ack_wait + config.ack_wait / 2,
        plugins: config.plugins.clone(),
        node: config.node_id.clone(),
        local: local.clone(),
        collect_timeout: config.collect_timeout,
    };
    let leaf_ctx = LeafContext {
        infra: infra.clone(),
        directory: directory.clone(),
        host: host.clone(),
        metrics: Arc::clone(&metrics),
        rejector: rejector.clone(),
        node: config.node_id.clone(),
        local,
        cancel: cancel.clone(),
        progress_interval: config.ack_wait / 3,
        collect_timeout: config.collect_timeout,
    };
    let slots = JobSlots::new(
        config.max_jobs,
        metrics.jobs_served.clone(),
        metrics.jobs_waiting.clone(),
        metrics.jobs_refused.clone(),
    );
    let starter = JobStarter {
        leaf: leaf_ctx,
        top: coord_ctx,
        tracker: tracker.clone(),
        slots: Arc::clone(&slots),
        directory: directory.clone(),
    };
    let on_new_job = move |job: shoal_functions::JobId| starter.offer(job);
    {
        let (infra, directory, cancel) = (infra.clone(), directory.clone(), cancel.clone());
        tracker.spawn(async move {
            if let Err(e) = jobs::watch_jobs(infra, directory, cancel, on_new_job).await {
                tracing::error!(error = %e, "job watch stopped");
            }
        });
    }
    let inline_limit = config.inline_limit.unwrap_or(infra.max_payload());
    let gw = GatewayContext {
        infra: infra.clone(),
        directory,
        host,
        metrics: Arc::clone(&metrics),
        rejector,
        config: GatewayConfig {
            ack_wait: config.ack_wait,
            max_ack_pending: 10_000,
            inline_limit,
            shm_dir,
            shm_budget: config.shm_budget,
            batch: config.pull_batch,
        },
        node: config.node_id.clone(),
        instance,
        slots,
    };
    {
        let cancel = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = ingest::run(gw, cancel).await {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
    }
    {
        let subject = infra.subjects.node_metrics(&config.node_id);
        let mut sub =
            infra.client.subscribe(subject).await.map_err(|e| Error::nats("subscribe metrics", e))?;
        let (client, metrics, cancel) = (infra.client.clone(), Arc::clone(&metrics), cancel.clone());
        tracker.spawn(async move {
            loop {
                let m = tokio::select! { _ = cancel.cancelled() => break, m = sub.next() => m };
                let Some(m) = m else { break };
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, Bytes::from(metrics.encode())).await;
                }
            }
        });
    }
    tracing::info!(
        node = %config.node_id, nats = %config.nats.url, inline_limit, max_jobs = ?config.max_jobs,
        "node started"
    );
    Ok(NodeHandle { cancel, host: host_addr, tracker, metrics, infra })
}

impl NodeHandle {
    /// Stops intake, lets tasks reach a safe point and waits for them. Un-acked updates stay in
    /// JetStream and are redelivered to the next node.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.is_err() {
            tracing::warn!("node tasks did not stop within 10 s");
        }
        // The gateway has stopped pulling; now hand the un-acked updates straight back to
        // JetStream for the next node instead of letting them wait out the ack wait.
        let _ = self.infra.client.flush().await;
        match self.host.send(crate::host::ReleaseHeld).await {
            Ok(n) if n > 0 => tracing::info!(released = n, "held updates handed back to JetStream"),
            _ => {}
        }
        let _ = self.infra.client.flush().await;
    }

    /// A token cancelled when the node shuts down.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// Starts the leaf and top of each job the node learns of, as `--max-jobs` allows
/// ([`crate::node::capacity`]); a queued job starts when a served one ends.
#[derive(Clone)]
struct JobStarter {
    leaf: LeafContext,
    top: CoordinatorContext,
    tracker: TaskTracker,
    slots: Arc<JobSlots>,
    directory: JobDirectory,
}

impl JobStarter {
    fn running(&self, job: &shoal_functions::JobId) -> bool {
        self.directory.get(job).is_some_and(|e| e.state.phase == JobPhase::Running)
    }

    fn offer(&self, job: shoal_functions::JobId) {
        match self.slots.offer(&job, self.running(&job)) {
            Offer::Start { counted } => self.start(job, counted),
            Offer::Queued => tracing::warn!(
                %job, max_jobs = ?self.slots.max(),
                "node at capacity: the job waits for a free slot (its updates are refused as \
                 node_at_capacity unless another node serves it)"
            ),
            Offer::Known => {}
        }
    }

    fn start(&self, job: shoal_functions::JobId, counted: bool) {
        let (leaf, top) = (self.leaf.clone(), self.top.clone());
        let leaf_task = self.tracker.spawn(retrying("leaf", job.clone(), leaf.cancel.clone(), move |job| {
            leaf::run_leaf(leaf.clone(), job)
        }));
        let top_task = self.tracker.spawn(retrying("top", job.clone(), top.cancel.clone(), move |job| {
            top::run_top(top.clone(), job)
        }));
        if !counted {
            return;
        }
        let this = self.clone();
        self.tracker.spawn(async move {
            let _ = leaf_task.await;
            let _ = top_task.await;
            if this.top.cancel.is_cancelled() {
                return;
            }
            for next in this.slots.release(&job, |j| this.running(j)) {
                tracing::info!(job = %next, ended = %job, "a job slot is free: the waiting job starts");
                this.start(next, true);
            }
        });
    }
}

/// Runs `task` for `job` until it returns `Ok`, restarting it a second after an error.
async fn retrying<F, Fut>(what: &'static str, job: shoal_functions::JobId, cancel: CancellationToken, task: F)
where
    F: Fn(shoal_functions::JobId) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    loop {
        match task(job.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(%job, error = %e, "{what} failed; restarting in 1 s");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
