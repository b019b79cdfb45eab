//! Initial state: the current rows, `snapshotComplete`, then the changes after them, taken
//! while writers are busy; the consumer's copy must equal the table with every change
//! applied exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value as Json};
use waltap::log::streams::{self, OpenOptions, StreamConsumer, StreamDef, StreamItem};
use waltap::Filter;
use waltap::SubscribeOptions;
use waltap::{Hub, HubConfig, Position, Subscription, SubscriptionItem};

use crate::support::log::Log;
use crate::support::{json_line, listen, wait_for, TestDb};

const TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const ROWS: i32 = 3000;

/// A table of `ROWS` rows.
pub(crate) async fn table(db: &TestDb, identity_full: bool) {
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE acc (id int PRIMARY KEY, v int NOT NULL, note text);
         INSERT INTO acc SELECT g, g % 10, 'row ' || g FROM generate_series(1, {ROWS}) g;
         {}",
        if identity_full {
            "ALTER TABLE acc REPLICA IDENTITY FULL;"
        } else {
            ""
        }
    ))
    .await
    .unwrap();
}

/// Writers on two connections: updates, inserts and deletes in small transactions, until
/// stopped. Returns how many transactions committed.
fn writers(db: &TestDb, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..2)
        .map(|w| {
            let url = db.url();
            let stop = stop.clone();
            tokio::spawn(async move {
                let c = crate::support::connect(&url).await.unwrap();
                let mut n: u64 = 0;
                let mut next_id = ROWS + 1 + w * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let k = ((n * 7919 + w as u64 * 31) % ROWS as u64) as i32 + 1;
                    let sql = match n % 5 {
                        0 | 1 => format!("UPDATE acc SET v = v + 1 WHERE id = {k}"),
                        2 => format!(
                            "UPDATE acc SET v = v + 1, note = 'moved' WHERE id IN ({k}, {})",
                            k % ROWS + 1
                        ),
                        3 => {
                            next_id += 1;
                            format!("INSERT INTO acc VALUES ({next_id}, {}, 'new')", n % 10)
                        }
                        _ => format!("DELETE FROM acc WHERE id = {}", next_id - 1),
                    };
                    c.batch_execute(&sql).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect()
}

/// The consumer's copy of the table, by id, built from the items; each change must apply
/// to the copy exactly (no create of a present row, no update or delete of a missing one).
#[derive(Default)]
pub(crate) struct Copy {
    pub(crate) rows: BTreeMap<i64, Json>,
    pub(crate) complete: Option<Option<Position>>,
    last: Option<Position>,
    pub(crate) snapshot_rows: usize,
    pub(crate) changes: usize,
}

impl Copy {
    fn key(row: &Json) -> i64 {
        row["id"].as_i64().expect("rows carry their id")
    }

    /// Applies one item; in transitions mode `appear`/`disappear` enter and leave the set.
    pub(crate) fn apply<R: serde::Serialize>(&mut self, item: SubscriptionItem<R>) {
        let item = serde_json::to_value(&item).unwrap();
        match item.get("type").and_then(Json::as_str) {
            Some("initialized") => return,
            Some("snapshotComplete") => {
                assert!(self.complete.is_none(), "one snapshotComplete");
                let p = item["position"]
                    .as_str()
                    .map(|p| p.parse::<Position>().unwrap());
                self.complete = Some(p);
                return;
            }
            Some(other) => panic!("unexpected control item {other}"),
            None => {}
        }
        if item["action"] == "snapshot" {
            assert!(
                self.complete.is_none(),
                "snapshot rows come before the marker"
            );
            let row = item["row"].clone();
            assert!(
                self.rows.insert(Self::key(&row), row).is_none(),
                "a row twice in the snapshot"
            );
            self.snapshot_rows += 1;
            return;
        }
        let complete = self.complete.expect("changes come after snapshotComplete");
        let position: Position = item["position"].as_str().unwrap().parse().unwrap();
        assert!(
            complete.is_none_or(|c| position > c),
            "a change at or before the snapshot: {item}"
        );
        assert!(self.last.is_none_or(|l| position > l), "positions increase");
        self.last = Some(position);
        self.changes += 1;
        let transition = item["transition"].as_str();
        match (item["action"].as_str().unwrap(), transition) {
            ("create", _) | ("update", Some("appear")) => {
                let row = if item["action"] == "create" {
                    &item["created"]
                } else {
                    &item["after"]
                };
                let prev = self.rows.insert(Self::key(row), row.clone());
                assert!(prev.is_none(), "create of a row the copy has: {item}");
            }
            ("update", Some("disappear")) => {
                let gone = self.rows.remove(&Self::key(&item["before"]));
                assert!(
                    gone.is_some(),
                    "a row left the set that the copy lacks: {item}"
                );
            }
            ("update", _) => {
                let after = &item["after"];
                let old_key = if item["before"].is_null() {
                    Self::key(after)
                } else {
                    Self::key(&item["before"])
                };
                let prev = self.rows.remove(&old_key);
                assert!(prev.is_some(), "update of a row the copy lacks: {item}");
                self.rows.insert(Self::key(after), after.clone());
            }
            ("delete", _) => {
                let gone = self.rows.remove(&Self::key(&item["deleted"]));
                assert!(gone.is_some(), "delete of a row the copy lacks: {item}");
            }
            (other, _) => panic!("unexpected action {other}"),
        }
    }
}

/// The next item of a subscription or a stream consumer.
pub(crate) async fn next<S, T, E>(items: &mut S) -> T
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    T: std::fmt::Debug,
    E: std::fmt::Debug,
{
    crate::support::next_item(items, TIMEOUT).await
}

/// Reads the subscription while the writers run, stops them, then reads until the
/// sentinel row (id 0) arrives.
async fn follow(
    db: &TestDb,
    sub: &mut Subscription,
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<u64>>,
    sentinel_v: i32,
) -> Copy {
    let mut copy = Copy::default();
    while copy.complete.is_none() || copy.changes < 200 {
        copy.apply(next(sub).await);
    }
    stop.store(true, Ordering::Relaxed);
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }
    assert!(
        committed > 200,
        "the writers were busy ({committed} transactions)"
    );
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO acc VALUES (0, {sentinel_v}, 'sentinel')"
        ))
        .await
        .unwrap();
    while !copy.rows.contains_key(&0) {
        copy.apply(next(sub).await);
    }
    copy
}

