//! Probes of issue 15 ("Hardening waltap serve"): quoted and dotted table names reach
//! exactly their table, only published tables are delivered, acknowledgements cannot run
//! ahead of delivery, and every error is the JSON error shape.

use futures::SinkExt;
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::Message;
use waltap::server::Keys;

use super::delivery::{page, urlencode, ws, ws_next};
use super::{error_code, insert_orders, start, Server, Sse, ADMIN, KEYS, ORDERS, TIMEOUT};
use crate::support::{wait_for, TestDb};

/// Only `"My Schema"."We""ird Tab"` and `public."a.b"`; streams.
const WEIRD: &str = "weird-key-cdef";

/// Two pairs of tables whose names differ only by quoting: a key and its decoy.
const WEIRD_DDL: &str = r#"
    CREATE SCHEMA "My Schema";
    CREATE TABLE "My Schema"."We""ird Tab" (id int PRIMARY KEY, v text);
    CREATE TABLE "My Schema"."Weird Tab" (id int PRIMARY KEY, v text);
    CREATE TABLE public."a.b" (id int PRIMARY KEY, v text);
    CREATE TABLE public.ab (id int PRIMARY KEY, v text);
    INSERT INTO "My Schema"."Weird Tab" VALUES (100, 'decoy');
    INSERT INTO "My Schema"."We""ird Tab" VALUES (200, 'target');"#;

const TARGET: &str = r#""My Schema"."We""ird Tab""#;

async fn start_weird(db: &TestDb) -> Server {
    db.client().await.batch_execute(WEIRD_DDL).await.unwrap();
    let keys = format!(
        "{KEYS}\n[[key]]\nsecret = \"{WEIRD}\"\ntables = ['{TARGET}', 'public.\"a.b\"']\nstreams = true\n"
    );
    start(db, |c| c.keys = Keys::from_toml(&keys, None).unwrap()).await
}

async fn sql(db: &TestDb, text: &str) {
    db.client().await.batch_execute(text).await.unwrap();
}

