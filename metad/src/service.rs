//! The Meta gRPC service: what clients, blockds and the CLI talk to.
//!
//! Writes become Raft commands stamped with the leader's clock; reads are
//! served only by the leader after a read-index round
//! (`ensure_linearizable`), so an acknowledged change is visible to every
//! later read (DESIGN §5). A follower answers every request with
//! `NotLeader{leader}` so clients can follow.

use std::sync::Arc;

use rand::seq::SliceRandom;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::ServerState;
use tonic::{Request, Response, Status};

use jfs_common::config::Config;
use jfs_common::rpc::{self, meta_server::Meta};
use jfs_common::tls::{self, Identity, Role};
use jfs_common::FsError;

use crate::blockd_registry::{BlockdInfo, BlockdRegistry};
use crate::kv::KvError;
use crate::namespace::{self, NsError};
use crate::proposer::{ProposeError, Proposer};
use crate::raft_store::SmView;
use crate::raft_types::{
    Access, AccessRec, AttrRec, BlockdRec, BlockdState, Command, DirStamp, MetaNode, NamespaceRec, NewBlock, NodeId,
    Op, Raft, Reply, Slice, TimeSet,
};

pub struct MetaService {
    pub raft: Raft,
    /// Client commands go through it, to share log entries (group commit).
    pub proposer: Proposer,
    pub lease: Arc<crate::lease::LeaseTracker>,
    pub lease_duration: std::time::Duration,
    pub view: SmView,
    pub node_id: NodeId,
    pub cfg: Arc<Config>,
    pub blockds: Arc<BlockdRegistry>,
    pub healer: Arc<crate::healer::Healer>,
    pub membership: Arc<crate::membership::Membership>,
    /// When this node last heard from a leader (kept by the Raft service).
    pub leader_contact: Arc<crate::raft_network::LeaderContact>,
    /// The table-store mirror, when this node has it enabled.
    pub mirror: Option<Arc<crate::mirror::Mirror>>,
    /// Where this node serves Prometheus metrics ("" = nowhere).
    pub metrics_address: String,
    /// Grants by namespace id, with the access epoch they were read under.
    pub access_cache: std::sync::Mutex<std::collections::HashMap<u32, (u64, Arc<AccessRec>)>>,
}

type Rpc<T> = Result<Response<T>, Status>;

/// New blocks get fewer copies than the namespace asks for (too few live
/// blockds, or the rest just failed a client). Logged at most once a
/// minute: during an outage every allocation would say it.
fn warn_under_replicated(ns: &str, want: u32, got: usize) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = now_ns().max(0) as u64 / 1_000_000_000;
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(
            namespace = ns,
            replication = want,
            copies = got,
            "new blocks get fewer copies than the namespace's replication: not enough live blockds with free space \
             (start or repair blockds; `jfs metastatus --detail` shows how many are live)"
        );
    }
}

/// The leader's wall clock, as commands carry it (apply keeps it monotonic).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn ts(ns: i64) -> Option<rpc::Timespec> {
    Some(rpc::Timespec::from_nanos(ns as i128))
}

fn storage(e: KvError) -> Status {
    FsError::Internal(e.to_string()).into()
}

fn ns_err(e: NsError) -> Status {
    match e {
        NsError::Fs(e) => e.into(),
        NsError::Storage(e) => storage(e),
    }
}

fn not_leader(leader: Option<&MetaNode>) -> Status {
    FsError::NotLeader {
        leader: leader.map(|n| n.rpc_addr.clone()),
    }
    .into()
}

fn hdr(h: &Option<rpc::ReqHeader>) -> (u64, u64, u64) {
    h.as_ref().map_or((0, 0, 0), |h| (h.client_id, h.seq, h.acked_below))
}

fn attr_to_rpc(a: &AttrRec, blksize: u32) -> rpc::Attr {
    rpc::Attr {
        ino: a.ino,
        mode: a.mode,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        nlink: a.nlink,
        atime: ts(a.atime),
        mtime: ts(a.mtime),
        ctime: ts(a.ctime),
        rdev: a.rdev,
        generation: a.generation,
        blksize,
    }
}

fn ns_to_rpc(r: &NamespaceRec) -> rpc::NamespaceInfo {
    rpc::NamespaceInfo {
        id: r.id,
        name: r.name.clone(),
        block_size: r.block_size,
        replication: r.replication,
        root_ino: r.root_ino,
        recovery_mode: r.recovery_mode,
        ..Default::default()
    }
}

fn time_set(t: &Option<rpc::Timespec>, now: bool) -> Option<TimeSet> {
    if now {
        Some(TimeSet::Now)
    } else {
        t.as_ref().map(|t| TimeSet::At(t.as_nanos() as i64))
    }
}

/// What the kernel is told is the preferred I/O size: large, so `cp` and
/// friends issue big writes, but not beyond FUSE's 1 MiB request size.
const PREFERRED_IO: u32 = 1 << 20;

fn slice_from_rpc(s: Option<&rpc::Slice>) -> Result<Slice, Status> {
    let s = s.ok_or_else(|| Status::from(FsError::InvalidArgument("a chunk slice without its slice".into())))?;
    // Overflow-proof before anything adds pos and len.
    if s.pos.checked_add(s.len).is_none() || s.block_off.checked_add(s.len).is_none() {
        return Err(FsError::InvalidArgument("slice position out of range".into()).into());
    }
    Ok(s.into())
}

/// A block a client stored, its copies named by blockd id. An older client
/// sends only addresses: those are looked up among the known blockds.
fn block_from_rpc(b: rpc::BlockLoc, recs: &[(String, BlockdRec)]) -> NewBlock {
    let replicas = if !b.replica_ids.is_empty() {
        b.replica_ids
    } else {
        b.replicas
            .iter()
            .filter_map(|a| recs.iter().find(|(_, r)| r.address == *a).map(|(id, _)| id.clone()))
            .collect()
    };
    NewBlock {
        block_id: b.block_id,
        len: b.len,
        replicas,
    }
}

/// What a namespace call needs of the caller's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Read,
    Write,
}

