//! Fixed-layout binary records shared by the processes of one node (DESIGN.md §7): the header
//! of a shared-memory segment, and the update descriptor a gateway sends a function host (and
//! the slot-release reply that returns the slot). Both are little-endian with a magic, a layout
//! version and explicit lengths, decoded with validation (never trusted), and have golden
//! vectors in `proto/vectors/binary/`.

use crate::ids::{ClientId, FunctionId, JobId, RoundId, Staleness};
use crate::spec::UpdateKind;

/// Why bytes are not a valid segment header or descriptor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} invalid: {detail}")]
pub struct LayoutError {
    /// Which record (`segment header`, `update descriptor`).
    pub what: &'static str,
    /// Which check failed.
    pub detail: String,
}

fn layout(what: &'static str, detail: impl Into<String>) -> LayoutError {
    LayoutError { what, detail: detail.into() }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SHOALSEG";
/// Version of the segment layout.
pub const SEGMENT_LAYOUT_VERSION: u32 = 1;
/// Bytes before the first slot (one page; slots stay 64-byte aligned).
pub const SEGMENT_DATA_OFFSET: usize = 4096;

/// Identifies a segment file among a node's segments of one job (numbered by the gateway that
/// created it; the file is [`segment_file_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u32);

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The file name of segment `segment` of `job` in a node's shm directory: `<job>-<segment>.seg`.
pub fn segment_file_name(job: &JobId, segment: SegmentId) -> String {
    format!("{job}-{segment}.seg")
}

/// The fixed header of a segment: 40 bytes, little-endian — magic `SHOALSEG`, layout version
/// (u32), data offset (u32), slot bytes (u64), slot count (u64), total bytes (u64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Bytes per slot (multiple of 64).
    pub slot_bytes: u64,
    /// Number of slots.
    pub slot_count: u64,
    /// Total file length.
    pub total_bytes: u64,
}

impl SegmentHeader {
    /// Length of the encoded header in bytes.
    pub const ENCODED_LEN: usize = 40;

    /// The on-disk form of the header: the first [`SegmentHeader::ENCODED_LEN`] bytes of a
    /// segment file. For a valid header, [`SegmentHeader::decode`] of these bytes against a file
    /// of `total_bytes` bytes gives `self` back.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut h = [0u8; Self::ENCODED_LEN];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..12].copy_from_slice(&SEGMENT_LAYOUT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(SEGMENT_DATA_OFFSET as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.slot_bytes.to_le_bytes());
        h[24..32].copy_from_slice(&self.slot_count.to_le_bytes());
        h[32..40].copy_from_slice(&self.total_bytes.to_le_bytes());
        h
    }

    /// Parses and validates a header against the file's actual length.
    ///
    /// # Errors
    /// [`LayoutError`] for a wrong magic, layout version or data offset, a slot size that is
    /// not a positive multiple of 64, or lengths that disagree with each other or the file.
    pub fn decode(bytes: &[u8], file_len: u64) -> Result<SegmentHeader, LayoutError> {
        let bad = |what: &str| layout("segment header", what);
        if bytes.len() < Self::ENCODED_LEN {
            return Err(bad("too short"));
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(bad("magic"));
        }
        if u32_at(bytes, 8) != SEGMENT_LAYOUT_VERSION {
            return Err(bad("layout version"));
        }
        if u32_at(bytes, 12) as usize != SEGMENT_DATA_OFFSET {
            return Err(bad("data offset"));
        }
        let h = SegmentHeader {
            slot_bytes: u64_at(bytes, 16),
            slot_count: u64_at(bytes, 24),
            total_bytes: u64_at(bytes, 32),
        };
        if h.slot_bytes == 0 || !h.slot_bytes.is_multiple_of(64) || h.slot_count == 0 {
            return Err(bad("slot geometry"));
        }
        let expected = h
            .slot_bytes
            .checked_mul(h.slot_count)
            .and_then(|b| b.checked_add(SEGMENT_DATA_OFFSET as u64))
            .ok_or_else(|| bad("length overflow"))?;
        if expected != h.total_bytes || h.total_bytes != file_len {
            return Err(bad("length"));
        }
        Ok(h)
    }
}

