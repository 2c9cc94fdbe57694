//! Both ends of a descriptor channel ([`super::channel`]) as a gateway and a function-host
//! process use them.
//!
//! - Gateway: [`RemoteSink`] is the [`DescriptorSink`] of one connected function host. It keeps
//!   each delivered update (its slot lease and backlog token) until the host's `RELEASE` or
//!   `SETTLE`, forwards the host's feedback to the ledger's [`Link`], and when the connection
//!   ends hands every update still in flight back to JetStream (`Settle::Nak`): it is staged
//!   again and delivered anew, so nothing is lost, and a host that died before releasing an
//!   update took whatever it folded from it along (its partial never reached a commit).
//! - Function host: [`serve_gateway`] reads descriptors, checks each against the read-only
//!   segments ([`SegmentCache`]), hands the view to the local host, and sends the host's
//!   feedback back. A descriptor that fails the checks (no such slot, a stale generation, a
//!   missing or corrupt segment) is refused, counted and handed back to the gateway, never read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use shoal_ebpf::EbpfMode;
use shoal_proto::descriptor::UpdateDescriptor;
use shoal_proto::{FunctionId, JobId};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::channel::{self, ChannelError, ChannelErrorKind, HostFrame, SegmentCache};
use super::{CloseRound, Delivery, DescriptorSink, Held, RoundHarvest, MAILBOX};
use crate::dataplane::{Dataplane, DataplaneConfig};
use crate::error::{Error, Result};
use crate::ingest::demand::Unfolded;
use crate::ingest::ledger::{Feedback, FeedbackReceiver, Link, Settle};
use crate::metrics::Metrics;
use crate::staging::ViewGuard;

type InFlight = Arc<Mutex<HashMap<u64, Delivery>>>;

/// What the gateway writes to a host: a delivery, or a control frame (`REGISTER`, `CLOSE`).
#[derive(Debug)]
enum Outgoing {
    Delivery(Delivery),
    Register(channel::Register),
    Close(channel::CloseRequest),
}

/// A `CLOSE` waiting for its harvest: the job's manifest (the values must fit it), the values
/// received so far, and who waits.
#[derive(Debug)]
struct PendingClose {
    manifest: Arc<shoal_functions::ModelManifest>,
    values: Vec<f64>,
    done: oneshot::Sender<RoundHarvest>,
}

/// Gateway-side state of a split host (a function-host process that runs the aggregators):
/// the updates it folded and no harvest took yet, its open `CLOSE` requests, and where its
/// progress goes.
#[derive(Debug, Default)]
struct Split {
    /// Stream sequences delivered to the host and not yet harvested or settled: if the host
    /// dies, what it folded from them dies with it, so they go back to JetStream.
    unharvested: std::collections::HashSet<u64>,
    requests: HashMap<u64, PendingClose>,
}

type SplitState = Arc<Mutex<Split>>;

/// When the gateway last wrote a descriptor to a host and last read any frame from it
/// (milliseconds since `base`, 0: never). Every descriptor draws an answer soon (a release
/// after the fold, a progress report when kept for the close, a settle when refused), so a
/// descriptor written after the last frame read and unanswered for long means a hung host.
#[derive(Debug)]
struct Liveness {
    base: Instant,
    delivered_ms: std::sync::atomic::AtomicU64,
    heard_ms: std::sync::atomic::AtomicU64,
}

impl Liveness {
    fn new() -> Liveness {
        Liveness { base: Instant::now(), delivered_ms: 0.into(), heard_ms: 0.into() }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn delivered(&self) {
        self.delivered_ms.store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    fn heard(&self) {
        self.heard_ms.store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    fn unanswered_for(&self) -> Option<Duration> {
        let delivered = self.delivered_ms.load(std::sync::atomic::Ordering::Relaxed);
        let heard = self.heard_ms.load(std::sync::atomic::Ordering::Relaxed);
        (delivered > heard).then(|| Duration::from_millis(self.now_ms().saturating_sub(delivered)))
    }
}

/// The gateway's sink for one connected function-host process.
#[derive(Debug, Clone)]
pub struct RemoteSink {
    function: FunctionId,
    tx: mpsc::Sender<Outgoing>,
    in_flight: InFlight,
    split: Option<SplitState>,
    /// Ends the connection from this side ([`Self::abandon`]).
    abandon: tokio_util::sync::CancellationToken,
    liveness: Arc<Liveness>,
}

impl DescriptorSink for RemoteSink {
    fn deliver(&self, d: Delivery) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.tx.send(Outgoing::Delivery(d)).await.map_err(|_| Error::Gone("function-host connection"))
        })
    }
}

