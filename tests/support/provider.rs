//! An in-process OAuth 2.0 authorization server double for credvault's integration tests.
//!
//! The vault's job is to talk to real upstream providers (Google, Okta, MCP servers, ...) over
//! HTTP: refresh grants, rotate refresh tokens, retry on 429/503, revoke on delete. A trait mock
//! would skip exactly the parts that break in production (form encoding, HTTP Basic client
//! authentication, status codes, `Retry-After`, unparseable bodies, hung sockets), so the tests
//! run against this real HTTP server on `127.0.0.1:<ephemeral>` instead.
//!
//! It simulates:
//! * RFC 6749 token endpoint (`POST /token`, `application/x-www-form-urlencoded`) with the
//!   `refresh_token`, `authorization_code` (+ RFC 7636 PKCE S256) and `client_credentials`
//!   grants, client authentication via HTTP Basic (§2.3.1), body credentials, or `client_id`
//!   only for public clients, and §5.2 JSON errors.
//! * Refresh-token rotation with reuse detection: replaying a rotated refresh token fails with
//!   `invalid_grant` *and* revokes the whole token family, like real providers do. This is what
//!   makes a vault that refreshes the same grant concurrently lose the grant.
//! * RFC 7009 revocation endpoint (`POST /revoke`).
//! * Fault injection (`fail_next`), latency, and a "hold" gate that parks token requests after
//!   they are counted so tests can line up races deterministically.
//!
//! Every response carries `Cache-Control: no-store` and a JSON content type. State lives behind
//! a std `Mutex` that is never held across an `.await`; the server never panics on client input.
#![allow(dead_code)]
// Handlers bail out with a ready `Response`; boxing it would only add noise to a test double.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A canned failure returned by the next token (or revocation) call(s) instead of processing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Arbitrary status and raw body, optionally with `Retry-After: <secs>` (e.g. 503, 429).
    Status {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// RFC 6749 §5.2 error: `{"error": error, "error_description": "injected fault"}`.
    OAuthError { status: u16, error: String },
    /// `200 OK` whose body is not JSON.
    Garbage,
    /// Never answers (until the double shuts down).
    Hang,
}

/// How the client authenticated on a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuthMethod {
    /// `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))`.
    Basic,
    /// `client_id` + `client_secret` form fields.
    Post,
    /// `client_id` form field only (public client).
    None,
    /// RFC 7523 `client_assertion` (`private_key_jwt`), verified.
    PrivateKeyJwt,
}

/// What client authentication the last token/revocation request presented (even if it failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAuthSeen {
    pub method: ClientAuthMethod,
    /// As presented by the request; empty if none was presented.
    pub client_id: String,
}

/// While alive, token requests are parked after being counted. Release with `release()`/drop.
pub struct HoldGuard {
    shared: Arc<Shared>,
}

impl HoldGuard {
    pub fn release(self) {}
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.shared.holds.send_modify(|n| *n = n.saturating_sub(1));
    }
}

struct Family {
    client_id: String,
    scope: Option<String>,
    latest: String,
    revoked: bool,
}

struct RefreshRecord {
    family: u64,
    rotated: bool,
    /// Revoked alone (RFC 7009 without family revocation).
    revoked: bool,
}

struct CodeRecord {
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    used: bool,
    family: Option<u64>,
}

struct AccessRecord {
    client_id: String,
    family: Option<u64>,
    revoked: bool,
}

struct State {
    clients: HashMap<String, Option<String>>,
    families: HashMap<u64, Family>,
    refresh_tokens: HashMap<String, RefreshRecord>,
    codes: HashMap<String, CodeRecord>,
    access_tokens: HashMap<String, AccessRecord>,
    issued_access: Vec<String>,
    next_id: u64,
    rotation: bool,
    reuse_detection: bool,
    expires_in: Option<u64>,
    latency: Duration,
    response_delay: Duration,
    /// RFC 7009 lets a provider revoke the whole grant or just the token.
    family_revocation: bool,
    token_faults: VecDeque<Fault>,
    revocation_faults: VecDeque<Fault>,
    token_calls: usize,
    /// Token requests being answered now, and the most at once.
    token_in_flight: usize,
    token_in_flight_max: usize,
    revocation_calls: usize,
    calls_by_grant: HashMap<String, usize>,
    last_token_request: Option<HashMap<String, String>>,
    last_revocation_request: Option<HashMap<String, String>>,
    last_client_auth: Option<ClientAuthSeen>,
    /// `/authorize` redirects with `error=access_denied` while set.
    deny_authorizations: bool,
    /// The query of every `/authorize` request.
    authorize_requests: Vec<HashMap<String, String>>,
    /// Device codes and the answers their polls get, in order (`approve`
    /// issues tokens; anything else is the RFC 8628 error to answer).
    devices: HashMap<String, (String, VecDeque<String>)>,
    device_script: Vec<String>,
    /// When each device poll arrived.
    device_polls: Vec<std::time::Instant>,
    /// The `issuer` its RFC 8414 metadata claims (default: its own URL).
    metadata_issuer: Option<String>,
    /// Replaces the metadata document (garbage, an oversized body).
    metadata_body: Option<String>,
    metadata_requests: usize,
    /// `private_key_jwt` clients: their public keys (SPKI PEM).
    jwt_clients: HashMap<String, String>,
    /// Every assertion `jti` accepted: a second use is refused.
    seen_jti: std::collections::HashSet<String>,
    /// What an assertion's `aud` must be.
    own_token_url: String,
}

