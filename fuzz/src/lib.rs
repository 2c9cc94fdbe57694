//! The checks behind Shoal's fuzz targets, shared with the corpus replay test.
//!
//! Each `check_*` function feeds fuzzer-chosen bytes to one parser of hostile input (DESIGN.md
//! §6) and panics — a libFuzzer crash — when the parser panics or when an invariant of its
//! answer fails. The fuzz targets in `fuzz_targets/` call them; `runtime/tests/
//! fuzz_corpus_replay.rs` includes this file with `#[path]` and replays every committed corpus
//! file through the same functions, so `cargo test --workspace` runs exactly what libFuzzer ran.
//! [`seeds`] builds the valid inputs the corpora started from.
//!
//! - [`check_stage_update`]: safetensors update → `shoal_functions::tensor::stage_update` against
//!   [`update_manifest`] (f32, bf16, i64 tensors).
//! - [`check_control_messages`]: msgpack control messages → `shoal_proto::decode` as
//!   `JobState`, `RoundEvent`, `RejectNotice` and `JobSpec`; the same bytes as a JSON `JobSpec`
//!   (what `shoal job create` parses).
//! - [`check_segment_header`]: `SegmentHeader::decode` and `Segment::open_read_only` on a file
//!   holding the bytes.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use shoal_functions::factory;
use shoal_functions::server_opt::ServerOptimizerSpec;
use shoal_functions::spec::FedFixClient;
use shoal_functions::tensor::stage_update;
use shoal_functions::{
    ClientId, DType, JobId, JobSpec, ModelManifest, ModelVersion, Parameters, RoundId, RoundPolicy,
    StrategySpec, TensorSpec, UpdateKind, ValidationError,
};
use shoal_proto::JobPhase;
use shoal_proto::JobState;
use shoal_proto::RejectNotice;
use shoal_proto::RejectReason;
use shoal_proto::RoundEvent;
use shoal_proto::RoundOutcome;
use shoal_runtime::error::Error;
use shoal_runtime::staging::{Segment, SegmentHeader, DATA_OFFSET};

/// The fuzz targets; each is also its corpus directory under `fuzz/corpus/`.
pub const TARGETS: [&str; 3] = ["stage_update", "control_messages", "segment_header"];

/// Runs `target`'s check on `data`; returns whether the input was accepted (staged, decoded as
/// at least one message, or taken as a valid segment header).
///
/// # Panics
/// On an unknown target, and wherever the target's check fails.
pub fn check(target: &str, data: &[u8]) -> bool {
    match target {
        "stage_update" => check_stage_update(data),
        "control_messages" => check_control_messages(data) > 0,
        "segment_header" => check_segment_header(data),
        other => panic!("unknown fuzz target {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// stage_update

/// One tensor of the fuzzed manifest and where it must land in a slot. The offsets are derived
/// by hand (64-byte aligned, manifest order), not by the code under test.
struct Placement {
    name: &'static str,
    dtype: DType,
    shape: &'static [usize],
    offset: usize,
    len: usize,
}

const LAYOUT: [Placement; 3] = [
    Placement { name: "w", dtype: DType::F32, shape: &[2, 3], offset: 0, len: 24 },
    Placement { name: "b", dtype: DType::BF16, shape: &[3], offset: 64, len: 6 },
    Placement { name: "n", dtype: DType::I64, shape: &[], offset: 128, len: 8 },
];
const SLOT_BYTES: usize = 192;

/// The manifest updates are staged against: `w` f32 [2, 3], `b` bf16 [3], `n` i64 scalar.
///
/// # Panics
/// If the manifest's layout differs from the hand-derived one.
pub fn update_manifest() -> &'static Arc<ModelManifest> {
    static MANIFEST: OnceLock<Arc<ModelManifest>> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let tensors = LAYOUT.iter().map(|p| TensorSpec::new(p.name, p.dtype, p.shape.to_vec())).collect();
        let m = ModelManifest::new(tensors).expect("the fuzz manifest is valid");
        assert_eq!(m.slot_bytes(), SLOT_BYTES);
        for (p, s) in LAYOUT.iter().zip(m.slots()) {
            assert_eq!((s.byte_offset, s.byte_len), (p.offset, p.len), "layout of {}", p.name);
        }
        Arc::new(m)
    })
}

