//! `/v1/streams`: manage persisted streams and consume them over SSE, WebSocket or the
//! pull feed.
//!
//! Rights: a key needs `streams = true`, and may see, consume or delete only streams
//! whose every table it may read (others are left out of its listing). A consumer takes
//! the stream's lease (`stream_busy` while another holds it). Acknowledgement:
//!
//! - SSE: `Last-Event-ID` on reconnect acknowledges everything up to it (events up to it
//!   are not sent again), and `POST /v1/streams/{name}/ack` acknowledges while connected;
//! - WebSocket: the client sends `{"ack": cursor}`;
//! - feed: the `cursor` of a request acknowledges everything up to it.
//!
//! A cursor is a change's position, or `snapshot-<seq>` for the rows of a stream's initial
//! state ([`Cursor`]), so that a client resumes in the middle of those too.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::auth::{Caller, ConnectionSlot};
use super::columns::{Int8Form, Int8Strings};
use super::error::{self, ApiError};
use super::metrics::SubscriberGauge;
use super::session::{self, ready_frames, Frame, Inbound, Out};
use super::{AppState, Shared};
use crate::event::{Position, TableName};
use crate::log::streams::{
    self, Cursor, OpenOptions, StreamConsumer, StreamDef, StreamInfo, StreamItem,
};
use crate::log::StoreError;

