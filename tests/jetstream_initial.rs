//! Initial states of named streams on the JetStream log: the snapshot placed among the
//! stream's messages, under writes, on an idle source (the watermark mark in the progress
//! bucket), and across a SIGKILL of the writer, against a real `nats-server`.

use futures::StreamExt;
use waltap::log::jetstream::{JetStreamConfig, JetStreamReader};
use waltap::log::streams::{self, OpenOptions, StreamConsumer, StreamDef, StreamItem};
use waltap::log::{ConsumerPool, EventLog};

use crate::jetstream::{jetstream, nats, nats_args, CATCH_UP};
use crate::jetstream_streams::{appending, Appending};
use crate::support::{self, wait_for, TestDb};

/// Creates stream `def` on `log` and opens it (making its copy).
async fn create_and_open(
    log: &EventLog,
    pool: &ConsumerPool,
    store: &waltap::SourceConfig,
    def: &StreamDef,
) -> StreamConsumer {
    let client = store.connect_sql().await.unwrap();
    streams::create(log, &client, &client, def).await.unwrap();
    let options = OpenOptions {
        page_size: 100,
        ..OpenOptions::default()
    };
    streams::open_pooled(pool, store, &def.name, options)
        .await
        .unwrap()
}

/// A stream with an initial state on JetStream, made while writers are busy: its copy plus
/// the changes after it equal the table. Then, with the source idle (nothing appended
/// after the snapshot's watermark, so only the watermark mark in the progress bucket says
/// the log passed it), a second stream's copy completes, and a change committed right
/// after it arrives once.
#[tokio::test]
async fn a_stream_with_initial_state_on_jetstream_equals_the_table() {
    use crate::initial_state::{busy, current, follow_stream, next, table, Copy, ROWS};

    let Some((server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    table(&db, false).await;
    let Appending {
        source,
        publication: publication_name,
        store,
        log,
        cancel,
        pipeline,
    } = appending(&db, &server.url(), "WARM").await;
    let pool = ConsumerPool::reading(&store, 4, log.clone()).unwrap();
    let def = |name: &str| StreamDef {
        name: name.into(),
        source: source.clone(),
        tables: vec!["acc".into()],
        filter: None,
        initial_state: true,
        from: None,
    };

    let (stop, writers) = busy(&db).await;
    let mut c = create_and_open(&log, &pool, &store, &def("warm")).await;
    let mut copy = Copy::default();
    follow_stream(&db, &mut c, &mut copy, stop, writers).await;
    assert!(copy.snapshot_rows >= ROWS as usize - 50);
    assert_eq!(
        copy.rows,
        current(&db, "true").await,
        "the copy equals the table"
    );
    c.close().await;

    // Idle now: the sentinel was the last change appended.
    let mut c = create_and_open(&log, &pool, &store, &def("idle")).await;
    let mut copy = Copy::default();
    while copy.complete.is_none() {
        let item = next(&mut c).await;
        if let StreamItem::Snapshot(row) = &item {
            c.ack_snapshot(row.seq.unwrap()).await.unwrap();
        }
        copy.apply(item);
    }
    assert_eq!(
        copy.rows,
        current(&db, "true").await,
        "the idle copy equals the table"
    );
    db.client()
        .await
        .batch_execute("INSERT INTO acc VALUES (-1, 1, 'after')")
        .await
        .unwrap();
    while !copy.rows.contains_key(&-1) {
        copy.apply(next(&mut c).await);
    }
    assert_eq!(copy.changes, 1, "the change after the copy arrives once");
    c.close().await;
    // What the writer recorded beside the stream: its publication, and the idle copy's
    // watermark mark.
    let bucket = jetstream(&server.url())
        .await
        .get_key_value("WARM_progress")
        .await
        .unwrap();
    let publication = bucket.get(format!("{source}.publication")).await.unwrap();
    assert_eq!(
        publication.as_deref(),
        Some(publication_name.as_bytes()),
        "the writer's publication"
    );
    assert!(bucket
        .get(format!("{source}.watermark"))
        .await
        .unwrap()
        .is_some());

    cancel.cancel();
    pipeline.await.unwrap().unwrap();
    db.teardown().await;
}

/// A stream's initial state whose snapshot is taken while `waltap run --nats-url` is
/// SIGKILLed: the copy waits for the watermark until a restarted run passes it, then
/// delivers the rows and exactly the changes committed after the snapshot, once each.
#[tokio::test]
async fn an_initial_state_waits_through_a_sigkill_of_the_jetstream_writer() {
    use crate::crash::Run;

    let Some((server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    let db_client = db.client().await;
    db_client
        .batch_execute(
            "CREATE TABLE \"Kept Rows\" (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO \"Kept Rows\" SELECT g, 0 FROM generate_series(1, 500) g;",
        )
        .await
        .unwrap();
    let (slot, publication) = (db.unique_name("js_init"), db.unique_name("js_init_pub"));
    let url = server.url();
    let run = || {
        let mut args = vec![
            "run",
            "--table",
            "Kept Rows",
            "--slot",
            &slot,
            "--publication",
            &publication,
        ];
        args.extend(nats_args(&url, "KILLED"));
        Run::spawn_command(support::waltap(&db.url(), &args))
    };
    let writer = run();
    wait_for("the writer's slot", CATCH_UP, || async {
        writer.assert_alive("while starting");
        db_client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    db_client
        .batch_execute("UPDATE \"Kept Rows\" SET v = 1 WHERE id = 1")
        .await
        .unwrap();
    let js = jetstream(&url).await;
    wait_for("the first change in JetStream", CATCH_UP, || {
        let js = js.clone();
        async move {
            match js.get_stream("KILLED").await {
                Ok(mut st) => st.info().await.unwrap().state.messages >= 1,
                Err(_) => false,
            }
        }
    })
    .await;
    writer.sigkill("before the initial state").await;

    let store = waltap::SourceConfig::parse(&db.url()).unwrap();
    let js_config = JetStreamConfig::parse(&url)
        .unwrap()
        .with_stream("KILLED")
        .unwrap();
    let log = EventLog::JetStream(JetStreamReader::new(&js_config, &slot));
    let def = StreamDef {
        name: "kept".into(),
        source: slot.clone(),
        tables: vec!["\"Kept Rows\"".into()],
        filter: None,
        initial_state: true,
        from: None,
    };
    let pool = ConsumerPool::reading(&store, 4, log.clone()).unwrap();
    let opening = {
        let store = store.clone();
        tokio::spawn(async move { create_and_open(&log, &pool, &store, &def).await })
    };
    // The snapshot is taken (its transaction stays open while the copy waits for the
    // watermark, which no writer passes yet); these changes come after it. Only this
    // database's sessions count: other tests take snapshots of their own meanwhile.
    wait_for("the initial state's snapshot", CATCH_UP, || async {
        let n: i64 = db_client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND state = 'idle in transaction'
                   AND query LIKE '%pg_logical_emit_message%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n >= 1
    })
    .await;
    db_client
        .batch_execute(
            "UPDATE \"Kept Rows\" SET v = 2 WHERE id = 2;
             DELETE FROM \"Kept Rows\" WHERE id = 3;
             INSERT INTO \"Kept Rows\" VALUES (501, 2);",
        )
        .await
        .unwrap();
    let writer = run();
    let mut c = tokio::time::timeout(CATCH_UP, opening)
        .await
        .expect("the copy completes once the writer is back")
        .unwrap();
    let mut rows = std::collections::BTreeMap::new();
    let mut changes = Vec::new();
    while changes.len() < 3 {
        let item = match tokio::time::timeout(CATCH_UP, c.next()).await {
            Ok(Some(Ok(item))) => item,
            other => panic!(
                "expected an item after {} rows and changes {changes:?}, got {other:?}",
                rows.len()
            ),
        };
        match item {
            StreamItem::Snapshot(row) => {
                let r = serde_json::to_value(&row.row).unwrap();
                rows.insert(r["id"].as_i64().unwrap(), r["v"].as_i64().unwrap());
            }
            StreamItem::Event(ev) => {
                let ev = serde_json::to_value(&ev).unwrap();
                changes.push((ev["action"].as_str().unwrap().to_owned(), ev.to_string()));
            }
            _ => {}
        }
    }
    assert_eq!(rows.len(), 500, "the rows as of the snapshot");
    assert_eq!((rows[&1], rows[&2], rows.contains_key(&3)), (1, 0, true));
    let actions: Vec<&str> = changes.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actions, ["update", "delete", "create"], "{changes:?}");
    db_client
        .batch_execute("INSERT INTO \"Kept Rows\" VALUES (502, 3)")
        .await
        .unwrap();
    match crate::initial_state::next(&mut c).await {
        StreamItem::Event(ev) => {
            let ev: waltap::Event<serde_json::Value> = waltap::log::streams::typed(ev).unwrap();
            assert_eq!(ev.new.unwrap()["id"], 502)
        }
        other => panic!("expected the next change, got {other:?}"),
    }
    c.close().await;
    writer.sigkill("at the end").await;
    db.teardown().await;
}
