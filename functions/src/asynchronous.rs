//! Asynchronous aggregation as server steps over deltas: FedBuff, FedFix and asynchronous FedAvg.
//!
//! All three are instances of one server update (Fraboni, Kameni, Vidal & Lorenzi, "A General
//! Theory for Federated Optimization with Asynchronous and Heterogeneous Clients Updates",
//! JMLR 24(110), 2023, arXiv:2206.10189; `reference/algorithms.md` §C.1):
//!
//! ```text
//! θ^{n+1} = θ^n + η_g · Σ_{i ∈ S_n} d_i · Δ_i,      Δ_i = θ_i − θ^{ρ_i(n)}
//! ```
//!
//! Each delta is relative to the model the client **started from** (a stale base is allowed and
//! expected); it is added to the **current** global model. Shoal's deltas are client parameters
//! minus the base model ([`UpdateKind::Delta`](crate::UpdateKind::Delta)), so the step adds them.
//! FLSim's FedBuff uploads θ_start − θ_end and subtracts; the two are the same step.
//!
//! # Contract with the runtime
//!
//! The strategies here are streaming-mergeable ([`Mergeability::Streaming`]). The coefficient
//! d_i of an update depends on things the [`UpdateView`](crate::UpdateView) does not carry (its staleness, the
//! client's compute time), so **the runtime computes it before folding** and puts it in
//! [`UpdateView::weight`](crate::UpdateView::weight):
//!
//! | strategy | weight the runtime folds with | commit when |
//! |---|---|---|
//! | [`FedBuff`] | [`FedBuff::update_weight`]`(num_examples, staleness)` | [`FedBuff::is_full`], or `max_wait` elapsed with a non-empty buffer ([`FedBuff::should_flush`]) |
//! | [`FedFix`] | [`FedFix::update_weight`]`(client)` = ⌈τ_i/Δt⌉·p_i | at every tick `(n+1)·Δt` ([`FedFix::step_time`]) |
//! | [`AsyncFedAvg`] | [`AsyncFedAvg::update_weight`]`(client)` | after every update (buffer of one) |
//!
//! [`AsyncWeighting::fold_weight`] offers the same through one signature for all three. A weight
//! of 0 (a zero-example update, a threshold staleness function with value 0, a client of
//! importance 0) means **discard the update**: [`PartialAggregate::fold`] rejects weights ≤ 0.
//! The staleness is [`Staleness::between`]`(current model version, update's base version)`.
//!
//! `finish` then computes `global + η_g · Σ_i d_i Δ_i / norm` for `mean` tensors, with `norm`
//! from [`FedBuffNormalisation`] for FedBuff and 1 for FedFix and asynchronous FedAvg. As in
//! [`FedAvg`](crate::FedAvg)'s delta mode, `max`/`first` tensors take `global + folded value`
//! and `skip` tensors keep the global value; `statistic` and `variance` tensors get
//! `global + Σ d_i Δ_i / Σ d_i` (the weighted mean of the clients' values once stale deltas are
//! rebased with [`PartialAggregate::rebase_statistics`], never scaled by η_g or `norm`);
//! integer tensors are rounded half to even. A step
//! that overflows the tensor's dtype is [`Error::NonFiniteResult`]; an empty buffer is
//! [`Error::ZeroTotalWeight`] (the previous model stands).
//!
//! # Time
//!
//! Compute times and periods are integer **ticks** of a unit the runtime chooses (milliseconds,
//! or 1/90 of a time unit for the reference experiments), never floats: ⌈τ/Δt⌉ taken in
//! floating point can land on the wrong side of an integer (`algorithms.md` §C.6 point 4).
//! Ties are broken by (time, client id) (§D point 3).
//!
//! [`sim`] is a deterministic integer-tick simulator of the schemes (§C.4), generic over the
//! scalar type so tests can run it in exact rationals.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Div, Mul, Sub};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{ClientId, ModelVersion};
use crate::server_opt::{floats_mut, FloatElem};
use crate::statistics::write_statistic;
use crate::strategy::{Mergeability, PartialAggregate, Strategy};
use crate::tensor::{AggregationPolicy, Parameters, TensorData};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Configuration and bookkeeping errors of the asynchronous strategies. (Errors of folding and
/// of the server step are the crate's [`Error`].)
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AsyncError {
    /// A hyperparameter is out of range (buffer size 0, period 0, negative exponent, non-finite
    /// learning rate, compute time 0, ...). The message names it.
    #[error("invalid asynchronous strategy configuration: {0}")]
    InvalidConfig(String),
    /// An update claims a base model version newer than the current one.
    #[error("update base version {base} is newer than the current model version {current}")]
    FutureBase {
        /// The update's base version.
        base: ModelVersion,
        /// The current global model version.
        current: ModelVersion,
    },
    /// A weight was asked for a client whose compute time and importance were never registered
    /// in the [`ClientProfiles`].
    #[error("client {0} has no registered compute time and importance")]
    UnknownClient(ClientId),
}

/// The `Copy` classification of [`AsyncError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AsyncErrorKind {
    /// See [`AsyncError::InvalidConfig`].
    InvalidConfig,
    /// See [`AsyncError::FutureBase`].
    FutureBase,
    /// See [`AsyncError::UnknownClient`].
    UnknownClient,
}

