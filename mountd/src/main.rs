//! jfs-mountd: mounts one jfs namespace with FUSE, and `mount.jfs`, the
//! mount(8) helper (the same binary, chosen by argv[0]).
//!
//! Without `--foreground` (and always as `mount.jfs`) it starts itself again
//! detached (new session, stdio away from the terminal) with
//! `--foreground`, and returns only once the mount is live — or prints why
//! the daemon failed. The daemon ends when the filesystem is unmounted
//! (`umount MOUNTPOINT`) or on SIGTERM/SIGINT, after flushing open files.

mod fuse_ops;
mod options;

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{ArgAction, Parser};
use fuser::{MountOption, SessionACL};
use jfs_client::Client;
use jfs_common::config::{Config, DEFAULT_CONFIG_PATH};
use jfs_common::telemetry::Kind;

use crate::options::MountOpts;

/// Set in the environment of a daemon started by the helper: once mounted
/// it moves its stdio away from the pipe the helper reads.
const DETACHED_ENV: &str = "JFS_MOUNTD_DETACHED";
/// How long the helper waits for the mount to go live.
const MOUNT_DEADLINE: Duration = Duration::from_secs(30);
/// Kernel readahead for the mount, in KiB (two default-size blocks).
const READAHEAD_KB: u32 = 8192;
/// Threads taking FUSE requests.
const FUSE_THREADS: usize = 8;
/// Where a daemon started by mount(8) logs unless `log=PATH` says otherwise:
/// mount(8) gives it no terminal to write to, and /var/log is where an
/// operator looks first.
const HELPER_LOG_DIR: &str = "/var/log/jfs";

#[derive(Parser, Debug)]
#[command(name = "jfs-mountd", version, about = "Mount a jfs namespace (FUSE daemon)")]
struct DaemonArgs {
    /// jfs config file (default /etc/jfs/jfs.toml, or conf= in -o)
    #[arg(long, value_name = "PATH")]
    conf: Option<PathBuf>,
    /// Mount options, comma separated (conf=PATH, allow_other, default_permissions, ro, rw,
    /// attr_timeout=SECS, entry_timeout=SECS, log=PATH, metrics=IP:PORT)
    #[arg(short = 'o', value_name = "OPTS", action = ArgAction::Append)]
    options: Vec<String>,
    /// Stay in the foreground (do not detach)
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Namespace to mount
    namespace: String,
    /// Directory to mount it on
    mountpoint: PathBuf,
}

#[derive(Parser, Debug)]
#[command(
    name = "mount.jfs",
    version,
    about = "mount(8) helper for jfs: mount.jfs NAMESPACE MOUNTPOINT [-o OPTS]"
)]
struct HelperArgs {
    namespace: String,
    mountpoint: PathBuf,
    #[arg(short = 'o', value_name = "OPTS", action = ArgAction::Append)]
    options: Vec<String>,
    /// Sloppy: ignore unknown options
    #[arg(short = 's')]
    sloppy: bool,
    /// Fake: do everything but the mount
    #[arg(short = 'f')]
    fake: bool,
    /// Do not write /etc/mtab (there is none to write)
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Verbose
    #[arg(short = 'v')]
    verbose: bool,
    /// Filesystem type as given to mount(8) (ignored)
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    /// Mount namespace (ignored)
    #[arg(short = 'N', value_name = "NS")]
    mount_ns: Option<String>,
}

fn main() {
    jfs_common::manpage::exit_if_requested(<DaemonArgs as clap::CommandFactory>::command);
    let argv0: OsString = std::env::args_os().next().unwrap_or_default();
    let helper = Path::new(&argv0).file_name().is_some_and(|n| n == "mount.jfs");
    let code = if helper { helper_main() } else { daemon_main() };
    std::process::exit(code);
}

fn parse_opts(args: &[String], sloppy: bool, me: &str) -> MountOpts {
    match MountOpts::parse(args, sloppy) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{me}: {e}");
            std::process::exit(2);
        }
    }
}

fn helper_main() -> i32 {
    let args = HelperArgs::parse();
    let opts = parse_opts(&args.options, args.sloppy, "mount.jfs");
    let conf = opts.conf.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    // Checked here, not only by the daemon, so the message can say how to
    // name the file from mount(8) and /etc/fstab.
    if !conf.is_file() {
        eprintln!(
            "mount.jfs: config file {} does not exist; create it (see jfs.toml(5)) or name another with \
             -o conf=PATH (in /etc/fstab: NAMESPACE MOUNTPOINT jfs defaults,_netdev,conf=PATH 0 0)",
            conf.display()
        );
        return 1;
    }
    if args.fake {
        return 0;
    }
    spawn_and_wait(
        "mount.jfs",
        &args.namespace,
        &args.mountpoint,
        &conf,
        &opts,
        args.verbose,
    )
}

