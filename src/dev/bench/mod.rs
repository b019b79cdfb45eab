//! The benchmark (`cargo run --release --example bench`): how fast waltap reads a slot,
//! compared with `pg_recvlogical`, on a throwaway local PostgreSQL.
//!
//! This module owns the whole run: it starts a [`LocalPg`], writes the workload, runs each
//! [`Contender`] and writes `report.md` and `report.json` (see [`Report`]) into the output
//! directory. `docs/benchmarks.md` explains the method and the results.
//!
//! Method, in order:
//!
//! 1. Catch-up, once per replica identity (`DEFAULT`, then `FULL`), in a database of its
//!    own: one slot per contender and run is created first, then the workload is written
//!    once, then every run reads its own untouched slot from the start. All runs read
//!    identical WAL, and writing it is never part of a measurement. Runs interleave the
//!    contenders, in an order rotated per run, so drifting machine load is shared.
//! 2. Time to the first event: per child contender and run, a slot of its own with a
//!    small backlog written after all slots exist; from spawning the child to its first
//!    output ([`first_event`]).
//! 3. Latency: per contender, a fresh slot and consumer, then paced single-row commits.
//!
//! Submodules: [`workload`] (SQL), [`contender`] (running and measuring each contender;
//! the appender's contenders in `persisted`),
//! [`measure`] (`/proc`, GNU time, statistics), [`report`] (report and Markdown).

pub mod contender;
pub mod fanout;
pub mod first_event;
mod follower;
pub mod latency;
pub mod measure;
mod persisted;
pub mod report;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use tokio_postgres::Client;

pub use contender::{Contender, Measurement};
pub use latency::Latency;
pub use persisted::{JetStreamCounter, LogCounter};
pub use report::Report;

use crate::dev::localpg::{LocalPg, LocalPgOptions};
use crate::event::rfc3339_micros;
use crate::lsn::pg_now_micros;
use crate::pg::config::SourceConfig;
use crate::pg::quote_ident;
use crate::replication::quote_literal;
use crate::Identity;
use contender::{Slot, Tools};
use first_event::FirstEvent;
use latency::Pacer;
use report::{CatchUp, Machine, NotAvailable, Settings, Versions, Workload};
use workload::Shape;

/// The report files written into [`BenchConfig::out_dir`].
pub const MARKDOWN_FILE: &str = "report.md";
pub const JSON_FILE: &str = "report.json";

const PUBLICATION: &str = "bench_pub";
const IDENTITIES: [Identity; 2] = [Identity::Default, Identity::Full];

/// Paths issue 9 asks about that have no contender yet; the report lists them as absent.
const NOT_YET_AVAILABLE: [(&str, &str); 0] = [];

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Row changes per identity; split by [`Shape::new`].
    pub changes: u64,
    /// Catch-up runs per contender and identity.
    pub runs: usize,
    /// Latency test: commits per second, and for how long.
    pub latency_rate: u32,
    pub latency_duration: Duration,
    pub out_dir: PathBuf,
    /// The `waltap` binary for the `waltap tail` contender; `None` leaves it out.
    pub waltap_bin: Option<PathBuf>,
    pub contenders: Vec<Contender>,
    /// Measure child CPU with GNU time when it is installed (else by polling `/proc`).
    pub use_gnu_time: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            changes: 100_000,
            runs: 5,
            latency_rate: 1000,
            latency_duration: Duration::from_secs(10),
            out_dir: PathBuf::from("bench-results"),
            waltap_bin: None,
            contenders: Contender::ALL.to_vec(),
            use_gnu_time: true,
        }
    }
}

