//! More than one node: the vault on a real 3-member etcd cluster on
//! 127.0.0.1, with several real vault replicas (real mTLS, real gRPC
//! clients spread across them) and the HTTP provider double.
//!
//! Each test prints its figure.

mod support;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime},
};

use credvault::api::pb::{
    self, credential_vault_client::CredentialVaultClient, vault_admin_client::VaultAdminClient,
};
use support::{etcd::EtcdCluster, provider::ProviderDouble, vault::*};
use tonic::{transport::Channel, Code};

const CLIENT_ID: &str = "vault-client";
const CLIENT_SECRET: &str = "client-secret-replicas";

/// A fresh three-member cluster and a provider double that knows the
/// vault's OAuth client.
async fn cluster_and_provider() -> (EtcdCluster, ProviderDouble) {
    let cluster = EtcdCluster::start(3);
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    (cluster, provider)
}

/// `n` replicas of one vault (same keyring, certificates, policy) on the
/// cluster.
async fn replicas(dir: &VaultDir, n: usize) -> Vec<TestVault> {
    let mut vaults = Vec::new();
    for _ in 0..n {
        vaults.push(TestVault::start(dir).await);
    }
    vaults
}

fn vault_dir(cluster: &EtcdCluster, prefix: &str, extra: &str) -> VaultDir {
    VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "{extra}\n{}",
            cluster.storage_config(prefix, "max_staleness = \"1s\"")
        ),
    )
}

async fn clients(dir: &VaultDir, vaults: &[TestVault]) -> Vec<CredentialVaultClient<Channel>> {
    let mut out = Vec::new();
    for vault in vaults {
        out.push(vault.client(dir, "admin").await);
    }
    out
}

fn deposit(
    provider: &ProviderDouble,
    subject: &str,
    access: Option<SystemTime>,
) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference("acme", subject, "idp"),
        client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
        grant: refresh_grant(
            &provider.issue_refresh_token(CLIENT_ID),
            access.map(|at| ("at-deposited", at)),
        ),
        labels: Default::default(),
    }
}

