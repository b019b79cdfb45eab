//! A primary and a streaming standby of real local clusters, the primary killed
//! (`stop -m immediate`) under `waltap run` and the standby promoted.
//!
//! - With a failover slot (PostgreSQL 17+: `--failover`, `sync_replication_slots` on the
//!   standby, `synchronized_standby_slots` on the primary), waltap finds the promoted
//!   standby through a two-host URL with `target_session_attrs=read-write` and goes on
//!   from the synchronized slot: the log (which fails over with the database) holds every
//!   change the new primary has, each once, in commit order, and nothing else.
//! - Without one, `waltap status` warned beforehand, and after the failover `waltap run`
//!   stops with an error naming the gap instead of creating a new slot.

use std::time::Duration;

use tokio_postgres::Client;
use waltap::dev::localpg::{LocalPg, LocalPgOptions, LOCAL_HOST};

use crate::support::{self, connect, wait_for, waltap};

const HBA: &str = "local all all trust\nlocal replication all trust\n\
                   host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";

struct Pair {
    primary: LocalPg,
    standby: LocalPg,
    version: u32,
}

impl Pair {
    /// A primary with database `app` (table `t`) and a standby following slot `sb`; with
    /// `sync`, the standby keeps copies of failover slots and the primary waits for it.
    async fn start(sync: bool) -> Option<Pair> {
        let bindir = match support::find_bindir() {
            Ok(dir) => dir,
            Err(why) => {
                eprintln!("skipped: {why}");
                return None;
            }
        };
        let extra_conf = vec!["wal_sender_timeout = 5s".to_string()];
        let primary = LocalPg::start(&LocalPgOptions {
            bindir: Some(bindir),
            extra_conf,
            hba: Some(HBA.into()),
            tls_certificate: false,
        })
        .unwrap_or_else(|e| panic!("{}", waltap::report(&e)));
        let admin = connect(&primary.url("postgres")).await.unwrap();
        let version: u32 = admin
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap()
            .get::<_, i32>(0) as u32;
        if sync && version < 170_000 {
            eprintln!("skipped: failover slots need PostgreSQL 17+, this is {version}");
            return None;
        }
        admin
            .batch_execute("SELECT pg_create_physical_replication_slot('sb')")
            .await
            .unwrap();
        admin.batch_execute("CREATE DATABASE app").await.unwrap();
        let app = connect(&primary.url("app")).await.unwrap();
        app.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
        drop((admin, app));
        let mut standby_conf = vec!["hot_standby_feedback = on".to_string()];
        if version >= 170_000 {
            standby_conf.push("sync_replication_slots = on".into());
        }
        let standby = primary
            .start_standby("sb", &standby_conf)
            .unwrap_or_else(|e| panic!("{}", waltap::report(&e)));
        if sync {
            // Set on the primary only once the standby is copied: a promoted standby
            // that inherited it would wait for a slot it does not have. (The copy restarted
            // the primary: a new connection.)
            let admin = connect(&primary.url("postgres")).await.unwrap();
            for sql in [
                "ALTER SYSTEM SET synchronized_standby_slots = 'sb'",
                "SELECT pg_reload_conf()",
            ] {
                admin.batch_execute(sql).await.unwrap();
            }
        }
        Some(Pair {
            primary,
            standby,
            version,
        })
    }

    /// Both hosts, the primary wanted (libpq's `primary`, as `read-write`): what a user
    /// gives waltap.
    fn url(&self) -> String {
        self.url_for("primary")
    }

    /// Both hosts, with `target_session_attrs=attrs`.
    fn url_for(&self, attrs: &str) -> String {
        format!(
            "postgres://postgres@{LOCAL_HOST}:{},{LOCAL_HOST}:{}/app?target_session_attrs={attrs}",
            self.primary.port(),
            self.standby.port()
        )
    }
}

