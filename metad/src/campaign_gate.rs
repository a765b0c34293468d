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

use std::sync::Arc;
use std::time::Duration;

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

/// Runs until `stop`: keeps openraft's `elect` switch in line with the rules above.
/// `contact` tells when a leader was last heard: while that is recent
/// (under `idle`) no election can start anyway, so peers are not asked.
pub async fn run(
    raft: Raft,
    view: SmView,
    me: NodeId,
    quiet: Duration,
    contact: Arc<LeaderContact>,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        _ = tokio::time::sleep(quiet) => {}
        _ = stop.changed() => return,
    }
    let mut channels: std::collections::HashMap<String, Channel> = Default::default();
    let mut enabled: Option<bool> = None;
    loop {
        let heard = contact.millis_since().is_some_and(|ms| ms < idle.as_millis() as u64);
        if heard && enabled.is_some() {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let allow = may_campaign(&raft, &view, me, &mut channels).await;
        if enabled != Some(allow) {
            raft.runtime_config().elect(allow);
            // Followers trail the leader by an entry now and then, so this
            // flips often while all is well: debug level.
            tracing::debug!(allow, "campaigning {}", if allow { "allowed" } else { "held back" });
            enabled = Some(allow);
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
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
