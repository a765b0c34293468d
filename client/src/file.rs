//! Open files: per-inode write buffers, background block uploads, the
//! block-map cache and readahead.
//!
//! All handles of one inode in this process share one [`OpenInode`], so a
//! read through any handle sees every unflushed write of this process, and
//! `flush` on any handle commits all of them. Blocks are immutable on the
//! blockds: each changed block is uploaded under a fresh block id and the new
//! refs are committed to metad (CommitWrite) at flush, fsync and release.
//!
//! Where a block's current content lives, newest first:
//! `dirty` (being written here) → `uploading` (sent to blockds now) →
//! `pending` (on blockds, not yet committed) → `map` (committed) → a hole.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use jfs_common::rpc::{self, AllocatedBlock, Attr, BlockRef};
use tokio::sync::{Notify, Semaphore};

use crate::layout::{bytes_in_block, pieces, DirtyBlock};
use crate::{attr_of, lock, Client, FsError, FsResult};

/// Block refs fetched per GetBlocks call (a window of the block map).
const MAP_WINDOW: u64 = 4096;
/// Block uploads in flight per open file.
const UPLOADS_IN_FLIGHT: usize = 4;
/// Partially written blocks kept in memory per file before the oldest are
/// uploaded anyway (in bytes; at least 16 blocks).
const DIRTY_BYTES: u64 = 64 << 20;
/// Block ids asked for per AllocateBlocks call.
const ALLOC_BATCH: u32 = 8;
/// Attempts to store one block (each on a fresh allocation) before failing.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Block buffers kept per open file for reuse: a recycled buffer is
/// already mapped, a fresh one page-faults on every 4 KiB as it fills.
const SPARE_BUFFERS: usize = 6;
/// Blocks read ahead of a sequential reader.
const READAHEAD_BLOCKS: u64 = 4;

pub(crate) struct OpenInode {
    ino: u64,
    block_size: u64,
    state: Mutex<State>,
    /// Signalled whenever an upload finishes.
    upload_done: Notify,
    upload_slots: Arc<Semaphore>,
    /// One flush (commit) at a time per file.
    flush_lock: tokio::sync::Mutex<()>,
    alloc: tokio::sync::Mutex<VecDeque<AllocatedBlock>>,
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
    /// The size changed here and is not committed yet.
    size_dirty: bool,
    /// Committed refs by block index (the windows in `windows` are complete).
    map: HashMap<u64, BlockRef>,
    windows: HashSet<u64>,
    dirty: BTreeMap<u64, DirtyBlock>,
    /// Index → (upload version, content).
    uploading: HashMap<u64, (u64, Arc<Vec<u8>>)>,
    pending: BTreeMap<u64, BlockRef>,
    next_version: u64,
    in_flight: usize,
    /// First error of a background upload: every later write and flush of
    /// this file fails with it until the last handle is released.
    error: Option<FsError>,
}

impl State {
    fn has_unflushed(&self) -> bool {
        self.size_dirty || !self.dirty.is_empty() || !self.uploading.is_empty() || !self.pending.is_empty()
    }

    /// The newest stored (uploaded or committed) ref of a block.
    fn stored_ref(&self, index: u64) -> Option<&BlockRef> {
        self.pending.get(&index).or_else(|| self.map.get(&index))
    }

    /// The map window holding `index` must be fetched before we can tell a
    /// hole from an unknown block.
    fn needs_window(&self, index: u64, block_size: u64) -> bool {
        index.saturating_mul(block_size) < self.server_size
            && !self.windows.contains(&(index / MAP_WINDOW))
            && !self.pending.contains_key(&index)
    }
}

