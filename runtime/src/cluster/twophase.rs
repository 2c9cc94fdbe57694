//! RFFL and Bristle across nodes by the two-phase protocol (DESIGN.md §5; the maths is
//! `shoal_functions::{rffl, bristle}::twophase`, the messages `shoal_proto::twophase`). When a
//! round of such a job has updates staged on more than one node, the top, after the collection
//! (which told it which updates each node holds):
//! 1. publishes a [`PhaseRequest`] for phase 1 on `<p>.<job>.phase` (RFFL: the round's
//!    opening, the aggregation weights; Bristle: the opening, and the own model when it is the
//!    reference), computes its own node's share from the slots it holds, and waits for every
//!    other node's [`PhaseAnswer`] on `<p>.<job>.phase-answer.<top>`: per-client scalars and,
//!    for RFFL, one partial sum per node;
//! 2. decides (RFFL: the participants and the aggregate `u`; Bristle: the ranking, the seeded
//!    selection, the reference model's F1) and publishes phase 2 (RFFL: `u`; Bristle: the
//!    selection);
//! 3. every node answers from the same updates (RFFL: `⟨g_i, u⟩`; Bristle: the partial sum of
//!    its selected updates and, with the integrator, their F1 and integration shares), and
//!    the top finishes the round (reputations, rewards, integration) and commits.
//!
//! Every node answers from the snapshot it sent up for the collection the request names (the
//! updates the commit record will make it ack), so an answer covers exactly the updates the
//! top counted. Update bytes never leave their node: what crosses nodes per client is a few
//! scalars (about 2 × (id + 40) bytes for RFFL, id + 30 bytes plus id per selected update for
//! Bristle), and per node one model-sized partial (and RFFL's `u` down).
//!
//! Refusals: an answer from another process than the one that sent the collection's partial,
//! or covering other clients than that partial listed, fails the exchange with
//! [`Error::TwoPhase`] (nothing is folded from it); so does a node that is seen gone, or
//! silent past the collection timeout ([`Error::Timeout`]). The top then collects again (after
//! adopting a dead node's updates) and reruns both phases; the strategy's state changes only
//! when the second phase completes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::bristle::{ClassEvaluator, IntegratorConfig};
use shoal_functions::{
    ClientId, JobId, JobSpec, ModelManifest, ModelVersion, NodeId, Parameters, PartialAggregate, RoundId,
    Strategy, TwoPhase, UpdateView,
};
use shoal_proto::cluster::CohortEntry;
use shoal_proto::twophase::{PartialMeta, PhaseAnswer, PhaseReport, PhaseRequest, PhaseStep};
use shoal_proto::{CollectId, ExchangeId, InstanceId};

use crate::cluster::leaf::CohortMember;
use crate::cluster::top::PluginFactory;
use crate::error::{Error, Result};
use crate::host::Held;
use crate::metrics::Metrics;
use crate::nats::Infra;

// ---------------------------------------------------------------------------------------------
// Framing: a control header and a model-sized body, through the object store when too large
// ---------------------------------------------------------------------------------------------

/// Publishes `header ‖ body` on `subject` (the body through the transfer store when the message
/// would exceed the server's `max_payload`; `set_object` names it in the header). Returns the
/// bytes sent.
async fn send<T: serde::Serialize>(
    infra: &Infra,
    subject: String,
    mut header: T,
    object: String,
    set_object: impl FnOnce(&mut T, String),
    body: &[u8],
) -> Result<u64> {
    let limit = infra.max_payload().saturating_sub(64 * 1024);
    let msg = if body.len() > limit {
        infra.put_transfer(&object, body).await?;
        set_object(&mut header, object);
        shoal_proto::envelope::frame(&header, &[])
    } else {
        shoal_proto::envelope::frame(&header, body)
    };
    let n = msg.len() as u64 + if body.len() > limit { body.len() as u64 } else { 0 };
    infra
        .client
        .publish(subject, Bytes::from(msg))
        .await
        .map_err(|e| Error::nats("send a two-phase step", e))?;
    Ok(n)
}

