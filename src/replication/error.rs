use std::fmt;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

/// An `ErrorResponse` or `NoticeResponse` from the server, with its SQLSTATE kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
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
pub enum ReplicationError {
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on the replication connection")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the server does not accept TLS connections, but sslmode requires TLS")]
    TlsRefused,
    #[error("authentication failed for user {user:?}: {message}")]
    Auth { user: String, message: String },
    #[error("the server asked for a password but none was given (add it to the database URL or set PGPASSWORD)")]
    PasswordRequired,
    #[error("the server asks for an authentication method waltap does not support: {0}")]
    UnsupportedAuth(String),
    #[error("server error: {0}")]
    Server(ServerError),
    #[error("protocol violation: expected {expected}, got message {got:?}")]
    UnexpectedMessage { expected: &'static str, got: char },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("the server sent a {size}-byte frame, over the {max}-byte limit")]
    FrameTooLarge { size: usize, max: usize },
    #[error("the server closed the replication connection")]
    Closed,
    #[error("invalid replication slot name {0:?}: use 1 to 63 characters of a-z, 0-9 and _")]
    InvalidSlotName(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
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
            | ReplicationError::Timeout(..) => true,
            ReplicationError::Server(e) => sqlstate_is_transient(&e.code),
            _ => false,
        }
    }
}
