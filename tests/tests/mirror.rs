//! The table-store mirror and recovery mode, end to end: a real Dynoxide
//! server on loopback, real metad/blockd/mountd processes, real mounts.
//!
//! Losing the metadata cluster is done for real: every metad is stopped (or
//! killed) and its data directory deleted (`jfs local down
//! --drop-metadata`); a new cluster restores from the tables alone.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use jfs_tests::*;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Sets `key = value` in the cluster's jfs.toml (replacing the key's line).
fn set_setting(c: &Cluster, key: &str, value: &str) {
    let conf = c.conf();
    let text = fs::read_to_string(&conf).expect("read jfs.toml");
    let mut out: String = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with(key) && t[key.len()..].trim_start().starts_with('='))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("{key} = {value}\n"));
    fs::write(&conf, out).expect("write jfs.toml");
}

/// `find | sha256sum` of every file under the mount, sorted by path.
fn content_sums(c: &Cluster) -> String {
    c.sh("find . -type f -print0 | sort -z | xargs -0 -r sha256sum")
}

fn verify(c: &Cluster) -> String {
    let conf = s(&c.conf());
    let out = c.jfs(&["--conf", &conf, "admin", "mirror", "verify"]);
    assert!(
        out.success(),
        "the mirror tables differ from the namespace:\n{}{}",
        out.describe(),
        c.log_tails()
    );
    out.stdout
}

/// The detail line of the leader in `metastatus --detail`.
fn leader_row(detail: &str) -> String {
    detail
        .lines()
        .find(|l| is_leader_line(l))
        .unwrap_or_else(|| panic!("no leader row in:\n{detail}"))
        .to_string()
}

