//! The broker's failures: one variant per condition a caller must tell apart.
//! Mapped to gRPC statuses in exactly one place, `api::status`.

use std::time::Duration;

use super::model::ReauthCause;
use crate::{store::StoreError, upstream::EndpointRejected};

/// Everything that can go wrong in a broker operation. Cloneable because one
/// refresh's outcome is handed to every caller waiting on it. No variant ever
/// carries a token, a secret or key material.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no credential for this reference")]
    NotFound,
    #[error("the user must re-consent at `{provider}` ({})", cause.as_str())]
    ReauthRequired {
        cause: ReauthCause,
        provider: String,
    },
    #[error("the record's key version {version} is not in the keyring")]
    KeyVersionUnavailable { version: u32 },
    /// Not every live replica can open key `version` yet: reload the
    /// keyring on every replica first.
    #[error("not every replica can open key version {version} yet")]
    KeyRolloutPending { version: u32 },
    /// Another replica runs this job (a rewrap); its progress is saved.
    #[error("a rewrap is running on another replica")]
    JobRunningElsewhere,
    #[error("the stored record is unreadable: {0}")]
    RecordUnreadable(&'static str),
    #[error("the provider rejected the client: {oauth_error}")]
    ProviderRejectedClient { oauth_error: String },
    #[error("the provider is unavailable: {reason}")]
    UpstreamUnavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    EndpointNotAllowed(EndpointRejected),
    #[error("no OAuth client given and no provider preset named `{provider}`")]
    ClientRequired { provider: String },
    #[error("storage is unavailable: {0}")]
    Storage(String),
    /// This process is at one of its bounds (refreshes in flight).
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The tenant holds as many credentials as its quota allows.
    #[error("the tenant's credential quota ({quota}) is reached")]
    QuotaExceeded { quota: u64 },
    /// Concurrent writers kept winning the compare-and-swap; retrying later
    /// will do. Not a storage fault.
    #[error("the credential is being changed concurrently")]
    Contention,
    /// An event cursor that this vault never handed out.
    #[error("the event cursor is malformed")]
    InvalidCursor,
    /// The events after this cursor were trimmed: the reader missed some.
    #[error("the event cursor is older than the retained history")]
    CursorExpired,
    /// A request needs this field (no preset or client supplies it).
    #[error("`{0}` is required")]
    FieldRequired(&'static str),
    /// The `state` is unknown, used, expired, or not the caller's.
    #[error("no pending authorization for this state")]
    AuthorizationNotFound,
    /// The user or the provider declined.
    #[error("the authorization was declined: {oauth_error}")]
    AuthorizationDenied { oauth_error: String },
    /// The redirect's `iss` names another authorization server (RFC 9207).
    #[error("the redirect's issuer does not match the client's")]
    IssuerMismatch,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<StoreError> for BrokerError {
    fn from(error: StoreError) -> Self {
        Self::Storage(error.to_string())
    }
}
