//! The `waltap` binary: tail, limits, signals, SIGKILL mid-stream, setup and status.

use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{self, run_ok, TestDb};

const LINE_TIMEOUT: Duration = Duration::from_secs(30);

struct Names {
    slot: String,
    publication: String,
}

fn names(db: &TestDb) -> Names {
    Names {
        slot: db.unique_name("slot"),
        publication: db.unique_name("pub"),
    }
}

fn waltap(db: &TestDb, n: &Names, args: &[&str]) -> Command {
    let mut cmd = support::waltap(&db.url(), args);
    cmd.args(["--slot", &n.slot, "--publication", &n.publication]);
    cmd
}

fn ids_of(stdout: &str) -> Vec<i64> {
    stdout
        .lines()
        .map(|l| {
            let v: Json = serde_json::from_str(l).expect("each line is JSON");
            v["created"]["id"].as_i64().expect("an id")
        })
        .collect()
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<String> {
    tokio::time::timeout(LINE_TIMEOUT, lines.next_line())
        .await
        .expect("a line in time")
        .expect("stdout readable")
}

fn spawn_tail(db: &TestDb, n: &Names) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = waltap(db, n, &["tail", "--table", "t"])
        .spawn()
        .expect("spawn waltap tail");
    let stdout = child.stdout.take().expect("piped stdout");
    (child, BufReader::new(stdout).lines())
}

async fn setup(db: &TestDb, n: &Names) {
    db.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let report: Json =
        serde_json::from_str(&run_ok(waltap(db, n, &["setup", "--table", "t", "--json"])).await)
            .unwrap();
    assert_eq!(report["publicationCreated"], true);
    assert_eq!(report["slotCreated"], true);
    assert_eq!(report["tables"][0]["table"], "public.t");
}

#[tokio::test]
async fn tail_limit_confirms_and_the_next_run_continues() {
    let db = TestDb::new().await;
    let n = names(&db);
    setup(&db, &n).await;
    let c = db.client().await;
    for i in 1..=5 {
        c.execute("INSERT INTO t VALUES ($1, 'x')", &[&i])
            .await
            .unwrap();
    }
    let out = run_ok(waltap(&db, &n, &["tail", "--table", "t", "--limit", "3"])).await;
    assert_eq!(ids_of(&out), vec![1, 2, 3]);
    let first: Json = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["action"], "create");
    assert!(
        first.get("type").is_none(),
        "change events carry no type field"
    );
    let out = run_ok(waltap(&db, &n, &["tail", "--table", "t", "--limit", "2"])).await;
    assert_eq!(ids_of(&out), vec![4, 5]);

    let status: Json =
        serde_json::from_str(&run_ok(waltap(&db, &n, &["status", "--json"])).await).unwrap();
    assert_eq!(status["slot"]["name"], n.slot.as_str());
    assert_eq!(
        status["slot"]["lagBytes"].as_i64().map(|b| b >= 0),
        Some(true)
    );
    db.teardown().await;
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_confirms_what_was_printed() {
    let db = TestDb::new().await;
    let n = names(&db);
    setup(&db, &n).await;
    let c = db.client().await;
    let (mut child, mut lines) = spawn_tail(&db, &n);
    for i in 1..=3 {
        c.execute("INSERT INTO t VALUES ($1, 'x')", &[&i])
            .await
            .unwrap();
    }
    let mut printed = Vec::new();
    for _ in 0..3 {
        printed.push(next_line(&mut lines).await.expect("a line"));
    }
    crate::support::sigterm(&child);
    let exit = tokio::time::timeout(LINE_TIMEOUT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "clean exit: {exit:?}");
    c.execute("INSERT INTO t VALUES (4, 'x')", &[])
        .await
        .unwrap();
    let out = run_ok(waltap(&db, &n, &["tail", "--table", "t", "--limit", "1"])).await;
    assert_eq!(ids_of(&out), vec![4], "nothing printed before is repeated");
    db.teardown().await;
}

