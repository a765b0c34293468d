//! Pure chunk arithmetic and write-buffer logic, free of IO so it can be
//! unit-tested: how a byte range splits into chunks, the unflushed bytes of
//! one chunk, and how dirty extents are packed into blocks for upload.

use std::collections::BTreeMap;

/// One piece of a byte range that falls inside a single chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Chunk index in the file (byte offset / chunk size).
    pub index: u64,
    /// Offset of the piece inside the chunk.
    pub offset: usize,
    /// Offset of the piece inside the caller's buffer.
    pub buf_pos: usize,
    pub len: usize,
}

/// Splits `[offset, offset + len)` into per-chunk pieces.
pub fn pieces(offset: u64, len: usize, chunk_size: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < len {
        let abs = offset + pos as u64;
        let index = abs / chunk_size;
        let in_chunk = (abs % chunk_size) as usize;
        let n = (chunk_size as usize - in_chunk).min(len - pos);
        out.push(Piece {
            index,
            offset: in_chunk,
            buf_pos: pos,
            len: n,
        });
        pos += n;
    }
    out
}

/// The unflushed bytes of one chunk: disjoint, non-touching extents
/// (position → bytes). Only what was written is kept: a write never needs
/// the chunk's older content.
#[derive(Debug, Clone, Default)]
pub struct DirtyChunk {
    extents: BTreeMap<u32, Vec<u8>>,
    bytes: u64,
}

impl DirtyChunk {
    /// Writes `data` at `pos`; returns how many bytes the chunk's dirty
    /// total grew by. `spare` is a buffer to reuse for a new extent.
    pub fn write(&mut self, pos: u32, data: &[u8], spare: impl FnOnce() -> Option<Vec<u8>>) -> u64 {
        if data.is_empty() {
            return 0;
        }
        let end = pos + data.len() as u32;
        let before = self.bytes;
        // Fast path: appending to the extent that ends exactly here (a
        // sequential writer) or overwriting inside one extent.
        let prev = self
            .extents
            .range(..=pos)
            .next_back()
            .map(|(&s, b)| (s, s + b.len() as u32));
        if let Some((s, e)) = prev {
            let touches_next = self.next_start_after(s).is_some_and(|n| n <= end);
            let Some(buf) = self.extents.get_mut(&s).filter(|_| pos <= e && !touches_next) else {
                return self.write_merging(pos, data, spare, before);
            };
            {
                let off = (pos - s) as usize;
                let overlap = (e - pos).min(data.len() as u32) as usize;
                buf[off..off + overlap].copy_from_slice(&data[..overlap]);
                buf.extend_from_slice(&data[overlap..]);
                self.bytes += (data.len() - overlap) as u64;
                return self.bytes - before;
            }
        }
        self.write_merging(pos, data, spare, before)
    }

