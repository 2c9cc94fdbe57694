//! The [`Strategy`] trait, [`PartialAggregate`] and [`UpdateView`].
//!
//! The trait follows Flower's `configure_fit`/`aggregate_fit` split without its inheritance. A
//! strategy is either **streaming-mergeable** (FedAvg, FedBuff, FedFix: each update is folded into
//! a preallocated accumulator as it arrives, partials from several aggregators merge, memory is
//! O(model)) or **whole-cohort** (median, trimmed mean, Krum, RFFL, Bristle: it needs every update
//! at once and reads them as zero-copy views of shared memory).

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ids::ClientId;
use crate::tensor::{AggregationPolicy, ModelManifest, Parameters, TensorData, ValidationError};

/// A client update as the kernels see it: the staged slot bytes (canonical layout of
/// `manifest`, 8-byte aligned), the update's weight and its client.
#[derive(Debug, Clone, Copy)]
pub struct UpdateView<'a> {
    /// The job's manifest (layout of `bytes`).
    pub manifest: &'a ModelManifest,
    /// Slot bytes, [`ModelManifest::slot_bytes`] long.
    pub bytes: &'a [u8],
    /// The update's coefficient (usually `num_examples`; staleness-scaled in async modes).
    pub weight: f64,
    /// Who sent it.
    pub client: &'a ClientId,
}

impl<'a> UpdateView<'a> {
    /// Typed view of tensor `i`.
    ///
    /// # Errors
    /// [`Error::Misaligned`] if the bytes are not aligned for the dtype (staging aligns them).
    pub fn tensor(&self, i: usize) -> Result<TensorData<'a>> {
        let s = self.manifest.slots()[i];
        let spec = &self.manifest.tensors()[i];
        self.bytes
            .get(s.byte_offset..s.byte_offset + s.byte_len)
            .and_then(|b| TensorData::view(spec.dtype, b))
            .ok_or_else(|| Error::Misaligned(spec.name.clone()))
    }
}

/// Whether a strategy can fold updates one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mergeability {
    /// `fold` each update on arrival, `merge` partials, `finish` once.
    Streaming,
    /// Needs the whole cohort: call [`Strategy::aggregate_cohort`].
    WholeCohort,
}

/// A mergeable intermediate: per-element accumulator (weighted sums for `mean` tensors, running
/// maxima for `max`, the lowest client's values for `first`), total weight, count and, when
/// asked for ([`Self::with_client_list`]), the contributing clients. Allocated once per
/// aggregator and [`reset`](Self::reset) between rounds.
///
/// The client list is opt-in: a leaf never sends it (client ids stay on their node, so a
/// partial's size does not grow with the cohort), and keeping it would cost an id clone and a
/// push per fold on the update path.
#[derive(Clone, PartialEq)]
pub struct PartialAggregate {
    manifest: Arc<ModelManifest>,
    values: Vec<f64>,
    first_owner: Vec<Option<ClientId>>,
    total_weight: f64,
    count: u64,
    /// `Some` when the client list is kept.
    client_list: Option<Vec<ClientId>>,
}

impl fmt::Debug for PartialAggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartialAggregate")
            .field("elements", &self.values.len())
            .field("total_weight", &self.total_weight)
            .field("count", &self.count)
            .finish()
    }
}

impl PartialAggregate {
    /// An empty partial for `manifest` (one allocation of `numel` f64), without a client list.
    pub fn new(manifest: Arc<ModelManifest>) -> PartialAggregate {
        // Zeroed memory straight from the allocator (pages the kernel zero-fills when the fold
        // first touches them): only `max` tensors are written here.
        let mut values = vec![0.0; manifest.numel()];
        for (spec, s) in manifest.tensors().iter().zip(manifest.slots()) {
            if spec.policy == AggregationPolicy::Max {
                values[s.elem_offset..s.elem_offset + s.numel].fill(f64::NEG_INFINITY);
            }
        }
        PartialAggregate {
            values,
            first_owner: vec![None; manifest.tensors().len()],
            manifest,
            total_weight: 0.0,
            count: 0,
            client_list: None,
        }
    }

