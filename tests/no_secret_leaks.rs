//! No secret ever reaches a log line or an error message.
//!
//! Every path that handles secrets (deposit of each grant type, cache hits,
//! refresh with rotation, upstream failures, reauth, revocation, bad input) runs
//! with TRACE logging captured from every crate in the process; then the
//! capture and every status message are searched for each secret involved.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use credvault::{api::pb, telemetry::LogFormat};
use support::{
    provider::{Fault, ProviderDouble},
    vault::*,
};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const CLIENT_SECRET: &str = "cs-4f9a1c77e2b04d36";

/// Every line logged in this process, at TRACE from every crate, through
/// the vault's own subscriber (global, so installed once for every test).
/// `RUST_LOG` wins over TRACE, as in the vault.
fn capture() -> Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Capture::default();
            let writer = capture.clone();
            credvault::telemetry::init_logging_to(
                "trace",
                LogFormat::Text,
                false,
                move || writer.clone(),
                credvault::store::TEARDOWN_LOG_TARGETS,
            );
            capture
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_error_messages() {
    let capture = capture();

    let provider = ProviderDouble::with_client("app", Some(CLIENT_SECRET)).await;
    // Every refresh below is driven by an oversized `min_valid_for`, and
    // every fault must reach the provider: no rate limit, no cool-down.
    let dir = VaultDir::custom(
        "allow_http_loopback = true\nfailure_backoff_after = 1000",
        "[tokens]\nforce_refresh_interval = \"0s\"\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let mut messages = Vec::new();
    let mut secrets = vec![CLIENT_SECRET.to_owned(), PASSPHRASE.to_owned()];

    let oauth = |revocation: bool| {
        let mut c = oauth_client(&provider.token_url(), "app", CLIENT_SECRET).unwrap();
        if revocation {
            c.revocation_endpoint = provider.revocation_url();
        }
        Some(c)
    };
    let deposit = |subject: &str, grant| pb::DepositRequest {
        credential: reference("acme", subject, "idp"),
        client: oauth(true),
        grant,
        labels: Default::default(),
    };

    // Refresh-token grant with an initial access token; cache hit; refreshes.
    let rt = provider.issue_refresh_token("app");
    let initial_at = "at-initial-9c1e5d0b".to_owned();
    secrets.extend([rt.clone(), initial_at.clone()]);
    client
        .deposit(deposit(
            "alice",
            refresh_grant(
                &rt,
                Some((&initial_at, SystemTime::now() + Duration::from_secs(3600))),
            ),
        ))
        .await
        .unwrap();
    client
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap();
    // Needing two hours of one-hour tokens: every call goes upstream.
    let mut force = get_request("acme", "alice", "idp");
    force.min_valid_for = Some(prost_types::Duration {
        seconds: 7200,
        nanos: 0,
    });
    client.get_access_token(force.clone()).await.unwrap();
    client.get_access_token(force.clone()).await.unwrap();
    secrets.push(provider.current_refresh_token(&rt).unwrap());

    // Upstream failures of every kind.
    for fault in [
        Fault::Status {
            status: 503,
            body: format!("upstream body mentions {rt}"),
            retry_after: Some(1),
        },
        Fault::Garbage,
        Fault::OAuthError {
            status: 401,
            error: "invalid_client".into(),
        },
    ] {
        provider.fail_next(1, fault);
        messages.push(client.get_access_token(force.clone()).await.unwrap_err());
    }

    // Authorization code with PKCE, and client credentials.
    let verifier = "pkce-verifier-".to_owned() + &"x".repeat(40);
    let code = provider.issue_authorization_code(
        "app",
        "https://app.example/cb",
        Some(&support::provider::pkce_challenge(&verifier)),
    );
    secrets.extend([code.clone(), verifier.clone()]);
    let code_grant = || {
        Some(pb::deposit_request::Grant::AuthorizationCode(
            pb::AuthorizationCodeGrant {
                code: code.clone(),
                redirect_uri: "https://app.example/cb".into(),
                code_verifier: verifier.clone(),
            },
        ))
    };
    client.deposit(deposit("bob", code_grant())).await.unwrap();
    // A replayed code: the error must not echo it.
    messages.push(
        client
            .deposit(deposit("bob", code_grant()))
            .await
            .unwrap_err(),
    );
    client
        .deposit(deposit(
            "svc",
            Some(pb::deposit_request::Grant::ClientCredentials(
                pb::ClientCredentialsGrant {},
            )),
        ))
        .await
        .unwrap();

    // A dead grant.
    let dead = provider.issue_refresh_token("app");
    secrets.push(dead.clone());
    client
        .deposit(deposit("carol", refresh_grant(&dead, None)))
        .await
        .unwrap();
    provider.revoke_grant(&dead);
    messages.push(
        client
            .get_access_token(get_request("acme", "carol", "idp"))
            .await
            .unwrap_err(),
    );

    // Bad input that carries secrets in other fields.
    let mut bad = deposit("dave", refresh_grant(&rt, None));
    bad.client.as_mut().unwrap().token_endpoint = format!("not a url {CLIENT_SECRET}");
    messages.push(client.deposit(bad).await.unwrap_err());
    let mut bad = deposit("dave", refresh_grant(&format!("{rt}\u{0}"), None));
    bad.credential.as_mut().unwrap().subject.clear();
    messages.push(client.deposit(bad).await.unwrap_err());

    // The consent flow: the state, the code and the PKCE verifier are secrets.
    let mut consent_client = oauth(false).unwrap();
    consent_client.authorization_endpoint = provider.authorization_url();
    let begun = client
        .begin_authorization(pb::BeginAuthorizationRequest {
            credential: reference("acme", "erin", "idp"),
            client: Some(consent_client),
            redirect_uri: "https://app.example/cb".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let location = browser
        .get(&begun.authorization_url)
        .send()
        .await
        .unwrap()
        .headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    let redirect = url::Url::parse(&location).unwrap();
    let query = |name: &str| {
        redirect
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    let completion = pb::CompleteAuthorizationRequest {
        state: query("state"),
        code: query("code"),
        error: String::new(),
        iss: query("iss"),
    };
    client
        .complete_authorization(completion.clone())
        .await
        .unwrap();
    secrets.extend([begun.state.clone(), completion.code.clone()]);
    secrets.push(provider.last_token_request().unwrap()["code_verifier"].clone());
    // A replayed completion: the error must echo neither.
    messages.push(client.complete_authorization(completion).await.unwrap_err());

    // Revocation, upstream included.
    let revoked = client
        .revoke(pb::RevokeRequest {
            credential: reference("acme", "alice", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.upstream, pb::UpstreamRevocation::Revoked as i32);
    vault.stop().await.unwrap();

    secrets.extend(provider.issued_access_tokens());
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("access token refreshed") && logs.contains("credential revoked"),
        "the capture must actually contain the vault's logs (is RUST_LOG narrowing it?)"
    );
    let statuses: Vec<String> = messages
        .iter()
        .map(|s| format!("{} {:?}", s.message(), s))
        .collect();
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs"
        );
        for status in &statuses {
            assert!(
                !status.contains(secret.as_str()),
                "a secret leaked into a status: {status}"
            );
        }
    }
}

/// Every generated message that carries a secret prints it redacted, alone
/// and nested in its request: one `tracing::debug!(?request)` cannot leak.
#[test]
fn secret_bearing_messages_debug_print_redacted() {
    const SECRET: &str = "leak-canary-7d41e0";
    let client = pb::OAuthClient {
        token_endpoint: "https://idp.example/token".into(),
        client_id: "client-id".into(),
        client_secret: SECRET.into(),
        ..Default::default()
    };
    let refresh = pb::RefreshTokenGrant {
        refresh_token: SECRET.into(),
        access_token: SECRET.into(),
        access_token_expires_at: None,
    };
    let code = pb::AuthorizationCodeGrant {
        code: SECRET.into(),
        redirect_uri: "https://app.example/cb".into(),
        code_verifier: SECRET.into(),
    };
    let response = pb::GetAccessTokenResponse {
        access_token: SECRET.into(),
        token_type: "Bearer".into(),
        ..Default::default()
    };
    let deposits = [
        pb::deposit_request::Grant::RefreshToken(refresh.clone()),
        pb::deposit_request::Grant::AuthorizationCode(code.clone()),
    ]
    .map(|grant| pb::DepositRequest {
        client: Some(client.clone()),
        grant: Some(grant),
        ..Default::default()
    });
    // The consent flows: `state` is a bearer handle, the URL carries it.
    let begun = pb::BeginAuthorizationResponse {
        authorization_url: format!("https://idp.example/authorize?state={SECRET}"),
        state: SECRET.into(),
        expires_at: None,
    };
    let completion = pb::CompleteAuthorizationRequest {
        state: SECRET.into(),
        code: SECRET.into(),
        ..Default::default()
    };
    let device = pb::BeginDeviceAuthorizationResponse {
        state: SECRET.into(),
        user_code: "USER-1".into(),
        ..Default::default()
    };
    let asked = pb::GetAuthorizationRequest {
        state: SECRET.into(),
    };
    let status = pb::Authorization {
        state: SECRET.into(),
        ..Default::default()
    };
    let printed = [
        format!("{client:?}"),
        format!("{refresh:?}"),
        format!("{code:?}"),
        format!("{response:?}"),
        format!("{:#?}", deposits[0]),
        format!("{:?}", deposits[1]),
        format!("{begun:?}"),
        format!("{completion:?}"),
        format!("{device:?}"),
        format!("{asked:?}"),
        format!("{status:?}"),
    ];
    for text in &printed {
        assert!(!text.contains(SECRET), "a secret printed: {text}");
        assert!(text.contains("[redacted]"), "{text}");
    }
    // The non-secret fields still print, so debugging stays possible.
    assert!(printed[0].contains("client-id"), "{}", printed[0]);
    assert!(printed[2].contains("app.example"), "{}", printed[2]);
}

/// sled logs at TRACE from crossbeam-epoch deferred functions, which can run
/// in a thread's thread-local destructors after the log formatter's own
/// thread-local buffer is gone. Passed on, such a record panicked there,
/// and that aborted this test binary (SIGABRT, 3 runs in 60 with one core
/// of two kept busy). Here the record comes from a destructor that runs after
/// the formatter's on purpose: destructors run in the reverse order of
/// first use, and the guard is used before the thread logs anything.
#[test]
fn a_sled_trace_record_in_a_threads_teardown_cannot_abort_the_process() {
    struct LogsOnDrop;
    impl Drop for LogsOnDrop {
        fn drop(&mut self) {
            log::trace!(target: "sled::pagecache::iobuf", "bumping atomic header lsn to 7");
        }
    }
    thread_local!(static GUARD: LogsOnDrop = const { LogsOnDrop });

    let capture = capture();
    std::thread::spawn(|| {
        GUARD.with(|_| ());
        tracing::info!("a thread that logged before it exits");
    })
    .join()
    .expect("the thread exits");
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("a thread that logged before it exits"));
    assert!(!logs.contains("bumping atomic header lsn to 7"));
}
