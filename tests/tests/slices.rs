//! The data path keeps every committed byte when several writers share a
//! file (the chunk/slice model: a flush appends slices over the ranges that
//! were written and grows the size to max(size, end), never shrinks it; only
//! truncate and punch-hole shrink or clear), and background compaction of
//! fragmented chunks changes nothing a reader can see.
//!
//! * `two_writers_keep_each_others_bytes`: a descriptor opened while the file
//!   was empty writes 10 bytes after another mount wrote 1 MiB; both survive.
//!   (Before slices, the late writer's flush rewrote the whole file from its
//!   stale view and cut it to 10 bytes.)
//! * `eight_writers_disjoint_ranges_two_mounts`: 8 descriptors on 2 mounts,
//!   all opened on the empty file, each writes its own MiB in odd-sized
//!   pieces; all 8 MiB are there afterwards, on both mounts.
//! * `random_ops_match_a_model`: thousands of seeded random pwrite / pread /
//!   ftruncate / punch-hole operations on 4 files through 2 mounts, each op
//!   open → op → close, against an in-memory model; every read, and
//!   periodically the whole content and st_size on both mounts, must match.
//!   Many small writes land in the same MiB (across a chunk edge), so chunks
//!   collect many slices and compaction runs while the test checks.
//! * `hundred_thousand_random_4k_writes`: 100,000 random 4 KiB writes to a
//!   32 MiB file through one descriptor; the content is exact on both
//!   mounts, compaction brings every chunk to at most 300 slices, and the
//!   space of replaced data is reclaimed on the blockds.
//!
//! Randomized tests print their seed; `JFS_TEST_SEED=<n>` replays one, and
//! `JFS_TEST_RANDOM_OPS=<n>` changes the number of random operations (default
//! 6,000). `JFS_TEST_NO_PUNCH_HOLE=1` replaces punch-holes by reads, only to
//! try the rest on a build without fallocate support (it prints a warning).

use jfs_tests::*;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Reads a file through a fresh open: (st_size from fstat of the new
/// descriptor, the whole content).
fn read_fresh(p: &Path) -> Result<(u64, Vec<u8>), String> {
    let mut f = File::open(p).map_err(|e| format!("open {}: {e}", p.display()))?;
    let size = f.metadata().map_err(|e| format!("fstat {}: {e}", p.display()))?.size();
    let mut v = Vec::with_capacity(size as usize);
    f.read_to_end(&mut v)
        .map_err(|e| format!("read {}: {e}", p.display()))?;
    close_checked(f).map_err(|e| format!("close {}: {e}", p.display()))?;
    Ok((size, v))
}

/// Asserts that a fresh open of `p` sees exactly `want` (st_size and bytes).
fn assert_content(c: &Cluster, p: &Path, want: &[u8], what: &str) {
    let (size, got) = read_fresh(p).unwrap_or_else(|e| panic!("{what}: {e}{}", c.log_tails()));
    assert_eq!(
        size,
        want.len() as u64,
        "{what}: st_size of {} after a fresh open is {size}, expected {}",
        p.display(),
        want.len()
    );
    if let Some(d) = describe_difference(want, &got) {
        panic!("{what}: content of {} is wrong: {d}{}", p.display(), c.log_tails());
    }
}

fn create_empty(p: &Path) {
    let f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    close_checked(f).unwrap_or_else(|e| panic!("close {} after create: {e}", p.display()));
}

#[test]
fn two_writers_keep_each_others_bytes() {
    let c = Cluster::start();
    let b = c.mount_second("");
    let (pa, pb) = (c.path("f"), b.path("f"));
    create_empty(&pa);

    // A opens the empty file and keeps the descriptor.
    let fa = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pa)
        .unwrap_or_else(|e| panic!("open f O_RDWR on A: {e}"));

    // B writes 1 MiB and closes: committed.
    let data_b = pattern(MIB as usize, 0xB);
    let fb = OpenOptions::new()
        .write(true)
        .open(&pb)
        .unwrap_or_else(|e| panic!("open f O_WRONLY on B: {e}"));
    fb.write_all_at(&data_b, 0)
        .unwrap_or_else(|e| panic!("pwrite 1 MiB at 0 on B: {e}"));
    close_checked(fb).unwrap_or_else(|e| panic!("close on B after writing 1 MiB: {e}{}", c.log_tails()));

    // A, whose descriptor was opened when the file was empty, writes 10 bytes.
    let data_a = b"AAAAAAAAAA";
    fa.write_all_at(data_a, 0)
        .unwrap_or_else(|e| panic!("pwrite 10 bytes at 0 on A: {e}"));
    close_checked(fa).unwrap_or_else(|e| panic!("close on A after writing 10 bytes: {e}{}", c.log_tails()));

    let mut want = data_b.clone();
    want[..10].copy_from_slice(data_a);
    assert_content(
        &c,
        &pa,
        &want,
        "mount A: 1 MiB written by B, then 10 bytes at 0 by A's older descriptor (want 1 MiB: A's 10 bytes, then B's)",
    );
    assert_content(
        &c,
        &pb,
        &want,
        "mount B: 1 MiB written by B, then 10 bytes at 0 by A's older descriptor (want 1 MiB: A's 10 bytes, then B's)",
    );
    b.unmount();
}

