//! Key rotation on a live vault: reload without restart, rewrap (also after
//! being killed midway), retire and destroy, and the guards that keep a key
//! mistake from turning into a mass reauth.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use credvault::{
    api::pb::{self, vault_admin_client::VaultAdminClient},
    crypto::{KeyVersion, Keyring},
};
use support::{provider::ProviderDouble, vault::*};
use tonic::transport::Channel;

const CLIENT_ID: &str = "vault-client";
const CLIENT_SECRET: &str = "client-secret-77";

fn deposit(provider: &ProviderDouble, subject: &str, token: &str) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference("acme", subject, "idp"),
        client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant(
            &provider.issue_refresh_token(CLIENT_ID),
            Some((token, SystemTime::now() + Duration::from_secs(3600))),
        ),
        labels: Default::default(),
    }
}

async fn admin(vault: &TestVault, dir: &VaultDir) -> VaultAdminClient<Channel> {
    VaultAdminClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
            .await,
    )
}

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

/// Adds a key version and makes it primary, on disk.
fn rotate(dir: &VaultDir) -> KeyVersion {
    let mut keyring = dir.keyring();
    let new = keyring.add().unwrap();
    keyring.promote(new).unwrap();
    write_keyring(&dir.keyring_path(), &keyring);
    new
}

fn edit_keyring(dir: &VaultDir, change: impl FnOnce(&mut Keyring)) {
    let mut keyring = dir.keyring();
    change(&mut keyring);
    write_keyring(&dir.keyring_path(), &keyring);
}

async fn counts(admin: &mut VaultAdminClient<Channel>) -> Vec<(u32, u64)> {
    let status = admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    status
        .versions
        .iter()
        .map(|v| (v.version, v.record_count))
        .collect()
}

/// Deposits `n` credentials `user-0 .. user-n` with 16 concurrent callers.
async fn populate(vault: &TestVault, dir: &VaultDir, provider: &ProviderDouble, n: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let mut client = vault.client(dir, "admin").await;
        let next = Arc::clone(&next);
        let requests: Vec<_> = (0..n)
            .map(|i| deposit(provider, &format!("user-{i}"), &format!("at-{i}")))
            .collect();
        let requests = Arc::new(requests);
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests.len() {
                    break;
                }
                client.deposit(requests[i].clone()).await.unwrap();
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
}

