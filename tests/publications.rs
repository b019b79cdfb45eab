//! What a publication's options do to events and initial states (README, "What the
//! database needs"; docs/event-format.md, "Partitioned tables" and "Generated columns"):
//! partitioned tables with and without `publish_via_partition_root`, ATTACH / DETACH
//! PARTITION and partition-level TRUNCATE, and PostgreSQL 18's
//! `publish_generated_columns`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value as Json};
use waltap::{
    ErrorCode, Hub, HubConfig, SubscribeOptions, Subscription, SubscriptionError, SubscriptionItem,
    TableError,
};

use crate::support::{listen, quote_ident, TestDb};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn item(sub: &mut Subscription) -> SubscriptionItem {
    match tokio::time::timeout(TIMEOUT, sub.next()).await {
        Ok(Some(Ok(item))) => item,
        other => panic!("expected an item, got {other:?}"),
    }
}

/// The next change as JSON.
async fn change(sub: &mut Subscription) -> Json {
    match item(sub).await {
        SubscriptionItem::Event(ev) => serde_json::to_value(&ev).unwrap(),
        other => panic!("expected a change, got {other:?}"),
    }
}

/// The initial-state rows up to `snapshotComplete`, sorted by id.
async fn rows(sub: &mut Subscription) -> Vec<Json> {
    let mut rows = Vec::new();
    loop {
        match item(sub).await {
            SubscriptionItem::Initialized { .. } => {}
            SubscriptionItem::Snapshot(r) => rows.push(serde_json::to_value(&r.row).unwrap()),
            SubscriptionItem::SnapshotComplete { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    rows.sort_by_key(|r| r["id"].as_i64());
    rows
}

/// A hub over a publication the test made with `options` (`WITH (...)` text or empty).
async fn hub_over(db: &TestDb, tables: &str, options: &str) -> Hub {
    let mut config = listen::config(db, &[]);
    config.create_publication = false;
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {tables} {options}",
            quote_ident(&config.publication)
        ))
        .await
        .unwrap();
    match Hub::start(HubConfig::new(config)).await {
        Ok(h) => h,
        Err(e) => panic!("hub did not start: {e}"),
    }
}

const PARTITIONED: &str = "
    CREATE TABLE m (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
    CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');
    INSERT INTO m VALUES (1, 'eu'), (2, 'us');";

#[tokio::test]
async fn partitions_via_the_root_arrive_under_the_root() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(PARTITIONED).await.unwrap();
    let hub = hub_over(&db, "m", "WITH (publish_via_partition_root = true)").await;
    let options = SubscribeOptions {
        initial_state: true,
    };
    let mut sub = hub.subscribe_with("m", None, options).await.unwrap();
    assert_eq!(
        rows(&mut sub).await,
        [
            json!({"id": 1, "region": "eu"}),
            json!({"id": 2, "region": "us"})
        ],
        "the initial state reads every partition through the root"
    );
    c.batch_execute("INSERT INTO m VALUES (3, 'eu'); INSERT INTO m_us VALUES (4, 'us');")
        .await
        .unwrap();
    for id in [3, 4] {
        let ev = change(&mut sub).await;
        assert_eq!(
            (ev["table"].clone(), ev["created"]["id"].clone()),
            (json!("m"), json!(id))
        );
    }

    // TRUNCATE of one partition: Postgres publishes nothing for it under the root (the
    // rows vanish without an event); TRUNCATE of the root arrives as a truncate of it.
    c.batch_execute("TRUNCATE m_eu; INSERT INTO m VALUES (5, 'us'); TRUNCATE m;")
        .await
        .unwrap();
    let ev = change(&mut sub).await;
    assert_eq!(
        ev["created"]["id"], 5,
        "nothing for the partition's truncate: {ev}"
    );
    let ev = change(&mut sub).await;
    assert_eq!(
        (ev["action"].clone(), ev["table"].clone()),
        (json!("truncate"), json!("m"))
    );

    // ATTACH PARTITION: the attached table's rows become the root's without an event;
    // DETACH PARTITION: they leave it without one. Changes after each follow the root.
    // Each statement its own transaction, as they usually are.
    for sql in [
        "CREATE TABLE m_asia (id int NOT NULL, region text NOT NULL)",
        "INSERT INTO m_asia VALUES (6, 'asia')",
        "ALTER TABLE m ATTACH PARTITION m_asia FOR VALUES IN ('asia')",
        "INSERT INTO m VALUES (7, 'asia')",
        "ALTER TABLE m DETACH PARTITION m_us",
        "INSERT INTO m_us VALUES (8, 'us')",
        "INSERT INTO m VALUES (9, 'eu')",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let created = [change(&mut sub).await, change(&mut sub).await].map(|ev| ev["created"].clone());
    if crate::support::cluster().server_version_num() >= 150000 {
        assert_eq!(
            created,
            [
                json!({"id": 7, "region": "asia"}),
                json!({"id": 9, "region": "eu"})
            ],
            "the attached partition's insert is the root's, the detached table's is not"
        );
    } else {
        // PostgreSQL 14's walsender keeps deciding by what it cached before: the attached
        // partition's insert is missing and the detached table's arrives under the root
        // (README: re-read after ATTACH/DETACH, and on 14 restart the connection first).
        assert_eq!(
            created,
            [
                json!({"id": 8, "region": "us"}),
                json!({"id": 9, "region": "eu"})
            ]
        );
    }

    // A new initial state reads the root as it is now.
    let options = SubscribeOptions {
        initial_state: true,
    };
    let mut again = hub.subscribe_with("m", None, options).await.unwrap();
    assert_eq!(
        rows(&mut again).await,
        [
            json!({"id": 6, "region": "asia"}),
            json!({"id": 7, "region": "asia"}),
            json!({"id": 9, "region": "eu"})
        ]
    );
    hub.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn partitions_without_the_root_are_tables_of_their_own() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(PARTITIONED).await.unwrap();
    let hub = hub_over(&db, "m", "").await;
    // The root: refused with a reason, rather than a subscription that never delivers.
    match hub.subscribe("m", None).await {
        Err(e @ SubscriptionError::Table(TableError::PartitionRoot(_))) => {
            assert_eq!(e.code(), ErrorCode::UnknownTable);
            assert!(e.to_string().contains("publish_via_partition_root"), "{e}");
        }
        Err(e) => panic!("expected the partition-root error, got {e}"),
        Ok(_) => panic!("expected the partition-root error, got a subscription"),
    }
    let mut eu = hub.subscribe("m_eu", None).await.unwrap();
    assert!(matches!(
        item(&mut eu).await,
        SubscriptionItem::Initialized { .. }
    ));
    c.batch_execute("INSERT INTO m VALUES (3, 'eu'); TRUNCATE m_eu; TRUNCATE m;")
        .await
        .unwrap();
    let ev = change(&mut eu).await;
    assert_eq!(
        (ev["table"].clone(), ev["created"]["id"].clone()),
        (json!("m_eu"), json!(3))
    );
    // Its own TRUNCATE, and the root's, which Postgres sends as one of every partition.
    for _ in 0..2 {
        let ev = change(&mut eu).await;
        assert_eq!(
            (ev["action"].clone(), ev["table"].clone()),
            (json!("truncate"), json!("m_eu"))
        );
    }
    hub.shutdown().await;
    db.teardown().await;
}

/// Generated columns: left out of events and initial-state rows alike, unless the
/// publication sends them (PostgreSQL 18, `publish_generated_columns = stored`), and then
/// in both.
#[tokio::test]
async fn generated_columns_follow_the_publication_in_events_and_initial_state() {
    let version = crate::support::cluster().server_version_num();
    let mut cases = vec![("", false)];
    if version >= 180000 {
        cases.push(("WITH (publish_generated_columns = stored)", true));
    } else {
        eprintln!("publish_generated_columns needs PostgreSQL 18: checking the default only");
    }
    for (options, sent) in cases {
        let db = TestDb::new().await;
        let c = db.client().await;
        c.batch_execute(
            "CREATE TABLE g (id int PRIMARY KEY, price int,
                             doubled int GENERATED ALWAYS AS (price * 2) STORED);
             INSERT INTO g (id, price) VALUES (1, 10);",
        )
        .await
        .unwrap();
        let hub = hub_over(&db, "g", options).await;
        let with = |id: i32, price: i32| {
            if sent {
                json!({"id": id, "price": price, "doubled": price * 2})
            } else {
                json!({"id": id, "price": price})
            }
        };
        let options = SubscribeOptions {
            initial_state: true,
        };
        let mut sub = hub.subscribe_with("g", None, options).await.unwrap();
        assert_eq!(
            rows(&mut sub).await,
            [with(1, 10)],
            "initial state ({sent})"
        );
        c.batch_execute("INSERT INTO g (id, price) VALUES (2, 21)")
            .await
            .unwrap();
        assert_eq!(
            change(&mut sub).await["created"],
            with(2, 21),
            "event ({sent})"
        );
        hub.shutdown().await;
        db.teardown().await;
    }
}

/// `waltap setup --table ROOT` publishes the partitions through the root; a publication
/// made without the option is refused for the root with the reason.
#[tokio::test]
async fn setup_publishes_a_partitioned_table_through_its_root() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(PARTITIONED).await.unwrap();
    let setup = |publication: String| waltap::setup::SetupOptions {
        slot: db.unique_name("slot"),
        publication,
        tables: vec![waltap::TableName::parse("m")],
        create_publication: true,
        create_slot: true,
        temporary_slot: false,
        failover_slot: false,
        consumed_through: None,
    };
    let made = db.unique_name("pub");
    waltap::setup::prepare(&c, &setup(made.clone()))
        .await
        .unwrap();
    let via_root: bool = c
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&made],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        via_root,
        "the publication waltap made sends changes under the root"
    );

    let theirs = db.unique_name("pub");
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE m",
        quote_ident(&theirs)
    ))
    .await
    .unwrap();
    match waltap::setup::prepare(&c, &setup(theirs)).await {
        Err(e) => assert!(
            e.to_string().contains("publish_via_partition_root is off"),
            "{e}"
        ),
        Ok(_) => panic!("setup accepted a root its publication does not send"),
    }
    db.teardown().await;
}

