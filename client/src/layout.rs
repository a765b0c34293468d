//! Pure block arithmetic and write-buffer logic, kept free of IO so it can
//! be unit-tested: how a byte range splits into blocks, which parts of a
//! block a writer has covered, and how new bytes are patched over an old
//! block's content.

/// One piece of a byte range that falls inside a single block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Block index in the file (byte offset / block size).
    pub index: u64,
    /// Offset of the piece inside the block.
    pub offset: usize,
    /// Offset of the piece inside the caller's buffer.
    pub buf_pos: usize,
    pub len: usize,
}

/// Splits `[offset, offset + len)` into per-block pieces.
pub fn pieces(offset: u64, len: usize, block_size: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < len {
        let abs = offset + pos as u64;
        let index = abs / block_size;
        let in_block = (abs % block_size) as usize;
        let n = (block_size as usize - in_block).min(len - pos);
        out.push(Piece {
            index,
            offset: in_block,
            buf_pos: pos,
            len: n,
        });
        pos += n;
    }
    out
}

/// Number of bytes of block `index` that lie inside a file of `size` bytes.
pub fn bytes_in_block(size: u64, index: u64, block_size: u64) -> u64 {
    let start = index.saturating_mul(block_size);
    size.saturating_sub(start).min(block_size)
}

/// A set of disjoint, sorted, non-adjacent byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(usize, usize)>,
}