pub(crate) async fn current(db: &TestDb, predicate: &str) -> BTreeMap<i64, Json> {
    let rows = db
        .client()
        .await
        .query(
            &format!("SELECT id::int8, v::int8, note FROM acc WHERE {predicate}"),
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let v: i64 = r.get(1);
            let note: Option<String> = r.get(2);
            (id, json!({"id": id, "v": v, "note": note}))
        })
        .collect()
}

async fn start_hub(listener: waltap::ListenerConfig) -> Hub {
    let mut config = HubConfig::new(listener);
    // These tests check what a subscriber receives, not how the hub treats a slow one:
    // under a loaded CI machine the test's own consumer, checking every row while
    // unthrottled writers run, fell 1,024 events behind and was dropped as lagged.
    config.subscriber_queue = 1 << 16;
    match Hub::start(config).await {
        Ok(h) => h,
        Err(e) => panic!("hub did not start: {e}"),
    }
}

async fn subscribe(hub: &Hub, filter: Option<Json>) -> Subscription {
    let filter = filter.map(|f| serde_json::from_value::<Filter>(f).unwrap());
    let options = SubscribeOptions {
        initial_state: true,
    };
    match hub.subscribe_with("acc", filter, options).await {
        Ok(s) => s,
        Err(e) => panic!("subscribe failed: {e}"),
    }
}

pub(crate) async fn busy(db: &TestDb) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<u64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let w = writers(db, stop.clone());
    let c = db.client().await;
    wait_for("the writers to get going", TIMEOUT, || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM acc WHERE v >= 10 OR note = 'new'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n >= 20
    })
    .await;
    (stop, w)
}

