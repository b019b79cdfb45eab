//! The connections stream consumers share: a bounded pool for their queries and one
//! `LISTEN` connection whose append notifications wake every reader of this process.
//!
//! A consumer holds a pooled connection only for the duration of one statement, so any
//! number of consumers share `size` connections (plus the listening one): the count of
//! consumers is bounded by the server's connection caps, not by `max_connections`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::postgres::NOTIFY_CHANNEL;
use super::{EventLog, StoreError};
use crate::pg::config::SourceConfig;
use crate::pg::SqlPool;

/// Connections a [`ConsumerPool`] opens by default.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Wake-ups buffered per reader; one that falls behind just looks again.
const WAKE_BUFFER: usize = 64;

/// A wake-up for readers: the source whose events were appended, or `None` after the
/// listening connection was (re)opened, when notifications may have been missed.
pub(crate) type Wake = Option<Arc<str>>;

/// A pooled connection.
pub(crate) type Conn = crate::pg::PooledClient;

/// Shared by every consumer opened on it; cheap to clone. Dropping the last clone closes
/// the listening connection.
#[derive(Clone)]
pub struct ConsumerPool {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlPool,
    /// Set once the log's schema was found up to date (see [`ConsumerPool::migrated`]).
    migrated: tokio::sync::OnceCell<()>,
    log: EventLog,
    wake: broadcast::Sender<Wake>,
    _listening: DropGuard,
}

impl std::fmt::Debug for ConsumerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerPool")
            .field("pool", &self.inner.pool)
            .finish_non_exhaustive()
    }
}

impl ConsumerPool {
    /// A pool of at most `size` connections to the log at `store` (none is opened before
    /// it is needed), and the listening connection, opened now in the background and
    /// reopened with backoff when it breaks. Needs a Tokio runtime.
    pub fn new(store: &SourceConfig, size: usize) -> Result<ConsumerPool, StoreError> {
        Self::reading(store, size, EventLog::Postgres)
    }

    /// As [`ConsumerPool::new`], for consumers whose events come from `log`.
    pub fn reading(
        store: &SourceConfig,
        size: usize,
        log: EventLog,
    ) -> Result<ConsumerPool, StoreError> {
        // Generic plans for every statement: a page of the log read right after a burst of
        // appends, before autovacuum analyzed the table, was planned from statistics
        // that counted a few hundred rows after the cursor, so the planner scanned every
        // row after it and sorted them (188 ms for a page of 1,000 at 150,000 rows
        // behind, against 1.6 ms by the index) for the first five pages of each pooled
        // connection, until Postgres switched to the generic plan by itself.
        let pool =
            SqlPool::with_settings(store, size, &[("plan_cache_mode", "force_generic_plan")])?;
        let (wake, _) = broadcast::channel(WAKE_BUFFER);
        let stop = CancellationToken::new();
        tokio::spawn(listen(store.clone(), wake.clone(), stop.clone()));
        Ok(ConsumerPool {
            inner: Arc::new(Inner {
                pool,
                migrated: tokio::sync::OnceCell::new(),
                log,
                wake,
                _listening: stop.drop_guard(),
            }),
        })
    }

    /// A connection for one statement (or a few in a row); return it by dropping it.
    pub(crate) async fn get(&self) -> Result<Conn, StoreError> {
        Ok(self.inner.pool.get().await?)
    }

    /// Brings the log's schema up to date on `client` the first time it is asked, and
    /// answers from memory after that: a consumer opens per feed request, and reading
    /// the migrations table each time was a round trip of every request.
    pub(crate) async fn migrated(&self, client: &Conn) -> Result<(), StoreError> {
        self.inner
            .migrated
            .get_or_try_init(|| super::migrate(client))
            .await
            .map(|_| ())
    }

    /// The pool itself, for other statements of the same process (the server's).
    pub(crate) fn sql(&self) -> &SqlPool {
        &self.inner.pool
    }

    /// Where consumers read events.
    pub fn log(&self) -> &EventLog {
        &self.inner.log
    }

    /// Wake-ups from now on.
    pub(crate) fn wake_ups(&self) -> broadcast::Receiver<Wake> {
        self.inner.wake.subscribe()
    }
}

/// Holds the `LISTEN` connection until `stop`, reopening it with backoff.
async fn listen(store: SourceConfig, wake: broadcast::Sender<Wake>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let opened = async {
            let (client, notifications) = store.connect_sql_listening().await?;
            client
                .batch_execute(&format!(
                    "LISTEN {}",
                    crate::pg::quote_ident(NOTIFY_CHANNEL)
                ))
                .await
                .map_err(StoreError::sql("listen for appends"))?;
            Ok::<_, StoreError>((client, notifications))
        };
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = opened => opened,
        };
        match opened {
            Ok((_client, mut notifications)) => {
                backoff = Duration::from_millis(200);
                // Appends while no connection listened are found by looking again.
                let _ = wake.send(None);
                loop {
                    let n = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = notifications.recv() => n,
                    };
                    match n {
                        Some(n) if n.channel() == NOTIFY_CHANNEL => {
                            let _ = wake.send(Some(Arc::from(n.payload())));
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                tracing::warn!("the connection listening for appends closed; reopening");
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::report(&e), retry_in = ?backoff, "cannot listen for appends yet");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
