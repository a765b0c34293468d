//! Open files: per-inode write buffers, background uploads, commits of
//! slices, the chunk-map cache, readahead and background compaction.
//!
//! All handles of one inode in this process share one [`OpenInode`], so a
//! read through any handle sees every unflushed write of this process, and
//! `flush` on any handle commits all of them.
//!
//! A write only buffers the bytes it wrote (a [`DirtyChunk`] per chunk);
//! it never reads older content. A chunk filled completely is uploaded at
//! once as one block; partial chunks are packed together — many small
//! writes into one block — when the buffer grows large or at flush. Each
//! upload is a *batch*: its pieces become slices that point into its
//! blocks, and `flush` commits them (CommitSlices) in the order they were
//! written. metad appends them to the chunks and grows the size to cover
//! them; it never shrinks it, so writers on other mounts keep their bytes.
//!
//! Where a byte's current content lives, newest first:
//! `dirty` → `batches` (newest batch first; in memory while uploading, on
//! blockds once stored) → `chunks` (the committed slice lists) → a hole.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jfs_common::rpc::{self, Attr, BlockLoc};
use jfs_common::slices::{self, Extent, Slice};
use tokio::sync::{Notify, Semaphore};

use crate::layout::{pack, pieces, DirtyChunk, Part};
use crate::{attr_of, lock, Client, FsError, FsResult};

/// Chunks fetched per GetChunks call (a window of the chunk map).
pub(crate) const WINDOW: u64 = 256;
/// Block uploads in flight per open file.
const UPLOADS_IN_FLIGHT: usize = 4;
/// Bytes of partial chunks buffered per file before they are packed and
/// uploaded (a flush uploads them anyway).
const DIRTY_BYTES: u64 = 64 << 20;
/// Separate dirty extents buffered per file before they are uploaded: each
/// becomes a slice, and a commit carries at most a few tens of thousands.
const DIRTY_EXTENTS: usize = 16_384;
/// Stored, uncommitted slices that make a background commit worthwhile.
const BACKGROUND_COMMIT_SLICES: usize = 8_192;
/// Stored blocks are committed at most this long after they were stored,
/// even if the file stays open and unflushed: metad reclaims blocks that
/// stay uncommitted for long (they look like a crashed client's), and a
/// crash should not lose more than a few seconds of written data.
const COMMIT_AFTER: Duration = Duration::from_secs(2);
/// Slices per CommitSlices request.
const MAX_COMMIT_SLICES: usize = 32_768;
/// Attempts to store one block (each on a fresh allocation) before failing.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Chunk buffers kept per open file for reuse: a recycled buffer is
/// already mapped, a fresh one page-faults on every 4 KiB as it fills.
const SPARE_BUFFERS: usize = 6;
/// How far from the end of the previous read a read may start and still
/// count as sequential.
const SEQUENTIAL_GAP: u64 = 1 << 20;
/// Chunks read ahead of a sequential reader.
const READAHEAD_CHUNKS: u64 = 4;
/// Block ids used for in-memory batch buffers while resolving a read: far
/// above any id metad hands out.
const MEM_ID_BASE: u64 = u64::MAX - (1 << 32);

/// A committed chunk as this process knows it.
#[derive(Clone)]
struct ChunkView {
    slices: Vec<Slice>,
    /// `slices` resolved, cached for reads.
    extents: Arc<Vec<Extent>>,
}

impl ChunkView {
    fn new(slices: Vec<Slice>) -> ChunkView {
        let extents = Arc::new(slices::resolve(&slices));
        ChunkView { slices, extents }
    }
}

enum BatchData {
    /// Being uploaded: the buffers, and the blocks stored so far.
    Memory {
        bufs: Vec<Arc<Vec<u8>>>,
        stored: Vec<Option<BlockLoc>>,
    },
    /// On blockds, waiting to be committed.
    Stored(Vec<BlockLoc>),
}

struct Batch {
    parts: Vec<Part>,
    data: BatchData,
    /// A commit naming these blocks was sent: whatever became of it, the
    /// blocks must not be abandoned (it may yet be applied).
    commit_sent: bool,
}

impl Batch {
    fn slice_of(&self, p: &Part) -> Option<Slice> {
        match &self.data {
            BatchData::Stored(locs) => Some(Slice {
                pos: p.pos,
                len: p.len,
                block_id: locs[p.buf].block_id,
                block_off: p.off,
            }),
            BatchData::Memory { .. } => None,
        }
    }
}

pub(crate) struct OpenInode {
    ino: u64,
    chunk_size: u64,
    state: Mutex<State>,
    /// Signalled whenever an upload finishes.
    upload_done: Notify,
    upload_slots: Arc<Semaphore>,
    /// One flush at a time per file.
    flush_lock: tokio::sync::Mutex<()>,
    /// One commit at a time per file (flush and background commits).
    commit_lock: tokio::sync::Mutex<()>,
    spare: Mutex<Vec<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    handles: usize,
    orphan: bool,
    /// Size as this process sees it (includes unflushed writes).
    size: u64,
    /// Size metad has (as last seen or committed by us).
    server_size: u64,
    /// ctime of the metad answer `server_size` came from. Answers to
    /// concurrent requests of this process (a commit, a truncate, an open)
    /// arrive in any order; only a newer one may change the size, or a
    /// stale answer would shrink it under the kernel's feet (an mmap read
    /// then gets SIGBUS).
    server_ctime: i128,
    /// Committed chunks by index (complete for every window in `windows`,
    /// except chunks in `stale`).
    chunks: HashMap<u64, ChunkView>,
    windows: HashSet<u64>,
    stale: HashSet<u64>,
    blocks: HashMap<u64, BlockLoc>,
    /// Bumped by every local commit and compaction: a chunk map fetched
    /// across one may lack it and is fetched again.
    epoch: u64,
    /// Uploads and uncommitted uploads by sequence number (= write order).
    batches: BTreeMap<u64, Batch>,
    next_seq: u64,
    dirty: BTreeMap<u64, DirtyChunk>,
    dirty_bytes: u64,
    dirty_extents: usize,
    in_flight: usize,
    /// First error of a background upload: every later write and flush of
    /// this file fails with it until the last handle is released.
    error: Option<FsError>,
    /// A commit of stored batches is scheduled (COMMIT_AFTER).
    commit_scheduled: bool,
}

