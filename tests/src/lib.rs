//! Harness for the jfs integration tests: real daemons, real FUSE mounts.
//!
//! [`Cluster::start`] runs `jfs local up` on a loopback address of its own
//! (127.<a>.<b>.1, reserved with a lock file so parallel tests and parallel
//! test runs never collide), in a temporary state directory, and mounts the
//! `default` namespace. Dropping the cluster runs `jfs local down` and then
//! makes sure, even after a panic, that no mount and no daemon is left behind.
//!
//! Everything waits on conditions with deadlines ([`wait_until`]), never on
//! fixed sleeps, so the suite holds on a loaded 2-core machine. Every command
//! runs under a timeout, and a watchdog aborts a cluster's FUSE connections if
//! a test outlives its budget, so a hung mount fails the test instead of
//! hanging CI.
//!
//! The daemons are found next to the test executable (cargo puts tests in
//! `target/release/deps/` and binaries in `target/release/`), or in
//! `$JFS_BIN_DIR`. `cargo test` does not build other packages' binaries:
//! run `cargo build --release --workspace` first (scripts/test.sh does).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The recorded metadata workload of the failover and membership tests.
pub mod workload;

/// Default block size of a namespace (DESIGN §6); tests probe its edges.
pub const BLOCK_SIZE: u64 = 4 << 20;
pub const MIB: u64 = 1 << 20;

/// Default timeout for one shell command run by a test.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);

/// How long one cluster may live before the watchdog aborts its mounts.
/// `JFS_TEST_WATCHDOG_SECS` overrides it.
const WATCHDOG_DEFAULT: Duration = Duration::from_secs(900);

/// Where logs of failed tests are copied, so they survive the cleanup.
pub const FAILURE_LOG_DIR: &str = "/tmp/jfs-test-failures";

/// Where loopback address reservations live (one flock'ed file per address).
const IP_LOCK_DIR: &str = "/tmp/jfs-test-ips";

// ------------------------------------------------------------------ binaries

/// Directory holding jfs, jfs-metad, jfs-blockd and jfs-mountd.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("JFS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("cannot find the path of the test executable");
    // target/release/deps/<test>-<hash>  ->  target/release
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test executable has no grandparent directory; set JFS_BIN_DIR")
}

/// Path of one jfs binary; panics with the fix if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} does not exist. `cargo test` does not build the daemons of other packages: run \
         `cargo build --release --workspace` first (scripts/test.sh does), or point JFS_BIN_DIR at them",
        p.display()
    );
    p
}

// ------------------------------------------------------------------ waiting

/// Polls `f` until it returns `Ok`, or panics after `timeout` with `what` and
/// the last error. Backs off from 10 ms to 200 ms between polls.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                if start.elapsed() >= timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {e}");
                }
            }
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// [`wait_until`] for a plain condition.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_until(what, timeout, || {
        if cond() {
            Ok(())
        } else {
            Err("condition still false".into())
        }
    })
}

// ------------------------------------------------------------------ commands

/// Output of a finished command, with text already decoded.
#[derive(Debug, Clone)]
pub struct CmdOut {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// A multi-line description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion with a timeout, capturing its output in
/// anonymous files (not pipes: a daemon started by the command may inherit
/// them and would keep a pipe open forever). On timeout the command's whole
/// process group is killed and an error is returned.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Result<CmdOut, String> {
    let out = tempfile::tempfile().map_err(|e| format!("cannot create a temp file: {e}"))?;
    let err = tempfile::tempfile().map_err(|e| format!("cannot create a temp file: {e}"))?;
    let clone = |f: &File| f.try_clone().map_err(|e| format!("cannot dup a temp file: {e}"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(clone(&out)?))
        .stderr(Stdio::from(clone(&err)?))
        .process_group(0);
    let desc = format!("{cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {desc}: {e}"))?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("cannot wait for {desc}: {e}")),
        }
        if start.elapsed() > timeout {
            // SAFETY: plain syscall; the group id is the child's pid (process_group(0)).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            let (o, e) = (read_all(out), read_all(err));
            return Err(format!(
                "{desc} did not finish within {timeout:?} and was killed\n--- stdout ---\n{o}\n--- stderr ---\n{e}"
            ));
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    Ok(CmdOut {
        status,
        stdout: read_all(out),
        stderr: read_all(err),
    })
}

fn read_all(mut f: File) -> String {
    let mut buf = Vec::new();
    let _ = f.rewind();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Runs a bash script (with `set -euo pipefail`) in `dir`; returns its result
/// without judging it.
pub fn sh_result(dir: &Path, script: &str, timeout: Duration) -> CmdOut {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir);
    run_cmd(&mut cmd, timeout).unwrap_or_else(|e| panic!("in {}: {e}\nscript:\n{script}", dir.display()))
}

/// Runs a bash script in `dir` and returns its stdout; panics with the script,
/// its exit status, stdout and stderr if it fails.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = sh_result(dir, script, CMD_TIMEOUT);
    assert!(
        out.success(),
        "script failed in {}:\n{script}\n{}",
        dir.display(),
        out.describe()
    );
    out.stdout
}

/// Runs the same script in two fresh directories and asserts both succeed
/// with identical output. Scripts must use relative paths only.
pub fn assert_same_output(local: &Path, mounted: &Path, script: &str) -> String {
    let a = sh_result(local, script, CMD_TIMEOUT);
    let b = sh_result(mounted, script, CMD_TIMEOUT);
    assert!(
        a.success(),
        "script failed on the LOCAL disk ({}):\n{script}\n{}",
        local.display(),
        a.describe()
    );
    assert!(
        b.success(),
        "script failed on jfs ({}) but worked locally:\n{script}\n{}",
        mounted.display(),
        b.describe()
    );
    if a.stdout != b.stdout {
        panic!(
            "jfs and a local disk disagree for:\n{script}\n{}\n--- local stdout ---\n{}\n--- jfs stdout ---\n{}\n--- jfs stderr ---\n{}",
            first_diff_line(&a.stdout, &b.stdout),
            a.stdout,
            b.stdout,
            b.stderr
        );
    }
    b.stdout
}

