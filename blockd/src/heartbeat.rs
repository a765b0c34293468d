//! Heartbeats to the metad leader, and the commands that come back in the replies.
//!
//! Every `blockd.heartbeat-interval-ms` the blockd tells the leader who it is (a random id made
//! once and kept in DATA/blockd_id), where it listens, its space and block count, the cluster it
//! belongs to and the highest leader term it has seen. The leader is found by trying the
//! configured metad addresses in turn and following "not leader" hints.
//!
//! The first reply binds the data directory to the cluster (DATA/cluster_id). Commands are
//! executed only from the cluster this directory belongs to and only from a leader whose term is
//! at least the highest one seen (DATA/term, fsynced before any command of a newer term runs), so
//! a deposed leader cannot delete blocks.
//!
//! Each heartbeat also carries the incremental block report (see [`crate::report`]). Commands
//! are deletes (run before the next heartbeat, so their outcome rides on it), block copies (run
//! in the background by [`Replicator`]) and a request for a full block report, sent in pieces
//! with the Meta `BlockReport` call to the leader that asked.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jfs_common::rpc::meta_client::MetaClient;
use jfs_common::rpc::{BlockReportReply, BlockReportRequest, HeartbeatReply, HeartbeatRequest, ReplicateBlock};
use jfs_common::{FsError, FsResult, MAX_MESSAGE_BYTES};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::block_store::{io_error, run_blocking, BlockStore, Space};
use crate::replicate::Replicator;
use crate::report::Report;

const BLOCKD_ID_FILE: &str = "blockd_id";
const CLUSTER_ID_FILE: &str = "cluster_id";
const TERM_FILE: &str = "term";

/// How long one heartbeat call may take before the next metad is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the leader may take over one piece of a full block report.
const REPORT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most block ids in one piece of a full block report.
pub const REPORT_PIECE_IDS: usize = 50_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First retry delay after a failed round; doubles up to the heartbeat interval.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Writes `dir/name` so that it holds either the old or the new contents after a crash.
fn write_file_durably(dir: &Path, name: &str, contents: &str) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn read_optional(path: &Path) -> FsResult<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(format!("cannot read {}", path.display()), e)),
    }
}

/// The blockd's durable identity and fencing state, kept in the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    dir: PathBuf,
    pub blockd_id: String,
    pub cluster_id: Option<String>,
    pub highest_term: u64,
}

/// The commands of one heartbeat reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commands {
    pub delete: Vec<u64>,
    pub replicate: Vec<ReplicateBlock>,
    pub full_report: bool,
}

/// What to do with one heartbeat reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Execute these commands (possibly none).
    Execute(Commands),
    /// The reply comes from another cluster than the one this data directory belongs to.
    WrongCluster { ours: String, theirs: String },
    /// The reply comes from a leader older than one already seen: a deposed leader.
    StaleTerm { reply_term: u64, highest: u64 },
}

impl NodeState {
    /// Loads the state from `dir`, creating the blockd id on first start (blocking).
    pub fn load(dir: &Path) -> FsResult<NodeState> {
        let id_path = dir.join(BLOCKD_ID_FILE);
        let blockd_id = match read_optional(&id_path)? {
            Some(id) if !id.is_empty() => id,
            Some(_) => {
                return Err(FsError::Io(format!(
                    "{} is empty; it holds this blockd's identity. If the directory holds no blocks, delete the file and restart",
                    id_path.display()
                )))
            }
            None => {
                let id = format!("{:032x}", rand::random::<u128>());
                write_file_durably(dir, BLOCKD_ID_FILE, &format!("{id}\n"))
                    .map_err(|e| io_error(format!("cannot write {}", id_path.display()), e))?;
                info!(blockd_id = %id, "generated a new blockd id");
                id
            }
        };
        let cluster_id = read_optional(&dir.join(CLUSTER_ID_FILE))?.filter(|s| !s.is_empty());
        let term_path = dir.join(TERM_FILE);
        let highest_term = match read_optional(&term_path)? {
            None => 0,
            Some(s) => s.parse::<u64>().map_err(|_| {
                FsError::Io(format!(
                    "{} holds {s:?}, not a number; it records the highest metad leader term this blockd has seen. \
                     Restore it, or delete it to accept commands from the current leader",
                    term_path.display()
                ))
            })?,
        };
        Ok(NodeState {
            dir: dir.to_path_buf(),
            blockd_id,
            cluster_id,
            highest_term,
        })
    }

