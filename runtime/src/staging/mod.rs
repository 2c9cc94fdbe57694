//! Shared-memory segments: the node's staging area for client updates (DESIGN.md §7).
//!
//! A segment is a file under `<shm-dir>/<node>/` (tmpfs `/dev/shm` by default), created `0600`
//! in a `0700` directory, starting with a validated header followed by fixed-size **slots**:
//! every update of a job has the same size (the manifest fixes dtypes and shapes), so a slot
//! allocator is a free list. Slots are leased by the gateway, written once, read in place by the
//! aggregator, and returned when dropped; segments persist across rounds.
//!
//! Memory: a node's resident memory must stay O(model), not O(slots) (`shoal bench memory`).
//! Free slots are kept resident ("warm": a first touch of a fresh page runs at a fraction of
//! memory speed) only up to [`WARM_FREE_BYTES`] per pool; past that a returned slot's pages are
//! given back to the kernel (`MADV_REMOVE` on the tmpfs mapping), so a pool of 64 MB slots holds
//! only the slots in use, and a pool of small slots stays warm. A segment is pre-faulted
//! (`MAP_POPULATE`) only when it fits within that warm allowance.
//!
//! All `unsafe` for memory maps in the runtime lives in this module.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

pub mod stream;

use crate::error::{Error, Result};

pub use shoal_proto::descriptor::{
    SegmentHeader, SegmentId, SEGMENT_DATA_OFFSET as DATA_OFFSET, SEGMENT_LAYOUT_VERSION as LAYOUT_VERSION,
    SEGMENT_MAGIC as MAGIC,
};

const HEADER_LEN: usize = SegmentHeader::ENCODED_LEN;

/// Tunes glibc's allocator for a node process (call before any thread starts): at most one
/// malloc arena per core (glibc's default, eight per core, keeps freed chunk buffers in many
/// arenas at once), and a fixed mmap threshold of 1 MiB, so a freed buffer of an update's chunk
/// size goes back to the kernel instead of raising the threshold and staying in the heap. The
/// node's memory stays the accumulator plus a few chunks (`shoal bench memory`: 8 × 64 MiB in
/// a debug build, 3.01 → 2.82 × the model). A no-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, usize::from).max(2);
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: `mallopt` only sets allocator parameters; it is called before the runtime
        // starts its threads and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Where the slot generations start in a segment's header page: one little-endian `u32` per
