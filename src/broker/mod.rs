//! The token lifecycle: deposit, serve, refresh, rotate, revoke.
//!
//! A GetAccessToken call flows cache -> store -> crypto -> upstream -> store.
//! The rules that make it exact:
//! - one refresh per credential at a time (`flight`); everyone waiting
//!   gets that refresh's result (`refresh`);
//! - every write (Deposit, Revoke, refresh write-back, reauth mark, rewrap)
//!   goes through the one write path (`write`): under the credential's
//!   write lock and by compare-and-swap, so a refresh for a replaced or
//!   revoked grant can never land;
//! - upstream calls happen outside the write lock, so a slow provider never
//!   blocks a Deposit or a Revoke;
//! - a dead grant is persisted as REAUTH_REQUIRED and fails fast afterwards.
//!
//! Around it: [`inspect`] (metadata for operators), [`rotation`] (keyring
//! reload, per-version counts, rewrap), [`fingerprints`] (the guard against
//! a wrong keyring), [`ahead`] (optional proactive refresh), [`events`]
//! (the credential event log and its watchers), [`jobs`] (work one replica
//! runs at a time).

pub mod ahead;
mod cache;
pub mod consent;
pub mod error;
pub mod events;
pub mod fingerprints;
mod flight;
pub mod inspect;
pub mod jobs;
pub mod limits;
pub mod model;
pub mod record;
mod refresh;
pub mod rotation;
mod write;

use std::{
    collections::HashMap,
    hash::RandomState,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::Mutex;

pub use self::error::BrokerError;
use self::{
    cache::TokenCache,
    events::{EventType, Noted},
    flight::SingleFlight,
    limits::{LimitSettings, Limits},
    model::{
        AccessToken, ClientConfig, CredentialId, CredentialRecord, CredentialState, DepositCommand,
        Deposited, Grant, ReauthCause, Revoked, UpstreamRevocation,
    },
    refresh::FlightResult,
    write::{How, Known, Step, WRITE_LOCK_STRIPES},
};
use crate::{
    crypto::{self, KeyVersion, OpenError, RecordIdentity, SharedKeyring},
    secret::SecretString,
    store::{backup, CredentialStore, Versioned},
    telemetry::Metrics,
    upstream::{Upstream, UpstreamError},
};

/// Settings of the token lifecycle.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// A cached token is served only while it stays valid this long.
    pub refresh_skew: Duration,
    /// Provider presets by name: the OAuth client of Deposits that omit one.
    pub presets: HashMap<String, ClientConfig>,
    /// A `force_refresh` within this long of the last refresh is answered
    /// with that refresh's token: a client looping on 401 cannot hammer the
    /// provider.
    pub force_refresh_interval: Duration,
    /// Bounds on refreshes in flight, failure cool-downs, record quotas.
    pub limits: LimitSettings,
    /// The event log: on or off, retention, the failing threshold.
    pub events: events::EventSettings,
    /// The consent flows: lifetime, bounds.
    pub consent: consent::ConsentSettings,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            refresh_skew: Duration::from_secs(60),
            force_refresh_interval: Duration::from_secs(15),
            presets: HashMap::new(),
            limits: LimitSettings::default(),
            events: events::EventSettings::default(),
            consent: consent::ConsentSettings::default(),
        }
    }
}

/// What a grant gives the vault to store, once any exchange is done.
struct Obtained {
    refresh_token: Option<SecretString>,
    access_token: Option<AccessToken>,
    client_credentials: bool,
}

impl Obtained {
    /// The record a Deposit of this grant stores, as generation `generation`.
    fn record(
        &self,
        generation: u64,
        client: &ClientConfig,
        preset: &Option<String>,
        labels: &std::collections::BTreeMap<String, String>,
        now: SystemTime,
    ) -> CredentialRecord {
        CredentialRecord {
            generation,
            state: CredentialState::Active,
            client: client.clone(),
            preset: preset.clone(),
            refresh_token: self.refresh_token.clone(),
            access_token: self.access_token.clone(),
            client_credentials: self.client_credentials,
            labels: labels.clone(),
            created_at: now,
            updated_at: now,
            last_refresh_at: None,
            failing_since: None,
            failing_reported: false,
            last_event: None,
        }
    }
}

