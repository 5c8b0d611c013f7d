//! Scenario 5: how gets, memory and start-up grow with the number of stored
//! credentials.
//!
//! For each level the parent writes a fresh vault directory (certificates,
//! a keyring sealed with the production Argon2id parameters, config) and
//! fills its store directly — every record built as the broker builds it
//! (`record::encode`, the real envelope via `crypto::seal`, `record::frame`)
//! — because a million durable Deposits through gRPC would take far longer
//! than the measurement. Population is timed but kept out of every figure.
//!
//! The measurement runs in a child process (this binary, re-executed with
//! `--child scale`), so RSS and start-up are those of a fresh vault process
//! and not of the harness: t0 is before the config is read; cold start ends
//! when the first GetAccessToken (a cache miss: store read + decrypt) is
//! answered over a fresh mTLS connection.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use credvault::{
    api::pb::credential_vault_client::CredentialVaultClient,
    broker::{
        model::{AccessToken, ClientAuth, ClientConfig, CredentialRecord, CredentialState},
        record,
    },
    config::Config,
    crypto::{self, KdfParams, Keyring, RecordIdentity},
    secret::SecretString,
    server::{self, tls, Listeners},
    store::{self, StoreKey, StoreSettings},
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::{
    fixture::{connect, far_future, CLIENT_ID, CLIENT_SECRET, PROVIDER, TENANT},
    load::{closed_loop, fan_out, Sample},
    support::vault::{get_request, VaultDir, PASSPHRASE},
    Params,
};

