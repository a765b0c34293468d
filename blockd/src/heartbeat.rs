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

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jfs_common::rpc::meta_client::MetaClient;
use jfs_common::rpc::{HeartbeatReply, HeartbeatRequest};
use jfs_common::{FsError, FsResult, MAX_MESSAGE_BYTES};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::block_store::{io_error, run_blocking, BlockStore, Space};

const BLOCKD_ID_FILE: &str = "blockd_id";
const CLUSTER_ID_FILE: &str = "cluster_id";
const TERM_FILE: &str = "term";

/// How long one heartbeat call may take before the next metad is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
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

/// What to do with one heartbeat reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Execute these deletes (possibly none).
    Execute(Vec<u64>),
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
        Ok(Verdict::Execute(reply.delete_blocks.clone()))
    }
}

/// Something that can send one heartbeat to one metad address (a seam for tests).
pub trait MetaCaller {
    fn call(
        &mut self,
        addr: &str,
        req: HeartbeatRequest,
    ) -> impl std::future::Future<Output = Result<HeartbeatReply, FsError>> + Send;
}

/// gRPC connections to metad nodes, made lazily and kept.
#[derive(Default)]
pub struct GrpcCaller {
    clients: HashMap<String, MetaClient<Channel>>,
}

impl MetaCaller for GrpcCaller {
    async fn call(&mut self, addr: &str, req: HeartbeatRequest) -> Result<HeartbeatReply, FsError> {
        if !self.clients.contains_key(addr) {
            let ep = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| FsError::InvalidArgument(format!("metad address {addr:?} is not host:port: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT);
            let client = MetaClient::new(ep.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            self.clients.insert(addr.to_string(), client);
        }
        let client = self
            .clients
            .get_mut(addr)
            .ok_or_else(|| FsError::Internal("metad client vanished".into()))?;
        match client.heartbeat(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(st) => Err(FsError::from(st)),
        }
    }
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
}

impl<C: MetaCaller> Heartbeat<C> {
    pub fn new(
        store: Arc<BlockStore>,
        state: NodeState,
        address: String,
        interval: Duration,
        finder: LeaderFinder<C>,
    ) -> Self {
        Heartbeat {
            store,
            state,
            address,
            interval,
            finder,
            link: Link::Starting,
            last_warning: None,
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
        let req = self.request(space);
        match self.finder.send(&req).await {
            Ok((leader, reply)) => {
                self.set_link(Link::Up(leader), None);
                self.handle_reply(reply).await;
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

    async fn handle_reply(&mut self, reply: HeartbeatReply) {
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
            Verdict::Execute(ids) => {
                self.last_warning = None;
                if !ids.is_empty() {
                    self.delete(ids.clone()).await;
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

    async fn delete(&self, ids: Vec<u64>) {
        let store = Arc::clone(&self.store);
        let n = ids.len();
        let result = run_blocking(move || {
            let mut failed = Vec::new();
            for id in ids {
                if let Err(e) = store.delete(id) {
                    failed.push((id, e));
                }
            }
            Ok(failed)
        })
        .await;
        match result {
            Ok(failed) if failed.is_empty() => debug!(blocks = n, "deleted blocks as metad asked"),
            Ok(failed) => {
                for (id, e) in &failed {
                    warn!(block = id, "cannot delete block as metad asked: {e}");
                }
            }
            Err(e) => warn!("cannot delete blocks as metad asked: {e}"),
        }
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

    fn reply(cluster: &str, term: u64, deletes: &[u64]) -> HeartbeatReply {
        HeartbeatReply {
            cluster_id: cluster.into(),
            term,
            delete_blocks: deletes.to_vec(),
        }
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
        assert_eq!(s.judge(&reply("c1", 1, &[5])).unwrap(), Verdict::Execute(vec![5]));
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
        assert_eq!(s.judge(&reply("c", 7, &[1])).unwrap(), Verdict::Execute(vec![1]));
        assert_eq!(s.judge(&reply("c", 7, &[2])).unwrap(), Verdict::Execute(vec![2]));
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
        assert_eq!(s.judge(&reply("c", 9, &[4])).unwrap(), Verdict::Execute(vec![4]));
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
    struct Fake {
        leader: String,
        down: Vec<String>,
        hint: bool,
        calls: Vec<String>,
    }

    impl MetaCaller for Fake {
        async fn call(&mut self, addr: &str, _req: HeartbeatRequest) -> Result<HeartbeatReply, FsError> {
            self.calls.push(addr.to_string());
            if self.down.iter().any(|d| d == addr) {
                return Err(FsError::Unavailable("connection refused".into()));
            }
            if addr == self.leader {
                return Ok(reply("c", 3, &[]));
            }
            Err(FsError::NotLeader {
                leader: self.hint.then(|| self.leader.clone()),
            })
        }
    }

    fn addrs() -> Vec<String> {
        vec!["a:1".into(), "b:1".into(), "c:1".into()]
    }

    #[tokio::test]
    async fn follows_leader_hints_and_remembers_the_leader() {
        let fake = Fake {
            leader: "c:1".into(),
            down: vec![],
            hint: true,
            calls: vec![],
        };
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
        let fake = Fake {
            leader: "c:1".into(),
            down: vec!["a:1".into()],
            hint: false,
            calls: vec![],
        };
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

    #[tokio::test]
    async fn deletes_run_only_for_the_current_leader() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(&dir.path().join("data")).unwrap());
        for id in 1..=3 {
            store.write(id, b"abc").unwrap();
        }
        let state = NodeState::load(dir.path()).unwrap();
        let fake = Fake {
            leader: "a:1".into(),
            down: vec![],
            hint: true,
            calls: vec![],
        };
        let mut hb = Heartbeat::new(
            Arc::clone(&store),
            state,
            "127.0.0.1:1".into(),
            Duration::from_millis(10),
            LeaderFinder::new(addrs(), fake),
        );
        hb.handle_reply(reply("c", 5, &[1])).await;
        assert_eq!(store.block_count(), 2);
        hb.handle_reply(reply("c", 4, &[2])).await;
        assert_eq!(store.block_count(), 2, "a deposed leader's delete ran");
        hb.handle_reply(reply("other", 6, &[2])).await;
        assert_eq!(store.block_count(), 2, "another cluster's delete ran");
        assert!(hb.beat().await);
        assert_eq!(hb.state.cluster_id.as_deref(), Some("c"));
    }
}
