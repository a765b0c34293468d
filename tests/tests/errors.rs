//! Bad requests fail with the errno a local filesystem gives, checked with
//! real syscalls on the mount, and lose nothing: ENOENT, EEXIST, ENOTDIR,
//! EISDIR, ENOTEMPTY, ENAMETOOLONG, EINVAL, and EACCES for a non-root user
//! under `default_permissions`.

use jfs_tests::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::Path;

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<libc::c_int> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid C strings.
    check(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) })
}

#[test]
fn enoent() {
    let c = Cluster::start();
    let missing = c.path("missing");
    assert_errno(fs::metadata(&missing), libc::ENOENT, "stat of a missing name");
    assert_errno(File::open(&missing), libc::ENOENT, "open of a missing file");
    assert_errno(fs::remove_file(&missing), libc::ENOENT, "unlink of a missing file");
    assert_errno(fs::remove_dir(&missing), libc::ENOENT, "rmdir of a missing dir");
    assert_errno(
        fs::rename(&missing, c.path("x")),
        libc::ENOENT,
        "rename of a missing name",
    );
    assert_errno(fs::read_link(&missing), libc::ENOENT, "readlink of a missing name");
    assert_errno(
        fs::hard_link(&missing, c.path("x")),
        libc::ENOENT,
        "link of a missing file",
    );
    assert_errno(File::create(c.path("nodir/x")), libc::ENOENT, "create in a missing dir");
    assert_errno(
        fs::create_dir(c.path("nodir/x")),
        libc::ENOENT,
        "mkdir in a missing dir",
    );
    // A name that existed a moment ago: the kernel's entry cache must not hide the unlink.
    write_file(&c.path("brief"), b"x");
    fs::metadata(c.path("brief")).expect("stat a fresh file");
    fs::remove_file(c.path("brief")).expect("unlink");
    assert_errno(fs::metadata(c.path("brief")), libc::ENOENT, "stat right after unlink");
    assert_errno(File::open(c.path("brief")), libc::ENOENT, "open right after unlink");
    assert!(
        fs::read_dir(&c.mnt).expect("readdir").next().is_none(),
        "the root should be empty again"
    );
}