/// The token broker. One per process, shared by every gRPC call.
pub struct Broker {
    store: Arc<dyn CredentialStore>,
    keys: SharedKeyring,
    upstream: Upstream,
    settings: BrokerSettings,
    cache: TokenCache,
    flights: SingleFlight<CredentialId, FlightResult>,
    write_locks: Vec<Mutex<()>>,
    lock_hasher: RandomState,
    limits: Limits,
    metrics: Arc<Metrics>,
    consent_counts: consent::PendingCounts,
}

impl Broker {
    pub fn new(
        store: Arc<dyn CredentialStore>,
        keys: SharedKeyring,
        upstream: Upstream,
        settings: BrokerSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let changes = store.changes();
        let broker = Arc::new(Self {
            metrics,
            limits: Limits::new(settings.limits.clone()),
            store,
            keys,
            upstream,
            settings,
            cache: TokenCache::default(),
            flights: SingleFlight::default(),
            write_locks: (0..WRITE_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            lock_hasher: RandomState::new(),
            consent_counts: consent::PendingCounts::default(),
        });
        // Other replicas write too: their changes drop stale cache entries.
        if let Some(changes) = changes {
            tokio::spawn(follow_changes(Arc::downgrade(&broker), changes));
        }
        broker
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
        let (client, preset) = self.resolve_client(client, &id)?;
        let client = self
            .upstream
            .with_discovered(client)
            .await
            .map_err(|e| upstream_error(e, &id))?;
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
        let obtained = self.obtain(&client, grant, &id).await?;
        let tenant_full = self.tenant_full(&id.tenant).await?;
        let now = SystemTime::now();
        // A new credential costs one write; a replacement finds out from
        // the conflict. (Not under a full quota: there the first attempt
        // must see what is stored.)
        let how = How {
            known: match tenant_full {
                None => Known::Absent,
                Some(_) => Known::Nothing,
            },
            ..How::DURABLE
        };
        let wrote = self
            .write(&id, how, |current| {
                if current.is_none() {
                    if let Some(quota) = tenant_full {
                        return Err(BrokerError::QuotaExceeded { quota });
                    }
                }
                // The clear generation is readable even when the record is
                // not, so a Deposit can always replace a broken or dead grant.
                let previous = current
                    .and_then(|v| record::unframe(&v.value))
                    .map_or(0, |(generation, _)| generation);
                let record = obtained.record(previous + 1, &client, &preset, &labels, now);
                let noted = Noted::of(EventType::Deposited, &record, "");
                Ok(Step::Put(
                    Box::new(record),
                    Some(noted),
                    (previous + 1, current.is_none()),
                ))
            })
            .await?;
        let key_version = wrote.key_version.unwrap_or_default();
        let (generation, created) = wrote.answer;
        if created {
            self.limits.count_records(&id.tenant, None, 1);
        }
        // A new grant starts with a clean record of failures.
        self.limits.recovered(&id);
        tracing::info!(
            tenant = %id.tenant,
            provider = %id.provider,
            generation,
            key_version,
            "credential deposited"
        );
        Ok(Deposited {
            generation,
            key_version,
        })
    }

    /// The Deposit's own client, or the preset named by its provider.
    fn resolve_client(
        &self,
        client: Option<ClientConfig>,
        id: &CredentialId,
    ) -> Result<(ClientConfig, Option<String>), BrokerError> {
        match client {
            Some(client) => Ok((client, None)),
            None => match self.settings.presets.get(&id.provider) {
                Some(preset) => Ok((preset.clone(), Some(id.provider.clone()))),
                None => Err(BrokerError::ClientRequired {
                    provider: id.provider.clone(),
                }),
            },
        }
    }

    /// Turns a deposited grant into what is stored: code and client
    /// credentials grants are exchanged at the provider.
    async fn obtain(
        &self,
        client: &ClientConfig,
        grant: Grant,
        id: &CredentialId,
    ) -> Result<Obtained, BrokerError> {
        let (issued, client_credentials) = match grant {
            Grant::RefreshToken {
                refresh_token,
                access_token,
            } => {
                return Ok(Obtained {
                    refresh_token: Some(refresh_token),
                    access_token,
                    client_credentials: false,
                })
            }
            Grant::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
                resources,
            } => (
                self.upstream
                    .exchange_code(
                        client,
                        &code,
                        &redirect_uri,
                        code_verifier.as_ref(),
                        &resources,
                    )
                    .await,
                false,
            ),
            Grant::ClientCredentials => (self.upstream.client_credentials(client).await, true),
        };
        let issued = issued.map_err(|e| upstream_error(e, id))?;
        Ok(Obtained {
            // A client-credentials grant mints without a refresh token.
            refresh_token: issued.refresh_token.filter(|_| !client_credentials),
            access_token: Some(issued.access_token),
            client_credentials,
        })
    }

