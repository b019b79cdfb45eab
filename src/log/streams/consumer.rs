//! Opening a stream for reading: the lease, the resume point, the copy of an initial
//! state on first open, and the [`StreamConsumer`] handed to the caller.

use super::cursor::{Cursor, Mark};
use super::lease::{busy_or_missing, release_lease, Progress, Shared};
use super::reader::{Reader, SnapshotPhase};
use super::OpenOptions;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::event::{Position, TableName};
use crate::filter::Filter;
use crate::hub::SubscriptionItem;
use crate::log::pool::ConsumerPool;
use crate::log::{EventLog, StoreError};
use crate::pg::config::SourceConfig;
use crate::pg::pool::PooledClient;

/// What a [`StreamConsumer`] yields: first [`StreamItem::Initialized`] with the cursor the
/// consumer resumes after (the position before every event when the log held nothing for
/// the stream's source when it was made or reset), then [`StreamItem::Event`]s with rows as
/// the log stored them ([`RawRow`]; [`typed`](super::typed) reads them into your own
/// types). Serialized as `{"type": "initialized", "position": ...}` and plain events (no
/// `type` field).
pub type StreamItem = SubscriptionItem<RawRow>;

/// A row as the log stored it: JSON text, checked when read, parsed no further. A stream
/// hands rows on as they are, so keeping them as text spares every event a parse into a
/// value tree and a serialization back.
pub type RawRow = Box<serde_json::value::RawValue>;

/// A consumer of one stream: a [`futures::Stream`] of [`StreamItem`]s (the initialized
/// marker, then its events in position order), and [`StreamConsumer::ack`]. The stream
/// ends with the first error (reopen to go on).
pub struct StreamConsumer {
    pub(super) shared: Arc<Shared>,
    pub(super) reader: Pin<Box<dyn Stream<Item = Result<StreamItem, StoreError>> + Send>>,
    pub(super) released: bool,
}

impl std::fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("name", &self.shared.name)
            .field("holder", &self.shared.holder)
            .finish_non_exhaustive()
    }
}

/// Opens stream `name` in the log at `store` for reading: takes its lease, and yields
/// [`StreamItem::Initialized`] with its cursor, then what comes after that cursor, then
/// new events as they are appended.
///
/// Fails with [`StoreError::StreamBusy`] while another consumer holds it,
/// [`StoreError::StaleCursor`] when retention deleted events it has not acknowledged, and
/// [`StoreError::NoSuchStream`].
pub async fn open(
    store: &SourceConfig,
    name: &str,
    options: OpenOptions,
) -> Result<StreamConsumer, StoreError> {
    // Two: one for the reader's statement and one for an acknowledgement meanwhile.
    open_pooled(&ConsumerPool::new(store, 2)?, store, name, options).await
}