impl State {
    fn next(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }

    fn new_family(&mut self, client_id: &str, scope: Option<String>) -> (u64, String) {
        let rt = self.next("rt");
        let id = self.next_id;
        let family = Family {
            client_id: client_id.to_owned(),
            scope,
            latest: rt.clone(),
            revoked: false,
        };
        self.families.insert(id, family);
        self.refresh_tokens.insert(
            rt.clone(),
            RefreshRecord {
                family: id,
                rotated: false,
                revoked: false,
            },
        );
        (id, rt)
    }

    fn issue_access(&mut self, client_id: &str, family: Option<u64>) -> String {
        let at = self.next("at");
        let rec = AccessRecord {
            client_id: client_id.to_owned(),
            family,
            revoked: false,
        };
        self.access_tokens.insert(at.clone(), rec);
        self.issued_access.push(at.clone());
        at
    }

    fn revoke_family(&mut self, family: u64) {
        if let Some(f) = self.families.get_mut(&family) {
            f.revoked = true;
        }
    }

    fn rt_live(&self, rt: &str) -> bool {
        self.refresh_tokens.get(rt).is_some_and(|r| {
            !r.rotated && !r.revoked && self.families.get(&r.family).is_some_and(|f| !f.revoked)
        })
    }
}

struct Shared {
    state: Mutex<State>,
    token_calls: watch::Sender<usize>,
    holds: watch::Sender<usize>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running provider. Dropping it (or `shutdown().await`) stops the server.
pub struct ProviderDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ProviderDouble {
    /// A started double that already knows one OAuth client.
    pub async fn with_client(client_id: &str, client_secret: Option<&str>) -> ProviderDouble {
        let provider = ProviderDouble::start().await;
        provider.register_client(client_id, client_secret);
        provider
    }

