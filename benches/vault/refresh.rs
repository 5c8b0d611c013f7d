//! Scenarios 2 and 3: refreshes through the provider double.
//!
//! 2. A burst of callers on one expired credential: exactly one upstream
//!    call (asserted from the double's counter), and the latency the vault
//!    adds on top of one upstream round trip.
//! 3. Many distinct expired credentials refreshed by a fixed number of
//!    concurrent callers: refreshes/s against concurrency / latency.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use serde::{Deserialize, Serialize};

use crate::{
    fixture::{bounded, expired, vault_clients, Bench, CLIENT_ID, CLIENT_SECRET, PROVIDER, TENANT},
    load::{fan_out, Sample, ServerTiming},
    scale::{bench_record, populate},
    support::{
        provider::ProviderDouble,
        vault::{get_request, scrape_metrics, TestVault, VaultDir},
    },
    Params,
};

pub struct BurstResult {
    pub callers: usize,
    pub rounds: usize,
    pub connections: usize,
    pub provider_latency: Duration,
    /// One refresh round trip measured directly against the double (HTTP).
    pub upstream_rtt: Duration,
    /// One caller alone on an expired credential, through the vault.
    pub single: Sample,
    /// Every caller's time from the burst's release to its answer.
    pub burst: Sample,
    /// Upstream refresh calls per round (must all be 1).
    pub upstream_calls: Vec<usize>,
}

impl BurstResult {
    pub fn added(&self, q: f64) -> Duration {
        self.burst.pct(q).saturating_sub(self.upstream_rtt)
    }
}

pub async fn burst(bench: &Bench, params: &Params) -> BurstResult {
    let latency = params.burst_latency;
    let connections = 32.min(params.burst_callers);
    let clients = Arc::new(bench.vault_clients(connections).await);
    let mut admin = clients[0].clone();
    bench.provider.set_latency(latency);

    let upstream_rtt = direct_refresh_rtt(bench, 5).await;

    let mut single = Vec::new();
    let mut all = Vec::new();
    let mut upstream_calls = Vec::new();
    for round in 0..params.burst_rounds {
        // The lone caller, for reference.
        let subject = format!("single-{round}");
        let rt = bench.provider.issue_refresh_token(CLIENT_ID);
        admin
            .deposit(bench.deposit_request(&subject, &rt, expired()))
            .await
            .expect("deposit");
        let sent = Instant::now();
        admin
            .get_access_token(get_request(TENANT, &subject, PROVIDER))
            .await
            .expect("single refresh");
        single.push(sent.elapsed().as_nanos() as u64);

        // The burst.
        let subject = format!("burst-{round}");
        let rt = bench.provider.issue_refresh_token(CLIENT_ID);
        admin
            .deposit(bench.deposit_request(&subject, &rt, expired()))
            .await
            .expect("deposit");
        let (go, ready) = tokio::sync::watch::channel::<Option<Instant>>(None);
        let mut callers = JoinSet::new();
        for i in 0..params.burst_callers {
            let mut client = clients[i % clients.len()].clone();
            let request = get_request(TENANT, &subject, PROVIDER);
            let mut ready = ready.clone();
            callers.spawn(async move {
                let released = ready
                    .wait_for(Option::is_some)
                    .await
                    .expect("release")
                    .expect("release instant");
                let token = client
                    .get_access_token(request)
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner()
                    .access_token;
                Ok::<_, String>((released.elapsed().as_nanos() as u64, token))
            });
        }
        // Let every caller park on the gate before releasing them together.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = bench.provider.refresh_calls();
        go.send_replace(Some(Instant::now()));
        let mut tokens = std::collections::HashSet::new();
        while let Some(joined) = callers.join_next().await {
            let (lat, token) = joined
                .expect("caller task")
                .unwrap_or_else(|e| panic!("burst caller failed: {e}"));
            all.push(lat);
            tokens.insert(token);
        }
        let calls = bench.provider.refresh_calls() - before;
        assert_eq!(
            calls, 1,
            "burst of {} callers made {calls} upstream refresh calls",
            params.burst_callers
        );
        assert_eq!(tokens.len(), 1, "callers of one burst got different tokens");
        upstream_calls.push(calls);
    }
    bench.provider.set_latency(Duration::ZERO);
    BurstResult {
        callers: params.burst_callers,
        rounds: params.burst_rounds,
        connections,
        provider_latency: latency,
        upstream_rtt,
        single: Sample::from_latencies(single, 0.0),
        burst: Sample::from_latencies(all, 0.0),
        upstream_calls,
    }
}

/// The median of `n` refresh-token requests sent straight to the provider
/// double over plain HTTP, as the vault's upstream client sends them.
async fn direct_refresh_rtt(bench: &Bench, n: usize) -> Duration {
    let http = reqwest::Client::builder().build().expect("reqwest client");
    let mut samples = Vec::new();
    for _ in 0..n {
        let rt = bench.provider.issue_refresh_token(CLIENT_ID);
        let sent = Instant::now();
        let response = http
            .post(bench.provider.token_url())
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("grant_type=refresh_token&refresh_token={rt}"))
            .send()
            .await
            .expect("direct refresh");
        assert!(response.status().is_success(), "direct refresh failed");
        let _ = response.bytes().await;
        samples.push(sent.elapsed().as_nanos() as u64);
    }
    Sample::from_latencies(samples, 0.0).pct(50.0)
}

