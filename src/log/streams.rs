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
//!   transaction ([`FilteredView`]). They are the same on every delivery: a consumer that
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
//! use waltap::config::SourceConfig;
//! use waltap::store::streams::{self, OpenOptions, StreamItem};
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

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::pool::{ConsumerPool, Wake};
use super::postgres::migrate;
use super::StoreError;
use crate::event::{Event, Position, Row, TableName};
use crate::filter::{CompiledFilter, Decision, Filter};
use crate::hub::{FilteredView, SubscriptionItem};
use crate::initial::SnapshotRow;
use crate::lsn::Lsn;
use crate::pg::catalog;
use crate::pg::config::SourceConfig;
use crate::value::{TypeKind, Value};

/// How long a consumer holds its stream without renewing.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Events read per query (extended to the end of a transaction whose size is known).
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// [`StreamInfo::backlog`] counts at most this many events.
pub const BACKLOG_COUNT_LIMIT: i64 = 100_000;

/// The ordinal of a cursor that stands after every event of its transaction.
const TX_END: i32 = i32::MAX;

/// What makes a stream.
#[derive(Debug, Clone)]
pub struct StreamDef {
    /// 1 to 128 characters of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// The slot whose events the stream reads (`waltap run --slot`).
    pub source: String,
    /// `table` (schema `public`) or `schema.table`; at least one, each must exist.
    pub tables: Vec<String>,
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
    pub name: String,
    pub source: String,
    /// `schema.table`.
    pub tables: Vec<String>,
    pub filter: Option<Json>,
    /// The last acknowledged position: the stream delivers what comes after it.
    pub cursor: Position,
    pub created_at: String,
    /// The consumer that holds the stream now, if its lease has not expired.
    pub lease: Option<LeaseInfo>,
    /// Events of the stream's tables after the cursor, before the filter, counted up to
    /// [`BACKLOG_COUNT_LIMIT`].
    pub backlog: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub backlog_capped: bool,
}

/// Who reads a stream, and until when at least.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseInfo {
    pub holder: String,
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

/// Where a consumer of a stream is: after a change ([`Position`]), or, while the stream
/// hands out its initial state, after row `seq` of it. Text form: the position, or
/// `snapshot-<seq>` (what the server uses as SSE `id` and feed `cursor`).
///
/// A stream with an initial state orders its cursors as: `snapshot-1` .. `snapshot-N`
/// (its rows), then the position `P` of its `snapshotComplete` marker, then the changes
/// after `P`. Acknowledging `P` or a later change acknowledges the whole initial state,
/// marker included; a position before `P` (held from before a reset) changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    Position(Position),
    Snapshot(u64),
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cursor::Position(p) => p.fmt(f),
            Cursor::Snapshot(seq) => write!(f, "snapshot-{seq}"),
        }
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Cursor, String> {
        match s.strip_prefix("snapshot-") {
            Some(seq) => seq
                .parse()
                .map(Cursor::Snapshot)
                .map_err(|_| format!("invalid cursor {s:?}: snapshot-<row number> expected")),
            None => s
                .parse()
                .map(Cursor::Position)
                .map_err(|e: crate::event::ParsePositionError| e.to_string()),
        }
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Cursor {
    /// The cursor a client holds after `item`, if the item moves it. `initialized` moves
    /// none: it says where the consumer resumes, which is what the client already holds,
    /// and while a stream hands out its initial state its position is the marker's (after
    /// the rows), so passing it back would skip them.
    pub fn after<R>(item: &SubscriptionItem<R>) -> Option<Cursor> {
        match item {
            SubscriptionItem::Event(ev) => Some(Cursor::Position(ev.position)),
            SubscriptionItem::Snapshot(row) => row.seq.map(Cursor::Snapshot),
            SubscriptionItem::SnapshotComplete { position } => position.map(Cursor::Position),
            SubscriptionItem::Completed { position, .. } => Some(Cursor::Position(*position)),
            SubscriptionItem::Initialized { .. } => None,
        }
    }
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

/// A position as the store keeps it: `(commit_lsn, ordinal)`, compared in that order.
/// Unlike [`Position`] it can stand before every event of a transaction (ordinal -1) and
/// after all of them ([`TX_END`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Mark {
    pub(crate) lsn: i64,
    pub(crate) ordinal: i32,
}

impl Mark {
    pub(crate) fn position(self) -> Position {
        Position::new(Lsn(self.lsn as u64), self.ordinal.max(0) as u32)
    }

    fn of(p: Position) -> Mark {
        Mark {
            lsn: p.commit_lsn.0 as i64,
            ordinal: i32::try_from(p.ordinal).unwrap_or(TX_END),
        }
    }

    /// [`Mark::of`] for a position from a client: LSNs at or above 2^63 are beyond any
    /// log (and would wrap around in the store's `bigint`).
    fn checked(p: Position) -> Result<Mark, StoreError> {
        if i64::try_from(p.commit_lsn.0).is_err() {
            return Err(StoreError::BeyondLog(
                p.to_string(),
                "7FFFFFFF/FFFFFFFF".into(),
            ));
        }
        Ok(Mark::of(p))
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
        let schema = schema.ok_or_else(|| StoreError::NoSuchTable(t.to_string()))?;
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
        None => log_head(store, &def.source).await?,
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
    get(store, &def.name).await
}

const INFO_COLUMNS: &str = "name, source, tables, filter::text, cursor_lsn, cursor_ordinal,
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
     CASE WHEN lease_expires_at > now() THEN lease_holder END,
     CASE WHEN lease_expires_at > now()
          THEN to_char(lease_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END";

/// The streams of every source, or of one, by name.
pub async fn list(store: &Client, source: Option<&str>) -> Result<Vec<StreamInfo>, StoreError> {
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
        out.push(info(store, &row).await?);
    }
    Ok(out)
}

/// One stream.
pub async fn get(store: &Client, name: &str) -> Result<StreamInfo, StoreError> {
    let row = store
        .query_opt(
            &format!("SELECT {INFO_COLUMNS} FROM waltap.streams WHERE name = $1"),
            &[&name],
        )
        .await
        .map_err(StoreError::sql("read a stream"))?
        .ok_or_else(|| StoreError::NoSuchStream(name.to_owned()))?;
    info(store, &row).await
}

async fn info(store: &Client, row: &tokio_postgres::Row) -> Result<StreamInfo, StoreError> {
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
    let (schemas, names) = split_tables(&tables);
    let backlog: i64 = store
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
                &(BACKLOG_COUNT_LIMIT + 1),
            ],
        )
        .await
        .map_err(StoreError::sql("count a stream's backlog"))?
        .get(0);
    Ok(StreamInfo {
        name,
        source,
        tables,
        filter,
        cursor: cursor.position(),
        created_at: row.get(6),
        lease,
        backlog: backlog.min(BACKLOG_COUNT_LIMIT),
        backlog_capped: backlog > BACKLOG_COUNT_LIMIT,
    })
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
    let start = log_head(store, &source).await?;
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
    get(store, name).await
}

