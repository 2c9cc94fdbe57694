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

use crate::cluster::leaf::{self, LocalLinks};
use crate::cluster::lease;
use crate::cluster::top;
use crate::error::{Error, Result};
use crate::host::{DescriptorSink, FunctionHost, HostConfig, HostHandle, InProcess};
use crate::http::Probe;
use crate::ingest;
use crate::ingest::demand::DemandTally;
use crate::ingest::ledger::{Ledger, LedgerConfig};
use crate::ingest::reject::Rejector;
use crate::jobs::{self, JobDirectory};
use crate::metrics::Metrics;
use crate::nats::{ConnectOptions, Infra};
use crate::node::capacity::{JobSlots, Offer};
use crate::staging;
use shoal_proto::config::{ms, NodeConfig, Timings};
use shoal_proto::JobPhase;

/// How to start a node: its configuration (plain data, `shoal_proto::config`), how it connects
/// to NATS (credentials and TLS; URL and prefix come from the configuration), and the
/// job-specific strategy pieces an embedding application supplies.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The configuration.
    pub config: NodeConfig,
    /// Credentials, TLS and client settings (its `url` and `prefix` are replaced by the
    /// configuration's).
    pub nats: ConnectOptions,
    /// Job-specific strategy pieces (Bristle's evaluator), when embedding a node.
    pub plugins: Option<Arc<dyn top::PluginFactory>>,
    /// How the gateway hands descriptors to the function host.
    pub channel: DescriptorChannel,
    /// The eBPF sidecar on a TCP descriptor channel (`--ebpf`); unused in process.
    pub dataplane: crate::dataplane::DataplaneConfig,
    /// What the process's HTTP listener reports ([`crate::http`]): the node hands it its
    /// metrics, and marks it ready once NATS and its shared-memory directory are up.
    pub probe: Probe,
}

impl NodeOptions {
    /// Options for `config`, connecting without credentials.
    pub fn new(config: NodeConfig) -> NodeOptions {
        NodeOptions {
            config,
            nats: ConnectOptions::default(),
            plugins: None,
            probe: Probe::default(),
            channel: DescriptorChannel::InProcess,
            dataplane: crate::dataplane::DataplaneConfig::default(),
        }
    }
}

/// What every part of a node shares (the gateway, the leaves and the tops): cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeContext {
    /// The configuration (validated).
    pub config: Arc<NodeConfig>,
    /// NATS handles.
    pub infra: Infra,
    /// The node's view of the jobs.
    pub directory: JobDirectory,
    /// The function host (leaves register with it and take its harvests): the actor of this
    /// process, or the gateway's function-host processes.
    pub host: HostHandle,
    /// Where the gateway delivers staged updates.
    pub sink: Arc<dyn DescriptorSink>,
    /// The gateway's ledger of the updates it holds (acks, slots, objects).
    pub ledger: Ledger,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The rejection path.
    pub rejector: Rejector,
    /// This node.
    pub node: NodeId,
    /// This process (its membership lease instance), named in the claims it makes and the
    /// partials it sends.
    pub instance: shoal_proto::InstanceId,
    /// Whether this process has held its membership lease without a gap: nothing staged under
    /// it leaves the node (a partial, an exchange answer, a commit) unless it holds.
    pub membership: lease::Continuity,
    /// This process's observations of other processes' leases.
    pub liveness: lease::Liveness,
    /// Why the node stopped on its own, once it has.
    pub stopped: Arc<std::sync::OnceLock<Stopped>>,
    /// Requests from this node's tops to its gateway to adopt a dead node's updates.
    pub adoptions: crate::ingest::adopt::Adoptions,
    /// In-process links from this node's leaves to a top on the node.
    pub local: LocalLinks,
    /// The jobs this node serves (`max_jobs`).
    pub slots: Arc<JobSlots>,
    /// Job-specific strategy pieces.
    pub plugins: Option<Arc<dyn top::PluginFactory>>,
    /// Cancelled when the node shuts down.
    pub cancel: CancellationToken,
    /// This node's shared-memory directory (`<shm_dir>/<node>`).
    pub shm_dir: PathBuf,
    /// Arrivals and unfolded updates per job, for the demand report.
    pub demand: Arc<DemandTally>,
}

impl NodeContext {
    /// The protocol timings.
    pub fn timings(&self) -> &Timings {
        &self.config.timings
    }

    /// Stops the node because something it holds may also be held by another node: it drops
    /// everything (held updates go back to JetStream, its membership lease is released) and
    /// reports [`Stopped::Fenced`], after which a new process instance may start.
    pub fn fence_now(&self) {
        self.membership.break_now();
        let _ = self.stopped.set(Stopped::Fenced);
        self.cancel.cancel();
    }
}

