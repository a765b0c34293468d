//! Transport security: mutual TLS on every jfs connection, and who may call what.
//!
//! With `security.tls.enabled = true` every server (metad's client and Raft
//! ports, blockd) accepts only TLS 1.3 connections whose client presents a
//! certificate signed by the cluster CA, and every jfs process dials with its
//! own certificate. A certificate names one role (`metad`, `blockd`,
//! `client`, `admin`) as the DNS name `<role>.jfs` and its holder as the
//! subject's common name; [`allowed_roles`] is the one table of which role
//! may call which RPC. Servers are checked the same way in the other
//! direction: a client dialling a metad accepts only a `metad.jfs`
//! certificate from the cluster CA, so a stolen client key cannot pose as a
//! metad.
//!
//! All the files live in one directory (`security.tls.dir`): `ca.crt`, and
//! `<role>.crt` / `<role>.key` for each role this host runs. Certificates and
//! keys are re-read when their files change (checked at most once a second,
//! at a handshake), so rotation needs no restart; connections already open
//! keep the certificate they were made with.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// What a certificate allows its holder to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A metadata node: Raft, and the calls metads make to each other.
    Metad,
    /// A storage daemon: heartbeats and block reports, copies between blockds.
    Blockd,
    /// A mount (or any program using the client library): namespace operations and block IO.
    Client,
    /// An operator's CLI: everything a client may do, plus cluster administration.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Metad, Role::Blockd, Role::Client, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Metad => "metad",
            Role::Blockd => "blockd",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }

    /// The DNS subject-alternative name that marks a certificate with this role.
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Metad => "metad.jfs",
            Role::Blockd => "blockd.jfs",
            Role::Client => "client.jfs",
            Role::Admin => "admin.jfs",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of a server connection, from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// The certificate's common name (`jfs admin cert issue --name`).
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    Bad { path: PathBuf, what: String },
    #[error(
        "{}: private key is readable by other users (mode {mode:o}); run `chmod 600 {}` \
         (jfs refuses keys others can read)",
        path.display(), path.display()
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// The files of one TLS directory.
#[derive(Clone, Debug)]
pub struct TlsDir {
    dir: PathBuf,
}

impl TlsDir {
    pub fn new(dir: impl Into<PathBuf>) -> TlsDir {
        TlsDir { dir: dir.into() }
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn cert(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.crt", role.as_str()))
    }
    pub fn key(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.key", role.as_str()))
    }
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        // Bulk ciphers from ring, the rest (key exchange, signatures,
        // randomness) from aws-lc-rs. ring's AES-GCM uses VAES with AVX2
        // where the CPU has it (AMD Zen 3+, Intel Ice Lake+); aws-lc-rs
        // only has the AVX-512 variant, so on AVX2-only hosts ring seals
        // about twice as fast (4.5–5.9 against 2.2–2.5 GB/s per core on the
        // benchmark machine), and block data is most of what these
        // connections carry. Without VAES both use the same AES-NI code.
        // AES-128 first (rustls lists AES-256 first): with AES-NI it costs
        // about a third less CPU per byte, and both ends are ours.
        use rustls::crypto::ring::cipher_suite as ring_suites;
        p.cipher_suites = vec![
            ring_suites::TLS13_AES_128_GCM_SHA256,
            ring_suites::TLS13_AES_256_GCM_SHA384,
            ring_suites::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        Arc::new(p)
    })
    .clone()
}

