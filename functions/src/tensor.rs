//! Tensors: dtypes, the model manifest, the canonical slot layout, [`Parameters`], and ingest
//! validation of safetensors payloads.
//!
//! A job's **manifest** lists every tensor of the model: name, dtype, shape and aggregation
//! policy. Because shapes and dtypes are fixed, every update of a job has the same byte size, and
//! the runtime stages each one in a fixed-size **slot** with the canonical layout computed here:
//! tensors in manifest order, each starting at a 64-byte aligned offset, little-endian, C order.
//! Kernels view slot bytes in place (`bytemuck`), so no update is ever copied after staging.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};

pub use shoal_proto::manifest::{
    AggregationPolicy, DType, ManifestError, ModelManifest, TensorSlot, TensorSpec, MAX_SLOT_BYTES,
    SLOT_ALIGN,
};

/// The safetensors dtype of a Shoal dtype.
pub fn dtype_to_safetensors(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::F64 => S::F64,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I16 => S::I16,
        DType::I8 => S::I8,
        DType::U64 => S::U64,
        DType::U32 => S::U32,
        DType::U16 => S::U16,
        DType::U8 => S::U8,
    }
}

/// The Shoal dtype of a safetensors dtype, if Shoal aggregates it (BOOL and FP8 are not).
pub fn dtype_from_safetensors(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U64 => DType::U64,
        S::U32 => DType::U32,
        S::U16 => DType::U16,
        S::U8 => DType::U8,
        _ => return None,
    })
}

/// Inclusive value range of an integer dtype, as f64 (None for floats).
fn int_range(d: DType) -> Option<(f64, f64)> {
    Some(match d {
        DType::I64 => (i64::MIN as f64, i64::MAX as f64),
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::I16 => (i16::MIN as f64, i16::MAX as f64),
        DType::I8 => (i8::MIN as f64, i8::MAX as f64),
        DType::U64 => (0.0, u64::MAX as f64),
        DType::U32 => (0.0, u32::MAX as f64),
        DType::U16 => (0.0, u16::MAX as f64),
        DType::U8 => (0.0, u8::MAX as f64),
        _ => return None,
    })
}

/// Why an update's payload does not match the job's manifest. Each variant is a typed rejection
/// reason at ingest; none can crash the process.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// The bytes are not a valid safetensors file (truncated, bad header, bad offsets).
    #[error("malformed safetensors payload: {0}")]
    Malformed(String),
    /// A tensor of the manifest is absent.
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    /// A tensor not in the manifest is present.
    #[error("tensor {0:?} is not in the model manifest")]
    ExtraTensor(String),
    /// A tensor has another dtype than the manifest declares.
    #[error("tensor {name:?} has dtype {got}, the manifest declares {expected}")]
    DTypeMismatch {
        /// Tensor name.
        name: String,
        /// Declared dtype.
        expected: DType,
        /// Received dtype (safetensors name).
        got: String,
    },
    /// A tensor has another shape than the manifest declares.
    #[error("tensor {name:?} has shape {got:?}, the manifest declares {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Declared shape.
        expected: Vec<usize>,
        /// Received shape.
        got: Vec<usize>,
    },
    /// A floating-point tensor holds NaN or ±Inf.
    #[error("tensor {name:?} holds a non-finite value at element {index}")]
    NonFinite {
        /// Tensor name.
        name: String,
        /// Index of the first non-finite element.
        index: usize,
    },
    /// The safetensors header declares more tensors than the manifest has (`max tensors` of a
    /// job is its manifest's tensor count). Counted by a scan of the header bytes before any of
    /// it is parsed, so a header declaring millions of tensors costs one pass, no allocation.
    #[error("the payload declares {declared} or more tensors; the manifest has {max}")]
    TooManyTensors {
        /// Tensors counted before the scan stopped (at least `max + 1`).
        declared: usize,
        /// The manifest's tensor count.
        max: usize,
    },
    /// The destination slot has the wrong size (a runtime bug guard, not client input).
    #[error("destination slot is {got} bytes, the manifest needs {expected}")]
    SlotSize {
        /// Needed bytes.
        expected: usize,
        /// Provided bytes.
        got: usize,
    },
}

impl From<&ValidationError> for shoal_proto::RejectReason {
    fn from(e: &ValidationError) -> Self {
        use shoal_proto::RejectReason as R;
        match e {
            ValidationError::Malformed(_) | ValidationError::SlotSize { .. } => R::Malformed,
            ValidationError::NonFinite { .. } => R::NonFinite,
            ValidationError::TooManyTensors { .. } => R::TooManyTensors,
            ValidationError::MissingTensor(_)
            | ValidationError::ExtraTensor(_)
            | ValidationError::DTypeMismatch { .. }
            | ValidationError::ShapeMismatch { .. } => R::SchemaMismatch,
        }
    }
}

impl ValidationError {
    /// A bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ValidationError::Malformed(_) => "malformed",
            ValidationError::MissingTensor(_) => "missing_tensor",
            ValidationError::ExtraTensor(_) => "extra_tensor",
            ValidationError::DTypeMismatch { .. } => "dtype_mismatch",
            ValidationError::ShapeMismatch { .. } => "shape_mismatch",
            ValidationError::NonFinite { .. } => "non_finite",
            ValidationError::TooManyTensors { .. } => "too_many_tensors",
            ValidationError::SlotSize { .. } => "slot_size",
        }
    }
}

