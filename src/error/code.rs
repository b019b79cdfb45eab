//! The stable error codes of the HTTP API, and the status each one answers with.

use axum::http::StatusCode;

/// A machine-readable reason on the wire: `{"error": {"code": "...", "message": "..."}}`.
///
/// Codes are a contract: clients branch on them, so new ones are added rather than old
/// ones renamed. The HTTP status follows from the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No valid key or token.
    Unauthorized,
    /// The token is past its expiry.
    TokenExpired,
    /// The key may not do this.
    Forbidden,
    /// The request is malformed or asks for something impossible.
    BadRequest,
    /// The filter does not parse or does not fit the table.
    BadFilter,
    /// The table does not exist or is not published.
    UnknownTable,
    /// No such stream or endpoint.
    NotFound,
    /// The method does not apply to the endpoint.
    MethodNotAllowed,
    /// The stream already exists.
    Conflict,
    /// Another consumer holds the stream's lease.
    StreamBusy,
    /// The stream's cursor points before the oldest retained event.
    StaleCursor,
    /// A live subscriber fell behind and was cut off.
    Lagged,
    /// The table's columns changed so that the subscription's filter no longer fits.
    SchemaChanged,
    /// The key has as many open connections as it may.
    TooManyConnections,
    /// The request body is over the limit.
    PayloadTooLarge,
    /// The server is stopping.
    ShuttingDown,
    /// The server has as many open connections as it may.
    ServerBusy,
    /// The change source stopped for good.
    SourceStopped,
    /// The change source is reconnecting.
    SourceUnavailable,
    /// The change source broke during a subscription, so changes may have been missed.
    SourceInterrupted,
    /// The event log (its store database or JetStream) cannot be reached right now.
    LogUnavailable,
    /// A table disappeared while its initial state was read.
    NoSuchTable,
    /// The change stream did not reach an initial state's watermark in time.
    SnapshotTimeout,
    /// Reading an initial state failed on the server's side.
    SnapshotFailed,
    /// Any other failure on the server's side.
    Internal,
}

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadFilter => "bad_filter",
            ErrorCode::UnknownTable => "unknown_table",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::StreamBusy => "stream_busy",
            ErrorCode::StaleCursor => "stale_cursor",
            ErrorCode::Lagged => "lagged",
            ErrorCode::SchemaChanged => "schema_changed",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::SourceStopped => "source_stopped",
            ErrorCode::SourceUnavailable => "source_unavailable",
            ErrorCode::SourceInterrupted => "source_interrupted",
            ErrorCode::LogUnavailable => "log_unavailable",
            ErrorCode::NoSuchTable => "no_such_table",
            ErrorCode::SnapshotTimeout => "snapshot_timeout",
            ErrorCode::SnapshotFailed => "snapshot_failed",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status of a response with this code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::BadRequest | ErrorCode::BadFilter | ErrorCode::UnknownTable => {
                StatusCode::BAD_REQUEST
            }
            // A table dropped while its initial state was read.
            ErrorCode::NotFound | ErrorCode::NoSuchTable => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Conflict
            | ErrorCode::StreamBusy
            | ErrorCode::Lagged
            | ErrorCode::SchemaChanged => StatusCode::CONFLICT,
            ErrorCode::StaleCursor => StatusCode::GONE,
            ErrorCode::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ShuttingDown
            | ErrorCode::ServerBusy
            | ErrorCode::SourceStopped
            | ErrorCode::SourceUnavailable
            | ErrorCode::SourceInterrupted
            | ErrorCode::LogUnavailable
            // The pipeline did not pass the snapshot's watermark in time (no member
            // leads, or it is far behind): worth retrying.
            | ErrorCode::SnapshotTimeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::SnapshotFailed
            | ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What a client is told instead of the error's text, for failures on the server's
    /// side: their text can name the database's `user@host:port/db` or quote SQL, which
    /// stay in the server's log.
    pub fn withheld_message(self) -> Option<&'static str> {
        match self {
            ErrorCode::Internal => Some("internal error (details are in the server's log)"),
            ErrorCode::SourceStopped => {
                Some("the change source stopped (details are in the server's log)")
            }
            ErrorCode::SnapshotFailed => {
                Some("reading the initial state failed (details are in the server's log)")
            }
            ErrorCode::LogUnavailable => Some(
                "the event log cannot be reached right now; retry (details are in the server's log)",
            ),
            _ => None,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
