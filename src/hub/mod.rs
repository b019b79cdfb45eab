//! Ephemeral fan-out: one listener, any number of filtered subscribers (`subscribe`).
//!
//! The hub owns one [`Listener`] and one task. Each subscriber has its own compiled filter
//! and its own bounded queue. Guarantees (README, "Filters and subscriptions"):
//!
//! - at-most-once, from now on: the hub acknowledges every event as soon as it has been
//!   offered to the subscribers, so the slot never waits for a subscriber;
//! - a subscriber whose queue is full is cut off with [`SubscriptionError::Lagged`] after
//!   the events it already has; the others and the slot go on unaffected;
//! - the first item of a subscription is [`SubscriptionItem::Initialized`]; every change
//!   committed after the caller holds it is delivered, because subscribers join only
//!   between transactions and the marker is sent when they have joined;
//! - `tx.index` / `tx.total` / `tx.last` count the events this subscriber receives from the
//!   transaction; `total` is absent when the transaction was too large to hold;
//! - a subscription whose filter pins one row by its whole primary key (`where` with an
//!   equality on every key column and nothing else) completes: its last item is
//!   [`SubscriptionItem::Completed`], after the transaction that deleted the row (or moved
//!   its key away, or truncated the table), or right after the initial state when the
//!   row does not exist;
//! - a dropped subscription is removed at once, and its queue is freed with it;
//! - when the replication connection breaks (walsender terminated, Postgres restarted),
//!   every open subscription ends with [`SubscriptionError::Source`] (changes may have been
//!   missed: subscribe again), and the hub starts a new listener with backoff; meanwhile
//!   [`Hub::is_streaming`] is false and subscribing fails with
//!   [`SubscriptionError::Unavailable`].
//!
//! ```no_run
//! use futures::StreamExt;
//! use waltap::{Filter, Hub, HubConfig, ListenerConfig, SourceConfig, SubscriptionItem};
//!
//! #[derive(serde::Deserialize)]
//! struct User { id: i64, plan: String }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let source = SourceConfig::parse("postgres://postgres@localhost/app")?;
//! let hub = Hub::start(HubConfig::new(ListenerConfig::new(source))).await?;
//! let filter: Filter = serde_json::from_str(
//!     r#"{"where": {"plan": {"in": ["pro", "team"]}}, "transitions": true}"#,
//! )?;
//! let mut paying = hub.subscribe("public.users", Some(filter)).await?;
//! while let Some(item) = paying.next().await {
//!     match item? {
//!         SubscriptionItem::Initialized { .. } => println!("live"),
//!         SubscriptionItem::Event(ev) => {
//!             let transition = ev.transition;
//!             let ev: waltap::Event<User> = ev.into_typed()?;
//!             if let Some(user) = ev.after() {
//!                 println!("{:?} user {} on {}", transition, user.id, user.plan);
//!             }
//!         }
//!         _ => {} // initial-state items, when asked for (SubscribeOptions)
//!     }
//! }
//! # Ok(()) }
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

mod fanout;
mod initial;

use std::collections::VecDeque;

use crate::error::{Error, ErrorCode, TableError};
use crate::event::{Event, Position, Row, TableName};
use crate::filter::{CompiledFilter, Filter, FilterError, FilteredView};
use crate::initial::{SnapshotError, SnapshotRow};
use crate::lsn::{Lsn, Watermark};
use crate::pg::catalog;
use crate::source::pipeline::{Delivery, Listener, ListenerConfig};

/// Commits the hub remembers (xid, commit LSN) so that an initial state can check that
/// none it misses had committed just before its subscriber joined.
const RECENT_COMMITS: usize = 4096;

/// Settings of a hub.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// The source the hub's one listener streams from.
    pub listener: ListenerConfig,
    /// Events queued per subscriber before it counts as lagging.
    pub subscriber_queue: usize,
    /// Hold events back until [`Hub::resume`], so subscribers made meanwhile see a
    /// backlog from its start (catch-up measurements, controlled start-up).
    pub start_paused: bool,
    /// When the first replication connection fails in a way that retrying can fix
    /// (Postgres restarting or unreachable), start anyway, not streaming, and reconnect as
    /// after a lost connection: for a long-running server. Other errors still fail.
    pub start_offline: bool,
}

impl HubConfig {
    /// Settings with a queue of 1024 events per subscriber, not paused.
    pub fn new(listener: ListenerConfig) -> Self {
        HubConfig {
            listener,
            subscriber_queue: 1024,
            start_paused: false,
            start_offline: false,
        }
    }
}

