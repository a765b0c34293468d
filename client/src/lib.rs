//! jfs client library: everything a process needs to use a jfs namespace
//! without FUSE. Used by `jfs-mountd` (the FUSE daemon) and by the `jfs` CLI.
//!
//! # API in one page (for the CLI author)
//!
//! All calls are `async` (tokio) and return [`FsResult`]; errors are
//! [`FsError`] (print them with `e.cli_line()`).
//!
//! ```ignore
//! let cfg = jfs_common::config::Config::load(path)?;
//! let client = Client::connect(&cfg, "default").await?;   // finds the namespace; Clone is cheap
//! let info = client.namespace_info();                      // id, block_size, root_ino, ...
//! let attr = client.resolve("/a/b").await?;                // walk a path from the root
//! let (dir, name) = client.resolve_parent("/a/b/new").await?; // parent Attr + last component
//! let entries = client.readdir_all(attr.ino, true).await?; // Vec<DirEntry> (attrs when plus)
//! let f = client.create(dir.ino, b"new", 0o644, 0, 0, false).await?;
//! let h = client.open_file(f.ino).await?;                  // FileHandle, no FUSE needed
//! h.write_at(0, b"hello").await?;
//! let bytes = h.read_at(0, 5).await?;
//! h.release().await?;                                      // flushes, commits: durable now
//! client.meta().list_namespaces().await?;                  // cluster-level calls
//! MetaClient::status_of(&addr, timeout).await?;            // one node's view, no retry
//! ```
//!
//! * Names are bytes (`&[u8]`), as on the wire; inode numbers are `u64`.
//! * Every metadata call follows the metad leader and retries retryable
//!   errors until `client_timeout` (see [`MetaClient`]). Mutations are sent
//!   with a sequence number reused on every retry, so each happens once.
//! * File data: a [`FileHandle`] buffers writes per inode and uploads full
//!   blocks in the background; `flush`/`fsync`/`release` wait for the
//!   uploads and commit the block map (close-to-open consistency). Always
//!   call `release()` when done with a handle.
//! * Attributes returned by this client include sizes of unflushed writes
//!   made through this process.
//! * A file unlinked or replaced while this process has it open stays
//!   readable through its handles until the last `release()`; mountd also
//!   `pin`s the inodes the kernel remembers, so an open racing with
//!   `mv new old` still finds the replaced file.
//! * For FUSE: `open_created` (no map fetch for a new empty file),
//!   `local_size`, `flush_all`, `pin`/`unpin`, `release_orphans`.

mod blocks;
mod dir_cache;
mod file;
pub mod layout;
mod meta;
pub mod mounts;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jfs_common::config::Config;
use jfs_common::rpc;
pub use jfs_common::rpc::{Attr, DirEntry, NamespaceInfo, NodeStatus, StatFsReply, Timespec};
pub use jfs_common::{FsError, FsResult};

pub use file::FileHandle;
pub use meta::MetaClient;

use blocks::BlockPool;
use dir_cache::{DirCache, Edit};
use file::OpenInode;

/// Rename flags (Linux values), for [`Client::rename`].
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// setxattr flags (Linux values), for [`Client::setxattr`].
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;
/// fallocate(2) modes (Linux values), for [`Client::fallocate`].
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
/// Largest file size metad accepts.
pub const MAX_FILE_SIZE: u64 = 1 << 50;
/// Block ids asked for per AllocateBlocks call (shared by every file of
/// this client, so a small file written and closed needs no call of its own).
const ALLOC_BATCH: u32 = 16;

/// Longest file name jfs accepts, in bytes.
pub use jfs_common::names::{check_name, NAME_MAX};

/// A time to set with [`Client::setattr`].
#[derive(Debug, Clone, PartialEq)]
pub enum TimeArg {
    /// The metad leader's clock (`UTIME_NOW`).
    Now,
    At(Timespec),
}

/// What [`Client::setattr`] changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SetAttrArgs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend. Unflushed writes to the file are flushed first.
    pub size: Option<u64>,
    pub atime: Option<TimeArg>,
    pub mtime: Option<TimeArg>,
    pub ctime: Option<Timespec>,
}