/// Why a node stopped on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Another process took this node id's membership lease.
    LeaseLost,
    /// A membership renewal came after a gap longer than the fence window (a pause or a
    /// partition): other nodes may have taken over its updates, so it dropped everything it
    /// held. Starting it again (a new process instance) is safe.
    Fenced,
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    cancel: CancellationToken,
    stopped: Arc<std::sync::OnceLock<Stopped>>,
    shutdown_grace: Duration,
    ledger: Ledger,
    tracker: TaskTracker,
    probe: Probe,
    /// `<shm_dir>/<node>` and `<shm_dir>`, removed at shutdown when empty.
    shm_dirs: (PathBuf, PathBuf),
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// The node's NATS handles.
    pub infra: Infra,
    /// The eBPF sidecar (if loaded): detached when the handle goes, after its tasks ended.
    dataplane: crate::dataplane::Dataplane,
}

/// Starts a node. Must run inside an actix system (see `actix::System::with_tokio_rt`).
///
/// # Errors
/// [`Error::Config`] for a configuration [`NodeConfig::validate`] refuses; NATS connection or
/// resource errors; shm directory errors.
pub async fn start(opts: NodeOptions) -> Result<NodeHandle> {
    opts.config.validate()?;
    let config = Arc::new(opts.config);
    // A node instance started again in the same process (after fencing) keeps counting on the
    // metrics its probe serves: `shoal_nats_disconnects_total` must not fall back to 0 after
    // the very outage it counts.
    let metrics = opts.probe.metrics().unwrap_or_default();
    opts.probe.not_ready("NATS and the shared-memory directory");
    opts.probe.set_metrics(Arc::clone(&metrics));
    let mut nats = opts.nats.clone();
    nats.url.clone_from(&config.nats_url);
    nats.prefix.clone_from(&config.prefix);
    nats.name = format!("shoal-node-{}", config.node_id);
    nats.slow_consumer_events = Some(metrics.slow_consumer_events.clone());
    nats.disconnects = Some(metrics.nats_disconnects.clone());
    nats.jetstream = Some(crate::nats::JetStreamOptions {
        replicas: config.jetstream_replicas as usize,
        updates_max_bytes: NodeConfig::mib_bytes(config.updates_max_mib),
        models_max_bytes: NodeConfig::mib_bytes(config.models_max_mib),
        transfers_max_bytes: NodeConfig::mib_bytes(config.transfers_max_mib),
    });
    let infra = Infra::connect(&nats).await?;
    let liveness = lease::Liveness::new(config.timings.lease_stale());
    // Before touching shared memory: another live process of this node id may still use it.
    let membership = lease::join(&infra, &liveness, &config.node_id, &config.timings).await?;
    let (instance, continuity) = (membership.lease.instance, membership.continuity.clone());
    let shm_dir = staging::prepare_node_dir(&config.shm_dir, config.node_id.as_str())?;
    let rejector = Rejector::new(infra.client.clone(), infra.subjects.clone(), Arc::clone(&metrics));
    let ledger = Ledger::spawn(
        infra.clone(),
        rejector.clone(),
        LedgerConfig {
            progress_interval: config.progress_ack_interval(),
            release_delay: ms(config.timings.nak_retry_ms),
        },
    );
    let directory = JobDirectory::default();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (host, sink, dataplane) = start_host(
        &config,
        (opts.channel, &opts.dataplane),
        HostDeps { metrics: &metrics, directory: &directory, ledger: &ledger, shm_dir: &shm_dir },
        &tracker,
        &cancel,
    )
    .await?;
    dataplane.spawn(Arc::clone(&metrics), opts.dataplane.counters_interval, &tracker, cancel.clone());
    // Losing the membership lease (another process took this node id), or continuity (a pause
    // or partition longer than the fence window), stops the node.
    let stopped = keep_membership(&infra, membership, &config, &metrics, &tracker, &cancel);
    tracker.spawn(liveness.clone().watch_members(infra.clone(), cancel.clone(), ms(config.timings.retry_ms)));
    let slots = JobSlots::new(
        config.max_jobs.map(|n| n as usize),
        metrics.jobs_served.clone(),
        metrics.jobs_waiting.clone(),
        metrics.jobs_refused.clone(),
    );
    let ctx = NodeContext {
        config: Arc::clone(&config),
        infra: infra.clone(),
        directory,
        sink,
        ledger: ledger.clone(),
        host: host.clone(),
        metrics: Arc::clone(&metrics),
        rejector,
        node: config.node_id.clone(),
        instance,
        membership: continuity,
        liveness,
        stopped: Arc::clone(&stopped),
        adoptions: crate::ingest::adopt::Adoptions::default(),
        local: LocalLinks::default(),
        slots,
        plugins: opts.plugins,
        cancel: cancel.clone(),
        shm_dir: shm_dir.clone(),
        demand: Arc::default(),
    };
    spawn_tasks(&ctx, &tracker).await?;
    opts.probe.ready();
    tracker.spawn(watch_connection(infra.client.clone(), opts.probe.clone(), cancel.clone()));
    tracing::info!(
        node = %config.node_id, nats = %config.nats_url, max_payload = infra.max_payload(), max_jobs = ?config.max_jobs,
        "node started"
    );
    Ok(NodeHandle {
        cancel,
        stopped,
        ledger,
        tracker,
        metrics,
        infra,
        probe: opts.probe,
        shutdown_grace: ms(config.timings.shutdown_grace_ms),
        shm_dirs: (shm_dir, config.shm_dir.clone()),
        dataplane,
    })
}

