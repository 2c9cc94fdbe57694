//! Golden encodings of the wire contract (`proto/vectors/`, described in its README): every
//! vector is decoded and re-encoded byte for byte, and its bytes are compared with a JSON value
//! written by hand (messages) or from the user-facing input (job specs). Clients in other
//! languages test against the same files.
//!
//! `SHOAL_BLESS_VECTORS=1 cargo test -p shoal-proto --test vectors` writes the encodings of new vectors
//! (files that do not exist yet); existing files are never rewritten.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::cluster::Lease;
use shoal_proto::descriptor::SegmentHeader;
use shoal_proto::{envelope as protocol, JobSpec, JobState, RejectNotice, RoundEvent};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/vectors")
}

fn bless() -> bool {
    std::env::var_os("SHOAL_BLESS_VECTORS").is_some_and(|v| v == "1")
}

/// Reads `path`, or (blessing) writes `bytes` there first when it does not exist.
fn golden(path: &Path, bytes: &[u8]) -> Vec<u8> {
    if !path.exists() && bless() {
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e} (bless with SHOAL_BLESS_VECTORS=1)", path.display()))
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The message vector `name`: `<name>.json` is the envelope `{v, body}` as JSON (written by
/// hand); `<name>.msgpack` its bytes. Checks that the typed body encodes to exactly those bytes,
/// that the bytes decode to the same typed value, and that they hold exactly the JSON structure
/// (decoded without the Rust types).
fn check_message<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str) {
    let dir = vectors().join("messages");
    let value = json(&dir.join(format!("{name}.json")));
    assert_eq!(value["v"], serde_json::json!(protocol::PROTOCOL_VERSION), "{name}: envelope version");
    let typed: T = serde_json::from_value(value["body"].clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let encoded = protocol::encode(&typed);
    let bytes = golden(&dir.join(format!("{name}.msgpack")), &encoded);
    assert_eq!(encoded, bytes, "{name}: encoding changed");
    assert_eq!(protocol::decode::<T>(name_static(name), &bytes).unwrap(), typed, "{name}: decoding");
    let untyped: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(untyped, value, "{name}: the msgpack bytes hold another structure than the JSON");
}

fn name_static(name: &str) -> &'static str {
    Box::leak(name.to_owned().into_boxed_str())
}

#[test]
fn job_states_round_trip_byte_for_byte() {
    for name in ["job-state-new", "job-state-committed", "job-state-failed"] {
        check_message::<JobState>(name);
    }
}

#[test]
fn round_events_round_trip_byte_for_byte() {
    for name in [
        "round-opened",
        "round-closed-committed",
        "round-closed-quorum-not-met",
        "round-closed-aggregation-failed",
        "job-ended-finished",
        "job-ended-failed",
    ] {
        check_message::<RoundEvent>(name);
    }
}

#[test]
fn reject_notices_and_leases_round_trip_byte_for_byte() {
    check_message::<RejectNotice>("reject-notice");
    check_message::<RejectNotice>("reject-notice-no-round");
    check_message::<Lease>("lease");
}

/// Job specs: `<name>.input.json` is what a user writes (the README's example and one per
/// strategy); `<name>.msgpack` is the stored form (KV `<job>.spec`, in its envelope) and
/// `<name>.json` that stored form as JSON, defaults filled in.
#[test]
fn job_specs_parse_validate_and_encode_byte_for_byte() {
    let dir = vectors().join("specs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".input.json").map(str::to_owned))
        .collect();
    names.sort();
    assert!(names.len() >= 11, "expected the README job and one spec per strategy, found {names:?}");
    for name in names {
        let input = json(&dir.join(format!("{name}.input.json")));
        let spec: JobSpec = serde_json::from_value(input).unwrap_or_else(|e| panic!("{name}: {e}"));
        spec.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let encoded = protocol::encode(&spec);
        let bytes = golden(&dir.join(format!("{name}.msgpack")), &encoded);
        assert_eq!(encoded, bytes, "{name}: encoding changed");
        assert_eq!(protocol::decode::<JobSpec>("job spec", &bytes).unwrap(), spec, "{name}: decoding");
        let stored = serde_json::json!({"v": protocol::PROTOCOL_VERSION, "body": spec});
        let text = serde_json::to_string_pretty(&stored).unwrap() + "\n";
        let stored_path = dir.join(format!("{name}.json"));
        golden(&stored_path, text.as_bytes());
        let expected = json(&stored_path);
        let untyped: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(untyped, expected, "{name}: stored form");
    }
}

/// The shared-memory segment header: 40 little-endian bytes (magic `SHOALSEG`, layout version,
/// data offset, slot bytes, slot count, total bytes).
#[test]
fn segment_header_encodes_byte_for_byte() {
    let dir = vectors().join("binary");
    let value = json(&dir.join("segment-header.json"));
    let field = |k: &str| value[k].as_u64().unwrap();
    let header = SegmentHeader {
        slot_bytes: field("slot_bytes"),
        slot_count: field("slot_count"),
        total_bytes: field("total_bytes"),
    };
    let encoded = header.encode();
    let bytes = golden(&dir.join("segment-header.bin"), &encoded);
    assert_eq!(encoded.as_slice(), bytes.as_slice(), "segment header encoding changed");
    assert_eq!(&bytes[..8], b"SHOALSEG");
    assert_eq!(SegmentHeader::decode(&bytes, header.total_bytes).unwrap(), header);
}

/// The update descriptor and its slot-release reply: 208 little-endian bytes each (layout in
/// `shoal_proto::descriptor::UpdateDescriptor`).
#[test]
fn descriptors_encode_byte_for_byte() {
    use shoal_proto::descriptor::{DescriptorKind, SegmentId, UpdateDescriptor, DESCRIPTOR_LEN};
    use shoal_proto::{ClientId, FunctionId, JobId, RoundId, Staleness, UpdateKind};
    let dir = vectors().join("binary");
    for name in ["descriptor-update", "descriptor-release"] {
        let v = json(&dir.join(format!("{name}.json")));
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{name}: {k}"));
        let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{name}: {k}")).to_owned();
        let d = UpdateDescriptor {
            kind: match s("kind").as_str() {
                "update" => DescriptorKind::Update,
                _ => DescriptorKind::Release,
            },
            function: FunctionId(n("function") as u32),
            segment: SegmentId(n("segment") as u32),
            slot: n("slot") as u32,
            generation: n("generation") as u32,
            offset: n("offset"),
            length: n("length"),
            job: JobId::new(s("job")).unwrap(),
            round: RoundId(n("round")),
            client: ClientId::new(s("client")).unwrap(),
            num_examples: n("num_examples"),
            staleness: Staleness(n("staleness")),
            update_kind: UpdateKind::parse(&s("update_kind")).unwrap(),
            stream_seq: n("stream_seq"),
        };
        let encoded = d.encode();
        let bytes = golden(&dir.join(format!("{name}.bin")), &encoded);
        assert_eq!(bytes.len(), DESCRIPTOR_LEN);
        assert_eq!(encoded.as_slice(), bytes.as_slice(), "{name}: encoding changed");
        assert_eq!(UpdateDescriptor::decode(&bytes).unwrap(), d, "{name}: decoding");
        assert_eq!(&bytes[..4], b"SHDS");
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), n("num_examples"));
        assert_eq!(&bytes[73..78], b"mnist");
    }
}
