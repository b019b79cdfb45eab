//! Named streams over the log: persisted, at-least-once, ordered, resumable consumers
//! (README, "Persisted streams").
//!
//! This module owns the rows of `waltap.streams` and the reading of the log for them.
//! A stream has a name, a source (the slot whose events it reads), a set of tables, an
//! optional [`Filter`] (checked against every table when the stream is made) and a cursor:
//! the last acknowledged position. Invariants:
//!
//! - a new stream's cursor is the log head of its source (the progress mark), so it
//!   delivers exactly what is appended after it was made;
//! - a consumer ([`open`]) first yields [`StreamItem::Initialized`] carrying the cursor it
//!   resumes after (the item type of a subscription), then, in
//!   position order and without gaps, every event of the stream's tables after that
//!   cursor that passes the filter; the cursor moves only forward and only by
//!   [`StreamConsumer::ack`], so after a crash or a reopen everything after the last
//!   acknowledgement comes again (at-least-once). Once every event handed out is
//!   acknowledged, the cursor may also move over events the filter skipped, so a
//!   selective stream does not fall behind retention while it waits;
//! - `tx.index` / `tx.total` / `tx.last` count the events this stream delivers of each
//!   transaction (the filter's view). They are the same on every delivery: a consumer that
//!   resumes inside a transaction reads it again from its start and hands out only the
//!   events after its cursor;
//! - one consumer per stream at a time: [`open`] takes a lease (a random holder id and an
//!   expiry), renewed while the consumer reads and acknowledges; others get
//!   [`StoreError::StreamBusy`] until it is closed, dropped or expires, and a consumer
//!   whose lease was taken over gets [`StoreError::LeaseLost`];
//! - never a silent skip: when retention deleted events after a consumer's cursor, opening
//!   or reading fails with [`StoreError::StaleCursor`]. Each read checks the pruned mark in
//!   the same statement (the same snapshot) as it reads the events, and retention deletes
//!   and moves the mark in one transaction, so no deletion can slip between the two.
//!
//! Readers are woken by the appender's `NOTIFY` (sent inside the commit of each batch);
//! the only timer is the lease renewal of an idle consumer.
//!
//! ```no_run
//! use futures::StreamExt;
//! use waltap::SourceConfig;
//! use waltap::log::streams::{self, OpenOptions, StreamItem};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: i64, status: String }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SourceConfig::parse("postgres://postgres@localhost/app")?;
//! let mut orders = streams::open(&store, "billing", OpenOptions::default()).await?;
//! while let Some(item) = orders.next().await {
//!     let event = match item? {
//!         StreamItem::Initialized { position } => {
//!             println!("resuming after {position:?}");
//!             continue;
//!         }
//!         StreamItem::Event(event) => event, // an Event<serde_json::Value>: rows as JSON objects
//!         _ => continue, // initial-state rows and marker, for streams made with one
//!     };
//!     let position = event.position;
//!     let typed: waltap::Event<Order> = streams::typed(event)?;
//!     if let Some(order) = typed.after() {
//!         println!("order {} is {}", order.id, order.status);
//!     }
//!     orders.ack(position).await?; // handled: not delivered again
//! }
//! # Ok(()) }
//! ```

mod consumer;
mod cursor;
mod lease;
mod reader;
mod reshape;

pub use consumer::{open, open_pooled, RawRow, StreamAcker, StreamConsumer, StreamItem};
pub use cursor::Cursor;
pub(crate) use cursor::Mark;
use lease::busy_or_missing;

use std::time::Duration;

use serde::Serialize;
use serde_json::Value as Json;
use tokio_postgres::Client;

use crate::event::{Event, Position, TableName};
use crate::filter::{CompiledFilter, Filter};
use crate::log::postgres::migrate;
use crate::log::{EventLog, StoreError};
use crate::lsn::LogMark;
use crate::pg::catalog;
use crate::pg::config::SourceConfig;

/// How long a consumer holds its stream without renewing.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Events read per query (extended to the end of a transaction whose size is known).
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// [`StreamInfo::backlog`] counts at most this many events.
pub const BACKLOG_COUNT_LIMIT: i64 = 100_000;

/// The ordinal of a cursor that stands after every event of its transaction.
pub(crate) const TX_END: i32 = i32::MAX;

