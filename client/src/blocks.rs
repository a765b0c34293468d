//! Block IO against blockds: one lazily connected channel per blockd
//! address, fan-out writes to every replica, reads that fall back to the
//! next replica, and a small shared cache of whole blocks for readahead.
//!
//! Blocks are immutable, so a cached block (keyed by block id) is never stale.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jfs_common::rpc::{block_client::BlockClient, ReadBlockRequest, WriteBlockChunk};
use jfs_common::{FsError, FsResult, MAX_MESSAGE_BYTES};
use tokio::sync::OnceCell;
use tonic::transport::Channel;

use crate::lock;

/// Size of the data in one WriteBlock stream message.
const CHUNK: usize = 1 << 20;

/// Reads up to this size use one unary ReadRange call instead of a stream.
const RANGE_READ_MAX: u64 = 1 << 20;

/// Bytes of whole blocks kept for readahead and re-reads.
const CACHE_BYTES: usize = 96 << 20;
/// Entries kept even when blocks are large.
const CACHE_MIN_ENTRIES: usize = 6;

/// How long a blockd that failed a request is read last and kept out of
/// new placements. metad needs its dead interval (10 s by default) to see a
/// dead blockd; this client knows at the first refused connection.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

type Slot = Arc<OnceCell<Arc<Vec<u8>>>>;

pub(crate) struct BlockPool {
    channels: Mutex<HashMap<String, Channel>>,
    timeout: Duration,
    cache: Mutex<Cache>,
    /// blockd address -> when it last failed a request of ours.
    suspects: Mutex<HashMap<String, Instant>>,
}

#[derive(Default)]
struct Cache {
    slots: HashMap<u64, (Slot, usize)>,
    /// Least recently used first.
    order: VecDeque<u64>,
    bytes: usize,
}

impl Cache {
    fn touch(&mut self, id: u64) {
        if let Some(pos) = self.order.iter().position(|&x| x == id) {
            self.order.remove(pos);
        }
        self.order.push_back(id);
    }

    fn evict(&mut self) {
        while self.bytes > CACHE_BYTES && self.order.len() > CACHE_MIN_ENTRIES {
            let Some(id) = self.order.pop_front() else { break };
            if let Some((_, n)) = self.slots.remove(&id) {
                self.bytes -= n;
            }
        }
    }
}

