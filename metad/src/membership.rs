//! Who the metad nodes are, and changing it online.
//!
//! * Every id that has held log entries is recorded in the state machine
//!   (`Op::RecordMember`). Such a node may have voted and may hold
//!   acknowledged entries, so it must never come back with an empty data
//!   directory under the same id: `main` refuses that, and a lost node is
//!   replaced by a new id (etcd and HDFS's `bootstrapStandby` work the same
//!   way). Ids are never reused.
//! * Adding a node makes it a learner, waits until it has caught up (by
//!   snapshot if the log was purged), then makes it a voter: a new node never
//!   weakens the quorum while it is still empty.
//! * Leadership transfer, which openraft 0.9 lacks: the leader stops taking
//!   requests and sending heartbeats, waits until every follower's leader
//!   lease has run out (they refuse votes until then), and asks the target
//!   to campaign. The target has every entry, so it wins.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};

use jfs_common::rpc::{self, meta_client::MetaClient};
use jfs_common::FsError;

use crate::namespace;
use crate::raft_store::SmView;
use crate::raft_types::{Command, MetaNode, NodeId, Op, Raft};

/// How long a learner may take to catch up before `add` gives up (it keeps
/// catching up; the operator runs the command again).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

pub struct Membership {
    raft: Raft,
    me: NodeId,
    view: SmView,
    /// openraft's leader lease: followers refuse votes this long after they
    /// last heard from the leader.
    lease: Duration,
    /// Node leadership is being handed to (0 = no transfer under way).
    transferring_to: AtomicU64,
}

fn membership_err<E: std::fmt::Display>(e: RaftError<NodeId, E>) -> FsError {
    FsError::Unavailable(format!("membership change failed: {e}"))
}

impl Membership {
    pub fn new(raft: Raft, me: NodeId, view: SmView, lease: Duration) -> Self {
        Membership {
            raft,
            me,
            view,
            lease,
            transferring_to: AtomicU64::new(0),
        }
    }

    /// While a transfer runs the leader serves nothing: a request it
    /// committed would refresh the followers' leases and hold off the
    /// target's election. Clients retry and find the new leader.
    pub fn check_serving(&self) -> Result<(), FsError> {
        match self.transferring_to.load(Ordering::Acquire) {
            0 => Ok(()),
            to => Err(FsError::Unavailable(format!(
                "metad leadership is moving to node {to}; retry in a moment"
            ))),
        }
    }

    fn voters_learners(&self) -> rpc::MembershipReply {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        rpc::MembershipReply {
            voters: mem.voter_ids().collect(),
            learners: mem.learner_ids().collect(),
        }
    }

    /// Adds `id` as a learner, waits until it has caught up, then makes it a
    /// voter. Idempotent: adding a voter again with the same addresses
    /// succeeds.
    pub async fn add(&self, id: NodeId, node: MetaNode) -> Result<rpc::MembershipReply, FsError> {
        if id == 0 || node.rpc_addr.is_empty() || node.raft_addr.is_empty() {
            return Err(FsError::InvalidArgument(
                "a new metad node needs an id above 0, a client (rpc) address and a raft address".into(),
            ));
        }
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership().clone();
        if let Some(have) = mem.get_node(&id) {
            if *have != node {
                return Err(FsError::InvalidArgument(format!(
                    "metad node {id} is already a member at rpc {} / raft {}; remove it first, or use a new id",
                    have.rpc_addr, have.raft_addr
                )));
            }
            if mem.voter_ids().any(|v| v == id) {
                return Ok(self.voters_learners());
            }
        } else {
            let seen = namespace::seen_members(&self.view).map_err(|e| FsError::Internal(e.to_string()))?;
            if seen.contains(&id) {
                return Err(FsError::InvalidArgument(format!(
                    "metad node id {id} was a member before; ids are never reused (its old votes and log could \
                     be counted twice). Start the new node with another --node-id and add that"
                )));
            }
        }
        tracing::info!(node = id, rpc = %node.rpc_addr, raft = %node.raft_addr, "adding metad node as a learner");
        let learner = tokio::time::timeout(CATCH_UP_LIMIT, self.raft.add_learner(id, node, true)).await;
        match learner {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(write_err(e)),
            Err(_) => {
                return Err(FsError::Unavailable(format!(
                    "metad node {id} was added as a learner but has not caught up within {CATCH_UP_LIMIT:?}; \
                     check that it runs and that its raft address is reachable, then run the command again"
                )))
            }
        }
        tracing::info!(node = id, "learner caught up; making it a voter");
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(write_err)?;
        Ok(self.voters_learners())
    }