#[test]
fn eexist() {
    let c = Cluster::start();
    fs::create_dir(c.path("d")).expect("mkdir");
    write_file(&c.path("f"), b"keep me");
    assert_errno(fs::create_dir(c.path("d")), libc::EEXIST, "mkdir of an existing dir");
    assert_errno(fs::create_dir(c.path("f")), libc::EEXIST, "mkdir over an existing file");
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(c.path("f")),
        libc::EEXIST,
        "open(O_CREAT|O_EXCL) of an existing file",
    );
    assert_errno(
        fs::hard_link(c.path("f"), c.path("d")),
        libc::EEXIST,
        "link onto an existing name",
    );
    assert_errno(
        symlink("anything", c.path("f")),
        libc::EEXIST,
        "symlink onto an existing name",
    );
    write_file(&c.path("g"), b"other");
    assert_errno(
        renameat2(&c.path("g"), &c.path("f"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE",
    );
    assert_eq!(
        fs::read(c.path("f")).expect("read f"),
        b"keep me",
        "a failed call changed the file"
    );
    assert_eq!(
        fs::read(c.path("g")).expect("read g"),
        b"other",
        "a failed rename lost its source"
    );
}

#[test]
fn enotdir() {
    let c = Cluster::start();
    write_file(&c.path("f"), b"file");
    fs::create_dir(c.path("d")).expect("mkdir");
    assert_errno(File::open(c.path("f/x")), libc::ENOTDIR, "open of file/x");
    assert_errno(File::create(c.path("f/x")), libc::ENOTDIR, "create of file/x");
    assert_errno(fs::create_dir(c.path("f/x")), libc::ENOTDIR, "mkdir of file/x");
    assert_errno(fs::read_dir(c.path("f")), libc::ENOTDIR, "opendir of a file");
    assert_errno(fs::remove_dir(c.path("f")), libc::ENOTDIR, "rmdir of a file");
    assert_errno(
        fs::rename(c.path("d"), c.path("f")),
        libc::ENOTDIR,
        "rename of a dir over a file",
    );
    assert_errno(
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(c.path("f")),
        libc::ENOTDIR,
        "open(O_DIRECTORY) of a file",
    );
    assert_eq!(fs::read(c.path("f")).expect("read f"), b"file");
    assert!(fs::metadata(c.path("d")).expect("stat d").is_dir());
}

#[test]
fn eisdir() {
    let c = Cluster::start();
    fs::create_dir(c.path("d")).expect("mkdir");
    write_file(&c.path("f"), b"file");
    assert_errno(
        OpenOptions::new().write(true).open(c.path("d")),
        libc::EISDIR,
        "open of a dir for writing",
    );
    assert_errno(File::create(c.path("d")), libc::EISDIR, "create over a dir");
    assert_errno(fs::remove_file(c.path("d")), libc::EISDIR, "unlink of a dir");
    assert_errno(
        fs::rename(c.path("f"), c.path("d")),
        libc::EISDIR,
        "rename of a file over a dir",
    );
    let mut buf = [0u8; 8];
    let dir = File::open(c.path("d")).expect("open a dir read-only");
    use std::io::Read;
    assert_errno((&dir).read(&mut buf), libc::EISDIR, "read(2) on a dir");
    assert_eq!(fs::read(c.path("f")).expect("read f"), b"file");
}

#[test]
fn enotempty() {
    let c = Cluster::start();
    fs::create_dir_all(c.path("full/sub")).expect("mkdir -p");
    write_file(&c.path("full/file"), b"x");
    fs::create_dir_all(c.path("other/inner")).expect("mkdir -p");
    assert_errno(
        fs::remove_dir(c.path("full")),
        libc::ENOTEMPTY,
        "rmdir of a non-empty dir",
    );
    assert_errno(
        fs::rename(c.path("other"), c.path("full")),
        libc::ENOTEMPTY,
        "rename of a dir over a non-empty dir",
    );
    assert_eq!(
        fs::read(c.path("full/file")).expect("read"),
        b"x",
        "a failed rmdir/rename lost data"
    );
    assert!(fs::metadata(c.path("other/inner")).expect("stat").is_dir());
    // Once empty it goes.
    fs::remove_file(c.path("full/file")).expect("rm");
    fs::remove_dir(c.path("full/sub")).expect("rmdir");
    fs::remove_dir(c.path("full")).expect("rmdir of the now-empty dir");
    fs::remove_dir(c.path("other/inner")).expect("rmdir inner");
    fs::create_dir(c.path("target")).expect("mkdir target");
    fs::rename(c.path("other"), c.path("target")).expect("rename of a dir over an empty dir");
}

#[test]
fn enametoolong() {
    let c = Cluster::start();
    let long = "n".repeat(256);
    let max = "m".repeat(255);
    assert_errno(
        File::create(c.path(&long)),
        libc::ENAMETOOLONG,
        "create with a 256-byte name",
    );
    assert_errno(
        fs::create_dir(c.path(&long)),
        libc::ENAMETOOLONG,
        "mkdir with a 256-byte name",
    );
    assert_errno(
        symlink("t", c.path(&long)),
        libc::ENAMETOOLONG,
        "symlink with a 256-byte name",
    );
    assert_errno(
        fs::metadata(c.path(&long)),
        libc::ENAMETOOLONG,
        "stat of a 256-byte name",
    );
    write_file(&c.path("f"), b"x");
    assert_errno(
        fs::rename(c.path("f"), c.path(&long)),
        libc::ENAMETOOLONG,
        "rename to a 256-byte name",
    );
    assert_errno(
        fs::hard_link(c.path("f"), c.path(&long)),
        libc::ENAMETOOLONG,
        "link to a 256-byte name",
    );
    // Multi-byte: the limit is 255 bytes, not characters.
    let e256 = "é".repeat(128);
    assert_errno(
        File::create(c.path(&e256)),
        libc::ENAMETOOLONG,
        "create with 128 two-byte characters",
    );
    // 255 bytes is fine, and nothing was lost.
    write_file(&c.path(&max), b"max");
    let e255 = format!("{}x", "é".repeat(127));
    write_file(&c.path(&e255), b"e");
    let mut names: Vec<String> = fs::read_dir(&c.mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    let mut want = vec!["f".to_string(), max.clone(), e255.clone()];
    want.sort();
    assert_eq!(names, want, "directory listing after the failed calls");
    assert_eq!(fs::read(c.path(&max)).expect("read 255-byte name"), b"max");
}

#[test]
fn einval_when_a_dir_is_renamed_into_its_own_subtree() {
    let c = Cluster::start();
    fs::create_dir_all(c.path("a/b/c")).expect("mkdir -p");
    write_file(&c.path("a/b/c/f"), b"deep");
    assert_errno(
        fs::rename(c.path("a"), c.path("a/b/a")),
        libc::EINVAL,
        "rename a -> a/b/a",
    );
    assert_errno(
        fs::rename(c.path("a"), c.path("a/b/c/x")),
        libc::EINVAL,
        "rename a -> a/b/c/x",
    );
    assert_errno(
        fs::rename(c.path("a/b"), c.path("a/b/c/b")),
        libc::EINVAL,
        "rename a/b -> a/b/c/b",
    );
    assert_eq!(
        fs::read(c.path("a/b/c/f")).expect("read"),
        b"deep",
        "a refused rename moved or lost the tree"
    );
}

#[test]
fn eacces_for_a_non_root_user_under_default_permissions() {
    let c = Cluster::start();
    let m = c.mount_second("allow_other,default_permissions");
    let nobody = (65534u32, 65534u32);
    fs::create_dir(m.path("private")).expect("mkdir private");
    write_file(&m.path("private/secret"), b"secret");
    fs::create_dir(m.path("pub")).expect("mkdir pub");
    write_file(&m.path("pub/readme"), b"readme");
    write_file(&m.path("rootfile"), b"root");
    sh(
        &m.path,
        "chmod 700 private && chmod 600 private/secret && chmod 755 pub && chmod 644 pub/readme rootfile",
    );
    sh(&m.path, "chmod 755 . ");

    let (readme, secret, rootfile) = (
        cpath(&m.path("pub/readme")),
        cpath(&m.path("private/secret")),
        cpath(&m.path("rootfile")),
    );
    let (newfile, newdir) = (cpath(&m.path("pub/new")), cpath(&m.path("pub/newdir")));
    let open = |p: &std::ffi::CString, flags: i32| {
        let p = p.as_ptr();
        move || {
            // SAFETY: raw syscalls only (see as_user).
            let fd = unsafe { libc::open(p, flags, 0o644) };
            if fd < 0 {
                last_errno()
            } else {
                unsafe { libc::close(fd) };
                0
            }
        }
    };
    let errs = |got: i32| format!("{} ({got})", errno_name(got));
    // Positive control: nobody can read a world-readable file (so allow_other works).
    let rc = as_user(nobody.0, nobody.1, open(&readme, libc::O_RDONLY));
    assert_eq!(rc, 0, "nobody could not read a 0644 file: {}", errs(rc));
    type Op<'a> = Box<dyn FnOnce() -> i32 + 'a>;
    let cases: [(&str, i32, Op); 6] = [
        (
            "open of a 0600 root file in a 0700 dir",
            libc::EACCES,
            Box::new(open(&secret, libc::O_RDONLY)),
        ),
        (
            "open for writing of a 0644 root file",
            libc::EACCES,
            Box::new(open(&rootfile, libc::O_WRONLY)),
        ),
        (
            "create in a 0755 root dir",
            libc::EACCES,
            Box::new(open(&newfile, libc::O_CREAT | libc::O_WRONLY)),
        ),
        ("mkdir in a 0755 root dir", libc::EACCES, {
            let p = newdir.as_ptr();
            Box::new(move || {
                if unsafe { libc::mkdir(p, 0o755) } < 0 {
                    last_errno()
                } else {
                    0
                }
            })
        }),
        ("unlink in a 0755 root dir", libc::EACCES, {
            let p = readme.as_ptr();
            Box::new(move || {
                if unsafe { libc::unlink(p) } < 0 {
                    last_errno()
                } else {
                    0
                }
            })
        }),
        ("stat through a 0700 root dir", libc::EACCES, {
            let p = secret.as_ptr();
            Box::new(move || {
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                if unsafe { libc::stat(p, &mut st) } < 0 {
                    last_errno()
                } else {
                    0
                }
            })
        }),
    ];
    for (what, want, op) in cases {
        let got = as_user(nobody.0, nobody.1, op);
        assert_eq!(
            got,
            want,
            "{what} as nobody: expected {} but got {}",
            errno_name(want),
            errs(got)
        );
    }
    // chmod of someone else's file is EPERM, not EACCES.
    let p = rootfile.as_ptr();
    let got = as_user(nobody.0, nobody.1, move || {
        if unsafe { libc::chmod(p, 0o777) } < 0 {
            last_errno()
        } else {
            0
        }
    });
    assert_eq!(
        got,
        libc::EPERM,
        "chmod of a root file as nobody: expected EPERM, got {}",
        errs(got)
    );
    // And through the ordinary tools.
    let out = sh_result(
        &m.path,
        "setpriv --reuid=65534 --regid=65534 --clear-groups cat private/secret",
        CMD_TIMEOUT,
    );
    assert!(
        !out.success() && out.stderr.contains("Permission denied"),
        "cat as nobody:\n{}",
        out.describe()
    );
    let out = sh(
        &m.path,
        "setpriv --reuid=65534 --regid=65534 --clear-groups cat pub/readme",
    );
    assert_eq!(out, "readme");
    // Nothing changed.
    assert_eq!(fs::read(m.path("pub/readme")).expect("read"), b"readme");
    assert_errno(
        fs::metadata(m.path("pub/new")),
        libc::ENOENT,
        "the refused create left a file",
    );
    assert_eq!(
        fs::read(m.path("private/secret")).expect("root still reads it"),
        b"secret"
    );
}

#[test]
fn erofs_on_a_read_only_mount() {
    let c = Cluster::start();
    write_file(&c.path("f"), b"content");
    fs::create_dir(c.path("d")).expect("mkdir");
    let ro = c.mount_second("ro");
    assert_eq!(fs::read(ro.path("f")).expect("read on the ro mount"), b"content");
    assert_errno(File::create(ro.path("new")), libc::EROFS, "create on a ro mount");
    assert_errno(
        OpenOptions::new().write(true).open(ro.path("f")),
        libc::EROFS,
        "open for writing on a ro mount",
    );
    assert_errno(fs::create_dir(ro.path("d2")), libc::EROFS, "mkdir on a ro mount");
    assert_errno(fs::remove_file(ro.path("f")), libc::EROFS, "unlink on a ro mount");
    assert_errno(fs::remove_dir(ro.path("d")), libc::EROFS, "rmdir on a ro mount");
    assert_errno(
        fs::rename(ro.path("f"), ro.path("g")),
        libc::EROFS,
        "rename on a ro mount",
    );
    assert_errno(
        fs::set_permissions(ro.path("f"), std::os::unix::fs::PermissionsExt::from_mode(0o600)),
        libc::EROFS,
        "chmod on a ro mount",
    );
    assert_eq!(fs::read(c.path("f")).expect("read on the rw mount"), b"content");
}

/// `jfs local up` mounts with allow_other so every user can use the mount;
/// then permissions must be enforced there too, or any local user reads and
/// overwrites root's private files.
#[test]
fn eacces_for_a_non_root_user_on_the_mount_jfs_local_up_makes() {
    let c = Cluster::start();
    fs::set_permissions(&c.mnt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod mount root");
    write_file(&c.path("secret"), b"secret");
    write_file(&c.path("public"), b"public");
    sh(&c.mnt, "chmod 600 secret && chmod 644 public");
    let (secret, public) = (cpath(&c.path("secret")), cpath(&c.path("public")));
    let open = |p: &std::ffi::CString, flags: i32| {
        let p = p.as_ptr();
        move || {
            // SAFETY: raw syscalls only (see as_user).
            let fd = unsafe { libc::open(p, flags) };
            if fd < 0 {
                last_errno()
            } else {
                unsafe { libc::close(fd) };
                0
            }
        }
    };
    let got = as_user(65534, 65534, open(&public, libc::O_RDONLY));
    assert_eq!(
        got,
        0,
        "nobody cannot read a 0644 file on the local-up mount: {}",
        errno_name(got)
    );
    let got = as_user(65534, 65534, open(&secret, libc::O_RDONLY));
    assert_eq!(
        got,
        libc::EACCES,
        "nobody opening root's 0600 file: got {}",
        errno_name(got)
    );
    let got = as_user(65534, 65534, open(&public, libc::O_WRONLY));
    assert_eq!(
        got,
        libc::EACCES,
        "nobody writing root's 0644 file: got {}",
        errno_name(got)
    );
    assert_eq!(fs::read(c.path("public")).expect("read"), b"public");
}

/// Every block is verified against its checksum on read: with one replica
/// and its bytes flipped on the blockd's disk, reading fails with EIO
/// instead of returning wrong data.
/// A request that panics inside jfs-mountd fails alone, with EIO; the FUSE
/// session keeps serving every other request (DESIGN §5). The panic is
/// real: the mountd's fault-injection knob makes a lookup of one name panic.
#[test]
fn a_panicking_request_fails_with_eio_and_the_mount_stays_up() {
    let c = Cluster::start();
    let m = c.mount_second_with_env("", &[("JFS_TEST_PANIC_NAME", "boom")]);
    write_file(&m.path("before"), b"written before the panic");
    for round in 0..3 {
        assert_errno(
            fs::metadata(m.path("boom")),
            libc::EIO,
            &format!("stat of the panicking name, round {round}"),
        );
        let data =
            fs::read(m.path("before")).unwrap_or_else(|e| panic!("read after panic {round}: {e}\n{}", m.log_text()));
        assert_eq!(data, b"written before the panic", "round {round}");
        write_file(&m.path(format!("after{round}")), b"still writable");
    }
    let names: Vec<String> = fs::read_dir(m.path(""))
        .expect("list the mount after the panics")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "entries after the panics: {names:?}");
    assert!(
        m.log_text().contains("a FUSE request panicked"),
        "the panic is logged:\n{}",
        m.log_text()
    );
    m.unmount();
}

#[test]
fn eio_when_the_only_replica_of_a_block_is_corrupt() {
    let c = Cluster::start();
    // Two blocks; the corruption goes into the second.
    let data = pattern((6 << 20) as usize, 99);
    write_file(&c.path("victim"), &data);
    // Find the stored bytes on the blockds' disks by content, whatever the layout.
    let needle = &data[5_000_000..5_000_064];
    let mut hits = Vec::new();
    let mut stack: Vec<std::path::PathBuf> = (1..=3)
        .map(|j| c.state.join(format!("blockd{j}")))
        .filter(|p| p.exists())
        .collect();
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        if m.is_dir() {
            stack.extend(
                fs::read_dir(&p)
                    .expect("readdir blockd dir")
                    .filter_map(|e| e.ok().map(|e| e.path())),
            );
        } else if m.is_file() && m.len() >= needle.len() as u64 {
            let bytes = fs::read(&p).expect("read a blockd file");
            if let Some(off) = bytes.windows(needle.len()).position(|w| w == needle) {
                hits.push((p, off));
            }
        }
    }
    assert!(
        !hits.is_empty(),
        "could not find the file's bytes under {}/blockd*",
        c.state.display()
    );
    for (p, off) in &hits {
        let f = OpenOptions::new().write(true).open(p).expect("open block file");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[needle[10] ^ 0xff], (*off + 10) as u64)
            .expect("corrupt a byte");
    }
    // A fresh mount, so no cache of the good bytes can answer.
    let m = c.mount_second("");
    let got = fs::read(m.path("victim"));
    match got {
        Ok(v) if v == data => panic!("read returned the original data although every copy on disk was corrupted"),
        Ok(_) => panic!("read of a corrupt block returned wrong data instead of failing with EIO"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "read of a corrupt block: {e}"),
    }
    // The first block is still good and reads fine.
    let f = File::open(m.path("victim")).expect("open");
    let mut buf = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut buf, 0).expect("read of the good part of the file");
    assert!(buf[..] == data[..4096]);
}
