//! The aggregation hierarchy across nodes (DESIGN.md §2 step 5, §7): every node's **leaf**
//! folds the updates its gateway staged; at the close of a round the job's **top** asks for
//! their partials; **middles** (when the job sets a fan-in) merge a group's partials on the way
//! up. Client updates never leave their node: only partial aggregates do, through NATS
//! (`<p>.<job>.partial.<round>.<to>`, the accumulators through the object store when larger than
//! a message) to a parent on another node, in process to a parent on the same node.
//!
//! Protocol of one round, as the leaf sees it:
//! 1. It reports how many updates it holds on `<p>.<job>.progress` (on every change and every
//!    heartbeat); the top closes the round when the sum reaches the cohort, or at the deadline.
//! 2. The top publishes a [`CollectRequest`] (round, collection id, live nodes, fan-in). The leaf
//!    takes a **snapshot** of the round (the host's harvest so far, merged into what earlier
//!    collections took) and sends it to its parent. The round stays open on the leaf: updates
//!    redelivered from a dead node keep arriving and a later collection (a retry, or a new top)
//!    gets a larger snapshot.
//! 3. The top commits with a [`CommitRecord`](shoal_proto::cluster::CommitRecord) naming the collection, the nodes it covered and
//!    the stream sequences of the updates it applied (sent up with the partials). The leaf acks
//!    exactly the updates of its snapshot for that collection, and any copy the record names
//!    (delivered again after another node that had it died before acking); anything else it
//!    holds for the round missed the commit and is late: rejected (`LateUpdate`) in synchronous
//!    rounds, handed back to JetStream for the next buffer in the asynchronous modes.
//!
//! Whole-cohort strategies (median, Krum, RFFL, Bristle) keep their updates in shared memory and
//! need all of them at the close. Their updates stay where they were staged: the leaf lists them
//! in its partial (client, weight, node), then takes part in the top's exchange — slices of
//! updates by coordinate shard for median, trimmed mean and Krum ([`crate::cluster::exchange`]),
//! per-client scalars and per-node partials for RFFL and Bristle
//! ([`crate::cluster::twophase`]), answered from the snapshot of the collection. Only a
//! whole-cohort strategy under a server optimizer still runs on the top's node: other nodes
//! hand its updates back to JetStream until the top's node stages them (see `gateway`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::{ClientId, JobId, ModelManifest, NodeId, PartialAggregate, RoundId};
use tokio::sync::mpsc;

use crate::clock::now_ms;
use crate::error::{Error, RejectReason, Result};
use crate::host::{CloseRound, Held, RegisterJob, RoundProgress};
use crate::ingest::ledger::Settle;
use crate::ingest::reject::Refusal;
use crate::nats::Infra;
use crate::node::NodeContext;
use crate::staging::SlotView;
use shoal_proto::cluster::CohortEntry;
use shoal_proto::cluster::CollectRequest;
use shoal_proto::cluster::LeafProgress;
use shoal_proto::cluster::PartialHeader;
use shoal_proto::config::ms;
use shoal_proto::JobPhase;

/// One staged update of a whole-cohort round, handed to the top on the same node.
#[derive(Debug, Clone)]
pub struct CohortMember {
    /// Sender.
    pub client: ClientId,
    /// Its weight (`num_examples`).
    pub weight: f64,
    /// Its bytes in shared memory (read in place, never copied).
    pub slot: SlotView,
}

/// A partial for the top, however it travelled.
#[derive(Debug)]
pub struct Partial {
    /// Sender (a leaf, or a middle).
    pub sender: NodeId,
    /// Collection it answers.
    pub collect: shoal_proto::CollectId,
    /// Nodes it covers.
    pub nodes: Vec<NodeId>,
    /// The process of each node in `nodes` (membership lease instance), same order.
    pub instances: Vec<shoal_proto::InstanceId>,
    /// Streaming strategies: the merged accumulators (`None` when empty).
    pub partial: Option<Arc<PartialAggregate>>,
    /// Whole-cohort strategies: the staged updates (same node only).
    pub cohort: Vec<CohortMember>,
    /// Updates it covers.
    pub count: u64,
    /// Their messages' stream sequences.
    pub seqs: Vec<u64>,
    /// When its last update was staged (ms since the Unix epoch; 0 = none).
    pub last_fold_ms: u64,
    /// Whole-cohort strategies: the updates of the nodes it covers, and where they are.
    pub entries: Vec<CohortEntry>,
}

