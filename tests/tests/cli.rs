//! The operator's side: `jfs local up` reaches a usable mount within a
//! minute and is idempotent, `jfs metastatus` shows every node, `jfs fs
//! count` matches the tree, `jfs fs ls|cat|put|get|mkdir|rm` work without a
//! mount, and `mount.jfs` (jfs-mountd under that name) mounts and `umount`
//! ends it cleanly.

use jfs_tests::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::Duration;

#[test]
fn local_up_gives_a_usable_mount_within_a_minute() {
    let c = Cluster::start();
    eprintln!("jfs local up to a usable mount: {:?}", c.startup);
    assert!(
        c.startup < Duration::from_secs(60),
        "jfs local up took {:?} to a usable mount",
        c.startup
    );
    for n in c.server_names() {
        c.live_pid(&n);
    }
    assert!(c.mountd_pid().is_some(), "no jfs-mountd serves {}", c.mnt.display());
    // Ordinary use right away.
    c.sh("echo hello > greeting && cat greeting && ls -l greeting && cp greeting copy && cmp greeting copy");
}

#[test]
fn local_up_again_is_idempotent_and_restarts_only_what_died() {
    let c = Cluster::start();
    let before: Vec<(String, i32)> = c
        .server_names()
        .into_iter()
        .map(|n| (n.clone(), c.live_pid(&n)))
        .collect();
    let mountd = c.mountd_pid().expect("jfs-mountd pid");
    c.local_up();
    for (n, pid) in &before {
        assert_eq!(
            c.live_pid(n),
            *pid,
            "a second `jfs local up` restarted {n}, which was running"
        );
    }
    assert_eq!(
        c.mountd_pid(),
        Some(mountd),
        "a second `jfs local up` replaced the running jfs-mountd"
    );
    assert_eq!(
        mounts().iter().filter(|(p, _)| p == &c.mnt).count(),
        1,
        "a second `jfs local up` stacked another mount on {}",
        c.mnt.display()
    );
    c.kill9("blockd2");
    c.kill9("metad3");
    c.local_up();
    for (n, pid) in &before {
        let now = c.live_pid(n);
        if n == "blockd2" || n == "metad3" {
            assert_ne!(now, *pid, "{n} was killed but has the old pid");
        } else {
            assert_eq!(now, *pid, "`jfs local up` restarted {n}, which was running");
        }
    }
    c.sh("echo ok > f && cat f");
}

#[test]
fn metastatus_shows_every_node_with_one_leader() {
    let c = Cluster::start();
    let dir = c.state.to_string_lossy().into_owned();
    for args in [
        vec!["metastatus", "--dir", dir.as_str()],
        vec!["metastatus", "--detail", "--dir", dir.as_str()],
    ] {
        // A node that started last may still be catching up right after `local up`;
        // the cluster must settle to one leader and two followers within seconds.
        let out = wait_until(
            &format!("`jfs {}` to show 1 leader and 2 followers", args.join(" ")),
            Duration::from_secs(15),
            || {
                let res = c.jfs(&args);
                let out = res.stdout.clone();
                if !res.success() {
                    return Err(res.describe());
                }
                let leaders = out.lines().filter(|l| is_leader_line(l)).count();
                let followers = out
                    .lines()
                    .filter(|l| l.split_whitespace().any(|w| w == "follower"))
                    .count();
                if (leaders, followers) == (1, 2) {
                    Ok(out)
                } else {
                    Err(format!("{leaders} leader(s), {followers} follower(s):\n{out}"))
                }
            },
        );
        for i in 0..3 {
            let addr = format!("{}:{}", c.ip, 8101 + 10 * i);
            assert!(
                out.contains(&addr),
                "`jfs {}` does not list {addr}:\n{out}",
                args.join(" ")
            );
        }
    }
    let conf = c.conf().to_string_lossy().into_owned();
    let out = c.jfs_ok(&["--conf", &conf, "metastatus"]);
    assert_eq!(
        out.lines().filter(|l| is_leader_line(l)).count(),
        1,
        "metastatus --conf:\n{out}"
    );
}

#[test]
fn fs_count_matches_the_tree() {
    let c = Cluster::start();
    c.sh(r#"
        mkdir -p a/b c
        head -c 1000 /dev/zero > a/f1
        head -c 5000000 /dev/zero > a/b/f2
        : > c/empty
        printf xyz > top
        ln -s top link
        "#);
    let conf = c.conf().to_string_lossy().into_owned();
    let out = c.jfs_ok(&["--conf", &conf, "fs", "count", "jfs://default/"]);
    let cols: Vec<&str> = out.split_whitespace().collect();
    // DIR_COUNT (including the root, as hadoop counts it) FILE_COUNT CONTENT_SIZE PATHNAME;
    // a symlink counts as a file (as in HDFS) with no content bytes.
    assert!(cols.len() >= 4, "`jfs fs count` printed too few columns:\n{out}");
    let dirs: u64 = cols[0]
        .parse()
        .unwrap_or_else(|_| panic!("DIR_COUNT is not a number:\n{out}"));
    let files: u64 = cols[1]
        .parse()
        .unwrap_or_else(|_| panic!("FILE_COUNT is not a number:\n{out}"));
    let bytes: u64 = cols[2]
        .parse()
        .unwrap_or_else(|_| panic!("CONTENT_SIZE is not a number:\n{out}"));
    assert_eq!(dirs, 4, "DIR_COUNT of / (itself, a, a/b, c):\n{out}");
    assert_eq!(files, 5, "FILE_COUNT (4 files and 1 symlink):\n{out}");
    assert_eq!(bytes, 1000 + 5_000_000 + 3, "CONTENT_SIZE:\n{out}");
    let out = c.jfs_ok(&["--conf", &conf, "fs", "count", "jfs://default/a"]);
    let cols: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        &cols[..3],
        &["2", "2", "5001000"],
        "`jfs fs count jfs://default/a`:\n{out}"
    );
}

