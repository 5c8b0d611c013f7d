//! Records of the `log` crate (the storage engine's, rustls's, reqwest's),
//! passed on to the `tracing` subscriber as tracing-log's `LogTracer`
//! passes them, except TRACE records of the targets that can write from a
//! thread's teardown.
//!
//! Why not `LogTracer` alone: the embedded store's engine logs at TRACE from
//! crossbeam-epoch deferred functions, and deferred functions run wherever
//! the epoch is next collected, including in a thread's thread-local
//! destructors as it exits: a tokio blocking thread idle for 10 s, the
//! store's writer at shutdown. By then the fmt layer's thread-local buffer
//! may be gone, tracing-subscriber panics on it, and a panic in a
//! thread-local destructor aborts the process (tokio-rs/tracing#3239). With
//! `RUST_LOG=trace` a vault's thread exit could end in SIGABRT; it was seen
//! as one in a test capturing TRACE logs. Those TRACE lines are the
//! engine's internals, of no use to an operator. The targets come from the
//! store (`TEARDOWN_LOG_TARGETS`): telemetry names no storage engine.

use log::{Level, Log, Metadata, Record};
use tracing_log::{AsLog, LogTracer};

/// The bridge, installed as the `log` crate's logger.
pub(super) struct LogBridge {
    tracer: LogTracer,
    teardown_targets: &'static [&'static str],
}

impl LogBridge {
    /// Installs the bridge, at most as verbose as the `tracing` subscriber
    /// already installed. A second call does nothing.
    pub(super) fn install(teardown_targets: &'static [&'static str]) {
        let bridge = Self {
            tracer: LogTracer::new(),
            teardown_targets,
        };
        if log::set_boxed_logger(Box::new(bridge)).is_ok() {
            log::set_max_level(tracing::level_filters::LevelFilter::current().as_log());
        }
    }

    /// A record that may be written while its thread is being torn down.
    fn may_come_from_teardown(&self, metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        metadata.level() == Level::Trace
            && self.teardown_targets.iter().any(|crate_name| {
                target
                    .strip_prefix(crate_name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
    }
}

impl Log for LogBridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !self.may_come_from_teardown(metadata) && self.tracer.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        // `LogTracer::log` asks the subscriber itself whether it is enabled.
        if !self.may_come_from_teardown(record.metadata()) {
            self.tracer.log(record);
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(level: Level, target: &str) -> Metadata<'_> {
        Metadata::builder().level(level).target(target).build()
    }

    #[test]
    fn only_trace_records_of_the_teardown_targets_are_held_back() {
        let bridge = LogBridge {
            tracer: LogTracer::new(),
            teardown_targets: &["engine"],
        };
        for target in ["engine", "engine::pagecache::iobuf"] {
            assert!(bridge.may_come_from_teardown(&metadata(Level::Trace, target)));
        }
        for (level, target) in [
            (Level::Debug, "engine::pagecache::iobuf"),
            (Level::Warn, "engine"),
            (Level::Trace, "rustls::conn"),
            (Level::Trace, "engineer"),
        ] {
            assert!(
                !bridge.may_come_from_teardown(&metadata(level, target)),
                "{level} {target}"
            );
        }
    }
}
