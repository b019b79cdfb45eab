//! What people read: the summaries of `waltap setup` and `status`, the table of `stream
//! list`, and the progress line of long copies, which appears on a terminal only (run
//! under `script`, which gives the command a pseudo-terminal) and never in a pipe.

use std::path::Path;
use std::time::Duration;

use serde_json::Value as Json;

use crate::support::log::Log;
use crate::support::{output, run_ok, wait_for, TestDb};

const TIMEOUT: Duration = Duration::from_secs(60);
const SCRIPT: &str = "/usr/bin/script";

#[tokio::test]
async fn setup_and_status_say_what_is_fine_and_what_to_fix() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE good (id int PRIMARY KEY) ; ALTER TABLE good REPLICA IDENTITY FULL;
             CREATE TABLE keyless (v text);",
        )
        .await
        .unwrap();
    let (slot, publication) = (db.unique_name("slot"), db.unique_name("pub"));
    let waltap = |args: &[&str]| {
        let mut cmd = crate::support::waltap(&db.url(), args);
        cmd.args(["--slot", &slot, "--publication", &publication]);
        cmd
    };
    let setup = run_ok(waltap(&["setup", "-t", "good", "-t", "keyless"])).await;
    assert!(
        setup.contains(&format!("Publication {publication:?}\n  ✓ created now")),
        "{setup}"
    );
    assert!(
        setup.contains("  ✓ public.good: whole rows before and after each change"),
        "{setup}"
    );
    assert!(
        setup.contains("! public.keyless: no primary key"),
        "{setup}"
    );
    assert!(
        setup.contains(
            r#"fix: add a primary key, or ALTER TABLE "public"."keyless" REPLICA IDENTITY FULL;"#
        ),
        "{setup}"
    );
    assert!(
        setup.contains(&format!("Slot {slot:?}\n  ✓ created now")),
        "{setup}"
    );

    // Nothing reads the slot yet: status says so, and how to fix it.
    let status = run_ok(waltap(&["status"])).await;
    assert!(status.contains("! not streaming"), "{status}");
    assert!(
        status.contains("fix: start `waltap run` or `waltap serve`"),
        "{status}"
    );
    assert!(
        status.contains("no member has led this slot yet"),
        "{status}"
    );
    assert!(status.contains("to fix (see fix: above)"), "{status}");
    // The JSON report is still there for programs.
    let json: Json = serde_json::from_str(&run_ok(waltap(&["status", "--json"])).await).unwrap();
    assert_eq!(json["slot"]["name"], slot.as_str());

    // Once the table is fixed and a pipeline reads the slot, both are fine.
    db.client()
        .await
        .batch_execute("ALTER TABLE keyless REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let mut listener = crate::support::listen::config(&db, &[]);
    listener.slot = slot.clone();
    listener.publication = publication.clone();
    let log = Log::start_with(&db, listener).await;
    wait_for("status to show the slot streaming", TIMEOUT, || async {
        run_ok(waltap(&["status"])).await.contains("✓ streaming")
    })
    .await;
    let last = run_ok(waltap(&["status"])).await;
    assert!(last.contains("  ✓ public.keyless: whole rows"), "{last}");
    log.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn stream_list_prints_a_table() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let stream = |args: &[&str]| {
        let mut cmd = crate::support::waltap(&db.url(), &["stream"]);
        cmd.args(args);
        cmd
    };
    assert_eq!(run_ok(stream(&["list"])).await, "no streams\n");
    run_ok(stream(&["create", "orders-feed", "--table", "t"])).await;
    run_ok(stream(&[
        "create",
        "warm",
        "--table",
        "t",
        "--initial-state",
    ]))
    .await;
    let table = run_ok(stream(&["list"])).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAME         TABLES    CURSOR"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("orders-feed  public.t  0000000000000000-0000000000  0"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("warm ") && lines[2].ends_with("pending"),
        "{table}"
    );
    db.teardown().await;
}

