//! Filesystem semantics: what every command does to the namespace.
//!
//! Written once over `kv::Txn`, so it is deterministic and backend-free: the
//! Raft state machine feeds it committed log entries and persists the
//! resulting writes atomically. Reads (lookup, readdir, ...) are plain
//! functions over a `KvRead` view.
//!
//! POSIX rules enforced here: name validity, ENOTDIR/EISDIR/ENOTEMPTY,
//! link counts (a directory has 2 + its subdirectories), rename atomicity
//! with RENAME_NOREPLACE/RENAME_EXCHANGE and the "into its own subtree"
//! check, set-group-id inheritance, and the exactly-once session table.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use jfs_common::FsError;

use crate::keys;
use crate::kv::{KvError, KvRead, Txn};
use crate::raft_types::{ApplyResult, AttrRec, BlockRec, Command, NamespaceRec, Op, Reply, TimeSet};

pub const ROOT_INO: u64 = 1;
pub const MAX_NAME_LEN: usize = jfs_common::names::NAME_MAX;
pub const MAX_SYMLINK_LEN: usize = 4096;
pub const MAX_XATTR_NAME_LEN: usize = 255;
pub const MAX_XATTR_VALUE_LEN: usize = 64 * 1024;
pub const MAX_LINKS: u32 = 65_000;
pub const MAX_FILE_SIZE: u64 = 1 << 50;
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

const S_IFMT: u32 = libc::S_IFMT;
const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFREG: u32 = libc::S_IFREG;
const S_IFLNK: u32 = libc::S_IFLNK;
const S_ISGID: u32 = libc::S_ISGID;
const S_ISUID: u32 = libc::S_ISUID;

/// Either a filesystem answer for the client or a storage failure that
/// must stop the state machine.
#[derive(Debug)]
pub enum NsError {
    Fs(FsError),
    Storage(KvError),
}

impl From<FsError> for NsError {
    fn from(e: FsError) -> Self {
        NsError::Fs(e)
    }
}

impl From<KvError> for NsError {
    fn from(e: KvError) -> Self {
        NsError::Storage(e)
    }
}

pub type NsResult<T> = Result<T, NsError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub rdev: u32,
    pub generation: u64,
    /// Parent directory, kept for directories only (rename loop check).
    pub parent: u64,
    /// Symlink target.
    pub target: Vec<u8>,
}

