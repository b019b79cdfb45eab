//! Crash tests of `waltap run` (slot -> event log, exactly once), with real processes and
//! a real Postgres: the pipeline is killed with SIGKILL at random points over and over, or
//! Postgres itself crashes under a running pipeline, while a writer commits a known
//! workload. Afterwards the log must hold every committed change exactly once, in commit
//! order, with consistent transaction metadata, and nothing of rolled-back transactions.
//!
//! Initial-state traffic runs beside the kills: watermarks written continuously and
//! `waltap export`s, so that transactions commit on both sides of (and exactly at)
//! watermarks while the appender dies and restarts.
//!
//! The workload and the kill points come from a seeded PRNG; set `WALTAP_CRASH_SEED` to
//! vary or reproduce them (the seed is printed).

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, SimpleQueryMessage};
use waltap::Lsn;
use waltap::Position;

use crate::support::prng::Prng;
use crate::support::workload::pick_change;
use crate::support::{self, Cluster, TestDb};

/// How long the final run may take to catch up, and other generous bounds.
const CATCH_UP: Duration = Duration::from_secs(90);

pub(crate) fn seed() -> u64 {
    let seed = std::env::var("WALTAP_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_127);
    eprintln!("crash test seed: WALTAP_CRASH_SEED={seed}");
    seed
}

// ---------------------------------------------------------------------------------------
// The source database and the waltap processes.

pub(crate) struct Names {
    pub(crate) slot: String,
    pub(crate) publication: String,
}

impl Names {
    pub(crate) fn new(db: &TestDb) -> Names {
        Names {
            slot: db.unique_name("crash_slot"),
            publication: db.unique_name("crash_pub"),
        }
    }
}

fn waltap(url: &str, names: &Names, args: &[&str]) -> Command {
    let mut cmd = crate::support::waltap(url, args);
    cmd.args(["--slot", &names.slot, "--publication", &names.publication]);
    cmd
}

/// `items` is published (REPLICA IDENTITY FULL); `txlog` is not: each writer transaction
/// inserts its sequence number there, so its outcome can be looked up after a crash.
pub(crate) async fn create_schema_and_setup(db: &TestDb, names: &Names) {
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text);
             ALTER TABLE items REPLICA IDENTITY FULL;
             CREATE TABLE txlog (seq int PRIMARY KEY, xid bigint NOT NULL DEFAULT txid_current());",
        )
        .await
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        waltap(&db.url(), names, &["setup", "--table", "items", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("waltap setup finished in time")
    .expect("waltap setup runs");
    assert!(
        out.status.success(),
        "waltap setup: {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["slotCreated"], true, "{report}");
    assert_eq!(report["publicationCreated"], true, "{report}");
}

/// One `waltap run` process; its stderr is collected as it comes.
pub(crate) struct Run {
    child: Mutex<Child>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl Run {
    pub(crate) fn spawn(url: &str, names: &Names) -> Run {
        Run::spawn_with(url, names, &[])
    }

    /// `waltap run` with more arguments.
    pub(crate) fn spawn_with(url: &str, names: &Names, extra: &[&str]) -> Run {
        let mut args = vec!["run", "--table", "items"];
        args.extend_from_slice(extra);
        Run::spawn_command(waltap(url, names, &args))
    }

    /// Any waltap command, its stderr collected.
    pub(crate) fn spawn_command(mut cmd: Command) -> Run {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn waltap run");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Run {
            child: Mutex::new(child),
            stderr,
            started: Instant::now(),
        }
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Panics with its stderr if the process ended on its own.
    pub(crate) fn assert_alive(&self, context: &str) {
        let exited = self.child.lock().unwrap().try_wait().expect("try_wait");
        if let Some(status) = exited {
            panic!(
                "waltap run exited by itself ({status}) {context}, after {:?}; stderr:\n{}",
                self.started.elapsed(),
                self.stderr()
            );
        }
    }

    /// SIGKILL; panics if the process had already ended on its own. Returns its stderr.
    pub(crate) async fn sigkill(self, context: &str) -> String {
        let mut child = self.child.into_inner().unwrap();
        let _ = child.start_kill();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("killed process is reaped")
            .expect("wait");
        let stderr = self.stderr.lock().unwrap().clone();
        assert_eq!(
            status.signal(),
            Some(9),
            "waltap run ended by itself ({status}) {context} instead of being killed; stderr:\n{stderr}"
        );
        stderr
    }
}

// ---------------------------------------------------------------------------------------
// The writer: a known workload, and a record of what committed.

/// (action, id) of one row change, as the event log should show it.
pub(crate) type Change = (&'static str, i32);

#[derive(Debug)]
pub(crate) struct Committed {
    seq: i32,
    pub(crate) xid: u32,
    changes: Vec<Change>,
}

#[derive(Debug, Default)]
pub(crate) struct Record {
    /// In commit order (one writer connection, one transaction at a time).
    pub(crate) committed: Vec<Committed>,
    /// Xids of transactions that ended in ROLLBACK.
    pub(crate) rolled_back: Vec<u32>,
    /// Transactions whose COMMIT never answered (connection lost): looked up afterwards.
    pub(crate) unknown_committed: usize,
    pub(crate) unknown_not_committed: usize,
}

impl Record {
    fn changes(&self) -> usize {
        self.committed.iter().map(|t| t.changes.len()).sum()
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Shape {
    /// Picked at random: single row, a few rows, dozens of rows, or a rollback.
    Random,
    /// One INSERT ... SELECT of this many rows.
    BulkInsert(i32),
    /// This many single-row statements, mostly updates and deletes.
    BigMixed(usize),
    /// A few changes, then `pg_sleep`, then more: in flight long enough to crash under.
    Sleepy,
}

#[derive(Clone)]
struct Model {
    /// Ids of the rows that exist now.
    live: Vec<i32>,
    /// Ids are never reused, so an insert never conflicts whatever happened before.
    next_id: i32,
}

struct Plan {
    seq: i32,
    sql: String,
    changes: Vec<Change>,
    /// Rows per statement as CommandComplete reports them, BEGIN to COMMIT.
    counts: Vec<u64>,
    rollback: bool,
    model: Model,
}

/// How far the writer is, for the test to time its crashes.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) done: AtomicUsize,
    sleepy_started: AtomicUsize,
}

pub(crate) struct Writer {
    url: String,
    client: Client,
    rng: Prng,
    model: Model,
    seq: i32,
    record: Record,
    /// Lost connections are expected (Postgres restarts): resolve instead of failing.
    crashes_expected: bool,
    max_think_ms: u64,
}

impl Writer {
    pub(crate) async fn new(
        url: String,
        seed: u64,
        crashes_expected: bool,
        max_think_ms: u64,
    ) -> Writer {
        let client = support::connect(&url).await.expect("writer connects");
        Writer {
            url,
            client,
            rng: Prng::new(seed),
            model: Model {
                live: Vec::new(),
                next_id: 1,
            },
            seq: 0,
            record: Record::default(),
            crashes_expected,
            max_think_ms,
        }
    }

    pub(crate) async fn write_all(mut self, shapes: Vec<Shape>, progress: Arc<Progress>) -> Record {
        for shape in shapes {
            let plan = self.plan(shape);
            if matches!(shape, Shape::Sleepy) {
                progress.sleepy_started.fetch_add(1, Ordering::SeqCst);
            }
            self.execute(plan).await;
            progress.done.fetch_add(1, Ordering::SeqCst);
            // Think time: spreads the workload over the kills (part of the workload, not a
            // wait for anything).
            let think = self.rng.range(0, self.max_think_ms);
            if think > 0 {
                tokio::time::sleep(Duration::from_millis(think)).await;
            }
        }
        self.record
    }

    fn plan(&mut self, shape: Shape) -> Plan {
        self.seq += 1;
        let seq = self.seq;
        let mut p = Plan {
            seq,
            sql: format!("BEGIN; INSERT INTO txlog (seq) VALUES ({seq}) RETURNING xid;"),
            changes: Vec::new(),
            counts: vec![0, 1],
            rollback: false,
            model: self.model.clone(),
        };
        let rng = &mut self.rng;
        match shape {
            Shape::Random => {
                let r = rng.percent();
                let (n, rollback) = match r {
                    0..=29 => (1, false),
                    30..=84 => (rng.range(2, 12) as usize, false),
                    85..=91 => (rng.range(20, 100) as usize, false),
                    _ => (rng.range(1, 10) as usize, true),
                };
                for _ in 0..n {
                    random_op(rng, &mut p, 45, 80);
                }
                p.rollback = rollback;
            }
            Shape::BulkInsert(n) => {
                let first = p.model.next_id;
                let last = first + n - 1;
                p.sql.push_str(&format!(
                    " INSERT INTO items (id, v, note) SELECT g, 0, 'bulk ' || g FROM generate_series({first}, {last}) g;"
                ));
                p.counts.push(n as u64);
                p.changes.extend((first..=last).map(|id| ("create", id)));
                p.model.live.extend(first..=last);
                p.model.next_id = last + 1;
            }
            Shape::BigMixed(n) => {
                for _ in 0..n {
                    random_op(rng, &mut p, 10, 75);
                }
            }
            Shape::Sleepy => {
                for _ in 0..3 {
                    random_op(rng, &mut p, 45, 80);
                }
                p.sql.push_str(" SELECT pg_sleep(0.5);");
                p.counts.push(1);
                for _ in 0..3 {
                    random_op(rng, &mut p, 45, 80);
                }
            }
        }
        p.sql
            .push_str(if p.rollback { " ROLLBACK;" } else { " COMMIT;" });
        p.counts.push(0);
        p
    }

    async fn execute(&mut self, plan: Plan) {
        match self.client.simple_query(&plan.sql).await {
            Ok(messages) => {
                let mut xid = None;
                let mut counts = Vec::new();
                for m in &messages {
                    match m {
                        SimpleQueryMessage::Row(row) if xid.is_none() => {
                            xid = Some(row.get(0).expect("xid").parse::<i64>().unwrap());
                        }
                        SimpleQueryMessage::CommandComplete(n) => counts.push(*n),
                        _ => {}
                    }
                }
                assert_eq!(
                    counts, plan.counts,
                    "writer transaction {}: rows per statement",
                    plan.seq
                );
                let xid = low32(xid.expect("txlog RETURNING xid"));
                self.settle(plan, xid);
            }
            Err(e) => {
                let crashy = e.is_closed()
                    || e.code()
                        .is_none_or(|c| c.code().starts_with("57P") || c.code().starts_with("08"));
                assert!(
                    self.crashes_expected && crashy,
                    "writer transaction {} failed: {e:?}",
                    plan.seq
                );
                // Outcome unknown: the txlog row exists exactly if it committed.
                self.client = reconnect(&self.url).await;
                let row = self
                    .client
                    .query_opt("SELECT xid FROM txlog WHERE seq = $1", &[&plan.seq])
                    .await
                    .expect("look up the outcome of an interrupted transaction");
                match row {
                    Some(row) => {
                        assert!(!plan.rollback, "a rolled-back transaction committed");
                        self.record.unknown_committed += 1;
                        self.settle(plan, low32(row.get(0)));
                    }
                    None => self.record.unknown_not_committed += 1,
                }
            }
        }
    }

    fn settle(&mut self, plan: Plan, xid: u32) {
        if plan.rollback {
            self.record.rolled_back.push(xid);
        } else {
            self.model = plan.model;
            self.record.committed.push(Committed {
                seq: plan.seq,
                xid,
                changes: plan.changes,
            });
        }
    }
}

/// One single-row statement: an insert below `insert_below` percent, an update below
/// `update_below`, else a delete.
fn random_op(rng: &mut Prng, p: &mut Plan, insert_below: u64, update_below: u64) {
    let m = &mut p.model;
    let change = pick_change(
        rng,
        &mut m.live,
        &mut m.next_id,
        20,
        (insert_below, update_below),
    );
    p.sql.push_str(&match change {
        ("create", id) => format!(" INSERT INTO items (id, v, note) VALUES ({id}, 0, 'row {id}');"),
        ("update", id) => format!(" UPDATE items SET v = v + 1 WHERE id = {id};"),
        (_, id) => format!(" DELETE FROM items WHERE id = {id};"),
    });
    p.changes.push(change);
    p.counts.push(1);
}

fn low32(txid: i64) -> u32 {
    (txid as u64 & 0xFFFF_FFFF) as u32
}

/// Connects, retrying while the server is down or recovering.
async fn reconnect(url: &str) -> Client {
    let deadline = Instant::now() + CATCH_UP;
    let mut delay = Duration::from_millis(20);
    loop {
        match support::connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(300));
            }
            Err(e) => panic!("cannot reconnect to {url}: {e}"),
        }
    }
}

pub(crate) fn schedule(regular: usize, special: &[(usize, Shape)]) -> Vec<Shape> {
    let mut shapes = vec![Shape::Random; regular];
    for &(at, shape) in special {
        shapes.insert(at, shape);
    }
    shapes
}

// ---------------------------------------------------------------------------------------
// Reading the log back.

/// `SELECT ... FROM waltap.events` through a fresh connection (the server may have
/// restarted); `None` while that fails (e.g. the log's tables do not exist yet).
/// Writes snapshot watermarks until stopped: bare ones back to back on one connection,
/// and beside them one `waltap export` of `items` after another (each writes its own
/// watermark and waits for the log to pass it, so one fails while the appender is down
/// too long). Returns how many bare watermarks were written and how many exports
/// completed and failed.
async fn initial_state_traffic(
    url: String,
    slot: String,
    stop: Arc<AtomicBool>,
) -> (u64, (u64, u64)) {
    let exports = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut exported, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let mut export = support::waltap(&url, &["export", "items", "--slot", &slot]);
                export.stdout(Stdio::null());
                match tokio::time::timeout(Duration::from_secs(30), export.status()).await {
                    Ok(Ok(status)) if status.success() => exported += 1,
                    _ => failed += 1,
                }
            }
            (exported, failed)
        })
    };
    let c = reconnect(&url).await;
    let mut written = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // The source is never restarted in this test: a broken connection means it is
        // being torn down.
        if c.batch_execute("SELECT pg_logical_emit_message(false, 'waltap.watermark', 'crash')")
            .await
            .is_err()
        {
            break;
        }
        written += 1;
    }
    (written, exports.await.unwrap())
}

