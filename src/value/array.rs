//! Parser for Postgres array text output (`array_out`).
//!
//! Grammar handled: optional bounds decoration (`[0:1][1:2]=`, which
//! `array_out` writes only when some lower bound is not 1, and which then
//! makes a [`Value::BoundedArray`]), then nested braces. Elements are separated by the element type's
//! delimiter; an element is unquoted (surrounding whitespace trimmed, bare
//! `NULL` in any case meaning SQL NULL) or double-quoted with backslash
//! escapes. Like `array_in`, quoted and unquoted runs may be mixed inside one
//! element and a backslash escapes the next byte anywhere.
//!
//! Elements are handed to [`decode_text`] as slices of the input buffer; only
//! an element containing backslash escapes (or mixed quoting) is copied.

use bytes::Bytes;

use super::{decode_text, snippet, TypeKind, Value, ValueError};

/// Postgres caps arrays at 6 dimensions (MAXDIM). The parser recurses once
/// per level, so some bound is needed against hostile input; this one leaves
/// headroom should that limit ever be raised.
const MAX_DEPTH: usize = 32;

pub(crate) fn decode(element: &TypeKind, delimiter: u8, raw: &Bytes) -> Result<Value, ValueError> {
    let mut p = Parser {
        raw,
        b: raw,
        pos: 0,
        element,
        delimiter,
    };
    p.skip_ws();
    let mut lower_bounds = Vec::new();
    if p.peek() == Some(b'[') {
        lower_bounds = p.bounds()?;
        p.skip_ws();
    }
    let value = p.level(1)?;
    p.skip_ws();
    if p.pos != p.b.len() {
        return Err(p.err("junk after closing '}'"));
    }
    match value {
        Value::Array(values) if lower_bounds.iter().any(|&b| b != 1) => Ok(Value::BoundedArray {
            lower_bounds,
            values,
        }),
        value => Ok(value),
    }
}

struct Parser<'a> {
    raw: &'a Bytes,
    b: &'a [u8],
    pos: usize,
    element: &'a TypeKind,
    delimiter: u8,
}

/// `array_isspace`: what Postgres trims around unquoted elements.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> ValueError {
        ValueError::InvalidArray {
            text: snippet(self.b),
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    /// `[lo:hi]` groups up to and including `=` -> the lower bounds (`[hi]`
    /// alone means a lower bound of 1, as in `array_in`).
    fn bounds(&mut self) -> Result<Vec<i32>, ValueError> {
        const BAD: &str = "malformed dimension bounds";
        let mut lower = Vec::new();
        while self.peek() == Some(b'[') {
            if lower.len() == MAX_DEPTH {
                return Err(self.err("too many dimensions"));
            }
            let close = self.b[self.pos..]
                .iter()
                .position(|&c| c == b']')
                .ok_or_else(|| self.err(BAD))?;
            let inner = &self.b[self.pos + 1..self.pos + close];
            let mut parts = inner.split(|&c| c == b':');
            let well_formed = parts.next().is_some_and(is_int)
                && parts.next().is_none_or(is_int)
                && parts.next().is_none();
            if !well_formed {
                return Err(self.err(BAD));
            }
            let first = inner.split(|&c| c == b':').next().unwrap_or_default();
            let bound = if inner.contains(&b':') {
                std::str::from_utf8(first)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| self.err(BAD))?
            } else {
                1
            };
            lower.push(bound);
            self.pos += close + 1;
        }
        self.skip_ws();
        if self.peek() != Some(b'=') {
            return Err(self.err(BAD));
        }
        self.pos += 1;
        Ok(lower)
    }

    /// At `{`; returns after the matching `}`.
    fn level(&mut self, depth: usize) -> Result<Value, ValueError> {
        if depth > MAX_DEPTH {
            return Err(self.err("too many dimensions"));
        }
        if self.peek() != Some(b'{') {
            return Err(self.err("expected '{'"));
        }
        self.pos += 1;
        self.skip_ws();
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        let nested = self.peek() == Some(b'{');
        loop {
            self.skip_ws();
            let item = if nested {
                self.level(depth + 1)?
            } else {
                self.element()?
            };
            items.push(item);
            self.skip_ws();
            match self.peek() {
                Some(c) if c == self.delimiter => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                None => return Err(self.err("unterminated array")),
                Some(_) if nested => return Err(self.err("mixed sub-arrays and elements")),
                Some(_) => return Err(self.err("expected delimiter or '}'")),
            }
        }
    }

    /// At the first non-space byte of a scalar element; stops at the
    /// delimiter or `}` that ends it.
    fn element(&mut self) -> Result<Value, ValueError> {
        let start = self.pos;
        // End of the last byte that belongs to the value: trailing unquoted
        // whitespace is not part of it, escaped or quoted whitespace is.
        let mut end = start;
        let mut quotes = 0usize;
        let mut escapes = false;
        let mut in_quotes = false;
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err(if in_quotes {
                    "unterminated quoted element"
                } else {
                    "unterminated array"
                }));
            };
            match c {
                b'\\' => {
                    escapes = true;
                    if self.pos + 1 >= self.b.len() {
                        return Err(self.err("backslash at end of input"));
                    }
                    // Only the backslash's next byte is taken literally; any
                    // UTF-8 continuation bytes after it are ordinary bytes.
                    self.pos += 2;
                    end = self.pos;
                }
                b'"' => {
                    quotes += 1;
                    in_quotes = !in_quotes;
                    self.pos += 1;
                    end = self.pos;
                }
                _ if in_quotes => self.pos += 1,
                _ if c == self.delimiter || c == b'}' => break,
                b'{' => return Err(self.err("unexpected '{' inside element")),
                _ => {
                    self.pos += 1;
                    if !is_space(c) {
                        end = self.pos;
                    }
                }
            }
        }
        let text = &self.b[start..end];
        let bytes = if quotes == 0 && !escapes {
            if text.is_empty() {
                return Err(self.err("empty unquoted element"));
            }
            if text.eq_ignore_ascii_case(b"NULL") {
                return Ok(Value::Null);
            }
            self.raw.slice(start..end)
        } else if quotes == 2
            && !escapes
            && text.first() == Some(&b'"')
            && text.last() == Some(&b'"')
        {
            self.raw.slice(start + 1..end - 1)
        } else {
            Bytes::from(unescape(text))
        };
        decode_text(self.element, bytes)
    }
}

fn is_int(n: &[u8]) -> bool {
    let digits = n.strip_prefix(b"-").unwrap_or(n);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

fn unescape(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut it = text.iter().copied();
    while let Some(c) = it.next() {
        match c {
            b'"' => {}
            b'\\' => out.extend(it.next()),
            _ => out.push(c),
        }
    }
    out
}
