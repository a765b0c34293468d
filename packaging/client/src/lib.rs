//! Empty: cargo needs a target in every package, and this one only carries
//! the jfs-client package metadata (packaging/client/Cargo.toml).
