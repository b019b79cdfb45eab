pub mod config;
pub mod lsn;
pub mod replication;
pub mod tls;