/// Piece sizes for one writer: odd sizes, none aligned to a page.
const PIECES: [usize; 9] = [1, 4095, 4097, 65537, 12345, 131071, 3, 200_003, 77];

#[test]
fn eight_writers_disjoint_ranges_two_mounts() {
    let c = Cluster::start();
    let b = c.mount_second("");
    create_empty(&c.path("f"));
    let want = Arc::new(pattern(8 * MIB as usize, 8));
    // Everyone opens the empty file before anyone writes, and everyone has
    // written before anyone closes: 8 open write sessions that all started
    // from the empty file and all overlap.
    let opened = Arc::new(Barrier::new(8));
    let written = Arc::new(Barrier::new(8));
    let mut threads = Vec::new();
    for i in 0..8u64 {
        let path: PathBuf = if i % 2 == 0 { c.path("f") } else { b.path("f") };
        let (want, opened, written) = (want.clone(), opened.clone(), written.clone());
        threads.push(thread::spawn(move || -> Result<(), String> {
            let mount = if i % 2 == 0 { "A" } else { "B" };
            let f = OpenOptions::new().write(true).open(&path);
            opened.wait();
            let f = f.map_err(|e| {
                written.wait();
                format!("writer {i} (mount {mount}): open O_WRONLY: {e}")
            })?;
            // Cut [i MiB, i+1 MiB) into odd-sized pieces.
            let (start, end) = ((i * MIB) as usize, ((i + 1) * MIB) as usize);
            let mut pieces = Vec::new();
            let mut off = start;
            let mut k = i as usize;
            while off < end {
                let len = PIECES[k % PIECES.len()].min(end - off);
                pieces.push((off, len));
                off += len;
                k += 1;
            }
            // Half the writers go backwards, so their pieces arrive out of order.
            if i % 4 >= 2 {
                pieces.reverse();
            }
            let mut res = Ok(());
            for (off, len) in pieces {
                if let Err(e) = f.write_all_at(&want[off..off + len], off as u64) {
                    res = Err(format!("writer {i} (mount {mount}): pwrite {len} bytes at {off}: {e}"));
                    break;
                }
            }
            written.wait();
            res?;
            close_checked(f).map_err(|e| format!("writer {i} (mount {mount}): close: {e}"))
        }));
    }
    let errors: Vec<String> = threads
        .into_iter()
        .filter_map(|t| match t.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("a writer thread panicked".into()),
        })
        .collect();
    assert!(
        errors.is_empty(),
        "writers failed:\n{}{}",
        errors.join("\n"),
        c.log_tails()
    );
    assert_content(&c, &c.path("f"), &want, "mount A after 8 writers wrote 1 MiB each");
    assert_content(&c, &b.path("f"), &want, "mount B after 8 writers wrote 1 MiB each");
    b.unmount();
}

