//! Storage faults: the data directory fills up, or is read-only.
//!
//! The data directory is a small tmpfs mounted for the test (root only:
//! `chmod` does not stop root, and a tmpfs is a real file system that
//! answers ENOSPC). Without the privilege to mount, the tests say so and
//! return; CI runs as root, so there they run.
//!
//! Making the file system read-only *while the vault runs* cannot be done:
//! `mount -o remount,ro` (and a read-only bind remount) fail with EBUSY while
//! a process holds files open for writing, which the store always does. So
//! read-only is tested at start-up: the vault must refuse to start with one
//! line naming the problem, never panic or serve without a store.

mod support;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use credvault::api::pb::{
    self, credential_vault_client::CredentialVaultClient, vault_admin_client::VaultAdminClient,
};
use support::{provider::ProviderDouble, vault::*};
use tonic::{transport::Channel, Code, Status};

const CLIENT_ID: &str = "storage-client";
const CLIENT_SECRET: &str = "storage-client-secret-0d77";
/// No storage fault may make a call wait longer than this.
const CALL_BOUND: Duration = Duration::from_secs(10);

/// A tmpfs mounted for one test; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `None` when this process may not mount (not root, no CAP_SYS_ADMIN).
    fn mount(path: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

macro_rules! tmpfs_or_skip {
    ($path:expr, $options:expr) => {
        match Tmpfs::mount($path, $options) {
            Some(mount) => mount,
            None => {
                eprintln!("SKIPPED: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)");
                return;
            }
        }
    };
}

/// Writes a filler file until the file system answers ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if let Err(error) = file.write_all(&chunk) {
            assert_eq!(error.raw_os_error(), Some(28), "expected ENOSPC: {error}");
            break;
        }
    }
    // Byte-sized leftovers too, so the next page the store needs is not there.
    while file.write_all(&[0]).is_ok() {}
    path
}

fn reason(status: &Status) -> String {
    error_info(status).0
}

struct Setup {
    provider: ProviderDouble,
    dir: VaultDir,
}

