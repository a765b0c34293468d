//! A tree of 1,000 files in nested directories goes in with `cp -a` and out
//! with `tar`; both copies compare equal with `diff -r`, and modes, owners,
//! mtimes (to the nanosecond), symlinks and hard links survive
//! (`rsync -aH --dry-run --itemize-changes` finds nothing to do).

use jfs_tests::*;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

const MODES: [u32; 5] = [0o644, 0o600, 0o755, 0o640, 0o444];
const OWNERS: [(u32, u32); 4] = [(0, 0), (1000, 1000), (65534, 65534), (1234, 5678)];
const DIR_MODES: [u32; 3] = [0o750, 0o755, 0o700];

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    let c = cpath(p);
    // SAFETY: valid C string and timespec array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// Builds `dirs_a` x `dirs_b` x `files` files with varied sizes, modes,
/// owners and mtimes, plus symlinks, hard links and awkward names.
fn build_tree(root: &Path, dirs_a: usize, dirs_b: usize, files: usize) -> usize {
    fs::create_dir(root).expect("mkdir tree root");
    let mut count = 0;
    for a in 0..dirs_a {
        for b in 0..dirs_b {
            let dir = root.join(format!("d{a}")).join(format!("s{b}"));
            fs::create_dir_all(&dir).expect("mkdir -p");
            for f in 0..files {
                let idx = (a * dirs_b + b) * files + f;
                let size = match idx {
                    i if i % 13 == 0 => 0,
                    i if i % 97 == 0 => 300_000 + i,
                    i => (i * 7919) % 20_000,
                };
                let p = dir.join(format!("f{f}"));
                write_file(&p, &pattern(size, idx as u64));
                fs::set_permissions(&p, fs::Permissions::from_mode(MODES[idx % MODES.len()])).expect("chmod");
                let (u, g) = OWNERS[idx % OWNERS.len()];
                lchown(&p, u, g);
                set_mtime(
                    &p,
                    1_500_000_000 + idx as i64 * 37,
                    (idx as i64 * 1_000_003) % 1_000_000_000,
                );
                count += 1;
            }
        }
        let d = root.join(format!("d{a}"));
        // Hard links: one inode with three names, two of them in another directory.
        fs::hard_link(d.join("s0/f0"), d.join("hl0")).expect("link");
        fs::hard_link(d.join("s0/f0"), d.join("s0/hl0b")).expect("link");
        symlink("s0/f1", d.join("rel")).expect("symlink");
        symlink("/nonexistent/jfs-test/target", d.join("dangling")).expect("symlink");
        symlink("s1", d.join("dirlink")).expect("symlink");
        lchown(&d.join("rel"), 1000, 1000);
        // Explicit times far from "now": rsync skips setting a symlink's time
        // when it falls in the same second as the copy's creation.
        for (k, l) in ["rel", "dangling", "dirlink"].iter().enumerate() {
            set_mtime(&d.join(l), 1_400_000_000 + (a * 3 + k) as i64, 123_456_789);
        }
    }
    let odd = root.join("names");
    fs::create_dir(&odd).expect("mkdir");
    write_file(&odd.join("with spaces and é ü.txt"), b"spaces");
    write_file(&odd.join("x".repeat(255)), b"long name");
    write_file(&odd.join("-starts-with-dash"), b"dash");
    write_file(&odd.join(".hidden"), b"hidden");
    // Directory modes, owners and mtimes last (writing into a dir changes its mtime).
    for a in 0..dirs_a {
        for b in 0..dirs_b {
            let dir = root.join(format!("d{a}/s{b}"));
            fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODES[b % 3])).expect("chmod dir");
            lchown(&dir, OWNERS[b % 4].0, OWNERS[b % 4].1);
            set_mtime(&dir, 1_300_000_000 + (a * 10 + b) as i64, 999_999_999);
        }
        set_mtime(&root.join(format!("d{a}")), 1_200_000_000 + a as i64, 1);
    }
    set_mtime(&odd, 1_100_000_000, 0);
    set_mtime(root, 1_000_000_000, 500);
    count
}

