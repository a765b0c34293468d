//! Recovery mode: a new, empty cluster restores its namespaces from the
//! table store the mirror filled, then stays read-only until the operator
//! ends recovery mode.
//!
//! The leader takes ownership of the tables first (a higher epoch in the
//! watermark, so an old cluster still running stops mirroring into them),
//! waits out the old writer's last requests, then restores: every row of
//! every table, then the log items after the old watermark replayed in
//! order. Rows may be ahead of the watermark (a round that crashed after
//! writing some rows), but every such row belongs to a log item after it,
//! so the replay brings the state to exactly the end of the log chain: the
//! namespace at one applied index of the old cluster. Everything goes
//! through Raft (`RestoreBegin`, `RestoreRows`, `RestoreFinish`), so every
//! node holds the same restored state and a new leader simply starts the
//! restore over. Finally the replayed writes are written back into the rows
//! and the watermark names this cluster's index: once recovery mode ends,
//! the mirror continues into the same tables without an export.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use jfs_common::config::Config;

use crate::keys;
use crate::mirror::{self, Watermark, Writes};
use crate::namespace;
use crate::raft_store::SmView;
use crate::raft_types::{Command, Op, Raft};
use crate::table_store::{self as ts, Item, RowOp, TableStore, TsError};

/// Bytes of rows per `RestoreRows` entry.
const ENTRY_BYTES: usize = 1 << 20;
/// Parallel scan segments per table.
const SEGMENTS: i32 = 4;
/// Pages a segment reads ahead of what it has committed.
const SCAN_LOOKAHEAD: usize = 2;