/// Reads a framed message: its header, body (fetched from the transfer store, then deleted,
/// when it travelled there) and the bytes received.
async fn receive<T: serde::de::DeserializeOwned>(
    infra: &Infra,
    what: &'static str,
    msg: &async_nats::Message,
    object: impl FnOnce(&T) -> Option<String>,
) -> Result<(T, Vec<u8>, u64)> {
    let (header, body): (T, &[u8]) = shoal_proto::envelope::unframe(what, &msg.payload)?;
    match object(&header) {
        None => {
            let body = body.to_vec();
            Ok((header, body, msg.payload.len() as u64))
        }
        Some(name) => {
            let body = infra.take_transfer(&name).await?;
            let n = msg.payload.len() as u64 + body.len() as u64;
            Ok((header, body, n))
        }
    }
}

fn f64s(what: &'static str, body: &[u8], len: usize) -> Result<Vec<f64>> {
    if body.len() != len * 8 {
        return Err(Error::Decode { what, detail: format!("{} bytes for {len} values", body.len()) });
    }
    let values: Vec<f64> =
        body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    if values.iter().any(|v| v.is_nan()) {
        return Err(Error::Decode { what, detail: "NaN among the values".into() });
    }
    Ok(values)
}

fn f64_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A model from its slot bytes (Bristle's own model).
fn params_from_slot(manifest: &Arc<ModelManifest>, body: &[u8]) -> Result<Parameters> {
    let mut p = Parameters::zeros(Arc::clone(manifest));
    if body.len() != p.as_bytes().len() {
        return Err(Error::Decode { what: "own model", detail: format!("{} bytes", body.len()) });
    }
    p.as_bytes_mut().copy_from_slice(body);
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// One node's share: the same computation on a leaf and on the top's own node
// ---------------------------------------------------------------------------------------------

/// What a node needs to answer two-phase steps of one job: the strategy's configuration (a
/// node-local instance of the strategy; its state is never used) and, for Bristle with the
/// integrator, the node's own evaluator on the server-held validation split.
#[derive(Debug)]
pub struct NodeShare {
    manifest: Arc<ModelManifest>,
    strategy: Box<dyn Strategy>,
    integrator: Option<(IntegratorConfig, Box<dyn ClassEvaluator>)>,
}

impl NodeShare {
    /// The share of a job on this node (`plugins`: the node's, for Bristle's evaluator).
    ///
    /// # Errors
    /// The spec's strategy cannot be built.
    pub fn new(spec: &JobSpec, plugins: Option<&Arc<dyn PluginFactory>>) -> Result<NodeShare> {
        let strategy = shoal_functions::factory::build_strategy(spec)?;
        let integrator = plugins.and_then(|f| f.plugins(spec).bristle_integrator);
        Ok(NodeShare { manifest: Arc::new(spec.manifest.clone()), strategy, integrator })
    }

    /// Computes `step` over this node's updates (`views`) against the round's base model.
    ///
    /// # Errors
    /// The strategy's errors for these updates (typed, as `Error::Functions`); a body that does
    /// not fit the manifest; a strategy without the two-phase protocol.
    pub fn compute(
        &mut self,
        step: &PhaseStep,
        body: &[u8],
        views: &[UpdateView<'_>],
        global: &Parameters,
    ) -> Result<(PhaseReport, Option<PartialAggregate>)> {
        let m = &self.manifest;
        let wrong = || Error::Decode { what: "two-phase step", detail: "not this job's strategy".into() };
        let f = |e: shoal_functions::Error| Error::Functions(e);
        match (self.strategy.two_phase(), step) {
            (Some(TwoPhase::Rffl(r)), PhaseStep::RfflUploads(open)) => {
                use shoal_functions::rffl::twophase::node_uploads;
                let (u, p) = node_uploads(r.config(), open, m, views).map_err(|e| f(e.into()))?;
                Ok((PhaseReport::RfflUploads(u), Some(p)))
            }
            (Some(TwoPhase::Rffl(_)), PhaseStep::RfflDots(open)) => {
                let u = f64s("rffl aggregate", body, m.numel())?;
                let dots = shoal_functions::rffl::twophase::node_dots(open, m, &u, views)
                    .map_err(|e| f(e.into()))?;
                Ok((PhaseReport::RfflDots(dots), None))
            }
            (Some(TwoPhase::Bristle(b)), PhaseStep::BristleDistances(open)) => {
                let own = if open.own_model { Some(params_from_slot(m, body)?) } else { None };
                let d = shoal_functions::bristle::twophase::node_distances(
                    b.config(),
                    open,
                    own.as_ref(),
                    global,
                    views,
                )
                .map_err(|e| f(e.into()))?;
                Ok((PhaseReport::BristleDistances(d), None))
            }
            (Some(TwoPhase::Bristle(b)), PhaseStep::BristleIntegrate(selection)) => {
                let integrator =
                    self.integrator.as_mut().map(|(c, e)| (&*c, &mut **e as &mut dyn ClassEvaluator));
                let (i, p) = shoal_functions::bristle::twophase::node_integrate(
                    b.config(),
                    integrator,
                    selection,
                    global,
                    views,
                )
                .map_err(|e| f(e.into()))?;
                Ok((PhaseReport::BristleIntegration(i), Some(p)))
            }
            _ => Err(wrong()),
        }
    }
}

/// Views over staged slots, sorted by client (the order does not change the results; sorting
/// makes the answer's client list the checked one).
fn views_of<'a>(manifest: &'a ModelManifest, members: &'a [CohortMember]) -> Vec<UpdateView<'a>> {
    let mut v: Vec<UpdateView<'a>> = members
        .iter()
        .map(|m| UpdateView { manifest, bytes: m.slot.bytes(), weight: m.weight, client: &m.client })
        .collect();
    v.sort_by(|a, b| a.client.cmp(b.client));
    v
}

// ---------------------------------------------------------------------------------------------
// The leaf side
// ---------------------------------------------------------------------------------------------

/// A leaf's part in the two-phase exchanges of one job.
#[derive(Debug)]
pub struct Member {
    infra: Infra,
    job: JobId,
    node: NodeId,
    instance: InstanceId,
    metrics: Arc<Metrics>,
    /// The node's membership: nothing computed from staged updates leaves without it.
    membership: crate::cluster::lease::Continuity,
    share: NodeShare,
    /// The base model of the last step answered.
    global: Option<(ModelVersion, Parameters)>,
    /// Test only: how long to wait after answering a first phase (`SHOAL_TEST_TWOPHASE_HOLD_MS`),
    /// so that a fault test can SIGKILL this node between the two phases of a round.
    hold: Option<Duration>,
}

/// The environment variable that makes a leaf wait between its two-phase answers (test only:
/// `tests/twophase.rs` kills the node in that window; never set in production).
pub const HOLD_ENV: &str = "SHOAL_TEST_TWOPHASE_HOLD_MS";

impl Member {
    /// The member of `job` on this node.
    ///
    /// # Errors
    /// The spec's strategy cannot be built.
    pub fn new(ctx: &crate::node::NodeContext, job: JobId, spec: &JobSpec) -> Result<Member> {
        Ok(Member {
            infra: ctx.infra.clone(),
            job,
            node: ctx.node.clone(),
            instance: ctx.instance,
            metrics: Arc::clone(&ctx.metrics),
            membership: ctx.membership.clone(),
            share: NodeShare::new(spec, ctx.plugins.as_ref())?,
            global: None,
            hold: std::env::var(HOLD_ENV).ok().and_then(|v| v.parse().ok()).map(Duration::from_millis),
        })
    }

    /// Reads a request; `None` when it is not for this node (the top's own node computes its
    /// share in place).
    ///
    /// # Errors
    /// Decode and transfer-store errors.
    pub async fn read(&mut self, msg: &async_nats::Message) -> Result<Option<(PhaseRequest, Vec<u8>)>> {
        let (req, body, n): (PhaseRequest, _, _) =
            receive(&self.infra, "two-phase request", msg, |r: &PhaseRequest| r.object.clone()).await?;
        if req.top == self.node || !req.nodes.contains(&self.node) {
            return Ok(None);
        }
        self.metrics.twophase_bytes_received.inc_by(n);
        Ok(Some((req, body)))
    }

    /// Answers `req` from `snapshot`, the updates this node sent up for `req.collect` (`None`:
    /// it has no such snapshot, and does not answer; the top collects again).
    ///
    /// # Errors
    /// NATS errors; the strategy's errors for the local updates.
    pub async fn answer(&mut self, req: &PhaseRequest, body: &[u8], snapshot: Option<&[Held]>) -> Result<()> {
        let Some(held) = snapshot else {
            tracing::warn!(job = %self.job, round = %req.round, "two-phase request for a collection this node did not answer");
            return Ok(());
        };
        if !self.membership.holds() {
            // As with partials (leaf.rs): another node may hold these updates now.
            self.metrics.fencing("partial_withheld").inc();
            tracing::warn!(job = %self.job, "membership continuity not proven: two-phase answer withheld");
            return Ok(());
        }
        if self.global.as_ref().is_none_or(|(v, _)| *v != req.base_version) {
            let bytes = crate::jobs::get_model_bytes(&self.infra, &self.job, req.base_version).await?;
            let p = Parameters::from_safetensors(Arc::clone(&self.share.manifest), &bytes)?;
            self.global = Some((req.base_version, p));
        }
        let Some((_, global)) = self.global.as_ref() else { return Ok(()) };
        let members: Vec<CohortMember> = held
            .iter()
            .filter_map(|h| {
                Some(CohortMember {
                    client: h.client.clone(),
                    weight: h.num_examples as f64,
                    slot: h.slot.clone()?,
                })
            })
            .collect();
        let manifest = Arc::clone(&self.share.manifest);
        let views = views_of(&manifest, &members);
        let clients: Vec<ClientId> = views.iter().map(|v| v.client.clone()).collect();
        let first = matches!(req.step, PhaseStep::RfflUploads(_) | PhaseStep::BristleDistances(_));
        // CPU-bound, one pass over this node's share: in place on the leaf's task.
        let (report, partial) =
            tokio::task::block_in_place(|| self.share.compute(&req.step, body, &views, global))?;
        if first {
            self.metrics.twophase_updates.inc_by(views.len() as u64);
        }
        let answer = PhaseAnswer {
            exchange: req.exchange,
            node: self.node.clone(),
            instance: self.instance,
            clients,
            report,
            partial: partial.as_ref().map(|p| PartialMeta {
                total_weight: p.total_weight(),
                count: p.count(),
                first_owners: p.first_owners().to_vec(),
            }),
            object: None,
        };
        let body = partial.as_ref().map(|p| f64_bytes(p.values())).unwrap_or_default();
        let subject = self.infra.subjects.phase_answers_to(&self.job, &req.top);
        let object = shoal_proto::subjects::exchange_object(
            &self.job,
            req.exchange,
            0,
            &format!("answer-{}", self.node),
        );
        let n = send(&self.infra, subject, answer, object, |a, o| a.object = Some(o), &body).await?;
        self.metrics.twophase_bytes_sent.inc_by(n);
        if let (true, Some(hold)) = (first, self.hold) {
            tracing::warn!(job = %self.job, round = %req.round, hold_ms = hold.as_millis() as u64, "phase 1 answered; holding before phase 2 ({HOLD_ENV})");
            tokio::time::sleep(hold).await;
        }
        Ok(())
    }
}

/// The updates a leaf sent up for collection `collect` of a round: the first `n` held, `n` as
/// recorded by the snapshot.
pub fn snapshot<'a>(
    held: &'a [Held],
    snapshots: &[(CollectId, usize)],
    collect: CollectId,
) -> Option<&'a [Held]> {
    snapshots.iter().find(|(c, _)| *c == collect).and_then(|&(_, n)| held.get(..n))
}

// ---------------------------------------------------------------------------------------------
// The top side
// ---------------------------------------------------------------------------------------------

/// The round a top runs a two-phase exchange for.
#[derive(Debug)]
pub struct TopRound<'a> {
    /// The job.
    pub job: &'a JobId,
    /// The top's node.
    pub top: &'a NodeId,
    /// The round.
    pub round: RoundId,
    /// The collection the nodes answer from.
    pub collect: CollectId,
    /// The model version the round started from.
    pub base_version: ModelVersion,
    /// How long to wait for each step's answers.
    pub timeout: Duration,
    /// How often to check that the nodes asked are alive.
    pub liveness_tick: Duration,
}