/// Makes aws-lc-rs the process's rustls provider. The table-store client
/// links rustls too; with more than one provider compiled in, rustls cannot
/// pick one and panics at the first handshake, so every daemon calls this
/// at start-up.
pub fn install_crypto_provider() {
    // Err means one is installed already (a second call): nothing to do.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Bad {
            path: path.into(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Bad {
            path: path.into(),
            what: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// Refuses a key file that anyone but its owner can read or write, as ssh does.
pub fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::LoosePermissions {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_key_permissions(path)?;
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Bad {
        path: path.into(),
        what: format!("not a PEM private key: {e}"),
    })
}

/// Role and name of a certificate, as [`Role::dns_name`] and the common name mark them.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, x) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| format!("unparsable certificate: {e}"))?;
    let name = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let san = x
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName, so no jfs role")?;
    let mut roles = san.value.general_names.iter().filter_map(|g| match g {
        x509_parser::extensions::GeneralName::DNSName(d) => Role::ALL.into_iter().find(|r| r.dns_name() == *d),
        _ => None,
    });
    let role = roles
        .next()
        .ok_or("certificate names no jfs role (metad.jfs, blockd.jfs, client.jfs or admin.jfs)")?;
    if roles.next().is_some() {
        return Err("certificate names more than one jfs role".into());
    }
    Ok(Identity { role, name })
}

/// Seconds until the certificate expires (negative when it has).
pub fn seconds_to_expiry(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(x.validity().not_after.timestamp() - now)
}

fn root_store(dir: &TlsDir) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let path = dir.ca_cert();
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&path)? {
        roots.add(c).map_err(|e| TlsError::Bad {
            path: path.clone(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// This process's own certificate and key for one role, re-read when the
/// files change (rotation). A half-written pair (a new certificate beside
/// the old key) is not taken until both match.
struct OwnKey {
    cert_path: PathBuf,
    key_path: PathBuf,
    state: Mutex<OwnKeyState>,
}

struct OwnKeyState {
    checked: Instant,
    stamp: (Option<SystemTime>, Option<SystemTime>),
    current: Arc<CertifiedKey>,
}

const RELOAD_CHECK: Duration = Duration::from_secs(1);

impl OwnKey {
    fn load(dir: &TlsDir, role: Role) -> Result<OwnKey, TlsError> {
        let cert_path = dir.cert(role);
        let key_path = dir.key(role);
        let stamp = (mtime(&cert_path), mtime(&key_path));
        let current = Arc::new(Self::read(&cert_path, &key_path, role)?);
        Ok(OwnKey {
            cert_path,
            key_path,
            state: Mutex::new(OwnKeyState {
                checked: Instant::now(),
                stamp,
                current,
            }),
        })
    }

    fn read(cert_path: &Path, key_path: &Path, role: Role) -> Result<CertifiedKey, TlsError> {
        let chain = load_certs(cert_path)?;
        let id = identity_of(&chain[0]).map_err(|what| TlsError::Bad {
            path: cert_path.into(),
            what,
        })?;
        if id.role != role {
            return Err(TlsError::Bad {
                path: cert_path.into(),
                what: format!(
                    "is a {} certificate; this process needs a {role} one (jfs admin cert issue --role {role})",
                    id.role
                ),
            });
        }
        if let Some(left) = seconds_to_expiry(&chain[0]) {
            if left <= 0 {
                tracing::error!(cert = %cert_path.display(), "this certificate has expired; peers will refuse it: issue a new one");
            } else if left < 14 * 86_400 {
                tracing::warn!(cert = %cert_path.display(), days = left / 86_400, "certificate expires soon: issue a new one");
            }
        }
        let key = load_key(key_path)?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Bad {
            path: key_path.into(),
            what: format!("does not match {} or is not usable: {e}", cert_path.display()),
        })
    }

    fn current(&self, role: Role) -> Arc<CertifiedKey> {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if st.checked.elapsed() >= RELOAD_CHECK {
            st.checked = Instant::now();
            let stamp = (mtime(&self.cert_path), mtime(&self.key_path));
            if stamp != st.stamp {
                match Self::read(&self.cert_path, &self.key_path, role) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert_path.display(), "loaded a new certificate");
                        st.current = Arc::new(k);
                        st.stamp = stamp;
                    }
                    // Most likely the pair is being replaced: keep serving
                    // with the old one and look again at the next check.
                    Err(e) => tracing::warn!("keeping the current certificate: {e}"),
                }
            }
        }
        st.current.clone()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

struct ServerKey(OwnKey, Role);
struct ClientKey(OwnKey, Role);

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerKey({})", self.0.cert_path.display())
    }
}
impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", self.0.cert_path.display())
    }
}

impl rustls::server::ResolvesServerCert for ServerKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current(self.1))
    }
}

impl rustls::client::ResolvesClientCert for ClientKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current(self.1))
    }
    fn has_certs(&self) -> bool {
        true
    }
}

const ALPN_H2: &[u8] = b"h2";

/// The server side: accepts only clients with a certificate from the cluster CA.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl ServerTls {
    pub fn load(dir: &TlsDir, role: Role) -> Result<ServerTls, TlsError> {
        let p = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(root_store(dir)?, p.clone())
            .build()
            .map_err(|e| TlsError::Setup(format!("client verifier: {e}")))?;
        let key = ServerKey(OwnKey::load(dir, role)?, role);
        let mut cfg = rustls::ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(key));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }
}

/// The client side: this process's certificate, and the CA servers must chain to.
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    pub fn load(dir: &TlsDir, role: Role) -> Result<ClientTls, TlsError> {
        let key = ClientKey(OwnKey::load(dir, role)?, role);
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(root_store(dir)?)
            .with_client_cert_resolver(Arc::new(key));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls { config: Arc::new(cfg) })
    }
}

/// How this process dials: set once at start-up by [`init_client`].
static CLIENT: OnceLock<Option<Arc<ClientTls>>> = OnceLock::new();

