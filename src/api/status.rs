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
    pub const CURSOR_EXPIRED: &str = "CURSOR_EXPIRED";
    pub const AUTHORIZATION_NOT_FOUND: &str = "AUTHORIZATION_NOT_FOUND";
    pub const AUTHORIZATION_DENIED: &str = "AUTHORIZATION_DENIED";
    /// A watcher read too slowly and its stream was ended; it resumes
    /// after the last cursor it received.
    pub const CONSUMER_TOO_SLOW: &str = "CONSUMER_TOO_SLOW";
    /// This vault is shutting down and ended a stream it held; resume on
    /// another replica or after the restart, from the last cursor received.
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    /// A call took longer than `server.request_timeout`; what it started (a
    /// refresh) goes on, so a retry is likely to be answered at once.
    pub const CALL_TIMED_OUT: &str = "CALL_TIMED_OUT";
    /// An admin reload refused a keyring (wrong passphrase, fingerprints).
    pub const KEYRING_REJECTED: &str = "KEYRING_REJECTED";
    /// An admin reload refused a policy file (invalid); the running one stays.
    pub const POLICY_REJECTED: &str = "POLICY_REJECTED";
    /// Concurrent writers of one credential kept winning; retry the call.
    pub const WRITE_CONTENTION: &str = "WRITE_CONTENTION";
    /// A tenant's credential quota (`server.max_records_per_tenant`) is full.
    pub const QUOTA_EXCEEDED: &str = "QUOTA_EXCEEDED";
    /// A key operation needs every replica to hold a key version first.
    pub const KEY_ROLLOUT_PENDING: &str = "KEY_ROLLOUT_PENDING";
    /// A job (a rewrap) runs on another replica.
    pub const JOB_RUNNING_ELSEWHERE: &str = "JOB_RUNNING_ELSEWHERE";
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
    PolicyRejected(String),
    /// A watch stream whose reader fell too far behind was ended.
    ConsumerTooSlow,
    /// A watch stream was ended because this vault is shutting down.
    ShuttingDown,
    /// The call took longer than `server.request_timeout` to answer.
    TimedOut(std::time::Duration),
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

/// Everything the wire says about one failure; built in one place,
/// [`ApiError::wire`].
pub(crate) struct Wire {
    pub code: Code,
    pub reason: &'static str,
    /// For the caller: lowercase, never a secret or an internal detail.
    pub message: String,
    /// For the server log: may name internals, never a secret.
    pub detail: String,
    metadata: HashMap<String, String>,
    violations: Vec<(String, String)>,
    retry_after: Option<std::time::Duration>,
    /// Logged as an error when sent: the operator must look.
    alarm: bool,
}

impl Wire {
    fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            code,
            reason,
            detail: message.clone(),
            message,
            metadata: HashMap::new(),
            violations: Vec::new(),
            retry_after: None,
            alarm: false,
        }
    }

    fn meta(mut self, key: &str, value: impl Into<String>) -> Self {
        self.metadata.insert(key.to_owned(), value.into());
        self
    }

    fn violation(mut self, field: impl Into<String>, description: impl Into<String>) -> Self {
        self.violations.push((field.into(), description.into()));
        self
    }

    /// Hides `detail` from the caller behind `message`, and raises the alarm.
    fn internal(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self.alarm = true;
        self
    }

    pub fn into_status(self) -> Status {
        if self.alarm {
            tracing::error!(reason = self.reason, detail = %self.detail, "call failed inside the vault");
        }
        let mut details = ErrorDetails::new();
        for (field, description) in self.violations {
            details.add_bad_request_violation(field, description);
        }
        if let Some(delay) = self.retry_after {
            details.set_retry_info(Some(delay));
        }
        details.set_error_info(self.reason, ERROR_DOMAIN, self.metadata);
        Status::with_error_details(self.code, self.message, details)
    }
}

impl ApiError {
    /// The one table from failures to the wire (DESIGN §4).
    pub(crate) fn wire(&self) -> Wire {
        use reason::*;
        match self {
            Self::InvalidFields(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                let wire = Wire::new(
                    Code::InvalidArgument,
                    INVALID_FIELD,
                    format!("invalid request field(s): {}", fields.join(", ")),
                );
                violations.iter().fold(wire, |wire, v| {
                    wire.violation(v.field.clone(), v.description.clone())
                })
            }
            Self::Overloaded(what) => Wire::new(
                Code::ResourceExhausted,
                OVERLOADED,
                format!("overloaded: {what}"),
            ),
            Self::KeyringRejected(why) => Wire::new(
                Code::FailedPrecondition,
                KEYRING_REJECTED,
                format!("keyring rejected: {why}"),
            ),
            Self::PolicyRejected(why) => Wire::new(
                Code::FailedPrecondition,
                POLICY_REJECTED,
                format!("policy rejected: {why}"),
            ),
            Self::ConsumerTooSlow => Wire::new(
                Code::Aborted,
                CONSUMER_TOO_SLOW,
                "the stream fell too far behind; resume after the last cursor received",
            ),
            Self::TimedOut(limit) => Wire::new(
                Code::DeadlineExceeded,
                CALL_TIMED_OUT,
                format!(
                    "the call took longer than the server's limit of {} ms and was not answered; what it started may still land (a token refresh goes on, so a retry is answered from it)",
                    limit.as_millis()
                ),
            ),
            Self::ShuttingDown => Wire::new(
                Code::Unavailable,
                SHUTTING_DOWN,
                "the vault is shutting down; resume after the last cursor received",
            ),
            Self::Auth(error) => auth_wire(error),
            Self::Broker(error) => broker_wire(error),
        }
    }
}

