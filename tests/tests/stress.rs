//! Four processes hammer one directory of a mount with random operations at
//! once, and the mount survives: no EIO, no ENOTCONN, no ESTALE storm, no
//! crashed worker, the daemon is alive afterwards, every file can be read
//! completely, and `rm -rf` removes it all.
//!
//! Each worker (`stress_worker.py`, run by python3) does `JFS_TEST_STRESS_OPS`
//! (default 20,000) random operations on a handful of shared names: pread /
//! pwrite at random offsets, mmap reads and writes (msync), truncate,
//! copy_file_range, posix_fallocate, punch-hole, rename, link, unlink, mkdir,
//! rmdir, files in subdirectories, readdir + lstat. Errors that racing
//! workers legitimately cause (ENOENT, EEXIST, ENOTEMPTY, EINVAL from
//! copy_file_range within one file) are counted; anything else ends the
//! worker with FATAL and fails the test. Each worker also keeps a private
//! file with an in-memory model and checks every read of it, so data written
//! under this load is verified too.
//!
//! The seed is printed; `JFS_TEST_SEED=<n>` replays one (the interleaving of
//! the workers differs from run to run, of course). `JFS_TEST_STRESS_SECS`
//! bounds the run (default 720 s); `JFS_TEST_NO_PUNCH_HOLE=1` makes the
//! workers skip punch-hole, only to try the rest on a build without it.
//! `JFS_TEST_STRESS_SHARED_MMAP=1` turns on the mmap operation, which is off
//! by default while its known SIGBUS race is open (docs/KNOWN_ISSUES.md).
//! ESTALE is tolerated up to 20 times per worker (a rare race), more is a
//! storm and fails. A worker killed by a signal (SIGBUS from a mapped page
//! the mount could not read, say) fails the test with its last output lines
//! and the Python traceback of where it died.

use jfs_tests::*;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const WORKERS: u64 = 4;
const WORKER_SCRIPT: &str = include_str!("stress_worker.py");

/// Reads every file under `dir` completely; returns (directories, files, bytes).
fn walk_and_read(dir: &Path) -> Result<(u64, u64, u64), String> {
    let (mut dirs, mut files, mut bytes) = (1u64, 0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|e| format!("read_dir {}: {e}", d.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("read_dir {}: {e}", d.display()))?;
            let p = e.path();
            let m = fs::symlink_metadata(&p).map_err(|e| format!("lstat {}: {e}", p.display()))?;
            if m.is_dir() {
                dirs += 1;
                stack.push(p);
            } else if m.is_file() {
                files += 1;
                let mut f = File::open(&p).map_err(|e| format!("open {}: {e}", p.display()))?;
                let mut n = 0u64;
                loop {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(e) => return Err(format!("read {} at {n}: {e}", p.display())),
                    }
                }
                let size = f.metadata().map_err(|e| format!("fstat {}: {e}", p.display()))?.len();
                if n != size {
                    return Err(format!("{}: read {n} bytes but st_size is {size}", p.display()));
                }
                close_checked(f).map_err(|e| format!("close {}: {e}", p.display()))?;
                bytes += n;
            }
        }
    }
    Ok((dirs, files, bytes))
}

