//! `jfs local up` / `jfs local down`: a whole jfs cluster on one machine.
//!
//! Everything lives in one state directory: `jfs.toml`, the daemons' data
//! (`metad1..3`, `blockd1..3`), `logs/<name>.log`, `run/<name>.pid` and
//! `mounts` (mountpoints made by `up`, so `down` knows what to unmount).
//! Both commands are idempotent: `up` starts only what is not running (a pid
//! file counts only if it names a live process with the expected command
//! line) and mounts only if not mounted; `down` stops only what runs.
//!
//! With the mirror (the default), the cluster also has a table store: a
//! Dynoxide server (DynamoDB-compatible, SQLite-backed) on a loopback port
//! with its database in `tablestore/`; metad talks to it exactly as to
//! DynamoDB. `down --drop-metadata` then `up --recovery` replays losing the
//! whole metadata cluster and restoring it from the tables.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jfs_client::mounts::{self, MountEntry};
use jfs_common::config::Config;

use crate::{admin, metastatus, CliError, CliResult};

const DEFAULT_IP: &str = "127.0.0.1";
const METAD_COUNT: u64 = 3;
const BLOCKD_COUNT: u64 = 3;
/// How long `up` waits for a leader and a blockd heartbeat. A fresh cluster
/// needs a few seconds; the rest is headroom for a loaded machine.
const READY_DEADLINE: Duration = Duration::from_secs(45);
/// How long jfs-mountd may take to report the mount live.
const MOUNT_DEADLINE: Duration = Duration::from_secs(30);
/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// The namespace `up` creates and mounts.
const NAMESPACE: &str = "default";

pub fn metad_rpc_port(i: u64) -> u16 {
    (8101 + 10 * (i - 1)) as u16
}
pub fn metad_raft_port(i: u64) -> u16 {
    (8103 + 10 * (i - 1)) as u16
}
pub fn blockd_port(j: u64) -> u16 {
    (8201 + 10 * (j - 1)) as u16
}
/// Prometheus endpoints: each daemon gets its own port on the cluster's IP.
pub fn metad_metrics_port(i: u64) -> u16 {
    (8102 + 10 * (i - 1)) as u16
}
pub fn blockd_metrics_port(j: u64) -> u16 {
    (8202 + 10 * (j - 1)) as u16
}
pub const MOUNT_METRICS_PORT: u16 = 8401;
pub const TABLESTORE_PORT: u16 = 8301;
/// The DynamoDB-compatible server the local cluster runs (see docs/DECISIONS.md).
const TABLESTORE_BINARY: &str = "dynoxide";

/// Config keys `up --recovery` sets (recovery on, mirror off, as the seed
/// systems require while restoring).
const RECOVERY_KEY: &str = "namespace.backend.raft.recovery.mode";
const MIRROR_KEY: &str = "namespace.backend.raft.async.dynamodb.enabled";

/// Sets `key = value` in config text written by `local_config_text`:
/// drops any line for the key, then appends the new one.
pub fn set_config_key(text: &str, key: &str, value: &str) -> String {
    let mut out: String = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with(key) && t[key.len()..].trim_start().starts_with('='))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("{key} = {value}\n"));
    out
}

