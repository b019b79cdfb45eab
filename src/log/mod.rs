//! The event log: persisted events, the pipeline's progress, named streams.
//!
//! This module owns waltap's own tables (schema `waltap`, created by the SQL files in
//! `migrations/`, applied in order, idempotently, and recorded in `waltap.migrations`) and
//! the contract of appending to them:
//!
//! - each committed source transaction's events are written together with the progress
//!   mark (its commit LSN) in one store transaction; the slot is confirmed only after that
//!   commits, so a crash at any point leaves the log and the mark in agreement;
//! - a source transaction at or below the mark is already in the log and is skipped, which
//!   makes appends exactly-once although Postgres replays after a crash;
//! - several source transactions share one store commit (bounded by size and time), and a
//!   huge one is written in chunks inside its store transaction, so memory stays bounded.
//!
//! [`LogWriter`] is the seam between the pipeline and a log: [`PgLog`] is the Postgres
//! table, [`jetstream::JetStreamLog`] a NATS JetStream stream.

pub mod append;
pub mod copies;
pub(crate) mod initial;
pub mod jetstream;
pub mod leader;
pub(crate) mod pool;
mod postgres;
pub mod retention;
mod standby;
pub mod streams;
pub(crate) mod tail;
mod typed;

pub use pool::{ConsumerPool, DEFAULT_POOL_SIZE};
pub use postgres::{migrate, PgLog};

use std::future::Future;

use crate::error::{ErrorCode, TableError};
use crate::event::{Event, Position};
use crate::lsn::LogMark;

/// The log named streams read their events from. Their definitions, cursors and leases
/// live in the store's `waltap.streams` either way.
#[derive(Debug, Clone, Default)]
pub enum EventLog {
    /// `waltap.events` in the store.
    #[default]
    Postgres,
    /// A JetStream stream (`--nats-url`), holding one source's events.
    JetStream(jetstream::JetStreamReader),
}

/// One event of a log as a stream reader gets it.
pub(crate) struct Stored {
    pub(crate) at: streams::Mark,
    /// Whether it ends its transaction.
    pub(crate) tx_last: bool,
    /// The JSON text (with a stored schema change); absent for events of tables outside
    /// the stream.
    pub(crate) body: Option<String>,
}

/// The migrations, in order. Each is idempotent; applied ones are recorded.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_event_log.sql")),
    (2, include_str!("../../migrations/0002_initial_state.sql")),
    (
        3,
        include_str!("../../migrations/0003_source_publication.sql"),
    ),
    (
        4,
        include_str!("../../migrations/0004_stream_delivered.sql"),
    ),
    (5, include_str!("../../migrations/0005_leader_term.sql")),
    (6, include_str!("../../migrations/0006_stream_acked_at.sql")),
    (
        7,
        include_str!("../../migrations/0007_drop_events_by_age.sql"),
    ),
];

