//! Keeps every block at its namespace's replication: the leader's side of
//! block reports, re-replication, surplus removal and garbage deletion.
//!
//! Everything here is leader-only soft state, rebuilt after a failover: the
//! replicated state (the block table, the garbage table, the blockd table)
//! says which blockd *should* hold which block; heartbeats say which blockds
//! are alive; block reports say what each one really holds. The healer
//! compares the three and hands out commands (copy this block from there,
//! delete that one) in heartbeat replies, and records their outcome through
//! Raft once a blockd reports it done — never before, so a lost reply or a
//! failed delete is retried instead of leaking the block.
//!
//! Rules that keep data safe:
//! - a copy is dropped from a block map only when enough good copies remain
//!   (or it is known to be gone: corrupt, or missing from a report while
//!   another live copy exists);
//! - a copy that still exists goes through the garbage table, so it waits out
//!   the GC grace period like any freed block (a reader may hold an old map);
//! - a block a blockd holds but no map names is deleted only once it is older
//!   than the orphan age (a client may be about to commit it);
//! - nothing is decided until the leader has heard every live blockd (a dead
//!   interval after taking over).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jfs_common::config::Config;
use jfs_common::rpc;
use tracing::{debug, info, warn};

use crate::blockd_registry::BlockdRegistry;
use crate::kv::KvError;
use crate::namespace;
use crate::raft_store::SmView;
use crate::raft_types::{BlockInfo, BlockdRec, BlockdState, Command, NodeId, Op, Raft};
use crate::service::now_ns;

/// Blocks looked at per healing round.
const SCAN_PAGE: usize = 5_000;
/// Raft commands one healing round may propose.
const OPS_PER_ROUND: usize = 256;
/// A delete command not confirmed within this time is sent again.
const DELETE_RESEND: Duration = Duration::from_secs(30);
/// A report that does not list a block registered this recently proves
/// nothing: the listing may predate the write.
const MISSING_MARGIN_NS: i64 = 60_000_000_000;
/// A full report not finished within this time is asked for again.
const REPORT_GIVE_UP_NS: i64 = 300_000_000_000;

/// Commands for one blockd, carried by its next heartbeat reply.
#[derive(Debug, Default)]
pub struct Commands {
    pub delete: Vec<u64>,
    pub replicate: Vec<rpc::ReplicateBlock>,
    pub send_full_report: bool,
}

#[derive(Default)]
struct State {
    /// Leader term this state was built in; another term starts afresh.
    term: u64,
    since: Option<Instant>,
    delete_queue: HashMap<String, BTreeSet<u64>>,
    copy_queue: HashMap<String, Vec<rpc::ReplicateBlock>>,
    /// block → (target blockd, give up at).
    copying: HashMap<u64, (String, Instant)>,
    /// (blockd, block) → (garbage entry time if a GC delete, sent at).
    deleting: HashMap<(String, u64), (Option<i64>, Instant)>,
    /// (blockd, block) → delete if still unnamed at.
    orphans: HashMap<(String, u64), Instant>,
    /// blockd → (report id, when its first piece arrived).
    reports: HashMap<String, (u64, i64)>,
    last_full_report: HashMap<String, Instant>,
    cursor: u64,
    missing_logged: HashSet<u64>,
    /// (when, next block id then): ids below a sample older than the orphan
    /// age were all handed out at least that long ago.
    samples: std::collections::VecDeque<(Instant, u64)>,
}

pub struct Healer {
    cfg: Arc<Config>,
    blockds: Arc<BlockdRegistry>,
    view: SmView,
    state: Mutex<State>,
}

/// How a block's copies stand, given which blockds are alive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copies {
    /// Live blockds in normal service.
    pub good: Vec<String>,
    /// Live, but being decommissioned.
    pub draining: Vec<String>,
    /// Silent past the dead interval, or unknown.
    pub dead: Vec<String>,
}

impl Copies {
    pub fn live(&self) -> usize {
        self.good.len() + self.draining.len()
    }
}

pub fn classify(b: &BlockInfo, is_live: impl Fn(&str) -> bool, recs: &HashMap<String, BlockdRec>) -> Copies {
    let mut c = Copies::default();
    for r in &b.replicas {
        match recs.get(r) {
            Some(rec) if is_live(r) => {
                if rec.state == BlockdState::Decommissioning {
                    c.draining.push(r.clone())
                } else {
                    c.good.push(r.clone())
                }
            }
            _ => c.dead.push(r.clone()),
        }
    }
    c
}

