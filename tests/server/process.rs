//! The real `waltap serve` binary: keys from the environment, an event stream open, then
//! SIGTERM: the stream ends cleanly, the slot is confirmed, the exit status is 0; debug
//! logs name neither keys nor row values.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{insert_orders, Sse, DDL, KEYS, ORDERS, TIMEOUT};
use crate::support::{listen, waltap, TestDb};

#[tokio::test]
async fn serve_binary_shuts_down_gracefully_on_sigterm() {
    let db = TestDb::new().await;
    db.client().await.batch_execute(DDL).await.unwrap();
    let slot = db.unique_name("slot");
    let publication = db.unique_name("pub");
    let mut cmd = waltap(
        &db.url(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--slot",
            &slot,
            "--publication",
            &publication,
        ],
    );
    // Debug logging on: it still must not print row values (statement parameters).
    cmd.env("WALTAP_API_KEYS", KEYS)
        .env("WALTAP_LOG", "debug")
        .env_remove("WALTAP_KEYS_FILE");
    let mut child = cmd.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.to_owned();
            }
        }
        panic!("waltap serve exited before listening");
    })
    .await
    .unwrap();
    // Keep draining stderr so the child never blocks on a full pipe.
    let logs = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            all.push(line);
        }
        all
    });
    let url = format!("http://{addr}");
    let http = reqwest::Client::new();
    crate::support::wait_for("the server to be healthy", TIMEOUT, || async {
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let mut sse = Sse::open(
        http.get(format!("{url}/v1/subscribe?table=orders"))
            .bearer_auth(ORDERS),
    )
    .await;
    sse.expect("initialized").await;
    insert_orders(&db, 0..1).await;
    sse.expect("change").await;
    db.client()
        .await
        .batch_execute("INSERT INTO orders VALUES (1, 'new', 'row-value-4e1f')")
        .await
        .unwrap();
    sse.expect("change").await;

    crate::support::sigterm(&child);
    assert!(
        sse.next().await.is_none(),
        "the event stream ended with the server"
    );
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("waltap serve exited after SIGTERM")
        .unwrap();
    let logs = logs.await.unwrap();
    assert!(
        status.success(),
        "exit {status:?}; logs:\n{}",
        logs.join("\n")
    );
    assert!(
        !logs.iter().any(|l| l.contains(ORDERS)),
        "a key appeared in the logs"
    );
    assert!(
        !logs.iter().any(|l| l.contains("row-value-4e1f")),
        "a row value appeared in the debug logs"
    );
    // The slot was confirmed through the insert (appended to the log, then confirmed).
    let confirmed = listen::confirmed_flush(&db, &slot).await.unwrap();
    let appended: i64 = db
        .client()
        .await
        .query_one(
            "SELECT max(commit_lsn) FROM waltap.events WHERE source = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        confirmed >= appended as u64,
        "slot confirmed {confirmed} < log {appended}"
    );
    db.teardown().await;
}