impl RemoteSink {
    /// Serves a welcomed connection ([`channel::accept`]) of host `function`: descriptors out,
    /// feedback in to `link`. The returned task ends when the connection does, after handing
    /// what was in flight back to JetStream with `hand_back` delay.
    pub fn serve(
        stream: TcpStream,
        function: FunctionId,
        link: Link,
        metrics: Arc<Metrics>,
        hand_back: Duration,
    ) -> (RemoteSink, tokio::task::JoinHandle<()>) {
        Self::serve_inner(stream, function, link, metrics, hand_back, None)
    }

    /// Like [`Self::serve`] for a host process that runs the aggregators itself (`shoal
    /// gateway`): its round progress goes to `progress`, [`Self::close`] takes its harvests,
    /// and when the connection ends, every update it folded that no harvest took is handed back
    /// to JetStream too (its partial died with it).
    pub fn serve_split(
        stream: TcpStream,
        function: FunctionId,
        link: Link,
        metrics: Arc<Metrics>,
        hand_back: Duration,
        progress: mpsc::UnboundedSender<channel::ProgressRecord>,
    ) -> (RemoteSink, tokio::task::JoinHandle<()>) {
        Self::serve_inner(stream, function, link, metrics, hand_back, Some(progress))
    }

    fn serve_inner(
        stream: TcpStream,
        function: FunctionId,
        link: Link,
        metrics: Arc<Metrics>,
        hand_back: Duration,
        progress: Option<mpsc::UnboundedSender<channel::ProgressRecord>>,
    ) -> (RemoteSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(MAILBOX);
        let in_flight: InFlight = Arc::default();
        let split: Option<SplitState> = progress.as_ref().map(|_| Arc::default());
        let abandon = tokio_util::sync::CancellationToken::new();
        let liveness = Arc::new(Liveness::new());
        let sink = RemoteSink {
            function,
            tx,
            in_flight: Arc::clone(&in_flight),
            split: split.clone(),
            abandon: abandon.clone(),
            liveness: Arc::clone(&liveness),
        };
        let task = tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            let tally = crate::metrics::ChannelTally::new(Arc::clone(&metrics), function);
            let ends = Ends {
                in_flight: &in_flight,
                link: &link,
                metrics: &metrics,
                split: split.as_ref(),
                tally: &tally,
                liveness: &liveness,
            };
            let end = tokio::select! {
                e = write_descriptors(&mut w, rx, &ends) => e,
                e = read_feedback(&mut r, &ends, progress.as_ref()) => e,
                () = abandon.cancelled() => ChannelError::Abandoned,
            };
            if end.kind() != ChannelErrorKind::Disconnected {
                metrics.channel_error(end.kind());
            }
            let mut left: Vec<u64> = lock(&in_flight).drain().map(|(seq, _)| seq).collect();
            if let Some(split) = &split {
                let mut s = lock_split(split);
                left.extend(s.unharvested.drain());
                // Waiters of open CLOSE requests get an error (their sender is dropped).
                s.requests.clear();
            }
            left.sort_unstable();
            left.dedup();
            if matches!(end, ChannelError::Stopped) && left.is_empty() {
                tracing::info!(%function, "function host connection closed (host stopped)");
            } else {
                tracing::warn!(%function, error = %end, handed_back = left.len(), "function host connection ended");
            }
            for seq in left {
                link.settle(seq, Settle::Nak(hand_back));
            }
        });
        (sink, task)
    }

    /// The host's function id.
    pub fn function(&self) -> FunctionId {
        self.function
    }

    /// Updates delivered to the host and not yet released or settled by it.
    pub fn in_flight(&self) -> usize {
        lock(&self.in_flight).len()
    }

    /// Updates delivered to a split host that no harvest has taken yet (0 for other hosts).
    pub fn unharvested(&self) -> usize {
        self.split.as_ref().map_or(0, |s| lock_split(s).unharvested.len())
    }

    /// Whether the connection still runs.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed() && !self.abandon.is_cancelled()
    }

    /// How long the last descriptor written has gone without any frame from the host since
    /// (`None`: the host has answered since its last descriptor).
    pub fn unanswered_for(&self) -> Option<Duration> {
        self.liveness.unanswered_for()
    }

    /// Ends the connection from the gateway's side, as if the host had died: everything in
    /// flight and every folded update no harvest took goes back to JetStream, open `CLOSE`
    /// requests fail. For a host that hangs (stopped, deadlocked) rather than dies.
    pub fn abandon(&self) {
        self.abandon.cancel();
    }

    /// Asks the host to report the progress of `job`.
    ///
    /// # Errors
    /// [`Error::Gone`] when the connection has ended.
    pub async fn register(&self, job: &JobId, incarnation: u64) -> Result<()> {
        let r = channel::Register { job: job.clone(), incarnation };
        self.tx.send(Outgoing::Register(r)).await.map_err(|_| Error::Gone("function-host connection"))
    }

    /// Takes the harvest of (job, round) from a split host (`manifest`: the job's, which the
    /// partial must fit).
    ///
    /// # Errors
    /// [`Error::Gone`] when the connection ends before the answer (the updates it covered are
    /// handed back to JetStream), [`Error::Config`] on a sink that is not a split host's.
    pub async fn close(
        &self,
        request: u64,
        close: &CloseRound,
        manifest: Arc<shoal_functions::ModelManifest>,
    ) -> Result<RoundHarvest> {
        let Some(split) = &self.split else {
            return Err(Error::Gone("a split function host"));
        };
        let (done, answer) = oneshot::channel();
        lock_split(split).requests.insert(request, PendingClose { manifest, values: Vec::new(), done });
        let req =
            channel::CloseRequest { request, job: close.job.clone(), round: close.round, seal: close.seal };
        self.tx.send(Outgoing::Close(req)).await.map_err(|_| Error::Gone("function-host connection"))?;
        answer.await.map_err(|_| Error::Gone("function-host connection"))
    }
}