    /// Deletes the credential. A refresh in flight cannot bring it back: its
    /// write-back needs the record it started from.
    pub async fn revoke(&self, id: &CredentialId) -> Result<Revoked, BrokerError> {
        let removed = self
            .write(id, How::DURABLE, |current| {
                Ok(match current {
                    None => Step::Leave(None),
                    Some(versioned) => {
                        Step::Delete(Some(self.revoked(id, versioned)), Some(versioned.clone()))
                    }
                })
            })
            .await?
            .answer;
        let Some(removed) = removed else {
            return Ok(Revoked {
                existed: false,
                upstream: UpstreamRevocation::NotConfigured,
            });
        };
        self.limits.count_records(&id.tenant, None, -1);
        self.limits.recovered(id);
        tracing::info!(tenant = %id.tenant, provider = %id.provider, "credential revoked");
        let upstream = self.revoke_upstream(id, &removed).await;
        Ok(Revoked {
            existed: true,
            upstream,
        })
    }

    /// The REVOKED event of a record being deleted: its generation from the
    /// clear frame, its labels if it can still be opened.
    fn revoked(&self, id: &CredentialId, deleted: &Versioned) -> Noted {
        let generation = record::unframe(&deleted.value).map_or(0, |(generation, _)| generation);
        let labels = self.open(id, deleted).map(|r| r.labels).unwrap_or_default();
        Noted {
            kind: EventType::Revoked,
            cause: String::new(),
            generation,
            labels,
        }
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

    /// `Some(quota)` when the tenant's record quota is reached (a Deposit of
    /// a new credential is then refused; replacing one is not). The count is
    /// read from the store once per tenant, then kept by the writes here.
    async fn tenant_full(&self, tenant: &str) -> Result<Option<u64>, BrokerError> {
        let Some(quota) = self.limits.record_quota() else {
            return Ok(None);
        };
        let count = match self.limits.tenant_records(tenant) {
            Some(count) => count,
            None => {
                let prefix = crate::store::StoreKey::tenant_prefix(tenant);
                let limit = usize::try_from(quota)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1);
                let count = self.store.scan(&prefix, None, limit).await?.len() as u64;
                self.limits.count_records(tenant, Some(count), 0);
                count
            }
        };
        Ok((count >= quota).then_some(quota))
    }

