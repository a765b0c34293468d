//! `jfs-metad`: one node of the metadata quorum.
//!
//! Opens the node's RocksDB, starts openraft over it, serves Raft traffic on
//! the node's Raft address and the Meta service on its client address. Every
//! node of a new cluster starts with the same `initial-conf`; each one
//! initialises Raft membership from it when its log is empty, which openraft
//! accepts as long as the configuration is identical everywhere.

mod blockd_registry;
mod campaign_gate;
mod fsck;
mod healer;
mod keys;
mod kv;
mod lease;
mod membership;
mod mirror;
mod namespace;
mod proposer;
mod raft_network;
mod raft_store;
mod raft_types;
mod recovery;
mod service;
mod session_reaper;
mod table_store;
mod telemetry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use tokio::net::lookup_host;

use jfs_common::config::Config;
use jfs_common::rpc::meta_server::MetaServer;
use jfs_common::rpc::raft_server::RaftServer;

use crate::blockd_registry::BlockdRegistry;
use crate::raft_types::{MetaNode, Op, Raft};

#[derive(Parser)]
#[command(name = "jfs-metad", version, about = "jfs metadata service node (Raft + RocksDB)")]
struct Args {
    /// Cluster configuration file shared by every jfs process.
    #[arg(long, default_value = jfs_common::config::DEFAULT_CONFIG_PATH)]
    conf: PathBuf,
    /// This node's id. Nodes in namespace.backend.raft.initial-conf have their
    /// position there (from 1); a node added later takes an id never used
    /// before in this cluster (ids of replaced nodes are not reused).
    #[arg(long)]
    node_id: u64,
    /// This node's client address (host:port) [default: its initial-conf entry].
    #[arg(long)]
    rpc_address: Option<String>,
    /// This node's Raft address (host:port) [default: its initial-conf entry].
    #[arg(long)]
    raft_address: Option<String>,
    /// Start a new cluster made of this node alone; grow it with
    /// `jfs admin node add` or by starting other nodes with --join.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join the running cluster that answers at ADDR (any member's client
    /// address): start empty, ask its leader to add this node as a learner,
    /// and become a voter once caught up.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// Where this node keeps its Raft log and namespace database
    /// [default: <namespace.data-dir>/node<ID>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics ("" = off)
    /// [default: metad.metrics-address, 0.0.0.0:9410].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

/// The host part of host:port.
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// Raft timing. `election-timeout-ms` (E) is how long a follower honours a
/// silent leader: openraft refuses votes for `election_timeout_max` after the
/// last word from the leader (its leader lease), and a follower campaigns
/// only after that lease plus its own random timeout in [E/2, E). So a dead
/// leader is replaced 1.5 E to 2 E after its last heartbeat, and the first
/// campaign already finds the other voters free to vote.
///
/// Elections start disabled: `main` enables them after the restart quiet
/// period (see `lease`).
fn raft_config(cfg: &Config) -> anyhow::Result<openraft::Config> {
    let hb = cfg.raft_heartbeat.as_millis() as u64;
    let et = cfg.raft_election_timeout.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "jfs".into(),
        heartbeat_interval: hb,
        election_timeout_min: et / 2,
        election_timeout_max: et,
        enable_elect: false,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.raft_snapshot_every),
        max_in_snapshot_log_to_keep: 1000,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    c.validate().map_err(|e| anyhow!("invalid raft timing settings: {e}"))
}

/// When another configured node answers that it already belongs to an
/// initialised cluster: the ids that cluster has seen hold log entries.
async fn existing_cluster(cfg: &Config, me: u64) -> Option<Vec<u64>> {
    use jfs_common::rpc::{meta_client::MetaClient, StatusRequest};
    for p in cfg.peers.iter().filter(|p| p.id != me) {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(format!("http://{}", p.rpc_addr)) else {
            continue;
        };
        let ep = ep
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1));
        let Ok(ch) = jfs_common::tls::connect(ep, jfs_common::tls::Role::Metad).await else {
            continue;
        };
        if let Ok(st) = MetaClient::new(ch).status(StatusRequest::default()).await {
            let st = st.into_inner();
            if st.applied_index > 0 || !st.cluster_id.is_empty() {
                return Some(st.seen_members);
            }
        }
    }
    None
}

