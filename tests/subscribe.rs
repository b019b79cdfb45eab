//! Ephemeral subscriptions through the hub: filters, transitions, fan-out, lag, life cycle.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value as Json};
use waltap::Filter;
use waltap::SubscribeOptions;
use waltap::{CompletionReason, Hub, HubConfig, Subscription, SubscriptionError, SubscriptionItem};

use crate::support::listen;
use crate::support::TestDb;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn hub(db: &TestDb, ddl: &str) -> Hub {
    db.client().await.batch_execute(ddl).await.unwrap();
    let cfg = HubConfig::new(listen::config(db, &[]));
    match Hub::start(cfg).await {
        Ok(h) => h,
        Err(e) => panic!("hub did not start: {e}"),
    }
}

fn filter(v: Json) -> Option<Filter> {
    Some(serde_json::from_value(v).expect("filter JSON parses"))
}

async fn subscribe(hub: &Hub, table: &str, f: Option<Filter>) -> Subscription {
    let mut s = match hub.subscribe(table, f).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe failed: {e}"),
    };
    match tokio::time::timeout(TIMEOUT, s.next()).await {
        Ok(Some(Ok(SubscriptionItem::Initialized { .. }))) => s,
        other => panic!("expected the initialized marker first, got {other:?}"),
    }
}

async fn next_event(s: &mut Subscription) -> Json {
    match tokio::time::timeout(TIMEOUT, s.next()).await {
        Ok(Some(Ok(SubscriptionItem::Event(ev)))) => serde_json::to_value(&ev).unwrap(),
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn events(s: &mut Subscription, n: usize) -> Vec<Json> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next_event(s).await);
    }
    out
}

