//! A function-host process (`shoal function-host`): the aggregator actors of this node's jobs,
//! fed by the gateway's descriptor channel.
//!
//! It reads the job specs from NATS (the job watch, nothing else: it pulls no update and acks
//! nothing), connects to the gateway's channel (`--gateway`, or the address the gateway answers
//! on `<p>.node.<node>.channel`), says hello with its [`FunctionId`] and job, and serves
//! descriptors from its read-only mappings of the gateway's segments
//! ([`super::remote::serve_gateway`]). Each connection gets a fresh [`FunctionHost`]: after a
//! reconnect (a restarted gateway) nothing the old one folded is reused, since the gateway hands
//! those updates back to JetStream. A spawned host exits when its connection ends; an external
//! one reconnects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use bytes::Bytes;
use shoal_functions::NodeId;
use shoal_proto::config::Timings;
use shoal_proto::{FunctionId, JobId};
use tokio_util::sync::CancellationToken;

use super::channel::{self, SegmentCache};
use super::remote::{serve_gateway, HostSide};
use super::{FunctionHost, HostConfig, InProcess};
use crate::error::{Error, Result};
use crate::http::Probe;
use crate::ingest::ledger::Link;
use crate::jobs::{self, JobDirectory};
use crate::metrics::Metrics;
use crate::nats::{ConnectOptions, Infra};

/// How to run a function-host process.
#[derive(Debug, Clone)]
pub struct HostProcess {
    /// The node (names its shared-memory directory and the discovery subject).
    pub node: NodeId,
    /// The node's shared-memory directory, `<shm_dir>/<node>`.
    pub node_dir: PathBuf,
    /// The gateway's descriptor channel (`None`: ask the gateway over NATS).
    pub gateway: Option<SocketAddr>,
    /// This host's id.
    pub function: FunctionId,
    /// The job it serves (`None`: any the gateway gives it).
    pub job: Option<JobId>,
    /// NATS connection (URL and prefix set).
    pub nats: ConnectOptions,
    /// Aggregator settings.
    pub host: HostConfig,
    /// Protocol timings (job watch, hand-back delay).
    pub timings: Timings,
    /// Exit when the connection ends (a host the gateway spawned) instead of reconnecting.
    pub exit_on_disconnect: bool,
    /// What the process's HTTP listener reports.
    pub probe: Probe,
}

/// Delay between attempts to reach the gateway.
const RECONNECT: Duration = Duration::from_millis(200);

/// Runs the host until `cancel` (or, with `exit_on_disconnect`, until its connection ends).
///
/// # Errors
/// NATS connection errors.
pub async fn run(p: HostProcess, cancel: CancellationToken) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    p.probe.set_metrics(Arc::clone(&metrics));
    p.probe.not_ready("NATS and the gateway's descriptor channel");
    let infra = Infra::connect(&p.nats).await?;
    let directory = JobDirectory::default();
    {
        let (infra, directory, timings, cancel) =
            (infra.clone(), directory.clone(), p.timings.clone(), cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = jobs::watch_jobs(infra, directory, timings, cancel, |_| {}).await {
                tracing::error!(error = %e, "job watch stopped");
            }
        });
    }
    if let Some(job) = &p.job {
        // Descriptors of a job the host does not know are handed back: wait for the spec first.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while directory.get(job).is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let hand_back = shoal_proto::config::ms(p.timings.nak_retry_ms);
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let end = match connect(&p, &infra).await {
            Ok(stream) => {
                p.probe.ready();
                tracing::info!(function = %p.function, job = ?p.job, "connected to the gateway");
                let (link, feedback) = Link::forwarding();
                let host =
                    FunctionHost::new(p.host.clone(), Arc::clone(&metrics), directory.clone(), link).start();
                let side = HostSide {
                    segments: SegmentCache::new(p.node_dir.clone()),
                    host: Arc::new(InProcess(host.clone())),
                    feedback,
                    metrics: Arc::clone(&metrics),
                    hand_back,
                    process: Some((host, directory.clone())),
                };
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    end = serve_gateway(stream, side) => format!("{:?}", end),
                }
            }
            Err(e) => e.to_string(),
        };
        p.probe.not_ready("the gateway's descriptor channel");
        if p.exit_on_disconnect {
            tracing::info!(function = %p.function, end, "the gateway's channel ended; exiting");
            return Ok(());
        }
        tracing::warn!(function = %p.function, end, "the gateway's channel ended; reconnecting");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RECONNECT) => {}
        }
    }
}

/// Connects to the gateway and says hello.
async fn connect(p: &HostProcess, infra: &Infra) -> Result<tokio::net::TcpStream> {
    let addr = match p.gateway {
        Some(a) => a,
        None => discover(infra, &p.node).await?,
    };
    let mut stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|e| Error::io("connect to the gateway", e))?;
    let _ = stream.set_nodelay(true);
    channel::hello_for(&mut stream, p.function, p.job.as_ref())
        .await
        .map_err(|e| Error::io("descriptor channel handshake", std::io::Error::other(e)))?;
    Ok(stream)
}

/// Asks the node's gateway for its descriptor channel's address.
async fn discover(infra: &Infra, node: &NodeId) -> Result<SocketAddr> {
    let subject = infra.subjects.node_channel(node);
    let reply = infra
        .client
        .request(subject, Bytes::new())
        .await
        .map_err(|e| Error::nats("ask the gateway for its descriptor channel", e))?;
    let text = String::from_utf8_lossy(&reply.payload);
    text.parse()
        .map_err(|e| Error::Decode { what: "descriptor channel address", detail: format!("{text}: {e}") })
}
