//! Fuzzing of the state machine's command decoder (issue 11).
//!
//! A Raft log entry reaches every node as bytes (the wire, the log on
//! disk); whatever those bytes are, decoding must fail cleanly or yield a
//! command that applies, or is refused, without a panic and without leaving
//! records that no longer decode. The inputs are the seed corpus in
//! `metad/fuzz/command/` (one bincode `Command` per file, kept in the
//! repository), byte-level mutations of it, and arbitrary bytes. proptest
//! drives it; `JFS_FUZZ_CASES` bounds the cases (CI runs the default).
//! `cargo test -p jfs-metad -- --ignored write_command_corpus` rewrites the
//! seeds after a change to `Op`.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::*;
use crate::kv::MemKv;
use crate::raft_types::{Access, TimeSet};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/command")
}

fn corpus() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(read_corpus)
}

fn read_corpus() -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("metad/fuzz/command is in the repository")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("read a seed")).collect();
    assert!(seeds.len() >= 10, "the command corpus has only {} seeds", seeds.len());
    seeds
}

fn cases() -> u32 {
    std::env::var("JFS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// A namespace with a file, a directory, a symlink and some data, so that
/// decoded commands that name small inode numbers find something to act on.
fn populated() -> MemKv {
    static KV: OnceLock<MemKv> = OnceLock::new();
    KV.get_or_init(|| {
        let mut kv = MemKv::default();
        for (i, op) in seed_ops().into_iter().enumerate() {
            apply(&mut kv, &cmd(i as u64 + 1, op));
        }
        kv
    })
    .clone()
}

fn cmd(seq: u64, op: Op) -> Command {
    Command {
        client_id: 7,
        seq,
        acked_below: 0,
        now_ns: 1_000_000 + seq as i64,
        session_ns: 30_000_000_000,
        op,
    }
}

fn apply(kv: &mut MemKv, c: &Command) {
    let mut t = Txn::new(&*kv);
    // A storage error is a clean failure; only a panic is a finding.
    if apply_command(&mut t, c).is_ok() {
        let w = t.into_writes();
        kv.apply(w);
    }
}

/// Every namespace's tree still reads: each directory lists, each entry's
/// inode decodes, each file's chunks decode.
fn check_readable(kv: &MemKv) {
    for ns in list_namespaces(kv).expect("namespace records decode") {
        namespace_access(kv, ns.id).expect("the access record decodes");
        let mut dirs = vec![ns.root_ino];
        let mut seen = 0;
        while let Some(d) = dirs.pop() {
            seen += 1;
            assert!(seen < 10_000, "directory cycle in namespace {}", ns.name);
            let list = readdir(kv, ns.id, d, b"", 10_000, true).expect("a directory lists");
            for (_, ent, _) in list.entries {
                let inode = get_inode(kv, ns.id, ent.ino).expect("a listed inode decodes");
                if inode.is_dir() {
                    dirs.push(ent.ino);
                } else if inode.attr(ent.ino).mode & libc::S_IFMT == libc::S_IFREG {
                    get_chunks(kv, ns.id, ent.ino, 0, 64).expect("a file's chunks decode");
                }
            }
        }
    }
}

fn slice(pos: u32, len: u32, block: u64) -> Slice {
    Slice {
        pos,
        len,
        block_id: block,
        block_off: 0,
    }
}

/// The seeds: one command of each kind a client or the leader proposes.
fn seed_ops() -> Vec<Op> {
    let nb = |id: u64, len: u64| NewBlock {
        block_id: id,
        len,
        replicas: vec!["bd-1".into(), "bd-2".into()],
    };
    vec![
        Op::InitCluster {
            cluster_id: "fuzz".into(),
        },
        Op::CreateNamespace {
            name: "t".into(),
            block_size: 1 << 20,
            replication: 2,
            if_not_exists: false,
        },
        Op::RegisterBlockd {
            id: "bd-1".into(),
            address: "127.0.0.1:1".into(),
            filesystem: "fs".into(),
        },
        Op::AllocateBlocks { count: 8 },
        Op::Mknod {
            ns: 1,
            parent: ROOT_INO,
            name: b"f".to_vec(),
            mode: libc::S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        },
        Op::Mknod {
            ns: 1,
            parent: ROOT_INO,
            name: b"d".to_vec(),
            mode: libc::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        },
        Op::Symlink {
            ns: 1,
            parent: ROOT_INO,
            name: b"l".to_vec(),
            target: b"f".to_vec(),
            uid: 0,
            gid: 0,
        },
        Op::CommitSlices {
            ns: 1,
            ino: 2,
            new_blocks: vec![nb(1, 4096)],
            slices: vec![(0, slice(0, 4096, 1))],
            mtime: Some(5),
        },
        Op::Link {
            ns: 1,
            ino: 2,
            new_parent: 3,
            new_name: b"hard".to_vec(),
        },
        Op::SetXattr {
            ns: 1,
            ino: 2,
            name: b"user.a".to_vec(),
            value: b"v".to_vec(),
            flags: 0,
        },
        Op::SetAttr {
            ns: 1,
            ino: 2,
            mode: Some(0o600),
            uid: None,
            gid: None,
            size: Some(100),
            atime: Some(TimeSet::Now),
            mtime: Some(TimeSet::At(9)),
            ctime: None,
        },
        Op::Fallocate {
            ns: 1,
            ino: 2,
            mode: 0,
            offset: 0,
            len: 8192,
        },
        Op::CompactChunk {
            ns: 1,
            ino: 2,
            chunk: 0,
            version: 1,
            block: nb(2, 8192),
            slices: vec![slice(0, 8192, 2)],
        },
        Op::SetLock {
            ns: 1,
            ino: 2,
            owner: 1,
            pid: 1,
            typ: LOCK_WRITE,
            start: 0,
            end: 10,
        },
        Op::Rename {
            ns: 1,
            parent: ROOT_INO,
            name: b"l".to_vec(),
            new_parent: 3,
            new_name: b"l2".to_vec(),
            flags: 0,
            keep_if_open: true,
        },
        Op::RemoveXattr {
            ns: 1,
            ino: 2,
            name: b"user.a".to_vec(),
        },
        Op::SetNamespaceAccess {
            name: "t".into(),
            principal: "alice".into(),
            access: Some(Access::ReadOnly),
        },
        Op::SetReplication {
            name: "t".into(),
            replication: 1,
        },
        Op::KeepAlive { close: false },
        Op::Unlink {
            ns: 1,
            parent: 3,
            name: b"hard".to_vec(),
            keep_if_open: true,
        },
        Op::AbandonBlocks {
            blocks: vec![nb(7, 10)],
        },
        Op::Batch {
            cmds: vec![cmd(
                100,
                Op::Mknod {
                    ns: 1,
                    parent: ROOT_INO,
                    name: b"b".to_vec(),
                    mode: libc::S_IFREG | 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    exclusive: false,
                },
            )],
        },
        Op::ExpireSessions,
        Op::Rmdir {
            ns: 1,
            parent: ROOT_INO,
            name: b"missing".to_vec(),
        },
    ]
}

#[test]
#[ignore = "rewrites the seed corpus; run by hand after changing Op"]
fn write_command_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (i, op) in seed_ops().into_iter().enumerate() {
        let name = format!(
            "{:02}-{}.bin",
            i,
            format!("{op:?}").split([' ', '{']).next().unwrap_or("op")
        );
        std::fs::write(dir.join(name), bincode::serialize(&cmd(i as u64 + 1, op)).unwrap()).unwrap();
    }
}

#[test]
fn every_seed_decodes_and_applies() {
    let mut kv = MemKv::default();
    for s in corpus() {
        let c: Command = bincode::deserialize(s).expect("a seed decodes");
        apply(&mut kv, &c);
    }
    check_readable(&kv);
    // The seeds build what the mutations act on: a file with data, a
    // directory, a symlink moved into it.
    let ns = namespace_by_name(&kv, "t").unwrap().expect("namespace t").id;
    let f = lookup(&kv, ns, ROOT_INO, b"f").expect("file f");
    assert_eq!(f.size, 8192, "f after fallocate");
    let d = lookup(&kv, ns, ROOT_INO, b"d").expect("directory d");
    lookup(&kv, ns, d.ino, b"l2").expect("the renamed symlink");
    assert_eq!(populated().0, kv.0, "populated() is the seeds applied in order");
}

#[test]
fn mutations_reach_the_state_machine() {
    // A fuzzer whose inputs never decode tests only the decoder's error
    // path: check that mutated seeds often still decode.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (any::<prop::sample::Index>(), prop::collection::vec(mutation(), 1..6));
    let mut decoded = 0;
    for _ in 0..1000 {
        let (seed, muts) = strategy.new_tree(&mut runner).unwrap().current();
        let bytes = mutate(corpus()[seed.index(corpus().len())].clone(), &muts);
        decoded += usize::from(bincode::deserialize::<Command>(&bytes).is_ok());
    }
    assert!(decoded >= 100, "only {decoded} of 1000 mutated seeds decode");
}

/// One byte-level change to a seed.
#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
    /// Overwrites eight bytes with a large little-endian number: lengths
    /// and counts that claim far more than is there.
    Huge(prop::sample::Index, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<prop::sample::Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => (any::<prop::sample::Index>(), prop_oneof![Just(u64::MAX), Just(1u64 << 40), Just(u32::MAX as u64), any::<u64>()])
            .prop_map(|(i, n)| Mutation::Huge(i, n)),
    ]
}

fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if b.is_empty() {
            break;
        }
        match m {
            Mutation::Set(i, v) => {
                let i = i.index(b.len());
                b[i] = *v;
            }
            Mutation::Insert(i, v) => {
                let i = i.index(b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let i = i.index(b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Mutation::Truncate(i) => b.truncate(i.index(b.len())),
            Mutation::Huge(i, n) => {
                let i = i.index(b.len());
                for (k, byte) in n.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = b.get_mut(i + k) {
                        *slot = *byte;
                    }
                }
            }
        }
    }
    b
}

fn decode_and_apply(kv: &mut MemKv, bytes: &[u8]) {
    if let Ok(c) = bincode::deserialize::<Command>(bytes) {
        apply(kv, &c);
        check_readable(kv);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn mutated_seeds_never_panic_or_corrupt(seed in any::<prop::sample::Index>(), muts in prop::collection::vec(mutation(), 1..6)) {
        let seeds = corpus();
        let bytes = mutate(seeds[seed.index(seeds.len())].clone(), &muts);
        let mut kv = populated();
        decode_and_apply(&mut kv, &bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut kv = populated();
        decode_and_apply(&mut kv, &bytes);
    }
}