fn lock(m: &InFlight) -> std::sync::MutexGuard<'_, HashMap<u64, Delivery>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_split(m: &SplitState) -> std::sync::MutexGuard<'_, Split> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What both halves of a gateway-side connection share.
struct Ends<'a> {
    in_flight: &'a InFlight,
    link: &'a Link,
    metrics: &'a Metrics,
    split: Option<&'a SplitState>,
    /// The frames written and read, by type.
    tally: &'a crate::metrics::ChannelTally,
    liveness: &'a Liveness,
}

async fn write_descriptors(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    ends: &Ends<'_>,
) -> ChannelError {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Outgoing::Delivery(d) => {
                let descriptor = d.descriptor.clone();
                // Held before it is sent, so the host's answer always finds it.
                lock(ends.in_flight).insert(descriptor.stream_seq, d);
                if let Some(split) = ends.split {
                    lock_split(split).unharvested.insert(descriptor.stream_seq);
                }
                let sent = channel::send_descriptor(w, &descriptor).await;
                if sent.is_ok() {
                    ends.metrics.descriptors_sent.inc();
                    ends.liveness.delivered();
                }
                sent.map(|n| (channel::DESCRIPTOR, n))
            }
            Outgoing::Register(r) => channel::send_register(w, &r).await.map(|n| (channel::REGISTER, n)),
            Outgoing::Close(c) => channel::send_close(w, &c).await.map(|n| (channel::CLOSE, n)),
        };
        match sent {
            Ok((kind, bytes)) => ends.tally.to_host(kind, bytes),
            Err(e) => return e,
        }
    }
    // Every sender is gone: the gateway let this host go.
    ChannelError::Stopped
}

