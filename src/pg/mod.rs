//! Talking to Postgres as a client: where to connect ([`SourceConfig`], TLS), what went
//! wrong ([`error_text`]), what the catalog says about tables and publications, and how a
//! name is quoted into SQL.
//!
//! Everything that opens a SQL connection (setup, snapshots, the event log, the server)
//! goes through here, so TLS, timeouts and keepalives are decided in one place. The
//! replication protocol has its own client in `replication`, which uses the same
//! [`SourceConfig`].

pub mod catalog;
pub mod config;
pub mod error;
pub mod pool;
pub mod tls;

pub use config::SourceConfig;
pub use pool::{PoolError, PoolStatus, PooledClient, SqlPool};
pub use tls::TlsMode;

/// Quotes an SQL identifier (`"a""b"`). Every name that reaches SQL text (schemas, tables,
/// publications) goes through this; nothing is formatted raw.
pub fn quote_ident(ident: &str) -> String {
    postgres_protocol::escape::escape_identifier(ident)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quotes_identifiers() {
        assert_eq!(super::quote_ident(r#"my"tab"#), r#""my""tab""#);
        assert_eq!(super::quote_ident("Order"), r#""Order""#);
    }
}
