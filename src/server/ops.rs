//! The plaintext ops listener: `/livez` and `/readyz` for Kubernetes probes,
//! `/metrics` for Prometheus. It serves no credential data, which is why it
//! may be plaintext.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use tokio::net::TcpListener;

use crate::{store::CredentialStore, telemetry::Metrics};

/// Whether the vault can serve: store open and healthy, keyring loaded, not
/// draining.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    store: Arc<OnceLock<Arc<dyn CredentialStore>>>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Probes also report the store's health from now on.
    pub fn watch_store(&self, store: Arc<dyn CredentialStore>) {
        let _ = self.store.set(store);
    }

    fn store_healthy(&self) -> bool {
        self.store.get().is_none_or(|s| s.healthy())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.store.get().is_none_or(|s| s.ready())
    }
}

/// The running ops listener.
pub struct OpsServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OpsServer {
    /// Serves the ops endpoints in the background until [`OpsServer::stop`].
    pub fn start(listener: TcpListener, readiness: Readiness, metrics: Arc<Metrics>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, readiness, metrics, async move {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Serves the ops endpoints until `shutdown` resolves.
async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        // A store that latched a write failure only recovers by a restart;
        // failing liveness makes the orchestrator do it.
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .with_state(readiness)
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn live(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    if readiness.store_healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "store failing; restart required\n",
        )
    }
}

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    if readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