/// In-process channels from leaves to a top on the same node, by job.
#[derive(Debug, Clone, Default)]
pub struct LocalLinks {
    inner: Arc<Mutex<HashMap<JobId, mpsc::UnboundedSender<Partial>>>>,
}

impl LocalLinks {
    /// Registers the top of `job` on this node; returns its receiving end.
    pub fn register(&self, job: &JobId) -> mpsc::UnboundedReceiver<Partial> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).insert(job.clone(), tx);
        rx
    }

    /// Removes the top of `job`.
    pub fn unregister(&self, job: &JobId) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).remove(job);
    }

    /// Hands `p` to the top of `job` on this node; `false` when there is none.
    fn send(&self, job: &JobId, p: Partial) -> bool {
        match self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(job) {
            Some(tx) => tx.send(p).is_ok(),
            None => false,
        }
    }
}

/// The parent of `node` for a collection: its group's middle (`true`), or the top (`false`).
pub fn parent(node: &NodeId, req: &CollectRequest) -> (NodeId, bool) {
    match group(node, req) {
        Some((leader, _)) if leader != *node => (leader, true),
        _ => (req.top.clone(), false),
    }
}

/// `node`'s middle group: (leader, members) when the job has a fan-in that makes groups of more
/// than one node; `None` otherwise.
pub fn group(node: &NodeId, req: &CollectRequest) -> Option<(NodeId, Vec<NodeId>)> {
    let fan_in = req.fan_in as usize;
    if fan_in < 2 || req.nodes.len() <= fan_in {
        return None;
    }
    let pos = req.nodes.iter().position(|n| n == node)?;
    let members: Vec<NodeId> = req.nodes.iter().skip(pos / fan_in * fan_in).take(fan_in).cloned().collect();
    (members.len() > 1).then(|| (members[0].clone(), members))
}

// ---------------------------------------------------------------------------------------------
// Wire form of a partial
// ---------------------------------------------------------------------------------------------

/// Encodes `header` and the accumulators: `u32 LE length ‖ msgpack header ‖ f64 LE values`.
pub fn encode_partial(header: &PartialHeader, values: &[f64]) -> Vec<u8> {
    shoal_proto::envelope::frame(header, bytemuck::cast_slice(values))
}

/// Splits a partial message into its header and the raw accumulator bytes.
///
/// # Errors
/// [`Error::Decode`] for a truncated or malformed message.
pub fn decode_partial(bytes: &[u8]) -> Result<(PartialHeader, &[u8])> {
    Ok(shoal_proto::envelope::unframe("partial aggregate", bytes)?)
}

/// Rebuilds the accumulators of a received partial.
///
/// # Errors
/// [`Error::Decode`] when the values do not fit `manifest` or are not finite.
pub fn partial_from_wire(
    manifest: &Arc<ModelManifest>,
    header: &PartialHeader,
    raw: &[u8],
) -> Result<Option<PartialAggregate>> {
    if header.empty {
        return Ok(None);
    }
    let bad = |d: String| Error::Decode { what: "partial aggregate", detail: d };
    if raw.len() != manifest.numel() * 8 {
        return Err(bad(format!("{} value bytes for {} elements", raw.len(), manifest.numel())));
    }
    let values: Vec<f64> =
        raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    if values.iter().any(|v| v.is_nan()) {
        return Err(bad("NaN in the accumulators".into()));
    }
    PartialAggregate::from_parts(
        Arc::clone(manifest),
        values,
        header.first_owners.clone(),
        header.total_weight,
        header.count,
    )
    .map(Some)
    .map_err(|e| bad(e.to_string()))
}

