//! Delivery: subscribe over SSE and WebSocket, streams over SSE (resume with
//! Last-Event-ID, explicit acks), WebSocket (acks) and the pull feed (paging, long poll),
//! a slow subscriber cut off while a stream loses nothing, and many clients at once.

use std::collections::BTreeSet;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

use super::{ids, insert_orders, start, Server, Sse, ADMIN, ORDERS, TIMEOUT};
use crate::support::{wait_for, TestDb};

pub(super) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(super) async fn ws(s: &Server, path: &str, key: &str) -> Ws {
    let mut req = format!("{}{path}", s.url.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

pub(super) async fn ws_next(ws: &mut Ws) -> Json {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// A feed page as it came.
async fn page_body(s: &Server, name: &str, query: &str) -> Json {
    let r = s
        .get(&format!("/v1/streams/{name}/events?{query}"), ORDERS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// A feed page: (ids of the events, cursor).
pub(super) async fn page(s: &Server, name: &str, query: &str) -> (Vec<i64>, String) {
    let body = page_body(s, name, query).await;
    let ids = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["created"]["id"].as_i64().unwrap())
        .collect();
    (ids, body["cursor"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn subscribe_over_sse_and_websocket() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    let filter = urlencode(r#"{"create": {"status": "new"}}"#);
    let mut sse = Sse::open(s.get(
        &format!("/v1/subscribe?table=orders&filter={filter}"),
        ORDERS,
    ))
    .await;
    let init = sse.expect("initialized").await;
    assert_eq!(init.data["type"], "initialized");
    let mut sock = ws(&s, "/v1/subscribe?table=orders", ORDERS).await;
    assert_eq!(ws_next(&mut sock).await["type"], "initialized");
    db.client()
        .await
        .batch_execute(
            "INSERT INTO orders VALUES (1, 'draft', NULL);
             INSERT INTO orders VALUES (2, 'new', NULL);",
        )
        .await
        .unwrap();
    let ev = sse.expect("change").await;
    assert_eq!(ev.data["created"]["id"], 2, "the filter passed only id 2");
    assert!(ev.data.get("type").is_none());
    assert_eq!(ws_next(&mut sock).await["created"]["id"], 1);
    assert_eq!(ws_next(&mut sock).await["created"]["id"], 2);
    sock.close(None).await.unwrap();
    s.stop().await;
    // Shutdown ends open event streams cleanly.
    assert!(sse.next().await.is_none());
    db.teardown().await;
}

#[tokio::test]
async fn stream_sse_resumes_with_last_event_id_without_loss_or_duplicates() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("orders", "orders", None).await;
    insert_orders(&db, 0..10).await;

    let mut sse = Sse::open(s.get("/v1/streams/orders", ORDERS)).await;
    sse.expect("initialized").await;
    let first = sse.changes(4).await;
    assert_eq!(ids(&first), [0, 1, 2, 3]);
    drop(sse); // a crash after handling four: nothing was acknowledged explicitly

    let last = first[3].id.clone().unwrap();
    s.lease_free("orders").await;
    let mut sse = Sse::new(
        s.get("/v1/streams/orders", ORDERS)
            .header("accept", "text/event-stream")
            .header("last-event-id", &last)
            .send()
            .await
            .unwrap(),
    );
    let init = sse.expect("initialized").await;
    assert_eq!(init.data["position"], last.as_str());
    let rest = sse.changes(6).await;
    assert_eq!(ids(&rest), [4, 5, 6, 7, 8, 9]);

    // Explicit ack while connected moves the stream's cursor.
    let r = s
        .post(
            "/v1/streams/orders/ack",
            ORDERS,
            json!({"position": rest[5].id}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    insert_orders(&db, 10..12).await;
    assert_eq!(ids(&sse.changes(2).await), [10, 11]);
    assert_eq!(
        s.stream_info("orders").await["cursor"],
        rest[5].data["position"]
    );
    drop(sse);
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn feed_pages_cover_every_event_once_and_long_poll() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("feed", "orders", None).await;
    insert_orders(&db, 0..23).await;
    let mut seen = Vec::new();
    let mut cursor = String::new();
    // The log fills asynchronously: page until all 23 are seen.
    while seen.len() < 23 {
        let q = if cursor.is_empty() {
            "limit=7&wait=10".to_owned()
        } else {
            format!("limit=7&wait=10&cursor={cursor}")
        };
        let (ids, next) = page(&s, "feed", &q).await;
        assert!(ids.len() <= 7);
        seen.extend(ids);
        cursor = next;
    }
    assert_eq!(seen, (0..23).collect::<Vec<i64>>());
    // Nothing new: an immediate empty page, the cursor unchanged.
    let (ids, same) = page(&s, "feed", &format!("cursor={cursor}")).await;
    assert!(ids.is_empty());
    assert_eq!(same, cursor);
    // A long poll is answered by the next append.
    let poll = {
        let http = s.http.clone();
        let url = format!("{}/v1/streams/feed/events?wait=30&cursor={cursor}", s.url);
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(ORDERS)
                .send()
                .await
                .unwrap()
                .json::<Json>()
                .await
                .unwrap()
        })
    };
    wait_for("the long poll to be waiting", TIMEOUT, || async {
        let m = s
            .get("/metrics", ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        m.contains("\nwaltap_subscribers 1\n")
    })
    .await;
    insert_orders(&db, 23..24).await;
    let body = tokio::time::timeout(TIMEOUT, poll).await.unwrap().unwrap();
    assert_eq!(body["events"][0]["created"]["id"], 23, "{body}");
    s.stop().await;
    db.teardown().await;
}

/// Pages that end at the last event of a transaction: the next request reads on after it
/// (the log's row there ends the transaction), and one that ends where the stream's
/// filter skipped the transaction's last row reads the transaction again for its
/// numbering; either way each event comes once, numbered within what the stream delivers.
#[tokio::test]
async fn feed_pages_ending_at_a_transaction_end_resume_after_it_numbered_again() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    pages_at_transaction_ends(&db, &s).await;
    s.stop().await;
    db.teardown().await;
}

/// The checks of the test above on server `s` of `db`, whichever its event log.
pub(crate) async fn pages_at_transaction_ends(db: &TestDb, s: &Server) {
    // "odd" delivers the transactions' last rows (3, 7, 11), "early" skips them, "all"
    // takes pages of 3 of transactions of 4, so that most pages end inside one.
    let odd = json!({"create": {"id": {"in": [1, 3, 5, 7, 9, 11]}}});
    let early = json!({"create": {"id": {"in": [0, 1, 4, 5, 8, 9]}}});
    s.create_stream("odd", "orders", Some(odd)).await;
    s.create_stream("early", "orders", Some(early)).await;
    s.create_stream("all", "orders", None).await;
    let c = db.client().await;
    for tx in 0..3 {
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO orders SELECT g, 'new', NULL FROM generate_series({}, {}) g; COMMIT;",
            tx * 4,
            tx * 4 + 3
        ))
        .await
        .unwrap();
    }
    let cases = [
        ("odd", 2, vec![1, 3, 5, 7, 9, 11], 2),
        ("early", 2, vec![0, 1, 4, 5, 8, 9], 2),
        ("all", 3, (0..12).collect(), 4),
    ];
    for (name, limit, want, per_tx) in cases {
        let mut seen: Vec<i64> = Vec::new();
        let mut cursor = String::new();
        while seen.len() < want.len() {
            let mut q = format!("limit={limit}&wait=10");
            if !cursor.is_empty() {
                q.push_str(&format!("&cursor={cursor}"));
            }
            let body = page_body(s, name, &q).await;
            for e in body["events"].as_array().unwrap() {
                // Numbered within the events the stream delivers of its transaction.
                let index = seen.len() % per_tx;
                assert_eq!(e["tx"]["index"], index, "{name}: {e}");
                assert_eq!(e["tx"]["last"], index + 1 == per_tx, "{name}: {e}");
                if !e["tx"]["total"].is_null() {
                    assert_eq!(e["tx"]["total"], per_tx, "{name}: {e}");
                }
                seen.push(e["created"]["id"].as_i64().unwrap());
            }
            cursor = body["cursor"].as_str().unwrap().to_owned();
        }
        assert_eq!(seen, want, "{name}");
        // Nothing more, and the cursor stays where the last page left it.
        let (ids, same) = page(s, name, &format!("cursor={cursor}")).await;
        assert!(ids.is_empty(), "{name}: {ids:?}");
        assert_eq!(same, cursor, "{name}");
    }
}

#[tokio::test]
async fn stream_over_websocket_acknowledges() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("w", "orders", None).await;
    insert_orders(&db, 0..5).await;
    let mut sock = ws(&s, "/v1/streams/w", ORDERS).await;
    assert_eq!(ws_next(&mut sock).await["type"], "initialized");
    let mut positions = Vec::new();
    for id in 0..5 {
        let ev = ws_next(&mut sock).await;
        assert_eq!(ev["created"]["id"], id);
        positions.push(ev["position"].as_str().unwrap().to_owned());
    }
    sock.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(ws_next(&mut sock).await["error"]["code"], "bad_request");
    sock.send(Message::Text(
        json!({"ack": positions[2]}).to_string().into(),
    ))
    .await
    .unwrap();
    // The ack is applied in order with the messages: once the cursor shows it, close.
    wait_for("the ack to be stored", TIMEOUT, || async {
        let info: Json = s
            .get("/v1/streams", ORDERS)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        info["streams"][0]["cursor"] == positions[2].as_str()
    })
    .await;
    sock.close(None).await.unwrap();
    s.lease_free("w").await;
    let (ids, _) = page(&s, "w", "limit=100&wait=5").await;
    assert_eq!(
        ids,
        [3, 4],
        "after the ack, only what followed it comes again"
    );
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn slow_subscriber_is_cut_off_while_a_stream_loses_nothing() {
    let db = TestDb::new().await;
    let s = start(&db, |c| c.subscriber_queue = 8).await;
    s.create_stream("keep", "orders", None).await;
    let mut slow = Sse::open(s.get("/v1/subscribe?table=orders", ADMIN)).await;
    slow.expect("initialized").await;
    let mut stream = Sse::open(s.get("/v1/streams/keep", ORDERS)).await;
    stream.expect("initialized").await;
    // Large rows, so the slow client's socket buffers fill and the hub's queue overflows.
    let c = db.client().await;
    const N: i32 = 600;
    for chunk in 0..(N / 100) {
        c.execute(
            "INSERT INTO orders SELECT g, 'new', repeat('x', 20000) FROM generate_series($1::int, $2::int) g",
            &[&(chunk * 100), &(chunk * 100 + 99)],
        )
        .await
        .unwrap();
    }
    let got = stream.changes(N as usize).await;
    assert_eq!(
        ids(&got),
        (0..N as i64).collect::<Vec<_>>(),
        "the stream lost or reordered events"
    );
    // The slow one reads now: some events, then the lagged error, then the end.
    let mut events = 0;
    let code = loop {
        let f = slow.next().await.expect("the lagged error before the end");
        match f.event.as_str() {
            "change" => events += 1,
            "error" => break f.data["error"]["code"].as_str().unwrap().to_owned(),
            other => panic!("unexpected {other}"),
        }
    };
    assert_eq!(code, "lagged");
    assert!(events < N, "the slow subscriber was not cut off");
    assert!(slow.next().await.is_none());
    drop(stream);
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn two_hundred_sse_clients_all_get_the_events() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut c = Sse::open(s.get("/v1/subscribe?table=orders", ORDERS)).await;
        c.expect("initialized").await;
        clients.push(c);
    }
    insert_orders(&db, 0..5).await;
    let readers = clients
        .into_iter()
        .map(|mut c| async move { ids(&c.changes(5).await) });
    let all = futures::future::join_all(readers).await;
    let distinct: BTreeSet<Vec<i64>> = all.into_iter().collect();
    assert_eq!(distinct, BTreeSet::from([vec![0, 1, 2, 3, 4]]));
    s.stop().await;
    db.teardown().await;
}

pub(super) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn stale_cursor_is_gone_with_advice_and_stream_tokens_open_one_stream() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("old", "orders", None).await;
    s.create_stream("other", "orders", None).await;
    insert_orders(&db, 0..3).await;

    // A token for one stream, resuming after its first event.
    let token = s.token(ORDERS, json!({"stream": "old"})).await;
    let mut sse = Sse::open(
        s.http
            .get(format!("{}/v1/streams/old?token={token}", s.url)),
    )
    .await;
    sse.expect("initialized").await;
    let first = sse.changes(3).await;
    drop(sse);
    let r = s
        .http
        .get(format!("{}/v1/streams/other?token={token}", s.url))
        .header("accept", "text/event-stream");
    assert_eq!(super::error_code(r, 403).await, "forbidden");

    // Retention deletes what "old" has not acknowledged.
    let source = s.stream_info("old").await["source"]
        .as_str()
        .unwrap()
        .to_owned();
    let pruned = super::expire_log(&mut db.client().await, &source).await;
    assert_eq!(pruned, 3);
    s.lease_free("old").await;
    let r = s
        .get("/v1/streams/old/events", ORDERS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let body: Json = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "stale_cursor");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the current rows"),
        "{body}"
    );
    // A cursor past the pruned events is not stale: acknowledging them resumes.
    let cursor = first[2].id.clone().unwrap();
    let (ids, _) = page(&s, "old", &format!("cursor={cursor}")).await;
    assert!(ids.is_empty());

    // The way out the advice names: reset with the initial state, over HTTP.
    s.create_stream("gone", "orders", None).await;
    let r = s
        .get("/v1/streams/gone/events", ORDERS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "made after the prune: not stale");
    s.lease_free("gone").await;
    let r = s
        .post(
            "/v1/streams/gone/reset",
            ORDERS,
            json!({"initialState": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let body: Json = s
        .get("/v1/streams/gone/events?limit=10&wait=5", ORDERS)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows: Vec<i64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["action"] == "snapshot")
        .map(|i| i["row"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(rows, [0, 1, 2], "starts over with the current rows");
    assert_eq!(body["events"][3]["type"], "snapshotComplete");
    s.stop().await;
    db.teardown().await;
}

/// Clients send only small control messages: a large one (whole or in fragments that
/// never end) closes the connection instead of filling the server's memory.
#[tokio::test]
async fn large_websocket_messages_close_the_connection() {
    let db = TestDb::new().await;
    let server = start(&db, |_| {}).await;
    let mut sock = ws(&server, "/v1/subscribe?table=orders", ORDERS).await;
    assert_eq!(ws_next(&mut sock).await["type"], "initialized");
    let _ = sock.send(Message::Text("x".repeat(64 * 1024).into())).await;
    loop {
        match tokio::time::timeout(TIMEOUT, sock.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the connection stayed open after a 64 KiB message"),
        }
    }
    server.stop().await;
    db.teardown().await;
}
