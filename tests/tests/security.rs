//! Transport security (issue 11): every metad and blockd port accepts only
//! mutual-TLS connections with a certificate from the cluster's CA, and
//! only the calls that certificate's role allows; certificates rotate
//! under load without a failed syscall.
//!
//! Calls are made by `tlsprobe` (src/bin/tlsprobe.rs) as a chosen identity:
//! the cluster's own certificates (STATE/tls), one from another CA, an
//! expired one, or none.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jfs_tests::workload::*;
use jfs_tests::*;

const PROBE: &str = env!("CARGO_BIN_EXE_tlsprobe");

struct Ports {
    meta: String,
    raft: String,
    block: String,
}

fn ports(c: &Cluster) -> Ports {
    Ports {
        meta: format!("{}:8101", c.ip),
        raft: format!("{}:8103", c.ip),
        block: format!("{}:8201", c.ip),
    }
}

/// Runs tlsprobe; `who` is (TLS dir, role), or None for plaintext.
fn probe(who: Option<(&Path, &str)>, expect: &str, addr: &str, call: &str) -> String {
    let mut cmd = Command::new(PROBE);
    if let Some((dir, role)) = who {
        cmd.arg("--tls-dir").arg(dir).args(["--role", role]);
    }
    cmd.args(["--expect", expect, addr, call]);
    let out = run_cmd(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "tlsprobe failed:\n{}", out.describe());
    out.stdout.trim().to_string()
}

fn issue(c: &Cluster, ca: &Path, out: &Path, role: &str, name: &str, days: &str) {
    c.jfs_ok(&[
        "admin",
        "cert",
        "issue",
        "--ca-dir",
        &ca.to_string_lossy(),
        "--out",
        &out.to_string_lossy(),
        "--role",
        role,
        "--name",
        name,
        "--days",
        days,
    ]);
}

/// A TLS directory whose `role` certificate is `cert_dir`'s but which
/// trusts the cluster's CA, so that any refusal is the server's doing.
fn with_cluster_ca(c: &Cluster, cert_dir: &Path) -> PathBuf {
    fs::copy(c.state.join("tls/ca.crt"), cert_dir.join("ca.crt")).expect("copy ca.crt");
    cert_dir.to_path_buf()
}

fn metad_logs(c: &Cluster) -> String {
    (1..=3)
        .map(|i| fs::read_to_string(c.state.join(format!("logs/metad{i}.log"))).unwrap_or_default())
        .collect()
}

