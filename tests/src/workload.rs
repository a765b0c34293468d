//! A metadata workload on two mounts, recorded call by call, for tests that
//! disturb the metad group while it runs (failover.rs: kills, SIGSTOP and
//! network partitions of the leader; membership.rs: nodes added, removed,
//! replaced and leadership handed over).
//!
//! [`Load::start`] runs the same load on two mounts of one namespace: the
//! main mount (kernel caches of 1 s) and a second one with `attr_timeout=0,
//! entry_timeout=0` ([`NO_KERNEL_CACHE`]), so that every stat there goes to
//! metad. Two threads per mount, each in a directory of its own, loop over
//! create + write + close, stat, rename of an older file (sometimes into a
//! subdirectory), unlink of an older file and, now and then, mkdir. Every
//! syscall is made exactly once and its result checked: an error, or a wrong
//! result, is recorded (op, path, errno, time since the fault) and fails the
//! test; nothing is retried. Each thread keeps a model (path -> content,
//! subdirectories, names it removed), which must match both mounts at the
//! end: listings exactly, every file byte for byte, no removed name back.
//!
//! Metadata must also stay linearizable: every worker owns a "register", a
//! file on the second mount whose size is its value, and sets it with
//! truncate(2) to 1, 2, 3 ... while a reader thread on the same mount stats
//! all registers in a loop. [`check_register`] then checks the recorded
//! history (invoke and completion instants of every write and read).
//!
//! A test records what it did to the cluster as [`Fault`]s and hands them,
//! with the [`Outcome`] of [`Load::stop`], to [`judge`]: it prints a summary
//! (per fault, the pause — from the fault to the first completion, on each
//! mount, of a call that had to reach metad and was made once the fault was
//! in effect — and the longest single syscall from the fault to 5 s after it
//! ended, or to the next fault; then percentiles, and latencies per kind of
//! call), then requires no failed call, both mounts matching every model, a
//! linearizable register history, and no syscall longer than
//! `JFS_TEST_FAILOVER_MAX_MS` (default 2000). `JFS_TEST_SEED` replays the
//! workload's choices (the interleaving differs from run to run, of course).

use crate::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Options of the second mount: no kernel entry or attribute cache, so every
/// lookup and stat reaches mountd, and mountd asks metad.
pub const NO_KERNEL_CACHE: &str = "attr_timeout=0,entry_timeout=0";

/// Index of the main mount (`c.mnt`, default 1 s kernel caches) and of the
/// second mount (no kernel caches) in the arrays below.
pub const MAIN: usize = 0;
pub const SECOND: usize = 1;
pub const MOUNT_NAMES: [&str; 2] = ["main", "second"];

pub const WORKERS_PER_MOUNT: usize = 2;
/// Files a worker holds; beyond this it unlinks one per round.
pub const KEEP_FILES: usize = 16;
/// Subdirectories a worker makes at most.
pub const MAX_SUBDIRS: usize = 6;
/// After a fault, the load runs at least this long before the test moves on.
pub const LOAD_AFTER_FAULT: Duration = Duration::from_secs(3);
/// Calls this long after a fault ended still count as "during the failover"
/// in the summary.
pub const FAULT_WINDOW: Duration = Duration::from_secs(5);
/// Deadline for the cluster to recover from one fault (new leader, rejoin).
pub const RECOVERY_DEADLINE: Duration = Duration::from_secs(90);

/// The longest any single syscall of the load may take.
pub fn max_syscall() -> Duration {
    Duration::from_millis(env_count("JFS_TEST_FAILOVER_MAX_MS", 2000))
}

/// A poisoned lock only means another thread panicked; its data is still
/// what we want to report.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------ recording calls

/// One completed syscall of the load.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub kind: &'static str,
    pub mount: usize,
    pub start: Instant,
    pub end: Instant,
    /// Whether the call cannot complete without metad (see [`reaches_metad`]).
    pub via_metad: bool,
}

impl Call {
    pub fn took(&self) -> Duration {
        self.end - self.start
    }
}

/// Whether a call of `kind` on `mount` always needs metad: a write only
/// fills mountd's buffer, and a stat on the main mount may be answered from
/// the kernel's attribute cache. The pause after a fault is measured on the
/// others, which cannot complete before the mount has found the new leader.
pub fn reaches_metad(kind: &str, mount: usize) -> bool {
    kind != "write" && !(kind == "stat" && mount == MAIN)
}

/// A syscall that failed or returned a wrong result.
#[derive(Debug, Clone)]
pub struct Failure {
    pub thread: String,
    pub op: &'static str,
    pub path: PathBuf,
    pub errno: Option<i32>,
    pub detail: String,
    pub start: Instant,
    pub end: Instant,
}

