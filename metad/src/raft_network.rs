//! Raft traffic between metad nodes over gRPC.
//!
//! The wire message is an opaque `RaftPayload`: openraft's own request and
//! response types, bincode-encoded. The client half implements openraft's
//! `RaftNetwork`; the server half feeds incoming payloads to the local Raft.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use jfs_common::rpc::raft_client::RaftClient;
use jfs_common::rpc::raft_server;
use jfs_common::rpc::RaftPayload;

use crate::lease::LeaseTracker;
use crate::raft_types::{MetaNode, NodeId, Raft, TypeConfig};

// ------------------------------------------------------------------ client

pub struct Network {
    /// Caps the commit index sent to followers (see `raft_store`).
    pub durable: Arc<crate::raft_store::LogDurability>,
    pub lease: Arc<LeaseTracker>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &MetaNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.raft_addr.clone(),
            client: None,
            lease: self.lease.clone(),
            durable: self.durable.clone(),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Option<RaftClient<Channel>>,
    lease: Arc<LeaseTracker>,
    durable: Arc<crate::raft_store::LogDurability>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, MetaNode, RaftError<NodeId, E>>;

impl PeerClient {
    fn client(&mut self) -> Result<RaftClient<Channel>, Unreachable> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| Unreachable::new(&WireError(format!("bad raft address {}: {e}", self.addr))))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = RaftClient::new(jfs_common::tls::channel(ep, jfs_common::tls::Role::Metad))
            .max_decoding_message_size(jfs_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(jfs_common::MAX_MESSAGE_BYTES);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, MetaNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = bincode::serialize(req).map_err(|e| NetworkError::new(&e))?;
        let mut client = self.client()?;
        let mut request = Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(st) => {
                // Drop the channel so the next call reconnects (the peer may
                // have restarted on the same address).
                if st.code() == tonic::Code::Unavailable {
                    self.client = None;
                    return Err(Unreachable::new(&WireError(format!("{}: {}", self.addr, st.message()))).into());
                }
                return Err(NetworkError::new(&WireError(format!("{}: {st}", self.addr))).into());
            }
        };
        let res: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply.data).map_err(|e| NetworkError::new(&e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        // A follower must not apply what a power cut of this leader could
        // still take back: only what is fsynced here counts as committed.
        rpc.leader_commit = self.durable.cap_commit(rpc.leader_commit);
        let sent_at = Instant::now();
        let term = rpc.vote.leader_id().term;
        let resp: AppendEntriesResponse<NodeId> = self.call(RpcKind::Append, &rpc, &option).await?;
        // Any answer but HigherVote means the follower accepted this leader
        // and restarted its own lease clock no earlier than `sent_at`.
        if rpc.vote.is_committed() && !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
            self.lease.record_ack(self.target, term, sent_at);
        }
        Ok(resp)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }

    /// Retry an unreachable peer soon: a node that is (re)starting must get
    /// the leader's heartbeat before its own election timer fires, or it
    /// campaigns needlessly.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

// ------------------------------------------------------------------ server

pub struct RaftService {
    raft: Raft,
    started: Instant,
    vote_quiet_period: Duration,
    contact: Arc<LeaderContact>,
}

/// When this node last got an AppendEntries (a leader's heartbeat or
/// entries), for `jfs metastatus`'s "last contact".
#[derive(Default)]
pub struct LeaderContact(std::sync::Mutex<Option<Instant>>);

impl LeaderContact {
    fn touch(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    pub fn millis_since(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed().as_millis() as u64)
    }
}

impl RaftService {
    /// `vote_quiet_period`: how long after start-up this node refuses to
    /// vote, because it has forgotten when it last heard from a leader whose
    /// lease may still run (see `lease`).
    pub fn new(raft: Raft, vote_quiet_period: Duration, contact: Arc<LeaderContact>) -> Self {
        RaftService {
            raft,
            started: Instant::now(),
            vote_quiet_period,
            contact,
        }
    }
}

fn decode<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, Status> {
    bincode::deserialize(&p.data).map_err(|e| Status::invalid_argument(format!("undecodable raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    bincode::serialize(v)
        .map(|data| Response::new(RaftPayload { data }))
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        self.contact.touch();
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        if self.started.elapsed() < self.vote_quiet_period {
            return Err(Status::unavailable(
                "node restarted recently and does not vote until any old leader lease has run out",
            ));
        }
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
