//! Scenario 6: the vault on a real 3-member etcd cluster (127.0.0.1).
//!
//! - Cache hits on an etcd-backed vault against a sled-backed one, closed
//!   loop, interleaved: a hit must stay a memory read on either backend.
//! - Durable Deposit on etcd against the least a write can cost there: a
//!   loop of the store's own compare-and-swap transactions from the same
//!   client code, record-sized values; the sides take turns in rounds.
//! - A refresh burst spread over three replicas: how much latency the
//!   cross-replica claim adds over one upstream round trip.
//! - Cache-hit throughput with the clients spread over one replica and over
//!   three (all in this process, on the same cores).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use credvault::{
    api::pb::{self, credential_vault_client::CredentialVaultClient},
    store::{self, CasOutcome, EtcdSettings, NewEvent, StoreKey, StoreSettings, Write},
};
use tonic::transport::Channel;

use crate::{
    fixture::{CLIENT_ID, CLIENT_SECRET, PROVIDER, TENANT},
    load::{closed_loop, Sample},
    support::{
        etcd::EtcdCluster,
        provider::ProviderDouble,
        vault::{get_request, oauth_client, reference, refresh_grant, TestVault, VaultDir},
    },
    Params,
};

const HOT_SET: usize = 64;
const RECORD_BYTES: usize = 900;

/// What scenario 6 measured.
pub struct ReplicasResult {
    pub hit_concurrency: usize,
    pub hits_sled: Sample,
    pub hits_etcd: Sample,
    /// (concurrency, vault Deposit, raw store CAS loop).
    pub deposits: Vec<EtcdDeposit>,
    /// How the Deposit sides took turns.
    pub deposit_rounds: Rounds,
    pub burst_rtt: Duration,
    pub burst: Sample,
    pub burst_upstream_calls: usize,
    pub one_replica: Sample,
    pub three_replicas: Sample,
}

fn vault_dir(cluster: Option<&EtcdCluster>, prefix: &str) -> VaultDir {
    let storage = cluster
        .map(|c| c.storage_config(prefix, "max_staleness = \"2s\""))
        .unwrap_or_default();
    let dir = VaultDir::custom("allow_http_loopback = true", &storage);
    // One identity drives every load below (see fixture.rs).
    let path = dir.path().join("credvault.toml");
    let config = std::fs::read_to_string(&path)
        .expect("bench config")
        .replace(
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nmax_calls_per_identity = 1024",
        );
    std::fs::write(&path, config).expect("bench config");
    dir
}

fn deposit(provider_url: &str, subject: &str, expires: SystemTime) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference(TENANT, subject, PROVIDER),
        client: oauth_client(provider_url, CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant("bench-refresh-token", Some(("bench-access-token", expires))),
        labels: Default::default(),
    }
}

async fn clients(
    dir: &VaultDir,
    vault: &TestVault,
    n: usize,
) -> Vec<CredentialVaultClient<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(vault.client(dir, "admin").await);
    }
    out
}

/// Closed-loop cache hits over `clients`.
async fn hits(
    clients: Vec<CredentialVaultClient<Channel>>,
    concurrency: usize,
    params: &Params,
) -> Sample {
    let clients = Arc::new(clients);
    let sample = closed_loop(
        concurrency,
        params.warmup,
        params.hit_measure,
        move |w, _| {
            let mut client = clients[w % clients.len()].clone();
            let request = get_request(TENANT, &format!("hot-{}", w % HOT_SET), PROVIDER);
            async move {
                client
                    .get_access_token(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        },
    )
    .await;
    sample.expect_clean("GetAccessToken (cache hit)");
    sample
}

async fn seed(client: &mut CredentialVaultClient<Channel>, provider_url: &str) {
    let far = SystemTime::now() + Duration::from_secs(24 * 3600);
    for i in 0..HOT_SET {
        client
            .deposit(deposit(provider_url, &format!("hot-{i}"), far))
            .await
            .expect("seed");
    }
}

/// Starts `n` replicas on `dir`, once the cluster answers a quorum read: a
/// disk stall on this shared machine once left a member unreachable just
/// as a replica started, and the run died on the replica's connect error
/// rather than waiting the stall out.
async fn replicas(cluster: &EtcdCluster, dir: &VaultDir, n: usize) -> Vec<TestVault> {
    tokio::task::block_in_place(|| cluster.wait_healthy(Duration::from_secs(60)));
    let mut vaults = Vec::new();
    for _ in 0..n {
        vaults.push(TestVault::start(dir).await);
    }
    vaults
}

pub async fn run(params: &Params) -> ReplicasResult {
    let cluster = EtcdCluster::start(3);
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let url = provider.token_url();
    let concurrency = *params.hit_concurrency.iter().max().unwrap_or(&16);

    // Hits: etcd against sled, interleaved.
    let (sled_dir, etcd_dir) = (
        vault_dir(None, ""),
        vault_dir(Some(&cluster), "/bench-hits/"),
    );
    let sled = TestVault::start(&sled_dir).await;
    let etcd = replicas(&cluster, &etcd_dir, 1).await.remove(0);
    let conns = concurrency.clamp(1, 16);
    let (sled_clients, etcd_clients) = (
        clients(&sled_dir, &sled, conns).await,
        clients(&etcd_dir, &etcd, conns).await,
    );
    seed(&mut sled_clients[0].clone(), &url).await;
    seed(&mut etcd_clients[0].clone(), &url).await;
    let (mut sled_runs, mut etcd_runs) = (Vec::new(), Vec::new());
    for round in 0..params.hit_rounds.max(1) {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                sled_runs.push(hits(sled_clients.clone(), concurrency, params).await);
            } else {
                etcd_runs.push(hits(etcd_clients.clone(), concurrency, params).await);
            }
        }
    }
    eprintln!(
        "  hits c={concurrency}: etcd {:.0} rps, sled {:.0} rps",
        Sample::merge(etcd_runs.clone()).rps(),
        Sample::merge(sled_runs.clone()).rps()
    );
    drop(sled);

    let deposit_rounds = Rounds::of(params);
    let deposits = deposits(params, deposit_rounds, &cluster, &etcd_dir, &etcd, &url).await;
    drop(etcd);
    let (burst_rtt, burst, burst_upstream_calls) = burst(params, &cluster).await;
    let (one_replica, three_replicas) = scaling(params, &cluster, concurrency, &url).await;
    ReplicasResult {
        hit_concurrency: concurrency,
        hits_sled: Sample::merge(sled_runs),
        hits_etcd: Sample::merge(etcd_runs),
        deposits,
        deposit_rounds,
        burst_rtt,
        burst,
        burst_upstream_calls,
        one_replica,
        three_replicas,
    }
}

