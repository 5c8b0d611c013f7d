//! Credential events (DESIGN §5e), end to end: a real vault (mTLS, its
//! store), a real provider double, real gRPC streams. Run once per backend
//! (`CREDVAULT_TEST_BACKEND=etcd` puts every vault on a real etcd cluster).

mod support;

use std::{
    collections::HashSet,
    time::{Duration, SystemTime},
};

use credvault::api::pb::{
    self, credential_vault_client::CredentialVaultClient, vault_admin_client::VaultAdminClient,
};
use support::{
    provider::{Fault, ProviderDouble},
    vault::*,
};
use tonic::{transport::Channel, Code, Streaming};
use tonic_types::StatusExt;

const CLIENT_ID: &str = "events-client";
const CLIENT_SECRET: &str = "events-client-secret-51c3";
/// The cursor before every event: "from the start of retained history".
const FROM_THE_START: &str = "00000000000000000000000000000000";

use pb::CredentialEventType as Type;

fn deposit(provider: &ProviderDouble, subject: &str, refresh_token: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference("acme", subject, "idp"),
        client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant(refresh_token, None),
        labels: [("team".to_string(), "growth".to_string())].into(),
    }
}

fn revoke(subject: &str) -> pb::RevokeRequest {
    pb::RevokeRequest {
        credential: reference("acme", subject, "idp"),
    }
}

fn watch(tenant: &str, after: &str) -> pb::WatchCredentialEventsRequest {
    pb::WatchCredentialEventsRequest {
        tenant: tenant.into(),
        after: after.into(),
        types: Vec::new(),
    }
}

async fn open(
    client: &mut CredentialVaultClient<Channel>,
    request: pb::WatchCredentialEventsRequest,
) -> Streaming<pb::CredentialEvent> {
    client
        .watch_credential_events(request)
        .await
        .expect("the watch opens")
        .into_inner()
}

/// The next `n` events, each within 10 s.
async fn take(stream: &mut Streaming<pb::CredentialEvent>, n: usize) -> Vec<pb::CredentialEvent> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("no event within 10 s after {events:?}"))
            .expect("the stream stays open")
            .expect("the stream does not end");
        events.push(next);
    }
    events
}

/// Asserts nothing more arrives for a while.
async fn quiet(stream: &mut Streaming<pb::CredentialEvent>) {
    if let Ok(next) = tokio::time::timeout(Duration::from_millis(700), stream.message()).await {
        panic!("expected no more events, got {next:?}");
    }
}

