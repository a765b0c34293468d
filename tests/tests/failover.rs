//! Metadata high availability: losing the metad leader costs the mounts a
//! pause, never a failed syscall, and never an acknowledged change.
//!
//! Every load test runs the workload of [`jfs_tests::workload`] on two
//! mounts of one namespace (two threads per mount doing create + write +
//! close, stat, rename, unlink and mkdir, every syscall made once and
//! checked, each thread with a model that must match both mounts at the
//! end, and registers whose history must be linearizable) while the leader
//! is taken away:
//!
//! * `kill_9_the_leader_five_times_under_load`: five times, `kill -9` the
//!   leader, keep the load going until a new leader is known, 3 s have passed
//!   and every thread has completed a metadata call made after the kill, then
//!   restart the node and wait until `jfs metastatus` shows all three nodes
//!   in one term with the restarted one caught up.
//! * `sigstop_the_leader_for_ten_seconds`: SIGSTOP the leader for 10 s (its
//!   sockets stay open: calls to it hang rather than fail); every thread must
//!   get a metadata call through while it is stopped. Then SIGCONT: the old
//!   leader, waking up as leader of an old term, must step down without
//!   serving anything stale, and rejoin as a follower.
//! * `partition_the_leader_for_ten_seconds`: the leader keeps running but is
//!   cut off from everyone for 10 s by an nftables table of the test's own
//!   ([`Partition`]): packets to and from its client and Raft ports are
//!   dropped, and so are those of the connections it opened itself, so
//!   established connections hang as in a real partition. Every thread must
//!   get a metadata call through while it is cut off; once the table is
//!   gone, the old leader must step down and rejoin as a follower.
//! * `the_linearizability_checker_finds_bad_histories`: the checker, fed
//!   hand-made histories, finds each kind of violation and accepts a good one.
//!
//! The load tests print a summary for docs/PERFORMANCE.md: per fault, the
//! pause (from the fault to the first completion, on each mount, of a call
//! that had to reach metad and was made once the fault was in effect) and
//! the longest single syscall from the fault to 5 s after it ended (or to
//! the next fault); then percentiles, and latencies per kind of call.
//! The longest syscall of the whole run must stay under
//! `JFS_TEST_FAILOVER_MAX_MS` (default 2000). `JFS_TEST_SEED` replays the
//! workload's choices (the interleaving differs from run to run, of course).

use jfs_tests::workload::*;
use jfs_tests::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long the SIGSTOP test keeps the leader stopped.
const STOP_FOR: Duration = Duration::from_secs(10);
/// How long the partition test keeps the leader cut off.
const PARTITION_FOR: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ faults

/// The scheduler state of a process ('R', 'S', 'T' for stopped ...).
fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A SIGSTOPped daemon; SIGCONT on drop, also when the test panics, so that
/// the cluster's cleanup can stop it.
struct Stopped<'a> {
    c: &'a Cluster,
    name: String,
    /// Just before SIGSTOP was sent.
    at: Instant,
    /// When the process was seen stopped.
    in_effect: Instant,
}

impl<'a> Stopped<'a> {
    fn new(c: &'a Cluster, name: &str) -> Stopped<'a> {
        let pid = c.live_pid(name);
        let at = Instant::now();
        c.signal(name, libc::SIGSTOP);
        let mut s = Stopped {
            c,
            name: name.to_string(),
            at,
            in_effect: at,
        };
        wait_for(
            &format!("{name} (pid {pid}) to be stopped"),
            Duration::from_secs(10),
            || process_state(pid) == Some('T'),
        );
        s.in_effect = Instant::now();
        s
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.c.pid(&self.name) {
            // SAFETY: plain syscall on a daemon of this test's cluster.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// Where the unified (v2) cgroup hierarchy is mounted, and the path of the
/// mount's root within the hierarchy (`/` unless in a cgroup namespace).
fn cgroup2_mount() -> Option<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = left.split(' ').collect();
        Some((PathBuf::from(f.get(4)?), f.get(3)?.to_string()))
    })
}

/// The local (address, port) of every TCP socket process `pid` holds open:
/// its listeners, the connections it accepted and those it opened itself.
fn tcp_sockets_of(pid: i32) -> BTreeSet<(String, u16)> {
    let inodes: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| {
                let target = fs::read_link(e.ok()?.path()).ok()?;
                let t = target.to_str()?;
                Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect()
        })
        .unwrap_or_default();
    let table = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = l.split_whitespace().collect();
            if !inodes.contains(*f.get(9)?) {
                return None;
            }
            let (addr, port) = f.get(1)?.split_once(':')?;
            let a = u32::from_str_radix(addr, 16).ok()?.to_le_bytes();
            let port = u16::from_str_radix(port, 16).ok()?;
            Some((format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]), port))
        })
        .collect()
}

