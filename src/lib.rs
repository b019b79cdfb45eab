pub mod catalog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod event;
pub mod localpg;
pub mod lsn;
pub mod pgoutput;
pub mod pipeline;
pub mod replication;
pub mod setup;
pub mod tls;
pub mod value;

pub use error::Error;
pub use event::{Action, Event, Identity, Position, Row};
pub use pipeline::{Acker, Listener, ListenerConfig};
