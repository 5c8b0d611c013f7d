//! `credvault.v1.CredentialVault`: each method admits its request (validate,
//! authorize) and hands the command to the broker; the call frame
//! ([`super::call`]) does the rest.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use super::{
    call::{AuditEntry, Calls},
    convert,
    events::{self, EventStream, Watch, Watching},
    pb::{self, credential_vault_server::CredentialVault},
};
use crate::{
    auth::{Action, Principal},
    broker::{
        consent::{AuthorizationView, FlowStatus},
        model::{self, UpstreamRevocation},
        Broker,
    },
};

/// The CredentialVault service.
pub struct VaultService {
    broker: Arc<Broker>,
    calls: Calls,
    /// Upper bound on a request's `min_valid_for`.
    max_min_valid_for: Duration,
    /// How event streams are bounded.
    watching: Watching,
}

impl VaultService {
    pub fn new(
        broker: Arc<Broker>,
        calls: Calls,
        max_min_valid_for: Duration,
        watching: Watching,
    ) -> Self {
        Self {
            broker,
            calls,
            max_min_valid_for,
            watching,
        }
    }
}

#[tonic::async_trait]
impl CredentialVault for VaultService {
    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        let admit = |principal, request: pb::DepositRequest, entry: &mut AuditEntry| {
            entry.requested(request.credential.as_ref());
            let (caller, command) = convert::deposit(request, &principal)?;
            entry.authorized(&caller);
            Ok(command)
        };
        let run = |command| async {
            let deposited = self.broker.deposit(command).await?;
            Ok(pb::DepositResponse {
                generation: deposited.generation,
                key_version: deposited.key_version,
            })
        };
        self.calls.handle("Deposit", request, admit, run).await
    }

    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        let admit = |principal, request: pb::GetAccessTokenRequest, entry: &mut AuditEntry| {
            entry.requested(request.credential.as_ref());
            let (caller, token_request) =
                convert::get_access_token(request, &principal, self.max_min_valid_for)?;
            entry.authorized(&caller);
            Ok(token_request)
        };
        let run = |token_request| async {
            let token = self.broker.get_access_token(token_request).await?;
            Ok(token_response(token))
        };
        self.calls
            .handle("GetAccessToken", request, admit, run)
            .await
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let admit = |principal, request: pb::RevokeRequest, entry: &mut AuditEntry| {
            entry.requested(request.credential.as_ref());
            let (caller, id) = convert::revoke(request, &principal)?;
            entry.authorized(&caller);
            Ok(id)
        };
        let run = |id| async move {
            let revoked = self.broker.revoke(&id).await?;
            Ok(pb::RevokeResponse {
                existed: revoked.existed,
                upstream: match revoked.upstream {
                    UpstreamRevocation::NotConfigured => pb::UpstreamRevocation::NotConfigured,
                    UpstreamRevocation::Revoked => pb::UpstreamRevocation::Revoked,
                    UpstreamRevocation::Failed => pb::UpstreamRevocation::Failed,
                } as i32,
            })
        };
        self.calls.handle("Revoke", request, admit, run).await
    }

    async fn begin_authorization(
        &self,
        request: Request<pb::BeginAuthorizationRequest>,
    ) -> Result<Response<pb::BeginAuthorizationResponse>, Status> {
        let admit = |principal, request: pb::BeginAuthorizationRequest, entry: &mut AuditEntry| {
            entry.requested(request.credential.as_ref());
            let (caller, command) = convert::begin_authorization(request, &principal)?;
            entry.authorized(&caller);
            Ok(command)
        };
        let run = |command| async {
            let begun = self.broker.begin_authorization(command).await?;
            Ok(pb::BeginAuthorizationResponse {
                // The other place a secret leaves the vault: the state, to
                // the caller that began the flow.
                authorization_url: begun.authorization_url.expose().to_owned(),
                state: begun.state.expose().to_owned(),
                expires_at: timestamp(begun.expires_at),
            })
        };
        self.calls
            .handle("BeginAuthorization", request, admit, run)
            .await
    }

    async fn complete_authorization(
        &self,
        request: Request<pb::CompleteAuthorizationRequest>,
    ) -> Result<Response<pb::CompleteAuthorizationResponse>, Status> {
        let admit = |principal: Principal, request, _entry: &mut AuditEntry| {
            let (state, redirect) = convert::complete_authorization(request)?;
            Ok((principal, state, redirect))
        };
        let run = |(principal, state, redirect): (Principal, _, _)| async move {
            let completed = self
                .broker
                .complete_authorization(&state, redirect, &may_authorize(&principal))
                .await?;
            Ok(pb::CompleteAuthorizationResponse {
                credential: Some(convert::credential_ref(completed.id)),
                generation: completed.generation,
                key_version: completed.key_version,
            })
        };
        self.calls
            .handle("CompleteAuthorization", request, admit, run)
            .await
    }

    async fn begin_device_authorization(
        &self,
        request: Request<pb::BeginDeviceAuthorizationRequest>,
    ) -> Result<Response<pb::BeginDeviceAuthorizationResponse>, Status> {
        let admit =
            |principal, request: pb::BeginDeviceAuthorizationRequest, entry: &mut AuditEntry| {
                entry.requested(request.credential.as_ref());
                let (caller, command) = convert::begin_device_authorization(request, &principal)?;
                entry.authorized(&caller);
                Ok(command)
            };
        let run = |command: convert::DeviceCommand| async {
            let begun = self
                .broker
                .begin_device_authorization(
                    command.id,
                    command.client,
                    command.scopes,
                    command.resources,
                    command.labels,
                )
                .await?;
            Ok(pb::BeginDeviceAuthorizationResponse {
                state: begun.state.expose().to_owned(),
                user_code: begun.user_code,
                verification_uri: begun.verification_uri,
                verification_uri_complete: begun.verification_uri_complete,
                expires_at: timestamp(begun.expires_at),
            })
        };
        self.calls
            .handle("BeginDeviceAuthorization", request, admit, run)
            .await
    }

    async fn get_authorization(
        &self,
        request: Request<pb::GetAuthorizationRequest>,
    ) -> Result<Response<pb::Authorization>, Status> {
        let admit = |principal: Principal, request, _entry: &mut AuditEntry| {
            Ok((principal, convert::get_authorization(request)?))
        };
        let run = |(principal, state): (Principal, crate::secret::SecretString)| async move {
            let view = self
                .broker
                .authorization(&state, &may_authorize(&principal))
                .await?;
            Ok(authorization(state.expose().to_owned(), view))
        };
        self.calls
            .handle("GetAuthorization", request, admit, run)
            .await
    }

    type WatchCredentialEventsStream = EventStream;

    async fn watch_credential_events(
        &self,
        request: Request<pb::WatchCredentialEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let admit =
            |principal, request: pb::WatchCredentialEventsRequest, entry: &mut AuditEntry| {
                entry.requested_tenant(&request.tenant);
                let (caller, watch) = events::admit(request, &principal)?;
                entry.authorized(&caller);
                Ok(watch)
            };
        let run = |watch: Watch| async move {
            let permit = self.watching.enter()?;
            let events = self.broker.watch(watch.filter, watch.start).await?;
            Ok(self.watching.pump(events, permit))
        };
        self.calls
            .handle("WatchCredentialEvents", request, admit, run)
            .await
    }
}