/// Sends a partial to `header.to` on another node; the accumulators go through the object store
/// when the message would exceed the server's `max_payload`. Returns the bytes sent.
///
/// # Errors
/// NATS errors.
pub async fn send_remote(
    infra: &Infra,
    job: &JobId,
    mut header: PartialHeader,
    p: Option<&PartialAggregate>,
) -> Result<u64> {
    let values = p.map(|p| p.values()).unwrap_or(&[]);
    let tier = if header.to_middle { "middle" } else { "top" };
    let subject = infra.subjects.partial(job, header.round, &header.to, tier);
    let limit = infra.max_payload().saturating_sub(64 * 1024);
    let sent;
    let body = if values.len() * 8 + 64 * 1024 > limit {
        let name = shoal_proto::subjects::partial_object(job, header.round, &header.sender, header.collect);
        let raw: &[u8] = bytemuck::cast_slice(values);
        infra.put_transfer(&name, raw).await?;
        header.object = Some(name);
        sent = raw.len() as u64;
        encode_partial(&header, &[])
    } else {
        let b = encode_partial(&header, values);
        sent = b.len() as u64;
        b
    };
    infra.client.publish(subject, Bytes::from(body)).await.map_err(|e| Error::nats("send partial", e))?;
    Ok(sent)
}

/// Receives one partial message: its header and accumulators (fetched from the object store,
/// then deleted, when they travelled there). Returns the bytes received with it.
///
/// # Errors
/// Decode and NATS errors.
pub async fn receive_remote(
    infra: &Infra,
    manifest: &Arc<ModelManifest>,
    msg: &async_nats::Message,
) -> Result<(PartialHeader, Option<PartialAggregate>, u64)> {
    let (header, raw) = decode_partial(&msg.payload)?;
    let Some(name) = &header.object else {
        let p = partial_from_wire(manifest, &header, raw)?;
        return Ok((header, p, msg.payload.len() as u64));
    };
    let buf = infra.take_transfer(name).await?;
    let p = partial_from_wire(manifest, &header, &buf)?;
    Ok((header, p, buf.len() as u64))
}

// ---------------------------------------------------------------------------------------------
// The leaf agent
// ---------------------------------------------------------------------------------------------

/// A round's updates the leaf took out of the host (snapshots).
#[derive(Debug, Default)]
struct LeafRound {
    partial: Option<Arc<PartialAggregate>>,
    held: Vec<Held>,
    /// (collection id, number of `held` it covered).
    snapshots: Vec<(shoal_proto::CollectId, usize)>,
    last_fold_ms: u64,
}

/// The subscriptions a leaf listens on.
struct LeafInbox {
    /// The top's collection requests.
    collects: async_nats::Subscriber,
    /// Partials for this node's middle.
    to_me: async_nats::Subscriber,
    /// The top's shard plans.
    plans: async_nats::Subscriber,
    /// Update slices for this node as a shard owner.
    slices: async_nats::Subscriber,
    /// The top's two-phase steps (RFFL, Bristle).
    phases: async_nats::Subscriber,
}

impl LeafInbox {
    async fn open(ctx: &NodeContext, job: &JobId) -> Result<LeafInbox> {
        let (infra, s) = (&ctx.infra, &ctx.infra.subjects);
        Ok(LeafInbox {
            collects: infra.subscribe(s.collect(job), "subscribe to collections").await?,
            to_me: infra.subscribe(s.partials_to(job, &ctx.node, "middle"), "subscribe to partials").await?,
            plans: infra.subscribe(s.shard_plans(job), "subscribe to shard plans").await?,
            slices: infra.subscribe(s.slices_to(job, &ctx.node), "subscribe to update slices").await?,
            phases: infra.subscribe(s.phase_requests(job), "subscribe to two-phase steps").await?,
        })
    }
}