#[tokio::test]
async fn initial_state_then_changes_equal_the_table_under_writes() {
    let db = TestDb::new().await;
    table(&db, false).await;
    let hub = start_hub(listen::config(&db, &[])).await;
    let (stop, w) = busy(&db).await;
    let mut sub = subscribe(&hub, None).await;
    let copy = follow(&db, &mut sub, stop, w, 0).await;
    assert!(
        copy.snapshot_rows >= ROWS as usize - 50,
        "{} snapshot rows",
        copy.snapshot_rows
    );
    assert_eq!(
        copy.rows,
        current(&db, "true").await,
        "the copy equals the table"
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn filters_apply_to_the_snapshot_rows_and_transitions_follow() {
    let db = TestDb::new().await;
    table(&db, true).await;
    let hub = start_hub(listen::config(&db, &[])).await;
    let (stop, w) = busy(&db).await;
    let mut sub = subscribe(
        &hub,
        Some(json!({"where": {"v": {"gte": 5}}, "transitions": true})),
    )
    .await;
    let copy = follow(&db, &mut sub, stop, w, 7).await;
    assert!(copy.rows.values().all(|r| r["v"].as_i64().unwrap() >= 5));
    assert_eq!(
        copy.rows,
        current(&db, "v >= 5").await,
        "the copy equals the filtered table"
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn a_table_without_primary_key_is_read_in_physical_order_like_its_events() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE nokey (a int, b text, twice int GENERATED ALWAYS AS (a * 2) STORED);
             ALTER TABLE nokey REPLICA IDENTITY FULL;
             INSERT INTO nokey SELECT g, 'x' FROM generate_series(1, 2500) g;",
        )
        .await
        .unwrap();
    let hub = start_hub(listen::config(&db, &[])).await;
    let options = SubscribeOptions {
        initial_state: true,
    };
    let mut sub = hub.subscribe_with("nokey", None, options).await.unwrap();
    let mut rows = Vec::new();
    loop {
        match next(&mut sub).await {
            SubscriptionItem::Initialized { .. } => {}
            SubscriptionItem::Snapshot(r) => {
                // As in change events, generated columns are left out.
                assert!(r.row.get("twice").is_none());
                rows.push(r.row.get("a").cloned());
            }
            SubscriptionItem::SnapshotComplete { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rows.len(), 2500);
    db.client()
        .await
        // (PostgreSQL 18 refuses updates and deletes when a full replica identity holds an
        // unpublished generated column; an insert shows the event's shape as well.)
        .batch_execute("INSERT INTO nokey VALUES (2501, 'y')")
        .await
        .unwrap();
    match next(&mut sub).await {
        SubscriptionItem::Event(ev) => assert_eq!(
            serde_json::to_value(&ev).unwrap()["created"],
            json!({"a": 2501, "b": "y"})
        ),
        other => panic!("expected the insert, got {other:?}"),
    }
    hub.shutdown().await;
}

/// Reads a stream into the copy while the writers run, stops them, then reads until the
/// sentinel row arrives, acknowledging as it goes.
pub(crate) async fn follow_stream(
    db: &TestDb,
    c: &mut StreamConsumer,
    copy: &mut Copy,
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<u64>>,
) {
    let mut stopped = Some((stop, writers));
    while !copy.rows.contains_key(&0) {
        let item = next(c).await;
        match &item {
            StreamItem::Snapshot(row) => c.ack_snapshot(row.seq.unwrap()).await.unwrap(),
            StreamItem::Event(ev) => c.ack(ev.position).await.unwrap(),
            _ => {}
        }
        copy.apply(item);
        if copy.changes >= 200 {
            if let Some((stop, writers)) = stopped.take() {
                stop.store(true, Ordering::Relaxed);
                for w in writers {
                    w.await.unwrap();
                }
                db.client()
                    .await
                    .batch_execute("INSERT INTO acc VALUES (0, 0, 'sentinel')")
                    .await
                    .unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_stream_with_initial_state_resumes_mid_snapshot_without_loss() {
    let db = TestDb::new().await;
    table(&db, false).await;
    let log = Log::start(&db).await;
    let (stop, w) = busy(&db).await;
    let store = log.store.connect_sql().await.unwrap();
    let def = StreamDef {
        name: "warm".into(),
        source: log.slot.clone(),
        tables: vec!["acc".into()],
        filter: None,
        initial_state: true,
        from: None,
    };
    streams::create(&waltap::log::EventLog::Postgres, &store, &store, &def)
        .await
        .unwrap();
    let options = || OpenOptions {
        page_size: 100,
        lease: Duration::from_secs(5),
        ..OpenOptions::default()
    };
    // The first consumer makes the copy, reads a part of it and goes away.
    let mut copy = Copy::default();
    let mut c = streams::open(&log.store, "warm", options()).await.unwrap();
    let mut taken = 0;
    while taken < 1000 {
        match next(&mut c).await {
            StreamItem::Initialized { .. } => {}
            item @ StreamItem::Snapshot(_) => {
                copy.apply(item);
                taken += 1;
            }
            other => panic!("expected snapshot rows, got {other:?}"),
        }
    }
    c.ack_snapshot(1000).await.unwrap();
    c.close().await;
    // The next one resumes after the acknowledged row, while the writers go on.
    let mut c = streams::open(&log.store, "warm", options()).await.unwrap();
    assert!(matches!(next(&mut c).await, StreamItem::Initialized { .. }));
    match next(&mut c).await {
        StreamItem::Snapshot(row) => {
            assert_eq!(
                row.seq,
                Some(1001),
                "resumes after the last acknowledged row"
            );
            copy.apply(StreamItem::Snapshot(row));
        }
        other => panic!("expected the next snapshot row, got {other:?}"),
    }
    follow_stream(&db, &mut c, &mut copy, stop, w).await;
    assert!(copy.snapshot_rows >= ROWS as usize - 50);
    assert_eq!(
        copy.rows,
        current(&db, "true").await,
        "the copy equals the table"
    );
    let info = streams::get(&waltap::log::EventLog::Postgres, &store, "warm")
        .await
        .unwrap();
    assert_eq!(
        Some(info.cursor),
        copy.last,
        "acknowledged through the last change"
    );
    c.close().await;
    log.stop().await;
}

#[tokio::test]
async fn export_then_a_stream_from_its_position_equal_the_table() {
    export_then_stream_from_its_position().await;
}

/// The same, 50 times over: a transaction committing right at the export's watermark was
/// lost about one run in ten (issue 21). Ignored for CI time; run with
/// `cargo test --test main -- --ignored export_then_stream_stress`.
#[tokio::test]
#[ignore]
async fn export_then_stream_stress() {
    for run in 1..=50 {
        eprintln!("export then stream: run {run} of 50");
        export_then_stream_from_its_position().await;
    }
}

/// Exports `acc` while writers are busy, then follows a stream created at the export's
/// position: the rows plus the changes must rebuild the table.
async fn export_then_stream_from_its_position() {
    let db = TestDb::new().await;
    table(&db, false).await;
    let log = Log::start(&db).await;
    let (stop, w) = busy(&db).await;
    let out = crate::support::run_ok({
        let mut cmd = crate::support::waltap(&db.url(), &["export", "acc"]);
        cmd.args(["--slot", &log.slot]);
        cmd
    })
    .await;
    let lines: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "snapshotComplete", "{last}");
    let from: Position = last["position"].as_str().unwrap().parse().unwrap();
    let mut copy = Copy::default();
    for line in &lines[..lines.len() - 1] {
        assert_eq!(line["action"], "snapshot");
        let row = &line["row"];
        assert!(copy.rows.insert(Copy::key(row), row.clone()).is_none());
    }
    assert!(copy.rows.len() >= ROWS as usize - 50);
    copy.complete = Some(Some(from));
    let store = log.store.connect_sql().await.unwrap();
    let def = StreamDef {
        name: "incremental".into(),
        source: log.slot.clone(),
        tables: vec!["acc".into()],
        filter: None,
        initial_state: false,
        from: Some(from),
    };
    streams::create(&waltap::log::EventLog::Postgres, &store, &store, &def)
        .await
        .unwrap();
    let mut c = streams::open(&log.store, "incremental", OpenOptions::default())
        .await
        .unwrap();
    follow_stream(&db, &mut c, &mut copy, stop, w).await;
    assert_eq!(
        copy.rows,
        current(&db, "true").await,
        "export + changes equal the table"
    );
    c.close().await;
    log.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn initial_state_rows_follow_the_publications_row_filter_and_column_list() {
    if crate::support::cluster().server_version_num() < 150000 {
        eprintln!("publication row filters and column lists need PostgreSQL 15+");
        return;
    }
    let db = TestDb::new().await;
    let mut config = listen::config(&db, &[]);
    config.create_publication = false;
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE pt (id int PRIMARY KEY, shown text, hidden text);
             INSERT INTO pt SELECT g, 's' || g, 'h' || g FROM generate_series(1, 20) g;
             CREATE PUBLICATION {} FOR TABLE pt (id, shown) WHERE (id > 15);",
            crate::support::quote_ident(&config.publication)
        ))
        .await
        .unwrap();
    let hub = start_hub(config).await;
    let options = SubscribeOptions {
        initial_state: true,
    };
    let mut sub = hub.subscribe_with("pt", None, options).await.unwrap();
    let mut rows = Vec::new();
    loop {
        match next(&mut sub).await {
            SubscriptionItem::Initialized { .. } => {}
            SubscriptionItem::Snapshot(r) => rows.push(serde_json::to_value(&r.row).unwrap()),
            SubscriptionItem::SnapshotComplete { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let want: Vec<Json> = (16..=20)
        .map(|i| json!({"id": i, "shown": format!("s{i}")}))
        .collect();
    assert_eq!(
        rows, want,
        "the rows the publication sends, with its columns"
    );
    db.client()
        .await
        .batch_execute("INSERT INTO pt VALUES (21, 's21', 'h21')")
        .await
        .unwrap();
    match next(&mut sub).await {
        SubscriptionItem::Event(ev) => assert_eq!(
            serde_json::to_value(&ev).unwrap()["created"],
            json!({"id": 21, "shown": "s21"}),
            "events have the same shape"
        ),
        other => panic!("expected the insert, got {other:?}"),
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn export_rows_follow_the_publication_of_the_logs_source() {
    if crate::support::cluster().server_version_num() < 150000 {
        eprintln!("publication row filters and column lists need PostgreSQL 15+");
        return;
    }
    let db = TestDb::new().await;
    let listener = listen::config(&db, &[]);
    let publication = listener.publication.clone();
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE pt (id int PRIMARY KEY, shown text, hidden text);
             INSERT INTO pt SELECT g, 's' || g, 'h' || g FROM generate_series(1, 20) g;
             CREATE PUBLICATION {} FOR TABLE pt (id, shown) WHERE (id > 15);",
            crate::support::quote_ident(&publication)
        ))
        .await
        .unwrap();
    // `waltap run` records which publication its source reads through.
    let log = Log::start_with(&db, listener).await;
    let rows = log.export_rows(&db, "pt").await;
    let want: Vec<Json> = (16..=20)
        .map(|i| json!({"id": i, "shown": format!("s{i}")}))
        .collect();
    assert_eq!(rows, want, "the rows and columns the publication sends");
    log.stop().await;
}

/// `waltap stream reset NAME --initial-state`, then `waltap stream tail` (the binary): the
/// rows and the marker once, then, in the next run, only the changes.
#[tokio::test]
async fn cli_reset_with_initial_state_then_tail_delivers_rows_and_marker_once() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let log = Log::start(&db).await;
    let stream = |args: &[&str]| {
        let mut cmd = crate::support::waltap(&db.url(), &["stream"]);
        cmd.args(args).args(["--slot", &log.slot]);
        cmd
    };
    crate::support::run_ok(stream(&["create", "s", "--table", "t"])).await;
    c.batch_execute("INSERT INTO t SELECT generate_series(1, 5)")
        .await
        .unwrap();
    let reset = crate::support::run_ok(stream(&["reset", "s", "--initial-state"])).await;
    assert_eq!(serde_json::from_str::<Json>(&reset).unwrap()["name"], "s");

    // The rows and the marker, then stopped while the table is quiet.
    let mut child = stream(&["tail", "s"]).spawn().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(json_line(&mut out).await["type"], "initialized");
    let mut rows = Vec::new();
    let marker = loop {
        let item = json_line(&mut out).await;
        if item["type"] == "snapshotComplete" {
            break item;
        }
        assert_eq!(item["action"], "snapshot", "{item}");
        rows.push(item["row"]["id"].as_i64().unwrap());
    };
    assert_eq!(rows, [1, 2, 3, 4, 5]);
    crate::support::sigterm(&child);
    let exit = tokio::time::timeout(TIMEOUT, child.wait()).await.unwrap();
    assert!(exit.unwrap().success());

    // The next run: neither the rows nor the marker again, but the change after them.
    let mut child = stream(&["tail", "s", "--limit", "1"]).spawn().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        json_line(&mut out).await,
        json!({"type": "initialized", "position": marker["position"]})
    );
    c.batch_execute("INSERT INTO t VALUES (6)").await.unwrap();
    let change = json_line(&mut out).await;
    assert_eq!(change["created"]["id"], 6, "{change}");
    let exit = tokio::time::timeout(TIMEOUT, child.wait()).await.unwrap();
    assert!(exit.unwrap().success());
    let listed = crate::support::run_ok(stream(&["list", "--json"])).await;
    let listed: Json = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["cursor"], change["position"], "acknowledged");
    log.stop().await;
}

/// TRUNCATE is not MVCC-safe: one committed between an initial state's snapshot and its
/// first read of the table left the subscriber an empty table, then changes of rows it
/// never got (found by the chaos harness). The snapshot locks the table before it is
/// taken, so the TRUNCATE waits until the rows are read and comes after them as a change.
#[tokio::test]
async fn a_truncate_waits_for_the_initial_state_it_would_empty() {
    let db = TestDb::new().await;
    table(&db, false).await;
    let mut cfg = HubConfig::new(listen::config(&db, &[]));
    // Paused, the hub holds the snapshot's watermark back: the snapshot stays open, its
    // rows unread, while the TRUNCATE comes.
    cfg.start_paused = true;
    let hub = match Hub::start(cfg).await {
        Ok(h) => h,
        Err(e) => panic!("hub did not start: {e}"),
    };
    let mut sub = subscribe(&hub, None).await;
    let c = db.client().await;
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    wait_for("the initial state's snapshot", TIMEOUT, || async {
        count(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND state = 'idle in transaction' AND query LIKE '%pg_current_snapshot()%'",
        )
        .await
            == 1
    })
    .await;
    let truncator = db.client().await;
    let truncate = tokio::spawn(async move { truncator.batch_execute("TRUNCATE acc").await });
    wait_for(
        "the TRUNCATE to wait for a lock (or to be done)",
        TIMEOUT,
        || async {
            truncate.is_finished()
            || count("SELECT count(*) FROM pg_locks WHERE relation = 'acc'::regclass AND NOT granted")
                .await
                == 1
        },
    )
    .await;
    hub.resume().await.unwrap();
    let mut rows = 0;
    loop {
        let item = tokio::time::timeout(TIMEOUT, sub.next())
            .await
            .expect("an item in time")
            .expect("the subscription goes on")
            .expect("no error");
        match item {
            SubscriptionItem::Snapshot(_) => rows += 1,
            SubscriptionItem::SnapshotComplete { .. } => break,
            _ => {}
        }
    }
    assert_eq!(
        rows, ROWS,
        "every row the snapshot saw, not an emptied table"
    );
    truncate
        .await
        .unwrap()
        .expect("the TRUNCATE went through after the read");
    let next = tokio::time::timeout(TIMEOUT, sub.next()).await.unwrap();
    match next {
        Some(Ok(SubscriptionItem::Event(ev))) => assert_eq!(ev.action, waltap::Action::Truncate),
        other => panic!("expected the truncate, got {other:?}"),
    }
    drop(sub);
    hub.shutdown().await;
    db.teardown().await;
}

/// Consumers sharing one small pool (as a server's do) all make and read their initial
/// states at once: none holds a pooled connection while it waits for another, so none waits
/// for the others (each used to hold one and wait for a second, all of them, until the
/// pool's wait ran out).
#[tokio::test]
async fn consumers_sharing_a_small_pool_copy_and_read_initial_states_at_once() {
    let db = TestDb::new().await;
    table(&db, false).await;
    let log = Log::start(&db).await;
    let store = log.store.connect_sql().await.unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("shared{i}")).collect();
    for name in &names {
        let def = StreamDef {
            name: name.clone(),
            source: log.slot.clone(),
            tables: vec!["acc".into()],
            filter: None,
            initial_state: true,
            from: None,
        };
        streams::create(&waltap::log::EventLog::Postgres, &store, &store, &def)
            .await
            .unwrap();
    }
    let pool = waltap::log::ConsumerPool::new(&log.store, 2).unwrap();
    let readers = names.iter().map(|name| {
        let (pool, store) = (pool.clone(), log.store.clone());
        let name = name.clone();
        async move {
            let options = OpenOptions {
                page_size: 50,
                ..OpenOptions::default()
            };
            let mut c = streams::open_pooled(&pool, &store, &name, options)
                .await
                .unwrap();
            let mut rows = 0;
            loop {
                match next(&mut c).await {
                    StreamItem::Snapshot(_) => rows += 1,
                    StreamItem::SnapshotComplete { .. } => break,
                    _ => {}
                }
            }
            c.close().await;
            rows
        }
    });
    let rows = tokio::time::timeout(Duration::from_secs(25), futures::future::join_all(readers))
        .await
        .expect("every consumer reads its initial state well within the pool's 30 s wait");
    assert!(rows.iter().all(|&n| n == ROWS as usize), "{rows:?}");
    log.stop().await;
    db.teardown().await;
}
