//! Two mounts of one namespace (two jfs-mountd processes, each with its own
//! caches) see each other's changes: metadata promptly (within the entry and
//! attribute timeouts), data close-to-open (after the writer's close, the
//! reader's open sees the new content, with no waiting).

use jfs_tests::*;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a metadata change may take to show on the other mount. The
/// default entry/attribute timeouts are 1 s; allow for a loaded machine.
const METADATA_DEADLINE: Duration = Duration::from_secs(3);

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

#[test]
fn metadata_changes_show_on_the_other_mount() {
    let c = Cluster::start();
    let b = c.mount_second("");
    let a = &c.mnt;

    // B looks first, so it may hold a negative entry for the name.
    assert!(!exists(&b.path("dir")), "dir exists before anyone made it");
    fs::create_dir(a.join("dir")).expect("mkdir on A");
    wait_for("B to see the dir A made", METADATA_DEADLINE, || exists(&b.path("dir")));

    write_file(&a.join("dir/f"), b"12345");
    wait_until(
        "B to see A's new file with its size",
        METADATA_DEADLINE,
        || match fs::metadata(b.path("dir/f")) {
            Ok(m) if m.len() == 5 => Ok(()),
            Ok(m) => Err(format!("size {}", m.len())),
            Err(e) => Err(e.to_string()),
        },
    );

    fs::set_permissions(a.join("dir/f"), fs::Permissions::from_mode(0o600)).expect("chmod on A");
    wait_until("B to see A's chmod", METADATA_DEADLINE, || {
        match fs::metadata(b.path("dir/f")) {
            Ok(m) if m.permissions().mode() & 0o7777 == 0o600 => Ok(()),
            Ok(m) => Err(format!("mode {:o}", m.permissions().mode())),
            Err(e) => Err(e.to_string()),
        }
    });

    fs::rename(a.join("dir/f"), a.join("dir/g")).expect("rename on A");
    wait_for("B to see A's rename", METADATA_DEADLINE, || {
        !exists(&b.path("dir/f")) && exists(&b.path("dir/g"))
    });

    fs::hard_link(a.join("dir/g"), a.join("dir/h")).expect("link on A");
    wait_until(
        "B to see the new link count",
        METADATA_DEADLINE,
        || match fs::metadata(b.path("dir/g")) {
            Ok(m) if std::os::unix::fs::MetadataExt::nlink(&m) == 2 => Ok(()),
            Ok(m) => Err(format!("nlink {}", std::os::unix::fs::MetadataExt::nlink(&m))),
            Err(e) => Err(e.to_string()),
        },
    );

    fs::remove_file(a.join("dir/g")).expect("unlink on A");
    fs::remove_file(a.join("dir/h")).expect("unlink on A");
    wait_for("B to see A's unlinks", METADATA_DEADLINE, || {
        !exists(&b.path("dir/g")) && !exists(&b.path("dir/h"))
    });
    wait_for("B's readdir to show the dir empty", METADATA_DEADLINE, || {
        fs::read_dir(b.path("dir"))
            .map(|mut rd| rd.next().is_none())
            .unwrap_or(false)
    });

    // And the other way round.
    fs::create_dir(b.path("fromB")).expect("mkdir on B");
    std::os::unix::fs::symlink("target", b.path("fromB/link")).expect("symlink on B");
    wait_until("A to see B's symlink", METADATA_DEADLINE, || {
        fs::read_link(a.join("fromB/link"))
            .map_err(|e| e.to_string())
            .and_then(|t| {
                if t == Path::new("target") {
                    Ok(())
                } else {
                    Err(format!("target {}", t.display()))
                }
            })
    });
    fs::remove_dir_all(a.join("dir")).expect("rm -r on A");
    wait_for("B to see the dir gone", METADATA_DEADLINE, || !exists(&b.path("dir")));
    b.unmount();
}

