//! Durable Raft state on one node: the log, the vote and the state machine,
//! all in one RocksDB with a column family each.
//!
//! Durability rule (DESIGN §5): an append is acknowledged to openraft only
//! after its WAL record is fsynced. Appends are written unsynced (so they are
//! readable at once for replication) and a flusher thread then fsyncs the WAL
//! and fires every callback that fsync covered — one fsync per burst of
//! appends instead of one per entry (group commit). The state machine writes
//! one atomic `WriteBatch` per applied burst, including `last_applied`; it
//! rides the same WAL, so it is durable no later than the next log fsync, and
//! anything lost is re-applied from the log on restart.
//!
//! The leader does not wait for its own fsync before replicating. openraft
//! 0.9 blocks its core on each append until the append's callback fires, so
//! a leader that reported only after the fsync would send every entry to the
//! followers one fsync late (measured: 0.9 ms of a 2.7 ms commit). An append
//! the leader makes in its own term is therefore reported written at once,
//! and `LogDurability` keeps the rule "acknowledged = fsynced on a
//! majority" where it matters:
//! * the state machine applies nothing (so nothing is answered or becomes
//!   readable) until every append made so far is fsynced here — a commit
//!   counted on the leader's unsynced copy waits for it;
//! * the commit index sent to followers is capped at what is fsynced here,
//!   so no follower applies an entry that a power cut of the leader could
//!   still take back.
//! Followers report an append only after its fsync, as before.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError, Vote,
};
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::kv::{KvError, KvRead, Txn};
use crate::namespace;
use crate::raft_types::{ApplyResult, Entry, LogId, NodeId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const CF_LOG: &str = "log";
const CF_RAFT: &str = "raft";
const CF_SM: &str = "sm";
const CF_SM_META: &str = "sm_meta";
/// The physical writes of applied entries, kept for the table-store mirror
/// until it has shipped them (see `MirrorRecord`).
const CF_MIRROR: &str = "mirror";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Store, ErrorVerb::Write, e)
}

fn ser<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(v).map_err(write_err)
}

fn de<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, StorageError> {
    bincode::deserialize(b).map_err(|e| {
        read_err(KvError(format!(
            "cannot decode a stored {} ({} bytes): {e}",
            std::any::type_name::<T>(),
            b.len()
        )))
    })
}

fn idx_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

/// Opens (or creates) the node's database.
pub fn open_db(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Metadata is small and hot: keep it simple and let RocksDB size itself.
    opts.set_max_background_jobs(2);
    // Reusing old WAL files turns log appends into overwrites, so the fsync
    // that acknowledges an entry need not also journal a file-size change
    // (measured on ext4 here: 0.12 ms instead of 0.24 ms per fdatasync).
    opts.set_recycle_log_file_num(4);
    // A WAL file goes only when every column family has flushed what it
    // holds, and the quiet families (vote, mirror state) rarely fill a
    // memtable: without a cap, the WAL grew to RocksDB's default limit of
    // four times all memtables (1.5 GiB here) before anything was deleted
    // or recycled (a drift run: 60 MiB more every ~25,000 entries). Past
    // this total, the family that pins the oldest file is flushed.
    opts.set_max_total_wal_size(256 << 20);
    // (Smaller memtables, to roll and recycle the WAL sooner, made the
    // log's fsyncs cheaper but one writer's creates through FUSE slower:
    // more flushes and L0 files on the read path. See docs/PERFORMANCE.md.)
    let cfs =
        [CF_LOG, CF_RAFT, CF_SM, CF_SM_META, CF_MIRROR].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    DB::open_cf_descriptors(&opts, dir, cfs).map(Arc::new)
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    // The families are created at open, so their absence is a bug.
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} missing"))
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

// ------------------------------------------------------------------ log