/// Runs the leaf of `job` on this node until the job ends (and its last round is settled) or
/// the node shuts down (then every update it holds is handed back to JetStream).
///
/// # Errors
/// NATS subscription errors; an unknown job.
pub async fn run_leaf(ctx: NodeContext, job: JobId) -> Result<()> {
    let entry = ctx.directory.get(&job).ok_or_else(|| Error::UnknownJob(job.to_string()))?;
    let manifest = Arc::clone(&entry.manifest);
    let incarnation = entry.incarnation;
    let (tx, mut progress_rx) = mpsc::unbounded_channel();
    ctx.host.register(RegisterJob { job: job.clone(), incarnation, progress: tx }).await?;
    let LeafInbox { mut collects, mut to_me, mut plans, mut slices, mut phases } =
        LeafInbox::open(&ctx, &job).await?;
    // RFFL and Bristle: this node's share of their two-phase exchanges (built on first use).
    let mut member: Option<crate::cluster::twophase::Member> = None;
    let mut owner = crate::cluster::exchange::Owner::new(
        ctx.infra.clone(),
        job.clone(),
        ctx.node.clone(),
        Arc::clone(&entry.spec),
        Arc::clone(&ctx.metrics),
        ctx.membership.clone(),
    );
    let mut rounds: BTreeMap<RoundId, LeafRound> = BTreeMap::new();
    let mut bases = crate::cluster::statistics::StatisticBases::new(&entry.spec, &manifest);
    // Updates accepted per round on this node (cumulative, from the host).
    let mut accepted: BTreeMap<RoundId, u32> = BTreeMap::new();
    let t = &ctx.config.timings;
    let mut heartbeat = tokio::time::interval(ms(t.progress_heartbeat_ms));
    let mut settle_tick = tokio::time::interval(ms(t.settle_tick_ms));
    loop {
        tokio::select! {
            // The gateway's ledger hands every update this leaf holds back to JetStream.
            _ = ctx.cancel.cancelled() => return Ok(()),
            Some(p) = progress_rx.recv() => {
                accepted.insert(p.round, p.accepted);
                publish_progress(&ctx, &job, p).await;
            }
            Some(m) = collects.next() => {
                let req: CollectRequest = match shoal_proto::decode("collect request", &m.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%job, error = %e, "malformed collect request ignored");
                        continue;
                    }
                };
                if req.nodes.contains(&ctx.node) && is_top(&ctx, &job, &req.top).await {
                    if let Err(e) = answer_collect(&ctx, &job, &manifest, &mut rounds, &mut to_me, &mut bases, &req).await {
                        tracing::warn!(%job, round = %req.round, error = %e, "answering a collection failed");
                    }
                }
            }
            Some(m) = plans.next() => {
                let plan: shoal_proto::cluster::ShardPlan = match shoal_proto::decode("shard plan", &m.payload) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(%job, error = %e, "malformed shard plan ignored");
                        continue;
                    }
                };
                let held: HashMap<ClientId, SlotView> = rounds
                    .get(&plan.round)
                    .map(|r| r.held.iter().filter_map(|h| Some((h.client.clone(), h.slot.clone()?))).collect())
                    .unwrap_or_default();
                if let Err(e) = owner.on_plan(plan, &held).await {
                    tracing::warn!(%job, error = %e, "shard exchange step failed");
                }
            }
            Some(m) = slices.next() => {
                if let Err(e) = owner.on_slice(&m).await {
                    tracing::warn!(%job, error = %e, "update slice refused");
                }
            }
            Some(m) = phases.next() => on_phase(&ctx, &job, &entry.spec, &mut member, &rounds, &m).await,
            _ = heartbeat.tick() => {
                if let Some(e) = ctx.directory.get(&job) {
                    if e.state.is_open() {
                        let n = accepted.get(&e.state.round).copied().unwrap_or(0);
                        publish_progress(&ctx, &job, RoundProgress { round: e.state.round, accepted: n }).await;
                    }
                }
            }
            _ = settle_tick.tick() => {
                settle(&ctx, &job, incarnation, &mut rounds, &mut accepted).await;
                let ended = !ctx.directory.runs(&job, incarnation);
                if ended && rounds.is_empty() && accepted.is_empty() {
                    return Ok(());
                }
            }
        }
    }
}

/// Answers one of the top's two-phase steps (RFFL, Bristle) from the snapshot the step names
/// (building this node's share of the job on first use).
async fn on_phase(
    ctx: &NodeContext,
    job: &JobId,
    spec: &shoal_functions::JobSpec,
    member: &mut Option<crate::cluster::twophase::Member>,
    rounds: &BTreeMap<RoundId, LeafRound>,
    m: &async_nats::Message,
) {
    if member.is_none() {
        match crate::cluster::twophase::Member::new(ctx, job.clone(), spec) {
            Ok(x) => *member = Some(x),
            Err(e) => {
                tracing::warn!(%job, error = %e, "cannot take part in two-phase exchanges");
                return;
            }
        }
    }
    let Some(member) = member.as_mut() else { return };
    let (req, body) = match member.read(m).await {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%job, error = %e, "malformed two-phase step ignored");
            return;
        }
    };
    let held = rounds
        .get(&req.round)
        .and_then(|r| crate::cluster::twophase::snapshot(&r.held, &r.snapshots, req.collect));
    if let Err(e) = member.answer(&req, &body, held).await {
        tracing::warn!(%job, round = %req.round, error = %e, "two-phase step failed");
    }
}

