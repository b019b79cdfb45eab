//! waltap: typed change events from a Postgres logical replication slot.
//!
//! ```text
//!  Postgres (wal_level=logical): one slot (pgoutput) + one publication
//!    │
//!  replication   connect (replication=database, TLS, SCRAM), slot commands,
//!    │           START_REPLICATION, CopyBoth, keepalives, standby status updates
//!  pgoutput      pure decoder: bytes -> typed messages; no I/O, never panics
//!    │
//!  event         relation cache, type OID -> typed value, Begin..Commit -> events
//!    │
//!  pipeline      the one task that owns the slot: decode, deliver, confirm only what
//!    │           the consumer acknowledged
//!  Listener      a futures::Stream of events, plus ack()
//! ```
//!
//! Dependency direction: `lsn` <- `pgoutput`, `replication`; `value` <- `event` <-
//! `pipeline`; `cli` and `main` use everything; nothing depends on `cli`.
//!
//! ```no_run
//! use futures::StreamExt;
//! use waltap::{config::SourceConfig, Listener, ListenerConfig};
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

pub mod bench;
pub mod cli;
pub mod error;
pub mod event;
pub mod filter;
pub mod hub;
pub mod initial;
pub mod localpg;
pub mod log;
pub mod lsn;
pub mod pg;
pub mod pgoutput;
pub mod replication;
pub mod server;
pub mod source;
pub mod value;

pub use error::Error;
pub use event::{Action, Event, Identity, Position, Row, Transition};
pub use hub::{
    CompletionReason, Hub, HubConfig, Subscription, SubscriptionError, SubscriptionItem,
};
pub use source::pipeline::{Acker, Delivery, Listener, ListenerConfig};

/// The README's Rust examples, compiled as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