/// A connection to one namespace of a jfs cluster. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    meta: MetaClient,
    ns: NamespaceInfo,
    blocks: BlockPool,
    /// Files this process has open, by inode: shared write buffers and
    /// block maps, handle counts, orphan state.
    open: Mutex<HashMap<u64, Arc<OpenInode>>>,
    /// References the caller holds on inodes besides open files (for
    /// mountd: the kernel's lookup counts). A replaced or unlinked inode
    /// that is still referenced is kept until the last reference goes.
    /// Lock order: `open`, then an OpenInode's state, then `pins`.
    pins: Mutex<HashMap<u64, Pin>>,
    timeout: Duration,
    /// Allocated block ids not used yet.
    alloc: tokio::sync::Mutex<VecDeque<rpc::AllocatedBlock>>,
    /// Chunks queued for compaction, and one compaction at a time: it is
    /// background work and must not crowd out the user's IO.
    compacting: Mutex<HashMap<(u64, u64), bool>>,
    compaction_slot: tokio::sync::Semaphore,
    /// Names known not to exist (off unless [`Client::cache_dir_names`]).
    dirs: DirCache,
}

#[derive(Default)]
struct Pin {
    count: u64,
    /// metad keeps the inode as an orphan for us; release it at the end.
    orphan: bool,
    /// The newest (by ctime) metad attributes handed out for the inode.
    newest: Option<Attr>,
}

fn ctime_of(a: &Attr) -> i128 {
    a.ctime.as_ref().map_or(0, |t| t.as_nanos())
}

/// `attr`, or the newer answer `p` already has; remembers the newest.
fn newest(p: &mut Pin, attr: Attr) -> Attr {
    match &p.newest {
        Some(n) if ctime_of(n) > ctime_of(&attr) => n.clone(),
        _ => {
            p.newest = Some(attr.clone());
            attr
        }
    }
}

impl Client {
    /// Connects to the cluster named by `cfg` and looks up `namespace`.
    /// Waits (up to `cfg.client_timeout`) for a metad leader.
    pub async fn connect(cfg: &Config, namespace: &str) -> FsResult<Client> {
        if cfg.rpc_addresses.is_empty() {
            return Err(FsError::InvalidArgument(
                "the config lists no metad address (set jfs.namespace.server.rpc-address)".into(),
            ));
        }
        let meta =
            MetaClient::new(cfg.rpc_addresses.clone(), cfg.client_timeout).with_session_timeout(cfg.session_timeout);
        Client::with_meta(meta, namespace).await
    }

    /// Like [`Client::connect`] with an existing [`MetaClient`] (shares its
    /// connections and sequence numbers).
    pub async fn with_meta(meta: MetaClient, namespace: &str) -> FsResult<Client> {
        let ns = meta.get_namespace(namespace).await?;
        if ns.block_size == 0 {
            return Err(FsError::Internal(format!(
                "namespace {namespace:?} reports block size 0"
            )));
        }
        let timeout = meta.timeout();
        Ok(Client {
            inner: Arc::new(Inner {
                meta,
                ns,
                blocks: BlockPool::new(timeout),
                open: Mutex::new(HashMap::new()),
                pins: Mutex::new(HashMap::new()),
                timeout,
                alloc: tokio::sync::Mutex::new(VecDeque::new()),
                compacting: Mutex::new(HashMap::new()),
                compaction_slot: tokio::sync::Semaphore::new(1),
                dirs: DirCache::new(),
            }),
        })
    }

    /// Answers lookups of names that this client knows are not there
    /// without asking metad, for knowledge younger than `ttl`: names of
    /// directories it listed completely or made, kept exact through its own
    /// changes (see dir_cache.rs). Another client's new name can stay
    /// unseen for up to `ttl`; zero (the default) turns this off.
    pub fn cache_dir_names(&self, ttl: Duration) {
        self.inner.dirs.set_ttl(ttl);
    }