impl RangeSet {
    pub fn insert(&mut self, start: usize, end: usize) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Keep ranges that neither overlap nor touch; absorb the rest.
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b < s || a > e {
                kept.push((a, b));
            } else {
                s = s.min(a);
                e = e.max(b);
            }
        }
        kept.push((s, e));
        kept.sort_unstable();
        self.ranges = kept;
    }

    /// True when every byte of `[start, end)` is in the set.
    pub fn covers(&self, start: usize, end: usize) -> bool {
        if start >= end {
            return true;
        }
        self.ranges.iter().any(|&(a, b)| a <= start && end <= b)
    }

    /// Drops everything at or beyond `len`.
    pub fn truncate(&mut self, len: usize) {
        self.ranges.retain(|&(a, _)| a < len);
        if let Some(last) = self.ranges.last_mut() {
            last.1 = last.1.min(len);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.ranges.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The unflushed content of one block of an open file.
///
/// `buf` holds the bytes written so far at their block offsets (zeros in the
/// gaps); `written` says which of them were written. When the block replaces
/// an existing one (`base_len > 0` and the base not yet merged), the bytes of
/// the old block outside `written` still have to be read and merged before
/// the block can be read from here or uploaded.
#[derive(Debug, Clone, Default)]
pub struct DirtyBlock {
    pub buf: Vec<u8>,
    pub written: RangeSet,
    /// Length of the old block's content that still has to be merged under
    /// the written bytes; 0 once merged or when there was no old block.
    pub base_len: usize,
}

impl DirtyBlock {
    /// A buffer for a block that had `base_len` bytes of old content.
    pub fn new(base_len: usize, capacity_hint: usize) -> DirtyBlock {
        DirtyBlock {
            buf: Vec::with_capacity(capacity_hint),
            written: RangeSet::default(),
            base_len,
        }
    }

    /// Like [`DirtyBlock::new`], reusing an old buffer (and its memory).
    pub fn with_buffer(base_len: usize, mut buf: Vec<u8>) -> DirtyBlock {
        buf.clear();
        DirtyBlock {
            buf,
            written: RangeSet::default(),
            base_len,
        }
    }

    /// A buffer that starts as a copy of known content (nothing to merge).
    pub fn from_content(content: &[u8]) -> DirtyBlock {
        let mut written = RangeSet::default();
        written.insert(0, content.len());
        DirtyBlock {
            buf: content.to_vec(),
            written,
            base_len: 0,
        }
    }

    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[offset..end].copy_from_slice(data);
        self.written.insert(offset, end);
        if self.base_len > 0 && self.written.covers(0, self.base_len) {
            // Every old byte is overwritten: no need to ever read it.
            self.base_len = 0;
        }
    }

    /// Every byte of the block has been written: ready to upload as is.
    pub fn is_full(&self, block_size: usize) -> bool {
        self.written.covers(0, block_size)
    }

    /// The old content must be read before `[start, end)` can be served.
    pub fn needs_base_for(&self, start: usize, end: usize) -> bool {
        self.base_len > 0 && !self.written.covers(start, end.min(self.base_len))
    }

    pub fn needs_base(&self) -> bool {
        self.base_len > 0
    }

    /// Lays the written bytes over the old block's content `base` (which may
    /// be shorter or longer than `base_len`; only `base_len` bytes count).
    pub fn merge_base(&mut self, base: &[u8]) {
        let base = &base[..base.len().min(self.base_len)];
        let mut merged = Vec::with_capacity(self.buf.capacity().max(base.len()));
        merged.extend_from_slice(base);
        // A short base (should not happen) reads as zeros up to base_len.
        merged.resize(self.base_len.max(self.buf.len()), 0);
        for (a, b) in self.written.iter() {
            merged[a..b].copy_from_slice(&self.buf[a..b]);
        }
        self.buf = merged;
        self.written = RangeSet::default();
        self.written.insert(0, self.buf.len());
        self.base_len = 0;
    }

    /// Copies `[offset, offset + out.len())` into `out`; bytes past the
    /// buffer read as zeros. Only valid when `needs_base_for` is false.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        let have = self.buf.len().saturating_sub(offset).min(out.len());
        if have > 0 {
            out[..have].copy_from_slice(&self.buf[offset..offset + have]);
        }
        out[have..].fill(0);
    }

    /// Cuts the block down to `len` bytes (a truncate inside this block).
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(len);
        self.written.truncate(len);
        self.base_len = self.base_len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    #[test]
    fn pieces_split_at_block_boundaries() {
        assert_eq!(pieces(0, 0, BS), vec![]);
        assert_eq!(
            pieces(10, 5, BS),
            vec![Piece {
                index: 0,
                offset: 10,
                buf_pos: 0,
                len: 5
            }]
        );
        assert_eq!(
            pieces(4090, 10, BS),
            vec![
                Piece {
                    index: 0,
                    offset: 4090,
                    buf_pos: 0,
                    len: 6
                },
                Piece {
                    index: 1,
                    offset: 0,
                    buf_pos: 6,
                    len: 4
                }
            ]
        );
        let p = pieces(4096 * 3, 4096 * 2 + 1, BS);
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[2],
            Piece {
                index: 5,
                offset: 0,
                buf_pos: 8192,
                len: 1
            }
        );
    }

    #[test]
    fn bytes_in_block_handles_holes_and_eof() {
        assert_eq!(bytes_in_block(0, 0, BS), 0);
        assert_eq!(bytes_in_block(4095, 0, BS), 4095);
        assert_eq!(bytes_in_block(4097, 0, BS), 4096);
        assert_eq!(bytes_in_block(4097, 1, BS), 1);
        assert_eq!(bytes_in_block(4097, 2, BS), 0);
    }

    #[test]
    fn ranges_merge_and_cover() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert!(!r.covers(10, 40));
        r.insert(20, 30); // touching ranges join
        assert!(r.covers(10, 40));
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        r.insert(0, 5);
        r.insert(3, 12);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 40)]);
        assert!(r.covers(5, 5));
        r.truncate(15);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 15)]);
    }

    #[test]
    fn sequential_writes_fill_a_block() {
        let mut b = DirtyBlock::new(0, 4096);
        for i in 0..4 {
            assert!(!b.is_full(4096));
            b.write(i * 1024, &[i as u8; 1024]);
        }
        assert!(b.is_full(4096));
        assert_eq!(b.buf.len(), 4096);
        assert_eq!(b.buf[1024], 1);
    }

    #[test]
    fn writes_past_the_end_leave_zeros() {
        let mut b = DirtyBlock::new(0, 0);
        b.write(100, b"xy");
        let mut out = [9u8; 110];
        b.read(0, &mut out);
        assert!(out[..100].iter().all(|&x| x == 0));
        assert_eq!(&out[100..102], b"xy");
        assert!(out[102..].iter().all(|&x| x == 0), "beyond the buffer reads zeros");
    }

    #[test]
    fn partial_overwrite_patches_the_old_block() {
        let old = vec![b'o'; 3000];
        let mut b = DirtyBlock::new(old.len(), 4096);
        b.write(10, b"NEW");
        b.write(2999, b"TAIL");
        assert!(b.needs_base_for(0, 10));
        assert!(!b.needs_base_for(10, 13));
        b.merge_base(&old);
        assert!(!b.needs_base());
        assert_eq!(b.buf.len(), 3003);
        assert_eq!(&b.buf[..10], &old[..10]);
        assert_eq!(&b.buf[10..13], b"NEW");
        assert_eq!(&b.buf[13..2999], &old[13..2999]);
        assert_eq!(&b.buf[2999..], b"TAIL");
    }

    #[test]
    fn overwriting_all_old_bytes_needs_no_read() {
        let mut b = DirtyBlock::new(100, 4096);
        b.write(50, &[1; 50]);
        assert!(b.needs_base());
        b.write(0, &[2; 50]);
        assert!(!b.needs_base());
    }

    #[test]
    fn short_base_reads_as_zeros_and_truncate_cuts() {
        let mut b = DirtyBlock::new(20, 4096);
        b.write(15, b"abc");
        b.merge_base(b"0123456789"); // only 10 of the promised 20 bytes
        assert_eq!(b.buf.len(), 20);
        assert_eq!(&b.buf[..10], b"0123456789");
        assert_eq!(&b.buf[10..15], &[0; 5]);
        assert_eq!(&b.buf[15..18], b"abc");
        b.truncate(16);
        assert_eq!(b.buf.len(), 16);
        assert!(b.written.covers(0, 16));
    }

    #[test]
    fn content_copy_starts_clean() {
        let b = DirtyBlock::from_content(b"hello");
        assert!(!b.needs_base());
        let mut out = [0u8; 5];
        b.read(0, &mut out);
        assert_eq!(&out, b"hello");
    }
}
