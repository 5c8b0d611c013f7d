//! What operators may see of credentials: metadata only, never a secret.

use std::time::SystemTime;

use super::{
    model::{CredentialId, CredentialState, ReauthCause},
    record, Broker, BrokerError,
};
use crate::{
    crypto,
    store::{StoreKey, Versioned},
};

/// The shape of a stored credential, without its secrets.
#[derive(Clone, Debug)]
pub struct CredentialInfo {
    pub id: CredentialId,
    pub status: InfoStatus,
    pub generation: u64,
    /// `None` when even the envelope header is unreadable.
    pub key_version: Option<u32>,
    pub access_token_expires_at: Option<SystemTime>,
    pub last_refresh_at: Option<SystemTime>,
    pub created_at: Option<SystemTime>,
    pub updated_at: Option<SystemTime>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub has_refresh_token: bool,
    pub token_endpoint_host: String,
    pub preset: Option<String>,
    /// Transient refresh failures in a row (this replica's count).
    pub refresh_failures: u32,
    /// Refreshes are paused until then.
    pub refresh_backoff_until: Option<SystemTime>,
    /// Since when refreshes have failed transiently (durable, all replicas).
    pub failing_since: Option<SystemTime>,
    /// The last event logged about the credential.
    pub last_event: Option<(super::events::EventType, SystemTime)>,
}

/// Whether a credential can be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoStatus {
    Active,
    ReauthRequired(ReauthCause),
    /// Cannot be opened; the reason is the broker error's text.
    Unreadable(String),
}

impl Broker {
    /// One credential's metadata.
    pub async fn describe(&self, id: &CredentialId) -> Result<CredentialInfo, BrokerError> {
        let versioned = self
            .store
            .get(&id.store_key())
            .await?
            .ok_or(BrokerError::NotFound)?;
        Ok(self.info(id.clone(), &versioned))
    }

    /// Up to `limit` credentials of `tenant` after `after` (a subject and
    /// provider pair from a previous page), in key order.
    pub async fn list(
        &self,
        tenant: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<CredentialInfo>, BrokerError> {
        let prefix = StoreKey::tenant_prefix(tenant);
        let after = after.map(|(subject, provider)| StoreKey::new(tenant, &subject, &provider));
        let page = self.store.scan(&prefix, after.as_ref(), limit).await?;
        Ok(page
            .into_iter()
            .filter_map(|(key, versioned)| {
                let (tenant, subject, provider) = key.parts()?;
                let id = CredentialId {
                    tenant,
                    subject,
                    provider,
                };
                Some(self.info(id, &versioned))
            })
            .collect())
    }

    fn info(&self, id: CredentialId, versioned: &Versioned) -> CredentialInfo {
        let streak = self.limits.streak(&id);
        let mut info = self.record_info(id, versioned);
        info.refresh_failures = streak.map_or(0, |s| s.failures);
        info.refresh_backoff_until = streak.and_then(|s| s.cooling_until);
        info
    }

    fn record_info(&self, id: CredentialId, versioned: &Versioned) -> CredentialInfo {
        let framed = record::unframe(&versioned.value);
        let generation = framed.map_or(0, |(generation, _)| generation);
        let key_version = framed
            .and_then(|(_, envelope)| crypto::key_version_of(envelope).ok())
            .map(|v| v.get());
        match self.open(&id, versioned) {
            Ok(record) => CredentialInfo {
                status: match record.state {
                    CredentialState::Active => InfoStatus::Active,
                    CredentialState::ReauthRequired(cause) => InfoStatus::ReauthRequired(cause),
                },
                generation: record.generation,
                key_version,
                access_token_expires_at: record.access_token.as_ref().map(|t| t.expires_at),
                last_refresh_at: record.last_refresh_at,
                created_at: Some(record.created_at),
                updated_at: Some(record.updated_at),
                has_refresh_token: record.refresh_token.is_some(),
                token_endpoint_host: record
                    .client
                    .token_endpoint
                    .host_str()
                    .unwrap_or_default()
                    .to_owned(),
                preset: record.preset.clone(),
                labels: record.labels,
                id,
                refresh_failures: 0,
                refresh_backoff_until: None,
                failing_since: record.failing_since,
                last_event: record.last_event,
            },
            Err(error) => CredentialInfo {
                id,
                status: match error {
                    BrokerError::ReauthRequired { cause, .. } => InfoStatus::ReauthRequired(cause),
                    other => InfoStatus::Unreadable(other.to_string()),
                },
                generation,
                key_version,
                access_token_expires_at: None,
                last_refresh_at: None,
                created_at: None,
                updated_at: None,
                labels: Default::default(),
                has_refresh_token: false,
                token_endpoint_host: String::new(),
                preset: None,
                refresh_failures: 0,
                refresh_backoff_until: None,
                failing_since: None,
                last_event: None,
            },
        }
    }
}
