//! Webhook sinks: credential events POSTed to an HTTP endpoint, signed per
//! Standard Webhooks, for systems that do not hold a watch stream.
//!
//! Each sink is a job ([`JobClaim`]): one replica delivers it at a time,
//! renewing its claim while it runs, and a dead replica's claim is taken
//! over after the store's bound. The sink reads the event log like any
//! watcher, from a durable bookmark (the cursor of the last event it
//! delivered), so a restart or a takeover resumes where delivery stopped:
//!
//! - **At least once.** The bookmark moves only after the receiver answered
//!   2xx; a crash in between delivers that event again with the same
//!   `webhook-id` (the event's cursor), so receivers can deduplicate.
//! - **In order.** Events go out one at a time, in log order, each retried
//!   (exponential backoff from `retry_base` to `retry_max`) until it is
//!   delivered: later events wait, so a credential's events arrive in order.
//! - **Through the endpoint policy**, on the upstream HTTP client: no
//!   redirects (a 3xx is a failed attempt), no proxy, no internal addresses
//!   unless allowed.
//! - **Trimmed history.** A sink down for longer than the retention resumes
//!   at the newest event and counts what it lost
//!   (`credvault_webhook_events_lost_total`).

mod signature;

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use url::Url;

pub use self::signature::SigningKey;
use crate::{
    broker::{
        events::{CredentialEvent, EventFilter, EventType, StartAt},
        jobs::{ClaimSeen, JobClaim},
        Broker, BrokerError,
    },
    telemetry::{
        metrics::{DeliveryLabels, WebhookLabels},
        Metrics,
    },
    upstream::Upstream,
};

/// How long a replica waits before asking again for a sink another replica
/// delivers, or after a failure outside delivery (the store is down).
const IDLE_RETRY: Duration = Duration::from_secs(1);
/// Events a sink skips (not its tenants or types) between two saves of its
/// bookmark.
const SKIPPED_PER_SAVE: u32 = 256;

/// One sink, from the settings.
#[derive(Debug)]
pub struct WebhookSink {
    /// Names the sink's delivery state.
    pub name: String,
    pub url: Url,
    /// Empty: every tenant.
    pub tenants: BTreeSet<String>,
    /// Empty: every type.
    pub types: BTreeSet<EventType>,
    pub key: SigningKey,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// One attempt's timeout.
    pub timeout: Duration,
}

impl WebhookSink {
    fn wants(&self, event: &CredentialEvent) -> bool {
        (self.tenants.is_empty() || self.tenants.contains(&event.id.tenant))
            && (self.types.is_empty() || self.types.contains(&event.kind))
    }

    fn job(&self) -> String {
        format!("webhook/{}", self.name)
    }
}

/// Delivers `sink` until `stopping` turns true; then gives its claim back,
/// so another replica takes over at once rather than after the bound.
pub async fn run(
    broker: Arc<Broker>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    sink: WebhookSink,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let delivery = Delivery {
        broker,
        upstream,
        metrics,
        sink,
    };
    let seen = ClaimSeen::default();
    let job = delivery.sink.job();
    loop {
        let acquired = tokio::select! {
            acquired = JobClaim::acquire(&delivery.broker, &job, &seen) => acquired,
            () = stopped(&mut stopping) => return,
        };
        let claim = match acquired {
            Ok(claim) => claim,
            Err(BrokerError::JobRunningElsewhere) => {
                tokio::time::sleep(IDLE_RETRY).await;
                continue;
            }
            Err(error) => {
                tracing::warn!(webhook = %delivery.sink.name, %error, "cannot claim webhook delivery");
                tokio::time::sleep(IDLE_RETRY).await;
                continue;
            }
        };
        // Cut short at shutdown: the bookmark has not moved past an event
        // whose delivery was interrupted, so it goes again (at least once).
        let result = tokio::select! {
            result = delivery.while_claimed(&claim) => result,
            () = stopped(&mut stopping) => {
                claim.release(&delivery.broker).await;
                return;
            }
        };
        claim.release(&delivery.broker).await;
        if let Err(error) = result {
            tracing::warn!(webhook = %delivery.sink.name, %error, "webhook delivery paused");
            tokio::time::sleep(IDLE_RETRY).await;
        }
    }
}

/// Resolves once shutdown began (or the vault is gone).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

struct Delivery {
    broker: Arc<Broker>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    sink: WebhookSink,
}

