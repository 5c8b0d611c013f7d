//! A webhook receiver: a real HTTP server that verifies every delivery's
//! Standard Webhooks signature on its own (HMAC-SHA256 over
//! `{id}.{timestamp}.{body}`, written here from the spec, not taken from
//! the vault) and records what it got. It can be down (503) for a while.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Router,
};
use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// One POST as received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
    /// The signature verified and the timestamp was within five minutes.
    pub verified: bool,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Inner {
    key: Vec<u8>,
    down: AtomicBool,
    received: Mutex<Vec<Delivery>>,
    refused: Mutex<usize>,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

/// A fresh `whsec_` secret and its key bytes.
pub fn new_secret() -> (String, Vec<u8>) {
    let key: Vec<u8> = (0..24).map(|_| rand::random::<u8>()).collect();
    (format!("whsec_{}", STANDARD.encode(&key)), key)
}

/// Standard Webhooks verification, as a receiver implements it.
pub fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    let fresh = timestamp.parse::<u64>().is_ok_and(|ts| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        now.abs_diff(ts) <= 300
    });
    // The header may carry several space-separated signatures.
    fresh
        && signature
            .split(' ')
            .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

impl WebhookReceiver {
    /// Listens on `addr` (port 0 for any).
    pub async fn start(addr: SocketAddr, key: Vec<u8>) -> Self {
        let inner = Arc::new(Inner {
            key,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/hooks", post(receive))
            .with_state(Arc::clone(&inner));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, inner, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// While down, every delivery gets a 503.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Delivery> {
        self.inner.received.lock().unwrap().clone()
    }

    /// Deliveries answered 503 while down.
    pub fn refused(&self) -> usize {
        *self.inner.refused.lock().unwrap()
    }

    /// Waits until `n` distinct events (by `webhook-id`) have arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let received = self.received();
            let mut ids: Vec<&str> = received.iter().map(|d| d.id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() >= n {
                return received;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} events delivered: {received:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if inner.down.load(Ordering::SeqCst) {
        *inner.refused.lock().unwrap() += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let verified = verify(&inner.key, &id, &timestamp, &body, &signature);
    inner.received.lock().unwrap().push(Delivery {
        id,
        timestamp,
        signature,
        body: body.to_vec(),
        verified,
    });
    if verified {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    }
}
