//! Column types as the filter sees them ([`Family`]): which operators apply, how a JSON
//! literal becomes a typed [`Lit`] at compile time, and how an event [`Value`] compares
//! with it at evaluation time. Comparisons return `None` when the value cannot be
//! compared (a value of another type after ALTER TABLE, text that does not parse): the
//! evaluator treats that as unknown.

use std::cmp::Ordering;

use base64::Engine;
use serde_json::Value as Json;

use super::decimal::{self, OwnedNum};
use super::temporal::{self, Zone};
use crate::value::{TypeKind, Value};

/// How values of one column type compare.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Family {
    Bool,
    Int,
    Float,
    Numeric,
    /// text, varchar, enums, domains, unknown user types: code point order.
    Text,
    /// `character(n)`: trailing spaces do not count.
    Bpchar,
    Uuid,
    /// Built-in types whose text form has no useful order (interval, inet, ranges...):
    /// exact text equality only.
    Opaque,
    Timestamptz,
    Timestamp,
    Date,
    Time,
    TimeTz,
    Json,
    Bytea,
    Array(Box<Family>),
}

/// An operator of the JSON form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Equals,
    Not,
    In,
    NotIn,
    Lt,
    Lte,
    Gt,
    Gte,
    Contains,
    StartsWith,
    EndsWith,
    IsNull,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Equals => "equals",
            Op::Not => "not",
            Op::In => "in",
            Op::NotIn => "notIn",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Contains => "contains",
            Op::StartsWith => "startsWith",
            Op::EndsWith => "endsWith",
            Op::IsNull => "isNull",
        }
    }
}

const EQUALITY: &[&str] = &["equals", "not", "in", "notIn", "isNull"];
const ORDERED: &[&str] = &[
    "equals", "not", "in", "notIn", "lt", "lte", "gt", "gte", "isNull",
];
const STRINGS: &[&str] = &[
    "equals",
    "not",
    "in",
    "notIn",
    "lt",
    "lte",
    "gt",
    "gte",
    "contains",
    "startsWith",
    "endsWith",
    "isNull",
];
const ARRAYS: &[&str] = &["equals", "not", "in", "notIn", "contains", "isNull"];

/// Built-in types that travel as text but whose text does not order like their values.
const OPAQUE: &[&str] = &[
    "interval",
    "inet",
    "cidr",
    "macaddr",
    "macaddr8",
    "money",
    "point",
    "line",
    "lseg",
    "box",
    "path",
    "polygon",
    "circle",
    "bit",
    "varbit",
    "bit varying",
    "tsvector",
    "tsquery",
    "xml",
    "int4range",
    "int8range",
    "numrange",
    "tsrange",
    "tstzrange",
    "daterange",
    "int4multirange",
    "int8multirange",
    "nummultirange",
    "tsmultirange",
    "tstzmultirange",
    "datemultirange",
    "pg_lsn",
    "txid_snapshot",
    "pg_snapshot",
    "tid",
    "int2vector",
    "oidvector",
    "jsonpath",
    "aclitem",
    "xid8",
];

/// `character varying(20)` -> `character varying`, `pg_catalog.uuid` -> `uuid`.
fn base_name(type_name: &str) -> String {
    let name = type_name.trim();
    let name = name.split('(').next().unwrap_or(name).trim();
    let name = name.strip_prefix("pg_catalog.").unwrap_or(name);
    name.to_ascii_lowercase()
}

/// `_int4` / `int4[]` -> `int4`.
fn element_name(type_name: &str) -> String {
    let name = base_name(type_name);
    if let Some(elem) = name.strip_suffix("[]") {
        return elem.trim_end_matches("[]").to_owned();
    }
    name.strip_prefix('_').unwrap_or(&name).to_owned()
}

