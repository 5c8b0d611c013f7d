//! Assembly: opens the store, loads the keyring and the policy, wires the
//! broker into the gRPC services, and runs the mTLS and ops listeners until
//! shutdown.
//!
//! [`run`] takes bound listeners and a shutdown future, so tests run the real
//! server on `127.0.0.1:0` and stop it when they like (the mini-redis shape).
//!
//! Shutdown: readiness and health go NOT_SERVING first (so balancers stop
//! sending), tonic stops accepting and drains in-flight calls for at most
//! `server.shutdown_grace`, then the store is flushed.

pub mod ops;
pub mod tls;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;

use crate::{
    api::{
        admission::{AdmissionLayer, IdentityRateLimiter},
        pb::{
            credential_vault_server::CredentialVaultServer, vault_admin_server::VaultAdminServer,
        },
        vault::Gate,
        AdminService, VaultService,
    },
    auth::{
        jwt::{JwtSettings, JwtVerifier},
        Authenticator, IdentityRules, Policy,
    },
    broker::{
        ahead, keyguard,
        keys::{KeyManager, KeyringSource},
        Broker, BrokerSettings,
    },
    config::Config,
    crypto::{self, SharedKeyring},
    metrics::Metrics,
    store::{CredentialStore, SledStore},
    upstream::{EndpointPolicy, HttpSettings, Upstream, UpstreamSettings},
};

/// Why the server could not start or stopped abnormally. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("keyring {path}: {source}")]
    Keyring {
        path: String,
        source: crypto::KeyringFileError,
    },
    #[error("{0}")]
    KeyGuard(#[from] keyguard::KeyGuardError),
    #[error("store {path}: {message}")]
    Store { path: String, message: String },
    #[error("{0}")]
    Policy(#[from] crate::auth::policy::PolicyError),
    #[error("{0}")]
    Jwt(String),
    #[error("upstream http client: {0}")]
    Upstream(String),
    #[error("grpc server: {0}")]
    Transport(String),
    #[error("ops listener: {0}")]
    Ops(std::io::Error),
}

/// The listeners the server runs on; bind them with port 0 in tests.
pub struct Listeners {
    pub grpc: TcpListener,
    pub ops: TcpListener,
    /// The mesh-mode listener; bound from the config when mesh mode is on
    /// and this is `None`.
    pub mesh: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind(config.listen).await?,
            ops: TcpListener::bind(config.ops_listen).await?,
            mesh: None,
        })
    }
}

