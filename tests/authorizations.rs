//! The consent flows the vault runs (DESIGN §5f), end to end: a real vault
//! (mTLS, its store), a provider double that implements `/authorize` (a
//! real 302 with `code`, `state` and `iss`) and device authorization, and a
//! "browser" that is an HTTP client following the authorization URL.

mod support;

use std::time::Duration;

use credvault::api::pb::{self, credential_vault_client::CredentialVaultClient};
use support::{provider::ProviderDouble, vault::*};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;

const CLIENT_ID: &str = "consent-client";
const CLIENT_SECRET: &str = "consent-client-secret-77d1";
const REDIRECT: &str = "https://app.example/callback";

fn client(provider: &ProviderDouble) -> Option<pb::OAuthClient> {
    let mut client = oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET)?;
    client.authorization_endpoint = provider.authorization_url();
    client.device_authorization_endpoint = provider.device_authorization_url();
    client.issuer = provider.issuer();
    Some(client)
}

fn begin(provider: &ProviderDouble, tenant: &str, subject: &str) -> pb::BeginAuthorizationRequest {
    pb::BeginAuthorizationRequest {
        credential: reference(tenant, subject, "idp"),
        client: client(provider),
        redirect_uri: REDIRECT.into(),
        scopes: vec!["read".into()],
        resources: vec!["https://mcp.example/".into()],
        extra_params: [("prompt".to_string(), "consent".to_string())].into(),
        labels: [("via".to_string(), "consent".to_string())].into(),
    }
}

/// What the user's browser does: follows the URL; the provider redirects
/// back with `code` (or `error`), `state` and `iss`.
async fn browse(authorization_url: &str) -> pb::CompleteAuthorizationRequest {
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let response = browser.get(authorization_url).send().await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        302,
        "{:?}",
        response.text().await
    );
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let url = url::Url::parse(&location).unwrap();
    assert!(location.starts_with(REDIRECT));
    let get = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    pb::CompleteAuthorizationRequest {
        state: get("state"),
        code: get("code"),
        error: get("error"),
        iss: get("iss"),
    }
}

fn reason(status: &tonic::Status) -> (Code, String) {
    let reason = status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default();
    (status.code(), reason)
}

