//! Initial state over HTTP: subscribe with `initialState=true`, and a stream made with an
//! initial state consumed over SSE (resuming mid-snapshot with `Last-Event-ID`) and the
//! feed (paging through the rows with `snapshot-<seq>` cursors).

use serde_json::{json, Value as Json};

use super::{insert_orders, start, Sse, ADMIN, ORDERS, TIMEOUT};
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
