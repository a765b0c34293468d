//! jfs-blockd: the storage daemon. Stores file data as immutable, checksummed blocks under its
//! data directory, serves them over the `Block` gRPC service, and heartbeats to the metad leader.
//!
//! Start-up order: flags, config (a bad one exits with code 2), an exclusive lock on the data
//! directory, the block store (cleaning debris of a crash), the durable identity, then the
//! listener. Beside the service run the heartbeat (which also carries out metad's commands) and
//! the scrubber. It serves until SIGTERM or SIGINT.

mod block_store;
mod heartbeat;
mod replicate;
mod report;
mod scrub;
mod service;

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use jfs_common::config::{Config, DEFAULT_CONFIG_PATH};
use tokio::sync::watch;
use tracing::{error, info, warn};

use block_store::BlockStore;
use heartbeat::{GrpcCaller, Heartbeat, LeaderFinder, NodeState};
use jfs_common::telemetry::Kind;
use replicate::Replicator;
use report::Report;
use scrub::Scrubber;
use service::BlockService;

/// How long in-flight requests may run after SIGTERM before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "jfs-blockd",
    version,
    about = "jfs storage daemon: checksummed blocks on local disk"
)]
struct Args {
    /// Configuration file.
    #[arg(long = "conf", value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    conf: PathBuf,
    /// Data directory (default: blockd.data-dir from the config).
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to serve on; also the address advertised to metad, so it must be reachable by clients.
    #[arg(long = "listen", value_name = "HOST:PORT")]
    listen: String,
    /// Serve Prometheus metrics at http://ADDR/metrics ("" = off)
    /// [default: blockd.metrics-address, 0.0.0.0:9420].
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// A start-up failure: the message for the operator and the exit code.
struct Fatal(String, u8);

fn main() -> ExitCode {
    jfs_common::manpage::exit_if_requested(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal(msg, code)) => {
            // Plain stderr rather than a log event: it must show even with RUST_LOG=off.
            eprintln!("jfs-blockd: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Takes the data directory's lock for the life of the process (released by the kernel on exit).
fn lock_data_dir(dir: &Path) -> Result<File, Fatal> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Fatal(format!("cannot open lock file {}: {e}", path.display()), 1))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Fatal(
                format!(
                    "data directory {} is in use by another jfs-blockd (it holds {}); stop that one or give this one \
                     another --data-dir",
                    dir.display(),
                    path.display()
                ),
                1,
            )
        } else {
            Fatal(format!("cannot lock {}: {e}", path.display()), 1)
        });
    }
    Ok(f)
}

fn run(args: Args) -> Result<(), Fatal> {
    let cfg = Config::load(&args.conf).map_err(|e| Fatal(e.to_string(), 2))?;
    let tls_role = jfs_common::tls::Role::Blockd;
    jfs_common::tls::init_client(&cfg, tls_role).map_err(|e| Fatal(e.to_string(), 2))?;
    // Loaded now, before anything starts, so a bad certificate stops the start.
    let server_tls = jfs_common::tls::server_for(&cfg, tls_role).map_err(|e| Fatal(e.to_string(), 2))?;
    if cfg.rpc_addresses.is_empty() {
        return Err(Fatal(
            format!(
                "config file {}: `jfs.namespace.server.rpc-address` is not set; blockd needs it to find metad",
                args.conf.display()
            ),
            2,
        ));
    }
    if args
        .listen
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(Fatal(format!("--listen {:?} is not HOST:PORT", args.listen), 2));
    }
    if args.listen.starts_with("0.0.0.0:") || args.listen.starts_with("[::]:") {
        warn!(
            listen = %args.listen,
            "the listen address is also the address metad gives to clients; a wildcard address is not reachable \
             from other hosts — use this host's own address"
        );
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| cfg.blockd_data_dir.clone());
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| Fatal(format!("cannot create data directory {}: {e}", data_dir.display()), 1))?;
    let _lock = lock_data_dir(&data_dir)?;
    let store = Arc::new(
        BlockStore::open(&data_dir)
            .map_err(|e| Fatal(format!("cannot open block store in {}: {e}", data_dir.display()), 1))?,
    );
    let state = NodeState::load(&data_dir).map_err(|e| Fatal(e.to_string(), 1))?;
    info!(
        blockd_id = %state.blockd_id,
        cluster_id = state.cluster_id.as_deref().unwrap_or("(not joined yet)"),
        data_dir = %data_dir.display(),
        "starting jfs-blockd"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockd")
        .build()
        .map_err(|e| Fatal(format!("cannot start the async runtime: {e}"), 1))?;
    let metrics_addr = args
        .metrics_listen
        .unwrap_or_else(|| cfg.blockd_metrics_address.clone());
    rt.block_on(async {
        if jfs_common::telemetry::start(&metrics_addr, "blockd").is_some() {
            jfs_common::telemetry::describe(METRICS);
        }
        serve(args.listen, cfg, server_tls, store, state).await
    })
}