async fn insert(client: &Client, ids: std::ops::RangeInclusive<i32>) {
    for id in ids {
        client
            .execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
}

/// Waits until waltap streams from slot `waltap` (changes before that are not its to see).
async fn streaming(url: &str) {
    streaming_from(url, "waltap").await
}

/// Waits until a walsender streams from `slot`: while the slot is being created, it is
/// active too, held by the creating backend, and changes then are not decoded.
async fn streaming_from(url: &str, slot: &str) {
    wait_for(
        "waltap streams from its slot",
        Duration::from_secs(60),
        || async {
            let Ok(c) = connect(url).await else {
                return false;
            };
            c.query_opt(
            "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
             WHERE s.slot_name = $1 AND a.backend_type = 'walsender'",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .is_some()
        },
    )
    .await;
}

/// Waits until the log of `slot` holds the insert of row `id`.
async fn wait_logged(url: &str, slot: &str, id: i32, what: &str) {
    wait_for(what, Duration::from_secs(120), || async move {
        logged_ids_of(url, slot).await.contains(&id)
    })
    .await;
}

/// The ids of the insert events in the log of slot `waltap`, in log order.
async fn logged_ids(url: &str) -> Vec<i32> {
    logged_ids_of(url, "waltap").await
}

/// The ids of the insert events in the log of `slot`, in log order.
async fn logged_ids_of(url: &str, slot: &str) -> Vec<i32> {
    let Ok(client) = connect(url).await else {
        return Vec::new();
    };
    let Ok(rows) = client
        .query(
            "SELECT (event->'created'->>'id')::int FROM waltap.events
             WHERE source = $1 AND event->>'action' = 'create' ORDER BY commit_lsn, ordinal",
            &[&slot],
        )
        .await
    else {
        return Vec::new();
    };
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_carries_the_log_across_a_promotion_exactly_once() {
    let Some(pair) = Pair::start(true).await else {
        return;
    };
    // Its warnings (the interruption, the reconnects) go to the test's output.
    let mut run = waltap(&pair.url(), &["run", "--failover"])
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    streaming(&pair.primary.url("app")).await;
    let primary = connect(&pair.primary.url("app")).await.unwrap();
    insert(&primary, 1..=200).await;
    wait_logged(&pair.primary.url("app"), "waltap", 200, "the first rows").await;
    // The standby's copy of the slot follows the primary's: wait until it covers the
    // rows, so that the failover below starts from a synchronized slot.
    let standby_url = pair.standby.url("app");
    wait_for(
        "the standby's copy of the slot",
        Duration::from_secs(90),
        || {
            let url = standby_url.clone();
            async move {
                let Ok(c) = connect(&url).await else {
                    return false;
                };
                c.query_opt(
                    "SELECT 1 FROM pg_replication_slots
                 WHERE slot_name = 'waltap' AND synced AND confirmed_flush_lsn IS NOT NULL",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .is_some()
            }
        },
    )
    .await;

    // Commits keep coming while the primary dies: some reach the standby, the last
    // ones may not (asynchronous replication); the truth is what the standby has.
    let writer = tokio::spawn(async move {
        let mut id = 201;
        while primary
            .execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
            .await
            .is_ok()
        {
            id += 1;
        }
    });
    let primary_url = pair.primary.url("app");
    wait_for("writes under way", Duration::from_secs(30), || {
        let url = primary_url.clone();
        async move {
            let Ok(c) = connect(&url).await else {
                return false;
            };
            let n: i64 = c
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .unwrap()
                .get(0);
            n >= 400
        }
    })
    .await;
    pair.primary.stop_immediate().unwrap();
    writer.await.unwrap();
    pair.standby.promote().unwrap();

    let new_primary = connect(&pair.standby.url("app")).await.unwrap();
    insert(&new_primary, 100_001..=100_200).await;
    wait_logged(
        &pair.standby.url("app"),
        "waltap",
        100_200,
        "the log on the new primary holds the rows written after the promotion",
    )
    .await;
    let logged = logged_ids(&pair.standby.url("app")).await;
    let mut table: Vec<i32> = new_primary
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    table.sort_unstable();
    // One writer, one row per transaction: commit order is id order.
    assert_eq!(
        logged, table,
        "the log must hold every row the promoted standby has, once, in commit order"
    );
    let _ = run.start_kill();
    let _ = run.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_failover_slot_the_run_stops_naming_the_gap() {
    let Some(pair) = Pair::start(false).await else {
        return;
    };
    let run = waltap(&pair.url(), &["run"]).spawn().unwrap();
    streaming(&pair.primary.url("app")).await;
    let primary = connect(&pair.primary.url("app")).await.unwrap();
    insert(&primary, 1..=50).await;
    let primary_url = pair.primary.url("app");
    wait_for("the log holds the rows", Duration::from_secs(60), || {
        let url = primary_url.clone();
        async move { logged_ids(&url).await.len() >= 50 }
    })
    .await;

    // Told beforehand: the standby keeps no copy of the slot.
    let status = support::output(waltap(&pair.primary.url("app"), &["status"])).await;
    let said = String::from_utf8_lossy(&status.stdout).to_string();
    let expected = if pair.version >= 170_000 {
        "is not a failover slot"
    } else {
        "before PostgreSQL 17"
    };
    assert!(said.contains(expected), "waltap status:\n{said}");

    // The standby must have the log's rows before the primary goes, so that the log
    // there has progress to lose.
    wait_logged(
        &pair.standby.url("app"),
        "waltap",
        50,
        "the standby replays the log",
    )
    .await;
    pair.primary.stop_immediate().unwrap();
    pair.standby.promote().unwrap();
    let new_primary = connect(&pair.standby.url("app")).await.unwrap();
    insert(&new_primary, 1_001..=1_010).await;

    // It stops, whether it notices while streaming or when it starts again.
    let stopped = stop_output(run).await;
    assert!(
        stopped.contains("replication slot \"waltap\" no longer exists") || stopped.contains(GAP),
        "{stopped}"
    );
    let again = stop_output(waltap(&pair.url(), &["run"]).spawn().unwrap()).await;
    assert!(again.contains(GAP), "{again}");
    // Nothing was created behind the user's back.
    let slots: i64 = new_primary
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'waltap'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);

    // Accepting the gap goes on from now.
    let mut run = waltap(&pair.url(), &["run", "--accept-slot-gap"])
        .spawn()
        .unwrap();
    streaming(&pair.standby.url("app")).await;
    insert(&new_primary, 2_001..=2_001).await;
    wait_logged(
        &pair.standby.url("app"),
        "waltap",
        2_001,
        "the log goes on after the gap",
    )
    .await;
    let logged = logged_ids(&pair.standby.url("app")).await;
    assert!(
        !logged.contains(&1_001),
        "the gap's rows cannot be in the log"
    );
    let _ = run.start_kill();
    let _ = run.wait().await;
}

const GAP: &str = "does not exist on the source, but the event log holds its changes up to";

/// Waits for a `waltap run` that must fail, and returns its stderr.
async fn stop_output(mut run: tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let status = tokio::time::timeout(Duration::from_secs(120), run.wait())
        .await
        .expect("waltap run stops")
        .unwrap();
    assert!(!status.success());
    let mut stderr = String::new();
    run.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    stderr
}

/// Reading from a hot standby (PostgreSQL 16+): the slot lives on the standby, the
/// initial state's snapshot is taken there and its watermark written through the primary
/// (`--primary-url`), while a writer changes the table on the primary. The rows plus the
/// changes after them must rebuild the primary's table exactly. Before 16, a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_changes_and_initial_state_with_writers_on_the_primary() {
    use std::collections::BTreeMap;
    use tokio::io::AsyncBufReadExt;

    let Some(pair) = Pair::start(false).await else {
        return;
    };
    let primary = connect(&pair.primary.url("app")).await.unwrap();
    primary
        .batch_execute("CREATE PUBLICATION waltap FOR TABLE t")
        .await
        .unwrap();
    insert(&primary, 1..=300).await;
    let standby_url = pair.standby.url("app");
    if pair.version < 160_000 {
        let out = support::output(waltap(&standby_url, &["tail", "--table", "t"])).await;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(said.contains("needs PostgreSQL 16 or later"), "{said}");
        return;
    }

    // Both hosts given, the standby wanted: the primary, first in the list, is passed over.
    let mut tail = waltap(
        &pair.url_for("standby"),
        &["tail", "--table", "t", "--initial-state"],
    )
    .env("WALTAP_PRIMARY_URL", pair.primary.url("app"))
    .stderr(std::process::Stdio::inherit())
    .spawn()
    .unwrap();
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    // Writes from before the slot exists until well after the snapshot.
    let rows_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let url = pair.primary.url("app");
        let rows_done = rows_done.clone();
        tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            let mut prng = support::prng::Prng::new(18);
            let mut next = 1_000;
            let mut after = 0;
            // Until 300 commits after the consumer has all the initial rows.
            while after < 300 {
                if rows_done.load(std::sync::atomic::Ordering::Relaxed) {
                    after += 1;
                }
                let id = prng.range(1, 300) as i32;
                match prng.percent() {
                    0..=39 => {
                        next += 1;
                        c.execute("INSERT INTO t VALUES ($1, 'new')", &[&next])
                            .await
                            .unwrap();
                    }
                    40..=79 => {
                        c.execute("UPDATE t SET v = v || '+' WHERE id = $1", &[&id])
                            .await
                            .unwrap();
                    }
                    _ => {
                        c.execute("DELETE FROM t WHERE id = $1", &[&id])
                            .await
                            .unwrap();
                    }
                }
            }
        })
    };

    let mut rows: BTreeMap<i64, String> = BTreeMap::new();
    let mut complete = false;
    let mut writer = Some(writer);
    let mut expected: Option<BTreeMap<i64, String>> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        if writer.as_ref().is_some_and(|w| w.is_finished()) {
            writer.take().unwrap().await.unwrap();
            let table = primary
                .query("SELECT id, v FROM t", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (i64::from(r.get::<_, i32>(0)), r.get::<_, String>(1)))
                .collect();
            expected = Some(table);
        }
        if complete && expected.as_ref() == Some(&rows) {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let line = match tokio::time::timeout(left.min(Duration::from_millis(500)), lines.next_line()).await {
            Ok(line) => line.unwrap().expect("waltap tail ended"),
            Err(_) if left.is_zero() => panic!(
                "the copy never matched the table: {} rows against {:?}, snapshotComplete seen: {complete}",
                rows.len(),
                expected.as_ref().map(BTreeMap::len)
            ),
            Err(_) => continue,
        };
        let item: serde_json::Value = serde_json::from_str(&line).unwrap();
        let mut put = |row: &serde_json::Value| {
            rows.insert(
                row["id"].as_i64().unwrap(),
                row["v"].as_str().unwrap().to_owned(),
            );
        };
        match (item["type"].as_str(), item["action"].as_str()) {
            (Some("snapshotComplete"), _) => {
                complete = true;
                rows_done.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (Some(_), _) => {}
            (None, Some("snapshot")) => put(&item["row"]),
            (None, Some("create")) => put(&item["created"]),
            (None, Some("update")) => put(&item["after"]),
            (None, Some("delete")) => {
                rows.remove(&item["deleted"]["id"].as_i64().unwrap());
            }
            other => panic!("unexpected line {other:?}: {line}"),
        }
    }
    let _ = tail.start_kill();
    let _ = tail.wait().await;
    // It read the standby: the slot is there, not on the primary.
    let slot_on = |url: String| async move {
        connect(&url)
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'waltap'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(slot_on(pair.standby.url("app")).await, 1);
    assert_eq!(slot_on(pair.primary.url("app")).await, 0);

    // The persisted pipeline reads the standby's slot and appends to a log on the primary.
    let mut run = waltap(
        &standby_url,
        &[
            "run",
            "--slot",
            "from_standby",
            "--store-url",
            &pair.primary.url("app"),
            // Also makes creating the slot on the standby quick (see README).
            "--primary-url",
            &pair.primary.url("app"),
        ],
    )
    .stderr(std::process::Stdio::inherit())
    .spawn()
    .unwrap();
    streaming_from(&standby_url, "from_standby").await;
    insert(&primary, 5_001..=5_100).await;
    wait_logged(
        &pair.primary.url("app"),
        "from_standby",
        5_100,
        "the log on the primary holds the rows",
    )
    .await;
    let logged = logged_ids_of(&pair.primary.url("app"), "from_standby").await;
    assert_eq!(logged, (5_001..=5_100).collect::<Vec<_>>());
    let _ = run.start_kill();
    let _ = run.wait().await;

    // Without the primary, the watermark cannot be written: said, not guessed around.
    let out = support::output(waltap(
        &standby_url,
        &["tail", "--table", "t", "--initial-state"],
    ))
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("--primary-url"), "{said}");
}

/// The event log's commit must reach the failover standbys before the slot is confirmed
/// past the changes it holds: with the standby down, `waltap run` commits its batch but
/// does not confirm it (nor go on), and says why after a while; once the standby is back,
/// it confirms and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_confirmed_only_once_the_standbys_have_the_log() {
    use tokio::io::AsyncBufReadExt;

    let Some(pair) = Pair::start(true).await else {
        return;
    };
    // Not a failover slot: its walsender does not wait for the standby itself, so
    // waltap receives the changes and only its own wait holds the confirmation.
    let mut run = waltap(&pair.url(), &["run"])
        .env("WALTAP_LOG", "info")
        .spawn()
        .unwrap();
    // Its log, echoed for a failure's report, and watched for the wait's warning.
    let (said_tx, mut said) = tokio::sync::mpsc::unbounded_channel();
    let mut stderr = tokio::io::BufReader::new(run.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            eprintln!("waltap run: {line}");
            let _ = said_tx.send(line);
        }
    });
    streaming(&pair.primary.url("app")).await;
    let primary = connect(&pair.primary.url("app")).await.unwrap();
    insert(&primary, 1..=10).await;
    wait_logged(&pair.primary.url("app"), "waltap", 10, "the first rows").await;

    pair.standby.stop_immediate().unwrap();
    insert(&primary, 11..=20).await;
    let after: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // The appender stops at its first commit that the standby cannot flush.
    let said = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = said.recv().await {
            if line.contains("waiting for the standbys in synchronized_standby_slots") {
                return line;
            }
        }
        panic!("waltap run ended");
    })
    .await
    .expect("waltap says what it waits for");
    assert!(said.contains("sb"), "{said}");
    assert!(
        confirmed_before(&primary, &after).await,
        "the slot was confirmed past changes whose log commit the standby does not have"
    );

    pair.standby.start_again().unwrap();
    wait_logged(
        &pair.primary.url("app"),
        "waltap",
        20,
        "the rows written meanwhile",
    )
    .await;
    wait_for(
        "the slot confirmed once the standby is back",
        Duration::from_secs(60),
        || async { !confirmed_before(&primary, &after).await },
    )
    .await;
    let _ = run.start_kill();
    let _ = run.wait().await;
}

/// Whether slot `waltap` is confirmed only below `lsn`.
async fn confirmed_before(c: &Client, lsn: &str) -> bool {
    c.query_one(
        "SELECT confirmed_flush_lsn < $1::text::pg_lsn FROM pg_replication_slots
         WHERE slot_name = 'waltap'",
        &[&lsn],
    )
    .await
    .unwrap()
    .get(0)
}
