//! The token lifecycle: deposit, serve, refresh, rotate, revoke.
//!
//! A GetAccessToken call flows cache -> store -> crypto -> upstream -> store.
//! The rules that make it exact:
//! - one refresh per credential at a time ([`flight`]); everyone waiting
//!   gets that refresh's result;
//! - every write (Deposit, Revoke, refresh write-back, reauth mark) happens
//!   under the credential's write lock and by compare-and-swap, so a refresh
//!   for a replaced or revoked grant can never land;
//! - upstream calls happen outside the write lock, so a slow provider never
//!   blocks a Deposit or a Revoke;
//! - a dead grant is persisted as REAUTH_REQUIRED and fails fast afterwards.

pub mod ahead;
pub mod cache;
pub mod error;
pub mod flight;
pub mod inspect;
pub mod keyguard;
pub mod keys;
pub mod model;
pub mod record;

use std::{
    collections::{hash_map::DefaultHasher, HashMap},
    hash::{Hash, Hasher},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{Mutex, MutexGuard};

pub use self::error::BrokerError;
use self::{
    cache::TokenCache,
    flight::SingleFlight,
    model::{
        AccessToken, ClientConfig, CredentialId, CredentialRecord, CredentialState, DepositCommand,
        Deposited, Grant, ReauthCause, Revoked, TokenRequest, UpstreamRevocation,
    },
};
use crate::{
    crypto::{self, OpenError, RecordIdentity, SharedKeyring},
    metrics::Metrics,
    store::{CasOutcome, CredentialStore, Versioned},
    upstream::{IssuedTokens, Upstream, UpstreamError},
};

/// How many times a write retries after losing a compare-and-swap before it
/// reports contention; losing needs a concurrent writer each time.
const CAS_ATTEMPTS: usize = 8;
const WRITE_LOCK_STRIPES: usize = 256;

/// Settings of the token lifecycle.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// A cached token is served only while it stays valid this long.
    pub refresh_skew: Duration,
    /// Upper bound on a caller's `min_valid_for`.
    pub max_min_valid_for: Duration,
    /// Provider presets by name: the OAuth client of Deposits that omit one.
    pub presets: HashMap<String, ClientConfig>,
    /// A `force_refresh` within this long of the last refresh is answered
    /// with that refresh's token: a client looping on 401 cannot hammer the
    /// provider.
    pub force_refresh_interval: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            refresh_skew: Duration::from_secs(60),
            max_min_valid_for: Duration::from_secs(24 * 3600),
            force_refresh_interval: Duration::from_secs(15),
            presets: HashMap::new(),
        }
    }
}

/// The outcome of one refresh flight, shared by all its waiters.
#[derive(Clone, Debug)]
struct FlightOutcome {
    token: AccessToken,
    /// Issued by the provider during this flight (not read from storage).
    fresh: bool,
    /// Issued within `force_refresh_interval`: good enough for a forced call.
    recent: bool,
}

type FlightResult = Result<FlightOutcome, BrokerError>;

/// The token broker. One per process, shared by every gRPC call.
pub struct Broker {
    store: Arc<dyn CredentialStore>,
    keys: SharedKeyring,
    upstream: Upstream,
    settings: BrokerSettings,
    cache: TokenCache,
    flights: SingleFlight<CredentialId, FlightResult>,
    write_locks: Vec<Mutex<()>>,
    metrics: Arc<Metrics>,
}

impl Broker {
    pub fn new(
        store: Arc<dyn CredentialStore>,
        keys: SharedKeyring,
        upstream: Upstream,
        settings: BrokerSettings,
    ) -> Arc<Self> {
        Self::with_metrics(store, keys, upstream, settings, Arc::default())
    }

