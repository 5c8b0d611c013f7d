//! Authorization server metadata discovery: RFC 8414
//! (`/.well-known/oauth-authorization-server`), then OpenID Connect
//! Discovery (`/.well-known/openid-configuration`).
//!
//! A client (or preset) that names an `issuer` gets every endpoint it left
//! empty from the issuer's metadata. The metadata's own `issuer` must be
//! exactly the configured one (RFC 8414 §3.3), or nothing is used and
//! nothing cached. Discovered endpoints pass the endpoint policy like any
//! other, when they are called. Answers are cached for an hour, at most
//! [`MAX_CACHED`] issuers; failures are not cached.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;
use url::Url;

use super::{ClientConfig, Upstream, UpstreamError};

const CACHE_FOR: Duration = Duration::from_secs(3600);
const MAX_CACHED: usize = 256;

/// The endpoints an issuer's metadata names.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
}

/// Discovered metadata by issuer, with when it was fetched.
#[derive(Default)]
pub struct DiscoveryCache(Mutex<HashMap<String, (Instant, Metadata)>>);

impl DiscoveryCache {
    fn get(&self, issuer: &str) -> Option<Metadata> {
        let cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(issuer)
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, metadata)| metadata.clone())
    }

    fn put(&self, issuer: &str, metadata: Metadata) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            if cache.len() >= MAX_CACHED {
                // Still full of live entries: make room by dropping the oldest.
                if let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(issuer.to_owned(), (Instant::now(), metadata));
    }
}

/// The well-known URLs to try for `issuer`, in order.
fn well_known(issuer: &Url) -> Vec<Url> {
    let path = issuer.path().trim_end_matches('/');
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    rfc8414.set_query(None);
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    oidc.set_query(None);
    vec![rfc8414, oidc]
}

fn mismatch(reason: &str) -> UpstreamError {
    UpstreamError::ClientRejected {
        oauth_error: format!("discovery_{reason}"),
    }
}

impl Upstream {
    /// The issuer's metadata, from the cache or the network.
    pub async fn discover(&self, issuer: &Url) -> Result<Metadata, UpstreamError> {
        let key = issuer.as_str().trim_end_matches('/');
        if let Some(metadata) = self.discovery.get(key) {
            return Ok(metadata);
        }
        let mut last = None;
        for url in well_known(issuer) {
            self.policy.check_resolved(&url).await?;
            let request = ::http::Request::builder()
                .method(::http::Method::GET)
                .uri(url.as_str())
                .header(::http::header::ACCEPT, "application/json")
                .body(Vec::new())
                .map_err(|_| mismatch("request"))?;
            match self.http.execute(request).await {
                Ok(response) if response.status().is_success() => {
                    let metadata: Metadata = serde_json::from_slice(response.body())
                        .map_err(|_| mismatch("not_json"))?;
                    if metadata.issuer.trim_end_matches('/') != key {
                        return Err(mismatch("issuer_mismatch"));
                    }
                    self.discovery.put(key, metadata.clone());
                    return Ok(metadata);
                }
                Ok(response) => {
                    last = Some(mismatch(&format!("http_{}", response.status().as_u16())))
                }
                Err(super::http::HttpError::TooLarge { .. }) => return Err(mismatch("too_large")),
                Err(error) => {
                    last = Some(UpstreamError::Unavailable {
                        reason: error.to_string(),
                        retry_after: None,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| mismatch("not_found")))
    }

    /// `client` with every endpoint it left empty filled from its issuer's
    /// metadata; unchanged when it names no issuer or needs nothing.
    pub async fn with_discovered(
        &self,
        mut client: ClientConfig,
    ) -> Result<ClientConfig, UpstreamError> {
        let Some(issuer) = client.flows.issuer.clone() else {
            return Ok(client);
        };
        let complete = !client.flows.discover_token_endpoint
            && client.flows.authorization.is_some()
            && client.flows.device_authorization.is_some()
            && client.revocation_endpoint.is_some();
        if complete {
            return Ok(client);
        }
        let metadata = self.discover(&issuer).await?;
        let parse =
            |raw: &Option<String>| raw.as_deref().and_then(|r| super::parse_http_url(r).ok());
        if client.flows.discover_token_endpoint {
            client.token_endpoint =
                parse(&metadata.token_endpoint).ok_or_else(|| mismatch("no_token_endpoint"))?;
            client.flows.discover_token_endpoint = false;
        }
        if client.flows.authorization.is_none() {
            client.flows.authorization = parse(&metadata.authorization_endpoint);
        }
        if client.flows.device_authorization.is_none() {
            client.flows.device_authorization = parse(&metadata.device_authorization_endpoint);
        }
        if client.revocation_endpoint.is_none() {
            client.revocation_endpoint = parse(&metadata.revocation_endpoint);
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_urls_follow_rfc_8414_then_oidc() {
        let urls = well_known(&Url::parse("https://idp.example/tenant/1").unwrap());
        assert_eq!(
            urls[0].as_str(),
            "https://idp.example/.well-known/oauth-authorization-server/tenant/1"
        );
        assert_eq!(
            urls[1].as_str(),
            "https://idp.example/tenant/1/.well-known/openid-configuration"
        );
        let root = well_known(&Url::parse("https://idp.example").unwrap());
        assert_eq!(
            root[0].as_str(),
            "https://idp.example/.well-known/oauth-authorization-server"
        );
    }
}