/// slot, written by the gateway when it leases the slot. A function host in another process
/// reads it to refuse a descriptor of an earlier lease of the slot.
pub const GENERATIONS_OFFSET: usize = 64;
/// Most slots a segment holds (the generations fit the header page).
pub const MAX_SLOTS_PER_SEGMENT: usize = (DATA_OFFSET - GENERATIONS_OFFSET) / 4;

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
        if slot_count == 0 || slot_count > MAX_SLOTS_PER_SEGMENT {
            return Err(Error::SlotOutOfRange { index: slot_count, slots: MAX_SLOTS_PER_SEGMENT as u64 });
        }
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
        let mut options = MmapOptions::new();
        if total <= WARM_FREE_BYTES {
            options.populate();
        }
        let map =
            options.map_raw(&file).map_err(|e| Error::io(format!("map segment {}", path.display()), e))?;
        Ok(Segment { id, path, map, header, owner: true })
    }

    /// Maps an existing segment read-only after validating its header (how a function host in
    /// another process attaches to its gateway's segments).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be opened; [`Error::Segment`] if the header is invalid.
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
        // `<job>-<segment id>.seg` ([`shoal_proto::descriptor::segment_file_name`]): the number after the last dash (0
        // for a file named otherwise).
        let id = path
            .file_stem()
            .and_then(|s| s.to_str()?.rsplit('-').next()?.parse().ok())
            .map_or(SegmentId(0), SegmentId);
        Ok(Segment { id, path: path.to_owned(), map, header, owner: false })
    }

    /// Gives the pages of bytes `[offset, offset + len)` back to the kernel (`MADV_REMOVE`: the
    /// tmpfs file's backing pages are freed; the range reads as zeros afterwards). Only whole
    /// pages inside the range are removed. Best effort: an error leaves the pages resident.
    fn release_pages(&self, offset: usize, len: usize) {
        const PAGE: usize = 4096;
        let start = offset.next_multiple_of(PAGE);
        let end = (offset + len) / PAGE * PAGE;
        if !self.owner || end <= start || end > self.map.len() {
            return;
        }
        // SAFETY: `[start, end)` lies inside this mapping (checked above) and is page aligned
        // (the mapping itself is). MADV_REMOVE changes no mapping, only the file's backing
        // pages; the caller holds the only lease of the slot, so no one reads these bytes.
        let rc =
            unsafe { libc::madvise(self.map.as_mut_ptr().add(start).cast(), end - start, libc::MADV_REMOVE) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_REMOVE on a returned slot failed");
        }
    }

    /// The segment's id.
    pub fn id(&self) -> SegmentId {
        self.id
    }

    /// The validated header.
    pub fn header(&self) -> SegmentHeader {
        self.header
    }

    /// The generation the gateway last wrote for slot `index`.
    ///
    /// # Errors
    /// [`Error::SlotOutOfRange`] if `index` is out of range.
    pub fn generation(&self, index: usize) -> Result<u32> {
        if index as u64 >= self.header.slot_count {
            return Err(Error::SlotOutOfRange { index, slots: self.header.slot_count });
        }
        // SAFETY: the header page (4096 bytes) is inside every mapping whose header validated,
        // and `index < slot_count <= MAX_SLOTS_PER_SEGMENT` keeps the aligned `u32` inside it.
        // An atomic load: the gateway's process may write it concurrently.
        let v = unsafe {
            let p =
                self.map.as_ptr().add(GENERATIONS_OFFSET + index * 4) as *const std::sync::atomic::AtomicU32;
            (*p).load(std::sync::atomic::Ordering::Acquire)
        };
        Ok(u32::from_le(v))
    }

    fn set_generation(&self, index: usize, generation: u32) {
        debug_assert!(self.owner && index < self.header.slot_count as usize);
        // SAFETY: as in `generation`; only the owning (gateway) process writes, through this
        // atomic store, while a reader may load concurrently.
        unsafe {
            let p = self.map.as_mut_ptr().add(GENERATIONS_OFFSET + index * 4)
                as *const std::sync::atomic::AtomicU32;
            (*p).store(generation.to_le(), std::sync::atomic::Ordering::Release);
        }
    }

    /// A read-only view of slot `index` if its current generation is `generation` (how a
    /// function host in another process reads what a descriptor points at).
    ///
    /// # Errors
    /// [`Error::SlotOutOfRange`] for an index past the segment; [`Error::StaleSlot`] when the
    /// slot was leased again since the descriptor was sent.
    pub fn view(self: &Arc<Self>, index: usize, generation: u32) -> Result<SlotView> {
        let now = self.generation(index)?;
        if now != generation {
            return Err(Error::StaleSlot { index, generation, current: now });
        }
        Ok(SlotView { inner: ViewOf::Mapped(Arc::clone(self), index), generation, guard: None })
    }

    /// Reads slot `index` (for read-only attachments).
    ///
    /// # Errors
    /// [`Error::SlotOutOfRange`] if `index` is out of range.
    pub fn slot(&self, index: usize) -> Result<&[u8]> {
        if index as u64 >= self.header.slot_count {
            return Err(Error::SlotOutOfRange { index, slots: self.header.slot_count });
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

/// Exit code of a process stopped by [`install_sigbus_guard`] (sysexits' `EX_IOERR`).
pub const SIGBUS_EXIT_CODE: i32 = 74;

/// Turns a `SIGBUS` into a logged exit with [`SIGBUS_EXIT_CODE`] instead of a crash with no
/// word of why. A mapped segment raises `SIGBUS` when its file was truncated under the process
/// (someone wrote into the shm directory) or its tmpfs ran out of space (`/dev/shm` smaller than
/// `--shm-budget-mib`); no memory access can continue after it. The process ends at once (the
/// handler only writes its message to stderr and calls `_exit`); the updates it held are not
/// acked, so JetStream delivers them again to the node's next process or another node.
///
/// Process-wide: call it once from a binary, never from a library used by others.
///
/// # Errors
/// [`Error::Io`] if `sigaction(2)` fails.
pub fn install_sigbus_guard() -> Result<()> {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"shoal: SIGBUS: a shared-memory segment of this process was truncated, or the \
tmpfs holding it is full. Check that nothing else writes in --shm-dir and that the tmpfs (e.g. /dev/shm) \
is larger than --shm-budget-mib. Exiting; the updates held here are delivered again by JetStream.\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
        #[allow(unsafe_code)]
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(SIGBUS_EXIT_CODE);
        }
    }
    // SAFETY: a zeroed sigaction is a valid value (no flags, empty mask, set below); the
    // handler is an `extern "C" fn(c_int)` as sa_handler expects without SA_SIGINFO; sigaction
    // reads the struct we own and writes nothing back (null old action).
    #[allow(unsafe_code)]
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::io("install the SIGBUS handler", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Prepares a node's shm directory `<root>/<node>`: creates what is missing with mode 0700,
/// refuses an existing directory it should not use, and removes segment files left by a
/// previous process of this node (their updates are redelivered by JetStream).
///
/// Nothing is ever chmod-ed: an existing directory must already be owned by this process's
/// effective user and not writable by group or others (`--shm-dir /dev/shm` itself, mode 1777,
/// is refused, as is a symlink), since anyone who can write there can replace or remove a
/// segment under the node. Segment files are created 0600 (readable by this user only).
///
/// # Errors
/// [`Error::Io`] if a directory cannot be created, or exists but is a symlink, is not a
/// directory, is owned by another user, or is writable by group or others (the message names the
/// directory and the fix).
pub fn prepare_node_dir(root: &Path, node: &str) -> Result<PathBuf> {
    let dir = root.join(node);
    for d in [root, dir.as_path()] {
        ensure_private_dir(d)?;
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

/// Creates `d` with mode 0700 (parents as needed, with the default mode), or checks that the
/// existing `d` is a directory owned by this user and not writable by group or others.
fn ensure_private_dir(d: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |why: String| {
        Err(Error::io(
            format!("shared-memory directory {}", d.display()),
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        ))
    };
    match fs::symlink_metadata(d) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = d.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
            }
            match fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => {}
                // Created by a concurrent process meanwhile: checked below like any other.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return ensure_private_dir(d),
                Err(e) => return Err(Error::io(format!("create {}", d.display()), e)),
            }
            // The umask may have cleared bits but never adds any: 0700 or less. Check anyway.
            ensure_private_dir(d)
        }
        Err(e) => Err(Error::io(format!("inspect {}", d.display()), e)),
        Ok(m) if m.file_type().is_symlink() => refuse("is a symlink; give --shm-dir a real directory".into()),
        Ok(m) if !m.is_dir() => refuse("is not a directory".into()),
        Ok(m) => {
            // SAFETY: geteuid(2) has no preconditions and touches no memory.
            #[allow(unsafe_code)]
            let me = unsafe { libc::geteuid() };
            if m.uid() != me {
                return refuse(format!(
                    "is owned by uid {}, not by this process's uid {me}; use a directory of your own \
                     (e.g. --shm-dir /dev/shm/shoal-$USER)",
                    m.uid()
                ));
            }
            if m.mode() & 0o022 != 0 {
                return refuse(format!(
                    "has mode {:o}, writable by group or others (anyone who can write there can replace \
                     or remove a segment under the node); use a directory with mode 0700 or 0755 — Shoal \
                     does not chmod directories it did not create",
                    m.mode() & 0o7777
                ));
            }
            Ok(())
        }
    }
}