/// Whether `node` holds the job's top lease (leaves answer only the real top's collections).
async fn is_top(ctx: &NodeContext, job: &JobId, node: &NodeId) -> bool {
    let key = shoal_proto::subjects::top_lease_key(job);
    match crate::cluster::lease::Liveness::read(&ctx.infra, &key).await {
        Ok(r) => r.is_some_and(|r| r.lease.node == *node),
        Err(e) => {
            tracing::warn!(%job, error = %e, "cannot read the top lease; answering the collection");
            true
        }
    }
}

async fn publish_progress(ctx: &NodeContext, job: &JobId, p: RoundProgress) {
    let msg = LeafProgress { node: ctx.node.clone(), round: p.round, accepted: p.accepted };
    let subject = ctx.infra.subjects.progress(job);
    if let Err(e) = ctx.infra.client.publish(subject, Bytes::from(shoal_proto::encode(&msg))).await {
        tracing::debug!(error = %e, "publishing leaf progress failed");
    }
}

/// Takes a snapshot of `req.round` and sends it up (merging a middle's group first).
async fn answer_collect(
    ctx: &NodeContext,
    job: &JobId,
    manifest: &Arc<ModelManifest>,
    rounds: &mut BTreeMap<RoundId, LeafRound>,
    to_me: &mut async_nats::Subscriber,
    bases: &mut crate::cluster::statistics::StatisticBases,
    req: &CollectRequest,
) -> Result<()> {
    if !req.conflicts.is_empty() && lost_a_conflict(ctx, job, rounds, req).await {
        return Ok(());
    }
    let Some(harvest) = rebased_harvest(ctx, job, bases, req).await? else { return Ok(()) };
    let r = rounds.entry(req.round).or_default();
    if let Some(p) = harvest.partial.filter(|p| p.count() > 0) {
        match &mut r.partial {
            None => r.partial = Some(Arc::new(p)),
            Some(a) => Arc::make_mut(a).merge(&p)?,
        }
    }
    if let Some(t) = harvest.last_fold {
        r.last_fold_ms = r.last_fold_ms.max(now_ms().saturating_sub(t.elapsed().as_millis() as u64));
    }
    r.held.extend(harvest.held);
    r.snapshots.push((req.collect, r.held.len()));
    let mut out = Partial {
        sender: ctx.node.clone(),
        collect: req.collect,
        nodes: vec![ctx.node.clone()],
        instances: vec![ctx.instance],
        partial: r.partial.clone(),
        cohort: r
            .held
            .iter()
            .filter_map(|h| {
                Some(CohortMember {
                    client: h.client.clone(),
                    weight: h.num_examples as f64,
                    slot: h.slot.clone()?,
                })
            })
            .collect(),
        count: r.held.len() as u64,
        seqs: r.held.iter().map(|h| h.stream_seq).collect(),
        last_fold_ms: r.last_fold_ms,
        entries: Vec::new(),
    };
    out.entries = r_cohort(Some(r), &ctx.node);
    // A middle merges its group's partials before sending one up.
    if let Some((leader, members)) = crate::cluster::leaf::group(&ctx.node, req) {
        if leader == ctx.node {
            ctx.metrics.tier("middle").inc();
            let merged = gather_group(ctx, manifest, to_me, req, &members, &mut out).await;
            ctx.metrics.tier("middle").dec();
            merged?;
        }
    }
    // Nothing staged under the membership lease leaves the node unless this process can prove
    // it held the lease without a gap: otherwise another node may have taken these updates
    // over and folded them too. The top collects again; this node fences itself meanwhile.
    if !ctx.membership.holds() {
        ctx.metrics.fencing("partial_withheld").inc();
        tracing::warn!(%job, round = %req.round, "membership continuity not proven: partial withheld");
        return Ok(());
    }
    let (to, to_middle) = parent(&ctx.node, req);
    if to == ctx.node && !to_middle {
        return if ctx.local.send(job, out) { Ok(()) } else { Err(Error::Gone("top")) };
    }
    let header = PartialHeader {
        sender: ctx.node.clone(),
        to,
        to_middle,
        round: req.round,
        collect: req.collect,
        nodes: out.nodes.clone(),
        instances: out.instances.clone(),
        empty: out.partial.is_none(),
        total_weight: out.partial.as_ref().map_or(0.0, |p| p.total_weight()),
        count: out.count,
        seqs: out.seqs.clone(),
        // Client ids stay on their node: the partial's size does not grow with the cohort.
        clients: Vec::new(),
        first_owners: out.partial.as_ref().map(|p| p.first_owners().to_vec()).unwrap_or_default(),
        last_fold_ms: out.last_fold_ms,
        object: None,
        // Whole-cohort strategies: which updates stay where (for a sharded exchange).
        cohort: out.entries.clone(),
    };
    let bytes = send_remote(&ctx.infra, job, header, out.partial.as_deref()).await?;
    ctx.metrics.partial_bytes_sent.inc_by(bytes);
    Ok(())
}