fn first_diff_line(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (
            la.get(i).copied().unwrap_or("<none>"),
            lb.get(i).copied().unwrap_or("<none>"),
        );
        if x != y {
            return format!("first difference at line {}:\n  local: {x}\n  jfs:   {y}", i + 1);
        }
    }
    "outputs differ only in trailing whitespace".into()
}

// ------------------------------------------------------------------ mounts

/// Mount points currently listed in /proc/self/mountinfo, with their
/// "major:minor" device (the minor of a FUSE mount is its connection id).
pub fn mounts() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((PathBuf::from(unescape_mountinfo(f.get(4)?)), f.get(2)?.to_string()))
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(((b[i + 1] - b'0') << 6) | ((b[i + 2] - b'0') << 3) | (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|(p, _)| p == path)
}

/// The filesystem at `path` is mounted read-only (statvfs's ST_RDONLY).
pub fn is_read_only_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid C string and `st` a properly sized out-parameter.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0
    }
}

/// Mount points at or below `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<(PathBuf, String)> {
    let mut v: Vec<_> = mounts().into_iter().filter(|(p, _)| p.starts_with(root)).collect();
    v.sort_by_key(|(p, _)| std::cmp::Reverse(p.as_os_str().len()));
    v
}

/// Aborts the FUSE connection behind a mount (all pending and future requests
/// fail with ENOTCONN), so a process stuck on a dead daemon gets unstuck.
fn abort_fuse_connection(dev: &str) {
    let Some(minor) = dev.split(':').nth(1) else { return };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(minor).exists() {
        // fusectl is not always mounted; mounting it is harmless and lets us abort.
        let _ = run_cmd(
            Command::new("mount").args(["-t", "fusectl", "none"]).arg(ctl),
            Duration::from_secs(10),
        );
    }
    let _ = fs::write(ctl.join(minor).join("abort"), "1");
}

/// Detaches a mount without waiting for its daemon (`umount -l`).
pub fn lazy_unmount(path: &Path) {
    let _ = run_cmd(Command::new("umount").arg("-l").arg(path), Duration::from_secs(30));
}

// ------------------------------------------------------------------ processes

pub fn pid_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry but is dead for our purposes. After
    // SIGKILL the main thread can turn zombie while other threads are still
    // exiting and holding the process's files (a RocksDB lock, a port), so
    // every thread must be gone or a zombie.
    let not_zombie = |stat: &str| {
        fs::read_to_string(stat)
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    if not_zombie(&format!("/proc/{pid}/stat")) {
        return true;
    }
    match fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks
            .flatten()
            .any(|t| not_zombie(&format!("{}/stat", t.path().display()))),
        Err(_) => false,
    }
}