/// The config a fresh local cluster gets.
pub fn local_config_text(state: &Path, ip: &str, mirror: bool, tls: bool) -> String {
    let initial: Vec<String> = (1..=METAD_COUNT)
        .map(|i| format!("{ip}:{}:0", metad_raft_port(i)))
        .collect();
    let rpc: Vec<String> = (1..=METAD_COUNT)
        .map(|i| format!("{ip}:{}", metad_rpc_port(i)))
        .collect();
    format!(
        "# Written by `jfs local up` for a development cluster on {ip}: 3 metad, 3 blockd.\n\
         # Each daemon gets its own data directory on its command line (STATE/metad<i>,\n\
         # STATE/blockd<j>); the data-dir keys below are only the defaults.\n\
         namespace.backend.type = \"raft\"\n\
         namespace.backend.raft.initial-conf = \"{}\"\n\
         jfs.namespace.server.rpc-address = \"{}\"\n\
         namespace.data-dir = {}\n\
         blockd.data-dir = {}\n\
         namespace.replication = 3\n\
         # A development cluster gives deleted space back quickly; production keeps\n\
         # unreferenced blocks 10 minutes for readers holding old block maps.\n\
         blockd.gc-grace-ms = 10000\n\
         # Several daemons share this host, so each gets its metrics port on its command\n\
         # line (metad<i> {ip}:81<i-1>2, blockd<j> {ip}:82<j-1>2, the mount {ip}:{MOUNT_METRICS_PORT});\n\
         # daemons started by hand with this file export none.\n\
         metad.metrics-address = \"\"\n\
         blockd.metrics-address = \"\"\n",
        initial.join(","),
        rpc.join(","),
        toml_string(&state.join("metad")),
        toml_string(&state.join("blockd")),
    ) + &if tls {
        format!(
            "# Mutual TLS on every connection, with certificates from the cluster's own CA\n\
             # (STATE/ca; one per role in STATE/tls, made by `jfs local up`).\n\
             security.tls.enabled = true\n\
             security.tls.dir = {}\n",
            toml_string(&state.join("tls"))
        )
    } else {
        String::new()
    } + &if mirror {
        format!(
            "# Metadata is mirrored to the local table store (a DynamoDB-compatible server\n\
             # on {ip}:{TABLESTORE_PORT}, data in STATE/tablestore); for real DynamoDB drop the\n\
             # endpoint and credentials (the standard AWS chain is used) and set the region.\n\
             {MIRROR_KEY} = true\n\
             namespace.dynamodb.endpoint = \"http://{ip}:{TABLESTORE_PORT}\"\n\
             namespace.dynamodb.region = \"us-east-1\"\n\
             namespace.dynamodb.table-prefix = \"jfs_\"\n\
             namespace.dynamodb.access-key = \"local\"\n\
             namespace.dynamodb.access-secret = \"local\"\n"
        )
    } else {
        String::new()
    }
}

fn toml_string(p: &Path) -> String {
    toml::Value::String(p.to_string_lossy().into_owned()).to_string()
}

/// Where everything of one local cluster is.
struct Layout {
    state: PathBuf,
}

impl Layout {
    fn conf(&self) -> PathBuf {
        self.state.join("jfs.toml")
    }
    fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }
    fn run(&self) -> PathBuf {
        self.state.join("run")
    }
    fn log(&self, name: &str) -> PathBuf {
        self.logs().join(format!("{name}.log"))
    }
    fn pid_file(&self, name: &str) -> PathBuf {
        self.run().join(format!("{name}.pid"))
    }
    fn mounts(&self) -> PathBuf {
        self.state.join("mounts")
    }

    fn tablestore(&self) -> PathBuf {
        self.state.join("tablestore")
    }

    /// Every daemon of the cluster with its exact arguments (after argv[0]).
    fn daemons(&self, cfg: &Config, ip: &str) -> Vec<Daemon> {
        let conf: OsString = self.conf().into();
        let mut out = Vec::new();
        // Ours only if the config points at it (it may name real DynamoDB).
        let endpoint = format!("http://{ip}:{TABLESTORE_PORT}");
        if cfg.dynamodb.endpoint.as_deref() == Some(endpoint.as_str()) {
            out.push(Daemon {
                args: vec![
                    "serve".into(),
                    "--host".into(),
                    ip.into(),
                    "--port".into(),
                    TABLESTORE_PORT.to_string().into(),
                    "--db-path".into(),
                    self.tablestore().join("tables.sqlite").into(),
                ],
                data_dir: self.tablestore(),
                addr: format!("{ip}:{TABLESTORE_PORT}"),
                name: "tablestore".into(),
                binary: TABLESTORE_BINARY,
            });
        }
        for p in &cfg.peers {
            let name = format!("metad{}", p.id);
            out.push(Daemon {
                args: vec![
                    "--conf".into(),
                    conf.clone(),
                    "--node-id".into(),
                    p.id.to_string().into(),
                    "--data-dir".into(),
                    self.state.join(&name).into(),
                    "--metrics-listen".into(),
                    format!("{ip}:{}", metad_metrics_port(p.id)).into(),
                ],
                data_dir: self.state.join(&name),
                addr: p.rpc_addr.clone(),
                name,
                binary: "jfs-metad",
            });
        }
        for j in 1..=BLOCKD_COUNT {
            let name = format!("blockd{j}");
            out.push(Daemon {
                args: vec![
                    "--conf".into(),
                    conf.clone(),
                    "--data-dir".into(),
                    self.state.join(&name).into(),
                    "--listen".into(),
                    format!("{ip}:{}", blockd_port(j)).into(),
                    "--metrics-listen".into(),
                    format!("{ip}:{}", blockd_metrics_port(j)).into(),
                ],
                data_dir: self.state.join(&name),
                addr: format!("{ip}:{}", blockd_port(j)),
                name,
                binary: "jfs-blockd",
            });
        }
        out
    }
}

