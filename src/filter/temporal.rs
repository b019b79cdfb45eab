//! Dates and times as numbers, so that they compare as Postgres compares them whatever
//! their spelling: `2026-01-01T00:00:00+02:00` and `2025-12-31 22:00:00+00` are the same
//! instant.
//!
//! One parser reads both Postgres output (DateStyle=ISO: `2026-11-27 10:00:00.123+00`,
//! `0044-03-15 10:00:00+00 BC`, `infinity`) and ISO 8601 / RFC 3339 literals (`T` or
//! space, `Z` or `±HH[:MM[:SS]]`, a sign on expanded years). It checks the calendar, since
//! literals come from users; event values were already checked by the server. Fractions
//! round to microseconds, as Postgres rounds input.

use crate::event::days_from_civil;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Postgres stops at year 294276; 9 digits keep every intermediate in range.
const MAX_YEAR_DIGITS: usize = 9;

/// Whether a timestamp text must, or must not, carry a UTC offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Zone {
    Required,
    Forbidden,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a [u8]) -> Self {
        Cursor { b: s, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn done(&self) -> bool {
        self.pos == self.b.len()
    }

    /// At least `min` ASCII digits, at most `max` (more are left for the caller, whose
    /// next expected byte then fails), as a number.
    fn number(&mut self, min: usize, max: usize) -> Option<i64> {
        let start = self.pos;
        let mut value: i64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            if self.pos - start == max {
                break;
            }
            value = value * 10 + i64::from(c - b'0');
            self.pos += 1;
        }
        (self.pos - start >= min).then_some(value)
    }
}