#[tokio::test]
async fn sigkill_mid_stream_loses_nothing() {
    let db = TestDb::new().await;
    let n = names(&db);
    setup(&db, &n).await;
    const ROWS: i32 = 600;
    let writer_db = db.url();
    let writer = tokio::spawn(async move {
        let c = crate::support::connect(&writer_db).await.unwrap();
        for i in 1..=ROWS {
            // A mix of single-row and multi-row transactions.
            if i % 3 == 0 {
                c.batch_execute(&format!(
                    "BEGIN; UPDATE t SET v = 'u' WHERE id = {}; INSERT INTO t VALUES ({i}, 'x'); COMMIT;",
                    i - 1
                ))
                .await
                .unwrap();
            } else {
                c.execute("INSERT INTO t VALUES ($1, 'x')", &[&i])
                    .await
                    .unwrap();
            }
        }
    });
    let mut seen: Vec<i64> = Vec::new();
    for kill_after in [50usize, 120, 200] {
        let (mut child, mut lines) = spawn_tail(&db, &n);
        let mut run = Vec::new();
        while run.len() < kill_after {
            let Some(line) = next_line(&mut lines).await else {
                break;
            };
            let v: Json = serde_json::from_str(&line).unwrap();
            if let Some(id) = v["created"]["id"].as_i64() {
                run.push(id);
            }
        }
        child.kill().await.unwrap(); // SIGKILL: no clean stop, no final status update
                                     // Lines it printed before dying count as delivered (and may be confirmed); a line
                                     // cut off by the kill was never flushed whole, so never confirmed.
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<Json>(&line) else {
                break;
            };
            if let Some(id) = v["created"]["id"].as_i64() {
                run.push(id);
            }
        }
        assert!(run.windows(2).all(|w| w[0] < w[1]), "ordered: {run:?}");
        seen.extend(run);
    }
    writer.await.unwrap();
    // The last run reads to the end.
    let (mut child, mut lines) = spawn_tail(&db, &n);
    while !(1..=i64::from(ROWS)).all(|i| seen.contains(&i)) {
        let line = next_line(&mut lines).await.expect("more events");
        let v: Json = serde_json::from_str(&line).unwrap();
        if let Some(id) = v["created"]["id"].as_i64() {
            seen.push(id);
        }
    }
    child.kill().await.unwrap();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (1..=i64::from(ROWS)).collect::<Vec<_>>());
    db.teardown().await;
}

#[tokio::test]
async fn bad_flags_and_unreachable_servers_are_clear_errors() {
    let db = TestDb::new().await;
    let n = Names {
        slot: "Bad-Slot".into(),
        publication: db.unique_name("pub"),
    };
    let out = waltap(&db, &n, &["tail", "--temporary"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid replication slot name"), "{err}");

    let mut cmd = waltap(&db, &names(&db), &["tail"]);
    cmd.env(
        "DATABASE_URL",
        "postgres://postgres:secret-pw@127.0.0.1:1/postgres",
    );
    let out = cmd.output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(!err.contains("secret-pw"), "no secrets in errors: {err}");
    db.teardown().await;
}

/// A host that accepts TCP and never answers: every command gives up after the URL's
/// `connect_timeout` (or the default) with a clear error, instead of hanging.
#[tokio::test]
async fn silent_hosts_time_out_in_every_command() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accepted connections stay open and unanswered for the whole test.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=2");
    for args in [
        &["tail", "--table", "t"][..],
        &["setup", "--table", "t"],
        &["status"],
        &["stream", "list"],
    ] {
        let out = support::output(support::waltap(&url, args)).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no answer") || err.contains("timed out"),
            "{args:?}: {err}"
        );
    }
    hold.abort();
}

#[tokio::test]
async fn demo_prints_the_sample_events_and_leaves_nothing_behind() {
    let mut cmd = support::waltap("", &["demo", "--orders", "2"]);
    cmd.env_remove("DATABASE_URL");
    let child_out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("demo finished in time")
        .expect("demo runs");
    let stderr = String::from_utf8_lossy(&child_out.stderr);
    assert!(child_out.status.success(), "{stderr}");
    let lines: Vec<Json> = String::from_utf8(child_out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let actions: Vec<&str> = lines
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "create", "update", "update", "delete"]);
    assert_eq!(lines[2]["changed"], serde_json::json!(["status"]));
    assert_eq!(lines[2]["tx"]["annotations"]["user"], "demo");
    assert!(stderr.contains("stopped and removed"), "{stderr}");
}

#[tokio::test]
async fn tail_filter_prints_only_matching_events_renumbered() {
    let db = TestDb::new().await;
    let n = names(&db);
    setup(&db, &n).await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO t VALUES (1, 'skip'), (2, 'keep'), (3, 'keep')")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO t VALUES (4, 'keep')")
        .await
        .unwrap();
    let out = run_ok(waltap(
        &db,
        &n,
        &[
            "tail",
            "--table",
            "t",
            "--limit",
            "3",
            "--filter",
            r#"{"create": {"v": {"equals": "keep"}}}"#,
        ],
    ))
    .await;
    assert_eq!(ids_of(&out), vec![2, 3, 4]);
    let lines: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["tx"]["index"], 0);
    assert_eq!(lines[0]["tx"]["total"], 2);
    assert_eq!(lines[1]["tx"]["last"], true);
    let bad = waltap(
        &db,
        &n,
        &[
            "tail",
            "--table",
            "t",
            "--filter",
            r#"{"create": {"nope": 1}}"#,
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("nope"), "{err}");
    db.teardown().await;
}

