//! The `waltap` command line: flags, environment fallbacks, and one function per command.
//!
//! Data goes to stdout (JSON lines), logs to stderr. What is meant for people (the
//! summaries of `setup` and `status`, the table of `stream list`) is in [`report`], with
//! `--json` for programs; progress lines of long copies ([`progress`]) go to stderr, on a
//! terminal only. Defaults work against the Postgres of
//! `docker compose up` (`postgres://postgres:postgres@localhost:5432/postgres`).

pub mod demo;
mod export;
mod progress;
mod report;
mod stream;
mod types;

use std::io::Write;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use clap::{Args, Parser, Subcommand};
use futures::{FutureExt, StreamExt};

use crate::event::TableName;
use crate::filter::Filter;
use crate::filter::FilteredView;
use crate::pg::config::SourceConfig;
use crate::source::pipeline::{Listener, ListenerConfig};
use crate::source::setup::{self, SetupOptions};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres:postgres@localhost:5432/postgres";

#[derive(Debug, Parser)]
#[command(
    name = "waltap",
    version,
    about = "Postgres change data capture: typed row-change events from a logical replication slot"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print change events live from the slot as JSON lines (no event log).
    Tail(TailArgs),
    /// Create the publication and slot when missing and check every precondition.
    Setup(SetupArgs),
    /// Show the slot's health and lag, what each published table sends, and which
    /// process of the group leads.
    Status(StatusArgs),
    /// The pipeline alone: keep the event log filled from the slot, exactly once.
    Run(RunArgs),
    /// The pipeline plus the HTTP delivery server (subscribe and streams over SSE,
    /// WebSocket and a pull feed).
    Serve(ServeArgs),
    /// Manage and consume persisted streams (named, resumable, at-least-once).
    #[command(subcommand)]
    Stream(stream::StreamCommand),
    /// Print a table's current rows as JSON lines, then the position to continue from.
    Export(export::ExportArgs),
    /// Try waltap in one command: a throwaway local Postgres, sample writes, their events.
    Demo(DemoArgs),
    /// Print row types for the published tables (TypeScript, Python or Rust), following
    /// the JSON form of each column's type.
    Types(types::TypesArgs),
    /// Print the directory of the PostgreSQL server binaries `demo` and the tests use;
    /// with WALTAP_PG=14..18 that version is fetched first (npm) when not cached.
    PgBindir,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Where the event log lives (default: the watched database).
    #[arg(long, env = "WALTAP_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// Fail instead of creating a missing publication or slot.
    #[arg(long)]
    pub no_create: bool,
    /// Delete events appended longer ago than this (e.g. 7d, 12h, 30m).
    #[arg(long, env = "WALTAP_RETENTION_AGE", value_parser = crate::pg::config::parse_duration)]
    pub retention_age: Option<std::time::Duration>,
    /// Delete the oldest events while this source's events take more than this (e.g. 10GB).
    #[arg(long, env = "WALTAP_RETENTION_BYTES", value_parser = crate::pg::config::parse_size)]
    pub retention_bytes: Option<u64>,
    /// How often retention runs.
    #[arg(long, default_value = "1m", value_parser = crate::pg::config::parse_duration)]
    pub retention_interval: std::time::Duration,
    /// Processes on the same slot and store form a group with one leader (README.md,
    /// "High availability"): how long a leader that stopped answering (paused, cut off,
    /// its host gone) keeps leadership. One that exits or is killed hands over at once.
    #[arg(long, env = "WALTAP_TAKEOVER_TIMEOUT", default_value = "5s", value_parser = crate::pg::config::parse_duration)]
    pub takeover_timeout: std::time::Duration,
    /// Create the slot when it is missing although the event log holds changes read from
    /// it (e.g. after a failover to a standby that had no copy of it), accepting that the
    /// changes committed in between are not in the log. Without it, waltap stops.
    #[arg(long)]
    pub accept_slot_gap: bool,
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// Where the event log is when it is on NATS JetStream.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// The event log is a NATS JetStream stream instead of the Postgres event log
    /// (README.md, "The event log on NATS JetStream"): one or more comma-separated server
    /// addresses, e.g. nats://localhost:4222.
    #[arg(long, env = "WALTAP_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// The JetStream stream (created when missing). One source per stream.
    #[arg(long, env = "WALTAP_NATS_STREAM", default_value = "WALTAP")]
    pub nats_stream: String,
    /// Subjects are PREFIX.<schema>.<table>.<action>.
    #[arg(long, env = "WALTAP_NATS_SUBJECT_PREFIX", default_value = "waltap")]
    pub nats_subject_prefix: String,
    /// Replicas of the JetStream stream when waltap creates it (1 to 5).
    #[arg(long, env = "WALTAP_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
}