async fn count_events(c: &Client, source: &str) -> Option<i64> {
    c.query_one(
        "SELECT count(*) FROM waltap.events WHERE source = $1",
        &[&source],
    )
    .await
    .ok()
    .map(|r| r.get(0))
}

async fn progress_lsn(c: &Client, source: &str) -> Option<i64> {
    c.query_opt(
        "SELECT commit_lsn FROM waltap.progress WHERE source = $1",
        &[&source],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

async fn xid_logged(url: &str, source: &str, xid: u32) -> bool {
    let Ok(c) = support::connect(url).await else {
        return false;
    };
    c.query_opt(
        "SELECT 1 FROM waltap.events WHERE source = $1 AND event->'tx'->>'id' = $2 LIMIT 1",
        &[&source, &xid.to_string()],
    )
    .await
    .ok()
    .flatten()
    .is_some()
}

/// Waits until the writer's last committed transaction is in the log: the log is appended
/// in commit order, so everything before it must be there too.
async fn wait_until_caught_up(url: &str, source: &str, record: &Record, run: &Run) {
    let last = record.committed.last().expect("something committed").xid;
    support::wait_for(
        "the writer's last transaction in the event log",
        CATCH_UP,
        || async move {
            run.assert_alive("while catching up");
            xid_logged(url, source, last).await
        },
    )
    .await;
}

#[derive(Debug)]
struct LoggedEvent {
    ordinal: i32,
    xid: u32,
    index: u64,
    total: Option<u64>,
    last: bool,
    change: Change,
}

#[derive(Debug)]
struct LoggedTx {
    commit_lsn: i64,
    events: Vec<LoggedEvent>,
}

fn change_of(ev: &Json) -> Change {
    let id = |row: &Json| -> i32 {
        row["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("row without id: {ev}")) as i32
    };
    match ev["action"].as_str() {
        Some("create") => ("create", id(&ev["created"])),
        Some("update") => {
            let (before, after) = (&ev["before"], &ev["after"]);
            assert_eq!(id(before), id(after), "update keeps the key: {ev}");
            assert_eq!(
                after["v"].as_i64(),
                before["v"].as_i64().map(|v| v + 1),
                "update is v = v + 1 with the full before image: {ev}"
            );
            assert_eq!(ev["changed"], serde_json::json!(["v"]), "{ev}");
            ("update", id(after))
        }
        Some("delete") => ("delete", id(&ev["deleted"])),
        other => panic!("unexpected action {other:?}: {ev}"),
    }
}

pub(crate) struct Summary {
    pub(crate) events: usize,
    pub(crate) transactions: usize,
}

/// One stored event, as the log (a table or a JetStream stream) holds it.
pub(crate) struct LoggedRow {
    /// The position's commit LSN and ordinal, as the log orders and keys it.
    pub(crate) lsn: i64,
    pub(crate) ordinal: i32,
    /// Where the log files the event (columns, or the subject's tokens).
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) tx_last: bool,
    pub(crate) event: Json,
}

/// Every invariant of an exactly-once log against what the writer committed, for the
/// Postgres log.
async fn verify(c: &Client, source: &str, record: &Record) -> Summary {
    let rows = c
        .query(
            "SELECT commit_lsn, ordinal, schema_name, table_name, tx_last, event::text
             FROM waltap.events WHERE source = $1 ORDER BY commit_lsn, ordinal",
            &[&source],
        )
        .await
        .unwrap();
    let rows: Vec<LoggedRow> = rows
        .iter()
        .map(|row| LoggedRow {
            lsn: row.get(0),
            ordinal: row.get(1),
            schema: row.get(2),
            table: row.get(3),
            tx_last: row.get(4),
            event: serde_json::from_str(row.get(5)).unwrap(),
        })
        .collect();
    let summary = verify_rows(&rows, record);
    // The progress mark covers the last logged transaction: it is that commit LSN, or just
    // below a later watermark (the watermark traffic of the kill test).
    let mark = progress_lsn(c, source).await.expect("a progress mark");
    let last = rows.last().unwrap().lsn;
    assert!(
        mark >= last,
        "waltap.progress.commit_lsn {mark} is below the last logged transaction's commit LSN {last}"
    );
    summary
}

/// Every invariant of an exactly-once log against what the writer committed: `rows` in
/// the log's order.
pub(crate) fn verify_rows(rows: &[LoggedRow], record: &Record) -> Summary {
    let mut txs: Vec<LoggedTx> = Vec::new();
    let mut ids = HashSet::new();
    let mut previous: Option<(i64, i32)> = None;
    for row in rows {
        let (lsn, ordinal) = (row.lsn, row.ordinal);
        let ev = &row.event;
        if let Some(p) = previous {
            assert!(
                (lsn, ordinal) > p,
                "positions strictly increase: {p:?} then {ev}"
            );
        }
        previous = Some((lsn, ordinal));
        let position: Position = ev["position"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            (position.commit_lsn.0 as i64, position.ordinal as i32),
            (lsn, ordinal),
            "position matches its columns: {ev}"
        );
        let commit_lsn: Lsn = ev["tx"]["commitLsn"].as_str().unwrap().parse().unwrap();
        assert_eq!(commit_lsn.0 as i64, lsn, "tx.commitLsn: {ev}");
        assert_eq!(
            (row.schema.as_str(), row.table.as_str()),
            ("public", "items")
        );
        assert_eq!(
            (ev["schema"].as_str(), ev["table"].as_str()),
            (Some("public"), Some("items"))
        );
        assert_eq!(
            Some(row.tx_last),
            ev["tx"]["last"].as_bool(),
            "tx_last: {ev}"
        );
        assert!(
            ids.insert(ev["id"].as_str().unwrap().to_string()),
            "event id repeated: {ev}"
        );
        let event = LoggedEvent {
            ordinal,
            xid: ev["tx"]["id"].as_u64().unwrap() as u32,
            index: ev["tx"]["index"].as_u64().unwrap(),
            total: ev["tx"]["total"].as_u64(),
            last: ev["tx"]["last"].as_bool().unwrap(),
            change: change_of(ev),
        };
        match txs.last_mut() {
            Some(tx) if tx.commit_lsn == lsn => tx.events.push(event),
            _ => txs.push(LoggedTx {
                commit_lsn: lsn,
                events: vec![event],
            }),
        }
    }

    // Transaction metadata.
    for tx in &txs {
        let n = tx.events.len() as u64;
        let xid = tx.events[0].xid;
        for (i, e) in tx.events.iter().enumerate() {
            let i = i as u64;
            assert_eq!(
                e.xid, xid,
                "one xid per commit LSN {}: {tx:?}",
                tx.commit_lsn
            );
            assert_eq!(
                e.index, i,
                "tx.index at {}/{}: {e:?}",
                tx.commit_lsn, e.ordinal
            );
            assert_eq!(
                e.total,
                Some(n),
                "tx.total at {}/{}: {e:?}",
                tx.commit_lsn,
                e.ordinal
            );
            assert_eq!(
                e.last,
                i + 1 == n,
                "tx.last at {}/{}: {e:?}",
                tx.commit_lsn,
                e.ordinal
            );
            assert_eq!(e.ordinal as u64, i, "ordinal = index (one published table)");
        }
    }

    // Nothing of rolled-back transactions.
    let logged_xids: HashMap<u32, usize> = txs.iter().fold(HashMap::new(), |mut m, t| {
        *m.entry(t.events[0].xid).or_default() += 1;
        m
    });
    let rolled_back: Vec<u32> = record
        .rolled_back
        .iter()
        .copied()
        .filter(|x| logged_xids.contains_key(x))
        .collect();
    assert!(
        rolled_back.is_empty(),
        "events of rolled-back transactions (xids {rolled_back:?}) are in the log"
    );
    let repeated: Vec<(&u32, &usize)> = logged_xids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "transactions logged more than once (xid, times): {repeated:?}"
    );

    // Exactly the committed transactions, in commit order, each change exactly once.
    let logged: Vec<(u32, Vec<Change>)> = txs
        .iter()
        .map(|t| (t.events[0].xid, t.events.iter().map(|e| e.change).collect()))
        .collect();
    let expected: Vec<(u32, &[Change])> = record
        .committed
        .iter()
        .map(|t| (t.xid, t.changes.as_slice()))
        .collect();
    let first_difference = logged
        .iter()
        .zip(&expected)
        .position(|(l, e)| l.0 != e.0 || l.1.as_slice() != e.1);
    let summarize = |changes: &[Change]| -> String {
        let shown: Vec<String> = changes
            .iter()
            .take(12)
            .map(|(a, id)| format!("{a} {id}"))
            .collect();
        format!(
            "{} changes: {}{}",
            changes.len(),
            shown.join(", "),
            if changes.len() > 12 { ", ..." } else { "" }
        )
    };
    if let Some(i) = first_difference {
        let committed_xids: HashSet<u32> = record.committed.iter().map(|t| t.xid).collect();
        let missing: Vec<i32> = record
            .committed
            .iter()
            .filter(|t| !logged_xids.contains_key(&t.xid))
            .map(|t| t.seq)
            .collect();
        let unexpected: Vec<u32> = logged_xids
            .keys()
            .copied()
            .filter(|x| !committed_xids.contains(x))
            .collect();
        panic!(
            "the log differs from the committed transactions at transaction #{i} \
             (log has {} transactions, {} events; writer committed {} transactions, {} changes)\n\
             log:      xid {} at commit LSN {}: {}\n\
             expected: xid {} (writer seq {}): {}\n\
             writer transactions missing from the log (seq): {missing:?}\n\
             logged xids the writer did not commit: {unexpected:?}",
            txs.len(),
            rows.len(),
            record.committed.len(),
            record.changes(),
            logged[i].0,
            Lsn(txs[i].commit_lsn as u64),
            summarize(&logged[i].1),
            expected[i].0,
            record.committed[i].seq,
            summarize(expected[i].1),
        );
    }
    assert_eq!(
        logged.len(),
        expected.len(),
        "transactions in the log vs committed (log has {} events, writer committed {} changes); \
         extra or missing at the end: log tail {:?}, writer tail seq {:?}",
        rows.len(),
        record.changes(),
        logged
            .iter()
            .skip(expected.len())
            .map(|t| t.0)
            .collect::<Vec<_>>(),
        record
            .committed
            .iter()
            .skip(logged.len())
            .map(|t| t.seq)
            .collect::<Vec<_>>(),
    );

    Summary {
        events: rows.len(),
        transactions: txs.len(),
    }
}

// ---------------------------------------------------------------------------------------
// The tests.

const KILLS: usize = 20;
const MAX_KILLS: usize = 40;

#[tokio::test]
async fn sigkill_run_twenty_times_log_holds_every_change_exactly_once() {
    let started = Instant::now();
    let seed = seed();
    let db = TestDb::new().await;
    let names = Names::new(&db);
    let url = db.url();
    create_schema_and_setup(&db, &names).await;

    let progress = Arc::new(Progress::default());
    let writer = Writer::new(url.clone(), seed ^ 0xA5A5, false, 40).await;
    // ~1,000 changes in 250 transactions of every size, one bulk insert larger than the
    // appender's chunk (2,000 events) and one big mixed transaction.
    let shapes = schedule(
        250,
        &[
            (60, Shape::BulkInsert(2_200)),
            (150, Shape::BigMixed(1_000)),
        ],
    );
    let total_tx = shapes.len();
    let writer = tokio::spawn(writer.write_all(shapes, progress.clone()));
    let stop_marks = Arc::new(AtomicBool::new(false));
    let marks = tokio::spawn(initial_state_traffic(
        url.clone(),
        names.slot.clone(),
        stop_marks.clone(),
    ));

    let mut rng = Prng::new(seed);
    let watch = db.client().await;
    let source = names.slot.as_str();
    let mut kills = 0;
    let mut kill_modes = [0usize; 4];
    let mut during_writes = 0;
    while kills < KILLS || (!writer.is_finished() && kills < MAX_KILLS) {
        let base_events = count_events(&watch, source).await.unwrap_or(0);
        let base_mark = progress_lsn(&watch, source).await;
        let run = Run::spawn(&url, &names);
        let mode = (rng.next() % 4) as usize;
        match mode {
            // Early: during start-up (migrations, setup checks, START_REPLICATION).
            0 => tokio::time::sleep(Duration::from_millis(rng.range(0, 60))).await,
            // Anywhere while streaming and appending.
            1 => tokio::time::sleep(Duration::from_millis(rng.range(60, 400))).await,
            // After N new events are in the log (or 1.5 s, when the writer is idle).
            2 => {
                let n = rng.range(1, 600) as i64;
                let until = Instant::now() + Duration::from_millis(1_500);
                while Instant::now() < until
                    && count_events(&watch, source).await.unwrap_or(0) < base_events + n
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            // Right after a batch committed: the slot is not yet confirmed past it.
            _ => {
                let until = Instant::now() + Duration::from_millis(1_500);
                while Instant::now() < until && progress_lsn(&watch, source).await == base_mark {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        if !writer.is_finished() {
            during_writes += 1;
        }
        run.sigkill(&format!("(kill #{}, mode {mode})", kills + 1))
            .await;
        kill_modes[mode] += 1;
        kills += 1;
    }
    let record = writer.await.unwrap();
    assert_eq!(progress.done.load(Ordering::SeqCst), total_tx);
    assert_eq!(record.unknown_committed + record.unknown_not_committed, 0);
    let killed_in = started.elapsed();

    let run = Run::spawn(&url, &names);
    stop_marks.store(true, Ordering::Relaxed);
    let (watermarks, exports) = marks.await.unwrap();
    wait_until_caught_up(&url, source, &record, &run).await;
    let stderr = run.sigkill("after catching up").await;
    let summary = verify(&watch, source, &record).await;
    eprintln!(
        "sigkill crash test: {kills} kills ({during_writes} while the writer wrote; by mode \
         early/random/after-N-events/after-commit: {kill_modes:?}) in {killed_in:?}; log holds \
         {} events of {} transactions exactly once ({} rolled-back transactions absent) \
         beside {watermarks} watermarks and {exports:?} exports (complete, failed); \
         total {:?}; last run's stderr: {} bytes",
        summary.events,
        summary.transactions,
        record.rolled_back.len(),
        started.elapsed(),
        stderr.len()
    );
    db.teardown().await;
}

#[tokio::test]
async fn postgres_restarted_mid_stream_loses_nothing() {
    let started = Instant::now();
    let cluster = match tokio::task::spawn_blocking(Cluster::start_dedicated)
        .await
        .unwrap()
    {
        Ok(c) => Arc::new(c),
        Err(why) => {
            eprintln!("skipped postgres_restarted_mid_stream_loses_nothing: {why}");
            return;
        }
    };
    let seed = seed();
    let db = TestDb::new_on(&cluster).await;
    let names = Names::new(&db);
    let url = db.url();
    let source = names.slot.as_str();
    create_schema_and_setup(&db, &names).await;

    let run = Run::spawn(&url, &names);
    let progress = Arc::new(Progress::default());
    let writer = Writer::new(url.clone(), seed ^ 0x5A5A, true, 15).await;
    // A bulk insert just before each crash keeps the pipeline busy appending when it comes;
    // the sleepy transaction is in flight when it comes.
    let shapes = schedule(
        200,
        &[
            (60, Shape::BulkInsert(1_200)),
            (61, Shape::Sleepy),
            (130, Shape::BigMixed(600)),
            (131, Shape::Sleepy),
        ],
    );
    let writer = tokio::spawn(writer.write_all(shapes, progress.clone()));

    for crash in 1..=2 {
        let p = progress.clone();
        support::wait_for(
            "the writer to start its transaction to crash under",
            CATCH_UP,
            || {
                let p = p.clone();
                async move { p.sleepy_started.load(Ordering::SeqCst) >= crash }
            },
        )
        .await;
        run.assert_alive(&format!("before crash #{crash}"));
        let mark_before = {
            let c = support::connect(&url).await.unwrap();
            progress_lsn(&c, source).await
        };
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.restart_immediate())
            .await
            .unwrap();
        // The same process reconnects by itself and appends again.
        let url = url.as_str();
        let run = &run;
        support::wait_for(
            "the pipeline to append again after the restart",
            CATCH_UP,
            || async move {
                run.assert_alive(&format!("after crash #{crash}"));
                let Ok(c) = support::connect(url).await else {
                    return false;
                };
                progress_lsn(&c, source).await > mark_before
            },
        )
        .await;
    }
    let record = writer.await.unwrap();
    wait_until_caught_up(&url, source, &record, &run).await;
    run.assert_alive("at the end");
    let stderr = run.sigkill("at the end").await;
    let c = support::connect(&url).await.unwrap();
    let summary = verify(&c, source, &record).await;
    eprintln!(
        "restart crash test: 2 immediate restarts under one waltap run; log holds {} events \
         of {} transactions exactly once; writer: {} rolled back, {} interrupted and not \
         committed, {} interrupted but committed; total {:?}; waltap stderr:\n{}",
        summary.events,
        summary.transactions,
        record.rolled_back.len(),
        record.unknown_not_committed,
        record.unknown_committed,
        started.elapsed(),
        stderr
    );
    db.teardown().await;
    drop(c);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// A stream consumer killed mid-stream.

/// `waltap stream ...` with the source slot of `names` (stream commands take no
/// publication).
fn stream_cmd(url: &str, names: &Names, args: &[&str]) -> Command {
    let mut cmd = crate::support::waltap(url, &["stream"]);
    cmd.args(args).args(["--slot", &names.slot]);
    cmd
}

// This test once stalled in about 1 run of 10: the consumer's ack waited forever behind a
// page query of its reader on the same connection (see `streams::Shared`); the panic
// message still carries the database's view and both processes' logs should it recur.
#[tokio::test]
async fn stream_consumer_killed_mid_stream_resumes_from_its_last_ack() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    const ROWS: i64 = 400;
    let db = TestDb::new().await;
    let names = Names::new(&db);
    create_schema_and_setup(&db, &names).await;
    let url = db.url();
    let run_log = std::env::temp_dir().join(format!("{}-run.log", names.slot));
    let tail_log = std::env::temp_dir().join(format!("{}-tail.log", names.slot));
    let mut run = waltap(&url, &names, &["run", "--table", "items"])
        .env("WALTAP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&run_log).unwrap())
        .spawn()
        .expect("waltap run starts");
    let created = stream_cmd(&url, &names, &["create", "s", "--table", "items"])
        .output()
        .await
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let writer_url = url.clone();
    let writer = tokio::spawn(async move {
        let c = crate::support::connect(&writer_url).await.unwrap();
        for id in 1..=ROWS {
            c.execute("INSERT INTO items (id, v) VALUES ($1, 0)", &[&(id as i32)])
                .await
                .unwrap();
        }
    });

    // Several consumers, each SIGKILLed after some lines; then one reads to the end.
    let mut seen: Vec<i64> = Vec::new();
    let mut rng = Prng::new(seed());
    for round in 0..4 {
        // A SIGKILLed consumer cannot release its lease: the next one gets stream_busy
        // until the (short) lease expires, then resumes.
        let (mut child, mut lines) = loop {
            let mut child = stream_cmd(&url, &names, &["tail", "s", "--lease", "1s"])
                .env("WALTAP_LOG", "debug")
                .stderr(std::fs::File::create(&tail_log).unwrap())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("a line or an exit in time")
                .unwrap();
            match first {
                Some(line) => {
                    let v: Json = serde_json::from_str(&line).unwrap();
                    assert_eq!(v["type"], "initialized", "the marker comes first: {line}");
                    break (child, lines);
                }
                None => {
                    child.wait().await.unwrap();
                    let err = std::fs::read_to_string(&tail_log).unwrap_or_default();
                    assert!(err.contains("stream_busy"), "{err}");
                }
            }
        };
        let want = if round < 3 {
            rng.range(20, 100) as usize
        } else {
            usize::MAX
        };
        let mut this_run: Vec<i64> = Vec::new();
        while this_run.len() < want
            && !(1..=ROWS).all(|i| seen.contains(&i) || this_run.contains(&i))
        {
            let line = match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await
            {
                Ok(line) => line.unwrap().expect("the consumer keeps running"),
                Err(_) => panic!(
                    "no line in 60 s after {:?} (round {round}); {}\nwaltap run said:\n{}\ntail said:\n{}",
                    this_run.last(),
                    diagnose(&url, &names.slot).await,
                    std::fs::read_to_string(&run_log).unwrap_or_default(),
                    std::fs::read_to_string(&tail_log).unwrap_or_default()
                ),
            };
            let v: Json = serde_json::from_str(&line).unwrap();
            if v.get("type").is_some() {
                continue; // a control item, not a change
            }
            this_run.push(v["created"]["id"].as_i64().unwrap());
        }
        child.kill().await.unwrap();
        // What it printed before dying counts as delivered (and may be acknowledged).
        // A line cut off by the kill was never flushed whole, so never acknowledged.
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(v) = serde_json::from_str::<Json>(&line) else {
                break;
            };
            if v.get("type").is_none() {
                this_run.push(v["created"]["id"].as_i64().unwrap());
            }
        }
        assert!(
            this_run.windows(2).all(|w| w[0] < w[1]),
            "in order: {this_run:?}"
        );
        if let (Some(&first), Some(&last_seen)) = (this_run.first(), seen.iter().max()) {
            assert!(
                first <= last_seen + 1,
                "round {round} resumed at {first}, after {last_seen}: a gap"
            );
        }
        seen.extend(this_run);
    }
    writer.await.unwrap();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (1..=ROWS).collect::<Vec<_>>());
    run.kill().await.unwrap();
    let _ = std::fs::remove_file(&run_log);
    let _ = std::fs::remove_file(&tail_log);
    db.teardown().await;
}

/// What the database says when a consumer stalls: rows written, events logged, the
/// stream's cursor and lease.
async fn diagnose(url: &str, source: &str) -> String {
    let c = crate::support::connect(url).await.unwrap();
    let q = |sql: &'static str| {
        let c = &c;
        async move {
            match c.query_one(sql, &[]).await {
                Ok(r) => r.get::<_, Option<String>>(0).unwrap_or_default(),
                Err(e) => format!("({e})"),
            }
        }
    };
    let _ = source;
    format!(
        "items: {}; logged: {}; stream: {}; activity: {}",
        q("SELECT count(*)::text || ' max ' || coalesce(max(id), 0)::text FROM items").await,
        q("SELECT count(*)::text || ' progress ' || coalesce((SELECT max(commit_lsn) FROM waltap.progress), 0)::text FROM waltap.events").await,
        q("SELECT cursor_lsn::text || '-' || cursor_ordinal::text || ' lease ' || coalesce(lease_holder, '-') || ' ' || coalesce(lease_expires_at::text, '-') FROM waltap.streams").await,
        q("SELECT string_agg(application_name || ':' || state || ':' || coalesce(wait_event, '-') || ':' || left(query, 60), ' | ') FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()").await,
    )
}
