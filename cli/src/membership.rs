//! `jfs admin node ...` and `jfs admin failover`: the metad (Raft) group.
//!
//! Membership changes and leadership transfer go to the leader through
//! jfs-client's leader-following `MetaClient` (the server answers "not
//! leader" on followers). Looking at one node (`state`, `health`) asks it
//! directly, like `jfs metastatus`: the node is found among the config
//! file's nodes and the members their answers name.
//!
//! The judgements (health, whether a removal leaves a working majority) are
//! pure functions of `NodeStatus` values, so they are tested without a
//! cluster.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jfs_client::MetaClient;
use jfs_common::config::Config;
use jfs_common::rpc::{self, NodeStatus};
use jfs_common::FsError;

use crate::metastatus::{self, contact_text, digest_text, join_ids, leader_text, NodeReport};
use crate::{CliError, CliResult};

/// Adding waits until the learner has caught up, which for a big namespace
/// means copying a snapshot. (metad gives up one attempt after 120 s; the
/// call is repeated, which is safe, until this runs out.)
const ADD_TIMEOUT: Duration = Duration::from_secs(300);

/// Removal is one membership change (two log entries).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A transfer waits for the followers' leases to run out and an election.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A healthy node is at most this many entries behind the leader's commit index.
pub const MAX_APPLY_LAG: u64 = 1000;

/// A healthy follower heard from the leader less than this many ms ago.
pub const MAX_CONTACT_MS: u64 = 5000;

fn meta_client(cfg: &Config, at_least: Duration) -> MetaClient {
    MetaClient::new(cfg.rpc_addresses.clone(), cfg.client_timeout.max(at_least))
}

/// The server's own words, without the "invalid argument: " / "service
/// unavailable: " prefix when the words are the explanation.
fn reason(e: &FsError) -> String {
    match e {
        FsError::InvalidArgument(m) | FsError::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

fn check_id(what: &str, id: u64) -> CliResult<()> {
    if id == 0 {
        return Err(CliError::Usage(format!(
            "{what} 0: metad node ids start at 1 (see `jfs metastatus --detail` for the ones in use)"
        )));
    }
    Ok(())
}

/// HOST:PORT (or [IPv6]:PORT), port 1..=65535.
pub fn check_host_port(flag: &str, value: &str) -> CliResult<()> {
    let ok = match value.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
                && matches!(port.parse::<u16>(), Ok(p) if p > 0)
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{flag} {value:?}: expected HOST:PORT, e.g. 10.0.0.4:8101 — the same value the new node was \
             started with"
        )))
    }
}

/// `voters 1,3,4; learners -`
pub fn membership_text(voters: &[u64], learners: &[u64]) -> String {
    format!("voters {}; learners {}", join_ids(voters), join_ids(learners))
}

/// The newest leader among the answers, if any.
fn newest_leader(reports: &[NodeReport]) -> Option<&NodeStatus> {
    reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
}

/// The answer of node `id`, and the address it answered at.
fn find_node(reports: &[NodeReport], id: u64) -> Option<(&NodeStatus, &str)> {
    reports.iter().find_map(|r| match &r.status {
        Ok(s) if s.node_id == id => Some((s, r.rpc_addr.as_str())),
        _ => None,
    })
}

/// Why node `id` is not among the answers, after "metad node ID: ": what
/// the cluster (its newest leader, else any node) says of it, and which
/// addresses did not answer. One line.
pub fn not_found_reason(reports: &[NodeReport], id: u64) -> String {
    let answered: Vec<&NodeStatus> = reports.iter().filter_map(|r| r.status.as_ref().ok()).collect();
    let view = newest_leader(reports).or(answered.first().copied());
    let listed = view.filter(|s| s.voters.contains(&id) || s.learners.contains(&id));
    let mut text = match (listed, view) {
        (Some(s), _) => format!(
            "a {} (says node {}), but it does not answer",
            if s.voters.contains(&id) { "voter" } else { "learner" },
            s.node_id
        ),
        (None, Some(s)) => format!(
            "no such node: not a member ({}, says node {})",
            membership_text(&s.voters, &s.learners),
            s.node_id
        ),
        (None, None) => "does not answer, and neither does any other metad node".to_string(),
    };
    let unreachable: Vec<String> = reports
        .iter()
        .filter_map(|r| r.status.as_ref().err().map(|e| format!("{} ({e})", r.rpc_addr)))
        .collect();
    if !unreachable.is_empty() {
        text.push_str(&format!("; no answer from {}", unreachable.join(", ")));
    }
    if listed.is_some() || view.is_none() {
        text.push_str("; check that its jfs-metad runs (its log says why not) and `jfs metastatus`");
    }
    text
}

