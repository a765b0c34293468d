//! The node's Raft, storage and mirror gauges for the Prometheus endpoint.
//!
//! Request counts and latencies come from the gRPC layer
//! (`jfs_common::telemetry`); what a scrape also needs is the state of this
//! node, which changes on every commit. Rather than touch a gauge on each
//! apply, a task copies it once a second: a scrape is at most that stale.
//! A change of term or role is copied at once, because an election is what
//! an operator looks at the endpoint for, and a scrape right after one must
//! not show the old leader or term 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use crate::blockd_registry::BlockdRegistry;
use crate::mirror::Mirror;
use crate::raft_store::SmView;
use crate::raft_types::Raft;

use jfs_common::telemetry::Kind;

/// The series [`NodeGauges`] keeps up to date.
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("jfs_raft_term", Kind::Gauge, "current Raft term of this node"),
    ("jfs_raft_is_leader", Kind::Gauge, "1 on the leader, 0 elsewhere"),
    (
        "jfs_raft_last_log_index",
        Kind::Gauge,
        "index of the last entry in this node's log",
    ),
    (
        "jfs_raft_commit_index",
        Kind::Gauge,
        "highest index known committed by a majority",
    ),
    (
        "jfs_raft_applied_index",
        Kind::Gauge,
        "highest index applied to the namespace state machine",
    ),
    (
        "jfs_raft_snapshot_index",
        Kind::Gauge,
        "last index covered by the current snapshot",
    ),
    (
        "jfs_raft_purged_index",
        Kind::Gauge,
        "log entries up to this index are deleted",
    ),
    ("jfs_raft_log_bytes", Kind::Gauge, "on-disk size of the Raft log"),
    (
        "jfs_raft_log_flush_entries",
        Kind::Histogram,
        "log entries made durable by one WAL fsync (group commit batch size)",
    ),
    (
        "jfs_raft_proposal_batch_commands",
        Kind::Histogram,
        "client commands proposed together as one log entry (leader only)",
    ),
    (
        "jfs_raft_log_fsync_seconds",
        Kind::Histogram,
        "time one WAL fsync of the Raft log takes",
    ),
    (
        "jfs_raft_snapshot_bytes",
        Kind::Gauge,
        "size of the current snapshot file",
    ),
    (
        "jfs_metad_namespace_bytes",
        Kind::Gauge,
        "on-disk size of the namespace state machine (RocksDB)",
    ),
    (
        "jfs_metad_live_blockds",
        Kind::Gauge,
        "blockds heard from within the dead interval (leader only)",
    ),
];

/// Exported only where the mirror is on: a 0 in `jfs_mirror_synced` must mean
/// "behind", never "no mirror".
pub const MIRROR_METRICS: &[(&str, Kind, &str)] = &[
    (
        "jfs_mirror_synced",
        Kind::Gauge,
        "1 when every applied change is in the table store",
    ),
    (
        "jfs_mirror_shipped_index",
        Kind::Gauge,
        "last log index shipped to the table store",
    ),
    ("jfs_mirror_lag_entries", Kind::Gauge, "applied entries not yet shipped"),
    (
        "jfs_mirror_lag_seconds",
        Kind::Gauge,
        "age of the oldest unshipped change",
    ),
    (
        "jfs_mirror_backlog_entries",
        Kind::Gauge,
        "log entries kept for the mirror",
    ),
];

pub struct NodeGauges {
    pub raft: Raft,
    pub view: SmView,
    pub blockds: Arc<BlockdRegistry>,
    pub mirror: Option<Arc<Mirror>>,
    pub snapshot_file: PathBuf,
}

impl NodeGauges {
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut raft_metrics = self.raft.metrics();
        let mut seen = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = raft_metrics.changed() => {
                    if changed.is_err() {
                        // Raft has shut down; the process is stopping.
                        return;
                    }
                    let m = raft_metrics.borrow_and_update();
                    let now = Some((m.current_term, m.state));
                    if now == seen {
                        continue;
                    }
                }
                _ = stop.changed() => return,
            }
            seen = self.refresh();
        }
    }

    /// Copies every gauge; returns the term and role it saw.
    fn refresh(&self) -> Option<(u64, ServerState)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.state == ServerState::Leader;
        metrics::gauge!("jfs_raft_term").set(m.current_term as f64);
        metrics::gauge!("jfs_raft_is_leader").set(if leader { 1.0 } else { 0.0 });
        metrics::gauge!("jfs_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("jfs_raft_applied_index").set(m.last_applied.map_or(0, |l| l.index) as f64);
        if let Ok(c) = self.view.committed_index() {
            metrics::gauge!("jfs_raft_commit_index").set(c as f64);
        }
        metrics::gauge!("jfs_raft_snapshot_index").set(m.snapshot.map_or(0, |l| l.index) as f64);
        metrics::gauge!("jfs_raft_purged_index").set(m.purged.map_or(0, |l| l.index) as f64);
        let (log_bytes, namespace_bytes) = self.view.storage_bytes();
        metrics::gauge!("jfs_raft_log_bytes").set(log_bytes as f64);
        metrics::gauge!("jfs_metad_namespace_bytes").set(namespace_bytes as f64);
        // No file until the first snapshot: report 0 rather than nothing.
        let snap = std::fs::metadata(&self.snapshot_file).map_or(0, |m| m.len());
        metrics::gauge!("jfs_raft_snapshot_bytes").set(snap as f64);
        // Only the leader hears every blockd's heartbeat.
        if leader {
            metrics::gauge!("jfs_metad_live_blockds").set(self.blockds.live().len() as f64);
        }
        if let Some(mirror) = &self.mirror {
            let s = mirror.status();
            metrics::gauge!("jfs_mirror_synced").set(if s.synced { 1.0 } else { 0.0 });
            metrics::gauge!("jfs_mirror_shipped_index").set(s.shipped as f64);
            metrics::gauge!("jfs_mirror_lag_entries").set(s.lag_entries as f64);
            metrics::gauge!("jfs_mirror_lag_seconds").set(s.lag_ms as f64 / 1000.0);
            metrics::gauge!("jfs_mirror_backlog_entries").set(s.backlog as f64);
        }
        Some((m.current_term, m.state))
    }
}
