//! waltap's named streams read from the event log on NATS JetStream: the same consumer,
//! acknowledgements, resumption, backlog and `stale_cursor` as over the Postgres log,
//! against a real `nats-server` and an in-process pipeline appending to it.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use waltap::log::append::{self, AppenderConfig};
use waltap::log::jetstream::{JetStreamConfig, JetStreamReader};
use waltap::log::streams::{self, OpenOptions, StreamConsumer, StreamDef, StreamItem};
use waltap::log::{ConsumerPool, EventLog, StoreError};
use waltap::{Event, Position};

use crate::jetstream::{jetstream, nats, CATCH_UP};
use crate::support::{self, listen, run_ok, wait_for, TestDb};

const TABLE: &str = "\"my.app\".\"Örder Items\"";

/// The next event of a consumer (skipping nothing: any other item fails the test), its
/// rows parsed.
async fn next_event(c: &mut StreamConsumer) -> Event<serde_json::Value> {
    match tokio::time::timeout(CATCH_UP, c.next()).await {
        Ok(Some(Ok(StreamItem::Event(ev)))) => waltap::log::streams::typed(ev).unwrap(),
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn open(
    pool: &ConsumerPool,
    store: &waltap::SourceConfig,
    name: &str,
) -> Result<(StreamConsumer, Position), StoreError> {
    let mut c = streams::open_pooled(pool, store, name, OpenOptions::default()).await?;
    match c.next().await {
        Some(Ok(StreamItem::Initialized {
            position: Some(position),
        })) => Ok((c, position)),
        Some(Err(e)) => Err(e),
        other => panic!("expected initialized, got {other:?}"),
    }
}

/// An in-process pipeline appending the changes of `db` to JetStream stream `stream`.
pub(crate) struct Appending {
    pub(crate) source: String,
    pub(crate) publication: String,
    pub(crate) store: waltap::SourceConfig,
    /// The JetStream log, as named streams read it.
    pub(crate) log: EventLog,
    pub(crate) cancel: CancellationToken,
    pub(crate) pipeline: tokio::task::JoinHandle<Result<(), append::AppendError>>,
}

pub(crate) async fn appending(db: &TestDb, url: &str, stream: &str) -> Appending {
    let js_config = JetStreamConfig::parse(url)
        .unwrap()
        .with_stream(stream)
        .unwrap();
    let mut config = AppenderConfig::new(listen::config(db, &[]));
    config.max_batch_delay = Duration::from_millis(20);
    config.jetstream = Some(js_config.clone());
    let source = config.listener.slot.clone();
    let publication = config.listener.publication.clone();
    let store = config.store.clone();
    listen::prepare_slot(db, &config.listener).await;
    let cancel = CancellationToken::new();
    let pipeline = tokio::spawn(append::run(config, cancel.clone()));
    Appending {
        log: EventLog::JetStream(JetStreamReader::new(&js_config, &source)),
        source,
        publication,
        store,
        cancel,
        pipeline,
    }
}

fn id_of(ev: &Event<serde_json::Value>) -> i64 {
    ev.new.as_ref().unwrap()["id"].as_i64().unwrap()
}

#[tokio::test]
async fn named_streams_read_acknowledge_resume_and_go_stale_on_jetstream() {
    let Some((server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE SCHEMA \"my.app\";
             CREATE TABLE \"my.app\".\"Örder Items\" (id int PRIMARY KEY, note text);
             CREATE TABLE other (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let url = server.url();
    let Appending {
        source,
        store,
        log,
        cancel,
        pipeline,
        ..
    } = appending(&db, &url, "NAMED").await;
    let client = store.connect_sql().await.unwrap();
    let def = |name: &str| StreamDef {
        name: name.into(),
        source: source.clone(),
        tables: vec![TABLE.into()],
        filter: None,
        initial_state: false,
        from: None,
    };
    streams::create(&log, &client, &client, &def("orders.v1"))
        .await
        .unwrap();

    // 30 rows of the stream's table in three transactions (one of 20 rows), with
    // changes of another table between them that the stream does not deliver.
    let db_client = db.client().await;
    for sql in [
        "INSERT INTO \"my.app\".\"Örder Items\" SELECT g, 'a' FROM generate_series(1, 5) g",
        "INSERT INTO other SELECT generate_series(1, 7)",
        "BEGIN;
         INSERT INTO \"my.app\".\"Örder Items\" SELECT g, 'b' FROM generate_series(6, 25) g;
         INSERT INTO other SELECT generate_series(8, 10);
         COMMIT",
        "INSERT INTO \"my.app\".\"Örder Items\" SELECT g, 'c' FROM generate_series(26, 30) g",
    ] {
        db_client.batch_execute(sql).await.unwrap();
    }

    let pool = ConsumerPool::reading(&store, 4, log.clone()).unwrap();
    let (mut c, start) = open(&pool, &store, "orders.v1").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..30 {
        seen.push(next_event(&mut c).await);
    }
    assert_eq!(
        seen.iter().map(id_of).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position));
    assert!(seen[0].position > start);
    assert!(seen
        .iter()
        .all(|e| &*e.table == "Örder Items" && &*e.schema == "my.app"));
    // The stream's view of the big transaction: 20 of its 23 changes, numbered 0..20.
    let big: Vec<_> = seen[5..25]
        .iter()
        .map(|e| (e.tx.index, e.tx.last))
        .collect();
    assert_eq!(big.first(), Some(&(0, false)));
    assert_eq!(big.last(), Some(&(19, true)));

    // Acknowledge the 12th event (inside the big transaction) and reopen: the 13th on.
    c.ack(seen[11].position).await.unwrap();
    drop(c);
    let info = streams::get(&log, &client, "orders.v1").await.unwrap();
    assert_eq!(info.cursor, seen[11].position);
    assert_eq!(
        info.backlog, 18,
        "events of the stream's table after the cursor"
    );
    let (mut c, resumed) = wait_for_lease(&pool, &store, "orders.v1").await;
    assert_eq!(resumed, seen[11].position);
    let again = next_event(&mut c).await;
    assert_eq!(id_of(&again), 13);
    assert_eq!(again.tx.index, 7, "numbered as on the first delivery");
    for expected in 14..=30 {
        assert_eq!(id_of(&next_event(&mut c).await), expected);
    }
    // Live: a change appended while the consumer waits.
    db_client
        .batch_execute("UPDATE \"my.app\".\"Örder Items\" SET note = 'live' WHERE id = 1")
        .await
        .unwrap();
    let live = next_event(&mut c).await;
    assert_eq!(live.action_name(), "update");
    c.ack(live.position).await.unwrap();
    drop(c);

    // The stream's limits discard messages the cursor still needs: stale_cursor, then a
    // reset starts at the log's end and delivers what comes after it.
    streams::create(&log, &client, &client, &def("laggard"))
        .await
        .unwrap();
    db_client
        .batch_execute(
            "INSERT INTO \"my.app\".\"Örder Items\" SELECT g, 'd' FROM generate_series(31, 40) g",
        )
        .await
        .unwrap();
    let js = jetstream(&url).await;
    wait_for("the ten inserts in JetStream", CATCH_UP, || {
        let js = js.clone();
        async move {
            let mut st = js.get_stream("NAMED").await.unwrap();
            // 30 + 10 other + 1 update + 10
            st.info().await.unwrap().state.last_sequence >= 51
        }
    })
    .await;
    let mut st_config = js
        .get_stream("NAMED")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    st_config.max_messages = 3;
    js.update_stream(&st_config).await.unwrap();
    let stale = match open(&pool, &store, "laggard").await {
        Err(e) => e,
        Ok((mut c, _)) => match tokio::time::timeout(CATCH_UP, c.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("expected stale_cursor, got {other:?}"),
        },
    };
    assert!(
        matches!(stale, StoreError::StaleCursor { .. }),
        "expected stale_cursor, got {stale}"
    );
    // The first stream acknowledged through the update, before what was discarded.
    let stale_too = match open(&pool, &store, "orders.v1").await {
        Err(e) => e,
        Ok((mut c, _)) => match tokio::time::timeout(CATCH_UP, c.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("expected stale_cursor, got {other:?}"),
        },
    };
    assert!(matches!(stale_too, StoreError::StaleCursor { .. }));
    wait_until_free(&log, &client, "laggard").await;
    streams::reset(&log, &client, "laggard", false)
        .await
        .unwrap();
    let (mut c, _) = wait_for_lease(&pool, &store, "laggard").await;
    db_client
        .batch_execute("INSERT INTO \"my.app\".\"Örder Items\" VALUES (41, 'after reset')")
        .await
        .unwrap();
    let after_reset = next_event(&mut c).await;
    assert_eq!(id_of(&after_reset), 41);
    c.ack(after_reset.position).await.unwrap();
    drop(c);
    // The limits discard the cursor's own message, but nothing after it: not stale.
    for id in 42..=44 {
        db_client
            .execute(
                "INSERT INTO \"my.app\".\"Örder Items\" VALUES ($1, 'x')",
                &[&id],
            )
            .await
            .unwrap();
    }
    wait_for("the three inserts in JetStream", CATCH_UP, || {
        let js = js.clone();
        async move {
            let mut st = js.get_stream("NAMED").await.unwrap();
            st.info().await.unwrap().state.last_sequence >= 55
        }
    })
    .await;
    let (mut c, _) = wait_for_lease(&pool, &store, "laggard").await;
    for id in 42..=44 {
        assert_eq!(id_of(&next_event(&mut c).await), id);
    }
    drop(c);

    // The same through `waltap stream`.
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--slot",
            &source,
            "--nats-url",
            &url,
            "--nats-stream",
            "NAMED",
        ]);
        support::waltap(&db.url(), &all)
    };
    run_ok(cli(&["stream", "create", "cli.orders", "--table", TABLE])).await;
    db_client
        .batch_execute("INSERT INTO \"my.app\".\"Örder Items\" VALUES (45, 'y'), (46, 'z')")
        .await
        .unwrap();
    let printed = run_ok(cli(&["stream", "tail", "cli.orders", "--limit", "2"])).await;
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{printed}");
    assert_eq!(lines[0]["type"], "initialized");
    assert_eq!(lines[1]["created"]["id"], 45);
    assert_eq!(lines[2]["created"]["id"], 46);
    let listed: serde_json::Value =
        serde_json::from_str(&run_ok(cli(&["stream", "list", "--json"])).await).unwrap();
    let cli_stream = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cli.orders")
        .unwrap();
    assert_eq!(
        cli_stream["backlog"], 0,
        "tail acknowledged what it printed"
    );
    // `waltap export` places its snapshot among the JetStream log's events: the rows, then
    // the position after the last change (the stream's last event).
    let exported = cli(&["export", TABLE]);
    let exported = run_ok(exported).await;
    let lines: Vec<serde_json::Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rows: i64 = db_client
        .query_one("SELECT count(*) FROM \"my.app\".\"Örder Items\"", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lines.len() as i64, rows + 1, "{exported}");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "snapshotComplete", "{exported}");
    let position: Position = last["position"].as_str().unwrap().parse().unwrap();
    let info = streams::get(&log, &client, "cli.orders").await.unwrap();
    assert_eq!(
        position.commit_lsn, info.cursor.commit_lsn,
        "after the transaction of the last change (46)"
    );
    assert!(position >= info.cursor);

    // Every message discarded (a purge, or max_age on an idle log): where the log ends is
    // unknown until the next change, so making a stream says so; after that change it
    // starts there and delivers what follows.
    js.get_stream("NAMED").await.unwrap().purge().await.unwrap();
    let unknown = streams::create(&log, &client, &client, &def("after-purge"))
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains("once the next change"),
        "{unknown}"
    );
    db_client
        .batch_execute("INSERT INTO \"my.app\".\"Örder Items\" VALUES (47, 'p')")
        .await
        .unwrap();
    wait_for("the insert after the purge in JetStream", CATCH_UP, || {
        let js = js.clone();
        async move {
            let mut st = js.get_stream("NAMED").await.unwrap();
            st.info().await.unwrap().state.messages >= 1
        }
    })
    .await;
    streams::create(&log, &client, &client, &def("after-purge"))
        .await
        .unwrap();
    db_client
        .batch_execute("INSERT INTO \"my.app\".\"Örder Items\" VALUES (48, 'q')")
        .await
        .unwrap();
    let (mut c, _) = open(&pool, &store, "after-purge").await.unwrap();
    assert_eq!(id_of(&next_event(&mut c).await), 48);
    drop(c);

    cancel.cancel();
    pipeline.await.unwrap().unwrap();
    db.teardown().await;
}

