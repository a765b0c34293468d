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

/// A client silent this long loses its session (`client.session-timeout-ms`).
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a single attempt may take before it is sent again. A hung
/// (paused, cut off) leader is normally left sooner, as soon as another node
/// is seen leading (`watch_for_new_leader`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call waits on its node before checking whether another node
/// has taken over. Short enough to leave a hung leader well within the 2 s
/// a syscall may stall in a failover; long enough that healthy calls never
/// pay for the check.
const HEDGE_AFTER: Duration = Duration::from_millis(400);

/// Between two such checks.
const PROBE_EVERY: Duration = Duration::from_millis(150);

/// How long a node may take to answer `Status` when we look for the leader:
/// a node that does not answer this fast is not one to send calls to.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// Leader-following client of the metad quorum. Cheap to clone.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    addresses: Vec<String>,
    timeout: Duration,
    /// Longest one attempt may take (`ATTEMPT_TIMEOUT` unless a slow admin
    /// call asked for more).
    attempt_timeout: Duration,
    session_timeout: Duration,
    state: Mutex<State>,
    /// The current session; replaced by a fresh one when metad says it expired.
    session: Mutex<Arc<Session>>,
    keepalive_started: std::sync::atomic::AtomicBool,
}

/// One client identity on the metad side: its id and the sequence numbers
/// of its mutating calls. A session that expired is never used again (its
/// reply table is gone, so its retries could apply twice).
struct Session {
    client_id: u64,
    seqs: Mutex<Seqs>,
}

struct Seqs {
    next: u64,
    in_flight: BTreeSet<u64>,
}

impl Session {
    fn new() -> Arc<Session> {
        let client_id = loop {
            let id: u64 = rand::thread_rng().gen();
            if id != 0 {
                break id;
            }
        };
        Arc::new(Session {
            client_id,
            seqs: Mutex::new(Seqs {
                next: 1,
                in_flight: BTreeSet::new(),
            }),
        })
    }

    /// Everything below this has been answered (or given up on).
    fn acked_below(&self) -> u64 {
        let s = lock(&self.seqs);
        s.in_flight.iter().next().copied().unwrap_or(s.next)
    }
}

struct State {
    channels: HashMap<String, Channel>,
    /// Address we believe is the leader.
    leader: Option<String>,
    /// Member addresses the cluster told us about, beyond the configured ones.
    learned: Vec<String>,
    /// Newest term in which each address was seen leading.
    terms: HashMap<String, u64>,
}

