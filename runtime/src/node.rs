//! A node: gateway + function host + round coordinators in one process (`shoal node`), with one
//! shutdown path (a `CancellationToken` broadcast, a `TaskTracker` to wait on).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::NodeId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coordinator::{self, CoordinatorContext};
use crate::error::{Error, Result};
use crate::gateway::{self, GatewayConfig, GatewayContext};
use crate::host::{FunctionHost, HostConfig};
use crate::infra::{ConnectOptions, Infra};
use crate::jobs::{self, JobDirectory};
use crate::metrics::Metrics;
use crate::reject::Rejector;
use crate::shm;

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
    pub plugins: Option<Arc<dyn coordinator::PluginFactory>>,
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
    let mut nats = config.nats.clone();
    nats.name = format!("shoal-node-{}", config.node_id);
    let infra = Infra::connect(&nats).await?;
    // Before touching shared memory: another live process of this node id may still use it.
    let lease = acquire_lease(&infra, &config.node_id).await?;
    let shm_dir = shm::prepare_node_dir(&config.shm_root, config.node_id.as_str())?;
    let metrics = Arc::new(Metrics::default());
    let rejector = Rejector::new(infra.client.clone(), infra.subjects.clone(), Arc::clone(&metrics));
    let host = FunctionHost::new(
        HostConfig { idle_timeout: config.idle_timeout, progress_interval: config.ack_wait / 3 },
        Arc::clone(&metrics),
        rejector.clone(),
    )
    .start();
    let host_addr = host.clone();
    let directory = JobDirectory::default();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(hold_lease(infra.clone(), lease, cancel.clone()));

    let coord_ctx = CoordinatorContext {
        infra: infra.clone(),
        directory: directory.clone(),
        host: host.clone(),
        metrics: Arc::clone(&metrics),
        cancel: cancel.clone(),
        startup_grace: config.ack_wait + config.ack_wait / 2,
        plugins: config.plugins.clone(),
    };
    let spawner = tracker.clone();
    let on_new_job = move |job: shoal_functions::JobId| {
        let ctx = coord_ctx.clone();
        spawner.spawn(async move {
            loop {
                match coordinator::run(ctx.clone(), job.clone()).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(%job, error = %e, "coordinator failed; restarting in 1 s");
                        tokio::select! {
                            _ = ctx.cancel.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
    };
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
            batch: 64,
        },
    };
    {
        let cancel = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = gateway::run(gw, cancel).await {
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
    tracing::info!(node = %config.node_id, nats = %config.nats.url, inline_limit, "node started");
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

/// KV key (in `shoal-jobs`) of the node lease.
const LEASE_KEY: &str = "_node.lease";
/// A lease not renewed for this long is stale.
const LEASE_STALE: Duration = Duration::from_secs(3);
/// Renewal interval.
const LEASE_RENEW: Duration = Duration::from_secs(1);

/// Who holds the node lease.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Lease {
    node: NodeId,
    instance: u64,
    renewed_ms: u64,
}

#[derive(Debug)]
struct HeldLease {
    lease: Lease,
    revision: u64,
}

/// Takes the node lease. Until the hierarchy lands, one node serves a NATS server: the gateways
/// share one work-queue consumer, so a second node would take half of every round's updates and
/// rounds would fail for lack of quorum. A restarted node (same id) waits for its predecessor's
/// lease to go stale; a node with another id is refused with a clear error.
async fn acquire_lease(infra: &Infra, node: &NodeId) -> Result<HeldLease> {
    let instance = rand::random::<u64>();
    let deadline = tokio::time::Instant::now() + LEASE_STALE * 3;
    loop {
        let now = crate::protocol::now_ms();
        let lease = Lease { node: node.clone(), instance, renewed_ms: now };
        let value = Bytes::from(crate::protocol::encode(&lease));
        let entry = infra.jobs.entry(LEASE_KEY).await.map_err(|e| Error::nats("read node lease", e))?;
        let written = match entry {
            Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                let held: Lease = crate::protocol::decode("node lease", &e.value)?;
                let fresh = now.saturating_sub(held.renewed_ms) < LEASE_STALE.as_millis() as u64;
                if fresh && held.node != *node {
                    return Err(Error::NodeBusy(format!(
                        "node {} already serves this NATS server; one node per server is supported \
                         until the multi-node hierarchy lands (stop it, or use another NATS server)",
                        held.node
                    )));
                }
                if fresh {
                    if tokio::time::Instant::now() > deadline {
                        return Err(Error::NodeBusy(format!(
                            "another process of node {node} is running and renewing its lease"
                        )));
                    }
                    tracing::info!(%node, "waiting for the previous process of this node to go away");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                infra.jobs.update(LEASE_KEY, value, e.revision).await.ok()
            }
            Some(e) => infra.jobs.update(LEASE_KEY, value, e.revision).await.ok(),
            None => infra.jobs.create(LEASE_KEY, value).await.ok(),
        };
        match written {
            Some(revision) => return Ok(HeldLease { lease, revision }),
            None => tokio::time::sleep(Duration::from_millis(100)).await, // raced: look again
        }
    }
}

/// Renews the lease until shutdown, then releases it so a restart need not wait. Losing it
/// (another process took it after we stalled) stops this node.
async fn hold_lease(infra: Infra, mut held: HeldLease, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = infra.jobs.delete_expect_revision(LEASE_KEY, Some(held.revision)).await;
                return;
            }
            _ = tokio::time::sleep(LEASE_RENEW) => {}
        }
        held.lease.renewed_ms = crate::protocol::now_ms();
        let value = Bytes::from(crate::protocol::encode(&held.lease));
        match infra.jobs.update(LEASE_KEY, value, held.revision).await {
            Ok(rev) => held.revision = rev,
            Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                tracing::error!("node lease taken over by another process; stopping this node");
                cancel.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing the node lease failed; retrying"),
        }
    }
}
