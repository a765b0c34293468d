//! Slice algebra: how a chunk's list of slices turns into bytes.
//!
//! A file is a sequence of chunks (chunk size = the namespace's block size).
//! A chunk is an ordered list of slices, oldest first; each slice says that
//! the bytes `[pos, pos + len)` of the chunk are `len` bytes of block
//! `block_id` starting at `block_off` — or zeros when `block_id` is 0 (a
//! punched hole). A byte's content is that of the newest slice covering it;
//! bytes no slice covers are a hole and read as zeros.
//!
//! metad and the client both need this (metad to drop slices nobody can see
//! any more, the client to read), so it lives here, free of IO, and is
//! tested against a byte-array model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `block_id` of a slice that reads as zeros.
pub const ZERO_BLOCK: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Offset of the first byte inside the chunk.
    pub pos: u32,
    pub len: u32,
    pub block_id: u64,
    /// Offset inside the block of the slice's first byte.
    pub block_off: u32,
}

impl Slice {
    pub fn end(&self) -> u32 {
        self.pos + self.len
    }
    pub fn is_zero(&self) -> bool {
        self.block_id == ZERO_BLOCK
    }
}

impl From<Slice> for crate::rpc::Slice {
    fn from(s: Slice) -> Self {
        crate::rpc::Slice {
            pos: s.pos,
            len: s.len,
            block_id: s.block_id,
            block_off: s.block_off,
        }
    }
}

/// As received: the receiver checks that it fits its chunk and block.
impl From<&crate::rpc::Slice> for Slice {
    fn from(s: &crate::rpc::Slice) -> Self {
        Slice {
            pos: s.pos,
            len: s.len,
            block_id: s.block_id,
            block_off: s.block_off,
        }
    }
}

/// A visible piece of a chunk: `[pos, pos + len)` comes from `block_id` at
/// `block_off` (zeros when `block_id` is 0); `slice` is the index of the
/// slice it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub pos: u32,
    pub len: u32,
    pub block_id: u64,
    pub block_off: u32,
    pub slice: usize,
}

impl Extent {
    pub fn end(&self) -> u32 {
        self.pos + self.len
    }
}

/// Disjoint, non-touching intervals `[start, end)`, merged on insert.
#[derive(Debug, Clone, Default)]
pub struct IntervalSet {
    /// start → end
    map: BTreeMap<u32, u32>,
}

impl IntervalSet {
    /// The gaps of `[start, end)` not in the set, in order.
    pub fn gaps(&self, start: u32, end: u32) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut cur = start;
        if let Some((_, &e)) = self.map.range(..=start).next_back() {
            cur = cur.max(e);
        }
        for (&s, &e) in self.map.range(start..end) {
            if s > cur {
                out.push((cur, s));
            }
            cur = cur.max(e);
            if cur >= end {
                break;
            }
        }
        if cur < end {
            out.push((cur, end));
        }
        out
    }

    pub fn overlaps(&self, start: u32, end: u32) -> bool {
        if start >= end {
            return false;
        }
        if let Some((_, &e)) = self.map.range(..=start).next_back() {
            if e > start {
                return true;
            }
        }
        self.map.range(start..end).next().is_some()
    }

    pub fn insert(&mut self, start: u32, end: u32) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.map.range(..=start).next_back() {
            if pe >= start {
                s = ps;
                e = e.max(pe);
            }
        }
        let absorbed: Vec<u32> = self.map.range(s..=e).map(|(&k, _)| k).collect();
        for k in absorbed {
            if let Some(v) = self.map.remove(&k) {
                e = e.max(v);
            }
        }
        self.map.insert(s, e);
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }
}

/// The visible extents of `slices` (oldest first), sorted by position.
/// Bytes covered by no slice are absent: they are holes.
pub fn resolve(slices: &[Slice]) -> Vec<Extent> {
    let mut covered = IntervalSet::default();
    let mut out = Vec::new();
    for (i, s) in slices.iter().enumerate().rev() {
        if s.len == 0 {
            continue;
        }
        for (a, b) in covered.gaps(s.pos, s.end()) {
            out.push(Extent {
                pos: a,
                len: b - a,
                block_id: s.block_id,
                block_off: if s.is_zero() { 0 } else { s.block_off + (a - s.pos) },
                slice: i,
            });
        }
        covered.insert(s.pos, s.end());
    }
    out.sort_unstable_by_key(|e| e.pos);
    out
}

/// Which slices still matter: `keep[i]` is false for a slice whose bytes
/// are all hidden by newer slices, and for a zero slice that hides no data
/// (nothing older that is kept lies under it). Dropping those changes no
/// byte of the chunk.
pub fn prune(slices: &[Slice]) -> Vec<bool> {
    let mut keep = vec![false; slices.len()];
    for e in resolve(slices) {
        keep[e.slice] = true;
    }
    let mut data_below = IntervalSet::default();
    for (i, s) in slices.iter().enumerate() {
        if !keep[i] {
            continue;
        }
        if s.is_zero() {
            if !data_below.overlaps(s.pos, s.end()) {
                keep[i] = false;
            }
        } else {
            data_below.insert(s.pos, s.end());
        }
    }
    keep
}