#[test]
fn strangers_expired_certificates_and_wrong_roles_are_refused() {
    let c = Cluster::start();
    let p = ports(&c);
    let own = c.state.join("tls");
    let as_role = |role: &'static str| Some((own.as_path(), role));

    // Positive controls: the right role gets through (a refused call would
    // say 25026; these fail later or not at all).
    assert_eq!(probe(as_role("client"), "metad", &p.meta, "status"), "OK");
    assert_eq!(probe(as_role("blockd"), "metad", &p.meta, "status"), "OK");
    let read = probe(as_role("client"), "blockd", &p.block, "read-block");
    assert!(
        read.starts_with("ERR NotFound"),
        "a client reading a missing block: {read}"
    );
    let vote = probe(as_role("metad"), "metad", &p.raft, "vote");
    assert!(
        vote.starts_with("ERR") && !vote.contains("25026"),
        "a metad's garbage vote: {vote}"
    );
    let mknod = probe(as_role("client"), "metad", &p.meta, "mknod");
    assert!(
        mknod.starts_with("ERR") && !mknod.contains("25026"),
        "a client's empty mknod: {mknod}"
    );

    // Wrong roles: refused with "access denied" (25026), whatever the node's role in Raft.
    for (who, port, call) in [
        ("client", &p.raft, "vote"),
        ("blockd", &p.raft, "vote"),
        ("admin", &p.raft, "vote"),
        ("blockd", &p.meta, "mknod"),
        ("metad", &p.meta, "mknod"),
        ("client", &p.meta, "create-namespace"),
        ("client", &p.meta, "heartbeat"),
        ("metad", &p.block, "read-block"),
    ] {
        let expect = if port == &p.block { "blockd" } else { "metad" };
        let got = probe(as_role(who), expect, port, call);
        assert!(
            got.starts_with("ERR PermissionDenied 25026") && got.contains(&format!("a {who} certificate")),
            "a {who} certificate calling {call} on {port}: {got}"
        );
    }

    // No certificate at all, a plaintext connection: no call gets through.
    for (port, expect, call) in [
        (&p.meta, "metad", "status"),
        (&p.raft, "metad", "vote"),
        (&p.block, "blockd", "read-block"),
    ] {
        let got = probe(None, expect, port, call);
        assert!(got.starts_with("TRANSPORT"), "plaintext {call} on {port}: {got}");
    }

    // A client certificate from another CA, and an expired one from ours.
    let other_ca = c.root.join("other-ca");
    c.jfs_ok(&["admin", "ca", "init", "--dir", &other_ca.to_string_lossy()]);
    let foreign = c.root.join("foreign");
    issue(&c, &other_ca, &foreign, "client", "intruder", "30");
    let foreign = with_cluster_ca(&c, &foreign);
    let expired = c.root.join("expired");
    issue(&c, &c.state.join("ca"), &expired, "client", "old", "0");
    for (dir, what) in [(&foreign, "another CA's"), (&expired, "an expired")] {
        for (port, expect, call) in [
            (&p.meta, "metad", "status"),
            (&p.raft, "metad", "vote"),
            (&p.block, "blockd", "read-block"),
        ] {
            let got = probe(Some((dir, "client")), expect, port, call);
            assert!(
                got.starts_with("TRANSPORT"),
                "{what} certificate, {call} on {port}: {got}"
            );
        }
    }
    assert!(
        metad_logs(&c).contains("refused a connection"),
        "metad logged no refused connection"
    );

    // Servers are checked too: a blockd cannot pose as a metad.
    let got = probe(as_role("client"), "metad", &p.block, "status");
    assert!(got.starts_with("TRANSPORT"), "a blockd accepted as a metad: {got}");

    // Key files others can read are refused by every process that loads one.
    let loose = c.root.join("loose");
    issue(&c, &c.state.join("ca"), &loose, "client", "loose", "30");
    let loose = with_cluster_ca(&c, &loose);
    fs::set_permissions(
        loose.join("client.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let got = probe(Some((&loose, "client")), "metad", &p.meta, "status");
    assert!(
        got.starts_with("SETUP") && got.contains("chmod 600"),
        "a 0644 key: {got}"
    );

    // After all that, the cluster serves as before.
    write_file(&c.path("after"), b"still here");
    assert_eq!(fs::read(c.path("after")).unwrap(), b"still here");
}

fn fingerprint(own: &Path, addr: &str) -> String {
    let fp = probe(Some((own, "client")), "metad", addr, "fingerprint");
    assert!(fp.contains("Fingerprint="), "no certificate from {addr}: {fp:?}");
    fp
}

#[test]
fn certificates_rotate_under_load_without_a_failed_syscall() {
    let _one_at_a_time = one_timed_test_at_a_time();
    let c = Cluster::start();
    let p = ports(&c);
    let own = c.state.join("tls");
    let second = c.mount_second(NO_KERNEL_CACHE);
    let load = Load::start(&c, &second, test_seed("certificates_rotate_under_load"));
    load.wait_running();
    let before: Vec<String> = [&p.meta, &p.raft, &p.block]
        .iter()
        .map(|a| fingerprint(&own, a))
        .collect();

    // Every certificate of the cluster is replaced in place, as an operator
    // rotating them would (`jfs admin cert issue` writes each file atomically).
    let start = Instant::now();
    for role in ["metad", "blockd", "client", "admin"] {
        issue(&c, &c.state.join("ca"), &own, role, &format!("local-{role}-2"), "30");
    }
    let addrs = [&p.meta, &p.raft, &p.block];
    wait_for(
        "every server to present its new certificate",
        Duration::from_secs(30),
        || addrs.iter().zip(&before).all(|(a, old)| &fingerprint(&own, a) != old),
    );
    let in_effect = Instant::now();
    let mut faults = vec![Fault {
        label: "rotate every certificate".into(),
        start,
        in_effect,
        end: in_effect,
        new_leader: None,
    }];
    wait_until("the load to go on after the rotation", RECOVERY_DEADLINE, || {
        load.through_since(in_effect)
    });

    // New connections everywhere: a follower metad restarts (Raft both ways
    // with the new certificates) and a new mount comes up with the new client one.
    let leader = wait_leader(&c);
    let follower = [1usize, 2, 3].into_iter().find(|&i| i != leader).expect("a follower");
    let t = Instant::now();
    c.kill9(&format!("metad{follower}"));
    c.local_up();
    wait_all_three_up(&c, "after the restart with new certificates");
    faults.push(Fault {
        label: format!("restart metad{follower} with the new certificate"),
        start: t,
        in_effect: t,
        end: Instant::now(),
        new_leader: None,
    });
    let third = c.mount_second("");
    write_file(&third.path("from-a-new-mount"), b"new cert");
    assert_eq!(fs::read(c.path("from-a-new-mount")).unwrap(), b"new cert");
    third.unmount();

    let mark = Instant::now();
    wait_until("the load to go on after the restart", RECOVERY_DEADLINE, || {
        load.through_since(mark)
    });
    let out = load.stop();
    judge(&c, &second, "certificate rotation", &out, &faults);
    assert!(
        metad_logs(&c).contains("loaded a new certificate"),
        "no metad logged loading the new certificate"
    );
}

/// A config for a client holding `name`'s certificate: the cluster's own
/// config with its TLS directory swapped.
fn client_conf(c: &Cluster, name: &str) -> PathBuf {
    let dir = c.root.join(format!("client-{name}"));
    issue(c, &c.state.join("ca"), &dir, "client", name, "30");
    with_cluster_ca(c, &dir);
    let text = fs::read_to_string(c.conf()).expect("read the cluster config");
    let mut out: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("security.tls.dir"))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("security.tls.dir = \"{}\"\n", dir.display()));
    let path = c.root.join(format!("{name}.toml"));
    fs::write(&path, out).expect("write a client config");
    path
}