/// A request against one namespace: every filesystem call names its
/// namespace by id, and [`MetaService::admit`] checks the caller's grant
/// on it before anything else.
trait NsRequest {
    fn ns(&self) -> u32;
}

macro_rules! ns_requests {
    ($($t:ident),* $(,)?) => {
        $(impl NsRequest for rpc::$t {
            fn ns(&self) -> u32 {
                self.ns
            }
        })*
    };
}

ns_requests!(
    LookupRequest,
    GetAttrRequest,
    SetAttrRequest,
    MknodRequest,
    SymlinkRequest,
    LinkRequest,
    UnlinkRequest,
    RmdirRequest,
    RenameRequest,
    ReleaseOrphanRequest,
    ReadDirRequest,
    ReadLinkRequest,
    SetXattrRequest,
    GetXattrRequest,
    ListXattrRequest,
    RemoveXattrRequest,
    StatFsRequest,
    AllocateBlocksRequest,
    GetChunksRequest,
    CommitSlicesRequest,
    CompactChunkRequest,
    AbandonBlocksRequest,
    FallocateRequest,
    SetLockRequest,
    GetLockRequest,
);

fn unexpected(r: Reply) -> Status {
    FsError::Internal(format!("unexpected reply {r:?}")).into()
}

fn dir_stamps(dirs: Vec<DirStamp>) -> Vec<rpc::DirStamp> {
    dirs.into_iter()
        .map(|d| rpc::DirStamp {
            ino: d.ino,
            before: d.before,
            after: d.after,
        })
        .collect()
}

