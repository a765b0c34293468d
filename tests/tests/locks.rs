//! Locks hold across mounts: an `flock` and an `fcntl` write lock taken
//! through one mount block another mount; F_GETLK there names the holder;
//! closing releases them; and when the holding mountd is killed, its
//! session expires and the locks are released within the session timeout.

use jfs_tests::*;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const SESSION: Duration = Duration::from_secs(5);

/// `fcntl` with a write (or read/unlock) lock over [start, start+len).
fn setlk(f: &File, cmd: libc::c_int, typ: libc::c_int, start: i64, len: i64) -> Result<(), i32> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fl is a valid, initialised flock for the duration of the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn getlk(f: &File, start: i64, len: i64) -> libc::flock {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_GETLK: {}", std::io::Error::last_os_error());
    fl
}

fn flock(f: &File, op: libc::c_int) -> Result<(), i32> {
    // SAFETY: a plain syscall on an open descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn open_rw(p: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// A cluster whose sessions (and the leader's grace after taking over) last
/// `SESSION`, so a crashed holder's locks go within seconds.
fn cluster_with_short_sessions() -> Cluster {
    let c = Cluster::start();
    c.restart_with_setting(&format!("client.session-timeout-ms = {}", SESSION.as_millis()));
    c
}

#[test]
fn flock_and_fcntl_locks_hold_across_mounts_and_go_with_a_killed_holder() {
    let c = cluster_with_short_sessions();
    for name in ["f-flock", "f-fcntl"] {
        fs::write(c.path(name), b"0123456789").unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    let mut a = c.mount_second("");
    let b = |name: &str| c.path(name);

    // flock: exclusive on A blocks B; released by close on A.
    let fa = open_rw(&a.path("f-flock"));
    assert_eq!(flock(&fa, libc::LOCK_EX | libc::LOCK_NB), Ok(()), "flock on mount A");
    let fb = open_rw(&b("f-flock"));
    assert_eq!(
        flock(&fb, libc::LOCK_EX | libc::LOCK_NB),
        Err(libc::EWOULDBLOCK),
        "flock on mount B while A holds it"
    );
    // FUSE sends the flock release of a closed file asynchronously (in
    // RELEASE), so B waits for it, as a program using flock would.
    let closed = Instant::now();
    drop(fa);
    assert_eq!(flock(&fb, libc::LOCK_EX), Ok(()), "blocking flock on B after A closed");
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "A's close released its flock only after {:?}",
        closed.elapsed()
    );
    assert_eq!(flock(&fb, libc::LOCK_UN), Ok(()));

    // fcntl: a write lock on bytes 0..100 on A; B's overlapping lock fails,
    // B's F_GETLK names it, a lock beside it is fine.
    let ga = open_rw(&a.path("f-fcntl"));
    assert_eq!(
        setlk(&ga, libc::F_SETLK, libc::F_WRLCK, 0, 100),
        Ok(()),
        "fcntl lock on A"
    );
    let gb = open_rw(&b("f-fcntl"));
    assert_eq!(
        setlk(&gb, libc::F_SETLK, libc::F_WRLCK, 50, 10),
        Err(libc::EAGAIN),
        "overlapping fcntl lock on B"
    );
    let seen = getlk(&gb, 50, 10);
    assert_eq!(seen.l_type as i32, libc::F_WRLCK, "F_GETLK on B sees A's lock");
    assert_eq!((seen.l_start, seen.l_len), (0, 100), "with its range");
    assert_eq!(seen.l_pid as u32, std::process::id(), "and its holder's pid");
    assert_eq!(
        setlk(&gb, libc::F_SETLK, libc::F_WRLCK, 100, 10),
        Ok(()),
        "a lock beside it"
    );
    assert_eq!(setlk(&gb, libc::F_SETLK, libc::F_UNLCK, 100, 10), Ok(()));

    // A's mountd dies holding the lock (and a flock): B's blocking request
    // gets it once A's session expires.
    let fa = open_rw(&a.path("f-flock"));
    assert_eq!(flock(&fa, libc::LOCK_EX | libc::LOCK_NB), Ok(()));
    let killed = Instant::now();
    a.kill9();
    std::mem::forget(ga);
    std::mem::forget(fa);
    assert_eq!(
        setlk(&gb, libc::F_SETLKW, libc::F_WRLCK, 0, 100),
        Ok(()),
        "F_SETLKW on B"
    );
    let took = killed.elapsed();
    eprintln!("B got the lock {took:?} after A's mountd was killed (session timeout {SESSION:?})");
    assert!(
        took < SESSION * 3,
        "the killed holder's lock was released only after {took:?}"
    );
    assert_eq!(flock(&fb, libc::LOCK_EX | libc::LOCK_NB), Ok(()), "and its flock");
}