/// As [`open`], with connections from `pool` (the log at `store`), which any number of
/// consumers may share.
pub async fn open_pooled(
    pool: &ConsumerPool,
    store: &SourceConfig,
    name: &str,
    options: OpenOptions,
) -> Result<StreamConsumer, StoreError> {
    // Subscribed before the first read: an append after it wakes the reader.
    let notifications = pool.wake_ups();
    let client = pool.get().await?;
    pool.migrated(&client).await?;
    let holder = ulid::Ulid::new().to_string();
    let lease = options.lease.max(Duration::from_millis(10));
    let take = client
        .prepare_cached(
            "UPDATE waltap.streams
             SET lease_holder = $2, lease_expires_at = now() + make_interval(secs => $3)
             WHERE name = $1
               AND (lease_holder IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= now())
             RETURNING source, tables, filter::text, cursor_lsn, cursor_ordinal,
                       snapshot_state, snapshot_acked, snapshot_total,
                       delivered_lsn, delivered_ordinal, snapshot_delivered",
        )
        .await
        .map_err(StoreError::sql("take a stream's lease"))?;
    let row = client
        .query_opt(&take, &[&name, &holder, &lease.as_secs_f64()])
        .await
        .map_err(StoreError::sql("take a stream's lease"))?;
    let Some(row) = row else {
        return Err(busy_or_missing(&client, name).await);
    };
    let (client, row) = if row.get::<_, Option<String>>(5).as_deref() == Some("pending") {
        let at = CopyAt {
            store,
            log: pool.log(),
        };
        copy_detached(client, at, &options, name, &holder, row).await?
    } else {
        (client, row)
    };
    let acked = Mark {
        lsn: row.get(3),
        ordinal: row.get(4),
    };
    let delivered = match (row.get(8), row.get(9)) {
        (Some(lsn), Some(ordinal)) => acked.max(Mark { lsn, ordinal }),
        _ => acked,
    };
    let shared = Arc::new(Shared {
        pool: pool.clone(),
        name: name.to_owned(),
        holder,
        lease,
        state: Mutex::new(Progress {
            acked,
            yielded: None,
            delivered,
            snapshot_delivered: row.get(10),
            quiet_through: None,
            renewed_at: Instant::now(),
            snapshot_open: false,
            snapshot_acked: 0,
        }),
    });
    let mut consumer = StreamConsumer {
        shared: shared.clone(),
        reader: Box::pin(futures::stream::empty()),
        released: false,
    };
    // From here on, a failure releases the lease (dropping `consumer`).
    let mut snapshot =
        (row.get::<_, Option<String>>(5).as_deref() == Some("ready")).then(|| SnapshotPhase {
            next: row.get::<_, i64>(6),
            total: row.get::<_, i64>(7),
            out: VecDeque::new(),
        });
    {
        let mut state = shared.state();
        state.snapshot_open = snapshot.is_some();
        if let Some(phase) = &snapshot {
            state.snapshot_acked = phase.next;
        }
    }
    if let Some(cursor) = options.acknowledged {
        if let Err(e) = resume_after(&shared, &mut snapshot, cursor).await {
            // Refused: nothing changed, and the lease is free again at once.
            consumer.close().await;
            return Err(e);
        }
    }
    let cursor = shared.state().acked;
    drop(client);
    let mut reader = match Reader::new(shared, &row, &options, notifications).await {
        Ok(reader) => reader,
        Err(e) => {
            // Released now, not in the background: a process that exits on this error
            // (`waltap stream tail` on `stale_cursor`) would otherwise leave the lease
            // held until it expires, and the advised `reset` would fail with stream_busy.
            consumer.close().await;
            return Err(e);
        }
    };
    reader.snapshot = snapshot;
    // Always a real position, resumable with `from`: a cursor at LSN 0 (the log was empty
    // when it was set) is the position before every event.
    let initialized = StreamItem::Initialized {
        position: Some(cursor.position()),
    };
    let events = futures::stream::unfold(reader, |mut r| async move {
        let item = r.next_stream_item().await?;
        Some((item, r))
    });
    consumer.reader = Box::pin(futures::stream::once(async move { Ok(initialized) }).chain(events));
    Ok(consumer)
}

/// Acknowledges what a reopening consumer says it has handled, when the stream did
/// deliver that much.
pub(super) async fn resume_after(
    shared: &Shared,
    snapshot: &mut Option<SnapshotPhase>,
    cursor: Cursor,
) -> Result<(), StoreError> {
    let client = shared.pool.get().await?;
    match cursor {
        Cursor::Snapshot(seq) => {
            let seq = shared.check_snapshot_delivered(seq)?;
            if let Some(phase) = snapshot.as_mut() {
                let seq = seq.min(phase.total);
                shared.ack_snapshot(&client, Some(seq)).await?;
                phase.next = phase.next.max(seq);
            }
        }
        Cursor::Position(p) => {
            let to = Mark::checked(p)?;
            shared.check_delivered(to, false)?;
            // The marker's position (the cursor) or a change after it acknowledges the
            // whole initial state (see [`Cursor`]); a position before it changes nothing.
            if to >= shared.state().acked {
                if snapshot.take().is_some() {
                    shared.ack_snapshot(&client, None).await?;
                }
                if to > shared.state().acked {
                    shared.store_cursor(&client, to).await?;
                }
            }
        }
    }
    Ok(())
}

