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
use crate::broker::{
    model::{self, UpstreamRevocation},
    Broker,
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

fn token_response(token: model::AccessToken) -> pb::GetAccessTokenResponse {
    pb::GetAccessTokenResponse {
        // The one place a token leaves the vault: into the response body.
        access_token: token.token.expose().to_owned(),
        token_type: token.token_type,
        expires_at: Some(prost_types::Timestamp::from(token.expires_at)),
        scopes: token.scopes,
    }
}