/// Takes the round's harvest from the host; in asynchronous delta jobs with running statistics,
/// rebases its stale updates' statistics first ([`crate::cluster::statistics`]). The model
/// versions they need are read before the harvest is taken, so a failed read loses nothing;
/// `None` when this node does not see the collection's round open yet (the top collects again).
async fn rebased_harvest(
    ctx: &NodeContext,
    job: &JobId,
    bases: &mut crate::cluster::statistics::StatisticBases,
    req: &CollectRequest,
) -> Result<Option<crate::host::RoundHarvest>> {
    let current = if bases.needed() {
        let Some(state) = ctx.directory.get(job).map(|e| e.state.clone()) else { return Ok(None) };
        if state.round != req.round {
            tracing::warn!(%job, round = %req.round, open = %state.round, "collection for a round this node does not see open yet");
            return Ok(None);
        }
        bases.prepare(&ctx.infra, job, state.model_version).await?;
        Some(state.model_version)
    } else {
        None
    };
    let mut harvest = ctx.host.close(CloseRound { job: job.clone(), round: req.round, seal: false }).await?;
    if let (Some(current), Some(p)) = (current, harvest.partial.as_mut()) {
        match bases.rebase(current, p, &harvest.held) {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(%job, round = %req.round, updates = n, "stale updates' statistics rebased")
            }
            Err(e) => {
                tracing::error!(%job, round = %req.round, error = %e, "rebasing stale statistics failed")
            }
        }
    }
    Ok(Some(harvest))
}

/// Whether this leaf holds one of the collection's conflicting updates under a claim that is not
/// the stored one (the claim was lost, e.g. in a nats-server restart, and another node claimed
/// the update afresh): then it cannot take that update out of its accumulators, so it stops the
/// node's membership (the node drops everything it holds and starts again; its updates are
/// delivered again and staged once) and does not answer.
async fn lost_a_conflict(
    ctx: &NodeContext,
    job: &JobId,
    rounds: &BTreeMap<RoundId, LeafRound>,
    req: &CollectRequest,
) -> bool {
    let Some(r) = rounds.get(&req.round) else { return false };
    let held = r.held.iter().filter(|h| req.conflicts.contains(&h.stream_seq));
    for h in held {
        let key = shoal_proto::subjects::claim_key(job, req.round, &h.client);
        let stored = match ctx.infra.claims(crate::ingest::claims::MAX_AGE).await {
            Ok(kv) => kv.get(&key).await.ok().flatten(),
            Err(_) => None,
        };
        let ours = stored
            .and_then(|v| shoal_proto::decode::<shoal_proto::cluster::ClaimValue>("claim", &v).ok())
            .is_some_and(|c| {
                c.node == ctx.node && c.instance == ctx.instance && c.stream_seq == h.stream_seq
            });
        if !ours {
            ctx.metrics.fencing("conflict_dropped").inc();
            tracing::error!(
                %job, round = %req.round, client = %h.client, seq = h.stream_seq,
                "this node holds an update another node claimed: dropping everything it holds and starting again"
            );
            ctx.membership.break_now();
            ctx.fence_now();
            return true;
        }
    }
    false
}

/// Every whole-cohort update a leaf round holds on `node`.
fn r_cohort(r: Option<&LeafRound>, node: &NodeId) -> Vec<CohortEntry> {
    r.map(|r| {
        r.held
            .iter()
            .filter(|h| h.slot.is_some())
            .map(|h| CohortEntry {
                client: h.client.clone(),
                weight: h.num_examples as f64,
                node: node.clone(),
            })
            .collect()
    })
    .unwrap_or_default()
}

