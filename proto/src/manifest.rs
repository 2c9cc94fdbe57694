//! The model manifest: every tensor's name, dtype, shape and aggregation policy, and the
//! canonical **slot layout** derived from it.
//!
//! Because shapes and dtypes are fixed, every update of a job has the same byte size, and a node
//! stages each one in a fixed-size slot with this layout: tensors in manifest order, each
//! starting at a 64-byte aligned offset, little-endian, C order. Kernels view slot bytes in
//! place, so no update is copied after staging.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a manifest is unusable: no tensors, an empty, over-long or duplicate name, or a model
/// larger than [`MAX_SLOT_BYTES`]. The message names the tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model manifest: {0}")]
pub struct ManifestError(pub String);

/// Alignment of every tensor inside a slot, in bytes (a cache line; enough for AVX-512 loads).
pub const SLOT_ALIGN: usize = 64;

/// Element types of tensors, named as in safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[allow(clippy::upper_case_acronyms)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16; decoded and accumulated in f64.
    F16,
    /// bfloat16; decoded and accumulated in f64.
    BF16,
    /// IEEE 754 binary64.
    F64,
    /// Signed 64-bit integer (e.g. BatchNorm `num_batches_tracked`).
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 64-bit integer.
    U64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 8-bit integer.
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    /// Whether the dtype is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How the updates' values of one tensor are combined.
///
/// **Parameters or statistics.** `mean` tensors are the model's trainable parameters: the
/// strategy's rule applies to them in full (server learning rate, server optimizer, FedBuff's
/// buffered step, RFFL's clipping, robust rules). Running statistics that a layer *estimates*
/// rather than learns (BatchNorm's `running_mean` and `running_var`) are not parameters: a
/// server optimizer or a stale-delta step moves them to values no client ever had, and a
/// variance can go negative (FedAdam from a zero start: 0.0742 → 0.0107 → −0.0491 in three
/// rounds). Declare them `statistic` or `variance`.
///
/// | policy | parameters updates | delta updates |
/// |---|---|---|
/// | `mean` | the strategy's rule (FedAvg: weighted mean) | `global + η · strategy step` |
/// | `statistic` | weighted mean of the values | `global + weighted mean of the deltas` = weighted mean of the values |
/// | `variance` | as `statistic`, clamped at ≥ 0 | as `statistic`, clamped at ≥ 0 |
/// | `max` | element-wise maximum | `global + maximum delta` |
/// | `first` | lowest `ClientId`'s value | `global + its delta` |
/// | `skip` | the global value | the global value |
///
/// For `statistic` and `variance` the weights are the strategy's fold weights (FedAvg:
/// `num_examples`; FedBuff: example × staleness weight; FedFix: `d_i`), normalised by their sum,
/// and no server learning rate, server optimizer, FedBuff normalisation or RFFL clipping
/// applies. A stale delta is a difference from the model its client trained from, so the
/// node that folds it also folds that base (`PartialAggregate::rebase_statistics` in
/// `shoal-functions`): the result is the weighted mean of the values the clients computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AggregationPolicy {
    /// Weighted mean (the strategy's rule). Integer tensors: the f64 weighted mean rounded half
    /// to even and saturated to the dtype's range (ints 10 and 21 with equal weights give 16),
    /// never per-term truncation. Exact while |value| x total weight < 2^53.
    #[default]
    Mean,
    /// Element-wise maximum over the updates (e.g. BatchNorm counters).
    Max,
    /// The value of the update from the lowest `ClientId` (deterministic whatever the arrival
    /// order, so partial aggregates stay mergeable).
    First,
    /// Not aggregated: the new global model keeps the previous global value.
    Skip,
    /// A running statistic (BatchNorm `running_mean`, an EMA of activations): the weighted mean
    /// of the clients' values, never through the server optimizer, the server learning rate or
    /// an asynchronous step's extrapolation (see the table above). Integer tensors are rounded
    /// half to even as for `mean`.
    Statistic,
    /// A running variance (BatchNorm `running_var`, Keras `moving_variance`): exactly
    /// `statistic`, then every element clamped at 0, so rounding in `base + mean delta` or a
    /// client sending a slightly negative value can never leave a negative variance. A separate
    /// policy rather than a name rule, so that no tensor's arithmetic depends on how it is
    /// named.
    Variance,
}

impl AggregationPolicy {
    /// Whether the tensor holds a running statistic (`statistic` or `variance`): the weighted
    /// mean of the clients' values, outside every server step.
    pub fn is_statistic(self) -> bool {
        matches!(self, AggregationPolicy::Statistic | AggregationPolicy::Variance)
    }
}

/// One tensor of the model manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Tensor name, as in the safetensors payload (e.g. `fc.weight`).
    pub name: String,
    /// Element type every update must use for this tensor.
    pub dtype: DType,
    /// Shape, C order. `[]` is a scalar.
    pub shape: Vec<usize>,
    /// Aggregation policy; defaults to [`AggregationPolicy::Mean`].
    #[serde(default)]
    pub policy: AggregationPolicy,
}