#[derive(Debug)]
struct PoolState {
    segments: Vec<Arc<Segment>>,
    /// Free slots, (segment, slot); the last is leased next, so a warm slot is reused first.
    free: Vec<(usize, usize)>,
    /// The last generation of each slot, per segment.
    generations: Vec<Vec<u32>>,
    /// Whether each slot's pages may be resident (written since they were last removed), per
    /// segment.
    resident: Vec<Vec<bool>>,
    /// Bytes of free slots kept resident (at most [`WARM_FREE_BYTES`]).
    warm_free: usize,
}

/// Bytes of free slots a pool keeps resident for the next updates (see the module doc): above
/// this, a returned slot's pages are removed. 32 MiB keeps small models' pools warm and keeps a
/// large model's node at the accumulator plus the slots in use.
pub const WARM_FREE_BYTES: usize = 32 << 20;

/// Slots per segment are chosen so that a segment holds about this many bytes (between 1 and 64
/// slots): segments are created one at a time as a job's rounds need them.
pub const SEGMENT_TARGET_BYTES: usize = 256 << 20;

/// How a job's slots are laid out in segments within a node's shared-memory budget
/// (`--shm-budget-mib`). The budget is a real cap: every byte mapped counts, header pages
/// included, and the last segment is smaller when the budget ends part-way through one. So a
/// 1 GiB budget holds 23 slots of 45 MB (four segments of 5 and one of 3), not 20, and a 1 MiB
/// budget holds no slot of a 4 MiB model (nothing is mapped: the job is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLayout {
    /// Bytes per slot (at least 64).
    pub slot_bytes: usize,
    /// Slots in every segment but the last.
    pub slots_per_segment: usize,
    /// Slots in all: what the budget holds.
    pub capacity: usize,
    /// The budget, bytes.
    pub budget_bytes: usize,
}

