//! Starts the real credvault server in-process on 127.0.0.1:0 with real mTLS
//! (certificates generated per test), a real sealed keyring and a real sled
//! store, and builds real gRPC clients for it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use credvault::{
    api::pb::{self, credential_vault_client::CredentialVaultClient},
    config::Config,
    crypto::{self, KdfParams, Keyring},
    dev::pki::{CertifiedKey, ClientCertSpec, DevCa},
    secret::SecretString,
    server::{self, Listeners, ServerError},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

pub const PASSPHRASE: &str = "test passphrase, not a secret";
pub const TRUST_DOMAIN: &str = "credvault.test";

/// Certificates for one test: a CA, the server, and named clients.
pub struct TestPki {
    pub ca: DevCa,
    pub server: CertifiedKey,
    pub clients: HashMap<&'static str, CertifiedKey>,
}

impl TestPki {
    pub fn generate() -> Self {
        let ca = DevCa::generate("credvault test CA").unwrap();
        let server = ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let mut clients = HashMap::new();
        for name in ["admin", "acme", "stranger"] {
            let cert = ca
                .issue_client(&ClientCertSpec {
                    uri_sans: vec![format!("spiffe://{TRUST_DOMAIN}/{name}")],
                    ..Default::default()
                })
                .unwrap();
            clients.insert(name, cert);
        }
        Self {
            ca,
            server,
            clients,
        }
    }
}

const POLICY: &str = r#"
[[rule]]
identity = "spiffe://credvault.test/admin"
tenants = ["*"]
actions = ["deposit", "get", "revoke", "admin", "watch", "authorize"]

[[rule]]
identity = "spiffe://credvault.test/acme"
tenants = ["acme"]
actions = ["deposit", "get", "revoke", "watch", "authorize"]
"#;

/// A vault's on-disk home: certificates, keyring, policy, config, data.
pub struct VaultDir {
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    /// The cluster behind the vault when the suite runs on etcd.
    _etcd: Option<super::etcd::EtcdCluster>,
}

/// The backend the suite runs on: `CREDVAULT_TEST_BACKEND=etcd` runs every
/// vault of a test on its own real 3-member etcd cluster (the README's test
/// command runs the broker's rules once per backend: one body, two
/// backends). Anything else: the embedded store.
fn etcd_backend() -> bool {
    std::env::var("CREDVAULT_TEST_BACKEND").is_ok_and(|b| b == "etcd")
}

impl VaultDir {
    pub fn new() -> Self {
        Self::custom("allow_http_loopback = true", "")
    }

    /// A vault that refreshes whenever a call asks for more validity than the
    /// cached token has, even right after a refresh: for tests that drive
    /// rotations with an oversized `min_valid_for`. (By default a refresh
    /// within `tokens.force_refresh_interval` answers such calls instead.)
    pub fn eager_refresh() -> Self {
        Self::custom(
            "allow_http_loopback = true",
            "[tokens]\nforce_refresh_interval = \"0s\"\n",
        )
    }