    /// General case of [`DirtyChunk::write`]: merges every extent that
    /// overlaps or touches the new bytes into one.
    fn write_merging(&mut self, pos: u32, data: &[u8], spare: impl FnOnce() -> Option<Vec<u8>>, before: u64) -> u64 {
        let end = pos + data.len() as u32;
        let mut start = pos;
        let mut stop = end;
        let touching: Vec<u32> = self
            .extents
            .range(..=end)
            .filter(|(&s, b)| s + b.len() as u32 >= pos)
            .map(|(&s, _)| s)
            .collect();
        for &s in &touching {
            let len = self.extents[&s].len() as u32;
            start = start.min(s);
            stop = stop.max(s + len);
        }
        let mut merged = if touching.is_empty() && pos == start {
            spare().map(|mut b| {
                b.clear();
                b
            })
        } else {
            None
        }
        .unwrap_or_default();
        merged.resize((stop - start) as usize, 0);
        for s in touching {
            if let Some(old) = self.extents.remove(&s) {
                self.bytes -= old.len() as u64;
                let at = (s - start) as usize;
                merged[at..at + old.len()].copy_from_slice(&old);
            }
        }
        let at = (pos - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.bytes += merged.len() as u64;
        self.extents.insert(start, merged);
        self.bytes - before
    }

    fn next_start_after(&self, s: u32) -> Option<u32> {
        self.extents.range(s + 1..).next().map(|(&k, _)| k)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Every byte of a chunk of `chunk_size` is here, in one extent.
    pub fn is_full(&self, chunk_size: u64) -> bool {
        self.extents.len() == 1 && self.extents.get(&0).is_some_and(|b| b.len() as u64 == chunk_size)
    }

    /// True when every byte of `[start, end)` is dirty.
    pub fn covers(&self, start: u32, end: u32) -> bool {
        if start >= end {
            return true;
        }
        match self.extents.range(..=start).next_back() {
            Some((&s, b)) => s + b.len() as u32 >= end,
            None => false,
        }
    }

    /// Copies the dirty bytes that fall in `[pos, pos + out.len())` into
    /// `out` (others are left as they are).
    pub fn overlay(&self, pos: u32, out: &mut [u8]) {
        let end = pos + out.len() as u32;
        let first = self.extents.range(..=pos).next_back().map_or(pos, |(&s, _)| s);
        for (&s, b) in self.extents.range(first..end) {
            let e = s + b.len() as u32;
            let a = s.max(pos);
            let z = e.min(end);
            if a < z {
                out[(a - pos) as usize..(z - pos) as usize].copy_from_slice(&b[(a - s) as usize..(z - s) as usize]);
            }
        }
    }

    /// The dirty extents within `[pos, end)`, as copies (for a reader that
    /// must let go of the lock before it overlays them).
    pub fn copy_range(&self, pos: u32, end: u32) -> Vec<(u32, Vec<u8>)> {
        let first = self.extents.range(..=pos).next_back().map_or(pos, |(&s, _)| s);
        let mut out = Vec::new();
        for (&s, b) in self.extents.range(first..end) {
            let e = s + b.len() as u32;
            let a = s.max(pos);
            let z = e.min(end);
            if a < z {
                out.push((a, b[(a - s) as usize..(z - s) as usize].to_vec()));
            }
        }
        out
    }

    /// Drops every byte at or past `len` (a truncate inside this chunk).
    pub fn truncate(&mut self, len: u32) {
        let keys: Vec<u32> = self.extents.keys().copied().collect();
        for s in keys {
            if s >= len {
                if let Some(b) = self.extents.remove(&s) {
                    self.bytes -= b.len() as u64;
                }
            } else if let Some(b) = self.extents.get_mut(&s) {
                let keep = (len - s) as usize;
                if b.len() > keep {
                    self.bytes -= (b.len() - keep) as u64;
                    b.truncate(keep);
                }
            }
        }
    }

    pub fn into_extents(self) -> BTreeMap<u32, Vec<u8>> {
        self.extents
    }
}

/// A piece of a packed upload: `len` bytes of chunk `chunk` at `pos` are
/// stored in buffer `buf` at `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub chunk: u64,
    pub pos: u32,
    pub len: u32,
    pub buf: usize,
    pub off: u32,
}

/// Packs dirty extents (in chunk, position order) into buffers of at most
/// `max_block` bytes each: many small writes become one block, so the cost
/// of a flush follows the bytes written, not the number of writes. An
/// extent that does not fit the current buffer is split.
pub fn pack(extents: Vec<(u64, u32, Vec<u8>)>, max_block: usize) -> (Vec<Vec<u8>>, Vec<Part>) {
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut parts = Vec::new();
    for (chunk, pos, data) in extents {
        // A whole buffer's worth starting empty: hand the vector over as is.
        if data.len() == max_block && bufs.last().is_none_or(|b| !b.is_empty()) {
            parts.push(Part {
                chunk,
                pos,
                len: data.len() as u32,
                buf: bufs.len(),
                off: 0,
            });
            bufs.push(data);
            continue;
        }
        let mut done = 0usize;
        while done < data.len() {
            if bufs.last().is_none_or(|b| b.len() >= max_block) {
                bufs.push(Vec::with_capacity(max_block.min(data.len() - done)));
            }
            let i = bufs.len() - 1;
            let b = &mut bufs[i];
            let n = (max_block - b.len()).min(data.len() - done);
            parts.push(Part {
                chunk,
                pos: pos + done as u32,
                len: n as u32,
                buf: i,
                off: b.len() as u32,
            });
            b.extend_from_slice(&data[done..done + n]);
            done += n;
        }
    }
    (bufs, parts)
}

/// `lseek(SEEK_DATA)` (`data`) or `SEEK_HOLE` from `offset` in a file of
/// `size` bytes whose data lies in `ranges` (sorted, merged); `None` is
/// ENXIO. Data ranges are rounded out to whole 4 KiB blocks first, as a
/// local filesystem reports them, so answers match ext4's.
pub fn seek_data_hole(ranges: &[(u64, u64)], offset: u64, size: u64, data: bool) -> Option<u64> {
    const GRAIN: u64 = 4096;
    if offset >= size {
        return None;
    }
    let mut rounded: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in ranges {
        let (a, b) = (a / GRAIN * GRAIN, b.div_ceil(GRAIN).saturating_mul(GRAIN).min(size));
        match rounded.last_mut() {
            Some(l) if l.1 >= a => l.1 = l.1.max(b),
            _ => rounded.push((a, b)),
        }
    }
    if data {
        return rounded.iter().find(|r| r.1 > offset).map(|r| r.0.max(offset));
    }
    let mut cur = offset;
    for (a, b) in rounded {
        if b <= cur {
            continue;
        }
        if a > cur {
            return Some(cur);
        }
        cur = b;
    }
    Some(cur.min(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        assert_eq!(pieces(0, 0, CS), vec![]);
        assert_eq!(
            pieces(4090, 10, CS),
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
        let p = pieces(4096 * 3, 4096 * 2 + 1, CS);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2].index, 5);
    }

    fn render(d: &DirtyChunk, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        d.overlay(0, &mut out);
        out
    }

    #[test]
    fn writes_merge_and_count_new_bytes() {
        let mut d = DirtyChunk::default();
        assert_eq!(d.write(10, b"abc", || None), 3);
        assert_eq!(d.write(13, b"de", || None), 2, "append");
        assert_eq!(d.write(0, b"xy", || None), 2);
        assert_eq!(d.extent_count(), 2);
        assert_eq!(d.write(2, b"12345678", || None), 8, "bridges the gap");
        assert_eq!(d.extent_count(), 1);
        assert_eq!(&render(&d, 16)[..15], b"xy12345678abcde");
        assert_eq!(d.write(1, b"Q", || None), 0, "an overwrite adds nothing");
        assert!(d.covers(0, 15));
        assert!(!d.covers(0, 16));
        d.truncate(5);
        assert_eq!(d.bytes(), 5);
        assert!(!d.covers(0, 6));
    }

    #[test]
    fn dirty_chunk_matches_a_byte_model() {
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..300 {
            let mut d = DirtyChunk::default();
            let mut model = vec![0u8; 300];
            let mut written = vec![false; 300];
            for k in 0..20 {
                let pos = next(290) as usize;
                let len = 1 + next((300 - pos) as u64) as usize;
                let data: Vec<u8> = (0..len).map(|i| (k * 13 + i) as u8 | 1).collect();
                d.write(pos as u32, &data, || None);
                model[pos..pos + len].copy_from_slice(&data);
                written[pos..pos + len].iter_mut().for_each(|w| *w = true);
                assert_eq!(render(&d, 300), model);
                assert_eq!(d.bytes(), written.iter().filter(|w| **w).count() as u64);
            }
            let copies = d.copy_range(50, 250);
            let mut out = model.clone();
            out[50..250].fill(0);
            for (p, b) in copies {
                out[p as usize..p as usize + b.len()].copy_from_slice(&b);
            }
            for i in 50..250 {
                if written[i] {
                    assert_eq!(out[i], model[i]);
                }
            }
        }
    }

    #[test]
    fn full_chunk_is_detected() {
        let mut d = DirtyChunk::default();
        d.write(0, &[1; 2048], || Some(Vec::with_capacity(4096)));
        assert!(!d.is_full(CS));
        d.write(2048, &[2; 2048], || None);
        assert!(d.is_full(CS));
    }

    #[test]
    fn seek_data_and_hole_round_to_blocks() {
        // Data at [5000, 5001) and [20000, 30000) of a 50,000-byte file.
        let r = [(5000, 5001), (20000, 30000)];
        assert_eq!(seek_data_hole(&r, 0, 50_000, true), Some(4096));
        assert_eq!(seek_data_hole(&r, 4500, 50_000, true), Some(4500));
        assert_eq!(seek_data_hole(&r, 8192, 50_000, true), Some(16384));
        assert_eq!(seek_data_hole(&r, 32768, 50_000, true), None);
        assert_eq!(seek_data_hole(&r, 0, 50_000, false), Some(0));
        assert_eq!(seek_data_hole(&r, 4096, 50_000, false), Some(8192));
        assert_eq!(seek_data_hole(&r, 17000, 50_000, false), Some(32768));
        assert_eq!(seek_data_hole(&r, 49_999, 50_000, false), Some(49_999));
        assert_eq!(seek_data_hole(&r, 50_000, 50_000, false), None);
        // Data up to the end: the only hole is the end of the file.
        assert_eq!(seek_data_hole(&[(0, 10)], 0, 10, false), Some(10));
        assert_eq!(seek_data_hole(&[], 3, 10, false), Some(3));
        assert_eq!(seek_data_hole(&[], 3, 10, true), None);
    }

    #[test]
    fn pack_fills_blocks_and_splits_extents() {
        let ext = vec![(0, 0, vec![1u8; 3]), (0, 10, vec![2u8; 4]), (5, 7, vec![3u8; 6])];
        let (bufs, parts) = pack(ext, 8);
        assert_eq!(bufs.len(), 2);
        assert_eq!(bufs[0], vec![1, 1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(bufs[1], vec![3; 5]);
        assert_eq!(
            parts,
            vec![
                Part {
                    chunk: 0,
                    pos: 0,
                    len: 3,
                    buf: 0,
                    off: 0
                },
                Part {
                    chunk: 0,
                    pos: 10,
                    len: 4,
                    buf: 0,
                    off: 3
                },
                Part {
                    chunk: 5,
                    pos: 7,
                    len: 1,
                    buf: 0,
                    off: 7
                },
                Part {
                    chunk: 5,
                    pos: 8,
                    len: 5,
                    buf: 1,
                    off: 0
                },
            ]
        );
        let (bufs, parts) = pack(vec![(3, 0, vec![9u8; 8])], 8);
        assert_eq!((bufs.len(), parts.len()), (1, 1));
    }
}
