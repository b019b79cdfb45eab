//! The chaos harness: random schedules of writers and waltap operations over a real
//! Postgres, every consumer checked against the writers' record. See `chaos/mod.rs`.

#![allow(clippy::unwrap_used)]

#[path = "chaos/mod.rs"]
mod harness;
// Shared with the main test binary, which uses all of it.
#[allow(unused_imports)]
#[path = "support/mod.rs"]
mod support;
