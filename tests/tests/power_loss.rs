//! Durability against power loss, not only process death. `kill -9` keeps
//! whatever a daemon wrote in the kernel's page cache, so it cannot tell
//! whether metad fsyncs its Raft log. Here every metad keeps its data
//! directory on lossyfs (`src/bin/lossyfs.rs`), which holds every write that
//! was not fsynced in its own memory: `kill -9` of the three lossyfs
//! processes at once is a power cut of the whole metadata cluster, and the
//! data directories then hold exactly what was fsynced.
//!
//! Every operation the workload saw acknowledged (mkdir(2) returned, or a
//! file's close(2) returned) must be there after the cut. Removing the
//! fsync of the Raft log (the flusher's `flush_wal(true)` in
//! metad/src/raft_store.rs) makes the test fail.

use jfs_tests::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const LOSSYFS: &str = env!("CARGO_BIN_EXE_lossyfs");

/// One lossyfs process serving `backing` on `mnt`; killed and detached on drop.
struct Lossy {
    backing: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Lossy {
    /// Starts lossyfs and waits until `mnt` answers.
    fn mount(backing: &Path, mnt: &Path, log: &Path) -> Lossy {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let mut cmd = Command::new(LOSSYFS);
        cmd.arg(backing)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("dup the lossyfs log")))
            .stderr(Stdio::from(out))
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut l = Lossy {
            backing: backing.to_path_buf(),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
            child: Some(child),
        };
        wait_until(
            &format!("lossyfs to mount {} on {}", backing.display(), mnt.display()),
            Duration::from_secs(30),
            || {
                if let Some(Ok(Some(st))) = l.child.as_mut().map(Child::try_wait) {
                    panic!("lossyfs exited with {st} before mounting; its log:\n{}", l.log_text());
                }
                if !is_mounted(&l.mnt) {
                    return Err("not in /proc/self/mountinfo yet".to_string());
                }
                fs::read_dir(&l.mnt).map(|_| ()).map_err(|e| format!("readdir: {e}"))
            },
        );
        l
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("lossyfs is running").id() as i32
    }

    /// The power cut: SIGKILL, without waiting (the next one follows at once).
    fn cut(&self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
    }

    /// After [`Lossy::cut`]: reaps the process and detaches its dead mount.
    fn reap(&mut self) {
        let mut child = self.child.take().expect("lossyfs was running");
        child.wait().unwrap_or_else(|e| panic!("wait for lossyfs: {e}"));
        lazy_unmount(&self.mnt);
        assert!(
            !is_mounted(&self.mnt),
            "{} is still mounted after `umount -l` of its dead lossyfs",
            self.mnt.display()
        );
    }

    /// Clean unmount: `umount`, and lossyfs must exit 0 having printed nothing.
    fn unmount(mut self) {
        let out = run_cmd(Command::new("umount").arg(&self.mnt), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("umount {}: {e}", self.mnt.display()));
        assert!(
            out.success(),
            "umount {} failed:\n{}",
            self.mnt.display(),
            out.describe()
        );
        let mut child = self.child.take().expect("lossyfs is running");
        let st = wait_until(
            "lossyfs to exit after umount",
            Duration::from_secs(20),
            || match child.try_wait() {
                Ok(Some(st)) => Ok(st),
                Ok(None) => Err("still running".to_string()),
                Err(e) => Err(e.to_string()),
            },
        );
        assert!(st.success(), "lossyfs exited with {st}; log:\n{}", self.log_text());
        assert_eq!(self.log_text(), "", "lossyfs reported errors in {}", self.log.display());
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            lazy_unmount(&self.mnt);
        }
    }
}

/// The cluster and the lossyfs mounts under its metads. Fields drop in
/// order: the cluster (and its metads) goes before the filesystems under it.
struct Rig {
    c: Cluster,
    lossy: Vec<Lossy>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // After a failure: stop the metads before their filesystems go (the
        // cluster's own drop then finds nothing left to clean up).
        if !self.lossy.is_empty() {
            let mut down = Command::new(bin_dir().join("jfs"));
            down.args(["local", "down", "--dir"]).arg(&self.c.state);
            if let Err(e) = run_cmd(&mut down, Duration::from_secs(60)) {
                eprintln!("cleanup: {e}");
            }
            self.lossy.clear();
        }
    }
}

