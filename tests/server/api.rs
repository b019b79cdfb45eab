//! Authentication, authorization, tokens, limits, management endpoints, health, metrics
//! and the OpenAPI document.

use serde_json::{json, Value as Json};

use super::{error_code, start, Sse, ADMIN, ORDERS, TIMEOUT, USERS};
use crate::support::{wait_for, TestDb};

#[tokio::test]
async fn keys_are_required_checked_and_scoped() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    let url = |p: &str| format!("{}{p}", s.url);

    // /healthz is open; everything else needs a valid key.
    let health: Json = s
        .http
        .get(url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(
        error_code(s.http.get(url("/v1/streams")), 401).await,
        "unauthorized"
    );
    assert_eq!(
        error_code(s.get("/v1/streams", "not-a-key"), 401).await,
        "unauthorized"
    );
    assert_eq!(
        error_code(
            s.get("/v1/subscribe?table=orders", &format!("{ADMIN}x")),
            401
        )
        .await,
        "unauthorized"
    );

    // A table outside the key's list is refused before anything is read.
    assert_eq!(
        error_code(s.get("/v1/subscribe?table=users", ORDERS), 403).await,
        "forbidden"
    );
    assert_eq!(
        error_code(s.get("/v1/subscribe?table=public.orders", USERS), 403).await,
        "forbidden"
    );
    // A key without stream rights manages no streams.
    assert_eq!(
        error_code(s.get("/v1/streams", USERS), 403).await,
        "forbidden"
    );
    assert_eq!(
        error_code(
            s.post("/v1/streams", USERS, json!({"name": "u", "table": "users"})),
            403
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        error_code(
            s.post(
                "/v1/streams",
                ORDERS,
                json!({"name": "u", "table": "users"}),
            ),
            403
        )
        .await,
        "forbidden"
    );

    // A stream made by the admin on `users`: the orders key cannot see, read or delete it.
    s.create_stream("user-changes", "users", None).await;
    db.client()
        .await
        .batch_execute("INSERT INTO users VALUES (1, 'pro')")
        .await
        .unwrap();
    let listed: Json = s
        .get("/v1/streams", ORDERS)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["streams"], json!([]), "{listed}");
    for path in [
        "/v1/streams/user-changes",
        "/v1/streams/user-changes/events",
    ] {
        let r = s.get(path, ORDERS).send().await.unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        // Answered as a stream that does not exist: the key learns nothing of it.
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("forbidden"), "{body}");
        assert!(
            !body.contains("pro"),
            "a forbidden read leaked a row: {body}"
        );
    }
    assert_eq!(
        error_code(
            s.http
                .delete(format!("{}/v1/streams/user-changes", s.url))
                .bearer_auth(ORDERS),
            404
        )
        .await,
        "not_found"
    );
    assert_eq!(
        error_code(
            s.post(
                "/v1/streams/user-changes/ack",
                ORDERS,
                json!({"position": "0000000000000001-0000000000"}),
            ),
            404
        )
        .await,
        "not_found"
    );
    // A token cannot widen its key's rights.
    assert_eq!(
        error_code(s.post("/v1/tokens", ORDERS, json!({"table": "users"})), 403).await,
        "forbidden"
    );
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn tokens_open_delivery_and_fail_when_tampered_or_expired() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    let token = s
        .token(ORDERS, json!({"table": "orders", "filter": {"create": {}}}))
        .await;
    let mut sse = Sse::open(s.http.get(format!("{}/v1/subscribe?token={token}", s.url))).await;
    sse.expect("initialized").await;
    db.client()
        .await
        .batch_execute("UPDATE orders SET status = 'x'; INSERT INTO orders VALUES (1, 'new', NULL)")
        .await
        .unwrap();
    let ev = sse.expect("change").await;
    assert_eq!(ev.data["action"], "create");
    assert_eq!(ev.id.as_deref(), ev.data["position"].as_str());

    // Tampered: another table in the payload, the same signature.
    let (payload, sig) = token.split_once('.').unwrap();
    let other = s.token(ORDERS, json!({"table": "orders"})).await;
    let forged = format!("{}.{sig}", other.split_once('.').unwrap().0);
    assert_ne!(forged, token);
    for bad in [
        forged,
        format!("{payload}.AAAA{sig}"),
        "nonsense".to_owned(),
    ] {
        assert_eq!(
            error_code(
                s.http.get(format!("{}/v1/subscribe?token={bad}", s.url)),
                401
            )
            .await,
            "unauthorized"
        );
    }
    // A token opens delivery only, not management, and not another table.
    assert_eq!(
        error_code(
            s.http.get(format!("{}/v1/streams?token={token}", s.url)),
            403
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        error_code(
            s.http
                .get(format!("{}/v1/subscribe?token={token}&table=users", s.url)),
            400
        )
        .await,
        "bad_request"
    );

    // Expired: wait (on the condition, not a fixed sleep) until the server says so.
    let short = s
        .token(ORDERS, json!({"table": "orders", "ttlSeconds": 1}))
        .await;
    wait_for("the token to expire", TIMEOUT, || async {
        let r = s
            .http
            .get(format!("{}/v1/subscribe?token={short}", s.url))
            .send()
            .await
            .unwrap();
        r.status() == 401 && r.json::<Json>().await.unwrap()["error"]["code"] == "token_expired"
    })
    .await;
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn bad_input_and_limits_are_refused_with_codes() {
    let db = TestDb::new().await;
    let s = start(&db, |c| c.limits.connections_per_key = 1).await;
    assert_eq!(
        error_code(
            s.get("/v1/subscribe?table=orders&filter=%7Bnope", ADMIN),
            400
        )
        .await,
        "bad_filter"
    );
    assert_eq!(
        error_code(
            s.get(
                "/v1/subscribe?table=orders&filter=%7B%22create%22%3A%7B%22missing%22%3A1%7D%7D",
                ADMIN,
            ),
            400
        )
        .await,
        "bad_filter"
    );
    let mut deep = json!({"status": "x"});
    for _ in 0..40 {
        deep = json!({"NOT": deep});
    }
    assert_eq!(
        error_code(
            s.post(
                "/v1/streams",
                ADMIN,
                json!({"name": "deep", "table": "orders", "filter": {"create": deep}}),
            ),
            400
        )
        .await,
        "bad_filter"
    );
    assert_eq!(
        error_code(
            s.post(
                "/v1/streams",
                ADMIN,
                json!({"name": "bad name!", "table": "orders"}),
            ),
            400
        )
        .await,
        "bad_request"
    );
    let huge = "x".repeat(200_000);
    let r = s
        .post(
            "/v1/streams",
            ADMIN,
            json!({"name": "big", "table": "orders", "filter": {"create": {"status": huge}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        error_code(s.get("/v1/streams/nope/events", ADMIN), 404).await,
        "not_found"
    );
    assert_eq!(
        error_code(s.get("/v1/nowhere", ADMIN), 404).await,
        "not_found"
    );

    // One connection per key here: a second is refused while the first is open.
    let mut first = Sse::open(s.get("/v1/subscribe?table=orders", ADMIN)).await;
    first.expect("initialized").await;
    assert_eq!(
        error_code(s.get("/v1/subscribe?table=orders", ADMIN), 429).await,
        "too_many_connections"
    );
    // Another key has its own allowance.
    let mut other = Sse::open(s.get("/v1/subscribe?table=orders", ORDERS)).await;
    other.expect("initialized").await;
    drop(first);
    wait_for("the connection slot to be freed", TIMEOUT, || async {
        s.get("/v1/streams/nope/events", ADMIN)
            .send()
            .await
            .unwrap()
            .status()
            == 404
    })
    .await;
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn streams_are_managed_and_leased() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream(
        "billing",
        "orders",
        Some(json!({"update": {"after": {"status": "paid"}}})),
    )
    .await;
    assert_eq!(
        error_code(
            s.post(
                "/v1/streams",
                ORDERS,
                json!({"name": "billing", "table": "orders"}),
            ),
            409
        )
        .await,
        "conflict"
    );
    let listed: Json = s
        .get("/v1/streams", ORDERS)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["streams"][0]["name"], "billing", "{listed}");
    assert_eq!(listed["streams"][0]["tables"], json!(["public.orders"]));
    assert_eq!(s.stream_info("billing").await["name"], "billing");

    // One consumer at a time.
    let mut consumer = Sse::open(s.get("/v1/streams/billing", ORDERS)).await;
    consumer.expect("initialized").await;
    assert_eq!(
        error_code(
            s.get("/v1/streams/billing", ORDERS)
                .header("accept", "text/event-stream"),
            409
        )
        .await,
        "stream_busy"
    );
    assert_eq!(
        error_code(s.get("/v1/streams/billing/events", ORDERS), 409).await,
        "stream_busy"
    );
    drop(consumer);
    wait_for("the lease to be released", TIMEOUT, || async {
        s.get("/v1/streams/billing/events", ORDERS)
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;

    let r = s
        .http
        .delete(format!("{}/v1/streams/billing", s.url))
        .bearer_auth(ORDERS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        error_code(s.get("/v1/streams/billing/events", ORDERS), 404).await,
        "not_found"
    );
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("m", "orders", None).await;
    super::insert_orders(&db, 0..3).await;
    let mut sse = Sse::open(s.get("/v1/streams/m", ADMIN)).await;
    sse.expect("initialized").await;
    sse.changes(3).await;

    assert_eq!(
        error_code(s.http.get(format!("{}/metrics", s.url)), 401).await,
        "unauthorized"
    );
    let text = s
        .get("/metrics", ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("waltap_replication_connected"), 1.0);
    assert!(value("waltap_events_in_total") >= 3.0);
    assert!(value("waltap_events_out_total") >= 3.0);
    assert_eq!(value("waltap_subscribers"), 1.0);
    assert!(value("waltap_errors_total") >= 1.0); // the 401 above
    assert!(value("waltap_log_bytes") > 0.0);
    value("waltap_replication_lag_bytes");
    value("waltap_replication_lag_seconds");

    // The document is served, and every route of the router answers (none is missing).
    let doc: Json = s
        .get("/v1/openapi.json", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (method, path) in waltap::server::ROUTES {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        let path = path.replace("{name}", "m");
        let req = s.http.request(
            method.to_uppercase().parse().unwrap(),
            format!("{}{path}", s.url),
        );
        let r = req
            .bearer_auth(USERS)
            .header("accept", "application/json")
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            let body: Json = r.json().await.unwrap();
            assert_ne!(
                body["error"]["message"], "no such endpoint",
                "{method} {path}"
            );
        }
    }
    drop(sse);
    s.stop().await;
    db.teardown().await;
}