/// What a subscription yields, and with JSON rows (`R` = [`serde_json::Value`]) a
/// persisted stream ([`crate::log::streams::StreamItem`]): first one
/// [`SubscriptionItem::Initialized`], then changes, and for a subscription that follows
/// one row, a last [`SubscriptionItem::Completed`]. On the wire a control item is an
/// object with a `type` (`{"type": "initialized", "position": ...}`); an event has none.
// Events are nearly every item; boxing them would add an allocation per delivery.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
#[non_exhaustive]
pub enum SubscriptionItem<R = Row> {
    /// Live from here: every change committed after this arrives is delivered.
    /// `position`: for a subscription, the position after which the changes it delivers
    /// lie (the last one the hub had seen, or where its slot started streaming); for a
    /// stream, the cursor it resumes after (`0000000000000000-0000000000` when the log
    /// held nothing for its source when it was made or reset). Always set.
    Initialized {
        /// The position described above; always `Some`.
        position: Option<Position>,
    },
    /// The initial state is complete: the changes that follow are exactly those after
    /// `position` (always set for a subscription; a stream always gives one too, the
    /// cursor that acknowledges the marker).
    SnapshotComplete {
        /// The position described above.
        position: Option<Position>,
    },
    /// The last item of a subscription whose filter pins one row by its whole primary key
    /// ([`crate::filter::CompiledFilter::single_row_key`]): the row is gone, or was not
    /// there. `position`: the last position that accounts for it (the end of the
    /// deleting transaction, or the initial state's position). Persisted streams never
    /// complete.
    Completed {
        /// Whether the row was deleted or never found.
        reason: CompletionReason,
        /// The position described above.
        position: Position,
    },
    /// A row of the initial state, when it was asked for (serialized with
    /// `"action": "snapshot"` and no `type` field).
    #[serde(untagged)]
    Snapshot(SnapshotRow<R>),
    /// A change that passed the filter (serialized without a `type` field).
    #[serde(untagged)]
    Event(Event<R>),
}

/// Why a subscription that follows one row completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CompletionReason {
    /// A transaction deleted the row, moved its key away, or truncated the table (and
    /// did not put the row back).
    Deleted,
    /// The initial state did not have the row.
    NotFound,
}

