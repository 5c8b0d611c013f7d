//! End-to-end behaviour of the vault over real mTLS against a real HTTP
//! provider double: the foundation's lifecycle, error model and bad input.

mod support;

use std::time::{Duration, SystemTime};

use credvault::{
    api::pb,
    crypto::{KeyVersion, Keyring},
    store::{CasOutcome, StoreKey},
};
use support::{
    provider::{ClientAuthMethod, Fault, ProviderDouble},
    vault::*,
};
use tonic::Code;

const CLIENT_ID: &str = "vault-client";
const CLIENT_SECRET: &str = "client-secret-value-7f3a";

async fn provider() -> ProviderDouble {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    provider
}

fn deposit_request(
    provider: &ProviderDouble,
    tenant: &str,
    subject: &str,
    refresh_token: &str,
    access: Option<(&str, SystemTime)>,
) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference(tenant, subject, "idp"),
        client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant(refresh_token, access),
        labels: Default::default(),
    }
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

#[tokio::test]
async fn deposit_serve_refresh_rotate_and_survive_a_restart() {
    let provider = provider().await;
    let dir = VaultDir::eager_refresh();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;

    let rt = provider.issue_refresh_token(CLIENT_ID);
    let deposited = client
        .deposit(deposit_request(
            &provider,
            "acme",
            "alice",
            &rt,
            Some(("at-deposited", in_an_hour())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deposited.generation, 1);
    assert_eq!(deposited.key_version, 1);

    // Valid for longer than the skew: served from cache, no upstream call.
    let token = client
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.access_token, "at-deposited");
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(provider.token_calls(), 0);

    // A caller that needs two hours forces a refresh; the provider rotates.
    let mut long = get_request("acme", "alice", "idp");
    long.min_valid_for = Some(prost_types::Duration {
        seconds: 7200,
        nanos: 0,
    });
    let refreshed = client
        .get_access_token(long.clone())
        .await
        .unwrap()
        .into_inner();
    assert_ne!(refreshed.access_token, "at-deposited");
    assert_eq!(provider.refresh_calls(), 1);
    let rotated = provider.current_refresh_token(&rt).unwrap();
    assert_ne!(rotated, rt);
    assert!(!provider.is_refresh_token_live(&rt));
    let expires_at = SystemTime::try_from(refreshed.expires_at.unwrap()).unwrap();
    assert!(expires_at > SystemTime::now() + Duration::from_secs(3000));

    // Restart on the same data dir: the refreshed token is served from storage.
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let after_restart = client
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after_restart.access_token, refreshed.access_token);
    assert_eq!(provider.refresh_calls(), 1);

    // The next refresh must present the *rotated* refresh token: the double
    // answers a replayed one with invalid_grant and kills the family.
    let again = client.get_access_token(long).await.unwrap().into_inner();
    assert_ne!(again.access_token, refreshed.access_token);
    assert_eq!(provider.refresh_calls(), 2);
    assert_eq!(
        provider.last_token_request().unwrap()["refresh_token"],
        rotated
    );
    assert_eq!(
        provider.last_client_auth().unwrap().method,
        ClientAuthMethod::Basic
    );
    vault.stop().await.unwrap();
}

#[tokio::test]
async fn a_provider_without_rotation_keeps_the_old_refresh_token() {
    let provider = provider().await;
    provider.set_rotation(false);
    let dir = VaultDir::eager_refresh();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit_request(&provider, "acme", "bob", &rt, None))
        .await
        .unwrap();
    // Needing two hours of a one-hour token refreshes every time.
    let mut long = get_request("acme", "bob", "idp");
    long.min_valid_for = Some(prost_types::Duration {
        seconds: 7200,
        nanos: 0,
    });
    client.get_access_token(long.clone()).await.unwrap();
    client.get_access_token(long).await.unwrap();
    assert_eq!(provider.refresh_calls(), 2);
    assert_eq!(provider.last_token_request().unwrap()["refresh_token"], rt);
}