/// Makes the copy of a stream's initial state on a task of its own, so that it completes
/// even when the caller stops waiting (an HTTP client that timed out, a consumer that
/// went away): otherwise a copy longer than the client's patience would be started again
/// and again and never finish. The lease is released when nobody waits for the result.
///
/// A failure releases the lease only when it expires; the copy is one store transaction,
/// so nothing half-made stays behind. The lease is renewed meanwhile on a connection of
/// its own, not a second one from the pool: consumers copying at once would otherwise
/// each hold one and wait for another.
async fn copy_detached(
    client: PooledClient,
    at: CopyAt<'_>,
    options: &OpenOptions,
    name: &str,
    holder: &str,
    row: tokio_postgres::Row,
) -> Result<(PooledClient, tokio_postgres::Row), StoreError> {
    let (store, log, options) = (at.store.clone(), at.log.clone(), options.clone());
    let (task_name, holder) = (name.to_owned(), holder.to_owned());
    let (done, waiting) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let name = task_name;
        let copied = async {
            let renewer = store.connect_sql().await?;
            let at = CopyAt {
                store: &store,
                log: &log,
            };
            copy_initial_state(&client, &renewer, at, &options, &name, &holder, &row).await
        }
        .await;
        if let Err(Ok((client, _))) = done.send(copied.map(|row| (client, row))) {
            tracing::info!(stream = %name, "initial state copied for a consumer that left; releasing the lease");
            release_lease(&client, &name, &holder).await;
        }
    });
    waiting.await.unwrap_or_else(|_| {
        // The task panicked: no result, and the lease expires.
        Err(StoreError::LeaseLost {
            name: name.to_owned(),
        })
    })
}

/// Where a stream's initial state is copied: the store (the stream's row, the copied
/// rows) and the log its snapshot is placed in.
#[derive(Clone, Copy)]
pub(super) struct CopyAt<'a> {
    pub(super) store: &'a SourceConfig,
    pub(super) log: &'a EventLog,
}

