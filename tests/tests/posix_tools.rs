//! Ordinary tools behave on jfs as on a local disk: each test runs the same
//! script in a fresh directory on the local disk and on the mount and
//! requires identical output (scripts print only what must not differ:
//! no inode numbers, no directory sizes, no creation times).

use jfs_tests::*;
use std::fs::{self, File};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

#[test]
fn ls_stat_chmod_chown_touch() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        printf 'hello\n' > a
        head -c 10000 /dev/zero > b
        mkdir d
        ln -s a sl
        chmod 640 a
        chmod 1777 d
        chmod 2755 b
        chown 1000:1001 a
        chown -h 1002:1003 sl
        chown 7:8 d
        touch -d '2001-02-03 04:05:06.123456789' a
        touch -m -d '1999-12-31 23:59:59.5' b
        touch -a -d '2000-01-01 00:00:00' b
        touch -h -d '2002-01-01 12:00:00' sl
        touch -d '2003-03-03 03:03:03' d
        ls -ln --time-style=+%s.%N a b sl
        stat -c '%n|%s|%F|%a|%u|%g|%h|%y|%x|%N' a b
        stat -c '%n|%s|%F|%a|%u|%g|%h|%y|%N' sl
        stat -c '%n|%F|%a|%u|%g|%y' d
        touch -d '2004-04-04' new
        stat -c '%n|%s|%F|%a|%y' new
        chmod u-w,g+x,o= a
        stat -c '%n|%A' a
        "#,
    );
}

#[test]
fn mv_within_and_across_directories_and_over_a_file() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        mkdir -p x/y z
        printf one > x/f1; printf two > x/f2; printf three > z/f3
        mv x/f1 x/g1
        mv x/g1 z/
        mv x/f2 z/f3
        mv x/y z/
        mv z x/
        mv -T x/z x/zz
        find . | sort
        cat x/zz/g1; echo; cat x/zz/f3; echo
        test ! -e z && test ! -e x/f2
        "#,
    );
}

#[test]
fn mv_over_an_existing_file_is_atomic() {
    let c = Cluster::start();
    let target = c.path("target");
    write_file(&target, b"old");
    // A descriptor on the replaced file keeps reading its old content.
    let mut held = File::open(&target).expect("open target");

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, target) = (stop.clone(), target.clone());
        thread::spawn(move || -> Result<u64, String> {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let text = fs::read_to_string(&target).map_err(|e| format!("open/read target during mv: {e}"))?;
                if text != "old" && !text.starts_with("new-") {
                    return Err(format!("read a torn or empty file during mv: {text:?}"));
                }
                reads += 1;
            }
            Ok(reads)
        })
    };
    for i in 0..150 {
        let tmp = c.path(format!("tmp-{i}"));
        write_file(&tmp, format!("new-{i}").as_bytes());
        sh(&c.mnt, &format!("mv tmp-{i} target"));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader thread").unwrap_or_else(|e| panic!("{e}"));
    assert!(reads > 0, "the reader never ran");
    assert_eq!(fs::read_to_string(&target).expect("read target"), "new-149");
    let mut old = String::new();
    held.read_to_string(&mut old)
        .expect("read through the descriptor opened before mv");
    assert_eq!(
        old, "old",
        "a descriptor opened before mv must keep the replaced file's content"
    );
    let left: Vec<_> = fs::read_dir(&c.mnt)
        .expect("readdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("target")],
        "mv left other names behind"
    );
}

#[test]
fn rm_rf_removes_a_deep_tree() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        mkdir -p a/b/c/d/e keep
        for d in a a/b a/b/c a/b/c/d a/b/c/d/e; do
          for i in 1 2 3; do head -c $((i * 5000)) /dev/zero > $d/f$i; done
          ln -s f1 $d/link; ln $d/f2 $d/hard
        done
        ln a/f1 keep/survivor
        chmod 555 a/b/c
        rm -rf a
        test ! -e a
        ls -A
        stat -c '%n %s %h' keep/survivor
        "#,
    );
}