impl PoolLayout {
    /// The layout of `slot_bytes` slots within `budget_bytes`.
    pub fn new(slot_bytes: usize, budget_bytes: usize) -> PoolLayout {
        let slot_bytes = slot_bytes.max(64);
        let slots_per_segment = (SEGMENT_TARGET_BYTES / slot_bytes).clamp(1, 64).min(MAX_SLOTS_PER_SEGMENT);
        let full = DATA_OFFSET.saturating_add(slots_per_segment.saturating_mul(slot_bytes));
        let full_segments = budget_bytes / full;
        let rest = budget_bytes - full_segments * full;
        let tail = rest.saturating_sub(DATA_OFFSET) / slot_bytes;
        PoolLayout {
            slot_bytes,
            slots_per_segment,
            capacity: full_segments.saturating_mul(slots_per_segment).saturating_add(tail),
            budget_bytes,
        }
    }

    /// Slots of segment `n` (from 0); 0 past the last segment.
    pub fn segment_slots(&self, n: usize) -> usize {
        self.capacity.saturating_sub(n.saturating_mul(self.slots_per_segment)).min(self.slots_per_segment)
    }

    /// Bytes mapped once every segment exists (at most the budget).
    pub fn mapped_bytes(&self) -> usize {
        let segments = self.capacity.div_ceil(self.slots_per_segment);
        segments * DATA_OFFSET + self.capacity * self.slot_bytes
    }

    /// Checks that `needed` slots fit.
    ///
    /// # Errors
    /// [`Error::ShmBudget`] naming the slots, their size and the budget.
    pub fn check(&self, needed: usize) -> Result<()> {
        if self.capacity >= needed {
            return Ok(());
        }
        Err(Error::ShmBudget {
            slot_bytes: self.slot_bytes,
            needed,
            fits: self.capacity,
            budget: self.budget_bytes,
        })
    }
}

/// A growable pool of equal-size slots for one job on one node, within the node's budget
/// ([`PoolLayout`]).
#[derive(Debug)]
pub struct SlotPool {
    dir: PathBuf,
    name: String,
    /// Added to each segment's number in its [`SegmentId`] (and so its file name): the job's
    /// incarnation in the high 16 bits ([`Self::for_incarnation`]).
    segment_base: u32,
    layout: PoolLayout,
    state: Mutex<PoolState>,
    freed: tokio::sync::Notify,
}

