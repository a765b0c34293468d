//! Live blockds as this node's leader sees them, built from heartbeats.
//!
//! This is soft state, never replicated through Raft: blockds heartbeat the
//! leader, and send every other metad a liveness-only beat, so each node
//! keeps its own view and a newly elected leader places blocks at once.
//! Placement of new blocks — which only the leader does — reads it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;

#[derive(Debug, Clone)]
pub struct BlockdInfo {
    pub id: String,
    pub address: String,
    pub capacity: u64,
    pub free: u64,
    /// "host:device" of the blockd's data directory ("" = unknown).
    pub filesystem: String,
    pub block_count: u64,
    /// Being decommissioned: no new blocks, its copies move elsewhere.
    pub draining: bool,
    pub last_seen: Instant,
}

pub struct BlockdRegistry {
    dead_after: Duration,
    nodes: Mutex<HashMap<String, BlockdInfo>>,
}

impl BlockdRegistry {
    pub fn new(dead_after: Duration) -> Self {
        BlockdRegistry {
            dead_after,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BlockdInfo>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (each update is a single insert), so a poisoned lock is still usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn heartbeat(&self, info: BlockdInfo) {
        self.lock().insert(info.id.clone(), info);
    }

    pub fn get(&self, id: &str) -> Option<BlockdInfo> {
        self.lock().get(id).cloned()
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|b| b.last_seen.elapsed() < self.dead_after)
    }

    pub fn live(&self) -> Vec<BlockdInfo> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|b| now.duration_since(b.last_seen) < self.dead_after)
            .cloned()
            .collect()
    }

    /// Capacity and free bytes of the live blockds, each underlying file
    /// system counted once (three blockds on one disk are one disk).
    pub fn raw_space(&self) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut total, mut free) = (0, 0);
        for b in self.live() {
            if b.filesystem.is_empty() || seen.insert(b.filesystem.clone()) {
                total += b.capacity;
                free += b.free;
            }
        }
        (total, free)
    }

    /// Up to `n` distinct live blockds for a new block: the ones with the
    /// most free space are preferred, with ties broken at random so
    /// concurrent writers spread out. Nodes with less than `min_free` bytes
    /// free and draining nodes are skipped, and so are the ids or addresses
    /// in `avoid` (nodes a client just failed to reach) unless no other
    /// node is left.
    pub fn place(&self, n: usize, min_free: u64, avoid: &[String]) -> Vec<BlockdInfo> {
        let mut live: Vec<BlockdInfo> = self
            .live()
            .into_iter()
            .filter(|b| b.free >= min_free && !b.draining)
            .collect();
        let avoided = |b: &BlockdInfo| avoid.contains(&b.address) || avoid.contains(&b.id);
        if live.iter().any(|b| !avoided(b)) {
            live.retain(|b| !avoided(b));
        }
        live.shuffle(&mut rand::thread_rng());
        // Bucket free space coarsely so a few MiB of difference does not
        // send every block to the same node.
        live.sort_by_key(|b| std::cmp::Reverse(b.free >> 30));
        live.truncate(n);
        live
    }

    /// One blockd to receive a copy of a block: never one in `exclude` (it
    /// already has a copy), never a full or draining one.
    pub fn place_copy(&self, min_free: u64, exclude: &[String]) -> Option<BlockdInfo> {
        let mut live: Vec<BlockdInfo> = self
            .live()
            .into_iter()
            .filter(|b| b.free >= min_free && !b.draining && !exclude.contains(&b.id))
            .collect();
        live.shuffle(&mut rand::thread_rng());
        live.sort_by_key(|b| std::cmp::Reverse(b.free >> 30));
        live.into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, free_gib: u64, age: Duration) -> BlockdInfo {
        BlockdInfo {
            id: id.into(),
            address: format!("{id}:8201"),
            capacity: 100 << 30,
            free: free_gib << 30,
            filesystem: String::new(),
            block_count: 0,
            draining: false,
            last_seen: Instant::now() - age,
        }
    }

    #[test]
    fn placement_skips_dead_and_full_nodes() {
        let r = BlockdRegistry::new(Duration::from_secs(10));
        r.heartbeat(info("a", 50, Duration::ZERO));
        r.heartbeat(info("b", 0, Duration::ZERO));
        r.heartbeat(info("c", 90, Duration::from_secs(60)));
        r.heartbeat(info("d", 80, Duration::ZERO));
        let p: Vec<String> = r.place(3, 1 << 20, &[]).into_iter().map(|b| b.id).collect();
        assert_eq!(p, vec!["d".to_string(), "a".to_string()]);
        assert_eq!(r.live().len(), 3);
    }

    #[test]
    fn blockds_sharing_a_file_system_count_once_in_space() {
        let r = BlockdRegistry::new(Duration::from_secs(10));
        for (id, fs) in [("a", "h1:5"), ("b", "h1:5"), ("c", "h2:5"), ("d", "")] {
            let mut i = info(id, 10, Duration::ZERO);
            i.filesystem = fs.into();
            r.heartbeat(i);
        }
        // h1:5 once, h2:5, and the unknown one: three disks of 100 GiB.
        assert_eq!(r.raw_space(), (300 << 30, 30 << 30));
    }

    #[test]
    fn placement_avoids_failed_nodes_while_others_are_left() {
        let r = BlockdRegistry::new(Duration::from_secs(10));
        for id in ["a", "b", "c"] {
            r.heartbeat(info(id, 50, Duration::ZERO));
        }
        let mut p: Vec<String> = r
            .place(3, 1 << 20, &["b:8201".to_string()])
            .into_iter()
            .map(|b| b.address)
            .collect();
        p.sort();
        assert_eq!(p, vec!["a:8201".to_string(), "c:8201".to_string()]);
        // Every node failed: placing somewhere beats failing the write.
        let all: Vec<String> = ["a", "b", "c"].iter().map(|i| format!("{i}:8201")).collect();
        assert_eq!(r.place(3, 1 << 20, &all).len(), 3);
    }

    #[test]
    fn copies_go_to_a_node_without_one_and_never_to_a_draining_node() {
        let r = BlockdRegistry::new(Duration::from_secs(10));
        for id in ["a", "b", "c", "d"] {
            let mut i = info(id, 50, Duration::ZERO);
            i.draining = id == "d";
            r.heartbeat(i);
        }
        assert!(r.place(4, 1, &[]).iter().all(|b| b.id != "d"));
        let t = r.place_copy(1, &["a".into(), "b".into()]).unwrap();
        assert_eq!(t.id, "c");
        assert!(r.place_copy(1, &["a".into(), "b".into(), "c".into()]).is_none());
    }
}
