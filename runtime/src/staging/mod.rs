//! Shared-memory segments: the node's staging area for client updates (DESIGN.md §7).
//!
//! A segment is a file under `<shm-dir>/<node>/` (tmpfs `/dev/shm` by default), created `0600`
//! in a `0700` directory, mapped with `MAP_POPULATE` (a first touch of a fresh page runs at a
//! fraction of memory speed), starting with a validated header followed by fixed-size **slots**:
//! every update of a job has the same size (the manifest fixes dtypes and shapes), so a slot
//! allocator is a free list. Slots are leased by the gateway, written once, read in place by the
//! aggregator, and returned when dropped; segments persist across rounds, so a warm job stages
//! into already-populated pages and allocates nothing.
//!
//! All `unsafe` for memory maps in the runtime lives in this module.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

pub use shoal_proto::descriptor::{
    SegmentHeader, SegmentId, SEGMENT_DATA_OFFSET as DATA_OFFSET, SEGMENT_LAYOUT_VERSION as LAYOUT_VERSION,
    SEGMENT_MAGIC as MAGIC,
};

const HEADER_LEN: usize = SegmentHeader::ENCODED_LEN;

impl From<shoal_proto::descriptor::LayoutError> for Error {
    fn from(e: shoal_proto::descriptor::LayoutError) -> Self {
        Error::Shm(e.to_string())
    }
}

/// One mapped segment file.
#[derive(Debug)]
pub struct Segment {
    id: SegmentId,
    path: PathBuf,
    map: MmapRaw,
    header: SegmentHeader,
    owner: bool,
}

impl Segment {
    /// Creates (exclusively, mode 0600) and maps segment `id` of `slot_count` slots as file
    /// `name` in `dir`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be created, sized or mapped.
    pub fn create(
        dir: &Path,
        name: &str,
        id: SegmentId,
        slot_bytes: usize,
        slot_count: usize,
    ) -> Result<Segment> {
        let path = dir.join(name);
        let total = DATA_OFFSET + slot_bytes * slot_count;
        let header = SegmentHeader {
            slot_bytes: slot_bytes as u64,
            slot_count: slot_count as u64,
            total_bytes: total as u64,
        };
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("create segment {}", path.display()), e))?;
        file.set_len(total as u64).map_err(|e| Error::io(format!("size segment {}", path.display()), e))?;
        file.write_all(&header.encode()).map_err(|e| Error::io("write segment header", e))?;
        let map = MmapOptions::new()
            .populate()
            .map_raw(&file)
            .map_err(|e| Error::io(format!("map segment {}", path.display()), e))?;
        Ok(Segment { id, path, map, header, owner: true })
    }

    /// Maps an existing segment read-only after validating its header (how a function host in
    /// another process attaches to its gateway's segments).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be opened; [`Error::Shm`] if the header is invalid.
    pub fn open_read_only(path: &Path) -> Result<Segment> {
        let file =
            fs::File::open(path).map_err(|e| Error::io(format!("open segment {}", path.display()), e))?;
        let len = file.metadata().map_err(|e| Error::io("stat segment", e))?.len();
        let map = MmapOptions::new()
            .map_raw_read_only(&file)
            .map_err(|e| Error::io(format!("map segment {}", path.display()), e))?;
        // SAFETY: the mapping is `len` bytes long and lives as long as `map`; we only read it.
        let head = unsafe { std::slice::from_raw_parts(map.as_ptr(), HEADER_LEN.min(len as usize)) };
        let header = SegmentHeader::decode(head, len)?;
        // `<job>-<n>.seg`: the number after the last dash (0 for a file named otherwise).
        let id = path
            .file_stem()
            .and_then(|s| s.to_str()?.rsplit('-').next()?.parse().ok())
            .map_or(SegmentId(0), SegmentId);
        Ok(Segment { id, path: path.to_owned(), map, header, owner: false })
    }

    /// The segment's id.
    pub fn id(&self) -> SegmentId {
        self.id
    }

    /// The validated header.
    pub fn header(&self) -> SegmentHeader {
        self.header
    }

    /// Reads slot `index` (for read-only attachments).
    ///
    /// # Errors
    /// [`Error::Shm`] if `index` is out of range.
    pub fn slot(&self, index: usize) -> Result<&[u8]> {
        if index as u64 >= self.header.slot_count {
            return Err(Error::Shm(format!("slot {index} out of range")));
        }
        let sb = self.header.slot_bytes as usize;
        // SAFETY: in range (checked above, and the header was validated against the file length);
        // the mapping lives as long as `self`. Writers only write slots they hold a lease on,
        // and readers read a slot only after it was handed to them as staged.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(DATA_OFFSET + index * sb), sb) })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Prepares a node's shm directory: creates it with mode 0700 and removes segment files left by
/// a previous process of this node (their updates are redelivered by JetStream).
///
/// # Errors
/// [`Error::Io`] if the directory cannot be created or secured.
pub fn prepare_node_dir(root: &Path, node: &str) -> Result<PathBuf> {
    let dir = root.join(node);
    fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    for d in [root, dir.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod 0700 {}", d.display()), e))?;
    }
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "seg") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(dir)
}

