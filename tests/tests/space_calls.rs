//! fallocate, punch-hole and SEEK_DATA/SEEK_HOLE on jfs behave as on ext4.
//!
//! Each test runs the same calls on a file on the local disk (`c.local`,
//! which must be ext4: the test fails if it is not) and on a file in the
//! mount, and requires the same results (values or errnos), the same st_size
//! and the same bytes — while the writes are still unflushed in the open
//! descriptor, after close and reopen (the committed state), and through a
//! second mount. Data is written and punched at 4 KiB-aligned offsets, since
//! ext4 reports holes at block granularity.
//!
//! jfs implements fallocate modes 0, FALLOC_FL_KEEP_SIZE and
//! FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE; every other mode (ext4 supports
//! most of them) must fail with EOPNOTSUPP and change nothing.

use jfs_tests::*;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

const EXT4_SUPER_MAGIC: i64 = 0xEF53;
const K4: u64 = 4096;

fn assert_ext4(dir: &Path) {
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills the struct we pass.
    let r = unsafe { libc::statfs(cpath(dir).as_ptr(), &mut st) };
    assert_eq!(r, 0, "statfs {}: {}", dir.display(), io::Error::last_os_error());
    assert_eq!(
        st.f_type as i64,
        EXT4_SUPER_MAGIC,
        "{} is on a filesystem of type {:#x}, not ext4 ({EXT4_SUPER_MAGIC:#x}): these tests compare jfs with ext4; \
         point JFS_TEST_TMPDIR at a directory on ext4",
        dir.display(),
        st.f_type
    );
}

/// A call's result: its value, or the errno as text.
type Outcome = Result<i64, String>;

fn outcome(r: io::Result<i64>) -> Outcome {
    r.map_err(|e| match e.raw_os_error() {
        Some(n) => format!("errno {n} {} ({e})", errno_name(n)),
        None => e.to_string(),
    })
}

/// The same file on ext4 and on jfs, with the history of what was done to
/// both (for failure messages).
struct Twin<'a> {
    c: &'a Cluster,
    local_path: PathBuf,
    jfs_path: PathBuf,
    local: File,
    jfs: File,
    history: Vec<String>,
}

impl<'a> Twin<'a> {
    /// Creates (truncating) `name` in c.local and in the mount, O_RDWR.
    fn create(c: &'a Cluster, name: &str) -> Twin<'a> {
        let (lp, jp) = (c.local.join(name), c.path(name));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
        };
        Twin {
            c,
            local: open(&lp),
            jfs: open(&jp),
            local_path: lp,
            jfs_path: jp,
            history: Vec::new(),
        }
    }

    fn history(&self) -> String {
        format!("\nwhat was done to both files:\n  {}", self.history.join("\n  "))
    }

    /// Runs `op` on both files; both must succeed with the same value.
    fn both(&mut self, what: &str, op: impl Fn(&File) -> io::Result<i64>) -> i64 {
        self.history.push(what.to_string());
        let (l, j) = (outcome(op(&self.local)), outcome(op(&self.jfs)));
        match (&l, &j) {
            (Ok(a), Ok(b)) if a == b => *a,
            _ => panic!(
                "{what}: ext4 gave {l:?}, jfs gave {j:?} (both must succeed alike){}{}",
                self.history(),
                self.c.log_tails()
            ),
        }
    }

    fn pwrite(&mut self, off: u64, len: usize, seed: u64) {
        let data = pattern(len, seed);
        self.both(&format!("pwrite {len} bytes at {off}"), |f| {
            f.write_all_at(&data, off).map(|_| len as i64)
        });
    }

    fn falloc(&mut self, mode: i32, name: &str, off: u64, len: u64) {
        self.both(&format!("fallocate({name}, {off}, {len})"), |f| {
            fallocate(f, mode, off, len).map(|_| 0)
        });
    }

    fn ftruncate(&mut self, size: u64) {
        self.both(&format!("ftruncate {size}"), |f| f.set_len(size).map(|_| 0));
    }

    /// st_size and content of the two open files must be equal.
    fn check_state(&self, when: &str) {
        check_pair(self.c, &self.local, &self.jfs, &self.jfs_path, when, &self.history());
    }

    /// SEEK_DATA / SEEK_HOLE at every offset of `offsets` must give the same
    /// answers on both open files.
    fn check_seeks(&self, offsets: &[i64], when: &str) {
        check_seek_pair(&self.local, &self.jfs, offsets, when, &self.history());
    }

