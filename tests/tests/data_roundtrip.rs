//! File content round-trips byte-exact through the mount: the sizes around
//! page and block edges, a 100 MiB file, appends, in-place overwrites and
//! writes past EOF (the hole reads as zeros). Every check compares against
//! the same bytes on the local disk.

use jfs_tests::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const BS: u64 = BLOCK_SIZE;

/// Writes a local reference file of `size` pseudo-random bytes.
fn local_file(c: &Cluster, name: &str, size: u64, seed: u64) -> PathBuf {
    let p = c.local.join(name);
    write_file(&p, &pattern(size as usize, seed));
    p
}

#[test]
fn sizes_at_page_and_block_edges_via_cp_and_dd() {
    let c = Cluster::start();
    let sizes = [0, 1, 4095, 4096, BS - 1, BS, BS + 1, 2 * BS + 12345];
    for (i, &size) in sizes.iter().enumerate() {
        let src = local_file(&c, &format!("src-{size}"), size, i as u64);
        let (cp_dst, dd_dst) = (c.path(format!("cp-{size}")), c.path(format!("dd-{size}")));
        sh(&c.local, &format!("cp {} {}", src.display(), cp_dst.display()));
        sh(
            &c.local,
            &format!("dd if={} of={} bs=64k status=none", src.display(), dd_dst.display()),
        );
        for dst in [&cp_dst, &dd_dst] {
            let len = fs::metadata(dst)
                .unwrap_or_else(|e| panic!("stat {}: {e}", dst.display()))
                .len();
            assert_eq!(len, size, "size of {} as stat reports it", dst.display());
            assert_same_file(&src, dst);
            // Read back with an unaligned block size, through a pipe, to the local disk.
            let back = c.local.join(format!("back-{size}"));
            sh(
                &c.local,
                &format!("dd if={} bs=1000 status=none | cat > {}", dst.display(), back.display()),
            );
            assert_same_file(&src, &back);
        }
    }
}

#[test]
fn random_reads_across_block_boundaries() {
    let c = Cluster::start();
    let size = 3 * BS + 777;
    let data = pattern(size as usize, 42);
    write_file(&c.path("f"), &data);
    let f = File::open(c.path("f")).expect("open f on jfs");
    // Ranges that start/end on, just before and just after block and page edges.
    let mut ranges = vec![
        (0u64, 1u64),
        (4095, 2),
        (BS - 1, 2),
        (BS - 4096, 8192),
        (2 * BS - 1, BS + 2),
        (size - 1, 1),
    ];
    let mut x = 7u64;
    for _ in 0..50 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (x >> 16) % size;
        let len = ((x >> 40) % (BS + 1)).min(size - off).max(1);
        ranges.push((off, len));
    }
    for (off, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("pread {len} bytes at {off}: {e}"));
        if buf[..] != data[off as usize..(off + len) as usize] {
            panic!("pread of {len} bytes at offset {off} returned wrong bytes");
        }
    }
    // Reading at and past EOF returns nothing.
    let mut buf = [0u8; 16];
    assert_eq!(
        f.read_at(&mut buf, size).expect("pread at EOF"),
        0,
        "pread at EOF returned data"
    );
    assert_eq!(
        f.read_at(&mut buf, size + BS).expect("pread past EOF"),
        0,
        "pread past EOF returned data"
    );
}

#[test]
fn hundred_mib_file_via_cp_and_dd() {
    let c = Cluster::start();
    let src = local_file(&c, "big", 100 * MIB, 100);
    sh(
        &c.local,
        &format!("cp {} {}", src.display(), c.path("big-cp").display()),
    );
    assert_same_file(&src, &c.path("big-cp"));
    sh(
        &c.local,
        &format!(
            "dd if={} of={} bs=1M conv=fsync status=none",
            src.display(),
            c.path("big-dd").display()
        ),
    );
    assert_same_file(&src, &c.path("big-dd"));
    // And out again with tar-like streaming.
    let back = c.local.join("big-back");
    sh(
        &c.local,
        &format!("cat {} > {}", c.path("big-dd").display(), back.display()),
    );
    assert_same_file(&src, &back);
}

#[test]
fn cp_over_an_existing_file_truncates_it() {
    let c = Cluster::start();
    let big = local_file(&c, "big", BS + 5000, 1);
    let small = local_file(&c, "small", 3000, 2);
    let dst = c.path("f");
    sh(&c.local, &format!("cp {} {}", big.display(), dst.display()));
    assert_same_file(&big, &dst);
    sh(&c.local, &format!("cp {} {}", small.display(), dst.display()));
    assert_same_file(&small, &dst);
    sh(&c.local, &format!("cp {} {}", big.display(), dst.display()));
    assert_same_file(&big, &dst);
    sh(&c.local, &format!(": > {}", dst.display()));
    assert_eq!(
        fs::metadata(&dst).expect("stat").len(),
        0,
        "`: > f` should leave an empty file"
    );
}