/// Why a subscription ended or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// The subscriber did not keep up and was cut off.
    #[error("subscriber too slow: its queue of {queue} events was full, so it was cut off (subscribe is at-most-once; use a persisted stream to catch up)")]
    Lagged {
        /// The size of its queue, in events ([`HubConfig::subscriber_queue`]).
        queue: usize,
    },
    /// The filter does not compile against the table.
    #[error("bad filter")]
    BadFilter(#[from] FilterError),
    /// The table is unknown or ambiguous.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The hub's replication connection broke (the cause is logged): changes may have
    /// been missed, and the hub reconnects.
    #[error("the subscription hub lost its replication connection, so changes may have been missed; it is reconnecting: subscribe again")]
    Source(Arc<Error>),
    /// The hub is between replication connections; no subscription can start now.
    #[error("the subscription hub is reconnecting to Postgres: subscribe again shortly")]
    Unavailable,
    /// The hub was shut down.
    #[error("the hub has stopped")]
    HubStopped,
    /// Looking up the table or a query for the subscription failed.
    #[error(transparent)]
    Sql(#[from] Error),
    /// Reading the initial state failed.
    #[error("initial state")]
    Snapshot(#[from] SnapshotError),
}

impl SubscriptionError {
    /// A stable code for the wire (`lagged`, `bad_filter`, ...).
    pub fn code(&self) -> ErrorCode {
        match self {
            SubscriptionError::Lagged { .. } => ErrorCode::Lagged,
            SubscriptionError::BadFilter(_) => ErrorCode::BadFilter,
            SubscriptionError::Table(_) => ErrorCode::UnknownTable,
            SubscriptionError::Source(_) => ErrorCode::SourceInterrupted,
            SubscriptionError::Unavailable => ErrorCode::SourceUnavailable,
            SubscriptionError::HubStopped => ErrorCode::SourceStopped,
            SubscriptionError::Sql(_) => ErrorCode::Internal,
            SubscriptionError::Snapshot(e) => e.code(),
        }
    }
}

/// What the hub task puts in a subscriber's queue.
// Nearly every item is an event; boxing it would cost an allocation per delivery.
#[allow(clippy::large_enum_variant)]
enum Fed {
    Item(SubscriptionItem),
    /// Passed on only to subscribers reading an initial state.
    Watermark(Watermark),
}

type Queue = mpsc::Receiver<Result<Fed, Arc<Error>>>;

struct Subscriber {
    id: u64,
    view: FilteredView,
    tx: mpsc::Sender<Result<Fed, Arc<Error>>>,
    lagged: Arc<AtomicBool>,
    done: bool,
    /// Reads an initial state, so wants the watermarks.
    watermarks: bool,
}

/// How to subscribe.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Start with the rows that match the filter now ([`SubscriptionItem::Snapshot`]),
    /// then [`SubscriptionItem::SnapshotComplete`], then the changes after them.
    pub initial_state: bool,
}

enum Command {
    /// Start handing out events (see [`HubConfig::start_paused`]).
    Resume,
    /// The most recent commits (xid, commit LSN), oldest first.
    Recent(oneshot::Sender<Vec<(u32, Lsn)>>),
    Subscribe(Box<Subscriber>, oneshot::Sender<()>),
    /// The subscription was dropped: free its queue now, not at the next event.
    Gone(u64),
}

/// A running fan-out over one slot.
pub struct Hub {
    commands: mpsc::Sender<Command>,
    source: crate::pg::config::SourceConfig,
    /// One catalog connection for all subscribe calls, reopened when it breaks.
    catalog: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    publication: String,
    queue: usize,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Set while the listener is down and being restarted.
    down: Arc<AtomicBool>,
}

impl Hub {
    /// Starts the listener and the fan-out task.
    pub async fn start(config: HubConfig) -> Result<Hub, Error> {
        let source = config.listener.source.clone();
        let publication = config.listener.publication.clone();
        let listener = match Listener::start(config.listener.clone()).await {
            Ok(l) => Some(l),
            Err(e) if config.start_offline && e.is_transient() => {
                tracing::warn!(slot = %config.listener.slot, error = %crate::error::report(&e), "subscription hub cannot connect yet; reconnecting");
                None
            }
            Err(e) => return Err(e),
        };
        let (commands, rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let down = Arc::new(AtomicBool::new(listener.is_none()));
        let fanout = Fanout {
            config: config.listener,
            commands: rx,
            cancel: cancel.clone(),
            down: down.clone(),
        };
        let task = tokio::spawn(run(fanout, listener, config.start_paused));
        Ok(Hub {
            commands,
            source,
            catalog: tokio::sync::Mutex::new(None),
            publication,
            queue: config.subscriber_queue.max(1),
            cancel,
            task: Some(task),
            next_id: std::sync::atomic::AtomicU64::new(0),
            down,
        })
    }

    /// False while the replication connection is down and the hub reconnects.
    pub fn is_streaming(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }

    /// Why the hub took no subscriber: it is reconnecting, or it has stopped.
    fn refused(&self) -> SubscriptionError {
        match self.is_streaming() {
            true => SubscriptionError::HubStopped,
            false => SubscriptionError::Unavailable,
        }
    }

    /// Subscribes to one table (`table` or `schema.table`) with an optional filter. The
    /// filter is checked against the table's columns and types now; warnings (e.g. no
    /// before image for transitions) are in [`Subscription::warnings`].
    pub async fn subscribe(
        &self,
        table: &str,
        filter: Option<Filter>,
    ) -> Result<Subscription, SubscriptionError> {
        self.subscribe_with(table, filter, SubscribeOptions::default())
            .await
    }

    /// [`Hub::subscribe`] with options, such as an initial state.
    pub async fn subscribe_with(
        &self,
        table: &str,
        filter: Option<Filter>,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscriptionError> {
        self.subscribe_table(TableName::parse(table), filter, options)
            .await
    }

    /// [`Hub::subscribe_with`] for a table already named by schema and name (no parsing,
    /// so quoted names and names holding dots reach exactly that table).
    pub async fn subscribe_table(
        &self,
        table: TableName,
        filter: Option<Filter>,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscriptionError> {
        if !self.is_streaming() {
            return Err(SubscriptionError::Unavailable);
        }
        let mut guard = self.catalog.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.source.connect_sql().await.map_err(Error::from)?);
        }
        let Some(client) = guard.as_ref() else {
            return Err(SubscriptionError::HubStopped);
        };
        let schema = catalog::table_schema(client, &table)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| TableError::Missing(table.to_string()))?;
        let published = catalog::is_published(client, &self.publication, &table)
            .await
            .map_err(Error::from)?;
        let restriction = match options.initial_state {
            true => crate::initial::Published::lookup(client, &self.publication, &table).await?,
            false => crate::initial::Published::default(),
        };
        drop(guard);
        if !published {
            return Err(TableError::NotPublished(table.to_string()).into());
        }
        let filter = CompiledFilter::new(filter.as_ref(), &schema)?;
        let warnings = filter.warnings().to_vec();
        for w in &warnings {
            tracing::warn!(table = %table, "{w}");
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let snapshot_filter = options.initial_state.then(|| filter.clone());
        let sub = Subscriber {
            id,
            view: FilteredView::new(table, filter),
            tx,
            lagged: lagged.clone(),
            done: false,
            watermarks: options.initial_state,
        };
        let (joined, wait) = oneshot::channel();
        self.commands
            .send(Command::Subscribe(Box::new(sub), joined))
            .await
            .map_err(|_| self.refused())?;
        wait.await.map_err(|_| self.refused())?;
        let direct = Direct {
            rx,
            lagged,
            queue: self.queue,
        };
        let feed = match snapshot_filter {
            None => Feed::Direct(direct),
            Some(filter) => Feed::Initial(initial::start(initial::Job {
                hub: direct,
                source: self.source.clone(),
                table: schema,
                published: restriction,
                filter,
                commands: self.commands.clone(),
                buffer_limit: self.queue.saturating_mul(64),
            })),
        };
        Ok(Subscription {
            feed,
            warnings,
            finished: false,
            id,
            commands: self.commands.clone(),
        })
    }

    /// Lets a hub started paused hand out events.
    pub async fn resume(&self) -> Result<(), SubscriptionError> {
        self.commands
            .send(Command::Resume)
            .await
            .map_err(|_| SubscriptionError::HubStopped)
    }

    /// Stops the hub and its listener.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One subscriber's stream of items.
pub struct Subscription {
    feed: Feed,
    warnings: Vec<String>,
    finished: bool,
    id: u64,
    commands: mpsc::Sender<Command>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Best effort: if the hub's command queue is full, the closed queue is noticed at
        // the next event instead.
        let _ = self.commands.try_send(Command::Gone(self.id));
    }
}

impl Subscription {
    /// Problems found when the filter was checked (the subscription still runs).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// A subscriber's queue in the hub, and how its end is told.
struct Direct {
    rx: Queue,
    lagged: Arc<AtomicBool>,
    queue: usize,
}

impl Direct {
    /// The next item, skipping watermarks; `None` at a clean end.
    fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<SubscriptionItem, SubscriptionError>>> {
        loop {
            return match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(Fed::Watermark(_)))) => continue,
                Poll::Ready(Some(Ok(Fed::Item(item)))) => Poll::Ready(Some(Ok(item))),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(SubscriptionError::Source(e)))),
                Poll::Ready(None) => Poll::Ready(self.ended().map(Err)),
                Poll::Pending => Poll::Pending,
            };
        }
    }

    /// Why the queue closed: cut off for lagging, or a clean end.
    fn ended(&self) -> Option<SubscriptionError> {
        self.lagged
            .load(Ordering::Acquire)
            .then_some(SubscriptionError::Lagged { queue: self.queue })
    }
}

