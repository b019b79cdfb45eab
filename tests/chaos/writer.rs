//! Writers: each owns the rows of `items` whose `w` is its number (so their transactions never
//! wait on each other), commits a random mix of transactions, and records what committed
//! with the transaction's xid. That record is the truth consumers are checked against.
//!
//! Every transaction first inserts its (writer, number) into `chaos_txlog`, which is not
//! published: when Postgres crashes under a commit, that row says whether it committed.
//! A TRUNCATE (the schedule's, see [`Table`]) takes every writer's rows: writers run their
//! transactions under a shared gate that the truncate takes alone, and forget their rows
//! after one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use crate::support::prng::Prng;
use crate::support::workload::pick_change;
use crate::support::{self};

/// (action, id): one row change as the events must show it (a truncate has id 0).
pub type Change = (&'static str, i32);

/// The table-wide state the writers and the schedule share: the gate every transaction
/// passes (a TRUNCATE takes it alone), how many truncates committed, and the columns DDL
/// added (with the default every existing row reads).
#[derive(Default)]
pub struct Table {
    gate: tokio::sync::RwLock<()>,
    truncates: AtomicU64,
    /// (name, default as JSON), in the order added.
    pub added: Mutex<Vec<(String, Json)>>,
}

pub type SharedTable = Arc<Table>;

/// One committed transaction of one writer.
#[derive(Debug, Clone)]
pub struct Committed {
    pub xid: u32,
    pub changes: Vec<Change>,
    /// What the transaction was, for traces.
    pub shape: &'static str,
    pub at: Duration,
}

/// Everything one writer committed, in its commit order.
#[derive(Debug, Default)]
pub struct Record {
    pub committed: Vec<Committed>,
    pub rolled_back: Vec<u32>,
    /// Transactions cut off by a Postgres crash, by whether `chaos_txlog` says they committed.
    pub interrupted: [usize; 2],
}

pub type SharedRecord = Arc<Mutex<Record>>;

/// First id of writer `w`'s rows: writers never touch each other's rows.
pub fn first_id(w: i32) -> i32 {
    (w + 1) * 10_000_000
}

struct Plan {
    sql: String,
    changes: Vec<Change>,
    live: Vec<i32>,
    next_id: i32,
    rollback: bool,
    shape: &'static str,
}

pub struct Writer {
    pub w: i32,
    url: String,
    rng: Prng,
    live: Vec<i32>,
    next_id: i32,
    record: SharedRecord,
    started: Instant,
    table: SharedTable,
    /// Truncates seen: a new one empties `live`.
    truncates: u64,
    seq: i64,
}

impl Writer {
    pub fn new(w: i32, url: String, seed: u64, started: Instant, table: SharedTable) -> Writer {
        Writer {
            w,
            url,
            rng: Prng::new(seed),
            live: Vec::new(),
            next_id: first_id(w),
            record: SharedRecord::default(),
            started,
            table,
            truncates: 0,
            seq: 0,
        }
    }

    pub fn record(&self) -> SharedRecord {
        self.record.clone()
    }

    /// Writes until `stop`; returns the ids of its rows that exist at the end.
    pub async fn run(mut self, stop: CancellationToken) -> Vec<i32> {
        let mut client = reconnect(&self.url).await;
        while !stop.is_cancelled() {
            let gate = self.table.clone();
            let passed = gate.gate.read().await;
            self.forget_truncated();
            self.seq += 1;
            let plan = self.plan();
            let outcome = execute(&mut client, &self.url, self.w, self.seq, &plan.sql).await;
            drop(passed);
            let xid = match outcome {
                Outcome::Done(xid) => xid,
                Outcome::Interrupted(xid) => {
                    self.record.lock().unwrap().interrupted[xid.is_some() as usize] += 1;
                    match xid {
                        Some(xid) => xid,
                        None => continue,
                    }
                }
            };
            {
                let mut record = self.record.lock().unwrap();
                if plan.rollback {
                    record.rolled_back.push(xid);
                } else {
                    self.live = plan.live;
                    self.next_id = plan.next_id;
                    record.committed.push(Committed {
                        xid,
                        changes: plan.changes,
                        shape: plan.shape,
                        at: self.started.elapsed(),
                    });
                }
            }
            // Think time, part of the workload: spreads commits around waltap's operations.
            // Writer 0 commits back to back, so that commits are dense in the WAL around
            // the watermarks of exports and initial states.
            let think = if self.w == 0 {
                0
            } else {
                self.rng.range(5, 80)
            };
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
        let table = self.table.clone();
        let _gate = table.gate.read().await;
        self.forget_truncated();
        self.live
    }

    fn forget_truncated(&mut self) {
        let truncates = self.table.truncates.load(Ordering::SeqCst);
        if truncates != self.truncates {
            self.truncates = truncates;
            self.live.clear();
        }
    }

    fn plan(&mut self) -> Plan {
        let mut p = Plan {
            sql: format!(
                "BEGIN; INSERT INTO chaos_txlog (w, seq) VALUES ({}, {}) RETURNING xid;",
                self.w, self.seq
            ),
            changes: Vec::new(),
            live: self.live.clone(),
            next_id: self.next_id,
            rollback: false,
            shape: "small",
        };
        let w = self.w;
        let rng = &mut self.rng;
        match rng.percent() {
            0..=39 => {
                for _ in 0..rng.range(1, 4) {
                    p.op(rng, w);
                }
            }
            40..=54 => {
                p.shape = "mixed";
                for _ in 0..rng.range(5, 40) {
                    p.op(rng, w);
                }
            }
            55..=64 => {
                // Open across a moment in which exports and initial states write watermarks.
                p.shape = "slow";
                p.op(rng, w);
                p.sql.push_str(&format!(
                    " SELECT pg_sleep({});",
                    rng.range(5, 200) as f64 / 1000.0
                ));
                p.op(rng, w);
            }
            65..=71 => {
                p.shape = "savepoint";
                p.op(rng, w);
                let saved = (p.sql.len(), p.changes.len(), p.live.clone(), p.next_id);
                p.sql.push_str(" SAVEPOINT s;");
                let mark = p.sql.len();
                for _ in 0..rng.range(1, 5) {
                    p.op(rng, w);
                }
                if rng.percent() < 50 {
                    // Undo the savepoint's changes: keep the statements, forget their effects.
                    let statements = p.sql[mark..].to_owned();
                    p.sql.truncate(saved.0);
                    p.sql.push_str(" SAVEPOINT s;");
                    p.sql.push_str(&statements);
                    p.sql.push_str(" ROLLBACK TO SAVEPOINT s;");
                    p.changes.truncate(saved.1);
                    p.live = saved.2;
                    p.next_id = saved.3;
                } else {
                    p.sql.push_str(" RELEASE SAVEPOINT s;");
                }
                p.op(rng, w);
            }
            72..=79 => {
                p.shape = "pk-change";
                p.op(rng, w);
                if !p.live.is_empty() {
                    let i = rng.range(0, p.live.len() as u64 - 1) as usize;
                    let (old, new) = (p.live[i], p.next_id);
                    p.next_id += 1;
                    p.live[i] = new;
                    p.sql.push_str(&format!(
                        " UPDATE items SET id = {new}, v = v + 1 WHERE id = {old};"
                    ));
                    p.changes.push(("update", new));
                }
            }
            80..=85 => {
                p.shape = "annotated";
                p.sql.push_str(&format!(
                    " SELECT pg_logical_emit_message(true, 'waltap', '{{\"writer\": {w}}}');"
                ));
                p.op(rng, w);
            }
            86..=88 => {
                // Large enough to pass logical_decoding_work_mem: decoded as a streamed
                // transaction (or spilled).
                p.shape = "large";
                let n = rng.range(200, 800) as i32;
                let first = p.next_id;
                let last = first + n - 1;
                p.sql.push_str(&format!(
                    " INSERT INTO items (id, w, v, note) SELECT g, {w}, 0, repeat('x', 400) \
                     FROM generate_series({first}, {last}) g;"
                ));
                p.changes.extend((first..=last).map(|id| ("create", id)));
                p.live.extend(first..=last);
                p.next_id = last + 1;
                if rng.percent() < 50 {
                    // The order of an UPDATE's rows is physical; the check compares a
                    // transaction's changes as a set.
                    p.sql.push_str(&format!(
                        " UPDATE items SET v = v + 1 WHERE id BETWEEN {first} AND {last};"
                    ));
                    p.changes.extend((first..=last).map(|id| ("update", id)));
                    p.shape = "large+update";
                }
            }
            _ => {
                p.shape = "rollback";
                for _ in 0..rng.range(1, 6) {
                    p.op(rng, w);
                }
                p.rollback = true;
            }
        }
        p.sql
            .push_str(if p.rollback { " ROLLBACK;" } else { " COMMIT;" });
        p
    }
}

impl Plan {
    /// One single-row insert, update or delete of writer `w`'s rows.
    fn op(&mut self, rng: &mut Prng, w: i32) {
        // Deletes win once a writer has many rows, so the table stays small.
        let odds = if self.live.len() > 1_000 {
            (10, 70)
        } else {
            (40, 70)
        };
        let change = pick_change(rng, &mut self.live, &mut self.next_id, 10, odds);
        self.sql.push_str(&match change {
            ("create", id) => {
                format!(" INSERT INTO items (id, w, v, note) VALUES ({id}, {w}, 0, 'row {id}');")
            }
            ("update", id) => format!(" UPDATE items SET v = v + 1 WHERE id = {id};"),
            (_, id) => format!(" DELETE FROM items WHERE id = {id};"),
        });
        self.changes.push(change);
    }
}

enum Outcome {
    Done(u32),
    /// Postgres went away under the transaction: its xid if it committed.
    Interrupted(Option<u32>),
}

/// Runs one transaction (`sql` inserts (`w`, `seq`) into `chaos_txlog` first, returning
/// its xid), reconnecting `client` if Postgres crashed under it.
async fn execute(client: &mut Client, url: &str, w: i32, seq: i64, sql: &str) -> Outcome {
    match client.simple_query(sql).await {
        Ok(messages) => {
            let xid = messages
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                })
                .expect("chaos_txlog RETURNING xid");
            Outcome::Done(low32(xid.parse().expect("xid")))
        }
        Err(e) if is_crash(&e) => {
            *client = reconnect(url).await;
            let row = client
                .query_opt(
                    "SELECT xid FROM chaos_txlog WHERE w = $1 AND seq = $2",
                    &[&w, &seq],
                )
                .await
                .expect("look up the outcome of an interrupted transaction");
            Outcome::Interrupted(row.map(|r| low32(r.get::<_, i64>(0))))
        }
        Err(e) => panic!("writer {w} failed: {e:?}\n{sql}"),
    }
}