/// Where a stream made or reset now starts, unless told otherwise: after the log head of
/// `source`, or before everything while its log is empty. With an initial state the first
/// consumer then copies the rows and moves the cursor to their snapshot's position
/// ([`super::initial::materialize`]); [`create`] and [`reset`] share both steps.
async fn log_head(store: &Client, source: &str) -> Result<Mark, StoreError> {
    let head: Option<i64> = store
        .query_one(
            "SELECT max(commit_lsn) FROM waltap.progress WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(StoreError::sql("read the log head"))?
        .get(0);
    Ok(match head {
        Some(lsn) if lsn != 0 => Mark {
            lsn,
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

/// Why a stream could not be leased: it is gone, or someone holds it.
async fn busy_or_missing(store: &Client, name: &str) -> StoreError {
    let row = store
        .query_opt(
            "SELECT to_char(lease_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM waltap.streams WHERE name = $1",
            &[&name],
        )
        .await;
    match row {
        Err(e) => StoreError::Sql {
            operation: "read a stream's lease",
            source: e,
        },
        Ok(None) => StoreError::NoSuchStream(name.to_owned()),
        Ok(Some(r)) => StoreError::StreamBusy {
            name: name.to_owned(),
            until: r.get::<_, Option<String>>(0).unwrap_or_default(),
        },
    }
}

/// The pruned mark of `source`: retention deleted every event at or below it.
async fn pruned_mark(store: &Client, source: &str) -> Result<Mark, StoreError> {
    let row = store
        .query_one(
            "SELECT coalesce(max(pruned_lsn), 0), coalesce(max(pruned_ordinal), -1)
             FROM waltap.progress WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(StoreError::sql("read the pruned mark"))?;
    Ok(Mark {
        lsn: row.get(0),
        ordinal: row.get(1),
    })
}

/// The stream's rows with typed values, as its filter needs them: the table's columns,
/// read once when the consumer opens.
struct TableTypes {
    table: TableName,
    names: Arc<[Arc<str>]>,
    kinds: Vec<TypeKind>,
}

impl TableTypes {
    /// A column the event lacks stays absent (unknown to the filter, never NULL), and so
    /// does one whose JSON does not fit the type read at open (the column changed type
    /// since): the filter delivers what it cannot decide.
    fn row(&self, json: &Json) -> Row {
        let values = self
            .names
            .iter()
            .zip(&self.kinds)
            .map(|(name, kind)| {
                let v = json.get(&**name)?;
                Value::from_json(kind, v).ok()
            })
            .collect();
        Row {
            names: self.names.clone(),
            values,
        }
    }

    fn typed(&self, ev: &Event<Json>) -> Event<Row> {
        Event {
            id: ev.id,
            position: ev.position,
            action: ev.action,
            schema: ev.schema.clone(),
            table: ev.table.clone(),
            identity: ev.identity,
            new: ev.new.as_ref().map(|r| self.row(r)),
            old: ev.old.as_ref().map(|r| self.row(r)),
            changed: ev.changed.clone(),
            unchanged: ev.unchanged.clone(),
            transition: None,
            tx: ev.tx.clone(),
        }
    }
}

/// The event with its rows deserialized into `T` (e.g. your own serde struct). Columns
/// Postgres did not send are missing from the rows, so give such fields
/// `#[serde(default)]` or make them `Option`.
pub fn typed<T: serde::de::DeserializeOwned>(
    ev: Event<Json>,
) -> Result<Event<T>, serde_json::Error> {
    let row = |r: Option<Json>| r.map(serde_json::from_value).transpose();
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
    })
}

/// What the consumer and its reader share: the lease and the progress of
/// acknowledgements, and the connection that [`StreamConsumer::ack`] uses.
///
/// Every statement takes a connection from the pool and returns it when done, never
/// holding one while waiting for another, so that consumers share a bounded pool; the
/// reader and acknowledgements never queue behind each other on one connection.
struct Shared {
    pool: ConsumerPool,
    name: String,
    holder: String,
    lease: Duration,
    state: Mutex<Progress>,
}

struct Progress {
    /// The persisted cursor.
    acked: Mark,
    /// The last event handed out.
    yielded: Option<Mark>,
    /// Through here, events were handed out to this stream's consumers (this one or
    /// earlier ones): acknowledgements may not go further.
    delivered: Mark,
    /// Initial-state rows 1..this were handed out.
    snapshot_delivered: i64,
    /// Set while the reader is caught up with nothing held back: every event up to here
    /// that the stream delivers has been handed out.
    quiet_through: Option<Mark>,
    renewed_at: Instant,
    /// The stream's initial state is not yet all acknowledged (its marker included).
    snapshot_open: bool,
    /// The last row of the initial state acknowledged.
    snapshot_acked: i64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, Progress> {
        // The lock guards plain values and no code panics while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }

    fn renewal_due(&self) -> bool {
        self.state().renewed_at.elapsed() >= self.lease / 3
    }

    /// The lease was not renewed: the stream was deleted, or another consumer holds it.
    async fn lost(&self, client: &Client) -> StoreError {
        match busy_or_missing(client, &self.name).await {
            StoreError::StreamBusy { .. } => StoreError::LeaseLost {
                name: self.name.clone(),
            },
            other => other,
        }
    }

    async fn renew(&self, client: &Client) -> Result<(), StoreError> {
        let started = Instant::now();
        let n = client
            .execute(
                "UPDATE waltap.streams SET lease_expires_at = now() + make_interval(secs => $3)
                 WHERE name = $1 AND lease_holder = $2",
                &[&self.name, &self.holder, &self.lease_secs()],
            )
            .await
            .map_err(StoreError::sql("renew a stream's lease"))?;
        if n == 0 {
            return Err(self.lost(client).await);
        }
        self.state().renewed_at = started;
        Ok(())
    }

    /// Moves the cursor forward to `to` (never back) and renews the lease, on `client`:
    /// the caller's own connection (see [`Shared`]).
    async fn store_cursor(&self, client: &Client, to: Mark) -> Result<(), StoreError> {
        let started = Instant::now();
        let row = client
            .query_opt(
                "UPDATE waltap.streams SET
                     cursor_lsn = CASE WHEN ($3::int8, $4::int4) > (cursor_lsn, cursor_ordinal)
                                       THEN $3 ELSE cursor_lsn END,
                     cursor_ordinal = CASE WHEN ($3::int8, $4::int4) > (cursor_lsn, cursor_ordinal)
                                           THEN $4 ELSE cursor_ordinal END,
                     lease_expires_at = now() + make_interval(secs => $5)
                 WHERE name = $1 AND lease_holder = $2
                 RETURNING cursor_lsn, cursor_ordinal",
                &[
                    &self.name,
                    &self.holder,
                    &to.lsn,
                    &to.ordinal,
                    &self.lease_secs(),
                ],
            )
            .await
            .map_err(StoreError::sql("acknowledge"))?;
        let Some(row) = row else {
            return Err(self.lost(client).await);
        };
        let mut state = self.state();
        state.acked = Mark {
            lsn: row.get(0),
            ordinal: row.get(1),
        };
        state.renewed_at = started;
        Ok(())
    }

    /// Refuses to acknowledge `to` when it lies beyond what the stream delivered (or, with
    /// `quiet`, beyond what the reader has read through without finding anything more).
    fn check_delivered(&self, to: Mark, quiet: bool) -> Result<(), StoreError> {
        let state = self.state();
        let mut bound = state.acked.max(state.delivered);
        if quiet {
            bound = bound.max(state.quiet_through.unwrap_or(bound));
        }
        if to <= bound {
            return Ok(());
        }
        Err(StoreError::AheadOfDelivery {
            name: self.name.clone(),
            cursor: to.position().to_string(),
            delivered: bound.position().to_string(),
        })
    }

    /// As [`Shared::check_delivered`], for row `seq` of the initial state.
    fn check_snapshot_delivered(&self, seq: u64) -> Result<i64, StoreError> {
        let delivered = self.state().snapshot_delivered;
        match i64::try_from(seq) {
            Ok(seq) if seq <= delivered => Ok(seq),
            _ => Err(StoreError::AheadOfDelivery {
                name: self.name.clone(),
                cursor: Cursor::Snapshot(seq).to_string(),
                delivered: Cursor::Snapshot(delivered.max(0) as u64).to_string(),
            }),
        }
    }

    /// Records, before they are handed out, that events through `to` and initial-state
    /// rows through `snapshot` are delivered (on the reader's connection).
    async fn record_delivered(
        &self,
        to: Option<Mark>,
        snapshot: Option<i64>,
    ) -> Result<(), StoreError> {
        {
            let state = self.state();
            let more = to.is_some_and(|m| m > state.delivered)
                || snapshot.is_some_and(|n| n > state.snapshot_delivered);
            if !more {
                return Ok(());
            }
        }
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE waltap.streams SET
                     (delivered_lsn, delivered_ordinal) = (
                         SELECT CASE WHEN $3::int8 IS NULL OR (delivered_lsn, delivered_ordinal) >= ($3, $4::int4)
                                     THEN delivered_lsn ELSE $3 END,
                                CASE WHEN $3::int8 IS NULL OR (delivered_lsn, delivered_ordinal) >= ($3, $4::int4)
                                     THEN delivered_ordinal ELSE $4 END),
                     snapshot_delivered = greatest(snapshot_delivered, coalesce($5::int8, 0))
                 WHERE name = $1 AND lease_holder = $2",
                &[
                    &self.name,
                    &self.holder,
                    &to.map(|m| m.lsn),
                    &to.map(|m| m.ordinal),
                    &snapshot,
                ],
            )
            .await
            .map_err(StoreError::sql("record what a stream delivered"))?;
        if n == 0 {
            return Err(self.lost(&client).await);
        }
        let mut state = self.state();
        if let Some(m) = to {
            state.delivered = state.delivered.max(m);
        }
        if let Some(seq) = snapshot {
            state.snapshot_delivered = state.snapshot_delivered.max(seq);
        }
        Ok(())
    }

    /// Acknowledges the initial state's rows up to `seq`, or with `None` all of it, its
    /// marker included: only then is the copy deleted, so that a consumer that has the
    /// last row but not the marker gets the marker again.
    async fn ack_snapshot(&self, client: &Client, seq: Option<i64>) -> Result<(), StoreError> {
        let started = Instant::now();
        let row = client
            .query_opt(
                "UPDATE waltap.streams SET
                     snapshot_acked = greatest(snapshot_acked, least(coalesce($3, snapshot_total), snapshot_total)),
                     snapshot_state = CASE WHEN $3 IS NULL THEN NULL ELSE snapshot_state END,
                     lease_expires_at = now() + make_interval(secs => $4)
                 WHERE name = $1 AND lease_holder = $2
                 RETURNING snapshot_state, snapshot_acked",
                &[&self.name, &self.holder, &seq, &self.lease_secs()],
            )
            .await
            .map_err(StoreError::sql("acknowledge initial-state rows"))?;
        let Some(row) = row else {
            return Err(self.lost(client).await);
        };
        let open = row.get::<_, Option<String>>(0).is_some();
        if !open {
            client
                .execute(
                    "DELETE FROM waltap.snapshot_rows WHERE stream = $1",
                    &[&self.name],
                )
                .await
                .map_err(StoreError::sql("delete a delivered initial state"))?;
        }
        let mut state = self.state();
        state.snapshot_open = open;
        state.snapshot_acked = row.get(1);
        state.renewed_at = started;
        Ok(())
    }

    async fn release(&self) {
        let client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(stream = %self.name, error = %e, "lease not released; it expires");
                return;
            }
        };
        let result = client
            .execute(
                "UPDATE waltap.streams SET lease_holder = NULL, lease_expires_at = NULL
                 WHERE name = $1 AND lease_holder = $2",
                &[&self.name, &self.holder],
            )
            .await;
        if let Err(e) = result {
            tracing::debug!(stream = %self.name, error = %e, "lease not released; it expires");
        }
    }
}

/// What a [`StreamConsumer`] yields: first [`StreamItem::Initialized`] with the cursor the
/// consumer resumes after (the position before every event when the log held nothing for
/// the stream's source when it was made or reset), then [`StreamItem::Event`]s with rows as JSON objects. Serialized
/// as `{"type": "initialized", "position": ...}` and plain events (no `type` field).
pub type StreamItem = SubscriptionItem<Json>;

/// A consumer of one stream: a [`futures::Stream`] of [`StreamItem`]s (the initialized
/// marker, then its events in position order), and [`StreamConsumer::ack`]. The stream
/// ends with the first error (reopen to go on).
pub struct StreamConsumer {
    shared: Arc<Shared>,
    reader: Pin<Box<dyn Stream<Item = Result<StreamItem, StoreError>> + Send>>,
    released: bool,
}

impl std::fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("name", &self.shared.name)
            .field("holder", &self.shared.holder)
            .finish_non_exhaustive()
    }
}

