//! Server optimisers applied after any aggregation: FedAvgM, FedAdam, FedYogi, FedAdagrad.
//!
//! Papers: Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive Federated
//! Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2; Hsu, Qi & Brown, "Measuring the
//! Effects of Non-Identical Data Distribution for Federated Visual Classification",
//! arXiv:1909.06335 (FedAvgM). Semantics and defaults follow Flower's
//! `flwr/server/strategy/{fedavgm,fedadam,fedyogi,fedadagrad}.py` (`reference/flower.md` §5
//! point 5).
//!
//! The aggregation strategy produces `aggregated` from the round's updates (a weighted mean, a
//! FedBuff step, a robust aggregate...). The optimiser treats the **pseudo-gradient**
//! Δ_t = aggregated − global as a (negated) gradient and takes its own step from `global`. Per
//! element, in f64, with t = 1, 2, ... the number of steps taken including this one:
//!
//! | optimiser | m_t | v_t | new x |
//! |---|---|---|---|
//! | FedAvgM | β m_{t−1} + Δ_t | — | x + η m_t |
//! | FedAdam | β₁ m_{t−1} + (1−β₁) Δ_t | β₂ v_{t−1} + (1−β₂) Δ_t² | x + η_t m_t / (√v_t + τ) |
//! | FedYogi | β₁ m_{t−1} + (1−β₁) Δ_t | v_{t−1} − (1−β₂) Δ_t² sign(v_{t−1} − Δ_t²) | x + η m_t / (√v_t + τ) |
//! | FedAdagrad | β₁ m_{t−1} + (1−β₁) Δ_t | v_{t−1} + Δ_t² | x + η m_t / (√v_t + τ) |
//!
//! m_0 = v_0 = 0 (as Flower; the paper allows v_0 ≥ τ²). FedAvgM is Flower's (PyTorch SGD)
//! convention: momentum buffer = β·buffer + pseudo-gradient, no dampening, no Nesterov; with
//! β = 0 and η = 1 it returns `aggregated` (plain FedAvg). sign(0) = 0, as NumPy's: Yogi's
//! v_t stays ≥ 0 (if v > Δ², v − (1−β₂)Δ² > v − Δ² > 0), the property `bug-cases.md` row 5
//! (Flower PR #885, NaN from a wrong v_t update) is tested against.
//!
//! **Bias correction.** Only FedAdam applies one, as Flower does: η_t = η·√(1−β₂^(t+1)) /
//! (1−β₁^(t+1)) ([`BiasCorrection::Flower`], the default). Flower's exponent is its 1-based
//! `server_round` plus one, i.e. one more than Kingma & Ba's α_t (exponent t), which is
//! [`BiasCorrection::KingmaBa`]; Reddi et al.'s Algorithm 2 has none ([`BiasCorrection::Off`]).
//! Flower counts rounds, so a round that produced no model still advances its exponent; here t
//! counts successful steps. FedYogi and FedAdagrad have no bias correction (Flower and the paper).
//!
//! **What is optimised.** Only floating-point tensors with the `mean` policy. Integer tensors
//! and `max`/`first`/`skip` tensors (BatchNorm counters, frozen layers) take the aggregated value
//! as is (`bug-cases.md` rows 7-8); their m/v entries stay 0.
//!
//! **State.** m_t (and v_t for the adaptive ones) are f64 per element of the manifest, allocated
//! once at the first step (8 or 16 bytes per parameter) and checked against the manifest of
//! every later step. A step that fails leaves the state untouched: the output is computed and
//! checked finite first, the moments are committed after. [`ServerOptimizer::save_state`] and
//! [`Strategy::save_state`] of [`WithServerOptimizer`] (inner strategy and optimiser together)
//! persist it bit-exactly for a top that takes over ([`crate::state`]).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::{mismatch, Bin, F64s};
use crate::strategy::{Mergeability, PartialAggregate, Strategy, UpdateView};
use crate::tensor::{AggregationPolicy, ModelManifest, Parameters, TensorData};

/// Configuration errors of a [`ServerOptimizer`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServerOptError {
    /// A hyperparameter is out of range; the message names it.
    #[error("invalid server optimiser configuration: {0}")]
    InvalidConfig(String),
    /// [`ServerOptimizer::restore`] got moments whose length does not match the manifest or the
    /// optimiser.
    #[error("optimiser state does not match: {0}")]
    StateMismatch(String),
}