/// What every thread of the load shares with the test.
struct Shared {
    stop: AtomicBool,
    failures: Mutex<Vec<Failure>>,
}

/// The calls of one thread, readable by the test while the load runs.
struct ThreadLog {
    name: String,
    mount: usize,
    calls: Mutex<Vec<Call>>,
    /// Set when the thread has left its loop (stopped, or after a failure).
    finished: AtomicBool,
}

impl ThreadLog {
    /// Whether this thread has completed a call that needs metad and was
    /// made at or after `at`: proof that it got through the failover.
    fn through_since(&self, at: Instant) -> bool {
        // One thread's calls are sequential: newest last, by start as by end.
        lock(&self.calls)
            .iter()
            .rev()
            .take_while(|c| c.start >= at)
            .any(|c| c.via_metad)
    }
}

/// A call failed or gave a wrong result; it has been recorded, and the
/// thread stops (its model may no longer say what is on the mount).
struct Failed;

/// A load thread's handle on the recording.
struct Ctx {
    log: Arc<ThreadLog>,
    shared: Arc<Shared>,
}

impl Ctx {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// Makes one syscall on this thread's mount, once, and records it.
    fn call<T>(&self, kind: &'static str, path: &Path, f: impl FnOnce() -> io::Result<T>) -> Result<T, Failed> {
        self.call_on(self.log.mount, kind, path, f).map(|(v, _, _)| v)
    }

    /// [`Ctx::call`] on a given mount; also returns when the call was made
    /// and when it returned.
    fn call_on<T>(
        &self,
        mount: usize,
        kind: &'static str,
        path: &Path,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<(T, Instant, Instant), Failed> {
        let start = Instant::now();
        let r = f();
        let end = Instant::now();
        lock(&self.log.calls).push(Call {
            kind,
            mount,
            start,
            end,
            via_metad: reaches_metad(kind, mount),
        });
        match r {
            Ok(v) => Ok((v, start, end)),
            Err(e) => Err(self.fail(kind, path, e.raw_os_error(), e.to_string(), start, end)),
        }
    }

    /// Records that the last call (`op`) succeeded but returned a wrong result.
    fn wrong(&self, op: &'static str, path: &Path, detail: String) -> Failed {
        let last = lock(&self.log.calls).last().copied();
        let now = Instant::now();
        let (start, end) = last.map_or((now, now), |c| (c.start, c.end));
        self.fail(op, path, None, detail, start, end)
    }

    fn fail(
        &self,
        op: &'static str,
        path: &Path,
        errno: Option<i32>,
        detail: String,
        start: Instant,
        end: Instant,
    ) -> Failed {
        lock(&self.shared.failures).push(Failure {
            thread: self.log.name.clone(),
            op,
            path: path.to_path_buf(),
            errno,
            detail,
            start,
            end,
        });
        Failed
    }
}

// ------------------------------------------------------------------ the workload

/// A file the workload wrote: its content is `pattern(len, seed)`.
#[derive(Debug, Clone, Copy)]
pub struct FileSpec {
    pub len: usize,
    pub seed: u64,
}

/// What one worker believes its directory holds.
#[derive(Debug, Default)]
pub struct Model {
    /// Relative path -> content.
    pub files: BTreeMap<String, FileSpec>,
    /// Subdirectories (never removed).
    pub dirs: BTreeSet<String>,
    /// Names unlinked or renamed away; names are never reused.
    pub gone: BTreeSet<String>,
}

/// One write of a register: it was made at `invoke` and returned at
/// `complete` (None: it failed, so it may or may not have taken effect).
#[derive(Debug, Clone, Copy)]
pub struct RegWrite {
    pub invoke: Instant,
    pub complete: Option<Instant>,
    pub value: u64,
}

/// One read of a register (a stat; the value is st_size).
#[derive(Debug, Clone, Copy)]
pub struct RegRead {
    pub invoke: Instant,
    pub complete: Instant,
    pub value: u64,
}

struct Worker {
    ctx: Ctx,
    /// The worker's directory, on its own mount.
    dir: PathBuf,
    /// The worker's register, on the second mount.
    register: PathBuf,
    rng: Rng,
    model: Model,
    reg_writes: Vec<RegWrite>,
}

/// What a worker hands back when it stops.
pub struct WorkerResult {
    pub name: String,
    pub mount: usize,
    /// Its directory relative to the root of either mount.
    pub rel_dir: String,
    pub model: Model,
    pub reg_writes: Vec<RegWrite>,
    pub rounds: u64,
}

impl Worker {
    fn run(mut self, rel_dir: String) -> WorkerResult {
        let mut rounds = 0;
        while !self.ctx.stopping() {
            if self.round(rounds).is_err() {
                break;
            }
            rounds += 1;
        }
        self.ctx.log.finished.store(true, Ordering::Relaxed);
        WorkerResult {
            name: self.ctx.log.name.clone(),
            mount: self.ctx.log.mount,
            rel_dir,
            model: self.model,
            reg_writes: self.reg_writes,
            rounds,
        }
    }

