//! `GET /v1/subscribe`: an ephemeral, filtered subscription over SSE or WebSocket.
//!
//! At-most-once from now on (README, "Delivery guarantees"): the first item is `initialized`; a
//! client that reads too slowly fills its queue in the hub and is cut off with a `lagged`
//! error item, so it never slows the others or the slot. With `initialState=true` the
//! matching rows come first (`snapshot` items), then `snapshotComplete`, then the changes
//! after them. A filter that pins one row by its primary key ends with `completed`, after
//! which the connection closes normally (see README.md, "Filters and subscriptions").

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::response::Response;
use futures::StreamExt;
use serde::Deserialize;

use super::auth::{Caller, ConnectionSlot};
use super::error::ApiError;
use super::metrics::TableGauge;
use super::session::{self, ready_frames, Out};
use super::Shared;
use crate::event::TableName;
use crate::hub::Subscription;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Params {
    table: Option<String>,
    filter: Option<String>,
    #[serde(default)]
    initial_state: bool,
    #[serde(default)]
    int8: super::columns::Int8Form,
}

pub(super) async fn subscribe(
    State(state): State<Shared>,
    caller: Caller,
    Query(params): Query<Params>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (table, filter) = match &caller.token {
        Some(claims) => {
            if params.table.is_some() || params.filter.is_some() {
                return Err(ApiError::BadRequest(
                    "a token carries its table and filter: send only `token`".into(),
                ));
            }
            let table = claims.table.clone().ok_or_else(|| {
                ApiError::Forbidden("this token is for a stream, not a subscription".into())
            })?;
            (table, state.filter(claims.filter.clone())?)
        }
        None => {
            let table = params
                .table
                .as_deref()
                .ok_or_else(|| ApiError::BadRequest("`table` is required".into()))?;
            let table = TableName::parse_strict(table).map_err(ApiError::BadRequest)?;
            (table, state.filter_text(params.filter.as_deref())?)
        }
    };
    caller.check_table(&table)?;
    let int8 = state
        .int8_strings(params.int8, std::slice::from_ref(&table))
        .await?;
    let slot = state.cap.acquire(&caller.key)?;
    let options = crate::hub::SubscribeOptions {
        initial_state: params.initial_state,
    };
    let subscription = state
        .hub
        .subscribe_table(table.clone(), filter, options)
        .await?;
    tracing::info!(key = %caller.key.id(), table = %table, transport = if ws.is_ok() { "ws" } else { "sse" }, "subscription opened");
    let tasks = state.tasks.clone();
    let (stop, keepalive) = (state.stop.clone(), state.keepalive);
    Ok(session::respond(
        &tasks,
        stop,
        keepalive,
        ws,
        None,
        move |out| run(state, subscription, out, (slot, table.to_string()), int8),
    ))
}

/// Writes the subscription's items to the client until it ends, the client leaves or
/// the server stops.
async fn run(
    state: Shared,
    mut sub: Subscription,
    mut out: Out,
    (_slot, table): (ConnectionSlot, String),
    int8: super::columns::Int8Strings,
) {
    let _gauge = TableGauge::new(&state.metrics, table);
    loop {
        let item = tokio::select! {
            biased;
            _ = out.closed() => break,
            item = sub.next() => item,
        };
        if !out
            .batch(ready_frames(item, &mut sub, &int8), &state.metrics)
            .await
        {
            break;
        }
    }
    out.finish().await;
}
