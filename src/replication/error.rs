use std::fmt;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

/// An `ErrorResponse` or `NoticeResponse` from the server, with its SQLSTATE kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerError {
    /// `ERROR`, `FATAL`, `WARNING`, ... (the non-localized field when the server sends it).
    pub severity: String,
    /// The SQLSTATE, e.g. `42704`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The `DETAIL` line, if any.
    pub detail: Option<String>,
    /// The `HINT` line, if any.
    pub hint: Option<String>,
}

impl ServerError {
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> ServerError {
        let mut e = ServerError::default();
        while let Ok(Some(f)) = fields.next() {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        e
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

/// Whether a server error with this SQLSTATE can go away by retrying: 08 connection
/// exception; 53 insufficient resources; 57P01..03 admin shutdown, crash shutdown, cannot
/// connect now (recovery); 55006 object in use (a slot still held by our own previous
/// walsender). One rule for the replication and the SQL connections.
pub fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "55006")
}

/// Whether an ordinary SQL failure can go away by retrying: the connection broke, or the
/// server said so with a transient SQLSTATE.
pub fn pg_error_is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => e.is_closed() || sqlstate_is_transient(code.code()),
    }
}

/// Failures of the replication connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The TCP (or Unix socket) connection could not be made.
    #[error("cannot connect to {target}")]
    Connect {
        /// The host and port (or socket path) tried.
        target: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the established connection failed.
    #[error("I/O error on the replication connection")]
    Io(#[from] std::io::Error),
    /// The TLS handshake or configuration failed (the TLS library's message).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused TLS and the `sslmode` does not allow plain text.
    #[error("the server does not accept TLS connections, but sslmode requires TLS")]
    TlsRefused,
    /// The server rejected the credentials.
    #[error("authentication failed for user {user:?}: {message}")]
    Auth {
        /// The role that tried to log in.
        user: String,
        /// The server's message.
        message: String,
    },
    /// The server wants a password and none was configured.
    #[error("the server asked for a password but none was given (add it to the database URL or set PGPASSWORD)")]
    PasswordRequired,
    /// The server asks for an authentication method other than trust, cleartext, MD5 or
    /// SCRAM-SHA-256 (the method's name).
    #[error("the server asks for an authentication method waltap does not support: {0}")]
    UnsupportedAuth(String),
    /// The server answered with an `ErrorResponse`.
    #[error("server error: {0}")]
    Server(ServerError),
    /// The server sent a message that does not fit the protocol state.
    #[error("protocol violation: expected {expected}, got message {got:?}")]
    UnexpectedMessage {
        /// What the protocol allows here.
        expected: &'static str,
        /// The type byte of the message received.
        got: char,
    },
    /// The server's messages break the protocol in another way (what is wrong).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message is larger than waltap accepts.
    #[error("the server sent a {size}-byte frame, over the {max}-byte limit")]
    FrameTooLarge {
        /// The message's length, in bytes.
        size: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The server closed the connection.
    #[error("the server closed the replication connection")]
    Closed,
    /// The slot name is not one Postgres accepts.
    #[error("invalid replication slot name {0:?}: use 1 to 63 characters of a-z, 0-9 and _")]
    InvalidSlotName(String),
    /// The server did not answer in time: (how long waltap waited, for what).
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    /// `target_session_attrs` asks for a primary and the server is a hot standby (during a
    /// failover, until one of the hosts is promoted), or for a standby and it is not.
    #[error("{target} is {}, and the URL's target_session_attrs asks for {}", if *standby { "a hot standby" } else { "not a standby" }, if *standby { "a primary" } else { "a standby" })]
    WrongServerKind {
        /// The host and port tried.
        target: String,
        /// Whether it is a hot standby.
        standby: bool,
    },
}

impl ReplicationError {
    /// The SQLSTATE when the server reported the failure.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether trying again later can help (connection trouble, server restarting,
    /// slot busy), as opposed to a definite problem (bad password, bad slot, bad input).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed
            | ReplicationError::WrongServerKind { .. }
            | ReplicationError::Timeout(..) => true,
            ReplicationError::Server(e) => sqlstate_is_transient(&e.code),
            _ => false,
        }
    }
}