/// Opens stream `name` in the log at `store` for reading: takes its lease, and yields
/// [`StreamItem::Initialized`] with its cursor, then what comes after that cursor, then
/// new events as they are appended.
///
/// Fails with [`StoreError::StreamBusy`] while another consumer holds it,
/// [`StoreError::StaleCursor`] when retention deleted events it has not acknowledged, and
/// [`StoreError::NoSuchStream`].
pub async fn open(
    store: &SourceConfig,
    name: &str,
    options: OpenOptions,
) -> Result<StreamConsumer, StoreError> {
    // Two: one for the reader's statement and one for an acknowledgement meanwhile.
    open_pooled(&ConsumerPool::new(store, 2)?, store, name, options).await
}

/// As [`open`], with connections from `pool` (the log at `store`), which any number of
/// consumers may share.
pub async fn open_pooled(
    pool: &ConsumerPool,
    store: &SourceConfig,
    name: &str,
    options: OpenOptions,
) -> Result<StreamConsumer, StoreError> {
    // Subscribed before the first read: an append after it wakes the reader.
    let notifications = pool.wake_ups();
    let client = pool.get().await?;
    migrate(&client).await?;
    let holder = ulid::Ulid::new().to_string();
    let lease = options.lease.max(Duration::from_millis(10));
    let row = client
        .query_opt(
            "UPDATE waltap.streams
             SET lease_holder = $2, lease_expires_at = now() + make_interval(secs => $3)
             WHERE name = $1
               AND (lease_holder IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= now())
             RETURNING source, tables, filter::text, cursor_lsn, cursor_ordinal,
                       snapshot_state, snapshot_acked, snapshot_total,
                       delivered_lsn, delivered_ordinal, snapshot_delivered",
            &[&name, &holder, &lease.as_secs_f64()],
        )
        .await
        .map_err(StoreError::sql("take a stream's lease"))?;
    let Some(mut row) = row else {
        return Err(busy_or_missing(&client, name).await);
    };
    if row.get::<_, Option<String>>(5).as_deref() == Some("pending") {
        // From here on, a failure releases the lease only when it expires; the copy is
        // one store transaction, so nothing half-made stays behind.
        let renewer = pool.get().await?;
        row = copy_initial_state(&client, &renewer, store, &options, name, &holder, &row).await?;
    }
    let acked = Mark {
        lsn: row.get(3),
        ordinal: row.get(4),
    };
    let delivered = match (row.get(8), row.get(9)) {
        (Some(lsn), Some(ordinal)) => acked.max(Mark { lsn, ordinal }),
        _ => acked,
    };
    let shared = Arc::new(Shared {
        pool: pool.clone(),
        name: name.to_owned(),
        holder,
        lease,
        state: Mutex::new(Progress {
            acked,
            yielded: None,
            delivered,
            snapshot_delivered: row.get(10),
            quiet_through: None,
            renewed_at: Instant::now(),
            snapshot_open: false,
            snapshot_acked: 0,
        }),
    });
    let mut consumer = StreamConsumer {
        shared: shared.clone(),
        reader: Box::pin(futures::stream::empty()),
        released: false,
    };
    // From here on, a failure releases the lease (dropping `consumer`).
    let mut snapshot =
        (row.get::<_, Option<String>>(5).as_deref() == Some("ready")).then(|| SnapshotPhase {
            next: row.get::<_, i64>(6),
            total: row.get::<_, i64>(7),
            out: VecDeque::new(),
        });
    {
        let mut state = shared.state();
        state.snapshot_open = snapshot.is_some();
        if let Some(phase) = &snapshot {
            state.snapshot_acked = phase.next;
        }
    }
    if let Some(cursor) = options.acknowledged {
        if let Err(e) = resume_after(&shared, &mut snapshot, cursor).await {
            // Refused: nothing changed, and the lease is free again at once.
            consumer.close().await;
            return Err(e);
        }
    }
    let cursor = shared.state().acked;
    drop(client);
    let mut reader = match Reader::new(shared, &row, &options, notifications).await {
        Ok(reader) => reader,
        Err(e) => {
            // Released now, not in the background: a process that exits on this error
            // (`waltap stream tail` on `stale_cursor`) would otherwise leave the lease
            // held until it expires, and the advised `reset` would fail with stream_busy.
            consumer.close().await;
            return Err(e);
        }
    };
    reader.snapshot = snapshot;
    // Always a real position, resumable with `from`: a cursor at LSN 0 (the log was empty
    // when it was set) is the position before every event.
    let initialized = StreamItem::Initialized {
        position: Some(cursor.position()),
    };
    let events = futures::stream::unfold(reader, |mut r| async move {
        let item = r.next_stream_item().await?;
        Some((item, r))
    });
    consumer.reader = Box::pin(futures::stream::once(async move { Ok(initialized) }).chain(events));
    Ok(consumer)
}