const METADS: [&str; 3] = ["metad1", "metad2", "metad3"];

impl Rig {
    /// Mounts lossyfs over STATE/<metad>.backing on STATE/<metad> for each metad.
    fn mount_all(&mut self) {
        for m in METADS {
            let (backing, mnt) = (self.c.state.join(format!("{m}.backing")), self.c.state.join(m));
            let log = self.c.state.join("logs").join(format!("lossyfs-{m}.log"));
            self.lossy.push(Lossy::mount(&backing, &mnt, &log));
        }
    }
}

/// An operation the workload saw succeed.
#[derive(Debug, Clone)]
enum Acked {
    Dir(String),
    File { name: String, len: usize, seed: u64 },
}

/// Acknowledgements after which the power is cut.
const CUT_AFTER: usize = 300;

/// What the workload threads share.
struct Workload {
    mnt: PathBuf,
    acked: Mutex<Vec<Acked>>,
    /// What the power cut does, in order: (pid, signal), lossyfs first. The
    /// thread that records acknowledgement number [`CUT_AFTER`] sends them
    /// on the spot.
    cut: Vec<(i32, i32)>,
    cut_done: AtomicBool,
    /// Stop once this many operations are acknowledged (`usize::MAX`: run
    /// until a call fails).
    stop_at: usize,
}

/// Creates directories and small files (two of one, then one of the other,
/// names starting with `prefix`) until a call fails, which a power cut of
/// the whole metadata cluster makes happen, or until `stop_at`; returns the
/// failure, if any. Each syscall is made once, and an operation counts as
/// acknowledged when it returned success (a file when its close(2) did).
fn workload(w: &Workload, prefix: &str) -> Option<String> {
    for i in 0u64.. {
        let op = if i % 3 == 2 {
            let (name, len) = (format!("{prefix}f{i:05}"), 1 + (i as usize * 7919) % 5000);
            let seed = i + ((prefix.as_bytes()[0] as u64) << 32);
            let data = pattern(len, seed);
            let r = File::create(w.mnt.join(&name))
                .and_then(|mut f| f.write_all(&data).map(|()| f))
                .and_then(close_checked);
            r.map(|()| Acked::File { name, len, seed })
        } else {
            let name = format!("{prefix}d{i:05}");
            fs::create_dir(w.mnt.join(&name)).map(|()| Acked::Dir(name))
        };
        let a = match op {
            Ok(a) => a,
            Err(e) => return Some(format!("{prefix} operation {i}: {e}")),
        };
        let mut acked = w.acked.lock().expect("acked list lock");
        acked.push(a);
        if acked.len() == CUT_AFTER {
            // The cut comes right after an acknowledgement, while the other
            // thread's operation is in flight: what was acknowledged has had
            // no time to reach the disk later.
            for &(pid, sig) in &w.cut {
                // SAFETY: plain syscall on a process this test started.
                unsafe { libc::kill(pid, sig) };
            }
            w.cut_done.store(true, Ordering::SeqCst);
        }
        if acked.len() >= w.stop_at {
            return None;
        }
    }
    unreachable!("the workload ran out of operation numbers")
}

/// Starts four workload threads and waits until one of them has cut the
/// power; returns the threads (still running or finished).
fn run_until_cut(c: &Cluster, w: &Arc<Workload>) -> Vec<thread::JoinHandle<Option<String>>> {
    // Four, so that commands arrive together and metad commits them as
    // shared log entries (`Op::Batch`): a batch must be as durable as a
    // lone entry.
    let workers: Vec<_> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|prefix| {
            let w = w.clone();
            thread::spawn(move || workload(&w, prefix))
        })
        .collect();
    wait_until(
        &format!("the workload to reach {CUT_AFTER} acknowledged operations and cut the power"),
        Duration::from_secs(180),
        || {
            let n = w.acked.lock().expect("acked list lock").len();
            if w.cut_done.load(Ordering::SeqCst) {
                Ok(())
            } else if workers.iter().any(|t| t.is_finished()) {
                panic!(
                    "a workload thread stopped after {n} operations, before the power cut{}",
                    c.log_tails()
                );
            } else {
                Err(format!("{n} operations acknowledged"))
            }
        },
    );
    workers
}