/// Runs the benchmark on a throwaway local PostgreSQL and writes the report files.
pub async fn run(config: &BenchConfig) -> anyhow::Result<Report> {
    let logs = config.out_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    eprintln!("bench: starting a throwaway PostgreSQL");
    let pg = tokio::task::spawn_blocking(|| LocalPg::start(&LocalPgOptions::default()))
        .await?
        .context("cannot start a local PostgreSQL")?;
    let report = run_on(&pg, config, logs).await;
    // pg_ctl stop blocks: keep it off the async workers.
    tokio::task::spawn_blocking(move || drop(pg)).await?;
    let report = report?;
    let write = |name: &str, text: String| {
        let path = config.out_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write(MARKDOWN_FILE, report.to_markdown())?;
    write(JSON_FILE, serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

async fn run_on(pg: &LocalPg, config: &BenchConfig, logs: PathBuf) -> anyhow::Result<Report> {
    let mut machine = Machine::collect();
    let admin = connect(&pg.url("postgres")).await?;
    let recvlogical = Some(pg.bindir().join("pg_recvlogical")).filter(|p| p.is_file());
    let tools = Tools {
        recvlogical,
        waltap_bin: config.waltap_bin.clone(),
        gnu_time: config.use_gnu_time.then(measure::find_gnu_time).flatten(),
        python_psycopg2: contender::find_python_psycopg2(),
        clk_tck: measure::clock_ticks_per_sec(),
        logs,
    };
    let versions = Versions::collect(
        &admin,
        tools.recvlogical.as_deref(),
        tools.waltap_bin.as_deref(),
    )
    .await?;
    let settings = Settings {
        changes: config.changes,
        shape: Shape::new(config.changes),
        inserts_per_tx: workload::INSERTS_PER_TX,
        updates_per_tx: workload::UPDATES_PER_TX,
        deletes_per_tx: workload::DELETES_PER_TX,
        runs: config.runs,
        slots: "all slots of an identity are created before its workload is written once; \
                each run reads its own slot",
        latency_rate: config.latency_rate,
        latency_secs: config.latency_duration.as_secs_f64(),
        client_cpu_source: match &tools.gnu_time {
            Some(t) => format!("GNU time ({})", t.display()),
            None => format!("/proc/<pid>/stat polled every {:?}", contender::POLL),
        },
        clk_tck: tools.clk_tck,
        postgres: report::postgres_settings(&admin).await?,
    };

    let mut not_available: Vec<NotAvailable> = Vec::new();
    let mut contenders = Vec::new();
    for &c in &config.contenders {
        match tools.missing(c) {
            Some(reason) => not_available.push(NotAvailable {
                contender: c.label().into(),
                reason,
            }),
            None => contenders.push(c),
        }
    }
    not_available.extend(NOT_YET_AVAILABLE.map(|(what, why)| NotAvailable {
        contender: what.into(),
        reason: why.into(),
    }));

    let mut workloads = Vec::new();
    let mut catch_up = Vec::new();
    for identity in IDENTITIES {
        let (workload, results) =
            catch_up_phase(pg, &admin, &tools, config, identity, &contenders).await?;
        workloads.push(workload);
        catch_up.extend(results);
    }
    let first_event = first_event_phase(pg, &admin, &tools, config, &contenders).await?;
    let latency = latency_phase(pg, &admin, &tools, config, &contenders).await?;
    machine.load_after = report::load_average();
    Ok(Report {
        generated_at: rfc3339_micros(pg_now_micros()),
        machine,
        versions,
        settings,
        workloads,
        catch_up,
        first_event,
        latency,
        not_available,
    })
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    Ok(SourceConfig::parse(url)?.connect_sql().await?)
}

/// A new database with `table_sql` and a publication of `table`; returns its URL and a
/// connection to it.
async fn create_database(
    pg: &LocalPg,
    admin: &Client,
    name: &str,
    table_sql: &str,
    table: &str,
) -> anyhow::Result<(String, Client)> {
    admin
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
        .await?;
    let url = pg.url(name);
    let client = connect(&url).await?;
    client
        .batch_execute(&format!(
            "{table_sql}; CREATE PUBLICATION {PUBLICATION} FOR TABLE {table}"
        ))
        .await?;
    Ok((url, client))
}

async fn create_slot(client: &Client, name: &str, plugin: &str) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot({}, {})",
            quote_literal(name),
            quote_literal(plugin)
        ))
        .await
        .with_context(|| format!("creating slot {name}"))
}

/// Every (run, contender index) pair: runs in order, the contenders' order rotated per
/// run, so that drifting machine load is shared.
fn rotated(runs: usize, contenders: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..runs).flat_map(move |run| (0..contenders).map(move |i| (run, (i + run) % contenders)))
}

/// Generous: a run that takes this long is broken, not slow.
fn run_timeout(changes: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(changes)
}

async fn catch_up_phase(
    pg: &LocalPg,
    admin: &Client,
    tools: &Tools,
    config: &BenchConfig,
    identity: Identity,
    contenders: &[Contender],
) -> anyhow::Result<(Workload, Vec<CatchUp>)> {
    let id = report::identity_name(identity);
    let (url, client) = create_database(
        pg,
        admin,
        &format!("bench_{id}"),
        &workload::create_table_sql(identity),
        workload::TABLE,
    )
    .await?;
    let slot_name = |c: Contender, run: usize| c.slot_name(&format!("{id}_{run}"));
    let contenders: Vec<Contender> = contenders
        .iter()
        .copied()
        .filter(|c| c.measures_catch_up())
        .collect();
    for (run, i) in rotated(config.runs, contenders.len()) {
        let c = contenders[i];
        create_slot(&client, &slot_name(c, run), c.plugin()).await?;
    }

    eprintln!(
        "bench: writing the {id} workload ({} changes)",
        config.changes
    );
    let wal_start: String = lsn(&client, "pg_current_wal_insert_lsn()").await?;
    let started = Instant::now();
    workload::run(&client, Shape::new(config.changes)).await?;
    let secs = started.elapsed().as_secs_f64();
    let endpos: String = lsn(&client, "pg_current_wal_insert_lsn()").await?;
    let wal_bytes: i64 = client
        .query_one(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::int8",
            &[&endpos, &wal_start],
        )
        .await?
        .get(0);
    // WAL past endpos, from another database so no slot here decodes it: pg_recvlogical
    // exits only once the server reports a position at or past endpos.
    admin
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_marker (at timestamptz);
             INSERT INTO bench_marker VALUES (now())",
        )
        .await?;

    let mut runs: Vec<Vec<Measurement>> = vec![Vec::new(); contenders.len()];
    for (run, i) in rotated(config.runs, contenders.len()) {
        let c = contenders[i];
        let slot = Slot::new(&url, slot_name(c, run), admin, &client);
        let m = contender::catch_up(
            tools,
            c,
            &slot,
            config.changes,
            &endpos,
            run_timeout(config.changes),
        )
        .await
        .with_context(|| format!("{} on identity {id}, run {}", c.key(), run + 1))?;
        eprintln!(
            "bench: {id} run {}/{}: {:<32} {:>9.0} events/s",
            run + 1,
            config.runs,
            c.label(),
            m.events_per_sec()
        );
        runs[i].push(m);
    }
    let results = contenders
        .iter()
        .zip(runs)
        .map(|(&c, runs)| CatchUp::new(identity, c, runs))
        .collect();
    let workload = Workload {
        identity,
        secs,
        wal_bytes,
        endpos,
    };
    Ok((workload, results))
}