/// Acknowledges what a reopening consumer says it has handled, when the stream did
/// deliver that much.
async fn resume_after(
    shared: &Shared,
    snapshot: &mut Option<SnapshotPhase>,
    cursor: Cursor,
) -> Result<(), StoreError> {
    let client = shared.pool.get().await?;
    match cursor {
        Cursor::Snapshot(seq) => {
            let seq = shared.check_snapshot_delivered(seq)?;
            if let Some(phase) = snapshot.as_mut() {
                let seq = seq.min(phase.total);
                shared.ack_snapshot(&client, Some(seq)).await?;
                phase.next = phase.next.max(seq);
            }
        }
        Cursor::Position(p) => {
            let to = Mark::checked(p)?;
            shared.check_delivered(to, false)?;
            // The marker's position (the cursor) or a change after it acknowledges the
            // whole initial state (see [`Cursor`]); a position before it changes nothing.
            if to >= shared.state().acked {
                if snapshot.take().is_some() {
                    shared.ack_snapshot(&client, None).await?;
                }
                if to > shared.state().acked {
                    shared.store_cursor(&client, to).await?;
                }
            }
        }
    }
    Ok(())
}

/// Makes the copy of a stream's initial state ([`super::initial::materialize`]) while
/// renewing the lease on `renewer`; returns the stream's row as `open` reads it.
async fn copy_initial_state(
    client: &Client,
    renewer: &Client,
    store: &SourceConfig,
    options: &OpenOptions,
    name: &str,
    holder: &str,
    row: &tokio_postgres::Row,
) -> Result<tokio_postgres::Row, StoreError> {
    let source: String = row.get(0);
    let tables: Vec<TableName> = row
        .get::<_, Vec<String>>(1)
        .iter()
        .map(|t| TableName::parse(t))
        .collect();
    let filter: Option<Filter> = row
        .get::<_, Option<String>>(2)
        .map(|f| {
            f.parse::<Filter>().map_err(|e| StoreError::Corrupt {
                position: format!("stream {name}"),
                message: format!("stored filter: {e}"),
            })
        })
        .transpose()?;
    let watched = options.catalog.as_ref().unwrap_or(store);
    let catalog = watched.connect_sql().await?;
    let lease = options.lease.max(Duration::from_millis(10));
    let rows = super::initial::StreamRows {
        name,
        source: &source,
        tables: &tables,
        filter: filter.as_ref(),
    };
    let copy = super::initial::materialize(client, store, &catalog, watched, &rows);
    let renew = async {
        loop {
            tokio::time::sleep(lease / 3).await;
            let n = renewer
                .execute(
                    "UPDATE waltap.streams SET lease_expires_at = now() + make_interval(secs => $3)
                     WHERE name = $1 AND lease_holder = $2",
                    &[&name, &holder, &lease.as_secs_f64()],
                )
                .await
                .map_err(StoreError::sql("renew a stream's lease"))?;
            if n == 0 {
                return Err::<(), _>(StoreError::LeaseLost {
                    name: name.to_owned(),
                });
            }
        }
    };
    let rows = tokio::select! {
        copied = copy => copied?,
        lost = renew => return Err(lost.err().unwrap_or(StoreError::LeaseLost { name: name.to_owned() })),
    };
    tracing::info!(stream = %name, rows, "initial state copied");
    client
        .query_one(
            "SELECT source, tables, filter::text, cursor_lsn, cursor_ordinal,
                    snapshot_state, snapshot_acked, snapshot_total,
                    delivered_lsn, delivered_ordinal, snapshot_delivered
             FROM waltap.streams WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(StoreError::sql("read a stream"))
}

impl StreamConsumer {
    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// True while the reader has read everything the log holds for the stream and waits
    /// for appends, with every event it read handed out: a poll that finds nothing now
    /// finds nothing until the next append.
    pub fn is_idle(&self) -> bool {
        self.shared.state().quiet_through.is_some()
    }

    /// The last acknowledged position.
    pub fn cursor(&self) -> Position {
        self.shared.state().acked.position()
    }

    /// What the consumer has acknowledged, as the cursor to resume after: while the
    /// initial state is not all acknowledged, its last acknowledged row (`snapshot-0`
    /// before the first), since the position stands after the rows.
    pub fn acknowledged(&self) -> Cursor {
        let state = self.shared.state();
        if state.snapshot_open {
            Cursor::Snapshot(state.snapshot_acked.max(0) as u64)
        } else {
            Cursor::Position(state.acked.position())
        }
    }

    /// Acknowledges every event up to and including `position`: they are not delivered
    /// again, to this consumer or a later one. Positions at or before the cursor change
    /// nothing. Acknowledge only positions you received: everything before one counts as
    /// handled. Renews the lease.
    pub async fn ack(&self, position: Position) -> Result<(), StoreError> {
        self.acker().ack(position).await
    }

    /// Acknowledges the rows of the initial state up to and including `seq`
    /// ([`SnapshotRow::seq`]): a consumer that reopens the stream resumes after it. The
    /// `snapshotComplete` marker is acknowledged by its position ([`StreamConsumer::ack`]),
    /// as is everything before a change.
    pub async fn ack_snapshot(&self, seq: u64) -> Result<(), StoreError> {
        self.ack_cursor(Cursor::Snapshot(seq)).await
    }

    /// Acknowledges up to `cursor`: a change's position or an initial-state row.
    pub async fn ack_cursor(&self, cursor: Cursor) -> Result<(), StoreError> {
        self.acker().ack_cursor(cursor).await
    }

    /// A handle that acknowledges for this consumer without borrowing it, so that one
    /// task can acknowledge while the consumer is being read (e.g. a server session).
    pub fn acker(&self) -> StreamAcker {
        StreamAcker {
            shared: self.shared.clone(),
        }
    }

    /// Releases the lease now, so that another consumer may open the stream at once.
    /// Dropping the consumer does the same in the background, best effort.
    pub async fn close(mut self) {
        self.released = true;
        self.shared.release().await;
    }
}

/// Acknowledges for a [`StreamConsumer`] ([`StreamConsumer::acker`]); valid while the
/// consumer holds the lease.
#[derive(Clone)]
pub struct StreamAcker {
    shared: Arc<Shared>,
}

impl StreamAcker {
    /// As [`StreamConsumer::ack`].
    pub async fn ack(&self, position: Position) -> Result<(), StoreError> {
        let mut to = Mark::checked(position)?;
        self.shared.check_delivered(to, true)?;
        let finishes_snapshot = {
            let state = self.shared.state();
            state.snapshot_open && to >= state.acked
        };
        if finishes_snapshot {
            // The marker's position or a change after it (see [`Cursor`]).
            let client = self.shared.pool.get().await?;
            self.shared.ack_snapshot(&client, None).await?;
        }
        {
            let state = self.shared.state();
            if let Some(quiet) = state.quiet_through {
                // Everything handed out is acknowledged and nothing more is owed up to
                // `quiet`: the events in between were all filtered out.
                if state.yielded.is_none_or(|y| to >= y) && quiet > to {
                    to = quiet;
                }
            }
            if to <= state.acked {
                return Ok(());
            }
        }
        let client = self.shared.pool.get().await?;
        self.shared.store_cursor(&client, to).await
    }

    /// As [`StreamConsumer::ack_cursor`].
    pub async fn ack_cursor(&self, cursor: Cursor) -> Result<(), StoreError> {
        match cursor {
            Cursor::Position(p) => self.ack(p).await,
            Cursor::Snapshot(seq) => {
                let seq = self.shared.check_snapshot_delivered(seq)?;
                if !self.shared.state().snapshot_open {
                    return Ok(());
                }
                let client = self.shared.pool.get().await?;
                self.shared.ack_snapshot(&client, Some(seq)).await
            }
        }
    }
}

impl Drop for StreamConsumer {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(async move { shared.release().await });
        }
    }
}

