//! waltap: typed change events from a Postgres logical replication slot.
//!
//! The modules follow one change from the source database to a consumer; each depends
//! only on those above it:
//!
//! ```text
//!  Postgres (wal_level=logical): one slot (pgoutput) + one publication
//!    │
//!  pg            connecting as a client: SourceConfig, TLS, errors, catalog, quoting
//!  replication   the wire client: replication=database, SCRAM, slot commands,
//!    │           START_REPLICATION, CopyBoth, keepalives, standby status updates
//!  pgoutput      pure decoder: bytes -> typed messages; no I/O, never panics
//!    │
//!  value, event  type OID -> typed value; relation cache; Begin..Commit -> events
//!  filter        pure: compile a filter against a table, decide, the per-consumer view
//!    │
//!  source        the slot's owner: setup checks, the pipeline task (decode, deliver,
//!    │           confirm only what was acknowledged), spill of streamed transactions
//!    │           -> Listener: a futures::Stream of events, plus ack()
//!    │
//!  initial       initial state: snapshot + watermark + settle, one algorithm for
//!    │           subscriptions, streams and export
//!    ├── hub     ephemeral fan-out: one upstream (a Listener, or the log's tail),
//!    │           many filtered Subscriptions
//!    └── log     the event log in Postgres: append (exactly once), retention, named
//!    │           streams (leases, cursors, the page reader), leadership of a group
//!    │           of processes (advisory lock, fenced terms), the tail that feeds
//!    │           hubs; uses the hub's item types, never the other way round
//!  server        HTTP: SSE, WebSocket, feed, acks, keys and tokens, metrics
//!  app           one `waltap serve` process: group member (pipeline while leading),
//!    │           a hub fed from the log's tail, the server; ordered shutdown
//!  cli           the `waltap` program: parses commands, wires the rest per command
//! ```
//!
//! The public API is what is re-exported here, plus [`log`] (the event log and its
//! streams), [`server`] (the HTTP server's configuration and keys), [`app`] (a whole
//! `waltap serve` process) and [`setup`] (checks and creation of the
//! publication and slot). Everything else is private.
//!
//! ```no_run
//! use futures::StreamExt;
//! use waltap::{Listener, ListenerConfig, SourceConfig};
//!
//! # async fn run() -> Result<(), waltap::Error> {
//! let source = SourceConfig::parse("postgres://postgres@localhost/app")?;
//! let mut listener = Listener::start(ListenerConfig::new(source)).await?;
//! while let Some(event) = listener.next().await {
//!     let event = event?;
//!     println!("{} {} {}", event.action_name(), event.qualified_table(), event.position);
//!     listener.ack(event.position);
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod app;
mod cli;
#[cfg(feature = "dev")]
pub mod dev;
#[cfg(not(feature = "dev"))]
mod dev;
mod error;
mod event;
mod filter;
mod hub;
mod initial;
pub mod log;
mod lsn;
mod pg;
mod pgoutput;
#[cfg_attr(not(feature = "dev"), allow(dead_code, unused_imports))]
mod replication;
pub mod server;
mod source;
mod value;

pub use cli::main as run_cli;
pub use error::{report, Error, ErrorCode, TableError};
pub use event::{
    Action, ColumnShape, Event, Identity, ParsePositionError, Position, Row, SchemaChange,
    SchemaConflict, TableName, Transition, TxInfo,
};
pub use filter::{Filter, FilterError};
pub use hub::{
    CompletionReason, Hub, HubConfig, SubscribeOptions, Subscription, SubscriptionError,
    SubscriptionItem,
};
pub use lsn::{LogMark, Lsn, ParseLsnError, Watermark};
pub use pg::{SourceConfig, TlsMode};
pub use source::pipeline::{Acker, Delivery, Listener, ListenerConfig};
pub use source::setup;
pub use value::{TypeKind, Value};

/// The README's Rust examples, compiled as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