/// `--join`: asks the cluster at `addr` (following leader hints) to add this
/// node, until it does or the node is stopped.
async fn join_cluster(addr: String, me: u64, node: MetaNode) {
    use jfs_common::rpc::{meta_client::MetaClient, AddMemberRequest};
    let mut target = addr.clone();
    let mut pause = Duration::from_millis(200);
    loop {
        let attempt = async {
            let ep = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                .map_err(|e| jfs_common::FsError::InvalidArgument(format!("bad --join address {target}: {e}")))?
                .connect_timeout(Duration::from_secs(2));
            let ch = jfs_common::tls::connect(ep, jfs_common::tls::Role::Metad)
                .await
                .map_err(|e| jfs_common::FsError::Unavailable(format!("cannot reach {target}: {e}")))?;
            MetaClient::new(ch)
                .add_member(AddMemberRequest {
                    node_id: me,
                    rpc_address: node.rpc_addr.clone(),
                    raft_address: node.raft_addr.clone(),
                })
                .await
                .map(|r| r.into_inner())
                .map_err(jfs_common::FsError::from)
        };
        match attempt.await {
            Ok(r) => {
                tracing::info!(voters = ?r.voters, learners = ?r.learners, "joined the cluster as a voter");
                return;
            }
            Err(jfs_common::FsError::NotLeader { leader: Some(l) }) if !l.is_empty() => {
                target = l;
                continue;
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!("joining the cluster through {target} is not done yet ({e}); retrying");
                target = addr.clone();
            }
            Err(e) => {
                tracing::error!(
                    "the cluster at {target} refused to add this node: {e}. Stop this node, fix the cause, \
                     and start it again"
                );
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Once this node leads, make sure the cluster has an id (first leader of a
/// new cluster creates it; later leaders find it already there).
async fn ensure_cluster_id(raft: Raft, view: raft_store::SmView, node_id: u64) {
    let mut metrics = raft.metrics();
    loop {
        let leading = metrics.borrow().current_leader == Some(node_id);
        if leading {
            match namespace::cluster_id(&view) {
                Ok(Some(_)) => return,
                Ok(None) => {
                    let id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
                    let cmd = raft_types::Command {
                        client_id: 0,
                        seq: 0,
                        acked_below: 0,
                        now_ns: 0,
                        session_ns: 0,
                        op: Op::InitCluster { cluster_id: id },
                    };
                    match raft.client_write(cmd).await {
                        Ok(_) => tracing::info!("cluster id initialised"),
                        Err(e) => tracing::warn!("could not record the cluster id yet: {e}"),
                    }
                    continue;
                }
                Err(e) => tracing::error!("cannot read cluster id: {e}"),
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Accepted connections with Nagle off: our requests are small and latency
/// bound (a delayed ACK would add ~40 ms to each round trip).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.conf).map_err(|e| anyhow!("{e}"))?;
    if cfg.peers.is_empty() {
        bail!(
            "{}: namespace.backend.raft.initial-conf is not set; list every metad node as host:port:0",
            args.conf.display()
        );
    }
    if args.node_id == 0 {
        bail!("--node-id must be 1 or more");
    }
    // Certificates load before anything listens or dials, so a bad one stops
    // the start with the file to fix.
    let tls_role = jfs_common::tls::Role::Metad;
    jfs_common::tls::init_client(&cfg, tls_role).map_err(|e| anyhow!("{e}"))?;
    let server_tls = jfs_common::tls::server_for(&cfg, tls_role).map_err(|e| anyhow!("{e}"))?;
    let conf_peer = cfg.peer(args.node_id).cloned();
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| cfg.metad_data_dir.join(format!("node{}", args.node_id)));
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let db = raft_store::open_db(&data_dir.join("db")).with_context(|| {
        format!(
            "cannot open the metadata database in {} (is another jfs-metad using it?)",
            data_dir.display()
        )
    })?;

    let log_store = raft_store::LogStore::new(db.clone(), args.node_id)
        .with_context(|| format!("cannot sync the Raft log in {}", data_dir.display()))?;
    let durable = log_store.durability();
    let sm = raft_store::StateMachine::new(
        db.clone(),
        &data_dir,
        cfg.mirror_enabled || cfg.recovery_mode,
        durable.clone(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let view = sm.view();
    let rcfg = Arc::new(raft_config(&cfg)?);
    let lease = Arc::new(lease::LeaseTracker::default());
    let network = raft_network::Network {
        lease: lease.clone(),
        durable,
    };
    let raft = Raft::new(args.node_id, rcfg.clone(), network, log_store, sm)
        .await
        .map_err(|e| anyhow!("cannot start raft: {e}"))?;
    let fresh = !raft.is_initialized().await.map_err(|e| anyhow!("{e}"))?;

    // This node's addresses: the flags, else initial-conf, else what the
    // cluster recorded when it was added.
    let recorded = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&args.node_id)
        .cloned();
    let pick = |flag: &Option<String>, conf: Option<&String>, rec: Option<&String>| {
        flag.clone().or_else(|| conf.cloned()).or_else(|| rec.cloned())
    };
    let me = match (
        pick(
            &args.rpc_address,
            conf_peer.as_ref().map(|p| &p.rpc_addr),
            recorded.as_ref().map(|n| &n.rpc_addr),
        ),
        pick(
            &args.raft_address,
            conf_peer.as_ref().map(|p| &p.raft_addr),
            recorded.as_ref().map(|n| &n.raft_addr),
        ),
    ) {
        (Some(rpc_addr), Some(raft_addr)) => MetaNode { raft_addr, rpc_addr },
        _ => bail!(
            "--node-id {} is not in namespace.backend.raft.initial-conf (nodes 1..={}) and this node has no \
             recorded addresses: give --rpc-address and --raft-address",
            args.node_id,
            cfg.peers.len()
        ),
    };

    let mut join = None;
    if args.init {
        if fresh {
            let members = BTreeMap::from([(args.node_id, me.clone())]);
            raft.initialize(members)
                .await
                .map_err(|e| anyhow!("cannot initialise a one-node cluster: {e}"))?;
            tracing::info!("initialised a new one-node cluster; add nodes with --join or `jfs admin node add`");
        } else {
            tracing::info!("--init ignored: this node already belongs to a cluster");
        }
    } else if let Some(addr) = &args.join {
        if fresh {
            join = Some(addr.clone());
        } else {
            tracing::info!("--join ignored: this node already belongs to a cluster");
        }
    } else if fresh {
        match existing_cluster(&cfg, args.node_id).await {
            Some(seen) if seen.contains(&args.node_id) => bail!(
                "this node's data directory {} is empty, but the cluster has already counted node {} as a \
                 member holding log entries: its votes and acknowledged entries are gone, and rejoining under \
                 the same id could lose acknowledged writes. Replace the node instead: run `jfs admin node \
                 remove {}`, then start this node with a new id and --join (e.g. `jfs-metad --node-id <NEW> \
                 --rpc-address HOST:PORT --raft-address HOST:PORT --join <ANY MEMBER>`), or run `jfs admin node \
                 replace {} --with <NEW> ...`",
                data_dir.display(),
                args.node_id,
                args.node_id,
                args.node_id
            ),
            // Listed in initial-conf but never started (its peers formed
            // the cluster without it): it has nothing to forget; the leader
            // brings it up to date.
            Some(_) => tracing::info!("peers already run a cluster this node never held entries of; joining it"),
            None if conf_peer.is_some() => {
                let members: BTreeMap<u64, MetaNode> = cfg
                    .peers
                    .iter()
                    .map(|p| {
                        (
                            p.id,
                            MetaNode {
                                raft_addr: p.raft_addr.clone(),
                                rpc_addr: p.rpc_addr.clone(),
                            },
                        )
                    })
                    .collect();
                match raft.initialize(members).await {
                    Ok(()) => tracing::info!(nodes = cfg.peers.len(), "initialised a new cluster from initial-conf"),
                    Err(e) => tracing::info!("not initialising membership: {e}"),
                }
            }
            None => tracing::info!("waiting to be added to a cluster (`jfs admin node add`)"),
        }
    }

    let cfg = Arc::new(cfg);
    let blockds = Arc::new(BlockdRegistry::new(cfg.blockd_dead_after));
    tokio::spawn(ensure_cluster_id(raft.clone(), view.clone(), args.node_id));
    let membership = Arc::new(membership::Membership::new(
        raft.clone(),
        args.node_id,
        view.clone(),
        Duration::from_millis(rcfg.election_timeout_max),
    ));
    let leader_contact = Arc::new(raft_network::LeaderContact::default());
    let healer = Arc::new(healer::Healer::new(cfg.clone(), blockds.clone(), view.clone()));

    // The table store: for the mirror, and for a restore in recovery mode.
    let store = if cfg.mirror_enabled || cfg.recovery_mode {
        Some(Arc::new(table_store::TableStore::connect(&cfg.dynamodb).await))
    } else {
        None
    };
    let mirror = match (&store, cfg.mirror_enabled) {
        (Some(st), true) => Some(Arc::new(mirror::Mirror::new(
            raft.clone(),
            args.node_id,
            view.clone(),
            cfg.clone(),
            st.clone(),
        ))),
        _ => None,
    };

    let metrics_bound = jfs_common::telemetry::start(
        args.metrics_listen.as_deref().unwrap_or(&cfg.metad_metrics_address),
        "metad",
    );
    if metrics_bound.is_some() {
        jfs_common::telemetry::describe(telemetry::METRICS);
        if mirror.is_some() {
            jfs_common::telemetry::describe(telemetry::MIRROR_METRICS);
        }
    }
    let gauges = telemetry::NodeGauges {
        raft: raft.clone(),
        view: view.clone(),
        blockds: blockds.clone(),
        mirror: mirror.clone(),
        snapshot_file: data_dir.join("snapshot.bin"),
    };
    let view_for_members = view.clone();
    let view_for_recovery = view.clone();
    let meta = service::MetaService {
        raft: raft.clone(),
        proposer: proposer::Proposer::start(raft.clone()),
        lease,
        // Followers honour a leader for election_timeout_max after hearing
        // from it; we use half of that.
        lease_duration: Duration::from_millis(rcfg.election_timeout_max / 2),
        view,
        node_id: args.node_id,
        cfg: cfg.clone(),
        blockds,
        healer: healer.clone(),
        membership,
        leader_contact: leader_contact.clone(),
        mirror: mirror.clone(),
        metrics_address: metrics_bound
            .map(|b| jfs_common::telemetry::advertised(b, host_of(&me.rpc_addr)))
            .unwrap_or_default(),
        access_cache: Default::default(),
    };
    let rpc_addr = resolve(&me.rpc_addr).await?;
    let raft_addr = resolve(&me.raft_addr).await?;
    let rpc_listener = tokio::net::TcpListener::bind(rpc_addr)
        .await
        .with_context(|| format!("cannot listen on client address {rpc_addr} (already in use?)"))?;
    let raft_listener = tokio::net::TcpListener::bind(raft_addr)
        .await
        .with_context(|| format!("cannot listen on raft address {raft_addr} (already in use?)"))?;
    tracing::info!(node = args.node_id, %rpc_addr, %raft_addr, data_dir = %data_dir.display(), "jfs-metad serving");

    let meta_svc = MetaServer::new(meta)
        .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);
    // A brand-new node has never acknowledged a leader, so it has no lease to honour.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let vote_quiet = if fresh {
        Duration::ZERO
    } else {
        Duration::from_millis(rcfg.election_timeout_max)
    };
    // The quiet period holds back this node's own campaign too (openraft
    // would start one at its first tick after a restart, with no record of
    // when it last heard a leader that may still serve lease reads); after
    // it, the gate lets the node campaign only when no peer has a longer log.
    let gate = tokio::spawn(campaign_gate::run(
        raft.clone(),
        view_for_members.clone(),
        args.node_id,
        vote_quiet,
        leader_contact.clone(),
        Duration::from_millis(rcfg.election_timeout_max),
        stop_rx.clone(),
    ));
    let raft_svc = RaftServer::new(raft_network::RaftService::new(raft.clone(), vote_quiet, leader_contact))
        .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);

    let mut stop_a = stop_rx.clone();
    let mut stop_b = stop_rx.clone();
    let stop_rx_healer = stop_rx;
    let rpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(jfs_common::MAX_STREAMS_PER_CONNECTION))
        .layer(jfs_common::telemetry::RpcMetricsLayer::new("meta"))
        .layer(jfs_common::tls::AuthLayer::new(cfg.tls_enabled))
        .add_service(meta_svc)
        .serve_with_incoming_shutdown(
            jfs_common::tls::incoming(rpc_listener, server_tls.clone(), "meta"),
            async move {
                let _ = stop_a.changed().await;
            },
        );
    let raft_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(jfs_common::MAX_STREAMS_PER_CONNECTION))
        .layer(jfs_common::telemetry::RpcMetricsLayer::new("raft"))
        .layer(jfs_common::tls::AuthLayer::new(cfg.tls_enabled))
        .add_service(raft_svc)
        .serve_with_incoming_shutdown(
            jfs_common::tls::incoming(raft_listener, server_tls, "raft"),
            async move {
                let _ = stop_b.changed().await;
            },
        );
    let servers = tokio::spawn(async move { tokio::try_join!(rpc_server, raft_server) });
    // Both ports are bound: clients and peers connecting from now on are
    // served. systemd (Type=notify) starts units ordered after this one only
    // now; outside systemd (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell systemd that jfs-metad is ready: {e}");
    }
    let recording = tokio::spawn(membership::record_seen(
        raft.clone(),
        view_for_members,
        args.node_id,
        stop_rx_healer.clone(),
    ));
    // Clients may use any session timeout; the grace after a leader change
    // covers ours (the config's), the one every jfs client here uses.
    let reaping = tokio::spawn(session_reaper::run(
        raft.clone(),
        cfg.session_timeout,
        stop_rx_healer.clone(),
    ));
    let mirroring = mirror.map(|m| tokio::spawn(m.run(stop_rx_healer.clone())));
    let recovering = tokio::spawn(recovery::run(
        raft.clone(),
        args.node_id,
        view_for_recovery,
        cfg.clone(),
        store,
        stop_rx_healer.clone(),
    ));
    let gauging = tokio::spawn(gauges.run(stop_rx_healer.clone()));
    let healing = tokio::spawn(healer::run(healer, raft.clone(), args.node_id, stop_rx_healer));
    if let Some(addr) = join {
        tokio::spawn(join_cluster(addr, args.node_id, me.clone()));
    }

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), raft.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), servers).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), healing).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), recording).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), gate).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), reaping).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), recovering).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), gauging).await;
    if let Some(m) = mirroring {
        let _ = tokio::time::timeout(Duration::from_secs(5), m).await;
    }
    db.flush_wal(true).ok();
    Ok(())
}

fn main() {
    jfs_common::manpage::exit_if_requested(<Args as clap::CommandFactory>::command);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jfs-metad: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("jfs-metad: {e:#}");
        std::process::exit(1);
    }
}
