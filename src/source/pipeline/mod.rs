//! The task that owns the replication slot, and the [`Listener`] handle that consumes it.
//!
//! One task per listener holds the replication connection. It decodes each XLogData
//! payload, assembles events, hands them to the consumer through a bounded channel, and
//! reports progress to the server. Invariants:
//!
//! - The flush position sent to Postgres never passes what the consumer acknowledged: a
//!   transaction's `end_lsn` is confirmed only once every event of it, and of every earlier
//!   transaction, is acknowledged. Acknowledging in the middle of a transaction confirms
//!   nothing of it, so after a restart that transaction is delivered again in full.
//! - While nothing is open or unacknowledged, the flush position follows the server's
//!   send position (keepalive `walEnd`), so an idle slot does not pin WAL.
//! - Reported positions never go backwards and never pass what was received.
//! - Keepalives asking for a reply are answered at once, and a status update goes out at
//!   least every `status_interval` (kept under a third of `wal_sender_timeout`), also while
//!   the consumer is slow and the channel is full.
//! - Transactions the server streams before their commit (`streaming 'on'`) are held by
//!   [`crate::source::spill`] and become events only at Stream Commit, through the same assembler
//!   as any other transaction (same positions and ids); while one is open the flush
//!   position does not follow the server's send position.
//! - Transient failures (connection lost, server restarting) reconnect with backoff; the
//!   server resends from the confirmed position and events already handed out in this
//!   process are skipped by position, so the consumer sees each change once per process.
//!   A temporary slot cannot be resumed: its listener ends with the first failure.
//!   Definite failures (slot dropped or invalidated, publication missing, malformed data)
//!   end the stream with a typed error.

mod worker;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::event::{Event, Position, TableName};
use crate::lsn::{Lsn, Watermark};
use crate::pg::config::SourceConfig;
use crate::replication::ReplicationConnection;
use crate::source::setup::{self, SetupOptions, SetupReport};
use crate::source::spill::SpillConfig;

/// What a listener reads and how.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The database to read (a connection with `replication=database` is made to it).
    pub source: SourceConfig,
    /// The logical replication slot (pgoutput) to read from.
    pub slot: String,
    /// The publication whose tables the slot sends.
    pub publication: String,
    /// Only these tables produce events; empty = every published table.
    pub tables: Vec<TableName>,
    /// Create the publication when missing.
    pub create_publication: bool,
    /// Create the slot when missing.
    pub create_slot: bool,
    /// Use a temporary slot that starts at "now" and vanishes when the listener stops.
    pub temporary_slot: bool,
    /// Events buffered between the replication task and the consumer.
    pub channel_capacity: usize,
    /// Events of one transaction held to count `tx.total`.
    pub max_buffered_events: usize,
    /// Longest time between two status updates (shortened to fit `wal_sender_timeout`).
    pub status_interval: Duration,
    /// Backoff between reconnect attempts: starts at `reconnect_min`, doubles up to
    /// `reconnect_max`.
    pub reconnect_min: Duration,
    /// The longest backoff between reconnect attempts.
    pub reconnect_max: Duration,
    /// Where transactions streamed while in progress are kept until they commit, and how
    /// much of them may stay in memory.
    pub spill: SpillConfig,
    /// Ask for large transactions while they are in progress (`streaming 'on'`), rather
    /// than have the server hold them until commit (its own spill files, then one burst).
    pub stream_in_progress: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+), synchronized to standbys.
    pub failover_slot: bool,
    /// The slot's changes were consumed up to here before (the event log's progress): a
    /// missing slot is then an error, never created anew (see
    /// [`crate::setup::SetupOptions::consumed_through`]).
    pub consumed_through: Option<Lsn>,
    /// While catching up (changes committed more than 100 ms before the server sent
    /// them), a read first waits until the socket holds a full window, the server pauses,
    /// or 2 ms passed, checking this often: the server's sends then queue cheaply behind
    /// the closed window, less CPU on both sides per event. It blocks the thread (so that
    /// arriving data does not wake it), and never applies to live changes, so it costs
    /// latency only to changes that are late anyway. Zero turns it off.
    pub catch_up_pause: Duration,
}

impl ListenerConfig {
    /// Defaults for everything but the source: slot and publication `waltap`.
    pub fn new(source: SourceConfig) -> Self {
        ListenerConfig {
            source,
            slot: "waltap".into(),
            publication: "waltap".into(),
            tables: Vec::new(),
            create_publication: true,
            create_slot: true,
            temporary_slot: false,
            channel_capacity: 4096,
            max_buffered_events: 10_000,
            status_interval: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            spill: SpillConfig::default(),
            stream_in_progress: true,
            failover_slot: false,
            consumed_through: None,
            catch_up_pause: Duration::from_micros(100),
        }
    }

    fn setup_options(&self) -> SetupOptions {
        SetupOptions {
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            tables: self.tables.clone(),
            create_publication: self.create_publication,
            create_slot: self.create_slot,
            temporary_slot: self.temporary_slot,
            failover_slot: self.failover_slot,
            consumed_through: self.consumed_through,
        }
    }
}

/// How old (server clock, commit time to send time) a change must be for reads to be
/// paced ([`ListenerConfig::catch_up_pause`]).
pub const CATCH_UP_LAG_MICROS: i64 = 100_000;