    /// An empty partial that also lists the clients it folds ([`Self::clients`]), for callers
    /// that need them (tests, a single-node tool); merging a partial without a list into it
    /// drops the list.
    pub fn with_client_list(manifest: Arc<ModelManifest>) -> PartialAggregate {
        PartialAggregate { client_list: Some(Vec::new()), ..PartialAggregate::new(manifest) }
    }

    /// Empties the partial for reuse in the next round, without reallocating.
    pub fn reset(&mut self) {
        for (spec, s) in self.manifest.tensors().iter().zip(self.manifest.slots()) {
            let init = if spec.policy == AggregationPolicy::Max { f64::NEG_INFINITY } else { 0.0 };
            self.values[s.elem_offset..s.elem_offset + s.numel].fill(init);
        }
        self.first_owner.iter_mut().for_each(|o| *o = None);
        self.total_weight = 0.0;
        self.count = 0;
        if let Some(c) = &mut self.client_list {
            c.clear();
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<ModelManifest> {
        &self.manifest
    }

    /// Number of updates folded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the folded updates' weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Clients whose updates were folded, in fold order, when the partial keeps its client list
    /// ([`Self::tracks_clients`]); empty otherwise.
    pub fn clients(&self) -> &[ClientId] {
        self.client_list.as_deref().unwrap_or(&[])
    }

    /// Whether the partial keeps its client list (created by [`Self::with_client_list`] or given
    /// one by [`Self::with_clients`], and never merged with a partial that had none).
    pub fn tracks_clients(&self) -> bool {
        self.client_list.is_some()
    }

    /// The accumulator of tensor `i`.
    pub fn tensor_values(&self, i: usize) -> &[f64] {
        let s = self.manifest.slots()[i];
        &self.values[s.elem_offset..s.elem_offset + s.numel]
    }

    /// Every accumulator, tensor after tensor in manifest order (`numel` f64; `max` tensors
    /// start at −∞, `skip` tensors stay 0).
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The client whose values a `first` tensor holds, per tensor (`None` for other policies
    /// and for an empty partial).
    pub fn first_owners(&self) -> &[Option<ClientId>] {
        &self.first_owner
    }

    /// Rebuilds a partial from its parts (the inverse of [`Self::values`],
    /// [`Self::first_owners`], [`Self::total_weight`], [`Self::count`]), e.g. after it crossed
    /// nodes. It has no client list; attach one with [`Self::with_clients`].
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] when the lengths do not fit `manifest`;
    /// [`Error::InvalidWeight`] for a negative or non-finite total weight.
    pub fn from_parts(
        manifest: Arc<ModelManifest>,
        values: Vec<f64>,
        first_owner: Vec<Option<ClientId>>,
        total_weight: f64,
        count: u64,
    ) -> Result<PartialAggregate> {
        if values.len() != manifest.numel() || first_owner.len() != manifest.tensors().len() {
            return Err(Error::ManifestMismatch("partial aggregate parts do not fit the manifest"));
        }
        if !(total_weight.is_finite() && total_weight >= 0.0) {
            return Err(Error::InvalidWeight(total_weight));
        }
        Ok(PartialAggregate { manifest, values, first_owner, total_weight, count, client_list: None })
    }

    /// This partial with `clients` as its client list (e.g. the list a sender named).
    pub fn with_clients(mut self, clients: Vec<ClientId>) -> PartialAggregate {
        self.client_list = Some(clients);
        self
    }

    pub(crate) fn check_manifest(&self, m: &ModelManifest) -> Result<()> {
        if std::ptr::eq(&*self.manifest, m) || *self.manifest == *m {
            Ok(())
        } else {
            Err(Error::ManifestMismatch("update and accumulator come from different manifests"))
        }
    }

    /// Folds one update with the manifest's per-tensor policies (`mean` tensors get
    /// `acc += weight * x`).
    ///
    /// # Errors
    /// [`Error::InvalidWeight`] for a non-finite or non-positive weight,
    /// [`Error::ManifestMismatch`] / [`Error::Misaligned`] for a foreign or unaligned view. Nothing
    /// is folded on error.
    pub fn fold(&mut self, u: &UpdateView<'_>) -> Result<()> {
        self.fold_batch(std::slice::from_ref(u))
    }

    /// Folds several updates; f32 `mean` tensors are folded tile by tile
    /// ([`crate::kernels::fold_f32_tiled`]) so each update is read from memory once.
    ///
    /// # Errors
    /// As [`Self::fold`]; the batch is checked before anything is folded.
    pub fn fold_batch(&mut self, updates: &[UpdateView<'_>]) -> Result<()> {
        for u in updates {
            self.check_manifest(u.manifest)?;
            if !(u.weight.is_finite() && u.weight > 0.0) {
                return Err(Error::InvalidWeight(u.weight));
            }
            for i in 0..self.manifest.tensors().len() {
                u.tensor(i)?;
            }
        }
        let manifest = Arc::clone(&self.manifest);
        let mut f32_views: Vec<(&[f32], f64)> = Vec::with_capacity(updates.len());
        for (i, (spec, s)) in manifest.tensors().iter().zip(manifest.slots()).enumerate() {
            let acc = &mut self.values[s.elem_offset..s.elem_offset + s.numel];
            match spec.policy {
                AggregationPolicy::Mean | AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                    f32_views.clear();
                    for u in updates {
                        match u.tensor(i)? {
                            TensorData::F32(x) => f32_views.push((x, u.weight)),
                            other => crate::kernels::scaled_add(acc, other, u.weight),
                        }
                    }
                    crate::kernels::fold_f32_tiled(acc, &f32_views);
                }
                AggregationPolicy::Max => {
                    for u in updates {
                        crate::kernels::max_assign(acc, u.tensor(i)?);
                    }
                }
                AggregationPolicy::First => {
                    for u in updates {
                        if self.first_owner[i].as_ref().is_none_or(|o| u.client < o) {
                            crate::kernels::assign(acc, u.tensor(i)?);
                            self.first_owner[i] = Some(u.client.clone());
                        }
                    }
                }
                AggregationPolicy::Skip => {}
            }
        }
        for u in updates {
            self.total_weight += u.weight;
            self.count += 1;
        }
        if let Some(list) = &mut self.client_list {
            list.extend(updates.iter().map(|u| u.client.clone()));
        }
        Ok(())
    }

    /// Whether updates of `manifest` can be folded piece by piece ([`Self::fold_prefix`]):
    /// every tensor f32 with an element-wise sum policy (`mean`, `statistic`, `variance`) or
    /// `skip`.
    pub fn folds_by_range(manifest: &ModelManifest) -> bool {
        manifest.tensors().iter().all(|t| {
            t.policy == AggregationPolicy::Skip
                || (t.dtype == crate::DType::F32
                    && matches!(
                        t.policy,
                        AggregationPolicy::Mean | AggregationPolicy::Statistic | AggregationPolicy::Variance
                    ))
        })
    }

    /// Folds bytes `[from, prefix.len())` of an update's slot of which only the first
    /// `prefix.len()` bytes are staged so far: `acc += weight * x` per element, exactly what
    /// [`Self::fold`] does to those elements, so folding a slot piece by piece as it is staged
    /// gives the same bits as folding it whole (fold-while-staging). Both ends must fall on
    /// 4-byte boundaries (f32 elements). The update is not counted: call
    /// [`Self::count_folded`] once every byte of it is folded.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] for a manifest [`Self::folds_by_range`] refuses, unaligned
    /// ends or a prefix longer than the slot; [`Error::InvalidWeight`];
    /// [`ValidationError::NonFinite`] for NaN/±Inf in the range. Nothing is folded on error.
    pub fn fold_prefix(&mut self, prefix: &[u8], from: usize, weight: f64) -> Result<()> {
        let to = prefix.len();
        if !Self::folds_by_range(&self.manifest) {
            return Err(Error::ManifestMismatch("the manifest cannot be folded piece by piece"));
        }
        if !from.is_multiple_of(4) || !to.is_multiple_of(4) || from > to || to > self.manifest.slot_bytes() {
            return Err(Error::ManifestMismatch(
                "a piece of an update must cover whole f32 elements of its slot",
            ));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::InvalidWeight(weight));
        }
        let manifest = Arc::clone(&self.manifest);
        let pieces = || {
            manifest.tensors().iter().zip(manifest.slots()).filter_map(move |(spec, s)| {
                let (lo, hi) = (s.byte_offset.max(from), (s.byte_offset + s.byte_len).min(to));
                (lo < hi && spec.policy != AggregationPolicy::Skip).then_some((spec, s, lo, hi))
            })
        };
        for (spec, s, lo, hi) in pieces() {
            let Some(TensorData::F32(x)) = TensorData::view(spec.dtype, &prefix[lo..hi]) else {
                return Err(Error::Misaligned(spec.name.clone()));
            };
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                let index = (lo - s.byte_offset) / 4 + i;
                return Err(ValidationError::NonFinite { name: spec.name.clone(), index }.into());
            }
        }
        for (spec, s, lo, hi) in pieces() {
            let Some(TensorData::F32(x)) = TensorData::view(spec.dtype, &prefix[lo..hi]) else {
                return Err(Error::Misaligned(spec.name.clone()));
            };
            let at = s.elem_offset + (lo - s.byte_offset) / 4;
            crate::kernels::fold_f32_tiled(&mut self.values[at..at + x.len()], &[(x, weight)]);
        }
        Ok(())
    }

