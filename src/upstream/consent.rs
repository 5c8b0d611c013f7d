//! The provider side of the consent flows the vault runs (DESIGN §5f): the
//! authorization URL (RFC 6749 §4.1.1, with RFC 7636 S256 and RFC 8707
//! resource indicators), the device authorization request (RFC 8628 §3.1)
//! and one poll of its token request (§3.4). The state, the verifier and
//! the polling schedule are the broker's; this module only speaks HTTP.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use url::Url;

use super::{ClientConfig, IssuedTokens, Upstream, UpstreamError};
use crate::secret::SecretString;

/// Parameters the vault sets itself; a caller's extra parameters may not
/// name them.
pub const RESERVED_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
];

/// The default polling interval when a device authorization names none
/// (RFC 8628 §3.2).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Bounds on what a provider may say about a device authorization.
const MAX_INTERVAL: Duration = Duration::from_secs(60);
const MAX_DEVICE_LIFETIME: Duration = Duration::from_secs(3600);

/// What goes into an authorization URL.
pub struct AuthorizationRequest<'a> {
    pub redirect_uri: &'a Url,
    pub state: &'a SecretString,
    /// BASE64URL(SHA256(verifier)).
    pub code_challenge: &'a str,
    pub scopes: &'a [String],
    pub resources: &'a [String],
    pub extra: &'a BTreeMap<String, String>,
}

/// A started device authorization.
pub struct DeviceStart {
    pub device_code: SecretString,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// What one poll of a device authorization came to.
pub enum DevicePoll {
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again, 5 s less often (RFC 8628 §3.5).
    SlowDown,
    /// `access_denied`: the user said no.
    Denied,
    /// `expired_token`: too late.
    Expired,
    Issued(IssuedTokens),
}

#[derive(Deserialize)]
struct DeviceAuthorizationResponse {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    expires_in: u64,
    #[serde(default)]
    interval: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl Upstream {
    /// The URL to send the user's browser to. The endpoint passes the
    /// policy like any other, although only the browser calls it.
    pub fn authorization_url(
        &self,
        client: &ClientConfig,
        request: &AuthorizationRequest<'_>,
    ) -> Result<Url, UpstreamError> {
        let mut url = client
            .flows
            .authorization
            .clone()
            .ok_or_else(|| missing("authorization_endpoint"))?;
        self.policy.check(&url)?;
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &client.client_id)
                .append_pair("redirect_uri", request.redirect_uri.as_str())
                .append_pair("state", request.state.expose())
                .append_pair("code_challenge", request.code_challenge)
                .append_pair("code_challenge_method", "S256");
            if !request.scopes.is_empty() {
                query.append_pair("scope", &request.scopes.join(" "));
            }
            for resource in request.resources {
                query.append_pair("resource", resource);
            }
            for (name, value) in request.extra {
                query.append_pair(name, value);
            }
        }
        Ok(url)
    }

    /// Starts a device authorization (RFC 8628 §3.1).
    pub async fn start_device(
        &self,
        client: &ClientConfig,
        scopes: &[String],
        resources: &[String],
    ) -> Result<DeviceStart, UpstreamError> {
        let endpoint = client
            .flows
            .device_authorization
            .clone()
            .ok_or_else(|| missing("device_authorization_endpoint"))?;
        self.policy.check_resolved(&endpoint).await?;
        let mut params = Vec::new();
        if !scopes.is_empty() {
            params.push(("scope", scopes.join(" ")));
        }
        for resource in resources {
            params.push(("resource", resource.clone()));
        }
        let (status, body) = self.post_form(&endpoint, client, &params).await?;
        if status != 200 {
            return Err(rejected(&body, status));
        }
        let response: DeviceAuthorizationResponse =
            serde_json::from_slice(&body).map_err(|_| UpstreamError::Unavailable {
                reason: "the device authorization response is not what RFC 8628 describes".into(),
                retry_after: None,
            })?;
        let interval = response
            .interval
            .map_or(DEFAULT_INTERVAL, Duration::from_secs)
            .clamp(Duration::from_secs(1), MAX_INTERVAL);
        Ok(DeviceStart {
            device_code: SecretString::from(response.device_code),
            verification_uri_complete: response.verification_uri_complete.unwrap_or_default(),
            user_code: response.user_code,
            verification_uri: response.verification_uri,
            expires_in: Duration::from_secs(response.expires_in).min(MAX_DEVICE_LIFETIME),
            interval,
        })
    }

    /// One device access token request (RFC 8628 §3.4).
    pub async fn poll_device(
        &self,
        client: &ClientConfig,
        device_code: &SecretString,
    ) -> Result<DevicePoll, UpstreamError> {
        self.policy.check(&client.token_endpoint)?;
        let params = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:device_code".to_owned(),
            ),
            ("device_code", device_code.expose().to_owned()),
        ];
        let (status, body) = self
            .post_form(&client.token_endpoint, client, &params)
            .await?;
        if status == 200 {
            let response: oauth2::basic::BasicTokenResponse = serde_json::from_slice(&body)
                .map_err(|_| UpstreamError::Unavailable {
                    reason: "the token response is not what RFC 6749 describes".into(),
                    retry_after: None,
                })?;
            return Ok(DevicePoll::Issued(self.issued(response, &client.scopes)));
        }
        let error = serde_json::from_slice::<ErrorBody>(&body).map(|b| b.error);
        Ok(match error.as_deref() {
            Ok("authorization_pending") => DevicePoll::Pending,
            Ok("slow_down") => DevicePoll::SlowDown,
            Ok("access_denied") => DevicePoll::Denied,
            Ok("expired_token") => DevicePoll::Expired,
            _ => return Err(rejected(&body, status)),
        })
    }
}

fn missing(field: &'static str) -> UpstreamError {
    UpstreamError::ClientRejected {
        oauth_error: format!("missing_{field}"),
    }
}

/// A non-200 answer: the provider's RFC 6749 error code when it sent one.
fn rejected(body: &[u8], status: u16) -> UpstreamError {
    let code = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| super::sanitize_code(&b.error))
        .unwrap_or_else(|_| format!("http_{status}"));
    UpstreamError::ClientRejected { oauth_error: code }
}
