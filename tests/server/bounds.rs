//! The server under attack and under a flaky network: subscriptions outlive the
//! pipeline's walsender and a Postgres restart; connections, sockets, messages and shutdown are bounded.

use serde_json::Value as Json;

use super::{insert_orders, start, Server, Sse, ORDERS, TIMEOUT};
use crate::support::{cluster::Cluster, wait_for, TestDb};

/// The subscription a client opens again after an interruption, once the hub takes it.
async fn subscribe_again(server: &Server) -> Sse {
    let opened = std::sync::Mutex::new(None);
    let cell = &opened;
    wait_for(
        "the hub to take subscribers again",
        TIMEOUT,
        || async move {
            let r = server
                .get("/v1/subscribe?table=orders", ORDERS)
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap();
            if r.status() != 200 {
                let body: Json = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "source_unavailable", "{body}");
                return false;
            }
            *cell.lock().unwrap() = Some(Sse::new(r));
            true
        },
    )
    .await;
    let mut sse = opened.into_inner().unwrap().unwrap();
    sse.expect("initialized").await;
    sse
}

/// A new subscription gets the next change (order `id`) and `/healthz` is ok again; then
/// stops.
async fn delivers_again(server: Server, db: TestDb, id: i32) {
    let mut sse = subscribe_again(&server).await;
    insert_orders(&db, id..id + 1).await;
    let f = sse.expect("change").await;
    assert_eq!(f.data["created"]["id"], id);
    wait_for("/healthz to say ok", TIMEOUT, || async {
        health(&server).await.0 == 200
    })
    .await;
    server.stop().await;
    db.teardown().await;
}

/// A cluster of the test's own, or `None` (test skipped) without server binaries.
async fn dedicated_cluster() -> Option<Cluster> {
    match tokio::task::spawn_blocking(Cluster::start_dedicated)
        .await
        .unwrap()
    {
        Ok(c) => Some(c),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

async fn health(server: &Server) -> (u16, Json) {
    let r = server
        .http
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Subscriptions are fed from the event log: the server's one walsender is its
/// pipeline's, and ending it interrupts no subscription (the pipeline reconnects and the
/// log carries on from where it was).
#[tokio::test]
async fn subscriptions_read_the_log_and_outlive_the_pipelines_walsender() {
    let db = TestDb::new().await;
    let server = start(&db, |_| {}).await;
    let mut sse = Sse::open(server.get("/v1/subscribe?table=orders", ORDERS)).await;
    sse.expect("initialized").await;
    let client = db.client().await;
    let walsenders = || async {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE active), count(*) FILTER (WHERE temporary)
                 FROM pg_replication_slots WHERE database = current_database()",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    wait_for("the pipeline to stream", TIMEOUT, || async {
        walsenders().await.0 == 1
    })
    .await;
    assert_eq!(
        walsenders().await,
        (1, 0),
        "one walsender, no slot of the hub's own"
    );

    insert_orders(&db, 0..1).await;
    assert_eq!(sse.expect("change").await.data["created"]["id"], 0);
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots
             WHERE database = current_database() AND active_pid IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    insert_orders(&db, 1..2).await;
    let f = sse.expect("change").await;
    assert_eq!(f.data["created"]["id"], 1, "{f:?}");
    drop(sse);
    delivers_again(server, db, 2).await;
}

/// Postgres restarted under the server: open subscriptions pause and go on with nothing
/// missed (their hub reads the log again from where it was); meanwhile `/healthz` says
/// so and new subscriptions are refused with `source_unavailable`.
#[tokio::test]
async fn subscriptions_survive_a_postgres_restart_and_healthz_says_so_meanwhile() {
    let Some(cluster) = dedicated_cluster().await else {
        return;
    };
    let db = TestDb::new_on(&cluster).await;
    let server = start(&db, |_| {}).await;
    let mut sse = Sse::open(server.get("/v1/subscribe?table=orders", ORDERS)).await;
    sse.expect("initialized").await;

    cluster.stop_immediate();
    wait_for("/healthz to report the outage", TIMEOUT, || async {
        let (status, body) = health(&server).await;
        status == 503 && body["subscriptions"]["streaming"] == false
    })
    .await;
    let (_, body) = health(&server).await;
    assert!(body["reason"].is_string(), "{body}");
    let r = server
        .get("/v1/subscribe?table=orders", ORDERS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let refused: Json = r.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "source_unavailable", "{refused}");

    cluster.start();
    insert_orders(&db, 5..6).await;
    let f = sse.expect("change").await;
    assert_eq!(
        f.data["created"]["id"], 5,
        "the open subscription goes on: {f:?}"
    );
    drop(sse);
    delivers_again(server, db, 6).await;
}

/// Stream consumers share a bounded pool: more consumers than a default Postgres
/// (`max_connections = 100`) has connections read and are woken by appends.
/// `WALTAP_TEST_CONSUMERS` sets how many (default 120).
#[tokio::test]
async fn many_stream_consumers_share_a_bounded_pool() {
    let Some(cluster) = dedicated_cluster().await else {
        return;
    };
    let n: usize = std::env::var("WALTAP_TEST_CONSUMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    {
        let admin = TestDb::new_on(&cluster).await;
        admin
            .client()
            .await
            .batch_execute("ALTER SYSTEM SET max_connections = 100")
            .await
            .unwrap();
        admin.teardown().await;
    }
    cluster.restart_immediate();
    let db = TestDb::new_on(&cluster).await;
    let server = start(&db, |_| {}).await;
    for i in 0..n {
        server.create_stream(&format!("s{i}"), "orders", None).await;
    }
    let mut consumers = Vec::with_capacity(n);
    for i in 0..n {
        let mut sse = Sse::open(server.get(&format!("/v1/streams/s{i}"), super::ADMIN)).await;
        sse.expect("initialized").await;
        consumers.push(sse);
    }
    insert_orders(&db, 0..1).await;
    for sse in &mut consumers {
        let f = sse.expect("change").await;
        assert_eq!(f.data["created"]["id"], 0);
    }
    let backends: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'waltap'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("{n} stream consumers; {backends} waltap backends on the database");
    // The pool, the one listening, the pipeline's and the hub's, and the server's own.
    let bound = waltap::log::DEFAULT_POOL_SIZE as i64 + 10;
    assert!(backends <= bound, "{backends} backends for {n} consumers");
    drop(consumers);
    server.stop().await;
    db.teardown().await;
}

/// Sockets that send the start of a request head and nothing more.
async fn unfinished_requests(server: &Server, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        sockets.push(s);
    }
    sockets
}

