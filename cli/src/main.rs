//! `jfs`, the operator's command-line tool.
//!
//! This file holds the command-line grammar (clap derive), the error type
//! every subcommand returns, and the mapping from errors to exit codes:
//! 0 success, 1 the operation failed (or, for `admin node health`, the node
//! is not healthy), 2 the command line or the config file is wrong. The work itself lives in one module per command family.

mod admin;
mod bench;
mod ca;
mod completions;
mod fs_cmd;
mod fsck;
mod local_cluster;
mod membership;
mod metastatus;
mod node_metrics;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use jfs_common::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use jfs_common::FsError;

/// println! that does not panic when stdout is gone (`jfs local up | head`):
/// the work must go on, and its progress text is only a report.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// State directory of the local development cluster when `--dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jfs/local";

#[derive(Parser, Debug)]
#[command(
    name = "jfs",
    version,
    about = "Operate a jfs cluster: start a local dev cluster, check metad health, manage namespaces, \
             and read or write files without a mount.",
    after_help = "Exit status: 0 success, 1 the operation failed, 2 bad command line or config file.\n\
                  Set RUST_LOG=debug to see what jfs is doing."
)]
struct Cli {
    /// Cluster config file. Default: /etc/jfs/jfs.toml if it exists, else the local dev cluster's
    /// /var/lib/jfs/local/jfs.toml.
    #[arg(long, global = true, value_name = "PATH")]
    conf: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a whole cluster (3 metad, 3 blockd) on this machine, for development and trials.
    #[command(subcommand)]
    Local(LocalCommand),

    /// Show every metad node's role, term and log position. Exits 1 when no leader is visible.
    ///
    /// Asks the nodes of the config file, and any other member they name (nodes added later),
    /// each directly, so a sick node shows as it is. Reasons for unreachable nodes go to stderr.
    Metastatus(MetastatusArgs),

    /// Cluster administration: namespaces, blockds, metad nodes, leadership.
    #[command(subcommand)]
    Admin(AdminCommand),

    /// Read and write files of a namespace without mounting it (URIs look like jfs://default/dir/file).
    #[command(subcommand)]
    Fs(FsCommand),

    /// List blocks that are missing or have fewer copies than their namespace asks for.
    /// Exits 1 when there are any.
    Fsck {
        /// Check only this tree (jfs://NAMESPACE/PATH) and name the files; default: every block of
        /// every namespace.
        #[arg(value_name = "URI")]
        uri: Option<String>,
    },

    /// Measure the cluster: metadata operations over RPC, without a mount.
    #[command(subcommand)]
    Bench(BenchCommand),