impl Stream for StreamConsumer {
    type Item = Result<StreamItem, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.reader.as_mut().poll_next(cx)
    }
}

/// One page of the log after a mark, with the pruned mark read in the same snapshot.
const PAGE: &str = "WITH mark AS (
                     SELECT coalesce(max(pruned_lsn), 0) AS lsn, coalesce(max(pruned_ordinal), -1) AS ord
                     FROM waltap.progress WHERE source = $1)
                 SELECT mark.lsn, mark.ord, e.commit_lsn, e.ordinal, e.tx_last, e.body
                 FROM mark LEFT JOIN LATERAL (
                     SELECT commit_lsn, ordinal, tx_last,
                            CASE WHEN (schema_name, table_name) IN
                                      (SELECT * FROM unnest($6::text[], $7::text[]))
                                 THEN event::text END AS body
                     FROM waltap.events
                     WHERE source = $1
                       AND (commit_lsn, ordinal) > ($2, $3)
                       AND (commit_lsn, ordinal) <= ($4, $5)
                     ORDER BY commit_lsn, ordinal
                     LIMIT $8) e ON true
                 ORDER BY e.commit_lsn, e.ordinal";

/// One stored event as a page query returns it.
struct Stored {
    at: Mark,
    tx_last: bool,
    /// The JSON text; absent for events of tables outside the stream.
    body: Option<String>,
}

