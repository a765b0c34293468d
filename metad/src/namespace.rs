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
use std::collections::BTreeMap;

use jfs_common::slices::{self, Slice};

use crate::raft_types::{
    valid_principal, AccessRec, ApplyResult, AttrRec, BlockInfo, BlockdRec, BlockdState, ChunkRec, Command, DirStamp,
    LockRec, NamespaceRec, NewBlock, Op, RecoveryRec, Reply, SessionRec, TimeSet, LOCK_UNLOCK, LOCK_WRITE,
};

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
/// fallocate(2) modes jfs implements (Linux values).
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
/// A commit that leaves a chunk with more slices than this reports it as
/// fragmented, and the committing client compacts it. Reads stay correct at
/// any count; this bounds metadata size and the pieces a read stitches.
pub const COMPACT_AT_SLICES: usize = 128;
/// Largest block a client may register (blocks are at most one chunk, but
/// a namespace's block size may be up to 64 MiB).
pub const MAX_BLOCK_LEN: u64 = 64 << 20;

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

/// Who may use namespace `ns` (everyone read-write if no grant was ever
/// changed).
pub fn namespace_access<R: KvRead + ?Sized>(kv: &R, ns: u32) -> Result<AccessRec, KvError> {
    Ok(match kv.get(&keys::ns_meta(ns, "access"))? {
        Some(v) => decode("namespace access", &v)?,
        None => AccessRec::default(),
    })
}

pub fn list_namespaces<R: KvRead + ?Sized>(kv: &R) -> Result<Vec<NamespaceRec>, KvError> {
    kv.scan(keys::NAMESPACES, None, usize::MAX)?
        .iter()
        .map(|(_, v)| decode("namespace", v))
        .collect()
}

/// The next block id to be allocated: every id below it was handed out.
pub fn next_block_id<R: KvRead + ?Sized>(kv: &R) -> Result<u64, KvError> {
    get_u64(kv, keys::NEXT_BLOCK)
}

pub fn orphan_floor<R: KvRead + ?Sized>(kv: &R) -> Result<u64, KvError> {
    get_u64(kv, keys::ORPHAN_FLOOR)
}

/// How many client sessions and saved replies the state machine holds.
pub fn session_counts<R: KvRead + ?Sized>(kv: &R) -> Result<(u64, u64), KvError> {
    let sessions = kv.scan(b"Y", None, usize::MAX)?.len() as u64;
    let replies = kv.scan(b"S", None, usize::MAX)?.len() as u64;
    Ok((sessions, replies))
}

/// Metad node ids that have held log entries (`Op::RecordMember`).
pub fn seen_members<R: KvRead + ?Sized>(kv: &R) -> Result<Vec<u64>, KvError> {
    Ok(kv
        .get(keys::SEEN_MEMBERS)?
        .map(|v| decode("seen members", &v))
        .transpose()?
        .unwrap_or_default())
}

/// Recovery progress; `None` when the cluster is not in recovery mode.
pub fn recovery_state<R: KvRead + ?Sized>(kv: &R) -> Result<Option<RecoveryRec>, KvError> {
    kv.get(keys::RECOVERY)?.map(|v| decode("recovery", &v)).transpose()
}

