//! The token lifecycle at production grade: single-flight, write-back races,
//! rotation races, failure classification, forced refreshes, presets and the
//! endpoint policy, against the real vault and a real HTTP provider double.
//! Races are made deterministic by holding the provider's response.

mod support;

use std::time::{Duration, SystemTime};

use credvault::api::pb::{self, credential_vault_client::CredentialVaultClient};
use support::{
    provider::{Fault, ProviderDouble},
    vault::*,
};
use tonic::{transport::Channel, Code};

const CLIENT_ID: &str = "vault-client";
const CLIENT_SECRET: &str = "client-secret-2b9d";

async fn provider() -> ProviderDouble {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    provider
}

fn deposit(
    provider: &ProviderDouble,
    subject: &str,
    refresh_token: &str,
    access: Option<(&str, SystemTime)>,
) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference("acme", subject, "idp"),
        client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant(refresh_token, access),
        labels: Default::default(),
    }
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

fn get(subject: &str) -> pb::GetAccessTokenRequest {
    get_request("acme", subject, "idp")
}

fn forced(subject: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        force_refresh: true,
        ..get(subject)
    }
}

/// Needs more than the provider's one-hour tokens: always refreshes.
fn needing_two_hours(subject: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        min_valid_for: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
        ..get(subject)
    }
}

async fn start() -> (
    ProviderDouble,
    VaultDir,
    TestVault,
    CredentialVaultClient<Channel>,
) {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let client = vault.client(&dir, "admin").await;
    (provider, dir, vault, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_callers_cause_one_refresh() {
    let (provider, _dir, _vault, mut client) = start().await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "alice", &rt, None))
        .await
        .unwrap();

    let hold = provider.hold_token_calls();
    let mut callers = Vec::new();
    for _ in 0..200 {
        let mut client = client.clone();
        callers.push(tokio::spawn(async move {
            client.get_access_token(get("alice")).await
        }));
    }
    provider.wait_for_token_calls(1).await;
    // Give every caller time to arrive and join the flight in progress.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold.release();

    let mut tokens = std::collections::HashSet::new();
    for caller in callers {
        tokens.insert(caller.await.unwrap().unwrap().into_inner().access_token);
    }
    assert_eq!(tokens.len(), 1, "all 200 callers get the same token");
    assert_eq!(provider.token_calls(), 1, "exactly one upstream refresh");
    assert!(provider.is_access_token_live(tokens.iter().next().unwrap()));
}

#[tokio::test]
async fn a_deposit_during_a_refresh_wins() {
    let (provider, _dir, _vault, mut client) = start().await;
    let old = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "bob", &old, None))
        .await
        .unwrap();

    let hold = provider.hold_token_calls();
    let mut getter = client.clone();
    let pending = tokio::spawn(async move { getter.get_access_token(get("bob")).await });
    provider.wait_for_token_calls(1).await;

    // The new grant lands while the old one is being refreshed: the write
    // lock is not held across the upstream call, so this does not wait.
    let new = provider.issue_refresh_token(CLIENT_ID);
    let deposited = tokio::time::timeout(
        Duration::from_secs(2),
        client.deposit(deposit(
            &provider,
            "bob",
            &new,
            Some(("at-new", in_an_hour())),
        )),
    )
    .await
    .expect("a deposit must not wait for an upstream refresh")
    .unwrap()
    .into_inner();
    assert_eq!(deposited.generation, 2);
    hold.release();

    // The refresh of the old grant is discarded; its caller gets the new grant's token.
    let token = pending.await.unwrap().unwrap().into_inner();
    assert_eq!(token.access_token, "at-new");
    assert_eq!(
        client
            .get_access_token(get("bob"))
            .await
            .unwrap()
            .into_inner()
            .access_token,
        "at-new"
    );
    // And the stored refresh token is the newly deposited one.
    client
        .get_access_token(needing_two_hours("bob"))
        .await
        .unwrap();
    assert_eq!(provider.last_token_request().unwrap()["refresh_token"], new);
}

