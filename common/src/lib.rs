//! Pieces every jfs process shares: the RPC schema (the contract between
//! crates), the error table, and the configuration file.

pub mod config;
pub mod error;
pub mod names;
pub mod slices;

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
