//! `waltap stream create|list|delete|reset|tail`: persisted streams from the command line.
//!
//! Management output is JSON on stdout (`list`: a table, or JSON with `--json`); `tail` prints the `initialized` marker, then events,
//! as JSON lines and acknowledges the events once stdout has taken them (at-least-once: a
//! rerun continues after the last acknowledged event).

use std::io::Write;

use clap::{Args, Subcommand};
use futures::{FutureExt, StreamExt};

use super::{shutdown_signal, stdout_closed, DEFAULT_DATABASE_URL};
use crate::log::streams::{self, Cursor, OpenOptions, StreamConsumer, StreamDef, StreamItem};
use crate::pg::config::SourceConfig;

/// Manage and consume persisted streams.
#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Make a stream that delivers the changes appended from now on.
    Create(CreateArgs),
    /// Print the streams as a table (`--json`: as JSON, with their filters): tables,
    /// cursor, backlog, lease, initial state.
    List(ListArgs),
    /// Delete a stream.
    Delete(NameArgs),
    /// Move a stream's cursor to the log head (after a stale_cursor error); with
    /// --initial-state the stream starts over with the current rows.
    Reset(ResetArgs),
    /// Print a stream's events from its cursor as JSON lines (after an `initialized` line
    /// with that cursor), acknowledging what was printed.
    Tail(TailArgs),
}

/// Where the log is, and which source's events.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The watched database (libpq-style URL); also the store unless --store-url is given.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// When the watched database is a hot standby (PostgreSQL 16+): its primary, where the
    /// watermarks of initial states are written.
    #[arg(long, env = "WALTAP_PRIMARY_URL", hide_env_values = true)]
    pub primary_url: Option<String>,
    /// Where the event log lives (default: the watched database).
    #[arg(long, env = "WALTAP_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// The source: the slot `waltap run` appends from.
    #[arg(long, env = "WALTAP_SLOT", default_value = "waltap")]
    pub slot: String,
    #[command(flatten)]
    pub nats: super::NatsArgs,
}

impl StoreArgs {
    /// Where the streams of `--slot` read their events.
    pub(super) fn event_log(&self) -> anyhow::Result<crate::log::EventLog> {
        self.nats.event_log(&self.slot)
    }

