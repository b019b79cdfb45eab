//! The console page in headless Chromium, driven over the DevTools protocol: a key is
//! typed into the page, the figures change while a writer runs (asserted on the DOM), a
//! screenshot is saved as `target/console.png` (and as `docs/console.png`, the README's,
//! with `WALTAP_UPDATE_SCREENSHOT=1`), the layout fits a
//! phone, and the page recovers by itself when the server restarts. Skipped when
//! Chromium is absent.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

use super::{serve_on, start, Sse, ADMIN, TIMEOUT};
use crate::support::{wait_for, TestDb};

const CHROMIUM: &str = "/usr/bin/chromium";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium showing one page, and the DevTools connection to that page.
struct Browser {
    _process: tokio::process::Child,
    socket: tokio::sync::Mutex<Socket>,
    next_id: AtomicU64,
    profile: std::path::PathBuf,
}

impl Browser {
    /// Starts Chromium on `url` (a laptop-sized window) and connects to its page.
    async fn open(url: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "waltap-console-{}-{}",
            std::process::id(),
            url.rsplit(':').next().unwrap().trim_end_matches('/')
        ));
        let mut process = tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Chromium prints where its DevTools endpoint listens; the rest of its stderr is
        // drained so that it never blocks on a full pipe.
        let mut lines = tokio::io::BufReader::new(process.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(ws) = line.strip_prefix("DevTools listening on ") {
                    return ws.trim().to_owned();
                }
            }
            panic!("chromium exited before listening for DevTools");
        })
        .await
        .expect("chromium's DevTools endpoint");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let http = endpoint
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_owned();
        let page = std::sync::Mutex::new(None);
        wait_for("chromium's page", TIMEOUT, || async {
            let targets: Json = reqwest::get(format!("http://{http}/json/list"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let found = targets.as_array().unwrap().iter().find_map(|t| {
                (t["type"] == "page")
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
                    .flatten()
            });
            let ok = found.is_some();
            *page.lock().unwrap() = found;
            ok
        })
        .await;
        let page = page.into_inner().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(page.unwrap())
            .await
            .unwrap();
        Browser {
            _process: process,
            socket: tokio::sync::Mutex::new(socket),
            next_id: AtomicU64::new(1),
            profile,
        }
    }

    /// Calls a DevTools method and returns its result (events in between are skipped).
    async fn call(&self, method: &str, params: Json) -> Json {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut socket = self.socket.lock().await;
        let request = json!({"id": id, "method": method, "params": params});
        socket
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(TIMEOUT, socket.next())
                .await
                .expect("an answer from chromium")
                .expect("chromium's connection open")
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Json = serde_json::from_str(&text).unwrap();
            if answer["id"] == json!(id) {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&self, expression: &str) -> Json {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page (an exception counts as false: the
    /// page may not have loaded yet).
    async fn until(&self, what: &str, expression: &str) {
        let guarded = format!(
            "(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"
        );
        wait_for(what, TIMEOUT, || async {
            self.eval(&guarded).await == json!(true)
        })
        .await;
    }

    /// The text of the element matching a CSS selector.
    async fn text(&self, selector: &str) -> String {
        let js = format!(
            "(document.querySelector({}) || {{}}).textContent || ''",
            json!(selector)
        );
        self.eval(&js).await.as_str().unwrap().to_owned()
    }

    /// A figure as the page shows it (`12,345`, `3.5/s`).
    async fn number(&self, selector: &str) -> f64 {
        let text = self.text(selector).await;
        let digits: String = text
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
            .filter(|c| *c != ',')
            .collect();
        digits.parse().unwrap_or(0.0)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Inserts orders, one transaction each, until stopped.
fn writer(db: &TestDb, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let url = db.url();
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut id = 1000;
        while !stop.load(Ordering::Relaxed) {
            client
                .execute("INSERT INTO orders VALUES ($1, 'new', NULL)", &[&id])
                .await
                .unwrap();
            id += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test]
async fn the_console_shows_live_figures_and_survives_a_restart() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
        return;
    }
    let db = TestDb::new().await;
    let s = start(&db, |_| {}).await;
    s.create_stream("billing", "orders", None).await;
    let b = Browser::open(&format!("{}/", s.url)).await;

    // The page asks for a key; a wrong one is refused and asked for again.
    b.until(
        "the key form",
        "!document.getElementById('key-form').hidden",
    )
    .await;
    let enter = |key: &'static str| {
        let b = &b;
        async move {
            b.eval("document.getElementById('key').focus()").await;
            b.call("Input.insertText", json!({"text": key})).await;
            b.eval("document.getElementById('key-submit').click()")
                .await;
        }
    };
    enter("not-a-key").await;
    b.until(
        "the refusal",
        "document.getElementById('key-error').textContent.includes('not accepted')",
    )
    .await;
    enter(ADMIN).await;
    b.until(
        "the live console",
        "document.getElementById('conn').dataset.state === 'live'",
    )
    .await;
    assert_eq!(
        b.eval("sessionStorage.getItem('waltap.console.key')").await,
        json!(ADMIN)
    );
    b.until(
        "the stream's row",
        "!!document.querySelector('tr[data-stream=billing]')",
    )
    .await;
    b.until(
        "the leader among the members",
        "document.getElementById('members').textContent.includes('leader')",
    )
    .await;
    let cursor_before = b.text("tr[data-stream=billing] .cursor").await;
    assert_eq!(b.text("tr[data-stream=billing] .acked").await, "never");

    // A writer, a live subscription, and a consumer of the stream: the figures move.
    let mut subscription = Sse::open(s.get("/v1/subscribe?table=orders", ADMIN)).await;
    subscription.expect("initialized").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&db, stop.clone());
    let in_before = b.number("#total-in").await;
    b.until(
        "the subscription by table",
        "(document.querySelector('tr[data-table=\"public.orders\"] .subscriptions') || {}).textContent === '1'",
    )
    .await;
    wait_for("events in to rise", TIMEOUT, || async {
        b.number("#total-in").await > in_before
    })
    .await;
    wait_for("a rate of events in", TIMEOUT, || async {
        b.number("#rate-in").await > 0.0
    })
    .await;
    subscription.changes(1).await;
    wait_for("events out to rise", TIMEOUT, || async {
        b.number("#total-out").await > 0.0
    })
    .await;
    wait_for("the stream's backlog to grow", TIMEOUT, || async {
        b.number("tr[data-stream=billing] .backlog").await > 0.0
    })
    .await;
    b.until(
        "a chart of a few samples",
        "document.querySelector('#chart-in polyline').getAttribute('points').split(' ').length >= 4",
    )
    .await;
    let page = s
        .get_json("/v1/streams/billing/events?limit=5&wait=0", ADMIN)
        .await;
    let path = format!(
        "/v1/streams/billing/events?limit=1&wait=0&cursor={}",
        page["cursor"].as_str().unwrap()
    );
    assert!(s.get_json(&path, ADMIN).await["events"].is_array());
    wait_for("the stream's cursor to move", TIMEOUT, || async {
        b.text("tr[data-stream=billing] .cursor").await != cursor_before
            && b.text("tr[data-stream=billing] .acked")
                .await
                .ends_with(" ago")
    })
    .await;

    // The screenshot the README shows, with figures on every panel.
    let shot = b
        .call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    // Into target/ on every run (the tree stays clean); into docs/ for the README when
    // asked: WALTAP_UPDATE_SCREENSHOT=1 cargo test --test main -- server::console
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/target/console.png");
    std::fs::write(target, &png).unwrap();
    if std::env::var_os("WALTAP_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/console.png"),
            &png,
        )
        .unwrap();
    }

    // On a phone nothing is wider than the screen: tables become cards.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
    )
    .await;
    b.until(
        "the phone layout",
        "getComputedStyle(document.querySelector('#streams thead')).display === 'none'",
    )
    .await;
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true),
        "the page is wider than a phone"
    );
    b.call("Emulation.clearDeviceMetricsOverride", json!({}))
        .await;

    // A restart: the page notices, keeps polling, and shows the new process's figures.
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();
    drop(subscription);
    let addr = s.url.trim_start_matches("http://").to_owned();
    let source = s.source.clone();
    s.stop().await;
    b.until(
        "the page to notice the server is gone",
        "document.getElementById('conn').dataset.state === 'offline'",
    )
    .await;
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let s = serve_on(&db, listener, source, |_| {}).await;
    b.until(
        "the page to reconnect",
        "document.getElementById('conn').dataset.state === 'live' && document.getElementById('notice').textContent.includes('restarted')",
    )
    .await;
    b.until(
        "the stream after the restart",
        "!!document.querySelector('tr[data-stream=billing]')",
    )
    .await;
    drop(b);
    s.stop().await;
    db.teardown().await;
}
