//! Postgres-epoch microseconds to RFC 3339 text, without a date library.

/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Length of [`rfc3339_micros`]'s output for years 0 to 9999.
pub const RFC3339_LEN: usize = 27;

/// As [`rfc3339_micros`], into a stack buffer; None for years outside 0..=9999 (callers
/// fall back to the allocating form). This runs for every event delivered.
pub fn rfc3339_micros_into(pg_micros: i64, buf: &mut [u8; RFC3339_LEN]) -> Option<&str> {
    let micros_per_day = 86_400_000_000i64;
    let days = pg_micros.div_euclid(micros_per_day) + PG_EPOCH_DAYS;
    let rem = pg_micros.rem_euclid(micros_per_day);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    let secs = rem / 1_000_000;
    let put = |buf: &mut [u8; RFC3339_LEN], at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(buf, 0, 4, y);
    buf[4] = b'-';
    put(buf, 5, 2, i64::from(m));
    buf[7] = b'-';
    put(buf, 8, 2, i64::from(d));
    buf[10] = b'T';
    put(buf, 11, 2, secs / 3600);
    buf[13] = b':';
    put(buf, 14, 2, (secs / 60) % 60);
    buf[16] = b':';
    put(buf, 17, 2, secs % 60);
    buf[19] = b'.';
    put(buf, 20, 6, rem % 1_000_000);
    buf[26] = b'Z';
    std::str::from_utf8(buf).ok()
}

/// Formats µs since 2000-01-01 UTC as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn rfc3339_micros(pg_micros: i64) -> String {
    let micros_per_day = 86_400_000_000i64;
    let days = pg_micros.div_euclid(micros_per_day) + PG_EPOCH_DAYS;
    let rem = pg_micros.rem_euclid(micros_per_day);
    let (y, m, d) = civil_from_days(days);
    let secs = rem / 1_000_000;
    let frac = rem % 1_000_000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Parses what [`rfc3339_micros`] prints (`YYYY-MM-DDTHH:MM:SS[.f]Z`) back to µs since
/// 2000-01-01 UTC.
pub fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || *b.last()? != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let frac = &s[19..s.len() - 1];
    let micros = match frac.strip_prefix('.') {
        None if frac.is_empty() => 0,
        Some(digits)
            if !digits.is_empty()
                && digits.len() <= 9
                && digits.bytes().all(|c| c.is_ascii_digit()) =>
        {
            let padded = format!("{digits:0<6}");
            padded[..6].parse::<i64>().ok()?
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d) - PG_EPOCH_DAYS;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1_000_000) + micros)
}

/// Day count since 1970-01-01 of a proleptic Gregorian date, astronomical year numbering
/// (inverse of `civil_from_days`; Howard Hinnant's algorithm). The crate's only calendar
/// arithmetic, with `civil_from_days`: filters, events and the benchmark all use these.
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9).rem_euclid(12);
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds of a Postgres-epoch µs time (for ULID timestamps).
pub fn unix_millis(pg_micros: i64) -> u64 {
    let unix_micros = pg_micros.saturating_add(crate::lsn::PG_EPOCH_OFFSET_MICROS);
    u64::try_from(unix_micros / 1000).unwrap_or(0)
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339_micros(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_micros(-1), "1999-12-31T23:59:59.999999Z");
        // 2026-11-27T10:00:00.123456Z
        let unix = 1_795_773_600_123_456i64;
        let pg = unix - crate::lsn::PG_EPOCH_OFFSET_MICROS;
        assert_eq!(rfc3339_micros(pg), "2026-11-27T10:00:00.123456Z");
        assert_eq!(unix_millis(pg), 1_795_773_600_123);
        assert_eq!(
            rfc3339_micros(59 * 86_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