/// The `Copy` classification of [`ServerOptError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerOptErrorKind {
    /// See [`ServerOptError::InvalidConfig`].
    InvalidConfig,
    /// See [`ServerOptError::StateMismatch`].
    StateMismatch,
}

impl ServerOptError {
    /// The error's kind.
    pub fn kind(&self) -> ServerOptErrorKind {
        match self {
            ServerOptError::InvalidConfig(_) => ServerOptErrorKind::InvalidConfig,
            ServerOptError::StateMismatch(_) => ServerOptErrorKind::StateMismatch,
        }
    }
}

impl ServerOptErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerOptErrorKind::InvalidConfig => "invalid_config",
            ServerOptErrorKind::StateMismatch => "state_mismatch",
        }
    }
}

pub use shoal_proto::spec::{BiasCorrection, ServerOptimizerSpec};

impl From<shoal_proto::SpecError> for ServerOptError {
    fn from(e: shoal_proto::SpecError) -> Self {
        ServerOptError::InvalidConfig(e.0)
    }
}

/// The per-element rule of step `t` (1-based).
fn rule(cfg: &ServerOptimizerSpec, t: u64) -> Rule {
    match *cfg {
        ServerOptimizerSpec::FedAvgM { lr, momentum } => Rule::Momentum(Momentum { lr, beta: momentum }),
        ServerOptimizerSpec::FedAdam { lr, beta1, beta2, tau, bias_correction } => {
            let e = match bias_correction {
                BiasCorrection::Flower => Some(t as f64 + 1.0),
                BiasCorrection::KingmaBa => Some(t as f64),
                BiasCorrection::Off => None,
            };
            let lr = e.map_or(lr, |e| lr * (1.0 - beta2.powf(e)).sqrt() / (1.0 - beta1.powf(e)));
            Rule::Adam(Adaptive { lr, beta1, tau, second: Adam { beta2 } })
        }
        ServerOptimizerSpec::FedYogi { lr, beta1, beta2, tau } => {
            Rule::Yogi(Adaptive { lr, beta1, tau, second: Yogi { beta2 } })
        }
        ServerOptimizerSpec::FedAdagrad { lr, beta1, tau } => {
            Rule::Adagrad(Adaptive { lr, beta1, tau, second: Adagrad })
        }
    }
}

/// One optimiser's per-element arithmetic. Implemented by small `Copy` structs so that the
/// kernels below are monomorphised per optimiser (no per-element dispatch).
trait ElemRule: Copy {
    /// Whether the rule keeps v_t.
    const HAS_V: bool;
    /// (m_t, v_t) from (m_{t−1}, v_{t−1}) and Δ_t (v is 0 and ignored without `HAS_V`).
    fn moments(self, d: f64, m: f64, v: f64) -> (f64, f64);
    /// The new parameter from x and the new moments.
    fn apply(self, x: f64, m: f64, v: f64) -> f64;
}

#[derive(Clone, Copy)]
struct Momentum {
    lr: f64,
    beta: f64,
}

impl ElemRule for Momentum {
    const HAS_V: bool = false;
    #[inline(always)]
    fn moments(self, d: f64, m: f64, _: f64) -> (f64, f64) {
        (self.beta * m + d, 0.0)
    }
    #[inline(always)]
    fn apply(self, x: f64, m: f64, _: f64) -> f64 {
        x + self.lr * m
    }
}

/// The second-moment update of an adaptive rule.
trait SecondMoment: Copy {
    fn update(self, v: f64, d2: f64) -> f64;
}

#[derive(Clone, Copy)]
struct Adam {
    beta2: f64,
}

impl SecondMoment for Adam {
    #[inline(always)]
    fn update(self, v: f64, d2: f64) -> f64 {
        self.beta2 * v + (1.0 - self.beta2) * d2
    }
}

#[derive(Clone, Copy)]
struct Yogi {
    beta2: f64,
}

impl SecondMoment for Yogi {
    #[inline(always)]
    fn update(self, v: f64, d2: f64) -> f64 {
        v - (1.0 - self.beta2) * d2 * sign(v - d2)
    }
}

#[derive(Clone, Copy)]
struct Adagrad;

impl SecondMoment for Adagrad {
    #[inline(always)]
    fn update(self, v: f64, d2: f64) -> f64 {
        v + d2
    }
}

#[derive(Clone, Copy)]
struct Adaptive<S> {
    lr: f64,
    beta1: f64,
    tau: f64,
    second: S,
}

