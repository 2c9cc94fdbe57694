//! The coordinate-sharded exchange of whole-cohort strategies across nodes (DESIGN.md §5;
//! the maths is `shoal_functions::shard`). When a round of a median, trimmed-mean, Krum,
//! Multi-Krum or Bulyan job has updates staged on more than one node, the top:
//! 1. learns from the leaves' partials which updates each node holds (client ids and weights:
//!    scalars, no tensor bytes);
//! 2. publishes a [`ShardPlan`]: the cohort sorted by client, and an owner per shard (one shard
//!    per node that answered, of equal element counts);
//! 3. every node sends each owner that owner's range of the updates it holds
//!    (`<p>.<job>.slice.<owner>`), copying its own range out of shared memory locally; so every
//!    node sends and receives about (K−1)/K of its bytes, spread evenly over the K nodes;
//! 4. each owner runs the step on its shard's cohort and sends the result to the top
//!    (`<p>.<job>.shard-result.<top>`): the shard of the model (coordinate-wise rules), or the
//!    n × n squared distances (Krum, Bulyan), in which case the top sums them, selects, and
//!    publishes a second plan with the selection, answered with the shards of the model;
//! 5. the top assembles the model from the shards.
//!
//! Results equal the single-node ones (the per-shard maths is tested byte for byte against the
//! whole cohort in `functions/tests/sharded.rs`). An owner that does not answer within the
//! collection timeout fails the exchange; the top collects again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use shoal_functions::shard::{self, Shard};
use shoal_functions::{ClientId, JobId, JobSpec, ModelManifest, NodeId, Parameters, Strategy, UpdateView};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::nats::Infra;
use shoal_proto::cluster::CohortEntry;
use shoal_proto::cluster::ShardPlan;
use shoal_proto::cluster::ShardStep;
use shoal_proto::cluster::SliceHeader;

/// Sends `body` with `header` on `subject`, through the object store when larger than a
/// message. Returns the bytes sent.
async fn send(
    infra: &Infra,
    job: &JobId,
    subject: String,
    mut header: SliceHeader,
    part: &str,
    body: &[u8],
) -> Result<u64> {
    let limit = infra.max_payload().saturating_sub(64 * 1024);
    let msg = if body.len() > limit {
        let name = shoal_proto::subjects::exchange_object(job, header.exchange, header.shard, part);
        infra.put_transfer(&name, body).await?;
        header.object = Some(name);
        shoal_proto::envelope::frame(&header, &[])
    } else {
        shoal_proto::envelope::frame(&header, body)
    };
    infra.client.publish(subject, Bytes::from(msg)).await.map_err(|e| Error::nats("send shard data", e))?;
    Ok(body.len() as u64)
}

/// Reads one exchange message: its header and body (fetched from the object store, then
/// deleted, when it travelled there).
async fn receive(infra: &Infra, msg: &async_nats::Message) -> Result<(SliceHeader, Vec<u8>)> {
    let (header, body): (SliceHeader, &[u8]) =
        shoal_proto::envelope::unframe("shard exchange message", &msg.payload)?;
    let body = match &header.object {
        None => body.to_vec(),
        Some(name) => infra.take_transfer(name).await?,
    };
    Ok((header, body))
}

/// Bytes copied into 64-byte-aligned storage (what `UpdateView` needs).
#[derive(Debug)]
struct Aligned(Vec<u64>, usize);

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        Aligned(vec![0u64; len.div_ceil(8) + 8], len)
    }

    fn bytes(&self) -> &[u8] {
        let all: &[u8] = bytemuck::cast_slice(&self.0);
        let off = all.as_ptr().align_offset(64);
        &all[off..off + self.1]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.1;
        let all: &mut [u8] = bytemuck::cast_slice_mut(&mut self.0);
        let off = all.as_ptr().align_offset(64);
        &mut all[off..off + len]
    }

    fn from_bytes(b: &[u8]) -> Aligned {
        let mut a = Aligned::zeroed(b.len());
        a.bytes_mut().copy_from_slice(b);
        a
    }
}