async fn wait_for_rewrap(admin: &mut VaultAdminClient<Channel>) -> pb::RewrapStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = admin
            .get_rewrap_status(pb::GetRewrapStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.state != pb::RewrapState::Running as i32 {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rewrap did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_call() {
    let provider = Arc::new(ProviderDouble::start().await);
    provider.register_client(CLIENT_ID, Some(CLIENT_SECRET));
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    populate(&vault, &dir, &provider, 20).await;

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for worker in 0..4 {
        let mut client = vault.client(&dir, "admin").await;
        let (stop, calls) = (Arc::clone(&stop), Arc::clone(&calls));
        let provider = Arc::clone(&provider);
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let subject = format!("user-{}", i % 20);
                match i % 3 {
                    // Deposits re-seal under whatever key is primary right now.
                    // Each with a fresh grant: re-depositing a refresh token
                    // the provider has since rotated would deposit a dead one.
                    0 => {
                        let request = deposit(&provider, &subject, &format!("at-{worker}-{i}"));
                        client.deposit(request).await.unwrap();
                    }
                    // Refreshes write back under the new primary too.
                    1 => {
                        let mut long = get_request("acme", &subject, "idp");
                        long.min_valid_for = Some(prost_types::Duration {
                            seconds: 7200,
                            nanos: 0,
                        });
                        client.get_access_token(long).await.unwrap();
                    }
                    _ => {
                        client
                            .get_access_token(get_request("acme", &subject, "idp"))
                            .await
                            .unwrap();
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    let mut admin = admin(&vault, &dir).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = rotate(&dir);
    admin
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.expect("a call failed during rotation");
    }
    assert!(calls.load(Ordering::Relaxed) > 50);

    // New writes are sealed under the new primary.
    let mut client = vault.client(&dir, "admin").await;
    let deposited = client
        .deposit(deposit(&provider, "late", "at-late"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deposited.key_version, v2.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_every_record_then_the_old_key_can_go() {
    const N: usize = 10_000;
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    populate(&vault, &dir, &provider, N).await;
    let mut admin = admin(&vault, &dir).await;
    assert_eq!(counts(&mut admin).await, [(1, N as u64)]);

    let v2 = rotate(&dir);
    admin
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    let started = admin
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 1_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.target_version, v2.get());
    let done = wait_for_rewrap(&mut admin).await;
    assert_eq!(done.state, pb::RewrapState::Done as i32, "{done:?}");
    assert_eq!((done.rewrapped, done.failed), (N as u64, 0));
    assert_eq!(counts(&mut admin).await, [(1, 0), (2, N as u64)]);

    // Nothing is left under v1: retire it, destroy it, restart, and every
    // record still opens.
    edit_keyring(&dir, |k| {
        k.retire(v(1)).unwrap();
        k.destroy(v(1)).unwrap();
    });
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    for i in (0..N).step_by(7) {
        let token = client
            .get_access_token(get_request("acme", &format!("user-{i}"), "idp"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(token.access_token, format!("at-{i}"));
    }
    assert_eq!(provider.refresh_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_killed_midway_resumes_and_loses_nothing() {
    const N: usize = 1_500;
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    populate(&vault, &dir, &provider, N).await;
    rotate(&dir);
    let mut admin_client = admin(&vault, &dir).await;
    admin_client
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    // Slow enough to be stopped midway.
    admin_client
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 1_000,
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = admin_client
            .get_rewrap_status(pb::GetRewrapStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.rewrapped >= 300 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Hang up first: an open connection keeps the old server's store open.
    drop(admin_client);
    vault.stop().await.unwrap();

    let vault = TestVault::start(&dir).await;
    let mut admin_client = admin(&vault, &dir).await;
    let before = counts(&mut admin_client).await;
    assert!(before[0].1 > 0 && before[1].1 >= 300, "{before:?}");
    admin_client
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 1_000_000,
        })
        .await
        .unwrap();
    let done = wait_for_rewrap(&mut admin_client).await;
    assert_eq!(done.state, pb::RewrapState::Done as i32);
    // Resumed from its cursor: it did not look at the whole store again.
    assert!(done.total < N as u64, "{done:?}");
    assert_eq!(counts(&mut admin_client).await, [(1, 0), (2, N as u64)]);

    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    for i in 0..N {
        let token = client
            .get_access_token(get_request("acme", &format!("user-{i}"), "idp"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(token.access_token, format!("at-{i}"));
    }
}

#[tokio::test]
async fn retired_versions_stop_decrypting_until_reactivated() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    client
        .deposit(deposit(&provider, "old", "at-old"))
        .await
        .unwrap();
    rotate(&dir);
    edit_keyring(&dir, |k| k.retire(v(1)).unwrap());
    // A restart empties the cache, so the get must open the record.
    vault.stop().await.unwrap();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let status = client
        .get_access_token(get_request("acme", "old", "idp"))
        .await
        .unwrap_err();
    let (reason, _, metadata) = error_info(&status);
    assert_eq!(reason, "KEY_VERSION_UNAVAILABLE");
    assert_eq!(metadata["key_version"], "1");

    // The operator notices and undoes it; no restart needed.
    edit_keyring(&dir, |k| k.reactivate(v(1)).unwrap());
    admin(&vault, &dir)
        .await
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    let token = client
        .get_access_token(get_request("acme", "old", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.access_token, "at-old");
}

#[tokio::test]
async fn a_reload_with_swapped_key_material_is_refused_and_changes_nothing() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    client
        .deposit(deposit(&provider, "u", "at-u"))
        .await
        .unwrap();

    write_keyring(&dir.keyring_path(), &Keyring::generate());
    let status = admin(&vault, &dir)
        .await
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "KEYRING_REJECTED");
    assert!(
        status.message().contains("fingerprint"),
        "{}",
        status.message()
    );

    // The running keyring is untouched: records still open and deposits work.
    let deposited = client
        .deposit(deposit(&provider, "v", "at-v"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deposited.key_version, 1);
}

#[tokio::test]
async fn the_keyring_file_is_watched_and_unreadable_records_are_reported_not_rewritten() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let dir = VaultDir::custom("allow_http_loopback = true", "");
    // Watch the keyring file every 100 ms.
    dir.replace_in_config(
        "passphrase_file = \"keyring.passphrase\"",
        "passphrase_file = \"keyring.passphrase\"\nwatch_interval = \"100ms\"",
    );

    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    client
        .deposit(deposit(&provider, "a", "at-a"))
        .await
        .unwrap();
    client
        .deposit(deposit(&provider, "b", "at-b"))
        .await
        .unwrap();
    vault.stop().await.unwrap();
    // Damage one record's envelope magic.
    {
        use credvault::store::StoreKey;
        let store = dir.open_store().await;
        let key = StoreKey::new("acme", "b", "idp");
        let current = store.get(&key).await.unwrap().unwrap();
        let mut value = current.value.clone();
        value[8] ^= 0xff;
        store
            .compare_and_swap(&key, Some(current.revision), Some(value.clone()))
            .await
            .unwrap();
    }
    let vault = TestVault::start(&dir).await;
    let mut admin_client = admin(&vault, &dir).await;

    let v2 = rotate(&dir);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut client = vault.client(&dir, "admin").await;
    loop {
        let deposited = client
            .deposit(deposit(&provider, "c", "at-c"))
            .await
            .unwrap()
            .into_inner();
        if deposited.key_version == v2.get() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watched keyring was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    admin_client
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 0,
        })
        .await
        .unwrap();
    let done = wait_for_rewrap(&mut admin_client).await;
    assert_eq!((done.rewrapped, done.failed), (1, 1), "{done:?}");
    let status = admin_client
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.unreadable_records, 1);
    let described = admin_client
        .describe_credential(pb::DescribeCredentialRequest {
            credential: reference("acme", "b", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.state, pb::CredentialState::Unreadable as i32);
    // The damaged record was left exactly as it was, and the vault serves on.
    assert_eq!(
        error_info(
            &client
                .get_access_token(get_request("acme", "b", "idp"))
                .await
                .unwrap_err()
        )
        .0,
        "RECORD_UNREADABLE"
    );
    client
        .get_access_token(get_request("acme", "a", "idp"))
        .await
        .unwrap();
}
