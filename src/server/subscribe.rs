//! `GET /v1/subscribe`: an ephemeral, filtered subscription over SSE or WebSocket.
//!
//! At-most-once from now on (DESIGN.md section 4): the first item is `initialized`; a
//! client that reads too slowly fills its queue in the hub and is cut off with a `lagged`
//! error item, so it never slows the others or the slot.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use super::auth::{Caller, ConnectionSlot};
use super::error::ApiError;
use super::metrics::SubscriberGauge;
use super::session::{self, Frame, Out};
use super::Shared;
use crate::event::TableName;
use crate::hub::Subscription;

#[derive(Deserialize)]
pub(super) struct Params {
    table: Option<String>,
    filter: Option<String>,
    #[allow(dead_code)] // read by the Caller extractor
    token: Option<String>,
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
                .clone()
                .ok_or_else(|| ApiError::BadRequest("`table` is required".into()))?;
            (table, state.filter_text(params.filter.as_deref())?)
        }
    };
    let table = TableName::parse(&table);
    caller.check_table(&table)?;
    let slot = state.cap.acquire(&caller.key)?;
    let subscription = state.hub.subscribe(&table.to_string(), filter).await?;
    tracing::info!(key = %caller.key.id(), table = %table, transport = if ws.is_ok() { "ws" } else { "sse" }, "subscription opened");
    let stop = state.stop.clone();
    Ok(match ws {
        Ok(upgrade) => {
            let tasks = state.tasks.clone();
            upgrade
                .on_upgrade(move |socket| {
                    tasks.track_future(async move {
                        let out = session::ws(socket, stop, None);
                        run(state, subscription, out, slot).await;
                    })
                })
                .into_response()
        }
        Err(_) => {
            let (out, response) = session::sse(stop, state.keepalive);
            state
                .tasks
                .spawn(run(state.clone(), subscription, out, slot));
            response.into_response()
        }
    })
}

/// Writes the subscription's items to the client until it ends, the client leaves or
/// the server stops.
async fn run(state: Shared, mut sub: Subscription, mut out: Out, _slot: ConnectionSlot) {
    let _gauge = SubscriberGauge::new(&state.metrics);
    loop {
        let item = tokio::select! {
            biased;
            _ = out.closed() => break,
            item = sub.next() => item,
        };
        let frame = match item {
            None => break,
            Some(Ok(item)) => Frame::item(&item),
            Some(Err(e)) => {
                state
                    .metrics
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = out.send(Frame::error(e.code(), &e.to_string())).await;
                break;
            }
        };
        let change = frame.is_change;
        if out.send(frame).await.is_err() {
            break;
        }
        if change {
            state
                .metrics
                .events_out
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    out.finish().await;
}