/// What to do about one block: copies to drop, and whether to make one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub copy: bool,
    /// Dead copies to forget (nothing to delete: nobody can reach them).
    pub forget: Vec<String>,
    /// Live copies no longer needed: deleted after the grace period.
    pub retire: Vec<String>,
}

/// The decision for one block. `free` ranks surplus copies (the fullest
/// blockd gives one up first).
pub fn plan(c: &Copies, want: usize, free: impl Fn(&str) -> u64) -> Plan {
    let mut p = Plan::default();
    if c.good.len() < want {
        p.copy = c.live() > 0;
        return p;
    }
    // Enough good copies: everything else can go, and surplus good ones too.
    p.forget = c.dead.clone();
    p.retire = c.draining.clone();
    if c.good.len() > want {
        let mut good = c.good.clone();
        good.sort_by_key(|g| free(g));
        p.retire.extend(good.into_iter().take(c.good.len() - want));
    }
    p
}

impl Healer {
    pub fn new(cfg: Arc<Config>, blockds: Arc<BlockdRegistry>, view: SmView) -> Healer {
        Healer {
            cfg,
            blockds,
            view,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a few map operations; a panic cannot leave them
        // half done in a way that matters (it is soft state).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks nobody names are deleted once this old: a client writes a
    /// block before committing it, and may take a while.
    fn orphan_age(&self) -> Duration {
        self.cfg.block_gc_grace.max(self.cfg.client_timeout * 2)
    }

    /// Called when this node is (still) leader in `term`; false while the
    /// leader has not yet heard every live blockd.
    pub fn warm(&self, term: u64) -> bool {
        let mut st = self.lock();
        if st.term != term {
            *st = State {
                term,
                since: Some(Instant::now()),
                ..State::default()
            };
        }
        st.since
            .is_some_and(|s| s.elapsed() > self.cfg.blockd_dead_after + self.cfg.blockd_heartbeat)
    }

    /// Raises the orphan floor to the next block id of a moment older than
    /// the orphan age (once this leader has watched that long): blocks
    /// below it that no map names will never be committed.
    fn advance_floor(&self) -> Result<Option<Op>, KvError> {
        let next = namespace::next_block_id(&self.view)?;
        let current = namespace::orphan_floor(&self.view)?;
        let age = self.orphan_age();
        let mut st = self.lock();
        let now = Instant::now();
        st.samples.push_back((now, next));
        let mut candidate = None;
        while let Some(&(t, id)) = st.samples.front() {
            if now.duration_since(t) < age {
                break;
            }
            candidate = Some((t, id));
            st.samples.pop_front();
        }
        // Keep the newest old sample: it is the floor until a newer one ages.
        if let Some(c) = candidate {
            st.samples.push_front(c);
        }
        Ok(candidate
            .map(|(_, id)| id)
            .filter(|&id| id > current)
            .map(|floor| Op::SetOrphanFloor { floor }))
    }

    /// Outcome reports carried by a heartbeat: the Raft commands that
    /// record them.
    pub fn on_heartbeat(&self, blockd: &str, r: &rpc::HeartbeatRequest) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut st = self.lock();
        let mut forget = Vec::new();
        for &id in &r.deleted {
            if let Some((Some(since), _)) = st.deleting.remove(&(blockd.to_string(), id)) {
                forget.push((since, id));
            }
        }
        if !forget.is_empty() {
            ops.push(Op::ForgetGarbage {
                replica: blockd.to_string(),
                blocks: forget,
            });
        }
        for &id in &r.added {
            if st.copying.get(&id).is_some_and(|(t, _)| t == blockd) {
                st.copying.remove(&id);
            }
            ops.push(Op::AddReplica {
                block: id,
                blockd: blockd.to_string(),
                drop: Vec::new(),
            });
        }
        for &id in &r.replicate_failed {
            if st.copying.get(&id).is_some_and(|(t, _)| t == blockd) {
                st.copying.remove(&id);
            }
        }
        for &id in &r.corrupt {
            warn!(
                block = id,
                blockd, "a blockd found its copy of a block corrupt; it will be replaced"
            );
            ops.push(Op::DropReplicas {
                block: id,
                blockds: vec![blockd.to_string()],
                to_garbage: false,
            });
        }
        ops
    }

    /// A blockd that was dead or unknown is heard again: what it holds may
    /// have changed, so ask it for a full report.
    pub fn returned(&self, blockd: &str) {
        self.lock().last_full_report.remove(blockd);
    }

    /// Commands for `blockd`'s heartbeat reply: queued copies, due garbage
    /// deletes, and whether to send a full report.
    pub fn commands(&self, blockd: &str) -> Result<Commands, KvError> {
        let before = now_ns().saturating_sub(self.cfg.block_gc_grace.as_nanos() as i64);
        let garbage = namespace::garbage(&self.view, before, 10_000)?;
        let mut st = self.lock();
        let mut cmds = Commands::default();
        let now = Instant::now();
        for g in garbage {
            if !g.replicas.iter().any(|r| r == blockd) {
                continue;
            }
            let key = (blockd.to_string(), g.block_id);
            if st
                .deleting
                .get(&key)
                .is_some_and(|(_, sent)| now.duration_since(*sent) < DELETE_RESEND)
            {
                continue;
            }
            st.deleting.insert(key, (Some(g.since_ns), now));
            cmds.delete.push(g.block_id);
            if cmds.delete.len() >= 1000 {
                break;
            }
        }
        if let Some(ids) = st.delete_queue.remove(blockd) {
            for id in ids {
                st.deleting.insert((blockd.to_string(), id), (None, now));
                cmds.delete.push(id);
            }
        }
        cmds.replicate = st.copy_queue.remove(blockd).unwrap_or_default();
        // A report whose pieces stopped coming (the blockd restarted, a
        // piece failed) is given up after a while and asked for again.
        let reporting = st
            .reports
            .get(blockd)
            .is_some_and(|(_, started)| now_ns().saturating_sub(*started) < REPORT_GIVE_UP_NS);
        cmds.send_full_report = !reporting
            && st
                .last_full_report
                .get(blockd)
                .is_none_or(|t| t.elapsed() > self.cfg.block_report_interval);
        if cmds.send_full_report {
            // Asked once; asked again if no piece arrives within a minute.
            st.last_full_report.insert(
                blockd.to_string(),
                now - self.cfg.block_report_interval + Duration::from_secs(60),
            );
        }
        Ok(cmds)
    }

    /// One piece of a full block report: names the copies that are gone
    /// (commands to drop them are returned) and notes unnamed blocks as
    /// orphans.
    pub fn on_report(&self, r: &rpc::BlockReportRequest) -> Result<Vec<Op>, KvError> {
        let blockd = r.blockd_id.as_str();
        let table = namespace::blocks_in_range(&self.view, r.after, r.upto, usize::MAX)?;
        let recs: HashMap<String, BlockdRec> = namespace::blockds(&self.view)?.into_iter().collect();
        let mut st = self.lock();
        let started_ns = match st.reports.get(blockd) {
            Some((id, t)) if *id == r.report_id => *t,
            _ => {
                let t = now_ns();
                st.reports.insert(blockd.to_string(), (r.report_id, t));
                t
            }
        };
        let held: HashSet<u64> = r.block_ids.iter().copied().collect();
        let mut ops = Vec::new();
        let mut named = HashSet::new();
        for (id, b) in &table {
            if !b.replicas.iter().any(|x| x == blockd) {
                continue;
            }
            named.insert(*id);
            if held.contains(id) || b.born_ns > started_ns - MISSING_MARGIN_NS {
                continue;
            }
            // Gone from this blockd. Forget the copy only while a live one
            // remains elsewhere: with none, the map is all that is left.
            let others = classify(b, |x| self.blockds.is_live(x), &recs);
            if others.live() > 1 || (others.live() == 1 && !others.good.contains(&blockd.to_string())) {
                warn!(
                    block = id,
                    blockd, "a blockd's block report lacks a block it should hold; re-replicating"
                );
                ops.push(Op::DropReplicas {
                    block: *id,
                    blockds: vec![blockd.to_string()],
                    to_garbage: false,
                });
            } else if st.missing_logged.insert(*id) {
                warn!(
                    block = id,
                    blockd, "the only known copy of a block is missing from its blockd's report"
                );
            }
        }
        let age = self.orphan_age();
        let now = Instant::now();
        let known: HashSet<u64> = table.iter().map(|(id, _)| *id).collect();
        for (i, id) in r.block_ids.iter().enumerate() {
            if named.contains(id) || st.copying.contains_key(id) {
                continue;
            }
            // A block the table knows, on a blockd its map does not name, is
            // a surplus copy (say, on a blockd back from the dead): a reader
            // may still hold a map naming it, so it waits out the grace
            // period. A block the table does not know may be one a client
            // stored and has yet to commit: it waits out the orphan age.
            let due = if known.contains(id) {
                now + self.cfg.block_gc_grace
            } else {
                let held_for = Duration::from_secs(r.ages_s.get(i).copied().unwrap_or(0));
                now + age.saturating_sub(held_for)
            };
            st.orphans.entry((blockd.to_string(), *id)).or_insert(due);
        }
        if r.upto == u64::MAX {
            st.reports.remove(blockd);
            st.last_full_report.insert(blockd.to_string(), now);
            debug!(blockd, "full block report done");
        }
        Ok(ops)
    }

    /// One healing round: looks at the next page of the block table and
    /// returns the Raft commands it decided on (copies are queued for
    /// heartbeats).
    pub fn round(&self) -> Result<Vec<Op>, KvError> {
        let recs: HashMap<String, BlockdRec> = namespace::blockds(&self.view)?.into_iter().collect();
        let namespaces: HashMap<u32, u32> = namespace::list_namespaces(&self.view)?
            .into_iter()
            .map(|n| (n.id, n.replication))
            .collect();
        let floor_op = self.advance_floor()?;
        let floor = namespace::orphan_floor(&self.view)?;
        let cursor = self.lock().cursor;
        let page = namespace::blocks_in_range(&self.view, cursor, u64::MAX, SCAN_PAGE)?;
        let mut ops: Vec<Op> = floor_op.into_iter().collect();
        let now = Instant::now();
        let copy_deadline = now + self.cfg.client_timeout * 2;
        let mut st = self.lock();
        st.cursor = if page.len() < SCAN_PAGE {
            0
        } else {
            page.last().map_or(0, |(id, _)| *id)
        };
        st.copying.retain(|_, (_, until)| *until > now);
        let mut inflight: HashMap<String, usize> = HashMap::new();
        for (t, _) in st.copying.values() {
            *inflight.entry(t.clone()).or_default() += 1;
        }
        let limit = self.cfg.replication_inflight as usize;
        for (id, b) in &page {
            if ops.len() >= OPS_PER_ROUND {
                break;
            }
            let want = namespaces.get(&b.ns).copied().unwrap_or(1) as usize;
            let c = classify(b, |x| self.blockds.is_live(x), &recs);
            let p = plan(&c, want, |x| self.blockds.get(x).map_or(0, |i| i.free));
            if !p.forget.is_empty() {
                ops.push(Op::DropReplicas {
                    block: *id,
                    blockds: p.forget.clone(),
                    to_garbage: false,
                });
            }
            if !p.retire.is_empty() {
                ops.push(Op::DropReplicas {
                    block: *id,
                    blockds: p.retire.clone(),
                    to_garbage: true,
                });
            }
            if c.live() == 0 && st.missing_logged.insert(*id) {
                warn!(
                    block = id,
                    copies = ?b.replicas,
                    "no live blockd holds a copy of this block: reads of it fail until one comes back"
                );
            }
            if !p.copy || st.copying.contains_key(id) {
                continue;
            }
            let Some(target) = self.blockds.place_copy(b.len, &b.replicas) else {
                continue;
            };
            if inflight.get(&target.id).copied().unwrap_or(0) >= limit {
                continue;
            }
            let sources: Vec<String> = c
                .good
                .iter()
                .chain(c.draining.iter())
                .filter_map(|x| self.blockds.get(x).map(|i| i.address))
                .collect();
            debug!(block = id, target = %target.id, "re-replicating");
            *inflight.entry(target.id.clone()).or_default() += 1;
            st.copying.insert(*id, (target.id.clone(), copy_deadline));
            st.copy_queue.entry(target.id).or_default().push(rpc::ReplicateBlock {
                block_id: *id,
                len: b.len,
                sources,
            });
        }
        // Orphans past their age, still unnamed: delete.
        let due: Vec<(String, u64)> = st
            .orphans
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        drop(st);
        let mut deletes = Vec::new();
        for (blockd, id) in due {
            let named = namespace::block(&self.view, id)?.is_some_and(|b| b.replicas.contains(&blockd));
            deletes.push((blockd, id, named));
        }
        let mut st = self.lock();
        for (blockd, id, named) in deletes {
            if !named && id >= floor && namespace::block(&self.view, id)?.is_none() {
                // Not known and not old enough to be sure no client will
                // commit it: look again once the floor has passed it.
                st.orphans.insert((blockd, id), now + Duration::from_secs(60));
                continue;
            }
            st.orphans.remove(&(blockd.clone(), id));
            if !named && !st.copying.contains_key(&id) {
                info!(block = id, blockd = %blockd, "deleting a block no file refers to (left by a crashed client or a surplus copy)");
                st.delete_queue.entry(blockd).or_default().insert(id);
            }
        }
        drop(st);
        // Garbage waiting for blockds that were removed for good.
        let before = now_ns();
        let mut gone: HashMap<String, Vec<(i64, u64)>> = HashMap::new();
        for g in namespace::garbage(&self.view, before, 10_000)? {
            for r in g.replicas.iter().filter(|r| !recs.contains_key(*r)) {
                gone.entry(r.clone()).or_default().push((g.since_ns, g.block_id));
            }
        }
        for (replica, blocks) in gone {
            ops.push(Op::ForgetGarbage { replica, blocks });
        }
        Ok(ops)
    }
}

/// Proposes internal commands (not deduplicated: each is idempotent).
pub async fn propose_all(raft: &Raft, ops: Vec<Op>) {
    for op in ops {
        let cmd = Command {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            now_ns: now_ns(),
            session_ns: 0,
            op,
        };
        match raft.client_write(cmd).await {
            Ok(r) => {
                if let Err(e) = r.data {
                    debug!("block table update refused: {e}");
                }
            }
            Err(e) => {
                debug!("block table update not committed: {e}");
                return;
            }
        }
    }
}

/// The healing loop: a round every second while this node leads.
pub async fn run(healer: Arc<Healer>, raft: Raft, me: NodeId, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        let (leader, term) = {
            let m = raft.metrics().borrow().clone();
            (
                m.current_leader == Some(me) && m.state == openraft::ServerState::Leader,
                m.current_term,
            )
        };
        if !leader || !healer.warm(term) {
            continue;
        }
        // A restore is filling the block table in: nothing to judge yet.
        if namespace::recovery_state(&healer.view).is_ok_and(|r| r.is_some_and(|r| !r.finished)) {
            continue;
        }
        match healer.round() {
            Ok(ops) => propose_all(&raft, ops).await,
            Err(e) => warn!("block healing round failed reading the block table: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: BlockdState) -> BlockdRec {
        BlockdRec {
            address: String::new(),
            filesystem: String::new(),
            state,
        }
    }

    fn block(replicas: &[&str]) -> BlockInfo {
        BlockInfo {
            ns: 1,
            len: 10,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
            refs: 1,
            born_ns: 0,
        }
    }

    fn recs() -> HashMap<String, BlockdRec> {
        let mut m = HashMap::new();
        for id in ["a", "b", "c", "d"] {
            m.insert(id.to_string(), rec(BlockdState::Normal));
        }
        m.insert("x".into(), rec(BlockdState::Decommissioning));
        m
    }

    fn live(id: &str) -> bool {
        id != "d"
    }

    #[test]
    fn a_dead_copy_is_replaced_before_it_is_forgotten() {
        let c = classify(&block(&["a", "b", "d"]), live, &recs());
        assert_eq!(c.dead, vec!["d".to_string()]);
        let p = plan(&c, 3, |_| 0);
        assert!(p.copy);
        assert!(p.forget.is_empty() && p.retire.is_empty());
        // Once a third good copy exists, the dead one is forgotten.
        let c = classify(&block(&["a", "b", "d", "c"]), live, &recs());
        let p = plan(&c, 3, |_| 0);
        assert!(!p.copy);
        assert_eq!(p.forget, vec!["d".to_string()]);
        assert!(p.retire.is_empty());
    }

    #[test]
    fn draining_copies_go_only_once_enough_good_ones_exist() {
        let c = classify(&block(&["a", "x"]), live, &recs());
        let p = plan(&c, 2, |_| 0);
        assert!(p.copy, "one good copy of two wanted");
        assert!(p.retire.is_empty(), "the draining copy is still needed");
        let c = classify(&block(&["a", "x", "b"]), live, &recs());
        let p = plan(&c, 2, |_| 0);
        assert_eq!(p.retire, vec!["x".to_string()]);
    }

    #[test]
    fn surplus_comes_off_the_fullest_blockd() {
        let c = classify(&block(&["a", "b", "c"]), live, &recs());
        let p = plan(&c, 2, |x| if x == "b" { 1 } else { 100 });
        assert_eq!(p.retire, vec!["b".to_string()]);
        assert!(!p.copy);
    }

    #[test]
    fn no_live_copy_means_nothing_to_copy_from() {
        let c = classify(&block(&["d", "gone"]), live, &recs());
        assert_eq!(c.live(), 0);
        assert_eq!(plan(&c, 3, |_| 0), Plan::default());
    }
}