/// How far the log is on disk (see the module doc: the leader's appends are
/// reported before their fsync). Shared by the log store, the state machine
/// and the Raft network.
pub struct LogDurability {
    db: Arc<DB>,
    state: std::sync::Mutex<Synced>,
    /// The number of the last append whose fsync completed (`u64::MAX`
    /// once an fsync failed: nothing may be applied after that).
    synced: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Synced {
    /// Appends written so far, numbered from 1.
    submitted: u64,
    /// Last log index a completed fsync covered, in the current log (a
    /// truncation lowers it and starts a new epoch, so that an fsync still
    /// in flight for truncated entries cannot raise it again).
    index: u64,
    epoch: u64,
    failed: bool,
}

impl LogDurability {
    fn new(db: Arc<DB>) -> Result<Arc<LogDurability>, rocksdb::Error> {
        // After a crash RocksDB also recovers WAL records that reached only
        // the page cache: sync them before counting the log as on disk.
        db.flush_wal(true)?;
        let index = last_log_index(&db).unwrap_or(0);
        Ok(Arc::new(LogDurability {
            db,
            state: std::sync::Mutex::new(Synced {
                index,
                ..Default::default()
            }),
            synced: tokio::sync::watch::channel(0).0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Synced> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every append written so far is fsynced.
    pub async fn wait_for_written(&self) -> Result<(), StorageError> {
        let target = self.lock().submitted;
        let mut rx = self.synced.subscribe();
        let res = rx.wait_for(|&s| s >= target).await.map(|s| *s);
        match res {
            Ok(u64::MAX) | Err(_) => Err(write_err(KvError(
                "an fsync of the Raft log failed; this node stops applying (restart it)".into(),
            ))),
            Ok(_) => Ok(()),
        }
    }

    /// `commit` capped at the last entry fsynced on this node, for the
    /// commit index sent to followers.
    pub fn cap_commit(&self, commit: Option<LogId>) -> Option<LogId> {
        let c = commit?;
        let synced = self.lock().index;
        if c.index <= synced {
            return Some(c);
        }
        // The entry at `synced` precedes `c`, so it is committed too;
        // followers ignore a commit index lower than the one they know.
        match self.db.get_cf(cf(&self.db, CF_LOG), idx_key(synced)) {
            Ok(Some(v)) => de::<Entry>(&v).ok().map(|e| e.log_id),
            _ => None,
        }
    }

    fn truncated(&self, since: u64) {
        let mut s = self.lock();
        s.epoch += 1;
        s.index = s.index.min(since.saturating_sub(1));
    }
}

fn last_log_index(db: &DB) -> Option<u64> {
    let mut it = db.iterator_cf(cf(db, CF_LOG), IteratorMode::End);
    let (k, _) = it.next()?.ok()?;
    Some(u64::from_be_bytes(k.as_ref().try_into().ok()?))
}

/// One append handed to the fsync thread.
struct Flush {
    seq: u64,
    epoch: u64,
    entries: usize,
    last_index: u64,
    /// `None` when the append was already reported (the leader's own).
    callback: Option<LogFlushed<TypeConfig>>,
}

/// Raft log and vote. Cloned as the log reader.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    me: NodeId,
    /// The vote last saved or read: whether this node leads, and which term.
    vote: Arc<std::sync::Mutex<Option<Vote<NodeId>>>>,
    durable: Arc<LogDurability>,
    flusher: std_mpsc::Sender<Flush>,
}

impl LogStore {
    pub fn new(db: Arc<DB>, me: NodeId) -> Result<LogStore, rocksdb::Error> {
        let (tx, rx) = std_mpsc::channel::<Flush>();
        let durable = LogDurability::new(db.clone())?;
        let (fdb, d) = (db.clone(), durable.clone());
        std::thread::Builder::new()
            .name("raft-log-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    // How much each fsync carries is what group commit buys:
                    // exported so a benchmark can report the batch sizes.
                    let entries: usize = batch.iter().map(|f| f.entries).sum();
                    metrics::histogram!("jfs_raft_log_flush_entries").record(entries as f64);
                    let started = std::time::Instant::now();
                    let res = fdb.flush_wal(true);
                    metrics::histogram!("jfs_raft_log_fsync_seconds").record(started.elapsed().as_secs_f64());
                    {
                        let mut s = d.lock();
                        s.failed |= res.is_err();
                        if res.is_ok() {
                            let epoch = s.epoch;
                            for f in batch.iter().filter(|f| f.epoch == epoch) {
                                s.index = s.index.max(f.last_index);
                            }
                        }
                        let seq = batch.iter().map(|f| f.seq).max().unwrap_or(0);
                        d.synced.send_replace(if s.failed { u64::MAX } else { seq });
                    }
                    for f in batch {
                        if let Some(cb) = f.callback {
                            cb.log_io_completed(res.clone().map_err(|e| std::io::Error::other(e.to_string())));
                        }
                    }
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the log fsync thread: {e}"));
        Ok(LogStore {
            db,
            me,
            vote: Default::default(),
            durable,
            flusher: tx,
        })
    }

    /// Shared with the state machine and the network (see `LogDurability`).
    pub fn durability(&self) -> Arc<LogDurability> {
        self.durable.clone()
    }

    /// The term this node leads, if it is the established leader.
    fn leading_term(&self) -> Option<u64> {
        let v = (*self.vote.lock().unwrap_or_else(|p| p.into_inner()))?;
        (v.is_committed() && v.leader_id().voted_for() == Some(self.me)).then_some(v.leader_id().term)
    }

    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(cf(&self.db, CF_RAFT), key).map_err(read_err)? {
            Some(v) => Ok(Some(de(&v)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], v: &T, sync: bool) -> Result<(), StorageError> {
        let opts = if sync { sync_opts() } else { WriteOptions::default() };
        self.db
            .put_cf_opt(cf(&self.db, CF_RAFT), key, ser(v)?, &opts)
            .map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&idx_key(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| read_err(KvError("bad log key".into())))?,
            );
            if !range.contains(&idx) {
                break;
            }
            if out.is_empty() && idx != start && matches!(range.start_bound(), Bound::Included(_) | Bound::Excluded(_))
            {
                // The head of the range is purged. Handing back a later
                // entry would let the caller ship a log with a hole in it
                // (which a follower then trips over); return nothing, so
                // replication falls back instead of corrupting a log.
                warn_purged_range(start, idx);
                return Ok(Vec::new());
            }
            out.push(de::<Entry>(&v)?);
        }
        Ok(out)
    }
}

/// Logs a request for purged entries at most once a minute (openraft
/// retries such a request every 10 ms).
fn warn_purged_range(start: u64, first_present: u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.saturating_sub(LAST.swap(now, Ordering::Relaxed)) >= 60 {
        tracing::warn!(
            start,
            first_present,
            "a follower needs log entries this node has purged; it cannot catch up by log replication              (known issue: restart this node to make it send a snapshot)"
        );
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End);
        let last = match it.next() {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                Some(de::<Entry>(&v)?.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote, true)?;
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let v: Option<Vote<NodeId>> = self.get_meta(KEY_VOTE)?;
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = v;
        Ok(v)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        let leading = self.leading_term();
        let mut own = true;
        let (mut n, mut last_index) = (0, 0);
        for e in entries {
            // One leader per term: an entry of the term this node leads is
            // one this node proposed.
            own &= leading == Some(e.log_id.leader_id.term);
            last_index = e.log_id.index;
            batch.put_cf(log, idx_key(e.log_id.index), ser(&e)?);
            n += 1;
        }
        self.db.write(batch).map_err(write_err)?;
        let (seq, epoch) = {
            let mut s = self.durable.lock();
            s.submitted += 1;
            (s.submitted, s.epoch)
        };
        let callback = if own && n > 0 {
            callback.log_io_completed(Ok(()));
            None
        } else {
            Some(callback)
        };
        let flush = Flush {
            seq,
            epoch,
            entries: n,
            last_index,
            callback,
        };
        if self.flusher.send(flush).is_err() {
            return Err(write_err(KvError("log fsync thread is gone".into())));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let log = cf(&self.db, CF_LOG);
        self.durable.truncated(log_id.index);
        self.db
            .delete_range_cf(log, idx_key(log_id.index), idx_key(u64::MAX))
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta(KEY_PURGED, &log_id, false)?;
        let log = cf(&self.db, CF_LOG);
        self.db
            .delete_range_cf(log, idx_key(0), idx_key(log_id.index + 1))
            .map_err(write_err)
    }
}

// ------------------------------------------------------------------ state machine

/// Read view of the applied namespace, shared with the RPC handlers.
#[derive(Clone)]
pub struct SmView {
    db: Arc<DB>,
    /// Moves on after every applied change to a namespace's grants (and a
    /// snapshot install), so the service can cache grants, which it checks
    /// on every call, and know when to read them again.
    access_epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl SmView {
    pub fn new(db: Arc<DB>) -> SmView {
        SmView {
            db,
            access_epoch: Arc::default(),
        }
    }

    /// Read before reading grants: a grant read under epoch `e` is current
    /// while this still returns `e`.
    pub fn access_epoch(&self) -> u64 {
        self.access_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// After the change is in the store.
    fn access_changed(&self) {
        self.access_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl KvRead for SmView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.db
            .get_cf(cf(&self.db, CF_SM), key)
            .map_err(|e| KvError(e.to_string()))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        let (opts, mode) = scan_opts(prefix, after);
        collect_scan(
            self.db.iterator_cf_opt(cf(&self.db, CF_SM), opts, mode),
            prefix,
            after,
            limit,
        )
    }
}

impl SmView {
    /// The id of the last entry in this node's log (or of the last purged
    /// one when the log is empty after a snapshot).
    pub fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End);
        if let Some(item) = it.next() {
            let (_, v) = item.map_err(read_err)?;
            return Ok(Some(de::<Entry>(&v)?.log_id));
        }
        match self.db.get_cf(cf(&self.db, CF_RAFT), KEY_PURGED).map_err(read_err)? {
            Some(b) => de(&b),
            None => Ok(None),
        }
    }

    /// Bytes the Raft log and the namespace take in RocksDB (SST files plus
    /// memtables; RocksDB's own estimate, cheap to read).
    pub fn storage_bytes(&self) -> (u64, u64) {
        let size = |name: &str| {
            let cf = cf(&self.db, name);
            ["rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"]
                .iter()
                .filter_map(|p| self.db.property_int_value_cf(cf, *p).ok().flatten())
                .sum::<u64>()
        };
        (size(CF_LOG), size(CF_SM))
    }

    /// The commit index this node has recorded (openraft saves it with
    /// `save_committed`); may trail the leader's by a heartbeat.
    pub fn committed_index(&self) -> Result<u64, StorageError> {
        let v = self.db.get_cf(cf(&self.db, CF_RAFT), KEY_COMMITTED).map_err(read_err)?;
        let id: Option<LogId> = match v {
            Some(b) => de(&b)?,
            None => None,
        };
        Ok(id.map_or(0, |l| l.index))
    }

    /// A digest of the whole state machine and the applied index it is of,
    /// from one RocksDB snapshot. Replicas at the same index must agree; it
    /// reads everything, so it is for operators, not for routine polling.
    pub fn digest(&self) -> Result<(u64, String), StorageError> {
        let snap = self.db.snapshot();
        let applied: Option<LogId> = match snap.get_cf(cf(&self.db, CF_SM_META), KEY_APPLIED).map_err(read_err)? {
            Some(b) => de(&b)?,
            None => None,
        };
        let (mut keys_crc, mut all_crc, mut n) = (0u32, 0u32, 0u64);
        for item in snap.iterator_cf(cf(&self.db, CF_SM), IteratorMode::Start) {
            let (k, v) = item.map_err(read_err)?;
            // Lengths go in too, so that moving a byte from a key to its
            // value changes the digest.
            keys_crc = crc32c::crc32c_append(keys_crc, &(k.len() as u64).to_be_bytes());
            keys_crc = crc32c::crc32c_append(keys_crc, &k);
            all_crc = crc32c::crc32c_append(all_crc, &(k.len() as u64).to_be_bytes());
            all_crc = crc32c::crc32c_append(all_crc, &k);
            all_crc = crc32c::crc32c_append(all_crc, &(v.len() as u64).to_be_bytes());
            all_crc = crc32c::crc32c_append(all_crc, &v);
            n += 1;
        }
        Ok((
            applied.map_or(0, |l| l.index),
            format!("{keys_crc:08x}{all_crc:08x}-{n}"),
        ))
    }

    /// A consistent view at this instant, for reads that look at several
    /// keys (a chunk and the blocks it refers to) while commits go on.
    pub fn snapshot(&self) -> SmSnapshot<'_> {
        SmSnapshot {
            db: &self.db,
            snap: self.db.snapshot(),
        }
    }
}

/// The mirrored writes of applied entries `first..=last` (one apply burst),
/// net of each other: replaying a record over the state as of any index in
/// `first - 1 ..= last` gives the state as of `last`, because every key the
/// burst touched ends at its final value. `at_ns` is the newest leader clock
/// among the entries (for the mirror's lag in seconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorRecord {
    pub first: u64,
    pub last: u64,
    pub at_ns: i64,
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl SmView {
    /// Records covering indexes after `after`, in order, up to about
    /// `max_bytes` of writes (at least one record when there is one).
    pub fn mirror_records(&self, after: u64, max_bytes: usize) -> Result<Vec<MirrorRecord>, StorageError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let it = self.db.iterator_cf(
            cf(&self.db, CF_MIRROR),
            IteratorMode::From(&idx_key(after.saturating_add(1)), Direction::Forward),
        );
        for item in it {
            let (_, v) = item.map_err(read_err)?;
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push(de::<MirrorRecord>(&v)?);
        }
        Ok(out)
    }

    /// (first index covered, last index covered, records) of the backlog.
    pub fn mirror_backlog(&self) -> Result<Option<(u64, u64, u64)>, StorageError> {
        let m = cf(&self.db, CF_MIRROR);
        let first = match self.db.iterator_cf(m, IteratorMode::Start).next() {
            Some(item) => de::<MirrorRecord>(&item.map_err(read_err)?.1)?.first,
            None => return Ok(None),
        };
        let last = match self.db.iterator_cf(m, IteratorMode::End).next() {
            Some(item) => de::<MirrorRecord>(&item.map_err(read_err)?.1)?.last,
            None => return Ok(None),
        };
        Ok(Some((first, last, last.saturating_sub(first) + 1)))
    }

    /// Drops the records wholly at or below `index` (shipped, or given up).
    pub fn trim_mirror(&self, index: u64) -> Result<(), StorageError> {
        self.db
            .delete_range_cf(cf(&self.db, CF_MIRROR), idx_key(0), idx_key(index.saturating_add(1)))
            .map_err(write_err)
    }

    pub fn applied_index(&self) -> Result<u64, StorageError> {
        let v = self
            .db
            .get_cf(cf(&self.db, CF_SM_META), KEY_APPLIED)
            .map_err(read_err)?;
        let id: Option<LogId> = match v {
            Some(b) => de(&b)?,
            None => None,
        };
        Ok(id.map_or(0, |l| l.index))
    }
}

pub struct SmSnapshot<'a> {
    db: &'a DB,
    snap: rocksdb::Snapshot<'a>,
}

impl SmSnapshot<'_> {
    /// The applied index this snapshot shows the state at.
    pub fn applied_index(&self) -> Result<u64, StorageError> {
        let v = self
            .snap
            .get_cf(cf(self.db, CF_SM_META), KEY_APPLIED)
            .map_err(read_err)?;
        let id: Option<LogId> = match v {
            Some(b) => de(&b)?,
            None => None,
        };
        Ok(id.map_or(0, |l| l.index))
    }