/// Index of the first NaN or ±Inf element of little-endian `data` (None for integer dtypes).
fn first_non_finite(dtype: DType, data: &[u8]) -> Option<usize> {
    match dtype {
        DType::F32 => {
            data.chunks_exact(4).position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        }
        // bf16 is the top half of an f32.
        DType::BF16 => data
            .chunks_exact(2)
            .position(|c| !f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16).is_finite()),
        _ => None,
    }
}

/// Stages `payload` into a slot pre-filled with garbage; an accepted update must be exactly the
/// payload's tensors at their canonical offsets, zero padding, finite floats, and re-encode to
/// itself; a rejection must be a typed client error consistent with the payload. Returns whether
/// the update was accepted.
///
/// # Panics
/// When `stage_update` panics or an invariant fails.
pub fn check_stage_update(payload: &[u8]) -> bool {
    let m = update_manifest();
    let mut slot = Parameters::zeros(Arc::clone(m));
    slot.as_bytes_mut().fill(0xA5);
    let result = stage_update(m, payload, slot.as_bytes_mut());
    let mut again = Parameters::zeros(Arc::clone(m));
    assert_eq!(stage_update(m, payload, again.as_bytes_mut()), result, "staging is deterministic");
    match result {
        Ok(()) => {
            check_accepted_update(m, payload, slot.as_bytes());
            true
        }
        Err(e) => {
            check_rejected_update(payload, &e);
            false
        }
    }
}

fn check_accepted_update(m: &Arc<ModelManifest>, payload: &[u8], slot: &[u8]) {
    assert_eq!(slot.len(), SLOT_BYTES);
    let st = safetensors::SafeTensors::deserialize(payload).expect("an accepted update is safetensors");
    assert_eq!(st.len(), LAYOUT.len(), "an accepted update holds exactly the manifest's tensors");
    let mut covered = vec![false; SLOT_BYTES];
    for p in &LAYOUT {
        let view = st.tensor(p.name).expect("an accepted update holds every manifest tensor");
        assert_eq!(
            shoal_functions::tensor::dtype_from_safetensors(view.dtype()),
            Some(p.dtype),
            "dtype of {}",
            p.name
        );
        assert_eq!(view.shape(), p.shape, "shape of {}", p.name);
        assert_eq!(view.data().len(), p.len, "byte length of {}", p.name);
        assert_eq!(&slot[p.offset..p.offset + p.len], view.data(), "{} staged at its offset", p.name);
        covered[p.offset..p.offset + p.len].fill(true);
        assert_eq!(first_non_finite(p.dtype, view.data()), None, "accepted {} is finite", p.name);
    }
    assert!(slot.iter().zip(&covered).all(|(&b, &c)| c || b == 0), "padding bytes are zeroed");
    // The canonical re-encoding of an accepted update is accepted and stages to the same bytes.
    let params = Parameters::from_safetensors(Arc::clone(m), payload).expect("from_safetensors agrees");
    assert_eq!(params.as_bytes(), slot);
    let re = params.to_safetensors().expect("an accepted update re-encodes");
    let mut slot2 = Parameters::zeros(Arc::clone(m));
    stage_update(m, &re, slot2.as_bytes_mut()).expect("the re-encoded update is accepted");
    assert_eq!(slot2.as_bytes(), slot, "re-encoding is lossless");
}

fn check_rejected_update(payload: &[u8], e: &ValidationError) {
    assert!(!matches!(e, ValidationError::SlotSize { .. }), "the slot has the manifest's size: {e}");
    let labels = [
        "malformed",
        "missing_tensor",
        "extra_tensor",
        "too_many_tensors",
        "dtype_mismatch",
        "shape_mismatch",
        "non_finite",
    ];
    assert!(labels.contains(&e.label()), "unexpected label {}", e.label());
    assert!(!e.to_string().is_empty());
    if let ValidationError::NonFinite { name, index } = e {
        // The element named is non-finite, the first such in its tensor, and every tensor
        // before it in manifest order is finite.
        let st = safetensors::SafeTensors::deserialize(payload).expect("non-finite is found after parsing");
        for p in &LAYOUT {
            let view = st.tensor(p.name).expect("non-finite is found after the schema check");
            let first = first_non_finite(p.dtype, view.data());
            if p.name == name {
                assert_eq!(first, Some(*index), "first non-finite element of {name}");
                return;
            }
            assert_eq!(first, None, "{} precedes {name} and is finite", p.name);
        }
        panic!("NonFinite names {name:?}, not a manifest tensor");
    }
}