fn summary(events: &[pb::CredentialEvent]) -> Vec<(Type, String, u64, String)> {
    events
        .iter()
        .map(|e| {
            (
                Type::try_from(e.r#type).unwrap(),
                e.credential.as_ref().unwrap().subject.clone(),
                e.generation,
                e.cause.clone(),
            )
        })
        .collect()
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// Needs more than the provider's one-hour tokens: always refreshes.
fn refreshing_get(subject: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        min_valid_for: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
        ..get_request("acme", subject, "idp")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_life_is_told_in_order_on_a_live_stream() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let mut stream = open(&mut acme, watch("", "")).await;

    let first = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "alice", &first))
        .await
        .unwrap();
    // The grant dies upstream: the next refresh gets invalid_grant.
    assert!(provider.revoke_grant(&first));
    let dead = acme.get_access_token(refreshing_get("alice")).await;
    assert_eq!(reason(&dead.unwrap_err()), "REAUTH_REQUIRED");
    let second = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "alice", &second))
        .await
        .unwrap();
    acme.revoke(revoke("alice")).await.unwrap();

    let events = take(&mut stream, 4).await;
    assert_eq!(
        summary(&events),
        vec![
            (Type::Deposited, "alice".into(), 1, String::new()),
            (
                Type::ReauthRequired,
                "alice".into(),
                1,
                "invalid_grant".into()
            ),
            (Type::Deposited, "alice".into(), 2, String::new()),
            (Type::Revoked, "alice".into(), 2, String::new()),
        ]
    );
    for event in &events {
        assert_eq!(event.credential.as_ref().unwrap().tenant, "acme");
        assert_eq!(event.labels.get("team").map(String::as_str), Some("growth"));
        let at = SystemTime::try_from(event.at.unwrap()).unwrap();
        assert!(at.elapsed().unwrap() < Duration::from_secs(60));
    }
    let cursors: Vec<&str> = events.iter().map(|e| e.cursor.as_str()).collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "cursors increase: {cursors:?}"
    );
    // Events carry references, causes and labels, never a token.
    let printed = format!("{events:?}");
    for secret in [first.as_str(), second.as_str(), CLIENT_SECRET] {
        assert!(!printed.contains(secret), "an event carries a secret");
    }
    for token in provider.issued_access_tokens() {
        assert!(
            !printed.contains(&token),
            "an event carries an access token"
        );
    }
    quiet(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_resumes_from_its_cursor_and_misses_nothing() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let mut admin = vault.client(&dir, "admin").await;

    let mut stream = open(&mut acme, watch("acme", "")).await;
    for subject in ["u0", "u1", "u2"] {
        let token = provider.issue_refresh_token(CLIENT_ID);
        acme.deposit(deposit(&provider, subject, &token))
            .await
            .unwrap();
    }
    let seen = take(&mut stream, 2).await;
    // The client goes away with one event unread; changes go on meanwhile.
    drop(stream);
    for subject in ["u3", "u4"] {
        let token = provider.issue_refresh_token(CLIENT_ID);
        acme.deposit(deposit(&provider, subject, &token))
            .await
            .unwrap();
    }
    acme.revoke(revoke("u0")).await.unwrap();

    let mut resumed = open(&mut acme, watch("acme", &seen[1].cursor)).await;
    let rest = take(&mut resumed, 4).await;
    let subjects: Vec<(Type, String)> = seen
        .iter()
        .chain(&rest)
        .map(|e| {
            (
                Type::try_from(e.r#type).unwrap(),
                e.credential.as_ref().unwrap().subject.clone(),
            )
        })
        .collect();
    let expected: Vec<(Type, String)> = ["u0", "u1", "u2", "u3", "u4"]
        .iter()
        .map(|s| (Type::Deposited, s.to_string()))
        .chain([(Type::Revoked, "u0".to_string())])
        .collect();
    assert_eq!(subjects, expected, "nothing missed, nothing twice");
    let unique: HashSet<&str> = seen
        .iter()
        .chain(&rest)
        .map(|e| e.cursor.as_str())
        .collect();
    assert_eq!(unique.len(), 6);
    quiet(&mut resumed).await;

    // The same history from the start, for every tenant, filtered by type.
    let mut all = open(
        &mut admin,
        pb::WatchCredentialEventsRequest {
            tenant: "*".into(),
            after: FROM_THE_START.into(),
            types: vec![Type::Revoked as i32],
        },
    )
    .await;
    let revoked = take(&mut all, 1).await;
    assert_eq!(revoked[0].cursor, rest[3].cursor);
    quiet(&mut all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_from_its_cursor_across_a_vault_restart() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let mut stream = open(&mut acme, watch("", "")).await;
    for subject in ["r0", "r1"] {
        let token = provider.issue_refresh_token(CLIENT_ID);
        acme.deposit(deposit(&provider, subject, &token))
            .await
            .unwrap();
    }
    let seen = take(&mut stream, 1).await;
    // A change the client never read, then a restart.
    acme.revoke(revoke("r1")).await.unwrap();
    // The open stream is ended by the shutdown with a typed status, after
    // what was already sent.
    let end = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status at shutdown"),
                Err(status) => return status,
            }
        }
    });
    vault.stop().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), end)
        .await
        .expect("the stream was never ended")
        .unwrap();
    assert_eq!(
        (end.code(), reason(&end)),
        (Code::Unavailable, "SHUTTING_DOWN".into())
    );

    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let token = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "r2", &token))
        .await
        .unwrap();
    let mut resumed = open(&mut acme, watch("", &seen[0].cursor)).await;
    let rest = take(&mut resumed, 3).await;
    assert_eq!(
        summary(&rest)
            .into_iter()
            .map(|(t, s, g, _)| (t, s, g))
            .collect::<Vec<_>>(),
        vec![
            (Type::Deposited, "r1".into(), 1),
            (Type::Revoked, "r1".into(), 1),
            (Type::Deposited, "r2".into(), 1),
        ]
    );
    assert!(seen[0].cursor < rest[0].cursor);
    quiet(&mut resumed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_down_past_the_threshold_gives_refresh_failing_then_recovered() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true\nfailure_backoff_after = 1000",
        "[events]\nfailing_after = \"1s\"\n[tokens]\nforce_refresh_interval = \"0s\"\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let mut admin = VaultAdminClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
            .await,
    );
    let mut stream = open(&mut acme, watch("", "")).await;
    let token = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "flaky", &token))
        .await
        .unwrap();
    assert_eq!(take(&mut stream, 1).await[0].r#type, Type::Deposited as i32);

    let outage = Fault::Status {
        status: 503,
        body: "down".into(),
        retry_after: None,
    };
    provider.fail_next(1000, outage);
    let first = acme.get_access_token(refreshing_get("flaky")).await;
    assert_eq!(reason(&first.unwrap_err()), "UPSTREAM_UNAVAILABLE");
    // Not yet past the threshold: no event.
    quiet(&mut stream).await;
    let describe = pb::DescribeCredentialRequest {
        credential: reference("acme", "flaky", "idp"),
    };
    let failing = admin
        .describe_credential(describe.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(failing.failing_since.is_some(), "the streak shows");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = acme.get_access_token(refreshing_get("flaky")).await;
    assert_eq!(reason(&again.unwrap_err()), "UPSTREAM_UNAVAILABLE");
    let failing_event = take(&mut stream, 1).await;
    assert_eq!(
        summary(&failing_event),
        vec![(
            Type::RefreshFailing,
            "flaky".into(),
            1,
            "upstream_unavailable".into()
        )]
    );
    // Still failing: no second REFRESH_FAILING for the same streak.
    let more = acme.get_access_token(refreshing_get("flaky")).await;
    assert!(more.is_err());
    quiet(&mut stream).await;
    let meta = admin
        .describe_credential(describe.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.last_event, "REFRESH_FAILING");

    provider.clear_faults();
    acme.get_access_token(refreshing_get("flaky"))
        .await
        .expect("the provider is back");
    let recovered = take(&mut stream, 1).await;
    assert_eq!(recovered[0].r#type, Type::Recovered as i32);
    // A healthy refresh afterwards says nothing.
    acme.get_access_token(refreshing_get("flaky"))
        .await
        .unwrap();
    quiet(&mut stream).await;
    let meta = admin
        .describe_credential(describe)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.last_event, "RECOVERED");
    assert!(meta.failing_since.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_scoped_and_bad_cursors_are_typed() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        "[events]\nretention = \"1s\"\ntrim_interval = \"1s\"\n",
    );
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let mut stranger = vault.client(&dir, "stranger").await;

    let refused =
        |result: Result<tonic::Response<Streaming<pb::CredentialEvent>>, tonic::Status>| {
            let status = result.map(|_| ()).unwrap_err();
            (status.code(), reason(&status))
        };
    assert_eq!(
        refused(acme.watch_credential_events(watch("*", "")).await),
        (Code::PermissionDenied, "TENANT_NOT_PERMITTED".into())
    );
    assert_eq!(
        refused(acme.watch_credential_events(watch("other", "")).await),
        (Code::PermissionDenied, "TENANT_NOT_PERMITTED".into())
    );
    assert_eq!(
        refused(stranger.watch_credential_events(watch("acme", "")).await),
        (Code::PermissionDenied, "ACTION_NOT_PERMITTED".into())
    );
    for bad in ["nope", "zz", &"f".repeat(65)] {
        assert_eq!(
            refused(acme.watch_credential_events(watch("", bad)).await),
            (Code::InvalidArgument, "INVALID_FIELD".into()),
            "{bad}"
        );
    }
    let unknown_type = pb::WatchCredentialEventsRequest {
        types: vec![99],
        ..watch("", "")
    };
    assert_eq!(
        refused(acme.watch_credential_events(unknown_type).await),
        (Code::InvalidArgument, "INVALID_FIELD".into())
    );

    // A cursor whose history was trimmed: CURSOR_EXPIRED.
    let mut stream = open(&mut acme, watch("", "")).await;
    let token = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "old", &token))
        .await
        .unwrap();
    let old = take(&mut stream, 1).await.remove(0);
    let token = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "old", &token))
        .await
        .unwrap();
    take(&mut stream, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match acme.watch_credential_events(watch("", &old.cursor)).await {
            Err(status) => {
                assert_eq!(
                    (status.code(), reason(&status)),
                    (Code::OutOfRange, "CURSOR_EXPIRED".into())
                );
                break;
            }
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "the trim never ran");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Deposits `n` grants with large labels, `concurrency` at a time: about
/// 3.5 KiB of event per deposit.
async fn deposit_load(client: &CredentialVaultClient<Channel>, round: &str, n: usize) {
    let labels: std::collections::HashMap<String, String> = (0..16)
        .map(|i| (format!("label-{i:02}"), "x".repeat(200)))
        .collect();
    let concurrency = 8;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let mut client = client.clone();
        let labels = labels.clone();
        let round = round.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (worker..n).step_by(concurrency) {
                client
                    .deposit(pb::DepositRequest {
                        credential: reference("acme", &format!("{round}-{}", i % 64), "idp"),
                        client: oauth_client("http://127.0.0.1:9/token", CLIENT_ID, CLIENT_SECRET),
                        grant: refresh_grant("rt-load", None),
                        labels: labels.clone(),
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_never_read_hold_bounded_memory_and_end_typed() {
    use support::dev::DevProcess;
    const PER_PHASE: usize = 4_000;
    const STUCK: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start_with_env(
        dir.path(),
        &[
            ("CREDVAULT_EVENTS__STREAM_STALL", "2s"),
            ("CREDVAULT_EVENTS__STREAM_BUFFER", "16"),
        ],
    );
    let writer = CredentialVaultClient::new(dev.channel(dir.path(), "acme"));
    // The baseline is the same load with as many streams that do read. With
    // readers, RSS grows for reasons no stream holds: sled's page cache
    // keeps the log pages they read (~20-40 MiB per phase here), and the
    // allocator keeps what 20 busy streams churn through (~60 MiB the first
    // time, varying run to run). A baseline without readers pays neither,
    // and once left this test 2 MiB short of its bound on a CI host. Only
    // a stream that never reads can hold events, so it is compared with
    // streams that read, after a warm-up with readers.
    let readers = reading_streams(&dev, dir.path(), STUCK).await;
    deposit_load(&writer, "warm", PER_PHASE).await;
    readers.iter().for_each(tokio::task::JoinHandle::abort);
    let readers = reading_streams(&dev, dir.path(), STUCK).await;
    let before = dev.rss_kib();
    deposit_load(&writer, "read", PER_PHASE).await;
    let reading = dev.rss_kib().saturating_sub(before);
    readers.iter().for_each(tokio::task::JoinHandle::abort);

    // The same load again with streams (each on its own connection) that
    // never read. ~14 MiB of events go past each: held, they would add
    // ~280 MiB; what flow control lets each hold is about 1 MiB.
    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        let mut reader = CredentialVaultClient::new(dev.channel(dir.path(), "acme"));
        stuck.push(open(&mut reader, watch("", "")).await);
    }
    let before = dev.rss_kib();
    deposit_load(&writer, "stuck", PER_PHASE).await;
    // Past the stall bound, every stuck stream has been ended.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let with_stuck = dev.rss_kib().saturating_sub(before);
    println!(
        "rss growth over {PER_PHASE} deposits: {reading} KiB with {STUCK} streams that read, \
         {with_stuck} KiB with {STUCK} streams that never read"
    );
    assert!(
        with_stuck < reading + 64 * 1024,
        "streams that never read grew the vault by {with_stuck} KiB, against {reading} KiB \
         with streams that read"
    );

    // Reading now: what flow control let through, then a typed end.
    let mut delivered = 0usize;
    let mut bytes = 0usize;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stuck[0].message()).await {
            Ok(Ok(Some(event))) => {
                delivered += 1;
                bytes += prost::Message::encoded_len(&event);
            }
            Ok(Ok(None)) => panic!("the stream ended without a status after {delivered} events"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the stuck stream was never ended ({delivered} events read)"),
        }
    };
    println!(
        "a stuck stream delivered {delivered} events ({} KiB) once read, then {:?}",
        bytes / 1024,
        end.code()
    );
    assert_eq!(
        (end.code(), reason(&end)),
        (Code::Aborted, "CONSUMER_TOO_SLOW".into())
    );
    // The client's HTTP/2 stream window (2 MiB), the server's send buffer
    // (400 KiB) and the stream's 16 events: nothing more was held.
    assert!(
        bytes < 3 * 1024 * 1024,
        "{delivered} events ({bytes} bytes) were held for a reader that never read"
    );
    assert!(delivered < PER_PHASE);
}

/// `n` watches of every event, each on its own connection, read as fast as
/// they come until their task is aborted.
async fn reading_streams(
    dev: &support::dev::DevProcess,
    dir: &std::path::Path,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut readers = Vec::new();
    for _ in 0..n {
        let mut client = CredentialVaultClient::new(dev.channel(dir, "acme"));
        let mut stream = open(&mut client, watch("", "")).await;
        readers.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }
    readers
}

/// A vault whose `[[events.webhooks]]` sink `ops` posts `acme`'s events to
/// `url`, retrying quickly.
fn webhook_vault(url: &str, secret: &str) -> VaultDir {
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "[[events.webhooks]]\nname = \"ops\"\nurl = \"{url}\"\ntenants = [\"acme\"]\n\
             secret_file = \"webhook.secret\"\nretry_base = \"100ms\"\nretry_max = \"400ms\"\n"
        ),
    );
    std::fs::write(dir.path().join("webhook.secret"), secret).unwrap();
    dir
}

/// Distinct deliveries (by `webhook-id`) in the order they first arrived,
/// as (type, subject).
fn delivered_in_order(received: &[support::webhook::Delivery]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|d| seen.insert(d.id.clone()))
        .map(|d| {
            let body = d.json();
            (
                body["data"]["type"].as_str().unwrap().to_owned(),
                body["data"]["credential"]["subject"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_that_was_down_gets_every_event_signed_and_in_order() {
    use support::webhook::{new_secret, verify, WebhookReceiver};
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    // The receiver's port, not listening yet: the first attempts are refused.
    let addr = support::dev::free_addr();
    let (secret, key) = new_secret();
    let dir = webhook_vault(&format!("http://{addr}/hooks"), &secret);
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let mut admin = vault.client(&dir, "admin").await;
    for subject in ["w0", "w1"] {
        let token = provider.issue_refresh_token(CLIENT_ID);
        acme.deposit(deposit(&provider, subject, &token))
            .await
            .unwrap();
    }
    // Another tenant's event is not this sink's.
    let token = provider.issue_refresh_token(CLIENT_ID);
    admin
        .deposit(pb::DepositRequest {
            credential: reference("globex", "g0", "idp"),
            ..deposit(&provider, "g0", &token)
        })
        .await
        .unwrap();
    acme.revoke(revoke("w0")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Up, but answering 503 for a while; then healthy.
    let receiver = WebhookReceiver::start(addr, key.clone()).await;
    receiver.set_down(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while receiver.refused() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry reached the receiver"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.set_down(false);
    let received = receiver.wait_for(3, Duration::from_secs(10)).await;
    assert!(received.iter().all(|d| d.verified), "{received:?}");
    assert_eq!(
        delivered_in_order(&received),
        vec![
            ("DEPOSITED".to_owned(), "w0".to_owned()),
            ("DEPOSITED".to_owned(), "w1".to_owned()),
            ("REVOKED".to_owned(), "w0".to_owned()),
        ]
    );
    let first = &received[0];
    assert_eq!(first.json()["type"], "credential.deposited");
    assert_eq!(first.json()["data"]["labels"]["team"], "growth");
    assert!(first.id.starts_with("evt_"));
    // A tampered body (or a forged id) fails verification.
    let mut tampered = first.body.clone();
    let at = tampered.iter().position(|&b| b == b'w').unwrap();
    tampered[at] = b'x';
    assert!(!verify(
        &key,
        &first.id,
        &first.timestamp,
        &tampered,
        &first.signature
    ));
    assert!(!verify(
        &key,
        "evt_forged",
        &first.timestamp,
        &first.body,
        &first.signature
    ));
    assert!(verify(
        &key,
        &first.id,
        &first.timestamp,
        &first.body,
        &first.signature
    ));
    // No secret in any body.
    for delivery in &received {
        let body = String::from_utf8_lossy(&delivery.body);
        assert!(!body.contains(CLIENT_SECRET) && !body.contains("refresh"));
    }

    // Delivery state is durable: an event logged while the receiver is
    // down and the vault restarts still arrives, and nothing is resent.
    receiver.set_down(true);
    let token = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "w2", &token))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    receiver.set_down(false);
    let received = receiver.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(
        delivered_in_order(&received)[3],
        ("DEPOSITED".to_owned(), "w2".to_owned())
    );
    let accepted: Vec<&str> = received
        .iter()
        .filter(|d| d.verified)
        .map(|d| d.id.as_str())
        .collect();
    let distinct: HashSet<&str> = accepted.iter().copied().collect();
    assert_eq!(
        accepted.len(),
        distinct.len(),
        "an accepted event was sent again"
    );
    drop(vault);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_receiver_in_examples_verifies_and_takes_the_vaults_webhooks() {
    use support::webhook::new_secret;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let (secret, _) = new_secret();
    // Killed on drop: a failed assertion must not leave a receiver that
    // outlives the test and holds its output open. The receiver takes port 0
    // and says which port it got, so no other listener can take it first.
    let mut command = std::process::Command::new("python3");
    support::dev::without_proxy(&mut command)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/webhook_receiver.py"
        ))
        .arg("0")
        .env("WEBHOOK_SECRET", &secret)
        .stdout(std::process::Stdio::piped());
    let mut python = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (the README's test command installs the test requirements)");
    let mut lines = BufReader::new(python.stdout.take().unwrap()).lines();
    let mut next_line = async |waiting_for: &str| {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the receiver printed {waiting_for} within 30 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("the receiver exited before printing {waiting_for}"))
    };
    let listening = next_line("where it listens").await;
    let hooks = listening
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {listening:?}"))
        .to_owned();
    let dir = webhook_vault(&hooks, &secret);
    let vault = TestVault::start(&dir).await;
    let mut acme = vault.client(&dir, "acme").await;
    let token = provider.issue_refresh_token(CLIENT_ID);
    acme.deposit(deposit(&provider, "py0", &token))
        .await
        .unwrap();
    assert_eq!(
        next_line("the event").await,
        "DEPOSITED acme/py0@idp generation=1 cause=''"
    );
    // A forged delivery is refused.
    let forged = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(hooks)
        .header("webhook-id", "evt_forged")
        .header(
            "webhook-timestamp",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                .to_string(),
        )
        .header("webhook-signature", "v1,bm90IGEgc2lnbmF0dXJl")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
}