struct Daemon {
    name: String,
    binary: &'static str,
    args: Vec<OsString>,
    /// Where it serves once up (metad: client RPC; blockd: Block RPC).
    addr: String,
    data_dir: PathBuf,
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> CliError {
    CliError::Failed(format!("{what}: {e}"))
}

/// Finds a jfs binary: next to the running `jfs` first (a build directory or
/// an install prefix keeps them together), else on PATH.
pub fn find_binary(name: &str) -> CliResult<PathBuf> {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(CliError::Failed(format!(
        "cannot find `{name}` next to this `jfs` or on PATH; build everything with `cargo build --release` \
         and run target/release/jfs, or install the jfs binaries together"
    )))
}

// ---------------------------------------------------------------- processes

/// True when `pid` exists and has not exited (a zombie has exited).
fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z') | Some('X') | None),
            None => false,
        },
        Err(_) => false,
    }
}

/// True when `pid` runs `daemon` exactly: same binary name and same arguments.
/// This is what protects us from a recycled pid or another cluster's daemon.
fn runs(pid: i32, daemon: &Daemon) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut parts = raw.split(|b| *b == 0);
    let argv0 = parts.next().unwrap_or_default();
    let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    if base != daemon.binary.as_bytes() {
        return false;
    }
    let mut rest: Vec<&[u8]> = parts.collect();
    // cmdline ends with a NUL, which leaves one empty trailing piece.
    if rest.last().is_some_and(|l| l.is_empty()) {
        rest.pop();
    }
    rest.len() == daemon.args.len() && rest.iter().zip(&daemon.args).all(|(a, b)| *a == b.as_encoded_bytes())
}

/// The pid of the running instance of `daemon`, if any: the pid file's if it
/// checks out, else found by scanning /proc (a lost or stale pid file must not
/// make us start a second copy, nor make `down` miss one).
fn running_pid(layout: &Layout, daemon: &Daemon) -> Option<i32> {
    if let Ok(text) = fs::read_to_string(layout.pid_file(&daemon.name)) {
        if let Ok(pid) = text.trim().parse::<i32>() {
            if pid > 0 && pid_alive(pid) && runs(pid, daemon) {
                return Some(pid);
            }
        }
    }
    let dir = fs::read_dir("/proc").ok()?;
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if runs(pid, daemon) && pid_alive(pid) {
            return Some(pid);
        }
    }
    None
}

fn write_atomic(path: &Path, text: &str) -> CliResult<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(|e| io_err(format!("cannot write {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(format!("cannot rename {} into place", tmp.display()), e))
}

fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    crate::fs_cmd::format_utc(secs, true)
}

/// Starts `daemon` in its own session (so a closing terminal or Ctrl-C does
/// not reach it), appending its output to its log, and records its pid.
fn spawn(layout: &Layout, daemon: &Daemon) -> CliResult<Child> {
    let bin = find_binary(daemon.binary)?;
    fs::create_dir_all(&daemon.data_dir)
        .map_err(|e| io_err(format!("cannot create {}", daemon.data_dir.display()), e))?;
    let log_path = layout.log(&daemon.name);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_err(format!("cannot open log {}", log_path.display()), e))?;
    let cmdline: Vec<String> = std::iter::once(bin.to_string_lossy().into_owned())
        .chain(daemon.args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect();
    // A marker in the log separates runs, so the operator reads the right one.
    let _ = writeln!(log, "==== {} jfs local up: starting {}", now_utc(), cmdline.join(" "));
    let out = log
        .try_clone()
        .map_err(|e| io_err("cannot duplicate log file handle", e))?;
    let mut cmd = Command::new(&bin);
    cmd.args(&daemon.args)
        .current_dir(&layout.state)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| io_err(format!("cannot start {} ({})", daemon.name, bin.display()), e))?;
    write_atomic(&layout.pid_file(&daemon.name), &format!("{}\n", child.id()))?;
    Ok(child)
}

// ---------------------------------------------------------------- mounts

fn mount_at(mp: &Path) -> Option<MountEntry> {
    // The last entry wins: mounts stack.
    mounts::at(mp).pop()
}

