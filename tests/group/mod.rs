//! High availability with real processes: several `waltap serve` members on one slot and
//! store, one leader; the leader is killed, paused, terminated, and Postgres restarted
//! under the group, while a writer commits a known workload. Whatever happens, the log
//! (and a stream read over HTTP from whichever member is up) holds every committed change
//! once, in commit order.

mod console;
mod fence;
mod takeover;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio_postgres::Client;

use crate::server::KEYS;
use crate::support::prng::Prng;
use crate::support::workload::pick_change;
use crate::support::{self, TestDb};

/// Generous bound on anything the group must get done (a takeover, catching up).
pub const PATIENCE: Duration = Duration::from_secs(90);
/// The members' `--takeover-timeout`: how long a silent (paused) leader keeps leadership.
pub const TAKEOVER_TIMEOUT: &str = "3s";

/// (action, id) of one row change of `items`.
pub type Change = (String, i32);

/// The source tables, the publication and the slot, as `waltap setup` makes them.
pub struct Group {
    pub url: String,
    pub slot: String,
    pub publication: String,
}

impl Group {
    pub async fn setup(db: &TestDb) -> Group {
        db.client()
            .await
            .batch_execute(
                "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text);
                 ALTER TABLE items REPLICA IDENTITY FULL;",
            )
            .await
            .unwrap();
        let group = Group {
            url: db.url(),
            slot: db.unique_name("ha_slot"),
            publication: db.unique_name("ha_pub"),
        };
        support::run_ok(group.waltap(&["setup", "--table", "items"])).await;
        group
    }

    fn waltap(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = support::waltap(&self.url, args);
        cmd.args(["--slot", &self.slot, "--publication", &self.publication]);
        cmd
    }

    /// Starts a `waltap serve` member and waits until it listens.
    pub async fn member(&self) -> Member {
        let mut cmd = self.waltap(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--table",
            "items",
            "--takeover-timeout",
            TAKEOVER_TIMEOUT,
            "--shutdown-grace",
            "2",
            // Room for the bulk transaction: a subscriber further behind is cut off.
            "--subscriber-queue",
            "8192",
        ]);
        cmd.env("WALTAP_API_KEYS", KEYS)
            .env("WALTAP_LOG", "info")
            .env_remove("WALTAP_KEYS_FILE");
        let mut child = cmd.spawn().expect("spawn waltap serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let addr = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(a) = line.strip_prefix("listening on ") {
                    return a.to_owned();
                }
                log.lock().unwrap().push_str(&line);
            }
            panic!(
                "waltap serve exited before listening: {}",
                log.lock().unwrap()
            );
        })
        .await
        .expect("waltap serve listens");
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Member {
            child,
            url: format!("http://{addr}"),
            log,
        }
    }

    /// Waits until some member of `members` reports itself the leader; returns its index.
    pub async fn leader(&self, members: &[Member]) -> usize {
        let found = Arc::new(Mutex::new(None));
        support::wait_for("a leader", PATIENCE, || {
            let found = found.clone();
            async move {
                for (i, m) in members.iter().enumerate() {
                    if m.role().await.as_deref() == Some("leader") {
                        *found.lock().unwrap() = Some(i);
                        return true;
                    }
                }
                false
            }
        })
        .await;
        let leader = found.lock().unwrap().expect("found");
        leader
    }
}

/// One `waltap serve` process.
pub struct Member {
    pub child: Child,
    pub url: String,
    log: Arc<Mutex<String>>,
}

impl Member {
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The role `/healthz` reports; `None` when the member does not answer.
    pub async fn role(&self) -> Option<String> {
        support::healthz_role(&self.url).await
    }

    /// Panics with its logs if the member ended on its own.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "a member exited by itself ({status}); logs:\n{}",
                self.log()
            );
        }
    }

    pub async fn sigkill(mut self) {
        self.assert_alive();
        self.child.start_kill().unwrap();
        let _ = tokio::time::timeout(PATIENCE, self.child.wait()).await;
    }
}

/// The store's progress mark of the source (0 before the first append).
pub async fn progress(c: &Client, slot: &str) -> i64 {
    c.query_opt(
        "SELECT commit_lsn FROM waltap.progress WHERE source = $1",
        &[&slot],
    )
    .await
    .ok()
    .flatten()
    .map_or(0, |r| r.get(0))
}