    /// Binds `127.0.0.1:0` and serves in a background task.
    pub async fn start() -> ProviderDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind provider double");
        let addr = listener.local_addr().expect("provider double local addr");
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let state = State {
            clients: HashMap::new(),
            families: HashMap::new(),
            refresh_tokens: HashMap::new(),
            codes: HashMap::new(),
            access_tokens: HashMap::new(),
            issued_access: Vec::new(),
            next_id: 0,
            rotation: true,
            reuse_detection: true,
            expires_in: Some(3600),
            latency: Duration::ZERO,
            response_delay: Duration::ZERO,
            family_revocation: true,
            token_faults: VecDeque::new(),
            revocation_faults: VecDeque::new(),
            token_calls: 0,
            token_in_flight: 0,
            token_in_flight_max: 0,
            revocation_calls: 0,
            calls_by_grant: HashMap::new(),
            last_token_request: None,
            last_revocation_request: None,
            last_client_auth: None,
            deny_authorizations: false,
            authorize_requests: Vec::new(),
            devices: HashMap::new(),
            device_script: Vec::new(),
            device_polls: Vec::new(),
            metadata_issuer: None,
            metadata_body: None,
            metadata_requests: 0,
            jwt_clients: HashMap::new(),
            seen_jti: Default::default(),
            own_token_url: format!("http://{addr}/token"),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            token_calls: watch::channel(0).0,
            holds: watch::channel(0).0,
            shutdown: shutdown_rx.clone(),
        });
        let app = Router::new()
            .route("/token", any(token_endpoint))
            .route("/revoke", any(revoke_endpoint))
            .route("/authorize", any(authorize_endpoint))
            .route("/device_authorization", any(device_authorization_endpoint))
            .route(
                "/.well-known/oauth-authorization-server",
                any(metadata_endpoint),
            )
            .fallback(|| async {
                oauth_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
            })
            .with_state(shared.clone());
        let mut signal = shutdown_rx;
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = signal.wait_for(|s| *s).await;
            };
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        ProviderDouble {
            addr,
            shared,
            shutdown_tx,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// The issuer identifier the double puts in its redirects' `iss`.
    pub fn issuer(&self) -> String {
        self.base_url()
    }
    pub fn authorization_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }
    pub fn device_authorization_url(&self) -> String {
        format!("{}/device_authorization", self.base_url())
    }
    /// While set, the user declines at `/authorize`.
    pub fn set_deny_authorizations(&self, deny: bool) {
        self.shared.lock().deny_authorizations = deny;
    }
    /// The query parameters of every `/authorize` request so far.
    pub fn authorize_requests(&self) -> Vec<HashMap<String, String>> {
        self.shared.lock().authorize_requests.clone()
    }
    /// What the polls of the next device authorization get, in order.
    pub fn set_device_script(&self, answers: &[&str]) {
        self.shared.lock().device_script = answers.iter().map(|a| a.to_string()).collect();
    }
    /// Registers a `private_key_jwt` client by its ES256 public key (PEM).
    pub fn register_jwt_client(&self, client_id: &str, public_key_pem: &str) {
        let mut st = self.shared.lock();
        st.clients.insert(client_id.to_owned(), None);
        st.jwt_clients
            .insert(client_id.to_owned(), public_key_pem.to_owned());
    }
    /// Assertions accepted so far (each `jti` once).
    pub fn accepted_assertions(&self) -> usize {
        self.shared.lock().seen_jti.len()
    }
    /// Makes the RFC 8414 metadata claim another issuer (a mix-up).
    pub fn set_metadata_issuer(&self, issuer: &str) {
        self.shared.lock().metadata_issuer = Some(issuer.to_owned());
    }
    /// Serves `body` as its metadata document instead.
    pub fn set_metadata_body(&self, body: &str) {
        self.shared.lock().metadata_body = Some(body.to_owned());
    }
    /// Requests for its metadata so far.
    pub fn metadata_requests(&self) -> usize {
        self.shared.lock().metadata_requests
    }
    /// When each device poll arrived.
    pub fn device_polls(&self) -> Vec<std::time::Instant> {
        self.shared.lock().device_polls.clone()
    }
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }
    pub fn revocation_url(&self) -> String {
        format!("{}/revoke", self.base_url())
    }

    /// Stops accepting, unblocks held/hung requests and waits (up to 5s) for the server to end.
    pub async fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Registers (or replaces) a client. `None` secret = public client.
    pub fn register_client(&self, client_id: &str, client_secret: Option<&str>) {
        self.shared
            .lock()
            .clients
            .insert(client_id.to_owned(), client_secret.map(str::to_owned));
    }

    /// Seeds a new grant (token family) for `client_id` and returns its refresh token.
    pub fn issue_refresh_token(&self, client_id: &str) -> String {
        self.issue_refresh_token_with_scope(client_id, None)
    }

    /// Like `issue_refresh_token`, with the scope the grant was consented for. Refreshes may
    /// request a subset (else `invalid_scope`); responses echo the request's or this scope.
    pub fn issue_refresh_token_with_scope(&self, client_id: &str, scope: Option<&str>) -> String {
        self.shared
            .lock()
            .new_family(client_id, scope.map(str::to_owned))
            .1
    }

    /// Issues a single-use authorization code. `code_challenge` is an S256 challenge.
    pub fn issue_authorization_code(
        &self,
        client_id: &str,
        redirect_uri: &str,
        code_challenge: Option<&str>,
    ) -> String {
        let mut st = self.shared.lock();
        let code = st.next("code");
        let rec = CodeRecord {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            challenge: code_challenge.map(str::to_owned),
            used: false,
            family: None,
        };
        st.codes.insert(code.clone(), rec);
        code
    }

    /// Kills the family of `refresh_token` (the user revoked consent). Returns whether it existed.
    pub fn revoke_grant(&self, refresh_token: &str) -> bool {
        let mut st = self.shared.lock();
        match st.refresh_tokens.get(refresh_token).map(|r| r.family) {
            Some(f) => {
                st.revoke_family(f);
                true
            }
            None => false,
        }
    }

    /// Default true. When off, refreshes return no `refresh_token` and the old one stays valid.
    pub fn set_rotation(&self, on: bool) {
        self.shared.lock().rotation = on;
    }
    /// Default true. When off, a reused refresh token still fails but the family survives.
    pub fn set_reuse_detection(&self, on: bool) {
        self.shared.lock().reuse_detection = on;
    }
    /// Default `Some(3600)`; `None` omits `expires_in` from token responses.
    pub fn set_expires_in(&self, secs: Option<u64>) {
        self.shared.lock().expires_in = secs;
    }
    /// Delay applied to every token call (after the hold gate, before faults/processing).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// Default true: revoking a refresh token revokes its whole family. When
    /// off, only the presented token dies (a rotated successor lives on).
    pub fn set_family_revocation(&self, on: bool) {
        self.shared.lock().family_revocation = on;
    }

    /// Delay applied after a token call is processed, before its answer is
    /// sent: the grant has rotated at the provider, the vault does not know yet.
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.lock().response_delay = delay;
    }

    /// The next `n` token calls (in arrival order) get `fault` instead of being processed.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut st = self.shared.lock();
        st.token_faults.extend(std::iter::repeat_n(fault, n));
    }
    /// Same as `fail_next`, for the revocation endpoint.
    pub fn fail_next_revocation(&self, n: usize, fault: Fault) {
        let mut st = self.shared.lock();
        st.revocation_faults.extend(std::iter::repeat_n(fault, n));
    }
    pub fn clear_faults(&self) {
        let mut st = self.shared.lock();
        st.token_faults.clear();
        st.revocation_faults.clear();
    }

    /// Parks token requests (after they are counted) until the guard is released or dropped.
    pub fn hold_token_calls(&self) -> HoldGuard {
        self.shared.holds.send_modify(|n| *n += 1);
        HoldGuard {
            shared: self.shared.clone(),
        }
    }

    /// Resolves once at least `n` token calls have arrived (counted, possibly still held).
    pub async fn wait_for_token_calls(&self, n: usize) {
        let mut rx = self.shared.token_calls.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Every request that reached `/token`, including faulted and malformed ones.
    pub fn token_calls(&self) -> usize {
        self.shared.lock().token_calls
    }
    pub fn refresh_calls(&self) -> usize {
        self.calls_by_grant_type("refresh_token")
    }
    /// The most token requests the double was answering at once.
    pub fn max_token_calls_in_flight(&self) -> usize {
        self.shared.lock().token_in_flight_max
    }

    pub fn calls_by_grant_type(&self, grant_type: &str) -> usize {
        self.shared
            .lock()
            .calls_by_grant
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }
    pub fn revocation_calls(&self) -> usize {
        self.shared.lock().revocation_calls
    }

    /// Latest live refresh token of the family `family_of` (any of its tokens) belongs to.
    pub fn current_refresh_token(&self, family_of: &str) -> Option<String> {
        let st = self.shared.lock();
        let family = st.families.get(&st.refresh_tokens.get(family_of)?.family)?;
        (!family.revoked).then(|| family.latest.clone())
    }
    pub fn is_refresh_token_live(&self, refresh_token: &str) -> bool {
        self.shared.lock().rt_live(refresh_token)
    }
    /// False if unknown, revoked via `/revoke`, or its family was revoked.
    pub fn is_access_token_live(&self, access_token: &str) -> bool {
        let st = self.shared.lock();
        st.access_tokens.get(access_token).is_some_and(|a| {
            !a.revoked
                && a.family
                    .is_none_or(|f| st.families.get(&f).is_some_and(|f| !f.revoked))
        })
    }
    /// All access tokens issued so far, oldest first.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.shared.lock().issued_access.clone()
    }
    /// Form params of the last `/token` request (last value wins for duplicates).
    pub fn last_token_request(&self) -> Option<HashMap<String, String>> {
        self.shared.lock().last_token_request.clone()
    }
    pub fn last_revocation_request(&self) -> Option<HashMap<String, String>> {
        self.shared.lock().last_revocation_request.clone()
    }
    pub fn last_client_auth(&self) -> Option<ClientAuthSeen> {
        self.shared.lock().last_client_auth.clone()
    }
}

