//! The Python example client (`examples/follow_stream.py`): it follows a stream, stores the
//! last position, and after a restart resumes with Last-Event-ID, losing and repeating
//! nothing. Skipped when `python3` is absent.

use serde_json::Value as Json;

use super::{insert_orders, start, ORDERS};
use crate::support::{output, TestDb};

async fn run_client(url: &str, state: &std::path::Path, limit: u32) -> Vec<i64> {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/follow_stream.py"
    ))
    .args(["stream1", "--limit", &limit.to_string(), "--state"])
    .arg(state)
    .env("WALTAP_URL", url)
    .env("WALTAP_KEY", ORDERS)
    .kill_on_drop(true);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Json>(l).unwrap()["created"]["id"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn python_client_resumes_after_restart() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: python3 is not installed");
        return;
    }
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("stream1", "orders", None).await;
    insert_orders(&db, 0..5).await;
    let dir = std::env::temp_dir().join(format!("waltap-example-{}", db.unique_name("x")));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("stream1.pos");
    assert_eq!(run_client(&s.url, &state, 3).await, [0, 1, 2]);
    // Restarted: it retries while the first run's lease is released, then resumes.
    insert_orders(&db, 5..6).await;
    assert_eq!(run_client(&s.url, &state, 3).await, [3, 4, 5]);
    let _ = std::fs::remove_dir_all(&dir);
    s.stop().await;
    db.teardown().await;
}
