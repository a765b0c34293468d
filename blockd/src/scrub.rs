//! The scrubber: a slow background pass that reads every block and checks all its checksums,
//! so that a block gone bad on a disk nobody reads is found while other replicas are still good.
//!
//! It reads at most `blockd.scrub-rate-mib` per second (0 turns it off), one piece at a time on
//! the blocking pool, holding no store lock between pieces, then rests
//! `blockd.scrub-interval-ms` before the next pass. A corrupt block is quarantined exactly as
//! when a client read finds it. Progress is not kept across restarts: a restarted blockd starts
//! a fresh pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jfs_common::FsError;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::block_store::{run_blocking, BlockStore};
use crate::report::{quarantine_corrupt, Report};
use crate::service::READ_PIECE;

/// Shortest rest between passes, so an empty store with a zero interval does not spin.
const MIN_REST: Duration = Duration::from_secs(1);

pub struct Scrubber {
    store: Arc<BlockStore>,
    report: Report,
    /// Bytes per second; 0 = off.
    rate: u64,
    interval: Duration,
}

/// What one pass found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassStats {
    pub checked: u64,
    pub corrupt: u64,
    /// Blocks that could not be read for another reason than bad checksums (an I/O error).
    pub unreadable: u64,
    pub bytes: u64,
}

/// Waits until `deadline`; false when told to stop first.
async fn sleep_until(stop: &mut watch::Receiver<bool>, deadline: tokio::time::Instant) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(deadline) => true,
        // A dropped sender also means stop.
        _ = stop.changed() => false,
    }
}

impl Scrubber {
    pub fn new(store: Arc<BlockStore>, report: Report, rate: u64, interval: Duration) -> Scrubber {
        Scrubber {
            store,
            report,
            rate,
            interval,
        }
    }

    /// Scrubs pass after pass until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        if self.rate == 0 {
            info!("block scrubber is off (blockd.scrub-rate-mib = 0): corrupt blocks are found only when read");
            return;
        }
        loop {
            let started = Instant::now();
            let Some(stats) = self.pass(&mut stop).await else {
                return;
            };
            info!(
                mib = stats.bytes >> 20,
                "scrub pass done in {:.0?}: {} blocks checked, {} corrupt (quarantined), {} unreadable; next pass in {:?}",
                started.elapsed(),
                stats.checked,
                stats.corrupt,
                stats.unreadable,
                self.interval
            );
            let rest = tokio::time::Instant::now() + self.interval.max(MIN_REST);
            if !sleep_until(&mut stop, rest).await {
                return;
            }
        }
    }

    /// One pass over every block. None when stopped part-way.
    pub async fn pass(&self, stop: &mut watch::Receiver<bool>) -> Option<PassStats> {
        let store = Arc::clone(&self.store);
        let blocks = match run_blocking(move || store.list()).await {
            Ok(b) => b,
            Err(e) => {
                warn!("scrubber cannot list the blocks, skipping this pass: {e}");
                return Some(PassStats::default());
            }
        };
        let mut stats = PassStats::default();
        // Pacing by the clock rather than by sleeping after each piece: time spent reading
        // counts against the rate, so a slow disk is not slowed further.
        let start = tokio::time::Instant::now();
        for (id, _) in blocks {
            let store = Arc::clone(&self.store);
            let reader = match run_blocking(move || store.open_block(id)).await {
                Ok(r) => Arc::new(r),
                // Deleted since the listing.
                Err(FsError::NotFound) => continue,
                Err(e) => {
                    self.failed(id, e, &mut stats).await;
                    continue;
                }
            };
            let mut pos = 0;
            let mut ok = true;
            while pos < reader.len() {
                let n = READ_PIECE.min(reader.len() - pos);
                let r = Arc::clone(&reader);
                if let Err(e) = run_blocking(move || r.read(pos, n).map(|_| ())).await {
                    self.failed(id, e, &mut stats).await;
                    ok = false;
                    break;
                }
                pos += n;
                stats.bytes += n;
                let due = start + Duration::from_secs_f64(stats.bytes as f64 / self.rate as f64);
                if !sleep_until(stop, due).await {
                    return None;
                }
            }
            if ok {
                stats.checked += 1;
            }
            if *stop.borrow() {
                return None;
            }
        }
        Some(stats)
    }

    async fn failed(&self, id: u64, e: FsError, stats: &mut PassStats) {
        stats.checked += 1;
        if let FsError::Corrupt(_) = e {
            stats.corrupt += 1;
            let (store, report) = (Arc::clone(&self.store), self.report.clone());
            let _ = run_blocking(move || {
                quarantine_corrupt(&store, &report, id, "found by the scrubber", &e);
                Ok(())
            })
            .await;
        } else {
            stats.unreadable += 1;
            warn!(block = id, "scrubber cannot read block {id}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
    }

    #[tokio::test]
    async fn finds_and_quarantines_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(dir.path()).unwrap());
        for id in 1..=4u64 {
            store.write(id, &pattern(300_000 * id as usize, id as u8)).unwrap();
        }
        let p = dir.path().join("blocks/03/0000000000000003.blk");
        let mut b = std::fs::read(&p).unwrap();
        b[700_000] ^= 0x10;
        std::fs::write(&p, b).unwrap();

        let report = Report::default();
        let s = Scrubber::new(Arc::clone(&store), report.clone(), 1 << 30, Duration::from_secs(1));
        let (_tx, mut rx) = watch::channel(false);
        let stats = s.pass(&mut rx).await.unwrap();
        assert_eq!(stats.checked, 4);
        assert_eq!(stats.corrupt, 1);
        assert_eq!(stats.unreadable, 0);
        assert_eq!(report.outgoing().corrupt, vec![3]);
        assert_eq!(store.block_count(), 3);
        assert!(dir.path().join("corrupt/0000000000000003.blk").exists());

        // The next pass finds nothing wrong.
        let stats = s.pass(&mut rx).await.unwrap();
        assert_eq!((stats.checked, stats.corrupt), (3, 0));
    }

    #[tokio::test]
    async fn keeps_to_its_rate_and_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(dir.path()).unwrap());
        store.write(1, &pattern(400_000, 1)).unwrap();
        store.write(2, &pattern(400_000, 2)).unwrap();
        // 800 KB at 1 MB/s: about 0.8 s.
        let s = Scrubber::new(Arc::clone(&store), Report::default(), 1_000_000, Duration::from_secs(1));
        let (tx, mut rx) = watch::channel(false);
        let t = Instant::now();
        let stats = s.pass(&mut rx).await.unwrap();
        assert_eq!(stats.bytes, 800_000);
        assert!(t.elapsed() >= Duration::from_millis(700), "{:?}", t.elapsed());

        // Far slower: the stop signal ends the pass at once.
        let s = Scrubber::new(Arc::clone(&store), Report::default(), 1000, Duration::from_secs(1));
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(true);
        });
        let t = Instant::now();
        assert_eq!(s.pass(&mut rx).await, None);
        assert!(t.elapsed() < Duration::from_secs(5));
        stopper.await.unwrap();
    }

    #[tokio::test]
    async fn a_zero_rate_turns_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(dir.path()).unwrap());
        let (_tx, rx) = watch::channel(false);
        let s = Scrubber::new(store, Report::default(), 0, Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), s.run(rx)).await.unwrap();
    }
}