/// What the top knows of the collection: every update and its node, the process that answered
/// for each node, and the slots staged on the top's own node.
#[derive(Debug)]
pub struct Cohort<'a> {
    /// Every update of the collection and the node holding it.
    pub entries: &'a [CohortEntry],
    /// Each contributing node and its process.
    pub members: &'a [(NodeId, InstanceId)],
    /// The updates staged on the top's node (read in place).
    pub local: &'a [CohortMember],
}

/// One step's answers, the top's own share first.
type Answers = Vec<(PhaseReport, Option<PartialAggregate>)>;

struct Exchange<'a, 'b> {
    ctx: &'a crate::node::NodeContext,
    r: &'a TopRound<'a>,
    cohort: &'a Cohort<'a>,
    share: &'a mut NodeShare,
    answers: &'b mut async_nats::Subscriber,
    exchange: ExchangeId,
    /// Per remote node, the clients its partial listed (sorted).
    expected: BTreeMap<NodeId, Vec<ClientId>>,
}

impl Exchange<'_, '_> {
    /// Publishes `step`, computes the top's own share and waits for every other node's answer.
    async fn step(&mut self, step: PhaseStep, body: &[u8], global: &Parameters) -> Result<Answers> {
        let infra = &self.ctx.infra;
        let nodes: Vec<NodeId> = self.expected.keys().cloned().collect();
        let req = PhaseRequest {
            round: self.r.round,
            exchange: self.exchange,
            collect: self.r.collect,
            top: self.r.top.clone(),
            base_version: self.r.base_version,
            nodes: nodes.clone(),
            step,
            object: None,
        };
        let subject = infra.subjects.phase_requests(self.r.job);
        let part = if matches!(req.step, PhaseStep::RfflDots(_)) { "u" } else { "request" };
        let object = shoal_proto::subjects::exchange_object(self.r.job, self.exchange, 0, part);
        let n = send(infra, subject, req.clone(), object, |r, o| r.object = Some(o), body).await?;
        // One copy reaches every node asked.
        self.ctx.metrics.twophase_bytes_sent.inc_by(n * nodes.len() as u64);
        let manifest = Arc::clone(global.manifest());
        let views = views_of(&manifest, self.cohort.local);
        let first = matches!(req.step, PhaseStep::RfflUploads(_) | PhaseStep::BristleDistances(_));
        let own = tokio::task::block_in_place(|| self.share.compute(&req.step, body, &views, global))?;
        if first {
            self.ctx.metrics.twophase_updates.inc_by(views.len() as u64);
        }
        let mut out = vec![own];
        let mut answered: BTreeSet<NodeId> = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + self.r.timeout;
        let mut tick = tokio::time::interval(self.r.liveness_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        while answered.len() < nodes.len() {
            let msg = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(Error::Timeout(self.r.timeout, "the nodes' two-phase answers")),
                _ = tick.tick() => {
                    let Ok(live) = self.ctx.liveness.live_nodes(infra).await else { continue };
                    if let Some(gone) = nodes.iter().find(|n| !answered.contains(*n) && !live.contains(n)) {
                        return Err(Error::TwoPhase { node: gone.clone(), detail: "gone between the phases".into() });
                    }
                    continue;
                }
                m = self.answers.next() => m.ok_or(Error::Gone("two-phase answer subscription"))?,
            };
            let (a, body, n): (PhaseAnswer, _, _) =
                match receive(infra, "two-phase answer", &msg, |a: &PhaseAnswer| a.object.clone()).await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(job = %self.r.job, error = %e, "malformed two-phase answer ignored");
                        continue;
                    }
                };
            if a.exchange != self.exchange || answered.contains(&a.node) {
                continue; // an earlier exchange's, or a duplicate
            }
            self.ctx.metrics.twophase_bytes_received.inc_by(n);
            let node = a.node.clone();
            let (report, partial) = check_answer(&self.expected, self.cohort.members, a, &body, &manifest)?;
            answered.insert(node);
            out.push((report, partial));
        }
        Ok(out)
    }
}