/// Magic bytes of a descriptor record.
pub const DESCRIPTOR_MAGIC: [u8; 4] = *b"SHDS";
/// Version of the descriptor layout.
pub const DESCRIPTOR_VERSION: u16 = 1;
/// Bytes of every descriptor record, whatever its kind (so a stream of them needs no framing).
pub const DESCRIPTOR_LEN: usize = 208;
/// Bytes reserved for an id inside a descriptor (ids are at most 64 bytes).
const ID_FIELD: usize = 64;

/// What a descriptor record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescriptorKind {
    /// Gateway → function host: an update staged in `(segment, slot)`; fold it.
    Update,
    /// Function host → gateway: the host is done with the slot (folded, or handed back); the
    /// gateway may reuse it.
    Release,
}

impl DescriptorKind {
    fn code(self) -> u8 {
        match self {
            DescriptorKind::Update => 1,
            DescriptorKind::Release => 2,
        }
    }

    fn from_code(c: u8) -> Option<DescriptorKind> {
        match c {
            1 => Some(DescriptorKind::Update),
            2 => Some(DescriptorKind::Release),
            _ => None,
        }
    }
}

/// An update descriptor (or, with [`DescriptorKind::Release`], its slot-release reply): where
/// a staged update lies and what it is. [`DESCRIPTOR_LEN`] bytes, little-endian:
///
/// | offset | bytes | field |
/// |---|---|---|
/// | 0 | 4 | magic `SHDS` |
/// | 4 | 2 | layout version (1) |
/// | 6 | 1 | kind: 1 update, 2 release |
/// | 7 | 1 | update kind: 0 parameters, 1 delta |
/// | 8 | 4 | function id |
/// | 12 | 4 | segment id |
/// | 16 | 4 | slot index |
/// | 20 | 4 | slot generation |
/// | 24 | 8 | byte offset of the slot in the segment file |
/// | 32 | 8 | byte length of the slot |
/// | 40 | 8 | round |
/// | 48 | 8 | `num_examples` |
/// | 56 | 8 | staleness |
/// | 64 | 8 | JetStream stream sequence of the update message |
/// | 72 | 1 + 64 | job id: length, then bytes zero-padded |
/// | 137 | 1 + 64 | client id: length, then bytes zero-padded |
/// | 202 | 6 | zero |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateDescriptor {
    /// Update or release.
    pub kind: DescriptorKind,
    /// The function host it is for (or from).
    pub function: FunctionId,
    /// The segment holding the slot.
    pub segment: SegmentId,
    /// The slot's index in the segment.
    pub slot: u32,
    /// The slot's lease generation: a descriptor of an earlier lease of the slot is stale.
    pub generation: u32,
    /// Byte offset of the slot in the segment file.
    pub offset: u64,
    /// Byte length of the slot.
    pub length: u64,
    /// Job.
    pub job: JobId,
    /// The round the update is folded into.
    pub round: RoundId,
    /// Sender.
    pub client: ClientId,
    /// The update's `num_examples` (not its strategy weight).
    pub num_examples: u64,
    /// Model versions between the update's base and the current model.
    pub staleness: Staleness,
    /// What its tensors hold.
    pub update_kind: UpdateKind,
    /// Its message's stream sequence.
    pub stream_seq: u64,
}

