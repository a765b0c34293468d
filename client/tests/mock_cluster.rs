//! The client library against an in-process mock of metad and blockd.
//!
//! The mock keeps just enough of the namespace (inodes, entries, block
//! refs) and of block storage to check the client's own logic: block
//! splitting, holes, partial overwrites, unflushed reads, truncation, retries
//! that reuse their sequence number, leader following and replica fallback.
//! The real services are exercised by the jfs-tests crate.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use jfs_client::{Client, FsError, MetaClient, SetAttrArgs};
use jfs_common::rpc::{self, block_server, meta_server, Attr, BlockRef};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

const BS: u64 = 64 << 10;
const ROOT: u64 = 1;

type Res<T> = Result<Response<T>, Status>;

#[derive(Default)]
struct Ns {
    inodes: HashMap<u64, Attr>,
    entries: BTreeMap<(u64, Vec<u8>), u64>,
    blocks: BTreeMap<(u64, u64), BlockRef>,
    next_ino: u64,
    next_block: u64,
    /// Saved Mknod replies by (client id, seq): the exactly-once table.
    done: HashMap<(u64, u64), Attr>,
    mknod_applied: u32,
}

#[derive(Clone)]
struct MockMeta {
    ns: Arc<Mutex<Ns>>,
    /// Replicas handed out by AllocateBlocks.
    replicas: Vec<String>,
    /// Apply the next Mknod but lose its reply (as if the leader died).
    lose_next_reply: Arc<AtomicBool>,
    /// When set, this node is a follower pointing at that leader.
    follower_of: Option<String>,
    calls: Arc<AtomicU32>,
}

fn fs_err(e: FsError) -> Status {
    e.into()
}

impl MockMeta {
    fn check_leader(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.follower_of {
            Some(l) => Err(fs_err(FsError::NotLeader {
                leader: Some(l.clone()),
            })),
            None => Ok(()),
        }
    }

    fn attr(&self, ino: u64) -> Result<Attr, Status> {
        self.ns
            .lock()
            .unwrap()
            .inodes
            .get(&ino)
            .cloned()
            .ok_or_else(|| fs_err(FsError::NotFound))
    }
}

fn truncate_refs(ns: &mut Ns, ino: u64, size: u64) {
    let keys: Vec<(u64, u64)> = ns.blocks.range((ino, 0)..(ino + 1, 0)).map(|(k, _)| *k).collect();
    for k in keys {
        let start = k.1 * BS;
        if start >= size {
            ns.blocks.remove(&k);
        } else if let Some(r) = ns.blocks.get_mut(&k) {
            r.len = r.len.min(size - start);
        }
    }
}

fn unimpl<T>() -> Res<T> {
    Err(Status::unimplemented("not in the mock"))
}