impl<S: SecondMoment> ElemRule for Adaptive<S> {
    const HAS_V: bool = true;
    #[inline(always)]
    fn moments(self, d: f64, m: f64, v: f64) -> (f64, f64) {
        (self.beta1 * m + (1.0 - self.beta1) * d, self.second.update(v, d * d))
    }
    #[inline(always)]
    fn apply(self, x: f64, m: f64, v: f64) -> f64 {
        x + self.lr * m / (v.sqrt() + self.tau)
    }
}

/// The rule of one step, dispatched once per tensor.
#[derive(Clone, Copy)]
enum Rule {
    Momentum(Momentum),
    Adam(Adaptive<Adam>),
    Yogi(Adaptive<Yogi>),
    Adagrad(Adaptive<Adagrad>),
}

/// NumPy's sign: −1, 0 or 1 (`f64::signum` gives 1 for +0).
#[inline(always)]
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// f32 and f64, the dtypes with in-place fast paths.
pub(crate) trait FloatElem: Copy + bytemuck::Pod {
    fn to_f64(self) -> f64;
    /// Round to nearest (as `Parameters::from_f64` does).
    fn from_f64(x: f64) -> Self;
}

impl FloatElem for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
}

impl FloatElem for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
}

/// Tensor `i` of `p` as a mutable `T` slice (`None` if its bytes do not cast, which the 8-byte
/// aligned `Parameters` buffers never cause).
pub(crate) fn floats_mut<T: FloatElem>(p: &mut Parameters, i: usize) -> Option<&mut [T]> {
    let s = p.manifest().slots()[i];
    bytemuck::try_cast_slice_mut(&mut p.as_bytes_mut()[s.byte_offset..s.byte_offset + s.byte_len]).ok()
}

/// Pass 1 kernel on slices: out = apply(g, moments(a − g, m, v)); the state is only read.
#[inline(always)]
fn output_slices<R: ElemRule, T: FloatElem>(r: R, g: &[T], a: &[T], m: &[f64], v: &[f64], out: &mut [T]) {
    if R::HAS_V {
        for ((((o, g), a), &m), &v) in out.iter_mut().zip(g).zip(a).zip(m).zip(v) {
            let x = g.to_f64();
            let (m, v) = r.moments(a.to_f64() - x, m, v);
            *o = T::from_f64(r.apply(x, m, v));
        }
    } else {
        for (((o, g), a), &m) in out.iter_mut().zip(g).zip(a).zip(m) {
            let x = g.to_f64();
            let (m, _) = r.moments(a.to_f64() - x, m, 0.0);
            *o = T::from_f64(r.apply(x, m, 0.0));
        }
    }
}

/// Pass 1 for tensor `i`: writes the new values into `out` (f32/f64 in place; other float
/// dtypes through `write_tensor_f64`, which rounds f16/bf16 correctly).
fn output_tensor<R: ElemRule>(
    r: R,
    g: TensorData<'_>,
    a: TensorData<'_>,
    m: &[f64],
    v: &[f64],
    out: &mut Parameters,
    i: usize,
) {
    match (g, a) {
        (TensorData::F32(g), TensorData::F32(a)) => {
            if let Some(o) = floats_mut::<f32>(out, i) {
                return output_slices(r, g, a, m, v, o);
            }
        }
        (TensorData::F64(g), TensorData::F64(a)) => {
            if let Some(o) = floats_mut::<f64>(out, i) {
                return output_slices(r, g, a, m, v, o);
            }
        }
        _ => {}
    }
    out.write_tensor_f64(
        i,
        (0..m.len()).map(|e| {
            let x = g.get_f64(e);
            let (mt, vt) = r.moments(a.get_f64(e) - x, m[e], if R::HAS_V { v[e] } else { 0.0 });
            r.apply(x, mt, vt)
        }),
    );
}

/// Pass 2 kernel on slices: (m, v) = moments(a − g, m, v).
#[inline(always)]
fn commit_slices<R: ElemRule, T: FloatElem>(r: R, g: &[T], a: &[T], m: &mut [f64], v: &mut [f64]) {
    if R::HAS_V {
        for (((m, v), g), a) in m.iter_mut().zip(v.iter_mut()).zip(g).zip(a) {
            (*m, *v) = r.moments(a.to_f64() - g.to_f64(), *m, *v);
        }
    } else {
        for ((m, g), a) in m.iter_mut().zip(g).zip(a) {
            *m = r.moments(a.to_f64() - g.to_f64(), *m, 0.0).0;
        }
    }
}

