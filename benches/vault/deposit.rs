//! Scenario 4: durable Deposit through gRPC against a raw sled
//! `insert` + `flush_async` loop on the same filesystem, interleaved; and
//! against the same vault with the event log off (`[events] enabled =
//! false`), which prices writing each Deposit's DEPOSITED event in the same
//! atomic write.
//!
//! sled 0.34.7's `flush_async` deadlocks once about eight calls overlap
//! (spacejam/sled#1308) and sled's process-wide flush path stays wedged
//! after that (the vault's store avoids it with a group-commit `Db::flush`
//! on the blocking pool), so every round of every side runs in a fresh
//! process ([`crate::child`]), and a second raw loop runs beside the one the
//! issue names: `Db::flush` on tokio's blocking pool after every insert.

use std::sync::Arc;

use credvault::{
    api::pb,
    broker::record,
    crypto::{self, Keyring, RecordIdentity},
};

use serde::{Deserialize, Serialize};

use crate::{
    fixture::{bounded, deposit_request, far_future, vault_clients, PROVIDER, STALL, TENANT},
    load::{closed_loop, Sample},
    refresh::Fresh,
    support::vault::VaultDir,
    Params,
};

pub struct DepositRow {
    pub concurrency: usize,
    pub vault: Sample,
    /// The same vault with the event log off.
    pub vault_no_events: Sample,
    pub raw_async: Sample,
    pub raw_blocking: Sample,
    pub value_bytes: usize,
    /// After the run, did one more Deposit to the shipped vault get through?
    pub vault_alive_after: bool,
}

impl DepositRow {
    /// The ratio: shipped vault vs raw `insert` + `flush_async`.
    pub fn ratio(&self) -> f64 {
        self.vault.rps() / self.raw_async.rps()
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
    RawAsync,
    RawBlocking,
}

impl Side {
    const ALL: [Side; 4] = [
        Side::Vault,
        Side::VaultNoEvents,
        Side::RawAsync,
        Side::RawBlocking,
    ];

    fn name(self) -> &'static str {
        match self {
            Side::Vault => "vault",
            Side::VaultNoEvents => "vault-no-events",
            Side::RawAsync => "raw-async",
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
        let [vault, vault_no_events, raw_async, raw_blocking] = runs;
        let value_bytes = raw_blocking
            .iter()
            .map(|c| c.value_bytes)
            .max()
            .unwrap_or(0);
        let vault_alive_after = vault
            .iter()
            .chain(&vault_no_events)
            .all(|c| c.alive_after == Some(true));
        let merge =
            |children: Vec<DepositChild>| Sample::merge(children.into_iter().map(|c| c.sample));
        let row = DepositRow {
            concurrency,
            vault: merge(vault),
            vault_no_events: merge(vault_no_events),
            raw_async: merge(raw_async),
            raw_blocking: merge(raw_blocking),
            value_bytes,
            vault_alive_after,
        };
        row.raw_blocking
            .expect_clean("raw sled insert + blocking flush");
        eprintln!(
            "  c={concurrency:>3}: Deposit {:>6.0}/s {}| without events {:>6.0}/s | raw flush_async {:>6.0}/s {}| raw flush {:>6.0}/s",
            row.vault.rps(),
            row.vault.failure_note(),
            row.vault_no_events.rps(),
            row.raw_async.rps(),
            row.raw_async.failure_note(),
            row.raw_blocking.rps()
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
            // Can this vault still write at all?
            let mut probe = clients[0].clone();
            let alive = bounded(probe.deposit(deposit_for(&template, "probe".into())))
                .await
                .is_ok();
            DepositChild {
                sample,
                value_bytes,
                alive_after: Some(alive),
            }
        }
        Side::RawAsync | Side::RawBlocking => {
            let value_bytes = sealed_record_len(&Keyring::generate(), token_url);
            let value: Arc<[u8]> = vec![0x5a; value_bytes].into();
            let blocking = side == Side::RawBlocking;
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
                        tree.insert(key.as_bytes(), &*value)
                            .map_err(|e| e.to_string())?;
                        let flushed = if blocking {
                            tokio::time::timeout(
                                STALL,
                                tokio::task::spawn_blocking(move || db.flush()),
                            )
                            .await
                            .map(|joined| joined.expect("flush task").map(|_| ()))
                        } else {
                            tokio::time::timeout(STALL, db.flush_async())
                                .await
                                .map(|r| r.map(|_| ()))
                        };
                        match flushed {
                            Ok(result) => result.map_err(|e| e.to_string()),
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
            }
        }
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