fn block_stub(ch: Channel) -> BlockClient<Channel> {
    BlockClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// How long a read waits for one copy before trying the next: 3 s, plus a
/// second per 8 MiB (a slow disk reading a big block is not a hung one).
fn failover_after(len: u64) -> Duration {
    Duration::from_secs(3) + Duration::from_secs(len / (8 << 20))
}

impl BlockPool {
    pub(crate) fn new(timeout: Duration) -> BlockPool {
        BlockPool {
            channels: Mutex::new(HashMap::new()),
            timeout,
            cache: Mutex::new(Cache::default()),
            suspects: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that `addr` failed; a missing or corrupt block is the
    /// block's problem, not the node's.
    fn suspect(&self, addr: &str, e: &FsError) {
        if !matches!(e, FsError::NotFound | FsError::Corrupt(_)) {
            lock(&self.suspects).insert(addr.to_string(), Instant::now());
        }
    }

    /// blockds that failed a request of ours lately (to keep new blocks
    /// off them).
    pub(crate) fn suspects(&self) -> Vec<String> {
        let mut s = lock(&self.suspects);
        s.retain(|_, t| t.elapsed() < SUSPECT_FOR);
        s.keys().cloned().collect()
    }

    fn is_suspect(&self, addr: &str) -> bool {
        lock(&self.suspects)
            .get(addr)
            .is_some_and(|t| t.elapsed() < SUSPECT_FOR)
    }

    fn channel(&self, addr: &str) -> FsResult<Channel> {
        let mut map = lock(&self.channels);
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = jfs_common::tls::channel(
            jfs_common::block_endpoint(addr).map_err(FsError::Io)?,
            jfs_common::tls::Role::Blockd,
        );
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Writes `data` as block `block_id` to every replica (in parallel).
    /// Succeeds only when all of them stored it.
    pub(crate) async fn write_all(&self, block_id: u64, data: &Arc<Vec<u8>>, replicas: &[String]) -> FsResult<()> {
        if replicas.is_empty() {
            return Err(FsError::NoSpace(
                "metad allocated a block with no replica (no live blockd?)".into(),
            ));
        }
        let _in_flight = crate::meta::InFlight::enter("jfs_client_block_uploads_in_flight");
        let results =
            futures::future::join_all(replicas.iter().map(|addr| self.write_one(addr, block_id, data.clone()))).await;
        let mut first_err = None;
        for (addr, r) in replicas.iter().zip(results) {
            if let Err(e) = r {
                self.suspect(addr, &e);
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn write_one(&self, addr: &str, block_id: u64, data: Arc<Vec<u8>>) -> FsResult<()> {
        let total = data.len();
        let nchunks = total.div_ceil(CHUNK).max(1);
        let src = data.clone();
        // Chunks are copied out of the shared buffer only as the stream is
        // polled, so a slow replica does not double the memory in use.
        let stream = futures::stream::iter(0..nchunks).map(move |i| {
            let start = i * CHUNK;
            let end = (start + CHUNK).min(total);
            let (id, len) = if i == 0 { (block_id, total as u64) } else { (0, 0) };
            WriteBlockChunk {
                block_id: id,
                total_len: len,
                data: src[start..end].to_vec(),
            }
        });
        let mut client = block_stub(self.channel(addr)?);
        let fut = client.write_block(stream);
        let reply = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(st)) => {
                let e = FsError::from(st);
                tracing::warn!(%addr, block_id, error = %e, "block write failed");
                return Err(e);
            }
            Err(_) => {
                return Err(FsError::Unavailable(format!(
                    "blockd {addr} did not store block {block_id} within {:?}",
                    self.timeout
                )))
            }
        };
        if reply.len != total as u64 {
            return Err(FsError::Io(format!(
                "blockd {addr} stored {} bytes of block {block_id}, expected {total}",
                reply.len
            )));
        }
        let crc = crc32c::crc32c(&data);
        if reply.crc32c != crc {
            return Err(FsError::Corrupt(format!(
                "blockd {addr} reports checksum {:08x} for block {block_id}, we sent {crc:08x}",
                reply.crc32c
            )));
        }
        Ok(())
    }

    /// Reads `[offset, offset + len)` of a block, trying replicas in order.
    pub(crate) async fn read(&self, block_id: u64, offset: u64, len: u64, replicas: &[String]) -> FsResult<Vec<u8>> {
        let _in_flight = crate::meta::InFlight::enter("jfs_client_block_reads_in_flight");
        let mut errors = Vec::new();
        // Replicas that failed us lately go last: a dead blockd costs a
        // refused connection (or a timeout) on every read otherwise.
        let (good, bad): (Vec<&String>, Vec<&String>) = replicas.iter().partition(|a| !self.is_suspect(a));
        let order: Vec<&String> = good.into_iter().chain(bad).collect();
        for (i, addr) in order.iter().enumerate() {
            // A blockd that hangs (stopped, disk stuck) must not cost the
            // full client timeout while another copy may answer at once;
            // the last copy gets the whole timeout.
            let limit = if i + 1 < order.len() {
                failover_after(len).min(self.timeout)
            } else {
                self.timeout
            };
            match self.read_one(addr, block_id, offset, len, limit).await {
                Ok(v) => {
                    metrics::counter!("jfs_client_block_read_bytes_total").increment(v.len() as u64);
                    return Ok(v);
                }
                Err(e) => {
                    self.suspect(addr, &e);
                    if e == FsError::NotFound {
                        // Usually a map older than a compaction or truncate
                        // whose freed blocks were collected: the caller
                        // fetches the map again.
                        tracing::debug!(%addr, block_id, "block not on this replica");
                    } else {
                        tracing::warn!(%addr, block_id, error = %e, "block read failed; trying the next replica");
                    }
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        if errors.is_empty() {
            return Err(FsError::Io(format!("block {block_id} has no replica in the block map")));
        }
        Err(FsError::Io(format!(
            "block {block_id}: no replica could be read ({})",
            errors.join("; ")
        )))
    }

    async fn read_one(&self, addr: &str, block_id: u64, offset: u64, len: u64, limit: Duration) -> FsResult<Vec<u8>> {
        let mut client = block_stub(self.channel(addr)?);
        let fut = async {
            if len <= RANGE_READ_MAX {
                let req = ReadBlockRequest { block_id, offset, len };
                return Ok(client.read_range(req).await?.into_inner().data);
            }
            let mut stream = client
                .read_block(ReadBlockRequest { block_id, offset, len })
                .await?
                .into_inner();
            let mut out: Vec<u8> = Vec::with_capacity(len as usize);
            while let Some(chunk) = stream.message().await? {
                if out.is_empty() && chunk.data.len() as u64 == len {
                    // One message holds everything: keep its buffer, no copy.
                    out = chunk.data;
                } else {
                    out.extend_from_slice(&chunk.data);
                }
                if out.len() as u64 > len {
                    break;
                }
            }
            Ok::<_, tonic::Status>(out)
        };
        let out = match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(FsError::from)?,
            Err(_) => {
                return Err(FsError::Unavailable(format!(
                    "blockd {addr} did not answer within {limit:?}"
                )))
            }
        };
        if out.len() as u64 != len {
            return Err(FsError::Io(format!(
                "blockd {addr} returned {} bytes of block {block_id} at {offset}, expected {len}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The first `len` bytes of a block, from the cache or the replicas;
    /// concurrent callers for the same block share one fetch.
    pub(crate) async fn whole(&self, block_id: u64, len: u64, replicas: &[String]) -> FsResult<Arc<Vec<u8>>> {
        let slot = {
            let mut c = lock(&self.cache);
            let slot = match c.slots.get(&block_id) {
                Some((s, _)) => {
                    metrics::counter!("jfs_client_block_cache_hits_total").increment(1);
                    s.clone()
                }
                None => {
                    metrics::counter!("jfs_client_block_cache_misses_total").increment(1);
                    let s: Slot = Arc::new(OnceCell::new());
                    c.slots.insert(block_id, (s.clone(), len as usize));
                    c.bytes += len as usize;
                    c.evict();
                    s
                }
            };
            c.touch(block_id);
            slot
        };
        let data = slot
            .get_or_try_init(|| async { self.read(block_id, 0, len, replicas).await.map(Arc::new) })
            .await?
            .clone();
        if (data.len() as u64) < len {
            // Cached under a shorter length (cannot happen for one block id,
            // whose content never changes); read what is asked for.
            return Ok(Arc::new(self.read(block_id, 0, len, replicas).await?));
        }
        Ok(data)
    }

    /// True when the block is in the cache (fetched or being fetched).
    pub(crate) fn cached(&self, block_id: u64) -> bool {
        lock(&self.cache).slots.contains_key(&block_id)
    }
}