/// The reading side of a consumer: pages of the log through the stream's view.
struct Reader {
    shared: Arc<Shared>,
    source: String,
    /// The pool's append notifications.
    notifications: broadcast::Receiver<Wake>,
    notifications_open: bool,
    page_size: i64,
    schemas: Vec<String>,
    tables: Vec<String>,
    view: FilteredView<Json>,
    /// Column types per table, only when the stream has a filter.
    types: Vec<TableTypes>,
    /// The last event read (the bound of the next page).
    read_after: Mark,
    /// The last event the consumer is owed nothing up to: when retention pruned past it,
    /// the consumer would miss events.
    needed_after: Mark,
    /// Events up to here were delivered before (the cursor at open); they are read again
    /// only for their transaction's numbering.
    delivered_through: Mark,
    /// The last event this stream delivered belongs to a transaction of known size that
    /// has not ended yet.
    counted_tx_open: bool,
    decided: Vec<Event<Json>>,
    out: VecDeque<Event<Json>>,
    failed: bool,
    /// The initial state still to hand out, before the changes.
    snapshot: Option<SnapshotPhase>,
}

/// Where a consumer is in its stream's copied initial state.
struct SnapshotPhase {
    /// The last row read (rows are numbered from 1).
    next: i64,
    total: i64,
    out: VecDeque<SnapshotRow<Json>>,
}

