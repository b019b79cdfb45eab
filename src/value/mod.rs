//! Column values: decoding the text form pgoutput sends and serializing it
//! into the public JSON event format.
//!
//! This module owns the type-OID -> JSON mapping ([`TypeKind`]), the decoded
//! value ([`Value`]) and its `Serialize` impl. It assumes the walsender
//! session settings waltap pins (`DateStyle=ISO`, `TimeZone=UTC`,
//! `extra_float_digits=3`, `IntervalStyle=postgres`, hex `bytea_output`,
//! UTF-8 client encoding). SQL NULL columns and unchanged TOAST columns are
//! the caller's business; [`Value::Null`] exists for array elements.
//!
//! | type | JSON |
//! |------|------|
//! | bool | `true` / `false` |
//! | int2, int4, int8, oid, xid, cid | integer |
//! | float4, float8 | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | numeric | string, exact text |
//! | json, jsonb | nested JSON, verbatim |
//! | timestamptz | `"2026-11-27T10:00:00.123000Z"` (BC years, offsets: see `time.rs`) |
//! | timestamp | `"2026-11-27T10:00:00.500000"` |
//! | date | `"2026-11-27"` (years outside 1-9999 AD expanded: `"+010000-01-01"`) |
//! | `infinity` of the three | `"infinity"`, `"-infinity"` |
//! | bytea | standard base64 with padding |
//! | arrays | JSON arrays of the element mapping, nested per dimension; with lower bounds other than 1, `{"lowerBounds": [...], "values": [...]}` |
//! | everything else | string, exact text |
//!
//! Hot-path rules: scalar values keep a slice of the received buffer
//! ([`Text`]), timestamps are rewritten into a stack buffer while
//! serializing, bytea is base64-encoded straight into the output, and json is
//! emitted without being parsed again.

mod array;
mod from_json;
mod json;
mod kind;
mod time;
mod write;

#[cfg(test)]
mod tests;

use std::fmt;

use base64::display::Base64Display;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

pub use kind::TypeKind;
pub(crate) use write::{write_str, write_u64};

/// Column value, zero-copy where possible (holds slices of the received
/// buffer).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `bool`.
    Bool(bool),
    /// `int2`, `int4`, `int8`, `oid`, `xid`, `cid`.
    Int(i64),
    /// `float4`, `float8`, NaN and the infinities included.
    Float(f64),
    /// Exact text, serialized as a JSON string.
    Numeric(Text),
    /// Every other type (text, date, uuid, enums, ranges, ...): Postgres output text.
    Text(Text),
    /// Validated JSON text, serialized verbatim.
    Json(Text),
    /// Postgres output text; rewritten to RFC 3339 when serialized.
    Timestamptz(Text),
    /// Postgres output text; rewritten to ISO 8601 when serialized.
    Timestamp(Text),
    /// Postgres output text; years outside 1 to 9999 AD rewritten when serialized.
    Date(Text),
    /// Decoded bytes; base64 when serialized.
    Bytea(Bytes),
    /// An array; elements of a multi-dimensional array are arrays themselves.
    Array(Vec<Value>),
    /// An array whose lower bounds are not all 1 (`'[0:1]={1,2}'`): one bound per
    /// dimension, and the elements as in [`Value::Array`].
    BoundedArray {
        /// Lower bound of each dimension, outermost first.
        lower_bounds: Vec<i32>,
        /// The elements, nested per dimension.
        values: Vec<Value>,
    },
}

impl Value {
    /// Equality as Postgres sees "the same value" for change detection: `==`, except that
    /// float NaN equals NaN (both serialize to `"NaN"`), also inside arrays.
    pub fn same(&self, other: &Value) -> bool {
        fn all_same(xs: &[Value], ys: &[Value]) -> bool {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| x.same(y))
        }
        match (self, other) {
            (Value::Float(x), Value::Float(y)) => x == y || (x.is_nan() && y.is_nan()),
            (Value::Array(xs), Value::Array(ys)) => all_same(xs, ys),
            (
                Value::BoundedArray {
                    lower_bounds: bx,
                    values: xs,
                },
                Value::BoundedArray {
                    lower_bounds: by,
                    values: ys,
                },
            ) => bx == by && all_same(xs, ys),
            _ => self == other,
        }
    }
}

