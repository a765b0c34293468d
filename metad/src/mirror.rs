//! The table-store mirror (DESIGN §7): the leader ships every committed
//! change to a DynamoDB table per namespace, asynchronously, so a new cluster
//! can be restored from the tables after the whole metadata cluster is lost.
//!
//! What is shipped is physical: each applied burst of entries leaves a
//! `MirrorRecord` (its net key writes) in the node's database, in the same
//! write batch as the state change, on every node. A shipping round takes the
//! records after the table's watermark and writes, in this order:
//!
//! 1. a **log item** with their net writes (in the cluster table, keyed by
//!    owner epoch and first index);
//! 2. the **rows** (one item per key, in its namespace's table or the
//!    cluster table);
//! 3. the **watermark** `{epoch, ix}`, conditional on the epoch still being
//!    ours and `ix` only moving forward; then the log item is deleted.
//!
//! A crash anywhere leaves rows that, with the log items after the
//! watermark replayed over them, give exactly the namespace at some applied
//! index (see `recovery`). A round never blocks the metadata path: records
//! pile up on disk while the table store is slow or down (bounded by
//! `namespace.dynamodb.max-backlog-entries`; past it the mirror exports the
//! whole state again).
//!
//! Fencing: only one writer may touch the tables at a time. Ownership is an
//! epoch in the watermark item, taken with a conditional write and recorded
//! through Raft (`Op::MirrorOwned`), so a cluster that finds a higher epoch
//! knows another cluster took its tables and stops. Within a cluster, a new
//! leader waits out the longest request a deposed leader may still have in
//! flight before its first write, and a writer re-checks its leadership and
//! ownership at least every second between requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;

use jfs_common::config::Config;

use crate::keys::{self, MirrorTarget};
use crate::namespace;
use crate::raft_store::SmView;
use crate::raft_types::{Command, Op, Raft};
use crate::table_store::{self as ts, Condition, Item, RowOp, TableStore, TsError};

/// Kind bytes that start every item key.
pub const ROW: u8 = b'r';
pub const LOG: u8 = b'l';
pub const WATERMARK: &[u8] = b"w";

/// Largest value stored in one item (DynamoDB's limit is 400 KB per item,
/// names and key included); longer values are split over several items.
pub const PART_BYTES: usize = 350 * 1024;

/// Writes shipped per round at most (bytes of records).
const ROUND_BYTES: usize = 4 << 20;
/// Batch writes in flight per round.
const PARALLEL: usize = 8;
/// A writer re-confirms leadership and ownership at least this often.
const RECHECK: Duration = Duration::from_secs(1);

pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

#[derive(Debug, Clone, Default)]
pub struct Watermark {
    pub epoch: u64,
    pub owner: String,
    pub ix: u64,
    /// `incremental` (rows + log after `ix` are the state), `exporting` (an
    /// export is under way: rows are not usable) or `recovering` (a recovery
    /// cluster is restoring from `src_epoch`/`src_ix`).
    pub state: String,
    pub src_epoch: u64,
    pub src_ix: u64,
    pub at_ms: u64,
}

impl Watermark {
    pub fn to_item(&self) -> Item {
        HashMap::from([
            ("k".to_string(), ts::bin(WATERMARK)),
            ("s".to_string(), ts::num(0)),
            ("epoch".to_string(), ts::num(self.epoch)),
            ("owner".to_string(), ts::text(&self.owner)),
            ("ix".to_string(), ts::num(self.ix)),
            ("state".to_string(), ts::text(&self.state)),
            ("src_epoch".to_string(), ts::num(self.src_epoch)),
            ("src_ix".to_string(), ts::num(self.src_ix)),
            ("at_ms".to_string(), ts::num(self.at_ms)),
        ])
    }

    pub fn from_item(item: &Item) -> Watermark {
        Watermark {
            epoch: ts::get_num(item, "epoch").unwrap_or(0),
            owner: ts::get_text(item, "owner").unwrap_or("").to_string(),
            ix: ts::get_num(item, "ix").unwrap_or(0),
            state: ts::get_text(item, "state").unwrap_or("").to_string(),
            src_epoch: ts::get_num(item, "src_epoch").unwrap_or(0),
            src_ix: ts::get_num(item, "src_ix").unwrap_or(0),
            at_ms: ts::get_num(item, "at_ms").unwrap_or(0),
        }
    }
}