    /// Applies the outcome of one of our entry operations on `dirs` to what
    /// is known about them.
    fn note_entry_change<T>(
        &self,
        res: &FsResult<T>,
        stamps: impl FnOnce(&T) -> &[rpc::DirStamp],
        dirs: &[u64],
        edits: &[Edit<'_>],
        asked: Instant,
    ) {
        match res {
            Ok(r) => self.inner.dirs.changed(stamps(r), edits, asked),
            // Failed, or unknown whether it happened: forget.
            Err(_) => dirs.iter().for_each(|&d| self.inner.dirs.forget(d)),
        }
    }

    pub fn namespace_info(&self) -> &NamespaceInfo {
        &self.inner.ns
    }

    pub fn meta(&self) -> &MetaClient {
        &self.inner.meta
    }

    pub fn root_ino(&self) -> u64 {
        self.inner.ns.root_ino
    }

    pub fn block_size(&self) -> u64 {
        self.inner.ns.block_size
    }

    fn ns_id(&self) -> u32 {
        self.inner.ns.id
    }

    // ------------------------------------------------------------ paths

    /// Attributes of the file at `path` (absolute within the namespace,
    /// `/a/b`; empty or `/` is the root). Symlinks are not followed.
    pub async fn resolve(&self, path: &str) -> FsResult<Attr> {
        let mut attr = self.getattr(self.root_ino()).await?;
        for comp in split_path(path)? {
            if attr.mode & rpc::S_IFMT != rpc::S_IFDIR {
                return Err(FsError::NotDirectory);
            }
            attr = self.lookup(attr.ino, comp.as_bytes()).await?;
        }
        Ok(attr)
    }

    /// The parent directory of `path` and the last component's name, e.g. to
    /// create `/a/b/new`. Fails with InvalidArgument for the root itself.
    pub async fn resolve_parent(&self, path: &str) -> FsResult<(Attr, Vec<u8>)> {
        let mut comps = split_path(path)?;
        let last = comps
            .pop()
            .ok_or_else(|| FsError::InvalidArgument(format!("{path:?} names the root, which has no parent")))?;
        let parent = self.resolve(&comps.join("/")).await?;
        if parent.mode & rpc::S_IFMT != rpc::S_IFDIR {
            return Err(FsError::NotDirectory);
        }
        Ok((parent, last.as_bytes().to_vec()))
    }

    // ------------------------------------------------------------ metadata

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        if self.inner.dirs.absent(parent, name) {
            metrics::counter!("jfs_client_dir_cache_hits_total").increment(1);
            return Err(FsError::NotFound);
        }
        let req = rpc::LookupRequest {
            ns: self.ns_id(),
            parent,
            name: name.to_vec(),
        };
        let reply = self.meta().call(|mut c| {
            let req = req.clone();
            async move { c.lookup(req).await }
        });
        Ok(self.local_view(attr_of(reply.await?.attr)?))
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let req = rpc::GetAttrRequest { ns: self.ns_id(), ino };
        let reply = self.meta().call(|mut c| async move { c.get_attr(req).await }).await?;
        Ok(self.local_view(attr_of(reply.attr)?))
    }

    /// One page of a directory listing, after `after` (empty: from the
    /// start). Returns the entries and whether the listing is complete.
    pub async fn readdir(&self, ino: u64, after: &[u8], limit: u32, plus: bool) -> FsResult<(Vec<DirEntry>, bool)> {
        let (entries, eof, _) = self.readdir_page(ino, after, limit, plus).await?;
        Ok((entries, eof))
    }

