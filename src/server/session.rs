//! One client's delivery connection: frames and transports shared by subscriptions and
//! streams.
//!
//! An item becomes one [`Frame`] (serialized once), written either as a Server-Sent Event
//! (`id:` position, `event:` `change` or the control item's type, `data:` the JSON object)
//! or as one WebSocket text message holding the same JSON object. The items a source has
//! ready together go out in one write ([`ready_frames`], [`Out::batch`]). Writing waits for the
//! client (backpressure reaches the hub, which cuts a slow subscriber off with `lagged`),
//! but never past the server's shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::{error_body, ApiError};
use super::metrics::Metrics;
use crate::error::{report, ErrorCode};
use crate::hub::SubscriptionItem;
use crate::log::streams::Cursor;

/// Writes buffered between a session task and its SSE response body (each holds one or
/// more events: see [`Out::items`]).
const SSE_BUFFER: usize = 16;
/// The SSE keepalive: a comment line.
const SSE_KEEPALIVE: &[u8] = b":\n\n";
/// The largest WebSocket message (and frame) a client may send: clients send only small
/// control messages (`{"ack": ...}`), so a larger one closes the connection.
pub const MAX_CLIENT_MESSAGE: usize = 4 * 1024;

/// One item, ready for either transport.
pub struct Frame {
    /// The cursor the client holds after this item (SSE `id`).
    id: Option<Cursor>,
    kind: &'static str,
    data: String,
    is_change: bool,
}

impl Frame {
    pub fn item<R: Serialize>(item: &SubscriptionItem<R>) -> Frame {
        let (kind, is_change) = match item {
            SubscriptionItem::Initialized { .. } => ("initialized", false),
            SubscriptionItem::SnapshotComplete { .. } => ("snapshotComplete", false),
            SubscriptionItem::Completed { .. } => ("completed", false),
            SubscriptionItem::SchemaChange { .. } => ("schemaChange", false),
            SubscriptionItem::Snapshot(_) => ("snapshot", false),
            SubscriptionItem::Event(_) => ("change", true),
        };
        Frame {
            // A stream's initial-state rows have `snapshot-<seq>` ids, so that a client
            // reconnecting in the middle of them resumes after the last one it has.
            id: Cursor::after(item),
            kind,
            data: serde_json::to_string(item).unwrap_or_default(),
            is_change,
        }
    }

    /// [`Frame::item`], with the `int8` values of its rows as strings when asked for.
    pub fn item_with<R: Serialize>(
        item: &SubscriptionItem<R>,
        int8: &super::columns::Int8Strings,
    ) -> Frame {
        let mut frame = Frame::item(item);
        if !int8.is_empty() && frame.kind != "error" {
            if let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&frame.data) {
                int8.apply(&mut value);
                frame.data = value.to_string();
            }
        }
        frame
    }

    /// An `error` item: `{"type": "error", "error": {"code", "message"}}`.
    pub fn error(code: ErrorCode, message: &str) -> Frame {
        let data = serde_json::json!({"type": "error", "error": error_body(code, message)});
        Frame {
            id: None,
            kind: "error",
            data: data.to_string(),
            is_change: false,
        }
    }

    /// Appends the frame as one Server-Sent Event.
    fn write_sse(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        if let Some(id) = &self.id {
            // Writing to a Vec cannot fail.
            let _ = writeln!(out, "id: {id}");
        }
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.kind.as_bytes());
        out.push(b'\n');
        // JSON has no raw line breaks; the split keeps the event well-formed regardless.
        for line in self.data.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}

/// The client went away, or the server is shutting down.
pub struct Closed;

/// Most items sent to a client in one write.
const MAX_FRAMES_PER_WRITE: usize = 256;

/// How the items of one write ended.
pub enum Batch<E> {
    /// The source may have more later.
    Open,
    /// The source ended.
    Ended,
    /// The source failed after the items before.
    Failed(E),
}