#[tonic::async_trait]
impl meta_server::Meta for MockMeta {
    async fn create_namespace(&self, _r: Request<rpc::CreateNamespaceRequest>) -> Res<rpc::NamespaceInfo> {
        unimpl()
    }
    async fn get_namespace(&self, r: Request<rpc::GetNamespaceRequest>) -> Res<rpc::NamespaceInfo> {
        self.check_leader()?;
        if r.into_inner().name != "default" {
            return Err(fs_err(FsError::NamespaceNotFound("x".into())));
        }
        Ok(Response::new(rpc::NamespaceInfo {
            id: 7,
            name: "default".into(),
            block_size: BS,
            replication: 1,
            root_ino: ROOT,
            recovery_mode: false,
        }))
    }
    async fn list_namespaces(&self, _r: Request<rpc::ListNamespacesRequest>) -> Res<rpc::ListNamespacesReply> {
        unimpl()
    }
    async fn lookup(&self, r: Request<rpc::LookupRequest>) -> Res<rpc::AttrReply> {
        self.check_leader()?;
        let r = r.into_inner();
        let ino = *self
            .ns
            .lock()
            .unwrap()
            .entries
            .get(&(r.parent, r.name))
            .ok_or_else(|| fs_err(FsError::NotFound))?;
        Ok(Response::new(rpc::AttrReply {
            attr: Some(self.attr(ino)?),
        }))
    }
    async fn get_attr(&self, r: Request<rpc::GetAttrRequest>) -> Res<rpc::AttrReply> {
        self.check_leader()?;
        Ok(Response::new(rpc::AttrReply {
            attr: Some(self.attr(r.into_inner().ino)?),
        }))
    }
    async fn set_attr(&self, r: Request<rpc::SetAttrRequest>) -> Res<rpc::AttrReply> {
        self.check_leader()?;
        let r = r.into_inner();
        let mut ns = self.ns.lock().unwrap();
        let mut a = ns
            .inodes
            .get(&r.ino)
            .cloned()
            .ok_or_else(|| fs_err(FsError::NotFound))?;
        if let Some(m) = r.mode {
            a.mode = (a.mode & rpc::S_IFMT) | (m & 0o7777);
        }
        if let Some(sz) = r.size {
            if sz < a.size {
                truncate_refs(&mut ns, r.ino, sz);
            }
            a.size = sz;
        }
        if let Some(t) = r.mtime {
            a.mtime = Some(t);
        }
        ns.inodes.insert(r.ino, a);
        Ok(Response::new(rpc::AttrReply { attr: Some(a) }))
    }
    async fn mknod(&self, r: Request<rpc::MknodRequest>) -> Res<rpc::AttrReply> {
        self.check_leader()?;
        let r = r.into_inner();
        let hdr = r.hdr.unwrap_or_default();
        let mut ns = self.ns.lock().unwrap();
        if let Some(a) = ns.done.get(&(hdr.client_id, hdr.seq)) {
            return Ok(Response::new(rpc::AttrReply { attr: Some(*a) }));
        }
        if ns.entries.contains_key(&(r.parent, r.name.clone())) {
            return Err(fs_err(FsError::AlreadyExists));
        }
        ns.next_ino += 1;
        let ino = ns.next_ino + 100;
        let a = Attr {
            ino,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            nlink: 1,
            generation: 1,
            ..Default::default()
        };
        ns.inodes.insert(ino, a);
        ns.entries.insert((r.parent, r.name), ino);
        ns.done.insert((hdr.client_id, hdr.seq), a);
        ns.mknod_applied += 1;
        if self.lose_next_reply.swap(false, Ordering::SeqCst) {
            return Err(Status::unavailable("leader went away before replying"));
        }
        Ok(Response::new(rpc::AttrReply { attr: Some(a) }))
    }
    async fn symlink(&self, _r: Request<rpc::SymlinkRequest>) -> Res<rpc::AttrReply> {
        unimpl()
    }
    async fn link(&self, _r: Request<rpc::LinkRequest>) -> Res<rpc::AttrReply> {
        unimpl()
    }
    async fn unlink(&self, _r: Request<rpc::UnlinkRequest>) -> Res<rpc::UnlinkReply> {
        unimpl()
    }
    async fn rmdir(&self, _r: Request<rpc::RmdirRequest>) -> Res<rpc::UnlinkReply> {
        unimpl()
    }
    async fn rename(&self, _r: Request<rpc::RenameRequest>) -> Res<rpc::RenameReply> {
        unimpl()
    }
    async fn release_orphan(&self, _r: Request<rpc::ReleaseOrphanRequest>) -> Res<rpc::UnlinkReply> {
        unimpl()
    }
    async fn read_dir(&self, _r: Request<rpc::ReadDirRequest>) -> Res<rpc::ReadDirReply> {
        unimpl()
    }
    async fn read_link(&self, _r: Request<rpc::ReadLinkRequest>) -> Res<rpc::ReadLinkReply> {
        unimpl()
    }
    async fn set_xattr(&self, _r: Request<rpc::SetXattrRequest>) -> Res<rpc::AttrReply> {
        unimpl()
    }
    async fn get_xattr(&self, _r: Request<rpc::GetXattrRequest>) -> Res<rpc::GetXattrReply> {
        unimpl()
    }
    async fn list_xattr(&self, _r: Request<rpc::ListXattrRequest>) -> Res<rpc::ListXattrReply> {
        unimpl()
    }
    async fn remove_xattr(&self, _r: Request<rpc::RemoveXattrRequest>) -> Res<rpc::AttrReply> {
        unimpl()
    }
    async fn stat_fs(&self, _r: Request<rpc::StatFsRequest>) -> Res<rpc::StatFsReply> {
        unimpl()
    }
    async fn allocate_blocks(&self, r: Request<rpc::AllocateBlocksRequest>) -> Res<rpc::AllocateBlocksReply> {
        self.check_leader()?;
        let r = r.into_inner();
        let mut ns = self.ns.lock().unwrap();
        let blocks = (0..r.count)
            .map(|_| {
                ns.next_block += 1;
                rpc::AllocatedBlock {
                    block_id: ns.next_block,
                    replicas: self.replicas.clone(),
                }
            })
            .collect();
        Ok(Response::new(rpc::AllocateBlocksReply { blocks }))
    }
    async fn get_blocks(&self, r: Request<rpc::GetBlocksRequest>) -> Res<rpc::GetBlocksReply> {
        self.check_leader()?;
        let r = r.into_inner();
        let attr = self.attr(r.ino)?;
        let ns = self.ns.lock().unwrap();
        let end = r.first_index + r.count.max(1) as u64;
        let blocks = ns
            .blocks
            .range((r.ino, r.first_index)..(r.ino, end))
            .map(|(_, b)| b.clone())
            .collect();
        Ok(Response::new(rpc::GetBlocksReply {
            attr: Some(attr),
            blocks,
        }))
    }
    async fn commit_write(&self, r: Request<rpc::CommitWriteRequest>) -> Res<rpc::AttrReply> {
        self.check_leader()?;
        let r = r.into_inner();
        let mut ns = self.ns.lock().unwrap();
        let mut a = ns
            .inodes
            .get(&r.ino)
            .cloned()
            .ok_or_else(|| fs_err(FsError::NotFound))?;
        for b in r.blocks {
            if b.index * BS >= r.size.max(1) && b.len > 0 || b.len > BS {
                return Err(fs_err(FsError::InvalidArgument(format!(
                    "ref {} outside the file",
                    b.index
                ))));
            }
            ns.blocks.insert((r.ino, b.index), b);
        }
        if r.size < a.size {
            truncate_refs(&mut ns, r.ino, r.size);
        }
        a.size = r.size;
        ns.inodes.insert(r.ino, a);
        Ok(Response::new(rpc::AttrReply { attr: Some(a) }))
    }
    async fn heartbeat(&self, _r: Request<rpc::HeartbeatRequest>) -> Res<rpc::HeartbeatReply> {
        unimpl()
    }
    async fn status(&self, _r: Request<rpc::StatusRequest>) -> Res<rpc::NodeStatus> {
        Ok(Response::new(rpc::NodeStatus {
            role: if self.follower_of.is_some() {
                "follower"
            } else {
                "leader"
            }
            .into(),
            ..Default::default()
        }))
    }
}