impl Drop for ProviderDouble {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// RFC 7636 S256: BASE64URL-NOPAD(SHA256(ASCII(verifier))).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

type Params = Vec<(String, String)>;

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = json!({ "error": error, "error_description": description });
    let mut resp = json_response(status, body.to_string());
    if status == StatusCode::UNAUTHORIZED {
        let h = resp.headers_mut();
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"provider-double\""),
        );
    }
    resp
}

fn bad_request(error: &str, description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, error, description)
}

fn invalid_grant(description: &str) -> Response {
    bad_request("invalid_grant", description)
}

async fn fault_response(fault: Fault, mut shutdown: watch::Receiver<bool>) -> Response {
    match fault {
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = json_response(status, body);
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
        Fault::OAuthError { status, error } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            oauth_error(status, &error, "injected fault")
        }
        Fault::Garbage => json_response(StatusCode::OK, "<html><body>Service Unavailable".into()),
        Fault::Hang => {
            let _ = shutdown.wait_for(|s| *s).await;
            oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "shutting down",
            )
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                let hex = hex.and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(byte.ok_or_else(|| "malformed percent-encoding".to_owned())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "form value is not UTF-8".to_owned())
}

fn parse_form(s: &str) -> Result<Params, String> {
    let mut params = Vec::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(params)
}