/// Checks that the caller may use stream `name` and returns it. A token opens only the
/// stream it names. A stream the key may not read is answered as one that does not
/// exist, so a key learns nothing of others' streams.
pub(super) async fn authorize(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<StreamInfo, ApiError> {
    caller.check_streams()?;
    if let Some(claims) = &caller.token {
        if claims.stream.as_deref() != Some(name) {
            return Err(ApiError::Forbidden(format!(
                "this token does not open stream {name:?}"
            )));
        }
    }
    // A name no stream can have (a NUL, a path segment like `..`) is not looked up.
    streams::check_name(name)?;
    let store = state.store.get().await?;
    let info = streams::find(&store, name).await?;
    if !readable(caller, &info) {
        return Err(StoreError::NoSuchStream(name.to_owned()).into());
    }
    Ok(info)
}

/// [`authorize`], and every table of the stream is published: streams made before only
/// published tables were accepted may name others, which are not delivered.
pub(super) async fn authorize_delivery(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<StreamInfo, ApiError> {
    let info = authorize(state, caller, name).await?;
    for t in &info.tables {
        state.check_published(caller, &TableName::parse(t)).await?;
    }
    Ok(info)
}

fn readable(caller: &Caller, info: &StreamInfo) -> bool {
    info.tables
        .iter()
        .all(|t| caller.key.tables.allows(&TableName::parse(t)))
}

pub(super) async fn list(
    State(state): State<Shared>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    caller.check_streams()?;
    let store = state.store.get().await?;
    let all = streams::list(state.consumer_pool.log(), &store, Some(&state.slot)).await?;
    let visible: Vec<StreamInfo> = all.into_iter().filter(|s| readable(&caller, s)).collect();
    Ok(Json(json!({"streams": visible})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct CreateRequest {
    name: String,
    table: String,
    filter: Option<serde_json::Value>,
    /// Start with the current rows, then the changes after them.
    #[serde(default)]
    initial_state: bool,
    /// Deliver the changes after this position instead of those from now on.
    from: Option<Position>,
}

pub(super) async fn create(
    State(state): State<Shared>,
    caller: Caller,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    caller.check_streams()?;
    let req = error::json_body(body, state.limits.max_body_bytes)?;
    let table = TableName::parse_strict(&req.table).map_err(ApiError::BadRequest)?;
    state.check_published(&caller, &table).await?;
    let filter = state.filter(req.filter)?;
    let store = state.store.get().await?;
    let catalog = state.catalog_db().get().await?;
    let def = StreamDef {
        name: req.name,
        source: state.slot.clone(),
        // The stored text reads back as this very table (see TableName's Display).
        tables: vec![table.to_string()],
        filter,
        initial_state: req.initial_state,
        from: req.from,
    };
    let info = streams::create(state.consumer_pool.log(), &store, &catalog, &def).await?;
    tracing::info!(key = %caller.key.id(), stream = %info.name, "stream created");
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

pub(super) async fn delete(
    State(state): State<Shared>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    authorize(&state, &caller, &name).await?;
    let store = state.store.get().await?;
    streams::delete(&store, &name).await?;
    tracing::info!(key = %caller.key.id(), stream = %name, "stream deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ResetRequest {
    #[serde(default)]
    initial_state: bool,
}

/// `POST /v1/streams/{name}/reset`: the cursor moves to the log head (what to do after
/// `stale_cursor`); with `initialState` the stream starts over with the current rows.
pub(super) async fn reset(
    State(state): State<Shared>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Json<ResetRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    let req = match body {
        // An empty body is a plain reset.
        Err(JsonRejection::MissingJsonContentType(_)) => ResetRequest::default(),
        body => error::json_body(body, state.limits.max_body_bytes)?,
    };
    authorize(&state, &caller, &name).await?;
    let store = state.store.get().await?;
    let info = streams::reset(state.consumer_pool.log(), &store, &name, req.initial_state).await?;
    tracing::info!(key = %caller.key.id(), stream = %name, initial_state = req.initial_state, "stream reset");
    Ok(Json(info).into_response())
}

/// Opens the stream for a consumer: its connection slot and lease, then an
/// acknowledgement of `resume` (everything up to it is handled).
async fn open(
    state: &AppState,
    caller: &Caller,
    name: &str,
    resume: Option<Cursor>,
    page_size: Option<usize>,
) -> Result<(StreamConsumer, ConnectionSlot, StreamInfo), ApiError> {
    let info = authorize_delivery(state, caller, name).await?;
    let slot = state.cap.acquire(&caller.key)?;
    let options = OpenOptions {
        catalog: state.catalog.as_ref().map(|db| db.config.clone()),
        page_size: page_size.unwrap_or(streams::DEFAULT_PAGE_SIZE),
        acknowledged: resume,
        ..OpenOptions::default()
    };
    let consumer =
        streams::open_pooled(&state.consumer_pool, &state.store.config, name, options).await?;
    Ok((consumer, slot, info))
}

/// [`open`] for delivery, with the `int8` columns of the stream's tables when the request
/// asked for them as strings (when they cannot be read, the consumer is closed again).
async fn open_delivery(
    state: &AppState,
    caller: &Caller,
    name: &str,
    resume: Option<Cursor>,
    page_size: Option<usize>,
    form: Int8Form,
) -> Result<(StreamConsumer, ConnectionSlot, Int8Strings), ApiError> {
    let (consumer, slot, info) = open(state, caller, name, resume, page_size).await?;
    let tables: Vec<TableName> = info.tables.iter().map(|t| TableName::parse(t)).collect();
    match state.int8_strings(form, &tables).await {
        Ok(int8) => Ok((consumer, slot, int8)),
        Err(e) => {
            consumer.close().await;
            Err(e)
        }
    }
}

/// Query parameters of a delivery connection (besides `token`).
#[derive(Deserialize)]
pub(super) struct DeliveryParams {
    #[serde(default)]
    int8: Int8Form,
}

/// `resume` from a header value or a token.
fn resume_position(caller: &Caller, given: Option<&str>) -> Result<Option<Cursor>, ApiError> {
    match given {
        Some(text) => text.parse().map(Some).map_err(ApiError::BadRequest),
        None => Ok(caller
            .token
            .as_ref()
            .and_then(|c| c.position)
            .map(Cursor::Position)),
    }
}

/// `GET /v1/streams/{name}`: SSE (or WebSocket upgrade) from the stream's cursor, or with
/// `Accept: application/json` the stream's description.
pub(super) async fn consume(
    State(state): State<Shared>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(params): Query<DeliveryParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ws.is_err() && accept.contains("application/json") && !accept.contains("text/event-stream") {
        authorize(&state, &caller, &name).await?;
        let store = state.store.get().await?;
        return Ok(
            Json(streams::get(state.consumer_pool.log(), &store, &name).await?).into_response(),
        );
    }
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let resume = resume_position(&caller, last_event_id.filter(|s| !s.is_empty()))?;
    let (consumer, slot, int8) =
        open_delivery(&state, &caller, &name, resume, None, params.int8).await?;
    let (acks, inbound) = mpsc::channel(16);
    let session = state.next_session.fetch_add(1, Ordering::Relaxed);
    state
        .consumers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), (session, acks.clone()));
    tracing::info!(key = %caller.key.id(), stream = %name, transport = if ws.is_ok() { "ws" } else { "sse" }, "stream consumer opened");
    let job = Job {
        name,
        session,
        consumer,
        inbound,
        int8,
        _slot: slot,
    };
    // SSE clients acknowledge through `POST .../ack`, which holds its own sender.
    let ws_acks = ws.is_ok().then_some(acks);
    let tasks = state.tasks.clone();
    let (stop, keepalive) = (state.stop.clone(), state.keepalive);
    Ok(session::respond(
        &tasks,
        stop,
        keepalive,
        ws,
        ws_acks,
        move |out| job.run(state, out),
    ))
}

/// One consumer's delivery to one client.
struct Job {
    name: String,
    session: u64,
    consumer: StreamConsumer,
    inbound: mpsc::Receiver<Inbound>,
    int8: Int8Strings,
    _slot: ConnectionSlot,
}

impl Job {
    async fn run(mut self, state: Shared, mut out: Out) {
        let _gauge = SubscriberGauge::new(&state.metrics);
        let mut inbound_open = true;
        loop {
            let item = tokio::select! {
                biased;
                _ = out.closed() => break,
                msg = self.inbound.recv(), if inbound_open => {
                    match msg {
                        Some(Inbound::Ack { cursor, reply }) => {
                            let result = self.consumer.acker().ack_cursor(cursor).await.map_err(ApiError::from);
                            // An ack ahead of delivery is refused and changes nothing: the
                            // session goes on (the client is told by its error item or its
                            // POST's answer).
                            let fatal = result.as_ref().is_err_and(|e| e.status() != StatusCode::BAD_REQUEST);
                            if let Err(e) = &result {
                                if reply.is_none() || fatal {
                                    out.fail(e, &state.metrics).await;
                                }
                            }
                            if let Some(reply) = reply {
                                let _ = reply.send(result);
                            }
                            if fatal {
                                break;
                            }
                        }
                        Some(Inbound::Bad(message)) => {
                            if out.send(Frame::error(crate::error::ErrorCode::BadRequest, &message)).await.is_err() {
                                break;
                            }
                        }
                        None => inbound_open = false,
                    }
                    continue;
                }
                item = self.consumer.next() => item,
            };
            let batch = ready_frames(item, &mut self.consumer, &self.int8);
            if !out.batch(batch, &state.metrics).await {
                break;
            }
        }
        {
            let mut consumers = state.consumers.lock().unwrap_or_else(|e| e.into_inner());
            if consumers
                .get(&self.name)
                .is_some_and(|(s, _)| *s == self.session)
            {
                consumers.remove(&self.name);
            }
        }
        self.consumer.close().await;
        out.finish().await;
        tracing::info!(stream = %self.name, "stream consumer closed");
    }
}

#[derive(Deserialize)]
pub(super) struct FeedParams {
    cursor: Option<String>,
    limit: Option<usize>,
    wait: Option<f64>,
    #[serde(default)]
    int8: Int8Form,
}

/// `GET /v1/streams/{name}/events`: the next events after `cursor` (which it
/// acknowledges), at most `limit`; waits up to `wait` seconds for the first one.
pub(super) async fn feed(
    State(state): State<Shared>,
    caller: Caller,
    Path(name): Path<String>,
    Query(params): Query<FeedParams>,
) -> Result<Response, ApiError> {
    let limit = params
        .limit
        .unwrap_or(100)
        .clamp(1, state.limits.max_feed_limit);
    let wait = params.wait.unwrap_or(0.0);
    if !(0.0..=state.limits.max_feed_wait.as_secs_f64()).contains(&wait) {
        return Err(ApiError::BadRequest(format!(
            "wait must be between 0 and {} seconds",
            state.limits.max_feed_wait.as_secs()
        )));
    }
    let resume = resume_position(&caller, params.cursor.as_deref())?;
    let (mut consumer, _slot, int8) =
        open_delivery(&state, &caller, &name, resume, Some(limit), params.int8).await?;
    let _gauge = SubscriberGauge::new(&state.metrics);
    let result = read_page(&state, &mut consumer, limit, Duration::from_secs_f64(wait)).await;
    let cursor = resume.unwrap_or_else(|| consumer.acknowledged());
    consumer.close().await;
    let items = result?;
    let cursor = items.iter().rev().find_map(Cursor::after).unwrap_or(cursor);
    let changes = items
        .iter()
        .filter(|i| matches!(i, StreamItem::Event(_)))
        .count();
    state
        .metrics
        .events_out
        .fetch_add(changes as u64, Ordering::Relaxed);
    if int8.is_empty() {
        // Serialized straight from the items: a page of 1,000 events turned into a JSON
        // value tree first cost more than reading them.
        #[derive(serde::Serialize)]
        struct Page<'a> {
            events: &'a [StreamItem],
            cursor: Cursor,
        }
        return Ok(Json(Page {
            events: &items,
            cursor,
        })
        .into_response());
    }
    let mut events = serde_json::to_value(&items).unwrap_or_default();
    if let serde_json::Value::Array(events) = &mut events {
        events.iter_mut().for_each(|e| int8.apply(e));
    }
    Ok(Json(json!({"events": events, "cursor": cursor})).into_response())
}

/// After the deadline, how often to look whether the reader has gone idle (it is then
/// waiting for appends, so nothing more is in the log).
const IDLE_CHECK: Duration = Duration::from_millis(5);
/// How long past the deadline a read in flight may take before the page is returned as is.
const IDLE_GRACE: Duration = Duration::from_secs(5);

/// Up to `limit` items (changes; while the stream hands out its initial state, its rows
/// and then `snapshotComplete`): waits for the first until `wait` has passed and the
/// reader has found nothing more in the log, then takes what is ready without waiting.
async fn read_page(
    state: &AppState,
    consumer: &mut StreamConsumer,
    limit: usize,
    wait: Duration,
) -> Result<Vec<StreamItem>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = Vec::new();
    loop {
        let item = tokio::select! {
            biased;
            _ = state.stop.cancelled() => break,
            item = consumer.next() => item,
            _ = tokio::time::sleep_until(deadline), if events.is_empty() => {
                // Nothing yet: return empty once the reader has caught up with the log.
                let mut waited = Duration::ZERO;
                loop {
                    if consumer.is_idle() || waited >= IDLE_GRACE {
                        return Ok(events);
                    }
                    let more = tokio::select! {
                        item = consumer.next() => Some(item),
                        _ = tokio::time::sleep(IDLE_CHECK) => None,
                    };
                    waited += IDLE_CHECK;
                    if let Some(item) = more {
                        break item;
                    }
                }
            }
        };
        match item {
            None => break,
            Some(Err(e)) if events.is_empty() => return Err(e.into()),
            // What was read is delivered; the error comes again on the next request.
            Some(Err(_)) => break,
            Some(Ok(item)) => {
                if paged(&item) {
                    events.push(item);
                }
            }
        }
        if events.len() >= limit {
            break;
        }
        if !events.is_empty() {
            // Take what the reader already holds, without another wait.
            while events.len() < limit {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(item))) => {
                        if paged(&item) {
                            events.push(item);
                        }
                    }
                    _ => break,
                }
            }
            break;
        }
    }
    Ok(events)
}

/// What a feed page holds: all but the `initialized` marker (the page's cursor says it).
fn paged(item: &StreamItem) -> bool {
    !matches!(item, StreamItem::Initialized { .. })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AckRequest {
    /// A change's position, or `snapshot-<seq>`.
    position: Cursor,
}

/// `POST /v1/streams/{name}/ack`: through the consumer this process serves, or by taking
/// the lease for the moment when no one holds it.
pub(super) async fn ack(
    State(state): State<Shared>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Json<AckRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = error::json_body(body, state.limits.max_body_bytes)?;
    authorize(&state, &caller, &name).await?;
    let live = state
        .consumers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&name)
        .map(|(_, tx)| tx.clone());
    if let Some(tx) = live {
        let (reply, answer) = oneshot::channel();
        let sent = tx
            .send(Inbound::Ack {
                cursor: req.position,
                reply: Some(reply),
            })
            .await;
        if sent.is_ok() {
            if let Ok(result) = answer.await {
                result?;
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    }
    let (consumer, _slot, _) = open(&state, &caller, &name, Some(req.position), Some(1)).await?;
    consumer.close().await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
