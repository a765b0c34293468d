//! `jfs metastatus`: each metad node's own view of the Raft group.
//!
//! Every node from the config is asked once (Meta.Status, short timeout, no
//! retry, no leader following — the point is to see each node as it is), one
//! after the other, and the answers are printed as a table. A node that does
//! not answer shows as `unreachable`, with the reason under the table. The
//! command fails (exit 1) when no node says it is the leader.

use std::time::Duration;

use jfs_common::config::{Config, MetaPeer};
use jfs_common::rpc::{meta_client::MetaClient, NodeStatus, StatusRequest};
use jfs_common::FsError;

use crate::{CliError, CliResult};

/// Long enough for a loaded 2-core machine, short enough that a dead node
/// does not make the operator wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks one node for its status, once. (Not `MetaClient::status_of`: its
/// error drops the transport cause, and "Connection refused" versus a
/// timeout is exactly what the operator needs to tell a dead node from a
/// hung or unreachable one.)
pub async fn probe(rpc_addr: &str, timeout: Duration) -> Result<NodeStatus, FsError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{rpc_addr}"))
        .map_err(|e| FsError::InvalidArgument(format!("bad metad address {rpc_addr:?}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| FsError::Unavailable(format!("no answer within {timeout:?}")))?
        .map_err(|e| FsError::Unavailable(connect_error_text(&e)))?;
    let mut client = MetaClient::new(channel)
        .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);
    let reply = tokio::time::timeout(timeout, client.status(StatusRequest {}))
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

/// One row of the report: the node as configured and what it said.
pub struct NodeReport {
    pub peer: MetaPeer,
    pub status: Result<NodeStatus, FsError>,
}

pub async fn collect(cfg: &Config) -> Vec<NodeReport> {
    let mut out = Vec::with_capacity(cfg.peers.len());
    for peer in &cfg.peers {
        let status = probe(&peer.rpc_addr, PROBE_TIMEOUT).await;
        out.push(NodeReport {
            peer: peer.clone(),
            status,
        });
    }
    out
}

pub async fn run(cfg: &Config, detail: bool) -> CliResult<()> {
    let reports = collect(cfg).await;
    let (table, notes) = render(&reports, detail);
    crate::say!("{}", table.trim_end());
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

fn join_ids(ids: &[u64]) -> String {
    if ids.is_empty() {
        "-".to_string()
    } else {
        ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The report: the table, and one note per unreachable or odd node saying why.
pub fn render(reports: &[NodeReport], detail: bool) -> (String, Vec<String>) {
    let mut headers = vec!["NODE", "RPC ADDRESS", "ROLE", "TERM", "APPLIED"];
    if detail {
        headers.extend([
            "COMMIT",
            "LAST LOG",
            "LEADER",
            "VOTERS",
            "LEARNERS",
            "CLUSTER ID",
            "LIVE BLOCKDS",
        ]);
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for r in reports {
        let mut row = vec![r.peer.id.to_string(), r.peer.rpc_addr.clone()];
        match &r.status {
            Ok(s) => {
                row.extend([s.role.clone(), s.term.to_string(), s.applied_index.to_string()]);
                if detail {
                    let leader = match (s.leader_id, s.leader_address.as_str()) {
                        (0, _) => "unknown".to_string(),
                        (id, "") => id.to_string(),
                        (id, addr) => format!("{id} ({addr})"),
                    };
                    row.extend([
                        s.commit_index.to_string(),
                        s.last_log_index.to_string(),
                        leader,
                        join_ids(&s.voters),
                        join_ids(&s.learners),
                        if s.cluster_id.is_empty() {
                            "-".to_string()
                        } else {
                            s.cluster_id.clone()
                        },
                        s.live_blockds.to_string(),
                    ]);
                }
                if s.node_id != r.peer.id {
                    notes.push(format!(
                        "node {} ({}): answers as node id {} — the config's initial-conf order and the \
                         daemon's --node-id disagree",
                        r.peer.id, r.peer.rpc_addr, s.node_id
                    ));
                }
            }
            Err(e) => {
                row.push("unreachable".to_string());
                row.resize(headers.len(), "-".to_string());
                notes.push(format!("node {} ({}): {}", r.peer.id, r.peer.rpc_addr, e));
            }
        }
        rows.push(row);
    }
    (format_table(&headers, &rows), notes)
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

    fn peer(id: u64) -> MetaPeer {
        MetaPeer {
            id,
            raft_addr: format!("127.0.0.1:{}", 8103 + 10 * (id - 1)),
            rpc_addr: format!("127.0.0.1:{}", 8101 + 10 * (id - 1)),
        }
    }

    fn status(id: u64, role: &str) -> NodeStatus {
        NodeStatus {
            node_id: id,
            rpc_address: peer(id).rpc_addr,
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
            ..Default::default()
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
            NodeReport {
                peer: peer(1),
                status: Ok(status(1, "leader")),
            },
            NodeReport {
                peer: peer(2),
                status: Ok(status(2, "follower")),
            },
            NodeReport {
                peer: peer(3),
                status: Err(FsError::Unavailable("connection refused".into())),
            },
        ];
        let (text, notes) = render(&reports, false);
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
        let reports = vec![NodeReport {
            peer: peer(1),
            status: Ok(status(1, "leader")),
        }];
        let (text, _) = render(&reports, true);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        for h in [
            "COMMIT",
            "LAST LOG",
            "LEADER",
            "VOTERS",
            "LEARNERS",
            "CLUSTER ID",
            "LIVE BLOCKDS",
        ] {
            assert!(header.contains(h), "{header}");
        }
        let row = lines.next().unwrap();
        for v in ["42", "43", "1 (127.0.0.1:8101)", "1,2,3", "c0ffee"] {
            assert!(row.contains(v), "{row}");
        }
    }

    #[test]
    fn mismatched_node_id_is_pointed_out() {
        let reports = vec![NodeReport {
            peer: peer(2),
            status: Ok(status(3, "follower")),
        }];
        assert!(render(&reports, false).1[0].contains("disagree"));
    }
}
