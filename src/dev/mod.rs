//! Tools for waltap's own tests and benchmarks: a throwaway PostgreSQL cluster
//! ([`localpg`], which `waltap demo` also uses) and, with the `dev` feature, the benchmark
//! harness and the low-level replication client the protocol tests drive.
//!
//! Public only with the `dev` feature (the crate's tests and examples turn it on); nothing
//! here is part of waltap's stable API.
#![cfg_attr(not(feature = "dev"), allow(dead_code, unused_imports))]
// Harness code for the crate's own tests and benchmarks, not user API: its items are
// not held to the public API's missing_docs rule.
#![allow(missing_docs)]

#[cfg(feature = "dev")]
pub mod bench;
pub mod localpg;
#[cfg(feature = "dev")]
pub mod nats;

/// The replication-protocol client, for tests that speak to a walsender directly.
#[cfg(feature = "dev")]
pub mod replication {
    pub use crate::replication::*;
}