    /// The store, and the watched database when it is another one.
    pub(super) fn configs(&self) -> anyhow::Result<(SourceConfig, Option<SourceConfig>)> {
        let watched = super::with_primary(
            SourceConfig::parse(&self.database_url)?,
            self.primary_url.as_deref(),
        )?;
        Ok(match &self.store_url {
            Some(url) if *url != self.database_url => (SourceConfig::parse(url)?, Some(watched)),
            _ => (watched, None),
        })
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// 1 to 128 characters of A-Z a-z 0-9 _ . -
    pub name: String,
    /// A table of the stream (`table` or `schema.table`); repeatable, at least one.
    #[arg(long = "table", short = 't', required = true)]
    pub tables: Vec<String>,
    /// Filter as JSON (README, "Filters and subscriptions"), checked against every table.
    #[arg(long)]
    pub filter: Option<String>,
    /// Start with the rows of the tables that match the filter now (copied from one
    /// snapshot by the first consumer; needs `waltap run` or `serve` filling the log),
    /// then the changes after them.
    #[arg(long, conflicts_with = "from")]
    pub initial_state: bool,
    /// Deliver the changes after this position (such as the one `waltap export` prints)
    /// instead of those appended from now on.
    #[arg(long)]
    pub from: Option<crate::event::Position>,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    pub name: String,
    /// Start over with the current rows (see `create --initial-state`).
    #[arg(long)]
    pub initial_state: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    #[arg(long, env = "WALTAP_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
    /// Only the streams of this source (default: all; with --nats-url, the slot
    /// `waltap run` appends from, default waltap).
    #[arg(long, env = "WALTAP_SLOT")]
    pub slot: Option<String>,
    #[command(flatten)]
    pub nats: super::NatsArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    pub name: String,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    pub name: String,
    /// Exit after this many events (acknowledged before exiting); the `initialized` line
    /// does not count.
    #[arg(long)]
    pub limit: Option<u64>,
    /// How long the stream stays reserved for this consumer without a read or an ack; a
    /// consumer that dies without closing blocks others (stream_busy) for this long.
    #[arg(long, default_value = "30s", value_parser = crate::pg::config::parse_duration)]
    pub lease: std::time::Duration,
    /// No progress line on stderr while the stream's initial state is copied (shown only
    /// when stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub async fn run(cmd: StreamCommand) -> anyhow::Result<()> {
    match cmd {
        StreamCommand::Create(args) => create(args).await,
        StreamCommand::List(args) => {
            let url = args.store_url.as_deref().unwrap_or(&args.database_url);
            let store = SourceConfig::parse(url)?.connect_sql().await?;
            // A JetStream log holds one source: list that one.
            let slot = match (&args.slot, &args.nats.nats_url) {
                (None, Some(_)) => Some("waltap".to_owned()),
                (slot, _) => slot.clone(),
            };
            let log = args.nats.event_log(slot.as_deref().unwrap_or("waltap"))?;
            let all = streams::list(&log, &store, slot.as_deref()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", super::report::stream_table(&all));
            }
            Ok(())
        }
        StreamCommand::Delete(args) => {
            let store = args.store.configs()?.0.connect_sql().await?;
            streams::delete(&store, &args.name).await?;
            eprintln!("stream {:?} deleted", args.name);
            Ok(())
        }
        StreamCommand::Reset(args) => {
            let store = args.store.configs()?.0.connect_sql().await?;
            let log = args.store.event_log()?;
            let info = streams::reset(&log, &store, &args.name, args.initial_state).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        StreamCommand::Tail(args) => tail(args).await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let filter = super::parse_filter(args.filter.as_deref())?;
    let (store, watched) = args.store.configs()?;
    let store = store.connect_sql().await?;
    let watched = match watched {
        Some(w) => Some(w.connect_sql().await?),
        None => None,
    };
    let def = StreamDef {
        name: args.name,
        source: args.store.slot.clone(),
        tables: args.tables,
        filter,
        initial_state: args.initial_state,
        from: args.from,
    };
    let log = args.store.event_log()?;
    let info = streams::create(&log, &store, watched.as_ref().unwrap_or(&store), &def).await?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}

async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let (store, catalog) = args.store.configs()?;
    let log = args.store.event_log()?;
    let options = OpenOptions {
        catalog,
        lease: args.lease,
        ..OpenOptions::default()
    };
    let progress = super::progress::Progress::new(
        format!("initial state of stream {}", args.name),
        None,
        args.quiet,
    );
    // While the stream's initial state waits for its copy, this consumer makes it: the
    // final count is then shown however fast the copy was.
    let pending = match progress.shown() {
        true => match store.connect_sql().await {
            Ok(client) => streams::get(&log, &client, &args.name)
                .await
                .is_ok_and(|info| info.initial_state.is_some_and(|i| i.state != "ready"))
                .then_some(client),
            Err(_) => None,
        },
        false => None,
    };
    // Two connections: one for the reader's statement and one for an acknowledgement.
    let pool = crate::log::ConsumerPool::reading(&store, 2, log.clone())?;
    let opening = streams::open_pooled(&pool, &store, &args.name, options);
    let mut consumer = if progress.shown() {
        // The first consumer of a stream made with an initial state copies it while
        // opening; the copy reports how far it is.
        let mut opening = std::pin::pin!(opening);
        let mut tick = tokio::time::interval(super::progress::REDRAW);
        loop {
            tokio::select! {
                opened = &mut opening => break opened,
                _ = tick.tick() => {
                    if let Some(copy) = crate::log::copies::copy_progress(&args.name) {
                        progress.set(copy.rows, copy.estimated_rows);
                    }
                }
            }
        }
    } else {
        opening.await
    }?;
    if let Some(client) = pending {
        if let Ok(Some(copied)) = streams::get(&log, &client, &args.name)
            .await
            .map(|info| info.initial_state)
        {
            progress.set(copied.rows.max(0) as u64, None);
        }
    }
    progress.finish();
    let result = print_stream(&mut consumer, args.limit).await;
    consumer.close().await;
    result
}

/// Prints items as JSON lines (the `initialized` marker first, then the initial state if
/// the stream has one, then events); after each run of ready items, flushes and
/// acknowledges the last row, `snapshotComplete` or event printed. Only events count
/// towards the limit. Stops at the limit, a signal, a closed stdout or an error (after
/// acknowledging what was printed before it).
async fn print_stream(consumer: &mut StreamConsumer, limit: Option<u64>) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut printed = 0u64;
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        // The marker comes first and at once, so it is printed even with `--limit 0`.
        let mut next = tokio::select! {
            biased;
            _ = &mut stop => return Ok(()),
            item = consumer.next() => item,
        };
        // The cursor after the last item printed: acknowledging it acknowledges all before.
        let mut last = None;
        let mut failure = None;
        loop {
            let item = match next {
                None => {
                    failure = Some(anyhow::anyhow!("the stream ended"));
                    break;
                }
                Some(Err(e)) => {
                    failure = Some(e.into());
                    break;
                }
                Some(Ok(item)) => item,
            };
            if let Err(e) = serde_json::to_writer(&mut out, &item)
                .map_err(std::io::Error::from)
                .and_then(|_| out.write_all(b"\n"))
            {
                return stdout_closed(e);
            }
            if matches!(item, StreamItem::Event(_)) {
                printed += 1;
            }
            last = Cursor::after(&item).or(last);
            if limit.is_some_and(|l| printed >= l) {
                break;
            }
            match consumer.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if let Err(e) = out.flush() {
            return stdout_closed(e);
        }
        if let Some(cursor) = last {
            consumer.ack_cursor(cursor).await?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if limit.is_some_and(|l| printed >= l) {
            return Ok(());
        }
    }
}
