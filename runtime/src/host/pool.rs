//! The gateway's function-host processes (`shoal gateway`, DESIGN.md §7): a listener for
//! descriptor channels, which host serves which job, and, with [`Hosts::Spawn`], the processes
//! themselves — started on the first descriptor of a job (a cold start), reused warm while the
//! job has work, and stopped after the idle timeout (scale to zero).
//!
//! The pool is the gateway's [`DescriptorSink`] (each delivery goes to the host of its job) and
//! the leaves' [`super::HostHandle::Pool`]: a leaf's `RegisterJob` becomes a `REGISTER` frame,
//! its `CloseRound` a `CLOSE` frame answered by the host's harvest ([`super::channel`]). A job
//! has one host at a time on a node; a host may serve several jobs (external hosts started
//! without `--job`).
//!
//! A host that dies (SIGKILL) loses nothing: its connection ends, [`RemoteSink`] hands back to
//! JetStream every update it had not released or that no harvest took, the job is unassigned,
//! and the next delivery of the job starts (or picks) another host. JetStream redelivers the
//! handed-back updates, the gateway stages them again, and the round commits with each once.
//! A host that hangs instead (stopped, deadlocked: a descriptor or a harvest unanswered for
//! [`PoolConfig::harvest_timeout`]) is abandoned the same way: killed if spawned, its
//! connection ended from this side ([`RemoteSink::abandon`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use shoal_ebpf::EbpfMode;
use shoal_proto::{FunctionId, JobId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channel::{self, ProgressRecord};
use super::remote::RemoteSink;
use super::{CloseRound, Delivery, DescriptorSink, RegisterJob, RoundHarvest, RoundProgress};
use crate::dataplane::{Dataplane, DataplaneConfig};
use crate::error::{Error, Result};
use crate::ingest::ledger::{Link, Settle};
use crate::jobs::JobDirectory;
use crate::metrics::{ChannelTally, Metrics};

/// Who starts function hosts.
#[derive(Debug, Clone)]
pub enum Hosts {
    /// The gateway spawns `shoal function-host` processes itself (the default outside
    /// Kubernetes).
    Spawn(SpawnConfig),
    /// Someone else (the operator) starts them; they connect and register.
    External,
}

/// How the gateway spawns function hosts.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// The executable (`std::env::current_exe()`: this `shoal`).
    pub program: PathBuf,
    /// Its arguments (`function-host` and the node's flags); the pool adds `--function-id`,
    /// `--job` and `--gateway`.
    pub args: Vec<OsString>,
    /// Extra environment (credentials given to the gateway as flags).
    pub envs: Vec<(OsString, OsString)>,
    /// Stop a host that has had no work this long (scale to zero).
    pub idle_timeout: Duration,
}

/// The pool's configuration.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Where the descriptor channel listens (loopback: the hosts run on this node).
    pub listen: SocketAddr,
    /// Who starts hosts.
    pub hosts: Hosts,
    /// Delay before an update handed back (no host in time, a host gone) is delivered again.
    pub hand_back: Duration,
    /// How long a delivery waits for a host (a spawned one to connect, an external one to
    /// register) before its update is handed back.
    pub wait_for_host: Duration,
    /// How long a harvest (`CLOSE`), or a descriptor, waits for the host's answer. A host that
    /// does not answer in time hangs (stopped, deadlocked): it is abandoned like a dead one —
    /// its connection ended, what it held handed back to JetStream, a spawned process killed.
    /// Shorter than the top's collect timeout, so the leaf still answers the collection.
    pub harvest_timeout: Duration,
}

/// A connected host.
#[derive(Debug)]
struct Host {
    sink: RemoteSink,
    /// The job it said it serves (`None`: any).
    job: Option<JobId>,
    last_active: Instant,
    child: Option<tokio::process::Child>,
}

/// A spawned host that has not connected yet.
#[derive(Debug)]
struct Spawned {
    job: JobId,
    child: tokio::process::Child,
    at: Instant,
}

