//! Initial state: the rows of a table as of one consistent database snapshot, and the
//! position in the change stream from which changes continue them, with nothing missed
//! or doubled in between (README, "Initial state"; `docs/initial-state.md`).
//!
//! How (see `docs/initial-state.md` for why this method):
//!
//! 1. The consumer first joins the change stream (a hub subscription, or the event log)
//!    at position `J`: it holds every change after `J`.
//! 2. A `REPEATABLE READ` transaction locks the tables (`ACCESS SHARE`, so that no
//!    TRUNCATE empties them under the snapshot), takes its snapshot `S` and, in the same
//!    statement, writes a non-transactional logical message, the *watermark*, at LSN `W`.
//!    Every transaction `S` sees committed before `W`.
//! 3. Once the change stream has passed `W`, the transactions between `J` and `W` are
//!    known; with their xids, [`visibility::settle`] finds the position `P` such that `S`
//!    sees every transaction up to `P` and none after it. (At the instant `S` is taken,
//!    commit order and visibility order can disagree for transactions committing right
//!    then: the attempt is then repeated with a new snapshot, before any row was read.)
//! 4. The rows are read from `S` through a cursor, in primary-key order, a chunk at a
//!    time (bounded memory, no locks beyond `ACCESS SHARE`), and handed out as
//!    [`SnapshotRow`]s; then `snapshotComplete` with `P`, then the changes after `P`.
//!
//! The snapshot holds back vacuum only while its rows are read. This module owns the
//! database side (steps 2 and 4) and the pure matching (step 3, [`visibility`]); the hub
//! and the stream reader own joining and buffering.

mod place;
mod visibility;

use std::sync::Arc;

use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::event::{Action, Event, Identity, Position, Row, TableName, TxInfo, WATERMARK_PREFIX};
use crate::filter::{CompiledFilter, TableSchema};
use crate::lsn::{Lsn, Watermark};
use crate::pg::config::SourceConfig;
use crate::pg::quote_ident;
use crate::value::decode_text;

pub(crate) use place::{place, ChangeFeed};
pub use visibility::{check_joined, settle, CommittedTx, XidSnapshot};

/// Prefix of the transactional message that flushes a watermark to disk; ignored by
/// every reader.
const FLUSH_PREFIX: &str = "waltap.flush";

/// Rows fetched per round trip.
pub const DEFAULT_CHUNK_ROWS: usize = 1000;

/// Attempts at a snapshot whose visibility matches the commit order before giving up.
pub const MAX_ATTEMPTS: u32 = 20;

/// Why an initial state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Connect(#[from] crate::pg::config::SqlConnectError),
    #[error("cannot {operation}")]
    Sql {
        operation: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Table(#[from] crate::error::TableError),
    #[error("{table}.{column}")]
    Value {
        table: String,
        column: String,
        #[source]
        source: crate::value::ValueError,
    },
    #[error("unexpected answer from the database: {0}")]
    Protocol(String),
    /// The source is a hot standby and no primary was given to write the watermark.
    #[error("the database is a hot standby, where an initial state's watermark cannot be written: give its primary with --primary-url (WALTAP_PRIMARY_URL), or read the initial state from the primary")]
    StandbyWithoutPrimary,
    /// Transaction `xid` committed at the instant the snapshot was taken, so the snapshot
    /// and the change stream do not meet at one position; a new snapshot is taken.
    #[error("transaction {xid} committed while the snapshot was taken; no single position matches it (retried {MAX_ATTEMPTS} times under a heavy commit load)")]
    Unsettled { xid: u32 },
    #[error("the change stream did not reach the snapshot's watermark {watermark} within {seconds} s: is the pipeline running (waltap run or serve, for the event log)?")]
    WatermarkTimeout { watermark: Watermark, seconds: u64 },
}

impl SnapshotError {
    fn sql(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
        move |source| SnapshotError::Sql { operation, source }
    }

    /// A stable code for APIs (`snapshot_failed` unless more specific).
    pub fn code(&self) -> crate::error::ErrorCode {
        use crate::error::ErrorCode;
        match self {
            SnapshotError::Table(crate::error::TableError::Missing(_)) => ErrorCode::NoSuchTable,
            SnapshotError::Table(_) => ErrorCode::UnknownTable,
            SnapshotError::WatermarkTimeout { .. } => ErrorCode::SnapshotTimeout,
            _ => ErrorCode::SnapshotFailed,
        }
    }
}

/// One row of an initial state. On the wire:
/// `{"action": "snapshot", "schema": ..., "table": ..., "row": {...}}`, plus `"seq"` for the
/// rows of a persisted stream's initial state: their number, from 1, which the consumer
/// acknowledges to resume after it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow<R = Row> {
    pub schema: Arc<str>,
    pub table: Arc<str>,
    pub row: R,
    pub seq: Option<u64>,
}

