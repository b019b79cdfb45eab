//! The streaming replication protocol, client side.
//!
//! This module owns the replication connection: the startup packet with
//! `replication=database`, authentication (trust, cleartext, MD5, SCRAM-SHA-256), TLS,
//! replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `START_REPLICATION`)
//! and the CopyBoth sub-protocol (XLogData, keepalives, standby status updates, CopyDone).
//! It knows nothing of pgoutput or events: it hands out XLogData payloads as [`bytes::Bytes`]
//! and sends the positions it is told to send.
//!
//! Invariants kept here:
//! - frames are read into one buffer that survives cancellation, so a `select!` that drops
//!   a read never loses bytes;
//! - no frame larger than [`MAX_FRAME`] is buffered (a malformed length cannot make us
//!   allocate without bound);
//! - `ErrorResponse` and `NoticeResponse` are surfaced as typed values in every state,
//!   including inside copy mode.

mod conn;
mod copy_both;
mod error;
mod pacing;

pub use conn::{IdentifySystem, ReplicationConnection, SlotCreated, SqlRow};
pub use copy_both::{ReplicationMessage, ReplicationStream, StatusUpdate};
pub use error::{pg_error_is_transient, sqlstate_is_transient, ReplicationError, ServerError};

/// Largest backend frame accepted: a pgoutput message of a very wide row can approach 1 GiB.
pub const MAX_FRAME: usize = (1 << 30) + (1 << 20);

/// Quotes a string literal for a replication command (`'it''s'`). The replication grammar
/// takes only plain quoted strings, not the `E'...'` form that
/// `postgres_protocol::escape::escape_literal` produces for backslashes, and its scanner
/// keeps backslashes literal, so doubling the quote is the whole escape.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Checks a slot name against the server's rule (`[a-z0-9_]`, 1..=63 bytes), so that a bad
/// name is reported before any connection is made.
pub fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ReplicationError::InvalidSlotName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("waltap_1").is_ok());
        for bad in ["", "Upper", "a-b", "a b", &"x".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }
}