/// Makes the copy of a stream's initial state ([`crate::log::initial::materialize`]) while
/// renewing the lease on `renewer`; returns the stream's row as `open` reads it.
pub(super) async fn copy_initial_state(
    client: &Client,
    renewer: &Client,
    at: CopyAt<'_>,
    options: &OpenOptions,
    name: &str,
    holder: &str,
    row: &tokio_postgres::Row,
) -> Result<tokio_postgres::Row, StoreError> {
    let source: String = row.get(0);
    let tables: Vec<TableName> = row
        .get::<_, Vec<String>>(1)
        .iter()
        .map(|t| TableName::parse(t))
        .collect();
    let filter: Option<Filter> = row
        .get::<_, Option<String>>(2)
        .map(|f| {
            f.parse::<Filter>().map_err(|e| StoreError::Corrupt {
                position: format!("stream {name}"),
                message: format!("stored filter: {e}"),
            })
        })
        .transpose()?;
    let store = at.store;
    let watched = options.catalog.as_ref().unwrap_or(store);
    let catalog = watched.connect_sql().await?;
    let lease = options.lease.max(Duration::from_millis(10));
    let rows = crate::log::initial::StreamRows {
        name,
        source: &source,
        tables: &tables,
        filter: filter.as_ref(),
    };
    let copy = crate::log::initial::materialize(at.log, client, store, &catalog, watched, &rows);
    let renew = async {
        loop {
            tokio::time::sleep(lease / 3).await;
            let n = renewer
                .execute(
                    "UPDATE waltap.streams SET lease_expires_at = now() + make_interval(secs => $3)
                     WHERE name = $1 AND lease_holder = $2",
                    &[&name, &holder, &lease.as_secs_f64()],
                )
                .await
                .map_err(StoreError::sql("renew a stream's lease"))?;
            if n == 0 {
                return Err::<(), _>(StoreError::LeaseLost {
                    name: name.to_owned(),
                });
            }
        }
    };
    let rows = tokio::select! {
        copied = copy => copied?,
        lost = renew => return Err(lost.err().unwrap_or(StoreError::LeaseLost { name: name.to_owned() })),
    };
    tracing::info!(stream = %name, rows, "initial state copied");
    client
        .query_one(
            "SELECT source, tables, filter::text, cursor_lsn, cursor_ordinal,
                    snapshot_state, snapshot_acked, snapshot_total,
                    delivered_lsn, delivered_ordinal, snapshot_delivered
             FROM waltap.streams WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(StoreError::sql("read a stream"))
}

impl StreamConsumer {
    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// True while the reader has read everything the log holds for the stream and waits
    /// for appends, with every event it read handed out: a poll that finds nothing now
    /// finds nothing until the next append.
    pub fn is_idle(&self) -> bool {
        self.shared.state().quiet_through.is_some()
    }

    /// The last acknowledged position.
    pub fn cursor(&self) -> Position {
        self.shared.state().acked.position()
    }

    /// What the consumer has acknowledged, as the cursor to resume after: while the
    /// initial state is not all acknowledged, its last acknowledged row (`snapshot-0`
    /// before the first), since the position stands after the rows.
    pub fn acknowledged(&self) -> Cursor {
        let state = self.shared.state();
        if state.snapshot_open {
            Cursor::Snapshot(state.snapshot_acked.max(0) as u64)
        } else {
            Cursor::Position(state.acked.position())
        }
    }

    /// Acknowledges every event up to and including `position`: they are not delivered
    /// again, to this consumer or a later one. Positions at or before the cursor change
    /// nothing. Acknowledge only positions you received: everything before one counts as
    /// handled. Renews the lease.
    pub async fn ack(&self, position: Position) -> Result<(), StoreError> {
        self.acker().ack(position).await
    }

    /// Acknowledges the rows of the initial state up to and including `seq`
    /// (the row's `seq`): a consumer that reopens the stream resumes after it. The
    /// `snapshotComplete` marker is acknowledged by its position ([`StreamConsumer::ack`]),
    /// as is everything before a change.
    pub async fn ack_snapshot(&self, seq: u64) -> Result<(), StoreError> {
        self.ack_cursor(Cursor::Snapshot(seq)).await
    }

    /// Acknowledges up to `cursor`: a change's position or an initial-state row.
    pub async fn ack_cursor(&self, cursor: Cursor) -> Result<(), StoreError> {
        self.acker().ack_cursor(cursor).await
    }

    /// A handle that acknowledges for this consumer without borrowing it, so that one
    /// task can acknowledge while the consumer is being read (e.g. a server session).
    pub fn acker(&self) -> StreamAcker {
        StreamAcker {
            shared: self.shared.clone(),
        }
    }

    /// Releases the lease now, so that another consumer may open the stream at once.
    /// Dropping the consumer does the same in the background, best effort.
    pub async fn close(mut self) {
        self.released = true;
        self.shared.release().await;
    }
}

/// Acknowledges for a [`StreamConsumer`] ([`StreamConsumer::acker`]); valid while the
/// consumer holds the lease.
#[derive(Clone)]
pub struct StreamAcker {
    pub(super) shared: Arc<Shared>,
}

impl StreamAcker {
    /// As [`StreamConsumer::ack`].
    pub async fn ack(&self, position: Position) -> Result<(), StoreError> {
        let mut to = Mark::checked(position)?;
        self.shared.check_delivered(to, true)?;
        let finishes_snapshot = {
            let state = self.shared.state();
            state.snapshot_open && to >= state.acked
        };
        if finishes_snapshot {
            // The marker's position or a change after it (see [`Cursor`]).
            let client = self.shared.pool.get().await?;
            self.shared.ack_snapshot(&client, None).await?;
        }
        {
            let state = self.shared.state();
            if let Some(quiet) = state.quiet_through {
                // Everything handed out is acknowledged and nothing more is owed up to
                // `quiet`: the events in between were all filtered out.
                if state.yielded.is_none_or(|y| to >= y) && quiet > to {
                    to = quiet;
                }
            }
            if to <= state.acked {
                return Ok(());
            }
        }
        let client = self.shared.pool.get().await?;
        self.shared.store_cursor(&client, to).await
    }

    /// As [`StreamConsumer::ack_cursor`].
    pub async fn ack_cursor(&self, cursor: Cursor) -> Result<(), StoreError> {
        match cursor {
            Cursor::Position(p) => self.ack(p).await,
            Cursor::Snapshot(seq) => {
                let seq = self.shared.check_snapshot_delivered(seq)?;
                if !self.shared.state().snapshot_open {
                    return Ok(());
                }
                let client = self.shared.pool.get().await?;
                self.shared.ack_snapshot(&client, Some(seq)).await
            }
        }
    }
}

impl Drop for StreamConsumer {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(async move { shared.release().await });
        }
    }
}

impl Stream for StreamConsumer {
    type Item = Result<StreamItem, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.reader.as_mut().poll_next(cx)
    }
}
