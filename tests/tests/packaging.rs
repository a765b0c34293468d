//! The packages as an operator uses them. `packaging/build.sh` builds the
//! .debs and .rpms from this build; `dpkg -i` installs both on this machine;
//! `systemd-analyze verify` accepts the installed units; jfs-metad and
//! jfs-blockd run from the installed binaries as the `jfs` user in the
//! package's data directories, the way the units start them (ExecStart, and
//! READY=1 on a notify socket as Type=notify needs); `mount -t jfs` and an
//! /etc/fstab line (`mount DIR`, `mount -a -t jfs`) mount through the
//! packaged /sbin/mount.jfs, silently and only once live; bad options, a
//! missing config and a missing cluster fail with clear messages; an upgrade
//! keeps an edited conffile and the data; `dpkg -r` stops the daemons and
//! keeps config and data; `dpkg -P` deletes both. The .rpms list the same
//! files as the .debs.
//!
//! The test changes the machine (packages, the `jfs` user, /etc/fstab,
//! /sbin/mount.jfs, /var/lib/jfs); a guard puts everything back, even when
//! the test fails. It refuses to run when jfs packages or their files are
//! already there, rather than destroy them. /sbin/mount.jfs (which
//! scripts/install.sh points at /usr/local/bin/jfs-mountd) is the package's
//! link to the same build while the package is installed, and is restored
//! right after `dpkg -r`.

