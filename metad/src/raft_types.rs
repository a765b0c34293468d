//! The types Raft replicates: the logical commands in the log and the
//! replies their application produces.
//!
//! A log entry is a *logical* command (`Mknod{parent,name,..}`), stamped by
//! the leader with the time and the client's (id, seq) before it is proposed,
//! so applying it is deterministic on every node.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;

use jfs_common::FsError;
use serde::{Deserialize, Serialize};

/// A metad node as Raft membership stores it: where to reach its Raft
/// service and where clients reach its Meta service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaNode {
    pub raft_addr: String,
    pub rpc_addr: String,
}

impl fmt::Display for MetaNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rpc_addr)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = u64,
        Node = MetaNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MetaNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MetaNode>;

/// One proposed change. `client_id == 0` marks internal commands that are
/// not deduplicated (they are idempotent by construction).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    pub client_id: u64,
    pub seq: u64,
    pub acked_below: u64,
    /// Leader wall clock, nanoseconds since the epoch.
    pub now_ns: i64,
    /// The client's session timeout in nanoseconds (0 for internal commands).
    pub session_ns: i64,
    pub op: Op,
}

/// One byte-range lock, as the lock table of an inode keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRec {
    /// Session (client id) and the kernel's lock owner on that client.
    pub client: u64,
    pub owner: u64,
    pub pid: u32,
    pub write: bool,
    /// Inclusive range.
    pub start: u64,
    pub end: u64,
}

pub const LOCK_READ: u32 = 0;
pub const LOCK_WRITE: u32 = 1;
pub const LOCK_UNLOCK: u32 = 2;

/// A client's session: it lives while the client is heard from at least
/// once per `timeout_ns` of log time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRec {
    pub expires_ns: i64,
    pub timeout_ns: i64,
}

/// A time the caller wants set on an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(i64),
}

pub use jfs_common::slices::Slice;

/// A block as the block table keeps it: which namespace owns it, the
/// blockds (by id) that hold a copy, and how many slices refer to it. At
/// zero references it moves to the garbage table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub ns: u32,
    pub len: u64,
    pub replicas: Vec<String>,
    pub refs: u64,
    /// When metad learnt of it (leader clock): a block report taken just
    /// before cannot be expected to list it.
    pub born_ns: i64,
}

/// A block a client stored on blockds and now hands to metad.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBlock {
    pub block_id: u64,
    pub len: u64,
    /// Blockd ids.
    pub replicas: Vec<String>,
}

/// What the operator asked of a blockd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockdState {
    Normal,
    /// Copy its blocks elsewhere and stop placing new ones on it.
    Decommissioning,
}

/// A blockd as the replicated state knows it: block maps name it by id, and
/// this says where to reach it, right after a failover too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockdRec {
    pub address: String,
    pub filesystem: String,
    pub state: BlockdState,
}

