//! Server settings: a TOML file, overridable by `CREDVAULT_*` environment
//! variables (`__` separates sections: `CREDVAULT_TOKENS__REFRESH_SKEW=90s`).
//!
//! Relative paths in the file are resolved against the file's directory, so a
//! config and the files it names can move together. Every field is documented
//! in the README's configuration reference.
//!
//! This module only reads and shape-checks settings. Turning them into the
//! domain's types (OAuth clients, identity rules, store settings) is the
//! assembly's job, in `server`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    providers::{Env, Format, Toml},
    Figment,
};
use serde::Deserialize;

use crate::{secret::SecretString, telemetry::LogFormat};

/// Why the configuration cannot be used. One line, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The mTLS gRPC listener.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// The plaintext ops listener (`/livez`, `/readyz`).
    #[serde(default = "defaults::ops_listen")]
    pub ops_listen: SocketAddr,
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// Which store holds the records: the embedded one, or etcd.
    #[serde(default)]
    pub storage: StorageConfig,
    pub tls: TlsConfig,
    pub keyring: KeyringConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub tokens: TokenConfig,
    /// Credential events: retention, the failing threshold, webhooks.
    #[serde(default)]
    pub events: EventsConfig,
    /// The consent flows the vault runs.
    #[serde(default)]
    pub authorizations: AuthorizationsConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Provider presets: a Deposit whose `provider` names one may omit `client`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderPreset>,
}

/// A provider preset: a complete OAuth client kept in the server's config, so
/// callers need not know client secrets and operators can rotate them in one
/// place (credentials deposited under a preset use the preset's current
/// settings on every refresh).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderPreset {
    pub token_endpoint: String,
    /// For BeginAuthorization.
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// For BeginDeviceAuthorization (RFC 8628).
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    /// The issuer a redirect's `iss` must match (RFC 9207).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Where a BeginAuthorization without a `redirect_uri` sends the user
    /// back.
    #[serde(default)]
    pub redirect_uri: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// `client_secret_basic` (default), `client_secret_post` or `none`.
    #[serde(default)]
    pub auth_method: PresetAuthMethod,
    pub client_id: String,
    /// For `CREDVAULT_PROVIDERS__<NAME>__CLIENT_SECRET`.
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// `private_key_jwt`: the client's PEM private key.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `ES256` (default) or `RS256`.
    #[serde(default)]
    pub signing_alg: Option<String>,
    /// The `kid` header of the assertions, if the provider wants one.
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PresetAuthMethod {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
    None,
    /// RFC 7523 §2.2: a JWT signed with `private_key_file`.
    PrivateKeyJwt,
}

/// `[storage]`: the embedded store (default) or etcd for N replicas.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub backend: StorageBackend,
    #[serde(default)]
    pub sled: SledConfig,
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
}