// ---------------------------------------------------------------------------------------------
// control messages

/// Decodes `bytes` as every msgpack control message type and as a JSON job spec; each decoded
/// message must re-encode to a fixed point, and a spec's validation must not panic. Returns how
/// many decoders accepted the bytes.
///
/// # Panics
/// When a decoder panics or an invariant fails.
pub fn check_control_messages(bytes: &[u8]) -> usize {
    let mut accepted = 0;
    if let Some(s) = msgpack_round_trip::<JobState>("job state", bytes) {
        accepted += 1;
        let _ = s.is_open();
        assert!(!s.phase.to_string().is_empty());
        if let Some(o) = &s.last_outcome {
            assert!(!o.to_string().is_empty());
        }
    }
    if let Some(ev) = msgpack_round_trip::<RoundEvent>("round event", bytes) {
        accepted += 1;
        match &ev {
            RoundEvent::RoundOpened { job, .. } => assert!(!job.as_str().is_empty()),
            RoundEvent::RoundClosed { outcome, .. } => assert!(!outcome.to_string().is_empty()),
            RoundEvent::JobEnded { phase, .. } => assert!(!phase.to_string().is_empty()),
        }
    }
    if let Some(n) = msgpack_round_trip::<RejectNotice>("reject notice", bytes) {
        accepted += 1;
        assert!(RejectReason::ALL.contains(&n.reason));
        assert!(!n.reason.as_str().is_empty());
        assert!(!n.client.as_str().is_empty());
    }
    // The hierarchy's messages between nodes (DESIGN.md §7): progress, collection requests,
    // partial-aggregate and shard-exchange headers, shard plans, leases.
    accepted += usize::from(
        msgpack_round_trip::<shoal_proto::cluster::LeafProgress>("leaf progress", bytes).is_some(),
    );
    if let Some(r) = msgpack_round_trip::<shoal_proto::cluster::CollectRequest>("collect request", bytes) {
        accepted += 1;
        for n in &r.nodes {
            let _ = shoal_runtime::cluster::leaf::parent(n, &r);
        }
    }
    accepted +=
        usize::from(msgpack_round_trip::<shoal_proto::cluster::ShardPlan>("shard plan", bytes).is_some());
    accepted +=
        usize::from(msgpack_round_trip::<shoal_runtime::cluster::lease::Lease>("lease", bytes).is_some());
    // Framed messages: a header, then bulk bytes.
    if let Ok((h, raw)) =
        shoal_proto::envelope::unframe::<shoal_proto::cluster::PartialHeader>("partial aggregate", bytes)
    {
        accepted += 1;
        let _ = shoal_runtime::cluster::leaf::partial_from_wire(update_manifest(), &h, raw);
    }
    accepted += usize::from(
        shoal_proto::envelope::unframe::<shoal_proto::cluster::SliceHeader>("shard exchange", bytes).is_ok(),
    );
    // A spec as nodes read it from KV `shoal-jobs`.
    if let Some(spec) = msgpack_round_trip::<JobSpec>("job spec", bytes) {
        accepted += 1;
        exercise_spec(&spec);
    }
    // A spec as `shoal job create` reads it from a file: what the CLI parses, nodes read back
    // unchanged from KV, with the same verdict.
    if let Ok(spec) = serde_json::from_slice::<JobSpec>(bytes) {
        accepted += 1;
        let valid = exercise_spec(&spec);
        let stored = shoal_proto::encode(&spec);
        let back: JobSpec = shoal_proto::decode("job spec", &stored).expect("a parsed spec survives KV");
        assert_eq!(back, spec, "msgpack round trip of a JSON spec");
        assert_eq!(factory::validate(&back).is_ok(), valid);
        let json = serde_json::to_vec(&spec).expect("a spec serialises to JSON");
        let _: JobSpec = serde_json::from_slice(&json).expect("a serialised spec parses");
    }
    accepted
}