/// A FUSE mount whose daemon died answers every call with ENOTCONN.
/// statfs(2), not stat: the kernel may answer a stat of the mount root from
/// its attribute cache for a while after the daemon died, but it always
/// sends statfs to the daemon, and a dead one makes that fail with ENOTCONN.
fn mount_is_dead(mp: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(mp.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid C string and `st` a writable statfs buffer
    // for the duration of the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

fn run_quiet(prog: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{prog}: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!("cannot run {prog}: {e}")),
    }
}

/// umount, then fusermount3 -u (for non-root), then a lazy unmount so a busy
/// mountpoint cannot keep the cluster up; returns what was done.
fn unmount(mp: &Path) -> Result<&'static str, String> {
    let mp_os = mp.as_os_str();
    let first = match run_quiet("umount", &[mp_os]) {
        Ok(()) => return Ok("unmounted"),
        Err(e) => e,
    };
    if run_quiet("fusermount3", &["-u".as_ref(), mp_os]).is_ok() {
        return Ok("unmounted");
    }
    match run_quiet("umount", &["-l".as_ref(), mp_os]) {
        Ok(()) => Ok("lazily unmounted (it was busy; processes still using it keep it until they let go)"),
        Err(e) => Err(format!("cannot unmount {}: {first}; {e}", mp.display())),
    }
}

fn read_mounts(layout: &Layout) -> Vec<PathBuf> {
    fs::read_to_string(layout.mounts())
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn write_mounts(layout: &Layout, mounts: &[PathBuf]) -> CliResult<()> {
    let mut text = String::new();
    for m in mounts {
        text.push_str(&m.to_string_lossy());
        text.push('\n');
    }
    write_atomic(&layout.mounts(), &text)
}

// ---------------------------------------------------------------- up

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// Creates the state directory and its config if needed; returns the config and the IP.
fn prepare_state(dir: &Path, ip: Option<&str>, opts: UpOptions) -> CliResult<(Layout, Config, String)> {
    if let Some(ip) = ip {
        if ip.parse::<Ipv4Addr>().is_err() {
            return Err(CliError::Usage(format!(
                "--ip {ip:?} is not an IPv4 address (e.g. 127.0.0.1 or 127.0.5.1)"
            )));
        }
    }
    fs::create_dir_all(dir).map_err(|e| io_err(format!("cannot create state directory {}", dir.display()), e))?;
    let state = fs::canonicalize(dir).map_err(|e| io_err(format!("cannot resolve {}", dir.display()), e))?;
    let layout = Layout { state };
    for d in [layout.logs(), layout.run()] {
        fs::create_dir_all(&d).map_err(|e| io_err(format!("cannot create {}", d.display()), e))?;
    }
    let conf = layout.conf();
    if !conf.exists() {
        let ip = ip.unwrap_or(DEFAULT_IP);
        write_atomic(
            &conf,
            &local_config_text(&layout.state, ip, !opts.no_mirror, !opts.no_tls),
        )?;
        crate::say!("wrote {} (cluster on {ip})", conf.display());
    }
    // Certificates first: loading the config below picks this process's TLS identity.
    let plain = Config::load(&conf)?;
    if plain.tls_enabled && plain.tls_dir == layout.state.join("tls") {
        crate::ca::ensure_local(&layout.state)?;
    }
    let cfg = crate::load_config(&conf)?;
    let conf_ip = host_of(&cfg.peers[0].rpc_addr).to_string();
    if let Some(ip) = ip {
        if ip != conf_ip {
            return Err(CliError::Usage(format!(
                "{} was made for a cluster on {conf_ip}, not {ip}; run with --ip {conf_ip}, or use another --dir \
                 for a cluster on {ip}",
                conf.display()
            )));
        }
    }
    Ok((layout, cfg, conf_ip))
}

/// What `up` should do beyond starting the cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpOptions {
    /// A new state directory gets no table store and no mirror.
    pub no_mirror: bool,
    /// Start the metadata cluster in recovery mode and restore it from the
    /// table store (the state's metad data must have been dropped).
    pub recovery: bool,
    /// A new state directory gets no TLS (plaintext connections).
    pub no_tls: bool,
}

