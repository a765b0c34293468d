//! Online membership changes of the metad group cost the mounts nothing: no
//! failed syscall, no lost change, no stale read, and no long pause.
//!
//! Every test runs the workload of [`jfs_tests::workload`] on two mounts the
//! whole time (two threads per mount doing create + write + close, stat,
//! rename, unlink and mkdir, every syscall made once and checked, a model per
//! thread that must match both mounts at the end, and registers whose
//! history must be linearizable) while the metad group changes under it.
//! Each change is one step; after it the load runs at least 3 s more and
//! every thread must complete a metadata call made after the step ended
//! before the next one starts. The summary prints, per step, the pause and
//! the longest syscall; the longest syscall of the run must stay under
//! `JFS_TEST_FAILOVER_MAX_MS` (default 2000).
//!
//! * `grow_one_three_five_three_under_load`: from the local cluster's three
//!   nodes, `jfs admin node remove` the two followers one at a time (and
//!   `kill -9` them: they are no longer members) until the leader is the
//!   only voter; start metad4 and metad5 with `--join` (they join by
//!   themselves) to get back to three, then metad6 and metad7 to get to
//!   five; then remove 6 and 7 again. At the end every member's state
//!   machine digest is the same.
//! * `replace_a_dead_node_under_load`: `kill -9` a follower, start metad4
//!   (which joins by itself) and `jfs admin node replace DEAD --with 4`; then
//!   kill the other original follower and replace it by metad5 right after
//!   starting it, while it is still joining. The voters end as the leader,
//!   4 and 5, with equal digests.
//! * `failover_to_a_chosen_node_under_load`: `jfs admin failover --to` one
//!   follower, then to the other original follower; after each,
//!   `jfs metastatus` names that node leader.

use jfs_tests::workload::*;
use jfs_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Deadline for one membership change to show in `jfs metastatus --detail`.
const CHANGE_DEADLINE: Duration = Duration::from_secs(90);

// ------------------------------------------------------------------ the cluster's view

/// One row of `jfs metastatus --detail [--digest]`.
#[derive(Debug)]
struct DetailRow {
    id: u64,
    role: String,
    voters: Option<BTreeSet<u64>>,
    learners: Option<BTreeSet<u64>>,
    /// `DIGEST@INDEX`, split.
    digest: Option<(String, u64)>,
}

/// "1,2,3" (or "-" for none) as a set of ids; None for anything else.
fn id_set(s: &str) -> Option<BTreeSet<u64>> {
    if s == "-" {
        return Some(BTreeSet::new());
    }
    s.split(',').map(|v| v.parse().ok()).collect()
}