/// Decodes `bytes` as `T`; a decoded message re-encodes to bytes that decode and re-encode to
/// the same bytes (compared as bytes, so NaN fields do not matter).
fn msgpack_round_trip<T>(what: &'static str, bytes: &[u8]) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    match shoal_proto::decode::<T>(what, bytes) {
        Ok(v) => {
            let enc = shoal_proto::encode(&v);
            assert!(!enc.is_empty(), "{what} encodes");
            let again: T = shoal_proto::decode(what, &enc).expect("a re-encoded message decodes");
            assert_eq!(shoal_proto::encode(&again), enc, "{what}: encoding is a fixed point");
            Some(v)
        }
        Err(e) => {
            let e = Error::from(e);
            assert!(matches!(e, Error::Decode { .. }), "{what}: decode fails with Error::Decode, got {e}");
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

/// Validates a spec and builds its strategy, as job creation and the coordinator do. Returns
/// whether the spec is valid.
fn exercise_spec(spec: &JobSpec) -> bool {
    let valid = factory::validate(spec).is_ok();
    let built = factory::build_strategy(spec);
    if valid {
        assert!(built.is_ok(), "a valid spec builds its strategy");
        let m = &spec.manifest;
        assert!(m.slot_bytes() > 0 && m.slot_bytes().is_multiple_of(64));
        assert!(m.slot_bytes() <= shoal_functions::tensor::MAX_SLOT_BYTES);
    }
    let _ = spec.strategy.is_whole_cohort();
    valid
}

// ---------------------------------------------------------------------------------------------
// segment header

/// Largest file the segment check creates (sparse; the claimed length is capped to it).
const MAX_SEGMENT_FILE: u64 = 1 << 20;

/// `data` is an 8-byte little-endian claimed file length followed by the file's leading bytes.
/// `SegmentHeader::decode` must accept exactly the headers that re-encode to those bytes and
/// agree with the length; `Segment::open_read_only` on a file of those bytes (extended with zeros
/// or truncated to the claimed length, at most 1 MiB) must agree with `decode` and serve exactly
/// the slots the header declares. Returns whether the header decoded.
///
/// # Panics
/// When decoding or opening panics or an invariant fails.
pub fn check_segment_header(data: &[u8]) -> bool {
    let mut len_bytes = [0u8; 8];
    let n = data.len().min(8);
    len_bytes[..n].copy_from_slice(&data[..n]);
    let file_len = u64::from_le_bytes(len_bytes);
    let head = data.get(8..).unwrap_or(&[]);
    let enc_len = SegmentHeader::ENCODED_LEN;

    let decoded = SegmentHeader::decode(head, file_len).ok();
    if head.len() > enc_len {
        let prefix_only = SegmentHeader::decode(&head[..enc_len], file_len).ok();
        assert_eq!(prefix_only, decoded, "only the first {enc_len} bytes are the header");
    }
    if let Some(h) = decoded {
        assert_eq!(h.encode()[..], head[..enc_len], "a decoded header re-encodes to its bytes");
        assert_eq!(h.total_bytes, file_len);
        assert!(h.slot_bytes > 0 && h.slot_bytes.is_multiple_of(64) && h.slot_count > 0);
        let total = u128::from(h.slot_bytes) * u128::from(h.slot_count) + DATA_OFFSET as u128;
        assert_eq!(total, u128::from(h.total_bytes), "slots fill the file exactly");
    }

    // The same bytes as a segment file.
    let real_len = file_len.min(MAX_SEGMENT_FILE);
    let mut contents = head.to_vec();
    contents.resize(usize::try_from(real_len).expect("at most 1 MiB"), 0);
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(head).expect("write segment bytes");
    file.as_file().set_len(real_len).expect("size segment file");
    let expected = SegmentHeader::decode(&contents[..enc_len.min(contents.len())], real_len).ok();
    match Segment::open_read_only(file.path()) {
        Ok(seg) => {
            let h = seg.header();
            assert_eq!(Some(h), expected, "open_read_only agrees with decode");
            let sb = usize::try_from(h.slot_bytes).expect("slot fits in the file");
            let count = usize::try_from(h.slot_count).expect("slot count fits in the file");
            for i in [0, count / 2, count - 1] {
                let s = seg.slot(i).expect("a declared slot is readable");
                let at = DATA_OFFSET + i * sb;
                assert_eq!(s, &contents[at..at + sb], "slot {i} maps the file's bytes");
            }
            assert!(seg.slot(count).is_err(), "slot past the end is refused");
            assert!(seg.slot(usize::MAX).is_err(), "slot usize::MAX is refused");
        }
        Err(e) => {
            assert_eq!(expected, None, "open_read_only refused a valid segment: {e}");
            assert!(matches!(e, Error::Segment(_) | Error::Io { .. }), "typed error, got {e}");
        }
    }
    decoded.is_some()
}

// ---------------------------------------------------------------------------------------------
// seeds

/// A valid input for one target.
#[derive(Debug)]
pub struct Seed {
    /// The target (one of [`TARGETS`]).
    pub target: &'static str,
    /// File name in the corpus.
    pub name: String,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Whether the target accepts it.
    pub accepted: bool,
}

fn update_payload(w: &[f32], b: &[f32], n: i64, metadata: bool) -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let w: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    // bf16: the top half of the f32 (these seeds use values exact in bf16).
    let b: Vec<u8> = b.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
    let n = n.to_le_bytes();
    let views = vec![
        ("w", TensorView::new(Dtype::F32, vec![2, 3], &w).expect("w")),
        ("b", TensorView::new(Dtype::BF16, vec![3], &b).expect("b")),
        ("n", TensorView::new(Dtype::I64, vec![], &n).expect("n")),
    ];
    let info = metadata.then(|| std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]));
    safetensors::serialize(views, &info).expect("serialise update")
}

