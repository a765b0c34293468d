//! Measures the latency of single Meta RPCs against a running leader:
//! `cargo run --release --example rpc_latency -- 127.0.0.1:8101 [count]`.
//! Used to see where a FUSE operation's time goes (network, read index,
//! Raft commit).

use std::time::Instant;

use jfs_common::rpc::{meta_client::MetaClient, GetAttrRequest, MknodRequest, ReqHeader, RmdirRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:8101".into());
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(500);
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    let mut c = MetaClient::new(ep.connect().await?);
    let client_id = rand::random::<u64>();
    let t = Instant::now();
    for _ in 0..n {
        c.status(jfs_common::rpc::StatusRequest::default()).await?;
    }
    println!(
        "status (no read index): {:.0} us",
        t.elapsed().as_micros() as f64 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        c.get_attr(GetAttrRequest { ns: 1, ino: 1 }).await?;
    }
    println!("getattr: {:.0} us", t.elapsed().as_micros() as f64 / n as f64);
    let t = Instant::now();
    for i in 0..n {
        let hdr = Some(ReqHeader {
            client_id,
            seq: i + 1,
            acked_below: i + 1,
            session_timeout_ms: 60_000,
        });
        let name = format!("lat-{client_id:x}-{i}").into_bytes();
        c.mknod(MknodRequest {
            hdr,
            ns: 1,
            parent: 1,
            name,
            mode: libc::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        })
        .await?;
    }
    println!("mkdir: {:.0} us", t.elapsed().as_micros() as f64 / n as f64);
    let t = Instant::now();
    for i in 0..n {
        let hdr = Some(ReqHeader {
            client_id,
            seq: n + i + 1,
            acked_below: n + i + 1,
            session_timeout_ms: 60_000,
        });
        let name = format!("lat-{client_id:x}-{i}").into_bytes();
        c.rmdir(RmdirRequest {
            hdr,
            ns: 1,
            parent: 1,
            name,
        })
        .await?;
    }
    println!("rmdir: {:.0} us", t.elapsed().as_micros() as f64 / n as f64);
    Ok(())
}