impl<R: Serialize> Serialize for SnapshotRow<R> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("action", "snapshot")?;
        map.serialize_entry("schema", &*self.schema)?;
        map.serialize_entry("table", &*self.table)?;
        map.serialize_entry("row", &self.row)?;
        if let Some(seq) = self.seq {
            map.serialize_entry("seq", &seq)?;
        }
        map.end()
    }
}

impl<'de, R: serde::Deserialize<'de>> serde::Deserialize<'de> for SnapshotRow<R> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Wire<R> {
            schema: String,
            table: String,
            row: R,
            seq: Option<u64>,
        }
        let w = Wire::<R>::deserialize(d)?;
        Ok(SnapshotRow {
            schema: Arc::from(w.schema),
            table: Arc::from(w.table),
            row: w.row,
            seq: w.seq,
        })
    }
}

impl SnapshotRow<Row> {
    /// Whether `filter` admits the row: the rows of an initial state are those a `create`
    /// of them would deliver.
    pub fn admitted_by(&self, filter: &CompiledFilter, identity: Identity) -> bool {
        let probe = Event {
            id: ulid::Ulid::nil(),
            position: Position::new(Lsn::ZERO, 0),
            action: Action::Create,
            schema: self.schema.clone(),
            table: self.table.clone(),
            identity,
            new: Some(self.row.clone()),
            old: None,
            changed: None,
            unchanged: Vec::new(),
            transition: None,
            tx: TxInfo {
                xid: 0,
                commit_lsn: Lsn::ZERO,
                committed_at: 0,
                index: 0,
                total: None,
                last: true,
                annotations: None,
            },
            schema_change: None,
        };
        filter.evaluate(&probe).is_deliver()
    }

    /// The row with JSON values, as the event log and the wire have it.
    pub fn into_json(self) -> Result<SnapshotRow<serde_json::Value>, serde_json::Error> {
        Ok(SnapshotRow {
            row: serde_json::to_value(&self.row)?,
            schema: self.schema,
            table: self.table,
            seq: self.seq,
        })
    }
}

/// An open snapshot: a `REPEATABLE READ` transaction on a connection of its own.
pub struct Session {
    client: Client,
    /// What the snapshot sees.
    pub xids: XidSnapshot,
    /// The watermark written right after the snapshot was taken: every transaction the
    /// snapshot sees commits below it.
    pub watermark: Watermark,
    cursors: u32,
}

/// The watermark message is in WAL but not necessarily flushed, and logical decoding
/// reads only flushed WAL: on a quiet database it could wait for the next flush for many
/// seconds. Committing a transaction that wrote WAL flushes everything before it, so this
/// runs outside the snapshot's transaction, on `server`, where the watermark was written.
async fn flush_watermark(server: &Client) -> Result<(), SnapshotError> {
    server
        .execute(
            "SELECT pg_logical_emit_message(true, $1, '')",
            &[&FLUSH_PREFIX],
        )
        .await
        .map_err(SnapshotError::sql("flush the watermark"))?;
    Ok(())
}