impl TensorSpec {
    /// A tensor with the default (`mean`) policy.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape, policy: AggregationPolicy::Mean }
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where one tensor lives inside a slot and inside a partial aggregate's flat accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSlot {
    /// Byte offset inside the slot (multiple of [`SLOT_ALIGN`]).
    pub byte_offset: usize,
    /// Length in bytes (numel x dtype size).
    pub byte_len: usize,
    /// Element offset inside a flat per-element accumulator.
    pub elem_offset: usize,
    /// Number of elements.
    pub numel: usize,
}

#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
struct ManifestRepr {
    tensors: Vec<TensorSpec>,
}

/// The model manifest: every tensor's name, dtype, shape and policy, plus the derived slot
/// layout. Built with [`ModelManifest::new`] (or deserialised, which validates the same way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(with = "ManifestRepr"))]
#[serde(try_from = "ManifestRepr", into = "ManifestRepr")]
pub struct ModelManifest {
    tensors: Vec<TensorSpec>,
    slots: Vec<TensorSlot>,
    index: HashMap<String, usize>,
    slot_bytes: usize,
    numel: usize,
}

impl TryFrom<ManifestRepr> for ModelManifest {
    type Error = ManifestError;
    fn try_from(r: ManifestRepr) -> Result<Self, ManifestError> {
        ModelManifest::new(r.tensors)
    }
}

impl From<ModelManifest> for ManifestRepr {
    fn from(m: ModelManifest) -> Self {
        ManifestRepr { tensors: m.tensors }
    }
}

/// Largest slot Shoal accepts: 16 GiB (a 4-billion-parameter f32 model).
pub const MAX_SLOT_BYTES: usize = 16 << 30;