#[derive(Clone, Default)]
struct MockBlock {
    blocks: Arc<Mutex<HashMap<u64, Vec<u8>>>>,
    /// Every read fails (a bad disk).
    broken: bool,
    /// Writes fail with "no space" while set.
    full: Arc<AtomicBool>,
    reads: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl block_server::Block for MockBlock {
    async fn write_block(&self, r: Request<Streaming<rpc::WriteBlockChunk>>) -> Res<rpc::WriteBlockReply> {
        if self.full.load(Ordering::SeqCst) {
            return Err(fs_err(FsError::NoSpace("mock disk is full".into())));
        }
        let mut s = r.into_inner();
        let mut id = 0;
        let mut total = 0;
        let mut data = Vec::new();
        while let Some(c) = s.message().await? {
            if id == 0 {
                id = c.block_id;
                total = c.total_len;
            }
            data.extend_from_slice(&c.data);
        }
        assert_eq!(data.len() as u64, total, "stream length matches its header");
        let crc = crc32c::crc32c(&data);
        self.blocks.lock().unwrap().insert(id, data);
        Ok(Response::new(rpc::WriteBlockReply {
            len: total,
            crc32c: crc,
        }))
    }

    type ReadBlockStream = Pin<Box<dyn Stream<Item = Result<rpc::ReadBlockChunk, Status>> + Send>>;

    async fn read_block(&self, r: Request<rpc::ReadBlockRequest>) -> Res<Self::ReadBlockStream> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.broken {
            return Err(fs_err(FsError::Corrupt("checksum mismatch in the mock".into())));
        }
        let r = r.into_inner();
        let blocks = self.blocks.lock().unwrap();
        let b = blocks.get(&r.block_id).ok_or_else(|| fs_err(FsError::NotFound))?;
        let end = (r.offset + r.len).min(b.len() as u64) as usize;
        let data = b[r.offset as usize..end].to_vec();
        let chunks: Vec<Result<rpc::ReadBlockChunk, Status>> = data
            .chunks(1 << 20)
            .map(|c| Ok(rpc::ReadBlockChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

struct Cluster {
    meta: MockMeta,
    good: MockBlock,
    bad: MockBlock,
    meta_addrs: Vec<String>,
    follower_calls: Arc<AtomicU32>,
}

/// A follower (first address) and a leader, one broken and one good blockd;
/// blocks are placed broken-replica-first so reads must fall back.
async fn cluster(with_broken_replica: bool) -> Cluster {
    let (bl_good, a_good) = listener().await;
    let (bl_bad, a_bad) = listener().await;
    let (ml_leader, a_leader) = listener().await;
    let (ml_follower, a_follower) = listener().await;
    let good = MockBlock::default();
    let bad = MockBlock {
        broken: true,
        ..Default::default()
    };
    let mut replicas = vec![a_good.to_string()];
    if with_broken_replica {
        // Writes go to both; the broken one fails only reads.
        replicas.insert(0, a_bad.to_string());
    }
    let meta = MockMeta {
        ns: Arc::new(Mutex::new(Ns::default())),
        replicas,
        lose_next_reply: Arc::new(AtomicBool::new(false)),
        follower_of: None,
        calls: Arc::new(AtomicU32::new(0)),
    };
    meta.ns.lock().unwrap().inodes.insert(
        ROOT,
        Attr {
            ino: ROOT,
            mode: rpc::S_IFDIR | 0o755,
            nlink: 2,
            ..Default::default()
        },
    );
    let follower = MockMeta {
        follower_of: Some(a_leader.to_string()),
        calls: Arc::new(AtomicU32::new(0)),
        ..meta.clone()
    };
    let follower_calls = follower.calls.clone();
    for (l, svc) in [(bl_good, good.clone()), (bl_bad, bad.clone())] {
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(block_server::BlockServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
    }
    for (l, svc) in [(ml_leader, meta.clone()), (ml_follower, follower)] {
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(meta_server::MetaServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
    }
    Cluster {
        meta,
        good,
        bad,
        meta_addrs: vec![a_follower.to_string(), a_leader.to_string()],
        follower_calls,
    }
}

async fn client(c: &Cluster) -> Client {
    let meta = MetaClient::new(c.meta_addrs.clone(), Duration::from_secs(10));
    Client::with_meta(meta, "default").await.unwrap()
}

/// Deterministic, position-dependent bytes so misplaced data shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 7) as u8).wrapping_add(seed)).collect()
}

async fn read_all(c: &Client, ino: u64) -> Vec<u8> {
    let h = c.open_file(ino).await.unwrap();
    let size = h.size();
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let chunk = h.read_at(out.len() as u64, 100_000).await.unwrap();
        assert!(!chunk.is_empty(), "short read at {} of {size}", out.len());
        out.extend_from_slice(&chunk);
    }
    h.release().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_round_trips_at_block_edges() {
    let cl = cluster(false).await;
    let c = client(&cl).await;
    assert_eq!(c.block_size(), BS);
    assert!(
        cl.follower_calls.load(Ordering::SeqCst) > 0,
        "the follower was asked first and redirected us"
    );
    for (i, size) in [
        0usize,
        1,
        4095,
        4096,
        BS as usize - 1,
        BS as usize,
        BS as usize + 1,
        1_000_003,
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("f{i}");
        let a = c.create(ROOT, name.as_bytes(), 0o644, 0, 0, true).await.unwrap();
        let h = c.open_created(&a).await.unwrap();
        let data = pattern(size, i as u8);
        // Uneven write sizes, as a tool with its own buffer would issue.
        let mut off = 0;
        for chunk in data.chunks(33_333) {
            assert_eq!(h.write_at(off, chunk).await.unwrap(), chunk.len());
            off += chunk.len() as u64;
        }
        h.release().await.unwrap();
        assert_eq!(c.getattr(a.ino).await.unwrap().size, size as u64);
        assert!(read_all(&c, a.ino).await == data, "size {size} round-trips");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_overwrites_and_unflushed_reads() {
    let cl = cluster(false).await;
    let c = client(&cl).await;
    let a = c.create(ROOT, b"h", 0o644, 0, 0, true).await.unwrap();
    let h = c.open_file(a.ino).await.unwrap();
    // A write far past EOF leaves a hole.
    let far = 3 * BS + 100;
    h.write_at(far, b"tail").await.unwrap();
    assert_eq!(h.size(), far + 4);
    assert_eq!(
        c.getattr(a.ino).await.unwrap().size,
        far + 4,
        "attrs include unflushed size"
    );
    let got = h.read_at(0, (far + 4) as usize).await.unwrap();
    assert!(got[..far as usize].iter().all(|&b| b == 0));
    assert_eq!(&got[far as usize..], b"tail");
    h.release().await.unwrap();
    let mut expect = vec![0u8; far as usize];
    expect.extend_from_slice(b"tail");
    assert!(read_all(&c, a.ino).await == expect);

    // Partial overwrite of a committed block: old bytes around it survive.
    let h = c.open_file(a.ino).await.unwrap();
    let base = pattern((2 * BS) as usize, 9);
    h.write_at(0, &base).await.unwrap();
    h.flush().await.unwrap();
    h.write_at(BS + 10, b"PATCH").await.unwrap();
    // Readable before flush, and the untouched bytes of that block too.
    assert_eq!(h.read_at(BS, 20).await.unwrap()[10..15], *b"PATCH");
    assert_eq!(h.read_at(BS, 10).await.unwrap(), base[BS as usize..BS as usize + 10]);
    h.release().await.unwrap();
    expect[..base.len()].copy_from_slice(&base);
    expect[BS as usize + 10..BS as usize + 15].copy_from_slice(b"PATCH");
    assert!(read_all(&c, a.ino).await == expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_flushes_and_cuts() {
    let cl = cluster(false).await;
    let c = client(&cl).await;
    let a = c.create(ROOT, b"t", 0o644, 0, 0, true).await.unwrap();
    let h = c.open_file(a.ino).await.unwrap();
    let data = pattern((3 * BS) as usize, 3);
    h.write_at(0, &data).await.unwrap();
    // Shrink to the middle of block 1 while data is still buffered.
    let cut = BS + 1000;
    let attr = c
        .setattr(
            a.ino,
            SetAttrArgs {
                size: Some(cut),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, cut);
    assert_eq!(h.size(), cut);
    // Grow again: the cut-off bytes must not come back.
    c.setattr(
        a.ino,
        SetAttrArgs {
            size: Some(2 * BS),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = h.read_at(0, (2 * BS) as usize).await.unwrap();
    assert_eq!(got.len() as u64, 2 * BS);
    assert!(got[..cut as usize] == data[..cut as usize]);
    assert!(got[cut as usize..].iter().all(|&b| b == 0));
    h.release().await.unwrap();
    let back = read_all(&c, a.ino).await;
    assert!(back == got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_mutation_reuses_its_sequence_number() {
    let cl = cluster(false).await;
    let c = client(&cl).await;
    cl.meta.lose_next_reply.store(true, Ordering::SeqCst);
    // The first attempt is applied but its reply lost; the retry must get
    // the saved reply, not EEXIST.
    let a = c.create(ROOT, b"once", 0o644, 0, 0, true).await.unwrap();
    assert_eq!(cl.meta.ns.lock().unwrap().mknod_applied, 1);
    assert_eq!(c.lookup(ROOT, b"once").await.unwrap().ino, a.ino);
    assert_eq!(
        c.create(ROOT, b"once", 0o644, 0, 0, true).await.unwrap_err(),
        FsError::AlreadyExists
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_a_good_replica() {
    let cl = cluster(true).await;
    let c = client(&cl).await;
    let a = c.create(ROOT, b"r", 0o644, 0, 0, true).await.unwrap();
    let h = c.open_created(&a).await.unwrap();
    let data = pattern((2 * BS + 5) as usize, 1);
    h.write_at(0, &data).await.unwrap();
    h.release().await.unwrap();
    assert!(read_all(&c, a.ino).await == data);
    assert!(
        cl.bad.reads.load(Ordering::SeqCst) > 0,
        "the broken replica was tried first"
    );
    assert!(cl.good.reads.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_sequential_write_streams_and_random_reads_work() {
    let cl = cluster(false).await;
    let c = client(&cl).await;
    let a = c.create(ROOT, b"big", 0o644, 0, 0, true).await.unwrap();
    let h = c.open_created(&a).await.unwrap();
    let data = pattern(8 << 20, 5);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        h.write_at((i << 20) as u64, chunk).await.unwrap();
    }
    // Full blocks went out before the flush.
    assert!(
        cl.good.blocks.lock().unwrap().len() >= 100,
        "uploads started while writing"
    );
    h.release().await.unwrap();
    let h = c.open_file(a.ino).await.unwrap();
    for off in [0u64, 12345, BS - 3, 5 * BS + 17, (8 << 20) - 10] {
        let got = h.read_at(off, 4000).await.unwrap();
        let end = (off as usize + 4000).min(data.len());
        assert!(got == data[off as usize..end], "random read at {off}");
    }
    h.release().await.unwrap();
    assert!(read_all(&c, a.ino).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_errors_surface_and_nothing_partial_is_committed() {
    let cl = cluster(false).await;
    let c = client(&cl).await;
    let a = c.create(ROOT, b"full", 0o644, 0, 0, true).await.unwrap();
    let h = c.open_created(&a).await.unwrap();
    h.write_at(0, &pattern(BS as usize, 1)).await.unwrap();
    h.flush().await.unwrap();
    cl.good.full.store(true, Ordering::SeqCst);
    // Two more full blocks: their uploads fail in the background.
    h.write_at(BS, &pattern(2 * BS as usize, 2)).await.unwrap();
    let e = h.flush().await.unwrap_err();
    assert!(matches!(e, FsError::NoSpace(_)), "{e:?}");
    assert_eq!(e.errno(), libc::ENOSPC);
    // The error stays until close; nothing of the failed write is committed.
    assert!(h.write_at(3 * BS, b"x").await.is_err());
    cl.good.full.store(false, Ordering::SeqCst);
    assert!(h.release().await.is_err());
    assert_eq!(c.getattr(a.ino).await.unwrap().size, BS);
    // A new open starts clean.
    let h = c.open_file(a.ino).await.unwrap();
    h.write_at(BS, b"ok").await.unwrap();
    h.release().await.unwrap();
    assert_eq!(c.getattr(a.ino).await.unwrap().size, BS + 2);
}