fn auth_wire(error: &AuthError) -> Wire {
    use reason::*;
    let message = error.to_string();
    match error {
        AuthError::NoCertificate
        | AuthError::BadIdentity(_)
        | AuthError::Token(_)
        | AuthError::TokenRequired { .. }
        | AuthError::ForwardedIdentityRefused
        | AuthError::UntrustedDomain { .. }
        | AuthError::Mesh(_) => Wire::new(Code::Unauthenticated, UNAUTHENTICATED, message),
        AuthError::TenantNotPermitted { tenant, .. } => {
            Wire::new(Code::PermissionDenied, TENANT_NOT_PERMITTED, message)
                .meta("tenant", tenant.clone())
        }
        AuthError::ActionNotPermitted { action, .. } => {
            Wire::new(Code::PermissionDenied, ACTION_NOT_PERMITTED, message)
                .meta("action", action.as_str())
        }
        AuthError::TenantRequired { .. } => {
            Wire::new(Code::InvalidArgument, INVALID_FIELD, message).violation(
                "credential.tenant",
                "required: the caller may act for several tenants",
            )
        }
    }
}

fn broker_wire(error: &BrokerError) -> Wire {
    use reason::*;
    let message = error.to_string();
    match error {
        BrokerError::NotFound => Wire::new(Code::NotFound, CREDENTIAL_NOT_FOUND, message),
        BrokerError::ReauthRequired { cause, provider } => {
            Wire::new(Code::FailedPrecondition, REAUTH_REQUIRED, message)
                .meta("cause", cause.as_str())
                .meta("provider", provider.clone())
        }
        BrokerError::KeyVersionUnavailable { version } => {
            Wire::new(Code::Internal, KEY_VERSION_UNAVAILABLE, message)
                .meta("key_version", version.to_string())
        }
        BrokerError::KeyRolloutPending { version } => {
            Wire::new(Code::FailedPrecondition, KEY_ROLLOUT_PENDING, message)
                .meta("key_version", version.to_string())
        }
        BrokerError::JobRunningElsewhere => {
            Wire::new(Code::FailedPrecondition, JOB_RUNNING_ELSEWHERE, message)
        }
        BrokerError::RecordUnreadable(_) => Wire::new(Code::DataLoss, RECORD_UNREADABLE, message),
        BrokerError::ProviderRejectedClient { oauth_error } => {
            Wire::new(Code::FailedPrecondition, PROVIDER_REJECTED_CLIENT, message)
                .meta("oauth_error", oauth_error.clone())
        }
        BrokerError::UpstreamUnavailable { retry_after, .. } => {
            let mut wire = Wire::new(Code::Unavailable, UPSTREAM_UNAVAILABLE, message);
            wire.retry_after = *retry_after;
            wire
        }
        BrokerError::EndpointNotAllowed(_) => {
            Wire::new(Code::InvalidArgument, ENDPOINT_NOT_ALLOWED, message)
        }
        BrokerError::ClientRequired { .. } => {
            Wire::new(Code::InvalidArgument, INVALID_FIELD, message).violation(
                "client",
                "required unless `credential.provider` names a provider preset",
            )
        }
        BrokerError::Contention => Wire::new(Code::Aborted, WRITE_CONTENTION, message),
        BrokerError::InvalidCursor => Wire::new(Code::InvalidArgument, INVALID_FIELD, message)
            .violation("after", "not a cursor this vault handed out"),
        BrokerError::CursorExpired => Wire::new(Code::OutOfRange, CURSOR_EXPIRED, message),
        BrokerError::FieldRequired(field) => {
            Wire::new(Code::InvalidArgument, INVALID_FIELD, message).violation(*field, "required")
        }
        BrokerError::AuthorizationNotFound => {
            Wire::new(Code::NotFound, AUTHORIZATION_NOT_FOUND, message)
        }
        BrokerError::AuthorizationDenied { oauth_error } => {
            Wire::new(Code::FailedPrecondition, AUTHORIZATION_DENIED, message)
                .meta("oauth_error", oauth_error.clone())
        }
        BrokerError::IssuerMismatch => Wire::new(Code::InvalidArgument, INVALID_FIELD, message)
            .violation("iss", "does not match the client's issuer (RFC 9207)"),
        BrokerError::Overloaded(_) => Wire::new(Code::ResourceExhausted, OVERLOADED, message),
        BrokerError::QuotaExceeded { quota } => {
            Wire::new(Code::ResourceExhausted, QUOTA_EXCEEDED, message)
                .meta("quota", quota.to_string())
        }
        // Internal details stay in the server log.
        BrokerError::Storage(detail) => Wire::new(
            Code::Unavailable,
            STORAGE_UNAVAILABLE,
            "storage is unavailable",
        )
        .internal(detail.clone()),
        BrokerError::Internal(detail) => {
            Wire::new(Code::Internal, INTERNAL, "internal error").internal(*detail)
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.wire().into_status()
    }
}
