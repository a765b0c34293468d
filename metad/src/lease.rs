//! Leader lease: serving linearizable reads without a quorum round each time.
//!
//! A follower that accepted an AppendEntries from the leader of term T
//! refuses to vote for anyone else for `election_timeout_max` after it
//! received it (openraft's follower-side leader lease). So once a quorum has
//! acknowledged an AppendEntries that the leader *sent* at instant S, no
//! other leader can exist before S + election_timeout_max. We let the leader
//! serve reads locally until S + half the minimum election timeout, a wide
//! margin for clock-rate differences and scheduling delays.
//!
//! Two holes are closed explicitly:
//! * a follower that restarts forgets when it last heard from the leader;
//!   `RaftService` therefore refuses to vote during a quiet period after
//!   start-up as long as the lease (see `vote_quiet_period`);
//! * a leader that was paused (SIGSTOP) computes lease age on a monotonic
//!   clock after it resumes, so its lease has expired and it falls back to
//!   a read-index round, which fails if it has been deposed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::raft_types::NodeId;

#[derive(Default)]
pub struct LeaseTracker {
    /// Per follower: (leader term, send instant) of the newest acknowledged AppendEntries.
    acks: Mutex<HashMap<NodeId, (u64, Instant)>>,
}

impl LeaseTracker {
    pub fn record_ack(&self, target: NodeId, term: u64, sent_at: Instant) {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let e = acks.entry(target).or_insert((term, sent_at));
        if (term, sent_at) > *e {
            *e = (term, sent_at);
        }
    }

    /// The send instant of the AppendEntries that a quorum of `voters`
    /// (this node counting as acknowledged now) has acknowledged in `term`.
    pub fn quorum_ack(&self, me: NodeId, term: u64, voters: &[NodeId], now: Instant) -> Option<Instant> {
        if voters.is_empty() {
            return None;
        }
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let mut times: Vec<Instant> = voters
            .iter()
            .filter_map(|v| {
                if *v == me {
                    Some(now)
                } else {
                    acks.get(v).filter(|(t, _)| *t == term).map(|(_, at)| *at)
                }
            })
            .collect();
        let quorum = voters.len() / 2 + 1;
        if times.len() < quorum {
            return None;
        }
        times.sort_by(|a, b| b.cmp(a));
        Some(times[quorum - 1])
    }

    /// True while a quorum of *every* voter configuration acknowledged this
    /// term less than `lease` ago. During a membership change (joint
    /// consensus) there are two configurations, and a new leader needs a
    /// majority of each, so the lease must hold in each.
    pub fn valid(&self, me: NodeId, term: u64, configs: &[Vec<NodeId>], lease: Duration) -> bool {
        let now = Instant::now();
        !configs.is_empty()
            && configs.iter().all(|voters| {
                self.quorum_ack(me, term, voters, now)
                    .is_some_and(|s| now.saturating_duration_since(s) < lease)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_needs_a_quorum_in_the_current_term() {
        let l = LeaseTracker::default();
        let lease = Duration::from_millis(500);
        let voters = [1, 2, 3];
        let one = |v: &[NodeId]| vec![v.to_vec()];
        assert!(!l.valid(1, 5, &one(&voters), lease), "no acks yet");
        l.record_ack(2, 4, Instant::now());
        assert!(
            !l.valid(1, 5, &one(&voters), lease),
            "an ack from an older term does not count"
        );
        l.record_ack(2, 5, Instant::now());
        assert!(
            l.valid(1, 5, &one(&voters), lease),
            "self + one follower is a quorum of three"
        );
        l.record_ack(3, 5, Instant::now() - Duration::from_secs(10));
        let old = Instant::now() - Duration::from_secs(1);
        let l2 = LeaseTracker::default();
        l2.record_ack(2, 5, old);
        assert!(!l2.valid(1, 5, &one(&voters), lease), "an old ack has expired");
        assert!(
            !l.valid(1, 5, &one(&[1, 2, 3, 4, 5]), lease),
            "five voters need three acks"
        );
        // Joint consensus {1,2,3} -> {1,4,5}: node 2's ack is a quorum of the
        // old configuration only; the new one needs 4 or 5 too.
        let joint = vec![vec![1, 2, 3], vec![1, 4, 5]];
        assert!(!l.valid(1, 5, &joint, lease), "a quorum of the old configuration alone");
        l.record_ack(4, 5, Instant::now());
        assert!(l.valid(1, 5, &joint, lease), "quorums of both configurations");
    }
}
