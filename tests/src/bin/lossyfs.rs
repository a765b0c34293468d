//! lossyfs: a FUSE passthrough filesystem that loses, at a power cut,
//! every write that was not fsynced.
//!
//! Usage: `lossyfs BACKING_DIR MOUNTPOINT` (runs in the foreground).
//!
//! It exists for `tests/tests/power_loss.rs`. `kill -9` of a daemon tests
//! nothing about fsync: what it wrote stays in the kernel's page cache and is
//! read back after the restart. Under lossyfs that page cache is this
//! process's memory:
//!
//! * Namespace operations (lookup, create, mkdir, mknod, unlink, rmdir,
//!   rename, setattr including truncate, readdir, statfs) act on BACKING_DIR
//!   at once, like a filesystem whose metadata journal is always committed.
//! * File data does not: every write is kept in memory, per inode, as a map
//!   of dirty byte ranges plus the file's logical size. Reads and getattr see
//!   the backing file with that overlay on top (so RocksDB can read its own
//!   unsynced WAL). Only fsync/fdatasync of the file writes its dirty ranges
//!   and size to the backing file and fsyncs that. The overlay belongs to the
//!   inode: it follows renames and is dropped with the last name and the last
//!   open handle of an unlinked file.
//! * A power cut is `kill -9` of this process followed by `umount -l` of the
//!   dead mount: what was never fsynced only ever lived here and is gone, and
//!   BACKING_DIR holds exactly what was made durable.
//!
//! Not supported: hard links, symlinks, xattrs and fallocate (the kernel then
//! answers EOPNOTSUPP; RocksDB only uses it to preallocate and ignores that).
//! One thread serves every request, so no two operations interleave. Prints
//! nothing unless something fails.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// How long the kernel may cache names and attributes. Safe: nobody but
/// this process changes BACKING_DIR while it is mounted.
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

type R<T> = Result<T, Errno>;

/// The unsynced data of one file.
#[derive(Default)]
struct Dirty {
    /// Written but not yet fsynced bytes by start offset; the ranges neither
    /// overlap nor touch.
    ranges: BTreeMap<u64, Vec<u8>>,
    /// Logical size; never below the backing file's (truncate shrinks both).
    size: u64,
}

impl Dirty {
    fn write(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        self.size = self.size.max(end);
        if data.is_empty() {
            return;
        }
        // A range that reaches `off` from below is extended in place (the
        // common case: appends to a log), the ranges starting inside
        // [start, end] are merged into it, and `data` goes on top.
        let start = match self.ranges.range(..=off).next_back() {
            Some((&s, v)) if s + v.len() as u64 >= off => s,
            _ => off,
        };
        let mut buf = self.ranges.remove(&start).unwrap_or_default();
        let later: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in later {
            let v = self.ranges.remove(&s).unwrap_or_default();
            put(&mut buf, (s - start) as usize, &v);
        }
        put(&mut buf, (off - start) as usize, data);
        self.ranges.insert(start, buf);
    }

    fn truncate(&mut self, size: u64) {
        self.size = size;
        self.ranges.retain(|&s, _| s < size);
        if let Some((&s, v)) = self.ranges.range_mut(..size).next_back() {
            v.truncate((size - s) as usize);
        }
    }

    /// Copies the dirty bytes that fall in `[off, off + buf.len())` into `buf`.
    fn overlay(&self, off: u64, buf: &mut [u8]) {
        let end = off + buf.len() as u64;
        let first = self.ranges.range(..=off).next_back().map_or(off, |(&s, _)| s);
        for (&s, v) in self.ranges.range(first..end) {
            let (a, b) = (s.max(off), (s + v.len() as u64).min(end));
            if a < b {
                buf[(a - off) as usize..(b - off) as usize].copy_from_slice(&v[(a - s) as usize..(b - s) as usize]);
            }
        }
    }
}

/// Writes `data` at `at` in `buf`, growing it (with zeros) as needed.
fn put(buf: &mut Vec<u8>, at: usize, data: &[u8]) {
    if buf.len() < at + data.len() {
        buf.resize(at + data.len(), 0);
    }
    buf[at..at + data.len()].copy_from_slice(data);
}

/// What we know of an inode the kernel has looked up.
struct Node {
    parent: u64,
    name: OsString,
    /// False once unlinked (or replaced by a rename) while still open.
    linked: bool,
    opens: u32,
    dirty: Option<Dirty>,
}

