//! The demo OAuth provider `credvault dev` serves on loopback, so a
//! newcomer sees the whole life of a credential with nothing else running:
//! consent, refresh with rotation, revocation. Dev only; `serve` never
//! starts it.
//!
//! - `GET /authorize`: a one-click approve page (RFC 6749 §4.1, PKCE S256
//!   required); `&approve=yes` redirects to the redirect URI with `code`,
//!   `state` and `iss` (RFC 9207), `&approve=no` with `error=access_denied`.
//! - `GET /callback`: the demo preset's redirect URI: shows the `state` and
//!   `code` to pass to CompleteAuthorization.
//! - `POST /token`: the authorization code (verifier checked), refresh (a
//!   new refresh token every time; a rotated one is `invalid_grant`) and
//!   device code grants; access tokens live [`ACCESS_LIFETIME`].
//! - `POST /revoke` (RFC 7009), `POST /device_authorization` and
//!   `GET /device?user_code=..&approve=yes` (RFC 8628), and
//!   `/.well-known/oauth-authorization-server` (RFC 8414).
//!
//! It holds everything in memory: a restart forgets its grants (and the
//! vault then sees `invalid_grant`, which is the point of a demo too).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Form, Query, State},
    http::{header, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
    Json, Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Short, so a newcomer sees a refresh within minutes (or at once, asking
/// for more validity than this).
pub const ACCESS_LIFETIME: u64 = 300;
/// The demo client (public: PKCE, no secret).
pub const CLIENT_ID: &str = "demo";

#[derive(Default)]
struct Demo {
    /// code -> (PKCE challenge, redirect URI)
    codes: HashMap<String, (String, String)>,
    /// refresh token -> still current
    refresh_tokens: HashMap<String, bool>,
    /// device code -> (user code, approved: None while pending)
    devices: HashMap<String, (String, Option<bool>)>,
}

type Shared = Arc<(Mutex<Demo>, String)>;

fn token(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}-{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn oauth_error(error: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": error })),
    )
        .into_response()
}

/// Starts the provider on `listener`; it runs until the process ends.
/// Answers its base URL.
pub fn start(listener: tokio::net::TcpListener) -> std::io::Result<String> {
    let addr: SocketAddr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let shared: Shared = Arc::new((Mutex::new(Demo::default()), base.clone()));
    let app = Router::new()
        .route("/authorize", get(authorize))
        .route("/callback", get(callback))
        .route("/token", post(token_endpoint))
        .route("/revoke", post(revoke))
        .route("/device_authorization", post(device_authorization))
        .route("/device", get(device))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .with_state(shared);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the demo provider stopped");
        }
    });
    Ok(base)
}