#[tokio::test]
async fn a_revoke_during_a_refresh_is_never_undone() {
    let (provider, _dir, _vault, mut client) = start().await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "carol", &rt, None))
        .await
        .unwrap();

    let hold = provider.hold_token_calls();
    let mut getter = client.clone();
    let pending = tokio::spawn(async move { getter.get_access_token(get("carol")).await });
    provider.wait_for_token_calls(1).await;
    let revoked = client
        .revoke(pb::RevokeRequest {
            credential: reference("acme", "carol", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.existed);
    hold.release();

    let status = pending.await.unwrap().unwrap_err();
    assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");
    for _ in 0..2 {
        let status = client.get_access_token(get("carol")).await.unwrap_err();
        assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");
    }
}

#[tokio::test]
async fn a_rotation_race_is_not_taken_for_a_dead_grant() {
    let (provider, _dir, _vault, mut client) = start().await;
    let first = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "dan", &first, None))
        .await
        .unwrap();

    let hold = provider.hold_token_calls();
    let mut getter = client.clone();
    let pending = tokio::spawn(async move { getter.get_access_token(get("dan")).await });
    provider.wait_for_token_calls(1).await;
    // Meanwhile the grant moved on: the old refresh token died and a new one
    // was deposited. The held refresh will get invalid_grant for the old one.
    provider.revoke_grant(&first);
    let second = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "dan", &second, None))
        .await
        .unwrap();
    hold.release();

    let token = pending
        .await
        .unwrap()
        .expect("a benign race is not a reauth");
    assert!(provider.is_access_token_live(&token.into_inner().access_token));
    assert_eq!(
        provider.last_token_request().unwrap()["refresh_token"],
        second
    );
    client.get_access_token(get("dan")).await.unwrap();
}

