//! Key layout of the metadata store (DESIGN §4).
//!
//! Integers are big-endian so key order is numeric order: a directory's
//! entries, a file's blocks and a client's saved replies are each one
//! contiguous range. The first byte says which table a key belongs to.
//!
//! | key                         | value                          |
//! |-----------------------------|--------------------------------|
//! | `C` name                    | cluster-wide values            |
//! | `N` namespace name          | `NamespaceRec`                 |
//! | `S` client seq              | saved reply of one request     |
//! | `L` client                  | client's acked_below watermark |
//! | `Y` client                  | client session: expiry, timeout |
//! | `Z` expiry client           | sessions by expiry (for reaping) |
//! | `O` client ns ino           | orphan kept open by this client |
//! | `Q` client ns ino           | this client holds locks on ino |
//! | `F` ns `k` ino              | byte-range locks on ino        |
//! | `G` since block id          | block waiting for deletion     |
//! | `K` block id                | block: ns, length, replicas, refs |
//! | `B` blockd id               | blockd: address, state         |
//! | `F` ns `i` ino              | inode                          |
//! | `F` ns `d` parent name      | directory entry                |
//! | `F` ns `c` ino chunk index  | chunk: version and slices      |
//! | `F` ns `x` ino name         | xattr value                    |
//! | `F` ns `o` ino              | open-unlinked (orphan) inode   |
//! | `F` ns `m` name             | namespace counters and record  |
//! | `M` name                    | the mirror's own state (epoch, recovery) |
//!
//! The table-store mirror ships every key of the `F` tables (but locks) to
//! the namespace's table and the cluster-wide `C`, `N`, `K`, `B`, `G` keys to
//! the cluster table; sessions (`S`, `L`, `Y`, `Z`, `O`, `Q`) and locks live
//! and die with the clients of one cluster and are not shipped.

pub const CLUSTER_ID: &[u8] = b"Ccluster_id";
pub const NEXT_BLOCK: &[u8] = b"Cnext_block";
/// Block ids below this were allocated long ago: one not committed by now
/// never will be (commits of new blocks below it are refused).
pub const ORPHAN_FLOOR: &[u8] = b"Corphan_floor";
/// The latest leader clock any command was applied with: time in the
/// namespace never goes back, even under a leader whose clock is behind.
pub const LAST_NOW: &[u8] = b"Clast_now";
pub const NEXT_NS: &[u8] = b"Cnext_ns";
/// Metad node ids that have held log entries (see `Op::RecordMember`).
pub const SEEN_MEMBERS: &[u8] = b"Cseen_members";
pub const NAMESPACES: &[u8] = b"N";
pub const GARBAGE: &[u8] = b"G";
/// Block ids come from one cluster-wide counter, so the block table is
/// cluster-wide too: a block report (ids in a range) is one key range.
pub const BLOCKS: &[u8] = b"K";
pub const BLOCKDS: &[u8] = b"B";

/// The epoch under which this cluster owns its mirror tables (absent: it
/// never took them).
pub const MIRROR_EPOCH: &[u8] = b"Mepoch";
/// Recovery state (`RecoveryRec`); present from the start of a restore until
/// the cluster leaves recovery mode, and every namespace is read-only while
/// it is.
pub const RECOVERY: &[u8] = b"Mrecovery";

/// Where the mirror sends a state-machine key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirrorTarget {
    Namespace(u32),
    Cluster,
}

pub fn mirror_target(key: &[u8]) -> Option<MirrorTarget> {
    match key.first()? {
        b'F' => {
            let ns = u32::from_be_bytes(key.get(1..5)?.try_into().ok()?);
            // Locks belong to sessions, which are not shipped.
            (*key.get(5)? != b'k').then_some(MirrorTarget::Namespace(ns))
        }
        // Membership history belongs to this cluster's Raft group.
        b'C' => (key != SEEN_MEMBERS).then_some(MirrorTarget::Cluster),
        b'N' | b'K' | b'B' | b'G' => Some(MirrorTarget::Cluster),
        _ => None,
    }
}

pub fn block(block_id: u64) -> Vec<u8> {
    cat(&[BLOCKS, &block_id.to_be_bytes()])
}

pub fn blockd(id: &str) -> Vec<u8> {
    cat(&[BLOCKDS, id.as_bytes()])
}

pub fn namespace(name: &str) -> Vec<u8> {
    cat(&[b"N", name.as_bytes()])
}

pub fn session_reply(client: u64, seq: u64) -> Vec<u8> {
    cat(&[b"S", &client.to_be_bytes(), &seq.to_be_bytes()])
}

pub fn session(client: u64) -> Vec<u8> {
    cat(&[b"Y", &client.to_be_bytes()])
}

pub const SESSION_EXPIRY: &[u8] = b"Z";

pub fn session_expiry(expires_ns: i64, client: u64) -> Vec<u8> {
    // Expiry times are after the epoch, so the cast keeps their order.
    cat(&[
        SESSION_EXPIRY,
        &(expires_ns.max(0) as u64).to_be_bytes(),
        &client.to_be_bytes(),
    ])
}

pub fn orphan_owner(client: u64, ns: u32, ino: u64) -> Vec<u8> {
    cat(&[b"O", &client.to_be_bytes(), &ns.to_be_bytes(), &ino.to_be_bytes()])
}

pub fn orphan_owner_prefix(client: u64) -> Vec<u8> {
    cat(&[b"O", &client.to_be_bytes()])
}

pub fn lock_holder(client: u64, ns: u32, ino: u64) -> Vec<u8> {
    cat(&[b"Q", &client.to_be_bytes(), &ns.to_be_bytes(), &ino.to_be_bytes()])
}