/// Pass 2 for one tensor.
fn commit_tensor<R: ElemRule>(r: R, g: TensorData<'_>, a: TensorData<'_>, m: &mut [f64], v: &mut [f64]) {
    match (g, a) {
        (TensorData::F32(g), TensorData::F32(a)) => commit_slices(r, g, a, m, v),
        (TensorData::F64(g), TensorData::F64(a)) => commit_slices(r, g, a, m, v),
        (g, a) => {
            for e in 0..m.len() {
                let d = a.get_f64(e) - g.get_f64(e);
                if R::HAS_V {
                    (m[e], v[e]) = r.moments(d, m[e], v[e]);
                } else {
                    m[e] = r.moments(d, m[e], 0.0).0;
                }
            }
        }
    }
}

/// Runs `$body` with `$r` bound to the concrete rule (one monomorphised copy per optimiser).
macro_rules! with_rule {
    ($rule:expr, $r:ident => $body:expr) => {
        match $rule {
            Rule::Momentum($r) => $body,
            Rule::Adam($r) => $body,
            Rule::Yogi($r) => $body,
            Rule::Adagrad($r) => $body,
        }
    };
}

/// A server optimiser and its state (m_t, v_t, t). See the module docs for the rules.
#[derive(Clone, PartialEq)]
pub struct ServerOptimizer {
    config: ServerOptimizerSpec,
    steps: u64,
    manifest: Option<Arc<ModelManifest>>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl fmt::Debug for ServerOptimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptimizer")
            .field("config", &self.config)
            .field("steps", &self.steps)
            .field("state_elements", &self.m.len())
            .finish()
    }
}

impl ServerOptimizer {
    /// A fresh optimiser (t = 0, no state allocated yet).
    ///
    /// # Errors
    /// [`ServerOptError::InvalidConfig`] as [`ServerOptimizerSpec::validate`].
    pub fn new(config: ServerOptimizerSpec) -> Result<ServerOptimizer, ServerOptError> {
        config.validate()?;
        Ok(ServerOptimizer { config, steps: 0, manifest: None, m: Vec::new(), v: Vec::new() })
    }

    /// The configuration.
    pub fn config(&self) -> &ServerOptimizerSpec {
        &self.config
    }

    /// Steps taken so far (t of the last step).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// m_t per element of the manifest (slot element order), once a step has been taken.
    pub fn first_moment(&self) -> Option<&[f64]> {
        self.manifest.as_ref().map(|_| self.m.as_slice())
    }

    /// v_t per element, once a step has been taken (`None` for FedAvgM).
    pub fn second_moment(&self) -> Option<&[f64]> {
        self.manifest.as_ref().filter(|_| self.config.has_second_moment()).map(|_| self.v.as_slice())
    }

    /// Forgets the state (t = 0, moments dropped).
    pub fn reset(&mut self) {
        self.steps = 0;
        self.manifest = None;
        self.m = Vec::new();
        self.v = Vec::new();
    }

