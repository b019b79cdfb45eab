//! The boundary between a snapshot's watermark and the transactions around it.
//!
//! A watermark's LSN is the *end* of its message record; the next record, which can be a
//! commit, starts exactly there. A transaction that wrote its rows before the watermark
//! and commits right after it therefore has a commit LSN equal to the watermark, and comes
//! after it in the change stream. These tests put a commit on that boundary on purpose.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use waltap::Lsn;

use crate::support::log::Log;
use crate::support::{wait_for, Cluster, TestDb};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The commit LSN the log holds for transaction `xid`, once a transaction committed after
/// it (`sentinel`) is in the log: `None` means the log skipped it.
async fn logged_commit(store: &Client, source: &str, xid: i64, sentinel: i64) -> Option<Lsn> {
    let query = "SELECT max(commit_lsn) FROM waltap.events
                 WHERE source = $1 AND (event->'tx'->>'id')::int8 = $2";
    // The log's tables appear once the appender has started.
    wait_for("the sentinel transaction in the log", TIMEOUT, || async {
        let row = store.query_one(query, &[&source, &sentinel]).await;
        row.is_ok_and(|r| r.get::<_, Option<i64>>(0).is_some())
    })
    .await;
    store
        .query_one(query, &[&source, &xid])
        .await
        .unwrap()
        .get::<_, Option<i64>>(0)
        .map(|l| Lsn(l as u64))
}

/// The 32-bit xid of the open transaction on `c`, as events carry it.
async fn xid(c: &Client) -> i64 {
    c.query_one(
        "SELECT (pg_current_xact_id()::text::int8 % 4294967296)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Issue 21's reproduction: an update written before a watermark, committed right after
/// it. On a private cluster nothing else writes WAL in between, so the commit starts where
/// the watermark's record ends; the log must hold the update all the same.
#[tokio::test]
async fn a_transaction_committing_at_a_watermark_reaches_the_log() {
    let cluster = match tokio::task::spawn_blocking(Cluster::start_dedicated)
        .await
        .unwrap()
    {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped a_transaction_committing_at_a_watermark_reaches_the_log: {why}");
            return;
        }
    };
    let db = TestDb::new_on(&cluster).await;
    let a = db.client().await;
    let b = db.client().await;
    a.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    let log = Log::start(&db).await;
    let store = log.store.connect_sql().await.unwrap();
    let mut on_the_boundary = 0;
    for attempt in 1..=5 {
        a.batch_execute(&format!(
            "BEGIN; UPDATE t SET v = v + 1 WHERE id = {attempt}"
        ))
        .await
        .unwrap();
        let tx = xid(&a).await;
        let watermark: String = b
            .query_one(
                "SELECT pg_logical_emit_message(false, 'waltap.watermark', 'x')::text",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        a.batch_execute("COMMIT").await.unwrap();
        b.batch_execute("BEGIN").await.unwrap();
        let sentinel = xid(&b).await;
        b.batch_execute(&format!(
            "UPDATE t SET v = v + 1 WHERE id = {}; COMMIT",
            attempt + 5
        ))
        .await
        .unwrap();
        let commit = logged_commit(&store, &log.slot, tx, sentinel).await;
        let watermark: Lsn = watermark.parse().unwrap();
        let Some(commit) = commit else {
            panic!(
                "attempt {attempt}: transaction {tx}, committed right after watermark \
                 {watermark}, is missing from the event log"
            );
        };
        if commit == watermark {
            on_the_boundary += 1;
        }
    }
    // Otherwise other WAL came between the watermark and the commit each time, and the
    // test did not visit the boundary it is about.
    assert!(
        on_the_boundary > 0,
        "no commit landed exactly on its watermark in 5 attempts"
    );
    log.stop().await;
    db.teardown().await;
}

/// Watermarks written continuously while writers commit: every committed transaction
/// reaches the log, whichever side of a watermark it lands on.
#[tokio::test]
async fn transactions_around_continuous_watermarks_all_reach_the_log() {
    let db = TestDb::new().await;
    let setup = db.client().await;
    setup
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t SELECT g, 0 FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let log = Log::start(&db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watermarks = Arc::new(AtomicU64::new(0));
    let marker = {
        let (stop, watermarks, c) = (stop.clone(), watermarks.clone(), db.client().await);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute("SELECT pg_logical_emit_message(false, 'waltap.watermark', 'x')")
                    .await
                    .unwrap();
                watermarks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let c = db.client().await;
        writers.push(tokio::spawn(async move {
            let mut xids = Vec::new();
            for i in 0..300i64 {
                c.batch_execute("BEGIN").await.unwrap();
                xids.push(xid(&c).await);
                c.batch_execute(&format!(
                    "UPDATE t SET v = v + 1 WHERE id = {}; COMMIT",
                    1 + (i * 2 + w) % 50
                ))
                .await
                .unwrap();
            }
            xids
        }));
    }
    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    marker.await.unwrap();
    setup.batch_execute("BEGIN").await.unwrap();
    let sentinel = xid(&setup).await;
    setup
        .batch_execute("UPDATE t SET v = -1 WHERE id = 1; COMMIT")
        .await
        .unwrap();
    let store = log.store.connect_sql().await.unwrap();
    logged_commit(&store, &log.slot, sentinel, sentinel).await;
    let logged: Vec<i64> = store
        .query(
            "SELECT DISTINCT (event->'tx'->>'id')::int8 FROM waltap.events WHERE source = $1",
            &[&log.slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<i64> = committed
        .iter()
        .filter(|x| !logged.contains(x))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} transactions missing from the log among {} watermarks: {missing:?}",
        missing.len(),
        committed.len(),
        watermarks.load(Ordering::Relaxed)
    );
    log.stop().await;
    db.teardown().await;
}