impl Reader {
    async fn new(
        shared: Arc<Shared>,
        row: &tokio_postgres::Row,
        options: &OpenOptions,
        notifications: broadcast::Receiver<Wake>,
    ) -> Result<Reader, StoreError> {
        let source: String = row.get(0);
        let stored_tables: Vec<String> = row.get(1);
        let filter: Option<Filter> = row
            .get::<_, Option<String>>(2)
            .map(|f| {
                f.parse::<Filter>().map_err(|e| StoreError::Corrupt {
                    position: format!("stream {}", shared.name),
                    message: format!("stored filter: {e}"),
                })
            })
            .transpose()?;
        let cursor = shared.state().acked;
        let client = shared.pool.get().await?;
        let pruned = pruned_mark(&client, &source).await?;
        if pruned > cursor {
            return Err(stale(&shared.name, cursor, pruned));
        }
        let tables: Vec<TableName> = stored_tables.iter().map(|t| TableName::parse(t)).collect();
        let (view, types) = match &filter {
            None => (
                FilteredView::for_tables(
                    tables
                        .iter()
                        .map(|t| (t.clone(), CompiledFilter::accept_all()))
                        .collect(),
                ),
                Vec::new(),
            ),
            Some(filter) => compile(&shared, &client, options, &tables, filter).await?,
        };
        drop(client);

        let (schemas, names) = split_tables(&stored_tables);
        // Resuming inside a transaction: read it from its start, so that its numbering
        // is the one the consumer saw before.
        let read_after = if cursor.ordinal == TX_END {
            cursor
        } else {
            Mark {
                lsn: cursor.lsn,
                ordinal: -1,
            }
        };
        Ok(Reader {
            shared,
            source,
            notifications,
            notifications_open: true,
            page_size: options.page_size.clamp(1, 100_000) as i64,
            schemas,
            tables: names,
            view,
            types,
            read_after,
            needed_after: cursor,
            delivered_through: cursor,
            counted_tx_open: false,
            decided: Vec::new(),
            out: VecDeque::new(),
            failed: false,
            snapshot: None,
        })
    }