#[test]
fn symlinks_and_hard_links() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        printf data > f
        ln -s f sl; ln -s missing dang; ln -s ../outside up
        readlink sl dang up
        ln f h1; stat -c '%n %h' f h1
        ln h1 h2; stat -c '%n %h' f h1 h2
        cat h2; echo
        rm f; stat -c '%n %h' h1 h2
        printf more >> h1; cat h2; echo
        cat sl 2>/dev/null || echo "sl dangles now"
        mkdir dir; ln -s dir dl; touch dl/inside; ls dl/
        ls -l --time-style=+X sl dang | awk '{print $1, $NF, $(NF-2)}'
        ln -s "$(head -c 1000 /dev/zero | tr '\0' y)" longtarget
        readlink longtarget | wc -c
        "#,
    );
}

#[test]
fn truncate_grows_with_zeros_and_shrinks() {
    let c = Cluster::start();
    let src = c.local.join("src");
    write_file(&src, &pattern(9 << 20, 9));
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        &format!(
            r#"
        cp {src} f
        truncate -s 5000000 f; sha256sum f
        truncate -s 4194304 f; sha256sum f
        truncate -s 4194303 f; sha256sum f
        truncate -s 12M f; sha256sum f
        truncate -s +10 f; stat -c %s f
        truncate -s 1 f; sha256sum f
        truncate -s 0 f; stat -c %s f
        truncate -s 100 new; sha256sum new
        cp {src} g; truncate -s 4194305 g; printf zz >> g; sha256sum g
        "#,
            src = src.display()
        ),
    );
}

#[test]
fn df_and_statvfs_report_the_filesystem() {
    let c = Cluster::start();
    let out = sh(&c.local, &format!("df -P {}", c.mnt.display()));
    let line = out
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("df -P printed no filesystem line:\n{out}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols.last().copied(),
        Some(c.mnt.to_str().expect("utf-8 path")),
        "df names another mount:\n{out}"
    );
    let num = |i: usize| -> u64 {
        cols[i]
            .parse()
            .unwrap_or_else(|_| panic!("df column {i} is not a number:\n{out}"))
    };
    let (total, used, avail) = (num(1), num(2), num(3));
    assert!(total > 0, "df reports a size of 0:\n{out}");
    assert!(
        used <= total && avail <= total,
        "df's used/available exceed its size:\n{out}"
    );
    sh(
        &c.local,
        &format!(
            "df -i {} && df -h {} && stat -f {}",
            c.mnt.display(),
            c.mnt.display(),
            c.mnt.display()
        ),
    );

    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let p = cpath(&c.mnt);
    // SAFETY: valid path and out-pointer.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) }).expect("statvfs on the mount");
    assert!(st.f_bsize > 0 && st.f_frsize > 0, "statvfs block size is 0");
    assert!(st.f_blocks > 0, "statvfs f_blocks is 0");
    assert!(
        st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_bfree,
        "statvfs free > total"
    );
    assert_eq!(
        st.f_namemax, 255,
        "statvfs f_namemax should be 255 (the name limit jfs enforces)"
    );
}

#[test]
fn find_selects_like_on_a_local_disk() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        mkdir -p a/b/c e
        printf x > a/1.txt; head -c 2000 /dev/zero > a/b/2.bin; : > a/b/c/empty
        ln -s ../1.txt a/b/link; ln a/1.txt e/hard; mkdir emptydir
        touch -d '2000-01-01' a/1.txt; touch -d '2010-01-01' ref; touch -d '2020-01-01' a/b/2.bin
        find . | sort
        find . -type f | sort; find . -type d | sort; find . -type l
        find . -name '*.txt' | sort
        find . -newer ref -type f | sort
        find . -type f -size +1k | sort
        find . -empty | sort
        find . -links 2 -type f | sort
        find . -maxdepth 2 | sort
        find . -mindepth 3 -type d
        find . -type f -exec sha256sum {} + | sort
        find . -perm -u+w -type f | sort
        find -L . -type f | sort
        "#,
    );
}

