//! Crash and restart: `kill -9` every daemon, `jfs local up` again, and every
//! file whose close had returned is intact. Also a graceful down/up, and
//! losing the metad leader while the mount stays in use.

use jfs_tests::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Writes a set of closed files (sizes around the block edges, nested dirs,
/// a rename and an overwrite) and returns path -> sha256 from local copies.
fn write_closed_files(c: &Cluster) -> BTreeMap<String, String> {
    let sizes = [
        0u64,
        1,
        4095,
        BLOCK_SIZE - 1,
        BLOCK_SIZE + 1,
        3 * BLOCK_SIZE + 5,
        20 * MIB,
    ];
    fs::create_dir_all(c.path("dir/sub")).expect("mkdir -p on jfs");
    let mut sums = BTreeMap::new();
    for (i, size) in sizes.iter().enumerate() {
        let rel = if i % 2 == 0 {
            format!("dir/f{i}")
        } else {
            format!("dir/sub/f{i}")
        };
        let local = c.local.join(format!("f{i}"));
        write_file(&local, &pattern(*size as usize, 1000 + i as u64));
        sh(&c.local, &format!("cp {} {}", local.display(), c.path(&rel).display()));
        sums.insert(rel, sha256(&local));
    }
    // An overwritten and a renamed file: the final state must survive.
    write_file(&c.path("over"), &pattern(3 * MIB as usize, 1));
    let newer = pattern(MIB as usize + 3, 2);
    write_file(&c.path("over"), &newer);
    write_file(&c.local.join("over"), &newer);
    sums.insert("over".into(), sha256(&c.local.join("over")));
    fs::rename(c.path("dir/f0"), c.path("renamed")).expect("rename on jfs");
    let s = sums.remove("dir/f0").expect("f0 recorded");
    sums.insert("renamed".into(), s);
    sums
}

fn verify(c: &Cluster, sums: &BTreeMap<String, String>, mnt: &Path) {
    for (rel, want) in sums {
        let p = mnt.join(rel);
        let got = sha256(&p);
        assert_eq!(
            &got,
            want,
            "{} changed across the restart{}",
            p.display(),
            c.log_tails()
        );
    }
    assert!(
        !mnt.join("dir/f0").exists(),
        "a renamed-away name came back after the restart"
    );
}

fn assert_all_dead(c: &Cluster, names: &[String]) {
    for n in names {
        if let Some(pid) = c.pid(n) {
            assert!(!pid_alive(pid), "{n} (pid {pid}) still alive after kill -9");
        }
    }
}

#[test]
fn kill_9_every_server_while_mounted_then_local_up() {
    let c = Cluster::start();
    let sums = write_closed_files(&c);
    // fsync'ed but still open when the crash comes: its data must survive too.
    let synced = pattern(5 * MIB as usize, 5);
    let held = {
        use std::io::Write;
        let mut f = fs::File::create(c.path("synced")).expect("create synced");
        f.write_all(&synced).expect("write synced");
        f.sync_all().expect("fsync synced");
        f
    };
    let servers = c.server_names();
    for n in &servers {
        c.kill9(n);
    }
    assert_all_dead(&c, &servers);
    let t0 = Instant::now();
    c.local_up();
    for n in &servers {
        c.live_pid(n);
    }
    eprintln!("servers back and mount usable {:?} after local up", t0.elapsed());
    verify(&c, &sums, &c.mnt);
    assert!(
        fs::read(c.path("synced")).expect("read synced") == synced,
        "an fsync'ed file lost data in the crash"
    );
    drop(held);
    assert!(
        fs::read(c.path("synced")).expect("read synced") == synced,
        "closing after the restart changed the file"
    );
    // The restarted cluster takes new writes too.
    write_file(&c.path("after"), b"after restart");
    assert_eq!(fs::read(c.path("after")).expect("read"), b"after restart");
}

#[test]
fn kill_9_everything_including_mountd_then_local_up() {
    let c = Cluster::start();
    let sums = write_closed_files(&c);
    let servers = c.server_names();
    let mountd = c
        .mountd_pid()
        .unwrap_or_else(|| panic!("no jfs-mountd process serving {}", c.mnt.display()));
    // SAFETY: plain syscall on the mountd of this test's cluster.
    unsafe { libc::kill(mountd, libc::SIGKILL) };
    for n in &servers {
        c.kill9(n);
    }
    wait_for("jfs-mountd to die after SIGKILL", Duration::from_secs(10), || {
        !pid_alive(mountd)
    });
    assert_all_dead(&c, &servers);
    // The kernel still lists the mount, dead: `jfs local up` must notice and mount again.
    c.local_up();
    let new_mountd = c.mountd_pid().expect("a new jfs-mountd after local up");
    assert_ne!(new_mountd, mountd);
    verify(&c, &sums, &c.mnt);
    // And a second, independent mount sees the same.
    let m = c.mount_second("");
    verify(&c, &sums, &m.path);
    m.unmount();
}

#[test]
fn local_down_then_up_keeps_everything() {
    let c = Cluster::start();
    let sums = write_closed_files(&c);
    c.local_down();
    for n in c.daemon_names() {
        if let Some(pid) = c.pid(&n) {
            assert!(!pid_alive(pid), "{n} (pid {pid}) still running after `jfs local down`");
        }
    }
    c.local_up();
    verify(&c, &sums, &c.mnt);
}

#[test]
fn losing_the_metad_leader_fails_over_while_mounted() {
    let c = Cluster::start();
    write_file(&c.path("before"), b"before");
    let leader = wait_until("metastatus to name a leader", Duration::from_secs(30), || {
        c.leader_index()
            .ok_or_else(|| "no leader in `jfs metastatus` output".to_string())
    });
    let t0 = Instant::now();
    c.kill9(&format!("metad{leader}"));
    // The mount keeps working: one write, on its first try, waits for the
    // new leader rather than failing.
    fs::write(c.path("after"), b"after")
        .unwrap_or_else(|e| panic!("write after the leader died failed: {e}{}", c.log_tails()));
    eprintln!(
        "first write after killing metad{leader} succeeded {:?} later",
        t0.elapsed()
    );
    let new_leader = wait_until("metastatus to name a new leader", Duration::from_secs(30), || {
        match c.leader_index() {
            Some(i) if i != leader => Ok(i),
            other => Err(format!("leader is {other:?}")),
        }
    });
    assert_ne!(new_leader, leader);
    assert_eq!(fs::read(c.path("before")).expect("read before"), b"before");
    assert_eq!(fs::read(c.path("after")).expect("read after"), b"after");
    // Bring it back; it rejoins as a follower.
    c.local_up();
    c.live_pid(&format!("metad{leader}"));
    let status = c.jfs_ok(&["metastatus", "--detail", "--dir", &c.state.to_string_lossy()]);
    assert_eq!(
        status.lines().filter(|l| is_leader_line(l)).count(),
        1,
        "expected exactly one leader line in:\n{status}"
    );
}

/// Writes, closes with a checked close(2), and reports whether it all succeeded.
fn write_and_close(p: &Path, data: &[u8]) -> Result<(), String> {
    let mut f = fs::File::create(p).map_err(|e| format!("create: {e}"))?;
    f.write_all(data).map_err(|e| format!("write: {e}"))?;
    let fd = f.into_raw_fd();
    // SAFETY: we own fd; std's drop would ignore close's error, which is the one that counts.
    if unsafe { libc::close(fd) } != 0 {
        return Err(format!("close: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[test]
fn kill_9_every_server_during_writes_keeps_every_closed_file() {
    let c = Cluster::start();
    let closed: Arc<Mutex<Vec<(String, usize, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (closed, failed, stop, mnt) = (closed.clone(), failed.clone(), stop.clone(), c.mnt.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{i:04}");
                let size = ((i * 1_234_567) % (6 << 20)) as usize;
                match write_and_close(&mnt.join(&name), &pattern(size, i)) {
                    Ok(()) => closed.lock().expect("lock").push((name, size, i)),
                    Err(e) => failed.lock().expect("lock").push(format!("{name}: {e}")),
                }
                i += 1;
            }
        })
    };
    let count = || closed.lock().expect("lock").len();
    wait_for("the writer to close 5 files", Duration::from_secs(60), || count() >= 5);
    let servers = c.server_names();
    for n in &servers {
        c.kill9(n);
    }
    let at_crash = count();
    c.local_up();
    wait_for(
        "the writer to close 5 more files after the restart",
        Duration::from_secs(90),
        || count() >= at_crash + 5,
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    let closed = closed.lock().expect("lock").clone();
    let failed = failed.lock().expect("lock").clone();
    eprintln!(
        "{} files closed successfully, {} failed around the crash: {failed:?}",
        closed.len(),
        failed.len()
    );
    for (name, size, seed) in &closed {
        let got = fs::read(c.path(name)).unwrap_or_else(|e| panic!("{name} (closed before or after the crash): {e}"));
        assert!(
            got.len() == *size && got == pattern(*size, *seed),
            "{name} ({size} bytes) is damaged: {} bytes read",
            got.len()
        );
    }
}
