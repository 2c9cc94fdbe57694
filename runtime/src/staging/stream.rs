//! Fold-while-staging: a slot the gateway writes while the function host in the same process
//! folds what is already staged, so a large update never sits whole in shared memory next to
//! the accumulator (a node's memory: the f64 accumulator, 2 × the model, plus a few chunks,
//! instead of 2 × + a whole slot; `shoal bench memory`).
//!
//! The writer ([`SlotWriter`], the gateway's upload reader) copies each chunk's data to its
//! place and then publishes how much of the slot is final ([`SlotWriter::advance`]: a prefix,
//! never written again); the reader ([`SlotReader`], the aggregator's blocking fold thread)
//! waits for the prefix to grow, folds the new bytes, and gives their pages back to the kernel
//! ([`SlotReader::release`]). The writer ends the stream with the update's verdict (digest,
//! lengths, claims): only a complete stream makes an update count, and a failed one after some
//! bytes were folded spoils the partial, which the aggregator then gives up (its updates go
//! back to JetStream and are folded again: `host::aggregator`).

use std::sync::{Arc, Condvar, Mutex};

use shoal_proto::RejectReason;

use super::{Slot, SlotView, ViewOf};

/// Why a streamed update did not arrive whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFailure {
    /// The refusal reason the client is (or would be) told.
    pub reason: RejectReason,
    /// In words.
    pub detail: String,
}

#[derive(Debug)]
struct Fill {
    /// Bytes `[0, ready)` of the slot are final.
    ready: usize,
    /// The writer's verdict, once it has one.
    end: Option<Result<(), StreamFailure>>,
    /// The reader was dropped.
    reader_gone: bool,
    /// The reader refused the update (NaN/Inf in a piece, a weight the strategy refuses).
    reader_failure: Option<StreamFailure>,
    /// Bytes `[0, folded)` the reader has folded, once it folds by pieces (`None`: it does
    /// not, or has not started: the writer does not wait for it).
    folded: Option<usize>,
}