// ---------------------------------------------------------------------------------------------
// The leaf side: sending slices, owning a shard
// ---------------------------------------------------------------------------------------------

/// A leaf's part in the exchanges of one job.
#[derive(Debug)]
pub struct Owner {
    infra: Infra,
    job: JobId,
    node: NodeId,
    spec: Arc<JobSpec>,
    manifest: Arc<ModelManifest>,
    metrics: Arc<Metrics>,
    /// The node's membership: slices of staged updates leave only while it holds.
    membership: crate::cluster::lease::Continuity,
    plan: Option<ShardPlan>,
    /// The shards of the current plan.
    shards: Vec<Shard>,
    /// Slices received or extracted, by (exchange, client); this node's shard only.
    slices: HashMap<(shoal_proto::ExchangeId, ClientId), Aligned>,
    /// The current plan's step has been answered.
    answered: bool,
}

impl Owner {
    /// An owner for `job` on `node`.
    pub fn new(
        infra: Infra,
        job: JobId,
        node: NodeId,
        spec: Arc<JobSpec>,
        metrics: Arc<Metrics>,
        membership: crate::cluster::lease::Continuity,
    ) -> Owner {
        let manifest = Arc::new(spec.manifest.clone());
        Owner {
            infra,
            job,
            node,
            spec,
            manifest,
            metrics,
            membership,
            plan: None,
            shards: Vec::new(),
            slices: HashMap::new(),
            answered: false,
        }
    }

    fn my_shard(&self) -> Option<usize> {
        self.plan.as_ref()?.owners.iter().position(|o| *o == self.node)
    }

    /// Handles a plan: sends the slices of the updates this node holds (`held`: client →
    /// staged bytes), then answers if it already has its whole shard.
    ///
    /// # Errors
    /// NATS errors sending slices; a plan that does not fit the manifest.
    pub async fn on_plan(
        &mut self,
        plan: ShardPlan,
        held: &HashMap<ClientId, crate::staging::SlotView>,
    ) -> Result<()> {
        let first_step = !matches!(plan.step, ShardStep::Select { .. });
        let same = self.plan.as_ref().is_some_and(|p| p.exchange == plan.exchange);
        if first_step || !same {
            self.shards = shard::plan(&self.manifest, plan.owners.len())?;
            if self.shards.len() != plan.owners.len() {
                return Err(Error::Decode { what: "shard plan", detail: "more owners than elements".into() });
            }
            self.slices.retain(|(x, _), _| *x == plan.exchange);
        }
        self.plan = Some(plan.clone());
        self.answered = false;
        if first_step && !self.membership.holds() {
            // As with partials (leaf.rs): another node may hold these updates now.
            self.metrics.fencing("partial_withheld").inc();
            tracing::warn!(job = %self.job, "membership continuity not proven: slices withheld");
            return Ok(());
        }
        if first_step {
            for e in plan.cohort.iter().filter(|e| e.node == self.node) {
                let Some(slot) = held.get(&e.client) else {
                    tracing::warn!(job = %self.job, client = %e.client, "planned update not held here");
                    continue;
                };
                for (i, (sh, owner)) in self.shards.iter().zip(&plan.owners).enumerate() {
                    let mut sub = Aligned::zeroed(sh.manifest().slot_bytes());
                    sh.extract(&self.manifest, slot.bytes(), sub.bytes_mut())?;
                    if *owner == self.node {
                        self.slices.insert((plan.exchange, e.client.clone()), sub);
                        continue;
                    }
                    let header = SliceHeader {
                        exchange: plan.exchange,
                        shard: i as u32,
                        client: Some(e.client.clone()),
                        object: None,
                    };
                    let subject = self.infra.subjects.slices_to(&self.job, owner);
                    let part = format!("slice-{}", e.client);
                    let n = send(&self.infra, &self.job, subject, header, &part, sub.bytes()).await?;
                    self.metrics.shard_bytes_sent.inc_by(n);
                }
            }
        }
        self.maybe_answer().await
    }