    /// Counts an update folded piece by piece ([`Self::fold_prefix`]) once all of it is.
    ///
    /// # Errors
    /// [`Error::InvalidWeight`] (the partial is unchanged).
    pub fn count_folded(&mut self, weight: f64, client: &ClientId) -> Result<()> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::InvalidWeight(weight));
        }
        self.total_weight += weight;
        self.count += 1;
        if let Some(list) = &mut self.client_list {
            list.push(client.clone());
        }
        Ok(())
    }

    /// Merges `other` into `self` (sums add, maxima max, the lower client's `first` values win).
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] if the partials come from different manifests.
    pub fn merge(&mut self, other: &PartialAggregate) -> Result<()> {
        self.check_manifest(&other.manifest)?;
        let manifest = Arc::clone(&self.manifest);
        for (i, (spec, s)) in manifest.tensors().iter().zip(manifest.slots()).enumerate() {
            let r = s.elem_offset..s.elem_offset + s.numel;
            let (a, b) = (&mut self.values[r.clone()], &other.values[r]);
            match spec.policy {
                AggregationPolicy::Mean | AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b)
                }
                AggregationPolicy::Max => a.iter_mut().zip(b).for_each(|(a, b)| *a = a.max(*b)),
                AggregationPolicy::First => {
                    if let Some(o) = &other.first_owner[i] {
                        if self.first_owner[i].as_ref().is_none_or(|s| o < s) {
                            a.copy_from_slice(b);
                            self.first_owner[i] = Some(o.clone());
                        }
                    }
                }
                AggregationPolicy::Skip => {}
            }
        }
        self.total_weight += other.total_weight;
        self.count += other.count;
        match (&mut self.client_list, &other.client_list) {
            (Some(list), Some(more)) => list.extend_from_slice(more),
            // A list that misses the other partial's clients would lie: drop it.
            (Some(_), None) if other.count > 0 => self.client_list = None,
            _ => {}
        }
        Ok(())
    }

    /// Delta updates, `statistic` and `variance` tensors: adds `weight · (base − current)` to
    /// their accumulators, for an update of fold weight `weight` whose client trained from
    /// `base` while the step will be taken from `current` (a stale update in FedBuff, FedFix
    /// or asynchronous FedAvg). With it, `current + Σ w (Δ + base − current) / Σ w` is the
    /// weighted mean of the values the clients computed; without it, a stale delta is read as
    /// relative to `current`. A no-op for fresh updates (`base` = `current`) and for manifests
    /// without statistics. Call it once per folded stale update, with the same weight.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] if `base` or `current` has another manifest;
    /// [`Error::InvalidWeight`] for a non-finite or non-positive weight. Nothing changes on
    /// error.
    pub fn rebase_statistics(&mut self, weight: f64, base: &Parameters, current: &Parameters) -> Result<()> {
        self.check_manifest(base.manifest())?;
        self.check_manifest(current.manifest())?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(Error::InvalidWeight(weight));
        }
        let manifest = Arc::clone(&self.manifest);
        for (i, (spec, s)) in manifest.tensors().iter().zip(manifest.slots()).enumerate() {
            if spec.policy.is_statistic() {
                let (b, c) = (base.tensor(i), current.tensor(i));
                let acc = &mut self.values[s.elem_offset..s.elem_offset + s.numel];
                for (e, a) in acc.iter_mut().enumerate() {
                    *a += weight * (b.get_f64(e) - c.get_f64(e));
                }
            }
        }
        Ok(())
    }
}

