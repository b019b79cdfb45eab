//! The integration tests, as one binary: one test process means one shared PostgreSQL
//! cluster for all of them (see `support`).

#![allow(clippy::unwrap_used)]

mod bench_smoke;
mod cli;
mod cli_output;
mod crash;
mod edge_values;
mod events;
mod failover;
mod group;
mod harness_smoke;
mod initial_state;
mod jetstream;
mod jetstream_initial;
mod jetstream_streams;
mod listener;
mod protocol;
mod publications;
mod schema_changes;
mod server;
mod streaming;
mod streams;
mod subscribe;
mod support;
mod versions;
mod watermark;
