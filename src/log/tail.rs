//! The event log as a live feed for a subscription hub: how every member of a group serves
//! subscriptions while only the leader reads the slot (one walsender per group).
//!
//! The tail reads the events of one source after the last it delivered, in log order
//! (commit order), woken by the appender's notifications, and turns each stored event back
//! into a typed one with the watched database's column types. After each read that
//! reached the end of the log it also delivers a watermark: the progress mark read in the
//! same statement says every transaction committing at or below it is in the log, and so
//! has been delivered (the [`Watermark`] just above the mark is what an initial state
//! waits for, as it would on a slot).
//!
//! Invariants: deliveries never go backwards and never skip; a read that finds retention
//! deleted events the tail had not read yet ends the feed with [`TailError::Pruned`]
//! instead of silently jumping; a broken store connection is reopened with backoff and the
//! tail resumes after the last event it delivered, so nothing is missed or repeated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::postgres::NOTIFY_CHANNEL;
use super::typed::TableTypes;
use super::StoreError;
use crate::error::Error;
use crate::event::{Event, Position};
use crate::hub::{FeedHandle, FeedStarter};
use crate::lsn::{Lsn, Watermark};
use crate::pg::config::SourceConfig;
use crate::pg::quote_ident;
use crate::source::pipeline::Delivery;

/// Events read per statement.
const PAGE_EVENTS: i64 = 1000;

/// Deliveries queued between the tail and the hub's fan-out.
const QUEUE: usize = 1024;

/// Re-reads this often without a notification (one may be lost while the connection is
/// reopened; the progress mark also moves without events, for watermarks).
const RECHECK: Duration = Duration::from_secs(1);

/// How soon the types of a table are read again when its events keep showing columns the
/// last read did not have.
const TYPES_RETRY: Duration = Duration::from_secs(5);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One page of a source's events after a position, with the source's progress and pruned
/// marks read in the same snapshot (so the progress mark covers every row returned, and a
/// gap made by retention cannot go unnoticed).
const PAGE: &str = "WITH mark AS (
        SELECT coalesce(max(commit_lsn), 0) AS progress,
               coalesce(max(pruned_lsn), 0) AS lsn, coalesce(max(pruned_ordinal), -1) AS ord
        FROM waltap.progress WHERE source = $1)
    SELECT mark.progress, mark.lsn, mark.ord, e.commit_lsn, e.ordinal, e.body
    FROM mark LEFT JOIN LATERAL (
        SELECT commit_lsn, ordinal, event::text AS body
        FROM waltap.events
        WHERE source = $1 AND (commit_lsn, ordinal) > ($2, $3)
        ORDER BY commit_lsn, ordinal
        LIMIT $4) e ON true
    ORDER BY e.commit_lsn, e.ordinal";

/// Why the log's tail stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    /// Retention deleted events the tail had not delivered yet.
    #[error("retention deleted events of the log after {after} (through {pruned}) before the subscription hub read them; subscriptions missed changes")]
    Pruned {
        /// The last position delivered.
        after: Position,
        /// The last position retention deleted.
        pruned: Position,
    },
    /// Reading the log failed for good.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TailError {
    fn into_error(self) -> Error {
        Error::Log {
            transient: matches!(&self, TailError::Store(e) if e.is_transient()),
            source: Box::new(self),
        }
    }
}

/// A hub feed that tails the log of `source` in `store`, typing rows with the catalog of
/// `watched`.
pub(crate) fn feed(store: SourceConfig, source: String, watched: SourceConfig) -> FeedStarter {
    FeedStarter::new(move |down| {
        let (store, source, watched) = (store.clone(), source.clone(), watched.clone());
        Box::pin(async move {
            start(store, source, watched, down)
                .await
                .map_err(TailError::into_error)
        })
    })
}

