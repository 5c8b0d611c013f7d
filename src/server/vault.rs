//! Assembly: from a [`Config`] to a [`Vault`] whose parts are wired and
//! whose background tasks run. Every conversion from settings to domain
//! types (OAuth clients, identity rules, store settings) happens here, so
//! `config` stays a plain reader of the file.
//!
//! Files (TLS material, keyring, policy, JWKS, secrets) are read and Argon2
//! runs on the blocking pool; nothing here blocks a runtime worker.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::task::JoinSet;

use super::{tls, ServerError};
use crate::{
    api::{CallSlots, Calls, Gate, IdentityRateLimiter},
    auth::{
        identity::{validate_trust_domain, SpiffeId},
        jwt::{JwtSettings, JwtVerifier},
        Authenticator, IdentityRules, Policy,
    },
    broker::{
        ahead,
        consent::{self, ConsentSettings},
        events::{EventSettings, EventType},
        fingerprints,
        limits::LimitSettings,
        rotation::KeyRotation,
        Broker, BrokerSettings,
    },
    config::{Config, ConfigError, PresetAuthMethod, ProviderPreset, StorageBackend},
    crypto::{KeyringSource, SharedKeyring},
    files,
    secret::SecretString,
    store::{self, CredentialStore, EtcdSettings, StoreSettings},
    telemetry::Metrics,
    upstream::{
        AssertionKey, ClientAuth, ClientConfig, ClientSpec, EndpointPolicy, HttpSettings, Upstream,
        UpstreamSettings,
    },
    webhooks::{self, SigningKey, WebhookSink},
};

/// A vault ready to serve: its parts, wired.
pub struct Vault {
    pub(super) config: Config,
    pub(super) store: Arc<dyn CredentialStore>,
    pub(super) broker: Arc<Broker>,
    pub(super) rotation: Arc<KeyRotation>,
    pub(super) auth: Arc<Authenticator>,
    pub(super) calls: Calls,
    pub(super) tls: tls::SharedServerConfig,
    pub(super) trust: tls::TrustBundles,
    pub(super) metrics: Arc<Metrics>,
    /// What a mesh sidecar must present, when configured.
    pub(super) sidecar_secret: Option<Arc<SecretString>>,
    /// Every background task; stopped together at shutdown.
    pub(super) tasks: JoinSet<()>,
    /// Set when shutdown begins: event streams end so clients resume
    /// elsewhere, and jobs give their claims back.
    pub(super) stopping: tokio::sync::watch::Sender<bool>,
    /// Jobs that hold a claim (webhook deliveries): at shutdown they are
    /// let finish, briefly, so their claims are released, not left to time out.
    pub(super) jobs: JoinSet<()>,
}

/// What the file phase of a start reads.
struct Loaded {
    tls: Arc<rustls::ServerConfig>,
    trust: tls::TrustBundles,
    sidecar_secret: Option<Arc<SecretString>>,
    policy: Policy,
    jwt: Option<JwtVerifier>,
    presets: HashMap<String, ClientConfig>,
    webhooks: Vec<WebhookSink>,
}

