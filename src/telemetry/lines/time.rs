//! The timestamp of both formats: tracing-subscriber's `SystemTime` (RFC
//! 3339 in UTC, to the microsecond), written from integers rather than
//! through seven padded integer formats.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing_subscriber::fmt::{format::Writer, time::FormatTime};

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
    use super::*;

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
