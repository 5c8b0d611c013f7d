//! `credvault.v1.VaultAdmin`: credential metadata, key status, keyring reload
//! and rewrap. Every call needs the `admin` action; listings are scoped to the
//! caller's tenants and key operations need a grant for all tenants.

use std::{sync::Arc, time::Instant};

use base64::Engine;
use tonic::{Request, Response, Status};

use super::{
    pb::{self, vault_admin_server::VaultAdmin},
    status::{ApiError, FieldViolation},
    vault::{finish, Audited, Gate},
};
use crate::{
    auth::Action,
    broker::{
        inspect::{CredentialInfo, InfoStatus},
        keys::{KeyAdminError, KeyManager, KeyStatus, RewrapState, RewrapStatus},
        model::CredentialId,
        Broker, BrokerError,
    },
    crypto::KeyState,
    store::backup,
};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The VaultAdmin service.
pub struct AdminService {
    broker: Arc<Broker>,
    keys: Arc<KeyManager>,
    gate: Arc<Gate>,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>, keys: Arc<KeyManager>, gate: Arc<Gate>) -> Self {
        Self { broker, keys, gate }
    }
}

impl AdminService {
    /// A key-management call: it affects every tenant, so it needs the admin
    /// action for all tenants; then `work`, then the usual bookkeeping.
    async fn key_operation<R, T, F>(
        &self,
        method: &'static str,
        request: Request<R>,
        work: impl FnOnce(R) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<T, ApiError>>,
    {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            let principal = self.gate.principal(&request)?;
            caller = Some(Audited::new(
                principal.authorize_global(Action::Admin)?,
                None,
            ));
            work(request.into_inner()).await
        }
        .await;
        finish(
            self.broker.metrics(),
            method,
            caller.as_ref(),
            started,
            result,
        )
    }
}

impl From<KeyAdminError> for ApiError {
    fn from(error: KeyAdminError) -> Self {
        match error {
            KeyAdminError::Rejected(reason) => ApiError::KeyringRejected(reason),
            KeyAdminError::Broker(error) => ApiError::Broker(error),
        }
    }
}

#[tonic::async_trait]
impl VaultAdmin for AdminService {
    type BackupStream = tokio_stream::wrappers::ReceiverStream<Result<pb::BackupChunk, Status>>;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            caller = Some(Audited::new(
                self.gate
                    .principal(&request)?
                    .authorize_global(Action::Admin)?,
                None,
            ));
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let store = self.broker.store();
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
                let mut sink = chunks;
                let outcome = backup::export(store.as_ref(), &mut sink).await;
                drop(sink);
                let _ = forward.await;
                match outcome {
                    Ok(records) => tracing::info!(records, "backup streamed"),
                    Err(error) => {
                        tracing::error!(%error, "backup failed");
                        let _ = tx
                            .send(Err(Status::from(ApiError::Broker(BrokerError::Storage(
                                error.to_string(),
                            )))))
                            .await;
                    }
                }
            });
            Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
        }
        .await;
        finish(
            self.broker.metrics(),
            "Backup",
            caller.as_ref(),
            started,
            result,
        )
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            let principal = self.gate.principal(&request)?;
            let request = request.into_inner();
            let page_size = match request.page_size as usize {
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
            let who = principal.authorize(&request.tenant, Action::Admin)?;
            let tenant = who.tenant.clone();
            caller = Some(Audited::new(who, None));
            // One extra tells us whether another page exists.
            let mut page = self.broker.list(&tenant, after, page_size + 1).await?;
            let next_page_token = if page.len() > page_size {
                page.truncate(page_size);
                page.last()
                    .map(|last| encode_page_token(&last.id))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListCredentialsResponse {
                credentials: page.into_iter().map(metadata).collect(),
                next_page_token,
            })
        }
        .await;
        finish(
            self.broker.metrics(),
            "ListCredentials",
            caller.as_ref(),
            started,
            result,
        )
    }

    async fn describe_credential(
        &self,
        request: Request<pb::DescribeCredentialRequest>,
    ) -> Result<Response<pb::CredentialMetadata>, Status> {
        let started = Instant::now();
        let mut caller = None;
        let result = async {
            let principal = self.gate.principal(&request)?;
            let reference = request.into_inner().credential.unwrap_or_default();
            if reference.subject.is_empty() || reference.provider.is_empty() {
                return Err(ApiError::InvalidFields(vec![FieldViolation::new(
                    "credential",
                    "subject and provider are required",
                )]));
            }
            let who = principal.authorize(&reference.tenant, Action::Admin)?;
            let id = CredentialId {
                tenant: who.tenant.clone(),
                subject: reference.subject,
                provider: reference.provider,
            };
            caller = Some(Audited::new(who, Some(&id)));
            Ok(metadata(self.broker.describe(&id).await?))
        }
        .await;
        finish(
            self.broker.metrics(),
            "DescribeCredential",
            caller.as_ref(),
            started,
            result,
        )
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        self.key_operation("GetKeyStatus", request, |_| async {
            Ok(key_status(self.keys.status().await?))
        })
        .await
    }

    async fn reload_keyring(
        &self,
        request: Request<pb::ReloadKeyringRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        self.key_operation("ReloadKeyring", request, |_| async {
            Ok(key_status(self.keys.reload().await?))
        })
        .await
    }

    async fn start_rewrap(
        &self,
        request: Request<pb::StartRewrapRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        self.key_operation("StartRewrap", request, |r| async move {
            Ok(rewrap_status(
                self.keys.start_rewrap(Some(r.records_per_second)),
            ))
        })
        .await
    }

    async fn get_rewrap_status(
        &self,
        request: Request<pb::GetRewrapStatusRequest>,
    ) -> Result<Response<pb::RewrapStatus>, Status> {
        self.key_operation("GetRewrapStatus", request, |_| async {
            Ok(rewrap_status(self.keys.rewrap_status()))
        })
        .await
    }
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
        credential: Some(pb::CredentialRef {
            tenant: info.id.tenant,
            subject: info.id.subject,
            provider: info.id.provider,
        }),
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
