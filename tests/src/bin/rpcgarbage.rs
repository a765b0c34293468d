//! rpcgarbage: sends malformed, oversized and random gRPC requests to every
//! method of one jfs service, for the hostile-input test.
//!
//! `rpcgarbage [--tls-dir DIR --role ROLE] [--expect metad|blockd] [--seed N] ADDR meta|raft|block`
//!
//! For each method it sends, over one HTTP/2 connection made as ROLE:
//! random protobuf bodies (skipped for the cluster-changing admin calls,
//! where a body that happens to decode would be an operator's order), a
//! frame whose length prefix claims 4 GiB, a compressed frame the server
//! was never told how to decompress, a truncated frame, and (once per
//! service) one real frame larger than any server accepts. Every request
//! must end in a gRPC status; a broken connection is counted and the probe
//! reconnects. Prints one line per method and a final `TOTAL` line; exits
//! 1 if the server stopped answering altogether.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use jfs_common::tls::Role;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tower_service::Service;

const META: &[&str] = &[
    "CreateNamespace",
    "GetNamespace",
    "ListNamespaces",
    "Lookup",
    "GetAttr",
    "SetAttr",
    "Mknod",
    "Symlink",
    "Link",
    "Unlink",
    "Rmdir",
    "Rename",
    "ReleaseOrphan",
    "ReadDir",
    "ReadLink",
    "SetXattr",
    "GetXattr",
    "ListXattr",
    "RemoveXattr",
    "StatFs",
    "AllocateBlocks",
    "GetChunks",
    "CommitSlices",
    "CompactChunk",
    "AbandonBlocks",
    "Fallocate",
    "Heartbeat",
    "BlockReport",
    "ListBlockds",
    "SetBlockdState",
    "Fsck",
    "SetReplication",
    "SetNamespaceAccess",
    "Status",
    "KeepAlive",
    "SetLock",
    "GetLock",
    "AddMember",
    "RemoveMember",
    "TransferLeader",
    "Campaign",
    "RecoveryFinish",
    "MirrorVerify",
];
const RAFT: &[&str] = &["AppendEntries", "Vote", "InstallSnapshot"];
const BLOCK: &[&str] = &["WriteBlock", "ReadBlock", "ReadRange"];

/// Calls whose random body, should it decode, would reconfigure the
/// cluster as an operator's command: they get only undecodable frames.
const NO_RANDOM: &[&str] = &[
    "CreateNamespace",
    "SetBlockdState",
    "SetReplication",
    "SetNamespaceAccess",
    "AddMember",
    "RemoveMember",
    "TransferLeader",
    "Campaign",
    "RecoveryFinish",
    "Heartbeat",
    "BlockReport",
    "AppendEntries",
    "Vote",
    "InstallSnapshot",
];

const RANDOM_BODIES: usize = 24;