/// Waits until the log's mark moved past `after`; returns how long that took.
pub async fn appended_after(c: &Client, slot: &str, after: i64) -> Duration {
    let started = Instant::now();
    support::wait_for("an append", PATIENCE, || async {
        progress(c, slot).await > after
    })
    .await;
    started.elapsed()
}

/// The change a logged or delivered event records.
pub fn change_of(ev: &Json) -> Change {
    let action = ev["action"].as_str().unwrap_or_default().to_owned();
    let row = match action.as_str() {
        "create" => &ev["created"],
        "update" => &ev["after"],
        "delete" => &ev["deleted"],
        _ => panic!("unexpected event {ev}"),
    };
    (action, row["id"].as_i64().expect("row id") as i32)
}

/// Every change of the source in the log, in log order.
pub async fn logged(c: &Client, slot: &str) -> Vec<Change> {
    c.query(
        "SELECT event::text FROM waltap.events WHERE source = $1 ORDER BY commit_lsn, ordinal",
        &[&slot],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| change_of(&serde_json::from_str(r.get(0)).unwrap()))
    .collect()
}

/// Writes single-row transactions, small ones, some rolled back, and (at `bulk_at`) one
/// multi-thousand-row insert until stopped, on one connection; returns the changes of the
/// committed transactions in commit order.
pub struct Writer {
    client: Client,
    rng: Prng,
    live: Vec<i32>,
    next_id: i32,
    pub committed: Vec<Change>,
    pub transactions: usize,
}

impl Writer {
    pub async fn new(url: &str, seed: u64) -> Writer {
        Writer {
            client: support::connect(url).await.unwrap(),
            rng: Prng::new(seed),
            live: Vec::new(),
            next_id: 1,
            committed: Vec::new(),
            transactions: 0,
        }
    }

    /// A new connection (after Postgres restarted), retrying while it recovers.
    pub async fn reconnect(&mut self, url: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match support::connect(url).await {
                Ok(c) => break self.client = c,
                Err(e) => assert!(Instant::now() < deadline, "cannot reconnect: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One transaction; a bulk insert of `bulk` rows when given.
    pub async fn transaction(&mut self, bulk: Option<i32>) {
        let (mut live, mut next_id) = (self.live.clone(), self.next_id);
        let mut sql = String::from("BEGIN;");
        let mut changes = Vec::new();
        let rollback = bulk.is_none() && self.rng.percent() < 10;
        if let Some(n) = bulk {
            let (first, last) = (next_id, next_id + n - 1);
            sql.push_str(&format!(
                " INSERT INTO items (id, v, note) SELECT g, 0, 'bulk' FROM generate_series({first}, {last}) g;"
            ));
            changes.extend((first..=last).map(|id| ("create".to_owned(), id)));
            live.extend(first..=last);
            next_id = last + 1;
        } else {
            for _ in 0..self.rng.range(1, 8) {
                let (action, id) =
                    pick_change(&mut self.rng, &mut live, &mut next_id, 10, (45, 80));
                sql.push_str(&match action {
                    "create" => format!(" INSERT INTO items VALUES ({id}, 0, 'r');"),
                    "update" => format!(" UPDATE items SET v = v + 1 WHERE id = {id};"),
                    _ => format!(" DELETE FROM items WHERE id = {id};"),
                });
                changes.push((action.to_owned(), id));
            }
        }
        sql.push_str(if rollback { " ROLLBACK;" } else { " COMMIT;" });
        self.client.batch_execute(&sql).await.unwrap();
        self.transactions += 1;
        if !rollback {
            self.live = live;
            self.next_id = next_id;
            self.committed.extend(changes);
        }
    }
}

/// Waits until the log holds `expected` changes, then checks it is exactly them.
pub async fn assert_log_is(c: &Client, slot: &str, expected: &[Change]) {
    let n = expected.len() as i64;
    support::wait_for(
        "the log to hold every committed change",
        PATIENCE,
        || async {
            c.query_one(
                "SELECT count(*) FROM waltap.events WHERE source = $1",
                &[&slot],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= n)
        },
    )
    .await;
    let log = logged(c, slot).await;
    assert_eq!(log.len(), expected.len(), "changes in the log");
    if let Some(i) = (0..log.len()).find(|&i| log[i] != expected[i]) {
        panic!(
            "the log differs from the writer's record at change {i}: {:?} logged, {:?} committed",
            log[i], expected[i]
        );
    }
}
