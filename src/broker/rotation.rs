//! Key rotation on a live vault, behind one front ([`KeyRotation`]):
//! reloading the keyring without a restart, per-version record counts, and
//! rewrap (re-encrypting every record under one target key, online).
//!
//! A reload swaps the whole keyring atomically (readers never see half of
//! one) and only after the fingerprint guard accepted it. A rewrap seals each
//! record through the broker's one write path, pinned to the key version
//! that was primary when it started, so it serializes with Deposit, Revoke
//! and refresh write-backs: none of them can be lost. Its progress is saved
//! as a cursor in the store, so a killed rewrap resumes where it was.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use futures::TryStreamExt;

use super::{
    fingerprints,
    jobs::{ClaimSeen, JobClaim},
    model::CredentialId,
    record,
    write::{How, Step},
    Broker, BrokerError,
};
use crate::{
    crypto::{self, KeyInfo, KeyVersion, KeyringSource},
    store::{StoreKey, Versioned},
};

/// The states a key's status reports, in the crypto module's words.
pub use crate::crypto::KeyState;

const CURSOR_META: &str = "rewrap/cursor";
/// The job claim's name: one replica rewraps at a time.
const REWRAP_JOB: &str = "rewrap";
const TARGET_META: &str = "rewrap/target";
/// Records rewrapped between two durable progress checkpoints.
const CHECKPOINT_EVERY: u64 = 256;

/// Why a key operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    /// The new keyring was refused; the running one stays in place.
    #[error("keyring rejected: {0}")]
    Rejected(String),
    #[error("{0}")]
    Broker(#[from] BrokerError),
}

/// Keys, their states and how many records each seals.
#[derive(Clone, Debug)]
pub struct KeyStatus {
    pub primary: u32,
    pub versions: Vec<(KeyInfo, u64)>,
    pub under_unknown_versions: u64,
    pub unreadable: u64,
}

/// Where a rewrap stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewrapState {
    Idle,
    Running,
    Done,
    Failed,
}

/// A snapshot of rewrap progress.
#[derive(Clone, Debug)]
pub struct RewrapStatus {
    pub state: RewrapState,
    pub target_version: u32,
    pub scanned: u64,
    pub rewrapped: u64,
    pub skipped: u64,
    pub failed: u64,
    pub total: u64,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub error: Option<String>,
}

#[derive(Default)]
struct Progress {
    scanned: AtomicU64,
    rewrapped: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    total: AtomicU64,
    meta: Mutex<ProgressMeta>,
}

struct ProgressMeta {
    state: RewrapState,
    target: u32,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    error: Option<String>,
}

impl Default for ProgressMeta {
    fn default() -> Self {
        Self {
            state: RewrapState::Idle,
            target: 0,
            started_at: None,
            finished_at: None,
            error: None,
        }
    }
}