impl Vault {
    /// Opens the store, loads the keyring and the policy, and wires the
    /// broker into the services. Fails with one line naming what is wrong.
    pub async fn build(config: &Config, metrics: Arc<Metrics>) -> Result<Self, ServerError> {
        tls::install_crypto_provider();
        let identity_rules = identity_rules(config)?;
        let loaded = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || load_files(&config))
                .await
                .map_err(|_| ServerError::Transport("the start-up task failed".into()))??
        };
        let keyring = keyring_source(config)
            .load()
            .await
            .map_err(|e| ServerError::Keyring(e.to_string()))?;
        let store = open_store(config).await?;
        fingerprints::check_and_remember(store.as_ref(), &keyring).await?;
        let mut authenticator = Authenticator::new(identity_rules, loaded.policy)
            .with_policy_file(config.auth.policy.clone());
        if let Some(verifier) = loaded.jwt {
            authenticator = authenticator.with_jwt(verifier);
        }
        let auth = Arc::new(authenticator);
        let upstream = upstream(config)?;
        check_webhooks(&upstream, &loaded.webhooks).await?;
        for (name, preset) in &loaded.presets {
            upstream
                .check_client(preset)
                .await
                .map_err(|e| invalid(format!("providers.{name}"), e.to_string()))?;
        }
        let broker = Broker::new(
            Arc::clone(&store),
            SharedKeyring::new(keyring),
            upstream.clone(),
            BrokerSettings {
                refresh_skew: config.tokens.refresh_skew,
                force_refresh_interval: config.tokens.force_refresh_interval,
                presets: loaded.presets,
                limits: limit_settings(config),
                events: EventSettings {
                    enabled: config.events.enabled,
                    retention: config.events.retention,
                    failing_after: config.events.failing_after,
                },
                consent: ConsentSettings {
                    lifetime: config.authorizations.lifetime,
                    max_pending_per_tenant: config.authorizations.max_pending_per_tenant,
                },
            },
            Arc::clone(&metrics),
        );
        // Before serving: the other replicas learn what this one can open.
        broker
            .publish_key_versions()
            .await
            .map_err(|e| ServerError::Keyring(e.to_string()))?;
        let rotation = KeyRotation::new(
            Arc::clone(&broker),
            keyring_source(config),
            config.keyring.rewrap_rate,
        );
        let mut vault = Self {
            config: config.clone(),
            calls: Calls::new(gate(config, &auth), Arc::clone(&metrics)),
            tls: tls::SharedServerConfig::new(loaded.tls),
            trust: loaded.trust,
            sidecar_secret: loaded.sidecar_secret,
            store,
            broker,
            rotation,
            auth,
            metrics,
            tasks: JoinSet::new(),
            stopping: tokio::sync::watch::Sender::new(false),
            jobs: JoinSet::new(),
        };
        vault.spawn_background();
        vault.spawn_webhooks(loaded.webhooks, &upstream);
        Ok(vault)
    }

    /// Starts one delivery task per webhook sink.
    fn spawn_webhooks(&mut self, sinks: Vec<WebhookSink>, upstream: &Upstream) {
        for sink in sinks {
            self.jobs.spawn(webhooks::run(
                Arc::clone(&self.broker),
                upstream.clone(),
                Arc::clone(&self.metrics),
                sink,
                self.stopping.subscribe(),
            ));
        }
    }

    /// Starts the background tasks: proactive refresh (when on), keyring
    /// and TLS reloads, gauges.
    fn spawn_background(&mut self) {
        let tokens = &self.config.tokens;
        if tokens.refresh_ahead {
            self.tasks.spawn(ahead::run(
                Arc::clone(&self.broker),
                ahead::AheadSettings {
                    interval: tokens.refresh_ahead_interval,
                    window: tokens.refresh_ahead_window,
                    concurrency: tokens.refresh_ahead_concurrency,
                },
            ));
        }
        let rotation = Arc::clone(&self.rotation);
        self.tasks.spawn(reload_on_change(
            "keyring",
            vec![self.config.keyring.path.clone()],
            self.config.keyring.watch_interval,
            move || {
                let rotation = Arc::clone(&rotation);
                async move {
                    rotation
                        .reload()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        ));
        let auth = Arc::clone(&self.auth);
        self.tasks.spawn(reload_on_change(
            "policy",
            vec![self.config.auth.policy.clone()],
            self.config.auth.policy_watch_interval,
            move || {
                let auth = Arc::clone(&auth);
                async move {
                    auth.reload_policy()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        ));
        let tls = self.config.tls.clone();
        let shared = self.tls.clone();
        self.tasks.spawn(reload_on_change(
            "tls certificate and client CA",
            vec![tls.cert.clone(), tls.key.clone(), tls.client_ca.clone()],
            tls.reload_interval,
            move || {
                let (tls, shared) = (tls.clone(), shared.clone());
                async move {
                    let config = tokio::task::spawn_blocking(move || {
                        tls::server_config(&tls.cert, &tls.key, &tls.client_ca)
                    })
                    .await
                    .map_err(|_| "the reload task failed".to_owned())?
                    .map_err(|e| e.to_string())?;
                    shared.replace(config);
                    Ok(())
                }
            },
        ));
        self.tasks.spawn(consent::run(Arc::clone(&self.broker)));
        self.tasks.spawn(trim_events(
            Arc::clone(&self.broker),
            self.config.events.trim_interval,
        ));
        self.tasks.spawn(refresh_gauges(
            Arc::clone(&self.rotation),
            Arc::clone(&self.store),
            Arc::clone(&self.metrics),
        ));
    }
}

/// Trims events past their retention, now and then. Every replica may run
/// it: a trim is idempotent.
async fn trim_events(broker: Arc<Broker>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_secs(1)));
    loop {
        ticks.tick().await;
        match broker.trim_events().await {
            Ok(0) => {}
            Ok(trimmed) => tracing::info!(trimmed, "trimmed events past their retention"),
            Err(error) => tracing::warn!(%error, "could not trim events"),
        }
    }
}

async fn open_store(config: &Config) -> Result<Arc<dyn CredentialStore>, ServerError> {
    store::open(&store_settings(config))
        .await
        .map_err(|e| ServerError::Store {
            path: match config.storage.backend {
                StorageBackend::Sled => config.data_dir.display().to_string(),
                StorageBackend::Etcd => "etcd".to_owned(),
            },
            message: e.to_string(),
        })
}

/// What every call passes: authentication, the rate limit, the call cap.
fn gate(config: &Config, auth: &Arc<Authenticator>) -> Arc<Gate> {
    Arc::new(Gate {
        auth: Arc::clone(auth),
        limiter: IdentityRateLimiter::new(
            config.server.rate_limit_per_identity,
            config.server.rate_limit_burst,
        ),
        slots: CallSlots::new(match config.server.max_calls_per_identity {
            0 => config.server.max_concurrent_calls / 2,
            n => n,
        }),
    })
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> ServerError {
    ServerError::Config(ConfigError::Invalid {
        path: path.into(),
        message: message.into(),
    })
}

fn identity_rules(config: &Config) -> Result<IdentityRules, ServerError> {
    if let Some(domain) = &config.auth.trust_domain {
        validate_trust_domain(domain).map_err(|e| invalid("auth.trust_domain", e.to_string()))?;
    }
    if let Some(mesh) = config.auth.mesh.as_ref().filter(|m| m.enabled) {
        SpiffeId::parse(&mesh.vault_identity)
            .map_err(|e| invalid("auth.mesh.vault_identity", e.to_string()))?;
    }
    Ok(IdentityRules {
        trust_domain: config.auth.trust_domain.clone(),
        allow_common_name: config.auth.allow_common_name,
    })
}

/// The configured store, in the store's own terms.
pub fn store_settings(config: &Config) -> StoreSettings {
    match (&config.storage.backend, &config.storage.etcd) {
        (StorageBackend::Etcd, Some(etcd)) => StoreSettings::Replicated(EtcdSettings {
            endpoints: etcd.endpoints.clone(),
            prefix: etcd.prefix.as_bytes().to_vec(),
            dial_timeout: etcd.dial_timeout,
            request_timeout: etcd.request_timeout,
            max_staleness: etcd.max_staleness,
            claim_takeover: etcd
                .claim_takeover
                .unwrap_or(config.upstream.request_timeout + Duration::from_secs(10)),
            ca: etcd.ca.clone(),
            cert: etcd.cert.clone(),
            key: etcd.key.clone(),
        }),
        _ => StoreSettings::Embedded {
            data_dir: config.data_dir.clone(),
            cache_capacity: config.storage.sled.cache_capacity_mib << 20,
        },
    }
}

fn limit_settings(config: &Config) -> LimitSettings {
    let upstream = &config.upstream;
    LimitSettings {
        refreshes_in_flight: upstream.max_refreshes_in_flight.max(1),
        refreshes_per_host: upstream.max_refreshes_per_host.max(1),
        refreshes_per_tenant: upstream.max_refreshes_per_tenant.max(1),
        backoff_after: upstream.failure_backoff_after.max(1),
        backoff_base: upstream.failure_backoff,
        backoff_max: upstream.failure_backoff_max,
        records_per_tenant: config.server.max_records_per_tenant,
    }
}

fn keyring_source(config: &Config) -> KeyringSource {
    KeyringSource {
        path: config.keyring.path.clone(),
        passphrase: config.keyring.passphrase.clone(),
        passphrase_file: config.keyring.passphrase_file.clone(),
    }
}

/// The file phase of a start (blocking: runs on the blocking pool).
fn load_files(config: &Config) -> Result<Loaded, ServerError> {
    let tls = tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca)?;
    let trust = tls::TrustBundles::load(&config.auth.trust_bundles)?;
    if trust.is_empty() && config.auth.trust_domain.is_none() {
        tracing::warn!(
            "no auth.trust_domain pin and no auth.trust_bundles: any CA in tls.client_ca \
             can vouch for any SPIFFE trust domain; pin one, or give each domain its bundle"
        );
    }
    let policy = Policy::load(&config.auth.policy)?;
    let jwt = match &config.auth.jwt {
        None => None,
        Some(jwt) => Some(
            JwtVerifier::load(
                &jwt.jwks_file,
                JwtSettings {
                    issuer: jwt.issuer.clone(),
                    audience: jwt.audience.clone(),
                    tenant_claim: jwt.tenant_claim.clone(),
                    algorithms: jwt.algorithms.clone(),
                    leeway: jwt.leeway,
                },
            )
            .map_err(|e| ServerError::Jwt(e.to_string()))?,
        ),
    };
    let mut presets = HashMap::new();
    for (name, preset) in &config.providers {
        presets.insert(name.clone(), preset_client(name, preset)?);
    }
    let sidecar_secret = match config.auth.mesh.as_ref().filter(|m| m.enabled) {
        Some(mesh) => match &mesh.sidecar_secret_file {
            Some(path) => {
                Some(Arc::new(files::read_secret(path).map_err(|e| {
                    invalid("auth.mesh.sidecar_secret_file", e.to_string())
                })?))
            }
            None => {
                tracing::warn!("mesh mode without auth.mesh.sidecar_secret_file: anything that can reach the mesh listener can forge a caller's identity");
                None
            }
        },
        None => None,
    };
    Ok(Loaded {
        tls,
        trust,
        sidecar_secret,
        policy,
        jwt,
        presets,
        webhooks: webhook_sinks(config)?,
    })
}

/// Webhook URLs pass the endpoint policy like token endpoints (DNS too).
async fn check_webhooks(upstream: &Upstream, sinks: &[WebhookSink]) -> Result<(), ServerError> {
    for sink in sinks {
        upstream
            .check_endpoint(&sink.url)
            .await
            .map_err(|e| invalid(format!("events.webhooks.{}.url", sink.name), e.to_string()))?;
    }
    Ok(())
}

/// The configured webhook sinks, their secrets read and their names,
/// URLs and event types checked.
fn webhook_sinks(config: &Config) -> Result<Vec<WebhookSink>, ServerError> {
    let mut sinks = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, hook) in config.events.webhooks.iter().enumerate() {
        let at = |field: &str| format!("events.webhooks[{i}].{field}");
        let valid_name = !hook.name.is_empty()
            && hook.name.len() <= 64
            && hook
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid_name || !names.insert(hook.name.clone()) {
            return Err(invalid(
                at("name"),
                "a unique name of letters, digits, `-`, `_` or `.` (at most 64)",
            ));
        }
        let url = crate::upstream::parse_http_url(&hook.url).map_err(|e| invalid(at("url"), e))?;
        let types = hook
            .types
            .iter()
            .map(|t| {
                EventType::parse(t)
                    .ok_or_else(|| invalid(at("types"), format!("unknown event type `{t}`")))
            })
            .collect::<Result<_, _>>()?;
        let secret = files::read_secret(&hook.secret_file)
            .map_err(|e| invalid(at("secret_file"), e.to_string()))?;
        let key = SigningKey::parse(&secret).map_err(|e| invalid(at("secret_file"), e))?;
        sinks.push(WebhookSink {
            name: hook.name.clone(),
            url,
            tenants: hook.tenants.iter().cloned().collect(),
            types,
            key,
            retry_base: hook.retry_base,
            retry_max: hook.retry_max.max(hook.retry_base),
            timeout: hook.timeout,
        });
    }
    Ok(sinks)
}