/// Keeps the node's membership lease renewed; the returned cell says why the node stopped on
/// its own (another process took the lease, or a renewal gap fenced it).
fn keep_membership(
    infra: &Infra,
    membership: lease::Held,
    config: &NodeConfig,
    metrics: &Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Arc<std::sync::OnceLock<Stopped>> {
    let stopped = Arc::new(std::sync::OnceLock::new());
    let keep = lease::keep(infra.clone(), membership, config.timings.clone(), cancel.clone(), cancel.clone());
    let (cell, metrics) = (Arc::clone(&stopped), Arc::clone(metrics));
    tracker.spawn(async move {
        match keep.await {
            lease::LeaseEnd::Released => {}
            lease::LeaseEnd::Lost => {
                let _ = cell.set(Stopped::LeaseLost);
            }
            lease::LeaseEnd::Fenced(_) => {
                metrics.fencing("self_fenced").inc();
                let _ = cell.set(Stopped::Fenced);
            }
        }
    });
    stopped
}

/// How a node's gateway hands descriptors to its function host.
#[derive(Debug, Clone, Default)]
pub enum DescriptorChannel {
    /// An actix message to the host in this process (the default).
    #[default]
    InProcess,
    /// The descriptor channel of separate gateway and function-host processes
    /// ([`crate::host::channel`]), over loopback TCP inside this process: the host reads the
    /// slots through its own read-only mapping and returns them by release records (tests and
    /// benchmarks of that path with everything else unchanged).
    LoopbackTcp,
    /// `shoal gateway`: no aggregators in this process; function-host processes (spawned by the
    /// gateway or started by someone else) connect to the descriptor channel
    /// ([`crate::host::pool`]).
    Split(SplitOptions),
}

/// The gateway's side of separate function-host processes.
#[derive(Debug, Clone)]
pub struct SplitOptions {
    /// Where the descriptor channel listens.
    pub listen: std::net::SocketAddr,
    /// Who starts function hosts.
    pub hosts: crate::host::pool::Hosts,
    /// How long a delivery waits for a host before its update is handed back.
    pub wait_for_host: Duration,
    /// How long a harvest waits for a host's answer before the host is abandoned as hung
    /// (`None`: half the collect timeout, so the leaf still answers the top's collection).
    pub harvest_timeout: Option<Duration>,
}

/// What starting the function host needs from the node.
struct HostDeps<'a> {
    metrics: &'a Arc<Metrics>,
    directory: &'a JobDirectory,
    ledger: &'a Ledger,
    shm_dir: &'a std::path::Path,
}

