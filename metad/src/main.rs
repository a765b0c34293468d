//! `jfs-metad`: one node of the metadata quorum.
//!
//! Opens the node's RocksDB, starts openraft over it, serves Raft traffic on
//! the node's Raft address and the Meta service on its client address. Every
//! node of a new cluster starts with the same `initial-conf`; each one
//! initialises Raft membership from it when its log is empty, which openraft
//! accepts as long as the configuration is identical everywhere.

mod blockd_registry;
mod fsck;
mod healer;
mod keys;
mod kv;
mod lease;
mod namespace;
mod raft_network;
mod raft_store;
mod raft_types;
mod service;

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
    /// This node's id: its position (from 1) in namespace.backend.raft.initial-conf.
    #[arg(long)]
    node_id: u64,
    /// Where this node keeps its Raft log and namespace database
    /// [default: <namespace.data-dir>/node<ID>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

fn raft_config(cfg: &Config) -> anyhow::Result<openraft::Config> {
    let hb = cfg.raft_heartbeat.as_millis() as u64;
    let et = cfg.raft_election_timeout.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "jfs".into(),
        heartbeat_interval: hb,
        election_timeout_min: et,
        election_timeout_max: et * 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.raft_snapshot_every),
        max_in_snapshot_log_to_keep: 1000,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    c.validate().map_err(|e| anyhow!("invalid raft timing settings: {e}"))
}

/// True when another configured node answers that it already belongs to an
/// initialised cluster.
async fn existing_cluster(cfg: &Config, me: u64) -> bool {
    use jfs_common::rpc::{meta_client::MetaClient, StatusRequest};
    for p in cfg.peers.iter().filter(|p| p.id != me) {
        let Ok(ep) = tonic::transport::Endpoint::from_shared(format!("http://{}", p.rpc_addr)) else {
            continue;
        };
        let ep = ep
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(1));
        let Ok(ch) = ep.connect().await else { continue };
        if let Ok(st) = MetaClient::new(ch).status(StatusRequest {}).await {
            let st = st.into_inner();
            if st.applied_index > 0 || !st.cluster_id.is_empty() {
                return true;
            }
        }
    }
    false
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
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

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
    let me = cfg
        .peer(args.node_id)
        .ok_or_else(|| {
            anyhow!(
                "--node-id {} is not in namespace.backend.raft.initial-conf (which has nodes 1..={})",
                args.node_id,
                cfg.peers.len()
            )
        })?
        .clone();
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

    let log_store = raft_store::LogStore::new(db.clone());
    let sm = raft_store::StateMachine::new(db.clone(), &data_dir).map_err(|e| anyhow!("{e}"))?;
    let view = sm.view();
    let rcfg = Arc::new(raft_config(&cfg)?);
    let lease = Arc::new(lease::LeaseTracker::default());
    let network = raft_network::Network { lease: lease.clone() };
    let raft = Raft::new(me.id, rcfg.clone(), network, log_store, sm)
        .await
        .map_err(|e| anyhow!("cannot start raft: {e}"))?;

    let fresh = !raft.is_initialized().await.map_err(|e| anyhow!("{e}"))?;
    if fresh && existing_cluster(&cfg, me.id).await {
        // An empty node whose peers already run a cluster (a replaced or
        // wiped node): writing the initial membership here would give it a
        // log that starts apart from the leader's; let the leader bring it
        // up to date (by snapshot) instead.
        tracing::info!("peers already run a cluster; joining it with an empty log");
    } else if fresh {
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

    let cfg = Arc::new(cfg);
    let blockds = Arc::new(BlockdRegistry::new(cfg.blockd_dead_after));
    tokio::spawn(ensure_cluster_id(raft.clone(), view.clone(), me.id));
    let healer = Arc::new(healer::Healer::new(cfg.clone(), blockds.clone(), view.clone()));

    let meta = service::MetaService {
        raft: raft.clone(),
        lease,
        // Followers honour a leader for election_timeout_max after hearing
        // from it; we use a quarter of that.
        lease_duration: Duration::from_millis(rcfg.election_timeout_min / 2),
        view,
        node_id: me.id,
        cfg: cfg.clone(),
        blockds,
        healer: healer.clone(),
    };
    let rpc_addr = resolve(&me.rpc_addr).await?;
    let raft_addr = resolve(&me.raft_addr).await?;
    let rpc_listener = tokio::net::TcpListener::bind(rpc_addr)
        .await
        .with_context(|| format!("cannot listen on client address {rpc_addr} (already in use?)"))?;
    let raft_listener = tokio::net::TcpListener::bind(raft_addr)
        .await
        .with_context(|| format!("cannot listen on raft address {raft_addr} (already in use?)"))?;
    tracing::info!(node = me.id, %rpc_addr, %raft_addr, data_dir = %data_dir.display(), "jfs-metad serving");

    let meta_svc = MetaServer::new(meta)
        .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);
    // A brand-new node has never acknowledged a leader, so it has no lease to honour.
    let vote_quiet = if fresh {
        Duration::ZERO
    } else {
        Duration::from_millis(rcfg.election_timeout_max)
    };
    let raft_svc = RaftServer::new(raft_network::RaftService::new(raft.clone(), vote_quiet))
        .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_a = stop_rx.clone();
    let mut stop_b = stop_rx.clone();
    let stop_rx_healer = stop_rx;
    let rpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(meta_svc)
        .serve_with_incoming_shutdown(incoming(rpc_listener), async move {
            let _ = stop_a.changed().await;
        });
    let raft_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(raft_svc)
        .serve_with_incoming_shutdown(incoming(raft_listener), async move {
            let _ = stop_b.changed().await;
        });
    let servers = tokio::spawn(async move { tokio::try_join!(rpc_server, raft_server) });
    let healing = tokio::spawn(healer::run(healer, raft.clone(), me.id, stop_rx_healer));

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), raft.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), servers).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), healing).await;
    db.flush_wal(true).ok();
    Ok(())
}

fn main() {
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