    /// A fresh name (never used before by this worker) in its directory or
    /// in one of its subdirectories.
    fn new_name(&mut self, prefix: &str, i: u64) -> String {
        let name = format!("{prefix}{i:05}");
        if !self.model.dirs.is_empty() && self.rng.chance(40) {
            let k = self.rng.below(self.model.dirs.len() as u64) as usize;
            let d = self.model.dirs.iter().nth(k).expect("k < number of dirs");
            format!("{d}/{name}")
        } else {
            name
        }
    }

    /// A random file of the model other than `except`.
    fn pick_file(&mut self, except: &str) -> Option<String> {
        let names: Vec<&String> = self.model.files.keys().filter(|k| k.as_str() != except).collect();
        if names.is_empty() {
            return None;
        }
        let k = self.rng.below(names.len() as u64) as usize;
        Some(names[k].clone())
    }

    fn round(&mut self, i: u64) -> Result<(), Failed> {
        // A new file of a few KiB, closed with a checked close(2): that is
        // where mountd flushes the data and commits it in metad.
        let rel = self.new_name("f", i);
        let spec = FileSpec {
            len: self.rng.range(1, 8 << 10) as usize,
            seed: self.rng.next_u64(),
        };
        let data = pattern(spec.len, spec.seed);
        let path = self.dir.join(&rel);
        let mut f = self.ctx.call("create", &path, || {
            OpenOptions::new().write(true).create_new(true).open(&path)
        })?;
        // One write(2): a short write is a wrong result, not something to loop over.
        let n = self.ctx.call("write", &path, || f.write(&data))?;
        if n != data.len() {
            return Err(self
                .ctx
                .wrong("write", &path, format!("wrote {n} of {} bytes", data.len())));
        }
        self.ctx.call("close", &path, || close_checked(f))?;
        self.model.files.insert(rel.clone(), spec);

        let m = self.ctx.call("stat", &path, || fs::metadata(&path))?;
        if !m.is_file() || m.len() != spec.len as u64 {
            return Err(self.ctx.wrong(
                "stat",
                &path,
                format!(
                    "a file of {} bytes was just closed, stat says {:?} of {} bytes",
                    spec.len,
                    m.file_type(),
                    m.len()
                ),
            ));
        }

        // One round in three, an older file moves (maybe to another directory).
        if self.rng.chance(33) {
            if let Some(from_rel) = self.pick_file(&rel) {
                let to_rel = self.new_name("r", i);
                let (from, to) = (self.dir.join(&from_rel), self.dir.join(&to_rel));
                self.ctx.call("rename", &from, || fs::rename(&from, &to))?;
                let moved = self.model.files.remove(&from_rel).expect("picked from the model");
                self.model.files.insert(to_rel, moved);
                self.model.gone.insert(from_rel);
            }
        }

        if self.model.files.len() > KEEP_FILES {
            if let Some(victim) = self.pick_file(&rel) {
                let p = self.dir.join(&victim);
                self.ctx.call("unlink", &p, || fs::remove_file(&p))?;
                self.model.files.remove(&victim);
                self.model.gone.insert(victim);
            }
        }

        if i % 16 == 3 && self.model.dirs.len() < MAX_SUBDIRS {
            let d = format!("d{i:05}");
            let p = self.dir.join(&d);
            self.ctx.call("mkdir", &p, || fs::create_dir(&p))?;
            self.model.dirs.insert(d);
        }

        // The register: truncate(2) to the next value, on the second mount
        // (whichever mount this worker's files are on).
        let value = self.reg_writes.len() as u64 + 1;
        let reg = self.register.clone();
        let c = cpath(&reg);
        let invoke = Instant::now();
        // SAFETY: plain syscall on a NUL-terminated path that outlives it.
        let r = self.ctx.call_on(SECOND, "truncate", &reg, || {
            check(unsafe { libc::truncate(c.as_ptr(), value as libc::off_t) })
        });
        match r {
            Ok((_, start, end)) => self.reg_writes.push(RegWrite {
                invoke: start,
                complete: Some(end),
                value,
            }),
            Err(Failed) => {
                // It may have taken effect: readers may see it, none must.
                self.reg_writes.push(RegWrite {
                    invoke,
                    complete: None,
                    value,
                });
                return Err(Failed);
            }
        }
        Ok(())
    }
}

/// The reader of the registers: stats each in turn on the second mount
/// until told to stop. Returns the reads of each register.
fn read_registers(ctx: Ctx, registers: Vec<PathBuf>) -> Vec<Vec<RegRead>> {
    let mut reads = vec![Vec::new(); registers.len()];
    'load: while !ctx.stopping() {
        for (k, r) in registers.iter().enumerate() {
            match ctx.call_on(SECOND, "stat-register", r, || fs::metadata(r)) {
                Ok((m, invoke, complete)) => reads[k].push(RegRead {
                    invoke,
                    complete,
                    value: m.len(),
                }),
                Err(Failed) => break 'load,
            }
        }
    }
    ctx.log.finished.store(true, Ordering::Relaxed);
    reads
}

