//! Blocks heal themselves: a dead or removed blockd's copies are made again
//! elsewhere, copies on a blockd that comes back are trimmed, a corrupt
//! copy is replaced, and a decommissioned blockd drains without any block
//! dropping below its replication. Real processes, real `kill -9`, real
//! flipped bytes; every judgement comes from `jfs fsck`, `jfs admin blockd
//! list` and reads through a fresh mount (no cache can answer for a blockd
//! that is gone).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jfs_tests::*;

const MIB: usize = 1 << 20;
/// Dead interval (10 s) + a few healing rounds, with room for a loaded machine.
const HEAL: Duration = Duration::from_secs(150);

fn write_checked(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    close_checked(f).unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
}

/// A few multi-block files and some small ones.
fn write_files(c: &Cluster, prefix: &str, big: u64, small: u64) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..big {
        files.push((format!("{prefix}big{i}"), pattern(5 * MIB + 4321 * i as usize, i + 100)));
    }
    for i in 0..small {
        files.push((format!("{prefix}small{i}"), pattern(1000 + 97 * i as usize, i + 200)));
    }
    for (name, data) in &files {
        write_checked(&c.path(name), data);
    }
    files
}

fn assert_reads_back(c: &Cluster, files: &[(String, Vec<u8>)], when: &str) {
    let m = c.mount_second("");
    for (name, want) in files {
        let got = fs::read(m.path(name)).unwrap_or_else(|e| panic!("read {name} {when}: {e}{}", c.log_tails()));
        if let Some(d) = describe_difference(want, &got) {
            panic!("{name} reads back wrong {when}: {d}");
        }
    }
    m.unmount();
}

fn wait_healthy(c: &Cluster, what: &str) -> Fsck {
    wait_until(what, HEAL, || {
        let f = c.fsck(None);
        if f.ok && f.under == 0 && f.missing == 0 && f.over == 0 {
            Ok(f)
        } else {
            Err(f.text)
        }
    })
}

fn row_at(c: &Cluster, addr: &str) -> Option<BlockdRow> {
    c.blockd_list().into_iter().find(|r| r.address == addr)
}

fn wait_state(c: &Cluster, id: &str, state: &str) {
    wait_until(&format!("blockd {id} to be {state}"), HEAL, || {
        let list = c.blockd_list();
        match list.iter().find(|r| r.id == id) {
            Some(r) if r.state == state => Ok(()),
            other => Err(format!("{other:?} in {list:?}")),
        }
    })
}

fn blockd_addr(c: &Cluster, j: u32) -> String {
    format!("{}:{}", c.ip, 8201 + 10 * (j - 1))
}

/// Block files (`.blk`) under a directory, by name.
fn blk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("blocks")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "blk") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_dead_blockd_is_replaced_and_its_copies_trimmed_when_it_returns() {
    let c = Cluster::start();
    let _b4 = c.start_extra_blockd(4);
    wait_until("4 live blockds", HEAL, || {
        let l = c.blockd_list();
        (l.iter().filter(|r| r.state == "live").count() == 4)
            .then_some(())
            .ok_or(format!("{l:?}"))
    });
    let files = write_files(&c, "", 4, 10);
    let before = wait_healthy(&c, "every block at 3 copies after writing");
    let blocks = before.healthy;
    assert!(blocks >= 14, "{}", before.text);

    c.kill9("blockd1");
    let b1 = row_at(&c, &blockd_addr(&c, 1)).expect("blockd1 listed");
    wait_state(&c, &b1.id, "dead");
    wait_healthy(&c, "every block back at 3 live copies without blockd1");
    assert_reads_back(&c, &files, "with blockd1 dead");

    // blockd1 comes back with its old copies: they are surplus now and go
    // once the grace period is over, leaving exactly 3 copies of each block.
    c.local_up();
    wait_state(&c, &b1.id, "live");
    wait_until("surplus copies on the returned blockd1 deleted", HEAL, || {
        let (_, n) = c.block_file_bytes();
        (n == 3 * blocks)
            .then_some(())
            .ok_or(format!("{n} block files, want {}", 3 * blocks))
    });
    wait_healthy(&c, "still healthy after trimming");
    assert_reads_back(&c, &files, "after blockd1 returned");
}