/// Runtime key management for one vault.
pub struct KeyRotation {
    broker: Arc<Broker>,
    source: KeyringSource,
    default_rate: u32,
    progress: Arc<Progress>,
    job: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Another replica's rewrap claim, and when this one first saw it (on
    /// its own clock): the claim is taken over only once it outlived the
    /// store's bound without being renewed.
    claim_seen: Arc<ClaimSeen>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl KeyRotation {
    pub fn new(broker: Arc<Broker>, source: KeyringSource, default_rate: u32) -> Arc<Self> {
        Arc::new(Self {
            broker,
            source,
            default_rate: default_rate.max(1),
            progress: Arc::default(),
            job: Mutex::new(None),
            claim_seen: Arc::default(),
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Reads the keyring file again and swaps it in if the store accepts it.
    pub async fn reload(&self) -> Result<KeyStatus, KeyAdminError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let keyring = self
            .source
            .load()
            .await
            .map_err(|e| KeyAdminError::Rejected(e.to_string()))?;
        fingerprints::check_and_remember(self.broker.store.as_ref(), &keyring)
            .await
            .map_err(|e| KeyAdminError::Rejected(e.to_string()))?;
        let primary = keyring.primary();
        self.broker.keys.replace(keyring);
        self.broker.publish_key_versions().await?;
        let status = self.status().await?;
        for (info, count) in &status.versions {
            if *count > 0
                && !matches!(
                    info.state,
                    crypto::KeyState::Active | crypto::KeyState::DecryptOnly
                )
            {
                tracing::warn!(
                    key_version = info.version.get(),
                    state = %info.state,
                    records = count,
                    "records are sealed under a key version that no longer decrypts"
                );
            }
        }
        tracing::info!(primary = primary.get(), "keyring reloaded");
        Ok(status)
    }

    /// Per-version record counts, from envelope headers (no decryption).
    pub async fn status(&self) -> Result<KeyStatus, KeyAdminError> {
        let keyring = self.broker.keys.current();
        let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
        let mut unreadable = 0;
        let mut all = std::pin::pin!(self.broker.store.records(None));
        while let Some((_, versioned)) = all.try_next().await.map_err(BrokerError::from)? {
            match sealed_under(&versioned) {
                Some(version) => *counts.entry(version.get()).or_default() += 1,
                None => unreadable += 1,
            }
        }
        let versions: Vec<(KeyInfo, u64)> = keyring
            .versions()
            .into_iter()
            .map(|info| {
                let count = counts.remove(&info.version.get()).unwrap_or(0);
                (info, count)
            })
            .collect();
        let gauge: Vec<(u32, u64)> = versions
            .iter()
            .map(|(info, count)| (info.version.get(), *count))
            .collect();
        self.broker.metrics.set_records(&gauge);
        Ok(KeyStatus {
            primary: keyring.primary().get(),
            versions,
            under_unknown_versions: counts.values().sum(),
            unreadable,
        })
    }

    /// The current or last rewrap.
    pub fn rewrap_status(&self) -> RewrapStatus {
        let p = &self.progress;
        let meta = p.meta.lock().unwrap_or_else(|e| e.into_inner());
        RewrapStatus {
            state: meta.state,
            target_version: meta.target,
            scanned: p.scanned.load(Ordering::Relaxed),
            rewrapped: p.rewrapped.load(Ordering::Relaxed),
            skipped: p.skipped.load(Ordering::Relaxed),
            failed: p.failed.load(Ordering::Relaxed),
            total: p.total.load(Ordering::Relaxed),
            started_at: meta.started_at,
            finished_at: meta.finished_at,
            error: meta.error.clone(),
        }
    }

    /// Starts a rewrap to the current primary, or returns the running one.
    pub fn start_rewrap(&self, records_per_second: Option<u32>) -> RewrapStatus {
        let mut job = self.job.lock().unwrap_or_else(|e| e.into_inner());
        if job.as_ref().is_some_and(|j| !j.is_finished()) {
            drop(job);
            return self.rewrap_status();
        }
        let target = self.broker.keys.current().primary().get();
        let p = &self.progress;
        for counter in [&p.scanned, &p.rewrapped, &p.skipped, &p.failed, &p.total] {
            counter.store(0, Ordering::Relaxed);
        }
        *p.meta.lock().unwrap_or_else(|e| e.into_inner()) = ProgressMeta {
            state: RewrapState::Running,
            target,
            started_at: Some(SystemTime::now()),
            finished_at: None,
            error: None,
        };
        let rate = records_per_second
            .filter(|r| *r > 0)
            .unwrap_or(self.default_rate);
        let (broker, progress) = (Arc::clone(&self.broker), Arc::clone(&self.progress));
        let claim_seen = Arc::clone(&self.claim_seen);
        *job = Some(tokio::spawn(async move {
            let result = match JobClaim::acquire(&broker, REWRAP_JOB, &claim_seen).await {
                Ok(claim) => {
                    let result = rewrap(&broker, &progress, target, rate, &claim).await;
                    claim.release(&broker).await;
                    result
                }
                Err(error) => Err(error),
            };
            let mut meta = progress.meta.lock().unwrap_or_else(|e| e.into_inner());
            meta.finished_at = Some(SystemTime::now());
            match result {
                Ok(()) => meta.state = RewrapState::Done,
                Err(error) => {
                    tracing::error!(%error, "rewrap failed");
                    meta.state = RewrapState::Failed;
                    meta.error = Some(error.to_string());
                }
            }
        }));
        drop(job);
        self.rewrap_status()
    }

    /// Stops a running rewrap (its cursor stays, so the next start resumes).
    pub fn stop(&self) {
        if let Some(job) = self.job.lock().unwrap_or_else(|e| e.into_inner()).take() {
            job.abort();
        }
    }
}

/// The key version a stored value is sealed under, read from the envelope
/// header without decrypting; `None` for a value too damaged to say.
fn sealed_under(versioned: &Versioned) -> Option<KeyVersion> {
    record::unframe(&versioned.value)
        .and_then(|(_, envelope)| crypto::key_version_of(envelope).ok())
}

async fn rewrap(
    broker: &Broker,
    progress: &Progress,
    target: u32,
    rate: u32,
    claim: &JobClaim,
) -> Result<(), BrokerError> {
    let target = KeyVersion::new(target).ok_or(BrokerError::Internal("key version 0"))?;
    // A record rewrapped to a key some replica cannot open would fail there.
    if !broker.everyone_opens(target.get()) {
        return Err(BrokerError::KeyRolloutPending {
            version: target.get(),
        });
    }
    let after = resume_point(broker, target).await?;
    let store = broker.store.as_ref();
    progress
        .total
        .store(store.count_after(after.clone()).await?, Ordering::Relaxed);

    // A zero period would panic; anything under a microsecond is "unlimited".
    let period = (Duration::from_secs(1) / rate).max(Duration::from_micros(1));
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut all = std::pin::pin!(store.records(after));
    let mut last = None;
    let mut renewed = std::time::Instant::now();
    while let Some((key, versioned)) = all.try_next().await? {
        let scanned = progress.scanned.fetch_add(1, Ordering::Relaxed) + 1;
        let outcome = match (sealed_under(&versioned), key.parts()) {
            (Some(version), _) if version == target => Outcome::Skipped,
            // Corrupt records are reported, never rewritten.
            (None, _) | (_, None) => Outcome::Failed,
            (Some(_), Some((tenant, subject, provider))) => {
                pace.tick().await;
                let id = CredentialId {
                    tenant,
                    subject,
                    provider,
                };
                rewrap_one(broker, &id, target).await?
            }
        };
        progress.count(outcome);
        last = Some(key);
        if scanned % CHECKPOINT_EVERY == 0 {
            checkpoint(broker, last.as_ref()).await?;
        }
        // Renewed well within the bound, however slow the pace; the cursor
        // moves with it, so a takeover resumes close to where this stopped.
        let bound = broker.store.claim_takeover();
        if !bound.is_zero() && renewed.elapsed() >= bound / 3 {
            checkpoint(broker, last.as_ref()).await?;
            claim.renew(broker).await?;
            renewed = std::time::Instant::now();
        }
    }
    checkpoint(broker, last.as_ref()).await?;
    store.put_meta(CURSOR_META, Vec::new()).await?;
    tracing::info!(
        target_version = target.get(),
        rewrapped = progress.rewrapped.load(Ordering::Relaxed),
        failed = progress.failed.load(Ordering::Relaxed),
        "rewrap finished"
    );
    Ok(())
}

/// Where a rewrap towards `target` starts: after the saved cursor of an
/// interrupted rewrap to the same target; a new target starts over.
async fn resume_point(
    broker: &Broker,
    target: KeyVersion,
) -> Result<Option<StoreKey>, BrokerError> {
    let store = broker.store.as_ref();
    let target_bytes = target.get().to_be_bytes();
    if store.get_meta(TARGET_META).await?.as_deref() == Some(&target_bytes[..]) {
        let after = store
            .get_meta(CURSOR_META)
            .await?
            .filter(|c| !c.is_empty())
            .map(StoreKey::from_bytes);
        if after.is_some() {
            tracing::info!(target_version = target.get(), "resuming rewrap");
        }
        return Ok(after);
    }
    store.put_meta(TARGET_META, target_bytes.to_vec()).await?;
    store.put_meta(CURSOR_META, Vec::new()).await?;
    Ok(None)
}

/// Makes the rewrapped records durable, then moves the cursor past them:
/// the cursor never runs ahead of what a crash would keep.
async fn checkpoint(broker: &Broker, last: Option<&StoreKey>) -> Result<(), BrokerError> {
    let Some(last) = last else { return Ok(()) };
    broker.store.flush().await?;
    broker
        .store
        .put_meta(CURSOR_META, last.as_bytes().to_vec())
        .await?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Outcome {
    Rewrapped,
    Skipped,
    Failed,
}

impl Progress {
    fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Rewrapped => &self.rewrapped,
            Outcome::Skipped => &self.skipped,
            Outcome::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Re-seals one record under `target`, through the one write path: whatever
/// was written meanwhile is what gets sealed.
async fn rewrap_one(
    broker: &Broker,
    id: &CredentialId,
    target: KeyVersion,
) -> Result<Outcome, BrokerError> {
    let how = How {
        durable: false,
        key: Some(target),
        ..How::DURABLE
    };
    let wrote = broker
        .write(id, how, |current| {
            let Some(current) = current else {
                return Ok(Step::Leave(Outcome::Skipped));
            };
            if sealed_under(current) == Some(target) {
                return Ok(Step::Leave(Outcome::Skipped));
            }
            match broker.open(id, current) {
                Ok(record) => Ok(Step::Put(Box::new(record), None, Outcome::Rewrapped)),
                Err(error) => {
                    tracing::warn!(tenant = %id.tenant, provider = %id.provider, %error, "rewrap cannot open a record; left untouched");
                    Ok(Step::Leave(Outcome::Failed))
                }
            }
        })
        .await?;
    Ok(wrote.answer)
}