pub fn pid_cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Pids of processes whose command line mentions `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else { return vec![] };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != me && pid_alive(p) && pid_cmdline(p).contains(needle))
        .collect()
}

fn kill9(pid: i32) {
    // SAFETY: plain syscall on a pid we started (checked by callers).
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

// ------------------------------------------------------------------ addresses

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Picks a loopback address no other test (in this or another process) is
/// using: reserves it with an flock'ed file held for the cluster's life and
/// checks that every port of the local-cluster layout is free on it.
fn reserve_ip() -> (String, File) {
    let _ = fs::create_dir_all(IP_LOCK_DIR);
    let _ = fs::set_permissions(IP_LOCK_DIR, fs::Permissions::from_mode(0o1777));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u64 * 0x9E37);
    for _ in 0..1000 {
        x = splitmix(x);
        // Stay clear of 127.0.x.x, where the default local cluster lives.
        let a = 10 + (x % 240) as u8;
        let b = ((x >> 8) % 256) as u8;
        let ip = format!("127.{a}.{b}.1");
        let Ok(f) = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(Path::new(IP_LOCK_DIR).join(&ip))
        else {
            continue;
        };
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let ports = [
            8101, 8102, 8103, 8104, 8111, 8112, 8113, 8114, 8121, 8122, 8123, 8124, 8201, 8202, 8211, 8212, 8221, 8222,
            8301, 8302, 8401,
        ];
        if ports
            .iter()
            .all(|p| std::net::TcpListener::bind((ip.as_str(), *p)).is_ok())
        {
            return (ip, f);
        }
    }
    panic!("could not find a free loopback address 127.x.y.1 after 1000 tries");
}

/// A loopback address of the caller's own (see [`Cluster`]), for a test that
/// starts its daemons itself; held while the returned file is open.
pub fn reserve_loopback_ip() -> (String, File) {
    reserve_ip()
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

// ------------------------------------------------------------------ cluster

/// A local jfs cluster (3 metad, 3 blockd) with namespace `default` mounted.
pub struct Cluster {
    /// Name of the test that started it (used in paths and messages).
    pub name: String,
    /// Temporary directory holding everything below.
    pub root: PathBuf,
    /// `jfs local up --dir` state: jfs.toml, data, logs/, run/.
    pub state: PathBuf,
    /// Where `default` is mounted.
    pub mnt: PathBuf,
    /// A directory on the local disk, for comparing against jfs.
    pub local: PathBuf,
    /// The loopback address every daemon of this cluster listens on.
    pub ip: String,
    /// How long the first `jfs local up` took until the mount was usable.
    pub startup: Duration,
    _ip_lock: File,
    watchdog: Option<mpsc::Sender<()>>,
    extra: AtomicU32,
    /// Runs the table store and mirrors metadata to it (`jfs local up`'s
    /// default; the other tests leave it out to stay light).
    pub mirror: bool,
    /// Mutual TLS on every connection (`jfs local up`'s default).
    pub tls: bool,
}

impl Cluster {
    /// Starts a fresh cluster (without the table-store mirror) and waits
    /// until its mount is usable.
    pub fn start() -> Cluster {
        Cluster::start_opts(false, true)
    }

    /// Starts a fresh cluster with the table store and the mirror.
    pub fn start_with_mirror() -> Cluster {
        Cluster::start_opts(true, true)
    }

    /// Starts a fresh cluster without TLS, for tests that read or cut the
    /// gRPC traffic between client and metad.
    pub fn start_plaintext() -> Cluster {
        Cluster::start_opts(false, false)
    }

    fn start_opts(mirror: bool, tls: bool) -> Cluster {
        let name = test_name();
        let base = std::env::var_os("JFS_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let root = tempfile::Builder::new()
            .prefix(&format!("jfs-test-{name}-"))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", base.display()))
            .keep();
        // Other users (EACCES tests run as nobody) must be able to reach the mounts.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let (state, mnt, local) = (root.join("state"), root.join("mnt"), root.join("local"));
        for d in [&state, &mnt, &local] {
            fs::create_dir_all(d).expect("create test dirs");
        }
        let (ip, lock) = reserve_ip();
        let mut c = Cluster {
            name,
            root,
            state,
            mnt,
            local,
            ip,
            startup: Duration::ZERO,
            _ip_lock: lock,
            watchdog: None,
            extra: AtomicU32::new(0),
            mirror,
            tls,
        };
        c.watchdog = Some(start_watchdog(c.name.clone(), c.root.clone(), c.state.clone()));
        let t0 = Instant::now();
        c.local_up();
        c.startup = t0.elapsed();
        c
    }

    /// Path of the cluster's config file.
    pub fn conf(&self) -> PathBuf {
        self.state.join("jfs.toml")
    }

    /// A path inside the mount.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Runs the jfs CLI with a timeout; does not judge the result.
    pub fn jfs(&self, args: &[&str]) -> CmdOut {
        let mut cmd = Command::new(bin("jfs"));
        cmd.args(args).current_dir(&self.root).env("RUST_BACKTRACE", "1");
        run_cmd(&mut cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}{}", self.log_tails()))
    }

    /// Runs the jfs CLI and returns stdout; panics with its output and the
    /// daemons' log tails if it fails.
    pub fn jfs_ok(&self, args: &[&str]) -> String {
        let out = self.jfs(args);
        assert!(
            out.success(),
            "`jfs {}` failed:\n{}{}",
            args.join(" "),
            out.describe(),
            self.log_tails()
        );
        out.stdout
    }

    /// `jfs local up` for this cluster (start what is not running, mount if
    /// not mounted), then waits until the mount is usable.
    pub fn local_up(&self) {
        let (state, mnt) = (s(&self.state), s(&self.mnt));
        let mut args = vec!["local", "up", "--dir", &state, "--ip", &self.ip, &mnt];
        if !self.mirror {
            args.push("--no-mirror");
        }
        if !self.tls {
            args.push("--no-tls");
        }
        self.jfs_ok(&args);
        if namespace_read_only(&self.conf()) {
            wait_mount_usable(&self.mnt, Duration::from_secs(60), false, &|| self.log_tails());
        } else {
            self.wait_usable(Duration::from_secs(60));
        }
    }

    /// `jfs local down --drop-metadata`: the whole metadata cluster is lost;
    /// blockd data and the table store remain.
    pub fn drop_metadata(&self) {
        self.jfs_ok(&["local", "down", "--drop-metadata", "--dir", &s(&self.state)]);
        assert!(
            !is_mounted(&self.mnt),
            "{} still mounted after local down",
            self.mnt.display()
        );
    }

    /// `jfs local up --recovery`: a new metadata cluster restores from the
    /// table store; returns once FINISH and the (read-only) mount answers.
    pub fn local_up_recovery(&self) {
        let (state, mnt) = (s(&self.state), s(&self.mnt));
        self.jfs_ok(&["local", "up", "--recovery", "--dir", &state, "--ip", &self.ip, &mnt]);
        wait_mount_usable(&self.mnt, Duration::from_secs(60), false, &|| self.log_tails());
    }

    /// `jfs metastatus --detail` output.
    pub fn metastatus_detail(&self) -> String {
        self.jfs_ok(&["metastatus", "--detail", "--dir", &s(&self.state)])
    }

    /// Waits until every metad reports `_synced=1` (the mirror has shipped
    /// everything each one applied).
    pub fn wait_synced(&self, timeout: Duration) {
        let mut last = String::new();
        let start = Instant::now();
        while start.elapsed() < timeout {
            let out = self.jfs(&["metastatus", "--detail", "--dir", &s(&self.state)]);
            last = out.stdout.clone();
            let rows: Vec<&str> = out
                .stdout
                .lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .collect();
            if out.success() && rows.len() == 3 && rows.iter().all(|r| r.contains("_synced=1")) {
                return;
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "the mirror did not report _synced=1 on every node within {timeout:?}:\n{last}{}",
            self.log_tails()
        );
    }

    /// Stops the cluster, appends `line` (a `key = value` setting) to its
    /// jfs.toml, and starts it again, so every daemon and the mount use it.
    pub fn restart_with_setting(&self, line: &str) {
        self.local_down();
        let conf = self.conf();
        let mut text = fs::read_to_string(&conf).unwrap_or_else(|e| panic!("read {}: {e}", conf.display()));
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
        fs::write(&conf, text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        self.local_up();
    }

    /// `jfs local down`; asserts it succeeded and left no mount.
    pub fn local_down(&self) {
        self.jfs_ok(&["local", "down", "--dir", &s(&self.state)]);
        assert!(
            !is_mounted(&self.mnt),
            "`jfs local down` returned but {} is still mounted",
            self.mnt.display()
        );
    }

    /// Waits until a file can be created, written, read back and removed at
    /// the root of the mount.
    pub fn wait_usable(&self, timeout: Duration) {
        wait_mount_usable(&self.mnt, timeout, true, &|| self.log_tails());
    }

    /// Runs a bash script inside the mount; panics on failure (with log tails).
    pub fn sh(&self, script: &str) -> String {
        let out = sh_result(&self.mnt, script, CMD_TIMEOUT);
        assert!(
            out.success(),
            "script failed on the jfs mount:\n{script}\n{}{}",
            out.describe(),
            self.log_tails()
        );
        out.stdout
    }

    /// Fresh empty directories `<local>/<name>` and `<mnt>/<name>` for a
    /// local-versus-jfs comparison.
    pub fn twin_dirs(&self, name: &str) -> (PathBuf, PathBuf) {
        let (a, b) = (self.local.join(name), self.mnt.join(name));
        fs::create_dir(&a).unwrap_or_else(|e| panic!("mkdir {}: {e}", a.display()));
        fs::create_dir(&b).unwrap_or_else(|e| panic!("mkdir {} on jfs: {e}{}", b.display(), self.log_tails()));
        (a, b)
    }

    // -------------------------------------------------------------- daemons

    /// Names of the daemons with a pid file in STATE/run (e.g. metad1, blockd2).
    pub fn daemon_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.state.join("run"))
            .map(|rd| {
                rd.filter_map(|e| {
                    let n = e.ok()?.file_name().to_str()?.to_string();
                    n.strip_suffix(".pid").map(str::to_string)
                })
                .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Pid recorded in STATE/run/<name>.pid.
    pub fn pid(&self, name: &str) -> Option<i32> {
        fs::read_to_string(self.state.join("run").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Pid of a live daemon; panics if it has no pid file or is not running.
    pub fn live_pid(&self, name: &str) -> i32 {
        let pid = self.pid(name).unwrap_or_else(|| {
            panic!(
                "no pid file {}/run/{name}.pid (have: {:?})",
                self.state.display(),
                self.daemon_names()
            )
        });
        assert!(
            pid_alive(pid),
            "daemon {name} (pid {pid}) is not running{}",
            self.log_tails()
        );
        pid
    }

    /// `kill -9` one daemon and wait until it is gone.
    pub fn kill9(&self, name: &str) {
        let pid = self.live_pid(name);
        kill9(pid);
        wait_for(
            &format!("{name} (pid {pid}) to die after SIGKILL"),
            Duration::from_secs(10),
            || !pid_alive(pid),
        );
    }

    /// Sends a signal (e.g. SIGSTOP/SIGCONT) to a daemon.
    pub fn signal(&self, name: &str, sig: i32) {
        let pid = self.live_pid(name);
        // SAFETY: plain syscall on a daemon of this cluster.
        unsafe { libc::kill(pid, sig) };
    }

    /// metad1..3 and blockd1..3 as named by their pid files.
    pub fn server_names(&self) -> Vec<String> {
        let v: Vec<String> = self
            .daemon_names()
            .into_iter()
            .filter(|n| n.starts_with("metad") || n.starts_with("blockd"))
            .collect();
        assert_eq!(
            v.len(),
            6,
            "expected pid files for 3 metad and 3 blockd in {}/run, found {v:?}",
            self.state.display()
        );
        v
    }

    /// Pid of the jfs-mountd serving this cluster's main mount, found by its
    /// command line (it daemonizes, so it has no pid file).
    pub fn mountd_pid(&self) -> Option<i32> {
        let mnt = s(&self.mnt);
        pids_mentioning(&mnt).into_iter().find(|&p| {
            let cl = pid_cmdline(p);
            cl.contains("jfs-mountd") && cl.split(' ').any(|a| a == mnt)
        })
    }

    /// Index (1..=3) of the metad that `jfs metastatus` reports as leader.
    pub fn leader_index(&self) -> Option<usize> {
        let out = self.jfs(&["metastatus", "--dir", &s(&self.state)]);
        if !out.success() {
            return None;
        }
        let line = out.stdout.lines().find(|l| is_leader_line(l))?;
        (1..=3).find(|i| line.contains(&format!("{}:{}", self.ip, 8101 + 10 * (i - 1))))
    }

    // -------------------------------------------------------------- more mounts

    /// Mounts namespace `default` a second time (a separate jfs-mountd with
    /// its own caches), with extra `-o` options if `opts` is not empty.
    pub fn mount_second(&self, opts: &str) -> Mount {
        self.mount_second_with_env(opts, &[])
    }

    /// [`Cluster::mount_second`] with extra environment variables for the
    /// jfs-mountd process (e.g. its fault-injection knobs).
    pub fn mount_second_with_env(&self, opts: &str, env: &[(&str, &str)]) -> Mount {
        self.mount_second_full(&self.conf(), "default", opts, env)
    }

    fn mount_second_full(&self, conf: &Path, namespace: &str, opts: &str, env: &[(&str, &str)]) -> Mount {
        let n = self.extra.fetch_add(1, Ordering::Relaxed) + 2;
        let path = self.root.join(format!("mnt{n}"));
        fs::create_dir_all(&path).expect("create second mount point");
        let log_path = self.root.join(format!("mountd-mnt{n}.log"));
        let log = File::create(&log_path).expect("create mountd log");
        let mut cmd = Command::new(bin("jfs-mountd"));
        cmd.arg("--conf").arg(conf);
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts);
        }
        cmd.arg("-f").arg(namespace).arg(&path);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut m = Mount {
            path: path.clone(),
            child: Some(child),
            log: log_path,
        };
        let mlog = m.log.clone();
        wait_until(
            &format!("second mount at {} to appear", path.display()),
            Duration::from_secs(30),
            || {
                if let Some(c) = m.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        panic!(
                            "jfs-mountd for {} exited with {st} before mounting; its log:\n{}",
                            path.display(),
                            fs::read_to_string(&mlog).unwrap_or_default()
                        );
                    }
                }
                if is_mounted(&path) {
                    Ok(())
                } else {
                    Err("not in /proc/self/mountinfo yet".into())
                }
            },
        );
        // A read-only grant mounts read-only without the `ro` option.
        let writable = !opts.split(',').any(|o| o.trim() == "ro") && !is_read_only_mount(&path);
        wait_mount_usable(&path, Duration::from_secs(30), writable, &|| {
            fs::read_to_string(&mlog).unwrap_or_default()
        });
        m
    }

    /// Last lines of every daemon log, for failure messages.
    pub fn log_tails(&self) -> String {
        log_tails(&self.state.join("logs"), 25)
    }
}

/// A daemon beyond the cluster's three metads and three blockds, started
/// and owned by a test (killed on drop). Data in STATE/<name>, log in
/// STATE/logs/<name>.log.
pub struct ExtraDaemon {
    pub name: String,
    pub data_dir: PathBuf,
    pub addr: String,
    child: Option<Child>,
}

/// A blockd started by `Cluster::start_extra_blockd`.
pub type ExtraBlockd = ExtraDaemon;

impl ExtraDaemon {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// `kill -9`, keeping the data directory.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ExtraDaemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One row of `jfs admin blockd list`.
#[derive(Debug, Clone)]
pub struct BlockdRow {
    pub id: String,
    pub address: String,
    pub state: String,
    pub capacity: u64,
    pub used: u64,
    pub listed: u64,
}

/// "12.5 MiB" as the CLI prints sizes, back to bytes (roughly).
fn parse_size(num: &str, unit: &str) -> u64 {
    let n: f64 = num.parse().unwrap_or(0.0);
    let mult = match unit {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "PiB" => 1 << 50,
        _ => 1,
    };
    (n * mult as f64) as u64
}

/// What `jfs fsck` said.
#[derive(Debug, Clone)]
pub struct Fsck {
    pub ok: bool,
    pub healthy: u64,
    pub under: u64,
    pub missing: u64,
    pub over: u64,
    pub text: String,
}

impl Cluster {
    /// Starts blockd number `n` (4, 5, ...) on this cluster's address.
    pub fn start_extra_blockd(&self, n: u32) -> ExtraBlockd {
        let name = format!("blockd{n}");
        let data_dir = self.state.join(&name);
        fs::create_dir_all(&data_dir).expect("create extra blockd dir");
        let addr = format!("{}:{}", self.ip, 8201 + 10 * (n - 1));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("logs").join(format!("{name}.log")))
            .expect("open extra blockd log");
        let child = Command::new(bin("jfs-blockd"))
            .arg("--conf")
            .arg(self.conf())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(&addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn jfs-blockd");
        ExtraBlockd {
            name,
            data_dir,
            addr,
            child: Some(child),
        }
    }

    /// Client and Raft addresses metad number `n` (4, 5, ...) gets on this
    /// cluster's address, following the local cluster's port pattern.
    pub fn metad_addrs(&self, n: u32) -> (String, String) {
        (
            format!("{}:{}", self.ip, 8101 + 10 * (n - 1)),
            format!("{}:{}", self.ip, 8103 + 10 * (n - 1)),
        )
    }

    /// Starts metad number `n` (4, 5, ...) with an empty data directory and
    /// `--join join` (a member's client address).
    pub fn start_extra_metad(&self, n: u32, join: &str) -> ExtraDaemon {
        let name = format!("metad{n}");
        let data_dir = self.state.join(&name);
        fs::create_dir_all(&data_dir).expect("create extra metad dir");
        let (rpc, raft) = self.metad_addrs(n);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("logs").join(format!("{name}.log")))
            .expect("open extra metad log");
        let child = Command::new(bin("jfs-metad"))
            .arg("--conf")
            .arg(self.conf())
            .args(["--node-id", &n.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--rpc-address", &rpc, "--raft-address", &raft, "--join", join])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn jfs-metad");
        ExtraDaemon {
            name,
            data_dir,
            addr: rpc,
            child: Some(child),
        }
    }

    /// `jfs admin blockd list`, parsed.
    pub fn blockd_list(&self) -> Vec<BlockdRow> {
        let conf = self.conf().to_string_lossy().into_owned();
        let out = self.jfs_ok(&["--conf", &conf, "admin", "blockd", "list"]);
        out.lines()
            .skip(1)
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                // ID ADDRESS STATE CAPACITY(2 words) USED(2 words) BLOCKS LISTED ...
                (w.len() >= 9).then(|| BlockdRow {
                    id: w[0].to_string(),
                    address: w[1].to_string(),
                    state: w[2].to_string(),
                    capacity: parse_size(w[3], w[4]),
                    used: parse_size(w[5], w[6]),
                    listed: w[8].parse().unwrap_or(0),
                })
            })
            .collect()
    }

    /// `jfs fsck [uri]`, parsed; never panics on a non-zero exit.
    pub fn fsck(&self, uri: Option<&str>) -> Fsck {
        let conf = self.conf().to_string_lossy().into_owned();
        let mut args = vec!["--conf", conf.as_str(), "fsck"];
        if let Some(u) = uri {
            args.push(u);
        }
        let out = self.jfs(&args);
        let text = format!("{}{}", out.stdout, out.stderr);
        let num = |key: &str| -> u64 {
            text.split([',', '\n'])
                .find_map(|part| part.trim().strip_prefix(key)?.trim().parse().ok())
                .unwrap_or(u64::MAX)
        };
        Fsck {
            ok: out.success(),
            healthy: num("healthy"),
            under: num("under-replicated"),
            missing: num("missing"),
            over: num("over-replicated"),
            text,
        }
    }
}

/// Whether a line of `jfs metastatus` output is the row of the leader node
/// (its ROLE column reads `leader`; the `--detail` header's LEADER is upper case).
pub fn is_leader_line(line: &str) -> bool {
    line.split_whitespace().any(|w| w == "leader")
}

/// A second mount of a cluster's namespace; unmounted on drop.
pub struct Mount {
    pub path: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mount {
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Unmounts with `umount` and asserts the daemon exits cleanly.
    pub fn unmount(mut self) {
        let out =
            run_cmd(Command::new("umount").arg(&self.path), Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.success(),
            "umount {} failed:\n{}",
            self.path.display(),
            out.describe()
        );
        let mut child = self.child.take().expect("mount has a daemon");
        let st = wait_until(
            "jfs-mountd to exit after umount",
            Duration::from_secs(20),
            || match child.try_wait() {
                Ok(Some(st)) => Ok(st),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(e.to_string()),
            },
        );
        assert!(
            st.success(),
            "jfs-mountd exited with {st} after umount; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9` of this mount's jfs-mountd (a crashed client), then a lazy
    /// unmount of the dead mount point.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run_cmd(
            Command::new("umount").arg("-l").arg(&self.path),
            Duration::from_secs(20),
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if thread::panicking() {
            eprintln!(
                "---- log of jfs-mountd for {} ----\n{}",
                self.path.display(),
                tail(&self.log_text(), 40)
            );
        }
        if is_mounted(&self.path) {
            let _ = run_cmd(Command::new("umount").arg(&self.path), Duration::from_secs(20));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.path) {
            lazy_unmount(&self.path);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = thread::panicking();
        if failed {
            eprintln!(
                "==== test {} failed; cluster state in {} ====",
                self.name,
                self.state.display()
            );
            eprintln!("{}", self.log_tails());
            save_failure_logs(&self.name, &self.root);
        }
        // Stop the watchdog: dropping the sender wakes it up.
        self.watchdog.take();
        // Graceful stop first: it is what users run.
        let mut down = Command::new(bin_dir().join("jfs"));
        down.args(["local", "down", "--dir"]).arg(&self.state).current_dir("/");
        match run_cmd(&mut down, Duration::from_secs(60)) {
            Ok(o) if o.success() => {}
            Ok(o) => eprintln!("cleanup: `jfs local down` failed:\n{}", o.describe()),
            Err(e) => eprintln!("cleanup: {e}"),
        }
        // Then make sure: no mount and no daemon of ours is left.
        for (p, dev) in mounts_under(&self.root) {
            eprintln!(
                "cleanup: {} still mounted after `jfs local down`; aborting and detaching it",
                p.display()
            );
            abort_fuse_connection(&dev);
            lazy_unmount(&p);
        }
        let needle = self.state.to_string_lossy().into_owned();
        for pid in pids_mentioning(&needle) {
            eprintln!(
                "cleanup: pid {pid} ({}) outlived `jfs local down`; killing it",
                pid_cmdline(pid)
            );
            kill9(pid);
        }
        for name in self.daemon_names() {
            if let Some(pid) = self.pid(&name) {
                let cmdline = pid_cmdline(pid);
                if pid_alive(pid) && cmdline.contains("jfs") {
                    eprintln!("cleanup: {name} (pid {pid}) outlived `jfs local down`; killing it");
                    kill9(pid);
                }
            }
        }
        if !mounts_under(&self.root).is_empty() {
            eprintln!("cleanup: mounts remain under {}; not deleting it", self.root.display());
        } else if failed && std::env::var_os("JFS_TEST_KEEP").is_some() {
            eprintln!("JFS_TEST_KEEP is set: kept {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Waits until `mnt` is mounted and answers: a probe file is created, read
/// back and removed (or, on a read-only mount, the root is listed).
/// Whether the cluster's config puts it in recovery mode (read-only).
fn namespace_read_only(conf: &Path) -> bool {
    fs::read_to_string(conf).is_ok_and(|t| {
        t.lines()
            .any(|l| l.replace(' ', "") == "namespace.backend.raft.recovery.mode=true")
    })
}

fn wait_mount_usable(mnt: &Path, timeout: Duration, writable: bool, context: &dyn Fn() -> String) {
    let probe = mnt.join(format!(".jfs-test-probe-{}", std::process::id()));
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        if !is_mounted(mnt) {
            last = "not mounted".into();
        } else {
            let r = (|| -> io::Result<()> {
                if !writable {
                    return fs::read_dir(mnt).map(|_| ());
                }
                fs::write(&probe, b"probe")?;
                let back = fs::read(&probe)?;
                fs::remove_file(&probe)?;
                if back != b"probe" {
                    return Err(io::Error::other(format!("read back {back:?}")));
                }
                Ok(())
            })();
            match r {
                Ok(()) => return,
                Err(e) => last = format!("probe file: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "mount {} not usable after {timeout:?}: {last}{}",
        mnt.display(),
        context()
    );
}

fn start_watchdog(name: String, root: PathBuf, state: PathBuf) -> mpsc::Sender<()> {
    let limit = std::env::var("JFS_TEST_WATCHDOG_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(WATCHDOG_DEFAULT);
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!(
                "WATCHDOG: test {name} still running after {limit:?}; aborting its FUSE mounts so it fails \
                 instead of hanging. Logs:\n{}",
                log_tails(&state.join("logs"), 25)
            );
            for (_, dev) in mounts_under(&root) {
                abort_fuse_connection(&dev);
            }
        }
    });
    tx
}

fn test_name() -> String {
    let t = thread::current();
    let raw = t.name().unwrap_or("test");
    let last = raw.rsplit("::").next().unwrap_or(raw);
    let clean: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' })
        .collect();
    clean.chars().take(40).collect()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Last `n` lines of every `*.log` in `dir`.
pub fn log_tails(dir: &Path, n: usize) -> String {
    let mut out = String::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let text = fs::read_to_string(&f).unwrap_or_default();
        out.push_str(&format!(
            "\n---- last {n} lines of {} ----\n{}\n",
            f.display(),
            tail(&text, n)
        ));
    }
    out
}

fn save_failure_logs(name: &str, root: &Path) {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dest = Path::new(FAILURE_LOG_DIR).join(format!("{name}-{stamp}"));
    if fs::create_dir_all(&dest).is_err() {
        return;
    }
    let mut logs: Vec<PathBuf> = fs::read_dir(root.join("state/logs"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    if let Ok(rd) = fs::read_dir(root) {
        logs.extend(
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension() == Some(OsStr::new("log"))),
        );
    }
    let _ = fs::copy(root.join("state/jfs.toml"), dest.join("jfs.toml"));
    for l in logs {
        if let Some(n) = l.file_name() {
            let _ = fs::copy(&l, dest.join(n));
        }
    }
    eprintln!("logs of the failed test copied to {}", dest.display());
}

// ------------------------------------------------------------------ data

/// Deterministic pseudo-random bytes (so a failure reproduces exactly).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = splitmix(seed ^ 0x6A09E667F3BCC909);
    while out.len() < len {
        x = splitmix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `sha256sum` of a file, as the tool prints it.
pub fn sha256(path: &Path) -> String {
    let out = run_cmd(Command::new("sha256sum").arg(path), CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.success(),
        "sha256sum {} failed:\n{}",
        path.display(),
        out.describe()
    );
    out.stdout.split_whitespace().next().unwrap_or_default().to_string()
}

/// Asserts two files have the same size and sha256; on a mismatch reports
/// the first differing byte offset (and which block it falls in).
pub fn assert_same_file(expected: &Path, actual: &Path) {
    let (me, ma) = (
        fs::metadata(expected).unwrap_or_else(|e| panic!("stat {}: {e}", expected.display())),
        fs::metadata(actual).unwrap_or_else(|e| panic!("stat {}: {e}", actual.display())),
    );
    let (he, ha) = (sha256(expected), sha256(actual));
    if me.len() == ma.len() && he == ha {
        return;
    }
    let mut detail = String::new();
    if let (Ok(mut a), Ok(mut b)) = (File::open(expected), File::open(actual)) {
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut off = 0u64;
        loop {
            let na = read_full(&mut a, &mut ba);
            let nb = read_full(&mut b, &mut bb);
            let n = na.min(nb);
            if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
                let at = off + i as u64;
                detail = format!(
                    "first difference at byte {at} (block {}, offset {} in it): expected {:#04x}, got {:#04x}",
                    at / BLOCK_SIZE,
                    at % BLOCK_SIZE,
                    ba[i],
                    bb[i]
                );
                break;
            }
            if na != nb {
                detail = format!("one file ends at byte {}", off + n as u64);
                break;
            }
            if n == 0 {
                break;
            }
            off += n as u64;
        }
    }
    panic!(
        "{} differs from {}: size {} vs {}, sha256 {he} vs {ha}; {detail}",
        actual.display(),
        expected.display(),
        me.len(),
        ma.len()
    );
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    n
}

/// Writes `data` to `path` and closes it, panicking with the path on error.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    drop(f);
}

/// A snapshot of a tree: relative path -> (type, mode, uid, gid, nlink for
/// non-directories, size for files, mtime in ns, symlink target). Used to
/// compare what `cp -a` / `tar` preserved.
pub fn tree_listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            let rel = p
                .strip_prefix(root)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else {
                "other"
            };
            let mut line = format!("{kind} mode={:o} uid={} gid={}", m.mode() & 0o7777, m.uid(), m.gid());
            if !ft.is_dir() {
                line.push_str(&format!(" nlink={}", m.nlink()));
            }
            if ft.is_file() {
                line.push_str(&format!(" size={}", m.len()));
            }
            line.push_str(&format!(" mtime={}.{:09}", m.mtime(), m.mtime_nsec()));
            if ft.is_symlink() {
                let t = fs::read_link(&p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()));
                line.push_str(&format!(" -> {}", t.display()));
            }
            if ft.is_dir() {
                stack.push(p);
            }
            out.insert(rel, line);
        }
    }
    out
}

