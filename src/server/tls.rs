//! The mTLS transport: a rustls server that requires a client certificate
//! chaining to the configured CA, and an accept loop that hands tonic only
//! finished, identified connections.
//!
//! Handshakes run concurrently and under a timeout, so a client that opens a
//! socket and stalls cannot hold up anyone else's accept. The peer's identity
//! is derived once per connection, here, and travels with every request on it
//! as [`Peer`]. The mesh-mode listener ([`mesh_incoming`]) yields the same
//! [`Connection`] type, so one gRPC server serves both.

use std::{
    io,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::{danger::ClientCertVerifier, WebPkiClientVerifier},
    RootCertStore, ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::auth::{AuthError, Authenticator, Identity, Peer};

/// Why TLS material could not be loaded. Names the file, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("tls configuration: {0}")]
    Config(String),
}

/// Installs ring as the process's rustls provider (idempotent). Every rustls
/// user in the process (server, reqwest, test clients) then agrees. Called
/// once at start: by the assembly, and by the CLI before any client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn file_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| file_error(path, "not a PEM certificate file"))?;
    if certs.is_empty() {
        return Err(file_error(path, "contains no certificate"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?,
    );
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|_| file_error(path, "not a PEM private key file"))?
        .ok_or_else(|| file_error(path, "contains no private key"))
}

/// The server's rustls configuration: TLS 1.2+, h2 only, client certificate
/// required and verified against `client_ca`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in load_certs(client_ca)? {
        roots
            .add(ca)
            .map_err(|e| file_error(client_ca, format!("unusable CA certificate: {e}")))?;
    }
    // Required client auth: the builder rejects anonymous clients by default.
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_error(key, format!("does not match the certificate: {e}")))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server's TLS configuration, replaceable while the server runs: new
/// handshakes use the newest one; established connections keep theirs.
#[derive(Clone)]
pub struct SharedServerConfig(Arc<std::sync::RwLock<Arc<ServerConfig>>>);

impl SharedServerConfig {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(config)))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

/// An accepted connection: mTLS with the identity of its certificate, or a
/// plaintext mesh-mode connection from the local sidecar.
pub enum Connection {
    Tls {
        stream: Box<TlsStream<TcpStream>>,
        peer: Peer,
    },
    Mesh {
        stream: TcpStream,
        peer: Peer,
    },
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Self::Tls { peer, .. } | Self::Mesh { peer, .. } => peer.clone(),
        }
    }
}

/// Plaintext connections from the mesh sidecar (mesh mode only). Callers'
/// identities come from the sidecar's `x-forwarded-client-cert` header.
pub fn mesh_incoming(
    listener: TcpListener,
    vault_identity: Arc<str>,
    sidecar_secret: Option<Arc<crate::secret::SecretString>>,
) -> impl tokio_stream::Stream<Item = Result<Connection, io::Error>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        move |accepted| {
            accepted.map(|stream| {
                let _ = stream.set_nodelay(true);
                Connection::Mesh {
                    stream,
                    peer: Peer::Mesh {
                        vault_identity: Arc::clone(&vault_identity),
                        sidecar_secret: sidecar_secret.clone(),
                    },
                }
            })
        },
    )
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            Connection::Tls { stream, .. } => {
                let $stream = Pin::new(stream.as_mut());
                $call
            }
            Connection::Mesh { stream, .. } => {
                let $stream = Pin::new(stream);
                $call
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Tls { stream, .. } => stream.is_write_vectored(),
            Connection::Mesh { stream, .. } => stream.is_write_vectored(),
        }
    }
}

/// Per-trust-domain CA bundles (the SPIFFE bundle model). The handshake
/// verifies a client against the union of every CA (`tls.client_ca`); with
/// bundles configured, a SPIFFE identity is accepted only if its chain also
/// verifies against its own trust domain's bundle, so in a federated bundle
/// no CA can mint another domain's identities.
#[derive(Clone, Default)]
pub struct TrustBundles(Arc<HashMap<String, Arc<dyn ClientCertVerifier>>>);

impl TrustBundles {
    /// Loads `trust domain -> CA bundle file` (blocking: file reads).
    pub fn load(bundles: &BTreeMap<String, PathBuf>) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut verifiers = HashMap::new();
        for (domain, path) in bundles {
            let mut roots = RootCertStore::empty();
            for ca in load_certs(path)? {
                roots
                    .add(ca)
                    .map_err(|e| file_error(path, format!("unusable CA certificate: {e}")))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| TlsError::Config(format!("trust bundle {domain}: {e}")))?;
            verifiers.insert(domain.clone(), verifier);
        }
        Ok(Self(Arc::new(verifiers)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `identity`, presented with `chain`, is vouched for by its own
    /// trust domain's bundle (always, when no bundles are configured).
    fn admits(&self, identity: &Identity, chain: &[CertificateDer<'_>]) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let (Identity::Spiffe(id), Some((leaf, intermediates))) = (identity, chain.split_first())
        else {
            // A common-name identity belongs to no trust domain.
            return false;
        };
        self.0.get(id.trust_domain()).is_some_and(|verifier| {
            verifier
                .verify_client_cert(leaf, intermediates, UnixTime::now())
                .is_ok()
        })
    }
}

/// How the accept loop bounds handshakes.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeLimits {
    /// A client that has not finished its handshake by then is dropped.
    pub timeout: Duration,
    /// Handshakes running at once; further connections wait in the
    /// listener's backlog until one finishes.
    pub concurrent: usize,
}

/// Accepts TCP connections, runs their handshakes concurrently (at most
/// `limits.concurrent` at once), and yields the ones that complete. The loop
/// ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: SharedServerConfig,
    auth: Arc<Authenticator>,
    trust: TrustBundles,
    limits: HandshakeLimits,
) -> ReceiverStream<Result<Connection, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.concurrent.max(1)));
    let handshake_timeout = limits.timeout;
    tokio::spawn(async move {
        loop {
            // Wait for a handshake slot before accepting: a flood of stalled
            // clients then queues in the kernel, not in spawned tasks.
            let permit = tokio::select! {
                permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = tx.closed() => break,
            };
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.current());
            let (auth, tx, trust) = (Arc::clone(&auth), tx.clone(), trust.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let peer = identify(&stream, &auth, &trust, remote);
                        let _ = tx
                            .send(Ok(Connection::Tls {
                                stream: Box::new(stream),
                                peer,
                            }))
                            .await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%remote, %error, "tls handshake failed");
                    }
                    Err(_) => tracing::debug!(%remote, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn identify(
    stream: &TlsStream<TcpStream>,
    auth: &Authenticator,
    trust: &TrustBundles,
    remote: SocketAddr,
) -> Peer {
    let (_, session) = stream.get_ref();
    let chain = session.peer_certificates().unwrap_or_default();
    let leaf = chain.first().map(|cert| cert.as_ref());
    let identity = auth.identify(leaf).and_then(|identity| {
        if trust.admits(&identity, chain) {
            Ok(identity)
        } else {
            Err(AuthError::UntrustedDomain {
                identity: identity.to_string(),
            })
        }
    });
    if let Err(error) = &identity {
        tracing::info!(%remote, %error, "peer certificate names no usable identity");
    }
    Peer::tls(identity)
}
