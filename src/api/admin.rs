//! `credvault.v1.VaultAdmin`: credential metadata, key status, keyring
//! reload, rewrap and backups. Every call needs the `admin` action;
//! listings are scoped to the caller's tenants, and key operations and
//! backups need a grant for all tenants.

use std::sync::Arc;

use base64::Engine;
use tonic::{Request, Response, Status};

use super::{
    call::{AuditEntry, Calls},
    pb::{self, vault_admin_server::VaultAdmin},
    status::{ApiError, FieldViolation},
};
use crate::{
    auth::{Action, Authenticator, Principal},
    broker::{
        inspect::{CredentialInfo, InfoStatus},
        model::CredentialId,
        rotation::{KeyAdminError, KeyRotation, KeyState, KeyStatus, RewrapState, RewrapStatus},
        Broker,
    },
};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The VaultAdmin service.
pub struct AdminService {
    broker: Arc<Broker>,
    rotation: Arc<KeyRotation>,
    auth: Arc<Authenticator>,
    calls: Calls,
}

impl AdminService {
    pub fn new(
        broker: Arc<Broker>,
        rotation: Arc<KeyRotation>,
        auth: Arc<Authenticator>,
        calls: Calls,
    ) -> Self {
        Self {
            broker,
            rotation,
            auth,
            calls,
        }
    }
}

/// Admits a call that affects every tenant (key management, backups): it
/// needs the admin action for all tenants.
fn admit_global<R>(
    principal: Principal,
    request: R,
    entry: &mut AuditEntry,
) -> Result<R, ApiError> {
    entry.requested_tenant("*");
    let caller = principal.authorize_global(Action::Admin)?;
    entry.authorized(&caller);
    Ok(request)
}

impl From<KeyAdminError> for ApiError {
    fn from(error: KeyAdminError) -> Self {
        match error {
            KeyAdminError::Rejected(reason) => ApiError::KeyringRejected(reason),
            KeyAdminError::Broker(error) => ApiError::Broker(error),
        }
    }
}

/// A page request, validated.
struct ListPage {
    tenant: String,
    after: Option<(String, String)>,
    size: usize,
}

fn admit_list(
    principal: Principal,
    request: pb::ListCredentialsRequest,
    entry: &mut AuditEntry,
) -> Result<ListPage, ApiError> {
    entry.requested_tenant(&request.tenant);
    let size = match request.page_size as usize {
        0 => DEFAULT_PAGE,
        n if n <= MAX_PAGE => n,
        _ => {
            return Err(ApiError::InvalidFields(vec![FieldViolation::new(
                "page_size",
                format!("at most {MAX_PAGE}"),
            )]))
        }
    };
    let after = match request.page_token.as_str() {
        "" => None,
        token => Some(decode_page_token(token).ok_or_else(|| {
            ApiError::InvalidFields(vec![FieldViolation::new(
                "page_token",
                "not a token from a previous page",
            )])
        })?),
    };
    let caller = principal.authorize(&request.tenant, Action::Admin)?;
    entry.authorized(&caller);
    let tenant = caller.tenant.clone();
    Ok(ListPage {
        tenant,
        after,
        size,
    })
}

fn admit_describe(
    principal: Principal,
    request: pb::DescribeCredentialRequest,
    entry: &mut AuditEntry,
) -> Result<CredentialId, ApiError> {
    entry.requested(request.credential.as_ref());
    let reference = request.credential.unwrap_or_default();
    if reference.subject.is_empty() || reference.provider.is_empty() {
        return Err(ApiError::InvalidFields(vec![FieldViolation::new(
            "credential",
            "subject and provider are required",
        )]));
    }
    let caller = principal.authorize(&reference.tenant, Action::Admin)?;
    let id = CredentialId {
        tenant: caller.tenant.clone(),
        subject: reference.subject,
        provider: reference.provider,
    };
    entry.authorized(&caller);
    Ok(id)
}

type BackupStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BackupChunk, Status>>;

#[tonic::async_trait]
impl VaultAdmin for AdminService {
    type BackupStream = BackupStream;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let run = |_| async {
            let broker = Arc::clone(&self.broker);
            Ok(stream_backup(broker))
        };
        self.calls
            .handle("Backup", request, admit_global, run)
            .await
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let run = |page: ListPage| async move {
            // One extra tells us whether another page exists.
            let mut credentials = self
                .broker
                .list(&page.tenant, page.after, page.size + 1)
                .await?;
            let mut next_page_token = String::new();
            if credentials.len() > page.size {
                credentials.truncate(page.size);
                if let Some(last) = credentials.last() {
                    next_page_token = encode_page_token(&last.id);
                }
            }
            Ok(pb::ListCredentialsResponse {
                credentials: credentials.into_iter().map(metadata).collect(),
                next_page_token,
            })
        };
        self.calls
            .handle("ListCredentials", request, admit_list, run)
            .await
    }

    async fn describe_credential(
        &self,
        request: Request<pb::DescribeCredentialRequest>,
    ) -> Result<Response<pb::CredentialMetadata>, Status> {
        let run = |id: CredentialId| async move { Ok(metadata(self.broker.describe(&id).await?)) };
        self.calls
            .handle("DescribeCredential", request, admit_describe, run)
            .await
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let run = |_| async { Ok(key_status(self.rotation.status().await?)) };
        self.calls
            .handle("GetKeyStatus", request, admit_global, run)
            .await
    }

    async fn reload_keyring(
        &self,
        request: Request<pb::ReloadKeyringRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        let run = |_| async { Ok(key_status(self.rotation.reload().await?)) };
        self.calls
            .handle("ReloadKeyring", request, admit_global, run)
            .await
    }

    async fn start_rewrap(
        &self,
        request: Request<pb::StartRewrapRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        let run = |r: pb::StartRewrapRequest| async move {
            Ok(rewrap_status(
                self.rotation.start_rewrap(Some(r.records_per_second)),
            ))
        };
        self.calls
            .handle("StartRewrap", request, admit_global, run)
            .await
    }

    async fn reload_policy(
        &self,
        request: Request<pb::ReloadPolicyRequest>,
    ) -> Result<Response<pb::ReloadPolicyResponse>, Status> {
        let run = |_| async {
            let rules = self
                .auth
                .reload_policy()
                .await
                .map_err(|e| ApiError::PolicyRejected(e.to_string()))?;
            tracing::info!(rules, "policy reloaded");
            Ok(pb::ReloadPolicyResponse {
                rules: u32::try_from(rules).unwrap_or(u32::MAX),
            })
        };
        self.calls
            .handle("ReloadPolicy", request, admit_global, run)
            .await
    }

    async fn get_rewrap_status(
        &self,
        request: Request<pb::GetRewrapStatusRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        let run = |_| async { Ok(rewrap_status(self.rotation.rewrap_status())) };
        self.calls
            .handle("GetRewrapStatus", request, admit_global, run)
            .await
    }
}

