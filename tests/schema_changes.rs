//! Columns added, dropped and retyped while subscribers follow the table (docs/event-format.md,
//! "Schema changes"): a `schemaChange` item before the first event of the new shape, and a
//! typed end for a subscription whose filter names a column that is gone or retyped.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value as Json};
use waltap::{
    ErrorCode, Filter, Hub, HubConfig, Subscription, SubscriptionError, SubscriptionItem,
};

use crate::support::{listen, TestDb};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn next(sub: &mut Subscription) -> Result<SubscriptionItem, SubscriptionError> {
    match tokio::time::timeout(TIMEOUT, sub.next()).await {
        Ok(Some(item)) => item,
        other => panic!("expected an item, got {other:?}"),
    }
}

/// The next item as JSON, which must not be an error.
async fn item(sub: &mut Subscription) -> Json {
    match next(sub).await {
        Ok(item) => serde_json::to_value(&item).unwrap(),
        Err(e) => panic!("unexpected end: {e}"),
    }
}

async fn subscribe(hub: &Hub, table: &str, filter: Option<Json>) -> Subscription {
    let filter = filter.map(|f| serde_json::from_value::<Filter>(f).unwrap());
    let mut sub = hub.subscribe(table, filter).await.unwrap();
    assert_eq!(item(&mut sub).await["type"], "initialized");
    sub
}