async fn lsn(client: &Client, expr: &str) -> anyhow::Result<String> {
    Ok(client
        .query_one(&format!("SELECT ({expr})::text"), &[])
        .await?
        .get(0))
}

/// The child contenders' time to their first event, `config.runs` times each, in rotated
/// order like the catch-up runs.
async fn first_event_phase(
    pg: &LocalPg,
    admin: &Client,
    tools: &Tools,
    config: &BenchConfig,
    contenders: &[Contender],
) -> anyhow::Result<Vec<FirstEvent>> {
    let contenders: Vec<Contender> = contenders
        .iter()
        .copied()
        .filter(|c| c.measures_first_event())
        .collect();
    if contenders.is_empty() {
        return Ok(Vec::new());
    }
    let (url, client) = create_database(
        pg,
        admin,
        "bench_first_event",
        &workload::create_table_sql(Identity::Default),
        workload::TABLE,
    )
    .await?;
    let slot_name = |c: Contender, run: usize| c.slot_name(&format!("first_{run}"));
    for (run, i) in rotated(config.runs, contenders.len()) {
        let c = contenders[i];
        create_slot(&client, &slot_name(c, run), c.plugin()).await?;
    }
    eprintln!(
        "bench: time to the first event ({} changes of backlog)",
        first_event::BACKLOG
    );
    workload::run(&client, Shape::new(first_event::BACKLOG)).await?;
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    for (run, i) in rotated(config.runs, contenders.len()) {
        let c = contenders[i];
        let slot = Slot::new(&url, slot_name(c, run), admin, &client);
        let ms = first_event::first_event(tools, c, &slot)
            .await
            .with_context(|| format!("first event of {}, run {}", c.key(), run + 1))?;
        runs[i].push(ms);
    }
    Ok(contenders
        .iter()
        .zip(runs)
        .map(|(&c, runs)| FirstEvent::new(c, runs))
        .collect())
}

async fn latency_phase(
    pg: &LocalPg,
    admin: &Client,
    tools: &Tools,
    config: &BenchConfig,
    contenders: &[Contender],
) -> anyhow::Result<Vec<Latency>> {
    if config.latency_duration.is_zero() {
        return Ok(Vec::new());
    }
    let (url, writer) = create_database(
        pg,
        admin,
        "bench_latency",
        &workload::create_latency_table_sql(),
        workload::LATENCY_TABLE,
    )
    .await?;
    let pacer = Pacer {
        writer: &writer,
        rate: config.latency_rate,
        duration: config.latency_duration,
    };
    let mut results = Vec::new();
    for &c in contenders.iter().filter(|c| c.measures_latency()) {
        let slot = Slot::new(&url, c.slot_name("latency"), admin, &writer);
        create_slot(&writer, &slot.name, c.plugin()).await?;
        eprintln!(
            "bench: latency of {} ({} commits/s for {:?})",
            c.label(),
            config.latency_rate,
            config.latency_duration
        );
        let latency = latency::latency(tools, c, &slot, &pacer)
            .await
            .with_context(|| format!("latency of {}", c.key()))?;
        results.push(latency);
    }
    Ok(results)
}

/// Builds the `waltap` binary with cargo (release unless `release` is false) and returns
/// its path, so `waltap tail` is measured as the current source builds it.
pub fn build_waltap(release: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--bin",
        "waltap",
        "--message-format=json-render-diagnostics",
    ])
    .arg("--manifest-path")
    .arg(&manifest)
    .stderr(std::process::Stdio::inherit());
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().context("running cargo build")?;
    if !out.status.success() {
        anyhow::bail!("cargo build --bin waltap failed ({})", out.status);
    }
    // Cargo's JSON messages name the executable wherever the target directory is.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["target"]["name"] == "waltap")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo build did not report a waltap executable"))
}
