//! Ends the sessions of clients that went silent.
//!
//! Expiry itself is decided in the state machine from log time
//! (`Op::ExpireSessions`), so every replica ends the same sessions at the
//! same entry; this task only proposes that op once a second on the leader.
//! A new leader first waits one session timeout (the longest any client may
//! use): clients that were cut off by the failover or by a lost quorum get
//! that long to be heard again before their sessions, replies and locks go.

use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::raft_types::{Command, Op, Raft};

pub async fn run(raft: Raft, grace: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut leading_since: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            leading_since = None;
            continue;
        }
        let since = match leading_since {
            Some((term, at)) if term == m.current_term => at,
            _ => {
                leading_since = Some((m.current_term, Instant::now()));
                continue;
            }
        };
        if since.elapsed() < grace {
            continue;
        }
        let cmd = Command {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            now_ns: crate::service::now_ns(),
            session_ns: 0,
            op: Op::ExpireSessions,
        };
        if let Err(e) = raft.client_write(cmd).await {
            tracing::debug!("could not propose session expiry: {e}");
        }
    }
}