impl UpdateDescriptor {
    /// The [`DESCRIPTOR_LEN`]-byte record.
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..4].copy_from_slice(&DESCRIPTOR_MAGIC);
        b[4..6].copy_from_slice(&DESCRIPTOR_VERSION.to_le_bytes());
        b[6] = self.kind.code();
        b[7] = match self.update_kind {
            UpdateKind::Parameters => 0,
            UpdateKind::Delta => 1,
        };
        b[8..12].copy_from_slice(&self.function.0.to_le_bytes());
        b[12..16].copy_from_slice(&self.segment.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.slot.to_le_bytes());
        b[20..24].copy_from_slice(&self.generation.to_le_bytes());
        for (o, v) in [
            (24, self.offset),
            (32, self.length),
            (40, self.round.0),
            (48, self.num_examples),
            (56, self.staleness.0),
            (64, self.stream_seq),
        ] {
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        put_id(&mut b[72..72 + 1 + ID_FIELD], self.job.as_str());
        put_id(&mut b[137..137 + 1 + ID_FIELD], self.client.as_str());
        b
    }

    /// Parses and validates a record.
    ///
    /// # Errors
    /// [`LayoutError`] for a wrong length, magic, version or kind, an id that is not a valid
    /// id, or non-zero padding.
    pub fn decode(b: &[u8]) -> Result<UpdateDescriptor, LayoutError> {
        let bad = |d: &str| layout("update descriptor", d);
        if b.len() != DESCRIPTOR_LEN {
            return Err(bad(&format!("{} bytes, not {DESCRIPTOR_LEN}", b.len())));
        }
        if b[0..4] != DESCRIPTOR_MAGIC {
            return Err(bad("magic"));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != DESCRIPTOR_VERSION {
            return Err(bad(&format!("layout version {version}, this process speaks {DESCRIPTOR_VERSION}")));
        }
        let kind = DescriptorKind::from_code(b[6]).ok_or_else(|| bad("kind"))?;
        let update_kind = match b[7] {
            0 => UpdateKind::Parameters,
            1 => UpdateKind::Delta,
            _ => return Err(bad("update kind")),
        };
        if b[202..].iter().any(|&x| x != 0) {
            return Err(bad("padding"));
        }
        let job = get_id(&b[72..72 + 1 + ID_FIELD])
            .and_then(|s| JobId::new(s).ok())
            .ok_or_else(|| bad("job id"))?;
        let client = get_id(&b[137..137 + 1 + ID_FIELD])
            .and_then(|s| ClientId::new(s).ok())
            .ok_or_else(|| bad("client id"))?;
        Ok(UpdateDescriptor {
            kind,
            function: FunctionId(u32_at(b, 8)),
            segment: SegmentId(u32_at(b, 12)),
            slot: u32_at(b, 16),
            generation: u32_at(b, 20),
            offset: u64_at(b, 24),
            length: u64_at(b, 32),
            job,
            round: RoundId(u64_at(b, 40)),
            client,
            num_examples: u64_at(b, 48),
            staleness: Staleness(u64_at(b, 56)),
            update_kind,
            stream_seq: u64_at(b, 64),
        })
    }

    /// The release reply to this descriptor (same slot, generation and update).
    pub fn release(&self) -> UpdateDescriptor {
        UpdateDescriptor { kind: DescriptorKind::Release, ..self.clone() }
    }
}

fn put_id(field: &mut [u8], id: &str) {
    let n = id.len().min(ID_FIELD);
    field[0] = n as u8;
    field[1..1 + n].copy_from_slice(&id.as_bytes()[..n]);
}

fn get_id(field: &[u8]) -> Option<&str> {
    let n = field[0] as usize;
    if n == 0 || n > ID_FIELD || field[1 + n..].iter().any(|&x| x != 0) {
        return None;
    }
    std::str::from_utf8(&field[1..1 + n]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> UpdateDescriptor {
        UpdateDescriptor {
            kind: DescriptorKind::Update,
            function: FunctionId(3),
            segment: SegmentId(1),
            slot: 17,
            generation: 9,
            offset: 4096 + 17 * 1024,
            length: 1024,
            job: JobId::new("mnist").unwrap(),
            round: RoundId(12),
            client: ClientId::new("c-07").unwrap(),
            num_examples: 600,
            staleness: Staleness(2),
            update_kind: UpdateKind::Delta,
            stream_seq: 123_456,
        }
    }

    #[test]
    fn descriptors_round_trip_and_refuse_garbage() {
        let d = sample();
        let b = d.encode();
        assert_eq!(UpdateDescriptor::decode(&b).unwrap(), d);
        assert_eq!(UpdateDescriptor::decode(&d.release().encode()).unwrap().kind, DescriptorKind::Release);
        assert!(UpdateDescriptor::decode(&b[..207]).is_err(), "truncated");
        let mut v2 = b;
        v2[4] = 2;
        assert!(UpdateDescriptor::decode(&v2).unwrap_err().detail.contains("version 2"));
        let mut bad_id = b;
        bad_id[73] = b'.';
        assert!(UpdateDescriptor::decode(&bad_id).is_err(), "a job id with a dot");
        let mut pad = b;
        pad[207] = 1;
        assert!(UpdateDescriptor::decode(&pad).is_err());
        let max = UpdateDescriptor { client: ClientId::new("x".repeat(64)).unwrap(), ..d };
        assert_eq!(UpdateDescriptor::decode(&max.encode()).unwrap(), max);
    }

    proptest! {
        /// No input of any length panics the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = UpdateDescriptor::decode(&bytes);
            let _ = SegmentHeader::decode(&bytes, bytes.len() as u64);
        }
    }
}
