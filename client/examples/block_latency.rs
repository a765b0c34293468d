//! Times ReadRange calls against one blockd: `block_latency ADDR BLOCK_ID N`.
//! A probe for the random-read path (what one small read costs without FUSE).
use std::time::Instant;

use jfs_common::rpc::{block_client::BlockClient, ReadBlockRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (addr, id, n): (String, u64, usize) = (args[1].clone(), args[2].parse()?, args[3].parse()?);
    let mut c = BlockClient::connect(format!("http://{addr}")).await?;
    let t0 = Instant::now();
    for i in 0..n {
        let off = (i as u64 * 65536 * 7) % (4 << 20);
        let r = c
            .read_range(ReadBlockRequest {
                block_id: id,
                offset: off,
                len: 4096,
            })
            .await?;
        assert_eq!(r.into_inner().data.len(), 4096);
    }
    let per = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("{n} ReadRange calls of 4 KiB: {per:.0} us each");
    Ok(())
}