#[derive(Debug, Default)]
struct State {
    hosts: HashMap<FunctionId, Host>,
    assigned: HashMap<JobId, FunctionId>,
    registered: HashMap<JobId, (u64, mpsc::UnboundedSender<RoundProgress>)>,
    spawned: HashMap<FunctionId, Spawned>,
    /// Jobs whose spawned host has not folded yet, with when it was spawned (the cold start a
    /// round sees ends at the first fold: the job's first progress report).
    cold: HashMap<JobId, Instant>,
    next_function: u32,
}

#[derive(Debug)]
struct Inner {
    config: PoolConfig,
    addr: SocketAddr,
    /// The eBPF sidecar on the listener's port (or plain TCP): each host's connection is
    /// registered under its function id between its hello and the welcome.
    dataplane: Dataplane,
    metrics: Arc<Metrics>,
    link: Link,
    directory: JobDirectory,
    state: Mutex<State>,
    changed: Notify,
    next_request: AtomicU64,
}

/// The gateway's function-host processes (module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct HostPool {
    inner: Arc<Inner>,
}

/// Where a delivery goes.
enum Route {
    Host(RemoteSink),
    Assigned(RemoteSink, Option<u64>),
    Wait,
}

impl HostPool {
    /// Binds the descriptor-channel listener, sets up the data plane on its port as `dataplane`
    /// says (the eBPF sidecar, loaded before any host connects so sock_ops sees every channel),
    /// and starts accepting hosts (and, when spawning, the idle reaper) on `tracker` until
    /// `cancel`; then every host is disconnected and every spawned process stopped.
    ///
    /// # Errors
    /// [`Error::Io`] when the listener cannot be bound; [`Error::Ebpf`] when `--ebpf required`
    /// and the sidecar cannot load.
    pub async fn start(
        config: PoolConfig,
        dataplane: &DataplaneConfig,
        metrics: Arc<Metrics>,
        link: Link,
        directory: JobDirectory,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<HostPool> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io("bind the descriptor channel", e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("descriptor channel address", e))?;
        let dataplane = Dataplane::load(dataplane, &[addr.port()])?;
        tracing::info!(
            %addr, hosts = ?config.hosts, ebpf = dataplane.is_attached(),
            "descriptor channel listening for function hosts"
        );
        let pool = HostPool {
            inner: Arc::new(Inner {
                config,
                addr,
                dataplane,
                metrics,
                link,
                directory,
                state: Mutex::default(),
                changed: Notify::new(),
                next_request: AtomicU64::new(1),
            }),
        };
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<ProgressRecord>();
        {
            let (pool, cancel, tracker2) = (pool.clone(), cancel.clone(), tracker.clone());
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = cancel.cancelled() => break,
                        a = listener.accept() => a,
                    };
                    match accepted {
                        Ok((stream, _)) => {
                            let (pool, progress) = (pool.clone(), progress_tx.clone());
                            tracker2.spawn(async move { pool.welcome(stream, progress).await });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a function host failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                pool.stop_all().await;
            });
        }
        {
            let pool = pool.clone();
            tracker.spawn(async move {
                while let Some(p) = progress_rx.recv().await {
                    let mut st = pool.lock();
                    if let Some(at) = st.cold.remove(&p.job) {
                        pool.inner
                            .metrics
                            .function_host_first_fold_seconds
                            .observe(at.elapsed().as_secs_f64());
                    }
                    if let Some((_, tx)) = st.registered.get(&p.job) {
                        let _ = tx.send(RoundProgress { round: p.round, accepted: p.accepted });
                    }
                }
            });
        }
        {
            // The idle reaper (spawned hosts) and the hang watchdog (every host).
            let idle = match &pool.inner.config.hosts {
                Hosts::Spawn(spawn) => Some(spawn.idle_timeout),
                Hosts::External => None,
            };
            let hang = pool.inner.config.harvest_timeout;
            let (pool, cancel) = (pool.clone(), cancel.clone());
            let every =
                (idle.unwrap_or(hang).min(hang) / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tick.tick() => {
                            if let Some(idle) = idle {
                                pool.reap_idle(idle);
                            }
                            pool.abandon_hung(hang);
                        }
                    }
                }
            });
        }
        Ok(pool)
    }

    /// The descriptor channel's address (hosts connect here).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The descriptor data plane (the eBPF sidecar, when loaded): its counters and kill switch.
    pub fn dataplane(&self) -> Dataplane {
        self.inner.dataplane.clone()
    }

    /// Function ids of the connected hosts.
    pub fn hosts(&self) -> Vec<FunctionId> {
        self.lock().hosts.keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshake of a new connection, then the host joins the pool until it disconnects.
    async fn welcome(
        &self,
        mut stream: tokio::net::TcpStream,
        progress: mpsc::UnboundedSender<ProgressRecord>,
    ) {
        let _ = stream.set_nodelay(true);
        let inner = &self.inner;
        let hello = match channel::read_hello(&mut stream, Duration::from_secs(5), &inner.metrics).await {
            Ok(h) => h,
            Err(_) => return, // counted and logged by `read_hello`
        };
        let function = hello.function;
        // Quiet both ways (the hello read, nothing sent yet): register it with the sidecar now,
        // so every frame from the welcome on is counted for this host and redirected.
        let Some(registered) = self.register_channel(&mut stream, function).await else { return };
        match channel::welcome(&mut stream).await {
            Ok(bytes) => {
                ChannelTally::new(Arc::clone(&inner.metrics), function).to_host(channel::WELCOME, bytes)
            }
            Err(e) => {
                tracing::warn!(%function, error = %e, "welcoming a function host failed");
                return;
            }
        }
        let (sink, task) = RemoteSink::serve_split(
            stream,
            function,
            inner.link.clone(),
            Arc::clone(&inner.metrics),
            inner.config.hand_back,
            progress,
        );
        let register = {
            let mut st = self.lock();
            if st.hosts.contains_key(&function) {
                drop(st);
                inner.metrics.channel_error(channel::ChannelErrorKind::Refused);
                tracing::warn!(%function, "a second function host with a connected host's id; disconnected");
                return;
            }
            let spawned = st.spawned.remove(&function);
            let job = spawned.as_ref().map(|s| s.job.clone()).or(hello.job.clone());
            if let Some(s) = &spawned {
                inner.metrics.function_host_cold_start_seconds.observe(s.at.elapsed().as_secs_f64());
            }
            let mut register = None;
            if let Some(job) = &job {
                if !st.assigned.contains_key(job) {
                    st.assigned.insert(job.clone(), function);
                    register = st.registered.get(job).map(|(inc, _)| (job.clone(), *inc));
                }
            }
            st.hosts.insert(
                function,
                Host {
                    sink: sink.clone(),
                    job,
                    last_active: Instant::now(),
                    child: spawned.map(|s| s.child),
                },
            );
            self.update_gauges(&st);
            register
        };
        let redirect = registered.as_ref().is_some_and(crate::dataplane::Registered::is_registered);
        tracing::info!(%function, job = ?hello.job, ebpf = redirect, "function host connected");
        if let Some((job, inc)) = register {
            let _ = sink.register(&job, inc).await;
        }
        // The pool's entry holds the sink from here: when it is dropped (scale to zero,
        // shutdown) the connection ends and the host exits; a clone kept here would keep it open.
        drop(sink);
        inner.changed.notify_waiters();
        let _ = task.await;
        drop(registered);
        self.disconnected(function).await;
    }

    /// Registers a host's connection with the eBPF sidecar under `function`: `Some(guard)`
    /// (`Some(None)`: not registered, plain TCP, after a warning with `--ebpf auto`); `None`
    /// when `--ebpf required` and it cannot be registered (the host is refused).
    async fn register_channel(
        &self,
        stream: &mut tokio::net::TcpStream,
        function: FunctionId,
    ) -> Option<Option<crate::dataplane::Registered>> {
        let plane = &self.inner.dataplane;
        match plane.register(stream, function) {
            Ok(registered) => Some(Some(registered)),
            Err(e) if plane.mode() == EbpfMode::Required => {
                tracing::error!(%function, error = %e, "--ebpf required: the function host's channel cannot be registered with the eBPF sidecar; refused");
                let refusal = channel::ChannelError::Refused("not registered with the eBPF sidecar");
                channel::refuse(stream, &refusal, &self.inner.metrics).await;
                None
            }
            Err(e) => {
                tracing::warn!(%function, error = %e, "function host's channel not registered with the eBPF sidecar: plain TCP, counted as unregistered");
                Some(None)
            }
        }
    }

    /// A host's connection ended: it is forgotten (its updates were handed back by its
    /// [`RemoteSink`]), its jobs unassigned, its process (if spawned) stopped and reaped.
    async fn disconnected(&self, function: FunctionId) {
        let host = {
            let mut st = self.lock();
            let host = st.hosts.remove(&function);
            st.assigned.retain(|_, f| *f != function);
            self.update_gauges(&st);
            host
        };
        self.inner.changed.notify_waiters();
        if let Some(child) = host.and_then(|h| h.child) {
            reap(child, function).await;
        }
    }

    fn update_gauges(&self, st: &State) {
        let m = &self.inner.metrics;
        m.function_hosts.set(st.hosts.len() as i64);
        m.function_hosts_per_job.clear();
        for job in st.assigned.keys() {
            m.function_hosts_per_job.get_or_create(&crate::metrics::JobLabel { job: job.to_string() }).set(1);
        }
    }

    /// Where a delivery of `job` goes now (starting a host when spawning).
    fn route(&self, job: &JobId) -> Route {
        let mut st = self.lock();
        if let Some(f) = st.assigned.get(job).copied() {
            match st.hosts.get_mut(&f) {
                Some(h) if h.sink.is_open() => {
                    h.last_active = Instant::now();
                    return Route::Host(h.sink.clone());
                }
                _ => {
                    st.assigned.remove(job);
                }
            }
        }
        match &self.inner.config.hosts {
            Hosts::Spawn(spawn) => {
                // A spawned host that exited or never connected is given up on.
                let wait = self.inner.config.wait_for_host;
                st.spawned.retain(|f, s| {
                    let gone = s.child.try_wait().ok().flatten().is_some() || s.at.elapsed() > wait;
                    if gone {
                        tracing::warn!(function = %f, job = %s.job, "a spawned function host never connected");
                    }
                    !gone
                });
                if !st.spawned.values().any(|s| &s.job == job) {
                    st.next_function += 1;
                    let function = FunctionId(st.next_function);
                    match self.spawn(spawn, function, job) {
                        Ok(child) => {
                            self.inner.metrics.function_host_spawns.inc();
                            st.cold.insert(job.clone(), Instant::now());
                            st.spawned
                                .insert(function, Spawned { job: job.clone(), child, at: Instant::now() });
                        }
                        Err(e) => tracing::error!(%job, error = %e, "starting a function host failed"),
                    }
                }
                Route::Wait
            }
            Hosts::External => {
                // The host started for this job, else the least busy host that takes any job.
                let load = |f: &FunctionId| st.assigned.values().filter(|g| *g == f).count();
                let pick = st
                    .hosts
                    .iter()
                    .filter(|(_, h)| h.sink.is_open())
                    .filter(|(_, h)| h.job.as_ref().is_none_or(|j| j == job))
                    .min_by_key(|(f, h)| (h.job.is_none(), load(f), f.0))
                    .map(|(f, h)| (*f, h.sink.clone()));
                let Some((f, sink)) = pick else { return Route::Wait };
                st.assigned.insert(job.clone(), f);
                let inc = st.registered.get(job).map(|(i, _)| *i);
                self.update_gauges(&st);
                Route::Assigned(sink, inc)
            }
        }
    }

    fn spawn(
        &self,
        spawn: &SpawnConfig,
        function: FunctionId,
        job: &JobId,
    ) -> std::io::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&spawn.program);
        cmd.args(&spawn.args)
            .arg("--function-id")
            .arg(function.0.to_string())
            .arg("--job")
            .arg(job.as_str())
            .arg("--gateway")
            .arg(self.inner.addr.to_string())
            .envs(spawn.envs.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        tracing::info!(%function, %job, pid = child.id(), "function host spawned (cold start)");
        Ok(child)
    }

    /// Stops spawned hosts that have had no work for `idle`: nothing in flight, nothing folded
    /// that a harvest has not taken, no delivery since.
    fn reap_idle(&self, idle: Duration) {
        let mut stopped = Vec::new();
        {
            let mut st = self.lock();
            let idle_hosts: Vec<FunctionId> = st
                .hosts
                .iter()
                .filter(|(_, h)| h.child.is_some())
                .filter(|(_, h)| h.sink.in_flight() == 0 && h.sink.unharvested() == 0)
                .filter(|(_, h)| h.last_active.elapsed() >= idle)
                .map(|(f, _)| *f)
                .collect();
            for f in idle_hosts {
                if let Some(h) = st.hosts.remove(&f) {
                    st.assigned.retain(|_, g| *g != f);
                    stopped.push((f, h));
                }
            }
            if !stopped.is_empty() {
                self.update_gauges(&st);
            }
        }
        for (function, host) in stopped {
            tracing::info!(%function, job = ?host.job, "function host idle; stopped (scale to zero)");
            self.inner.metrics.function_host_stops.inc();
            // Dropping the sink closes the connection (the last sender of its mailbox goes); the
            // host process exits on its own.
            drop(host.sink);
            if let Some(child) = host.child {
                tokio::spawn(reap(child, function));
            }
        }
    }

    /// Disconnects every host and stops the spawned ones (shutdown).
    async fn stop_all(&self) {
        let (hosts, spawned) = {
            let mut st = self.lock();
            st.assigned.clear();
            let hosts: Vec<(FunctionId, Host)> = st.hosts.drain().collect();
            let spawned: Vec<(FunctionId, Spawned)> = st.spawned.drain().collect();
            (hosts, spawned)
        };
        let mut children = Vec::new();
        for (f, h) in hosts {
            drop(h.sink);
            if let Some(c) = h.child {
                children.push((f, c));
            }
        }
        children.extend(spawned.into_iter().map(|(f, s)| (f, s.child)));
        futures::stream::iter(children).for_each_concurrent(None, |(f, c)| reap(c, f)).await;
    }

    /// A leaf registers for its job's progress (sent to the job's host, now and whenever
    /// another host takes the job).
    pub async fn register(&self, msg: RegisterJob) {
        let sink = {
            let mut st = self.lock();
            st.registered.insert(msg.job.clone(), (msg.incarnation, msg.progress));
            st.assigned.get(&msg.job).and_then(|f| st.hosts.get(f)).map(|h| h.sink.clone())
        };
        if let Some(sink) = sink {
            let _ = sink.register(&msg.job, msg.incarnation).await;
        }
    }

    /// Takes (job, round)'s harvest from the job's host; an empty one when no host serves it
    /// (or its host died meanwhile: what it held went back to JetStream).
    pub async fn close(&self, msg: CloseRound) -> RoundHarvest {
        let sink = {
            let st = self.lock();
            st.assigned.get(&msg.job).and_then(|f| st.hosts.get(f)).map(|h| h.sink.clone())
        };
        let (Some(sink), Some(entry)) = (sink, self.inner.directory.get(&msg.job)) else {
            return RoundHarvest::default();
        };
        let request = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let bound = self.inner.config.harvest_timeout;
        let answer =
            match tokio::time::timeout(bound, sink.close(request, &msg, Arc::clone(&entry.manifest))).await {
                Ok(answer) => answer,
                Err(_) => {
                    self.abandon(&sink, bound);
                    return RoundHarvest::default();
                }
            };
        match answer {
            Ok(h) => {
                if !h.held.is_empty() {
                    if let Some(host) = self.lock().hosts.get_mut(&sink.function()) {
                        host.last_active = Instant::now();
                    }
                }
                h
            }
            Err(e) => {
                tracing::warn!(job = %msg.job, round = %msg.round, error = %e, "no harvest from the job's function host");
                RoundHarvest::default()
            }
        }
    }
}

