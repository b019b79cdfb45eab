//! Persisted streams over the event log: management, at-least-once consumption with acks
//! and resumption, filters and table sets, the one-consumer lease, retention and stale
//! cursors, and `waltap stream` end to end. The pipeline (`waltap::log::append::run`) runs
//! in-process, appending the test database's changes to its own log.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use waltap::log::append::{self, AppenderConfig};
use waltap::log::retention::{self, Retention};
use waltap::log::streams::{self, OpenOptions, StreamConsumer, StreamDef, StreamItem};
use waltap::log::StoreError;
use waltap::Filter;
use waltap::SourceConfig;
use waltap::{Event, Position};

use crate::support::{json_line, listen, output, run_ok, wait_for, TestDb};

const TIMEOUT: Duration = Duration::from_secs(30);

/// `waltap run` in-process for one test database.
struct Pipeline {
    source: String,
    store: SourceConfig,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), append::AppendError>>,
}

impl Pipeline {
    /// Creates the tables (`ddl`), the publication and the slot, then starts appending:
    /// every change committed after this returns reaches the log.
    async fn start(db: &TestDb, ddl: &str, retention: Option<Retention>) -> Pipeline {
        db.client().await.batch_execute(ddl).await.unwrap();
        let mut config = AppenderConfig::new(listen::config(db, &[]));
        config.max_batch_delay = Duration::from_millis(20);
        config.retention = retention;
        let source = config.listener.slot.clone();
        let store = config.store.clone();
        listen::prepare_slot(db, &config.listener).await;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(append::run(config, cancel.clone()));
        Pipeline {
            source,
            store,
            cancel,
            task,
        }
    }

    async fn store(&self) -> tokio_postgres::Client {
        self.store.connect_sql().await.unwrap()
    }

    async fn create(&self, name: &str, tables: &[&str], filter: Option<Json>) {
        let client = self.store().await;
        let def = StreamDef {
            name: name.into(),
            source: self.source.clone(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            filter: filter.map(|f| serde_json::from_value::<Filter>(f).unwrap()),
            initial_state: false,
            from: None,
        };
        if let Err(e) =
            streams::create(&waltap::log::EventLog::Postgres, &client, &client, &def).await
        {
            panic!("creating stream {name}: {e}");
        }
    }

    async fn open(&self, name: &str) -> StreamConsumer {
        self.open_with(name, OpenOptions::default()).await
    }

    /// Opened, with its initialized marker taken.
    async fn open_with(&self, name: &str, options: OpenOptions) -> StreamConsumer {
        match streams::open(&self.store, name, options).await {
            Ok(mut c) => {
                initialized(&mut c).await;
                c
            }
            Err(e) => panic!("opening stream {name}: {e}"),
        }
    }

    /// Waits until the log holds `n` events of this source.
    async fn logged(&self, n: i64) {
        let client = self.store().await;
        wait_for(&format!("{n} events in the log"), TIMEOUT, || async {
            assert!(!self.task.is_finished(), "the pipeline stopped");
            let count: i64 = client
                .query_one(
                    "SELECT count(*) FROM waltap.events WHERE source = $1",
                    &[&self.source],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            count >= n
        })
        .await;
    }

    async fn stop(self) {
        self.cancel.cancel();
        let result = tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the pipeline stops")
            .expect("the pipeline task did not panic");
        if let Err(e) = result {
            panic!("the pipeline failed: {e}");
        }
    }
}

/// Takes the first item, the initialized marker, and checks that it carries the cursor
/// (absent only for a cursor before everything).
async fn initialized(c: &mut StreamConsumer) -> Option<Position> {
    let position = match tokio::time::timeout(TIMEOUT, c.next()).await {
        Ok(Some(Ok(StreamItem::Initialized { position }))) => position,
        other => panic!(
            "expected the initialized marker from {}, got {other:?}",
            c.name()
        ),
    };
    let cursor = c.cursor();
    match position {
        Some(p) => assert_eq!(p, cursor, "the marker carries the cursor"),
        None => assert_eq!(
            cursor.commit_lsn.0, 0,
            "only an empty log's cursor is absent"
        ),
    }
    position
}

/// The next event, its rows parsed.
async fn next(c: &mut StreamConsumer) -> Event<Json> {
    streams::typed(next_raw(c).await).unwrap()
}

/// The next event, its rows as the log stored them.
async fn next_raw(c: &mut StreamConsumer) -> Event<streams::RawRow> {
    match tokio::time::timeout(TIMEOUT, c.next()).await {
        Ok(Some(Ok(StreamItem::Event(ev)))) => ev,
        other => panic!("expected an event from {}, got {other:?}", c.name()),
    }
}

async fn take(c: &mut StreamConsumer, n: usize) -> Vec<Event<Json>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next(c).await);
    }
    out
}