/// The running load: WORKERS_PER_MOUNT workers on each mount and one reader.
pub struct Load {
    t0: Instant,
    seed: u64,
    shared: Arc<Shared>,
    logs: Vec<Arc<ThreadLog>>,
    workers: Vec<JoinHandle<WorkerResult>>,
    /// None once joined by [`Load::stop`].
    reader: Option<JoinHandle<Vec<Vec<RegRead>>>>,
    register_names: Vec<String>,
}

/// Everything the load did, once it has stopped.
pub struct Outcome {
    pub t0: Instant,
    pub seed: u64,
    pub workers: Vec<WorkerResult>,
    /// Every call of every thread, by start.
    pub calls: Vec<Call>,
    pub failures: Vec<Failure>,
    /// Per register: its name, writes and reads.
    pub registers: Vec<(String, Vec<RegWrite>, Vec<RegRead>)>,
}

impl Load {
    pub fn start(c: &Cluster, second: &Mount, seed: u64) -> Load {
        let mounts = [c.mnt.clone(), second.path.clone()];
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
        });
        let reg_dir = second.path("registers");
        fs::create_dir(&reg_dir).unwrap_or_else(|e| panic!("mkdir {}: {e}{}", reg_dir.display(), c.log_tails()));
        let new_log = |name: String, mount: usize| {
            Arc::new(ThreadLog {
                name,
                mount,
                calls: Mutex::new(Vec::new()),
                finished: AtomicBool::new(false),
            })
        };
        let mut logs = Vec::new();
        let mut registers = Vec::new();
        let mut register_names = Vec::new();
        let mut prepared = Vec::new();
        for (m, root) in mounts.iter().enumerate() {
            for w in 0..WORKERS_PER_MOUNT {
                let name = format!("{}-w{w}", MOUNT_NAMES[m]);
                let dir = root.join(&name);
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}{}", dir.display(), c.log_tails()));
                let register = reg_dir.join(&name);
                write_file(&register, b"");
                let log = new_log(name.clone(), m);
                logs.push(log.clone());
                registers.push(register.clone());
                register_names.push(name.clone());
                let id = (m * WORKERS_PER_MOUNT + w) as u64 + 1;
                prepared.push((
                    name.clone(),
                    Worker {
                        ctx: Ctx {
                            log,
                            shared: shared.clone(),
                        },
                        dir,
                        register,
                        rng: Rng::new(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                        model: Model::default(),
                        reg_writes: Vec::new(),
                    },
                ));
            }
        }
        let t0 = Instant::now();
        let workers = prepared
            .into_iter()
            .map(|(name, w)| {
                thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || w.run(name))
                    .expect("spawn a workload thread")
            })
            .collect();
        let reader_log = new_log("reader".into(), SECOND);
        logs.push(reader_log.clone());
        let ctx = Ctx {
            log: reader_log,
            shared: shared.clone(),
        };
        let reader = thread::Builder::new()
            .name("reader".into())
            .spawn(move || read_registers(ctx, registers))
            .expect("spawn the register reader");
        Load {
            t0,
            seed,
            shared,
            logs,
            workers,
            reader: Some(reader),
            register_names,
        }
    }

    pub fn failed(&self) -> bool {
        !lock(&self.shared.failures).is_empty()
    }

    /// Ok when every thread has completed a call needing metad made at or
    /// after `at` (or when something failed: then there is nothing to wait for).
    pub fn through_since(&self, at: Instant) -> Result<(), String> {
        if self.failed() {
            return Ok(());
        }
        let behind: Vec<&str> = self
            .logs
            .iter()
            .filter(|l| !l.finished.load(Ordering::Relaxed) && !l.through_since(at))
            .map(|l| l.name.as_str())
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} s after the mark, no metadata call made since has completed on: {}",
                at.elapsed().as_secs(),
                behind.join(", ")
            ))
        }
    }

    /// Waits until every thread is under way.
    pub fn wait_running(&self) {
        wait_until(
            "every workload thread to complete a metadata call",
            Duration::from_secs(60),
            || self.through_since(self.t0),
        );
    }

    pub fn stop(mut self) -> Outcome {
        self.shared.stop.store(true, Ordering::Relaxed);
        let workers: Vec<WorkerResult> = std::mem::take(&mut self.workers)
            .into_iter()
            .map(|h| h.join().expect("a workload thread panicked"))
            .collect();
        let reads = self
            .reader
            .take()
            .map(|h| h.join().expect("the register reader panicked"))
            .unwrap_or_default();
        let mut calls: Vec<Call> = self.logs.iter().flat_map(|l| lock(&l.calls).clone()).collect();
        calls.sort_by_key(|c| c.start);
        let registers = self
            .register_names
            .iter()
            .zip(reads)
            .map(|(name, reads)| {
                let w = workers
                    .iter()
                    .find(|w| &w.name == name)
                    .expect("every register has its worker");
                (name.clone(), w.reg_writes.clone(), reads)
            })
            .collect();
        let failures = lock(&self.shared.failures).clone();
        Outcome {
            t0: self.t0,
            seed: self.seed,
            workers,
            calls,
            failures,
            registers,
        }
    }
}