/// Validates a safetensors `payload` against `manifest` and writes every tensor's bytes into
/// `slot` at its canonical offset: the one copy of an update's bytes on the ingest path. Float
/// tensors are then checked for NaN/Inf in place.
///
/// `slot` must be exactly [`ModelManifest::slot_bytes`] long and 8-byte aligned (shared-memory
/// slots are 64-byte aligned). Padding bytes are zeroed.
///
/// # Errors
/// A [`ValidationError`] naming the first problem found. On error the slot content is
/// unspecified (the caller releases it).
pub fn stage_update(
    manifest: &ModelManifest,
    payload: &[u8],
    slot: &mut [u8],
) -> Result<(), ValidationError> {
    if slot.len() != manifest.slot_bytes() {
        return Err(ValidationError::SlotSize { expected: manifest.slot_bytes(), got: slot.len() });
    }
    // Cheap before the JSON parser builds a map of every entry: count the declared tensors.
    let max = manifest.tensors().len();
    let declared = count_header_tensors(payload, max + 1)?;
    if declared > max {
        return Err(ValidationError::TooManyTensors { declared, max });
    }
    // safetensors 0.4.5 adds the last data offset to the header length without an overflow
    // check (`read_metadata`; upstream PR #808 is open), which panics in builds with overflow
    // checks on a crafted header. Such a header is refused before it reaches the parser, as a
    // typed error with no panic (a panic hook, e.g. libFuzzer's, may abort before any unwinding
    // is caught). Catching a panic from the parser stays as a last guard: a client's bytes must
    // never crash a process.
    if header_has_huge_integer(payload) {
        return Err(ValidationError::Malformed(format!(
            "safetensors header holds an integer above {MAX_HEADER_INTEGER}"
        )));
    }
    let parsed = std::panic::catch_unwind(|| safetensors::SafeTensors::deserialize(payload));
    let st = match parsed {
        Ok(r) => r.map_err(|e| ValidationError::Malformed(describe_safetensors_error(&e)))?,
        Err(_) => return Err(ValidationError::Malformed("safetensors header offsets overflow".into())),
    };
    if st.len() != manifest.tensors().len() {
        // Name the offending tensor: an extra one if any, else a missing one.
        for name in st.names() {
            if manifest.position(name).is_none() {
                return Err(ValidationError::ExtraTensor(name.clone()));
            }
        }
    }
    let mut cursor = 0usize;
    for (spec, s) in manifest.tensors().iter().zip(manifest.slots()) {
        let view = st.tensor(&spec.name).map_err(|_| ValidationError::MissingTensor(spec.name.clone()))?;
        if dtype_from_safetensors(view.dtype()) != Some(spec.dtype) {
            return Err(ValidationError::DTypeMismatch {
                name: spec.name.clone(),
                expected: spec.dtype,
                got: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(ValidationError::ShapeMismatch {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                got: view.shape().to_vec(),
            });
        }
        let data = view.data();
        if data.len() != s.byte_len {
            return Err(ValidationError::Malformed(format!(
                "tensor {:?} has {} data bytes",
                spec.name,
                data.len()
            )));
        }
        slot[cursor..s.byte_offset].fill(0);
        slot[s.byte_offset..s.byte_offset + s.byte_len].copy_from_slice(data);
        cursor = s.byte_offset + s.byte_len;
    }
    slot[cursor..].fill(0);
    if st.len() != manifest.tensors().len() {
        return Err(ValidationError::Malformed("tensor count differs from the manifest".into()));
    }
    check_finite(manifest, slot)
}

/// Stages a safetensors payload that arrives in pieces (the upload path's chunks, a model
/// object's chunks) straight into a slot: the same checks and the same slot bytes as
/// [`stage_update`] on the whole payload, without the payload ever being assembled in memory.
///
/// The header is collected first (at most [`MAX_STREAM_HEADER_BYTES`]) and checked against the
/// manifest before any data byte is accepted, so a wrong schema is refused at its first chunk;
/// data bytes are then copied to their canonical offsets as they arrive (the one copy of the
/// ingest path); [`Self::finish`] checks that every byte came and scans floats for NaN/Inf.
/// (The planning without the slot is [`StreamPlan`].)
#[derive(Debug)]
pub struct StreamStager<'a> {
    slot: &'a mut [u8],
    plan: StreamPlan<'a>,
}

/// The largest safetensors header [`StreamStager`] accepts (the safetensors crate's own limit).
pub const MAX_STREAM_HEADER_BYTES: u64 = 100_000_000;

impl<'a> StreamStager<'a> {
    /// A stager of a payload of `total` bytes into `slot` (exactly
    /// [`ModelManifest::slot_bytes`] long).
    ///
    /// # Errors
    /// [`ValidationError::SlotSize`] for a wrong slot; [`ValidationError::Malformed`] for a
    /// payload too short to hold a header.
    pub fn new(manifest: &'a ModelManifest, slot: &'a mut [u8], total: u64) -> Result<Self, ValidationError> {
        if slot.len() != manifest.slot_bytes() {
            return Err(ValidationError::SlotSize { expected: manifest.slot_bytes(), got: slot.len() });
        }
        let plan = StreamPlan::new(manifest, total)?;
        for r in plan.padding() {
            slot[r].fill(0);
        }
        Ok(StreamStager { slot, plan })
    }

    /// Accepts the next `chunk` of the payload.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first problem (more bytes than declared, a header that
    /// does not match the manifest). The slot's content is then unspecified.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ValidationError> {
        let slot = &mut *self.slot;
        self.plan.push(chunk, |at, src| slot[at..at + src.len()].copy_from_slice(src))
    }

    /// Checks that the whole payload came and scans floats for NaN/Inf.
    ///
    /// # Errors
    /// [`ValidationError::Malformed`] for a short payload; [`ValidationError::NonFinite`].
    pub fn finish(self) -> Result<(), ValidationError> {
        self.plan.finish()?;
        check_finite(self.plan.manifest, self.slot)
    }
}

/// Where each byte of a safetensors payload arriving in pieces goes in a slot, without the
/// slot: [`StreamStager`] on a slot it borrows, and the gateway's fold-while-staging path on
/// a shared-memory slot that a reader consumes while it is written ([`Self::staged_prefix`]).
#[derive(Debug)]
pub struct StreamPlan<'a> {
    manifest: &'a ModelManifest,
    /// Payload bytes declared (header length field included).
    total: u64,
    /// Payload bytes received so far.
    received: u64,
    /// The 8-byte length field and the header, until the header is complete.
    head: Vec<u8>,
    /// Payload offset where the data starts (8 + header length), once the header is checked.
    data_start: Option<u64>,
    /// Data ranges `(begin, end, slot offset)` relative to the data start, sorted, contiguous.
    plan: Vec<(u64, u64, usize)>,
    /// Each manifest tensor's data range `(begin, end)` relative to the data start, in
    /// manifest (slot) order.
    by_slot: Vec<(u64, u64)>,
}

impl<'a> StreamPlan<'a> {
    /// A plan for a payload of `total` bytes into a slot of `manifest`.
    ///
    /// # Errors
    /// [`ValidationError::Malformed`] for a payload too short to hold a header.
    pub fn new(manifest: &'a ModelManifest, total: u64) -> Result<Self, ValidationError> {
        if total < 8 {
            return Err(ValidationError::Malformed("shorter than the 8-byte header length".into()));
        }
        Ok(StreamPlan {
            manifest,
            total,
            received: 0,
            head: Vec::new(),
            data_start: None,
            plan: Vec::new(),
            by_slot: Vec::new(),
        })
    }

    /// The slot's padding (bytes no tensor owns), to be zeroed before any data byte: written
    /// first, a reader of the staged prefix sees it final.
    pub fn padding(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut cursor = 0;
        for s in self.manifest.slots() {
            if cursor < s.byte_offset {
                out.push(cursor..s.byte_offset);
            }
            cursor = s.byte_offset + s.byte_len;
        }
        if cursor < self.manifest.slot_bytes() {
            out.push(cursor..self.manifest.slot_bytes());
        }
        out
    }