fn ids(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

fn show(set: &BTreeSet<u64>) -> String {
    set.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// `jfs metastatus --detail [--digest]`, parsed, and its text. Columns are
/// found by where their title starts in the header (LEADER holds two words,
/// and an unreachable node's row has `-` in every column).
fn detail(c: &Cluster, digest: bool) -> (Vec<DetailRow>, String) {
    let state = c.state.to_string_lossy().into_owned();
    let mut args = vec!["metastatus", "--detail", "--dir", state.as_str()];
    if digest {
        args.push("--digest");
    }
    let out = c.jfs(&args);
    let text = format!("{}{}", out.stdout, out.stderr);
    let mut lines = out.stdout.lines();
    let Some(header) = lines.next() else {
        return (Vec::new(), text);
    };
    let col = |title: &str| header.find(title);
    let (role, voters, learners, dig) = (col(" ROLE"), col(" VOTERS"), col(" LEARNERS"), col(" DIGEST"));
    let word =
        |l: &str, at: Option<usize>| -> Option<String> { l.get(at?..)?.split_whitespace().next().map(str::to_string) };
    let rows = lines
        .filter_map(|l| {
            Some(DetailRow {
                id: l.split_whitespace().next()?.parse().ok()?,
                role: word(l, role)?,
                voters: word(l, voters).and_then(|v| id_set(&v)),
                learners: word(l, learners).and_then(|v| id_set(&v)),
                digest: word(l, dig).and_then(|d| {
                    let (h, i) = d.rsplit_once('@')?;
                    Some((h.to_string(), i.parse().ok()?))
                }),
            })
        })
        .collect();
    (rows, text)
}

/// Waits until the leader lists exactly `want` as voters and no learner,
/// and every one of them but those in `down` (killed, not yet replaced)
/// answers as leader or follower with that view.
fn wait_voters(c: &Cluster, want: &BTreeSet<u64>, down: &BTreeSet<u64>, what: &str) {
    wait_until(
        &format!("{what}: voters {} in `jfs metastatus --detail`", show(want)),
        CHANGE_DEADLINE,
        || {
            let (rows, text) = detail(c, false);
            let leaders: Vec<&DetailRow> = rows.iter().filter(|r| r.role == "leader").collect();
            let [l] = leaders[..] else {
                return Err(format!("not exactly one leader:\n{text}"));
            };
            if l.voters.as_ref() != Some(want) || l.learners.as_ref().is_none_or(|s| !s.is_empty()) {
                return Err(format!(
                    "leader {} lists voters {:?}, learners {:?}:\n{text}",
                    l.id, l.voters, l.learners
                ));
            }
            for id in want.difference(down) {
                match rows.iter().find(|r| r.id == *id) {
                    Some(r) if (r.role == "leader" || r.role == "follower") && r.voters.as_ref() == Some(want) => {}
                    Some(r) => return Err(format!("node {id} is {} with voters {:?}:\n{text}", r.role, r.voters)),
                    None => return Err(format!("node {id} is not in the table:\n{text}")),
                }
            }
            Ok(())
        },
    );
}

/// Waits until every member shows its state-machine digest at one index,
/// the same for all; panics at once if two members at the same index
/// disagree (a diverged replica). Returns the table.
fn wait_digests_agree(c: &Cluster, members: &BTreeSet<u64>) -> String {
    wait_until(
        &format!("members {} to show one state-machine digest", show(members)),
        Duration::from_secs(60),
        || {
            let (rows, text) = detail(c, true);
            let mut at: BTreeMap<u64, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
            for id in members {
                let Some((d, i)) = rows.iter().find(|r| r.id == *id).and_then(|r| r.digest.clone()) else {
                    return Err(format!("no digest for node {id}:\n{text}"));
                };
                at.entry(i).or_default().entry(d).or_default().push(*id);
            }
            for (i, ds) in &at {
                assert!(
                    ds.len() == 1,
                    "replicas at the same applied index {i} have different state-machine digests {ds:?}:\n{text}{}",
                    c.log_tails()
                );
            }
            if at.len() == 1 {
                Ok(text)
            } else {
                Err(format!("members at different indexes {at:?}:\n{text}"))
            }
        },
    )
}

// ------------------------------------------------------------------ steps

/// The changes made so far, as faults for the workload's summary.
struct Steps<'a> {
    c: &'a Cluster,
    load: &'a Load,
    done: Vec<Fault>,
    /// Voters killed and not yet replaced.
    down: BTreeSet<u64>,
}

impl<'a> Steps<'a> {
    fn new(c: &'a Cluster, load: &'a Load) -> Steps<'a> {
        Steps {
            c,
            load,
            done: Vec::new(),
            down: BTreeSet::new(),
        }
    }

    /// Records a step begun at `start` whose change became visible at `end`,
    /// then keeps the load going until LOAD_AFTER_FAULT has passed since the
    /// start and every thread has completed a metadata call made after `end`.
    fn finish(&mut self, label: String, start: Instant, end: Instant) {
        wait_until(
            &format!("every workload thread through a metadata call after: {label}"),
            RECOVERY_DEADLINE,
            || {
                if start.elapsed() < LOAD_AFTER_FAULT {
                    return Err(format!("only {:?} since the step began", start.elapsed()));
                }
                self.load.through_since(end)
            },
        );
        let leader = leader_id(self.c);
        eprintln!(
            "step done: {label}, visible after {:.3} s (leader now {})",
            (end - start).as_secs_f64(),
            leader.map_or("?".into(), |l| format!("metad{l}"))
        );
        self.done.push(Fault {
            label,
            start,
            in_effect: start,
            end,
            new_leader: leader.map(|l| l as usize),
        });
    }

    /// `jfs admin node remove id`, `kill -9` of its process (`kill`), and the
    /// wait until the voters are `want`.
    fn remove(&mut self, id: u64, kill: impl FnOnce(), want: &BTreeSet<u64>) {
        let label = format!("remove metad{id}");
        let start = Instant::now();
        let conf = self.c.conf().to_string_lossy().into_owned();
        let out = self
            .c
            .jfs_ok(&["--conf", &conf, "admin", "node", "remove", &id.to_string()]);
        eprintln!(
            "`jfs admin node remove {id}` took {:.3} s:\n{out}",
            start.elapsed().as_secs_f64()
        );
        kill();
        self.down.remove(&id);
        wait_voters(self.c, want, &self.down, &label);
        self.finish(label, start, Instant::now());
    }

    /// Starts metad `n` with `--join join` (it adds itself) and waits until
    /// the voters are `want`.
    fn join(&mut self, n: u32, join: &str, want: &BTreeSet<u64>) -> ExtraDaemon {
        let label = format!("metad{n} joins (--join)");
        let start = Instant::now();
        let d = self.c.start_extra_metad(n, join);
        wait_voters(self.c, want, &self.down, &label);
        self.finish(label, start, Instant::now());
        d
    }

    /// `jfs admin node replace old --with new` (metad `new` is running,
    /// started at `start` with `--join`), and the wait until the voters are
    /// `want`.
    fn replace(&mut self, old: u64, new: u32, start: Instant, want: &BTreeSet<u64>) {
        let label = format!("replace dead metad{old} by metad{new}");
        let (rpc, raft) = self.c.metad_addrs(new);
        let conf = self.c.conf().to_string_lossy().into_owned();
        let t = Instant::now();
        let out = self.c.jfs_ok(&[
            "--conf",
            &conf,
            "admin",
            "node",
            "replace",
            &old.to_string(),
            "--with",
            &new.to_string(),
            "--rpc-address",
            &rpc,
            "--raft-address",
            &raft,
        ]);
        eprintln!(
            "`jfs admin node replace {old} --with {new}` took {:.3} s:\n{out}",
            t.elapsed().as_secs_f64()
        );
        self.down.remove(&old);
        wait_voters(self.c, want, &self.down, &label);
        self.finish(label, start, Instant::now());
    }

    /// `kill -9` of a follower of the original three (the voters stay).
    fn kill(&mut self, id: u64) {
        let label = format!("kill -9 of follower metad{id}");
        let start = Instant::now();
        self.c.kill9(&format!("metad{id}"));
        self.down.insert(id);
        self.finish(label, start, Instant::now());
    }
}

