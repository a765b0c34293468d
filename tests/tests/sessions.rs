//! Client sessions keep metad's per-client state bounded: every short `jfs
//! fs` run ends its session as it exits, and a client that dies without
//! doing so loses its session (and saved replies) after the session
//! timeout, so thousands of runs leave nothing behind.

use jfs_tests::*;
use std::time::Duration;

const SESSION: Duration = Duration::from_secs(3);

/// (sessions, saved replies) that metad node `node` holds.
fn counts(c: &Cluster, node: usize) -> (u64, u64) {
    let conf = c.conf().to_string_lossy().into_owned();
    let out = c.jfs_ok(&["--conf", &conf, "admin", "node", "state", &node.to_string(), "--digest"]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in `jfs admin node state`:\n{out}"))
    };
    (field("sessions"), field("saved replies"))
}

#[test]
fn short_cli_runs_and_dead_clients_leave_no_sessions_behind() {
    let c = Cluster::start();
    c.restart_with_setting(&format!("client.session-timeout-ms = {}", SESSION.as_millis()));
    let conf = c.conf();
    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index().ok_or_else(|| "no leader yet".to_string())
    });
    let conf = conf.to_string_lossy().into_owned();
    // Sessions of the mount itself, and of anything else already running.
    let (base, _) = counts(&c, leader);

    let runs = env_count("JFS_TEST_SESSION_RUNS", 200);
    for i in 0..runs {
        c.jfs_ok(&["--conf", &conf, "fs", "mkdir", &format!("jfs://default/d{i}")]);
    }
    let (after_runs, replies) = counts(&c, leader);
    eprintln!("after {runs} `jfs fs mkdir` runs: {after_runs} sessions (before: {base}), {replies} saved replies");
    assert!(
        after_runs <= base + 2,
        "{runs} finished CLI runs left {after_runs} sessions (before: {base})"
    );
    assert!(replies <= 64, "{replies} saved replies kept after {runs} CLI runs");

    // Clients that die without ending their sessions (mountds killed with
    // -9): theirs expire after the session timeout.
    let mut mounts: Vec<Mount> = (0..3).map(|_| c.mount_second("")).collect();
    let (with_mounts, _) = counts(&c, leader);
    assert_eq!(with_mounts, after_runs + 3, "each mount holds a session");
    let killed = std::time::Instant::now();
    for m in &mut mounts {
        m.kill9();
    }
    let (end, replies) = wait_until("the killed mounts' sessions to expire", SESSION * 10, || {
        let (n, r) = counts(&c, leader);
        if n <= after_runs {
            Ok((n, r))
        } else {
            Err(format!("{n} sessions (want {after_runs})"))
        }
    });
    eprintln!(
        "{:?} after killing 3 mountds: {end} sessions, {replies} saved replies (session timeout {SESSION:?})",
        killed.elapsed()
    );
}
