//! Copies of blocks that the metad leader asks for (`ReplicateBlock` in a heartbeat reply), made
//! to bring an under-replicated block back to its replication factor.
//!
//! Copies run in the background, a few at a time (`blockd.replication-max-inflight`), so healing
//! never holds up heartbeats nor floods the disk. A block is pulled from its sources in the
//! order given with the ordinary `ReadBlock` stream (the source verifies its checksums as it
//! reads) and stored like a client write; the outcome goes into the next heartbeat as `added`
//! or `replicate_failed`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jfs_common::rpc::block_client::BlockClient;
use jfs_common::rpc::{ReadBlockRequest, ReplicateBlock};
use jfs_common::{FsError, FsResult, MAX_MESSAGE_BYTES};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tracing::{debug, warn};

use crate::block_store::{run_blocking, BlockStore, PendingBlock};
use crate::report::{quarantine_corrupt, Report};
use crate::service::READ_PIECE;

/// How a replicate command ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The block was here already, whole.
    AlreadyHere,
    /// Copied from this source.
    Copied(String),
}

/// Why one copy attempt failed: a source's fault (try the next one) or this blockd's own
/// (its disk: no other source can help).
enum CopyError {
    Source(FsError),
    Local(FsError),
}

pub struct Replicator {
    store: Arc<BlockStore>,
    report: Report,
    /// This blockd's own address: metad should never name it as a source, but if it does,
    /// copying from oneself would only find the block missing.
    own_address: String,
    slots: Arc<Semaphore>,
    /// Blocks queued or being copied; a command repeated by the next heartbeat is not run twice.
    queued: Mutex<HashSet<u64>>,
    channels: Mutex<HashMap<String, Channel>>,
    attempt_timeout: Duration,
}

/// Takes a block off the queue when its task ends, however it ends.
struct Unqueue {
    replicator: Arc<Replicator>,
    id: u64,
}

impl Drop for Unqueue {
    fn drop(&mut self) {
        self.replicator.queued().remove(&self.id);
    }
}

/// An unfinished copy; dropping it removes its temporary file, off the reactor when possible.
struct Discard(Option<PendingBlock>);

impl Drop for Discard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(move || drop(p))),
                Err(_) => drop(p),
            }
        }
    }
}

