//! Consumers, each feeding what it receives into its [`Replica`]: the event log itself (read
//! with SQL), `waltap stream tail` processes, HTTP feed clients and the Rust API.
//! The schedule disconnects them and makes them start over with the current rows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use waltap::log::streams::{self, Cursor, OpenOptions};
use waltap::log::StoreError;
use waltap::Position;
use waltap::SourceConfig;

use super::procs::{self, Env, KEY};
use super::replica::Replica;
use super::trace::Trace;
use super::writer::SharedTable;
use crate::support;

/// How long after Postgres is back from a crash a consumer's or command's error is
/// forgiven (taken as the crash's doing, and retried).
const FORGIVEN: Duration = Duration::from_secs(60);

/// What the schedule asks a consumer to do.
#[derive(Debug)]
pub enum Control {
    /// Go away for this long (a killed process, a closed connection, a client that stops
    /// polling), then resume.
    Disconnect(Duration),
    /// `reset` with initial state, then go on.
    ResetWithRows,
    /// Not the schedule's: the consumer lost its connection (a Postgres crash) and opens
    /// the stream again.
    Reopen,
}

#[derive(Clone, Copy, Debug)]
pub enum Via {
    Cli,
    Feed,
    Api,
    /// Server-Sent Events, resuming with `Last-Event-ID`.
    Sse,
    /// WebSocket, acknowledging explicitly.
    Ws,
}

impl Via {
    /// Consumed through `waltap serve`'s HTTP API.
    pub fn needs_http(self) -> bool {
        matches!(self, Via::Feed | Via::Sse | Via::Ws)
    }
}

/// What every consumer task shares.
#[derive(Clone)]
pub struct Ctx {
    pub env: Env,
    pub http: Arc<Mutex<Option<String>>>,
    /// The other group members' HTTP base URLs (group mode): consumers connect to any.
    pub members: Arc<Mutex<Vec<String>>>,
    /// Turns over at each connection, so that consumers spread over the members.
    pub turn: Arc<std::sync::atomic::AtomicUsize>,
    pub trace: Trace,
    /// Ends every consumer at the end of the schedule.
    pub stop: CancellationToken,
    /// The schedule is over: consumers ignore what it asked and not yet done.
    pub quiet: CancellationToken,
    /// Operations left out (`WALTAP_CHAOS_WITHOUT`).
    pub without: Vec<String>,
    /// Columns the schedule added.
    pub table: SharedTable,
    /// When Postgres last crashed (or came back from it).
    pub crashed: Arc<Mutex<Option<std::time::Instant>>>,
}

pub type SharedReplica = Arc<Mutex<Replica>>;

impl Ctx {
    pub fn allows(&self, op: &str) -> bool {
        !self.without.iter().any(|w| w == op)
    }