async fn next_error(c: &mut StreamConsumer) -> StoreError {
    match tokio::time::timeout(TIMEOUT, c.next()).await {
        Ok(Some(Err(e))) => e,
        other => panic!("expected an error from {}, got {other:?}", c.name()),
    }
}

/// Commits each string as one transaction (a multi-statement string would otherwise join
/// its neighbours' implicit transaction).
async fn commit_each(c: &tokio_postgres::Client, txs: &[&str]) {
    for tx in txs {
        c.batch_execute(&format!("BEGIN; {tx}; COMMIT"))
            .await
            .unwrap_or_else(|e| panic!("{tx}: {e}"));
    }
}

fn ids(evs: &[Event<Json>]) -> Vec<i64> {
    evs.iter()
        .map(|e| {
            e.after()
                .or(e.before())
                .and_then(|r| r["id"].as_i64())
                .expect("a row with an id")
        })
        .collect()
}

fn tx_numbers(evs: &[Event<Json>]) -> Vec<(u32, Option<u32>, bool)> {
    evs.iter()
        .map(|e| (e.tx.index, e.tx.total, e.tx.last))
        .collect()
}

/// Opens `name` as soon as no other consumer holds it (released or expired), and takes
/// its initialized marker.
async fn open_when_free(store: &SourceConfig, name: &str) -> StreamConsumer {
    let opened = std::sync::Mutex::new(None);
    wait_for(&format!("stream {name} to be free"), TIMEOUT, || async {
        match streams::open(store, name, OpenOptions::default()).await {
            Ok(c) => {
                *opened.lock().unwrap() = Some(c);
                true
            }
            Err(StoreError::StreamBusy { .. }) => false,
            Err(e) => panic!("opening {name}: {e}"),
        }
    })
    .await;
    let mut c = opened.into_inner().unwrap().expect("opened");
    initialized(&mut c).await;
    c
}

