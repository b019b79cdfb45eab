//! `cargo run --release --example sse_fanout -- [--clients 1000] [--events 100000]`
//!
//! Many narrow subscribers over HTTP, as an application that gives each of its users a
//! subscription: one `waltap serve` (the release binary, a process of its own so that its
//! CPU and memory are its own) on a throwaway local PostgreSQL, `--clients` SSE clients,
//! client `k` subscribed with `{"create": {"tenant": k}}`. Then `--events` rows are
//! inserted (transactions of 1,000, tenants in turn), so each client is owed
//! `events / clients` of them, and the run ends when every client has exactly its own.
//!
//! Reports events/s delivered (first insert to the last client's last event), the server's
//! CPU per delivered event, and the server's memory per idle subscriber (its RSS with the
//! clients connected and nothing written, minus before they connected, per client).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use futures::StreamExt;
use waltap::dev::bench::measure::{clock_ticks_per_sec, cpu_ticks, rss_kib, Proc};
use waltap::SourceConfig;

#[path = "support/serve.rs"]
mod serve;
use serve::{open_sse, KEY};

#[derive(Debug, Parser)]
struct Args {
    /// SSE clients, each with its own tenant.
    #[arg(long, default_value_t = 1000)]
    clients: u64,
    /// Rows inserted (a multiple of `--clients`).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// The waltap binary to run (default: built with cargo in release).
    #[arg(long)]
    waltap_bin: Option<std::path::PathBuf>,
}

const TABLE: &str = "tenant_rows";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.clients > 0 && args.events % args.clients == 0,
        "--events must be a multiple of --clients"
    );
    let bin = match &args.waltap_bin {
        Some(b) => b.clone(),
        None => waltap::dev::bench::build_waltap(true)?,
    };
    let needed = 2 * args.clients + 200;
    let limit = open_files_limit().unwrap_or(u64::MAX);
    anyhow::ensure!(
        limit >= needed,
        "{} clients need about {needed} open files in this process and in the server; \
         the limit is {limit} (raise it with `ulimit -n {needed}`)",
        args.clients
    );
    let pg = serve::start_pg().await?;
    let result = run(&pg, &args, &bin).await;
    serve::stop_pg(pg).await;
    result
}

/// The soft limit on open files of this process (its children inherit it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The server process, stopped when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(
    pg: &waltap::dev::localpg::LocalPg,
    args: &Args,
    bin: &std::path::Path,
) -> anyhow::Result<()> {
    let url = pg.url("postgres");
    let db = SourceConfig::parse(&url)?.connect_sql().await?;
    db.batch_execute(&format!(
        "CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, tenant int4 NOT NULL, note text NOT NULL)"
    ))
    .await?;
    let dir = std::env::temp_dir().join(format!("waltap-sse-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!("[[key]]\nsecret = \"{KEY}\"\ntables = [\"*\"]\nstreams = true\n"),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let connections = (args.clients + 100).to_string();
    let server = Child(
        std::process::Command::new(bin)
            .args([
                "serve",
                "--database-url",
                &url,
                "--slot",
                "fanout",
                "--publication",
                "fanout",
            ])
            .args(["-t", TABLE, "--listen", &format!("127.0.0.1:{port}")])
            .arg("--keys-file")
            .arg(&keys)
            .args(["--max-connections", &connections])
            .args(["--max-connections-per-key", &connections])
            .args(["--subscriber-queue", &args.events.to_string()])
            .env("WALTAP_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.log"))?)
            .spawn()
            .context("starting waltap serve")?,
    );
    let pid = server.0.id();
    let http = reqwest::Client::builder().build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One subscription first, so that what the server holds for any subscriber (the hub's
    // task, the catalog's connections) is in the "before" figure.
    let warm = open_sse(&http, &base, &[("table", TABLE)]).await?;
    let rss_before = rss_kib(Proc::Pid(pid)).ok_or_else(|| anyhow!("no RSS for the server"))?;

    let opening = Instant::now();
    let each = args.events / args.clients;
    let delivered = Arc::new(AtomicU64::new(0));
    let mut bodies = Vec::with_capacity(args.clients as usize);
    let opened = futures::stream::iter(0..args.clients)
        .map(|k| {
            let filter = format!("{{\"create\": {{\"tenant\": {k}}}}}");
            let (http, base) = (http.clone(), base.clone());
            async move { open_sse(&http, &base, &[("table", TABLE), ("filter", &filter)]).await }
        })
        .buffered(32);
    futures::pin_mut!(opened);
    while let Some(body) = opened.next().await {
        bodies.push(body?);
    }
    let open_secs = opening.elapsed().as_secs_f64();
    let rss_after = rss_kib(Proc::Pid(pid)).ok_or_else(|| anyhow!("no RSS for the server"))?;

    let mut tasks = Vec::with_capacity(bodies.len());
    for mut body in bodies {
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            const MARK: &[u8] = b"event: change\n";
            let mut got = 0u64;
            let mut carry: Vec<u8> = Vec::new();
            while got < each {
                let Some(Ok(chunk)) = body.next().await else {
                    break;
                };
                carry.extend_from_slice(&chunk);
                let found = carry.windows(MARK.len()).filter(|w| *w == MARK).count() as u64;
                got += found;
                delivered.fetch_add(found, Ordering::Relaxed);
                let keep = carry.len().saturating_sub(MARK.len() - 1);
                carry.drain(..keep);
            }
            (got, Instant::now())
        }));
    }
    let cpu_before = cpu_ticks(Proc::Pid(pid));
    let start = Instant::now();
    let mut written = 0;
    while written < args.events {
        let n = (args.events - written).min(1000) as i64;
        db.execute(
            &format!(
                "INSERT INTO {TABLE} (tenant, note)
                 SELECT (($1::int8 + g) % $2::int8)::int4, 'row ' || ($1::int8 + g)
                 FROM generate_series(0, $3::int8 - 1) AS g"
            ),
            &[&(written as i64), &(args.clients as i64), &n],
        )
        .await?;
        written += n as u64;
    }
    let mut last = start;
    let mut short = 0;
    for t in tasks {
        let (got, at) = tokio::time::timeout(Duration::from_secs(600), t)
            .await
            .map_err(|_| anyhow!("not every client received its events within 600 s"))??;
        if got != each {
            short += 1;
        }
        last = last.max(at);
    }
    let secs = last.duration_since(start).as_secs_f64();
    let cpu_secs = cpu_before
        .zip(cpu_ticks(Proc::Pid(pid)))
        .map(|(b, a)| a.saturating_sub(b) as f64 / clock_ticks_per_sec() as f64);
    drop(warm);
    anyhow::ensure!(
        short == 0,
        "{short} of {} clients did not receive exactly their {each} events (the server's log: {})",
        args.clients,
        dir.join("server.log").display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    let total = delivered.load(Ordering::Relaxed);
    println!("| SSE clients | events each | delivered | seconds | events/s delivered | server CPU µs/event | server KiB per idle subscriber | opening s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {each} | {total} | {secs:.2} | {:.0} | {} | {:.1} | {open_secs:.1} |",
        args.clients,
        total as f64 / secs,
        cpu_secs.map_or("–".into(), |c| format!("{:.1}", c * 1e6 / total as f64)),
        rss_after.saturating_sub(rss_before) as f64 / args.clients as f64,
    );
    Ok(())
}