/// Reads `p` and compares it with `want`; on a mismatch, says whether the
/// right content shows up later (a cache-invalidation bug) or never.
fn assert_reads(p: &Path, want: &[u8], what: &str) {
    let read = |p: &Path| -> Result<Vec<u8>, String> {
        let mut f = File::open(p).map_err(|e| format!("open: {e}"))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(|e| format!("read: {e}"))?;
        Ok(v)
    };
    let got = read(p);
    if got.as_deref() == Ok(want) {
        return;
    }
    let first = match &got {
        Ok(v) => format!(
            "{} bytes (want {}), first difference at {:?}",
            v.len(),
            want.len(),
            v.iter().zip(want).position(|(x, y)| x != y)
        ),
        Err(e) => e.clone(),
    };
    let start = Instant::now();
    let mut later = "still wrong after 5 s".to_string();
    while start.elapsed() < Duration::from_secs(5) {
        if read(p).as_deref() == Ok(want) {
            later = format!(
                "it became right after {:?} (stale cache, not lost data)",
                start.elapsed()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: open after the writer's close returned stale content: {first}; {later}");
}

#[test]
fn data_is_close_to_open_between_mounts() {
    let c = Cluster::start();
    let b = c.mount_second("");
    let (fa, fb) = (c.path("f"), b.path("f"));

    let v1 = pattern(100_000, 1);
    write_file(&fa, &v1);
    assert_reads(&fb, &v1, "B after A created the file");

    // B has the file cached now; A replaces it with longer content.
    let v2 = pattern(250_000, 2);
    write_file(&fa, &v2);
    assert_reads(&fb, &v2, "B after A rewrote the file longer");

    // Shorter, same length with different bytes, then an append.
    let v3 = pattern(5_000, 3);
    write_file(&fa, &v3);
    assert_reads(&fb, &v3, "B after A rewrote the file shorter");
    let v4 = pattern(5_000, 4);
    write_file(&fa, &v4);
    assert_reads(&fb, &v4, "B after A rewrote the file with the same length");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&fa)
            .expect("open for append on A");
        f.write_all(b"appended").expect("append on A");
    }
    let mut v5 = v4.clone();
    v5.extend_from_slice(b"appended");
    assert_reads(&fb, &v5, "B after A appended");

    // The other direction, and a multi-block file.
    let v6 = pattern((9 << 20) + 17, 6);
    write_file(&fb, &v6);
    assert_reads(&fa, &v6, "A after B wrote a 9 MiB file");
    let v7 = pattern(10, 7);
    write_file(&fb, &v7);
    assert_reads(&fa, &v7, "A after B truncated and rewrote it");
    b.unmount();
}

/// `jfs_client_dir_cache_hits_total` of the mount whose metrics listen on
/// `addr`: lookups it answered "no such name" without asking metad.
fn dir_cache_hits(addr: &str) -> f64 {
    let out = run_cmd(
        std::process::Command::new("curl").args([
            "-sS",
            "--fail",
            "--max-time",
            "10",
            &format!("http://{addr}/metrics"),
        ]),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("curl http://{addr}/metrics: {e}"));
    assert!(out.success(), "curl http://{addr}/metrics failed: {}", out.describe());
    out.stdout
        .lines()
        .filter(|l| {
            l.starts_with("jfs_client_dir_cache_hits_total ") || l.starts_with("jfs_client_dir_cache_hits_total{")
        })
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.trim().parse::<f64>().expect("a number"))
        .sum()
}

/// A mount answers lookups of names it knows are absent (in directories it
/// made or listed) without asking metad. The documented bound: another
/// mount's new name shows on it at most the entry timeout after it was
/// made, and at once after this mount's own change in that directory
/// shows that someone else changed it.
#[test]
fn a_name_known_absent_shows_within_the_entry_timeout() {
    let c = Cluster::start();
    let ttl = Duration::from_secs(5);
    let metrics = format!("{}:8409", c.ip);
    let b = c.mount_second(&format!("entry_timeout={},metrics={metrics}", ttl.as_secs()));
    let a = &c.mnt;

    // 1. B made the directory, so it knows it is empty.
    fs::create_dir(b.path("made")).expect("mkdir on B");
    let made_at = Instant::now();
    let hits = dir_cache_hits(&metrics);
    assert!(!exists(&b.path("made/x")), "x exists before anyone made it");
    if made_at.elapsed() < ttl {
        assert_eq!(
            dir_cache_hits(&metrics),
            hits + 1.0,
            "B asked metad about a name in a directory it had just made"
        );
    }
    write_file(&a.join("made/x"), b"from A");
    let acked = Instant::now();
    let hidden = !exists(&b.path("made/x"));
    // Past the bound, the first lookup must find it.
    std::thread::sleep(ttl.saturating_sub(acked.elapsed()));
    assert!(
        exists(&b.path("made/x")),
        "B still does not see A's file {:?} after A created it (bound: the {ttl:?} entry timeout)",
        acked.elapsed()
    );
    eprintln!("A's new name right after its create: hidden on B = {hidden}");

    // 2. The same for a directory B listed.
    fs::create_dir(a.join("listed")).expect("mkdir on A");
    write_file(&a.join("listed/there"), b"1");
    let names: Vec<_> = fs::read_dir(b.path("listed"))
        .expect("ls on B")
        .map(|e| e.expect("readdir entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("there")]);
    let listed_at = Instant::now();
    let hits = dir_cache_hits(&metrics);
    assert!(!exists(&b.path("listed/y")), "y exists before anyone made it");
    if listed_at.elapsed() < ttl {
        assert_eq!(
            dir_cache_hits(&metrics),
            hits + 1.0,
            "B asked metad about a name in a directory it had just listed"
        );
    }
    write_file(&a.join("listed/y"), b"from A");
    let acked = Instant::now();
    std::thread::sleep(ttl.saturating_sub(acked.elapsed()));
    assert!(
        exists(&b.path("listed/y")),
        "B still does not see A's file {:?} after A created it",
        acked.elapsed()
    );

    // 3. B's own change shows B that the directory moved under it: what it
    // knew is dropped and A's name shows at once, with no waiting.
    fs::create_dir(b.path("own")).expect("mkdir on B");
    write_file(&a.join("own/fromA"), b"1");
    write_file(&b.path("own/fromB"), b"2");
    assert!(
        exists(&b.path("own/fromA")),
        "B's own create in the directory did not reveal A's file made before it"
    );
    // And B still knows its own: removing its file leaves its lookups right.
    fs::remove_file(b.path("own/fromB")).expect("unlink on B");
    assert!(!exists(&b.path("own/fromB")), "B's unlinked file still shows on B");
    assert!(exists(&a.join("own/fromA")) && !exists(&a.join("own/fromB")));
    b.unmount();
}