use jfs_tests::*;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const HELPER: &str = "/sbin/mount.jfs";
const FSTAB: &str = "/etc/fstab";
/// Marks the /etc/fstab line this test adds, so only it is removed.
const FSTAB_MARK: &str = "# added by jfs packaging test";
const PKG_TIMEOUT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command, timeout: Duration) -> CmdOut {
    run_cmd(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

fn run_ok(cmd: &mut Command, timeout: Duration) -> CmdOut {
    let desc = format!("{cmd:?}");
    let out = run(cmd, timeout);
    assert!(out.success(), "{desc} failed:\n{}", out.describe());
    out
}

/// Holds an flock'ed file: one holder at a time across processes.
fn lock_file(path: &str) -> File {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock {path}: {}", std::io::Error::last_os_error());
    f
}

struct Packages {
    server_deb: PathBuf,
    client_deb: PathBuf,
    server_rpm: PathBuf,
    client_rpm: PathBuf,
}

/// Builds the packages once per test process (from the build under test:
/// build.sh --no-build) and copies them to a directory of this process, so
/// another test run rebuilding them meanwhile cannot change them under us.
fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        let _lock = lock_file("/tmp/jfs-test-packaging-build.lock");
        let bins = bin_dir();
        let target = bins
            .parent()
            .expect("JFS_BIN_DIR has a parent (the target dir)")
            .to_path_buf();
        let out = run_ok(
            Command::new("bash")
                .arg(repo_root().join("packaging/build.sh"))
                .arg("--no-build")
                .env("CARGO_TARGET_DIR", &target),
            Duration::from_secs(900),
        );
        eprintln!("packaging/build.sh:\n{}", out.stdout);
        // A static is never dropped, so the copies live in a directory named
        // for this process; earlier runs' directories are removed once their
        // process is gone.
        let base = std::env::var_os("JFS_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or("/tmp".into());
        if let Ok(entries) = fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("jfs-packages-").and_then(|p| p.parse::<i32>().ok()) {
                    if !pid_alive(pid) {
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = base.join(format!("jfs-packages-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut found = Vec::new();
        for e in fs::read_dir(target.join("packages")).expect("read target/packages") {
            let p = e.expect("dir entry").path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".deb") || name.ends_with(".rpm") {
                let dest = dir.join(&name);
                fs::copy(&p, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", p.display()));
                found.push(dest);
            }
        }
        let pick = |prefix: &str, ext: &str| {
            let v: Vec<&PathBuf> = found
                .iter()
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy();
                    n.starts_with(prefix) && n.ends_with(ext)
                })
                .collect();
            assert_eq!(v.len(), 1, "expected one {prefix}*{ext} from build.sh, found {found:?}");
            v[0].clone()
        };
        Packages {
            server_deb: pick("jfs-server_", ".deb"),
            client_deb: pick("jfs-client_", ".deb"),
            server_rpm: pick("jfs-server-", ".rpm"),
            client_rpm: pick("jfs-client-", ".rpm"),
        }
    })
}

/// Files (not directories) a .deb installs, as absolute paths.
fn deb_files(deb: &Path) -> Vec<String> {
    let out = run_ok(Command::new("dpkg-deb").arg("-c").arg(deb), PKG_TIMEOUT);
    let mut v: Vec<String> = out
        .stdout
        .lines()
        .filter_map(|l| {
            // perms owner size date time PATH [-> TARGET]
            let path = l.split_whitespace().nth(5)?;
            (!path.ends_with('/')).then(|| path.trim_start_matches('.').to_string())
        })
        .collect();
    v.sort();
    v
}

fn rpm_files(rpm: &Path) -> Vec<String> {
    let out = run_ok(Command::new("rpm").arg("-qlp").arg(rpm), PKG_TIMEOUT);
    let mut v: Vec<String> = out.stdout.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn rpms_list_the_same_files_as_the_debs() {
    let p = packages();
    for (deb, rpm) in [(&p.server_deb, &p.server_rpm), (&p.client_deb, &p.client_rpm)] {
        let (d, r) = (deb_files(deb), rpm_files(rpm));
        assert!(
            d.iter().any(|f| f.starts_with("/usr/bin/")),
            "{} has no binaries: {d:?}",
            deb.display()
        );
        assert_eq!(
            d,
            r,
            "files of {} (left) and {} (right) differ",
            deb.display(),
            rpm.display()
        );
    }
    let depends = run_ok(
        Command::new("dpkg-deb").arg("-f").arg(&p.client_deb).arg("Depends"),
        PKG_TIMEOUT,
    );
    assert!(
        depends.stdout.contains("fuse3"),
        "jfs-client.deb does not depend on fuse3: {}",
        depends.stdout
    );
    let requires = run_ok(
        Command::new("rpm").args(["-qp", "--requires"]).arg(&p.client_rpm),
        PKG_TIMEOUT,
    );
    assert!(
        requires.stdout.contains("fuse3"),
        "jfs-client.rpm does not require fuse3:\n{}",
        requires.stdout
    );
    let scripts = run_ok(
        Command::new("rpm").args(["-qp", "--scripts"]).arg(&p.server_rpm),
        PKG_TIMEOUT,
    );
    assert!(
        scripts.stdout.contains("useradd") && scripts.stdout.contains("package_pids"),
        "jfs-server.rpm lacks the user-creating and daemon-stopping scripts:\n{}",
        scripts.stdout
    );
}

// ------------------------------------------------------------------ the machine, before and after

fn dpkg_status(pkg: &str) -> String {
    run(
        Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", pkg]),
        PKG_TIMEOUT,
    )
    .stdout
    .trim()
    .to_string()
}

/// What /sbin/mount.jfs was before the test.
enum HelperWas {
    Link(PathBuf),
    File(Vec<u8>, u32),
    Absent,
}

/// Puts back everything the test changed; runs on every exit path.
struct Machine {
    helper_was: HelperWas,
    user_existed: bool,
    children: Vec<Child>,
    mounts: Vec<PathBuf>,
    log_file: PathBuf,
}

impl Machine {
    fn restore_helper(&self) {
        let tmp = PathBuf::from(format!("{HELPER}.jfs-test-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        // Written beside it and renamed over it, so no `mount -t jfs` elsewhere sees it missing.
        let res = match &self.helper_was {
            HelperWas::Link(t) => std::os::unix::fs::symlink(t, &tmp).and_then(|_| fs::rename(&tmp, HELPER)),
            HelperWas::File(bytes, mode) => fs::write(&tmp, bytes)
                .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(*mode)))
                .and_then(|_| fs::rename(&tmp, HELPER)),
            HelperWas::Absent => match fs::remove_file(HELPER) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        if let Err(e) = res {
            eprintln!("cleanup: cannot restore {HELPER}: {e} (run scripts/install.sh to put it back)");
        }
    }

    fn remove_fstab_line(&self) {
        let Ok(text) = fs::read_to_string(FSTAB) else { return };
        if !text.contains(FSTAB_MARK) {
            return;
        }
        let kept: String = text
            .lines()
            .filter(|l| !l.contains(FSTAB_MARK))
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(Path::new(FSTAB), &kept);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        for m in &self.mounts {
            if is_mounted(m) {
                eprintln!("cleanup: unmounting {}", m.display());
                lazy_unmount(m);
            }
        }
        self.remove_fstab_line();
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for pkg in ["jfs-client", "jfs-server"] {
            if !dpkg_status(pkg).is_empty() && !dpkg_status(pkg).starts_with("un") {
                eprintln!("cleanup: purging {pkg}");
                let _ = run_cmd(Command::new("dpkg").args(["-P", pkg]), PKG_TIMEOUT);
            }
        }
        self.restore_helper();
        if !self.user_existed && user_ids("jfs").is_some() {
            let _ = run_cmd(Command::new("userdel").arg("jfs"), PKG_TIMEOUT);
        }
        let _ = fs::remove_file(&self.log_file);
        let _ = fs::remove_dir("/var/log/jfs");
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("jfs-test-{}", std::process::id()));
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    let mode = fs::metadata(path).map(|m| m.mode() & 0o7777).unwrap_or(0o644);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).expect("chmod");
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), path.display()));
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let out = run(Command::new("getent").args(["passwd", name]), PKG_TIMEOUT);
    let line = out.stdout.lines().next()?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Pids whose executable is one of the packaged binaries (or its deleted old copy).
fn packaged_daemons() -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) {
            let exe = exe.to_string_lossy().into_owned();
            if exe.starts_with("/usr/bin/jfs") && pid_alive(pid) {
                v.push((pid, exe));
            }
        }
    }
    v
}

