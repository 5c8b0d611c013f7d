//! The plaintext layout of a sealed credential record.
//!
//! A record is encoded with protobuf (prost) so fields can be added without a
//! migration, then sealed by `crypto::envelope`. The encoded bytes hold
//! secrets: they live in `Zeroizing` buffers and the intermediate message is
//! wiped on drop.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prost::Message;
use zeroize::{Zeroize, Zeroizing};

use super::events::EventType;
use super::model::{
    AccessToken, ClientAuth, ClientConfig, CredentialRecord, CredentialState, ReauthCause,
};
use crate::{secret::SecretString, upstream::parse_url};

/// Why a decrypted record could not be decoded. Carries no record bytes.
#[derive(Debug, thiserror::Error)]
pub enum RecordDecodeError {
    #[error("record payload is not valid protobuf")]
    Protobuf,
    #[error("record payload field `{0}` is invalid")]
    Field(&'static str),
}

#[derive(Clone, PartialEq, Message)]
struct RecordPayload {
    #[prost(uint64, tag = "1")]
    generation: u64,
    /// Empty when active; otherwise the reauth cause.
    #[prost(string, tag = "2")]
    reauth_cause: String,
    #[prost(message, optional, tag = "3")]
    client: Option<ClientPayload>,
    #[prost(string, optional, tag = "4")]
    refresh_token: Option<String>,
    #[prost(message, optional, tag = "5")]
    access_token: Option<AccessTokenPayload>,
    #[prost(btree_map = "string, string", tag = "6")]
    labels: BTreeMap<String, String>,
    #[prost(int64, tag = "7")]
    created_at_ms: i64,
    #[prost(int64, tag = "8")]
    updated_at_ms: i64,
    #[prost(int64, optional, tag = "9")]
    last_refresh_at_ms: Option<i64>,
    #[prost(bool, tag = "10")]
    client_credentials: bool,
    #[prost(string, optional, tag = "11")]
    preset: Option<String>,
    #[prost(int64, optional, tag = "12")]
    failing_since_ms: Option<i64>,
    #[prost(bool, tag = "13")]
    failing_reported: bool,
    /// The last event's type name; empty when none.
    #[prost(string, tag = "14")]
    last_event: String,
    #[prost(int64, tag = "15")]
    last_event_at_ms: i64,
}

#[derive(Clone, PartialEq, Message)]
struct ClientPayload {
    #[prost(string, tag = "1")]
    token_endpoint: String,
    #[prost(string, tag = "2")]
    client_id: String,
    #[prost(string, optional, tag = "3")]
    client_secret: Option<String>,
    /// 1 = basic, 2 = post, 3 = none (the proto enum's numbers).
    #[prost(uint32, tag = "4")]
    auth: u32,
    #[prost(string, optional, tag = "5")]
    revocation_endpoint: Option<String>,
    #[prost(string, repeated, tag = "6")]
    scopes: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct AccessTokenPayload {
    #[prost(string, tag = "1")]
    token: String,
    #[prost(string, tag = "2")]
    token_type: String,
    #[prost(int64, tag = "3")]
    expires_at_ms: i64,
    #[prost(string, repeated, tag = "4")]
    scopes: Vec<String>,
}

impl Drop for RecordPayload {
    fn drop(&mut self) {
        if let Some(token) = self.refresh_token.as_mut() {
            token.zeroize();
        }
    }
}

impl Drop for ClientPayload {
    fn drop(&mut self) {
        if let Some(secret) = self.client_secret.as_mut() {
            secret.zeroize();
        }
    }
}

impl Drop for AccessTokenPayload {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

/// Encodes a record for sealing.
pub fn encode(record: &CredentialRecord) -> Zeroizing<Vec<u8>> {
    let payload = RecordPayload {
        generation: record.generation,
        reauth_cause: match record.state {
            CredentialState::Active => String::new(),
            CredentialState::ReauthRequired(cause) => cause.as_str().to_owned(),
        },
        client: Some(ClientPayload {
            token_endpoint: record.client.token_endpoint.as_str().to_owned(),
            client_id: record.client.client_id.clone(),
            client_secret: record
                .client
                .client_secret
                .as_ref()
                .map(|s| s.expose().to_owned()),
            auth: client_auth_code(record.client.auth),
            revocation_endpoint: record
                .client
                .revocation_endpoint
                .as_ref()
                .map(|url| url.as_str().to_owned()),
            scopes: record.client.scopes.clone(),
        }),
        refresh_token: record.refresh_token.as_ref().map(|t| t.expose().to_owned()),
        access_token: record.access_token.as_ref().map(|t| AccessTokenPayload {
            token: t.token.expose().to_owned(),
            token_type: t.token_type.clone(),
            expires_at_ms: to_millis(t.expires_at),
            scopes: t.scopes.clone(),
        }),
        labels: record.labels.clone(),
        created_at_ms: to_millis(record.created_at),
        updated_at_ms: to_millis(record.updated_at),
        last_refresh_at_ms: record.last_refresh_at.map(to_millis),
        client_credentials: record.client_credentials,
        preset: record.preset.clone(),
        failing_since_ms: record.failing_since.map(to_millis),
        failing_reported: record.failing_reported,
        last_event: record
            .last_event
            .map(|(kind, _)| kind.as_str().to_owned())
            .unwrap_or_default(),
        last_event_at_ms: record.last_event.map_or(0, |(_, at)| to_millis(at)),
    };
    Zeroizing::new(payload.encode_to_vec())
}

/// The stored code of a client authentication method. Records and pending
/// authorizations both store it, so both go through this one table: a code,
/// once written, means the same method forever.
pub(super) fn client_auth_code(auth: ClientAuth) -> u32 {
    match auth {
        ClientAuth::SecretBasic => 1,
        ClientAuth::SecretPost => 2,
        ClientAuth::None => 3,
        ClientAuth::PrivateKeyJwt => 4,
    }
}

/// The method a stored code names; `None` for a code this build never wrote,
/// which the caller reports as an unreadable field rather than guess (a
/// guess of "no client authentication" would send the provider less than
/// it asked for).
pub(super) fn client_auth_from_code(code: u32) -> Option<ClientAuth> {
    match code {
        1 => Some(ClientAuth::SecretBasic),
        2 => Some(ClientAuth::SecretPost),
        3 => Some(ClientAuth::None),
        4 => Some(ClientAuth::PrivateKeyJwt),
        _ => None,
    }
}

/// Decodes an opened record.
pub fn decode(bytes: &[u8]) -> Result<CredentialRecord, RecordDecodeError> {
    let mut payload = RecordPayload::decode(bytes).map_err(|_| RecordDecodeError::Protobuf)?;
    let state = match payload.reauth_cause.as_str() {
        "" => CredentialState::Active,
        cause => CredentialState::ReauthRequired(
            ReauthCause::parse(cause).ok_or(RecordDecodeError::Field("reauth_cause"))?,
        ),
    };
    let mut client = payload
        .client
        .take()
        .ok_or(RecordDecodeError::Field("client"))?;
    let client = ClientConfig {
        token_endpoint: parse_url(&client.token_endpoint)
            .map_err(|_| RecordDecodeError::Field("client.token_endpoint"))?,
        client_id: std::mem::take(&mut client.client_id),
        client_secret: client.client_secret.take().map(SecretString::from),
        // A private-key-JWT client's key lives in its preset, which a
        // refresh uses.
        auth: client_auth_from_code(client.auth).ok_or(RecordDecodeError::Field("client.auth"))?,
        revocation_endpoint: client
            .revocation_endpoint
            .as_deref()
            .map(parse_url)
            .transpose()
            .map_err(|_| RecordDecodeError::Field("client.revocation_endpoint"))?,
        scopes: std::mem::take(&mut client.scopes),
        flows: Default::default(),
        assertion_key: None,
    };
    let access_token = payload.access_token.take().map(|mut t| AccessToken {
        token: SecretString::from(std::mem::take(&mut t.token)),
        token_type: std::mem::take(&mut t.token_type),
        expires_at: from_millis(t.expires_at_ms),
        scopes: std::mem::take(&mut t.scopes),
    });
    Ok(CredentialRecord {
        generation: payload.generation,
        state,
        client,
        refresh_token: payload.refresh_token.take().map(SecretString::from),
        access_token,
        client_credentials: payload.client_credentials,
        preset: payload.preset.take(),
        labels: std::mem::take(&mut payload.labels),
        created_at: from_millis(payload.created_at_ms),
        updated_at: from_millis(payload.updated_at_ms),
        last_refresh_at: payload.last_refresh_at_ms.map(from_millis),
        failing_since: payload.failing_since_ms.map(from_millis),
        failing_reported: payload.failing_reported,
        // A type this build does not know (a newer writer) is not an error:
        // it only drops from the admin view.
        last_event: EventType::parse(&payload.last_event)
            .map(|kind| (kind, from_millis(payload.last_event_at_ms))),
    })
}

fn to_millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The stored value: `generation (u64 BE) || envelope`.
///
/// The generation is also inside the sealed payload (authenticated); this
/// clear copy exists so a Deposit can bump the generation of a record that can
/// no longer be opened, and so operators can count without decrypting. A clear
/// copy that disagrees with the sealed one marks the record corrupt.
pub fn frame(generation: u64, envelope: Vec<u8>) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + envelope.len());
    value.extend_from_slice(&generation.to_be_bytes());
    value.extend_from_slice(&envelope);
    value
}

/// Splits a stored value into its clear generation and its envelope.
pub fn unframe(value: &[u8]) -> Option<(u64, &[u8])> {
    let (generation, envelope) = value.split_at_checked(8)?;
    let generation = u64::from_be_bytes(generation.try_into().ok()?);
    Some((generation, envelope))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CredentialRecord {
        let now = from_millis(to_millis(SystemTime::now()));
        CredentialRecord {
            generation: 7,
            state: CredentialState::ReauthRequired(ReauthCause::InvalidGrant),
            client: ClientConfig {
                token_endpoint: url::Url::parse("https://idp.example/token").unwrap(),
                client_id: "client".into(),
                client_secret: Some("s3cret".into()),
                auth: ClientAuth::SecretPost,
                revocation_endpoint: None,
                scopes: vec!["read".into()],
                flows: Default::default(),
                assertion_key: None,
            },
            refresh_token: Some("rt-1".into()),
            access_token: Some(AccessToken {
                token: "at-1".into(),
                token_type: "Bearer".into(),
                expires_at: now,
                scopes: vec!["read".into()],
            }),
            client_credentials: false,
            preset: None,
            labels: [("team".to_string(), "core".to_string())].into(),
            created_at: now,
            updated_at: now,
            last_refresh_at: None,
            failing_since: None,
            failing_reported: false,
            last_event: Some((EventType::Deposited, now)),
        }
    }

    #[test]
    fn round_trips() {
        let record = sample();
        let decoded = decode(&encode(&record)).unwrap();
        assert_eq!(decoded.generation, 7);
        assert_eq!(decoded.state, record.state);
        assert_eq!(decoded.refresh_token.unwrap().expose(), "rt-1");
        assert_eq!(decoded.client.client_secret.unwrap().expose(), "s3cret");
        assert_eq!(decoded.client.auth, ClientAuth::SecretPost);
        let at = decoded.access_token.unwrap();
        assert_eq!(at.token.expose(), "at-1");
        assert_eq!(at.expires_at, record.access_token.unwrap().expires_at);
        assert_eq!(decoded.labels, record.labels);
        assert_eq!(decoded.last_event, record.last_event);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b"\xff\xff\xff"[..], b"", b"\x1a\x05abc"] {
            assert!(decode(bytes).is_err());
        }
    }

    #[test]
    fn every_client_auth_code_reads_back_and_unknown_codes_are_refused() {
        let all = [
            ClientAuth::SecretBasic,
            ClientAuth::SecretPost,
            ClientAuth::None,
            ClientAuth::PrivateKeyJwt,
        ];
        for auth in all {
            assert_eq!(client_auth_from_code(client_auth_code(auth)), Some(auth));
        }
        // The codes are on disk: they never change meaning.
        let codes: Vec<u32> = all.into_iter().map(client_auth_code).collect();
        assert_eq!(codes, [1, 2, 3, 4]);
        for unknown in [0, 5, u32::MAX] {
            assert_eq!(client_auth_from_code(unknown), None);
        }

        let mut record = sample();
        record.client.auth = ClientAuth::PrivateKeyJwt;
        let mut payload = RecordPayload::decode(&encode(&record)[..]).unwrap();
        payload.client.as_mut().unwrap().auth = 9;
        assert!(matches!(
            decode(&payload.encode_to_vec()),
            Err(RecordDecodeError::Field("client.auth"))
        ));
    }
}
