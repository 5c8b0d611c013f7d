//! The log lines, byte for byte as tracing-subscriber writes them, for less
//! work: the text format's fields ([`TextFields`]), the JSON event
//! ([`JsonLine`]), and the timestamp both share ([`UtcMicros`]).
//!
//! Why: a served vault writes one audit line per call, on the worker that
//! answers it, before the answer leaves. Counted with callgrind (the vault
//! side of the cache-hit bench, `--audit PATH`), formatting a text line
//! cost 13 260 instructions and a JSON line 17 170, most of them in
//! `core::fmt` and its adapters: a `write_char` per character of every
//! string, ANSI styles that write nothing when colours are off, seven
//! padded integer formats for the timestamp, and for JSON an `io::Write`
//! to `fmt::Write` adapter that checks UTF-8 on every piece serde_json
//! writes (BENCHMARKS.md, 2026-12-04 evening, has the figures after).
//!
//! Nothing about a line changes. Each fast path covers only what it can
//! write exactly as the library would, and hands everything else to the
//! library's own formatter; the tests set both side by side on events with
//! every kind of field, inside a span and outside, and compare the lines.

mod json;
mod text;
mod time;

pub use self::{json::JsonLine, text::TextFields, time::UtcMicros};

/// What the tests of each format share: a writer that keeps the lines,
/// and events with every kind of field.
#[cfg(test)]
mod emit {
    use std::{
        fmt, io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::fmt::MakeWriter;

    /// Lines written by a subscriber, shared with the test.
    #[derive(Clone, Default)]
    pub(super) struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    impl Lines {
        pub(super) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug)]
    struct Failed(&'static str, Option<Box<Failed>>);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// How many lines [`all`] writes.
    pub(super) const LINES: usize = 14;

    /// [`events`] outside any span (the audit line's case), then inside one.
    pub(super) fn all() {
        events();
        let span = tracing::info_span!("call", method = "GetAccessToken", n = 3);
        let _entered = span.enter();
        events();
    }

    /// Every kind of field an event can carry, the fast paths' and the
    /// library's.
    fn events() {
        tracing::info!(
            target: "credvault::audit",
            method = "GetAccessToken",
            identity = %"spiffe://mesh.local/ns/a/sa/b",
            tenant = "acme",
            provider = "",
            subject = "5f3a9c0e1b2d4a67",
            reason = "OK",
            latency_ms = 0.183_421_f64,
            "call"
        );
        let error = Failed("refused", Some(Box::new(Failed("upstream said no", None))));
        tracing::warn!(
            quoted = "say \"hi\"",
            backslash = r"C:\dir",
            newline = "two\nlines",
            tab = "a\tb",
            escape = "\u{1b}[31mred",
            accented = "zoë",
            combining = "e\u{301}",
            apostrophe = "it's",
            tilde_and_space = " ~ ",
            r#type = "raw name",
            flag = true,
            count = -7_i64,
            big = u64::MAX,
            wide = i128::MIN,
            bytes = &b"\x00\xff"[..],
            error = &error as &(dyn std::error::Error + 'static),
            debug = ?Some("x"),
            "a message with \"quotes\" and \u{1b}[0m an escape"
        );
        tracing::error!(only = "fields", nan = f64::NAN, infinite = f64::INFINITY);
        tracing::debug!(whole = 3.0_f64, tiny = 1e-7_f64, huge = 1e300_f64);
        tracing::info!("only a message");
        tracing::info!(before = 1, r#"a "plain" message with C:\dir and ~"#);
        tracing::trace!("a message with a DEL \x7f and a C1 \u{85} character");
    }
}