/// A load dropped without [`Load::stop`] (the test panicked) tells its
/// threads to stop, so that the cluster's cleanup finds the mounts idle
/// (a thread stuck in a syscall still finishes it).
impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------ faults and the cluster

/// One fault injected while the load ran.
pub struct Fault {
    pub label: String,
    /// When it was injected (just before the signal was sent).
    pub start: Instant,
    /// When it was seen to be in effect (the process gone, or stopped): a
    /// call made after this cannot have been answered by the faulty node.
    pub in_effect: Instant,
    /// When it was lifted (= start for a kill: the failover starts at once).
    pub end: Instant,
    /// The leader that took over, as `jfs metastatus` named it.
    pub new_leader: Option<usize>,
}

/// One row of `jfs metastatus`: node, role, term, applied index.
#[derive(Debug)]
pub struct NodeRow {
    pub node: String,
    pub role: String,
    pub term: Option<u64>,
    pub applied: Option<u64>,
}

/// `jfs metastatus`, parsed (NODE  RPC-ADDRESS  ROLE  TERM  APPLIED), and its text.
pub fn metastatus(c: &Cluster) -> (Vec<NodeRow>, String) {
    let out = c.jfs(&["metastatus", "--dir", &c.state.to_string_lossy()]);
    let rows = out
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5).then(|| NodeRow {
                node: f[0].to_string(),
                role: f[2].to_string(),
                term: f[3].parse().ok(),
                applied: f[4].parse().ok(),
            })
        })
        .collect();
    (rows, format!("{}{}", out.stdout, out.stderr))
}

/// Id of the node `jfs metastatus` shows as leader (any id, also of nodes
/// added after the cluster started).
pub fn leader_id(c: &Cluster) -> Option<u64> {
    let (rows, _) = metastatus(c);
    let mut leaders = rows.iter().filter(|r| r.role == "leader");
    match (leaders.next(), leaders.next()) {
        (Some(r), None) => r.node.parse().ok(),
        _ => None,
    }
}

/// Waits until `jfs metastatus` names a leader among nodes 1..=3.
pub fn wait_leader(c: &Cluster) -> usize {
    wait_until("`jfs metastatus` to name a leader", Duration::from_secs(60), || {
        c.leader_index()
            .ok_or_else(|| "no leader in `jfs metastatus`".to_string())
    })
}

/// Waits until all three nodes answer in one term, one leader and two
/// followers, and every node has applied what the leader had applied when
/// that was first seen: the restarted node has caught up, so the next fault
/// starts from a healthy group.
pub fn wait_all_three_up(c: &Cluster, what: &str) {
    let mut target: Option<u64> = None;
    wait_until(what, RECOVERY_DEADLINE, || {
        let (rows, text) = metastatus(c);
        let leaders = rows.iter().filter(|r| r.role == "leader").count();
        let followers = rows.iter().filter(|r| r.role == "follower").count();
        let terms: BTreeSet<Option<u64>> = rows.iter().map(|r| r.term).collect();
        if rows.len() != 3 || leaders != 1 || followers != 2 || terms.len() != 1 {
            return Err(format!("not 1 leader + 2 followers in one term:\n{text}"));
        }
        let leader_applied = rows
            .iter()
            .find(|r| r.role == "leader")
            .and_then(|r| r.applied)
            .ok_or_else(|| format!("no applied index for the leader:\n{text}"))?;
        let t = *target.get_or_insert(leader_applied);
        let behind: Vec<&str> = rows
            .iter()
            .filter(|r| r.applied.is_none_or(|a| a < t))
            .map(|r| r.node.as_str())
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(format!("node(s) {behind:?} have not applied index {t} yet:\n{text}"))
        }
    })
}

// ------------------------------------------------------------------ judging

pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

pub fn at(t0: Instant, t: Instant) -> String {
    format!("t+{:.3} s", t.saturating_duration_since(t0).as_secs_f64())
}

