//! Values at the edges of their types through a real server, in every path that writes
//! them: live events, initial-state rows, `waltap export`, and filters over a persisted
//! stream (which compare the values read back from the log). The forms are documented in
//! docs/event-format.md ("Dates and times", "Arrays").

use std::time::Duration;

use serde_json::{json, Value as Json};
use waltap::log::streams::{self, OpenOptions, StreamDef, StreamItem};
use waltap::{Filter, Hub, HubConfig, SubscribeOptions, SubscriptionItem};

use crate::support::log::Log;
use crate::support::{listen, TestDb};

const TIMEOUT: Duration = Duration::from_secs(60);

const TABLE: &str = "CREATE TABLE edge (
    id int PRIMARY KEY, ts timestamp, tstz timestamptz, d date,
    arr int4[], grid int8[], tsarr timestamptz[], darr date[]
)";

/// `(id, SQL values after the id, the row's JSON)`: each edge case once.
fn cases() -> Vec<(i32, &'static str, Json)> {
    vec![
        (
            1,
            "'0097-02-16 00:00:00 BC', '0097-02-16 00:00:00+00 BC', '0097-02-16 BC', \
             NULL, NULL, NULL, NULL",
            json!({"ts": "-000096-02-16T00:00:00.000000",
                   "tstz": "-000096-02-16T00:00:00.000000Z", "d": "-000096-02-16"}),
        ),
        (
            2,
            "'294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00', \
             '5874897-12-31', NULL, NULL, NULL, NULL",
            json!({"ts": "+294276-12-31T23:59:59.999999",
                   "tstz": "+294276-12-31T23:59:59.999999Z", "d": "+5874897-12-31"}),
        ),
        (
            3,
            "'infinity', 'infinity', 'infinity', NULL, NULL, NULL, NULL",
            json!({"ts": "infinity", "tstz": "infinity", "d": "infinity"}),
        ),
        (
            4,
            "'-infinity', '-infinity', '-infinity', NULL, NULL, NULL, NULL",
            json!({"ts": "-infinity", "tstz": "-infinity", "d": "-infinity"}),
        ),
        (
            5,
            "'0001-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC', '0001-12-31 BC', \
             NULL, NULL, NULL, NULL",
            json!({"ts": "+000000-01-01T00:00:00.000000",
                   "tstz": "-004712-01-01T00:00:00.000000Z", "d": "+000000-12-31"}),
        ),
        (
            6,
            "'9999-12-31 23:59:59', '0001-01-01 00:00:00+00', '10000-01-01', \
             '[0:1]={1,2}', '[0:1][-5:-5]={{1},{9007199254740993}}', \
             '[-1:-1]={\"0097-02-16 00:00:00+00 BC\"}', '[2:3]={infinity,10000-01-01}'",
            json!({"ts": "9999-12-31T23:59:59.000000",
                   "tstz": "0001-01-01T00:00:00.000000Z", "d": "+010000-01-01",
                   "arr": {"lowerBounds": [0], "values": [1, 2]},
                   "grid": {"lowerBounds": [0, -5], "values": [[1], [9007199254740993i64]]},
                   "tsarr": {"lowerBounds": [-1], "values": ["-000096-02-16T00:00:00.000000Z"]},
                   "darr": {"lowerBounds": [2], "values": ["infinity", "+010000-01-01"]}}),
        ),
        (
            7,
            "'2026-11-27 10:00:00', '2026-11-27 10:00:00+00', '2026-11-27', \
             '{1,2}', '[1:1][1:1]={{3}}', '{}', '{}'",
            json!({"ts": "2026-11-27T10:00:00.000000",
                   "tstz": "2026-11-27T10:00:00.000000Z", "d": "2026-11-27",
                   "arr": [1, 2], "grid": [[3]], "tsarr": [], "darr": []}),
        ),
    ]
}

/// The full row JSON of a case with id `id`: every column, NULLs included.
fn row(id: i32, values: &Json) -> Json {
    let mut row = json!({"id": id, "ts": null, "tstz": null, "d": null, "arr": null,
                         "grid": null, "tsarr": null, "darr": null});
    for (k, v) in values.as_object().unwrap() {
        row[k] = v.clone();
    }
    row
}

/// Inserts every case, with ids offset by `offset`.
async fn insert(db: &TestDb, offset: i32) {
    let c = db.client().await;
    for (id, values, _) in cases() {
        c.batch_execute(&format!(
            "INSERT INTO edge VALUES ({}, {values})",
            id + offset
        ))
        .await
        .unwrap();
    }
}

fn expected(offset: i32) -> Vec<Json> {
    cases()
        .into_iter()
        .map(|(id, _, values)| row(id + offset, &values))
        .collect()
}