/// What makes a stream.
#[derive(Debug, Clone)]
pub struct StreamDef {
    /// 1 to 128 characters of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// The slot whose events the stream reads (`waltap run --slot`).
    pub source: String,
    /// `table` (schema `public`) or `schema.table`; at least one, each must exist.
    pub tables: Vec<String>,
    /// Which changes of those tables the stream delivers; `None`: all of them.
    pub filter: Option<Filter>,
    /// Start with the current rows of the tables that match the filter (copied by the
    /// first consumer), then the changes after them.
    pub initial_state: bool,
    /// Deliver the changes after this position (e.g. from `waltap export`) instead of
    /// those appended from now on.
    pub from: Option<Position>,
}

/// A stream as [`list`] and [`get`] describe it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamInfo {
    /// The stream's name.
    pub name: String,
    /// The slot whose events it reads.
    pub source: String,
    /// `schema.table`.
    pub tables: Vec<String>,
    /// Its filter in the JSON form; `None` for none.
    pub filter: Option<Json>,
    /// The last acknowledged position: the stream delivers what comes after it.
    pub cursor: Position,
    /// When it was made, RFC 3339 in UTC with microseconds.
    pub created_at: String,
    /// The consumer that holds the stream now, if its lease has not expired.
    pub lease: Option<LeaseInfo>,
    /// Events of the stream's tables after the cursor, before the filter, counted up to
    /// [`BACKLOG_COUNT_LIMIT`] (the console: [`list_counting`]'s limit).
    pub backlog: i64,
    /// Whether `backlog` stopped at the limit (the real backlog may be larger).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub backlog_capped: bool,
    /// The initial state, while it is not yet all delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_state: Option<InitialStateInfo>,
}

/// Where a stream's initial state is: waiting for its copy, being copied, or copied and
/// being delivered.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialStateInfo {
    /// `pending` (the first consumer copies it), `copying` (a consumer of the process
    /// answering is copying it now: see `copy`) or `ready` (copied, being delivered).
    pub state: &'static str,
    /// Rows copied (0 until `ready`).
    pub rows: i64,
    /// Rows the consumer acknowledged.
    pub acknowledged: i64,
    /// How far the copy under way is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<crate::log::copies::CopyProgress>,
}

/// Who reads a stream, and until when at least.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseInfo {
    /// The holding consumer's id (a ULID made when it opened the stream).
    pub holder: String,
    /// When the lease expires unless renewed, RFC 3339 in UTC with microseconds.
    pub expires_at: String,
}

/// Settings of a consumer.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Another consumer may take the stream over when this one has neither read nor
    /// acknowledged for this long.
    pub lease: Duration,
    /// Events read per query.
    pub page_size: usize,
    /// The watched database, whose catalog types the columns for the filter (default:
    /// the store, which is the watched database unless the log lives elsewhere).
    pub catalog: Option<SourceConfig>,
    /// The consumer has handled everything up to here (e.g. an HTTP client's
    /// `Last-Event-ID`): acknowledged as soon as the lease is taken, before the stale
    /// check, so a client that has everything retention deleted resumes rather than
    /// getting [`StoreError::StaleCursor`].
    pub acknowledged: Option<Cursor>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            lease: DEFAULT_LEASE,
            page_size: DEFAULT_PAGE_SIZE,
            catalog: None,
            acknowledged: None,
        }
    }
}

/// `schema.table`, each part quoted when it holds a dot or a quote, so that
/// [`TableName::parse`] reads it back.
fn qualified(t: &TableName) -> String {
    t.to_string()
}

/// Refuses a name a stream cannot have: 1 to 128 characters of `A-Z a-z 0-9 _ . -`,
/// and not `.` or `..` (which no URL path can carry).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = (1..=128).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidStreamName(name.to_owned()))
    }
}

/// Each table's schema, in order; an error names the first table that does not exist.
async fn table_schemas(
    catalog_client: &Client,
    tables: &[TableName],
) -> Result<Vec<Option<crate::filter::TableSchema>>, StoreError> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        out.push(
            catalog::table_schema(catalog_client, t)
                .await
                .map_err(StoreError::sql("read a table's columns"))?,
        );
    }
    Ok(out)
}