impl Replicator {
    /// `inflight` copies run at once (at least one); each attempt on one source may take
    /// `attempt_timeout`.
    pub fn new(
        store: Arc<BlockStore>,
        report: Report,
        own_address: String,
        inflight: usize,
        attempt_timeout: Duration,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            store,
            report,
            own_address,
            slots: Arc::new(Semaphore::new(inflight.max(1))),
            queued: Mutex::new(HashSet::new()),
            channels: Mutex::new(HashMap::new()),
            attempt_timeout,
        })
    }

    fn queued(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `cmd` in the background. False when the block is already queued or being copied.
    pub fn submit(self: &Arc<Self>, cmd: ReplicateBlock) -> bool {
        let id = cmd.block_id;
        if !self.queued().insert(id) {
            debug!(
                block = id,
                "replicate command for a block already being copied; ignored"
            );
            return false;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _unqueue = Unqueue {
                replicator: Arc::clone(&me),
                id,
            };
            // The semaphore is never closed, so this waits for a free slot and never fails.
            let Ok(_slot) = Arc::clone(&me.slots).acquire_owned().await else {
                return;
            };
            // The outcome is logged and recorded for the next heartbeat.
            let _ = me.replicate(&cmd).await;
        });
        true
    }

    /// Blocks queued or being copied right now.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.queued().len()
    }

    /// Makes sure block `cmd.block_id` is stored here, copying it if needed, and records the
    /// outcome for the next heartbeat. The error is the last source's.
    pub async fn replicate(&self, cmd: &ReplicateBlock) -> FsResult<Outcome> {
        let (id, len) = (cmd.block_id, cmd.len);
        if self.whole_here(id, len).await {
            debug!(block = id, "block to replicate is already here");
            self.report.added(id);
            return Ok(Outcome::AlreadyHere);
        }
        let mut last = FsError::Unavailable("metad named no source for it".into());
        let mut tried = Vec::new();
        for source in &cmd.sources {
            if *source == self.own_address {
                continue;
            }
            tried.push(source.as_str());
            let attempt = tokio::time::timeout(self.attempt_timeout, self.copy_from(source, id, len)).await;
            let e = match attempt {
                Ok(Ok(())) => {
                    debug!(block = id, len, source = %source, "block replicated");
                    self.report.added(id);
                    return Ok(Outcome::Copied(source.clone()));
                }
                Ok(Err(CopyError::Source(e))) => e,
                Ok(Err(CopyError::Local(e))) => {
                    warn!(
                        block = id,
                        "cannot store a copy of block {id} ({len} bytes) that metad asked for: {e}; \
                         metad will place it elsewhere"
                    );
                    self.report.replicate_failed(id);
                    return Err(e);
                }
                Err(_) => FsError::Unavailable(format!(
                    "no complete copy within {:?} (blockd.client timeout)",
                    self.attempt_timeout
                )),
            };
            debug!(block = id, source = %source, error = %e, "copy attempt failed");
            last = e;
        }
        warn!(
            block = id,
            "cannot replicate block {id} ({len} bytes) as metad asked: no source gave a whole copy \
             (tried [{}]; last error: {last}); metad will pick other sources",
            tried.join(", ")
        );
        self.report.replicate_failed(id);
        Err(last)
    }

    /// True when block `id` is already stored here with length `len` and all its checksums hold.
    /// A corrupt local copy is quarantined (and then copied again).
    async fn whole_here(&self, id: u64, len: u64) -> bool {
        let store = Arc::clone(&self.store);
        let checked = run_blocking(move || {
            let r = store.open_block(id)?;
            let mut pos = 0;
            while pos < r.len() {
                let n = READ_PIECE.min(r.len() - pos);
                r.read(pos, n)?;
                pos += n;
            }
            Ok(r.len())
        })
        .await;
        match checked {
            Ok(have) if have == len => true,
            Ok(have) => {
                warn!(
                    block = id,
                    "block {id} is stored here with {have} bytes but metad says it has {len}; replacing it with a copy"
                );
                false
            }
            Err(FsError::NotFound) => false,
            Err(e @ FsError::Corrupt(_)) => {
                let (store, report) = (Arc::clone(&self.store), self.report.clone());
                let _ = run_blocking(move || {
                    quarantine_corrupt(&store, &report, id, "checking it before a replication", &e);
                    Ok(())
                })
                .await;
                false
            }
            Err(e) => {
                debug!(block = id, error = %e, "cannot check the local copy; copying anyway");
                false
            }
        }
    }

    fn channel(&self, addr: &str) -> FsResult<Channel> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ep = jfs_common::block_endpoint(addr).map_err(|e| FsError::InvalidArgument(format!("source {e}")))?;
        let ch = jfs_common::tls::channel(ep, jfs_common::tls::Role::Blockd);
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// One attempt: streams the whole block from `source` into the store.
    async fn copy_from(&self, source: &str, id: u64, len: u64) -> Result<(), CopyError> {
        let ch = self.channel(source).map_err(CopyError::Source)?;
        let mut client = BlockClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
        // The whole block, not `len` bytes: a longer source copy must be noticed, not cut to size.
        let req = ReadBlockRequest {
            block_id: id,
            offset: 0,
            len: u64::MAX,
        };
        let mut stream = client
            .read_block(req)
            .await
            .map_err(|st| CopyError::Source(st.into()))?
            .into_inner();
        let store = Arc::clone(&self.store);
        let mut pending = Discard(Some(
            run_blocking(move || store.begin_write(id, len))
                .await
                .map_err(CopyError::Local)?,
        ));
        let mut got = 0u64;
        while let Some(msg) = stream.message().await.map_err(|st| CopyError::Source(st.into()))? {
            got += msg.data.len() as u64;
            if got > len {
                return Err(CopyError::Source(FsError::Io(format!(
                    "{source} holds more than the {len} bytes metad expects of block {id}"
                ))));
            }
            let Some(mut p) = pending.0.take() else {
                return Err(CopyError::Local(FsError::Internal(
                    "copy lost its pending block".into(),
                )));
            };
            let data = msg.data;
            let (p, r) = tokio::task::spawn_blocking(move || {
                let r = p.append(&data);
                (p, r)
            })
            .await
            .map_err(|e| CopyError::Local(FsError::Internal(format!("blockd disk task failed: {e}"))))?;
            pending.0 = Some(p);
            r.map_err(CopyError::Local)?;
        }
        if got != len {
            return Err(CopyError::Source(FsError::Io(format!(
                "{source} holds {got} bytes of block {id}, metad expects {len}"
            ))));
        }
        let Some(p) = pending.0.take() else {
            return Err(CopyError::Local(FsError::Internal(
                "copy lost its pending block".into(),
            )));
        };
        run_blocking(move || p.finish()).await.map_err(CopyError::Local)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{serve, BlockService};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 13) as u8)
            .collect()
    }

    /// A blockd serving `store` on a free port; dropping the sender stops it.
    async fn source(store: Arc<BlockStore>, report: Report) -> (String, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = BlockService::new(store, Duration::from_secs(10), report);
        tokio::spawn(serve(listener, None, svc, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    fn store(dir: &tempfile::TempDir, name: &str) -> Arc<BlockStore> {
        Arc::new(BlockStore::open(&dir.path().join(name)).unwrap())
    }

    fn cmd(id: u64, len: usize, sources: &[&str]) -> ReplicateBlock {
        ReplicateBlock {
            block_id: id,
            len: len as u64,
            sources: sources.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn copies_from_the_first_source_that_works() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (store(&dir, "src"), store(&dir, "dst"));
        let data = pattern((3 << 20) + 4321, 1);
        src.write(40, &data).unwrap();
        let (addr, _stop) = source(Arc::clone(&src), Report::default()).await;
        let report = Report::default();
        let r = Replicator::new(
            Arc::clone(&dst),
            report.clone(),
            "me:1".into(),
            2,
            Duration::from_secs(10),
        );

        // A dead address first, then the real one.
        let out = r
            .replicate(&cmd(40, data.len(), &["127.0.0.1:1", &addr]))
            .await
            .unwrap();
        assert_eq!(out, Outcome::Copied(addr.clone()));
        assert!(dst.read(40, 0, u64::MAX).unwrap() == data);
        assert_eq!(report.outgoing().added, vec![40]);

        // Asked again: nothing is copied, it is reported again.
        report.acknowledge(&report.outgoing());
        let out = r.replicate(&cmd(40, data.len(), &[&addr])).await.unwrap();
        assert_eq!(out, Outcome::AlreadyHere);
        assert_eq!(report.outgoing().added, vec![40]);
    }

    #[tokio::test]
    async fn wrong_length_missing_or_corrupt_sources_fail_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (store(&dir, "src"), store(&dir, "dst"));
        let data = pattern(200_000, 2);
        src.write(41, &data).unwrap();
        src.write(42, &data).unwrap();
        let src_report = Report::default();
        let (addr, _stop) = source(Arc::clone(&src), src_report.clone()).await;
        let report = Report::default();
        let r = Replicator::new(
            Arc::clone(&dst),
            report.clone(),
            "me:1".into(),
            2,
            Duration::from_secs(10),
        );

        // Shorter and longer than metad thinks.
        assert!(r.replicate(&cmd(41, data.len() + 1, &[&addr])).await.is_err());
        assert!(r.replicate(&cmd(41, data.len() - 1, &[&addr])).await.is_err());
        // Not on the source.
        assert_eq!(r.replicate(&cmd(43, 10, &[&addr])).await, Err(FsError::NotFound));
        // No usable source at all.
        assert!(r.replicate(&cmd(44, 10, &["me:1"])).await.is_err());

        // Damaged on the source: the source quarantines it, the copy fails.
        let p = src.root().join("blocks/2a/000000000000002a.blk");
        let mut b = std::fs::read(&p).unwrap();
        b[150_000] ^= 8;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(
            r.replicate(&cmd(42, data.len(), &[&addr])).await,
            Err(FsError::Corrupt(_))
        ));
        for _ in 0..100 {
            if !src_report.outgoing().corrupt.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(src_report.outgoing().corrupt, vec![42]);

        let sent = report.outgoing();
        assert_eq!(sent.replicate_failed, vec![41, 42, 43, 44]);
        assert!(sent.added.is_empty());
        assert_eq!(dst.block_count(), 0);
        // Failed copies remove their temporary files in the background.
        let tmp_files = || std::fs::read_dir(dst.root().join("tmp")).unwrap().count();
        for _ in 0..200 {
            if tmp_files() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tmp_files(), 0, "a failed copy left its temporary file");
    }

    #[tokio::test]
    async fn a_corrupt_local_copy_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (store(&dir, "src"), store(&dir, "dst"));
        let data = pattern(100_000, 3);
        src.write(45, &data).unwrap();
        dst.write(45, &data).unwrap();
        let p = dst.root().join("blocks/2d/000000000000002d.blk");
        let mut b = std::fs::read(&p).unwrap();
        b[10] ^= 1;
        std::fs::write(&p, b).unwrap();
        let (addr, _stop) = source(Arc::clone(&src), Report::default()).await;
        let report = Report::default();
        let r = Replicator::new(
            Arc::clone(&dst),
            report.clone(),
            "me:1".into(),
            1,
            Duration::from_secs(10),
        );
        assert_eq!(
            r.replicate(&cmd(45, data.len(), &[&addr])).await.unwrap(),
            Outcome::Copied(addr)
        );
        assert!(dst.read(45, 0, u64::MAX).unwrap() == data);
        assert!(dst.root().join("corrupt/000000000000002d.blk").exists());
        // The final state is what metad hears: the block is here.
        let sent = report.outgoing();
        assert_eq!((sent.added, sent.corrupt), (vec![45], vec![]));
    }

    #[tokio::test]
    async fn background_copies_are_deduplicated_and_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (store(&dir, "src"), store(&dir, "dst"));
        for id in 50..56 {
            src.write(id, &pattern(300_000, id as u8)).unwrap();
        }
        let (addr, _stop) = source(Arc::clone(&src), Report::default()).await;
        let report = Report::default();
        let r = Replicator::new(
            Arc::clone(&dst),
            report.clone(),
            "me:1".into(),
            2,
            Duration::from_secs(10),
        );
        assert!(r.submit(cmd(50, 300_000, &[&addr])));
        assert!(!r.submit(cmd(50, 300_000, &[&addr])), "a queued block was queued twice");
        for id in 51..56 {
            assert!(r.submit(cmd(id, 300_000, &[&addr])));
        }
        for _ in 0..500 {
            if r.busy() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(r.busy(), 0);
        assert_eq!(report.outgoing().added, (50..56).collect::<Vec<_>>());
        assert_eq!(dst.block_count(), 6);
    }
}
