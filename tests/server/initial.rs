//! Initial state over HTTP: subscribe with `initialState=true`, and a stream made with an
//! initial state consumed over SSE (resuming mid-snapshot with `Last-Event-ID`) and the
//! feed (paging through the rows with `snapshot-<seq>` cursors). Streams made with an
//! initial state and streams reset with one (also after `stale_cursor`) deliver each row
//! once, the marker once, then the changes, to clients that pass back what they got.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::SinkExt;
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::Message;
use waltap::log::retention::Retention;

use super::delivery::{ws, ws_next};
use super::{insert_orders, start, Server, Sse, ADMIN, ORDERS, TIMEOUT};
use crate::support::{wait_for, TestDb};

/// Waits until the server's log holds order `id` (the initial state's position comes from it).
async fn logged(db: &TestDb, id: i32) {
    let c = db.client().await;
    wait_for("the log to hold the row", TIMEOUT, || async {
        c.query_one(
            "SELECT count(*) FROM waltap.events WHERE (event->'created'->>'id')::int = $1",
            &[&id],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) > 0)
    })
    .await;
}

#[tokio::test]
async fn subscribe_with_initial_state_over_sse() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 0..5).await;
    let filter = json!({"where": {"id": {"gte": 2}}}).to_string();
    let mut sse = Sse::open(s.get("/v1/subscribe", ORDERS).query(&[
        ("table", "orders"),
        ("filter", filter.as_str()),
        ("initialState", "true"),
    ]))
    .await;
    sse.expect("initialized").await;
    let mut rows = Vec::new();
    loop {
        let f = sse.next().await.expect("the rows, then the marker");
        match f.event.as_str() {
            "snapshot" => rows.push(f.data["row"]["id"].as_i64().unwrap()),
            "snapshotComplete" => break,
            other => panic!("unexpected {other}: {f:?}"),
        }
    }
    assert_eq!(rows, [2, 3, 4], "the filter applies to the rows");
    insert_orders(&db, 5..6).await;
    assert_eq!(sse.expect("change").await.data["created"]["id"], 5);
    drop(sse);
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn stream_initial_state_resumes_mid_snapshot_over_sse_and_pages_on_the_feed() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 0..30).await;
    logged(&db, 29).await;
    for name in ["warm", "paged"] {
        let r = s
            .post(
                "/v1/streams",
                ADMIN,
                json!({"name": name, "table": "orders", "initialState": true}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    // SSE: read ten rows, go away, come back with the last row's id.
    let mut sse = Sse::open(s.get("/v1/streams/warm", ORDERS)).await;
    sse.expect("initialized").await;
    let mut last = String::new();
    for i in 0..10 {
        let f = sse.expect("snapshot").await;
        assert_eq!(f.data["row"]["id"], i);
        last =
            f.id.clone()
                .expect("rows of a stream's initial state have ids");
    }
    assert_eq!(last, "snapshot-10");
    drop(sse);
    s.lease_free("warm").await;
    let mut sse = Sse::new(
        s.get("/v1/streams/warm", ORDERS)
            .header("accept", "text/event-stream")
            .header("last-event-id", &last)
            .send()
            .await
            .unwrap(),
    );
    sse.expect("initialized").await;
    let mut rest = Vec::new();
    let complete = loop {
        let f = sse.next().await.expect("rows, then the marker");
        match f.event.as_str() {
            "snapshot" => rest.push(f.data["row"]["id"].as_i64().unwrap()),
            "snapshotComplete" => break f,
            other => panic!("unexpected {other}: {f:?}"),
        }
    };
    assert_eq!(rest, (10..30).collect::<Vec<i64>>(), "resumed after row 10");
    insert_orders(&db, 30..31).await;
    let change = sse.expect("change").await;
    assert_eq!(change.data["created"]["id"], 30);
    assert!(change.data["position"].as_str() > complete.data["position"].as_str());
    drop(sse);

    // Feed: pages of rows with snapshot cursors, then the marker, then the change.
    let mut cursor: Option<String> = None;
    let mut ids = Vec::new();
    let mut marker = false;
    while ids.len() < 31 {
        let mut q = vec![("limit", "7".to_owned()), ("wait", "5".to_owned())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let body: Json = s
            .get("/v1/streams/paged/events", ORDERS)
            .query(&q)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for item in body["events"].as_array().unwrap() {
            if item["type"] == "snapshotComplete" {
                marker = true;
            } else if item["action"] == "snapshot" {
                assert!(!marker, "rows come before the marker");
                ids.push(item["row"]["id"].as_i64().unwrap());
            } else {
                assert!(marker, "changes come after the marker");
                ids.push(item["created"]["id"].as_i64().unwrap());
            }
        }
        cursor = Some(body["cursor"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        ids,
        (0..31).collect::<Vec<i64>>(),
        "every row and change once"
    );
    s.stop().await;
    db.teardown().await;
}

/// Makes stream `name` over `orders` with an initial state: made with one, or (`reset`)
/// made without, read once, then reset with one.
async fn with_initial_state(s: &Server, name: &str, reset: bool) {
    if !reset {
        let body = json!({"name": name, "table": "orders", "initialState": true});
        let r = s.post("/v1/streams", ADMIN, body).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        return;
    }
    s.create_stream(name, "orders", None).await;
    let r = s
        .get(&format!("/v1/streams/{name}/events"), ORDERS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    reset_with_initial_state(s, name).await;
}

async fn reset_with_initial_state(s: &Server, name: &str) {
    s.lease_free(name).await;
    let r = s
        .post(
            &format!("/v1/streams/{name}/reset"),
            ORDERS,
            json!({"initialState": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// What a client got of a stream with an initial state; panics on a row after the marker
/// or a change before it.
#[derive(Debug, Default)]
struct Seen {
    rows: Vec<i64>,
    markers: Vec<String>,
    changes: Vec<i64>,
}

impl Seen {
    fn take(&mut self, item: &Json) {
        if item["type"] == "initialized" {
        } else if item["type"] == "snapshotComplete" {
            assert!(
                self.changes.is_empty(),
                "the marker after changes: {self:?}"
            );
            let at = item["position"]
                .as_str()
                .expect("the marker has a position");
            self.markers.push(at.to_owned());
        } else if item["action"] == "snapshot" {
            assert!(self.markers.is_empty(), "a row after the marker: {item}");
            self.rows.push(item["row"]["id"].as_i64().unwrap());
        } else {
            assert!(
                !self.markers.is_empty(),
                "a change before the marker: {item}"
            );
            self.changes.push(item["created"]["id"].as_i64().unwrap());
        }
    }

    /// The marker once, and each of `ids` once, as a row or a change.
    fn assert_once(&self, ids: &BTreeSet<i64>) {
        assert_eq!(self.markers.len(), 1, "the marker once: {self:?}");
        let mut all: Vec<i64> = self.rows.iter().chain(&self.changes).copied().collect();
        all.sort_unstable();
        let want: Vec<i64> = ids.iter().copied().collect();
        assert_eq!(all, want, "every row and change once");
    }
}

/// Pages a feed may take before a test gives up on it (so a feed that repeats itself fails
/// rather than spins).
const MAX_PAGES: usize = 2000;

/// A feed client that passes back each page's cursor.
struct Feed<'a> {
    s: &'a Server,
    name: String,
    cursor: Option<String>,
    seen: Seen,
}

impl<'a> Feed<'a> {
    fn new(s: &'a Server, name: &str) -> Self {
        Feed {
            s,
            name: name.to_owned(),
            cursor: None,
            seen: Seen::default(),
        }
    }

    /// One page; returns how many items it held.
    async fn page(&mut self, limit: usize, wait: u32) -> usize {
        let mut q = vec![("limit", limit.to_string()), ("wait", wait.to_string())];
        if let Some(c) = &self.cursor {
            q.push(("cursor", c.clone()));
        }
        let r = self
            .s
            .get(&format!("/v1/streams/{}/events", self.name), ORDERS)
            .query(&q)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Json = r.json().await.unwrap();
        assert_eq!(status, 200, "{}: {body}", self.name);
        let events = body["events"].as_array().unwrap();
        for e in events {
            self.seen.take(e);
        }
        self.cursor = Some(body["cursor"].as_str().unwrap().to_owned());
        events.len()
    }

    /// Pages of `limit` until `done` holds of what was seen.
    async fn until(&mut self, limit: usize, done: impl Fn(&Seen) -> bool) {
        for _ in 0..MAX_PAGES {
            if done(&self.seen) {
                return;
            }
            self.page(limit, 5).await;
        }
        panic!(
            "{}: gave up after {MAX_PAGES} pages: {:?}",
            self.name, self.seen
        );
    }

    /// Nothing new: an empty page, the same cursor, and the stream's cursor is it.
    async fn quiet(&mut self) {
        let before = self.cursor.clone();
        assert_eq!(self.page(10, 0).await, 0, "re-delivered: {:?}", self.seen);
        assert_eq!(self.cursor, before);
        let info = self.s.stream_info(&self.name).await;
        assert_eq!(info["cursor"].as_str(), before.as_deref(), "acknowledged");
    }
}

#[tokio::test]
async fn made_and_reset_with_initial_state_page_rows_and_marker_once_on_the_feed() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    // Made while the log is empty: no rows, and the marker before every change.
    with_initial_state(&s, "early", false).await;
    let mut early = Feed::new(&s, "early");
    early.until(2, |seen| !seen.markers.is_empty()).await;
    early.quiet().await;
    insert_orders(&db, 0..5).await;
    logged(&db, 4).await;
    let mut feeds = vec![early];
    // Pages that end inside the rows, and (limit 5) right after the last row.
    for (name, reset, limit) in [("made", false, 2), ("again", true, 5)] {
        with_initial_state(&s, name, reset).await;
        let mut feed = Feed::new(&s, name);
        feed.until(limit, |seen| !seen.markers.is_empty()).await;
        assert_eq!(feed.seen.rows, [0, 1, 2, 3, 4], "{name}");
        // A quiet table: the marker's cursor gives nothing more, however often.
        feed.quiet().await;
        feed.quiet().await;
        feeds.push(feed);
    }
    insert_orders(&db, 5..7).await;
    for feed in &mut feeds {
        feed.until(2, |seen| seen.changes.len() + seen.rows.len() >= 7)
            .await;
        feed.seen.assert_once(&(0..7).collect());
        feed.quiet().await;
    }
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn made_and_reset_with_initial_state_resume_over_sse_and_websocket() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 0..3).await;
    logged(&db, 2).await;
    let mut present = vec![0, 1, 2];
    let mut next_id = 100;
    for (name, reset) in [("made", false), ("again", true)] {
        // SSE: all rows, away; back after the last row: the marker; back after it: changes.
        with_initial_state(&s, name, reset).await;
        let path = format!("/v1/streams/{name}");
        let mut sse = Sse::open(s.get(&path, ORDERS)).await;
        let init = sse.expect("initialized").await;
        assert_eq!(init.id, None, "initialized moves no cursor");
        let mut rows = Vec::new();
        let mut last = None;
        while rows.len() < present.len() {
            let row = sse.expect("snapshot").await;
            rows.push(row.data["row"]["id"].as_i64().unwrap());
            last = row.id;
        }
        assert_eq!(rows, present);
        let last = last.unwrap();
        assert_eq!(last, format!("snapshot-{}", rows.len()));
        let resume = |last: &str| {
            let req = s
                .get(&path, ORDERS)
                .header("accept", "text/event-stream")
                .header("last-event-id", last.to_owned());
            async move { Sse::new(req.send().await.unwrap()) }
        };
        drop(sse);
        s.lease_free(name).await;
        let mut sse = resume(&last).await;
        sse.expect("initialized").await;
        let marker = sse.expect("snapshotComplete").await;
        assert_eq!(marker.id.as_deref(), marker.data["position"].as_str());
        drop(sse);
        s.lease_free(name).await;
        let mut sse = resume(marker.id.as_deref().unwrap()).await;
        sse.expect("initialized").await;
        insert_orders(&db, next_id..next_id + 1).await;
        let change = sse.expect("change").await;
        assert_eq!(
            change.data["created"]["id"], next_id,
            "{name}: no row again"
        );
        present.push(next_id.into());
        next_id += 1;
        drop(sse);

        // WebSocket: acknowledge each row and the marker, away, back: only changes.
        let name = format!("ws-{name}");
        with_initial_state(&s, &name, reset).await;
        let path = format!("/v1/streams/{name}");
        let mut sock = ws(&s, &path, ORDERS).await;
        assert_eq!(ws_next(&mut sock).await["type"], "initialized");
        let mut seen = Seen::default();
        while seen.markers.is_empty() {
            let item = ws_next(&mut sock).await;
            seen.take(&item);
            let cursor = match item["seq"].as_i64() {
                Some(seq) => format!("snapshot-{seq}"),
                None => item["position"].as_str().unwrap().to_owned(),
            };
            let ack = json!({"ack": cursor}).to_string();
            sock.send(Message::Text(ack.into())).await.unwrap();
        }
        assert_eq!(seen.rows, present);
        // Acks are handled in order: the answer to a bad message comes after them.
        sock.send(Message::Text("{}".into())).await.unwrap();
        assert_eq!(ws_next(&mut sock).await["error"]["code"], "bad_request");
        drop(sock);
        s.lease_free(&name).await;
        let mut sock = ws(&s, &path, ORDERS).await;
        assert_eq!(ws_next(&mut sock).await["type"], "initialized");
        insert_orders(&db, next_id..next_id + 1).await;
        let change = ws_next(&mut sock).await;
        assert_eq!(change["created"]["id"], next_id, "{name}: no row again");
        present.push(next_id.into());
        next_id += 1;
    }
    s.stop().await;
    db.teardown().await;
}

/// Inserts orders `ids`, one transaction each, on a connection of its own.
fn writer(db: &TestDb, ids: std::ops::Range<i32>) -> tokio::task::JoinHandle<()> {
    let url = db.url();
    tokio::spawn(async move {
        let c = crate::support::connect(&url).await.unwrap();
        for id in ids {
            c.execute("INSERT INTO orders VALUES ($1, 'new', NULL)", &[&id])
                .await
                .unwrap();
        }
    })
}

/// The way out of `stale_cursor` under `waltap serve --retention-age 5s`: reset with the
/// initial state while writers run, then page the feed; a stream made with one meanwhile
/// the same. Each gets every row and change once, and keeps up with retention afterwards.
#[tokio::test]
async fn after_stale_cursor_reset_with_initial_state_delivers_everything_once_under_writers() {
    let db = TestDb::new().await;
    let s = start(&db, |c| {
        c.appender.retention = Some(Retention {
            max_age: Some(Duration::from_secs(5)),
            max_bytes: None,
            interval: Duration::from_millis(500),
        });
    })
    .await;
    s.create_stream("d2", "orders", None).await;
    insert_orders(&db, 0..20).await;
    wait_for(
        "retention to make the unread stream stale",
        TIMEOUT,
        || async {
            let r = s.get("/v1/streams/d2/events", ORDERS).send().await.unwrap();
            r.status() == 410
        },
    )
    .await;
    let code = super::error_code(s.get("/v1/streams/d2/events", ORDERS), 410).await;
    assert_eq!(code, "stale_cursor");

    let mut writing = Some(writer(&db, 1000..1300));
    reset_with_initial_state(&s, "d2").await;
    with_initial_state(&s, "made", false).await;
    let mut feeds = [Feed::new(&s, "d2"), Feed::new(&s, "made")];
    const SENTINEL: i64 = 5000;
    for _ in 0..MAX_PAGES {
        // In turns, so that neither falls behind retention.
        for f in &mut feeds {
            f.page(500, 0).await;
        }
        if writing.as_ref().is_some_and(|w| w.is_finished()) {
            writing.take().unwrap().await.unwrap();
            insert_orders(&db, SENTINEL as i32..SENTINEL as i32 + 1).await;
        }
        if writing.is_none() && feeds.iter().all(|f| f.seen.changes.contains(&SENTINEL)) {
            break;
        }
    }
    let ids: BTreeSet<i64> = db
        .client()
        .await
        .query("SELECT id::int8 FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 321);
    for f in &mut feeds {
        assert!(!f.seen.rows.is_empty(), "{}: {:?}", f.name, f.seen);
        f.seen.assert_once(&ids);
        f.quiet().await;
    }
    // Retention deletes everything read; the streams stay fresh and quiet.
    let c = db.client().await;
    wait_for("retention to delete every event", TIMEOUT, || async {
        let left: i64 = c
            .query_one("SELECT count(*) FROM waltap.events", &[])
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
    for f in &mut feeds {
        f.quiet().await;
    }
    s.stop().await;
    db.teardown().await;
}

/// SSE after a reset with the initial state while a writer runs, reconnecting every few
/// frames with the last id it got: every row and change once, the marker once.
#[tokio::test]
async fn sse_resuming_after_reset_with_initial_state_under_writers_gets_everything_once() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 0..50).await;
    logged(&db, 49).await;
    s.create_stream("busy", "orders", None).await;
    // The writer's last insert (id 1299) ends the test.
    let writing = writer(&db, 1000..1300);
    reset_with_initial_state(&s, "busy").await;
    let mut seen = Seen::default();
    let mut last: Option<String> = None;
    while !seen.changes.contains(&1299) {
        let mut req = s
            .get("/v1/streams/busy", ORDERS)
            .header("accept", "text/event-stream");
        if let Some(id) = &last {
            req = req.header("last-event-id", id);
        }
        let mut sse = Sse::new(req.send().await.unwrap());
        sse.expect("initialized").await;
        for _ in 0..25 {
            let f = sse.next().await.expect("a frame");
            seen.take(&f.data);
            last = f.id.or(last);
            if seen.changes.contains(&1299) {
                break;
            }
        }
        drop(sse);
        s.lease_free("busy").await;
    }
    writing.await.unwrap();
    let ids: BTreeSet<i64> = (0..50).chain(1000..1300).collect();
    seen.assert_once(&ids);
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn a_streams_info_says_where_its_initial_state_is() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 1..6).await;
    logged(&db, 5).await;
    with_initial_state(&s, "progress", false).await;
    let info = s.stream_info("progress").await;
    assert_eq!(
        info["initialState"],
        json!({"state": "pending", "rows": 0, "acknowledged": 0}),
        "{info}"
    );

    // A page of the feed (`cursor` acknowledges what came before), then the stream's info.
    let page = |cursor: Option<String>, limit: usize| {
        let s = &s;
        async move {
            let after = cursor.map(|c| format!("&cursor={c}")).unwrap_or_default();
            let path = format!("/v1/streams/progress/events?limit={limit}&wait=0{after}");
            let page = s.get_json(&path, ORDERS).await;
            s.lease_free("progress").await;
            let info = s.stream_info("progress").await;
            (page["cursor"].as_str().map(str::to_owned), page, info)
        }
    };
    // The first page copies the rows; the next acknowledges 3 and gets the rest and the
    // marker; acknowledging through the marker ends the initial state.
    let (cursor, first, _) = page(None, 3).await;
    assert_eq!(first["events"].as_array().unwrap().len(), 3, "{first}");
    let (cursor, _, info) = page(cursor, 10).await;
    assert_eq!(
        info["initialState"],
        json!({"state": "ready", "rows": 5, "acknowledged": 3}),
        "{info}"
    );
    let (_, _, info) = page(cursor, 1).await;
    assert!(info.get("initialState").is_none(), "{info}");
    s.stop().await;
    db.teardown().await;
}

/// A feed client that gives up while the stream's initial state is still being copied
/// (here: the table locked by another transaction) must not make the copy start over
/// with every request: it completes without the client, and frees the stream.
#[tokio::test]
async fn an_initial_state_copy_completes_after_the_feed_client_gave_up() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 0..5).await;
    logged(&db, 4).await;
    with_initial_state(&s, "patient", false).await;
    let mut blocker = db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // The copy waits for the lock; the client does not.
    let gave_up = s
        .get("/v1/streams/patient/events", ORDERS)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.is_err(), "the request should have timed out");
    lock.commit().await.unwrap();
    let client = db.client().await;
    wait_for("the copy completes without its client", TIMEOUT, || async {
        client
            .query_one(
                "SELECT snapshot_state = 'ready' AND lease_holder IS NULL
                 FROM waltap.streams WHERE name = 'patient'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    let mut feed = Feed::new(&s, "patient");
    feed.until(10, |seen| !seen.markers.is_empty()).await;
    assert_eq!(feed.seen.rows, [0, 1, 2, 3, 4]);
    s.stop().await;
    db.teardown().await;
}
