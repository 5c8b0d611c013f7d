//! Key management on a live vault: reloading the keyring without a restart,
//! per-version record counts, and rewrap (re-encrypting every record under
//! the primary key, online).
//!
//! A reload swaps the whole keyring atomically (readers never see half of
//! one) and only after the fingerprint guard accepted it. A rewrap takes the
//! credential's write lock for each record, so it serializes with Deposit,
//! Revoke and refresh write-backs: none of them can be lost. Its progress is
//! saved as a cursor in the store, so a killed rewrap resumes where it was.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use super::{keyguard, model::CredentialId, record, Broker, BrokerError};
use crate::{
    crypto::{self, KeyInfo, Keyring},
    secret::SecretString,
    store::{CasOutcome, StoreKey},
};

const CURSOR_META: &str = "rewrap/cursor";
const TARGET_META: &str = "rewrap/target";
const PAGE: usize = 256;

/// Where the keyring comes from, so it can be read again.
#[derive(Clone, Debug)]
pub struct KeyringSource {
    pub path: PathBuf,
    pub passphrase: Option<SecretString>,
    pub passphrase_file: Option<PathBuf>,
}

impl KeyringSource {
    fn load(&self) -> Result<Keyring, KeyAdminError> {
        let passphrase = match (&self.passphrase, &self.passphrase_file) {
            (Some(passphrase), _) => passphrase.clone(),
            (None, Some(file)) => crate::config::read_passphrase(file)
                .map_err(|e| KeyAdminError::Rejected(e.to_string()))?,
            (None, None) => return Err(KeyAdminError::Rejected("no passphrase configured".into())),
        };
        crypto::load(&self.path, &passphrase)
            .map_err(|e| KeyAdminError::Rejected(format!("{}: {e}", self.path.display())))
    }
}

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
pub struct KeyManager {
    broker: Arc<Broker>,
    source: KeyringSource,
    default_rate: u32,
    progress: Arc<Progress>,
    job: Mutex<Option<tokio::task::JoinHandle<()>>>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl KeyManager {
    pub fn new(broker: Arc<Broker>, source: KeyringSource, default_rate: u32) -> Arc<Self> {
        Arc::new(Self {
            broker,
            source,
            default_rate: default_rate.max(1),
            progress: Arc::default(),
            job: Mutex::new(None),
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Reads the keyring file again and swaps it in if the store accepts it.
    pub async fn reload(&self) -> Result<KeyStatus, KeyAdminError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let keyring = self.source.load()?;
        keyguard::check_and_remember(self.broker.store.as_ref(), &keyring)
            .await
            .map_err(|e| KeyAdminError::Rejected(e.to_string()))?;
        let primary = keyring.primary();
        self.broker.keys.replace(keyring);
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
        let everything = StoreKey::from_bytes(Vec::new());
        let mut after: Option<StoreKey> = None;
        loop {
            let page = self
                .broker
                .store
                .scan(&everything, after.as_ref(), 4 * PAGE)
                .await
                .map_err(BrokerError::from)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (_, versioned) in page {
                match record::unframe(&versioned.value)
                    .and_then(|(_, envelope)| crypto::key_version_of(envelope).ok())
                {
                    Some(version) => *counts.entry(version.get()).or_default() += 1,
                    None => unreadable += 1,
                }
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
        self.broker.metrics().set_records(&gauge);
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
        *job = Some(tokio::spawn(async move {
            let result = rewrap(&broker, &progress, target, rate).await;
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

async fn rewrap(
    broker: &Broker,
    progress: &Progress,
    target: u32,
    rate: u32,
) -> Result<(), BrokerError> {
    let store = broker.store.as_ref();
    // Resume only a rewrap towards the same target; a new primary restarts.
    let resumed_target = store.get_meta(TARGET_META).await?;
    let mut after = match resumed_target.as_deref() == Some(&target.to_be_bytes()[..]) {
        true => store
            .get_meta(CURSOR_META)
            .await?
            .filter(|c| !c.is_empty())
            .map(StoreKey::from_bytes),
        false => {
            store
                .put_meta(TARGET_META, target.to_be_bytes().to_vec())
                .await?;
            store.put_meta(CURSOR_META, Vec::new()).await?;
            None
        }
    };
    if after.is_some() {
        tracing::info!(target_version = target, "resuming rewrap");
    }
    let everything = StoreKey::from_bytes(Vec::new());
    progress.total.store(
        count_after(broker, after.as_ref()).await?,
        Ordering::Relaxed,
    );

    // A zero period would panic; anything under a microsecond is "unlimited".
    let period = (Duration::from_secs(1) / rate).max(Duration::from_micros(1));
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        let page = store.scan(&everything, after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        let last = last.clone();
        for (key, versioned) in page {
            progress.scanned.fetch_add(1, Ordering::Relaxed);
            let under = record::unframe(&versioned.value)
                .and_then(|(_, envelope)| crypto::key_version_of(envelope).ok());
            match under {
                Some(version) if version.get() == target => {
                    progress.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Corrupt records are reported, never rewritten.
                None => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(_) => {}
            }
            let Some((tenant, subject, provider)) = key.parts() else {
                progress.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            pace.tick().await;
            let id = CredentialId {
                tenant,
                subject,
                provider,
            };
            let counter = match rewrap_one(broker, &id, &key).await? {
                Outcome::Rewrapped => &progress.rewrapped,
                Outcome::Skipped => &progress.skipped,
                Outcome::Failed => &progress.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // The cursor moves only past writes that are durable.
        store.flush().await?;
        store
            .put_meta(CURSOR_META, last.as_bytes().to_vec())
            .await?;
        after = Some(last);
    }
    store.put_meta(CURSOR_META, Vec::new()).await?;
    tracing::info!(
        target_version = target,
        rewrapped = progress.rewrapped.load(Ordering::Relaxed),
        failed = progress.failed.load(Ordering::Relaxed),
        "rewrap finished"
    );
    Ok(())
}

enum Outcome {
    Rewrapped,
    Skipped,
    Failed,
}

async fn rewrap_one(
    broker: &Broker,
    id: &CredentialId,
    key: &StoreKey,
) -> Result<Outcome, BrokerError> {
    let _write = broker.write_lock(id).await;
    // Re-read under the lock: whatever was written meanwhile is what we seal.
    let Some(current) = broker.store.get(key).await? else {
        return Ok(Outcome::Skipped);
    };
    let record = match broker.open(id, &current) {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(tenant = %id.tenant, provider = %id.provider, %error, "rewrap cannot open a record; left untouched");
            return Ok(Outcome::Failed);
        }
    };
    let (value, _) = broker.seal(id, &record)?;
    match broker
        .store
        .compare_and_swap_unflushed(key, Some(current.revision), Some(value))
        .await?
    {
        CasOutcome::Written(_) => Ok(Outcome::Rewrapped),
        // Only another process could have written under our lock; whatever
        // it wrote was sealed under its primary.
        CasOutcome::Conflict(_) => Ok(Outcome::Skipped),
    }
}

async fn count_after(broker: &Broker, after: Option<&StoreKey>) -> Result<u64, BrokerError> {
    let everything = StoreKey::from_bytes(Vec::new());
    let mut cursor = after.cloned();
    let mut total = 0;
    loop {
        let page = broker
            .store
            .scan(&everything, cursor.as_ref(), 4 * PAGE)
            .await?;
        let Some((last, _)) = page.last() else { break };
        total += page.len() as u64;
        cursor = Some(last.clone());
    }
    Ok(total)
}