/// The ExecStart= command of an installed unit, with the config path and the
/// EnvironmentFile variable replaced by the test's.
fn exec_start(unit: &str, conf: &Path, var: &str, args: &[String]) -> Vec<String> {
    let text = fs::read_to_string(format!("/usr/lib/systemd/system/{unit}")).expect("read installed unit");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{unit} has no ExecStart=:\n{text}"));
    let mut cmd = Vec::new();
    for w in line.split_whitespace() {
        if w == format!("${var}") {
            cmd.extend(args.iter().cloned());
        } else if w == "/etc/jfs/jfs.toml" {
            cmd.push(conf.to_string_lossy().into_owned());
        } else {
            cmd.push(w.to_string());
        }
    }
    cmd
}

/// Starts a daemon as the unit would (as `jfs`, NOTIFY_SOCKET set) and
/// waits for its READY=1.
fn start_like_systemd(cmd: &[String], ids: (u32, u32), dir: &Path, name: &str) -> Child {
    let sock_path = dir.join(format!("{name}.notify"));
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    // The daemon runs as jfs and must be allowed to send to it.
    fs::set_permissions(&sock_path, fs::Permissions::from_mode(0o777)).expect("chmod notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("socket timeout");
    let log = File::create(dir.join(format!("{name}.log"))).expect("create log");
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .uid(ids.0)
        .gid(ids.1)
        .env("NOTIFY_SOCKET", &sock_path)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup log")))
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let logp = dir.join(format!("{name}.log"));
    wait_until(&format!("READY=1 from {name}"), Duration::from_secs(60), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{name} ({cmd:?}) exited with {st} before READY=1; its log:\n{}",
                fs::read_to_string(&logp).unwrap_or_default()
            );
        }
        let mut buf = [0u8; 4096];
        match sock.recv(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") => Ok(()),
            Ok(n) => Err(format!("got {:?}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => Err(format!("nothing yet ({e})")),
        }
    });
    child
}

