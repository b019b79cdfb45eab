//! Index keys: a column value or a typed literal as bytes whose equality is the filter's
//! equality and whose byte order is the filter's order, for the families the index covers.
//!
//! The contract, for every indexed family `F`: when [`value_key`] gives a key for a value
//! `v`, `typed::equal(F, v, lit)` is `Some(key(v) == lit_key(lit))` and, for ordered
//! families, `typed::order(F, v, lit)` is `Some(key(v).cmp(lit_key(lit)))`. When the value
//! cannot be compared (another type after ALTER TABLE, text that does not parse), there
//! is no key, and the index treats the value as unknown: every filter on the column is a
//! candidate, as evaluation delivers unknowns.

use super::super::temporal::{self, Zone};
use super::super::typed::{self, Family, Lit};
use crate::value::Value;

/// Families whose equality the index covers. `numeric` (`0.1` = `0.10`), `json`/`jsonb`
/// (semantic equality) and arrays have no canonical bytes here: their filters are
/// evaluated on every event.
pub(super) fn equality_indexed(family: &Family) -> bool {
    !matches!(family, Family::Numeric | Family::Json | Family::Array(_))
}

/// Families whose order the index covers (a subset of [`equality_indexed`]).
pub(super) fn order_indexed(family: &Family) -> bool {
    matches!(
        family,
        Family::Int
            | Family::Float
            | Family::Text
            | Family::Bpchar
            | Family::Uuid
            | Family::Timestamptz
            | Family::Timestamp
            | Family::Date
            | Family::Time
            | Family::TimeTz
    )
}

/// A key for a lookup: built in place for fixed-width values, borrowed for text.
pub(super) enum KeyRef<'v> {
    Inline([u8; 16], usize),
    Borrowed(&'v [u8]),
}

impl KeyRef<'_> {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            KeyRef::Inline(buf, len) => &buf[..*len],
            KeyRef::Borrowed(b) => b,
        }
    }
}

fn inline(bytes: &[u8]) -> KeyRef<'static> {
    let mut buf = [0u8; 16];
    buf[..bytes.len()].copy_from_slice(bytes);
    KeyRef::Inline(buf, bytes.len())
}

/// Big-endian with the sign bit flipped: byte order is numeric order.
fn int(i: i64) -> [u8; 8] {
    ((i as u64) ^ (1 << 63)).to_be_bytes()
}

fn wide(i: i128) -> [u8; 16] {
    ((i as u128) ^ (1 << 127)).to_be_bytes()
}

fn pair(a: i64, b: i64) -> KeyRef<'static> {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&int(a));
    buf[8..].copy_from_slice(&int(b));
    KeyRef::Inline(buf, 16)
}

/// Postgres float order (`typed::float_cmp`): every NaN one key above everything, `-0`
/// the key of `0`, otherwise IEEE order made unsigned.
fn float(f: f64) -> [u8; 8] {
    if f.is_nan() {
        return [0xff; 8];
    }
    let f = if f == 0.0 { 0.0 } else { f };
    let bits = f.to_bits();
    let ordered = if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    };
    ordered.to_be_bytes()
}

/// The key of a literal compiled for `family`; `None` for families not indexed.
pub(super) fn lit_key(family: &Family, lit: &Lit) -> Option<Box<[u8]>> {
    if !equality_indexed(family) {
        return None;
    }
    let key: Box<[u8]> = match lit {
        Lit::Bool(b) => Box::new([u8::from(*b)]),
        Lit::Int(i) | Lit::Days(i) | Lit::TimeOfDay(i) => Box::new(int(*i)),
        Lit::Float(f) => Box::new(float(*f)),
        Lit::Str(s) => s.as_bytes().into(),
        Lit::Micros(m) => Box::new(wide(*m)),
        Lit::TimeTz(utc, west) => pair(*utc, *west).bytes().into(),
        Lit::Bytes(b) => b.clone(),
        Lit::Numeric(_) | Lit::Json(_) | Lit::Array(_) => return None,
    };
    Some(key)
}

/// The key of a non-NULL event value of a column of `family`, read the way
/// `typed::equal` / `typed::order` read it; `None` when they could not compare it.
pub(super) fn value_key<'v>(family: &Family, v: &'v Value) -> Option<KeyRef<'v>> {
    let key = match (family, v) {
        (Family::Bool, Value::Bool(b)) => inline(&[u8::from(*b)]),
        (Family::Int, Value::Int(i)) => inline(&int(*i)),
        (Family::Float, Value::Float(f)) => inline(&float(*f)),
        (Family::Text | Family::Bpchar, v) => KeyRef::Borrowed(typed::text_bytes(family, v)?),
        (Family::Uuid | Family::Opaque, Value::Text(t)) => KeyRef::Borrowed(t.as_bytes()),
        (Family::Bytea, Value::Bytea(b)) => KeyRef::Borrowed(b),
        (Family::Timestamptz, Value::Timestamptz(t)) => {
            inline(&wide(temporal::timestamp(t.as_bytes(), Zone::Required)?))
        }
        (Family::Timestamp, Value::Timestamp(t)) => {
            inline(&wide(temporal::timestamp(t.as_bytes(), Zone::Forbidden)?))
        }
        (Family::Date, Value::Text(t) | Value::Date(t)) => {
            inline(&int(temporal::date(t.as_bytes())?))
        }
        (Family::Time, Value::Text(t)) => inline(&int(temporal::time(t.as_bytes())?)),
        (Family::TimeTz, Value::Text(t)) => {
            let (utc, west) = temporal::time_tz(t.as_bytes())?;
            pair(utc, west)
        }
        _ => return None,
    };
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_and_float_keys_sort_like_their_values() {
        let ints = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in ints.windows(2) {
            assert!(int(w[0]) < int(w[1]), "{w:?}");
        }
        let floats = [
            f64::NEG_INFINITY,
            -2.5,
            -0.0,
            1e-300,
            3.0,
            f64::INFINITY,
            f64::NAN,
        ];
        for w in floats.windows(2) {
            assert!(float(w[0]) < float(w[1]) || w[0] == w[1], "{w:?}");
        }
        assert_eq!(float(-0.0), float(0.0));
        assert_eq!(float(f64::NAN), float(-f64::NAN));
        assert!(wide(-1) < wide(0) && wide(i128::MAX) > wide(0));
    }
}
