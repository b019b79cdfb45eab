//! `waltap serve` over real HTTP against a real Postgres: the server runs in-process on an
//! ephemeral port (`waltap::app::serve`), except in `process`, which runs the binary.

mod api;
mod bounds;
mod browser;
mod clients;
mod complete;
mod console;
pub(crate) mod delivery;
mod example;
mod hardening;
mod initial;
mod process;

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value as Json};
use tokio_util::sync::CancellationToken;
use waltap::log::append::AppenderConfig;
use waltap::server::Keys;
use waltap::server::{ServerConfig, ServerError};

use crate::support::{listen, wait_for, TestDb};

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Every table; streams.
pub const ADMIN: &str = "admin-key-0123";
/// Only `public.orders`; streams.
pub const ORDERS: &str = "orders-key-4567";
/// Only `public.users`; no streams.
pub const USERS: &str = "users-key-89ab";

pub const KEYS: &str = r#"
token_secret = "test-token-secret"
[[key]]
secret = "admin-key-0123"
tables = ["*"]
streams = true
[[key]]
secret = "orders-key-4567"
tables = ["public.orders"]
streams = true
[[key]]
secret = "users-key-89ab"
tables = ["public.users"]
"#;

pub const DDL: &str = "CREATE TABLE orders (id int PRIMARY KEY, status text, note text);
     ALTER TABLE orders REPLICA IDENTITY FULL;
     CREATE TABLE users (id int PRIMARY KEY, plan text);";

/// A server for one test database.
pub struct Server {
    pub url: String,
    /// Its slot and publication.
    pub source: waltap::ListenerConfig,
    pub http: reqwest::Client,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// Creates the tables, the publication and the slot (so every later commit reaches the
/// log), then starts the server and waits until it is healthy.
pub async fn start(db: &TestDb, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    db.client().await.batch_execute(DDL).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(db, listener, listen::config(db, &[]), tweak).await
}

/// As [`start`], on `listener` with `source` (the `source` of a server stopped before:
/// a restart).
pub async fn serve_on(
    db: &TestDb,
    listener: tokio::net::TcpListener,
    source: waltap::ListenerConfig,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Server {
    let mut appender = AppenderConfig::new(source.clone());
    appender.max_batch_delay = Duration::from_millis(20);
    listen::prepare_slot(db, &appender.listener).await;
    let keys = Keys::from_toml(KEYS, None).unwrap();
    let mut config = ServerConfig::new(appender, keys);
    tweak(&mut config);
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(waltap::app::serve(config, listener, cancel.clone()));
    let server = Server {
        url,
        source,
        http: reqwest::Client::new(),

        cancel,
        task,
    };
    wait_for("the server to be healthy", TIMEOUT, || async {
        assert!(!server.task.is_finished(), "the server stopped");
        server
            .http
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    server
}

impl Server {
    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
    }

    pub fn post(&self, path: &str, key: &str, body: Json) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(&body)
    }

    /// The JSON answer to `GET path` with `key`, whatever its status.
    pub async fn get_json(&self, path: &str, key: &str) -> Json {
        self.get(path, key)
            .header("accept", "application/json")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A stream's description, as the admin sees it.
    pub async fn stream_info(&self, name: &str) -> Json {
        self.get_json(&format!("/v1/streams/{name}"), ADMIN).await
    }

    /// Waits until no consumer holds stream `name` (a closed connection releases its lease
    /// in the background).
    pub async fn lease_free(&self, name: &str) {
        wait_for("the stream's lease to be released", TIMEOUT, || async {
            self.stream_info(name).await["lease"].is_null()
        })
        .await;
    }

    /// Makes a stream as the admin key.
    pub async fn create_stream(&self, name: &str, table: &str, filter: Option<Json>) {
        let mut body = json!({"name": name, "table": table});
        if let Some(f) = filter {
            body["filter"] = f;
        }
        let r = self.post("/v1/streams", ADMIN, body).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    /// A token from `key` for `body` (`{table, filter}` or `{stream}`).
    pub async fn token(&self, key: &str, body: Json) -> String {
        let r = self.post("/v1/tokens", key, body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Json>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Stops the server as SIGTERM would and checks it ended without error.
    pub async fn stop(self) {
        self.cancel.cancel();
        match tokio::time::timeout(TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("the server did not stop cleanly: {other:?}"),
        }
    }
}

/// Sends a request that must fail with `status`; returns the error's code.
pub async fn error_code(req: reqwest::RequestBuilder, status: u16) -> String {
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), status, "unexpected status");
    let body: Json = r.json().await.unwrap();
    body["error"]["code"].as_str().unwrap().to_owned()
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: Option<String>,
    pub event: String,
    pub data: Json,
}

/// Reads Server-Sent Events from a response, skipping comments (keepalives).
pub struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    /// Opens `path` as an event stream, checking the status.
    pub async fn open(req: reqwest::RequestBuilder) -> Sse {
        let r = req
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        Sse::new(r)
    }

    pub fn new(r: reqwest::Response) -> Sse {
        Sse {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next frame, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut frame = Frame {
                    id: None,
                    event: "message".into(),
                    data: Json::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        frame.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        frame.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment: keepalive
                }
                frame.data = serde_json::from_str(&data).unwrap();
                return Some(frame);
            }
            match tokio::time::timeout(TIMEOUT, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(Some(Err(_))) | Ok(None) => return None,
                Err(_) => panic!("no SSE frame within {TIMEOUT:?}"),
            }
        }
    }

    /// The next frame, which must be of `event` type.
    pub async fn expect(&mut self, event: &str) -> Frame {
        let f = self.next().await.expect("the stream ended early");
        assert_eq!(f.event, event, "unexpected frame {f:?}");
        f
    }

    /// The next `n` change frames.
    pub async fn changes(&mut self, n: usize) -> Vec<Frame> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.expect("change").await);
        }
        out
    }
}

/// `INSERT INTO orders` of ids `from..to`, one transaction each.
pub async fn insert_orders(db: &TestDb, ids: std::ops::Range<i32>) {
    let c = db.client().await;
    for id in ids {
        c.execute("INSERT INTO orders VALUES ($1, 'new', NULL)", &[&id])
            .await
            .unwrap();
    }
}

/// The ids of change frames' rows.
pub fn ids(frames: &[Frame]) -> Vec<i64> {
    frames
        .iter()
        .map(|f| f.data["created"]["id"].as_i64().unwrap())
        .collect()
}

/// Retention as if every event of `source` were an hour old: deletes them all, so that
/// streams that had not acknowledged them get `stale_cursor`. Returns how many it deleted.
pub async fn expire_log(store: &mut tokio_postgres::Client, source: &str) -> u64 {
    store
        .execute(
            "UPDATE waltap.events SET appended_at = now() - interval '1 hour' WHERE source = $1",
            &[&source],
        )
        .await
        .unwrap();
    waltap::log::retention::prune(store, source, Some(Duration::from_secs(1800)), None)
        .await
        .unwrap()
        .events
}