/// The address `--join` takes: the current leader's client address.
fn leader_addr(c: &Cluster) -> String {
    let l = wait_until("`jfs metastatus` to name a leader", Duration::from_secs(60), || {
        leader_id(c).ok_or_else(|| "no single leader".to_string())
    });
    c.metad_addrs(l as u32).0
}

// ------------------------------------------------------------------ the tests

#[test]
fn grow_one_three_five_three_under_load() {
    let _one_at_a_time = jfs_tests::workload::one_timed_test_at_a_time();
    let c = Cluster::start();
    let second = c.mount_second(NO_KERNEL_CACHE);
    let seed = test_seed("grow_one_three_five_three_under_load");
    let load = Load::start(&c, &second, seed);
    load.wait_running();
    let leader = wait_leader(&c) as u64;
    let mut voters = ids(&[1, 2, 3]);
    wait_voters(&c, &voters, &BTreeSet::new(), "the local cluster");
    let mut steps = Steps::new(&c, &load);

    // 3 -> 1: the followers go, one at a time.
    for f in [1, 2, 3].into_iter().filter(|&i| i != leader) {
        voters.remove(&f);
        steps.remove(f, || c.kill9(&format!("metad{f}")), &voters);
    }
    assert_eq!(voters, ids(&[leader]), "the leader should be the only voter left");

    // 1 -> 3 -> 5: new nodes join by themselves.
    let mut extra = Vec::new();
    for n in 4..=7u32 {
        voters.insert(n as u64);
        let join = leader_addr(&c);
        extra.push(steps.join(n, &join, &voters));
    }

    // 5 -> 3: the last two go again.
    for n in [6u64, 7] {
        voters.remove(&n);
        let d = extra
            .iter_mut()
            .find(|d| d.name == format!("metad{n}"))
            .expect("started above");
        steps.remove(n, || d.kill9(), &voters);
    }
    let faults = std::mem::take(&mut steps.done);
    let out = load.stop();
    judge(
        &c,
        &second,
        &format!("metad voters 3 -> 1 -> 3 -> 5 -> 3 (ends as {})", show(&voters)),
        &out,
        &faults,
    );
    wait_voters(&c, &voters, &BTreeSet::new(), "at the end");
    let table = wait_digests_agree(&c, &voters);
    eprintln!("members {} agree:\n{table}", show(&voters));
}