#[derive(Debug)]
struct Shared {
    slot: Arc<Slot>,
    fill: Mutex<Fill>,
    /// The writer's progress, for the reader's blocking thread.
    changed: Condvar,
    /// The reader's progress and departure, for the writer's task.
    folded_changed: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fill> {
        self.fill.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The gateway's end of a streamed slot: the only writer of its bytes.
#[derive(Debug)]
pub struct SlotWriter {
    shared: Arc<Shared>,
}

/// The function host's end of a streamed slot: reads the final prefix only.
#[derive(Debug)]
pub struct SlotReader {
    shared: Arc<Shared>,
}

impl Slot {
    /// Shares the slot while it is written: the writer, the reader, and a view that keeps the
    /// lease (the slot returns to its pool once all three are dropped).
    pub fn into_streamed(self) -> (SlotWriter, SlotReader, SlotView) {
        let generation = self.generation;
        let slot = Arc::new(self);
        let view = SlotView { inner: ViewOf::Leased(Arc::clone(&slot)), generation, guard: None };
        let shared = Arc::new(Shared {
            slot,
            fill: Mutex::new(Fill {
                ready: 0,
                end: None,
                reader_gone: false,
                reader_failure: None,
                folded: None,
            }),
            folded_changed: tokio::sync::Notify::new(),
            changed: Condvar::new(),
        });
        (SlotWriter { shared: Arc::clone(&shared) }, SlotReader { shared }, view)
    }
}

impl SlotWriter {
    /// Bytes of the slot.
    pub fn len(&self) -> usize {
        self.shared.slot.pool.layout.slot_bytes
    }

    /// Whether the slot has no bytes (never: slots are at least one alignment unit).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` to slot offset `at`. Refused (`false`, nothing written) when it would
    /// write past the slot or into the published prefix.
    pub fn write(&self, at: usize, src: &[u8]) -> bool {
        let ready = self.shared.lock().ready;
        if at < ready || at.checked_add(src.len()).is_none_or(|end| end > self.len()) {
            return false;
        }
        let slot = &self.shared.slot;
        // SAFETY: `[at, at + len)` lies inside the slot (checked), which lies inside the
        // mapping; this writer is the slot's only writer (it holds the lease's only write
        // access: `Slot::into_streamed` consumed the exclusive lease), and the reader reads
        // only below `ready` <= `at`, so no reference to these bytes exists while they change.
        unsafe {
            let dst = slot.segment.map.as_mut_ptr().add(slot.offset() + at);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
        true
    }

    /// Zeroes `[from, to)` of the slot (its padding, before any data), as [`Self::write`].
    pub fn zero(&self, from: usize, to: usize) -> bool {
        let ready = self.shared.lock().ready;
        if from < ready || from > to || to > self.len() {
            return false;
        }
        let slot = &self.shared.slot;
        // SAFETY: as in `write`.
        unsafe {
            let dst = slot.segment.map.as_mut_ptr().add(slot.offset() + from);
            std::ptr::write_bytes(dst, 0, to - from);
        }
        true
    }

    /// Publishes that bytes `[0, ready)` are final (the prefix only grows).
    pub fn advance(&self, ready: usize) {
        let mut f = self.shared.lock();
        if ready > f.ready {
            f.ready = ready.min(self.len());
            self.shared.changed.notify_all();
        }
    }

    /// Whether the reader has stopped reading: `None` while it reads; `Some(Some(why))` when it
    /// refused the update; `Some(None)` when it dropped it (refused by the host, which settled
    /// it, or handed back). Staging on is pointless then.
    pub fn reader_stopped(&self) -> Option<Option<StreamFailure>> {
        let f = self.shared.lock();
        match (&f.reader_failure, f.reader_gone) {
            (Some(why), _) => Some(Some(why.clone())),
            (None, true) => Some(None),
            (None, false) => None,
        }
    }

    /// Waits until the reader has folded all but `ahead` of the bytes published, or does not
    /// fold by pieces, or has stopped (backpressure: the slot's resident part stays small).
    pub async fn until_folded_within(&self, ahead: usize) {
        loop {
            let notified = self.shared.folded_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let f = self.shared.lock();
                let behind = f.folded.is_some_and(|folded| f.ready.saturating_sub(folded) > ahead);
                if !behind || f.reader_gone || f.reader_failure.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Ends the stream with the update's verdict.
    pub fn end(self, verdict: Result<(), StreamFailure>) {
        let mut f = self.shared.lock();
        f.end = Some(verdict);
        self.shared.changed.notify_all();
    }
}

impl Drop for SlotWriter {
    fn drop(&mut self) {
        let mut f = self.shared.lock();
        if f.end.is_none() {
            f.end = Some(Err(StreamFailure {
                reason: RejectReason::ObjectUnavailable,
                detail: "the gateway stopped staging the update".into(),
            }));
            self.shared.changed.notify_all();
        }
    }
}

impl SlotReader {
    /// Blocks until more than `seen` bytes are final or the stream has ended; returns the final
    /// prefix's length and the verdict, if any (blocking: call it on a blocking thread).
    pub fn wait(&self, seen: usize) -> (usize, Option<Result<(), StreamFailure>>) {
        let mut f = self.shared.lock();
        while f.ready <= seen && f.end.is_none() {
            f = self.shared.changed.wait(f).unwrap_or_else(|p| p.into_inner());
        }
        (f.ready, f.end.clone())
    }

    /// The slot's first `len` bytes, `None` when they are not all final.
    pub fn prefix(&self, len: usize) -> Option<&[u8]> {
        if len > self.shared.lock().ready {
            return None;
        }
        let slot = &self.shared.slot;
        // SAFETY: `[0, len)` lies inside the slot and is final: the writer never writes below
        // the published prefix again (`SlotWriter::write` refuses it).
        Some(unsafe { std::slice::from_raw_parts(slot.segment.map.as_ptr().add(slot.offset()), len) })
    }

    /// Gives the whole pages inside `[from, to)` of the slot back to the kernel (folded bytes
    /// nobody reads again); they read as zeros afterwards.
    pub fn release(&self, from: usize, to: usize) {
        let slot = &self.shared.slot;
        if from < to && to <= self.shared.lock().ready {
            slot.segment.release_pages(slot.offset() + from, to - from);
        }
    }
}

impl SlotReader {
    /// Refuses the update (the gateway stops staging it and refuses it with `why`).
    pub fn fail(&self, why: StreamFailure) {
        let mut f = self.shared.lock();
        if f.reader_failure.is_none() {
            f.reader_failure = Some(why);
        }
        drop(f);
        self.shared.folded_changed.notify_waiters();
    }

    /// Why this reader refused the update, if it did ([`Self::fail`]).
    pub fn failure(&self) -> Option<StreamFailure> {
        self.shared.lock().reader_failure.clone()
    }

    /// Tells the writer that bytes `[0, folded)` are folded: it stages at most a few chunks
    /// ahead of this from now on ([`SlotWriter::until_folded_within`]).
    pub fn folded(&self, folded: usize) {
        self.shared.lock().folded = Some(folded);
        self.shared.folded_changed.notify_waiters();
    }
}

impl Drop for SlotReader {
    fn drop(&mut self) {
        self.shared.lock().reader_gone = true;
        self.shared.changed.notify_all();
        self.shared.folded_changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::staging::SlotPool;

    #[test]
    fn the_reader_sees_only_the_published_prefix_and_the_writer_cannot_rewrite_it() {
        let dir = tempfile::tempdir().unwrap();
        let pool = SlotPool::new(dir.path().to_owned(), "t".into(), 3 * 4096, 1 << 20).unwrap();
        let (w, r, _view) = pool.try_alloc().unwrap().unwrap().into_streamed();
        assert!(w.write(0, &[7u8; 4096]));
        assert!(r.prefix(1).is_none(), "nothing published yet");
        w.advance(4096);
        assert_eq!(r.wait(0), (4096, None));
        assert_eq!(r.prefix(4096).unwrap(), &[7u8; 4096][..]);
        assert!(!w.write(100, &[1]), "a write into the published prefix is refused");
        assert!(!w.write(3 * 4096 - 1, &[1, 2]), "a write past the slot is refused");
        assert!(w.write(4096, &[9u8; 8192]));
        r.release(0, 4096);
        assert_eq!(r.prefix(4096).unwrap(), &[0u8; 4096][..], "released pages read as zeros");
        let t = std::thread::spawn(move || {
            let mut seen = 4096;
            loop {
                let (ready, end) = r.wait(seen);
                seen = ready;
                if let Some(end) = end {
                    return (seen, end);
                }
            }
        });
        w.advance(3 * 4096);
        w.end(Ok(()));
        assert_eq!(t.join().unwrap(), (3 * 4096, Ok(())));
    }

    #[test]
    fn a_writer_dropped_without_a_verdict_fails_the_stream_and_a_dropped_reader_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let pool = SlotPool::new(dir.path().to_owned(), "t".into(), 4096, 1 << 20).unwrap();
        let (w, r, view) = pool.try_alloc().unwrap().unwrap().into_streamed();
        drop(view);
        assert_eq!(w.reader_stopped(), None);
        drop(w);
        let (_, end) = r.wait(0);
        assert_eq!(end.unwrap().unwrap_err().reason, RejectReason::ObjectUnavailable);
        drop(r);
        let (w, r, _) = pool.try_alloc().unwrap().unwrap().into_streamed();
        let why = StreamFailure { reason: RejectReason::NonFinite, detail: "NaN".into() };
        r.fail(why.clone());
        assert_eq!(w.reader_stopped(), Some(Some(why)));
        let (w, r, _) = pool.try_alloc().unwrap().unwrap().into_streamed();
        drop(r);
        assert_eq!(w.reader_stopped(), Some(None));
    }
}