async fn start(
    store: SourceConfig,
    source: String,
    watched: SourceConfig,
    down: Arc<AtomicBool>,
) -> Result<FeedHandle, TailError> {
    let mut tail = Tail {
        down,
        conn: None,
        page: None,
        catalog: None,
        same_database: store.describe() == watched.describe(),
        store,
        source,
        watched,
        after: Position::before_lsn(Lsn::ZERO),
        progress: 0,
        types: HashMap::new(),
    };
    tail.connect().await?;
    // From the log's end now: a hub delivers what commits from here on.
    let client = tail.client()?;
    let progress = super::postgres::progress(client, &tail.source)
        .await?
        .map_or(0, |m| m.lsn().0 as i64);
    let last: Option<(i64, i32)> = client
        .query_opt(
            "SELECT commit_lsn, ordinal FROM waltap.events WHERE source = $1
             ORDER BY commit_lsn DESC, ordinal DESC LIMIT 1",
            &[&tail.source],
        )
        .await
        .map_err(StoreError::sql("read the end of the log"))?
        .map(|r| (r.get(0), r.get(1)));
    tail.progress = progress;
    tail.after = Position::before_lsn(Lsn(progress as u64 + 1));
    if let Some((lsn, ordinal)) = last {
        tail.after = tail
            .after
            .max(Position::new(Lsn(lsn as u64), ordinal as u32));
    }
    let start = tail.after;
    let (tx, deliveries) = mpsc::channel(QUEUE);
    let stop = CancellationToken::new();
    tokio::spawn(tail.run(tx, stop.clone()));
    Ok(FeedHandle {
        start,
        deliveries,
        stop,
    })
}

type Notifications = mpsc::Receiver<tokio_postgres::Notification>;

struct Tail {
    store: SourceConfig,
    source: String,
    watched: SourceConfig,
    same_database: bool,
    conn: Option<(Client, Notifications)>,
    /// [`PAGE`], prepared on `conn`.
    page: Option<tokio_postgres::Statement>,
    /// The watched database, when the log lives elsewhere.
    catalog: Option<Client>,
    /// The last event delivered.
    after: Position,
    /// The last progress mark delivered as a watermark.
    progress: i64,
    types: HashMap<(String, String), Types>,
    /// The hub's flag: set while the log cannot be read.
    down: Arc<AtomicBool>,
}

/// A table's types as last read, and when (`None`: the table no longer exists).
struct Types {
    table: Option<TableTypes>,
    read_at: Instant,
}

/// How a read ended.
enum Read {
    /// At the end of the log.
    CaughtUp,
    /// The hub is gone.
    Closed,
}

