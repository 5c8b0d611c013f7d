//! Scenario 1: GetAccessToken served from the cache, against the echo
//! baseline at the same concurrency, in interleaved rounds.

use std::sync::Arc;

use credvault::api::pb::{self, credential_vault_client::CredentialVaultClient};
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::{
    fixture::{far_future, Bench, PROVIDER, TENANT},
    load::{closed_loop, Sample},
    support::vault::get_request,
    Params,
};

/// Distinct credentials the workers spread over (worker `w` asks for
/// credential `w % HOT_SET`), so concurrency does not all land on one entry.
const HOT_SET: usize = 64;

pub struct HitRow {
    pub concurrency: usize,
    pub connections: usize,
    pub echo: Sample,
    pub vault: Sample,
    /// `Health/Check` on the vault's own server: the echo's handler behind
    /// the vault's transport settings and router, so the gap to the echo
    /// splits into the server's part and the call's.
    pub vault_health: Sample,
}

impl HitRow {
    pub fn throughput_ratio(&self) -> f64 {
        self.vault.rps() / self.echo.rps()
    }

    pub fn p99_ratio(&self) -> f64 {
        self.vault.pct(99.0).as_secs_f64() / self.echo.pct(99.0).as_secs_f64()
    }
}

/// The three sides of the scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `Health/Check` on the bare tonic server.
    Echo,
    /// `Health/Check` on the vault's own port.
    VaultHealth,
    /// GetAccessToken from the cache.
    Vault,
}

impl Side {
    /// The sides a `--hits-side` name selects: one, or none (`none`: the vault
    /// starts and its credentials are deposited, then nothing, which is what
    /// a profile of one side subtracts).
    pub fn parse(name: &str) -> Option<Vec<Self>> {
        match name {
            "echo" => Some(vec![Self::Echo]),
            "health" => Some(vec![Self::VaultHealth]),
            "vault" => Some(vec![Self::Vault]),
            "none" => Some(vec![]),
            _ => None,
        }
    }
}

/// Connections used at a concurrency: one per worker up to 16, then shared
/// (HTTP/2 multiplexing), the same for the vault and the echo.
pub fn connections_for(concurrency: usize) -> usize {
    concurrency.clamp(1, 16)
}

/// The scenario; with `only`, those sides alone (a profiling aid: an
/// instruction profile of one side divides by that side's calls alone), which
/// prints the calls each concurrency measured and returns no rows.
pub async fn run(bench: &Bench, params: &Params, only: Option<&[Side]>) -> Vec<HitRow> {
    // A profiled side runs ten times as long, so its calls outnumber its
    // connections (new ones each round) and their set-up is spread thin.
    let params = &Params {
        hit_measure: params.hit_measure * if only.is_some() { 10 } else { 1 },
        ..params.clone()
    };
    let mut admin = bench.vault_clients(1).await.remove(0);
    for i in 0..HOT_SET {
        admin
            .deposit(bench.deposit_request(&format!("hit-{i}"), "hit-refresh-token", far_future()))
            .await
            .expect("deposit hot credential");
    }
    let requests: Arc<Vec<pb::GetAccessTokenRequest>> = Arc::new(
        (0..HOT_SET)
            .map(|i| get_request(TENANT, &format!("hit-{i}"), PROVIDER))
            .collect(),
    );

    let mut rows = Vec::new();
    for &concurrency in &params.hit_concurrency {
        let connections = connections_for(concurrency);
        let (mut vault_runs, mut echo_runs, mut vault_health_runs) =
            (Vec::new(), Vec::new(), Vec::new());
        for round in 0..params.hit_rounds {
            // Rotate which side goes first so drift in the machine's load
            // does not always favour the same one. Every side gets new
            // connections each round: where a connection's tasks land on the
            // runtime's two workers lasts as long as the connection and moves
            // a side's rate by several percent, so it is averaged over rounds
            // rather than fixed for the whole run.
            for turn in 0..3 {
                let side = [Side::Echo, Side::VaultHealth, Side::Vault][(round + turn) % 3];
                if only.is_some_and(|only| !only.contains(&side)) {
                    continue;
                }
                match side {
                    Side::Echo => echo_runs.push(
                        health_checks(bench.echo_clients(connections).await, concurrency, params)
                            .await,
                    ),
                    Side::VaultHealth => vault_health_runs.push(
                        health_checks(
                            bench.vault_health_clients(connections).await,
                            concurrency,
                            params,
                        )
                        .await,
                    ),
                    Side::Vault => vault_runs.push(
                        cache_hits(
                            bench.vault_clients(connections).await,
                            Arc::clone(&requests),
                            concurrency,
                            params,
                        )
                        .await,
                    ),
                }
            }
        }
        if only.is_some() {
            let calls: usize = [&echo_runs, &vault_health_runs, &vault_runs]
                .into_iter()
                .flatten()
                .map(Sample::count)
                .sum();
            eprintln!("  c={concurrency:>3}: {calls} calls measured (warm-up not counted)");
            continue;
        }
        let row = HitRow {
            concurrency,
            connections,
            echo: Sample::merge(echo_runs),
            vault: Sample::merge(vault_runs),
            vault_health: Sample::merge(vault_health_runs),
        };
        row.echo.expect_clean("echo Health/Check");
        row.vault.expect_clean("GetAccessToken (cache hit)");
        row.vault_health.expect_clean("the vault's Health/Check");
        eprintln!(
            "  c={concurrency:>3}: vault {:>8.0} rps p99 {:>6.0} us | vault health {:>8.0} rps | echo {:>8.0} rps p99 {:>6.0} us",
            row.vault.rps(),
            row.vault.pct(99.0).as_secs_f64() * 1e6,
            row.vault_health.rps(),
            row.echo.rps(),
            row.echo.pct(99.0).as_secs_f64() * 1e6,
        );
        rows.push(row);
    }
    rows
}

/// One closed-loop run of `Health/Check` over `clients`.
async fn health_checks(
    clients: Vec<HealthClient<Channel>>,
    concurrency: usize,
    params: &Params,
) -> Sample {
    let clients = Arc::new(clients);
    closed_loop(
        concurrency,
        params.warmup,
        params.hit_measure,
        move |w, _| {
            let mut client = clients[w % clients.len()].clone();
            async move {
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        },
    )
    .await
}

/// One closed-loop run of cache-hit GetAccessTokens over `clients`, worker
/// `w` asking for `requests[w % len]`.
async fn cache_hits(
    clients: Vec<CredentialVaultClient<Channel>>,
    requests: Arc<Vec<pb::GetAccessTokenRequest>>,
    concurrency: usize,
    params: &Params,
) -> Sample {
    let clients = Arc::new(clients);
    closed_loop(
        concurrency,
        params.warmup,
        params.hit_measure,
        move |w, _| {
            let mut client = clients[w % clients.len()].clone();
            let request = requests[w % requests.len()].clone();
            async move {
                client
                    .get_access_token(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        },
    )
    .await
}