/// Where a call (or a failure) from `start` to `end` stands relative to the
/// faults: "1.234 s after <fault>", or "in flight when <fault> hit (made 5 ms
/// before it)".
pub fn since_fault(faults: &[Fault], start: Instant, end: Instant) -> String {
    match faults.iter().rev().find(|f| f.start <= end) {
        Some(f) if f.start > start => format!(
            "in flight when {} hit (made {} before it)",
            f.label,
            ms(f.start - start)
        ),
        Some(f) => format!("made {:.3} s after {}", (start - f.start).as_secs_f64(), f.label),
        None => "made before any fault".into(),
    }
}

pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The pause a fault caused on one mount: from the fault to the first
/// completion of a call on that mount that needed metad and was made once
/// the fault was in effect. (A call made between the signal and the death
/// of the process may still be answered by it; it proves nothing.)
pub fn pause(calls: &[Call], fault: &Fault, mount: usize) -> Option<Duration> {
    calls
        .iter()
        .filter(|c| c.mount == mount && c.via_metad && c.start >= fault.in_effect)
        .map(|c| c.end - fault.start)
        .min()
}

/// The longest call that ran at some point between the fault and
/// FAULT_WINDOW after it was lifted, leaving out calls still running when
/// the next fault hit (they belong to that one).
pub fn longest_during(calls: &[Call], fault: &Fault, next: Option<&Fault>) -> Option<Call> {
    let until = fault.end + FAULT_WINDOW;
    calls
        .iter()
        .filter(|c| c.end >= fault.start && c.start < until && next.is_none_or(|n| c.end < n.start))
        .max_by_key(|c| c.took())
        .copied()
}

pub fn describe_call(c: &Call, when: String) -> String {
    format!(
        "{} ({} on the {} mount, {when})",
        ms(c.took()),
        c.kind,
        MOUNT_NAMES[c.mount]
    )
}

/// When a call was made relative to one fault ("12 ms before the fault").
pub fn relative_to(c: &Call, fault: &Fault) -> String {
    if c.start >= fault.start {
        format!("made {} after the fault", ms(c.start - fault.start))
    } else {
        format!("made {} before the fault", ms(fault.start - c.start))
    }
}

/// The test file running (the test executable is `<file>-<hash>`), for the
/// summary's title.
fn suite_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.split('-').next().map(str::to_string))
        .unwrap_or_else(|| "workload".into())
}

/// Prints what docs/PERFORMANCE.md needs; returns the longest call of the run.
pub fn print_summary(title: &str, out: &Outcome, faults: &[Fault]) -> Option<Call> {
    let mut s = format!(
        "\n==== {}: {title} (seed {}, {} worker(s) per mount + 1 register reader) ====\n",
        suite_name(),
        out.seed,
        WORKERS_PER_MOUNT
    );
    s.push_str(
        "| fault | new leader | pause main | pause second | longest syscall (fault .. +5 s, or the next fault) |\n",
    );
    s.push_str("|---|---|---|---|---|\n");
    let mut pauses = Vec::new();
    let mut longest = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        let p: Vec<String> = [MAIN, SECOND]
            .iter()
            .map(|&m| match pause(&out.calls, f, m) {
                Some(d) => {
                    pauses.push(d);
                    ms(d)
                }
                None => "none completed".into(),
            })
            .collect();
        let l = longest_during(&out.calls, f, faults.get(i + 1));
        if let Some(c) = &l {
            longest.push(c.took());
        }
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            f.label,
            f.new_leader.map_or("?".into(), |n| format!("metad{n}")),
            p[0],
            p[1],
            l.map_or("-".into(), |c| describe_call(&c, relative_to(&c, f)))
        ));
    }
    s.push_str(
        "pause: from the fault to the first completion, on that mount, of a call that needs metad and was made \
         once the fault was in effect (the process gone, stopped or cut off; for a membership change, once it began)\n",
    );
    pauses.sort();
    longest.sort();
    s.push_str(&format!(
        "pause (per fault and mount): p50 {}, max {}; longest syscall per fault: p50 {}, max {}\n",
        ms(percentile(&pauses, 0.5)),
        ms(percentile(&pauses, 1.0)),
        ms(percentile(&longest, 0.5)),
        ms(percentile(&longest, 1.0)),
    ));
    let mut kinds: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for c in &out.calls {
        kinds.entry(c.kind).or_default().push(c.took());
    }
    let mut all: Vec<Duration> = out.calls.iter().map(Call::took).collect();
    all.sort();
    s.push_str(&format!(
        "all {} syscalls over {:.1} s: p50 {:.2} ms, p99 {:.1} ms, max {}\n",
        all.len(),
        out.calls
            .last()
            .map_or(0.0, |c| c.end.saturating_duration_since(out.t0).as_secs_f64()),
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        ms(percentile(&all, 1.0)),
    ));
    for (kind, mut v) in kinds {
        v.sort();
        s.push_str(&format!(
            "  {kind:<14} n={:<6} p50 {:>7.2} ms  p99 {:>8.1} ms  max {:>6}\n",
            v.len(),
            percentile(&v, 0.5).as_secs_f64() * 1e3,
            percentile(&v, 0.99).as_secs_f64() * 1e3,
            ms(percentile(&v, 1.0)),
        ));
    }
    for w in &out.workers {
        s.push_str(&format!(
            "  {}: {} rounds, holds {} files in {} subdirectories, removed {} names\n",
            w.name,
            w.rounds,
            w.model.files.len(),
            w.model.dirs.len(),
            w.model.gone.len()
        ));
    }
    eprintln!("{s}");
    out.calls.iter().max_by_key(|c| c.took()).copied()
}