#[test]
fn four_processes_twenty_thousand_random_ops() {
    let seed = test_seed("four_processes_twenty_thousand_random_ops");
    let nops = env_count("JFS_TEST_STRESS_OPS", 20_000);
    let deadline = Duration::from_secs(env_count("JFS_TEST_STRESS_SECS", 720));
    let no_punch = std::env::var_os("JFS_TEST_NO_PUNCH_HOLE").is_some();
    if no_punch {
        eprintln!("WARNING: JFS_TEST_NO_PUNCH_HOLE is set: the workers skip punch-hole");
    }
    // Known bug (docs/KNOWN_ISSUES.md): an mmap of a shared file that
    // other workers create and grow at the same moment can die of SIGBUS.
    let shared_mmap = std::env::var_os("JFS_TEST_STRESS_SHARED_MMAP").is_some();
    if !shared_mmap {
        eprintln!("mmap of shared files is off (known SIGBUS race); JFS_TEST_STRESS_SHARED_MMAP=1 turns it on");
    }
    let c = Cluster::start();
    let mountd = c
        .mountd_pid()
        .unwrap_or_else(|| panic!("cannot find the jfs-mountd of {}", c.mnt.display()));
    let script = c.root.join("stress_worker.py");
    fs::write(&script, WORKER_SCRIPT).expect("write the worker script");
    let work = c.path("work");
    fs::create_dir(&work).unwrap_or_else(|e| panic!("mkdir {}: {e}", work.display()));

    let start = Instant::now();
    let mut workers: Vec<(u64, Child, std::path::PathBuf)> = (0..WORKERS)
        .map(|i| {
            let out = c.root.join(format!("worker{i}.out"));
            let f = File::create(&out).expect("create worker output file");
            let child = Command::new("python3")
                .arg(&script)
                .arg(&work)
                .arg((seed.wrapping_add(i) % (1 << 62)).to_string())
                .arg(nops.to_string())
                .arg(i.to_string())
                .arg(if no_punch { "1" } else { "0" })
                .arg(if shared_mmap { "1" } else { "0" })
                .stdin(Stdio::null())
                .stdout(Stdio::from(f.try_clone().expect("dup")))
                .stderr(Stdio::from(f))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start python3 for worker {i}: {e}"));
            (i, child, out)
        })
        .collect();

    // Wait for all workers, bounded.
    let mut results: Vec<(u64, String, String)> = Vec::new();
    let output = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    while !workers.is_empty() {
        if start.elapsed() > deadline {
            let mut progress = String::new();
            for (i, child, out) in workers.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
                let text = output(out);
                progress.push_str(&format!(
                    "\nworker {i}: {}",
                    text.lines().last().unwrap_or("(no output)")
                ));
            }
            panic!(
                "workers did not finish {nops} ops each within {deadline:?} (JFS_TEST_STRESS_SECS); \
                 last progress lines:{progress}\nmountd alive: {}{}",
                pid_alive(mountd),
                c.log_tails()
            );
        }
        let mut i = 0;
        while i < workers.len() {
            match workers[i].1.try_wait() {
                Ok(Some(st)) => {
                    let (n, _, out) = workers.remove(i);
                    results.push((n, st.to_string(), output(&out)));
                    if !st.success() {
                        // Stop the others: the test has failed.
                        for (_, child, _) in workers.iter_mut() {
                            let _ = child.kill();
                            let _ = child.wait();
                        }
                        let text = results.last().map(|r| r.2.clone()).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        let last = &lines[lines.len().saturating_sub(30)..];
                        panic!(
                            "worker {n} failed ({st}) after {:.1?}; the last lines of its output:\n{}\nmountd alive: {}{}",
                            start.elapsed(),
                            last.join("\n"),
                            pid_alive(mountd),
                            c.log_tails()
                        );
                    }
                }
                Ok(None) => i += 1,
                Err(e) => panic!("waiting for worker {}: {e}", workers[i].0),
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let ran = start.elapsed();
    results.sort_by_key(|r| r.0);
    for (n, _, out) in &results {
        eprintln!("worker {n}: {}", out.lines().last().unwrap_or(""));
    }
    eprintln!(
        "{WORKERS} workers x {nops} ops in {ran:.1?} ({:.0} ops/s in total)",
        (WORKERS * nops) as f64 / ran.as_secs_f64()
    );

    // The mount is alive and whole.
    assert!(
        pid_alive(mountd),
        "jfs-mountd (pid {mountd}) died during the stress run{}",
        c.log_tails()
    );
    fs::metadata(&c.mnt).unwrap_or_else(|e| panic!("stat of the mount root after the run: {e}{}", c.log_tails()));
    let (dirs, files, bytes) =
        walk_and_read(&work).unwrap_or_else(|e| panic!("walking and reading the work tree: {e}{}", c.log_tails()));
    eprintln!("work tree: {dirs} directories, {files} files, {bytes} bytes, all read completely");
    let out = sh_result(&c.mnt, "rm -rf work", CMD_TIMEOUT);
    assert!(
        out.success(),
        "rm -rf work failed:\n{}{}",
        out.describe(),
        c.log_tails()
    );
    assert!(
        fs::symlink_metadata(&work).is_err(),
        "{} still exists after rm -rf",
        work.display()
    );
    assert!(
        pid_alive(mountd),
        "jfs-mountd (pid {mountd}) died at the end{}",
        c.log_tails()
    );
}
