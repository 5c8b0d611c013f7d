//! Assembly and serving: [`Vault::build`] wires the parts from a config,
//! [`serve`] runs the mTLS (and mesh) gRPC listener until shutdown, and
//! [`run`] does both with the ops listener answering probes throughout.
//!
//! [`run`] takes bound listeners and a shutdown future, so tests run the real
//! server on `127.0.0.1:0` and stop it when they like (the mini-redis shape).
//!
//! Shutdown: readiness and health go NOT_SERVING first (so balancers stop
//! sending), tonic stops accepting and drains in-flight calls for at most
//! `server.shutdown_grace`, the background tasks stop together, then the
//! store is flushed.

pub mod ops;
pub mod tls;
mod vault;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::Stream;

pub use self::vault::{store_settings, Vault};
use crate::{
    api::{
        pb::{
            credential_vault_server::CredentialVaultServer, vault_admin_server::VaultAdminServer,
        },
        AdminService, AdmissionLayer, CallLimits, VaultService, Watching,
    },
    broker::fingerprints::KeyGuardError,
    config::{Config, ConfigError},
    telemetry::Metrics,
};

/// Why the server could not start or stopped abnormally. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Keyring(String),
    #[error("{0}")]
    KeyGuard(#[from] KeyGuardError),
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

/// Builds the vault and serves it until `shutdown` resolves. The ops
/// listener answers from the first moment ("not ready" while starting).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let readiness = ops::Readiness::default();
    let ops = ops::OpsServer::start(listeners.ops, readiness.clone(), Arc::clone(&metrics));
    let served = match Vault::build(&config, metrics).await {
        Ok(vault) => serve(vault, listeners.grpc, listeners.mesh, &readiness, shutdown).await,
        Err(error) => Err(error),
    };
    let stopped = ops.stop().await.map_err(ServerError::Ops);
    if served.is_ok() {
        tracing::info!("credvault stopped");
    }
    served.and(stopped)
}

/// How long jobs get at shutdown to give their claims back.
const JOBS_GRACE: Duration = Duration::from_secs(5);

