//! `cargo run --release --example sse_bench -- [--events 20000] [--clients 1,100] [--latency-secs 10]`
//!
//! What the HTTP API adds on top of the in-process hub, on a throwaway local PostgreSQL:
//!
//! - throughput: `--events` single-row inserts (transactions of 1000) delivered to N SSE
//!   subscribers of `waltap serve` (in-process, over loopback HTTP); events/s per client
//!   and in total, from the first commit to the last client holding the last event;
//! - latency at `--latency-rate` single-row commits/s: commit (`clock_timestamp()` in the
//!   row) to arrival, for one in-process `Hub` subscriber and one SSE client at the same
//!   time on the same writes; the difference is what SSE adds.
//!
//! Results go to stdout as Markdown (see docs/benchmarks.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Parser;
use futures::StreamExt;
use waltap::dev::bench::measure::{find_timestamp, now_unix_micros, percentile};
use waltap::dev::bench::workload::{self, LATENCY_TABLE};
use waltap::dev::localpg::LocalPg;
use waltap::SourceConfig;
use waltap::Value;
use waltap::{Hub, HubConfig, ListenerConfig, SubscriptionItem};

#[path = "support/serve.rs"]
mod serve;
use serve::{open_sse, Server};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pg = serve::start_pg().await?;
    let result = run(&pg, &args).await;
    serve::stop_pg(pg).await;
    result
}

async fn run(pg: &LocalPg, args: &Args) -> anyhow::Result<()> {
    let url = pg.url("postgres");
    let source = SourceConfig::parse(&url)?;
    let admin = source.connect_sql().await?;
    admin
        .batch_execute(&workload::create_latency_table_sql())
        .await?;
    let mut listener = ListenerConfig::new(source.clone());
    listener.slot = "sse_bench".into();
    listener.publication = "sse_bench".into();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let server = Server::start(listener.clone(), &http, 100_000).await?;
    let base = server.base.clone();

    println!("| SSE clients | events each | seconds | events/s per client | events/s delivered |");
    println!("|---|---|---|---|---|");
    for &n in &args.clients {
        let (eps, total, secs) = throughput(&http, &base, &admin, n, args.events).await?;
        println!(
            "| {n} | {} | {secs:.2} | {eps:.0} | {total:.0} |",
            args.events
        );
    }

    println!("\n| consumer | commits | commits/s | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    let mut hub_listener = listener;
    hub_listener.slot = "sse_bench_hub".into();
    hub_listener.temporary_slot = true;
    let hub = Hub::start(HubConfig::new(hub_listener)).await?;
    let mut direct = hub.subscribe(LATENCY_TABLE, None).await?;
    direct.next().await; // initialized
    let mut sse = open_sse(&http, &base, &[("table", LATENCY_TABLE)]).await?;
    let direct_ms = Arc::new(Mutex::new(Vec::new()));
    let sse_ms = Arc::new(Mutex::new(Vec::new()));
    let d = direct_ms.clone();
    let direct_task = tokio::spawn(async move {
        while let Some(Ok(SubscriptionItem::Event(ev))) = direct.next().await {
            if let Some(Value::Timestamptz(at)) = ev.after().and_then(|r| r.get("at")) {
                record(&d, at.as_str());
            }
        }
    });
    let s = sse_ms.clone();
    let sse_task = tokio::spawn(async move {
        let mut buf = String::new();
        while let Some(Ok(chunk)) = sse.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                if frame.contains("event: change") {
                    // The row's `at` is the first timestamp of the frame.
                    record(&s, &frame);
                }
            }
        }
    });
    let writer = source.connect_sql().await?;
    let paced = workload::write_paced(
        &writer,
        args.latency_rate,
        Duration::from_secs_f64(args.latency_secs),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (direct_ms.lock().map(|v| v.len()).unwrap_or(0) as u64) < paced.rows
        || (sse_ms.lock().map(|v| v.len()).unwrap_or(0) as u64) < paced.rows
    {
        anyhow::ensure!(Instant::now() < deadline, "not every commit arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, ms) in [
        ("in-process Hub subscription", &direct_ms),
        ("SSE /v1/subscribe (HTTP, loopback)", &sse_ms),
    ] {
        let mut v = ms.lock().map_err(|_| anyhow!("poisoned"))?.clone();
        v.sort_by(f64::total_cmp);
        let p = |q| percentile(&v, q).map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "| {name} | {} | {:.0} | {} | {} | {} | {} |",
            paced.rows,
            paced.rows as f64 / paced.secs,
            p(50.0),
            p(90.0),
            p(99.0),
            p(100.0)
        );
    }
    direct_task.abort();
    sse_task.abort();
    hub.shutdown().await;
    server.stop().await
}

fn record(into: &Mutex<Vec<f64>>, text: &str) {
    if let Some(us) = find_timestamp(text.as_bytes()) {
        if let Ok(mut v) = into.lock() {
            v.push((now_unix_micros() - us) as f64 / 1000.0);
        }
    }
}

/// `n` SSE clients, then `events` inserts; returns (events/s per client, delivered/s, s).
async fn throughput(
    http: &reqwest::Client,
    base: &str,
    writer: &tokio_postgres::Client,
    n: usize,
    events: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut body = open_sse(http, base, &[("table", LATENCY_TABLE)]).await?;
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = 0u64;
            let mut tail = String::new();
            while got < events {
                let Some(Ok(chunk)) = body.next().await else {
                    break;
                };
                tail.push_str(&String::from_utf8_lossy(&chunk));
                let found = tail.matches("event: change").count() as u64;
                got += found;
                // Keep a partial marker that a chunk boundary may have split.
                let keep = tail.len().saturating_sub(16);
                tail.drain(..tail.floor_char_boundary_compat(keep));
                delivered.fetch_add(found, Ordering::Relaxed);
            }
            Instant::now()
        }));
    }
    let start = Instant::now();
    let mut left = events;
    while left > 0 {
        let batch = left.min(1000) as i64;
        writer
            .execute(
                &format!("INSERT INTO {LATENCY_TABLE} (at) SELECT clock_timestamp() FROM generate_series(1, $1::int8)"),
                &[&batch],
            )
            .await?;
        left -= batch as u64;
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await?);
    }
    let secs = last.duration_since(start).as_secs_f64();
    anyhow::ensure!(
        delivered.load(Ordering::Relaxed) >= events * n as u64,
        "not every event arrived"
    );
    Ok((
        events as f64 / secs,
        (events * n as u64) as f64 / secs,
        secs,
    ))
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorBoundary for String {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}