impl AsyncError {
    /// The error's kind.
    pub fn kind(&self) -> AsyncErrorKind {
        match self {
            AsyncError::InvalidConfig(_) => AsyncErrorKind::InvalidConfig,
            AsyncError::FutureBase { .. } => AsyncErrorKind::FutureBase,
            AsyncError::UnknownClient(_) => AsyncErrorKind::UnknownClient,
        }
    }
}

impl AsyncErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AsyncErrorKind::InvalidConfig => "invalid_config",
            AsyncErrorKind::FutureBase => "future_base",
            AsyncErrorKind::UnknownClient => "unknown_client",
        }
    }
}

fn invalid(msg: impl Into<String>) -> AsyncError {
    AsyncError::InvalidConfig(msg.into())
}

fn check_lr(lr: f64) -> Result<(), AsyncError> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(invalid(format!("server_lr {lr} must be finite and > 0")))
    }
}

// ---------------------------------------------------------------------------------------------
// Staleness and its weight (the formulas are part of the job spec: `shoal_proto::spec`)
// ---------------------------------------------------------------------------------------------

pub use shoal_proto::spec::{ExampleWeight, FedBuffNormalisation, FedBuffSpec, StalenessWeight};
pub use shoal_proto::Staleness;

impl From<shoal_proto::SpecError> for AsyncError {
    fn from(e: shoal_proto::SpecError) -> Self {
        AsyncError::InvalidConfig(e.0)
    }
}

impl From<shoal_proto::ids::FutureBase> for AsyncError {
    fn from(e: shoal_proto::ids::FutureBase) -> Self {
        AsyncError::FutureBase { base: e.base, current: e.current }
    }
}

// ---------------------------------------------------------------------------------------------
// The common server step
// ---------------------------------------------------------------------------------------------

/// Tensor `i` of `out` = g + scale · acc, in place; false if the bytes do not cast.
fn axpy_into<T: FloatElem>(out: &mut Parameters, i: usize, g: &[T], acc: &[f64], scale: f64) -> bool {
    match floats_mut::<T>(out, i) {
        Some(o) => {
            for ((o, g), s) in o.iter_mut().zip(g).zip(acc) {
                *o = T::from_f64(g.to_f64() + scale * s);
            }
            true
        }
        None => false,
    }
}

/// `global + scale · acc` for `mean` tensors, `global + acc` for `max`/`first`, `global` for
/// `skip`, `global + acc / Σw` for `statistic`/`variance` (the weighted mean of the deltas,
/// no step scaling; variances clamped at 0); checked finite in the output dtype.
fn delta_step(partial: &PartialAggregate, global: &Parameters, scale: f64) -> Result<Parameters> {
    partial.check_manifest(global.manifest())?;
    let total = partial.total_weight();
    if partial.count() == 0 || !(total > 0.0 && total.is_finite()) {
        return Err(Error::ZeroTotalWeight { total, count: partial.count() });
    }
    let manifest = Arc::clone(global.manifest());
    let mut out = global.clone();
    for (i, spec) in manifest.tensors().iter().enumerate() {
        let acc = partial.tensor_values(i);
        let g = global.tensor(i);
        match spec.policy {
            AggregationPolicy::Skip => {}
            AggregationPolicy::Mean => {
                // f32/f64 in place; other dtypes (halves, integers) through the rounding writer.
                let done = match g {
                    TensorData::F32(g) => axpy_into(&mut out, i, g, acc, scale),
                    TensorData::F64(g) => axpy_into(&mut out, i, g, acc, scale),
                    _ => false,
                };
                if !done {
                    out.write_tensor_f64(i, acc.iter().enumerate().map(|(e, s)| g.get_f64(e) + scale * s))
                }
            }
            AggregationPolicy::Max | AggregationPolicy::First => {
                out.write_tensor_f64(i, acc.iter().enumerate().map(|(e, v)| g.get_f64(e) + v))
            }
            AggregationPolicy::Statistic | AggregationPolicy::Variance => {
                write_statistic(&mut out, i, spec.policy, acc, total, Some(g))
            }
        }
    }
    if let Err(crate::tensor::ValidationError::NonFinite { name, .. }) =
        crate::tensor::check_finite(&manifest, out.as_bytes())
    {
        return Err(Error::NonFiniteResult(name));
    }
    Ok(out)
}