#[test]
fn appends_with_shell_redirection() {
    let c = Cluster::start();
    let src = local_file(&c, "src", 2 * MIB, 3);
    let (l, m) = c.twin_dirs("w");
    // Small appends, then 1 MiB+1 appends that straddle the 4 MiB block edge.
    let script = format!(
        r#"
        : > f
        for i in $(seq 1 30); do head -c $((i * 7919 + 1000)) {src} >> f; done
        echo "a line" >> f
        for i in 1 2 3 4 5; do head -c 1048577 {src} >> f; done
        printf x >> f
        stat -c %s f
        sha256sum f
        "#,
        src = src.display()
    );
    assert_same_output(&l, &m, &script);
    assert_same_file(&l.join("f"), &m.join("f"));
}

#[test]
fn append_through_o_append_descriptors() {
    let c = Cluster::start();
    let p = c.path("log");
    let mut expected = Vec::new();
    for i in 0..20u64 {
        let chunk = pattern((i * 104729 % 300_000) as usize + 1, i);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .expect("open O_APPEND on jfs");
        // Write at offset 0 on purpose: O_APPEND must still put it at the end.
        use std::io::Write;
        (&f).write_all(&chunk).expect("append");
        drop(f);
        expected.extend_from_slice(&chunk);
    }
    let l = c.local.join("log");
    write_file(&l, &expected);
    assert_same_file(&l, &p);
}

#[test]
fn in_place_overwrite_with_dd_conv_notrunc() {
    let c = Cluster::start();
    let base = local_file(&c, "base", 9 * MIB, 4);
    let patch = local_file(&c, "patch", 2 * MIB, 5);
    let (l, m) = c.twin_dirs("w");
    let size = 9 * MIB;
    // (offset, length) pairs: first byte, across a page, across the block
    // edge, a whole MiB inside block 1, exactly up to EOF, and past EOF.
    let edits = [
        (0, 1),
        (4095, 2),
        (BS - 10, 20),
        (BS + 100, MIB),
        (2 * BS - 1, 1),
        (size - 5, 5),
        (size - 3, 10),
    ];
    let mut script = format!("cp {} f\n", base.display());
    for (off, len) in edits {
        script.push_str(&format!(
            "dd if={} of=f bs=64k iflag=count_bytes oflag=seek_bytes seek={off} count={len} conv=notrunc status=none\n",
            patch.display()
        ));
    }
    script.push_str("stat -c %s f\nsha256sum f\n");
    assert_same_output(&l, &m, &script);
    assert_same_file(&l.join("f"), &m.join("f"));
}

#[test]
fn writes_past_eof_leave_holes_that_read_as_zeros() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    let script = format!(
        r#"
        printf abc > small
        printf xyz | dd of=small oflag=seek_bytes seek=1048576 conv=notrunc status=none
        printf 'head' > span
        printf tail | dd of=span oflag=seek_bytes seek={far} conv=notrunc status=none
        truncate -s 10M grown
        printf middle | dd of=grown oflag=seek_bytes seek=5000000 conv=notrunc status=none
        stat -c '%n %s' small span grown
        sha256sum small span grown
        "#,
        far = 3 * BS + 5
    );
    assert_same_output(&l, &m, &script);
    // Check the holes directly too: every byte between the writes is zero.
    let f = File::open(m.join("span")).expect("open span");
    let mut buf = vec![0xffu8; (3 * BS + 1) as usize];
    f.read_exact_at(&mut buf, 4).expect("read the hole");
    if let Some(i) = buf.iter().position(|&b| b != 0) {
        panic!("hole byte at offset {} is {:#04x}, not zero", 4 + i, buf[i]);
    }
    // A pwrite far past EOF from a program, then the same check.
    let p = m.join("pwrite");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&p)
        .expect("create pwrite");
    f.write_all_at(b"end", 9 * MIB).expect("pwrite past EOF");
    drop(f);
    let got = fs::read(&p).expect("read back pwrite file");
    assert_eq!(got.len() as u64, 9 * MIB + 3, "size after pwrite past EOF");
    assert!(
        got[..(9 * MIB) as usize].iter().all(|&b| b == 0),
        "hole before a pwrite is not all zeros"
    );
    assert_eq!(&got[(9 * MIB) as usize..], b"end");
}