    /// [`Client::readdir`], and the directory's ctime when the page was read.
    async fn readdir_page(
        &self,
        ino: u64,
        after: &[u8],
        limit: u32,
        plus: bool,
    ) -> FsResult<(Vec<DirEntry>, bool, i64)> {
        let req = rpc::ReadDirRequest {
            ns: self.ns_id(),
            ino,
            after: after.to_vec(),
            limit,
            plus,
        };
        let reply = self
            .meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.read_dir(req).await }
            })
            .await?;
        let mut entries = reply.entries;
        if plus {
            for e in &mut entries {
                if let Some(a) = e.attr.take() {
                    e.attr = Some(self.local_view(a));
                }
            }
        }
        Ok((entries, reply.eof, reply.dir_ctime))
    }

    /// The whole directory listing (without `.` and `..`).
    pub async fn readdir_all(&self, ino: u64, plus: bool) -> FsResult<Vec<DirEntry>> {
        let mut out: Vec<DirEntry> = Vec::new();
        let asked = Instant::now();
        // One ctime on every page: no change cut through the listing.
        let mut ctime: Option<i64> = None;
        let mut one_ctime = true;
        loop {
            let after = out.last().map(|e| e.name.clone()).unwrap_or_default();
            let (entries, eof, c) = self.readdir_page(ino, &after, 1024, plus).await?;
            one_ctime &= *ctime.get_or_insert(c) == c;
            let empty = entries.is_empty();
            out.extend(entries);
            if eof || empty {
                if let (true, Some(c)) = (eof && one_ctime, ctime) {
                    self.inner
                        .dirs
                        .listed(ino, c, out.iter().map(|e| e.name.as_slice()), asked);
                }
                return Ok(out);
            }
        }
    }

    /// Creates a node of any type (`mode` carries the S_IF* type bits).
    /// With `exclusive == false` an existing regular file is returned.
    #[allow(clippy::too_many_arguments)]
    pub async fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        exclusive: bool,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let (ns, name) = (self.ns_id(), name.to_vec());
        let asked = Instant::now();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::MknodRequest {
                    hdr: Some(hdr),
                    ns,
                    parent,
                    name: name.clone(),
                    mode,
                    uid,
                    gid,
                    rdev,
                    exclusive,
                };
                async move { c.mknod(req).await }
            })
            .await;
        self.note_entry_change(&reply, |r| &r.dirs, &[parent], &[Edit::Add(parent, &name)], asked);
        let attr = attr_of(reply?.attr)?;
        if mode & rpc::S_IFMT == rpc::S_IFDIR && attr.mode & rpc::S_IFMT == rpc::S_IFDIR {
            // A directory made by this very call is empty.
            if let Some(c) = &attr.ctime {
                self.inner.dirs.made(attr.ino, c.as_nanos() as i64, asked);
            }
        }
        Ok(self.local_view(attr))
    }

    /// Creates a directory; `mode` is the permission bits.
    pub async fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.mknod(parent, name, rpc::S_IFDIR | (mode & 0o7777), uid, gid, 0, true)
            .await
    }

    /// Creates a regular file; `mode` is the permission bits.
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> FsResult<Attr> {
        self.mknod(parent, name, rpc::S_IFREG | (mode & 0o7777), uid, gid, 0, exclusive)
            .await
    }

    pub async fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        check_name(name)?;
        let (ns, name, target) = (self.ns_id(), name.to_vec(), target.to_vec());
        let asked = Instant::now();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::SymlinkRequest {
                    hdr: Some(hdr),
                    ns,
                    parent,
                    name: name.clone(),
                    target: target.clone(),
                    uid,
                    gid,
                };
                async move { c.symlink(req).await }
            })
            .await;
        self.note_entry_change(&reply, |r| &r.dirs, &[parent], &[Edit::Add(parent, &name)], asked);
        attr_of(reply?.attr)
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let req = rpc::ReadLinkRequest { ns: self.ns_id(), ino };
        let reply = self.meta().call(|mut c| async move { c.read_link(req).await }).await?;
        Ok(reply.target)
    }

    /// A new hard link `new_parent/new_name` to `ino`; returns its fresh attrs.
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        check_name(new_name)?;
        let (ns, new_name) = (self.ns_id(), new_name.to_vec());
        let asked = Instant::now();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::LinkRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    new_parent,
                    new_name: new_name.clone(),
                };
                async move { c.link(req).await }
            })
            .await;
        let edits = [Edit::Add(new_parent, &new_name)];
        self.note_entry_change(&reply, |r| &r.dirs, &[new_parent], &edits, asked);
        Ok(self.local_view(attr_of(reply?.attr)?))
    }

    /// Removes a non-directory. If this process still has the file open, its
    /// data stays readable through the open handles until the last release.
    pub async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<rpc::UnlinkReply> {
        check_name(name)?;
        // An open racing with the unlink (through a reference taken before
        // it) must find the file still there, as on a local file system:
        // keep it while anything of ours may refer to it.
        let keep_if_open = self.has_open_files() || !lock(&self.inner.pins).is_empty();
        let (ns, name) = (self.ns_id(), name.to_vec());
        let asked = Instant::now();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::UnlinkRequest {
                    hdr: Some(hdr),
                    ns,
                    parent,
                    name: name.clone(),
                    keep_if_open,
                };
                async move { c.unlink(req).await }
            })
            .await;
        self.note_entry_change(&reply, |r| &r.dirs, &[parent], &[Edit::Remove(parent, &name)], asked);
        let reply = reply?;
        if reply.orphaned {
            self.orphaned(reply.ino).await;
        }
        Ok(reply)
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        let (ns, name) = (self.ns_id(), name.to_vec());
        let asked = Instant::now();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::RmdirRequest {
                    hdr: Some(hdr),
                    ns,
                    parent,
                    name: name.clone(),
                };
                async move { c.rmdir(req).await }
            })
            .await;
        self.note_entry_change(&reply, |r| &r.dirs, &[parent], &[Edit::Remove(parent, &name)], asked);
        if let Ok(r) = &reply {
            self.inner.dirs.forget(r.ino);
        }
        reply.map(|_| ())
    }

    /// Renames `parent/name` to `new_parent/new_name`; `flags` is 0,
    /// [`RENAME_NOREPLACE`] or [`RENAME_EXCHANGE`].
    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<rpc::RenameReply> {
        check_name(name)?;
        check_name(new_name)?;
        // A replaced file may be about to be opened through a reference
        // taken before the rename (a reader racing with `mv new old`): keep
        // it while anything of ours refers to it, so the rename is atomic.
        let keep_if_open = self.has_open_files() || !lock(&self.inner.pins).is_empty();
        let (ns, name, new_name) = (self.ns_id(), name.to_vec(), new_name.to_vec());
        let asked = Instant::now();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::RenameRequest {
                    hdr: Some(hdr),
                    ns,
                    parent,
                    name: name.clone(),
                    new_parent,
                    new_name: new_name.clone(),
                    flags,
                    keep_if_open,
                };
                async move { c.rename(req).await }
            })
            .await;
        // An exchange keeps both names; a rename moves one.
        let edits = if flags & RENAME_EXCHANGE != 0 {
            Vec::new()
        } else {
            vec![Edit::Remove(parent, &name), Edit::Add(new_parent, &new_name)]
        };
        self.note_entry_change(&reply, |r| &r.dirs, &[parent, new_parent], &edits, asked);
        let reply = reply?;
        // A directory replaced by the rename is gone.
        self.inner.dirs.forget(reply.replaced_ino);
        if reply.orphaned {
            self.orphaned(reply.replaced_ino).await;
        }
        Ok(reply)
    }

    /// chmod, chown, truncate, utimens. A size change first flushes what this
    /// process has buffered for the file.
    pub async fn setattr(&self, ino: u64, args: SetAttrArgs) -> FsResult<Attr> {
        let open = self.open_inode(ino);
        if let Some(f) = &open {
            // Unflushed data must land first: a truncate must cut it, and a
            // commit after an explicit mtime (cp -p, tar) would overwrite it.
            if args.size.is_some() || f.local_size().is_some() {
                f.flush(self).await?;
            }
        }
        let ns = self.ns_id();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::SetAttrRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    mode: args.mode,
                    uid: args.uid,
                    gid: args.gid,
                    size: args.size,
                    atime: match &args.atime {
                        Some(TimeArg::At(t)) => Some(*t),
                        _ => None,
                    },
                    mtime: match &args.mtime {
                        Some(TimeArg::At(t)) => Some(*t),
                        _ => None,
                    },
                    atime_now: args.atime == Some(TimeArg::Now),
                    mtime_now: args.mtime == Some(TimeArg::Now),
                    ctime: args.ctime,
                };
                async move { c.set_attr(req).await }
            })
            .await?;
        let attr = attr_of(reply.attr)?;
        if let (Some(f), Some(_)) = (&open, args.size) {
            f.reset_map(&attr, true);
        }
        Ok(self.local_view(attr))
    }

    /// `flags`: 0, [`XATTR_CREATE`] or [`XATTR_REPLACE`].
    pub async fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: u32) -> FsResult<Attr> {
        let (ns, name, value) = (self.ns_id(), name.to_vec(), value.to_vec());
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::SetXattrRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    name: name.clone(),
                    value: value.clone(),
                    flags,
                };
                async move { c.set_xattr(req).await }
            })
            .await?;
        Ok(self.local_view(attr_of(reply.attr)?))
    }

    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let req = rpc::GetXattrRequest {
            ns: self.ns_id(),
            ino,
            name: name.to_vec(),
        };
        let reply = self
            .meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_xattr(req).await }
            })
            .await?;
        Ok(reply.value)
    }

    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        let req = rpc::ListXattrRequest { ns: self.ns_id(), ino };
        let reply = self.meta().call(|mut c| async move { c.list_xattr(req).await }).await?;
        Ok(reply.names)
    }

    pub async fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<Attr> {
        let (ns, name) = (self.ns_id(), name.to_vec());
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::RemoveXattrRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    name: name.clone(),
                };
                async move { c.remove_xattr(req).await }
            })
            .await?;
        Ok(self.local_view(attr_of(reply.attr)?))
    }

    pub async fn statfs(&self) -> FsResult<StatFsReply> {
        let req = rpc::StatFsRequest { ns: self.ns_id() };
        self.meta().call(|mut c| async move { c.stat_fs(req).await }).await
    }

    // ------------------------------------------------------------ file data

    /// Opens a regular file for reading and writing. The block map is read
    /// now (close-to-open: what was committed before this call is seen).
    pub async fn open_file(&self, ino: u64) -> FsResult<FileHandle> {
        file::open(self, ino).await
    }

    /// Opens a file just returned by [`Client::create`]/[`Client::mknod`]:
    /// an empty file has no block map to fetch, which saves a round trip.
    pub async fn open_created(&self, attr: &Attr) -> FsResult<FileHandle> {
        file::open_with(self, attr).await
    }

    /// fallocate(2): `mode` 0 extends the size, [`FALLOC_FL_KEEP_SIZE`] does
    /// nothing (space is taken at write time), [`FALLOC_FL_PUNCH_HOLE`] |
    /// [`FALLOC_FL_KEEP_SIZE`] makes the range read as zeros; other modes
    /// fail with NotSupported. Unflushed writes are flushed first, so a
    /// punch hides them too.
    pub async fn fallocate(&self, ino: u64, mode: u32, offset: u64, len: u64) -> FsResult<Attr> {
        let open = self.open_inode(ino);
        if let Some(f) = &open {
            f.flush(self).await?;
        }
        let ns = self.ns_id();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::FallocateRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    mode,
                    offset,
                    len,
                };
                async move { c.fallocate(req).await }
            })
            .await?;
        let attr = attr_of(reply.attr)?;
        if let Some(f) = &open {
            f.reset_map(&attr, false);
        }
        Ok(self.local_view(attr))
    }

    /// Slices per chunk of `ino` (committed state), for `jfs fs chunks`:
    /// `(chunk index, slice count)` for every chunk holding a slice.
    pub async fn chunk_stats(&self, ino: u64) -> FsResult<Vec<(u64, usize)>> {
        let mut out = Vec::new();
        let mut first = 0u64;
        let size = self.getattr(ino).await?.size;
        let cs = self.block_size();
        while first.saturating_mul(cs) < size {
            let req = rpc::GetChunksRequest {
                ns: self.ns_id(),
                ino,
                first_index: first,
                count: file::WINDOW as u32,
            };
            let reply = self.meta().call(|mut c| async move { c.get_chunks(req).await }).await?;
            out.extend(reply.chunks.iter().map(|c| (c.index, c.slices.len())));
            first += file::WINDOW;
        }
        Ok(out)
    }

    /// The size of `ino` as this process sees it, if it differs from the
    /// committed one because of unflushed writes through this process.
    pub fn local_size(&self, ino: u64) -> Option<u64> {
        self.open_inode(ino).and_then(|f| f.local_size())
    }

    /// Flushes every open file (e.g. before unmounting).
    pub async fn flush_all(&self) -> FsResult<()> {
        let files: Vec<Arc<OpenInode>> = lock(&self.inner.open).values().cloned().collect();
        let mut first_err = None;
        for f in files {
            if let Err(e) = f.flush(self).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    // ------------------------------------------------------------ internals

    /// metad's answer as this process sees it: sizes grown by writes it
    /// has not committed yet, and never older than an answer already handed
    /// out for a pinned inode (answers to concurrent requests arrive in any
    /// order; ctime only moves forward in metad).
    fn local_view(&self, attr: Attr) -> Attr {
        let local = self.local_size_of(&attr);
        let mut attr = {
            let mut pins = lock(&self.inner.pins);
            match pins.get_mut(&attr.ino) {
                Some(p) => newest(p, attr),
                None => attr,
            }
        };
        if let Some(size) = local {
            attr.size = size;
        }
        attr
    }

    fn local_size_of(&self, attr: &Attr) -> Option<u64> {
        if attr.mode & rpc::S_IFMT == rpc::S_IFREG {
            self.local_size(attr.ino)
        } else {
            None
        }
    }

    /// Takes `n` references on `attr.ino` (as [`Client::pin`]) and calls
    /// `send` with the attributes to give the caller's consumer, all under
    /// one lock, so that no older answer for the inode can overtake a newer
    /// one on the way out. For mountd: the kernel applies the attributes of
    /// a CREATE or LINK reply unconditionally (it orders only lookups and
    /// getattrs against its own changes), so a stale size there would cut
    /// the page cache under a live mmap (SIGBUS).
    pub fn hand_out<T>(&self, attr: Attr, n: u64, send: impl FnOnce(&Attr) -> T) -> T {
        let local = self.local_size_of(&attr);
        let mut pins = lock(&self.inner.pins);
        let mut attr = attr;
        if let Some(p) = pins.get_mut(&attr.ino) {
            // `attr` went through local_view, which remembered it if newer.
            if let Some(newer) = p.newest.as_ref().filter(|n| ctime_of(n) > ctime_of(&attr)) {
                attr = newer.clone();
                if let Some(size) = local {
                    attr.size = size;
                }
            }
        }
        if n > 0 {
            let p = pins.entry(attr.ino).or_default();
            p.count += n;
            p.newest.get_or_insert_with(|| attr.clone());
        }
        send(&attr)
    }

    /// One block id with its replicas, from a pool shared by all files.
    /// `retry`: an upload of this block just failed, so blockds that failed
    /// us lately are kept out of the placement. Only then: one slow answer
    /// must not leave every new block with fewer copies for the next 30 s.
    async fn allocate_block(&self, ino: u64, retry: bool) -> FsResult<rpc::AllocatedBlock> {
        let mut pool = self.inner.alloc.lock().await;
        let avoid = if retry {
            self.inner.blocks.suspects()
        } else {
            Vec::new()
        };
        if pool.iter().any(|b| b.replicas.iter().any(|r| avoid.contains(r))) {
            // Allocated before a blockd failed us: place them again.
            pool.clear();
        }
        // A retry never takes a pooled block: another task may have
        // refilled the pool without avoiding the blockd that just failed.
        if !retry {
            if let Some(b) = pool.pop_front() {
                return Ok(b);
            }
        }
        let ns = self.ns_id();
        let reply = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::AllocateBlocksRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    count: if retry { 1 } else { ALLOC_BATCH },
                    avoid: avoid.clone(),
                };
                async move { c.allocate_blocks(req).await }
            })
            .await?;
        let mut blocks = reply.blocks.into_iter();
        let first = blocks
            .next()
            .ok_or_else(|| FsError::NoSpace("metad allocated no block (no live blockd with free space?)".into()))?;
        pool.extend(blocks);
        Ok(first)
    }

    /// Tells metad, in the background, that these stored blocks will never
    /// be committed, so their copies are deleted now. Best effort: a block
    /// report finds whatever this misses (after the orphan age).
    pub(crate) fn abandon_later(&self, blocks: Vec<rpc::BlockLoc>) {
        if blocks.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let ns = me.ns_id();
            let n = blocks.len();
            let res = me
                .meta()
                .call_mut(|mut c, hdr| {
                    let req = rpc::AbandonBlocksRequest {
                        hdr: Some(hdr),
                        ns,
                        blocks: blocks.clone(),
                    };
                    async move { c.abandon_blocks(req).await }
                })
                .await;
            match res {
                Ok(_) => tracing::debug!(blocks = n, "handed back blocks of a failed write"),
                Err(e) => {
                    tracing::warn!(blocks = n, error = %e, "could not hand back blocks of a failed write; block reports will reclaim them")
                }
            }
        });
    }

    /// Drops pooled allocations (their replicas may include a dead blockd).
    async fn forget_allocations(&self) {
        self.inner.alloc.lock().await.clear();
    }

    /// Queues background compaction of fragmented chunks of `ino`. A chunk
    /// reported again while its compaction is queued or running is done
    /// once more afterwards (the running one may be refused by the very
    /// commit that reported it).
    fn compact_later(&self, ino: u64, chunks: Vec<u64>) {
        let fresh: Vec<u64> = {
            let mut q = lock(&self.inner.compacting);
            chunks
                .into_iter()
                .filter(|&c| match q.get_mut(&(ino, c)) {
                    Some(again) => {
                        *again = true;
                        false
                    }
                    None => {
                        q.insert((ino, c), false);
                        true
                    }
                })
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let Ok(_slot) = client.inner.compaction_slot.acquire().await else {
                return;
            };
            for index in fresh {
                loop {
                    let res = std::panic::AssertUnwindSafe(file::compact_chunk(&client, ino, index));
                    match futures::FutureExt::catch_unwind(res).await {
                        Ok(Ok(_)) => {}
                        // The file may be gone: nothing to do.
                        Ok(Err(FsError::NotFound)) => {}
                        // A block freed under the compactor: the chunk
                        // changed, and its next commit asks again.
                        Ok(Err(e @ FsError::Io(_))) => {
                            tracing::debug!(ino, index, error = %e, "compaction skipped: the chunk changed")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(ino, index, error = %e, "compaction failed; the chunk stays as it was")
                        }
                        Err(_) => tracing::error!(ino, index, "compaction panicked; the chunk stays as it was"),
                    }
                    let mut q = lock(&client.inner.compacting);
                    if q.get(&(ino, index)) == Some(&true) {
                        q.insert((ino, index), false);
                    } else {
                        q.remove(&(ino, index));
                        break;
                    }
                }
            }
        });
    }

    pub(crate) fn open_inode(&self, ino: u64) -> Option<Arc<OpenInode>> {
        lock(&self.inner.open).get(&ino).cloned()
    }

    fn has_open_files(&self) -> bool {
        !lock(&self.inner.open).is_empty()
    }

    /// The server kept `ino` as an orphan because we might have it open: mark
    /// it for release at last close, or release it now if it is not open here.
    async fn orphaned(&self, ino: u64) {
        let held = {
            let open = lock(&self.inner.open);
            match open.get(&ino) {
                Some(f) => {
                    f.set_orphan();
                    true
                }
                None => match lock(&self.inner.pins).get_mut(&ino) {
                    Some(p) => {
                        p.orphan = true;
                        true
                    }
                    None => false,
                },
            }
        };
        if !held {
            self.release_orphan(ino).await;
        }
    }

    /// The caller holds `n` more references to `ino` (mountd: the kernel
    /// looked it up). While any is held, a file unlinked or replaced through
    /// this client keeps its data.
    pub fn pin(&self, ino: u64, n: u64) {
        if n > 0 {
            lock(&self.inner.pins).entry(ino).or_default().count += n;
        }
    }

    /// Drops `n` references taken with [`Client::pin`]; frees the file's data
    /// if it was unlinked meanwhile and is not open.
    pub async fn unpin(&self, ino: u64, n: u64) {
        let release = {
            let open = lock(&self.inner.open);
            let orphan = {
                let mut pins = lock(&self.inner.pins);
                match pins.get_mut(&ino) {
                    Some(p) if p.count > n => {
                        p.count -= n;
                        false
                    }
                    Some(_) => pins.remove(&ino).is_some_and(|p| p.orphan),
                    None => false,
                }
            };
            match (orphan, open.get(&ino)) {
                (true, Some(f)) => {
                    // Still open here: the last release frees it.
                    f.set_orphan();
                    false
                }
                (o, _) => o,
            }
        };
        if release {
            self.release_orphan(ino).await;
        }
    }

    /// Frees every unlinked file kept only for references (at unmount, when
    /// the kernel forgets everything at once without telling us).
    /// Takes, changes or releases (`typ`: 0 read, 1 write, 2 unlock) the
    /// byte-range lock of `owner` over [start, end] (inclusive). Locks are
    /// held by this client's session: they go with it if the process dies.
    /// Fails with `WouldBlock` when another owner holds a conflicting lock.
    pub async fn set_lock(&self, ino: u64, owner: u64, pid: u32, typ: u32, start: u64, end: u64) -> FsResult<()> {
        let ns = self.ns_id();
        self.meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::SetLockRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                    owner,
                    pid,
                    typ,
                    start,
                    end,
                };
                async move { c.set_lock(req).await }
            })
            .await
            .map(|_| ())
    }

    /// The first lock of another owner that conflicts with the described
    /// one (F_GETLK), if any.
    pub async fn get_lock(&self, ino: u64, owner: u64, typ: u32, start: u64, end: u64) -> FsResult<rpc::GetLockReply> {
        let req = rpc::GetLockRequest {
            ns: self.ns_id(),
            ino,
            client_id: self.meta().client_id(),
            owner,
            typ,
            start,
            end,
        };
        self.meta()
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_lock(req).await }
            })
            .await
    }

    pub async fn release_orphans(&self) {
        let orphans: Vec<u64> = {
            let open = lock(&self.inner.open);
            let mut pins = lock(&self.inner.pins);
            let ids: Vec<u64> = pins
                .iter()
                .filter(|(ino, p)| p.orphan && !open.contains_key(ino))
                .map(|(&ino, _)| ino)
                .collect();
            for ino in &ids {
                pins.remove(ino);
            }
            ids
        };
        for ino in orphans {
            self.release_orphan(ino).await;
        }
    }

    async fn release_orphan(&self, ino: u64) {
        let ns = self.ns_id();
        let res = self
            .meta()
            .call_mut(|mut c, hdr| {
                let req = rpc::ReleaseOrphanRequest {
                    hdr: Some(hdr),
                    ns,
                    ino,
                };
                async move { c.release_orphan(req).await }
            })
            .await;
        if let Err(e) = res {
            // The inode stays allocated on metad; not a user-visible error.
            tracing::warn!(ino, error = %e, "could not release an unlinked file's data; metad keeps it as an orphan");
        }
    }
}

