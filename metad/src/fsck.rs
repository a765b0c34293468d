//! `jfs fsck`: which blocks have fewer live copies than their namespace
//! asks for, or none at all.
//!
//! Runs on the leader against one consistent snapshot. Without a path it
//! walks the block table (every block of the chosen namespaces, no file
//! names); with a path it walks that subtree and names the file of each
//! problem. "Live" is what the leader's heartbeats say right now, so a
//! blockd that died a moment ago still counts until its dead interval ends.

use std::collections::{BTreeSet, HashMap};

use jfs_common::rpc;
use jfs_common::FsError;

use crate::blockd_registry::BlockdRegistry;
use crate::kv::KvRead;
use crate::namespace::{self, NsResult};
use crate::raft_types::{BlockInfo, NamespaceRec};

const DEFAULT_LIMIT: usize = 1000;
/// Chunks fetched per step of one file.
const CHUNK_STEP: usize = 10_000;

struct Tally {
    reply: rpc::FsckReply,
    limit: usize,
}

impl Tally {
    fn block(&mut self, id: u64, b: &BlockInfo, ns: &NamespaceRec, ino: u64, path: &[u8], blockds: &BlockdRegistry) {
        self.reply.blocks += 1;
        let live = b.replicas.iter().filter(|r| blockds.is_live(r)).count() as u32;
        let want = ns.replication;
        let kind = if live == 0 {
            self.reply.missing += 1;
            "missing"
        } else if live < want {
            self.reply.under_replicated += 1;
            "under-replicated"
        } else if live > want {
            self.reply.over_replicated += 1;
            "over-replicated"
        } else {
            self.reply.healthy += 1;
            return;
        };
        if self.reply.problems.len() >= self.limit {
            self.reply.truncated = true;
            return;
        }
        self.reply.problems.push(rpc::FsckProblem {
            block_id: id,
            namespace: ns.name.clone(),
            ino,
            path: path.to_vec(),
            kind: kind.into(),
            live,
            want,
        });
    }
}

pub fn check<R: KvRead + ?Sized>(kv: &R, blockds: &BlockdRegistry, r: &rpc::FsckRequest) -> NsResult<rpc::FsckReply> {
    let mut t = Tally {
        reply: rpc::FsckReply::default(),
        limit: if r.limit == 0 { DEFAULT_LIMIT } else { r.limit as usize },
    };
    let namespaces: Vec<NamespaceRec> = if r.namespace.is_empty() {
        namespace::list_namespaces(kv)?
    } else {
        vec![namespace::namespace_by_name(kv, &r.namespace)?
            .ok_or_else(|| FsError::NamespaceNotFound(r.namespace.clone()))?]
    };
    let path = r.path.strip_prefix(b"/").unwrap_or(&r.path);
    if path.is_empty() {
        let by_id: HashMap<u32, &NamespaceRec> = namespaces.iter().map(|n| (n.id, n)).collect();
        let mut after = 0;
        loop {
            let page = namespace::blocks_in_range(kv, after, u64::MAX, 10_000)?;
            for (id, b) in &page {
                if let Some(ns) = by_id.get(&b.ns) {
                    t.block(*id, b, ns, 0, b"", blockds);
                }
            }
            match page.last() {
                Some((id, _)) if page.len() == 10_000 => after = *id,
                _ => break,
            }
        }
        return Ok(t.reply);
    }
    if r.namespace.is_empty() {
        return Err(FsError::InvalidArgument("fsck of a path needs its namespace (jfs://NS/PATH)".into()).into());
    }
    let ns = &namespaces[0];
    let mut ino = ns.root_ino;
    for part in path.split(|&c| c == b'/').filter(|p| !p.is_empty()) {
        ino = namespace::lookup(kv, ns.id, ino, part)?.ino;
    }
    // Depth-first over the subtree; each file's blocks are checked once
    // even when several of its chunks share a block.
    let mut stack = vec![(ino, format!("/{}", String::from_utf8_lossy(path)).into_bytes())];
    while let Some((ino, name)) = stack.pop() {
        let attr = namespace::get_inode(kv, ns.id, ino)?.attr(ino);
        match attr.mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let mut after = Vec::new();
                loop {
                    let l = namespace::readdir(kv, ns.id, ino, &after, 10_000, false)?;
                    for (n, ent, _) in &l.entries {
                        let mut child = name.clone();
                        if !child.ends_with(b"/") {
                            child.push(b'/');
                        }
                        child.extend_from_slice(n);
                        stack.push((ent.ino, child));
                    }
                    match l.entries.last() {
                        Some((n, _, _)) if !l.eof => after = n.clone(),
                        _ => break,
                    }
                }
            }
            libc::S_IFREG => {
                t.reply.files += 1;
                let mut seen = BTreeSet::new();
                let mut first = 0u64;
                loop {
                    let (_, chunks, blocks) = namespace::get_chunks(kv, ns.id, ino, first, CHUNK_STEP)?;
                    for (id, b) in &blocks {
                        if seen.insert(*id) {
                            t.block(*id, b, ns, ino, &name, blockds);
                        }
                    }
                    match chunks.last() {
                        Some((index, _)) if chunks.len() == CHUNK_STEP => first = index + 1,
                        _ => break,
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t.reply)
}
