//! The consent flows the vault runs (DESIGN §5f): authorization code with
//! PKCE, and the device grant.
//!
//! **Pending authorizations are sealed like records.** A begin call stores
//! everything its completion needs (the reference, the OAuth client, the
//! redirect URI, the PKCE verifier or the device code, the labels) under a
//! key derived from the SHA-256 of its `state`, sealed with the keyring and
//! bound to that key, in the store's internal keyspace (scans of
//! credentials never see it). So it survives a restart, works on every
//! replica of an etcd-backed vault, and a reader of the store learns
//! neither the state nor the verifier.
//!
//! **A state is used once.** `state` is 256 random bits. A completion first
//! moves the pending authorization from PENDING to COMPLETING by
//! compare-and-swap; a second completion, a replay or a race finds it
//! taken and gets AUTHORIZATION_NOT_FOUND, as does an unknown or expired
//! state, or one begun for a tenant the caller may not act for. Only then
//! is the code exchanged, through Deposit's own path (generation bump,
//! reauth state cleared, labels kept, the DEPOSITED event).
//!
//! **Device authorizations are polled by the vault**, one replica at a time
//! (a job claim), on the schedule stored with each (`interval`, raised by
//! `slow_down`), until the provider answers or the authorization expires.
//! The same sweep deletes finished authorizations an hour after they end.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use prost::Message;
use rand::RngCore;
use sha2::{Digest, Sha256};
use url::Url;
use zeroize::Zeroize;

use super::{
    events::millis,
    jobs::{ClaimSeen, JobClaim},
    model::{ClientConfig, CredentialId, DepositCommand, Grant},
    record::{client_auth_code, client_auth_from_code},
    Broker, BrokerError,
};
use crate::{
    crypto::{self, RecordIdentity},
    secret::SecretString,
    store::{CasOutcome, StoreKey, Versioned, Write},
    upstream::{parse_url, AuthorizationRequest, DevicePoll},
};

/// Where pending authorizations live in the store's internal keyspace.
const KEY_PREFIX: &[u8] = b"\xffauthz/";
/// The tenant every pending authorization's envelope is bound to: no
/// credential's tenant can be empty.
const SEAL_TENANT: &str = "";
/// How often the device poller and the sweep look at pending work.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often a replica that does not run the sweep asks for it.
const CLAIM_RETRY: Duration = Duration::from_secs(5);
/// Finished authorizations stay answerable by GetAuthorization this long.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);
/// RFC 8628 §3.5: `slow_down` adds five seconds to the interval.
const SLOW_DOWN: Duration = Duration::from_secs(5);

/// Settings of the consent flows.
#[derive(Clone, Debug)]
pub struct ConsentSettings {
    /// How long a begun authorization may be completed.
    pub lifetime: Duration,
    /// Pending authorizations one tenant may have begun on this replica.
    pub max_pending_per_tenant: usize,
}

impl Default for ConsentSettings {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(600),
            max_pending_per_tenant: 1000,
        }
    }
}

/// What a BeginAuthorization asks for, validated.
#[derive(Debug)]
pub struct BeginCommand {
    pub id: CredentialId,
    /// `None`: the preset named by `id.provider`.
    pub client: Option<ClientConfig>,
    /// `None`: the client's registered redirect URI.
    pub redirect_uri: Option<Url>,
    /// Empty: the client's scopes.
    pub scopes: Vec<String>,
    pub resources: Vec<String>,
    /// Checked against the parameters the vault sets itself.
    pub extra_params: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

/// A begun authorization.
#[derive(Debug)]
pub struct Begun {
    pub authorization_url: SecretString,
    pub state: SecretString,
    pub expires_at: SystemTime,
}

/// A begun device authorization.
#[derive(Debug)]
pub struct DeviceBegun {
    pub state: SecretString,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_at: SystemTime,
}

/// What the redirect brought back.
#[derive(Debug)]
pub enum Redirect {
    Code {
        code: SecretString,
        /// RFC 9207 `iss`, when the provider sent one.
        iss: Option<String>,
    },
    Error {
        error: String,
    },
}

/// A completed authorization: the deposit it made.
#[derive(Debug)]
pub struct Completed {
    pub id: CredentialId,
    pub generation: u64,
    pub key_version: u32,
}

/// Where an authorization stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowStatus {
    Pending,
    Completed,
    Denied,
    Expired,
    Failed,
}

