//! Talking to the metad quorum: one lazily connected channel per address,
//! remembering who the leader is, following "not leader" hints, and retrying
//! retryable errors with jittered backoff until the client timeout.
//!
//! Exactly-once: every mutating call gets a sequence number once per logical
//! operation and sends it again, unchanged, on each retry; `acked_below` tells
//! the server which replies it may forget (all below the oldest call still in
//! flight).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jfs_common::rpc::{self, meta_client::MetaClient as MetaGrpcClient, NamespaceInfo, NodeStatus, ReqHeader};
use jfs_common::{FsError, FsResult, MAX_MESSAGE_BYTES};
use rand::Rng;
use tonic::transport::{Channel, Endpoint};

use crate::lock;

/// The generated gRPC stub for the Meta service, as handed to the closures of
/// [`MetaClient::call`] and [`MetaClient::call_mut`].
pub type MetaGrpc = MetaGrpcClient<Channel>;

/// Longest a single attempt may take before we try another node: a hung
/// (paused, partitioned) node must not eat the whole timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Leader-following client of the metad quorum. Cheap to clone.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    addresses: Vec<String>,
    timeout: Duration,
    client_id: u64,
    state: Mutex<State>,
}

struct State {
    channels: HashMap<String, Channel>,
    /// Address we believe is the leader.
    leader: Option<String>,
    /// Round-robin position when no leader is known.
    next: usize,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
}

/// Removes a sequence number from the in-flight set when its call ends
/// (also when the caller's future is dropped).
struct SeqGuard<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl Drop for SeqGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.state).in_flight.remove(&self.seq);
    }
}