/// Waits until the server closed the socket (EOF or reset, after any answer).
async fn closed_by_server(mut s: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept an unfinished request open for {TIMEOUT:?}"),
        }
    }
}

/// A client with no kept-alive connections: each request is a new connection.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test]
async fn unfinished_requests_are_closed_after_the_header_timeout() {
    let db = TestDb::new().await;
    let server = start(&db, |c| {
        c.limits.header_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let sockets = unfinished_requests(&server, 50).await;
    for s in sockets {
        closed_by_server(s).await;
    }
    server.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn healthz_answers_while_the_connection_cap_is_reached() {
    let db = TestDb::new().await;
    let server = start(&db, |c| {
        c.limits.max_connections = 20;
        c.limits.header_read_timeout = std::time::Duration::from_secs(300);
    })
    .await;
    // Every regular connection, and the reserve for a moment.
    let _held = unfinished_requests(&server, 20 + 16).await;
    let http = fresh_client();
    wait_for("/healthz to answer at the cap", TIMEOUT, || async {
        http.get(format!("{}/healthz", server.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    wait_for(
        "other requests to be refused at the cap",
        TIMEOUT,
        || async {
            let Ok(r) = http
                .get(format!("{}/v1/openapi.json", server.url))
                .bearer_auth(ORDERS)
                .send()
                .await
            else {
                return false; // closed at once: the reserve was full
            };
            assert_eq!(r.status(), 503);
            let body: Json = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "server_busy", "{body}");
            true
        },
    )
    .await;
    server.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn shutdown_closes_unfinished_requests_after_the_grace_period() {
    let db = TestDb::new().await;
    let server = start(&db, |c| {
        c.limits.header_read_timeout = std::time::Duration::from_secs(300);
        c.shutdown_grace = std::time::Duration::from_secs(1);
    })
    .await;
    let sockets = unfinished_requests(&server, 5).await;
    // Within the test's timeout, although the requests could wait for minutes.
    server.stop().await;
    for s in sockets {
        closed_by_server(s).await;
    }
    db.teardown().await;
}

/// A statement stuck on a row lock holds one pooled connection: every other request goes
/// on, and the stuck one finishes when the lock goes.
#[tokio::test]
async fn a_stuck_statement_delays_no_other_request() {
    let db = TestDb::new().await;
    let server = start(&db, |_| {}).await;
    server.create_stream("held", "orders", None).await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM waltap.streams WHERE name = 'held' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();

    let delete = tokio::spawn(
        server
            .http
            .delete(format!("{}/v1/streams/held", server.url))
            .bearer_auth(super::ADMIN)
            .send(),
    );
    let watcher = db.client().await;
    wait_for("the delete to wait on the row lock", TIMEOUT, || async {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM waltap.streams%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting == 1
    })
    .await;

    // Each of these ran behind the stuck statement on the one shared connection before.
    for path in ["/v1/streams", "/v1/streams/held", "/metrics"] {
        let request = server
            .get(path, super::ADMIN)
            .header("accept", "application/json");
        let r = tokio::time::timeout(TIMEOUT, request.send())
            .await
            .unwrap_or_else(|_| panic!("GET {path} waited for the stuck statement"))
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
    }
    server.create_stream("other", "orders", None).await;
    let metrics = server.get("/metrics", super::ADMIN).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(text.contains("\nwaltap_store_pool_max 16\n"), "{text}");
    assert!(!delete.is_finished(), "the delete went through a held lock");

    lock.commit().await.unwrap();
    let r = delete.await.unwrap().unwrap();
    assert_eq!(r.status(), 204);
    server.stop().await;
    db.teardown().await;
}