async fn read_feedback(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    ends: &Ends<'_>,
    progress: Option<&mpsc::UnboundedSender<channel::ProgressRecord>>,
) -> ChannelError {
    loop {
        let frame = match channel::read_frame(r).await.and_then(|(kind, body)| {
            ends.liveness.heard();
            ends.tally.to_gateway(kind, 5 + body.len());
            channel::decode_host_frame(kind, &body)
        }) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let f = match frame {
            HostFrame::Feedback(f) => f,
            HostFrame::Progress(p) => {
                if let Some(tx) = progress {
                    let _ = tx.send(p);
                }
                continue;
            }
            HostFrame::HarvestChunk(request, values) => {
                if let Err(e) = harvest_chunk(ends, request, &values) {
                    return e;
                }
                continue;
            }
            HostFrame::Harvest(record) => {
                if let Err(e) = harvest_done(ends, record) {
                    return e;
                }
                continue;
            }
        };
        let seq = match &f {
            Feedback::Release { stream_seq } => {
                ends.metrics.releases_received.inc();
                *stream_seq
            }
            Feedback::Settle { stream_seq, .. } => {
                if let Some(split) = ends.split {
                    lock_split(split).unharvested.remove(stream_seq);
                }
                *stream_seq
            }
        };
        // Dropping the delivery returns the slot lease (once the ledger lets go too) and
        // takes the update out of the backlog.
        drop(lock(ends.in_flight).remove(&seq));
        ends.link.feedback(f);
    }
}

/// Appends a harvest chunk to its request; more values than the job's model has, or a chunk
/// for no request, ends the connection (the host is not trusted to be right).
fn harvest_chunk(ends: &Ends<'_>, request: u64, values: &[f64]) -> Result<(), ChannelError> {
    let Some(split) = ends.split else {
        return Err(ChannelError::Malformed { what: "harvest chunk", detail: "not a split host".into() });
    };
    let mut s = lock_split(split);
    let Some(p) = s.requests.get_mut(&request) else {
        return Err(ChannelError::Malformed {
            what: "harvest chunk",
            detail: format!("no request {request}"),
        });
    };
    let numel = p.manifest.numel();
    if p.values.len() + values.len() > numel {
        return Err(ChannelError::Malformed {
            what: "harvest chunk",
            detail: format!("more than the model's {numel} values"),
        });
    }
    if p.values.capacity() == 0 {
        p.values.reserve_exact(numel);
    }
    p.values.extend_from_slice(values);
    Ok(())
}

/// Completes a harvest: rebuilds the partial from its chunks, and for each update it covers
/// whose bytes the host kept, the gateway's own view of the slot.
fn harvest_done(ends: &Ends<'_>, record: channel::HarvestRecord) -> Result<(), ChannelError> {
    let bad = |detail: String| ChannelError::Malformed { what: "harvest", detail };
    let Some(split) = ends.split else { return Err(bad("not a split host".into())) };
    let mut s = lock_split(split);
    let Some(p) = s.requests.remove(&record.request) else {
        return Err(bad(format!("no request {}", record.request)));
    };
    if p.values.len() as u64 != record.values {
        return Err(bad(format!("{} values announced, {} received", record.values, p.values.len())));
    }
    let partial = if record.values == 0 {
        None
    } else {
        let built = shoal_functions::PartialAggregate::from_parts(
            Arc::clone(&p.manifest),
            p.values,
            record.first_owners,
            record.total_weight,
            record.count,
        );
        Some(built.map_err(|e| bad(e.to_string()))?)
    };
    let in_flight = lock(ends.in_flight);
    let held = record
        .held
        .into_iter()
        .map(|h| {
            s.unharvested.remove(&h.stream_seq);
            let slot = if h.kept { in_flight.get(&h.stream_seq).map(|d| d.view.clone()) } else { None };
            Held {
                client: h.client,
                num_examples: h.num_examples,
                slot,
                asynchronous: h.asynchronous,
                stream_seq: h.stream_seq,
                fold_weight: h.fold_weight,
                staleness: h.staleness,
            }
        })
        .collect();
    let last_fold =
        record.last_fold_age_ms.and_then(|a| Instant::now().checked_sub(Duration::from_millis(a)));
    let _ = p.done.send(RoundHarvest { partial, held, last_fold });
    Ok(())
}

