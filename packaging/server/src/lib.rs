//! Empty: cargo needs a target in every package, and this one only carries
//! the jfs-server package metadata (packaging/server/Cargo.toml).
