//! Operating the vault: metrics after real traffic, load shedding, the
//! per-identity rate limit, and backup/restore round trips.

mod support;

use std::time::{Duration, SystemTime};

use credvault::api::pb::{self, vault_admin_client::VaultAdminClient};
use support::{provider::ProviderDouble, vault::*};
use tonic::Code;

const CLIENT_ID: &str = "vault-client";
const CLIENT_SECRET: &str = "client-secret-op";

async fn provider() -> ProviderDouble {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    provider
}

fn deposit(provider: &ProviderDouble, subject: &str, access: Option<&str>) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference("acme", subject, "idp"),
        client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant(
            &provider.issue_refresh_token(CLIENT_ID),
            access.map(|t| (t, SystemTime::now() + Duration::from_secs(3600))),
        ),
        labels: [("team".to_owned(), "payments".to_owned())].into(),
    }
}

/// Rewrites one setting line of the test config's `[server]` section.
fn with_server_settings(dir: &VaultDir, lines: &str) {
    dir.replace_in_config(
        "shutdown_grace = \"5s\"",
        &format!("shutdown_grace = \"5s\"\n{lines}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_appears_after_real_traffic() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;

    client
        .deposit(deposit(&provider, "alice", Some("at-alice")))
        .await
        .unwrap();
    client
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap();
    client
        .deposit(deposit(&provider, "bob", None))
        .await
        .unwrap();
    // Five callers on one expired credential: one refresh, four coalesced.
    let hold = provider.hold_token_calls();
    let mut callers = Vec::new();
    for _ in 0..5 {
        let mut client = client.clone();
        callers.push(tokio::spawn(async move {
            client
                .get_access_token(get_request("acme", "bob", "idp"))
                .await
        }));
    }
    provider.wait_for_token_calls(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    hold.release();
    for caller in callers {
        caller.await.unwrap().unwrap();
    }
    let mut forced = get_request("acme", "bob", "idp");
    forced.force_refresh = true;
    client.get_access_token(forced).await.unwrap();
    // A dead grant.
    let dead = pb::DepositRequest {
        grant: refresh_grant("rt-unknown-to-the-provider", None),
        ..deposit(&provider, "carol", None)
    };
    client.deposit(dead).await.unwrap();
    client
        .get_access_token(get_request("acme", "carol", "idp"))
        .await
        .unwrap_err();
    let mut admin = VaultAdminClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
            .await,
    );
    admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap();

    let text = scrape_metrics(vault.ops_addr).await;
    for family in [
        "credvault_rpc_calls_total{method=\"Deposit\",reason=\"OK\"}",
        "credvault_rpc_calls_total{method=\"GetAccessToken\",reason=\"REAUTH_REQUIRED\"}",
        "credvault_rpc_duration_seconds_bucket{",
        "credvault_token_cache_total{result=\"hit\"}",
        "credvault_token_cache_total{result=\"miss\"}",
        "credvault_refreshes_total{provider=\"idp\",outcome=\"ok\"}",
        "credvault_refreshes_total{provider=\"idp\",outcome=\"grant_rejected\"}",
        "credvault_refresh_duration_seconds_bucket{",
        "credvault_store_write_duration_seconds_bucket{",
        "credvault_store_write_duration_seconds_count",
        "credvault_store_write_duration_seconds_sum",
        "credvault_refresh_coalesced_waiters_total",
        "credvault_reauth_transitions_total{cause=\"invalid_grant\"}",
        "credvault_forced_refreshes_rate_limited_total",
        "credvault_records{key_version=\"1\"} 3",
        "credvault_store_size_bytes",
        "credvault_overloaded_total",
    ] {
        assert!(text.contains(family), "missing {family}\n{text}");
    }
    let waiters: f64 = text
        .lines()
        .find(|l| l.starts_with("credvault_refresh_coalesced_waiters_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(waiters >= 4.0, "{waiters}");
    // Every refresh request sent upstream is timed once, whatever its
    // outcome, and every acknowledged write (three Deposits at least).
    let sum_of = |prefix: &str| metric_sum(&text, prefix);
    let refreshes = sum_of("credvault_refreshes_total{provider=\"idp\"");
    assert!(refreshes >= 2.0, "{refreshes}");
    assert_eq!(
        sum_of("credvault_refresh_duration_seconds_count{provider=\"idp\"}"),
        refreshes,
        "{text}"
    );
    assert!(sum_of("credvault_refresh_duration_seconds_sum{provider=\"idp\"}") > 0.0);
    assert!(sum_of("credvault_store_write_duration_seconds_count") >= 3.0);
    assert!(sum_of("credvault_store_write_duration_seconds_sum") > 0.0);
    // Low cardinality and no personal data: no subjects, no tenants.
    for needle in ["alice", "bob", "carol", "acme", "at-alice"] {
        assert!(!text.contains(needle), "{needle} appears in /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_a_typed_status_and_the_vault_stays_healthy() {
    let provider = provider().await;
    provider.set_latency(Duration::from_millis(800));
    let dir = VaultDir::new();
    // One identity may use all three slots here: this test is about the
    // global cap (the per-identity cap is tested in tests/overload.rs).
    with_server_settings(&dir, "max_concurrent_calls = 3\nmax_calls_per_identity = 3");
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    for i in 0..12 {
        client
            .deposit(deposit(&provider, &format!("u{i}"), None))
            .await
            .unwrap();
    }

    // Twelve slow refreshes at once against a capacity of three.
    let mut callers = Vec::new();
    for i in 0..12 {
        let mut client = client.clone();
        callers.push(tokio::spawn(async move {
            client
                .get_access_token(get_request("acme", &format!("u{i}"), "idp"))
                .await
        }));
    }
    // Health is always admitted, even now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let channel = vault
        .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
        .await;
    let serving = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let (mut ok, mut shed) = (0, 0);
    for caller in callers {
        match caller.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(error_info(&status).0, "OVERLOADED");
                shed += 1;
            }
        }
    }
    assert!(ok >= 3 && shed >= 1, "ok {ok}, shed {shed}");
    // Nothing was harmed: every credential refreshes once the load is gone.
    for i in 0..12 {
        client
            .get_access_token(get_request("acme", &format!("u{i}"), "idp"))
            .await
            .unwrap();
    }
    assert!(scrape_metrics(vault.ops_addr)
        .await
        .contains("credvault_overloaded_total"));
}

#[tokio::test]
async fn one_noisy_identity_is_rate_limited_alone() {
    let provider = provider().await;
    let dir = VaultDir::new();
    with_server_settings(&dir, "rate_limit_per_identity = 5\nrate_limit_burst = 5");
    let vault = TestVault::start(&dir).await;
    let mut admin = vault.client(&dir, "admin").await;
    let mut acme = vault.client(&dir, "acme").await;
    acme.deposit(deposit(&provider, "dora", Some("at-dora")))
        .await
        .unwrap();

    let mut limited = 0;
    for _ in 0..20 {
        if let Err(status) = admin
            .get_access_token(get_request("acme", "dora", "idp"))
            .await
        {
            assert_eq!(error_info(&status).0, "OVERLOADED");
            limited += 1;
        }
    }
    assert!(limited >= 10, "{limited}");
    // Another identity is unaffected.
    acme.get_access_token(get_request("acme", "dora", "idp"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_from_a_running_and_a_stopped_vault_restore_into_a_working_vault() {
    let provider = provider().await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    for i in 0..50 {
        client
            .deposit(deposit(
                &provider,
                &format!("u{i}"),
                Some(&format!("at-{i}")),
            ))
            .await
            .unwrap();
    }

    // Online: streamed through VaultAdmin by the real CLI.
    let online = dir.path().join("online.cvbackup");
    let d = dir.path();
    std::fs::write(d.join("admin.pem"), &dir.pki.clients["admin"].cert_pem).unwrap();
    std::fs::write(d.join("admin-key.pem"), &dir.pki.clients["admin"].key_pem).unwrap();
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{args:?}: {text}");
        text
    };
    let target = format!("localhost:{}", vault.addr.port());
    cli(&[
        "admin",
        "--target",
        &target,
        "--dev-dir",
        d.to_str().unwrap(),
        "backup",
        "--out",
        online.to_str().unwrap(),
    ]);
    // The same CLI reloads the policy (the test policy has two rules).
    let reloaded = cli(&[
        "admin",
        "--target",
        &target,
        "--dev-dir",
        d.to_str().unwrap(),
        "reload-policy",
    ]);
    assert!(reloaded.contains("policy reloaded: 2 rules"), "{reloaded}");
    vault.stop().await.unwrap();

    // Offline: straight from the stopped vault's data dir.
    let offline = d.join("offline.cvbackup");
    let data = dir.config().data_dir;
    let config = d.join("credvault.toml");
    let out = cli(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        offline.to_str().unwrap(),
    ]);
    assert!(out.contains("backed up 50 records"), "{out}");

    for backup in [&online, &offline] {
        // Restore into the data dir of a fresh vault home that shares the keyring.
        let restored = VaultDir::new();
        std::fs::copy(dir.keyring_path(), restored.keyring_path()).unwrap();
        let target_data = restored.config().data_dir;
        let restored_config = restored.path().join("credvault.toml");
        let out = cli(&[
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--config",
            restored_config.to_str().unwrap(),
            "--data-dir",
            target_data.to_str().unwrap(),
        ]);
        assert!(out.contains("restored 50 records"), "{out}");
        let vault = TestVault::start(&restored).await;
        let mut client = vault.client(&restored, "admin").await;
        for i in (0..50).step_by(5) {
            let token = client
                .get_access_token(get_request("acme", &format!("u{i}"), "idp"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(token.access_token, format!("at-{i}"));
        }
        vault.stop().await.unwrap();
        // Never over existing data.
        let refused = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args(["restore", "--from", backup.to_str().unwrap(), "--config"])
            .arg(&restored_config)
            .args(["--data-dir"])
            .arg(&target_data)
            .output()
            .unwrap();
        assert!(!refused.status.success());
        // A file changed by someone without the keyring is refused, and
        // restores nothing.
        let mut tampered = std::fs::read(backup).unwrap();
        let at = tampered.len() / 2;
        tampered[at] ^= 1;
        let tampered_path = d.join("tampered.cvbackup");
        std::fs::write(&tampered_path, &tampered).unwrap();
        let empty = VaultDir::new();
        std::fs::copy(dir.keyring_path(), empty.keyring_path()).unwrap();
        let rejected = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
            .args([
                "restore",
                "--from",
                tampered_path.to_str().unwrap(),
                "--config",
            ])
            .arg(empty.path().join("credvault.toml"))
            .output()
            .unwrap();
        assert!(!rejected.status.success());
        let message = String::from_utf8_lossy(&rejected.stderr);
        assert!(message.contains("fails authentication"), "{message}");
    }
}