    /// Handles a slice sent to this node.
    ///
    /// # Errors
    /// Decode and NATS errors.
    pub async fn on_slice(&mut self, msg: &async_nats::Message) -> Result<()> {
        let (h, body) = receive(&self.infra, msg).await?;
        self.metrics.shard_bytes_received.inc_by(body.len() as u64);
        let Some(client) = h.client else { return Ok(()) };
        // Slices may arrive before the plan does: keep them by exchange id (a new plan drops
        // those of other exchanges).
        self.slices.insert((h.exchange, client), Aligned::from_bytes(&body));
        self.maybe_answer().await
    }

    async fn maybe_answer(&mut self) -> Result<()> {
        let (Some(plan), Some(i)) = (self.plan.clone(), self.my_shard()) else { return Ok(()) };
        if self.answered
            || !plan.cohort.iter().all(|e| self.slices.contains_key(&(plan.exchange, e.client.clone())))
        {
            return Ok(());
        }
        self.answered = true;
        let sh = self.shards[i].clone();
        let global =
            crate::jobs::load_model(&self.infra, &self.job, plan.base_version, &self.manifest).await?;
        let sub_global = sh.sub_params(&global)?;
        let mut strategy = shoal_functions::factory::build_strategy(&self.spec)?;
        // The shard's cohort in plan order, read in place.
        let subs: Vec<&Aligned> =
            plan.cohort.iter().filter_map(|e| self.slices.get(&(plan.exchange, e.client.clone()))).collect();
        let body = {
            let sub_manifest = sh.manifest();
            let views: Vec<UpdateView<'_>> = plan
                .cohort
                .iter()
                .zip(&subs)
                .map(|(e, a)| UpdateView {
                    manifest: sub_manifest,
                    bytes: a.bytes(),
                    weight: e.weight,
                    client: &e.client,
                })
                .collect();
            // CPU-bound, but a shard is 1/K of the model: run in place on the leaf's task.
            tokio::task::block_in_place(|| step(&mut *strategy, &plan.step, &views, &sub_global))?
        };
        let header = SliceHeader { exchange: plan.exchange, shard: i as u32, client: None, object: None };
        let subject = self.infra.subjects.shard_results_to(&self.job, &plan.top);
        let n = send(&self.infra, &self.job, subject, header, "result", &body).await?;
        self.metrics.shard_bytes_sent.inc_by(n);
        if !matches!(plan.step, ShardStep::Distances) {
            // The exchange's last step: its slices are not needed again (a retry re-sends).
            self.slices.clear();
        }
        Ok(())
    }
}