/// Runs the vault until `shutdown` resolves, then drains and flushes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    tls::install_crypto_provider();

    // Probes answer from the first moment, "not ready" until we are.
    let readiness = ops::Readiness::default();
    let metrics = Arc::new(Metrics::default());
    let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    let ops_task = tokio::spawn(ops::serve(
        listeners.ops,
        readiness.clone(),
        Arc::clone(&metrics),
        async move {
            let _ = ops_stopped.await;
        },
    ));

    let tls_config = tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca)?;
    let passphrase = config.keyring_passphrase()?;
    let keyring =
        crypto::load(&config.keyring.path, &passphrase).map_err(|source| ServerError::Keyring {
            path: config.keyring.path.display().to_string(),
            source,
        })?;
    drop(passphrase);
    let store = SledStore::open(&config.data_dir).map_err(|e| ServerError::Store {
        path: config.data_dir.display().to_string(),
        message: e.to_string(),
    })?;
    keyguard::check_and_remember(&store, &keyring).await?;
    let policy = Policy::load(&config.auth.policy)?;
    let mut authenticator = Authenticator::new(
        IdentityRules {
            trust_domain: config.auth.trust_domain.clone(),
            allow_common_name: config.auth.allow_common_name,
        },
        policy,
    );
    if let Some(jwt) = &config.auth.jwt {
        let verifier = JwtVerifier::load(
            &jwt.jwks_file,
            JwtSettings {
                issuer: jwt.issuer.clone(),
                audience: jwt.audience.clone(),
                tenant_claim: jwt.tenant_claim.clone(),
                algorithms: jwt.algorithms.clone(),
                leeway: jwt.leeway,
            },
        )
        .map_err(|e| ServerError::Jwt(e.to_string()))?;
        authenticator = authenticator.with_jwt(verifier);
    }
    let auth = Arc::new(authenticator);
    let upstream = Upstream::new(UpstreamSettings {
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
    .map_err(|e| ServerError::Upstream(e.to_string()))?;
    let presets = config.provider_presets()?;
    for (name, preset) in &presets {
        upstream.check_client(preset).await.map_err(|e| {
            ServerError::Config(crate::config::ConfigError::Invalid {
                path: format!("providers.{name}"),
                message: e.to_string(),
            })
        })?;
    }
    let store: Arc<dyn CredentialStore> = Arc::new(store);
    let broker = Broker::with_metrics(
        Arc::clone(&store),
        SharedKeyring::new(keyring),
        upstream,
        BrokerSettings {
            refresh_skew: config.tokens.refresh_skew,
            max_min_valid_for: config.tokens.max_min_valid_for,
            force_refresh_interval: config.tokens.force_refresh_interval,
            presets,
        },
        Arc::clone(&metrics),
    );

    let refresh_ahead = config.tokens.refresh_ahead.then(|| {
        tokio::spawn(ahead::run(
            Arc::clone(&broker),
            ahead::AheadSettings {
                interval: config.tokens.refresh_ahead_interval,
                window: config.tokens.refresh_ahead_window,
                concurrency: config.tokens.refresh_ahead_concurrency,
            },
        ))
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CredentialVaultServer<VaultService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can render google.rpc error details from any status.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            // So `grpcurl list` shows every service the port really serves.
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Transport(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Transport(e.to_string()))?;
    let keys = KeyManager::new(
        Arc::clone(&broker),
        KeyringSource {
            path: config.keyring.path.clone(),
            passphrase: config.keyring.passphrase.clone(),
            passphrase_file: config.keyring.passphrase_file.clone(),
        },
        config.keyring.rewrap_rate,
    );
    let reloader = tokio::spawn(reload_keyring_on_change(
        Arc::clone(&keys),
        config.keyring.path.clone(),
        config.keyring.watch_interval,
    ));
    let gate = Arc::new(Gate {
        auth: Arc::clone(&auth),
        limiter: IdentityRateLimiter::new(
            config.server.rate_limit_per_identity,
            config.server.rate_limit_burst,
        ),
    });
    let admin = VaultAdminServer::new(AdminService::new(
        Arc::clone(&broker),
        Arc::clone(&keys),
        Arc::clone(&gate),
    ))
    .max_decoding_message_size(config.server.max_request_bytes);
    let gauges = tokio::spawn(refresh_gauges(
        Arc::clone(&keys),
        Arc::clone(&store),
        Arc::clone(&metrics),
    ));
    let vault = CredentialVaultServer::new(VaultService::new(broker, Arc::clone(&gate)))
        .max_decoding_message_size(config.server.max_request_bytes);

    let tls_config = tls::SharedServerConfig::new(tls_config);
    let tls_reloader = tokio::spawn(tls::reload_on_change(
        tls_config.clone(),
        config.tls.cert.clone(),
        config.tls.key.clone(),
        config.tls.client_ca.clone(),
        config.tls.reload_interval,
    ));
    let incoming = tls::incoming(
        listeners.grpc,
        tls_config,
        auth,
        config.tls.handshake_timeout,
    );
    let mesh_incoming = match config.auth.mesh.as_ref().filter(|m| m.enabled) {
        None => None,
        Some(mesh) => {
            let listener = match listeners.mesh {
                Some(listener) => listener,
                None => TcpListener::bind(mesh.listen).await.map_err(|e| {
                    ServerError::Transport(format!("mesh listener {}: {e}", mesh.listen))
                })?,
            };
            tracing::warn!(listen = %mesh.listen, "mesh mode: trusting x-forwarded-client-cert from the local sidecar");
            Some(tls::mesh_incoming(
                listener,
                mesh.vault_identity.as_str().into(),
            ))
        }
    };
    // One server for both: the same layers, limits and services.
    let incoming: std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<tls::Connection, std::io::Error>> + Send>,
    > = match mesh_incoming {
        Some(mesh) => Box::pin(tokio_stream::StreamExt::merge(incoming, mesh)),
        None => Box::pin(incoming),
    };
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc = tonic::transport::Server::builder()
        // Bounds every call, upstream round trips included, so a hung
        // provider cannot pin a client's request forever.
        .timeout(config.server.request_timeout)
        // Detects dead peers on long-lived mesh connections.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // Clients reconnect now and then, so a load balancer in front of a
        // future replicated vault can spread them; in-flight calls finish.
        .max_connection_age(config.server.max_connection_age)
        .max_connection_age_grace(std::time::Duration::from_secs(30))
        // Bounds the streams one connection may multiplex; the global cap
        // below is what protects the vault.
        .max_concurrent_streams(Some(256))
        // Sheds calls beyond the global in-flight cap with OVERLOADED
        // instead of queueing them into timeouts.
        .layer(AdmissionLayer::new(
            config.server.max_concurrent_calls,
            config.server.max_request_bytes,
            Arc::clone(&metrics),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(vault)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stopped.await;
        });
    tokio::pin!(grpc);

    readiness.watch_store(Arc::clone(&store));
    readiness.set(true);
    tracing::info!(listen = %config.listen, ops_listen = %config.ops_listen, "credvault is serving");

    let result = tokio::select! {
        result = &mut grpc => result.map_err(|e| ServerError::Transport(e.to_string())),
        () = shutdown => {
            tracing::info!("shutting down: draining in-flight calls");
            readiness.set(false);
            health.set_not_serving::<CredentialVaultServer<VaultService>>().await;
            let _ = stop_grpc.send(());
            match tokio::time::timeout(config.server.shutdown_grace, &mut grpc).await {
                Ok(result) => result.map_err(|e| ServerError::Transport(e.to_string())),
                Err(_) => {
                    tracing::warn!(grace = ?config.server.shutdown_grace, "drain timed out; dropping remaining calls");
                    Ok(())
                }
            }
        }
    };

    if let Some(task) = refresh_ahead {
        task.abort();
    }
    reloader.abort();
    tls_reloader.abort();
    gauges.abort();
    // A rewrap's cursor is durable; the next start resumes it.
    keys.stop();
    // Acknowledged writes are already durable; this covers bookkeeping.
    if let Err(error) = store.flush().await {
        tracing::error!(%error, "final store flush failed");
    }
    let _ = ops_stop.send(());
    if let Ok(Err(error)) = ops_task.await {
        return Err(ServerError::Ops(error));
    }
    tracing::info!("credvault stopped");
    result
}

/// Reloads the keyring on SIGHUP and when its file changes. A rejected
/// keyring is logged and the running one stays.
async fn reload_keyring_on_change(
    keys: Arc<KeyManager>,
    path: std::path::PathBuf,
    interval: std::time::Duration,
) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let stamp = |path: &std::path::Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    let mut ticker = (!interval.is_zero()).then(|| tokio::time::interval(interval));
    loop {
        let hup = async {
            #[cfg(unix)]
            if let Some(signal) = hangup.as_mut() {
                signal.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let tick = async {
            match ticker.as_mut() {
                Some(ticker) => {
                    ticker.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let changed = tokio::select! {
            () = hup => true,
            () = tick => {
                let now = stamp(&path);
                let changed = now != seen;
                seen = now;
                changed
            }
        };
        if changed {
            if let Err(error) = keys.reload().await {
                tracing::error!(%error, "keyring reload refused; keeping the running keyring");
            }
        }
    }
}

/// Keeps the gauges that cost a store scan fresh, off the scrape path.
async fn refresh_gauges(
    keys: Arc<KeyManager>,
    store: Arc<dyn CredentialStore>,
    metrics: Arc<Metrics>,
) {
    // The record count walks the whole store: not at start-up (cold start
    // matters) and not often. Store size is cheap and goes with it.
    let period = std::time::Duration::from_secs(60);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + std::time::Duration::from_secs(5),
        period,
    );
    loop {
        ticker.tick().await;
        // Updates the per-version record gauges as a side effect.
        let _ = keys.status().await;
        if let Some(bytes) = store.size_on_disk() {
            metrics.store_bytes.set(bytes);
        }
    }
}
