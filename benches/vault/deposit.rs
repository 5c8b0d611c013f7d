//! Scenario 4: durable Deposit through gRPC against the least any durable
//! RPC can cost (issue 17), interleaved:
//!
//! - the **durable echo**: a bare tonic server behind the vault's own TLS
//!   configuration and accept loop whose one handler inserts a record-sized
//!   value into sled and flushes it (`Db::flush` on tokio's blocking pool,
//!   one flush per call: what a service without group commit does);
//! - the same vault with the event log off (`[events] enabled = false`),
//!   which prices writing each Deposit's DEPOSITED event in the same write;
//! - for context, the raw loop without any RPC: insert + blocking flush.
//!
//! The vault and the echo also report where their calls' time went,
//! server-side ([`ServerTiming`]): the handler, and the durable write within
//! it.
//! The rest of a call at the client is the RPC around the handler.
//!
//! Every round of every side runs in a fresh process ([`crate::child`]):
//! sled keeps per-process state (its flusher, page cache) that one side
//! must not leave to the next. sled 0.34.7's `flush_async`, the baseline of
//! an earlier issue, is no longer measured: it deadlocks once about eight
//! calls overlap (spacejam/sled#1308; see the notes in BENCHMARKS.md).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use credvault::{
    api::pb,
    broker::record,
    crypto::{self, Keyring, RecordIdentity},
};

use serde::{Deserialize, Serialize};
use tonic::service::Routes;
use tonic_health::pb::{
    health_check_response,
    health_server::{Health, HealthServer},
    HealthCheckRequest, HealthCheckResponse,
};

use crate::{
    fixture::{
        bounded, deposit_request, far_future, health_clients, serve_bare, vault_clients, PROVIDER,
        STALL, TENANT,
    },
    load::{closed_loop, Sample, ServerTiming},
    refresh::Fresh,
    support::vault::{scrape_metrics, VaultDir},
    Params,
};

pub struct DepositRow {
    pub concurrency: usize,
    pub vault: Sample,
    /// The same vault with the event log off.
    pub vault_no_events: Sample,
    /// tonic RPC + raw sled insert + flush per call.
    pub durable_echo: Sample,
    /// Raw sled insert + flush per call, no RPC.
    pub raw_blocking: Sample,
    pub value_bytes: usize,
    /// After the run, did one more Deposit to the shipped vault get through?
    pub vault_alive_after: bool,
    /// Where the shipped vault's calls spent their time, server-side (warm-up
    /// included). The span is its `credvault_rpc_duration_seconds`, which
    /// covers the call frame (gate, admission of the request, the broker,
    /// the audit frame); the store write within it goes to the writer
    /// thread, does the compare-and-swap with the event, waits for the
    /// batch's flush and comes back.
    pub vault_inside: ServerTiming,
    /// Where the durable echo's calls spent their time, server-side, timed
    /// by the echo: its handler as the span, and within it the one hop to
    /// the blocking pool for insert + flush.
    pub echo_inside: ServerTiming,
}

impl DepositRow {
    /// The ratio: shipped vault vs the durable echo.
    pub fn ratio(&self) -> f64 {
        self.vault.rps() / self.durable_echo.rps()
    }

    /// The price of the event: Deposit with events vs without.
    pub fn events_ratio(&self) -> f64 {
        self.vault.rps() / self.vault_no_events.rps()
    }

    /// Vault vs raw `insert` + blocking `flush`.
    pub fn blocking_ratio(&self) -> f64 {
        self.vault.rps() / self.raw_blocking.rps()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Vault,
    VaultNoEvents,
    DurableEcho,
    RawBlocking,
}

impl Side {
    const ALL: [Side; 4] = [
        Side::Vault,
        Side::VaultNoEvents,
        Side::DurableEcho,
        Side::RawBlocking,
    ];

    fn name(self) -> &'static str {
        match self {
            Side::Vault => "vault",
            Side::VaultNoEvents => "vault-no-events",
            Side::DurableEcho => "durable-echo",
            Side::RawBlocking => "raw-blocking",
        }
    }

    pub fn parse(name: &str) -> Self {
        Side::ALL
            .into_iter()
            .find(|side| side.name() == name)
            .expect("deposit side")
    }
}

/// What one child measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct DepositChild {
    pub sample: Sample,
    pub value_bytes: usize,
    /// Vault sides: did one more Deposit get through after the run?
    pub alive_after: Option<bool>,
    /// The vault and the durable echo: their handlers' own timing.
    pub inside: Option<ServerTiming>,
}

struct Raw {
    _dir: tempfile::TempDir,
    db: sled::Db,
    tree: sled::Tree,
}

impl Raw {
    fn open() -> Self {
        let dir = tempfile::tempdir().expect("raw sled dir");
        let db = sled::Config::new()
            .path(dir.path())
            .mode(sled::Mode::HighThroughput)
            .open()
            .expect("open raw sled");
        let tree = db.open_tree("raw").expect("raw tree");
        Self {
            _dir: dir,
            db,
            tree,
        }
    }
}