/// The checks every copy of the tree must pass.
fn assert_copy_equal(work: &Path, src: &Path, copy: &Path) {
    let diff = sh_result(
        work,
        &format!("diff -r --no-dereference {} {}", src.display(), copy.display()),
        CMD_TIMEOUT,
    );
    assert!(
        diff.success(),
        "diff -r found differences between {} and {}:\n{}",
        src.display(),
        copy.display(),
        diff.describe()
    );
    let rsync = sh(
        work,
        &format!(
            "rsync -aHn --numeric-ids --itemize-changes {}/ {}/",
            src.display(),
            copy.display()
        ),
    );
    assert!(
        rsync.trim().is_empty(),
        "rsync -aH --dry-run --itemize-changes {}/ {}/ wants to change:\n{rsync}",
        src.display(),
        copy.display()
    );
    assert_same_tree(src, copy);
}

#[test]
fn thousand_files_in_with_cp_a_and_out_with_tar() {
    let c = Cluster::start();
    let src = c.local.join("src");
    assert_eq!(build_tree(&src, 10, 10, 10), 1000);

    sh(
        &c.local,
        &format!("cp -a {} {}", src.display(), c.path("tree").display()),
    );
    assert_copy_equal(&c.local, &src, &c.path("tree"));
    let count = |dir: &Path| sh(dir, "find . -type f | wc -l").trim().to_string();
    assert_eq!(
        count(&c.path("tree")),
        count(&src),
        "find -type f counts differ between jfs and the local source"
    );

    let out = c.local.join("out");
    fs::create_dir(&out).expect("mkdir out");
    sh(
        &c.local,
        &format!(
            "tar -C {} --numeric-owner --format=posix -cf - tree | tar -C {} --numeric-owner -xpf -",
            c.mnt.display(),
            out.display()
        ),
    );
    assert_copy_equal(&c.local, &src, &out.join("tree"));
}

#[test]
fn rsync_into_the_mount_then_nothing_to_do() {
    let c = Cluster::start();
    let src = c.local.join("src");
    build_tree(&src, 2, 5, 20);
    // rsync writes temporary files and renames them over the final names.
    sh(
        &c.local,
        &format!(
            "rsync -aH --numeric-ids {}/ {}/",
            src.display(),
            c.path("copy").display()
        ),
    );
    assert_copy_equal(&c.local, &src, &c.path("copy"));
    // Modify the source, sync again: only the changes travel, result equal.
    write_file(&src.join("d0/s0/f3"), b"changed");
    fs::remove_file(src.join("d1/s2/f4")).expect("rm");
    // rsync compares times to the second: keep the changed dirs' times clear of "now".
    set_mtime(&src.join("d0/s0"), 1_350_000_000, 1);
    set_mtime(&src.join("d1/s2"), 1_350_000_001, 2);
    sh(
        &c.local,
        &format!(
            "rsync -aH --delete --numeric-ids {}/ {}/",
            src.display(),
            c.path("copy").display()
        ),
    );
    assert_copy_equal(&c.local, &src, &c.path("copy"));
}

/// The same checks between two local directories: if this fails, the checks
/// (or the local tools), not jfs, are wrong.
#[test]
fn control_the_checks_pass_between_local_directories() {
    let root = tempfile::Builder::new()
        .prefix("jfs-test-control-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let src = root.path().join("src");
    build_tree(&src, 2, 3, 10);
    sh(root.path(), "cp -a src copy && mkdir out && tar -C . --numeric-owner --format=posix -cf - copy | tar -C out --numeric-owner -xpf -");
    assert_copy_equal(root.path(), &src, &root.path().join("copy"));
    assert_copy_equal(root.path(), &src, &root.path().join("out/copy"));
}