fn job_spec(strategy: StrategySpec, update_kind: UpdateKind, opt: Option<ServerOptimizerSpec>) -> JobSpec {
    JobSpec {
        job: JobId::new("mnist").expect("job id"),
        manifest: (**update_manifest()).clone(),
        strategy,
        round_policy: RoundPolicy::Sync { cohort_size: 8, min_clients: 7, deadline_ms: 30_000 },
        update_kind,
        rounds: 5,
        max_num_examples: 1_000_000,
        max_failed_rounds: 3,
        fan_in: 0,
        max_update_bytes: None,
        max_clients_per_round: None,
        inline_limit_bytes: None,
        chunk_bytes: None,
        upload_quota_bytes: None,
        server_optimizer: opt,
    }
}

/// Valid inputs for every target: real safetensors updates built with the `safetensors` crate,
/// real encoded control messages and job specs, real segment headers.
///
/// # Panics
/// Never for the fixed values used.
pub fn seeds() -> Vec<Seed> {
    let mut out = seeds_updates();
    out.extend(seeds_public_messages());
    out.extend(seeds_cluster_messages());
    out.extend(seeds_specs());
    out.extend(seeds_segments());
    out
}

/// Safetensors updates: valid ones, with metadata, with NaN and Inf.
fn seeds_updates() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>, accepted| {
        out.push(Seed { target, name: format!("seed-{name}"), bytes, accepted });
    };
    let w = [0.5, -1.25, 3.0, 0.0, 1e-3, 7.0];
    let b = [0.5, 1.0, -2.0];
    add("stage_update", "update", update_payload(&w, &b, 42, false), true);
    add("stage_update", "update-metadata", update_payload(&w, &b, -7, true), true);
    add(
        "stage_update",
        "update-nan",
        update_payload(&[0.0, 0.0, f32::NAN, 0.0, 0.0, 0.0], &b, 1, false),
        false,
    );
    add("stage_update", "update-inf-bf16", update_payload(&w, &[0.0, f32::INFINITY, 0.0], 1, false), false);
    let vals =
        vec![w.iter().map(|&v| f64::from(v)).collect(), b.iter().map(|&v| f64::from(v)).collect(), vec![3.0]];
    let enc = shoal_functions::tensor::encode_safetensors(update_manifest(), &vals).expect("encode");
    add("stage_update", "update-encoded", enc, true);
    out
}