enum Feed {
    Direct(Direct),
    /// Through the task that reads the initial state first.
    Initial(initial::Handle),
}

impl Stream for Subscription {
    type Item = Result<SubscriptionItem, SubscriptionError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let polled = match &mut self.feed {
            Feed::Direct(d) => d.poll_item(cx),
            Feed::Initial(h) => h.poll_item(cx),
        };
        if matches!(
            polled,
            Poll::Ready(None | Some(Err(_) | Ok(SubscriptionItem::Completed { .. })))
        ) {
            self.finished = true;
        }
        polled
    }
}

/// What the fan-out task needs besides its listener: how to start another one.
struct Fanout {
    config: ListenerConfig,
    commands: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    down: Arc<AtomicBool>,
}

/// `listener`: `None` when the hub started offline; it connects like after a lost
/// connection.
async fn run(mut f: Fanout, mut listener: Option<Listener>, mut paused: bool) {
    // Before the first event: where the slot started streaming (set on connecting).
    let mut last_position =
        Position::before_lsn(listener.as_ref().map_or(Lsn::ZERO, |l| l.start_lsn()));
    let mut subs = fanout::Subscribers::default();
    let mut waiting: Vec<(Box<Subscriber>, oneshot::Sender<()>)> = Vec::new();
    let mut in_tx = false;
    let mut recent: VecDeque<(u32, Lsn)> = VecDeque::with_capacity(RECENT_COMMITS);
    let mut backoff = f.config.reconnect_min;
    let retry = tokio::time::sleep(match listener {
        Some(_) => std::time::Duration::ZERO,
        None => backoff,
    });
    tokio::pin!(retry);
    loop {
        if !in_tx && listener.is_some() {
            // Joining only between transactions: a subscriber never sees half of one.
            for (sub, joined) in waiting.drain(..) {
                let marker = SubscriptionItem::Initialized {
                    position: Some(last_position),
                };
                if sub.tx.try_send(Ok(Fed::Item(marker))).is_ok() {
                    subs.join(*sub);
                }
                let _ = joined.send(());
            }
        }
        let connected = listener.is_some();
        tokio::select! {
            biased;
            _ = f.cancel.cancelled() => break,
            cmd = f.commands.recv() => match cmd {
                // While reconnecting, a new subscriber is refused (dropping `joined`).
                Some(Command::Subscribe(sub, joined)) if connected => waiting.push((sub, joined)),
                Some(Command::Subscribe(..)) => {}
                Some(Command::Resume) => paused = false,
                Some(Command::Recent(reply)) => {
                    let _ = reply.send(recent.iter().copied().collect());
                }
                Some(Command::Gone(id)) => {
                    subs.remove(id);
                    waiting.retain(|(s, _)| s.id != id);
                }
                None => break,
            },
            _ = &mut retry, if !connected => {
                let started = tokio::select! {
                    _ = f.cancel.cancelled() => break,
                    started = Listener::start(f.config.clone()) => started,
                };
                match started {
                    Ok(l) => {
                        tracing::info!(slot = %f.config.slot, "subscription hub reconnected");
                        // A new slot: subscribers from now on join where it starts.
                        last_position = Position::before_lsn(l.start_lsn());
                        listener = Some(l);
                        backoff = f.config.reconnect_min;
                        f.down.store(false, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::warn!(slot = %f.config.slot, error = %crate::error::report(&e), retry_in = ?backoff, "subscription hub cannot reconnect yet");
                        retry.as_mut().reset(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(f.config.reconnect_max);
                    }
                }
            }
            item = next_delivery(&mut listener), if connected && !paused => match item {
                Some(Ok(Delivery::Watermark(lsn))) => {
                    subs.watermark(lsn);
                }
                Some(Ok(Delivery::Event(ev))) => {
                    let position = ev.position;
                    last_position = position;
                    in_tx = !ev.tx.last;
                    if ev.tx.last {
                        if recent.len() == RECENT_COMMITS {
                            recent.pop_front();
                        }
                        recent.push_back((ev.tx.xid, ev.tx.commit_lsn));
                    }
                    subs.event(&ev);
                    // At-most-once: offered is handled, so the slot never waits for anyone.
                    if let Some(l) = &listener {
                        l.ack(position);
                    }
                }
                failed => {
                    // The temporary slot died with its connection, and with it the changes
                    // since: every subscriber is told and ends; a new listener (a new slot,
                    // from "now") takes the new subscribers.
                    let e = Arc::new(failed.and_then(Result::err).unwrap_or(Error::Stopped));
                    tracing::warn!(slot = %f.config.slot, error = %crate::error::report(&e), subscribers = subs.len(), retry_in = ?backoff, "subscription hub lost its replication connection; reconnecting");
                    f.down.store(true, Ordering::Release);
                    subs.fail(&e);
                    // Callers still waiting to join are refused; they subscribe again.
                    waiting.clear();
                    in_tx = false;
                    recent.clear();
                    if let Some(l) = listener.take() {
                        l.shutdown().await;
                    }
                    retry.as_mut().reset(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(f.config.reconnect_max);
                }
            },
        }
    }
    if let Some(l) = listener {
        l.shutdown().await;
    }
}

async fn next_delivery(listener: &mut Option<Listener>) -> Option<Result<Delivery, Error>> {
    match listener {
        Some(l) => l.next_delivery().await,
        None => std::future::pending().await,
    }
}

fn offer(sub: &mut Subscriber, item: Fed) {
    if sub.done {
        return;
    }
    match sub.tx.try_send(Ok(item)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            sub.lagged.store(true, Ordering::Release);
            sub.done = true;
        }
        Err(mpsc::error::TrySendError::Closed(_)) => sub.done = true,
    }
}
