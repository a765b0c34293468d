//! When this node may start an election.
//!
//! openraft 0.9 has no pre-vote: a node campaigns when its timer says so,
//! even with a log it must know is behind. A node that lost its campaign
//! still raised the term everyone else must follow, and the up-to-date node
//! that would have won waits another timeout. Measured: a node restarted
//! just before the leader died campaigned first and lost twice, and the
//! failover took 3.8 s instead of about 1 s.
//!
//! So elections are enabled only while
//! * the restart quiet period is over (a restarted node has forgotten when
//!   it last heard a leader, whose lease may still run; see `lease`), and
//! * no peer that answers has a longer log, by Raft's vote order (last term,
//!   then last index). Such a node would get no vote from that peer; the
//!   peer (or another) is the one to campaign, and this node votes for it.
//!
//! Peers that do not answer do not count, so a node alone with a dead
//! cluster still campaigns (and fails, as it must, for lack of a quorum).
//!
//! The gate also breaks split votes. openraft 0.9 draws each node's election
//! timeout once, at start-up, and ticks every 1.5 heartbeats; two nodes whose
//! draws land in the same tick campaign together after every lost round. Seen
//! in CI: the two survivors of a killed leader split three rounds in a row,
//! 5 ms apart each time, and the failover took 3 s instead of 1. So each time
//! this node becomes a candidate it holds its *next* campaign back for a fresh
//! random time in [E/2, 3E/2) (E = the election timeout); the campaign under
//! way is not touched and can still win.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use openraft::ServerState;
use tonic::transport::{Channel, Endpoint};

use jfs_common::rpc::{meta_client::MetaClient, StatusRequest};

use crate::raft_network::LeaderContact;
use crate::raft_store::SmView;
use crate::raft_types::{NodeId, Raft};

/// How often the gate looks at its peers. Elections take ~1 s; a node that
/// caught up is let campaign within this much.
const EVERY: Duration = Duration::from_millis(100);
/// A peer slower than this to answer `Status` does not count.
const ASK_TIMEOUT: Duration = Duration::from_millis(300);

/// The random hold after each campaign this node starts (see the module doc).
struct SplitVoteBackoff {
    election_timeout: Duration,
    /// The term of the last candidacy a hold was drawn for.
    term: Option<u64>,
    until: Option<Instant>,
}

impl SplitVoteBackoff {
    /// Draws a new hold when the metrics show a candidacy not seen before;
    /// returns whether one was drawn.
    fn note(&mut self, state: ServerState, term: u64) -> bool {
        if state != ServerState::Candidate || self.term == Some(term) {
            return false;
        }
        let e = self.election_timeout.as_millis() as u64;
        let hold = rand::thread_rng().gen_range(e / 2..e + e / 2 + 1);
        self.term = Some(term);
        self.until = Some(Instant::now() + Duration::from_millis(hold));
        tracing::debug!(term, hold_ms = hold, "campaigning; the next campaign waits");
        true
    }

    fn holding(&self) -> bool {
        self.until.is_some_and(|t| Instant::now() < t)
    }
}

/// The gate's state between rounds.
struct Gate {
    raft: Raft,
    metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, crate::raft_types::MetaNode>>,
    backoff: SplitVoteBackoff,
    /// What the `elect` switch was last set to.
    enabled: Option<bool>,
}

impl Gate {
    fn set(&mut self, allow: bool) {
        if self.enabled != Some(allow) {
            self.raft.runtime_config().elect(allow);
            // Followers trail the leader by an entry now and then, so this
            // flips often while all is well: debug level.
            tracing::debug!(allow, "campaigning {}", if allow { "allowed" } else { "held back" });
            self.enabled = Some(allow);
        }
    }

    /// Reads the latest metrics; a new candidacy switches campaigning off at
    /// once, before openraft's next tick could start another.
    fn observe(&mut self) -> ServerState {
        let (state, term) = {
            let m = self.metrics.borrow_and_update();
            (m.state, m.current_term)
        };
        if self.backoff.note(state, term) {
            self.set(false);
        }
        state
    }