/// Loads this process's client certificate for `role` when `cfg` turns TLS
/// on; channels made afterwards by [`channel`] and [`connect`] use it. A
/// process that never calls this dials in plaintext.
pub fn init_client(cfg: &crate::config::Config, role: Role) -> Result<(), TlsError> {
    install_crypto_provider();
    let tls = if cfg.tls_enabled {
        Some(Arc::new(ClientTls::load(&TlsDir::new(&cfg.tls_dir), role)?))
    } else {
        None
    };
    // A second call keeps the first setting: one identity per process.
    let _ = CLIENT.set(tls);
    Ok(())
}

/// Whether this process dials with TLS.
pub fn client_enabled() -> bool {
    matches!(CLIENT.get(), Some(Some(_)))
}

/// Loads the server side for `role` when `cfg` turns TLS on.
pub fn server_for(cfg: &crate::config::Config, role: Role) -> Result<Option<ServerTls>, TlsError> {
    install_crypto_provider();
    if !cfg.tls_enabled {
        return Ok(None);
    }
    ServerTls::load(&TlsDir::new(&cfg.tls_dir), role).map(Some)
}

/// A channel to a server of role `server` that connects on first use.
pub fn channel(ep: tonic::transport::Endpoint, server: Role) -> tonic::transport::Channel {
    match CLIENT.get() {
        Some(Some(tls)) => ep.connect_with_connector_lazy(Connector::new(tls, server)),
        _ => ep.connect_lazy(),
    }
}

/// A channel to a server of role `server`, connected now.
pub async fn connect(
    ep: tonic::transport::Endpoint,
    server: Role,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    match CLIENT.get() {
        Some(Some(tls)) => ep.connect_with_connector(Connector::new(tls, server)).await,
        _ => ep.connect().await,
    }
}