fn names(change: &Json) -> Vec<String> {
    change["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn subscribers_hear_of_new_columns_and_filters_on_dropped_or_retyped_ones_end() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, plan text, n int);
         CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let hub = match Hub::start(HubConfig::new(listen::config(&db, &["t", "other"]))).await {
        Ok(h) => h,
        Err(e) => panic!("hub did not start: {e}"),
    };
    let mut all = subscribe(&hub, "t", None).await;
    let mut on_plan = subscribe(&hub, "t", Some(json!({"where": {"plan": "pro"}}))).await;
    let mut on_n = subscribe(&hub, "t", Some(json!({"where": {"n": {"gt": 1}}}))).await;
    let mut elsewhere = subscribe(&hub, "other", None).await;

    c.batch_execute("INSERT INTO t VALUES (1, 'pro', 5)")
        .await
        .unwrap();
    for sub in [&mut all, &mut on_plan, &mut on_n] {
        let ev = item(sub).await;
        assert_eq!(ev["created"], json!({"id": 1, "plan": "pro", "n": 5}));
    }

    // A column added: everyone is told, then gets the row with it.
    c.batch_execute(
        "ALTER TABLE t ADD COLUMN extra text;
         INSERT INTO t VALUES (2, 'pro', 5, 'x');",
    )
    .await
    .unwrap();
    for sub in [&mut all, &mut on_plan, &mut on_n] {
        let change = item(sub).await;
        assert_eq!(change["type"], "schemaChange", "{change}");
        assert_eq!(
            (change["schema"].clone(), change["table"].clone()),
            (json!("public"), json!("t"))
        );
        assert_eq!(names(&change), ["id", "plan", "n", "extra"]);
        assert_eq!(
            change["columns"][0],
            json!({"name": "id", "typeOid": 23, "key": true})
        );
        assert_eq!(item(sub).await["created"]["extra"], "x");
    }

    // A column dropped: the filter that reads it ends with a typed error; the others go on.
    c.batch_execute(
        "ALTER TABLE t DROP COLUMN n;
         INSERT INTO t VALUES (3, 'pro', 'y');",
    )
    .await
    .unwrap();
    match next(&mut on_n).await {
        Err(e @ SubscriptionError::SchemaChanged(_)) => {
            assert_eq!(e.code(), ErrorCode::SchemaChanged);
            assert_eq!(e.code().as_str(), "schema_changed");
            assert!(e.to_string().contains("\"n\" of public.t"), "{e}");
        }
        other => panic!("expected the end of the subscription on n, got {other:?}"),
    }
    for sub in [&mut all, &mut on_plan] {
        assert_eq!(names(&item(sub).await), ["id", "plan", "extra"]);
        assert_eq!(
            item(sub).await["created"],
            json!({"id": 3, "plan": "pro", "extra": "y"})
        );
    }

    // A column retyped: the filter on it ends, the subscription without one is told.
    c.batch_execute(
        "ALTER TABLE t ALTER COLUMN plan TYPE varchar(10);
         INSERT INTO t VALUES (4, 'pro', 'z');
         INSERT INTO other VALUES (1);",
    )
    .await
    .unwrap();
    match next(&mut on_plan).await {
        Err(SubscriptionError::SchemaChanged(conflict)) => {
            assert!(
                conflict
                    .to_string()
                    .contains("changed its type (type oid 25 to 1043)"),
                "{conflict}"
            );
        }
        other => panic!("expected the end of the subscription on plan, got {other:?}"),
    }
    let change = item(&mut all).await;
    assert_eq!(change["type"], "schemaChange");
    assert_eq!(
        change["columns"][1],
        json!({"name": "plan", "typeOid": 1043, "key": false})
    );
    assert_eq!(item(&mut all).await["created"]["id"], 4);
    // The other table's subscriber saw none of it.
    assert_eq!(item(&mut elsewhere).await["created"], json!({"id": 1}));
    hub.shutdown().await;
    db.teardown().await;
}

/// The same through the event log: persisted streams get the item before the first event
/// of the new shape, and a stream whose filter no longer fits ends with `schema_changed`.
#[tokio::test]
async fn persisted_streams_hear_of_schema_changes_from_the_log() {
    use waltap::log::streams::{self, OpenOptions, StreamDef, StreamItem};
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, plan text, n int)")
        .await
        .unwrap();
    let log = crate::support::log::Log::start(&db).await;
    let store = log.store.connect_sql().await.unwrap();
    for (name, filter) in [
        ("all", None),
        ("on_n", Some(json!({"where": {"n": {"gt": 1}}}))),
        (
            "on_plan",
            Some(json!({"where": {"plan": {"startsWith": "p"}}})),
        ),
    ] {
        let def = StreamDef {
            name: name.into(),
            source: log.slot.clone(),
            tables: vec!["t".into()],
            filter: filter.map(|f| serde_json::from_value(f).unwrap()),
            initial_state: false,
            from: None,
        };
        streams::create(&waltap::log::EventLog::Postgres, &store, &store, &def)
            .await
            .unwrap();
    }
    // Consumers open (and compile their filters) before the table changes.
    let mut consumers = Vec::new();
    for name in ["all", "on_n", "on_plan"] {
        let mut c = streams::open(&log.store, name, OpenOptions::default())
            .await
            .unwrap();
        match tokio::time::timeout(TIMEOUT, c.next()).await {
            Ok(Some(Ok(StreamItem::Initialized { .. }))) => {}
            other => panic!("{name}: unexpected {other:?}"),
        }
        consumers.push(c);
    }
    for sql in [
        "INSERT INTO t VALUES (1, 'pro', 5)",
        "ALTER TABLE t ADD COLUMN extra text",
        "INSERT INTO t VALUES (2, 'pro', 5, 'x')",
        "ALTER TABLE t DROP COLUMN n",
        "INSERT INTO t VALUES (3, 'pro', 'y')",
        // A new JSON form for plan: text -> int.
        "ALTER TABLE t ALTER COLUMN plan TYPE int USING length(plan)",
        "INSERT INTO t VALUES (4, 7, 'z')",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    /// What a consumer reads: `created` ids, column lists of `schemaChange` items, and
    /// the error code that ended it, if one did.
    async fn read(c: &mut streams::StreamConsumer, until: usize) -> Vec<Json> {
        let mut seen = Vec::new();
        while seen.len() < until {
            match tokio::time::timeout(TIMEOUT, c.next()).await {
                Ok(Some(Ok(StreamItem::Event(ev)))) => {
                    let ev: waltap::Event<Json> = waltap::log::streams::typed(ev).unwrap();
                    seen.push(ev.new.unwrap()["id"].clone())
                }
                Ok(Some(Ok(item @ StreamItem::SchemaChange { .. }))) => {
                    seen.push(json!(names(&serde_json::to_value(&item).unwrap())))
                }
                Ok(Some(Err(e))) => {
                    seen.push(json!(e.code().as_str()));
                    break;
                }
                other => panic!("unexpected {other:?} after {seen:?}"),
            }
        }
        seen
    }
    let mut consumers = consumers.into_iter();
    let (mut all, mut on_n, mut on_plan) = (
        consumers.next().unwrap(),
        consumers.next().unwrap(),
        consumers.next().unwrap(),
    );
    let shapes = [
        json!(["id", "plan", "n", "extra"]),
        json!(["id", "plan", "extra"]),
    ];
    assert_eq!(
        read(&mut all, 7).await,
        [
            json!(1),
            shapes[0].clone(),
            json!(2),
            shapes[1].clone(),
            json!(3),
            shapes[1].clone(),
            json!(4)
        ]
    );
    assert_eq!(
        read(&mut on_n, 4).await,
        [
            json!(1),
            shapes[0].clone(),
            json!(2),
            json!("schema_changed")
        ]
    );
    assert_eq!(
        read(&mut on_plan, 6).await,
        [
            json!(1),
            shapes[0].clone(),
            json!(2),
            shapes[1].clone(),
            json!(3),
            json!("schema_changed")
        ]
    );
    for c in [all, on_n, on_plan] {
        c.close().await;
    }
    log.stop().await;
    db.teardown().await;
}