impl NatsArgs {
    /// The JetStream log these flags name, if any.
    pub(crate) fn config(&self) -> anyhow::Result<Option<crate::log::jetstream::JetStreamConfig>> {
        let Some(urls) = &self.nats_url else {
            return Ok(None);
        };
        Ok(Some(
            crate::log::jetstream::JetStreamConfig::parse(urls)?
                .with_stream(&self.nats_stream)?
                .with_subject_prefix(&self.nats_subject_prefix)?
                .with_replicas(self.nats_replicas)?,
        ))
    }

    /// Where named streams of `source` read their events.
    pub(crate) fn event_log(&self, source: &str) -> anyhow::Result<crate::log::EventLog> {
        Ok(match self.config()? {
            Some(c) => crate::log::EventLog::JetStream(
                crate::log::jetstream::JetStreamReader::new(&c, source),
            ),
            None => crate::log::EventLog::Postgres,
        })
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Where the event log lives (default: the watched database).
    #[arg(long, env = "WALTAP_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Address to listen on.
    #[arg(long, env = "WALTAP_LISTEN", default_value = "127.0.0.1:7373")]
    pub listen: String,
    /// API keys (TOML: `[[key]]` with `secret`, `tables`, `streams`). Without it the keys
    /// come from the environment variable WALTAP_API_KEYS (the same TOML, e.g.
    /// `key = [{secret = "s3cret", tables = ["*"], streams = true}]`).
    #[arg(long, env = "WALTAP_KEYS_FILE")]
    pub keys_file: Option<std::path::PathBuf>,
    /// An origin allowed to call the API from a browser (CORS); repeatable.
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// Open delivery connections allowed per key.
    #[arg(long, default_value_t = 512)]
    pub max_connections_per_key: usize,
    /// Events queued per subscriber before it is cut off with `lagged`.
    #[arg(long, default_value_t = 1024)]
    pub subscriber_queue: usize,
    /// Postgres connections shared by all stream consumers (plus one listening for
    /// appends), however many are connected.
    #[arg(long, default_value_t = crate::log::pool::DEFAULT_POOL_SIZE)]
    pub store_pool_size: usize,
    /// Open HTTP connections in all (a few more are kept for /healthz); keep it under the
    /// open-file limit (ulimit -n).
    #[arg(long, default_value_t = 1000)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's head (and to start the next request on a
    /// kept-alive connection).
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds open requests and connections get to finish at shutdown (SIGTERM).
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace: u64,
}

/// Where to read from.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Postgres connection URL (libpq style; sslmode and sslrootcert are honoured).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// When the database URL is a hot standby (PostgreSQL 16+): its primary, where the
    /// watermarks of initial states are written (README.md, "Reading from a standby").
    #[arg(long, env = "WALTAP_PRIMARY_URL", hide_env_values = true)]
    pub primary_url: Option<String>,
    /// Replication slot name ([a-z0-9_]).
    #[arg(long, env = "WALTAP_SLOT", default_value = "waltap")]
    pub slot: String,
    /// Publication name.
    #[arg(long, env = "WALTAP_PUBLICATION", default_value = "waltap")]
    pub publication: String,
    /// Limit to this table (`schema.table` or `table` for public); repeatable.
    #[arg(long = "table", short = 't')]
    pub tables: Vec<String>,
    /// Create the slot as a failover slot (PostgreSQL 17+), kept in sync on standbys.
    #[arg(long, env = "WALTAP_FAILOVER")]
    pub failover: bool,
    /// Where large transactions streamed before their commit are kept until it arrives
    /// (default: the system temp directory).
    #[arg(long, env = "WALTAP_SPILL_DIR")]
    pub spill_dir: Option<std::path::PathBuf>,
    /// How much of such transactions may stay in memory before going to --spill-dir
    /// (e.g. 16MB).
    #[arg(long, env = "WALTAP_SPILL_MEMORY_LIMIT", default_value = "16MB", value_parser = crate::pg::config::parse_size)]
    pub spill_memory_limit: u64,
}