impl OpenInode {
    fn new(ino: u64, block_size: u64) -> OpenInode {
        OpenInode {
            ino,
            block_size,
            state: Mutex::new(State::default()),
            upload_done: Notify::new(),
            upload_slots: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
            flush_lock: tokio::sync::Mutex::new(()),
            alloc: tokio::sync::Mutex::new(VecDeque::new()),
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

    /// metad truncated or extended the file to `size` (after our flush).
    pub(crate) fn truncated(&self, size: u64) {
        let bs = self.block_size;
        let mut st = lock(&self.state);
        st.size = size;
        st.server_size = size;
        st.size_dirty = false;
        let cut = |refs: &mut dyn Iterator<Item = (&u64, &mut BlockRef)>| {
            for (&idx, r) in refs {
                r.len = r.len.min(bytes_in_block(size, idx, bs));
            }
        };
        cut(&mut st.map.iter_mut());
        cut(&mut st.pending.iter_mut());
        st.map.retain(|_, r| r.len > 0);
        st.pending.retain(|_, r| r.len > 0);
        st.dirty.retain(|&idx, _| bytes_in_block(size, idx, bs) > 0);
        for (&idx, d) in st.dirty.iter_mut() {
            d.truncate(bytes_in_block(size, idx, bs) as usize);
        }
    }

    /// Fetches the block-map window that holds `index`.
    async fn ensure_window(&self, client: &Client, index: u64) -> FsResult<()> {
        let w = index / MAP_WINDOW;
        if lock(&self.state).windows.contains(&w) {
            return Ok(());
        }
        let reply = get_blocks(client, self.ino, w * MAP_WINDOW).await?;
        let mut st = lock(&self.state);
        if st.windows.insert(w) {
            for b in reply.blocks {
                // Our own commits since the request are newer than its answer.
                st.map.entry(b.index).or_insert(b);
            }
        }
        Ok(())
    }

    /// Reads the old content under a partially written block and merges it.
    async fn load_base(&self, client: &Client, index: u64) -> FsResult<()> {
        let (r, base_len) = {
            let st = lock(&self.state);
            match st.dirty.get(&index) {
                Some(d) if d.needs_base() => (st.stored_ref(index).cloned(), d.base_len as u64),
                _ => return Ok(()),
            }
        };
        let data: Vec<u8> = match r {
            Some(r) if r.len > 0 => {
                let n = base_len.min(r.len);
                if client.inner.blocks.cached(r.block_id) {
                    let whole = client.inner.blocks.whole(r.block_id, r.len, &r.replicas).await?;
                    whole[..n as usize].to_vec()
                } else {
                    client.inner.blocks.read(r.block_id, 0, n, &r.replicas).await?
                }
            }
            _ => Vec::new(),
        };
        let mut st = lock(&self.state);
        if let Some(d) = st.dirty.get_mut(&index) {
            if d.needs_base() {
                d.merge_base(&data);
            }
        }
        Ok(())
    }

    /// Hands a finished block to a background upload. The block stays
    /// readable from `uploading` until its ref is pending.
    async fn start_upload(self: &Arc<Self>, client: &Client, index: u64, buf: Vec<u8>) {
        let data = Arc::new(buf);
        let version = {
            let mut st = lock(&self.state);
            st.next_version += 1;
            let v = st.next_version;
            st.uploading.insert(index, (v, data.clone()));
            st.in_flight += 1;
            v
        };
        // Waiting here is the backpressure that keeps a fast writer from
        // buffering the whole file in memory.
        let permit = self.upload_slots.clone().acquire_owned().await;
        let me = self.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let res = me.upload(&client, &data).await;
            drop(permit);
            me.finish_upload(index, version, data.len() as u64, res);
            if let Ok(buf) = Arc::try_unwrap(data) {
                me.recycle(buf);
            }
        });
    }

    fn recycle(&self, buf: Vec<u8>) {
        if buf.capacity() as u64 >= self.block_size {
            let mut spare = lock(&self.spare);
            if spare.len() < SPARE_BUFFERS {
                spare.push(buf);
            }
        }
    }