pub async fn read_watermark(store: &TableStore) -> Result<Option<Watermark>, TsError> {
    match store.get(&store.cluster_table(), WATERMARK, 0).await {
        Ok(i) => Ok(i.map(|i| Watermark::from_item(&i))),
        Err(TsError::NoTable(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `w` if the stored watermark is still at `epoch` (or, with
/// `None`, if there is none).
pub async fn put_watermark(store: &TableStore, w: &Watermark, expect_epoch: Option<u64>) -> Result<(), TsError> {
    let cond = match expect_epoch {
        None => Condition {
            expr: "attribute_not_exists(k)".into(),
            names: HashMap::new(),
            values: HashMap::new(),
        },
        Some(e) => Condition {
            expr: "epoch = :e".into(),
            names: HashMap::new(),
            values: HashMap::from([(":e".to_string(), ts::num(e))]),
        },
    };
    store.put(&store.cluster_table(), w.to_item(), Some(cond)).await
}

/// The item key of a log item: kind, owner epoch, first index.
pub fn log_key(epoch: u64, first: u64) -> Vec<u8> {
    let mut k = vec![LOG];
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&first.to_be_bytes());
    k
}

pub fn row_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(ROW);
    k.extend_from_slice(key);
    k
}

/// The items that store `value` under state-machine key `key` as of log
/// index `ix`: one item, or a head (`n` parts) and the parts `s = 1..=n`.
pub fn row_items(key: &[u8], value: &[u8], ix: u64) -> Vec<Item> {
    let k = row_key(key);
    if value.len() <= PART_BYTES {
        return vec![HashMap::from([
            ("k".to_string(), ts::bin(&k)),
            ("s".to_string(), ts::num(0)),
            ("v".to_string(), ts::bin(value)),
            ("x".to_string(), ts::num(ix)),
        ])];
    }
    let parts: Vec<&[u8]> = value.chunks(PART_BYTES).collect();
    let mut out = vec![HashMap::from([
        ("k".to_string(), ts::bin(&k)),
        ("s".to_string(), ts::num(0)),
        ("n".to_string(), ts::num(parts.len() as u64)),
        ("x".to_string(), ts::num(ix)),
    ])];
    for (i, p) in parts.iter().enumerate() {
        out.push(HashMap::from([
            ("k".to_string(), ts::bin(&k)),
            ("s".to_string(), ts::num(i as u64 + 1)),
            ("v".to_string(), ts::bin(p)),
        ]));
    }
    out
}

/// Sort key of part `i` (from 1) of a log item written with `nonce`: parts of
/// two writers of the same range never mix.
pub fn log_part_s(nonce: u32, i: u64) -> u64 {
    ((nonce as u64) << 20) | i
}

/// Encodes net writes for a log item.
pub fn encode_writes(w: &Writes) -> Vec<u8> {
    // Serializing plain vectors into memory cannot fail.
    bincode::serialize(&w.iter().collect::<Vec<_>>()).unwrap_or_default()
}

pub fn decode_writes(b: &[u8]) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>)>, String> {
    bincode::deserialize(b).map_err(|e| format!("corrupt log item in the table store: {e}"))
}

/// What `jfs metastatus --detail` shows about this node's mirror.
#[derive(Debug, Clone, Default)]
pub struct MirrorStatus {
    pub enabled: bool,
    /// Everything this node applied is in the tables.
    pub synced: bool,
    pub shipped: u64,
    pub lag_entries: u64,
    pub lag_ms: u64,
    pub backlog: u64,
    pub state: String,
    pub last_error: String,
    pub owner: String,
    pub table: String,
    pub epoch: u64,
}

pub struct Mirror {
    raft: Raft,
    node_id: u64,
    view: SmView,
    cfg: Arc<Config>,
    store: Arc<TableStore>,
    status: Mutex<MirrorStatus>,
    ns_names: Mutex<HashMap<u32, String>>,
}

enum Stop {
    /// Another cluster owns the tables.
    Lost(String),
    /// Leadership or ownership changed mid-round: start over.
    Again(String),
    Store(TsError),
    Local(String),
}

impl From<TsError> for Stop {
    fn from(e: TsError) -> Stop {
        Stop::Store(e)
    }
}

fn local(e: impl std::fmt::Display) -> Stop {
    Stop::Local(e.to_string())
}

fn now_ms() -> u64 {
    (crate::service::now_ns() / 1_000_000).max(0) as u64
}

impl Mirror {
    pub fn new(raft: Raft, node_id: u64, view: SmView, cfg: Arc<Config>, store: Arc<TableStore>) -> Mirror {
        let table = store.cluster_table();
        Mirror {
            raft,
            node_id,
            view,
            store,
            status: Mutex::new(MirrorStatus {
                enabled: cfg.mirror_enabled,
                table,
                state: "starting".into(),
                ..Default::default()
            }),
            cfg,
            ns_names: Mutex::new(HashMap::new()),
        }
    }

    pub fn status(&self) -> MirrorStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, f: impl FnOnce(&mut MirrorStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn leading(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.state == ServerState::Leader && m.current_leader == Some(self.node_id)).then_some(m.current_term)
    }

    fn owner_name(&self) -> String {
        let cluster = namespace::cluster_id(&self.view).ok().flatten().unwrap_or_default();
        let addr = self
            .cfg
            .peer(self.node_id)
            .map(|p| p.rpc_addr.clone())
            .unwrap_or_default();
        format!("cluster {cluster} (node {} {addr})", self.node_id)
    }

    /// Applied index, backlog and lag as this node sees them against the
    /// table's watermark `shipped` (None: unknown).
    fn refresh_local(&self, shipped: Option<(u64, bool)>) {
        let applied = self.view.applied_index().unwrap_or(0);
        let backlog = self.view.mirror_backlog().ok().flatten();
        let mut lag_ms = 0;
        if let Some((ix, true)) = shipped {
            if let Ok(recs) = self.view.mirror_records(ix, 1) {
                if let Some(r) = recs.first().filter(|r| r.last > ix && r.at_ns > 0) {
                    lag_ms = ((crate::service::now_ns() - r.at_ns) / 1_000_000).max(0) as u64;
                }
            }
        }
        self.set(|s| {
            s.backlog = backlog.map_or(0, |b| b.2);
            if let Some((ix, ours)) = shipped {
                s.shipped = ix;
                s.synced = ours && ix >= applied;
                s.lag_entries = if ours { applied.saturating_sub(ix) } else { applied };
                s.lag_ms = lag_ms;
            }
        });
    }

    /// Past the configured backlog, the oldest records go: the mirror will
    /// export everything again instead of replaying them.
    fn cap_backlog(&self) {
        let max = self.cfg.dynamodb.max_backlog_entries;
        if let Ok(Some((first, last, _))) = self.view.mirror_backlog() {
            if last - first + 1 > max {
                let cut = last - max;
                tracing::warn!(
                    first,
                    last,
                    max,
                    "the mirror backlog is over namespace.dynamodb.max-backlog-entries; dropping the oldest \
                     records (the mirror will export the whole state again)"
                );
                if let Err(e) = self.view.trim_mirror(cut) {
                    tracing::error!("cannot trim the mirror backlog: {e}");
                }
            }
        }
    }

    async fn propose(&self, op: Op) -> Result<(), Stop> {
        let cmd = Command {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            now_ns: crate::service::now_ns(),
            session_ns: 0,
            op,
        };
        match self.raft.client_write(cmd).await {
            Ok(r) => r.data.map(|_| ()).map_err(local),
            Err(e) => Err(Stop::Again(format!("cannot commit through Raft: {e}"))),
        }
    }

    /// Still the leader and still the owner: checked between requests so a
    /// deposed writer stops within `RECHECK` plus one request.
    async fn confirm(&self, term: u64, epoch: u64) -> Result<(), Stop> {
        if self.leading() != Some(term) {
            return Err(Stop::Again("no longer the leader".into()));
        }
        if self.raft.ensure_linearizable().await.is_err() {
            return Err(Stop::Again("leadership not confirmed by a quorum".into()));
        }
        match read_watermark(&self.store).await? {
            Some(w) if w.epoch == epoch => Ok(()),
            Some(w) => Err(Stop::Lost(format!(
                "the tables were taken by {} (epoch {}); this cluster no longer mirrors into them",
                w.owner, w.epoch
            ))),
            None => Err(Stop::Again("the watermark item disappeared".into())),
        }
    }

    fn table_for(&self, target: MirrorTarget) -> Result<String, Stop> {
        match target {
            MirrorTarget::Cluster => Ok(self.store.cluster_table()),
            MirrorTarget::Namespace(id) => {
                if let Some(n) = self.ns_names.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    return Ok(self.store.namespace_table(n));
                }
                let rec = namespace::namespace_by_id(&self.view, id)
                    .map_err(local)?
                    .ok_or_else(|| Stop::Local(format!("rows of namespace id {id}, which does not exist")))?;
                let table = self.store.namespace_table(&rec.name);
                self.ns_names
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, rec.name);
                Ok(table)
            }
        }
    }

    /// Writes rows (puts and deletes) grouped by table, re-confirming
    /// leadership and ownership between slices.
    async fn write_rows(
        &self,
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        ix: u64,
        term: u64,
        epoch: u64,
    ) -> Result<(), Stop> {
        let mut by_table: BTreeMap<String, Vec<RowOp>> = BTreeMap::new();
        for (k, v) in writes {
            let Some(t) = keys::mirror_target(&k) else { continue };
            let table = self.table_for(t)?;
            let ops = by_table.entry(table).or_default();
            match v {
                Some(v) => ops.extend(row_items(&k, &v, ix).into_iter().map(RowOp::Put)),
                None => ops.push(RowOp::Delete { k: row_key(&k), s: 0 }),
            }
        }
        let mut checked = Instant::now();
        for (table, ops) in by_table {
            self.store.ensure_table(&table).await?;
            let mut ops = ops;
            while !ops.is_empty() {
                if checked.elapsed() > RECHECK {
                    self.confirm(term, epoch).await?;
                    checked = Instant::now();
                }
                let rest = ops.split_off(ops.len().min(25 * PARALLEL * 4));
                self.store.batch_write(&table, ops, PARALLEL).await?;
                ops = rest;
            }
        }
        Ok(())
    }

    /// Runs on every node until `stop`: ships on the leader, watches the
    /// watermark elsewhere.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut leading_since: Option<(u64, Instant)> = None;
        let mut pause = Duration::from_millis(100);
        let mut last_poll: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
            self.cap_backlog();
            let Some(term) = self.leading() else {
                leading_since = None;
                pause = Duration::from_millis(500);
                if last_poll.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                    last_poll = Some(Instant::now());
                    self.follow().await;
                }
                continue;
            };
            let since = match leading_since {
                Some((t, at)) if t == term => at,
                _ => {
                    leading_since = Some((term, Instant::now()));
                    Instant::now()
                }
            };
            // A deposed leader's last requests may still land this long
            // after it lost its lease: start writing only after them.
            let fence = ts::WRITE_TIMEOUT + RECHECK + Duration::from_secs(1);
            if since.elapsed() < fence {
                self.set(|s| s.state = "new leader: waiting for the previous writer's requests to end".into());
                pause = Duration::from_millis(200);
                continue;
            }
            if let Ok(Some(r)) = namespace::recovery_state(&self.view).map(|r| r.filter(|r| r.active())) {
                self.set(|s| {
                    s.state = if r.finished {
                        "paused: the cluster is in recovery mode (leave it with `jfs admin recovery finish`)".into()
                    } else {
                        "paused: a restore is running".into()
                    }
                });
                pause = Duration::from_secs(1);
                continue;
            }
            match self.round(term).await {
                Ok(more) => {
                    self.set(|s| s.last_error.clear());
                    pause = if more {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(50)
                    };
                }
                Err(Stop::Lost(why)) => {
                    tracing::error!("table-store mirror stopped: {why}");
                    self.set(|s| {
                        s.state = format!("stopped: {why}");
                        s.last_error = why;
                        s.synced = false;
                    });
                    pause = Duration::from_secs(10);
                }
                Err(Stop::Again(why)) => {
                    tracing::info!("mirror round abandoned: {why}");
                    pause = Duration::from_millis(200);
                }
                Err(Stop::Store(e)) => {
                    tracing::warn!("mirror round failed (will retry): {e}");
                    // The lag keeps growing while the store is away: say so.
                    let shipped = self.status().shipped;
                    self.refresh_local(Some((shipped, true)));
                    self.set(|s| {
                        s.last_error = e.to_string();
                        s.state = "retrying: the table store did not answer".into();
                    });
                    pause = (pause * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
                }
                Err(Stop::Local(e)) => {
                    tracing::error!("mirror round failed: {e}");
                    self.set(|s| s.last_error = e);
                    pause = Duration::from_secs(5);
                }
            }
        }
    }

    /// A follower reads the watermark to report `_synced` and to drop the
    /// records the leader has shipped.
    async fn follow(&self) {
        let epoch = namespace::mirror_epoch(&self.view).unwrap_or(0);
        match read_watermark(&self.store).await {
            Ok(Some(w)) => {
                let ours = w.epoch == epoch && epoch > 0 && w.state == "incremental";
                if ours {
                    if let Err(e) = self.view.trim_mirror(w.ix) {
                        tracing::warn!("cannot trim mirror records: {e}");
                    }
                }
                self.set(|s| {
                    s.owner = w.owner.clone();
                    s.epoch = w.epoch;
                    s.state = if ours {
                        "following".into()
                    } else {
                        format!("following (table: {})", w.state)
                    };
                    s.last_error.clear();
                });
                self.refresh_local(Some((w.ix, ours)));
            }
            Ok(None) => {
                self.set(|s| s.state = "following (no table yet)".into());
                self.refresh_local(Some((0, false)));
            }
            Err(e) => {
                self.set(|s| s.last_error = e.to_string());
                let st = self.status();
                self.refresh_local(Some((st.shipped, st.epoch > 0 && st.epoch == epoch)));
            }
        }
    }

    /// One round on the leader. Returns whether more is waiting.
    async fn round(&self, term: u64) -> Result<bool, Stop> {
        self.store.ensure_table(&self.store.cluster_table()).await?;
        let mine = namespace::mirror_epoch(&self.view).map_err(local)?;
        let w = read_watermark(&self.store).await?;
        let w = match w {
            None => return self.take(term, 1, None).await.map(|_| true),
            Some(w) if mine == 0 || w.epoch < mine => {
                // Never owned (a new cluster, or mirroring just enabled),
                // or the table was reset: the later owner wins.
                let next = w.epoch.max(mine) + 1;
                return self.take(term, next, Some(w.epoch)).await.map(|_| true);
            }
            Some(w) if w.epoch > mine => {
                return Err(Stop::Lost(format!(
                    "the tables were taken by {} (epoch {}, ours was {mine}); this cluster no longer mirrors into \
                     them",
                    w.owner, w.epoch
                )))
            }
            Some(w) => w,
        };
        self.set(|s| {
            s.owner = w.owner.clone();
            s.epoch = w.epoch;
        });
        if w.state != "incremental" {
            self.export(term, w.epoch).await?;
            return Ok(true);
        }
        self.incremental(term, &w).await
    }

    async fn take(&self, term: u64, epoch: u64, expect: Option<u64>) -> Result<(), Stop> {
        // Raft first: if the table write is then refused, the next round
        // sees our epoch above the table's and tries again with a new one.
        self.propose(Op::MirrorOwned { epoch }).await?;
        let w = Watermark {
            epoch,
            owner: self.owner_name(),
            ix: 0,
            state: "exporting".into(),
            at_ms: now_ms(),
            ..Default::default()
        };
        match put_watermark(&self.store, &w, expect).await {
            Ok(()) => {}
            Err(TsError::Conflict) => return Err(Stop::Again("another writer took the tables first".into())),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            epoch,
            "the mirror took ownership of its tables; exporting the current state"
        );
        self.export(term, epoch).await
    }

    async fn incremental(&self, term: u64, w: &Watermark) -> Result<bool, Stop> {
        self.refresh_local(Some((w.ix, true)));
        let applied = self.view.applied_index().map_err(local)?;
        if applied <= w.ix {
            self.view.trim_mirror(w.ix).map_err(local)?;
            self.set(|s| s.state = "synced".into());
            return Ok(false);
        }
        let recs = self.view.mirror_records(w.ix, ROUND_BYTES).map_err(local)?;
        match recs.first() {
            Some(r) if r.first <= w.ix + 1 => {}
            _ => {
                tracing::warn!(
                    watermark = w.ix,
                    "the mirror backlog no longer covers the entries after the watermark; exporting again"
                );
                self.set(|s| s.state = "backlog lost: exporting the whole state again".into());
                self.export(term, w.epoch).await?;
                return Ok(true);
            }
        }
        let last = recs.last().map_or(w.ix, |r| r.last);
        let mut net: Writes = BTreeMap::new();
        for r in recs {
            for (k, v) in r.writes {
                net.insert(k, v);
            }
        }
        self.set(|s| s.state = format!("shipping {}..={last}", w.ix + 1));
        let first = w.ix + 1;
        let nonce: u32 = rand::random();
        // 1. The log item: from here on, a crash loses nothing.
        let bytes = encode_writes(&net);
        let table = self.store.cluster_table();
        let k = log_key(w.epoch, first);
        let parts: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[][..]]
        } else {
            bytes.chunks(PART_BYTES).collect()
        };
        for (i, p) in parts.iter().enumerate() {
            let item = HashMap::from([
                ("k".to_string(), ts::bin(&k)),
                ("s".to_string(), ts::num(log_part_s(nonce, i as u64 + 1))),
                ("v".to_string(), ts::bin(p)),
            ]);
            self.store.put(&table, item, None).await?;
        }
        let head = HashMap::from([
            ("k".to_string(), ts::bin(&k)),
            ("s".to_string(), ts::num(0)),
            ("last".to_string(), ts::num(last)),
            ("parts".to_string(), ts::num(parts.len() as u64)),
            ("nonce".to_string(), ts::num(nonce as u64)),
        ]);
        self.store.put(&table, head, None).await?;
        // 2. The rows.
        self.write_rows(net.into_iter().collect(), last, term, w.epoch).await?;
        // 3. The watermark, only forward and only while ours.
        let next = Watermark {
            ix: last,
            at_ms: now_ms(),
            ..w.clone()
        };
        let cond = Condition {
            expr: "epoch = :e AND ix < :ix".into(),
            names: HashMap::new(),
            values: HashMap::from([(":e".to_string(), ts::num(w.epoch)), (":ix".to_string(), ts::num(last))]),
        };
        match self.store.put(&table, next.to_item(), Some(cond)).await {
            Ok(()) => {}
            Err(TsError::Conflict) => {
                self.confirm(term, w.epoch).await?;
                return Err(Stop::Again("the watermark moved under us".into()));
            }
            Err(e) => return Err(e.into()),
        }
        // 4. The log item is covered by the watermark now.
        self.delete_log_items(&k).await;
        self.view.trim_mirror(last).map_err(local)?;
        self.refresh_local(Some((last, true)));
        let more = applied > last;
        self.set(|s| s.state = if more { "catching up".into() } else { "synced".into() });
        Ok(more)
    }

    async fn delete_log_items(&self, k: &[u8]) {
        let table = self.store.cluster_table();
        match self.store.query(&table, k, 0, u64::MAX).await {
            Ok(items) => {
                let ops: Vec<RowOp> = items
                    .iter()
                    .filter_map(|i| ts::get_num(i, "s"))
                    .map(|s| RowOp::Delete { k: k.to_vec(), s })
                    .collect();
                if let Err(e) = self.store.batch_write(&table, ops, PARALLEL).await {
                    tracing::debug!("could not delete a shipped log item (harmless): {e}");
                }
            }
            Err(e) => tracing::debug!("could not list a shipped log item (harmless): {e}"),
        }
    }

    /// Rewrites every table from one consistent snapshot: rows that exist
    /// are put, rows that do not are deleted, stale log items go; then the
    /// watermark names the snapshot's index.
    async fn export(&self, term: u64, epoch: u64) -> Result<(), Stop> {
        let mut w = read_watermark(&self.store)
            .await?
            .ok_or_else(|| Stop::Again("the watermark item disappeared".into()))?;
        if w.epoch != epoch {
            return Err(Stop::Again("ownership changed before the export".into()));
        }
        if w.state != "exporting" {
            w.state = "exporting".into();
            w.at_ms = now_ms();
            put_watermark(&self.store, &w, Some(epoch)).await.map_err(|e| match e {
                TsError::Conflict => Stop::Again("ownership changed before the export".into()),
                e => Stop::Store(e),
            })?;
        }
        let started = Instant::now();
        // What the tables hold now, so rows that no longer exist go too.
        let mut tables = vec![self.store.cluster_table()];
        for n in namespace::list_namespaces(&self.view).map_err(local)? {
            self.ns_names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(n.id, n.name.clone());
            tables.push(self.store.namespace_table(&n.name));
        }
        let mut present: HashMap<String, HashMap<Vec<u8>, Vec<u64>>> = HashMap::new();
        for t in &tables {
            self.store.ensure_table(t).await?;
            let mut keys_here: HashMap<Vec<u8>, Vec<u64>> = HashMap::new();
            self.store
                .scan_segment(t, 0, 1, |items| {
                    for i in items {
                        if let (Some(k), Some(s)) = (ts::get_bin(&i, "k"), ts::get_num(&i, "s")) {
                            if k != WATERMARK {
                                keys_here.entry(k.to_vec()).or_default().push(s);
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
            present.insert(t.clone(), keys_here);
        }
        self.confirm(term, epoch).await?;
        // Read the snapshot on a blocking thread, a slice at a time.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(u64, Vec<(Vec<u8>, Vec<u8>)>), String>>(4);
        let view = self.view.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let snap = view.snapshot();
            let at = match snap.applied_index() {
                Ok(a) => a,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e.to_string()));
                    return;
                }
            };
            let mut batch = Vec::new();
            for r in snap.rows() {
                match r {
                    Ok((k, v)) if keys::mirror_target(&k).is_some() => {
                        batch.push((k.into_vec(), v.into_vec()));
                        if batch.len() >= 2000 {
                            if tx.blocking_send(Ok((at, std::mem::take(&mut batch)))).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.to_string()));
                        return;
                    }
                }
            }
            let _ = tx.blocking_send(Ok((at, batch)));
        });
        let mut at = 0;
        let mut rows = 0u64;
        while let Some(msg) = rx.recv().await {
            let (a, batch) = msg.map_err(Stop::Local)?;
            at = a;
            let mut writes = Vec::with_capacity(batch.len());
            for (k, v) in batch {
                if let Some(t) = keys::mirror_target(&k) {
                    let table = self.table_for(t)?;
                    let rk = row_key(&k);
                    if let Some(ss) = present.get_mut(&table).and_then(|m| m.get_mut(&rk)) {
                        // Parts this value no longer uses are stale.
                        let n = if v.len() <= PART_BYTES {
                            0
                        } else {
                            v.len().div_ceil(PART_BYTES) as u64
                        };
                        ss.retain(|s| *s > n);
                    }
                }
                writes.push((k, Some(v)));
            }
            rows += writes.len() as u64;
            self.write_rows(writes, a, term, epoch).await?;
            self.set(|s| s.state = format!("exporting: {rows} rows written"));
        }
        let _ = reader.await;
        // Whatever the snapshot did not have.
        for (table, keys_here) in present {
            let ops: Vec<RowOp> = keys_here
                .into_iter()
                .flat_map(|(k, ss)| ss.into_iter().map(move |s| RowOp::Delete { k: k.clone(), s }))
                .collect();
            if !ops.is_empty() {
                self.confirm(term, epoch).await?;
                self.store.batch_write(&table, ops, PARALLEL).await?;
            }
        }
        w.ix = at;
        w.state = "incremental".into();
        w.at_ms = now_ms();
        w.owner = self.owner_name();
        put_watermark(&self.store, &w, Some(epoch)).await.map_err(|e| match e {
            TsError::Conflict => Stop::Again("ownership changed during the export".into()),
            e => Stop::Store(e),
        })?;
        self.view.trim_mirror(at).map_err(local)?;
        tracing::info!(
            rows,
            index = at,
            secs = started.elapsed().as_secs_f64(),
            "mirror export finished; shipping changes from here on"
        );
        self.refresh_local(Some((at, true)));
        Ok(())
    }

    /// Compares the tables with this node's state, row by row: the check
    /// that nothing was skipped, duplicated or reordered. Needs a quiet
    /// moment (everything applied shipped, or only entries without writes
    /// after the watermark).
    pub async fn verify(&self) -> Result<VerifyReport, VerifyError> {
        let mine = namespace::mirror_epoch(&self.view).map_err(|e| e.to_string())?;
        for _ in 0..20 {
            let w = read_watermark(&self.store)
                .await
                .map_err(|e| VerifyError::Retry(e.to_string()))?
                .ok_or_else(|| VerifyError::Refused("the mirror has no watermark yet".into()))?;
            if w.epoch != mine || w.state != "incremental" {
                return Err(VerifyError::Refused(format!(
                    "the tables are not this cluster's in incremental state (epoch {} state {}, ours {mine})",
                    w.epoch, w.state
                )));
            }
            let view = self.view.clone();
            let expected =
                tokio::task::spawn_blocking(move || -> Result<Option<(u64, BTreeMap<Vec<u8>, Vec<u8>>)>, String> {
                    let snap = view.snapshot();
                    let at = snap.applied_index().map_err(|e| e.to_string())?;
                    if at > w.ix {
                        // Entries after the watermark: fine if none changed a shipped row.
                        let pending = view.mirror_records(w.ix, usize::MAX).map_err(|e| e.to_string())?;
                        if pending.iter().any(|r| r.first <= at && !r.writes.is_empty()) {
                            return Ok(None);
                        }
                    }
                    Ok(Some((at, rows_of(&snap)?)))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(VerifyError::Refused)?;
            let Some((at, mut expected)) = expected else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            };
            let mut tables = vec![self.store.cluster_table()];
            for n in namespace::list_namespaces(&self.view).map_err(|e| VerifyError::Refused(e.to_string()))? {
                tables.push(self.store.namespace_table(&n.name));
            }
            let mut report = VerifyReport {
                index: at,
                ..Default::default()
            };
            let mut found: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
            for t in &tables {
                let mut reader = crate::recovery::RowReader::new();
                let mut log_items = 0u64;
                let mut bad = None;
                self.store
                    .scan_segment(t, 0, 1, |items| {
                        for i in &items {
                            if ts::get_bin(i, "k").and_then(|k| k.first()) == Some(&LOG) {
                                log_items += 1;
                            }
                            if let Err(e) = reader.add(i) {
                                bad = Some(e);
                            }
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| VerifyError::Retry(e.to_string()))?;
                if let Some(e) = bad {
                    return Err(VerifyError::Refused(e));
                }
                report.log_items += log_items;
                found.extend(
                    reader
                        .finish()
                        .into_iter()
                        .map(|(k, v)| (t.clone(), k, v.unwrap_or_default())),
                );
            }
            // Background work (the healer, blockd reports) keeps changing a
            // few rows while the tables are read, and those may be shipped
            // mid-scan: compare only rows that held the same value from the
            // snapshot until after the scan. A quiet namespace skips none.
            let view = self.view.clone();
            let after = tokio::task::spawn_blocking(move || mirrored_rows(&view))
                .await
                .map_err(|e| e.to_string())?
                .map_err(VerifyError::Refused)?;
            let moved: std::collections::BTreeSet<Vec<u8>> = expected
                .iter()
                .filter(|(k, v)| after.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .chain(after.keys().filter(|k| !expected.contains_key(*k)).cloned())
                .collect();
            if moved.len() > 1000 {
                // Writes are going on: this would check too little.
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            for (t, k, v) in found {
                if moved.contains(&k) {
                    expected.remove(&k);
                    continue;
                }
                report.rows += 1;
                match expected.remove(&k) {
                    None => report.note_extra(&t, &k),
                    Some(e) if e != v => report.note_different(&t, &k),
                    Some(_) => {}
                }
            }
            for k in expected.keys().filter(|k| !moved.contains(*k)) {
                report.note_missing(k);
            }
            if !moved.is_empty() {
                report.example(format!(
                    "{} rows changed while the tables were read and were not compared",
                    moved.len()
                ));
            }
            return Ok(report);
        }
        Err(VerifyError::Refused(
            "the namespace kept changing: verify needs a quiet moment (no writes for a few seconds)".into(),
        ))
    }
}

/// Every row the mirror ships, from one consistent snapshot.
fn rows_of(snap: &crate::raft_store::SmSnapshot<'_>) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let mut rows = BTreeMap::new();
    for r in snap.rows() {
        let (k, v) = r.map_err(|e| e.to_string())?;
        if keys::mirror_target(&k).is_some() {
            rows.insert(k.into_vec(), v.into_vec());
        }
    }
    Ok(rows)
}

fn mirrored_rows(view: &SmView) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    rows_of(&view.snapshot())
}

/// Why `verify` gave no report.
#[derive(Debug)]
pub enum VerifyError {
    /// The table store did not answer: worth asking again.
    Retry(String),
    /// Comparing makes no sense now (not our tables, no quiet moment, a
    /// corrupt item); asking again at once would not help.
    Refused(String),
}

/// Local failures (reading this node's own state) are not the table store's.
impl From<String> for VerifyError {
    fn from(e: String) -> VerifyError {
        VerifyError::Refused(e)
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub index: u64,
    pub rows: u64,
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
    pub log_items: u64,
    pub examples: Vec<String>,
}

impl VerifyReport {
    fn example(&mut self, s: String) {
        if self.examples.len() < 10 {
            self.examples.push(s);
        }
    }
    fn note_extra(&mut self, table: &str, k: &[u8]) {
        self.extra += 1;
        self.example(format!("{table}: row {k:?} is not in the namespace"));
    }
    fn note_different(&mut self, table: &str, k: &[u8]) {
        self.different += 1;
        self.example(format!("{table}: row {k:?} has a different value"));
    }
    fn note_missing(&mut self, k: &[u8]) {
        self.missing += 1;
        self.example(format!("row {k:?} is missing from the tables"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::RowReader;

    fn read_back(items: &[Item]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut r = RowReader::new();
        for i in items {
            r.add(i).expect("a well-formed item");
        }
        r.finish()
    }

    #[test]
    fn a_small_value_is_one_item_and_reads_back() {
        let items = row_items(b"Fkey", b"value", 7);
        assert_eq!(items.len(), 1);
        assert_eq!(read_back(&items), vec![(b"Fkey".to_vec(), Some(b"value".to_vec()))]);
    }

    #[test]
    fn a_value_over_the_item_limit_is_split_and_reassembled() {
        let value: Vec<u8> = (0..PART_BYTES * 2 + 123).map(|i| (i % 251) as u8).collect();
        let items = row_items(b"Fbig", &value, 9);
        assert_eq!(items.len(), 4, "a head and three parts");
        for i in &items {
            let size: usize = i
                .values()
                .map(|v| v.as_b().map(|b| b.as_ref().len()).unwrap_or(16))
                .sum();
            assert!(size < 400 * 1024, "an item of {size} bytes passes DynamoDB's limit");
        }
        assert_eq!(read_back(&items), vec![(b"Fbig".to_vec(), Some(value))]);
    }

    #[test]
    fn parts_left_by_a_longer_earlier_value_are_ignored() {
        // The table as it is after a 3-part value was overwritten by a
        // 2-part one (stale part 3 left) and another key by a small value
        // (stale parts 1 and 2 left).
        let old: Vec<u8> = vec![1; PART_BYTES * 3];
        let new: Vec<u8> = vec![2; PART_BYTES + 5];
        let mut table: Vec<Item> = Vec::new();
        table.extend(row_items(b"Fa", &new, 2));
        table.push(row_items(b"Fa", &old, 1).remove(3));
        table.extend(row_items(b"Fb", b"small", 2));
        table.extend(row_items(b"Fb", &old, 1).into_iter().skip(1).take(2));
        let mut got = read_back(&table);
        got.sort();
        assert_eq!(
            got,
            vec![(b"Fa".to_vec(), Some(new)), (b"Fb".to_vec(), Some(b"small".to_vec()))]
        );
    }

    #[test]
    fn log_items_sort_by_epoch_then_index() {
        let mut keys = vec![log_key(2, 5), log_key(1, 300), log_key(1, 7), log_key(2, 1)];
        keys.sort();
        assert_eq!(keys, vec![log_key(1, 7), log_key(1, 300), log_key(2, 1), log_key(2, 5)]);
    }

    #[test]
    fn writes_and_watermarks_survive_their_encoding() {
        let mut w = Writes::new();
        w.insert(b"Fput".to_vec(), Some(b"v".to_vec()));
        w.insert(b"Fdel".to_vec(), None);
        let back = decode_writes(&encode_writes(&w)).expect("decode");
        assert_eq!(back.into_iter().collect::<Writes>(), w);
        assert!(decode_writes(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff").is_err());

        let m = Watermark {
            epoch: 3,
            owner: "cluster abc (node 2)".into(),
            ix: 12345,
            state: "incremental".into(),
            src_epoch: 2,
            src_ix: 99,
            at_ms: 1_700_000_000_000,
        };
        let back = Watermark::from_item(&m.to_item());
        assert_eq!(
            (
                back.epoch,
                back.owner,
                back.ix,
                back.state,
                back.src_epoch,
                back.src_ix,
                back.at_ms
            ),
            (3, m.owner.clone(), 12345, "incremental".into(), 2, 99, m.at_ms)
        );
    }
}