/// Job states, round events and a rejection notice.
fn seeds_public_messages() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>, accepted| {
        out.push(Seed { target, name: format!("seed-{name}"), bytes, accepted });
    };
    let job = JobId::new("mnist").expect("job id");
    let client = ClientId::new("client-7").expect("client id");
    let state = JobState {
        phase: JobPhase::Running,
        round: RoundId(4),
        model_version: ModelVersion(3),
        opened_at_ms: 1_700_000_000_000,
        deadline_at_ms: 1_700_000_030_000,
        failed_rounds_in_a_row: 0,
        last_outcome: Some(RoundOutcome::Committed {
            version: ModelVersion(3),
            clients: 8,
            total_weight: 4096.0,
        }),
        last_commit: Some(shoal_proto::cluster::CommitRecord {
            round: RoundId(3),
            collect: shoal_proto::CollectId(0x1234_5678),
            nodes: vec![shoal_functions::NodeId::new("n1").expect("node id")],
            applied: vec![(40, 47), (52, 52)],
        }),
    };
    add("control_messages", "job-state-new", shoal_proto::encode(&JobState::new_job()), true);
    add("control_messages", "job-state-running", shoal_proto::encode(&state), true);
    let failed = JobState {
        phase: JobPhase::Failed { reason: "5 rounds in a row failed".into() },
        last_outcome: Some(RoundOutcome::QuorumNotMet { accepted: 2, min_clients: 7 }),
        ..state.clone()
    };
    add("control_messages", "job-state-failed", shoal_proto::encode(&failed), true);
    let events = [
        RoundEvent::RoundOpened {
            job: job.clone(),
            round: RoundId(4),
            base_version: ModelVersion(3),
            deadline_at_ms: 1_700_000_030_000,
        },
        RoundEvent::RoundClosed {
            job: job.clone(),
            round: RoundId(4),
            outcome: RoundOutcome::AggregationFailed {
                detail: "zero total weight".into(),
                kind: Some(shoal_functions::ErrorKind::ZeroTotalWeight),
            },
        },
        RoundEvent::JobEnded { job: job.clone(), phase: JobPhase::Finished },
    ];
    for (i, e) in events.iter().enumerate() {
        add("control_messages", &format!("round-event-{i}"), shoal_proto::encode(e), true);
    }
    let notice = RejectNotice {
        job: "mnist".into(),
        client: client.clone(),
        round: Some(RoundId(4)),
        reason: RejectReason::NonFinite,
        detail: "tensor \"w\" holds a non-finite value at element 2".into(),
    };
    add("control_messages", "reject-notice", shoal_proto::encode(&notice), true);
    out
}

/// Leaf progress, a collection, a shard plan, a lease, a framed partial and a slice.
fn seeds_cluster_messages() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>, accepted| {
        out.push(Seed { target, name: format!("seed-{name}"), bytes, accepted });
    };
    let client = ClientId::new("client-7").expect("client id");
    let n1 = shoal_functions::NodeId::new("n1").expect("node id");
    let n2 = shoal_functions::NodeId::new("n2").expect("node id");
    let progress = shoal_proto::cluster::LeafProgress { node: n1.clone(), round: RoundId(4), accepted: 17 };
    add("control_messages", "leaf-progress", shoal_proto::encode(&progress), true);
    let collect = shoal_proto::cluster::CollectRequest {
        round: RoundId(4),
        collect: shoal_proto::CollectId(99),
        top: n1.clone(),
        nodes: vec![n1.clone(), n2.clone()],
        fan_in: 2,
        conflicts: vec![41],
    };
    add("control_messages", "collect-request", shoal_proto::encode(&collect), true);
    let entry = shoal_proto::cluster::CohortEntry { client: client.clone(), weight: 12.0, node: n2.clone() };
    let plan = shoal_proto::cluster::ShardPlan {
        round: RoundId(4),
        exchange: shoal_proto::ExchangeId(7),
        top: n1.clone(),
        cohort: vec![entry.clone()],
        owners: vec![n1.clone(), n2.clone()],
        base_version: ModelVersion(3),
        step: shoal_proto::cluster::ShardStep::Select { selected: vec![0] },
    };
    add("control_messages", "shard-plan", shoal_proto::encode(&plan), true);
    let lease = shoal_runtime::cluster::lease::Lease {
        node: n2.clone(),
        instance: shoal_proto::InstanceId(5),
        renewed_ms: 1_700_000_000_000,
    };
    add("control_messages", "lease", shoal_proto::encode(&lease), true);
    let header = shoal_proto::cluster::PartialHeader {
        sender: n2.clone(),
        to: n1.clone(),
        to_middle: false,
        round: RoundId(4),
        collect: shoal_proto::CollectId(99),
        nodes: vec![n2.clone()],
        empty: false,
        total_weight: 12.0,
        count: 1,
        seqs: vec![41],
        clients: Vec::new(),
        first_owners: vec![None; update_manifest().tensors().len()],
        last_fold_ms: 1_700_000_000_000,
        object: None,
        cohort: vec![entry],
        instances: vec![shoal_proto::InstanceId(5)],
    };
    let values: Vec<f64> = (0..update_manifest().numel()).map(|i| i as f64 * 0.5).collect();
    let framed: Vec<u8> = shoal_proto::envelope::frame(
        &header,
        &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    );
    add("control_messages", "partial-aggregate", framed, true);
    let slice = shoal_proto::cluster::SliceHeader {
        exchange: shoal_proto::ExchangeId(7),
        shard: 1,
        client: Some(client.clone()),
        object: None,
    };
    add("control_messages", "shard-slice", shoal_proto::envelope::frame(&slice, &[0u8; 64]), true);
    out
}

