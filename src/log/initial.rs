//! Initial state over the event log: where a database snapshot sits among the logged
//! events ([`place`], used by `waltap export` and by streams: [`settle`] for the Postgres
//! log, [`super::jetstream::initial`] for JetStream), and the copy of a stream's initial
//! state into `waltap.snapshot_rows` ([`materialize`]).
//!
//! The method is [`crate::initial`]'s, with the log as the change stream: the log's
//! progress mark before the snapshot is the join point, and `waltap run` (or `serve`)
//! moves the mark to just below the snapshot's watermark once every transaction before it
//! is appended ([`LogMark::before`]), so waiting for the mark to reach the watermark means
//! the log holds every transaction that commits below it. A transaction that commits
//! exactly at the watermark is after it: the log's reads below use `< watermark`.

use std::time::Duration;

use tokio_postgres::Client;

use super::postgres::{progress, NOTIFY_CHANNEL};
use super::{EventLog, StoreError};
use crate::event::{Position, TableName};
use crate::filter::{CompiledFilter, Filter};
use crate::initial::{self, CommittedTx, Published, Session, SnapshotError, SnapshotRow};
use crate::lsn::{LogMark, Lsn, Watermark};
use crate::pg::config::SourceConfig;
use crate::pg::quote_ident;

/// How long the log may take to pass a snapshot's watermark.
pub const WATERMARK_WAIT: Duration = Duration::from_secs(60);

/// Commits before the join point checked against the snapshot (see
/// [`crate::initial::check_joined`]).
pub(crate) const JOIN_LOOKBACK: i64 = 4096;

/// The ordinal of a position that stands after every event of its transaction.
const TX_END: u32 = i32::MAX as u32;

/// Takes a snapshot of the watched database `watched` and finds the position among the
/// events of `tables` in the log of `source` (at `store`) after which every event is one
/// the snapshot does not contain. Returns the open snapshot and that position (`None`:
/// before every event).
pub async fn settle(
    store: &SourceConfig,
    source: &str,
    watched: &SourceConfig,
    tables: &[TableName],
) -> Result<(Session, Option<Position>), StoreError> {
    let (log, notifications) = store.connect_sql_listening().await?;
    super::migrate(&log).await?;
    log.batch_execute(&format!("LISTEN {}", quote_ident(NOTIFY_CHANNEL)))
        .await
        .map_err(StoreError::sql("listen for appends"))?;
    let (schemas, names) = tables
        .iter()
        .map(|t| (t.schema.clone(), t.table.clone()))
        .unzip();
    let mut feed = LogFeed {
        log,
        notifications,
        source,
        schemas,
        names,
    };
    initial::place(watched, tables, &mut feed).await
}

/// The log of one source as the change feed a snapshot is placed in.
struct LogFeed<'a> {
    log: Client,
    notifications: tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
    source: &'a str,
    schemas: Vec<String>,
    names: Vec<String>,
}

/// The LSN a join point stands at, for SQL (0: before everything).
fn join_lsn(joined: Option<Position>) -> i64 {
    joined.map_or(0, |p| p.commit_lsn.0 as i64)
}

impl initial::ChangeFeed for LogFeed<'_> {
    type Error = StoreError;

    async fn join_point(&mut self) -> Result<Option<Position>, StoreError> {
        // No progress yet: the pipeline has appended nothing so far, and waiting for the
        // watermark tells whether it runs at all.
        let mark = progress(&self.log, self.source).await?;
        Ok(mark
            .filter(|m| *m > LogMark::NONE)
            .map(|m| Position::new(m.lsn(), TX_END)))
    }

    async fn commits_through(
        &mut self,
        joined: Option<Position>,
    ) -> Result<Vec<(u32, Lsn)>, StoreError> {
        Ok(self
            .log
            .query(
                "SELECT (event->'tx'->>'id')::int8, commit_lsn FROM waltap.events
                 WHERE source = $1 AND tx_last AND commit_lsn <= $2
                 ORDER BY commit_lsn DESC LIMIT $3",
                &[&self.source, &join_lsn(joined), &JOIN_LOOKBACK],
            )
            .await
            .map_err(StoreError::sql("read the commits before the snapshot"))?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u32, Lsn(r.get::<_, i64>(1) as u64)))
            .collect())
    }

    async fn pass(&mut self, watermark: Watermark) -> Result<(), StoreError> {
        wait_for_progress(&self.log, &mut self.notifications, self.source, watermark).await
    }

    async fn commits_between(
        &mut self,
        joined: Option<Position>,
        watermark: Watermark,
    ) -> Result<Vec<CommittedTx>, StoreError> {
        // Commit LSN strictly below the watermark: one at it comes after.
        Ok(self
            .log
            .query(
                "SELECT commit_lsn, max(ordinal), min((event->'tx'->>'id')::int8)
                 FROM waltap.events
                 WHERE source = $1 AND commit_lsn > $2 AND commit_lsn < $3
                   AND (schema_name, table_name) IN
                       (SELECT * FROM unnest($4::text[], $5::text[]))
                 GROUP BY commit_lsn ORDER BY commit_lsn",
                &[
                    &self.source,
                    &join_lsn(joined),
                    &(watermark.lsn().0 as i64),
                    &self.schemas,
                    &self.names,
                ],
            )
            .await
            .map_err(StoreError::sql("read the commits around the snapshot"))?
            .iter()
            .map(|r| CommittedTx {
                last: Position::new(Lsn(r.get::<_, i64>(0) as u64), r.get::<_, i32>(1) as u32),
                xid: r.get::<_, i64>(2) as u32,
            })
            .collect())
    }
}

