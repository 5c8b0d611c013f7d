//! Crash consistency: the real `credvault` binary, killed with SIGKILL at
//! random moments under a mixed load, restarted on the same data directory.
//!
//! The load runs against the provider double of `support::provider` in this
//! process, with refresh-token rotation and reuse detection on: a vault that
//! comes back with an old refresh token replays it, the provider answers
//! `invalid_grant` (and kills the whole token family), and the vault's answer
//! is `REAUTH_REQUIRED`. So "the refresh token the vault holds is the
//! provider's live one" is checked end to end by a GetAccessToken with
//! `min_valid_for = 2h` (provider tokens live 1h, so every such call refreshes
//! and rotates).
//!
//! Each credential is driven by one worker at a time, so the model of what
//! the vault must hold is exact except for the one call per worker that was in
//! flight when the process died. Its outcome was never acknowledged, so either
//! outcome is accepted for it — with one class counted apart: a refresh that
//! the provider answered (rotating the refresh token) but whose write-back the
//! kill prevented. The rotated token existed only in the dead process; the old
//! one is spent, so the grant is gone. That loss is inherent in refresh-token
//! rotation without a provider-side grace period (the vault cannot persist a
//! token before the provider issues it), it can only happen to an
//! UNACKNOWLEDGED refresh, and it is reported as `rotations lost in flight`,
//! not as a failure. What must never happen, and fails the test:
//! - an acknowledged Deposit or Revoke not reflected after the restart;
//! - an acknowledged rotation lost (the vault replaying a token older than the
//!   last one it answered with);
//! - a corrupt record (`GetKeyStatus.unreadable_records > 0`, or any call
//!   answering `RECORD_UNREADABLE`);
//! - a change without its event, or an event without its change (DESIGN
//!   §5e): after the last restart the whole event log is replayed per
//!   credential. Generations only move by one per Deposit, so a replay in
//!   which every DEPOSITED follows its predecessor, every REVOKED names the
//!   generation it deleted, and the end state equals what the vault holds,
//!   proves both; every acknowledged Deposit and Revoke must also be in it.
//!
//! `CREDVAULT_CRASH_CYCLES` sets the number of kills (default 5, for CI;
//! the full run uses 20 or more), `CREDVAULT_CRASH_SEED` replays a run.

mod support;

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use credvault::api::pb::{
    self, credential_vault_client::CredentialVaultClient, vault_admin_client::VaultAdminClient,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use support::{provider::ProviderDouble, vault::*};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Status,
};
use tonic_types::StatusExt;

const CLIENT_ID: &str = "crash-client";
const CLIENT_SECRET: &str = "crash-client-secret-9b1e";
const TENANT: &str = "acme";
const PROVIDER: &str = "idp";
const WORKERS: usize = 4;
const CREDENTIALS_PER_WORKER: usize = 6;

// ---- the vault as a child process ------------------------------------------

/// One run of `credvault serve`, on fresh ports, logging to `log`.
struct VaultProcess {
    child: Child,
    addr: SocketAddr,
}