/// Failures of the event log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A query against the log failed.
    #[error("event log: cannot {operation}")]
    Sql {
        /// What the query was for, e.g. "read a stream's lease".
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Connecting to the log's database failed.
    #[error(transparent)]
    Connect(#[from] crate::pg::config::SqlConnectError),
    /// An event could not be turned into JSON for storage.
    #[error("cannot serialize event {position}")]
    Serialize {
        /// The event's position.
        position: Position,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored row (an event, or a stream's filter) does not parse.
    #[error("stored event at {position} is not a valid event: {message}")]
    Corrupt {
        /// Where: the event's position, or `stream NAME` for a stream's stored filter.
        position: String,
        /// What is wrong with it.
        message: String,
    },
    /// No stream has this name.
    #[error("stream {0:?} does not exist")]
    NoSuchStream(String),
    /// A stream with this name exists already.
    #[error("stream {0:?} already exists")]
    StreamExists(String),
    /// The name is not a valid stream name.
    #[error("invalid stream name {0:?}: use 1 to 128 characters of A-Z, a-z, 0-9, _, . and - (but not . or ..)")]
    InvalidStreamName(String),
    /// Another consumer holds the stream's lease.
    #[error("stream {name:?} is busy: another consumer holds it until {until} (stream_busy)")]
    StreamBusy {
        /// The stream's name.
        name: String,
        /// When the other consumer's lease expires (a timestamp as Postgres prints it).
        until: String,
    },
    /// Retention deleted events the stream's cursor has not reached.
    #[error("the cursor of stream {name:?} ({cursor}) points before the oldest retained event (retention deleted through {pruned}): start again from the current rows, e.g. waltap stream reset NAME --initial-state (stale_cursor)")]
    StaleCursor {
        /// The stream's name.
        name: String,
        /// The stream's cursor.
        cursor: String,
        /// The last position retention deleted.
        pruned: String,
    },
    /// An acknowledgement names a position the stream has not delivered yet.
    #[error("cannot acknowledge {cursor} on stream {name:?}: it has delivered only up to {delivered}; acknowledge what was received")]
    AheadOfDelivery {
        /// The stream's name.
        name: String,
        /// The position acknowledged.
        cursor: String,
        /// The last position the stream delivered.
        delivered: String,
    },
    /// A position past the end of the log: (the position, where the log ends).
    #[error("position {0} is beyond the event log (which ends at {1})")]
    BeyondLog(String, String),
    /// The stream's filter does not compile.
    #[error("bad stream filter")]
    BadFilter(#[from] crate::filter::FilterError),
    /// A table named by the stream is unknown or ambiguous.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A stream was created without tables.
    #[error("a stream needs at least one table")]
    NoTables,
    /// This consumer's lease expired and another consumer took the stream.
    #[error("stream {name:?} was taken over by another consumer after this one's lease expired (it neither read nor acknowledged within the lease): reopen it (stream_busy)")]
    LeaseLost {
        /// The stream's name.
        name: String,
    },
    /// Reading the initial state failed.
    #[error("initial state")]
    Snapshot(#[from] crate::initial::SnapshotError),
    /// Writing the initial state out failed.
    #[error("cannot write the initial state")]
    Io(#[from] std::io::Error),
    /// No connection could be had from the pool.
    #[error(transparent)]
    Pool(#[from] crate::pg::PoolError),
    /// An applied migration's SQL differs from this build's.
    #[error("event log migration {version} was applied with different SQL than this waltap's (checksum {recorded} recorded in waltap.migrations, {current} now): an applied migration was edited; restore its file, or put the change in a new migration")]
    MigrationChanged {
        /// The migration's number.
        version: i32,
        /// The checksum recorded when it was applied.
        recorded: String,
        /// The checksum of this build's SQL.
        current: String,
    },
    /// Another member of the group took leadership, so this one's appends are refused.
    #[error("leadership term {term} of source {source_name:?} is over: another member of the group took over, so this one may no longer append")]
    Fenced {
        /// The source (the group's name in the log).
        source_name: String,
        /// The term this member held.
        term: i64,
    },
    /// A table's columns changed so that the stream's filter no longer fits them.
    #[error(transparent)]
    SchemaChanged(crate::event::SchemaConflict),
    /// The task that ran an append stopped before it answered (the runtime is shutting
    /// down).
    #[error("an append of events stopped before it finished")]
    AppendTask(#[source] tokio::task::JoinError),
    /// The JetStream log failed.
    #[error(transparent)]
    JetStream(#[from] jetstream::JetStreamError),
}

impl StoreError {
    pub(crate) fn sql(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Sql { operation, source }
    }

    /// A stable code for the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::StreamBusy { .. } | StoreError::LeaseLost { .. } => ErrorCode::StreamBusy,
            StoreError::StaleCursor { .. } => ErrorCode::StaleCursor,
            StoreError::NoSuchStream(_) => ErrorCode::NotFound,
            StoreError::StreamExists(_) => ErrorCode::Conflict,
            StoreError::InvalidStreamName(_)
            | StoreError::AheadOfDelivery { .. }
            | StoreError::BeyondLog(..)
            | StoreError::Table(TableError::Missing(_))
            | StoreError::NoTables => ErrorCode::BadRequest,
            StoreError::BadFilter(_) => ErrorCode::BadFilter,
            StoreError::Table(_) => ErrorCode::UnknownTable,
            StoreError::Snapshot(e) => e.code(),
            StoreError::SchemaChanged(_) => ErrorCode::SchemaChanged,
            StoreError::JetStream(
                jetstream::JetStreamError::SnapshotGap { .. }
                | jetstream::JetStreamError::OtherSource { .. }
                | jetstream::JetStreamError::EndUnknown { .. },
            ) => ErrorCode::BadRequest,
            // Connection trouble with the store or JetStream: the request may succeed later.
            _ if self.is_transient() => ErrorCode::LogUnavailable,
            _ => ErrorCode::Internal,
        }
    }

    /// Whether retrying later can help (connection trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sql { source, .. } => crate::replication::pg_error_is_transient(source),
            StoreError::Connect(crate::pg::config::SqlConnectError::Postgres {
                source, ..
            }) => crate::replication::pg_error_is_transient(source),
            StoreError::Connect(crate::pg::config::SqlConnectError::Timeout { .. }) => true,
            StoreError::Connect(_) => false,
            StoreError::Pool(crate::pg::PoolError::Connect(source)) => {
                crate::replication::pg_error_is_transient(source)
            }
            StoreError::Pool(crate::pg::PoolError::Exhausted { .. }) => true,
            StoreError::Pool(_) => false,
            StoreError::JetStream(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Appends to the log. One writer per source at a time (the pipeline that owns the slot).
pub trait LogWriter: Send {
    /// The log's progress mark: which of the source's transactions are in the log.
    fn progress(&mut self) -> impl Future<Output = Result<Option<LogMark>, StoreError>> + Send;

    /// Adds events to the open batch (opening it when needed): neither durable nor visible
    /// until [`LogWriter::commit`].
    fn write(&mut self, events: &[Event]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes the batch durable together with the progress mark, atomically, and wakes
    /// readers. `through` covers the last complete transaction in the batch
    /// ([`LogMark::through_commit`]), or everything before a watermark
    /// ([`LogMark::before`]); the stored mark never moves back.
    fn commit(&mut self, through: LogMark) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The last event in the log: every event at or before it is in, none after it. By
    /// default the end of the last transaction the mark covers; a log that can hold part
    /// of a transaction (one appended event by event) says which event.
    fn last_event(&mut self) -> impl Future<Output = Result<Option<Position>, StoreError>> + Send {
        async {
            let mark = self.progress().await?.filter(|m| *m != LogMark::NONE);
            Ok(mark.map(LogMark::last_position))
        }
    }

    /// Returns once what the last commit made durable may be acknowledged to the source
    /// (for a log whose copies must reach other servers first). By default at once.
    fn replicated(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}