impl Delivery {
    /// Delivers from the bookmark on, until the claim is lost or the store
    /// fails.
    async fn while_claimed(&self, claim: &JobClaim) -> Result<(), BrokerError> {
        let job = self.sink.job();
        let start = match self.broker.bookmark(&job).await? {
            Some(cursor) => cursor,
            // A new sink starts with the events logged from now on.
            None => {
                let head = self.broker.events_head().await?;
                self.broker.set_bookmark(&job, &head).await?;
                head
            }
        };
        let everything = EventFilter {
            tenant: None,
            types: BTreeSet::new(),
        };
        let events = match self.broker.watch(everything, StartAt::After(start)).await {
            Err(BrokerError::CursorExpired) => return self.skip_lost_history().await,
            other => other?,
        };
        let mut events = std::pin::pin!(events);
        let mut renewals = tokio::time::interval(
            JobClaim::renew_every(&self.broker).unwrap_or(Duration::from_secs(3600)),
        );
        renewals.tick().await;
        let mut skipped = 0u32;
        loop {
            let event = tokio::select! {
                _ = renewals.tick() => {
                    claim.renew(&self.broker).await?;
                    continue;
                }
                next = events.next() => match next {
                    Some(Ok(event)) => event,
                    Some(Err(BrokerError::CursorExpired)) => return self.skip_lost_history().await,
                    Some(Err(error)) => return Err(error),
                    None => return Ok(()),
                },
            };
            if !self.sink.wants(&event) {
                skipped += 1;
                if skipped >= SKIPPED_PER_SAVE {
                    self.broker.set_bookmark(&job, &event.cursor).await?;
                    skipped = 0;
                }
                continue;
            }
            self.deliver(&event, claim).await?;
            self.broker.set_bookmark(&job, &event.cursor).await?;
            skipped = 0;
        }
    }

    /// The log was trimmed past the bookmark: resume at the newest event.
    async fn skip_lost_history(&self) -> Result<(), BrokerError> {
        tracing::error!(webhook = %self.sink.name, "webhook fell behind the event retention; events were lost");
        self.metrics
            .webhooks
            .events_lost
            .get_or_create(&self.labels())
            .inc();
        let head = self.broker.events_head().await?;
        self.broker.set_bookmark(&self.sink.job(), &head).await
    }

    fn labels(&self) -> WebhookLabels {
        WebhookLabels {
            webhook: self.sink.name.clone(),
        }
    }

    /// One event, retried until the receiver takes it; the claim is
    /// renewed meanwhile, and a lost claim ends the attempt.
    async fn deliver(&self, event: &CredentialEvent, claim: &JobClaim) -> Result<(), BrokerError> {
        let body = payload(event);
        let id = format!("evt_{}", event.cursor);
        let mut delay = self.sink.retry_base;
        let mut renewed = tokio::time::Instant::now();
        let renew_every = JobClaim::renew_every(&self.broker);
        loop {
            let age = SystemTime::now()
                .duration_since(event.at)
                .unwrap_or_default();
            self.metrics
                .webhooks
                .lag_seconds
                .get_or_create(&self.labels())
                .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
            let outcome = self.attempt(&id, &body).await;
            let delivered = matches!(outcome, Ok(200..=299));
            self.metrics
                .webhooks
                .deliveries
                .get_or_create(&DeliveryLabels {
                    webhook: self.sink.name.clone(),
                    outcome: if delivered { "delivered" } else { "failed" }.into(),
                })
                .inc();
            if delivered {
                self.metrics
                    .webhooks
                    .lag_seconds
                    .get_or_create(&self.labels())
                    .set(0);
                return Ok(());
            }
            match outcome {
                Ok(status) => {
                    tracing::warn!(webhook = %self.sink.name, status, retry_in = ?delay, "webhook receiver refused an event")
                }
                Err(error) => {
                    tracing::warn!(webhook = %self.sink.name, %error, retry_in = ?delay, "webhook delivery failed")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.sink.retry_max);
            if renew_every.is_some_and(|every| renewed.elapsed() >= every) {
                claim.renew(&self.broker).await?;
                renewed = tokio::time::Instant::now();
            }
        }
    }

    async fn attempt(&self, id: &str, body: &[u8]) -> Result<u16, crate::upstream::UpstreamError> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut headers = http::HeaderMap::new();
        let mut set = |name: &'static str, value: String| {
            if let Ok(value) = http::HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        };
        set("content-type", "application/json".into());
        set("webhook-id", id.to_owned());
        set("webhook-timestamp", timestamp.to_string());
        set("webhook-signature", self.sink.key.sign(id, timestamp, body));
        self.upstream
            .notify(&self.sink.url, headers, body.to_vec(), self.sink.timeout)
            .await
    }
}

/// The JSON body: Standard Webhooks' `type`/`timestamp`/`data` envelope
/// around the event. References, cause and labels; never a token.
fn payload(event: &CredentialEvent) -> Vec<u8> {
    let at = prost_types::Timestamp::from(event.at).to_string();
    let body = serde_json::json!({
        "type": format!("credential.{}", event.kind.as_str().to_ascii_lowercase()),
        "timestamp": at,
        "data": {
            "cursor": event.cursor,
            "type": event.kind.as_str(),
            "credential": {
                "tenant": event.id.tenant,
                "subject": event.id.subject,
                "provider": event.id.provider,
            },
            "at": at,
            "generation": event.generation,
            "cause": event.cause,
            "labels": event.labels,
        },
    });
    serde_json::to_vec(&body).unwrap_or_default()
}