/// Deposits on etcd at one concurrency, and the store's own transactions.
pub struct EtcdDeposit {
    pub concurrency: usize,
    pub vault: Sample,
    /// The store's write as a Deposit makes it: the record and its event in
    /// one transaction (every Deposit logs DEPOSITED, DESIGN §5e).
    pub raw_with_event: Sample,
    /// The record alone (context: what the event costs).
    pub raw: Sample,
}

/// A DEPOSITED event's payload as logged, near enough (its size varies with
/// the reference and labels).
const EVENT_BYTES: usize = 160;

/// The rounds in which the Deposit sides take turns, and the measuring
/// window of one side in one round: the scenario's measuring time split
/// over its rounds.
#[derive(Clone, Copy)]
pub struct Rounds {
    pub count: usize,
    pub window: Duration,
}

impl Rounds {
    fn of(params: &Params) -> Self {
        let count = params.deposit_rounds.max(1);
        Self {
            count,
            window: params.deposit_measure / count as u32,
        }
    }
}

/// Vault Deposits on etcd, and the raw store loops, per concurrency.
async fn deposits(
    params: &Params,
    rounds: Rounds,
    cluster: &EtcdCluster,
    dir: &VaultDir,
    vault: &TestVault,
    url: &str,
) -> Vec<EtcdDeposit> {
    let raw = store::open(&StoreSettings::Replicated(EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: b"/bench-raw/".to_vec(),
        dial_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        max_staleness: Duration::from_secs(2),
        claim_takeover: Duration::from_secs(20),
        ca: None,
        cert: None,
        key: None,
    }))
    .await
    .expect("raw etcd store");
    // The three sides take turns in rounds, the order rotating, so drift in
    // the machine's load (three etcd members share its two cores) does not
    // land on one side.
    let mut rows = Vec::new();
    for &c in &params.deposit_concurrency {
        let vault_clients = Arc::new(clients(dir, vault, c.clamp(1, 16)).await);
        let far = SystemTime::now() + Duration::from_secs(3600);
        let (mut vault_runs, mut with_event_runs, mut raw_runs) =
            (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds.count {
            for turn in 0..3 {
                match (round + turn) % 3 {
                    0 => vault_runs.push(
                        vault_deposits(&vault_clients, url, c, round, far, params, rounds).await,
                    ),
                    1 => {
                        with_event_runs.push(raw_writes(&raw, c, round, true, params, rounds).await)
                    }
                    _ => raw_runs.push(raw_writes(&raw, c, round, false, params, rounds).await),
                }
            }
        }
        let (deposit_sample, raw_with_event, raw_sample) = (
            Sample::merge(vault_runs),
            Sample::merge(with_event_runs),
            Sample::merge(raw_runs),
        );
        deposit_sample.expect_clean("Deposit on etcd");
        raw_with_event.expect_clean("raw etcd write with its event");
        raw_sample.expect_clean("raw etcd CAS");
        eprintln!(
            "  deposit c={c}: vault {:.0}/s, raw etcd write + event {:.0}/s, raw etcd CAS {:.0}/s",
            deposit_sample.rps(),
            raw_with_event.rps(),
            raw_sample.rps()
        );
        rows.push(EtcdDeposit {
            concurrency: c,
            vault: deposit_sample,
            raw_with_event,
            raw: raw_sample,
        });
    }
    rows
}

