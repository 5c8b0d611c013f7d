//! Proactive refresh (off by default): a background sweep that refreshes
//! access tokens nearing expiry, so callers rarely wait on a provider.
//!
//! The sweep goes through the same single-flight path as a caller would, so it
//! can never race a caller's refresh; a bounded number run at once, so a
//! large store cannot flood a provider. Each sweep reads (and decrypts) every
//! record, which is why it is opt-in and meant for modest stores.

use std::{sync::Arc, time::Duration};

use futures::TryStreamExt;
use tokio::sync::Semaphore;

use super::{
    model::{CredentialId, CredentialRecord, CredentialState, TokenRequest},
    Broker,
};

/// Settings of the proactive refresher.
#[derive(Clone, Debug)]
pub struct AheadSettings {
    /// Time between sweeps.
    pub interval: Duration,
    /// Refresh tokens that expire within this window.
    pub window: Duration,
    /// Refreshes running at once.
    pub concurrency: usize,
}

/// Runs sweeps until the task is dropped or aborted.
pub async fn run(broker: Arc<Broker>, settings: AheadSettings) {
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) = sweep(&broker, &settings, &permits).await {
            tracing::warn!(%error, "proactive refresh sweep failed");
        }
    }
}

async fn sweep(
    broker: &Arc<Broker>,
    settings: &AheadSettings,
    permits: &Arc<Semaphore>,
) -> Result<(), super::BrokerError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut all = std::pin::pin!(broker.store.records(None));
    while let Some((key, versioned)) = all.try_next().await? {
        let Some((tenant, subject, provider)) = key.parts() else {
            continue;
        };
        let id = CredentialId {
            tenant,
            subject,
            provider,
        };
        // Unreadable records are reported when someone asks for them.
        let Ok(record) = broker.open(&id, &versioned) else {
            continue;
        };
        if !due(&record, settings.window) {
            continue;
        }
        let Ok(permit) = Arc::clone(permits).acquire_owned().await else {
            return Ok(());
        };
        let broker = Arc::clone(broker);
        let window = settings.window;
        tasks.spawn(async move {
            let _permit = permit;
            let request = TokenRequest {
                id,
                min_valid_for: Some(window),
                force_refresh: false,
            };
            if let Err(error) = broker.get_access_token(request).await {
                tracing::info!(%error, "proactive refresh failed");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn due(record: &CredentialRecord, window: Duration) -> bool {
    record.state == CredentialState::Active
        && (record.refresh_token.is_some() || record.client_credentials)
        && record
            .access_token
            .as_ref()
            .is_none_or(|token| nearing_expiry(token, record.last_refresh_at, window))
}

/// Due when the token expires within `window` *and* at least half of its
/// lifetime is used up. The second condition keeps a window longer than the
/// provider's token lifetime from refreshing the same credential every sweep.
fn nearing_expiry(
    token: &super::model::AccessToken,
    issued_at: Option<std::time::SystemTime>,
    window: Duration,
) -> bool {
    let now = std::time::SystemTime::now();
    if token.valid_for(window, now) {
        return false;
    }
    let Some(issued_at) = issued_at else {
        return true;
    };
    let lifetime = token
        .expires_at
        .duration_since(issued_at)
        .unwrap_or_default();
    let age = now.duration_since(issued_at).unwrap_or_default();
    age >= lifetime / 2
}