impl SlotPool {
    /// A pool of `slot_bytes` slots, growing one segment at a time up to `budget_bytes`
    /// (segment headers counted). Nothing is mapped yet.
    ///
    /// # Errors
    /// [`Error::ShmBudget`] when not even one slot fits the budget.
    pub fn new(dir: PathBuf, name: String, slot_bytes: usize, budget_bytes: usize) -> Result<Arc<SlotPool>> {
        let layout = PoolLayout::new(slot_bytes, budget_bytes);
        layout.check(1)?;
        Ok(Arc::new(SlotPool {
            dir,
            name,
            segment_base: 0,
            layout,
            state: Mutex::new(PoolState {
                segments: Vec::new(),
                free: Vec::new(),
                generations: Vec::new(),
                resident: Vec::new(),
                warm_free: 0,
            }),
            freed: tokio::sync::Notify::new(),
        }))
    }

    /// [`Self::new`] for one incarnation of job `job`: segment files are
    /// [`shoal_proto::descriptor::segment_file_name`]`(job, SegmentId(incarnation << 16 | n))`, so a job deleted and
    /// created again under its id never shares a file with its previous life, and a function host
    /// in another process finds a segment from the descriptor alone (job and segment id).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn for_incarnation(
        dir: PathBuf,
        job: &shoal_proto::JobId,
        incarnation: u64,
        slot_bytes: usize,
        budget_bytes: usize,
    ) -> Result<Arc<SlotPool>> {
        let mut pool = Arc::into_inner(Self::new(dir, job.to_string(), slot_bytes, budget_bytes)?)
            .ok_or(Error::Gone("slot pool"))?;
        pool.segment_base = ((incarnation & 0xFFFF) as u32) << 16;
        Ok(Arc::new(pool))
    }

    /// The pool's layout (slots per segment, capacity).
    pub fn layout(&self) -> PoolLayout {
        self.layout
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.layout.slot_bytes
    }

    /// Leases a free slot, creating a segment if none is free and the budget allows.
    /// Returns `None` when the pool is exhausted.
    ///
    /// # Errors
    /// [`Error::Io`] if a new segment cannot be created.
    pub fn try_alloc(self: &Arc<Self>) -> Result<Option<Slot>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = st.segments.len();
        let slots = self.layout.segment_slots(n);
        if st.free.is_empty() && slots > 0 {
            let id = SegmentId(self.segment_base | (n as u32 & 0xFFFF));
            let file = format!("{}-{id}.seg", self.name);
            let seg = Segment::create(&self.dir, &file, id, self.layout.slot_bytes, slots)?;
            // Pre-faulted (and so warm) only when it fits the warm allowance ([`Segment::create`]).
            let warm = DATA_OFFSET + self.layout.slot_bytes * slots <= WARM_FREE_BYTES;
            st.segments.push(Arc::new(seg));
            st.generations.push(vec![0; slots]);
            st.resident.push(vec![warm; slots]);
            if warm {
                st.warm_free += self.layout.slot_bytes * slots;
            }
            st.free.extend((0..slots).rev().map(|i| (n, i)));
        }
        let Some((s, i)) = st.free.pop() else { return Ok(None) };
        if std::mem::replace(&mut st.resident[s][i], true) {
            st.warm_free = st.warm_free.saturating_sub(self.layout.slot_bytes);
        }
        // A new lease, a new generation (never 0, so a zeroed table names no lease).
        let g = &mut st.generations[s][i];
        *g = g.wrapping_add(1).max(1);
        let generation = *g;
        let segment = Arc::clone(&st.segments[s]);
        segment.set_generation(i, generation);
        Ok(Some(Slot { pool: Arc::clone(self), segment, seg_index: s, index: i, generation }))
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
    generation: u32,
}

impl Slot {
    fn offset(&self) -> usize {
        DATA_OFFSET + self.index * self.pool.layout.slot_bytes
    }