/// Until the log's progress mark reaches `watermark` ([`LogMark::reached`]), woken by the appender's
/// notifications (re-reading now and then in case one was missed while the connection was
/// busy).
async fn wait_for_progress(
    log: &Client,
    notifications: &mut tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
    source: &str,
    watermark: Watermark,
) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + WATERMARK_WAIT;
    loop {
        while notifications.try_recv().is_ok() {}
        if progress(log, source)
            .await?
            .is_some_and(|p| p.reached(watermark))
        {
            return Ok(());
        }
        let recheck = tokio::time::Instant::now() + Duration::from_millis(500);
        if recheck > deadline {
            return Err(SnapshotError::WatermarkTimeout {
                watermark,
                seconds: WATERMARK_WAIT.as_secs(),
            }
            .into());
        }
        let _ = tokio::time::timeout_at(recheck, notifications.recv()).await;
    }
}

/// One table of a snapshot read from the log's side.
pub struct SnapshotTable {
    pub schema: crate::filter::TableSchema,
    pub filter: CompiledFilter,
    /// The column list and row filter of the source's publication.
    pub published: Published,
}

/// The publication `waltap run` recorded for `source` in the Postgres log at `log`.
pub async fn recorded_publication(
    log: &Client,
    source: &str,
) -> Result<Option<String>, StoreError> {
    super::migrate(log).await?;
    Ok(log
        .query_opt(
            "SELECT publication FROM waltap.progress WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(StoreError::sql("read the source's publication"))?
        .and_then(|r| r.get(0)))
}

/// The publication of `source` as its writer recorded it in `log` (the Postgres log in
/// `store`, or the JetStream log's progress bucket).
pub async fn publication_of(
    log: &EventLog,
    store: &Client,
    source: &str,
) -> Result<Option<String>, StoreError> {
    match log {
        EventLog::Postgres => recorded_publication(store, source).await,
        EventLog::JetStream(reader) => reader.publication().await,
    }
}

/// Takes a snapshot of `watched` and places it among the events of `tables` in `log`
/// (see [`settle`]); the Postgres log is the one of `source` at `store`.
pub async fn place(
    log: &EventLog,
    store: &SourceConfig,
    source: &str,
    watched: &SourceConfig,
    tables: &[TableName],
) -> Result<(Session, Option<Position>), StoreError> {
    match log {
        EventLog::Postgres => settle(store, source, watched, tables).await,
        EventLog::JetStream(reader) => {
            reader.check_source(source)?;
            super::jetstream::initial::settle(reader, watched, tables).await
        }
    }
}

/// The tables of a snapshot: their filters compiled against their current columns in
/// `catalog` (the watched database), and what `publication` (the source's, as its writer
/// recorded it; `None`: any table outside the system schemas) sends of them.
pub async fn compile(
    publication: Option<&str>,
    catalog: &Client,
    tables: &[TableName],
    filter: Option<&Filter>,
) -> Result<Vec<SnapshotTable>, StoreError> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        // Only what the source publishes is copied: never the system catalogs (password
        // hashes) or waltap's own tables, whatever the caller may otherwise read.
        let published = match publication {
            Some(p) => crate::pg::catalog::is_published(catalog, p, t)
                .await
                .map_err(StoreError::sql("read the publication's tables"))?,
            None => !crate::pg::catalog::RESERVED_SCHEMAS.contains(&t.schema.as_str()),
        };
        if let (false, Some(p)) = (published, publication) {
            let why = crate::pg::catalog::not_published(catalog, p, t)
                .await
                .map_err(StoreError::sql("read the publication's tables"))?;
            return Err(why.into());
        }
        if !published {
            return Err(crate::error::TableError::NotPublished(t.to_string()).into());
        }
        let schema = initial::table_schema(catalog, t).await?;
        let filter = CompiledFilter::new(filter, &schema)?;
        let published = match publication {
            Some(p) => Published::lookup(catalog, p, t).await?,
            None => Published::default(),
        };
        out.push(SnapshotTable {
            schema,
            filter,
            published,
        });
    }
    Ok(out)
}