    /// Every state-machine row, in key order, from this snapshot.
    pub fn rows(&self) -> impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), KvError>> + '_ {
        self.snap
            .iterator_cf(cf(self.db, CF_SM), IteratorMode::Start)
            .map(|r| r.map_err(|e| KvError(e.to_string())))
    }
}

impl KvRead for SmSnapshot<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.snap
            .get_cf(cf(self.db, CF_SM), key)
            .map_err(|e| KvError(e.to_string()))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        let (opts, mode) = scan_opts(prefix, after);
        collect_scan(
            self.snap.iterator_cf_opt(cf(self.db, CF_SM), opts, mode),
            prefix,
            after,
            limit,
        )
    }
}

fn scan_opts<'k>(prefix: &'k [u8], after: Option<&'k [u8]>) -> (rocksdb::ReadOptions, IteratorMode<'k>) {
    let start = after.unwrap_or(prefix);
    let mut opts = rocksdb::ReadOptions::default();
    // Bound the iterator to the prefix: without it, a scan that finds
    // nothing keeps walking over the deletion tombstones of whatever
    // range follows (e.g. a big directory's removed entries), which
    // made every file deletion slower than the one before.
    if let Some(upper) = prefix_successor(prefix) {
        opts.set_iterate_upper_bound(upper);
    }
    (opts, IteratorMode::From(start, Direction::Forward))
}