    /// Streams a backup of every record, still sealed, into `chunks`;
    /// returns the record count.
    pub async fn backup(
        &self,
        chunks: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, BrokerError> {
        let key = backup_key(&self.keys.current(), None)?;
        let mut sink = chunks;
        backup::export(self.store.as_ref(), &key, &mut sink)
            .await
            .map_err(|e| BrokerError::Storage(e.to_string()))
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

    /// Seals a record under `key` (default: the primary); returns the stored
    /// value and the key version used.
    pub(crate) fn seal(
        &self,
        id: &CredentialId,
        record: &CredentialRecord,
        key: Option<KeyVersion>,
    ) -> Result<(Vec<u8>, u32), BrokerError> {
        let keyring = self.keys.current();
        let version = key.unwrap_or_else(|| self.sealing_version(&keyring));
        let plaintext = record::encode(record);
        let sealed = if version == keyring.primary() || key.is_some() {
            crypto::seal_with(&keyring, version, &identity(id), &plaintext)
        } else {
            crypto::seal_during_rollout(&keyring, version, &identity(id), &plaintext)
        };
        let envelope = sealed.map_err(|_| {
            match key {
                // A pinned key that stopped being active: the operator's move.
                Some(version) => BrokerError::KeyVersionUnavailable {
                    version: version.get(),
                },
                None => BrokerError::Internal("sealing failed"),
            }
        })?;
        Ok((record::frame(record.generation, envelope), version.get()))
    }

    /// The version new writes seal under: the primary, once every live
    /// replica can open it; until then the newest version they all can.
    fn sealing_version(&self, keyring: &crypto::Keyring) -> KeyVersion {
        let primary = keyring.primary();
        let Some(common) = self.store.key_versions_everyone_opens() else {
            return primary;
        };
        if common.contains(&primary.get()) {
            return primary;
        }
        common
            .iter()
            .rev()
            .filter_map(|v| KeyVersion::new(*v))
            .find(|v| keyring.key_for_rollout(*v).is_ok())
            .unwrap_or(primary)
    }

    /// Tells the other replicas which key versions this one can open.
    pub async fn publish_key_versions(&self) -> Result<(), BrokerError> {
        let versions = self
            .keys
            .current()
            .versions()
            .into_iter()
            .filter(|info| {
                matches!(
                    info.state,
                    crypto::KeyState::Active | crypto::KeyState::DecryptOnly
                )
            })
            .map(|info| info.version.get())
            .collect();
        Ok(self.store.publish_key_versions(versions).await?)
    }

    /// Whether every live replica can open key `version` (always, alone).
    pub fn everyone_opens(&self, version: u32) -> bool {
        self.store
            .key_versions_everyone_opens()
            .is_none_or(|common| common.contains(&version))
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
}

/// Keeps the cache coherent with writes made by other replicas.
async fn follow_changes(
    broker: std::sync::Weak<Broker>,
    mut changes: tokio::sync::broadcast::Receiver<crate::store::Change>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let change = changes.recv().await;
        let Some(broker) = broker.upgrade() else {
            return;
        };
        match change {
            Ok(crate::store::Change::Record { key, revision }) => {
                if let Some((tenant, subject, provider)) = key.parts() {
                    let id = CredentialId {
                        tenant,
                        subject,
                        provider,
                    };
                    broker.cache.changed(&id, revision);
                }
            }
            Ok(crate::store::Change::ClaimReleased { .. }) => {}
            // Missed changes: nothing cached can be trusted.
            Ok(crate::store::Change::Reset) | Err(RecvError::Lagged(_)) => broker.cache.clear(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// The key that authenticates a backup: derived from key `version` (default:
/// the primary) for that purpose alone.
pub fn backup_key(
    keyring: &crypto::Keyring,
    version: Option<u32>,
) -> Result<backup::BackupKey, BrokerError> {
    let version = match version {
        None => keyring.primary(),
        Some(v) => KeyVersion::new(v).ok_or(BrokerError::KeyVersionUnavailable { version: v })?,
    };
    let mac_key = crypto::derive_key(keyring, version, crypto::Purpose::BackupAuthentication)
        .map_err(|_| BrokerError::KeyVersionUnavailable {
            version: version.get(),
        })?;
    Ok(backup::BackupKey {
        key_version: version.get(),
        mac_key,
    })
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
