//! What the vault tells its operators: logs, metrics and the audit trail.
//!
//! - [`init_logging`]: the global `tracing` subscriber (text or JSON).
//! - [`metrics`]: the Prometheus metrics served on the ops listener.
//! - [`audit`]: the per-call audit event and the subject's keyed hash.
//! - `lines`: the text and JSON lines, as tracing-subscriber writes them,
//!   for less work on the call path.
//! - `log_bridge`: the `log` crate's records, passed on to `tracing`.
//!
//! Structured fields, lowercase messages; secrets never reach any of them
//! because every type that holds one prints `[redacted]`.

pub mod audit;
mod lines;
mod log_bridge;
pub mod metrics;

use serde::Deserialize;
use tracing_subscriber::{fmt, EnvFilter};

pub use self::metrics::Metrics;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing to stderr: `RUST_LOG` wins over
/// `filter`. Records of the `log` crate pass on to it, except TRACE records
/// of `teardown_targets` (the store's `TEARDOWN_LOG_TARGETS`): see
/// `log_bridge` for why.
pub fn init_logging(filter: &str, format: LogFormat, teardown_targets: &'static [&'static str]) {
    // Colours only for a person at a terminal; log pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_logging_to(filter, format, ansi, std::io::stderr, teardown_targets);
}

/// [`init_logging`], writing to `writer` (the benchmarks write the audit
/// trail to a file, to price it).
pub fn init_logging_to<W>(
    filter: &str,
    format: LogFormat,
    ansi: bool,
    writer: W,
    teardown_targets: &'static [&'static str],
) where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    // The library's formats, written by `lines` where that is cheaper: the
    // audit line is written on the call path.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_timer(lines::UtcMicros);
    let installed = match format {
        LogFormat::Text => {
            tracing::subscriber::set_global_default(builder.fmt_fields(lines::TextFields).finish())
        }
        LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .event_format(lines::JsonLine::new())
                .finish(),
        ),
    };
    // Not `try_init`: its bridge for the `log` crate can abort the process
    // (see `log_bridge`).
    if installed.is_ok() {
        log_bridge::LogBridge::install(teardown_targets);
    }
}