/// Runs one step on a shard's cohort: the shard of the model (raw sub-slot bytes) or the
/// distances (n × n f64, LE).
fn step(
    strategy: &mut dyn Strategy,
    step: &ShardStep,
    views: &[UpdateView<'_>],
    sub_global: &Parameters,
) -> Result<Vec<u8>> {
    Ok(match step {
        ShardStep::Aggregate => strategy.aggregate_cohort(views, sub_global)?.as_bytes().to_vec(),
        ShardStep::Distances => {
            let d = shoal_functions::robust::pairwise_sq_distances(views)?;
            d.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
        ShardStep::Select { selected } => {
            let sel: Vec<usize> = selected.iter().map(|&k| k as usize).collect();
            strategy.aggregate_selected(views, &sel, sub_global)?.as_bytes().to_vec()
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The top side
// ---------------------------------------------------------------------------------------------

/// The round a top runs an exchange for.
#[derive(Debug, Clone, Copy)]
pub struct TopRound<'a> {
    /// The job.
    pub job: &'a JobId,
    /// The top's node (where results go).
    pub top: &'a NodeId,
    /// The round.
    pub round: shoal_functions::RoundId,
    /// The model version the round started from.
    pub base_version: shoal_functions::ModelVersion,
    /// How long to wait for each step's results.
    pub timeout: Duration,
}

/// Runs the exchange for one round and returns the aggregated model.
///
/// # Errors
/// [`Error::Timeout`] when an owner does not answer within the timeout; strategy errors (e.g.
/// a cohort below `min_clients`); NATS errors.
#[allow(clippy::too_many_arguments)]
pub async fn run_top(
    infra: &Infra,
    r: &TopRound<'_>,
    strategy: &mut dyn Strategy,
    global: &Parameters,
    mut cohort: Vec<CohortEntry>,
    owners: Vec<NodeId>,
    results: &mut async_nats::Subscriber,
    metrics: &Metrics,
) -> Result<Parameters> {
    let TopRound { job, top, round, base_version, timeout } = *r;
    cohort.sort_by(|a, b| a.client.cmp(&b.client));
    let manifest = global.manifest();
    let shards = shard::plan(manifest, owners.len())?;
    let owners: Vec<NodeId> = owners.into_iter().take(shards.len()).collect();
    let exchange = shoal_proto::ExchangeId(rand::random::<u64>());
    let selecting = strategy.sharding() == shoal_functions::Sharding::DistanceSelection;
    let mut plan = ShardPlan {
        round,
        exchange,
        top: top.clone(),
        cohort,
        owners,
        base_version,
        step: if selecting { ShardStep::Distances } else { ShardStep::Aggregate },
    };
    let publish = |p: &ShardPlan| {
        let (client, subject, body) =
            (infra.client.clone(), infra.subjects.shard_plans(job), Bytes::from(shoal_proto::encode(p)));
        async move { client.publish(subject, body).await.map_err(|e| Error::nats("publish shard plan", e)) }
    };
    publish(&plan).await?;
    let mut parts = gather(infra, results, exchange, shards.len(), timeout, metrics).await?;
    if selecting {
        let n = plan.cohort.len();
        let mut d = vec![0.0f64; n * n];
        for part in parts.values() {
            if part.len() != n * n * 8 {
                return Err(Error::Decode {
                    what: "shard distances",
                    detail: format!("{} bytes for {n} updates", part.len()),
                });
            }
            for (acc, c) in d.iter_mut().zip(part.chunks_exact(8)) {
                *acc += f64::from_le_bytes(c.try_into().unwrap_or_default());
            }
        }
        let clients: Vec<ClientId> = plan.cohort.iter().map(|e| e.client.clone()).collect();
        let selected = strategy.select_by_distances(&d, &clients)?;
        plan.step = ShardStep::Select { selected: selected.iter().map(|&k| k as u32).collect() };
        publish(&plan).await?;
        parts = gather(infra, results, exchange, shards.len(), timeout, metrics).await?;
    }
    let mut out = global.clone();
    for (i, sh) in shards.iter().enumerate() {
        let bytes = parts.get(&(i as u32)).ok_or(Error::Timeout(timeout, "a shard result"))?;
        let mut sub = Parameters::zeros(Arc::clone(sh.manifest()));
        if bytes.len() != sub.as_bytes().len() {
            return Err(Error::Decode {
                what: "shard result",
                detail: format!("{} bytes for shard {i}", bytes.len()),
            });
        }
        sub.as_bytes_mut().copy_from_slice(bytes);
        sh.insert(&mut out, &sub)?;
    }
    Ok(out)
}

/// Waits for one result per shard of `exchange`.
async fn gather(
    infra: &Infra,
    results: &mut async_nats::Subscriber,
    exchange: shoal_proto::ExchangeId,
    shards: usize,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<HashMap<u32, Vec<u8>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut parts = HashMap::new();
    while parts.len() < shards {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Err(Error::Timeout(timeout, "the shard owners' results")),
            m = results.next() => m.ok_or(Error::Timeout(timeout, "the shard owners' results"))?,
        };
        match receive(infra, &msg).await {
            Ok((h, body)) if h.exchange == exchange => {
                metrics.shard_bytes_received.inc_by(body.len() as u64);
                parts.insert(h.shard, body);
            }
            Ok(_) => {} // an earlier exchange's, or a retry's
            Err(e) => tracing::warn!(error = %e, "malformed shard result ignored"),
        }
    }
    Ok(parts)
}