fn is_leap(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `[±]YYYY-MM-DD` -> (sign, year digits as written, month, day); the sign and ` BC` are
/// applied by the caller once the whole text is read.
fn date_part(c: &mut Cursor<'_>) -> Option<(i64, i64, i64, i64)> {
    let sign = if c.eat(b'-') {
        -1
    } else {
        c.eat(b'+');
        1
    };
    let year = c.number(4, MAX_YEAR_DIGITS)?;
    if !c.eat(b'-') {
        return None;
    }
    let month = c.number(2, 2)?;
    if !c.eat(b'-') {
        return None;
    }
    let day = c.number(2, 2)?;
    Some((sign, year, month, day))
}

/// Astronomical year, after checking the calendar: 1 BC is year 0.
fn resolve_date(sign: i64, year: i64, month: i64, day: i64, bc: bool) -> Option<i64> {
    let year = match (bc, sign) {
        (true, -1) => return None,
        (true, _) if year == 0 => return None,
        (true, _) => 1 - year,
        (false, _) => sign * year,
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    Some(days_from_civil(year, month, day))
}

/// `HH:MM[:SS[.f]]` -> µs since midnight; `24:00:00` is allowed, as in Postgres.
fn time_part(c: &mut Cursor<'_>) -> Option<i64> {
    let hour = c.number(2, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let minute = c.number(2, 2)?;
    let mut second = 0;
    let mut micros = 0;
    if c.eat(b':') {
        second = c.number(2, 2)?;
        if c.eat(b'.') {
            micros = fraction(c)?;
        }
    }
    if hour > 24
        || minute > 59
        || second > 60
        || (hour == 24 && (minute, second, micros) != (0, 0, 0))
    {
        return None;
    }
    Some(((hour * 60 + minute) * 60 + second) * MICROS_PER_SECOND + micros)
}

/// Fraction digits after the point -> µs, rounded half up at the seventh digit.
fn fraction(c: &mut Cursor<'_>) -> Option<i64> {
    let mut micros = 0;
    let mut n = 0;
    let mut round_up = false;
    while let Some(d @ b'0'..=b'9') = c.peek() {
        let d = i64::from(d - b'0');
        match n {
            0..=5 => micros = micros * 10 + d,
            6 => round_up = d >= 5,
            _ => {}
        }
        n += 1;
        c.pos += 1;
    }
    if n == 0 {
        return None;
    }
    for _ in n..6 {
        micros *= 10;
    }
    Some(micros + i64::from(round_up))
}

/// `Z`, or `±HH[[:]MM[[:]SS]]` -> seconds east of UTC; `Ok(None)` when there is none.
fn offset(c: &mut Cursor<'_>) -> Result<Option<i64>, ()> {
    if c.eat(b'Z') || c.eat(b'z') {
        return Ok(Some(0));
    }
    let sign = match c.peek() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Ok(None),
    };
    c.pos += 1;
    let hours = c.number(2, 2).ok_or(())?;
    let mut minutes = 0;
    let mut seconds = 0;
    let colon = c.eat(b':');
    if colon || matches!(c.peek(), Some(b'0'..=b'9')) {
        minutes = c.number(2, 2).ok_or(())?;
        if c.eat(b':') || (!colon && matches!(c.peek(), Some(b'0'..=b'9'))) {
            seconds = c.number(2, 2).ok_or(())?;
        }
    }
    if hours > 23 || minutes > 59 || seconds > 59 {
        return Err(());
    }
    Ok(Some(sign * (hours * 3600 + minutes * 60 + seconds)))
}

fn strip_bc(s: &[u8]) -> (&[u8], bool) {
    match s.strip_suffix(b" BC").or_else(|| s.strip_suffix(b" bc")) {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

fn infinity(s: &[u8]) -> Option<bool> {
    if s.eq_ignore_ascii_case(b"infinity") || s.eq_ignore_ascii_case(b"+infinity") {
        Some(true)
    } else if s.eq_ignore_ascii_case(b"-infinity") {
        Some(false)
    } else {
        None
    }
}

/// A timestamp -> µs since 1970-01-01 (UTC for `Zone::Required`, wall clock otherwise);
/// `infinity` / `-infinity` sort beyond every value. Without the zone, a bare date is
/// midnight.
pub(super) fn timestamp(s: &[u8], zone: Zone) -> Option<i128> {
    if let Some(positive) = infinity(s) {
        return Some(if positive { i128::MAX } else { i128::MIN });
    }
    let (s, bc) = strip_bc(s);
    let mut c = Cursor::new(s);
    let (sign, year, month, day) = date_part(&mut c)?;
    let mut time = 0;
    let mut offset_secs = None;
    if c.eat(b'T') || c.eat(b't') || c.eat(b' ') {
        time = time_part(&mut c)?;
        offset_secs = offset(&mut c).ok()?;
    }
    if !c.done() || (zone == Zone::Required) != offset_secs.is_some() {
        return None;
    }
    let days = resolve_date(sign, year, month, day, bc)?;
    let local = i128::from(days) * i128::from(MICROS_PER_DAY) + i128::from(time);
    Some(local - i128::from(offset_secs.unwrap_or(0) * MICROS_PER_SECOND))
}

/// `YYYY-MM-DD[ BC]` -> days since 1970-01-01; `infinity` / `-infinity` beyond every date.
pub(super) fn date(s: &[u8]) -> Option<i64> {
    if let Some(positive) = infinity(s) {
        return Some(if positive { i64::MAX } else { i64::MIN });
    }
    let (s, bc) = strip_bc(s);
    let mut c = Cursor::new(s);
    let (sign, year, month, day) = date_part(&mut c)?;
    if !c.done() {
        return None;
    }
    resolve_date(sign, year, month, day, bc)
}

/// `time`: `HH:MM[:SS[.f]]` -> µs since midnight.
pub(super) fn time(s: &[u8]) -> Option<i64> {
    let mut c = Cursor::new(s);
    let t = time_part(&mut c)?;
    c.done().then_some(t)
}

/// `timetz` -> the key Postgres orders it by (`timetz_cmp_internal`): the UTC time, then
/// the zone in seconds *west* of UTC. Equal only when both match.
pub(super) fn time_tz(s: &[u8]) -> Option<(i64, i64)> {
    let mut c = Cursor::new(s);
    let t = time_part(&mut c)?;
    let east = offset(&mut c).ok()??;
    c.done().then_some((t - east * MICROS_PER_SECOND, -east))
}
