//! A bounded pool of SQL connections ([`SqlPool`]), for every part of waltap that runs
//! short statements on behalf of many callers: the server's handlers, stream consumers.
//!
//! A caller holds a connection for one statement (or a short run of them) and returns it
//! by dropping it, so one slow statement occupies one connection and never queues the
//! others behind it, as a single shared connection would.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::config::{ConfigError, SourceConfig};

/// How long a statement waits for a free connection before failing.
pub const POOL_WAIT: Duration = Duration::from_secs(30);

/// A pooled connection; derefs to a `tokio_postgres::Client`.
pub type PooledClient = deadpool_postgres::Object;

/// Why no pooled connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Opening a new connection failed.
    #[error("cannot open a pooled connection")]
    Connect(#[source] tokio_postgres::Error),
    /// Every connection stayed busy for [`POOL_WAIT`].
    #[error(
        "no database connection free within {wait:?} (all {size} in use): raise the pool size"
    )]
    Exhausted {
        /// The pool's size.
        size: usize,
        /// How long the caller waited.
        wait: Duration,
    },
    /// The connection settings are unusable (e.g. the TLS root certificate).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool could not be made or used.
    #[error("connection pool: {0}")]
    Pool(String),
}

/// How busy a pool is, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Most connections it opens.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open and idle.
    pub available: usize,
    /// Callers waiting for one.
    pub waiting: usize,
}

/// Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqlPool {
    pool: Pool,
}

impl std::fmt::Debug for SqlPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlPool")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl SqlPool {
    /// At most `size` connections to `db`, each opened when first needed (with the
    /// config's TLS, timeouts and keepalives) and checked when reused.
    pub fn new(db: &SourceConfig, size: usize) -> Result<SqlPool, PoolError> {
        Self::with_settings(db, size, &[])
    }

    /// As [`SqlPool::new`], with each `(name, value)` setting made on every connection as
    /// it opens (`-c name=value` after the URL's own `options`). Values are plain words.
    pub fn with_settings(
        db: &SourceConfig,
        size: usize,
        settings: &[(&str, &str)],
    ) -> Result<SqlPool, PoolError> {
        let mut pg = db.pg().clone();
        if !settings.is_empty() {
            let mut options = pg.get_options().unwrap_or_default().to_owned();
            for (name, value) in settings {
                options.push_str(&format!(" -c {name}={value}"));
            }
            pg.options(options.trim_start());
        }
        if pg.get_application_name().is_none() {
            pg.application_name("waltap");
        }
        let config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match db.rustls_config()? {
            Some(cfg) => Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new((*cfg).clone()),
                config,
            ),
            None => Manager::from_config(pg, tokio_postgres::NoTls, config),
        };
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(db.connect_timeout()))
            .wait_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| PoolError::Pool(e.to_string()))?;
        Ok(SqlPool { pool })
    }

    /// A connection for one statement (or a few in a row); return it by dropping it.
    /// Waits up to [`POOL_WAIT`] while all are busy.
    pub async fn get(&self) -> Result<PooledClient, PoolError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => PoolError::Connect(source),
            deadpool_postgres::PoolError::Timeout(_) => PoolError::Exhausted {
                size: self.pool.status().max_size,
                wait: POOL_WAIT,
            },
            other => PoolError::Pool(other.to_string()),
        })
    }

    /// How busy it is now.
    pub fn status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    }
}