impl Family {
    pub(super) fn of(kind: &TypeKind, type_name: &str) -> Family {
        match kind {
            TypeKind::Bool => Family::Bool,
            TypeKind::Int => Family::Int,
            TypeKind::Float => Family::Float,
            TypeKind::Numeric => Family::Numeric,
            TypeKind::Json => Family::Json,
            TypeKind::Timestamptz => Family::Timestamptz,
            TypeKind::Timestamp => Family::Timestamp,
            TypeKind::Date => Family::Date,
            TypeKind::Bytea => Family::Bytea,
            TypeKind::Array { element, .. } => {
                Family::Array(Box::new(Family::of(element, &element_name(type_name))))
            }
            TypeKind::Text => match base_name(type_name).as_str() {
                "date" => Family::Date,
                "time" | "time without time zone" => Family::Time,
                "timetz" | "time with time zone" => Family::TimeTz,
                "uuid" => Family::Uuid,
                "bpchar" | "character" => Family::Bpchar,
                name if OPAQUE.contains(&name) => Family::Opaque,
                _ => Family::Text,
            },
        }
    }

    pub(super) fn supports(&self, op: Op) -> bool {
        self.supported().contains(&op.name())
    }

    pub(super) fn supported(&self) -> &'static [&'static str] {
        match self {
            Family::Bool | Family::Opaque | Family::Json | Family::Bytea => EQUALITY,
            Family::Text | Family::Bpchar => STRINGS,
            Family::Array(_) => ARRAYS,
            Family::Int
            | Family::Float
            | Family::Numeric
            | Family::Uuid
            | Family::Timestamptz
            | Family::Timestamp
            | Family::Date
            | Family::Time
            | Family::TimeTz => ORDERED,
        }
    }

    /// What a literal must look like, for error messages.
    pub(super) fn expected(&self) -> String {
        match self {
            Family::Bool => "true or false".into(),
            Family::Int => "an integer (a JSON integer or an integer string)".into(),
            Family::Float => "a number (or \"NaN\", \"Infinity\", \"-Infinity\")".into(),
            Family::Numeric => "a number or a decimal string (e.g. \"12.50\", \"NaN\")".into(),
            Family::Text | Family::Bpchar => "a string".into(),
            Family::Uuid => "a UUID string (e.g. \"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\")".into(),
            Family::Opaque => "a string in Postgres's text form".into(),
            Family::Timestamptz => {
                "a timestamp with a UTC offset (RFC 3339, e.g. \"2026-01-01T00:00:00Z\")".into()
            }
            Family::Timestamp => {
                "a timestamp without time zone (e.g. \"2026-01-01T10:00:00\" or \"2026-01-01\")"
                    .into()
            }
            Family::Date => "a date (\"YYYY-MM-DD\")".into(),
            Family::Time => "a time (\"HH:MM[:SS[.ffffff]]\")".into(),
            Family::TimeTz => "a time with a UTC offset (e.g. \"10:00:00+02\")".into(),
            Family::Json => "any JSON value".into(),
            Family::Bytea => "a base64 string (or \\x followed by hex digits)".into(),
            Family::Array(elem) => format!("an array (elements: {})", elem.expected()),
        }
    }
}

/// A literal typed for its column at compile time.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Lit {
    Bool(bool),
    Int(i64),
    Float(f64),
    Numeric(OwnedNum),
    /// Text, bpchar (trailing spaces trimmed), uuid (lower case, hyphenated), opaque.
    Str(Box<str>),
    /// Timestamps: µs since 1970-01-01.
    Micros(i128),
    Days(i64),
    TimeOfDay(i64),
    /// See [`temporal::time_tz`].
    TimeTz(i64, i64),
    Json(Json),
    Bytes(Box<[u8]>),
    /// `None` elements are NULLs.
    Array(Vec<Option<Lit>>),
}

