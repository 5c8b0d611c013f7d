//! `credvault.v1.CredentialVault`: authenticate, validate, call the broker,
//! answer. Each method is that sequence and nothing more.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{
    convert,
    pb::{self, credential_vault_server::CredentialVault},
    status::ApiError,
};
use crate::{
    api::admission::IdentityRateLimiter,
    audit,
    auth::{AuthError, Authenticator, Caller, Principal},
    broker::{
        model::{self, CredentialId, UpstreamRevocation},
        Broker,
    },
};

/// The connection a request came in on, attached by the transport (see
/// `server::tls`). A TLS peer whose certificate named no usable identity may
/// connect, but every call is refused.
#[derive(Clone, Debug)]
pub enum Peer {
    /// An mTLS connection and the identity of its certificate.
    Tls(Result<crate::auth::Identity, AuthError>),
    /// A mesh-mode connection from the local sidecar: callers' identities come
    /// from `x-forwarded-client-cert` elements added for `vault_identity`.
    Mesh { vault_identity: Arc<str> },
}

/// The CredentialVault service.
pub struct VaultService {
    broker: Arc<Broker>,
    gate: Arc<Gate>,
}

/// What every call passes before its handler runs: authentication, then the
/// per-identity rate limit.
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub limiter: IdentityRateLimiter,
}

impl Gate {
    /// The principal behind a request, from its connection's identity.
    pub(crate) fn principal<T>(&self, request: &Request<T>) -> Result<Principal, ApiError> {
        let forwarded = request.metadata().get("x-forwarded-client-cert");
        let identity = match request.extensions().get::<Peer>() {
            // Only a sidecar in mesh mode may speak for a client; on the mTLS
            // port the header is an impersonation attempt.
            Some(Peer::Tls(_)) if forwarded.is_some() => {
                return Err(AuthError::ForwardedIdentityRefused.into())
            }
            Some(Peer::Tls(identity)) => identity.clone()?,
            Some(Peer::Mesh { vault_identity }) => crate::auth::mesh::identity_from_xfcc(
                forwarded.and_then(|v| v.to_str().ok()),
                vault_identity,
                self.auth.identity_rules(),
            )
            .map_err(AuthError::from)?,
            None => return Err(AuthError::NoCertificate.into()),
        };
        self.limiter.check(&identity)?;
        let bearer = match request.metadata().get("authorization") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .map(str::trim)
                    .ok_or(AuthError::Token(crate::auth::TokenError::Malformed))?,
            ),
        };
        Ok(self.auth.principal(identity, bearer)?)
    }
}

impl VaultService {
    pub fn new(broker: Arc<Broker>, gate: Arc<Gate>) -> Self {
        Self { broker, gate }
    }

    fn principal<T>(&self, request: &Request<T>) -> Result<Principal, ApiError> {
        self.gate.principal(request)
    }
}

/// Logs the outcome of one call with the fields operators filter on.
/// Who made a call and about which credential, for the audit event.
pub(crate) struct Audited {
    caller: Caller,
    provider: String,
    subject_hash: String,
}

impl Audited {
    pub(crate) fn new(caller: Caller, id: Option<&CredentialId>) -> Self {
        Self {
            caller,
            provider: id.map(|id| id.provider.clone()).unwrap_or_default(),
            subject_hash: id
                .map(|id| audit::subject_hash(&id.subject))
                .unwrap_or_default(),
        }
    }
}

/// Records the outcome of one call: metrics, the audit event, a log line.
pub(crate) fn finish<T>(
    metrics: &crate::metrics::Metrics,
    method: &'static str,
    call: Option<&Audited>,
    started: Instant,
    result: Result<T, ApiError>,
) -> Result<Response<T>, Status> {
    let elapsed = started.elapsed().as_secs_f64();
    let latency_ms = elapsed * 1e3;
    let identity = call
        .map(|c| c.caller.identity.to_string())
        .unwrap_or_default();
    let tenant = call.map(|c| c.caller.tenant.as_str()).unwrap_or_default();
    let provider = call.map(|c| c.provider.as_str()).unwrap_or_default();
    let subject = call.map(|c| c.subject_hash.as_str()).unwrap_or_default();
    let reason = match &result {
        Ok(_) => "OK",
        Err(error) => error.reason(),
    };
    metrics.call(method, reason, elapsed);
    tracing::info!(
        target: audit::TARGET,
        method,
        %identity,
        tenant,
        provider,
        subject,
        reason,
        latency_ms,
        "call"
    );
    match result {
        Ok(response) => Ok(Response::new(response)),
        Err(error) => {
            let detail = error_text(&error);
            tracing::debug!(method, %identity, tenant, reason, %detail, "call failed");
            Err(error.into())
        }
    }
}

fn error_text(error: &ApiError) -> String {
    match error {
        ApiError::InvalidFields(v) => v
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>()
            .join(","),
        ApiError::Auth(e) => e.to_string(),
        ApiError::Broker(e) => e.to_string(),
        ApiError::Overloaded(what) => (*what).to_owned(),
        ApiError::KeyringRejected(reason) => reason.clone(),
    }
}

#[tonic::async_trait]
impl CredentialVault for VaultService {
    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            let principal = self.principal(&request)?;
            let (who, command) = convert::deposit(request.into_inner(), &principal)?;
            caller = Some(Audited::new(who, Some(&command.id)));
            let deposited = self.broker.deposit(command).await?;
            Ok(pb::DepositResponse {
                generation: deposited.generation,
                key_version: deposited.key_version,
            })
        }
        .await;
        finish(
            self.broker.metrics(),
            "Deposit",
            caller.as_ref(),
            started,
            result,
        )
    }

    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            let principal = self.principal(&request)?;
            let (who, token_request) = convert::get_access_token(
                request.into_inner(),
                &principal,
                self.broker.settings().max_min_valid_for,
            )?;
            caller = Some(Audited::new(who, Some(&token_request.id)));
            let token = self.broker.get_access_token(token_request).await?;
            Ok(token_response(token))
        }
        .await;
        finish(
            self.broker.metrics(),
            "GetAccessToken",
            caller.as_ref(),
            started,
            result,
        )
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            let principal = self.principal(&request)?;
            let (who, id) = convert::revoke(request.into_inner(), &principal)?;
            caller = Some(Audited::new(who, Some(&id)));
            let revoked = self.broker.revoke(&id).await?;
            Ok(pb::RevokeResponse {
                existed: revoked.existed,
                upstream: match revoked.upstream {
                    UpstreamRevocation::NotConfigured => pb::UpstreamRevocation::NotConfigured,
                    UpstreamRevocation::Revoked => pb::UpstreamRevocation::Revoked,
                    UpstreamRevocation::Failed => pb::UpstreamRevocation::Failed,
                } as i32,
            })
        }
        .await;
        finish(
            self.broker.metrics(),
            "Revoke",
            caller.as_ref(),
            started,
            result,
        )
    }
}

fn token_response(token: model::AccessToken) -> pb::GetAccessTokenResponse {
    pb::GetAccessTokenResponse {
        // The one place a token leaves the vault: into the response body.
        access_token: token.token.expose().to_owned(),
        token_type: token.token_type.clone(),
        expires_at: Some(prost_types::Timestamp::from(token.expires_at)),
        scopes: token.scopes.clone(),
    }
}