/// One signature for the fold weight of every asynchronous strategy, for a runtime that holds
/// the strategy generically. Each strategy ignores the inputs it does not use.
pub trait AsyncWeighting {
    /// The coefficient d_i to put in [`UpdateView::weight`](crate::UpdateView::weight) before
    /// folding; 0 means discard.
    ///
    /// # Errors
    /// [`AsyncError::UnknownClient`] when the strategy needs the client's profile and has none.
    fn fold_weight(
        &self,
        client: &ClientId,
        num_examples: u64,
        staleness: Staleness,
    ) -> Result<f64, AsyncError>;
}

// ---------------------------------------------------------------------------------------------
// FedBuff
// ---------------------------------------------------------------------------------------------

/// FedBuff: buffered asynchronous aggregation (Nguyen, Malik, Zhao, Rabbat et al., AISTATS 2022;
/// FLSim `flsim/optimizers/async_aggregators.py`; `algorithms.md` §C.3).
///
/// Each arriving delta Δ_k is folded with weight w_k = [`ExampleWeight`] × [`StalenessWeight`]
/// ([`Self::update_weight`]); when the buffer holds K updates ([`Self::is_full`]), or after
/// `max_wait` with at least one ([`Self::should_flush`], `bug-cases.md` row 25), the runtime
/// calls [`Strategy::finish`], which returns θ + η_g · Σ w_k Δ_k / norm ([`FedBuffNormalisation`]),
/// and resets the partial. A server optimiser (FLSim's SGD-with-momentum or Adam) is
/// [`crate::server_opt::WithServerOptimizer`] around this strategy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FedBuff {
    /// K, updates per server step (≥ 1; FLSim's sent140 example uses 10).
    pub buffer_size: u32,
    /// s(τ).
    pub staleness: StalenessWeight,
    /// What the buffered sum is divided by.
    pub normalisation: FedBuffNormalisation,
    /// The example-count part of the weight.
    pub example_weight: ExampleWeight,
    /// η_g (finite, > 0).
    pub server_lr: f64,
}

impl FedBuff {
    /// The paper's form: buffer of `buffer_size`, s(τ) = 1/√(1+τ), division by K, equal
    /// example weights, η_g = 1.
    pub fn new(buffer_size: u32) -> FedBuff {
        FedBuff {
            buffer_size,
            staleness: StalenessWeight::paper(),
            normalisation: FedBuffNormalisation::ByBufferSize,
            example_weight: ExampleWeight::Equal,
            server_lr: 1.0,
        }
    }

    /// Checks the configuration; call it when the job is created.
    ///
    /// # Errors
    /// [`AsyncError::InvalidConfig`] for K = 0, a bad η_g or a bad staleness function.
    pub fn validate(&self) -> Result<(), AsyncError> {
        if self.buffer_size == 0 {
            return Err(invalid("buffer_size must be at least 1"));
        }
        check_lr(self.server_lr)?;
        Ok(self.staleness.validate()?)
    }

    /// The weight the runtime folds an update with: `example_weight(num_examples) ·
    /// s(staleness)`, dimensionless, ≥ 0. **0 means discard** (zero examples, or a threshold
    /// function with value 0 past its cutoff): do not fold it.
    pub fn update_weight(&self, num_examples: u64, staleness: Staleness) -> f64 {
        self.example_weight.weight(num_examples) * self.staleness.weight(staleness)
    }

    /// Whether `partial` holds at least K updates (commit now).
    pub fn is_full(&self, partial: &PartialAggregate) -> bool {
        partial.count() >= u64::from(self.buffer_size)
    }

    /// Whether to commit: the buffer is full, or it is non-empty and the oldest buffered update
    /// has waited `max_wait` or more (`waited` is measured by the runtime from the first fold
    /// into this partial).
    pub fn should_flush(&self, partial: &PartialAggregate, waited: Duration, max_wait: Duration) -> bool {
        self.is_full(partial) || (partial.count() > 0 && waited >= max_wait)
    }

    /// The divisor `finish` applies to the folded sum for `partial` (see
    /// [`FedBuffNormalisation`]).
    pub fn normaliser(&self, partial: &PartialAggregate) -> f64 {
        match self.normalisation {
            FedBuffNormalisation::ByBufferSize => partial.count().max(u64::from(self.buffer_size)) as f64,
            FedBuffNormalisation::ByWeightSum => partial.total_weight(),
            FedBuffNormalisation::Sum => 1.0,
        }
    }
}