    /// A vault whose `[upstream]` section is `upstream` and whose config ends
    /// with `extra` (more sections, e.g. `[tokens]` or `[providers.x]`).
    pub fn custom(upstream: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate();
        let p = dir.path();
        // A test that chose its store keeps it.
        let etcd = (etcd_backend() && !extra.contains("[storage]"))
            .then(|| super::etcd::EtcdCluster::start(3));
        let storage = etcd
            .as_ref()
            .map(|cluster| cluster.storage_config("/vault/", "max_staleness = \"1s\""))
            .unwrap_or_default();
        std::fs::write(p.join("ca.pem"), pki.ca.ca_cert_pem()).unwrap();
        std::fs::write(p.join("server.pem"), &pki.server.cert_pem).unwrap();
        std::fs::write(p.join("server-key.pem"), &pki.server.key_pem).unwrap();
        std::fs::write(p.join("policy.toml"), POLICY).unwrap();
        std::fs::write(p.join("keyring.passphrase"), PASSPHRASE).unwrap();
        write_keyring(&p.join("keyring.cvk"), &Keyring::generate());
        std::fs::write(
            p.join("credvault.toml"),
            format!(
                r#"
data_dir = "data"
[tls]
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"
[keyring]
path = "keyring.cvk"
passphrase_file = "keyring.passphrase"
[auth]
policy = "policy.toml"
trust_domain = "{TRUST_DOMAIN}"
[server]
shutdown_grace = "5s"
[upstream]
request_timeout = "3s"
{upstream}
{extra}
{storage}
"#
            ),
        )
        .unwrap();
        Self {
            dir,
            pki,
            _etcd: etcd,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn keyring_path(&self) -> PathBuf {
        self.path().join("keyring.cvk")
    }

    pub fn config(&self) -> Config {
        Config::load(&self.path().join("credvault.toml")).unwrap()
    }

    /// Replaces `line` of the written `credvault.toml` with `with`: how a
    /// test changes or adds a setting (after `line`, in its section). A
    /// `line` the file does not hold is a broken test, not a no-op.
    pub fn replace_in_config(&self, line: &str, with: &str) {
        let path = self.path().join("credvault.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(line), "credvault.toml has no {line:?}");
        std::fs::write(path, text.replace(line, with)).unwrap();
    }

    /// The vault's store, opened as the server opens it (the test's
    /// backend), for tests that inspect or damage it directly.
    pub async fn open_store(&self) -> std::sync::Arc<dyn credvault::store::CredentialStore> {
        credvault::store::open(&credvault::server::store_settings(&self.config()))
            .await
            .unwrap()
    }

    pub fn keyring(&self) -> Keyring {
        crypto::load(&self.keyring_path(), &SecretString::from(PASSPHRASE)).unwrap()
    }
}

pub fn write_keyring(path: &Path, keyring: &Keyring) {
    crypto::store(
        path,
        keyring,
        &SecretString::from(PASSPHRASE),
        KdfParams::fast_for_tests(),
    )
    .unwrap();
}

/// A running vault.
pub struct TestVault {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestVault {
    /// Starts the vault on `dir` and waits until it is ready.
    pub async fn start(dir: &VaultDir) -> Self {
        Self::try_start(dir.config()).await.unwrap()
    }

    /// Starts the vault, returning the start-up error if it refuses to run.
    pub async fn try_start(config: Config) -> Result<Self, ServerError> {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut task = tokio::spawn(server::run(
            config,
            Listeners {
                grpc,
                ops,
                mesh: None,
            },
            async move {
                let _ = stopped.await;
            },
        ));
        // Ready means /readyz says so; a start-up error ends the task first.
        // CREDVAULT_TEST_READY_SECS stretches the wait for a run under an
        // instruction profiler (valgrind), where start-up takes minutes.
        let ready_within = std::env::var("CREDVAULT_TEST_READY_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(20);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(ready_within);
        loop {
            if task.is_finished() {
                return Err((&mut task).await.unwrap().unwrap_err());
            }
            if readyz(ops_addr).await == Some(200) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vault did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            addr,
            ops_addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Graceful shutdown; returns what `server::run` returned.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub async fn channel(&self, client: Option<&CertifiedKey>, ca_pem: &str) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("localhost");
        if let Some(client) = client {
            tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
        }
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    /// A CredentialVault client with the named client certificate.
    pub async fn client(&self, dir: &VaultDir, name: &str) -> CredentialVaultClient<Channel> {
        let cert = &dir.pki.clients[name];
        CredentialVaultClient::new(self.channel(Some(cert), dir.pki.ca.ca_cert_pem()).await)
    }
}

impl Drop for TestVault {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One `GET path` on the ops listener `ops`: the whole response, head
/// included.
async fn ops_get(ops: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(ops).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: ops\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// The Prometheus text `/metrics` serves on the ops listener `ops`,
/// response head included.
pub async fn scrape_metrics(ops: SocketAddr) -> String {
    let response = ops_get(ops, "/metrics").await.expect("GET /metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The sum of every sample in `text` whose line starts with `prefix` (one
/// series, or all of a family's series); 0 when none does.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// The mean of histogram `family` in `text` over all its series (its
/// `_sum` over its `_count`); zero when it has no observations.
pub fn histogram_mean(text: &str, family: &str) -> Duration {
    let count = metric_sum(text, &format!("{family}_count"));
    let sum = metric_sum(text, &format!("{family}_sum"));
    if count > 0.0 {
        Duration::from_secs_f64(sum / count)
    } else {
        Duration::ZERO
    }
}

/// The HTTP status of `/readyz`, or `None` if nothing answers.
pub async fn readyz(ops: SocketAddr) -> Option<u16> {
    let response = ops_get(ops, "/readyz").await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

pub fn reference(tenant: &str, subject: &str, provider: &str) -> Option<pb::CredentialRef> {
    Some(pb::CredentialRef {
        tenant: tenant.into(),
        subject: subject.into(),
        provider: provider.into(),
    })
}

/// An OAuth client for the provider double (client_secret_basic).
pub fn oauth_client(token_url: &str, client_id: &str, secret: &str) -> Option<pb::OAuthClient> {
    Some(pb::OAuthClient {
        token_endpoint: token_url.into(),
        client_id: client_id.into(),
        client_secret: secret.into(),
        auth_method: pb::ClientAuthMethod::ClientSecretBasic as i32,
        revocation_endpoint: String::new(),
        scopes: vec![],
        ..Default::default()
    })
}

pub fn refresh_grant(
    refresh_token: &str,
    access: Option<(&str, std::time::SystemTime)>,
) -> Option<pb::deposit_request::Grant> {
    Some(pb::deposit_request::Grant::RefreshToken(
        pb::RefreshTokenGrant {
            refresh_token: refresh_token.into(),
            access_token: access.map(|(t, _)| t.to_owned()).unwrap_or_default(),
            access_token_expires_at: access.map(|(_, at)| prost_types::Timestamp::from(at)),
        },
    ))
}

pub fn get_request(tenant: &str, subject: &str, provider: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        credential: reference(tenant, subject, provider),
        min_valid_for: None,
        force_refresh: false,
    }
}

/// The `google.rpc.ErrorInfo` of a status: (reason, domain, metadata).
pub fn error_info(status: &tonic::Status) -> (String, String, HashMap<String, String>) {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("status without ErrorInfo: {status:?}"));
    (
        info.reason.clone(),
        info.domain.clone(),
        info.metadata.clone(),
    )
}

/// The BadRequest field names of a status.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