async fn next<S, T, E>(items: &mut S) -> T
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    T: std::fmt::Debug,
    E: std::fmt::Debug,
{
    crate::support::next_item(items, TIMEOUT).await
}

#[tokio::test]
async fn edge_values_in_live_events_and_initial_state_rows() {
    let db = TestDb::new().await;
    db.client().await.batch_execute(TABLE).await.unwrap();
    insert(&db, 0).await;
    let hub = match Hub::start(HubConfig::new(listen::config(&db, &["edge"]))).await {
        Ok(h) => h,
        Err(e) => panic!("hub did not start: {e}"),
    };
    let options = || SubscribeOptions {
        initial_state: true,
    };
    let mut all = hub.subscribe_with("edge", None, options()).await.unwrap();
    // Filters compare what the values mean: dates before year 1 and after 9999, and the
    // infinities, sort where Postgres sorts them.
    let filter: Filter = serde_json::from_value(json!({"where": {"OR": [
        {"d": {"lt": "0001-01-01"}},
        {"tstz": {"gt": "+010000-01-01T00:00:00Z"}}
    ]}}))
    .unwrap();
    let mut filtered = hub
        .subscribe_with("edge", Some(filter), options())
        .await
        .unwrap();
    for (sub, want) in [
        (&mut all, expected(0)),
        (&mut filtered, {
            let all = expected(0);
            // 97 BC, 294276 AD (tstz), -infinity, 1 BC.
            vec![
                all[0].clone(),
                all[1].clone(),
                all[2].clone(),
                all[3].clone(),
                all[4].clone(),
            ]
        }),
    ] {
        let mut rows = Vec::new();
        loop {
            match next(sub).await {
                SubscriptionItem::Initialized { .. } => {}
                SubscriptionItem::Snapshot(r) => rows.push(serde_json::to_value(&r.row).unwrap()),
                SubscriptionItem::SnapshotComplete { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(rows, want, "initial-state rows");
    }
    insert(&db, 100).await;
    let mut events = Vec::new();
    while events.len() < cases().len() {
        match next(&mut all).await {
            SubscriptionItem::Event(ev) => {
                events.push(serde_json::to_value(&ev).unwrap()["created"].clone())
            }
            other => panic!("expected an insert, got {other:?}"),
        }
    }
    assert_eq!(events, expected(100), "live events");
    let mut ids = Vec::new();
    while ids.len() < 5 {
        match next(&mut filtered).await {
            SubscriptionItem::Event(ev) => {
                ids.push(serde_json::to_value(&ev).unwrap()["created"]["id"].clone())
            }
            other => panic!("expected an insert, got {other:?}"),
        }
    }
    assert_eq!(
        ids,
        json!([101, 102, 103, 104, 105]).as_array().unwrap().clone()
    );
    hub.shutdown().await;
    db.teardown().await;
}

/// `waltap export` writes the rows as events do, and a persisted stream's filter (which
/// compares the values read back from the log) matches the edge values by meaning.
#[tokio::test]
async fn edge_values_in_export_and_stream_filters() {
    let db = TestDb::new().await;
    db.client().await.batch_execute(TABLE).await.unwrap();
    insert(&db, 0).await;
    let log = Log::start(&db).await;
    let rows = log.export_rows(&db, "edge").await;
    let store = log.store.connect_sql().await.unwrap();
    assert_eq!(rows, expected(0), "exported rows");

    let def = StreamDef {
        name: "edges".into(),
        source: log.slot.clone(),
        tables: vec!["edge".into()],
        filter: Some(
            serde_json::from_value(json!({"where": {"OR": [
                {"d": {"in": ["0097-02-16 BC", "+010000-01-01"]}},
                {"ts": {"gte": "+100000-01-01T00:00:00"}},
                {"arr": {"contains": 2}}
            ]}}))
            .unwrap(),
        ),
        initial_state: false,
        from: None,
    };
    streams::create(&waltap::log::EventLog::Postgres, &store, &store, &def)
        .await
        .unwrap();
    insert(&db, 100).await;
    let mut c = streams::open(&log.store, "edges", OpenOptions::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.len() < 5 {
        match next(&mut c).await {
            StreamItem::Initialized { .. } => {}
            StreamItem::Event(ev) => {
                ids.push(serde_json::to_value(&ev).unwrap()["created"]["id"].clone())
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // 97 BC, 294276 AD, infinity, +010000 with a bounded array holding 2, and {1,2}.
    assert_eq!(ids, [101, 102, 103, 106, 107].map(|i| json!(i)).to_vec());
    c.close().await;
    log.stop().await;
    db.teardown().await;
}