    /// Decides whether the reply's commands may run, persisting a first cluster id and a newer
    /// term before saying yes (blocking: it may fsync).
    pub fn judge(&mut self, reply: &HeartbeatReply) -> FsResult<Verdict> {
        let theirs = reply.cluster_id.trim();
        match &self.cluster_id {
            Some(ours) if ours != theirs => {
                return Ok(Verdict::WrongCluster {
                    ours: ours.clone(),
                    theirs: theirs.to_string(),
                });
            }
            Some(_) => {}
            None if theirs.is_empty() => {}
            None => {
                write_file_durably(&self.dir, CLUSTER_ID_FILE, &format!("{theirs}\n"))
                    .map_err(|e| io_error(format!("cannot write {}", self.dir.join(CLUSTER_ID_FILE).display()), e))?;
                info!(cluster_id = %theirs, "joined cluster");
                self.cluster_id = Some(theirs.to_string());
            }
        }
        if reply.term < self.highest_term {
            return Ok(Verdict::StaleTerm {
                reply_term: reply.term,
                highest: self.highest_term,
            });
        }
        if reply.term > self.highest_term {
            write_file_durably(&self.dir, TERM_FILE, &format!("{}\n", reply.term))
                .map_err(|e| io_error(format!("cannot write {}", self.dir.join(TERM_FILE).display()), e))?;
            self.highest_term = reply.term;
        }
        Ok(Verdict::Execute(Commands {
            delete: reply.delete_blocks.clone(),
            replicate: reply.replicate.clone(),
            full_report: reply.send_full_report,
        }))
    }
}

/// Something that can send heartbeats and block reports to one metad address (a seam for
/// tests). Clones share connections; a full report runs on its own clone.
pub trait MetaCaller: Clone + Send + 'static {
    fn call(
        &mut self,
        addr: &str,
        req: HeartbeatRequest,
    ) -> impl std::future::Future<Output = Result<HeartbeatReply, FsError>> + Send;

    fn block_report(
        &mut self,
        addr: &str,
        req: BlockReportRequest,
    ) -> impl std::future::Future<Output = Result<BlockReportReply, FsError>> + Send;
}

/// gRPC connections to metad nodes, made lazily and kept.
#[derive(Default, Clone)]
pub struct GrpcCaller {
    clients: HashMap<String, MetaClient<Channel>>,
}

impl GrpcCaller {
    fn client(&mut self, addr: &str) -> Result<&mut MetaClient<Channel>, FsError> {
        if !self.clients.contains_key(addr) {
            let ep = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| FsError::InvalidArgument(format!("metad address {addr:?} is not host:port: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT);
            let client = MetaClient::new(jfs_common::tls::channel(ep, jfs_common::tls::Role::Metad))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            self.clients.insert(addr.to_string(), client);
        }
        self.clients
            .get_mut(addr)
            .ok_or_else(|| FsError::Internal("metad client vanished".into()))
    }
}

/// Bounds one call; running out counts as the metad being unavailable.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, FsError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(st)) => Err(FsError::from(st)),
        Err(_) => Err(FsError::Unavailable(format!("{what} got no answer within {limit:?}"))),
    }
}

impl MetaCaller for GrpcCaller {
    async fn call(&mut self, addr: &str, req: HeartbeatRequest) -> Result<HeartbeatReply, FsError> {
        let client = self.client(addr)?;
        bounded(CALL_TIMEOUT, "heartbeat", client.heartbeat(req)).await
    }

    async fn block_report(&mut self, addr: &str, req: BlockReportRequest) -> Result<BlockReportReply, FsError> {
        let client = self.client(addr)?;
        bounded(REPORT_CALL_TIMEOUT, "block report", client.block_report(req)).await
    }
}

/// The pieces of one full block report over `blocks` (id ascending, with ages): at most `max`
/// ids each, covering (after, upto] so that together they cover every id, the first from 0 and
/// the last up to u64::MAX. Metad can then tell "not in this piece" from "not reported yet".
pub fn report_pieces<'a>(
    blocks: &'a [(u64, u64)],
    blockd_id: &'a str,
    cluster_id: &'a str,
    report_id: u64,
    max: usize,
) -> impl Iterator<Item = BlockReportRequest> + 'a {
    let max = max.max(1);
    let n = blocks.len().div_ceil(max).max(1);
    (0..n).map(move |k| {
        let part = &blocks[(k * max).min(blocks.len())..((k + 1) * max).min(blocks.len())];
        let after = if k == 0 { 0 } else { blocks[k * max - 1].0 };
        let upto = match part.last() {
            Some(last) if k + 1 < n => last.0,
            _ => u64::MAX,
        };
        BlockReportRequest {
            blockd_id: blockd_id.to_string(),
            report_id,
            after,
            upto,
            block_ids: part.iter().map(|b| b.0).collect(),
            ages_s: part.iter().map(|b| b.1).collect(),
            cluster_id: cluster_id.to_string(),
        }
    })
}

