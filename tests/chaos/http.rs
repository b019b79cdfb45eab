//! Stream consumers over the HTTP API of `waltap serve`: Server-Sent Events, which resume
//! with `Last-Event-ID` and so must see each item exactly once, and WebSocket, which
//! acknowledges explicitly now and then and so sees again, after reconnecting, what it had
//! not acknowledged (skipped once by its replica).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

use super::consumers::{Control, Ctx, SharedReplica};
use super::procs::KEY;
use crate::support::prng::Prng;

/// One Server-Sent Event.
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON; `None` (a divergence, recorded) when it is not.
    pub fn json(&self, ctx: &Ctx, name: &str) -> Option<Json> {
        match serde_json::from_str(&self.data) {
            Ok(item) => Some(item),
            Err(e) => {
                ctx.trace
                    .fail(name, format!("SSE data {:?}: {e}", self.data));
                None
            }
        }
    }
}

/// Reads events from an SSE response body.
pub struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

/// A client for event streams: no overall timeout, they last.
pub fn sse_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `GET url` as an event stream, with the schedule's key.
pub fn sse_get(http: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    http.get(url)
        .bearer_auth(KEY)
        .header("accept", "text/event-stream")
}

impl SseReader {
    pub fn new(r: reqwest::Response) -> SseReader {
        SseReader {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event; `None` when the body ends or breaks.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => ev.id = Some(value.to_owned()),
                        "event" => ev.event = value.to_owned(),
                        "data" => {
                            if !ev.data.is_empty() {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(value);
                        }
                        _ => {} // comments: keepalives
                    }
                }
                if ev.data.is_empty() {
                    continue;
                }
                return Some(ev);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

/// What a delivery connection's answer or error item says to do.
enum Verdict {
    /// Go on (or connect again).
    Retry,
    /// The cursor is stale: reset with initial state.
    Reset,
    /// A divergence (recorded).
    Fail,
}

/// Judges an error code the server sent (as a status or an `error` item).
fn judge(ctx: &Ctx, name: &str, code: &str, what: String) -> Verdict {
    match code {
        "stale_cursor" => Verdict::Reset,
        // The lease of a connection the harness (or a SIGKILL) cut is still held; the
        // server is stopping or its source reconnecting.
        "stream_busy" | "shutting_down" | "source_unavailable" => Verdict::Retry,
        _ if ctx.forgive(name, what) => Verdict::Retry,
        _ => Verdict::Fail,
    }
}

fn error_code(body: &Json) -> String {
    body["error"]["code"].as_str().unwrap_or("?").to_owned()
}

/// `POST /v1/streams/NAME/reset {"initialState": true}` until it is done; false if it
/// failed (recorded).
pub async fn post_reset(
    ctx: &Ctx,
    http: &reqwest::Client,
    name: &str,
    replica: &SharedReplica,
    why: &str,
) -> bool {
    while !ctx.stop.is_cancelled() {
        let Some(base) = ctx.server().await else {
            return false;
        };
        let r = http
            .post(format!("{base}/v1/streams/{name}/reset"))
            .bearer_auth(KEY)
            .json(&json!({"initialState": true}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                ctx.trace.log(format!(
                    "{name}: POST reset {{\"initialState\": true}} ({why})"
                ));
                replica.lock().unwrap().restart_with_rows();
                return true;
            }
            Ok(r) => {
                let status = r.status();
                let body: Json = r.json().await.unwrap_or_default();
                let what = format!("reset answered {status}: {body}");
                if let Verdict::Fail = judge(ctx, name, &error_code(&body), what) {
                    return false;
                }
            }
            Err(_) => {} // the server went away
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    false
}

/// `GET /v1/streams/NAME` as SSE, resuming after the last event id it got: each item once.
pub async fn sse(
    ctx: Ctx,
    name: String,
    replica: SharedReplica,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let http = sse_client();
    let mut last_id: Option<String> = None;
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        let Some(base) = ctx.server().await else {
            return;
        };
        let mut req = sse_get(&http, format!("{base}/v1/streams/{name}"));
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let r = tokio::select! {
            r = req.send() => r,
            _ = ctx.stop.cancelled() => return,
        };
        let verdict = match r {
            Err(_) => Verdict::Retry,
            Ok(r) if r.status().is_success() => {
                let mut events = SseReader::new(r);
                let asked = loop {
                    tokio::select! {
                        ev = events.next() => match ev {
                            Some(ev) if ev.event == "error" => {
                                let body: Json = serde_json::from_str(&ev.data).unwrap_or_default();
                                let code = error_code(&body);
                                break Err(judge(&ctx, &name, &code, format!("error item {body}")));
                            }
                            Some(ev) => {
                                let Some(item) = ev.json(&ctx, &name) else {
                                    return;
                                };
                                let mut r = replica.lock().unwrap();
                                if let Err(what) = r.apply(&item) {
                                    ctx.trace.fail(&name, format!("{what} (resumed after {last_id:?})"));
                                    return;
                                }
                                if ev.id.is_some() {
                                    last_id = ev.id;
                                }
                            }
                            // The server went away (SIGKILL, SIGSTOP long enough, a crash).
                            None => break Err(Verdict::Retry),
                        },
                        c = control.recv(), if !ctx.quiet.is_cancelled() => break Ok(c),
                        _ = ctx.stop.cancelled() => return,
                    }
                };
                drop(events);
                match asked {
                    Ok(Some(Control::Disconnect(down))) => {
                        ctx.trace.log(format!(
                            "{name}: SSE closed, back in {down:?} with Last-Event-ID {last_id:?}"
                        ));
                        tokio::time::sleep(down).await;
                        Verdict::Retry
                    }
                    Ok(Some(Control::ResetWithRows)) => Verdict::Reset,
                    Ok(_) => Verdict::Retry,
                    Err(v) => v,
                }
            }
            Ok(r) => {
                let status = r.status();
                let body: Json = r.json().await.unwrap_or_default();
                judge(
                    &ctx,
                    &name,
                    &error_code(&body),
                    format!("SSE answered {status}: {body}"),
                )
            }
        };
        match verdict {
            Verdict::Retry => tokio::time::sleep(Duration::from_millis(200)).await,
            Verdict::Reset => {
                if !post_reset(&ctx, &http, &name, &replica, "SSE").await {
                    return;
                }
                last_id = None;
            }
            Verdict::Fail => return,
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `GET /v1/streams/NAME` as a WebSocket, acknowledging with `{"ack": cursor}` every few
/// items: after a reconnect what was not acknowledged comes again.
pub async fn websocket(
    ctx: Ctx,
    name: String,
    replica: SharedReplica,
    mut control: mpsc::UnboundedReceiver<Control>,
    seed: u64,
) {
    let mut rng = Prng::new(seed);
    let http = reqwest::Client::new();
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        let Some(base) = ctx.server().await else {
            return;
        };
        let mut req = format!("{}/v1/streams/{name}", base.replace("http://", "ws://"))
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        let connected = tokio::select! {
            c = tokio_tungstenite::connect_async(req) => c,
            _ = ctx.stop.cancelled() => return,
        };
        let verdict = match connected {
            Ok((ws, _)) => {
                let v = ws_session(&ctx, &name, &replica, &mut control, ws, &mut rng).await;
                replica.lock().unwrap().resume();
                v
            }
            Err(tungstenite::Error::Http(r)) => {
                let body: Json = r
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or_default();
                let what = format!("WebSocket upgrade answered {}: {body}", r.status());
                judge(&ctx, &name, &error_code(&body), what)
            }
            Err(_) => Verdict::Retry,
        };
        match verdict {
            Verdict::Retry => tokio::time::sleep(Duration::from_millis(200)).await,
            Verdict::Reset => {
                if !post_reset(&ctx, &http, &name, &replica, "WebSocket").await {
                    return;
                }
            }
            Verdict::Fail => return,
        }
    }
}

/// One WebSocket connection, until it breaks or the schedule asks.
async fn ws_session(
    ctx: &Ctx,
    name: &str,
    replica: &SharedReplica,
    control: &mut mpsc::UnboundedReceiver<Control>,
    mut ws: Ws,
    rng: &mut Prng,
) -> Verdict {
    // Acknowledged every `every` items (a new random count each time).
    let (mut every, mut since_ack) = (rng.range(1, 60), 0);
    let (mut pending, mut acked): (Option<String>, Option<String>) = (None, None);
    let mut items = 0u64;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            c = control.recv(), if !ctx.quiet.is_cancelled() => {
                let ack_first = rng.percent() < 50;
                if let (true, Some(cursor)) = (ack_first, pending.take()) {
                    let _ = ws.send(Message::text(json!({"ack": cursor}).to_string())).await;
                    acked = Some(cursor);
                }
                let _ = ws.close(None).await;
                return match c {
                    Some(Control::Disconnect(down)) => {
                        ctx.trace.log(format!(
                            "{name}: WebSocket closed after {items} items (acknowledged first: \
                             {ack_first}; last acknowledged {acked:?}), back in {down:?}"
                        ));
                        tokio::time::sleep(down).await;
                        Verdict::Retry
                    }
                    Some(Control::ResetWithRows) => Verdict::Reset,
                    _ => Verdict::Retry,
                };
            }
            _ = ctx.stop.cancelled() => return Verdict::Retry,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                ctx.trace.log(format!(
                    "{name}: WebSocket broke after {items} items, last acknowledged {acked:?}"
                ));
                return Verdict::Retry;
            }
            Some(Ok(_)) => continue,
        };
        items += 1;
        let item: Json = match serde_json::from_str(&text) {
            Ok(item) => item,
            Err(e) => {
                ctx.trace
                    .fail(name, format!("WebSocket message {text:?}: {e}"));
                return Verdict::Fail;
            }
        };
        if item["type"] == "error" {
            return judge(ctx, name, &error_code(&item), format!("error item {item}"));
        }
        if let Err(what) = replica.lock().unwrap().apply(&item) {
            ctx.trace.fail(name, what);
            return Verdict::Fail;
        }
        if let Some(seq) = item["seq"].as_u64() {
            pending = Some(format!("snapshot-{seq}"));
        } else if let (Some(p), None | Some("snapshotComplete")) =
            (item["position"].as_str(), item["type"].as_str())
        {
            // A change, or the marker (its position acknowledges it: unacknowledged, it
            // would come again after a reconnect).
            pending = Some(p.to_owned());
        }
        since_ack += 1;
        if since_ack >= every {
            if let Some(cursor) = pending.take() {
                if ws
                    .send(Message::text(json!({"ack": cursor}).to_string()))
                    .await
                    .is_err()
                {
                    return Verdict::Retry;
                }
                acked = Some(cursor);
            }
            (every, since_ack) = (rng.range(1, 60), 0);
        }
    }
}
