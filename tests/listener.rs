//! The listener's life cycle: resume after restarts, idle slots, server restarts, errors.

use std::time::Duration;

use futures::StreamExt;

use crate::support::listen::{self, confirmed_flush, expect_error, take};
use crate::support::{wait_for, Cluster, TestDb};

async fn ids(evs: &[waltap::Event]) -> Vec<i64> {
    evs.iter()
        .map(|e| match e.after().and_then(|r| r.get("id")) {
            Some(waltap::Value::Int(i)) => *i,
            other => panic!("no id in {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn restart_resumes_after_the_last_acknowledged_transaction() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = listen::config(&db, &["r"]);
    let mut l = listen::start(cfg.clone()).await;
    for i in 1..=5 {
        c.execute("INSERT INTO r VALUES ($1)", &[&i]).await.unwrap();
    }
    let first = take(&mut l, 3).await; // acknowledges 1..=3
    assert_eq!(ids(&first).await, vec![1, 2, 3]);
    l.shutdown().await;
    for i in 6..=8 {
        c.execute("INSERT INTO r VALUES ($1)", &[&i]).await.unwrap();
    }
    // 4 and 5 were handed out but never acknowledged: they come again, then the rest.
    let mut l = listen::start(cfg.clone()).await;
    let rest = take(&mut l, 5).await;
    assert_eq!(ids(&rest).await, vec![4, 5, 6, 7, 8]);
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn unacknowledged_transactions_are_redelivered_whole() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE w (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = listen::config(&db, &["w"]);
    let mut l = listen::start(cfg.clone()).await;
    c.batch_execute("INSERT INTO w VALUES (1), (2), (3)")
        .await
        .unwrap();
    // Take two of three without acknowledging the transaction's end.
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(l.next().await.unwrap().unwrap());
    }
    l.ack(got[1].position);
    l.shutdown().await;
    let mut l = listen::start(cfg).await;
    let again = take(&mut l, 3).await;
    assert_eq!(ids(&again).await, vec![1, 2, 3]);
    assert_eq!(again[0].id, got[0].id, "ids are stable across deliveries");
    assert_eq!(again[0].position, got[0].position);
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn idle_longer_than_wal_sender_timeout_keeps_the_connection_and_advances_the_slot() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE idle (id int PRIMARY KEY); CREATE TABLE other (id int)")
        .await
        .unwrap();
    let sep = if db.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}options=-c%20wal_sender_timeout%3D1s", db.url());
    let cfg = listen::config_for_url(&db, &url, &["idle"]);
    let slot = cfg.slot.clone();
    let mut l = listen::start(cfg).await;
    let pid = active_pid(&c, &slot).await.expect("slot is active");
    let start = confirmed_flush(&db, &slot).await.unwrap();
    // Unrelated WAL; the slot must follow it while nothing is pending.
    c.batch_execute("INSERT INTO other SELECT generate_series(1, 100)")
        .await
        .unwrap();
    wait_for(
        "confirmed_flush_lsn to advance",
        Duration::from_secs(30),
        || async { confirmed_flush(&db, &slot).await.unwrap() > start },
    )
    .await;
    // Stay idle for several timeouts: the walsender would drop a silent client after 1 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let quiet = tokio::time::timeout_at(deadline, l.next()).await;
    assert!(quiet.is_err(), "nothing was written, nothing may arrive");
    assert_eq!(
        active_pid(&c, &slot).await,
        Some(pid),
        "same walsender, never dropped"
    );
    c.batch_execute("INSERT INTO idle VALUES (1)")
        .await
        .unwrap();
    assert_eq!(ids(&take(&mut l, 1).await).await, vec![1]);
    l.shutdown().await;
    db.teardown().await;
}

async fn active_pid(c: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    c.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn server_restart_under_the_listener_loses_nothing() {
    let cluster = match Cluster::start_dedicated() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: no local cluster for a restart test: {why}");
            return;
        }
    };
    let db = TestDb::new_on(&cluster).await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE pr (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut l = listen::start(listen::config(&db, &["pr"])).await;
    for i in 1..=50 {
        c.execute("INSERT INTO pr VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let mut got = ids(&take(&mut l, 20).await).await;
    cluster.restart_immediate();
    let c = db.client().await;
    for i in 51..=100 {
        c.execute("INSERT INTO pr VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    // At-least-once across a server crash: duplicates are allowed, gaps are not.
    while !(1..=100).all(|i| got.contains(&i)) {
        let ev = take(&mut l, 1).await;
        got.extend(ids(&ev).await);
    }
    let mut sorted = got.clone();
    sorted.dedup();
    assert!(
        sorted.windows(2).all(|w| w[0] < w[1]),
        "commit order kept: {got:?}"
    );
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn dropped_slot_is_a_definite_error() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE ds (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = listen::config(&db, &["ds"]);
    let slot = cfg.slot.clone();
    let mut l = listen::start(cfg).await;
    // Kick the walsender and drop the slot before the listener reconnects.
    c.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap();
    wait_for(
        "slot released and dropped",
        Duration::from_secs(30),
        || async {
            c.query_opt(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE slot_name = $1 AND active_pid IS NULL",
                &[&slot],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
        },
    )
    .await;
    let err = expect_error(&mut l).await;
    assert!(
        matches!(err, waltap::Error::SlotDropped { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains(&slot));
    assert!(!err.is_transient());
    db.teardown().await;
}

#[tokio::test]
async fn missing_publication_is_a_clear_error() {
    let db = TestDb::new().await;
    let mut cfg = listen::config(&db, &[]);
    cfg.create_publication = false;
    let err = match waltap::Listener::start(cfg).await {
        Ok(_) => panic!("started without a publication"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains("does not exist") && msg.contains("publication"),
        "{msg}"
    );
    assert!(!err.is_transient());

    // Dropped while streaming: the next change reports it.
    let c = db.client().await;
    c.batch_execute("CREATE TABLE mp (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = listen::config(&db, &["mp"]);
    let publication = cfg.publication.clone();
    let mut l = listen::start(cfg).await;
    c.batch_execute(&format!(
        "DROP PUBLICATION {}; INSERT INTO mp VALUES (1);",
        crate::support::quote_ident(&publication)
    ))
    .await
    .unwrap();
    let err = expect_error(&mut l).await;
    assert!(
        matches!(
            err,
            waltap::Error::Setup(waltap::setup::SetupError::PublicationMissing { .. })
        ),
        "unexpected error: {err}"
    );
    db.teardown().await;
}

#[tokio::test]
async fn temporary_slot_starts_now_and_vanishes() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE tmp (id int PRIMARY KEY); INSERT INTO tmp VALUES (1);")
        .await
        .unwrap();
    let mut cfg = listen::config(&db, &["tmp"]);
    cfg.temporary_slot = true;
    let slot = cfg.slot.clone();
    let mut l = listen::start(cfg).await;
    c.batch_execute("INSERT INTO tmp VALUES (2)").await.unwrap();
    assert_eq!(ids(&take(&mut l, 1).await).await, vec![2]);
    l.shutdown().await;
    wait_for("temporary slot gone", Duration::from_secs(30), || async {
        confirmed_flush(&db, &slot).await.is_none()
    })
    .await;
    db.teardown().await;
}

#[tokio::test]
async fn invalidated_slot_is_a_definite_error_that_says_changes_were_lost() {
    // Shrinking max_slot_wal_keep_size would endanger other tests' slots: use a private
    // cluster.
    let cluster = match Cluster::start_dedicated() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: no local cluster: {why}");
            return;
        }
    };
    let db = TestDb::new_on(&cluster).await;
    let c = db.client().await;
    // ALTER SYSTEM refuses to run inside the implicit transaction of a multi-statement query.
    for sql in [
        "CREATE TABLE lost (id int PRIMARY KEY)",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let cfg = listen::config(&db, &["lost"]);
    let slot = cfg.slot.clone();
    let l = listen::start(cfg.clone()).await;
    l.shutdown().await;
    wait_for(
        "the slot to be invalidated",
        Duration::from_secs(60),
        || async {
            for sql in [
                "INSERT INTO lost SELECT coalesce(max(id), 0) + 1 FROM lost",
                "SELECT pg_switch_wal()",
                "CHECKPOINT",
            ] {
                c.batch_execute(sql).await.unwrap();
            }
            let status: Option<String> = c
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            status.as_deref() == Some("lost")
        },
    )
    .await;
    let err = match waltap::Listener::start(cfg).await {
        Ok(_) => panic!("started on a lost slot"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.contains("invalidated") && msg.contains("lost"), "{msg}");
    assert!(!err.is_transient());
    db.teardown().await;
}

/// The listener opens its replication connection while its start-up checks run; that
/// connection, not yet on a slot, is not a physical standby of the server, so a server
/// without standbys gets no warning about failovers.
#[tokio::test]
async fn its_own_replication_connection_is_not_taken_for_a_standby() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let standbys: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_replication r
                     JOIN pg_stat_activity a ON a.pid = r.pid WHERE a.datid IS NULL)
                  + (SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'physical')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if standbys > 0 {
        eprintln!("skipped: this server has physical standbys or slots");
        return;
    }
    c.batch_execute("CREATE TABLE t (id int8 PRIMARY KEY)")
        .await
        .unwrap();
    let listener = listen::start(listen::config(&db, &["t"])).await;
    let warnings = listener.setup_report().warnings.clone();
    listener.shutdown().await;
    assert!(
        !warnings.iter().any(|w| w.contains("physical standbys")),
        "{warnings:?}"
    );
    db.teardown().await;
}