/// Lists every block and sends it to `leader` in pieces. Returns (blocks, pieces) sent; the
/// first failing piece aborts the report (the leader asks again).
pub async fn send_full_report<C: MetaCaller>(
    caller: &mut C,
    leader: &str,
    store: Arc<BlockStore>,
    blockd_id: &str,
    cluster_id: &str,
) -> FsResult<(usize, usize)> {
    let mut blocks = run_blocking(move || store.list()).await?;
    // Id 0 means "zeros" in a chunk map, never a block; a piece starting "after 0" cannot hold it.
    blocks.retain(|b| b.0 != 0);
    let report_id = rand::random::<u64>();
    let mut pieces = 0;
    for piece in report_pieces(&blocks, blockd_id, cluster_id, report_id, REPORT_PIECE_IDS) {
        let upto = piece.upto;
        caller.block_report(leader, piece).await.map_err(|e| match e {
            FsError::Unavailable(m) => FsError::Unavailable(format!("piece {} (ids up to {upto}): {m}", pieces + 1)),
            other => other,
        })?;
        pieces += 1;
    }
    Ok((blocks.len(), pieces))
}

/// Finds and remembers the metad leader.
pub struct LeaderFinder<C> {
    addrs: Vec<String>,
    leader: Option<String>,
    caller: C,
}

impl<C: MetaCaller> LeaderFinder<C> {
    pub fn new(addrs: Vec<String>, caller: C) -> Self {
        LeaderFinder {
            addrs,
            leader: None,
            caller,
        }
    }

    /// Tells every metad but the believed leader that this blockd is alive,
    /// in the background and without waiting: a follower elected later then
    /// places new blocks here at once instead of failing writes with "no
    /// live blockd" until heartbeats reach it. Answers are not used (a
    /// follower says "not leader"), and a hung node only delays its own copy.
    pub fn tell_followers(&self, req: &HeartbeatRequest) {
        let req = HeartbeatRequest {
            liveness_only: true,
            ..req.clone()
        };
        for addr in self.addrs.iter().filter(|a| Some(*a) != self.leader.as_ref()) {
            let (mut caller, addr, req) = (self.caller.clone(), addr.clone(), req.clone());
            tokio::spawn(async move {
                if let Err(e) = caller.call(&addr, req).await {
                    if !matches!(e, FsError::NotLeader { .. }) {
                        debug!(metad = %addr, error = %e, "liveness heartbeat not taken");
                    }
                }
            });
        }
    }

    /// Sends `req` to the leader: the last known one first, then every configured address,
    /// following hints. Returns the leader's address and its reply, or the last error seen.
    /// An error that is not retryable comes from a live leader and is returned at once.
    pub async fn send(&mut self, req: &HeartbeatRequest) -> Result<(String, HeartbeatReply), FsError> {
        let mut queue: std::collections::VecDeque<String> = self.leader.iter().cloned().collect();
        queue.extend(self.addrs.iter().filter(|a| Some(*a) != self.leader.as_ref()).cloned());
        let mut budget = 2 * self.addrs.len() + 2;
        let mut last = FsError::Unavailable("no metad address configured (jfs.namespace.server.rpc-address)".into());
        while let Some(addr) = queue.pop_front() {
            if budget == 0 {
                break;
            }
            budget -= 1;
            match self.caller.call(&addr, req.clone()).await {
                Ok(reply) => {
                    self.leader = Some(addr.clone());
                    return Ok((addr, reply));
                }
                Err(FsError::NotLeader { leader: Some(hint) }) if hint != addr => {
                    debug!(tried = %addr, leader = %hint, "following leader hint");
                    queue.retain(|a| *a != hint);
                    queue.push_front(hint.clone());
                    last = FsError::NotLeader { leader: Some(hint) };
                }
                Err(e) if e.is_retryable() => {
                    debug!(metad = %addr, error = %e, "heartbeat not taken");
                    last = e;
                }
                Err(e) => {
                    self.leader = Some(addr);
                    return Err(e);
                }
            }
        }
        self.leader = None;
        Err(last)
    }
}

