//! Immutable, checksummed blocks on the local disk.
//!
//! Layout under the data directory:
//!   blocks/<xx>/<016x id>.blk   the block's bytes (`xx` = id & 0xff, in hex)
//!   blocks/<xx>/<016x id>.crc   header + one CRC32C per 64 KiB chunk + CRC32C of the .crc itself
//!   tmp/                        writes in progress
//!   corrupt/                    blocks that failed their checksums, kept for a post-mortem
//!
//! A write lands in tmp/, both files are fsynced, then renamed into place — the .blk first, the .crc
//! last — and the directory is fsynced. The .crc rename is the commit point: a block exists if and
//! only if its .crc exists. A .blk without its .crc is debris of an interrupted write or delete
//! (delete removes the .crc first for that reason) and is removed at start-up, as is everything in
//! tmp/. So after kill -9 or power loss a block is either whole or absent.
//!
//! Everything here blocks on the disk; async callers go through [`run_blocking`].

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use jfs_common::{FsError, FsResult};
use tracing::{debug, info, warn};

/// Bytes covered by one stored CRC32C.
pub const CHUNK_SIZE: usize = 64 << 10;
/// Largest block a client may write (the largest configurable block size).
pub const MAX_BLOCK_LEN: u64 = 64 << 20;

const CRC_MAGIC: [u8; 4] = *b"JFSC";
const CRC_VERSION: u32 = 1;
/// magic, version, block id, block length, chunk size, chunk count, whole-block CRC, reserved.
const CRC_HEADER_LEN: usize = 40;
const CORRUPT_DIR: &str = "corrupt";
/// Readers and committers of the same block serialise on one of these, so a reader always opens a
/// .crc and a .blk of the same generation (a retried write replaces both files).
const LOCK_STRIPES: usize = 64;

/// What a finished write reports back to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenBlock {
    pub len: u64,
    /// CRC32C of the whole block.
    pub crc32c: u32,
}

/// Capacity of the file system holding the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// Names the file system holding `dir` as "host:device", so metad can
/// count blockds that share a disk once. The device number alone repeats
/// across machines; with the host name it does not.
pub fn filesystem_identity(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match fs::metadata(dir) {
        Ok(m) => format!("{}:{}", host.trim(), m.dev()),
        Err(_) => String::new(),
    }
}

pub struct BlockStore {
    root: PathBuf,
    blocks_dir: PathBuf,
    tmp_dir: PathBuf,
    count: AtomicU64,
    tmp_seq: AtomicU64,
    locks: Vec<RwLock<()>>,
    /// Recently read blocks, open: a small random read then costs one
    /// pread instead of reading the checksum file and opening the block
    /// again. Every read is still verified against the checksums.
    readers: Mutex<ReaderCache>,
}

/// Open blocks kept by [`BlockStore::reader`].
const OPEN_READERS: usize = 256;

#[derive(Default)]
struct ReaderCache {
    map: HashMap<u64, Arc<BlockReader>>,
    /// Oldest first (may hold ids already evicted or invalidated).
    order: VecDeque<u64>,
}

/// Maps a failed disk operation to the error the client sees. A full disk is its own error so
/// the client (and the operator reading the log) knows to look elsewhere than at the hardware.
pub fn io_error(what: impl Display, e: io::Error) -> FsError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => FsError::NoSpace(format!(
            "{what}: {e}; the blockd data disk is full: free space on it or add blockds"
        )),
        _ => FsError::Io(format!("{what}: {e}")),
    }
}

/// Runs disk work on tokio's blocking pool so the reactor threads never wait on the disk.
pub async fn run_blocking<T, F>(f: F) -> FsResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> FsResult<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FsError::Internal(format!("blockd disk task failed: {e}")))?
}

fn block_name(id: u64) -> String {
    format!("{id:016x}")
}