/// The frames of `first` (what the source's `next` gave) and of the items `source` has
/// ready now, for one [`Out::items`] write: a backlog then costs a write per batch, not
/// per event, and a live item goes out at once (nothing waits for more).
pub fn ready_frames<R, E, S>(
    first: Option<Result<SubscriptionItem<R>, E>>,
    source: &mut S,
    int8: &super::columns::Int8Strings,
) -> (Vec<Frame>, Batch<E>)
where
    R: Serialize,
    S: Stream<Item = Result<SubscriptionItem<R>, E>> + Unpin,
{
    use futures::FutureExt as _;
    let mut frames = Vec::new();
    let mut next = Some(first);
    while let Some(item) = next {
        match item {
            None => return (frames, Batch::Ended),
            Some(Err(e)) => return (frames, Batch::Failed(e)),
            Some(Ok(item)) => frames.push(Frame::item_with(&item, int8)),
        }
        if frames.len() == MAX_FRAMES_PER_WRITE {
            break;
        }
        next = source.next().now_or_never();
    }
    (frames, Batch::Open)
}

/// Where a session writes.
pub enum Out {
    Sse {
        tx: mpsc::Sender<Bytes>,
        stop: CancellationToken,
    },
    Ws {
        sink: SplitSink<WebSocket, Message>,
        /// Cancelled when the client closes its side (see [`read_ws`]).
        gone: CancellationToken,
        stop: CancellationToken,
    },
}

/// An SSE response fed by the returned [`Out`], with a comment line after each
/// `keepalive` without a write.
pub fn sse(stop: CancellationToken, keepalive: Duration) -> (Out, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
    let body = futures::stream::unfold(rx, move |mut rx| async move {
        let chunk = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return None,
            Err(_) => Bytes::from_static(SSE_KEEPALIVE),
        };
        Some((Ok::<_, Infallible>(chunk), rx))
    });
    let response = (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response();
    (Out::Sse { tx, stop }, response)
}

/// Answers a delivery request: upgrades to a WebSocket when the client asked for one, else
/// opens an SSE response. `run` then drives the session in a task that shutdown waits for.
pub fn respond<F, Fut>(
    tasks: &TaskTracker,
    stop: CancellationToken,
    keepalive: Duration,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    inbound: Option<mpsc::Sender<Inbound>>,
    run: F,
) -> Response
where
    F: FnOnce(Out) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match upgrade {
        Ok(upgrade) => {
            let tasks = tasks.clone();
            upgrade
                .max_message_size(MAX_CLIENT_MESSAGE)
                .max_frame_size(MAX_CLIENT_MESSAGE)
                .on_upgrade(move |socket| {
                    tasks.track_future(async move { run(ws(socket, stop, inbound)).await })
                })
                .into_response()
        }
        Err(_) => {
            let (out, response) = sse(stop, keepalive);
            tasks.spawn(run(out));
            response
        }
    }
}

impl Out {
    /// Sends the frames of several items in order, counting changes as delivered. Over
    /// SSE they go as one write: a backlog read one event per write cost a wake-up of
    /// the response's task (and often of a thread) per event, more than the event.
    async fn items(&mut self, frames: Vec<Frame>, metrics: &Metrics) -> Result<(), Closed> {
        let changes = frames.iter().filter(|f| f.is_change).count() as u64;
        self.write(frames).await?;
        metrics.events_out.fetch_add(changes, Ordering::Relaxed);
        Ok(())
    }

    /// Writes a batch of [`ready_frames`], then, when its source ended or failed, the
    /// error item that ends the session. Returns whether the session goes on.
    pub async fn batch<E: Into<ApiError>>(
        &mut self,
        (frames, end): (Vec<Frame>, Batch<E>),
        metrics: &Metrics,
    ) -> bool {
        if !frames.is_empty() && self.items(frames, metrics).await.is_err() {
            return false;
        }
        match end {
            Batch::Open => true,
            Batch::Ended => false,
            Batch::Failed(e) => {
                self.fail(&e.into(), metrics).await;
                false
            }
        }
    }