/// Asks the node at the new node's address who it is: a fast, clear failure
/// when it is not running (metad would otherwise wait minutes for it to
/// catch up) or when the address belongs to another node.
async fn check_new_node(id: u64, rpc: &str, raft: &str) -> CliResult<()> {
    match metastatus::probe(rpc, metastatus::PROBE_TIMEOUT).await {
        Ok(s) if s.node_id == id => Ok(()),
        Ok(s) => Err(CliError::Failed(format!(
            "the metad at {rpc} is node {}, not node {id}: check --rpc-address, or the new node's --node-id",
            s.node_id
        ))),
        Err(e) => Err(CliError::Failed(format!(
            "no metad answers at {rpc} ({e}). Start the new node first, with an empty data directory: \
             `jfs-metad --node-id {id} --rpc-address {rpc} --raft-address {raft} --join <ANY MEMBER's HOST:PORT>`, \
             then run this command again"
        ))),
    }
}

/// AddMember through the leader. When the call fails with a retryable error
/// (typically: still catching up when time ran out), looks at the leader's
/// membership: the node may have become a voter after all.
async fn add_member(cfg: &Config, id: u64, rpc_addr: &str, raft_addr: &str) -> CliResult<rpc::MembershipReply> {
    let req = rpc::AddMemberRequest {
        node_id: id,
        rpc_address: rpc_addr.to_string(),
        raft_address: raft_addr.to_string(),
    };
    let res = meta_client(cfg, ADD_TIMEOUT)
        .call(|mut c| {
            let req = req.clone();
            async move { c.add_member(req).await }
        })
        .await;
    match res {
        Ok(r) => Ok(r),
        Err(e @ FsError::InvalidArgument(_)) => {
            Err(CliError::Failed(format!("cannot add metad node {id}: {}", reason(&e))))
        }
        Err(e) if e.is_retryable() => {
            let reports = metastatus::collect(cfg, false).await;
            match newest_leader(&reports) {
                Some(l) if l.voters.contains(&id) => Ok(rpc::MembershipReply {
                    voters: l.voters.clone(),
                    learners: l.learners.clone(),
                }),
                Some(l) if l.learners.contains(&id) => Err(CliError::Failed(format!(
                    "metad node {id} is a learner, still catching up ({}; the leader's commit index is {}). \
                     Watch it with `jfs admin node state {id}` and run this command again (safe to repeat) to \
                     make it a voter",
                    reason(&e),
                    l.commit_index
                ))),
                _ => Err(CliError::Failed(format!(
                    "metad node {id} was not added: {}. Check `jfs metastatus` (is there a leader?) and that the \
                     new node runs and its raft address {raft_addr} is reachable from the other nodes, then \
                     run this command again (safe to repeat)",
                    reason(&e)
                ))),
            }
        }
        Err(e) => Err(CliError::Failed(format!("cannot add metad node {id}: {e}"))),
    }
}

async fn remove_member(cfg: &Config, id: u64) -> Result<rpc::MembershipReply, FsError> {
    let req = rpc::RemoveMemberRequest { node_id: id };
    meta_client(cfg, REMOVE_TIMEOUT)
        .call(|mut c| async move { c.remove_member(req).await })
        .await
}

fn remove_error(id: u64, e: FsError) -> CliError {
    CliError::Failed(format!(
        "cannot remove metad node {id}: {}. Check `jfs metastatus`, then run the command again (safe to repeat)",
        reason(&e)
    ))
}

