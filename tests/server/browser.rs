//! A browser follows a token over SSE with `EventSource`, from a page served by another
//! origin (so CORS is exercised): headless Chromium loads the page, which writes each
//! event into the DOM, and `--dump-dom` prints it. Skipped when Chromium is absent.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::{insert_orders, start, ORDERS};
use crate::support::TestDb;

const CHROMIUM: &str = "/usr/bin/chromium";

#[tokio::test]
async fn chromium_follows_a_token_with_eventsource() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
        return;
    }
    let db = TestDb::new().await;
    // The page's origin, bound first so the server can allow it.
    let page_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", page_listener.local_addr().unwrap());
    let s = start(&db, |c| c.cors_origins = vec![origin.clone()]).await;
    let token = s.token(ORDERS, json!({"table": "orders"})).await;
    insert_orders(&db, 100..101).await; // before the page: must not be shown

    let page = format!(
        r#"<!doctype html><html><body><ul id="events"></ul><script>
const list = document.getElementById("events");
const source = new EventSource("{url}/v1/subscribe?token={token}");
function show(text) {{ const li = document.createElement("li"); li.textContent = text; list.appendChild(li); }}
source.addEventListener("initialized", () => {{ show("initialized"); fetch("/ready"); }});
let changes = 0;
// Closing leaves no request pending, so the virtual time budget runs out and Chromium
// prints the DOM and exits.
source.addEventListener("change", (e) => {{
  const ev = JSON.parse(e.data); show("change " + ev.created.id);
  if (++changes === 3) source.close();
}});
source.onerror = () => show("error");
</script></body></html>"#,
        url = s.url
    );
    let (ready_tx, ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route(
            "/ready",
            axum::routing::get(move || {
                let tx = ready_tx.clone();
                async move {
                    let _ = tx.try_send(());
                }
            }),
        );
    let page_server = tokio::spawn(async move { axum::serve(page_listener, app).await });

    let profile = std::env::temp_dir().join(format!("waltap-chromium-{}", std::process::id()));
    let mut browser = tokio::process::Command::new(CHROMIUM);
    browser
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("{origin}/"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let running = browser.spawn().unwrap();
    // Write only once the page's EventSource is live.
    let mut ready_rx = ready_rx;
    tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
        .await
        .expect("the page subscribed");
    insert_orders(&db, 1..4).await;
    let out = tokio::time::timeout(Duration::from_secs(120), running.wait_with_output())
        .await
        .expect("chromium finished")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&profile);
    page_server.abort();
    assert!(dom.contains("<li>initialized</li>"), "{dom}");
    for id in 1..4 {
        assert!(dom.contains(&format!("<li>change {id}</li>")), "{dom}");
    }
    assert!(!dom.contains("change 100"), "{dom}");
    s.stop().await;
    db.teardown().await;
}