impl StorageConfig {
    /// etcd at `endpoints` with every other setting at its default.
    pub fn etcd(endpoints: Vec<String>) -> Self {
        Self {
            backend: StorageBackend::Etcd,
            sled: SledConfig::default(),
            etcd: Some(EtcdConfig {
                endpoints,
                prefix: defaults::etcd_prefix(),
                dial_timeout: defaults::etcd_dial_timeout(),
                request_timeout: defaults::etcd_request_timeout(),
                max_staleness: defaults::etcd_max_staleness(),
                claim_takeover: None,
                ca: None,
                cert: None,
                key: None,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sled,
    Etcd,
}

/// `[storage.sled]`: the embedded store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SledConfig {
    /// The most memory sled's page cache may hold, in MiB. What a read
    /// brings in stays until this fills; it bounds memory, not records.
    #[serde(default = "defaults::sled_cache_capacity_mib")]
    pub cache_capacity_mib: u64,
}

impl Default for SledConfig {
    fn default() -> Self {
        Self {
            cache_capacity_mib: defaults::sled_cache_capacity_mib(),
        }
    }
}

/// The bounds of `storage.sled.cache_capacity_mib`: at least one MiB, and
/// at most 1 TiB, far from where its byte count could overflow.
pub const SLED_CACHE_CAPACITY_MIB: std::ops::RangeInclusive<u64> = 1..=(1 << 20);

/// `[storage.etcd]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// One URL per member, `http://` or `https://`.
    pub endpoints: Vec<String>,
    #[serde(default = "defaults::etcd_prefix")]
    pub prefix: String,
    #[serde(default = "defaults::etcd_dial_timeout", with = "humantime_serde")]
    pub dial_timeout: Duration,
    #[serde(default = "defaults::etcd_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A replica never serves a token of a grant revoked or replaced more
    /// than this long ago; past it without confirming its view, it reads
    /// through and is not ready.
    #[serde(default = "defaults::etcd_max_staleness", with = "humantime_serde")]
    pub max_staleness: Duration,
    /// How long another replica's refresh claim stands before a waiter
    /// takes it over, on the waiter's own clock; default: the upstream
    /// request timeout plus 10 s. Must exceed the upstream request timeout.
    #[serde(default, with = "humantime_serde")]
    pub claim_takeover: Option<Duration>,
    /// PEM files for mTLS to etcd (all optional).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// A client that has not finished its handshake by then is dropped.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often the certificate, key and CA files are checked for changes
    /// (new handshakes use the new ones); `0s` turns reloading off.
    #[serde(default = "defaults::tls_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringConfig {
    /// The sealed keyring file.
    pub path: PathBuf,
    /// A file holding the passphrase (trailing newline ignored).
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// The passphrase itself, for `CREDVAULT_KEYRING__PASSPHRASE`.
    #[serde(default)]
    pub passphrase: Option<SecretString>,
    /// How often to check the keyring file for changes; `0s` turns the
    /// watch off (SIGHUP and the admin call still reload).
    #[serde(default = "defaults::keyring_watch", with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Records a rewrap re-encrypts per second unless the call says otherwise.
    #[serde(default = "defaults::rewrap_rate")]
    pub rewrap_rate: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The policy file mapping identities to tenants and actions.
    pub policy: PathBuf,
    /// How often the policy file is checked for changes (SIGHUP and the
    /// admin call reload it too); `0s` turns the watch off.
    #[serde(default = "defaults::policy_watch", with = "humantime_serde")]
    pub policy_watch_interval: Duration,
    /// Pin SPIFFE IDs to this trust domain.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Accept a certificate's subject CN when it has no URI SAN.
    #[serde(default)]
    pub allow_common_name: bool,
    /// Per-trust-domain CA bundles (`"td" = "td-ca.pem"`): a SPIFFE
    /// identity must chain to its own domain's bundle, not just to any CA in
    /// `tls.client_ca`. Empty: any CA there may vouch for any domain.
    #[serde(default)]
    pub trust_bundles: BTreeMap<String, PathBuf>,
    /// Tenant claims from a signed JWT (`authorization: Bearer …`).
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Mesh mode: a plaintext listener for a local sidecar that terminated
    /// mTLS (off unless this section is present and `enabled`).
    #[serde(default)]
    pub mesh: Option<MeshConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    pub enabled: bool,
    /// Bind it to loopback: only the sidecar may reach it.
    pub listen: SocketAddr,
    /// The vault's own SPIFFE ID; XFCC elements must carry it as `By=`.
    pub vault_identity: String,
    /// A file holding a secret the sidecar adds to every request as
    /// `x-credvault-sidecar-secret`; without it, anything that can reach
    /// the loopback listener can forge XFCC.
    #[serde(default)]
    pub sidecar_secret_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The JWKS (public keys) tokens are verified against, offline.
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    /// The claim holding the tenant (a string or an array of strings).
    #[serde(default = "defaults::tenant_claim")]
    pub tenant_claim: String,
    /// Allowed algorithms (asymmetric only).
    #[serde(default = "defaults::jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "defaults::jwt_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Cached tokens are served only while valid at least this long.
    #[serde(with = "humantime_serde")]
    pub refresh_skew: Duration,
    /// Lifetime assumed when a token response has no `expires_in`.
    #[serde(with = "humantime_serde")]
    pub default_lifetime: Duration,
    /// Upper bound on a request's `min_valid_for`.
    #[serde(with = "humantime_serde")]
    pub max_min_valid_for: Duration,
    /// At most one forced refresh per credential per this interval.
    #[serde(with = "humantime_serde")]
    pub force_refresh_interval: Duration,
    /// Refresh tokens nearing expiry in the background (off by default).
    pub refresh_ahead: bool,
    /// Time between background sweeps.
    #[serde(with = "humantime_serde")]
    pub refresh_ahead_interval: Duration,
    /// Background sweeps refresh tokens expiring within this window.
    #[serde(with = "humantime_serde")]
    pub refresh_ahead_window: Duration,
    /// Background refreshes running at once.
    pub refresh_ahead_concurrency: usize,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            refresh_skew: Duration::from_secs(60),
            default_lifetime: Duration::from_secs(3600),
            max_min_valid_for: Duration::from_secs(24 * 3600),
            force_refresh_interval: Duration::from_secs(15),
            refresh_ahead: false,
            refresh_ahead_interval: Duration::from_secs(60),
            refresh_ahead_window: Duration::from_secs(300),
            refresh_ahead_concurrency: 4,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Log credential events (each in the same write as its change).
    pub enabled: bool,
    /// Events older than this are trimmed.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the trim runs.
    #[serde(with = "humantime_serde")]
    pub trim_interval: Duration,
    /// Transient refresh failures for this long give REFRESH_FAILING.
    #[serde(with = "humantime_serde")]
    pub failing_after: Duration,
    /// A watch stream whose reader takes nothing for this long while
    /// events wait is ended with CONSUMER_TOO_SLOW.
    #[serde(with = "humantime_serde")]
    pub stream_stall: Duration,
    /// Events buffered per watch stream on top of HTTP/2 flow control.
    pub stream_buffer: usize,
    /// Watch streams open at once in this process.
    pub max_streams: usize,
    /// Webhook sinks.
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: Duration::from_secs(7 * 24 * 3600),
            trim_interval: Duration::from_secs(600),
            failing_after: Duration::from_secs(300),
            stream_stall: Duration::from_secs(30),
            stream_buffer: 64,
            max_streams: 1024,
            webhooks: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorizationsConfig {
    /// How long a begun authorization may be completed.
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// Pending authorizations one tenant may have begun on a replica.
    pub max_pending_per_tenant: usize,
}

impl Default for AuthorizationsConfig {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(600),
            max_pending_per_tenant: 1000,
        }
    }
}

/// One webhook sink: events POSTed to `url`, signed per Standard Webhooks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the sink's delivery state; renaming starts it afresh.
    pub name: String,
    pub url: String,
    /// Tenants whose events it gets; empty = every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Event types it gets (`REAUTH_REQUIRED`, ...); empty = every type.
    #[serde(default)]
    pub types: Vec<String>,
    /// The signing secret: `whsec_<base64>` or raw bytes.
    pub secret_file: PathBuf,
    /// The first retry's delay; it doubles up to `retry_max`.
    #[serde(default = "defaults::webhook_retry_base", with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(default = "defaults::webhook_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// One delivery attempt's timeout.
    #[serde(default = "defaults::webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
    /// Allow plain `http` token endpoints on loopback (dev and tests).
    pub allow_http_loopback: bool,
    /// Upstream refreshes in flight at once; beyond it a refresh is refused
    /// with OVERLOADED (a refresh runs on after its caller hangs up).
    pub max_refreshes_in_flight: usize,
    /// … towards one token-endpoint host.
    pub max_refreshes_per_host: usize,
    /// … for one tenant's credentials.
    pub max_refreshes_per_tenant: usize,
    /// Transient refresh failures in a row before a credential cools down.
    pub failure_backoff_after: u32,
    /// The first cool-down; it doubles with each further failure.
    #[serde(with = "humantime_serde")]
    pub failure_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub failure_backoff_max: Duration,
    /// Allow endpoints on private, link-local or loopback addresses.
    pub allow_private_networks: bool,
    /// If non-empty, the only hosts token endpoints may use (`*.example.com`).
    pub allowed_hosts: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
            allow_http_loopback: false,
            max_refreshes_in_flight: 256,
            max_refreshes_per_host: 64,
            max_refreshes_per_tenant: 64,
            failure_backoff_after: 3,
            failure_backoff: Duration::from_secs(5),
            failure_backoff_max: Duration::from_secs(300),
            allow_private_networks: false,
            allowed_hosts: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Upper bound for one RPC, upstream calls included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long in-flight calls may drain after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest accepted request message.
    pub max_request_bytes: usize,
    /// Calls in flight across all connections; the excess is shed with
    /// RESOURCE_EXHAUSTED / OVERLOADED (health checks are always admitted).
    pub max_concurrent_calls: usize,
    /// Calls one caller identity may have in flight; 0 = half of
    /// `max_concurrent_calls`, so no identity can take every slot.
    pub max_calls_per_identity: usize,
    /// TLS handshakes running at once; further connections wait in the
    /// accept backlog.
    pub max_handshakes: usize,
    /// Credentials one tenant may hold; 0 = no quota. A Deposit of a new
    /// credential beyond it is refused with QUOTA_EXCEEDED.
    pub max_records_per_tenant: u64,
    /// Calls per second one caller identity may make; 0 = unlimited.
    pub rate_limit_per_identity: u32,
    /// Burst above the per-identity rate.
    pub rate_limit_burst: u32,
    /// Connections are closed (gracefully) after this long.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_request_bytes: 256 * 1024,
            max_concurrent_calls: 1024,
            max_calls_per_identity: 0,
            max_handshakes: 256,
            max_records_per_tenant: 0,
            rate_limit_per_identity: 0,
            rate_limit_burst: 0,
            max_connection_age: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Every top-level key of the file, for filtering the environment.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "ops_listen",
    "data_dir",
    "storage",
    "tls",
    "keyring",
    "auth",
    "tokens",
    "events",
    "authorizations",
    "upstream",
    "server",
    "log",
    "providers",
];

