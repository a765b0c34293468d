//! Quorum lost: with two of the three metads killed, a metadata syscall on a
//! mount blocks for about `client.timeout-ms` and then fails with EIO (it
//! neither hangs nor fails at once); once the nodes are back, the same mount
//! (no remount) works again and still reads what was written before.

use jfs_tests::*;
use std::fs;
use std::time::{Duration, Instant};

/// The client timeout of the mount under test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn syscalls_fail_with_eio_after_the_client_timeout_and_the_mount_recovers() {
    let c = Cluster::start();
    let data = pattern((3 * MIB + 17) as usize, 77);
    write_file(&c.path("written-before"), &data);

    // A second mount whose client gives up after 5 s (the default is 60 s).
    let conf = c.root.join("jfs-short-timeout.toml");
    let mut text = fs::read_to_string(c.conf()).unwrap_or_else(|e| panic!("read {}: {e}", c.conf().display()));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("client.timeout-ms = {}\n", CLIENT_TIMEOUT.as_millis()));
    fs::write(&conf, text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
    let m = c.mount_second_with_conf(&conf, "");

    // Kill the leader and one follower: no majority is left.
    let leader = wait_until("a metad leader", Duration::from_secs(30), || {
        c.leader_index()
            .ok_or_else(|| "`jfs metastatus` shows no leader".to_string())
    });
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    c.kill9(&format!("metad{leader}"));
    c.kill9(&format!("metad{follower}"));
    eprintln!("killed metad{leader} (leader) and metad{follower}; one metad is left");

    // A fresh name: the kernel cannot answer from its caches, the mount must
    // ask metad. One mkdir(2), timed.
    let lost = m.path("made-without-quorum");
    let t0 = Instant::now();
    let r = fs::create_dir(&lost);
    let took = t0.elapsed();
    eprintln!("mkdir without quorum returned {r:?} after {took:?}");
    let errno = errno_of(r, "mkdir on a mount whose metad quorum is lost");
    assert_eq!(
        errno,
        libc::EIO,
        "mkdir without quorum should fail with EIO, got {} ({}) after {took:?}\nmountd log:\n{}",
        errno_name(errno),
        std::io::Error::from_raw_os_error(errno),
        m.log_text()
    );
    assert!(
        took >= CLIENT_TIMEOUT - Duration::from_secs(1),
        "mkdir without quorum failed after only {took:?}: the client should keep trying for its \
         client.timeout-ms ({CLIENT_TIMEOUT:?}) before giving up\nmountd log:\n{}",
        m.log_text()
    );
    assert!(
        took <= Duration::from_secs(20),
        "mkdir without quorum took {took:?}, far beyond client.timeout-ms ({CLIENT_TIMEOUT:?})"
    );

    // Quorum back: the same mount, not remounted.
    c.local_up();
    let back = wait_until("a metad leader after the restart", Duration::from_secs(60), || {
        c.leader_index()
            .ok_or_else(|| "`jfs metastatus` shows no leader".to_string())
    });
    eprintln!("metad{back} leads again");
    let made = m.path("made-after-quorum-returned");
    let r = fs::create_dir(&made);
    assert!(
        r.is_ok(),
        "the first mkdir on the same mount after quorum returned (metad{back} leads) failed: {r:?}\n\
         mountd log:\n{}{}",
        m.log_text(),
        c.log_tails()
    );
    assert!(
        fs::metadata(&made).is_ok_and(|md| md.is_dir()),
        "{} is not a directory after mkdir succeeded",
        made.display()
    );
    assert!(
        fs::metadata(c.path("made-after-quorum-returned")).is_ok_and(|md| md.is_dir()),
        "the directory made on the second mount is not visible on the first"
    );
    let got = fs::read(m.path("written-before")).unwrap_or_else(|e| {
        panic!(
            "read the file written before the outage through the same mount: {e}\nmountd log:\n{}",
            m.log_text()
        )
    });
    if let Some(d) = describe_difference(&data, &got) {
        panic!("the file written before the outage reads back wrong through the same mount: {d}");
    }
    eprintln!(
        "after the outage, {} exists: {}",
        lost.display(),
        fs::metadata(&lost).is_ok()
    );
    m.unmount();
}