#[test]
fn flipped_bytes_are_caught_and_the_copy_replaced() {
    let c = Cluster::start();
    let files = write_files(&c, "", 2, 0);
    let f = wait_healthy(&c, "every block at 3 copies");
    assert!(f.healthy >= 4, "{}", f.text);
    let dirs = c.blockd_dirs();
    // The same block on two of the three blockds: a read may have to go
    // past two bad copies to the good one.
    let victim = blk_files(&dirs[0])
        .into_iter()
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("blockd1 holds blocks");
    let name = victim.strip_prefix(&dirs[0]).unwrap().to_path_buf();
    for d in &dirs[..2] {
        let p = d.join(&name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 70_000).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, 70_000).unwrap();
        f.sync_all().unwrap();
    }
    assert_reads_back(&c, &files, "with two of three copies of a block corrupt");

    // Restarted blockds scrub at start; reads may have caught some already.
    c.kill9("blockd1");
    c.kill9("blockd2");
    c.local_up();
    for d in &dirs[..2] {
        let quarantined = d.join("corrupt").join(name.file_name().unwrap());
        wait_for(&format!("{} moved aside", quarantined.display()), HEAL, || {
            quarantined.exists()
        });
    }
    wait_healthy(&c, "the corrupt copies replaced");
    for d in &dirs {
        let p = d.join(&name);
        if p.exists() {
            let bytes = fs::read(&p).unwrap();
            let orig = fs::read(dirs[2].join(&name)).unwrap();
            assert_eq!(bytes, orig, "{} differs from the good copy", p.display());
        }
    }
    let logs: String = ["blockd1", "blockd2"]
        .iter()
        .map(|n| fs::read_to_string(c.state.join("logs").join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    assert!(logs.contains("corrupt"), "the corruption was not logged");
    assert_reads_back(&c, &files, "after healing");
}

#[test]
fn decommission_drains_without_a_block_below_three_copies() {
    let c = Cluster::start();
    let _b4 = c.start_extra_blockd(4);
    let files = write_files(&c, "", 3, 6);
    wait_until("4 live blockds", HEAL, || {
        let l = c.blockd_list();
        (l.iter().filter(|r| r.state == "live").count() == 4)
            .then_some(())
            .ok_or(format!("{l:?}"))
    });
    wait_healthy(&c, "every block at 3 copies");
    let b1 = row_at(&c, &blockd_addr(&c, 1)).expect("blockd1 listed");
    assert!(b1.listed > 0, "{b1:?}");
    let conf = c.conf().to_string_lossy().into_owned();
    c.jfs_ok(&["--conf", &conf, "admin", "blockd", "decommission", &b1.id]);
    wait_until("blockd1 drained", HEAL, || {
        let f = c.fsck(None);
        assert!(
            f.under == 0 && f.missing == 0,
            "a block fell below 3 live copies while draining:\n{}",
            f.text
        );
        let r = row_at(&c, &blockd_addr(&c, 1)).expect("blockd1 listed");
        (r.state == "decommissioned").then_some(()).ok_or(format!("{r:?}"))
    });
    // Drained: stopping it loses nothing.
    c.kill9("blockd1");
    wait_state(&c, &b1.id, "decommissioned");
    wait_until("blockd1 seen dead", HEAL, || {
        let f = c.fsck(None);
        (f.ok && f.under == 0 && f.missing == 0).then_some(()).ok_or(f.text)
    });
    assert_reads_back(&c, &files, "with the decommissioned blockd stopped");
    // New writes avoid it, and it can be forgotten.
    let more = write_files(&c, "after-", 1, 3);
    wait_healthy(&c, "new blocks at 3 copies on the other blockds");
    // metad refuses to forget a blockd it still hears from: wait for the
    // dead interval to pass, accepting only that refusal meanwhile.
    wait_until("the stopped blockd1 removed", HEAL, || {
        let out = c.jfs(&["--conf", &conf, "admin", "blockd", "remove", &b1.id]);
        if out.success() {
            return Ok(());
        }
        assert!(out.stderr.contains("is alive"), "{}", out.describe());
        Err(out.describe())
    });
    assert!(c.blockd_list().iter().all(|r| r.id != b1.id));
    assert_reads_back(&c, &more, "after removing the drained blockd");
}

#[test]
fn a_blockd_lost_for_good_is_replaced_and_an_empty_one_takes_new_blocks() {
    let c = Cluster::start();
    let mut b4 = c.start_extra_blockd(4);
    wait_until("4 live blockds", HEAL, || {
        let l = c.blockd_list();
        (l.iter().filter(|r| r.state == "live").count() == 4)
            .then_some(())
            .ok_or(format!("{l:?}"))
    });
    let files = write_files(&c, "", 3, 10);
    wait_healthy(&c, "every block at 3 copies");
    let old = row_at(&c, &b4.addr).expect("blockd4 listed");
    b4.kill9();
    fs::remove_dir_all(&b4.data_dir).expect("wipe blockd4");
    wait_state(&c, &old.id, "dead");
    wait_healthy(&c, "every block back at 3 copies without blockd4");
    assert_reads_back(&c, &files, "with blockd4 gone");

    // Same address, empty disk: a new blockd.
    drop(b4);
    let b4 = c.start_extra_blockd(4);
    let new = wait_until("the empty blockd4 registered", HEAL, || {
        c.blockd_list()
            .into_iter()
            .find(|r| r.address == b4.addr && r.id != old.id && r.state == "live")
            .ok_or_else(|| format!("{:?}", c.blockd_list()))
    });
    let more = write_files(&c, "new-", 0, 20);
    wait_until("the new blockd4 holds new blocks", HEAL, || {
        // Two rows share the address now (the lost id and the new one).
        let r = c.blockd_list().into_iter().find(|r| r.id == new.id);
        r.as_ref().filter(|r| r.listed > 0).map(|_| ()).ok_or(format!("{r:?}"))
    });
    let conf = c.conf().to_string_lossy().into_owned();
    c.jfs_ok(&["--conf", &conf, "admin", "blockd", "remove", &old.id]);
    assert!(c.blockd_list().iter().all(|r| r.id != old.id));
    wait_healthy(&c, "healthy after removing the lost blockd");
    assert_reads_back(&c, &files, "at the end");
    assert_reads_back(&c, &more, "at the end");
}