#[test]
fn namespaces_admit_only_the_clients_granted_them() {
    let c = Cluster::start();
    let conf = c.conf().to_string_lossy().into_owned();
    let admin = |args: &[&str]| {
        let mut all = vec!["--conf", conf.as_str(), "admin"];
        all.extend_from_slice(args);
        c.jfs_ok(&all)
    };
    admin(&["create-namespace", "shared"]);
    let alice = client_conf(&c, "alice");
    let bob = client_conf(&c, "bob");
    let carol = client_conf(&c, "carol");
    admin(&["namespace", "grant", "shared", "alice"]);
    admin(&["namespace", "grant", "shared", "bob", "--read-only"]);
    admin(&["namespace", "revoke", "shared", "*"]);
    let list = admin(&["list-namespaces"]);
    let row = list.lines().find(|l| l.starts_with("shared")).unwrap_or_default();
    assert!(
        row.contains("alice:rw") && row.contains("bob:ro") && !row.contains("*:"),
        "grants of shared: {list}"
    );

    // No grant: the mount is refused, saying why and what to do.
    let mnt = c.root.join("mnt-carol");
    fs::create_dir_all(&mnt).unwrap();
    let out = run_cmd(
        Command::new(bin("jfs-mountd"))
            .arg("--conf")
            .arg(&carol)
            .arg("shared")
            .arg(&mnt),
        Duration::from_secs(90),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mounted = is_mounted(&mnt);
    if mounted {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    assert!(
        !out.success() && !mounted,
        "carol mounted a namespace she was not granted:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("not granted namespace \"shared\"")
            && out.stderr.contains("jfs admin namespace grant shared carol"),
        "the refusal does not say why: {}",
        out.stderr
    );
    // Other namespaces still take her (new namespaces grant `*`).
    let carol_default = c.mount_namespace(&carol, "default", "");
    write_file(&carol_default.path("carol-was-here"), b"c");
    carol_default.unmount();

    // A read-write grant writes; a read-only one mounts read-only.
    let a = c.mount_namespace(&alice, "shared", "");
    write_file(&a.path("from-alice"), b"alice's data");
    let b = c.mount_namespace(&bob, "shared", "");
    assert!(is_read_only_mount(&b.path("")), "bob's mount is not read-only");
    assert_eq!(fs::read(b.path("from-alice")).unwrap(), b"alice's data");
    let e = fs::write(b.path("from-bob"), b"x").expect_err("bob wrote through a read-only grant");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "bob's write: {e}");
    let e = fs::remove_file(b.path("from-alice")).expect_err("bob removed a file");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "bob's unlink: {e}");

    // metad enforces the grants itself, whatever the client does (asked of
    // the leader: the probe follows no redirects).
    let leader_meta = format!("{}:{}", c.ip, 8101 + 10 * (wait_leader(&c) - 1));
    let own = c.root.join("client-bob");
    let got = probe(Some((&own, "client")), "metad", &leader_meta, "mknod-in=shared");
    assert!(
        got.starts_with("ERR") && got.contains("25027"),
        "bob's own mknod: {got}"
    );
    let own = c.root.join("client-carol");
    let got = probe(Some((&own, "client")), "metad", &leader_meta, "get-namespace=shared");
    assert!(got.starts_with("ERR PermissionDenied 25026"), "carol's lookup: {got}");

    // Revoking takes effect on a live mount at its next call.
    admin(&["namespace", "revoke", "shared", "alice"]);
    let e = fs::write(a.path("after-revoke"), b"x").expect_err("alice wrote after her grant was revoked");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "alice's write after revoke: {e}");
    b.unmount();
    a.unmount();
}