#[tokio::test]
async fn tail_initial_state_prints_rows_then_the_marker_then_changes() {
    let db = TestDb::new().await;
    let n = names(&db);
    setup(&db, &n).await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO t VALUES (1, 'keep'), (2, 'skip'), (3, 'keep')")
        .await
        .unwrap();
    let mut child = waltap(
        &db,
        &n,
        &[
            "tail",
            "--table",
            "t",
            "--initial-state",
            "--limit",
            "1",
            "--filter",
            r#"{"where": {"v": "keep"}}"#,
        ],
    )
    .spawn()
    .expect("spawn waltap tail");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut got = Vec::new();
    loop {
        let line = next_line(&mut lines)
            .await
            .expect("a line before the marker");
        let v: Json = serde_json::from_str(&line).unwrap();
        let done = v["type"] == "snapshotComplete";
        got.push(v);
        if done {
            break;
        }
    }
    assert_eq!(got[0]["type"], "initialized");
    let rows: Vec<&Json> = got[1..got.len() - 1].iter().collect();
    assert_eq!(rows.len(), 2, "the filter applies to the rows: {got:?}");
    assert!(rows
        .iter()
        .all(|r| r["action"] == "snapshot" && r["row"]["v"] == "keep"));
    c.batch_execute("INSERT INTO t VALUES (4, 'keep')")
        .await
        .unwrap();
    let change: Json = serde_json::from_str(&next_line(&mut lines).await.unwrap()).unwrap();
    assert_eq!(change["created"]["id"], 4);
    let status = tokio::time::timeout(LINE_TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "--limit counts the change only");
    let bad = waltap(&db, &n, &["tail", "--initial-state"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--initial-state needs exactly one --table")
    );
    db.teardown().await;
}

fn json_lines(out: &str) -> Vec<Json> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// A filter that pins row `id` of `t` by its primary key.
fn pin(id: i32) -> String {
    serde_json::json!({"where": {"id": id}}).to_string()
}

#[tokio::test]
async fn tail_of_one_row_completes_and_exits_zero() {
    let db = TestDb::new().await;
    let n = names(&db);
    setup(&db, &n).await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c');
         UPDATE t SET v = 'x' WHERE id = 3;
         DELETE FROM t WHERE id = 3;",
    )
    .await
    .unwrap();

    // Without --initial-state: the row's changes, then `completed`.
    let pins = [pin(3), pin(999), pin(2)];
    let tail = |id: usize, more: &[&'static str]| {
        let mut args = vec!["tail", "--table", "t", "--filter", pins[id].as_str()];
        args.extend(more);
        waltap(&db, &n, &args)
    };
    let out = run_ok(tail(0, &[])).await;
    let lines = json_lines(&out);
    let actions: Vec<&Json> = lines.iter().map(|l| &l["action"]).collect();
    assert_eq!(actions[..3], ["create", "update", "delete"], "{out}");
    assert_eq!(lines[3]["type"], "completed", "{out}");
    assert_eq!(lines[3]["reason"], "deleted");
    assert_eq!(lines[3]["position"], lines[2]["position"]);
    assert_eq!(lines.len(), 4, "{out}");

    // With it, a row that does not exist: completed right after the initial state, with
    // positions a stream can start from.
    let out = run_ok(tail(1, &["--initial-state"])).await;
    let lines = json_lines(&out);
    let types: Vec<&Json> = lines.iter().map(|l| &l["type"]).collect();
    assert_eq!(
        types,
        ["initialized", "snapshotComplete", "completed"],
        "{out}"
    );
    assert_eq!(lines[2]["reason"], "notFound");
    let after = lines[1]["position"]
        .as_str()
        .expect("a position, never null");
    assert_eq!(lines[2]["position"], after);
    assert!(lines[0]["position"].as_str().is_some_and(|p| p <= after));
    let mut create = support::waltap(
        &db.url(),
        &[
            "stream",
            "create",
            "after_export",
            "--table",
            "t",
            "--from",
            after,
        ],
    );
    create.args(["--slot", &n.slot]);
    run_ok(create).await;

    // A row that exists: its row, the marker, then its delete and `completed`.
    let mut child = tail(2, &["--initial-state"])
        .spawn()
        .expect("spawn waltap tail");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut got = Vec::new();
    while got
        .last()
        .is_none_or(|l: &Json| l["type"] != "snapshotComplete")
    {
        let line = next_line(&mut lines).await.expect("a line");
        got.push(serde_json::from_str(&line).unwrap());
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[1]["row"]["id"], 2);
    c.batch_execute("DELETE FROM t WHERE id = 2").await.unwrap();
    let delete: Json = serde_json::from_str(&next_line(&mut lines).await.unwrap()).unwrap();
    assert_eq!(delete["deleted"]["id"], 2);
    let done: Json = serde_json::from_str(&next_line(&mut lines).await.unwrap()).unwrap();
    assert_eq!(
        (&done["type"], &done["reason"]),
        (&json!("completed"), &json!("deleted"))
    );
    assert_eq!(next_line(&mut lines).await, None, "nothing after completed");
    let status = tokio::time::timeout(LINE_TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "completion is a normal end: {status}");
    db.teardown().await;
}