/// A middle's wait for the other members of its group (bounded by the collection timeout).
async fn gather_group(
    ctx: &NodeContext,
    manifest: &Arc<ModelManifest>,
    to_me: &mut async_nats::Subscriber,
    req: &CollectRequest,
    members: &[NodeId],
    out: &mut Partial,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + ctx.config.collect_timeout();
    while !members.iter().all(|m| out.nodes.contains(m)) {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(round = %req.round, covered = ?out.nodes, "middle: group incomplete at the timeout");
                break;
            }
            m = to_me.next() => match m { Some(m) => m, None => break },
        };
        let (header, p, bytes) = match receive_remote(&ctx.infra, manifest, &msg).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "malformed partial ignored");
                continue;
            }
        };
        if header.collect != req.collect || header.round != req.round {
            continue;
        }
        ctx.metrics.partial_bytes_received.inc_by(bytes);
        if let Some(p) = p {
            match &mut out.partial {
                None => out.partial = Some(Arc::new(p)),
                Some(a) => Arc::make_mut(a).merge(&p)?,
            }
        }
        if header.instances.len() != header.nodes.len() {
            tracing::warn!(sender = %header.sender, "partial without its nodes' instances ignored");
            continue;
        }
        out.nodes.extend(header.nodes);
        out.instances.extend(header.instances);
        out.entries.extend(header.cohort);
        out.count += header.count;
        out.seqs.extend(header.seqs);
        out.last_fold_ms = out.last_fold_ms.max(header.last_fold_ms);
    }
    Ok(())
}