/// The error of a connection Postgres dropped (a crash, a restart), not of the SQL.
pub fn is_crash(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code()
            .is_none_or(|c| c.code().starts_with("57P") || c.code().starts_with("08"))
}

fn low32(txid: i64) -> u32 {
    (txid as u64 & 0xFFFF_FFFF) as u32
}

/// Connects, retrying while Postgres restarts.
pub async fn reconnect(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match support::connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("cannot reconnect to Postgres: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `TRUNCATE items` alone (no writer's transaction in flight), recorded in `record` (the
/// schedule's own, after the writers'); what came of it.
pub async fn truncate(
    url: &str,
    table: &SharedTable,
    record: &SharedRecord,
    seq: i64,
    started: Instant,
) -> &'static str {
    let _alone = table.gate.write().await;
    let mut client = reconnect(url).await;
    let sql = format!(
        "BEGIN; INSERT INTO chaos_txlog (w, seq) VALUES (-1, {seq}) RETURNING xid; \
         TRUNCATE items; COMMIT;"
    );
    let xid = match execute(&mut client, url, -1, seq, &sql).await {
        Outcome::Done(xid) | Outcome::Interrupted(Some(xid)) => xid,
        Outcome::Interrupted(None) => return "interrupted, not committed",
    };
    table.truncates.fetch_add(1, Ordering::SeqCst);
    record.lock().unwrap().committed.push(Committed {
        xid,
        changes: vec![("truncate", 0)],
        shape: "truncate",
        at: started.elapsed(),
    });
    "committed"
}

/// `ALTER TABLE items ADD COLUMN c<n>`, an int or a text with a default, noted in
/// `table.added` first: the model fills a column in wherever a row lacks it, and a column
/// that every row has (or none) compares the same. What came of it.
pub async fn add_column(url: &str, table: &SharedTable, n: usize) -> String {
    let name = format!("c{n}");
    let (sql_type, default, json) = if n % 2 == 0 {
        ("int", format!("{}", n * 7), Json::from(n * 7))
    } else {
        ("text", format!("'d{n}'"), Json::from(format!("d{n}")))
    };
    table.added.lock().unwrap().push((name.clone(), json));
    let client = reconnect(url).await;
    let sql = format!("ALTER TABLE items ADD COLUMN {name} {sql_type} NOT NULL DEFAULT {default}");
    match client.batch_execute(&sql).await {
        Ok(()) => format!("{sql}: done"),
        Err(e) if is_crash(&e) => format!("{sql}: interrupted ({e})"),
        Err(e) => panic!("{sql}: {e:?}"),
    }
}