/// Parses `<016x>.blk` / `<016x>.crc`; anything else is not ours.
fn parse_block_file(name: &str) -> Option<(u64, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    if stem.len() != 16 || !(ext == "blk" || ext == "crc") {
        return None;
    }
    u64::from_str_radix(stem, 16).ok().map(|id| (id, ext))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The decoded contents of a .crc file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CrcFile {
    block_id: u64,
    len: u64,
    chunk_size: u32,
    block_crc: u32,
    chunks: Vec<u32>,
}

impl CrcFile {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CRC_HEADER_LEN + 4 * self.chunks.len() + 4);
        b.extend_from_slice(&CRC_MAGIC);
        b.extend_from_slice(&CRC_VERSION.to_le_bytes());
        b.extend_from_slice(&self.block_id.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.block_crc.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for c in &self.chunks {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let own = crc32c::crc32c(&b);
        b.extend_from_slice(&own.to_le_bytes());
        b
    }

    /// Checks everything that can be checked without the data; the error says what is wrong.
    fn decode(b: &[u8], expect_id: u64) -> Result<CrcFile, String> {
        if b.len() < CRC_HEADER_LEN + 4 {
            return Err(format!("only {} bytes long, shorter than its header", b.len()));
        }
        let (body, tail) = b.split_at(b.len() - 4);
        if b[0..4] != CRC_MAGIC {
            return Err("bad magic (not a jfs checksum file)".into());
        }
        let count = le_u32(b, 28) as usize;
        let want = CRC_HEADER_LEN + 4 * count + 4;
        if b.len() != want {
            return Err(format!(
                "{} bytes long but its header announces {want} (truncated or extended)",
                b.len()
            ));
        }
        let own = crc32c::crc32c(body);
        if own != le_u32(tail, 0) {
            return Err(format!(
                "its own checksum does not match (stored {:#010x}, computed {own:#010x})",
                le_u32(tail, 0)
            ));
        }
        let version = le_u32(b, 4);
        if version != CRC_VERSION {
            return Err(format!(
                "format version {version}, this blockd understands {CRC_VERSION}"
            ));
        }
        let f = CrcFile {
            block_id: le_u64(b, 8),
            len: le_u64(b, 16),
            chunk_size: le_u32(b, 24),
            block_crc: le_u32(b, 32),
            chunks: (0..count).map(|i| le_u32(b, CRC_HEADER_LEN + 4 * i)).collect(),
        };
        if f.block_id != expect_id {
            return Err(format!("it describes block {} (file misplaced)", f.block_id));
        }
        if f.chunk_size == 0 || f.chunk_size as u64 > MAX_BLOCK_LEN {
            return Err(format!("chunk size {} is invalid", f.chunk_size));
        }
        if f.len > MAX_BLOCK_LEN || f.len.div_ceil(f.chunk_size as u64) != count as u64 {
            return Err(format!(
                "block length {} does not fit {count} chunks of {}",
                f.len, f.chunk_size
            ));
        }
        Ok(f)
    }
}

impl BlockStore {
    /// Opens (creating if needed) the store under `root`: removes leftovers of interrupted writes
    /// and counts the blocks present. Blocks; call it at start-up or through [`run_blocking`].
    pub fn open(root: &Path) -> FsResult<BlockStore> {
        let blocks_dir = root.join("blocks");
        let tmp_dir = root.join("tmp");
        for d in [&blocks_dir, &tmp_dir] {
            fs::create_dir_all(d).map_err(|e| io_error(format!("cannot create {}", d.display()), e))?;
        }
        let store = BlockStore {
            root: root.to_path_buf(),
            blocks_dir,
            tmp_dir,
            count: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            readers: Mutex::new(ReaderCache::default()),
        };
        store.clear_tmp()?;
        let mut count = 0u64;
        for b in 0..=0xffu64 {
            let dir = store.subdir(b);
            fs::create_dir_all(&dir).map_err(|e| io_error(format!("cannot create {}", dir.display()), e))?;
            count += store.scan_subdir(&dir)?;
        }
        store.count.store(count, Ordering::Relaxed);
        info!(dir = %root.display(), blocks = count, "block store opened");
        Ok(store)
    }

    fn clear_tmp(&self) -> FsResult<()> {
        let rd =
            fs::read_dir(&self.tmp_dir).map_err(|e| io_error(format!("cannot list {}", self.tmp_dir.display()), e))?;
        let mut removed = 0;
        for entry in rd {
            let entry = entry.map_err(|e| io_error(format!("cannot list {}", self.tmp_dir.display()), e))?;
            let path = entry.path();
            let r = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            r.map_err(|e| io_error(format!("cannot remove leftover {}", path.display()), e))?;
            removed += 1;
        }
        if removed > 0 {
            info!(removed, dir = %self.tmp_dir.display(), "removed leftovers of interrupted writes");
        }
        Ok(())
    }

    /// Counts complete blocks in one directory and removes half-committed or half-deleted ones.
    fn scan_subdir(&self, dir: &Path) -> FsResult<u64> {
        let rd = fs::read_dir(dir).map_err(|e| io_error(format!("cannot list {}", dir.display()), e))?;
        let mut blk = std::collections::HashSet::new();
        let mut crc = std::collections::HashSet::new();
        for entry in rd {
            let entry = entry.map_err(|e| io_error(format!("cannot list {}", dir.display()), e))?;
            let name = entry.file_name();
            match parse_block_file(&name.to_string_lossy()) {
                Some((id, "blk")) => {
                    blk.insert(id);
                }
                Some((id, _)) => {
                    crc.insert(id);
                }
                None => debug!(file = %entry.path().display(), "ignoring unknown file in block directory"),
            }
        }
        for id in blk.difference(&crc) {
            let p = self.blk_path(*id);
            info!(block = id, file = %p.display(), "removing data file without checksum file (interrupted write or delete)");
            fs::remove_file(&p).map_err(|e| io_error(format!("cannot remove {}", p.display()), e))?;
        }
        for id in crc.difference(&blk) {
            // Only possible if someone removed the .blk by hand: the block is lost here, so drop
            // it entirely; metad re-replicates it from another copy once block reports exist.
            let p = self.crc_path(*id);
            warn!(block = id, file = %p.display(), "checksum file without data file: the block's data is gone; removing it");
            fs::remove_file(&p).map_err(|e| io_error(format!("cannot remove {}", p.display()), e))?;
        }
        Ok(blk.intersection(&crc).count() as u64)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn subdir(&self, id: u64) -> PathBuf {
        self.blocks_dir.join(format!("{:02x}", id & 0xff))
    }

    fn blk_path(&self, id: u64) -> PathBuf {
        self.subdir(id).join(format!("{}.blk", block_name(id)))
    }

    fn crc_path(&self, id: u64) -> PathBuf {
        self.subdir(id).join(format!("{}.crc", block_name(id)))
    }

    fn read_lock(&self, id: u64) -> RwLockReadGuard<'_, ()> {
        let l = &self.locks[(id % LOCK_STRIPES as u64) as usize];
        // The lock protects no data, so a panic while holding it leaves nothing inconsistent.
        l.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self, id: u64) -> RwLockWriteGuard<'_, ()> {
        let l = &self.locks[(id % LOCK_STRIPES as u64) as usize];
        l.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of complete blocks.
    pub fn block_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Size and free space (for unprivileged users) of the file system holding the store.
    pub fn space(&self) -> FsResult<Space> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| FsError::Internal(format!("data dir {} contains a NUL byte", self.root.display())))?;
        // SAFETY: statvfs only writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io_error(
                format!("statvfs {}", self.root.display()),
                io::Error::last_os_error(),
            ));
        }
        let frsize = st.f_frsize as u64;
        Ok(Space {
            capacity_bytes: st.f_blocks as u64 * frsize,
            free_bytes: st.f_bavail as u64 * frsize,
        })
    }

    /// Starts writing block `id` of exactly `total_len` bytes. Nothing is visible until
    /// [`PendingBlock::finish`] succeeds; dropping the pending block discards it.
    pub fn begin_write(self: &Arc<Self>, id: u64, total_len: u64) -> FsResult<PendingBlock> {
        if total_len > MAX_BLOCK_LEN {
            return Err(FsError::InvalidArgument(format!(
                "block {id}: total_len {total_len} exceeds the largest block size {MAX_BLOCK_LEN}"
            )));
        }
        self.forget_reader(id);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let base = format!("{}.{seq}", block_name(id));
        let tmp_blk = self.tmp_dir.join(format!("{base}.blk"));
        let tmp_crc = self.tmp_dir.join(format!("{base}.crc"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_blk)
            .map_err(|e| io_error(format!("cannot create {}", tmp_blk.display()), e))?;
        let mut pending = PendingBlock {
            store: Arc::clone(self),
            id,
            total_len,
            tmp_blk,
            tmp_crc,
            file: Some(file),
            written: 0,
            flushed: 0,
            chunks: Vec::with_capacity(total_len.div_ceil(CHUNK_SIZE as u64) as usize),
            cur_crc: 0,
            cur_fill: 0,
            committed: false,
        };
        pending.reserve()?;
        Ok(pending)
    }

    /// Stores a whole block in one call (blocking).
    #[cfg(test)]
    pub fn write(self: &Arc<Self>, id: u64, data: &[u8]) -> FsResult<WrittenBlock> {
        let mut p = self.begin_write(id, data.len() as u64)?;
        p.append(data)?;
        p.finish()
    }

    /// Opens block `id` for verified reads. NotFound if the block does not exist here.
    pub fn open_block(&self, id: u64) -> FsResult<BlockReader> {
        let crc_path = self.crc_path(id);
        let blk_path = self.blk_path(id);
        let (crc_bytes, data) = {
            let _g = self.read_lock(id);
            let crc_bytes = match fs::read(&crc_path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(FsError::NotFound),
                Err(e) => return Err(io_error(format!("cannot read {}", crc_path.display()), e)),
            };
            let data = match File::open(&blk_path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(self.corrupt(id, format!("its data file {} is missing", blk_path.display())));
                }
                Err(e) => return Err(io_error(format!("cannot open {}", blk_path.display()), e)),
            };
            (crc_bytes, data)
        };
        let meta = CrcFile::decode(&crc_bytes, id)
            .map_err(|m| self.corrupt(id, format!("its checksum file {} is damaged: {m}", crc_path.display())))?;
        let on_disk = data
            .metadata()
            .map_err(|e| io_error(format!("cannot stat {}", blk_path.display()), e))?
            .len();
        if on_disk != meta.len {
            return Err(self.corrupt(
                id,
                format!(
                    "its data file {} holds {on_disk} bytes but the block is {} bytes",
                    blk_path.display(),
                    meta.len
                ),
            ));
        }
        Ok(BlockReader {
            id,
            data,
            meta,
            path: blk_path,
            root: self.root.clone(),
        })
    }

    /// Reads `len` bytes at `offset` of block `id`, verified. Stops at the end of the block.
    #[cfg(test)]
    pub fn read(&self, id: u64, offset: u64, len: u64) -> FsResult<Vec<u8>> {
        self.open_block(id)?.read(offset, len)
    }

    fn corrupt(&self, id: u64, what: String) -> FsError {
        corrupt_error(&self.root, id, what)
    }

    /// Block `id` opened for verified reads, from the cache of open blocks.
    pub fn reader(&self, id: u64) -> FsResult<Arc<BlockReader>> {
        if let Some(r) = self.cached_readers().map.get(&id) {
            return Ok(Arc::clone(r));
        }
        let r = Arc::new(self.open_block(id)?);
        let mut c = self.cached_readers();
        if c.map.insert(id, Arc::clone(&r)).is_none() {
            c.order.push_back(id);
        }
        while c.map.len() > OPEN_READERS {
            match c.order.pop_front() {
                Some(old) => {
                    c.map.remove(&old);
                }
                None => break,
            }
        }
        if c.order.len() > 4 * OPEN_READERS {
            let live: Vec<u64> = c.order.iter().copied().filter(|i| c.map.contains_key(i)).collect();
            c.order = live.into();
        }
        Ok(r)
    }

    fn cached_readers(&self) -> std::sync::MutexGuard<'_, ReaderCache> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget_reader(&self, id: u64) {
        self.cached_readers().map.remove(&id);
    }

    /// Removes block `id`. Returns whether it existed.
    pub fn delete(&self, id: u64) -> FsResult<bool> {
        self.forget_reader(id);
        let crc_path = self.crc_path(id);
        let blk_path = self.blk_path(id);
        let _g = self.write_lock(id);
        // The .crc goes first: once it is gone the block no longer exists, whatever happens next.
        let existed = match fs::remove_file(&crc_path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error(format!("cannot remove {}", crc_path.display()), e)),
        };
        if existed {
            self.count.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("jfs_blockd_blocks_deleted_total").increment(1);
        }
        match fs::remove_file(&blk_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("cannot remove {}", blk_path.display()), e)),
        }
        // A read that opened the block just before the removal may have cached it.
        self.forget_reader(id);
        // No directory fsync: a delete lost in a power cut brings back an unreferenced block,
        // which metad deletes again; a sync per delete would cost more than that.
        Ok(existed)
    }

    /// Moves block `id` out of service into DATA/corrupt/, keeping its files for a post-mortem
    /// (a name already taken there gets a numeric suffix, the same for both files). Returns where
    /// the files went; empty when the block is not here (deleted, or quarantined by another
    /// reader first).
    pub fn quarantine(&self, id: u64) -> FsResult<Vec<PathBuf>> {
        let dir = self.root.join(CORRUPT_DIR);
        fs::create_dir_all(&dir).map_err(|e| io_error(format!("cannot create {}", dir.display()), e))?;
        self.forget_reader(id);
        let crc_path = self.crc_path(id);
        let blk_path = self.blk_path(id);
        let _g = self.write_lock(id);
        let name = block_name(id);
        let taken = |p: &Path| p.try_exists().unwrap_or(true);
        let (dst_crc, dst_blk) = (0..1000u32)
            .map(|n| {
                let suffix = if n == 0 { String::new() } else { format!(".{n}") };
                (
                    dir.join(format!("{name}.crc{suffix}")),
                    dir.join(format!("{name}.blk{suffix}")),
                )
            })
            .find(|(c, b)| !taken(c) && !taken(b))
            .ok_or_else(|| {
                FsError::Io(format!(
                    "{} already holds 1000 quarantined copies of block {id}; clean it up",
                    dir.display()
                ))
            })?;
        // The .crc goes first, as in delete: once it has moved, the block no longer exists here.
        match fs::rename(&crc_path, &dst_crc) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io_error(
                    format!("cannot move {} to {}", crc_path.display(), dst_crc.display()),
                    e,
                ))
            }
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        let mut moved = vec![dst_crc];
        match fs::rename(&blk_path, &dst_blk) {
            Ok(()) => moved.push(dst_blk),
            // Its data file being gone may be the very damage found.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Left behind, the lone .blk is removed as debris at the next start-up.
            Err(e) => {
                return Err(io_error(
                    format!("cannot move {} to {}", blk_path.display(), dst_blk.display()),
                    e,
                ))
            }
        }
        // A read that opened the block just before the move may have cached it.
        self.forget_reader(id);
        // No fsync: if the move is lost in a power cut, the block is found corrupt again.
        Ok(moved)
    }

    /// Every block stored here with its age in seconds (since its checksum file was written),
    /// ascending by id. Takes no lock for long: a block deleted or added during the walk may or
    /// may not be listed, and callers must expect NotFound when they open a listed block.
    pub fn list(&self) -> FsResult<Vec<(u64, u64)>> {
        let now = std::time::SystemTime::now();
        let mut out = Vec::with_capacity(self.block_count() as usize);
        for b in 0..=0xffu64 {
            let dir = self.subdir(b);
            let rd = fs::read_dir(&dir).map_err(|e| io_error(format!("cannot list {}", dir.display()), e))?;
            for entry in rd {
                let entry = entry.map_err(|e| io_error(format!("cannot list {}", dir.display()), e))?;
                let name = entry.file_name();
                let Some((id, "crc")) = parse_block_file(&name.to_string_lossy()) else {
                    continue;
                };
                let mtime = match entry.metadata().and_then(|m| m.modified()) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(format!("cannot stat {}", entry.path().display()), e)),
                };
                // A clock set back makes a fresh block look new rather than ancient: the safe side,
                // since metad deletes unknown blocks only once they are old.
                let age = now.duration_since(mtime).map(|d| d.as_secs()).unwrap_or(0);
                out.push((id, age));
            }
        }
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }
}