impl VaultProcess {
    async fn start(dir: &VaultDir, log: &Path) -> Self {
        let (addr, ops) = (support::dev::free_addr(), support::dev::free_addr());
        let out = File::options().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_credvault"))
            .arg("serve")
            .arg("--config")
            .arg(dir.path().join("credvault.toml"))
            .env_remove("RUST_LOG")
            .env("CREDVAULT_LISTEN", addr.to_string())
            .env("CREDVAULT_OPS_LISTEN", ops.to_string())
            .env("CREDVAULT_LOG__FILTER", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut process = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while readyz(ops).await != Some(200) {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("vault exited during start-up ({status}):\n{}", tail(log));
            }
            assert!(
                Instant::now() < deadline,
                "vault not ready in 60 s:\n{}",
                tail(log)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        process
    }

    /// SIGKILL (std's `Child::kill`), then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VaultProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn channel(dir: &VaultDir, addr: SocketAddr) -> Channel {
    let cert = &dir.pki.clients["admin"];
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(dir.pki.ca.ca_cert_pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect_lazy()
}

// ---- the model -----------------------------------------------------------------

/// What the vault must hold for one credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    Absent,
    Present { generation: u64 },
}

impl Stored {
    fn after_deposit(self) -> Stored {
        match self {
            Stored::Absent => Stored::Present { generation: 1 },
            Stored::Present { generation } => Stored::Present {
                generation: generation + 1,
            },
        }
    }
}

/// A call whose answer never came back (the vault died under it).
#[derive(Clone, Debug)]
enum Op {
    Deposit,
    Get,
    Revoke,
}

#[derive(Debug)]
struct Cred {
    subject: String,
    expected: Stored,
    in_flight: Option<Op>,
    /// Acknowledged changes, as the events they must have logged.
    acked: Vec<(pb::CredentialEventType, u64)>,
}

#[derive(Default, Debug)]
struct Tally {
    acked_deposits: u64,
    acked_refreshes: u64,
    acked_revokes: u64,
    /// Calls in flight at a kill (outcome unknown, either accepted).
    ambiguous: u64,
    /// Acknowledged deposits or revokes not reflected after a restart.
    acked_writes_lost: u64,
    /// Acknowledged rotations lost: the vault replayed an older refresh token.
    acked_rotations_lost: u64,
    /// Unacknowledged refreshes whose rotated token died with the process.
    rotations_lost_in_flight: u64,
    /// RECORD_UNREADABLE answers or unreadable records in GetKeyStatus.
    corrupt: u64,
    /// Everything that went wrong, for the failure message.
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.acked_deposits += other.acked_deposits;
        self.acked_refreshes += other.acked_refreshes;
        self.acked_revokes += other.acked_revokes;
        self.ambiguous += other.ambiguous;
        self.acked_writes_lost += other.acked_writes_lost;
        self.acked_rotations_lost += other.acked_rotations_lost;
        self.rotations_lost_in_flight += other.rotations_lost_in_flight;
        self.corrupt += other.corrupt;
        self.failures.extend(other.failures);
    }
}

/// A typed answer of the vault carries a credvault ErrorInfo; anything else
/// (reset, refused, cancelled) is the transport failing under a kill.
fn reason(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .filter(|info| info.domain == "credvault")
        .map(|info| info.reason.clone())
}

struct Load {
    provider: Arc<ProviderDouble>,
    token_url: String,
    revocation_url: String,
}

impl Load {
    fn deposit_request(&self, subject: &str) -> pb::DepositRequest {
        let refresh_token = self.provider.issue_refresh_token(CLIENT_ID);
        let mut client = oauth_client(&self.token_url, CLIENT_ID, CLIENT_SECRET).unwrap();
        // Revoke then deletes locally (durably) before it revokes upstream: a
        // kill in between must never leave a record whose grant is dead.
        client.revocation_endpoint = self.revocation_url.clone();
        pb::DepositRequest {
            credential: reference(TENANT, subject, PROVIDER),
            client: Some(client),
            grant: refresh_grant(&refresh_token, None),
            labels: Default::default(),
        }
    }
}

fn long_get(subject: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        credential: reference(TENANT, subject, PROVIDER),
        // Provider tokens live 1 h: every call refreshes, and rotates.
        min_valid_for: Some(prost_types::Duration {
            seconds: 2 * 3600,
            nanos: 0,
        }),
        force_refresh: false,
    }
}