fn daemon_main() -> i32 {
    let args = DaemonArgs::parse();
    let opts = parse_opts(&args.options, false, "jfs-mountd");
    let conf = args
        .conf
        .clone()
        .or_else(|| opts.conf.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    if args.foreground {
        run_daemon(&args.namespace, &args.mountpoint, &conf, &opts)
    } else {
        spawn_and_wait("jfs-mountd", &args.namespace, &args.mountpoint, &conf, &opts, false)
    }
}

// ------------------------------------------------------------------ helper side

/// FUSE mounts at `mp`: (major:minor) of each, in mount order.
fn fuse_mounts_at(mp: &Path) -> Vec<String> {
    jfs_client::mounts::at(mp)
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse"))
        .map(|m| m.device)
        .collect()
}

/// The path of our stderr when it is a regular file.
fn stderr_log_file() -> Option<PathBuf> {
    let meta = std::fs::metadata("/proc/self/fd/2").ok()?;
    if !meta.is_file() {
        return None;
    }
    let p = std::fs::read_link("/proc/self/fd/2").ok()?;
    (p.is_absolute() && p.exists()).then_some(p)
}

/// `/var/log/jfs/mountd-NAMESPACE.log`, if it can be written: a mount
/// without a log is better than no mount (e.g. a user mount, not root).
fn default_helper_log(namespace: &str) -> Option<PathBuf> {
    let name: String = namespace
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = Path::new(HELPER_LOG_DIR).join(format!("mountd-{name}.log"));
    std::fs::create_dir_all(HELPER_LOG_DIR).ok()?;
    std::fs::OpenOptions::new().create(true).append(true).open(&path).ok()?;
    Some(path)
}

/// mount(8)'s "mount failure", which it also uses for "already mounted".
const ALREADY_MOUNTED_EXIT: i32 = 32;

/// Starts the daemon detached and waits until the mount is live.
fn spawn_and_wait(me: &str, namespace: &str, mountpoint: &Path, conf: &Path, opts: &MountOpts, verbose: bool) -> i32 {
    let mp = match mountpoint.canonicalize() {
        Ok(p) if p.is_dir() => p,
        Ok(p) => {
            eprintln!("{me}: mount point {} is not a directory", p.display());
            return 1;
        }
        Err(e) => {
            eprintln!(
                "{me}: mount point {}: {e} (create the directory first)",
                mountpoint.display()
            );
            return 1;
        }
    };
    // FUSE mounts stack where a block device would get EBUSY: refuse, as
    // mount(8) does for those.
    if let Some(top) = jfs_client::mounts::at(&mp).last() {
        if top.fstype == "fuse.jfs" && (top.source == namespace || top.source == format!("jfs:{namespace}")) {
            eprintln!("{me}: {namespace} is already mounted on {}", mp.display());
            return ALREADY_MOUNTED_EXIT;
        }
    }
    let conf = conf.canonicalize().unwrap_or_else(|_| conf.to_path_buf());
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{me}: cannot find my own executable to start the daemon: {e}");
            return 1;
        }
    };
    let before = fuse_mounts_at(&mp).len();
    let mut opts = opts.clone();
    if opts.log.is_none() {
        // Started with stderr going to a log file (e.g. by `jfs local up`):
        // the daemon keeps logging there after it detaches.
        opts.log = stderr_log_file();
    }
    if opts.log.is_none() && me == "mount.jfs" {
        opts.log = default_helper_log(namespace);
    }
    let mut cmd = Command::new(exe);
    cmd.arg0("jfs-mountd")
        .arg("--foreground")
        .arg("--conf")
        .arg(&conf)
        .arg("-o")
        .arg(opts.to_arg())
        .arg("--")
        .arg(namespace)
        .arg(&mp)
        .env(DETACHED_ENV, "1")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{me}: cannot start jfs-mountd: {e}");
            return 1;
        }
    };
    // Collect what the daemon says until it detaches its stderr.
    let said = Arc::new(Mutex::new(String::new()));
    let reader = child.stderr.take().map(|mut err| {
        let said = said.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                said.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    });
    let deadline = Instant::now() + MOUNT_DEADLINE;
    loop {
        if fuse_mounts_at(&mp).len() > before {
            if verbose {
                println!("jfs:{namespace} mounted on {}", mp.display());
            }
            return 0;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                if let Some(r) = reader {
                    let _ = r.join();
                }
                let text = said.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let text = text.trim();
                if text.is_empty() {
                    eprintln!("{me}: the jfs daemon exited ({status}) before the mount was live");
                } else {
                    eprintln!("{text}");
                }
                return 1;
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("{me}: cannot watch the jfs daemon: {e}");
                return 1;
            }
        }
        if Instant::now() >= deadline {
            // SAFETY: plain kill(2) of the child we started.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let text = said.lock().unwrap_or_else(|p| p.into_inner()).clone();
            eprintln!(
                "{me}: jfs:{namespace} was not mounted on {} within {}s; stopped the daemon.\n{}",
                mp.display(),
                MOUNT_DEADLINE.as_secs(),
                text.trim()
            );
            return 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------ daemon side

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::session=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Points stdout and stderr at `target` (the log file, or /dev/null).
fn redirect_stdio(target: &File) {
    // SAFETY: dup2 on descriptors we own; 1 and 2 are replaced atomically.
    unsafe {
        libc::dup2(target.as_raw_fd(), 1);
        libc::dup2(target.as_raw_fd(), 2);
    }
}

/// Raises the kernel's readahead for this mount (the FUSE handshake caps
/// it at 128 KiB); best effort.
fn raise_readahead(mp: &Path) {
    if let Some(dev) = fuse_mounts_at(mp).last() {
        let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        if let Err(e) = std::fs::write(&path, READAHEAD_KB.to_string()) {
            tracing::debug!(%path, error = %e, "could not raise readahead");
        }
    }
}

/// The mount's series: FUSE requests (fuse_ops) and the client library's
/// caches and calls in flight.
const METRICS: &[(&str, Kind, &str)] = &[
    (
        "jfs_fuse_requests_total",
        Kind::LabelledCounter,
        "FUSE requests answered, by operation",
    ),
    (
        "jfs_fuse_request_duration_seconds",
        Kind::Histogram,
        "time to answer a FUSE request, by operation",
    ),
    (
        "jfs_fuse_requests_in_flight",
        Kind::Gauge,
        "FUSE requests being answered now",
    ),
    (
        "jfs_fuse_request_panics_total",
        Kind::LabelledCounter,
        "FUSE requests whose handler panicked (answered EIO; the mount stays up)",
    ),
    (
        "jfs_client_block_cache_hits_total",
        Kind::Counter,
        "block reads answered from the mount's block cache",
    ),
    (
        "jfs_client_block_cache_misses_total",
        Kind::Counter,
        "block reads that went to a blockd",
    ),
    (
        "jfs_client_block_read_bytes_total",
        Kind::Counter,
        "bytes read from blockds",
    ),
    (
        "jfs_client_block_reads_in_flight",
        Kind::Gauge,
        "block reads from blockds in progress",
    ),
    (
        "jfs_client_block_uploads_in_flight",
        Kind::Gauge,
        "block writes to blockds in progress",
    ),
    (
        "jfs_client_meta_calls_in_flight",
        Kind::Gauge,
        "metadata calls to the metad leader in progress",
    ),
];

fn run_daemon(namespace: &str, mountpoint: &Path, conf: &Path, opts: &MountOpts) -> i32 {
    init_logging();
    let detached = std::env::var_os(DETACHED_ENV).is_some();
    let fail = |msg: String| {
        eprintln!("jfs-mountd: {msg}");
        1
    };
    let log_file = if detached {
        let f = match &opts.log {
            Some(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| (p.clone(), e)),
            None => std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .map_err(|e| (PathBuf::from("/dev/null"), e)),
        };
        match f {
            Ok(f) => Some(f),
            Err((p, e)) => return fail(format!("cannot open log file {}: {e}", p.display())),
        }
    } else {
        None
    };
    let cfg = match Config::load(conf) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(e) = jfs_common::tls::init_client(&cfg, jfs_common::tls::Role::Client) {
        return fail(format!("cannot load this mount's TLS certificate: {e}"));
    }
    if !mountpoint.is_dir() {
        return fail(format!("mount point {} is not a directory", mountpoint.display()));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("jfs-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    let metrics_addr = opts
        .metrics
        .clone()
        .unwrap_or_else(|| cfg.mount_metrics_address.clone());
    rt.block_on(async {
        if jfs_common::telemetry::start(&metrics_addr, "mountd").is_some() {
            jfs_common::telemetry::describe(METRICS);
        }
    });
    let client = match rt.block_on(Client::connect(&cfg, namespace)) {
        Ok(c) => c,
        Err(e) => {
            return fail(format!(
                "cannot open namespace {namespace:?} on the metad cluster ({}): {e}",
                cfg.rpc_addresses.join(",")
            ))
        }
    };
    // A read-only grant mounts read-only, so writes fail in the kernel with
    // EROFS rather than one by one at metad.
    let read_only = opts.read_only || client.namespace_info().read_only_for_caller;
    if read_only && !opts.read_only {
        tracing::info!(
            namespace,
            "this client's grant on the namespace is read-only: mounting read-only"
        );
    }
    let attr_ttl = opts.attr_timeout.unwrap_or(cfg.attr_timeout);
    let entry_ttl = opts.entry_timeout.unwrap_or(cfg.entry_timeout);
    // Names this mount knows are absent answer lookups for as long as the
    // kernel may keep a name it was told about: one staleness bound.
    client.cache_dir_names(entry_ttl);
    let notifier = Arc::new(std::sync::OnceLock::new());
    let fs = fuse_ops::JfsFs::new(
        client.clone(),
        rt.handle().clone(),
        attr_ttl,
        entry_ttl,
        read_only,
        notifier.clone(),
    );

    let mut mcfg = fuser::Config::default();
    mcfg.mount_options = vec![
        // The source mount(8) and systemd compare with the first field of an
        // /etc/fstab line: equal to it, `mount -a` knows the line is mounted
        // and does not stack a second mount on it.
        MountOption::FSName(namespace.to_string()),
        // A kernel option (not fuser's Subtype, which only fusermount sees),
        // so the type shows as fuse.jfs however we mount.
        MountOption::CUSTOM("subtype=jfs".into()),
    ];
    // jfs trusts its clients: metad checks no permissions. A mount other
    // users may enter must therefore have the kernel check them, or every
    // user could read and write every file.
    if opts.default_permissions || opts.allow_other {
        mcfg.mount_options.push(MountOption::DefaultPermissions);
    }
    if read_only {
        mcfg.mount_options.push(MountOption::RO);
    }
    mcfg.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    mcfg.n_threads = Some(FUSE_THREADS);

    let mut session = match fuser::Session::new(fs, mountpoint, &mcfg) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot mount on {}: {e}", mountpoint.display())),
    };
    let _ = notifier.set(session.notifier());
    // Mounted. From here on nobody reads our stderr pipe.
    if let Some(f) = &log_file {
        redirect_stdio(f);
    }
    let mp_abs = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
    tracing::info!(namespace, mountpoint = %mp_abs.display(), "mounted");
    raise_readahead(&mp_abs);

    let mut unmounter = session.unmount_callable();
    let sig_client = client.clone();
    let sig_mp = mp_abs.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; stop the daemon with umount");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: flushing open files and unmounting");
        if let Err(e) = sig_client.flush_all().await {
            tracing::error!(error = %e, "flush before unmount failed");
        }
        let res = tokio::task::spawn_blocking(move || unmounter.unmount()).await;
        if !matches!(res, Ok(Ok(()))) {
            // Busy (open files, a shell inside): detach it lazily and go.
            tracing::warn!(?res, "unmount failed; detaching the mount lazily and exiting");
            if let Ok(c) = std::ffi::CString::new(sig_mp.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 with a valid NUL-terminated path.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
            std::process::exit(0);
        }
    });

    let res = session.run();
    tracing::info!(namespace, "unmounted");
    rt.shutdown_timeout(Duration::from_secs(5));
    match res {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "FUSE session ended with an error");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_accepts_what_mount8_passes() {
        let a = HelperArgs::try_parse_from(["mount.jfs", "default", "/mnt/j", "-o", "rw,conf=/x.toml", "-n", "-v"])
            .unwrap();
        assert_eq!(a.namespace, "default");
        assert!(a.no_mtab && a.verbose);
        let a = HelperArgs::try_parse_from(["mount.jfs", "-s", "-f", "ns", "/m", "-t", "jfs"]).unwrap();
        assert!(a.sloppy && a.fake);
        let d = DaemonArgs::try_parse_from(["jfs-mountd", "-f", "-o", "ro", "-o", "allow_other", "ns", "/m"]).unwrap();
        assert!(d.foreground);
        assert_eq!(d.options, vec!["ro", "allow_other"]);
    }
}