/// A closed loop of vault Deposits of new credentials over `clients`.
async fn vault_deposits(
    clients: &Arc<Vec<CredentialVaultClient<Channel>>>,
    url: &str,
    c: usize,
    round: usize,
    expires: SystemTime,
    params: &Params,
    rounds: Rounds,
) -> Sample {
    let (clients, url) = (Arc::clone(clients), url.to_owned());
    closed_loop(c, params.warmup, rounds.window, move |w, seq| {
        let mut client = clients[w % clients.len()].clone();
        let request = deposit(&url, &format!("dep-{c}-{round}-{w}-{seq}"), expires);
        async move {
            client
                .deposit(request)
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await
}

/// A closed loop of the store's own durable writes of a new record-sized
/// value, with a DEPOSITED-sized event in the same transaction or without.
async fn raw_writes(
    store: &Arc<dyn store::CredentialStore>,
    c: usize,
    round: usize,
    event: bool,
    params: &Params,
    rounds: Rounds,
) -> Sample {
    let store = Arc::clone(store);
    closed_loop(c, params.warmup, rounds.window, move |w, seq| {
        let store = Arc::clone(&store);
        async move {
            let name = format!("raw-{c}-{event}-{round}-{w}-{seq}");
            let key = StoreKey::new(TENANT, &name, PROVIDER);
            let write = Write {
                expected: None,
                value: Some(vec![7u8; RECORD_BYTES]),
                event: event.then(|| NewEvent {
                    at_ms: SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    payload: vec![5u8; EVENT_BYTES],
                }),
                fence: None,
                durable: true,
            };
            match store.write(&key, write).await {
                Ok(CasOutcome::Written(_)) => Ok(()),
                Ok(other) => Err(format!("{other:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
}

/// `callers` concurrent calls, spread over three replicas, on one expired
/// credential whose provider answers after `burst_latency`.
async fn burst(params: &Params, cluster: &EtcdCluster) -> (Duration, Sample, usize) {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    provider.set_latency(params.burst_latency);
    let dir = vault_dir(Some(cluster), "/bench-burst/");
    let vaults = replicas(cluster, &dir, 3).await;
    let mut spread = Vec::new();
    for vault in &vaults {
        spread.extend(clients(&dir, vault, 4).await);
    }
    let expired = SystemTime::now() - Duration::from_secs(60);
    let mut request = deposit(&provider.token_url(), "burst", expired);
    request.grant = refresh_grant(
        &provider.issue_refresh_token(CLIENT_ID),
        Some(("bench-access-token", expired)),
    );
    spread[0]
        .clone()
        .deposit(request)
        .await
        .expect("burst deposit");
    // One upstream round trip, straight to the double.
    let rtt = {
        let started = Instant::now();
        let _ = reqwest_free_round_trip(&provider).await;
        started.elapsed()
    };
    let before = provider.refresh_calls();
    let callers = params.burst_callers;
    let started = Instant::now();
    let mut calls = Vec::with_capacity(callers);
    for i in 0..callers {
        let mut client = spread[i % spread.len()].clone();
        calls.push(tokio::spawn(async move {
            let sent = Instant::now();
            client
                .get_access_token(get_request(TENANT, "burst", PROVIDER))
                .await
                .map(|_| sent.elapsed())
                .map_err(|s| s.to_string())
        }));
    }
    let mut lat = Vec::with_capacity(callers);
    for call in calls {
        let took = call.await.expect("burst caller").expect("burst call");
        lat.push(took.as_nanos() as u64);
    }
    let sample = Sample::from_latencies(lat, started.elapsed().as_secs_f64());
    (rtt, sample, provider.refresh_calls() - before)
}

/// One token request straight to the double (a refresh of a fresh grant).
async fn reqwest_free_round_trip(provider: &ProviderDouble) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = provider.issue_refresh_token(CLIENT_ID);
    let body = format!(
        "grant_type=refresh_token&refresh_token={rt}&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
    );
    let mut stream = tokio::net::TcpStream::connect(provider.addr())
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "POST /token HTTP/1.1\r\nhost: idp\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Cache hits with the clients on one replica, then spread over three.
async fn scaling(
    params: &Params,
    cluster: &EtcdCluster,
    concurrency: usize,
    url: &str,
) -> (Sample, Sample) {
    let dir = vault_dir(Some(cluster), "/bench-scale/");
    let vaults = replicas(cluster, &dir, 3).await;
    let mut first = clients(&dir, &vaults[0], 16).await;
    seed(&mut first[0], url).await;
    // Warm every replica's cache.
    let mut spread = Vec::new();
    for vault in &vaults {
        spread.extend(clients(&dir, vault, 6).await);
    }
    for client in &mut spread {
        for i in 0..HOT_SET {
            let _ = client
                .get_access_token(get_request(TENANT, &format!("hot-{i}"), PROVIDER))
                .await;
        }
    }
    let one = hits(first, concurrency, params).await;
    let three = hits(spread, concurrency, params).await;
    eprintln!(
        "  scaling c={concurrency}: 1 replica {:.0} rps, 3 replicas {:.0} rps",
        one.rps(),
        three.rps()
    );
    (one, three)
}
