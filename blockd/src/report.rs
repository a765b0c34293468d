//! The incremental block report: what changed on this blockd that the metad leader has not yet
//! heard about, and the quarantine of corrupt blocks that feeds it.
//!
//! Every heartbeat carries what is pending; the ids sent are forgotten only once a leader has
//! answered that heartbeat. A lost reply therefore means a resend, never a lost change: metad
//! must treat every entry as idempotent. An id recorded again while a heartbeat carrying it is in
//! flight stays pending, so the newer fact is sent too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use jfs_common::rpc::HeartbeatRequest;
use jfs_common::FsError;
use tracing::error;

use crate::block_store::BlockStore;

/// Most ids of one kind carried by one heartbeat; the rest follow in the next ones. Keeps a
/// heartbeat small after, say, a large delete command.
pub const MAX_IDS_PER_BEAT: usize = 100_000;

/// Changes waiting to be reported. Clones share the same pending sets.
#[derive(Clone, Default)]
pub struct Report {
    inner: Arc<Mutex<Pending>>,
}

/// Each set maps a block id to the generation at which it was (last) recorded, so an
/// acknowledgement removes only what was recorded before the heartbeat was built.
#[derive(Default)]
struct Pending {
    generation: u64,
    added: HashMap<u64, u64>,
    deleted: HashMap<u64, u64>,
    corrupt: HashMap<u64, u64>,
    replicate_failed: HashMap<u64, u64>,
}

/// What one heartbeat carries; hand it back to [`Report::acknowledge`] once a leader answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub added: Vec<u64>,
    pub deleted: Vec<u64>,
    pub corrupt: Vec<u64>,
    pub replicate_failed: Vec<u64>,
    generation: u64,
}

impl Outgoing {
    /// Copies the sets into a heartbeat request.
    pub fn fill(&self, req: &mut HeartbeatRequest) {
        req.added = self.added.clone();
        req.deleted = self.deleted.clone();
        req.corrupt = self.corrupt.clone();
        req.replicate_failed = self.replicate_failed.clone();
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.deleted.is_empty() && self.corrupt.is_empty() && self.replicate_failed.is_empty()
    }
}

fn sorted_upto(set: &HashMap<u64, u64>) -> Vec<u64> {
    let mut ids: Vec<u64> = set.keys().copied().collect();
    ids.sort_unstable();
    ids.truncate(MAX_IDS_PER_BEAT);
    ids
}

fn forget_sent(set: &mut HashMap<u64, u64>, sent: &[u64], generation: u64) {
    for id in sent {
        if set.get(id).is_some_and(|g| *g <= generation) {
            set.remove(id);
        }
    }
}

impl Report {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // The sets stay consistent whatever a panicking holder did: every update is one insert or remove.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block `id` is now stored here (copied as metad asked). Supersedes an earlier deletion,
    /// corruption or failed copy of the same id that metad has not heard of yet: only the final
    /// state matters to it.
    pub fn added(&self, id: u64) {
        let mut p = self.lock();
        p.generation += 1;
        let g = p.generation;
        p.deleted.remove(&id);
        p.corrupt.remove(&id);
        p.replicate_failed.remove(&id);
        p.added.insert(id, g);
    }

    /// These blocks are gone as metad asked (or were never here).
    pub fn deleted(&self, ids: impl IntoIterator<Item = u64>) {
        let mut p = self.lock();
        p.generation += 1;
        let g = p.generation;
        for id in ids {
            p.added.remove(&id);
            p.deleted.insert(id, g);
        }
    }

    /// Block `id` failed its checksums and is no longer served from here.
    pub fn corrupt(&self, id: u64) {
        let mut p = self.lock();
        p.generation += 1;
        let g = p.generation;
        p.added.remove(&id);
        p.corrupt.insert(id, g);
    }

    /// A copy metad asked for could not be made from any source.
    pub fn replicate_failed(&self, id: u64) {
        let mut p = self.lock();
        p.generation += 1;
        let g = p.generation;
        p.replicate_failed.insert(id, g);
    }

    /// The pending changes, for the next heartbeat. They stay pending until acknowledged.
    pub fn outgoing(&self) -> Outgoing {
        let p = self.lock();
        Outgoing {
            added: sorted_upto(&p.added),
            deleted: sorted_upto(&p.deleted),
            corrupt: sorted_upto(&p.corrupt),
            replicate_failed: sorted_upto(&p.replicate_failed),
            generation: p.generation,
        }
    }

    /// A leader answered the heartbeat that carried `sent`: forget exactly those entries,
    /// unless they were recorded again since.
    pub fn acknowledge(&self, sent: &Outgoing) {
        let mut p = self.lock();
        let g = sent.generation;
        forget_sent(&mut p.added, &sent.added, g);
        forget_sent(&mut p.deleted, &sent.deleted, g);
        forget_sent(&mut p.corrupt, &sent.corrupt, g);
        forget_sent(&mut p.replicate_failed, &sent.replicate_failed, g);
    }
}

