//! The OAuth client side of the vault: refresh, code exchange and client
//! credentials against a provider's token endpoint, through the `oauth2` crate
//! over a hardened HTTP client, plus the endpoint policy.
//!
//! Every failure comes back classified as an [`UpstreamError`]: a dead grant,
//! a rejected client, or an unavailable provider. The broker decides what to
//! persist; this module only says what the provider meant.

mod assertion;
mod client;
mod consent;
mod discovery;
mod http;
mod policy;
mod token;

use std::time::{Duration, SystemTime};

use oauth2::{
    basic::{BasicClient, BasicErrorResponseType},
    AuthType, AuthorizationCode, ClientId, ClientSecret, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use url::Url;

pub use self::{
    assertion::AssertionKey,
    client::{
        check_scopes, parse_http_url, parse_url, ClientAuth, ClientConfig, ClientSpec,
        FlowEndpoints,
    },
    consent::{AuthorizationRequest, DevicePoll, RESERVED_PARAMS},
    http::HttpSettings,
    policy::{EndpointPolicy, EndpointRejected},
    token::{AccessToken, IssuedTokens},
};
use self::{
    http::{HttpClient, HttpError},
    policy::PolicyResolver,
};
use crate::secret::SecretString;

/// The longest lifetime believed of a token, whatever `expires_in` says: a
/// provider's number may be anything up to 2^64-1 seconds.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// What went wrong upstream, as the broker needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The grant is dead (`invalid_grant`, `invalid_scope`): re-consent.
    #[error("provider rejected the grant: {oauth_error}")]
    GrantRejected { oauth_error: String },
    /// The provider does not accept our client or request.
    #[error("provider rejected the client: {oauth_error}")]
    ClientRejected { oauth_error: String },
    /// Down, slow, overloaded or talking nonsense; try again later.
    #[error("provider unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("endpoint not allowed: {0}")]
    EndpointNotAllowed(#[from] EndpointRejected),
}

/// Settings of the OAuth client.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub http: HttpSettings,
    pub policy: EndpointPolicy,
    /// Lifetime assumed when a token response carries no `expires_in`.
    pub default_token_lifetime: Duration,
}

/// The OAuth client shared by every credential.
#[derive(Clone)]
pub struct Upstream {
    http: HttpClient,
    policy: EndpointPolicy,
    default_token_lifetime: Duration,
    discovery: std::sync::Arc<discovery::DiscoveryCache>,
}