/// Asserts two tree listings are equal, naming the first few differences.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let (a, b) = (tree_listing(expected), tree_listing(actual));
    if a == b {
        return;
    }
    let mut diffs = Vec::new();
    for (k, v) in &a {
        match b.get(k) {
            None => diffs.push(format!("missing: {k} ({v})")),
            Some(w) if w != v => diffs.push(format!("{k}:\n    expected {v}\n    got      {w}")),
            _ => {}
        }
    }
    for (k, w) in &b {
        if !a.contains_key(k) {
            diffs.push(format!("unexpected: {k} ({w})"));
        }
    }
    let n = diffs.len();
    diffs.truncate(20);
    panic!(
        "{} does not match {} ({n} differences; first {}):\n{}",
        actual.display(),
        expected.display(),
        diffs.len(),
        diffs.join("\n")
    );
}

// ------------------------------------------------------------------ errno

/// The errno of a failed call; panics (naming `what`) if it succeeded.
pub fn errno_of<T: Debug>(r: io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what} succeeded ({v:?}) but should have failed"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what} failed without an errno: {e}")),
    }
}

/// Asserts that `r` failed with exactly `expected`.
pub fn assert_errno<T: Debug>(r: io::Result<T>, expected: i32, what: &str) {
    let got = errno_of(r, what);
    assert_eq!(
        got,
        expected,
        "{what}: expected {} but got {} ({})",
        errno_name(expected),
        errno_name(got),
        io::Error::from_raw_os_error(got)
    );
}

pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::ENOTCONN => "ENOTCONN",
        libc::ENOTSUP => "ENOTSUP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        0 => "success",
        _ => "another errno",
    }
}

/// A path as a C string, for raw libc calls.
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path contains a NUL byte")
}

/// Turns a libc return value into an io::Result.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Runs `op` in a forked child with the given uid/gid and no supplementary
/// groups, and returns what `op` returned (0 or an errno; 255 if switching
/// user failed). `op` runs after fork() in a multi-threaded process: it must
/// only make raw syscalls on data prepared beforehand (no allocation, no
/// locks, no println!).
pub fn as_user(uid: u32, gid: u32, op: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes async-signal-safe syscalls before _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
    if pid == 0 {
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(255);
            }
            let rc = op();
            libc::_exit(rc.clamp(0, 255));
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status),
        "child running as uid {uid} died abnormally (status {status})"
    );
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 255, "could not switch to uid {uid} gid {gid} in the child");
    code
}

/// The calling thread's errno (safe to use in an [`as_user`] closure).
pub fn last_errno() -> i32 {
    // SAFETY: reading the thread-local errno.
    unsafe { *libc::__errno_location() }
}

// ------------------------------------------------------------------ added for the data-path tests

/// A namespace's block (= chunk) size and replication, as
/// `jfs admin list-namespaces` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub block_size: u64,
    pub replication: u64,
}