struct State {
    root: PathBuf,
    /// The backing root's st_ino; it and FUSE's root number 1 swap places.
    root_ino: u64,
    nodes: HashMap<u64, Node>,
    /// Open files: handle -> (inode, backing file opened read-write).
    files: HashMap<u64, (u64, File)>,
    /// Directory listings taken at opendir: (inode, type, name).
    dirs: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    next_fh: u64,
}

struct LossyFs(Mutex<State>);

impl LossyFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn cpath(p: &Path) -> R<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn cvt(ret: libc::c_int) -> R<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error().into())
    } else {
        Ok(ret)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nsecs as u32),
        Err(_) => UNIX_EPOCH,
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match t {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            (d.as_secs() as libc::time_t, d.subsec_nanos() as libc::c_long)
        }
    };
    libc::timespec { tv_sec, tv_nsec }
}

impl State {
    /// FUSE inode number of a backing st_ino (and back: the map is its own inverse).
    fn ino(&self, st_ino: u64) -> u64 {
        if st_ino == self.root_ino {
            ROOT
        } else if st_ino == ROOT {
            self.root_ino
        } else {
            st_ino
        }
    }

    /// Backing path of a linked inode.
    fn path(&self, ino: u64) -> R<PathBuf> {
        let mut names = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let n = self.nodes.get(&cur).filter(|n| n.linked).ok_or(Errno::ENOENT)?;
            names.push(n.name.as_os_str());
            cur = n.parent;
            if names.len() > 4096 {
                return Err(Errno::ELOOP);
            }
        }
        let mut p = self.root.clone();
        p.extend(names.iter().rev());
        Ok(p)
    }

    fn child(&self, parent: u64, name: &OsStr) -> R<PathBuf> {
        Ok(self.path(parent)?.join(name))
    }

    /// Attributes as the kernel should see them: the logical size of a file
    /// with unsynced data.
    fn attr(&self, m: &fs::Metadata) -> FileAttr {
        let ino = self.ino(m.ino());
        let size = match self.nodes.get(&ino).and_then(|n| n.dirty.as_ref()) {
            Some(d) => d.size,
            None => m.size(),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: m.blocks().max(size.div_ceil(512)),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.ctime(), m.ctime_nsec()),
            kind: kind(m.mode()),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: m.blksize() as u32,
            flags: 0,
        }
    }

    /// Attributes of an inode, through an open handle if there is one (an
    /// unlinked file has no path any more).
    fn getattr(&self, ino: u64, fh: Option<FileHandle>) -> R<FileAttr> {
        let m = match fh.and_then(|fh| self.files.get(&fh.0)) {
            Some((_, f)) => f.metadata()?,
            None => fs::symlink_metadata(self.path(ino)?)?,
        };
        Ok(self.attr(&m))
    }

    /// Records that `parent/name` is the inode `m` describes; returns its attributes.
    fn remember(&mut self, parent: u64, name: &OsStr, m: &fs::Metadata) -> FileAttr {
        let ino = self.ino(m.ino());
        if ino != ROOT {
            let n = self.nodes.entry(ino).or_insert_with(|| Node {
                parent,
                name: OsString::new(),
                linked: true,
                opens: 0,
                dirty: None,
            });
            (n.parent, n.name, n.linked) = (parent, name.to_owned(), true);
        }
        self.attr(m)
    }

    /// The inode lost its name: forget it, or, while it is open, keep its
    /// data for the handles until the last one is released.
    fn unlinked(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.linked = false;
            if n.opens == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    fn add_handle(&mut self, ino: u64, file: File) -> u64 {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.opens += 1;
        }
        self.next_fh += 1;
        self.files.insert(self.next_fh, (ino, file));
        self.next_fh
    }

    /// mkdir/mknod: `make` creates `parent/name`, owned by the caller.
    fn make(&mut self, req: &Request, parent: u64, name: &OsStr, make: impl Fn(&CString) -> i32) -> R<FileAttr> {
        let p = self.child(parent, name)?;
        cvt(make(&cpath(&p)?))?;
        std::os::unix::fs::lchown(&p, Some(req.uid()), Some(req.gid()))?;
        Ok(self.remember(parent, name, &fs::symlink_metadata(&p)?))
    }

    /// unlink/rmdir.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> R<()> {
        let p = self.child(parent, name)?;
        let ino = self.ino(fs::symlink_metadata(&p)?.ino());
        if dir {
            fs::remove_dir(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
        self.unlinked(ino);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> R<FileAttr> {
        if let Some(mode) = mode {
            fs::set_permissions(self.path(ino)?, fs::Permissions::from_mode(mode))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(self.path(ino)?, uid, gid)?;
        }
        if let Some(size) = size {
            // Truncation is a namespace operation here: the backing file
            // changes at once, and the unsynced data is cut to match.
            match fh.and_then(|fh| self.files.get(&fh.0)) {
                Some((_, f)) => f.set_len(size)?,
                None => OpenOptions::new().write(true).open(self.path(ino)?)?.set_len(size)?,
            }
            if let Some(d) = self.nodes.get_mut(&ino).and_then(|n| n.dirty.as_mut()) {
                d.truncate(size);
            }
        }
        if atime.is_some() || mtime.is_some() {
            let p = cpath(&self.path(ino)?)?;
            let ts = [timespec(atime), timespec(mtime)];
            // SAFETY: valid C string and a two-element timespec array.
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
        }
        self.getattr(ino, fh)
    }

    fn rename(&mut self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32) -> R<()> {
        let (from, to) = (self.child(parent, name)?, self.child(newparent, newname)?);
        let moved = self.ino(fs::symlink_metadata(&from)?.ino());
        let replaced = fs::symlink_metadata(&to).ok().map(|m| self.ino(m.ino()));
        let (cf, ct) = (cpath(&from)?, cpath(&to)?);
        // SAFETY: valid C strings.
        cvt(unsafe { libc::renameat2(libc::AT_FDCWD, cf.as_ptr(), libc::AT_FDCWD, ct.as_ptr(), flags) })?;
        if let Some(r) = replaced.filter(|&r| r != moved) {
            if flags & libc::RENAME_EXCHANGE != 0 {
                if let Some(n) = self.nodes.get_mut(&r) {
                    (n.parent, n.name) = (parent, name.to_owned());
                }
            } else {
                self.unlinked(r);
            }
        }
        if let Some(n) = self.nodes.get_mut(&moved) {
            (n.parent, n.name) = (newparent, newname.to_owned());
        }
        Ok(())
    }

    fn read(&self, fh: u64, off: u64, size: u32) -> R<Vec<u8>> {
        let (ino, f) = self.files.get(&fh).ok_or(Errno::EBADF)?;
        let dirty = self.nodes.get(ino).and_then(|n| n.dirty.as_ref());
        let logical = match dirty {
            Some(d) => d.size,
            None => f.metadata()?.len(),
        };
        let len = (size as u64).min(logical.saturating_sub(off)) as usize;
        // Bytes past the backing file's end (not yet synced) read as zeros
        // unless the overlay has them.
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(d) = dirty {
            d.overlay(off, &mut buf);
        }
        Ok(buf)
    }

    fn write(&mut self, fh: u64, off: u64, data: &[u8]) -> R<u32> {
        let (ino, f) = self.files.get(&fh).ok_or(Errno::EBADF)?;
        let node = self.nodes.get_mut(ino).ok_or(Errno::EBADF)?;
        if node.dirty.is_none() {
            let size = f.metadata()?.len();
            node.dirty = Some(Dirty {
                ranges: BTreeMap::new(),
                size,
            });
        }
        node.dirty.get_or_insert_with(Dirty::default).write(off, data);
        Ok(data.len() as u32)
    }

    /// fsync/fdatasync: the file's unsynced data reaches the backing file,
    /// and the backing file the disk.
    fn fsync(&mut self, fh: u64, datasync: bool) -> R<()> {
        let (ino, f) = self.files.get(&fh).ok_or(Errno::EBADF)?;
        let node = self.nodes.get_mut(ino).ok_or(Errno::EBADF)?;
        if let Some(d) = node.dirty.take() {
            let applied = (|| -> io::Result<()> {
                for (&s, v) in &d.ranges {
                    f.write_all_at(v, s)?;
                }
                if f.metadata()?.len() < d.size {
                    f.set_len(d.size)?;
                }
                Ok(())
            })();
            if let Err(e) = applied {
                eprintln!("lossyfs: writing back inode {ino} at fsync failed: {e}");
                node.dirty = Some(d);
                return Err(e.into());
            }
        }
        let synced = if datasync { f.sync_data() } else { f.sync_all() };
        synced.map_err(|e| {
            eprintln!("lossyfs: fsync of inode {ino} failed: {e}");
            e.into()
        })
    }

    fn opendir(&mut self, ino: u64) -> R<u64> {
        let path = self.path(ino)?;
        let parent = self.nodes.get(&ino).map_or(ROOT, |n| n.parent);
        let mut list = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        for e in fs::read_dir(&path)? {
            let e = e?;
            list.push((self.ino(e.ino()), kind(e.metadata()?.mode()), e.file_name()));
        }
        self.next_fh += 1;
        self.dirs.insert(self.next_fh, list);
        Ok(self.next_fh)
    }

    fn statfs(&self) -> R<libc::statvfs> {
        let p = cpath(&self.root)?;
        // SAFETY: statvfs fills the zeroed struct we own.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
        Ok(st)
    }
}

fn reply_entry(reply: ReplyEntry, res: R<FileAttr>) {
    match res {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, res: R<FileAttr>) {
    match res {
        Ok(a) => reply.attr(&TTL, &a),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, res: R<()>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        let res = s
            .child(parent.0, name)
            .and_then(|p| Ok(fs::symlink_metadata(p)?))
            .map(|m| s.remember(parent.0, name, &m));
        reply_entry(reply, res);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.state().getattr(ino.0, fh));
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
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = self.state().setattr(ino.0, mode, uid, gid, size, atime, mtime, fh);
        reply_attr(reply, res);
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
        // SAFETY: valid C string.
        let make = |c: &CString| unsafe { libc::mknod(c.as_ptr(), mode, rdev as libc::dev_t) };
        reply_entry(reply, self.state().make(req, parent.0, name, make));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        // SAFETY: valid C string.
        let make = |c: &CString| unsafe { libc::mkdir(c.as_ptr(), mode) };
        reply_entry(reply, self.state().make(req, parent.0, name, make));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.state().remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.state().remove(parent.0, name, true));
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
        let res = self.state().rename(parent.0, name, newparent.0, newname, flags.bits());
        reply_empty(reply, res);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.state();
        // Every handle reads and writes the backing file (we run as root);
        // the kernel checked the caller's access mode.
        let res = s
            .path(ino.0)
            .and_then(|p| Ok(OpenOptions::new().read(true).write(true).open(p)?))
            .map(|f| s.add_handle(ino.0, f));
        match res {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
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
        let mut s = self.state();
        let res = (|| {
            let p = s.child(parent.0, name)?;
            let c = cpath(&p)?;
            let oflags = libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC | (flags & libc::O_EXCL);
            // SAFETY: valid C string; the fd is owned by the File below.
            let fd = cvt(unsafe { libc::open(c.as_ptr(), oflags, mode) })?;
            let f = unsafe { File::from_raw_fd(fd) };
            // SAFETY: plain syscall on the fd we own.
            cvt(unsafe { libc::fchown(f.as_raw_fd(), req.uid(), req.gid()) })?;
            let attr = s.remember(parent.0, name, &f.metadata()?);
            Ok((attr, s.add_handle(attr.ino.0, f)))
        })();
        match res {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) promises nothing about durability: nothing to do.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        if let Some((ino, _file)) = s.files.remove(&fh.0) {
            if let Some(n) = s.nodes.get_mut(&ino) {
                n.opens = n.opens.saturating_sub(1);
                if n.opens == 0 && !n.linked {
                    s.nodes.remove(&ino);
                }
            }
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.state().fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let s = self.state();
        let Some(list) = s.dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, k, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.state().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Names are durable at once here, but pass the fsync on anyway.
        let res = self.state().path(ino.0).and_then(|p| Ok(File::open(p)?.sync_all()?));
        reply_empty(reply, res);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.state().statfs() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }
}

fn fail(msg: String) -> ! {
    eprintln!("lossyfs: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: lossyfs BACKING_DIR MOUNTPOINT");
        std::process::exit(2);
    };
    let (backing, mountpoint) = (Path::new(backing), Path::new(mountpoint));
    let root = fs::canonicalize(backing).unwrap_or_else(|e| fail(format!("{}: {e}", backing.display())));
    let root_ino = match fs::metadata(&root) {
        Ok(m) if m.is_dir() => m.ino(),
        Ok(_) => fail(format!("{} is not a directory", root.display())),
        Err(e) => fail(format!("{}: {e}", root.display())),
    };
    let state = State {
        root,
        root_ino,
        nodes: HashMap::new(),
        files: HashMap::new(),
        dirs: HashMap::new(),
        next_fh: 0,
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("lossyfs".into()),
        MountOption::CUSTOM("subtype=lossyfs".into()),
    ];
    // One thread (fuser's default) serves every request, in order.
    if let Err(e) = fuser::Session::new(LossyFs(Mutex::new(state)), mountpoint, &cfg).and_then(|s| s.run()) {
        fail(format!("serving {}: {e}", mountpoint.display()));
    }
}
