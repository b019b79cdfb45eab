//! `cargo run --release --example stream_bench -- [--changes 1000000] [--identity full] [--nats]`
//!
//! Named streams reading a backlog over HTTP, next to the rate at which the event log was
//! filled, in one run on a throwaway local PostgreSQL (with `--nats`, the event log is a
//! JetStream stream on a `nats-server` of its own):
//!
//! 1. `waltap serve` (in-process, its pipeline filling the event log as in production)
//!    starts once to make the slot and the log, and two streams on the benchmark's table
//!    are created; the server stops.
//! 2. The benchmark's workload (`--changes` row changes: 1,000-row inserts, single-row
//!    updates, 100-row deletes; see docs/benchmarks.md) is written while no server runs.
//! 3. **append**: the server starts again and catches up; timed from its start until the
//!    log holds every change.
//! 4. **feed**: one client reads the first stream from its start with
//!    `GET /v1/streams/NAME/events?limit=1000&cursor=...` (each page's cursor acknowledges
//!    the page before), parsing every page.
//! 5. **SSE**: one client reads the second stream with `GET /v1/streams/NAME` as
//!    `text/event-stream`, counting `change` frames.
//!
//! Each step reports events/s, the ratio to the append rate and the CPU of this process
//! (server and client together) per event. Results go to stdout as Markdown.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use futures::StreamExt;
use waltap::dev::bench::measure::{clock_ticks_per_sec, cpu_ticks, Proc};
use waltap::dev::bench::workload::{self, Shape, TABLE};
use waltap::dev::bench::{JetStreamCounter, LogCounter};
use waltap::dev::localpg::LocalPg;
use waltap::dev::nats::NatsServer;
use waltap::log::append::AppenderConfig;
use waltap::log::jetstream::JetStreamConfig;
use waltap::{Identity, ListenerConfig, SourceConfig};

#[path = "support/serve.rs"]
mod serve;
use serve::{Server, KEY};

#[derive(Debug, Parser)]
struct Args {
    /// Row changes in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    changes: u64,
    /// The table's replica identity: `default` or `full`.
    #[arg(long, default_value = "default")]
    identity: String,
    /// Events per feed page (the server's largest is 1,000).
    #[arg(long, default_value_t = 1000)]
    page: usize,
    /// The event log on JetStream: starts `nats-server` (from PATH) in a temporary
    /// directory for the run.
    #[arg(long)]
    nats: bool,
}

/// How many events the log holds.
enum Counter<'a> {
    Postgres(LogCounter<'a>),
    JetStream(JetStreamCounter),
}

impl Counter<'_> {
    async fn count(&self) -> u64 {
        match self {
            Counter::Postgres(c) => c.count().await,
            Counter::JetStream(c) => c.count().await,
        }
    }
}

const SLOT: &str = "stream_bench";
/// Longest any one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(1800);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pg = serve::start_pg().await?;
    let result = run(&pg, &args).await;
    serve::stop_pg(pg).await;
    result
}

/// Wall time and this process's CPU over one step.
struct Step {
    name: &'static str,
    secs: f64,
    cpu_secs: Option<f64>,
}

async fn timed<F: std::future::Future<Output = anyhow::Result<()>>>(
    name: &'static str,
    work: F,
) -> anyhow::Result<Step> {
    eprintln!("stream_bench: {name}");
    let cpu = cpu_ticks(Proc::This);
    let start = Instant::now();
    tokio::time::timeout(STEP_TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("{name} did not end within {STEP_TIMEOUT:?}"))??;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = cpu
        .zip(cpu_ticks(Proc::This))
        .map(|(before, after)| after.saturating_sub(before) as f64 / clock_ticks_per_sec() as f64);
    Ok(Step {
        name,
        secs,
        cpu_secs,
    })
}

