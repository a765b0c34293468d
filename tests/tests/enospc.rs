//! A full cluster says ENOSPC, like a full disk: every blockd's data
//! directory is a small tmpfs; a write that does not fit fails with ENOSPC
//! (not EIO), no daemon dies, files written before read back, the blocks
//! the failed write stored are handed back at once, and after deletes (and
//! the GC grace period) the space returns and writes work again.

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use jfs_tests::*;

const MIB: usize = 1 << 20;
const TMPFS_MIB: u64 = 48;

/// Unmounts the tmpfs mounts on drop (after the cluster: declared before
/// it), then removes what the cluster's cleanup could not (the mountpoints).
struct Tmpfs(Vec<PathBuf>, Option<PathBuf>);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        if let Some(root) = &self.1 {
            if !std::thread::panicking() {
                let _ = fs::remove_dir_all(root);
            }
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `data`, fsyncs and closes; returns the errno of the first call
/// that failed (0 if none), checking each call once as a program would.
fn write_errno(path: &std::path::Path, data: &[u8]) -> i32 {
    let mut f = match File::create(path) {
        Ok(f) => f,
        Err(e) => return e.raw_os_error().unwrap_or(-1),
    };
    for chunk in data.chunks(MIB) {
        if let Err(e) = f.write_all(chunk) {
            return e.raw_os_error().unwrap_or(-1);
        }
    }
    if let Err(e) = f.sync_all() {
        return e.raw_os_error().unwrap_or(-1);
    }
    match close_checked(f) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn free_bytes(dir: &std::path::Path) -> u64 {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct we pass.
    if unsafe { libc::statvfs(cpath(dir).as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

#[test]
fn a_full_cluster_fails_writes_with_enospc_and_recovers_after_deletes() {
    let mut tmpfs = Tmpfs(Vec::new(), None);
    let c = Cluster::start();
    tmpfs.1 = Some(c.root.clone());
    let early = pattern(MIB + 17, 1);
    let p = c.path("early");
    assert_eq!(write_errno(&p, &early), 0, "writing a small file before the disks fill");

    // Move every blockd onto a small tmpfs, keeping its identity and blocks.
    for name in ["blockd1", "blockd2", "blockd3"] {
        c.kill9(name);
    }
    for d in c.blockd_dirs() {
        let keep = c
            .root
            .join(format!("{}-saved", d.file_name().unwrap().to_string_lossy()));
        run(Command::new("mv").arg(&d).arg(&keep));
        fs::create_dir(&d).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"])
            .arg(&d));
        tmpfs.0.push(d.clone());
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", keep.display()))
            .arg(&d));
        fs::remove_file(d.join("LOCK")).ok();
    }
    c.local_up();
    wait_until("3 live blockds on tmpfs", Duration::from_secs(60), || {
        let l = c.blockd_list();
        (l.iter()
            .filter(|r| r.state == "live" && r.capacity <= TMPFS_MIB << 20)
            .count()
            == 3)
            .then_some(())
            .ok_or(format!("{l:?}"))
    });

    // A committed file that takes a quarter of each disk...
    let filler = pattern(12 * MIB, 4);
    assert_eq!(write_errno(&c.path("filler"), &filler), 0, "writing a file that fits");
    // ...then more than fits: each blockd gets a copy of every block.
    let big = pattern(3 * TMPFS_MIB as usize * MIB / 2, 2);
    let errno = write_errno(&c.path("big"), &big);
    assert_eq!(
        errno,
        libc::ENOSPC,
        "writing more than the cluster holds: first failing call gave {} ({}), want ENOSPC{}",
        errno,
        errno_name(errno),
        c.log_tails()
    );
    for name in ["metad1", "metad2", "metad3", "blockd1", "blockd2", "blockd3"] {
        c.live_pid(name);
    }
    assert!(c.mountd_pid().is_some_and(pid_alive), "mountd died");
    let got = fs::read(&p).expect("read the early file on a full cluster");
    assert!(describe_difference(&early, &got).is_none(), "the early file changed");

    // metad sees the disks full (its view comes with heartbeats)...
    wait_until("metad to see a full blockd", Duration::from_secs(60), || {
        let l = c.blockd_list();
        l.iter()
            .any(|r| r.capacity.saturating_sub(r.used) < 4 << 20)
            .then_some(())
            .ok_or(format!("{l:?}"))
    });
    // ...and deleting frees the space once the grace period (10 s) is over.
    fs::remove_file(c.path("big")).expect("unlink big");
    fs::remove_file(c.path("filler")).expect("unlink filler");
    let dirs = c.blockd_dirs();
    wait_until("space back on every blockd", Duration::from_secs(120), || {
        let l = c.blockd_list();
        // 40 of 48 MiB: only if the filler's committed blocks were freed.
        let disks_free = dirs.iter().all(|d| free_bytes(d) >= 40 << 20);
        (disks_free && l.iter().all(|r| r.capacity.saturating_sub(r.used) >= 40 << 20))
            .then_some(())
            .ok_or(format!(
                "{l:?}; free on disk: {:?}",
                dirs.iter().map(|d| free_bytes(d)).collect::<Vec<_>>()
            ))
    });
    let again = pattern(8 * MIB + 5, 3);
    assert_eq!(
        write_errno(&c.path("again"), &again),
        0,
        "writing after deletes freed space"
    );
    let m = c.mount_second("");
    let got = fs::read(m.path("again")).expect("read back");
    assert!(
        describe_difference(&again, &got).is_none(),
        "the file written after deletes differs"
    );
    m.unmount();
}