/// 1000 concurrent calls spread over the replicas; the distinct tokens.
async fn burst(
    clients: &[CredentialVaultClient<Channel>],
    subject: &str,
    force: bool,
) -> BTreeSet<String> {
    let mut calls = Vec::new();
    for i in 0..1000 {
        let mut client = clients[i % clients.len()].clone();
        let subject = subject.to_owned();
        calls.push(tokio::spawn(async move {
            let mut request = get_request("acme", &subject, "idp");
            request.force_refresh = force;
            client.get_access_token(request).await
        }));
    }
    let mut tokens = BTreeSet::new();
    for call in calls {
        let token = call.await.unwrap().unwrap_or_else(|s| panic!("{s:?}"));
        tokens.insert(token.into_inner().access_token);
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_across_three_replicas() {
    let (cluster, provider) = cluster_and_provider().await;
    provider.set_latency(Duration::from_millis(300));
    let dir = vault_dir(&cluster, "/burst/", "");
    let vaults = replicas(&dir, 3).await;
    let clients = clients(&dir, &vaults).await;

    // An expired credential: every replica wants to refresh it.
    let expired = SystemTime::now() - Duration::from_secs(60);
    clients[0]
        .clone()
        .deposit(deposit(&provider, "expired", Some(expired)))
        .await
        .unwrap();
    let tokens = burst(&clients, "expired", false).await;
    let refreshes = provider.refresh_calls();
    println!("1000 calls on one expired credential over 3 replicas: {refreshes} upstream refresh, {} distinct token", tokens.len());
    assert_eq!(refreshes, 1);
    assert_eq!(tokens.len(), 1);

    // Again with force_refresh, on a credential never refreshed.
    let valid = SystemTime::now() + Duration::from_secs(3600);
    clients[1]
        .clone()
        .deposit(deposit(&provider, "forced", Some(valid)))
        .await
        .unwrap();
    let tokens = burst(&clients, "forced", true).await;
    let forced = provider.refresh_calls() - refreshes;
    println!(
        "1000 force_refresh calls over 3 replicas: {forced} upstream refresh, {} distinct token",
        tokens.len()
    );
    assert_eq!(forced, 1);
    assert_eq!(tokens.len(), 1);
    assert!(!tokens.contains("at-deposited"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_or_redeposit_on_one_replica_reaches_the_others_within_max_staleness() {
    let (cluster, provider) = cluster_and_provider().await;
    let dir = vault_dir(&cluster, "/coherence/", "");
    let vaults = replicas(&dir, 2).await;
    let clients = clients(&dir, &vaults).await;
    let (mut a, mut b) = (clients[0].clone(), clients[1].clone());
    let valid = SystemTime::now() + Duration::from_secs(3600);
    a.deposit(deposit(&provider, "alice", Some(valid)))
        .await
        .unwrap();
    // B holds it warm in its cache.
    for _ in 0..3 {
        b.get_access_token(get_request("acme", "alice", "idp"))
            .await
            .unwrap();
    }
    a.revoke(pb::RevokeRequest {
        credential: reference("acme", "alice", "idp"),
    })
    .await
    .unwrap();
    let revoked = Instant::now();
    loop {
        match b
            .get_access_token(get_request("acme", "alice", "idp"))
            .await
        {
            Err(status) if status.code() == Code::NotFound => break,
            Ok(_) => {}
            Err(status) => panic!("{status:?}"),
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "B served a revoked grant past max_staleness"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "revoke on A seen by B after {:?} (max_staleness 1 s)",
        revoked.elapsed()
    );

    // A redeposit: B serves the new generation.
    a.deposit(deposit(&provider, "alice", Some(valid)))
        .await
        .unwrap();
    b.get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap();
    let mut redeposit = deposit(&provider, "alice", Some(valid));
    if let Some(pb::deposit_request::Grant::RefreshToken(grant)) = redeposit.grant.as_mut() {
        grant.access_token = "at-generation-3".into();
    }
    a.deposit(redeposit).await.unwrap();
    let replaced = Instant::now();
    loop {
        let token = b
            .get_access_token(get_request("acme", "alice", "idp"))
            .await
            .unwrap()
            .into_inner();
        if token.access_token == "at-generation-3" {
            break;
        }
        assert!(
            replaced.elapsed() < Duration::from_secs(1),
            "B served a replaced grant past max_staleness"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("redeposit on A served by B after {:?}", replaced.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_a_replica_answers_storage_unavailable_and_recovers() {
    let (mut cluster, provider) = cluster_and_provider().await;
    let dir = vault_dir(&cluster, "/outage/", "");
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let valid = SystemTime::now() + Duration::from_secs(3600);
    client
        .deposit(deposit(&provider, "alice", Some(valid)))
        .await
        .unwrap();
    assert_eq!(readyz(vault.ops_addr).await, Some(200));
    for i in 0..3 {
        cluster.kill(i);
    }
    // Past max_staleness the cache is not trusted: reads go through, and
    // fail typed, fast.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let status = client
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap_err();
    println!(
        "etcd down: {:?} after {:?}",
        status.code(),
        started.elapsed()
    );
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).0, "STORAGE_UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(readyz(vault.ops_addr).await, Some(503));
    // The process stays up and recovers on its own.
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_healthy(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(vault.ops_addr).await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the replica did not become ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = client
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .expect("serves again once etcd is back")
        .into_inner();
    assert_eq!(token.access_token, "at-deposited");
}

/// A `credvault serve` process on `dir`'s config: a replica that can die.
struct ServeProcess {
    child: std::process::Child,
    port: u16,
    ops: u16,
}

impl ServeProcess {
    fn start(dir: &VaultDir) -> Self {
        use support::dev::{free_port, ops_ready, without_proxy};
        let (port, ops) = (free_port(), free_port());
        let child = without_proxy(&mut std::process::Command::new(env!(
            "CARGO_BIN_EXE_credvault"
        )))
        .args(["serve", "--config"])
        .arg(dir.path().join("credvault.toml"))
        .env("CREDVAULT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CREDVAULT_OPS_LISTEN", format!("127.0.0.1:{ops}"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ops_ready(ops) {
            assert!(Instant::now() < deadline, "replica did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, ops }
    }

    fn channel(&self, dir: &VaultDir) -> Channel {
        let cert = &dir.pki.clients["admin"];
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                dir.pki.ca.ca_cert_pem(),
            ))
            .identity(tonic::transport::Identity::from_pem(
                &cert.cert_pem,
                &cert.key_pem,
            ))
            .domain_name("localhost");
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_lazy()
    }

    fn admin(
        &self,
        dir: &VaultDir,
    ) -> credvault::api::pb::vault_admin_client::VaultAdminClient<Channel> {
        credvault::api::pb::vault_admin_client::VaultAdminClient::new(self.channel(dir))
    }

    async fn client(&self, dir: &VaultDir) -> CredentialVaultClient<Channel> {
        CredentialVaultClient::new(self.channel(dir))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn metric(ops: u16, name: &str) -> f64 {
    metric_sum(&scrape_metrics(([127, 0, 0, 1], ops).into()).await, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_claimant_is_taken_over_after_the_bound_and_never_overlapped() {
    const BOUND: Duration = Duration::from_secs(4);
    let (cluster, provider) = cluster_and_provider().await;
    // The provider takes 2 s per token request (within the 3 s upstream
    // timeout) and does not rotate, so the grant outlives the dead replica.
    provider.set_latency(Duration::from_secs(2));
    provider.set_rotation(false);
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &cluster.storage_config(
            "/takeover/",
            &format!(
                "max_staleness = \"1s\"\nclaim_takeover = \"{}s\"",
                BOUND.as_secs()
            ),
        ),
    );
    let mut a = ServeProcess::start(&dir);
    let b = ServeProcess::start(&dir);
    let (mut a_client, mut b_client) = (a.client(&dir).await, b.client(&dir).await);
    let expired = SystemTime::now() - Duration::from_secs(60);
    b_client
        .deposit(deposit(&provider, "alice", Some(expired)))
        .await
        .unwrap();

    // A claims the refresh and is at the provider...
    let first = Instant::now();
    tokio::spawn(async move {
        let _ = a_client
            .get_access_token(get_request("acme", "alice", "idp"))
            .await;
    });
    while provider.token_calls() == 0 {
        assert!(
            first.elapsed() < Duration::from_secs(5),
            "A never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The double answers A's request 2 s after it arrived (to a dead socket).
    let a_done = Instant::now() + Duration::from_secs(2);
    // ... when it dies.
    a.kill();
    let killed = Instant::now();
    let waiter = tokio::spawn(async move {
        b_client
            .get_access_token(get_request("acme", "alice", "idp"))
            .await
    });
    // The second refresh starts only after the bound.
    while provider.token_calls() < 2 {
        assert!(killed.elapsed() < BOUND * 3, "B never took over");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b_started = Instant::now();
    let second = b_started - killed;
    let token = waiter
        .await
        .unwrap()
        .expect("B refreshes after the takeover");
    println!(
        "claimant SIGKILLed at its provider call; B's refresh reached the provider {second:?} later \
         (bound {BOUND:?}), {:?} after A's had ended",
        b_started - a_done
    );
    assert!(
        second >= BOUND - Duration::from_millis(300),
        "took over after {second:?}"
    );
    // The two refreshes never overlapped at the provider.
    assert!(
        b_started > a_done,
        "B's refresh began while A's was still running"
    );
    assert_ne!(token.into_inner().access_token, "at-deposited");
    assert_eq!(provider.token_calls(), 2);
    assert_eq!(
        metric(b.ops, "credvault_refresh_claim_takeovers_total").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_processes_on_one_dir_and_one_etcd_form_one_vault() {
    use support::dev::DevProcess;
    let (cluster, provider) = cluster_and_provider().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoints = cluster.endpoints().join(",");
    let first = DevProcess::start_with_args(dir.path(), &["--etcd", &endpoints]);
    let second = DevProcess::start_with_args(dir.path(), &["--etcd", &endpoints]);
    let client = |dev: &DevProcess| CredentialVaultClient::new(dev.channel(dir.path(), "admin"));
    let valid = SystemTime::now() + Duration::from_secs(3600);
    client(&first)
        .deposit(deposit(&provider, "alice", Some(valid)))
        .await
        .unwrap();
    let token = client(&second)
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .expect("the second process serves what the first stored")
        .into_inner();
    assert_eq!(token.access_token, "at-deposited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_leader_killed_under_load_loses_nothing_acknowledged() {
    use std::sync::{Arc, Mutex};
    let (mut cluster, provider) = cluster_and_provider().await;
    provider.set_expires_in(Some(1));
    let dir = vault_dir(&cluster, "/leader/", "");
    let vaults = replicas(&dir, 3).await;
    let clients = clients(&dir, &vaults).await;
    // Credentials whose one-second tokens keep needing refreshes: every
    // refresh rotates the grant, and the double refuses a reused token.
    for i in 0..6 {
        clients[i % 3]
            .clone()
            .deposit(deposit(&provider, &format!("hot{i}"), None))
            .await
            .unwrap();
    }
    // subject -> Some(access token) deposited, or None once revoked.
    let acknowledged: Arc<Mutex<std::collections::BTreeMap<String, Option<String>>>> =
        Arc::default();
    // Subjects whose revoke answered UNAVAILABLE. That answer does not say
    // the delete failed, only that its outcome is unknown: etcd can commit a
    // write whose reply was lost with the leader, after the vault's read-back
    // ran out of patience. Such a subject may hold its deposit or nothing,
    // and nothing else.
    let unknown: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let errors: Arc<Mutex<Vec<(Code, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (mut client, acked, unknown, errors, stop) = (
            clients[w % 3].clone(),
            Arc::clone(&acknowledged),
            Arc::clone(&unknown),
            Arc::clone(&errors),
            Arc::clone(&stop),
        );
        let provider_url = provider.token_url();
        let rt = provider.issue_refresh_token(CLIENT_ID);
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let subject = format!("w{w}-{n}");
                let at = format!("at-{subject}");
                let request = pb::DepositRequest {
                    credential: reference("acme", &subject, "idp"),
                    client: oauth_client(&provider_url, CLIENT_ID, CLIENT_SECRET),
                    grant: refresh_grant(
                        &rt,
                        Some((&at, SystemTime::now() + Duration::from_secs(3600))),
                    ),
                    labels: Default::default(),
                };
                let outcomes = [
                    client.deposit(request).await.map(|_| Some(at)),
                    client
                        .get_access_token(get_request("acme", &format!("hot{}", n % 6), "idp"))
                        .await
                        .map(|_| None),
                ];
                for (i, outcome) in outcomes.into_iter().enumerate() {
                    match outcome {
                        Ok(Some(at)) if i == 0 => {
                            acked.lock().unwrap().insert(subject.clone(), Some(at));
                        }
                        Ok(_) => {}
                        Err(status) => errors
                            .lock()
                            .unwrap()
                            .push((status.code(), error_info(&status).0)),
                    }
                }
                if n % 5 == 0 {
                    let victim = format!("w{w}-{}", n - 1);
                    let revoked = client
                        .revoke(pb::RevokeRequest {
                            credential: reference("acme", &victim, "idp"),
                        })
                        .await;
                    match revoked {
                        Ok(_) => {
                            acked.lock().unwrap().insert(victim, None);
                        }
                        Err(status) => {
                            if status.code() == Code::Unavailable {
                                unknown.lock().unwrap().insert(victim);
                            }
                            errors
                                .lock()
                                .unwrap()
                                .push((status.code(), error_info(&status).0));
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = cluster.leader().expect("the cluster has a leader");
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(leader);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    cluster.wait_healthy(Duration::from_secs(30));

    let errors = errors.lock().unwrap().clone();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let unknown = unknown.lock().unwrap().clone();
    println!(
        "leader (member {leader}) SIGKILLed for 2 s under load: {} acknowledged writes, \
         {} errors ({:?}), {} revokes of unknown outcome",
        acknowledged.len(),
        errors.len(),
        errors
            .iter()
            .map(|(_, r)| r.as_str())
            .collect::<BTreeSet<_>>(),
        unknown.len()
    );
    for (code, reason) in &errors {
        assert_eq!(
            *code,
            Code::Unavailable,
            "only typed UNAVAILABLE meanwhile: {reason}"
        );
    }
    // No refresh token was used twice: a reused one would have killed its
    // grant (REAUTH_REQUIRED), and every hot credential still refreshes.
    let mut check = clients[0].clone();
    for i in 0..6 {
        get_once_available(&mut check, &format!("hot{i}"))
            .await
            .unwrap_or_else(|s| panic!("hot{i}: {s:?}"));
    }
    // Every acknowledged write is there, and every acknowledged revoke holds.
    let mut unknown_landed = 0;
    for (subject, expected) in &acknowledged {
        let answer = get_once_available(&mut check, subject).await;
        match (expected, answer) {
            (Some(at), Ok(token)) => assert_eq!(&token.into_inner().access_token, at),
            (None, Err(status)) => assert_eq!(status.code(), Code::NotFound, "{subject}"),
            (Some(_), Err(status))
                if unknown.contains(subject) && status.code() == Code::NotFound =>
            {
                unknown_landed += 1;
            }
            (expected, answer) => panic!("{subject}: acknowledged {expected:?}, found {answer:?}"),
        }
    }
    let certain = acknowledged
        .keys()
        .filter(|subject| !unknown.contains(*subject))
        .count();
    println!(
        "of {} revokes of unknown outcome, {unknown_landed} had landed",
        unknown.len()
    );
    assert!(
        certain > 20,
        "the load did run: {certain} writes of known outcome"
    );
}

/// GetAccessToken for `acme/<subject>`, retried while it answers
/// UNAVAILABLE (the retryable code) for up to 10 s: just after a member
/// restarts, one call can still meet it catching up, and a real client
/// retries UNAVAILABLE. Any other answer, or UNAVAILABLE past 10 s, is
/// returned as is.
async fn get_once_available(
    client: &mut CredentialVaultClient<Channel>,
    subject: &str,
) -> Result<tonic::Response<pb::GetAccessTokenResponse>, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .get_access_token(get_request("acme", subject, "idp"))
            .await
        {
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answer => return answer,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_rolls_out_across_replicas_without_key_version_unavailable() {
    use std::sync::{Arc, Mutex};
    let (cluster, provider) = cluster_and_provider().await;
    let dir = vault_dir(&cluster, "/rollout/", "");
    // Replicas reload only when told to, so they differ for a while.
    dir.replace_in_config(
        "passphrase_file = \"keyring.passphrase\"",
        "passphrase_file = \"keyring.passphrase\"\nwatch_interval = \"0s\"",
    );
    let vaults = replicas(&dir, 3).await;
    let clients = clients(&dir, &vaults).await;
    let mut admins = Vec::new();
    for vault in &vaults {
        admins.push(VaultAdminClient::new(
            vault
                .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
                .await,
        ));
    }

    // A mixed load across the replicas, recording every failure reason.
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (clients, failures, stop) = (clients.clone(), Arc::clone(&failures), Arc::clone(&stop));
        let request = deposit(
            &provider,
            "seed",
            Some(SystemTime::now() + Duration::from_secs(3600)),
        );
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let subject = format!("w{w}-{n}");
                let mut write = request.clone();
                write.credential = reference("acme", &subject, "idp");
                let mut writer = clients[n % 3].clone();
                let mut reader = clients[(n + 1) % 3].clone();
                if let Err(status) = writer.deposit(write).await {
                    failures.lock().unwrap().push(error_info(&status).0);
                    continue;
                }
                if let Err(status) = reader
                    .get_access_token(get_request("acme", &subject, "idp"))
                    .await
                {
                    failures.lock().unwrap().push(error_info(&status).0);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Promote version 2 in the file; only replica A reloads.
    let mut keyring = dir.keyring();
    let v2 = keyring.add().unwrap();
    keyring.promote(v2).unwrap();
    write_keyring(&dir.keyring_path(), &keyring);
    admins[0]
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut a = clients[0].clone();
    let sealed = a
        .deposit(deposit(
            &provider,
            "during",
            Some(SystemTime::now() + Duration::from_secs(3600)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sealed.key_version, 1,
        "A keeps the old primary while B and C cannot open v2"
    );
    // A rewrap to v2 now would strand B and C: refused.
    admins[0]
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 0,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = admins[0]
            .get_rewrap_status(pb::GetRewrapStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.state != pb::RewrapState::Running as i32 {
            break status;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.state, pb::RewrapState::Failed as i32, "{status:?}");
    assert!(status.error.contains("not every replica"), "{status:?}");

    // B and C reload: v2 rolls out, then seals everything new.
    for admin in &mut admins[1..] {
        admin
            .reload_keyring(pb::ReloadKeyringRequest {})
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sealed = a
            .deposit(deposit(
                &provider,
                "after",
                Some(SystemTime::now() + Duration::from_secs(3600)),
            ))
            .await
            .unwrap()
            .into_inner();
        if sealed.key_version == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "v2 never rolled out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And a rewrap moves every record, under the load.
    admins[0]
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 0,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = admins[0]
            .get_rewrap_status(pb::GetRewrapStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.state == pb::RewrapState::Done as i32 {
            break;
        }
        assert_ne!(status.state, pb::RewrapState::Failed as i32, "{status:?}");
        assert!(Instant::now() < deadline, "rewrap did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let unavailable = failures
        .iter()
        .filter(|r| *r == "KEY_VERSION_UNAVAILABLE")
        .count();
    println!(
        "v2 promoted on one replica, then rolled out and rewrapped under load: {unavailable} KEY_VERSION_UNAVAILABLE, {} other failures {:?}",
        failures.len() - unavailable,
        failures.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(unavailable, 0);
    assert!(failures.is_empty(), "{failures:?}");
    let status = admins[1]
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let v1 = status.versions.iter().find(|v| v.version == 1).unwrap();
    // Writes that raced the rewrap's cursor may still be on v1 only if they
    // landed behind it; every record is readable either way.
    println!(
        "after the rewrap: {} records still under v1",
        v1.record_count
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_member_cannot_make_a_replica_serve_stale_tokens() {
    let (cluster, provider) = cluster_and_provider().await;
    let dir = vault_dir(&cluster, "/frozen/", "");
    let vaults = replicas(&dir, 2).await;
    let clients = clients(&dir, &vaults).await;
    let (mut a, mut b) = (clients[0].clone(), clients[1].clone());
    let valid = SystemTime::now() + Duration::from_secs(3600);
    // Whichever member B's watch is on, freezing it must not let B serve a
    // token revoked through A for longer than max_staleness (1 s).
    for member in 0..3 {
        let subject = format!("alice{member}");
        a.deposit(deposit(&provider, &subject, Some(valid)))
            .await
            .unwrap();
        b.get_access_token(get_request("acme", &subject, "idp"))
            .await
            .unwrap();
        cluster.freeze(member, true);
        // A frozen leader means an election: A's revoke may answer a typed
        // UNAVAILABLE meanwhile, which a client retries. The first etcd call
        // A routes to the frozen member waits out its request timeout (5 s);
        // a read is then read again elsewhere, a write's attempt fails. A
        // then leaves that member out, so the next attempt lands. Before A
        // benched a failed member, a frozen one kept a third of A's calls
        // and six attempts in a row could fail: the deadline is generous,
        // the staleness bound below is the point.
        let frozen = Instant::now();
        let deadline = frozen + Duration::from_secs(30);
        let mut failed_attempts = 0;
        loop {
            match a
                .revoke(pb::RevokeRequest {
                    credential: reference("acme", &subject, "idp"),
                })
                .await
            {
                Ok(_) => break,
                Err(status) => {
                    failed_attempts += 1;
                    assert_eq!(error_info(&status).0, "STORAGE_UNAVAILABLE", "{status:?}");
                    assert!(Instant::now() < deadline, "the revoke never landed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let revoked = Instant::now();
        let mut served_after = Duration::ZERO;
        loop {
            match b
                .get_access_token(get_request("acme", &subject, "idp"))
                .await
            {
                Ok(_) => served_after = revoked.elapsed(),
                Err(status) if status.code() == Code::NotFound => break,
                // Reading through to a frozen member may time out: typed.
                Err(status) => assert_eq!(error_info(&status).0, "STORAGE_UNAVAILABLE"),
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(30),
                "B never saw the revoke"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "member {member} frozen: the revoke landed after {failed_attempts} failed attempts, {:?}; B served the revoked token until {served_after:?} after it (bound 1 s)",
            revoked - frozen
        );
        assert!(
            served_after < Duration::from_millis(1200),
            "{served_after:?}"
        );
        cluster.freeze(member, false);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One read's outcome in the frozen-member test, in seconds since the freeze.
struct Read {
    started: f64,
    took: f64,
    failed: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_member_fails_no_read_and_takes_one_call_per_bench() {
    let (cluster, provider) = cluster_and_provider().await;
    let dir = vault_dir(&cluster, "/frozen-reads/", "");
    let vault = TestVault::start(&dir).await;
    vault
        .client(&dir, "admin")
        .await
        .deposit(deposit(&provider, "alice", None))
        .await
        .unwrap();
    let admin = VaultAdminClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), dir.pki.ca.ca_cert_pem())
            .await,
    );
    // A follower: freezing the leader would add an election to the picture.
    let leader = cluster.leader().expect("the cluster has a leader");
    let member = (leader + 1) % 3;
    cluster.freeze(member, true);
    let frozen = Instant::now();
    // Every DescribeCredential reads the record from etcd. Six readers for
    // 17 s: all of them meet the member as it freezes. The first read to
    // time out, at 5 s, benches it, unless the replica's watch was on it
    // and benched it sooner (about 1 s in, on a heartbeat it missed). Its
    // bench ends 5 s later, and the one call that tries it, its trial,
    // times out 5 s after that: the member is then benched for 10 s.
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut admin = admin.clone();
        readers.spawn(async move {
            let mut reads = Vec::new();
            while frozen.elapsed() < Duration::from_secs(17) {
                let started = frozen.elapsed();
                let result = admin
                    .describe_credential(pb::DescribeCredentialRequest {
                        credential: reference("acme", "alice", "idp"),
                    })
                    .await;
                reads.push(Read {
                    started: started.as_secs_f64(),
                    took: (frozen.elapsed() - started).as_secs_f64(),
                    failed: result.err().map(|s| format!("{:?}", error_info(&s).0)),
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            reads
        });
    }
    let mut reads = Vec::new();
    while let Some(joined) = readers.join_next().await {
        reads.extend(joined.unwrap());
    }
    cluster.freeze(member, false);
    let slow = |read: &&Read| read.took > 3.0;
    // The member is benched once the first read that met it has timed out,
    // if not before.
    let benched = reads
        .iter()
        .filter(slow)
        .map(|read| read.started + read.took)
        .fold(f64::INFINITY, f64::min);
    let failed: Vec<_> = reads.iter().filter_map(|r| r.failed.as_ref()).collect();
    let slow_after: Vec<(f64, f64)> = reads
        .iter()
        .filter(slow)
        .filter(|read| read.started > benched)
        .map(|read| (read.started, read.took))
        .collect();
    println!(
        "member {member} frozen for 17 s: {} reads, {} failed, {} waited out the timeout as it froze, benched at {benched:.1} s, then {} slow (started, took): {slow_after:?}",
        reads.len(),
        failed.len(),
        reads.iter().filter(slow).count() - slow_after.len(),
        slow_after.len(),
    );
    assert!(
        reads.len() > 100,
        "the readers hardly read: {}",
        reads.len()
    );
    assert!(benched.is_finite(), "no read met the frozen member");
    // A read that met the frozen member was answered by another.
    assert!(failed.is_empty(), "{failed:?}");
    // After the bench, the member is tried by one call, not by a share of
    // all of them: at most one slow read (the trial may also be one of the
    // replica's own calls, a heartbeat).
    assert!(slow_after.len() <= 1, "{slow_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_member_under_the_watch_costs_readiness_about_max_staleness() {
    let (cluster, _provider) = cluster_and_provider().await;
    let dir = vault_dir(&cluster, "/frozen-watch/", "");
    let vault = TestVault::start(&dir).await;
    // The replica's watch is on one of the three members. Whichever is
    // frozen, the replica must be ready again (fresh, serving from its
    // cache) within max_staleness (1 s) and a re-open, not after HTTP/2
    // keep-alive gives up on the frozen member's stream (up to 15 s); a
    // frozen leader adds its election (0.5 s).
    for member in 0..3 {
        assert_eq!(readyz(vault.ops_addr).await, Some(200), "ready before");
        let leader = cluster.leader();
        cluster.freeze(member, true);
        let frozen = Instant::now();
        let mut unready = Vec::new();
        while frozen.elapsed() < Duration::from_secs(6) {
            let polled = Instant::now();
            if readyz(vault.ops_addr).await != Some(200) {
                unready.push(frozen.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50).saturating_sub(polled.elapsed())).await;
        }
        cluster.freeze(member, false);
        println!(
            "member {member} frozen (the leader: {}): unready at {} polls of 50 ms, from {:?} to {:?} after the freeze",
            leader == Some(member),
            unready.len(),
            unready.first(),
            unready.last()
        );
        assert!(
            unready.iter().all(|at| *at < Duration::from_millis(3500)),
            "member {member}: still unready {:?} after the freeze",
            unready.last()
        );
        // Thawed: back in the cluster and the replica ready again before
        // the next member. Freezing the next one while this one still
        // catches up would leave no quorum (seen under a loaded host: no
        // write committed for 5 s), and no replica can be fresh then.
        cluster.wait_member_healthy(member, Duration::from_secs(20));
        let thawed = Instant::now();
        while readyz(vault.ops_addr).await != Some(200) {
            assert!(
                thawed.elapsed() < Duration::from_secs(20),
                "never ready again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_runs_on_one_replica_and_survives_its_death() {
    const BOUND: Duration = Duration::from_secs(4);
    let (cluster, provider) = cluster_and_provider().await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &cluster.storage_config(
            "/rewrap/",
            &format!(
                "max_staleness = \"1s\"\nclaim_takeover = \"{}s\"",
                BOUND.as_secs()
            ),
        ),
    );
    let mut a = ServeProcess::start(&dir);
    let b = ServeProcess::start(&dir);
    let mut writer = a.client(&dir).await;
    let valid = SystemTime::now() + Duration::from_secs(3600);
    for i in 0..300 {
        writer
            .deposit(deposit(&provider, &format!("u{i}"), Some(valid)))
            .await
            .unwrap();
    }
    // Promote v2 everywhere; a slow rewrap starts on A.
    let mut keyring = dir.keyring();
    let v2 = keyring.add().unwrap();
    keyring.promote(v2).unwrap();
    write_keyring(&dir.keyring_path(), &keyring);
    let (mut a_admin, mut b_admin) = (a.admin(&dir), b.admin(&dir));
    a_admin
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    b_admin
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a_admin
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 50,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = |admin: &mut credvault::api::pb::vault_admin_client::VaultAdminClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_rewrap_status(pb::GetRewrapStatusRequest {})
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(
        status(&mut a_admin).await.state,
        pb::RewrapState::Running as i32
    );
    // B refuses to run a second one.
    b_admin
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: 0,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = status(&mut b_admin).await;
    assert_eq!(refused.state, pb::RewrapState::Failed as i32, "{refused:?}");
    assert!(refused.error.contains("another replica"), "{refused:?}");

    // A dies mid-rewrap (after a checkpoint); B takes the job over once A's
    // claim outlived the bound, and finishes it from the saved cursor.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill();
    let killed = Instant::now();
    let taken_over = loop {
        b_admin
            .start_rewrap(pb::StartRewrapRequest {
                records_per_second: 0,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = status(&mut b_admin).await;
        if now.state != pb::RewrapState::Failed as i32 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < BOUND * 4,
            "B never took the rewrap over: {now:?}"
        );
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let now = status(&mut b_admin).await;
        if now.state == pb::RewrapState::Done as i32 {
            break now;
        }
        assert_ne!(now.state, pb::RewrapState::Failed as i32, "{now:?}");
        assert!(Instant::now() < deadline, "the rewrap did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let keys = b_admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let under_v1 = keys
        .versions
        .iter()
        .find(|v| v.version == 1)
        .map_or(0, |v| v.record_count);
    println!(
        "rewrap of 300 records: A killed mid-run, B took over {taken_over:?} later (bound {BOUND:?}), \
         resumed from the cursor ({} scanned by B); {under_v1} records left under v1",
        done.scanned
    );
    assert!(
        taken_over >= BOUND - Duration::from_millis(500),
        "{taken_over:?}"
    );
    assert!(
        done.scanned < 300,
        "B resumed from the cursor rather than starting over"
    );
    assert_eq!(under_v1, 0);
}

#[tokio::test]
async fn a_replica_with_other_key_material_refuses_to_start() {
    let cluster = EtcdCluster::start(3);
    let dir = vault_dir(&cluster, "/fingerprints/", "");
    let first = TestVault::start(&dir).await;
    // Same store, same key version, different key bytes.
    let other = vault_dir(&cluster, "/fingerprints/", "");
    let refused = TestVault::try_start(other.config()).await;
    match refused {
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains("fingerprint"), "{message}");
        }
        Ok(_) => panic!("a replica with different key material started"),
    }
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_one_event_stream_and_one_delivers_each_webhook() {
    use support::webhook::{new_secret, WebhookReceiver};
    const DELIVERED: &str =
        "credvault_webhook_deliveries_total{webhook=\"ops\",outcome=\"delivered\"}";
    let (cluster, provider) = cluster_and_provider().await;
    let (secret, key) = new_secret();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap(), key).await;
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "[[events.webhooks]]\nname = \"ops\"\nurl = \"{}\"\nsecret_file = \"webhook.secret\"\n\
             retry_base = \"100ms\"\nretry_max = \"400ms\"\n{}",
            receiver.url(),
            cluster.storage_config("/hooks/", "max_staleness = \"1s\"\nclaim_takeover = \"4s\"")
        ),
    );
    std::fs::write(dir.path().join("webhook.secret"), &secret).unwrap();
    let mut replicas = vec![ServeProcess::start(&dir), ServeProcess::start(&dir)];
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(replica.client(&dir).await);
    }
    let mut streams = Vec::new();
    for client in &mut clients {
        streams.push(
            client
                .watch_credential_events(pb::WatchCredentialEventsRequest {
                    tenant: "*".into(),
                    after: "0".repeat(32),
                    types: Vec::new(),
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    for i in 0..10 {
        clients[i % 2]
            .deposit(deposit(&provider, &format!("s{i}"), None))
            .await
            .unwrap();
    }
    // The same stream, in the same order, from either replica.
    let mut cursors = Vec::new();
    for stream in &mut streams {
        let mut seen = Vec::new();
        while seen.len() < 10 {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("events reach every replica")
                .unwrap()
                .unwrap();
            seen.push(event.cursor);
        }
        cursors.push(seen);
    }
    assert_eq!(cursors[0], cursors[1]);

    // One replica delivers: each event exactly once while nothing fails.
    let received = receiver.wait_for(10, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 10, "an event was delivered twice");
    assert!(received.iter().all(|d| d.verified));
    let counts = [
        metric(replicas[0].ops, DELIVERED).await,
        metric(replicas[1].ops, DELIVERED).await,
    ];
    println!("deliveries per replica: {counts:?}");
    assert!(
        counts.contains(&0.0) && counts.contains(&10.0),
        "{counts:?}"
    );

    // The delivering replica dies; the other takes the sink over after the
    // bound and delivers what was logged meanwhile.
    let deliverer = usize::from(counts[1] > 0.0);
    let survivor = 1 - deliverer;
    replicas[deliverer].kill();
    for i in 10..15 {
        clients[survivor]
            .deposit(deposit(&provider, &format!("s{i}"), None))
            .await
            .unwrap();
    }
    let received = receiver.wait_for(15, Duration::from_secs(20)).await;
    let mut first_seen = Vec::new();
    for delivery in &received {
        if !first_seen.contains(&delivery.id) {
            first_seen.push(delivery.id.clone());
        }
    }
    let mut in_log_order = first_seen.clone();
    in_log_order.sort();
    assert_eq!(first_seen, in_log_order, "delivered out of order");
    assert!(metric(replicas[survivor].ops, DELIVERED).await >= 5.0);
}