impl From<FedBuffSpec> for FedBuff {
    fn from(s: FedBuffSpec) -> FedBuff {
        FedBuff {
            buffer_size: s.buffer_size,
            staleness: s.staleness,
            normalisation: s.normalisation,
            example_weight: s.example_weight,
            server_lr: s.server_lr,
        }
    }
}

impl From<FedBuff> for FedBuffSpec {
    fn from(f: FedBuff) -> FedBuffSpec {
        FedBuffSpec {
            buffer_size: f.buffer_size,
            staleness: f.staleness,
            normalisation: f.normalisation,
            example_weight: f.example_weight,
            server_lr: f.server_lr,
        }
    }
}

impl AsyncWeighting for FedBuff {
    fn fold_weight(&self, _: &ClientId, num_examples: u64, staleness: Staleness) -> Result<f64, AsyncError> {
        Ok(self.update_weight(num_examples, staleness))
    }
}

/// The state of FedFix and asynchronous FedAvg: their client profiles, whose compute times
/// the runtime refreshes ([`ClientProfiles::set_compute_ticks`]); restored through
/// [`ClientProfiles::set`], so every profile is checked again.
macro_rules! profiles_state {
    () => {
        fn save_state(&self) -> Result<Vec<u8>> {
            let profiles: Vec<(&ClientId, &ClientProfile)> = self.clients.iter().collect();
            crate::state::save(self.name(), &profiles)
        }

        fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
            let saved: Vec<(ClientId, ClientProfile)> = crate::state::load(self.name(), bytes)?;
            let mut clients = ClientProfiles::new();
            for (c, p) in saved {
                clients.set(c, p).map_err(|e| crate::state::mismatch(e.to_string()))?;
            }
            self.clients = clients;
            Ok(())
        }
    };
}

macro_rules! streaming_fold {
    () => {
        fn mergeability(&self) -> Mergeability {
            Mergeability::Streaming
        }

        /// [`AsyncWeighting::fold_weight`] with `staleness` in model versions.
        fn update_weight(&self, client: &ClientId, num_examples: u64, staleness: u64) -> Result<f64> {
            self.fold_weight(client, num_examples, Staleness(staleness))
                .map_err(|e| crate::Error::Strategy { strategy: self.name(), detail: e.to_string() })
        }
    };
}

impl Strategy for FedBuff {
    fn name(&self) -> &'static str {
        "fedbuff"
    }

    streaming_fold!();

    /// θ + η_g · Σ w_k Δ_k / [`FedBuff::normaliser`].
    ///
    /// # Errors
    /// [`Error::ZeroTotalWeight`] for an empty buffer, [`Error::ManifestMismatch`],
    /// [`Error::NonFiniteResult`].
    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters> {
        let norm = self.normaliser(partial);
        if !(norm > 0.0 && norm.is_finite()) {
            return Err(Error::ZeroTotalWeight { total: partial.total_weight(), count: partial.count() });
        }
        delta_step(partial, global, self.server_lr / norm)
    }
}

// ---------------------------------------------------------------------------------------------
// Client profiles (compute time, importance)
// ---------------------------------------------------------------------------------------------

/// What FedFix and asynchronous FedAvg know about one client.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClientProfile {
    /// τ_i, the client's time from receiving a model to returning its update, in ticks (≥ 1).
    /// Configured, or an estimate the runtime measures and refreshes.
    pub compute_ticks: u64,
    /// p_i, the client's importance (finite, ≥ 0): 1/M (`uniform`, all the paper's
    /// experiments) or n_i/Σn (`ratio`). They need not sum to 1, but FedFix equals FedAvg only
    /// when they do.
    pub importance: f64,
}

/// The compute times and importances of a job's clients, keyed by [`ClientId`] (never by list
/// position, `algorithms.md` §D point 1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientProfiles {
    profiles: BTreeMap<ClientId, ClientProfile>,
}

impl ClientProfiles {
    /// No clients.
    pub fn new() -> ClientProfiles {
        ClientProfiles::default()
    }

    /// Clients with the given compute times (ticks) and uniform importance 1/M.
    ///
    /// # Errors
    /// As [`Self::set`].
    pub fn uniform(clients: impl IntoIterator<Item = (ClientId, u64)>) -> Result<ClientProfiles, AsyncError> {
        let mut p = ClientProfiles::new();
        for (id, ticks) in clients {
            p.set(id, ClientProfile { compute_ticks: ticks, importance: 0.0 })?;
        }
        p.set_uniform_importance();
        Ok(p)
    }

