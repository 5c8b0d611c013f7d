//! `credvault dev` with nothing else running: its demo OAuth provider and
//! the `demo` preset carry a newcomer through consent, a refresh with
//! rotation, revocation and the device flow, against the real binary.

mod support;

use std::time::Duration;

use credvault::api::pb::{self, credential_vault_client::CredentialVaultClient};
use support::{dev::DevProcess, vault::get_request};

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

fn alice() -> Option<pb::CredentialRef> {
    Some(pb::CredentialRef {
        tenant: String::new(),
        subject: "alice".into(),
        provider: "demo".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_demo_provider_runs_consent_refresh_revoke_and_the_device_flow() {
    // The HTTP client's TLS stack needs its crypto provider chosen.
    credvault::server::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(dir.path());
    let mut acme = CredentialVaultClient::new(dev.channel(dir.path(), "acme"));
    let demo = format!("http://127.0.0.1:{}", dev.demo);

    // Begin needs only the reference: the `demo` preset has the rest.
    let begun = acme
        .begin_authorization(pb::BeginAuthorizationRequest {
            credential: alice(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(begun
        .authorization_url
        .starts_with(&format!("{demo}/authorize?")));
    // The approve page, then a click on Approve.
    let page = browser()
        .get(&begun.authorization_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Approve"), "{page}");
    let approved = browser()
        .get(format!("{}&approve=yes", begun.authorization_url))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status().as_u16(), 303);
    let callback = approved.headers()["location"].to_str().unwrap().to_owned();
    assert!(callback.starts_with(&format!("{demo}/callback?")));
    // The callback page shows what to pass on.
    let shown = browser()
        .get(&callback)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(shown.lines().next().unwrap()).expect("the callback shows JSON");
    assert_eq!(json["state"], begun.state);
    let completed = acme
        .complete_authorization(pb::CompleteAuthorizationRequest {
            state: json["state"].as_str().unwrap().into(),
            code: json["code"].as_str().unwrap().into(),
            error: String::new(),
            iss: json["iss"].as_str().unwrap().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(completed.generation, 1);

    // From cache, then a refresh (demo tokens live 5 min; ask for 10).
    let first = acme
        .get_access_token(get_request("acme", "alice", "demo"))
        .await
        .unwrap()
        .into_inner();
    let refreshed = acme
        .get_access_token(pb::GetAccessTokenRequest {
            min_valid_for: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..get_request("acme", "alice", "demo")
        })
        .await;
    // Beyond what the provider issues: the freshest token answers, after
    // one refresh (which rotated the refresh token).
    let refreshed = refreshed.unwrap().into_inner();
    assert_ne!(refreshed.access_token, first.access_token);
    let again = acme
        .get_access_token(get_request("acme", "alice", "demo"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.access_token, refreshed.access_token);

    let revoked = acme
        .revoke(pb::RevokeRequest {
            credential: alice(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.existed);
    assert_eq!(revoked.upstream, pb::UpstreamRevocation::Revoked as i32);

    // The device flow: the vault polls; the user approves on the page.
    let device = acme
        .begin_device_authorization(pb::BeginDeviceAuthorizationRequest {
            credential: alice(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    browser()
        .get(format!("{}&approve=yes", device.verification_uri_complete))
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = acme
            .get_authorization(pb::GetAuthorizationRequest {
                state: device.state.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if status.status == pb::AuthorizationStatus::Completed as i32 {
            break;
        }
        assert_eq!(status.status, pb::AuthorizationStatus::Pending as i32);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device flow never completed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acme.get_access_token(get_request("acme", "alice", "demo"))
        .await
        .unwrap();
}