    /// The HTTP base URL of a serving process, once there is one: the pipeline's or, in
    /// group mode, any member's (in turn, so that consumers move between members as they
    /// reconnect); `None` once the schedule ends.
    pub async fn server(&self) -> Option<String> {
        loop {
            let mut up: Vec<String> = self.http.lock().unwrap().iter().cloned().collect();
            up.extend(self.members.lock().unwrap().iter().cloned());
            if !up.is_empty() {
                let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(up.swap_remove(turn % up.len()));
            }
            if self.stop.is_cancelled() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the process at `base` should still be up (a SIGKILL takes its URL away
    /// before it strikes).
    pub fn is_up(&self, base: &str) -> bool {
        self.http.lock().unwrap().as_deref() == Some(base)
            || self.members.lock().unwrap().iter().any(|m| m == base)
    }

    /// True in the minute after a Postgres crash: errors then are the crash's doing.
    pub fn forgiven(&self) -> bool {
        self.crashed
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < FORGIVEN)
    }

    /// Records `what` as a divergence, unless a crash explains it: then logs it and
    /// returns true (the caller retries).
    pub fn forgive(&self, subject: &str, what: String) -> bool {
        if self.forgiven() {
            self.trace
                .log(format!("{subject}: after the Postgres crash: {what}"));
            return true;
        }
        self.trace.fail(subject, what);
        false
    }

    /// Applies items to `replica`; false (after recording the divergence) on the first bad one.
    fn apply(&self, replica: &SharedReplica, items: &[Json]) -> bool {
        let mut r = replica.lock().unwrap();
        for item in items {
            if let Err(what) = r.apply(item) {
                self.trace.fail(&r.name, what);
                return false;
            }
        }
        true
    }

    fn log(&self, replica: &SharedReplica, what: &str) {
        let name = replica.lock().unwrap().name.clone();
        self.trace.log(format!("{name}: {what}"));
    }
}

/// The event log (its copy in `chaos_log`, out of retention's reach), polled with SQL
/// from before the first write: every committed transaction must be in it once, in order.
pub async fn log_poller(ctx: Ctx, replica: SharedReplica) {
    let mut after = (0i64, -1i32);
    let mut client = None;
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        if client.is_none() {
            client = support::connect(&ctx.env.url).await.ok();
        }
        let Some(c) = &client else { continue };
        let rows = c
            .query(
                "SELECT commit_lsn, ordinal, event::text FROM chaos_log \
                 WHERE source = $1 AND (commit_lsn, ordinal) > ($2, $3) \
                 ORDER BY commit_lsn, ordinal LIMIT 5000",
                &[&ctx.env.slot, &after.0, &after.1],
            )
            .await;
        let Ok(rows) = rows else {
            // The log's tables appear with the first pipeline; a crash ends the connection.
            client = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let items: Vec<Json> = rows
            .iter()
            .map(|r| serde_json::from_str(r.get(2)).unwrap())
            .collect();
        let last = rows.last().unwrap();
        after = (last.get(0), last.get(1));
        if !ctx.apply(&replica, &items) {
            return;
        }
    }
}

/// Consumes stream `name` via `via` until the schedule ends.
pub async fn consume(
    ctx: Ctx,
    name: String,
    via: Via,
    replica: SharedReplica,
    control: mpsc::UnboundedReceiver<Control>,
    seed: u64,
) {
    match via {
        Via::Cli => cli(ctx, name, replica, control).await,
        Via::Feed => feed(ctx, name, replica, control).await,
        Via::Api => api(ctx, name, replica, control).await,
        Via::Sse => super::http::sse(ctx, name, replica, control).await,
        Via::Ws => super::http::websocket(ctx, name, replica, control, seed).await,
    }
}

/// `waltap stream tail NAME`, killed with SIGKILL to disconnect.
async fn cli(
    ctx: Ctx,
    name: String,
    replica: SharedReplica,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        let mut child = ctx
            .env
            .waltap(&["stream", "tail", &name])
            .spawn()
            .expect("spawn stream tail");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = child.stderr.take().unwrap();
        let ended_by_us = loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        let item: Json = match serde_json::from_str(&line) {
                            Ok(item) => item,
                            Err(e) => {
                                ctx.trace.fail(&name, format!("stream tail printed {line:?}: {e}"));
                                return;
                            }
                        };
                        if !ctx.apply(&replica, &[item]) {
                            return;
                        }
                    }
                    _ => break None,
                },
                c = control.recv(), if !ctx.quiet.is_cancelled() => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break c;
                }
                _ = ctx.stop.cancelled() => {
                    let _ = child.start_kill();
                    return;
                }
            }
        };
        match ended_by_us {
            Some(Control::Disconnect(down)) => {
                ctx.log(&replica, &format!("SIGKILL stream tail, back in {down:?}"));
                tokio::time::sleep(down).await;
                replica.lock().unwrap().resume();
            }
            Some(Control::ResetWithRows) => cli_reset(&ctx, &name, &replica, "asked").await,
            Some(Control::Reopen) => replica.lock().unwrap().resume(),
            None => {
                let status = child.wait().await.unwrap();
                let mut why = String::new();
                let _ = stderr.read_to_string(&mut why).await;
                if why.contains("stale_cursor") {
                    cli_reset(&ctx, &name, &replica, "stale_cursor").await;
                } else if why.contains("stream_busy") {
                    // The lease of a killed `tail` expires or is released.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    replica.lock().unwrap().resume();
                } else if !ctx.stop.is_cancelled() {
                    if !ctx.forgive(&name, format!("stream tail exited ({status}): {why}")) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    replica.lock().unwrap().resume();
                }
            }
        }
    }
}