/// Reads every table of the snapshot through its filter, handing each admitted row (with
/// JSON values) to `sink`, a chunk at a time; `read` is told how many rows each chunk
/// had before the filter (progress).
pub async fn read_rows<F, Fut>(
    session: &mut Session,
    tables: &[SnapshotTable],
    read: &(dyn Fn(u64) + Sync),
    mut sink: F,
) -> Result<(), StoreError>
where
    F: FnMut(Vec<SnapshotRow<serde_json::Value>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    for SnapshotTable {
        schema,
        filter,
        published,
    } in tables
    {
        let mut rows = session
            .table(schema, published, initial::DEFAULT_CHUNK_ROWS)
            .await?;
        while let Some(chunk) = rows.next_chunk().await? {
            read(chunk.len() as u64);
            let mut admitted = Vec::with_capacity(chunk.len());
            for row in chunk {
                if row.admitted_by(filter, schema.identity) {
                    admitted.push(row.into_json().map_err(|e| StoreError::Corrupt {
                        position: format!("snapshot of {}", schema.qualified()),
                        message: e.to_string(),
                    })?);
                }
            }
            sink(admitted).await?;
        }
    }
    Ok(())
}

/// Which rows a stream's initial state holds.
#[derive(Debug, Clone, Copy)]
pub struct StreamRows<'a> {
    /// The stream.
    pub name: &'a str,
    /// Its source (slot) in the log.
    pub source: &'a str,
    pub tables: &'a [TableName],
    pub filter: Option<&'a Filter>,
}

/// Copies the initial state of stream `name` into `waltap.snapshot_rows` in one store
/// transaction (an interrupted copy leaves nothing behind and is redone by the next
/// consumer), and moves the stream's cursor to the snapshot's position. `store` must not
/// be in a transaction. Returns the number of rows.
pub async fn materialize(
    log: &EventLog,
    store: &Client,
    store_config: &SourceConfig,
    catalog: &Client,
    watched: &SourceConfig,
    stream: &StreamRows<'_>,
) -> Result<i64, StoreError> {
    let StreamRows {
        name,
        source,
        tables,
        filter,
    } = *stream;
    let publication = publication_of(log, store, source).await?;
    let compiled = compile(publication.as_deref(), catalog, tables, filter).await?;
    let copying =
        super::copies::Copying::start(name, super::copies::estimate_rows(catalog, tables).await);
    let (mut session, at) = place(log, store_config, source, watched, tables).await?;
    store
        .batch_execute("BEGIN")
        .await
        .map_err(StoreError::sql("begin the copy of an initial state"))?;
    let copied = async {
        store
            .execute(
                "DELETE FROM waltap.snapshot_rows WHERE stream = $1",
                &[&name],
            )
            .await
            .map_err(StoreError::sql("clear an old initial state"))?;
        let insert = store
            .prepare(
                "INSERT INTO waltap.snapshot_rows (stream, seq, row)
                 SELECT $1, $2 + o, r::json FROM unnest($3::text[]) WITH ORDINALITY AS u(r, o)",
            )
            .await
            .map_err(StoreError::sql("prepare the copy of an initial state"))?;
        let mut total: i64 = 0;
        read_rows(&mut session, &compiled, &|n| copying.add(n), |chunk| {
            let bodies: Result<Vec<String>, StoreError> = chunk
                .iter()
                .map(|r| {
                    serde_json::to_string(r).map_err(|e| StoreError::Corrupt {
                        position: format!("initial state of stream {name}"),
                        message: e.to_string(),
                    })
                })
                .collect();
            let start = total;
            total += chunk.len() as i64;
            let insert = &insert;
            async move {
                store
                    .execute(insert, &[&name, &start, &bodies?])
                    .await
                    .map_err(StoreError::sql("copy an initial state"))?;
                Ok(())
            }
        })
        .await?;
        let cursor = at.unwrap_or(Position::new(Lsn::ZERO, 0));
        store
            .execute(
                "UPDATE waltap.streams
                 SET snapshot_state = 'ready', snapshot_acked = 0, snapshot_total = $2,
                     cursor_lsn = $3, cursor_ordinal = $4
                 WHERE name = $1",
                &[
                    &name,
                    &total,
                    &(cursor.commit_lsn.0 as i64),
                    &(cursor.ordinal.min(TX_END) as i32),
                ],
            )
            .await
            .map_err(StoreError::sql("record an initial state"))?;
        store
            .batch_execute("COMMIT")
            .await
            .map_err(StoreError::sql("commit the copy of an initial state"))?;
        Ok::<i64, StoreError>(total)
    }
    .await;
    if copied.is_err() {
        let _ = store.batch_execute("ROLLBACK").await;
    }
    // The source's snapshot is needed no longer than the copy.
    let _ = session.finish().await;
    copied
}