/// A provider preset as an OAuth client, under the same rules as a
/// Deposit's client; the secret read from its file.
fn preset_client(name: &str, preset: &ProviderPreset) -> Result<ClientConfig, ServerError> {
    let secret = match (&preset.client_secret, &preset.client_secret_file) {
        (Some(secret), _) => secret.clone(),
        (None, Some(path)) => files::read_secret(path).map_err(|e| {
            invalid(
                format!("providers.{name}.client_secret_file"),
                e.to_string(),
            )
        })?,
        (None, None) => SecretString::default(),
    };
    let assertion_key = match &preset.private_key_file {
        Some(path) => Some(Arc::new(
            files::read_secret(path)
                .map_err(|e| invalid(format!("providers.{name}.private_key_file"), e.to_string()))
                .and_then(|pem| {
                    AssertionKey::from_pem(
                        pem.expose().as_bytes(),
                        preset.signing_alg.as_deref().unwrap_or("ES256"),
                        preset.key_id.clone(),
                    )
                    .map_err(|e| invalid(format!("providers.{name}.private_key_file"), e))
                })?,
        )),
        None => None,
    };
    ClientSpec {
        token_endpoint: preset.token_endpoint.clone(),
        revocation_endpoint: preset.revocation_endpoint.clone().unwrap_or_default(),
        client_id: preset.client_id.clone(),
        client_secret: secret,
        auth: Some(match preset.auth_method {
            PresetAuthMethod::ClientSecretBasic => ClientAuth::SecretBasic,
            PresetAuthMethod::ClientSecretPost => ClientAuth::SecretPost,
            PresetAuthMethod::None => ClientAuth::None,
            PresetAuthMethod::PrivateKeyJwt => ClientAuth::PrivateKeyJwt,
        }),
        scopes: preset.scopes.clone(),
        authorization_endpoint: preset.authorization_endpoint.clone().unwrap_or_default(),
        device_authorization_endpoint: preset
            .device_authorization_endpoint
            .clone()
            .unwrap_or_default(),
        issuer: preset.issuer.clone().unwrap_or_default(),
        redirect_uri: preset.redirect_uri.clone().unwrap_or_default(),
        assertion_key,
    }
    .validate()
    .map_err(|problems| {
        let described: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.description))
            .collect();
        invalid(format!("providers.{name}"), described.join("; "))
    })
}

