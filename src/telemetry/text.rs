//! The text log line, byte for byte as tracing-subscriber writes it, for
//! less work: its fields ([`TextFields`]) and its timestamp ([`UtcMicros`]).
//!
//! Why: a served vault writes one audit line per call, on the worker that
//! answers it, before the answer leaves. Counted with callgrind, formatting
//! the line cost a cache hit 13 260 instructions, most of them in
//! `core::fmt`: each string field went through `str`'s `Debug` (an escape
//! check and a `write_char` per character), each field name through two
//! ANSI styles that write nothing when colours are off, and the timestamp
//! through seven padded integer formats (2 425 instructions). With these
//! two, the line costs 6 335 (BENCHMARKS.md, 2026-12-04 evening).
//!
//! Nothing about the line changes. The fast paths cover only what they can
//! write exactly as tracing-subscriber would: a named field without ANSI
//! colours (`name=` then the value's `Debug`, with no styling to write), a
//! string value whose every byte is printable ASCII other than `"` and `\`
//! (its `Debug` is then the string in quotes), and a time between the
//! years 1970 and 9999. Everything else (the message, `r#` and `log.`
//! names, errors, colours, dates outside that range) is handed to
//! tracing-subscriber's own formatter.
//! The tests compare both formatters' lines over those cases, and the JSON
//! lines, which share the timestamp.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        format::{DefaultVisitor, Writer},
        time::FormatTime,
        FormatFields,
    },
};

/// tracing-subscriber's `DefaultFields` output, with plain string fields
/// written without `core::fmt`.
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

/// tracing-subscriber's `SystemTime` timestamp (RFC 3339 in UTC, to the
/// microsecond: `2026-12-04T15:01:47.123456Z`), written from integers.
#[derive(Clone, Copy, Debug, Default)]
pub struct UtcMicros;

/// 10000-01-01T00:00:00Z: from here on the year takes five digits.
const YEAR_10000: u64 = 253_402_300_800;

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) if since.as_secs() < YEAR_10000 => {
                let line = rfc3339_micros(since.as_secs(), since.subsec_micros());
                // Every byte written below is an ASCII digit or separator.
                w.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
            }
            // A clock before 1970 or past 9999: the library's own format.
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for `secs` since the epoch, below
/// [`YEAR_10000`], and `micros` below a million.
fn rfc3339_micros(secs: u64, micros: u32) -> [u8; 27] {
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut line = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut line[0..4], year);
    put_digits(&mut line[5..7], month);
    put_digits(&mut line[8..10], day);
    put_digits(&mut line[11..13], of_day / 3600);
    put_digits(&mut line[14..16], of_day / 60 % 60);
    put_digits(&mut line[17..19], of_day % 60);
    put_digits(&mut line[20..26], u64::from(micros));
    line
}

/// Writes `value`'s last `out.len()` decimal digits into `out`.
fn put_digits(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        // A remainder of 10 is below 256.
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted so that eras of 400 years start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 0 = March ... 11 = February.
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::fmt::{format::DefaultFields, MakeWriter};

    use super::*;

    /// Lines written by a subscriber, shared with the test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

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
        fn text(&self) -> String {
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

    /// Every kind of field an event can carry, the fast path's and the
    /// library's, in one span and a few events.
    fn emit() {
        let span = tracing::info_span!("call", method = "GetAccessToken", n = 3);
        let _entered = span.enter();
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
            bytes = &b"\x00\xff"[..],
            error = &error as &(dyn std::error::Error + 'static),
            debug = ?Some("x"),
            "a message with \"quotes\" and \u{1b}[0m an escape"
        );
        tracing::error!(only = "fields");
        tracing::info!("only a message");
        tracing::info!(before = 1, r#"a "plain" message with C:\dir and ~"#);
        tracing::info!("a message with a DEL \x7f and a C1 \u{85} character");
    }

    /// The lines `emit` writes, with the fields formatter and the timer
    /// given, and ANSI colours on or off; timestamps cut off.
    fn lines<N, T>(fields: N, timer: T, ansi: bool) -> Vec<String>
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
        T: FormatTime + Send + Sync + 'static,
    {
        let out = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(ansi)
            .with_timer(timer)
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
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
            assert_eq!(ours.len(), 6, "{ours:?}");
            assert_eq!(ours, theirs, "ansi: {ansi}");
        }
        // Spelled out as well, so that a change in the library reads as
        // one: what the fast path writes (plain strings; the message is the
        // library's)...
        let ours = lines(TextFields, UtcMicros, false);
        assert!(ours[0].contains(r#"tenant="acme" provider="" subject="5f3a9c0e1b2d4a67""#));
        assert!(
            ours[4].ends_with(r#"tests: a "plain" message with C:\dir and ~ before=1"#),
            "{}",
            ours[4]
        );
        // ...and what the library writes for what they leave to it.
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

    /// The JSON lines `emit` writes with `timer`, as `credvault serve`
    /// configures them, each with its timestamp taken out (and checked).
    fn json_lines<T: FormatTime + Send + Sync + 'static>(timer: T) -> Vec<serde_json::Value> {
        let out = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .with_timer(timer)
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        out.text()
            .lines()
            .map(|line| {
                let mut line: serde_json::Value = serde_json::from_str(line).unwrap();
                let at = line["timestamp"].take();
                let at = at.as_str().expect("a timestamp");
                assert!(at.len() == 27 && at.ends_with('Z'), "{at}");
                line
            })
            .collect()
    }

    #[test]
    fn json_lines_are_unchanged_but_for_the_time() {
        let ours = json_lines(UtcMicros);
        assert_eq!(ours.len(), 6);
        assert_eq!(ours, json_lines(tracing_subscriber::fmt::time::SystemTime));
    }

    #[test]
    fn timestamps_are_written_as_tracing_subscriber_writes_them() {
        // The library reads the clock itself: compare to the second, and
        // try again should the two readings straddle a second.
        let second = |timer: &dyn FormatTime| {
            let mut line = String::new();
            timer.format_time(&mut Writer::new(&mut line)).unwrap();
            line
        };
        let mut tries = 0;
        loop {
            let before = second(&tracing_subscriber::fmt::time::SystemTime);
            let ours = second(&UtcMicros);
            let after = second(&tracing_subscriber::fmt::time::SystemTime);
            assert_eq!(ours.len(), 27, "{ours}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if before[..19] == after[..19] {
                assert_eq!(ours[..19], before[..19]);
                break;
            }
            tries += 1;
            assert!(tries < 10, "the clock kept changing seconds");
        }
    }

    #[test]
    fn dates_are_proleptic_gregorian() {
        // Checked against Python's `datetime.fromtimestamp(s, timezone.utc)`.
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (68_255_999, 999_999, "1972-02-29T23:59:59.999999Z"),
            (951_782_400, 1, "2000-02-29T00:00:00.000001Z"),
            (978_307_199, 500_000, "2000-12-31T23:59:59.500000Z"),
            (1_798_675_200, 42, "2026-12-31T00:00:00.000042Z"),
            (1_796_396_507, 123_456, "2026-12-04T15:01:47.123456Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000Z"),
            (4_107_542_399, 0, "2100-02-28T23:59:59.000000Z"),
            (13_574_563_200, 0, "2400-02-29T00:00:00.000000Z"),
            (YEAR_10000 - 1, 999_999, "9999-12-31T23:59:59.999999Z"),
        ];
        for (secs, micros, expected) in cases {
            let line = rfc3339_micros(secs, micros);
            assert_eq!(std::str::from_utf8(&line).unwrap(), expected, "{secs}");
        }
    }
}