#[tokio::test]
async fn invalid_grant_is_persisted_as_reauth_and_fails_fast() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit_request(&provider, "acme", "carol", &rt, None))
        .await
        .unwrap();
    // The user revoked consent at the provider.
    assert!(provider.revoke_grant(&rt));

    let status = client
        .get_access_token(get_request("acme", "carol", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let (reason, domain, metadata) = error_info(&status);
    assert_eq!(reason, "REAUTH_REQUIRED");
    assert_eq!(domain, "credvault");
    assert_eq!(metadata["cause"], "invalid_grant");
    assert_eq!(metadata["provider"], "idp");
    let calls = provider.token_calls();

    // Later calls fail the same way without asking the provider again, even
    // after a restart: the state is persisted.
    for _ in 0..3 {
        let status = client
            .get_access_token(get_request("acme", "carol", "idp"))
            .await
            .unwrap_err();
        assert_eq!(error_info(&status).0, "REAUTH_REQUIRED");
    }
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let status = client
        .get_access_token(get_request("acme", "carol", "idp"))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).2["cause"], "invalid_grant");
    assert_eq!(provider.token_calls(), calls);

    // A new Deposit replaces the dead grant and clears the state.
    let fresh = provider.issue_refresh_token(CLIENT_ID);
    let deposited = client
        .deposit(deposit_request(&provider, "acme", "carol", &fresh, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deposited.generation, 2);
    client
        .get_access_token(get_request("acme", "carol", "idp"))
        .await
        .unwrap();
}