impl MetaService {
    /// Confirms leadership with a quorum and waits until everything
    /// committed before this moment is applied locally.
    async fn linearizable(&self) -> Result<(), Status> {
        self.membership.check_serving()?;
        if self.lease_read_ok() {
            return Ok(());
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(not_leader(f.leader_node.as_ref())),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(FsError::Unavailable(format!("no quorum: {q}")).into())
            }
            Err(RaftError::Fatal(f)) => Err(FsError::Unavailable(format!("raft stopped: {f}")).into()),
        }
    }

    async fn propose(&self, h: &Option<rpc::ReqHeader>, op: Op) -> Result<Reply, Status> {
        self.membership.check_serving()?;
        let (client_id, seq, acked_below) = hdr(h);
        let session_ns = h.as_ref().map_or(0, |h| {
            (h.session_timeout_ms.min(i64::MAX as u64 / 1_000_000) * 1_000_000) as i64
        });
        let cmd = Command {
            client_id,
            seq,
            acked_below,
            now_ns: now_ns(),
            session_ns,
            op,
        };
        match self.proposer.propose(cmd).await {
            Ok(applied) => applied.map_err(Status::from),
            Err(ProposeError::NotLeader(leader)) => Err(not_leader(leader.as_ref())),
            Err(ProposeError::Refused(e)) => Err(FsError::Internal(e).into()),
            Err(ProposeError::Stopped(e)) => Err(FsError::Unavailable(format!("raft stopped: {e}")).into()),
        }
    }

    fn blockd_recs(&self) -> Result<Vec<(String, BlockdRec)>, Status> {
        namespace::blockds(&self.view).map_err(storage)
    }

    /// Addresses of the blockds behind `ids`, live ones first in random
    /// order (a reader tries them in order: this spreads reads, where the
    /// map's order follows placement and favours one blockd for stretches
    /// of blocks). Unknown ids (removed blockds) are left out. The blockd
    /// table is read only for ids no heartbeat has named (rare: right after
    /// a failover, or a dead blockd), once per call through `recs`.
    fn addresses(&self, ids: &[String], recs: &mut Option<Vec<(String, BlockdRec)>>) -> Result<Vec<String>, Status> {
        let mut out: Vec<(bool, String)> = Vec::with_capacity(ids.len());
        for id in ids {
            let addr = match self.blockds.get(id) {
                Some(b) => b.address,
                None => {
                    if recs.is_none() {
                        *recs = Some(self.blockd_recs()?);
                    }
                    match recs.iter().flatten().find(|(r, _)| r == id) {
                        Some((_, rec)) => rec.address.clone(),
                        None => continue,
                    }
                }
            };
            out.push((!self.blockds.is_live(id), addr));
        }
        out.shuffle(&mut rand::thread_rng());
        out.sort_by_key(|(dead, _)| *dead);
        Ok(out.into_iter().map(|(_, a)| a).collect())
    }

    fn namespace(&self, ns: u32) -> Result<NamespaceRec, Status> {
        let mut rec = namespace::namespace_by_id(&self.view, ns)
            .map_err(storage)?
            .ok_or_else(|| Status::from(FsError::NamespaceNotFound(format!("id {ns}"))))?;
        rec.recovery_mode |= self.in_recovery()?;
        Ok(rec)
    }

    /// The cluster is in recovery mode: every namespace is read-only.
    fn in_recovery(&self) -> Result<bool, Status> {
        Ok(namespace::recovery_state(&self.view)
            .map_err(storage)?
            .is_some_and(|r| r.active()))
    }

    fn ns_info(&self, r: &NamespaceRec) -> Result<rpc::NamespaceInfo, Status> {
        let mut info = ns_to_rpc(r);
        info.recovery_mode |= self.in_recovery()?;
        let acl = namespace::namespace_access(&self.view, r.id).map_err(storage)?;
        info.grants = acl
            .grants
            .iter()
            .map(|(p, a)| rpc::NamespaceGrant {
                principal: p.clone(),
                read_only: *a == Access::ReadOnly,
            })
            .collect();
        Ok(info)
    }

    /// The unwrapped request, if the caller's grant on its namespace allows
    /// `need`.
    fn admit<T: NsRequest>(&self, req: Request<T>, need: Need) -> Result<T, Status> {
        let who = tls::caller(&req);
        let r = req.into_inner();
        self.check_access(who.as_deref(), r.ns(), need)?;
        Ok(r)
    }

    /// What the caller may do in namespace `ns`: `Ok(None)` without limits,
    /// `Ok(Some(access))` by its grant, an error with none.
    ///
    /// Only client certificates are limited by grants: an admin certificate
    /// is the operator's, and without TLS nobody is authenticated, so there
    /// is no name to look up (DECISIONS: grants need TLS).
    fn access_of(&self, who: Option<&Identity>, ns: u32) -> Result<Option<Access>, Status> {
        let Some(id) = who.filter(|id| id.role == Role::Client) else {
            return Ok(None);
        };
        let acl = self.grants(ns)?;
        match acl.for_client(&id.name) {
            Some(a) => Ok(Some(a)),
            None => Err(FsError::AccessDenied(format!(
                "client certificate {:?} is not granted namespace {:?}; an operator can allow it with \
                 `jfs admin namespace grant {} {}`",
                id.name,
                self.ns_name(ns),
                self.ns_name(ns),
                id.name
            ))
            .into()),
        }
    }

    /// Namespace `ns`'s grants, from memory while no grant has changed
    /// since they were read (see `SmView::access_epoch`).
    fn grants(&self, ns: u32) -> Result<Arc<AccessRec>, Status> {
        let epoch = self.view.access_epoch();
        if let Some((e, rec)) = self.access_cache.lock().unwrap_or_else(|e| e.into_inner()).get(&ns) {
            if *e == epoch {
                return Ok(rec.clone());
            }
        }
        let rec = Arc::new(namespace::namespace_access(&self.view, ns).map_err(storage)?);
        self.access_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ns, (epoch, rec.clone()));
        Ok(rec)
    }

    fn check_access(&self, who: Option<&Identity>, ns: u32, need: Need) -> Result<(), Status> {
        match (self.access_of(who, ns)?, need) {
            (Some(Access::ReadOnly), Need::Write) => {
                let name = who.map_or("", |id| id.name.as_str());
                Err(FsError::GrantReadOnly(format!(
                    "client certificate {name:?} has a read-only grant on namespace {:?}",
                    self.ns_name(ns)
                ))
                .into())
            }
            _ => Ok(()),
        }
    }

    /// A namespace's name for messages (its id if it has none).
    fn ns_name(&self, ns: u32) -> String {
        match namespace::namespace_by_id(&self.view, ns) {
            Ok(Some(r)) => r.name,
            _ => format!("id {ns}"),
        }
    }

    /// The mirror and recovery fields of `Status`.
    fn mirror_and_recovery_status(&self) -> Result<rpc::NodeStatus, Status> {
        let mut st = rpc::NodeStatus::default();
        if let Some(m) = &self.mirror {
            let s = m.status();
            st.mirror_enabled = s.enabled;
            st.mirror_synced = s.synced;
            st.mirror_shipped_index = s.shipped;
            st.mirror_lag_entries = s.lag_entries;
            st.mirror_lag_ms = s.lag_ms;
            st.mirror_backlog = s.backlog;
            st.mirror_state = s.state;
            st.mirror_error = s.last_error;
            st.mirror_table = s.table;
            st.mirror_owner = s.owner;
            st.mirror_epoch = s.epoch;
        }
        if let Some(r) = namespace::recovery_state(&self.view).map_err(storage)? {
            st.recovery_state = if r.left {
                "LEFT"
            } else if r.finished {
                "FINISH"
            } else {
                "RUNNING"
            }
            .into();
            st.recovery_restored = r.restored;
            st.recovery_total = r.total;
        }
        Ok(st)
    }

    fn attr_reply(&self, r: Reply) -> Rpc<rpc::AttrReply> {
        let (r, dirs) = r.split_dirs();
        match r {
            Reply::Attr(a) => Ok(Response::new(rpc::AttrReply {
                attr: Some(attr_to_rpc(&a, PREFERRED_IO)),
                dirs: dir_stamps(dirs),
            })),
            other => Err(unexpected(other)),
        }
    }

    fn unlink_reply(&self, r: Reply) -> Rpc<rpc::UnlinkReply> {
        let (r, dirs) = r.split_dirs();
        match r {
            Reply::Unlinked { ino, orphaned, attr } => Ok(Response::new(rpc::UnlinkReply {
                ino,
                orphaned,
                attr: attr.as_ref().map(|a| attr_to_rpc(a, PREFERRED_IO)),
                dirs: dir_stamps(dirs),
            })),
            Reply::Ok => Ok(Response::new(rpc::UnlinkReply::default())),
            other => Err(unexpected(other)),
        }
    }

    /// A leader holding a lease, that has applied an entry of its own term
    /// (so everything committed before it took over is applied), can read
    /// its state machine directly: every acknowledged write was applied here
    /// before it was acknowledged.
    fn lease_read_ok(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.state != ServerState::Leader || m.current_leader != Some(self.node_id) {
            return false;
        }
        if m.last_applied.is_none_or(|l| l.leader_id.term != m.current_term) {
            return false;
        }
        let configs: Vec<Vec<u64>> = m
            .membership_config
            .membership()
            .get_joint_config()
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect();
        self.lease
            .valid(self.node_id, m.current_term, &configs, self.lease_duration)
    }

    /// Puts a heartbeat into the registry; a blockd that was dead or unknown
    /// is asked for a full report (what it holds may have changed).
    fn record_alive(&self, r: &rpc::HeartbeatRequest, draining: bool) {
        if !self.blockds.is_live(&r.blockd_id) {
            self.healer.returned(&r.blockd_id);
        }
        self.blockds.heartbeat(BlockdInfo {
            id: r.blockd_id.clone(),
            address: r.address.clone(),
            capacity: r.capacity_bytes,
            free: r.free_bytes,
            filesystem: r.filesystem.clone(),
            block_count: r.block_count,
            draining,
            last_seen: std::time::Instant::now(),
        });
    }

    /// Records that a blockd is alive without taking its reports or handing
    /// it commands. Every node keeps this view, so a newly elected leader
    /// can place blocks before the first heartbeat of its term arrives. A
    /// follower answers "not leader" so the blockd keeps looking for one.
    fn note_alive(&self, r: &rpc::HeartbeatRequest) -> Rpc<rpc::HeartbeatReply> {
        let cluster_id = namespace::cluster_id(&self.view).map_err(storage)?;
        let same_cluster = r.cluster_id.is_empty() || cluster_id.as_deref().is_none_or(|c| c == r.cluster_id);
        if same_cluster {
            let draining = self
                .blockd_recs()?
                .into_iter()
                .any(|(id, rec)| id == r.blockd_id && rec.state == BlockdState::Decommissioning);
            self.record_alive(r, draining);
        }
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        Ok(Response::new(rpc::HeartbeatReply {
            cluster_id: cluster_id.unwrap_or_default(),
            term: self.raft.metrics().borrow().current_term,
            ..Default::default()
        }))
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    fn leader_node(&self) -> Option<MetaNode> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).cloned()
    }
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn create_namespace(&self, req: Request<rpc::CreateNamespaceRequest>) -> Rpc<rpc::NamespaceInfo> {
        let r = req.into_inner();
        let op = Op::CreateNamespace {
            name: r.name,
            block_size: if r.block_size == 0 {
                self.cfg.block_size
            } else {
                r.block_size
            },
            replication: if r.replication == 0 {
                self.cfg.replication
            } else {
                r.replication
            },
            if_not_exists: r.if_not_exists,
        };
        match self.propose(&r.hdr, op).await? {
            Reply::Namespace(n) => Ok(Response::new(self.ns_info(&n)?)),
            other => Err(unexpected(other)),
        }
    }

    async fn get_namespace(&self, req: Request<rpc::GetNamespaceRequest>) -> Rpc<rpc::NamespaceInfo> {
        self.linearizable().await?;
        let who = tls::caller(&req);
        let name = req.into_inner().name;
        match namespace::namespace_by_name(&self.view, &name).map_err(storage)? {
            Some(n) => {
                // The mount asks this first: a client without a grant is
                // refused here, and one with a read-only grant is told so
                // and mounts read-only.
                let access = self.access_of(who.as_deref(), n.id)?;
                let mut info = self.ns_info(&n)?;
                info.read_only_for_caller = access == Some(Access::ReadOnly);
                Ok(Response::new(info))
            }
            None => Err(FsError::NamespaceNotFound(name).into()),
        }
    }

    async fn list_namespaces(&self, req: Request<rpc::ListNamespacesRequest>) -> Rpc<rpc::ListNamespacesReply> {
        self.linearizable().await?;
        let who = tls::caller(&req);
        let all = namespace::list_namespaces(&self.view).map_err(storage)?;
        let mut namespaces = Vec::with_capacity(all.len());
        for n in &all {
            // A client sees the namespaces it may mount.
            match self.access_of(who.as_deref(), n.id) {
                Ok(access) => {
                    let mut info = self.ns_info(n)?;
                    info.read_only_for_caller = access == Some(Access::ReadOnly);
                    namespaces.push(info);
                }
                Err(e) if e.code() == tonic::Code::PermissionDenied => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Response::new(rpc::ListNamespacesReply { namespaces }))
    }

    async fn lookup(&self, req: Request<rpc::LookupRequest>) -> Rpc<rpc::AttrReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let a = namespace::lookup(&self.view, r.ns, r.parent, &r.name).map_err(ns_err)?;
        self.attr_reply(Reply::Attr(a))
    }

    async fn get_attr(&self, req: Request<rpc::GetAttrRequest>) -> Rpc<rpc::AttrReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let i = namespace::get_inode(&self.view, r.ns, r.ino).map_err(ns_err)?;
        self.attr_reply(Reply::Attr(i.attr(r.ino)))
    }

    async fn set_attr(&self, req: Request<rpc::SetAttrRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::SetAttr {
            ns: r.ns,
            ino: r.ino,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            atime: time_set(&r.atime, r.atime_now),
            mtime: time_set(&r.mtime, r.mtime_now),
            ctime: r.ctime.map(|t| t.as_nanos() as i64),
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.attr_reply(reply)
    }

    async fn mknod(&self, req: Request<rpc::MknodRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::Mknod {
            ns: r.ns,
            parent: r.parent,
            name: r.name,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            rdev: r.rdev,
            exclusive: r.exclusive,
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.attr_reply(reply)
    }

    async fn symlink(&self, req: Request<rpc::SymlinkRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::Symlink {
            ns: r.ns,
            parent: r.parent,
            name: r.name,
            target: r.target,
            uid: r.uid,
            gid: r.gid,
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.attr_reply(reply)
    }

    async fn link(&self, req: Request<rpc::LinkRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::Link {
            ns: r.ns,
            ino: r.ino,
            new_parent: r.new_parent,
            new_name: r.new_name,
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.attr_reply(reply)
    }

    async fn unlink(&self, req: Request<rpc::UnlinkRequest>) -> Rpc<rpc::UnlinkReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::Unlink {
            ns: r.ns,
            parent: r.parent,
            name: r.name,
            keep_if_open: r.keep_if_open,
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.unlink_reply(reply)
    }

    async fn rmdir(&self, req: Request<rpc::RmdirRequest>) -> Rpc<rpc::UnlinkReply> {
        let r = self.admit(req, Need::Write)?;
        let reply = self
            .propose(
                &r.hdr,
                Op::Rmdir {
                    ns: r.ns,
                    parent: r.parent,
                    name: r.name,
                },
            )
            .await?;
        self.unlink_reply(reply)
    }

    async fn rename(&self, req: Request<rpc::RenameRequest>) -> Rpc<rpc::RenameReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::Rename {
            ns: r.ns,
            parent: r.parent,
            name: r.name,
            new_parent: r.new_parent,
            new_name: r.new_name,
            flags: r.flags,
            keep_if_open: r.keep_if_open,
        };
        let (reply, dirs) = self.propose(&r.hdr, op).await?.split_dirs();
        match reply {
            Reply::Renamed { replaced_ino, orphaned } => Ok(Response::new(rpc::RenameReply {
                replaced_ino,
                orphaned,
                dirs: dir_stamps(dirs),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn release_orphan(&self, req: Request<rpc::ReleaseOrphanRequest>) -> Rpc<rpc::UnlinkReply> {
        let r = self.admit(req, Need::Read)?;
        let reply = self.propose(&r.hdr, Op::ReleaseOrphan { ns: r.ns, ino: r.ino }).await?;
        self.unlink_reply(reply)
    }

    async fn read_dir(&self, req: Request<rpc::ReadDirRequest>) -> Rpc<rpc::ReadDirReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
        let listing = namespace::readdir(&self.view, r.ns, r.ino, &r.after, limit, r.plus).map_err(ns_err)?;
        let entries = listing
            .entries
            .into_iter()
            .map(|(name, ent, attr)| rpc::DirEntry {
                name,
                ino: ent.ino,
                kind: ent.kind,
                attr: attr.as_ref().map(|a| attr_to_rpc(a, PREFERRED_IO)),
            })
            .collect();
        Ok(Response::new(rpc::ReadDirReply {
            entries,
            eof: listing.eof,
            dir_ctime: listing.dir_ctime,
        }))
    }

    async fn read_link(&self, req: Request<rpc::ReadLinkRequest>) -> Rpc<rpc::ReadLinkReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let target = namespace::readlink(&self.view, r.ns, r.ino).map_err(ns_err)?;
        Ok(Response::new(rpc::ReadLinkReply { target }))
    }

    async fn set_xattr(&self, req: Request<rpc::SetXattrRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::SetXattr {
            ns: r.ns,
            ino: r.ino,
            name: r.name,
            value: r.value,
            flags: r.flags,
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.attr_reply(reply)
    }

    async fn get_xattr(&self, req: Request<rpc::GetXattrRequest>) -> Rpc<rpc::GetXattrReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let value = namespace::get_xattr(&self.view, r.ns, r.ino, &r.name).map_err(ns_err)?;
        Ok(Response::new(rpc::GetXattrReply { value }))
    }

    async fn list_xattr(&self, req: Request<rpc::ListXattrRequest>) -> Rpc<rpc::ListXattrReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let names = namespace::list_xattr(&self.view, r.ns, r.ino).map_err(ns_err)?;
        Ok(Response::new(rpc::ListXattrReply { names }))
    }

    async fn remove_xattr(&self, req: Request<rpc::RemoveXattrRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let reply = self
            .propose(
                &r.hdr,
                Op::RemoveXattr {
                    ns: r.ns,
                    ino: r.ino,
                    name: r.name,
                },
            )
            .await?;
        self.attr_reply(reply)
    }

    async fn stat_fs(&self, req: Request<rpc::StatFsRequest>) -> Rpc<rpc::StatFsReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let rec = self.namespace(r.ns)?;
        let usage = namespace::usage(&self.view, r.ns).map_err(storage)?;
        let repl = rec.replication.max(1) as u64;
        let (raw_total, raw_free) = self.blockds.raw_space();
        Ok(Response::new(rpc::StatFsReply {
            total_bytes: raw_total / repl,
            used_bytes: usage.bytes,
            free_bytes: raw_free / repl,
            inodes: usage.inodes,
            block_size: rec.block_size,
        }))
    }

    async fn allocate_blocks(&self, req: Request<rpc::AllocateBlocksRequest>) -> Rpc<rpc::AllocateBlocksReply> {
        let r = self.admit(req, Need::Write)?;
        if r.count == 0 || r.count > 1024 {
            return Err(FsError::InvalidArgument("allocate 1..1024 blocks at a time".into()).into());
        }
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        let rec = self.namespace(r.ns)?;
        if rec.recovery_mode {
            return Err(FsError::RecoveryReadOnly.into());
        }
        // Place before allocating ids so a cluster without blockds fails fast.
        let mut placements = Vec::with_capacity(r.count as usize);
        for _ in 0..r.count {
            let p = self.blockds.place(rec.replication as usize, rec.block_size, &r.avoid);
            if p.is_empty() {
                return Err(if self.blockds.live().is_empty() {
                    FsError::Unavailable("no live blockd has reported to the metad leader yet".into())
                } else {
                    FsError::NoSpace("every live blockd is full".into())
                }
                .into());
            }
            if p.len() < rec.replication as usize {
                warn_under_replicated(&rec.name, rec.replication, p.len());
            }
            placements.push(p);
        }
        match self.propose(&r.hdr, Op::AllocateBlocks { count: r.count }).await? {
            Reply::BlockIds { first, count } => {
                let blocks = (0..count as u64)
                    .zip(placements)
                    .map(|(i, placed)| rpc::AllocatedBlock {
                        block_id: first + i,
                        replicas: placed.iter().map(|b| b.address.clone()).collect(),
                        replica_ids: placed.into_iter().map(|b| b.id).collect(),
                    })
                    .collect();
                Ok(Response::new(rpc::AllocateBlocksReply { blocks }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn get_chunks(&self, req: Request<rpc::GetChunksRequest>) -> Rpc<rpc::GetChunksReply> {
        self.linearizable().await?;
        let r = self.admit(req, Need::Read)?;
        let count = if r.count == 0 { 256 } else { r.count.min(4096) as usize };
        let (attr, chunks, blocks) =
            namespace::get_chunks(&self.view.snapshot(), r.ns, r.ino, r.first_index, count).map_err(ns_err)?;
        let mut recs = None;
        let blocks = blocks
            .into_iter()
            .map(|(block_id, b)| {
                Ok(rpc::BlockLoc {
                    block_id,
                    len: b.len,
                    replicas: self.addresses(&b.replicas, &mut recs)?,
                    replica_ids: b.replicas,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(rpc::GetChunksReply {
            attr: Some(attr_to_rpc(&attr, PREFERRED_IO)),
            chunks: chunks
                .into_iter()
                .map(|(index, c)| rpc::Chunk {
                    index,
                    version: c.version,
                    slices: c.slices.iter().map(|s| (*s).into()).collect(),
                })
                .collect(),
            blocks,
        }))
    }

    async fn commit_slices(&self, req: Request<rpc::CommitSlicesRequest>) -> Rpc<rpc::CommitSlicesReply> {
        let r = self.admit(req, Need::Write)?;
        let slices = r
            .slices
            .iter()
            .map(|cs| Ok((cs.chunk, slice_from_rpc(cs.slice.as_ref())?)))
            .collect::<Result<Vec<_>, Status>>()?;
        let recs = if r.new_blocks.iter().any(|b| b.replica_ids.is_empty()) {
            self.blockd_recs()?
        } else {
            Vec::new()
        };
        let op = Op::CommitSlices {
            ns: r.ns,
            ino: r.ino,
            new_blocks: r.new_blocks.into_iter().map(|b| block_from_rpc(b, &recs)).collect(),
            slices,
            mtime: r.mtime.map(|t| t.as_nanos() as i64),
        };
        match self.propose(&r.hdr, op).await? {
            Reply::Committed { attr, fragmented } => Ok(Response::new(rpc::CommitSlicesReply {
                attr: Some(attr_to_rpc(&attr, PREFERRED_IO)),
                fragmented,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn compact_chunk(&self, req: Request<rpc::CompactChunkRequest>) -> Rpc<rpc::CompactChunkReply> {
        let r = self.admit(req, Need::Write)?;
        let recs = self.blockd_recs()?;
        let block = r
            .block
            .map(|b| block_from_rpc(b, &recs))
            .ok_or_else(|| Status::from(FsError::InvalidArgument("compaction without a block".into())))?;
        let slices = r
            .slices
            .iter()
            .map(|s| slice_from_rpc(Some(s)))
            .collect::<Result<Vec<_>, Status>>()?;
        let op = Op::CompactChunk {
            ns: r.ns,
            ino: r.ino,
            chunk: r.chunk,
            version: r.version,
            block,
            slices,
        };
        match self.propose(&r.hdr, op).await? {
            Reply::Compacted { applied } => Ok(Response::new(rpc::CompactChunkReply { applied })),
            other => Err(unexpected(other)),
        }
    }

    async fn abandon_blocks(&self, req: Request<rpc::AbandonBlocksRequest>) -> Rpc<rpc::AbandonBlocksReply> {
        let r = self.admit(req, Need::Write)?;
        if r.blocks.len() > 10_000 {
            return Err(FsError::InvalidArgument("abandon at most 10000 blocks at a time".into()).into());
        }
        let recs = self.blockd_recs()?;
        let blocks = r.blocks.into_iter().map(|b| block_from_rpc(b, &recs)).collect();
        self.propose(&r.hdr, Op::AbandonBlocks { blocks }).await?;
        Ok(Response::new(rpc::AbandonBlocksReply {}))
    }

    async fn fallocate(&self, req: Request<rpc::FallocateRequest>) -> Rpc<rpc::AttrReply> {
        let r = self.admit(req, Need::Write)?;
        let op = Op::Fallocate {
            ns: r.ns,
            ino: r.ino,
            mode: r.mode,
            offset: r.offset,
            len: r.len,
        };
        let reply = self.propose(&r.hdr, op).await?;
        self.attr_reply(reply)
    }

    async fn heartbeat(&self, req: Request<rpc::HeartbeatRequest>) -> Rpc<rpc::HeartbeatReply> {
        let r = req.into_inner();
        if r.blockd_id.is_empty() || r.address.is_empty() {
            return Err(FsError::InvalidArgument("heartbeat without blockd id or address".into()).into());
        }
        if r.liveness_only || !self.is_leader() {
            return self.note_alive(&r);
        }
        self.linearizable().await?;
        let cluster_id = namespace::cluster_id(&self.view)
            .map_err(storage)?
            .ok_or_else(|| Status::from(FsError::Unavailable("cluster id not initialised yet".into())))?;
        if !r.cluster_id.is_empty() && r.cluster_id != cluster_id {
            return Err(FsError::ClusterMismatch(format!(
                "blockd {} at {} belongs to cluster {}, this is cluster {}",
                r.blockd_id, r.address, r.cluster_id, cluster_id
            ))
            .into());
        }
        let term = self.raft.metrics().borrow().current_term;
        // Starts the healer's state afresh in a new term.
        self.healer.warm(term);
        let known = self
            .blockd_recs()?
            .into_iter()
            .find(|(id, _)| *id == r.blockd_id)
            .map(|(_, rec)| rec);
        if known
            .as_ref()
            .is_none_or(|k| k.address != r.address || k.filesystem != r.filesystem)
        {
            let op = Op::RegisterBlockd {
                id: r.blockd_id.clone(),
                address: r.address.clone(),
                filesystem: r.filesystem.clone(),
            };
            self.propose(&None, op).await?;
        }
        let draining = known.is_some_and(|k| k.state == BlockdState::Decommissioning);
        self.record_alive(&r, draining);
        // Record what the blockd reports done before handing out more: a
        // reply that gets lost makes it report the same again.
        let ops = self.healer.on_heartbeat(&r.blockd_id, &r);
        for op in ops {
            self.propose(&None, op).await?;
        }
        let cmds = self.healer.commands(&r.blockd_id).map_err(storage)?;
        Ok(Response::new(rpc::HeartbeatReply {
            cluster_id,
            term,
            delete_blocks: cmds.delete,
            replicate: cmds.replicate,
            send_full_report: cmds.send_full_report,
        }))
    }

    async fn block_report(&self, req: Request<rpc::BlockReportRequest>) -> Rpc<rpc::BlockReportReply> {
        let r = req.into_inner();
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        if r.block_ids.len() > 100_000 || (!r.ages_s.is_empty() && r.ages_s.len() != r.block_ids.len()) {
            return Err(FsError::InvalidArgument(
                "a block report piece holds at most 100000 ids, with one age per id".into(),
            )
            .into());
        }
        if r.after >= r.upto || r.block_ids.iter().any(|&id| id <= r.after || id > r.upto) {
            return Err(FsError::InvalidArgument("block report ids outside the piece's range".into()).into());
        }
        self.linearizable().await?;
        let cluster_id = namespace::cluster_id(&self.view).map_err(storage)?.unwrap_or_default();
        if r.cluster_id != cluster_id {
            return Err(FsError::ClusterMismatch(format!(
                "block report from blockd {} of cluster {:?}, this is cluster {cluster_id:?}",
                r.blockd_id, r.cluster_id
            ))
            .into());
        }
        // While a restore fills the block table in, a block not restored
        // yet would look unknown: judge reports only once it is complete.
        if namespace::recovery_state(&self.view)
            .map_err(storage)?
            .is_some_and(|r| !r.finished)
        {
            return Ok(Response::new(rpc::BlockReportReply {}));
        }
        let ops = self.healer.on_report(&r).map_err(storage)?;
        for op in ops {
            self.propose(&None, op).await?;
        }
        Ok(Response::new(rpc::BlockReportReply {}))
    }

    async fn list_blockds(&self, _req: Request<rpc::ListBlockdsRequest>) -> Rpc<rpc::ListBlockdsReply> {
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        self.linearizable().await?;
        let recs = self.blockd_recs()?;
        let mut listed: std::collections::HashMap<String, u64> = Default::default();
        let mut after = 0;
        loop {
            let page = namespace::blocks_in_range(&self.view, after, u64::MAX, 10_000).map_err(storage)?;
            for (_, b) in &page {
                for r in &b.replicas {
                    *listed.entry(r.clone()).or_default() += 1;
                }
            }
            match page.last() {
                Some((id, _)) if page.len() == 10_000 => after = *id,
                _ => break,
            }
        }
        let blockds = recs
            .into_iter()
            .map(|(id, rec)| {
                let heard = self.blockds.get(&id);
                let live = self.blockds.is_live(&id);
                let n = listed.get(&id).copied().unwrap_or(0);
                let state = match (rec.state, live) {
                    (BlockdState::Decommissioning, _) if n == 0 => "decommissioned",
                    (BlockdState::Decommissioning, _) => "decommissioning",
                    (BlockdState::Normal, true) => "live",
                    (BlockdState::Normal, false) => "dead",
                };
                rpc::BlockdInfo {
                    id: id.clone(),
                    address: heard.as_ref().map_or(rec.address.clone(), |h| h.address.clone()),
                    state: state.into(),
                    capacity_bytes: heard.as_ref().map_or(0, |h| h.capacity),
                    free_bytes: heard.as_ref().map_or(0, |h| h.free),
                    block_count: heard.as_ref().map_or(0, |h| h.block_count),
                    listed_blocks: n,
                    last_heartbeat_ms_ago: heard.map_or(-1, |h| h.last_seen.elapsed().as_millis() as i64),
                }
            })
            .collect();
        Ok(Response::new(rpc::ListBlockdsReply { blockds }))
    }

    async fn set_blockd_state(&self, req: Request<rpc::SetBlockdStateRequest>) -> Rpc<rpc::BlockdInfo> {
        let r = req.into_inner();
        let state = match r.state.as_str() {
            "decommission" => Some(BlockdState::Decommissioning),
            "normal" => Some(BlockdState::Normal),
            "remove" => None,
            other => {
                return Err(FsError::InvalidArgument(format!(
                    "blockd state {other:?}: use decommission, normal or remove"
                ))
                .into())
            }
        };
        if state.is_none() && self.blockds.is_live(&r.id) {
            return Err(FsError::InvalidArgument(format!(
                "blockd {} is alive: decommission it and stop it before removing it",
                r.id
            ))
            .into());
        }
        self.propose(
            &r.hdr,
            Op::SetBlockdState {
                id: r.id.clone(),
                state,
            },
        )
        .await?;
        Ok(Response::new(rpc::BlockdInfo {
            id: r.id,
            state: r.state,
            ..Default::default()
        }))
    }

    async fn fsck(&self, req: Request<rpc::FsckRequest>) -> Rpc<rpc::FsckReply> {
        let r = req.into_inner();
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        self.linearizable().await?;
        let reply = crate::fsck::check(&self.view.snapshot(), &self.blockds, &r).map_err(ns_err)?;
        Ok(Response::new(reply))
    }

    async fn set_replication(&self, req: Request<rpc::SetReplicationRequest>) -> Rpc<rpc::NamespaceInfo> {
        let r = req.into_inner();
        let op = Op::SetReplication {
            name: r.namespace,
            replication: r.replication,
        };
        match self.propose(&r.hdr, op).await? {
            Reply::Namespace(rec) => Ok(Response::new(self.ns_info(&rec)?)),
            other => Err(unexpected(other)),
        }
    }

    async fn set_namespace_access(&self, req: Request<rpc::SetNamespaceAccessRequest>) -> Rpc<rpc::NamespaceInfo> {
        let r = req.into_inner();
        let op = Op::SetNamespaceAccess {
            name: r.namespace,
            principal: r.principal,
            access: match (r.revoke, r.read_only) {
                (true, _) => None,
                (false, true) => Some(Access::ReadOnly),
                (false, false) => Some(Access::ReadWrite),
            },
        };
        match self.propose(&r.hdr, op).await? {
            Reply::Namespace(rec) => Ok(Response::new(self.ns_info(&rec)?)),
            other => Err(unexpected(other)),
        }
    }

    async fn status(&self, req: Request<rpc::StatusRequest>) -> Rpc<rpc::NodeStatus> {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
        };
        let membership = m.membership_config.membership();
        let me = membership.get_node(&self.node_id).cloned().unwrap_or_default();
        let leader = m.current_leader.and_then(|l| membership.get_node(&l).cloned());
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let cluster_id = namespace::cluster_id(&self.view).ok().flatten().unwrap_or_default();
        let last_log = self.view.last_log_id().map_err(|e| FsError::Internal(e.to_string()))?;
        let (digest_index, digest, sessions, saved_replies) = if req.get_ref().digest {
            let view = self.view.clone();
            tokio::task::spawn_blocking(move || {
                let (index, digest) = view.digest().map_err(|e| FsError::Internal(e.to_string()))?;
                let (sessions, replies) = namespace::session_counts(&view).map_err(|e| FsError::Internal(e.0))?;
                Ok::<_, FsError>((index, digest, sessions, replies))
            })
            .await
            .map_err(|e| FsError::Internal(format!("digest task failed: {e}")))??
        } else {
            (0, String::new(), 0, 0)
        };
        Ok(Response::new(rpc::NodeStatus {
            node_id: self.node_id,
            rpc_address: if me.rpc_addr.is_empty() {
                self.cfg
                    .peer(self.node_id)
                    .map(|p| p.rpc_addr.clone())
                    .unwrap_or_default()
            } else {
                me.rpc_addr
            },
            raft_address: me.raft_addr,
            role: role.into(),
            term: m.current_term,
            commit_index: self
                .view
                .committed_index()
                .map_err(|e| FsError::Internal(e.to_string()))?,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            leader_id: m.current_leader.unwrap_or(0),
            leader_address: leader.map(|n| n.rpc_addr).unwrap_or_default(),
            cluster_id,
            voters,
            learners,
            last_log_index: last_log.map_or(0, |l| l.index),
            live_blockds: if role == "leader" {
                self.blockds.live().len() as u32
            } else {
                0
            },
            members: membership.nodes().map(|(_, n)| n.rpc_addr.clone()).collect(),
            seen_members: namespace::seen_members(&self.view).map_err(storage)?,
            last_contact_ms: if role == "leader" {
                m.millis_since_quorum_ack.unwrap_or(0)
            } else {
                self.leader_contact.millis_since().unwrap_or(0)
            },
            digest,
            digest_index,
            last_log_term: last_log.map_or(0, |l| l.leader_id.term),
            sessions,
            saved_replies,
            metrics_address: self.metrics_address.clone(),
            ..self.mirror_and_recovery_status()?
        }))
    }

    async fn mirror_verify(&self, _req: Request<rpc::MirrorVerifyRequest>) -> Rpc<rpc::MirrorVerifyReply> {
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        let Some(m) = &self.mirror else {
            return Err(FsError::InvalidArgument(
                "the table-store mirror is not enabled on this cluster (namespace.backend.raft.async.dynamodb.enabled)"
                    .into(),
            )
            .into());
        };
        let r = m.verify().await.map_err(|e| match e {
            crate::mirror::VerifyError::Retry(e) => FsError::Unavailable(e),
            crate::mirror::VerifyError::Refused(e) => {
                FsError::InvalidArgument(format!("cannot verify the mirror: {e}"))
            }
        })?;
        Ok(Response::new(rpc::MirrorVerifyReply {
            index: r.index,
            rows: r.rows,
            missing: r.missing,
            extra: r.extra,
            different: r.different,
            log_items: r.log_items,
            examples: r.examples,
        }))
    }

    async fn recovery_finish(&self, req: Request<rpc::RecoveryFinishRequest>) -> Rpc<rpc::RecoveryFinishReply> {
        let r = req.into_inner();
        match namespace::recovery_state(&self.view).map_err(storage)? {
            None => {
                return Err(FsError::InvalidArgument(
                    "this cluster is not in recovery mode (it never restored from the table store)".into(),
                )
                .into())
            }
            Some(rec) if rec.left => return Ok(Response::new(rpc::RecoveryFinishReply {})),
            Some(_) => {}
        }
        self.propose(&r.hdr, Op::RecoveryLeave).await?;
        Ok(Response::new(rpc::RecoveryFinishReply {}))
    }

    async fn set_lock(&self, req: Request<rpc::SetLockRequest>) -> Rpc<rpc::SetLockReply> {
        let r = self.admit(req, Need::Read)?;
        let op = Op::SetLock {
            ns: r.ns,
            ino: r.ino,
            owner: r.owner,
            pid: r.pid,
            typ: r.typ,
            start: r.start,
            end: r.end,
        };
        self.propose(&r.hdr, op).await?;
        Ok(Response::new(rpc::SetLockReply {}))
    }

    async fn get_lock(&self, req: Request<rpc::GetLockRequest>) -> Rpc<rpc::GetLockReply> {
        let r = self.admit(req, Need::Read)?;
        self.linearizable().await?;
        let held = namespace::locks_of(&self.view, r.ns, r.ino).map_err(storage)?;
        let write = r.typ == crate::raft_types::LOCK_WRITE;
        Ok(Response::new(
            match namespace::lock_conflict(&held, r.client_id, r.owner, write, r.start, r.end) {
                Some(l) => rpc::GetLockReply {
                    conflict: true,
                    typ: if l.write {
                        crate::raft_types::LOCK_WRITE
                    } else {
                        crate::raft_types::LOCK_READ
                    },
                    start: l.start,
                    end: l.end,
                    pid: l.pid,
                },
                None => rpc::GetLockReply::default(),
            },
        ))
    }

    async fn keep_alive(&self, req: Request<rpc::KeepAliveRequest>) -> Rpc<rpc::KeepAliveReply> {
        let r = req.into_inner();
        if r.hdr.as_ref().is_none_or(|h| h.client_id == 0) {
            return Err(FsError::InvalidArgument("KeepAlive without a client id".into()).into());
        }
        self.propose(&r.hdr, Op::KeepAlive { close: r.close }).await?;
        Ok(Response::new(rpc::KeepAliveReply {}))
    }

    async fn add_member(&self, req: Request<rpc::AddMemberRequest>) -> Rpc<rpc::MembershipReply> {
        let r = req.into_inner();
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        let node = MetaNode {
            raft_addr: r.raft_address,
            rpc_addr: r.rpc_address,
        };
        Ok(Response::new(self.membership.add(r.node_id, node).await?))
    }

    async fn remove_member(&self, req: Request<rpc::RemoveMemberRequest>) -> Rpc<rpc::MembershipReply> {
        let r = req.into_inner();
        if !self.is_leader() {
            return Err(not_leader(self.leader_node().as_ref()));
        }
        Ok(Response::new(self.membership.remove(r.node_id).await?))
    }

    async fn transfer_leader(&self, req: Request<rpc::TransferLeaderRequest>) -> Rpc<rpc::TransferLeaderReply> {
        let r = req.into_inner();
        Ok(Response::new(self.membership.transfer(r.to).await?))
    }

    async fn campaign(&self, req: Request<rpc::CampaignRequest>) -> Rpc<rpc::CampaignReply> {
        let r = req.into_inner();
        self.membership.campaign(r.from_leader, r.term).await?;
        Ok(Response::new(rpc::CampaignReply {}))
    }
}
