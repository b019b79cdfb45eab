// Each benchmark uses part of this module.
#![allow(dead_code)]

//! Shared by the HTTP benchmarks: a throwaway PostgreSQL, and `waltap serve` in-process on
//! a loopback port with one key that may read every table and stream.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use waltap::dev::localpg::{LocalPg, LocalPgOptions};
use waltap::log::append::AppenderConfig;
use waltap::server::{Keys, ServerConfig};
use waltap::ListenerConfig;

/// Starts a throwaway local PostgreSQL (in a blocking task: it waits for the server).
pub async fn start_pg() -> anyhow::Result<LocalPg> {
    tokio::task::spawn_blocking(|| LocalPg::start(&LocalPgOptions::default()))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot start a local PostgreSQL: {e}"))
}

/// Stops and removes it.
pub async fn stop_pg(pg: LocalPg) {
    let _ = tokio::task::spawn_blocking(move || drop(pg)).await;
}

/// The benchmarks' API key.
pub const KEY: &str = "bench-key";

/// Opens `GET /v1/subscribe` with `query` (encoded here) as SSE and reads up to its
/// `initialized` frame: from there on every commit is delivered. Returns the rest of the
/// body.
pub async fn open_sse(
    http: &reqwest::Client,
    base: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>> {
    use anyhow::Context as _;
    use futures::StreamExt as _;
    let r = http
        .get(format!("{base}/v1/subscribe"))
        .query(query)
        .bearer_auth(KEY)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "subscribe: {}", r.status());
    let mut body = r.bytes_stream().boxed();
    let mut seen = String::new();
    while !seen.contains("event: initialized") {
        let chunk = body.next().await.context("stream ended")??;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(body)
}

/// A running in-process server.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), waltap::server::ServerError>>,
}

impl Server {
    /// Starts a server reading `listener`'s slot (its pipeline fills the Postgres event log,
    /// as in production) and waits until `/healthz` answers 200.
    pub async fn start(
        listener: ListenerConfig,
        http: &reqwest::Client,
        subscriber_queue: usize,
    ) -> anyhow::Result<Server> {
        Self::start_with(AppenderConfig::new(listener), http, subscriber_queue).await
    }

    /// As [`Server::start`], with the pipeline's whole configuration (e.g. a JetStream log).
    pub async fn start_with(
        appender: AppenderConfig,
        http: &reqwest::Client,
        subscriber_queue: usize,
    ) -> anyhow::Result<Server> {
        let keys = Keys::from_toml(
            &format!("[[key]]\nsecret = \"{KEY}\"\ntables = [\"*\"]\nstreams = true"),
            Some("bench"),
        )?;
        let mut config = ServerConfig::new(appender, keys);
        config.subscriber_queue = subscriber_queue;
        config.limits.connections_per_key = 10_000;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", tcp.local_addr()?);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(waltap::app::serve(config, tcp, cancel.clone()));
        let server = Server { base, cancel, task };
        server.wait_healthy(http).await?;
        Ok(server)
    }

    async fn wait_healthy(&self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http
                .get(format!("{}/healthz", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return Ok(());
            }
            anyhow::ensure!(
                !self.task.is_finished() && Instant::now() < deadline,
                "the server did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server and waits until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await??;
        Ok(())
    }
}