fn endpoint(addr: &str) -> FsResult<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(uri)
        .map_err(|e| FsError::InvalidArgument(format!("bad metad address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(ep)
}

fn stub(ch: Channel) -> MetaGrpc {
    MetaGrpcClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl MetaClient {
    /// A client of the metad nodes at `addresses` (host:port). Nothing is
    /// dialed until the first call. `timeout` bounds each call, retries included.
    pub fn new(addresses: Vec<String>, timeout: Duration) -> MetaClient {
        let client_id = loop {
            let id: u64 = rand::thread_rng().gen();
            if id != 0 {
                break id;
            }
        };
        MetaClient {
            inner: Arc::new(Inner {
                addresses,
                timeout,
                client_id,
                state: Mutex::new(State {
                    channels: HashMap::new(),
                    leader: None,
                    next: 0,
                    next_seq: 1,
                    in_flight: BTreeSet::new(),
                }),
            }),
        }
    }

    pub fn addresses(&self) -> &[String] {
        &self.inner.addresses
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub fn client_id(&self) -> u64 {
        self.inner.client_id
    }

    /// The address currently believed to be the leader, if any.
    pub fn leader(&self) -> Option<String> {
        lock(&self.inner.state).leader.clone()
    }

    /// Asks one node for its own view (`Status` is answered by followers
    /// too). No retry, no leader following; bounded by `timeout`.
    pub async fn status_of(addr: &str, timeout: Duration) -> FsResult<NodeStatus> {
        let ch = endpoint(addr)?.timeout(timeout).connect_lazy();
        let fut = async move { stub(ch).status(rpc::StatusRequest {}).await };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(st)) => Err(st.into()),
            Err(_) => Err(FsError::Unavailable(format!(
                "metad at {addr} did not answer within {timeout:?}"
            ))),
        }
    }

    pub async fn create_namespace(
        &self,
        name: &str,
        block_size: u64,
        replication: u32,
        if_not_exists: bool,
    ) -> FsResult<NamespaceInfo> {
        let name = name.to_string();
        self.call_mut(|mut c, hdr| {
            let req = rpc::CreateNamespaceRequest {
                hdr: Some(hdr),
                name: name.clone(),
                block_size,
                replication,
                if_not_exists,
            };
            async move { c.create_namespace(req).await }
        })
        .await
    }

    pub async fn get_namespace(&self, name: &str) -> FsResult<NamespaceInfo> {
        let req = rpc::GetNamespaceRequest { name: name.to_string() };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.get_namespace(req).await }
        })
        .await
    }

    pub async fn list_namespaces(&self) -> FsResult<Vec<NamespaceInfo>> {
        let reply = self
            .call(|mut c| async move { c.list_namespaces(rpc::ListNamespacesRequest {}).await })
            .await?;
        Ok(reply.namespaces)
    }

    /// Runs a read-only RPC on the leader, following hints and retrying
    /// retryable errors until the timeout. `f` builds one attempt:
    /// `|mut c| { let req = req.clone(); async move { c.get_attr(req).await } }`.
    pub async fn call<T, F, Fut>(&self, f: F) -> FsResult<T>
    where
        F: FnMut(MetaGrpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.retry_loop(f).await
    }

    /// Runs a mutating RPC: like [`MetaClient::call`], and `f` also receives
    /// the request header, whose sequence number is the same on every retry.
    pub async fn call_mut<T, F, Fut>(&self, mut f: F) -> FsResult<T>
    where
        F: FnMut(MetaGrpc, ReqHeader) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let seq = {
            let mut st = lock(&self.inner.state);
            let seq = st.next_seq;
            st.next_seq += 1;
            st.in_flight.insert(seq);
            seq
        };
        let _guard = SeqGuard {
            inner: &self.inner,
            seq,
        };
        let inner = &self.inner;
        self.retry_loop(|c| {
            let acked_below = {
                let st = lock(&inner.state);
                st.in_flight.iter().next().copied().unwrap_or(st.next_seq)
            };
            f(
                c,
                ReqHeader {
                    client_id: inner.client_id,
                    seq,
                    acked_below,
                },
            )
        })
        .await
    }

    async fn retry_loop<T, F, Fut>(&self, mut attempt: F) -> FsResult<T>
    where
        F: FnMut(MetaGrpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut failures: u32 = 0;
        loop {
            let (addr, ch) = self.pick()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let res = tokio::time::timeout(remaining.min(ATTEMPT_TIMEOUT), attempt(stub(ch))).await;
            let err = match res {
                Ok(Ok(reply)) => {
                    self.note_leader(&addr);
                    return Ok(reply.into_inner());
                }
                Ok(Err(st)) => FsError::from(st),
                Err(_) => FsError::Unavailable(format!("metad at {addr} did not answer in time")),
            };
            if !err.is_retryable() {
                return Err(err);
            }
            failures += 1;
            let hinted = self.note_failure(&addr, &err);
            if Instant::now() >= deadline {
                tracing::debug!(%addr, error = %err, "metad call gave up at the client timeout");
                return Err(match err {
                    FsError::NotLeader { .. } => FsError::Unavailable(format!(
                        "no metad leader answered within {:?} (last tried {addr}); check `jfs metastatus`",
                        self.inner.timeout
                    )),
                    other => other,
                });
            }
            // Follow a fresh hint at once; otherwise back off a little, more
            // after each failure, with jitter so clients do not move in step.
            if !hinted || failures > 3 {
                let base_ms = (10u64 << failures.min(6)).min(500);
                let jitter = rand::thread_rng().gen_range(0..=base_ms / 2);
                let sleep = Duration::from_millis(base_ms + jitter);
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(sleep.min(left)).await;
            }
        }
    }

    /// The address and channel to try next: the known leader, else the next
    /// configured address.
    fn pick(&self) -> FsResult<(String, Channel)> {
        let mut st = lock(&self.inner.state);
        let addr = match &st.leader {
            Some(a) => a.clone(),
            None => {
                if self.inner.addresses.is_empty() {
                    return Err(FsError::InvalidArgument("no metad address is configured".into()));
                }
                let i = st.next % self.inner.addresses.len();
                st.next = st.next.wrapping_add(1);
                self.inner.addresses[i].clone()
            }
        };
        if let Some(ch) = st.channels.get(&addr) {
            return Ok((addr, ch.clone()));
        }
        let ch = endpoint(&addr)?.connect_lazy();
        st.channels.insert(addr.clone(), ch.clone());
        Ok((addr, ch))
    }

    fn note_leader(&self, addr: &str) {
        let mut st = lock(&self.inner.state);
        if st.leader.as_deref() != Some(addr) {
            st.leader = Some(addr.to_string());
        }
    }

    /// Updates the leader guess after a retryable failure; true when a new
    /// leader hint is being followed.
    fn note_failure(&self, addr: &str, err: &FsError) -> bool {
        let mut st = lock(&self.inner.state);
        match err {
            FsError::NotLeader { leader: Some(l) } if !l.is_empty() && l != addr => {
                st.leader = Some(l.clone());
                true
            }
            _ => {
                if st.leader.as_deref() == Some(addr) {
                    st.leader = None;
                    // Start the round-robin after the failed node.
                    if let Some(i) = self.inner.addresses.iter().position(|a| a == addr) {
                        st.next = i + 1;
                    }
                }
                false
            }
        }
    }
}
