//! `POST /v1/tokens`: short-lived signed tokens that open delivery for one table and
//! filter, or one stream, without handing out a key.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::{auth, error, streams, Shared};
use crate::event::TableName;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct TokenRequest {
    table: Option<String>,
    filter: Option<serde_json::Value>,
    stream: Option<String>,
    position: Option<crate::event::Position>,
    ttl_seconds: Option<u64>,
}

/// `POST /v1/tokens`: a signed token for one table and filter, or for one stream.
pub(super) async fn tokens(
    State(state): State<Shared>,
    caller: Caller,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    let req = error::json_body(body, state.limits.max_body_bytes)?;
    let ttl = req.ttl_seconds.unwrap_or(3600);
    if ttl == 0 || ttl > state.limits.max_token_ttl.as_secs() {
        return Err(ApiError::BadRequest(format!(
            "ttlSeconds must be between 1 and {}",
            state.limits.max_token_ttl.as_secs()
        )));
    }
    let table = req
        .table
        .as_deref()
        .map(TableName::parse_strict)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    match (&table, &req.stream) {
        (Some(table), None) => {
            state.check_published(&caller, table).await?;
            let filter = state.filter(req.filter.clone())?;
            state.check_filter_columns(table, filter.as_ref()).await?;
        }
        (None, Some(name)) => {
            if req.filter.is_some() {
                return Err(ApiError::BadRequest(
                    "a stream token takes no filter: the stream has its own".into(),
                ));
            }
            streams::authorize_delivery(&state, &caller, name).await?;
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either `table` (with an optional `filter`) or `stream`".into(),
            ))
        }
    }
    let exp = auth::now_secs() + ttl;
    let claims = auth::Claims {
        key: caller.key.id(),
        table,
        filter: req.filter,
        stream: req.stream,
        position: req.position,
        exp,
    };
    tracing::info!(key = %claims.key, ttl, "token issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": state.keys.sign(&claims), "expiresAt": exp})),
    )
        .into_response())
}