mod defaults {
    use std::{net::SocketAddr, time::Duration};

    pub fn webhook_retry_base() -> Duration {
        Duration::from_secs(1)
    }

    pub fn webhook_retry_max() -> Duration {
        Duration::from_secs(300)
    }

    pub fn webhook_timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 50051))
    }

    pub fn ops_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9090))
    }

    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }

    pub fn tls_reload() -> Duration {
        Duration::from_secs(10)
    }

    pub fn tenant_claim() -> String {
        "tenant".to_owned()
    }

    pub fn jwt_algorithms() -> Vec<String> {
        vec!["ES256".to_owned(), "RS256".to_owned()]
    }

    pub fn jwt_leeway() -> Duration {
        Duration::from_secs(30)
    }

    /// sled's own default, 1 GiB.
    pub fn sled_cache_capacity_mib() -> u64 {
        1024
    }

    pub fn etcd_prefix() -> String {
        "/credvault/".to_owned()
    }

    pub fn etcd_dial_timeout() -> Duration {
        Duration::from_secs(2)
    }

    pub fn etcd_request_timeout() -> Duration {
        Duration::from_secs(5)
    }

    pub fn etcd_max_staleness() -> Duration {
        Duration::from_secs(2)
    }

    pub fn policy_watch() -> Duration {
        Duration::from_secs(10)
    }

    pub fn keyring_watch() -> Duration {
        Duration::from_secs(10)
    }

    pub fn rewrap_rate() -> u32 {
        500
    }
}

