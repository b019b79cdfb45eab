//! Exact ordering of `numeric` values as decimal text, never through f64: `0.1` = `0.10`,
//! and `123456789012345678901234567890.1` > `123456789012345678901234567890`.
//!
//! Event values are Postgres `numeric_out` text (`-12.3400`, `NaN`, `Infinity`), read in
//! place. Literals may also use exponents (`1e30`, what serde_json prints for large
//! floats) and are normalized once, at compile time. Postgres orders `NaN` above
//! `Infinity` and makes it equal to itself; so does [`cmp`].

use std::cmp::Ordering;

/// A decimal normalized so that equal values have equal parts: `int` without leading
/// zeros, `frac` without trailing zeros, zero never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Num<'a> {
    NegInf,
    Finite {
        neg: bool,
        int: &'a [u8],
        frac: &'a [u8],
    },
    PosInf,
    NaN,
}

impl Num<'_> {
    fn rank(&self) -> u8 {
        match self {
            Num::NegInf => 0,
            Num::Finite { .. } => 1,
            Num::PosInf => 2,
            Num::NaN => 3,
        }
    }
}

pub(super) fn cmp(a: Num<'_>, b: Num<'_>) -> Ordering {
    match (a, b) {
        (
            Num::Finite {
                neg: a_neg,
                int: a_int,
                frac: a_frac,
            },
            Num::Finite {
                neg: b_neg,
                int: b_int,
                frac: b_frac,
            },
        ) => {
            // Without leading zeros a longer integer part is larger; fraction digits
            // compare left to right, and a missing digit is a zero.
            let magnitude = a_int
                .len()
                .cmp(&b_int.len())
                .then_with(|| a_int.cmp(b_int))
                .then_with(|| a_frac.cmp(b_frac));
            match (a_neg, b_neg) {
                (false, false) => magnitude,
                (true, true) => magnitude.reverse(),
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
            }
        }
        _ => a.rank().cmp(&b.rank()),
    }
}

fn finite<'a>(neg: bool, int: &'a [u8], frac: &'a [u8]) -> Num<'a> {
    let int = trim_start_zeros(int);
    let frac = trim_end_zeros(frac);
    Num::Finite {
        neg: neg && !(int.is_empty() && frac.is_empty()),
        int,
        frac,
    }
}

fn trim_start_zeros(mut d: &[u8]) -> &[u8] {
    while let [b'0', rest @ ..] = d {
        d = rest;
    }
    d
}

fn trim_end_zeros(mut d: &[u8]) -> &[u8] {
    while let [rest @ .., b'0'] = d {
        d = rest;
    }
    d
}

fn all_digits(d: &[u8]) -> bool {
    d.iter().all(u8::is_ascii_digit)
}

/// `numeric_out` text: `[-]digits[.digits]`, `NaN`, `Infinity`, `-Infinity`.
pub(super) fn parse_plain(s: &[u8]) -> Option<Num<'_>> {
    match s {
        b"NaN" => return Some(Num::NaN),
        b"Infinity" => return Some(Num::PosInf),
        b"-Infinity" => return Some(Num::NegInf),
        _ => {}
    }
    let (neg, rest) = split_sign(s);
    let (int, frac) = split_point(rest)?;
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    Some(finite(neg, int, frac))
}

fn split_sign(s: &[u8]) -> (bool, &[u8]) {
    match s {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, s),
    }
}

/// Splits at the decimal point; `None` for a second point.
fn split_point(s: &[u8]) -> Option<(&[u8], &[u8])> {
    match s.iter().position(|&c| c == b'.') {
        Some(i) => {
            let frac = &s[i + 1..];
            (!frac.contains(&b'.')).then_some((&s[..i], frac))
        }
        None => Some((s, &[])),
    }
}

/// A literal, normalized once so evaluation compares slices.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum OwnedNum {
    NegInf,
    Finite {
        neg: bool,
        int: Box<[u8]>,
        frac: Box<[u8]>,
    },
    PosInf,
    NaN,
}

impl OwnedNum {
    pub(super) fn view(&self) -> Num<'_> {
        match self {
            OwnedNum::NegInf => Num::NegInf,
            OwnedNum::Finite { neg, int, frac } => Num::Finite {
                neg: *neg,
                int,
                frac,
            },
            OwnedNum::PosInf => Num::PosInf,
            OwnedNum::NaN => Num::NaN,
        }
    }
}

/// Bounds the digits an exponent may expand to. Postgres' numeric stops at 131072 digits
/// before the point and 16383 after; this leaves headroom without letting `1e999999999`
/// allocate a gigabyte.
const MAX_SHIFT: i64 = 200_000;

/// `[+-]digits[.digits][e[+-]digits]`, `.5`, `5.`, and `NaN` / `Infinity` / `inf` in any
/// case, as Postgres' numeric input accepts them.
pub(super) fn parse_literal(s: &str) -> Option<OwnedNum> {
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "nan" => return Some(OwnedNum::NaN),
        "infinity" | "+infinity" | "inf" | "+inf" => return Some(OwnedNum::PosInf),
        "-infinity" | "-inf" => return Some(OwnedNum::NegInf),
        _ => {}
    }
    let (neg, rest) = split_sign(lower.as_bytes());
    let (mantissa, exp) = match rest.iter().position(|&c| c == b'e') {
        Some(i) => {
            let (exp_neg, digits) = split_sign(&rest[i + 1..]);
            if digits.is_empty() || !all_digits(digits) {
                return None;
            }
            let digits = trim_start_zeros(digits);
            if digits.len() > 7 {
                return None;
            }
            let value: i64 = std::str::from_utf8(digits).ok()?.parse().unwrap_or(0);
            (&rest[..i], if exp_neg { -value } else { value })
        }
        None => (rest, 0),
    };
    let (int, frac) = split_point(mantissa)?;
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    // Digits without the point, and where the point goes after shifting by the exponent.
    let mut digits: Vec<u8> = int.iter().chain(frac).copied().collect();
    let mut point = i64::try_from(int.len()).ok()? + exp;
    let leading = digits.iter().take_while(|&&c| c == b'0').count();
    digits.drain(..leading);
    point -= i64::try_from(leading).ok()?;
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    if digits.is_empty() {
        return Some(OwnedNum::Finite {
            neg: false,
            int: Box::new([]),
            frac: Box::new([]),
        });
    }
    if point.abs() > MAX_SHIFT {
        return None;
    }
    let len = i64::try_from(digits.len()).ok()?;
    let (int, frac) = if point <= 0 {
        let zeros = usize::try_from(-point).ok()?;
        let mut frac = vec![b'0'; zeros];
        frac.extend_from_slice(&digits);
        (Vec::new(), frac)
    } else if point >= len {
        let zeros = usize::try_from(point - len).ok()?;
        digits.extend(std::iter::repeat_n(b'0', zeros));
        (digits, Vec::new())
    } else {
        let split = usize::try_from(point).ok()?;
        let frac = digits.split_off(split);
        (digits, frac)
    };
    Some(OwnedNum::Finite {
        neg,
        int: int.into_boxed_slice(),
        frac: frac.into_boxed_slice(),
    })
}