async fn open_err(store: &SourceConfig, name: &str, options: OpenOptions) -> StoreError {
    match streams::open(store, name, options).await {
        Ok(c) => panic!("opening {name} should fail, got {c:?}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn create_list_delete() {
    let db = TestDb::new().await;
    let p = Pipeline::start(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, plan text);
         CREATE SCHEMA app; CREATE TABLE app.u (id int PRIMARY KEY, plan text, n int);",
        None,
    )
    .await;
    let client = p.store().await;
    let def = |name: &str, tables: &[&str], filter: Option<Json>| StreamDef {
        name: name.into(),
        source: p.source.clone(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        filter: filter.map(|f| serde_json::from_value(f).unwrap()),
        initial_state: false,
        from: None,
    };
    let filter = json!({"create": {"plan": "pro"}});
    let info = streams::create(
        &waltap::log::EventLog::Postgres,
        &client,
        &client,
        &def("paying", &["t", "app.u"], Some(filter.clone())),
    )
    .await
    .unwrap();
    assert_eq!(info.tables, vec!["public.t", "app.u"]);
    assert_eq!(info.filter, Some(filter));
    assert_eq!(info.backlog, 0);
    assert!(info.lease.is_none());

    let fail = |r: Result<streams::StreamInfo, StoreError>| r.expect_err("must be rejected");
    let e = fail(
        streams::create(
            &waltap::log::EventLog::Postgres,
            &client,
            &client,
            &def("paying", &["t"], None),
        )
        .await,
    );
    assert_eq!(e.code().as_str(), "conflict");
    let e = fail(
        streams::create(
            &waltap::log::EventLog::Postgres,
            &client,
            &client,
            &def("x", &["nope"], None),
        )
        .await,
    );
    assert!(
        matches!(e, StoreError::Table(waltap::TableError::Missing(ref t)) if t == "public.nope"),
        "{e}"
    );
    let e = fail(
        streams::create(
            &waltap::log::EventLog::Postgres,
            &client,
            &client,
            &def("bad name", &["t"], None),
        )
        .await,
    );
    assert_eq!(e.code().as_str(), "bad_request");
    let e = fail(
        streams::create(
            &waltap::log::EventLog::Postgres,
            &client,
            &client,
            &def("x", &[], None),
        )
        .await,
    );
    assert_eq!(e.code().as_str(), "bad_request");
    // Checked against every table: `n` exists only in app.u.
    let e = fail(
        streams::create(
            &waltap::log::EventLog::Postgres,
            &client,
            &client,
            &def(
                "x",
                &["app.u", "t"],
                Some(json!({"where": {"n": {"gt": 1}}})),
            ),
        )
        .await,
    );
    assert_eq!(e.code().as_str(), "bad_filter");
    assert!(
        waltap::report(&e).contains("public.t has no column \"n\""),
        "{e}"
    );

    streams::create(
        &waltap::log::EventLog::Postgres,
        &client,
        &client,
        &def("all", &["t"], None),
    )
    .await
    .unwrap();
    let c = p.open("all").await;
    let listed = streams::list(&waltap::log::EventLog::Postgres, &client, Some(&p.source))
        .await
        .unwrap();
    let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["all", "paying"]);
    let lease = listed[0].lease.as_ref().expect("the open consumer's lease");
    assert!(!lease.holder.is_empty());
    let as_json = serde_json::to_value(&listed[0]).unwrap();
    assert_eq!(as_json["cursor"], json!(listed[0].cursor.to_string()));
    assert!(as_json["lease"]["expiresAt"].is_string(), "{as_json}");
    c.close().await;
    assert!(
        streams::get(&waltap::log::EventLog::Postgres, &client, "all")
            .await
            .unwrap()
            .lease
            .is_none()
    );

    streams::delete(&client, "paying").await.unwrap();
    let e = streams::delete(&client, "paying").await.expect_err("gone");
    assert_eq!(e.code().as_str(), "not_found");
    assert_eq!(
        streams::list(&waltap::log::EventLog::Postgres, &client, None)
            .await
            .unwrap()
            .len(),
        1
    );
    p.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn acks_resume_at_least_once_in_order() {
    let db = TestDb::new().await;
    let p = Pipeline::start(&db, "CREATE TABLE t (id int PRIMARY KEY, v text)", None).await;
    let w = db.client().await;
    // Before the stream: not delivered.
    w.batch_execute("INSERT INTO t VALUES (0, 'old')")
        .await
        .unwrap();
    p.logged(1).await;
    p.create("s", &["t"], None).await;
    commit_each(
        &w,
        &[
            "INSERT INTO t VALUES (1, 'a')",
            "INSERT INTO t VALUES (2, 'b'); INSERT INTO t VALUES (3, 'c')",
            "INSERT INTO t VALUES (4, 'd')",
        ],
    )
    .await;

    p.logged(5).await;
    let store = p.store().await;
    assert_eq!(
        streams::get(&waltap::log::EventLog::Postgres, &store, "s")
            .await
            .unwrap()
            .backlog,
        4
    );

    let mut c = p.open("s").await;
    let first = take(&mut c, 3).await;
    assert_eq!(ids(&first), vec![1, 2, 3]);
    assert_eq!(
        tx_numbers(&first),
        vec![(0, Some(1), true), (0, Some(2), false), (1, Some(2), true)]
    );
    // Acknowledge inside the transaction, then go away without acknowledging the rest.
    c.ack(first[1].position).await.unwrap();
    assert_eq!(c.cursor(), first[1].position);
    drop(c);

    let mut c = open_when_free(&p.store, "s").await;
    w.batch_execute("INSERT INTO t VALUES (5, 'e')")
        .await
        .unwrap();
    let resumed = take(&mut c, 3).await;
    assert_eq!(
        ids(&resumed),
        vec![3, 4, 5],
        "unacked events come again, in order"
    );
    assert_eq!(resumed[0].id, first[2].id, "same change, same id");
    assert_eq!(resumed[0].position, first[2].position);
    assert_eq!(
        tx_numbers(&resumed[..1]),
        vec![(1, Some(2), true)],
        "numbered as in its whole transaction"
    );
    assert!(resumed.windows(2).all(|w| w[0].position < w[1].position));
    // A backwards ack changes nothing.
    c.ack(resumed[2].position).await.unwrap();
    c.ack(first[0].position).await.unwrap();
    assert_eq!(c.cursor(), resumed[2].position);
    c.close().await;
    let info = streams::get(&waltap::log::EventLog::Postgres, &store, "s")
        .await
        .unwrap();
    assert_eq!(info.cursor, resumed[2].position);
    assert_eq!(info.backlog, 0);

    // A reopened consumer first says where it resumes: after the acknowledged cursor.
    let mut c = match streams::open(&p.store, "s", OpenOptions::default()).await {
        Ok(c) => c,
        Err(e) => panic!("opening s: {e}"),
    };
    let marker = match tokio::time::timeout(TIMEOUT, c.next()).await {
        Ok(Some(Ok(item @ StreamItem::Initialized { .. }))) => item,
        other => panic!("expected the initialized marker, got {other:?}"),
    };
    assert!(
        matches!(marker, StreamItem::Initialized { position: Some(p) } if p == resumed[2].position),
        "{marker:?}"
    );
    assert_eq!(
        serde_json::to_value(&marker).unwrap(),
        json!({"type": "initialized", "position": resumed[2].position.to_string()})
    );

    // Typed rows from the JSON ones.
    w.batch_execute("INSERT INTO t VALUES (6, 'f')")
        .await
        .unwrap();
    #[derive(serde::Deserialize)]
    struct T {
        id: i32,
        v: String,
    }
    let ev: Event<T> = streams::typed(next_raw(&mut c).await).unwrap();
    let row = ev.after().expect("created row");
    assert_eq!((row.id, row.v.as_str()), (6, "f"));
    c.close().await;
    p.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn filters_and_table_sets_renumber_transactions() {
    let db = TestDb::new().await;
    let p = Pipeline::start(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, plan text, n int, at timestamptz);
         CREATE TABLE u (id int PRIMARY KEY, plan text, n int, at timestamptz);
         CREATE TABLE other (id int PRIMARY KEY, plan text, n int, at timestamptz);
         ALTER TABLE t REPLICA IDENTITY FULL;",
        None,
    )
    .await;
    p.create(
        "pro",
        &["t", "u"],
        Some(json!({
            "create": {"plan": "pro", "n": {"gt": 5}, "at": {"gte": "2026-01-01T00:00:00+02:00"}},
            "update": {"after": {"plan": "pro"}, "before": {"plan": {"not": "pro"}}}
        })),
    )
    .await;
    p.create("t_only", &["t"], None).await;
    let w = db.client().await;
    commit_each(
        &w,
        &[
            "INSERT INTO t VALUES (1, 'pro', 10, '2026-06-01 00:00:00+00');
             INSERT INTO other VALUES (2, 'pro', 10, '2026-06-01 00:00:00+00');
             INSERT INTO t VALUES (3, 'pro', 1, '2026-06-01 00:00:00+00');
             INSERT INTO t VALUES (4, 'free', 10, '2026-06-01 00:00:00+00');
             INSERT INTO u VALUES (5, 'pro', 6, '2026-01-01 00:00:00+00');
             INSERT INTO u VALUES (6, 'pro', 6, '2025-12-31 21:59:59+00')",
            "UPDATE t SET plan = 'pro' WHERE id = 4",
            "UPDATE t SET n = 11 WHERE id = 1",
            "INSERT INTO u VALUES (7, 'pro', 99, '2030-01-01 00:00:00+00')",
        ],
    )
    .await;

    let mut pro = p.open("pro").await;
    let got = take(&mut pro, 4).await;
    assert_eq!(ids(&got), vec![1, 5, 4, 7], "the filter, on both tables");
    assert_eq!(
        tx_numbers(&got),
        vec![
            (0, Some(2), false),
            (1, Some(2), true),
            (0, Some(1), true),
            (0, Some(1), true)
        ],
        "index/total/last count what this stream receives"
    );
    assert_eq!(got[2].action_name(), "update");
    assert_eq!(got[1].table.as_ref(), "u");

    // Once all it got is acknowledged, the cursor passes what the filter skips, so a
    // selective stream does not fall behind retention while it waits.
    pro.ack(got[3].position).await.unwrap();
    commit_each(
        &w,
        &[
            "INSERT INTO t VALUES (8, 'free', 1, '2026-06-01 00:00:00+00')",
            "INSERT INTO other VALUES (9, 'pro', 10, '2026-06-01 00:00:00+00')",
        ],
    )
    .await;
    p.logged(11).await;
    let store = p.store().await;
    let head: Position = store
        .query_one(
            "SELECT max(event->>'position') FROM waltap.events WHERE source = $1",
            &[&p.source],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    let passed = wait_for("the cursor to pass the skipped events", TIMEOUT, || async {
        streams::get(&waltap::log::EventLog::Postgres, &store, "pro")
            .await
            .unwrap()
            .cursor
            >= head
    });
    tokio::select! {
        _ = passed => {}
        ev = pro.next() => panic!("nothing to deliver, got {ev:?}"),
    }

    let mut all_t = p.open("t_only").await;
    let got = take(&mut all_t, 5).await;
    assert_eq!(ids(&got), vec![1, 3, 4, 4, 1]);
    assert_eq!(
        tx_numbers(&got[..3]),
        vec![(0, Some(3), false), (1, Some(3), false), (2, Some(3), true)]
    );
    pro.close().await;
    all_t.close().await;
    p.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn one_consumer_at_a_time() {
    let db = TestDb::new().await;
    let p = Pipeline::start(&db, "CREATE TABLE t (id int PRIMARY KEY)", None).await;
    p.create("s", &["t"], None).await;
    let first = p.open("s").await;
    let e = open_err(&p.store, "s", OpenOptions::default()).await;
    assert_eq!(e.code().as_str(), "stream_busy");
    assert!(e.to_string().contains("stream_busy"), "{e}");
    first.close().await;

    // A short lease that is not renewed (nobody reads) expires; the next consumer takes
    // the stream over and the first one learns it at its next acknowledgement.
    let short = OpenOptions {
        lease: Duration::from_millis(300),
        ..OpenOptions::default()
    };
    let mut stalled = p.open_with("s", short).await;
    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (0)")
        .await
        .unwrap();
    let delivered = next(&mut stalled).await;
    let mut taker = open_when_free(&p.store, "s").await;
    let e = stalled
        .ack(delivered.position)
        .await
        .expect_err("the lease is gone");
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e}");
    assert_eq!(e.code().as_str(), "stream_busy");
    let e = next_error(&mut stalled).await;
    assert!(matches!(e, StoreError::LeaseLost { .. }), "{e}");
    drop(stalled); // must not release the taker's lease

    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // Row 0 was never acknowledged: the taker gets it again.
    assert_eq!(ids(&take(&mut taker, 2).await), vec![0, 1]);
    let e = open_err(&p.store, "s", OpenOptions::default()).await;
    assert_eq!(e.code().as_str(), "stream_busy");
    taker.close().await;
    p.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn retention_by_age_and_stale_cursors() {
    let db = TestDb::new().await;
    let p = Pipeline::start(&db, "CREATE TABLE t (id int PRIMARY KEY)", None).await;
    p.create("early", &["t"], None).await;
    p.create("reader", &["t"], None).await;
    let w = db.client().await;
    commit_each(
        &w,
        &[
            "INSERT INTO t VALUES (1)",
            "INSERT INTO t VALUES (2); INSERT INTO t VALUES (3)",
        ],
    )
    .await;
    p.logged(3).await;
    p.create("late", &["t"], None).await;
    let mut store = p.store().await;
    // Those three were appended an hour ago, as far as retention can tell.
    store
        .execute(
            "UPDATE waltap.events SET appended_at = now() - interval '1 hour' WHERE source = $1",
            &[&p.source],
        )
        .await
        .unwrap();
    commit_each(
        &w,
        &["INSERT INTO t VALUES (4)", "INSERT INTO t VALUES (5)"],
    )
    .await;
    p.logged(5).await;
    // Opened before pruning, not yet read.
    let mut reader = p.open("reader").await;

    let pruned = retention::prune(&mut store, &p.source, Some(Duration::from_secs(1800)), None)
        .await
        .unwrap();
    assert_eq!(pruned.events, 3, "only the old events");
    let left: Vec<i32> = store
        .query(
            "SELECT (event->'created'->>'id')::int FROM waltap.events
             WHERE source = $1 ORDER BY commit_lsn, ordinal",
            &[&p.source],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![4, 5]);
    let mark = store
        .query_one(
            "SELECT pruned_lsn, pruned_ordinal FROM waltap.progress WHERE source = $1",
            &[&p.source],
        )
        .await
        .unwrap();
    let through = pruned.through.expect("a pruned mark");
    assert_eq!(mark.get::<_, i64>(0) as u64, through.commit_lsn.0);
    assert_eq!(mark.get::<_, i32>(1) as u32, through.ordinal);
    let again = retention::prune(&mut store, &p.source, Some(Duration::from_secs(1800)), None)
        .await
        .unwrap();
    assert_eq!(again.events, 0);

    // Reading past the pruned mark fails, at open and at a read; never a silent skip.
    let e = open_err(&p.store, "early", OpenOptions::default()).await;
    assert_eq!(e.code().as_str(), "stale_cursor");
    assert!(
        e.to_string().contains("start again from the current rows"),
        "{e}"
    );
    // The refused open gave the lease back at once: the advised reset works right away.
    assert!(
        streams::get(&waltap::log::EventLog::Postgres, &store, "early")
            .await
            .unwrap()
            .lease
            .is_none(),
        "a stale open leaves no lease behind"
    );
    let e = next_error(&mut reader).await;
    assert_eq!(e.code().as_str(), "stale_cursor");
    assert!(
        reader.next().await.is_none(),
        "the consumer ends with the error"
    );
    drop(reader);

    // A stream made after the pruned events is unaffected.
    let mut late = p.open("late").await;
    assert_eq!(ids(&take(&mut late, 2).await), vec![4, 5]);
    late.close().await;

    // After re-reading the current rows, a stale stream starts again from the head.
    let info = streams::reset(&waltap::log::EventLog::Postgres, &store, "early", false)
        .await
        .unwrap();
    assert!(info.cursor > through);
    let mut early = p.open("early").await;
    w.batch_execute("INSERT INTO t VALUES (6)").await.unwrap();
    assert_eq!(ids(&take(&mut early, 1).await), vec![6]);
    early.close().await;
    p.stop().await;
    db.teardown().await;
}

/// Stored bytes, events and the oldest row id of `source`'s log.
async fn log_size(store: &tokio_postgres::Client, source: &str) -> (i64, i64, Option<i32>) {
    let r = store
        .query_one(
            "SELECT coalesce(sum(pg_column_size(event)), 0)::int8, count(*),
                    min((event->'created'->>'id')::int)
             FROM waltap.events WHERE source = $1",
            &[&source],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn retention_by_size_keeps_the_newest() {
    let db = TestDb::new().await;
    let p = Pipeline::start(&db, "CREATE TABLE t (id int PRIMARY KEY, pad text)", None).await;
    let w = db.client().await;
    let tx_ids: Vec<Vec<i32>> = (1..=10)
        .map(|i| vec![i])
        .chain([vec![11, 12, 13]])
        .chain((14..=20).map(|i| vec![i]))
        .collect();
    let txs: Vec<String> = tx_ids
        .iter()
        .map(|tx| {
            tx.iter()
                .map(|i| format!("INSERT INTO t VALUES ({i}, repeat(md5('{i}'), 16))"))
                .collect::<Vec<_>>()
                .join(";")
        })
        .collect();
    commit_each(&w, &txs.iter().map(String::as_str).collect::<Vec<_>>()).await;
    p.logged(20).await;
    let mut store = p.store().await;
    let sizes: std::collections::HashMap<i32, i64> = store
        .query(
            "SELECT (event->'created'->>'id')::int, pg_column_size(event)::int8
             FROM waltap.events WHERE source = $1",
            &[&p.source],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (total, count, _) = log_size(&store, &p.source).await;
    assert_eq!(count, 20);
    let bound = total / 2;
    // Whole transactions, oldest first, until the rest fits.
    let mut expected_left = total;
    let mut expected_oldest = 1;
    for tx in &tx_ids {
        if expected_left <= bound {
            break;
        }
        expected_left -= tx.iter().map(|i| sizes[i]).sum::<i64>();
        expected_oldest = tx[tx.len() - 1] + 1;
    }
    let pruned = retention::prune(&mut store, &p.source, None, Some(bound as u64))
        .await
        .unwrap();
    let (left, count, oldest) = log_size(&store, &p.source).await;
    assert!(left <= bound, "{left} bytes left, bound {bound}");
    assert_eq!((left, oldest), (expected_left, Some(expected_oldest)));
    assert_eq!(pruned.events as i64, 20 - count);
    let again = retention::prune(&mut store, &p.source, None, Some(bound as u64))
        .await
        .unwrap();
    assert_eq!(again.events, 0, "nothing more while it fits");
    p.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn the_pipeline_runs_retention() {
    let db = TestDb::new().await;
    let retention = Retention {
        max_age: None,
        max_bytes: Some(1),
        interval: Duration::from_millis(100),
    };
    let p = Pipeline::start(&db, "CREATE TABLE t (id int PRIMARY KEY)", Some(retention)).await;
    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
        .await
        .unwrap();
    let store = p.store().await;
    wait_for("retention to prune both events", TIMEOUT, || async {
        store
            .query_opt(
                "SELECT 1 FROM waltap.progress p WHERE source = $1 AND pruned_lsn >= commit_lsn
                 AND NOT EXISTS (SELECT 1 FROM waltap.events e WHERE e.source = p.source)",
                &[&p.source],
            )
            .await
            .is_ok_and(|r| r.is_some()) // the log's tables may not exist yet
    })
    .await;
    p.stop().await;
    db.teardown().await;
}

fn waltap(db: &TestDb, p: &Pipeline, args: &[&str]) -> Command {
    let mut cmd = crate::support::waltap(&db.url(), &["stream"]);
    cmd.args(args).args(["--slot", &p.source]);
    cmd
}

fn lines(stdout: &str) -> Vec<Json> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// `tail`'s output split into its first line, the initialized marker (its position), and
/// the events after it, none of which has a `type`.
fn marked(stdout: &str) -> (Json, Vec<Json>) {
    let mut all = lines(stdout);
    assert!(!all.is_empty(), "no output");
    let marker = all.remove(0);
    assert_eq!(marker["type"], "initialized", "{marker}");
    assert_eq!(marker.as_object().map(|m| m.len()), Some(2), "{marker}");
    for ev in &all {
        assert!(ev.get("type").is_none(), "an event has no type: {ev}");
    }
    (marker["position"].clone(), all)
}

#[tokio::test]
async fn cli_create_list_tail_delete() {
    let db = TestDb::new().await;
    let p = Pipeline::start(&db, "CREATE TABLE t (id int PRIMARY KEY, plan text)", None).await;
    let created: Json = serde_json::from_str(
        &run_ok(waltap(
            &db,
            &p,
            &[
                "create",
                "pro",
                "--table",
                "t",
                "--filter",
                r#"{"create": {"plan": "pro"}}"#,
            ],
        ))
        .await,
    )
    .unwrap();
    assert_eq!(created["name"], "pro");
    assert_eq!(created["tables"], json!(["public.t"]));

    let out = output(waltap(
        &db,
        &p,
        &[
            "create",
            "x",
            "--table",
            "t",
            "--filter",
            r#"{"create": {"nope": 1}}"#,
        ],
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no column \"nope\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1, 'pro'), (2, 'free')")
        .await
        .unwrap();
    commit_each(
        &db.client().await,
        &[
            "INSERT INTO t VALUES (3, 'pro')",
            "INSERT INTO t VALUES (4, 'pro')",
            "INSERT INTO t VALUES (5, 'pro')",
        ],
    )
    .await;
    let (_, first) = marked(&run_ok(waltap(&db, &p, &["tail", "pro", "--limit", "2"])).await);
    let ids_of = |evs: &[Json]| -> Vec<i64> {
        evs.iter()
            .map(|e| e["created"]["id"].as_i64().expect("an id"))
            .collect()
    };
    assert_eq!(ids_of(&first), vec![1, 3]);
    assert_eq!(first[0]["tx"]["total"], 1, "renumbered for the stream");
    let (resumed_after, second) =
        marked(&run_ok(waltap(&db, &p, &["tail", "pro", "--limit", "2"])).await);
    assert_eq!(resumed_after, first[1]["position"], "after the last ack");
    assert_eq!(
        ids_of(&second),
        vec![4, 5],
        "a rerun continues after the acks"
    );

    // Without a limit it follows new events until SIGTERM, acknowledging what it printed.
    let mut child = waltap(&db, &p, &["tail", "pro"]).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let marker = json_line(&mut out).await;
    assert_eq!(
        marker,
        json!({"type": "initialized", "position": second[1]["position"]})
    );
    commit_each(&db.client().await, &["INSERT INTO t VALUES (6, 'pro')"]).await;
    let followed = json_line(&mut out).await;
    assert_eq!(followed["created"]["id"], 6);
    crate::support::sigterm(&child);
    let exit = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "clean exit: {exit:?}");

    let listed: Json =
        serde_json::from_str(&run_ok(waltap(&db, &p, &["list", "--json"])).await).unwrap();
    assert_eq!(listed[0]["name"], "pro");
    assert_eq!(listed[0]["cursor"], followed["position"]);
    assert_eq!(listed[0]["filter"], json!({"create": {"plan": "pro"}}));
    assert_eq!(listed[0]["backlog"], 0);

    // `--limit 0` prints only the marker and acknowledges nothing.
    let (at, events) = marked(&run_ok(waltap(&db, &p, &["tail", "pro", "--limit", "0"])).await);
    assert_eq!((at, events), (followed["position"].clone(), vec![]));

    let holder = p.open("pro").await;
    let out = output(waltap(&db, &p, &["tail", "pro", "--limit", "1"])).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stream_busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    holder.close().await;

    run_ok(waltap(&db, &p, &["delete", "pro"])).await;
    let listed: Json =
        serde_json::from_str(&run_ok(waltap(&db, &p, &["list", "--json"])).await).unwrap();
    assert_eq!(listed, json!([]));
    p.stop().await;
    db.teardown().await;
}

/// An ack awaited while the consumer's next page is in flight and not being polled (the
/// caller polled `next()` once, or raced it in a `select!`) must not wait behind that
/// page: it once did, on a connection shared with the reader.
#[tokio::test]
async fn ack_does_not_wait_behind_an_unpolled_page() {
    use futures::FutureExt;
    let db = TestDb::new().await;
    let p = Pipeline::start(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)",
        None,
    )
    .await;
    p.create("s", &["t"], None).await;
    let w = db.client().await;
    // Two transactions, each row large enough that a page's response
    // outgrows what the connection buffers for an unpolled request.
    commit_each(
        &w,
        &[
            "INSERT INTO t SELECT g, repeat('x', 2000) FROM generate_series(1, 100) g",
            "INSERT INTO t SELECT g, repeat('x', 2000) FROM generate_series(101, 1200) g",
        ],
    )
    .await;
    p.logged(1200).await;
    let options = OpenOptions {
        page_size: 100,
        ..OpenOptions::default()
    };
    let mut c = p.open_with("s", options).await;
    let first = take(&mut c, 100).await;
    // The first page is used up: this poll sends the next page's query and returns.
    if let Some(item) = c.next().now_or_never() {
        panic!("the next page is not read yet, but got {item:?}");
    }
    let acked = tokio::time::timeout(TIMEOUT, c.ack(first[99].position)).await;
    assert!(acked.is_ok(), "the ack waited behind the unpolled page");
    acked.unwrap().unwrap();
    let rest = take(&mut c, 1100).await;
    assert_eq!(ids(&rest), (101..=1200).collect::<Vec<_>>());
    p.stop().await;
}

/// Applied migrations carry a checksum: one recorded by an older waltap (none) is filled
/// in, and an applied migration whose SQL changed stops every command with a clear error.
#[tokio::test]
async fn an_edited_applied_migration_is_refused() {
    let db = TestDb::new().await;
    let c = db.client().await;
    waltap::log::migrate(&c).await.unwrap();
    c.batch_execute("UPDATE waltap.migrations SET checksum = NULL")
        .await
        .unwrap();
    waltap::log::migrate(&c).await.unwrap();
    let unrecorded: i64 = c
        .query_one(
            "SELECT count(*) FROM waltap.migrations WHERE checksum IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unrecorded, 0);

    c.batch_execute("UPDATE waltap.migrations SET checksum = 'edited' WHERE version = 2")
        .await
        .unwrap();
    let err = waltap::log::migrate(&c).await.unwrap_err();
    assert!(
        matches!(err, StoreError::MigrationChanged { version: 2, .. }),
        "{err:?}"
    );
    let out = output(crate::support::waltap(&db.url(), &["stream", "list"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("migration 2 was applied with different SQL"),
        "{stderr}"
    );
    db.teardown().await;
}