#[derive(Debug)]
struct PoolState {
    segments: Vec<Arc<Segment>>,
    free: Vec<(usize, usize)>,
}

/// A growable pool of equal-size slots for one job on one node.
#[derive(Debug)]
pub struct SlotPool {
    dir: PathBuf,
    name: String,
    slot_bytes: usize,
    slots_per_segment: usize,
    max_segments: usize,
    state: Mutex<PoolState>,
    freed: tokio::sync::Notify,
}

impl SlotPool {
    /// A pool of `slot_bytes` slots, growing one segment at a time up to about `budget_bytes`
    /// (at least one segment).
    pub fn new(dir: PathBuf, name: String, slot_bytes: usize, budget_bytes: usize) -> Arc<SlotPool> {
        let slot_bytes = slot_bytes.max(64);
        let slots_per_segment = ((256usize << 20) / slot_bytes).clamp(1, 64);
        let max_segments = (budget_bytes / (slot_bytes * slots_per_segment)).max(1);
        Arc::new(SlotPool {
            dir,
            name,
            slot_bytes,
            slots_per_segment,
            max_segments,
            state: Mutex::new(PoolState { segments: Vec::new(), free: Vec::new() }),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Leases a free slot, creating a segment if none is free and the budget allows.
    /// Returns `None` when the pool is exhausted.
    ///
    /// # Errors
    /// [`Error::Io`] if a new segment cannot be created.
    pub fn try_alloc(self: &Arc<Self>) -> Result<Option<Slot>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.free.is_empty() && st.segments.len() < self.max_segments {
            let n = st.segments.len();
            let id = SegmentId(n as u32);
            let file = format!("{}-{n}.seg", self.name);
            let seg = Segment::create(&self.dir, &file, id, self.slot_bytes, self.slots_per_segment)?;
            st.segments.push(Arc::new(seg));
            st.free.extend((0..self.slots_per_segment).rev().map(|i| (n, i)));
        }
        Ok(st.free.pop().map(|(s, i)| Slot {
            pool: Arc::clone(self),
            segment: Arc::clone(&st.segments[s]),
            seg_index: s,
            index: i,
        }))
    }

    /// Leases a slot, waiting for one to be returned when the pool is exhausted (backpressure).
    ///
    /// # Errors
    /// As [`Self::try_alloc`].
    pub async fn alloc(self: &Arc<Self>) -> Result<Slot> {
        loop {
            let notified = self.freed.notified();
            if let Some(s) = self.try_alloc()? {
                return Ok(s);
            }
            notified.await;
        }
    }

    /// Slots currently free (for metrics and tests).
    pub fn free_slots(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).free.len()
    }

    /// Segments mapped.
    pub fn segments(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).segments.len()
    }
}