/// The record of one harvested update that crosses the channel to the gateway.
fn harvested(x: &Held) -> channel::HarvestedUpdate {
    channel::HarvestedUpdate {
        client: x.client.clone(),
        num_examples: x.num_examples,
        stream_seq: x.stream_seq,
        asynchronous: x.asynchronous,
        kept: x.slot.is_some(),
        fold_weight: x.fold_weight,
        staleness: x.staleness,
    }
}

/// Reports its stream sequence when the last view of a slot is dropped.
struct ReleaseOnDrop(u64, mpsc::UnboundedSender<u64>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

/// What a function-host process needs to serve its gateway's descriptors.
#[derive(Debug)]
pub struct HostSide {
    /// The gateway's segments, read-only.
    pub segments: SegmentCache,
    /// The local function host.
    pub host: Arc<dyn DescriptorSink>,
    /// The feedback of the local host (its [`Link::forwarding`] end).
    pub feedback: FeedbackReceiver,
    /// Metrics of the process.
    pub metrics: Arc<Metrics>,
    /// Delay before a refused descriptor's update is delivered again.
    pub hand_back: Duration,
    /// A function-host process (`shoal function-host`): its aggregators' host, which answers
    /// `REGISTER` and `CLOSE`, and its view of the jobs (a descriptor of a job it does not know
    /// yet is handed back, not refused). `None` inside a node (`loopback`), whose leaves talk
    /// to the host directly.
    pub process: Option<(actix::Addr<super::FunctionHost>, crate::jobs::JobDirectory)>,
}

/// Host-side events the connection loop writes out.
enum HostEvent {
    Progress(channel::ProgressRecord),
    Harvest(u64, RoundHarvest),
}

/// Function-host side of a welcomed connection ([`channel::hello`]): runs until it ends.
///
/// # Errors
/// The error that ended the connection (`Closed` when the gateway closed it cleanly).
pub async fn serve_gateway(stream: TcpStream, mut side: HostSide) -> Result<(), ChannelError> {
    let (mut r, mut w) = stream.into_split();
    let mut descriptors: HashMap<u64, UpdateDescriptor> = HashMap::new();
    // Views dropped: the host is done with those slots, whether it said so (streaming folds
    // release explicitly) or not (whole-cohort rounds drop their views after the commit).
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let (events_tx, mut events) = mpsc::unbounded_channel::<HostEvent>();
    loop {
        tokio::select! {
            Some(stream_seq) = dropped.recv() => {
                if let Some(d) = descriptors.remove(&stream_seq) {
                    channel::send_release(&mut w, &d).await?;
                }
            }
            Some(e) = events.recv() => match e {
                HostEvent::Progress(p) => channel::send_progress(&mut w, &p).await.map(|_| ())?,
                HostEvent::Harvest(request, h) => {
                    let record = channel::HarvestRecord {
                        request,
                        values: 0,
                        total_weight: h.partial.as_ref().map_or(0.0, |p| p.total_weight()),
                        count: h.partial.as_ref().map_or(0, |p| p.count()),
                        first_owners: h.partial.as_ref().map(|p| p.first_owners().to_vec()).unwrap_or_default(),
                        held: h.held.iter().map(harvested).collect(),
                        last_fold_age_ms: h.last_fold.map(|t| t.elapsed().as_millis() as u64),
                    };
                    let values = h.partial.as_ref().map(|p| p.values()).unwrap_or(&[]);
                    channel::send_harvest(&mut w, record, values).await?;
                    // Kept views drop here: their RELEASE frames follow the harvest.
                    drop(h);
                }
            },
            frame = channel::read_frame(&mut r) => {
                let (kind, body) = frame?;
                let d = match channel::decode_gateway_frame(kind, &body) {
                    Ok(channel::GatewayFrame::Descriptor(d)) => d,
                    Ok(channel::GatewayFrame::Register(reg)) => {
                        register(&side, reg, &events_tx).await?;
                        continue;
                    }
                    Ok(channel::GatewayFrame::Close(c)) => {
                        close(&side, c, &events_tx);
                        continue;
                    }
                    Err(e) => {
                        // Framing held: skip the record (no stream sequence to answer).
                        side.metrics.channel_error(e.kind());
                        tracing::warn!(error = %e, "descriptor frame refused");
                        continue;
                    }
                };
                if let Some((_, directory)) = &side.process {
                    if directory.get(&d.job).is_none() {
                        // The job watch has not seen it yet: hand it back, do not refuse it.
                        tracing::debug!(job = %d.job, "descriptor of a job not known yet; handed back");
                        channel::send_settle(&mut w, d.stream_seq, &Settle::Nak(side.hand_back)).await?;
                        continue;
                    }
                }
                match side.segments.view(&d) {
                    Ok(view) => {
                        descriptors.insert(d.stream_seq, d.clone());
                        let view = view.guarded(ViewGuard::new(ReleaseOnDrop(d.stream_seq, dropped_tx.clone())));
                        let delivery = Delivery {
                            descriptor: d,
                            view,
                            received: Instant::now(),
                            start: None,
                            unfolded: Unfolded::uncounted(),
                            stream: None,
                        };
                        if side.host.deliver(delivery).await.is_err() {
                            return Err(ChannelError::Closed);
                        }
                    }
                    Err(e) => {
                        side.metrics.descriptor_refused(e.kind());
                        tracing::warn!(error = %e, stream_seq = d.stream_seq, "descriptor refused; handed back");
                        channel::send_settle(&mut w, d.stream_seq, &Settle::Nak(side.hand_back)).await?;
                    }
                }
            }
            f = side.feedback.recv() => {
                let Some(f) = f else { return Err(ChannelError::Closed) };
                match f {
                    Feedback::Release { stream_seq } => {
                        if let Some(d) = descriptors.remove(&stream_seq) {
                            channel::send_release(&mut w, &d).await?;
                        }
                    }
                    Feedback::Settle { stream_seq, settle } => {
                        descriptors.remove(&stream_seq);
                        channel::send_settle(&mut w, stream_seq, &settle).await?;
                    }
                }
            }
        }
    }
}

/// `REGISTER`: the job's progress, tagged with the job, goes out as `PROGRESS` frames.
async fn register(
    side: &HostSide,
    reg: channel::Register,
    events: &mpsc::UnboundedSender<HostEvent>,
) -> Result<(), ChannelError> {
    let Some((host, _)) = &side.process else {
        side.metrics.channel_error(ChannelErrorKind::Malformed);
        tracing::warn!("REGISTER sent to a host without aggregators of its own; ignored");
        return Ok(());
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<super::RoundProgress>();
    let job = reg.job.clone();
    let events = events.clone();
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let rec = channel::ProgressRecord { job: job.clone(), round: p.round, accepted: p.accepted };
            if events.send(HostEvent::Progress(rec)).is_err() {
                return;
            }
        }
    });
    host.send(super::RegisterJob { job: reg.job, incarnation: reg.incarnation, progress: tx })
        .await
        .map_err(|_| ChannelError::Closed)
}