/// Makes a stream whose cursor is the current log head of `def.source`. `catalog_client`
/// is a connection to the watched database (the tables must exist there; the filter is
/// checked against each), `store` one to the log's database.
pub async fn create(
    log: &EventLog,
    store: &Client,
    catalog_client: &Client,
    def: &StreamDef,
) -> Result<StreamInfo, StoreError> {
    check_name(&def.name)?;
    if def.tables.is_empty() {
        return Err(StoreError::NoTables);
    }
    let mut tables: Vec<TableName> = Vec::new();
    for t in &def.tables {
        let t = TableName::parse(t);
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    for (t, schema) in tables
        .iter()
        .zip(table_schemas(catalog_client, &tables).await?)
    {
        let schema = schema.ok_or_else(|| crate::error::TableError::Missing(t.to_string()))?;
        let compiled = CompiledFilter::new(def.filter.as_ref(), &schema)?;
        for w in compiled.warnings() {
            tracing::warn!(stream = %def.name, table = %t, "{w}");
        }
    }
    migrate(store).await?;
    let names: Vec<String> = tables.iter().map(qualified).collect();
    let filter = def.filter.as_ref().map(|f| f.to_json().to_string());
    let start = match def.from {
        // A position the log has not reached yet is allowed: one from `waltap tail` or a
        // subscription comes from the slot, which can be ahead of the log, and the stream
        // then starts there. Nothing was delivered yet, so nothing can be skipped unseen.
        Some(from) => Mark::checked(from)?,
        None => log_head(log, store, &def.source).await?,
    };
    let created = store
        .execute(
            "INSERT INTO waltap.streams
                 (name, source, tables, filter, cursor_lsn, cursor_ordinal, snapshot_state)
             VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7)
             ON CONFLICT (name) DO NOTHING",
            &[
                &def.name,
                &def.source,
                &names,
                &filter,
                &start.lsn,
                &start.ordinal,
                &snapshot_state(def.initial_state),
            ],
        )
        .await
        .map_err(StoreError::sql("create a stream"))?;
    if created == 0 {
        return Err(StoreError::StreamExists(def.name.clone()));
    }
    get(log, store, &def.name).await
}