impl Inode {
    fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    fn is_reg(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn attr(&self, ino: u64) -> AttrRec {
        AttrRec {
            ino,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            nlink: self.nlink,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            rdev: self.rdev,
            generation: self.generation,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirent {
    pub ino: u64,
    pub kind: u32,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs into memory cannot fail.
    bincode::serialize(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, KvError> {
    bincode::deserialize(bytes).map_err(|e| KvError(format!("corrupt {what} record: {e}")))
}

fn get_u64<R: KvRead + ?Sized>(kv: &R, key: &[u8]) -> Result<u64, KvError> {
    Ok(match kv.get(key)? {
        Some(v) => decode("counter", &v)?,
        None => 0,
    })
}

fn txn_u64<R: KvRead + ?Sized>(t: &Txn<'_, R>, key: &[u8]) -> Result<u64, KvError> {
    Ok(match t.get(key)? {
        Some(v) => decode("counter", &v)?,
        None => 0,
    })
}

fn txn_add(t: &mut Txn<'_, impl KvRead + ?Sized>, key: Vec<u8>, delta: i64) -> Result<(), KvError> {
    let cur = txn_u64(t, &key)?;
    let next = (cur as i64).saturating_add(delta).max(0) as u64;
    t.put(key, encode(&next));
    Ok(())
}

/// The shared name rules, plus: "." and ".." are never names of entries.
pub fn check_name(name: &[u8]) -> Result<(), FsError> {
    jfs_common::names::check_name(name)?;
    if name == b"." || name == b".." {
        return Err(FsError::InvalidArgument(
            "\".\" and \"..\" cannot be used as names".into(),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------ reads

pub fn namespace_by_name<R: KvRead + ?Sized>(kv: &R, name: &str) -> Result<Option<NamespaceRec>, KvError> {
    kv.get(&keys::namespace(name))?
        .map(|v| decode("namespace", &v))
        .transpose()
}

pub fn namespace_by_id<R: KvRead + ?Sized>(kv: &R, ns: u32) -> Result<Option<NamespaceRec>, KvError> {
    kv.get(&keys::ns_meta(ns, "record"))?
        .map(|v| decode("namespace", &v))
        .transpose()
}

pub fn list_namespaces<R: KvRead + ?Sized>(kv: &R) -> Result<Vec<NamespaceRec>, KvError> {
    kv.scan(keys::NAMESPACES, None, usize::MAX)?
        .iter()
        .map(|(_, v)| decode("namespace", v))
        .collect()
}

pub fn cluster_id<R: KvRead + ?Sized>(kv: &R) -> Result<Option<String>, KvError> {
    kv.get(keys::CLUSTER_ID)?.map(|v| decode("cluster id", &v)).transpose()
}

pub fn get_inode<R: KvRead + ?Sized>(kv: &R, ns: u32, ino: u64) -> NsResult<Inode> {
    match kv.get(&keys::inode(ns, ino))? {
        Some(v) => Ok(decode("inode", &v)?),
        None => Err(FsError::NotFound.into()),
    }
}

pub fn lookup<R: KvRead + ?Sized>(kv: &R, ns: u32, parent: u64, name: &[u8]) -> NsResult<AttrRec> {
    if name.len() > MAX_NAME_LEN {
        return Err(FsError::NameTooLong.into());
    }
    let dir = get_inode(kv, ns, parent)?;
    if !dir.is_dir() {
        return Err(FsError::NotDirectory.into());
    }
    let ent: Dirent = match kv.get(&keys::dirent(ns, parent, name))? {
        Some(v) => decode("dirent", &v)?,
        None => return Err(FsError::NotFound.into()),
    };
    Ok(get_inode(kv, ns, ent.ino)?.attr(ent.ino))
}

pub struct DirListing {
    pub entries: Vec<(Vec<u8>, Dirent, Option<AttrRec>)>,
    pub eof: bool,
}

pub fn readdir<R: KvRead + ?Sized>(
    kv: &R,
    ns: u32,
    ino: u64,
    after: &[u8],
    limit: usize,
    plus: bool,
) -> NsResult<DirListing> {
    let dir = get_inode(kv, ns, ino)?;
    if !dir.is_dir() {
        return Err(FsError::NotDirectory.into());
    }
    let prefix = keys::dir_prefix(ns, ino);
    let after_key = (!after.is_empty()).then(|| keys::dirent(ns, ino, after));
    let limit = limit.clamp(1, 10_000);
    let rows = kv.scan(&prefix, after_key.as_deref(), limit + 1)?;
    let eof = rows.len() <= limit;
    let mut entries = Vec::with_capacity(rows.len().min(limit));
    for (k, v) in rows.into_iter().take(limit) {
        let name = k[keys::DIRENT_NAME_OFFSET..].to_vec();
        let ent: Dirent = decode("dirent", &v)?;
        let attr = if plus {
            match get_inode(kv, ns, ent.ino) {
                Ok(i) => Some(i.attr(ent.ino)),
                Err(NsError::Fs(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        entries.push((name, ent, attr));
    }
    Ok(DirListing { entries, eof })
}

pub fn readlink<R: KvRead + ?Sized>(kv: &R, ns: u32, ino: u64) -> NsResult<Vec<u8>> {
    let inode = get_inode(kv, ns, ino)?;
    if inode.mode & S_IFMT != S_IFLNK {
        return Err(FsError::InvalidArgument("not a symbolic link".into()).into());
    }
    Ok(inode.target)
}

pub fn get_xattr<R: KvRead + ?Sized>(kv: &R, ns: u32, ino: u64, name: &[u8]) -> NsResult<Vec<u8>> {
    get_inode(kv, ns, ino)?;
    kv.get(&keys::xattr(ns, ino, name))?
        .ok_or(NsError::Fs(FsError::NoAttribute))
}

pub fn list_xattr<R: KvRead + ?Sized>(kv: &R, ns: u32, ino: u64) -> NsResult<Vec<Vec<u8>>> {
    get_inode(kv, ns, ino)?;
    Ok(kv
        .scan(&keys::xattr_prefix(ns, ino), None, usize::MAX)?
        .into_iter()
        .map(|(k, _)| k[keys::XATTR_NAME_OFFSET..].to_vec())
        .collect())
}

/// The inode and its block refs with index in `[first, first + count)`.
pub fn get_blocks<R: KvRead + ?Sized>(
    kv: &R,
    ns: u32,
    ino: u64,
    first: u64,
    count: usize,
) -> NsResult<(AttrRec, Vec<(u64, BlockRec)>)> {
    let inode = get_inode(kv, ns, ino)?;
    if inode.is_dir() {
        return Err(FsError::IsDirectory.into());
    }
    let prefix = keys::block_prefix(ns, ino);
    let after = first.checked_sub(1).map(|i| keys::block(ns, ino, i));
    let mut out = Vec::new();
    for (k, v) in kv.scan(&prefix, after.as_deref(), count.clamp(1, 100_000))? {
        let index = keys::be_u64_at(&k, keys::BLOCK_INDEX_OFFSET).ok_or_else(|| KvError("bad block key".into()))?;
        if index >= first.saturating_add(count as u64) {
            break;
        }
        out.push((index, decode("block ref", &v)?));
    }
    Ok((inode.attr(ino), out))
}

pub struct NsUsage {
    pub inodes: u64,
    pub bytes: u64,
}

pub fn usage<R: KvRead + ?Sized>(kv: &R, ns: u32) -> Result<NsUsage, KvError> {
    Ok(NsUsage {
        inodes: get_u64(kv, &keys::ns_meta(ns, "inodes"))?,
        bytes: get_u64(kv, &keys::ns_meta(ns, "bytes"))?,
    })
}

/// Blocks no file refers to any more, oldest first.
pub fn garbage<R: KvRead + ?Sized>(kv: &R, limit: usize) -> Result<Vec<(u64, Vec<String>)>, KvError> {
    kv.scan(keys::GARBAGE, None, limit)?
        .into_iter()
        .map(|(k, v)| {
            let id = keys::be_u64_at(&k, keys::GARBAGE_ID_OFFSET).ok_or_else(|| KvError("bad garbage key".into()))?;
            Ok((id, decode("garbage", &v)?))
        })
        .collect()
}

// ------------------------------------------------------------------ writes

/// Applies one committed command, with the exactly-once session check:
/// a (client, seq) seen before gets its saved reply and changes nothing.
pub fn apply_command<R: KvRead + ?Sized>(txn: &mut Txn<'_, R>, cmd: &Command) -> Result<ApplyResult, KvError> {
    if cmd.client_id != 0 {
        let low = txn_u64(txn, &keys::session_low(cmd.client_id))?;
        if cmd.seq < low {
            return Ok(Err(FsError::StaleRequest));
        }
        if let Some(saved) = txn.get(&keys::session_reply(cmd.client_id, cmd.seq))? {
            return Ok(decode("saved reply", &saved)?);
        }
    }
    // Run the op on a nested transaction so a failed op leaves no trace
    // except its saved reply.
    let result = {
        let mut inner = Txn::new(&*txn);
        match apply_op(&mut inner, cmd) {
            Ok(reply) => {
                let writes = inner.into_writes();
                for (k, v) in writes {
                    match v {
                        Some(v) => txn.put(k, v),
                        None => txn.delete(k),
                    }
                }
                Ok(reply)
            }
            Err(NsError::Fs(e)) => Err(e),
            Err(NsError::Storage(e)) => return Err(e),
        }
    };
    if cmd.client_id != 0 {
        txn.put(keys::session_reply(cmd.client_id, cmd.seq), encode(&result));
        let low = txn_u64(txn, &keys::session_low(cmd.client_id))?;
        if cmd.acked_below > low {
            // Forget the replies the client has confirmed receiving. Start
            // at the old watermark: everything below it is already deleted,
            // and walking over those tombstones would make each request
            // slower than the last.
            let prefix = keys::session_reply(cmd.client_id, 0)[..9].to_vec();
            let from = low.checked_sub(1).map(|l| keys::session_reply(cmd.client_id, l));
            for (k, _) in txn.scan(&prefix, from.as_deref(), usize::MAX)? {
                match keys::be_u64_at(&k, 9) {
                    Some(seq) if seq < cmd.acked_below => txn.delete(k),
                    _ => break,
                }
            }
            txn.put(keys::session_low(cmd.client_id), encode(&cmd.acked_below));
        }
    }
    Ok(result)
}

struct Ctx<'t, 'b, B: KvRead + ?Sized> {
    t: &'t mut Txn<'b, B>,
    now: i64,
}

fn apply_op<B: KvRead + ?Sized>(t: &mut Txn<'_, B>, cmd: &Command) -> NsResult<Reply> {
    if let Some(ns) = cmd.op.namespace() {
        let rec = namespace_by_id(&*t, ns)?.ok_or_else(|| FsError::NamespaceNotFound(format!("id {ns}")))?;
        if rec.recovery_mode {
            return Err(FsError::RecoveryReadOnly.into());
        }
    }
    let mut c = Ctx { t, now: cmd.now_ns };
    match &cmd.op {
        Op::InitCluster { cluster_id } => c.init_cluster(cluster_id),
        Op::CreateNamespace {
            name,
            block_size,
            replication,
            if_not_exists,
        } => c.create_namespace(name, *block_size, *replication, *if_not_exists),
        Op::Mknod {
            ns,
            parent,
            name,
            mode,
            uid,
            gid,
            rdev,
            exclusive,
        } => c.mknod(*ns, *parent, name, *mode, *uid, *gid, *rdev, *exclusive, &[]),
        Op::Symlink {
            ns,
            parent,
            name,
            target,
            uid,
            gid,
        } => {
            if target.is_empty() || target.len() > MAX_SYMLINK_LEN {
                return Err(FsError::InvalidArgument("symlink target must be 1..4096 bytes".into()).into());
            }
            c.mknod(*ns, *parent, name, S_IFLNK | 0o777, *uid, *gid, 0, true, target)
        }
        Op::Link {
            ns,
            ino,
            new_parent,
            new_name,
        } => c.link(*ns, *ino, *new_parent, new_name),
        Op::Unlink {
            ns,
            parent,
            name,
            keep_if_open,
        } => c.unlink(*ns, *parent, name, *keep_if_open),
        Op::Rmdir { ns, parent, name } => c.rmdir(*ns, *parent, name),
        Op::Rename {
            ns,
            parent,
            name,
            new_parent,
            new_name,
            flags,
            keep_if_open,
        } => c.rename(*ns, *parent, name, *new_parent, new_name, *flags, *keep_if_open),
        Op::ReleaseOrphan { ns, ino } => c.release_orphan(*ns, *ino),
        Op::SetAttr {
            ns,
            ino,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
        } => c.setattr(*ns, *ino, *mode, *uid, *gid, *size, *atime, *mtime, *ctime),
        Op::SetXattr {
            ns,
            ino,
            name,
            value,
            flags,
        } => c.set_xattr(*ns, *ino, name, value, *flags),
        Op::RemoveXattr { ns, ino, name } => c.remove_xattr(*ns, *ino, name),
        Op::AllocateBlocks { count } => {
            let first = txn_u64(c.t, keys::NEXT_BLOCK)?.max(1);
            c.t.put(keys::NEXT_BLOCK.to_vec(), encode(&(first + *count as u64)));
            Ok(Reply::BlockIds { first, count: *count })
        }
        Op::CommitWrite {
            ns,
            ino,
            blocks,
            size,
            mtime,
        } => c.commit_write(*ns, *ino, blocks, *size, *mtime),
        Op::ForgetGarbage { replica, block_ids } => {
            for id in block_ids {
                let key = keys::garbage(*id);
                let Some(v) = c.t.get(&key)? else { continue };
                let mut replicas: Vec<String> = decode("garbage", &v)?;
                replicas.retain(|r| r != replica);
                if replicas.is_empty() {
                    c.t.delete(key);
                } else {
                    c.t.put(key, encode(&replicas));
                }
            }
            Ok(Reply::Ok)
        }
    }
}

impl<B: KvRead + ?Sized> Ctx<'_, '_, B> {
    fn inode(&self, ns: u32, ino: u64) -> NsResult<Inode> {
        match self.t.get(&keys::inode(ns, ino))? {
            Some(v) => Ok(decode("inode", &v)?),
            None => Err(FsError::NotFound.into()),
        }
    }

    fn put_inode(&mut self, ns: u32, ino: u64, inode: &Inode) {
        self.t.put(keys::inode(ns, ino), encode(inode));
    }

    fn dir(&self, ns: u32, ino: u64) -> NsResult<Inode> {
        let d = self.inode(ns, ino)?;
        if !d.is_dir() {
            return Err(FsError::NotDirectory.into());
        }
        Ok(d)
    }

    fn dirent(&self, ns: u32, parent: u64, name: &[u8]) -> NsResult<Option<Dirent>> {
        Ok(self
            .t
            .get(&keys::dirent(ns, parent, name))?
            .map(|v| decode("dirent", &v))
            .transpose()?)
    }

    fn touch_dir(&mut self, ns: u32, ino: u64, nlink_delta: i32) -> NsResult<()> {
        let mut d = self.inode(ns, ino)?;
        d.mtime = self.now;
        d.ctime = self.now;
        d.nlink = (d.nlink as i64 + nlink_delta as i64).max(0) as u32;
        self.put_inode(ns, ino, &d);
        Ok(())
    }

    fn init_cluster(&mut self, cluster_id: &str) -> NsResult<Reply> {
        if cluster_id_txn(self.t)?.is_none() {
            self.t.put(keys::CLUSTER_ID.to_vec(), encode(&cluster_id.to_string()));
        }
        Ok(Reply::Ok)
    }

    fn create_namespace(
        &mut self,
        name: &str,
        block_size: u64,
        replication: u32,
        if_not_exists: bool,
    ) -> NsResult<Reply> {
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(FsError::InvalidArgument(format!(
                "namespace name {name:?}: use 1-64 characters from a-z, A-Z, 0-9, '-' and '_'"
            ))
            .into());
        }
        if block_size < (64 << 10) || block_size > (64 << 20) || block_size % (64 << 10) != 0 {
            return Err(FsError::InvalidArgument(format!(
                "block size {block_size}: must be a multiple of 64 KiB between 64 KiB and 64 MiB"
            ))
            .into());
        }
        if replication == 0 || replication > 16 {
            return Err(FsError::InvalidArgument(format!("replication {replication}: must be 1..16")).into());
        }
        if let Some(v) = self.t.get(&keys::namespace(name))? {
            if if_not_exists {
                return Ok(Reply::Namespace(decode("namespace", &v)?));
            }
            return Err(FsError::AlreadyExists.into());
        }
        let id = txn_u64(self.t, keys::NEXT_NS)?.max(1);
        if id > u32::MAX as u64 {
            return Err(FsError::NoSpace("namespace ids exhausted".into()).into());
        }
        self.t.put(keys::NEXT_NS.to_vec(), encode(&(id + 1)));
        let id = id as u32;
        let rec = NamespaceRec {
            id,
            name: name.to_string(),
            block_size,
            replication,
            root_ino: ROOT_INO,
            recovery_mode: false,
        };
        self.t.put(keys::namespace(name), encode(&rec));
        self.t.put(keys::ns_meta(id, "record"), encode(&rec));
        let root = Inode {
            mode: S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            nlink: 2,
            atime: self.now,
            mtime: self.now,
            ctime: self.now,
            rdev: 0,
            generation: 1,
            parent: ROOT_INO,
            target: Vec::new(),
        };
        self.put_inode(id, ROOT_INO, &root);
        self.t.put(keys::ns_meta(id, "next_ino"), encode(&(ROOT_INO + 1)));
        self.t.put(keys::ns_meta(id, "inodes"), encode(&1u64));
        Ok(Reply::Namespace(rec))
    }

    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &mut self,
        ns: u32,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        exclusive: bool,
        target: &[u8],
    ) -> NsResult<Reply> {
        check_name(name)?;
        let pdir = self.dir(ns, parent)?;
        if let Some(existing) = self.dirent(ns, parent, name)? {
            let inode = self.inode(ns, existing.ino)?;
            if !exclusive && inode.is_reg() && mode & S_IFMT == S_IFREG {
                return Ok(Reply::Attr(inode.attr(existing.ino)));
            }
            return Err(FsError::AlreadyExists.into());
        }
        let kind = match mode & S_IFMT {
            0 => S_IFREG,
            k => k,
        };
        let is_dir = kind == S_IFDIR;
        if is_dir && pdir.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks.into());
        }
        let mut perm = mode & 0o7777;
        let mut gid = gid;
        if pdir.mode & S_ISGID != 0 {
            // BSD group semantics on set-group-id directories.
            gid = pdir.gid;
            if is_dir {
                perm |= S_ISGID;
            }
        }
        let ino = txn_u64(self.t, &keys::ns_meta(ns, "next_ino"))?.max(ROOT_INO + 1);
        self.t.put(keys::ns_meta(ns, "next_ino"), encode(&(ino + 1)));
        let inode = Inode {
            mode: kind | perm,
            uid,
            gid,
            size: if kind == S_IFLNK { target.len() as u64 } else { 0 },
            nlink: if is_dir { 2 } else { 1 },
            atime: self.now,
            mtime: self.now,
            ctime: self.now,
            rdev,
            generation: 1,
            parent: if is_dir { parent } else { 0 },
            target: target.to_vec(),
        };
        self.put_inode(ns, ino, &inode);
        self.t
            .put(keys::dirent(ns, parent, name), encode(&Dirent { ino, kind }));
        self.touch_dir(ns, parent, if is_dir { 1 } else { 0 })?;
        txn_add(self.t, keys::ns_meta(ns, "inodes"), 1)?;
        Ok(Reply::Attr(inode.attr(ino)))
    }

    fn link(&mut self, ns: u32, ino: u64, new_parent: u64, new_name: &[u8]) -> NsResult<Reply> {
        check_name(new_name)?;
        let mut inode = self.inode(ns, ino)?;
        if inode.is_dir() {
            return Err(FsError::NotPermitted.into());
        }
        if inode.nlink == 0 {
            return Err(FsError::NotFound.into());
        }
        self.dir(ns, new_parent)?;
        if self.dirent(ns, new_parent, new_name)?.is_some() {
            return Err(FsError::AlreadyExists.into());
        }
        if inode.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks.into());
        }
        inode.nlink += 1;
        inode.ctime = self.now;
        self.put_inode(ns, ino, &inode);
        self.t.put(
            keys::dirent(ns, new_parent, new_name),
            encode(&Dirent {
                ino,
                kind: inode.mode & S_IFMT,
            }),
        );
        self.touch_dir(ns, new_parent, 0)?;
        Ok(Reply::Attr(inode.attr(ino)))
    }

    /// Drops one link of a non-directory; returns (orphaned, attr after).
    fn drop_link(&mut self, ns: u32, ino: u64, keep_if_open: bool) -> NsResult<(bool, Option<AttrRec>)> {
        let mut inode = self.inode(ns, ino)?;
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime = self.now;
        if inode.nlink > 0 {
            self.put_inode(ns, ino, &inode);
            return Ok((false, Some(inode.attr(ino))));
        }
        if keep_if_open {
            self.put_inode(ns, ino, &inode);
            self.t.put(keys::orphan(ns, ino), encode(&self.now));
            return Ok((true, Some(inode.attr(ino))));
        }
        self.destroy_inode(ns, ino, &inode)?;
        Ok((false, None))
    }

    /// Removes an inode with no links left: its blocks go to garbage.
    fn destroy_inode(&mut self, ns: u32, ino: u64, inode: &Inode) -> NsResult<()> {
        self.truncate_blocks(ns, ino, 0)?;
        for (k, _) in self.t.scan(&keys::xattr_prefix(ns, ino), None, usize::MAX)? {
            self.t.delete(k);
        }
        self.t.delete(keys::inode(ns, ino));
        self.t.delete(keys::orphan(ns, ino));
        txn_add(self.t, keys::ns_meta(ns, "inodes"), -1)?;
        if inode.is_reg() {
            txn_add(self.t, keys::ns_meta(ns, "bytes"), -(inode.size as i64))?;
        }
        Ok(())
    }

    fn unlink(&mut self, ns: u32, parent: u64, name: &[u8], keep_if_open: bool) -> NsResult<Reply> {
        check_name(name)?;
        self.dir(ns, parent)?;
        let ent = self.dirent(ns, parent, name)?.ok_or(FsError::NotFound)?;
        if ent.kind == S_IFDIR {
            return Err(FsError::IsDirectory.into());
        }
        self.t.delete(keys::dirent(ns, parent, name));
        self.touch_dir(ns, parent, 0)?;
        let (orphaned, attr) = self.drop_link(ns, ent.ino, keep_if_open)?;
        Ok(Reply::Unlinked {
            ino: ent.ino,
            orphaned,
            attr,
        })
    }

    fn rmdir(&mut self, ns: u32, parent: u64, name: &[u8]) -> NsResult<Reply> {
        if name == b"." {
            return Err(FsError::InvalidArgument("cannot remove \".\"".into()).into());
        }
        if name == b".." {
            return Err(FsError::NotEmpty.into());
        }
        check_name(name)?;
        self.dir(ns, parent)?;
        let ent = self.dirent(ns, parent, name)?.ok_or(FsError::NotFound)?;
        let inode = self.inode(ns, ent.ino)?;
        if !inode.is_dir() {
            return Err(FsError::NotDirectory.into());
        }
        if !self.t.scan(&keys::dir_prefix(ns, ent.ino), None, 1)?.is_empty() {
            return Err(FsError::NotEmpty.into());
        }
        self.t.delete(keys::dirent(ns, parent, name));
        self.destroy_inode(ns, ent.ino, &inode)?;
        self.touch_dir(ns, parent, -1)?;
        Ok(Reply::Unlinked {
            ino: ent.ino,
            orphaned: false,
            attr: None,
        })
    }

    /// True when `dir` is `ancestor` or lies below it.
    fn is_within(&self, ns: u32, mut dir: u64, ancestor: u64) -> NsResult<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.inode(ns, dir)?.parent;
        }
        Err(NsError::Storage(KvError(
            "directory parent chain does not reach the root".into(),
        )))
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        ns: u32,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
        keep_if_open: bool,
    ) -> NsResult<Reply> {
        check_name(name)?;
        check_name(new_name)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 || flags == (RENAME_NOREPLACE | RENAME_EXCHANGE) {
            return Err(FsError::InvalidArgument(format!("rename flags {flags:#x}")).into());
        }
        self.dir(ns, parent)?;
        self.dir(ns, new_parent)?;
        let src = self.dirent(ns, parent, name)?.ok_or(FsError::NotFound)?;
        let dst = self.dirent(ns, new_parent, new_name)?;
        let src_is_dir = src.kind == S_IFDIR;

        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(FsError::NotFound)?;
            let dst_is_dir = dst.kind == S_IFDIR;
            if src.ino == dst.ino {
                return Ok(Reply::Renamed {
                    replaced_ino: 0,
                    orphaned: false,
                });
            }
            if (src_is_dir && self.is_within(ns, new_parent, src.ino)?)
                || (dst_is_dir && self.is_within(ns, parent, dst.ino)?)
            {
                return Err(FsError::InvalidArgument("cannot move a directory into its own subtree".into()).into());
            }
            self.t.put(keys::dirent(ns, parent, name), encode(&dst));
            self.t.put(keys::dirent(ns, new_parent, new_name), encode(&src));
            for (ent, to) in [(src, new_parent), (dst, parent)] {
                let mut i = self.inode(ns, ent.ino)?;
                i.ctime = self.now;
                if ent.kind == S_IFDIR {
                    i.parent = to;
                }
                self.put_inode(ns, ent.ino, &i);
            }
            let delta = src_is_dir as i32 - dst_is_dir as i32;
            if parent != new_parent {
                self.touch_dir(ns, parent, -delta)?;
                self.touch_dir(ns, new_parent, delta)?;
            } else {
                self.touch_dir(ns, parent, 0)?;
            }
            return Ok(Reply::Renamed {
                replaced_ino: 0,
                orphaned: false,
            });
        }

        if let Some(d) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(FsError::AlreadyExists.into());
            }
            if d.ino == src.ino {
                // Two names of one inode: POSIX says do nothing.
                return Ok(Reply::Renamed {
                    replaced_ino: 0,
                    orphaned: false,
                });
            }
        }
        if src_is_dir && self.is_within(ns, new_parent, src.ino)? {
            return Err(FsError::InvalidArgument("cannot move a directory into its own subtree".into()).into());
        }
        let mut replaced_ino = 0;
        let mut orphaned = false;
        let mut parent_delta_new = if src_is_dir { 1 } else { 0 };
        if let Some(d) = dst {
            let d_inode = self.inode(ns, d.ino)?;
            match (src_is_dir, d_inode.is_dir()) {
                (true, false) => return Err(FsError::NotDirectory.into()),
                (false, true) => return Err(FsError::IsDirectory.into()),
                (true, true) => {
                    if !self.t.scan(&keys::dir_prefix(ns, d.ino), None, 1)?.is_empty() {
                        return Err(FsError::NotEmpty.into());
                    }
                    self.destroy_inode(ns, d.ino, &d_inode)?;
                    parent_delta_new -= 1;
                }
                (false, false) => {
                    orphaned = self.drop_link(ns, d.ino, keep_if_open)?.0;
                }
            }
            replaced_ino = d.ino;
        }
        self.t.delete(keys::dirent(ns, parent, name));
        self.t.put(keys::dirent(ns, new_parent, new_name), encode(&src));
        let mut moved = self.inode(ns, src.ino)?;
        moved.ctime = self.now;
        if src_is_dir {
            moved.parent = new_parent;
        }
        self.put_inode(ns, src.ino, &moved);
        if parent != new_parent {
            self.touch_dir(ns, parent, if src_is_dir { -1 } else { 0 })?;
            self.touch_dir(ns, new_parent, parent_delta_new)?;
        } else {
            // Same directory: the moved dir's link stays, a replaced dir's goes.
            let delta = if src_is_dir { parent_delta_new - 1 } else { 0 };
            self.touch_dir(ns, parent, delta)?;
        }
        Ok(Reply::Renamed { replaced_ino, orphaned })
    }

    fn release_orphan(&mut self, ns: u32, ino: u64) -> NsResult<Reply> {
        if self.t.get(&keys::orphan(ns, ino))?.is_none() {
            return Ok(Reply::Ok);
        }
        let inode = self.inode(ns, ino)?;
        if inode.nlink == 0 {
            self.destroy_inode(ns, ino, &inode)?;
        } else {
            self.t.delete(keys::orphan(ns, ino));
        }
        Ok(Reply::Ok)
    }

    /// Drops block refs past `new_size` and shortens the last one.
    fn truncate_blocks(&mut self, ns: u32, ino: u64, new_size: u64) -> NsResult<()> {
        let rec = namespace_by_id(&*self.t, ns)?.ok_or_else(|| FsError::NamespaceNotFound(format!("id {ns}")))?;
        let bs = rec.block_size;
        let first_dropped = new_size.div_ceil(bs);
        let prefix = keys::block_prefix(ns, ino);
        if new_size % bs != 0 {
            let idx = new_size / bs;
            let key = keys::block(ns, ino, idx);
            if let Some(v) = self.t.get(&key)? {
                let mut b: BlockRec = decode("block ref", &v)?;
                let keep = new_size - idx * bs;
                if b.len > keep {
                    b.len = keep;
                    self.t.put(key, encode(&b));
                }
            }
        }
        let after = first_dropped.checked_sub(1).map(|i| keys::block(ns, ino, i));
        for (k, v) in self.t.scan(&prefix, after.as_deref(), usize::MAX)? {
            let b: BlockRec = decode("block ref", &v)?;
            self.t.put(keys::garbage(b.block_id), encode(&b.replicas));
            self.t.delete(k);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ns: u32,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeSet>,
        mtime: Option<TimeSet>,
        ctime: Option<i64>,
    ) -> NsResult<Reply> {
        let mut inode = self.inode(ns, ino)?;
        if let Some(m) = mode {
            inode.mode = (inode.mode & S_IFMT) | (m & 0o7777);
        }
        if uid.is_some_and(|u| u != inode.uid) || gid.is_some_and(|g| g != inode.gid) {
            // chown clears set-user-id and set-group-id on files, as Linux does.
            if !inode.is_dir() && mode.is_none() {
                inode.mode &= !S_ISUID;
                if inode.mode & 0o010 != 0 {
                    inode.mode &= !S_ISGID;
                }
            }
        }
        if let Some(u) = uid {
            inode.uid = u;
        }
        if let Some(g) = gid {
            inode.gid = g;
        }
        if let Some(sz) = size {
            if inode.is_dir() {
                return Err(FsError::IsDirectory.into());
            }
            if !inode.is_reg() {
                return Err(FsError::InvalidArgument("only regular files can be truncated".into()).into());
            }
            if sz > MAX_FILE_SIZE {
                return Err(FsError::FileTooBig.into());
            }
            if sz < inode.size {
                self.truncate_blocks(ns, ino, sz)?;
            }
            txn_add(self.t, keys::ns_meta(ns, "bytes"), sz as i64 - inode.size as i64)?;
            if sz != inode.size {
                inode.mtime = self.now;
            }
            inode.size = sz;
        }
        let resolve = |t: TimeSet, now: i64| match t {
            TimeSet::Now => now,
            TimeSet::At(v) => v,
        };
        if let Some(a) = atime {
            inode.atime = resolve(a, self.now);
        }
        if let Some(m) = mtime {
            inode.mtime = resolve(m, self.now);
        }
        inode.ctime = ctime.unwrap_or(self.now);
        self.put_inode(ns, ino, &inode);
        Ok(Reply::Attr(inode.attr(ino)))
    }

    fn set_xattr(&mut self, ns: u32, ino: u64, name: &[u8], value: &[u8], flags: u32) -> NsResult<Reply> {
        if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN {
            return Err(FsError::InvalidArgument("xattr name must be 1..255 bytes".into()).into());
        }
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err(FsError::NoSpace("xattr value larger than 64 KiB".into()).into());
        }
        let mut inode = self.inode(ns, ino)?;
        let key = keys::xattr(ns, ino, name);
        let exists = self.t.get(&key)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return Err(FsError::AlreadyExists.into());
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttribute.into());
        }
        self.t.put(key, value.to_vec());
        inode.ctime = self.now;
        self.put_inode(ns, ino, &inode);
        Ok(Reply::Attr(inode.attr(ino)))
    }

    fn remove_xattr(&mut self, ns: u32, ino: u64, name: &[u8]) -> NsResult<Reply> {
        let mut inode = self.inode(ns, ino)?;
        let key = keys::xattr(ns, ino, name);
        if self.t.get(&key)?.is_none() {
            return Err(FsError::NoAttribute.into());
        }
        self.t.delete(key);
        inode.ctime = self.now;
        self.put_inode(ns, ino, &inode);
        Ok(Reply::Attr(inode.attr(ino)))
    }

    fn commit_write(
        &mut self,
        ns: u32,
        ino: u64,
        blocks: &[(u64, BlockRec)],
        size: u64,
        mtime: Option<i64>,
    ) -> NsResult<Reply> {
        let mut inode = self.inode(ns, ino)?;
        if !inode.is_reg() {
            return Err(if inode.is_dir() {
                FsError::IsDirectory
            } else {
                FsError::InvalidArgument("not a regular file".into())
            }
            .into());
        }
        if size > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig.into());
        }
        let rec = namespace_by_id(&*self.t, ns)?.ok_or_else(|| FsError::NamespaceNotFound(format!("id {ns}")))?;
        for (index, b) in blocks {
            if b.len > rec.block_size || index.saturating_mul(rec.block_size) >= size.max(1) && b.len > 0 {
                return Err(
                    FsError::InvalidArgument(format!("block ref {index} lies outside a file of {size} bytes")).into(),
                );
            }
            let key = keys::block(ns, ino, *index);
            if let Some(old) = self.t.get(&key)? {
                let old: BlockRec = decode("block ref", &old)?;
                if old.block_id != b.block_id {
                    self.t.put(keys::garbage(old.block_id), encode(&old.replicas));
                }
            }
            self.t.put(key, encode(b));
        }
        if size < inode.size {
            self.truncate_blocks(ns, ino, size)?;
        }
        txn_add(self.t, keys::ns_meta(ns, "bytes"), size as i64 - inode.size as i64)?;
        inode.size = size;
        inode.mtime = mtime.unwrap_or(self.now);
        inode.ctime = self.now;
        // Writing by anyone but root clears set-user-id (as the kernel would
        // ask through killpriv); keep it simple: any data write clears both.
        if inode.mode & S_ISUID != 0 || inode.mode & (S_ISGID | 0o010) == (S_ISGID | 0o010) {
            inode.mode &= !(S_ISUID | S_ISGID);
        }
        self.put_inode(ns, ino, &inode);
        Ok(Reply::Attr(inode.attr(ino)))
    }
}