/// Row `100 + n` into the decoy, then row `200 + n` into the target, one commit each.
async fn insert_both(db: &TestDb, n: i32) {
    let c = db.client().await;
    for (table, id) in [(r#""My Schema"."Weird Tab""#, 100 + n), (TARGET, 200 + n)] {
        c.execute(&format!("INSERT INTO {table} VALUES ($1, 'x')"), &[&id])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn quoted_and_dotted_table_names_reach_exactly_their_table() {
    let db = TestDb::new().await;
    let s = start_weird(&db).await;

    // Subscribe, with the initial state: the rows and changes of the named table only.
    let mut sse = Sse::open(s.get(
        &format!(
            "/v1/subscribe?table={}&initialState=true",
            urlencode(TARGET)
        ),
        WEIRD,
    ))
    .await;
    sse.expect("initialized").await;
    loop {
        let f = sse.next().await.expect("the rows, then the marker");
        match f.event.as_str() {
            "snapshot" => assert_eq!(f.data["row"]["id"], 200, "{f:?}"),
            "snapshotComplete" => break,
            other => panic!("unexpected {other}: {f:?}"),
        }
    }
    insert_both(&db, 1).await;
    let change = sse.expect("change").await;
    assert_eq!(change.data["created"]["id"], 201, "{change:?}");
    assert_eq!(change.data["schema"], "My Schema");
    assert_eq!(change.data["table"], "We\"ird Tab");
    drop(sse);

    // A token keeps the table as schema and name: `public."a.b"` is not `public.ab`.
    let token = s.token(WEIRD, json!({"table": "public.\"a.b\""})).await;
    let mut sse = Sse::open(s.http.get(format!("{}/v1/subscribe?token={token}", s.url))).await;
    sse.expect("initialized").await;
    sql(&db, "INSERT INTO public.ab VALUES (1, 'decoy')").await;
    sql(&db, r#"INSERT INTO public."a.b" VALUES (2, 'target')"#).await;
    let change = sse.expect("change").await;
    assert_eq!(change.data["created"]["id"], 2, "{change:?}");
    assert_eq!(change.data["table"], "a.b");
    drop(sse);

    // Text that names no table unambiguously is refused, not read as some other table.
    for bad in ["public.a.b", "\"open", "public.", ""] {
        assert_eq!(
            error_code(
                s.get(&format!("/v1/subscribe?table={}", urlencode(bad)), ADMIN),
                400
            )
            .await,
            "bad_request",
            "{bad:?}"
        );
    }

    // A stream keeps the quoting in its stored table list and reads that table only.
    let r = s
        .post(
            "/v1/streams",
            WEIRD,
            json!({"name": "weird", "table": TARGET}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let info: Json = r.json().await.unwrap();
    // Quoted only where reading it back needs it.
    assert_eq!(
        info["tables"],
        json!([r#"My Schema."We""ird Tab""#]),
        "{info}"
    );
    insert_both(&db, 2).await;
    let r = s
        .get("/v1/streams/weird/events?wait=10", WEIRD)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Json = r.json().await.unwrap();
    let events = body["events"].as_array().unwrap();
    assert!(!events.is_empty(), "{body}");
    for e in events {
        assert_eq!(e["table"], "We\"ird Tab", "{body}");
        assert_eq!(e["created"]["id"], 202, "{body}");
    }
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn only_published_tables_are_delivered() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    // A key for every table (`*`) still gets no system catalog and no waltap table.
    for table in [
        "pg_catalog.pg_authid",
        "information_schema.tables",
        "waltap.streams",
        "waltap.events",
    ] {
        let stream = json!({"name": "leak", "table": table, "initialState": true});
        assert_eq!(
            error_code(s.post("/v1/streams", ADMIN, stream), 400).await,
            "unknown_table",
            "{table}"
        );
        assert_eq!(
            error_code(s.post("/v1/tokens", ADMIN, json!({"table": table})), 400).await,
            "unknown_table",
            "{table}"
        );
        assert_eq!(
            error_code(s.get(&format!("/v1/subscribe?table={table}"), ADMIN), 400).await,
            "unknown_table",
            "{table}"
        );
    }

    // A stream made before the check (here: its table list rewritten underneath) is not
    // delivered either, and its initial state is not copied.
    s.create_stream("legacy", "orders", None).await;
    sql(
        &db,
        "UPDATE waltap.streams SET tables = '{pg_catalog.pg_authid}', snapshot_state = 'pending'
         WHERE name = 'legacy'",
    )
    .await;
    let r = s
        .get("/v1/streams/legacy/events?wait=1", ADMIN)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        !body.contains("SCRAM") && !body.contains("rolpassword"),
        "{body}"
    );
    assert_eq!(
        error_code(
            s.post("/v1/tokens", ADMIN, json!({"stream": "legacy"})),
            400
        )
        .await,
        "unknown_table"
    );

    // `waltap export` (and every initial-state copy) goes through the same check.
    let source = s.stream_info("legacy").await["source"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = crate::support::output(crate::support::waltap(
        &db.url(),
        &["export", "--slot", &source, "pg_catalog.pg_authid"],
    ))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "export of an unpublished table succeeded"
    );
    assert!(
        out.stdout.is_empty(),
        "export printed rows: {:?}",
        out.stdout
    );
    assert!(
        stderr.contains("not one of the source's published tables"),
        "{stderr}"
    );
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn acknowledgements_cannot_run_ahead_of_delivery() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("acks", "orders", None).await;
    insert_orders(&db, 1..5).await;
    let (first, c1) = page(&s, "acks", "limit=1&wait=10").await;
    assert_eq!(first, [1]);
    let cursor = s.stream_info("acks").await["cursor"].clone();

    // Far beyond what the stream delivered, and beyond any LSN the store can hold.
    for ahead in ["00000000FFFFFFFF-0000000000", "8000000000000000-0000000000"] {
        assert_eq!(
            error_code(
                s.post("/v1/streams/acks/ack", ORDERS, json!({"position": ahead})),
                400
            )
            .await,
            "bad_request",
            "{ahead}"
        );
        assert_eq!(
            error_code(
                s.get(&format!("/v1/streams/acks/events?cursor={ahead}"), ORDERS),
                400
            )
            .await,
            "bad_request"
        );
        assert_eq!(
            error_code(
                s.get("/v1/streams/acks", ORDERS)
                    .header("accept", "text/event-stream")
                    .header("last-event-id", ahead),
                400
            )
            .await,
            "bad_request"
        );
        // A stream token cannot blind the stream either.
        let token = s.token(ORDERS, json!({"stream": "acks"})).await;
        assert_eq!(
            error_code(
                s.http.get(format!(
                    "{}/v1/streams/acks/events?token={token}&cursor={ahead}",
                    s.url
                )),
                400
            )
            .await,
            "bad_request"
        );
    }
    // A new stream may start ahead of the log (a position from a subscription can be),
    // but not beyond any LSN the store can hold.
    let from = json!({"name": "later", "table": "orders", "from": "8000000000000000-0000000000"});
    assert_eq!(
        error_code(s.post("/v1/streams", ADMIN, from), 400).await,
        "bad_request"
    );
    assert_eq!(
        error_code(
            s.get("/v1/streams/acks/events?cursor=snapshot-5", ORDERS),
            400
        )
        .await,
        "bad_request"
    );
    assert_eq!(
        s.stream_info("acks").await["cursor"],
        cursor,
        "nothing moved"
    );

    // Over a WebSocket: the ack is refused with an error item and the session goes on.
    s.lease_free("acks").await;
    let mut sock = ws(&s, "/v1/streams/acks", ORDERS).await;
    assert_eq!(ws_next(&mut sock).await["type"], "initialized");
    assert_eq!(ws_next(&mut sock).await["created"]["id"], 1);
    sock.send(Message::Text(
        json!({"ack": "00000000FFFFFFFF-0000000000"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let (mut ids, mut refused) = (Vec::new(), false);
    while ids.len() < 3 || !refused {
        let item = ws_next(&mut sock).await;
        match item["type"].as_str() {
            Some("error") => {
                assert_eq!(item["error"]["code"], "bad_request", "{item}");
                refused = true;
            }
            _ => ids.push(item["created"]["id"].as_i64().unwrap()),
        }
    }
    assert_eq!(ids, [2, 3, 4]);
    drop(sock);
    s.lease_free("acks").await;
    assert_eq!(
        s.stream_info("acks").await["cursor"],
        cursor,
        "nothing moved"
    );

    // What was delivered is acknowledged as before, and nothing after it was skipped.
    let (rest, _) = page(&s, "acks", &format!("cursor={c1}&wait=10")).await;
    assert_eq!(rest, [2, 3, 4]);
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn every_error_is_json_and_tells_nothing_it_should_not() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    let url = |p: &str| format!("{}{p}", s.url);
    let json_error = |status: u16, code: &'static str, req: reqwest::RequestBuilder| async move {
        let r = req.send().await.unwrap();
        let got = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(got, status, "{text}");
        let body: Json =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(!text.contains("SQLSTATE"), "{text}");
        text
    };

    // Names no stream can have.
    json_error(400, "bad_request", s.get("/v1/streams/a%00b", ADMIN)).await;
    json_error(400, "bad_request", s.get("/v1/streams/a%00b/events", ADMIN)).await;
    for name in ["a\u{0}b", ".", ".."] {
        json_error(
            400,
            "bad_request",
            s.post(
                "/v1/streams",
                ADMIN,
                json!({"name": name, "table": "orders"}),
            ),
        )
        .await;
    }
    // What the framework refuses: query strings, paths, methods.
    json_error(
        400,
        "bad_request",
        s.get("/v1/streams/x/events?limit=abc", ADMIN),
    )
    .await;
    json_error(
        400,
        "bad_request",
        s.get("/v1/subscribe?table=orders&initialState=maybe", ADMIN),
    )
    .await;
    json_error(400, "bad_request", s.get("/v1/streams/%FF", ADMIN)).await;
    json_error(
        405,
        "method_not_allowed",
        s.http.delete(url("/v1/tokens")).bearer_auth(ADMIN),
    )
    .await;
    json_error(
        405,
        "method_not_allowed",
        s.http.put(url("/v1/streams")).bearer_auth(ADMIN),
    )
    .await;

    // A stream the key may not read is answered as a missing one.
    s.create_stream("user-changes", "users", None).await;
    let forbidden = json_error(404, "not_found", s.get("/v1/streams/user-changes", ORDERS)).await;
    let missing = json_error(404, "not_found", s.get("/v1/streams/nothing-here", ORDERS)).await;
    assert_eq!(
        forbidden.replace("user-changes", "nothing-here"),
        missing,
        "the answers differ"
    );

    // Delivery tokens open neither the metrics nor the API document.
    let token = s.token(ORDERS, json!({"table": "orders"})).await;
    for path in ["/metrics", "/v1/openapi.json"] {
        json_error(
            403,
            "forbidden",
            s.http.get(url(&format!("{path}?token={token}"))),
        )
        .await;
    }
    // A filter naming a column the table lacks is refused when the token is minted.
    json_error(
        400,
        "bad_filter",
        s.post(
            "/v1/tokens",
            ORDERS,
            json!({"table": "orders", "filter": {"where": {"nope": {"equals": 1}}}}),
        ),
    )
    .await;
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn idle_health_reports_no_lag() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    insert_orders(&db, 1..2).await;
    let c = db.client().await;
    wait_for("the log to hold the row", TIMEOUT, || async {
        c.query_one("SELECT count(*) FROM waltap.events", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) > 0)
    })
    .await;
    // The newest event is old (as after a quiet hour); nothing is waiting.
    c.batch_execute(
        "UPDATE waltap.events
         SET event = jsonb_set(event::jsonb, '{tx,committedAt}', '\"2020-01-01T00:00:00Z\"')::json",
    )
    .await
    .unwrap();
    // WAL that carries no change for the log (DDL) moves the server's position ahead of
    // the slot's for a moment, as on any idle server.
    let mut n = 0;
    let health = wait_for_value(|| {
        n += 1;
        let c = &c;
        let s = &s;
        let ddl = format!("CREATE TABLE wal_{n} (); DROP TABLE wal_{n}");
        async move {
            c.batch_execute(&ddl).await.unwrap();
            let h: Json = s
                .http
                .get(format!("{}/healthz", s.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (h["replication"]["lagBytes"].as_i64().unwrap_or(0) > 0).then_some(h)
        }
    })
    .await;
    let lag = health["replication"]["lagSeconds"].as_f64().unwrap();
    assert!(
        lag < 60.0,
        "an idle server reported {lag} s of lag: {health}"
    );
    s.stop().await;
    db.teardown().await;
}

/// Polls `probe` until it returns a value.
async fn wait_for_value<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::task::yield_now().await;
    }
}