/// `source` with its primary (`--primary-url`), when one was given.
fn with_primary(source: SourceConfig, primary: Option<&str>) -> anyhow::Result<SourceConfig> {
    Ok(match primary {
        Some(url) => source.with_primary(SourceConfig::parse(url)?),
        None => source,
    })
}

impl SourceArgs {
    fn tables(&self) -> Vec<TableName> {
        self.tables.iter().map(|t| TableName::parse(t)).collect()
    }

    fn source(&self) -> anyhow::Result<SourceConfig> {
        with_primary(
            SourceConfig::parse(&self.database_url)?,
            self.primary_url.as_deref(),
        )
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Exit after this many events (they are confirmed before exiting).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Start from now with a temporary slot that vanishes on exit (nothing is resumed).
    #[arg(long)]
    pub temporary: bool,
    /// Fail instead of creating a missing publication or slot.
    #[arg(long)]
    pub no_create: bool,
    /// Filter as JSON (README.md, "Filters and subscriptions"), e.g.
    /// '{"update": {"after": {"plan": "pro"}}}'; needs exactly one --table. One that pins a
    /// row by its primary key ('{"where": {"id": 3}}') ends with a
    /// `{"type": "completed", ...}` line and exit 0 once the row is gone.
    #[arg(long)]
    pub filter: Option<String>,
    /// First print the table's current rows that match the filter (`"action": "snapshot"`),
    /// then `{"type": "snapshotComplete", ...}`, then the changes after them; needs exactly
    /// one --table. Runs as an ephemeral subscription: events are confirmed as they are
    /// read, and a restart starts over with the current rows.
    #[arg(long)]
    pub initial_state: bool,
    /// No progress line on stderr while the current rows are printed (shown only when
    /// stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Drop the slot and the publication instead (the slot's unread changes are lost).
    #[arg(long)]
    pub drop: bool,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of sample orders to write.
    #[arg(long, default_value_t = 3)]
    pub orders: u32,
}

/// Runs a parsed command line.
impl Cli {
    /// Whether the command runs best on one thread. `tail` is one pipeline: the task that
    /// reads the slot and the loop that prints. On one thread they hand events over
    /// without waking each other across threads (futex and epoll calls, which cost more
    /// CPU per event than decoding did), and the channel fills in batches. The price:
    /// while stdout blocks, status updates wait too; a reader stalled for longer than
    /// `wal_sender_timeout` costs a reconnect, which redelivers nothing already printed.
    pub fn single_threaded(&self) -> bool {
        matches!(self.command, Command::Tail(_))
    }
}

/// The `waltap` program: parses the command line, sets up logging (`WALTAP_LOG`), runs
/// the command on a Tokio runtime and prints an error with its causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let asked = std::env::var("WALTAP_LOG").unwrap_or_default();
    let mut filter = Some(asked.as_str())
        .filter(|a| !a.trim().is_empty())
        .and_then(|a| EnvFilter::try_new(a).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // tokio-postgres logs every statement's parameters (row values, cursors) at debug:
    // kept out of `WALTAP_LOG=debug` unless asked for by name.
    if !asked.contains("tokio_postgres") {
        if let Ok(quiet) = "tokio_postgres=info".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    let mut builder = if cli.single_threaded() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Tail(args) => tail(args).await,
        Command::Setup(args) => setup_cmd(args).await,
        Command::Status(args) => status(args).await,
        Command::Run(args) => run_pipeline(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Stream(cmd) => stream::run(cmd).await,
        Command::Export(args) => export::run(args).await,
        Command::Demo(args) => crate::cli::demo::run(args.orders).await,
        Command::Types(args) => types::run(args).await,
        Command::PgBindir => {
            let dir = tokio::task::spawn_blocking(crate::dev::localpg::find_bindir).await??;
            println!("{}", dir.display());
            Ok(())
        }
    }
}

impl SourceArgs {
    /// A listener configuration for these flags.
    fn listener(&self) -> anyhow::Result<ListenerConfig> {
        let mut config = ListenerConfig::new(self.source()?);
        config.slot = self.slot.clone();
        config.publication = self.publication.clone();
        config.tables = self.tables();
        config.failover_slot = self.failover;
        config.spill = crate::source::spill::SpillConfig {
            dir: self.spill_dir.clone(),
            memory_limit: usize::try_from(self.spill_memory_limit).unwrap_or(usize::MAX),
        };
        Ok(config)
    }
}

impl RunArgs {
    /// The pipeline these flags describe.
    fn appender(&self) -> anyhow::Result<crate::log::append::AppenderConfig> {
        let mut listener = self.source.listener()?;
        listener.create_slot = !self.no_create;
        listener.create_publication = !self.no_create;
        let mut config = crate::log::append::AppenderConfig::new(listener);
        config.accept_slot_gap = self.accept_slot_gap;
        if let Some(url) = &self.store_url {
            config.store = SourceConfig::parse(url)?;
        }
        if let Some(js) = self.nats.config()? {
            if self.retention_age.is_some() || self.retention_bytes.is_some() {
                anyhow::bail!("--retention-age and --retention-bytes apply to the Postgres event log: with --nats-url, set the JetStream stream's own limits (max_age, max_bytes)");
            }
            config.jetstream = Some(js);
        }
        if self.retention_age.is_some() || self.retention_bytes.is_some() {
            config.retention = Some(crate::log::retention::Retention {
                max_age: self.retention_age,
                max_bytes: self.retention_bytes,
                interval: self.retention_interval,
            });
        }
        Ok(config)
    }

    /// How this process joins the group of its slot.
    fn group(&self) -> crate::log::leader::GroupConfig {
        crate::log::leader::GroupConfig {
            takeover_timeout: self.takeover_timeout.max(std::time::Duration::from_secs(1)),
            ..Default::default()
        }
    }
}

/// A token cancelled by Ctrl-C or SIGTERM.
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    cancel
}

async fn run_pipeline(args: RunArgs) -> anyhow::Result<()> {
    let config = args.appender()?;
    let membership = std::sync::Arc::default();
    crate::log::leader::run(config, args.group(), membership, cancel_on_signal()).await?;
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use crate::server::Keys;
    let token_secret = std::env::var("WALTAP_TOKEN_SECRET").ok();
    let keys = match (&args.keys_file, std::env::var("WALTAP_API_KEYS")) {
        (Some(path), _) => Keys::from_file(path, token_secret.as_deref())?,
        (None, Ok(text)) => Keys::from_toml(&text, token_secret.as_deref())?,
        (None, Err(_)) => {
            anyhow::bail!("no API keys: give --keys-file (or WALTAP_KEYS_FILE) or WALTAP_API_KEYS")
        }
    };
    let mut config = crate::server::ServerConfig::new(args.run.appender()?, keys);
    config.group = args.run.group();
    config.cors_origins = args.cors_origins;
    config.limits.connections_per_key = args.max_connections_per_key;
    config.subscriber_queue = args.subscriber_queue;
    config.store_pool_size = args.store_pool_size;
    config.limits.max_connections = args.max_connections;
    config.limits.header_read_timeout = std::time::Duration::from_secs(args.header_timeout.max(1));
    config.shutdown_grace = std::time::Duration::from_secs(args.shutdown_grace);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    // Printed (not only logged) so that a caller that asked for port 0 learns the port.
    eprintln!("listening on {}", listener.local_addr()?);
    crate::app::serve(config, listener, cancel_on_signal()).await?;
    Ok(())
}

async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let mut config = args.source.listener()?;
    config.temporary_slot = args.temporary;
    config.create_slot = !args.no_create;
    config.create_publication = !args.no_create;
    if args.temporary && args.source.slot == "waltap" {
        config.slot = format!("waltap_tmp_{}", std::process::id());
    }
    let filter = parse_filter(args.filter.as_deref())?;
    if args.initial_state {
        let [table] = config.tables.as_slice() else {
            anyhow::bail!("--initial-state needs exactly one --table");
        };
        let estimate = match config.source.connect_sql().await {
            Ok(client) => {
                crate::log::copies::estimate_rows(&client, std::slice::from_ref(table)).await
            }
            Err(_) => None,
        };
        let progress =
            progress::Progress::new(format!("initial state of {table}"), estimate, args.quiet);
        let table = table.to_string();
        let hub = crate::Hub::start(crate::HubConfig::new(config)).await?;
        let options = crate::hub::SubscribeOptions {
            initial_state: true,
        };
        let sub = hub.subscribe_with(&table, filter, options).await?;
        let result = print_items(sub, args.limit, &progress).await;
        hub.shutdown().await;
        return result;
    }
    let view = match filter {
        None => None,
        Some(filter) => {
            let [table] = config.tables.as_slice() else {
                anyhow::bail!("--filter needs exactly one --table");
            };
            let client = config.source.connect_sql().await?;
            let schema = crate::pg::catalog::table_schema(&client, table)
                .await
                .map_err(crate::Error::Sql)?
                .ok_or_else(|| anyhow::anyhow!("table {table} does not exist"))?;
            let compiled = filter
                .compile(&schema)
                .map_err(|e| anyhow::anyhow!("invalid --filter: {e}"))?;
            for w in compiled.warnings() {
                tracing::warn!(table = %table, "{w}");
            }
            Some(FilteredView::new(table.clone(), compiled))
        }
    };
    let listener = Listener::start(config).await?;
    print_events(listener, view, args.limit).await
}