// ------------------------------------------------------------------ random ops

const FILES: usize = 4;
/// Random offsets go up to here (3 chunks of the default 4 MiB).
const MAX_OFF: u64 = 12 * MIB;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, data_seed: u64, len: usize },
    Read { off: u64, len: usize },
    Truncate { size: u64 },
    Punch { off: u64, len: u64 },
}

/// Counts of each kind of op that ran, for the summary line.
#[derive(Default, Debug)]
struct Counts {
    writes: u64,
    small_writes: u64,
    reads: u64,
    truncates: u64,
    punches: u64,
    full_checks: u64,
}

fn choose_op(rng: &mut Rng, file: usize, cur: u64, hot: (u64, u64), counts: &mut Counts) -> Op {
    let (hot_start, hot_len) = hot;
    let r = rng.below(100);
    if r < 45 {
        counts.writes += 1;
        // The first file gets most of the small writes, into one MiB that
        // straddles the first chunk edge: many slices in the same chunks.
        let hot_share = if file == 0 { 75 } else { 30 };
        let (off, len) = if rng.chance(hot_share) {
            counts.small_writes += 1;
            let max = if rng.chance(30) { 64 } else { 4096 };
            (hot_start + rng.below(hot_len), rng.range(1, max))
        } else if rng.chance(80) {
            (rng.below(MAX_OFF), rng.range(1, 64 << 10))
        } else {
            (rng.below(MAX_OFF), rng.range(1, MIB))
        };
        Op::Write {
            off,
            data_seed: rng.next_u64(),
            len: len as usize,
        }
    } else if r < 70 {
        counts.reads += 1;
        let off = rng.below(cur + (64 << 10));
        let len = if rng.chance(50) {
            rng.range(1, 4096)
        } else {
            rng.range(1, MIB)
        };
        Op::Read { off, len: len as usize }
    } else if r < 82 {
        counts.truncates += 1;
        let hot_end = hot_start + hot_len;
        let size = if file == 0 && rng.chance(90) {
            // Keep the hot region of the first file mostly alive, so its
            // slices pile up instead of being cut away.
            rng.range(hot_end, MAX_OFF + MIB)
        } else {
            match rng.below(10) {
                0..=3 => rng.below(cur + 1),
                4..=7 => rng.range(cur, MAX_OFF + MIB),
                8 => {
                    let e = hot_start + hot_len / 2; // a chunk edge
                    [e - 1, e, e + 1, 2 * e][rng.below(4) as usize]
                }
                _ => {
                    if rng.chance(20) {
                        0
                    } else {
                        rng.below(MIB)
                    }
                }
            }
        };
        Op::Truncate { size }
    } else {
        counts.punches += 1;
        let (off, len) = if rng.chance(50) {
            (hot_start + rng.below(hot_len), rng.range(1, 16 << 10))
        } else {
            (rng.below(cur + MIB), rng.range(1, 2 * MIB))
        };
        Op::Punch { off, len }
    }
}

/// Applies `op` to the model; returns the expected result of a read.
fn apply_to_model(model: &mut Vec<u8>, op: &Op) -> Option<Vec<u8>> {
    match *op {
        Op::Write { off, data_seed, len } => {
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&pattern(len, data_seed));
            None
        }
        Op::Read { off, len } => {
            let cur = model.len();
            let (s, e) = ((off as usize).min(cur), (off as usize + len).min(cur));
            Some(model[s..e].to_vec())
        }
        Op::Truncate { size } => {
            model.resize(size as usize, 0);
            None
        }
        Op::Punch { off, len } => {
            let cur = model.len();
            let (s, e) = ((off as usize).min(cur), ((off + len) as usize).min(cur));
            model[s..e].fill(0);
            None
        }
    }
}