#[test]
fn replace_a_dead_node_under_load() {
    let _one_at_a_time = jfs_tests::workload::one_timed_test_at_a_time();
    let c = Cluster::start();
    let second = c.mount_second(NO_KERNEL_CACHE);
    let seed = test_seed("replace_a_dead_node_under_load");
    let load = Load::start(&c, &second, seed);
    load.wait_running();
    let leader = wait_leader(&c) as u64;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let (dead, later) = (followers[0], followers[1]);
    let mut steps = Steps::new(&c, &load);

    // A follower dies; a new node is started, joins by itself, and then
    // replaces it with `jfs admin node replace` (whose first step, adding
    // the node, is already done).
    steps.kill(dead);
    let node4 = steps.join(4, &leader_addr(&c), &ids(&[1, 2, 3, 4]));
    steps.replace(dead, 4, Instant::now(), &ids(&[leader, later, 4]));

    // The other original follower dies too; its replacement is started and
    // replaced in at once, while it may still be joining by itself.
    steps.kill(later);
    let join = leader_addr(&c);
    let start = Instant::now();
    let node5 = c.start_extra_metad(5, &join);
    // Running means answering on its client port (`replace` refuses a node
    // that does not answer); it may or may not have joined by then.
    wait_until("metad5 to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&node5.addr)
            .map(drop)
            .map_err(|e| format!("{}: {e}", node5.addr))
    });
    let want = ids(&[leader, 4, 5]);
    steps.replace(later, 5, start, &want);

    let faults = std::mem::take(&mut steps.done);
    let out = load.stop();
    judge(
        &c,
        &second,
        &format!("two dead metads replaced (voters end as {})", show(&want)),
        &out,
        &faults,
    );
    wait_voters(&c, &want, &BTreeSet::new(), "at the end");
    let table = wait_digests_agree(&c, &want);
    eprintln!("members {} agree:\n{table}", show(&want));
    drop((node4, node5));
}

#[test]
fn failover_to_a_chosen_node_under_load() {
    let _one_at_a_time = jfs_tests::workload::one_timed_test_at_a_time();
    let c = Cluster::start();
    let second = c.mount_second(NO_KERNEL_CACHE);
    let seed = test_seed("failover_to_a_chosen_node_under_load");
    let load = Load::start(&c, &second, seed);
    load.wait_running();
    let first = wait_leader(&c) as u64;
    let conf = c.conf().to_string_lossy().into_owned();
    let mut steps = Steps::new(&c, &load);
    // To each of the two original followers in turn: three leaders in all.
    for to in [1, 2, 3].into_iter().filter(|&i| i != first) {
        let label = format!("jfs admin failover --to {to}");
        let start = Instant::now();
        let out = c.jfs_ok(&["--conf", &conf, "admin", "failover", "--to", &to.to_string()]);
        let returned = Instant::now();
        eprintln!(
            "`{label}` returned after {:.3} s: {}",
            (returned - start).as_secs_f64(),
            out.trim()
        );
        wait_until(
            &format!("`jfs metastatus` to name metad{to} leader after `{label}`"),
            Duration::from_secs(30),
            || match leader_id(&c) {
                Some(l) if l == to => Ok(()),
                other => Err(format!("leader {other:?}")),
            },
        );
        steps.finish(label, start, returned);
    }
    let faults = std::mem::take(&mut steps.done);
    let out = load.stop();
    judge(&c, &second, "two leadership transfers", &out, &faults);
}