    /// Registers or replaces a client's profile.
    ///
    /// # Errors
    /// [`AsyncError::InvalidConfig`] for a compute time of 0 ticks or an importance that is
    /// negative or not finite; nothing changes.
    pub fn set(&mut self, client: ClientId, profile: ClientProfile) -> Result<(), AsyncError> {
        if profile.compute_ticks == 0 {
            return Err(invalid(format!("client {client}: compute time must be at least 1 tick")));
        }
        if !(profile.importance.is_finite() && profile.importance >= 0.0) {
            return Err(invalid(format!(
                "client {client}: importance {} must be finite and >= 0",
                profile.importance
            )));
        }
        self.profiles.insert(client, profile);
        Ok(())
    }

    /// Replaces a registered client's compute time with a new estimate, keeping its importance.
    ///
    /// # Errors
    /// [`AsyncError::UnknownClient`], or [`AsyncError::InvalidConfig`] for 0 ticks.
    pub fn set_compute_ticks(&mut self, client: &ClientId, ticks: u64) -> Result<(), AsyncError> {
        if ticks == 0 {
            return Err(invalid(format!("client {client}: compute time must be at least 1 tick")));
        }
        let p = self.profiles.get_mut(client).ok_or_else(|| AsyncError::UnknownClient(client.clone()))?;
        p.compute_ticks = ticks;
        Ok(())
    }

    /// Sets every importance to 1/M.
    pub fn set_uniform_importance(&mut self) {
        let m = self.profiles.len() as f64;
        self.profiles.values_mut().for_each(|p| p.importance = 1.0 / m);
    }

    /// Removes a client.
    pub fn remove(&mut self, client: &ClientId) -> Option<ClientProfile> {
        self.profiles.remove(client)
    }

    /// A client's profile.
    pub fn get(&self, client: &ClientId) -> Option<&ClientProfile> {
        self.profiles.get(client)
    }

    /// Number of clients M.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// Whether no client is registered.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// The profiles in client-id order.
    pub fn iter(&self) -> impl Iterator<Item = (&ClientId, &ClientProfile)> {
        self.profiles.iter()
    }

    fn require(&self, client: &ClientId) -> Result<&ClientProfile, AsyncError> {
        self.profiles.get(client).ok_or_else(|| AsyncError::UnknownClient(client.clone()))
    }