/// Switches an existing state to recovery mode: recovery on, mirror off.
fn enter_recovery(layout: &Layout) -> CliResult<Config> {
    let conf = layout.conf();
    let text = fs::read_to_string(&conf).map_err(|_| {
        CliError::Usage(format!(
            "{} does not exist: --recovery restores a cluster whose metadata was dropped (`jfs local down \
             --drop-metadata`); it needs that cluster's state directory, with its blockd data and table store",
            conf.display()
        ))
    })?;
    let cfg = crate::load_config(&conf)?;
    if cfg.dynamodb.endpoint.is_none() && !cfg.mirror_enabled && !cfg.recovery_mode {
        return Err(CliError::Usage(format!(
            "{} has no table store configured (the cluster ran with --no-mirror): there is nothing to restore from",
            conf.display()
        )));
    }
    for p in &cfg.peers {
        let d = layout.state.join(format!("metad{}", p.id));
        if fs::read_dir(&d).is_ok_and(|mut e| e.next().is_some()) && !cfg.recovery_mode {
            return Err(CliError::Usage(format!(
                "{} still holds metadata: --recovery starts a new, empty metadata cluster. Drop the old one first \
                 with `jfs local down --drop-metadata --dir {}`",
                d.display(),
                layout.state.display()
            )));
        }
    }
    let text = set_config_key(&text, RECOVERY_KEY, "true");
    let text = set_config_key(&text, MIRROR_KEY, "false");
    write_atomic(&conf, &text)?;
    crate::load_config(&conf)
}

pub async fn up(dir: &Path, ip: Option<&str>, mountpoint: &Path, opts: UpOptions) -> CliResult<()> {
    let started_at = Instant::now();
    let (layout, mut cfg, ip) = prepare_state(dir, ip, opts)?;
    if opts.recovery {
        cfg = enter_recovery(&layout)?;
    }
    // Resolve binaries before starting anything, so a missing one stops us cleanly.
    for b in ["jfs-metad", "jfs-blockd", "jfs-mountd"] {
        find_binary(b)?;
    }

    let daemons = layout.daemons(&cfg, &ip);
    if daemons.iter().any(|d| d.binary == TABLESTORE_BINARY) && find_binary(TABLESTORE_BINARY).is_err() {
        return Err(CliError::Failed(format!(
            "the table store server `{TABLESTORE_BINARY}` is not installed (bash scripts/install-deps.sh installs \
             it); or start without the mirror: `jfs local up --no-mirror` on a new --dir"
        )));
    }
    let mut children: Vec<(String, Child)> = Vec::new();
    for d in &daemons {
        match running_pid(&layout, d) {
            Some(pid) => {
                // Re-record the pid in case the file was lost.
                write_atomic(&layout.pid_file(&d.name), &format!("{pid}\n"))?;
                crate::say!("{:<8} already running (pid {pid})", d.name);
            }
            None => {
                let child = spawn(&layout, d)?;
                crate::say!(
                    "{:<8} started (pid {}, log {})",
                    d.name,
                    child.id(),
                    layout.log(&d.name).display()
                );
                children.push((d.name.clone(), child));
            }
        }
    }

    if cfg.recovery_mode {
        wait_restored(&layout, &cfg).await?;
    }
    wait_ready(&layout, &cfg, &daemons, &mut children).await?;
    // Our children keep running after we exit; dropping a Child neither kills nor waits.
    drop(children);

    match admin::ensure_namespace(&cfg, NAMESPACE).await? {
        true => crate::say!("namespace {NAMESPACE:?} created"),
        false => crate::say!("namespace {NAMESPACE:?} exists"),
    }

    let mp = ensure_mounted(&layout, mountpoint, &ip).await?;
    let mut mounts = read_mounts(&layout);
    if !mounts.contains(&mp) {
        mounts.push(mp.clone());
        write_mounts(&layout, &mounts)?;
    }
    crate::say!(
        "ready in {:.1}s: jfs://{NAMESPACE}/ is mounted at {}\n  status: jfs metastatus --dir {}\n  logs:   {}\n  stop:   jfs local down --dir {}",
        started_at.elapsed().as_secs_f64(),
        mp.display(),
        layout.state.display(),
        layout.logs().display(),
        layout.state.display()
    );
    Ok(())
}

