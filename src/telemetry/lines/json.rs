//! The JSON line: tracing-subscriber's `Format<Json>` with `flatten_event`,
//! as `log.format = "json"` configures it, written straight into one buffer.
//!
//! The library streams each entry through serde_json into an `io::Write`
//! adapter over its `fmt::Write` buffer, which checks UTF-8 on every piece
//! serde_json writes (a key, a quote, a colon), and formats `Debug` values
//! through `collect_str`. Here the same entries go through serde_json into
//! a byte buffer that is checked once.
//!
//! The fast path is an event outside any span that did not come from the
//! `log` crate: the audit line's case. Its line is `timestamp`, `level`,
//! the fields in their order (strings, booleans, integers and floats as
//! serde_json writes them, every other value as its `Debug` in a string),
//! then `target`. An event in a span (whose line lists the spans) or from
//! `log` (whose metadata is rewritten) goes to the library's formatter.

use std::fmt::{self, Write as _};

use serde::Serialize;
use tracing::{
    field::{Field, Visit},
    Event, Subscriber,
};
use tracing_subscriber::{
    fmt::{
        format::{Format, Json, Writer},
        time::FormatTime,
        FmtContext, FormatEvent, FormatFields,
    },
    registry::LookupSpan,
};

use super::UtcMicros;

/// The JSON event format `credvault serve` installs.
#[derive(Debug)]
pub struct JsonLine {
    /// The library's format, for the events the fast path leaves to it.
    library: Format<Json, UtcMicros>,
}

impl JsonLine {
    pub fn new() -> Self {
        Self {
            library: tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_timer(UtcMicros),
        }
    }
}

impl Default for JsonLine {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let in_span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current())
            .is_some();
        // tracing-log's events carry their record's metadata in `log.`
        // fields, which the library reads back in place of the event's.
        let from_log = || {
            event
                .metadata()
                .fields()
                .iter()
                .any(|field| field.name().starts_with("log."))
        };
        if in_span || from_log() {
            return self.library.format_event(ctx, writer, event);
        }
        let mut timestamp = String::new();
        UtcMicros.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();

        let mut line = Entries {
            out: Vec::with_capacity(256),
            debug: String::new(),
            result: Ok(()),
        };
        line.out.push(b'{');
        line.entry("timestamp", timestamp.as_str());
        // The names tracing-serde writes too.
        line.entry("level", meta.level().as_str());
        event.record(&mut line);
        line.entry("target", meta.target());
        line.out.push(b'}');
        line.result?;
        // serde_json writes UTF-8: its escapes are ASCII and the rest is
        // copied from `str`s.
        writer.write_str(std::str::from_utf8(&line.out).map_err(|_| fmt::Error)?)?;
        writer.write_char('\n')
    }
}

/// The line's `"key":value` entries, after the opening brace.
struct Entries {
    out: Vec<u8>,
    /// Reused for each `Debug` value.
    debug: String,
    result: fmt::Result,
}

impl Entries {
    fn entry<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        if self.result.is_err() {
            return;
        }
        if self.out.len() > 1 {
            self.out.push(b',');
        }
        let written = serde_json::to_writer(&mut self.out, key).and_then(|()| {
            self.out.push(b':');
            serde_json::to_writer(&mut self.out, value)
        });
        self.result = written.map_err(|_| fmt::Error);
    }
}

/// What tracing-serde's `SerdeMapVisitor` does with each kind of value.
impl Visit for Entries {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field.name(), &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field.name(), &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field.name(), &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field.name(), &value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let mut debug = std::mem::take(&mut self.debug);
        debug.clear();
        if write!(debug, "{value:?}").is_ok() {
            self.entry(field.name(), debug.as_str());
        } else {
            self.result = Err(fmt::Error);
        }
        self.debug = debug;
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::format::JsonFields;

    use super::{super::emit, *};

    /// The lines `emit::all` writes, as `credvault serve` configures JSON,
    /// with the event format given; timestamps taken out (and checked).
    fn lines<E>(format: E) -> Vec<String>
    where
        E: FormatEvent<tracing_subscriber::Registry, JsonFields> + Send + Sync + 'static,
    {
        let out = emit::Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_max_level(tracing::Level::TRACE)
            .json()
            .flatten_event(true)
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, emit::all);
        out.text()
            .lines()
            .map(|line| {
                let (before, rest) = line.split_once(r#"{"timestamp":""#).expect("a timestamp");
                assert_eq!(before, "");
                let (at, rest) = rest.split_once('"').expect("its end");
                assert!(at.len() == 27 && at.ends_with('Z'), "{at}");
                rest.to_owned()
            })
            .collect()
    }

    #[test]
    fn lines_are_written_as_tracing_subscriber_writes_them() {
        let ours = lines(JsonLine::new());
        let theirs = lines(tracing_subscriber::fmt::format().json().flatten_event(true));
        assert_eq!(ours.len(), emit::LINES, "{ours:?}");
        // Byte for byte, not only as JSON values: key order and number
        // formats are part of a line.
        assert_eq!(ours, theirs);
        // Spelled out as well, so that a change in the library reads as
        // one: the audit line outside a span, the fast path's case...
        assert_eq!(
            ours[0],
            r#","level":"INFO","message":"call","method":"GetAccessToken","identity":"spiffe://mesh.local/ns/a/sa/b","tenant":"acme","provider":"","subject":"5f3a9c0e1b2d4a67","reason":"OK","latency_ms":0.183421,"target":"credvault::audit"}"#
        );
        assert!(
            ours[2].contains(r#""nan":null,"infinite":null"#),
            "{}",
            ours[2]
        );
        assert!(
            ours[3].contains(r#""whole":3.0,"tiny":1e-7,"huge":1e+300"#),
            "{}",
            ours[3]
        );
        // ...and the same event in a span, which the library writes.
        assert!(ours[7].ends_with(
            r#","target":"credvault::audit","span":{"method":"GetAccessToken","n":3,"name":"call"},"spans":[{"method":"GetAccessToken","n":3,"name":"call"}]}"#
        ), "{}", ours[7]);
    }
}
