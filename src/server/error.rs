//! The API's errors: one enum, each variant with a stable wire code ([`ErrorCode`]), which
//! gives its HTTP status.
//!
//! Every failure leaves the server as `{"error": {"code": "...", "message": "..."}}` (or, on
//! an open event stream, as an `error` item with the same object). Codes are a contract:
//! clients branch on them, so add new ones rather than renaming.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{report, ErrorCode, TableError};
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

impl From<TableError> for ApiError {
    fn from(e: TableError) -> Self {
        StoreError::Table(e).into()
    }
}

impl From<SubscriptionError> for ApiError {
    fn from(e: SubscriptionError) -> Self {
        ApiError::Subscription(Box::new(e))
    }
}

impl ApiError {
    /// The stable code for the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::TokenExpired => ErrorCode::TokenExpired,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::BadRequest(_) => ErrorCode::BadRequest,
            ApiError::BadFilter(_) => ErrorCode::BadFilter,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::TooManyConnections(_) => ErrorCode::TooManyConnections,
            ApiError::TooLarge(_) => ErrorCode::PayloadTooLarge,
            ApiError::ShuttingDown => ErrorCode::ShuttingDown,
            ApiError::Busy(_) => ErrorCode::ServerBusy,
            ApiError::Store(e) => e.code(),
            ApiError::Subscription(e) => e.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code().status()
    }

    /// What the client is told: the error and its causes, or only the code's text for a
    /// failure on the server's side (the database, the change source), whose details stay
    /// in the server's log.
    pub fn public_message(&self) -> String {
        match self.code().withheld_message() {
            Some(text) => text.to_owned(),
            None => report(self),
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
pub fn error_body(code: ErrorCode, message: &str) -> serde_json::Value {
    json!({"code": code.as_str(), "message": message})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = %self.code(), error = %report(&self), "request failed");
        } else {
            tracing::debug!(code = %self.code(), error = %report(&self), "request refused");
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
        assert_eq!(corrupt.code(), ErrorCode::Internal);
        let told = corrupt.body().to_string();
        assert!(
            !told.contains("db.internal") && !told.contains("SQLSTATE"),
            "{told}"
        );
        let refused = ApiError::BadRequest("limit must be a number".into());
        assert_eq!(refused.public_message(), "limit must be a number");
    }
}
