//! Helpers shared by the benches.

/// A buffer of `len` u64 words starting on a 64-byte boundary (a `Vec<u64>` is only 8-byte
/// aligned, and glibc's large allocations start 16 bytes into a page), like a shared-memory slot.
pub struct AlignedWords {
    raw: Vec<u64>,
    start: usize,
    len: usize,
}

#[allow(dead_code)] // not every bench uses every accessor
impl AlignedWords {
    /// `len` zero words.
    pub fn zeroed(len: usize) -> AlignedWords {
        let raw = vec![0u64; len + 8];
        let start = (64 - raw.as_ptr() as usize % 64) % 64 / 8;
        AlignedWords { raw, start, len }
    }

    /// The aligned words.
    pub fn words(&self) -> &[u64] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The aligned words, mutable.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.raw[self.start..self.start + self.len]
    }
}
