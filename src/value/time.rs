//! Rewriting Postgres `timestamp`/`timestamptz`/`date` output (DateStyle=ISO)
//! into ISO 8601 / RFC 3339 (docs/event-format.md, "Dates and times").
//!
//! Input shape: `Y{4,}-MM-DD HH:MM:SS[.F{1,6}][±HH[:MM[:SS]]][ BC]`, the zone
//! present exactly for `timestamptz`; `Y{4,}-MM-DD[ BC]` for `date`. Output
//! shape: `YYYY-MM-DDTHH:MM:SS.ffffff` plus `Z` or `±HH:MM` for `timestamptz`;
//! `YYYY-MM-DD` for `date`.
//!
//! Decisions:
//! - Years 1 to 9999 AD are written as RFC 3339 writes them: four digits.
//! - Every other year uses ISO 8601's expanded form: a sign and at least six
//!   digits, in astronomical numbering (1 BC is `+000000`, 97 BC is
//!   `-000096`, the last timestamp is `+294276-12-31T...`). This is the
//!   profile ECMAScript's `Date` reads exactly, and an RFC 3339 parser (four
//!   digits, no sign) rejects it instead of misreading it as a year it can
//!   express.
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

/// Digits of an expanded (signed) year: the ECMAScript profile of ISO 8601.
const EXPANDED_YEAR_DIGITS: usize = 6;

/// What the serializer should emit for a timestamp or date text.
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
    push_year(&mut out, p.year, p.bc)?;
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

/// Decode-time check for `date` text: `infinity`, `-infinity` or `Y{4,}-MM-DD[ BC]`.
pub(crate) fn is_valid_date(s: &[u8]) -> bool {
    is_infinity(s) || parse_date(s).is_some()
}

/// Rewrite a `date` text; `None` when it is not one. Dates of years 1 to 9999 AD,
/// already in their ISO 8601 form, are left as they are.
pub(crate) fn render_date(s: &[u8]) -> Option<Rendered> {
    if is_infinity(s) {
        return Some(Rendered::AsIs);
    }
    let (year, rest, bc) = parse_date(s)?;
    if !bc && year.len() == 4 && year != b"0000" {
        return Some(Rendered::AsIs);
    }
    let mut out = IsoBuf::new();
    push_year(&mut out, year, bc)?;
    out.push(rest)?;
    Some(Rendered::Iso(out))
}

/// `(year digits, "-MM-DD", bc)` of a whole `date` text.
fn parse_date(s: &[u8]) -> Option<(&[u8], &[u8], bool)> {
    let (s, bc) = strip_bc(s);
    let (year, rest) = split_year(s, bc)?;
    matches_shape(rest, b"-00-00").then_some((year, rest, bc))
}

fn strip_bc(s: &[u8]) -> (&[u8], bool) {
    match s.strip_suffix(b" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

/// The year digits (4 to [`MAX_YEAR_DIGITS`]) and what follows; there is no year 0 BC.
fn split_year(s: &[u8], bc: bool) -> Option<(&[u8], &[u8])> {
    let year_len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if !(4..=MAX_YEAR_DIGITS).contains(&year_len) {
        return None;
    }
    let (year, rest) = s.split_at(year_len);
    if bc && year.iter().all(|&c| c == b'0') {
        return None;
    }
    Some((year, rest))
}

/// The year as written out: four digits for 1 to 9999 AD, else signed and expanded.
fn push_year(out: &mut IsoBuf, year: &[u8], bc: bool) -> Option<()> {
    let value = digits_value(year)?;
    if !bc && (1..=9999).contains(&value) {
        return push_padded(out, value, 4);
    }
    if bc && value > 1 {
        out.push(b"-")?;
        push_padded(out, value - 1, EXPANDED_YEAR_DIGITS)
    } else {
        // 1 BC is astronomical year 0, which ISO 8601 signs positive; year 0 AD does not
        // come from Postgres, but would mean the same.
        out.push(b"+")?;
        push_padded(out, if bc { 0 } else { value }, EXPANDED_YEAR_DIGITS)
    }
}

fn parse(s: &[u8], with_zone: bool) -> Option<Parsed<'_>> {
    let (s, bc) = strip_bc(s);
    let (year, rest) = split_year(s, bc)?;
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

/// At least `min_digits` digits (at most 10), zero-padded, as ISO 8601 years are written.
fn push_padded(out: &mut IsoBuf, mut n: u32, min_digits: usize) -> Option<()> {
    let mut digits = [b'0'; 10];
    let mut i = digits.len();
    while n > 0 || i > digits.len() - min_digits {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push(&digits[i..])
}