fn mount_cmd(args: &[&str]) -> CmdOut {
    run(Command::new("mount").args(args), Duration::from_secs(90))
}

fn umount(mp: &Path) {
    run_ok(Command::new("umount").arg(mp), Duration::from_secs(60));
    assert!(!is_mounted(mp), "{} still mounted after umount", mp.display());
}

/// Asserts a mount(8) call succeeded silently and left the mount live (the
/// helper returns only then), served by the packaged jfs-mountd.
fn assert_mounted_silently(out: &CmdOut, mp: &Path, what: &str) {
    assert!(out.success(), "{what} failed:\n{}", out.describe());
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{what} printed something on success:\n{}",
        out.describe()
    );
    let mine = mounts().into_iter().filter(|(p, _)| p == mp).count();
    assert_eq!(mine, 1, "{what} returned, but {} has {mine} mounts", mp.display());
    let mp_s = mp.to_string_lossy().into_owned();
    let served = pids_mentioning(&mp_s)
        .into_iter()
        .any(|p| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == Path::new("/usr/bin/jfs-mountd")));
    assert!(served, "no /usr/bin/jfs-mountd serves {mp_s} after {what}");
}

#[test]
fn debs_install_run_mount_and_remove_cleanly() {
    let p = packages();
    // One packaging test at a time on a machine: dpkg has one database.
    let _lock = lock_file("/tmp/jfs-test-packaging-install.lock");
    for pkg in ["jfs-server", "jfs-client"] {
        let st = dpkg_status(pkg);
        assert!(
            st.is_empty() || st.starts_with("un"),
            "{pkg} is already known to dpkg ({st}); this test installs and purges the jfs packages and will not \
             touch an existing installation: purge it first (dpkg -P {pkg})"
        );
    }
    for path in ["/etc/jfs/jfs.toml", "/var/lib/jfs/metad", "/var/lib/jfs/blockd"] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists; purging the test's packages would delete it, so the test refuses to run. Move it away first"
        );
    }
    let helper_was = match fs::symlink_metadata(HELPER) {
        Ok(m) if m.file_type().is_symlink() => HelperWas::Link(fs::read_link(HELPER).expect("readlink helper")),
        Ok(m) => HelperWas::File(fs::read(HELPER).expect("read helper"), m.mode() & 0o7777),
        Err(_) => HelperWas::Absent,
    };
    let root = tempfile::Builder::new()
        .prefix("jfs-test-packaging-")
        .tempdir_in(
            std::env::var_os("JFS_TEST_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or("/tmp".into()),
        )
        .expect("temp dir");
    let dir = root.path().to_path_buf();
    // The daemons run as jfs and read the config and the notify sockets in here.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let namespace = format!("pkgtest{}", std::process::id());
    let mut m = Machine {
        helper_was,
        user_existed: user_ids("jfs").is_some(),
        children: Vec::new(),
        mounts: Vec::new(),
        log_file: PathBuf::from(format!("/var/log/jfs/mountd-{namespace}.log")),
    };

    // ---- install
    run_ok(
        Command::new("dpkg")
            .arg("-i")
            .arg(&p.server_deb)
            .arg(&p.client_deb)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        PKG_TIMEOUT,
    );
    for f in [
        "/usr/bin/jfs-metad",
        "/usr/bin/jfs-blockd",
        "/usr/bin/jfs-mountd",
        "/usr/bin/jfs",
    ] {
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    assert_eq!(
        fs::canonicalize(HELPER).ok(),
        fs::canonicalize("/usr/bin/jfs-mountd").ok(),
        "{HELPER} is not the packaged jfs-mountd"
    );
    let ids = user_ids("jfs").expect("postinst did not create the jfs user");
    for d in ["/var/lib/jfs/metad", "/var/lib/jfs/blockd"] {
        let md = fs::metadata(d).unwrap_or_else(|e| panic!("postinst did not create {d}: {e}"));
        assert_eq!((md.uid(), md.gid()), ids, "{d} is not owned by jfs");
    }
    let conffiles = run_ok(
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "jfs-server"]),
        PKG_TIMEOUT,
    );
    for c in ["/etc/jfs/jfs.toml", "/etc/default/jfs-metad", "/etc/default/jfs-blockd"] {
        assert!(
            conffiles.stdout.contains(c),
            "{c} is not a conffile:\n{}",
            conffiles.stdout
        );
    }

    // ---- the units
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify");
    // Documentation=man:... is checked only when the pages are installed (man/ may not exist yet).
    if !run(Command::new("man").args(["-w", "8", "jfs-metad"]), PKG_TIMEOUT).success() {
        verify.arg("--man=no");
    }
    verify.args([
        "/usr/lib/systemd/system/jfs-metad.service",
        "/usr/lib/systemd/system/jfs-blockd.service",
    ]);
    let out = run(&mut verify, PKG_TIMEOUT);
    assert!(
        out.success() && !out.stderr.contains("jfs-"),
        "systemd-analyze verify rejects the units:\n{}",
        out.describe()
    );

    // ---- the daemons, from the installed units' command lines
    let (ip, _ip_lock) = reserve_loopback_ip();
    let conf = dir.join("jfs.toml");
    fs::write(
        &conf,
        format!(
            "namespace.backend.type = \"raft\"\n\
             namespace.backend.raft.initial-conf = \"{ip}:8103:0\"\n\
             jfs.namespace.server.rpc-address = \"{ip}:8101\"\n\
             namespace.replication = 1\n\
             namespace.data-dir = \"/var/lib/jfs/metad\"\n\
             blockd.data-dir = \"/var/lib/jfs/blockd\"\n"
        ),
    )
    .expect("write config");
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).expect("chmod config");
    // Metrics ports are per host by default; this test needs none.
    let metrics_off = |bin: &str| -> Vec<String> {
        let help = run(Command::new(bin).arg("--help"), PKG_TIMEOUT).stdout;
        if help.contains("--metrics-listen") {
            vec!["--metrics-listen=".into()]
        } else {
            vec![]
        }
    };
    let mut metad_args = vec!["--node-id".to_string(), "1".into()];
    metad_args.extend(metrics_off("/usr/bin/jfs-metad"));
    let metad = exec_start("jfs-metad.service", &conf, "JFS_METAD_ARGS", &metad_args);
    m.children.push(start_like_systemd(&metad, ids, &dir, "metad"));
    let mut blockd_args = vec!["--listen".to_string(), format!("{ip}:8201")];
    blockd_args.extend(metrics_off("/usr/bin/jfs-blockd"));
    let blockd = exec_start("jfs-blockd.service", &conf, "JFS_BLOCKD_ARGS", &blockd_args);
    m.children.push(start_like_systemd(&blockd, ids, &dir, "blockd"));
    let conf_s = conf.to_string_lossy().into_owned();
    let jfs = |args: &[&str]| {
        run(
            Command::new("/usr/bin/jfs").arg("--conf").arg(&conf).args(args),
            PKG_TIMEOUT,
        )
    };
    wait_until(
        "the one-node cluster to create the namespace",
        Duration::from_secs(60),
        || {
            let out = jfs(&["admin", "create-namespace", &namespace, "--if-not-exists"]);
            out.success().then_some(()).ok_or_else(|| out.describe())
        },
    );
    wait_until("the blockd to be live", Duration::from_secs(60), || {
        let out = jfs(&["admin", "blockd", "list"]);
        let live = out
            .stdout
            .lines()
            .any(|l| l.contains(&format!("{ip}:8201")) && l.split_whitespace().any(|w| w == "live"));
        live.then_some(()).ok_or_else(|| out.describe())
    });

    // ---- mount -t jfs
    let mp = dir.join("mnt");
    fs::create_dir(&mp).expect("mkdir mount point");
    m.mounts.push(mp.clone());
    let mp_s = mp.to_string_lossy().into_owned();
    let out = mount_cmd(&[
        "-t",
        "jfs",
        &namespace,
        &mp_s,
        "-o",
        &format!("conf={conf_s},allow_other"),
    ]);
    assert_mounted_silently(&out, &mp, "mount -t jfs");
    fs::write(mp.join("hello"), b"hello from the packages\n").expect("write through mount -t jfs");
    assert_eq!(
        fs::read(mp.join("hello")).expect("read back"),
        b"hello from the packages\n"
    );
    let log = fs::read_to_string(&m.log_file)
        .unwrap_or_else(|e| panic!("the helper's daemon has no log {}: {e}", m.log_file.display()));
    assert!(
        log.contains("mounted"),
        "{} lacks the mount:\n{log}",
        m.log_file.display()
    );
    umount(&mp);

    // ---- /etc/fstab: mount DIR, then mount -a -t jfs
    let line = format!("{namespace} {mp_s} jfs defaults,_netdev,conf={conf_s} 0 0 {FSTAB_MARK}\n");
    let mut fstab = fs::read_to_string(FSTAB).unwrap_or_default();
    if !fstab.is_empty() && !fstab.ends_with('\n') {
        fstab.push('\n');
    }
    fstab.push_str(&line);
    write_atomic(Path::new(FSTAB), &fstab);
    let out = mount_cmd(&[&mp_s]);
    assert_mounted_silently(&out, &mp, "mount DIR (fstab)");
    assert_eq!(
        fs::read(mp.join("hello")).expect("read via fstab mount"),
        b"hello from the packages\n"
    );
    fs::write(mp.join("via-fstab"), b"fstab\n").expect("write via fstab mount");
    umount(&mp);
    let out = mount_cmd(&["-a", "-t", "jfs"]);
    assert_mounted_silently(&out, &mp, "mount -a -t jfs");
    assert_eq!(fs::read(mp.join("via-fstab")).expect("read via mount -a"), b"fstab\n");
    // Again, as an operator does after editing fstab: the line is mounted,
    // so nothing is stacked on it.
    let out = mount_cmd(&["-a", "-t", "jfs"]);
    assert!(out.success(), "a second mount -a -t jfs: {}", out.describe());
    let stacked = mounts().into_iter().filter(|(p, _)| p == &mp).count();
    assert_eq!(stacked, 1, "a second mount -a stacked a mount on {mp_s}");
    let out = mount_cmd(&["-t", "jfs", &namespace, &mp_s, "-o", &format!("conf={conf_s}")]);
    assert!(
        out.status.code() == Some(32) && out.stderr.contains("already mounted"),
        "mounting the namespace again on its mount point: {}",
        out.describe()
    );
    assert_eq!(mounts().into_iter().filter(|(p, _)| p == &mp).count(), 1);
    umount(&mp);
    m.remove_fstab_line();

    // ---- read-only, and the failures an operator meets
    let out = mount_cmd(&[
        "-t",
        "jfs",
        &namespace,
        &mp_s,
        "-o",
        &format!("conf={conf_s},ro,allow_other"),
    ]);
    assert_mounted_silently(&out, &mp, "mount -t jfs -o ro");
    assert_eq!(fs::read(mp.join("via-fstab")).expect("read on ro mount"), b"fstab\n");
    assert_errno(fs::write(mp.join("nope"), b"x"), libc::EROFS, "write on a ro mount");
    umount(&mp);

    let out = mount_cmd(&[
        "-t",
        "jfs",
        &namespace,
        &mp_s,
        "-o",
        &format!("conf={conf_s},frobnicate"),
    ]);
    assert!(
        !out.success() && out.stderr.contains("unknown mount option") && out.stderr.contains("frobnicate"),
        "an unknown option was not refused clearly:\n{}",
        out.describe()
    );
    let missing = dir.join("no-such.toml");
    let out = mount_cmd(&[
        "-t",
        "jfs",
        &namespace,
        &mp_s,
        "-o",
        &format!("conf={}", missing.display()),
    ]);
    assert!(
        !out.success() && out.stderr.contains("does not exist") && out.stderr.contains("conf="),
        "a missing config was not reported clearly:\n{}",
        out.describe()
    );
    let nocluster = dir.join("nocluster.toml");
    fs::write(
        &nocluster,
        format!(
            "namespace.backend.raft.initial-conf = \"{ip}:8113:0\"\n\
             jfs.namespace.server.rpc-address = \"{ip}:8111\"\n\
             client.timeout-ms = 3000\n"
        ),
    )
    .expect("write config without cluster");
    let out = mount_cmd(&[
        "-t",
        "jfs",
        &namespace,
        &mp_s,
        "-o",
        &format!("conf={}", nocluster.display()),
    ]);
    assert!(
        !out.success() && out.stderr.contains(&format!("{ip}:8111")),
        "a missing cluster was not reported clearly (naming its address):\n{}",
        out.describe()
    );
    assert!(!is_mounted(&mp), "a failed mount left {mp_s} mounted");

    // ---- upgrade (the same version again): edited config and data stay
    let mut edited = fs::read_to_string("/etc/jfs/jfs.toml").expect("read installed config");
    edited.push_str("# edited by the operator\n");
    fs::write("/etc/jfs/jfs.toml", &edited).expect("edit installed config");
    run_ok(
        Command::new("dpkg")
            .args(["-i", "--force-confold"])
            .arg(&p.server_deb)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        PKG_TIMEOUT,
    );
    assert_eq!(
        fs::read_to_string("/etc/jfs/jfs.toml").expect("config after upgrade"),
        edited,
        "the upgrade replaced the edited /etc/jfs/jfs.toml"
    );

    // ---- remove: daemons stopped, config and data kept
    assert!(
        !packaged_daemons().is_empty(),
        "the daemons are not running before dpkg -r, so their stop proves nothing"
    );
    let out = run(Command::new("dpkg").args(["-r", "jfs-client"]), PKG_TIMEOUT);
    m.restore_helper();
    assert!(out.success(), "dpkg -r jfs-client:\n{}", out.describe());
    run_ok(Command::new("dpkg").args(["-r", "jfs-server"]), PKG_TIMEOUT);
    let left = packaged_daemons();
    assert!(left.is_empty(), "jfs processes still running after dpkg -r: {left:?}");
    for c in &mut m.children {
        let st = c.wait().expect("wait for daemon");
        // SIGTERM from prerm: a clean exit, not a kill.
        assert!(st.success(), "a daemon stopped by dpkg -r exited with {st}");
    }
    assert_eq!(dpkg_status("jfs-server"), "rc", "jfs-server after dpkg -r");
    assert_eq!(
        fs::read_to_string("/etc/jfs/jfs.toml").ok().as_deref(),
        Some(edited.as_str()),
        "dpkg -r did not keep the edited config"
    );
    assert!(
        fs::read_dir("/var/lib/jfs/metad").is_ok_and(|mut d| d.next().is_some()),
        "dpkg -r removed the metad data"
    );
    assert!(
        !Path::new("/usr/bin/jfs-metad").exists(),
        "dpkg -r left /usr/bin/jfs-metad"
    );

    // ---- purge: config and data gone
    run_ok(
        Command::new("dpkg").args(["-P", "jfs-server", "jfs-client"]),
        PKG_TIMEOUT,
    );
    for gone in [
        "/etc/jfs/jfs.toml",
        "/etc/default/jfs-metad",
        "/var/lib/jfs/metad",
        "/var/lib/jfs/blockd",
    ] {
        assert!(!Path::new(gone).exists(), "dpkg -P left {gone}");
    }
    for pkg in ["jfs-server", "jfs-client"] {
        let st = dpkg_status(pkg);
        assert!(
            st.is_empty() || st.starts_with("un"),
            "{pkg} still known to dpkg after purge: {st}"
        );
    }
}