/// How the link to metad looks, for logging only when it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Starting,
    Up(String),
    Down,
    Refused(String),
}

pub struct Heartbeat<C> {
    store: Arc<BlockStore>,
    state: NodeState,
    address: String,
    interval: Duration,
    finder: LeaderFinder<C>,
    link: Link,
    last_warning: Option<Verdict>,
    report: Report,
    replicator: Arc<Replicator>,
    /// A full block report is being sent: a leader asking again meanwhile is not answered twice.
    full_report_running: Arc<AtomicBool>,
}

/// Clears the running flag when a full report ends, however it ends.
struct ReportDone(Arc<AtomicBool>);

impl Drop for ReportDone {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<C: MetaCaller> Heartbeat<C> {
    pub fn new(
        store: Arc<BlockStore>,
        state: NodeState,
        address: String,
        interval: Duration,
        finder: LeaderFinder<C>,
        report: Report,
        replicator: Arc<Replicator>,
    ) -> Self {
        Heartbeat {
            store,
            state,
            address,
            interval,
            finder,
            link: Link::Starting,
            last_warning: None,
            report,
            replicator,
            full_report_running: Arc::new(AtomicBool::new(false)),
        }
    }

    fn set_link(&mut self, link: Link, detail: Option<&FsError>) {
        if self.link == link {
            return;
        }
        match (&link, detail) {
            (Link::Up(addr), _) => info!(leader = %addr, "heartbeating to metad leader"),
            (Link::Down, Some(e)) => warn!(
                "cannot reach the metad leader (last error: {e}); blockd keeps serving blocks and keeps retrying. \
                 Check that metad is running and that jfs.namespace.server.rpc-address is right"
            ),
            (Link::Down, None) => warn!("cannot reach the metad leader; retrying"),
            (Link::Refused(m), _) => error!("the metad leader refused this blockd's heartbeat: {m}"),
            (Link::Starting, _) => {}
        }
        self.link = link;
    }

    fn request(&self, space: Space) -> HeartbeatRequest {
        HeartbeatRequest {
            blockd_id: self.state.blockd_id.clone(),
            address: self.address.clone(),
            capacity_bytes: space.capacity_bytes,
            free_bytes: space.free_bytes,
            block_count: self.store.block_count(),
            cluster_id: self.state.cluster_id.clone().unwrap_or_default(),
            highest_term_seen: self.state.highest_term,
            filesystem: crate::block_store::filesystem_identity(self.store.root()),
            ..HeartbeatRequest::default()
        }
    }

    /// One heartbeat round. True when a leader answered it.
    pub async fn beat(&mut self) -> bool {
        let store = Arc::clone(&self.store);
        let space = match run_blocking(move || store.space()).await {
            Ok(s) => s,
            Err(e) => {
                // Still heartbeat: metad must hear that this blockd is alive; it reports no free space.
                warn!("cannot measure the data directory's free space: {e}");
                Space {
                    capacity_bytes: 0,
                    free_bytes: 0,
                }
            }
        };
        // The heartbeat already measures the disk: the gauges ride along.
        metrics::gauge!("jfs_blockd_capacity_bytes").set(space.capacity_bytes as f64);
        metrics::gauge!("jfs_blockd_free_bytes").set(space.free_bytes as f64);
        metrics::gauge!("jfs_blockd_used_bytes").set(space.capacity_bytes.saturating_sub(space.free_bytes) as f64);
        metrics::gauge!("jfs_blockd_blocks").set(self.store.block_count() as f64);
        let mut req = self.request(space);
        self.finder.tell_followers(&req);
        let changes = self.report.outgoing();
        changes.fill(&mut req);
        match self.finder.send(&req).await {
            Ok((leader, reply)) => {
                // Answered, whatever the verdict: these changes have been heard.
                self.report.acknowledge(&changes);
                self.set_link(Link::Up(leader.clone()), None);
                self.handle_reply(&leader, reply).await;
                true
            }
            Err(e) if e.is_retryable() => {
                self.set_link(Link::Down, Some(&e));
                false
            }
            Err(e) => {
                self.set_link(Link::Refused(e.to_string()), Some(&e));
                true
            }
        }
    }