impl Session {
    /// Opens the transaction, locks `tables` (`ACCESS SHARE`), takes the snapshot and
    /// writes the watermark.
    ///
    /// The lock comes before the snapshot: TRUNCATE (like other rewrites) is not MVCC-safe,
    /// and one committed between the snapshot and the first read of the table would leave
    /// the snapshot an empty table while the changes after its position still refer to
    /// its rows. Holding the lock from before the snapshot makes such a rewrite wait until
    /// the rows are read (`LOCK` takes no snapshot itself).
    pub async fn begin(
        source: &SourceConfig,
        tables: &[TableName],
    ) -> Result<Session, SnapshotError> {
        let client = source.connect_sql().await?;
        // The values come out as the walsender prints them (README, the event format), so a
        // snapshot row and a change of the same row look the same.
        client
            .batch_execute(
                "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 3;
                 SET IntervalStyle = postgres; SET bytea_output = hex;
                 BEGIN ISOLATION LEVEL REPEATABLE READ",
            )
            .await
            .map_err(SnapshotError::sql("open the snapshot transaction"))?;
        if !tables.is_empty() {
            let names: Vec<String> = tables
                .iter()
                .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table)))
                .collect();
            client
                .batch_execute(&format!(
                    "LOCK TABLE {} IN ACCESS SHARE MODE",
                    names.join(", ")
                ))
                .await
                .map_err(SnapshotError::sql("lock the tables of the snapshot"))?;
        }
        // One statement: the snapshot is taken when it starts, the watermark written after;
        // on a hot standby, which cannot write it, the primary writes it after the statement.
        let row = client
            .query_one(
                "SELECT pg_current_snapshot()::text,
                        CASE WHEN NOT pg_is_in_recovery() THEN
                            pg_logical_emit_message(false, $1, gen_random_uuid()::text)::text
                        END",
                &[&WATERMARK_PREFIX],
            )
            .await
            .map_err(SnapshotError::sql(
                "take the snapshot and write its watermark",
            ))?;
        let snapshot: String = row.get(0);
        let written: Option<String> = row.get(1);
        let on_standby = written.is_none();
        let watermark = match written {
            Some(watermark) => {
                flush_watermark(&source.connect_sql().await?).await?;
                watermark
            }
            None => {
                // The standby's snapshot sees the transactions whose commit it replayed,
                // all of which the primary wrote before the watermark it writes now; and
                // the standby replays in commit order, so visibility and commit order
                // agree.
                let primary = source
                    .primary()
                    .ok_or(SnapshotError::StandbyWithoutPrimary)?
                    .connect_sql()
                    .await?;
                let watermark: String = primary
                    .query_one(
                        "SELECT pg_logical_emit_message(false, $1, gen_random_uuid()::text)::text",
                        &[&WATERMARK_PREFIX],
                    )
                    .await
                    .map_err(SnapshotError::sql("write the watermark on the primary"))?
                    .get(0);
                flush_watermark(&primary).await?;
                watermark
            }
        };
        let xids = XidSnapshot::parse(&snapshot)?;
        // pg_logical_emit_message returns the end of the message's record, which is what
        // decoding reports for it: the two compare as the same kind.
        let watermark = watermark
            .parse::<Lsn>()
            .map(Watermark::at)
            .map_err(|_| SnapshotError::Protocol(format!("watermark LSN {watermark:?}")))?;
        tracing::debug!(%snapshot, %watermark, standby = on_standby, "snapshot taken");
        Ok(Session {
            client,
            xids,
            watermark,
            cursors: 0,
        })
    }

    /// Reads `table` in primary-key order (physical order without a key), `chunk_rows` at
    /// a time, as `publication` publishes it.
    pub async fn table(
        &mut self,
        table: &TableSchema,
        publication: &Published,
        chunk_rows: usize,
    ) -> Result<TableRows<'_>, SnapshotError> {
        self.cursors += 1;
        let cursor = format!("waltap_snapshot_{}", self.cursors);
        let mut table = table.clone();
        if let Some(listed) = &publication.columns {
            if publication.generated_listed
                && listed
                    .iter()
                    .any(|name| !table.columns.iter().any(|c| c.name == *name))
            {
                // A listed column the schema lacks is a stored generated one that the
                // publication sends (PostgreSQL 18): read the columns again with those.
                let name = TableName {
                    schema: table.schema.clone(),
                    table: table.table.clone(),
                };
                if let Some(with_generated) =
                    crate::pg::catalog::table_schema_with(&self.client, &name, true)
                        .await
                        .map_err(SnapshotError::sql("read the table's generated columns"))?
                {
                    table.columns = with_generated.columns;
                }
            }
            table.columns.retain(|c| listed.contains(&c.name));
        }
        let table = &table;
        let columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut sql = format!(
            "DECLARE {} NO SCROLL CURSOR FOR SELECT {} FROM {}.{}",
            quote_ident(&cursor),
            if columns.is_empty() {
                "NULL".to_owned()
            } else {
                columns.join(", ")
            },
            quote_ident(&table.schema),
            quote_ident(&table.table),
        );
        if let Some(filter) = &publication.row_filter {
            // The publication's own WHERE, as the catalog prints it.
            sql.push_str(" WHERE ");
            sql.push_str(filter);
        }
        if !table.primary_key.is_empty() {
            let key: Vec<String> = table.primary_key.iter().map(|c| quote_ident(c)).collect();
            sql.push_str(" ORDER BY ");
            sql.push_str(&key.join(", "));
        }
        self.client
            .batch_execute(&sql)
            .await
            .map_err(SnapshotError::sql("open a cursor over the table"))?;
        Ok(TableRows {
            session: self,
            fetch: format!("FETCH {} FROM {}", chunk_rows.max(1), quote_ident(&cursor)),
            names: table
                .columns
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            kinds: table.columns.iter().map(|c| c.kind.clone()).collect(),
            schema: Arc::from(table.schema.as_str()),
            table: Arc::from(table.table.as_str()),
            done: false,
        })
    }

    /// Ends the transaction (it only read).
    pub async fn finish(self) -> Result<(), SnapshotError> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(SnapshotError::sql("end the snapshot transaction"))
    }
}