/// This daemon's own series (the gRPC ones come from the common layer).
const METRICS: &[(&str, Kind, &str)] = &[
    (
        "jfs_blockd_capacity_bytes",
        Kind::Gauge,
        "size of the filesystem holding the data directory",
    ),
    (
        "jfs_blockd_free_bytes",
        Kind::Gauge,
        "space left for blocks on that filesystem",
    ),
    ("jfs_blockd_used_bytes", Kind::Gauge, "capacity minus free space"),
    ("jfs_blockd_blocks", Kind::Gauge, "blocks stored here"),
    (
        "jfs_blockd_blocks_written_total",
        Kind::Counter,
        "blocks written and fsynced",
    ),
    (
        "jfs_blockd_disk_written_bytes_total",
        Kind::Counter,
        "bytes of block data written to disk",
    ),
    (
        "jfs_blockd_block_reads_total",
        Kind::Counter,
        "block reads served from disk",
    ),
    (
        "jfs_blockd_disk_read_bytes_total",
        Kind::Counter,
        "bytes of block data read from disk",
    ),
    (
        "jfs_blockd_checksum_failures_total",
        Kind::Counter,
        "stored data that failed its CRC32C (read or scrub); the replica is reported and replaced",
    ),
    (
        "jfs_blockd_blocks_deleted_total",
        Kind::Counter,
        "unreferenced blocks deleted after their grace period",
    ),
];

async fn serve(
    listen: String,
    cfg: Config,
    server_tls: Option<jfs_common::tls::ServerTls>,
    store: Arc<BlockStore>,
    state: NodeState,
) -> Result<(), Fatal> {
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
        Fatal(
            format!("cannot listen on {listen}: {e} (is another process using the port, or is the address not on this host?)"),
            1,
        )
    })?;
    info!(listen = %listen, "serving Block service");
    // The port is bound, so connections from here on are served. For
    // systemd units of Type=notify; nothing happens without NOTIFY_SOCKET.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!("cannot tell systemd that jfs-blockd is ready: {e}");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    // Shared by everything that finds changes metad must hear about; the heartbeat carries them.
    let report = Report::default();
    let replicator = Replicator::new(
        Arc::clone(&store),
        report.clone(),
        listen.clone(),
        cfg.replication_inflight as usize,
        cfg.client_timeout,
    );
    let hb = Heartbeat::new(
        Arc::clone(&store),
        state,
        listen.clone(),
        cfg.blockd_heartbeat,
        LeaderFinder::new(cfg.rpc_addresses.clone(), GrpcCaller::default()),
        report.clone(),
        replicator,
    );
    let hb_task = tokio::spawn(hb.run(stop_rx.clone()));
    let scrubber = Scrubber::new(Arc::clone(&store), report.clone(), cfg.scrub_rate, cfg.scrub_interval);
    let scrub_task = tokio::spawn(scrubber.run(stop_rx.clone()));

    let signal_tx = stop_tx.clone();
    let shutdown = async move {
        wait_for_signal().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = signal_tx.send(true);
    };
    let mut grace_rx = stop_rx;
    let grace = async move {
        let _ = grace_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let svc = BlockService::new(store, cfg.client_timeout, report);
    let result = tokio::select! {
        r = service::serve(listener, server_tls, svc, shutdown) => r,
        _ = grace => {
            warn!("requests still running {SHUTDOWN_GRACE:?} after the stop signal; exiting anyway");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let _ = hb_task.await;
    let _ = scrub_task.await;
    match result {
        Ok(()) => {
            info!("jfs-blockd stopped");
            Ok(())
        }
        Err(e) => Err(Fatal(format!("the Block service failed: {e}"), 1)),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!("cannot install signal handlers ({e}); stop jfs-blockd with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = int.recv() => info!("SIGINT received, shutting down"),
    }
}