    async fn handle_reply(&mut self, leader: &str, reply: HeartbeatReply) {
        let mut state = self.state.clone();
        let judged = run_blocking(move || {
            let v = state.judge(&reply);
            Ok((state, v))
        })
        .await;
        let verdict = match judged {
            Ok((state, Ok(v))) => {
                self.state = state;
                v
            }
            Ok((_, Err(e))) | Err(e) => {
                error!("cannot record metad state in the data directory, so no command is executed: {e}");
                return;
            }
        };
        match &verdict {
            Verdict::Execute(cmds) => {
                self.last_warning = None;
                if !cmds.delete.is_empty() {
                    self.delete(cmds.delete.clone()).await;
                }
                for r in &cmds.replicate {
                    self.replicator.submit(r.clone());
                }
                if cmds.full_report {
                    self.start_full_report(leader);
                }
            }
            Verdict::WrongCluster { ours, theirs } => {
                if self.last_warning.as_ref() != Some(&verdict) {
                    error!(
                        "this data directory ({}) belongs to cluster {ours:?}, but the metad at the configured addresses \
                         runs cluster {theirs:?}. No command from it is executed. Point --conf at the right cluster, or, if \
                         this disk is meant to join the new cluster, stop this blockd and empty the directory",
                        self.store.root().display()
                    );
                }
                self.last_warning = Some(verdict);
            }
            Verdict::StaleTerm { reply_term, highest } => {
                if self.last_warning.as_ref() != Some(&verdict) {
                    warn!(
                        "ignoring commands from a metad leader of term {reply_term}: a leader of term {highest} was already \
                         seen, so this one has been deposed"
                    );
                }
                self.last_warning = Some(verdict);
            }
        }
    }

    /// Deletes as the leader asked; what is gone (or was never here) goes into the next report.
    async fn delete(&self, ids: Vec<u64>) {
        let store = Arc::clone(&self.store);
        let n = ids.len();
        let result = run_blocking(move || {
            let mut gone = Vec::with_capacity(ids.len());
            let mut failed = Vec::new();
            for id in ids {
                match store.delete(id) {
                    Ok(_) => gone.push(id),
                    Err(e) => failed.push((id, e)),
                }
            }
            Ok((gone, failed))
        })
        .await;
        match result {
            Ok((gone, failed)) => {
                self.report.deleted(gone);
                if failed.is_empty() {
                    debug!(blocks = n, "deleted blocks as metad asked");
                }
                // Not reported: metad keeps asking, and the log says why it does not happen.
                for (id, e) in &failed {
                    warn!(block = id, "cannot delete block as metad asked: {e}");
                }
            }
            Err(e) => warn!("cannot delete blocks as metad asked: {e}"),
        }
    }

    /// Sends a full block report to `leader` in the background, unless one is already on its way.
    fn start_full_report(&self, leader: &str) {
        if self.full_report_running.swap(true, Ordering::AcqRel) {
            debug!("full block report already being sent");
            return;
        }
        let done = ReportDone(Arc::clone(&self.full_report_running));
        let mut caller = self.finder.caller.clone();
        let store = Arc::clone(&self.store);
        let leader = leader.to_string();
        let blockd_id = self.state.blockd_id.clone();
        let cluster_id = self.state.cluster_id.clone().unwrap_or_default();
        tokio::spawn(async move {
            let _done = done;
            let started = Instant::now();
            match send_full_report(&mut caller, &leader, store, &blockd_id, &cluster_id).await {
                Ok((blocks, pieces)) => info!(
                    leader = %leader,
                    blocks,
                    pieces,
                    "sent a full block report to the metad leader in {:?}",
                    started.elapsed()
                ),
                Err(e) => warn!(
                    leader = %leader,
                    "full block report to the metad leader failed: {e}; it will ask for another"
                ),
            }
        });
    }

    /// Heartbeats until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let wait = if self.beat().await {
                backoff = FIRST_BACKOFF;
                self.interval
            } else {
                let w = backoff.min(self.interval);
                backoff = (backoff * 2).min(self.interval);
                w
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn reply(cluster: &str, term: u64, deletes: &[u64]) -> HeartbeatReply {
        HeartbeatReply {
            cluster_id: cluster.into(),
            term,
            delete_blocks: deletes.to_vec(),
            ..HeartbeatReply::default()
        }
    }

    fn exec(deletes: &[u64]) -> Verdict {
        Verdict::Execute(Commands {
            delete: deletes.to_vec(),
            ..Commands::default()
        })
    }

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeState::load(dir.path()).unwrap();
        let b = NodeState::load(dir.path()).unwrap();
        assert_eq!(a.blockd_id.len(), 32);
        assert_eq!(a, b);
        assert_eq!(a.cluster_id, None);
        assert_eq!(a.highest_term, 0);
    }