/// Acks or refuses what the leaf holds for rounds that have closed.
async fn settle(
    ctx: &NodeContext,
    job: &JobId,
    incarnation: u64,
    rounds: &mut BTreeMap<RoundId, LeafRound>,
    accepted: &mut BTreeMap<RoundId, u32>,
) {
    let mut candidates: Vec<RoundId> = rounds.keys().chain(accepted.keys()).copied().collect();
    candidates.sort();
    candidates.dedup();
    let Some(entry) = ctx.directory.get(job).filter(|e| e.incarnation == incarnation) else {
        // Deleted (and perhaps created again): nothing held for it can commit any more.
        let link = ctx.ledger.link();
        for round in candidates {
            let leftovers = match ctx.host.close(CloseRound { job: job.clone(), round, seal: true }).await {
                Ok(h) => h.held,
                Err(_) => return,
            };
            let held = rounds.remove(&round).map(|r| r.held).unwrap_or_default();
            for h in held.into_iter().chain(leftovers) {
                let why = Refusal::new(RejectReason::UnknownJob, format!("job {job} was deleted"));
                link.settle(h.stream_seq, Settle::Reject(why));
            }
            accepted.remove(&round);
        }
        return;
    };
    let state = &entry.state;
    for round in candidates {
        let mut record = ctx.directory.commit_record(job, round);
        if record.is_none() && round < state.round {
            // The round closed but this node missed the state revision that says how (a watch
            // that lagged or restarted): read the state key's history before settling.
            if let Err(e) = crate::jobs::observe_history(&ctx.infra, &ctx.directory, job, None).await {
                tracing::debug!(%job, %round, error = %e, "reading the job history failed");
            }
            record = ctx.directory.commit_record(job, round);
        }
        let closed = record.is_some() || round < state.round || state.phase != JobPhase::Running;
        if !closed {
            continue;
        }
        let leftovers = match ctx.host.close(CloseRound { job: job.clone(), round, seal: true }).await {
            Ok(h) => h,
            Err(_) => return,
        };
        let mut r = rounds.remove(&round).unwrap_or_default();
        accepted.remove(&round);
        let applied = record
            .as_ref()
            .filter(|rec| rec.nodes.contains(&ctx.node))
            .and_then(|rec| r.snapshots.iter().find(|(c, _)| *c == rec.collect))
            .map_or(0, |&(_, n)| n);
        let late: Vec<Held> = r.held.split_off(applied).into_iter().chain(leftovers.held).collect();
        // A copy of an update that reached the model through another node (delivered again
        // after that node died before acking it) is done too: ack it, do not refuse it.
        let (done, late): (Vec<Held>, Vec<Held>) =
            late.into_iter().partition(|h| record.as_ref().is_some_and(|rec| rec.includes(h.stream_seq)));
        // The ledger acks (and deletes the objects of) what the commit applied, and hands back or
        // refuses the rest.
        let link = ctx.ledger.link();
        for h in r.held.into_iter().chain(done) {
            link.settle(h.stream_seq, Settle::Ack);
        }
        for h in late {
            let settle = if h.asynchronous && state.phase == JobPhase::Running {
                Settle::Nak(ms(ctx.config.timings.nak_restage_ms))
            } else {
                let detail = match &record {
                    Some(_) => format!("round {round} closed before this update reached its aggregate"),
                    None => format!("round {round} ended ({})", state.phase),
                };
                Settle::Reject(Refusal::new(RejectReason::LateUpdate, detail))
            };
            link.settle(h.stream_seq, settle);
        }
        tracing::debug!(%job, %round, acked = applied, "leaf settled round");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_functions::{DType, TensorSpec};

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn req(nodes: &[&str], top: &str, fan_in: u32) -> CollectRequest {
        CollectRequest {
            round: RoundId(3),
            collect: shoal_proto::CollectId(7),
            top: node(top),
            nodes: nodes.iter().map(|n| node(n)).collect(),
            fan_in,
            conflicts: Vec::new(),
        }
    }

    #[test]
    fn middles_group_consecutive_nodes_and_others_go_to_the_top() {
        let r = req(&["a", "b", "c", "d", "e"], "c", 2);
        assert_eq!(group(&node("b"), &r), Some((node("a"), vec![node("a"), node("b")])));
        assert_eq!(parent(&node("b"), &r), (node("a"), true));
        assert_eq!(parent(&node("a"), &r), (node("c"), false), "a middle sends to the top");
        assert_eq!(parent(&node("d"), &r), (node("c"), true), "d's middle is c, also the top's node");
        assert_eq!(group(&node("e"), &r), None, "a group of one has no middle");
        assert_eq!(parent(&node("e"), &r), (node("c"), false));
        // No fan-in, or fewer nodes than the fan-in: straight to the top.
        assert_eq!(parent(&node("b"), &req(&["a", "b"], "a", 0)), (node("a"), false));
        assert_eq!(parent(&node("b"), &req(&["a", "b"], "a", 2)), (node("a"), false));
    }

    #[test]
    fn partials_round_trip_and_malformed_ones_are_refused() {
        let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![3])]).unwrap());
        let params = shoal_functions::Parameters::from_f64(Arc::clone(&m), &[vec![1.0, -2.0, 0.5]]).unwrap();
        let client = ClientId::new("c1").unwrap();
        let mut p = PartialAggregate::new(Arc::clone(&m));
        p.fold(&params.as_update(&client, 4.0)).unwrap();
        let header = PartialHeader {
            sender: node("n2"),
            to: node("n1"),
            to_middle: false,
            round: RoundId(1),
            collect: shoal_proto::CollectId(9),
            nodes: vec![node("n2")],
            empty: false,
            total_weight: p.total_weight(),
            count: p.count(),
            seqs: vec![17],
            clients: Vec::new(),
            first_owners: p.first_owners().to_vec(),
            last_fold_ms: 5,
            object: None,
            cohort: Vec::new(),
            instances: vec![shoal_proto::InstanceId(2)],
        };
        let bytes = encode_partial(&header, p.values());
        let (h, raw) = decode_partial(&bytes).unwrap();
        assert_eq!(h, header);
        let back = partial_from_wire(&m, &h, raw).unwrap().unwrap();
        assert_eq!(back.values(), &[4.0, -8.0, 2.0]);
        assert_eq!((back.total_weight(), back.count()), (4.0, 1));
        // Truncated, wrong length, NaN: typed errors, no panic.
        assert!(decode_partial(&bytes[..3]).is_err());
        assert!(decode_partial(&bytes[..10]).is_err());
        assert!(partial_from_wire(&m, &h, &raw[..16]).is_err());
        let nan = encode_partial(&header, &[f64::NAN, 0.0, 0.0]);
        let (h2, raw2) = decode_partial(&nan).unwrap();
        assert!(partial_from_wire(&m, &h2, raw2).is_err());
        let mut neg = header.clone();
        neg.total_weight = -1.0;
        assert!(partial_from_wire(&m, &neg, raw).is_err());
    }
}