    /// The slot's bytes (64-byte aligned, `slot_bytes` long).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the slot lies inside the mapping (index < the segment's slot count, and the
        // file was sized for all of them); the mapping lives as long as `self.segment`; the free list
        // hands each (segment, slot) to one lease at a time, so no other reference aliases it.
        unsafe {
            std::slice::from_raw_parts(
                self.segment.map.as_ptr().add(self.offset()),
                self.pool.layout.slot_bytes,
            )
        }
    }

    /// The slot's bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only live reference to the slot.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.segment.map.as_mut_ptr().add(self.offset()),
                self.pool.layout.slot_bytes,
            )
        }
    }

    /// Where the slot is, for a descriptor.
    pub fn location(&self) -> SlotLocation {
        SlotLocation {
            segment: self.segment.id(),
            index: self.index as u32,
            generation: self.generation,
            offset: self.offset() as u64,
            length: self.pool.layout.slot_bytes as u64,
        }
    }

    /// Shares the (written) slot read-only: the slot returns to its pool when the last of the
    /// lease and its views is dropped.
    pub fn into_view(self) -> SlotView {
        let generation = self.generation;
        SlotView { inner: ViewOf::Leased(Arc::new(self)), generation, guard: None }
    }
}

/// A slot's place in its segment, as a descriptor names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLocation {
    /// The segment.
    pub segment: SegmentId,
    /// The slot's index in it.
    pub index: u32,
    /// The lease's generation.
    pub generation: u32,
    /// Byte offset of the slot in the segment file.
    pub offset: u64,
    /// Bytes of the slot.
    pub length: u64,
}

/// A read-only view of a staged update's slot: in the gateway's process a share of the lease
/// itself (the slot cannot be reused while a view lives), in a function host's process a view
/// into its read-only mapping of the segment, checked against the slot's generation.
#[derive(Debug, Clone)]
pub struct SlotView {
    inner: ViewOf,
    generation: u32,
    guard: Option<ViewGuard>,
}

/// Something a [`SlotView`] keeps alive with it: dropped when the view and every clone of it
/// are (a function host in another process tells its gateway then that the slot is free).
#[derive(Clone)]
pub struct ViewGuard {
    _keep: Arc<dyn std::any::Any + Send + Sync>,
}

impl ViewGuard {
    /// Wraps `guard`.
    pub fn new(guard: impl std::any::Any + Send + Sync) -> ViewGuard {
        ViewGuard { _keep: Arc::new(guard) }
    }
}

impl std::fmt::Debug for ViewGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewGuard")
    }
}

#[derive(Debug, Clone)]
enum ViewOf {
    Leased(Arc<Slot>),
    Mapped(Arc<Segment>, usize),
}

impl SlotView {
    /// The same view, keeping `guard` alive until it and all its clones are dropped.
    pub fn guarded(mut self, guard: ViewGuard) -> SlotView {
        self.guard = Some(guard);
        self
    }

    /// The slot's bytes (64-byte aligned).
    pub fn bytes(&self) -> &[u8] {
        match &self.inner {
            ViewOf::Leased(slot) => slot.bytes(),
            // `view` checked the index against the segment.
            ViewOf::Mapped(seg, index) => seg.slot(*index).unwrap_or_default(),
        }
    }