/// An exclusive lease on one slot. Dropping it returns the slot to its pool.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<SlotPool>,
    segment: Arc<Segment>,
    seg_index: usize,
    index: usize,
}

impl Slot {
    fn offset(&self) -> usize {
        DATA_OFFSET + self.index * self.pool.slot_bytes
    }

    /// The slot's bytes (64-byte aligned, `slot_bytes` long).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the slot lies inside the mapping (index < slots_per_segment, and the file was
        // sized for all of them); the mapping lives as long as `self.segment`; the free list
        // hands each (segment, slot) to one lease at a time, so no other reference aliases it.
        unsafe {
            std::slice::from_raw_parts(self.segment.map.as_ptr().add(self.offset()), self.pool.slot_bytes)
        }
    }

    /// The slot's bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only live reference to the slot.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.segment.map.as_mut_ptr().add(self.offset()),
                self.pool.slot_bytes,
            )
        }
    }

    /// The descriptor fields of this slot: segment, byte offset, length.
    pub fn location(&self) -> (SegmentId, usize, usize) {
        (self.segment.id(), self.offset(), self.pool.slot_bytes)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        st.free.push((self.seg_index, self.index));
        drop(st);
        self.pool.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_exclusive_and_recycled() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = prepare_node_dir(tmp.path(), "n1").unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let pool = SlotPool::new(dir.clone(), "job".into(), 128, 128 * 64);
        let mut a = pool.try_alloc().unwrap().unwrap();
        let mut b = pool.try_alloc().unwrap().unwrap();
        assert_eq!(a.bytes().as_ptr() as usize % 64, 0);
        a.bytes_mut().fill(1);
        b.bytes_mut().fill(2);
        assert!(a.bytes().iter().all(|&x| x == 1));
        assert_eq!(pool.segments(), 1);
        let seg_file = fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
        assert_eq!(fs::metadata(&seg_file).unwrap().permissions().mode() & 0o777, 0o600);
        let free = pool.free_slots();
        drop(a);
        assert_eq!(pool.free_slots(), free + 1);
        // Exhaustion: budget is one segment of 64 slots.
        let mut held = vec![b];
        while let Some(s) = pool.try_alloc().unwrap() {
            held.push(s);
        }
        assert_eq!(held.len(), 64);
        // A read-only attachment validates the header and sees the bytes.
        let ro = Segment::open_read_only(&seg_file).unwrap();
        assert_eq!(ro.header().slot_bytes, 128);
        drop(held);
        drop(pool);
        assert!(fs::read_dir(&dir).unwrap().next().is_none(), "segments unlinked with the pool");
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let good = SegmentHeader { slot_bytes: 64, slot_count: 2, total_bytes: (DATA_OFFSET + 128) as u64 };
        let enc = good.encode();
        assert_eq!(SegmentHeader::decode(&enc, good.total_bytes).unwrap(), good);
        let mut bad_magic = enc;
        bad_magic[0] = b'X';
        assert!(SegmentHeader::decode(&bad_magic, good.total_bytes).is_err());
        let mut bad_version = enc;
        bad_version[8] = 9;
        assert!(SegmentHeader::decode(&bad_version, good.total_bytes).is_err());
        assert!(SegmentHeader::decode(&enc, good.total_bytes + 1).is_err(), "file length disagrees");
        assert!(SegmentHeader::decode(&enc[..10], good.total_bytes).is_err());
        let mut odd_slot = enc;
        odd_slot[16] = 65;
        assert!(SegmentHeader::decode(&odd_slot, good.total_bytes).is_err());
        // A file with garbage is refused by open_read_only.
        let p = tmp.path().join("x.seg");
        fs::write(&p, vec![7u8; 8192]).unwrap();
        assert!(matches!(Segment::open_read_only(&p), Err(Error::Shm(_))));
        let empty = tmp.path().join("e.seg");
        fs::write(&empty, b"").unwrap();
        assert!(Segment::open_read_only(&empty).is_err());
    }
}