/// Starts the function host, the sink the gateway delivers to, and the descriptor data plane
/// (plain, or the eBPF sidecar on the loopback TCP channel).
async fn start_host(
    config: &NodeConfig,
    (channel, dataplane): (DescriptorChannel, &crate::dataplane::DataplaneConfig),
    deps: HostDeps<'_>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(HostHandle, Arc<dyn DescriptorSink>, crate::dataplane::Dataplane)> {
    let HostDeps { metrics, directory, ledger, shm_dir } = deps;
    let new_host =
        |link| FunctionHost::new(host_config(config), Arc::clone(metrics), directory.clone(), link).start();
    match channel {
        DescriptorChannel::InProcess => {
            let host = new_host(ledger.link());
            Ok((
                HostHandle::Local(host.clone()),
                Arc::new(InProcess(host)),
                crate::dataplane::Dataplane::plain(),
            ))
        }
        DescriptorChannel::LoopbackTcp => {
            let (link, feedback) = crate::ingest::ledger::Link::forwarding();
            let host = new_host(link);
            let side = crate::host::remote::HostSide {
                segments: crate::host::channel::SegmentCache::new(shm_dir.to_owned()),
                host: Arc::new(InProcess(host.clone())),
                feedback,
                metrics: Arc::clone(metrics),
                hand_back: ms(config.timings.nak_retry_ms),
                process: None,
            };
            let (sink, plane) =
                crate::host::remote::loopback(side, ledger.link(), dataplane, tracker, cancel).await?;
            Ok((HostHandle::Local(host), Arc::new(sink), plane))
        }
        DescriptorChannel::Split(split) => {
            // The gateway's host pool: its listener carries the eBPF sidecar (when loaded), and
            // each function-host process's channel is registered under its function id.
            let pool = crate::host::pool::HostPool::start(
                crate::host::pool::PoolConfig {
                    listen: split.listen,
                    hosts: split.hosts,
                    hand_back: ms(config.timings.nak_retry_ms),
                    wait_for_host: split.wait_for_host,
                    harvest_timeout: split.harvest_timeout.unwrap_or(config.collect_timeout() / 2),
                },
                dataplane,
                Arc::clone(metrics),
                ledger.link(),
                directory.clone(),
                tracker,
                cancel,
            )
            .await?;
            let plane = pool.dataplane();
            Ok((HostHandle::Pool(pool.clone()), Arc::new(pool), plane))
        }
    }
}

/// The aggregator settings of a node's configuration (also a function-host process's).
pub fn host_config(config: &NodeConfig) -> HostConfig {
    HostConfig {
        idle_timeout: config.idle_timeout(),
        eager: !config.lazy_aggregation,
        fold_delay: config.fold_delay(),
        nak_restage: ms(config.timings.nak_restage_ms),
    }
}

/// The node's long-running tasks: the job watch (which starts each job's leaf and top), the
/// gateway, and the metrics responder.
async fn spawn_tasks(ctx: &NodeContext, tracker: &TaskTracker) -> Result<()> {
    let starter = JobStarter { ctx: ctx.clone(), tracker: tracker.clone() };
    let on_new_job = move |job: shoal_functions::JobId| starter.offer(job);
    {
        let ctx = ctx.clone();
        tracker.spawn(async move {
            let (infra, directory, cancel) = (ctx.infra.clone(), ctx.directory.clone(), ctx.cancel.clone());
            if let Err(e) =
                jobs::watch_jobs(infra, directory, ctx.config.timings.clone(), cancel, on_new_job).await
            {
                tracing::error!(error = %e, "job watch stopped");
            }
        });
    }
    {
        let ctx = ctx.clone();
        tracker.spawn(async move {
            if let Err(e) = ingest::run(ctx).await {
                tracing::error!(error = %e, "gateway stopped");
            }
        });
    }
    tracker.spawn(ingest::demand::publish(ctx.clone()));
    if let HostHandle::Pool(pool) = &ctx.host {
        // Function hosts started without --gateway ask here for the channel's address.
        let subject = ctx.infra.subjects.node_channel(&ctx.node);
        let mut sub =
            ctx.infra.client.subscribe(subject).await.map_err(|e| Error::nats("subscribe channel", e))?;
        let (client, cancel, addr) = (ctx.infra.client.clone(), ctx.cancel.clone(), pool.addr().to_string());
        tracker.spawn(async move {
            loop {
                let m = tokio::select! { _ = cancel.cancelled() => break, m = sub.next() => m };
                let Some(m) = m else { break };
                if let Some(reply) = m.reply {
                    let _ = client.publish(reply, Bytes::from(addr.clone())).await;
                }
            }
        });
    }
    let subject = ctx.infra.subjects.node_metrics(&ctx.node);
    let mut sub =
        ctx.infra.client.subscribe(subject).await.map_err(|e| Error::nats("subscribe metrics", e))?;
    let (client, metrics, cancel) = (ctx.infra.client.clone(), Arc::clone(&ctx.metrics), ctx.cancel.clone());
    tracker.spawn(async move {
        loop {
            let m = tokio::select! { _ = cancel.cancelled() => break, m = sub.next() => m };
            let Some(m) = m else { break };
            if let Some(reply) = m.reply {
                let _ = client.publish(reply, Bytes::from(metrics.encode())).await;
            }
        }
    });
    Ok(())
}

/// `/readyz` follows the NATS connection: 503 while it is down (the client reconnects; updates
/// wait in JetStream), 200 again once it is back. Checked every 500 ms.
async fn watch_connection(client: async_nats::Client, probe: Probe, cancel: CancellationToken) {
    use async_nats::connection::State;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut up = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = client.connection_state() == State::Connected;
        if now != up {
            if now {
                probe.ready();
            } else {
                probe.not_ready("NATS (the connection is down; reconnecting)");
            }
            up = now;
        }
    }
}