/// Everything under `dir`, as "dir a", "file a/f00001" lines.
pub fn listing(dir: &Path) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|e| format!("read_dir {}: {e}", d.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("read_dir {}: {e}", d.display()))?;
            let p = e.path();
            let ft = e
                .file_type()
                .map_err(|e| format!("file type of {}: {e}", p.display()))?;
            let rel = p
                .strip_prefix(dir)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            if ft.is_dir() {
                out.insert(format!("dir {rel}"));
                stack.push(p);
            } else if ft.is_file() {
                out.insert(format!("file {rel}"));
            } else {
                out.insert(format!("other {rel}"));
            }
        }
    }
    Ok(out)
}

/// The model's view of the same, for comparison with [`listing`].
pub fn model_listing(m: &Model) -> BTreeSet<String> {
    m.dirs
        .iter()
        .map(|d| format!("dir {d}"))
        .chain(m.files.keys().map(|f| format!("file {f}")))
        .collect()
}

/// Compares every worker's model with both mounts; returns the differences.
pub fn verify_models(mounts: &[PathBuf; 2], out: &Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    for w in &out.workers {
        let want = model_listing(&w.model);
        for (m, root) in mounts.iter().enumerate() {
            let dir = root.join(&w.rel_dir);
            let whose = format!(
                "{} (written through the {} mount), read on the {} mount",
                w.name, MOUNT_NAMES[w.mount], MOUNT_NAMES[m]
            );
            match listing(&dir) {
                Ok(got) if got == want => {}
                Ok(got) => {
                    let missing: Vec<&String> = want.difference(&got).collect();
                    let extra: Vec<&String> = got.difference(&want).collect();
                    problems.push(format!(
                        "{whose}: listing differs from the model: missing {missing:?}, unexpected {extra:?}"
                    ));
                }
                Err(e) => problems.push(format!("{whose}: {e}")),
            }
            for (rel, spec) in &w.model.files {
                let p = dir.join(rel);
                match fs::read(&p) {
                    Ok(got) => {
                        if let Some(d) = describe_difference(&pattern(spec.len, spec.seed), &got) {
                            problems.push(format!("{whose}: {} has the wrong content: {d}", p.display()));
                        }
                    }
                    Err(e) => problems.push(format!("{whose}: read {}: {e}", p.display())),
                }
            }
            for rel in &w.model.gone {
                let p = dir.join(rel);
                match fs::symlink_metadata(&p) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Ok(_) => problems.push(format!(
                        "{whose}: {} exists, but it was unlinked or renamed away",
                        p.display()
                    )),
                    Err(e) => problems.push(format!("{whose}: lstat {}: {e} (expected ENOENT)", p.display())),
                }
            }
        }
    }
    problems
}