/// The start-up checks pass names as query parameters: a schema with a dot, a table with a
/// space and a non-ASCII letter, a publication with a quote are found, created once and
/// found again; a missing table and a slot of another plugin are refused by name.
#[tokio::test]
async fn setup_checks_find_names_that_need_quoting_and_refuse_a_foreign_slot() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        r#"CREATE SCHEMA "my.app";
           CREATE TABLE "my.app"."Örder Items" (id int8 PRIMARY KEY, note text);"#,
    )
    .await
    .unwrap();
    let table = waltap::TableName {
        schema: "my.app".into(),
        table: "Örder Items".into(),
    };
    let publication = format!("{} \"q\"", db.unique_name("pub"));
    let options = |slot: String, tables: Vec<waltap::TableName>| waltap::setup::SetupOptions {
        slot,
        publication: publication.clone(),
        tables,
        create_publication: true,
        create_slot: true,
        temporary_slot: false,
        failover_slot: false,
        consumed_through: None,
    };
    let slot = db.unique_name("slot");
    let first = waltap::setup::prepare(&c, &options(slot.clone(), vec![table.clone()]))
        .await
        .expect("first set-up");
    assert!(first.publication_created && first.slot_created);
    assert_eq!(
        first
            .tables
            .iter()
            .map(|t| t.table.as_str())
            .collect::<Vec<_>>(),
        [table.to_string()]
    );
    let again = waltap::setup::prepare(&c, &options(slot.clone(), vec![table.clone()]))
        .await
        .expect("second set-up");
    assert!(!again.publication_created && !again.slot_created);
    assert!(again.slot.is_some_and(|s| s.name == slot));

    let missing = waltap::TableName {
        schema: "my.app".into(),
        table: "Örder Item".into(),
    };
    let e = waltap::setup::prepare(&c, &options(slot.clone(), vec![missing.clone()]))
        .await
        .expect_err("a missing table");
    assert!(
        e.to_string()
            .contains(&format!("table {missing} does not exist")),
        "{e}"
    );

    let foreign = db.unique_name("slot");
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
        &[&foreign],
    )
    .await
    .unwrap();
    let e = waltap::setup::prepare(&c, &options(foreign.clone(), vec![table]))
        .await
        .expect_err("a slot of another plugin");
    assert!(
        e.to_string().contains(&format!(
            "replication slot {foreign:?} uses plugin \"test_decoding\""
        )),
        "{e}"
    );
    db.teardown().await;
}