/// Waits until a metad leader exists and has heard from every blockd of the
/// local cluster, and every daemon started by this run answers on its address
/// (so a node brought back is really back when we say so). All blockds, not
/// one: a file written before the others heartbeat would get fewer copies
/// than the namespace asks for, and stay short until the healer catches up.
async fn wait_ready(
    layout: &Layout,
    cfg: &Config,
    daemons: &[Daemon],
    children: &mut [(String, Child)],
) -> CliResult<()> {
    let blockds = daemons.iter().filter(|d| d.binary == "jfs-blockd").count() as u32;
    crate::say!("waiting for a metad leader and heartbeats from {blockds} blockd(s)...");
    let deadline = Instant::now() + READY_DEADLINE;
    let probe_timeout = Duration::from_secs(1);
    let mut leader_seen: Option<String> = None;
    // Started daemons not yet seen answering.
    let mut pending: Vec<&Daemon> = daemons
        .iter()
        .filter(|d| children.iter().any(|(n, _)| *n == d.name))
        .collect();
    loop {
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(CliError::Failed(format!(
                    "{name} exited right after start ({status}); read {} for why (a port already in use by \
                     another cluster is a common cause){}",
                    layout.log(name).display(),
                    log_tail(&layout.log(name))
                )));
            }
        }
        let mut still = Vec::new();
        for d in pending {
            let up = if d.binary == "jfs-metad" {
                metastatus::probe(&d.addr, probe_timeout).await.is_ok()
            } else {
                matches!(
                    tokio::time::timeout(probe_timeout, tokio::net::TcpStream::connect(&d.addr)).await,
                    Ok(Ok(_))
                )
            };
            if !up {
                still.push(d);
            }
        }
        pending = still;
        let mut ready = None;
        for peer in &cfg.peers {
            let Ok(st) = metastatus::probe(&peer.rpc_addr, probe_timeout).await else {
                continue;
            };
            if st.role == "leader" {
                leader_seen = Some(format!("metad{} ({})", peer.id, peer.rpc_addr));
                if st.live_blockds >= blockds {
                    ready = Some((peer, st));
                }
                break;
            }
        }
        if let (Some((peer, st)), true) = (&ready, pending.is_empty()) {
            crate::say!(
                "metad leader: node {} ({}), term {}; {} blockd(s) live",
                peer.id,
                peer.rpc_addr,
                st.term,
                st.live_blockds
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = match (&leader_seen, &ready, pending.first()) {
                (None, _, _) => format!(
                    "no metad leader was elected; read {} (and metad2, metad3) for why",
                    layout.log("metad1").display()
                ),
                (Some(l), None, _) => format!(
                    "{l} is leader but has not heard from all {blockds} blockds; read {} (and blockd2, blockd3) \
                     for why",
                    layout.log("blockd1").display()
                ),
                (Some(_), Some(_), Some(d)) => format!(
                    "{} was started but does not answer on {}; read {}",
                    d.name,
                    d.addr,
                    layout.log(&d.name).display()
                ),
                (Some(_), Some(_), None) => "the cluster did not settle".to_string(),
            };
            return Err(CliError::Failed(format!(
                "cluster not ready after {}s: {why}",
                READY_DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the leader reports the restore FINISHed, printing progress.
async fn wait_restored(layout: &Layout, cfg: &Config) -> CliResult<()> {
    crate::say!("recovery mode: restoring the namespaces from the table store...");
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut last = String::new();
    let mut last_print = Instant::now();
    loop {
        let leader = metastatus::collect(cfg, false)
            .await
            .into_iter()
            .filter_map(|r| r.status.ok())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term);
        if let Some(l) = leader {
            let line = metastatus::recovery_text(&l);
            if l.recovery_state == "FINISH" || l.recovery_state == "LEFT" {
                crate::say!("restore finished: {} rows", l.recovery_restored);
                return Ok(());
            }
            if line != last && last_print.elapsed() >= Duration::from_secs(2) {
                crate::say!("  {line}");
                last = line;
                last_print = Instant::now();
            }
        }
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "the restore did not finish within an hour; read {} (the leader's log says why)",
                layout.log("metad1").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Mounts namespace `default` at `mountpoint` unless a live mount is there; returns the canonical path.
async fn ensure_mounted(layout: &Layout, mountpoint: &Path, ip: &str) -> CliResult<PathBuf> {
    // A dead FUSE mount makes canonicalize fail with ENOTCONN, so look it up by the absolute path first.
    let abs = std::path::absolute(mountpoint)
        .map_err(|e| io_err(format!("cannot resolve mountpoint {}", mountpoint.display()), e))?;
    if let Some(m) = mount_at(&abs) {
        if m.fstype.starts_with("fuse") && mount_is_dead(&abs) {
            crate::say!(
                "mount at {} is dead (its jfs-mountd is gone); unmounting it to mount again",
                abs.display()
            );
            unmount(&abs).map_err(CliError::Failed)?;
        }
    }
    fs::create_dir_all(&abs).map_err(|e| io_err(format!("cannot create mountpoint {}", abs.display()), e))?;
    let mp = fs::canonicalize(&abs).map_err(|e| io_err(format!("cannot resolve mountpoint {}", abs.display()), e))?;
    if let Some(m) = mount_at(&mp) {
        if m.fstype.starts_with("fuse") {
            crate::say!("{} is already mounted ({} from {})", mp.display(), m.fstype, m.source);
            return Ok(mp);
        }
        return Err(CliError::Failed(format!(
            "{} already has a {} mount of {} on it; unmount it or choose another mountpoint",
            mp.display(),
            m.fstype,
            m.source
        )));
    }

    let mountd = find_binary("jfs-mountd")?;
    let log_path = layout.log("mountd");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_err(format!("cannot open log {}", log_path.display()), e))?;
    let conf = layout.conf();
    // A second mount of this cluster finds the port taken and runs without
    // metrics (it logs why); the first one is the one scraped.
    let mount_opts = format!("allow_other,metrics={ip}:{MOUNT_METRICS_PORT}");
    let mut log_for_marker = &log;
    let _ = writeln!(
        log_for_marker,
        "==== {} jfs local up: {} --conf {} -o {mount_opts} {NAMESPACE} {}",
        now_utc(),
        mountd.display(),
        conf.display(),
        mp.display()
    );
    let out = log
        .try_clone()
        .map_err(|e| io_err("cannot duplicate log file handle", e))?;
    let mut cmd = tokio::process::Command::new(&mountd);
    cmd.arg("--conf")
        .arg(&conf)
        .args(["-o", &mount_opts, NAMESPACE])
        .arg(&mp)
        .current_dir(&layout.state)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .map_err(|e| io_err(format!("cannot start {}", mountd.display()), e))?;
    let status = match tokio::time::timeout(MOUNT_DEADLINE, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(io_err("waiting for jfs-mountd", e)),
        Err(_) => {
            return Err(CliError::Failed(format!(
                "jfs-mountd did not report the mount of {} within {}s; read {}",
                mp.display(),
                MOUNT_DEADLINE.as_secs(),
                log_path.display()
            )))
        }
    };
    if !status.success() {
        return Err(CliError::Failed(format!(
            "jfs-mountd failed to mount {} ({status}); read {}{}",
            mp.display(),
            log_path.display(),
            log_tail(&log_path)
        )));
    }
    // jfs-mountd returns once the mount is live; allow the kernel's table a moment to show it anyway.
    let seen_deadline = Instant::now() + Duration::from_secs(5);
    while mount_at(&mp).is_none() && Instant::now() < seen_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if mount_at(&mp).is_none() {
        return Err(CliError::Failed(format!(
            "jfs-mountd exited successfully but {} is not mounted; read {}",
            mp.display(),
            log_path.display()
        )));
    }
    crate::say!(
        "mounted jfs://{NAMESPACE}/ at {} (log {})",
        mp.display(),
        log_path.display()
    );
    Ok(mp)
}

/// The last few lines of a log, indented, to show the likely cause in place.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        return String::new();
    }
    let mut out = String::from("; its last lines:");
    for l in tail {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}

// ---------------------------------------------------------------- down

pub async fn down(dir: &Path, drop_metadata: bool) -> CliResult<()> {
    if !dir.exists() {
        crate::say!("{} does not exist: nothing to stop", dir.display());
        return Ok(());
    }
    let state = fs::canonicalize(dir).map_err(|e| io_err(format!("cannot resolve {}", dir.display()), e))?;
    let layout = Layout { state };
    let mut failures = Vec::new();

    // Unmount first, so mountd flushes while metad and blockd still serve.
    let mut remaining = Vec::new();
    for mp in read_mounts(&layout) {
        if mount_at(&mp).is_none() {
            crate::say!("{} is not mounted", mp.display());
            continue;
        }
        match unmount(&mp) {
            Ok(what) => crate::say!("{}: {what}", mp.display()),
            Err(e) => {
                failures.push(e);
                remaining.push(mp);
            }
        }
    }
    write_mounts(&layout, &remaining)?;

    // Without a readable config we still know the daemon names from the pid files.
    let daemons = match Config::load(&layout.conf()) {
        Ok(cfg) if !cfg.peers.is_empty() => {
            let ip = host_of(&cfg.peers[0].rpc_addr).to_string();
            layout.daemons(&cfg, &ip)
        }
        _ => Vec::new(),
    };
    let mut stopping: Vec<(&Daemon, i32)> = Vec::new();
    // Blockds first: they only heartbeat to metad, nothing waits on them.
    for d in daemons.iter().rev() {
        match running_pid(&layout, d) {
            Some(pid) => {
                // SAFETY: kill has no memory effects; pid was checked to run this daemon.
                if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
                    stopping.push((d, pid));
                } else {
                    failures.push(format!(
                        "cannot signal {} (pid {pid}): {}",
                        d.name,
                        std::io::Error::last_os_error()
                    ));
                }
            }
            None => crate::say!("{:<8} not running", d.name),
        }
    }
    let deadline = Instant::now() + STOP_DEADLINE;
    while stopping.iter().any(|(_, pid)| pid_alive(*pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (d, pid) in &stopping {
        if pid_alive(*pid) {
            // SAFETY: as above.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
            crate::say!(
                "{:<8} killed (pid {pid}; it ignored SIGTERM for {}s)",
                d.name,
                STOP_DEADLINE.as_secs()
            );
        } else {
            crate::say!("{:<8} stopped (pid {pid})", d.name);
        }
    }
    let kill_deadline = Instant::now() + Duration::from_secs(5);
    while stopping.iter().any(|(_, pid)| pid_alive(*pid)) && Instant::now() < kill_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (d, pid) in &stopping {
        if pid_alive(*pid) {
            failures.push(format!("{} (pid {pid}) is still alive after SIGKILL", d.name));
        }
    }
    if let Ok(entries) = fs::read_dir(layout.run()) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if drop_metadata {
        if !failures.is_empty() {
            failures.push("metadata not dropped: not everything stopped".into());
        } else {
            for d in daemons.iter().filter(|d| d.binary == "jfs-metad") {
                match fs::remove_dir_all(&d.data_dir) {
                    Ok(()) => crate::say!("{}: metadata dropped", d.data_dir.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => failures.push(format!("cannot remove {}: {e}", d.data_dir.display())),
                }
            }
            crate::say!(
                "the blockd data and the table store are kept: `jfs local up --recovery MOUNTPOINT --dir {}` \
                 restores the metadata from the table store",
                layout.state.display()
            );
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(failures.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_contract() {
        assert_eq!(
            [metad_rpc_port(1), metad_rpc_port(2), metad_rpc_port(3)],
            [8101, 8111, 8121]
        );
        assert_eq!(
            [metad_raft_port(1), metad_raft_port(2), metad_raft_port(3)],
            [8103, 8113, 8123]
        );
        assert_eq!([blockd_port(1), blockd_port(2), blockd_port(3)], [8201, 8211, 8221]);
    }

    #[test]
    fn generated_config_parses() {
        let text = local_config_text(Path::new("/tmp/state dir"), "127.0.7.1", true, true);
        let cfg = Config::from_toml_str(&text, Path::new("jfs.toml")).unwrap();
        assert_eq!(cfg.peers.len(), 3);
        assert_eq!(cfg.peers[2].raft_addr, "127.0.7.1:8123");
        assert!(cfg.tls_enabled);
        assert_eq!(cfg.tls_dir, Path::new("/tmp/state dir/tls"));
        assert_eq!(cfg.peers[1].rpc_addr, "127.0.7.1:8111");
        assert_eq!(cfg.replication, 3);
        assert_eq!(cfg.block_gc_grace, std::time::Duration::from_secs(10));
        assert_eq!(cfg.metad_data_dir, Path::new("/tmp/state dir/metad"));
        assert!(cfg.mirror_enabled && !cfg.recovery_mode);
        assert_eq!(cfg.dynamodb.endpoint.as_deref(), Some("http://127.0.7.1:8301"));
        let text = set_config_key(&text, RECOVERY_KEY, "true");
        let text = set_config_key(&text, MIRROR_KEY, "false");
        let cfg = Config::from_toml_str(&text, Path::new("jfs.toml")).unwrap();
        assert!(!cfg.mirror_enabled && cfg.recovery_mode);
        let plain = local_config_text(Path::new("/s"), "127.0.0.1", false, false);
        let cfg = Config::from_toml_str(&plain, Path::new("jfs.toml")).unwrap();
        assert!(!cfg.mirror_enabled && cfg.dynamodb.endpoint.is_none());
    }

    #[test]
    fn cmdline_check_rejects_other_processes() {
        let d = Daemon {
            name: "x".into(),
            binary: "jfs-metad",
            args: vec!["--conf".into()],
            addr: "127.0.0.1:1".into(),
            data_dir: "/x".into(),
        };
        // Our own process is `jfs-...` test binary, never jfs-metad.
        assert!(!runs(std::process::id() as i32, &d));
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(i32::MAX));
    }
}
