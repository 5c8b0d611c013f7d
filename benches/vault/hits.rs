//! Scenario 1: GetAccessToken served from the cache, against the echo
//! baseline at the same concurrency, in interleaved rounds.

use std::sync::Arc;

use credvault::api::pb::{
    self,
    credential_vault_client::CredentialVaultClient,
    credential_vault_server::{CredentialVault, CredentialVaultServer},
};
use tonic::{codegen::BoxStream, service::Routes, transport::Channel, Request, Response, Status};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::{
    fixture::{far_future, serve_bare, vault_clients, Bench, PROVIDER, TENANT},
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
    /// [`ContractEcho`]: the contract's messages and generated code, none of
    /// the vault's work.
    pub contract_echo: Sample,
}

impl HitRow {
    pub fn throughput_ratio(&self) -> f64 {
        self.vault.rps() / self.echo.rps()
    }

    pub fn p99_ratio(&self) -> f64 {
        self.vault.pct(99.0).as_secs_f64() / self.echo.pct(99.0).as_secs_f64()
    }
}

/// The four sides of the scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `Health/Check` on the bare tonic server.
    Echo,
    /// `Health/Check` on the vault's own port.
    VaultHealth,
    /// GetAccessToken from the cache.
    Vault,
    /// GetAccessToken from [`ContractEcho`].
    ContractEcho,
}

impl Side {
    /// The sides a `--hits-side` name selects: one, or none (`none`: the vault
    /// starts, its credentials are deposited and the contract echo starts
    /// with the vault's answer, then nothing, which is what a profile of one
    /// side subtracts).
    pub fn parse(name: &str) -> Option<Vec<Self>> {
        match name {
            "echo" => Some(vec![Self::Echo]),
            "health" => Some(vec![Self::VaultHealth]),
            "vault" => Some(vec![Self::Vault]),
            "contract" => Some(vec![Self::ContractEcho]),
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
    let answer = admin
        .get_access_token(requests[0].clone())
        .await
        .expect("the vault's answer, for the contract echo")
        .into_inner();
    let (contract_addr, _contract_stop) = serve_bare(
        &bench.dir,
        Routes::new(CredentialVaultServer::new(ContractEcho { answer })),
    )
    .await;

    let mut rows = Vec::new();
    for &concurrency in &params.hit_concurrency {
        let connections = connections_for(concurrency);
        let (mut vault_runs, mut echo_runs, mut vault_health_runs, mut contract_runs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..params.hit_rounds {
            // Rotate which side goes first so drift in the machine's load
            // does not always favour the same one. Every side gets new
            // connections each round: where a connection's tasks land on the
            // runtime's two workers lasts as long as the connection and moves
            // a side's rate by several percent, so it is averaged over rounds
            // rather than fixed for the whole run.
            const ORDER: [Side; 4] = [
                Side::Echo,
                Side::VaultHealth,
                Side::Vault,
                Side::ContractEcho,
            ];
            for turn in 0..ORDER.len() {
                let side = ORDER[(round + turn) % ORDER.len()];
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
                    Side::ContractEcho => contract_runs.push(
                        cache_hits(
                            vault_clients(&bench.dir, contract_addr, connections).await,
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
            let calls: usize = [&echo_runs, &vault_health_runs, &vault_runs, &contract_runs]
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
            contract_echo: Sample::merge(contract_runs),
        };
        row.echo.expect_clean("echo Health/Check");
        row.vault.expect_clean("GetAccessToken (cache hit)");
        row.vault_health.expect_clean("the vault's Health/Check");
        row.contract_echo
            .expect_clean("the contract echo's GetAccessToken");
        eprintln!(
            "  c={concurrency:>3}: vault {:>8.0} rps p99 {:>6.0} us | vault health {:>8.0} rps | contract echo {:>8.0} rps | echo {:>8.0} rps p99 {:>6.0} us",
            row.vault.rps(),
            row.vault.pct(99.0).as_secs_f64() * 1e6,
            row.vault_health.rps(),
            row.contract_echo.rps(),
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

/// The least a GetAccessToken can cost: the contract's generated server
/// (tonic's unary wrapper and the vault's request codec, `api::codec`) on the
/// bare echo server, answering every call with a copy of the vault's own
/// answer to the same request. It decodes the same request and encodes the
/// same answer as the vault, and does nothing else: no admission, no gate, no
/// cache lookup, no audit entry. So the gap between it and the echo is what
/// the contract's messages cost, and the gap between the vault and it is
/// what the vault's own work costs.
struct ContractEcho {
    answer: pb::GetAccessTokenResponse,
}

/// Every method but GetAccessToken is refused: the scenario calls none.
fn not_echoed<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the contract echo answers GetAccessToken only",
    ))
}

#[tonic::async_trait]
impl CredentialVault for ContractEcho {
    async fn get_access_token(
        &self,
        _: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        Ok(Response::new(self.answer.clone()))
    }

    async fn deposit(
        &self,
        _: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        not_echoed()
    }

    async fn revoke(
        &self,
        _: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        not_echoed()
    }

    async fn begin_authorization(
        &self,
        _: Request<pb::BeginAuthorizationRequest>,
    ) -> Result<Response<pb::BeginAuthorizationResponse>, Status> {
        not_echoed()
    }

    async fn complete_authorization(
        &self,
        _: Request<pb::CompleteAuthorizationRequest>,
    ) -> Result<Response<pb::CompleteAuthorizationResponse>, Status> {
        not_echoed()
    }

    async fn begin_device_authorization(
        &self,
        _: Request<pb::BeginDeviceAuthorizationRequest>,
    ) -> Result<Response<pb::BeginDeviceAuthorizationResponse>, Status> {
        not_echoed()
    }

    async fn get_authorization(
        &self,
        _: Request<pb::GetAuthorizationRequest>,
    ) -> Result<Response<pb::Authorization>, Status> {
        not_echoed()
    }

    type WatchCredentialEventsStream = BoxStream<pb::CredentialEvent>;

    async fn watch_credential_events(
        &self,
        _: Request<pb::WatchCredentialEventsRequest>,
    ) -> Result<Response<Self::WatchCredentialEventsStream>, Status> {
        not_echoed()
    }
}