/// Opens a stream whose previous consumer was just dropped (its lease is released in the
/// background).
async fn wait_for_lease(
    pool: &ConsumerPool,
    store: &waltap::SourceConfig,
    name: &str,
) -> (StreamConsumer, Position) {
    let deadline = std::time::Instant::now() + CATCH_UP;
    loop {
        match open(pool, store, name).await {
            Ok(opened) => return opened,
            Err(StoreError::StreamBusy { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("open {name}: {e}"),
        }
    }
}

async fn wait_until_free(log: &EventLog, client: &tokio_postgres::Client, name: &str) {
    wait_for("the lease released", CATCH_UP, || async move {
        streams::get(log, client, name)
            .await
            .is_ok_and(|i| i.lease.is_none())
    })
    .await;
}

#[tokio::test]
async fn serve_with_nats_url_serves_feed_pages_descriptions_and_subscriptions() {
    use crate::server::{insert_orders, start, Sse, ADMIN, ORDERS};
    use serde_json::Value as Json;

    let Some((server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    let js_config = JetStreamConfig::parse(&server.url())
        .unwrap()
        .with_stream("SERVED")
        .unwrap();
    let s = start(&db, |c| c.appender.jetstream = Some(js_config.clone())).await;
    s.create_stream("feed", "orders", None).await;
    // Subscriptions read a slot of the member's own: live changes arrive as before.
    let mut sse = Sse::open(s.get("/v1/subscribe?table=orders", ORDERS)).await;
    sse.expect("initialized").await;
    insert_orders(&db, 0..23).await;
    sse.expect("change").await;

    let mut seen = Vec::new();
    let mut cursor = String::new();
    while seen.len() < 23 {
        let query = match cursor.as_str() {
            "" => "limit=7&wait=10".to_owned(),
            c => format!("limit=7&wait=10&cursor={c}"),
        };
        let r = s
            .get(&format!("/v1/streams/feed/events?{query}"), ORDERS)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Json = r.json().await.unwrap();
        let events = body["events"].as_array().unwrap();
        assert!(events.len() <= 7);
        seen.extend(events.iter().map(|e| e["created"]["id"].as_i64().unwrap()));
        cursor = body["cursor"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, (0..23).collect::<Vec<i64>>());
    // Asking after the last page's cursor acknowledges everything up to it.
    let r = s
        .get(&format!("/v1/streams/feed/events?cursor={cursor}"), ORDERS)
        .send()
        .await
        .unwrap();
    let body: Json = r.json().await.unwrap();
    assert_eq!(body["events"].as_array().map(Vec::len), Some(0), "{body}");
    s.lease_free("feed").await;
    let info = s.stream_info("feed").await;
    assert_eq!(info["backlog"], 0, "{info}");
    // Nothing went to the Postgres log.
    let logged: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM waltap.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0);
    // A stream with an initial state: the 23 rows, the marker, then a change after it.
    let r = s
        .post(
            "/v1/streams",
            ADMIN,
            serde_json::json!({"name": "rows", "table": "orders", "initialState": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let page = feed_json(&s, "/v1/streams/rows/events?limit=100&wait=10").await;
    let items = page["events"].as_array().unwrap();
    assert_eq!(items.len(), 24, "23 rows and the marker: {page}");
    assert_eq!(items[23]["type"], "snapshotComplete", "{page}");
    insert_orders(&db, 23..24).await;
    let cursor = page["cursor"].as_str().unwrap();
    let page = feed_json(
        &s,
        &format!("/v1/streams/rows/events?wait=10&cursor={cursor}"),
    )
    .await;
    let ids: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["created"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [23], "{page}");
    drop(sse);
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn feed_pages_at_transaction_ends_on_jetstream() {
    let Some((server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    let js_config = JetStreamConfig::parse(&server.url())
        .unwrap()
        .with_stream("TXENDS")
        .unwrap();
    let s = crate::server::start(&db, |c| c.appender.jetstream = Some(js_config.clone())).await;
    crate::server::delivery::pages_at_transaction_ends(&db, &s).await;
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn a_feed_reader_survives_a_nats_restart_without_loss_or_repeats() {
    use crate::server::{insert_orders, start};

    let Some((mut server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    let js_config = JetStreamConfig::parse(&server.url())
        .unwrap()
        .with_stream("RESTARTED")
        .unwrap();
    let s = start(&db, |c| c.appender.jetstream = Some(js_config.clone())).await;
    s.create_stream("feed", "orders", None).await;
    let mut seen: Vec<i64> = Vec::new();
    let mut cursor = String::new();
    insert_orders(&db, 0..10).await;
    read_feed(&s, 10, &mut seen, &mut cursor).await;

    server.kill();
    // While NATS is down a page fails with a retryable error, never a hang or a panic.
    let (status, body) = feed_page(&s, &cursor).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "log_unavailable", "{body}");
    insert_orders(&db, 10..20).await;
    server.restart().unwrap();
    server.wait_ready().await.unwrap();
    read_feed(&s, 20, &mut seen, &mut cursor).await;
    assert_eq!(
        seen,
        (0..20).collect::<Vec<i64>>(),
        "every event once, in order"
    );
    s.stop().await;
    db.teardown().await;
}

/// One feed page of stream `feed` after `cursor`: its status and body.
async fn feed_page(
    s: &crate::server::Server,
    cursor: &str,
) -> (reqwest::StatusCode, serde_json::Value) {
    let after = match cursor {
        "" => String::new(),
        c => format!("&cursor={c}"),
    };
    let r = s
        .get(
            &format!("/v1/streams/feed/events?limit=100&wait=5{after}"),
            crate::server::ORDERS,
        )
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

/// Reads feed pages until `seen` holds `n` ids, asking again after an error page (NATS
/// coming back), whose body must say what failed.
async fn read_feed(s: &crate::server::Server, n: usize, seen: &mut Vec<i64>, cursor: &mut String) {
    let deadline = std::time::Instant::now() + CATCH_UP;
    while seen.len() < n {
        assert!(std::time::Instant::now() < deadline, "read {seen:?}");
        let (status, body) = feed_page(s, cursor).await;
        if !status.is_success() {
            assert!(body["error"]["message"].is_string(), "{body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        for e in body["events"].as_array().unwrap() {
            seen.push(e["created"]["id"].as_i64().unwrap());
        }
        *cursor = body["cursor"].as_str().unwrap().to_owned();
    }
}

/// The body of a feed request that must succeed.
async fn feed_json(s: &crate::server::Server, path: &str) -> serde_json::Value {
    let r = s.get(path, crate::server::ORDERS).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}
