//! The FUSE filesystem: translates kernel requests into jfs-client calls.
//!
//! fuser dispatches requests on several threads; each callback blocks on
//! the client future on our tokio runtime, so one slow call (a flush that
//! waits for uploads) does not stall the others.
//!
//! Kernel caches: entry and attribute TTLs come from the options (default
//! 1 s). Every mutation replies with the fresh attributes metad returned, so
//! what this mount changed is never stale here; changes by *other* clients
//! show up after the TTL (metadata) or at the next open (data: an open keeps
//! the page cache only when the file's committed mtime, ctime and size are
//! those its pages were read under — close-to-open). `O_DIRECT` opens
//! bypass the page cache. A panic inside a request fails that request with
//! EIO; the mount stays up.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle as Fh, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use jfs_client::{Attr, Client, DirEntry, FileHandle, FsError, SetAttrArgs, TimeArg, Timespec, NAME_MAX};
use jfs_common::rpc::{S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};

/// FUSE's root inode number.
const FUSE_ROOT: u64 = 1;
/// Largest write the kernel sends us in one request.
const MAX_WRITE: u32 = 1 << 20;
/// st_blksize: tools such as cp size their buffers by it.
const IO_SIZE: u32 = 1 << 20;

pub struct JfsFs {
    client: Client,
    rt: tokio::runtime::Handle,
    attr_ttl: Duration,
    entry_ttl: Duration,
    read_only: bool,
    next_fh: AtomicU64,
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    /// Directory listings by handle, taken at the first readdir call so
    /// offsets stay stable while the directory changes.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    /// Set once the session exists; used to tell the kernel that the
    /// attributes it cached are stale after a commit changed them.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Per inode, the committed (mtime, ctime, size) its cached pages were
    /// read under: an open that finds the file unchanged keeps the kernel's
    /// page cache (FOPEN_KEEP_CACHE); any change drops it (close-to-open).
    page_versions: Mutex<HashMap<u64, PageVersion>>,
    /// Fault injection for the tests (`JFS_TEST_PANIC_NAME`): a lookup of
    /// this name panics, to prove one failing request leaves the mount up.
    panic_name: Option<Vec<u8>>,
    /// Inodes known to have no `security.capability`, until when. The
    /// kernel asks for it before every write (to drop file capabilities);
    /// without this cache each write would wait for a metad round trip.
    no_caps: Mutex<HashMap<u64, Instant>>,
    /// (inode, lock owner) pairs that may hold a lock through this mount:
    /// their close releases them at metad. Files never locked cost nothing.
    locked: Mutex<std::collections::HashSet<(u64, u64)>>,
}

/// What identifies the committed content of a file: every data change
/// moves ctime (stamped by the metad leader; users cannot set it).
type PageVersion = (i64, u32, i64, u32, u64);

fn page_version(a: &Attr) -> PageVersion {
    let t = |t: &Option<Timespec>| t.as_ref().map_or((0, 0), |t| (t.sec, t.nsec));
    let (ms, mn) = t(&a.mtime);
    let (cs, cn) = t(&a.ctime);
    (ms, mn, cs, cn, a.size)
}

/// Entries kept in the page-version table before it is cleared.
const PAGE_VERSIONS_MAX: usize = 100_000;

/// The xattr the kernel asks for on every write.
const CAPS_XATTR: &[u8] = b"security.capability";
/// Entries kept in the capability cache before it is swept.
const NO_CAPS_MAX: usize = 100_000;

type R<T> = Result<T, Errno>;