    /// Accepts the next `chunk`: calls `write(slot offset, bytes)` for each piece of tensor data
    /// in it (every slot byte at most once, each tensor's bytes in order).
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first problem (more bytes than declared, a header that
    /// does not match the manifest).
    pub fn push(
        &mut self,
        mut chunk: &[u8],
        mut write: impl FnMut(usize, &[u8]),
    ) -> Result<(), ValidationError> {
        let end = self.received.checked_add(chunk.len() as u64).filter(|&e| e <= self.total);
        let Some(end) = end else {
            return Err(ValidationError::Malformed(format!("more than the {} bytes declared", self.total)));
        };
        while self.data_start.is_none() && !chunk.is_empty() {
            // The length field first, then the header it announces.
            let want = self.header_end()?.unwrap_or(8);
            let take = ((want - self.received) as usize).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
            self.received += take as u64;
            chunk = &chunk[take..];
            if self.header_end()?.is_some_and(|h| self.received == h) {
                self.check_header()?;
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let start = self.data_start.unwrap_or(0);
        let (from, to) = (self.received - start, end - start);
        for &(b, e, at) in &self.plan {
            if e <= from || b >= to {
                continue;
            }
            let (lo, hi) = (b.max(from), e.min(to));
            write(at + (lo - b) as usize, &chunk[(lo - from) as usize..(hi - from) as usize]);
        }
        self.received = end;
        Ok(())
    }

    /// Bytes `[0, n)` of the slot that are final (given the padding was zeroed first): every
    /// tensor before the first one not yet complete, and that one's bytes so far; the slot's
    /// size once everything arrived.
    pub fn staged_prefix(&self) -> usize {
        let Some(start) = self.data_start else { return 0 };
        let data = self.received - start;
        for ((b, e), s) in self.by_slot.iter().zip(self.manifest.slots()) {
            if data < *e {
                return s.byte_offset + data.saturating_sub(*b) as usize;
            }
        }
        self.manifest.slot_bytes()
    }

    /// Checks that the whole payload came (NaN/Inf are the caller's to check).
    ///
    /// # Errors
    /// [`ValidationError::Malformed`] for a short payload.
    pub fn finish(&self) -> Result<(), ValidationError> {
        if self.data_start.is_none() || self.received != self.total {
            return Err(ValidationError::Malformed(format!(
                "{} of the {} bytes declared arrived",
                self.received, self.total
            )));
        }
        Ok(())
    }

    /// Where the header ends (8 + its length) once the length field is in.
    fn header_end(&self) -> Result<Option<u64>, ValidationError> {
        let Some(len) = self.head.get(..8) else { return Ok(None) };
        let mut n = [0u8; 8];
        n.copy_from_slice(len);
        let n = u64::from_le_bytes(n);
        if n > MAX_STREAM_HEADER_BYTES || 8 + n > self.total {
            return Err(ValidationError::Malformed(format!(
                "header of {n} bytes in a payload of {} (at most {MAX_STREAM_HEADER_BYTES})",
                self.total
            )));
        }
        Ok(Some(8 + n))
    }

    /// Checks the complete header against the manifest and plans where each data byte goes.
    fn check_header(&mut self) -> Result<(), ValidationError> {
        let m = self.manifest;
        let max = m.tensors().len();
        let declared = count_header_tensors(&self.head, max + 1)?;
        if declared > max {
            return Err(ValidationError::TooManyTensors { declared, max });
        }
        if header_has_huge_integer(&self.head) {
            return Err(ValidationError::Malformed(format!(
                "safetensors header holds an integer above {MAX_HEADER_INTEGER}"
            )));
        }
        let malformed = |d: String| ValidationError::Malformed(d);
        let text = std::str::from_utf8(&self.head[8..]).map_err(|_| {
            malformed(describe_safetensors_error(&safetensors::SafeTensorError::InvalidHeader))
        })?;
        let meta: safetensors::tensor::Metadata = serde_json::from_str(text).map_err(|_| {
            malformed(describe_safetensors_error(&safetensors::SafeTensorError::InvalidHeaderDeserialization))
        })?;
        let infos = meta.tensors();
        for name in infos.keys() {
            if m.position(name).is_none() {
                return Err(ValidationError::ExtraTensor(name.to_string()));
            }
        }
        // What safetensors checks of a whole file: data ranges contiguous from 0, each as long
        // as its shape and dtype say, the last ending where the payload does.
        let mut ranges: Vec<(usize, usize, usize)> = Vec::with_capacity(infos.len());
        for info in infos.values() {
            let (b, e) = info.data_offsets;
            let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let nbytes = numel.and_then(|n| n.checked_mul(info.dtype.size()));
            if e < b || nbytes != Some(e - b) {
                return Err(malformed(describe_safetensors_error(
                    &safetensors::SafeTensorError::TensorInvalidInfo,
                )));
            }
            ranges.push((b, e, 0));
        }
        ranges.sort_unstable();
        let mut at = 0;
        for &(b, e, _) in &ranges {
            if b != at {
                return Err(malformed(format!(
                    "the data offsets of the header leave a gap or an overlap at data byte {b}"
                )));
            }
            at = e;
        }
        let data_start = self.head.len() as u64;
        if data_start + at as u64 != self.total {
            return Err(malformed(describe_safetensors_error(
                &safetensors::SafeTensorError::MetadataIncompleteBuffer,
            )));
        }
        let mut plan = Vec::with_capacity(max);
        for (spec, s) in m.tensors().iter().zip(m.slots()) {
            let info =
                infos.get(&spec.name).ok_or_else(|| ValidationError::MissingTensor(spec.name.clone()))?;
            if dtype_from_safetensors(info.dtype) != Some(spec.dtype) {
                return Err(ValidationError::DTypeMismatch {
                    name: spec.name.clone(),
                    expected: spec.dtype,
                    got: format!("{:?}", info.dtype),
                });
            }
            if info.shape != spec.shape {
                return Err(ValidationError::ShapeMismatch {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    got: info.shape.clone(),
                });
            }
            let (b, e) = info.data_offsets;
            if e - b != s.byte_len {
                return Err(malformed(format!("tensor {:?} has {} data bytes", spec.name, e - b)));
            }
            plan.push((b as u64, e as u64, s.byte_offset));
        }
        self.by_slot = plan.iter().map(|&(b, e, _)| (b, e)).collect();
        if infos.len() != max {
            return Err(malformed("tensor count differs from the manifest".into()));
        }
        plan.sort_unstable();
        self.plan = plan;
        self.data_start = Some(data_start);
        self.head = Vec::new();
        Ok(())
    }
}

/// A safetensors parse error in words (the crate's variant names are not messages).
pub fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "shorter than the 8-byte header length".into(),
        E::HeaderTooLarge => "the header length field is above 100,000,000 bytes".into(),
        E::InvalidHeaderLength => "the header length field points past the end of the payload".into(),
        E::InvalidHeader => "the header is not UTF-8".into(),
        E::InvalidHeaderStart => "the header does not start with '{'".into(),
        E::InvalidHeaderDeserialization => {
            "the header is not safetensors JSON ({name: {dtype, shape, data_offsets}})".into()
        }
        E::MetadataIncompleteBuffer => {
            "the data does not end where the header says (a truncated payload, or extra bytes)".into()
        }
        E::InvalidOffset(name) => {
            format!("the data offsets of tensor {name:?} leave a gap or an overlap with the previous tensor")
        }
        E::TensorInvalidInfo => "a tensor's data offsets do not match its shape and dtype".into(),
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        other => format!("safetensors: {other:?}"),
    }
}

/// Largest integer a safetensors header may hold outside its strings: 2^62, far above any real
/// shape or byte offset, and far enough below `usize::MAX` that safetensors' unchecked
/// `data end + 8 + header length` cannot overflow.
const MAX_HEADER_INTEGER: u64 = 1 << 62;

/// Whether the JSON header of a safetensors `payload` holds an integer above
/// [`MAX_HEADER_INTEGER`] outside a string (so a big number in a tensor name or in
/// `__metadata__` is fine). One pass over the header bytes, no allocation; a payload whose
/// header length field is out of range answers `false` and is refused by the parser itself.
fn header_has_huge_integer(payload: &[u8]) -> bool {
    let Some(len) = payload.get(..8) else { return false };
    let mut n = [0u8; 8];
    n.copy_from_slice(len);
    let Some(header) =
        usize::try_from(u64::from_le_bytes(n)).ok().and_then(|n| payload.get(8..8usize.checked_add(n)?))
    else {
        return false;
    };
    let (mut strings, mut value) = (JsonStrings::default(), None::<u64>);
    for &b in header {
        match strings.step(b) {
            JsonByte::Outside if b.is_ascii_digit() => {
                let v = value.unwrap_or(0).saturating_mul(10).saturating_add(u64::from(b - b'0'));
                if v > MAX_HEADER_INTEGER {
                    return true;
                }
                value = Some(v);
            }
            JsonByte::Outside | JsonByte::Open => value = None,
            JsonByte::Inside | JsonByte::Close => {}
        }
    }
    false
}

/// Where a byte of a JSON text stands with respect to strings ([`JsonStrings::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonByte {
    /// Outside every string (and not a quote).
    Outside,
    /// The quote that opens a string.
    Open,
    /// Inside a string (escapes included).
    Inside,
    /// The quote that closes a string.
    Close,
}

