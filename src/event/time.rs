//! Postgres-epoch microseconds to RFC 3339 text, without a date library.

/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

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

/// Unix milliseconds of a Postgres-epoch µs time (for ULID timestamps).
pub fn unix_millis(pg_micros: i64) -> u64 {
    let unix_micros = pg_micros.saturating_add(crate::replication::PG_EPOCH_OFFSET_MICROS);
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
        let pg = unix - crate::replication::PG_EPOCH_OFFSET_MICROS;
        assert_eq!(rfc3339_micros(pg), "2026-11-27T10:00:00.123456Z");
        assert_eq!(unix_millis(pg), 1_795_773_600_123);
        assert_eq!(
            rfc3339_micros(59 * 86_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
