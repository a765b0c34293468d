//! `jfs metastatus`: each metad node's own view of the Raft group.
//!
//! Every node is asked once (Meta.Status, short timeout, no retry, no leader
//! following — the point is to see each node as it is): first the nodes of
//! the config file, all at once, then any member address the answering
//! nodes name that the config does not (nodes added later with `jfs admin
//! node add`). The answers are printed as a table. A node that does not
//! answer shows as `unreachable`, with the reason under the table. The
//! command fails (exit 1) when no node says it is the leader.

use std::collections::BTreeSet;
use std::time::Duration;

use jfs_common::config::Config;
use jfs_common::rpc::{meta_client::MetaClient, NodeStatus, StatusRequest};
use jfs_common::FsError;

use crate::{CliError, CliResult};

/// Long enough for a loaded 2-core machine, short enough that a dead node
/// does not make the operator wait.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A digest reads the node's whole state machine: allow for a big one.
pub const DIGEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Rounds of "ask the members the answers named": one is enough unless
/// membership changes while we ask.
const DISCOVERY_ROUNDS: usize = 3;

/// Asks one node for its status, once. (Not `MetaClient::status_of`: its
/// error drops the transport cause, and "Connection refused" versus a
/// timeout is exactly what the operator needs to tell a dead node from a
/// hung or unreachable one.)
pub async fn probe(rpc_addr: &str, timeout: Duration) -> Result<NodeStatus, FsError> {
    probe_status(rpc_addr, timeout, false).await
}

/// [`probe`], optionally asking for a digest of the node's state machine.
/// Connecting takes at most [`PROBE_TIMEOUT`] even when the answer may take
/// longer: a dead or hung node is told apart as fast as without a digest.
pub async fn probe_status(rpc_addr: &str, timeout: Duration, digest: bool) -> Result<NodeStatus, FsError> {
    let connect_timeout = timeout.min(PROBE_TIMEOUT);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{rpc_addr}"))
        .map_err(|e| FsError::InvalidArgument(format!("bad metad address {rpc_addr:?}: {e}")))?
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    let channel = tokio::time::timeout(
        connect_timeout,
        jfs_common::tls::connect(endpoint, jfs_common::tls::Role::Metad),
    )
    .await
    .map_err(|_| FsError::Unavailable(format!("no answer within {connect_timeout:?}")))?
    .map_err(|e| FsError::Unavailable(connect_error_text(&e)))?;
    let mut client = MetaClient::new(channel)
        .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);
    let reply = tokio::time::timeout(timeout, client.status(StatusRequest { digest }))
        .await
        .map_err(|_| FsError::Unavailable(format!("no answer within {timeout:?}")))??;
    Ok(reply.into_inner())
}

/// tonic's transport error hides the useful part ("Connection refused") in its source chain.
fn connect_error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        // hyper and tonic repeat some layers' text; say each thing once.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        src = s.source();
    }
    text
}

/// One row of the report: where the node was asked, and what it said.
pub struct NodeReport {
    /// The node's id in the config file; `None` for a node found only in
    /// another node's member list (added after the config was written).
    pub configured_id: Option<u64>,
    pub rpc_addr: String,
    pub status: Result<NodeStatus, FsError>,
}

impl NodeReport {
    /// The node id to show: the configured one, else what the node said.
    pub fn id(&self) -> Option<u64> {
        self.configured_id
            .or_else(|| self.status.as_ref().ok().map(|s| s.node_id))
    }
}