    /// Like [`Broker::new`], reporting into `metrics`.
    pub fn with_metrics(
        store: Arc<dyn CredentialStore>,
        keys: SharedKeyring,
        upstream: Upstream,
        settings: BrokerSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            store,
            keys,
            upstream,
            settings,
            cache: TokenCache::default(),
            flights: SingleFlight::default(),
            write_locks: (0..WRITE_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The store, for whole-store operations (backups).
    pub fn store(&self) -> Arc<dyn CredentialStore> {
        Arc::clone(&self.store)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stores a new grant for `cmd.id`, replacing any previous one (and any
    /// reauth state). Code and client-credentials grants are exchanged first.
    pub async fn deposit(&self, cmd: DepositCommand) -> Result<Deposited, BrokerError> {
        let DepositCommand {
            id,
            client,
            grant,
            labels,
        } = cmd;
        let (client, preset) = match client {
            Some(client) => (client, None),
            None => match self.settings.presets.get(&id.provider) {
                Some(preset) => (preset.clone(), Some(id.provider.clone())),
                None => {
                    return Err(BrokerError::ClientRequired {
                        provider: id.provider.clone(),
                    })
                }
            },
        };
        self.upstream
            .check_client(&client)
            .await
            .map_err(|e| upstream_error(e, &id))?;

        // An exchanged code or a minted token cannot be stored right now.
        if !self.store.healthy() {
            return Err(BrokerError::Storage("the store is failing".into()));
        }
        // The exchange happens before the write lock: a slow provider must not
        // hold up other writers of this credential.
        let (refresh_token, access_token, client_credentials) = match grant {
            Grant::RefreshToken {
                refresh_token,
                access_token,
            } => (Some(refresh_token), access_token, false),
            Grant::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
            } => {
                let issued = self
                    .upstream
                    .exchange_code(&client, &code, &redirect_uri, code_verifier.as_ref())
                    .await
                    .map_err(|e| upstream_error(e, &id))?;
                (issued.refresh_token, Some(issued.access_token), false)
            }
            Grant::ClientCredentials => {
                let issued = self
                    .upstream
                    .client_credentials(&client)
                    .await
                    .map_err(|e| upstream_error(e, &id))?;
                (None, Some(issued.access_token), true)
            }
        };

        let now = SystemTime::now();
        let _write = self.write_lock(&id).await;
        let mut current = self.store.get(&id.store_key()).await?;
        for _ in 0..CAS_ATTEMPTS {
            // The clear generation is readable even when the record is not,
            // so a Deposit can always replace a broken or dead grant.
            let previous = current
                .as_ref()
                .and_then(|v| record::unframe(&v.value))
                .map_or(0, |(generation, _)| generation);
            let record = CredentialRecord {
                generation: previous + 1,
                state: CredentialState::Active,
                client: client.clone(),
                preset: preset.clone(),
                refresh_token: refresh_token.clone(),
                access_token: access_token.clone(),
                client_credentials,
                labels: labels.clone(),
                created_at: now,
                updated_at: now,
                last_refresh_at: None,
            };
            let (value, key_version) = self.seal(&id, &record)?;
            match self
                .store
                .compare_and_swap(
                    &id.store_key(),
                    current.as_ref().map(|v| v.revision),
                    Some(value),
                )
                .await?
            {
                CasOutcome::Written(_) => {
                    match &record.access_token {
                        Some(token) => self.cache.put(&id, token.clone()),
                        None => self.cache.remove(&id),
                    }
                    tracing::info!(
                        tenant = %id.tenant,
                        provider = %id.provider,
                        generation = record.generation,
                        key_version,
                        "credential deposited"
                    );
                    return Ok(Deposited {
                        generation: record.generation,
                        key_version,
                    });
                }
                CasOutcome::Conflict(now_stored) => current = now_stored,
            }
        }
        Err(BrokerError::Storage("write contention".into()))
    }

    /// An access token valid for at least `max(skew, min_valid_for)`.
    pub async fn get_access_token(
        self: &Arc<Self>,
        request: TokenRequest,
    ) -> Result<AccessToken, BrokerError> {
        let margin = request
            .min_valid_for
            .unwrap_or(self.settings.refresh_skew)
            .max(self.settings.refresh_skew);
        if !request.force_refresh {
            let cached = self.cache.get(&request.id, margin, SystemTime::now());
            self.metrics.cache(cached.is_some());
            if let Some(token) = cached {
                return Ok(token);
            }
        }
        // A caller that joined a flight started for a weaker requirement may
        // get a stored token that does not satisfy it; it then runs its own.
        for _ in 0..2 {
            let broker = Arc::clone(self);
            let id = request.id.clone();
            let force = request.force_refresh;
            let (outcome, joined) = self
                .flights
                .run_counted(
                    request.id.clone(),
                    move || async move { broker.refresh_flow(id, margin, force).await },
                    Err(BrokerError::Internal("refresh task failed")),
                )
                .await;
            if joined {
                self.metrics.coalesced_waiters.inc();
            }
            let outcome = outcome?;
            let acceptable = if request.force_refresh {
                outcome.recent
            } else {
                outcome.fresh || outcome.token.valid_for(margin, SystemTime::now())
            };
            if acceptable {
                return Ok(outcome.token);
            }
        }
        Err(BrokerError::Internal("could not satisfy the token request"))
    }

    /// Deletes the credential. A refresh in flight cannot bring it back: its
    /// write-back needs the record it started from.
    pub async fn revoke(&self, id: &CredentialId) -> Result<Revoked, BrokerError> {
        let removed = {
            let _write = self.write_lock(id).await;
            let mut current = self.store.get(&id.store_key()).await?;
            let mut removed = None;
            for _ in 0..CAS_ATTEMPTS {
                let Some(versioned) = current.take() else {
                    break;
                };
                match self
                    .store
                    .compare_and_swap(&id.store_key(), Some(versioned.revision), None)
                    .await?
                {
                    CasOutcome::Written(_) => {
                        removed = Some(versioned);
                        break;
                    }
                    CasOutcome::Conflict(now_stored) => current = now_stored,
                }
            }
            self.cache.remove(id);
            removed
        };
        let Some(removed) = removed else {
            return Ok(Revoked {
                existed: false,
                upstream: UpstreamRevocation::NotConfigured,
            });
        };
        tracing::info!(tenant = %id.tenant, provider = %id.provider, "credential revoked");
        let upstream = self.revoke_upstream(id, &removed).await;
        Ok(Revoked {
            existed: true,
            upstream,
        })
    }

    /// Best effort RFC 7009 revocation of the deleted grant's refresh token.
    async fn revoke_upstream(&self, id: &CredentialId, removed: &Versioned) -> UpstreamRevocation {
        let Ok(record) = self.open(id, removed) else {
            return UpstreamRevocation::NotConfigured;
        };
        let Ok(client) = self.client_for(&record) else {
            return UpstreamRevocation::NotConfigured;
        };
        let (Some(_), Some(token)) = (&client.revocation_endpoint, &record.refresh_token) else {
            return UpstreamRevocation::NotConfigured;
        };
        match self.upstream.revoke(&client, token).await {
            Ok(()) => UpstreamRevocation::Revoked,
            Err(error) => {
                tracing::warn!(provider = %id.provider, %error, "upstream revocation failed");
                UpstreamRevocation::Failed
            }
        }
    }

    /// The body of one refresh flight (runs detached from its callers).
    async fn refresh_flow(
        self: Arc<Self>,
        id: CredentialId,
        margin: Duration,
        force: bool,
    ) -> FlightResult {
        let mut rotation_retry_used = false;
        for _ in 0..4 {
            let (versioned, record) = self.load(&id).await?;
            if let CredentialState::ReauthRequired(cause) = record.state {
                return Err(reauth(cause, &id));
            }
            let now = SystemTime::now();
            let recent = record.last_refresh_at.is_some_and(|at| {
                now.duration_since(at)
                    .map_or(true, |age| age < self.settings.force_refresh_interval)
            });
            if !force || recent {
                if let Some(token) = record
                    .access_token
                    .as_ref()
                    .filter(|t| t.valid_for(margin, now))
                {
                    if force {
                        self.metrics.forced_refreshes_coalesced.inc();
                        tracing::debug!(provider = %id.provider, "forced refresh coalesced with a recent one");
                    }
                    self.cache_if_current(&id, &versioned, token).await;
                    return Ok(FlightOutcome {
                        token: token.clone(),
                        fresh: false,
                        recent,
                    });
                }
            }

            // A refresh rotates the grant upstream; if its write-back cannot
            // land, the rotated token is lost and the user must re-consent.
            // With a failing store, fail fast instead.
            if !self.store.healthy() {
                return Err(BrokerError::Storage(
                    "the store is failing; refresh not attempted".into(),
                ));
            }
            let client = self.client_for(&record)?;
            let issued = match (&record.refresh_token, record.client_credentials) {
                (Some(refresh_token), _) => self.upstream.refresh(&client, refresh_token).await,
                (None, true) => self.upstream.client_credentials(&client).await,
                (None, false) => return Err(reauth(ReauthCause::NoRefreshToken, &id)),
            };

            self.metrics.refresh(
                &id.provider,
                match &issued {
                    Ok(_) => "ok",
                    Err(UpstreamError::GrantRejected { .. }) => "grant_rejected",
                    Err(UpstreamError::ClientRejected { .. }) => "rejected_client",
                    Err(UpstreamError::Unavailable { .. }) => "unavailable",
                    Err(UpstreamError::EndpointNotAllowed(_)) => "endpoint_not_allowed",
                },
            );
            match issued {
                Ok(tokens) => match self.write_back(&id, &versioned, &record, tokens).await? {
                    WriteBack::Stored(token) => {
                        return Ok(FlightOutcome {
                            token,
                            fresh: true,
                            recent: true,
                        })
                    }
                    // A Deposit replaced the grant meanwhile; serve the new one.
                    WriteBack::Superseded => continue,
                },
                Err(UpstreamError::GrantRejected { oauth_error }) => {
                    let cause = ReauthCause::of_rejected_grant(&oauth_error);
                    // A benign race looks exactly like a dead grant: someone
                    // rotated the refresh token after we read it. Re-read, and
                    // retry once if the grant we used is no longer current.
                    let (latest_versioned, latest) = self.load(&id).await?;
                    let changed = latest.generation != record.generation
                        || latest.refresh_token != record.refresh_token;
                    if changed && !rotation_retry_used {
                        rotation_retry_used = true;
                        continue;
                    }
                    self.mark_reauth(&id, &latest_versioned, latest, cause)
                        .await?;
                    return Err(reauth(cause, &id));
                }
                Err(error) => return Err(upstream_error(error, &id)),
            }
        }
        Err(BrokerError::Storage(
            "credential keeps changing during refresh".into(),
        ))
    }

    /// Persists freshly issued tokens, but only onto the grant they came
    /// from: same generation, record still present.
    async fn write_back(
        &self,
        id: &CredentialId,
        read: &Versioned,
        used: &CredentialRecord,
        tokens: IssuedTokens,
    ) -> Result<WriteBack, BrokerError> {
        let _write = self.write_lock(id).await;
        let mut current = self.store.get(&id.store_key()).await?;
        for _ in 0..CAS_ATTEMPTS {
            let Some(versioned) = current.take() else {
                // Revoked while we were upstream: the new tokens die with it.
                return Err(BrokerError::NotFound);
            };
            let mut base = if versioned.revision == read.revision {
                used.clone()
            } else {
                let latest = self.open(id, &versioned)?;
                if latest.generation != used.generation {
                    return Ok(WriteBack::Superseded);
                }
                // Same grant, rewritten meanwhile (e.g. re-encrypted under a
                // new key): apply our tokens on top of it.
                latest
            };
            let now = SystemTime::now();
            base.access_token = Some(tokens.access_token.clone());
            if let Some(rotated) = &tokens.refresh_token {
                base.refresh_token = Some(rotated.clone());
            }
            base.state = CredentialState::Active;
            base.updated_at = now;
            base.last_refresh_at = Some(now);
            let (value, _) = self.seal(id, &base)?;
            match self
                .store
                .compare_and_swap(&id.store_key(), Some(versioned.revision), Some(value))
                .await?
            {
                CasOutcome::Written(_) => {
                    self.cache.put(id, tokens.access_token.clone());
                    tracing::info!(
                        tenant = %id.tenant,
                        provider = %id.provider,
                        rotated = tokens.refresh_token.is_some(),
                        "access token refreshed"
                    );
                    return Ok(WriteBack::Stored(tokens.access_token));
                }
                CasOutcome::Conflict(now_stored) => current = now_stored,
            }
        }
        Err(BrokerError::Storage("write contention".into()))
    }

    async fn mark_reauth(
        &self,
        id: &CredentialId,
        read: &Versioned,
        mut record: CredentialRecord,
        cause: ReauthCause,
    ) -> Result<(), BrokerError> {
        let _write = self.write_lock(id).await;
        record.state = CredentialState::ReauthRequired(cause);
        record.access_token = None;
        record.updated_at = SystemTime::now();
        let (value, _) = self.seal(id, &record)?;
        // If anything wrote meanwhile (a new Deposit), that write wins and
        // the dead grant needs no mark.
        let outcome = self
            .store
            .compare_and_swap(&id.store_key(), Some(read.revision), Some(value))
            .await?;
        if matches!(outcome, CasOutcome::Written(_)) {
            self.metrics.reauth(cause.as_str());
        }
        self.cache.remove(id);
        tracing::warn!(
            tenant = %id.tenant,
            provider = %id.provider,
            cause = cause.as_str(),
            "grant is dead; reauthorization required"
        );
        Ok(())
    }

    /// Caches a token read from storage, unless the record moved on since.
    async fn cache_if_current(&self, id: &CredentialId, read: &Versioned, token: &AccessToken) {
        let _write = self.write_lock(id).await;
        if let Ok(Some(now_stored)) = self.store.get(&id.store_key()).await {
            if now_stored.revision == read.revision {
                self.cache.put(id, token.clone());
            }
        }
    }

    async fn load(&self, id: &CredentialId) -> Result<(Versioned, CredentialRecord), BrokerError> {
        let versioned = self
            .store
            .get(&id.store_key())
            .await?
            .ok_or(BrokerError::NotFound)?;
        let record = self.open(id, &versioned)?;
        Ok((versioned, record))
    }

    /// Decrypts and decodes a stored record, classifying failures as DESIGN
    /// §5a orders them.
    fn open(
        &self,
        id: &CredentialId,
        versioned: &Versioned,
    ) -> Result<CredentialRecord, BrokerError> {
        let (clear_generation, envelope) = record::unframe(&versioned.value)
            .ok_or(BrokerError::RecordUnreadable("stored value is truncated"))?;
        let keyring = self.keys.current();
        let plaintext = crypto::open(&keyring, &identity(id), envelope).map_err(|error| {
            match error {
                OpenError::Corrupt { .. } | OpenError::UnsupportedFormat { .. } => {
                    // An integrity alarm, not a user problem: never reauth.
                    tracing::error!(
                        tenant = %id.tenant,
                        provider = %id.provider,
                        %error,
                        "stored credential record is unreadable"
                    );
                    BrokerError::RecordUnreadable(match error {
                        OpenError::UnsupportedFormat { .. } => "unsupported record format",
                        _ => "corrupt record envelope",
                    })
                }
                OpenError::KeyVersionUnavailable { version } => {
                    tracing::error!(
                        key_version = version,
                        "record sealed under a key version the keyring lacks"
                    );
                    BrokerError::KeyVersionUnavailable { version }
                }
                OpenError::Undecryptable { version } => {
                    tracing::warn!(
                        tenant = %id.tenant,
                        provider = %id.provider,
                        key_version = version,
                        "record fails authentication under a present key"
                    );
                    reauth(ReauthCause::Undecryptable, id)
                }
            }
        })?;
        let record = record::decode(&plaintext)
            .map_err(|_| BrokerError::RecordUnreadable("corrupt record payload"))?;
        if record.generation != clear_generation {
            return Err(BrokerError::RecordUnreadable("record generation mismatch"));
        }
        Ok(record)
    }

    /// Seals a record with the primary key; returns the stored value and the
    /// key version used.
    pub(crate) fn seal(
        &self,
        id: &CredentialId,
        record: &CredentialRecord,
    ) -> Result<(Vec<u8>, u32), BrokerError> {
        let keyring = self.keys.current();
        let plaintext = record::encode(record);
        let envelope = crypto::seal(&keyring, &identity(id), &plaintext)
            .map_err(|_| BrokerError::Internal("sealing failed"))?;
        Ok((
            record::frame(record.generation, envelope),
            keyring.primary().get(),
        ))
    }

    /// The OAuth client to use for a record: its preset's current settings
    /// (so an operator's secret rotation applies at once), else its own.
    fn client_for(&self, record: &CredentialRecord) -> Result<ClientConfig, BrokerError> {
        match &record.preset {
            None => Ok(record.client.clone()),
            Some(name) => self.settings.presets.get(name).cloned().ok_or_else(|| {
                BrokerError::ProviderRejectedClient {
                    oauth_error: "preset_not_configured".to_owned(),
                }
            }),
        }
    }

    pub(crate) async fn write_lock(&self, id: &CredentialId) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        self.write_locks[(hasher.finish() as usize) % WRITE_LOCK_STRIPES]
            .lock()
            .await
    }
}

enum WriteBack {
    Stored(AccessToken),
    Superseded,
}

fn identity(id: &CredentialId) -> RecordIdentity<'_> {
    RecordIdentity {
        tenant: &id.tenant,
        subject: &id.subject,
        provider: &id.provider,
    }
}

fn reauth(cause: ReauthCause, id: &CredentialId) -> BrokerError {
    BrokerError::ReauthRequired {
        cause,
        provider: id.provider.clone(),
    }
}

fn upstream_error(error: UpstreamError, id: &CredentialId) -> BrokerError {
    match error {
        UpstreamError::GrantRejected { oauth_error } => {
            reauth(ReauthCause::of_rejected_grant(&oauth_error), id)
        }
        UpstreamError::ClientRejected { oauth_error } => {
            BrokerError::ProviderRejectedClient { oauth_error }
        }
        UpstreamError::Unavailable {
            reason,
            retry_after,
        } => BrokerError::UpstreamUnavailable {
            reason,
            retry_after,
        },
        UpstreamError::EndpointNotAllowed(rejected) => BrokerError::EndpointNotAllowed(rejected),
    }
}