type ScanItem = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>;

fn collect_scan(
    it: impl Iterator<Item = ScanItem>,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
    let mut out = Vec::new();
    for item in it {
        if out.len() >= limit {
            break;
        }
        let (k, v) = item.map_err(|e| KvError(e.to_string()))?;
        if !k.starts_with(prefix) {
            break;
        }
        if after.is_some_and(|a| k.as_ref() == a) {
            continue;
        }
        out.push((k.into_vec(), v.into_vec()));
    }
    Ok(out)
}

/// The smallest key greater than every key that starts with `prefix`
/// (None when the prefix is all 0xff bytes: no upper bound exists).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

pub struct StateMachine {
    db: Arc<DB>,
    view: SmView,
    snapshot_path: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Keep `MirrorRecord`s of applied entries (the mirror or a recovery
    /// cluster, which will mirror once it leaves recovery mode, needs them).
    record_mirror: bool,
    /// Nothing is applied before it is fsynced here (see the module doc).
    durable: Arc<LogDurability>,
}

impl StateMachine {
    pub fn new(
        db: Arc<DB>,
        data_dir: &Path,
        record_mirror: bool,
        durable: Arc<LogDurability>,
    ) -> Result<StateMachine, StorageError> {
        let meta = cf(&db, CF_SM_META);
        let last_applied = match db.get_cf(meta, KEY_APPLIED).map_err(read_err)? {
            Some(v) => de(&v)?,
            None => None,
        };
        let membership = match db.get_cf(meta, KEY_MEMBERSHIP).map_err(read_err)? {
            Some(v) => de(&v)?,
            None => StoredMembership::default(),
        };
        Ok(StateMachine {
            view: SmView::new(db.clone()),
            db,
            snapshot_path: data_dir.join("snapshot.bin"),
            last_applied,
            membership,
            record_mirror,
            durable,
        })
    }

