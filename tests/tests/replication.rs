//! Three copies of every block: losing one blockd loses no file and fails
//! no write. Real processes, real `kill -9`; every read goes through a
//! fresh mount so neither the kernel's page cache nor mountd's block cache
//! can answer for a blockd that is gone.

use std::fs::{self, File, OpenOptions};
use std::io::Write;

use jfs_tests::*;

const MIB: usize = 1 << 20;

/// Writes `data` to `path` and closes it, checking every call once.
fn write_checked(path: &std::path::Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    close_checked(f).unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
}

/// Bytes of block files (`*.blk`) under one blockd data directory.
fn blk_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if p.extension().is_some_and(|x| x == "blk") => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

fn assert_reads_back(m: &Mount, files: &[(String, Vec<u8>)], while_what: &str) {
    for (name, want) in files {
        let got = fs::read(m.path(name)).unwrap_or_else(|e| panic!("read {name} {while_what}: {e}"));
        if let Some(d) = describe_difference(want, &got) {
            panic!("{name} reads back wrong {while_what}: {d}");
        }
    }
}

#[test]
fn every_file_reads_back_with_any_one_blockd_down() {
    let c = Cluster::start();
    let ns = c.namespace_info("default");
    assert_eq!(
        ns.replication, 3,
        "`jfs local up` should make namespace default with 3 copies"
    );
    let mut files = Vec::new();
    for i in 0..3u64 {
        files.push((format!("big{i}"), pattern(20 * MIB + 12_345 * i as usize, i)));
    }
    for i in 0..20u64 {
        files.push((
            format!("small{i}"),
            pattern(1 + (i as usize * 7_919) % (200 << 10), 100 + i),
        ));
    }
    for (name, data) in &files {
        write_checked(&c.path(name), data);
    }
    // Each file's blocks are on all three blockds, so every one of them can
    // be the one that is down.
    let want: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    for dir in c.blockd_dirs() {
        let have = blk_bytes(&dir);
        assert!(
            have >= want,
            "{} holds {have} bytes of blocks, less than the {want} bytes written: not every block has a copy there",
            dir.display()
        );
    }
    for b in ["blockd1", "blockd2", "blockd3"] {
        c.kill9(b);
        let m = c.mount_second("");
        assert_reads_back(&m, &files, &format!("with {b} killed"));
        m.unmount();
        c.local_up();
    }
}

#[test]
fn kill_9_a_blockd_mid_write_loses_nothing() {
    let c = Cluster::start();
    let total = env_count("JFS_TEST_REPLICATION_MIB", 256) as usize * MIB;
    let kill_at = total / 4;
    let data = pattern(total, 77);
    let path = c.path("big");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut killed = false;
    for (i, piece) in data.chunks(MIB).enumerate() {
        if !killed && i * MIB >= kill_at {
            c.kill9("blockd2");
            killed = true;
        }
        // One try per call, as a user's program makes: a failure here is a
        // write jfs lost.
        f.write_all(piece)
            .unwrap_or_else(|e| panic!("write at {} MiB (blockd2 killed at {} MiB): {e}", i, kill_at / MIB));
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync after blockd2 was killed: {e}{}", c.log_tails()));
    close_checked(f).unwrap_or_else(|e| panic!("close after blockd2 was killed: {e}{}", c.log_tails()));
    // Read back through a fresh mount, blockd2 still dead.
    let m = c.mount_second("");
    let files = vec![("big".to_string(), data)];
    assert_reads_back(&m, &files, "with blockd2 dead");
    m.unmount();
    // And once it is back; the blocks written while it was dead got two
    // copies, and the healer gives them their third.
    c.local_up();
    let m = c.mount_second("");
    assert_reads_back(&m, &files, "after blockd2 restarted");
    m.unmount();
    wait_until(
        "every block at 3 copies after blockd2 returned",
        std::time::Duration::from_secs(150),
        || {
            let f = c.fsck(Some("jfs://default/big"));
            (f.ok && f.under == 0 && f.missing == 0).then_some(()).ok_or(f.text)
        },
    );
}

#[test]
fn reads_skip_corrupt_copies_while_one_good_copy_is_left() {
    let c = Cluster::start();
    // Ten blocks, so that a read whose replica order happened to put the
    // good copy first everywhere is not how this passes.
    let data = pattern(40 * MIB + 4_321, 5);
    write_checked(&c.path("victim"), &data);
    // Flip one byte in the middle of every block file on two of the three
    // blockds.
    let mut flipped = 0;
    for dir in c.blockd_dirs().iter().take(2) {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                let Ok(m) = fs::symlink_metadata(&p) else { continue };
                if m.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "blk") && m.len() > 0 {
                    use std::os::unix::fs::FileExt;
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&p)
                        .expect("open block file");
                    let mut b = [0u8; 1];
                    f.read_exact_at(&mut b, m.len() / 2).expect("read a block byte");
                    f.write_all_at(&[b[0] ^ 0x5a], m.len() / 2).expect("corrupt a byte");
                    flipped += 1;
                }
            }
        }
    }
    assert!(
        flipped >= 20,
        "expected at least 10 blocks on each of two blockds, flipped {flipped} files"
    );
    let m = c.mount_second("");
    let files = vec![("victim".to_string(), data)];
    assert_reads_back(&m, &files, "with two of its three copies corrupted");
    let log = m.log_text();
    assert!(
        log.contains("trying the next replica"),
        "the corrupt copies were read around without a word in the mountd log:\n{log}"
    );
    m.unmount();
}

#[test]
fn a_hung_blockd_costs_reads_seconds_not_the_client_timeout() {
    let c = Cluster::start();
    let mut files = Vec::new();
    for i in 0..3u64 {
        files.push((format!("f{i}"), pattern(9 * MIB + 777 * i as usize, 40 + i)));
    }
    for (name, data) in &files {
        write_checked(&c.path(name), data);
    }
    // SIGSTOP: the process holds its sockets but answers nothing, as a
    // blockd stuck on a dead disk would. Two of three, so that nearly
    // every block lists a hung copy first.
    // The reading mount starts (and checks itself with a probe file)
    // while all is well, so its first contact with the hung blockds is
    // the reads below.
    let m = c.mount_second("");
    c.signal("blockd1", libc::SIGSTOP);
    c.signal("blockd2", libc::SIGSTOP);
    let t0 = std::time::Instant::now();
    assert_reads_back(&m, &files, "with blockd1 and blockd2 stopped");
    let took = t0.elapsed();
    m.unmount();
    c.signal("blockd2", libc::SIGCONT);
    // Writing while it hangs: uploads to it fail (a missed HTTP/2 ping)
    // and are placed elsewhere; every call succeeds on its first try.
    let more = vec![("while-stopped".to_string(), pattern(13 * MIB + 5, 50))];
    let t1 = std::time::Instant::now();
    write_checked(&c.path("while-stopped"), &more[0].1);
    eprintln!(
        "read 27 MiB with blockd1 and blockd2 stopped in {took:?}; wrote 13 MiB with blockd1 stopped in {:?}",
        t1.elapsed()
    );
    let m = c.mount_second("");
    assert_reads_back(&m, &more, "written while blockd1 was stopped");
    m.unmount();
    c.signal("blockd1", libc::SIGCONT);
    // Nine blocks; the client timeout is 60 s per attempt. Failing over
    // after a few seconds, and then keeping the hung blockds last, bounds
    // the whole read far below one client timeout.
    assert!(
        took < std::time::Duration::from_secs(45),
        "reading 27 MiB with two of three blockds stopped took {took:?}"
    );
}