async fn read_form(headers: &HeaderMap, body: Body) -> Result<Params, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(format!(
            "content-type must be application/x-www-form-urlencoded, got {ct:?}"
        ));
    }
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|e| format!("body: {e}"))?;
    parse_form(std::str::from_utf8(&bytes).map_err(|_| "body is not UTF-8".to_owned())?)
}

/// RFC 6749 §3.1: empty parameters are treated as omitted.
fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn duplicate_param(params: &Params) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    params
        .iter()
        .find(|(k, _)| !seen.insert(k.as_str()))
        .map(|(k, _)| k.as_str())
}

/// Authenticates the client (RFC 6749 §2.3); records what was presented.
fn authenticate(st: &mut State, headers: &HeaderMap, params: &Params) -> Result<String, Response> {
    let unauthorized = |d: &str| oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", d);
    if let Some(assertion) = param(params, "client_assertion") {
        return verify_assertion(st, params, assertion).map_err(|d| unauthorized(&d));
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let basic = auth
        .and_then(|a| a.split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("basic"));
    let (method, id, secret) = if let Some((_, b64)) = basic {
        st.last_client_auth = Some(ClientAuthSeen {
            method: ClientAuthMethod::Basic,
            client_id: String::new(),
        });
        let b64 = b64.trim();
        let decoded = STANDARD
            .decode(b64)
            .or_else(|_| STANDARD_NO_PAD.decode(b64));
        let text = decoded.ok().and_then(|d| String::from_utf8(d).ok());
        let Some((id, secret)) = text.as_deref().and_then(|t| t.split_once(':')) else {
            return Err(unauthorized("malformed Basic credentials"));
        };
        let (Ok(id), Ok(secret)) = (percent_decode(id), percent_decode(secret)) else {
            return Err(unauthorized("malformed Basic credentials"));
        };
        st.last_client_auth = Some(ClientAuthSeen {
            method: ClientAuthMethod::Basic,
            client_id: id.clone(),
        });
        if param(params, "client_secret").is_some() {
            return Err(bad_request(
                "invalid_request",
                "multiple client authentication methods",
            ));
        }
        if param(params, "client_id").is_some_and(|body_id| body_id != id) {
            return Err(unauthorized("client_id does not match Basic credentials"));
        }
        (
            ClientAuthMethod::Basic,
            id,
            Some(secret).filter(|s| !s.is_empty()),
        )
    } else {
        let id = param(params, "client_id").unwrap_or("").to_owned();
        let secret = param(params, "client_secret").map(str::to_owned);
        let method = if secret.is_some() {
            ClientAuthMethod::Post
        } else {
            ClientAuthMethod::None
        };
        (method, id, secret)
    };
    st.last_client_auth = Some(ClientAuthSeen {
        method,
        client_id: id.clone(),
    });
    if id.is_empty() {
        return Err(unauthorized("client authentication required"));
    }
    match st.clients.get(&id) {
        Some(expected) if *expected == secret => Ok(id),
        Some(_) => Err(unauthorized("bad client credentials")),
        None => Err(unauthorized("unknown client")),
    }
}

/// Counts a token request as in flight until it is answered (or dropped).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let mut st = shared.lock();
        st.token_in_flight += 1;
        st.token_in_flight_max = st.token_in_flight_max.max(st.token_in_flight);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().token_in_flight -= 1;
    }
}