#[test]
fn fs_commands_work_without_a_mount() {
    let c = Cluster::start();
    let conf = c.conf().to_string_lossy().into_owned();
    let jfs = |args: &[&str]| {
        let mut v = vec!["--conf", conf.as_str()];
        v.extend_from_slice(args);
        c.jfs_ok(&v)
    };
    let local = c.local.join("upload");
    write_file(&local, &pattern(5 * MIB as usize + 3, 11));
    jfs(&["fs", "mkdir", "-p", "jfs://default/x/y"]);
    jfs(&["fs", "put", &local.to_string_lossy(), "jfs://default/x/y/up"]);
    // What the CLI wrote is what the mount reads.
    wait_for("the mount to see the CLI's file", Duration::from_secs(3), || {
        c.path("x/y/up").exists()
    });
    assert_same_file(&local, &c.path("x/y/up"));
    // And the other way round.
    write_file(&c.path("x/mounted"), b"written through the mount");
    assert_eq!(
        jfs(&["fs", "cat", "jfs://default/x/mounted"]),
        "written through the mount"
    );
    let got = c.local.join("download");
    jfs(&["fs", "get", "jfs://default/x/y/up", &got.to_string_lossy()]);
    assert_same_file(&local, &got);
    let ls = jfs(&["fs", "ls", "jfs://default/x"]);
    assert!(
        ls.contains("mounted") && ls.contains('y'),
        "`jfs fs ls jfs://default/x`:\n{ls}"
    );
    let ls = jfs(&["fs", "ls", "-l", "jfs://default/x/y"]);
    assert!(
        ls.contains("5242883") && ls.contains("up"),
        "`jfs fs ls -l` should show the size:\n{ls}"
    );
    // Errors are errors.
    let mut args = vec!["--conf", conf.as_str()];
    args.extend(["fs", "cat", "jfs://default/nope"]);
    let out = c.jfs(&args);
    assert!(
        !out.success(),
        "`jfs fs cat` of a missing file succeeded:\n{}",
        out.describe()
    );
    jfs(&["fs", "rm", "jfs://default/x/mounted"]);
    jfs(&["fs", "rm", "-r", "jfs://default/x"]);
    wait_for("the mount to see the CLI's rm -r", Duration::from_secs(3), || {
        !c.path("x").exists()
    });
}

#[test]
fn mount_jfs_helper_mounts_and_umount_ends_it() {
    let c = Cluster::start();
    let helper_dir = c.root.join("sbin");
    fs::create_dir(&helper_dir).expect("mkdir sbin");
    let helper = helper_dir.join("mount.jfs");
    symlink(bin("jfs-mountd"), &helper).expect("symlink mount.jfs");
    let mp = c.root.join("helper-mnt");
    fs::create_dir(&mp).expect("mkdir mountpoint");
    let opts = format!("rw,nosuid,nodev,noatime,_netdev,conf={}", c.conf().display());
    // As mount(8) calls it: mount.jfs SPEC DIR -o OPTIONS.
    let mut cmd = Command::new(&helper);
    cmd.arg("default").arg(&mp).arg("-o").arg(&opts);
    let out = run_cmd(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "mount.jfs failed:\n{}{}", out.describe(), c.log_tails());
    assert!(
        is_mounted(&mp),
        "mount.jfs exited 0 but {} is not mounted yet",
        mp.display()
    );
    fs::write(mp.join("via-helper"), b"hi").expect("write through the helper's mount");
    wait_for("the main mount to see the file", Duration::from_secs(3), || {
        c.path("via-helper").exists()
    });
    let mp_s = mp.to_string_lossy().into_owned();
    let daemons: Vec<i32> = pids_mentioning(&mp_s);
    assert!(
        !daemons.is_empty(),
        "no daemon process mentions {mp_s} in its command line"
    );
    let out = run_cmd(Command::new("umount").arg(&mp), Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "umount {mp_s}:\n{}", out.describe());
    assert!(!is_mounted(&mp), "still mounted after umount");
    wait_for(
        "the helper's jfs-mountd to exit after umount",
        Duration::from_secs(20),
        || daemons.iter().all(|&p| !pid_alive(p)),
    );

    // With the helper installed system-wide (scripts/install.sh), mount(8) itself works too.
    // Only when the installed helper is this build's jfs-mountd: an older install proves nothing.
    let installed = fs::read("/sbin/mount.jfs").ok();
    if installed.is_some() && installed == fs::read(bin("jfs-mountd")).ok() {
        let out = run_cmd(
            Command::new("mount")
                .args(["-t", "jfs", "-o"])
                .arg(format!("conf={}", c.conf().display()))
                .arg("default")
                .arg(&mp),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.success(), "mount -t jfs failed:\n{}", out.describe());
        assert_eq!(fs::read(mp.join("via-helper")).expect("read via mount -t jfs"), b"hi");
        let out = run_cmd(Command::new("umount").arg(&mp), Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.success(), "umount after mount -t jfs:\n{}", out.describe());
    } else {
        eprintln!("/sbin/mount.jfs is missing or not this build's jfs-mountd (scripts/install.sh installs it): skipped `mount -t jfs`");
    }
}