/// `CLOSE`: the host's harvest, answered when every queued update is folded.
fn close(side: &HostSide, c: channel::CloseRequest, events: &mpsc::UnboundedSender<HostEvent>) {
    let Some((host, _)) = &side.process else {
        side.metrics.channel_error(ChannelErrorKind::Malformed);
        tracing::warn!("CLOSE sent to a host without aggregators of its own; ignored");
        return;
    };
    let (host, events) = (host.clone(), events.clone());
    tokio::spawn(async move {
        let msg = CloseRound { job: c.job, round: c.round, seal: c.seal };
        let harvest = host.send(msg).await.unwrap_or_default();
        let _ = events.send(HostEvent::Harvest(c.request, harvest));
    });
}

/// Connects a function host in this process to its gateway over loopback TCP (the handshake
/// included) and serves both ends on `tracker` until `cancel`: the descriptor path of separate
/// processes, everything else unchanged ([`crate::node::DescriptorChannel::LoopbackTcp`]).
///
/// The data plane is set up as `dataplane` says, between binding the listener (its port selects
/// the sockets) and connecting (sock_ops puts both ends into the SOCKHASH as they connect); the
/// connection is registered under the host's function id once the handshake is over, so every
/// descriptor and release after it is counted for that function and, while the kill switch is
/// on, redirected by SK_MSG.
///
/// # Errors
/// [`Error::Io`] when the loopback socket cannot be set up or the handshake fails;
/// [`Error::Ebpf`] in `--ebpf required` mode when the sidecar cannot load or the connection
/// cannot be registered.
pub async fn loopback(
    side: HostSide,
    link: Link,
    dataplane: &DataplaneConfig,
    tracker: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(RemoteSink, Dataplane)> {
    let io = |what: &'static str| move |e: std::io::Error| Error::io(what, e);
    let listener =
        tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(io("bind the descriptor channel"))?;
    let addr = listener.local_addr().map_err(io("descriptor channel address"))?;
    let plane = Dataplane::load(dataplane, &[addr.port()])?;
    let (conn, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut host_conn, (mut gw_conn, _)) = (
        conn.map_err(io("connect the descriptor channel"))?,
        accepted.map_err(io("accept the descriptor channel"))?,
    );
    let _ = host_conn.set_nodelay(true);
    let _ = gw_conn.set_nodelay(true);
    let function = FunctionId(1);
    let timeout = Duration::from_secs(5);
    let (welcomed, said) = tokio::join!(
        channel::accept(&mut gw_conn, timeout, &side.metrics),
        channel::hello(&mut host_conn, function)
    );
    let handshake = |e: ChannelError| Error::io("descriptor channel handshake", std::io::Error::other(e));
    let function = welcomed.map_err(handshake)?;
    said.map_err(handshake)?;
    // Both ends have read everything sent so far: the connection is quiet, as registration wants.
    let registered = match plane.register(&gw_conn, function) {
        Ok(registered) => Some(registered),
        Err(e) if plane.mode() == EbpfMode::Required => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, %function, "descriptor channel not registered with the eBPF sidecar: plain TCP, counted as unregistered");
            None
        }
    };
    if plane.is_attached() {
        tracing::info!(%function, port = addr.port(), "descriptor channel on the eBPF sidecar (SK_MSG redirect)");
    }
    let (metrics, hand_back) = (Arc::clone(&side.metrics), side.hand_back);
    let (sink, gateway) = RemoteSink::serve(gw_conn, function, link, metrics, hand_back);
    let stop = cancel.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            end = serve_gateway(host_conn, side) => tracing::warn!(result = ?end, "the function host's channel ended"),
        }
    });
    tracker.spawn(async move {
        let _ = gateway.await;
        drop(registered);
    });
    Ok((sink, plane))
}