    pub fn view(&self) -> SmView {
        self.view.clone()
    }
}

pub struct SnapshotBuilder {
    db: Arc<DB>,
    snapshot_path: PathBuf,
}

/// Serializes every state machine row as of one RocksDB snapshot.
fn dump_state(db: &DB) -> Result<(Option<LogId>, StoredMembership, Vec<u8>), StorageError> {
    let snap = db.snapshot();
    let meta = cf(db, CF_SM_META);
    let last_applied: Option<LogId> = match snap.get_cf(meta, KEY_APPLIED).map_err(read_err)? {
        Some(v) => de(&v)?,
        None => None,
    };
    let membership: StoredMembership = match snap.get_cf(meta, KEY_MEMBERSHIP).map_err(read_err)? {
        Some(v) => de(&v)?,
        None => StoredMembership::default(),
    };
    let mut rows: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for item in snap.iterator_cf(cf(db, CF_SM), IteratorMode::Start) {
        let (k, v) = item.map_err(read_err)?;
        rows.push((k.into_vec(), v.into_vec()));
    }
    Ok((last_applied, membership, ser(&rows)?))
}

fn write_snapshot_file(path: &Path, file: &SnapshotFile) -> Result<(), StorageError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let bytes = ser(file)?;
    let mut f = std::fs::File::create(&tmp).map_err(write_err)?;
    f.write_all(&bytes).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (last_applied, membership, data) = dump_state(&self.db)?;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        write_snapshot_file(&self.snapshot_path, &file)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(file.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // A commit may have counted this node's copy before its fsync.
        self.durable.wait_for_written().await?;
        let mut replies = Vec::new();
        let mut txn = Txn::new(&self.view);
        let mut last = self.last_applied;
        let mut first_index = None;
        let mut membership_changed = false;
        let mut mirrored: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
        let mut at_ns = 0i64;
        for entry in entries {
            last = Some(entry.log_id);
            first_index.get_or_insert(entry.log_id.index);
            match entry.payload {
                EntryPayload::Blank => replies.push(Ok(crate::raft_types::Reply::Ok)),
                EntryPayload::Normal(cmd) if self.record_mirror && !cmd.op.is_restore() => {
                    // Each entry on its own transaction, to see which of its
                    // writes the mirror ships.
                    let mut one = Txn::new(&txn);
                    let r = namespace::apply_command(&mut one, &cmd).map_err(write_err)?;
                    for (k, v) in one.into_writes() {
                        if crate::keys::mirror_target(&k).is_some() {
                            mirrored.insert(k.clone(), v.clone());
                        }
                        match v {
                            Some(v) => txn.put(k, v),
                            None => txn.delete(k),
                        }
                    }
                    at_ns = at_ns.max(cmd.now_ns);
                    replies.push(r);
                }
                EntryPayload::Normal(cmd) => {
                    let r = namespace::apply_command(&mut txn, &cmd).map_err(write_err)?;
                    replies.push(r);
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    membership_changed = true;
                    replies.push(Ok(crate::raft_types::Reply::Ok));
                }
            }
        }
        let writes = txn.into_writes();
        let access_changed = writes.keys().any(|k| crate::keys::is_ns_access(k));
        let mut batch = WriteBatch::default();
        let sm = cf(&self.db, CF_SM);
        for (k, v) in writes {
            match v {
                Some(v) => batch.put_cf(sm, k, v),
                None => batch.delete_cf(sm, k),
            }
        }
        if let (true, Some(first), Some(l)) = (self.record_mirror, first_index, last) {
            // Every burst gets a record, empty or not: the mirror checks
            // that the records it ships cover the indexes without a gap.
            let rec = MirrorRecord {
                first,
                last: l.index,
                at_ns,
                writes: mirrored.into_iter().collect(),
            };
            batch.put_cf(cf(&self.db, CF_MIRROR), idx_key(l.index), ser(&rec)?);
        }
        let meta = cf(&self.db, CF_SM_META);
        batch.put_cf(meta, KEY_APPLIED, ser(&last)?);
        if membership_changed {
            batch.put_cf(meta, KEY_MEMBERSHIP, ser(&self.membership)?);
        }
        self.db.write(batch).map_err(write_err)?;
        if access_changed {
            self.view.access_changed();
        }
        self.last_applied = last;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            snapshot_path: self.snapshot_path.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = de(&data)?;
        let sm = cf(&self.db, CF_SM);
        let mut batch = WriteBatch::default();
        // Every state machine key starts with an ASCII table letter.
        batch.delete_range_cf(sm, [0u8].as_slice(), [0xffu8; 16].as_slice());
        // The records describe the replaced state: the mirror re-exports
        // if it still needed them.
        batch.delete_range_cf(cf(&self.db, CF_MIRROR), idx_key(0), idx_key(u64::MAX));
        for (k, v) in rows {
            batch.put_cf(sm, k, v);
        }
        let m = cf(&self.db, CF_SM_META);
        batch.put_cf(m, KEY_APPLIED, ser(&meta.last_log_id)?);
        batch.put_cf(m, KEY_MEMBERSHIP, ser(&meta.last_membership)?);
        self.db.write_opt(batch, &sync_opts()).map_err(write_err)?;
        self.view.access_changed();
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        write_snapshot_file(
            &self.snapshot_path,
            &SnapshotFile {
                meta: meta.clone(),
                data,
            },
        )?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let bytes = match std::fs::read(&self.snapshot_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let file: SnapshotFile = de(&bytes)?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload, LogId as RLogId};

    #[test]
    fn the_commit_sent_to_followers_never_passes_what_is_fsynced_here() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).unwrap();
        let entry = |term, index| Entry {
            log_id: RLogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        };
        for i in 1..=5 {
            db.put_cf(cf(&db, CF_LOG), idx_key(i), ser(&entry(2, i)).unwrap())
                .unwrap();
        }
        // At start-up the whole log was recovered from disk.
        let d = LogDurability::new(db.clone()).unwrap();
        let at = |term, index| Some(RLogId::new(CommittedLeaderId::new(term, 1), index));
        assert_eq!(d.cap_commit(at(2, 4)), at(2, 4));
        assert_eq!(d.cap_commit(None), None);
        // Entries 6 and 7 written, only 6 fsynced: the commit stops at 6.
        for i in 6..=7 {
            db.put_cf(cf(&db, CF_LOG), idx_key(i), ser(&entry(3, i)).unwrap())
                .unwrap();
        }
        d.lock().index = 6;
        assert_eq!(d.cap_commit(at(3, 7)), at(3, 6));
        // A truncation takes the fsynced mark back with it, and an fsync
        // still in flight for the truncated entries (an older epoch) cannot
        // raise it again (the flusher checks the epoch).
        let epoch = d.lock().epoch;
        d.truncated(4);
        assert_eq!(d.lock().index, 3);
        assert_ne!(d.lock().epoch, epoch);
        assert_eq!(d.cap_commit(at(2, 5)), at(2, 3));
    }

    #[tokio::test]
    async fn applying_waits_for_every_written_append_and_fails_after_a_failed_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let d = LogDurability::new(open_db(dir.path()).unwrap()).unwrap();
        d.wait_for_written().await.unwrap();
        d.lock().submitted = 2;
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.wait_for_written().await }
        });
        d.synced.send_replace(1);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "append 2 is not fsynced yet");
        d.synced.send_replace(2);
        waiting.await.unwrap().unwrap();
        d.synced.send_replace(u64::MAX);
        assert!(d.wait_for_written().await.is_err());
    }

    #[test]
    fn prefix_successor_bounds_the_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
    }

    #[test]
    fn raft_types_round_trip_through_bincode() {
        let id: LogId = RLogId::new(CommittedLeaderId::new(3, 1), 42);
        let back: LogId = de(&ser(&id).unwrap()).unwrap();
        assert_eq!(back, id);
        let some: Option<LogId> = Some(id);
        assert_eq!(de::<Option<LogId>>(&ser(&some).unwrap()).unwrap(), some);
        let vote = Vote::<NodeId>::new_committed(3, 2);
        assert_eq!(de::<Vote<NodeId>>(&ser(&vote).unwrap()).unwrap(), vote);
        let e = Entry {
            log_id: id,
            payload: EntryPayload::Blank,
        };
        let back: Entry = de(&ser(&e).unwrap()).unwrap();
        assert_eq!(back.log_id, id);
        let m = StoredMembership::default();
        let _: StoredMembership = de(&ser(&m).unwrap()).unwrap();
        let nodes: std::collections::BTreeMap<u64, crate::raft_types::MetaNode> = (1..=3)
            .map(|i| {
                (
                    i,
                    crate::raft_types::MetaNode {
                        raft_addr: format!("h:{i}"),
                        rpc_addr: format!("h:{i}1"),
                    },
                )
            })
            .collect();
        let m = StoredMembership::new(Some(id), openraft::Membership::from(nodes));
        assert_eq!(de::<StoredMembership>(&ser(&m).unwrap()).unwrap(), m);
    }
}