/// The record tree of the sled store (src/store/sled_store.rs). The bench
/// mirrors the store's on-disk layout to bulk-load it, then checks the
/// result reads back through the store and the server.
const RECORDS_TREE: &str = "credentials.v1";
/// Spreads the sampled credentials over the whole key space.
const STRIDE: usize = 7919;
/// `count` credentials asked for once each (so each is a miss that fills
/// the cache), from the `from`-th in [`pick`] order, at [`WARM_CONCURRENCY`].
async fn first_gets(
    client: &CredentialVaultClient<Channel>,
    from: usize,
    count: usize,
    n: usize,
) -> Sample {
    let client = client.clone();
    fan_out(count, WARM_CONCURRENCY, 1, move |j| {
        let mut client = client.clone();
        let request = get_request(TENANT, &subject(pick(from + j, n)), PROVIDER);
        async move {
            client
                .get_access_token(request)
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await
}

/// The vault process once every stored credential has been served (and so
/// cached) once.
#[derive(Debug, Serialize, Deserialize)]
pub struct AllCached {
    pub credentials: usize,
    pub rss_kib: u64,
}

/// The sled page cache, in MiB, of the largest level's second process.
pub const CAPPED_CACHE_MIB: u64 = 64;

/// Concurrency of the warm-up pass that fills the token cache.
const WARM_CONCURRENCY: usize = 32;

pub struct ScaleRow {
    pub n: usize,
    pub populate: Duration,
    pub data_bytes: u64,
    pub child: ChildResult,
    /// The largest level only: a second process whose sled page cache is
    /// [`CAPPED_CACHE_MIB`], every credential served once.
    pub capped: Option<ChildResult>,
    pub miss: Sample,
    pub hit: Sample,
    pub warm: Sample,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ChildResult {
    pub n: usize,
    pub cold_start_ns: u64,
    pub rss_base_kib: u64,
    pub rss_cold_kib: u64,
    pub rss_final_kib: u64,
    /// The largest level only: RSS once every credential was served once.
    pub all: Option<AllCached>,
    pub miss_ns: Vec<u64>,
    pub warm_ns: Vec<u64>,
    pub warm_secs: f64,
    pub hit_ns: Vec<u64>,
    pub hit_secs: f64,
}

impl ScaleRow {
    pub fn cold_start(&self) -> Duration {
        Duration::from_nanos(self.child.cold_start_ns)
    }
}

/// A credential record as a refresh-token Deposit creates it.
pub fn bench_record(
    token_url: &str,
    refresh_token: &str,
    expires_at: SystemTime,
) -> CredentialRecord {
    let now = SystemTime::now();
    CredentialRecord {
        generation: 1,
        state: CredentialState::Active,
        client: ClientConfig {
            token_endpoint: token_url.parse().expect("token url"),
            client_id: CLIENT_ID.into(),
            client_secret: Some(SecretString::from(CLIENT_SECRET)),
            auth: ClientAuth::SecretBasic,
            revocation_endpoint: None,
            scopes: Vec::new(),
            flows: Default::default(),
            assertion_key: None,
        },
        preset: None,
        refresh_token: Some(SecretString::from(refresh_token)),
        access_token: Some(AccessToken {
            token: SecretString::from(format!("access-{refresh_token}")),
            token_type: "Bearer".into(),
            expires_at,
            scopes: Vec::new(),
        }),
        client_credentials: false,
        labels: Default::default(),
        created_at: now,
        updated_at: now,
        last_refresh_at: None,
        failing_since: None,
        failing_reported: false,
        last_event: None,
    }
}

fn subject(i: usize) -> String {
    format!("user-{i:07}")
}

/// The k-th sampled credential of a store of `n`.
fn pick(k: usize, n: usize) -> usize {
    (k * STRIDE + 1) % n
}

pub async fn run(params: &Params) -> Vec<ScaleRow> {
    let mut rows = Vec::new();
    for &n in &params.scale_levels {
        let dir = VaultDir::new();
        let admin = &dir.pki.clients["admin"];
        std::fs::write(dir.path().join("admin.pem"), &admin.cert_pem).expect("write cert");
        std::fs::write(dir.path().join("admin-key.pem"), &admin.key_pem).expect("write key");
        // Start-up must pay for the production key derivation, not the
        // tests' cheap one.
        let keyring = dir.keyring();
        crypto::store(
            &dir.keyring_path(),
            &keyring,
            &SecretString::from(PASSPHRASE),
            KdfParams::default(),
        )
        .expect("reseal keyring");

        let data = dir.path().join("data");
        let populate = {
            let data = data.clone();
            tokio::task::spawn_blocking(move || {
                populate(&data, &keyring, n, |i| {
                    let record =
                        bench_record("http://127.0.0.1:9/token", &format!("rt-{i}"), far_future());
                    (subject(i), record)
                })
            })
            .await
            .expect("populate")
        };
        verify_layout(&data, n, &dir.keyring()).await;
        let data_bytes = dir_size(&data);
        eprintln!(
            "  {n} credentials stored in {:.1} s ({:.0} MiB on disk); measuring in a fresh process",
            populate.as_secs_f64(),
            data_bytes as f64 / 1048576.0
        );

        let child: ChildResult = crate::child::run(vec![
            "scale".to_owned(),
            dir.path().display().to_string(),
            n.to_string(),
            params.scale_misses.to_string(),
            params.scale_warm.to_string(),
            params.hit_measure.as_millis().to_string(),
            // The largest level also caches every credential once, for the
            // memory a fully cached store takes.
            (n == *params.scale_levels.iter().max().unwrap_or(&n)).to_string(),
        ])
        .await;
        // The largest level again in a process whose sled page cache is
        // capped: what `storage.sled.cache_capacity_mib` buys.
        let capped = if child.all.is_some() {
            let capped: ChildResult = crate::child::run(vec![
                "scale".to_owned(),
                dir.path().display().to_string(),
                n.to_string(),
                "1".to_owned(),
                "0".to_owned(),
                "100".to_owned(),
                "true".to_owned(),
                CAPPED_CACHE_MIB.to_string(),
            ])
            .await;
            Some(capped)
        } else {
            None
        };
        let row = ScaleRow {
            n,
            populate,
            data_bytes,
            capped,
            miss: Sample::from_latencies(child.miss_ns.clone(), 0.0),
            hit: Sample::from_latencies(child.hit_ns.clone(), child.hit_secs),
            warm: Sample::from_latencies(child.warm_ns.clone(), child.warm_secs),
            child,
        };
        eprintln!(
            "  {n}: cold start {:.0} ms, miss p50 {:.0} us, hit p50 {:.0} us, RSS {} MiB",
            row.cold_start().as_secs_f64() * 1e3,
            row.miss.pct(50.0).as_secs_f64() * 1e6,
            row.hit.pct(50.0).as_secs_f64() * 1e6,
            row.child.rss_cold_kib / 1024
        );
        rows.push(row);
    }
    rows
}

/// Bulk-loads `n` records, `make(i) = (subject, record)` in tenant
/// [`TENANT`] and provider [`PROVIDER`], sealed with the real envelope, into
/// a new store at `data` (no server may have it open).
pub fn populate(
    data: &Path,
    keyring: &Keyring,
    n: usize,
    make: impl Fn(usize) -> (String, CredentialRecord),
) -> Duration {
    let started = Instant::now();
    let db = sled::Config::new()
        .path(data)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open store for population");
    let tree = db.open_tree(RECORDS_TREE).expect("records tree");
    let mut batch = sled::Batch::default();
    for i in 0..n {
        let (subject, record) = make(i);
        let id = RecordIdentity {
            tenant: TENANT,
            subject: &subject,
            provider: PROVIDER,
        };
        let envelope = crypto::seal(keyring, &id, &record::encode(&record)).expect("seal");
        let value = record::frame(record.generation, envelope);
        // Revisions come from the same counter the sled store uses.
        let revision = db.generate_id().expect("revision") + 1;
        let mut raw = Vec::with_capacity(8 + value.len());
        raw.extend_from_slice(&revision.to_be_bytes());
        raw.extend_from_slice(&value);
        batch.insert(StoreKey::new(TENANT, &subject, PROVIDER).as_bytes(), raw);
        if (i + 1) % 10_000 == 0 {
            tree.apply_batch(std::mem::take(&mut batch))
                .expect("apply batch");
        }
    }
    tree.apply_batch(batch).expect("apply batch");
    db.flush().expect("flush");
    started.elapsed()
}

/// Reads a few bulk-loaded records back through the store and the real
/// envelope, so a drift of the mirrored layout fails here, loudly.
async fn verify_layout(data: &Path, n: usize, keyring: &Keyring) {
    let store = store::open(&StoreSettings::Embedded {
        data_dir: data.to_owned(),
        cache_capacity: 64 << 20,
    })
    .await
    .expect("open populated store");
    assert_eq!(
        store.count_after(None).await.expect("count"),
        n as u64,
        "populated record count"
    );
    for k in [0, 1, n / 2] {
        let i = pick(k, n);
        let subject = subject(i);
        let stored = store
            .get(&StoreKey::new(TENANT, &subject, PROVIDER))
            .await
            .expect("get")
            .expect("populated record present");
        let (generation, envelope) = record::unframe(&stored.value).expect("frame");
        let id = RecordIdentity {
            tenant: TENANT,
            subject: &subject,
            provider: PROVIDER,
        };
        let plaintext = crypto::open(keyring, &id, envelope).expect("open envelope");
        let decoded = record::decode(&plaintext).expect("decode record");
        assert_eq!(decoded.generation, generation);
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Resident set size of this process, from /proc/self/status.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// The measuring process: `DIR N MISSES WARM HIT_MS CACHE_ALL [SLED_CACHE_MIB]`.
pub async fn child(args: &[String]) -> ChildResult {
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).expect("scale child args") };
    let dir = PathBuf::from(arg(0));
    let n: usize = arg(1).parse().expect("n");
    let misses: usize = arg(2).parse().expect("misses");
    let warm: usize = arg(3).parse().expect("warm");
    let hit = Duration::from_millis(arg(4).parse().expect("hit ms"));
    let cache_all = arg(5) == "true";
    let sled_cache_mib = args.get(6).map(|mib| mib.parse().expect("sled cache MiB"));
    measure(dir, n, misses, warm, hit, cache_all, sled_cache_mib).await
}

async fn measure(
    dir: PathBuf,
    n: usize,
    misses: usize,
    warm: usize,
    hit: Duration,
    cache_all: bool,
    sled_cache_mib: Option<u64>,
) -> ChildResult {
    tls::install_crypto_provider();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("read pem");
    let (ca, cert, key) = (read("ca.pem"), read("admin.pem"), read("admin-key.pem"));
    let config_path = dir.join("credvault.toml");
    let load = || {
        let mut config = Config::load(&config_path).expect("config");
        if let Some(mib) = sled_cache_mib {
            config.storage.sled.cache_capacity_mib = mib;
        }
        config
    };
    let mut config = load();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.ops_listen = "127.0.0.1:0".parse().expect("addr");
    let listeners = Listeners::bind(&config).await.expect("bind");
    let addr = listeners.grpc.local_addr().expect("addr");
    let rss_base_kib = rss_kib();

    // Cold start: config, keyring (Argon2id), store open, key guard, TLS
    // handshake, first request (a miss) answered.
    let started = Instant::now();
    let mut config = load();
    config.listen = addr;
    let (stop, stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(server::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    let channel = tokio::select! {
        channel = connect(addr, &ca, &cert, &key) => channel,
        ended = &mut server => panic!("vault did not start: {ended:?}"),
    };
    let mut client = CredentialVaultClient::new(channel);
    client
        .get_access_token(get_request(TENANT, &subject(pick(0, n)), PROVIDER))
        .await
        .expect("first request");
    let cold_start_ns = started.elapsed().as_nanos() as u64;
    let rss_cold_kib = rss_kib();

    // Misses, one at a time: distinct credentials never asked for before.
    let misses = misses.min(n / 4).max(1);
    let mut miss_ns = Vec::with_capacity(misses);
    for k in 1..=misses {
        let request = get_request(TENANT, &subject(pick(k, n)), PROVIDER);
        let sent = Instant::now();
        client.get_access_token(request).await.expect("miss");
        miss_ns.push(sent.elapsed().as_nanos() as u64);
    }

    // Warm the cache with more distinct credentials, concurrently.
    let warm = warm.min(n - misses - 1);
    let warm_sample = first_gets(&client, misses + 1, warm, n).await;
    warm_sample.expect_clean_or_empty("warm-up misses");

    // Hits, one at a time, spread over everything cached so far.
    let cached = misses + warm + 1;
    let hits = {
        let client = client.clone();
        closed_loop(1, Duration::from_millis(200), hit, move |_, seq| {
            let mut client = client.clone();
            let k = (seq as usize).wrapping_mul(2_654_435_761) % cached;
            let request = get_request(TENANT, &subject(pick(k, n)), PROVIDER);
            async move {
                client
                    .get_access_token(request)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.to_string())
            }
        })
        .await
    };
    hits.expect_clean("cache hits");
    let rss_final_kib = rss_kib();

    // Every credential not asked for yet, once: then all of them are cached.
    let all = if cache_all && cached < n {
        let rest = first_gets(&client, cached, n - cached, n).await;
        rest.expect_clean_or_empty("caching every credential");
        Some(AllCached {
            credentials: n,
            rss_kib: rss_kib(),
        })
    } else {
        None
    };

    let _ = stop.send(());
    let _ = server.await;
    ChildResult {
        n,
        cold_start_ns,
        rss_base_kib,
        rss_cold_kib,
        rss_final_kib,
        all,
        miss_ns,
        warm_ns: warm_sample.lat_ns,
        warm_secs: warm_sample.secs,
        hit_ns: hits.lat_ns,
        hit_secs: hits.secs,
    }
}