/// `kill -9` of a daemon by its pid file if it is still alive (it may have
/// died on its own once its filesystem went away); waits until it is gone.
fn kill9_if_alive(c: &Cluster, name: &str) {
    let Some(pid) = c.pid(name) else {
        panic!("no pid file for {name} in {}", c.state.display())
    };
    if pid_alive(pid) {
        // SAFETY: plain syscall on a daemon of this test's cluster.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_for(&format!("{name} (pid {pid}) to die"), Duration::from_secs(10), || {
        !pid_alive(pid)
    });
}

/// A local cluster whose metads keep their data directories on lossyfs.
fn rig_on_lossyfs() -> Rig {
    let mut rig = Rig {
        c: Cluster::start(),
        lossy: Vec::new(),
    };
    // Move each metad's data under lossyfs.
    rig.c.local_down();
    for m in METADS {
        let (dir, backing) = (rig.c.state.join(m), rig.c.state.join(format!("{m}.backing")));
        fs::rename(&dir, &backing).unwrap_or_else(|e| panic!("mv {} {}: {e}", dir.display(), backing.display()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    rig.mount_all();
    rig.c.local_up();
    rig
}

/// Every acknowledged operation in `acked` is there, through the mount.
fn assert_all_present(c: &Cluster, acked: &[Acked], after: &str) {
    let (mut dirs, mut files, mut lost) = (0, 0, Vec::new());
    for a in acked {
        match a {
            Acked::Dir(name) => {
                dirs += 1;
                match fs::metadata(c.path(name)) {
                    Ok(m) if m.is_dir() => {}
                    Ok(m) => lost.push(format!("directory {name} is now a {:?}", m.file_type())),
                    Err(e) => lost.push(format!("directory {name}: {e}")),
                }
            }
            Acked::File { name, len, seed } => {
                files += 1;
                match fs::read(c.path(name)) {
                    Ok(got) => {
                        if let Some(d) = describe_difference(&pattern(*len, *seed), &got) {
                            lost.push(format!("file {name}: {d}"));
                        }
                    }
                    Err(e) => lost.push(format!("file {name} ({len} bytes): {e}")),
                }
            }
        }
    }
    eprintln!(
        "checked {} acknowledged operations after {after} ({dirs} mkdirs, {files} files written and closed): {} lost",
        acked.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged operations did not survive {after}; the first ones:\n{}{}",
        lost.len(),
        acked.len(),
        lost.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        c.log_tails()
    );
}

#[test]
fn every_acknowledged_operation_survives_a_power_cut_of_all_metads() {
    let mut rig = rig_on_lossyfs();
    let c = &rig.c;

    // Four threads run the workload until the power cut (of all three metads
    // at once: their filesystems; what was not fsynced is gone with them).
    let w = Arc::new(Workload {
        mnt: c.mnt.clone(),
        acked: Mutex::new(Vec::new()),
        cut: rig.lossy.iter().map(|l| (l.pid(), libc::SIGKILL)).collect(),
        cut_done: AtomicBool::new(false),
        stop_at: usize::MAX,
    });
    let t0 = Instant::now();
    let workers = run_until_cut(c, &w);
    let cut_at = t0.elapsed();
    // Then the metads and the mount die too (a power cut takes the client
    // with it, so nothing is retried).
    let mountd = c
        .mountd_pid()
        .unwrap_or_else(|| panic!("no jfs-mountd serving {}", c.mnt.display()));
    // SAFETY: plain syscall on the mountd of this test's cluster.
    unsafe { libc::kill(mountd, libc::SIGKILL) };
    for m in METADS {
        kill9_if_alive(c, m);
    }
    wait_for("jfs-mountd to die after SIGKILL", Duration::from_secs(10), || {
        !pid_alive(mountd)
    });
    // Detach the dead jfs mount here: within the attribute timeout the kernel
    // still answers stat(2) of its root from its cache, and `jfs local up`
    // would take it for a live mount.
    lazy_unmount(&c.mnt);
    assert!(
        !is_mounted(&c.mnt),
        "{} still mounted after `umount -l`",
        c.mnt.display()
    );
    let ended_by: Vec<Option<String>> = workers
        .into_iter()
        .map(|t| t.join().expect("workload thread panicked"))
        .collect();
    let acked = w.acked.lock().expect("acked list lock").clone();
    eprintln!(
        "power cut {cut_at:?} into the workload, right after acknowledgement {CUT_AFTER}; {} acknowledged in \
         all; the workload threads ended with: {ended_by:?}",
        acked.len()
    );
    for l in &mut rig.lossy {
        l.reap();
        assert!(
            l.backing.join("db/CURRENT").is_file(),
            "after the power cut {} holds no RocksDB db/CURRENT file",
            l.backing.display()
        );
    }

    // Power back: fresh lossyfs processes over what was made durable.
    let first = std::mem::take(&mut rig.lossy);
    drop(first);
    rig.mount_all();
    let c = &rig.c;
    c.local_up();

    assert_all_present(c, &acked, "the power cut");
    // The cluster takes new operations after the cut.
    fs::create_dir(c.path("after-the-cut")).unwrap_or_else(|e| panic!("mkdir after the power cut: {e}"));

    rig.c.local_down();
    for l in std::mem::take(&mut rig.lossy) {
        l.unmount();
    }
}

/// The leader reports its own log appends before their fsync, so that it
/// can replicate at once (`metad/src/raft_store.rs`); it must still answer
/// nothing that is not fsynced on a majority, and no follower may apply
/// what the leader's disk could still lose. The worst case for that: the
/// third node is stopped (SIGSTOP) during the workload, so every commit is
/// the leader and one follower; at the cut the leader loses its unsynced
/// writes, that follower stops, and the third node resumes. The restarted
/// leader and the third node, which has none of the recent entries, form
/// the quorum: every acknowledged operation must be there. Then the
/// follower resumes and must serve in a quorum that needs it (it may not
/// have applied anything that was elected away).
#[test]
fn a_power_cut_of_the_leader_as_its_follower_stops_loses_nothing_acknowledged() {
    let mut rig = rig_on_lossyfs();
    let c = &rig.c;
    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index()
            .ok_or_else(|| "no leader in `jfs metastatus`".to_string())
    });
    let (lname, fname) = (format!("metad{leader}"), format!("metad{}", leader % 3 + 1));
    let third = format!("metad{}", (leader + 1) % 3 + 1);
    c.signal(&third, libc::SIGSTOP);
    let w = Arc::new(Workload {
        mnt: c.mnt.clone(),
        acked: Mutex::new(Vec::new()),
        cut: vec![
            (rig.lossy[leader - 1].pid(), libc::SIGKILL),
            (c.live_pid(&lname), libc::SIGKILL),
            (c.live_pid(&fname), libc::SIGSTOP),
            (c.live_pid(&third), libc::SIGCONT),
        ],
        cut_done: AtomicBool::new(false),
        stop_at: CUT_AFTER,
    });
    let workers = run_until_cut(c, &w);

    // Power back for the old leader, over what it made durable; its
    // follower stays stopped, so the old leader and the third node are the
    // quorum. (Calls in flight at the cut finish now, or fail if
    // that takes longer than the client timeout: they were never
    // acknowledged, so either is fine.)
    kill9_if_alive(c, &lname);
    // The dead one goes first: dropping it later would detach the new
    // mount on the same directory.
    let mut dead = rig.lossy.remove(leader - 1);
    dead.reap();
    drop(dead);
    let m = METADS[leader - 1];
    let (backing, mnt) = (c.state.join(format!("{m}.backing")), c.state.join(m));
    let log = c.state.join("logs").join(format!("lossyfs-{m}-2.log"));
    rig.lossy.insert(leader - 1, Lossy::mount(&backing, &mnt, &log));
    let c = &rig.c;
    c.local_up();
    let after_cut: Vec<String> = workers
        .into_iter()
        .filter_map(|t| t.join().expect("workload thread panicked"))
        .collect();
    eprintln!("calls in flight at the cut that failed: {after_cut:?}");
    let acked = w.acked.lock().expect("acked list lock").clone();
    assert_all_present(c, &acked, &format!("a power cut of {lname} with {fname} stopped"));

    // The follower comes back; then the third node goes, so that every
    // commit needs the follower: it must hold a log consistent with the
    // old leader's.
    c.signal(&fname, libc::SIGCONT);
    c.kill9(&third);
    for i in 0..50 {
        let d = format!("after-the-cut-{i}");
        fs::create_dir(c.path(&d)).unwrap_or_else(|e| {
            panic!(
                "mkdir {d} with {third} gone ({lname} and {fname} must serve): {e}{}",
                c.log_tails()
            )
        });
    }
    assert_all_present(c, &acked, &format!("{fname} resumed and {third} died"));
    for n in [&lname, &fname] {
        assert!(pid_alive(c.live_pid(n)), "{n} died{}", c.log_tails());
    }

    rig.c.local_down();
    for l in std::mem::take(&mut rig.lossy) {
        l.unmount();
    }
}

/// The control: lossyfs itself keeps exactly what was fsynced. Reads see
/// every write before the cut; afterwards, the backing directory has only
/// the synced bytes, while names (create, mkdir, rename, truncate) are kept.
#[test]
fn lossyfs_keeps_only_fsynced_data_across_a_cut() {
    let base = std::env::var_os("JFS_TEST_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let root = tempfile::Builder::new()
        .prefix("jfs-test-lossyfs-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("temp dir in {}: {e}", base.display()));
    let (backing, mnt) = (root.path().join("backing"), root.path().join("mnt"));
    for d in [&backing, &mnt] {
        fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    let mut l = Lossy::mount(&backing, &mnt, &root.path().join("lossyfs.log"));
    let p = |n: &str| mnt.join(n);

    // synced: 8 KiB fsynced, then 100 more bytes that are not.
    let mut f = File::create(p("synced")).expect("create synced");
    f.write_all(&pattern(8192, 1)).expect("write synced");
    f.sync_all().expect("fsync synced");
    f.write_all(&pattern(100, 2)).expect("write the unsynced tail");
    close_checked(f).expect("close synced");
    // unsynced: written and closed, never fsynced; renamed (the data follows the inode).
    fs::write(p("unsynced"), pattern(5000, 3)).expect("write unsynced");
    fs::rename(p("unsynced"), p("renamed")).expect("rename unsynced");
    // overwritten: fdatasync'ed, then its middle rewritten without a sync.
    let f = File::create(p("overwritten")).expect("create overwritten");
    f.write_all_at(&pattern(10000, 4), 0).expect("write overwritten");
    f.sync_data().expect("fdatasync overwritten");
    f.write_all_at(&[7u8; 1000], 3000).expect("rewrite the middle");
    // truncated: 4000 unsynced bytes cut to 1000, then extended by a write at 3000.
    let t = File::create(p("truncated")).expect("create truncated");
    t.write_all_at(&pattern(4000, 5), 0).expect("write truncated");
    t.set_len(1000).expect("truncate");
    t.write_all_at(b"end", 3000).expect("write past the end");
    fs::create_dir(p("dir")).expect("mkdir dir");

    // Before the cut, every write is visible through the mount.
    let mut want_truncated = pattern(1000, 5);
    want_truncated.resize(3000, 0);
    want_truncated.extend_from_slice(b"end");
    let mut want_over = pattern(10000, 4);
    want_over[3000..4000].fill(7);
    let mut want_synced = pattern(8192, 1);
    want_synced.extend_from_slice(&pattern(100, 2));
    for (name, want) in [
        ("synced", &want_synced),
        ("renamed", &pattern(5000, 3)),
        ("overwritten", &want_over),
        ("truncated", &want_truncated),
    ] {
        let got = fs::read(p(name)).unwrap_or_else(|e| panic!("read {name} through lossyfs: {e}"));
        assert!(
            describe_difference(want, &got).is_none(),
            "{name} through lossyfs before the cut: {}",
            describe_difference(want, &got).unwrap_or_default()
        );
    }

    l.cut();
    drop(f);
    drop(t);
    l.reap();
    let b = |n: &str| fs::read(backing.join(n)).unwrap_or_else(|e| panic!("read {n} in the backing dir: {e}"));
    assert_eq!(
        b("synced"),
        pattern(8192, 1),
        "synced: only the fsynced 8 KiB should remain"
    );
    assert_eq!(
        b("renamed"),
        Vec::<u8>::new(),
        "renamed: the name stays, the unsynced data goes"
    );
    assert!(!backing.join("unsynced").exists(), "the rename was lost");
    assert_eq!(
        b("overwritten"),
        pattern(10000, 4),
        "overwritten: the unsynced rewrite should be gone"
    );
    assert_eq!(
        b("truncated"),
        vec![0u8; 1000],
        "truncated: the size change stays, the data goes"
    );
    assert!(backing.join("dir").is_dir(), "the mkdir was lost");
}
