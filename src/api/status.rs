//! The one table from failures to the wire (DESIGN §4).
//!
//! Every status carries a `google.rpc.ErrorInfo` with domain `credvault` and a
//! stable `reason`, so a client in any language branches on one string.
//! Messages are lowercase, and never contain a token, a secret or key material:
//! every input here is an error type that cannot hold one.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::ERROR_DOMAIN;
use crate::{auth::AuthError, broker::BrokerError};

/// The stable `reason` strings of the error model.
pub mod reason {
    pub const REAUTH_REQUIRED: &str = "REAUTH_REQUIRED";
    pub const CREDENTIAL_NOT_FOUND: &str = "CREDENTIAL_NOT_FOUND";
    pub const KEY_VERSION_UNAVAILABLE: &str = "KEY_VERSION_UNAVAILABLE";
    pub const PROVIDER_REJECTED_CLIENT: &str = "PROVIDER_REJECTED_CLIENT";
    pub const UPSTREAM_UNAVAILABLE: &str = "UPSTREAM_UNAVAILABLE";
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    pub const ENDPOINT_NOT_ALLOWED: &str = "ENDPOINT_NOT_ALLOWED";
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const TENANT_NOT_PERMITTED: &str = "TENANT_NOT_PERMITTED";
    pub const ACTION_NOT_PERMITTED: &str = "ACTION_NOT_PERMITTED";
    pub const OVERLOADED: &str = "OVERLOADED";
    /// Additions to DESIGN §4 (see README): storage down, record damaged.
    pub const STORAGE_UNAVAILABLE: &str = "STORAGE_UNAVAILABLE";
    pub const RECORD_UNREADABLE: &str = "RECORD_UNREADABLE";
    pub const INTERNAL: &str = "INTERNAL";
    /// An admin reload refused a keyring (wrong passphrase, fingerprints).
    pub const KEYRING_REJECTED: &str = "KEYRING_REJECTED";
}

/// One invalid request field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// Proto field path, e.g. `credential.subject`.
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Everything an RPC can fail with.
#[derive(Debug)]
pub enum ApiError {
    InvalidFields(Vec<FieldViolation>),
    Auth(AuthError),
    Broker(BrokerError),
    Overloaded(&'static str),
    KeyringRejected(String),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self::Auth(error)
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> Self {
        Self::Broker(error)
    }
}

impl From<Vec<FieldViolation>> for ApiError {
    fn from(violations: Vec<FieldViolation>) -> Self {
        Self::InvalidFields(violations)
    }
}

impl ApiError {
    /// The stable reason, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        self.wire().1
    }

    fn wire(&self) -> (Code, &'static str) {
        use reason::*;
        match self {
            Self::InvalidFields(_) => (Code::InvalidArgument, INVALID_FIELD),
            Self::Overloaded(_) => (Code::ResourceExhausted, OVERLOADED),
            Self::KeyringRejected(_) => (Code::FailedPrecondition, KEYRING_REJECTED),
            Self::Auth(error) => match error {
                AuthError::NoCertificate
                | AuthError::BadIdentity(_)
                | AuthError::Token(_)
                | AuthError::TokenRequired { .. }
                | AuthError::ForwardedIdentityRefused
                | AuthError::Mesh(_) => (Code::Unauthenticated, UNAUTHENTICATED),
                AuthError::TenantNotPermitted { .. } => {
                    (Code::PermissionDenied, TENANT_NOT_PERMITTED)
                }
                AuthError::ActionNotPermitted { .. } => {
                    (Code::PermissionDenied, ACTION_NOT_PERMITTED)
                }
                AuthError::TenantRequired { .. } => (Code::InvalidArgument, INVALID_FIELD),
            },
            Self::Broker(error) => match error {
                BrokerError::NotFound => (Code::NotFound, CREDENTIAL_NOT_FOUND),
                BrokerError::ReauthRequired { .. } => (Code::FailedPrecondition, REAUTH_REQUIRED),
                BrokerError::KeyVersionUnavailable { .. } => {
                    (Code::Internal, KEY_VERSION_UNAVAILABLE)
                }
                BrokerError::RecordUnreadable(_) => (Code::DataLoss, RECORD_UNREADABLE),
                BrokerError::ProviderRejectedClient { .. } => {
                    (Code::FailedPrecondition, PROVIDER_REJECTED_CLIENT)
                }
                BrokerError::UpstreamUnavailable { .. } => {
                    (Code::Unavailable, UPSTREAM_UNAVAILABLE)
                }
                BrokerError::EndpointNotAllowed(_) => (Code::InvalidArgument, ENDPOINT_NOT_ALLOWED),
                BrokerError::ClientRequired { .. } => (Code::InvalidArgument, INVALID_FIELD),
                BrokerError::Storage(_) => (Code::Unavailable, STORAGE_UNAVAILABLE),
                BrokerError::Internal(_) => (Code::Internal, INTERNAL),
            },
        }
    }

    fn message(&self) -> String {
        match self {
            Self::InvalidFields(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                format!("invalid request field(s): {}", fields.join(", "))
            }
            Self::Auth(error) => error.to_string(),
            // Internal details stay in the server log.
            Self::Broker(BrokerError::Storage(_)) => "storage is unavailable".to_owned(),
            Self::Broker(BrokerError::Internal(_)) => "internal error".to_owned(),
            Self::Broker(error) => error.to_string(),
            Self::Overloaded(what) => format!("overloaded: {what}"),
            Self::KeyringRejected(reason) => format!("keyring rejected: {reason}"),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let (code, reason) = error.wire();
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        match &error {
            ApiError::InvalidFields(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
            }
            ApiError::Auth(AuthError::TenantRequired { .. }) => {
                details.add_bad_request_violation(
                    "credential.tenant",
                    "required: the caller may act for several tenants",
                );
            }
            ApiError::Auth(AuthError::TenantNotPermitted { tenant, .. }) => {
                metadata.insert("tenant".to_owned(), tenant.clone());
            }
            ApiError::Auth(AuthError::ActionNotPermitted { action, .. }) => {
                metadata.insert("action".to_owned(), action.as_str().to_owned());
            }
            ApiError::Broker(BrokerError::ReauthRequired { cause, provider }) => {
                metadata.insert("cause".to_owned(), cause.as_str().to_owned());
                metadata.insert("provider".to_owned(), provider.clone());
            }
            ApiError::Broker(BrokerError::KeyVersionUnavailable { version }) => {
                metadata.insert("key_version".to_owned(), version.to_string());
            }
            ApiError::Broker(BrokerError::ProviderRejectedClient { oauth_error }) => {
                metadata.insert("oauth_error".to_owned(), oauth_error.clone());
            }
            ApiError::Broker(BrokerError::UpstreamUnavailable {
                retry_after: Some(delay),
                ..
            }) => {
                details.set_retry_info(Some(*delay));
            }
            ApiError::Broker(BrokerError::ClientRequired { .. }) => {
                details.add_bad_request_violation(
                    "client",
                    "required unless `credential.provider` names a provider preset",
                );
            }
            ApiError::Broker(BrokerError::Storage(detail)) => {
                tracing::error!(%detail, "storage failure");
            }
            ApiError::Broker(BrokerError::Internal(detail)) => {
                tracing::error!(%detail, "internal failure");
            }
            _ => {}
        }
        details.set_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, error.message(), details)
    }
}