/// `jfs admin node add ID --rpc-address A --raft-address B`
pub async fn add(cfg: &Config, id: u64, rpc_addr: &str, raft_addr: &str) -> CliResult<()> {
    check_id("node id", id)?;
    check_host_port("--rpc-address", rpc_addr)?;
    check_host_port("--raft-address", raft_addr)?;
    check_new_node(id, rpc_addr, raft_addr).await?;
    crate::say!(
        "adding metad node {id} (rpc {rpc_addr}, raft {raft_addr}): a learner until it has caught up, then a \
         voter; a big namespace can take minutes..."
    );
    let reply = add_member(cfg, id, rpc_addr, raft_addr).await?;
    crate::say!(
        "metad node {id} is a voter: {}",
        membership_text(&reply.voters, &reply.learners)
    );
    crate::say!(
        "next: `jfs admin node health {id}`; `jfs metastatus` finds it even though the config file does not list it"
    );
    Ok(())
}

/// Whether removing voter `id` leaves voters of which a majority answered.
/// `None`: safe (or `id` is no voter); `Some(why)` otherwise.
pub fn removal_risk(voters: &[u64], answering: &BTreeSet<u64>, id: u64) -> Option<String> {
    if !voters.contains(&id) {
        return None;
    }
    let left: Vec<u64> = voters.iter().copied().filter(|&v| v != id).collect();
    let up: Vec<u64> = left.iter().copied().filter(|v| answering.contains(v)).collect();
    if left.is_empty() || up.len() * 2 > left.len() {
        return None;
    }
    let down: Vec<u64> = left.iter().copied().filter(|v| !answering.contains(v)).collect();
    Some(format!(
        "removing metad node {id} would leave voters {}, of which only {} answer{} — not a majority, so the \
         cluster would stop. Bring node(s) {} back first (or remove a dead one instead of a live one)",
        join_ids(&left),
        if up.is_empty() {
            "none".to_string()
        } else {
            join_ids(&up)
        },
        if up.len() == 1 { "s" } else { "" },
        join_ids(&down)
    ))
}

/// `jfs admin node remove ID`
pub async fn remove(cfg: &Config, id: u64, force: bool) -> CliResult<()> {
    check_id("node id", id)?;
    if !force {
        let reports = metastatus::collect(cfg, false).await;
        if let Some(l) = newest_leader(&reports) {
            let answering: BTreeSet<u64> = reports
                .iter()
                .filter_map(|r| r.status.as_ref().ok())
                .filter(|s| s.role == "leader" || s.role == "follower")
                .map(|s| s.node_id)
                .collect();
            if let Some(why) = removal_risk(&l.voters, &answering, id) {
                return Err(CliError::Failed(format!("{why}. To remove it anyway, pass --force")));
            }
            if !l.voters.contains(&id) && !l.learners.contains(&id) {
                crate::say!(
                    "metad node {id} is not a member ({}); nothing to remove",
                    membership_text(&l.voters, &l.learners)
                );
                return Ok(());
            }
        }
    }
    let reply = remove_member(cfg, id).await.map_err(|e| remove_error(id, e))?;
    crate::say!(
        "metad node {id} removed: {}",
        membership_text(&reply.voters, &reply.learners)
    );
    crate::say!(
        "next: stop node {id}'s jfs-metad if it still runs, and never start id {id} again (a replacement takes a \
         new id: `jfs admin node add`)"
    );
    Ok(())
}