/// The epoch under which this cluster owns its mirror tables (0: never).
pub fn mirror_epoch<R: KvRead + ?Sized>(kv: &R) -> Result<u64, KvError> {
    get_u64(kv, keys::MIRROR_EPOCH)
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
    /// The directory's ctime, read before its entries: pages that all
    /// report one ctime make a listing no change cut through.
    pub dir_ctime: i64,
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
    Ok(DirListing {
        entries,
        eof,
        dir_ctime: dir.ctime,
    })
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

/// Chunks with a slice and index in `[first, first + count)`, with the
/// location of every block they refer to.
#[allow(clippy::type_complexity)]
pub fn get_chunks<R: KvRead + ?Sized>(
    kv: &R,
    ns: u32,
    ino: u64,
    first: u64,
    count: usize,
) -> NsResult<(AttrRec, Vec<(u64, ChunkRec)>, Vec<(u64, BlockInfo)>)> {
    let inode = get_inode(kv, ns, ino)?;
    if inode.is_dir() {
        return Err(FsError::IsDirectory.into());
    }
    let prefix = keys::chunk_prefix(ns, ino);
    let after = first.checked_sub(1).map(|i| keys::chunk(ns, ino, i));
    let mut chunks = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for (k, v) in kv.scan(&prefix, after.as_deref(), count.clamp(1, 100_000))? {
        let index = keys::be_u64_at(&k, keys::CHUNK_INDEX_OFFSET).ok_or_else(|| KvError("bad chunk key".into()))?;
        if index >= first.saturating_add(count as u64) {
            break;
        }
        let c: ChunkRec = decode("chunk", &v)?;
        ids.extend(c.slices.iter().filter(|s| !s.is_zero()).map(|s| s.block_id));
        chunks.push((index, c));
    }
    let mut blocks = Vec::with_capacity(ids.len());
    for id in ids {
        match kv.get(&keys::block(id))? {
            Some(v) => blocks.push((id, decode("block", &v)?)),
            None => {
                return Err(KvError(format!("inode {ino} refers to block {id}, which the block table lacks")).into())
            }
        }
    }
    Ok((inode.attr(ino), chunks, blocks))
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

/// A block no file refers to any more, waiting for deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    /// When it became garbage (leader clock, ns).
    pub since_ns: i64,
    pub block_id: u64,
    /// Replicas not yet told to delete it.
    pub replicas: Vec<String>,
}

/// Up to `limit` blocks that became garbage before `before_ns`, oldest
/// first. Blocks younger than that are kept: a reader elsewhere may still
/// hold a chunk map that points at them (the grace period).
pub fn garbage<R: KvRead + ?Sized>(kv: &R, before_ns: i64, limit: usize) -> Result<Vec<Garbage>, KvError> {
    let mut out = Vec::new();
    for (k, v) in kv.scan(keys::GARBAGE, None, limit)? {
        let (Some(since), Some(id)) = (
            keys::be_u64_at(&k, keys::GARBAGE_SINCE_OFFSET),
            keys::be_u64_at(&k, keys::GARBAGE_ID_OFFSET),
        ) else {
            return Err(KvError(format!("bad garbage key {k:?}")));
        };
        let since_ns = since as i64;
        if since_ns >= before_ns {
            break;
        }
        out.push(Garbage {
            since_ns,
            block_id: id,
            replicas: decode("garbage", &v)?,
        });
    }
    Ok(out)
}

/// The blockds the replicated state knows, by id.
pub fn blockds<R: KvRead + ?Sized>(kv: &R) -> Result<Vec<(String, BlockdRec)>, KvError> {
    let mut out = Vec::new();
    for (k, v) in kv.scan(keys::BLOCKDS, None, usize::MAX)? {
        let id = String::from_utf8_lossy(&k[keys::BLOCKD_ID_OFFSET..]).into_owned();
        out.push((id, decode("blockd", &v)?));
    }
    Ok(out)
}

pub fn block<R: KvRead + ?Sized>(kv: &R, id: u64) -> Result<Option<BlockInfo>, KvError> {
    kv.get(&keys::block(id))?.map(|v| decode("block", &v)).transpose()
}

/// Up to `limit` blocks of the block table with ids in (after, upto], in
/// id order.
pub fn blocks_in_range<R: KvRead + ?Sized>(
    kv: &R,
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<Vec<(u64, BlockInfo)>, KvError> {
    let mut out = Vec::new();
    let from = keys::block(after);
    let start = if after == 0 { None } else { Some(from.as_slice()) };
    for (k, v) in kv.scan(keys::BLOCKS, start, limit)? {
        let id = keys::be_u64_at(&k, keys::BLOCK_ID_OFFSET).ok_or_else(|| KvError(format!("bad block key {k:?}")))?;
        if id <= after {
            continue;
        }
        if id > upto {
            break;
        }
        out.push((id, decode("block", &v)?));
    }
    Ok(out)
}

// ------------------------------------------------------------------ writes

/// Applies one committed command, with the exactly-once session check:
/// a (client, seq) seen before gets its saved reply and changes nothing.
pub fn apply_command<R: KvRead + ?Sized>(txn: &mut Txn<'_, R>, cmd: &Command) -> Result<ApplyResult, KvError> {
    if let Op::Batch { cmds } = &cmd.op {
        let mut replies = Vec::with_capacity(cmds.len());
        for c in cmds {
            replies.push(if matches!(c.op, Op::Batch { .. }) {
                Err(FsError::Internal("a batch inside a batch was proposed".into()))
            } else {
                apply_command(txn, c)?
            });
        }
        return Ok(Ok(Reply::Batch(replies)));
    }
    if cmd.client_id != 0 {
        let now = cmd
            .now_ns
            .max(txn_u64(txn, keys::LAST_NOW)?.min(i64::MAX as u64) as i64);
        match session(txn, cmd.client_id)? {
            Some(s) => renew_session(txn, cmd.client_id, s, now, cmd.session_ns),
            // A client's first calls (nothing acknowledged yet) open its
            // session. A client that has had replies but no session lost
            // it: its reply table is gone, so a retry cannot be told from a
            // new request, and it must not be applied.
            None if cmd.acked_below <= 1 => renew_session(
                txn,
                cmd.client_id,
                SessionRec {
                    expires_ns: i64::MIN,
                    timeout_ns: 0,
                },
                now,
                cmd.session_ns,
            ),
            None => return Ok(Err(FsError::SessionExpired)),
        }
        if matches!(cmd.op, Op::KeepAlive { close: true }) {
            end_session(txn, cmd.client_id)?;
            return Ok(Ok(Reply::Ok));
        }
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

pub fn session<R: KvRead + ?Sized>(kv: &R, client: u64) -> Result<Option<SessionRec>, KvError> {
    kv.get(&keys::session(client))?
        .map(|v| decode("session", &v))
        .transpose()
}

/// Moves a session's expiry to `now + timeout`, but writes only when that
/// moves it by more than a quarter of the timeout: a busy client costs a
/// session write a few times per timeout, not one per request.
fn renew_session<R: KvRead + ?Sized>(t: &mut Txn<'_, R>, client: u64, s: SessionRec, now: i64, timeout_ns: i64) {
    let timeout_ns = if timeout_ns > 0 { timeout_ns } else { s.timeout_ns };
    let expires_ns = now.saturating_add(timeout_ns);
    if s.expires_ns != i64::MIN
        && expires_ns.saturating_sub(s.expires_ns) <= timeout_ns / 4
        && timeout_ns == s.timeout_ns
    {
        return;
    }
    if s.expires_ns != i64::MIN {
        t.delete(keys::session_expiry(s.expires_ns, client));
    }
    t.put(keys::session(client), encode(&SessionRec { expires_ns, timeout_ns }));
    t.put(keys::session_expiry(expires_ns, client), Vec::new());
}

/// Forgets a session and everything kept for it: saved replies, the
/// acknowledgement watermark, and files it kept open after their last
/// unlink (destroyed now unless linked again).
fn end_session<R: KvRead + ?Sized>(t: &mut Txn<'_, R>, client: u64) -> Result<(), KvError> {
    if let Some(s) = session(t, client)? {
        t.delete(keys::session_expiry(s.expires_ns, client));
    }
    t.delete(keys::session(client));
    t.delete(keys::session_low(client));
    let replies = keys::session_reply(client, 0)[..9].to_vec();
    for (k, _) in t.scan(&replies, None, usize::MAX)? {
        t.delete(k);
    }
    for (k, _) in t.scan(&keys::lock_holder_prefix(client), None, usize::MAX)? {
        t.delete(k.clone());
        let (Some(ns), Some(ino)) = (
            k.get(9..13).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes),
            keys::be_u64_at(&k, 13),
        ) else {
            return Err(KvError(format!("bad lock holder key {k:?}")));
        };
        let mut held = locks_of(t, ns, ino)?;
        held.retain(|l| l.client != client);
        put_locks(t, ns, ino, &held);
    }
    let owned = keys::orphan_owner_prefix(client);
    let now = txn_u64(t, keys::LAST_NOW)?.min(i64::MAX as u64) as i64;
    for (k, _) in t.scan(&owned, None, usize::MAX)? {
        t.delete(k.clone());
        let (Some(ns), Some(ino)) = (
            k.get(9..13).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes),
            keys::be_u64_at(&k, 13),
        ) else {
            return Err(KvError(format!("bad orphan owner key {k:?}")));
        };
        let mut c = Ctx {
            t,
            now,
            client,
            dirs: Vec::new(),
        };
        match c.release_orphan(ns, ino) {
            Ok(_) => {}
            Err(NsError::Storage(e)) => return Err(e),
            // The namespace or inode went away by other means: nothing to do.
            Err(NsError::Fs(_)) => {}
        }
    }
    Ok(())
}

/// The byte-range locks held on an inode.
pub fn locks_of<R: KvRead + ?Sized>(kv: &R, ns: u32, ino: u64) -> Result<Vec<LockRec>, KvError> {
    Ok(kv
        .get(&keys::locks(ns, ino))?
        .map(|v| decode("locks", &v))
        .transpose()?
        .unwrap_or_default())
}

fn put_locks<R: KvRead + ?Sized>(t: &mut Txn<'_, R>, ns: u32, ino: u64, locks: &[LockRec]) {
    if locks.is_empty() {
        t.delete(keys::locks(ns, ino));
    } else {
        t.put(keys::locks(ns, ino), encode(&locks));
    }
}

/// The first lock held by someone other than (client, owner) that conflicts
/// with a `write` (or read) lock over [start, end].
pub fn lock_conflict(locks: &[LockRec], client: u64, owner: u64, write: bool, start: u64, end: u64) -> Option<LockRec> {
    locks
        .iter()
        .find(|l| (l.client, l.owner) != (client, owner) && l.start <= end && start <= l.end && (l.write || write))
        .copied()
}

/// Sessions silent past their expiry at log time `now`, oldest first.
fn expired_sessions<R: KvRead + ?Sized>(t: &Txn<'_, R>, now: i64, limit: usize) -> Result<Vec<u64>, KvError> {
    let mut out = Vec::new();
    for (k, _) in t.scan(keys::SESSION_EXPIRY, None, limit)? {
        let (Some(at), Some(client)) = (keys::be_u64_at(&k, 1), keys::be_u64_at(&k, 9)) else {
            return Err(KvError(format!("bad session expiry key {k:?}")));
        };
        if at as i64 >= now {
            break;
        }
        out.push(client);
    }
    Ok(out)
}

/// How far block ids jump at the end of a restore (see `restore_finish`).
const RESTORE_BLOCK_ID_GAP: u64 = 1 << 32;

/// How many sessions one `ExpireSessions` ends at most (the rest wait for
/// the next one, a second later): keeps each command small.
const EXPIRE_BATCH: usize = 1000;

struct Ctx<'t, 'b, B: KvRead + ?Sized> {
    t: &'t mut Txn<'b, B>,
    now: i64,
    /// The client that sent the command (0 for internal commands).
    client: u64,
    /// Directories whose entries this command changed.
    dirs: Vec<DirStamp>,
}

impl<B: KvRead + ?Sized> Ctx<'_, '_, B> {
    /// The ctime of a change to an inode whose ctime was `old`. ctime only
    /// moves forward, even across a leader whose clock is behind: clients
    /// order the answers they get by it, so a later change must never look
    /// older (mountd would keep a stale size).
    fn ctime_after(&self, old: i64) -> i64 {
        self.now.max(old.saturating_add(1))
    }

    /// An entry operation's reply, with the directories it changed.
    fn stamped(&mut self, r: NsResult<Reply>) -> NsResult<Reply> {
        let dirs = std::mem::take(&mut self.dirs);
        match r {
            Ok(reply) if !dirs.is_empty() => Ok(Reply::InDirs {
                reply: Box::new(reply),
                dirs,
            }),
            r => r,
        }
    }
}

fn apply_op<B: KvRead + ?Sized>(t: &mut Txn<'_, B>, cmd: &Command) -> NsResult<Reply> {
    if let Some(r) = t.get(keys::RECOVERY)? {
        let r: RecoveryRec = decode("recovery", &r)?;
        if r.active() {
            // Nothing may change the restored namespaces; while the restore
            // runs, nothing may change the block table it is filling in either
            // (a block not restored yet would look unreferenced).
            let refused = cmd.op.namespace().is_some()
                || matches!(
                    cmd.op,
                    Op::CreateNamespace { .. }
                        | Op::SetReplication { .. }
                        | Op::SetNamespaceAccess { .. }
                        | Op::AllocateBlocks { .. }
                )
                || (!r.finished
                    && matches!(
                        cmd.op,
                        Op::AddReplica { .. }
                            | Op::DropReplicas { .. }
                            | Op::ForgetGarbage { .. }
                            | Op::AbandonBlocks { .. }
                            | Op::SetOrphanFloor { .. }
                    ));
            if refused {
                return Err(FsError::RecoveryReadOnly.into());
            }
        }
    }
    if let Some(ns) = cmd.op.namespace() {
        let rec = namespace_by_id(&*t, ns)?.ok_or_else(|| FsError::NamespaceNotFound(format!("id {ns}")))?;
        if rec.recovery_mode {
            return Err(FsError::RecoveryReadOnly.into());
        }
    }
    // The leader reads its clock before proposing; after a failover to a
    // node whose clock is behind, the stamps would go back. Applying with
    // max(proposed, latest applied) is deterministic on every node and
    // keeps mtime, ctime and the GC clock moving forward.
    let last = txn_u64(t, keys::LAST_NOW)?.min(i64::MAX as u64) as i64;
    let now = cmd.now_ns.max(last);
    if now > last {
        t.put(keys::LAST_NOW.to_vec(), encode(&(now as u64)));
    }
    let mut c = Ctx {
        t,
        now,
        client: cmd.client_id,
        dirs: Vec::new(),
    };
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
        } => {
            let r = c.mknod(*ns, *parent, name, *mode, *uid, *gid, *rdev, *exclusive, &[]);
            c.stamped(r)
        }
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
            let r = c.mknod(*ns, *parent, name, S_IFLNK | 0o777, *uid, *gid, 0, true, target);
            c.stamped(r)
        }
        Op::Link {
            ns,
            ino,
            new_parent,
            new_name,
        } => {
            let r = c.link(*ns, *ino, *new_parent, new_name);
            c.stamped(r)
        }
        Op::Unlink {
            ns,
            parent,
            name,
            keep_if_open,
        } => {
            let r = c.unlink(*ns, *parent, name, *keep_if_open);
            c.stamped(r)
        }
        Op::Rmdir { ns, parent, name } => {
            let r = c.rmdir(*ns, *parent, name);
            c.stamped(r)
        }
        Op::Rename {
            ns,
            parent,
            name,
            new_parent,
            new_name,
            flags,
            keep_if_open,
        } => {
            let r = c.rename(*ns, *parent, name, *new_parent, new_name, *flags, *keep_if_open);
            c.stamped(r)
        }
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
        Op::CommitSlices {
            ns,
            ino,
            new_blocks,
            slices,
            mtime,
        } => c.commit_slices(*ns, *ino, new_blocks, slices, *mtime),
        Op::CompactChunk {
            ns,
            ino,
            chunk,
            version,
            block,
            slices,
        } => c.compact_chunk(*ns, *ino, *chunk, *version, block, slices),
        Op::Fallocate {
            ns,
            ino,
            mode,
            offset,
            len,
        } => c.fallocate(*ns, *ino, *mode, *offset, *len),
        Op::ForgetGarbage { replica, blocks } => {
            for &(since, id) in blocks {
                let key = keys::garbage(since, id);
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
        Op::RegisterBlockd {
            id,
            address,
            filesystem,
        } => {
            let key = keys::blockd(id);
            let state = match c.t.get(&key)? {
                Some(v) => decode::<BlockdRec>("blockd", &v)?.state,
                None => BlockdState::Normal,
            };
            let rec = BlockdRec {
                address: address.clone(),
                filesystem: filesystem.clone(),
                state,
            };
            c.t.put(key, encode(&rec));
            Ok(Reply::Ok)
        }
        Op::SetBlockdState { id, state } => {
            let key = keys::blockd(id);
            let Some(v) = c.t.get(&key)? else {
                return Err(FsError::NotFound.into());
            };
            match state {
                Some(state) => {
                    let mut rec: BlockdRec = decode("blockd", &v)?;
                    rec.state = *state;
                    c.t.put(key, encode(&rec));
                }
                None => c.t.delete(key),
            }
            Ok(Reply::Ok)
        }
        Op::AddReplica { block, blockd, drop } => {
            let key = keys::block(*block);
            // Freed while the copy was made: the copy is an orphan, which
            // the next block report of that blockd reclaims.
            let Some(v) = c.t.get(&key)? else {
                return Ok(Reply::Compacted { applied: false });
            };
            let mut b: BlockInfo = decode("block", &v)?;
            b.replicas.retain(|r| !drop.contains(r));
            if !b.replicas.contains(blockd) {
                b.replicas.push(blockd.clone());
            }
            c.t.put(key, encode(&b));
            Ok(Reply::Compacted { applied: true })
        }
        Op::DropReplicas {
            block,
            blockds,
            to_garbage,
        } => {
            let key = keys::block(*block);
            let Some(v) = c.t.get(&key)? else {
                return Ok(Reply::Compacted { applied: false });
            };
            let mut b: BlockInfo = decode("block", &v)?;
            let dropped: Vec<String> = b.replicas.iter().filter(|r| blockds.contains(r)).cloned().collect();
            if dropped.is_empty() {
                return Ok(Reply::Compacted { applied: false });
            }
            b.replicas.retain(|r| !blockds.contains(r));
            c.t.put(key, encode(&b));
            if *to_garbage {
                c.add_garbage(*block, &dropped)?;
            }
            Ok(Reply::Compacted { applied: true })
        }
        Op::AbandonBlocks { blocks } => {
            for b in blocks {
                if b.block_id == slices::ZERO_BLOCK || c.t.get(&keys::block(b.block_id))?.is_some() {
                    continue;
                }
                // Since the epoch: past any grace period, as no reader can
                // hold a map naming a block that was never committed.
                let key = keys::garbage(0, b.block_id);
                c.t.put(key, encode(&b.replicas));
            }
            Ok(Reply::Ok)
        }
        Op::KeepAlive { .. } => Ok(Reply::Ok),
        Op::SetLock {
            ns,
            ino,
            owner,
            pid,
            typ,
            start,
            end,
        } => c.set_lock(*ns, *ino, *owner, *pid, *typ, *start, *end),
        Op::MirrorOwned { epoch } => {
            if *epoch > txn_u64(c.t, keys::MIRROR_EPOCH)? {
                c.t.put(keys::MIRROR_EPOCH.to_vec(), encode(epoch));
            }
            Ok(Reply::Ok)
        }
        Op::RestoreBegin { total } => c.restore_begin(*total),
        Op::RestoreRows {
            writes,
            restored,
            total,
        } => c.restore_rows(writes, *restored, *total),
        Op::RestoreFinish => c.restore_finish(),
        Op::RecoveryLeave => {
            match c
                .t
                .get(keys::RECOVERY)?
                .map(|r| decode::<RecoveryRec>("recovery", &r))
                .transpose()?
            {
                None => {}
                Some(mut r) if r.finished => {
                    r.left = true;
                    c.t.put(keys::RECOVERY.to_vec(), encode(&r));
                }
                Some(_) => {
                    return Err(FsError::InvalidArgument(
                        "the restore has not finished: wait for FINISH (`jfs admin recovery wait`), then leave \
                         recovery mode"
                            .into(),
                    )
                    .into())
                }
            }
            Ok(Reply::Ok)
        }
        // `apply_command` unpacks batches; one can only get here nested.
        Op::Batch { .. } => Err(FsError::Internal("a batch inside a batch was proposed".into()).into()),
        Op::ExpireSessions => {
            for client in expired_sessions(c.t, c.now, EXPIRE_BATCH)? {
                end_session(c.t, client)?;
            }
            Ok(Reply::Ok)
        }
        Op::RecordMember { id } => {
            let mut seen = seen_members(c.t)?;
            if !seen.contains(id) {
                seen.push(*id);
                seen.sort_unstable();
                c.t.put(keys::SEEN_MEMBERS.to_vec(), encode(&seen));
            }
            Ok(Reply::Ok)
        }
        Op::SetOrphanFloor { floor } => {
            if *floor > txn_u64(c.t, keys::ORPHAN_FLOOR)? {
                c.t.put(keys::ORPHAN_FLOOR.to_vec(), encode(floor));
            }
            Ok(Reply::Ok)
        }
        Op::SetReplication { name, replication } => {
            if *replication == 0 || *replication > 16 {
                return Err(FsError::InvalidArgument(format!("replication {replication}: must be 1..16")).into());
            }
            let Some(v) = c.t.get(&keys::namespace(name))? else {
                return Err(FsError::NamespaceNotFound(name.clone()).into());
            };
            let mut rec: NamespaceRec = decode("namespace", &v)?;
            rec.replication = *replication;
            c.t.put(keys::namespace(name), encode(&rec));
            c.t.put(keys::ns_meta(rec.id, "record"), encode(&rec));
            Ok(Reply::Namespace(rec))
        }
        Op::SetNamespaceAccess {
            name,
            principal,
            access,
        } => {
            if !valid_principal(principal) {
                return Err(FsError::InvalidArgument(format!(
                    "grant to {principal:?}: name a client certificate (1 to 64 printable characters) or \"*\""
                ))
                .into());
            }
            let Some(v) = c.t.get(&keys::namespace(name))? else {
                return Err(FsError::NamespaceNotFound(name.clone()).into());
            };
            let rec: NamespaceRec = decode("namespace", &v)?;
            let mut acl = namespace_access(&*c.t, rec.id)?;
            match access {
                Some(a) => acl.grants.insert(principal.clone(), *a),
                None => acl.grants.remove(principal),
            };
            c.t.put(keys::ns_meta(rec.id, "access"), encode(&acl));
            Ok(Reply::Namespace(rec))
        }
    }
}

impl<B: KvRead + ?Sized> Ctx<'_, '_, B> {
    /// Queues copies of a block for deletion once the grace period is over.
    /// An entry of the same moment (two drops in one command) is merged.
    fn add_garbage(&mut self, block: u64, replicas: &[String]) -> NsResult<()> {
        if replicas.is_empty() {
            return Ok(());
        }
        let key = keys::garbage(self.now, block);
        let mut all: Vec<String> = match self.t.get(&key)? {
            Some(v) => decode("garbage", &v)?,
            None => Vec::new(),
        };
        for r in replicas {
            if !all.contains(r) {
                all.push(r.clone());
            }
        }
        self.t.put(key, encode(&all));
        Ok(())
    }

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
        let before = d.ctime;
        d.mtime = self.now;
        d.ctime = self.ctime_after(d.ctime);
        self.dirs.push(DirStamp {
            ino,
            before,
            after: d.ctime,
        });
        d.nlink = (d.nlink as i64 + nlink_delta as i64).max(0) as u32;
        self.put_inode(ns, ino, &d);
        Ok(())
    }

    /// Clears what a fresh cluster wrote before its restore: every key the
    /// mirror ships (the restore brings them all back), except the clock,
    /// which must not go back.
    fn restore_begin(&mut self, total: u64) -> NsResult<Reply> {
        for prefix in [b"F", b"C", b"N", b"K", b"B", b"G"] {
            for (k, _) in self.t.scan(prefix, None, usize::MAX)? {
                if keys::mirror_target(&k).is_some() && k != keys::LAST_NOW {
                    self.t.delete(k);
                }
            }
        }
        let rec = RecoveryRec {
            finished: false,
            restored: 0,
            total,
            left: false,
        };
        self.t.put(keys::RECOVERY.to_vec(), encode(&rec));
        Ok(Reply::Ok)
    }

    fn restore_rows(&mut self, writes: &[(Vec<u8>, Option<Vec<u8>>)], restored: u64, total: u64) -> NsResult<Reply> {
        let mut rec: RecoveryRec = match self.t.get(keys::RECOVERY)? {
            Some(r) => decode("recovery", &r)?,
            None => {
                return Err(FsError::InvalidArgument("restored rows arrived outside a restore".into()).into());
            }
        };
        for (k, v) in writes {
            if keys::mirror_target(k).is_none() {
                return Err(
                    FsError::InvalidArgument(format!("the table store holds a row with a foreign key {k:?}")).into(),
                );
            }
            match v {
                Some(v) if k == keys::LAST_NOW => {
                    let old = txn_u64(self.t, keys::LAST_NOW)?;
                    let new: u64 = decode("clock", v)?;
                    self.t.put(k.clone(), encode(&old.max(new)));
                }
                Some(v) => self.t.put(k.clone(), v.clone()),
                None if k == keys::LAST_NOW => {}
                None => self.t.delete(k.clone()),
            }
        }
        rec.restored = rec.restored.max(restored);
        rec.total = rec.total.max(total).max(rec.restored);
        self.t.put(keys::RECOVERY.to_vec(), encode(&rec));
        Ok(Reply::Ok)
    }

    /// Ends a restore. Files the old cluster's clients held open after
    /// unlinking them are released (their sessions did not come along), and
    /// block ids jump far past the restored counter: the old cluster may
    /// have handed out ids the mirror had not shipped yet, and blockds may
    /// hold blocks under them.
    fn restore_finish(&mut self) -> NsResult<Reply> {
        let Some(r) = self.t.get(keys::RECOVERY)? else {
            return Err(FsError::InvalidArgument("no restore is running".into()).into());
        };
        let mut rec: RecoveryRec = decode("recovery", &r)?;
        let namespaces: Vec<u32> = self
            .t
            .scan(keys::NAMESPACES, None, usize::MAX)?
            .iter()
            .map(|(_, v)| decode::<NamespaceRec>("namespace", v).map(|n| n.id))
            .collect::<Result<_, _>>()?;
        for ns in namespaces {
            let prefix = keys::orphan(ns, 0)[..6].to_vec();
            for (k, _) in self.t.scan(&prefix, None, usize::MAX)? {
                if let Some(ino) = keys::be_u64_at(&k, 6) {
                    match self.release_orphan(ns, ino) {
                        Ok(_) | Err(NsError::Fs(_)) => {}
                        Err(NsError::Storage(e)) => return Err(e.into()),
                    }
                }
            }
        }
        let next = txn_u64(self.t, keys::NEXT_BLOCK)?;
        self.t.put(
            keys::NEXT_BLOCK.to_vec(),
            encode(&next.saturating_add(RESTORE_BLOCK_ID_GAP)),
        );
        rec.finished = true;
        rec.restored = rec.total.max(rec.restored);
        self.t.put(keys::RECOVERY.to_vec(), encode(&rec));
        Ok(Reply::Ok)
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
        inode.ctime = self.ctime_after(inode.ctime);
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
        inode.ctime = self.ctime_after(inode.ctime);
        if inode.nlink > 0 {
            self.put_inode(ns, ino, &inode);
            return Ok((false, Some(inode.attr(ino))));
        }
        if keep_if_open {
            self.put_inode(ns, ino, &inode);
            self.t.put(keys::orphan(ns, ino), encode(&self.now));
            if self.client != 0 {
                // Released by the client at last close, or with its session.
                self.t.put(keys::orphan_owner(self.client, ns, ino), Vec::new());
            }
            return Ok((true, Some(inode.attr(ino))));
        }
        self.destroy_inode(ns, ino, &inode)?;
        Ok((false, None))
    }

    /// Removes an inode with no links left: its blocks go to garbage.
    fn destroy_inode(&mut self, ns: u32, ino: u64, inode: &Inode) -> NsResult<()> {
        self.truncate_chunks(ns, ino, 0)?;
        for (k, _) in self.t.scan(&keys::xattr_prefix(ns, ino), None, usize::MAX)? {
            self.t.delete(k);
        }
        self.t.delete(keys::inode(ns, ino));
        self.t.delete(keys::orphan(ns, ino));
        for l in locks_of(&*self.t, ns, ino)? {
            self.t.delete(keys::lock_holder(l.client, ns, ino));
        }
        self.t.delete(keys::locks(ns, ino));
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
                i.ctime = self.ctime_after(i.ctime);
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
        moved.ctime = self.ctime_after(moved.ctime);
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

    #[allow(clippy::too_many_arguments)]
    fn set_lock(&mut self, ns: u32, ino: u64, owner: u64, pid: u32, typ: u32, start: u64, end: u64) -> NsResult<Reply> {
        if start > end || typ > LOCK_UNLOCK {
            return Err(FsError::InvalidArgument(format!("lock type {typ} over {start}..={end}")).into());
        }
        if self.client == 0 {
            return Err(FsError::InvalidArgument("a lock needs a client session".into()).into());
        }
        self.inode(ns, ino)?;
        let client = self.client;
        let held = locks_of(&*self.t, ns, ino)?;
        let write = typ == LOCK_WRITE;
        if typ != LOCK_UNLOCK && lock_conflict(&held, client, owner, write, start, end).is_some() {
            return Err(FsError::WouldBlock.into());
        }
        // The owner's locks over [start, end] give way to the new one: cut
        // them back to what lies outside the range.
        let mut out = Vec::with_capacity(held.len() + 2);
        for l in held {
            if (l.client, l.owner) != (client, owner) || l.end < start || l.start > end {
                out.push(l);
                continue;
            }
            if l.start < start {
                out.push(LockRec { end: start - 1, ..l });
            }
            if l.end > end {
                out.push(LockRec { start: end + 1, ..l });
            }
        }
        if typ != LOCK_UNLOCK {
            out.push(LockRec {
                client,
                owner,
                pid,
                write,
                start,
                end,
            });
        }
        if out.iter().any(|l| l.client == client) {
            self.t.put(keys::lock_holder(client, ns, ino), Vec::new());
        } else {
            self.t.delete(keys::lock_holder(client, ns, ino));
        }
        put_locks(self.t, ns, ino, &out);
        Ok(Reply::Ok)
    }

    fn release_orphan(&mut self, ns: u32, ino: u64) -> NsResult<Reply> {
        if self.client != 0 {
            self.t.delete(keys::orphan_owner(self.client, ns, ino));
        }
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

    fn chunk_size(&self, ns: u32) -> NsResult<u64> {
        let rec = namespace_by_id(&*self.t, ns)?.ok_or_else(|| FsError::NamespaceNotFound(format!("id {ns}")))?;
        Ok(rec.block_size)
    }

    fn get_chunk(&self, ns: u32, ino: u64, index: u64) -> NsResult<ChunkRec> {
        Ok(match self.t.get(&keys::chunk(ns, ino, index))? {
            Some(v) => decode("chunk", &v)?,
            None => ChunkRec::default(),
        })
    }

    /// Stores a chunk after a change: drops slices nobody can see any more
    /// (their block references go in `refs`), bumps the version, deletes
    /// the record when nothing is left. Returns the slice count left.
    fn put_chunk(&mut self, ns: u32, ino: u64, index: u64, mut c: ChunkRec, refs: &mut RefDelta) -> NsResult<usize> {
        let keep = slices::prune(&c.slices);
        let mut kept = Vec::with_capacity(c.slices.len());
        for (s, k) in c.slices.iter().zip(keep) {
            if k {
                kept.push(*s);
            } else {
                refs.sub(s);
            }
        }
        c.slices = kept;
        // Versions come from one namespace-wide counter, so a chunk that is
        // deleted and written again never repeats a version a compactor may
        // still hold.
        let vkey = keys::ns_meta(ns, "chunk_version");
        c.version = txn_u64(self.t, &vkey)?.max(c.version) + 1;
        self.t.put(vkey, encode(&c.version));
        let key = keys::chunk(ns, ino, index);
        if c.slices.is_empty() {
            self.t.delete(key);
        } else {
            self.t.put(key, encode(&c));
        }
        Ok(c.slices.len())
    }

    /// Applies reference count changes; blocks nobody refers to go to the
    /// garbage table (deleted on their blockds by heartbeat commands).
    fn apply_refs(&mut self, ns: u32, refs: RefDelta) -> NsResult<()> {
        for (id, delta) in refs.0 {
            let key = keys::block(id);
            let Some(v) = self.t.get(&key)? else {
                if delta > 0 {
                    return Err(FsError::InvalidArgument(format!("block {id} is not known to metad")).into());
                }
                continue;
            };
            let mut b: BlockInfo = decode("block", &v)?;
            if b.ns != ns {
                return Err(FsError::InvalidArgument(format!("block {id} belongs to another namespace")).into());
            }
            let refs = (b.refs as i64).saturating_add(delta);
            if refs <= 0 {
                self.t.delete(key);
                self.add_garbage(id, &b.replicas)?;
            } else {
                b.refs = refs as u64;
                self.t.put(key, encode(&b));
            }
        }
        Ok(())
    }

    /// Drops every byte at or past `new_size`.
    fn truncate_chunks(&mut self, ns: u32, ino: u64, new_size: u64) -> NsResult<()> {
        let cs = self.chunk_size(ns)?;
        let mut refs = RefDelta::default();
        let prefix = keys::chunk_prefix(ns, ino);
        let first = new_size / cs;
        let after = first.checked_sub(1).map(|i| keys::chunk(ns, ino, i));
        for (k, v) in self.t.scan(&prefix, after.as_deref(), usize::MAX)? {
            let index = keys::be_u64_at(&k, keys::CHUNK_INDEX_OFFSET).ok_or_else(|| KvError("bad chunk key".into()))?;
            let c: ChunkRec = decode("chunk", &v)?;
            let keep_len = new_size.saturating_sub(index * cs).min(cs) as u32;
            let (kept, dropped) = slices::clip(&c.slices, keep_len);
            for s in &dropped {
                refs.sub(s);
            }
            if kept.len() != c.slices.len() || kept != c.slices {
                self.put_chunk(
                    ns,
                    ino,
                    index,
                    ChunkRec {
                        version: c.version,
                        slices: kept,
                    },
                    &mut refs,
                )?;
            }
        }
        self.apply_refs(ns, refs)
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
                self.truncate_chunks(ns, ino, sz)?;
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
        inode.ctime = ctime.unwrap_or(self.now).max(inode.ctime.saturating_add(1));
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
        inode.ctime = self.ctime_after(inode.ctime);
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
        inode.ctime = self.ctime_after(inode.ctime);
        self.put_inode(ns, ino, &inode);
        Ok(Reply::Attr(inode.attr(ino)))
    }

    fn regular_file(&self, ns: u32, ino: u64) -> NsResult<Inode> {
        let inode = self.inode(ns, ino)?;
        if !inode.is_reg() {
            return Err(if inode.is_dir() {
                FsError::IsDirectory
            } else {
                FsError::InvalidArgument("not a regular file".into())
            }
            .into());
        }
        Ok(inode)
    }

    /// Registers blocks a client stored (no references yet).
    fn register_blocks(&mut self, ns: u32, blocks: &[NewBlock], refs: &mut RefDelta) -> NsResult<()> {
        for b in blocks {
            if b.block_id == slices::ZERO_BLOCK || b.len == 0 || b.len > MAX_BLOCK_LEN {
                return Err(FsError::InvalidArgument(format!(
                    "block {} of {} bytes cannot be registered",
                    b.block_id, b.len
                ))
                .into());
            }
            let key = keys::block(b.block_id);
            match self.t.get(&key)? {
                None if b.block_id < txn_u64(self.t, keys::ORPHAN_FLOOR)? => {
                    // Its copies may already be deleted as a dead client's.
                    return Err(FsError::Io(format!(
                        "block {} was stored too long ago without being committed and has been reclaimed; \
                         the write must be done again",
                        b.block_id
                    ))
                    .into());
                }
                None => {
                    let info = BlockInfo {
                        ns,
                        len: b.len,
                        replicas: b.replicas.clone(),
                        refs: 0,
                        born_ns: self.now,
                    };
                    self.t.put(key, encode(&info));
                }
                Some(v) if decode::<BlockInfo>("block", &v)?.ns != ns => {
                    return Err(
                        FsError::InvalidArgument(format!("block {} belongs to another namespace", b.block_id)).into(),
                    );
                }
                Some(_) => {}
            }
            // Checked by apply_refs: a block no slice ends up using is garbage.
            refs.0.entry(b.block_id).or_insert(0);
        }
        Ok(())
    }

    /// The length of a block a slice may refer to, from this command's new
    /// blocks or the block table.
    fn block_len(&self, ns: u32, id: u64, new_blocks: &[NewBlock]) -> NsResult<u64> {
        if let Some(b) = new_blocks.iter().find(|b| b.block_id == id) {
            return Ok(b.len);
        }
        match self.t.get(&keys::block(id))? {
            Some(v) => {
                let b: BlockInfo = decode("block", &v)?;
                if b.ns != ns {
                    return Err(FsError::InvalidArgument(format!("block {id} belongs to another namespace")).into());
                }
                Ok(b.len)
            }
            None => Err(FsError::InvalidArgument(format!("block {id} is not known to metad")).into()),
        }
    }

    fn check_slice(&self, ns: u32, cs: u64, s: &Slice, new_blocks: &[NewBlock]) -> NsResult<()> {
        if s.len == 0 || s.pos as u64 + s.len as u64 > cs {
            return Err(FsError::InvalidArgument(format!(
                "slice at {} of {} bytes does not fit a chunk of {cs} bytes",
                s.pos, s.len
            ))
            .into());
        }
        if s.is_zero() {
            return Ok(());
        }
        let blen = self.block_len(ns, s.block_id, new_blocks)?;
        if s.block_off as u64 + s.len as u64 > blen {
            return Err(FsError::InvalidArgument(format!(
                "slice reads {} bytes at {} of block {}, which has {blen}",
                s.len, s.block_off, s.block_id
            ))
            .into());
        }
        Ok(())
    }

    /// A data write: new slices on top of each chunk; the size grows to
    /// cover them and never shrinks, so concurrent writers keep each
    /// other's bytes (DESIGN §5).
    fn commit_slices(
        &mut self,
        ns: u32,
        ino: u64,
        new_blocks: &[NewBlock],
        new_slices: &[(u64, Slice)],
        mtime: Option<i64>,
    ) -> NsResult<Reply> {
        let mut inode = self.regular_file(ns, ino)?;
        let cs = self.chunk_size(ns)?;
        let mut refs = RefDelta::default();
        let mut end = 0u64;
        for (chunk, s) in new_slices {
            if s.is_zero() {
                return Err(FsError::InvalidArgument("a write cannot commit a zero slice".into()).into());
            }
            self.check_slice(ns, cs, s, new_blocks)?;
            let e = chunk
                .checked_mul(cs)
                .and_then(|o| o.checked_add(s.end() as u64))
                .filter(|&e| e <= MAX_FILE_SIZE)
                .ok_or(FsError::FileTooBig)?;
            end = end.max(e);
        }
        self.register_blocks(ns, new_blocks, &mut refs)?;
        let mut by_chunk: BTreeMap<u64, Vec<Slice>> = BTreeMap::new();
        for (chunk, s) in new_slices {
            by_chunk.entry(*chunk).or_default().push(*s);
        }
        let mut fragmented = Vec::new();
        for (index, added) in by_chunk {
            let mut c = self.get_chunk(ns, ino, index)?;
            for s in added {
                refs.add(&s);
                c.slices.push(s);
            }
            if self.put_chunk(ns, ino, index, c, &mut refs)? > COMPACT_AT_SLICES {
                fragmented.push(index);
            }
        }
        self.apply_refs(ns, refs)?;
        if end > inode.size {
            txn_add(self.t, keys::ns_meta(ns, "bytes"), (end - inode.size) as i64)?;
            inode.size = end;
        }
        if !new_slices.is_empty() {
            inode.mtime = mtime.unwrap_or(self.now);
            inode.ctime = self.ctime_after(inode.ctime);
            // Writing by anyone but root clears set-user-id (as the kernel
            // would ask through killpriv); keep it simple: any data write
            // clears both.
            if inode.mode & S_ISUID != 0 || inode.mode & (S_ISGID | 0o010) == (S_ISGID | 0o010) {
                inode.mode &= !(S_ISUID | S_ISGID);
            }
            self.put_inode(ns, ino, &inode);
        }
        Ok(Reply::Committed {
            attr: inode.attr(ino),
            fragmented,
        })
    }

    /// Background compaction's commit: the chunk's slices replaced by
    /// `new_slices` over one new block, only if nothing changed the chunk
    /// since the compactor read it. A refused block goes straight to garbage.
    fn compact_chunk(
        &mut self,
        ns: u32,
        ino: u64,
        index: u64,
        version: u64,
        block: &NewBlock,
        new_slices: &[Slice],
    ) -> NsResult<Reply> {
        let current = match self.regular_file(ns, ino) {
            Ok(_) => self.get_chunk(ns, ino, index)?,
            Err(NsError::Fs(_)) => ChunkRec::default(),
            Err(e) => return Err(e),
        };
        if current.slices.is_empty() || current.version != version {
            self.add_garbage(block.block_id, &block.replicas)?;
            return Ok(Reply::Compacted { applied: false });
        }
        let cs = self.chunk_size(ns)?;
        let blocks = std::slice::from_ref(block);
        for s in new_slices {
            if !s.is_zero() && s.block_id != block.block_id {
                return Err(
                    FsError::InvalidArgument("a compacted chunk may only refer to its new block".into()).into(),
                );
            }
            self.check_slice(ns, cs, s, blocks)?;
        }
        let mut refs = RefDelta::default();
        self.register_blocks(ns, blocks, &mut refs)?;
        for s in &current.slices {
            refs.sub(s);
        }
        for s in new_slices {
            refs.add(s);
        }
        let c = ChunkRec {
            version: current.version,
            slices: new_slices.to_vec(),
        };
        self.put_chunk(ns, ino, index, c, &mut refs)?;
        self.apply_refs(ns, refs)?;
        Ok(Reply::Compacted { applied: true })
    }

    fn fallocate(&mut self, ns: u32, ino: u64, mode: u32, offset: u64, len: u64) -> NsResult<Reply> {
        let mut inode = self.regular_file(ns, ino)?;
        let end = offset
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| FsError::InvalidArgument(format!("fallocate of {len} bytes at {offset}")))?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig.into());
        }
        match mode {
            0 => {
                // Space is taken at write time; only the size changes.
                if end > inode.size {
                    txn_add(self.t, keys::ns_meta(ns, "bytes"), (end - inode.size) as i64)?;
                    inode.size = end;
                    inode.mtime = self.now;
                    inode.ctime = self.ctime_after(inode.ctime);
                    self.put_inode(ns, ino, &inode);
                }
            }
            FALLOC_FL_KEEP_SIZE => {}
            m if m == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE => {
                let end = end.min(inode.size);
                if offset < end {
                    self.punch(ns, ino, offset, end)?;
                }
                inode.mtime = self.now;
                inode.ctime = self.ctime_after(inode.ctime);
                self.put_inode(ns, ino, &inode);
            }
            m => {
                return Err(FsError::NotSupported(format!(
                    "fallocate mode {m:#x}: jfs supports 0, FALLOC_FL_KEEP_SIZE and FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE"
                ))
                .into())
            }
        }
        Ok(Reply::Attr(inode.attr(ino)))
    }

    /// Zeros `[start, end)` with a zero slice on top of each chunk it
    /// touches (pruning then drops whatever it hides).
    fn punch(&mut self, ns: u32, ino: u64, start: u64, end: u64) -> NsResult<()> {
        let cs = self.chunk_size(ns)?;
        let mut refs = RefDelta::default();
        let prefix = keys::chunk_prefix(ns, ino);
        let after = (start / cs).checked_sub(1).map(|i| keys::chunk(ns, ino, i));
        // Only chunks that exist can hold data to hide.
        for (k, v) in self.t.scan(&prefix, after.as_deref(), usize::MAX)? {
            let index = keys::be_u64_at(&k, keys::CHUNK_INDEX_OFFSET).ok_or_else(|| KvError("bad chunk key".into()))?;
            let base = index * cs;
            if base >= end {
                break;
            }
            let mut c: ChunkRec = decode("chunk", &v)?;
            let a = start.max(base) - base;
            let b = end.min(base + cs) - base;
            c.slices.push(Slice {
                pos: a as u32,
                len: (b - a) as u32,
                block_id: slices::ZERO_BLOCK,
                block_off: 0,
            });
            self.put_chunk(ns, ino, index, c, &mut refs)?;
        }
        self.apply_refs(ns, refs)
    }
}