/// UTF-8 validated [`Bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
// `ByteString` keeps the proof of UTF-8 validity with the bytes, so reading the text back
// (for every value serialized) does not validate it a second time.
pub struct Text(bytestring::ByteString);

impl Text {
    pub fn new(b: Bytes) -> Result<Text, ValueError> {
        bytestring::ByteString::try_from(b)
            .map(Text)
            .map_err(|_| ValueError::InvalidUtf8)
    }

    pub fn from_static(s: &'static str) -> Text {
        Text(bytestring::ByteString::from_static(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn into_bytes(self) -> Bytes {
        self.0.into_bytes()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Why a column's text could not be decoded. Messages quote the offending
/// text, cut to about 100 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("value is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid bool {0:?}")]
    InvalidBool(String),
    #[error("invalid integer {0:?}")]
    InvalidInt(String),
    #[error("invalid float {0:?}")]
    InvalidFloat(String),
    #[error("invalid bytea {0:?}")]
    InvalidBytea(String),
    #[error("invalid json {0:?}")]
    InvalidJson(String),
    #[error("invalid timestamp {0:?}")]
    InvalidTimestamp(String),
    #[error("invalid date {0:?}")]
    InvalidDate(String),
    #[error("invalid array {text:?}: {reason}")]
    InvalidArray { text: String, reason: &'static str },
    /// A JSON form that does not fit the column type ([`Value::from_json`]).
    #[error("expected {expected}, got {got}")]
    UnexpectedJson { expected: &'static str, got: String },
}

const SNIPPET_CHARS: usize = 100;

/// The offending text for an error message, lossily decoded and cut.
fn snippet(b: &[u8]) -> String {
    // 4 bytes per char at most: no need to decode the rest of a huge value.
    let head = &b[..b.len().min(SNIPPET_CHARS * 4)];
    let text = String::from_utf8_lossy(head);
    match text.char_indices().nth(SNIPPET_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None if head.len() < b.len() => format!("{text}..."),
        None => text.into_owned(),
    }
}

/// Decode one column's text output according to its [`TypeKind`].
pub fn decode_text(kind: &TypeKind, raw: Bytes) -> Result<Value, ValueError> {
    match kind {
        // `true`/`false` are what a `bool::text` cast prints; cheap to allow.
        TypeKind::Bool => match &raw[..] {
            b"t" | b"true" => Ok(Value::Bool(true)),
            b"f" | b"false" => Ok(Value::Bool(false)),
            _ => Err(ValueError::InvalidBool(snippet(&raw))),
        },
        TypeKind::Int => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Value::Int)
            .ok_or_else(|| ValueError::InvalidInt(snippet(&raw))),
        TypeKind::Float => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Value::Float)
            .ok_or_else(|| ValueError::InvalidFloat(snippet(&raw))),
        TypeKind::Numeric => Text::new(raw).map(Value::Numeric),
        TypeKind::Text => Text::new(raw).map(Value::Text),
        TypeKind::Json => {
            let text = Text::new(raw)?;
            if !json::is_valid(text.as_bytes()) {
                return Err(ValueError::InvalidJson(snippet(text.as_bytes())));
            }
            Ok(Value::Json(text))
        }
        TypeKind::Timestamptz | TypeKind::Timestamp => {
            let with_zone = *kind == TypeKind::Timestamptz;
            if !time::is_valid(&raw, with_zone) {
                return Err(ValueError::InvalidTimestamp(snippet(&raw)));
            }
            // The shape check admits ASCII only, so this cannot fail.
            let text = Text::new(raw)?;
            Ok(if with_zone {
                Value::Timestamptz(text)
            } else {
                Value::Timestamp(text)
            })
        }
        TypeKind::Date => {
            if !time::is_valid_date(&raw) {
                return Err(ValueError::InvalidDate(snippet(&raw)));
            }
            Text::new(raw).map(Value::Date)
        }
        TypeKind::Bytea => decode_bytea(raw).map(Value::Bytea),
        TypeKind::Array { element, delimiter } => array::decode(element, *delimiter, &raw),
    }
}

/// `\x` hex format, else the legacy escape format (`\\` and `\ooo`).
fn decode_bytea(raw: Bytes) -> Result<Bytes, ValueError> {
    let bad = || ValueError::InvalidBytea(snippet(&raw));
    if let Some(hex) = raw.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return Err(bad());
        }
        let mut out = Vec::with_capacity(hex.len() / 2);
        for pair in hex.chunks_exact(2) {
            match (hex_val(pair[0]), hex_val(pair[1])) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(bad()),
            }
        }
        return Ok(Bytes::from(out));
    }
    if !raw.contains(&b'\\') {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = &raw[..];
    while let Some((&c, tail)) = rest.split_first() {
        if c != b'\\' {
            out.push(c);
            rest = tail;
            continue;
        }
        match tail {
            [b'\\', more @ ..] => {
                out.push(b'\\');
                rest = more;
            }
            [a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', more @ ..] => {
                out.push((a - b'0') << 6 | (b - b'0') << 3 | (c - b'0'));
                rest = more;
            }
            _ => return Err(bad()),
        }
    }
    Ok(Bytes::from(out))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Float(f) if f.is_finite() => serializer.serialize_f64(*f),
            Value::Float(f) if f.is_nan() => serializer.serialize_str("NaN"),
            Value::Float(f) if *f > 0.0 => serializer.serialize_str("Infinity"),
            Value::Float(_) => serializer.serialize_str("-Infinity"),
            Value::Numeric(t) | Value::Text(t) => serializer.serialize_str(t.as_str()),
            Value::Json(t) => json::serialize_raw(t.as_str(), serializer),
            Value::Timestamptz(t) => serialize_timestamp(t, true, serializer),
            Value::Timestamp(t) => serialize_timestamp(t, false, serializer),
            Value::Date(t) => with_date_text(t, |s| serializer.serialize_str(s)),
            Value::Bytea(b) => serializer.collect_str(&Base64Display::new(b, &STANDARD)),
            Value::Array(items) => serialize_items(items, serializer),
            Value::BoundedArray {
                lower_bounds,
                values,
            } => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry(LOWER_BOUNDS_KEY, lower_bounds)?;
                map.serialize_entry(VALUES_KEY, &Items(values))?;
                map.end()
            }
        }
    }
}