/// `jfs admin node replace OLD --with NEW --rpc-address A --raft-address B`
pub async fn replace(cfg: &Config, old: u64, new: u64, rpc_addr: &str, raft_addr: &str) -> CliResult<()> {
    check_id("node id", old)?;
    check_id("--with", new)?;
    if old == new {
        return Err(CliError::Usage(format!(
            "--with {new}: the replacement needs a new id (ids are never reused), e.g. one above the highest in \
             `jfs metastatus --detail`"
        )));
    }
    check_host_port("--rpc-address", rpc_addr)?;
    check_host_port("--raft-address", raft_addr)?;
    check_new_node(new, rpc_addr, raft_addr).await?;
    crate::say!(
        "step 1/2: adding metad node {new} (rpc {rpc_addr}, raft {raft_addr}); it becomes a voter once caught \
         up, which can take minutes..."
    );
    let reply = add_member(cfg, new, rpc_addr, raft_addr).await?;
    crate::say!(
        "step 1/2 done: metad node {new} is a voter ({})",
        membership_text(&reply.voters, &reply.learners)
    );
    crate::say!("step 2/2: removing metad node {old}...");
    let reply = remove_member(cfg, old).await.map_err(|e| {
        CliError::Failed(format!(
            "node {new} was added, but removing node {old} failed: {}. Finish with `jfs admin node remove {old}` \
             (or run this command again)",
            reason(&e)
        ))
    })?;
    crate::say!(
        "step 2/2 done: metad node {old} removed ({})",
        membership_text(&reply.voters, &reply.learners)
    );
    crate::say!(
        "next: stop node {old}'s jfs-metad if it still runs, and never start id {old} again; check the new node \
         with `jfs admin node health {new}`"
    );
    Ok(())
}