/// An authorization as GetAuthorization shows it.
#[derive(Debug)]
pub struct AuthorizationView {
    pub id: CredentialId,
    pub status: FlowStatus,
    pub generation: u64,
    pub error: String,
    pub expires_at: SystemTime,
}

/// Stored states; COMPLETING is the single-use latch (shown as PENDING).
const PENDING: u32 = 1;
const COMPLETED: u32 = 2;
const DENIED: u32 = 3;
const EXPIRED: u32 = 4;
const FAILED: u32 = 5;
const COMPLETING: u32 = 6;

const KIND_CODE: u32 = 1;
const KIND_DEVICE: u32 = 2;

/// The sealed form of a pending authorization. Holds secrets (the client
/// secret, the verifier, the device code): wiped on drop, and its `Debug`
/// names the authorization only.
#[derive(Clone, PartialEq, Message)]
#[prost(skip_debug)]
struct PendingPayload {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(uint32, tag = "2")]
    status: u32,
    #[prost(string, tag = "3")]
    tenant: String,
    #[prost(string, tag = "4")]
    subject: String,
    #[prost(string, tag = "5")]
    provider: String,
    #[prost(string, tag = "6")]
    token_endpoint: String,
    #[prost(string, tag = "7")]
    client_id: String,
    #[prost(string, optional, tag = "8")]
    client_secret: Option<String>,
    #[prost(uint32, tag = "9")]
    auth: u32,
    #[prost(string, optional, tag = "10")]
    revocation_endpoint: Option<String>,
    #[prost(string, repeated, tag = "11")]
    client_scopes: Vec<String>,
    #[prost(string, optional, tag = "12")]
    issuer: Option<String>,
    /// Deposited without a client: the preset it came from.
    #[prost(bool, tag = "13")]
    preset: bool,
    #[prost(string, tag = "14")]
    redirect_uri: String,
    #[prost(string, repeated, tag = "15")]
    resources: Vec<String>,
    #[prost(btree_map = "string, string", tag = "16")]
    labels: BTreeMap<String, String>,
    /// The PKCE verifier, or the device code.
    #[prost(string, tag = "17")]
    secret: String,
    #[prost(uint64, tag = "18")]
    expires_ms: u64,
    #[prost(uint64, tag = "19")]
    generation: u64,
    #[prost(string, tag = "20")]
    error: String,
    #[prost(uint64, tag = "21")]
    interval_ms: u64,
    #[prost(uint64, tag = "22")]
    next_poll_ms: u64,
}

impl std::fmt::Debug for PendingPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingPayload")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("tenant", &self.tenant)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl Drop for PendingPayload {
    fn drop(&mut self) {
        self.secret.zeroize();
        if let Some(secret) = self.client_secret.as_mut() {
            secret.zeroize();
        }
    }
}

impl PendingPayload {
    fn id(&self) -> CredentialId {
        CredentialId {
            tenant: self.tenant.clone(),
            subject: self.subject.clone(),
            provider: self.provider.clone(),
        }
    }

    fn client(&self) -> Result<ClientConfig, BrokerError> {
        let unreadable = || BrokerError::RecordUnreadable("pending authorization client");
        Ok(ClientConfig {
            token_endpoint: parse_url(&self.token_endpoint).map_err(|_| unreadable())?,
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone().map(SecretString::from),
            auth: client_auth_from_code(self.auth).ok_or_else(unreadable)?,
            revocation_endpoint: self
                .revocation_endpoint
                .as_deref()
                .map(parse_url)
                .transpose()
                .map_err(|_| unreadable())?,
            scopes: self.client_scopes.clone(),
            flows: crate::upstream::FlowEndpoints {
                issuer: self
                    .issuer
                    .as_deref()
                    .map(parse_url)
                    .transpose()
                    .map_err(|_| unreadable())?,
                ..Default::default()
            },
            // A preset's key is never stored; its current client is used.
            assertion_key: None,
        })
    }