const INFO_COLUMNS: &str = "name, source, tables, filter::text, cursor_lsn, cursor_ordinal,
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
     CASE WHEN lease_expires_at > now() THEN lease_holder END,
     CASE WHEN lease_expires_at > now()
          THEN to_char(lease_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END,
     snapshot_state, snapshot_total, snapshot_acked";

/// The streams of every source, or of one, by name, with backlogs counted in `log`.
pub async fn list(
    log: &EventLog,
    store: &Client,
    source: Option<&str>,
) -> Result<Vec<StreamInfo>, StoreError> {
    list_counting(log, store, source, BACKLOG_COUNT_LIMIT).await
}

/// As [`list`], counting each backlog up to `limit` only: counting reads the log, so a
/// frequent reader (the console) asks for less.
pub async fn list_counting(
    log: &EventLog,
    store: &Client,
    source: Option<&str>,
    limit: i64,
) -> Result<Vec<StreamInfo>, StoreError> {
    migrate(store).await?;
    let rows = store
        .query(
            &format!(
                "SELECT {INFO_COLUMNS} FROM waltap.streams
                 WHERE $1::text IS NULL OR source = $1 ORDER BY name"
            ),
            &[&source],
        )
        .await
        .map_err(StoreError::sql("list streams"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(info(store, &row, Some((log, limit))).await?);
    }
    Ok(out)
}

/// One stream, with its backlog in `log` counted (up to [`BACKLOG_COUNT_LIMIT`]).
pub async fn get(log: &EventLog, store: &Client, name: &str) -> Result<StreamInfo, StoreError> {
    let row = read_row(store, name).await?;
    info(store, &row, Some((log, BACKLOG_COUNT_LIMIT))).await
}

/// One stream's definition, cursor and lease, without counting its backlog (`backlog` is
/// 0): for checks before each delivery request, where counting (a read of up to 100,000
/// log rows) cost more than the page itself.
pub async fn find(store: &Client, name: &str) -> Result<StreamInfo, StoreError> {
    let row = read_row(store, name).await?;
    info(store, &row, None).await
}

async fn read_row(store: &Client, name: &str) -> Result<tokio_postgres::Row, StoreError> {
    store
        .query_opt(
            &format!("SELECT {INFO_COLUMNS} FROM waltap.streams WHERE name = $1"),
            &[&name],
        )
        .await
        .map_err(StoreError::sql("read a stream"))?
        .ok_or_else(|| StoreError::NoSuchStream(name.to_owned()))
}

/// A stream's description from its row; with `count`, its backlog counted in that log up
/// to that many events, else not counted.
async fn info(
    store: &Client,
    row: &tokio_postgres::Row,
    count: Option<(&EventLog, i64)>,
) -> Result<StreamInfo, StoreError> {
    let name: String = row.get(0);
    let source: String = row.get(1);
    let tables: Vec<String> = row.get(2);
    let filter = row
        .get::<_, Option<String>>(3)
        .map(|f| {
            serde_json::from_str(&f).map_err(|e| StoreError::Corrupt {
                position: format!("stream {name}"),
                message: format!("stored filter: {e}"),
            })
        })
        .transpose()?;
    let cursor = Mark {
        lsn: row.get(4),
        ordinal: row.get(5),
    };
    let lease = match (row.get(7), row.get(8)) {
        (Some(holder), Some(expires_at)) => Some(LeaseInfo { holder, expires_at }),
        _ => None,
    };
    let initial_state = row.get::<_, Option<String>>(9).map(|state| {
        let copy = crate::log::copies::copy_progress(&name);
        InitialStateInfo {
            state: match (state.as_str(), &copy) {
                ("ready", _) => "ready",
                (_, Some(_)) => "copying",
                _ => "pending",
            },
            rows: row.get(10),
            acknowledged: row.get(11),
            copy,
        }
    });
    let (backlog, backlog_capped) = match count {
        Some((log, limit)) => {
            let counted = match log {
                EventLog::Postgres => count_backlog(store, &source, cursor, &tables, limit).await?,
                EventLog::JetStream(js) => {
                    js.check_source(&source)?;
                    let tables: Vec<TableName> =
                        tables.iter().map(|t| TableName::parse(t)).collect();
                    js.count(cursor, &tables, limit).await?
                }
            };
            (counted.min(limit), counted > limit)
        }
        None => (0, false),
    };
    Ok(StreamInfo {
        name,
        source,
        tables,
        filter,
        cursor: cursor.position(),
        created_at: row.get(6),
        lease,
        backlog,
        backlog_capped,
        initial_state,
    })
}

/// The events after `cursor` on the stream's tables, counted up to `limit + 1`.
async fn count_backlog(
    store: &Client,
    source: &str,
    cursor: Mark,
    tables: &[String],
    limit: i64,
) -> Result<i64, StoreError> {
    let (schemas, names) = split_tables(tables);
    Ok(store
        .query_one(
            "SELECT count(*) FROM (
                 SELECT 1 FROM waltap.events
                 WHERE source = $1 AND (commit_lsn, ordinal) > ($2, $3)
                   AND (schema_name, table_name) IN (SELECT * FROM unnest($4::text[], $5::text[]))
                 LIMIT $6) b",
            &[
                &source,
                &cursor.lsn,
                &cursor.ordinal,
                &schemas,
                &names,
                &(limit + 1),
            ],
        )
        .await
        .map_err(StoreError::sql("count a stream's backlog"))?
        .get(0))
}

/// Stored `schema.table` names as two parallel arrays, for SQL.
fn split_tables(tables: &[String]) -> (Vec<String>, Vec<String>) {
    tables
        .iter()
        .map(|t| {
            let t = TableName::parse(t);
            (t.schema, t.table)
        })
        .unzip()
}

/// Deletes a stream. A consumer reading it fails at its next renewal or acknowledgement.
pub async fn delete(store: &Client, name: &str) -> Result<(), StoreError> {
    migrate(store).await?;
    let n = store
        .execute("DELETE FROM waltap.streams WHERE name = $1", &[&name])
        .await
        .map_err(StoreError::sql("delete a stream"))?;
    if n == 0 {
        return Err(StoreError::NoSuchStream(name.to_owned()));
    }
    Ok(())
}

/// Moves a stream's cursor to the current log head, as if it were made now: what a
/// consumer does after [`StoreError::StaleCursor`]. With `initial_state`, the stream then
/// starts over with the current rows (as if made with [`StreamDef::initial_state`]);
/// without, the consumer re-reads them on its own. Fails with [`StoreError::StreamBusy`]
/// while a consumer holds the stream.
pub async fn reset(
    log: &EventLog,
    store: &Client,
    name: &str,
    initial_state: bool,
) -> Result<StreamInfo, StoreError> {
    migrate(store).await?;
    let source: String = store
        .query_opt(
            "SELECT source FROM waltap.streams WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(StoreError::sql("read a stream"))?
        .ok_or_else(|| StoreError::NoSuchStream(name.to_owned()))?
        .get(0);
    let start = log_head(log, store, &source).await?;
    let n = store
        .execute(
            "UPDATE waltap.streams
             SET cursor_lsn = $2, cursor_ordinal = $3, snapshot_state = $4,
                 snapshot_acked = 0, snapshot_total = 0,
                 delivered_lsn = NULL, delivered_ordinal = NULL, snapshot_delivered = 0
             WHERE name = $1
               AND (lease_holder IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= now())",
            &[
                &name,
                &start.lsn,
                &start.ordinal,
                &snapshot_state(initial_state),
            ],
        )
        .await
        .map_err(StoreError::sql("reset a stream"))?;
    if n == 0 {
        return Err(busy_or_missing(store, name).await);
    }
    store
        .execute(
            "DELETE FROM waltap.snapshot_rows WHERE stream = $1",
            &[&name],
        )
        .await
        .map_err(StoreError::sql("clear a stream's initial state"))?;
    get(log, store, name).await
}

/// Where a stream made or reset now starts, unless told otherwise: after the log head of
/// `source`, or before everything while its log is empty. With an initial state the first
/// consumer then copies the rows and moves the cursor to their snapshot's position
/// ([`super::initial::materialize`]); [`create`] and [`reset`] share both steps.
async fn log_head(log: &EventLog, store: &Client, source: &str) -> Result<Mark, StoreError> {
    if let EventLog::JetStream(js) = log {
        js.check_source(source)?;
        // A log whose limits discarded every message no longer says where it ended. The
        // slot's confirmed position is no answer: it trails what JetStream already holds
        // (confirmations go out after the acknowledgement), so a stream started there
        // would find the messages in between gone and report them as missed.
        return js.head().await?.ok_or_else(|| {
            StoreError::JetStream(crate::log::jetstream::JetStreamError::EndUnknown {
                slot: source.to_owned(),
            })
        });
    }
    Ok(match crate::log::postgres::progress(store, source).await? {
        Some(mark) if mark > LogMark::NONE => Mark {
            lsn: mark.lsn().0 as i64,
            ordinal: TX_END,
        },
        _ => Mark { lsn: 0, ordinal: 0 },
    })
}

/// `snapshot_state` of a stream that starts now: `pending` until its first consumer copies
/// the initial state.
fn snapshot_state(initial_state: bool) -> Option<&'static str> {
    initial_state.then_some("pending")
}

/// The event with its rows deserialized into `T` (e.g. your own serde struct). Columns
/// Postgres did not send are missing from the rows, so give such fields
/// `#[serde(default)]` or make them `Option`.
pub fn typed<T: serde::de::DeserializeOwned>(
    ev: Event<RawRow>,
) -> Result<Event<T>, serde_json::Error> {
    let row = |r: Option<RawRow>| r.map(|r| serde_json::from_str(r.get())).transpose();
    Ok(Event {
        id: ev.id,
        position: ev.position,
        action: ev.action,
        schema: ev.schema,
        table: ev.table,
        identity: ev.identity,
        new: row(ev.new)?,
        old: row(ev.old)?,
        changed: ev.changed,
        unchanged: ev.unchanged,
        transition: ev.transition,
        tx: ev.tx,
        schema_change: ev.schema_change,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    #[test]
    fn qualified_names_read_back() {
        for (schema, table) in [("public", "t"), ("my.schema", "Odd\"Name"), ("s", "a.b")] {
            let t = TableName {
                schema: schema.into(),
                table: table.into(),
            };
            assert_eq!(TableName::parse(&qualified(&t)), t);
        }
        assert_eq!(qualified(&TableName::parse("orders")), "public.orders");
    }

    #[test]
    fn names_and_marks() {
        assert!(check_name("billing.v2-x_1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
        let p = Position::new(Lsn(0x16B3748), 2);
        assert_eq!(Mark::of(p).position(), p);
        let before_tx = Mark {
            lsn: 5,
            ordinal: -1,
        };
        assert!(before_tx < Mark::of(Position::new(Lsn(5), 0)));
        assert!(
            Mark {
                lsn: 5,
                ordinal: TX_END
            } > Mark::of(Position::new(Lsn(5), 1_000_000))
        );
    }
}