impl Cluster {
    /// Block size and replication of namespace `name` (`jfs admin
    /// list-namespaces`, whose rows read `NAME ID BLOCK-SIZE REPLICATION MODE`).
    pub fn namespace_info(&self, name: &str) -> NamespaceInfo {
        let conf = s(&self.conf());
        let out = self.jfs_ok(&["--conf", &conf, "admin", "list-namespaces"]);
        let row: Vec<&str> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .unwrap_or_else(|| panic!("no row for namespace {name:?} in `jfs admin list-namespaces`:\n{out}"));
        let num = |i: usize, what: &str| -> u64 {
            row.get(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("cannot read the {what} of {name:?} (column {i}) from:\n{out}"))
        };
        NamespaceInfo {
            block_size: num(2, "block size"),
            replication: num(3, "replication"),
        }
    }

    /// Data directories of the cluster's blockds (STATE/blockd1..3).
    pub fn blockd_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.state)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_dir()
                            && p.file_name()
                                .and_then(OsStr::to_str)
                                .is_some_and(|n| n.starts_with("blockd"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Total size and number of the block files (`*.blk`) under every
    /// blockd data directory: the space the cluster's file data occupies.
    pub fn block_file_bytes(&self) -> (u64, u64) {
        let (mut bytes, mut count) = (0u64, 0u64);
        let mut stack = self.blockd_dirs();
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let Ok(m) = fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if m.is_dir() {
                    stack.push(e.path());
                } else if m.is_file() && e.path().extension() == Some(OsStr::new("blk")) {
                    bytes += m.len();
                    count += 1;
                }
            }
        }
        (bytes, count)
    }
}

