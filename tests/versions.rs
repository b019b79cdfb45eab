//! What differs between PostgreSQL 14 and 18, against whichever server the run uses
//! (`WALTAP_PG=14|15|16|17|18`): the negotiated protocol, row filters and column lists
//! (15+), failover slots (17+). Features a server lacks are checked for a clear error.

use std::time::Duration;

use crate::support::listen::{self, json_all, take};
use crate::support::{cluster, quote_ident, wait_for, TestDb};

fn version() -> u32 {
    cluster().server_version_num()
}

#[tokio::test]
async fn the_server_is_the_version_asked_for() {
    // WALTAP_PG must never fall back silently to another server.
    let Some(major) = std::env::var("WALTAP_PG")
        .ok()
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
    else {
        return;
    };
    if std::env::var_os("DATABASE_URL").is_none() {
        assert_eq!(version() / 10_000, major, "WALTAP_PG={major}");
    }
}

#[tokio::test]
async fn start_replication_asks_for_the_servers_best_protocol_and_streaming() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE v (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = listen::config(&db, &["v"]);
    let slot = cfg.slot.clone();
    let mut l = listen::start(cfg).await;
    // The walsender shows the replication command it runs.
    wait_for(
        "the walsender's START_REPLICATION",
        Duration::from_secs(30),
        || async {
            replication_command(&c, &slot)
                .await
                .starts_with("START_REPLICATION")
        },
    )
    .await;
    let command = replication_command(&c, &slot).await;
    let want = if version() < 150_000 { "'2'" } else { "'3'" };
    assert!(
        command.contains(&format!("\"proto_version\" {want}")),
        "{command}"
    );
    assert!(command.contains("\"streaming\" 'on'"), "{command}");
    assert!(command.contains("\"messages\" 'true'"), "{command}");
    c.batch_execute("INSERT INTO v VALUES (1)").await.unwrap();
    assert_eq!(json_all(&take(&mut l, 1).await)[0]["created"]["id"], 1);
    l.shutdown().await;
    db.teardown().await;
}

async fn replication_command(c: &tokio_postgres::Client, slot: &str) -> String {
    c.query_opt(
        "SELECT query FROM pg_stat_activity
         WHERE backend_type = 'walsender' AND query LIKE '%' || $1 || '%'",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| r.get::<_, String>(0))
    .unwrap_or_default()
}

#[tokio::test]
async fn publication_row_filters_and_column_lists_shape_events() {
    if version() < 150_000 {
        eprintln!(
            "row filters and column lists need PostgreSQL 15; skipped on {}",
            version()
        );
        return;
    }
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut cfg = listen::config(&db, &["filtered", "narrow"]);
    c.batch_execute(&format!(
        "CREATE TABLE filtered (id int PRIMARY KEY, amount int);
         ALTER TABLE filtered REPLICA IDENTITY FULL;
         CREATE TABLE narrow (id int PRIMARY KEY, status text, secret text);
         CREATE PUBLICATION {} FOR TABLE filtered WHERE (amount > 10), narrow (id, status);",
        quote_ident(&cfg.publication)
    ))
    .await
    .unwrap();
    cfg.create_publication = false;
    let mut l = listen::start(cfg).await;
    c.batch_execute(
        "INSERT INTO filtered VALUES (1, 5);          -- filtered out
         INSERT INTO filtered VALUES (2, 20);         -- create
         UPDATE filtered SET amount = 5 WHERE id = 2; -- leaves the filter: a delete
         UPDATE filtered SET amount = 50 WHERE id = 1;-- enters it: a create
         INSERT INTO narrow VALUES (7, 'open', 'hidden');
         UPDATE narrow SET status = 'done', secret = 'still hidden' WHERE id = 7;",
    )
    .await
    .unwrap();
    let events = json_all(&take(&mut l, 5).await);
    let summary: Vec<(String, String, i64)> = events
        .iter()
        .map(|e| {
            let row = e
                .get("created")
                .or_else(|| e.get("deleted"))
                .or_else(|| e.get("after"))
                .unwrap();
            (
                e["table"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                row["id"].as_i64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("filtered", "create", 2),
        ("filtered", "delete", 2),
        ("filtered", "create", 1),
        ("narrow", "create", 7),
        ("narrow", "update", 7),
    ];
    assert_eq!(
        summary,
        want.map(|(t, a, i)| (t.to_string(), a.to_string(), i))
            .to_vec()
    );
    assert_eq!(
        events[1]["deleted"]["amount"], 20,
        "the whole old row (FULL)"
    );
    assert_eq!(events[2]["created"]["amount"], 50);
    // The column list: only the listed columns exist in the events.
    assert_eq!(
        events[3]["created"],
        serde_json::json!({"id": 7, "status": "open"})
    );
    assert_eq!(
        events[4]["after"],
        serde_json::json!({"id": 7, "status": "done"})
    );
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn failover_slots_on_17_and_a_clear_error_before() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE fo (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut cfg = listen::config(&db, &["fo"]);
    cfg.failover_slot = true;
    let slot = cfg.slot.clone();
    if version() < 170_000 {
        let err = match waltap::Listener::start(cfg).await {
            Ok(_) => panic!("a failover slot was accepted on {}", version()),
            Err(e) => e,
        };
        assert!(
            matches!(
                err,
                waltap::Error::Setup(waltap::setup::SetupError::FailoverUnsupported { .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("17"), "{err}");
        db.teardown().await;
        return;
    }
    let mut l = listen::start(cfg).await;
    let failover: bool = c
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover, "slot {slot} is not a failover slot");
    c.batch_execute("INSERT INTO fo VALUES (1)").await.unwrap();
    assert_eq!(json_all(&take(&mut l, 1).await)[0]["created"]["id"], 1);
    l.shutdown().await;
    db.teardown().await;
}
