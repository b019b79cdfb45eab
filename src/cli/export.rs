//! `waltap export TABLE`: the current rows as JSON lines in the event value format, then
//! `{"type": "snapshotComplete", "position": ...}`: the position after which the changes
//! are exactly those the rows do not contain, to continue from (`stream create --from`,
//! the feed's `cursor`). The position comes from the event log, so `waltap run` (or
//! `serve`) must be keeping it filled.

use std::io::Write;

use clap::Args;

use super::stdout_closed;
use super::stream::StoreArgs;
use crate::event::TableName;
use crate::hub::SubscriptionItem;
use crate::log::initial;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// `table` or `schema.table`.
    pub table: String,
    /// Filter as JSON (README, "Filters and subscriptions"): the rows a `create` of them would deliver.
    #[arg(long)]
    pub filter: Option<String>,
    /// No progress line on stderr (shown only when stderr is a terminal anyway).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    let filter = super::parse_filter(args.filter.as_deref())?;
    let (store, watched) = args.store.configs()?;
    let watched = watched.unwrap_or_else(|| store.clone());
    let tables = [TableName::parse_strict(&args.table).map_err(anyhow::Error::msg)?];
    let catalog = watched.connect_sql().await?;
    let log = args.store.event_log()?;
    // The JetStream log keeps the publication in its bucket: no store connection then.
    let publication = match &log {
        crate::log::EventLog::JetStream(reader) => reader.publication().await?,
        crate::log::EventLog::Postgres => {
            initial::recorded_publication(&store.connect_sql().await?, &args.store.slot).await?
        }
    };
    let compiled =
        initial::compile(publication.as_deref(), &catalog, &tables, filter.as_ref()).await?;
    let progress = super::progress::Progress::new(
        format!("export {}", tables[0]),
        crate::log::copies::estimate_rows(&catalog, &tables).await,
        args.quiet,
    );
    let (mut session, position) =
        initial::place(&log, &store, &args.store.slot, &watched, &tables).await?;
    let stdout = std::io::stdout();
    let out = std::cell::RefCell::new(std::io::BufWriter::with_capacity(64 * 1024, stdout.lock()));
    let written = initial::read_rows(&mut session, &compiled, &|n| progress.add(n), |chunk| {
        let mut out = out.borrow_mut();
        let result = chunk.iter().try_for_each(|row| {
            serde_json::to_writer(&mut *out, row)
                .map_err(std::io::Error::from)
                .and_then(|_| out.write_all(b"\n"))
        });
        async move { result.map_err(crate::log::StoreError::from) }
    })
    .await;
    session.finish().await?;
    let mut out = out.into_inner();
    if let Err(crate::log::StoreError::Io(e)) = written {
        return stdout_closed(e);
    }
    written?;
    progress.finish();
    let done: SubscriptionItem = SubscriptionItem::SnapshotComplete { position };
    serde_json::to_writer(&mut out, &done)?;
    out.write_all(b"\n")
        .and_then(|_| out.flush())
        .or_else(stdout_closed)
}