    /// Print the shell completion script for jfs (bash, zsh or fish) to standard output.
    ///
    /// bash: `source <(jfs completions bash)` in ~/.bashrc, or save the script as
    /// /usr/share/bash-completion/completions/jfs. zsh: save it as _jfs in a directory of $fpath.
    /// fish: save it as ~/.config/fish/completions/jfs.fish.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: completions::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Create, stat and unlink empty files over RPC with 1 or more concurrent clients, and print
    /// the floor one synchronous client cannot beat (one round trip + one fsync).
    ///
    /// Each client is a separate session with its own connections, like separate mounts. The
    /// files go into a new directory under the namespace root, removed at the end. Run it against
    /// a quiet cluster: it adds its own load.
    Meta {
        /// Namespace to work in.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Concurrent clients; a comma-separated list runs the benchmark once per value.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        clients: Vec<usize>,
        /// Files per run (shared among the clients).
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        /// Directory on the disk that holds metad's data, for the fsync part of the floor.
        #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
        fsync_dir: PathBuf,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum LocalCommand {
    /// Start (or restart whatever is not running of) the local cluster and mount namespace `default`.
    ///
    /// Safe to run again at any time: daemons that are running are left alone, dead ones are
    /// started again, and the mount is made only if it is not there already.
    Up {
        /// State directory: config (jfs.toml), data, logs/, run/ (pid files).
        #[arg(long, value_name = "STATE", default_value = DEFAULT_STATE_DIR)]
        dir: PathBuf,
        /// Loopback address every daemon listens on. Default 127.0.0.1, or the address the state
        /// directory was created with. Give each cluster on one machine its own (e.g. 127.0.5.1).
        #[arg(long, value_name = "IP")]
        ip: Option<String>,
        /// Where to mount namespace `default` (created if missing).
        #[arg(value_name = "MOUNTPOINT")]
        mountpoint: PathBuf,
        /// For a new state directory: no table store and no metadata mirror.
        #[arg(long)]
        no_mirror: bool,
        /// Start a new metadata cluster in recovery mode on this state's table store and blockd
        /// data (after `jfs local down --drop-metadata`): restore every namespace, wait for
        /// FINISH, mount read-only. Leave recovery mode with `jfs admin recovery finish`.
        #[arg(long)]
        recovery: bool,
        /// For a new state directory: plaintext connections instead of mutual TLS (the default
        /// makes a CA in STATE/ca and certificates in STATE/tls).
        #[arg(long)]
        no_tls: bool,
    },
    /// Unmount the local cluster's mounts and stop its daemons. Safe to run again.
    Down {
        /// State directory given to `jfs local up`.
        #[arg(long, value_name = "STATE", default_value = DEFAULT_STATE_DIR)]
        dir: PathBuf,
        /// Also delete every metad data directory (a lost metadata cluster), keeping the blockd
        /// data and the table store, so `jfs local up --recovery` can restore from it.
        #[arg(long)]
        drop_metadata: bool,
    },
}

#[derive(Args, Debug)]
struct MetastatusArgs {
    /// Also show commit index, last log index, last contact (leader: ms since a quorum
    /// acknowledged it; follower: ms since it heard from the leader; `-` unknown), leader,
    /// voters/learners, cluster id, live blockds.
    #[arg(long, short = 'd', alias = "details")]
    detail: bool,
    /// Also ask each node for a digest of its state machine, shown as DIGEST@INDEX. Replicas
    /// at the same index must show the same digest; a different one means a diverged replica.
    /// Reads each node's whole state: for checks, not for routine polling.
    #[arg(long)]
    digest: bool,
    /// Also read each node's Prometheus endpoint (its address comes from the node) and show
    /// metadata requests served, failed, mean and 99th-percentile latency, and the sizes of
    /// the Raft log, the snapshot and the namespace database.
    #[arg(long)]
    metrics: bool,
    /// Use the local dev cluster in this state directory (reads STATE/jfs.toml).
    #[arg(long, value_name = "STATE")]
    dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create a namespace (a separate file tree, addressed as jfs://NAME/).
    CreateNamespace {
        /// Namespace name: letters, digits, '-', '_' and '.'.
        #[arg(value_name = "NAME")]
        name: String,
        /// Block size in bytes, a multiple of 65536 (default: namespace.block-size from the config).
        #[arg(long, value_name = "BYTES")]
        block_size: Option<u64>,
        /// Copies of each block (default: namespace.replication from the config).
        #[arg(long, value_name = "N")]
        replication: Option<u32>,
        /// Succeed without changes when the namespace already exists.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// List namespaces with their block size and replication.
    ListNamespaces,
    /// Namespaces: replication, access grants.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Storage daemons: list, decommission, remove.
    #[command(subcommand)]
    Blockd(BlockdCommand),
    /// Metadata (Raft) nodes: add, remove, replace, inspect, health-check.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Hand metad leadership to another node, e.g. before restarting or servicing the leader.
    ///
    /// The target must be a voter that holds every log entry (`jfs admin node health ID` says
    /// so). Clients pause for about a second while leadership moves and then continue; nothing
    /// is lost. If the handover fails, the current leader keeps leading and the error says why.
    Failover {
        /// Id of the metad node that should lead (see `jfs metastatus`).
        #[arg(long, value_name = "ID")]
        to: u64,
    },
    /// Recovery mode (a cluster restored from the table-store mirror): wait for the restore, end it.
    #[command(subcommand)]
    Recovery(RecoveryCommand),
    /// The table-store mirror: check the tables against the namespace.
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// The cluster certificate authority (mutual TLS): create it.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates for daemons, mounts and operators, signed by the cluster CA.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create the cluster's CA: DIR/ca.key (mode 600; whoever holds it can join any node to the
    /// cluster, so keep it off the cluster's hosts if you can) and DIR/ca.crt. Refuses to
    /// replace an existing CA without --force, as that would invalidate every certificate.
    Init {
        /// Where to put ca.key and ca.crt (created with mode 700).
        #[arg(long, value_name = "DIR", default_value = "/etc/jfs/ca")]
        dir: PathBuf,
        /// The CA's common name, shown by `openssl x509 -text`.
        #[arg(long, value_name = "NAME", default_value = "jfs cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, value_name = "DAYS", default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops being accepted).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Issue a key and certificate for one role. Writes OUT/ROLE.key (mode 600), OUT/ROLE.crt
    /// and OUT/ca.crt: copy OUT to the host's security.tls.dir. Overwriting the files of a
    /// running daemon or mount rotates its certificate within a second, without a restart.
    Issue {
        /// What the holder may do: metad (Raft), blockd (storage), client (mounts: file
        /// operations), admin (the jfs CLI: also cluster administration).
        #[arg(long, value_name = "ROLE", value_parser = ["metad", "blockd", "client", "admin"], hide_possible_values = true)]
        role: String,
        /// Who holds it (host or user name); namespace grants refer to client names.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The CA directory (`jfs admin ca init --dir`).
        #[arg(long, value_name = "DIR", default_value = "/etc/jfs/ca")]
        ca_dir: PathBuf,
        /// Where to write the files.
        #[arg(long, value_name = "OUT", default_value = "/etc/jfs/tls")]
        out: PathBuf,
        /// Validity in days (0 issues an already-expired certificate, for testing refusal).
        #[arg(long, value_name = "DAYS", default_value_t = 365)]
        days: u32,
        /// Extra subject-alternative names (host names or IP addresses), for other tools;
        /// jfs itself checks the role, not the address.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum MirrorCommand {
    /// Compare every row of the mirror tables with the leader's namespace. Needs a few quiet
    /// seconds (no writes); exits 1 when any row is missing, extra or different.
    Verify,
}

#[derive(Subcommand, Debug)]
enum RecoveryCommand {
    /// Show the restore's progress (a progress bar on a terminal) until the leader reports
    /// FINISH. Exits 0 at FINISH, 1 if the cluster is not in recovery mode or --timeout passes.
    Wait {
        /// Give up after this many seconds (default: wait as long as it takes).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// End recovery mode without a restart: namespaces become writable, and the mirror (if
    /// enabled) resumes into the same tables. Refused while the restore is still running.
    ///
    /// Then set namespace.backend.raft.recovery.mode = false in the config (a node started with
    /// it still true only logs a warning: a cluster that left recovery mode never restores again).
    Finish,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Add a metad node: it joins as a learner, copies the data, then becomes a voter
    ///
    /// The new node must already be running, started with an empty data directory, a new id,
    /// and --join pointing at any current member:
    ///
    ///     jfs-metad --node-id ID --rpc-address HOST:PORT --raft-address HOST:PORT --join MEMBER-HOST:PORT
    ///
    /// Ids are never reused: an id that was ever a member (even one removed or wiped since)
    /// is refused, because its old votes could be counted twice. Take a new id, e.g. one above
    /// the highest in `jfs metastatus --detail`.
    ///
    /// Waits until the node is a voter (a big namespace is copied as a snapshot, which can take
    /// minutes), then prints the voters and learners. Safe to run again, also after a timeout.
    /// Next: `jfs admin node health ID`.
    #[command(verbatim_doc_comment)]
    Add {
        /// Id of the new node, as given to its --node-id.
        #[arg(value_name = "ID")]
        id: u64,
        /// The new node's client address (its --rpc-address), HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        rpc_address: String,
        /// The new node's Raft address (its --raft-address), HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        raft_address: String,
    },
    /// Remove a metad node (voter or learner) from the cluster.
    ///
    /// Use it for a node that is gone for good (dead disk, wiped data directory) or being
    /// retired; then stop its jfs-metad if it still runs and never start that id again (start a
    /// replacement with a new id and `jfs admin node add` it, or use `jfs admin node replace`).
    /// Removing the leader moves leadership to another node (clients pause about a second).
    /// Removing a node that is not a member succeeds, so it is safe to repeat.
    ///
    /// Refused when the voters left would not have a majority that answers (the cluster would
    /// stop); bring the missing nodes back first, or pass --force if you know better.
    Remove {
        /// Id of the node to remove (see `jfs metastatus --detail`).
        #[arg(value_name = "ID")]
        id: u64,
        /// Remove even if the remaining voters do not seem to have an answering majority.
        #[arg(long)]
        force: bool,
    },
    /// Replace metad node OLD by a new node NEW: add NEW (as `add` does), then remove OLD
    ///
    /// NEW must already be running, started with an empty data directory and a new id:
    ///
    ///     jfs-metad --node-id NEW --rpc-address HOST:PORT --raft-address HOST:PORT --join MEMBER-HOST:PORT
    ///
    /// OLD keeps counting until NEW is a voter, so the cluster never has fewer voters than now.
    /// Each step is reported as it completes; if the command stops halfway, run it again
    /// (both steps are safe to repeat). Afterwards stop OLD's jfs-metad if it still runs.
    #[command(verbatim_doc_comment)]
    Replace {
        /// Id of the node to take out.
        #[arg(value_name = "OLD")]
        old: u64,
        /// Id of the new node, as given to its --node-id (never a previously used id).
        #[arg(long = "with", value_name = "NEW")]
        new: u64,
        /// NEW's client address (its --rpc-address), HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        rpc_address: String,
        /// NEW's Raft address (its --raft-address), HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        raft_address: String,
    },
    /// Show one metad node's own view: role, term, leader, commit/applied/last log index, last
    /// contact, voters and learners.
    ///
    /// The node is found among the config file's nodes and the members they name. Fails when
    /// no node with this id answers.
    State {
        /// Id of the node (see `jfs metastatus`).
        #[arg(value_name = "ID")]
        id: u64,
        /// Also compute the digest of the node's state machine (DIGEST@INDEX), to compare with
        /// other replicas at the same index. Reads the whole state: takes a while on big ones.
        #[arg(long)]
        digest: bool,
    },
    /// Exit 0 if the metad node is healthy, 1 if not, with one line saying why.
    ///
    /// Healthy: it answers within 2 s, it is a leader or follower (a learner is still catching
    /// up), it knows a leader, its applied index is within 1000 entries of the leader's commit
    /// index, and, for a follower, it heard from the leader less than 5 s ago. Suitable for
    /// monitoring and for checking a node after `add`, before `failover`, or after a restart.
    Health {
        /// Id of the node (see `jfs metastatus`).
        #[arg(value_name = "ID")]
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum NamespaceCommand {
    /// Change how many copies of each block a namespace keeps; existing blocks follow in the
    /// background.
    SetReplication {
        #[arg(value_name = "NAMESPACE")]
        name: String,
        #[arg(value_name = "N")]
        replication: u32,
    },
    /// Let the client certificate NAME (its --name at `jfs admin cert issue`) mount the
    /// namespace, read-write or with --read-only. `*` stands for every client; a new namespace
    /// grants `*` read-write. A name's own grant wins over `*`. Grants are enforced only with
    /// security.tls.enabled (without TLS nobody is authenticated); admin certificates are not
    /// limited by them. Mounts already up keep running; a revoked client's next call is refused.
    Grant {
        #[arg(value_name = "NAMESPACE")]
        name: String,
        #[arg(value_name = "CLIENT")]
        principal: String,
        /// Reads only: the client mounts read-only and every change fails with EROFS.
        #[arg(long)]
        read_only: bool,
    },
    /// Take back CLIENT's grant (`*`: the grant to every client). Clients left without a grant
    /// of their own or through `*` can no longer mount the namespace or use it.
    Revoke {
        #[arg(value_name = "NAMESPACE")]
        name: String,
        #[arg(value_name = "CLIENT")]
        principal: String,
    },
}

#[derive(Subcommand, Debug)]
enum BlockdCommand {
    /// Every blockd metad knows: id, address, state, capacity, use, blocks, last heartbeat.
    List,
    /// Drain a blockd: copy its blocks elsewhere and place nothing new on it. Stop it once
    /// `list` shows it decommissioned.
    Decommission {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Cancel a decommission: the blockd takes new blocks again.
    Recommission {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Forget a stopped blockd for good (its disk is gone). Its blocks are copied from the
    /// other replicas.
    Remove {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum FsCommand {
    /// Print DIR_COUNT FILE_COUNT CONTENT_SIZE PATHNAME of a tree (like `hadoop fs -count`).
    Count {
        /// Tree to count, e.g. jfs://default/ or jfs://default/some/dir
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Print how fragmented a file is: one line per chunk that holds data,
    /// CHUNK (index: offset / block size) and SLICES (the writes it is made
    /// of; background compaction keeps this small).
    Chunks {
        /// File to inspect, e.g. jfs://default/dir/file
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// List a directory (or show one file).
    Ls {
        /// Long format: mode, links, owner, group, size, modification time (UTC), name.
        #[arg(short = 'l')]
        long: bool,
        /// Directory or file, e.g. jfs://default/ or jfs://default/dir
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Write a file's content to standard output.
    Cat {
        /// File to print, e.g. jfs://default/dir/file
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Copy a local file into jfs. If URI is a directory, the file keeps its name inside it.
    Put {
        /// Overwrite the destination if it exists.
        #[arg(short = 'f', long)]
        force: bool,
        /// Local file to copy ('-' reads standard input).
        #[arg(value_name = "LOCAL")]
        local: PathBuf,
        /// Destination file or directory, e.g. jfs://default/dir/ (the parent directory must exist)
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Copy a jfs file to the local disk. If LOCAL is a directory, the file keeps its name inside it.
    Get {
        /// Overwrite the local file if it exists.
        #[arg(short = 'f', long)]
        force: bool,
        /// File to copy, e.g. jfs://default/dir/file
        #[arg(value_name = "URI")]
        uri: String,
        /// Local file or directory to write to
        #[arg(value_name = "LOCAL")]
        local: PathBuf,
    },
    /// Create a directory.
    Mkdir {
        /// Create missing parents too, and do not fail if the directory exists.
        #[arg(short = 'p', long)]
        parents: bool,
        /// Directory to create, e.g. jfs://default/a/b
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Remove a file, or a directory tree with -r.
    Rm {
        /// Remove directories and everything under them.
        #[arg(short = 'r', short_alias = 'R', long)]
        recursive: bool,
        /// File or directory to remove, e.g. jfs://default/old/file
        #[arg(value_name = "URI")]
        uri: String,
    },
}

/// Everything a subcommand can fail with, sorted by who has to act.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The config file is missing or wrong (exit 2).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// jfs answered with an error (exit 1), printed in the seed systems' format.
    #[error("{}", .0.cli_line())]
    Fs(#[from] FsError),
    /// A jfs error about one path: the standard line, then the path on its own line.
    #[error("{}\njfs: {}: {}", .0.cli_line(), .1, .0)]
    FsAt(FsError, String),
    /// Something else went wrong while doing the work (exit 1).
    #[error("{0}")]
    Failed(String),
    /// A health check found a problem (exit 1); the text is the one-line verdict, printed to
    /// stdout like a healthy one.
    #[error("{0}")]
    Unhealthy(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config(_) => 2,
            CliError::Fs(_) | CliError::FsAt(..) | CliError::Failed(_) | CliError::Unhealthy(_) => 1,
        }
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// Picks the config file: `--conf`, else /etc/jfs/jfs.toml if it exists, else the default local
/// cluster's. The error names every place looked at, so the operator knows what to create.
pub fn resolve_conf_path(conf: Option<&Path>) -> CliResult<PathBuf> {
    if let Some(p) = conf {
        return Ok(p.to_path_buf());
    }
    let candidates = [
        PathBuf::from(DEFAULT_CONFIG_PATH),
        Path::new(DEFAULT_STATE_DIR).join("jfs.toml"),
    ];
    for c in &candidates {
        if c.exists() {
            return Ok(c.clone());
        }
    }
    Err(CliError::Usage(format!(
        "no config file found (looked at {} and {}); pass --conf PATH, or start a local cluster with \
         `jfs local up MOUNTPOINT`",
        candidates[0].display(),
        candidates[1].display()
    )))
}

pub fn load_config(path: &Path) -> CliResult<Config> {
    let cfg = Config::load(path)?;
    // One identity per process, chosen with the first config it loads.
    jfs_common::tls::init_client(&cfg, ca::cli_role(&cfg.tls_dir)).map_err(|e| CliError::Failed(e.to_string()))?;
    if cfg.peers.is_empty() {
        return Err(CliError::Usage(format!(
            "config file {} lists no metad nodes; set namespace.backend.raft.initial-conf and \
             jfs.namespace.server.rpc-address",
            path.display()
        )));
    }
    Ok(cfg)
}

/// `metastatus` reads STATE/jfs.toml with `--dir`, else the usual config; both at once is ambiguous.
fn metastatus_conf_path(dir: Option<&Path>, conf: Option<&Path>) -> CliResult<PathBuf> {
    match (dir, conf) {
        (Some(_), Some(_)) => Err(CliError::Usage(
            "give either --conf PATH or --dir STATE (which means STATE/jfs.toml), not both".into(),
        )),
        (Some(dir), None) => Ok(dir.join("jfs.toml")),
        (None, c) => resolve_conf_path(c),
    }
}

async fn run(cli: Cli) -> CliResult<()> {
    let conf = cli.conf.as_deref();
    match cli.command {
        Command::Local(LocalCommand::Up {
            dir,
            ip,
            mountpoint,
            no_mirror,
            recovery,
            no_tls,
        }) => {
            if conf.is_some() {
                return Err(CliError::Usage(
                    "`jfs local up` writes and uses STATE/jfs.toml; drop --conf (choose the state with --dir)".into(),
                ));
            }
            let opts = local_cluster::UpOptions {
                no_mirror,
                recovery,
                no_tls,
            };
            local_cluster::up(&dir, ip.as_deref(), &mountpoint, opts).await
        }
        Command::Local(LocalCommand::Down { dir, drop_metadata }) => local_cluster::down(&dir, drop_metadata).await,
        Command::Metastatus(args) => {
            let path = metastatus_conf_path(args.dir.as_deref(), conf)?;
            let cfg = load_config(&path)?;
            metastatus::run(&cfg, args.detail, args.digest, args.metrics).await
        }
        // The CA commands work on files only: no config, no cluster.
        Command::Admin(AdminCommand::Ca(CaCommand::Init { dir, name, days, force })) => {
            ca::init(&dir, &name, days, force)?;
            println!("created the cluster CA in {} (keep ca.key private)", dir.display());
            Ok(())
        }
        Command::Admin(AdminCommand::Cert(CertCommand::Issue {
            role,
            name,
            ca_dir,
            out,
            days,
            san,
        })) => {
            let role = jfs_common::tls::Role::parse(&role)
                .ok_or_else(|| CliError::Usage(format!("--role {role:?}: use metad, blockd, client or admin")))?;
            ca::issue(&ca_dir, &out, role, &name, days, &san)?;
            println!(
                "issued a {role} certificate for {name:?}: {}/{role}.crt and {role}.key",
                out.display()
            );
            Ok(())
        }
        Command::Admin(cmd) => {
            let cfg = load_config(&resolve_conf_path(conf)?)?;
            match cmd {
                AdminCommand::CreateNamespace {
                    name,
                    block_size,
                    replication,
                    if_not_exists,
                } => admin::create_namespace(&cfg, &name, block_size, replication, if_not_exists).await,
                AdminCommand::ListNamespaces => admin::list_namespaces(&cfg).await,
                AdminCommand::Namespace(NamespaceCommand::SetReplication { name, replication }) => {
                    admin::set_replication(&cfg, &name, replication).await
                }
                AdminCommand::Namespace(NamespaceCommand::Grant {
                    name,
                    principal,
                    read_only,
                }) => admin::set_access(&cfg, &name, &principal, Some(read_only)).await,
                AdminCommand::Namespace(NamespaceCommand::Revoke { name, principal }) => {
                    admin::set_access(&cfg, &name, &principal, None).await
                }
                AdminCommand::Blockd(BlockdCommand::List) => admin::list_blockds(&cfg).await,
                AdminCommand::Blockd(BlockdCommand::Decommission { id }) => {
                    admin::set_blockd_state(&cfg, &id, "decommission").await
                }
                AdminCommand::Blockd(BlockdCommand::Recommission { id }) => {
                    admin::set_blockd_state(&cfg, &id, "normal").await
                }
                AdminCommand::Blockd(BlockdCommand::Remove { id }) => {
                    admin::set_blockd_state(&cfg, &id, "remove").await
                }
                AdminCommand::Node(NodeCommand::Add {
                    id,
                    rpc_address,
                    raft_address,
                }) => membership::add(&cfg, id, &rpc_address, &raft_address).await,
                AdminCommand::Node(NodeCommand::Remove { id, force }) => membership::remove(&cfg, id, force).await,
                AdminCommand::Node(NodeCommand::Replace {
                    old,
                    new,
                    rpc_address,
                    raft_address,
                }) => membership::replace(&cfg, old, new, &rpc_address, &raft_address).await,
                AdminCommand::Node(NodeCommand::State { id, digest }) => membership::state(&cfg, id, digest).await,
                AdminCommand::Node(NodeCommand::Health { id }) => membership::health(&cfg, id).await,
                AdminCommand::Failover { to } => membership::failover(&cfg, to).await,
                AdminCommand::Recovery(RecoveryCommand::Wait { timeout }) => {
                    admin::recovery_wait(&cfg, timeout.map(std::time::Duration::from_secs)).await
                }
                AdminCommand::Recovery(RecoveryCommand::Finish) => admin::recovery_finish(&cfg).await,
                AdminCommand::Mirror(MirrorCommand::Verify) => admin::mirror_verify(&cfg).await,
                AdminCommand::Ca(_) | AdminCommand::Cert(_) => unreachable!("handled above"),
            }
        }
        Command::Fsck { uri } => {
            if let Some(u) = &uri {
                fs_cmd::JfsUri::parse(u)?;
            }
            let cfg = load_config(&resolve_conf_path(conf)?)?;
            fsck::run(&cfg, uri.as_deref()).await
        }
        Command::Fs(cmd) => {
            // Parse the URI before touching the config, so a typo is reported as what it is.
            let cmd = fs_cmd::FsOp::from_cli(cmd)?;
            let cfg = load_config(&resolve_conf_path(conf)?)?;
            fs_cmd::run(&cfg, cmd).await
        }
        Command::Bench(BenchCommand::Meta {
            namespace,
            clients,
            files,
            fsync_dir,
            json,
        }) => {
            let cfg = load_config(&resolve_conf_path(conf)?)?;
            let args = bench::MetaBenchArgs {
                namespace,
                clients,
                files,
                fsync_dir,
                json,
            };
            bench::meta(&cfg, args).await
        }
        Command::Completions { shell } => completions::print(shell, <Cli as clap::CommandFactory>::command()),
    }
}

fn main() -> ExitCode {
    jfs_common::manpage::exit_if_requested(<Cli as clap::CommandFactory>::command);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version with exit 0 and usage errors with exit 2.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jfs: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                CliError::Fs(_) | CliError::FsAt(..) => eprintln!("{e}"),
                // A verdict, not a failure of the tool: stdout, like the healthy one.
                CliError::Unhealthy(line) => say!("{line}"),
                _ => eprintln!("jfs: {e}"),
            }
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exit_codes() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Fs(FsError::NotFound).exit_code(), 1);
        assert_eq!(CliError::Failed("x".into()).exit_code(), 1);
        assert_eq!(CliError::Unhealthy("x".into()).exit_code(), 1);
        assert_eq!(
            CliError::Fs(FsError::NotFound).to_string(),
            "ErrorCode : 25001 , ErrorMsg: no such file or directory"
        );
    }

    #[test]
    fn metastatus_dir_conflicts_with_conf() {
        let r = Cli::try_parse_from(["jfs", "metastatus", "--detail", "--dir", "/y"]).unwrap();
        assert!(matches!(
            r.command,
            Command::Metastatus(MetastatusArgs {
                detail: true,
                digest: false,
                metrics: false,
                dir: Some(_)
            })
        ));
        let r = metastatus_conf_path(Some(Path::new("/y")), Some(Path::new("/x")));
        assert!(matches!(r, Err(CliError::Usage(_))));
        assert_eq!(
            metastatus_conf_path(Some(Path::new("/y")), None).unwrap(),
            Path::new("/y/jfs.toml")
        );
        assert_eq!(
            metastatus_conf_path(None, Some(Path::new("/x"))).unwrap(),
            Path::new("/x")
        );
    }

    #[test]
    fn node_commands_parse() {
        let r = Cli::try_parse_from([
            "jfs",
            "admin",
            "node",
            "replace",
            "2",
            "--with",
            "4",
            "--rpc-address",
            "h:8131",
            "--raft-address",
            "h:8133",
        ])
        .unwrap();
        assert!(matches!(
            r.command,
            Command::Admin(AdminCommand::Node(NodeCommand::Replace { old: 2, new: 4, .. }))
        ));
        let r = Cli::try_parse_from(["jfs", "admin", "failover", "--to", "3"]).unwrap();
        assert!(matches!(r.command, Command::Admin(AdminCommand::Failover { to: 3 })));
        let r = Cli::try_parse_from(["jfs", "metastatus", "--detail", "--digest"]).unwrap();
        assert!(matches!(
            r.command,
            Command::Metastatus(MetastatusArgs { digest: true, .. })
        ));
        assert!(Cli::try_parse_from(["jfs", "admin", "node", "add", "4", "--rpc-address", "h:1"]).is_err());
    }

    #[test]
    fn conf_is_global() {
        let r = Cli::try_parse_from(["jfs", "fs", "count", "jfs://default/", "--conf", "/c.toml"]).unwrap();
        assert_eq!(r.conf.as_deref(), Some(Path::new("/c.toml")));
    }
}