#[tokio::test]
async fn action_filters_select_actions_and_rows() {
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE users (id int PRIMARY KEY, email text, plan text);
         ALTER TABLE users REPLICA IDENTITY FULL;",
    )
    .await;
    let mut creates = subscribe(&h, "users", filter(json!({"create": {"plan": "pro"}}))).await;
    let mut updates = subscribe(
        &h,
        "users",
        filter(json!({"update": {"after": {"plan": {"in": ["pro", "team"]}, "email": {"endsWith": "@x.io"}}}})),
    )
    .await;
    let mut deletes = subscribe(&h, "users", filter(json!({"delete": {}}))).await;
    let mut all = subscribe(&h, "public.users", None).await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO users VALUES (1, 'a@x.io', 'free'), (2, 'b@y.io', 'pro');
         UPDATE users SET plan = 'team' WHERE id = 1;
         UPDATE users SET plan = 'team' WHERE id = 2;
         DELETE FROM users WHERE id = 1;
         INSERT INTO users VALUES (3, 'c@x.io', 'pro');",
    )
    .await
    .unwrap();
    let evs = events(&mut creates, 2).await;
    assert_eq!(evs[0]["created"]["id"], 2);
    assert_eq!(evs[1]["created"]["id"], 3);
    let evs = events(&mut updates, 1).await;
    assert_eq!(evs[0]["after"]["id"], 1);
    // The whole statement batch is one transaction: counts are per subscriber.
    assert_eq!(evs[0]["tx"]["index"], 0);
    assert_eq!(evs[0]["tx"]["total"], 1);
    assert_eq!(evs[0]["tx"]["last"], true);
    let evs = events(&mut deletes, 1).await;
    assert_eq!(evs[0]["deleted"]["id"], 1);
    let evs = events(&mut all, 6).await;
    assert_eq!(evs[5]["tx"]["total"], 6);
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn transitions_on_a_full_table() {
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, status text);
         ALTER TABLE t REPLICA IDENTITY FULL;",
    )
    .await;
    let mut s = subscribe(
        &h,
        "t",
        filter(json!({"where": {"status": "open"}, "transitions": true})),
    )
    .await;
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    let c = db.client().await;
    for sql in [
        "INSERT INTO t VALUES (1, 'open')",          // appear (create)
        "INSERT INTO t VALUES (2, 'closed')",        // out: nothing
        "UPDATE t SET status = 'open' WHERE id = 2", // appear
        "UPDATE t SET status = 'open' WHERE id = 1", // update (in, in)
        "UPDATE t SET status = 'done' WHERE id = 1", // disappear
        "UPDATE t SET status = 'gone' WHERE id = 1", // out, out: nothing
        "DELETE FROM t WHERE id = 2",                // disappear (delete)
        "DELETE FROM t WHERE id = 1",                // out: nothing
        "INSERT INTO t VALUES (9, 'open')",          // appear, marks the end
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let evs = events(&mut s, 6).await;
    let got: Vec<(&str, &str)> = evs
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["transition"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("create", "appear"),
            ("update", "appear"),
            ("update", "update"),
            ("update", "disappear"),
            ("delete", "disappear"),
            ("create", "appear"),
        ]
    );
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn default_identity_transitions_warn_up_front() {
    let db = TestDb::new().await;
    let h = hub(&db, "CREATE TABLE plain (id int PRIMARY KEY, status text)").await;
    let s = subscribe(
        &h,
        "plain",
        filter(json!({"where": {"status": "open"}, "transitions": true})),
    )
    .await;
    let warnings = s.warnings().join("\n");
    assert!(warnings.contains("public.plain"), "{warnings}");
    assert!(warnings.to_lowercase().contains("disappear"), "{warnings}");
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn fields_deliver_only_updates_that_touch_them() {
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE f (id int PRIMARY KEY, plan text, seen int);
         ALTER TABLE f REPLICA IDENTITY FULL;",
    )
    .await;
    let mut s = subscribe(&h, "f", filter(json!({"update": {}, "fields": ["plan"]}))).await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO f VALUES (1, 'free', 0);
         UPDATE f SET seen = 1;
         UPDATE f SET plan = 'pro';
         UPDATE f SET seen = 2;
         UPDATE f SET plan = 'team', seen = 3;",
    )
    .await
    .unwrap();
    let evs = events(&mut s, 2).await;
    assert_eq!(evs[0]["after"]["plan"], "pro");
    assert_eq!(evs[1]["after"]["plan"], "team");
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn bad_filters_are_rejected_with_their_problem() {
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE b (id int PRIMARY KEY, flag bool, name text)",
    )
    .await;
    let cases = [
        (json!({"create": {"nope": 1}}), "nope"),
        (json!({"create": {"flag": {"lt": true}}}), "lt"),
        (json!({"create": {"id": {"startsWith": "1"}}}), "startsWith"),
        (json!({"create": {"id": "abc"}}), "id"),
    ];
    for (f, needle) in cases {
        match h.subscribe("b", filter(f.clone())).await {
            Ok(_) => panic!("accepted {f}"),
            Err(e) => {
                assert!(matches!(e, SubscriptionError::BadFilter(_)), "{f}: {e}");
                assert_eq!(e.code().as_str(), "bad_filter");
                assert!(waltap::report(&e).contains(needle), "{f}: {e}");
            }
        }
    }
    match h.subscribe("missing_table", None).await {
        Ok(_) => panic!("subscribed to a missing table"),
        Err(e) => assert!(e.to_string().contains("missing_table"), "{e}"),
    }
    assert!(
        serde_json::from_value::<Filter>(json!({"create": {"id": {"bogusOp": 1}}})).is_err()
            || h.subscribe("b", filter(json!({"create": {"id": {"bogusOp": 1}}})))
                .await
                .is_err()
    );
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn hundred_subscribers_each_get_exactly_their_rows() {
    let db = TestDb::new().await;
    let h = hub(&db, "CREATE TABLE m (id int PRIMARY KEY, bucket int)").await;
    let mut subs = Vec::new();
    for b in 0..100 {
        subs.push(subscribe(&h, "m", filter(json!({"create": {"bucket": b}}))).await);
    }
    let c = db.client().await;
    c.batch_execute("INSERT INTO m SELECT g, g % 100 FROM generate_series(0, 999) g")
        .await
        .unwrap();
    for (b, s) in subs.iter_mut().enumerate() {
        let evs = events(s, 10).await;
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["created"]["bucket"], b);
            assert_eq!(e["tx"]["index"], i);
            assert_eq!(e["tx"]["total"], 10);
        }
    }
    // And nothing more for anyone: a marker row for bucket 0 is the next thing bucket 0 sees.
    c.batch_execute("INSERT INTO m VALUES (5000, 0)")
        .await
        .unwrap();
    assert_eq!(next_event(&mut subs[0]).await["created"]["id"], 5000);
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn a_stalled_subscriber_is_cut_off_while_others_go_on() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE l (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut cfg = HubConfig::new(listen::config(&db, &[]));
    cfg.subscriber_queue = 16;
    let h = Hub::start(cfg).await.unwrap();
    let mut stalled = subscribe(&h, "l", None).await;
    let mut live = subscribe(&h, "l", None).await;
    let c = db.client().await;
    for chunk in 0..10 {
        c.batch_execute(&format!(
            "INSERT INTO l SELECT g FROM generate_series({}, {}) g",
            chunk * 10,
            chunk * 10 + 9
        ))
        .await
        .unwrap();
        // The live one keeps up.
        let evs = events(&mut live, 10).await;
        assert_eq!(evs[0]["created"]["id"], chunk * 10);
    }
    // The stalled one gets what fit in its queue, then the lagged error, then the end.
    let mut got = 0;
    loop {
        match tokio::time::timeout(TIMEOUT, stalled.next()).await.unwrap() {
            Some(Ok(SubscriptionItem::Event(_))) => got += 1,
            Some(Err(e)) => {
                assert!(matches!(e, SubscriptionError::Lagged { .. }), "{e}");
                assert_eq!(e.code().as_str(), "lagged");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got <= 16, "got {got}");
    assert!(tokio::time::timeout(TIMEOUT, stalled.next())
        .await
        .unwrap()
        .is_none());
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn writes_right_after_the_marker_are_never_missed() {
    let db = TestDb::new().await;
    let h = hub(&db, "CREATE TABLE race (id int PRIMARY KEY)").await;
    let c = db.client().await;
    // Background traffic so subscriptions join while transactions flow.
    for i in 0..30 {
        let mut s = subscribe(&h, "race", None).await;
        c.execute("INSERT INTO race VALUES ($1)", &[&i])
            .await
            .unwrap();
        let ev = next_event(&mut s).await;
        assert_eq!(ev["created"]["id"], i, "subscription {i} missed its write");
    }
    h.shutdown().await;
    db.teardown().await;
}

/// The next item, which must be `completed` for `reason`; then the subscription ends.
async fn completed(s: &mut Subscription, reason: CompletionReason) -> waltap::Position {
    let position = match tokio::time::timeout(TIMEOUT, s.next()).await.unwrap() {
        Some(Ok(SubscriptionItem::Completed {
            reason: r,
            position,
        })) if r == reason => position,
        other => panic!("expected completed ({reason:?}), got {other:?}"),
    };
    let end = tokio::time::timeout(TIMEOUT, s.next()).await.unwrap();
    assert!(
        end.is_none(),
        "the subscription ends after completed: {end:?}"
    );
    position
}

#[tokio::test]
async fn single_row_subscription_completes_after_its_delete() {
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE one (id int PRIMARY KEY, v text);
         INSERT INTO one VALUES (1, 'a'), (2, 'b'), (3, 'c');
         CREATE TABLE pair (a int, b int, v text, PRIMARY KEY (a, b));",
    )
    .await;
    let mut deleted = subscribe(&h, "one", filter(json!({"where": {"id": 1}}))).await;
    let mut moved = subscribe(&h, "one", filter(json!({"where": {"id": 2}}))).await;
    let mut back = subscribe(&h, "one", filter(json!({"where": {"id": 3}}))).await;
    let mut impure = subscribe(&h, "one", filter(json!({"where": {"id": 1, "v": "x"}}))).await;
    let mut pair = subscribe(&h, "pair", filter(json!({"where": {"a": 1, "b": 2}}))).await;
    let mut half = subscribe(&h, "pair", filter(json!({"where": {"a": 1}}))).await;
    let c = db.client().await;
    c.batch_execute(
        "UPDATE one SET v = 'x' WHERE id = 1;
         BEGIN; DELETE FROM one WHERE id = 1; INSERT INTO one VALUES (9, 'z'); COMMIT;
         UPDATE one SET id = 20 WHERE id = 2;
         BEGIN; DELETE FROM one WHERE id = 3; INSERT INTO one VALUES (3, 'again'); COMMIT;
         INSERT INTO pair VALUES (1, 2, 'p'), (1, 3, 'q');
         DELETE FROM pair;
         INSERT INTO one VALUES (1, 'x');
         UPDATE one SET v = 'y' WHERE id = 3;
         INSERT INTO pair VALUES (1, 4, 'r');",
    )
    .await
    .unwrap();
    let evs = events(&mut deleted, 2).await;
    assert_eq!(evs[0]["action"], "update");
    assert_eq!(evs[1]["action"], "delete");
    assert_eq!(evs[1]["tx"]["last"], true, "numbered over what it receives");
    // At the end of the deleting transaction (which also created row 9).
    let at = completed(&mut deleted, CompletionReason::Deleted)
        .await
        .to_string();
    let delete_at = evs[1]["position"].as_str().unwrap();
    assert!(
        at[..16] == delete_at[..16] && at.as_str() > delete_at,
        "{at} {delete_at}"
    );
    // Its key updated away: the update leaves `where`, and the row is gone.
    completed(&mut moved, CompletionReason::Deleted).await;
    // Deleted and created again in one transaction: still there, and followed on.
    let evs = events(&mut back, 3).await;
    let actions: Vec<&Json> = evs.iter().map(|e| &e["action"]).collect();
    assert_eq!(actions, ["delete", "create", "update"]);
    // A composite key pins only with every column; a filter that is not a pure pin
    // goes on past the delete.
    assert_eq!(events(&mut pair, 2).await[1]["action"], "delete");
    completed(&mut pair, CompletionReason::Deleted).await;
    let evs = events(&mut half, 5).await;
    assert_eq!(evs[3]["action"], "delete");
    assert_eq!(evs[4]["created"]["b"], 4);
    let evs = events(&mut impure, 3).await;
    assert_eq!(evs[1]["action"], "delete");
    assert_eq!(evs[2]["created"]["v"], "x");
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn single_row_subscription_with_initial_state_completes_too() {
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE one (id int PRIMARY KEY, v text);
         INSERT INTO one VALUES (1, 'a');",
    )
    .await;
    let options = SubscribeOptions {
        initial_state: true,
    };
    let open =
        |id: i32| h.subscribe_with("one", filter(json!({"where": {"id": id}})), options.clone());
    let mut there = open(1).await.unwrap();
    let mut missing = open(999).await.unwrap();
    // Every control item carries a position, even before the hub saw any event.
    let mut marks = Vec::new();
    for s in [&mut there, &mut missing] {
        let mut items = Vec::new();
        loop {
            let item = tokio::time::timeout(TIMEOUT, s.next()).await.unwrap();
            let item = item.unwrap().unwrap();
            let done = matches!(item, SubscriptionItem::SnapshotComplete { .. });
            items.push(item);
            if done {
                break;
            }
        }
        marks.push(items);
    }
    for items in &marks {
        let (
            SubscriptionItem::Initialized {
                position: Some(joined),
            },
            SubscriptionItem::SnapshotComplete {
                position: Some(after),
            },
        ) = (&items[0], &items[items.len() - 1])
        else {
            panic!("control items with positions: {items:?}");
        };
        assert!(joined <= after);
    }
    let row = serde_json::to_value(&marks[0][1]).unwrap();
    assert_eq!(
        (&row["action"], &row["row"]["id"]),
        (&json!("snapshot"), &json!(1))
    );
    assert_eq!(marks[1].len(), 2, "no row for 999: {:?}", marks[1]);
    let SubscriptionItem::SnapshotComplete {
        position: Some(after),
    } = marks[1][1]
    else {
        unreachable!()
    };
    assert_eq!(
        completed(&mut missing, CompletionReason::NotFound).await,
        after
    );
    db.client()
        .await
        .batch_execute("DELETE FROM one WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(next_event(&mut there).await["action"], "delete");
    completed(&mut there, CompletionReason::Deleted).await;
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn initialized_on_a_fresh_slot_carries_where_streaming_starts() {
    let db = TestDb::new().await;
    let h = hub(&db, "CREATE TABLE fresh (id int PRIMARY KEY)").await;
    let mut s = h.subscribe("fresh", None).await.unwrap();
    let start = match tokio::time::timeout(TIMEOUT, s.next()).await.unwrap() {
        Some(Ok(SubscriptionItem::Initialized { position: Some(p) })) => p,
        other => panic!("expected initialized with a position, got {other:?}"),
    };
    db.client()
        .await
        .batch_execute("INSERT INTO fresh VALUES (1)")
        .await
        .unwrap();
    let ev = next_event(&mut s).await;
    assert!(
        ev["position"].as_str().unwrap() > start.to_string().as_str(),
        "the changes delivered lie after {start}: {ev}"
    );
    h.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn typed_rows_through_serde() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct User {
        id: i32,
        email: String,
        score: Option<f64>,
    }
    let db = TestDb::new().await;
    let h = hub(
        &db,
        "CREATE TABLE tu (id int PRIMARY KEY, email text, score float8)",
    )
    .await;
    let mut s = subscribe(&h, "tu", None).await;
    db.client()
        .await
        .batch_execute("INSERT INTO tu VALUES (7, 'a@x.io', NULL)")
        .await
        .unwrap();
    let ev = match tokio::time::timeout(TIMEOUT, s.next()).await.unwrap() {
        Some(Ok(SubscriptionItem::Event(ev))) => ev,
        other => panic!("{other:?}"),
    };
    let typed: waltap::Event<User> = ev.into_typed().unwrap();
    assert_eq!(
        typed.after(),
        Some(&User {
            id: 7,
            email: "a@x.io".into(),
            score: None
        })
    );
    h.shutdown().await;
    db.teardown().await;
}

/// `waltap serve` started while Postgres restarted exited ("cannot start the subscription
/// hub"), though a running hub rides out a restart (found by the chaos harness). With
/// `start_offline`, a hub started while Postgres is down comes up not streaming, refuses
/// subscribers with `source_unavailable`, and streams once Postgres is back; without it,
/// the start fails as before.
#[tokio::test]
async fn a_hub_started_while_postgres_is_down_streams_once_it_is_back() {
    let cluster = match tokio::task::spawn_blocking(crate::support::Cluster::start_dedicated)
        .await
        .unwrap()
    {
        Ok(c) => std::sync::Arc::new(c),
        Err(why) => {
            eprintln!(
                "skipped a_hub_started_while_postgres_is_down_streams_once_it_is_back: {why}"
            );
            return;
        }
    };
    let db = TestDb::new_on(&cluster).await;
    db.client()
        .await
        .batch_execute("CREATE TABLE l (id int PRIMARY KEY)")
        .await
        .unwrap();
    let listener = listen::config(&db, &[]);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop_immediate())
        .await
        .unwrap();
    assert!(
        Hub::start(HubConfig::new(listener.clone())).await.is_err(),
        "without start_offline, a hub that cannot connect does not start"
    );
    let mut cfg = HubConfig::new(listener);
    cfg.start_offline = true;
    let h = match Hub::start(cfg).await {
        Ok(h) => h,
        Err(e) => panic!("start_offline: the hub did not start: {e}"),
    };
    assert!(!h.is_streaming());
    match h.subscribe("l", None).await {
        Err(e) => assert_eq!(e.code().as_str(), "source_unavailable", "{e}"),
        Ok(_) => panic!("a hub that never connected took a subscriber"),
    }
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start())
        .await
        .unwrap();
    let hub = &h;
    crate::support::wait_for("the hub to connect", TIMEOUT, || async move {
        hub.is_streaming()
    })
    .await;
    let mut s = subscribe(&h, "l", None).await;
    db.client()
        .await
        .batch_execute("INSERT INTO l VALUES (1)")
        .await
        .unwrap();
    let evs = events(&mut s, 1).await;
    assert_eq!(evs[0]["created"]["id"], 1);
    drop(s);
    h.shutdown().await;
    db.teardown().await;
}