/// Keys of a [`Value::BoundedArray`]'s JSON object.
pub(crate) const LOWER_BOUNDS_KEY: &str = "lowerBounds";
pub(crate) const VALUES_KEY: &str = "values";

struct Items<'a>(&'a [Value]);

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_items(self.0, serializer)
    }
}

fn serialize_items<S: Serializer>(items: &[Value], serializer: S) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(items.len()))?;
    for item in items {
        seq.serialize_element(item)?;
    }
    seq.end()
}

/// Calls `f` with the ISO 8601 form of a date value.
fn with_date_text<R>(t: &Text, f: impl FnOnce(&str) -> R) -> R {
    match time::render_date(t.as_bytes()) {
        Some(time::Rendered::Iso(buf)) => f(buf.as_str()),
        Some(time::Rendered::AsIs) | None => f(t.as_str()),
    }
}

fn serialize_timestamp<S: Serializer>(
    t: &Text,
    with_zone: bool,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    with_timestamp_text(t, with_zone, |s| serializer.serialize_str(s))
}

/// Calls `f` with the ISO 8601 form of a timestamp value (rendered on the stack).
fn with_timestamp_text<R>(t: &Text, with_zone: bool, f: impl FnOnce(&str) -> R) -> R {
    match time::render(t.as_bytes(), with_zone) {
        Some(time::Rendered::Iso(buf)) => f(buf.as_str()),
        // `AsIs` by design; `None` only for a hand-built Value that skipped
        // decode_text's check, where the raw text is the most honest output.
        Some(time::Rendered::AsIs) | None => f(t.as_str()),
    }
}