/// Drives its own credentials until the vault dies (or `stop`).
async fn worker(
    load: Arc<Load>,
    mut creds: Vec<Cred>,
    mut client: CredentialVaultClient<Channel>,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
) -> (Vec<Cred>, Tally) {
    let mut tally = Tally::default();
    while !stop.load(Ordering::SeqCst) {
        let cred = &mut creds[rng.gen_range(0..CREDENTIALS_PER_WORKER)];
        let op = match (cred.expected, rng.gen_range(0..10)) {
            (Stored::Absent, _) | (_, 0..=1) => Op::Deposit,
            (_, 2) => Op::Revoke,
            _ => Op::Get,
        };
        let result = match op {
            Op::Deposit => client
                .deposit(load.deposit_request(&cred.subject))
                .await
                .map(|r| {
                    let generation = r.into_inner().generation;
                    let expected = cred.expected.after_deposit();
                    if expected != (Stored::Present { generation }) {
                        tally.failures.push(format!(
                            "{}: deposit answered generation {generation}, model {expected:?}",
                            cred.subject
                        ));
                    }
                    cred.expected = Stored::Present { generation };
                    cred.acked
                        .push((pb::CredentialEventType::Deposited, generation));
                    tally.acked_deposits += 1;
                }),
            Op::Get => client
                .get_access_token(long_get(&cred.subject))
                .await
                .map(|_| {
                    tally.acked_refreshes += 1;
                }),
            Op::Revoke => client
                .revoke(pb::RevokeRequest {
                    credential: reference(TENANT, &cred.subject, PROVIDER),
                })
                .await
                .map(|r| {
                    if !r.into_inner().existed {
                        tally.failures.push(format!(
                            "{}: revoke of a present grant said !existed",
                            cred.subject
                        ));
                    }
                    if let Stored::Present { generation } = cred.expected {
                        cred.acked
                            .push((pb::CredentialEventType::Revoked, generation));
                    }
                    cred.expected = Stored::Absent;
                    tally.acked_revokes += 1;
                }),
        };
        if let Err(status) = result {
            match reason(&status) {
                // The vault answered while alive: no such answer is expected
                // under this load.
                Some(reason) if !stop.load(Ordering::SeqCst) => tally.failures.push(format!(
                    "{}: {op:?} answered {reason} during the load: {}",
                    cred.subject,
                    status.message()
                )),
                _ => {
                    cred.in_flight = Some(op);
                    tally.ambiguous += 1;
                }
            }
            break;
        }
    }
    (creds, tally)
}

/// After a restart: resolve the calls that were in flight, then check every
/// credential against the model, through the vault.
async fn verify(
    load: &Load,
    creds: &mut [Cred],
    client: &mut CredentialVaultClient<Channel>,
    admin: &mut VaultAdminClient<Channel>,
) -> Tally {
    let mut tally = Tally::default();
    for cred in creds.iter_mut() {
        let subject = cred.subject.clone();
        let actual = match admin
            .describe_credential(pb::DescribeCredentialRequest {
                credential: reference(TENANT, &subject, PROVIDER),
            })
            .await
        {
            Ok(meta) => {
                let meta = meta.into_inner();
                if meta.state != pb::CredentialState::Active as i32 {
                    if meta.state == pb::CredentialState::Unreadable as i32 {
                        tally.corrupt += 1;
                    }
                    tally.failures.push(format!(
                        "{subject}: state {} after restart (reauth {:?}, unreadable {:?})",
                        meta.state, meta.reauth_cause, meta.unreadable_reason
                    ));
                }
                Stored::Present {
                    generation: meta.generation,
                }
            }
            Err(status) if status.code() == Code::NotFound => Stored::Absent,
            Err(status) => {
                tally
                    .failures
                    .push(format!("{subject}: describe failed: {status:?}"));
                continue;
            }
        };
        let mut refresh_in_flight = false;
        let must_be = match cred.in_flight.take() {
            None => Some(cred.expected),
            // Either outcome of an unacknowledged write is fine.
            Some(Op::Deposit) => [cred.expected, cred.expected.after_deposit()]
                .contains(&actual)
                .then_some(actual),
            Some(Op::Revoke) => [cred.expected, Stored::Absent]
                .contains(&actual)
                .then_some(actual),
            Some(Op::Get) => {
                refresh_in_flight = true;
                Some(cred.expected)
            }
        };
        if must_be != Some(actual) {
            tally.acked_writes_lost += 1;
            tally.failures.push(format!(
                "{subject}: model {:?} (in flight resolved to {must_be:?}), vault holds {actual:?}",
                cred.expected
            ));
        }
        cred.expected = actual;

        let answer = client.get_access_token(long_get(&subject)).await;
        match (actual, answer) {
            (Stored::Present { .. }, Ok(_)) => {}
            (Stored::Absent, Err(status))
                if reason(&status).as_deref() == Some("CREDENTIAL_NOT_FOUND") => {}
            (Stored::Present { .. }, Err(status))
                if reason(&status).as_deref() == Some("REAUTH_REQUIRED") =>
            {
                // The vault replayed a spent refresh token (the provider's
                // reuse detection said invalid_grant).
                if refresh_in_flight {
                    tally.rotations_lost_in_flight += 1;
                } else {
                    tally.acked_rotations_lost += 1;
                    tally.failures.push(format!(
                        "{subject}: acknowledged rotation lost: {}",
                        status.message()
                    ));
                }
                // A new consent, so the load can go on with this credential.
                match client.deposit(load.deposit_request(&subject)).await {
                    Ok(r) => {
                        let generation = r.into_inner().generation;
                        cred.acked
                            .push((pb::CredentialEventType::Deposited, generation));
                        cred.expected = Stored::Present { generation };
                    }
                    Err(status) => tally
                        .failures
                        .push(format!("{subject}: re-deposit failed: {status:?}")),
                }
            }
            (_, answer) => {
                if let Err(status) = &answer {
                    if reason(status).as_deref() == Some("RECORD_UNREADABLE") {
                        tally.corrupt += 1;
                    }
                }
                tally.failures.push(format!(
                    "{subject}: vault holds {actual:?}, get answered {:?}",
                    answer.map(|_| "a token")
                ));
            }
        }
    }

    match admin.get_key_status(pb::GetKeyStatusRequest {}).await {
        Ok(status) => {
            let status = status.into_inner();
            let records: u64 = status.versions.iter().map(|v| v.record_count).sum();
            let present = creds
                .iter()
                .filter(|c| c.expected != Stored::Absent)
                .count() as u64;
            if status.unreadable_records != 0 || status.records_under_unknown_versions != 0 {
                tally.corrupt += status.unreadable_records;
                tally.failures.push(format!(
                    "key status: {} unreadable, {} under unknown versions",
                    status.unreadable_records, status.records_under_unknown_versions
                ));
            }
            if records != present {
                tally.failures.push(format!(
                    "key status counts {records} records, the model {present}"
                ));
            }
        }
        Err(status) => tally
            .failures
            .push(format!("GetKeyStatus failed: {status:?}")),
    }
    tally
}