impl Setup {
    async fn new() -> Self {
        let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
        Self {
            provider,
            dir: VaultDir::new(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn deposit_request(&self, subject: &str) -> pb::DepositRequest {
        let refresh_token = self.provider.issue_refresh_token(CLIENT_ID);
        pb::DepositRequest {
            credential: reference("acme", subject, "idp"),
            client: oauth_client(&self.provider.token_url(), CLIENT_ID, CLIENT_SECRET),
            grant: refresh_grant(
                &refresh_token,
                Some((
                    &format!("at-{subject}"),
                    SystemTime::now() + Duration::from_secs(3600),
                )),
            ),
            labels: Default::default(),
        }
    }
}

async fn bounded<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = tokio::time::timeout(CALL_BOUND, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_BOUND:?} (hang)"));
    println!("{what}: answered in {:?}", started.elapsed());
    out
}

fn long_get(subject: &str) -> pb::GetAccessTokenRequest {
    let mut request = get_request("acme", subject, "idp");
    request.min_valid_for = Some(prost_types::Duration {
        seconds: 2 * 3600,
        nanos: 0,
    });
    request
}

async fn admin_client(vault: &TestVault, dir: &VaultDir) -> VaultAdminClient<Channel> {
    VaultAdminClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
            .await,
    )
}

/// A running vault on a tmpfs that has just filled up: `alice` and `bob`
/// deposited before, then deposits until the first one is refused.
struct FullDisk {
    vault: TestVault,
    client: CredentialVaultClient<Channel>,
    /// Every subject whose deposit was acknowledged.
    acked: Vec<String>,
    /// The subject whose deposit was refused, and the refusal.
    refused: (String, Status),
    filler: PathBuf,
}

impl FullDisk {
    async fn fill(setup: &Setup) -> Self {
        let vault = TestVault::start(&setup.dir).await;
        let mut client = vault.client(&setup.dir, "admin").await;
        let mut acked = Vec::new();
        for subject in ["alice", "bob"] {
            client
                .deposit(setup.deposit_request(subject))
                .await
                .unwrap();
            acked.push(subject.to_owned());
        }
        let filler = fill(&setup.data());
        // A few small writes may still fit in pages the store already has;
        // those are acknowledged and must survive like any other.
        for i in 0..500 {
            let subject = format!("fill-{i:03}");
            let answer = bounded(
                "deposit on a full disk",
                client.deposit(setup.deposit_request(&subject)),
            )
            .await;
            match answer {
                Ok(_) => acked.push(subject),
                Err(status) => {
                    println!("full disk: {} deposits acknowledged, then refused", i);
                    return Self {
                        vault,
                        client,
                        acked,
                        refused: (subject, status),
                        filler,
                    };
                }
            }
        }
        panic!("500 deposits were acknowledged on a full file system");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_typed_keeps_reads_and_loses_nothing_acknowledged() {
    let setup = Setup::new().await;
    let _mount = tmpfs_or_skip!(&setup.data(), "size=16m,mode=0700");
    let FullDisk {
        vault,
        mut client,
        acked,
        refused: (_, denied),
        filler,
    } = FullDisk::fill(&setup).await;

    // Writes fail typed, in bounded time.
    assert_eq!(denied.code(), Code::Unavailable, "{denied:?}");
    assert_eq!(reason(&denied), "STORAGE_UNAVAILABLE");
    let revoke = bounded(
        "revoke on a full disk",
        client.revoke(pb::RevokeRequest {
            credential: reference("acme", "bob", "idp"),
        }),
    )
    .await
    .expect_err("a revoke cannot be durable on a full disk");
    assert_eq!(revoke.code(), Code::Unavailable, "{revoke:?}");
    assert_eq!(reason(&revoke), "STORAGE_UNAVAILABLE");

    // Reads keep working: a cached token, metadata, key status.
    let token = bounded(
        "get (cached) on a full disk",
        client.get_access_token(get_request("acme", "alice", "idp")),
    )
    .await
    .expect("a cached token needs no write")
    .into_inner();
    assert_eq!(token.access_token, "at-alice");
    let mut admin = admin_client(&vault, &setup.dir).await;
    let meta = bounded(
        "describe on a full disk",
        admin.describe_credential(pb::DescribeCredentialRequest {
            credential: reference("acme", "alice", "idp"),
        }),
    )
    .await
    .expect("metadata reads need no write")
    .into_inner();
    assert_eq!(meta.state, pb::CredentialState::Active as i32);
    bounded(
        "key status on a full disk",
        admin.get_key_status(pb::GetKeyStatusRequest {}),
    )
    .await
    .expect("key status is a read");

    // Space returns; after a restart every acknowledged write is there,
    // nothing is torn, and writes work.
    std::fs::remove_file(&filler).unwrap();
    drop((admin, client));
    vault.stop().await.unwrap();
    let vault = TestVault::start(&setup.dir).await;
    let mut client = vault.client(&setup.dir, "admin").await;
    for subject in &acked {
        client
            .get_access_token(get_request("acme", subject, "idp"))
            .await
            .unwrap_or_else(|s| panic!("acknowledged {subject} lost: {s:?}"));
    }
    let status = admin_client(&vault, &setup.dir)
        .await
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.unreadable_records, 0);
    assert_eq!(status.records_under_unknown_versions, 0);
    let records: u64 = status.versions.iter().map(|v| v.record_count).sum();
    assert_eq!(
        records,
        acked.len() as u64,
        "exactly the acknowledged records"
    );
    client
        .deposit(setup.deposit_request("carol"))
        .await
        .expect("writes work after the restart");
    client
        .get_access_token(long_get("carol"))
        .await
        .expect("refresh write-backs work after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deposit_is_never_visible() {
    let setup = Setup::new().await;
    let _mount = tmpfs_or_skip!(&setup.data(), "size=16m,mode=0700");
    let full = FullDisk::fill(&setup).await;
    let (refused, _) = &full.refused;
    let mut client = full.client.clone();
    let ghost = client
        .get_access_token(get_request("acme", refused, "idp"))
        .await
        .map(|r| r.into_inner().access_token);
    assert!(
        matches!(&ghost, Err(s) if reason(s) == "CREDENTIAL_NOT_FOUND"),
        "the caller was told the deposit failed, yet it is served: {ghost:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// sled latches an I/O error: once a flush has failed, writes keep failing
// until the process restarts. The vault makes that visible instead of
// limping on: liveness and readiness fail, so the orchestrator restarts it,
// and after the restart (space back) writes work again (see the test above).
async fn a_latched_storage_failure_fails_the_probes_so_the_vault_is_restarted() {
    let setup = Setup::new().await;
    let _mount = tmpfs_or_skip!(&setup.data(), "size=16m,mode=0700");
    let full = FullDisk::fill(&setup).await;
    assert_eq!(readyz(full.vault.ops_addr).await, Some(503));
    assert_eq!(http_status(full.vault.ops_addr, "/livez").await, Some(503));
}

async fn http_status(ops: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(ops).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: ops\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_during_a_storage_outage_does_not_burn_the_grant() {
    let setup = Setup::new().await;
    let _mount = tmpfs_or_skip!(&setup.data(), "size=16m,mode=0700");
    let mut full = FullDisk::fill(&setup).await;
    let calls_before = setup.provider.refresh_calls();
    let answer = full.client.get_access_token(long_get("alice")).await;
    println!(
        "refresh during the outage: {:?}, provider refresh calls {}",
        answer.as_ref().map(|_| ()).map_err(reason),
        setup.provider.refresh_calls() - calls_before
    );
    std::fs::remove_file(&full.filler).unwrap();
    drop(full.client);
    full.vault.stop().await.unwrap();
    let vault = TestVault::start(&setup.dir).await;
    let mut client = vault.client(&setup.dir, "admin").await;
    client
        .get_access_token(long_get("alice"))
        .await
        .expect("alice's grant must survive a storage outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_data_dir_refuses_to_start_with_one_line() {
    let setup = Setup::new().await;
    let mount = tmpfs_or_skip!(&setup.data(), "size=4m,mode=0700");
    // A store created, then the file system made read-only (no process has
    // files open for writing now, so the remount is allowed).
    {
        let vault = TestVault::start(&setup.dir).await;
        let mut client = vault.client(&setup.dir, "admin").await;
        client
            .deposit(setup.deposit_request("alice"))
            .await
            .unwrap();
        drop(client);
        vault.stop().await.unwrap();
    }
    let remount = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&mount.path)
        .status()
        .unwrap();
    assert!(remount.success(), "remount read-only failed");

    let started = Instant::now();
    let error = tokio::time::timeout(CALL_BOUND, TestVault::try_start(setup.dir.config()))
        .await
        .expect("start-up on a read-only store must not hang");
    let Err(error) = error else {
        panic!("the vault started on a read-only data directory");
    };
    let message = error.to_string();
    println!(
        "read-only start refused in {:?}: {message}",
        started.elapsed()
    );
    assert!(!message.contains('\n'), "one line: {message:?}");
    assert!(
        message.to_lowercase().contains("read-only") || message.contains("os error 30"),
        "the message should name the problem: {message}"
    );
}