/// Every side at every concurrency, each round of each side in a fresh
/// process, the order of the sides rotating from round to round.
pub async fn run(params: &Params) -> Vec<DepositRow> {
    let mut rows = Vec::new();
    for &concurrency in &params.deposit_concurrency {
        let mut runs: [Vec<DepositChild>; 4] = Default::default();
        for round in 0..params.deposit_rounds {
            for k in 0..Side::ALL.len() {
                let at = (k + round) % Side::ALL.len();
                // A side that wedged its process will wedge it again: one
                // such round is the finding; more would only cost time.
                if runs[at].iter().any(|c| {
                    c.sample
                        .first_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("wedged"))
                }) {
                    continue;
                }
                let child: DepositChild = crate::child::run(vec![
                    "deposit".into(),
                    Side::ALL[at].name().into(),
                    concurrency.to_string(),
                    round.to_string(),
                    crate::child::mode_arg(params.mode),
                ])
                .await;
                runs[at].push(child);
            }
        }
        let [vault, vault_no_events, durable_echo, raw_blocking] = runs;
        let value_bytes = raw_blocking
            .iter()
            .map(|c| c.value_bytes)
            .max()
            .unwrap_or(0);
        let vault_alive_after = vault
            .iter()
            .chain(&vault_no_events)
            .all(|c| c.alive_after == Some(true));
        let inside = |children: &[DepositChild]| {
            ServerTiming::merge(children.iter().filter_map(|c| c.inside.as_ref()))
        };
        let (vault_inside, echo_inside) = (inside(&vault), inside(&durable_echo));
        let merge =
            |children: Vec<DepositChild>| Sample::merge(children.into_iter().map(|c| c.sample));
        let row = DepositRow {
            concurrency,
            vault: merge(vault),
            vault_no_events: merge(vault_no_events),
            durable_echo: merge(durable_echo),
            raw_blocking: merge(raw_blocking),
            value_bytes,
            vault_alive_after,
            vault_inside,
            echo_inside,
        };
        row.raw_blocking
            .expect_clean("raw sled insert + blocking flush");
        row.durable_echo.expect_clean("durable echo");
        eprintln!(
            "  c={concurrency:>3}: Deposit {:>6.0}/s {}| without events {:>6.0}/s | durable echo {:>6.0}/s | raw flush {:>6.0}/s | {:.2}x",
            row.vault.rps(),
            row.vault.failure_note(),
            row.vault_no_events.rps(),
            row.durable_echo.rps(),
            row.raw_blocking.rps(),
            row.ratio(),
        );
        rows.push(row);
    }
    rows
}

/// One side, one concurrency, one round, in this (fresh) process.
pub async fn child(params: &Params, side: Side, concurrency: usize, round: usize) -> DepositChild {
    credvault::server::tls::install_crypto_provider();
    let token_url = "http://127.0.0.1:9/token";
    let template = deposit_request(token_url, "x", "deposit-refresh-token", far_future());
    match side {
        Side::Vault | Side::VaultNoEvents => {
            let dir = match side {
                Side::VaultNoEvents => {
                    VaultDir::custom("allow_http_loopback = true", "[events]\nenabled = false\n")
                }
                _ => VaultDir::new(),
            };
            let vault = Fresh::start(dir).await;
            let value_bytes = sealed_record_len(&vault.dir.keyring(), token_url);
            let connections = crate::hits::connections_for(concurrency);
            let clients = Arc::new(vault_clients(&vault.dir, vault.addr, connections).await);
            let sample = {
                let (clients, template) = (Arc::clone(&clients), template.clone());
                closed_loop(
                    concurrency,
                    params.warmup,
                    params.deposit_measure,
                    move |w, seq| {
                        let mut client = clients[w % clients.len()].clone();
                        let request = deposit_for(&template, format!("dep-{round}-{w}-{seq}"));
                        async move { bounded(client.deposit(request)).await.map(|_| ()) }
                    },
                )
                .await
            };
            // Read before the probe Deposit, which is not one of the run's
            // calls (the warm-up's are, as in the echo's own timing).
            // Only Deposits went through this vault: its RPC histogram is theirs.
            let inside = ServerTiming::from_metrics(
                &scrape_metrics(vault.ops).await,
                "credvault_rpc_duration_seconds",
            );
            // Can this vault still write at all?
            let mut probe = clients[0].clone();
            let alive = bounded(probe.deposit(deposit_for(&template, "probe".into())))
                .await
                .is_ok();
            DepositChild {
                sample,
                value_bytes,
                alive_after: Some(alive),
                inside: Some(inside),
            }
        }
        Side::DurableEcho => {
            let value_bytes = sealed_record_len(&Keyring::generate(), token_url);
            let dir = VaultDir::new();
            let raw = Raw::open();
            let timing = Arc::new(EchoTiming::default());
            let echo = DurableEcho {
                db: raw.db.clone(),
                tree: raw.tree.clone(),
                value: vec![0x5a; value_bytes].into(),
                timing: Arc::clone(&timing),
            };
            let (addr, _stop) = serve_bare(&dir, Routes::new(HealthServer::new(echo))).await;
            let clients = Arc::new(
                health_clients(&dir, addr, crate::hits::connections_for(concurrency)).await,
            );
            let sample = closed_loop(
                concurrency,
                params.warmup,
                params.deposit_measure,
                move |w, seq| {
                    let mut client = clients[w % clients.len()].clone();
                    let request = HealthCheckRequest {
                        service: format!("{round}/{w}/{seq}"),
                    };
                    async move { bounded(client.check(request)).await.map(|_| ()) }
                },
            )
            .await;
            DepositChild {
                sample,
                value_bytes,
                alive_after: None,
                inside: Some(timing.inside()),
            }
        }
        Side::RawBlocking => {
            let value_bytes = sealed_record_len(&Keyring::generate(), token_url);
            let value: Arc<[u8]> = vec![0x5a; value_bytes].into();
            let raw = Raw::open();
            let (db, tree) = (raw.db.clone(), raw.tree.clone());
            let sample = closed_loop(
                concurrency,
                params.warmup,
                params.deposit_measure,
                move |w, seq| {
                    let (db, tree, value) = (db.clone(), tree.clone(), value.clone());
                    async move {
                        let key = format!("{round}/{w}/{seq}");
                        let write = tokio::task::spawn_blocking(move || {
                            tree.insert(key.as_bytes(), &*value)?;
                            db.flush()
                        });
                        match tokio::time::timeout(STALL, write).await {
                            Ok(joined) => joined
                                .expect("write task")
                                .map(|_| ())
                                .map_err(|e| e.to_string()),
                            Err(_) => Err(format!(
                                "stalled: flush did not complete within {} s",
                                STALL.as_secs()
                            )),
                        }
                    }
                },
            )
            .await;
            DepositChild {
                sample,
                value_bytes,
                alive_after: None,
                inside: None,
            }
        }
    }
}