/// One chunk of a file: its slices, oldest first, and a version that every
/// change bumps (compaction commits only if it is unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRec {
    pub version: u64,
    pub slices: Vec<Slice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    InitCluster {
        cluster_id: String,
    },
    CreateNamespace {
        name: String,
        block_size: u64,
        replication: u32,
        if_not_exists: bool,
    },
    Mknod {
        ns: u32,
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        exclusive: bool,
    },
    Symlink {
        ns: u32,
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Link {
        ns: u32,
        ino: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    },
    Unlink {
        ns: u32,
        parent: u64,
        name: Vec<u8>,
        keep_if_open: bool,
    },
    Rmdir {
        ns: u32,
        parent: u64,
        name: Vec<u8>,
    },
    Rename {
        ns: u32,
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
        keep_if_open: bool,
    },
    ReleaseOrphan {
        ns: u32,
        ino: u64,
    },
    SetAttr {
        ns: u32,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeSet>,
        mtime: Option<TimeSet>,
        ctime: Option<i64>,
    },
    SetXattr {
        ns: u32,
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        ns: u32,
        ino: u64,
        name: Vec<u8>,
    },
    AllocateBlocks {
        count: u32,
    },
    /// Appends slices (`(chunk index, slice)`, oldest first) and grows the
    /// size to cover them.
    CommitSlices {
        ns: u32,
        ino: u64,
        new_blocks: Vec<NewBlock>,
        slices: Vec<(u64, Slice)>,
        mtime: Option<i64>,
    },
    /// Replaces a chunk's slices if the chunk is still at `version`.
    CompactChunk {
        ns: u32,
        ino: u64,
        chunk: u64,
        version: u64,
        block: NewBlock,
        slices: Vec<Slice>,
    },
    Fallocate {
        ns: u32,
        ino: u64,
        mode: u32,
        offset: u64,
        len: u64,
    },
    /// Blockd `replica` (an id) has deleted these blocks: drop it from their
    /// garbage entries (an entry goes once no replica is left).
    ForgetGarbage {
        replica: String,
        /// (became garbage at, block id), as `namespace::garbage` lists them.
        blocks: Vec<(i64, u64)>,
    },
    /// A blockd heartbeat with an id or address the table does not have yet.
    RegisterBlockd {
        id: String,
        address: String,
        filesystem: String,
    },
    /// Operator: drain (`Some(Decommissioning)`), cancel (`Some(Normal)`) or
    /// forget (`None`) a blockd.
    SetBlockdState {
        id: String,
        state: Option<BlockdState>,
    },
    /// Healing copied `block` to `blockd`; `drop` are copies on blockds
    /// that are dead, so no longer counted.
    AddReplica {
        block: u64,
        blockd: String,
        drop: Vec<String>,
    },
    /// Copies that are gone (corrupt, missing from a report) or surplus.
    /// Surplus copies still exist and go to the garbage table
    /// (`to_garbage`), so a reader holding an old map keeps its grace period.
    DropReplicas {
        block: u64,
        blockds: Vec<String>,
        to_garbage: bool,
    },
    SetReplication {
        name: String,
        replication: u32,
    },
    /// Blocks a client stored and will never commit: to the garbage table,
    /// due at once, unless the block table knows them.
    AbandonBlocks {
        blocks: Vec<NewBlock>,
    },
    /// Raises the orphan floor: new blocks with smaller ids are no longer
    /// accepted in commits, so unnamed copies of them may be deleted.
    SetOrphanFloor {
        floor: u64,
    },
    /// Metad node `id` has acknowledged log entries: from now on it may have
    /// voted and holds acknowledged writes, so it must never rejoin with an
    /// empty data directory under this id (it is replaced under a new id).
    RecordMember {
        id: u64,
    },
    /// The calling client is alive (renews its session); `close` ends it.
    KeepAlive {
        close: bool,
    },
    /// Ends every session whose expiry (log time) has passed, releasing its
    /// reply table, orphans and locks. Proposed by the leader.
    ExpireSessions,
    /// Takes, changes or releases the calling client's lock `owner` over
    /// [start, end] (POSIX semantics: the new lock replaces what the owner
    /// held there). Fails with `WouldBlock` on a conflict.
    SetLock {
        ns: u32,
        ino: u64,
        owner: u64,
        pid: u32,
        typ: u32,
        start: u64,
        end: u64,
    },
    /// The mirror took its tables under `epoch` (a cluster that later finds
    /// a higher epoch there has lost them to another cluster).
    MirrorOwned {
        epoch: u64,
    },
    /// Recovery: forget every mirrored key (what a fresh cluster made
    /// before the restore) and make every namespace read-only.
    RestoreBegin {
        total: u64,
    },
    /// Recovery: rows read from the table store (`None` deletes), and how
    /// many have been restored with these.
    RestoreRows {
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        restored: u64,
        /// Rows to restore in all (an estimate, for progress).
        total: u64,
    },
    /// Recovery: everything is restored; namespaces stay read-only until
    /// `RecoveryLeave`.
    RestoreFinish,
    /// The operator ends recovery mode: namespaces become writable.
    RecoveryLeave,
    /// Commands of several clients that arrived together, in one log entry
    /// (see `proposer`): applied in order, each as if it were an entry of
    /// its own (own session, own saved reply, own failure), answered with
    /// `Reply::Batch`. Never nested.
    Batch {
        cmds: Vec<Command>,
    },
    /// Grants `principal` (a client certificate name, or `*`) `access` to
    /// namespace `name`; `None` revokes its grant.
    SetNamespaceAccess {
        name: String,
        principal: String,
        access: Option<Access>,
    },
}

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

/// Who may use a namespace: client certificate names and `*` (anyone with
/// a client certificate). Kept under its own key beside the namespace
/// record rather than in it, so records written before grants existed
/// still decode; a namespace without one is open to everyone read-write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRec {
    pub grants: BTreeMap<String, Access>,
}

/// The principal that stands for every client.
pub const EVERYONE: &str = "*";

impl Default for AccessRec {
    fn default() -> Self {
        AccessRec {
            grants: BTreeMap::from([(EVERYONE.to_string(), Access::ReadWrite)]),
        }
    }
}

impl AccessRec {
    /// What client `name` may do: its own grant, else everyone's, else
    /// nothing. A name's own grant wins over `*` either way, so a namespace
    /// open to all read-write can still be read-only to one client.
    pub fn for_client(&self, name: &str) -> Option<Access> {
        self.grants.get(name).or_else(|| self.grants.get(EVERYONE)).copied()
    }
}