/// Acknowledges events so the slot may advance; cheap to clone and send across tasks.
#[derive(Debug, Clone)]
pub struct Acker(watch::Sender<Option<Position>>);

impl Acker {
    /// Marks every event up to and including `position` as handled. Positions only move
    /// forward: an older position is ignored.
    pub fn ack(&self, position: Position) {
        self.0.send_if_modified(|cur| {
            if cur.is_none_or(|c| c < position) {
                *cur = Some(position);
                true
            } else {
                false
            }
        });
    }
}

/// A running listener: a [`Stream`] of events from the slot.
///
/// Events arrive in commit order. Call [`Listener::ack`] (or an [`Acker`]) once an event is
/// handled; the slot is confirmed up to whole acknowledged transactions. Dropping the
/// listener stops the task; [`Listener::shutdown`] stops it and waits for the final
/// status update.
pub struct Listener {
    rx: mpsc::Receiver<Result<Delivery, Error>>,
    acker: Acker,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    report: SetupReport,
    start_lsn: Lsn,
}

/// Creating a slot on a hot standby waits for the primary's next record of the running
/// transactions, which it writes every 15 s, and never while idle: asking the primary for
/// one every half second makes creation take about that long. Stops at the first refusal
/// (`pg_log_standby_snapshot` needs PostgreSQL 16 and a superuser or a grant).
async fn log_standby_snapshots(primary: SourceConfig) {
    let Ok(client) = primary.connect_sql().await else {
        return;
    };
    loop {
        if let Err(e) = client
            .execute("SELECT pg_log_standby_snapshot()", &[])
            .await
        {
            tracing::debug!(error = %crate::error::report(&e), "not asking the primary for standby snapshots");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Stops [`log_standby_snapshots`] when the start is over, however it ends.
struct NudgePrimary(tokio::task::JoinHandle<()>);

impl Drop for NudgePrimary {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Listener {
    /// Checks the source (creating publication and slot as configured), starts streaming,
    /// and returns once the server streams: every change committed after this returns is
    /// delivered.
    pub async fn start(config: ListenerConfig) -> Result<Listener, Error> {
        let nudge = config
            .source
            .primary()
            .map(|primary| NudgePrimary(tokio::spawn(log_standby_snapshots(primary.clone()))));
        // The replication connection is opened while the checks run on the SQL one: each
        // costs a server process, authentication and, over a network, round trips, and
        // the first event waits for both. A check's error is reported before the
        // replication connection's.
        let (checked, replication) = tokio::join!(
            async {
                let client = config.source.connect_sql().await?;
                let report = setup::prepare(&client, &config.setup_options()).await?;
                Ok::<_, Error>((client, report))
            },
            ReplicationConnection::connect(&config.source),
        );
        let (client, report) = checked?;
        let replication = replication?;
        for w in &report.warnings {
            tracing::warn!(slot = %config.slot, "{w}");
        }
        let (ack_tx, ack_rx) = watch::channel(None);
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let cancel = CancellationToken::new();
        let mut worker = Worker::new(config, client, ack_rx, tx, cancel.clone());
        let stream = worker.start(replication, true).await?;
        // A temporary slot starts at its consistent point, a slot of its own at its
        // confirmed point, which nobody moves while this connection holds the slot.
        let confirmed = report
            .slot
            .as_ref()
            .and_then(|s| s.confirmed_flush_lsn.as_deref())
            .and_then(|l| l.parse::<Lsn>().ok())
            .unwrap_or(Lsn::ZERO);
        let start_lsn = worker.received.max(confirmed);
        drop(nudge);
        let task = tokio::spawn(async move { worker.run(stream).await });
        Ok(Listener {
            rx,
            acker: Acker(ack_tx),
            cancel,
            task: Some(task),
            report,
            start_lsn,
        })
    }

    /// Acknowledges every event up to and including `position`.
    pub fn ack(&self, position: Position) {
        self.acker.ack(position);
    }

    /// A handle to acknowledge from elsewhere.
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// What the start-up checks found (tables, identities, warnings, slot).
    pub fn setup_report(&self) -> &SetupReport {
        &self.report
    }

    /// The WAL position streaming started from: every transaction delivered commits at
    /// or after it.
    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    /// Stops streaming: confirms what was acknowledged, ends copy mode, closes.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What a listener hands its owner: the changes (all that [`Listener`]'s `Stream` yields),
/// and the watermarks of initial-state snapshots, which the hub and the event log need to
/// match a snapshot with the changes (how initial states are placed).
// Nearly every item is an event; boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Delivery {
    /// A change, in commit order.
    Event(Event),
    /// A snapshot's watermark: every transaction whose commit LSN is below it has been
    /// delivered, and none at or above it (see [`Watermark`]).
    Watermark(Watermark),
}

impl Listener {
    /// The next change or watermark.
    pub async fn next_delivery(&mut self) -> Option<Result<Delivery, Error>> {
        self.rx.recv().await
    }

    /// The next change or watermark if one is ready now.
    pub fn try_next_delivery(&mut self) -> Option<Option<Result<Delivery, Error>>> {
        match self.rx.try_recv() {
            Ok(item) => Some(Some(item)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
        }
    }
}

impl Stream for Listener {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(Delivery::Watermark(_)))) => continue,
                Poll::Ready(Some(Ok(Delivery::Event(ev)))) => Poll::Ready(Some(Ok(ev))),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

use worker::Worker;
