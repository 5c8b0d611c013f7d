//! What every in-process scenario shares: the real vault (`server::run` on
//! 127.0.0.1:0, exactly as the integration tests start it), a bare tonic
//! "echo" server beside it behind the same TLS configuration and accept loop,
//! the OAuth provider double, and pools of mTLS client connections.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use credvault::{
    api::pb::{self, credential_vault_client::CredentialVaultClient},
    auth::{Authenticator, IdentityRules, Policy},
    server::tls,
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    service::Routes,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server},
};
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    provider::ProviderDouble,
    vault::{self, TestVault, VaultDir},
};

pub const CLIENT_ID: &str = "bench-client";
pub const CLIENT_SECRET: &str = "bench-client-secret";
pub const TENANT: &str = "acme";
pub const PROVIDER: &str = "demo";

/// The in-process system under test.
pub struct Bench {
    pub dir: VaultDir,
    pub vault: TestVault,
    pub echo_addr: SocketAddr,
    pub provider: ProviderDouble,
    _echo_reporter: tonic_health::server::HealthReporter,
    _echo_stop: oneshot::Sender<()>,
}

impl Bench {
    pub async fn start() -> Self {
        tls::install_crypto_provider();
        let dir = VaultDir::new();
        // Every bench client is one identity (admin); the per-identity
        // in-flight cap (half the global one by default) would shed the
        // 1000-caller burst, which measures single-flight, not fairness.
        let path = dir.path().join("credvault.toml");
        let config = std::fs::read_to_string(&path)
            .expect("bench config")
            .replace(
                "shutdown_grace = \"5s\"",
                "shutdown_grace = \"5s\"\nmax_calls_per_identity = 1024",
            );
        std::fs::write(&path, config).expect("bench config");
        let vault = TestVault::start(&dir).await;
        let (echo_addr, reporter, stop) = start_echo(&dir).await;
        let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
        Self {
            dir,
            vault,
            echo_addr,
            provider,
            _echo_reporter: reporter,
            _echo_stop: stop,
        }
    }

    /// `n` CredentialVault clients of the main vault.
    pub async fn vault_clients(&self, n: usize) -> Vec<CredentialVaultClient<Channel>> {
        vault_clients(&self.dir, self.vault.addr, n).await
    }

    /// `n` Health clients of the vault's own server, each on its own
    /// connection.
    pub async fn vault_health_clients(&self, n: usize) -> Vec<HealthClient<Channel>> {
        health_clients(&self.dir, self.vault.addr, n).await
    }

    /// `n` Health clients of the echo server, each on its own connection.
    pub async fn echo_clients(&self, n: usize) -> Vec<HealthClient<Channel>> {
        health_clients(&self.dir, self.echo_addr, n).await
    }

    /// A Deposit of a refresh-token grant at the provider double, with an
    /// access token that expires at `expires_at`.
    pub fn deposit_request(
        &self,
        subject: &str,
        refresh_token: &str,
        expires_at: SystemTime,
    ) -> pb::DepositRequest {
        deposit_request(
            &self.provider.token_url(),
            subject,
            refresh_token,
            expires_at,
        )
    }
}

/// A Deposit of a refresh-token grant for the client at `token_url`, with an
/// access token that expires at `expires_at`.
pub fn deposit_request(
    token_url: &str,
    subject: &str,
    refresh_token: &str,
    expires_at: SystemTime,
) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: vault::reference(TENANT, subject, PROVIDER),
        client: vault::oauth_client(token_url, CLIENT_ID, CLIENT_SECRET),
        grant: vault::refresh_grant(refresh_token, Some(("bench-access-token", expires_at))),
        labels: Default::default(),
    }
}

fn admin(dir: &VaultDir) -> (&str, &str, &str) {
    let cert = &dir.pki.clients["admin"];
    (dir.pki.ca.ca_cert_pem(), &cert.cert_pem, &cert.key_pem)
}

/// `n` CredentialVault clients of the vault at `addr` (whose PKI is `dir`'s),
/// each on its own mTLS connection, as the admin identity (all tenants).
pub async fn vault_clients(
    dir: &VaultDir,
    addr: SocketAddr,
    n: usize,
) -> Vec<CredentialVaultClient<Channel>> {
    let (ca, cert, key) = admin(dir);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(CredentialVaultClient::new(
            connect(addr, ca, cert, key).await,
        ));
    }
    out
}

/// `n` Health clients of a bare server at `addr` (whose PKI is `dir`'s),
/// each on its own mTLS connection.
pub async fn health_clients(
    dir: &VaultDir,
    addr: SocketAddr,
    n: usize,
) -> Vec<HealthClient<Channel>> {
    let (ca, cert, key) = admin(dir);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(HealthClient::new(connect(addr, ca, cert, key).await));
    }
    out
}

/// How long a call may take before the harness calls it stalled. Far above
/// any healthy latency here; well below the server's 30 s request timeout.
pub const STALL: Duration = Duration::from_secs(5);

/// Runs one call under [`STALL`]; errors and stalls become a message.
pub async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(STALL, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(status)) => Err(status.to_string()),
        Err(_) => Err(format!("stalled: no answer within {} s", STALL.as_secs())),
    }
}

/// An access-token expiry comfortably beyond any run.
pub fn far_future() -> SystemTime {
    SystemTime::now() + Duration::from_secs(30 * 24 * 3600)
}

/// An access-token expiry in the past: the next get must refresh.
pub fn expired() -> SystemTime {
    SystemTime::now() - Duration::from_secs(60)
}

/// An established mTLS connection (handshake done before any measurement).
pub async fn connect(addr: SocketAddr, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert_pem, key_pem));
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("client tls")
        .connect_timeout(Duration::from_secs(120))
        .connect()
        .await
        .expect("connect over mTLS")
}

/// The baseline: `grpc.health.v1.Health/Check` from tonic-health, the
/// cheapest unary RPC at hand, served by a bare tonic server (no timeout
/// layer, no other services) behind the vault's own rustls configuration
/// (`tls::server_config`) and accept loop (`tls::incoming`).
async fn start_echo(
    dir: &VaultDir,
) -> (
    SocketAddr,
    tonic_health::server::HealthReporter,
    oneshot::Sender<()>,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let (addr, stop) = serve_bare(dir, Routes::new(health)).await;
    (addr, reporter, stop)
}

/// Serves `routes` on a bare tonic server behind the vault's TLS
/// configuration and accept loop (see [`start_echo`]); dropping the sender
/// stops it.
pub async fn serve_bare(dir: &VaultDir, routes: Routes) -> (SocketAddr, oneshot::Sender<()>) {
    let config = dir.config();
    let tls_config = tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca)
        .expect("echo tls config");
    let auth = Arc::new(Authenticator::new(
        IdentityRules {
            trust_domain: config.auth.trust_domain.clone(),
            allow_common_name: config.auth.allow_common_name,
        },
        Policy::load(&config.auth.policy).expect("policy"),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let incoming = tls::incoming(
        listener,
        tls::SharedServerConfig::new(tls_config),
        auth,
        tls::TrustBundles::default(),
        tls::HandshakeLimits {
            timeout: config.tls.handshake_timeout,
            concurrent: config.server.max_handshakes,
        },
    );
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
            }),
    );
    (addr, stop)
}