/// `POST /token`: count, record, pick a fault (arrival order), hold, latency, then process.
async fn token_endpoint(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    let form = read_form(&headers, body).await;
    let _in_flight = InFlight::enter(&shared);
    let (fault, latency) = {
        let mut st = shared.lock();
        st.token_calls += 1;
        shared.token_calls.send_replace(st.token_calls);
        if let Ok(params) = &form {
            st.last_token_request = Some(params.iter().cloned().collect());
            if let Some(gt) = param(params, "grant_type") {
                *st.calls_by_grant.entry(gt.to_owned()).or_default() += 1;
            }
        }
        (st.token_faults.pop_front(), st.latency)
    };
    let mut holds = shared.holds.subscribe();
    let mut shutdown = shared.shutdown.clone();
    tokio::select! {
        _ = holds.wait_for(|n| *n == 0) => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
    if !latency.is_zero() {
        // Not tokio's timer: its millisecond tick makes a 20 ms double take 21-22.
        super::timer::sleep(latency).await;
    }
    if let Some(fault) = fault {
        return fault_response(fault, shared.shutdown.clone()).await;
    }
    let params = match form {
        Ok(p) => p,
        Err(e) => return bad_request("invalid_request", &e),
    };
    let (response, delay) = {
        let mut st = shared.lock();
        (handle_token(&mut st, &headers, &params), st.response_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

fn handle_token(st: &mut State, headers: &HeaderMap, params: &Params) -> Response {
    if let Some(dup) = duplicate_param(params) {
        return bad_request("invalid_request", &format!("parameter {dup} repeated"));
    }
    let Some(grant_type) = param(params, "grant_type") else {
        return bad_request("invalid_request", "missing grant_type");
    };
    let client_id = match authenticate(st, headers, params) {
        Ok(id) => id,
        Err(resp) => return resp,
    };
    let requested_scope = param(params, "scope").map(str::to_owned);
    let (family, refresh_token, scope) = match grant_type {
        "refresh_token" => match refresh_grant(st, &client_id, params, requested_scope) {
            Ok(v) => v,
            Err(resp) => return resp,
        },
        "authorization_code" => match code_grant(st, &client_id, params) {
            Ok((f, rt)) => (Some(f), Some(rt), requested_scope),
            Err(resp) => return resp,
        },
        "urn:ietf:params:oauth:grant-type:device_code" => {
            st.device_polls.push(std::time::Instant::now());
            let code = param(params, "device_code").unwrap_or_default().to_owned();
            let Some((owner, script)) = st.devices.get_mut(&code) else {
                return bad_request("invalid_grant", "unknown device_code");
            };
            if *owner != client_id {
                return bad_request("invalid_grant", "device_code of another client");
            }
            match script.pop_front().as_deref() {
                Some("approve") => {
                    st.devices.remove(&code);
                    let (family, rt) = st.new_family(&client_id, requested_scope.clone());
                    (Some(family), Some(rt), requested_scope)
                }
                Some(error) => {
                    let error = error.to_owned();
                    return bad_request(&error, "device flow");
                }
                None => return bad_request("authorization_pending", "device flow"),
            }
        }
        "client_credentials" => {
            if st.clients.get(&client_id).is_some_and(Option::is_none) {
                return bad_request(
                    "unauthorized_client",
                    "public clients cannot use client_credentials",
                );
            }
            (None, None, requested_scope)
        }
        other => {
            return bad_request(
                "unsupported_grant_type",
                &format!("grant_type {other} not supported"),
            )
        }
    };
    let access_token = st.issue_access(&client_id, family);
    let mut body = json!({ "access_token": access_token, "token_type": "Bearer" });
    if let Some(secs) = st.expires_in {
        body["expires_in"] = Value::from(secs);
    }
    if let Some(rt) = refresh_token {
        body["refresh_token"] = Value::from(rt);
    }
    if let Some(scope) = scope {
        body["scope"] = Value::from(scope);
    }
    json_response(StatusCode::OK, body.to_string())
}

type GrantResult = Result<(Option<u64>, Option<String>, Option<String>), Response>;

fn refresh_grant(
    st: &mut State,
    client_id: &str,
    params: &Params,
    requested: Option<String>,
) -> GrantResult {
    let Some(rt) = param(params, "refresh_token") else {
        return Err(bad_request("invalid_request", "missing refresh_token"));
    };
    let Some(rec) = st.refresh_tokens.get(rt) else {
        return Err(invalid_grant("unknown refresh token"));
    };
    if rec.revoked {
        return Err(invalid_grant("refresh token revoked"));
    }
    let (family_id, rotated) = (rec.family, rec.rotated);
    let Some(family) = st.families.get(&family_id) else {
        return Err(invalid_grant("unknown refresh token"));
    };
    let (family_client, revoked, granted) = (
        family.client_id.clone(),
        family.revoked,
        family.scope.clone(),
    );
    if family_client != client_id {
        return Err(invalid_grant("refresh token was issued to another client"));
    }
    if rotated {
        if st.reuse_detection {
            st.revoke_family(family_id);
        }
        return Err(invalid_grant("refresh token reused"));
    }
    if revoked {
        return Err(invalid_grant("refresh token revoked"));
    }
    if let (Some(req), Some(granted)) = (&requested, &granted) {
        let granted: Vec<&str> = granted.split(' ').collect();
        if !req
            .split(' ')
            .filter(|s| !s.is_empty())
            .all(|s| granted.contains(&s))
        {
            return Err(bad_request(
                "invalid_scope",
                "requested scope exceeds the grant",
            ));
        }
    }
    let scope = requested.or(granted);
    let mut new_rt = None;
    if st.rotation {
        let next = st.next("rt");
        st.refresh_tokens.insert(
            next.clone(),
            RefreshRecord {
                family: family_id,
                rotated: false,
                revoked: false,
            },
        );
        if let Some(old) = st.refresh_tokens.get_mut(rt) {
            old.rotated = true;
        }
        if let Some(f) = st.families.get_mut(&family_id) {
            f.latest = next.clone();
        }
        new_rt = Some(next);
    }
    Ok((Some(family_id), new_rt, scope))
}

fn code_grant(st: &mut State, client_id: &str, params: &Params) -> Result<(u64, String), Response> {
    let Some(code) = param(params, "code") else {
        return Err(bad_request("invalid_request", "missing code"));
    };
    let Some(rec) = st.codes.get(code) else {
        return Err(invalid_grant("unknown authorization code"));
    };
    let (rec_client, used, issued_family) = (rec.client_id.clone(), rec.used, rec.family);
    let (redirect_uri, challenge) = (rec.redirect_uri.clone(), rec.challenge.clone());
    if rec_client != client_id {
        return Err(invalid_grant(
            "authorization code was issued to another client",
        ));
    }
    if used {
        // RFC 6749 §4.1.2: SHOULD revoke tokens previously issued from a replayed code.
        if let Some(f) = issued_family {
            st.revoke_family(f);
        }
        return Err(invalid_grant("authorization code already used"));
    }
    if param(params, "redirect_uri") != Some(redirect_uri.as_str()) {
        return Err(invalid_grant("redirect_uri mismatch"));
    }
    if let Some(challenge) = challenge {
        let Some(verifier) = param(params, "code_verifier") else {
            return Err(invalid_grant("code_verifier required"));
        };
        let charset_ok = verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if !(43..=128).contains(&verifier.len()) || !charset_ok {
            return Err(invalid_grant("malformed code_verifier"));
        }
        if pkce_challenge(verifier) != challenge {
            return Err(invalid_grant("PKCE verification failed"));
        }
    }
    let (family, rt) = st.new_family(client_id, None);
    if let Some(rec) = st.codes.get_mut(code) {
        rec.used = true;
        rec.family = Some(family);
    }
    Ok((family, rt))
}

async fn revoke_endpoint(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    let form = read_form(&headers, body).await;
    let fault = {
        let mut st = shared.lock();
        st.revocation_calls += 1;
        if let Ok(params) = &form {
            st.last_revocation_request = Some(params.iter().cloned().collect());
        }
        st.revocation_faults.pop_front()
    };
    if let Some(fault) = fault {
        return fault_response(fault, shared.shutdown.clone()).await;
    }
    let params = match form {
        Ok(p) => p,
        Err(e) => return bad_request("invalid_request", &e),
    };
    let mut st = shared.lock();
    if let Some(dup) = duplicate_param(&params) {
        return bad_request("invalid_request", &format!("parameter {dup} repeated"));
    }
    let client_id = match authenticate(&mut st, &headers, &params) {
        Ok(id) => id,
        Err(resp) => return resp,
    };
    let Some(token) = param(&params, "token") else {
        return bad_request("invalid_request", "missing token");
    };
    // token_type_hint is only a hint (RFC 7009 §2.1): look the token up in both stores.
    let not_yours = || bad_request("unauthorized_client", "token was issued to another client");
    if let Some(family) = st.refresh_tokens.get(token).map(|r| r.family) {
        if st
            .families
            .get(&family)
            .is_some_and(|f| f.client_id != client_id)
        {
            return not_yours();
        }
        if st.family_revocation {
            st.revoke_family(family);
        } else if let Some(record) = st.refresh_tokens.get_mut(token) {
            record.revoked = true;
        }
    } else if let Some(at) = st.access_tokens.get_mut(token) {
        if at.client_id != client_id {
            return not_yours();
        }
        at.revoked = true;
    }
    json_response(StatusCode::OK, "{}".into())
}

/// RFC 6749 §4.1.1: the user approves (or, while denied, declines) at once;
/// the answer is a 302 to the redirect URI with `code`, `state` and `iss`
/// (RFC 9207).
async fn authorize_endpoint(
    AxState(shared): AxState<Arc<Shared>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut st = shared.lock();
    st.authorize_requests.push(query.clone());
    let get = |name: &str| query.get(name).cloned().unwrap_or_default();
    let client_id = get("client_id");
    if !st.clients.contains_key(&client_id) || get("response_type") != "code" {
        return bad_request("invalid_request", "unknown client or response_type");
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").is_empty() {
        return bad_request("invalid_request", "PKCE S256 required");
    }
    let Ok(mut redirect) = url::Url::parse(&get("redirect_uri")) else {
        return bad_request("invalid_request", "redirect_uri");
    };
    let iss = format!("http://{host}");
    {
        let mut pairs = redirect.query_pairs_mut();
        if st.deny_authorizations {
            pairs.append_pair("error", "access_denied");
        } else {
            let code = st.next("code");
            let record = CodeRecord {
                client_id: client_id.clone(),
                redirect_uri: get("redirect_uri"),
                challenge: Some(get("code_challenge")),
                used: false,
                family: None,
            };
            st.codes.insert(code.clone(), record);
            pairs.append_pair("code", &code);
        }
        pairs.append_pair("state", &get("state"));
        pairs.append_pair("iss", &iss);
    }
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, redirect.as_str())
        .body(Body::empty())
        .unwrap()
}

/// RFC 8628 §3.1-3.2.
async fn device_authorization_endpoint(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let params = match read_form(&headers, body).await {
        Ok(p) => p,
        Err(e) => return bad_request("invalid_request", &e),
    };
    let mut st = shared.lock();
    let client_id = match authenticate(&mut st, &headers, &params) {
        Ok(id) => id,
        Err(resp) => return resp,
    };
    let device_code = st.next("device");
    let user_code = format!("USER-{}", st.next_id);
    let script: VecDeque<String> = st.device_script.drain(..).collect();
    st.devices.insert(device_code.clone(), (client_id, script));
    let body = json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": "http://127.0.0.1/device",
        "verification_uri_complete": format!("http://127.0.0.1/device?user_code={user_code}"),
        "expires_in": 600,
        "interval": 1,
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// RFC 8414 §3: the server's metadata, naming every endpoint it has.
async fn metadata_endpoint(AxState(shared): AxState<Arc<Shared>>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let base = format!("http://{host}");
    let mut st = shared.lock();
    st.metadata_requests += 1;
    if let Some(body) = st.metadata_body.clone() {
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
    }
    let issuer = st.metadata_issuer.clone().unwrap_or_else(|| base.clone());
    let body = json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "revocation_endpoint": format!("{base}/revoke"),
        "device_authorization_endpoint": format!("{base}/device_authorization"),
        "code_challenge_methods_supported": ["S256"],
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// RFC 7523 §3: the signature under the client's registered key, `iss` and
/// `sub` the client, `aud` this token endpoint, unexpired, `jti` unused.
fn verify_assertion(st: &mut State, params: &Params, assertion: &str) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: String,
        sub: String,
        jti: String,
    }
    if param(params, "client_assertion_type")
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err("wrong client_assertion_type".into());
    }
    let client_id = param(params, "client_id")
        .ok_or("client_id is required with an assertion here")?
        .to_owned();
    let pem = st
        .jwt_clients
        .get(&client_id)
        .ok_or("unknown assertion client")?
        .clone();
    let key = jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(std::slice::from_ref(&st.own_token_url));
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let verified = jsonwebtoken::decode::<Claims>(assertion, &key, &validation)
        .map_err(|e| format!("assertion rejected: {e}"))?;
    if verified.claims.sub != client_id || verified.claims.iss != client_id {
        return Err("iss and sub must be the client".into());
    }
    if !st.seen_jti.insert(verified.claims.jti) {
        return Err("assertion jti replayed".into());
    }
    st.last_client_auth = Some(ClientAuthSeen {
        method: ClientAuthMethod::PrivateKeyJwt,
        client_id: client_id.clone(),
    });
    Ok(client_id)
}