async fn metadata(State(shared): State<Shared>) -> Response {
    let base = &shared.1;
    Json(serde_json::json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "revocation_endpoint": format!("{base}/revoke"),
        "device_authorization_endpoint": format!("{base}/device_authorization"),
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

async fn authorize(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let get = |name: &str| query.get(name).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID
        || get("response_type") != "code"
        || get("code_challenge_method") != "S256"
    {
        return oauth_error("invalid_request");
    }
    let Ok(mut back) = url::Url::parse(&get("redirect_uri")) else {
        return oauth_error("invalid_request");
    };
    match get("approve").as_str() {
        "yes" => {
            let code = token("code");
            shared
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .codes
                .insert(code.clone(), (get("code_challenge"), get("redirect_uri")));
            back.query_pairs_mut().append_pair("code", &code);
        }
        "no" => {
            back.query_pairs_mut().append_pair("error", "access_denied");
        }
        _ => {
            let mut approve = url::Url::parse(&format!("{}/authorize", shared.1)).unwrap_or(back);
            approve.query_pairs_mut().extend_pairs(query.iter());
            let yes = format!("{approve}&approve=yes");
            let no = format!("{approve}&approve=no");
            return Html(format!(
                "<!doctype html><title>credvault demo provider</title>\
                 <h1>Let credvault's demo app act for you?</h1>\
                 <p>Scopes: {}</p>\
                 <p><a href=\"{yes}\">Approve</a> &middot; <a href=\"{no}\">Decline</a></p>",
                html_escape(&get("scope"))
            ))
            .into_response();
        }
    }
    back.query_pairs_mut()
        .append_pair("state", &get("state"))
        .append_pair("iss", &shared.1);
    Redirect::to(back.as_str()).into_response()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn callback(Query(query): Query<HashMap<String, String>>) -> Response {
    let get = |name: &str| query.get(name).cloned().unwrap_or_default();
    let body = serde_json::json!({
        "state": get("state"),
        "code": get("code"),
        "error": get("error"),
        "iss": get("iss"),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(
            "{body}\n\nPass it on: grpcurl ... -d '{body}' localhost:50051 \
             credvault.v1.CredentialVault/CompleteAuthorization\n"
        ),
    )
        .into_response()
}

fn issue(demo: &mut Demo) -> Response {
    let refresh = token("demo-rt");
    demo.refresh_tokens.insert(refresh.clone(), true);
    Json(serde_json::json!({
        "access_token": token("demo-at"),
        "token_type": "Bearer",
        "expires_in": ACCESS_LIFETIME,
        "refresh_token": refresh,
        "scope": "profile",
    }))
    .into_response()
}

async fn token_endpoint(
    State(shared): State<Shared>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let get = |name: &str| form.get(name).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({ "error": "invalid_client" })),
        )
            .into_response();
    }
    let mut demo = shared.0.lock().unwrap_or_else(|e| e.into_inner());
    match get("grant_type").as_str() {
        "authorization_code" => {
            let Some((challenge, redirect_uri)) = demo.codes.remove(&get("code")) else {
                return oauth_error("invalid_grant");
            };
            let verified = URL_SAFE_NO_PAD.encode(Sha256::digest(get("code_verifier").as_bytes()));
            if verified != challenge || redirect_uri != get("redirect_uri") {
                return oauth_error("invalid_grant");
            }
            issue(&mut demo)
        }
        "refresh_token" => match demo.refresh_tokens.get_mut(&get("refresh_token")) {
            // Rotation: the token used is spent.
            Some(current) if *current => {
                *current = false;
                issue(&mut demo)
            }
            _ => oauth_error("invalid_grant"),
        },
        "urn:ietf:params:oauth:grant-type:device_code" => {
            match demo
                .devices
                .get(&get("device_code"))
                .map(|(_, approved)| *approved)
            {
                Some(None) => oauth_error("authorization_pending"),
                Some(Some(false)) => oauth_error("access_denied"),
                Some(Some(true)) => {
                    demo.devices.remove(&get("device_code"));
                    issue(&mut demo)
                }
                None => oauth_error("expired_token"),
            }
        }
        _ => oauth_error("unsupported_grant_type"),
    }
}

async fn revoke(
    State(shared): State<Shared>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(token) = form.get("token") {
        let mut demo = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(current) = demo.refresh_tokens.get_mut(token) {
            *current = false;
        }
    }
    StatusCode::OK.into_response()
}

async fn device_authorization(
    State(shared): State<Shared>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return oauth_error("invalid_client");
    }
    let device_code = token("device");
    let user_code = token("").trim_start_matches('-')[..8].to_uppercase();
    shared
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .devices
        .insert(device_code.clone(), (user_code.clone(), None));
    let base = &shared.1;
    Json(serde_json::json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?user_code={user_code}"),
        "expires_in": 600,
        "interval": 2,
    }))
    .into_response()
}

async fn device(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let user_code = query.get("user_code").cloned().unwrap_or_default();
    let decision = match query.get("approve").map(String::as_str) {
        Some("yes") => Some(true),
        Some("no") => Some(false),
        _ => None,
    };
    let base = &shared.1;
    let mut demo = shared.0.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_, approved)) = demo
        .devices
        .values_mut()
        .find(|(code, _)| *code == user_code)
    else {
        return Html("<p>Unknown or expired code.</p>".to_owned()).into_response();
    };
    match decision {
        Some(decision) => {
            *approved = Some(decision);
            Html("<p>Done. You can close this page.</p>".to_owned()).into_response()
        }
        None => Html(format!(
            "<p>Connect the device with code {code}?</p>\
             <p><a href=\"{base}/device?user_code={code}&approve=yes\">Approve</a> &middot; \
             <a href=\"{base}/device?user_code={code}&approve=no\">Decline</a></p>",
            code = html_escape(&user_code)
        ))
        .into_response(),
    }
}