/// F_RDLCK / F_WRLCK / F_UNLCK to the lock types of the RPC (0, 1, 2).
fn lock_type(typ: i32) -> Option<u32> {
    match typ {
        libc::F_RDLCK => Some(0),
        libc::F_WRLCK => Some(1),
        libc::F_UNLCK => Some(2),
        _ => None,
    }
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// For calls addressed by inode number: a vanished inode is ESTALE, which
/// makes the kernel look the path up again once (as NFS does) instead of
/// failing an open or stat that raced with a rename or unlink.
fn errno_ino(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ESTALE,
        e => errno(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn name_of(name: &OsStr) -> R<&[u8]> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(b)
}

fn to_time(t: Option<&Timespec>) -> SystemTime {
    match t {
        Some(t) if t.sec >= 0 => UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec.min(999_999_999)),
        Some(t) => {
            UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
                + Duration::from_nanos(t.nsec.min(999_999_999) as u64)
        }
        None => UNIX_EPOCH,
    }
}

fn from_time(t: SystemTime) -> Timespec {
    let ns = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    Timespec::from_nanos(ns)
}

fn kind_of(mode: u32) -> FileType {
    match mode & S_IFMT {
        S_IFDIR => FileType::Directory,
        S_IFREG => FileType::RegularFile,
        S_IFLNK => FileType::Symlink,
        m if m == libc::S_IFIFO => FileType::NamedPipe,
        m if m == libc::S_IFCHR => FileType::CharDevice,
        m if m == libc::S_IFBLK => FileType::BlockDevice,
        m if m == libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl JfsFs {
    pub fn new(
        client: Client,
        rt: tokio::runtime::Handle,
        attr_ttl: Duration,
        entry_ttl: Duration,
        read_only: bool,
        notifier: Arc<OnceLock<fuser::Notifier>>,
    ) -> JfsFs {
        JfsFs {
            client,
            rt,
            attr_ttl,
            entry_ttl,
            read_only,
            next_fh: AtomicU64::new(1),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            notifier,
            no_caps: Mutex::new(HashMap::new()),
            page_versions: Mutex::new(HashMap::new()),
            locked: Mutex::new(std::collections::HashSet::new()),
            panic_name: std::env::var_os("JFS_TEST_PANIC_NAME").map(|n| n.as_bytes().to_vec()),
        }
    }

    /// True when the pages the kernel caches for this file were read from
    /// the same committed content that `attr` describes; records `attr` as
    /// the version the pages are of from now on.
    fn pages_still_valid(&self, attr: &Attr) -> bool {
        let v = page_version(attr);
        let mut m = lock(&self.page_versions);
        if m.len() >= PAGE_VERSIONS_MAX {
            m.clear();
        }
        m.insert(attr.ino, v) == Some(v)
    }

    /// This mount changed the file: cached pages hold the new bytes, but
    /// the next open must not trust a version recorded before the change.
    fn forget_page_version(&self, ino: u64) {
        lock(&self.page_versions).remove(&ino);
    }

    fn caps_known_absent(&self, ino: u64) -> bool {
        lock(&self.no_caps)
            .get(&ino)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn note_caps_absent(&self, ino: u64) {
        // Trusted for as long as cached attributes are: another client's
        // setcap shows up after the attribute timeout, like its chmod.
        let mut m = lock(&self.no_caps);
        if m.len() >= NO_CAPS_MAX {
            let now = Instant::now();
            m.retain(|_, until| *until > now);
            if m.len() >= NO_CAPS_MAX {
                m.clear();
            }
        }
        m.insert(ino, Instant::now() + self.attr_ttl);
    }

    /// Flushes a handle; when that committed data, the kernel's cached
    /// attributes (mtime, ctime) are stale: drop them (attributes only,
    /// offset -1 keeps the page cache).
    fn flush_handle(&self, h: &FileHandle, release: bool) -> R<()> {
        let committed = self.client.local_size(h.ino()).is_some();
        let res = if release {
            self.block(h.release())
        } else {
            self.block(h.flush())
        };
        if committed {
            self.forget_page_version(h.ino());
            if let Some(n) = self.notifier.get() {
                let _ = n.inval_inode(self.fuse_ino(h.ino()), -1, 0);
            }
        }
        res.map_err(errno)
    }

    /// Releases every lock `owner` may hold on `ino` through this mount.
    fn unlock_all(&self, ino: u64, owner: u64) {
        if !lock(&self.locked).remove(&(ino, owner)) {
            return;
        }
        if let Err(e) = self.block(self.client.set_lock(ino, owner, 0, 2, 0, u64::MAX)) {
            // Its session ending releases it anyway; say so rather than fail close.
            tracing::warn!(ino, owner, "could not release a lock at close: {e}");
        }
    }

    /// Runs one FUSE request. A panic fails that request alone: the reply,
    /// dropped unsent while unwinding, answers EIO (fuser does that), and the
    /// session and every other request carry on (DESIGN §5).
    fn guard(&self, op: &'static str, f: impl FnOnce()) {
        // Counted and timed here, the one place every request passes.
        let in_flight = metrics::gauge!("jfs_fuse_requests_in_flight");
        in_flight.increment(1.0);
        let start = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        in_flight.decrement(1.0);
        metrics::counter!("jfs_fuse_requests_total", "op" => op).increment(1);
        metrics::histogram!("jfs_fuse_request_duration_seconds", "op" => op).record(start.elapsed().as_secs_f64());
        if let Err(p) = outcome {
            metrics::counter!("jfs_fuse_request_panics_total", "op" => op).increment(1);
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(op, panic = %msg, "a FUSE request panicked; it fails with EIO, the mount stays up");
        }
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// jfs inode ↔ FUSE inode: only the root differs (if it does at all).
    fn ino(&self, fuse: INodeNo) -> u64 {
        if fuse.0 == FUSE_ROOT {
            self.client.root_ino()
        } else {
            fuse.0
        }
    }

    fn fuse_ino(&self, ino: u64) -> INodeNo {
        if ino == self.client.root_ino() {
            INodeNo(FUSE_ROOT)
        } else {
            INodeNo(ino)
        }
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.fuse_ino(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: to_time(a.atime.as_ref()),
            mtime: to_time(a.mtime.as_ref()),
            ctime: to_time(a.ctime.as_ref()),
            crtime: to_time(a.ctime.as_ref()),
            kind: kind_of(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: if a.blksize > 0 { a.blksize } else { IO_SIZE },
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, res: R<Attr>) {
        match res {
            // The kernel now holds a lookup reference until FORGET. It
            // applies a LINK/MKNOD reply's attributes unconditionally, so
            // they go out no older than any answer it already has.
            Ok(a) => self.client.hand_out(a, 1, |a| {
                reply.entry_with_ttls(
                    &self.attr_ttl,
                    &self.entry_ttl,
                    &self.file_attr(a),
                    Generation(a.generation),
                )
            }),
            Err(e) => reply.error(e),
        }
    }

    fn writable(&self) -> R<()> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    fn handle(&self, fh: Fh) -> R<Arc<FileHandle>> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, h: FileHandle) -> Fh {
        let id = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(id, Arc::new(h));
        Fh(id)
    }

    fn do_setattr(&self, ino: u64, args: SetAttrArgs) -> R<Attr> {
        self.writable()?;
        self.block(self.client.setattr(ino, args)).map_err(errno_ino)
    }

    fn dir_listing(&self, ino: u64, fh: Fh, offset: u64, plus: bool) -> R<Arc<Vec<DirEntry>>> {
        if offset > 0 {
            if let Some(l) = lock(&self.dirs).get(&fh.0) {
                return Ok(l.clone());
            }
        }
        let entries = self.block(self.client.readdir_all(ino, plus)).map_err(errno)?;
        let l = Arc::new(entries);
        lock(&self.dirs).insert(fh.0, l.clone());
        Ok(l)
    }

    /// POSIX permission check for `access(2)` when the kernel does not do it
    /// (no default_permissions).
    fn check_access(req: &Request, a: &Attr, mask: AccessFlags) -> R<()> {
        let want = mask.bits() & 0o7;
        if want == 0 {
            return Ok(());
        }
        let mode = a.mode & 0o777;
        if req.uid() == 0 {
            // root may do anything, except execute a file no one may execute.
            if want & libc::X_OK != 0 && a.mode & S_IFMT != S_IFDIR && mode & 0o111 == 0 {
                return Err(Errno::EACCES);
            }
            return Ok(());
        }
        let bits = if req.uid() == a.uid {
            (mode >> 6) & 7
        } else if req.gid() == a.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if (bits as i32) & want == want {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }
}

impl Filesystem for JfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        // As much kernel readahead as the kernel offers (raised further
        // through sysfs once mounted).
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            // fcntl and flock locks go to metad, so they hold across mounts
            // (flock arrives as a whole-file lock, as on the NFS client).
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            // Not every kernel has every capability; none is required.
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.block(self.client.flush_all()) {
            tracing::error!(error = %e, "flushing open files at unmount failed; their last writes may be lost");
        }
        // The kernel forgets every inode at unmount without telling us.
        self.block(self.client.release_orphans());
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guard("lookup", || {
            if self.panic_name.as_deref() == Some(name.as_bytes()) {
                panic!("lookup of {name:?}: panic requested by JFS_TEST_PANIC_NAME");
            }
            let res = name_of(name).and_then(|n| self.block(self.client.lookup(self.ino(parent), n)).map_err(errno));
            self.entry(reply, res);
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.guard("forget", || {
            // Inode numbers are jfs's own, so only the references matter: the
            // last one frees a file that was unlinked or replaced meanwhile.
            let (client, ino) = (self.client.clone(), self.ino(ino));
            self.rt.spawn(async move { client.unpin(ino, nlookup).await });
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<Fh>, reply: ReplyAttr) {
        self.guard("getattr", || match self.block(self.client.getattr(self.ino(ino))) {
            Ok(a) => reply.attr(&self.attr_ttl, &self.file_attr(&a)),
            Err(e) => reply.error(errno_ino(e)),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<Fh>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.guard("setattr", || {
            let t = |x: Option<TimeOrNow>| {
                x.map(|x| match x {
                    TimeOrNow::Now => TimeArg::Now,
                    TimeOrNow::SpecificTime(t) => TimeArg::At(from_time(t)),
                })
            };
            let args = SetAttrArgs {
                mode,
                uid,
                gid,
                size,
                atime: t(atime),
                mtime: t(mtime),
                ctime: ctime.map(from_time),
            };
            match self.do_setattr(self.ino(ino), args) {
                Ok(a) => reply.attr(&self.attr_ttl, &self.file_attr(&a)),
                Err(e) => reply.error(e),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.guard("readlink", || match self.block(self.client.readlink(self.ino(ino))) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno_ino(e)),
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.guard("mknod", || {
            // The kernel already applied the umask to `mode`.
            let res = self.writable().and_then(|_| name_of(name)).and_then(|n| {
                self.block(
                    self.client
                        .mknod(self.ino(parent), n, mode, req.uid(), req.gid(), rdev, true),
                )
                .map_err(errno)
            });
            self.entry(reply, res);
        })
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.guard("mkdir", || {
            let res = self.writable().and_then(|_| name_of(name)).and_then(|n| {
                self.block(self.client.mkdir(self.ino(parent), n, mode, req.uid(), req.gid()))
                    .map_err(errno)
            });
            self.entry(reply, res);
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("unlink", || {
            let res = self
                .writable()
                .and_then(|_| name_of(name))
                .and_then(|n| self.block(self.client.unlink(self.ino(parent), n)).map_err(errno));
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("rmdir", || {
            let res = self
                .writable()
                .and_then(|_| name_of(name))
                .and_then(|n| self.block(self.client.rmdir(self.ino(parent), n)).map_err(errno));
            match res {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.guard("symlink", || {
            let res = self.writable().and_then(|_| name_of(link_name)).and_then(|n| {
                self.block(self.client.symlink(
                    self.ino(parent),
                    n,
                    target.as_os_str().as_bytes(),
                    req.uid(),
                    req.gid(),
                ))
                .map_err(errno)
            });
            self.entry(reply, res);
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.guard("rename", || {
            let res = (|| {
                self.writable()?;
                if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                    return Err(Errno::EINVAL);
                }
                let mut f = 0;
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    f |= jfs_client::RENAME_NOREPLACE;
                }
                if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    f |= jfs_client::RENAME_EXCHANGE;
                }
                let (n, nn) = (name_of(name)?, name_of(newname)?);
                self.block(self.client.rename(self.ino(parent), n, self.ino(newparent), nn, f))
                    .map_err(errno)
            })();
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.guard("link", || {
            let res = self.writable().and_then(|_| name_of(newname)).and_then(|n| {
                self.block(self.client.link(self.ino(ino), self.ino(newparent), n))
                    .map_err(errno)
            });
            self.entry(reply, res);
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.guard("open", || {
            if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
                return reply.error(Errno::EROFS);
            }
            match self.block(self.client.open_file(self.ino(ino))) {
                Ok(h) => {
                    // Close-to-open: the kernel would trust a cached size for
                    // up to attr_timeout and cut reads short of what another
                    // client just wrote. Mark its attributes stale; the next
                    // read fetches them again.
                    if let Some(n) = self.notifier.get() {
                        let _ = n.inval_inode(ino, -1, 0);
                    }
                    let mut fopen = FopenFlags::empty();
                    if flags.0 & libc::O_DIRECT != 0 {
                        // O_DIRECT: no page cache for this open, every read
                        // and write comes to us.
                        fopen |= FopenFlags::FOPEN_DIRECT_IO;
                    } else if self.pages_still_valid(h.attr_at_open()) {
                        fopen |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    reply.opened(self.add_handle(h), fopen)
                }
                Err(e) => reply.error(errno_ino(e)),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: Fh,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guard("read", || {
            let t0 = std::time::Instant::now();
            let res = self.handle(fh).and_then(|h| {
                self.block(h.read_at(offset, size as usize)).map_err(|e| {
                    // The application sees only an errno (an mmap reader:
                    // SIGBUS); the reason goes to the log.
                    tracing::warn!(ino = h.ino(), offset, size, error = %e, "read failed");
                    errno(e)
                })
            });
            tracing::trace!(offset, size, us = t0.elapsed().as_micros() as u64, "read");
            match res {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: Fh,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.guard("write", || {
            let t0 = std::time::Instant::now();
            let res = self
                .writable()
                .and_then(|_| self.handle(fh))
                .and_then(|h| self.block(h.write_at(offset, data)).map_err(errno));
            tracing::trace!(offset, len = data.len(), us = t0.elapsed().as_micros() as u64, "write");
            match res {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(e),
            }
        })
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: Fh, lock_owner: LockOwner, reply: ReplyEmpty) {
        self.guard("flush", || {
            // close(2) drops the process's POSIX locks on the file.
            self.unlock_all(self.ino(ino), lock_owner.0);
            match self.handle(fh).and_then(|h| self.flush_handle(&h, false)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Fh,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", || {
            // The last close of an open file description drops its flock.
            if let Some(o) = lock_owner {
                self.unlock_all(self.ino(ino), o.0);
            }
            let h = lock(&self.files).remove(&fh.0);
            match h {
                Some(h) => match self.flush_handle(&h, true) {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        // close(2) has already returned; flush reported it too.
                        tracing::error!(ino = h.ino(), errno = ?e, "release: the file's last writes were not committed");
                        reply.error(e)
                    }
                },
                None => reply.error(Errno::EBADF),
            }
        })
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Fh,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        self.guard("getlk", || {
            let Some(typ) = lock_type(typ) else {
                return reply.error(Errno::EINVAL);
            };
            match self.block(self.client.get_lock(self.ino(ino), lock_owner.0, typ, start, end)) {
                Ok(r) if r.conflict => {
                    let t = if r.typ == 1 { libc::F_WRLCK } else { libc::F_RDLCK };
                    reply.locked(r.start, r.end, t, r.pid)
                }
                Ok(_) => reply.locked(start, end, libc::F_UNLCK, pid),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Fh,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("setlk", || {
            let Some(typ) = lock_type(typ) else {
                return reply.error(Errno::EINVAL);
            };
            let (ino, owner) = (self.ino(ino), lock_owner.0);
            if typ != 2 {
                lock(&self.locked).insert((ino, owner));
            }
            let client = self.client.clone();
            let attempt = async move {
                // F_SETLKW / blocking flock: metad does not queue waiters, so
                // poll, backing off to 200 ms. The wait runs as a task, not
                // on a FUSE thread.
                let mut pause = Duration::from_millis(10);
                loop {
                    match client.set_lock(ino, owner, pid, typ, start, end).await {
                        Err(FsError::WouldBlock) if sleep => {
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(200));
                        }
                        Ok(()) => return reply.ok(),
                        Err(e) => return reply.error(errno(e)),
                    }
                }
            };
            if sleep {
                self.rt.spawn(attempt);
            } else {
                self.block(attempt);
            }
        })
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: Fh, _datasync: bool, reply: ReplyEmpty) {
        self.guard("fsync", || {
            match self.handle(fh).and_then(|h| self.flush_handle(&h, false)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guard("opendir", || {
            let id = self.next_fh.fetch_add(1, Ordering::Relaxed);
            reply.opened(Fh(id), FopenFlags::empty());
        })
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: Fh, offset: u64, mut reply: ReplyDirectory) {
        self.guard("readdir", || {
            let dir = self.ino(ino);
            let list = match self.dir_listing(dir, fh, offset, false) {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            // Offsets: 1 = ".", 2 = "..", 3.. = entries; each entry carries the
            // offset of the one after it.
            let mut i = offset;
            loop {
                let full = match i {
                    0 => reply.add(ino, 1, FileType::Directory, "."),
                    1 => reply.add(ino, 2, FileType::Directory, ".."),
                    _ => match list.get((i - 2) as usize) {
                        Some(e) => reply.add(self.fuse_ino(e.ino), i + 1, kind_of(e.kind), OsStr::from_bytes(&e.name)),
                        None => break,
                    },
                };
                if full {
                    break;
                }
                i += 1;
            }
            reply.ok();
        })
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: Fh, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.guard("readdirplus", || {
            let dir = self.ino(ino);
            let list = match self.dir_listing(dir, fh, offset, true) {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let dot_attr = if offset < 2 {
                match self.block(self.client.getattr(dir)) {
                    Ok(a) => Some(self.file_attr(&a)),
                    Err(e) => return reply.error(errno(e)),
                }
            } else {
                None
            };
            let mut i = offset;
            loop {
                let full = match (i, &dot_attr) {
                    // The kernel makes no dentries for "." and ".."; their
                    // attributes only need to be well formed.
                    (0, Some(a)) => reply.add(ino, 1, ".", &Duration::ZERO, a, Generation(0)),
                    (1, Some(a)) => reply.add(ino, 2, "..", &Duration::ZERO, a, Generation(0)),
                    _ => match list.get((i.max(2) - 2) as usize) {
                        Some(e) => {
                            let Some(a) = &e.attr else {
                                // metad sent no attributes: let the kernel look it up.
                                i += 1;
                                continue;
                            };
                            let fa = self.file_attr(a);
                            let full = reply.add(
                                fa.ino,
                                i + 1,
                                OsStr::from_bytes(&e.name),
                                &self.entry_ttl,
                                &fa,
                                Generation(a.generation),
                            );
                            if !full {
                                // The kernel takes a lookup reference on each entry.
                                self.client.pin(a.ino, 1);
                            }
                            full
                        }
                        None => break,
                    },
                };
                if full {
                    break;
                }
                i += 1;
            }
            reply.ok();
        })
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: Fh, _flags: OpenFlags, reply: ReplyEmpty) {
        self.guard("releasedir", || {
            lock(&self.dirs).remove(&fh.0);
            reply.ok();
        })
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: Fh, _datasync: bool, reply: ReplyEmpty) {
        self.guard("fsyncdir", || {
            // Metadata is committed (fsynced on a majority) before each reply.
            reply.ok();
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.guard("statfs", || {
            const FRSIZE: u64 = 4096;
            match self.block(self.client.statfs()) {
                Ok(s) => {
                    let blocks = s.total_bytes / FRSIZE;
                    let free = (s.free_bytes / FRSIZE).min(blocks);
                    // jfs has no inode limit; report plenty free.
                    let ffree = 1u64 << 32;
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        s.inodes + ffree,
                        ffree,
                        IO_SIZE,
                        NAME_MAX as u32,
                        FRSIZE as u32,
                    )
                }
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.guard("setxattr", || {
            let res = (|| {
                self.writable()?;
                let name = name.as_bytes();
                if name.starts_with(b"system.posix_acl_") {
                    // ACLs are not enforced by jfs; storing them would pretend they are.
                    return Err(Errno::EOPNOTSUPP);
                }
                lock(&self.no_caps).remove(&self.ino(ino));
                self.block(self.client.setxattr(self.ino(ino), name, value, flags as u32))
                    .map_err(errno)
            })();
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.guard("getxattr", || {
            let name = name.as_bytes();
            if name.starts_with(b"system.posix_acl_") {
                return reply.error(Errno::ENODATA);
            }
            let ino = self.ino(ino);
            let caps = name == CAPS_XATTR;
            if caps && self.caps_known_absent(ino) {
                return reply.error(Errno::ENODATA);
            }
            match self.block(self.client.getxattr(ino, name)) {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => {
                    if caps && e == FsError::NoAttribute {
                        self.note_caps_absent(ino);
                    }
                    reply.error(errno_ino(e))
                }
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guard("listxattr", || match self.block(self.client.listxattr(self.ino(ino))) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                xattr_reply(reply, size, &buf)
            }
            Err(e) => reply.error(errno_ino(e)),
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("removexattr", || {
            let res = self.writable().and_then(|_| {
                self.block(self.client.removexattr(self.ino(ino), name.as_bytes()))
                    .map_err(errno)
            });
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.guard("access", || {
            if self.read_only && mask.contains(AccessFlags::W_OK) {
                return reply.error(Errno::EROFS);
            }
            let res = self
                .block(self.client.getattr(self.ino(ino)))
                .map_err(errno_ino)
                .and_then(|a| Self::check_access(req, &a, mask));
            match res {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.guard("create", || {
            let res = (|| {
                self.writable()?;
                let n = name_of(name)?;
                let exclusive = flags & libc::O_EXCL != 0;
                let attr = self
                    .block(self.client.mknod(
                        self.ino(parent),
                        n,
                        S_IFREG | (mode & 0o7777),
                        req.uid(),
                        req.gid(),
                        0,
                        exclusive,
                    ))
                    .map_err(errno)?;
                if exclusive {
                    // A file made just now has no extended attributes: the
                    // kernel's security.capability check before every
                    // write (a metad round trip each) can be answered here.
                    self.note_caps_absent(attr.ino);
                }
                let h = self.block(self.client.open_created(&attr)).map_err(errno)?;
                let attr = if flags & libc::O_TRUNC != 0 && attr.size > 0 {
                    // An existing file came back (not O_EXCL) and O_TRUNC asks to empty it.
                    let args = SetAttrArgs {
                        size: Some(0),
                        ..Default::default()
                    };
                    self.block(self.client.setattr(attr.ino, args)).map_err(errno)?
                } else {
                    attr
                };
                Ok((attr, h))
            })();
            match res {
                Ok((a, h)) => {
                    let fh = self.add_handle(h);
                    // A CREATE that found an existing file: its attributes
                    // must not be older than ones the kernel already has
                    // (see Client::hand_out).
                    self.client.hand_out(a, 1, |a| {
                        reply.created(
                            &self.entry_ttl,
                            &self.file_attr(a),
                            Generation(a.generation),
                            fh,
                            FopenFlags::empty(),
                        )
                    })
                }
                Err(e) => reply.error(e),
            }
        })
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: Fh,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.guard("ioctl", || {
            // isatty() and friends ask this of every file; jfs files have no ioctls.
            reply.error(Errno::ENOTTY);
        })
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: Fh, offset: i64, whence: i32, reply: fuser::ReplyLseek) {
        self.guard("lseek", || {
            // The kernel handles SEEK_SET/CUR/END itself; we get the rest.
            let data = match whence {
                libc::SEEK_DATA => true,
                libc::SEEK_HOLE => false,
                _ => return reply.error(Errno::EINVAL),
            };
            if offset < 0 {
                return reply.error(Errno::ENXIO);
            }
            let res = self
                .handle(fh)
                .and_then(|h| self.block(h.seek_data_hole(offset as u64, data)).map_err(errno));
            match res {
                Ok(Some(o)) => reply.offset(o as i64),
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(e),
            }
        })
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: Fh,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: Fh,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.guard("copy_file_range", || {
            // ENOSYS makes the kernel fall back to read + write.
            reply.error(Errno::ENOSYS);
        })
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: Fh, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        self.guard("fallocate", || {
            let res = self.writable().and_then(|_| {
                let ino = self.ino(ino);
                self.forget_page_version(ino);
                self.block(self.client.fallocate(ino, mode as u32, offset, length))
                    .map_err(errno)
            });
            // The kernel drops its cached pages of a punched range itself
            // once we answer, and sets the size for mode 0.
            match res {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length; a buffer too
/// small is ERANGE.
fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}