impl ModelManifest {
    /// Validates the tensor list (non-empty, unique non-empty names, no zero dimension, total
    /// size within [`MAX_SLOT_BYTES`]) and computes the slot layout.
    ///
    /// # Errors
    /// [`ManifestError`] naming the problem.
    pub fn new(tensors: Vec<TensorSpec>) -> Result<ModelManifest, ManifestError> {
        if tensors.is_empty() {
            return Err(ManifestError("no tensors".into()));
        }
        let mut index = HashMap::with_capacity(tensors.len());
        let mut slots = Vec::with_capacity(tensors.len());
        let (mut byte_offset, mut elem_offset) = (0usize, 0usize);
        for (i, t) in tensors.iter().enumerate() {
            if t.name.is_empty() || t.name.len() > 1024 {
                return Err(ManifestError(format!("tensor {i} has an empty or over-long name")));
            }
            if t.name == "__metadata__" {
                return Err(ManifestError(
                    "tensor name \"__metadata__\" is reserved by the safetensors format (its header's metadata \
                     entry); rename the tensor"
                        .into(),
                ));
            }
            if index.insert(t.name.clone(), i).is_some() {
                return Err(ManifestError(format!("duplicate tensor name {:?}", t.name)));
            }
            if let Some(axis) = t.shape.iter().position(|&d| d == 0) {
                return Err(ManifestError(format!(
                    "tensor {:?} has shape {:?}: dimension {axis} is 0, so it holds no parameters \
                     (a scalar is shape [])",
                    t.name, t.shape
                )));
            }
            let numel = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| ManifestError(format!("shape of {:?} overflows", t.name)))?;
            let byte_len =
                numel.checked_mul(t.dtype.size()).filter(|&b| b <= MAX_SLOT_BYTES).ok_or_else(|| {
                    ManifestError(format!(
                    "tensor {:?} ({numel} elements of {} bytes) is larger than the limit of {MAX_SLOT_BYTES} \
                     bytes (16 GiB) per update",
                    t.name,
                    t.dtype.size()
                ))
                })?;
            slots.push(TensorSlot { byte_offset, byte_len, elem_offset, numel });
            byte_offset = (byte_offset + byte_len).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
            elem_offset += numel;
            if byte_offset > MAX_SLOT_BYTES {
                return Err(ManifestError(format!(
                    "the model needs more than the limit of {MAX_SLOT_BYTES} bytes (16 GiB) per update"
                )));
            }
        }
        Ok(ModelManifest {
            tensors,
            slots,
            index,
            slot_bytes: byte_offset.max(SLOT_ALIGN),
            numel: elem_offset,
        })
    }

    /// The tensors, in manifest order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Warnings for tensors named like running statistics (PyTorch BatchNorm's
    /// `running_mean`/`running_var`/`num_batches_tracked`, Keras' `moving_mean`/
    /// `moving_variance`) whose policy lets a server optimizer, a server learning rate or
    /// staleness extrapolation move them (`mean`): a variance can then go negative (Flower #1060,
    /// APPFL #131). Each names the tensor and the policy to declare; empty when none applies.
    pub fn statistic_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.tensors {
            let leaf = t.name.rsplit(['.', '/']).next().unwrap_or(&t.name);
            let wanted = match leaf {
                "running_var" | "moving_variance" => AggregationPolicy::Variance,
                "running_mean" | "moving_mean" => AggregationPolicy::Statistic,
                "num_batches_tracked" => AggregationPolicy::Max,
                _ => continue,
            };
            if t.policy == AggregationPolicy::Mean {
                let name = |p: AggregationPolicy| match p {
                    AggregationPolicy::Variance => "variance",
                    AggregationPolicy::Statistic => "statistic",
                    _ => "max",
                };
                out.push(format!(
                    "tensor {:?} looks like a running statistic but has policy \"mean\": a server optimizer, \
                     server learning rate or stale update moves it like a parameter (a variance can go \
                     negative); declare \"policy\": {:?}",
                    t.name,
                    name(wanted)
                ));
            }
        }
        out
    }

    /// The slot layout, parallel to [`Self::tensors`].
    pub fn slots(&self) -> &[TensorSlot] {
        &self.slots
    }

    /// Bytes one staged update occupies (a multiple of [`SLOT_ALIGN`]).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Total number of elements over all tensors.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Sum of the tensors' byte lengths (the payload size without padding or header).
    pub fn data_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.byte_len).sum()
    }

    /// Index of the tensor called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Most bytes a safetensors header for this manifest may take, in bytes: 64 KiB (8-byte
    /// length prefix, padding and a `__metadata__` block such as PyTorch's `{"format":"pt"}`)
    /// plus, per tensor, 256 bytes (dtype, shape and offsets) and six bytes per name byte (a
    /// name written with `\uXXXX` escapes). [`Self::data_bytes`] plus this is the default
    /// largest update of a job ([`JobSpec::max_update_bytes`](crate::spec::JobSpec::max_update_bytes)).
    pub fn header_allowance(&self) -> usize {
        64 * 1024 + self.tensors.iter().map(|t| 256 + 6 * t.name.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policies' wire names (snake_case), the two running-statistic policies included, and
    /// `mean` as the default of a tensor that names none.
    #[test]
    fn policy_names_on_the_wire() {
        for (p, name) in [
            (AggregationPolicy::Mean, "mean"),
            (AggregationPolicy::Max, "max"),
            (AggregationPolicy::First, "first"),
            (AggregationPolicy::Skip, "skip"),
            (AggregationPolicy::Statistic, "statistic"),
            (AggregationPolicy::Variance, "variance"),
        ] {
            assert_eq!(serde_json::to_string(&p).ok(), Some(format!("\"{name}\"")));
            assert_eq!(serde_json::from_str::<AggregationPolicy>(&format!("\"{name}\"")).ok(), Some(p));
        }
        let t: Result<TensorSpec, _> = serde_json::from_str(
            r#"{"name": "bn.running_var", "dtype": "F32", "shape": [8], "policy": "variance"}"#,
        );
        assert_eq!(t.map(|t| t.policy).ok(), Some(AggregationPolicy::Variance));
        let t: Result<TensorSpec, _> = serde_json::from_str(r#"{"name": "w", "dtype": "F32", "shape": [8]}"#);
        assert_eq!(t.map(|t| t.policy).ok(), Some(AggregationPolicy::Mean));
        assert!(AggregationPolicy::Variance.is_statistic() && !AggregationPolicy::Mean.is_statistic());
    }

    #[test]
    fn running_statistics_with_the_mean_policy_are_warned_about() {
        let t = |name: &str, policy| {
            let mut t = TensorSpec::new(name, DType::F32, vec![4]);
            t.policy = policy;
            t
        };
        let m = ModelManifest::new(vec![
            t("fc.weight", AggregationPolicy::Mean),
            t("bn1.running_var", AggregationPolicy::Mean),
            t("bn1.running_mean", AggregationPolicy::Statistic),
            t("bn2/moving_variance", AggregationPolicy::Mean),
        ])
        .unwrap();
        let w = m.statistic_warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("bn1.running_var") && w[0].contains("\"variance\""), "{}", w[0]);
        assert!(w[1].contains("bn2/moving_variance"), "{}", w[1]);
    }

    /// A zero dimension (`[10, 0]`: no parameters) is refused, naming the tensor and the axis;
    /// a scalar (`[]`) is one element.
    #[test]
    fn zero_dimensions_are_refused() {
        let e = ModelManifest::new(vec![
            TensorSpec::new("fc.weight", DType::F32, vec![10, 0]),
            TensorSpec::new("fc.bias", DType::F32, vec![10]),
        ])
        .unwrap_err();
        assert!(e.0.contains("\"fc.weight\"") && e.0.contains("dimension 1 is 0"), "{e}");
        let json = r#"{"tensors": [{"name": "w", "dtype": "F32", "shape": [0]}]}"#;
        assert!(serde_json::from_str::<ModelManifest>(json).is_err(), "deserialising validates too");
        let m = ModelManifest::new(vec![TensorSpec::new("s", DType::F32, vec![])]).unwrap();
        assert_eq!(m.numel(), 1);
        // safetensors' reserved header key cannot be a tensor (a job with it never started).
        let e = ModelManifest::new(vec![TensorSpec::new("__metadata__", DType::F32, vec![2])]).unwrap_err();
        assert!(e.0.contains("reserved"), "{e}");
    }
}