pub async fn run(
    raft: Raft,
    node_id: u64,
    view: SmView,
    cfg: Arc<Config>,
    store: Option<Arc<TableStore>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(node_id) {
            continue;
        }
        let state = match namespace::recovery_state(&view) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read the recovery state: {e}");
                continue;
            }
        };
        match state {
            Some(r) if r.left => {
                if cfg.recovery_mode && !warned {
                    tracing::warn!(
                        "namespace.backend.raft.recovery.mode = true is ignored: this cluster finished its \
                         restore and left recovery mode; set the key to false"
                    );
                    warned = true;
                }
            }
            Some(r) if r.finished => {
                if !cfg.recovery_mode {
                    tracing::info!("recovery.mode is now false: leaving recovery mode, namespaces become writable");
                    if let Err(e) = propose(&raft, Op::RecoveryLeave).await {
                        tracing::warn!("could not leave recovery mode yet: {e}");
                    }
                }
            }
            None if !cfg.recovery_mode => return,
            Some(_) if !cfg.recovery_mode => {
                if !warned {
                    tracing::error!(
                        "a restore from the table store did not finish, and recovery.mode is false: the \
                         namespaces stay read-only. Set namespace.backend.raft.recovery.mode = true and restart \
                         to finish the restore"
                    );
                    warned = true;
                }
            }
            _ => {
                let Some(store) = &store else { return };
                let started = Instant::now();
                match restore(&raft, &view, &cfg, store, node_id).await {
                    Ok(rows) => tracing::info!(
                        rows,
                        secs = started.elapsed().as_secs_f64(),
                        "restore from the table store finished (FINISH); the cluster stays read-only until \
                         `jfs admin recovery finish` or a restart with recovery.mode = false"
                    ),
                    Err(e) => {
                        tracing::error!("restore from the table store failed (will retry in 5 s): {e}");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        }
    }
}

async fn propose(raft: &Raft, op: Op) -> Result<u64, String> {
    let cmd = Command {
        client_id: 0,
        seq: 0,
        acked_below: 0,
        now_ns: crate::service::now_ns(),
        session_ns: 0,
        op,
    };
    match raft.client_write(cmd).await {
        Ok(r) => r.data.map(|_| r.log_id.index).map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot commit through Raft: {e}")),
    }
}

fn ts_err(e: TsError) -> String {
    e.to_string()
}

/// One row read from a table, reassembled from its parts.
pub(crate) struct RowReader {
    pending: HashMap<Vec<u8>, (u64, BTreeMap<u64, Vec<u8>>)>,
    out: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    bytes: usize,
}

impl RowReader {
    pub(crate) fn new() -> RowReader {
        RowReader {
            pending: HashMap::new(),
            out: Vec::new(),
            bytes: 0,
        }
    }

    pub(crate) fn add(&mut self, item: &Item) -> Result<(), String> {
        let (Some(k), Some(s)) = (ts::get_bin(item, "k"), ts::get_num(item, "s")) else {
            return Err("an item without k/s keys in a mirror table".into());
        };
        if k.first() != Some(&mirror::ROW) {
            return Ok(());
        }
        let key = k[1..].to_vec();
        if s == 0 {
            if let Some(v) = ts::get_bin(item, "v") {
                self.push(key, v.to_vec());
                return Ok(());
            }
            let n = ts::get_num(item, "n").ok_or("a row item with neither a value nor a part count")?;
            self.pending.entry(key.clone()).or_insert((0, BTreeMap::new())).0 = n;
        } else {
            let v = ts::get_bin(item, "v").ok_or("a row part without a value")?;
            self.pending
                .entry(key.clone())
                .or_insert((0, BTreeMap::new()))
                .1
                .insert(s, v.to_vec());
        }
        let complete = self
            .pending
            .get(&key)
            .is_some_and(|(n, parts)| *n > 0 && (1..=*n).all(|i| parts.contains_key(&i)));
        if complete {
            if let Some((n, parts)) = self.pending.remove(&key) {
                let v: Vec<u8> = parts
                    .into_iter()
                    .filter(|(i, _)| *i <= n)
                    .flat_map(|(_, p)| p)
                    .collect();
                self.push(key, v);
            }
        }
        Ok(())
    }

    fn push(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.bytes += k.len() + v.len();
        self.out.push((k, Some(v)));
    }

    fn take_if_full(&mut self) -> Option<Vec<(Vec<u8>, Option<Vec<u8>>)>> {
        (self.bytes >= ENTRY_BYTES).then(|| {
            self.bytes = 0;
            std::mem::take(&mut self.out)
        })
    }

    /// The rest; parts left over belong to values since overwritten (a
    /// head that still names them would be complete).
    pub(crate) fn finish(self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        for (k, (n, _)) in &self.pending {
            if *n > 0 {
                tracing::warn!(key = ?k, "a multi-part row in the table store is missing parts; skipped");
            }
        }
        self.out
    }
}

struct Progress {
    restored: std::sync::atomic::AtomicU64,
    total: u64,
    /// Time spent waiting on table-store scans and on Raft commits, summed
    /// over segments: which side a slow restore is waiting for.
    scan_ns: std::sync::atomic::AtomicU64,
    commit_ns: std::sync::atomic::AtomicU64,
}

impl Progress {
    fn add_time(counter: &std::sync::atomic::AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn secs(counter: &std::sync::atomic::AtomicU64) -> f64 {
        counter.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
    }
}

async fn ship(raft: &Raft, p: &Progress, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), String> {
    if writes.is_empty() {
        return Ok(());
    }
    let n = writes.len() as u64;
    let restored = p.restored.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
    let t = Instant::now();
    let r = propose(
        raft,
        Op::RestoreRows {
            writes,
            restored,
            total: p.total,
        },
    )
    .await
    .map(|_| ());
    Progress::add_time(&p.commit_ns, t);
    r
}

/// Scans one table (parallel segments) into Raft. Within a segment the next
/// page is read while the previous one commits (a page of lookahead), so
/// the table store and Raft work at once instead of taking turns.
async fn restore_table(raft: &Raft, store: &TableStore, table: &str, p: &Progress) -> Result<(), String> {
    let segs = (0..SEGMENTS).map(|seg| async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Item>>(SCAN_LOOKAHEAD);
        let scan = async move {
            let mut start = None;
            loop {
                let t = Instant::now();
                let (items, next) = store.scan_page(table, seg, SEGMENTS, start).await.map_err(ts_err)?;
                Progress::add_time(&p.scan_ns, t);
                if tx.send(items).await.is_err() {
                    // The applying side failed; its error is the one reported.
                    return Ok(());
                }
                match next {
                    Some(k) => start = Some(k),
                    None => return Ok(()),
                }
            }
        };
        let apply = async {
            let mut reader = RowReader::new();
            while let Some(items) = rx.recv().await {
                for i in &items {
                    reader.add(i)?;
                }
                if let Some(full) = reader.take_if_full() {
                    ship(raft, p, full).await?;
                }
            }
            Ok::<_, String>(reader)
        };
        // A scan error ends the segment at once (dropping what was not
        // shipped): the restore starts over, it never finishes a partial table.
        let ((), reader) = futures::future::try_join(scan, apply).await?;
        ship(raft, p, reader.finish()).await
    });
    for r in futures::future::join_all(segs).await {
        r?;
    }
    Ok(())
}

/// Restores everything; returns the rows restored.
async fn restore(raft: &Raft, view: &SmView, cfg: &Config, store: &TableStore, node_id: u64) -> Result<u64, String> {
    let cluster_table = store.cluster_table();
    let w = mirror::read_watermark(store).await.map_err(ts_err)?.ok_or_else(|| {
        format!(
            "there is nothing to restore: table {cluster_table} has no mirror watermark (check \
             namespace.dynamodb.table-prefix, endpoint and region: they must match the lost cluster's)"
        )
    })?;
    let mine = namespace::mirror_epoch(view).map_err(|e| e.to_string())?;
    let (epoch, src_epoch, src_ix) = if w.state == "recovering" && w.epoch == mine && mine > 0 {
        (w.epoch, w.src_epoch, w.src_ix)
    } else {
        let (src_epoch, src_ix) = match w.state.as_str() {
            "incremental" => (w.epoch, w.ix),
            // Another recovery cluster died mid-restore: its source stands.
            "recovering" => (w.src_epoch, w.src_ix),
            other => {
                return Err(format!(
                    "the tables do not hold a consistent state (their watermark says {other:?}: the old cluster \
                     was exporting when it stopped); they cannot be restored"
                ))
            }
        };
        let epoch = w.epoch.max(mine) + 1;
        propose(raft, Op::MirrorOwned { epoch }).await?;
        let cluster = namespace::cluster_id(view).ok().flatten().unwrap_or_default();
        let next = Watermark {
            epoch,
            owner: format!(
                "recovery cluster {cluster} (node {node_id} {})",
                cfg.peer(node_id).map(|p| p.rpc_addr.as_str()).unwrap_or("")
            ),
            ix: 0,
            state: "recovering".into(),
            src_epoch,
            src_ix,
            at_ms: (crate::service::now_ns() / 1_000_000).max(0) as u64,
        };
        mirror::put_watermark(store, &next, Some(w.epoch))
            .await
            .map_err(|e| match e {
                TsError::Conflict => "another cluster took the tables at the same time; retrying".to_string(),
                e => e.to_string(),
            })?;
        tracing::info!(
            epoch,
            from = %w.owner,
            "took ownership of the mirror tables; an old cluster still writing to them stops"
        );
        (epoch, src_epoch, src_ix)
    };
    // Read-only from here on (RestoreBegin also clears what this fresh
    // cluster made); the old owner's last requests may still be landing.
    propose(raft, Op::RestoreBegin { total: 0 }).await?;
    tokio::time::sleep(ts::WRITE_TIMEOUT + Duration::from_secs(2)).await;

    // The cluster table first: it names the namespaces, whose tables follow.
    let mut cluster_rows = RowReader::new();
    let mut bad = None;
    store
        .scan_segment(&cluster_table, 0, 1, |items| {
            for i in &items {
                if let Err(e) = cluster_rows.add(i) {
                    bad = Some(e);
                }
            }
            Ok(())
        })
        .await
        .map_err(ts_err)?;
    if let Some(e) = bad {
        return Err(e);
    }
    let cluster_rows = cluster_rows.finish();
    let mut namespaces = Vec::new();
    for (k, v) in &cluster_rows {
        if k.first() == Some(&b'N') {
            if let Some(v) = v {
                let rec: crate::raft_types::NamespaceRec =
                    bincode::deserialize(v).map_err(|e| format!("corrupt namespace row in {cluster_table}: {e}"))?;
                namespaces.push(rec.name);
            }
        }
    }
    let mut total = cluster_rows.len() as u64;
    for n in &namespaces {
        total += store.item_count(&store.namespace_table(n)).await.map_err(ts_err)?;
    }
    let progress = Progress {
        restored: std::sync::atomic::AtomicU64::new(0),
        total,
        scan_ns: std::sync::atomic::AtomicU64::new(0),
        commit_ns: std::sync::atomic::AtomicU64::new(0),
    };
    for chunk in chunk_rows(cluster_rows) {
        ship(raft, &progress, chunk).await?;
    }
    for n in &namespaces {
        let table = store.namespace_table(n);
        let t = Instant::now();
        restore_table(raft, store, &table, &progress).await?;
        tracing::info!(
            namespace = %n,
            table = %table,
            secs = t.elapsed().as_secs_f64(),
            scan_secs = Progress::secs(&progress.scan_ns),
            commit_secs = Progress::secs(&progress.commit_ns),
            "namespace rows restored (scan/commit: time segments spent waiting on each, summed)"
        );
    }

    // The log chain after the old watermark.
    let mut replayed: Writes = BTreeMap::new();
    let mut first = src_ix + 1;
    let mut items = 0;
    let mut last_ix = src_ix;
    loop {
        let k = mirror::log_key(src_epoch, first);
        let Some(head) = store.get(&cluster_table, &k, 0).await.map_err(ts_err)? else {
            break;
        };
        let (Some(last), Some(parts), Some(nonce)) = (
            ts::get_num(&head, "last"),
            ts::get_num(&head, "parts"),
            ts::get_num(&head, "nonce"),
        ) else {
            return Err("a log item head in the table store lacks last/parts/nonce".into());
        };
        let nonce = nonce as u32;
        let got = store
            .query(
                &cluster_table,
                &k,
                mirror::log_part_s(nonce, 1),
                mirror::log_part_s(nonce, parts),
            )
            .await
            .map_err(ts_err)?;
        if got.len() as u64 != parts || last < first {
            // Written by a writer that died before its head was complete
            // cannot happen (the head goes last); a short read is an error.
            return Err(format!(
                "log item {first}..={last} in {cluster_table} has {} of {parts} parts",
                got.len()
            ));
        }
        let mut bytes = Vec::new();
        for g in &got {
            bytes.extend_from_slice(ts::get_bin(g, "v").unwrap_or_default());
        }
        let writes = mirror::decode_writes(&bytes)?;
        for (k, v) in &writes {
            replayed.insert(k.clone(), v.clone());
        }
        for chunk in chunk_rows(writes) {
            ship(raft, &progress, chunk).await?;
        }
        items += 1;
        last_ix = last;
        first = last + 1;
    }
    tracing::info!(
        items,
        from = src_ix + 1,
        to = last_ix,
        "replayed the mirror log after the watermark"
    );

    // Rows = restored state, so the mirror can continue from here.
    write_back(store, view, replayed, epoch).await?;
    let finish_ix = propose(raft, Op::RestoreFinish).await?;
    let done = Watermark {
        epoch,
        // The restored cluster id: the one blockds and operators know.
        owner: format!(
            "cluster {} (restored; node {node_id} {})",
            namespace::cluster_id(view).ok().flatten().unwrap_or_default(),
            cfg.peer(node_id).map(|p| p.rpc_addr.as_str()).unwrap_or("")
        ),
        ix: finish_ix,
        state: "incremental".into(),
        src_epoch,
        src_ix: last_ix,
        at_ms: (crate::service::now_ns() / 1_000_000).max(0) as u64,
    };
    mirror::put_watermark(store, &done, Some(epoch)).await.map_err(ts_err)?;
    view.trim_mirror(finish_ix).map_err(|e| e.to_string())?;
    Ok(progress.restored.load(std::sync::atomic::Ordering::Relaxed))
}

fn chunk_rows(rows: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Vec<Vec<(Vec<u8>, Option<Vec<u8>>)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for r in rows {
        bytes += r.0.len() + r.1.as_ref().map_or(0, |v| v.len());
        cur.push(r);
        if bytes >= ENTRY_BYTES {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Writes the replayed writes into the rows of their tables.
async fn write_back(store: &TableStore, view: &SmView, writes: Writes, ix: u64) -> Result<(), String> {
    let mut by_table: BTreeMap<String, Vec<RowOp>> = BTreeMap::new();
    for (k, v) in writes {
        let table = match keys::mirror_target(&k) {
            Some(keys::MirrorTarget::Cluster) => store.cluster_table(),
            Some(keys::MirrorTarget::Namespace(id)) => match namespace::namespace_by_id(view, id) {
                Ok(Some(rec)) => store.namespace_table(&rec.name),
                _ => continue,
            },
            None => continue,
        };
        let ops = by_table.entry(table).or_default();
        match v {
            Some(v) => ops.extend(mirror::row_items(&k, &v, ix).into_iter().map(RowOp::Put)),
            None => ops.push(RowOp::Delete {
                k: mirror::row_key(&k),
                s: 0,
            }),
        }
    }
    for (table, ops) in by_table {
        store.ensure_table(&table).await.map_err(ts_err)?;
        store.batch_write(&table, ops, 8).await.map_err(ts_err)?;
    }
    Ok(())
}