type ConfiguredClient = BasicClient<
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: HttpClient::new(&settings.http, PolicyResolver::new(settings.policy.clone()))?,
            policy: settings.policy,
            default_token_lifetime: settings.default_token_lifetime,
            discovery: std::sync::Arc::default(),
        })
    }

    /// Checks a client's endpoints against the policy, DNS included.
    pub async fn check_client(&self, client: &ClientConfig) -> Result<(), UpstreamError> {
        self.policy.check_resolved(&client.token_endpoint).await?;
        if let Some(revocation) = &client.revocation_endpoint {
            self.policy.check_resolved(revocation).await?;
        }
        Ok(())
    }

    /// The refresh-token grant (RFC 6749 §6).
    pub async fn refresh(
        &self,
        client: &ClientConfig,
        refresh_token: &SecretString,
    ) -> Result<IssuedTokens, UpstreamError> {
        let oauth = self.oauth_client(client)?;
        let token = RefreshToken::new(refresh_token.expose().to_owned());
        let mut request = oauth
            .exchange_refresh_token(&token)
            .add_scopes(client.scopes.iter().cloned().map(Scope::new));
        for (name, value) in assertion_params(client)? {
            request = request.add_extra_param(name, value);
        }
        let response = request.request_async(&self.http).await.map_err(classify)?;
        Ok(self.issued(response, &client.scopes))
    }

    /// The authorization-code grant (RFC 6749 §4.1.3), with PKCE when given.
    pub async fn exchange_code(
        &self,
        client: &ClientConfig,
        code: &SecretString,
        redirect_uri: &Url,
        code_verifier: Option<&SecretString>,
        resources: &[String],
    ) -> Result<IssuedTokens, UpstreamError> {
        let oauth = self
            .oauth_client(client)?
            .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
        let mut request = oauth.exchange_code(AuthorizationCode::new(code.expose().to_owned()));
        // RFC 8707 §2.2: the token request names the resources again.
        for resource in resources {
            request = request.add_extra_param("resource", resource.clone());
        }
        for (name, value) in assertion_params(client)? {
            request = request.add_extra_param(name, value);
        }
        if let Some(verifier) = code_verifier {
            request =
                request.set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().to_owned()));
        }
        let response = request.request_async(&self.http).await.map_err(classify)?;
        Ok(self.issued(response, &client.scopes))
    }

    /// The client-credentials grant (RFC 6749 §4.4).
    pub async fn client_credentials(
        &self,
        client: &ClientConfig,
    ) -> Result<IssuedTokens, UpstreamError> {
        let oauth = self.oauth_client(client)?;
        let mut request = oauth
            .exchange_client_credentials()
            .add_scopes(client.scopes.iter().cloned().map(Scope::new));
        for (name, value) in assertion_params(client)? {
            request = request.add_extra_param(name, value);
        }
        let response = request.request_async(&self.http).await.map_err(classify)?;
        Ok(self.issued(response, &client.scopes))
    }

    /// Checks a notification endpoint against the policy, DNS included.
    pub async fn check_endpoint(&self, url: &Url) -> Result<(), UpstreamError> {
        Ok(self.policy.check_resolved(url).await?)
    }

    /// POSTs a notification (a webhook) through the same hardened client:
    /// the endpoint policy (DNS included), no redirects, no proxy. Answers
    /// the HTTP status; a transport failure is `Unavailable`.
    pub async fn notify(
        &self,
        url: &Url,
        headers: ::http::HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<u16, UpstreamError> {
        self.policy.check(url)?;
        self.http
            .post(url, headers, body, timeout)
            .await
            .map_err(|error| UpstreamError::Unavailable {
                reason: error.to_string(),
                retry_after: None,
            })
    }

    /// RFC 7009 revocation of a refresh token. Written by hand rather than
    /// through `oauth2`, whose revocation request insists on https even for
    /// the loopback endpoints the policy explicitly allows.
    pub async fn revoke(
        &self,
        client: &ClientConfig,
        refresh_token: &SecretString,
    ) -> Result<(), UpstreamError> {
        let Some(endpoint) = &client.revocation_endpoint else {
            return Ok(());
        };
        self.policy.check(endpoint)?;
        let params = [
            ("token", refresh_token.expose().to_owned()),
            ("token_type_hint", "refresh_token".to_owned()),
        ];
        let (status, _) = self.post_form(endpoint, client, &params).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(UpstreamError::ClientRejected {
                oauth_error: format!("http_{status}"),
            })
        }
    }

    /// POSTs a form to one of the provider's endpoints, authenticated as
    /// `client` (RFC 6749 §2.3.1). Written by hand rather than through
    /// `oauth2`, whose requests insist on https even for the loopback
    /// endpoints the policy explicitly allows. Answers the status and body
    /// of any non-5xx, non-429 answer.
    async fn post_form(
        &self,
        endpoint: &Url,
        client: &ClientConfig,
        params: &[(&str, String)],
    ) -> Result<(u16, Vec<u8>), UpstreamError> {
        let mut request = ::http::Request::builder()
            .method(::http::Method::POST)
            .uri(endpoint.as_str())
            .header(
                ::http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(::http::header::ACCEPT, "application/json");
        // Scoped: the serializer is not `Send` and must not live across an await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (name, value) in params {
                form.append_pair(name, value);
            }
            match (client.auth, &client.client_secret) {
                (ClientAuth::SecretBasic, Some(secret)) => {
                    request = request.header(
                        ::http::header::AUTHORIZATION,
                        basic_auth(&client.client_id, secret),
                    );
                }
                (ClientAuth::SecretPost, Some(secret)) => {
                    form.append_pair("client_id", &client.client_id);
                    form.append_pair("client_secret", secret.expose());
                }
                _ => {
                    form.append_pair("client_id", &client.client_id);
                    for (name, value) in assertion_params(client)? {
                        form.append_pair(name, &value);
                    }
                }
            }
            zeroize::Zeroizing::new(form.finish())
        };
        let request =
            request
                .body(body.as_bytes().to_vec())
                .map_err(|_| UpstreamError::Unavailable {
                    reason: "could not build the request".into(),
                    retry_after: None,
                })?;
        let response = self.http.execute(request).await.map_err(|e| match e {
            HttpError::Status { status, .. } if (400..500).contains(&status) && status != 429 => {
                UpstreamError::ClientRejected {
                    oauth_error: format!("http_{status}"),
                }
            }
            HttpError::Status {
                status,
                retry_after,
            } => UpstreamError::Unavailable {
                reason: format!("http {status}"),
                retry_after,
            },
            other => UpstreamError::Unavailable {
                reason: other.to_string(),
                retry_after: None,
            },
        })?;
        Ok((response.status().as_u16(), response.into_body()))
    }

    fn oauth_client(&self, client: &ClientConfig) -> Result<ConfiguredClient, UpstreamError> {
        // Re-checked on every call: the policy may have tightened since Deposit.
        self.policy.check(&client.token_endpoint)?;
        let mut oauth = BasicClient::new(ClientId::new(client.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(client.token_endpoint.clone()))
            .set_auth_type(match client.auth {
                ClientAuth::SecretBasic => AuthType::BasicAuth,
                ClientAuth::SecretPost | ClientAuth::None | ClientAuth::PrivateKeyJwt => {
                    AuthType::RequestBody
                }
            });
        let secretless = matches!(client.auth, ClientAuth::None | ClientAuth::PrivateKeyJwt);
        if let (Some(secret), false) = (&client.client_secret, secretless) {
            oauth = oauth.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
        }
        Ok(oauth)
    }

    fn issued(
        &self,
        response: oauth2::basic::BasicTokenResponse,
        requested_scopes: &[String],
    ) -> IssuedTokens {
        let lifetime = response
            .expires_in()
            .unwrap_or(self.default_token_lifetime)
            .min(MAX_TOKEN_LIFETIME);
        let scopes = match response.scopes() {
            Some(granted) => granted.iter().map(|s| s.to_string()).collect(),
            None => requested_scopes.to_vec(),
        };
        IssuedTokens {
            access_token: AccessToken {
                token: SecretString::new(response.access_token().secret().clone()),
                token_type: canonical_token_type(response.token_type().as_ref()),
                expires_at: SystemTime::now() + lifetime,
                scopes,
            },
            refresh_token: response
                .refresh_token()
                .map(|t| SecretString::new(t.secret().clone())),
        }
    }
}

