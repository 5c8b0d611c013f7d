//! The broker's domain vocabulary: which credential, which OAuth client, which
//! grant, which token. Constructed only from validated input (see `api/`).

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, SystemTime},
};

use url::Url;

// The OAuth client and its tokens belong to `upstream`; the lifecycle speaks
// of them in the same words.
pub use crate::upstream::{AccessToken, ClientAuth, ClientConfig};
use crate::{secret::SecretString, store::StoreKey};

/// One credential: whose grant, at which provider, in which tenant.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CredentialId {
    pub tenant: String,
    pub subject: String,
    pub provider: String,
}

impl CredentialId {
    pub fn store_key(&self) -> StoreKey {
        StoreKey::new(&self.tenant, &self.subject, &self.provider)
    }
}

impl fmt::Debug for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Subjects are user identifiers: personal data, not for logs.
        f.debug_struct("CredentialId")
            .field("tenant", &self.tenant)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// What a Deposit hands the vault.
#[derive(Debug)]
pub enum Grant {
    RefreshToken {
        refresh_token: SecretString,
        access_token: Option<AccessToken>,
    },
    AuthorizationCode {
        code: SecretString,
        redirect_uri: Url,
        code_verifier: Option<SecretString>,
        /// RFC 8707 resources the authorization asked for.
        resources: Vec<String>,
    },
    ClientCredentials,
}

/// Why a grant is dead and the user must go back through consent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReauthCause {
    /// The provider answered `invalid_grant`.
    InvalidGrant,
    /// The provider answered `invalid_scope` to a refresh.
    InvalidScope,
    /// The record's key version is present but the AEAD rejects it.
    Undecryptable,
    /// The access token expired and the grant came without a refresh token.
    NoRefreshToken,
}

impl ReauthCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidScope => "invalid_scope",
            Self::Undecryptable => "undecryptable",
            Self::NoRefreshToken => "no_refresh_token",
        }
    }

    /// The cause of a grant the provider rejected with `oauth_error`.
    pub fn of_rejected_grant(oauth_error: &str) -> Self {
        if oauth_error == "invalid_scope" {
            Self::InvalidScope
        } else {
            Self::InvalidGrant
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::InvalidGrant,
            Self::InvalidScope,
            Self::Undecryptable,
            Self::NoRefreshToken,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Whether the grant still works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialState {
    Active,
    /// Persisted so later calls fail fast without asking the provider again.
    ReauthRequired(ReauthCause),
}

/// Everything stored for one credential; sealed as a whole.
#[derive(Clone, Debug)]
pub struct CredentialRecord {
    /// Bumps on every Deposit; refresh write-backs keep it.
    pub generation: u64,
    pub state: CredentialState,
    pub client: ClientConfig,
    /// Deposited without a client: the preset whose current settings apply.
    pub preset: Option<String>,
    /// `None` for client-credentials grants, which mint tokens without one.
    pub refresh_token: Option<SecretString>,
    pub access_token: Option<AccessToken>,
    /// Minted with the client alone (no user): refreshed by asking again.
    pub client_credentials: bool,
    pub labels: BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub last_refresh_at: Option<SystemTime>,
    /// Since when refreshes have failed transiently, without a success.
    pub failing_since: Option<SystemTime>,
    /// REFRESH_FAILING was logged for the current streak.
    pub failing_reported: bool,
    /// The last event logged about this credential, and when.
    pub last_event: Option<(super::events::EventType, SystemTime)>,
}

/// A new grant for a credential, after validation.
#[derive(Debug)]
pub struct DepositCommand {
    pub id: CredentialId,
    /// `None`: use the provider preset named by `id.provider`.
    pub client: Option<ClientConfig>,
    pub grant: Grant,
    pub labels: BTreeMap<String, String>,
}

/// The answer to a Deposit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deposited {
    pub generation: u64,
    pub key_version: u32,
}

/// What a caller asks of GetAccessToken.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub id: CredentialId,
    pub min_valid_for: Option<Duration>,
    pub force_refresh: bool,
}

/// The outcome of upstream revocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamRevocation {
    NotConfigured,
    Revoked,
    Failed,
}

/// The answer to a Revoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub existed: bool,
    pub upstream: UpstreamRevocation,
}