    /// Sends an `error` item (the last of a session, unless it refused one client
    /// message), counting it.
    pub async fn fail(&mut self, error: &ApiError, metrics: &Metrics) {
        metrics.errors.fetch_add(1, Ordering::Relaxed);
        if error.status().is_server_error() {
            tracing::warn!(code = %error.code(), error = %report(error), "delivery failed");
        } else {
            tracing::debug!(code = %error.code(), error = %report(error), "delivery refused");
        }
        let _ = self
            .send(Frame::error(error.code(), &error.public_message()))
            .await;
    }

    pub async fn send(&mut self, frame: Frame) -> Result<(), Closed> {
        self.write(vec![frame]).await
    }

    async fn write(&mut self, frames: Vec<Frame>) -> Result<(), Closed> {
        match self {
            Out::Sse { tx, stop } => {
                let mut text = Vec::with_capacity(frames.iter().map(|f| f.data.len() + 64).sum());
                frames.iter().for_each(|f| f.write_sse(&mut text));
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => Err(Closed),
                    sent = tx.send(Bytes::from(text)) => sent.map_err(|_| Closed),
                }
            }
            Out::Ws { sink, stop, gone } => {
                let feed = async {
                    for f in frames {
                        sink.feed(Message::Text(f.data.into())).await?;
                    }
                    sink.flush().await
                };
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => Err(Closed),
                    _ = gone.cancelled() => Err(Closed),
                    sent = feed => sent.map_err(|_| Closed),
                }
            }
        }
    }

    /// Resolves when the client has gone or the server stops.
    pub async fn closed(&self) {
        match self {
            Out::Sse { tx, stop } => tokio::select! {
                _ = tx.closed() => {}
                _ = stop.cancelled() => {}
            },
            Out::Ws { gone, stop, .. } => tokio::select! {
                _ = gone.cancelled() => {}
                _ = stop.cancelled() => {}
            },
        }
    }

    /// Ends the connection cleanly: the SSE body ends when the sender drops; a WebSocket
    /// gets a close frame.
    pub async fn finish(self) {
        if let Out::Ws { mut sink, .. } = self {
            let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
        }
    }
}

/// A request to acknowledge, from a WebSocket client (`{"ack": cursor}`) or from
/// `POST /v1/streams/{name}/ack` while this process serves the stream's consumer.
pub enum Inbound {
    Ack {
        cursor: Cursor,
        reply: Option<oneshot::Sender<Result<(), ApiError>>>,
    },
    /// A client message that is not an ack: answered with a `bad_request` error item.
    Bad(String),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AckMessage {
    ack: Cursor,
}

/// Splits a WebSocket: the returned [`Out`] writes, and a task reads the client's messages
/// into `inbound` (when given) until the client closes, then cancels `gone`.
pub fn ws(
    socket: WebSocket,
    stop: CancellationToken,
    inbound: Option<mpsc::Sender<Inbound>>,
) -> Out {
    let (sink, stream) = socket.split();
    let gone = CancellationToken::new();
    tokio::spawn(read_ws(stream, inbound, gone.clone()));
    Out::Ws { sink, gone, stop }
}

async fn read_ws(
    mut stream: SplitStream<WebSocket>,
    inbound: Option<mpsc::Sender<Inbound>>,
    gone: CancellationToken,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some(inbound) = &inbound else { continue };
        let item = match serde_json::from_str::<AckMessage>(&text) {
            Ok(m) => Inbound::Ack {
                cursor: m.ack,
                reply: None,
            },
            Err(e) => Inbound::Bad(format!(
                "expected {{\"ack\": \"<position or snapshot-<seq>>\"}}: {e}"
            )),
        };
        if inbound.send(item).await.is_err() {
            break;
        }
    }
    gone.cancel();
}