/// A vault started for one measurement on its own directory.
pub struct Fresh {
    pub dir: VaultDir,
    pub addr: std::net::SocketAddr,
    /// Its ops listener (`/metrics`).
    pub ops: std::net::SocketAddr,
    _vault: TestVault,
}

impl Fresh {
    /// Starts the vault on `dir` (already populated, if at all).
    pub async fn start(dir: VaultDir) -> Self {
        let vault = TestVault::start(&dir).await;
        Self {
            addr: vault.addr,
            ops: vault.ops_addr,
            dir,
            _vault: vault,
        }
    }
}

pub struct ThroughputResult {
    pub credentials: usize,
    pub concurrency: usize,
    pub connections: usize,
    pub provider_latency: Duration,
    pub sample: Sample,
    pub upstream_calls: usize,
    /// The same number of callers refreshing straight at the double (no
    /// vault): what the double and its timer allow.
    pub direct: Sample,
    /// Where a refresh's time went inside the vault: the provider's answer
    /// (the span) and the write-back.
    pub inside: ServerTiming,
}

impl ThroughputResult {
    pub fn ideal(&self) -> f64 {
        self.concurrency as f64 / self.provider_latency.as_secs_f64()
    }

    pub fn ratio(&self) -> f64 {
        self.sample.rps() / self.ideal()
    }

    /// The vault against refreshing straight at the double.
    pub fn direct_ratio(&self) -> f64 {
        self.sample.rps() / self.direct.rps()
    }
}

/// What one child measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct ThroughputChild {
    pub sample: Sample,
    pub upstream_calls: usize,
    pub direct: Sample,
    pub inside: ServerTiming,
}

/// Runs in a fresh process, so the numbers are the vault's alone.
pub async fn throughput(params: &Params) -> ThroughputResult {
    let child: ThroughputChild =
        crate::child::run(vec!["refresh".into(), crate::child::mode_arg(params.mode)]).await;
    let row = ThroughputResult {
        credentials: params.refresh_credentials,
        concurrency: params.refresh_concurrency,
        connections: 16.min(params.refresh_concurrency),
        provider_latency: params.refresh_latency,
        sample: child.sample,
        upstream_calls: child.upstream_calls,
        direct: child.direct,
        inside: child.inside,
    };
    eprintln!(
        "  {:.0} refreshes/s ({:.2}x ideal, {:.2}x the double alone at {:.0}/s), {} of {} answered {}",
        row.sample.rps(),
        row.ratio(),
        row.direct_ratio(),
        row.direct.rps(),
        row.sample.count(),
        row.credentials,
        row.sample.failure_note()
    );
    row
}

/// The measurement, in this (fresh) process, against its own provider double.
pub async fn throughput_child(params: &Params) -> ThroughputChild {
    credvault::server::tls::install_crypto_provider();
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let n = params.refresh_credentials;
    let concurrency = params.refresh_concurrency;
    let connections = 16.min(concurrency);

    // Population (not measured): n grants at the double, bulk-loaded with
    // expired access tokens, faster than n Deposits.
    let dir = VaultDir::new();
    let token_url = provider.token_url();
    let refresh_tokens: Vec<String> = (0..n)
        .map(|_| provider.issue_refresh_token(CLIENT_ID))
        .collect();
    let (data, keyring) = (dir.path().join("data"), dir.keyring());
    tokio::task::spawn_blocking(move || {
        populate(&data, &keyring, n, |i| {
            let record = bench_record(&token_url, &refresh_tokens[i], expired());
            (format!("many-{i}"), record)
        })
    })
    .await
    .expect("populate");
    let vault = Fresh::start(dir).await;
    let clients = Arc::new(vault_clients(&vault.dir, vault.addr, connections).await);

    provider.set_latency(params.refresh_latency);
    let before = provider.refresh_calls();
    let sample = {
        let clients = Arc::clone(&clients);
        fan_out(n, concurrency, concurrency, move |i| {
            let mut client = clients[i % clients.len()].clone();
            let request = get_request(TENANT, &format!("many-{i}"), PROVIDER);
            async move { bounded(client.get_access_token(request)).await.map(|_| ()) }
        })
        .await
    };
    let upstream_calls = provider.refresh_calls() - before;
    // Only the measured refreshes went through this vault's metrics: the
    // population was bulk-loaded beside it.
    let inside = ServerTiming::from_metrics(
        &scrape_metrics(vault.ops).await,
        "credvault_refresh_duration_seconds",
    );
    if sample.errors == 0 {
        assert_eq!(
            upstream_calls, n,
            "each expired credential must cost exactly one upstream refresh"
        );
    }
    // The double alone: as many callers POSTing refresh grants straight at
    // it (plain HTTP/1.1, pooled), for a quarter as many refreshes.
    let direct = {
        let http = reqwest::Client::builder().build().expect("reqwest client");
        let tokens: Arc<Vec<String>> = Arc::new(
            (0..n / 4)
                .map(|_| provider.issue_refresh_token(CLIENT_ID))
                .collect(),
        );
        let url = provider.token_url();
        fan_out(n / 4, concurrency, concurrency, move |i| {
            let (http, url) = (http.clone(), url.clone());
            let body = format!("grant_type=refresh_token&refresh_token={}", tokens[i]);
            async move {
                let response = http
                    .post(url)
                    .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("direct refresh: {}", response.status()));
                }
                response
                    .bytes()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await
    };
    direct.expect_clean("direct refreshes at the double");
    ThroughputChild {
        sample,
        upstream_calls,
        direct,
        inside,
    }
}