/// Job specs of several strategies (msgpack, and one as JSON).
fn seeds_specs() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>, accepted| {
        out.push(Seed { target, name: format!("seed-{name}"), bytes, accepted });
    };
    let client = ClientId::new("client-7").expect("client id");
    let specs = [
        ("fedavg", job_spec(StrategySpec::default(), UpdateKind::Parameters, None)),
        (
            "fedavg-adam",
            job_spec(StrategySpec::default(), UpdateKind::Delta, Some(ServerOptimizerSpec::fedadam())),
        ),
        (
            "fedbuff",
            job_spec(StrategySpec::Fedbuff(shoal_proto::spec::FedBuffSpec::new(4)), UpdateKind::Delta, None),
        ),
        (
            "fedfix",
            job_spec(
                StrategySpec::Fedfix {
                    period_ticks: 10,
                    server_learning_rate: 1.0,
                    clients: vec![
                        FedFixClient { client: client.clone(), compute_ticks: 3, importance: None },
                        FedFixClient {
                            client: ClientId::new("client-8").expect("client id"),
                            compute_ticks: 12,
                            importance: None,
                        },
                    ],
                },
                UpdateKind::Delta,
                None,
            ),
        ),
        ("krum", job_spec(StrategySpec::Krum { byzantine: 2 }, UpdateKind::Parameters, None)),
        ("trimmed-mean", job_spec(StrategySpec::TrimmedMean { beta: 0.2 }, UpdateKind::Parameters, None)),
        (
            "rffl",
            job_spec(
                StrategySpec::Rffl {
                    gamma: 0.5,
                    alpha: 0.95,
                    rth: 1.0 / 3.0,
                    warmup_rounds: 10,
                    altruism_degree: None,
                    sparsify: true,
                    mode: Default::default(),
                },
                UpdateKind::Delta,
                None,
            ),
        ),
    ];
    for (name, spec) in &specs {
        assert!(factory::validate(spec).is_ok(), "seed spec {name} is valid: {:?}", factory::validate(spec));
        add("control_messages", &format!("job-spec-{name}"), shoal_proto::encode(spec), true);
    }
    let json = serde_json::to_vec_pretty(&specs[0].1).expect("spec to JSON");
    add("control_messages", "job-spec-fedavg.json", json, true);
    out
}

/// Segment headers of several geometries (file length first).
fn seeds_segments() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>, accepted| {
        out.push(Seed { target, name: format!("seed-{name}"), bytes, accepted });
    };
    for (slot_bytes, slot_count) in [(64u64, 2u64), (192, 64), (4096, 3)] {
        let total = DATA_OFFSET as u64 + slot_bytes * slot_count;
        let h = SegmentHeader { slot_bytes, slot_count, total_bytes: total };
        let mut bytes = total.to_le_bytes().to_vec();
        bytes.extend_from_slice(&h.encode());
        add("segment_header", &format!("header-{slot_bytes}x{slot_count}"), bytes, true);
    }
    out
}