/// Whether `principal` may run consent flows for `tenant`.
fn may_authorize(principal: &Principal) -> impl Fn(&str) -> bool + Sync + '_ {
    move |tenant| principal.authorize(tenant, Action::Authorize).is_ok()
}

fn timestamp(at: std::time::SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(at))
}

fn authorization(state: String, view: AuthorizationView) -> pb::Authorization {
    pb::Authorization {
        state,
        status: match view.status {
            FlowStatus::Pending => pb::AuthorizationStatus::Pending,
            FlowStatus::Completed => pb::AuthorizationStatus::Completed,
            FlowStatus::Denied => pb::AuthorizationStatus::Denied,
            FlowStatus::Expired => pb::AuthorizationStatus::Expired,
            FlowStatus::Failed => pb::AuthorizationStatus::Failed,
        } as i32,
        credential: Some(convert::credential_ref(view.id)),
        generation: view.generation,
        error: view.error,
        expires_at: timestamp(view.expires_at),
    }
}

fn token_response(token: model::AccessToken) -> pb::GetAccessTokenResponse {
    pb::GetAccessTokenResponse {
        // The one place a token leaves the vault: into the response body.
        access_token: token.token.into_exposed(),
        token_type: token.token_type,
        expires_at: Some(prost_types::Timestamp::from(token.expires_at)),
        scopes: token.scopes,
    }
}