/// The durable echo's one handler: `Check { service }` inserts a
/// record-sized value under `service` and answers once a flush covers it.
/// Both run on the blocking pool, as any sled call must (a sled write can
/// wait on disk), in one hop.
struct DurableEcho {
    db: sled::Db,
    tree: sled::Tree,
    value: Arc<[u8]>,
    timing: Arc<EchoTiming>,
}

/// The echo's counterpart of the vault's two histograms: sums in
/// nanoseconds, and the calls they cover.
#[derive(Default)]
struct EchoTiming {
    calls: AtomicU64,
    handler_ns: AtomicU64,
    store_ns: AtomicU64,
}

impl EchoTiming {
    fn inside(&self) -> ServerTiming {
        let calls = self.calls.load(Ordering::Relaxed);
        let mean = |sum: &AtomicU64| {
            Duration::from_nanos(sum.load(Ordering::Relaxed).checked_div(calls).unwrap_or(0))
        };
        ServerTiming {
            writes: calls,
            span_mean: mean(&self.handler_ns),
            store_mean: mean(&self.store_ns),
        }
    }
}

#[tonic::async_trait]
impl Health for DurableEcho {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let started = Instant::now();
        let key = request.into_inner().service;
        let (db, tree, value) = (self.db.clone(), self.tree.clone(), self.value.clone());
        let sent = Instant::now();
        tokio::task::spawn_blocking(move || {
            tree.insert(key.as_bytes(), &*value)?;
            db.flush()
        })
        .await
        .map_err(|_| tonic::Status::internal("write task failed"))?
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let nanos = |since: Instant| u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.timing
            .store_ns
            .fetch_add(nanos(sent), Ordering::Relaxed);
        self.timing
            .handler_ns
            .fetch_add(nanos(started), Ordering::Relaxed);
        self.timing.calls.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(HealthCheckResponse {
            status: health_check_response::ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>,
    >;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the durable echo only checks"))
    }
}

fn deposit_for(template: &pb::DepositRequest, subject: String) -> pb::DepositRequest {
    let mut request = template.clone();
    if let Some(credential) = request.credential.as_mut() {
        credential.subject = subject;
    }
    request
}

/// The stored size of a record like the ones the Deposits above create.
fn sealed_record_len(keyring: &Keyring, token_url: &str) -> usize {
    let record = crate::scale::bench_record(token_url, "deposit-refresh-token", far_future());
    let id = RecordIdentity {
        tenant: TENANT,
        subject: "dep-0-15-123456",
        provider: PROVIDER,
    };
    let envelope =
        crypto::seal(keyring, &id, &record::encode(&record)).expect("seal a sample record");
    // revision || generation || envelope, as the store keeps it.
    8 + record::frame(record.generation, envelope).len()
}
