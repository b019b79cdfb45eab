//! Decoding of the `pgoutput` logical replication protocol.
//!
//! This module owns one thing: turning the payload of one XLogData message (the bytes after
//! the `w` header) into a typed [`LogicalMessage`]. It is a pure decoder: no I/O, no async,
//! no clock. It never panics on any input, and it never allocates more than the input can
//! justify: counts and lengths read from the wire are checked against the bytes actually
//! there before anything is reserved. Column values are zero-copy slices of the input.
//!
//! The decoder is stateful only because the wire format is: inside a streamed transaction
//! (between Stream Start and Stream Stop, protocol v2+) the data messages carry an extra
//! xid prefix, so [`Decoder`] tracks those two messages itself. Create one per replication
//! connection and call [`Decoder::reset`] when reconnecting.
//!
//! Anything unexpected (unknown tag, trailing bytes, a stream message out of place, a
//! message the negotiated protocol version cannot send) is an error rather than something
//! to skip: a misread byte would shift every later field, and silently continuing would
//! emit wrong change events.

use std::fmt;

use bytes::Bytes;

mod decode;
mod message;
mod reader;
#[cfg(test)]
mod tests;

pub use message::*;

/// Why a message could not be decoded. `context` names the message and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before the field was complete (also: an empty message).
    #[error("pgoutput message truncated in {context}: need {need} more bytes, have {have}")]
    UnexpectedEof {
        context: &'static str,
        need: usize,
        have: usize,
    },
    /// A discriminating byte (message tag, tuple marker, column kind, replica identity) had
    /// a value this decoder does not know.
    #[error("unknown {context} {}", Tag(*.tag))]
    UnknownTag { context: &'static str, tag: u8 },
    /// The message kind exists but the negotiated protocol version cannot send it.
    #[error(
        "pgoutput {name} message {} needs protocol version {min_version}, \
         but this session uses version {protocol_version}",
        Tag(*.tag)
    )]
    UnsupportedMessage {
        name: &'static str,
        tag: u8,
        min_version: u32,
        protocol_version: u32,
    },
    #[error("negative length {len} in {context}")]
    NegativeLength { context: &'static str, len: i32 },
    #[error("{count} trailing bytes after a complete {context} message")]
    TrailingBytes { context: &'static str, count: usize },
    #[error("{context} is not valid UTF-8")]
    InvalidUtf8 { context: &'static str },
    /// A string ran to the end of the message without its terminating NUL.
    #[error("{context} has no NUL terminator before the end of the message")]
    MissingNul { context: &'static str },
    /// Stream Start inside a stream, or Stream Stop outside one: the decoder's idea of
    /// whether xid prefixes are present no longer matches the server's.
    #[error("pgoutput {name} received {}", stream_position(*.in_stream))]
    UnexpectedStreamMessage { name: &'static str, in_stream: bool },
}

/// Shows a tag byte as the character Postgres documents it as, when it is one.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

fn stream_position(in_stream: bool) -> &'static str {
    if in_stream {
        "inside a streamed transaction block"
    } else {
        "outside a streamed transaction block"
    }
}

/// Decodes the messages of one replication connection, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    protocol_version: u32,
    streaming_parallel: bool,
    in_stream: bool,
}

impl Decoder {
    /// `protocol_version` and `streaming_parallel` must match the `proto_version` and
    /// `streaming 'parallel'` options given to START_REPLICATION: they change the layout of
    /// some messages, and nothing on the wire says which layout was used.
    pub fn new(protocol_version: u32, streaming_parallel: bool) -> Self {
        Decoder {
            protocol_version,
            streaming_parallel,
            in_stream: false,
        }
    }

    /// Decodes one complete message. On error the decoder's state is unchanged.
    pub fn decode(&mut self, buf: Bytes) -> Result<LogicalMessage, DecodeError> {
        let msg = decode::message(
            buf,
            self.protocol_version,
            self.streaming_parallel,
            self.in_stream,
        )?;
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    /// Decodes a message that was received inside a stream block (with its xid prefix),
    /// e.g. one kept on disk until its transaction committed. Leaves the state alone.
    pub fn decode_streamed(&self, buf: Bytes) -> Result<LogicalMessage, DecodeError> {
        decode::message(buf, self.protocol_version, self.streaming_parallel, true)
    }

    /// Whether the last Stream Start has not yet been followed by its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }
}
