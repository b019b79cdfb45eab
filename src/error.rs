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
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("malformed pgoutput message at {lsn}")]
    Decode {
        lsn: crate::lsn::Lsn,
        #[source]
        source: DecodeError,
    },
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("streamed transaction")]
    Spill(#[from] crate::source::spill::SpillError),
    #[error(transparent)]
    SqlConnect(#[from] SqlConnectError),
    #[error("SQL")]
    Sql(#[from] tokio_postgres::Error),
    #[error("replication slot {slot:?} no longer exists (dropped while waltap used it); the changes since its last confirmed position are gone: create it again with `waltap setup` and re-read the current rows")]
    SlotDropped { slot: String },
    #[error("the listener has stopped")]
    Stopped,
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
            _ => false,
        }
    }
}