static PARTITIONS: AtomicU32 = AtomicU32::new(0);

/// One metad cut off from every other process with nftables, while it keeps
/// running: an `inet` table of this test's own (named after the test
/// process's pid) drops, in the input and output hooks, every TCP packet to
/// or from the node's client and Raft ports on the cluster's address
/// (clients, blockds and the other metads cannot reach it) and every packet
/// of the connections it opened itself (it cannot reach them). Every daemon
/// shares one address, and the node's own connections leave from ephemeral
/// ports of 127.0.0.1, so those are matched by socket: the ones open when
/// the partition starts by their local address and port (a set, topped up
/// by [`Partition::refresh`]), and those it opens later by their cgroup (the
/// node is moved into a cgroup v2 of its own for the partition). Nothing
/// answers with a reset: established connections hang, as in a real
/// partition. The table is deleted and the node moved back to its cgroup on
/// drop, also when the test panics.
struct Partition {
    table: String,
    /// Daemon name (metad2) and pid.
    name: String,
    pid: i32,
    /// The cgroup the node was moved into, and the one it came from.
    cgroup: PathBuf,
    home: PathBuf,
    /// Just before the rules were loaded, and just after.
    at: Instant,
    in_effect: Instant,
}

impl Partition {
    fn new(c: &Cluster, n: usize) -> Partition {
        let name = format!("metad{n}");
        let pid = c.live_pid(&name);
        let (rpc, raft) = c.metad_addrs(n as u32);
        let port = |a: &str| a.rsplit_once(':').map(|(_, p)| p.to_string()).expect("HOST:PORT");
        let (rpc_port, raft_port) = (port(&rpc), port(&raft));
        let seq = PARTITIONS.fetch_add(1, Ordering::Relaxed);
        let table = format!("jfs_test_partition_{}_{seq}", std::process::id());

        // A cgroup of its own, so that the sockets it opens from now on can
        // be matched (nft names cgroups relative to /sys/fs/cgroup).
        let (mount, root) = cgroup2_mount().expect(
            "no cgroup2 hierarchy in /proc/self/mountinfo: the partition test matches the node's new \
             connections by their cgroup v2",
        );
        let rel_mount = mount
            .strip_prefix("/sys/fs/cgroup")
            .unwrap_or_else(|_| panic!("cgroup2 is mounted at {}, outside /sys/fs/cgroup", mount.display()))
            .to_path_buf();
        let dir_name = format!("jfs-test-partition-{}-{seq}", std::process::id());
        let cgroup = mount.join(&dir_name);
        let level = Path::new(&root).components().count(); // "/" counts 1: the new cgroup's depth
        let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_else(|| panic!("{name} (pid {pid}) has no cgroup v2 in /proc/{pid}/cgroup:\n{own}"));
        let home = mount.join(own.trim().trim_start_matches('/'));
        fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
        let mut p = Partition {
            table,
            name: name.clone(),
            pid,
            cgroup,
            home,
            at: Instant::now(),
            in_effect: Instant::now(),
        };
        fs::write(p.cgroup.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {name} (pid {pid}) into {}: {e}", p.cgroup.display()));

        let cg_path = rel_mount.join(&dir_name);
        let ip = &c.ip;
        let mut rules = String::new();
        for hook in ["input", "output"] {
            rules.push_str(&format!(
                "  chain {hook} {{\n    type filter hook {hook} priority -10; policy accept;\n    \
                 ip daddr {ip} tcp dport {{ {rpc_port}, {raft_port} }} drop\n    \
                 ip saddr {ip} tcp sport {{ {rpc_port}, {raft_port} }} drop\n    \
                 ip daddr . tcp dport @socks drop\n    ip saddr . tcp sport @socks drop\n"
            ));
            if hook == "output" {
                // New sockets of the node: nothing they send leaves, so
                // nothing comes back to them either.
                rules.push_str(&format!(
                    "    socket cgroupv2 level {level} \"{}\" drop\n",
                    cg_path.display()
                ));
            }
            rules.push_str("  }\n");
        }
        let script = format!(
            "table inet {t} {{\n  set socks {{ type ipv4_addr . inet_service; }}\n{rules}}}\n{}",
            add_elements(&p.table, &tcp_sockets_of(pid)),
            t = p.table
        );
        p.at = Instant::now();
        nft_script(c, &p.table, &script);
        p.in_effect = Instant::now();
        // A socket created just before the move and bound after the scan.
        p.refresh(c);
        eprintln!(
            "{name} (pid {pid}) cut off by nftables table inet {} (ports {rpc_port} and {raft_port} on {ip}, \
             its own connections, cgroup {}):\n{}",
            p.table,
            cg_path.display(),
            nft_list(&p.table)
        );
        p
    }

    /// Adds the node's sockets opened since the last scan to the table's set.
    fn refresh(&self, c: &Cluster) {
        let add = add_elements(&self.table, &tcp_sockets_of(self.pid));
        if !add.is_empty() {
            nft_script(c, &self.table, &add);
        }
    }
}

/// `add element` lines for a set of sockets (empty for none).
fn add_elements(table: &str, socks: &BTreeSet<(String, u16)>) -> String {
    if socks.is_empty() {
        return String::new();
    }
    let elems: Vec<String> = socks.iter().map(|(a, p)| format!("{a} . {p}")).collect();
    format!("add element inet {table} socks {{ {} }}\n", elems.join(", "))
}

/// Loads an nft script (from a file: the harness runs commands without stdin).
fn nft_script(c: &Cluster, table: &str, script: &str) {
    let file = c.root.join(format!("{table}.nft"));
    fs::write(&file, script).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let out = run_cmd(
        std::process::Command::new("nft").arg("-f").arg(&file),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("nft: {e}"));
    assert!(
        out.success(),
        "nft -f failed (is nftables installed? scripts/install-deps.sh installs it):\n{script}\n{}",
        out.describe()
    );
}

fn nft_list(table: &str) -> String {
    run_cmd(
        std::process::Command::new("nft").args(["list", "table", "inet", table]),
        Duration::from_secs(30),
    )
    .map(|o| o.stdout)
    .unwrap_or_else(|e| e)
}

impl Drop for Partition {
    fn drop(&mut self) {
        match run_cmd(
            std::process::Command::new("nft").args(["delete", "table", "inet", &self.table]),
            Duration::from_secs(30),
        ) {
            Ok(o) if o.success() => {}
            Ok(o) => eprintln!(
                "cleanup: `nft delete table inet {}` failed:\n{}",
                self.table,
                o.describe()
            ),
            Err(e) => eprintln!("cleanup: {e}"),
        }
        if pid_alive(self.pid) {
            if let Err(e) = fs::write(self.home.join("cgroup.procs"), self.pid.to_string()) {
                eprintln!(
                    "cleanup: moving {} (pid {}) back to {}: {e}",
                    self.name,
                    self.pid,
                    self.home.display()
                );
            }
        }
        if let Err(e) = fs::remove_dir(&self.cgroup) {
            eprintln!("cleanup: rmdir {}: {e}", self.cgroup.display());
        }
    }
}

// ------------------------------------------------------------------ the tests

#[test]
fn kill_9_the_leader_five_times_under_load() {
    let _one_at_a_time = jfs_tests::workload::one_timed_test_at_a_time();
    let c = Cluster::start();
    let second = c.mount_second(NO_KERNEL_CACHE);
    let seed = test_seed("kill_9_the_leader_five_times_under_load");
    let load = Load::start(&c, &second, seed);
    load.wait_running();
    let mut faults = Vec::new();
    for n in 1..=5 {
        if load.failed() {
            break;
        }
        let leader = wait_leader(&c);
        let name = format!("metad{leader}");
        let start = Instant::now();
        c.kill9(&name);
        let in_effect = Instant::now();
        // Move on only once the mounts went through the failover: a new
        // leader, and every thread completed a metadata call made after the
        // kill (so it could not have been answered by the dead leader).
        let new_leader = wait_until(
            &format!("kill {n} of {name}: a new leader, and every workload thread through the failover"),
            RECOVERY_DEADLINE,
            || {
                if load.failed() {
                    return Ok(None);
                }
                if start.elapsed() < LOAD_AFTER_FAULT {
                    return Err(format!("only {:?} since the kill", start.elapsed()));
                }
                load.through_since(in_effect)?;
                match c.leader_index() {
                    Some(l) if l != leader => Ok(Some(l)),
                    other => Err(format!("metastatus names leader {other:?}")),
                }
            },
        );
        faults.push(Fault {
            label: format!("kill -9 #{n} of leader {name}"),
            start,
            in_effect,
            end: start,
            new_leader,
        });
        if load.failed() {
            break;
        }
        c.local_up();
        wait_all_three_up(&c, &format!("{name} to rejoin and catch up after kill {n}"));
    }
    let out = load.stop();
    judge(&c, &second, "5 kill -9 of the metad leader", &out, &faults);
}

#[test]
fn sigstop_the_leader_for_ten_seconds() {
    let _one_at_a_time = jfs_tests::workload::one_timed_test_at_a_time();
    let c = Cluster::start();
    let second = c.mount_second(NO_KERNEL_CACHE);
    let seed = test_seed("sigstop_the_leader_for_ten_seconds");
    let load = Load::start(&c, &second, seed);
    load.wait_running();
    let leader = wait_leader(&c);
    let name = format!("metad{leader}");
    let stopped = Stopped::new(&c, &name);
    let (start, in_effect) = (stopped.at, stopped.in_effect);
    // The fault lasts STOP_FOR whatever happens; meanwhile note who takes
    // over (a stopped node shows as unreachable, after metastatus's 2 s
    // probe timeout, so the instant printed is late by up to that).
    let mut new_leader = None;
    while start.elapsed() < STOP_FOR {
        if new_leader.is_none() {
            if let Some(l) = c.leader_index().filter(|&l| l != leader) {
                eprintln!(
                    "`jfs metastatus` named metad{l} leader {:.3} s after {name} was stopped",
                    start.elapsed().as_secs_f64()
                );
                new_leader = Some(l);
            }
        }
        thread::sleep(Duration::from_millis(200).min(STOP_FOR.saturating_sub(start.elapsed())));
    }
    // With a generous JFS_TEST_FAILOVER_MAX_MS, calls that hang until the
    // SIGCONT would pass the limit: the load must move while the node is
    // still stopped.
    let during_stop = load.through_since(in_effect);
    let end = Instant::now();
    drop(stopped);
    // The old leader wakes up believing it leads; the mounts must get
    // through that too before the load stops.
    wait_until(
        &format!("every workload thread through the failover after SIGCONT of {name}"),
        RECOVERY_DEADLINE,
        || {
            if end.elapsed() < LOAD_AFTER_FAULT {
                return Err(format!("only {:?} since SIGCONT", end.elapsed()));
            }
            load.through_since(end)
        },
    );
    wait_all_three_up(&c, &format!("{name} to rejoin as a follower after SIGCONT"));
    let faults = [Fault {
        label: format!("SIGSTOP of leader {name} for {} s", STOP_FOR.as_secs()),
        start,
        in_effect,
        end,
        new_leader,
    }];
    let out = load.stop();
    judge(&c, &second, "SIGSTOP of the metad leader", &out, &faults);
    if let Err(e) = during_stop {
        panic!(
            "while {name} was stopped ({} s), the mounts did not get through: {e}{}",
            STOP_FOR.as_secs(),
            c.log_tails()
        );
    }
}

#[test]
fn partition_the_leader_for_ten_seconds() {
    let _one_at_a_time = jfs_tests::workload::one_timed_test_at_a_time();
    let c = Cluster::start();
    let second = c.mount_second(NO_KERNEL_CACHE);
    let seed = test_seed("partition_the_leader_for_ten_seconds");
    let load = Load::start(&c, &second, seed);
    load.wait_running();
    let leader = wait_leader(&c);
    let name = format!("metad{leader}");
    let cut = Partition::new(&c, leader);
    let (start, in_effect) = (cut.at, cut.in_effect);
    // The partition lasts PARTITION_FOR whatever happens; meanwhile note who
    // takes over (the cut-off node shows as unreachable after metastatus's
    // 2 s probe timeout, so the instant printed is late by up to that), and
    // keep the set of the node's own connections up to date.
    let mut new_leader = None;
    while start.elapsed() < PARTITION_FOR {
        cut.refresh(&c);
        if new_leader.is_none() {
            if let Some(l) = c.leader_index().filter(|&l| l != leader) {
                eprintln!(
                    "`jfs metastatus` named metad{l} leader {:.3} s after {name} was cut off",
                    start.elapsed().as_secs_f64()
                );
                new_leader = Some(l);
            }
        }
        thread::sleep(Duration::from_millis(200).min(PARTITION_FOR.saturating_sub(start.elapsed())));
    }
    // The mounts must get through while the leader is still cut off: calls
    // that hang until the partition heals would pass with a generous
    // JFS_TEST_FAILOVER_MAX_MS.
    let during_cut = load.through_since(in_effect);
    let end = Instant::now();
    drop(cut);
    // The old leader, reachable again, still believes it leads until it
    // hears of the new term; the mounts must get through that too.
    wait_until(
        &format!("every workload thread through the failover after {name} was reconnected"),
        RECOVERY_DEADLINE,
        || {
            if end.elapsed() < LOAD_AFTER_FAULT {
                return Err(format!("only {:?} since the partition healed", end.elapsed()));
            }
            load.through_since(end)
        },
    );
    wait_all_three_up(&c, &format!("{name} to rejoin as a follower after the partition"));
    let faults = [Fault {
        label: format!("partition of leader {name} for {} s", PARTITION_FOR.as_secs()),
        start,
        in_effect,
        end,
        new_leader,
    }];
    let out = load.stop();
    judge(&c, &second, "network partition of the metad leader", &out, &faults);
    if let Err(e) = during_cut {
        panic!(
            "while {name} was cut off ({} s; new leader seen: {}), the mounts did not get through: {e}{}",
            PARTITION_FOR.as_secs(),
            new_leader.map_or("none".into(), |l| format!("metad{l}")),
            c.log_tails()
        );
    }
}

/// The checker must be able to fail: each kind of violation, planted in a
/// hand-made history, is found, and a good history passes.
#[test]
fn the_linearizability_checker_finds_bad_histories() {
    let t0 = Instant::now();
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    let w = |value, a, b| RegWrite {
        invoke: t(a),
        complete: Some(t(b)),
        value,
    };
    let r = |value, a, b| RegRead {
        invoke: t(a),
        complete: t(b),
        value,
    };
    // Write 1 runs over 10..20 ms, write 2 over 30..100 ms.
    let writes = [w(1, 10, 20), w(2, 30, 100)];

    // While a write is in flight a read may see either value, and reads
    // that overlap each other may disagree.
    let good = [
        r(0, 0, 5),
        r(0, 12, 18),
        r(1, 15, 25),
        r(1, 40, 50),
        r(2, 45, 60),
        r(2, 60, 70),
        r(2, 110, 120),
    ];
    let v = check_register("good", 0, &writes, &good, t0);
    assert!(v.is_empty(), "a linearizable history was rejected: {v:#?}");

    let v = check_register("stale", 0, &writes, &[r(0, 25, 28)], t0);
    assert!(
        v.len() == 1 && v[0].contains("stale"),
        "a read of 0 begun after write 1 completed must be stale: {v:#?}"
    );

    let v = check_register("future", 0, &writes, &[r(2, 21, 25)], t0);
    assert!(
        v.len() == 1 && v[0].contains("ahead of every write"),
        "a read of 2 that ended before write 2 began must be flagged: {v:#?}"
    );

    let v = check_register("back", 0, &writes, &[r(2, 40, 45), r(1, 50, 55)], t0);
    assert!(
        v.len() == 1 && v[0].contains("went back"),
        "a read of 1 after a completed read of 2 must be flagged: {v:#?}"
    );

    // A write that failed may have taken effect or not: its value may be
    // seen, but it never sets a floor.
    let failed = [
        w(1, 10, 20),
        RegWrite {
            invoke: t(30),
            complete: None,
            value: 2,
        },
    ];
    let v = check_register("failed-write", 0, &failed, &[r(1, 200, 210), r(2, 220, 230)], t0);
    assert!(v.is_empty(), "values of a failed write are allowed: {v:#?}");
    let v = check_register("failed-write", 0, &failed, &[r(0, 200, 210)], t0);
    assert!(
        v.len() == 1 && v[0].contains("stale"),
        "a completed write before a failed one still sets a floor: {v:#?}"
    );
}
