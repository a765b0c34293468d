//! A metad that missed more than the leader keeps in its log catches up by
//! snapshot: once after a plain crash, once after losing its whole data
//! directory. Then the leader is killed and nothing acknowledged is lost.
//!
//! Not covered yet (known issue): a node that loses its data and comes back
//! before the leader has purged past the node's old position stalls instead
//! of receiving a snapshot (openraft 0.9 probes below its purge point with
//! an empty prev_log_id; `raft_store` refuses to hand out such a range).

use jfs_tests::*;
use std::fs;
use std::time::Duration;

/// Applied index per metad as `jfs metastatus` prints it (column 5).
fn applied(c: &Cluster) -> Vec<Option<u64>> {
    let out = c.jfs(&["metastatus", "--dir", &c.state.to_string_lossy()]);
    (1..=3)
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
    c.local_down();
    let conf = c.conf();
    let mut text = fs::read_to_string(&conf).expect("read jfs.toml");
    text.push_str("namespace.backend.raft.snapshot-interval = 200\n");
    fs::write(&conf, text).expect("write jfs.toml");
    c.local_up();

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

    // 2. The same node loses its whole data directory.
    c.kill9(&name);
    fs::remove_dir_all(c.state.join(&name)).expect("wipe the follower's data dir");
    c.sh("mkdir b && for i in $(seq 1 1500); do mkdir b/d$i; done");
    c.local_up();
    wait_caught_up(&c, follower);

    // 3. Lose the leader: the restored node is now needed for a quorum.
    let leader = c.leader_index().expect("leader before the kill");
    c.kill9(&format!("metad{leader}"));
    let count = wait_until(
        "the namespace answers after the leader is killed",
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
}
