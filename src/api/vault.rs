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
    auth::{AuthError, Authenticator, Caller, Principal},
    broker::{
        model::{self, UpstreamRevocation},
        Broker,
    },
};

/// The identity of the connection a request came in on, attached by the
/// transport (see `server::tls`). `Err` when the certificate named no usable
/// identity; such a peer may connect but every call is refused.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Result<crate::auth::Identity, AuthError>);

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
        let identity = match request.extensions().get::<PeerIdentity>() {
            Some(PeerIdentity(identity)) => identity.clone()?,
            None => return Err(AuthError::NoCertificate.into()),
        };
        self.limiter.check(&identity)?;
        Ok(self.auth.principal(identity))
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
pub(crate) fn finish<T>(
    metrics: &crate::metrics::Metrics,
    method: &'static str,
    caller: Option<&Caller>,
    started: Instant,
    result: Result<T, ApiError>,
) -> Result<Response<T>, Status> {
    let elapsed = started.elapsed().as_secs_f64();
    let elapsed_ms = elapsed * 1e3;
    let identity = caller.map(|c| c.identity.to_string()).unwrap_or_default();
    let tenant = caller.map(|c| c.tenant.as_str()).unwrap_or_default();
    match result {
        Ok(response) => {
            metrics.call(method, "OK", elapsed);
            tracing::debug!(method, %identity, tenant, elapsed_ms, "call succeeded");
            Ok(Response::new(response))
        }
        Err(error) => {
            metrics.call(method, error.reason(), elapsed);
            let detail = error_text(&error);
            tracing::info!(method, %identity, tenant, elapsed_ms, reason = error.reason(), %detail, "call failed");
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
            caller = Some(who);
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
            caller = Some(who);
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
            caller = Some(who);
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
