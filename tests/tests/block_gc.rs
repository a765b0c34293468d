//! Garbage collection of blocks waits out a grace period: a reader on
//! another mount that still holds an old block map reads the old bytes
//! instead of failing, and the space still comes back afterwards.
//! (`jfs local up` sets blockd.gc-grace-ms = 10000.)

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use jfs_tests::*;

const MIB: usize = 1 << 20;

#[test]
fn a_reader_keeps_its_bytes_while_another_mount_replaces_the_file() {
    reader_outlives_a_change_on_another_mount(|c| {
        fs::rename(c.path("replacement"), c.path("victim")).expect("rename over victim on mount A")
    });
}

#[test]
fn a_reader_keeps_its_bytes_while_another_mount_truncates_the_file() {
    reader_outlives_a_change_on_another_mount(|c| {
        let f = OpenOptions::new()
            .write(true)
            .open(c.path("victim"))
            .expect("open victim on mount A");
        f.set_len(0).expect("truncate victim on mount A");
        close_checked(f).expect("close victim on mount A");
    });
}

/// Mount B reads a file through an open descriptor while mount A frees its
/// blocks with `change`: B sees old bytes or EOF, never an error; the space
/// comes back after the grace period.
fn reader_outlives_a_change_on_another_mount(change: impl FnOnce(&Cluster)) {
    let c = Cluster::start();
    let old = pattern(24 * MIB, 1);
    {
        let mut f = File::create(c.path("victim")).expect("create victim");
        f.write_all(&old).expect("write victim");
        f.sync_all().expect("fsync victim");
        close_checked(f).expect("close victim");
    }
    fs::write(c.path("replacement"), b"new content\n").expect("write replacement");

    // Mount B opens the file (and so fetches its block map) and reads a bit.
    let b = c.mount_second("");
    let fb = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(b.path("victim"))
        .expect("open victim on mount B");
    let first = pread_full(&fb, 0, 4096).expect("first read on mount B");
    assert!(
        first[..] == old[..4096],
        "mount B read wrong bytes before anything changed"
    );

    // Mount A changes it: the old bytes' blocks become garbage at once.
    change(&c);
    let (bytes_after_rename, _) = c.block_file_bytes();

    // B goes on reading through its open descriptor for longer than the
    // heartbeats that would have deleted the blocks without a grace period.
    let mut rng = Rng::new(test_seed("gc grace reader"));
    let t0 = Instant::now();
    let mut reads = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        let off = rng.below((old.len() - 65536) as u64);
        let got = pread_full(&fb, off, 65536)
            .unwrap_or_else(|e| panic!("read at {off} on mount B, {:?} after the change: {e}", t0.elapsed()));
        assert!(
            got.is_empty() || got[..] == old[off as usize..off as usize + got.len()],
            "mount B read bytes at {off} that the file never held"
        );
        reads += 1;
    }
    drop(fb);
    b.unmount();
    assert!(reads > 10, "only {reads} reads in 4 s");

    // After the grace period the space comes back.
    wait_for(
        "the replaced file's blocks to be deleted after the grace period",
        Duration::from_secs(90),
        || c.block_file_bytes().0 + (3 * old.len() as u64) / 2 <= bytes_after_rename,
    );
}

#[test]
fn deleting_a_gib_returns_its_space_within_the_grace_period_and_a_minute() {
    let c = Cluster::start();
    let piece = pattern(MIB, 3);
    {
        let mut f = File::create(c.path("gib")).expect("create gib");
        for _ in 0..1024 {
            f.write_all(&piece).expect("write gib");
        }
        f.sync_all().expect("fsync gib");
        close_checked(f).expect("close gib");
    }
    let (before, _) = c.block_file_bytes();
    assert!(
        before >= 3 << 30,
        "three copies of 1 GiB should take 3 GiB, block files hold {before}"
    );
    fs::remove_file(c.path("gib")).expect("unlink gib");
    // The local cluster's grace period is 10 s.
    wait_for(
        "the deleted GiB's blocks gone from every blockd",
        Duration::from_secs(10 + 60),
        || c.block_file_bytes().0 < 64 << 20,
    );
}