/// An answer's consistency with the collection: the process that sent the partial, the
/// clients it listed, a partial that fits the manifest.
fn check_answer(
    expected: &BTreeMap<NodeId, Vec<ClientId>>,
    members: &[(NodeId, InstanceId)],
    a: PhaseAnswer,
    body: &[u8],
    manifest: &Arc<ModelManifest>,
) -> Result<(PhaseReport, Option<PartialAggregate>)> {
    let refuse = |detail: String| Error::TwoPhase { node: a.node.clone(), detail };
    let Some(expected) = expected.get(&a.node) else {
        return Err(refuse("answered a step it was not asked".into()));
    };
    if !members.iter().any(|(n, i)| *n == a.node && *i == a.instance) {
        return Err(refuse("answered from another process than the one that sent its partial".into()));
    }
    if a.clients != *expected {
        return Err(refuse(format!(
            "answered for {} updates that are not the {} its partial listed",
            a.clients.len(),
            expected.len()
        )));
    }
    let partial = match a.partial {
        None => None,
        Some(meta) => {
            let values = f64s("two-phase partial", body, manifest.numel())?;
            let p = PartialAggregate::from_parts(
                Arc::clone(manifest),
                values,
                meta.first_owners,
                meta.total_weight,
                meta.count,
            )
            .map_err(|e| refuse(format!("a partial that does not fit: {e}")))?;
            Some(p)
        }
    };
    Ok((a.report, partial))
}