    async fn upload(&self, client: &Client, data: &Arc<Vec<u8>>) -> FsResult<(u64, Vec<String>)> {
        let deadline = Instant::now() + client.inner.timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let t0 = Instant::now();
            let ab = self.allocate(client).await?;
            let t1 = Instant::now();
            match client.inner.blocks.write_all(ab.block_id, data, &ab.replicas).await {
                Ok(()) => {
                    tracing::debug!(
                        ino = self.ino,
                        block_id = ab.block_id,
                        bytes = data.len(),
                        alloc_ms = (t1 - t0).as_secs_f64() * 1e3,
                        write_ms = t1.elapsed().as_secs_f64() * 1e3,
                        "block stored"
                    );
                    return Ok((ab.block_id, ab.replicas));
                }
                Err(e) => {
                    // Ids allocated with the same (maybe dead) replicas are suspect.
                    self.alloc.lock().await.clear();
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

    async fn allocate(&self, client: &Client) -> FsResult<AllocatedBlock> {
        let mut pool = self.alloc.lock().await;
        if let Some(b) = pool.pop_front() {
            return Ok(b);
        }
        let (ns, ino) = (client.ns_id(), self.ino);
        let reply = client
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::AllocateBlocksRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    count: ALLOC_BATCH,
                };
                async move { c.allocate_blocks(req).await }
            })
            .await?;
        pool.extend(reply.blocks);
        pool.pop_front()
            .ok_or_else(|| FsError::NoSpace("metad allocated no block (no live blockd with free space?)".into()))
    }

    fn finish_upload(&self, index: u64, version: u64, len: u64, res: FsResult<(u64, Vec<String>)>) {
        let mut st = lock(&self.state);
        st.in_flight -= 1;
        let current = st.uploading.get(&index).is_some_and(|(v, _)| *v == version);
        if current {
            st.uploading.remove(&index);
        }
        match res {
            Ok((block_id, replicas)) if current => {
                // A truncate while uploading may have cut this block.
                let len = len.min(bytes_in_block(st.size, index, self.block_size));
                if len > 0 {
                    st.pending.insert(
                        index,
                        BlockRef {
                            index,
                            block_id,
                            len,
                            replicas,
                        },
                    );
                }
            }
            // Superseded by a newer write of the same block: drop it (the
            // unreferenced block is collected on the blockds later).
            Ok(_) => {}
            Err(e) => {
                tracing::error!(ino = self.ino, index, error = %e, "background block upload failed; writes and flushes of this file fail until it is closed");
                st.error.get_or_insert(e);
            }
        }
        drop(st);
        self.upload_done.notify_waiters();
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

    /// Uploads everything buffered, waits for it, and commits the block map.
    pub(crate) async fn flush(self: &Arc<Self>, client: &Client) -> FsResult<()> {
        let _one = self.flush_lock.lock().await;
        // Partial blocks over old content need the old bytes first.
        let need_base: Vec<u64> = lock(&self.state)
            .dirty
            .iter()
            .filter(|(_, d)| d.needs_base())
            .map(|(&i, _)| i)
            .collect();
        for idx in need_base {
            if let Err(e) = self.load_base(client, idx).await {
                return Err(FsError::Io(format!(
                    "cannot read the old content of block {idx} of inode {} to update it: {e}",
                    self.ino
                )));
            }
        }
        let dirty: Vec<(u64, DirtyBlock)> = {
            let mut st = lock(&self.state);
            let taken = std::mem::take(&mut st.dirty);
            // A block written again after the merge above goes back to
            // `dirty` and waits for the next flush; the rest can go now.
            let (ready, again): (Vec<_>, Vec<_>) = taken.into_iter().partition(|(_, d)| !d.needs_base());
            st.dirty.extend(again);
            ready
        };
        for (idx, d) in dirty {
            self.start_upload(client, idx, d.buf).await;
        }
        self.wait_uploads().await;
        self.commit(client).await
    }

    async fn commit(&self, client: &Client) -> FsResult<()> {
        let (blocks, size) = {
            let st = lock(&self.state);
            // Sticky until the last handle closes: committing the blocks
            // that did arrive would publish a file with a piece missing.
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.pending.is_empty() && !st.size_dirty {
                return Ok(());
            }
            (st.pending.values().cloned().collect::<Vec<_>>(), st.size)
        };
        let (ns, ino) = (client.ns_id(), self.ino);
        let t0 = Instant::now();
        let nblocks = blocks.len();
        let reply = client
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::CommitWriteRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    blocks: blocks.clone(),
                    size,
                    mtime: None,
                };
                async move { c.commit_write(req).await }
            })
            .await?;
        let attr = attr_of(reply.attr)?;
        tracing::debug!(
            ino,
            blocks = nblocks,
            size,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "write committed"
        );
        let mut st = lock(&self.state);
        for b in blocks {
            if st.pending.get(&b.index).is_some_and(|p| p.block_id == b.block_id) {
                st.pending.remove(&b.index);
            }
            st.map.insert(b.index, b);
        }
        st.server_size = attr.size;
        if st.size == size {
            st.size_dirty = false;
        }
        Ok(())
    }

    /// Uploads the oldest partial blocks when too many are buffered.
    async fn limit_dirty(self: &Arc<Self>, client: &Client) -> FsResult<()> {
        let max = (DIRTY_BYTES / self.block_size).max(16) as usize;
        loop {
            let victim = {
                let st = lock(&self.state);
                if st.dirty.len() <= max {
                    return Ok(());
                }
                st.dirty.keys().next().copied()
            };
            let Some(idx) = victim else { return Ok(()) };
            self.load_base(client, idx).await?;
            let d = {
                let mut st = lock(&self.state);
                match st.dirty.get(&idx) {
                    Some(d) if !d.needs_base() => st.dirty.remove(&idx),
                    _ => None,
                }
            };
            if let Some(d) = d {
                self.start_upload(client, idx, d.buf).await;
            }
        }
    }
}