    /// Σ_j 1/τ_j over the registered clients, in 1/tick.
    pub fn inverse_time_sum(&self) -> f64 {
        self.profiles.values().map(|p| 1.0 / p.compute_ticks as f64).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Weight formulas, generic so the simulator can run them in exact rationals
// ---------------------------------------------------------------------------------------------

/// The arithmetic the weight formulas and the [`sim`] simulator need: a field with integers.
/// Implemented for `f64`; tests implement it for an exact rational type.
pub trait SimScalar:
    Clone
    + PartialEq
    + fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    /// The integer `n` in this type.
    fn from_i64(n: i64) -> Self;
}

impl SimScalar for f64 {
    fn from_i64(n: i64) -> f64 {
        n as f64
    }
}

fn ticks<T: SimScalar>(t: u64) -> T {
    T::from_i64(i64::try_from(t).unwrap_or(i64::MAX))
}

/// FedFix participation period ⌈τ_i/Δt⌉ in server steps (≥ 1 for τ_i ≥ 1), in exact integer
/// arithmetic. A client with this period takes part every ⌈τ_i/Δt⌉ steps with delay
/// ⌈τ_i/Δt⌉ − 1 (`algorithms.md` §C.2).
///
/// # Panics
/// If `period_ticks` is 0 (validated configurations never pass 0).
pub fn participation_period(compute_ticks: u64, period_ticks: u64) -> u64 {
    compute_ticks.div_ceil(period_ticks)
}

/// FedFix weight d_i = ⌈τ_i/Δt⌉ · p_i (`algorithms.md` §C.2, [F-code] `FL/server.py`), so
/// that E(ω_i) = d_i / ⌈τ_i/Δt⌉ = p_i.
///
/// # Panics
/// If `period_ticks` is 0.
pub fn fedfix_weight<T: SimScalar>(compute_ticks: u64, period_ticks: u64, importance: T) -> T {
    ticks::<T>(participation_period(compute_ticks, period_ticks)) * importance
}

/// Weighted asynchronous FedAvg weight d_i = (Σ_j 1/τ_j) · τ_i · p_i (`algorithms.md` §C.2):
/// client i returns in a fraction (1/τ_i)/Σ_j(1/τ_j) of the steps, so E(ω_i) ∝ p_i. The
/// result is dimensionless (the tick unit cancels).
pub fn async_fedavg_weight<T: SimScalar>(all_compute_ticks: &[u64], compute_ticks: u64, importance: T) -> T {
    let inv_sum = all_compute_ticks.iter().fold(T::from_i64(0), |s, &t| s + T::from_i64(1) / ticks::<T>(t));
    inv_sum * ticks::<T>(compute_ticks) * importance
}

// ---------------------------------------------------------------------------------------------
// FedFix
// ---------------------------------------------------------------------------------------------

/// FedFix (Fraboni et al. 2023, `algorithms.md` §C.2/§C.4): the server steps at fixed times
/// t = (n+1)·Δt with every update that arrived by then, each weighted d_i = ⌈τ_i/Δt⌉·p_i.
///
/// The runtime keeps one partial per period: it folds each arriving delta with
/// [`Self::update_weight`]`(client)`, and at [`Self::step_time`]`(n)` calls
/// [`Strategy::finish`] (θ + η_g Σ d_i Δ_i, no normalisation) and sends the new model to the
/// clients that took part. A period in which nothing arrived is [`Error::ZeroTotalWeight`]:
/// the model is unchanged but the step index n still advances (§C.7), which the runtime
/// records. With Δt ≥ max_i τ_i and Σ p_i = 1 this is synchronous FedAvg with weights p_i.
#[derive(Debug, Clone, PartialEq)]
pub struct FedFix {
    /// Δt, in ticks (≥ 1).
    pub period_ticks: u64,
    /// η_g (finite, > 0; 1 in the paper's experiments).
    pub server_lr: f64,
    /// τ_i and p_i of every client.
    pub clients: ClientProfiles,
}

impl FedFix {
    /// FedFix with period Δt = `period_ticks`, η_g = 1.
    pub fn new(period_ticks: u64, clients: ClientProfiles) -> FedFix {
        FedFix { period_ticks, server_lr: 1.0, clients }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`AsyncError::InvalidConfig`] for Δt = 0 or a bad η_g.
    pub fn validate(&self) -> Result<(), AsyncError> {
        if self.period_ticks == 0 {
            return Err(invalid("FedFix period must be at least 1 tick"));
        }
        check_lr(self.server_lr)
    }

    /// ⌈τ_i/Δt⌉ for `client`: it takes part every this many steps.
    ///
    /// # Errors
    /// [`AsyncError::UnknownClient`]; [`AsyncError::InvalidConfig`] for Δt = 0.
    pub fn participation_period(&self, client: &ClientId) -> Result<u64, AsyncError> {
        self.validate()?;
        Ok(participation_period(self.clients.require(client)?.compute_ticks, self.period_ticks))
    }

    /// d_i = ⌈τ_i/Δt⌉ · p_i, the weight the runtime folds `client`'s update with (0: discard).
    ///
    /// # Errors
    /// As [`Self::participation_period`].
    pub fn update_weight(&self, client: &ClientId) -> Result<f64, AsyncError> {
        let p = self.clients.require(client)?;
        self.validate()?;
        Ok(fedfix_weight(p.compute_ticks, self.period_ticks, p.importance))
    }

    /// The time of server step n (0-based): (n+1)·Δt ticks after the start (saturating).
    pub fn step_time(&self, n: u64) -> u64 {
        n.saturating_add(1).saturating_mul(self.period_ticks)
    }
}

impl AsyncWeighting for FedFix {
    fn fold_weight(&self, client: &ClientId, _: u64, _: Staleness) -> Result<f64, AsyncError> {
        self.update_weight(client)
    }
}

impl Strategy for FedFix {
    fn name(&self) -> &'static str {
        "fedfix"
    }

    streaming_fold!();

    /// θ + η_g · Σ d_i Δ_i.
    ///
    /// # Errors
    /// [`Error::ZeroTotalWeight`] for an empty period, [`Error::ManifestMismatch`],
    /// [`Error::NonFiniteResult`].
    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters> {
        delta_step(partial, global, self.server_lr)
    }
    profiles_state!();
}

// ---------------------------------------------------------------------------------------------
// Asynchronous FedAvg
// ---------------------------------------------------------------------------------------------

/// The two weightings of asynchronous FedAvg (`algorithms.md` §C.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AsyncFedAvgWeighting {
    /// d_i = (Σ_j 1/τ_j) τ_i p_i: unbiased, converges to the federated optimum.
    #[default]
    Weighted,
    /// d_i = 1: biased towards fast clients (q_i ∝ 1/τ_i; test vector C-3).
    Identical,
}