#[tokio::test]
async fn a_rate_limit_then_a_dead_grant_is_reported_as_reauth() {
    let (provider, _dir, _vault, mut client) = start().await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "eve", &rt, None))
        .await
        .unwrap();
    provider.fail_next(
        1,
        Fault::Status {
            status: 429,
            body: String::new(),
            retry_after: Some(2),
        },
    );
    let status = client.get_access_token(get("eve")).await.unwrap_err();
    assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE");
    provider.revoke_grant(&rt);
    let status = client.get_access_token(get("eve")).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "REAUTH_REQUIRED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_are_coalesced_and_rate_limited() {
    let (provider, _dir, _vault, mut client) = start().await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(
            &provider,
            "fay",
            &rt,
            Some(("at-rejected", in_an_hour())),
        ))
        .await
        .unwrap();

    // The caller's token was rejected upstream: a refresh even though the
    // cached token looks valid; concurrent forced callers share it.
    let mut callers = Vec::new();
    for _ in 0..20 {
        let mut client = client.clone();
        callers.push(tokio::spawn(async move {
            client.get_access_token(forced("fay")).await
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for caller in callers {
        tokens.insert(caller.await.unwrap().unwrap().into_inner().access_token);
    }
    assert_eq!(tokens.len(), 1);
    assert!(!tokens.contains("at-rejected"));
    assert_eq!(provider.refresh_calls(), 1);

    // A client looping on 401 gets the recent token, not a new refresh.
    for _ in 0..5 {
        let again = client
            .get_access_token(forced("fay"))
            .await
            .unwrap()
            .into_inner();
        assert!(tokens.contains(&again.access_token));
    }
    assert_eq!(provider.refresh_calls(), 1);
}

#[tokio::test]
async fn a_forced_refresh_interval_of_zero_refreshes_every_time() {
    let provider = provider().await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        "[tokens]\nforce_refresh_interval = \"0s\"\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "gil", &rt, Some(("at-0", in_an_hour()))))
        .await
        .unwrap();
    for _ in 0..3 {
        client.get_access_token(forced("gil")).await.unwrap();
    }
    assert_eq!(provider.refresh_calls(), 3);
}

#[tokio::test]
async fn a_missing_expires_in_gets_the_configured_default_lifetime() {
    let provider = provider().await;
    provider.set_expires_in(None);
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        "[tokens]\ndefault_lifetime = \"45m\"\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "hal", &rt, None))
        .await
        .unwrap();
    let token = client
        .get_access_token(get("hal"))
        .await
        .unwrap()
        .into_inner();
    let expires_at = SystemTime::try_from(token.expires_at.unwrap()).unwrap();
    let lifetime = expires_at.duration_since(SystemTime::now()).unwrap();
    assert!(
        lifetime > Duration::from_secs(44 * 60) && lifetime <= Duration::from_secs(45 * 60),
        "{lifetime:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_provider_times_out_without_blocking_other_credentials() {
    let (provider, _dir, _vault, mut client) = start().await;
    let slow = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "ian", &slow, None))
        .await
        .unwrap();
    client
        .deposit(deposit(
            &provider,
            "jo",
            &provider.issue_refresh_token(CLIENT_ID),
            Some(("at-jo", in_an_hour())),
        ))
        .await
        .unwrap();

    provider.fail_next(1, Fault::Hang);
    let mut hung = client.clone();
    let started = std::time::Instant::now();
    let pending = tokio::spawn(async move { hung.get_access_token(get("ian")).await });
    provider.wait_for_token_calls(1).await;
    // Another credential is served while the first one's provider hangs.
    let other = client
        .get_access_token(get("jo"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.access_token, "at-jo");

    let status = pending.await.unwrap().unwrap_err();
    assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE");
    // upstream.request_timeout is 3s in the test config.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        provider.is_refresh_token_live(&slow),
        "a timeout is never a reauth"
    );
}

#[tokio::test]
async fn oversized_and_non_oauth_answers_are_classified() {
    let (provider, _dir, _vault, mut client) = start().await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit(&provider, "kay", &rt, None))
        .await
        .unwrap();

    provider.fail_next(
        1,
        Fault::Status {
            status: 200,
            body: format!("{{\"access_token\":\"{}\"}}", "x".repeat(200_000)),
            retry_after: None,
        },
    );
    let status = client.get_access_token(get("kay")).await.unwrap_err();
    assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE");

    provider.fail_next(
        1,
        Fault::Status {
            status: 400,
            body: "<html>bad request</html>".into(),
            retry_after: None,
        },
    );
    let status = client.get_access_token(get("kay")).await.unwrap_err();
    let (reason, _, metadata) = error_info(&status);
    assert_eq!(reason, "PROVIDER_REJECTED_CLIENT");
    assert_eq!(metadata["oauth_error"], "http_400");

    for error in ["unauthorized_client", "unsupported_grant_type"] {
        provider.fail_next(
            1,
            Fault::OAuthError {
                status: 400,
                error: error.into(),
            },
        );
        let status = client.get_access_token(get("kay")).await.unwrap_err();
        assert_eq!(error_info(&status).0, "PROVIDER_REJECTED_CLIENT");
        assert_eq!(error_info(&status).2["oauth_error"], error);
    }

    provider.fail_next(
        1,
        Fault::OAuthError {
            status: 400,
            error: "invalid_scope".into(),
        },
    );
    let status = client.get_access_token(get("kay")).await.unwrap_err();
    assert_eq!(error_info(&status).0, "REAUTH_REQUIRED");
    assert_eq!(error_info(&status).2["cause"], "invalid_scope");
}

#[tokio::test]
async fn revocation_reports_failure_upstream_and_still_deletes() {
    let (provider, _dir, _vault, mut client) = start().await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    let mut request = deposit(&provider, "lou", &rt, None);
    request.client.as_mut().unwrap().revocation_endpoint = provider.revocation_url();
    client.deposit(request).await.unwrap();
    provider.fail_next_revocation(
        1,
        Fault::Status {
            status: 503,
            body: String::new(),
            retry_after: None,
        },
    );
    let revoked = client
        .revoke(pb::RevokeRequest {
            credential: reference("acme", "lou", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.existed);
    assert_eq!(revoked.upstream, pb::UpstreamRevocation::Failed as i32);
    let status = client.get_access_token(get("lou")).await.unwrap_err();
    assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");
}

#[tokio::test]
async fn a_provider_preset_lets_a_deposit_omit_the_client() {
    let provider = provider().await;
    let dir = VaultDir::custom("allow_http_loopback = true", "");
    std::fs::write(dir.path().join("idp-secret"), format!("{CLIENT_SECRET}\n")).unwrap();
    let config = dir.path().join("credvault.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[providers.idp]\ntoken_endpoint = \"{}\"\nrevocation_endpoint = \"{}\"\n\
         auth_method = \"client_secret_post\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret_file = \"idp-secret\"\nscopes = [\"read\"]\n",
        provider.token_url(),
        provider.revocation_url()
    ));
    std::fs::write(&config, text).unwrap();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;

    let rt = provider.issue_refresh_token(CLIENT_ID);
    let mut request = deposit(&provider, "max", &rt, None);
    request.client = None;
    client.deposit(request).await.unwrap();
    let token = client
        .get_access_token(get("max"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.scopes, ["read"]);
    let seen = provider.last_token_request().unwrap();
    assert_eq!(seen["client_id"], CLIENT_ID);
    assert_eq!(seen["scope"], "read");

    let revoked = client
        .revoke(pb::RevokeRequest {
            credential: reference("acme", "max", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.upstream, pb::UpstreamRevocation::Revoked as i32);

    // Without a preset of that name, the client is required.
    let mut request = deposit(&provider, "max", &rt, None);
    request.client = None;
    request.credential.as_mut().unwrap().provider = "other".into();
    let status = client.deposit(request).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["client"]);
}

#[tokio::test]
async fn names_resolving_to_internal_addresses_are_refused_at_deposit() {
    // No loopback allowance: `localhost` resolves to 127.0.0.1 and is refused.
    let provider = provider().await;
    let dir = VaultDir::custom("", "");
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    for endpoint in [
        "https://localhost:8443/token",
        "https://169.254.169.254/token",
        "https://10.0.0.1/token",
        "https://[::ffff:169.254.169.254]/token",
    ] {
        let mut request = deposit(&provider, "ned", &rt, None);
        request.client.as_mut().unwrap().token_endpoint = endpoint.into();
        let status = client.deposit(request).await.unwrap_err();
        assert_eq!(error_info(&status).0, "ENDPOINT_NOT_ALLOWED", "{endpoint}");
    }
    assert_eq!(provider.token_calls(), 0);
}

#[tokio::test]
async fn tokens_nearing_expiry_are_refreshed_in_the_background_when_enabled() {
    let provider = provider().await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        "[tokens]\nrefresh_ahead = true\nrefresh_ahead_interval = \"100ms\"\nrefresh_ahead_window = \"90m\"\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    // Valid for an hour: fine for callers, but inside the 90-minute window.
    client
        .deposit(deposit(
            &provider,
            "olga",
            &rt,
            Some(("at-old", in_an_hour())),
        ))
        .await
        .unwrap();
    // Valid for a day: outside the window, left alone.
    let far = SystemTime::now() + Duration::from_secs(86_400);
    client
        .deposit(deposit(
            &provider,
            "pete",
            &provider.issue_refresh_token(CLIENT_ID),
            Some(("at-far", far)),
        ))
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while provider.refresh_calls() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no background refresh happened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More sweeps pass: the refreshed token (a fresh hour) is still inside
    // the 90-minute window, but it is not half used, so it is left alone;
    // the far credential is never touched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(provider.refresh_calls(), 1);
    let token = client
        .get_access_token(get("olga"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(token.access_token, "at-old");
    assert_eq!(
        client
            .get_access_token(get("pete"))
            .await
            .unwrap()
            .into_inner()
            .access_token,
        "at-far"
    );
    assert_eq!(provider.last_token_request().unwrap()["refresh_token"], rt);
}