/// Dials TCP and runs the TLS handshake, expecting the server to hold a
/// certificate for `server_name` (its role's DNS name).
#[derive(Clone)]
struct Connector {
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl Connector {
    fn new(tls: &ClientTls, server: Role) -> Connector {
        Connector {
            tls: tokio_rustls::TlsConnector::from(tls.config.clone()),
            // A static, valid DNS name: this cannot fail.
            server_name: ServerName::try_from(server.dns_name()).expect("role DNS names are valid"),
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A handshake that has not finished in this long is dropped, so a client
/// that connects and says nothing holds no task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a server knows about a connection: its address and, over TLS, who it is.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    pub identity: Option<Arc<Identity>>,
}

/// One accepted connection, plain or TLS.
pub enum ServerConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Arc<Identity>),
}

impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        match self {
            ServerConn::Plain(s) => PeerInfo {
                remote_addr: s.peer_addr().ok(),
                identity: None,
            },
            ServerConn::Tls(s, id) => PeerInfo {
                remote_addr: s.get_ref().0.peer_addr().ok(),
                identity: Some(id.clone()),
            },
        }
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ServerConn::Plain(s) => s.is_write_vectored(),
            ServerConn::Tls(s, _) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConn::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerConn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections a server accepts on `listener`: plain when `tls` is
/// None, otherwise only those that finish a mutual-TLS handshake with a
/// certificate naming a jfs role. Handshakes run concurrently, so a slow or
/// silent client cannot hold up others; refused ones are logged.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    service: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(service, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Ok(ServerConn::Plain(tcp))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_tls(acceptor, tcp)).await {
                            Ok(Ok(conn)) => {
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(e)) => tracing::warn!(service, %peer, "refused a connection: {e}"),
                            Err(_) => {
                                tracing::warn!(service, %peer, "refused a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
                            }
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_tls(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Result<ServerConn, String> {
    let stream = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("client sent no certificate")?;
    let id = identity_of(leaf)?;
    Ok(ServerConn::Tls(Box::new(stream), Arc::new(id)))
}

/// Which roles may call a gRPC method (`/jfs.Meta/Mknod`): the single table
/// of the RPC contract's access rules. Anything not listed is refused.
pub fn allowed_roles(path: &str) -> &'static [Role] {
    use Role::*;
    const ANY: &[Role] = &[Metad, Blockd, Client, Admin];
    const FS: &[Role] = &[Client, Admin];
    const ADMIN: &[Role] = &[Admin];
    const PEER: &[Role] = &[Metad];
    const BLOCKD: &[Role] = &[Blockd];
    const BLOCK_IO: &[Role] = &[Client, Admin, Blockd];
    const JOIN: &[Role] = &[Metad, Admin];
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return &[];
    };
    match (service, method) {
        ("jfs.Raft", "AppendEntries" | "Vote" | "InstallSnapshot") => PEER,
        ("jfs.Block", "WriteBlock" | "ReadBlock" | "ReadRange") => BLOCK_IO,
        ("jfs.Meta", m) => match m {
            "Status" => ANY,
            "Campaign" => PEER,
            // A node joining with `--join` asks the cluster to add it.
            "AddMember" => JOIN,
            "Heartbeat" | "BlockReport" => BLOCKD,
            "CreateNamespace" | "SetBlockdState" | "Fsck" | "SetReplication" | "RemoveMember" | "TransferLeader"
            | "RecoveryFinish" | "MirrorVerify" | "SetNamespaceAccess" => ADMIN,
            "ListBlockds" => &[Client, Admin],
            "GetNamespace" | "ListNamespaces" | "Lookup" | "GetAttr" | "SetAttr" | "Mknod" | "Symlink" | "Link"
            | "Unlink" | "Rmdir" | "Rename" | "ReleaseOrphan" | "ReadDir" | "ReadLink" | "SetXattr" | "GetXattr"
            | "ListXattr" | "RemoveXattr" | "StatFs" | "AllocateBlocks" | "GetChunks" | "CommitSlices"
            | "CompactChunk" | "AbandonBlocks" | "Fallocate" | "KeepAlive" | "SetLock" | "GetLock" => FS,
            _ => &[],
        },
        _ => &[],
    }
}

/// Refuses, on a TLS server, every call whose caller's role may not make
/// it ([`allowed_roles`]), and hands the caller's [`Identity`] to the
/// handler through the request's extensions. On a plaintext server it does
/// nothing.
#[derive(Clone, Copy, Debug)]
pub struct AuthLayer {
    enabled: bool,
}

impl AuthLayer {
    pub fn new(enabled: bool) -> AuthLayer {
        AuthLayer { enabled }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            enabled: self.enabled,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    enabled: bool,
}

/// Why a call is refused, or None when it may go on.
pub fn refusal(path: &str, peer: Option<&PeerInfo>) -> Option<String> {
    let Some(id) = peer.and_then(|p| p.identity.as_deref()) else {
        return Some("this server requires a TLS client certificate from the cluster CA".into());
    };
    if allowed_roles(path).contains(&id.role) {
        return None;
    }
    Some(format!(
        "a {} certificate ({:?}) may not call {path}; use a certificate with the right role \
         (jfs admin cert issue --role ...)",
        id.role, id.name
    ))
}

impl<S, B> tower_service::Service<http::Request<B>> for Auth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.enabled {
            let peer = req.extensions().get::<PeerInfo>();
            if let Some(why) = refusal(req.uri().path(), peer) {
                let status: tonic::Status = crate::FsError::AccessDenied(why).into();
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
            if let Some(id) = peer.and_then(|p| p.identity.clone()) {
                req.extensions_mut().insert(id);
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// The caller's identity inside a handler (None on a plaintext server).
pub fn caller<T>(req: &tonic::Request<T>) -> Option<Arc<Identity>> {
    req.extensions().get::<Arc<Identity>>().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first() {
        let p = provider();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert!(p.cipher_suites.len() > 1, "the other suites stay available");
    }

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn raft_is_for_metads_only() {
        for m in ["AppendEntries", "Vote", "InstallSnapshot"] {
            assert_eq!(allowed_roles(&format!("/jfs.Raft/{m}")), &[Role::Metad]);
        }
    }

    #[test]
    fn blockd_cannot_create_files_and_client_cannot_administer() {
        assert!(!allowed_roles("/jfs.Meta/Mknod").contains(&Role::Blockd));
        assert!(!allowed_roles("/jfs.Meta/Mknod").contains(&Role::Metad));
        assert!(allowed_roles("/jfs.Meta/Mknod").contains(&Role::Client));
        assert!(!allowed_roles("/jfs.Meta/AddMember").contains(&Role::Client));
        assert!(!allowed_roles("/jfs.Meta/CreateNamespace").contains(&Role::Client));
        assert!(!allowed_roles("/jfs.Meta/Heartbeat").contains(&Role::Client));
    }

    #[test]
    fn unknown_paths_are_refused() {
        for p in [
            "",
            "/",
            "/jfs.Meta/",
            "/jfs.Meta/Nope",
            "/other.Svc/Mknod",
            "jfs.Meta/Mknod",
        ] {
            assert!(allowed_roles(p).is_empty(), "{p}");
        }
    }

    #[test]
    fn a_call_without_identity_is_refused() {
        assert!(refusal("/jfs.Meta/Status", None).is_some());
        let peer = PeerInfo {
            remote_addr: None,
            identity: Some(Arc::new(Identity {
                role: Role::Client,
                name: "m1".into(),
            })),
        };
        assert!(refusal("/jfs.Meta/Status", Some(&peer)).is_none());
        let why = refusal("/jfs.Raft/Vote", Some(&peer)).unwrap();
        assert!(
            why.contains("client certificate") && why.contains("/jfs.Raft/Vote"),
            "{why}"
        );
    }

    #[test]
    fn loose_key_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_key_permissions(&p).unwrap_err();
        assert!(matches!(e, TlsError::LoosePermissions { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_key_permissions(&p).unwrap();
    }
}
