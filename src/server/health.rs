//! What an operator polls: `/healthz` (role, replication state) and `/metrics`, both read
//! from Postgres at request time.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::metrics::Replication;
use super::{AppState, Shared};

/// Reads the slot's lag and the log's size; `None` fields when Postgres could not say.
pub(super) async fn replication(state: &AppState) -> Replication {
    let mut r = Replication {
        connected: false,
        ..Replication::default()
    };
    // While the pipeline streams, the walsender's own measure: how long the WAL it sent
    // waited for the pipeline's confirmation (NULL once caught up and idle). WAL keeps
    // growing on an idle server (checkpoints, other databases), so the byte lag alone
    // does not tell that anything is waiting.
    let mut flush_lag = None;
    if let Ok(client) = state.catalog_db().get().await {
        if let Ok(Some(slot)) = crate::source::setup::slot_state(&client, &state.slot).await {
            r.connected = slot.active_pid.is_some()
                && state
                    .pipeline_running
                    .load(std::sync::atomic::Ordering::Relaxed);
            r.lag_bytes = slot.lag_bytes;
            if let (true, Some(pid)) = (r.connected, slot.active_pid) {
                flush_lag = client
                    .query_opt(
                        "SELECT coalesce(extract(epoch FROM flush_lag)::float8, 0)
                         FROM pg_stat_replication WHERE pid = $1",
                        &[&pid],
                    )
                    .await
                    .ok()
                    .flatten()
                    .map(|row| row.get::<_, f64>(0));
            }
        }
    }
    if let Ok(client) = state.store.get().await {
        let row = client
            .query_one(
                "SELECT pg_total_relation_size('waltap.events'),
                        (SELECT extract(epoch FROM now() - (event->'tx'->>'committedAt')::timestamptz)::float8
                         FROM waltap.events WHERE source = $1
                         ORDER BY commit_lsn DESC, ordinal DESC LIMIT 1)",
                &[&state.slot],
            )
            .await;
        if let Ok(row) = row {
            r.log_bytes = row.get(0);
            let newest_age: Option<f64> = row.get(1);
            r.lag_seconds = match (r.lag_bytes, flush_lag) {
                (Some(0), _) => Some(0.0),
                (Some(_), Some(lag)) => Some(lag.max(0.0)),
                // Not streaming: how old the log's newest event is.
                (Some(_), None) => Some(newest_age.unwrap_or(0.0).max(0.0)),
                (None, _) => None,
            };
        }
    }
    r
}

pub(super) async fn healthz(State(state): State<Shared>) -> Response {
    let r = replication(&state).await;
    let hub = state.hub.is_streaming();
    // A follower serves from the log while another member appends: it needs the store
    // and a leader (whose lock it sees), not the slot itself.
    let membership = &state.metrics.membership;
    let leader = match state.store.get().await {
        Ok(client) => crate::log::leader::current_leader(&client, &state.slot)
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    let pipeline = state
        .pipeline_running
        .load(std::sync::atomic::Ordering::Relaxed)
        && if membership.is_leader() {
            r.connected
        } else {
            leader.as_ref().is_some_and(|l| l.active)
        };
    let healthy = pipeline && r.lag_bytes.is_some() && hub;
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "role": membership.role(),
        "term": membership.term(),
        "leader": leader,
        "replication": r,
        "subscriptions": {"streaming": hub},
    });
    if !hub {
        body["reason"] =
            "the subscription hub cannot read the event log and is reconnecting".into();
    }
    (status, Json(body)).into_response()
}

pub(super) async fn metrics_text(
    State(state): State<Shared>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    let r = replication(&state).await;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&r, state.store.pool.status()),
    )
        .into_response())
}