fn corrupt_error(root: &Path, id: u64, what: String) -> FsError {
    let msg = format!("block {id} ({}) on blockd {}: {what}", block_name(id), root.display());
    warn!("{msg}");
    metrics::counter!("jfs_blockd_checksum_failures_total").increment(1);
    FsError::Corrupt(msg)
}

/// A block being written: bytes go to a file in tmp/, CRCs are computed on the way.
pub struct PendingBlock {
    store: Arc<BlockStore>,
    id: u64,
    total_len: u64,
    tmp_blk: PathBuf,
    tmp_crc: PathBuf,
    file: Option<File>,
    written: u64,
    /// Bytes already handed to the kernel's writeback.
    flushed: u64,
    chunks: Vec<u32>,
    cur_crc: u32,
    cur_fill: usize,
    committed: bool,
}

impl PendingBlock {
    /// Reserves the block's space up front: a full disk fails the write at once instead of after
    /// the client has streamed megabytes, and the file gets contiguous extents.
    fn reserve(&mut self) -> FsResult<()> {
        let (Some(f), true) = (&self.file, self.total_len > 0) else {
            return Ok(());
        };
        // SAFETY: plain syscall on a descriptor we own.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.total_len as libc::off_t,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Not every file system can preallocate; the writes themselves will tell.
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {}
                _ => {
                    return Err(io_error(
                        format!("cannot reserve {} bytes for block {}", self.total_len, self.id),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Appends the next bytes of the block (blocking).
    pub fn append(&mut self, data: &[u8]) -> FsResult<()> {
        if self.written + data.len() as u64 > self.total_len {
            return Err(FsError::InvalidArgument(format!(
                "write of block {} carries more than its declared total_len of {} bytes; nothing was stored",
                self.id, self.total_len
            )));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| FsError::Internal(format!("block {}: append after finish", self.id)))?;
        file.write_all(data).map_err(|e| {
            io_error(
                format!("cannot write block {} to {}", self.id, self.tmp_blk.display()),
                e,
            )
        })?;
        let mut rest = data;
        while !rest.is_empty() {
            let take = rest.len().min(CHUNK_SIZE - self.cur_fill);
            self.cur_crc = crc32c::crc32c_append(self.cur_crc, &rest[..take]);
            self.cur_fill += take;
            rest = &rest[take..];
            if self.cur_fill == CHUNK_SIZE {
                self.chunks.push(self.cur_crc);
                self.cur_crc = 0;
                self.cur_fill = 0;
            }
        }
        self.written += data.len() as u64;
        self.start_writeback();
        Ok(())
    }

    /// Asks the kernel to start writing out what has arrived so far, so that the fsync at the end
    /// waits for the last piece only instead of the whole block: disk and network overlap.
    fn start_writeback(&mut self) {
        const STEP: u64 = 1 << 20;
        let Some(f) = &self.file else { return };
        let upto = self.written / STEP * STEP;
        if upto > self.flushed {
            // SAFETY: plain syscall on a descriptor we own. Only a hint: errors surface at fsync.
            unsafe {
                libc::sync_file_range(
                    f.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (upto - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.flushed = upto;
        }
    }

    /// Makes the block durable and visible (blocking). Fails, storing nothing, if fewer bytes
    /// than `total_len` were appended.
    pub fn finish(mut self) -> FsResult<WrittenBlock> {
        let id = self.id;
        if self.written != self.total_len {
            return Err(FsError::InvalidArgument(format!(
                "write of block {id} ended after {} of its declared {} bytes; nothing was stored",
                self.written, self.total_len
            )));
        }
        if self.cur_fill > 0 {
            self.chunks.push(self.cur_crc);
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| FsError::Internal(format!("block {id}: finish called twice")))?;
        file.sync_data()
            .map_err(|e| io_error(format!("cannot sync block {id} ({})", self.tmp_blk.display()), e))?;
        drop(file);

        // The whole-block CRC, derived from the chunk CRCs instead of a second pass over the data.
        let mut block_crc = 0u32;
        let mut left = self.total_len;
        for c in &self.chunks {
            let n = left.min(CHUNK_SIZE as u64);
            block_crc = crc32c::crc32c_combine(block_crc, *c, n as usize);
            left -= n;
        }
        let meta = CrcFile {
            block_id: id,
            len: self.total_len,
            chunk_size: CHUNK_SIZE as u32,
            block_crc,
            chunks: std::mem::take(&mut self.chunks),
        };
        let mut crc_file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.tmp_crc)
            .map_err(|e| io_error(format!("cannot create {}", self.tmp_crc.display()), e))?;
        crc_file
            .write_all(&meta.encode())
            .and_then(|_| crc_file.sync_data())
            .map_err(|e| io_error(format!("cannot write {}", self.tmp_crc.display()), e))?;
        drop(crc_file);

        let store = Arc::clone(&self.store);
        let crc_path = store.crc_path(id);
        let blk_path = store.blk_path(id);
        let _g = store.write_lock(id);
        // A retried write replaces the block: withdraw the old one first so that no moment (nor
        // crash) pairs the old checksums with the new data.
        let replaced = match fs::remove_file(&crc_path) {
            Ok(()) => {
                store.count.fetch_sub(1, Ordering::Relaxed);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error(format!("cannot replace {}", crc_path.display()), e)),
        };
        fs::rename(&self.tmp_blk, &blk_path)
            .map_err(|e| io_error(format!("cannot move block {id} into {}", blk_path.display()), e))?;
        fs::rename(&self.tmp_crc, &crc_path).map_err(|e| {
            io_error(
                format!("cannot move checksums of block {id} into {}", crc_path.display()),
                e,
            )
        })?;
        self.committed = true;
        store.count.fetch_add(1, Ordering::Relaxed);
        let dir = store.subdir(id);
        fsync_dir(&dir).map_err(|e| io_error(format!("cannot sync directory {}", dir.display()), e))?;
        debug!(block = id, len = self.total_len, replaced, "block stored");
        metrics::counter!("jfs_blockd_blocks_written_total").increment(1);
        metrics::counter!("jfs_blockd_disk_written_bytes_total").increment(self.total_len);
        Ok(WrittenBlock {
            len: self.total_len,
            crc32c: block_crc,
        })
    }
}

impl Drop for PendingBlock {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: whatever stays behind is removed at the next start-up.
            self.file.take();
            let _ = fs::remove_file(&self.tmp_blk);
            let _ = fs::remove_file(&self.tmp_crc);
        }
    }
}

/// An open block whose checksums have been loaded; reads verify every chunk they touch.
pub struct BlockReader {
    id: u64,
    data: File,
    meta: CrcFile,
    path: PathBuf,
    root: PathBuf,
}

impl BlockReader {
    /// Length of the block in bytes.
    pub fn len(&self) -> u64 {
        self.meta.len
    }

    /// CRC32C of the whole block, as reported when it was written.
    #[cfg(test)]
    pub fn block_crc(&self) -> u32 {
        self.meta.block_crc
    }

    /// Reads up to `len` bytes at `offset` (blocking): exactly the range, cut short at the end of
    /// the block. Every 64 KiB chunk the range touches is checked against its stored CRC.
    pub fn read(&self, offset: u64, len: u64) -> FsResult<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.meta.len);
        if offset >= end {
            return Ok(Vec::new());
        }
        let cs = self.meta.chunk_size as u64;
        let first = offset / cs;
        let start = first * cs;
        let stop = end.div_ceil(cs).saturating_mul(cs).min(self.meta.len);
        let mut buf = vec![0u8; (stop - start) as usize];
        self.data.read_exact_at(&mut buf, start).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt_error(
                    &self.root,
                    self.id,
                    format!("its data file {} is truncated", self.path.display()),
                )
            } else {
                io_error(format!("cannot read {}", self.path.display()), e)
            }
        })?;
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            let idx = first as usize + i;
            let got = crc32c::crc32c(chunk);
            let want = self.meta.chunks[idx];
            if got != want {
                let at = idx as u64 * cs;
                return Err(corrupt_error(
                    &self.root,
                    self.id,
                    format!(
                        "chunk {idx} (bytes {at}..{}) fails its checksum (stored {want:#010x}, read {got:#010x})",
                        at + chunk.len() as u64
                    ),
                ));
            }
        }
        // Client reads, copies to other blockds and the scrubber alike.
        metrics::counter!("jfs_blockd_block_reads_total").increment(1);
        metrics::counter!("jfs_blockd_disk_read_bytes_total").increment(buf.len() as u64);
        buf.truncate((end - start) as usize);
        let skip = (offset - start) as usize;
        if skip > 0 {
            buf.drain(..skip);
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    fn open(dir: &Path) -> Arc<BlockStore> {
        Arc::new(BlockStore::open(dir).unwrap())
    }

    #[test]
    fn round_trip_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        for (i, n) in [0usize, 1, 65535, 65536, 65537, 4 << 20].into_iter().enumerate() {
            let id = 100 + i as u64;
            let data = pattern(n, i as u8);
            let w = s.write(id, &data).unwrap();
            assert_eq!(w.len, n as u64);
            assert_eq!(w.crc32c, crc32c::crc32c(&data), "size {n}");
            let r = s.read(id, 0, u64::MAX).unwrap();
            assert_eq!(r.len(), n, "size {n}");
            assert!(r == data, "size {n}: data differs");
            assert_eq!(s.open_block(id).unwrap().block_crc(), w.crc32c);
        }
        assert_eq!(s.block_count(), 6);
    }

    #[test]
    fn streamed_appends_of_odd_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let data = pattern(300_001, 9);
        let mut p = s.begin_write(5, data.len() as u64).unwrap();
        for piece in data.chunks(7777) {
            p.append(piece).unwrap();
        }
        let w = p.finish().unwrap();
        assert_eq!(w.crc32c, crc32c::crc32c(&data));
        assert!(s.read(5, 0, u64::MAX).unwrap() == data);
    }

    #[test]
    fn partial_range_reads() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let n = 3 * CHUNK_SIZE + 1000;
        let data = pattern(n, 3);
        s.write(7, &data).unwrap();
        let cases: &[(u64, u64)] = &[
            (0, 1),
            (1, 10),
            (65535, 2),
            (65536, 65536),
            (100, 200_000),
            (3 * 65536, 1000),
            (3 * 65536 + 999, 5),
            (n as u64 - 1, 100),
            (10, 0),
        ];
        for &(off, len) in cases {
            let got = s.read(7, off, len).unwrap();
            let end = (off + len).min(n as u64) as usize;
            assert!(got == data[off as usize..end], "range {off}+{len}");
        }
        // Past the end: nothing (the client zero-fills).
        assert!(s.read(7, n as u64, 10).unwrap().is_empty());
        assert!(s.read(7, n as u64 + 5000, 10).unwrap().is_empty());
        assert!(s.read(7, 5, u64::MAX).unwrap() == data[5..]);
    }

    #[test]
    fn missing_block_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert_eq!(s.read(42, 0, 10), Err(FsError::NotFound));
    }

    #[test]
    fn flipped_byte_is_corrupt_and_names_block_and_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let data = pattern(3 * CHUNK_SIZE, 1);
        s.write(0xabc, &data).unwrap();
        let path = s.blk_path(0xabc);
        let mut bytes = fs::read(&path).unwrap();
        bytes[CHUNK_SIZE + 17] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        match s.read(0xabc, 0, u64::MAX) {
            Err(FsError::Corrupt(m)) => {
                assert!(m.contains("block 2748") && m.contains("chunk 1"), "{m}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Chunks that were not damaged still read.
        assert!(s.read(0xabc, 0, CHUNK_SIZE as u64).unwrap() == data[..CHUNK_SIZE]);
        assert!(s.read(0xabc, 2 * CHUNK_SIZE as u64, 10).unwrap() == data[2 * CHUNK_SIZE..2 * CHUNK_SIZE + 10]);
        assert!(matches!(
            s.read(0xabc, CHUNK_SIZE as u64 + 100, 1),
            Err(FsError::Corrupt(_))
        ));
    }

    #[test]
    fn truncated_or_damaged_crc_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(1, &pattern(200_000, 2)).unwrap();
        s.write(2, &pattern(200_000, 2)).unwrap();
        let p1 = s.crc_path(1);
        let b = fs::read(&p1).unwrap();
        fs::write(&p1, &b[..b.len() - 3]).unwrap();
        match s.read(1, 0, 10) {
            Err(FsError::Corrupt(m)) => assert!(m.contains("checksum file"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let p2 = s.crc_path(2);
        let mut b = fs::read(&p2).unwrap();
        b[CRC_HEADER_LEN + 1] ^= 1;
        fs::write(&p2, &b).unwrap();
        assert!(matches!(s.read(2, 0, 10), Err(FsError::Corrupt(_))));
    }

    #[test]
    fn truncated_data_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(3, &pattern(100_000, 4)).unwrap();
        let f = OpenOptions::new().write(true).open(s.blk_path(3)).unwrap();
        f.set_len(50_000).unwrap();
        assert!(matches!(s.read(3, 0, 10), Err(FsError::Corrupt(_))));
    }

    #[test]
    fn short_or_long_write_leaves_no_block() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut p = s.begin_write(9, 1000).unwrap();
        p.append(&[1u8; 999]).unwrap();
        assert!(matches!(p.finish(), Err(FsError::InvalidArgument(_))));
        assert_eq!(s.read(9, 0, 10), Err(FsError::NotFound));

        let mut p = s.begin_write(9, 10).unwrap();
        assert!(matches!(p.append(&[1u8; 11]), Err(FsError::InvalidArgument(_))));
        drop(p);

        // Abandoned mid-way (client went away).
        let mut p = s.begin_write(9, 10).unwrap();
        p.append(&[1u8; 5]).unwrap();
        drop(p);

        assert_eq!(s.read(9, 0, 10), Err(FsError::NotFound));
        assert_eq!(s.block_count(), 0);
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "tmp files left behind"
        );
        assert!(!s.blk_path(9).exists());
    }

    #[test]
    fn too_large_block_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert!(matches!(
            s.begin_write(1, MAX_BLOCK_LEN + 1),
            Err(FsError::InvalidArgument(_))
        ));
    }

    #[test]
    fn retried_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(11, &pattern(70_000, 1)).unwrap();
        let second = pattern(1234, 2);
        s.write(11, &second).unwrap();
        assert!(s.read(11, 0, u64::MAX).unwrap() == second);
        assert_eq!(s.block_count(), 1);
    }

    #[test]
    fn delete_removes_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(0x1ff, &pattern(1000, 1)).unwrap();
        assert_eq!(s.block_count(), 1);
        assert!(s.delete(0x1ff).unwrap());
        assert!(!s.delete(0x1ff).unwrap());
        assert_eq!(s.block_count(), 0);
        assert!(!s.blk_path(0x1ff).exists() && !s.crc_path(0x1ff).exists());
        assert_eq!(s.read(0x1ff, 0, 1), Err(FsError::NotFound));
    }

    #[test]
    fn quarantine_moves_both_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(0x2a, &pattern(1000, 1)).unwrap();
        s.write(0x2b, &pattern(1000, 2)).unwrap();
        // Cache a reader, as a service read would.
        s.reader(0x2a).unwrap();
        let moved = s.quarantine(0x2a).unwrap();
        let cdir = dir.path().join("corrupt");
        assert_eq!(
            moved,
            vec![cdir.join("000000000000002a.crc"), cdir.join("000000000000002a.blk")]
        );
        assert!(fs::read(&moved[1]).unwrap() == pattern(1000, 1));
        assert_eq!(s.block_count(), 1);
        assert_eq!(s.read(0x2a, 0, 1), Err(FsError::NotFound));
        assert_eq!(s.reader(0x2a).err(), Some(FsError::NotFound));
        assert!(
            s.quarantine(0x2a).unwrap().is_empty(),
            "an absent block is not quarantined"
        );
        assert_eq!(s.block_count(), 1);

        // Stored again and found bad again: the earlier evidence is kept.
        s.write(0x2a, &pattern(500, 3)).unwrap();
        let moved = s.quarantine(0x2a).unwrap();
        assert_eq!(
            moved,
            vec![cdir.join("000000000000002a.crc.1"), cdir.join("000000000000002a.blk.1")]
        );
        assert!(fs::read(cdir.join("000000000000002a.blk")).unwrap() == pattern(1000, 1));

        // A restart does not bring quarantined blocks back.
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.block_count(), 1);
        assert_eq!(s.list().unwrap().iter().map(|b| b.0).collect::<Vec<_>>(), vec![0x2b]);
    }

    #[test]
    fn list_gives_ids_in_order_with_ages() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        for id in [0x300, 5, 0x1ff, 0x100] {
            s.write(id, b"x").unwrap();
        }
        // Age one block by two hours.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(s.crc_path(5))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let l = s.list().unwrap();
        assert_eq!(l.iter().map(|b| b.0).collect::<Vec<_>>(), vec![5, 0x100, 0x1ff, 0x300]);
        assert!((7199..7300).contains(&l[0].1), "{l:?}");
        assert!(l[1..].iter().all(|b| b.1 < 60), "{l:?}");
        s.delete(0x100).unwrap();
        assert_eq!(s.list().unwrap().len(), 3);
    }

    #[test]
    fn layout_is_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(0x1234, b"hello").unwrap();
        assert!(dir.path().join("blocks/34/0000000000001234.blk").is_file());
        assert!(dir.path().join("blocks/34/0000000000001234.crc").is_file());
    }

    #[test]
    fn restart_sees_blocks_and_cleans_debris() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.write(1, &pattern(5000, 1)).unwrap();
            s.write(2, &pattern(70_000, 2)).unwrap();
            s.write(3, &pattern(10, 3)).unwrap();
            // A write in progress when the process died.
            let mut p = s.begin_write(4, 100).unwrap();
            p.append(&[0u8; 50]).unwrap();
            std::mem::forget(p);
            // A crash between the two renames of a commit, and between the two unlinks of a delete.
            fs::rename(s.crc_path(3), dir.path().join("tmp/leftover.crc")).unwrap();
            fs::write(s.crc_path(5), b"x").unwrap();
        }
        assert!(fs::read_dir(dir.path().join("tmp")).unwrap().count() > 0);
        let s = open(dir.path());
        assert_eq!(s.block_count(), 2);
        assert!(s.read(1, 0, u64::MAX).unwrap() == pattern(5000, 1));
        assert!(s.read(2, 0, u64::MAX).unwrap() == pattern(70_000, 2));
        assert_eq!(s.read(3, 0, 1), Err(FsError::NotFound));
        assert!(!s.blk_path(3).exists() && !s.crc_path(5).exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn space_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let sp = s.space().unwrap();
        assert!(sp.capacity_bytes > 0 && sp.free_bytes <= sp.capacity_bytes);
    }

    #[test]
    fn enospc_maps_to_no_space() {
        let e = io_error("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, FsError::NoSpace(ref m) if m.contains("full")), "{e:?}");
        let e = io_error("writing", io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(matches!(e, FsError::NoSpace(_)));
        let e = io_error("writing", io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, FsError::Io(_)));
    }

    /// Disk-only throughput: `cargo test --release -p jfs-blockd -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn store_throughput() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let block = pattern(4 << 20, 1);
        let t = std::time::Instant::now();
        std::thread::scope(|sc| {
            for th in 0..4u64 {
                let (s, block) = (&s, &block);
                sc.spawn(move || {
                    for i in 0..16 {
                        s.write(th * 100 + i, block).unwrap();
                    }
                });
            }
        });
        println!("store write: {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for th in 0..4u64 {
            for i in 0..16 {
                assert_eq!(s.read(th * 100 + i, 0, u64::MAX).unwrap().len(), 4 << 20);
            }
        }
        println!("store read (1 thread): {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
    }
}