/// Removes a sequence number from the in-flight set when its call ends
/// (also when the caller's future is dropped).
struct SeqGuard {
    session: Arc<Session>,
    seq: u64,
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        lock(&self.session.seqs).in_flight.remove(&self.seq);
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
        MetaClient::build(addresses, timeout, ATTEMPT_TIMEOUT, DEFAULT_SESSION_TIMEOUT)
    }

    /// A client for one slow admin call (a whole-table comparison, say):
    /// each attempt, and the call, may take up to `timeout`, where the
    /// normal client gives up on an attempt after `ATTEMPT_TIMEOUT`.
    pub fn for_slow_calls(addresses: Vec<String>, timeout: Duration) -> MetaClient {
        MetaClient::build(addresses, timeout, timeout, DEFAULT_SESSION_TIMEOUT)
    }

    /// The same client with another session timeout (`client.session-timeout-ms`).
    /// Call before the first request: it starts a fresh session.
    pub fn with_session_timeout(self, session_timeout: Duration) -> MetaClient {
        MetaClient::build(
            self.inner.addresses.clone(),
            self.inner.timeout,
            self.inner.attempt_timeout,
            session_timeout,
        )
    }

    fn build(
        addresses: Vec<String>,
        timeout: Duration,
        attempt_timeout: Duration,
        session_timeout: Duration,
    ) -> MetaClient {
        MetaClient {
            inner: Arc::new(Inner {
                addresses,
                timeout,
                attempt_timeout,
                session_timeout,
                state: Mutex::new(State {
                    channels: HashMap::new(),
                    leader: None,
                    learned: Vec::new(),
                    terms: HashMap::new(),
                }),
                session: Mutex::new(Session::new()),
                keepalive_started: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Ends this client's session at once (instead of letting it expire):
    /// what it kept open after unlink is released and its replies dropped.
    /// For short-lived clients (the CLI) as they exit; errors are ignored.
    pub async fn close(&self) {
        let started = self.inner.keepalive_started.load(std::sync::atomic::Ordering::Acquire);
        let used = lock(&lock(&self.inner.session).seqs).next > 1;
        if started || used {
            let _ = self
                .call_mut(|mut c, hdr| async move {
                    c.keep_alive(rpc::KeepAliveRequest {
                        hdr: Some(hdr),
                        close: true,
                    })
                    .await
                })
                .await;
        }
    }

    /// Renews the session every third of its timeout while this client
    /// lives, so an idle mount keeps it (a call also renews it).
    fn start_keepalive(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.keepalive_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.session_timeout / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let client = MetaClient { inner };
                let r = client
                    .call_mut(|mut c, hdr| async move {
                        c.keep_alive(rpc::KeepAliveRequest {
                            hdr: Some(hdr),
                            close: false,
                        })
                        .await
                    })
                    .await;
                if let Err(e) = r {
                    tracing::debug!("metad session keepalive failed: {e}");
                }
            }
        });
    }

    pub fn addresses(&self) -> &[String] {
        &self.inner.addresses
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The id of the current session (a new one after an expiry).
    pub fn client_id(&self) -> u64 {
        lock(&self.inner.session).client_id
    }

    /// The address currently believed to be the leader, if any.
    pub fn leader(&self) -> Option<String> {
        lock(&self.inner.state).leader.clone()
    }

    /// Asks one node for its own view (`Status` is answered by followers
    /// too). No retry, no leader following; bounded by `timeout`.
    pub async fn status_of(addr: &str, timeout: Duration) -> FsResult<NodeStatus> {
        let ch = jfs_common::tls::channel(endpoint(addr)?.timeout(timeout), jfs_common::tls::Role::Metad);
        let fut = async move { stub(ch).status(rpc::StatusRequest::default()).await };
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
        if tokio::runtime::Handle::try_current().is_ok() {
            self.start_keepalive();
        }
        let session = lock(&self.inner.session).clone();
        let seq = {
            let mut s = lock(&session.seqs);
            let seq = s.next;
            s.next += 1;
            s.in_flight.insert(seq);
            seq
        };
        let _guard = SeqGuard {
            session: session.clone(),
            seq,
        };
        let session_timeout_ms = self.inner.session_timeout.as_millis() as u64;
        let result = self
            .retry_loop(|c| {
                f(
                    c,
                    ReqHeader {
                        client_id: session.client_id,
                        seq,
                        acked_below: session.acked_below(),
                        session_timeout_ms,
                    },
                )
            })
            .await;
        if let Err(FsError::SessionExpired) = &result {
            // Later calls go out under a fresh identity; this one fails:
            // whether it took effect cannot be known any more.
            let mut cur = lock(&self.inner.session);
            if Arc::ptr_eq(&cur, &session) {
                tracing::warn!(
                    client_id = session.client_id,
                    "metad says this client's session expired (silent longer than its session timeout); \
                     continuing with a new one"
                );
                *cur = Session::new();
            }
        }
        result
    }

    async fn retry_loop<T, F, Fut>(&self, mut attempt: F) -> FsResult<T>
    where
        F: FnMut(MetaGrpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut failures: u32 = 0;
        let _in_flight = InFlight::enter("jfs_client_meta_calls_in_flight");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (addr, ch) = match self.pick(left).await? {
                Some(picked) => picked,
                None => {
                    // Nobody leads (an election is under way, or quorum is
                    // lost): ask again soon, but not in a tight loop.
                    failures += 1;
                    if Instant::now() >= deadline {
                        return Err(FsError::Unavailable(format!(
                            "no metad leader answered within {:?}; check `jfs metastatus`",
                            self.inner.timeout
                        )));
                    }
                    let pause = Duration::from_millis((25u64 << failures.min(3)).min(200));
                    tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
                    continue;
                }
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = tokio::select! {
                r = tokio::time::timeout(remaining.min(self.inner.attempt_timeout), attempt(stub(ch))) => match r {
                    Ok(Ok(reply)) => {
                        self.note_leader(&addr);
                        return Ok(reply.into_inner());
                    }
                    Ok(Err(st)) => FsError::from(st),
                    Err(_) => FsError::Unavailable(format!("metad at {addr} did not answer in time")),
                },
                moved = self.watch_for_new_leader(&addr) => {
                    // Another node leads in a newer term: the one we wait on
                    // is paused, cut off or deposed. The call goes again to
                    // the new leader with the same sequence number, so it
                    // takes effect once even if the old one had applied it.
                    tracing::debug!(old = %addr, new = %moved, "metad leader moved while a call waited; retrying there");
                    lock(&self.inner.state).leader = Some(moved);
                    continue;
                }
            };
            let err = outcome;
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
            // (A failed leader is replaced by asking every node, in `pick`.)
            if !hinted {
                let base_ms = (10u64 << failures.min(5)).min(300);
                let jitter = rand::thread_rng().gen_range(0..=base_ms / 2);
                let sleep = Duration::from_millis(base_ms + jitter);
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(sleep.min(left)).await;
            }
        }
    }

    /// The address and channel to try next: the known leader, else whoever
    /// claims leadership in the newest term when every node is asked at
    /// once; `None` when nobody does (yet).
    async fn pick(&self, left: Duration) -> FsResult<Option<(String, Channel)>> {
        let known = lock(&self.inner.state).leader.clone();
        let addr = match known {
            Some(a) => a,
            None => match self.discover(left.min(PROBE_TIMEOUT), None).await? {
                Some((a, _)) => {
                    lock(&self.inner.state).leader = Some(a.clone());
                    a
                }
                None => return Ok(None),
            },
        };
        Ok(Some((addr.clone(), self.channel(&addr)?)))
    }

    fn channel(&self, addr: &str) -> FsResult<Channel> {
        let mut st = lock(&self.inner.state);
        if let Some(ch) = st.channels.get(addr) {
            return Ok(ch.clone());
        }
        let ch = jfs_common::tls::channel(endpoint(addr)?, jfs_common::tls::Role::Metad);
        st.channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Every address we know: the configured ones and members the cluster
    /// told us about (a node added after this client started).
    fn known_addresses(&self) -> Vec<String> {
        let st = lock(&self.inner.state);
        let mut v = self.inner.addresses.clone();
        for a in &st.learned {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        v
    }

    /// Asks every known node (but `skip`) for its status at once and returns
    /// the one that claims leadership in the newest term, with that term.
    /// Learns member addresses from the answers.
    async fn discover(&self, timeout: Duration, skip: Option<&str>) -> FsResult<Option<(String, u64)>> {
        let addrs: Vec<String> = self
            .known_addresses()
            .into_iter()
            .filter(|a| Some(a.as_str()) != skip)
            .collect();
        if addrs.is_empty() && skip.is_none() {
            return Err(FsError::InvalidArgument("no metad address is configured".into()));
        }
        let mut asks = Vec::with_capacity(addrs.len());
        for a in addrs {
            let ch = self.channel(&a)?;
            asks.push(async move {
                let r = tokio::time::timeout(timeout, stub(ch).status(rpc::StatusRequest::default())).await;
                (a, r)
            });
        }
        let mut best: Option<(String, u64)> = None;
        let mut learned = Vec::new();
        for (addr, r) in futures::future::join_all(asks).await {
            let Ok(Ok(st)) = r else { continue };
            let st = st.into_inner();
            learned.extend(st.members.iter().cloned());
            if st.role == "leader" && best.as_ref().is_none_or(|(_, t)| st.term > *t) {
                best = Some((addr, st.term));
            }
        }
        let mut st = lock(&self.inner.state);
        for a in learned {
            if !a.is_empty() && !self.inner.addresses.contains(&a) && !st.learned.contains(&a) {
                st.learned.push(a);
            }
        }
        if let Some((a, t)) = &best {
            st.terms.insert(a.clone(), *t);
        }
        Ok(best)
    }

    /// Resolves once a node other than `addr` leads in a newer term than the
    /// one `addr` was last seen leading. Starts looking only after the call
    /// has waited `HEDGE_AFTER`, so a healthy leader costs nothing.
    async fn watch_for_new_leader(&self, addr: &str) -> String {
        tokio::time::sleep(HEDGE_AFTER).await;
        loop {
            let seen = lock(&self.inner.state).terms.get(addr).copied().unwrap_or(0);
            if let Ok(Some((other, term))) = self.discover(PROBE_TIMEOUT, Some(addr)).await {
                if term > seen {
                    return other;
                }
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
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
                }
                false
            }
        }
    }
}

/// Counts a call in a gauge for as long as it runs, however it ends
/// (returned, failed, or dropped by a caller that gave up).
pub(crate) struct InFlight(metrics::Gauge);

impl InFlight {
    pub(crate) fn enter(name: &'static str) -> InFlight {
        let g = metrics::gauge!(name);
        g.increment(1.0);
        InFlight(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