    /// The next row of the initial state, its end marker, or the next change.
    async fn next_stream_item(&mut self) -> Option<Result<StreamItem, StoreError>> {
        if self.failed {
            return None;
        }
        if self.snapshot.is_none() {
            return self.next_item().await.map(|r| r.map(StreamItem::Event));
        }
        match self.next_snapshot_row().await {
            Ok(Some(row)) => Some(Ok(StreamItem::Snapshot(row))),
            Ok(None) => {
                self.snapshot = None;
                let cursor = self.delivered_through;
                // Always a position, even before every change (LSN 0): it is the cursor
                // that acknowledges the marker.
                Some(Ok(StreamItem::SnapshotComplete {
                    position: Some(cursor.position()),
                }))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }

    async fn next_snapshot_row(&mut self) -> Result<Option<SnapshotRow<Json>>, StoreError> {
        let Some(phase) = self.snapshot.as_mut() else {
            return Ok(None);
        };
        if phase.out.is_empty() && phase.next < phase.total {
            let client = self.shared.pool.get().await?;
            if self.shared.renewal_due() {
                self.shared.renew(&client).await?;
            }
            let rows = client
                .query(
                    "SELECT seq, row::text FROM waltap.snapshot_rows
                     WHERE stream = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&self.shared.name, &phase.next, &self.page_size],
                )
                .await
                .map_err(StoreError::sql("read an initial state"))?;
            for r in rows {
                let seq: i64 = r.get(0);
                let mut row: SnapshotRow<Json> =
                    serde_json::from_str(r.get(1)).map_err(|e| StoreError::Corrupt {
                        position: format!(
                            "initial state of stream {}, row {seq}",
                            self.shared.name
                        ),
                        message: e.to_string(),
                    })?;
                row.seq = Some(seq as u64);
                phase.next = seq;
                phase.out.push_back(row);
            }
            if phase.out.is_empty() {
                // Fewer rows than counted: the copy was deleted (stream reset or deleted).
                phase.next = phase.total;
            } else {
                let through = phase.next;
                self.shared.record_delivered(None, Some(through)).await?;
            }
        }
        Ok(phase.out.pop_front())
    }

    async fn next_item(&mut self) -> Option<Result<Event<Json>, StoreError>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(ev) = self.out.pop_front() {
                self.shared.state().yielded = Some(Mark::of(ev.position));
                return Some(Ok(ev));
            }
            if let Err(e) = self.fill().await {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }

    /// Reads until there is something to hand out, waiting for appends when caught up.
    async fn fill(&mut self) -> Result<(), StoreError> {
        while self.out.is_empty() {
            if self.shared.renewal_due() {
                let client = self.shared.pool.get().await?;
                self.shared.renew(&client).await?;
            }
            // Wake-ups from before this read are answered by it.
            while matches!(
                self.notifications.try_recv(),
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_))
            ) {}
            let last = self.fetch(self.page_size, None).await?;
            let Some(last) = last else {
                self.caught_up().await?;
                self.wait_for_appends().await;
                continue;
            };
            if !last.tx_last && self.counted_tx_open {
                // Hand out the transaction whole, rather than hold it over pages.
                self.fetch(i64::MAX, Some(last.at.lsn)).await?;
            }
        }
        Ok(())
    }

    /// Reads the next events (at most `limit`; only of transaction `within` if given)
    /// into the view; returns the last one read.
    async fn fetch(
        &mut self,
        limit: i64,
        within: Option<i64>,
    ) -> Result<Option<Stored>, StoreError> {
        let upto = match within {
            Some(lsn) => Mark {
                lsn,
                ordinal: TX_END,
            },
            None => Mark {
                lsn: i64::MAX,
                ordinal: TX_END,
            },
        };
        let client = self.shared.pool.get().await?;
        let page = client
            .prepare_cached(PAGE)
            .await
            .map_err(StoreError::sql("prepare the page query"))?;
        let rows = client
            .query(
                &page,
                &[
                    &self.source,
                    &self.read_after.lsn,
                    &self.read_after.ordinal,
                    &upto.lsn,
                    &upto.ordinal,
                    &self.schemas,
                    &self.tables,
                    &limit,
                ],
            )
            .await
            .map_err(StoreError::sql("read the log"))?;
        drop(client);
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let pruned = Mark {
            lsn: first.get(0),
            ordinal: first.get(1),
        };
        if pruned > self.needed_after {
            return Err(stale(&self.shared.name, self.needed_after, pruned));
        }
        let mut last = None;
        for row in &rows {
            let (Some(lsn), Some(ordinal), Some(tx_last)) = (row.get(2), row.get(3), row.get(4))
            else {
                continue; // the empty page's one row, carrying only the mark
            };
            let stored = Stored {
                at: Mark { lsn, ordinal },
                tx_last,
                body: row.get(5),
            };
            self.take(&stored)?;
            last = Some(stored);
        }
        if last.is_some() {
            self.shared.state().quiet_through = None;
        }
        for ev in self.decided.drain(..) {
            if Mark::of(ev.position) > self.delivered_through {
                self.out.push_back(ev);
            }
        }
        let handed = self.out.back().map(|ev| Mark::of(ev.position));
        self.shared.record_delivered(handed, None).await?;
        Ok(last)
    }

    fn take(&mut self, stored: &Stored) -> Result<(), StoreError> {
        self.read_after = stored.at;
        self.needed_after = self.needed_after.max(stored.at);
        let mine = match &stored.body {
            None => None,
            Some(text) => self.decide(text, stored.at)?,
        };
        if let Some(ev) = &mine {
            self.counted_tx_open = ev.tx.total.is_some();
        }
        if stored.tx_last {
            self.counted_tx_open = false;
        }
        self.view
            .push_decided(mine, stored.tx_last, &mut self.decided);
        Ok(())
    }

    /// The event as this stream delivers it, or `None` when its filter skips it.
    fn decide(&self, text: &str, at: Mark) -> Result<Option<Event<Json>>, StoreError> {
        let mut ev: Event<Json> = serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
            position: at.position().to_string(),
            message: e.to_string(),
        })?;
        let Some(filter) = self.view.filter_for(&ev.schema, &ev.table) else {
            return Ok(None);
        };
        let types = self
            .types
            .iter()
            .find(|t| *t.table.schema == *ev.schema && *t.table.table == *ev.table);
        let Some(types) = types else {
            return Ok(Some(ev)); // no filter
        };
        Ok(match filter.evaluate(&types.typed(&ev)) {
            Decision::Skip => None,
            Decision::Deliver { transition } => {
                ev.transition = transition;
                Some(ev)
            }
        })
    }

    /// Caught up with nothing held back: once the consumer has acknowledged all it got,
    /// the cursor may pass the events the filter skipped.
    async fn caught_up(&mut self) -> Result<(), StoreError> {
        if self.view.holds_events() {
            return Ok(());
        }
        let through = self.read_after.max(self.delivered_through);
        let advance = {
            let mut state = self.shared.state();
            state.quiet_through = Some(through);
            // Not past the marker's position before the consumer acknowledged the marker.
            !state.snapshot_open
                && state.yielded.is_none_or(|y| state.acked >= y)
                && state.acked < through
        };
        if advance {
            let client = self.shared.pool.get().await?;
            self.shared.store_cursor(&client, through).await?;
        }
        Ok(())
    }

    /// Until the appender announces a commit of this source, or the lease needs renewing.
    async fn wait_for_appends(&mut self) {
        let renew = tokio::time::sleep(self.shared.lease / 3);
        tokio::pin!(renew);
        loop {
            if !self.notifications_open {
                // The connection is gone; the next query reports why.
                return;
            }
            tokio::select! {
                _ = &mut renew => return,
                n = self.notifications.recv() => match n {
                    Ok(Some(source)) if *source == *self.source => return,
                    Ok(Some(_)) => {}
                    // The listening connection was reopened, or this reader fell behind:
                    // appends may have been missed.
                    Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => self.notifications_open = false,
                },
            }
        }
    }
}

fn stale(name: &str, cursor: Mark, pruned: Mark) -> StoreError {
    StoreError::StaleCursor {
        name: name.to_owned(),
        cursor: cursor.position().to_string(),
        pruned: pruned.position().to_string(),
    }
}

/// The view and column types of a filtered stream. A table that no longer exists gets
/// no filter (its events still in the log are delivered, never dropped unseen).
async fn compile(
    shared: &Shared,
    client: &Client,
    options: &OpenOptions,
    tables: &[TableName],
    filter: &Filter,
) -> Result<(FilteredView<Json>, Vec<TableTypes>), StoreError> {
    let separate;
    let catalog_client = match &options.catalog {
        Some(c) => {
            separate = c.connect_sql().await?;
            &separate
        }
        None => client,
    };
    let mut view_tables = Vec::with_capacity(tables.len());
    let mut types = Vec::with_capacity(tables.len());
    for (t, schema) in tables
        .iter()
        .zip(table_schemas(catalog_client, tables).await?)
    {
        let Some(schema) = schema else {
            tracing::warn!(stream = %shared.name, table = %t, "table no longer exists: its events are delivered unfiltered");
            view_tables.push((t.clone(), CompiledFilter::accept_all()));
            continue;
        };
        view_tables.push((t.clone(), filter.compile(&schema)?));
        types.push(TableTypes {
            table: t.clone(),
            names: schema
                .columns
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            kinds: schema.columns.into_iter().map(|c| c.kind).collect(),
        });
    }
    Ok((FilteredView::for_tables(view_tables), types))
}

#[cfg(test)]
mod tests {
    use super::*;

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
