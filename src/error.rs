//! The top-level error: every layer's error, and whether trying again can help.

use crate::event::EventError;
use crate::pg::config::{ConfigError, SqlConnectError};
use crate::pgoutput::DecodeError;
use crate::replication::{pg_error_is_transient, ReplicationError};
use crate::source::setup::SetupError;

mod code;
mod report;
mod table;

pub use code::ErrorCode;
pub use report::report;
pub use table::TableError;

/// Anything that stops a listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A precondition of logical replication does not hold.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The server sent a pgoutput message waltap cannot decode.
    #[error("malformed pgoutput message at {lsn}")]
    Decode {
        /// The WAL position of the message.
        lsn: crate::lsn::Lsn,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The decoded messages do not make a valid sequence of events.
    #[error(transparent)]
    Event(#[from] EventError),
    /// Spilling a large streamed transaction to disk failed.
    #[error("streamed transaction")]
    Spill(#[from] crate::source::spill::SpillError),
    /// The SQL connection to the source could not be made.
    #[error(transparent)]
    SqlConnect(#[from] SqlConnectError),
    /// A pool of SQL connections could not be made or used.
    #[error(transparent)]
    Pool(#[from] crate::pg::PoolError),
    /// A query on the SQL connection failed.
    #[error("SQL")]
    Sql(#[from] tokio_postgres::Error),
    /// The slot vanished while waltap streamed from it (dropped, or a failover to a
    /// standby without a copy): changes were lost.
    #[error("replication slot {slot:?} no longer exists: it was dropped, or the server failed over to a standby that had no copy of it (only failover slots have one: --failover, PostgreSQL 17+); the changes since its last confirmed position are lost and waltap creates no new slot on its own: re-read the current rows (initial state), and for waltap run pass --accept-slot-gap to go on from now")]
    SlotDropped {
        /// The slot's name.
        slot: String,
    },
    /// The listener was stopped (or its pipeline task ended) before this call.
    #[error("the listener has stopped")]
    Stopped,
    /// Reading changes from the event log failed (a hub fed from the log).
    #[error("reading the event log")]
    Log {
        /// Whether trying again can help (the store is restarting or unreachable).
        transient: bool,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether reconnecting with backoff can help. Definite errors stop the listener with
    /// their message: retrying would only repeat them or, worse, hide lost data.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Replication(e) => e.is_transient(),
            Error::Sql(e) | Error::Setup(SetupError::Sql(e)) => pg_error_is_transient(e),
            Error::SqlConnect(SqlConnectError::Postgres { source, .. }) => {
                pg_error_is_transient(source)
            }
            Error::SqlConnect(SqlConnectError::Timeout { .. }) => true,
            Error::Log { transient, .. } => *transient,
            _ => false,
        }
    }
}