    /// Closes both descriptors (checking close), and reopens both files.
    fn close_and_reopen(&mut self) {
        let reopen = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap_or_else(|e| panic!("reopen {}: {e}", p.display()))
        };
        let (l, j) = (reopen(&self.local_path), reopen(&self.jfs_path));
        let old_l = std::mem::replace(&mut self.local, l);
        let old_j = std::mem::replace(&mut self.jfs, j);
        close_checked(old_l).unwrap_or_else(|e| panic!("close {}: {e}", self.local_path.display()));
        close_checked(old_j).unwrap_or_else(|e| {
            panic!(
                "close {}: {e}{}{}",
                self.jfs_path.display(),
                self.history(),
                self.c.log_tails()
            )
        });
        self.history.push("close; reopen".into());
    }
}

fn check_pair(c: &Cluster, local: &File, jfs: &File, jfs_path: &Path, when: &str, history: &str) {
    let ls = local.metadata().expect("fstat the local file").size();
    let js = jfs
        .metadata()
        .unwrap_or_else(|e| panic!("{when}: fstat {}: {e}{history}", jfs_path.display()))
        .size();
    assert_eq!(js, ls, "{when}: st_size on jfs is {js}, on ext4 {ls}{history}");
    let want = pread_full(local, 0, ls as usize + 1).expect("read the local file");
    let got = pread_full(jfs, 0, ls as usize + 1)
        .unwrap_or_else(|e| panic!("{when}: read {}: {e}{history}{}", jfs_path.display(), c.log_tails()));
    if let Some(d) = describe_difference(&want, &got) {
        panic!(
            "{when}: content of {} differs from ext4's: {d}{history}",
            jfs_path.display()
        );
    }
}

fn whence_name(w: i32) -> &'static str {
    if w == libc::SEEK_DATA {
        "SEEK_DATA"
    } else {
        "SEEK_HOLE"
    }
}

fn check_seek_pair(local: &File, jfs: &File, offsets: &[i64], when: &str, history: &str) {
    let mut diffs = Vec::new();
    for &off in offsets {
        for w in [libc::SEEK_DATA, libc::SEEK_HOLE] {
            let l = outcome(lseek(local, off, w));
            let j = outcome(lseek(jfs, off, w));
            if l != j {
                diffs.push(format!("lseek({off}, {}): ext4 {l:?}, jfs {j:?}", whence_name(w)));
            }
        }
    }
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(25);
        panic!(
            "{when}: {n} of {} SEEK_DATA/SEEK_HOLE answers differ from ext4's; the first {}:\n  {}{history}",
            2 * offsets.len(),
            diffs.len(),
            diffs.join("\n  ")
        );
    }
}