fn upstream(config: &Config) -> Result<Upstream, ServerError> {
    Upstream::new(UpstreamSettings {
        http: HttpSettings {
            connect_timeout: config.upstream.connect_timeout,
            request_timeout: config.upstream.request_timeout,
            max_response_bytes: config.upstream.max_response_bytes,
        },
        policy: EndpointPolicy {
            allow_http_loopback: config.upstream.allow_http_loopback,
            allowed_hosts: config.upstream.allowed_hosts.clone(),
            allow_private_networks: config.upstream.allow_private_networks,
        },
        default_token_lifetime: config.tokens.default_lifetime,
    })
    .map_err(|e| ServerError::Upstream(e.to_string()))
}

/// Runs `reload` on SIGHUP and whenever one of `paths` changes (checked
/// every `interval`; `0s` watches only for SIGHUP). The one poller behind the
/// keyring, policy and TLS reloads; a refused reload keeps what runs.
async fn reload_on_change<F, Fut>(
    what: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    reload: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut watch = files::ChangeWatch::new(paths);
    loop {
        let hup = async {
            #[cfg(unix)]
            if let Some(signal) = hangup.as_mut() {
                signal.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = hup => {}
            () = watch.next_change(interval) => {}
        }
        match reload().await {
            Ok(()) => tracing::info!(what, "reloaded"),
            Err(error) => tracing::error!(what, %error, "reload refused; keeping the running one"),
        }
    }
}

async fn refresh_gauges(
    rotation: Arc<KeyRotation>,
    store: Arc<dyn CredentialStore>,
    metrics: Arc<Metrics>,
) {
    // The record count walks the whole store: not at start-up (cold start
    // matters) and not often. Store size is cheap and goes with it.
    let period = Duration::from_secs(60);
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(5), period);
    loop {
        ticker.tick().await;
        // Updates the per-version record gauges as a side effect.
        let _ = rotation.status().await;
        let store = Arc::clone(&store);
        if let Ok(Some(bytes)) = tokio::task::spawn_blocking(move || store.size_on_disk()).await {
            metrics.store_bytes.set(bytes);
        }
    }
}

#[cfg(test)]
// figment's Jail returns its own large error type; nothing to shrink here.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    /// The embedded store gets the configured page cache, in bytes.
    #[test]
    fn the_embedded_store_is_opened_with_the_configured_page_cache() {
        figment::Jail::expect_with(|_| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("credvault.toml");
            std::fs::write(
                &path,
                format!(
                    "{}\n[storage.sled]\ncache_capacity_mib = 48\n",
                    crate::config::tests::MINIMAL
                ),
            )
            .unwrap();
            let config = Config::load(&path).unwrap();
            match store_settings(&config) {
                StoreSettings::Embedded {
                    data_dir,
                    cache_capacity,
                } => {
                    assert_eq!(data_dir, dir.path().join("data"));
                    assert_eq!(cache_capacity, 48 * 1024 * 1024);
                }
                other => panic!("not the embedded store: {other:?}"),
            }
            Ok(())
        });
    }
}