/// The `node state` report: one `KEY  VALUE` line per field.
pub fn state_text(s: &NodeStatus, answered_at: &str) -> String {
    let contact = match (s.last_contact_ms, s.role.as_str()) {
        (0, _) => "unknown".to_string(),
        (ms, "leader") => format!("{ms} ms ago (a quorum acknowledged it)"),
        (ms, _) => format!("{ms} ms ago (heard from the leader)"),
    };
    let or_dash = |v: &str| if v.is_empty() { "-".to_string() } else { v.to_string() };
    let mut fields: Vec<(&str, String)> = vec![
        ("node", s.node_id.to_string()),
        (
            "rpc address",
            or_dash(if s.rpc_address.is_empty() {
                answered_at
            } else {
                &s.rpc_address
            }),
        ),
        ("raft address", or_dash(&s.raft_address)),
        ("role", s.role.clone()),
        ("term", s.term.to_string()),
        ("leader", leader_text(s)),
        ("commit index", s.commit_index.to_string()),
        ("applied index", s.applied_index.to_string()),
        (
            "last log index",
            format!("{} (term {})", s.last_log_index, s.last_log_term),
        ),
        ("last contact", contact),
        ("voters", join_ids(&s.voters)),
        ("learners", join_ids(&s.learners)),
        ("seen members", join_ids(&s.seen_members)),
        ("cluster id", or_dash(&s.cluster_id)),
    ];
    if s.role == "leader" {
        fields.push(("live blockds", s.live_blockds.to_string()));
    }
    if !s.digest.is_empty() {
        fields.push(("digest", digest_text(s)));
        fields.push(("sessions", s.sessions.to_string()));
        fields.push(("saved replies", s.saved_replies.to_string()));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in fields {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out
}

/// `jfs admin node state ID [--digest]`
pub async fn state(cfg: &Config, id: u64, digest: bool) -> CliResult<()> {
    check_id("node id", id)?;
    let reports = metastatus::collect(cfg, false).await;
    let Some((found, addr)) = find_node(&reports, id) else {
        return Err(CliError::Failed(format!(
            "metad node {id}: {}",
            not_found_reason(&reports, id)
        )));
    };
    let status = if digest {
        metastatus::probe_status(addr, metastatus::DIGEST_TIMEOUT, true)
            .await
            .map_err(|e| {
                CliError::Failed(format!(
                    "metad node {id} ({addr}) answered, but not with a digest within {:?}: {e}",
                    metastatus::DIGEST_TIMEOUT
                ))
            })?
    } else {
        found.clone()
    };
    crate::say!("{}", state_text(&status, addr).trim_end());
    Ok(())
}

/// The health verdict on `node`, given what its leader said (or why the
/// leader could not be asked; ignored when `node` is the leader). `Ok` and
/// `Err` both carry the one line to print.
pub fn judge_health(node: &NodeStatus, leader: Result<&NodeStatus, &str>) -> Result<String, String> {
    let id = node.node_id;
    let bad = |why: String| Err(format!("metad node {id}: unhealthy: {why}"));
    match node.role.as_str() {
        "leader" | "follower" => {}
        "learner" => {
            let progress = match leader {
                Ok(l) => format!(" (applied {} of the leader's {})", node.applied_index, l.commit_index),
                Err(_) => String::new(),
            };
            return bad(format!(
                "learner, still catching up{progress}; it becomes a voter when `jfs admin node add {id}` completes"
            ));
        }
        "candidate" => {
            return bad(format!(
                "candidate in term {}: holding an election, following no leader; if this lasts, check that it \
                 reaches a majority of the other nodes",
                node.term
            ))
        }
        other => return bad(format!("role {other:?} in term {}", node.term)),
    }
    if node.leader_id == 0 {
        return bad(format!(
            "{} in term {} knows no leader; check `jfs metastatus`",
            node.role, node.term
        ));
    }
    let l = if node.role == "leader" {
        node
    } else {
        match leader {
            Ok(l) => l,
            Err(why) => return bad(format!("its leader, {}, does not answer: {why}", leader_text(node))),
        }
    };
    if l.node_id != node.leader_id || l.role != "leader" {
        return bad(format!(
            "it follows node {} in term {}, but that node answers as node {}, {} in term {}; leadership is \
             moving or the node is cut off: check `jfs metastatus`",
            node.leader_id, node.term, l.node_id, l.role, l.term
        ));
    }
    let lag = l.commit_index.saturating_sub(node.applied_index);
    if lag > MAX_APPLY_LAG {
        return bad(format!(
            "applied index {} is {lag} entries behind the leader's commit index {} (limit {MAX_APPLY_LAG}); it is \
             catching up, or its disk or CPU is too slow",
            node.applied_index, l.commit_index
        ));
    }
    if node.role == "follower" && node.last_contact_ms >= MAX_CONTACT_MS {
        return bad(format!(
            "last heard from the leader (node {}) {} ms ago (limit {MAX_CONTACT_MS} ms); check the network between \
             them",
            node.leader_id, node.last_contact_ms
        ));
    }
    let contact = contact_text(node.last_contact_ms);
    if node.role == "leader" {
        Ok(format!(
            "metad node {id}: healthy: leader in term {}, commit {}, applied {}, quorum contact {contact}",
            node.term, node.commit_index, node.applied_index
        ))
    } else {
        Ok(format!(
            "metad node {id}: healthy: follower of node {} in term {}, applied {} (leader commit {}), last \
             contact {contact}",
            node.leader_id, node.term, node.applied_index, l.commit_index
        ))
    }
}

/// `jfs admin node health ID`
pub async fn health(cfg: &Config, id: u64) -> CliResult<()> {
    check_id("node id", id)?;
    let reports = metastatus::collect(cfg, false).await;
    let Some((node, _)) = find_node(&reports, id) else {
        return Err(CliError::Unhealthy(format!(
            "metad node {id}: unhealthy: {}",
            not_found_reason(&reports, id)
        )));
    };
    let probed;
    let leader: Result<&NodeStatus, String> = if node.role == "leader" || node.leader_id == 0 {
        Ok(node)
    } else if let Some((l, _)) = find_node(&reports, node.leader_id) {
        Ok(l)
    } else if let Some(r) = reports
        .iter()
        .find(|r| r.status.is_err() && !node.leader_address.is_empty() && r.rpc_addr == node.leader_address)
    {
        Err(r.status.as_ref().err().map(|e| e.to_string()).unwrap_or_default())
    } else if node.leader_address.is_empty() {
        Err("its address is unknown".to_string())
    } else {
        match metastatus::probe(&node.leader_address, metastatus::PROBE_TIMEOUT).await {
            Ok(s) => {
                probed = s;
                Ok(&probed)
            }
            Err(e) => Err(e.to_string()),
        }
    };
    match judge_health(node, leader.as_ref().map(|l| *l).map_err(String::as_str)) {
        Ok(line) => {
            crate::say!("{line}");
            Ok(())
        }
        Err(line) => Err(CliError::Unhealthy(line)),
    }
}

/// `metad node 3 now leads (term 7), in 0.84 s`
pub fn failover_text(leader_id: u64, term: u64, took: Duration) -> String {
    format!(
        "metad node {leader_id} now leads (term {term}), in {:.2} s",
        took.as_secs_f64()
    )
}

/// `jfs admin failover --to ID`
pub async fn failover(cfg: &Config, to: u64) -> CliResult<()> {
    check_id("--to", to)?;
    let req = rpc::TransferLeaderRequest { to };
    let started = Instant::now();
    let reply = meta_client(cfg, FAILOVER_TIMEOUT)
        .call(|mut c| async move { c.transfer_leader(req).await })
        .await
        .map_err(|e| match e {
            FsError::InvalidArgument(m) => CliError::Failed(format!("cannot hand metad leadership to node {to}: {m}")),
            e => CliError::Failed(format!(
                "metad leadership did not move to node {to}: {}. The current leader goes on leading (see `jfs \
                 metastatus`); check the target with `jfs admin node health {to}` and try again",
                reason(&e)
            )),
        })?;
    let took = started.elapsed();
    if reply.leader_id != to {
        return Err(CliError::Failed(format!(
            "asked for node {to} to lead, but node {} leads (term {}); see `jfs metastatus` and try again",
            reply.leader_id, reply.term
        )));
    }
    crate::say!("{}", failover_text(reply.leader_id, reply.term, took));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(id: u64, role: &str) -> NodeStatus {
        NodeStatus {
            node_id: id,
            rpc_address: format!("10.0.0.{id}:8101"),
            raft_address: format!("10.0.0.{id}:8103"),
            role: role.into(),
            term: 7,
            commit_index: 5000,
            applied_index: 5000,
            leader_id: 1,
            leader_address: "10.0.0.1:8101".into(),
            voters: vec![1, 2, 3],
            last_log_index: 5001,
            last_log_term: 7,
            last_contact_ms: 40,
            ..Default::default()
        }
    }

    #[test]
    fn healthy_follower_and_leader() {
        let leader = st(1, "leader");
        let f = st(2, "follower");
        let line = judge_health(&f, Ok(&leader)).unwrap();
        assert_eq!(
            line,
            "metad node 2: healthy: follower of node 1 in term 7, applied 5000 (leader commit 5000), last contact 40ms"
        );
        let line = judge_health(&leader, Err("ignored")).unwrap();
        assert!(line.starts_with("metad node 1: healthy: leader in term 7"), "{line}");
    }

    #[test]
    fn unhealthy_reasons() {
        let leader = st(1, "leader");
        let why = |n: &NodeStatus, l: Result<&NodeStatus, &str>| judge_health(n, l).unwrap_err();

        let mut learner = st(4, "learner");
        learner.applied_index = 10;
        assert!(why(&learner, Ok(&leader)).contains("learner, still catching up (applied 10 of the leader's 5000)"));
        assert!(why(&st(2, "candidate"), Ok(&leader)).contains("candidate in term 7"));

        let mut lost = st(2, "follower");
        lost.leader_id = 0;
        assert!(why(&lost, Ok(&leader)).contains("knows no leader"));

        assert!(why(&st(2, "follower"), Err("connection refused"))
            .contains("its leader, 1 (10.0.0.1:8101), does not answer: connection refused"));

        let mut behind = st(2, "follower");
        behind.applied_index = 3999;
        assert!(why(&behind, Ok(&leader)).contains("1001 entries behind"));
        behind.applied_index = 4000;
        assert!(judge_health(&behind, Ok(&leader)).is_ok(), "1000 behind is still fine");

        let mut silent = st(2, "follower");
        silent.last_contact_ms = 5000;
        assert!(why(&silent, Ok(&leader)).contains("5000 ms ago"));
        silent.last_contact_ms = 4999;
        assert!(judge_health(&silent, Ok(&leader)).is_ok());

        // The node it names as leader no longer leads.
        let deposed = st(1, "follower");
        assert!(why(&st(2, "follower"), Ok(&deposed)).contains("answers as node 1, follower"));

        // Every verdict is one line.
        assert!(!why(&learner, Ok(&leader)).contains('\n'));
    }

    #[test]
    fn leader_lag_is_its_own() {
        let mut leader = st(1, "leader");
        leader.applied_index = 3000;
        assert!(judge_health(&leader, Err("x"))
            .unwrap_err()
            .contains("2000 entries behind"));
    }

    #[test]
    fn removal_keeps_a_majority() {
        let up = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<u64>>();
        // The dead node goes: 1 and 3 remain and answer.
        assert_eq!(removal_risk(&[1, 2, 3], &up(&[1, 3]), 2), None);
        // A live node goes while another is dead: 1 and 3 remain, 3 is dead.
        let why = removal_risk(&[1, 2, 3], &up(&[1, 2]), 2).unwrap();
        assert!(why.contains("would leave voters 1,3, of which only 1 answers"), "{why}");
        assert!(why.contains("Bring node(s) 3 back"), "{why}");
        // Not a voter (a learner, or not a member): nothing to lose.
        assert_eq!(removal_risk(&[1, 2, 3], &up(&[]), 4), None);
        // 5 voters, 2 dead, remove a live one: 2 of 4 is not a majority.
        assert!(removal_risk(&[1, 2, 3, 4, 5], &up(&[1, 2, 3]), 3).is_some());
        assert_eq!(removal_risk(&[1, 2, 3, 4, 5], &up(&[1, 2, 3]), 4), None);
    }

    #[test]
    fn host_port() {
        assert!(check_host_port("--rpc-address", "10.0.0.4:8101").is_ok());
        assert!(check_host_port("--rpc-address", "meta4.example:8101").is_ok());
        assert!(check_host_port("--rpc-address", "[::1]:8101").is_ok());
        for bad in ["10.0.0.4", ":8101", "h:0", "h:99999", "h:x", "::1:8101", "a b:1"] {
            assert!(check_host_port("--rpc-address", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_report() {
        let mut s = st(2, "follower");
        s.seen_members = vec![1, 2, 3];
        s.digest = "0011223344556677-9".into();
        s.digest_index = 5000;
        let text = state_text(&s, "ignored:1");
        let expected = "\
node            2
rpc address     10.0.0.2:8101
raft address    10.0.0.2:8103
role            follower
term            7
leader          1 (10.0.0.1:8101)
commit index    5000
applied index   5000
last log index  5001 (term 7)
last contact    40 ms ago (heard from the leader)
voters          1,2,3
learners        -
seen members    1,2,3
cluster id      -
digest          0011223344556677-9@5000
sessions        0
saved replies   0
";
        assert_eq!(text, expected);
        let leader = state_text(&st(1, "leader"), "x:1");
        assert!(leader.contains("live blockds    0\n"), "{leader}");
        assert!(leader.contains("(a quorum acknowledged it)"), "{leader}");
    }

    #[test]
    fn missing_node_explained() {
        let reports = vec![
            NodeReport {
                configured_id: Some(1),
                rpc_addr: "10.0.0.1:8101".into(),
                status: Ok(st(1, "leader")),
            },
            NodeReport {
                configured_id: Some(3),
                rpc_addr: "10.0.0.3:8101".into(),
                status: Err(FsError::Unavailable("connection refused".into())),
            },
        ];
        let t = not_found_reason(&reports, 3);
        assert!(t.starts_with("a voter (says node 1), but it does not answer"), "{t}");
        assert!(
            t.contains("no answer from 10.0.0.3:8101 (service unavailable: connection refused)"),
            "{t}"
        );
        let t = not_found_reason(&reports, 9);
        assert!(
            t.starts_with("no such node: not a member (voters 1,2,3; learners -, says node 1)"),
            "{t}"
        );
        // A removed node that still runs has an old view; the leader's counts.
        let mut stale = st(5, "follower");
        stale.voters = vec![1, 2, 3, 9];
        let mut reports = reports;
        reports.insert(
            0,
            NodeReport {
                configured_id: Some(5),
                rpc_addr: "10.0.0.5:8101".into(),
                status: Ok(stale),
            },
        );
        assert!(not_found_reason(&reports, 9).starts_with("no such node"));
    }

    #[test]
    fn failover_line() {
        assert_eq!(
            failover_text(3, 8, Duration::from_millis(842)),
            "metad node 3 now leads (term 8), in 0.84 s"
        );
    }
}
