//! Rewriting Postgres `timestamp`/`timestamptz` output (DateStyle=ISO) into
//! ISO 8601 / RFC 3339.
//!
//! Input shape: `Y{4,}-MM-DD HH:MM:SS[.F{1,6}][±HH[:MM[:SS]]][ BC]`, the zone
//! present exactly for `timestamptz`. Output shape:
//! `YYYY-MM-DDTHH:MM:SS.ffffff` plus `Z` or `±HH:MM` for `timestamptz`.
//!
//! Decisions:
//! - BC years use astronomical numbering, as ISO 8601 does: 1 BC is year
//!   `0000`, 44 BC is `-0043` (sign plus at least four digits).
//! - AD years above 9999 keep their digits without a leading `+`
//!   (`12345-01-01T...`); RFC 3339 cannot express them at all, and a sign
//!   would only be needed to disambiguate from a 4-digit-year profile.
//! - A zone offset with a seconds part (`+00:09:21`, only from pre-1900
//!   local-mean-time zones, never under TimeZone=UTC) has no RFC 3339 form:
//!   such values, and `infinity`/`-infinity`, are emitted as received.
//!
//! Only the shape is checked (digits where digits belong), not the calendar:
//! the server already validated the value.

/// Longest output: sign, 9 year digits, `-MM-DDTHH:MM:SS.ffffff` (22) and
/// `+HH:MM` (6), rounded up.
const BUF_LEN: usize = 48;
/// Postgres timestamps stop at year 294276; 9 digits leaves headroom
/// without risking `u32` overflow.
const MAX_YEAR_DIGITS: usize = 9;

/// A formatted timestamp on the stack, so serializing needs no allocation.
pub(crate) struct IsoBuf {
    buf: [u8; BUF_LEN],
    len: usize,
}

impl IsoBuf {
    fn new() -> Self {
        IsoBuf {
            buf: [0; BUF_LEN],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.len.checked_add(bytes.len())?;
        self.buf.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(())
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII is ever pushed, so this cannot fail.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// What the serializer should emit for a timestamp text.
pub(crate) enum Rendered {
    Iso(IsoBuf),
    /// Emit the original text unchanged (infinities, seconds offsets).
    AsIs,
}

struct Parsed<'a> {
    year: &'a [u8],
    /// `-MM-DD HH:MM:SS`, validated.
    date_time: &'a [u8],
    /// 0 to 6 digits.
    fraction: &'a [u8],
    /// `±HH`, `±HH:MM` or `±HH:MM:SS`, validated; empty for `timestamp`.
    offset: &'a [u8],
    bc: bool,
}

fn is_infinity(s: &[u8]) -> bool {
    s == b"infinity" || s == b"-infinity"
}

/// Decode-time check: is this something [`render`] understands?
pub(crate) fn is_valid(s: &[u8], with_zone: bool) -> bool {
    is_infinity(s) || parse(s, with_zone).is_some()
}

/// Rewrite `s`; `None` when `s` is not a timestamp at all.
pub(crate) fn render(s: &[u8], with_zone: bool) -> Option<Rendered> {
    if is_infinity(s) {
        return Some(Rendered::AsIs);
    }
    let p = parse(s, with_zone)?;
    if p.offset.len() > 6 {
        return Some(Rendered::AsIs);
    }
    let mut out = IsoBuf::new();
    if p.bc {
        let year = digits_value(p.year)?;
        let astronomical = year.checked_sub(1)?;
        if astronomical > 0 {
            out.push(b"-")?;
        }
        push_padded(&mut out, astronomical)?;
    } else {
        out.push(p.year)?;
    }
    out.push(&p.date_time[..6])?; // -MM-DD
    out.push(b"T")?;
    out.push(&p.date_time[7..])?; // HH:MM:SS
    out.push(b".")?;
    out.push(p.fraction)?;
    for _ in p.fraction.len()..6 {
        out.push(b"0")?;
    }
    if with_zone {
        match p.offset {
            b"+00" | b"-00" | b"+00:00" | b"-00:00" => out.push(b"Z")?,
            o if o.len() == 3 => {
                out.push(o)?;
                out.push(b":00")?;
            }
            o => out.push(o)?,
        }
    }
    Some(Rendered::Iso(out))
}

fn parse(s: &[u8], with_zone: bool) -> Option<Parsed<'_>> {
    let (s, bc) = match s.strip_suffix(b" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let year_len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if !(4..=MAX_YEAR_DIGITS).contains(&year_len) {
        return None;
    }
    let (year, rest) = s.split_at(year_len);
    if bc && year.iter().all(|&c| c == b'0') {
        return None;
    }
    let date_time = rest.get(..15)?;
    if !matches_shape(date_time, b"-00-00 00:00:00") {
        return None;
    }
    let mut rest = &rest[15..];
    let mut fraction: &[u8] = &[];
    if let Some(after_dot) = rest.strip_prefix(b".") {
        let n = after_dot.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=6).contains(&n) {
            return None;
        }
        fraction = &after_dot[..n];
        rest = &after_dot[n..];
    }
    let offset_ok = match rest.len() {
        0 => !with_zone,
        3 | 6 | 9 => with_zone && is_offset(rest),
        _ => false,
    };
    if !offset_ok {
        return None;
    }
    Some(Parsed {
        year,
        date_time,
        fraction,
        offset: rest,
        bc,
    })
}

fn is_offset(o: &[u8]) -> bool {
    matches!(o.first(), Some(b'+' | b'-')) && matches_shape(&o[1..], &b"00:00:00"[..o.len() - 1])
}

/// `shape` uses `0` for "any ASCII digit"; every other byte must match exactly.
fn matches_shape(s: &[u8], shape: &[u8]) -> bool {
    s.len() == shape.len()
        && s.iter().zip(shape).all(|(&c, &want)| match want {
            b'0' => c.is_ascii_digit(),
            _ => c == want,
        })
}

fn digits_value(d: &[u8]) -> Option<u32> {
    d.iter().try_fold(0u32, |acc, &c| {
        acc.checked_mul(10)?.checked_add(u32::from(c - b'0'))
    })
}

/// At least four digits, zero-padded, as ISO 8601 years are written.
fn push_padded(out: &mut IsoBuf, mut n: u32) -> Option<()> {
    let mut digits = [b'0'; 10];
    let mut i = digits.len();
    while n > 0 || i > digits.len() - 4 {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push(&digits[i..])
}