#[test]
fn sha256sum_and_cat_cp_tee() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        for n in 0 1 4095 4096 65537 4194303 4194304 4194305; do head -c $n /dev/zero | tr '\0' 'q' > z$n; done
        seq 1 200000 > numbers
        sha256sum z* numbers > sums
        sha256sum -c sums
        cat numbers | tee copy1 | sha256sum
        cp numbers copy2; cmp numbers copy2
        sha256sum copy1 copy2
        sort -rn numbers | sed -n 1,3p
        wc -c numbers
        "#,
    );
}

#[test]
fn extended_attributes() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        printf x > f; mkdir d
        setfattr -n user.a -v one f
        setfattr -n user.b -v "$(head -c 3000 /dev/zero | tr '\0' x)" f
        setfattr -n user.onDir -v yes d
        getfattr -d --absolute-names f | sort
        getfattr -n user.a --only-values f; echo
        setfattr -n user.a -v replaced f; getfattr -n user.a --only-values f; echo
        setfattr -x user.a f
        getfattr -n user.a f 2>/dev/null || echo "user.a is gone"
        getfattr -d d | sort
        "#,
    );
}

#[test]
fn mkfifo_and_special_files() {
    let c = Cluster::start();
    let (l, m) = c.twin_dirs("w");
    assert_same_output(
        &l,
        &m,
        r#"
        mkfifo p
        mknod n c 1 3
        stat -c '%n %F %a %t:%T' p n
        "#,
    );
}

#[test]
fn an_unlinked_open_file_stays_readable_until_closed() {
    let c = Cluster::start();
    let data = pattern((5 << 20) + 123, 77);
    let p = c.path("doomed");
    write_file(&p, &data);
    let mut f = File::open(&p).expect("open");
    let mut first = vec![0u8; 1000];
    f.read_exact(&mut first).expect("read the start before unlink");
    fs::remove_file(&p).expect("unlink while open");
    assert_errno(fs::metadata(&p), libc::ENOENT, "stat of the unlinked name");
    let mut rest = Vec::new();
    f.read_to_end(&mut rest)
        .expect("read through the descriptor after unlink");
    first.extend_from_slice(&rest);
    assert!(first == data, "content read after unlink differs from what was written");
    // The name can be reused at once with new content.
    write_file(&p, b"new life");
    assert_eq!(fs::read(&p).expect("read new file"), b"new life");
    drop(f);
    assert_eq!(
        fs::read(&p).expect("read new file after the old one closed"),
        b"new life"
    );
}

#[test]
fn rename_exchange_and_noreplace() {
    let c = Cluster::start();
    let rename2 = |a: &str, b: &str, flags: libc::c_uint| {
        let (pa, pb) = (cpath(&c.path(a)), cpath(&c.path(b)));
        // SAFETY: valid C strings.
        check(unsafe { libc::renameat2(libc::AT_FDCWD, pa.as_ptr(), libc::AT_FDCWD, pb.as_ptr(), flags) })
    };
    write_file(&c.path("a"), b"content of a");
    fs::create_dir(c.path("d")).expect("mkdir d");
    write_file(&c.path("d/inner"), b"inner");
    rename2("a", "d", libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE of a file and a dir");
    assert_eq!(fs::read(c.path("d")).expect("d is now the file"), b"content of a");
    assert_eq!(fs::read(c.path("a/inner")).expect("a is now the dir"), b"inner");
    write_file(&c.path("b"), b"content of b");
    rename2("b", "d", libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE of two files");
    assert_eq!(fs::read(c.path("b")).expect("read b"), b"content of a");
    assert_eq!(fs::read(c.path("d")).expect("read d"), b"content of b");
    assert_errno(
        rename2("b", "missing", libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );
    rename2("b", "fresh", libc::RENAME_NOREPLACE).expect("RENAME_NOREPLACE to a free name");
    assert_eq!(fs::read(c.path("fresh")).expect("read fresh"), b"content of a");
    assert!(!c.path("b").exists(), "RENAME_NOREPLACE left the source name");
}
