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