/// Cuts every slice at `len` (a truncate inside this chunk): slices that
/// start at or past it are dropped (returned second), the one crossing it is
/// shortened.
pub fn clip(slices: &[Slice], len: u32) -> (Vec<Slice>, Vec<Slice>) {
    let mut kept = Vec::with_capacity(slices.len());
    let mut dropped = Vec::new();
    for s in slices {
        if s.pos >= len || s.len == 0 {
            dropped.push(*s);
        } else {
            let mut s = *s;
            s.len = s.len.min(len - s.pos);
            kept.push(s);
        }
    }
    (kept, dropped)
}

/// Data ranges (not holes, not zero slices) of a chunk, merged, in order.
pub fn data_ranges(slices: &[Slice]) -> Vec<(u32, u32)> {
    let mut set = IntervalSet::default();
    for e in resolve(slices) {
        if e.block_id != ZERO_BLOCK {
            set.insert(e.pos, e.end());
        }
    }
    set.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a tiny deterministic generator for the model tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn sl(pos: u32, len: u32, block_id: u64, block_off: u32) -> Slice {
        Slice {
            pos,
            len,
            block_id,
            block_off,
        }
    }

    /// Block content: byte `i` of block `id` is a function of both.
    fn block_byte(id: u64, i: u32) -> u8 {
        (id.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8 + 1
    }

    fn render(slices: &[Slice], size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        for e in resolve(slices) {
            for k in 0..e.len {
                out[(e.pos + k) as usize] = if e.block_id == ZERO_BLOCK {
                    0
                } else {
                    block_byte(e.block_id, e.block_off + k)
                };
            }
        }
        out
    }

    #[test]
    fn newest_slice_wins_and_gaps_are_holes() {
        let s = [sl(0, 10, 1, 0), sl(5, 3, 2, 100), sl(20, 5, 3, 0)];
        let e = resolve(&s);
        let spans: Vec<(u32, u32, u64, u32)> = e.iter().map(|e| (e.pos, e.len, e.block_id, e.block_off)).collect();
        assert_eq!(spans, vec![(0, 5, 1, 0), (5, 3, 2, 100), (8, 2, 1, 8), (20, 5, 3, 0)]);
        assert_eq!(data_ranges(&s), vec![(0, 10), (20, 25)]);
    }

    #[test]
    fn hidden_and_useless_zero_slices_are_pruned() {
        let s = [
            sl(0, 10, 1, 0),
            sl(0, 10, ZERO_BLOCK, 0),
            sl(50, 10, ZERO_BLOCK, 0),
            sl(2, 2, 2, 0),
        ];
        // Slice 0 is hidden by the punch; the punch then hides nothing kept;
        // the punch at 50 never hid anything.
        assert_eq!(prune(&s), vec![false, false, false, true]);
    }

    #[test]
    fn clip_cuts_and_drops() {
        let s = [sl(0, 10, 1, 0), sl(8, 10, 2, 4), sl(12, 1, 3, 0)];
        let (k, d) = clip(&s, 12);
        assert_eq!(
            k[1],
            Slice {
                pos: 8,
                len: 4,
                block_id: 2,
                block_off: 4
            }
        );
        assert_eq!(d, vec![s[2]]);
    }

    #[test]
    fn interval_set_gaps_overlaps_and_merges() {
        let mut set = IntervalSet::default();
        set.insert(10, 20);
        set.insert(30, 40);
        assert_eq!(set.gaps(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(set.gaps(15, 35), vec![(20, 30)]);
        assert!(set.overlaps(19, 21));
        assert!(!set.overlaps(20, 30));
        set.insert(20, 30);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        set.insert(5, 12);
        set.insert(38, 45);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(5, 45)]);
    }

    /// Random slice lists: resolve matches painting the slices in order,
    /// and pruning never changes a byte.
    #[test]
    fn resolve_and_prune_match_a_byte_model() {
        let mut rng = Rng(42);
        const SIZE: u32 = 512;
        for round in 0..2000 {
            let n = 1 + rng.below(30) as usize;
            let mut slices = Vec::new();
            let mut model = vec![0u8; SIZE as usize];
            for k in 0..n {
                let pos = rng.below(SIZE as u64) as u32;
                let len = 1 + rng.below((SIZE - pos) as u64) as u32;
                let block_id = if rng.below(5) == 0 { ZERO_BLOCK } else { 1 + k as u64 };
                let block_off = rng.below(1000) as u32;
                slices.push(Slice {
                    pos,
                    len,
                    block_id,
                    block_off,
                });
                for i in 0..len {
                    model[(pos + i) as usize] = if block_id == ZERO_BLOCK {
                        0
                    } else {
                        block_byte(block_id, block_off + i)
                    };
                }
            }
            assert_eq!(render(&slices, SIZE), model, "round {round}: {slices:?}");
            let keep = prune(&slices);
            let kept: Vec<Slice> = slices.iter().zip(&keep).filter(|(_, k)| **k).map(|(s, _)| *s).collect();
            assert_eq!(
                render(&kept, SIZE),
                model,
                "round {round}: pruning changed bytes of {slices:?}"
            );
            for (e, next) in resolve(&slices).iter().zip(resolve(&slices).iter().skip(1)) {
                assert!(e.end() <= next.pos, "extents overlap");
            }
        }
    }
}
