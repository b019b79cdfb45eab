//! The slot's owner: everything between the replication connection and a consumer.
//!
//! - `setup` checks and creates what a source needs (wal_level, publication, slot);
//! - `pipeline` is the one task that reads the slot: it decodes, assembles transactions
//!   into events, hands them to a [`Listener`](pipeline::Listener) and confirms the slot
//!   only up to what the consumer acknowledged;
//! - `spill` keeps large in-progress (streamed) transactions on disk until they commit.
//!
//! Invariant: the slot's confirmed position never passes an event that was not
//! acknowledged, so a crash anywhere replays instead of losing.

pub mod pipeline;
pub mod setup;
pub mod spill;