impl NodeHandle {
    /// Stops intake, lets tasks reach a safe point and waits for them. Un-acked updates stay in
    /// JetStream and are redelivered to the next node.
    pub async fn shutdown(self) {
        self.probe.not_ready("the node to start again (it is shutting down)");
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(grace = ?self.shutdown_grace, "node tasks did not stop within the shutdown grace");
        }
        // The gateway has stopped pulling; now hand the un-acked updates straight back to
        // JetStream for the next node instead of letting them wait out the ack wait.
        let _ = self.infra.client.flush().await;
        let n = self.ledger.shutdown().await;
        if n > 0 {
            tracing::info!(released = n, "held updates handed back to JetStream");
        }
        let _ = self.infra.client.flush().await;
        // The segments went with the gateway's pools; leave no empty directory behind (a
        // directory still holding files, or another node's, stays).
        let (node_dir, root) = &self.shm_dirs;
        if std::fs::remove_dir(node_dir).is_ok() {
            let _ = std::fs::remove_dir(root);
        }
        // Last, with the descriptor channels closed: detaching earlier would drop descriptors
        // redirected into a socket and not read yet.
        drop(self.dataplane);
    }

    /// The descriptor data plane (the eBPF sidecar, when loaded): its kill switch and counters.
    pub fn dataplane(&self) -> &crate::dataplane::Dataplane {
        &self.dataplane
    }

    /// A token cancelled when the node shuts down.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Waits until the node stops on its own, and says why (it runs until [`Self::shutdown`]
    /// otherwise).
    pub async fn stopped(&self) -> Stopped {
        loop {
            self.cancel.cancelled().await;
            if let Some(s) = self.stopped.get() {
                return *s;
            }
            // Cancelled by a shutdown, or the keeper has not recorded why yet.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Starts the leaf and top of each job the node learns of, as `max_jobs` allows
/// ([`crate::node::capacity`]); a queued job starts when a served one ends.
#[derive(Clone)]
struct JobStarter {
    ctx: NodeContext,
    tracker: TaskTracker,
}

impl JobStarter {
    fn running(&self, job: &shoal_functions::JobId) -> bool {
        self.ctx.directory.get(job).is_some_and(|e| e.state.phase == JobPhase::Running)
    }

    fn offer(&self, job: shoal_functions::JobId) {
        match self.ctx.slots.offer(&job, self.running(&job)) {
            Offer::Start { .. } => self.start(job),
            Offer::Queued => tracing::warn!(
                %job, max_jobs = ?self.ctx.slots.max(),
                "node at capacity: the job waits for a free slot (its updates are refused as \
                 node_at_capacity unless another node serves it)"
            ),
            Offer::Known => {}
        }
    }

    fn start(&self, job: shoal_functions::JobId) {
        let incarnation = self.ctx.directory.get(&job).map_or(0, |e| e.incarnation);
        let retry = ms(self.ctx.config.timings.retry_ms);
        let (leaf, top) = (self.ctx.clone(), self.ctx.clone());
        let leaf_task =
            self.tracker.spawn(retrying("leaf", job.clone(), self.ctx.cancel.clone(), retry, move |job| {
                leaf::run_leaf(leaf.clone(), job)
            }));
        let top_task =
            self.tracker.spawn(retrying("top", job.clone(), self.ctx.cancel.clone(), retry, move |job| {
                top::run_top(top.clone(), job)
            }));
        let this = self.clone();
        self.tracker.spawn(async move {
            let _ = leaf_task.await;
            let _ = top_task.await;
            if this.ctx.cancel.is_cancelled() {
                return;
            }
            for next in this.ctx.slots.release(&job, |j| this.running(j)) {
                tracing::info!(job = %next, ended = %job, "a job slot is free: the waiting job starts");
                this.start(next);
            }
            // The id was deleted and created again while this incarnation wound down: the new
            // job was offered while the old one still held the id, so offer it now.
            if this.ctx.directory.get(&job).is_some_and(|e| e.incarnation != incarnation) {
                this.offer(job);
            }
        });
    }
}

/// Runs `task` for `job` until it returns `Ok`, restarting it `retry` after an error.
async fn retrying<F, Fut>(
    what: &'static str,
    job: shoal_functions::JobId,
    cancel: CancellationToken,
    retry: Duration,
    task: F,
) where
    F: Fn(shoal_functions::JobId) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    loop {
        match task(job.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(%job, error = %e, ?retry, "{what} failed; restarting");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}
