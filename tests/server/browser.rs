//! Browsers follow a token from a page served by another origin (so CORS is exercised):
//! headless Chromium loads the page, which writes what it receives into the DOM, and
//! reports it (`--dump-dom`, or a POST). Once with a bare `EventSource`, once with the TypeScript client
//! (`clients/typescript`, loaded as an ES module) consuming a stream and acknowledging.
//! Skipped when Chromium is absent.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::{insert_orders, start, Server, ORDERS};
use crate::support::TestDb;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A page's origin, bound before the server so the server can allow it.
struct Origin {
    listener: tokio::net::TcpListener,
    url: String,
}

/// A test database and a page origin, or `None` (with a message) when Chromium is absent.
async fn setup() -> Option<(TestDb, Origin)> {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
        return None;
    }
    Some((TestDb::new().await, origin().await))
}

async fn origin() -> Origin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    Origin { listener, url }
}

/// How a page's result is read.
#[derive(PartialEq)]
enum Outcome {
    /// The DOM Chromium prints once the page has nothing left pending (virtual time).
    Dom,
    /// What the page POSTs to `/report`: a page holding a streaming `fetch` open does
    /// not keep virtual time from running out, so it reports when it is done.
    Report,
}

/// Serves `page` (and the TypeScript client as `/waltap.js`) from `origin`, loads it in
/// Chromium, runs `on_ready` once the page has fetched `/ready`, and returns the result.
async fn run_page<F: std::future::Future<Output = ()>>(
    origin: Origin,
    page: String,
    on_ready: F,
    result: Outcome,
) -> String {
    let client_js = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/typescript/src/index.js"
    ))
    .unwrap();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (report_tx, mut report_rx) = tokio::sync::mpsc::channel::<String>(1);
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route(
            "/waltap.js",
            axum::routing::get(move || async move {
                ([("content-type", "text/javascript")], client_js)
            }),
        )
        .route(
            "/report",
            axum::routing::post(move |body: String| async move {
                let _ = report_tx.try_send(body);
            }),
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
    let page_server = tokio::spawn(async move { axum::serve(origin.listener, app).await });

    let profile = std::env::temp_dir().join(format!(
        "waltap-chromium-{}-{}",
        std::process::id(),
        origin.url.rsplit(':').next().unwrap()
    ));
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
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    if result == Outcome::Dom {
        browser.args(["--virtual-time-budget=5000", "--dump-dom"]);
    }
    browser
        .arg(format!("{}/", origin.url))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let running = browser.spawn().unwrap();
    tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
        .await
        .expect("the page subscribed");
    on_ready.await;
    let out = match result {
        Outcome::Dom => {
            let out = tokio::time::timeout(Duration::from_secs(120), running.wait_with_output())
                .await
                .expect("chromium finished")
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        Outcome::Report => {
            let report = tokio::time::timeout(Duration::from_secs(120), report_rx.recv())
                .await
                .expect("the page reported")
                .unwrap();
            drop(running); // killed on drop
            report
        }
    };
    let _ = std::fs::remove_dir_all(&profile);
    page_server.abort();
    out
}

/// The page's script around `body`: a list, and `show(text)` adding an item to it.
fn page(module: bool, body: &str) -> String {
    format!(
        r#"<!doctype html><html><body><ul id="events"></ul><script{}>
const list = document.getElementById("events");
function show(text) {{ const li = document.createElement("li"); li.textContent = text; list.appendChild(li); }}
{body}
</script></body></html>"#,
        if module { r#" type="module""# } else { "" }
    )
}

#[tokio::test]
async fn chromium_follows_a_token_with_eventsource() {
    let Some((db, origin)) = setup().await else {
        return;
    };
    let s = start(&db, |c| c.cors_origins = vec![origin.url.clone()]).await;
    let token = s.token(ORDERS, json!({"table": "orders"})).await;
    insert_orders(&db, 100..101).await; // before the page: must not be shown

    let script = format!(
        r#"const source = new EventSource("{url}/v1/subscribe?token={token}");
source.addEventListener("initialized", () => {{ show("initialized"); fetch("/ready"); }});
let changes = 0;
// Closing leaves no request pending, so the virtual time budget runs out and Chromium
// prints the DOM and exits.
source.addEventListener("change", (e) => {{
  const ev = JSON.parse(e.data); show("change " + ev.created.id);
  if (++changes === 3) source.close();
}});
source.onerror = () => show("error");"#,
        url = s.url
    );
    let dom = run_page(
        origin,
        page(false, &script),
        insert_orders(&db, 1..4),
        Outcome::Dom,
    )
    .await;
    assert!(dom.contains("<li>initialized</li>"), "{dom}");
    for id in 1..4 {
        assert!(dom.contains(&format!("<li>change {id}</li>")), "{dom}");
    }
    assert!(!dom.contains("change 100"), "{dom}");
    s.stop().await;
    db.teardown().await;
}

#[tokio::test]
async fn chromium_consumes_a_stream_with_the_typescript_client() {
    let Some((db, origin)) = setup().await else {
        return;
    };
    let s: Server = start(&db, |c| c.cors_origins = vec![origin.url.clone()]).await;
    s.create_stream("browser", "orders", None).await;
    let token = s.token(ORDERS, json!({"stream": "browser"})).await;

    let script = format!(
        r#"import {{ Waltap }} from "/waltap.js";
const client = new Waltap({{ url: "{url}", token: "{token}" }});
let changes = 0;
try {{
  for await (const ev of client.stream("browser")) {{
    if (ev.type === "initialized") {{ show("initialized"); fetch("/ready"); continue; }}
    show("change " + ev.created.id + " at " + ev.cursor);
    await ev.ack();
    if (++changes === 3) break;
  }}
  show("done");
}} catch (e) {{ show("error " + e.name + ": " + e.message); }}
fetch("/report", {{ method: "POST", body: list.innerHTML }});"#,
        url = s.url
    );
    let dom = run_page(
        origin,
        page(true, &script),
        insert_orders(&db, 1..4),
        Outcome::Report,
    )
    .await;
    assert!(dom.contains("<li>initialized</li>"), "{dom}");
    assert!(dom.contains("<li>done</li>"), "{dom}");
    for id in 1..4 {
        assert!(dom.contains(&format!("<li>change {id} at ")), "{dom}");
    }
    // The browser's acks moved the stream's cursor to the third change.
    s.lease_free("browser").await;
    let info = s.stream_info("browser").await;
    let third = dom
        .split("<li>change 3 at ")
        .nth(1)
        .and_then(|rest| rest.split("</li>").next())
        .unwrap()
        .to_owned();
    assert_eq!(info["cursor"], json!(third), "{info}");
    s.stop().await;
    db.teardown().await;
}