/// Closes `f` and returns what close(2) returned: on FUSE the flush of
/// buffered writes happens here, and dropping a `File` would hide its error.
pub fn close_checked(f: File) -> io::Result<()> {
    use std::os::unix::io::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: we own fd (into_raw_fd gave it up) and close it exactly once.
    check(unsafe { libc::close(fd) }).map(|_| ())
}

/// fallocate(2) on an open file.
pub fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) }).map(|_| ())
}

/// lseek(2) with any `whence` (SEEK_DATA / SEEK_HOLE included).
pub fn lseek(f: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

/// Reads `len` bytes at `offset` (fewer only at end of file), looping over
/// short reads as read(2) allows; errors are returned, not retried.
pub fn pread_full(f: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// None if `got == want`, else a description of the first difference
/// (offset, the bytes there, and the lengths) for an assertion message.
pub fn describe_difference(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let n = want.len().min(got.len());
    let at = (0..n).find(|&i| want[i] != got[i]);
    Some(match at {
        Some(i) => {
            let end = (i..n).find(|&j| want[j] == got[j]).unwrap_or(n);
            let show = |v: &[u8]| {
                v[i..(i + 16).min(v.len())]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            };
            format!(
                "lengths {} (expected) and {} (got); first difference at byte {i} (the differing run ends at {end}): \
                 expected {}.., got {}..",
                want.len(),
                got.len(),
                show(want),
                show(got)
            )
        }
        None => format!(
            "the first {n} bytes agree but the lengths differ: expected {}, got {}",
            want.len(),
            got.len()
        ),
    })
}

/// A small deterministic PRNG (splitmix64) for randomized tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed of a randomized test: `$JFS_TEST_SEED` if set, else derived from
/// the clock. Printed, so a failure can be replayed with JFS_TEST_SEED=<seed>.
pub fn test_seed(what: &str) -> u64 {
    let seed = match std::env::var("JFS_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("JFS_TEST_SEED={v:?} is not a decimal u64")),
        Err(_) => splitmix(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ std::process::id() as u64,
        ),
    };
    eprintln!("{what}: seed {seed} (replay with JFS_TEST_SEED={seed})");
    seed
}

/// A count from the environment (e.g. the number of operations of a stress
/// test), or `default`.
pub fn env_count(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a decimal number")),
        Err(_) => default,
    }
}

impl Cluster {
    /// [`Cluster::mount_second`] with another config file (e.g. a shorter
    /// `client.timeout-ms`).
    pub fn mount_second_with_conf(&self, conf: &Path, opts: &str) -> Mount {
        self.mount_second_full(conf, "default", opts, &[])
    }

    /// Mounts `namespace` with the config `conf` (another client
    /// certificate, say), like [`Cluster::mount_second`].
    pub fn mount_namespace(&self, conf: &Path, namespace: &str, opts: &str) -> Mount {
        self.mount_second_full(conf, namespace, opts, &[])
    }
}
