//! The `Block` gRPC service: streamed block writes and verified range reads.
//!
//! Writes are pipelined: while one message is written to the temporary file on the blocking pool,
//! the next one is received from the network, and no thread is held while the client is slow.
//! Reads open the block once, then send it in verified pieces of at most 1 MiB, reading the next
//! piece from disk while the previous one is on the wire. A read that finds a block corrupt
//! takes it out of service (see [`crate::report::quarantine_corrupt`]) before the next client
//! trips over it; the client itself already moves on to another replica.

use std::sync::Arc;
use std::time::Duration;

use jfs_common::rpc::block_server::{Block, BlockServer};
use jfs_common::rpc::{ReadBlockChunk, ReadBlockRequest, WriteBlockChunk, WriteBlockReply};
use jfs_common::{FsError, MAX_MESSAGE_BYTES};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::block_store::{run_blocking, BlockReader, BlockStore, PendingBlock, MAX_BLOCK_LEN};
use crate::report::{quarantine_in_background, Report};

/// Largest piece of a read stream.
pub const READ_PIECE: u64 = 1 << 20;
/// ReadRange calls up to this size run on the async worker itself.
const INLINE_READ: u64 = 128 << 10;
/// HTTP/2 flow-control windows: the 64 KiB default caps one stream at a few hundred MiB/s even
/// on loopback; a block-sized window lets a whole block be in flight.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame a client may send us: fewer, larger frames cost less CPU per byte than
/// the 16 KiB default.
const MAX_FRAME: u32 = 1 << 20;

pub struct BlockService {
    store: Arc<BlockStore>,
    /// A write stream that sends nothing for this long is abandoned (its temporary file freed).
    idle_timeout: Duration,
    /// Where corrupt blocks found by reads are reported.
    report: Report,
}

impl BlockService {
    pub fn new(store: Arc<BlockStore>, idle_timeout: Duration, report: Report) -> BlockService {
        BlockService {
            store,
            idle_timeout,
            report,
        }
    }

    /// The service wrapped for tonic, with jfs's message size limits.
    pub fn into_server(self) -> BlockServer<BlockService> {
        BlockServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn next_message(&self, stream: &mut Streaming<WriteBlockChunk>) -> Result<Option<WriteBlockChunk>, Status> {
        match tokio::time::timeout(self.idle_timeout, stream.message()).await {
            Ok(r) => r,
            Err(_) => Err(FsError::Unavailable(format!(
                "write stream sent nothing for {:?}; abandoned",
                self.idle_timeout
            ))
            .into()),
        }
    }
}

/// Serves the Block service on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<jfs_common::tls::ServerTls>,
    service: BlockService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let auth = jfs_common::tls::AuthLayer::new(tls.is_some());
    let incoming = jfs_common::tls::incoming(listener, tls, "block");
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(Some(MAX_FRAME))
        .max_concurrent_streams(Some(jfs_common::MAX_STREAMS_PER_CONNECTION))
        // Notices clients that vanished without closing, so their streams are freed.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(jfs_common::telemetry::RpcMetricsLayer::new("block"))
        .layer(auth)
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The pending block is either idle here or inside the disk task writing the previous message.
enum Slot {
    Ready(PendingBlock),
    Writing(JoinHandle<(PendingBlock, Result<(), FsError>)>),
}

impl Slot {
    async fn ready(self) -> Result<PendingBlock, FsError> {
        match self {
            Slot::Ready(p) => Ok(p),
            Slot::Writing(h) => {
                let (p, r) = h
                    .await
                    .map_err(|e| FsError::Internal(format!("blockd disk task failed: {e}")))?;
                match r {
                    Ok(()) => Ok(p),
                    Err(e) => {
                        discard(p);
                        Err(e)
                    }
                }
            }
        }
    }
}

/// Turns a failed read into the client's status, quarantining the block if it is corrupt.
fn read_failed(store: &Arc<BlockStore>, report: &Report, id: u64, e: FsError) -> Status {
    if let FsError::Corrupt(_) = e {
        quarantine_in_background(Arc::clone(store), report.clone(), id, "serving a read", e.clone());
    }
    e.into()
}

/// Drops an unfinished block (removing its temporary file) off the reactor.
fn discard(p: PendingBlock) {
    tokio::task::spawn_blocking(move || drop(p));
}

fn invalid(msg: String) -> Status {
    FsError::InvalidArgument(msg).into()
}

#[tonic::async_trait]
impl Block for BlockService {
    async fn write_block(
        &self,
        request: Request<Streaming<WriteBlockChunk>>,
    ) -> Result<Response<WriteBlockReply>, Status> {
        let mut stream = request.into_inner();
        let first = self
            .next_message(&mut stream)
            .await?
            .ok_or_else(|| invalid("empty write stream: the first message must carry block_id and total_len".into()))?;
        let (id, total) = (first.block_id, first.total_len);
        if total > MAX_BLOCK_LEN {
            return Err(invalid(format!(
                "block {id}: total_len {total} exceeds the largest block size {MAX_BLOCK_LEN}"
            )));
        }
        let store = Arc::clone(&self.store);
        let pending = run_blocking(move || store.begin_write(id, total)).await?;
        let mut slot = Slot::Ready(pending);
        let mut data = first.data;
        let mut received = 0u64;
        loop {
            if !data.is_empty() {
                received += data.len() as u64;
                if received > total {
                    // Settle the slot so the temporary file is removed, then refuse.
                    if let Ok(p) = slot.ready().await {
                        discard(p);
                    }
                    return Err(invalid(format!(
                        "write of block {id} carries more than its declared total_len of {total} bytes; nothing was stored"
                    )));
                }
                let mut p = slot.ready().await?;
                slot = Slot::Writing(tokio::task::spawn_blocking(move || {
                    let r = p.append(&data);
                    (p, r)
                }));
            }
            // Dropping `slot` on an early return abandons the write: the disk task (or `Drop` of
            // the idle pending block) removes the temporary file.
            let Some(msg) = self.next_message(&mut stream).await? else {
                break;
            };
            if (msg.block_id != 0 && msg.block_id != id) || (msg.total_len != 0 && msg.total_len != total) {
                if let Ok(p) = slot.ready().await {
                    discard(p);
                }
                return Err(invalid(format!(
                    "write stream of block {id} (total_len {total}) changed its header to block {} (total_len {})",
                    msg.block_id, msg.total_len
                )));
            }
            data = msg.data;
        }
        let p = slot.ready().await?;
        let w = run_blocking(move || p.finish()).await?;
        debug!(block = id, len = w.len, "write complete");
        Ok(Response::new(WriteBlockReply {
            len: w.len,
            crc32c: w.crc32c,
        }))
    }

