//! Direct JSON writing of [`Event`]s, for the JSON-lines printers.
//!
//! The same bytes as `serde_json::to_writer(&event)` (every event in `assemble::tests` is
//! written both ways and compared), without going through serde: about half of `waltap tail`'s CPU was
//! serde_json's byte-at-a-time string escaping and its per-entry bookkeeping.

use super::{time, Event, LsnText, Row, TxInfo};
use crate::value::{write_str, write_u64};

// Keys of the envelope are fixed: they are written as literal fragments (`,"position":`),
// only column names go through the escaper.

fn bool_text(b: bool) -> &'static [u8] {
    if b {
        b"true"
    } else {
        b"false"
    }
}

fn names(out: &mut Vec<u8>, names: &[std::sync::Arc<str>]) {
    out.push(b'[');
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, n);
    }
    out.push(b']');
}

impl Row {
    /// Appends the row as a JSON object (what its `Serialize` impl gives).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        for (name, value) in self.names.iter().zip(&self.values) {
            if let Some(v) = value {
                if !std::mem::take(&mut first) {
                    out.push(b',');
                }
                write_str(out, name);
                out.push(b':');
                v.write_json(out);
            }
        }
        out.push(b'}');
    }
}

fn row_or_null(out: &mut Vec<u8>, row: Option<&Row>) {
    match row {
        Some(r) => r.write_json(out),
        None => out.extend_from_slice(b"null"),
    }
}

impl TxInfo {
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.extend_from_slice(b"{\"id\":");
        write_u64(out, u64::from(self.xid));
        out.extend_from_slice(b",\"commitLsn\":");
        write_str(out, LsnText(self.commit_lsn).encode(&mut [0; 17]));
        out.extend_from_slice(b",\"committedAt\":");
        let mut buf = [0u8; time::RFC3339_LEN];
        match time::rfc3339_micros_into(self.committed_at, &mut buf) {
            Some(text) => write_str(out, text),
            None => write_str(out, &time::rfc3339_micros(self.committed_at)),
        }
        out.extend_from_slice(b",\"index\":");
        write_u64(out, u64::from(self.index));
        if let Some(total) = self.total {
            out.extend_from_slice(b",\"total\":");
            write_u64(out, u64::from(total));
        }
        out.extend_from_slice(b",\"last\":");
        out.extend_from_slice(bool_text(self.last));
        if let Some(a) = &self.annotations {
            out.extend_from_slice(b",\"annotations\":");
            serde_json::to_writer(&mut *out, &**a)?;
        }
        out.push(b'}');
        Ok(())
    }
}

impl Event<Row> {
    /// Appends the event's JSON, byte for byte what `serde_json::to_writer` writes for it.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.extend_from_slice(b"{\"id\":");
        write_str(out, self.id.array_to_str(&mut [0; ulid::ULID_LEN]));
        out.extend_from_slice(b",\"position\":");
        write_str(
            out,
            self.position
                .encode(&mut [0; super::position::POSITION_LEN]),
        );
        out.extend_from_slice(b",\"action\":");
        write_str(out, self.action_name());
        out.extend_from_slice(b",\"schema\":");
        write_str(out, &self.schema);
        out.extend_from_slice(b",\"table\":");
        write_str(out, &self.table);
        out.extend_from_slice(b",\"identity\":");
        write_str(out, self.identity.name());
        match self.action {
            super::Action::Create => {
                out.extend_from_slice(b",\"created\":");
                row_or_null(out, self.new.as_ref());
            }
            super::Action::Update => {
                out.extend_from_slice(b",\"before\":");
                row_or_null(out, self.old.as_ref());
                out.extend_from_slice(b",\"after\":");
                row_or_null(out, self.new.as_ref());
                if let Some(changed) = &self.changed {
                    out.extend_from_slice(b",\"changed\":");
                    names(out, changed);
                }
                if !self.unchanged.is_empty() {
                    out.extend_from_slice(b",\"unchanged\":");
                    names(out, &self.unchanged);
                }
            }
            super::Action::Delete => {
                out.extend_from_slice(b",\"deleted\":");
                row_or_null(out, self.old.as_ref());
            }
            super::Action::Truncate => {}
        }
        if let Some(t) = self.transition {
            out.extend_from_slice(b",\"transition\":");
            write_str(out, t.name());
        }
        out.extend_from_slice(b",\"tx\":");
        self.tx.write_json(out)?;
        out.push(b'}');
        Ok(())
    }
}