    /// The lease generation viewed.
    pub fn generation(&self) -> u32 {
        self.generation
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let bytes = self.pool.layout.slot_bytes;
        let warm = {
            let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
            let warm = st.warm_free + bytes <= WARM_FREE_BYTES;
            if warm {
                st.warm_free += bytes;
            }
            warm
        };
        if !warm {
            // Past the warm allowance: the pages go back to the kernel (the node's memory stays
            // the slots in use, not every slot ever written). Outside the lock: freeing a large
            // slot's pages takes a while.
            self.segment.release_pages(self.offset(), bytes);
        }
        let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        st.resident[self.seg_index][self.index] = warm;
        st.free.push((self.seg_index, self.index));
        drop(st);
        self.pool.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_shared_or_foreign_shm_directory_is_refused_and_never_chmod_ed() {
        let tmp = tempfile::tempdir().unwrap();
        // Created fresh: 0700 all the way down.
        let dir = prepare_node_dir(&tmp.path().join("root"), "n1").unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        // An existing root open to others (like /dev/shm itself) is refused and left as it was.
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = prepare_node_dir(&open, "n1").unwrap_err().to_string();
        assert!(e.contains("writable by group or others") && e.contains(&open.display().to_string()), "{e}");
        assert_eq!(fs::metadata(&open).unwrap().permissions().mode() & 0o7777, 0o1777, "never chmod-ed");
        assert!(!open.join("n1").exists(), "nothing created inside a refused root");
        // A node directory writable by the group is refused too.
        let root = tmp.path().join("root2");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(root.join("n1")).unwrap();
        fs::set_permissions(root.join("n1"), fs::Permissions::from_mode(0o770)).unwrap();
        assert!(prepare_node_dir(&root, "n1").is_err());
        // A symlink is refused.
        std::os::unix::fs::symlink(&dir, tmp.path().join("link")).unwrap();
        let e = prepare_node_dir(tmp.path(), "link").unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
    }

    #[test]
    fn slots_are_aligned_exclusive_and_recycled() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = prepare_node_dir(tmp.path(), "n1").unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let pool = SlotPool::new(dir.clone(), "job".into(), 128, DATA_OFFSET + 128 * 64).unwrap();
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

    /// The budget is a real cap: headers count, the last segment is partial, and a slot larger
    /// than the budget is refused before anything is mapped.
    #[test]
    fn the_budget_caps_what_is_mapped() {
        const MIB: usize = 1 << 20;
        // ResNet-18 (44.8 MB per update) in 1 GiB: four segments of 5 and one of 3.
        let l = PoolLayout::new(44_800_000, 1024 * MIB);
        assert_eq!((l.slots_per_segment, l.capacity), (5, 23));
        assert_eq!((l.segment_slots(3), l.segment_slots(4), l.segment_slots(5)), (5, 3, 0));
        assert!(l.mapped_bytes() <= 1024 * MIB);
        assert!(l.check(23).is_ok());
        let e = l.check(24).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::ShmBudget);
        let text = e.to_string();
        assert!(
            text.contains("1024.0 MiB") && text.contains("--shm-budget-mib") && text.contains("holds 23"),
            "{text}"
        );
        // A 4 MiB model and a 1 MiB budget: nothing fits, nothing is mapped.
        let tmp = tempfile::tempdir().unwrap();
        let err = SlotPool::new(tmp.path().to_owned(), "j".into(), 4 * MIB, MIB).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::ShmBudget);
        assert!(fs::read_dir(tmp.path()).unwrap().next().is_none());
        // Exactly one slot and its header page fit: one segment of one slot.
        let l = PoolLayout::new(4 * MIB, 4 * MIB + DATA_OFFSET);
        assert_eq!((l.capacity, l.mapped_bytes()), (1, 4 * MIB + DATA_OFFSET));
        assert_eq!(PoolLayout::new(4 * MIB, 4 * MIB).capacity, 0, "the header page counts");
        // Small slots: at most 64 per segment, segments up to the budget.
        let l = PoolLayout::new(1000, 1024 * MIB);
        assert_eq!(l.slot_bytes, 1000);
        assert_eq!(l.slots_per_segment, 64);
        assert!(l.mapped_bytes() <= 1024 * MIB && l.mapped_bytes() + DATA_OFFSET + 1000 > 1024 * MIB);
        // A pool never maps more than its layout: exhaust a 2.5-segment budget.
        let dir = prepare_node_dir(tmp.path(), "n").unwrap();
        let budget = 2 * (DATA_OFFSET + 64 * 128) + DATA_OFFSET + 10 * 128;
        let pool = SlotPool::new(dir.clone(), "k".into(), 128, budget).unwrap();
        let mut held = Vec::new();
        while let Some(s) = pool.try_alloc().unwrap() {
            held.push(s);
        }
        assert_eq!((held.len(), pool.segments()), (138, 3));
        let mapped: u64 = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert_eq!(mapped as usize, budget);
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
        assert!(matches!(Segment::open_read_only(&p), Err(Error::Segment(_))));
        let empty = tmp.path().join("e.seg");
        fs::write(&empty, b"").unwrap();
        assert!(Segment::open_read_only(&empty).is_err());
    }
}