/// Asynchronous FedAvg (the FedAsync family as Fraboni et al. run it): a buffer of one, so
/// every arriving delta immediately steps the model: θ + η_g · d_i Δ_i. Ties in arrival are
/// two consecutive steps, lower client id first.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncFedAvg {
    /// The weighting.
    pub weighting: AsyncFedAvgWeighting,
    /// η_g (finite, > 0).
    pub server_lr: f64,
    /// τ_i and p_i of every client (Σ_j 1/τ_j runs over all of them).
    pub clients: ClientProfiles,
}

impl AsyncFedAvg {
    /// Asynchronous FedAvg with η_g = 1.
    pub fn new(weighting: AsyncFedAvgWeighting, clients: ClientProfiles) -> AsyncFedAvg {
        AsyncFedAvg { weighting, server_lr: 1.0, clients }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`AsyncError::InvalidConfig`] for a bad η_g.
    pub fn validate(&self) -> Result<(), AsyncError> {
        check_lr(self.server_lr)
    }

    /// d_i for `client` (0: discard).
    ///
    /// # Errors
    /// [`AsyncError::UnknownClient`] (also for `Identical`, so that unregistered clients are
    /// caught the same way under both weightings).
    pub fn update_weight(&self, client: &ClientId) -> Result<f64, AsyncError> {
        let p = self.clients.require(client)?;
        Ok(match self.weighting {
            AsyncFedAvgWeighting::Identical => 1.0,
            AsyncFedAvgWeighting::Weighted => {
                self.clients.inverse_time_sum() * p.compute_ticks as f64 * p.importance
            }
        })
    }

    /// Whether to commit (the buffer holds one update).
    pub fn is_full(&self, partial: &PartialAggregate) -> bool {
        partial.count() >= 1
    }
}

impl AsyncWeighting for AsyncFedAvg {
    fn fold_weight(&self, client: &ClientId, _: u64, _: Staleness) -> Result<f64, AsyncError> {
        self.update_weight(client)
    }
}

impl Strategy for AsyncFedAvg {
    fn name(&self) -> &'static str {
        "async-fedavg"
    }

    streaming_fold!();

    /// θ + η_g · d_i Δ_i (summed, if the runtime folded more than one).
    ///
    /// # Errors
    /// As [`FedFix`]'s `finish`.
    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters> {
        delta_step(partial, global, self.server_lr)
    }
    profiles_state!();
}

// ---------------------------------------------------------------------------------------------
// Simulator
// ---------------------------------------------------------------------------------------------

/// A deterministic integer-tick simulator of the asynchronous schemes over scalar models
/// (`algorithms.md` §C.4), generic over [`SimScalar`] so that tests can run it in exact
/// rationals. Clients are numbered 0..M; ties are broken by (return time, client index).
///
/// Time model (Fraboni's code): client i that receives the model at time t returns at
/// t + τ_i. Under FedFix, FedBuff and synchronous FedAvg a client that finished waits idle
/// until the step that takes its update, and only then gets the new model (§C.6 point 3);
/// under asynchronous FedAvg it gets the new model at its own return time.
pub mod sim {
    use super::{async_fedavg_weight, fedfix_weight, invalid, AsyncError, AsyncFedAvgWeighting, SimScalar};

    /// One simulated client.
    #[derive(Debug, Clone, PartialEq)]
    pub struct SimClient<T> {
        /// τ_i in ticks (≥ 1).
        pub compute_ticks: u64,
        /// p_i.
        pub importance: T,
    }