    /// Restores a checkpointed state: `steps` taken, m_t and (adaptive optimisers) v_t, each
    /// [`ModelManifest::numel`] long in slot element order (as [`Self::first_moment`] returns).
    ///
    /// # Errors
    /// [`ServerOptError::StateMismatch`] for wrong lengths, a v_t given to FedAvgM or missing
    /// for the others, or non-finite values (negative v_t too); nothing changes.
    pub fn restore(
        &mut self,
        manifest: Arc<ModelManifest>,
        steps: u64,
        m: Vec<f64>,
        v: Option<Vec<f64>>,
    ) -> Result<(), ServerOptError> {
        let n = manifest.numel();
        let mismatch = |s: String| Err(ServerOptError::StateMismatch(s));
        if m.len() != n {
            return mismatch(format!("m has {} elements, the manifest {n}", m.len()));
        }
        let v = match (self.config.has_second_moment(), v) {
            (true, Some(v)) if v.len() == n => v,
            (true, Some(v)) => return mismatch(format!("v has {} elements, the manifest {n}", v.len())),
            (true, None) => return mismatch(format!("{} needs v", self.config.name())),
            (false, Some(_)) => return mismatch("fedavgm has no v".into()),
            (false, None) => Vec::new(),
        };
        if m.iter().any(|x| !x.is_finite()) || v.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            return mismatch("non-finite m or negative/non-finite v".into());
        }
        *self = ServerOptimizer { config: self.config, steps, manifest: Some(manifest), m, v };
        Ok(())
    }

    /// One server step: Δ = `aggregated` − `global`, update the moments, return the new global
    /// model (same manifest and dtypes; f64 arithmetic, rounded to each tensor's dtype).
    /// Tensors that are not floating-point `mean` tensors are returned as in `aggregated`.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] if `global` and `aggregated` (or the state from earlier steps)
    /// have different manifests; [`Error::NonFiniteResult`] if the step overflows a tensor's
    /// dtype or an input holds NaN/Inf. On error the state (moments and t) is unchanged.
    pub fn step(&mut self, global: &Parameters, aggregated: &Parameters) -> Result<Parameters> {
        let manifest = Arc::clone(global.manifest());
        if !(Arc::ptr_eq(&manifest, aggregated.manifest()) || *manifest == **aggregated.manifest()) {
            return Err(Error::ManifestMismatch("global and aggregated parameters differ in manifest"));
        }
        if let Some(own) = &self.manifest {
            if !(Arc::ptr_eq(own, &manifest) || **own == *manifest) {
                return Err(Error::ManifestMismatch("optimiser state belongs to another manifest"));
            }
        }
        // Allocated once, on the first step.
        let fresh = self.manifest.is_none();
        if fresh {
            self.m = vec![0.0; manifest.numel()];
            self.v = if self.config.has_second_moment() { vec![0.0; manifest.numel()] } else { Vec::new() };
        }
        let rule = rule(&self.config, self.steps + 1);
        let has_v = !self.v.is_empty();
        let optimised = |i: usize| {
            let spec = &manifest.tensors()[i];
            spec.policy == AggregationPolicy::Mean && spec.dtype.is_float()
        };

        // Pass 1: the new model, from the would-be moments; nothing committed.
        let mut out = aggregated.clone();
        for (i, s) in manifest.slots().iter().enumerate() {
            if !optimised(i) {
                continue;
            }
            let r = s.elem_offset..s.elem_offset + s.numel;
            let m = &self.m[r.clone()];
            let v = if has_v { &self.v[r] } else { &[][..] };
            let (g, a) = (global.tensor(i), aggregated.tensor(i));
            with_rule!(rule, rule => output_tensor(rule, g, a, m, v, &mut out, i));
        }
        if let Err(crate::tensor::ValidationError::NonFinite { name, .. }) =
            crate::tensor::check_finite(&manifest, out.as_bytes())
        {
            if fresh {
                self.m = Vec::new();
                self.v = Vec::new();
            }
            return Err(Error::NonFiniteResult(name));
        }

        // Pass 2: commit the moments (recomputed: the same arithmetic, so the same values).
        for (i, s) in manifest.slots().iter().enumerate() {
            if !optimised(i) {
                continue;
            }
            let r = s.elem_offset..s.elem_offset + s.numel;
            let m = &mut self.m[r.clone()];
            let v = if has_v { &mut self.v[r] } else { &mut [][..] };
            let (g, a) = (global.tensor(i), aggregated.tensor(i));
            with_rule!(rule, rule => commit_tensor(rule, g, a, m, v));
        }
        self.manifest = Some(manifest);
        self.steps += 1;
        Ok(out)
    }
}

/// The persisted form of a [`ServerOptimizer`] ([`crate::state`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OptimizerState {
    config: ServerOptimizerSpec,
    steps: u64,
    manifest: Option<ModelManifest>,
    m: F64s,
    v: F64s,
}

impl ServerOptimizer {
    fn to_state(&self) -> OptimizerState {
        OptimizerState {
            config: self.config,
            steps: self.steps,
            manifest: self.manifest.as_deref().cloned(),
            m: F64s(self.m.clone()),
            v: F64s(self.v.clone()),
        }
    }

    /// This optimiser with the state `s` (checked), or why `s` does not fit; `self` is unchanged.
    fn with_state(&self, s: OptimizerState) -> Result<ServerOptimizer> {
        if s.config != self.config {
            return Err(mismatch(format!("saved by {:?}, this optimiser is {:?}", s.config, self.config)));
        }
        let mut out = self.clone();
        match s.manifest {
            None if s.steps == 0 && s.m.0.is_empty() && s.v.0.is_empty() => out.reset(),
            None => return Err(mismatch("moments or steps without a manifest")),
            Some(m) => {
                let v = self.config.has_second_moment().then_some(s.v.0);
                out.restore(Arc::new(m), s.steps, s.m.0, v).map_err(|e| mismatch(e.to_string()))?;
            }
        }
        Ok(out)
    }