impl HostPool {
    /// Abandons every host that has left a descriptor unanswered (no frame at all since it
    /// was written) for `bound`: it is stopped or deadlocked, and the round would otherwise
    /// wait for its deadline.
    fn abandon_hung(&self, bound: Duration) {
        let hung: Vec<RemoteSink> = self
            .lock()
            .hosts
            .values()
            .filter(|h| h.sink.is_open() && h.sink.unanswered_for().is_some_and(|t| t >= bound))
            .map(|h| h.sink.clone())
            .collect();
        for sink in hung {
            self.abandon(&sink, bound);
        }
    }

    /// Gives up on a host that did not answer a harvest or a descriptor within `bound`: a
    /// spawned process is
    /// killed at once (SIGKILL: it may be stopped), and the connection is ended from this side,
    /// which hands back what the host held exactly as when it dies ([`RemoteSink::abandon`]).
    /// The job is unassigned; its next delivery starts (or picks) another host.
    fn abandon(&self, sink: &RemoteSink, bound: Duration) {
        let function = sink.function();
        let child = {
            let mut st = self.lock();
            st.assigned.retain(|_, f| *f != function);
            self.update_gauges(&st);
            st.hosts.get_mut(&function).and_then(|h| h.child.take())
        };
        self.inner.metrics.function_host_hangs.inc();
        tracing::warn!(
            %function, pid = child.as_ref().and_then(tokio::process::Child::id), ?bound,
            "function host did not answer a harvest or a descriptor in time; abandoned (killed if spawned), what it held is handed back"
        );
        if let Some(mut child) = child {
            let _ = child.start_kill();
            tokio::spawn(reap(child, function));
        }
        sink.abandon();
        self.inner.changed.notify_waiters();
    }
}