/// A byte scanner that follows JSON strings. JSON strings are delimited by `"` and escape with
/// `\`; both are ASCII, so they never occur inside a multi-byte UTF-8 sequence and a byte scan
/// finds the string boundaries.
#[derive(Debug, Default)]
struct JsonStrings {
    in_string: bool,
    escaped: bool,
}

impl JsonStrings {
    /// Classifies the next byte `b`.
    fn step(&mut self, b: u8) -> JsonByte {
        if !self.in_string {
            self.in_string = b == b'"';
            return if self.in_string { JsonByte::Open } else { JsonByte::Outside };
        }
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
            return JsonByte::Close;
        }
        JsonByte::Inside
    }
}

/// Counts the tensor entries a safetensors header declares (its top-level JSON keys other than
/// `__metadata__`), stopping at `stop`: one pass over the header bytes, no allocation. Only the
/// JSON string and nesting structure is followed; the full parse that comes after checks the
/// rest.
///
/// # Errors
/// [`ValidationError::Malformed`] when the payload is shorter than its length prefix says.
pub fn count_header_tensors(payload: &[u8], stop: usize) -> Result<usize, ValidationError> {
    let malformed = |d: &str| ValidationError::Malformed(d.to_owned());
    let prefix = payload.get(..8).ok_or_else(|| malformed("shorter than the 8-byte header length"))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(prefix);
    let len = usize::try_from(u64::from_le_bytes(len)).unwrap_or(usize::MAX);
    let header = payload
        .get(8..8usize.saturating_add(len))
        .ok_or_else(|| malformed("header length exceeds the payload"))?;
    let (mut strings, mut depth, mut expect_key) = (JsonStrings::default(), 0usize, false);
    let (mut key_start, mut count) = (None::<usize>, 0usize);
    for (i, &b) in header.iter().enumerate() {
        match (strings.step(b), b) {
            (JsonByte::Inside, _) => {}
            (JsonByte::Close, _) => {
                if let Some(start) = key_start.take() {
                    if &header[start..i] != b"__metadata__" {
                        count += 1;
                        if count >= stop {
                            return Ok(count);
                        }
                    }
                }
            }
            (JsonByte::Open, _) => {
                if depth == 1 && expect_key {
                    key_start = Some(i + 1);
                    expect_key = false;
                }
            }
            (JsonByte::Outside, b'{' | b'[') => {
                depth += 1;
                expect_key = depth == 1 && b == b'{';
            }
            (JsonByte::Outside, b'}' | b']') => depth = depth.saturating_sub(1),
            (JsonByte::Outside, b',') if depth == 1 => expect_key = true,
            (JsonByte::Outside, _) => {}
        }
    }
    Ok(count)
}

/// Checks that every float tensor of a staged slot is finite.
///
/// # Errors
/// [`ValidationError::NonFinite`] for the first offending element.
pub fn check_finite(manifest: &ModelManifest, slot: &[u8]) -> Result<(), ValidationError> {
    for (spec, s) in manifest.tensors().iter().zip(manifest.slots()) {
        let bytes = &slot[s.byte_offset..s.byte_offset + s.byte_len];
        let bad = match TensorData::view(spec.dtype, bytes) {
            Some(TensorData::F32(x)) => x.iter().position(|v| !v.is_finite()),
            Some(TensorData::F64(x)) => x.iter().position(|v| !v.is_finite()),
            Some(TensorData::F16(x)) => x.iter().position(|v| !v.is_finite()),
            Some(TensorData::BF16(x)) => x.iter().position(|v| !v.is_finite()),
            Some(_) => None,
            None => return Err(ValidationError::Malformed(format!("tensor {:?} misaligned", spec.name))),
        };
        if let Some(index) = bad {
            return Err(ValidationError::NonFinite { name: spec.name.clone(), index });
        }
    }
    Ok(())
}