    fn expired(&self, now: SystemTime) -> bool {
        millis(now) >= self.expires_ms
    }

    fn status(&self, now: SystemTime) -> FlowStatus {
        match self.status {
            PENDING | COMPLETING if self.expired(now) => FlowStatus::Expired,
            PENDING | COMPLETING => FlowStatus::Pending,
            COMPLETED => FlowStatus::Completed,
            DENIED => FlowStatus::Denied,
            EXPIRED => FlowStatus::Expired,
            _ => FlowStatus::Failed,
        }
    }
}

fn new_payload(
    kind: u32,
    id: &CredentialId,
    client: &ClientConfig,
    preset: bool,
    expires_at: SystemTime,
) -> PendingPayload {
    PendingPayload {
        kind,
        status: PENDING,
        tenant: id.tenant.clone(),
        subject: id.subject.clone(),
        provider: id.provider.clone(),
        token_endpoint: client.token_endpoint.to_string(),
        client_id: client.client_id.clone(),
        client_secret: client.client_secret.as_ref().map(|s| s.expose().to_owned()),
        auth: client_auth_code(client.auth),
        revocation_endpoint: client.revocation_endpoint.as_ref().map(Url::to_string),
        client_scopes: client.scopes.clone(),
        issuer: client.flows.issuer.as_ref().map(Url::to_string),
        preset,
        redirect_uri: String::new(),
        resources: Vec::new(),
        labels: BTreeMap::new(),
        secret: String::new(),
        expires_ms: millis(expires_at),
        generation: 0,
        error: String::new(),
        interval_ms: 0,
        next_poll_ms: 0,
    }
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// 256 random bits, base64url: a state or a PKCE verifier (43 characters,
/// within RFC 7636's 43-128 unreserved).
fn random_token() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = URL_SAFE_NO_PAD.encode(bytes);
    bytes.zeroize();
    SecretString::from(token)
}

/// The store key of a state: its hash, so the store never holds the state.
fn key_of(state: &SecretString) -> (StoreKey, String) {
    let digest = hex::encode(Sha256::digest(state.expose().as_bytes()));
    let mut key = KEY_PREFIX.to_vec();
    key.extend_from_slice(digest.as_bytes());
    (StoreKey::from_bytes(key), digest)
}

/// Pending authorizations begun per tenant on this replica, by expiry.
#[derive(Default)]
pub(crate) struct PendingCounts(Mutex<HashMap<String, VecDeque<SystemTime>>>);

impl PendingCounts {
    /// Counts one more for `tenant`, unless it is at `max`.
    fn admit(&self, tenant: &str, max: usize, expires_at: SystemTime) -> bool {
        let now = SystemTime::now();
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let queue = counts.entry(tenant.to_owned()).or_default();
        while queue.front().is_some_and(|at| *at <= now) {
            queue.pop_front();
        }
        if queue.len() >= max {
            return false;
        }
        queue.push_back(expires_at);
        true
    }
}

