//! The API's errors: one enum, each variant with a stable wire code and an HTTP status.
//!
//! Every failure leaves the server as `{"error": {"code": "...", "message": "..."}}` (or, on
//! an open event stream, as an `error` item with the same object). Codes are a contract:
//! clients branch on them, so add new ones rather than renaming.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::hub::SubscriptionError;
use crate::log::StoreError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "missing or invalid credentials: send `Authorization: Bearer <key>` or a valid `token`"
    )]
    Unauthorized,
    #[error("the token has expired: ask for a new one (POST /v1/tokens)")]
    TokenExpired,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("bad filter: {0}")]
    BadFilter(String),
    #[error("{0}")]
    NotFound(String),
    #[error("table {0} is not one of the source's published tables")]
    NotPublished(crate::event::TableName),
    #[error("too many open connections for this key (at most {0}): close some first")]
    TooManyConnections(usize),
    #[error("the request body is too large (at most {0} bytes)")]
    TooLarge(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the server has {0} open connections, its limit: retry later")]
    Busy(usize),
    // Boxed: these are large, and every handler returns this type.
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error(transparent)]
    Subscription(Box<SubscriptionError>),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(Box::new(e))
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> Self {
        ApiError::Subscription(Box::new(e))
    }
}

impl ApiError {
    /// The stable code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::TokenExpired => "token_expired",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::BadFilter(_) => "bad_filter",
            ApiError::NotFound(_) => "not_found",
            ApiError::NotPublished(_) => "unknown_table",
            ApiError::TooManyConnections(_) => "too_many_connections",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Busy(_) => "server_busy",
            ApiError::Store(e) => e.code(),
            ApiError::Subscription(e) => e.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.code() {
            "unauthorized" | "token_expired" => StatusCode::UNAUTHORIZED,
            "forbidden" => StatusCode::FORBIDDEN,
            "bad_request" | "bad_filter" | "unknown_table" => StatusCode::BAD_REQUEST,
            "not_found" => StatusCode::NOT_FOUND,
            "stream_busy" | "conflict" => StatusCode::CONFLICT,
            "stale_cursor" => StatusCode::GONE,
            "too_many_connections" => StatusCode::TOO_MANY_REQUESTS,
            "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "shutting_down" | "source_stopped" | "source_unavailable" | "server_busy" => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            "source_interrupted" => StatusCode::SERVICE_UNAVAILABLE,
            "lagged" => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client is told. A failure on the server's side (the database, the
    /// change source) is told only by its code: its text can name the database's
    /// `user@host:port/db` or quote SQL, which stay in the server's log.
    pub fn public_message(&self) -> String {
        match self.code() {
            "internal" => "internal error (details are in the server's log)".into(),
            "source_stopped" => {
                "the change source stopped (details are in the server's log)".into()
            }
            "snapshot_failed" => {
                "reading the initial state failed (details are in the server's log)".into()
            }
            _ => self.to_string(),
        }
    }

    /// The error object, as in the body of an error response and in `error` stream items.
    pub fn body(&self) -> serde_json::Value {
        error_body(self.code(), &self.public_message())
    }
}

/// A JSON request body, or the error that says what is wrong with it.
pub fn json_body<T>(
    body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
    max_bytes: usize,
) -> Result<T, ApiError> {
    match body {
        Ok(axum::Json(value)) => Ok(value),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::TooLarge(max_bytes)),
        Err(e) => Err(ApiError::BadRequest(e.body_text())),
    }
}

/// `{"code": ..., "message": ...}`, the one shape of every error on the wire.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({"code": code, "message": message})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        (status, axum::Json(json!({"error": self.body()}))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_failures_keep_their_text_in_the_log() {
        let corrupt = ApiError::from(StoreError::Corrupt {
            position: "postgres@db.internal:5432/app".into(),
            message: "ERROR: relation (SQLSTATE 42P01)".into(),
        });
        assert_eq!(corrupt.code(), "internal");
        let told = corrupt.body().to_string();
        assert!(
            !told.contains("db.internal") && !told.contains("SQLSTATE"),
            "{told}"
        );
        let refused = ApiError::BadRequest("limit must be a number".into());
        assert_eq!(refused.public_message(), "limit must be a number");
    }
}
