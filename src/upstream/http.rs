//! The HTTP client under the `oauth2` crate: timeouts, no redirects, a cap on
//! response size, and errors that keep the HTTP outcome for classification.
//!
//! A provider's 5xx or 429 is turned into an [`HttpError::Status`] here, before
//! `oauth2` sees it, so "provider down" can never be mistaken for an OAuth
//! error code. Error values never carry bodies or URLs with secrets.
//!
//! rustls needs a process-wide crypto provider before the client is built;
//! the server installs it once at start (`server::tls`).

use std::time::Duration;

use oauth2::{HttpRequest, HttpResponse};

use super::policy::PolicyResolver;

/// Outcomes of one HTTP exchange that are not a usable response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request to the provider timed out")]
    Timeout,
    #[error("could not connect to the provider")]
    Connect,
    #[error("provider answered http {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("provider response exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request to the provider failed")]
    Transport,
}

/// Settings of the upstream HTTP client.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// A pooled HTTP client for token and revocation endpoints.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl HttpClient {
    pub fn new(settings: &HttpSettings, resolver: PolicyResolver) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A redirect would let a provider steer our credentials to a host
            // the endpoint policy never saw.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .https_only(false)
            // Every name is resolved through the endpoint policy.
            .dns_resolver(std::sync::Arc::new(resolver))
            // An ambient HTTP(S)_PROXY would carry secrets past the policy.
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            max_response_bytes: settings.max_response_bytes,
        })
    }

    /// Performs one request; the signature `oauth2` expects of a client.
    pub async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        // oauth2 hands over the endpoint as text; a `Url` spares reqwest
        // one of the three parses it makes of a request's URL, and the
        // endpoint is one `parse_url` remembers.
        let uri = parts.uri.to_string();
        let request = match super::parse_url(&uri) {
            Ok(url) => self.client.request(parts.method, url),
            // Refused by reqwest exactly as before.
            Err(_) => self.client.request(parts.method, uri),
        };
        let response = request
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(classify_reqwest)?;

        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(HttpError::Status {
                status: status.as_u16(),
                retry_after: retry_after(response.headers()),
            });
        }
        let headers = response.headers().clone();
        let body = self.read_capped(response).await?;

        // RFC 6749 §5.2 errors are JSON; a 4xx with another body (an HTML
        // error page from a gateway) says nothing about the grant.
        if status != reqwest::StatusCode::OK && !looks_like_json(&body) {
            return Err(HttpError::Status {
                status: status.as_u16(),
                retry_after: None,
            });
        }
        let mut builder = http::Response::builder().status(status);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        builder.body(body).map_err(|_| HttpError::Transport)
    }

    /// POSTs `body` with `headers` and answers the status; the response
    /// body is read (capped) and dropped.
    pub async fn post(
        &self,
        url: &url::Url,
        headers: http::HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<u16, HttpError> {
        let response = self
            .client
            .post(url.clone())
            .headers(headers)
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(classify_reqwest)?;
        let status = response.status().as_u16();
        // Drained so the connection can be reused; an oversized answer only
        // costs the connection.
        let _ = self.read_capped(response).await;
        Ok(status)
    }

    async fn read_capped(&self, mut response: reqwest::Response) -> Result<Vec<u8>, HttpError> {
        if response
            .content_length()
            .is_some_and(|len| len > self.max_response_bytes as u64)
        {
            return Err(HttpError::TooLarge {
                limit: self.max_response_bytes,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify_reqwest)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(HttpError::TooLarge {
                    limit: self.max_response_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>,
    >;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        // A named, boxed, `Send` future: a closure client makes the whole
        // oauth2 request future lose `Send` (higher-ranked lifetime issue).
        Box::pin(self.execute(request))
    }
}

fn classify_reqwest(error: reqwest::Error) -> HttpError {
    if error.is_timeout() {
        HttpError::Timeout
    } else if error.is_connect() {
        HttpError::Connect
    } else {
        HttpError::Transport
    }
}

fn looks_like_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object())
}

/// `Retry-After` in delta-seconds; HTTP dates are rare on token endpoints and
/// are ignored rather than guessed at.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|secs| Duration::from_secs(secs.min(3600)))
}