impl State {
    /// Takes size from a metad answer unless a newer answer is already
    /// known; true when taken.
    fn observe(&mut self, attr: &Attr) -> bool {
        let ctime = attr.ctime.as_ref().map_or(0, |t| t.as_nanos());
        if ctime < self.server_ctime {
            return false;
        }
        self.server_ctime = ctime;
        self.server_size = attr.size;
        self.size = if self.has_unflushed() {
            self.size.max(attr.size)
        } else {
            attr.size
        };
        true
    }

    fn has_unflushed(&self) -> bool {
        !self.dirty.is_empty() || !self.batches.is_empty()
    }

    /// The chunk map around `index` must be fetched before we can tell a
    /// hole from data.
    fn needs_fetch(&self, index: u64, chunk_size: u64) -> bool {
        self.stale.contains(&index)
            || (index.saturating_mul(chunk_size) < self.server_size && !self.windows.contains(&(index / WINDOW)))
    }

    /// Slices of the stored batches, oldest first, that are ready to commit:
    /// the longest run of stored batches from the oldest one.
    fn committable(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut n = 0;
        for (&seq, b) in &self.batches {
            if !matches!(b.data, BatchData::Stored(_)) || (n > 0 && n + b.parts.len() > MAX_COMMIT_SLICES) {
                break;
            }
            n += b.parts.len();
            out.push(seq);
        }
        out
    }

    fn stored_slices(&self) -> usize {
        self.batches
            .values()
            .take_while(|b| matches!(b.data, BatchData::Stored(_)))
            .map(|b| b.parts.len())
            .sum()
    }

    fn learn(&mut self, chunks: Vec<rpc::Chunk>, blocks: Vec<BlockLoc>, chunk_size: u64) -> FsResult<()> {
        for b in blocks {
            self.blocks.insert(b.block_id, b);
        }
        for c in chunks {
            let slices = c
                .slices
                .iter()
                .map(|s| checked_slice(s, chunk_size))
                .collect::<FsResult<Vec<_>>>()?;
            self.stale.remove(&c.index);
            self.chunks.insert(c.index, ChunkView::new(slices));
        }
        Ok(())
    }
}

/// A slice from metad, refused if it does not fit its chunk.
fn checked_slice(s: &rpc::Slice, chunk_size: u64) -> FsResult<Slice> {
    if s.len == 0 || s.pos as u64 + s.len as u64 > chunk_size || s.block_off.checked_add(s.len).is_none() {
        return Err(FsError::Internal(format!(
            "metad sent a slice at {} of {} bytes for a chunk of {chunk_size}",
            s.pos, s.len
        )));
    }
    Ok(s.into())
}

/// Where the bytes of one piece of a read come from.
enum Source {
    Block { loc: BlockLoc, off: u32 },
    Memory { buf: Arc<Vec<u8>>, off: u32 },
}

/// A read of `[pos, pos + len)` of one chunk, planned under the lock and
/// carried out without it.
struct ReadPlan {
    pieces: Vec<(u32, u32, Source)>,
    dirty: Vec<(u32, Vec<u8>)>,
}