#[tokio::test]
async fn upstream_outages_are_unavailable_with_retry_info_and_change_nothing() {
    let provider = provider().await;
    // Every fault below must reach the provider: no cool-down in between
    // (the cool-down has its own test in tests/hardening.rs).
    let dir = VaultDir::custom(
        "allow_http_loopback = true\nfailure_backoff_after = 100",
        "",
    );
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit_request(&provider, "acme", "dave", &rt, None))
        .await
        .unwrap();

    provider.fail_next(
        1,
        Fault::Status {
            status: 429,
            body: "slow down".into(),
            retry_after: Some(7),
        },
    );
    let status = client
        .get_access_token(get_request("acme", "dave", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE");
    use tonic_types::StatusExt;
    assert_eq!(
        status.get_error_details().retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(7))
    );

    for fault in [
        Fault::Status {
            status: 503,
            body: "<html>down</html>".into(),
            retry_after: None,
        },
        Fault::Garbage,
    ] {
        provider.fail_next(1, fault);
        let status = client
            .get_access_token(get_request("acme", "dave", "idp"))
            .await
            .unwrap_err();
        assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE", "{status:?}");
    }

    // A rejected client is not a dead grant.
    provider.fail_next(
        1,
        Fault::OAuthError {
            status: 401,
            error: "invalid_client".into(),
        },
    );
    let status = client
        .get_access_token(get_request("acme", "dave", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let (reason, _, metadata) = error_info(&status);
    assert_eq!(reason, "PROVIDER_REJECTED_CLIENT");
    assert_eq!(metadata["oauth_error"], "invalid_client");

    // The grant survived all of it.
    assert!(provider.is_refresh_token_live(&rt));
    client
        .get_access_token(get_request("acme", "dave", "idp"))
        .await
        .unwrap();
}

#[tokio::test]
async fn not_found_and_revoke() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;

    let status = client
        .get_access_token(get_request("acme", "nobody", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");

    let rt = provider.issue_refresh_token(CLIENT_ID);
    let mut request = deposit_request(&provider, "acme", "erin", &rt, None);
    request.client.as_mut().unwrap().revocation_endpoint = provider.revocation_url();
    client.deposit(request).await.unwrap();

    let revoked = client
        .revoke(pb::RevokeRequest {
            credential: reference("acme", "erin", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.existed);
    assert_eq!(revoked.upstream, pb::UpstreamRevocation::Revoked as i32);
    assert!(!provider.is_refresh_token_live(&rt));

    let status = client
        .get_access_token(get_request("acme", "erin", "idp"))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");
    let again = client
        .revoke(pb::RevokeRequest {
            credential: reference("acme", "erin", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed);
    assert_eq!(again.upstream, pb::UpstreamRevocation::NotConfigured as i32);
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_are_refused() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let rt = provider.issue_refresh_token(CLIENT_ID);

    // No client certificate at all: the TLS handshake fails.
    let anonymous = vault.channel(None, dir.pki.ca.ca_cert_pem()).await;
    let mut anonymous = pb::credential_vault_client::CredentialVaultClient::new(anonymous);
    let refused = anonymous
        .deposit(deposit_request(&provider, "acme", "frank", &rt, None))
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);

    // A certificate from another CA: refused the same way.
    let other = TestPki::generate();
    let foreign = vault
        .channel(Some(&other.clients["admin"]), dir.pki.ca.ca_cert_pem())
        .await;
    let mut foreign = pb::credential_vault_client::CredentialVaultClient::new(foreign);
    assert!(foreign
        .deposit(deposit_request(&provider, "acme", "frank", &rt, None))
        .await
        .is_err());

    // A trusted certificate whose identity the policy does not know: typed.
    let mut stranger = vault.client(&dir, "stranger").await;
    let status = stranger
        .deposit(deposit_request(&provider, "acme", "frank", &rt, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(error_info(&status).0, "ACTION_NOT_PERMITTED");

    // A certificate without any identity: UNAUTHENTICATED.
    let nameless = dir
        .pki
        .ca
        .issue_client(&credvault::dev::pki::ClientCertSpec::default())
        .unwrap_or_else(|_| {
            dir.pki
                .ca
                .issue_client(&credvault::dev::pki::ClientCertSpec {
                    common_name: Some("no-spiffe".into()),
                    ..Default::default()
                })
                .unwrap()
        });
    let nameless = vault
        .channel(Some(&nameless), dir.pki.ca.ca_cert_pem())
        .await;
    let status = pb::credential_vault_client::CredentialVaultClient::new(nameless)
        .deposit(deposit_request(&provider, "acme", "frank", &rt, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(error_info(&status).0, "UNAUTHENTICATED");

    // None of them stored anything.
    let mut admin = vault.client(&dir, "admin").await;
    let status = admin
        .get_access_token(get_request("acme", "frank", "idp"))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");
    assert_eq!(provider.token_calls(), 0);
}

#[tokio::test]
async fn callers_act_only_for_their_tenants() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);

    let status = acme
        .deposit(deposit_request(&provider, "globex", "gina", &rt, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let (reason, _, metadata) = error_info(&status);
    assert_eq!(reason, "TENANT_NOT_PERMITTED");
    assert_eq!(metadata["tenant"], "globex");

    // An empty tenant means "my only tenant".
    acme.deposit(deposit_request(
        &provider,
        "",
        "gina",
        &rt,
        Some(("at-gina", in_an_hour())),
    ))
    .await
    .unwrap();
    let mut admin = vault.client(&dir, "admin").await;
    let token = admin
        .get_access_token(get_request("acme", "gina", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.access_token, "at-gina");
    assert_eq!(
        error_info(
            &admin
                .get_access_token(get_request("globex", "gina", "idp"))
                .await
                .unwrap_err()
        )
        .0,
        "CREDENTIAL_NOT_FOUND"
    );
    // The admin may act for many tenants, so it must name one.
    let status = admin
        .get_access_token(get_request("", "gina", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["credential.tenant"]);
}

/// Stops the vault, edits the store directly, and restarts it.
async fn tamper(dir: &VaultDir, edit: impl FnOnce(&mut Vec<u8>)) {
    let store = dir.open_store().await;
    let key = StoreKey::new("acme", "henry", "idp");
    let current = store.get(&key).await.unwrap().unwrap();
    let mut value = current.value.clone();
    edit(&mut value);
    assert!(matches!(
        store
            .compare_and_swap(&key, Some(current.revision), Some(value))
            .await
            .unwrap(),
        CasOutcome::Written(_)
    ));
    store.flush().await.unwrap();
}

async fn deposit_henry(dir: &VaultDir, provider: &ProviderDouble) {
    let vault = TestVault::start(dir).await;
    let mut client = vault.client(dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    client
        .deposit(deposit_request(provider, "acme", "henry", &rt, None))
        .await
        .unwrap();
    vault.stop().await.unwrap();
}

#[tokio::test]
async fn a_record_tampered_under_a_present_key_requires_reauth() {
    let provider = provider().await;
    let dir = VaultDir::new();
    deposit_henry(&dir, &provider).await;
    tamper(&dir, |value| {
        let last = value.len() - 1;
        value[last] ^= 0x01;
    })
    .await;

    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let status = client
        .get_access_token(get_request("acme", "henry", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let (reason, _, metadata) = error_info(&status);
    assert_eq!(reason, "REAUTH_REQUIRED");
    assert_eq!(metadata["cause"], "undecryptable");
    assert_eq!(provider.token_calls(), 0);

    // A new Deposit still replaces it.
    let rt = provider.issue_refresh_token(CLIENT_ID);
    let deposited = client
        .deposit(deposit_request(&provider, "acme", "henry", &rt, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deposited.generation, 2);
}

#[tokio::test]
async fn a_corrupt_envelope_is_an_integrity_alarm_not_a_reauth() {
    let provider = provider().await;
    let dir = VaultDir::new();
    deposit_henry(&dir, &provider).await;
    // Overwrite the envelope magic (after the 8-byte clear generation).
    tamper(&dir, |value| value[8] ^= 0xff).await;

    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let status = client
        .get_access_token(get_request("acme", "henry", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    assert_eq!(error_info(&status).0, "RECORD_UNREADABLE");
}

#[tokio::test]
async fn a_record_under_a_missing_key_version_is_an_operator_error() {
    let provider = provider().await;
    let dir = VaultDir::new();
    deposit_henry(&dir, &provider).await;

    // Rotate to version 2 and destroy version 1 without rewrapping.
    let mut keyring = dir.keyring();
    let v2 = keyring.add().unwrap();
    keyring.promote(v2).unwrap();
    let v1 = KeyVersion::new(1).unwrap();
    keyring.retire(v1).unwrap();
    keyring.destroy(v1).unwrap();
    write_keyring(&dir.keyring_path(), &keyring);

    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let status = client
        .get_access_token(get_request("acme", "henry", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    let (reason, _, metadata) = error_info(&status);
    assert_eq!(reason, "KEY_VERSION_UNAVAILABLE");
    assert_eq!(metadata["key_version"], "1");

    // New deposits are sealed under the new primary.
    let rt = provider.issue_refresh_token(CLIENT_ID);
    let deposited = client
        .deposit(deposit_request(&provider, "acme", "ivy", &rt, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deposited.key_version, 2);
}

#[tokio::test]
async fn a_keyring_with_other_key_material_is_refused_at_start() {
    let provider = provider().await;
    let dir = VaultDir::new();
    deposit_henry(&dir, &provider).await;
    // Same version number (1), different key: every record would look
    // tampered. The vault must refuse to start instead.
    write_keyring(&dir.keyring_path(), &Keyring::generate());
    let error = TestVault::try_start(dir.config()).await.err().unwrap();
    let message = error.to_string();
    assert!(message.contains("key version 1"), "{message}");
    assert!(message.contains("fingerprint"), "{message}");
}

#[tokio::test]
async fn a_wrong_passphrase_or_broken_files_refuse_to_start_with_one_line() {
    let dir = VaultDir::new();
    std::fs::write(dir.path().join("keyring.passphrase"), "not the passphrase").unwrap();
    let message = TestVault::try_start(dir.config())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("keyring.cvk"), "{message}");
    assert!(message.contains("passphrase"), "{message}");
    assert!(!message.contains('\n'));

    let dir = VaultDir::new();
    std::fs::write(dir.keyring_path(), b"definitely not a keyring").unwrap();
    let message = TestVault::try_start(dir.config())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("keyring.cvk"), "{message}");

    let dir = VaultDir::new();
    std::fs::write(dir.path().join("policy.toml"), "[[rule]]\nidentity = 3\n").unwrap();
    let message = TestVault::try_start(dir.config())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("policy.toml"), "{message}");
}

#[tokio::test]
async fn bad_input_gets_invalid_field_and_changes_nothing() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    let good = || deposit_request(&provider, "acme", "judy", &rt, None);

    type Edit = Box<dyn Fn(&mut pb::DepositRequest)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("missing grant", Box::new(|r| r.grant = None), "grant"),
        (
            "empty subject",
            Box::new(|r| r.credential.as_mut().unwrap().subject.clear()),
            "credential.subject",
        ),
        (
            "oversized subject",
            Box::new(|r| r.credential.as_mut().unwrap().subject = "s".repeat(10_000)),
            "credential.subject",
        ),
        (
            "bad provider name",
            Box::new(|r| r.credential.as_mut().unwrap().provider = "no spaces".into()),
            "credential.provider",
        ),
        (
            "empty refresh token",
            Box::new(|r| r.grant = refresh_grant("", None)),
            "refresh_token.refresh_token",
        ),
        (
            "oversized refresh token",
            Box::new(|r| r.grant = refresh_grant(&"r".repeat(20_000), None)),
            "refresh_token.refresh_token",
        ),
        (
            "unknown auth method",
            Box::new(|r| r.client.as_mut().unwrap().auth_method = 42),
            "client.auth_method",
        ),
        (
            "non-URL token endpoint",
            Box::new(|r| r.client.as_mut().unwrap().token_endpoint = "not a url".into()),
            "client.token_endpoint",
        ),
        (
            "empty client id",
            Box::new(|r| r.client.as_mut().unwrap().client_id.clear()),
            "client.client_id",
        ),
        (
            "secret for a public client",
            Box::new(|r| {
                r.client.as_mut().unwrap().auth_method = pb::ClientAuthMethod::None as i32
            }),
            "client.client_secret",
        ),
        (
            "access token without expiry",
            Box::new(|r| {
                if let Some(pb::deposit_request::Grant::RefreshToken(g)) = r.grant.as_mut() {
                    g.access_token = "at".into();
                }
            }),
            "refresh_token.access_token_expires_at",
        ),
        (
            "scope with a space",
            Box::new(|r| r.client.as_mut().unwrap().scopes = vec!["a b".into()]),
            "client.scopes[0]",
        ),
        (
            "bad label key",
            Box::new(|r| {
                r.labels.insert("Bad Key".into(), "v".into());
            }),
            "labels",
        ),
        (
            "missing client without preset",
            Box::new(|r| r.client = None),
            "client",
        ),
    ];
    for (name, edit, field) in cases {
        let mut request = good();
        edit(&mut request);
        let status = client.deposit(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(error_info(&status).0, "INVALID_FIELD", "{name}");
        assert!(
            bad_fields(&status).iter().any(|f| f == field),
            "{name}: {:?}",
            bad_fields(&status)
        );
        // The message never echoes the refresh token or the client secret.
        assert!(!status.message().contains(&rt), "{name}");
        assert!(!status.message().contains(CLIENT_SECRET), "{name}");
    }

    let mut negative = get_request("acme", "judy", "idp");
    negative.min_valid_for = Some(prost_types::Duration {
        seconds: -5,
        nanos: 0,
    });
    let status = client.get_access_token(negative).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["min_valid_for"]);

    // Nothing was stored by any of it.
    let status = client
        .get_access_token(get_request("acme", "judy", "idp"))
        .await
        .unwrap_err();
    assert_eq!(error_info(&status).0, "CREDENTIAL_NOT_FOUND");
    assert_eq!(provider.token_calls(), 0);
}

#[tokio::test]
async fn token_endpoints_outside_the_policy_are_refused() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let rt = provider.issue_refresh_token(CLIENT_ID);
    for endpoint in [
        "https://169.254.169.254/latest/meta-data/token",
        "https://10.0.0.1/token",
        "http://idp.example.com/token",
    ] {
        let mut request = deposit_request(&provider, "acme", "kim", &rt, None);
        request.client.as_mut().unwrap().token_endpoint = endpoint.into();
        let status = client.deposit(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{endpoint}");
        assert_eq!(error_info(&status).0, "ENDPOINT_NOT_ALLOWED", "{endpoint}");
    }
}

#[tokio::test]
async fn client_auth_methods_reach_the_provider_as_configured() {
    let provider = provider().await;
    provider.register_client("public-app", None);
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let cases = [
        (
            pb::ClientAuthMethod::ClientSecretPost,
            CLIENT_ID,
            CLIENT_SECRET,
            ClientAuthMethod::Post,
        ),
        (
            pb::ClientAuthMethod::Unspecified,
            CLIENT_ID,
            CLIENT_SECRET,
            ClientAuthMethod::Basic,
        ),
        (
            pb::ClientAuthMethod::None,
            "public-app",
            "",
            ClientAuthMethod::None,
        ),
    ];
    for (i, (method, id, secret, seen)) in cases.into_iter().enumerate() {
        let rt = provider.issue_refresh_token(id);
        let subject = format!("user-{i}");
        let mut request = deposit_request(&provider, "acme", &subject, &rt, None);
        let oauth = request.client.as_mut().unwrap();
        oauth.auth_method = method as i32;
        oauth.client_id = id.into();
        oauth.client_secret = secret.into();
        oauth.scopes = vec!["read".into(), "write".into()];
        client.deposit(request).await.unwrap();
        let token = client
            .get_access_token(get_request("acme", &subject, "idp"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            provider.last_client_auth().unwrap().method,
            seen,
            "{method:?}"
        );
        assert_eq!(
            provider.last_token_request().unwrap()["scope"],
            "read write"
        );
        assert_eq!(token.scopes, ["read", "write"]);
    }
}

#[tokio::test]
async fn authorization_code_and_client_credentials_deposits() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;

    let verifier = "v".repeat(50);
    let challenge = support::provider::pkce_challenge(&verifier);
    let code = provider.issue_authorization_code(
        CLIENT_ID,
        "https://app.example/callback",
        Some(&challenge),
    );
    let mut request = deposit_request(&provider, "acme", "liam", "unused", None);
    request.grant = Some(pb::deposit_request::Grant::AuthorizationCode(
        pb::AuthorizationCodeGrant {
            code: code.clone(),
            redirect_uri: "https://app.example/callback".into(),
            code_verifier: verifier.clone(),
        },
    ));
    client.deposit(request.clone()).await.unwrap();
    let token = client
        .get_access_token(get_request("acme", "liam", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert!(provider.is_access_token_live(&token.access_token));
    assert_eq!(provider.calls_by_grant_type("authorization_code"), 1);

    // Codes are single use: a replay is a reauth, and nothing is overwritten.
    let status = client.deposit(request).await.unwrap_err();
    assert_eq!(error_info(&status).0, "REAUTH_REQUIRED");

    let mut request = deposit_request(&provider, "acme", "svc", "unused", None);
    request.grant = Some(pb::deposit_request::Grant::ClientCredentials(
        pb::ClientCredentialsGrant {},
    ));
    client.deposit(request).await.unwrap();
    let first = client
        .get_access_token(get_request("acme", "svc", "idp"))
        .await
        .unwrap()
        .into_inner();
    let mut long = get_request("acme", "svc", "idp");
    long.min_valid_for = Some(prost_types::Duration {
        seconds: 7200,
        nanos: 0,
    });
    let second = client.get_access_token(long).await.unwrap().into_inner();
    assert_ne!(first.access_token, second.access_token);
    assert_eq!(provider.calls_by_grant_type("client_credentials"), 2);
}

#[tokio::test]
async fn health_readiness_and_graceful_shutdown() {
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    assert_eq!(readyz(vault.ops_addr).await, Some(200));
    let channel = vault
        .channel(Some(&dir.pki.clients["acme"]), dir.pki.ca.ca_cert_pem())
        .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "credvault.v1.CredentialVault".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let ops = vault.ops_addr;
    vault.stop().await.unwrap();
    assert_eq!(readyz(ops).await, None);
}