/// Prints events as JSON lines and acknowledges them once stdout has taken them, until the
/// limit, a signal, a closed stdout, or the `completed` line of a view that follows one row.
pub async fn print_events(
    mut listener: Listener,
    mut view: Option<FilteredView>,
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut printed = 0u64;
    let mut shown = Vec::new();
    let mut line = Vec::with_capacity(4096);
    let mut stop = std::pin::pin!(shutdown_signal());
    let mut completed = false;
    let result: anyhow::Result<()> = 'outer: loop {
        if completed || limit.is_some_and(|l| printed >= l) {
            break Ok(());
        }
        let first = tokio::select! {
            biased;
            _ = &mut stop => break Ok(()),
            ev = listener.next() => ev,
        };
        let mut next = first;
        let mut last = None;
        // Write what is ready in one go, then flush and acknowledge once per batch.
        loop {
            match next {
                None => break 'outer Err(anyhow::anyhow!("the listener stopped")),
                Some(Err(e)) => break 'outer Err(e.into()),
                Some(Ok(ev)) => {
                    let mut gone = None;
                    let ready = match view.as_mut() {
                        None => std::slice::from_ref(&ev),
                        Some(v) => {
                            gone = v.push(&ev, &mut shown);
                            shown.as_slice()
                        }
                    };
                    let whole = limit.is_none_or(|l| printed + ready.len() as u64 <= l);
                    for item in ready {
                        if limit.is_some_and(|l| printed >= l) {
                            break;
                        }
                        line.clear();
                        if let Err(e) = item.write_json(&mut line) {
                            break 'outer Err(e.into());
                        }
                        line.push(b'\n');
                        if let Err(e) = out.write_all(&line) {
                            break 'outer stdout_closed(e);
                        }
                        printed += 1;
                        last = Some(item.position);
                    }
                    // Filtered-out events are handled too, unless the limit cut this batch
                    // short: then only what was printed may be confirmed.
                    if limit.is_none_or(|l| printed < l) {
                        last = Some(ev.position);
                    }
                    shown.clear();
                    if let Some(position) = gone.filter(|_| whole) {
                        let reason = crate::CompletionReason::Deleted;
                        let item = crate::SubscriptionItem::Completed { reason, position };
                        if let Err(e) = write_line(&mut out, &item) {
                            break 'outer stdout_closed(e);
                        }
                        last = Some(ev.position);
                        completed = true;
                    }
                }
            }
            if completed || limit.is_some_and(|l| printed >= l) {
                break;
            }
            match listener.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if let Err(e) = out.flush() {
            break stdout_closed(e);
        }
        if let Some(p) = last {
            listener.ack(p);
        }
    };
    drop(out);
    listener.shutdown().await;
    result
}