/// Locks a std mutex, ignoring poisoning (a panicked holder left plain data).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn attr_of(a: Option<Attr>) -> FsResult<Attr> {
    a.ok_or_else(|| FsError::Internal("metad reply carries no attributes".into()))
}

/// `/a//b/` → ["a", "b"]; `.` components are skipped, `..` is refused
/// (paths are resolved on the server side without a parent walk).
fn split_path(path: &str) -> FsResult<Vec<&str>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(FsError::InvalidArgument(format!(
                    "path {path:?} contains `..`; give a plain path"
                )))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The CLI spawns these futures on a multi-threaded runtime: keep them Send.
#[allow(dead_code)]
fn _futures_are_send(c: Client, h: FileHandle) {
    fn is_send<T: Send>(_: T) {}
    is_send(c.resolve("/"));
    is_send(c.setattr(1, SetAttrArgs::default()));
    is_send(c.open_file(1));
    is_send(c.unlink(1, b"x"));
    is_send(h.read_at(0, 1));
    is_send(h.write_at(0, b"x"));
    is_send(h.release());
    is_send(c.flush_all());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split() {
        assert_eq!(split_path("/").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("/a//b/./c/").unwrap(), vec!["a", "b", "c"]);
        assert!(split_path("/a/../b").is_err());
    }
}
