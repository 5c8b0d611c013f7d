//! The text format's fields: tracing-subscriber's `DefaultFields`, with the
//! common cases written without `core::fmt`'s per-character work.
//!
//! The fast paths: a named field without ANSI colours is `name=` and the
//! value's `Debug`, without the library's styles (which write nothing when
//! colours are off); a string whose every byte is printable ASCII other
//! than `"` and `\` is copied in quotes (its `Debug` is exactly that).
//! Everything else (the message, `r#` and `log.` names, errors, escapes,
//! colours) goes to the library's own `DefaultVisitor`.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        format::{DefaultVisitor, Writer},
        FormatFields,
    },
};

/// tracing-subscriber's `DefaultFields` output: named fields written
/// without the library's empty styles, plain strings without `core::fmt`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'a> {
    writer: Writer<'a>,
    /// No field written yet: the next one needs no separating space.
    is_empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// One field the way tracing-subscriber writes it, by its own visitor.
    fn upstream(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        // Its one field it does not write: the `log.` metadata that
        // tracing-log adds to events from the `log` crate.
        self.is_empty &= field.name().starts_with("log.");
    }

    /// The fields the library writes its own way: the message (unquoted,
    /// with terminal escapes sanitized), `r#` names (which lose their
    /// prefix), `log.` ones (skipped), and any field when ANSI colours
    /// style the name.
    fn is_special(&self, field: &Field) -> bool {
        let name = field.name();
        name == "message"
            || name.starts_with("r#")
            || name.starts_with("log.")
            || self.writer.has_ansi_escapes()
    }

    /// `name=` and the value `write_value` writes, after a separating space
    /// unless it is the first field.
    fn named(
        &mut self,
        name: &str,
        write_value: impl FnOnce(&mut Writer<'_>) -> fmt::Result,
    ) -> fmt::Result {
        if !std::mem::take(&mut self.is_empty) {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(name)?;
        self.writer.write_char('=')?;
        write_value(&mut self.writer)
    }
}

/// Whether `str`'s `Debug` of `value` is `value` in quotes: it escapes
/// only `"`, `\`, control characters and some non-ASCII ones.
fn debug_is_verbatim(value: &str) -> bool {
    value
        .bytes()
        .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if self.is_special(field) || !debug_is_verbatim(value) {
            self.upstream(field, |visitor| visitor.record_str(field, value));
        } else {
            self.result = self.named(field.name(), |writer| {
                writer.write_char('"')?;
                writer.write_str(value)?;
                writer.write_char('"')
            });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_ok() {
            self.upstream(field, |visitor| visitor.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if self.is_special(field) {
            self.upstream(field, |visitor| visitor.record_debug(field, value));
        } else {
            // The library's `{name}={value:?}`, without its styles, which
            // write nothing when colours are off.
            self.result = self.named(field.name(), |writer| write!(writer, "{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::{format::DefaultFields, time::FormatTime};

    use super::{super::emit, super::UtcMicros, *};

    /// The lines `emit::all` writes, with the fields formatter and the
    /// timer given, and ANSI colours on or off; timestamps cut off.
    fn lines<N, T>(fields: N, timer: T, ansi: bool) -> Vec<String>
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
        T: FormatTime + Send + Sync + 'static,
    {
        let out = emit::Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(ansi)
            .with_timer(timer)
            .with_max_level(tracing::Level::TRACE)
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit::all);
        out.text()
            .lines()
            .map(|line| {
                line.split_once(' ')
                    .expect("a timestamp, then a space")
                    .1
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn fields_are_written_as_tracing_subscriber_writes_them() {
        for ansi in [false, true] {
            let ours = lines(TextFields, UtcMicros, ansi);
            let theirs = lines(
                DefaultFields::new(),
                tracing_subscriber::fmt::time::SystemTime,
                ansi,
            );
            assert_eq!(ours.len(), emit::LINES, "{ours:?}");
            assert_eq!(ours, theirs, "ansi: {ansi}");
        }
        // Spelled out as well, so that a change in the library reads as
        // one: what the fast path writes...
        let ours = lines(TextFields, UtcMicros, false);
        assert!(ours[0].ends_with(
            r#"credvault::audit: call method="GetAccessToken" identity=spiffe://mesh.local/ns/a/sa/b tenant="acme" provider="" subject="5f3a9c0e1b2d4a67" reason="OK" latency_ms=0.183421"#
        ), "{}", ours[0]);
        assert!(ours[5].ends_with(r#"emit: a "plain" message with C:\dir and ~ before=1"#));
        // ...and what the library writes for what it leaves to it.
        let escaped = &ours[1];
        for expected in [
            r#"quoted="say \"hi\"""#,
            r#"backslash="C:\\dir""#,
            r#"newline="two\nlines""#,
            r#"escape="\u{1b}[31mred""#,
            r#"combining="e\u{301}""#,
            r#"type="raw name""#,
        ] {
            assert!(escaped.contains(expected), "{expected} in {escaped}");
        }
    }
}