/// Runs `op` on the file at `p` as open → op → close; returns what a read read.
fn run_op(p: &Path, op: &Op) -> Result<Option<Vec<u8>>, String> {
    let rw = !matches!(op, Op::Read { .. });
    let f = OpenOptions::new()
        .read(true)
        .write(rw)
        .open(p)
        .map_err(|e| format!("open (O_{}): {e}", if rw { "RDWR" } else { "RDONLY" }))?;
    let out = match *op {
        Op::Write { off, data_seed, len } => {
            f.write_all_at(&pattern(len, data_seed), off)
                .map_err(|e| format!("pwrite: {e}"))?;
            None
        }
        Op::Read { off, len } => Some(pread_full(&f, off, len).map_err(|e| format!("pread: {e}"))?),
        Op::Truncate { size } => {
            f.set_len(size).map_err(|e| format!("ftruncate: {e}"))?;
            None
        }
        Op::Punch { off, len } => {
            fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
                .map_err(|e| format!("fallocate(PUNCH_HOLE|KEEP_SIZE): {e}"))?;
            None
        }
    };
    close_checked(f).map_err(|e| format!("close: {e}"))?;
    Ok(out)
}

#[test]
fn random_ops_match_a_model() {
    let seed = test_seed("random_ops_match_a_model");
    let nops = env_count("JFS_TEST_RANDOM_OPS", 6000);
    let no_punch = std::env::var_os("JFS_TEST_NO_PUNCH_HOLE").is_some();
    if no_punch {
        eprintln!("WARNING: JFS_TEST_NO_PUNCH_HOLE is set: punch-hole operations are skipped");
    }
    let c = Cluster::start();
    let b = c.mount_second("");
    let bs = c.namespace_info("default").block_size;
    // One MiB around the first chunk edge (or the whole first chunk if the
    // chunks are smaller than that).
    let hot_len = MIB.min(2 * bs);
    let hot = (bs - hot_len / 2, hot_len);
    let mounts: [PathBuf; 2] = [c.mnt.clone(), b.path.clone()];
    let names: Vec<String> = (0..FILES).map(|i| format!("r{i}")).collect();
    for n in &names {
        create_empty(&c.path(n));
    }
    let mut models: Vec<Vec<u8>> = vec![Vec::new(); FILES];
    let mut rng = Rng::new(seed);
    let mut counts = Counts::default();
    let start = Instant::now();
    let full_check = |models: &[Vec<u8>], at: u64, counts: &mut Counts| {
        counts.full_checks += 1;
        for (i, n) in names.iter().enumerate() {
            for (m, root) in mounts.iter().enumerate() {
                assert_content(
                    &c,
                    &root.join(n),
                    &models[i],
                    &format!(
                        "seed {seed}, after op {at}: whole-file check of {n} on mount {}",
                        ["A", "B"][m]
                    ),
                );
            }
        }
    };
    // A third of the way in blockd2 dies (kill -9); two thirds in it comes
    // back. Every op must still succeed on its first try: uploads move to
    // the live blockds, reads skip the dead one, the healer tops up copies.
    let (kill_at, revive_at) = (nops / 3, 2 * nops / 3);
    for i in 0..nops {
        if i == kill_at {
            eprintln!("random_ops_match_a_model: op {i}: kill -9 blockd2");
            c.kill9("blockd2");
        } else if i == revive_at {
            eprintln!("random_ops_match_a_model: op {i}: restarting blockd2");
            c.local_up();
        }
        // Files 1..3 share the other half of the ops.
        let file = if rng.chance(50) {
            0
        } else {
            1 + rng.below(FILES as u64 - 1) as usize
        };
        let m = rng.below(2) as usize;
        let mut op = choose_op(&mut rng, file, models[file].len() as u64, hot, &mut counts);
        if no_punch && matches!(op, Op::Punch { .. }) {
            op = Op::Read { off: 0, len: 1 };
        }
        let p = mounts[m].join(&names[file]);
        let want = apply_to_model(&mut models[file], &op);
        let got = run_op(&p, &op).unwrap_or_else(|e| {
            panic!(
                "seed {seed}, op {i}: {op:?} on {} via mount {}: {e}{}",
                names[file],
                ["A", "B"][m],
                c.log_tails()
            )
        });
        if let (Some(want), Some(got)) = (want, got) {
            if let Some(d) = describe_difference(&want, &got) {
                panic!(
                    "seed {seed}, op {i}: {op:?} on {} via mount {} (file size in the model {}) read wrong data: {d}{}",
                    names[file],
                    ["A", "B"][m],
                    models[file].len(),
                    c.log_tails()
                );
            }
        }
        if (i + 1) % 200 == 0 {
            full_check(&models, i, &mut counts);
        }
    }
    full_check(&models, nops, &mut counts);
    // Blocks written while blockd2 was down got two copies; the healer
    // gives them their third now that it is back.
    wait_until(
        "every block at 3 copies after blockd2 returned",
        Duration::from_secs(120),
        || {
            let f = c.fsck(None);
            (f.ok && f.under == 0 && f.missing == 0).then_some(()).ok_or(f.text)
        },
    );
    eprintln!(
        "random_ops_match_a_model: {nops} ops in {:.1?} ({counts:?}); final sizes {:?}; block size {bs}",
        start.elapsed(),
        models.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // For the record: how fragmented the hot file is now (not asserted here;
    // hundred_thousand_random_4k_writes asserts compaction).
    let conf = c.conf().to_string_lossy().into_owned();
    let out = c.jfs(&["--conf", &conf, "fs", "chunks", "jfs://default/r0"]);
    eprintln!("`jfs fs chunks jfs://default/r0`:\n{}", out.describe());
    b.unmount();
}

// ------------------------------------------------------------------ many small writes

/// Parses `jfs fs chunks` output: a `CHUNK SLICES` header, then
/// `<chunk index> <slice count>` per line.
fn parse_chunks(out: &str) -> Result<Vec<(u64, u64)>, String> {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or("empty output")?;
    let h: Vec<&str> = header.split_whitespace().collect();
    if h != ["CHUNK", "SLICES"] {
        return Err(format!("header is {header:?}, expected \"CHUNK SLICES\""));
    }
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [a, b] => Ok((
                    a.parse().map_err(|_| format!("bad chunk index in {l:?}"))?,
                    b.parse().map_err(|_| format!("bad slice count in {l:?}"))?,
                )),
                _ => Err(format!("line {l:?} is not `<chunk> <slices>`")),
            }
        })
        .collect()
}