/// Member addresses named by the answering nodes that are not in `known`,
/// sorted, each once.
pub fn new_member_addrs(reports: &[NodeReport], known: &BTreeSet<String>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for r in reports {
        if let Ok(s) = &r.status {
            for a in &s.members {
                if !a.is_empty() && !known.contains(a) {
                    out.insert(a.clone());
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Asks every metad node for its status: the config file's nodes, then the
/// members their answers name (repeatedly, while new ones turn up). Config
/// nodes come first, in config order; found ones follow, by node id. A
/// found address that answers as a node already seen elsewhere is dropped.
pub async fn collect(cfg: &Config, digest: bool) -> Vec<NodeReport> {
    let timeout = if digest { DIGEST_TIMEOUT } else { PROBE_TIMEOUT };
    let asks = cfg.peers.iter().map(|p| async move {
        NodeReport {
            configured_id: Some(p.id),
            rpc_addr: p.rpc_addr.clone(),
            status: probe_status(&p.rpc_addr, timeout, digest).await,
        }
    });
    let reports = futures::future::join_all(asks).await;
    let mut known: BTreeSet<String> = reports.iter().map(|r| r.rpc_addr.clone()).collect();
    let mut found: Vec<NodeReport> = Vec::new();
    for _ in 0..DISCOVERY_ROUNDS {
        let mut fresh = new_member_addrs(&reports, &known);
        fresh.extend(new_member_addrs(&found, &known));
        fresh.sort();
        fresh.dedup();
        if fresh.is_empty() {
            break;
        }
        known.extend(fresh.iter().cloned());
        let asks = fresh.into_iter().map(|a| async move {
            let status = probe_status(&a, timeout, digest).await;
            NodeReport {
                configured_id: None,
                rpc_addr: a,
                status,
            }
        });
        found.extend(futures::future::join_all(asks).await);
    }
    merge_found(reports, found)
}

/// Appends the nodes found through member lists to the configured ones,
/// sorted by id, dropping a second answer from a node already seen, and an
/// unreachable address that the newest leader does not list as a member
/// (a removed node that still runs names members that are gone).
pub fn merge_found(mut reports: Vec<NodeReport>, mut found: Vec<NodeReport>) -> Vec<NodeReport> {
    let members: Option<BTreeSet<String>> = reports
        .iter()
        .chain(found.iter())
        .filter_map(|r| r.status.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .map(|l| l.members.iter().cloned().collect());
    let mut seen: BTreeSet<u64> = reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok().map(|s| s.node_id))
        .collect();
    found.sort_by(|a, b| (a.id().is_none(), a.id(), &a.rpc_addr).cmp(&(b.id().is_none(), b.id(), &b.rpc_addr)));
    for r in found {
        match &r.status {
            Ok(s) if !seen.insert(s.node_id) => continue,
            Err(_) if members.as_ref().is_some_and(|m| !m.contains(&r.rpc_addr)) => continue,
            _ => {}
        }
        reports.push(r);
    }
    reports
}

pub async fn run(cfg: &Config, detail: bool, digest: bool, metrics: bool) -> CliResult<()> {
    let reports = collect(cfg, digest).await;
    let (table, mut notes) = render(&reports, detail, digest);
    crate::say!("{}", table.trim_end());
    if detail {
        let more = mirror_details(&reports);
        if !more.is_empty() {
            crate::say!("\n{}", more.trim_end());
        }
    }
    if metrics {
        let (table, more) = crate::node_metrics::report(&reports, PROBE_TIMEOUT).await;
        crate::say!("\n{}", table.trim_end());
        notes.extend(more);
    }
    // Diagnostics go to stderr: stdout stays one clean table for scripts.
    for n in notes {
        eprintln!("{n}");
    }
    let leaders: Vec<&NodeStatus> = reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok())
        .filter(|s| s.role == "leader")
        .collect();
    if leaders.is_empty() {
        let reachable = reports.iter().filter(|r| r.status.is_ok()).count();
        return Err(CliError::Failed(format!(
            "no leader visible ({reachable} of {} nodes answered); the namespace cannot serve requests. \
             A majority of metad nodes must be up and reach each other: check the unreachable ones and \
             their logs",
            reports.len()
        )));
    }
    Ok(())
}

pub fn join_ids(ids: &[u64]) -> String {
    if ids.is_empty() {
        "-".to_string()
    } else {
        ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }
}

/// `ID (ADDRESS)`, `ID`, or `unknown` when the node knows no leader.
pub fn leader_text(s: &NodeStatus) -> String {
    match (s.leader_id, s.leader_address.as_str()) {
        (0, _) => "unknown".to_string(),
        (id, "") => id.to_string(),
        (id, addr) => format!("{id} ({addr})"),
    }
}

/// `DIGEST@INDEX`, or `-` when the node sent none.
pub fn digest_text(s: &NodeStatus) -> String {
    if s.digest.is_empty() {
        "-".to_string()
    } else {
        format!("{}@{}", s.digest, s.digest_index)
    }
}

/// Milliseconds as one word (`45ms`); 0 means the node does not know.
pub fn contact_text(ms: u64) -> String {
    if ms == 0 {
        "-".to_string()
    } else {
        format!("{ms}ms")
    }
}

/// The report: the table, and one note per unreachable or odd node saying why.
pub fn render(reports: &[NodeReport], detail: bool, digest: bool) -> (String, Vec<String>) {
    // Scripts and tests read the first five columns by position: keep them.
    let mut headers = vec!["NODE", "RPC ADDRESS", "ROLE", "TERM", "APPLIED"];
    if detail {
        headers.extend([
            "COMMIT",
            "LAST LOG",
            "LAST CONTACT",
            "LEADER",
            "VOTERS",
            "LEARNERS",
            "CLUSTER ID",
            "LIVE BLOCKDS",
            "MIRROR",
            "RECOVERY",
        ]);
    }
    if digest {
        headers.push("DIGEST");
    }
    // Membership as the (newest) leader sees it, to point out nodes that left.
    let leader = reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for r in reports {
        let id = r.id().map_or_else(|| "?".to_string(), |i| i.to_string());
        let mut row = vec![id, r.rpc_addr.clone()];
        match &r.status {
            Ok(s) => {
                row.extend([s.role.clone(), s.term.to_string(), s.applied_index.to_string()]);
                if detail {
                    row.extend([
                        s.commit_index.to_string(),
                        s.last_log_index.to_string(),
                        contact_text(s.last_contact_ms),
                        leader_text(s),
                        join_ids(&s.voters),
                        join_ids(&s.learners),
                        if s.cluster_id.is_empty() {
                            "-".to_string()
                        } else {
                            s.cluster_id.clone()
                        },
                        s.live_blockds.to_string(),
                        mirror_cell(s),
                        recovery_text(s),
                    ]);
                }
                if digest {
                    row.push(digest_text(s));
                }
                if let Some(cid) = r.configured_id {
                    if s.node_id != cid {
                        notes.push(format!(
                            "node {} ({}): answers as node id {} — the config's initial-conf order and the \
                             daemon's --node-id disagree",
                            cid, r.rpc_addr, s.node_id
                        ));
                    }
                }
                if let Some(l) = leader {
                    if !l.voters.contains(&s.node_id) && !l.learners.contains(&s.node_id) {
                        notes.push(format!(
                            "node {} ({}): not a member of the cluster (leader {} lists voters {}, learners {}); \
                             it was removed or never added: stop it, or add it with `jfs admin node add` under \
                             a new id",
                            s.node_id,
                            r.rpc_addr,
                            l.node_id,
                            join_ids(&l.voters),
                            join_ids(&l.learners)
                        ));
                    }
                }
            }
            Err(e) => {
                row.push("unreachable".to_string());
                row.resize(headers.len(), "-".to_string());
                let who = r.id().map_or_else(|| "member".to_string(), |i| format!("node {i}"));
                notes.push(format!("{who} ({}): {}", r.rpc_addr, e));
            }
        }
        rows.push(row);
    }
    (format_table(&headers, &rows), notes)
}

/// `_synced=1` / `_synced=0` (as the seed systems print it), or `off`.
pub fn mirror_cell(s: &NodeStatus) -> String {
    if !s.mirror_enabled {
        "off".to_string()
    } else {
        format!("_synced={}", u8::from(s.mirror_synced))
    }
}

/// `RUNNING restored/total`, `FINISH`, or `-` when not in recovery mode.
pub fn recovery_text(s: &NodeStatus) -> String {
    match s.recovery_state.as_str() {
        "RUNNING" => format!("RUNNING {}/{}", s.recovery_restored, s.recovery_total),
        "FINISH" => "FINISH".to_string(),
        _ => "-".to_string(),
    }
}

/// The mirror's details per node, under the table of `--detail`.
pub fn mirror_details(reports: &[NodeReport]) -> String {
    let mut out = String::new();
    for r in reports {
        let Ok(s) = &r.status else { continue };
        let id = r.id().map_or_else(|| "?".to_string(), |i| i.to_string());
        if s.mirror_enabled {
            out.push_str(&format!(
                "node {id}: mirror _synced={} shipped={} lag={} entries/{:.1}s backlog={} table={} epoch={} \
                 owner={} state={}\n",
                u8::from(s.mirror_synced),
                s.mirror_shipped_index,
                s.mirror_lag_entries,
                s.mirror_lag_ms as f64 / 1000.0,
                s.mirror_backlog,
                s.mirror_table,
                s.mirror_epoch,
                if s.mirror_owner.is_empty() {
                    "-"
                } else {
                    &s.mirror_owner
                },
                s.mirror_state,
            ));
            if !s.mirror_error.is_empty() {
                out.push_str(&format!("node {id}: mirror last error: {}\n", s.mirror_error));
            }
        }
        if !s.recovery_state.is_empty() && s.recovery_state != "LEFT" {
            out.push_str(&format!("node {id}: recovery {}\n", recovery_text(s)));
        }
    }
    out
}

/// Left-aligned columns separated by two spaces, no trailing blanks.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let ncols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(ncols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate().take(ncols) {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            l.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(id: u64) -> String {
        format!("127.0.0.1:{}", 8101 + 10 * (id - 1))
    }

    fn status(id: u64, role: &str) -> NodeStatus {
        NodeStatus {
            node_id: id,
            rpc_address: addr(id),
            role: role.into(),
            term: 3,
            commit_index: 42,
            applied_index: 41,
            leader_id: 1,
            leader_address: "127.0.0.1:8101".into(),
            cluster_id: "c0ffee".into(),
            voters: vec![1, 2, 3],
            last_log_index: 43,
            live_blockds: 3,
            members: (1..=3).map(addr).collect(),
            last_contact_ms: 17,
            ..Default::default()
        }
    }

    fn report(id: u64, status: Result<NodeStatus, FsError>) -> NodeReport {
        NodeReport {
            configured_id: Some(id),
            rpc_addr: addr(id),
            status,
        }
    }

    #[test]
    fn table_aligns_columns_and_trims() {
        let t = format_table(
            &["A", "LONGER"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq\n");
    }

    #[test]
    fn short_report() {
        let reports = vec![
            report(1, Ok(status(1, "leader"))),
            report(2, Ok(status(2, "follower"))),
            report(3, Err(FsError::Unavailable("connection refused".into()))),
        ];
        let (text, notes) = render(&reports, false, false);
        let expected = "\
NODE  RPC ADDRESS     ROLE         TERM  APPLIED
1     127.0.0.1:8101  leader       3     41
2     127.0.0.1:8111  follower     3     41
3     127.0.0.1:8121  unreachable  -     -
";
        assert_eq!(text, expected);
        assert_eq!(
            notes,
            vec!["node 3 (127.0.0.1:8121): service unavailable: connection refused".to_string()]
        );
    }

    #[test]
    fn detail_report_has_every_column() {
        let reports = vec![report(1, Ok(status(1, "leader")))];
        let (text, _) = render(&reports, true, false);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        for h in [
            "COMMIT",
            "LAST LOG",
            "LAST CONTACT",
            "LEADER",
            "VOTERS",
            "LEARNERS",
            "CLUSTER ID",
            "LIVE BLOCKDS",
        ] {
            assert!(header.contains(h), "{header}");
        }
        assert!(!header.contains("DIGEST"), "{header}");
        let row = lines.next().unwrap();
        for v in ["42", "43", "17ms", "1 (127.0.0.1:8101)", "1,2,3", "c0ffee"] {
            assert!(row.contains(v), "{row}");
        }
        // COMMIT is the commit index, not the applied one.
        let commit_col = header.find("COMMIT").unwrap();
        assert_eq!(&row[commit_col..commit_col + 2], "42", "{text}");
        // The first five columns stay where scripts read them.
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&f[..5], ["1", "127.0.0.1:8101", "leader", "3", "41"]);
    }

    #[test]
    fn digest_column_is_one_word_per_node() {
        let mut s = status(1, "leader");
        s.digest = "0123abcd4567ef01-99".into();
        s.digest_index = 41;
        let reports = vec![
            report(1, Ok(s)),
            report(2, Ok(status(2, "follower"))),
            report(3, Err(FsError::Unavailable("connection refused".into()))),
        ];
        let (text, _) = render(&reports, true, true);
        let digests: Vec<&str> = text.split_whitespace().filter(|w| w.contains('@')).collect();
        assert_eq!(digests, ["0123abcd4567ef01-99@41"], "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("DIGEST"), "{text}");
        assert!(lines[2].ends_with(" -"), "{text}");
        // Also without --detail.
        let (text, _) = render(&reports, false, true);
        assert!(text.lines().next().unwrap().ends_with("APPLIED  DIGEST"), "{text}");
    }

    #[test]
    fn found_nodes_show_their_own_id() {
        let mut reports = vec![report(1, Ok(status(1, "leader")))];
        reports[0].status.as_mut().unwrap().voters = vec![1, 4];
        reports.push(NodeReport {
            configured_id: None,
            rpc_addr: addr(4),
            status: Ok(status(4, "follower")),
        });
        reports.push(NodeReport {
            configured_id: None,
            rpc_addr: addr(5),
            status: Err(FsError::Unavailable("connection refused".into())),
        });
        let (text, notes) = render(&reports, false, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("4     127.0.0.1:8131  follower"), "{text}");
        assert!(lines[3].starts_with("?     127.0.0.1:8141  unreachable"), "{text}");
        assert_eq!(
            notes,
            vec!["member (127.0.0.1:8141): service unavailable: connection refused".to_string()]
        );
    }

    #[test]
    fn removed_node_is_pointed_out() {
        let mut leader = status(1, "leader");
        leader.voters = vec![1, 3];
        let reports = vec![report(1, Ok(leader)), report(2, Ok(status(2, "follower")))];
        let notes = render(&reports, false, false).1;
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("node 2 (127.0.0.1:8111): not a member"),
            "{notes:?}"
        );
    }

    #[test]
    fn member_addresses_beyond_the_known_ones() {
        let mut s = status(1, "leader");
        s.members = vec![addr(1), addr(4), String::new(), addr(4)];
        let reports = vec![report(1, Ok(s)), report(2, Err(FsError::Unavailable("x".into())))];
        let known: BTreeSet<String> = [addr(1), addr(2)].into_iter().collect();
        assert_eq!(new_member_addrs(&reports, &known), vec![addr(4)]);
    }

    #[test]
    fn found_nodes_are_merged_by_id_and_stale_ones_dropped() {
        let mut leader = status(1, "leader");
        leader.members = vec![addr(1), addr(4), addr(5)];
        let configured = vec![report(1, Ok(leader.clone()))];
        let found = |id: u64, st: Result<NodeStatus, FsError>| NodeReport {
            configured_id: None,
            rpc_addr: addr(id),
            status: st,
        };
        let refused = || Err(FsError::Unavailable("connection refused".into()));
        let mut again = leader.clone();
        again.rpc_address = "localhost:8101".into();
        let merged = merge_found(
            configured,
            vec![
                found(5, refused()),
                found(6, refused()),
                found(4, Ok(status(4, "follower"))),
                NodeReport {
                    configured_id: None,
                    rpc_addr: "localhost:8101".into(),
                    status: Ok(again),
                },
            ],
        );
        let rows: Vec<(Option<u64>, &str)> = merged.iter().map(|r| (r.id(), r.rpc_addr.as_str())).collect();
        assert_eq!(
            rows,
            vec![
                (Some(1), "127.0.0.1:8101"),
                (Some(4), "127.0.0.1:8131"),
                (None, "127.0.0.1:8141")
            ]
        );
    }

    #[test]
    fn mismatched_node_id_is_pointed_out() {
        let reports = vec![report(2, Ok(status(3, "follower")))];
        assert!(render(&reports, false, false).1[0].contains("disagree"));
    }
}