impl Config {
    /// Loads `path`, applies `CREDVAULT_*` overrides, resolves relative paths.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(ConfigError::Invalid {
                path: shown,
                message: "no such file".to_owned(),
            });
        }
        // Only variables that name a section or key of this file: Kubernetes
        // injects CREDVAULT_SERVICE_HOST, CREDVAULT_PORT_50051_TCP, … into
        // pods next to a Service called `credvault`, and CREDVAULT_CONFIG
        // names this file. A typo inside a known section is still an error.
        let env = Env::prefixed("CREDVAULT_").split("__").filter(|key| {
            let top = key.as_str().split('.').next().unwrap_or_default();
            TOP_LEVEL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(top))
        });
        let mut config: Config = Figment::new()
            .merge(Toml::file(path))
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Invalid {
                path: shown.clone(),
                message: one_line(&e),
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        fix(&mut self.keyring.path);
        if let Some(p) = self.keyring.passphrase_file.as_mut() {
            fix(p);
        }
        fix(&mut self.auth.policy);
        if let Some(etcd) = self.storage.etcd.as_mut() {
            for path in [&mut etcd.ca, &mut etcd.cert, &mut etcd.key]
                .into_iter()
                .flatten()
            {
                fix(path);
            }
        }
        for bundle in self.auth.trust_bundles.values_mut() {
            fix(bundle);
        }
        if let Some(jwt) = self.auth.jwt.as_mut() {
            fix(&mut jwt.jwks_file);
        }
        if let Some(secret) = self
            .auth
            .mesh
            .as_mut()
            .and_then(|m| m.sidecar_secret_file.as_mut())
        {
            fix(secret);
        }
        for preset in self.providers.values_mut() {
            for path in [&mut preset.client_secret_file, &mut preset.private_key_file]
                .into_iter()
                .flatten()
            {
                fix(path);
            }
        }
        for webhook in &mut self.events.webhooks {
            fix(&mut webhook.secret_file);
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.keyring.passphrase.is_none() && self.keyring.passphrase_file.is_none() {
            return Err(
                "keyring: set `passphrase_file` or CREDVAULT_KEYRING__PASSPHRASE".to_owned(),
            );
        }
        if self.tokens.refresh_skew > self.tokens.max_min_valid_for {
            return Err("tokens.refresh_skew must not exceed tokens.max_min_valid_for".to_owned());
        }
        if self.tokens.refresh_ahead && self.tokens.refresh_ahead_interval.is_zero() {
            return Err("tokens.refresh_ahead_interval must be positive".to_owned());
        }
        if let Some(mesh) = self.auth.mesh.as_ref().filter(|m| m.enabled) {
            if !mesh.listen.ip().is_loopback() {
                return Err("auth.mesh.listen must be a loopback address: only the local sidecar may reach it".to_owned());
            }
        }
        match (&self.storage.backend, &self.storage.etcd) {
            (StorageBackend::Etcd, None) => {
                return Err("storage.backend = \"etcd\" needs a [storage.etcd] section".to_owned())
            }
            (StorageBackend::Etcd, Some(etcd)) => {
                if etcd.endpoints.is_empty() {
                    return Err("storage.etcd.endpoints is empty".to_owned());
                }
                if etcd
                    .claim_takeover
                    .is_some_and(|bound| bound <= self.upstream.request_timeout)
                {
                    return Err(
                        "storage.etcd.claim_takeover must exceed upstream.request_timeout"
                            .to_owned(),
                    );
                }
            }
            (StorageBackend::Sled, _) => {}
        }
        if !SLED_CACHE_CAPACITY_MIB.contains(&self.storage.sled.cache_capacity_mib) {
            return Err(format!(
                "storage.sled.cache_capacity_mib must be between {} and {}",
                SLED_CACHE_CAPACITY_MIB.start(),
                SLED_CACHE_CAPACITY_MIB.end()
            ));
        }
        if self.upstream.max_response_bytes < 1024 {
            return Err("upstream.max_response_bytes must be at least 1024".to_owned());
        }
        Ok(())
    }
}

