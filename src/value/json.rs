//! JSON syntax check and verbatim emission for `json`/`jsonb` columns.
//!
//! Why not `serde_json::from_slice::<&RawValue>`: serde_json refuses nesting
//! deeper than 128 levels, while Postgres stores far deeper documents; one
//! such row would stall the whole change stream. This checker is iterative
//! (an explicit container stack, no recursion) and accepts exactly RFC 8259,
//! which is also what Postgres' `json` input accepts (`\uXXXX` escapes are
//! checked for shape only, as Postgres does for `json`).

use serde::ser::{SerializeStruct, Serializer};

/// The struct name serde_json's serializer treats as "write the single field
/// verbatim". It is how `serde_json::value::RawValue` serializes itself;
/// using it directly lets us emit already-validated text without building a
/// `RawValue` (which would re-parse, and again hit the depth limit).
/// `tests::raw_json_token_is_honoured` fails if serde_json ever changes it.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

pub(crate) fn serialize_raw<S: Serializer>(json: &str, serializer: S) -> Result<S::Ok, S::Error> {
    let mut s = serializer.serialize_struct(RAW_VALUE_TOKEN, 1)?;
    s.serialize_field(RAW_VALUE_TOKEN, json)?;
    s.end()
}

/// Open containers, one bit each (1 = object), so typical documents need no
/// heap; only nesting beyond 64 levels spills into the `Vec`.
struct Stack {
    bits: u64,
    depth: usize,
    spill: Vec<bool>,
}

impl Stack {
    fn push(&mut self, is_object: bool) {
        if self.depth < 64 {
            self.bits = (self.bits & !(1 << self.depth)) | (u64::from(is_object) << self.depth);
        } else {
            self.spill.push(is_object);
        }
        self.depth += 1;
    }

    fn top(&self) -> Option<bool> {
        let i = self.depth.checked_sub(1)?;
        if i < 64 {
            Some(self.bits & (1 << i) != 0)
        } else {
            self.spill.last().copied()
        }
    }

    fn pop(&mut self) {
        if self.depth > 64 {
            self.spill.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let hit = self.b[self.pos..].starts_with(word);
        if hit {
            self.pos += word.len();
        }
        hit
    }

    /// At the opening quote.
    fn string(&mut self) -> bool {
        self.pos += 1;
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    self.pos += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            let hex = self.b.get(self.pos + 1..self.pos + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return false;
                            }
                            self.pos += 5;
                        }
                        _ => return false,
                    }
                }
                Some(c) if c < 0x20 => return false,
                Some(_) => self.pos += 1,
            }
        }
    }

    fn number(&mut self) -> bool {
        self.eat(b'-');
        if !self.eat(b'0') && self.digits() == 0 {
            return false;
        }
        if self.eat(b'.') && self.digits() == 0 {
            return false;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return false;
            }
        }
        true
    }

    /// An object key and its colon, leaving the cursor at the value.
    fn key(&mut self) -> bool {
        self.skip_ws();
        if self.peek() != Some(b'"') || !self.string() {
            return false;
        }
        self.skip_ws();
        let colon = self.eat(b':');
        self.skip_ws();
        colon
    }
}

/// Whether `b` is one complete JSON text (surrounding whitespace allowed).
pub(crate) fn is_valid(b: &[u8]) -> bool {
    let mut c = Cursor { b, pos: 0 };
    let mut stack = Stack {
        bits: 0,
        depth: 0,
        spill: Vec::new(),
    };
    c.skip_ws();
    'value: loop {
        // Cursor is at the start of a value.
        let scalar_ok = match c.peek() {
            Some(b'{') => {
                c.pos += 1;
                c.skip_ws();
                if c.eat(b'}') {
                    true
                } else {
                    stack.push(true);
                    if !c.key() {
                        return false;
                    }
                    continue 'value;
                }
            }
            Some(b'[') => {
                c.pos += 1;
                c.skip_ws();
                if c.eat(b']') {
                    true
                } else {
                    stack.push(false);
                    continue 'value;
                }
            }
            Some(b'"') => c.string(),
            Some(b't') => c.literal(b"true"),
            Some(b'f') => c.literal(b"false"),
            Some(b'n') => c.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => c.number(),
            _ => false,
        };
        if !scalar_ok {
            return false;
        }
        // A value just ended: close containers until one wants another value.
        loop {
            c.skip_ws();
            let Some(is_object) = stack.top() else {
                return c.pos == b.len();
            };
            match c.peek() {
                Some(b',') => {
                    c.pos += 1;
                    c.skip_ws();
                    if is_object && !c.key() {
                        return false;
                    }
                    continue 'value;
                }
                Some(b'}') if is_object => {
                    c.pos += 1;
                    stack.pop();
                }
                Some(b']') if !is_object => {
                    c.pos += 1;
                    stack.pop();
                }
                _ => return false,
            }
        }
    }
}