#[test]
fn hundred_thousand_random_4k_writes() {
    const SIZE: u64 = 32 * MIB;
    const WRITES: u64 = 100_000;
    const MAX_SLICES: u64 = 300;
    let seed = test_seed("hundred_thousand_random_4k_writes");
    let c = Cluster::start();
    let b = c.mount_second("");
    let ns = c.namespace_info("default");
    let p = c.path("big");
    let mut model = pattern(SIZE as usize, seed);

    let t0 = Instant::now();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all_at(&model, 0)
        .unwrap_or_else(|e| panic!("write the first 32 MiB: {e}{}", c.log_tails()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync after the first 32 MiB: {e}{}", c.log_tails()));
    let mut rng = Rng::new(seed ^ 0x4B);
    let mut buf = vec![0u8; 4096];
    for i in 0..WRITES {
        let off = rng.below(SIZE / 4096) * 4096;
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        f.write_all_at(&buf, off)
            .unwrap_or_else(|e| panic!("seed {seed}: write {i} (4 KiB at {off}): {e}{}", c.log_tails()));
        model[off as usize..off as usize + 4096].copy_from_slice(&buf);
        if (i + 1) % 10_000 == 0 {
            f.sync_all()
                .unwrap_or_else(|e| panic!("seed {seed}: fsync after write {i}: {e}{}", c.log_tails()));
        }
    }
    close_checked(f).unwrap_or_else(|e| panic!("seed {seed}: close after {WRITES} writes: {e}{}", c.log_tails()));
    let written = t0.elapsed();
    assert_content(
        &c,
        &p,
        &model,
        &format!("seed {seed}: mount A after {WRITES} random 4 KiB writes"),
    );
    assert_content(
        &c,
        &b.path("big"),
        &model,
        &format!("seed {seed}: mount B after {WRITES} random 4 KiB writes"),
    );

    // Compaction: every chunk ends up with at most MAX_SLICES slices.
    let conf = c.conf().to_string_lossy().into_owned();
    let nchunks = SIZE.div_ceil(ns.block_size);
    let t1 = Instant::now();
    let chunks = wait_until(
        &format!("every chunk of the file to have at most {MAX_SLICES} slices (background compaction)"),
        Duration::from_secs(60),
        || {
            let out = c.jfs(&["--conf", &conf, "fs", "chunks", "jfs://default/big"]);
            if out.status.code() == Some(2) {
                // A usage error will not go away by waiting.
                panic!("`jfs fs chunks` is not usable:\n{}", out.describe());
            }
            if !out.success() {
                return Err(format!("`jfs fs chunks` failed:\n{}", out.describe()));
            }
            let mut rows = parse_chunks(&out.stdout).map_err(|e| format!("{e}; output:\n{}", out.stdout))?;
            rows.sort_unstable();
            let idx: Vec<u64> = rows.iter().map(|r| r.0).collect();
            if idx != (0..nchunks).collect::<Vec<_>>() {
                return Err(format!(
                    "expected chunks 0..{nchunks} (32 MiB in chunks of {}), got {idx:?}",
                    ns.block_size
                ));
            }
            let over: Vec<_> = rows.iter().filter(|r| r.1 > MAX_SLICES).collect();
            if over.is_empty() {
                Ok(rows)
            } else {
                Err(format!("chunks over {MAX_SLICES} slices (chunk, slices): {over:?}"))
            }
        },
    );
    let compacted = t1.elapsed();

    // Reclamation. Live data is SIZE bytes, stored `replication` times. What
    // may legitimately remain on top: slices that are still referenced but
    // partly shadowed by newer ones (at most MAX_SLICES per chunk of 4 KiB
    // each, i.e. up to ~30% of a 4 MiB chunk) and blocks of a compaction
    // whose old blocks are not deleted yet. 3x covers that generously, while
    // keeping every replaced block would take ~13x (32 MiB + 100,000 x 4 KiB).
    let limit = SIZE * ns.replication * 3;
    let space = wait_until(
        &format!(
            "the *.blk files under {:?} to total less than {limit} bytes (3 x {SIZE} x replication {})",
            c.blockd_dirs(),
            ns.replication
        ),
        Duration::from_secs(90),
        || {
            let (bytes, n) = c.block_file_bytes();
            if bytes < limit {
                Ok((bytes, n))
            } else {
                Err(format!("{bytes} bytes in {n} block files"))
            }
        },
    );
    // Compaction and reclamation changed nothing a reader sees.
    assert_content(&c, &p, &model, &format!("seed {seed}: mount A after compaction"));
    assert_content(
        &c,
        &b.path("big"),
        &model,
        &format!("seed {seed}: mount B after compaction"),
    );
    eprintln!(
        "hundred_thousand_random_4k_writes: writes+close {written:.1?}; chunks settled after {compacted:.1?}: {chunks:?}; \
         block files: {} bytes in {} files (limit {limit})",
        space.0, space.1
    );
    b.unmount();
}