/// Block reference count changes of one command, summed per block.
#[derive(Default)]
struct RefDelta(BTreeMap<u64, i64>);

impl RefDelta {
    fn add(&mut self, s: &Slice) {
        if !s.is_zero() {
            *self.0.entry(s.block_id).or_insert(0) += 1;
        }
    }
    fn sub(&mut self, s: &Slice) {
        if !s.is_zero() {
            *self.0.entry(s.block_id).or_insert(0) -= 1;
        }
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
#[path = "namespace_fuzz.rs"]
mod fuzz;

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
                session_ns: 0,
                op,
            };
            let mut t = Txn::new(&self.kv);
            self.run_stamped(cmd).map(strip_dirs)
        }
        /// Applies `cmd` and returns its reply as a client gets it.
        fn run_stamped(&mut self, cmd: Command) -> ApplyResult {
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
    fn time_only_moves_forward_even_when_the_leader_clock_is_behind() {
        let mut fs = Fs::new();
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let before = fs.attr(f).ctime;
        // A new leader whose clock is far behind proposes the next change.
        let ns = fs.ns;
        let cmd = Command {
            client_id: 9,
            seq: 1,
            acked_below: 0,
            now_ns: 5,
            session_ns: 0,
            op: Op::SetAttr {
                ns,
                ino: f,
                mode: Some(0o600),
                uid: None,
                gid: None,
                size: None,
                atime: None,
                mtime: None,
                ctime: None,
            },
        };
        let mut t = Txn::new(&fs.kv);
        apply_command(&mut t, &cmd).unwrap().unwrap();
        let w = t.into_writes();
        fs.kv.apply(w);
        assert!(
            fs.attr(f).ctime > before,
            "ctime went from {before} to {}",
            fs.attr(f).ctime
        );
        // And a file created under that leader is not stamped before what
        // the namespace has already seen.
        let latest = fs.attr(f).mtime;
        let cmd = Command {
            client_id: 9,
            seq: 2,
            acked_below: 0,
            now_ns: 5,
            session_ns: 0,
            op: Op::Mknod {
                ns,
                parent: ROOT_INO,
                name: b"g".to_vec(),
                mode: S_IFREG | 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                exclusive: true,
            },
        };
        let mut t = Txn::new(&fs.kv);
        let g = match apply_command(&mut t, &cmd).unwrap().map(strip_dirs).unwrap() {
            Reply::Attr(a) => a,
            other => panic!("{other:?}"),
        };
        let w = t.into_writes();
        fs.kv.apply(w);
        assert!(g.mtime >= latest && g.ctime >= latest, "{g:?} stamped before {latest}");
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
                session_ns: 0,
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

    /// Directory stamps have a test of their own; the others compare
    /// replies without them.
    fn strip_dirs(r: Reply) -> Reply {
        match r.split_dirs().0 {
            Reply::Batch(each) => Reply::Batch(each.into_iter().map(|r| r.map(strip_dirs)).collect()),
            r => r,
        }
    }

    #[test]
    fn entry_changes_stamp_each_directory_with_its_ctime_before_and_after() {
        let mut fs = Fs::new();
        let root = ROOT_INO;
        let a = fs.ino(root, "a", S_IFDIR | 0o755);
        let b = fs.ino(root, "b", S_IFDIR | 0o755);
        let ns = fs.ns;
        let mut stamped = |fs: &mut Fs, op: Op| {
            fs.seq += 1;
            let cmd = Command {
                client_id: 7,
                seq: fs.seq,
                acked_below: 0,
                now_ns: 1_000 + fs.seq as i64,
                session_ns: 0,
                op,
            };
            fs.run_stamped(cmd).map(|r| r.split_dirs().1)
        };
        let ctime = |fs: &Fs, ino| fs.attr(ino).ctime;

        let before = ctime(&fs, a);
        let dirs = stamped(
            &mut fs,
            Op::Mknod {
                ns,
                parent: a,
                name: b"f".to_vec(),
                mode: S_IFREG | 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                exclusive: true,
            },
        )
        .unwrap();
        assert_eq!(
            dirs,
            vec![DirStamp {
                ino: a,
                before,
                after: ctime(&fs, a)
            }]
        );
        assert!(ctime(&fs, a) > before);

        // A rename across directories stamps both; the listing of each
        // reports the ctime the stamp ended at.
        let (ba, bb) = (ctime(&fs, a), ctime(&fs, b));
        let dirs = stamped(
            &mut fs,
            Op::Rename {
                ns,
                parent: a,
                name: b"f".to_vec(),
                new_parent: b,
                new_name: b"g".to_vec(),
                flags: 0,
                keep_if_open: false,
            },
        )
        .unwrap();
        assert_eq!(
            dirs,
            vec![
                DirStamp {
                    ino: a,
                    before: ba,
                    after: ctime(&fs, a)
                },
                DirStamp {
                    ino: b,
                    before: bb,
                    after: ctime(&fs, b)
                },
            ]
        );
        assert_eq!(readdir(&fs.kv, ns, b, b"", 10, false).unwrap().dir_ctime, ctime(&fs, b));

        // Every change to a directory moves its ctime, even within one
        // clock tick: a stamp's `before` is never an older change's `after`.
        let bb = ctime(&fs, b);
        let dirs = stamped(
            &mut fs,
            Op::Unlink {
                ns,
                parent: b,
                name: b"g".to_vec(),
                keep_if_open: false,
            },
        )
        .unwrap();
        assert_eq!(dirs.len(), 1);
        assert_eq!(dirs[0].before, bb);
        assert!(dirs[0].after > bb);

        // A failed operation changes nothing and carries no stamps.
        assert!(stamped(
            &mut fs,
            Op::Unlink {
                ns,
                parent: b,
                name: b"g".to_vec(),
                keep_if_open: false
            }
        )
        .is_err());
        // Neither does one that is not an entry operation.
        assert_eq!(stamped(&mut fs, Op::AllocateBlocks { count: 1 }).unwrap(), vec![]);
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

    fn new_block(id: u64, len: u64) -> NewBlock {
        NewBlock {
            block_id: id,
            len,
            replicas: vec!["r".into()],
        }
    }

    fn slice(pos: u32, len: u32, block_id: u64, block_off: u32) -> Slice {
        Slice {
            pos,
            len,
            block_id,
            block_off,
        }
    }

    fn commit(fs: &mut Fs, ino: u64, blocks: Vec<NewBlock>, slices: Vec<(u64, Slice)>) -> (AttrRec, Vec<u64>) {
        let ns = fs.ns;
        match fs.run(Op::CommitSlices {
            ns,
            ino,
            new_blocks: blocks,
            slices,
            mtime: None,
        }) {
            Ok(Reply::Committed { attr, fragmented }) => (attr, fragmented),
            other => panic!("{other:?}"),
        }
    }

    fn chunks(fs: &Fs, ino: u64) -> Vec<(u64, ChunkRec)> {
        get_chunks(&fs.kv, fs.ns, ino, 0, 1000).unwrap().1
    }

    fn garbage_ids(fs: &Fs) -> Vec<u64> {
        let mut ids: Vec<u64> = garbage(&fs.kv, i64::MAX, 10_000)
            .unwrap()
            .iter()
            .map(|g| g.block_id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn commits_grow_never_shrink_and_hidden_blocks_become_garbage() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let mb = 1u32 << 20;
        // Writer B: 1 MiB in chunk 0.
        let (a, _) = commit(
            &mut fs,
            f,
            vec![new_block(10, mb as u64)],
            vec![(0, slice(0, mb, 10, 0))],
        );
        assert_eq!(a.size, mb as u64);
        // Writer A, whose view was an empty file: 10 bytes at 0. B's bytes stay.
        let (a, _) = commit(&mut fs, f, vec![new_block(11, 10)], vec![(0, slice(0, 10, 11, 0))]);
        assert_eq!(a.size, mb as u64, "a commit never shrinks the file");
        assert_eq!(chunks(&fs, f)[0].1.slices.len(), 2);
        // A full overwrite hides both: their blocks become garbage.
        commit(
            &mut fs,
            f,
            vec![new_block(12, mb as u64)],
            vec![(0, slice(0, mb, 12, 0))],
        );
        assert_eq!(chunks(&fs, f)[0].1.slices, vec![slice(0, mb, 12, 0)]);
        assert_eq!(garbage_ids(&fs), vec![10, 11]);
        // Garbage waits out the grace period: none of it is older than the
        // commit that made it.
        let g = garbage(&fs.kv, i64::MAX, 100).unwrap();
        let made_at = g[0].since_ns;
        assert!(
            g.iter()
                .all(|x| x.since_ns == made_at && x.replicas == vec!["r".to_string()]),
            "{g:?}"
        );
        assert!(garbage(&fs.kv, made_at, 100).unwrap().is_empty());
        assert_eq!(garbage(&fs.kv, made_at + 1, 100).unwrap().len(), 2);
        assert_eq!(usage(&fs.kv, ns).unwrap().bytes, mb as u64);
        // A block shared by slices of two chunks stays until both are gone.
        let (a, _) = commit(
            &mut fs,
            f,
            vec![new_block(13, 200)],
            vec![(0, slice(0, 100, 13, 0)), (2, slice(5, 100, 13, 100))],
        );
        assert_eq!(a.size, 2 * (1 << 20) + 105);
        let (_, _, blocks) = get_chunks(&fs.kv, ns, f, 0, 10).unwrap();
        assert_eq!(blocks.iter().find(|b| b.0 == 13).unwrap().1.refs, 2);
        // Slices must lie inside their block and chunk.
        assert!(matches!(
            fs.run(Op::CommitSlices {
                ns,
                ino: f,
                new_blocks: vec![],
                slices: vec![(0, slice(0, 300, 13, 0))],
                mtime: None
            }),
            Err(FsError::InvalidArgument(_))
        ));
        assert!(matches!(
            fs.run(Op::CommitSlices {
                ns,
                ino: f,
                new_blocks: vec![],
                slices: vec![(0, slice(0, 1, 999, 0))],
                mtime: None
            }),
            Err(FsError::InvalidArgument(_))
        ));
        // Truncate into chunk 0 drops chunk 2 (block 13 loses one ref) and clips chunk 0.
        fs.run(Op::SetAttr {
            ns,
            ino: f,
            mode: None,
            uid: None,
            gid: None,
            size: Some(50),
            atime: None,
            mtime: None,
            ctime: None,
        })
        .unwrap();
        let c = chunks(&fs, f);
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].1.slices,
            vec![slice(0, 50, 13, 0)],
            "the clipped newest slice hides block 12"
        );
        assert_eq!(garbage_ids(&fs), vec![10, 11, 12]);
        fs.run(Op::Unlink {
            ns,
            parent: ROOT_INO,
            name: b"f".to_vec(),
            keep_if_open: false,
        })
        .unwrap();
        assert_eq!(garbage_ids(&fs), vec![10, 11, 12, 13]);
        assert_eq!(usage(&fs.kv, ns).unwrap().bytes, 0);
    }

    #[test]
    fn replica_changes_keep_live_copies_in_the_grace_period() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let mut b = new_block(5, 10);
        b.replicas = vec!["a".into(), "b".into()];
        commit(&mut fs, f, vec![b], vec![(0, slice(0, 10, 5, 0))]);
        let replicas = |fs: &Fs| block(&fs.kv, 5).unwrap().unwrap().replicas;
        fs.run(Op::AddReplica {
            block: 5,
            blockd: "c".into(),
            drop: vec!["a".into()],
        })
        .unwrap();
        assert_eq!(replicas(&fs), vec!["b".to_string(), "c".to_string()]);
        // A surplus copy still exists: it waits in the garbage table.
        fs.run(Op::DropReplicas {
            block: 5,
            blockds: vec!["b".into()],
            to_garbage: true,
        })
        .unwrap();
        assert_eq!(replicas(&fs), vec!["c".to_string()]);
        let g = garbage(&fs.kv, i64::MAX, 10).unwrap();
        assert_eq!(
            (g.len(), g[0].block_id, g[0].replicas.clone()),
            (1, 5, vec!["b".to_string()])
        );
        // A corrupt copy is gone already: nothing to delete.
        fs.run(Op::DropReplicas {
            block: 5,
            blockds: vec!["c".into()],
            to_garbage: false,
        })
        .unwrap();
        assert!(replicas(&fs).is_empty());
        assert_eq!(garbage(&fs.kv, i64::MAX, 10).unwrap().len(), 1);
        // Ops on a block that is gone change nothing.
        assert!(matches!(
            fs.run(Op::AddReplica {
                block: 99,
                blockd: "c".into(),
                drop: vec![]
            }),
            Ok(Reply::Compacted { applied: false })
        ));
        // Another namespace cannot refer to this block.
        let other = match fs.run(Op::CreateNamespace {
            name: "u".into(),
            block_size: 1 << 20,
            replication: 1,
            if_not_exists: false,
        }) {
            Ok(Reply::Namespace(r)) => r.id,
            x => panic!("{x:?}"),
        };
        fs.ns = other;
        let g = fs.ino(ROOT_INO, "g", S_IFREG | 0o644);
        let r = fs.run(Op::CommitSlices {
            ns: other,
            ino: g,
            new_blocks: vec![],
            slices: vec![(0, slice(0, 10, 5, 0))],
            mtime: None,
        });
        match r {
            Err(FsError::InvalidArgument(m)) => assert!(m.contains("another namespace"), "{m}"),
            other => panic!("{other:?}"),
        }
        let _ = ns;
    }

    #[test]
    fn new_blocks_below_the_orphan_floor_are_refused() {
        let mut fs = Fs::new();
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        commit(&mut fs, f, vec![new_block(5, 10)], vec![(0, slice(0, 10, 5, 0))]);
        fs.run(Op::SetOrphanFloor { floor: 20 }).unwrap();
        fs.run(Op::SetOrphanFloor { floor: 10 }).unwrap();
        assert_eq!(orphan_floor(&fs.kv).unwrap(), 20, "the floor never goes down");
        let ns = fs.ns;
        let r = fs.run(Op::CommitSlices {
            ns,
            ino: f,
            new_blocks: vec![new_block(7, 10)],
            slices: vec![(0, slice(0, 10, 7, 0))],
            mtime: None,
        });
        assert!(matches!(r, Err(FsError::Io(_))), "{r:?}");
        // A block already known may be referred to again; new ids above the
        // floor are fine.
        commit(&mut fs, f, vec![], vec![(0, slice(10, 5, 5, 0))]);
        commit(&mut fs, f, vec![new_block(21, 10)], vec![(0, slice(20, 10, 21, 0))]);
        // Abandoned blocks go to garbage at once, known ones are left alone.
        fs.run(Op::AbandonBlocks {
            blocks: vec![new_block(30, 4), new_block(21, 10)],
        })
        .unwrap();
        assert_eq!(garbage_ids(&fs), vec![30]);
        assert!(block(&fs.kv, 21).unwrap().is_some());
    }

    #[test]
    fn blockd_registration_keeps_the_operator_state() {
        let mut fs = Fs::new();
        fs.run(Op::RegisterBlockd {
            id: "a".into(),
            address: "h:1".into(),
            filesystem: "h:5".into(),
        })
        .unwrap();
        fs.run(Op::SetBlockdState {
            id: "a".into(),
            state: Some(BlockdState::Decommissioning),
        })
        .unwrap();
        fs.run(Op::RegisterBlockd {
            id: "a".into(),
            address: "h:2".into(),
            filesystem: "h:5".into(),
        })
        .unwrap();
        let all = blockds(&fs.kv).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].1.address.as_str(), all[0].1.state),
            ("h:2", BlockdState::Decommissioning)
        );
        fs.run(Op::SetBlockdState {
            id: "a".into(),
            state: None,
        })
        .unwrap();
        assert!(blockds(&fs.kv).unwrap().is_empty());
        assert!(fs
            .run(Op::SetBlockdState {
                id: "a".into(),
                state: None
            })
            .is_err());
        match fs.run(Op::SetReplication {
            name: "t".into(),
            replication: 3,
        }) {
            Ok(Reply::Namespace(r)) => assert_eq!(r.replication, 3),
            x => panic!("{x:?}"),
        }
        assert_eq!(namespace_by_name(&fs.kv, "t").unwrap().unwrap().replication, 3);
        assert!(fs
            .run(Op::SetReplication {
                name: "t".into(),
                replication: 0
            })
            .is_err());
    }

    #[test]
    fn compaction_applies_only_to_the_version_it_read() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let mut fragmented = Vec::new();
        for i in 0..(COMPACT_AT_SLICES as u64 + 1) {
            let id = 100 + i;
            fragmented = commit(
                &mut fs,
                f,
                vec![new_block(id, 1)],
                vec![(0, slice(2 * i as u32, 1, id, 0))],
            )
            .1;
        }
        assert_eq!(fragmented, vec![0]);
        let version = chunks(&fs, f)[0].1.version;
        let compact = |version| Op::CompactChunk {
            ns,
            ino: f,
            chunk: 0,
            version,
            block: new_block(999, 300),
            slices: vec![slice(0, 300, 999, 0)],
        };
        // Another write moved the chunk on: the compaction is refused and its block is garbage.
        commit(&mut fs, f, vec![new_block(50, 1)], vec![(0, slice(1, 1, 50, 0))]);
        assert_eq!(fs.run(compact(version)), Ok(Reply::Compacted { applied: false }));
        assert!(garbage_ids(&fs).contains(&999));
        let version = chunks(&fs, f)[0].1.version;
        let mut op = compact(version);
        if let Op::CompactChunk { block, slices, .. } = &mut op {
            block.block_id = 1000;
            slices[0].block_id = 1000;
        }
        assert_eq!(fs.run(op), Ok(Reply::Compacted { applied: true }));
        assert_eq!(chunks(&fs, f)[0].1.slices, vec![slice(0, 300, 1000, 0)]);
        let g = garbage_ids(&fs);
        assert!((100..100 + COMPACT_AT_SLICES as u64 + 1).all(|id| g.contains(&id)) && g.contains(&50));
    }

    /// Every block a chunk refers to is in the block table with a reference
    /// count equal to the slices that use it, and nothing else is there.
    fn check_refs(fs: &Fs) {
        let ns = fs.ns;
        let mut used: BTreeMap<u64, u64> = BTreeMap::new();
        let chunk_tag = keys::chunk_prefix(ns, 0)[..6].to_vec();
        for (_, v) in fs.kv.scan(&chunk_tag, None, usize::MAX).unwrap() {
            let c: ChunkRec = decode("chunk", &v).unwrap();
            assert!(!c.slices.is_empty(), "an empty chunk record is stored");
            for s in c.slices.iter().filter(|s| !s.is_zero()) {
                *used.entry(s.block_id).or_insert(0) += 1;
            }
        }
        let block_tag = keys::BLOCKS.to_vec();
        let mut table: BTreeMap<u64, u64> = BTreeMap::new();
        for (k, v) in fs.kv.scan(&block_tag, None, usize::MAX).unwrap() {
            let b: BlockInfo = decode("block", &v).unwrap();
            table.insert(keys::be_u64_at(&k, keys::BLOCK_ID_OFFSET).unwrap(), b.refs);
        }
        assert_eq!(
            used, table,
            "block references (left: counted from chunks, right: the block table)"
        );
        let g = garbage_ids(fs);
        for id in table.keys() {
            assert!(!g.contains(id), "block {id} is both referenced and garbage");
        }
    }

    #[test]
    fn block_references_stay_exact_under_random_changes() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let cs = 1u64 << 20;
        let mut seed = 99u64;
        let mut rnd = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n.max(1)
        };
        let mut next_block = 1000u64;
        for round in 0..3000 {
            match rnd(10) {
                0..=5 => {
                    // A packed block shared by a few slices in up to 3 chunks.
                    next_block += 1;
                    let id = next_block;
                    let n = 1 + rnd(5);
                    let mut slices = Vec::new();
                    let mut off = 0u32;
                    for _ in 0..n {
                        let len = 1 + rnd(300_000) as u32;
                        let pos = rnd(cs - len as u64) as u32;
                        slices.push((rnd(3), slice(pos, len, id, off)));
                        off += len;
                    }
                    commit(&mut fs, f, vec![new_block(id, off as u64)], slices);
                }
                6 => {
                    let size = rnd(3 * cs);
                    fs.run(Op::SetAttr {
                        ns,
                        ino: f,
                        mode: None,
                        uid: None,
                        gid: None,
                        size: Some(size),
                        atime: None,
                        mtime: None,
                        ctime: None,
                    })
                    .unwrap();
                }
                7 => {
                    let (off, len) = (rnd(3 * cs), 1 + rnd(cs));
                    fs.run(Op::Fallocate {
                        ns,
                        ino: f,
                        mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        offset: off,
                        len,
                    })
                    .unwrap();
                }
                _ => {
                    // Compact a chunk into one block (content not modelled here).
                    let cs_ = chunks(&fs, f);
                    if let Some((index, c)) = cs_.get(rnd(cs_.len() as u64) as usize).cloned() {
                        next_block += 1;
                        let data = slices::data_ranges(&c.slices);
                        let mut out = Vec::new();
                        let mut off = 0;
                        for (a, b) in data {
                            out.push(slice(a, b - a, next_block, off));
                            off += b - a;
                        }
                        let version = if rnd(4) == 0 { c.version + 1 } else { c.version };
                        fs.run(Op::CompactChunk {
                            ns,
                            ino: f,
                            chunk: index,
                            version,
                            block: new_block(next_block, off.max(1) as u64),
                            slices: out,
                        })
                        .unwrap();
                    }
                }
            }
            check_refs(&fs);
            let _ = round;
        }
        fs.run(Op::Unlink {
            ns,
            parent: ROOT_INO,
            name: b"f".to_vec(),
            keep_if_open: false,
        })
        .unwrap();
        check_refs(&fs);
    }

    #[test]
    fn fallocate_extends_punches_and_refuses_other_modes() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let fa = |fs: &mut Fs, mode, offset, len| {
            fs.run(Op::Fallocate {
                ns,
                ino: f,
                mode,
                offset,
                len,
            })
        };
        match fa(&mut fs, 0, 100, 1000) {
            Ok(Reply::Attr(a)) => assert_eq!(a.size, 1100),
            other => panic!("{other:?}"),
        }
        match fa(&mut fs, FALLOC_FL_KEEP_SIZE, 0, 5000) {
            Ok(Reply::Attr(a)) => assert_eq!(a.size, 1100),
            other => panic!("{other:?}"),
        }
        assert!(matches!(fa(&mut fs, 0x10, 0, 10), Err(FsError::NotSupported(_))));
        assert!(matches!(fa(&mut fs, 0, 0, 0), Err(FsError::InvalidArgument(_))));
        commit(&mut fs, f, vec![new_block(7, 1100)], vec![(0, slice(0, 1100, 7, 0))]);
        fa(&mut fs, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 20).unwrap();
        let c = chunks(&fs, f);
        assert_eq!(slices::data_ranges(&c[0].1.slices), vec![(0, 10), (30, 1100)]);
        // Punching everything leaves no chunk and frees the block.
        fa(&mut fs, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 1 << 30).unwrap();
        assert!(chunks(&fs, f).is_empty());
        assert_eq!(garbage_ids(&fs), vec![7]);
        assert_eq!(fs.attr(f).size, 1100);
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

    #[test]
    fn record_member_keeps_a_sorted_set() {
        let mut fs = Fs::new();
        assert!(seen_members(&fs.kv).unwrap().is_empty());
        for id in [3, 1, 3, 2] {
            fs.run(Op::RecordMember { id }).unwrap();
        }
        assert_eq!(
            seen_members(&fs.kv).unwrap(),
            vec![1, 2, 3],
            "recorded once each, in order"
        );
    }

    /// Applies `op` from `client` at log time `now`, as a client with
    /// replies up to `acked_below` and a 10 s session timeout.
    fn run_at(fs: &mut Fs, client: u64, seq: u64, acked_below: u64, now: i64, op: Op) -> ApplyResult {
        let cmd = Command {
            client_id: client,
            seq,
            acked_below,
            now_ns: now,
            session_ns: 10_000,
            op,
        };
        fs.run_stamped(cmd).map(strip_dirs)
    }

    fn expire(fs: &mut Fs, now: i64) {
        let cmd = Command {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            now_ns: now,
            session_ns: 0,
            op: Op::ExpireSessions,
        };
        let mut t = Txn::new(&fs.kv);
        apply_command(&mut t, &cmd).unwrap().unwrap();
        let w = t.into_writes();
        fs.kv.apply(w);
    }

    /// An exclusive create of a regular file `name` in the root.
    fn create_in_root(ns: u32, name: &[u8]) -> Op {
        Op::Mknod {
            ns,
            parent: ROOT_INO,
            name: name.to_vec(),
            mode: S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        }
    }

    #[test]
    fn a_batch_applies_each_command_as_its_own_entry() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let root = ROOT_INO;
        let mk = |name: &[u8]| create_in_root(ns, name);
        let cmd = |client: u64, seq: u64, op: Op| Command {
            client_id: client,
            seq,
            acked_below: 0,
            now_ns: 5_000,
            session_ns: 10_000,
            op,
        };
        let batch = Command {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            now_ns: 5_000,
            session_ns: 0,
            op: Op::Batch {
                cmds: vec![
                    cmd(1, 1, mk(b"a")),
                    // Another client's create of the same name fails alone.
                    cmd(2, 1, mk(b"a")),
                    cmd(1, 2, mk(b"b")),
                    // A retry of client 1's first call, in the same entry:
                    // the saved reply, not a second create (or EEXIST).
                    cmd(1, 1, mk(b"a")),
                    cmd(
                        3,
                        1,
                        Op::Batch {
                            cmds: vec![cmd(3, 2, mk(b"c"))],
                        },
                    ),
                ],
            },
        };
        let mut t = Txn::new(&fs.kv);
        let r = apply_command(&mut t, &batch).unwrap().map(strip_dirs);
        let w = t.into_writes();
        fs.kv.apply(w);
        let Ok(Reply::Batch(each)) = r else { panic!("{r:?}") };
        assert_eq!(each.len(), 5);
        let Ok(Reply::Attr(a)) = &each[0] else {
            panic!("{:?}", each[0])
        };
        assert_eq!(each[1], Err(FsError::AlreadyExists));
        assert!(matches!(each[2], Ok(Reply::Attr(_))));
        assert_eq!(each[3], each[0], "a retry gets the saved reply");
        assert!(matches!(each[4], Err(FsError::Internal(_))), "no nesting");
        assert_eq!(lookup(&fs.kv, ns, root, b"a").unwrap().ino, a.ino);
        assert!(lookup(&fs.kv, ns, root, b"c").is_err());
        // Each command left its own saved reply, as a lone entry would.
        assert_eq!(replies_of(&fs, 1), 2);
        assert_eq!(replies_of(&fs, 2), 1);
        // A later retry, in an entry of its own, gets the same answer.
        assert_eq!(run_at(&mut fs, 2, 1, 0, 6_000, mk(b"a")), Err(FsError::AlreadyExists));
    }

    fn replies_of(fs: &Fs, client: u64) -> usize {
        fs.kv
            .scan(&keys::session_reply(client, 0)[..9], None, usize::MAX)
            .unwrap()
            .len()
    }

    #[test]
    fn a_session_opens_with_the_first_call_and_an_unknown_one_is_refused() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let ka = Op::KeepAlive { close: false };
        // A client that has had replies, but whose session metad does not
        // know, must not have its calls applied (its retries could not be
        // recognised).
        assert_eq!(
            run_at(&mut fs, 42, 5, 5, 2_000, ka.clone()),
            Err(FsError::SessionExpired)
        );
        assert!(session(&fs.kv, 42).unwrap().is_none());
        assert!(
            run_at(&mut fs, 42, 1, 1, 2_000, ka.clone()).is_ok(),
            "first call opens it"
        );
        let s = session(&fs.kv, 42).unwrap().expect("session");
        assert_eq!(s.expires_ns, 12_000);
        let mk = Op::Mknod {
            ns,
            parent: ROOT_INO,
            name: b"a".to_vec(),
            mode: S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        };
        assert!(run_at(&mut fs, 42, 2, 2, 9_000, mk).is_ok());
        assert_eq!(
            session(&fs.kv, 42).unwrap().expect("session").expires_ns,
            19_000,
            "a call renews the session"
        );
        expire(&mut fs, 18_999);
        assert!(session(&fs.kv, 42).unwrap().is_some(), "not expired before its time");
        expire(&mut fs, 19_001);
        assert!(session(&fs.kv, 42).unwrap().is_none(), "expired after");
        assert_eq!(replies_of(&fs, 42), 0, "its reply table is gone");
        assert!(!fs
            .kv
            .scan(keys::SESSION_EXPIRY, None, 10)
            .unwrap()
            .iter()
            .any(|(k, _)| k.ends_with(&42u64.to_be_bytes())));
        assert_eq!(
            run_at(&mut fs, 42, 3, 3, 20_000, ka),
            Err(FsError::SessionExpired),
            "an expired client is told so"
        );
    }

    #[test]
    fn renewals_are_written_a_few_times_per_timeout_not_per_call() {
        let mut fs = Fs::new();
        let ka = Op::KeepAlive { close: false };
        run_at(&mut fs, 9, 1, 1, 2_000, ka.clone()).unwrap();
        run_at(&mut fs, 9, 2, 2, 3_000, ka.clone()).unwrap();
        assert_eq!(
            session(&fs.kv, 9).unwrap().unwrap().expires_ns,
            12_000,
            "moved by less than a quarter"
        );
        run_at(&mut fs, 9, 3, 3, 5_000, ka).unwrap();
        assert_eq!(session(&fs.kv, 9).unwrap().unwrap().expires_ns, 15_000);
        let entries = fs.kv.scan(keys::SESSION_EXPIRY, None, 10).unwrap();
        assert_eq!(
            entries.iter().filter(|(k, _)| k.ends_with(&9u64.to_be_bytes())).count(),
            1,
            "one index entry"
        );
    }

    #[test]
    fn an_ended_session_releases_the_files_it_kept_open() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let mk = |name: &[u8]| create_in_root(ns, name);
        let unlink = |name: &[u8]| Op::Unlink {
            ns,
            parent: ROOT_INO,
            name: name.to_vec(),
            keep_if_open: true,
        };
        let ino_of = |r: ApplyResult| match r {
            Ok(Reply::Attr(a)) => a.ino,
            other => panic!("{other:?}"),
        };
        // Client 1 closes cleanly; client 2 crashes and expires.
        let a = ino_of(run_at(&mut fs, 1, 1, 1, 1_000, mk(b"a")));
        let b = ino_of(run_at(&mut fs, 2, 1, 1, 1_000, mk(b"b")));
        assert!(matches!(
            run_at(&mut fs, 1, 2, 2, 1_000, unlink(b"a")),
            Ok(Reply::Unlinked { orphaned: true, .. })
        ));
        assert!(matches!(
            run_at(&mut fs, 2, 2, 2, 1_000, unlink(b"b")),
            Ok(Reply::Unlinked { orphaned: true, .. })
        ));
        run_at(&mut fs, 1, 3, 3, 2_000, Op::KeepAlive { close: true }).unwrap();
        assert!(get_inode(&fs.kv, ns, a).is_err(), "closing the session released a");
        assert!(session(&fs.kv, 1).unwrap().is_none());
        assert_eq!(replies_of(&fs, 1), 0);
        assert!(get_inode(&fs.kv, ns, b).is_ok(), "b is still open on client 2");
        expire(&mut fs, 50_000);
        assert!(get_inode(&fs.kv, ns, b).is_err(), "expiry released b");
        assert!(fs.kv.scan(b"O", None, 10).unwrap().is_empty(), "no owner records left");
    }

    #[test]
    fn a_day_long_client_and_a_hundred_thousand_short_ones_leave_bounded_tables() {
        let mut fs = Fs::new();
        let ka = Op::KeepAlive { close: false };
        let second = 1_000_000_000i64;
        let (mut now, mut long_seq) = (2 * second, 0u64);
        for i in 0..100_000u64 {
            now += second;
            // The long-lived client: a call a second for 28 hours, each
            // acknowledging the one before.
            long_seq += 1;
            run_at(&mut fs, 1, long_seq, long_seq, now, ka.clone()).unwrap();
            // A short-lived client (a `jfs fs` run killed before it could
            // close its session): two calls, then silence.
            let short = 1_000 + i;
            run_at(&mut fs, short, 1, 1, now, ka.clone()).unwrap();
            run_at(&mut fs, short, 2, 2, now, ka.clone()).unwrap();
            expire(&mut fs, now);
        }
        let sessions = fs.kv.scan(b"Y", None, usize::MAX).unwrap().len();
        // Short sessions live 10 µs of log time here (run_at's timeout), so
        // only the long one and the latest short one can remain.
        assert!(sessions <= 3, "{sessions} sessions left");
        assert!(
            replies_of(&fs, 1) <= 1,
            "the long client's replies are trimmed as it acknowledges them"
        );
        let replies = fs.kv.scan(b"S", None, usize::MAX).unwrap().len();
        assert!(replies <= 4, "{replies} saved replies left");
    }

    #[test]
    fn byte_range_locks_conflict_split_and_go_with_their_session() {
        let mut fs = Fs::new();
        let ns = fs.ns;
        let f = fs.ino(ROOT_INO, "f", S_IFREG | 0o644);
        let lk = |owner: u64, typ: u32, start: u64, end: u64| Op::SetLock {
            ns,
            ino: f,
            owner,
            pid: 1,
            typ,
            start,
            end,
        };
        // Client 1 owner 10 write-locks 0..=99; client 2 cannot overlap it.
        run_at(&mut fs, 1, 1, 1, 2_000, lk(10, LOCK_WRITE, 0, 99)).unwrap();
        assert_eq!(
            run_at(&mut fs, 2, 1, 1, 2_000, lk(20, 0, 50, 60)),
            Err(FsError::WouldBlock)
        );
        // Another owner on the same client conflicts too (another process).
        assert_eq!(
            run_at(&mut fs, 1, 2, 2, 2_000, lk(11, 0, 99, 99)),
            Err(FsError::WouldBlock)
        );
        run_at(&mut fs, 2, 2, 2, 2_000, lk(20, LOCK_WRITE, 100, 199)).unwrap();
        // Unlocking the middle splits the owner's lock in two.
        run_at(&mut fs, 1, 3, 3, 2_000, lk(10, LOCK_UNLOCK, 40, 59)).unwrap();
        let held = locks_of(&fs.kv, ns, f).unwrap();
        let mine: Vec<(u64, u64)> = held
            .iter()
            .filter(|l| l.client == 1)
            .map(|l| (l.start, l.end))
            .collect();
        assert_eq!(mine, vec![(0, 39), (60, 99)]);
        assert!(lock_conflict(&held, 2, 20, true, 40, 59).is_none(), "the hole is free");
        // Read locks share.
        run_at(&mut fs, 1, 4, 4, 2_000, lk(10, 0, 300, 400)).unwrap();
        run_at(&mut fs, 2, 3, 3, 2_000, lk(20, 0, 350, 450)).unwrap();
        // Client 1's session ends: its locks go, client 2's stay.
        run_at(&mut fs, 1, 5, 5, 2_000, Op::KeepAlive { close: true }).unwrap();
        let held = locks_of(&fs.kv, ns, f).unwrap();
        assert!(held.iter().all(|l| l.client == 2), "{held:?}");
        assert_eq!(held.len(), 2);
        assert!(fs.kv.scan(&keys::lock_holder_prefix(1), None, 10).unwrap().is_empty());
    }
}