/// A grant's principal: a certificate name as `jfs admin cert issue`
/// accepts it (1 to 64 printable characters), or `*`.
pub fn valid_principal(p: &str) -> bool {
    !p.is_empty() && p.chars().count() <= 64 && !p.chars().any(char::is_control)
}

/// Recovery progress, replicated so that every node (and a new leader after
/// a failover) reports the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRec {
    pub finished: bool,
    pub restored: u64,
    pub total: u64,
    /// The operator ended recovery mode: the record stays so that a node
    /// still configured with `recovery.mode = true` never restores again
    /// over newer writes.
    pub left: bool,
}

impl RecoveryRec {
    /// Namespaces are read-only.
    pub fn active(&self) -> bool {
        !self.left
    }
}

impl Op {
    /// Ops whose writes are the restore itself: the mirror does not ship
    /// them back to the tables they came from.
    pub fn is_restore(&self) -> bool {
        matches!(self, Op::RestoreBegin { .. } | Op::RestoreRows { .. })
    }

    /// Ops that change a namespace (refused in recovery mode and on `ro`).
    pub fn namespace(&self) -> Option<u32> {
        use Op::*;
        match self {
            Mknod { ns, .. }
            | Symlink { ns, .. }
            | Link { ns, .. }
            | Unlink { ns, .. }
            | Rmdir { ns, .. }
            | Rename { ns, .. }
            | ReleaseOrphan { ns, .. }
            | SetAttr { ns, .. }
            | SetXattr { ns, .. }
            | RemoveXattr { ns, .. }
            | CommitSlices { ns, .. }
            | CompactChunk { ns, .. }
            | Fallocate { ns, .. } => Some(*ns),
            // Locks change no data: allowed in recovery mode and on `ro`
            // namespaces, as reads are.
            SetLock { .. } => None,
            InitCluster { .. }
            | CreateNamespace { .. }
            | AllocateBlocks { .. }
            | ForgetGarbage { .. }
            | RegisterBlockd { .. }
            | SetBlockdState { .. }
            | AddReplica { .. }
            | DropReplicas { .. }
            | SetReplication { .. }
            | AbandonBlocks { .. }
            | SetOrphanFloor { .. }
            | RecordMember { .. }
            | KeepAlive { .. }
            | ExpireSessions
            | MirrorOwned { .. }
            | RestoreBegin { .. }
            | RestoreRows { .. }
            | RestoreFinish
            | RecoveryLeave
            | SetNamespaceAccess { .. } => None,
            // Each command in it is checked on its own when applied.
            Batch { .. } => None,
        }
    }
}

/// The inode attributes a reply carries (the stored inode, minus the symlink
/// target and parent pointer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrRec {
    pub ino: u64,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRec {
    pub id: u32,
    pub name: String,
    pub block_size: u64,
    pub replication: u32,
    pub root_ino: u64,
    pub recovery_mode: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Attr(AttrRec),
    Unlinked {
        ino: u64,
        orphaned: bool,
        attr: Option<AttrRec>,
    },
    Renamed {
        replaced_ino: u64,
        orphaned: bool,
    },
    Namespace(NamespaceRec),
    BlockIds {
        first: u64,
        count: u32,
    },
    Committed {
        attr: AttrRec,
        /// Chunks left with many slices: worth compacting.
        fragmented: Vec<u64>,
    },
    Compacted {
        applied: bool,
    },
    /// The replies to `Op::Batch`'s commands, in order.
    Batch(Vec<ApplyResult>),
    /// An entry operation's reply with the directories it changed.
    InDirs {
        reply: Box<Reply>,
        dirs: Vec<DirStamp>,
    },
}

impl Reply {
    /// The reply without the directory stamps an entry operation adds.
    pub fn split_dirs(self) -> (Reply, Vec<DirStamp>) {
        match self {
            Reply::InDirs { reply, dirs } => (*reply, dirs),
            r => (r, Vec::new()),
        }
    }
}

/// A directory whose entries one command changed, with its ctime before
/// and after. A directory's ctime moves forward on every change to it, so
/// a client that knew the directory's names at `before` knows them at
/// `after` by applying its own change (client/src/dir_cache.rs); any other
/// `before` means someone else changed it meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStamp {
    pub ino: u64,
    pub before: i64,
    pub after: i64,
}

/// What applying one entry produced; stored per client session so a retry
/// gets the very same answer.
pub type ApplyResult = Result<Reply, FsError>;