#[test]
fn seed_procedure_restores_every_file_after_losing_the_metadata_cluster() {
    let c = Cluster::start_with_mirror();
    let conf = s(&c.conf());
    // 250 directories, 5,000 files with content of varied sizes: small
    // enough to write within the command deadline beside another mirror
    // test on a slow 2-core machine (20,000 files once took over 300 s
    // there); the 50,000-inode test below covers size.
    let t0 = Instant::now();
    c.sh(r#"python3 - <<'EOF'
import os
from concurrent.futures import ThreadPoolExecutor
def fill(d):
    os.mkdir(f"d{d}")
    for f in range(20):
        n = (d * 7919 + f * 104729) % 9000
        with open(f"d{d}/f{f}", "wb") as fh:
            fh.write((f"{d}/{f}:" * (n // 8 + 1)).encode()[:n])
# Four writers, as a copy tool would use; each call raises on failure.
with ThreadPoolExecutor(4) as pool:
    list(pool.map(fill, range(250)))
os.symlink("d0/f0", "link")
EOF"#);
    eprintln!("created 250 dirs and 5,000 files in {:.1}s", t0.elapsed().as_secs_f64());
    let listing = tree_listing(&c.mnt);
    let sums = content_sums(&c);
    let t1 = Instant::now();
    c.wait_synced(Duration::from_secs(300));
    eprintln!("_synced=1 {:.1}s after the last write", t1.elapsed().as_secs_f64());
    let count = c.jfs_ok(&["--conf", &conf, "fs", "count", "jfs://default/"]);
    assert!(
        // 250 directories and the root; 5,000 files and the symlink.
        count.contains(" 251 ") && count.contains(" 5001 "),
        "unexpected count: {count}"
    );
    verify(&c);

    // The whole metadata cluster is lost.
    c.drop_metadata();
    for i in 1..=3 {
        assert!(
            !c.state.join(format!("metad{i}")).exists(),
            "metad{i} data survived the drop"
        );
    }
    let t2 = Instant::now();
    c.local_up_recovery();
    eprintln!("recovery to FINISH and mount: {:.1}s", t2.elapsed().as_secs_f64());
    let detail = c.metastatus_detail();
    assert!(detail.contains("FINISH"), "no FINISH in metastatus --detail:\n{detail}");
    let waited = c.jfs_ok(&["--conf", &conf, "admin", "recovery", "wait", "--timeout", "60"]);
    assert!(
        waited.contains("FINISH: ") && waited.contains("rows restored"),
        "`jfs admin recovery wait` after FINISH said:\n{waited}"
    );

    assert_eq!(c.jfs_ok(&["--conf", &conf, "fs", "count", "jfs://default/"]), count);
    assert_eq!(tree_listing(&c.mnt), listing, "ls -lR differs after recovery");
    assert_eq!(content_sums(&c), sums, "file contents differ after recovery");

    // Read-only: EROFS at the mount, 25021 from the CLI; reads work.
    assert_errno(fs::remove_file(c.path("d3/f4")), libc::EROFS, "rm in recovery mode");
    assert_errno(fs::create_dir(c.path("newdir")), libc::EROFS, "mkdir in recovery mode");
    let out = c.jfs(&["--conf", &conf, "fs", "rm", "jfs://default/d3/f4"]);
    assert!(!out.success(), "jfs fs rm succeeded in recovery mode");
    assert!(
        out.stderr
            .contains("ErrorCode : 25021 , ErrorMsg: Namespace is under recovery mode, and is read-only."),
        "jfs fs rm did not report 25021:\n{}",
        out.describe()
    );
    let cat = c.jfs_ok(&["--conf", &conf, "fs", "cat", "jfs://default/d3/f4"]);
    assert_eq!(cat.as_bytes(), fs::read(c.path("d3/f4")).expect("read d3/f4"));
    c.jfs_ok(&["--conf", &conf, "fs", "ls", "jfs://default/d249"]);

    // Leave recovery mode online: writes work on the same mount.
    c.jfs_ok(&["--conf", &conf, "admin", "recovery", "finish"]);
    let out = c.jfs(&["--conf", &conf, "admin", "recovery", "wait", "--timeout", "60"]);
    assert!(
        !out.success() && out.stderr.contains("already left recovery mode"),
        "`jfs admin recovery wait` after leaving recovery mode:\n{}",
        out.describe()
    );
    fs::write(c.path("after-recovery"), b"written after recovery").expect("write after leaving recovery mode");
    fs::remove_file(c.path("d3/f4")).expect("rm after leaving recovery mode");

    // And as the seed systems do it: the key back to false, mirror on,
    // restart. The mirror resumes into the same tables.
    set_setting(&c, "namespace.backend.raft.recovery.mode", "false");
    set_setting(&c, "namespace.backend.raft.async.dynamodb.enabled", "true");
    c.local_down();
    c.local_up();
    fs::write(c.path("after-restart"), b"x").expect("write after the restart");
    c.wait_synced(Duration::from_secs(120));
    let out = verify(&c);
    eprintln!("after leaving recovery: {out}");
    let detail = c.metastatus_detail();
    assert!(!leader_row(&detail).contains("FINISH"), "still in recovery:\n{detail}");
}

/// Creates files `f0, f1, ...` one at a time (each written and closed
/// before the next), recording when each was acknowledged, until `stop` or
/// the first failed write, which is returned (never retried).
fn numbered_writer(
    dir: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<Instant>, Option<std::io::Error>)> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut i = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let p = dir.join(format!("f{i}"));
            if let Err(e) = fs::write(&p, content(i)) {
                return (acked, Some(e));
            }
            acked.push(Instant::now());
            i += 1;
        }
        (acked, None)
    })
}

fn content(i: usize) -> Vec<u8> {
    format!("file {i}\n").repeat(1 + i % 50).into_bytes()
}