impl OpenInode {
    fn new(ino: u64, chunk_size: u64) -> OpenInode {
        OpenInode {
            ino,
            chunk_size,
            state: Mutex::new(State::default()),
            upload_done: Notify::new(),
            upload_slots: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
            flush_lock: tokio::sync::Mutex::new(()),
            commit_lock: tokio::sync::Mutex::new(()),
            spare: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn local_size(&self) -> Option<u64> {
        let st = lock(&self.state);
        st.has_unflushed().then_some(st.size)
    }

    pub(crate) fn set_orphan(&self) {
        lock(&self.state).orphan = true;
    }

    /// metad changed the file's size or chunks behind our back (truncate,
    /// fallocate after our flush): forget the chunk map, keep the new size.
    /// Only a truncate (`truncated`) cuts what is still buffered here; after
    /// a fallocate, writes that arrived meanwhile (mmap writeback does not
    /// wait for the inode lock) stay, and so does the size they reach.
    pub(crate) fn reset_map(&self, attr: &Attr, truncated: bool) {
        let cs = self.chunk_size;
        let mut st = lock(&self.state);
        st.chunks.clear();
        st.windows.clear();
        st.stale.clear();
        st.blocks.clear();
        st.epoch += 1;
        if !st.observe(attr) || !truncated {
            // A newer answer (a commit of ours) already set the size, or
            // nothing was cut.
            return;
        }
        let size = attr.size;
        // A truncate cuts what this process still buffers, too: writes
        // buffered after the flush that preceded it stay, cut to the new
        // size.
        st.size = size;
        let mut freed = 0;
        st.dirty.retain(|&idx, d| {
            let keep = size.saturating_sub(idx * cs).min(cs) as u32;
            let before = d.bytes();
            d.truncate(keep);
            freed += before - d.bytes();
            !d.is_empty()
        });
        st.dirty_bytes -= freed;
        st.dirty_extents = st.dirty.values().map(|d| d.extent_count()).sum();
    }

    /// Marks a chunk as changed on metad (compacted): fetch it again.
    pub(crate) fn mark_stale(&self, index: u64) {
        let mut st = lock(&self.state);
        st.stale.insert(index);
        st.epoch += 1;
    }

    /// Fetches the chunk map around `index` (the whole window, or just the
    /// chunk when only it is stale).
    async fn fetch(&self, client: &Client, index: u64) -> FsResult<()> {
        let cs = self.chunk_size;
        loop {
            let (first, count, epoch) = {
                let st = lock(&self.state);
                if !st.needs_fetch(index, cs) {
                    return Ok(());
                }
                let w = index / WINDOW;
                if st.windows.contains(&w) {
                    (index, 1, st.epoch)
                } else {
                    (w * WINDOW, WINDOW, st.epoch)
                }
            };
            let reply = get_chunks(client, self.ino, first, count as u32).await?;
            let mut st = lock(&self.state);
            if st.epoch != epoch {
                // A commit of ours landed meanwhile; the reply may predate it.
                continue;
            }
            for i in first..first + count {
                st.chunks.remove(&i);
            }
            st.learn(reply.chunks, reply.blocks, cs)?;
            if count == WINDOW {
                st.windows.insert(first / WINDOW);
            } else {
                st.stale.remove(&index);
            }
            return Ok(());
        }
    }

    /// Plans a read of `[pos, pos + len)` of chunk `index`, or `None` when
    /// the chunk map must be fetched first.
    fn plan_read(&self, index: u64, pos: u32, len: u32) -> Option<ReadPlan> {
        let st = lock(&self.state);
        let end = pos + len;
        let dirty = st.dirty.get(&index);
        if dirty.is_some_and(|d| d.covers(pos, end)) {
            return Some(ReadPlan {
                pieces: Vec::new(),
                dirty: dirty.map(|d| d.copy_range(pos, end)).unwrap_or_default(),
            });
        }
        if st.needs_fetch(index, self.chunk_size) {
            return None;
        }
        let committed = st.chunks.get(&index);
        let in_batches = st.batches.values().any(|b| b.parts.iter().any(|p| p.chunk == index));
        let mut mem: Vec<(Arc<Vec<u8>>, u32)> = Vec::new();
        let extents: Arc<Vec<Extent>> = if !in_batches {
            committed.map(|c| c.extents.clone()).unwrap_or_default()
        } else {
            let mut all: Vec<Slice> = committed.map(|c| c.slices.clone()).unwrap_or_default();
            for b in st.batches.values() {
                for p in b.parts.iter().filter(|p| p.chunk == index) {
                    match (&b.data, b.slice_of(p)) {
                        (_, Some(s)) => all.push(s),
                        (BatchData::Memory { bufs, .. }, None) => {
                            all.push(Slice {
                                pos: p.pos,
                                len: p.len,
                                block_id: MEM_ID_BASE + mem.len() as u64,
                                block_off: 0,
                            });
                            mem.push((bufs[p.buf].clone(), p.off));
                        }
                        (BatchData::Stored(_), None) => {}
                    }
                }
            }
            Arc::new(slices::resolve(&all))
        };
        let mut pieces = Vec::new();
        let first = extents.partition_point(|e| e.end() <= pos);
        for e in &extents[first..] {
            if e.pos >= end {
                break;
            }
            if e.block_id == slices::ZERO_BLOCK {
                continue;
            }
            let a = e.pos.max(pos);
            let z = e.end().min(end);
            let delta = a - e.pos;
            let src = if e.block_id >= MEM_ID_BASE {
                let (buf, off) = &mem[(e.block_id - MEM_ID_BASE) as usize];
                // block_off counts from the part's first byte (see above).
                Source::Memory {
                    buf: buf.clone(),
                    off: off + e.block_off + delta,
                }
            } else {
                match st.blocks.get(&e.block_id) {
                    Some(loc) => Source::Block {
                        loc: loc.clone(),
                        off: e.block_off + delta,
                    },
                    None => {
                        // A block we were never told about: the map is stale.
                        drop(st);
                        self.mark_stale(index);
                        return None;
                    }
                }
            };
            pieces.push((a - pos, z - a, src));
        }
        Some(ReadPlan {
            pieces,
            dirty: dirty.map(|d| d.copy_range(pos, end)).unwrap_or_default(),
        })
    }

    /// Hands a batch of buffers to background uploads. Waiting for an
    /// upload slot is the backpressure that keeps a fast writer from
    /// buffering the whole file in memory.
    ///
    /// The bytes must move from `dirty` into `batches` under one hold of the
    /// state lock (see [`queue_batch`]): in between they would be in
    /// neither, so a read would miss acknowledged writes and a metad answer
    /// arriving then would set the size back below what the kernel knows
    /// (a short read makes the kernel shrink the file: SIGBUS under mmap).
    async fn start_batch(self: &Arc<Self>, client: &Client, queued: Option<(u64, Vec<Arc<Vec<u8>>>)>) {
        let Some((seq, bufs)) = queued else { return };
        for (i, data) in bufs.into_iter().enumerate() {
            let permit = self.upload_slots.clone().acquire_owned().await;
            let me = self.clone();
            let client = client.clone();
            tokio::spawn(async move {
                // A panic inside must not leave the upload counted forever.
                let res = std::panic::AssertUnwindSafe(me.upload(&client, &data));
                let res = futures::FutureExt::catch_unwind(res)
                    .await
                    .unwrap_or_else(|_| Err(FsError::Internal("block upload panicked".into())));
                drop(permit);
                me.finish_upload(&client, seq, i, data.len() as u64, res);
                if let Ok(buf) = Arc::try_unwrap(data) {
                    me.recycle(buf);
                }
            });
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        if buf.capacity() as u64 >= self.chunk_size {
            let mut spare = lock(&self.spare);
            if spare.len() < SPARE_BUFFERS {
                spare.push(buf);
            }
        }
    }

    async fn upload(&self, client: &Client, data: &Arc<Vec<u8>>) -> FsResult<BlockLoc> {
        let deadline = Instant::now() + client.inner.timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ab = client.allocate_block(self.ino, attempt > 1).await?;
            match client.inner.blocks.write_all(ab.block_id, data, &ab.replicas).await {
                Ok(()) => {
                    return Ok(BlockLoc {
                        block_id: ab.block_id,
                        len: data.len() as u64,
                        replicas: ab.replicas,
                        replica_ids: ab.replica_ids,
                    })
                }
                Err(e) => {
                    // Some replicas may hold this attempt's copy: never to be
                    // committed, so handed back.
                    client.abandon_later(vec![BlockLoc {
                        block_id: ab.block_id,
                        len: data.len() as u64,
                        replicas: ab.replicas,
                        replica_ids: ab.replica_ids,
                    }]);
                    // Ids allocated with the same (maybe dead) replicas are suspect.
                    client.forget_allocations().await;
                    if matches!(e, FsError::NoSpace(_)) || attempt >= UPLOAD_ATTEMPTS || Instant::now() >= deadline {
                        return Err(match e {
                            e @ (FsError::NoSpace(_) | FsError::Io(_)) => e,
                            other => FsError::Io(format!("could not store a block of inode {}: {other}", self.ino)),
                        });
                    }
                    tracing::warn!(ino = self.ino, error = %e, "block upload failed; retrying on a new allocation");
                }
            }
        }
    }

    fn finish_upload(self: &Arc<Self>, client: &Client, seq: u64, i: usize, len: u64, res: FsResult<BlockLoc>) {
        let commit_now = {
            let mut st = lock(&self.state);
            st.in_flight -= 1;
            match res {
                Ok(loc) => {
                    debug_assert_eq!(loc.len, len);
                    if let Some(b) = st.batches.get_mut(&seq) {
                        if let BatchData::Memory { stored, .. } = &mut b.data {
                            stored[i] = Some(loc);
                            if stored.iter().all(|s| s.is_some()) {
                                let locs = stored.iter_mut().filter_map(|s| s.take()).collect();
                                b.data = BatchData::Stored(locs);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(ino = self.ino, error = %e, "background block upload failed; writes and flushes of this file fail until it is closed");
                    st.error.get_or_insert(e);
                }
            }
            let now = st.error.is_none() && st.stored_slices() >= BACKGROUND_COMMIT_SLICES;
            if !now && st.error.is_none() && st.stored_slices() > 0 && !st.commit_scheduled {
                st.commit_scheduled = true;
                let (me, client) = (self.clone(), client.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(COMMIT_AFTER).await;
                    lock(&me.state).commit_scheduled = false;
                    let _c = me.commit_lock.lock().await;
                    loop {
                        match me.commit_stored(&client).await {
                            Ok(true) => continue,
                            Ok(false) => break,
                            Err(e) => {
                                tracing::warn!(ino = me.ino, error = %e, "background commit failed; the next flush retries");
                                break;
                            }
                        }
                    }
                });
            }
            now
        };
        self.upload_done.notify_waiters();
        if commit_now {
            // A writer that never flushes must not pile up uncommitted
            // slices; committing early is always allowed.
            let (me, client) = (self.clone(), client.clone());
            tokio::spawn(async move {
                if let Ok(_g) = me.commit_lock.try_lock() {
                    if let Err(e) = me.commit_stored(&client).await {
                        tracing::warn!(ino = me.ino, error = %e, "background commit failed; the next flush retries");
                    }
                }
            });
        }
    }

    async fn wait_uploads(&self) {
        loop {
            let notified = self.upload_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.state).in_flight == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Moves every dirty extent into a batch of packed blocks (one hold of
    /// the state lock: see [`OpenInode::start_batch`]).
    fn take_dirty(&self) -> Option<(u64, Vec<Arc<Vec<u8>>>)> {
        let mut st = lock(&self.state);
        st.dirty_bytes = 0;
        st.dirty_extents = 0;
        let extents: Vec<(u64, u32, Vec<u8>)> = std::mem::take(&mut st.dirty)
            .into_iter()
            .flat_map(|(idx, d)| d.into_extents().into_iter().map(move |(pos, b)| (idx, pos, b)))
            .collect();
        let (bufs, parts) = pack(extents, self.chunk_size as usize);
        queue_batch(&mut st, bufs, parts)
    }

    /// Uploads everything buffered, waits for it, and commits the slices.
    pub(crate) async fn flush(self: &Arc<Self>, client: &Client) -> FsResult<()> {
        let _one = self.flush_lock.lock().await;
        let queued = self.take_dirty();
        self.start_batch(client, queued).await;
        self.wait_uploads().await;
        let _c = self.commit_lock.lock().await;
        loop {
            if let Some(e) = lock(&self.state).error.clone() {
                return Err(e);
            }
            if !self.commit_stored(client).await? {
                return Ok(());
            }
        }
    }

    /// Commits the oldest stored batches; false when there was nothing to
    /// commit. The caller holds `commit_lock`.
    async fn commit_stored(self: &Arc<Self>, client: &Client) -> FsResult<bool> {
        let (seqs, new_blocks, slices) = {
            let mut st = lock(&self.state);
            // Sticky until the last handle closes: committing the blocks
            // that did arrive would publish a file with a piece missing.
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            let seqs = st.committable();
            if seqs.is_empty() {
                return Ok(false);
            }
            let mut new_blocks = Vec::new();
            let mut slices = Vec::new();
            for seq in &seqs {
                let Some(b) = st.batches.get_mut(seq) else { continue };
                b.commit_sent = true;
                let b = &*b;
                if let BatchData::Stored(locs) = &b.data {
                    new_blocks.extend(locs.iter().cloned());
                }
                for p in &b.parts {
                    if let Some(s) = b.slice_of(p) {
                        slices.push((p.chunk, s));
                    }
                }
            }
            (seqs, new_blocks, slices)
        };
        let (ns, ino) = (client.ns_id(), self.ino);
        let t0 = Instant::now();
        let wire: Vec<rpc::ChunkSlice> = slices
            .iter()
            .map(|(chunk, s)| rpc::ChunkSlice {
                chunk: *chunk,
                slice: Some((*s).into()),
            })
            .collect();
        let reply = client
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::CommitSlicesRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    new_blocks: new_blocks.clone(),
                    slices: wire.clone(),
                    mtime: None,
                };
                async move { c.commit_slices(req).await }
            })
            .await?;
        let attr = attr_of(reply.attr)?;
        tracing::debug!(
            ino,
            slices = slices.len(),
            blocks = new_blocks.len(),
            size = attr.size,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "slices committed"
        );
        {
            let mut st = lock(&self.state);
            let cs = self.chunk_size;
            for b in new_blocks {
                st.blocks.insert(b.block_id, b);
            }
            let mut touched: BTreeMap<u64, Vec<Slice>> = BTreeMap::new();
            for (chunk, s) in slices {
                touched.entry(chunk).or_default().push(s);
            }
            for (chunk, added) in touched {
                // Only chunks whose committed map we know get the new slices;
                // the rest are fetched (with them) when needed.
                let known = st.windows.contains(&(chunk / WINDOW)) || chunk.saturating_mul(cs) >= st.server_size;
                if known && !st.stale.contains(&chunk) {
                    let mut all = st.chunks.remove(&chunk).map(|c| c.slices).unwrap_or_default();
                    all.extend(added);
                    let keep = slices::prune(&all);
                    let all: Vec<Slice> = all.into_iter().zip(keep).filter(|(_, k)| *k).map(|(s, _)| s).collect();
                    st.chunks.insert(chunk, ChunkView::new(all));
                } else {
                    st.stale.insert(chunk);
                }
            }
            for seq in seqs {
                st.batches.remove(&seq);
            }
            st.epoch += 1;
            st.observe(&attr);
        }
        if !reply.fragmented.is_empty() {
            client.compact_later(ino, reply.fragmented);
        }
        Ok(true)
    }

    /// Uploads partial chunks early when too much is buffered.
    async fn limit_dirty(self: &Arc<Self>, client: &Client) {
        let over = {
            let st = lock(&self.state);
            st.dirty_bytes > DIRTY_BYTES || st.dirty_extents > DIRTY_EXTENTS
        };
        if over {
            let queued = self.take_dirty();
            self.start_batch(client, queued).await;
        }
    }

    /// The data ranges (merged, in file offsets) of chunks `[first, last]`,
    /// from the committed map: the caller has flushed.
    async fn data_ranges(&self, client: &Client, first: u64, last: u64) -> FsResult<Vec<(u64, u64)>> {
        let cs = self.chunk_size;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut index = first;
        while index <= last {
            self.fetch(client, index).await?;
            let st = lock(&self.state);
            if st.needs_fetch(index, cs) {
                continue;
            }
            let window_end = ((index / WINDOW) + 1) * WINDOW;
            while index <= last && index < window_end {
                if let Some(c) = st.chunks.get(&index) {
                    for (a, b) in slices::data_ranges(&c.slices) {
                        let (a, b) = (index * cs + a as u64, index * cs + b as u64);
                        match out.last_mut() {
                            Some(l) if l.1 >= a => l.1 = l.1.max(b),
                            _ => out.push((a, b)),
                        }
                    }
                }
                index += 1;
                if st.needs_fetch(index, cs) {
                    break;
                }
            }
        }
        Ok(out)
    }
}

async fn get_chunks(client: &Client, ino: u64, first_index: u64, count: u32) -> FsResult<rpc::GetChunksReply> {
    let req = rpc::GetChunksRequest {
        ns: client.ns_id(),
        ino,
        first_index,
        count,
    };
    client.meta().call(|mut c| async move { c.get_chunks(req).await }).await
}

/// Opens `ino`: registers the handle and refreshes the chunk map and size
/// from metad (close-to-open).
pub(crate) async fn open(client: &Client, ino: u64) -> FsResult<FileHandle> {
    // Count the handle before asking metad: an unlink or rename racing with
    // this open then sees the file as open here and keeps it as an orphan.
    let file = acquire(client, ino);
    let res = refresh(client, &file).await;
    finish_open(client, file, res).await
}

/// Opens a file whose attributes are fresh from metad; an empty file needs
/// no chunk map.
pub(crate) async fn open_with(client: &Client, attr: &Attr) -> FsResult<FileHandle> {
    if attr.size == 0 && attr.mode & rpc::S_IFMT == rpc::S_IFREG {
        let file = acquire(client, attr.ino);
        // Only a file nobody here has open may skip the fetch: with other
        // handles open, the shared state may already be newer than `attr`
        // (a truncate that grew the file since metad answered the create).
        let fresh = {
            let st = lock(&file.state);
            st.handles == 1 && st.epoch == 0 && !st.has_unflushed()
        };
        let res = if fresh {
            install(&file, attr, Vec::new(), Vec::new(), None).map(|_| attr.clone())
        } else {
            refresh(client, &file).await
        };
        return finish_open(client, file, res).await;
    }
    open(client, attr.ino).await
}

async fn refresh(client: &Client, f: &OpenInode) -> FsResult<Attr> {
    loop {
        let epoch = lock(&f.state).epoch;
        let reply = get_chunks(client, f.ino, 0, WINDOW as u32).await?;
        let attr = attr_of(reply.attr)?;
        match install(f, &attr, reply.chunks, reply.blocks, Some(epoch)) {
            Err(FsError::Unavailable(_)) => continue,
            Err(e) => return Err(e),
            Ok(()) => return Ok(attr),
        }
    }
}

async fn finish_open(client: &Client, file: Arc<OpenInode>, res: FsResult<Attr>) -> FsResult<FileHandle> {
    let attr = match res {
        Ok(a) => a,
        Err(e) => {
            close_handle(client, &file).await;
            return Err(e);
        }
    };
    Ok(FileHandle {
        client: client.clone(),
        file,
        opened: attr,
        pattern: Mutex::new(ReadPattern::default()),
        released: AtomicBool::new(false),
    })
}

/// Counts one more handle of `ino`, creating its shared state if needed.
fn acquire(client: &Client, ino: u64) -> Arc<OpenInode> {
    let mut open = lock(&client.inner.open);
    let f = open
        .entry(ino)
        .or_insert_with(|| Arc::new(OpenInode::new(ino, client.block_size())))
        .clone();
    lock(&f.state).handles += 1;
    f
}

/// Registers buffers about to be uploaded as the next batch, in the same
/// hold of the state lock that took them out of `dirty`; returns the
/// batch's sequence number and the shared buffers for the uploads.
fn queue_batch(st: &mut State, bufs: Vec<Vec<u8>>, parts: Vec<Part>) -> Option<(u64, Vec<Arc<Vec<u8>>>)> {
    if parts.is_empty() {
        return None;
    }
    let bufs: Vec<Arc<Vec<u8>>> = bufs.into_iter().map(Arc::new).collect();
    st.next_seq += 1;
    let seq = st.next_seq;
    st.batches.insert(
        seq,
        Batch {
            parts,
            data: BatchData::Memory {
                bufs: bufs.clone(),
                stored: vec![None; bufs.len()],
            },
            commit_sent: false,
        },
    );
    st.in_flight += bufs.len();
    Some((seq, bufs))
}

/// Installs what metad just said (close-to-open). `Unavailable` asks the
/// caller to fetch again: a local commit landed while the answer was on
/// its way.
fn install(
    f: &OpenInode,
    attr: &Attr,
    chunks: Vec<rpc::Chunk>,
    blocks: Vec<BlockLoc>,
    epoch: Option<u64>,
) -> FsResult<()> {
    if attr.mode & rpc::S_IFMT != rpc::S_IFREG {
        return Err(if attr.mode & rpc::S_IFMT == rpc::S_IFDIR {
            FsError::IsDirectory
        } else {
            FsError::InvalidArgument(format!("inode {} is not a regular file", attr.ino))
        });
    }
    let mut st = lock(&f.state);
    if epoch.is_some_and(|e| e != st.epoch) {
        return Err(FsError::Unavailable("chunk map changed while it was fetched".into()));
    }
    st.chunks.clear();
    st.blocks.clear();
    st.stale.clear();
    st.windows = HashSet::from([0]);
    st.learn(chunks, blocks, f.chunk_size)?;
    st.observe(attr);
    Ok(())
}

#[derive(Default)]
struct ReadPattern {
    /// End of the previous read.
    last_end: u64,
    /// Reads in a row that continued where the previous one ended.
    streak: u32,
}

/// An open regular file. Reads see unflushed writes made through any handle
/// of this process; `flush`/`fsync`/`release` make them durable and visible
/// to other clients that open the file afterwards.
pub struct FileHandle {
    client: Client,
    file: Arc<OpenInode>,
    /// The committed attributes metad reported at open.
    opened: Attr,
    pattern: Mutex<ReadPattern>,
    released: AtomicBool,
}

impl FileHandle {
    pub fn ino(&self) -> u64 {
        self.file.ino
    }

    /// The file's committed attributes as metad reported them at open (for
    /// deciding whether cached pages are still those of this file).
    pub fn attr_at_open(&self) -> &Attr {
        &self.opened
    }

    /// The file size as this process sees it (includes unflushed writes).
    pub fn size(&self) -> u64 {
        lock(&self.file.state).size
    }

    /// Up to `len` bytes at `offset`; shorter only at end of file. Holes
    /// read as zeros.
    pub async fn read_at(&self, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let f = &self.file;
        let cs = f.chunk_size;
        let size = lock(&f.state).size;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let sequential = {
            // Sequential: each read starts close to where the last one ended
            // (the kernel's readahead requests may arrive slightly out of
            // order on several FUSE threads). Random reads must not trigger
            // whole-block fetches and readahead, so one near read is not
            // enough: it takes two in a row.
            let mut p = lock(&self.pattern);
            let near = offset.abs_diff(p.last_end) <= SEQUENTIAL_GAP;
            p.streak = if near { p.streak.saturating_add(1) } else { 0 };
            p.last_end = if near { p.last_end.max(end) } else { end };
            p.streak >= 2
        };
        let mut out = vec![0u8; (end - offset) as usize];
        let ps = pieces(offset, out.len(), cs);
        for piece in &ps {
            let dst = &mut out[piece.buf_pos..piece.buf_pos + piece.len];
            self.read_chunk(piece.index, piece.offset as u32, dst, sequential)
                .await?;
        }
        if sequential {
            if let Some(last) = ps.last() {
                self.prefetch(last.index + 1, size);
            }
        }
        Ok(out)
    }

    async fn read_chunk(&self, index: u64, pos: u32, dst: &mut [u8], whole_block: bool) -> FsResult<()> {
        let f = &self.file;
        let mut refetched = false;
        loop {
            let Some(plan) = f.plan_read(index, pos, dst.len() as u32) else {
                f.fetch(&self.client, index).await?;
                continue;
            };
            dst.fill(0);
            let mut failed = None;
            for (at, n, src) in &plan.pieces {
                let out = &mut dst[*at as usize..(*at + *n) as usize];
                match src {
                    Source::Memory { buf, off } => out.copy_from_slice(&buf[*off as usize..(*off + *n) as usize]),
                    Source::Block { loc, off } => {
                        if let Err(e) = self.read_block(loc, *off, out, whole_block).await {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                if refetched {
                    return Err(e);
                }
                // Our map may be older than a compaction that replaced (and
                // let the blockds delete) a block: fetch the chunk again once.
                tracing::debug!(ino = f.ino, index, error = %e, "block read failed; refreshing the chunk map");
                refetched = true;
                f.mark_stale(index);
                continue;
            }
            for (p, bytes) in plan.dirty {
                let at = (p - pos) as usize;
                dst[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            return Ok(());
        }
    }

    async fn read_block(&self, loc: &BlockLoc, off: u32, out: &mut [u8], whole_block: bool) -> FsResult<()> {
        let blocks = &self.client.inner.blocks;
        let (off, n) = (off as usize, out.len());
        if off + n > loc.len as usize {
            return Err(FsError::Io(format!(
                "block {} has {} bytes; a slice wants {n} at {off}",
                loc.block_id, loc.len
            )));
        }
        if whole_block || blocks.cached(loc.block_id) {
            let data = blocks.whole(loc.block_id, loc.len, &loc.replicas).await?;
            out.copy_from_slice(&data[off..off + n]);
        } else {
            let data = blocks.read(loc.block_id, off as u64, n as u64, &loc.replicas).await?;
            out.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Starts fetching the blocks of the next chunks of a sequential reader.
    fn prefetch(&self, from: u64, size: u64) {
        let cs = self.file.chunk_size;
        for index in from..from + READAHEAD_CHUNKS {
            if index.saturating_mul(cs) >= size {
                break;
            }
            let (f, client) = (self.file.clone(), self.client.clone());
            tokio::spawn(async move {
                if f.fetch(&client, index).await.is_err() {
                    return;
                }
                let locs: Vec<BlockLoc> = {
                    let st = lock(&f.state);
                    let Some(c) = st.chunks.get(&index) else { return };
                    let mut ids: Vec<u64> = c.extents.iter().map(|e| e.block_id).filter(|&b| b != 0).collect();
                    ids.dedup();
                    ids.iter().filter_map(|id| st.blocks.get(id).cloned()).collect()
                };
                for loc in locs {
                    if !client.inner.blocks.cached(loc.block_id) {
                        // Errors are reported by the read that needs the block.
                        let _ = client.inner.blocks.whole(loc.block_id, loc.len, &loc.replicas).await;
                    }
                }
            });
        }
    }

    /// Writes all of `data` at `offset` (buffered; full chunks are uploaded
    /// in the background at once, partial ones when the buffer is large or
    /// at flush). Returns `data.len()`.
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> FsResult<usize> {
        let f = &self.file;
        let cs = f.chunk_size;
        if let Some(e) = lock(&f.state).error.clone() {
            return Err(e);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::FileTooBig)?;
        if end > crate::MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        for piece in pieces(offset, data.len(), cs) {
            let src = &data[piece.buf_pos..piece.buf_pos + piece.len];
            let full = {
                let mut guard = lock(&f.state);
                let st = &mut *guard;
                let d = st.dirty.entry(piece.index).or_default();
                let extents_before = d.extent_count();
                let spare = || lock(&f.spare).pop();
                let grown = d.write(piece.offset as u32, src, spare);
                let extents_after = d.extent_count();
                let full = d.is_full(cs);
                st.dirty_bytes += grown;
                st.dirty_extents = (st.dirty_extents + extents_after).saturating_sub(extents_before);
                let chunk_end = piece.index * cs + (piece.offset + piece.len) as u64;
                st.size = st.size.max(chunk_end);
                if full {
                    // A full chunk goes up at once, as its own block; it
                    // moves to a batch under this same lock.
                    let d = st.dirty.remove(&piece.index).unwrap_or_default();
                    st.dirty_bytes -= d.bytes();
                    st.dirty_extents -= d.extent_count();
                    let buf = d.into_extents().into_values().next().unwrap_or_default();
                    let part = Part {
                        chunk: piece.index,
                        pos: 0,
                        len: buf.len() as u32,
                        buf: 0,
                        off: 0,
                    };
                    queue_batch(st, vec![buf], vec![part])
                } else {
                    None
                }
            };
            if full.is_some() {
                f.start_batch(&self.client, full).await;
            }
        }
        f.limit_dirty(&self.client).await;
        Ok(data.len())
    }

    /// Uploads buffered data and commits it: on return the data is on
    /// every replica and visible to clients that open the file.
    pub async fn flush(&self) -> FsResult<()> {
        self.file.flush(&self.client).await
    }

    /// Same as [`FileHandle::flush`] (there is no weaker durability level).
    pub async fn fsync(&self) -> FsResult<()> {
        self.flush().await
    }

    /// `lseek(SEEK_DATA)` (`data` true) or `SEEK_HOLE` from `offset`:
    /// `None` is ENXIO. Answers at 4 KiB granularity, as ext4 does.
    pub async fn seek_data_hole(&self, offset: u64, data: bool) -> FsResult<Option<u64>> {
        self.flush().await?;
        let f = &self.file;
        let size = lock(&f.state).size;
        if offset >= size {
            return Ok(None);
        }
        let cs = f.chunk_size;
        let ranges = f.data_ranges(&self.client, offset / cs, (size - 1) / cs).await?;
        Ok(crate::layout::seek_data_hole(&ranges, offset, size, data))
    }

    /// Flushes and closes the handle; the last release of a file that was
    /// unlinked while open frees its data. A second call does nothing.
    pub async fn release(&self) -> FsResult<()> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let res = self.flush().await;
        close_handle(&self.client, &self.file).await;
        res
    }
}

/// Drops one handle of the inode; the last one forgets the shared state and
/// frees an orphan.
async fn close_handle(client: &Client, f: &Arc<OpenInode>) {
    let orphan = {
        let mut open = lock(&client.inner.open);
        let mut st = lock(&f.state);
        st.handles = st.handles.saturating_sub(1);
        if st.handles > 0 {
            return;
        }
        if open.get(&f.ino).is_some_and(|g| Arc::ptr_eq(g, f)) {
            open.remove(&f.ino);
        }
        if st.error.is_some() {
            // The write failed for good: blocks it stored and never tried
            // to commit would hold disk space until a block report finds
            // them. Hand them back now.
            let batches = std::mem::take(&mut st.batches);
            let locs: Vec<BlockLoc> = batches
                .into_values()
                .filter(|b| !b.commit_sent)
                .flat_map(|b| match b.data {
                    BatchData::Stored(locs) => locs,
                    BatchData::Memory { stored, .. } => stored.into_iter().flatten().collect(),
                })
                .collect();
            client.abandon_later(locs);
        }
        // Still referenced otherwise (pinned): the last unpin frees it.
        st.orphan
            && match lock(&client.inner.pins).get_mut(&f.ino) {
                Some(p) => {
                    p.orphan = true;
                    false
                }
                None => true,
            }
    };
    if orphan {
        client.release_orphan(f.ino).await;
    }
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        // Forgotten release: do it in the background if we can.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, file) = (self.client.clone(), self.file.clone());
            rt.spawn(async move {
                if let Err(e) = file.flush(&client).await {
                    tracing::error!(ino = file.ino, error = %e, "flush of a dropped file handle failed");
                }
                close_handle(&client, &file).await;
            });
        }
    }
}

/// Background compaction of one chunk: its visible bytes rewritten as one
/// block, committed only if the chunk did not change meanwhile. Runs in any
/// client that committed slices and was told the chunk is fragmented.
pub(crate) async fn compact_chunk(client: &Client, ino: u64, index: u64) -> FsResult<bool> {
    let cs = client.block_size();
    let reply = get_chunks(client, ino, index, 1).await?;
    let Some(chunk) = reply.chunks.into_iter().find(|c| c.index == index) else {
        return Ok(false);
    };
    if chunk.slices.len() <= 1 {
        return Ok(false);
    }
    let version = chunk.version;
    let slices = chunk
        .slices
        .iter()
        .map(|s| checked_slice(s, cs))
        .collect::<FsResult<Vec<_>>>()?;
    let locs: HashMap<u64, BlockLoc> = reply.blocks.into_iter().map(|b| (b.block_id, b)).collect();
    let extents: Vec<Extent> = slices::resolve(&slices)
        .into_iter()
        .filter(|e| e.block_id != slices::ZERO_BLOCK)
        .collect();
    // Read each source block once, over the span this chunk uses of it.
    let mut spans: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    for e in &extents {
        let s = spans.entry(e.block_id).or_insert((u32::MAX, 0));
        s.0 = s.0.min(e.block_off);
        s.1 = s.1.max(e.block_off + e.len);
    }
    let mut data: HashMap<u64, (u32, Vec<u8>)> = HashMap::new();
    for (id, (a, z)) in spans {
        let loc = locs
            .get(&id)
            .ok_or_else(|| FsError::Internal(format!("metad sent no location for block {id}")))?;
        let bytes = client
            .inner
            .blocks
            .read(id, a as u64, (z - a) as u64, &loc.replicas)
            .await?;
        data.insert(id, (a, bytes));
    }
    // Runs of touching extents become one slice each; holes stay holes.
    let mut buf = Vec::new();
    let mut out: Vec<Slice> = Vec::new();
    for e in &extents {
        let (base, bytes) = &data[&e.block_id];
        let from = (e.block_off - base) as usize;
        let off = buf.len() as u32;
        buf.extend_from_slice(&bytes[from..from + e.len as usize]);
        match out.last_mut() {
            Some(l) if l.end() == e.pos => l.len += e.len,
            _ => out.push(Slice {
                pos: e.pos,
                len: e.len,
                block_id: 0,
                block_off: off,
            }),
        }
    }
    if buf.is_empty() || out.len() >= slices.len() {
        return Ok(false);
    }
    let data = Arc::new(buf);
    let ab = client.allocate_block(ino, false).await?;
    client.inner.blocks.write_all(ab.block_id, &data, &ab.replicas).await?;
    for s in &mut out {
        s.block_id = ab.block_id;
    }
    let block = BlockLoc {
        block_id: ab.block_id,
        len: data.len() as u64,
        replicas: ab.replicas,
        replica_ids: ab.replica_ids,
    };
    let ns = client.ns_id();
    let wire: Vec<rpc::Slice> = out.iter().map(|s| (*s).into()).collect();
    let reply = client
        .meta()
        .call_mut(|mut c, hdr| {
            let req = rpc::CompactChunkRequest {
                hdr: Some(hdr),
                ns,
                ino,
                chunk: index,
                version,
                block: Some(block.clone()),
                slices: wire.clone(),
            };
            async move { c.compact_chunk(req).await }
        })
        .await?;
    if reply.applied {
        if let Some(f) = client.open_inode(ino) {
            f.mark_stale(index);
        }
    }
    tracing::debug!(
        ino,
        index,
        from = slices.len(),
        to = out.len(),
        applied = reply.applied,
        "chunk compacted"
    );
    Ok(reply.applied)
}