fn cluster_id_txn<R: KvRead + ?Sized>(t: &Txn<'_, R>) -> Result<Option<String>, KvError> {
    t.get(keys::CLUSTER_ID)?.map(|v| decode("cluster id", &v)).transpose()
}

impl<R: KvRead + ?Sized> KvRead for Txn<'_, R> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Txn::get(self, key)
    }
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        Txn::scan(self, prefix, after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    struct Fs {
        kv: MemKv,
        seq: u64,
        ns: u32,
    }

    impl Fs {
        fn new() -> Fs {
            let mut fs = Fs {
                kv: MemKv::default(),
                seq: 0,
                ns: 0,
            };
            match fs.run(Op::CreateNamespace {
                name: "t".into(),
                block_size: 1 << 20,
                replication: 1,
                if_not_exists: false,
            }) {
                Ok(Reply::Namespace(r)) => fs.ns = r.id,
                other => panic!("{other:?}"),
            }
            fs
        }
        fn run_as(&mut self, client: u64, seq: u64, op: Op) -> ApplyResult {
            let cmd = Command {
                client_id: client,
                seq,
                acked_below: 0,
                now_ns: 1_000 + seq as i64,
                op,
            };
            let mut t = Txn::new(&self.kv);
            let r = apply_command(&mut t, &cmd).unwrap();
            let w = t.into_writes();
            self.kv.apply(w);
            r
        }
        fn run(&mut self, op: Op) -> ApplyResult {
            self.seq += 1;
            self.run_as(7, self.seq, op)
        }
        fn mk(&mut self, parent: u64, name: &str, mode: u32) -> ApplyResult {
            let ns = self.ns;
            self.run(Op::Mknod {
                ns,
                parent,
                name: name.into(),
                mode,
                uid: 0,
                gid: 0,
                rdev: 0,
                exclusive: true,
            })
        }
        fn ino(&mut self, parent: u64, name: &str, mode: u32) -> u64 {
            match self.mk(parent, name, mode) {
                Ok(Reply::Attr(a)) => a.ino,
                other => panic!("{other:?}"),
            }
        }
        fn attr(&self, ino: u64) -> AttrRec {
            get_inode(&self.kv, self.ns, ino).unwrap().attr(ino)
        }
        fn rename(&mut self, p: u64, n: &str, np: u64, nn: &str, flags: u32) -> ApplyResult {
            let ns = self.ns;
            self.run(Op::Rename {
                ns,
                parent: p,
                name: n.into(),
                new_parent: np,
                new_name: nn.into(),
                flags,
                keep_if_open: false,
            })
        }
    }

    #[test]
    fn create_lookup_and_errors() {
        let mut fs = Fs::new();
        let d = fs.ino(ROOT_INO, "d", S_IFDIR | 0o755);
        assert_eq!(fs.attr(ROOT_INO).nlink, 3);
        fs.ino(d, "f", S_IFREG | 0o644);
        assert_eq!(fs.mk(d, "f", S_IFREG | 0o644), Err(FsError::AlreadyExists));
        assert_eq!(fs.mk(d, &"x".repeat(256), S_IFREG), Err(FsError::NameTooLong));
        assert!(matches!(fs.mk(d, "a/b", S_IFREG), Err(FsError::InvalidArgument(_))));
        let f = lookup(&fs.kv, fs.ns, d, b"f").unwrap();
        assert_eq!(f.mode, S_IFREG | 0o644);
        assert!(matches!(
            lookup(&fs.kv, fs.ns, f.ino, b"x"),
            Err(NsError::Fs(FsError::NotDirectory))
        ));
        assert!(matches!(
            lookup(&fs.kv, fs.ns, d, b"nope"),
            Err(NsError::Fs(FsError::NotFound))
        ));
        let ns = fs.ns;
        assert_eq!(
            fs.run(Op::Rmdir {
                ns,
                parent: ROOT_INO,
                name: b"d".to_vec()
            }),
            Err(FsError::NotEmpty)
        );
        assert_eq!(
            fs.run(Op::Unlink {
                ns,
                parent: ROOT_INO,
                name: b"d".to_vec(),
                keep_if_open: false
            }),
            Err(FsError::IsDirectory)
        );
        assert_eq!(
            fs.run(Op::Rmdir {
                ns,
                parent: d,
                name: b"f".to_vec()
            }),
            Err(FsError::NotDirectory)
        );
        assert!(fs
            .run(Op::Unlink {
                ns,
                parent: d,
                name: b"f".to_vec(),
                keep_if_open: false
            })
            .is_ok());
        assert!(fs
            .run(Op::Rmdir {
                ns,
                parent: ROOT_INO,
                name: b"d".to_vec()
            })
            .is_ok());
        assert_eq!(fs.attr(ROOT_INO).nlink, 2);
        assert_eq!(usage(&fs.kv, ns).unwrap().inodes, 1);
    }

    #[test]
    fn retried_request_gets_the_saved_reply() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let op = Op::Mknod {
            ns,
            parent: ROOT_INO,
            name: b"x".to_vec(),
            mode: S_IFDIR | 0o700,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        };
        let first = fs.run_as(42, 5, op.clone());
        assert!(first.is_ok());
        // The same (client, seq) again — as after a leader failover — is not EEXIST.
        assert_eq!(fs.run_as(42, 5, op.clone()), first);
        // A new request with the same content is a new operation.
        assert_eq!(fs.run_as(42, 6, op), Err(FsError::AlreadyExists));
        let unlink = Op::Rmdir {
            ns,
            parent: ROOT_INO,
            name: b"x".to_vec(),
        };
        assert!(fs.run_as(42, 7, unlink.clone()).is_ok());
        assert!(fs.run_as(42, 7, unlink).is_ok());
    }

    #[test]
    fn acknowledged_replies_are_forgotten() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        for seq in 1..=5 {
            let op = Op::Mknod {
                ns,
                parent: ROOT_INO,
                name: format!("f{seq}").into_bytes(),
                mode: S_IFREG,
                uid: 0,
                gid: 0,
                rdev: 0,
                exclusive: true,
            };
            let cmd = Command {
                client_id: 9,
                seq,
                acked_below: seq,
                now_ns: 1,
                op,
            };
            let mut t = Txn::new(&fs.kv);
            apply_command(&mut t, &cmd).unwrap().unwrap();
            let w = t.into_writes();
            fs.kv.apply(w);
        }
        let saved = fs
            .kv
            .scan(&[&b"S"[..], &9u64.to_be_bytes()].concat(), None, 100)
            .unwrap();
        assert_eq!(saved.len(), 1, "only the newest reply is kept");
        let op = Op::Rmdir {
            ns,
            parent: ROOT_INO,
            name: b"f1".to_vec(),
        };
        assert_eq!(fs.run_as(9, 2, op), Err(FsError::StaleRequest));
    }

    #[test]
    fn rename_rules() {
        let mut fs = Fs::new();
        let a = fs.ino(ROOT_INO, "a", S_IFDIR | 0o755);
        let b = fs.ino(a, "b", S_IFDIR | 0o755);
        fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let g = fs.ino(ROOT_INO, "g", S_IFREG | 0o644);
        assert!(matches!(
            fs.rename(ROOT_INO, "a", b, "x", 0),
            Err(FsError::InvalidArgument(_))
        ));
        assert!(matches!(
            fs.rename(ROOT_INO, "a", a, "x", 0),
            Err(FsError::InvalidArgument(_))
        ));
        assert_eq!(
            fs.rename(ROOT_INO, "f", ROOT_INO, "g", RENAME_NOREPLACE),
            Err(FsError::AlreadyExists)
        );
        assert_eq!(fs.rename(ROOT_INO, "f", ROOT_INO, "a", 0), Err(FsError::IsDirectory));
        assert_eq!(fs.rename(ROOT_INO, "a", ROOT_INO, "f", 0), Err(FsError::NotDirectory));
        // Replace g with f atomically.
        assert_eq!(
            fs.rename(ROOT_INO, "f", ROOT_INO, "g", 0),
            Ok(Reply::Renamed {
                replaced_ino: g,
                orphaned: false
            })
        );
        assert!(get_inode(&fs.kv, fs.ns, g).is_err());
        // Move directory b up; link counts follow.
        assert!(fs.rename(a, "b", ROOT_INO, "b", 0).is_ok());
        assert_eq!(fs.attr(a).nlink, 2);
        assert_eq!(fs.attr(ROOT_INO).nlink, 4);
        // Exchange a file and a directory.
        assert!(fs.rename(ROOT_INO, "g", a, "b2", RENAME_EXCHANGE).is_err());
        let c = fs.ino(a, "c", S_IFREG | 0o600);
        assert!(fs.rename(ROOT_INO, "b", a, "c", RENAME_EXCHANGE).is_ok());
        assert_eq!(lookup(&fs.kv, fs.ns, a, b"c").unwrap().ino, b);
        assert_eq!(lookup(&fs.kv, fs.ns, ROOT_INO, b"b").unwrap().ino, c);
        assert_eq!(fs.attr(a).nlink, 3);
        assert_eq!(fs.attr(ROOT_INO).nlink, 3);
        // Replacing an empty directory by a directory.
        let e = fs.ino(ROOT_INO, "e", S_IFDIR | 0o755);
        assert_eq!(fs.attr(ROOT_INO).nlink, 4);
        assert!(fs.rename(a, "c", ROOT_INO, "e", 0).is_ok());
        assert!(get_inode(&fs.kv, fs.ns, e).is_err(), "the replaced directory is gone");
        assert_eq!(fs.attr(ROOT_INO).nlink, 4);
        assert_eq!(fs.attr(a).nlink, 2);
    }

    #[test]
    fn hard_links_and_orphans() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let r = fs.run(Op::Link {
            ns,
            ino: f,
            new_parent: ROOT_INO,
            new_name: b"h".to_vec(),
        });
        assert_eq!(r.unwrap(), Reply::Attr(fs.attr(f)));
        assert_eq!(fs.attr(f).nlink, 2);
        fs.run(Op::Unlink {
            ns,
            parent: ROOT_INO,
            name: b"f".to_vec(),
            keep_if_open: false,
        })
        .unwrap();
        assert_eq!(fs.attr(f).nlink, 1);
        let r = fs
            .run(Op::Unlink {
                ns,
                parent: ROOT_INO,
                name: b"h".to_vec(),
                keep_if_open: true,
            })
            .unwrap();
        assert!(matches!(r, Reply::Unlinked { orphaned: true, .. }));
        assert_eq!(fs.attr(f).nlink, 0, "still readable while open");
        fs.run(Op::ReleaseOrphan { ns, ino: f }).unwrap();
        assert!(get_inode(&fs.kv, ns, f).is_err());
    }

    #[test]
    fn truncate_and_commit_move_blocks_to_garbage() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let mb = 1u64 << 20;
        let blocks: Vec<(u64, BlockRec)> = (0..3)
            .map(|i| {
                (
                    i,
                    BlockRec {
                        block_id: 10 + i,
                        len: mb,
                        replicas: vec!["r".into()],
                    },
                )
            })
            .collect();
        fs.run(Op::CommitWrite {
            ns,
            ino: f,
            blocks,
            size: 3 * mb,
            mtime: None,
        })
        .unwrap();
        assert_eq!(usage(&fs.kv, ns).unwrap().bytes, 3 * mb);
        // Overwrite block 1: the old one becomes garbage.
        let nb = vec![(
            1,
            BlockRec {
                block_id: 20,
                len: mb,
                replicas: vec!["r".into()],
            },
        )];
        fs.run(Op::CommitWrite {
            ns,
            ino: f,
            blocks: nb,
            size: 3 * mb,
            mtime: None,
        })
        .unwrap();
        assert_eq!(
            garbage(&fs.kv, 10).unwrap().iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![11]
        );
        // Truncate into block 1: block 2 goes, block 1 is shortened.
        let r = fs.run(Op::SetAttr {
            ns,
            ino: f,
            mode: None,
            uid: None,
            gid: None,
            size: Some(mb + 5),
            atime: None,
            mtime: None,
            ctime: None,
        });
        assert!(r.is_ok());
        let (attr, refs) = get_blocks(&fs.kv, ns, f, 0, 10).unwrap();
        assert_eq!(attr.size, mb + 5);
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].1.len, 5);
        assert_eq!(garbage(&fs.kv, 10).unwrap().len(), 2);
        fs.run(Op::Unlink {
            ns,
            parent: ROOT_INO,
            name: b"f".to_vec(),
            keep_if_open: false,
        })
        .unwrap();
        assert_eq!(garbage(&fs.kv, 10).unwrap().len(), 4);
        assert_eq!(usage(&fs.kv, ns).unwrap().bytes, 0);
    }

    #[test]
    fn setgid_directories_pass_on_their_group() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let d = fs.ino(ROOT_INO, "d", S_IFDIR | 0o2775);
        fs.run(Op::SetAttr {
            ns,
            ino: d,
            mode: None,
            uid: None,
            gid: Some(50),
            size: None,
            atime: None,
            mtime: None,
            ctime: None,
        })
        .unwrap();
        let r = fs.run(Op::Mknod {
            ns,
            parent: d,
            name: b"s".to_vec(),
            mode: S_IFDIR | 0o755,
            uid: 1,
            gid: 1,
            rdev: 0,
            exclusive: true,
        });
        match r {
            Ok(Reply::Attr(a)) => {
                assert_eq!(a.gid, 50);
                assert_ne!(a.mode & S_ISGID, 0);
            }
            other => panic!("{other:?}"),
        }
    }
}