/// Takes block `id` out of service after `err` (a checksum failure) showed up while `during`
/// (blocking). The client reads another replica; metad hears of it in the next heartbeat and
/// copies the block again from a good one. Only the caller that actually moved the files logs,
/// so a block read by many clients at once is reported once.
pub fn quarantine_corrupt(store: &BlockStore, report: &Report, id: u64, during: &str, err: &FsError) {
    match store.quarantine(id) {
        Ok(moved) if moved.is_empty() => {}
        Ok(moved) => {
            let files: Vec<String> = moved.iter().map(|p| p.display().to_string()).collect();
            error!(
                block = id,
                "block {id} is corrupt ({during}: {err}); moved it out of service to {} — metad will copy it again \
                 from another replica. Check the disk of {} (SMART, kernel log) if this repeats",
                files.join(" and "),
                store.root().display()
            );
            report.corrupt(id);
        }
        Err(e) => {
            // It stays in place and keeps failing reads; metad must still hear that this copy is bad.
            error!(
                block = id,
                "block {id} is corrupt ({during}: {err}) and could not be moved out of service: {e}"
            );
            report.corrupt(id);
        }
    }
}

/// [`quarantine_corrupt`] off the async reactor, without waiting for it: the failed read has
/// already answered its caller.
pub fn quarantine_in_background(store: Arc<BlockStore>, report: Report, id: u64, during: &'static str, err: FsError) {
    tokio::task::spawn_blocking(move || quarantine_corrupt(&store, &report, id, during, &err));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_was_sent_and_answered_is_forgotten() {
        let r = Report::default();
        r.added(1);
        r.deleted([2, 3]);
        r.corrupt(4);
        r.replicate_failed(5);
        let sent = r.outgoing();
        assert_eq!(sent.added, vec![1]);
        assert_eq!(sent.deleted, vec![2, 3]);
        assert_eq!(sent.corrupt, vec![4]);
        assert_eq!(sent.replicate_failed, vec![5]);

        // Recorded while the heartbeat is in flight: a new id, and one sent already.
        r.deleted([6, 2]);
        // The reply was lost: everything is sent again.
        let again = r.outgoing();
        assert_eq!(again.deleted, vec![2, 3, 6]);
        assert_eq!(again.added, vec![1]);

        r.acknowledge(&sent);
        let rest = r.outgoing();
        assert_eq!(rest.added, Vec::<u64>::new());
        assert_eq!(rest.deleted, vec![2, 6], "re-recorded and new ids must stay");
        assert!(rest.corrupt.is_empty() && rest.replicate_failed.is_empty());
        r.acknowledge(&rest);
        assert!(r.outgoing().is_empty());
    }

    #[test]
    fn the_latest_fact_about_a_block_wins() {
        let r = Report::default();
        r.added(7);
        r.deleted([7]);
        assert_eq!(r.outgoing().added, Vec::<u64>::new());
        assert_eq!(r.outgoing().deleted, vec![7]);
        r.corrupt(8);
        r.added(8);
        assert_eq!(r.outgoing().corrupt, Vec::<u64>::new());
        assert_eq!(r.outgoing().added, vec![8]);
    }

    #[test]
    fn a_heartbeat_carries_a_bounded_number_of_ids() {
        let r = Report::default();
        r.deleted(0..(MAX_IDS_PER_BEAT as u64 + 10));
        let first = r.outgoing();
        assert_eq!(first.deleted.len(), MAX_IDS_PER_BEAT);
        r.acknowledge(&first);
        let second = r.outgoing();
        assert_eq!(second.deleted.len(), 10);
        assert_eq!(second.deleted[0], MAX_IDS_PER_BEAT as u64);
    }

    #[test]
    fn fills_a_heartbeat() {
        let r = Report::default();
        r.added(1);
        r.corrupt(2);
        let mut req = HeartbeatRequest::default();
        r.outgoing().fill(&mut req);
        assert_eq!((req.added, req.corrupt), (vec![1], vec![2]));
    }

    #[test]
    fn quarantine_reports_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(dir.path()).unwrap());
        store.write(9, b"data").unwrap();
        let r = Report::default();
        let err = FsError::Corrupt("test".into());
        quarantine_corrupt(&store, &r, 9, "a test read", &err);
        assert_eq!(r.outgoing().corrupt, vec![9]);
        r.acknowledge(&r.outgoing());
        // Already gone: a second reader of the same bad block adds nothing.
        quarantine_corrupt(&store, &r, 9, "a test read", &err);
        assert!(r.outgoing().is_empty());
        assert_eq!(store.block_count(), 0);
    }
}
