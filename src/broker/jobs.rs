//! Background jobs that one replica runs at a time (a rewrap, a webhook's
//! delivery), and the small durable bookmarks they keep their progress in.
//!
//! A job holds a claim in the store, renewed while it runs, so a live job's
//! claim never outlives the store's takeover bound. A replica that wants the
//! job notes when it first saw the current claim revision *on its own
//! clock* and takes the claim over only once that revision has stood for
//! the bound (the client-go leader-election rule): a dead replica's claim is
//! taken over, a slow live one's is not, and no clocks are compared. On a
//! store that only one process uses, every claim is granted at once.

use std::{sync::Mutex, time::Instant};

use super::{Broker, BrokerError};
use crate::store::{ClaimOutcome, ClaimToken, Revision, StoreKey};

/// The claim revision another replica holds, and when this one first saw
/// it. Kept by whoever asks for a job again and again.
#[derive(Default)]
pub struct ClaimSeen(Mutex<Option<(Revision, Instant)>>);

/// This replica's claim on a job.
pub struct JobClaim {
    key: StoreKey,
    token: Mutex<Option<ClaimToken>>,
}

impl JobClaim {
    fn key(job: &str) -> StoreKey {
        // 0xff can never begin a credential's key (a tenant of 65280+ bytes).
        let mut key = b"\xffjob/".to_vec();
        key.extend_from_slice(job.as_bytes());
        StoreKey::from_bytes(key)
    }

    /// The claim on `job`, or [`BrokerError::JobRunningElsewhere`] while
    /// another replica's claim stands.
    pub async fn acquire(
        broker: &Broker,
        job: &str,
        seen: &ClaimSeen,
    ) -> Result<Self, BrokerError> {
        let store = broker.store.as_ref();
        let key = Self::key(job);
        let outcome = match store.claim(&key).await? {
            ClaimOutcome::Held { revision } => {
                let outlived = {
                    let mut seen = seen.0.lock().unwrap_or_else(|e| e.into_inner());
                    match *seen {
                        Some((held, since)) if held == revision => {
                            since.elapsed() >= store.claim_takeover()
                        }
                        _ => {
                            *seen = Some((revision, Instant::now()));
                            false
                        }
                    }
                };
                if !outlived {
                    return Err(BrokerError::JobRunningElsewhere);
                }
                tracing::warn!(
                    job,
                    "taking over a job from a replica that stopped renewing it"
                );
                store.take_over(&key, revision).await?
            }
            won => won,
        };
        match outcome {
            ClaimOutcome::Won(token) => Ok(Self {
                key,
                token: Mutex::new(token),
            }),
            ClaimOutcome::Held { .. } => Err(BrokerError::JobRunningElsewhere),
        }
    }

    /// Re-writes the claim, so waiters restart their clocks. An error means
    /// the claim was lost: stop the job.
    pub async fn renew(&self, broker: &Broker) -> Result<(), BrokerError> {
        let Some(current) = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        match broker.store.take_over(&self.key, current.revision).await? {
            ClaimOutcome::Won(token) => {
                *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
                Ok(())
            }
            ClaimOutcome::Held { .. } => Err(BrokerError::JobRunningElsewhere),
        }
    }

    pub async fn release(&self, broker: &Broker) {
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(token) = token {
            let _ = broker.store.release(&self.key, &token).await;
        }
    }

    /// How often a running job renews: well within the takeover bound.
    pub fn renew_every(broker: &Broker) -> Option<std::time::Duration> {
        let bound = broker.store.claim_takeover();
        (!bound.is_zero()).then(|| bound / 3)
    }
}

impl Broker {
    /// A job's saved progress (`None`: never saved).
    pub async fn bookmark(&self, job: &str) -> Result<Option<String>, BrokerError> {
        let value = self.store.get_meta(&bookmark_name(job)).await?;
        Ok(value.and_then(|v| String::from_utf8(v).ok()))
    }

    /// Saves a job's progress durably.
    pub async fn set_bookmark(&self, job: &str, value: &str) -> Result<(), BrokerError> {
        Ok(self
            .store
            .put_meta(&bookmark_name(job), value.as_bytes().to_vec())
            .await?)
    }
}

fn bookmark_name(job: &str) -> String {
    format!("job/{job}/bookmark")
}
