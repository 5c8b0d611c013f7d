//! credvault's benchmark harness (issue 8): the real vault over real mTLS,
//! measured against baselines taken in the same run, since absolute numbers
//! drift on a shared machine and ratios do not (as much).
//!
//! ```text
//! cargo bench --bench vault              # full run, writes BENCHMARKS.md
//! cargo bench --bench vault -- --quick   # < 60 s, writes target/BENCHMARKS-quick.md
//! ```
//!
//! Options after `--`: `--quick`, `--out PATH` (where the report goes),
//! `--only hits,burst,refresh,deposit,scale,replicas` (a subset; development aid),
//! `--hits-side echo|health|vault|contract|none` (scenario 1 alone, and of it that side
//! alone, or none; no report is written: a profiling aid, see
//! `callgrind_sides.py`), `--audit PATH` (scenarios 1 and 2 with the log
//! subscriber a served vault installs by default, writing every call's
//! audit line to `PATH`; without it, no subscriber runs and the vault
//! skips its audit lines), `--audit-format text|json` (the lines' format,
//! `log.format`; text by default, as in a served vault).
//!
//! Under `cargo test --all-targets` cargo runs this binary without `--bench`
//! (debug build, test-runner arguments): it then does a smoke run of every
//! scenario at toy sizes in a few seconds and writes no report.
//!
//! Scenarios (see each module): [`hits`] 1, [`refresh`] 2 and 3,
//! [`deposit`] 4, [`scale`] 5, [`replicas`] 6 (etcd). [`fixture`] starts the vault, the echo
//! baseline and the OAuth provider double; [`report`] writes the markdown.

#[path = "../../tests/support/mod.rs"]
mod support;

mod child;
mod deposit;
mod fixture;
mod hits;
mod load;
mod refresh;
mod replicas;
mod report;
mod scale;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `cargo test`: every scenario at toy sizes, no report.
    Smoke,
    /// `--quick`: CI-sized, under a minute.
    Quick,
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Smoke => "smoke",
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

/// Sizes and durations of one run.
#[derive(Clone, Debug)]
pub struct Params {
    pub mode: Mode,
    pub warmup: Duration,
    pub hit_concurrency: Vec<usize>,
    pub hit_measure: Duration,
    pub hit_rounds: usize,
    pub burst_callers: usize,
    pub burst_rounds: usize,
    pub burst_latency: Duration,
    pub refresh_credentials: usize,
    pub refresh_concurrency: usize,
    pub refresh_latency: Duration,
    pub deposit_concurrency: Vec<usize>,
    pub deposit_measure: Duration,
    pub deposit_rounds: usize,
    pub scale_levels: Vec<usize>,
    pub scale_misses: usize,
    pub scale_warm: usize,
    /// Where the in-process vault's log lines go (`--audit`), if anywhere.
    pub audit_log: Option<PathBuf>,
    /// Their format (`--audit-format`): a served vault's default unless set.
    pub audit_format: credvault::telemetry::LogFormat,
}

impl Params {
    fn for_mode(mode: Mode) -> Self {
        let ms = Duration::from_millis;
        let full = Params {
            mode,
            warmup: ms(500),
            hit_concurrency: vec![1, 16, 64],
            hit_measure: ms(2000),
            hit_rounds: 4,
            burst_callers: 1000,
            burst_rounds: 5,
            burst_latency: ms(50),
            refresh_credentials: 10_000,
            refresh_concurrency: 64,
            refresh_latency: ms(20),
            deposit_concurrency: vec![1, 16, 64],
            deposit_measure: ms(2000),
            // A multiple of the four sides: with the order rotating, every
            // side then follows every other side equally often. With three
            // rounds the vault followed the raw flush loop twice and the
            // echo never, and a child right after that loop measured 8 %
            // slower (the vault) and 3 % (the echo).
            deposit_rounds: 4,
            scale_levels: vec![1_000, 100_000, 1_000_000],
            scale_misses: 2_000,
            scale_warm: 50_000,
            audit_log: None,
            audit_format: credvault::config::LogConfig::default().format,
        };
        match mode {
            Mode::Full => full,
            Mode::Quick => Params {
                warmup: ms(200),
                hit_measure: ms(1000),
                hit_rounds: 1,
                burst_rounds: 2,
                refresh_credentials: 1_000,
                deposit_concurrency: vec![1, 16],
                deposit_measure: ms(1000),
                deposit_rounds: 1,
                scale_levels: vec![1_000, 10_000],
                scale_misses: 500,
                scale_warm: 5_000,
                ..full
            },
            Mode::Smoke => Params {
                warmup: ms(50),
                hit_concurrency: vec![1, 4],
                hit_measure: ms(200),
                hit_rounds: 1,
                burst_callers: 50,
                burst_rounds: 1,
                refresh_credentials: 50,
                refresh_concurrency: 8,
                deposit_concurrency: vec![1, 4],
                // Not shorter: the raw side's flushes in a debug build on a
                // busy CI host once stalled past a 200 ms window, and a
                // window no request started in is refused as no figure.
                deposit_measure: ms(1000),
                deposit_rounds: 1,
                scale_levels: vec![200],
                scale_misses: 20,
                scale_warm: 50,
                ..full
            },
        }
    }
}