    /// Removes `id` (voter or learner). Removing a node that is not a
    /// member succeeds, so a retried command is harmless.
    pub async fn remove(&self, id: NodeId) -> Result<rpc::MembershipReply, FsError> {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(FsError::InvalidArgument(format!(
                    "metad node {id} is the only voter; add another node before removing it"
                )));
            }
            tracing::info!(node = id, "removing metad voter");
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(write_err)?;
        } else if mem.get_node(&id).is_some() {
            tracing::info!(node = id, "removing metad learner");
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(write_err)?;
        }
        Ok(self.voters_learners())
    }

    /// Hands leadership to voter `to`; returns once `to` leads.
    pub async fn transfer(&self, to: NodeId) -> Result<rpc::TransferLeaderReply, FsError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(to) {
            return Ok(rpc::TransferLeaderReply {
                leader_id: to,
                term: m.current_term,
            });
        }
        if m.state != ServerState::Leader {
            return Err(FsError::NotLeader {
                leader: m.current_leader.and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.rpc_addr.clone())
                }),
            });
        }
        let target = m
            .membership_config
            .membership()
            .get_node(&to)
            .cloned()
            .filter(|_| m.membership_config.membership().voter_ids().any(|v| v == to))
            .ok_or_else(|| FsError::InvalidArgument(format!("metad node {to} is not a voter; see `jfs metastatus`")))?;
        if self
            .transferring_to
            .compare_exchange(0, to, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(FsError::Unavailable(
                "a leadership transfer is already under way".into(),
            ));
        }
        let rt = self.raft.runtime_config();
        rt.heartbeat(false);
        rt.elect(false);
        let result = self.hand_over(to, &target, m.current_term).await;
        rt.elect(true);
        rt.heartbeat(true);
        self.transferring_to.store(0, Ordering::Release);
        result
    }

    async fn hand_over(&self, to: NodeId, target: &MetaNode, term: u64) -> Result<rpc::TransferLeaderReply, FsError> {
        let started = Instant::now();
        // The target must hold every entry, or it cannot win.
        let caught_up = Instant::now() + Duration::from_secs(5);
        loop {
            let m = self.raft.metrics().borrow().clone();
            let last = m.last_log_index;
            let matched = m.replication.as_ref().and_then(|r| r.get(&to).cloned()).flatten();
            if matched.map(|l| l.index) == last {
                break;
            }
            if Instant::now() > caught_up {
                return Err(FsError::Unavailable(format!(
                    "metad node {to} has not caught up with the leader's log (at {matched:?}, leader at {last:?}); \
                     check it with `jfs admin node state {to}` and try again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // From the last append the followers saw, their leases run out.
        tokio::time::sleep(self.lease + self.lease / 4).await;
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", target.rpc_addr))
            .map_err(|e| FsError::InvalidArgument(format!("bad rpc address of node {to}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2));
        let ch = jfs_common::tls::connect(ep, jfs_common::tls::Role::Metad)
            .await
            .map_err(|e| FsError::Unavailable(format!("cannot reach metad node {to} at {}: {e}", target.rpc_addr)))?;
        MetaClient::new(ch)
            .campaign(rpc::CampaignRequest {
                from_leader: self.me,
                term,
            })
            .await
            .map_err(FsError::from)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow();
                if m.current_leader == Some(to) && m.current_term > term {
                    tracing::info!(to, term = m.current_term, took = ?started.elapsed(), "leadership handed over");
                    return Ok(rpc::TransferLeaderReply {
                        leader_id: to,
                        term: m.current_term,
                    });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, metrics.changed()).await.is_err() {
                return Err(FsError::Unavailable(format!(
                    "metad node {to} was asked to take over but did not win an election within 5 s; \
                     this node ({}) resumes leading if no one else does",
                    self.me
                )));
            }
        }
    }

    /// On the transfer's target: start an election now, if the request
    /// comes from the leader this node follows.
    pub async fn campaign(&self, from_leader: NodeId, term: u64) -> Result<(), FsError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(from_leader) || m.current_term != term {
            return Err(FsError::InvalidArgument(format!(
                "campaign asked by node {from_leader} in term {term}, but this node follows {:?} in term {}",
                m.current_leader, m.current_term
            )));
        }
        tracing::info!(from_leader, term, "leader hands over: campaigning");
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| FsError::Unavailable(format!("raft stopped: {e}")))
    }
}

fn write_err(e: RaftError<NodeId, ClientWriteError<NodeId, MetaNode>>) -> FsError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => FsError::NotLeader {
            leader: f.leader_node.map(|n| n.rpc_addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(p))) => {
            FsError::Unavailable(format!("another membership change is in progress ({p}); retry shortly"))
        }
        other => membership_err(other),
    }
}

/// Leader only: records every node that has acknowledged entries (and the
/// leader itself), so a wiped node can be told apart from a new one.
pub async fn record_seen(raft: Raft, view: SmView, me: NodeId, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            continue;
        }
        let Ok(seen) = namespace::seen_members(&view) else {
            continue;
        };
        let mut holders: Vec<NodeId> = vec![me];
        if let Some(r) = &m.replication {
            holders.extend(r.iter().filter(|(_, matched)| matched.is_some()).map(|(id, _)| *id));
        }
        for id in holders.into_iter().filter(|id| !seen.contains(id)) {
            let cmd = Command {
                client_id: 0,
                seq: 0,
                acked_below: 0,
                now_ns: 0,
                session_ns: 0,
                op: Op::RecordMember { id },
            };
            if let Err(e) = raft.client_write(cmd).await {
                tracing::debug!("cannot record metad node {id} as a member yet: {e}");
                break;
            }
        }
    }
}