impl Tail {
    async fn run(mut self, tx: mpsc::Sender<Result<Delivery, Error>>, stop: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                read = self.read(&tx) => read,
            };
            match read {
                Ok(Read::Closed) => return,
                Ok(Read::CaughtUp) => {
                    backoff = BACKOFF_MIN;
                    self.down.store(false, Ordering::Release);
                }
                Err(TailError::Store(e)) if e.is_transient() || self.conn.is_none() => {
                    self.down.store(true, Ordering::Release);
                    tracing::warn!(source = %self.source, error = %crate::error::report(&e), retry_in = ?backoff, "the subscription hub cannot read the event log; retrying");
                    self.conn = None;
                    self.catalog = None;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into_error())).await;
                    return;
                }
            }
            let Some((_, notifications)) = self.conn.as_mut() else {
                continue;
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                n = notifications.recv() => if n.is_none() {
                    // The connection ended; the next read reopens it.
                    self.conn = None;
                },
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    async fn connect(&mut self) -> Result<(), StoreError> {
        if self.conn.as_ref().is_some_and(|(c, _)| !c.is_closed()) {
            return Ok(());
        }
        let (client, notifications) = self.store.connect_sql_listening().await?;
        super::migrate(&client).await?;
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(NOTIFY_CHANNEL)))
            .await
            .map_err(StoreError::sql("listen for appends"))?;
        self.page = Some(
            client
                .prepare(PAGE)
                .await
                .map_err(StoreError::sql("prepare the log's page query"))?,
        );
        self.conn = Some((client, notifications));
        Ok(())
    }

    fn client(&self) -> Result<&Client, StoreError> {
        self.conn.as_ref().map(|(c, _)| c).ok_or_else(|| {
            StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the event log connection is not open",
            ))
        })
    }

    /// Delivers every event after the last one delivered, then the progress mark.
    async fn read(
        &mut self,
        tx: &mpsc::Sender<Result<Delivery, Error>>,
    ) -> Result<Read, TailError> {
        self.connect().await?;
        if let Some((_, notifications)) = self.conn.as_mut() {
            // Appends announced before this read are answered by it.
            while notifications.try_recv().is_ok() {}
        }
        loop {
            let rows = {
                let client = self.client()?;
                let Some(page) = &self.page else {
                    return Err(self
                        .client()
                        .err()
                        .unwrap_or(StoreError::Io(std::io::Error::other(
                            "the page query is not prepared",
                        )))
                        .into());
                };
                client
                    .query(
                        page,
                        &[
                            &self.source,
                            &(self.after.commit_lsn.0 as i64),
                            &(self.after.ordinal.min(i32::MAX as u32) as i32),
                            &PAGE_EVENTS,
                        ],
                    )
                    .await
                    .map_err(StoreError::sql("read the log"))?
            };
            let Some(first) = rows.first() else {
                return Ok(Read::CaughtUp);
            };
            let progress: i64 = first.get(0);
            let pruned = Position::new(
                Lsn(first.get::<_, i64>(1) as u64),
                first.get::<_, i32>(2).max(0) as u32,
            );
            if first.get::<_, i64>(1) > 0 && pruned > self.after {
                return Err(TailError::Pruned {
                    after: self.after,
                    pruned,
                });
            }
            let mut read = 0;
            for row in &rows {
                let (Some(lsn), Some(ordinal), Some(body)) = (
                    row.get::<_, Option<i64>>(3),
                    row.get::<_, Option<i32>>(4),
                    row.get::<_, Option<String>>(5),
                ) else {
                    continue; // the empty page's one row, carrying only the marks
                };
                read += 1;
                let at = Position::new(Lsn(lsn as u64), ordinal as u32);
                let ev = self.typed(&body, at).await?;
                if tx.send(Ok(Delivery::Event(ev))).await.is_err() {
                    return Ok(Read::Closed);
                }
                self.after = at;
            }
            if read < PAGE_EVENTS {
                if progress > self.progress {
                    self.progress = progress;
                    // Every commit at or below the mark is delivered: the watermark just
                    // above it is passed.
                    let passed = Watermark::at(Lsn(progress as u64 + 1));
                    if tx.send(Ok(Delivery::Watermark(passed))).await.is_err() {
                        return Ok(Read::Closed);
                    }
                }
                return Ok(Read::CaughtUp);
            }
        }
    }

    /// The stored event with typed values.
    async fn typed(&mut self, body: &str, at: Position) -> Result<Event, StoreError> {
        let ev: Event<Json> = serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
            position: at.to_string(),
            message: e.to_string(),
        })?;
        let key = (ev.schema.to_string(), ev.table.to_string());
        // The first event after a change of the table's columns carries it.
        let stale = match self.types.get(&key) {
            None => true,
            Some(_) if ev.schema_change.is_some() => true,
            Some(t) => {
                let covered = t.table.as_ref().is_some_and(|t| t.covers(&ev));
                !covered && t.read_at.elapsed() >= TYPES_RETRY
            }
        };
        if stale {
            let table = self.read_types(&ev).await?;
            let read_at = Instant::now();
            self.types.insert(key.clone(), Types { table, read_at });
        }
        Ok(match self.types.get(&key).and_then(|t| t.table.as_ref()) {
            Some(types) => types.typed_exact(&ev),
            None => TableTypes::untyped(&ev),
        })
    }

    async fn read_types(&mut self, ev: &Event<Json>) -> Result<Option<TableTypes>, StoreError> {
        let table = crate::event::TableName {
            schema: ev.schema.to_string(),
            table: ev.table.to_string(),
        };
        if !self.same_database && self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            self.catalog = Some(self.watched.connect_sql().await?);
        }
        let client = match &self.catalog {
            Some(c) if !self.same_database => c,
            _ => self.client()?,
        };
        let schema = crate::pg::catalog::table_schema(client, &table)
            .await
            .map_err(StoreError::sql("read a table's columns"))?;
        Ok(schema.map(|s| TableTypes::new(table, s)))
    }
}