    /// The optimiser's state (t, m_t, v_t and their manifest) in the [`crate::state`] envelope,
    /// under the optimiser's name (`fedadam`, ...).
    ///
    /// # Errors
    /// [`Error::InvalidState`] if it cannot be encoded (never for this plain data).
    pub fn save_state(&self) -> Result<Vec<u8>> {
        crate::state::save(self.config.name(), &self.to_state())
    }

    /// Restores a state [`Self::save_state`] produced by an optimiser of the same configuration.
    ///
    /// # Errors
    /// [`Error::InvalidState`]: corrupt, another version, another optimiser, another
    /// configuration, moments that do not fit their manifest or are not finite (v < 0). The
    /// optimiser is unchanged on error.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let s = crate::state::load(self.config.name(), bytes)?;
        *self = self.with_state(s)?;
        Ok(())
    }
}

/// The persisted form of a [`WithServerOptimizer`]: the inner strategy's own envelope, and the
/// optimiser's state.
#[derive(Serialize, Deserialize)]
struct WithOptimizerState {
    inner: Bin,
    optimizer: OptimizerState,
}

/// Any strategy followed by a server optimiser: `finish` and `aggregate_cohort` run the inner
/// strategy, then [`ServerOptimizer::step`]`(global, inner result)`. Folding and merging are the
/// inner strategy's (so it stays streaming or whole-cohort as it was).
///
/// With Flower's composition (FedAdam = FedAvg + Adam) the inner strategy should produce the
/// plain aggregate: FedAvg over parameters, or over deltas with `server_learning_rate` 1 (an
/// inner η_s scales the pseudo-gradient). If the inner strategy fails (e.g. zero total
/// weight), the optimiser does not step.
#[derive(Debug)]
pub struct WithServerOptimizer<S> {
    /// The aggregation strategy.
    pub inner: S,
    /// The optimiser applied to its result.
    pub optimizer: ServerOptimizer,
}

impl<S: Strategy> WithServerOptimizer<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, optimizer: ServerOptimizer) -> WithServerOptimizer<S> {
        WithServerOptimizer { inner, optimizer }
    }
}

impl<S: Strategy> Strategy for WithServerOptimizer<S> {
    /// The optimiser's name (`fedadam`, ...); the inner strategy's is `self.inner.name()`.
    fn name(&self) -> &'static str {
        self.optimizer.config().name()
    }

    fn update_weight(&self, client: &crate::ClientId, num_examples: u64, staleness: u64) -> Result<f64> {
        self.inner.update_weight(client, num_examples, staleness)
    }

    fn client_reward(&self, client: &crate::ClientId) -> Option<Result<Parameters>> {
        self.inner.client_reward(client)
    }

    fn mergeability(&self) -> Mergeability {
        self.inner.mergeability()
    }

    fn fold(&self, partial: &mut PartialAggregate, update: &UpdateView<'_>) -> Result<()> {
        self.inner.fold(partial, update)
    }

    fn fold_batch(&self, partial: &mut PartialAggregate, updates: &[UpdateView<'_>]) -> Result<()> {
        self.inner.fold_batch(partial, updates)
    }

    fn merge(&self, into: &mut PartialAggregate, other: &PartialAggregate) -> Result<()> {
        self.inner.merge(into, other)
    }

    fn finish(&mut self, partial: &PartialAggregate, global: &Parameters) -> Result<Parameters> {
        let aggregated = self.inner.finish(partial, global)?;
        self.optimizer.step(global, &aggregated)
    }

    fn aggregate_cohort(&mut self, cohort: &[UpdateView<'_>], global: &Parameters) -> Result<Parameters> {
        let aggregated = self.inner.aggregate_cohort(cohort, global)?;
        self.optimizer.step(global, &aggregated)
    }

    /// The inner strategy's state (its own envelope) and the optimiser's moments.
    fn save_state(&self) -> Result<Vec<u8>> {
        let state =
            WithOptimizerState { inner: Bin(self.inner.save_state()?), optimizer: self.optimizer.to_state() };
        crate::state::save(self.name(), &state)
    }

    /// Restores both, or neither: the optimiser's state is checked first, then the inner
    /// strategy restores its own (atomically), then the optimiser's is applied.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let state: WithOptimizerState = crate::state::load(self.name(), bytes)?;
        let optimizer = self.optimizer.with_state(state.optimizer)?;
        self.inner.restore_state(&state.inner.0)?;
        self.optimizer = optimizer;
        Ok(())
    }
}