fn canonical_token_type(raw: &str) -> String {
    if raw.eq_ignore_ascii_case("bearer") {
        "Bearer".to_owned()
    } else {
        raw.to_owned()
    }
}

/// The one place that reads meaning into a provider's answer.
fn classify(
    error: RequestTokenError<HttpError, oauth2::StandardErrorResponse<BasicErrorResponseType>>,
) -> UpstreamError {
    match error {
        RequestTokenError::ServerResponse(response) => {
            let code = response.error().as_ref().to_owned();
            match response.error() {
                BasicErrorResponseType::InvalidGrant | BasicErrorResponseType::InvalidScope => {
                    UpstreamError::GrantRejected { oauth_error: code }
                }
                // Anything else (invalid_client, unauthorized_client,
                // unsupported_grant_type, invalid_request, extensions) is about
                // how we ask, not whether the user's grant is alive: never
                // log a user out on an ambiguous answer.
                _ => UpstreamError::ClientRejected {
                    oauth_error: sanitize_code(&code),
                },
            }
        }
        RequestTokenError::Request(http) => match http {
            HttpError::Status {
                status,
                retry_after,
            } if status == 429 || status >= 500 => UpstreamError::Unavailable {
                reason: format!("http {status}"),
                retry_after,
            },
            // A 4xx whose body is not an OAuth error: a gateway or WAF page.
            // It says nothing about the grant; the client setup is suspect.
            HttpError::Status { status, .. } => UpstreamError::ClientRejected {
                oauth_error: format!("http_{status}"),
            },
            other => UpstreamError::Unavailable {
                reason: other.to_string(),
                retry_after: None,
            },
        },
        // The body is never echoed: a half-parsed token response holds secrets.
        RequestTokenError::Parse(..) => UpstreamError::Unavailable {
            reason: "provider sent an unparseable token response".to_owned(),
            retry_after: None,
        },
        RequestTokenError::Other(_) => UpstreamError::Unavailable {
            reason: "provider sent an empty error response".to_owned(),
            retry_after: None,
        },
    }
}

/// Extension error codes are provider-chosen text; keep them short and to the
/// RFC 6749 §5.2 character set so they are safe in metadata and logs.
/// The `client_assertion` parameters of a `private_key_jwt` client: a fresh
/// assertion per request, its audience the token endpoint. None for others.
fn assertion_params(client: &ClientConfig) -> Result<Vec<(&'static str, String)>, UpstreamError> {
    if client.auth != ClientAuth::PrivateKeyJwt {
        return Ok(Vec::new());
    }
    let assertion = client
        .assertion_key
        .as_ref()
        .and_then(|key| key.assertion(&client.client_id, &client.token_endpoint))
        .ok_or_else(|| UpstreamError::ClientRejected {
            oauth_error: "client_assertion_unavailable".into(),
        })?;
    Ok(vec![
        (
            "client_assertion_type",
            assertion::ASSERTION_TYPE.to_owned(),
        ),
        ("client_assertion", assertion),
    ])
}

pub(crate) fn sanitize_code(code: &str) -> String {
    code.chars()
        .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
        .take(64)
        .collect()
}

/// RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
fn basic_auth(client_id: &str, secret: &SecretString) -> ::http::HeaderValue {
    use base64::Engine;
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let credentials =
        zeroize::Zeroizing::new(format!("{}:{}", encode(client_id), encode(secret.expose())));
    let value = zeroize::Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials.as_bytes())
    ));
    let mut header = ::http::HeaderValue::from_str(&value)
        .unwrap_or_else(|_| ::http::HeaderValue::from_static("Basic"));
    header.set_sensitive(true);
    header
}