/// Replays the whole event log per credential against the final state
/// (see the module documentation); returns how many events it read.
async fn replay_events(creds: &[Cred], client: &mut CredentialVaultClient<Channel>) -> usize {
    use pb::CredentialEventType as Type;
    let mut stream = client
        .watch_credential_events(pb::WatchCredentialEventsRequest {
            tenant: TENANT.into(),
            after: "0".repeat(32),
            types: Vec::new(),
        })
        .await
        .expect("the event log can be read")
        .into_inner();
    let mut by_subject: std::collections::HashMap<String, Vec<(Type, u64)>> = Default::default();
    let mut read = 0;
    // History streams at once; three quiet seconds mean it is all here.
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
        let event = next
            .expect("the stream stays healthy")
            .expect("streams do not end");
        read += 1;
        let subject = event.credential.unwrap().subject;
        let kind = Type::try_from(event.r#type).unwrap();
        by_subject
            .entry(subject)
            .or_default()
            .push((kind, event.generation));
    }
    let mut failures = Vec::new();
    for cred in creds {
        let events = by_subject.remove(&cred.subject).unwrap_or_default();
        let mut state = Stored::Absent;
        for &(kind, generation) in &events {
            let next = match (kind, state) {
                (Type::Deposited, _) if Stored::Present { generation } == state.after_deposit() => {
                    Stored::Present { generation }
                }
                (Type::Revoked, Stored::Present { generation: held }) if held == generation => {
                    Stored::Absent
                }
                (
                    Type::ReauthRequired | Type::RefreshFailing | Type::Recovered,
                    Stored::Present { generation: held },
                ) if held == generation => state,
                _ => {
                    failures.push(format!(
                        "{}: {kind:?} generation {generation} does not follow {state:?} in {events:?}",
                        cred.subject
                    ));
                    break;
                }
            };
            state = next;
        }
        if state != cred.expected {
            failures.push(format!(
                "{}: the log replays to {state:?}, the vault holds {:?}",
                cred.subject, cred.expected
            ));
        }
        let mut logged = events.clone();
        for acked in &cred.acked {
            match logged.iter().position(|e| e == acked) {
                Some(at) => {
                    logged.remove(at);
                }
                None => failures.push(format!(
                    "{}: acknowledged {acked:?} has no event",
                    cred.subject
                )),
            }
        }
    }
    assert!(
        by_subject.is_empty(),
        "events of credentials never touched: {by_subject:?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(read > 0, "the load logged no events");
    read
}

fn cycles() -> usize {
    std::env::var("CREDVAULT_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn seed() -> u64 {
    std::env::var("CREDVAULT_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_write() {
    let cycles = cycles();
    let seed = seed();
    println!("crash: seed {seed} (CREDVAULT_CRASH_SEED={seed} replays the kill schedule), {cycles} cycles");
    let mut rng = StdRng::seed_from_u64(seed);

    let provider = Arc::new(ProviderDouble::start().await);
    provider.register_client(CLIENT_ID, Some(CLIENT_SECRET));
    provider.set_rotation(true);
    provider.set_reuse_detection(true);
    let load = Arc::new(Load {
        token_url: provider.token_url(),
        revocation_url: provider.revocation_url(),
        provider: Arc::clone(&provider),
    });

    let dir = VaultDir::new();
    let log: PathBuf = dir.path().join("vault.log");
    let mut creds: Vec<Cred> = (0..WORKERS * CREDENTIALS_PER_WORKER)
        .map(|i| Cred {
            subject: format!("user-{i:02}"),
            expected: Stored::Absent,
            in_flight: None,
            acked: Vec::new(),
        })
        .collect();
    let mut total = Tally::default();
    let started = Instant::now();

    for cycle in 0..=cycles {
        let mut vault = VaultProcess::start(&dir, &log).await;
        let channel = channel(&dir, vault.addr);
        let mut client = CredentialVaultClient::new(channel.clone());
        let mut admin = VaultAdminClient::new(channel.clone());
        if cycle > 0 {
            total.add(verify(&load, &mut creds, &mut client, &mut admin).await);
        }
        if cycle == cycles {
            let events = replay_events(&creds, &mut client).await;
            println!("crash: {events} events replayed against the final state");
            break;
        }

        // The load: each worker owns CREDENTIALS_PER_WORKER credentials.
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut rest = std::mem::take(&mut creds);
        for _ in 0..WORKERS {
            let mine: Vec<Cred> = rest.drain(..CREDENTIALS_PER_WORKER).collect();
            tasks.push(tokio::spawn(worker(
                Arc::clone(&load),
                mine,
                CredentialVaultClient::new(channel.clone()),
                StdRng::seed_from_u64(rng.gen()),
                Arc::clone(&stop),
            )));
        }
        let kill_after = Duration::from_millis(rng.gen_range(150..1500));
        tokio::time::sleep(kill_after).await;
        vault.kill();
        stop.store(true, Ordering::SeqCst);
        let mut acked = 0;
        for task in tasks {
            let (mine, tally) = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("a worker did not notice the kill within 30 s")
                .unwrap();
            acked += tally.acked_deposits + tally.acked_refreshes + tally.acked_revokes;
            creds.extend(mine);
            total.add(tally);
        }
        println!(
            "cycle {}: killed after {kill_after:?}, {acked} calls acknowledged",
            cycle + 1
        );
    }

    let summary = format!(
        "crash summary: seed={seed} cycles={cycles} acked_deposits={} acked_refreshes={} acked_revokes={} \
         in_flight_at_kill={} acked_writes_lost={} rotated_tokens_lost={} rotations_lost_in_flight={} \
         corrupt_records={} elapsed={:.1?}",
        total.acked_deposits,
        total.acked_refreshes,
        total.acked_revokes,
        total.ambiguous,
        total.acked_writes_lost,
        total.acked_rotations_lost,
        total.rotations_lost_in_flight,
        total.corrupt,
        started.elapsed(),
    );
    println!("{summary}");
    assert!(
        total.failures.is_empty(),
        "{summary}\n{}\nvault log:\n{}",
        total.failures.join("\n"),
        tail(&log)
    );
    assert_eq!(total.acked_writes_lost, 0);
    assert_eq!(total.acked_rotations_lost, 0);
    assert_eq!(total.corrupt, 0);
    // The run must have exercised something: acknowledged refreshes and
    // revokes and calls cut by kills.
    assert!(
        total.acked_refreshes > 0 && total.acked_revokes > 0,
        "{summary}"
    );
    assert!(
        total.ambiguous > 0,
        "no call was ever in flight at a kill: {summary}"
    );
}