const GARBAGE: &str = env!("CARGO_BIN_EXE_rpcgarbage");

/// Runs rpcgarbage against one service as `role`; returns its summary.
fn garbage(own: &Path, role: &str, expect: &str, addr: &str, service: &str) -> String {
    let out = run_cmd(
        Command::new(GARBAGE)
            .arg("--tls-dir")
            .arg(own)
            .args(["--role", role, "--expect", expect, addr, service]),
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.success(),
        "{service} on {addr} stopped answering under garbage:\n{}",
        out.describe()
    );
    eprintln!("rpcgarbage {service} on {addr} as {role}:\n{}", out.stdout);
    out.stdout
}

/// Bytes that are not TLS, then a TLS-looking record with absurd lengths,
/// at a port: the server must drop the connection, not the process.
fn raw_garbage(addr: &str) {
    use std::io::{Read, Write};
    let payloads: [Vec<u8>; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..65_536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0xff, 0xff, 0xff],
    ];
    for p in payloads {
        let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server may close before reading everything: a failed write is fine.
        let _ = s.write_all(&p);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}

#[test]
fn garbage_and_oversized_requests_leave_every_daemon_serving() {
    let c = Cluster::start();
    let own = c.state.join("tls");
    write_file(&c.path("before"), b"written before the garbage");
    let daemons: Vec<(String, i32)> = ["metad1", "metad2", "metad3", "blockd1", "blockd2", "blockd3"]
        .iter()
        .map(|n| (n.to_string(), c.live_pid(n)))
        .collect();

    for i in 0..3 {
        let meta = format!("{}:{}", c.ip, 8101 + 10 * i);
        let raft = format!("{}:{}", c.ip, 8103 + 10 * i);
        let block = format!("{}:{}", c.ip, 8201 + 10 * i);
        for addr in [&meta, &raft, &block] {
            raw_garbage(addr);
        }
        let summary = garbage(&own, "admin", "metad", &meta, "meta");
        assert!(summary.contains("TOTAL"), "{summary}");
        garbage(&own, "blockd", "blockd", &block, "block");
        if i == 0 {
            garbage(&own, "metad", "metad", &raft, "raft");
        }
    }

    for (name, pid) in &daemons {
        assert!(
            pid_alive(*pid) && c.pid(name) == Some(*pid),
            "{name} (pid {pid}) did not survive the garbage{}",
            c.log_tails()
        );
    }
    // Still serving: the old file reads, a new one writes, metadata is whole.
    assert_eq!(fs::read(c.path("before")).unwrap(), b"written before the garbage");
    write_file(&c.path("after"), b"written after the garbage");
    assert_eq!(fs::read(c.path("after")).unwrap(), b"written after the garbage");
    wait_all_three_up(&c, "every metad in the quorum after the garbage");
}