enum WriteOutcome {
    /// Written; carries the block when it became full (ready to upload).
    Done(Option<DirtyBlock>),
    /// The block map window must be fetched first.
    NeedWindow,
}

impl OpenInode {
    /// Copies one piece of a write into the block's buffer (under the lock;
    /// no IO).
    fn write_piece(&self, index: u64, offset: usize, src: &[u8]) -> WriteOutcome {
        let bs = self.block_size;
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if !st.dirty.contains_key(&index) {
            let block = if let Some((_, content)) = st.uploading.get(&index) {
                // Rewriting a block on its way out: start from its content.
                DirtyBlock::from_content(content)
            } else if st.needs_window(index, bs) {
                return WriteOutcome::NeedWindow;
            } else {
                let base_len = st
                    .stored_ref(index)
                    .map_or(0, |r| r.len.min(bytes_in_block(st.size, index, bs)));
                // A write at the start of a block is most likely the first of a
                // sequential run: give it a whole (recycled) block buffer.
                let recycled = if offset == 0 { lock(&self.spare).pop() } else { None };
                match recycled {
                    Some(buf) => DirtyBlock::with_buffer(base_len as usize, buf),
                    None => {
                        let cap = if offset == 0 { bs as usize } else { offset + src.len() };
                        DirtyBlock::new(base_len as usize, cap)
                    }
                }
            };
            st.dirty.insert(index, block);
        }
        let end = index * bs + (offset + src.len()) as u64;
        if end > st.size {
            st.size = end;
        }
        st.size_dirty = true;
        let full = match st.dirty.get_mut(&index) {
            Some(d) => {
                d.write(offset, src);
                d.is_full(bs as usize)
            }
            None => false,
        };
        WriteOutcome::Done(if full { st.dirty.remove(&index) } else { None })
    }
}

async fn get_blocks(client: &Client, ino: u64, first_index: u64) -> FsResult<rpc::GetBlocksReply> {
    let req = rpc::GetBlocksRequest {
        ns: client.ns_id(),
        ino,
        first_index,
        count: MAP_WINDOW as u32,
    };
    client.meta().call(|mut c| async move { c.get_blocks(req).await }).await
}