async fn cli_reset(ctx: &Ctx, name: &str, replica: &SharedReplica, why: &str) {
    let since = std::time::Instant::now();
    loop {
        match procs::run(&ctx.env, &["stream", "reset", name, "--initial-state"]).await {
            Ok(_) => {
                ctx.log(replica, &format!("stream reset --initial-state ({why})"));
                replica.lock().unwrap().restart_with_rows();
                return;
            }
            // The lease is still held: rightly after the harness SIGKILLed the `tail` (it
            // expires), wrongly after a `tail` that exited on stale_cursor (it releases
            // its lease before exiting), which is reported.
            Err(e) if e.contains("stream_busy") && since.elapsed() < Duration::from_secs(45) => {
                if why == "stale_cursor" && since.elapsed() < Duration::from_millis(300) {
                    ctx.log(
                        replica,
                        "ANOMALY: stream reset right after the tail exited: stream_busy",
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                if !ctx.forgive(name, format!("stream reset failed: {e}")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The pull feed over HTTP: passes back each page's `cursor`; disconnecting is not polling
/// for a while.
async fn feed(
    ctx: Ctx,
    name: String,
    replica: SharedReplica,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut cursor: Option<String> = None;
    let mut reset = false;
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        match control.try_recv() {
            _ if ctx.quiet.is_cancelled() => {}
            Ok(Control::Disconnect(down)) => {
                ctx.log(&replica, &format!("feed pauses for {down:?}"));
                tokio::time::sleep(down).await;
            }
            Ok(Control::ResetWithRows) => reset = true,
            Ok(Control::Reopen) | Err(_) => {}
        }
        let Some(base) = ctx.server().await else {
            return;
        };
        if reset {
            if !super::http::post_reset(&ctx, &http, &name, &replica, "feed").await {
                return;
            }
            cursor = None;
            reset = false;
            continue;
        }
        let mut req = http
            .get(format!("{base}/v1/streams/{name}/events"))
            .bearer_auth(KEY)
            .query(&[("limit", "500"), ("wait", "1")]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let r = tokio::select! {
            r = req.send() => r,
            _ = ctx.stop.cancelled() => return,
        };
        let Ok(r) = r else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = r.status();
        let Ok(body) = r.json::<Json>().await else {
            continue; // the server went away mid-answer
        };
        match status.as_u16() {
            200 => {}
            410 => {
                ctx.log(&replica, "feed: 410 stale_cursor");
                reset = true;
                continue;
            }
            409 | 503 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            _ => {
                if !ctx.forgive(&name, format!("feed answered {status}: {body}")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        }
        let items = body["events"].as_array().cloned().unwrap_or_default();
        replica.lock().unwrap().note = format!(
            "the last page, for cursor {cursor:?}: {} items, cursor {}",
            items.len(),
            body["cursor"]
        );
        if !ctx.apply(&replica, &items) {
            ctx.log(&replica, &format!("the page came for cursor {cursor:?}"));
            return;
        }
        cursor = body["cursor"].as_str().map(str::to_owned);
    }
}

/// `waltap::log::streams::open` in this process, acknowledging each item.
async fn api(
    ctx: Ctx,
    name: String,
    replica: SharedReplica,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let store = SourceConfig::parse(&ctx.env.url).unwrap();
    let note =
        |what: &str| replica.lock().unwrap().note = format!("{what} at {:?}", ctx.trace.elapsed());
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        note("opening");
        let mut consumer = match streams::open(&store, &name, OpenOptions::default()).await {
            Ok(c) => c,
            Err(StoreError::StaleCursor { .. }) => {
                api_reset(&ctx, &store, &name, &replica, "stale_cursor").await;
                continue;
            }
            Err(StoreError::StreamBusy { .. }) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Err(e) => {
                if !ctx.forgive(&name, format!("open: {e}")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        // What was applied and not yet acknowledged: acknowledged whenever the consumer
        // has nothing more ready, and before it disconnects.
        let mut pending: Option<Cursor> = None;
        let asked = loop {
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Err(e) = ack(consumer.acker(), pending.take()).await {
                        if !ctx.forgive(&name, format!("ack: {e}")) {
                            return;
                        }
                        break Some(Control::Reopen);
                    }
                    note("waiting for the next item");
                    tokio::select! {
                        item = consumer.next() => item,
                        c = control.recv(), if !ctx.quiet.is_cancelled() => break c,
                        _ = ctx.stop.cancelled() => break None,
                    }
                }
            };
            let item = match next {
                Some(Ok(item)) => serde_json::to_value(&item).unwrap(),
                Some(Err(StoreError::StaleCursor { .. })) => break Some(Control::ResetWithRows),
                Some(Err(e)) => {
                    if !ctx.forgive(&name, format!("stream error: {e}")) {
                        return;
                    }
                    break Some(Control::Reopen);
                }
                None => break None,
            };
            if !ctx.apply(&replica, std::slice::from_ref(&item)) {
                return;
            }
            if let Some(seq) = item["seq"].as_u64() {
                pending = Some(Cursor::Snapshot(seq));
            } else if let (Some(p), None | Some("snapshotComplete")) =
                (item["position"].as_str(), item["type"].as_str())
            {
                // A change, or the marker (its position acknowledges it: unacknowledged, it
                // would come again after a reconnect).
                pending = Some(Cursor::Position(p.parse::<Position>().unwrap()));
            }
        };
        if let Err(e) = ack(consumer.acker(), pending.take()).await {
            if !ctx.forgive(&name, format!("ack: {e}")) {
                return;
            }
        }
        consumer.close().await;
        match asked {
            Some(Control::Disconnect(down)) => {
                ctx.log(&replica, &format!("API consumer closes for {down:?}"));
                tokio::time::sleep(down).await;
            }
            Some(Control::ResetWithRows) => api_reset(&ctx, &store, &name, &replica, "asked").await,
            Some(Control::Reopen) => {
                // What was not acknowledged comes again.
                tokio::time::sleep(Duration::from_millis(300)).await;
                replica.lock().unwrap().resume();
            }
            None => {}
        }
    }
}

/// Acknowledges through the acker: a future borrowing the consumer itself is not Send
/// (StreamConsumer is not Sync).
async fn ack(acker: streams::StreamAcker, cursor: Option<Cursor>) -> Result<(), StoreError> {
    match cursor {
        Some(cursor) => acker.ack_cursor(cursor).await,
        None => Ok(()),
    }
}

async fn api_reset(
    ctx: &Ctx,
    store: &SourceConfig,
    name: &str,
    replica: &SharedReplica,
    why: &str,
) {
    loop {
        let result = match store.connect_sql().await {
            Ok(client) => {
                streams::reset(&waltap::log::EventLog::Postgres, &client, name, true).await
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(_) => {
                ctx.log(
                    replica,
                    &format!(
                        "streams::reset(&waltap::log::EventLog::Postgres, initial_state) ({why})"
                    ),
                );
                replica.lock().unwrap().restart_with_rows();
                return;
            }
            Err(e) => {
                if !ctx.forgive(name, format!("reset: {e}")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}