pub fn lock_holder_prefix(client: u64) -> Vec<u8> {
    cat(&[b"Q", &client.to_be_bytes()])
}

pub fn session_low(client: u64) -> Vec<u8> {
    cat(&[b"L", &client.to_be_bytes()])
}

/// A block no file refers to, keyed by when it became garbage first, so a
/// scan for blocks past their grace period stops at the first young one.
pub fn garbage(since_ns: i64, block_id: u64) -> Vec<u8> {
    cat(&[
        GARBAGE,
        &(since_ns.max(0) as u64).to_be_bytes(),
        &block_id.to_be_bytes(),
    ])
}

fn ns_key(ns: u32, tag: u8, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + rest.iter().map(|r| r.len()).sum::<usize>());
    k.push(b'F');
    k.extend_from_slice(&ns.to_be_bytes());
    k.push(tag);
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

pub fn inode(ns: u32, ino: u64) -> Vec<u8> {
    ns_key(ns, b'i', &[&ino.to_be_bytes()])
}

pub fn dirent(ns: u32, parent: u64, name: &[u8]) -> Vec<u8> {
    ns_key(ns, b'd', &[&parent.to_be_bytes(), name])
}

pub fn dir_prefix(ns: u32, parent: u64) -> Vec<u8> {
    ns_key(ns, b'd', &[&parent.to_be_bytes()])
}

pub fn chunk(ns: u32, ino: u64, index: u64) -> Vec<u8> {
    ns_key(ns, b'c', &[&ino.to_be_bytes(), &index.to_be_bytes()])
}

pub fn chunk_prefix(ns: u32, ino: u64) -> Vec<u8> {
    ns_key(ns, b'c', &[&ino.to_be_bytes()])
}

pub fn xattr(ns: u32, ino: u64, name: &[u8]) -> Vec<u8> {
    ns_key(ns, b'x', &[&ino.to_be_bytes(), name])
}

pub fn xattr_prefix(ns: u32, ino: u64) -> Vec<u8> {
    ns_key(ns, b'x', &[&ino.to_be_bytes()])
}

pub fn orphan(ns: u32, ino: u64) -> Vec<u8> {
    ns_key(ns, b'o', &[&ino.to_be_bytes()])
}

pub fn locks(ns: u32, ino: u64) -> Vec<u8> {
    ns_key(ns, b'k', &[&ino.to_be_bytes()])
}

pub fn ns_meta(ns: u32, name: &str) -> Vec<u8> {
    ns_key(ns, b'm', &[name.as_bytes()])
}

/// The grants of a namespace (`ns_meta(ns, "access")`).
pub fn is_ns_access(key: &[u8]) -> bool {
    key.len() == 12 && key[0] == b'F' && key[5] == b'm' && &key[6..] == b"access"
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The u64 stored big-endian at `off` of a key (an index or block id).
pub fn be_u64_at(key: &[u8], off: usize) -> Option<u64> {
    key.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Offsets into keys built above, for decoding scans.
pub const DIRENT_NAME_OFFSET: usize = 1 + 4 + 1 + 8;
pub const CHUNK_INDEX_OFFSET: usize = 1 + 4 + 1 + 8;
pub const XATTR_NAME_OFFSET: usize = 1 + 4 + 1 + 8;
pub const GARBAGE_SINCE_OFFSET: usize = 1;
pub const GARBAGE_ID_OFFSET: usize = 9;
pub const BLOCK_ID_OFFSET: usize = 1;
pub const BLOCKD_ID_OFFSET: usize = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_keys_are_recognised_and_nothing_else() {
        assert!(is_ns_access(&ns_meta(7, "access")));
        assert!(is_ns_access(&ns_meta(u32::MAX, "access")));
        assert!(!is_ns_access(&ns_meta(7, "record")));
        assert!(!is_ns_access(&ns_meta(7, "accessx")));
        assert!(!is_ns_access(&namespace("access")));
        assert!(!is_ns_access(b""));
    }

    #[test]
    fn directory_entries_sort_by_parent_then_name() {
        let a = dirent(1, 2, b"zz");
        let b = dirent(1, 3, b"aa");
        assert!(a < b);
        assert!(dirent(1, 2, b"a") < dirent(1, 2, b"b"));
        assert!(a.starts_with(&dir_prefix(1, 2)));
        assert_eq!(&a[DIRENT_NAME_OFFSET..], b"zz");
    }

    #[test]
    fn the_mirror_ships_namespace_and_cluster_state_but_not_sessions() {
        assert_eq!(mirror_target(&inode(7, 1)), Some(MirrorTarget::Namespace(7)));
        assert_eq!(mirror_target(&dirent(7, 1, b"a")), Some(MirrorTarget::Namespace(7)));
        assert_eq!(mirror_target(&locks(7, 1)), None);
        assert_eq!(mirror_target(&block(9)), Some(MirrorTarget::Cluster));
        assert_eq!(mirror_target(&namespace("a")), Some(MirrorTarget::Cluster));
        assert_eq!(mirror_target(CLUSTER_ID), Some(MirrorTarget::Cluster));
        assert_eq!(mirror_target(SEEN_MEMBERS), None);
        assert_eq!(mirror_target(&session(3)), None);
        assert_eq!(mirror_target(&session_reply(3, 4)), None);
        assert_eq!(mirror_target(&orphan_owner(3, 7, 1)), None);
        assert_eq!(mirror_target(MIRROR_EPOCH), None);
        assert_eq!(mirror_target(RECOVERY), None);
    }

    #[test]
    fn chunk_keys_sort_numerically() {
        assert!(chunk(1, 5, 255) < chunk(1, 5, 256));
        assert_eq!(be_u64_at(&chunk(1, 5, 256), CHUNK_INDEX_OFFSET), Some(256));
    }
}
