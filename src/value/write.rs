//! Direct JSON writing of [`Value`]s into a byte buffer: the hot path of `waltap tail`.
//!
//! Writes exactly what `serde_json` writes for the same value through its `Serialize`
//! impl (compact form, same escapes, same number formatting), without serde's per-call
//! machinery and with a string escaper that checks eight bytes at a time; most text
//! in change events needs no escaping at all. The proptests `decode_never_panics` and
//! `direct_writer_escapes_like_serde` (in `tests.rs`) hold the two forms to each other.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{with_date_text, with_timestamp_text, Value, LOWER_BOUNDS_KEY, VALUES_KEY};

/// The short escapes JSON has; every other control byte becomes `\u00XX`.
fn short_escape(b: u8) -> Option<&'static [u8]> {
    Some(match b {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        0x08 => b"\\b",
        0x0C => b"\\f",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        _ => return None,
    })
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any of the eight bytes is a control byte, `"` or `\`. Exact when false; when
/// true the caller looks at the bytes one by one.
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

/// Appends `s` as a quoted JSON string.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let n = rest.len().min(8);
        let word = match rest.first_chunk::<8>() {
            Some(w) => *w,
            None => {
                // A short tail is padded with spaces, which never need escaping, so it
                // takes the word test too (byte by byte: a variable-length copy would be
                // a call to memcpy).
                let mut w = [b' '; 8];
                for (d, s) in w.iter_mut().zip(rest) {
                    *d = *s;
                }
                w
            }
        };
        if !word_needs_escape(u64::from_le_bytes(word)) {
            i += n;
            continue;
        }
        for (j, &b) in rest[..n].iter().enumerate() {
            if !needs_escape(b) {
                continue;
            }
            out.extend_from_slice(&bytes[run_start..i + j]);
            match short_escape(b) {
                Some(e) => out.extend_from_slice(e),
                None => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xF)]);
                }
            }
            run_start = i + j + 1;
        }
        i += n;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

pub(crate) fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

impl Value {
    /// Appends the value's JSON, byte for byte what its `Serialize` impl gives through
    /// `serde_json`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(true) => out.extend_from_slice(b"true"),
            Value::Bool(false) => out.extend_from_slice(b"false"),
            Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
            Value::Float(f) if f.is_finite() => {
                // serde_json's own float formatting, for the same digits; writing a finite
                // number into a Vec cannot fail.
                let _ = serde::Serializer::serialize_f64(&mut serde_json::Serializer::new(out), *f);
            }
            Value::Float(f) if f.is_nan() => out.extend_from_slice(b"\"NaN\""),
            Value::Float(f) if *f > 0.0 => out.extend_from_slice(b"\"Infinity\""),
            Value::Float(_) => out.extend_from_slice(b"\"-Infinity\""),
            Value::Numeric(t) | Value::Text(t) => write_str(out, t.as_str()),
            // Checked at decode time (`json::is_valid`), so verbatim is valid JSON.
            Value::Json(t) => out.extend_from_slice(t.as_bytes()),
            Value::Timestamptz(t) | Value::Timestamp(t) => {
                let with_zone = matches!(self, Value::Timestamptz(_));
                with_timestamp_text(t, with_zone, |s| write_str(out, s));
            }
            Value::Date(t) => with_date_text(t, |s| write_str(out, s)),
            Value::Bytea(b) => {
                out.push(b'"');
                out.extend_from_slice(STANDARD.encode(b).as_bytes());
                out.push(b'"');
            }
            Value::Array(items) => write_items(out, items),
            Value::BoundedArray {
                lower_bounds,
                values,
            } => {
                out.push(b'{');
                write_str(out, LOWER_BOUNDS_KEY);
                out.extend_from_slice(b":[");
                for (i, bound) in lower_bounds.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(itoa::Buffer::new().format(*bound).as_bytes());
                }
                out.extend_from_slice(b"],");
                write_str(out, VALUES_KEY);
                out.push(b':');
                write_items(out, values);
                out.push(b'}');
            }
        }
    }
}

fn write_items(out: &mut Vec<u8>, items: &[Value]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item.write_json(out);
    }
    out.push(b']');
}