/// Opens `ino`: registers the handle and refreshes the block map and size
/// from metad (close-to-open).
pub(crate) async fn open(client: &Client, ino: u64) -> FsResult<FileHandle> {
    // Count the handle before asking metad: an unlink or rename racing with
    // this open then sees the file as open here and keeps it as an orphan.
    let file = acquire(client, ino);
    let res = match get_blocks(client, ino, 0).await {
        Ok(reply) => attr_of(reply.attr).and_then(|attr| refresh(&file, &attr, reply.blocks)),
        Err(e) => Err(e),
    };
    finish_open(client, file, res).await
}

/// Opens a file whose attributes are fresh from metad; an empty file needs
/// no block map.
pub(crate) async fn open_with(client: &Client, attr: &Attr) -> FsResult<FileHandle> {
    if attr.size == 0 && attr.mode & rpc::S_IFMT == rpc::S_IFREG {
        let file = acquire(client, attr.ino);
        let res = refresh(&file, attr, Vec::new());
        return finish_open(client, file, res).await;
    }
    open(client, attr.ino).await
}

async fn finish_open(client: &Client, file: Arc<OpenInode>, res: FsResult<()>) -> FsResult<FileHandle> {
    if let Err(e) = res {
        close_handle(client, &file).await;
        return Err(e);
    }
    Ok(FileHandle {
        client: client.clone(),
        file,
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

/// Refreshes the shared state from what metad just said (close-to-open).
fn refresh(f: &OpenInode, attr: &Attr, blocks: Vec<BlockRef>) -> FsResult<()> {
    if attr.mode & rpc::S_IFMT != rpc::S_IFREG {
        return Err(if attr.mode & rpc::S_IFMT == rpc::S_IFDIR {
            FsError::IsDirectory
        } else {
            FsError::InvalidArgument(format!("inode {} is not a regular file", attr.ino))
        });
    }
    let mut st = lock(&f.state);
    st.map = blocks.into_iter().map(|b| (b.index, b)).collect();
    st.windows = HashSet::from([0]);
    if !st.has_unflushed() {
        st.size = attr.size;
    }
    st.server_size = attr.size;
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
    pattern: Mutex<ReadPattern>,
    released: AtomicBool,
}

impl FileHandle {
    pub fn ino(&self) -> u64 {
        self.file.ino
    }

    /// The file size as this process sees it (includes unflushed writes).
    pub fn size(&self) -> u64 {
        lock(&self.file.state).size
    }

    /// Up to `len` bytes at `offset`; shorter only at end of file. Holes and
    /// bytes past a block's stored length read as zeros.
    pub async fn read_at(&self, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let f = &self.file;
        let bs = f.block_size;
        let size = lock(&f.state).size;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let sequential = {
            let mut p = lock(&self.pattern);
            let near = offset == 0 || (offset <= p.last_end + bs && offset + bs >= p.last_end);
            p.streak = if near { p.streak.saturating_add(1) } else { 0 };
            p.last_end = if near { p.last_end.max(end) } else { end };
            p.streak >= 1
        };
        let mut out = vec![0u8; (end - offset) as usize];
        let ps = pieces(offset, out.len(), bs);
        for piece in &ps {
            let dst = &mut out[piece.buf_pos..piece.buf_pos + piece.len];
            self.read_piece(piece.index, piece.offset, dst, sequential).await?;
        }
        if sequential {
            if let Some(last) = ps.last() {
                self.prefetch(last.index + 1, size);
            }
        }
        Ok(out)
    }

    async fn read_piece(&self, index: u64, off: usize, dst: &mut [u8], whole_block: bool) -> FsResult<()> {
        let f = &self.file;
        loop {
            let r = {
                let st = lock(&f.state);
                if let Some(d) = st.dirty.get(&index) {
                    if !d.needs_base_for(off, off + dst.len()) {
                        d.read(off, dst);
                        return Ok(());
                    }
                    None
                } else if let Some((_, content)) = st.uploading.get(&index) {
                    let have = content.len().saturating_sub(off).min(dst.len());
                    dst[..have].copy_from_slice(&content[off..off + have]);
                    dst[have..].fill(0);
                    return Ok(());
                } else if st.needs_window(index, f.block_size) {
                    None
                } else {
                    match st.stored_ref(index) {
                        Some(r) => Some(r.clone()),
                        None => {
                            dst.fill(0); // a hole
                            return Ok(());
                        }
                    }
                }
            };
            let Some(r) = r else {
                // Either a dirty block that needs its old bytes, or an
                // unknown part of the block map: fetch, then look again.
                let dirty = lock(&f.state).dirty.contains_key(&index);
                if dirty {
                    f.load_base(&self.client, index).await?;
                } else {
                    f.ensure_window(&self.client, index).await?;
                }
                continue;
            };
            if off as u64 >= r.len {
                dst.fill(0);
                return Ok(());
            }
            let n = ((r.len - off as u64) as usize).min(dst.len());
            let blocks = &self.client.inner.blocks;
            if whole_block || blocks.cached(r.block_id) {
                let data = blocks.whole(r.block_id, r.len, &r.replicas).await?;
                dst[..n].copy_from_slice(&data[off..off + n]);
            } else {
                let data = blocks.read(r.block_id, off as u64, n as u64, &r.replicas).await?;
                dst[..n].copy_from_slice(&data);
            }
            dst[n..].fill(0);
            return Ok(());
        }
    }

    /// Starts fetching the next blocks of a sequential reader.
    fn prefetch(&self, from: u64, size: u64) {
        let bs = self.file.block_size;
        for index in from..from + READAHEAD_BLOCKS {
            if index.saturating_mul(bs) >= size {
                break;
            }
            let (f, client) = (self.file.clone(), self.client.clone());
            let known = {
                let st = lock(&f.state);
                if st.dirty.contains_key(&index) || st.uploading.contains_key(&index) {
                    continue;
                }
                st.stored_ref(index).cloned()
            };
            if let Some(r) = &known {
                if client.inner.blocks.cached(r.block_id) {
                    continue;
                }
            }
            tokio::spawn(async move {
                let r = match known {
                    Some(r) => r,
                    None => {
                        if f.ensure_window(&client, index).await.is_err() {
                            return;
                        }
                        match lock(&f.state).stored_ref(index) {
                            Some(r) => r.clone(),
                            None => return,
                        }
                    }
                };
                // Errors are reported by the read that needs the block.
                let _ = client.inner.blocks.whole(r.block_id, r.len, &r.replicas).await;
            });
        }
    }

    /// Writes all of `data` at `offset` (buffered; full blocks are uploaded
    /// in the background). Returns `data.len()`.
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> FsResult<usize> {
        let f = &self.file;
        let bs = f.block_size;
        if let Some(e) = lock(&f.state).error.clone() {
            return Err(e);
        }
        if data.is_empty() {
            return Ok(0);
        }
        offset.checked_add(data.len() as u64).ok_or(FsError::FileTooBig)?;
        for piece in pieces(offset, data.len(), bs) {
            let src = &data[piece.buf_pos..piece.buf_pos + piece.len];
            let full = loop {
                match f.write_piece(piece.index, piece.offset, src) {
                    WriteOutcome::Done(full) => break full,
                    WriteOutcome::NeedWindow => f.ensure_window(&self.client, piece.index).await?,
                }
            };
            if let Some(d) = full {
                f.start_upload(&self.client, piece.index, d.buf).await;
            }
        }
        f.limit_dirty(&self.client).await?;
        Ok(data.len())
    }

    /// Uploads buffered data and commits the block map: on return the data
    /// is on every replica and visible to clients that open the file.
    pub async fn flush(&self) -> FsResult<()> {
        self.file.flush(&self.client).await
    }

    /// Same as [`FileHandle::flush`] (there is no weaker durability level).
    pub async fn fsync(&self) -> FsResult<()> {
        self.flush().await
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