fn usage() -> ! {
    eprintln!("usage: rpcgarbage [--tls-dir DIR --role ROLE] [--expect metad|blockd] [--seed N] ADDR meta|raft|block");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut role, mut expect, mut seed, mut pos) = (None, None, Role::Metad, 1u64, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--tls-dir" => dir = args.next(),
            "--role" => role = args.next().and_then(|r| Role::parse(&r)),
            "--expect" => expect = args.next().and_then(|r| Role::parse(&r)).unwrap_or_else(|| usage()),
            "--seed" => seed = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            _ => pos.push(a),
        }
    }
    let [addr, service] = pos.as_slice() else { usage() };
    let (grpc_service, methods) = match service.as_str() {
        "meta" => ("jfs.Meta", META),
        "raft" => ("jfs.Raft", RAFT),
        "block" => ("jfs.Block", BLOCK),
        _ => usage(),
    };
    if let Some(dir) = &dir {
        let cfg = jfs_common::config::Config {
            tls_enabled: true,
            tls_dir: dir.into(),
            ..Default::default()
        };
        if let Err(e) = jfs_common::tls::init_client(&cfg, role.unwrap_or_else(|| usage())) {
            println!("SETUP {e}");
            std::process::exit(1);
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ok = rt.block_on(run(addr, expect, grpc_service, methods, seed));
    std::process::exit(if ok { 0 } else { 1 });
}

async fn connect(addr: &str, expect: Role) -> Option<Channel> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    for _ in 0..20 {
        match jfs_common::tls::connect(ep.clone(), expect).await {
            Ok(ch) => return Some(ch),
            Err(e) => {
                eprintln!("connect {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    None
}

/// A gRPC frame: compressed flag, declared length, then `body`.
fn frame(compressed: bool, declared: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + body.len());
    f.push(u8::from(compressed));
    f.extend_from_slice(&declared.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A message of random fields (numbers 1..12, varint or length-delimited),
/// with values biased to the edges: 0, 1, small, huge.
fn protobuf_shaped(rng: &mut impl Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(1..8) {
        let field: u64 = rng.gen_range(1..12);
        if rng.gen_bool(0.5) {
            varint(&mut out, field << 3);
            let v = match rng.gen_range(0..5) {
                0 => 0,
                1 => 1,
                2 => rng.gen_range(0..1000),
                3 => u64::MAX - rng.gen_range(0..3),
                _ => rng.gen(),
            };
            varint(&mut out, v);
        } else {
            varint(&mut out, (field << 3) | 2);
            let n = rng.gen_range(0..64);
            varint(&mut out, n);
            out.extend((0..n).map(|_| rng.gen::<u8>()));
        }
    }
    out
}

/// Sends one request; the gRPC status it ended with, or `transport`.
async fn send(ch: &mut Channel, path: &str, body: Vec<u8>) -> String {
    let req = match http::Request::builder()
        .method("POST")
        .uri(format!("http://jfs{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
    {
        Ok(r) => r,
        Err(e) => return format!("request: {e}"),
    };
    if let Err(e) = std::future::poll_fn(|cx| ch.poll_ready(cx)).await {
        return format!("transport ({e})");
    }
    let resp = match ch.call(req).await {
        Ok(r) => r,
        Err(_) => return "transport".into(),
    };
    let header_status = resp.headers().get("grpc-status").cloned();
    let collected = match resp.into_body().collect().await {
        Ok(c) => c,
        Err(_) => return "transport".into(),
    };
    let status = header_status.or_else(|| collected.trailers().and_then(|t| t.get("grpc-status").cloned()));
    match status.and_then(|s| s.to_str().ok().and_then(|s| s.parse::<i32>().ok())) {
        Some(code) => format!("{:?}", tonic::Code::from_i32(code)),
        None => "no-status".into(),
    }
}

async fn run(addr: &str, expect: Role, service: &str, methods: &[&str], seed: u64) -> bool {
    let Some(mut ch) = connect(addr, expect).await else {
        println!("TOTAL cannot connect to {addr}");
        return false;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for (i, m) in methods.iter().enumerate() {
        let path = format!("/{service}/{m}");
        let mut bodies: Vec<Vec<u8>> = vec![
            frame(false, u32::MAX - 15, &[0u8; 16]),
            frame(true, 8, &[1u8; 8]),
            vec![0, 0, 0],
            frame(false, 100, &[7u8; 10]),
        ];
        if !NO_RANDOM.contains(m) {
            for k in 0..RANDOM_BODIES {
                // Half plain noise (the decoder's error paths), half
                // well-formed protobuf with random fields and values,
                // which often decodes and reaches the handler.
                let body: Vec<u8> = if k % 2 == 0 {
                    let n = rng.gen_range(0..600);
                    (0..n).map(|_| rng.gen()).collect()
                } else {
                    protobuf_shaped(&mut rng)
                };
                bodies.push(frame(false, body.len() as u32, &body));
            }
        }
        if i == 0 {
            // Larger than any jfs server accepts (64 MiB).
            let big = vec![0x0au8; (jfs_common::MAX_MESSAGE_BYTES + 4096).min(u32::MAX as usize)];
            bodies.push(frame(false, big.len() as u32, &big));
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for b in bodies {
            let r = send(&mut ch, &path, b).await;
            if r.starts_with("transport") {
                // The server may reset a stream or connection it will not
                // read; what matters is that it still takes new ones.
                match connect(addr, expect).await {
                    Some(c) => ch = c,
                    None => {
                        println!("{m}: server stopped answering");
                        println!("TOTAL server stopped answering after {m}");
                        return false;
                    }
                }
            }
            *seen.entry(r.clone()).or_default() += 1;
            *total.entry(r).or_default() += 1;
        }
        println!("{m}: {seen:?}");
    }
    println!("TOTAL {total:?}");
    true
}