/// Prints a subscription's items as JSON lines until `limit` change events (control items
/// and snapshot rows do not count), a signal, a closed stdout, an error, or `completed`.
async fn print_items(
    mut sub: crate::Subscription,
    limit: Option<u64>,
    progress: &progress::Progress,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut printed = 0u64;
    let mut stop = std::pin::pin!(shutdown_signal());
    while limit.is_none_or(|l| printed < l) {
        let mut next = tokio::select! {
            biased;
            _ = &mut stop => break,
            item = sub.next() => item,
        };
        loop {
            let item = match next {
                None => anyhow::bail!("the subscription ended"),
                Some(item) => item?,
            };
            if let Err(e) = write_line(&mut out, &item) {
                return stdout_closed(e);
            }
            match item {
                crate::SubscriptionItem::Snapshot(_) => progress.add(1),
                crate::SubscriptionItem::SnapshotComplete { .. } => progress.finish(),
                _ => {}
            }
            if let crate::SubscriptionItem::Completed { .. } = item {
                return out.flush().or_else(stdout_closed);
            }
            if matches!(item, crate::SubscriptionItem::Event(_)) {
                printed += 1;
            }
            if limit.is_some_and(|l| printed >= l) {
                break;
            }
            match sub.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if let Err(e) = out.flush() {
            return stdout_closed(e);
        }
    }
    out.flush().or_else(stdout_closed)
}

/// Writes one item as a JSON line.
fn write_line(out: &mut impl Write, item: &crate::SubscriptionItem) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, item).map_err(std::io::Error::from)?;
    out.write_all(b"\n")
}