/// Runs the two-phase exchange of one round and returns the new model. The strategy's state
/// (RFFL's reputations, Bristle's round) advances only if both phases complete.
///
/// # Errors
/// [`Error::Timeout`], [`Error::TwoPhase`] (a node silent, gone or inconsistent: collect again);
/// the strategy's errors (the round fails); NATS errors.
#[allow(clippy::too_many_arguments)]
pub async fn run_top(
    ctx: &crate::node::NodeContext,
    r: &TopRound<'_>,
    strategy: &mut dyn Strategy,
    share: &mut NodeShare,
    global: &Parameters,
    cohort: &Cohort<'_>,
    answers: &mut async_nats::Subscriber,
) -> Result<Parameters> {
    let mut expected: BTreeMap<NodeId, Vec<ClientId>> = BTreeMap::new();
    for e in cohort.entries.iter().filter(|e| e.node != *r.top) {
        expected.entry(e.node.clone()).or_default().push(e.client.clone());
    }
    expected.values_mut().for_each(|c| c.sort());
    let exchange = ExchangeId(rand::random::<u64>());
    let mut x = Exchange { ctx, r, cohort, share, answers, exchange, expected };
    let manifest = Arc::clone(global.manifest());
    let fx = |e: shoal_functions::Error| Error::Functions(e);
    match strategy.two_phase() {
        Some(TwoPhase::Rffl(rffl)) => {
            let open = rffl.round_open();
            let first = x.step(PhaseStep::RfflUploads(open.clone()), &[], global).await?;
            let (mut uploads, mut partials) = (Vec::new(), Vec::new());
            for (report, partial) in first {
                let (PhaseReport::RfflUploads(u), Some(p)) = (report, partial) else {
                    return Err(Error::Decode {
                        what: "rffl phase 1",
                        detail: "not an upload report".into(),
                    });
                };
                uploads.push(u);
                partials.push(p);
            }
            let collected =
                tokio::task::block_in_place(|| rffl.collect_uploads(&manifest, &uploads, &partials))
                    .map_err(|e| fx(e.into()))?;
            let u = f64_bytes(&collected.aggregate_values());
            let second = x.step(PhaseStep::RfflDots(open), &u, global).await?;
            let mut dots = Vec::new();
            for (report, _) in second {
                let PhaseReport::RfflDots(d) = report else {
                    return Err(Error::Decode { what: "rffl phase 2", detail: "not a dot report".into() });
                };
                dots.push(d);
            }
            tokio::task::block_in_place(|| rffl.finish_dots(collected, &dots, global)).map_err(fx)
        }
        Some(TwoPhase::Bristle(bristle)) => {
            let open = bristle.round_open();
            let own = bristle.own_model().map(|p| p.as_bytes().to_vec()).unwrap_or_default();
            let first = x.step(PhaseStep::BristleDistances(open), &own, global).await?;
            let mut distances = Vec::new();
            for (report, _) in first {
                let PhaseReport::BristleDistances(d) = report else {
                    return Err(Error::Decode {
                        what: "bristle phase 1",
                        detail: "not a distance report".into(),
                    });
                };
                distances.push(d);
            }
            let decision = tokio::task::block_in_place(|| bristle.select_distances(global, &distances))
                .map_err(|e| fx(e.into()))?;
            let second = x.step(PhaseStep::BristleIntegrate(decision.message()), &[], global).await?;
            let (mut partials, mut integrations) = (Vec::new(), Vec::new());
            for (report, partial) in second {
                let (PhaseReport::BristleIntegration(i), Some(p)) = (report, partial) else {
                    return Err(Error::Decode {
                        what: "bristle phase 2",
                        detail: "not an integration".into(),
                    });
                };
                partials.push(p);
                integrations.extend(i);
            }
            tokio::task::block_in_place(|| {
                bristle.finish_integration(decision, global, &partials, &integrations)
            })
            .map_err(|e| fx(e.into()))
        }
        None => Err(Error::Decode {
            what: "two-phase exchange",
            detail: "the strategy has no two-phase protocol".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_functions::{DType, TensorSpec};
    use shoal_proto::twophase::{RfflDot, RfflDots};

    fn id(s: &str) -> ClientId {
        ClientId::new(s).unwrap()
    }

    fn node(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn answer(from: &str, instance: u64, clients: &[&str], partial: bool) -> PhaseAnswer {
        PhaseAnswer {
            exchange: ExchangeId(1),
            node: node(from),
            instance: InstanceId(instance),
            clients: clients.iter().map(|c| id(c)).collect(),
            report: PhaseReport::RfflDots(RfflDots {
                round: 0,
                dots: vec![RfflDot { client: id("a"), dot: 1.0 }],
            }),
            partial: partial.then(|| PartialMeta { total_weight: 3.0, count: 1, first_owners: vec![None] }),
            object: None,
        }
    }

    /// An answer is taken only from the process that sent the collection's partial, for
    /// exactly the clients that partial listed, with a partial that fits: anything else is a
    /// typed refusal (`ErrorKind::TwoPhase`, or `Decode` for a malformed partial), never folded.
    #[test]
    fn inconsistent_answers_are_refused() {
        let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![2])]).unwrap());
        let expected: BTreeMap<NodeId, Vec<ClientId>> = [(node("n2"), vec![id("a"), id("b")])].into();
        let members = [(node("n1"), InstanceId(1)), (node("n2"), InstanceId(2))];
        let values = f64_bytes(&[1.5, -2.0]);
        let ok = check_answer(&expected, &members, answer("n2", 2, &["a", "b"], true), &values, &m).unwrap();
        assert_eq!(
            ok.1.map(|p| (p.values().to_vec(), p.total_weight(), p.count())),
            Some((vec![1.5, -2.0], 3.0, 1))
        );
        let kind =
            |a: PhaseAnswer, body: &[u8]| check_answer(&expected, &members, a, body, &m).unwrap_err().kind();
        use crate::error::ErrorKind;
        assert_eq!(kind(answer("n2", 9, &["a", "b"], true), &values), ErrorKind::TwoPhase, "another process");
        assert_eq!(kind(answer("n2", 2, &["a"], true), &values), ErrorKind::TwoPhase, "a client missing");
        assert_eq!(
            kind(answer("n2", 2, &["a", "b", "c"], true), &values),
            ErrorKind::TwoPhase,
            "a client more"
        );
        assert_eq!(kind(answer("n3", 3, &["a", "b"], true), &values), ErrorKind::TwoPhase, "not asked");
        assert_eq!(
            kind(answer("n2", 2, &["a", "b"], true), &values[..8]),
            ErrorKind::Decode,
            "short partial"
        );
        let nan = f64_bytes(&[f64::NAN, 0.0]);
        assert_eq!(kind(answer("n2", 2, &["a", "b"], true), &nan), ErrorKind::Decode, "NaN partial");
    }

    /// The snapshot a step names is the prefix of the held updates the collection took.
    #[test]
    fn snapshots_are_found_by_collection() {
        let snaps = [(CollectId(7), 0usize), (CollectId(8), 0)];
        assert!(snapshot(&[], &snaps, CollectId(8)).is_some_and(<[Held]>::is_empty));
        assert!(snapshot(&[], &snaps, CollectId(9)).is_none());
        assert!(snapshot(&[], &[(CollectId(7), 3)], CollectId(7)).is_none(), "more than held: none");
    }
}