#[test]
fn a_crash_mid_sync_recovers_a_prefix_of_the_acknowledged_writes() {
    let c = Cluster::start_with_mirror();
    let dir = c.path("seq");
    fs::create_dir(&dir).expect("mkdir seq");
    c.wait_synced(Duration::from_secs(60));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = numbered_writer(dir.clone(), stop.clone());
    // Let the mirror work under load for a while, then lose every metad at once.
    std::thread::sleep(Duration::from_secs(8));
    let crash = Instant::now();
    for i in 1..=3 {
        c.kill9(&format!("metad{i}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Writes fail once every metad is gone: that is the crash, not a finding.
    let (acked, _) = writer.join().expect("writer thread");
    assert!(
        acked.len() > 50,
        "only {} files acknowledged before the crash",
        acked.len()
    );
    c.drop_metadata();
    c.local_up_recovery();

    let mut present = std::collections::BTreeSet::new();
    for e in fs::read_dir(&dir).expect("readdir seq after recovery") {
        let name = e.expect("dirent").file_name().to_string_lossy().into_owned();
        let i: usize = name
            .strip_prefix('f')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("stray {name}"));
        present.insert(i);
    }
    // A prefix: f0..fk, nothing after; every file whole except possibly
    // the last one, which may have been caught between create and write.
    let k = present.iter().next_back().map_or(0, |m| m + 1);
    assert_eq!(present.len(), k, "the recovered files are not a prefix: {present:?}");
    for i in 0..k {
        let got = fs::read(dir.join(format!("f{i}"))).expect("read recovered file");
        if i + 1 < k {
            assert_eq!(got, content(i), "f{i} content differs after recovery");
        } else {
            assert!(got.is_empty() || got == content(i), "f{i} is torn after recovery");
        }
    }
    assert!(
        k <= acked.len() + 1,
        "recovered {k} files, only {} were written",
        acked.len()
    );
    // Everything acknowledged more than a few seconds before the crash is there.
    let old = acked
        .iter()
        .filter(|t| crash.duration_since(**t) > Duration::from_secs(3))
        .count();
    assert!(
        k >= old,
        "recovered {k} files, but {old} were acknowledged more than 3 s before the crash"
    );
    eprintln!(
        "acknowledged {}, {old} of them more than 3 s before the crash; recovered {k}",
        acked.len()
    );
}

#[test]
fn leader_failover_during_mirroring_loses_and_reorders_nothing() {
    let c = Cluster::start_with_mirror();
    let dir = c.path("seq");
    fs::create_dir(&dir).expect("mkdir seq");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = numbered_writer(dir.clone(), stop.clone());
    std::thread::sleep(Duration::from_secs(4));
    let leader = c.leader_index().expect("a leader");
    c.kill9(&format!("metad{leader}"));
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writer.join().expect("writer thread");
    if let Some(e) = failed {
        panic!(
            "a write failed across the leader's kill -9 after {} files: {e}{}",
            acked.len(),
            c.log_tails()
        );
    }
    c.local_up();
    c.wait_synced(Duration::from_secs(120));
    let out = verify(&c);
    eprintln!("{} files written across the failover; verify: {out}", acked.len());
    let rows: u64 = out.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(
        rows as usize > acked.len(),
        "verify compared {rows} rows for {} files",
        acked.len()
    );
}

#[test]
fn a_table_store_outage_grows_the_lag_and_it_drains_afterwards() {
    let c = Cluster::start_with_mirror();
    let dir = c.path("seq");
    fs::create_dir(&dir).expect("mkdir seq");
    c.wait_synced(Duration::from_secs(60));
    // The same writes with the table store up, for comparison.
    let mut before = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let t = Instant::now();
        fs::write(dir.join(format!("b{}", before.len())), content(before.len())).expect("write before the outage");
        before.push(t.elapsed());
    }
    let store = c.live_pid("tablestore");
    // SAFETY: a signal to the table store this test's cluster started.
    unsafe { libc::kill(store, libc::SIGSTOP) };
    let t0 = Instant::now();
    let mut during = Vec::new();
    while t0.elapsed() < Duration::from_secs(60) {
        let n = during.len();
        let t = Instant::now();
        fs::write(dir.join(format!("f{n}")), content(n)).expect("write while the table store is down");
        during.push(t.elapsed());
    }
    let n = during.len();
    let worst = during.iter().copied().max().unwrap_or_default();
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (med_before, med_during) = (median(&mut before), median(&mut during));
    let detail = c.metastatus_detail();
    assert!(
        leader_row(&detail).contains("_synced=0"),
        "the leader claims _synced=1 during the outage:\n{detail}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(store, libc::SIGCONT) };
    let t1 = Instant::now();
    c.wait_synced(Duration::from_secs(120));
    eprintln!(
        "{n} files written during a 60 s table-store outage: median write {:.1} ms (before it {:.1} ms), slowest \
         {:.0} ms; drained {:.1}s after it came back\n{detail}",
        med_during.as_secs_f64() * 1000.0,
        med_before.as_secs_f64() * 1000.0,
        worst.as_secs_f64() * 1000.0,
        t1.elapsed().as_secs_f64()
    );
    assert!(
        worst < Duration::from_secs(2),
        "a write took {worst:?} while the table store was down"
    );
    // Generous against a loaded machine, but a mirror that blocked the
    // metadata path (or retried on it) would blow through it.
    assert!(
        med_during < med_before * 3 + Duration::from_millis(20),
        "the median write went from {med_before:?} to {med_during:?} while the table store was down"
    );
    verify(&c);
}

/// Points `c`'s mirror at the table store on `store_ip` (its own, or
/// another cluster's), with the settings `jfs local up` writes.
fn mirror_to(c: &Cluster, store_ip: &str) {
    mirror_to_endpoint(c, &format!("http://{store_ip}:8301"));
}

fn mirror_to_endpoint(c: &Cluster, endpoint: &str) {
    set_setting(c, "namespace.backend.raft.async.dynamodb.enabled", "true");
    set_setting(c, "namespace.dynamodb.endpoint", &format!("\"{endpoint}\""));
    set_setting(c, "namespace.dynamodb.region", "\"us-east-1\"");
    set_setting(c, "namespace.dynamodb.table-prefix", "\"jfs_\"");
    set_setting(c, "namespace.dynamodb.access-key", "\"local\"");
    set_setting(c, "namespace.dynamodb.access-secret", "\"local\"");
}

/// Waits until the leader's row of `metastatus --detail` mentions `what`.
fn wait_leader_detail(c: &Cluster, what: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let detail = c.metastatus_detail();
        let leader = detail
            .lines()
            .find(|l| is_leader_line(l))
            .and_then(|l| l.split_whitespace().next());
        let mine = leader.and_then(|id| detail.lines().find(|l| l.starts_with(&format!("node {id}: mirror"))));
        if mine.is_some_and(|l| l.contains(what)) {
            return detail;
        }
        assert!(
            start.elapsed() < timeout,
            "the leader's mirror status never said {what:?} within {timeout:?}:\n{detail}{}",
            c.log_tails()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_second_cluster_on_the_same_tables_takes_them_over_and_the_first_stops() {
    let a = Cluster::start_with_mirror();
    fs::write(a.path("from-a"), b"written on cluster A").expect("write on A");
    fs::create_dir(a.path("dir-a")).expect("mkdir on A");
    a.wait_synced(Duration::from_secs(60));

    // Cluster B, with metadata of its own, is pointed at A's tables.
    let mut b = Cluster::start();
    fs::write(b.path("from-b"), b"written on cluster B").expect("write on B");
    b.local_down();
    mirror_to(&b, &a.ip);
    b.mirror = true;
    b.local_up();
    b.wait_synced(Duration::from_secs(120));

    // The later owner wins; A says why it stopped, and keeps serving.
    wait_leader_detail(&a, "the tables were taken by", Duration::from_secs(60));
    // Followers learn it from the watermark, which they poll every 2 s.
    let start = Instant::now();
    loop {
        let detail = a.metastatus_detail();
        let synced_rows = detail.lines().filter(|l| l.contains("_synced=1")).count();
        if synced_rows == 0 && detail.lines().filter(|l| l.contains("_synced=0")).count() >= 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "cluster A still claims _synced=1 30 s after losing its tables:\n{detail}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    fs::write(a.path("after-takeover"), b"A keeps working").expect("write on A after the takeover");
    fs::write(b.path("b-after-takeover"), b"B mirrors this").expect("write on B");
    b.wait_synced(Duration::from_secs(60));

    // The tables hold B's namespace, row by row; A's writes did not leak in.
    let out = verify(&b);
    eprintln!("B owns the tables: {out}");
    let a_verify = a.jfs(&["--conf", &s(&a.conf()), "admin", "mirror", "verify"]);
    assert!(
        !a_verify.success() && a_verify.stderr.contains("not this cluster's"),
        "cluster A's verify should refuse tables it no longer owns:\n{}",
        a_verify.describe()
    );
    // And a cluster restored from them is B's.
    let listing = tree_listing(&b.mnt);
    b.drop_metadata();
    b.local_up_recovery();
    assert_eq!(tree_listing(&b.mnt), listing, "the restored namespace is not B's");
    assert!(!b.path("from-a").exists() && !b.path("after-takeover").exists());
    assert_eq!(fs::read(b.path("b-after-takeover")).expect("read"), b"B mirrors this");
}

#[test]
fn mirror_enabled_on_a_namespace_with_50000_inodes_exports_then_follows() {
    let mut c = Cluster::start();
    // 50,000 inodes before the mirror exists: 500 directories of 99 files,
    // every tenth with content. JFS_TEST_MIRROR_INODES makes it bigger for
    // the recovery benchmark in docs/PERFORMANCE.md.
    let dirs = env_count("JFS_TEST_MIRROR_INODES", 50_000).max(1_000) / 100;
    let t0 = Instant::now();
    let fill = sh_result(
        &c.mnt,
        &format!(
            r#"python3 - <<'EOF'
import os
from concurrent.futures import ThreadPoolExecutor
def fill(d):
    os.mkdir(f"d{{d}}")
    for f in range(99):
        with open(f"d{{d}}/f{{f}}", "wb") as fh:
            if f % 10 == 0:
                fh.write(f"{{d}}/{{f}}\n".encode() * (1 + f))
with ThreadPoolExecutor(4) as pool:
    list(pool.map(fill, range({dirs})))
EOF"#
        ),
        // About 500 creates/s: 100 s for the default, longer for the benchmark.
        Duration::from_secs(300 + dirs * 2),
    );
    assert!(fill.success(), "filling the namespace failed: {}", fill.describe());
    eprintln!("created {} inodes in {:.1}s", dirs * 100, t0.elapsed().as_secs_f64());
    let conf = s(&c.conf());

    c.local_down();
    let ip = c.ip.clone();
    mirror_to(&c, &ip);
    c.mirror = true;
    c.local_up();
    // Writes go on while the export runs, and are shipped after it.
    let t1 = Instant::now();
    for i in 0..200u64 {
        fs::write(c.path(format!("d{}/late{i}", i % dirs)), format!("late {i}\n")).expect("write during the export");
    }
    fs::remove_file(c.path("d7/f3")).expect("rm during the export");
    c.wait_synced(Duration::from_secs(600));
    eprintln!(
        "export and catch-up done {:.1}s after the restart",
        t1.elapsed().as_secs_f64()
    );
    let out = verify(&c);
    eprintln!("after enabling the mirror: {out}");
    let count = c.jfs_ok(&["--conf", &conf, "fs", "count", "jfs://default/"]);
    // The root and `dirs` directories; 99 files each, one removed, 200 late.
    assert!(
        count.contains(&format!(" {} ", dirs + 1)) && count.contains(&format!(" {} ", dirs * 99 - 1 + 200)),
        "unexpected count: {count}"
    );
    let listing = tree_listing(&c.mnt);
    let sums = content_sums(&c);

    c.drop_metadata();
    let t2 = Instant::now();
    c.local_up_recovery();
    eprintln!("recovery of {} inodes: {:.1}s", dirs * 100, t2.elapsed().as_secs_f64());
    // Where the restore spent its time, from the leader's log (for PERFORMANCE.md).
    for n in 1..=3 {
        let log = fs::read_to_string(c.state.join("logs").join(format!("metad{n}.log"))).unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains("rows restored") || l.contains("restore from the table store finished"))
        {
            eprintln!("metad{n}: {l}");
        }
    }
    assert_eq!(c.jfs_ok(&["--conf", &conf, "fs", "count", "jfs://default/"]), count);
    assert_eq!(tree_listing(&c.mnt), listing, "ls -lR differs after recovery");
    assert_eq!(content_sums(&c), sums, "file contents differ after recovery");
}

/// The second, independent DynamoDB implementation the mirror is checked
/// against: moto's server mode (installed by scripts/install-deps.sh), run
/// by the test itself on the cluster's address.
struct Moto {
    child: std::process::Child,
}

const MOTO_BIN: &str = "/opt/jfs-moto/bin/moto_server";

impl Moto {
    fn start(c: &Cluster) -> (Moto, String) {
        let log = fs::File::create(c.state.join("logs/moto.log")).expect("create moto.log");
        let child = std::process::Command::new(MOTO_BIN)
            .args(["-H", &c.ip, "-p", "8302"])
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOTO_BIN} (bash scripts/install-deps.sh installs it): {e}"));
        let moto = Moto { child };
        let addr = format!("{}:8302", c.ip);
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on {addr} within 60 s (see {}/logs/moto.log)",
                c.state.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (moto, format!("http://{addr}"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mirror's contract, on moto instead of Dynoxide: export of existing
/// data, incremental shipping (creates, renames, overwrites, unlinks, a
/// value split over several items), verify row by row, and a recovery.
#[test]
fn the_mirror_contract_holds_on_a_second_dynamodb_implementation() {
    let mut c = Cluster::start();
    c.sh(r#"mkdir -p before/a before/b && for i in $(seq 1 50); do echo "before $i" > before/a/f$i; done"#);
    let (_moto, endpoint) = Moto::start(&c);
    c.local_down();
    mirror_to_endpoint(&c, &endpoint);
    c.mirror = true;
    c.local_up();
    c.sh(r#"set -e
        mkdir -p after/x/y
        for i in $(seq 1 100); do echo "after $i" > after/x/f$i; done
        for i in $(seq 1 20); do mv after/x/f$i after/x/y/g$i; done
        for i in $(seq 21 40); do rm after/x/f$i; done
        for i in $(seq 41 50); do echo overwritten > after/x/f$i; done
        ln -s x/y after/link
        ln after/x/f60 after/hardlink
        # A directory with enough entries and a file with enough slices
        # that some values pass the 350 KiB item split.
        mkdir wide && for i in $(seq 1 300); do : > "wide/$(printf 'n%0200d' $i)"; done
        for i in $(seq 0 3000); do printf x | dd of=sliced bs=1 seek=$((i * 4096)) conv=notrunc status=none; done
        mv before/b before/c"#);
    c.wait_synced(Duration::from_secs(300));
    let out = verify(&c);
    eprintln!("moto: {out}");
    let listing = tree_listing(&c.mnt);
    let sums = content_sums(&c);
    c.drop_metadata();
    c.local_up_recovery();
    assert_eq!(tree_listing(&c.mnt), listing, "ls -lR differs after recovery from moto");
    assert_eq!(content_sums(&c), sums, "contents differ after recovery from moto");
}
