//! A metad that missed more than the leader keeps in its log catches up by
//! snapshot after a plain crash. A metad that lost its whole data directory
//! refuses to rejoin under its old id (it may have voted and acknowledged
//! entries it no longer has); it is replaced online by a new id, which
//! catches up by snapshot. Then the other original follower is killed: the
//! new node is needed for a quorum, and nothing acknowledged is lost. The
//! replicas' state-machine digests agree.

use jfs_tests::*;
use std::fs;
use std::time::Duration;

/// Applied index per metad 1..=4 as `jfs metastatus` prints it (column 5).
fn applied(c: &Cluster) -> Vec<Option<u64>> {
    let out = c.jfs(&["metastatus", "--dir", &c.state.to_string_lossy()]);
    (1..=4)
        .map(|i| {
            let addr = format!("{}:{}", c.ip, 8101 + 10 * (i - 1));
            out.stdout
                .lines()
                .find(|l| l.contains(&addr) && !l.contains("unreachable"))
                .and_then(|l| l.split_whitespace().nth(4))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

fn wait_caught_up(c: &Cluster, node: usize) {
    wait_until("every metad applied the same index", Duration::from_secs(60), || {
        let a = applied(c);
        let a = &a[..3.max(node)];
        match (a[node - 1], a.iter().flatten().max()) {
            (Some(n), Some(max)) if n == *max && n > 0 => Ok(()),
            _ => Err(format!("applied indexes {a:?}\n{}", c.log_tails())),
        }
    });
}

#[test]
fn a_lagging_and_a_wiped_metad_catch_up_by_snapshot() {
    let c = Cluster::start();
    // Snapshot (and purge the log) every 200 entries so a short outage is
    // enough to force catch-up by snapshot.
    c.restart_with_setting("namespace.backend.raft.snapshot-interval = 200");

    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index().ok_or_else(|| "no leader yet".to_string())
    });
    let follower = if leader == 1 { 2 } else { 1 };
    let name = format!("metad{follower}");

    // 1. A follower down while the leader writes far past what it keeps.
    c.kill9(&name);
    c.sh("mkdir a && for i in $(seq 1 1500); do mkdir a/d$i; done");
    c.local_up();
    wait_caught_up(&c, follower);
    assert!(
        c.state.join(format!("{name}/snapshot.bin")).exists(),
        "the follower caught up without installing a snapshot"
    );

    // 2. The same node loses its whole data directory: it must not rejoin
    //    as node `follower` (it may have voted in this term and counted
    //    towards acknowledged entries it no longer has).
    c.kill9(&name);
    fs::remove_dir_all(c.state.join(&name)).expect("wipe the follower's data dir");
    c.sh("mkdir b && for i in $(seq 1 1500); do mkdir b/d$i; done");
    let state = c.state.to_string_lossy().into_owned();
    let mnt = c.mnt.to_string_lossy().into_owned();
    let up = c.jfs(&["local", "up", "--dir", &state, "--ip", &c.ip, &mnt]);
    assert!(
        !up.success(),
        "a wiped metad started under its old id:\n{}",
        up.describe()
    );
    let log = fs::read_to_string(c.state.join(format!("logs/{name}.log"))).expect("read the wiped node's log");
    assert!(
        log.contains("jfs admin node remove"),
        "the wiped node's refusal does not say how to replace it:\n{log}"
    );

    // Replace it online: remove the old id, start node 4 empty with --join.
    let conf = c.conf().to_string_lossy().into_owned();
    c.jfs_ok(&["--conf", &conf, "admin", "node", "remove", &follower.to_string()]);
    let leader_addr = format!("{}:{}", c.ip, 8101 + 10 * (leader - 1));
    let mut node4 = c.start_extra_metad(4, &leader_addr);
    wait_until("node 4 to become a voter", Duration::from_secs(60), || {
        let out = c.jfs(&["metastatus", "--detail", "--dir", &state]);
        let voters = format!(
            "{}",
            [1, 2, 3, 4]
                .iter()
                .filter(|&&i| i != follower)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        if out.stdout.contains(&voters) {
            Ok(())
        } else {
            Err(out.stdout)
        }
    });
    wait_caught_up(&c, 4);
    let digests = wait_until("every replica shows the same digest", Duration::from_secs(60), || {
        let out = c.jfs(&["metastatus", "--detail", "--digest", "--dir", &state]);
        let ds: Vec<&str> = out
            .stdout
            .split_whitespace()
            .filter(|w| w.contains('@') && w.len() > 16)
            .collect();
        if ds.len() == 3 && ds.iter().all(|d| *d == ds[0]) {
            Ok(out.stdout.clone())
        } else {
            Err(out.stdout.clone())
        }
    });
    eprintln!("replicas agree:\n{digests}");

    // 3. Kill the other original follower: node 4 is now needed for a
    //    quorum, and it holds everything acknowledged before the wipe.
    let other = [1, 2, 3]
        .into_iter()
        .find(|&i| i != leader && i != follower)
        .expect("a third node");
    c.kill9(&format!("metad{other}"));
    let count = wait_until(
        "the namespace answers with one original follower dead and one replaced",
        Duration::from_secs(60),
        || {
            let out = sh_result(&c.mnt, "ls a | wc -l; ls b | wc -l", Duration::from_secs(30));
            if out.success() {
                Ok(out.stdout)
            } else {
                Err(out.describe())
            }
        },
    );
    assert_eq!(
        count.split_whitespace().collect::<Vec<_>>(),
        vec!["1500", "1500"],
        "entries lost"
    );
    node4.kill9();
}