    /// Which server rule to simulate.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Scheme {
        /// Synchronous FedAvg ("FL"): a step every max_i τ_i ticks with every client, d_i = p_i.
        Synchronous,
        /// FedFix-Δt: a step at every (n+1)·Δt with the clients returned by then,
        /// d_i = ⌈τ_i/Δt⌉ p_i.
        FedFix {
            /// Δt in ticks (≥ 1).
            period_ticks: u64,
        },
        /// Asynchronous FedAvg: a step at every single return.
        AsyncFedAvg {
            /// d_i rule.
            weighting: AsyncFedAvgWeighting,
        },
        /// FedBuff-c in Fraboni's simulation: a step when the c earliest returns are in, at the
        /// latest of their times, with identical weights d = 1/c.
        FedBuff {
            /// c, 1 ≤ c ≤ M.
            buffer_size: usize,
        },
    }

    /// One client's contribution to a step.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Participation<T> {
        /// Client index.
        pub client: usize,
        /// Index of the model it started from (θ^base).
        pub base: usize,
        /// Delay in server steps: step index − base.
        pub delay: usize,
        /// Δ_i = LocalWork(θ^base) − θ^base.
        pub delta: T,
        /// d_i.
        pub weight: T,
    }

    /// One server step n: θ^{n+1} = θ^n + η_g Σ d_i Δ_i.
    #[derive(Debug, Clone, PartialEq)]
    pub struct SimStep<T> {
        /// n, from 0.
        pub step: usize,
        /// Its time in ticks.
        pub time: u64,
        /// S_n, in (return time, client index) order (FedFix and synchronous: index order).
        pub participants: Vec<Participation<T>>,
        /// θ^{n+1}.
        pub model: T,
    }

    /// Runs `steps` server steps of `scheme` from `theta0`. `local_work(i, θ_start)` returns
    /// client i's delta Δ_i from the model it started from.
    ///
    /// # Errors
    /// [`AsyncError::InvalidConfig`] for no clients, a compute time or period of 0 ticks, or a
    /// FedBuff buffer outside 1..=M.
    pub fn simulate<T: SimScalar>(
        clients: &[SimClient<T>],
        scheme: Scheme,
        server_lr: T,
        theta0: T,
        steps: usize,
        mut local_work: impl FnMut(usize, &T) -> T,
    ) -> Result<Vec<SimStep<T>>, AsyncError> {
        let m = clients.len();
        if m == 0 {
            return Err(invalid("simulation needs at least one client"));
        }
        if clients.iter().any(|c| c.compute_ticks == 0) {
            return Err(invalid("compute times must be at least 1 tick"));
        }
        match scheme {
            Scheme::FedFix { period_ticks: 0 } => return Err(invalid("FedFix period must be >= 1 tick")),
            Scheme::FedBuff { buffer_size } if buffer_size == 0 || buffer_size > m => {
                return Err(invalid(format!("FedBuff buffer {buffer_size} must be in 1..={m}")))
            }
            _ => {}
        }
        let taus: Vec<u64> = clients.iter().map(|c| c.compute_ticks).collect();
        let max_tau = taus.iter().copied().max().unwrap_or(1);
        let mut history = vec![theta0];
        let mut sent = vec![0usize; m];
        let mut ret = taus.clone();
        let mut trace = Vec::with_capacity(steps);
        for n in 0..steps {
            // Who takes part, at what time, with which weight.
            let (time, chosen): (u64, Vec<(usize, T)>) = match scheme {
                Scheme::Synchronous => {
                    let t = (n as u64 + 1) * max_tau;
                    (t, (0..m).map(|i| (i, clients[i].importance.clone())).collect())
                }
                Scheme::FedFix { period_ticks } => {
                    let t = (n as u64 + 1) * period_ticks;
                    let s = (0..m)
                        .filter(|&i| ret[i] <= t)
                        .map(|i| (i, fedfix_weight(taus[i], period_ticks, clients[i].importance.clone())))
                        .collect();
                    (t, s)
                }
                Scheme::AsyncFedAvg { weighting } => {
                    let i = (0..m).min_by_key(|&i| (ret[i], i)).unwrap_or(0);
                    let d = match weighting {
                        AsyncFedAvgWeighting::Identical => T::from_i64(1),
                        AsyncFedAvgWeighting::Weighted => {
                            async_fedavg_weight(&taus, taus[i], clients[i].importance.clone())
                        }
                    };
                    (ret[i], vec![(i, d)])
                }
                Scheme::FedBuff { buffer_size } => {
                    let mut order: Vec<usize> = (0..m).collect();
                    order.sort_by_key(|&i| (ret[i], i));
                    order.truncate(buffer_size);
                    let t = order.iter().map(|&i| ret[i]).max().unwrap_or(0);
                    let c = i64::try_from(buffer_size).unwrap_or(i64::MAX);
                    (t, order.into_iter().map(|i| (i, T::from_i64(1) / T::from_i64(c))).collect())
                }
            };
            let mut theta = history[n].clone();
            let mut participants = Vec::with_capacity(chosen.len());
            for (i, weight) in chosen {
                let base = sent[i];
                let delta = local_work(i, &history[base]);
                theta = theta + server_lr.clone() * weight.clone() * delta.clone();
                participants.push(Participation { client: i, base, delay: n - base, delta, weight });
            }
            for p in &participants {
                sent[p.client] = n + 1;
                // Async FedAvg: the client's own return time; the others: the step time.
                ret[p.client] = time + taus[p.client];
            }
            history.push(theta.clone());
            trace.push(SimStep { step: n, time, participants, model: theta });
        }
        Ok(trace)
    }
}