/// Every 4 KiB offset up to `size` + 8 KiB, the bytes around every edge in
/// `edges`, a few unaligned offsets, and -1.
fn seek_offsets(size: u64, edges: &[u64]) -> Vec<i64> {
    let mut v: Vec<i64> = (0..=(size + 2 * K4) / K4).map(|i| (i * K4) as i64).collect();
    for &e in edges.iter().chain(&[size]) {
        v.extend([e as i64 - 1, e as i64, e as i64 + 1]);
    }
    v.extend((0..size / 100_003).map(|i| (i * 100_003 + 17) as i64));
    v.push(-1);
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn fallocate_modes_match_ext4() {
    let c = Cluster::start();
    assert_ext4(&c.local);
    let bs = c.namespace_info("default").block_size;
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let mut t = Twin::create(&c, "fa");

    t.pwrite(0, 64 << 10, 1);
    t.check_state("after writing 64 KiB");
    // Mode 0 past EOF extends the file (the new range reads as zeros).
    t.falloc(0, "0", 60 << 10, MIB + 123);
    t.check_state("after fallocate mode 0 extending the file");
    // Mode 0 inside the file changes nothing visible.
    t.falloc(0, "0", K4, 2 * K4);
    t.check_state("after fallocate mode 0 inside the file");
    // KEEP_SIZE past EOF: the size stays.
    t.falloc(keep, "KEEP_SIZE", 2 * MIB, MIB);
    t.falloc(keep, "KEEP_SIZE", 0, 5 * MIB);
    t.check_state("after fallocate KEEP_SIZE past EOF");
    // Punch holes in the middle of the data: aligned, unaligned, and one
    // running past EOF. They read as zeros; the size stays.
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", 16 << 10, 12 << 10);
    t.check_state("after punching an aligned hole in the data");
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", 5000, 3000);
    t.check_state("after punching an unaligned hole in the data");
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", 60_000, 2 * MIB);
    t.check_state("after punching a hole that runs past EOF");
    // Writing after the punched range and past EOF.
    t.pwrite(2 * MIB, 4096, 2);
    t.check_state("after a write past EOF");
    // Mode 0 across a chunk edge, then a punch across the same edge.
    t.falloc(0, "0", bs - 100, 300);
    t.check_state("after fallocate mode 0 across the first chunk edge");
    t.pwrite(bs - 3 * K4, 6 * K4 as usize, 3);
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", bs - K4, 2 * K4);
    t.check_state("after punching a hole across the first chunk edge");

    // Modes jfs does not implement: EOPNOTSUPP, and nothing changes.
    let unsupported = [
        (libc::FALLOC_FL_ZERO_RANGE, "ZERO_RANGE"),
        (libc::FALLOC_FL_ZERO_RANGE | keep, "ZERO_RANGE|KEEP_SIZE"),
        (libc::FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"),
        (libc::FALLOC_FL_INSERT_RANGE, "INSERT_RANGE"),
        (libc::FALLOC_FL_PUNCH_HOLE, "PUNCH_HOLE without KEEP_SIZE"),
    ];
    for (mode, name) in unsupported {
        assert_errno(
            fallocate(&t.jfs, mode, 8 * K4, 4 * K4),
            libc::EOPNOTSUPP,
            &format!("fallocate({name}) on jfs"),
        );
        t.check_state(&format!("after a refused fallocate({name}) on jfs (ext4 not touched)"));
    }
    // The refusals did not switch fallocate off for the mount (as an ENOSYS
    // reply would: the kernel then answers EOPNOTSUPP to every later call).
    t.falloc(0, "0", bs + 8 * K4, 2 * K4);
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", 8 * K4, 4 * K4);
    t.check_state("after supported fallocate calls following the refused ones");
    // fallocate needs a descriptor open for writing, on both.
    let ro_l = File::open(&t.local_path).expect("open the local file O_RDONLY");
    let ro_j = File::open(&t.jfs_path).unwrap_or_else(|e| panic!("open jfs file O_RDONLY: {e}"));
    assert_eq!(
        outcome(fallocate(&ro_j, 0, 0, K4).map(|_| 0)),
        outcome(fallocate(&ro_l, 0, 0, K4).map(|_| 0)),
        "fallocate on an O_RDONLY descriptor: jfs (left) and ext4 (right) disagree"
    );
    close_checked(ro_j).unwrap_or_else(|e| panic!("close jfs O_RDONLY: {e}"));

    t.close_and_reopen();
    t.check_state("after close and reopen (committed state)");
    // A second mount sees the committed state too.
    let b = c.mount_second("");
    let jb = File::open(b.path("fa")).unwrap_or_else(|e| panic!("open fa on the second mount: {e}"));
    check_pair(
        &c,
        &t.local,
        &jb,
        &b.path("fa"),
        "on a second mount after close",
        &t.history(),
    );
    close_checked(jb).unwrap_or_else(|e| panic!("close fa on the second mount: {e}"));
    drop(t);
    b.unmount();
}

#[test]
fn seek_data_and_seek_hole_match_ext4() {
    let c = Cluster::start();
    assert_ext4(&c.local);
    let bs = c.namespace_info("default").block_size;
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let mut t = Twin::create(&c, "sparse");
    // Data at a few aligned places with holes between; one extent across
    // the first chunk edge; a punched hole inside a written extent; a hole
    // at the end made by ftruncate.
    let writes = [
        (0, 4 * K4),
        (64 << 10, 2 * K4),
        (MIB, K4),
        (2 * MIB, 16 * K4),
        (bs - K4, 3 * K4),
        (bs + 2 * MIB + 2 * K4, K4),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        t.pwrite(off, len as usize, 10 + i as u64);
    }
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", 2 * MIB + 4 * K4, 8 * K4);
    let size = bs + 5 * MIB;
    t.ftruncate(size);
    let mut edges: Vec<u64> = writes.iter().flat_map(|&(o, l)| [o, o + l]).collect();
    edges.extend([2 * MIB + 4 * K4, 2 * MIB + 12 * K4, bs]);
    let offsets = seek_offsets(size, &edges);

    t.check_seeks(&offsets, "before close (writes still in the open descriptor)");
    t.check_state("before close");
    t.close_and_reopen();
    t.check_seeks(&offsets, "after close and reopen (committed state)");
    t.check_state("after close and reopen");

    // More data into holes and a punch through data, in the reopened
    // descriptors, then the same checks again.
    t.pwrite(128 << 10, 2 * K4 as usize, 20);
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", 0, 2 * K4);
    t.falloc(punch, "PUNCH_HOLE|KEEP_SIZE", bs - K4, 2 * K4);
    edges.extend([128 << 10, (128 << 10) + 2 * K4, 2 * K4, bs + K4]);
    let offsets = seek_offsets(size, &edges);
    t.check_seeks(&offsets, "after more writes and punches in the reopened descriptor");
    t.check_state("after more writes and punches");
    t.close_and_reopen();
    t.check_seeks(&offsets, "after the second close and reopen");
    t.check_state("after the second close and reopen");

    // A second mount answers the same.
    let b = c.mount_second("");
    let jb = File::open(b.path("sparse")).unwrap_or_else(|e| panic!("open sparse on the second mount: {e}"));
    check_seek_pair(&t.local, &jb, &offsets, "on a second mount", &t.history());
    check_pair(&c, &t.local, &jb, &b.path("sparse"), "on a second mount", &t.history());
    close_checked(jb).unwrap_or_else(|e| panic!("close sparse on the second mount: {e}"));
    drop(t);
    b.unmount();
}

#[test]
fn seek_on_empty_all_hole_and_all_data_files_matches_ext4() {
    let c = Cluster::start();
    assert_ext4(&c.local);
    let offsets: Vec<i64> = vec![
        -1,
        0,
        1,
        4095,
        4096,
        4097,
        65536,
        (MIB - 1) as i64,
        MIB as i64,
        MIB as i64 + 1,
    ];

    // Empty: everything is ENXIO.
    let mut t = Twin::create(&c, "empty");
    t.check_seeks(&offsets, "empty file, open");
    t.close_and_reopen();
    t.check_seeks(&offsets, "empty file, reopened");

    // Only a hole (ftruncate): no data anywhere, a hole at 0.
    let mut t = Twin::create(&c, "hole");
    t.ftruncate(MIB);
    t.check_seeks(&offsets, "1 MiB file that is all hole, open");
    t.close_and_reopen();
    t.check_seeks(&offsets, "1 MiB file that is all hole, reopened");
    t.check_state("1 MiB file that is all hole");

    // Only data: the one hole is the implicit one at EOF.
    let mut t = Twin::create(&c, "data");
    t.pwrite(0, MIB as usize, 30);
    t.check_seeks(&offsets, "1 MiB of data, open");
    t.close_and_reopen();
    t.check_seeks(&offsets, "1 MiB of data, reopened");

    // Data that ends at EOF after a leading hole, then punched whole.
    let mut t = Twin::create(&c, "tail");
    t.pwrite(MIB - 2 * K4, 2 * K4 as usize, 31);
    t.check_seeks(&offsets, "data only in the last 8 KiB, open");
    t.close_and_reopen();
    t.check_seeks(&offsets, "data only in the last 8 KiB, reopened");
    t.falloc(
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        "PUNCH_HOLE|KEEP_SIZE",
        0,
        MIB,
    );
    t.check_seeks(&offsets, "everything punched, open");
    t.check_state("everything punched");
    t.close_and_reopen();
    t.check_seeks(&offsets, "everything punched, reopened");
    t.check_state("everything punched, reopened");
}

fn statvfs_total(path: &std::path::Path) -> u64 {
    let c = cpath(path);
    // SAFETY: statvfs writes only into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }).unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    st.f_blocks as u64 * st.f_frsize as u64
}

#[test]
fn df_counts_blockds_on_one_disk_once() {
    let c = Cluster::start();
    let ns = c.namespace_info("default");
    // All three blockds of `jfs local up` share the disk under the state dir.
    let disk = statvfs_total(&c.state);
    let shown = statvfs_total(&c.mnt);
    let want = disk / ns.replication;
    assert!(
        shown <= want + want / 100 && shown >= want - want / 10,
        "df on the mount shows {shown} bytes; the blockds share one disk of {disk} bytes and keep {} copies, so about {want} is right",
        ns.replication
    );
}