/// `command` (a shell command line) run under a pseudo-terminal by `script`, whose stdout
/// is what the command wrote to the terminal (stderr, here).
fn under_terminal(db: &TestDb, command: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(SCRIPT);
    cmd.args(["-qefc", command, "/dev/null"])
        .env("DATABASE_URL", db.url())
        .env("WALTAP_LOG", "warn")
        .env_remove("WALTAP_STORE_URL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `command` under a pseudo-terminal; returns what it wrote to the terminal.
async fn on_terminal(db: &TestDb, command: &str) -> String {
    let out = output(under_terminal(db, command)).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{command}: {text}");
    text
}

#[tokio::test]
async fn export_shows_progress_on_a_terminal_only() {
    if !Path::new(SCRIPT).exists() {
        eprintln!("skipped: {SCRIPT} is not installed (util-linux)");
        return;
    }
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'x' FROM generate_series(1, 5000) g;
             ANALYZE t;",
        )
        .await
        .unwrap();
    let log = Log::start(&db).await;
    let bin = env!("CARGO_BIN_EXE_waltap");
    let dir = std::env::temp_dir().join(db.unique_name("export"));
    std::fs::create_dir_all(&dir).unwrap();
    let rows = dir.join("rows.jsonl");

    // In a pipe: the rows and the position, nothing on stderr.
    let piped = output({
        let mut cmd = crate::support::waltap(&db.url(), &["export", "t", "--slot", &log.slot]);
        cmd.env("WALTAP_LOG", "warn");
        cmd
    })
    .await;
    assert!(piped.status.success());
    assert_eq!(String::from_utf8_lossy(&piped.stdout).lines().count(), 5001);
    assert_eq!(
        String::from_utf8_lossy(&piped.stderr),
        "",
        "silent in a pipe"
    );

    // On a terminal: the progress line, ending with the count and the time taken.
    let command = format!(
        "'{bin}' export t --slot '{}' > '{}'",
        log.slot,
        rows.display()
    );
    let terminal = on_terminal(&db, &command).await;
    assert!(
        terminal.contains("export public.t: 5,000 rows in "),
        "{terminal:?}"
    );
    assert!(terminal.contains(" rows/s)"), "{terminal:?}");
    assert_eq!(
        std::fs::read_to_string(&rows).unwrap().lines().count(),
        5001
    );

    // On a terminal with --quiet: nothing.
    let quiet = on_terminal(&db, &format!("{command} --quiet")).await;
    assert!(!quiet.contains("rows"), "{quiet:?}");

    // The same for the copy of a stream's initial state by its first consumer.
    let stream = format!(
        "'{bin}' stream tail warm --limit 0 --slot '{}' > /dev/null",
        log.slot
    );
    run_ok(crate::support::waltap(
        &db.url(),
        &[
            "stream",
            "create",
            "warm",
            "-t",
            "t",
            "--initial-state",
            "--slot",
            &log.slot,
        ],
    ))
    .await;
    let terminal = on_terminal(&db, &stream).await;
    assert!(
        terminal.contains("initial state of stream warm: 5,000 rows in "),
        "{terminal:?}"
    );
    // Copied once: the next consumer has nothing to copy, and says nothing.
    let again = on_terminal(&db, &stream).await;
    assert!(!again.contains("rows"), "{again:?}");

    // The same line for tail --initial-state (with a change after the rows to end it).
    let tailed = dir.join("tail.jsonl");
    let tail = format!(
        "'{bin}' tail -t t --initial-state --temporary --limit 1 --publication '{}' > '{}'",
        db.unique_name("tail_pub"),
        tailed.display()
    );
    let terminal = {
        let running = tokio::spawn(output(under_terminal(&db, &tail)));
        wait_for("the initial state to be printed", TIMEOUT, || async {
            std::fs::read_to_string(&tailed).is_ok_and(|t| t.contains("snapshotComplete"))
        })
        .await;
        db.client()
            .await
            .batch_execute("INSERT INTO t VALUES (5001, 'y')")
            .await
            .unwrap();
        let out = running.await.unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        terminal.contains("initial state of public.t: 5,000 rows in "),
        "{terminal:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    log.stop().await;
    db.teardown().await;
}