#[cfg(test)]
mod tests {
    use shoal_proto::descriptor::DescriptorKind;
    use shoal_proto::{ClientId, JobId, RoundId, Staleness, UpdateKind};
    use tokio::net::TcpListener;

    use super::*;
    use crate::ingest::demand::DemandTally;
    use crate::staging::SlotPool;

    /// The "local function host" of the test: hands every delivery to the test.
    #[derive(Debug)]
    struct Collect(mpsc::UnboundedSender<Delivery>);

    impl DescriptorSink for Collect {
        fn deliver(&self, d: Delivery) -> BoxFuture<'_, Result<()>> {
            let sent = self.0.send(d).map_err(|_| Error::Gone("test host"));
            Box::pin(async move { sent })
        }
    }

    async fn staged(pool: &Arc<SlotPool>, tally: &DemandTally, seq: u64, byte: u8) -> Delivery {
        let mut slot = pool.alloc().await.expect("slot");
        slot.bytes_mut().fill(byte);
        let at = slot.location();
        let job = JobId::new("job").expect("job");
        Delivery {
            descriptor: UpdateDescriptor {
                kind: DescriptorKind::Update,
                function: FunctionId(1),
                segment: at.segment,
                slot: at.index,
                generation: at.generation,
                offset: at.offset,
                length: at.length,
                job: job.clone(),
                round: RoundId(1),
                client: ClientId::new(format!("c{seq}")).expect("client"),
                num_examples: 1,
                staleness: Staleness(0),
                update_kind: UpdateKind::Parameters,
                stream_seq: seq,
            },
            view: slot.into_view(),
            received: Instant::now(),
            start: None,
            unfolded: tally.arrived(&job),
            stream: None,
        }
    }

    #[tokio::test]
    async fn descriptors_cross_the_socket_and_slots_come_back_or_are_handed_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = SlotPool::new(dir.path().to_owned(), "job".into(), 256, 1 << 20).unwrap();
        let tally = DemandTally::default();
        let job = JobId::new("job").expect("job");
        let (gw_metrics, host_metrics) = (Arc::new(Metrics::default()), Arc::new(Metrics::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut conn = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (mut gw_conn, _) = listener.accept().await.expect("accept");
        let wait = Duration::from_secs(5);
        let (function, said) = tokio::join!(
            channel::accept(&mut gw_conn, wait, &gw_metrics),
            channel::hello(&mut conn, FunctionId(4))
        );
        said.expect("welcomed");
        let (gw_link, mut gw_feedback) = Link::forwarding();
        let hand_back = Duration::from_millis(7);
        let (sink, gw_task) =
            RemoteSink::serve(gw_conn, function.expect("hello"), gw_link, Arc::clone(&gw_metrics), hand_back);
        assert_eq!(sink.function(), FunctionId(4));
        let (host_link, host_feedback) = Link::forwarding();
        let (to_test, mut delivered) = mpsc::unbounded_channel();
        let side = HostSide {
            segments: SegmentCache::new(dir.path().to_owned()),
            host: Arc::new(Collect(to_test)),
            feedback: host_feedback,
            metrics: Arc::clone(&host_metrics),
            hand_back,
            process: None,
        };
        let host_task = tokio::spawn(serve_gateway(conn, side));

        // Three updates: the host reads each in place through its read-only mapping.
        for seq in 1..=3u64 {
            sink.deliver(staged(&pool, &tally, seq, seq as u8).await).await.expect("deliver");
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let d = tokio::time::timeout(wait, delivered.recv()).await.expect("in time").expect("delivery");
            assert!(d.view.bytes().iter().all(|&b| u64::from(b) == d.descriptor.stream_seq));
            got.push(d);
        }
        assert_eq!((sink.in_flight(), tally.counts(&job).1), (3, 3), "held until released");
        // The host folds them: each release reaches the ledger and returns the slot.
        for d in &got {
            host_link.release(d.descriptor.stream_seq);
        }
        for _ in 0..3 {
            let f = tokio::time::timeout(wait, gw_feedback.recv()).await.expect("in time");
            assert!(matches!(f, Some(Feedback::Release { .. })), "{f:?}");
        }
        drop(got);
        // One segment of 64 slots (256-byte slots), every one free again.
        assert_eq!((sink.in_flight(), tally.counts(&job).1), (0, 0));
        assert_eq!((pool.segments(), pool.free_slots()), (1, 64));

        // A descriptor of an earlier lease of its slot: refused by the host, counted, handed back.
        let mut stale = staged(&pool, &tally, 9, 9).await;
        stale.descriptor.generation += 1;
        sink.deliver(stale).await.expect("deliver");
        let f = tokio::time::timeout(wait, gw_feedback.recv()).await.expect("in time");
        assert_eq!(f, Some(Feedback::Settle { stream_seq: 9, settle: Settle::Nak(hand_back) }));
        let text = host_metrics.encode();
        assert!(text.contains("shoal_descriptor_channel_errors_total{reason=\"stale_slot\"} 1"), "{text}");
        assert!(delivered.try_recv().is_err(), "a refused descriptor is never read");

        // The host process dies with an update in flight: the gateway hands it back.
        sink.deliver(staged(&pool, &tally, 11, 11).await).await.expect("deliver");
        let _in_host = tokio::time::timeout(wait, delivered.recv()).await.expect("in time");
        host_task.abort();
        let _ = host_task.await;
        let f = tokio::time::timeout(wait, gw_feedback.recv()).await.expect("in time");
        assert_eq!(f, Some(Feedback::Settle { stream_seq: 11, settle: Settle::Nak(hand_back) }));
        tokio::time::timeout(wait, gw_task).await.expect("gateway side ends").expect("no panic");
        assert_eq!((sink.in_flight(), tally.counts(&job).1), (0, 0));
        assert!(sink.deliver(staged(&pool, &tally, 12, 12).await).await.is_err(), "no host behind the sink");
    }
}