async fn status_of(client: &mut CredentialVaultClient<Channel>, state: &str) -> pb::Authorization {
    client
        .get_authorization(pb::GetAuthorizationRequest {
            state: state.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_follow_complete_then_tokens_flow_and_the_state_is_single_use() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;

    let begun = acme
        .begin_authorization(begin(&provider, "", "alice"))
        .await
        .unwrap()
        .into_inner();
    assert!(begun.state.len() >= 43, "at least 256 bits, base64url");
    let sent = provider.authorize_requests();
    assert_eq!(
        sent.len(),
        0,
        "nothing reaches the provider before the browser"
    );
    let redirect = browse(&begun.authorization_url).await;
    let query = provider.authorize_requests().remove(0);
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["resource"], "https://mcp.example/");
    assert_eq!(query["prompt"], "consent");
    assert_eq!(query["scope"], "read");
    assert_eq!(redirect.state, begun.state);
    assert_eq!(
        status_of(&mut acme, &begun.state).await.status,
        pb::AuthorizationStatus::Pending as i32
    );

    let completed = acme
        .complete_authorization(redirect.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completed.generation, 1);
    assert_eq!(completed.credential.unwrap().tenant, "acme");
    // The provider exchanged the code only with the right PKCE verifier.
    let exchange = provider.last_token_request().unwrap();
    assert_eq!(exchange["grant_type"], "authorization_code");
    assert!(exchange["code_verifier"].len() >= 43);
    let token = acme
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert!(provider.is_access_token_live(&token.access_token));
    let done = status_of(&mut acme, &begun.state).await;
    assert_eq!(done.status, pb::AuthorizationStatus::Completed as i32);
    assert_eq!(done.generation, 1);

    // The same state again: refused, and the grant is untouched.
    let again = acme.complete_authorization(redirect).await.unwrap_err();
    assert_eq!(
        reason(&again),
        (Code::NotFound, "AUTHORIZATION_NOT_FOUND".into())
    );
    let same = acme
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.access_token, token.access_token);
    // An unknown state: the same answer.
    let unknown = acme
        .complete_authorization(pb::CompleteAuthorizationRequest {
            state: "x".repeat(43),
            code: "code".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&unknown),
        (Code::NotFound, "AUTHORIZATION_NOT_FOUND".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_is_bound_to_its_tenant_and_survives_a_restart() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut admin = vault.client(&dir, "admin").await;
    let begun = admin
        .begin_authorization(begin(&provider, "globex", "bob"))
        .await
        .unwrap()
        .into_inner();
    let redirect = browse(&begun.authorization_url).await;

    // A caller of another tenant cannot complete it, nor see it.
    let mut acme = vault.client(&dir, "acme").await;
    let refused = acme
        .complete_authorization(redirect.clone())
        .await
        .unwrap_err();
    assert_eq!(
        reason(&refused),
        (Code::NotFound, "AUTHORIZATION_NOT_FOUND".into())
    );
    let hidden = acme
        .get_authorization(pb::GetAuthorizationRequest {
            state: begun.state.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&hidden),
        (Code::NotFound, "AUTHORIZATION_NOT_FOUND".into())
    );

    // A restart between begin and complete: it still completes.
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut admin = vault.client(&dir, "admin").await;
    let completed = admin
        .complete_authorization(redirect)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completed.credential.unwrap().tenant, "globex");
    admin
        .get_access_token(get_request("globex", "bob", "idp"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_expired_and_mixed_up_authorizations_store_nothing() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        "[authorizations]\nlifetime = \"1s\"\nmax_pending_per_tenant = 5\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let not_stored = |subject: &str| get_request("acme", subject, "idp");

    // The user declines: DENIED with the provider's code.
    provider.set_deny_authorizations(true);
    let begun = acme
        .begin_authorization(begin(&provider, "", "declines"))
        .await
        .unwrap()
        .into_inner();
    let redirect = browse(&begun.authorization_url).await;
    assert_eq!(redirect.error, "access_denied");
    let denied = acme.complete_authorization(redirect).await.unwrap_err();
    assert_eq!(
        reason(&denied),
        (Code::FailedPrecondition, "AUTHORIZATION_DENIED".into())
    );
    let info = denied.get_error_details().error_info().unwrap().clone();
    assert_eq!(info.metadata["oauth_error"], "access_denied");
    let view = status_of(&mut acme, &begun.state).await;
    assert_eq!(view.status, pb::AuthorizationStatus::Denied as i32);
    assert_eq!(view.error, "access_denied");
    provider.set_deny_authorizations(false);

    // A redirect from another issuer (RFC 9207 mix-up): refused.
    let begun = acme
        .begin_authorization(begin(&provider, "", "mixup"))
        .await
        .unwrap()
        .into_inner();
    let mut redirect = browse(&begun.authorization_url).await;
    redirect.iss = "https://evil.example".into();
    let mixed = acme.complete_authorization(redirect).await.unwrap_err();
    assert_eq!(
        reason(&mixed),
        (Code::InvalidArgument, "INVALID_FIELD".into())
    );

    // Expired: past its lifetime, the state is not found and shows EXPIRED.
    let begun = acme
        .begin_authorization(begin(&provider, "", "late"))
        .await
        .unwrap()
        .into_inner();
    let redirect = browse(&begun.authorization_url).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let late = acme.complete_authorization(redirect).await.unwrap_err();
    assert_eq!(
        reason(&late),
        (Code::NotFound, "AUTHORIZATION_NOT_FOUND".into())
    );
    assert_eq!(
        status_of(&mut acme, &begun.state).await.status,
        pb::AuthorizationStatus::Expired as i32
    );
    for subject in ["declines", "mixup", "late"] {
        let absent = acme
            .get_access_token(not_stored(subject))
            .await
            .unwrap_err();
        assert_eq!(
            reason(&absent),
            (Code::NotFound, "CREDENTIAL_NOT_FOUND".into())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_begin_requests_get_typed_errors_and_floods_are_bounded() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        "[authorizations]\nmax_pending_per_tenant = 3\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let refused = |result: Result<
        tonic::Response<pb::BeginAuthorizationResponse>,
        tonic::Status,
    >| { reason(&result.unwrap_err()) };

    let mut overriding = begin(&provider, "", "x");
    overriding
        .extra_params
        .insert("code_challenge".into(), "mine".into());
    assert_eq!(
        refused(acme.begin_authorization(overriding).await),
        (Code::InvalidArgument, "INVALID_FIELD".into())
    );
    let relative = pb::BeginAuthorizationRequest {
        redirect_uri: "/callback".into(),
        ..begin(&provider, "", "x")
    };
    assert_eq!(
        refused(acme.begin_authorization(relative).await),
        (Code::InvalidArgument, "INVALID_FIELD".into())
    );
    let mut plain_http = begin(&provider, "", "x");
    plain_http.client.as_mut().unwrap().authorization_endpoint =
        "http://login.example.com/authorize".into();
    assert_eq!(
        refused(acme.begin_authorization(plain_http).await),
        (Code::InvalidArgument, "ENDPOINT_NOT_ALLOWED".into())
    );
    let mut no_endpoint = begin(&provider, "", "x");
    // Neither an endpoint nor an issuer to discover it from.
    let no_endpoint_client = no_endpoint.client.as_mut().unwrap();
    no_endpoint_client.authorization_endpoint = String::new();
    no_endpoint_client.issuer = String::new();
    assert_eq!(
        refused(acme.begin_authorization(no_endpoint).await),
        (Code::InvalidArgument, "INVALID_FIELD".into())
    );

    for i in 0..3 {
        acme.begin_authorization(begin(&provider, "", &format!("f{i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        refused(acme.begin_authorization(begin(&provider, "", "f3")).await),
        (Code::ResourceExhausted, "OVERLOADED".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_polls_device_authorizations_through_pending_slow_down_and_approval() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let device = |subject: &str| pb::BeginDeviceAuthorizationRequest {
        credential: reference("acme", subject, "idp"),
        client: client(&provider),
        scopes: vec!["read".into()],
        resources: Vec::new(),
        labels: Default::default(),
    };
    let watcher = acme.clone();
    let settle = |state: String| {
        let mut acme = watcher.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let view = status_of(&mut acme, &state).await;
                if view.status != pb::AuthorizationStatus::Pending as i32 {
                    return view;
                }
                assert!(tokio::time::Instant::now() < deadline, "still pending");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    provider.set_device_script(&["authorization_pending", "slow_down", "approve"]);
    let begun = acme
        .begin_device_authorization(device("tv"))
        .await
        .unwrap()
        .into_inner();
    assert!(begun.user_code.starts_with("USER-"));
    let view = settle(begun.state.clone()).await;
    assert_eq!(view.status, pb::AuthorizationStatus::Completed as i32);
    acme.get_access_token(get_request("acme", "tv", "idp"))
        .await
        .unwrap();
    // The interval (1 s) was honoured, and slow_down added 5 s to it.
    let polls = provider.device_polls();
    assert_eq!(polls.len(), 3);
    assert!(polls[1] - polls[0] >= Duration::from_millis(950));
    assert!(polls[2] - polls[1] >= Duration::from_millis(5900));

    // A restart while the user has not approved yet: polling goes on.
    provider.set_device_script(&["authorization_pending", "authorization_pending", "approve"]);
    let across = acme
        .begin_device_authorization(device("restart"))
        .await
        .unwrap()
        .into_inner();
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while status_of(&mut acme, &across.state).await.status
        != pb::AuthorizationStatus::Completed as i32
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no completion after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watcher = acme.clone();
    let settle = |state: String| {
        let mut acme = watcher.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let view = status_of(&mut acme, &state).await;
                if view.status != pb::AuthorizationStatus::Pending as i32 {
                    return view;
                }
                assert!(tokio::time::Instant::now() < deadline, "still pending");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    provider.set_device_script(&["access_denied"]);
    let denied = acme
        .begin_device_authorization(device("no"))
        .await
        .unwrap()
        .into_inner();
    let view = settle(denied.state).await;
    assert_eq!(view.status, pb::AuthorizationStatus::Denied as i32);

    provider.set_device_script(&["expired_token"]);
    let expired = acme
        .begin_device_authorization(device("slow"))
        .await
        .unwrap()
        .into_inner();
    let view = settle(expired.state).await;
    assert_eq!(view.status, pb::AuthorizationStatus::Expired as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_alone_is_enough_and_a_mismatched_issuer_is_refused() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    // Only the issuer: every endpoint comes from its RFC 8414 metadata.
    let issuer_only = || pb::OAuthClient {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        issuer: provider.issuer(),
        ..Default::default()
    };
    let request = pb::BeginAuthorizationRequest {
        client: Some(issuer_only()),
        ..begin(&provider, "", "discovered")
    };
    let begun = acme
        .begin_authorization(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(begun
        .authorization_url
        .starts_with(&provider.authorization_url()));
    let redirect = browse(&begun.authorization_url).await;
    acme.complete_authorization(redirect).await.unwrap();
    acme.get_access_token(get_request("acme", "discovered", "idp"))
        .await
        .unwrap();
    // Cached: a second begin does not fetch it again.
    acme.begin_authorization(request).await.unwrap();
    assert_eq!(provider.metadata_requests(), 1);

    // Metadata naming another issuer: refused, nothing stored or cached.
    let other = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    other.set_metadata_issuer("https://evil.example");
    let mismatched = pb::DepositRequest {
        credential: reference("acme", "mixup", "idp"),
        client: Some(pb::OAuthClient {
            issuer: other.issuer(),
            ..issuer_only()
        }),
        grant: refresh_grant("rt", None),
        labels: Default::default(),
    };
    let refused = acme.deposit(mismatched.clone()).await.unwrap_err();
    assert_eq!(
        reason(&refused),
        (Code::FailedPrecondition, "PROVIDER_REJECTED_CLIENT".into())
    );
    let info = refused.get_error_details().error_info().unwrap().clone();
    assert_eq!(info.metadata["oauth_error"], "discovery_issuer_mismatch");
    acme.deposit(mismatched).await.unwrap_err();
    assert_eq!(
        other.metadata_requests(),
        2,
        "a refused answer is not cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_preset_a_begin_call_needs_only_the_reference() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "[providers.idp]\ntoken_endpoint = \"{}\"\nauthorization_endpoint = \"{}\"\n\
             issuer = \"{}\"\nredirect_uri = \"{REDIRECT}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{CLIENT_SECRET}\"\nscopes = [\"read\", \"write\"]\n",
            provider.token_url(),
            provider.authorization_url(),
            provider.issuer(),
        ),
    );
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let begun = acme
        .begin_authorization(pb::BeginAuthorizationRequest {
            credential: reference("", "preset-user", "idp"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let redirect = browse(&begun.authorization_url).await;
    let query = provider.authorize_requests().remove(0);
    assert_eq!(query["scope"], "read write", "the preset's default scopes");
    assert_eq!(query["redirect_uri"], REDIRECT, "the preset's redirect URI");
    let completed = acme
        .complete_authorization(redirect)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completed.generation, 1);
    acme.get_access_token(get_request("acme", "preset-user", "idp"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_jwt_preset_signs_a_fresh_assertion_for_every_request() {
    let provider = ProviderDouble::start().await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    provider.register_jwt_client("jwt-client", &key.public_key_pem());
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "[providers.idp]\ntoken_endpoint = \"{}\"\nauthorization_endpoint = \"{}\"\n\
             redirect_uri = \"{REDIRECT}\"\nclient_id = \"jwt-client\"\n\
             auth_method = \"private_key_jwt\"\nprivate_key_file = \"client-key.pem\"\n",
            provider.token_url(),
            provider.authorization_url(),
        ),
    );
    std::fs::write(dir.path().join("client-key.pem"), key.serialize_pem()).unwrap();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    // The code exchange authenticates with an assertion…
    let begun = acme
        .begin_authorization(pb::BeginAuthorizationRequest {
            credential: reference("", "signed", "idp"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let redirect = browse(&begun.authorization_url).await;
    acme.complete_authorization(redirect).await.unwrap();
    assert_eq!(provider.accepted_assertions(), 1);
    let exchange = provider.last_token_request().unwrap();
    assert!(!exchange.contains_key("client_secret"));
    // …and so does every refresh, each with a new jti (the double refuses
    // a replayed one).
    for _ in 0..2 {
        acme.get_access_token(pb::GetAccessTokenRequest {
            min_valid_for: Some(prost_types::Duration {
                seconds: 7200,
                nanos: 0,
            }),
            force_refresh: true,
            ..get_request("acme", "signed", "idp")
        })
        .await
        .unwrap();
    }
    assert_eq!(provider.accepted_assertions(), 3);
}