impl Broker {
    /// Starts an authorization-code flow: stores the pending authorization
    /// and answers the URL to send the user's browser to.
    pub async fn begin_authorization(&self, cmd: BeginCommand) -> Result<Begun, BrokerError> {
        let (client, preset) = self.resolve_client(cmd.client, &cmd.id)?;
        let client = self
            .upstream
            .with_discovered(client)
            .await
            .map_err(|e| super::upstream_error(e, &cmd.id))?;
        if client.flows.authorization.is_none() {
            return Err(BrokerError::FieldRequired("client.authorization_endpoint"));
        }
        let redirect_uri = cmd
            .redirect_uri
            .or_else(|| client.flows.redirect_uri.clone())
            .ok_or(BrokerError::FieldRequired("redirect_uri"))?;
        let state = random_token();
        let verifier = random_token();
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.expose().as_bytes()));
        let scopes = if cmd.scopes.is_empty() {
            client.scopes.clone()
        } else {
            cmd.scopes
        };
        let url = self
            .upstream
            .authorization_url(
                &client,
                &AuthorizationRequest {
                    redirect_uri: &redirect_uri,
                    state: &state,
                    code_challenge: &challenge,
                    scopes: &scopes,
                    resources: &cmd.resources,
                    extra: &cmd.extra_params,
                },
            )
            .map_err(|e| super::upstream_error(e, &cmd.id))?;
        // Counted only once it is valid: a refused begin holds no place.
        let expires_at = self.admit_pending(&cmd.id.tenant, self.settings.consent.lifetime)?;
        let mut pending = new_payload(KIND_CODE, &cmd.id, &client, preset.is_some(), expires_at);
        pending.redirect_uri = redirect_uri.to_string();
        pending.resources = cmd.resources;
        pending.labels = cmd.labels;
        pending.secret = verifier.expose().to_owned();
        self.store_pending(&state, None, &pending).await?;
        Ok(Begun {
            authorization_url: SecretString::from(String::from(url)),
            state,
            expires_at,
        })
    }

    /// Starts a device flow; the vault polls the provider from here on.
    pub async fn begin_device_authorization(
        &self,
        id: CredentialId,
        client: Option<ClientConfig>,
        scopes: Vec<String>,
        resources: Vec<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<DeviceBegun, BrokerError> {
        let (client, preset) = self.resolve_client(client, &id)?;
        let client = self
            .upstream
            .with_discovered(client)
            .await
            .map_err(|e| super::upstream_error(e, &id))?;
        if client.flows.device_authorization.is_none() {
            return Err(BrokerError::FieldRequired(
                "client.device_authorization_endpoint",
            ));
        }
        let scopes = if scopes.is_empty() {
            client.scopes.clone()
        } else {
            scopes
        };
        let started = self
            .upstream
            .start_device(&client, &scopes, &resources)
            .await
            .map_err(|e| super::upstream_error(e, &id))?;
        let expires_at = self.admit_pending(
            &id.tenant,
            started.expires_in.min(self.settings.consent.lifetime),
        )?;
        let state = random_token();
        let mut pending = new_payload(KIND_DEVICE, &id, &client, preset.is_some(), expires_at);
        pending.resources = resources;
        pending.labels = labels;
        pending.secret = started.device_code.expose().to_owned();
        pending.interval_ms = u64::try_from(started.interval.as_millis()).unwrap_or(u64::MAX);
        pending.next_poll_ms = millis(SystemTime::now() + started.interval);
        self.store_pending(&state, None, &pending).await?;
        Ok(DeviceBegun {
            state,
            user_code: started.user_code,
            verification_uri: started.verification_uri,
            verification_uri_complete: started.verification_uri_complete,
            expires_at,
        })
    }

    /// Counts one more pending authorization of `tenant`, living `lifetime`.
    fn admit_pending(&self, tenant: &str, lifetime: Duration) -> Result<SystemTime, BrokerError> {
        let expires_at = SystemTime::now() + lifetime;
        if self.consent_counts.admit(
            tenant,
            self.settings.consent.max_pending_per_tenant,
            expires_at,
        ) {
            Ok(expires_at)
        } else {
            Err(BrokerError::Overloaded(
                "too many pending authorizations for this tenant",
            ))
        }
    }

    /// Finishes an authorization-code flow with what the redirect brought.
    /// `tenant_ok` says whether the caller may act for a tenant.
    pub async fn complete_authorization(
        &self,
        state: &SecretString,
        redirect: Redirect,
        tenant_ok: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Completed, BrokerError> {
        let (versioned, mut pending) = self
            .load_pending(state)
            .await?
            .ok_or(BrokerError::AuthorizationNotFound)?;
        let now = SystemTime::now();
        if pending.kind != KIND_CODE
            || pending.status != PENDING
            || pending.expired(now)
            || !tenant_ok(&pending.tenant)
        {
            return Err(BrokerError::AuthorizationNotFound);
        }
        // The single-use latch: of two completions, one moves it.
        pending.status = COMPLETING;
        let versioned = self
            .store_pending(state, Some(&versioned), &pending)
            .await?
            .ok_or(BrokerError::AuthorizationNotFound)?;
        let code = match redirect {
            Redirect::Error { error } => {
                let error = crate::upstream::sanitize_code(&error);
                self.finish(state, &versioned, &mut pending, DENIED, &error)
                    .await;
                return Err(BrokerError::AuthorizationDenied { oauth_error: error });
            }
            Redirect::Code { code, iss } => {
                let expected = pending.issuer.clone();
                if let (Some(iss), Some(expected)) = (iss, expected) {
                    // RFC 9207: a response from another issuer is a mix-up.
                    if iss.trim_end_matches('/') != expected.trim_end_matches('/') {
                        self.finish(state, &versioned, &mut pending, FAILED, "invalid_issuer")
                            .await;
                        return Err(BrokerError::IssuerMismatch);
                    }
                }
                code
            }
        };
        self.exchange(state, &versioned, &mut pending, code).await
    }

    /// Exchanges the code through Deposit's own path, and records how the
    /// authorization ended.
    async fn exchange(
        &self,
        state: &SecretString,
        versioned: &Versioned,
        pending: &mut PendingPayload,
        code: SecretString,
    ) -> Result<Completed, BrokerError> {
        let id = pending.id();
        let client = pending.client()?;
        let redirect_uri = Url::parse(&pending.redirect_uri)
            .map_err(|_| BrokerError::RecordUnreadable("pending authorization redirect"))?;
        let deposited = self
            .deposit(DepositCommand {
                id: id.clone(),
                client: (!pending.preset).then_some(client),
                grant: Grant::AuthorizationCode {
                    code,
                    redirect_uri,
                    code_verifier: Some(SecretString::from(pending.secret.clone())),
                    resources: pending.resources.clone(),
                },
                labels: pending.labels.clone(),
            })
            .await;
        match deposited {
            Ok(deposited) => {
                pending.generation = deposited.generation;
                self.finish(state, versioned, pending, COMPLETED, "").await;
                Ok(Completed {
                    id,
                    generation: deposited.generation,
                    key_version: deposited.key_version,
                })
            }
            Err(error) => {
                let code = match &error {
                    BrokerError::ReauthRequired { cause, .. } => cause.as_str().to_owned(),
                    BrokerError::ProviderRejectedClient { oauth_error } => oauth_error.clone(),
                    _ => "server_error".to_owned(),
                };
                self.finish(state, versioned, pending, FAILED, &code).await;
                Err(error)
            }
        }
    }

    /// Where an authorization stands, if the caller may see it.
    pub async fn authorization(
        &self,
        state: &SecretString,
        tenant_ok: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<AuthorizationView, BrokerError> {
        let (_, pending) = self
            .load_pending(state)
            .await?
            .ok_or(BrokerError::AuthorizationNotFound)?;
        if !tenant_ok(&pending.tenant) {
            return Err(BrokerError::AuthorizationNotFound);
        }
        Ok(AuthorizationView {
            id: pending.id(),
            status: pending.status(SystemTime::now()),
            generation: pending.generation,
            error: pending.error.clone(),
            expires_at: from_millis(pending.expires_ms),
        })
    }

    /// Records how an authorization ended. Best effort: the outcome that
    /// matters (the deposit, or nothing) is already decided.
    async fn finish(
        &self,
        state: &SecretString,
        read: &Versioned,
        pending: &mut PendingPayload,
        status: u32,
        error: &str,
    ) {
        pending.status = status;
        error.clone_into(&mut pending.error);
        if let Err(error) = self.store_pending(state, Some(read), pending).await {
            tracing::warn!(%error, "could not record how an authorization ended");
        }
    }

    async fn load_pending(
        &self,
        state: &SecretString,
    ) -> Result<Option<(Versioned, PendingPayload)>, BrokerError> {
        let (key, digest) = key_of(state);
        let Some(versioned) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let pending = self.open_pending(&digest, &versioned)?;
        Ok(Some((versioned, pending)))
    }

    fn open_pending(
        &self,
        digest: &str,
        versioned: &Versioned,
    ) -> Result<PendingPayload, BrokerError> {
        let keyring = self.keys.current();
        let identity = RecordIdentity {
            tenant: SEAL_TENANT,
            subject: digest,
            provider: "",
        };
        let plaintext = crypto::open(&keyring, &identity, &versioned.value)
            .map_err(|_| BrokerError::AuthorizationNotFound)?;
        PendingPayload::decode(plaintext.as_slice())
            .map_err(|_| BrokerError::RecordUnreadable("pending authorization payload"))
    }

    /// Writes a pending authorization by compare-and-swap on what was read
    /// (`None`: it must be new). `Ok(None)`: someone else wrote first.
    async fn store_pending(
        &self,
        state: &SecretString,
        read: Option<&Versioned>,
        pending: &PendingPayload,
    ) -> Result<Option<Versioned>, BrokerError> {
        let (key, digest) = key_of(state);
        self.write_pending(&key, &digest, read, pending).await
    }

    async fn write_pending(
        &self,
        key: &StoreKey,
        digest: &str,
        read: Option<&Versioned>,
        pending: &PendingPayload,
    ) -> Result<Option<Versioned>, BrokerError> {
        let keyring = self.keys.current();
        let identity = RecordIdentity {
            tenant: SEAL_TENANT,
            subject: digest,
            provider: "",
        };
        let plaintext = zeroize::Zeroizing::new(pending.encode_to_vec());
        let sealed = crypto::seal_with(&keyring, keyring.primary(), &identity, &plaintext)
            .map_err(|_| BrokerError::Internal("sealing failed"))?;
        // Not the credential write path: a pending authorization is no
        // credential (no cache, no event, no write lock to share).
        let write = Write {
            expected: read.map(|v| v.revision),
            value: Some(sealed.clone()),
            ..Write::DURABLE
        };
        Ok(match self.store.write(key, write).await? {
            CasOutcome::Written(Some(revision)) => Some(Versioned {
                revision,
                value: sealed,
            }),
            _ => None,
        })
    }

    /// One pass of the device poller and the sweep (see the module docs).
    pub async fn sweep_authorizations(&self) -> Result<(), BrokerError> {
        let prefix = StoreKey::from_bytes(KEY_PREFIX.to_vec());
        let mut after = None;
        loop {
            let page = self.store.scan(&prefix, after.as_ref(), 256).await?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            let next = last.clone();
            for (key, versioned) in &page {
                let digest =
                    String::from_utf8_lossy(&key.as_bytes()[KEY_PREFIX.len()..]).into_owned();
                if let Err(error) = self.sweep_one(key, &digest, versioned).await {
                    tracing::debug!(%error, "pending authorization left for the next sweep");
                }
            }
            if page.len() < 256 {
                return Ok(());
            }
            after = Some(next);
        }
    }

    async fn sweep_one(
        &self,
        key: &StoreKey,
        digest: &str,
        versioned: &Versioned,
    ) -> Result<(), BrokerError> {
        let mut pending = self.open_pending(digest, versioned)?;
        let now = SystemTime::now();
        let ended = pending.status != PENDING && pending.status != COMPLETING;
        if from_millis(pending.expires_ms) + KEEP_FINISHED <= now && (ended || pending.expired(now))
        {
            let delete = Write {
                expected: Some(versioned.revision),
                ..Write::DURABLE
            };
            self.store.write(key, delete).await?;
            return Ok(());
        }
        if pending.kind != KIND_DEVICE || pending.status != PENDING {
            return Ok(());
        }
        if pending.expired(now) {
            pending.status = EXPIRED;
            pending.error = "expired_token".into();
            self.write_pending(key, digest, Some(versioned), &pending)
                .await?;
            return Ok(());
        }
        if millis(now) < pending.next_poll_ms {
            return Ok(());
        }
        self.poll_device(key, digest, versioned, pending).await
    }

    async fn poll_device(
        &self,
        key: &StoreKey,
        digest: &str,
        versioned: &Versioned,
        mut pending: PendingPayload,
    ) -> Result<(), BrokerError> {
        let id = pending.id();
        // A preset's current client: its signing key is never stored.
        let client = match pending.preset {
            true => self.resolve_client(None, &id)?.0,
            false => pending.client()?,
        };
        let device_code = SecretString::from(pending.secret.clone());
        let polled = self.upstream.poll_device(&client, &device_code).await;
        let now = SystemTime::now();
        match polled {
            Ok(DevicePoll::Pending) | Err(crate::upstream::UpstreamError::Unavailable { .. }) => {}
            Ok(DevicePoll::SlowDown) => {
                pending.interval_ms += u64::try_from(SLOW_DOWN.as_millis()).unwrap_or(0);
            }
            Ok(DevicePoll::Denied) => {
                pending.status = DENIED;
                pending.error = "access_denied".into();
            }
            Ok(DevicePoll::Expired) => {
                pending.status = EXPIRED;
                pending.error = "expired_token".into();
            }
            Ok(DevicePoll::Issued(tokens)) => {
                let Some(refresh_token) = tokens.refresh_token else {
                    pending.status = FAILED;
                    pending.error = "no_refresh_token".into();
                    self.write_pending(key, digest, Some(versioned), &pending)
                        .await?;
                    return Ok(());
                };
                let deposited = self
                    .deposit(DepositCommand {
                        id,
                        client: (!pending.preset).then_some(client),
                        grant: Grant::RefreshToken {
                            refresh_token,
                            access_token: Some(tokens.access_token),
                        },
                        labels: pending.labels.clone(),
                    })
                    .await;
                match deposited {
                    Ok(deposited) => {
                        pending.status = COMPLETED;
                        pending.generation = deposited.generation;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "a device authorization's deposit failed");
                        pending.status = FAILED;
                        pending.error = "server_error".into();
                    }
                }
            }
            Err(error) => {
                pending.status = FAILED;
                pending.error = match error {
                    crate::upstream::UpstreamError::ClientRejected { oauth_error }
                    | crate::upstream::UpstreamError::GrantRejected { oauth_error } => oauth_error,
                    _ => "server_error".into(),
                };
            }
        }
        pending.next_poll_ms = millis(now) + pending.interval_ms;
        self.write_pending(key, digest, Some(versioned), &pending)
            .await?;
        Ok(())
    }
}

/// Polls device authorizations and sweeps finished ones, on one replica at
/// a time, until the process ends. Quiet on a replicated store: a replica
/// that does not hold the job asks for it every `CLAIM_RETRY`, and the
/// holder renews its claim only as often as the takeover bound needs.
pub async fn run(broker: Arc<Broker>) {
    let seen = ClaimSeen::default();
    loop {
        let claim = match JobClaim::acquire(&broker, "authorizations", &seen).await {
            Ok(claim) => claim,
            Err(_) => {
                tokio::time::sleep(CLAIM_RETRY).await;
                continue;
            }
        };
        let mut renewed = tokio::time::Instant::now();
        let renew_every = JobClaim::renew_every(&broker);
        loop {
            if let Err(error) = broker.sweep_authorizations().await {
                tracing::warn!(%error, "authorization sweep failed");
            }
            tokio::time::sleep(SWEEP_EVERY).await;
            if renew_every.is_some_and(|every| renewed.elapsed() >= every) {
                if claim.renew(&broker).await.is_err() {
                    break;
                }
                renewed = tokio::time::Instant::now();
            }
        }
    }
}