/// A `--filter` argument.
fn parse_filter(text: Option<&str>) -> anyhow::Result<Option<Filter>> {
    text.map(str::parse::<Filter>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("invalid --filter: {e}"))
}

fn stdout_closed(e: std::io::Error) -> anyhow::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e.into())
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn setup_cmd(args: SetupArgs) -> anyhow::Result<()> {
    let source = args.source.source()?;
    let client = source.connect_sql().await?;
    if args.drop {
        let dropped = setup::drop_slot(&client, &args.source.slot).await?;
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                crate::pg::quote_ident(&args.source.publication)
            ))
            .await
            .map_err(crate::Error::Sql)?;
        eprintln!(
            "slot {:?} {}; publication {:?} dropped",
            args.source.slot,
            if dropped { "dropped" } else { "did not exist" },
            args.source.publication
        );
        return Ok(());
    }
    print_report(&client, &args.source, true, None, args.json).await
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.source.source()?.connect_sql().await?;
    let store = match &args.store_url {
        Some(url) => Some(SourceConfig::parse(url)?.connect_sql().await?),
        None => None,
    };
    let leader =
        crate::log::leader::current_leader(store.as_ref().unwrap_or(&client), &args.source.slot)
            .await
            .unwrap_or_else(|e| {
                // An event log that does not exist yet (or predates groups) has no leader.
                tracing::debug!(error = %e, "no leader recorded");
                None
            });
    print_report(&client, &args.source, false, Some(leader), args.json).await
}

/// Runs the checks (creating what is missing when `create`) and prints the summary, or
/// with `json` the JSON report (warnings on stderr); `leader`, when given, is the group's
/// (the report's `leader`).
async fn print_report(
    client: &tokio_postgres::Client,
    args: &SourceArgs,
    create: bool,
    leader: Option<Option<crate::log::leader::LeaderInfo>>,
    json: bool,
) -> anyhow::Result<()> {
    let report = setup::prepare(
        client,
        &SetupOptions {
            slot: args.slot.clone(),
            publication: args.publication.clone(),
            tables: args.tables(),
            create_publication: create,
            create_slot: create,
            temporary_slot: false,
            failover_slot: args.failover,
            consumed_through: None,
        },
    )
    .await?;
    if !json {
        print!("{}", report::summary(&report, leader.as_ref()));
        return Ok(());
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let mut report = serde_json::to_value(&report)?;
    if let Some(leader) = leader {
        report["leader"] = serde_json::to_value(leader)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
