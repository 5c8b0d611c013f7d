//! Measurements that run in a fresh process (this binary, re-executed with
//! `--child KIND ARGS…`), printing one `CHILD-RESULT <json>` line.
//!
//! RSS and cold start must be those of a fresh vault process (scenario 5);
//! write-heavy measurements (scenarios 3 and 4) must not inherit another's
//! state, and sled 0.34.7's `flush_async` deadlock (spacejam/sled#1308),
//! which the raw `flush_async` baseline of scenario 4 runs into, wedges
//! sled's process-wide thread pool: no later `flush_async` in that process
//! completes.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use serde::{de::DeserializeOwned, Serialize};

use crate::{deposit, load::Sample, refresh, scale, Mode, Params};

const PREFIX: &str = "CHILD-RESULT ";

/// Runs `--child args…` and returns what it printed.
pub async fn run<T: DeserializeOwned>(args: Vec<String>) -> T {
    let what = args.join(" ");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(std::env::current_exe().expect("own path"))
            .arg("--child")
            .args(&args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run child process")
    })
    .await
    .expect("child process");
    assert!(
        output.status.success(),
        "child `{what}` failed: {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(PREFIX))
        .unwrap_or_else(|| panic!("child `{what}` printed no result"));
    serde_json::from_str(line).expect("child result")
}

static EMITTED: AtomicBool = AtomicBool::new(false);

/// Prints the result once (the measurement or the watchdog, whichever is
/// first) and ends the process: stalled sled flushes may never return.
fn emit<T: Serialize>(value: &T) -> ! {
    if !EMITTED.swap(true, Ordering::SeqCst) {
        println!(
            "{PREFIX}{}",
            serde_json::to_string(value).expect("encode child result")
        );
    }
    std::process::exit(0)
}

/// A wedged sled blocks the runtime's worker threads inside synchronous
/// calls (`insert`, `get`), so no timeout inside the runtime can fire: this
/// plain thread reports `fallback` if the measurement has not ended by then.
fn watchdog<T: Serialize + Send + 'static>(after: Duration, fallback: T) {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        eprintln!(
            "  watchdog: no progress after {} s; the process is wedged",
            after.as_secs()
        );
        emit(&fallback);
    });
}

/// The result of a measurement that never finished.
fn wedged(secs: f64) -> Sample {
    Sample {
        lat_ns: Vec::new(),
        secs,
        errors: 1,
        first_error: Some(
            "wedged: the whole process stopped answering (blocked in sled)".to_owned(),
        ),
    }
}

pub fn mode_arg(mode: Mode) -> String {
    mode.name().to_owned()
}

fn mode_from(name: &str) -> Mode {
    match name {
        "full" => Mode::Full,
        "quick" => Mode::Quick,
        _ => Mode::Smoke,
    }
}

/// Entry point of a child process; never returns.
pub fn main(args: &[String]) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).expect("child args") };
    match arg(0) {
        "scale" => emit(&runtime.block_on(scale::child(&args[1..]))),
        "refresh" => {
            let params = Params::for_mode(mode_from(arg(1)));
            // Generous: ten times the ideal duration, plus set-up.
            let ideal = params.refresh_credentials as f64 * params.refresh_latency.as_secs_f64()
                / params.refresh_concurrency as f64;
            let limit = Duration::from_secs_f64(20.0 + 10.0 * ideal);
            watchdog(
                limit,
                refresh::ThroughputChild {
                    sample: wedged(limit.as_secs_f64()),
                    upstream_calls: 0,
                    direct: Sample::from_latencies(Vec::new(), 0.0),
                    inside: Default::default(),
                },
            );
            emit(&runtime.block_on(refresh::throughput_child(&params)));
        }
        "deposit" => {
            let params = Params::for_mode(mode_from(arg(4)));
            let side = deposit::Side::parse(arg(1));
            let concurrency = arg(2).parse().expect("concurrency");
            let round = arg(3).parse().expect("round");
            let limit = params.warmup + params.deposit_measure + crate::fixture::STALL;
            watchdog(
                limit + Duration::from_secs(2),
                deposit::DepositChild {
                    sample: wedged(params.deposit_measure.as_secs_f64()),
                    value_bytes: 0,
                    alive_after: Some(false),
                    inside: None,
                },
            );
            emit(&runtime.block_on(deposit::child(&params, side, concurrency, round)));
        }
        other => panic!("unknown child kind {other}"),
    }
}