/// The typed literal, or `None` when `v` does not fit the family (the caller reports
/// [`Family::expected`]). `null` is the caller's business.
pub(super) fn literal(family: &Family, v: &Json) -> Option<Lit> {
    let lit = match family {
        Family::Bool => Lit::Bool(v.as_bool()?),
        Family::Int => Lit::Int(match v {
            Json::Number(n) => n.as_i64().or_else(|| integral(n.as_f64()?))?,
            Json::String(s) => s.parse().ok()?,
            _ => return None,
        }),
        Family::Float => Lit::Float(match v {
            Json::Number(n) => n.as_f64()?,
            Json::String(s) => s.parse().ok()?,
            _ => return None,
        }),
        Family::Numeric => Lit::Numeric(match v {
            Json::Number(n) => decimal::parse_literal(&n.to_string())?,
            Json::String(s) => decimal::parse_literal(s)?,
            _ => return None,
        }),
        Family::Text | Family::Opaque => Lit::Str(v.as_str()?.into()),
        Family::Bpchar => Lit::Str(v.as_str()?.trim_end_matches(' ').into()),
        Family::Uuid => Lit::Str(uuid(v.as_str()?)?.into()),
        Family::Timestamptz => Lit::Micros(temporal::timestamp(bytes_of(v)?, Zone::Required)?),
        Family::Timestamp => Lit::Micros(temporal::timestamp(bytes_of(v)?, Zone::Forbidden)?),
        Family::Date => Lit::Days(temporal::date(bytes_of(v)?)?),
        Family::Time => Lit::TimeOfDay(temporal::time(bytes_of(v)?)?),
        Family::TimeTz => {
            let (utc, west) = temporal::time_tz(bytes_of(v)?)?;
            Lit::TimeTz(utc, west)
        }
        Family::Json => Lit::Json(v.clone()),
        Family::Bytea => Lit::Bytes(bytes(v.as_str()?)?.into_boxed_slice()),
        Family::Array(elem) => Lit::Array(array_literal(elem, v)?),
    };
    Some(lit)
}

/// Nested JSON arrays are further dimensions, except for json elements, which may be
/// arrays themselves.
fn array_literal(elem: &Family, v: &Json) -> Option<Vec<Option<Lit>>> {
    v.as_array()?
        .iter()
        .map(|item| match item {
            Json::Null => Some(None),
            Json::Array(_) if *elem != Family::Json => {
                Some(Some(Lit::Array(array_literal(elem, item)?)))
            }
            _ => Some(Some(literal(elem, item)?)),
        })
        .collect()
}

fn bytes_of(v: &Json) -> Option<&[u8]> {
    v.as_str().map(str::as_bytes)
}

fn integral(f: f64) -> Option<i64> {
    // The bounds are exactly representable; `as` is exact inside them.
    let in_range = (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f);
    (f.fract() == 0.0 && in_range).then_some(f as i64)
}

/// Hyphenated or 32 hex digits, optionally in braces, any case -> Postgres' output form.
fn uuid(s: &str) -> Option<String> {
    let s = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(s);
    let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    let hyphens_ok = match s.len() {
        32 => true,
        36 => [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'),
        _ => false,
    };
    if !hyphens_ok || hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let hex = String::from_utf8(hex).ok()?.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

fn bytes(s: &str) -> Option<Vec<u8>> {
    if let Some(hex) = s.strip_prefix("\\x") {
        let hex = hex.as_bytes();
        if hex.len() % 2 != 0 {
            return None;
        }
        return hex
            .chunks_exact(2)
            .map(|pair| {
                let digits = std::str::from_utf8(pair).ok()?;
                u8::from_str_radix(digits, 16).ok()
            })
            .collect();
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Postgres float order: NaN equals NaN and sorts above everything, -0 equals 0.
fn float_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// The text of a text-like value, as it compares (bpchar without its padding).
pub(super) fn text<'v>(family: &Family, v: &'v Value) -> Option<&'v str> {
    match (family, v) {
        (Family::Bpchar, Value::Text(t)) => Some(t.as_str().trim_end_matches(' ')),
        (Family::Text, Value::Text(t)) => Some(t.as_str()),
        _ => None,
    }
}

/// [`text`] as bytes, which skips the UTF-8 check: byte order of UTF-8 is code point
/// order, and a UTF-8 prefix or suffix match is a character match.
pub(super) fn text_bytes<'v>(family: &Family, v: &'v Value) -> Option<&'v [u8]> {
    match (family, v) {
        (Family::Bpchar, Value::Text(t)) => {
            let b = t.as_bytes();
            let end = b.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
            Some(&b[..end])
        }
        (Family::Text, Value::Text(t)) => Some(t.as_bytes()),
        _ => None,
    }
}