/// Everything one run measured.
#[derive(Default)]
pub struct Results {
    pub hits: Vec<hits::HitRow>,
    pub burst: Option<refresh::BurstResult>,
    pub refresh: Option<refresh::ThroughputResult>,
    pub deposit: Vec<deposit::DepositRow>,
    pub scale: Vec<scale::ScaleRow>,
    pub replicas: Option<replicas::ReplicasResult>,
}

/// The subscriber `credvault serve` installs with its default `[log]`
/// settings (filter `info`; text unless `--audit-format json`), writing to
/// `path` instead of stderr:
/// every call's audit line is formatted and written, one `write` each, as
/// in a served vault. Process-wide, so it covers the scenarios that run in
/// this process (1 and 2); the echo writes no lines of its own.
fn install_audit_log(path: &std::path::Path, format: credvault::telemetry::LogFormat) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open the audit log {}: {e}", path.display()));
    let defaults = credvault::config::LogConfig::default();
    credvault::telemetry::init_logging_to(
        &defaults.filter,
        format,
        false,
        std::sync::Arc::new(file),
        credvault::store::TEARDOWN_LOG_TARGETS,
    );
}

fn main() {
    // A failed scenario must end the process: unwinding out of `block_on`
    // would otherwise wait on the runtime's blocking threads and the
    // servers' tasks, and a `cargo test` run would hang instead of failing.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        child::main(&args[at + 1..]);
    }
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|at| args.get(at + 1))
            .cloned()
    };
    let mode = if !args.iter().any(|a| a == "--bench") {
        Mode::Smoke
    } else if args.iter().any(|a| a == "--quick") {
        Mode::Quick
    } else {
        Mode::Full
    };
    let hits_side = value_of("--hits-side").map(|name| {
        hits::Side::parse(&name).unwrap_or_else(|| {
            panic!("--hits-side takes echo, health, vault, contract or none, not {name:?}")
        })
    });
    // A profile of one side of scenario 1 runs that scenario alone.
    let only: Option<Vec<String>> = match hits_side {
        Some(_) => Some(vec!["hits".to_owned()]),
        None => value_of("--only").map(|list| list.split(',').map(str::to_owned).collect()),
    };
    let selected = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = value_of("--out").map(PathBuf::from).or(match mode {
        Mode::Full => Some(root.join("BENCHMARKS.md")),
        Mode::Quick => Some(root.join("target").join("BENCHMARKS-quick.md")),
        Mode::Smoke => None,
    });
    let defaults = Params::for_mode(mode);
    let params = Params {
        audit_log: value_of("--audit").map(PathBuf::from),
        audit_format: match value_of("--audit-format").as_deref() {
            None => defaults.audit_format,
            Some("text") => credvault::telemetry::LogFormat::Text,
            Some("json") => credvault::telemetry::LogFormat::Json,
            Some(other) => panic!("--audit-format takes text or json, not {other:?}"),
        },
        ..defaults
    };
    if let Some(path) = &params.audit_log {
        install_audit_log(path, params.audit_format);
    }
    let shown: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    let command = if shown.is_empty() {
        "cargo bench --bench vault".to_owned()
    } else {
        format!("cargo bench --bench vault -- {}", shown.join(" "))
    };

    let before = report::Environment::capture(&root, command);
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let results = runtime.block_on(async {
        let mut results = Results::default();
        let bench = fixture::Bench::start().await;
        if selected("hits") {
            eprintln!("[1/6] GetAccessToken cache hits vs echo");
            results.hits = hits::run(&bench, &params, hits_side.as_deref()).await;
        }
        if selected("burst") {
            eprintln!(
                "[2/6] refresh burst: {} callers on one expired credential",
                params.burst_callers
            );
            results.burst = Some(refresh::burst(&bench, &params).await);
        }
        // The rest run in processes of their own (or start their own
        // vaults): nothing of the first two scenarios may keep running
        // beside them (the vault's background jobs, sled's flusher, the
        // connections' tasks), so the shared vault goes before they start.
        drop(bench);
        if selected("refresh") {
            eprintln!(
                "[3/6] refresh throughput: {} expiring credentials",
                params.refresh_credentials
            );
            results.refresh = Some(refresh::throughput(&params).await);
        }
        if selected("deposit") {
            eprintln!("[4/6] durable Deposit vs the durable echo");
            results.deposit = deposit::run(&params).await;
        }
        if selected("scale") {
            eprintln!("[5/6] scale: {:?} stored credentials", params.scale_levels);
            results.scale = scale::run(&params).await;
        }
        if selected("replicas") {
            eprintln!("[6/6] replicas on a 3-member etcd cluster");
            results.replicas = Some(replicas::run(&params).await);
        }
        results
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let elapsed = started.elapsed();
    if hits_side.is_some() {
        eprintln!("one side of scenario 1 alone: no report written");
        return;
    }
    let env = before.finish(elapsed);
    let markdown = report::render(&params, &env, &results);
    println!("{markdown}");
    if let Some(out) = out {
        report::write(&out, &markdown);
        eprintln!("wrote {} ({:.0} s)", out.display(), elapsed.as_secs_f64());
    } else {
        eprintln!(
            "smoke run ({}) finished in {:.1} s; no report written",
            params.mode.name(),
            elapsed.as_secs_f64()
        );
    }
}