/// A typed, zero-copy view of one tensor's bytes.
#[derive(Debug, Clone, Copy)]
pub enum TensorData<'a> {
    /// [`DType::F32`] elements.
    F32(&'a [f32]),
    /// [`DType::F16`] elements.
    F16(&'a [f16]),
    /// [`DType::BF16`] elements.
    BF16(&'a [bf16]),
    /// [`DType::F64`] elements.
    F64(&'a [f64]),
    /// [`DType::I64`] elements.
    I64(&'a [i64]),
    /// [`DType::I32`] elements.
    I32(&'a [i32]),
    /// [`DType::I16`] elements.
    I16(&'a [i16]),
    /// [`DType::I8`] elements.
    I8(&'a [i8]),
    /// [`DType::U64`] elements.
    U64(&'a [u64]),
    /// [`DType::U32`] elements.
    U32(&'a [u32]),
    /// [`DType::U16`] elements.
    U16(&'a [u16]),
    /// [`DType::U8`] elements.
    U8(&'a [u8]),
}

impl<'a> TensorData<'a> {
    /// Views `bytes` as elements of `dtype`; `None` if misaligned or of a length that is not a
    /// multiple of the element size.
    pub fn view(dtype: DType, bytes: &'a [u8]) -> Option<TensorData<'a>> {
        use bytemuck::try_cast_slice as c;
        Some(match dtype {
            DType::F32 => TensorData::F32(c(bytes).ok()?),
            DType::F16 => TensorData::F16(c(bytes).ok()?),
            DType::BF16 => TensorData::BF16(c(bytes).ok()?),
            DType::F64 => TensorData::F64(c(bytes).ok()?),
            DType::I64 => TensorData::I64(c(bytes).ok()?),
            DType::I32 => TensorData::I32(c(bytes).ok()?),
            DType::I16 => TensorData::I16(c(bytes).ok()?),
            DType::I8 => TensorData::I8(c(bytes).ok()?),
            DType::U64 => TensorData::U64(c(bytes).ok()?),
            DType::U32 => TensorData::U32(c(bytes).ok()?),
            DType::U16 => TensorData::U16(c(bytes).ok()?),
            DType::U8 => TensorData::U8(bytes),
        })
    }

    /// Element `i` decoded to f64 (exact for every dtype except 64-bit integers beyond 2^53).
    pub fn get_f64(&self, i: usize) -> f64 {
        match *self {
            TensorData::F32(x) => f64::from(x[i]),
            TensorData::F16(x) => x[i].to_f64(),
            TensorData::BF16(x) => x[i].to_f64(),
            TensorData::F64(x) => x[i],
            TensorData::I64(x) => x[i] as f64,
            TensorData::I32(x) => f64::from(x[i]),
            TensorData::I16(x) => f64::from(x[i]),
            TensorData::I8(x) => f64::from(x[i]),
            TensorData::U64(x) => x[i] as f64,
            TensorData::U32(x) => f64::from(x[i]),
            TensorData::U16(x) => f64::from(x[i]),
            TensorData::U8(x) => f64::from(x[i]),
        }
    }
}

/// Model parameters in the canonical slot layout (the global model, or a strategy's result).
/// The buffer is 8-byte aligned so every dtype can be viewed in place.
#[derive(Clone, PartialEq)]
pub struct Parameters {
    manifest: Arc<ModelManifest>,
    buf: Vec<u64>,
}

impl fmt::Debug for Parameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parameters")
            .field("tensors", &self.manifest.tensors().len())
            .field("bytes", &self.manifest.slot_bytes())
            .finish()
    }
}

impl Parameters {
    /// All-zero parameters of `manifest`.
    pub fn zeros(manifest: Arc<ModelManifest>) -> Parameters {
        let words = manifest.slot_bytes() / 8;
        Parameters { manifest, buf: vec![0u64; words] }
    }

    /// Parameters from per-tensor values given in f64 (rounded to each tensor's dtype: nearest
    /// for floats, half-to-even and saturating for integers).
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] when the number of tensors or of values differs.
    pub fn from_f64(manifest: Arc<ModelManifest>, values: &[Vec<f64>]) -> Result<Parameters> {
        if values.len() != manifest.tensors().len() {
            return Err(Error::ManifestMismatch("tensor count differs"));
        }
        let mut p = Parameters::zeros(manifest);
        for (i, v) in values.iter().enumerate() {
            if v.len() != p.manifest.slots()[i].numel {
                return Err(Error::ManifestMismatch("tensor length differs"));
            }
            p.write_tensor_f64(i, v.iter().copied());
        }
        Ok(p)
    }

    /// Parses and validates a safetensors file against `manifest` (as ingest does).
    ///
    /// # Errors
    /// [`Error::Validation`] when the payload does not match.
    pub fn from_safetensors(manifest: Arc<ModelManifest>, payload: &[u8]) -> Result<Parameters> {
        let mut p = Parameters::zeros(manifest);
        let m = Arc::clone(&p.manifest);
        stage_update(&m, payload, p.as_bytes_mut())?;
        Ok(p)
    }

    /// Encodes as a safetensors file (tensors keep their manifest dtypes).
    ///
    /// # Errors
    /// [`Error::Encode`] if safetensors rejects the data (cannot happen for a valid manifest).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let (header, parts) = self.safetensors_parts()?;
        let mut out = Vec::with_capacity(header.len() + self.manifest.data_bytes());
        out.extend_from_slice(&header);
        for p in parts {
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    /// The safetensors file of [`Self::to_safetensors`] in pieces, without a copy of the data:
    /// the header (length field included), then the tensors' bytes in file order, borrowed
    /// from these parameters. Concatenated, they are exactly [`Self::to_safetensors`]'s bytes
    /// (what a model is stored as, streamed to the object store chunk by chunk).
    ///
    /// # Errors
    /// [`Error::Encode`] if safetensors rejects the data (cannot happen for a valid manifest).
    pub fn safetensors_parts(&self) -> Result<(Vec<u8>, Vec<&[u8]>)> {
        let bytes = self.as_bytes();
        let (header, order) = safetensors_layout(&self.manifest)?;
        let slots = self.manifest.slots();
        let parts = order
            .into_iter()
            .map(|i| &bytes[slots[i].byte_offset..slots[i].byte_offset + slots[i].byte_len])
            .collect();
        Ok((header, parts))
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<ModelManifest> {
        &self.manifest
    }

    /// The slot-layout bytes.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.buf)
    }

    /// The slot-layout bytes, mutable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.buf)
    }

    /// A typed view of tensor `i`.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn tensor(&self, i: usize) -> TensorData<'_> {
        let s = self.manifest.slots()[i];
        TensorData::view(
            self.manifest.tensors()[i].dtype,
            &self.as_bytes()[s.byte_offset..s.byte_offset + s.byte_len],
        )
        .expect("Parameters buffers are 8-byte aligned and sized by the manifest")
    }

    /// Tensor `i` decoded to f64.
    pub fn tensor_f64(&self, i: usize) -> Vec<f64> {
        let t = self.tensor(i);
        (0..self.manifest.slots()[i].numel).map(|e| t.get_f64(e)).collect()
    }

    /// A view of these parameters as a client update (used by tests and the simulator).
    pub fn as_update<'a>(&'a self, client: &'a crate::ClientId, weight: f64) -> crate::UpdateView<'a> {
        crate::UpdateView { manifest: &self.manifest, bytes: self.as_bytes(), weight, client }
    }

    /// Rewrites tensor `i` in place, element `e` becoming `f(e, old value)` rounded to the
    /// tensor's dtype (as [`Self::write_tensor_f64`]); f32 tensors take a direct path.
    pub(crate) fn map_tensor_f64(&mut self, i: usize, mut f: impl FnMut(usize, f64) -> f64) {
        let s = self.manifest.slots()[i];
        let dtype = self.manifest.tensors()[i].dtype;
        let out = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.buf)
            [s.byte_offset..s.byte_offset + s.byte_len];
        if dtype == DType::F32 {
            // Slot offsets are 8-byte aligned (the manifest's layout), so this cast holds.
            if let Ok(x) = bytemuck::try_cast_slice_mut::<u8, f32>(out) {
                for (e, v) in x.iter_mut().enumerate() {
                    *v = f(e, f64::from(*v)) as f32;
                }
                return;
            }
        }
        let n = dtype.size();
        for (e, chunk) in out.chunks_exact_mut(n).enumerate() {
            let old = TensorData::view(dtype, chunk).map_or(0.0, |t| t.get_f64(0));
            write_f64_as(dtype, std::iter::once(f(e, old)), chunk);
        }
    }

    /// Writes tensor `i` from f64 values, rounding to its dtype.
    pub(crate) fn write_tensor_f64(&mut self, i: usize, values: impl Iterator<Item = f64>) {
        let s = self.manifest.slots()[i];
        let dtype = self.manifest.tensors()[i].dtype;
        let out = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut self.buf)
            [s.byte_offset..s.byte_offset + s.byte_len];
        write_f64_as(dtype, values, out);
    }
}

/// The safetensors header of a model of `manifest` and the order in which its tensors' data
/// follow it (manifest indices): what [`Parameters::safetensors_parts`] and
/// [`AccumulatorModel`] write.
///
/// # Errors
/// [`Error::Encode`] if safetensors rejects the layout (cannot happen for a valid manifest).
pub fn safetensors_layout(manifest: &ModelManifest) -> Result<(Vec<u8>, Vec<usize>)> {
    /// A tensor's dtype, shape and length with no data: safetensors lays the header out
    /// from these and writes an empty body, so `serialize` gives the header alone.
    struct Shape<'a>(safetensors::Dtype, &'a [usize], usize);
    impl safetensors::View for Shape<'_> {
        fn dtype(&self) -> safetensors::Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&[])
        }
        fn data_len(&self) -> usize {
            self.2
        }
    }
    let tensors = manifest.tensors().iter().zip(manifest.slots());
    let header = safetensors::serialize(
        tensors
            .clone()
            .map(|(t, s)| (t.name.as_str(), Shape(dtype_to_safetensors(t.dtype), &t.shape, s.byte_len))),
        &None,
    )
    .map_err(Error::Encode)?;
    // The data order safetensors writes (`serialize`): dtype descending, then name.
    let mut order: Vec<usize> = (0..manifest.tensors().len()).collect();
    let t = manifest.tensors();
    order.sort_by(|&l, &r| {
        dtype_to_safetensors(t[r].dtype)
            .cmp(&dtype_to_safetensors(t[l].dtype))
            .then(t[l].name.cmp(&t[r].name))
    });
    Ok((header, order))
}

/// How an accumulator element becomes a model element ([`AccumulatorModel`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ElementOp {
    /// `acc / total`: a weighted mean.
    Divide(f64),
    /// `0 + acc / total`, clamped at 0 when `clamp_at_zero`: a running statistic's mean or
    /// variance (the same expression as `finish` over parameters).
    Statistic {
        /// The total weight.
        total: f64,
        /// A variance: negative results become 0.
        clamp_at_zero: bool,
    },
    /// The accumulated value itself (`max`, `first`).
    Copy,
}

impl ElementOp {
    #[inline]
    fn apply(self, v: f64) -> f64 {
        match self {
            ElementOp::Divide(t) => v / t,
            ElementOp::Statistic { total, clamp_at_zero } => {
                let v = 0.0 + v / total;
                if clamp_at_zero && v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
            ElementOp::Copy => v,
        }
    }
}

/// Writes `f(acc[e])` for each element into `out` as `dtype` (f32 without the per-element
/// dtype dispatch: the hot case).
#[inline]
fn convert(dtype: DType, acc: &[f64], out: &mut [u8], f: impl Fn(f64) -> f64) {
    if dtype == DType::F32 {
        for (o, &v) in out.chunks_exact_mut(4).zip(acc) {
            o.copy_from_slice(&(f(v) as f32).to_le_bytes());
        }
    } else {
        write_f64_as(dtype, acc.iter().map(|&v| f(v)), out);
    }
}

/// A model's safetensors file computed piece by piece from an f64 accumulator as it is read
/// (element `e` of tensor `i` is `ops[i]` of the accumulated value, rounded to the tensor's
/// dtype as [`Parameters::from_f64`] rounds): a strategy's result stored without the model ever
/// being whole in memory beside the accumulator ([`crate::Strategy::finish_streamed`]). Its
/// bytes are exactly [`Parameters::to_safetensors`] of the same values.
#[derive(Debug)]
pub struct AccumulatorModel {
    manifest: Arc<ModelManifest>,
    partial: Arc<crate::PartialAggregate>,
    ops: Vec<ElementOp>,
    header: Vec<u8>,
    /// Tensors in data order.
    order: Vec<usize>,
    /// Read cursor: header bytes, then (position in `order`, element).
    header_at: usize,
    part: usize,
    elem: usize,
    /// Bytes of an element cut by the end of a read, not yet handed out.
    carry: Vec<u8>,
}

impl AccumulatorModel {
    /// The model `ops[i]` (one per tensor) of `partial`'s accumulator.
    ///
    /// # Errors
    /// [`Error::ManifestMismatch`] for a wrong number of ops; [`Error::Encode`] (cannot happen
    /// for a valid manifest).
    pub fn new(partial: Arc<crate::PartialAggregate>, ops: Vec<ElementOp>) -> Result<AccumulatorModel> {
        let manifest = Arc::clone(partial.manifest());
        if ops.len() != manifest.tensors().len() {
            return Err(Error::ManifestMismatch("one element op per tensor"));
        }
        let (header, order) = safetensors_layout(&manifest)?;
        Ok(AccumulatorModel {
            manifest,
            partial,
            ops,
            header,
            order,
            header_at: 0,
            part: 0,
            elem: 0,
            carry: Vec::new(),
        })
    }

    /// Bytes of the whole file.
    pub fn len(&self) -> usize {
        self.header.len() + self.manifest.slots().iter().map(|s| s.byte_len).sum::<usize>()
    }

    /// Whether the file is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Checks that every element rounds to a finite value of its dtype (one pass over the
    /// accumulator, nothing written).
    ///
    /// # Errors
    /// [`Error::NonFiniteResult`] naming the first tensor that is not.
    pub fn check_finite(&self) -> Result<()> {
        for ((t, s), &op) in self.manifest.tensors().iter().zip(self.manifest.slots()).zip(&self.ops) {
            let acc = &self.partial.values()[s.elem_offset..s.elem_offset + s.numel];
            let finite = match t.dtype {
                // No early exit, so the pass vectorizes (NaN and ±Inf both fail `is_finite`).
                DType::F32 => acc.iter().fold(true, |ok, &v| ok & (op.apply(v) as f32).is_finite()),
                DType::F64 => acc.iter().all(|&v| op.apply(v).is_finite()),
                DType::F16 | DType::BF16 => acc.iter().all(|&v| {
                    let mut b = [0u8; 2];
                    write_f64_as(t.dtype, std::iter::once(op.apply(v)), &mut b);
                    TensorData::view(t.dtype, &b).is_some_and(|x| x.get_f64(0).is_finite())
                }),
                _ => true,
            };
            if !finite {
                return Err(Error::NonFiniteResult(t.name.clone()));
            }
        }
        Ok(())
    }

    /// Fills `out` with the file's next bytes; returns how many (0: the end).
    pub fn read(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        if self.header_at < self.header.len() {
            let k = (self.header.len() - self.header_at).min(out.len());
            out[..k].copy_from_slice(&self.header[self.header_at..self.header_at + k]);
            self.header_at += k;
            n = k;
        }
        while n < out.len() {
            if !self.carry.is_empty() {
                let k = self.carry.len().min(out.len() - n);
                out[n..n + k].copy_from_slice(&self.carry[..k]);
                self.carry.drain(..k);
                n += k;
                continue;
            }
            let Some(&i) = self.order.get(self.part) else { break };
            let (t, s, op) = (&self.manifest.tensors()[i], self.manifest.slots()[i], self.ops[i]);
            if self.elem >= s.numel {
                (self.part, self.elem) = (self.part + 1, 0);
                continue;
            }
            let size = t.dtype.size();
            let acc = &self.partial.values()[s.elem_offset..s.elem_offset + s.numel];
            // Whole elements straight into `out`, then one through `carry` if it is cut.
            let whole = ((out.len() - n) / size).min(s.numel - self.elem);
            let (from, dst) = (&acc[self.elem..self.elem + whole], &mut out[n..n + whole * size]);
            match op {
                ElementOp::Divide(total) => convert(t.dtype, from, dst, |v| v / total),
                ElementOp::Copy => convert(t.dtype, from, dst, |v| v),
                op => convert(t.dtype, from, dst, |v| op.apply(v)),
            }
            n += whole * size;
            self.elem += whole;
            if whole == 0 {
                let mut b = vec![0u8; size];
                write_f64_as(t.dtype, std::iter::once(op.apply(acc[self.elem])), &mut b);
                self.carry = b;
                self.elem += 1;
            }
        }
        n
    }
}

/// f64 → f32 rounding to odd: truncate toward zero and set the last mantissa bit if inexact.
/// A second rounding to nearest-even into a format with at most 22 significant bits (f16: 11,
/// bf16: 8) is then exactly the correct single rounding of the f64 (Boldo & Melquiond, "When
/// double rounding is odd", 2005). `half`'s own f64 conversions round twice (via f32) or drop
/// sticky bits, so they are not used.
fn f64_to_f32_round_to_odd(v: f64) -> f32 {
    let t = v as f32;
    if !t.is_finite() || f64::from(t) == v {
        return t;
    }
    // `t` is the nearest f32; step it toward zero if it rounded away from zero.
    let trunc = if f64::from(t).abs() > v.abs() { f32::from_bits(t.to_bits() - 1) } else { t };
    f32::from_bits(trunc.to_bits() | 1)
}

/// Encodes f64 values into `out` as `dtype`: floats round to nearest; integers round half to
/// even and saturate to the dtype's range (NaN becomes 0).
fn write_f64_as(dtype: DType, values: impl Iterator<Item = f64>, out: &mut [u8]) {
    let n = dtype.size();
    for (chunk, v) in out.chunks_exact_mut(n).zip(values) {
        match dtype {
            DType::F32 => chunk.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => chunk.copy_from_slice(&v.to_le_bytes()),
            DType::F16 => chunk.copy_from_slice(&f16::from_f32(f64_to_f32_round_to_odd(v)).to_le_bytes()),
            DType::BF16 => chunk.copy_from_slice(&bf16::from_f32(f64_to_f32_round_to_odd(v)).to_le_bytes()),
            _ => {
                let (lo, hi) = int_range(dtype).unwrap_or((0.0, 0.0));
                let r = if v.is_nan() { 0.0 } else { v.round_ties_even().clamp(lo, hi) };
                match dtype {
                    DType::I64 => chunk.copy_from_slice(&(r as i64).to_le_bytes()),
                    DType::I32 => chunk.copy_from_slice(&(r as i32).to_le_bytes()),
                    DType::I16 => chunk.copy_from_slice(&(r as i16).to_le_bytes()),
                    DType::I8 => chunk.copy_from_slice(&(r as i8).to_le_bytes()),
                    DType::U64 => chunk.copy_from_slice(&(r as u64).to_le_bytes()),
                    DType::U32 => chunk.copy_from_slice(&(r as u32).to_le_bytes()),
                    DType::U16 => chunk.copy_from_slice(&(r as u16).to_le_bytes()),
                    _ => chunk.copy_from_slice(&(r as u8).to_le_bytes()),
                }
            }
        }
    }
}

/// Builds a safetensors payload from named f64 values (for tests, the simulator and clients
/// that hold plain vectors). Values are rounded to each tensor's dtype.
///
/// # Errors
/// As [`Parameters::from_f64`] and [`Parameters::to_safetensors`].
pub fn encode_safetensors(manifest: &Arc<ModelManifest>, values: &[Vec<f64>]) -> Result<Vec<u8>> {
    Parameters::from_f64(Arc::clone(manifest), values)?.to_safetensors()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Arc<ModelManifest> {
        Arc::new(
            ModelManifest::new(vec![
                TensorSpec::new("w", DType::F32, vec![2, 3]),
                TensorSpec::new("b", DType::F16, vec![3]),
                TensorSpec::new("n", DType::I64, vec![]),
            ])
            .unwrap(),
        )
    }

    #[test]
    fn layout_is_aligned_and_sized() {
        let m = manifest();
        let s = m.slots();
        assert_eq!((s[0].byte_offset, s[0].byte_len), (0, 24));
        assert_eq!((s[1].byte_offset, s[1].byte_len), (64, 6));
        assert_eq!((s[2].byte_offset, s[2].byte_len), (128, 8));
        assert_eq!(m.slot_bytes(), 192);
        assert_eq!(m.numel(), 10);
        assert_eq!(s[2].elem_offset, 9);
    }

    #[test]
    fn manifest_rejects_duplicates_and_empty() {
        assert!(ModelManifest::new(vec![]).is_err());
        let t = TensorSpec::new("a", DType::F32, vec![1]);
        assert!(ModelManifest::new(vec![t.clone(), t]).is_err());
        let huge = TensorSpec::new("h", DType::F64, vec![usize::MAX / 2, 4]);
        assert!(ModelManifest::new(vec![huge]).is_err());
    }

    #[test]
    fn safetensors_round_trip_and_rounding() {
        let m = manifest();
        let vals = vec![vec![1.0, -2.5, 3.25, 0.0, 1e-3, 7.0], vec![0.5, 1.0, -1.0], vec![15.5]];
        let bytes = encode_safetensors(&m, &vals).unwrap();
        let p = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_eq!(p.tensor_f64(0)[2], 3.25);
        assert_eq!(p.tensor_f64(1), vec![0.5, 1.0, -1.0]);
        assert_eq!(p.tensor_f64(2), vec![16.0], "15.5 rounds half to even");
        let p2 =
            Parameters::from_f64(Arc::clone(&m), &[vals[0].clone(), vals[1].clone(), vec![14.5]]).unwrap();
        assert_eq!(p2.tensor_f64(2), vec![14.0]);
    }

    #[test]
    fn stage_rejects_each_kind_of_bad_payload() {
        let m = manifest();
        let mut slot = vec![0u64; m.slot_bytes() / 8];
        let slot = bytemuck::cast_slice_mut::<u64, u8>(&mut slot);
        let good = vec![vec![0.0; 6], vec![0.0; 3], vec![1.0]];
        let ok = encode_safetensors(&m, &good).unwrap();
        assert!(stage_update(&m, &ok, slot).is_ok());

        // Truncated.
        let e = stage_update(&m, &ok[..ok.len() - 3], slot).unwrap_err();
        assert_eq!(e.label(), "malformed");
        let e = stage_update(&m, &ok[..5], slot).unwrap_err();
        assert_eq!(e.label(), "malformed");

        // Wrong shape / dtype / missing / extra, built with other manifests: the test manifest's
        // tensors with `w` and `n` replaced as given (`None` drops `n`), plus `more`.
        let other = |w: (DType, Vec<usize>), n: Option<&str>, more: &[TensorSpec], v: Vec<Vec<f64>>| {
            let mut ts = vec![TensorSpec::new("w", w.0, w.1), TensorSpec::new("b", DType::F16, vec![3])];
            ts.extend(n.map(|n| TensorSpec::new(n, DType::I64, vec![])));
            ts.extend_from_slice(more);
            encode_safetensors(&Arc::new(ModelManifest::new(ts).unwrap()), &v).unwrap()
        };
        let w = || (DType::F32, vec![2, 3]);
        let shape = other((DType::F32, vec![3, 2]), Some("n"), &[], good.clone());
        assert!(matches!(stage_update(&m, &shape, slot), Err(ValidationError::ShapeMismatch { .. })));
        let dtype = other((DType::F64, vec![2, 3]), Some("n"), &[], good.clone());
        assert!(matches!(stage_update(&m, &dtype, slot), Err(ValidationError::DTypeMismatch { .. })));
        let missing = other(w(), None, &[], good[..2].to_vec());
        assert_eq!(stage_update(&m, &missing, slot), Err(ValidationError::MissingTensor("n".into())));
        let x = TensorSpec::new("x", DType::F32, vec![1]);
        let extra =
            other(w(), Some("n"), &[x], vec![good[0].clone(), good[1].clone(), good[2].clone(), vec![1.0]]);
        // More tensors than the manifest: refused from the header's tensor count, before parsing.
        assert_eq!(
            stage_update(&m, &extra, slot),
            Err(ValidationError::TooManyTensors { declared: 4, max: 3 })
        );
        // Same count, one renamed: the renamed one is extra.
        let renamed = other(w(), Some("m"), &[], good.clone());
        assert_eq!(stage_update(&m, &renamed, slot), Err(ValidationError::MissingTensor("n".into())));

        // NaN and Inf in f32 and f16.
        let mut nan = good.clone();
        nan[0][4] = f64::NAN;
        let nan = encode_safetensors(&m, &nan).unwrap();
        assert_eq!(
            stage_update(&m, &nan, slot),
            Err(ValidationError::NonFinite { name: "w".into(), index: 4 })
        );
        let mut inf = good.clone();
        inf[1][1] = 1e9; // overflows f16 to +Inf
        let inf = encode_safetensors(&m, &inf).unwrap();
        assert_eq!(
            stage_update(&m, &inf, slot),
            Err(ValidationError::NonFinite { name: "b".into(), index: 1 })
        );

        // Wrong slot size is a typed error, not a panic.
        let mut small = vec![0u8; 8];
        assert!(matches!(stage_update(&m, &ok, &mut small), Err(ValidationError::SlotSize { .. })));
    }

    /// A safetensors payload from a raw JSON header and `data` zero bytes.
    fn raw_payload(header: &str, data: usize) -> Vec<u8> {
        let mut p = (header.len() as u64).to_le_bytes().to_vec();
        p.extend_from_slice(header.as_bytes());
        p.resize(p.len() + data, 0);
        p
    }

    #[test]
    fn header_offsets_near_usize_max_are_refused_before_the_parser() {
        let m = manifest();
        let mut slot = vec![0u64; m.slot_bytes() / 8];
        let slot = bytemuck::cast_slice_mut::<u64, u8>(&mut slot);
        // One tensor ending at usize::MAX: safetensors 0.4.5 then computes usize::MAX + 8 + the
        // header length, which panics with overflow checks on (and aborted the libFuzzer target).
        let one = raw_payload(
            r#"{"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#,
            0,
        );
        // Contiguous offsets that reach usize::MAX over two tensors.
        let two = raw_payload(
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"x":{"dtype":"U8","shape":[18446744073709551591],"data_offsets":[24,18446744073709551615]}}"#,
            24,
        );
        let refused =
            ValidationError::Malformed(format!("safetensors header holds an integer above {}", 1u64 << 62));
        for p in [one, two] {
            // The pre-check's own error: refused before the parser, not by catching its panic.
            assert_eq!(stage_update(&m, &p, slot), Err(refused.clone()));
        }
        // Digits inside strings (here after an escaped quote) are not integers: an update whose
        // metadata holds a long number is accepted.
        let p = Parameters::from_f64(Arc::clone(&m), &[vec![0.5; 6], vec![1.0; 3], vec![2.0]]).unwrap();
        let bytes = p.as_bytes();
        let views = m.tensors().iter().zip(m.slots()).map(|(t, s)| {
            let data = &bytes[s.byte_offset..s.byte_offset + s.byte_len];
            (
                t.name.as_str(),
                safetensors::tensor::TensorView::new(dtype_to_safetensors(t.dtype), t.shape.clone(), data)
                    .unwrap(),
            )
        });
        let meta =
            std::collections::HashMap::from([("id".to_owned(), "a\"184467440737095516150000".to_owned())]);
        let payload = safetensors::serialize(views, &Some(meta)).unwrap();
        let escaped = br#""a\"184467440737095516150000""#;
        assert!(payload.windows(escaped.len()).any(|w| w == escaped), "the metadata is JSON-escaped");
        assert_eq!(stage_update(&m, &payload, slot), Ok(()));
        assert_eq!(&slot[..24], &bytes[..24]);
    }

    fn raw(header: &str) -> Vec<u8> {
        let mut p = (header.len() as u64).to_le_bytes().to_vec();
        p.extend_from_slice(header.as_bytes());
        p
    }

    /// The tensor count is read from the header bytes alone: `__metadata__`, nested keys and
    /// quotes or braces inside names do not count; the scan stops at `stop`.
    #[test]
    fn header_tensor_count() {
        let h = r#"{"__metadata__":{"format":"pt","a":"b"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x\"{,":{"dtype":"F32","shape":[],"data_offsets":[8,12]}}"#;
        assert_eq!(count_header_tensors(&raw(h), usize::MAX), Ok(2));
        assert_eq!(count_header_tensors(&raw(h), 1), Ok(1));
        assert_eq!(count_header_tensors(&raw("{}"), 5), Ok(0));
        assert!(matches!(count_header_tensors(b"\x05\0\0", 5), Err(ValidationError::Malformed(_))));
        let mut short = raw(h);
        short.truncate(20);
        assert!(matches!(count_header_tensors(&short, 5), Err(ValidationError::Malformed(_))));
    }

    /// A header declaring more tensors than the manifest is refused before it is parsed, with
    /// the typed `TooManyTensors` (3 declared, 3 in the manifest + 1 = stop at 4).
    #[test]
    fn more_tensors_than_the_manifest_is_refused_before_parsing() {
        let m = manifest();
        let mut slot = vec![0u64; m.slot_bytes() / 8];
        let slot = bytemuck::cast_slice_mut::<u64, u8>(&mut slot);
        let mut entries: Vec<String> = (0..50_000)
            .map(|i| format!(r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#, i + 1))
            .collect();
        entries.insert(0, r#""__metadata__":{"x":"y"}"#.into());
        let p = raw(&format!("{{{}}}", entries.join(",")));
        assert_eq!(stage_update(&m, &p, slot), Err(ValidationError::TooManyTensors { declared: 4, max: 3 }));
    }
}