async fn run(pg: &LocalPg, args: &Args) -> anyhow::Result<()> {
    let identity = match args.identity.as_str() {
        "default" => Identity::Default,
        "full" => Identity::Full,
        other => anyhow::bail!("--identity is `default` or `full`, not `{other}`"),
    };
    let url = pg.url("postgres");
    let source = SourceConfig::parse(&url)?;
    let db = source.connect_sql().await?;
    db.batch_execute(&workload::create_table_sql(identity))
        .await?;
    let mut listener = ListenerConfig::new(source.clone());
    listener.slot = SLOT.into();
    listener.publication = SLOT.into();
    let mut appender = AppenderConfig::new(listener);
    let nats_dir = std::env::temp_dir().join(format!("waltap-stream-bench-{}", std::process::id()));
    let nats = if args.nats {
        let _ = std::fs::remove_dir_all(&nats_dir);
        let server = NatsServer::start(&nats_dir).await?;
        appender.jetstream = Some(JetStreamConfig::parse(&server.url())?);
        Some(server)
    } else {
        None
    };
    let http = reqwest::Client::builder().build()?;

    let server = Server::start_with(appender.clone(), &http, 100_000).await?;
    for name in ["feed", "sse"] {
        let r = http
            .post(format!("{}/v1/streams", server.base))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"name": name, "table": TABLE}))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "creating stream {name}: {}",
            r.text().await?
        );
    }
    server.stop().await?;

    let shape = Shape::new(args.changes);
    let events = shape.changes();
    let writing = Instant::now();
    workload::run(&db, shape).await?;
    eprintln!(
        "stream_bench: wrote {events} changes in {:.1} s",
        writing.elapsed().as_secs_f64()
    );

    let counter = match (&nats, &appender.jetstream) {
        (Some(n), Some(config)) => {
            Counter::JetStream(JetStreamCounter::connect(&n.url(), config.stream.clone()).await?)
        }
        _ => Counter::Postgres(LogCounter::new(&db, SLOT)),
    };
    let mut server = None;
    let append = timed("append: `waltap serve` fills the event log", async {
        server = Some(Server::start_with(appender.clone(), &http, 100_000).await?);
        while counter.count().await < events {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await?;
    let server = server.context("the server did not start")?;
    let feed = timed(
        "feed: GET /v1/streams/NAME/events",
        read_feed(&http, &server.base, events, args.page),
    )
    .await?;
    let sse = timed(
        "SSE: GET /v1/streams/NAME",
        read_sse(&http, &server.base, events),
    )
    .await?;
    server.stop().await?;
    drop(nats);
    let _ = std::fs::remove_dir_all(&nats_dir);

    println!(
        "{events} changes, REPLICA IDENTITY {}, event log {}\n",
        args.identity.to_uppercase(),
        if args.nats {
            "on JetStream"
        } else {
            "in Postgres"
        }
    );
    println!("| step | seconds | events/s | × append | process CPU µs/event |");
    println!("|---|---:|---:|---:|---:|");
    let append_rate = events as f64 / append.secs;
    for step in [&append, &feed, &sse] {
        let rate = events as f64 / step.secs;
        println!(
            "| {} | {:.2} | {rate:.0} | {:.2}× | {} |",
            step.name,
            step.secs,
            rate / append_rate,
            step.cpu_secs
                .map_or("–".into(), |c| format!("{:.2}", c * 1e6 / events as f64)),
        );
    }
    Ok(())
}

/// A feed page: its items (changes, and markers, which carry a `type`) and the cursor
/// after them.
#[derive(serde::Deserialize)]
struct Page {
    events: Vec<Item>,
    cursor: String,
}

#[derive(serde::Deserialize)]
struct Item {
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn read_feed(
    http: &reqwest::Client,
    base: &str,
    events: u64,
    page: usize,
) -> anyhow::Result<()> {
    let (mut seen, mut pages) = (0u64, 0u64);
    let mut cursor: Option<String> = None;
    while seen < events {
        pages += 1;
        let mut request = http
            .get(format!("{base}/v1/streams/feed/events"))
            .bearer_auth(KEY)
            .query(&[("limit", page.to_string()), ("wait", "5".into())]);
        if let Some(c) = &cursor {
            request = request.query(&[("cursor", c)]);
        }
        let r = request.send().await?;
        anyhow::ensure!(r.status() == 200, "feed: {}", r.text().await?);
        let body: Page = serde_json::from_slice(&r.bytes().await?)?;
        anyhow::ensure!(
            !body.events.is_empty(),
            "the feed ran dry after {seen} of {events} events"
        );
        seen += body.events.iter().filter(|i| i.kind.is_none()).count() as u64;
        cursor = Some(body.cursor);
    }
    anyhow::ensure!(seen == events, "the feed gave {seen} events, not {events}");
    eprintln!(
        "stream_bench: the feed took {pages} requests, {:.0} events each",
        events as f64 / pages as f64
    );
    Ok(())
}

async fn read_sse(http: &reqwest::Client, base: &str, events: u64) -> anyhow::Result<()> {
    const MARK: &[u8] = b"event: change\n";
    let r = http
        .get(format!("{base}/v1/streams/sse"))
        .bearer_auth(KEY)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "SSE: {}", r.text().await?);
    let mut body = r.bytes_stream();
    let mut seen = 0u64;
    // The end of the previous chunk, in case a marker was split between two chunks.
    let mut carry: Vec<u8> = Vec::with_capacity(64 * 1024);
    while seen < events {
        let chunk = body
            .next()
            .await
            .with_context(|| format!("the SSE stream ended after {seen} of {events} events"))??;
        carry.extend_from_slice(&chunk);
        seen += carry.windows(MARK.len()).filter(|w| *w == MARK).count() as u64;
        let keep = carry.len().saturating_sub(MARK.len() - 1);
        carry.drain(..keep);
    }
    anyhow::ensure!(seen == events, "SSE gave {seen} events, not {events}");
    Ok(())
}