/// Order of `v` relative to `lit`, for ordered families.
pub(super) fn order(family: &Family, v: &Value, lit: &Lit) -> Option<Ordering> {
    let ord = match (family, v, lit) {
        (Family::Int, Value::Int(a), Lit::Int(b)) => a.cmp(b),
        (Family::Float, Value::Float(a), Lit::Float(b)) => float_cmp(*a, *b),
        (Family::Numeric, Value::Numeric(t), Lit::Numeric(n)) => {
            decimal::cmp(decimal::parse_plain(t.as_bytes())?, n.view())
        }
        (Family::Text | Family::Bpchar, v, Lit::Str(s)) => text_bytes(family, v)?.cmp(s.as_bytes()),
        (Family::Uuid, Value::Text(t), Lit::Str(s)) => t.as_bytes().cmp(s.as_bytes()),
        (Family::Timestamptz, Value::Timestamptz(t), Lit::Micros(m)) => {
            temporal::timestamp(t.as_bytes(), Zone::Required)?.cmp(m)
        }
        (Family::Timestamp, Value::Timestamp(t), Lit::Micros(m)) => {
            temporal::timestamp(t.as_bytes(), Zone::Forbidden)?.cmp(m)
        }
        (Family::Date, Value::Text(t) | Value::Date(t), Lit::Days(d)) => {
            temporal::date(t.as_bytes())?.cmp(d)
        }
        (Family::Time, Value::Text(t), Lit::TimeOfDay(m)) => temporal::time(t.as_bytes())?.cmp(m),
        (Family::TimeTz, Value::Text(t), Lit::TimeTz(utc, west)) => {
            temporal::time_tz(t.as_bytes())?.cmp(&(*utc, *west))
        }
        _ => return None,
    };
    Some(ord)
}

/// Whether `v` equals `lit`, for every family.
pub(super) fn equal(family: &Family, v: &Value, lit: &Lit) -> Option<bool> {
    match (family, v, lit) {
        (Family::Bool, Value::Bool(a), Lit::Bool(b)) => Some(a == b),
        (Family::Opaque, Value::Text(t), Lit::Str(s)) => Some(t.as_bytes() == s.as_bytes()),
        (Family::Bytea, Value::Bytea(b), Lit::Bytes(l)) => Some(b[..] == l[..]),
        (Family::Json, Value::Json(t), Lit::Json(l)) => {
            // Deep documents beyond serde_json's nesting limit stay unknown.
            let doc: Json = serde_json::from_slice(t.as_bytes()).ok()?;
            Some(json_eq(&doc, l))
        }
        (Family::Array(elem), Value::Array(items), Lit::Array(lits)) => array_eq(elem, items, lits),
        // Postgres arrays equal only with equal lower bounds, and a literal's are all 1.
        (Family::Array(_), Value::BoundedArray { .. }, Lit::Array(_)) => Some(false),
        _ => order(family, v, lit).map(Ordering::is_eq),
    }
}

/// Postgres array equality: same shape, NULL elements equal NULL elements.
fn array_eq(elem: &Family, items: &[Value], lits: &[Option<Lit>]) -> Option<bool> {
    if items.len() != lits.len() {
        return Some(false);
    }
    let mut unknown = false;
    for (v, l) in items.iter().zip(lits) {
        let same = match (v, l) {
            (Value::Null, None) => Some(true),
            (Value::Null, Some(_)) | (_, None) => Some(false),
            (Value::Array(sub), Some(Lit::Array(sub_lits))) => array_eq(elem, sub, sub_lits),
            (Value::Array(_), Some(_)) | (_, Some(Lit::Array(_))) if *elem != Family::Json => {
                Some(false)
            }
            (v, Some(l)) => equal(elem, v, l),
        };
        match same {
            Some(true) => {}
            Some(false) => return Some(false),
            None => unknown = true,
        }
    }
    (!unknown).then_some(true)
}

/// Whether any element, in any dimension, equals `lit` (Prisma's `has`).
pub(super) fn array_has(elem: &Family, items: &[Value], lit: &Lit) -> Option<bool> {
    let mut unknown = false;
    for v in items {
        let hit = match v {
            Value::Null => Some(false),
            Value::Array(sub) => array_has(elem, sub, lit),
            v => equal(elem, v, lit),
        };
        match hit {
            Some(true) => return Some(true),
            Some(false) => {}
            None => unknown = true,
        }
    }
    (!unknown).then_some(false)
}

/// jsonb equality: objects regardless of key order, numbers by value (`1` = `1.0`).
fn json_eq(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Json::Array(xs), Json::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_eq(x, y))
        }
        (Json::Object(xs), Json::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}