/// The rows of one table in a [`Session`].
pub struct TableRows<'s> {
    session: &'s Session,
    fetch: String,
    names: Arc<[Arc<str>]>,
    kinds: Vec<crate::value::TypeKind>,
    schema: Arc<str>,
    table: Arc<str>,
    done: bool,
}

impl TableRows<'_> {
    /// The next chunk; `None` after the last row.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<SnapshotRow>>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let messages = self
            .session
            .client
            .simple_query(&self.fetch)
            .await
            .map_err(SnapshotError::sql("read rows"))?;
        let mut rows = Vec::new();
        for m in messages {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let mut values = Vec::with_capacity(self.kinds.len());
            for (i, kind) in self.kinds.iter().enumerate() {
                let value = match r.try_get(i) {
                    Ok(Some(text)) => Some(
                        decode_text(kind, Bytes::copy_from_slice(text.as_bytes())).map_err(
                            |source| SnapshotError::Value {
                                table: format!("{}.{}", self.schema, self.table),
                                column: self.names[i].to_string(),
                                source,
                            },
                        )?,
                    ),
                    Ok(None) => Some(crate::value::Value::Null),
                    Err(e) => return Err(SnapshotError::sql("read a column")(e)),
                };
                values.push(value);
            }
            rows.push(SnapshotRow {
                schema: self.schema.clone(),
                table: self.table.clone(),
                row: Row {
                    names: self.names.clone(),
                    values,
                },
                seq: None,
            });
        }
        if rows.is_empty() {
            self.done = true;
            return Ok(None);
        }
        Ok(Some(rows))
    }
}

/// What a publication sends of a table: a column list and a row filter (PostgreSQL 15+).
/// The rows of an initial state are restricted the same way, so that they look like the
/// table's events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Published {
    pub columns: Option<Vec<String>>,
    pub row_filter: Option<String>,
    /// `columns` is exact about stored generated columns (PostgreSQL 18 publishes them
    /// when asked to). Before 18 the list names them too, but pgoutput never sends them.
    pub generated_listed: bool,
}

impl Published {
    /// The column list and row filter of `table` in `publication` (none before 15).
    pub async fn lookup(
        client: &Client,
        publication: &str,
        table: &TableName,
    ) -> Result<Published, SnapshotError> {
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(SnapshotError::sql("read the server version"))?
            .get(0);
        if version < 150000 {
            return Ok(Published::default());
        }
        let row = client
            .query_opt(
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &table.schema, &table.table],
            )
            .await
            .map_err(SnapshotError::sql(
                "read the publication's column list and row filter",
            ))?;
        Ok(row.map_or_else(Published::default, |r| Published {
            columns: r.get(0),
            row_filter: r.get(1),
            generated_listed: version >= 180000,
        }))
    }
}

/// Looks up a table for a snapshot.
pub async fn table_schema(
    client: &Client,
    table: &TableName,
) -> Result<TableSchema, SnapshotError> {
    crate::pg::catalog::table_schema(client, table)
        .await
        .map_err(SnapshotError::sql("read the table's columns"))?
        .ok_or_else(|| crate::error::TableError::Missing(table.to_string()).into())
}