/// Checks the load's outcome: no failed call, both mounts match every
/// model, the registers' history is linearizable, and no call took longer
/// than the limit. Prints the summary first, so the numbers are there
/// whatever fails.
pub fn judge(c: &Cluster, second: &Mount, title: &str, out: &Outcome, faults: &[Fault]) {
    let limit = max_syscall();
    let longest = print_summary(title, out, faults);

    if !out.failures.is_empty() {
        let lines: Vec<String> = out
            .failures
            .iter()
            .map(|f| {
                format!(
                    "  {}: {} {}: {} ({}), errno {}; made {}, returned after {}, {}",
                    f.thread,
                    f.op,
                    f.path.display(),
                    f.detail,
                    f.errno.map_or("wrong result", errno_name),
                    f.errno.map_or("-".into(), |e| e.to_string()),
                    at(out.t0, f.start),
                    ms(f.end - f.start),
                    since_fault(faults, f.start, f.end)
                )
            })
            .collect();
        panic!(
            "{} syscall(s) failed during {title} (each was made once; none may fail):\n{}{}",
            lines.len(),
            lines.join("\n"),
            c.log_tails()
        );
    }

    let problems = verify_models(&[c.mnt.clone(), second.path.clone()], out);
    assert!(
        problems.is_empty(),
        "after {title}, the mounts disagree with what the workload did ({} problem(s); first 20):\n{}{}",
        problems.len(),
        problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        c.log_tails()
    );

    let mut violations = Vec::new();
    let (mut nw, mut nr) = (0, 0);
    for (name, writes, reads) in &out.registers {
        nw += writes.len();
        nr += reads.len();
        violations.extend(check_register(name, 0, writes, reads, out.t0));
    }
    eprintln!(
        "linearizability of {} registers: {nw} writes, {nr} reads, {} violation(s)",
        out.registers.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "the registers' history is not linearizable during {title} ({} violation(s); first 20; faults: {}):\n{}{}",
        violations.len(),
        faults
            .iter()
            .map(|f| format!("{} at {}", f.label, at(out.t0, f.start)))
            .collect::<Vec<_>>()
            .join(", "),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        c.log_tails()
    );

    if let Some(l) = longest {
        assert!(
            l.took() < limit,
            "the longest syscall during {title} took {}, over the limit of {} (JFS_TEST_FAILOVER_MAX_MS)",
            describe_call(&l, since_fault(faults, l.start, l.end)),
            ms(limit)
        );
    }
}

// ------------------------------------------------------------------ linearizability

/// Checks the history of one register whose writes set increasing values
/// (one writer, so each write starts after the previous one returned).
/// `initial` is its value before any write. A history is linearizable, for
/// such a register, when every read satisfies:
///
/// 1. not stale: its value is >= the value of every write that completed
///    before the read was invoked;
/// 2. not from the future: its value is <= the largest value whose write was
///    invoked before the read completed;
/// 3. never back: its value is >= the value of every read that completed
///    before this one was invoked (two reads may both overlap one write; the
///    first may see it, but then the second must too).
///
/// Returns one description per violation, with times relative to `t0`.
pub fn check_register(name: &str, initial: u64, writes: &[RegWrite], reads: &[RegRead], t0: Instant) -> Vec<String> {
    // Each list sorted by its instant, with a running maximum of the values,
    // answers "the largest value among those before instant t" by bisection.
    fn sorted_with_max(mut v: Vec<(Instant, u64)>, initial: u64) -> (Vec<(Instant, u64)>, Vec<u64>) {
        v.sort_by_key(|e| e.0);
        let mut m = initial;
        let max = v
            .iter()
            .map(|e| {
                m = m.max(e.1);
                m
            })
            .collect();
        (v, max)
    }
    fn largest_before(list: &(Vec<(Instant, u64)>, Vec<u64>), initial: u64, inclusive: bool, t: Instant) -> u64 {
        let k = list.0.partition_point(|e| if inclusive { e.0 <= t } else { e.0 < t });
        if k == 0 {
            initial
        } else {
            list.1[k - 1]
        }
    }
    let completed = sorted_with_max(
        writes.iter().filter_map(|w| Some((w.complete?, w.value))).collect(),
        initial,
    );
    let invoked = sorted_with_max(writes.iter().map(|w| (w.invoke, w.value)).collect(), initial);
    let read_ends = sorted_with_max(reads.iter().map(|r| (r.complete, r.value)).collect(), 0);
    let span = |a: Instant, b: Instant| format!("[{} .. {}]", at(t0, a), at(t0, b));

    let mut violations = Vec::new();
    for r in reads {
        let what = format!("register {name}: read {} saw {}", span(r.invoke, r.complete), r.value);
        let floor = largest_before(&completed, initial, false, r.invoke);
        if r.value < floor {
            let w = writes
                .iter()
                .find(|w| w.value == floor)
                .and_then(|w| Some(format!(" {}", span(w.invoke, w.complete?))))
                .unwrap_or_default();
            violations.push(format!(
                "{what}: stale, the write of {floor}{w} had completed before the read began"
            ));
        }
        let ceiling = largest_before(&invoked, initial, true, r.complete);
        if r.value > ceiling {
            violations.push(format!(
                "{what}: ahead of every write, the largest value written by then was {ceiling}"
            ));
        }
        let earlier = largest_before(&read_ends, 0, false, r.invoke);
        if r.value < earlier {
            let e = reads
                .iter()
                .find(|e| e.value == earlier && e.complete < r.invoke)
                .map_or(String::new(), |e| format!(" {}", span(e.invoke, e.complete)));
            violations.push(format!(
                "{what}: went back, an earlier read{e} had already seen {earlier}"
            ));
        }
    }
    violations
}

/// Held by each timed fault test for its whole run: within one test binary
/// (which `cargo test` runs with two threads in CI) two clusters under load
/// on a 2-core machine would measure each other, not the failover.
pub fn one_timed_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
