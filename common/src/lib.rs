//! Pieces every jfs process shares: the RPC schema (the contract between
//! crates), the error table, and the configuration file.

pub mod config;
pub mod error;
pub mod manpage;
pub mod names;
pub mod slices;
pub mod telemetry;
pub mod tls;

/// Generated from `proto/jfs.proto`.
pub mod rpc {
    #![allow(clippy::all)]
    tonic::include_proto!("jfs");

    /// File type bits, as in `st_mode`.
    pub const S_IFMT: u32 = libc::S_IFMT;
    pub const S_IFDIR: u32 = libc::S_IFDIR;
    pub const S_IFREG: u32 = libc::S_IFREG;
    pub const S_IFLNK: u32 = libc::S_IFLNK;

    impl Timespec {
        pub fn from_nanos(ns: i128) -> Timespec {
            Timespec {
                sec: ns.div_euclid(1_000_000_000) as i64,
                nsec: ns.rem_euclid(1_000_000_000) as u32,
            }
        }
        pub fn as_nanos(&self) -> i128 {
            self.sec as i128 * 1_000_000_000 + self.nsec as i128
        }
    }
}

pub use error::{FsError, FsResult};

/// Largest gRPC message any jfs service accepts: a block chunk plus headroom.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Requests one connection may have in flight at a server. A mount sends
/// a few dozen at most; the bound keeps one hostile connection from
/// holding unbounded memory (each stream may buffer a message).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 512;

/// How every process dials a blockd's Block service (mountd's reads and
/// writes, a blockd copying from another). `addr` is host:port.
pub fn block_endpoint(addr: &str) -> Result<tonic::transport::Endpoint, String> {
    use std::time::Duration;
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| format!("blockd address {addr:?} is not host:port: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // Big windows: a block is several MiB and loopback is fast; the
        // 64 KiB HTTP/2 default would cap a stream far below disk speed.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Block data comes back in frames of up to 1 MiB rather than
        // HTTP/2's 16 KiB: a sixty-fourth of the frames to parse and, over
        // TLS, no 9-byte frame header left over as a record of its own
        // after every full 16 KiB record. A cold sequential read took a
        // quarter less CPU per GiB across mountd and blockd (3.4 → 2.7 s).
        .max_frame_size(1u32 << 20)
        // A blockd that stops answering (SIGSTOP, a hung host) is noticed
        // by a missed ping within ~6 s while a request is open, rather than
        // at the caller's timeout. Pings are answered by blockd's network
        // threads, not its disk, so a slow fsync does not trip this.
        .http2_keep_alive_interval(Duration::from_secs(3))
        .keep_alive_timeout(Duration::from_secs(3)))
}