/// Waits for a stopping host process (its connection is closed) and kills it if it lingers.
async fn reap(mut child: tokio::process::Child, function: FunctionId) {
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(status) => tracing::debug!(%function, ?status, "function host exited"),
        Err(_) => {
            tracing::warn!(%function, "function host did not exit; killed");
            let _ = child.kill().await;
        }
    }
}

impl DescriptorSink for HostPool {
    fn deliver(&self, d: Delivery) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let job = d.descriptor.job.clone();
            let deadline = Instant::now() + self.inner.config.wait_for_host;
            loop {
                let changed = self.inner.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let sink = match self.route(&job) {
                    Route::Host(sink) => sink,
                    Route::Assigned(sink, inc) => {
                        if let Some(inc) = inc {
                            let _ = sink.register(&job, inc).await;
                        }
                        sink
                    }
                    Route::Wait => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                            let seq = d.descriptor.stream_seq;
                            tracing::warn!(%job, stream_seq = seq, "no function host in time; update handed back");
                            self.inner.link.settle(seq, Settle::Nak(self.inner.config.hand_back));
                            return Err(Error::Gone("function host"));
                        }
                        continue;
                    }
                };
                let seq = d.descriptor.stream_seq;
                return match sink.deliver(d).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        // The connection ended under the delivery (dropped with the failed
                        // send): its update is not in flight there, so hand it back here.
                        tracing::warn!(%job, error = %e, "function host gone during a delivery; update handed back");
                        self.inner.link.settle(seq, Settle::Nak(self.inner.config.hand_back));
                        Err(e)
                    }
                };
            }
        })
    }
}