    /// Waits for `fut`, watching for candidacies meanwhile. `None` when Raft
    /// or the node is shutting down.
    async fn watching<T>(
        &mut self,
        fut: impl std::future::Future<Output = T>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                v = &mut fut => return Some(v),
                changed = self.metrics.changed() => {
                    changed.ok()?;
                    self.observe();
                }
                _ = stop.changed() => return None,
            }
        }
    }
}

/// Runs until `stop`: keeps openraft's `elect` switch in line with the rules above.
/// `contact` tells when a leader was last heard: while that is recent
/// (under half the election timeout) no election can start anyway, so peers
/// are not asked.
pub async fn run(
    raft: Raft,
    view: SmView,
    me: NodeId,
    quiet: Duration,
    contact: Arc<LeaderContact>,
    election_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        _ = tokio::time::sleep(quiet) => {}
        _ = stop.changed() => return,
    }
    let idle = election_timeout / 2;
    let mut gate = Gate {
        metrics: raft.metrics(),
        raft: raft.clone(),
        backoff: SplitVoteBackoff {
            election_timeout,
            term: None,
            until: None,
        },
        enabled: None,
    };
    let mut channels: std::collections::HashMap<String, Channel> = Default::default();
    loop {
        let heard = contact.millis_since().is_some_and(|ms| ms < idle.as_millis() as u64);
        if heard && gate.enabled.is_some() {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        // Asking the peers can take ASK_TIMEOUT; a candidacy that starts
        // meanwhile gets its hold at once.
        let Some(allow) = gate
            .watching(may_campaign(&raft, &view, me, &mut channels), &mut stop)
            .await
        else {
            return;
        };
        let state = gate.observe();
        gate.set(state == ServerState::Leader || (allow && !gate.backoff.holding()));
        if gate.watching(tokio::time::sleep(EVERY), &mut stop).await.is_none() {
            return;
        }
    }
}

async fn may_campaign(
    raft: &Raft,
    view: &SmView,
    me: NodeId,
    channels: &mut std::collections::HashMap<String, Channel>,
) -> bool {
    let m = raft.metrics().borrow().clone();
    if m.state == ServerState::Leader {
        return true;
    }
    let Ok(mine) = view.last_log_id() else {
        return true;
    };
    let mine = mine.map_or((0, 0), |l| (l.leader_id.term, l.index));
    let mut asks = Vec::new();
    for (id, node) in m.membership_config.membership().nodes() {
        if *id == me {
            continue;
        }
        let ch = match channels.get(&node.rpc_addr) {
            Some(ch) => ch.clone(),
            None => {
                let Ok(ep) = Endpoint::from_shared(format!("http://{}", node.rpc_addr)) else {
                    continue;
                };
                let ch = jfs_common::tls::channel(ep.connect_timeout(ASK_TIMEOUT), jfs_common::tls::Role::Metad);
                channels.insert(node.rpc_addr.clone(), ch.clone());
                ch
            }
        };
        asks.push(async move {
            tokio::time::timeout(ASK_TIMEOUT, MetaClient::new(ch).status(StatusRequest::default())).await
        });
    }
    for answer in futures::future::join_all(asks).await {
        if let Ok(Ok(st)) = answer {
            let st = st.into_inner();
            if (st.last_log_term, st.last_log_index) > mine {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hold_per_candidacy_within_half_to_one_and_a_half_timeouts() {
        let e = Duration::from_millis(600);
        let mut b = SplitVoteBackoff {
            election_timeout: e,
            term: None,
            until: None,
        };
        assert!(!b.note(ServerState::Follower, 3));
        assert!(!b.holding());
        let before = Instant::now();
        assert!(b.note(ServerState::Candidate, 4));
        let until = b.until.expect("a hold was drawn");
        assert!(until >= before + e / 2 && until <= Instant::now() + e * 3 / 2);
        assert!(b.holding());
        // The same candidacy seen again keeps its hold; the next term draws anew.
        assert!(!b.note(ServerState::Candidate, 4));
        assert_eq!(b.until, Some(until));
        assert!(b.note(ServerState::Candidate, 5));
    }
}