/// Every error in `error`, on one line, naming keys but never a value: a
/// value may be a secret (a passphrase given where a table was expected).
fn one_line(error: &figment::Error) -> String {
    use figment::error::Kind;
    let described: Vec<String> = error
        .clone()
        .into_iter()
        .map(|e| {
            let what = match &e.kind {
                Kind::Message(message) => scrub(message),
                Kind::InvalidType(_, expected) => format!("invalid type: expected {expected}"),
                Kind::InvalidValue(_, expected) => format!("invalid value: expected {expected}"),
                Kind::InvalidLength(_, expected) => format!("invalid length: expected {expected}"),
                Kind::UnknownVariant(_, expected) => {
                    format!("unknown variant: expected one of {}", expected.join(", "))
                }
                Kind::UnknownField(field, _) => format!("unknown field `{field}`"),
                Kind::MissingField(field) => format!("missing field `{field}`"),
                Kind::DuplicateField(field) => format!("duplicate field `{field}`"),
                other => scrub(&other.to_string()),
            };
            match e.path.is_empty() {
                true => what,
                false => format!("{what} for key `{}`", e.path.join(".")),
            }
        })
        .collect();
    described.join("; ")
}

/// Drops quoted parts of a message (where serde and figment put values).
fn scrub(message: &str) -> String {
    let mut out = String::new();
    let mut quote = None;
    for ch in message.replace('\n', " ").chars() {
        match (quote, ch) {
            (None, '"' | '`' | '\'') => {
                quote = Some(ch);
                out.push_str("[value]");
            }
            (Some(open), _) if ch == open => quote = None,
            (Some(_), _) => {}
            (None, _) => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
// figment's Jail returns its own large error type; nothing to shrink here.
#[allow(clippy::result_large_err)]
pub(crate) mod tests {
    use super::*;

    /// The environment filter knows every section: serde tells a struct's
    /// deserializer its field names, so this asks for them.
    #[test]
    fn every_top_level_key_can_come_from_the_environment() {
        struct FieldNames(Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for &mut FieldNames {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("only structs"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend_from_slice(fields);
                Err(serde::de::Error::custom("names taken"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        let mut names = FieldNames(Vec::new());
        let _ = Config::deserialize(&mut names);
        assert!(!names.0.is_empty());
        let mut fields = names.0.clone();
        fields.sort_unstable();
        let mut known = TOP_LEVEL_KEYS.to_vec();
        known.sort_unstable();
        assert_eq!(fields, known);
    }

    /// The least config `load` accepts; other modules' tests build on it.
    pub(crate) const MINIMAL: &str = r#"
        data_dir = "data"
        [tls]
        cert = "server.pem"
        key = "server-key.pem"
        client_ca = "ca.pem"
        [keyring]
        path = "keyring.cvk"
        passphrase_file = "keyring.pass"
        [auth]
        policy = "policy.toml"
    "#;

    // Every test runs inside a figment Jail: it serializes tests that read
    // the process environment, which another test sets.
    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        figment::Jail::expect_with(|_| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("credvault.toml");
            std::fs::write(&path, MINIMAL).unwrap();
            let config = Config::load(&path).unwrap();
            assert_eq!(config.tokens.refresh_skew, Duration::from_secs(60));
            assert_eq!(config.data_dir, dir.path().join("data"));
            assert_eq!(config.tls.client_ca, dir.path().join("ca.pem"));
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_apply_and_foreign_variables_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credvault.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("CREDVAULT_OPS_LISTEN", "127.0.0.1:9999");
            jail.set_env("CREDVAULT_TOKENS__REFRESH_SKEW", "90s");
            // What Kubernetes injects next to a Service named `credvault`.
            jail.set_env("CREDVAULT_SERVICE_HOST", "10.0.0.1");
            jail.set_env("CREDVAULT_PORT_50051_TCP", "tcp://10.0.0.1:50051");
            let config = Config::load(&path).map_err(|e| e.to_string())?;
            assert_eq!(config.ops_listen.port(), 9999);
            assert_eq!(config.tokens.refresh_skew, Duration::from_secs(90));
            jail.set_env("CREDVAULT_TOKENS__REFRESH_SKWE", "90s");
            assert!(
                Config::load(&path).is_err(),
                "a typo in a known section is an error"
            );
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_file_and_the_problem_on_one_line() {
        figment::Jail::expect_with(|_| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("credvault.toml");
            std::fs::write(
                &path,
                format!("{MINIMAL}\n[tokens]\nrefresh_skew = \"soon\"\n"),
            )
            .unwrap();
            let message = Config::load(&path).unwrap_err().to_string();
            assert!(message.contains("credvault.toml"), "{message}");
            assert!(message.contains("refresh_skew"), "{message}");
            assert!(!message.contains('\n'));

            std::fs::write(&path, format!("{MINIMAL}\nlisten_typo = 1\n")).unwrap();
            let message = Config::load(&path).unwrap_err().to_string();
            assert!(message.contains("listen_typo"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn the_sled_page_cache_is_sleds_default_unless_set_within_its_bounds() {
        figment::Jail::expect_with(|_| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("credvault.toml");
            std::fs::write(&path, MINIMAL).unwrap();
            let config = Config::load(&path).unwrap();
            assert_eq!(config.storage.sled.cache_capacity_mib, 1024);

            let with =
                |mib: u64| format!("{MINIMAL}\n[storage.sled]\ncache_capacity_mib = {mib}\n");
            std::fs::write(&path, with(64)).unwrap();
            assert_eq!(
                Config::load(&path).unwrap().storage.sled.cache_capacity_mib,
                64
            );
            for outside in [0, (1 << 20) + 1, u64::from(u32::MAX) << 12] {
                std::fs::write(&path, with(outside)).unwrap();
                let message = Config::load(&path).unwrap_err().to_string();
                assert!(
                    message
                        .contains("storage.sled.cache_capacity_mib must be between 1 and 1048576"),
                    "{outside}: {message}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn secret_settings_take_any_scalar_and_errors_never_quote_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credvault.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        figment::Jail::expect_with(|jail| {
            // A numeric passphrase reaches serde as a number.
            jail.set_env("CREDVAULT_KEYRING__PASSPHRASE", "31415926535897932384");
            let config = Config::load(&path).map_err(|e| e.to_string())?;
            let passphrase = config.keyring.passphrase.expect("set from the environment");
            assert_eq!(passphrase.expose(), "31415926535897932384");
            // A value in the wrong place is named by its key, never quoted.
            jail.set_env("CREDVAULT_TOKENS__REFRESH_SKEW", "hunter2-secret-ish");
            let message = Config::load(&path).unwrap_err().to_string();
            assert!(message.contains("refresh_skew"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
            assert!(!message.contains("31415926535897932384"), "{message}");
            Ok(())
        });
    }
}