/// How a whole-cohort strategy runs when its cohort is spread over several nodes
/// ([`crate::shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Not across nodes at all (a whole-cohort strategy under a server optimizer runs on one
    /// node), or not needed (streaming strategies merge partials instead).
    Unsupported,
    /// The two-phase protocol (DESIGN.md §5): per-client scalars and per-node partials cross
    /// nodes, never updates ([`crate::rffl::twophase`], [`crate::bristle::twophase`]); the
    /// runtime reaches the strategy through [`Strategy::two_phase`] (RFFL, Bristle).
    TwoPhase,
    /// Coordinate-wise (median, trimmed mean): [`Strategy::aggregate_cohort`] on each shard's
    /// cohort gives exactly that shard of the result.
    Coordinatewise,
    /// Selection by squared distances, which add up over shards
    /// ([`Strategy::select_by_distances`]), then [`Strategy::aggregate_selected`] per shard
    /// (Krum, Multi-Krum, Bulyan).
    DistanceSelection,
}

/// A strategy that runs across nodes by the two-phase protocol ([`Sharding::TwoPhase`]).
#[derive(Debug)]
pub enum TwoPhase<'a> {
    /// RFFL ([`crate::rffl::twophase`]).
    Rffl(&'a mut crate::rffl::Rffl),
    /// Bristle ([`crate::bristle::twophase`]).
    Bristle(&'a mut crate::bristle::Bristle),
}

/// An aggregation strategy: the maths and policy of one job.
pub trait Strategy: Send + fmt::Debug {
    /// Short name (`fedavg`, `krum`, ...), used in logs and metrics.
    fn name(&self) -> &'static str;

    /// Whether updates can be folded one at a time.
    fn mergeability(&self) -> Mergeability;

    /// The coefficient an update is folded with. The default is its `num_examples` (FedAvg);
    /// asynchronous strategies scale it by a staleness function or replace it (FedBuff, FedFix).
    /// `staleness` is the current model version minus the update's base version (0 in
    /// synchronous rounds).
    ///
    /// # Errors
    /// A strategy that needs a profile of the client (FedFix's compute time) and has none.
    fn update_weight(&self, client: &ClientId, num_examples: u64, staleness: u64) -> Result<f64> {
        let _ = (client, staleness);
        Ok(num_examples as f64)
    }

    /// The model (or delta) this strategy serves to `client` personally, for strategies with
    /// per-client rewards (RFFL's top-q_i sparsified aggregate of the last round). `None` for
    /// strategies that give everyone the global model.
    ///
    /// # Errors
    /// Strategy-specific (e.g. RFFL: a client that is not a participant).
    fn client_reward(&self, client: &ClientId) -> Option<Result<Parameters>> {
        let _ = client;
        None
    }

    /// Folds one update into `partial` with the manifest's per-tensor policies (the default,
    /// which every streaming strategy uses: strategies differ in their weights and `finish`).
    ///
    /// # Errors
    /// [`Error::NotStreaming`] for whole-cohort strategies; input errors as
    /// [`PartialAggregate::fold`].
    fn fold(&self, partial: &mut PartialAggregate, update: &UpdateView<'_>) -> Result<()> {
        if self.mergeability() == Mergeability::WholeCohort {
            return Err(Error::NotStreaming(self.name()));
        }
        partial.fold(update)
    }

    /// Folds several updates at once (the tiled batch fold of the partial).
    ///
    /// # Errors
    /// As [`Self::fold`].
    fn fold_batch(&self, partial: &mut PartialAggregate, updates: &[UpdateView<'_>]) -> Result<()> {
        if self.mergeability() == Mergeability::WholeCohort {
            return Err(Error::NotStreaming(self.name()));
        }
        partial.fold_batch(updates)
    }

    /// Merges two partials of the same round (associative and commutative).
    ///
    /// # Errors
    /// [`Error::NotStreaming`] for whole-cohort strategies; [`Error::ManifestMismatch`].
    fn merge(&self, into: &mut PartialAggregate, other: &PartialAggregate) -> Result<()> {
        if self.mergeability() == Mergeability::WholeCohort {
            return Err(Error::NotStreaming(self.name()));
        }
        into.merge(other)
    }

    /// How the strategy runs over coordinate shards held by several nodes.
    fn sharding(&self) -> Sharding {
        Sharding::Unsupported
    }

    /// For [`Sharding::TwoPhase`]: the strategy itself, whose two-phase steps the runtime's top
    /// drives (`None` for every other strategy).
    fn two_phase(&mut self) -> Option<TwoPhase<'_>> {
        None
    }

    /// For [`Sharding::DistanceSelection`]: the positions (in `clients`' order) of the updates
    /// the strategy keeps, given the n × n matrix of squared distances between them (row-major,
    /// summed over every shard's `Mean` tensors, as
    /// [`crate::robust::pairwise_sq_distances`]).
    ///
    /// # Errors
    /// [`Error::Strategy`] for strategies that do not select by distances; the cohort-size
    /// errors of [`Self::aggregate_cohort`].
    fn select_by_distances(&self, distances: &[f64], clients: &[ClientId]) -> Result<Vec<usize>> {
        let _ = (distances, clients);
        Err(Error::Strategy { strategy: self.name(), detail: "does not select by distances".into() })
    }

    /// For [`Sharding::DistanceSelection`]: the result for `cohort` (one shard's, or the whole
    /// model's) given the `selected` positions from [`Self::select_by_distances`].
    ///
    /// # Errors
    /// As [`Self::aggregate_cohort`].
    fn aggregate_selected(
        &mut self,
        cohort: &[UpdateView<'_>],
        selected: &[usize],
        global: &Parameters,
    ) -> Result<Parameters> {
        let _ = (cohort, selected, global);
        Err(Error::Strategy { strategy: self.name(), detail: "does not select by distances".into() })
    }

    /// Turns the round's merged partial into the next global model (the server step).
    ///
    /// # Errors
    /// [`Error::ZeroTotalWeight`] when nothing (or only zero weight) was folded: no model is
    /// produced and the previous global model must stand.
    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters>;

    /// [`Self::finish`] into `global` itself: on success `global` is the new model. Strategies
    /// that compute the new model element by element from the old one (FedAvg) override it to
    /// write in place, which saves a model-sized copy at the top (memory O(model): accumulator
    /// plus one model); the default computes the new model and moves it in.
    ///
    /// # Errors
    /// As [`Self::finish`]. On error `global` may hold a partly written model: the caller must
    /// not use it (the top reloads the committed model).
    fn finish_into(&mut self, partial: &PartialAggregate, global: &mut Parameters) -> Result<()> {
        *global = self.finish(partial, global)?;
        Ok(())
    }

    /// The new model as a file computed from the partial as it is read, when the strategy can
    /// ([`crate::tensor::AccumulatorModel`]: no model-sized buffer beside the accumulator at
    /// the close; FedAvg over parameters). `None`: call [`Self::finish_into`].
    ///
    /// # Errors
    /// As [`Self::finish`] (a non-finite result is found by
    /// [`crate::tensor::AccumulatorModel::check_finite`]).
    fn finish_streamed(
        &mut self,
        _partial: &Arc<PartialAggregate>,
    ) -> Option<Result<crate::tensor::AccumulatorModel>> {
        None
    }

    /// Whether [`Self::finish_into`] reads `global`'s values. When it does not (FedAvg over
    /// full parameters with no `skip` tensor: every element comes from the accumulator), the
    /// top hands it zeros instead of loading the global model (memory and a model read saved).
    fn finish_reads_global(&self, _manifest: &crate::ModelManifest) -> bool {
        true
    }

    /// Aggregates a whole cohort at once. The default folds every update and finishes, which is
    /// what streaming strategies mean by it; whole-cohort strategies override it.
    ///
    /// # Errors
    /// As [`Self::fold`] and [`Self::finish`].
    fn aggregate_cohort(&mut self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Parameters> {
        let mut p = PartialAggregate::new(Arc::clone(global.manifest()));
        self.fold_batch(&mut p, cohort)?;
        self.finish(&p, global)
    }

    /// The state this strategy carries from one round to the next, encoded for the top to
    /// persist with each commit ([`crate::state`]: a versioned msgpack envelope naming the
    /// strategy). A top that takes over builds the strategy from the job spec and calls
    /// [`Self::restore_state`] with it; the rounds that follow are then exactly the
    /// uninterrupted run's. The default, for strategies without state (FedAvg, FedBuff, the
    /// robust rules), saves an envelope with an empty state.
    ///
    /// # Errors
    /// [`Error::InvalidState`] if the state cannot be encoded (not for the crate's strategies).
    fn save_state(&self) -> Result<Vec<u8>> {
        crate::state::save(self.name(), &())
    }

    /// Replaces this strategy's state by one [`Self::save_state`] produced (by this strategy
    /// or a twin built from the same job spec on another node).
    ///
    /// # Errors
    /// [`Error::InvalidState`]: corrupt bytes, another format version, another strategy's
    /// state, too large, or a state that does not fit (another configuration, non-finite or
    /// mis-sized values). On error the strategy is unchanged, never reset.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        crate::state::load::<()>(self.name(), bytes)
    }
}

impl<S: Strategy + ?Sized> Strategy for Box<S> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn mergeability(&self) -> Mergeability {
        (**self).mergeability()
    }
    fn update_weight(&self, client: &ClientId, num_examples: u64, staleness: u64) -> Result<f64> {
        (**self).update_weight(client, num_examples, staleness)
    }
    fn client_reward(&self, client: &ClientId) -> Option<Result<Parameters>> {
        (**self).client_reward(client)
    }
    fn fold(&self, partial: &mut PartialAggregate, update: &UpdateView<'_>) -> Result<()> {
        (**self).fold(partial, update)
    }
    fn fold_batch(&self, partial: &mut PartialAggregate, updates: &[UpdateView<'_>]) -> Result<()> {
        (**self).fold_batch(partial, updates)
    }
    fn merge(&self, into: &mut PartialAggregate, other: &PartialAggregate) -> Result<()> {
        (**self).merge(into, other)
    }
    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters> {
        (**self).finish(partial, global)
    }
    fn finish_into(&mut self, partial: &PartialAggregate, global: &mut Parameters) -> Result<()> {
        (**self).finish_into(partial, global)
    }
    fn finish_reads_global(&self, manifest: &crate::ModelManifest) -> bool {
        (**self).finish_reads_global(manifest)
    }
    fn aggregate_cohort(&mut self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Parameters> {
        (**self).aggregate_cohort(cohort, global)
    }
    fn sharding(&self) -> Sharding {
        (**self).sharding()
    }
    fn two_phase(&mut self) -> Option<TwoPhase<'_>> {
        (**self).two_phase()
    }
    fn select_by_distances(&self, distances: &[f64], clients: &[ClientId]) -> Result<Vec<usize>> {
        (**self).select_by_distances(distances, clients)
    }
    fn aggregate_selected(
        &mut self,
        cohort: &[UpdateView<'_>],
        selected: &[usize],
        global: &Parameters,
    ) -> Result<Parameters> {
        (**self).aggregate_selected(cohort, selected, global)
    }
    fn save_state(&self) -> Result<Vec<u8>> {
        (**self).save_state()
    }
    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).restore_state(bytes)
    }
}