/// Serves `vault` on `grpc` (and the mesh listener, in mesh mode) until
/// `shutdown` resolves, then drains, stops its tasks and flushes the store.
pub async fn serve(
    mut vault: Vault,
    grpc: TcpListener,
    mesh: Option<TcpListener>,
    readiness: &ops::Readiness,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let config = vault.config.clone();
    let incoming = incoming(&vault, grpc, mesh).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CredentialVaultServer<VaultService>>()
        .await;
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let grpc =
        services(&vault, health_service)?.serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stopped.await;
        });
    tokio::pin!(grpc);

    readiness.watch_store(Arc::clone(&vault.store));
    readiness.set(true);
    tracing::info!(listen = %config.listen, ops_listen = %config.ops_listen, "credvault is serving");

    let result = tokio::select! {
        result = &mut grpc => result.map_err(|e| ServerError::Transport(e.to_string())),
        () = shutdown => {
            tracing::info!("shutting down: draining in-flight calls");
            readiness.set(false);
            vault.stopping.send_replace(true);
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
    // Jobs saw `stopping` and are releasing their claims.
    vault.stopping.send_replace(true);
    let jobs_done = async { while vault.jobs.join_next().await.is_some() {} };
    if tokio::time::timeout(JOBS_GRACE, jobs_done).await.is_err() {
        vault.jobs.shutdown().await;
    }
    vault.tasks.shutdown().await;
    // A rewrap's cursor is durable; the next start resumes it.
    vault.rotation.stop();
    // Acknowledged writes are already durable; this covers bookkeeping.
    if let Err(error) = vault.store.flush().await {
        tracing::error!(%error, "final store flush failed");
    }
    result
}

type Incoming = Pin<Box<dyn Stream<Item = Result<tls::Connection, std::io::Error>> + Send>>;

/// The connections to serve: mTLS, merged with the mesh sidecar's in mesh
/// mode. One server for both: the same layers, limits and services.
async fn incoming(
    vault: &Vault,
    grpc: TcpListener,
    mesh: Option<TcpListener>,
) -> Result<Incoming, ServerError> {
    let config = &vault.config;
    let tls = tls::incoming(
        grpc,
        vault.tls.clone(),
        Arc::clone(&vault.auth),
        vault.trust.clone(),
        tls::HandshakeLimits {
            timeout: config.tls.handshake_timeout,
            concurrent: config.server.max_handshakes,
        },
    );
    let Some(mesh_config) = config.auth.mesh.as_ref().filter(|m| m.enabled) else {
        return Ok(Box::pin(tls));
    };
    let listener = match mesh {
        Some(listener) => listener,
        None => TcpListener::bind(mesh_config.listen).await.map_err(|e| {
            ServerError::Transport(format!("mesh listener {}: {e}", mesh_config.listen))
        })?,
    };
    tracing::warn!(listen = %mesh_config.listen, "mesh mode: trusting x-forwarded-client-cert from the local sidecar");
    let mesh = tls::mesh_incoming(
        listener,
        mesh_config.vault_identity.as_str().into(),
        vault.sidecar_secret.clone(),
    );
    Ok(Box::pin(tokio_stream::StreamExt::merge(tls, mesh)))
}

/// The gRPC router: transport limits, admission, and every service.
fn services(
    vault: &Vault,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<
    tonic::transport::server::Router<
        tower::layer::util::Stack<AdmissionLayer, tower::layer::util::Identity>,
    >,
    ServerError,
> {
    let server = &vault.config.server;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can render google.rpc error details from any status.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            // So `grpcurl list` shows every service the port really serves.
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
    };
    let transport = |e: tonic_reflection::server::Error| ServerError::Transport(e.to_string());
    let vault_service = CredentialVaultServer::new(VaultService::new(
        Arc::clone(&vault.broker),
        vault.calls.clone(),
        vault.config.tokens.max_min_valid_for,
        Watching {
            buffer: vault.config.events.stream_buffer,
            stall: vault.config.events.stream_stall,
            streams: Arc::new(tokio::sync::Semaphore::new(vault.config.events.max_streams)),
            stopping: vault.stopping.subscribe(),
        },
    ))
    .max_decoding_message_size(server.max_request_bytes);
    let admin = VaultAdminServer::new(AdminService::new(
        Arc::clone(&vault.broker),
        Arc::clone(&vault.rotation),
        Arc::clone(&vault.auth),
        vault.calls.clone(),
    ))
    .max_decoding_message_size(server.max_request_bytes);
    Ok(tonic::transport::Server::builder()
        // Detects dead peers on long-lived mesh connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Clients reconnect now and then, so a load balancer in front of a
        // replicated vault can spread them; in-flight calls finish.
        .max_connection_age(server.max_connection_age)
        .max_connection_age_grace(Duration::from_secs(30))
        // Bounds the streams one connection may multiplex; the global cap
        // below is what protects the vault.
        .max_concurrent_streams(Some(256))
        // Sheds calls beyond the global in-flight cap with OVERLOADED
        // instead of queueing them into timeouts, and bounds every call,
        // upstream round trips included, so a hung provider cannot pin a
        // client's request forever. (A client's own `grpc-timeout` is
        // tonic's to enforce.)
        .layer(AdmissionLayer::new(
            server.max_concurrent_calls,
            CallLimits {
                max_request_bytes: server.max_request_bytes,
                request_timeout: server.request_timeout,
            },
            Arc::clone(&vault.metrics),
        ))
        .add_service(health)
        .add_service(reflection().build_v1().map_err(transport)?)
        .add_service(reflection().build_v1alpha().map_err(transport)?)
        .add_service(vault_service)
        .add_service(admin))
}