    type ReadBlockStream = ReceiverStream<Result<ReadBlockChunk, Status>>;

    async fn read_range(&self, request: Request<ReadBlockRequest>) -> Result<Response<ReadBlockChunk>, Status> {
        let ReadBlockRequest { block_id, offset, len } = request.into_inner();
        if len > READ_PIECE {
            return Err(invalid(format!(
                "ReadRange of {len} bytes: at most {READ_PIECE} per call (use ReadBlock to stream more)"
            )));
        }
        let store = Arc::clone(&self.store);
        let read = if len <= INLINE_READ {
            // A small read is one pread, nearly always from the page cache,
            // and a checksum: cheaper done here than the two thread
            // handoffs of the blocking pool.
            store.reader(block_id).and_then(|r| r.read(offset, len))
        } else {
            run_blocking(move || store.reader(block_id)?.read(offset, len)).await
        };
        let data = read.map_err(|e| read_failed(&self.store, &self.report, block_id, e))?;
        Ok(Response::new(ReadBlockChunk { data }))
    }

    async fn read_block(&self, request: Request<ReadBlockRequest>) -> Result<Response<Self::ReadBlockStream>, Status> {
        let ReadBlockRequest { block_id, offset, len } = request.into_inner();
        let store = Arc::clone(&self.store);
        let reader: Arc<BlockReader> = Arc::new(
            run_blocking(move || store.open_block(block_id))
                .await
                .map_err(|e| read_failed(&self.store, &self.report, block_id, e))?,
        );
        let end = offset.saturating_add(len).min(reader.len());
        let (tx, rx) = mpsc::channel(2);
        let (store, report) = (Arc::clone(&self.store), self.report.clone());
        tokio::spawn(async move {
            let mut pos = offset;
            while pos < end {
                let n = READ_PIECE.min(end - pos);
                let r = Arc::clone(&reader);
                let piece = run_blocking(move || r.read(pos, n)).await;
                let item = piece
                    .map(|data| ReadBlockChunk { data })
                    .map_err(|e| read_failed(&store, &report, block_id, e));
                let failed = item.is_err();
                // A closed channel means the client went away: stop reading.
                if tx.send(item).await.is_err() || failed {
                    return;
                }
                pos += n;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jfs_common::rpc::block_client::BlockClient;
    use tonic::transport::Channel;

    async fn start() -> (
        tempfile::TempDir,
        Arc<BlockStore>,
        BlockClient<Channel>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (dir, store, client, stop, _) = start_reporting().await;
        (dir, store, client, stop)
    }

    async fn start_reporting() -> (
        tempfile::TempDir,
        Arc<BlockStore>,
        BlockClient<Channel>,
        tokio::sync::oneshot::Sender<()>,
        Report,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlockStore::open(dir.path()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let report = Report::default();
        let svc = BlockService::new(Arc::clone(&store), Duration::from_secs(10), report.clone());
        tokio::spawn(serve(listener, None, svc, async {
            let _ = stop_rx.await;
        }));
        let client = BlockClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        (dir, store, client, stop_tx, report)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn chunks_for(id: u64, total: u64, data: &[u8], piece: usize) -> Vec<WriteBlockChunk> {
        let mut out: Vec<WriteBlockChunk> = data
            .chunks(piece)
            .map(|c| WriteBlockChunk {
                block_id: 0,
                total_len: 0,
                data: c.to_vec(),
            })
            .collect();
        if out.is_empty() {
            out.push(WriteBlockChunk::default());
        }
        out[0].block_id = id;
        out[0].total_len = total;
        out
    }

    async fn read_all(client: &mut BlockClient<Channel>, id: u64, offset: u64, len: u64) -> Result<Vec<u8>, Status> {
        let mut s = client
            .read_block(ReadBlockRequest {
                block_id: id,
                offset,
                len,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(c) = s.message().await? {
            assert!(c.data.len() as u64 <= READ_PIECE);
            out.extend_from_slice(&c.data);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn streamed_write_and_read_over_grpc() {
        let (_dir, store, mut client, _stop) = start().await;
        let data = pattern((4 << 20) + 12345);
        let msgs = chunks_for(77, data.len() as u64, &data, 300_000);
        let reply = client.write_block(tokio_stream::iter(msgs)).await.unwrap().into_inner();
        assert_eq!(reply.len, data.len() as u64);
        assert_eq!(reply.crc32c, crc32c::crc32c(&data));
        assert_eq!(store.block_count(), 1);

        let all = read_all(&mut client, 77, 0, u64::MAX).await.unwrap();
        assert!(all == data);
        let part = read_all(&mut client, 77, 1_000_001, 2_500_000).await.unwrap();
        assert!(part == data[1_000_001..3_500_001]);
        let tail = read_all(&mut client, 77, data.len() as u64 - 10, 100).await.unwrap();
        assert!(tail == data[data.len() - 10..]);

        // The empty block.
        let reply = client
            .write_block(tokio_stream::iter(chunks_for(78, 0, &[], 1)))
            .await
            .unwrap();
        assert_eq!(reply.into_inner().len, 0);
        assert!(read_all(&mut client, 78, 0, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn malformed_writes_are_rejected_and_store_nothing() {
        let (dir, store, mut client, _stop) = start().await;
        let data = pattern(200_000);

        // Fewer bytes than announced.
        let msgs = chunks_for(5, 300_000, &data, 65536);
        let st = client.write_block(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        assert!(matches!(FsError::from(st), FsError::InvalidArgument(_)));

        // More bytes than announced.
        let msgs = chunks_for(5, 100_000, &data, 65536);
        let st = client.write_block(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");

        // Oversized block, empty stream, header changing mid-stream.
        let msgs = chunks_for(5, MAX_BLOCK_LEN + 1, &data, 65536);
        let st = client.write_block(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        let st = client
            .write_block(tokio_stream::iter(Vec::<WriteBlockChunk>::new()))
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        let mut msgs = chunks_for(5, 200_000, &data, 65536);
        msgs[2].block_id = 6;
        let st = client.write_block(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");

        // Missing block.
        let st = read_all(&mut client, 5, 0, 10).await.unwrap_err();
        assert!(matches!(FsError::from(st), FsError::NotFound));

        // Nothing visible, nothing left behind, and the same connection still works.
        assert_eq!(store.block_count(), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let msgs = chunks_for(5, data.len() as u64, &data, 65536);
        client.write_block(tokio_stream::iter(msgs)).await.unwrap();
        assert!(read_all(&mut client, 5, 0, u64::MAX).await.unwrap() == data);
    }

    #[tokio::test]
    async fn corrupt_block_reads_as_data_loss_and_is_quarantined() {
        let (dir, store, mut client, _stop, report) = start_reporting().await;
        let data = pattern(150_000);
        client
            .write_block(tokio_stream::iter(chunks_for(9, 150_000, &data, 1 << 20)))
            .await
            .unwrap();
        let path = store.root().join("blocks/09/0000000000000009.blk");
        let mut b = std::fs::read(&path).unwrap();
        b[100] ^= 1;
        std::fs::write(&path, b).unwrap();
        let st = read_all(&mut client, 9, 0, u64::MAX).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::DataLoss);
        assert!(matches!(FsError::from(st), FsError::Corrupt(m) if m.contains("chunk 0")));

        // Out of service (in the background) and reported; the next read is a plain miss.
        for _ in 0..200 {
            if !report.outgoing().corrupt.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(report.outgoing().corrupt, vec![9]);
        assert_eq!(store.block_count(), 0);
        assert!(dir.path().join("corrupt/0000000000000009.blk").exists());
        assert!(dir.path().join("corrupt/0000000000000009.crc").exists());
        let st = read_all(&mut client, 9, 0, u64::MAX).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::NotFound);

        // The same through ReadRange, with the damage found when the block is opened.
        client
            .write_block(tokio_stream::iter(chunks_for(10, 150_000, &data, 1 << 20)))
            .await
            .unwrap();
        let crc = store.root().join("blocks/0a/000000000000000a.crc");
        let mut b = std::fs::read(&crc).unwrap();
        b[45] ^= 1;
        std::fs::write(&crc, b).unwrap();
        let req = ReadBlockRequest {
            block_id: 10,
            offset: 0,
            len: 10,
        };
        let st = client.read_range(req).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::DataLoss);
        for _ in 0..200 {
            if report.outgoing().corrupt.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(report.outgoing().corrupt, vec![9, 10]);
        assert!(dir.path().join("corrupt/000000000000000a.crc").exists());
    }

    /// Throughput on this machine: `cargo test --release -p jfs-blockd -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn throughput() {
        let (_dir, _store, client, _stop) = start().await;
        let block = pattern(4 << 20);
        let (streams, per_stream) = (4u64, 16u64);
        let t = std::time::Instant::now();
        let mut tasks = Vec::new();
        for s in 0..streams {
            let mut c = client.clone();
            let block = block.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_stream {
                    let msgs = chunks_for(s * 1000 + i, block.len() as u64, &block, 1 << 20);
                    c.write_block(tokio_stream::iter(msgs)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mib = (streams * per_stream * 4) as f64;
        println!("write: {:.0} MiB/s", mib / t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let mut tasks = Vec::new();
        for s in 0..streams {
            let mut c = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_stream {
                    let d = read_all(&mut c, s * 1000 + i, 0, u64::MAX).await.unwrap();
                    assert_eq!(d.len(), 4 << 20);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!("read: {:.0} MiB/s", mib / t.elapsed().as_secs_f64());
    }

    /// kill -9 in the middle of writes leaves only whole blocks. Needs the built binary:
    /// `JFS_BLOCKD_BIN=target/release/jfs-blockd cargo test --release -p jfs-blockd -- --ignored kill9`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn kill9_leaves_only_whole_blocks() {
        let bin =
            std::env::var("JFS_BLOCKD_BIN").expect("set JFS_BLOCKD_BIN to the built jfs-blockd (scripts/test.sh does)");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("jfs.toml");
        std::fs::write(&conf, "jfs.namespace.server.rpc-address = \"127.0.0.1:1\"\n").unwrap();
        let data = dir.path().join("data");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let spawn = || {
            std::process::Command::new(&bin)
                .args([
                    "--conf",
                    conf.to_str().unwrap(),
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen",
                    &addr,
                ])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let connect = || async {
            for _ in 0..100 {
                if let Ok(c) = BlockClient::connect(format!("http://{addr}")).await {
                    return c.max_decoding_message_size(MAX_MESSAGE_BYTES);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("blockd did not come up");
        };
        let content = |id: u64| -> Vec<u8> { pattern(1_000_000 + (id as usize % 7) * 100_003) };

        let mut child = spawn();
        let client = connect().await;
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let mut c = client.clone();
            let acked = Arc::clone(&acked);
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = t * 1_000_000 + i;
                    let d = content(id);
                    let msgs = chunks_for(id, d.len() as u64, &d, 256 << 10);
                    if c.write_block(tokio_stream::iter(msgs)).await.is_err() {
                        return;
                    }
                    acked.lock().unwrap().push(id);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for t in tasks {
            let _ = t.await;
        }
        let acked = acked.lock().unwrap().clone();
        assert!(!acked.is_empty());

        let mut child = spawn();
        let mut c = connect().await;
        for id in &acked {
            let got = read_all(&mut c, *id, 0, u64::MAX).await.unwrap();
            assert!(got == content(*id), "block {id}");
        }
        // Whatever else is on disk must be whole too: the next id of each writer may or may not exist.
        let mut extra = 0;
        for t in 0..4u64 {
            let next = acked.iter().filter(|id| **id / 1_000_000 == t).count() as u64 + t * 1_000_000;
            match read_all(&mut c, next, 0, u64::MAX).await {
                Ok(got) => {
                    assert!(got == content(next), "block {next}");
                    extra += 1;
                }
                Err(st) => assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}"),
            }
        }
        assert_eq!(std::fs::read_dir(data.join("tmp")).unwrap().count(), 0);
        println!(
            "{} acknowledged blocks intact after kill -9, {extra} unacknowledged whole",
            acked.len()
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