    #[test]
    fn joins_then_rejects_other_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = NodeState::load(dir.path()).unwrap();
        assert_eq!(s.judge(&reply("c1", 1, &[5])).unwrap(), exec(&[5]));
        assert_eq!(fs::read_to_string(dir.path().join("cluster_id")).unwrap().trim(), "c1");
        let v = s.judge(&reply("c2", 2, &[6])).unwrap();
        assert_eq!(
            v,
            Verdict::WrongCluster {
                ours: "c1".into(),
                theirs: "c2".into()
            }
        );
        // The other cluster's term must not have been recorded.
        assert_eq!(s.highest_term, 1);
        let mut again = NodeState::load(dir.path()).unwrap();
        assert_eq!(again.cluster_id.as_deref(), Some("c1"));
        assert!(matches!(
            again.judge(&reply("c2", 3, &[])).unwrap(),
            Verdict::WrongCluster { .. }
        ));
    }

    #[test]
    fn stale_terms_are_fenced_and_terms_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = NodeState::load(dir.path()).unwrap();
        assert_eq!(s.judge(&reply("c", 7, &[1])).unwrap(), exec(&[1]));
        assert_eq!(s.judge(&reply("c", 7, &[2])).unwrap(), exec(&[2]));
        assert_eq!(
            s.judge(&reply("c", 6, &[3])).unwrap(),
            Verdict::StaleTerm {
                reply_term: 6,
                highest: 7
            }
        );
        let mut s = NodeState::load(dir.path()).unwrap();
        assert_eq!(s.highest_term, 7);
        assert_eq!(
            s.judge(&reply("c", 5, &[3])).unwrap(),
            Verdict::StaleTerm {
                reply_term: 5,
                highest: 7
            }
        );
        assert_eq!(s.judge(&reply("c", 9, &[4])).unwrap(), exec(&[4]));
        assert_eq!(NodeState::load(dir.path()).unwrap().highest_term, 9);
    }

    #[test]
    fn damaged_term_file_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("term"), "garbage").unwrap();
        let e = NodeState::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("term"), "{e}");
    }

    /// A fake quorum: `leader` answers, others answer with a hint (or are down).
    #[derive(Clone, Default)]
    struct Fake {
        leader: String,
        down: Vec<String>,
        hint: bool,
        calls: Vec<String>,
        /// What the leader answers (its term and cluster; "c" and 3 when unset).
        answer: Option<HeartbeatReply>,
        /// The leader takes the heartbeat but its reply is lost.
        lose_replies: bool,
        /// Heartbeats the leader took.
        seen: Arc<Mutex<Vec<HeartbeatRequest>>>,
        /// Report pieces the leader took, and the address they went to.
        reports: Arc<Mutex<Vec<(String, BlockReportRequest)>>>,
        /// The leader refuses report pieces after this many.
        report_fails_after: Option<usize>,
    }

    fn fake(leader: &str, down: &[&str], hint: bool) -> Fake {
        Fake {
            leader: leader.into(),
            down: down.iter().map(|d| d.to_string()).collect(),
            hint,
            ..Fake::default()
        }
    }

    impl MetaCaller for Fake {
        async fn call(&mut self, addr: &str, req: HeartbeatRequest) -> Result<HeartbeatReply, FsError> {
            self.calls.push(addr.to_string());
            if self.down.iter().any(|d| d == addr) {
                return Err(FsError::Unavailable("connection refused".into()));
            }
            if addr == self.leader {
                self.seen.lock().unwrap().push(req);
                if self.lose_replies {
                    return Err(FsError::Unavailable("reply lost".into()));
                }
                return Ok(self.answer.clone().unwrap_or_else(|| reply("c", 3, &[])));
            }
            Err(FsError::NotLeader {
                leader: self.hint.then(|| self.leader.clone()),
            })
        }

        async fn block_report(&mut self, addr: &str, req: BlockReportRequest) -> Result<BlockReportReply, FsError> {
            let mut r = self.reports.lock().unwrap();
            if self.report_fails_after.is_some_and(|n| r.len() >= n) {
                return Err(FsError::Unavailable("leader stepped down".into()));
            }
            r.push((addr.to_string(), req));
            Ok(BlockReportReply {})
        }
    }

    fn addrs() -> Vec<String> {
        vec!["a:1".into(), "b:1".into(), "c:1".into()]
    }

    #[tokio::test]
    async fn follows_leader_hints_and_remembers_the_leader() {
        let fake = fake("c:1", &[], true);
        let mut f = LeaderFinder::new(addrs(), fake);
        let (leader, _) = f.send(&HeartbeatRequest::default()).await.unwrap();
        assert_eq!(leader, "c:1");
        assert_eq!(f.caller.calls, vec!["a:1", "c:1"]);
        f.caller.calls.clear();
        f.send(&HeartbeatRequest::default()).await.unwrap();
        assert_eq!(f.caller.calls, vec!["c:1"]);
    }

    #[tokio::test]
    async fn tries_every_address_without_hints_and_reports_when_all_are_down() {
        let fake = fake("c:1", &["a:1"], false);
        let mut f = LeaderFinder::new(addrs(), fake);
        let (leader, _) = f.send(&HeartbeatRequest::default()).await.unwrap();
        assert_eq!(leader, "c:1");
        assert_eq!(f.caller.calls, vec!["a:1", "b:1", "c:1"]);

        f.caller.down = addrs();
        f.caller.calls.clear();
        let e = f.send(&HeartbeatRequest::default()).await.unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        assert_eq!(f.caller.calls.len(), 3);
    }

    fn store(dir: &tempfile::TempDir) -> Arc<BlockStore> {
        Arc::new(BlockStore::open(&dir.path().join("data")).unwrap())
    }

    fn heartbeat(dir: &tempfile::TempDir, store: &Arc<BlockStore>, fake: Fake) -> (Heartbeat<Fake>, Report) {
        let state = NodeState::load(dir.path()).unwrap();
        let report = Report::default();
        let replicator = Replicator::new(
            Arc::clone(store),
            report.clone(),
            "127.0.0.1:1".into(),
            2,
            Duration::from_secs(5),
        );
        let hb = Heartbeat::new(
            Arc::clone(store),
            state,
            "127.0.0.1:1".into(),
            Duration::from_millis(10),
            LeaderFinder::new(addrs(), fake),
            report.clone(),
            replicator,
        );
        (hb, report)
    }

    #[tokio::test]
    async fn deletes_run_only_for_the_current_leader() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        for id in 1..=3 {
            store.write(id, b"abc").unwrap();
        }
        let (mut hb, report) = heartbeat(&dir, &store, fake("a:1", &[], true));
        hb.handle_reply("a:1", reply("c", 5, &[1, 9])).await;
        assert_eq!(store.block_count(), 2);
        // Deleted, and never here: both are gone as far as metad is concerned.
        assert_eq!(report.outgoing().deleted, vec![1, 9]);
        hb.handle_reply("a:1", reply("c", 4, &[2])).await;
        assert_eq!(store.block_count(), 2, "a deposed leader's delete ran");
        hb.handle_reply("a:1", reply("other", 6, &[2])).await;
        assert_eq!(store.block_count(), 2, "another cluster's delete ran");
        assert_eq!(report.outgoing().deleted, vec![1, 9]);
        assert!(hb.beat().await);
        assert_eq!(hb.state.cluster_id.as_deref(), Some("c"));
    }

    #[tokio::test]
    async fn changes_are_resent_until_a_leader_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        store.write(7, b"abc").unwrap();
        let mut f = fake("a:1", &[], true);
        f.lose_replies = true;
        let seen = Arc::clone(&f.seen);
        let (mut hb, report) = heartbeat(&dir, &store, f);
        report.added(5);
        report.corrupt(6);

        // The last full heartbeat the leader took (liveness-only beats to
        // every metad arrive beside them, from background tasks).
        let last = || {
            seen.lock()
                .unwrap()
                .iter()
                .rev()
                .find(|r| !r.liveness_only)
                .cloned()
                .unwrap()
        };

        assert!(!hb.beat().await, "a lost reply counts as no answer");
        let lost = last();
        assert_eq!((lost.added, lost.corrupt), (vec![5], vec![6]));

        // The resend carries the same changes; the answer asks for a delete.
        hb.finder.caller.lose_replies = false;
        hb.finder.caller.answer = Some(reply("c", 3, &[7]));
        assert!(hb.beat().await);
        let resent = last();
        assert_eq!((resent.added, resent.corrupt), (vec![5], vec![6]));

        // Answered: the changes are gone, and the delete rides on the next heartbeat, once.
        hb.finder.caller.answer = None;
        assert!(hb.beat().await);
        let next = last();
        assert!(next.added.is_empty() && next.corrupt.is_empty(), "{next:?}");
        assert_eq!(next.deleted, vec![7]);
        assert!(hb.beat().await);
        assert!(last().deleted.is_empty());
        assert_eq!(store.block_count(), 0);
    }

    #[test]
    fn report_pieces_cover_every_id_once() {
        let blocks: Vec<(u64, u64)> = (1..=7).map(|i| (i * 10, i)).collect();
        let p: Vec<_> = report_pieces(&blocks, "b", "c", 42, 3).collect();
        let bounds: Vec<(u64, u64)> = p.iter().map(|r| (r.after, r.upto)).collect();
        assert_eq!(bounds, vec![(0, 30), (30, 60), (60, u64::MAX)]);
        assert_eq!(p[1].block_ids, vec![40, 50, 60]);
        assert_eq!(p[1].ages_s, vec![4, 5, 6]);
        assert_eq!(p[2].block_ids, vec![70]);
        assert!(p
            .iter()
            .all(|r| r.report_id == 42 && r.blockd_id == "b" && r.cluster_id == "c"));

        // An exact multiple: the last full piece still runs to the end of the id space.
        let p: Vec<_> = report_pieces(&blocks[..6], "b", "c", 1, 3).collect();
        let bounds: Vec<(u64, u64)> = p.iter().map(|r| (r.after, r.upto)).collect();
        assert_eq!(bounds, vec![(0, 30), (30, u64::MAX)]);

        // No blocks at all is still one piece, which tells metad "nothing here".
        let p: Vec<_> = report_pieces(&[], "b", "c", 1, 3).collect();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].after, p[0].upto, p[0].block_ids.len()), (0, u64::MAX, 0));
    }

    #[tokio::test]
    async fn full_report_goes_to_the_leader_that_asked_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        for id in [0x301u64, 2, 0x100] {
            store.write(id, b"abc").unwrap();
        }
        let f = fake("b:1", &[], true);
        let reports = Arc::clone(&f.reports);
        let (mut hb, _report) = heartbeat(&dir, &store, f);
        let mut ask = reply("c", 5, &[]);
        ask.send_full_report = true;

        // A deposed leader's request is ignored.
        hb.handle_reply("b:1", ask.clone()).await;
        let mut stale = ask.clone();
        stale.term = 4;
        hb.handle_reply("b:1", stale).await;
        let mut other = ask.clone();
        other.cluster_id = "other".into();
        hb.handle_reply("b:1", other).await;
        for _ in 0..200 {
            if !hb.full_report_running.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = reports.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        let (to, piece) = &got[0];
        assert_eq!(to, "b:1");
        assert_eq!(piece.block_ids, vec![2, 0x100, 0x301]);
        assert_eq!(piece.ages_s.len(), 3);
        assert_eq!((piece.after, piece.upto), (0, u64::MAX));
        assert_eq!(piece.cluster_id, "c");
        assert_eq!(piece.blockd_id, hb.state.blockd_id);
    }

    #[tokio::test]
    async fn a_failing_piece_aborts_the_full_report() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        store.write(1, b"abc").unwrap();
        let mut f = fake("b:1", &[], true);
        f.report_fails_after = Some(0);
        let e = send_full_report(&mut f, "b:1", Arc::clone(&store), "b", "c")
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        f.report_fails_after = None;
        assert_eq!(send_full_report(&mut f, "b:1", store, "b", "c").await.unwrap(), (1, 1));
    }

    #[tokio::test]
    async fn replicate_commands_run_only_for_the_current_leader() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let (mut hb, report) = heartbeat(&dir, &store, fake("a:1", &[], true));
        let mut r = reply("c", 5, &[]);
        hb.handle_reply("a:1", r.clone()).await;
        // Nothing listens on port 9: the copy fails and says so in the report.
        r.replicate = vec![ReplicateBlock {
            block_id: 77,
            len: 10,
            sources: vec!["127.0.0.1:9".into()],
        }];
        let mut stale = r.clone();
        stale.term = 4;
        hb.handle_reply("a:1", stale).await;
        assert_eq!(hb.replicator.busy(), 0, "a deposed leader's copy was queued");
        hb.handle_reply("a:1", r).await;
        for _ in 0..500 {
            if !report.outgoing().replicate_failed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(report.outgoing().replicate_failed, vec![77]);
    }
}