/// Streams the broker's backup as gRPC chunks; a failure midway ends the
/// stream with a typed status, so a truncated file is never mistaken for a
/// whole one.
fn stream_backup(broker: Arc<Broker>) -> BackupStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let (chunks, mut chunk_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let forward = {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(data) = chunk_rx.recv().await {
                    if tx.send(Ok(pb::BackupChunk { data })).await.is_err() {
                        break;
                    }
                }
            })
        };
        let outcome = broker.backup(chunks).await;
        let _ = forward.await;
        match outcome {
            Ok(records) => tracing::info!(records, "backup streamed"),
            Err(error) => {
                tracing::error!(%error, "backup failed");
                let _ = tx.send(Err(Status::from(ApiError::Broker(error)))).await;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn encode_page_token(id: &CredentialId) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}\0{}", id.subject, id.provider))
}

fn decode_page_token(token: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (subject, provider) = text.split_once('\0')?;
    Some((subject.to_owned(), provider.to_owned()))
}

fn timestamp(t: Option<std::time::SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(prost_types::Timestamp::from)
}

fn metadata(info: CredentialInfo) -> pb::CredentialMetadata {
    let (state, reauth_cause, unreadable_reason) = match &info.status {
        InfoStatus::Active => (pb::CredentialState::Active, "", String::new()),
        InfoStatus::ReauthRequired(cause) => (
            pb::CredentialState::ReauthRequired,
            cause.as_str(),
            String::new(),
        ),
        InfoStatus::Unreadable(reason) => (pb::CredentialState::Unreadable, "", reason.clone()),
    };
    pb::CredentialMetadata {
        credential: Some(super::convert::credential_ref(info.id)),
        state: state as i32,
        reauth_cause: reauth_cause.to_owned(),
        generation: info.generation,
        key_version: info.key_version.unwrap_or(0),
        access_token_expires_at: timestamp(info.access_token_expires_at),
        last_refresh_at: timestamp(info.last_refresh_at),
        created_at: timestamp(info.created_at),
        updated_at: timestamp(info.updated_at),
        labels: info.labels.into_iter().collect(),
        has_refresh_token: info.has_refresh_token,
        token_endpoint_host: info.token_endpoint_host,
        preset: info.preset.unwrap_or_default(),
        unreadable_reason,
        refresh_failures: info.refresh_failures,
        refresh_backoff_until: timestamp(info.refresh_backoff_until),
        last_event: info
            .last_event
            .map(|(kind, _)| kind.as_str().to_owned())
            .unwrap_or_default(),
        last_event_at: timestamp(info.last_event.map(|(_, at)| at)),
        failing_since: timestamp(info.failing_since),
    }
}

fn key_status(status: KeyStatus) -> pb::GetKeyStatusResponse {
    pb::GetKeyStatusResponse {
        primary_version: status.primary,
        versions: status
            .versions
            .into_iter()
            .map(|(info, count)| pb::KeyVersionStatus {
                version: info.version.get(),
                state: match info.state {
                    KeyState::Active => pb::KeyState::Active,
                    KeyState::DecryptOnly => pb::KeyState::DecryptOnly,
                    KeyState::Retired => pb::KeyState::Retired,
                    KeyState::Destroyed => pb::KeyState::Destroyed,
                } as i32,
                fingerprint: info.fingerprint.map(|f| f.to_string()).unwrap_or_default(),
                created_at: Some(prost_types::Timestamp {
                    seconds: info.created_at_unix,
                    nanos: 0,
                }),
                primary: info.primary,
                record_count: count,
            })
            .collect(),
        records_under_unknown_versions: status.under_unknown_versions,
        unreadable_records: status.unreadable,
    }
}

fn rewrap_status(status: RewrapStatus) -> pb::RewrapStatus {
    pb::RewrapStatus {
        state: match status.state {
            RewrapState::Idle => pb::RewrapState::Idle,
            RewrapState::Running => pb::RewrapState::Running,
            RewrapState::Done => pb::RewrapState::Done,
            RewrapState::Failed => pb::RewrapState::Failed,
        } as i32,
        target_version: status.target_version,
        scanned: status.scanned,
        rewrapped: status.rewrapped,
        skipped: status.skipped,
        failed: status.failed,
        total: status.total,
        started_at: timestamp(status.started_at),
        finished_at: timestamp(status.finished_at),
        error: status.error.unwrap_or_default(),
    }
}
