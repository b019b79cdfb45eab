//! The persisted pipeline (`waltap run`): slot -> event log, exactly once.
//!
//! One task reads the listener and appends to a [`LogWriter`]. Invariants:
//!
//! - a store transaction holds only whole source transactions plus the progress mark
//!   (the commit LSN of the last of them); the listener is acknowledged, and so the slot
//!   confirmed, only after that store transaction committed;
//! - the progress mark ([`LogMark`]) covers exactly the transactions in the log; events of
//!   source transactions it holds are skipped (Postgres replays from the slot's confirmed
//!   position, which may trail the log after a crash), and nothing else is;
//! - a snapshot's watermark moves the mark to just below the watermark, never onto it: a
//!   transaction can commit exactly where the watermark's message record ends, and it
//!   comes after the watermark;
//! - with failover standbys (`synchronized_standby_slots` on the store's server), the
//!   acknowledgement also waits until they flushed the commit (module `log::standby`),
//!   and a slot gone under a log with history is an error, never silently re-created;
//! - batches close when the listener has nothing more ready, at `max_batch_events`, or
//!   after `max_batch_delay`, whichever comes first: no timer on an idle pipeline, large
//!   batches under load;
//! - a source transaction larger than a chunk is written in chunks inside its store
//!   transaction, so memory does not grow with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::event::{Event, Position};
use crate::log::jetstream::{JetStreamConfig, JetStreamLog};
use crate::log::retention::{self, Retention};
use crate::log::{LogWriter, PgLog, StoreError};
use crate::lsn::{LogMark, Lsn};
use crate::pg::config::SourceConfig;
use crate::source::pipeline::{Delivery, Listener, ListenerConfig};

/// Settings of the persisted pipeline.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AppenderConfig {
    /// The source, slot and publication to read.
    pub listener: ListenerConfig,
    /// Where the log lives (the watched database by default).
    pub store: SourceConfig,
    /// A batch is committed to the log once it holds this many events.
    pub max_batch_events: usize,
    /// A batch is committed to the log at the latest this long after its first event.
    pub max_batch_delay: Duration,
    /// Events per INSERT inside a batch.
    pub chunk_events: usize,
    /// Deletes old events of this source periodically, beside the appending.
    pub retention: Option<Retention>,
    /// Counts the events appended (committed to the log), for whoever reports metrics.
    pub appended: Option<Arc<AtomicU64>>,
    /// Set by a group's leader ([`crate::log::leader`]): append only under this term, and
    /// end the previous leader's walsender before reading the slot.
    pub leader: Option<crate::log::leader::Term>,
    /// Create the slot even though the log holds changes from an earlier one (accepting
    /// that changes committed in between are missing from the log).
    pub accept_slot_gap: bool,
    /// Append to this NATS JetStream stream instead of the Postgres event log (the store
    /// still holds the group's leadership).
    pub jetstream: Option<JetStreamConfig>,
}

impl AppenderConfig {
    /// Settings that keep the log in the watched database, with default batching and no
    /// retention.
    pub fn new(listener: ListenerConfig) -> Self {
        AppenderConfig {
            store: listener.source.clone(),
            listener,
            max_batch_events: 20_000,
            max_batch_delay: Duration::from_millis(200),
            chunk_events: 2_000,
            retention: None,
            appended: None,
            leader: None,
            accept_slot_gap: false,
            jetstream: None,
        }
    }
}

/// What went wrong in the persisted pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Reading the source failed (a slot gone under a log with history among others:
    /// [`crate::setup::SetupError::SlotGone`]).
    #[error(transparent)]
    Source(#[from] Error),
    /// Writing the log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AppendError {
    /// Whether restarting the pipeline with backoff can help.
    pub fn is_transient(&self) -> bool {
        match self {
            AppendError::Source(e) => e.is_transient(),
            AppendError::Store(e) => e.is_transient(),
        }
    }
}

/// Runs until cancelled, retrying transient failures with backoff; returns the definite
/// error that stopped it, if any. Retention, when configured, runs beside it and stops
/// with it.
pub async fn run(config: AppenderConfig, cancel: CancellationToken) -> Result<(), AppendError> {
    let retention = config.retention.map(|policy| {
        let stop = cancel.child_token();
        let task = tokio::spawn(retention::run(
            config.store.clone(),
            config.listener.slot.clone(),
            policy,
            stop.clone(),
        ));
        (stop, task)
    });
    let result = append(&config, &cancel).await;
    if let Some((stop, task)) = retention {
        stop.cancel();
        let _ = task.await;
    }
    result
}

async fn append(config: &AppenderConfig, cancel: &CancellationToken) -> Result<(), AppendError> {
    let mut backoff = config.listener.reconnect_min;
    loop {
        match run_once(config, cancel, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(slot = %config.listener.slot, error = %crate::error::report(&e), retry_in = ?backoff, "pipeline interrupted; restarting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(config.listener.reconnect_max);
            }
            Err(e) => return Err(e),
        }
    }
}

struct Batch {
    /// Events not yet written to the open store transaction.
    chunk: Vec<Event>,
    events: usize,
    opened: Option<Instant>,
    /// The last complete source transaction in the batch.
    complete: Option<(Lsn, Position)>,
    /// The mark the batch's watermarks give (everything before the last of them is in
    /// the batch or already in the log).
    watermark: Option<LogMark>,
}

/// What a committed batch moved: the log's mark, and the source position to acknowledge
/// (none when the batch held only watermarks).
struct Appended {
    mark: LogMark,
    ack: Option<Position>,
}

/// One session: open the log, start the listener, append until cancelled or an error.
/// `backoff` goes back to its minimum once the session has appended something, so that
/// each outage starts from a short wait.
async fn run_once(
    config: &AppenderConfig,
    cancel: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), AppendError> {
    match &config.jetstream {
        None => {
            let mut log = PgLog::open(&config.store, &config.listener.slot).await?;
            log.record_publication(&config.listener.publication).await?;
            if let Some(lead) = &config.leader {
                log.fence(lead.term, lead.idle_limit).await?;
            }
            if log.watch_standbys().await? {
                tracing::info!(slot = %config.listener.slot, "the source slot is confirmed once the failover standbys flushed each append");
            }
            pump(&mut log, config, cancel, backoff).await
        }
        Some(js) => {
            // No term is written for JetStream: every publish names the sequence the
            // stream must end at, which fences a deposed leader by itself.
            let mut log = JetStreamLog::open(js, &config.listener.slot)
                .await
                .map_err(StoreError::from)?;
            log.record_publication(&config.listener.publication)
                .await
                .map_err(StoreError::from)?;
            tracing::info!(slot = %config.listener.slot, nats = %js.describe(), stream = %js.stream, "appending to JetStream");
            pump(&mut log, config, cancel, backoff).await
        }
    }
}

/// Appends what the listener delivers to `log` until cancelled or an error.
async fn pump<L: LogWriter>(
    log: &mut L,
    config: &AppenderConfig,
    cancel: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), AppendError> {
    if config.leader.is_some() {
        crate::log::leader::free_slot(&config.listener.source, &config.listener.slot).await?;
    }
    // Read after the term was taken: everything a previous leader committed is in it.
    let mut stored = log.progress().await?.unwrap_or(LogMark::NONE);
    let last_event = log.last_event().await?;
    let mut listener_config = config.listener.clone();
    if let Some(last) = last_event.filter(|_| !config.accept_slot_gap) {
        listener_config.consumed_through = Some(last.commit_lsn);
    }
    let mut listener = Listener::start(listener_config).await?;
    if last_event.is_some() && listener.setup_report().slot_created {
        tracing::warn!(slot = %config.listener.slot, progress = %stored, "the slot was gone: created a new one, so changes committed since the log's progress are missing (--accept-slot-gap)");
    }
    tracing::info!(slot = %config.listener.slot, progress = %stored, "appending to the event log");
    let mut batch = Batch {
        chunk: Vec::with_capacity(config.chunk_events),
        events: 0,
        opened: None,
        complete: None,
        watermark: None,
    };
    let mut ready: Option<Delivery> = None;
    let result = loop {
        let item = match ready.take() {
            Some(item) => item,
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                item = listener.next_delivery() => match item {
                    Some(Ok(item)) => item,
                    Some(Err(e)) => break Err(AppendError::from(e)),
                    None => break Err(AppendError::Source(Error::Stopped)),
                },
            },
        };
        match item {
            Delivery::Event(ev) => {
                if last_event.is_some_and(|last| ev.position <= last) {
                    // Replayed after a crash: already in the log. Acknowledging lets the
                    // slot catch up (only whole transactions are confirmed).
                    listener.ack(ev.position);
                    continue;
                }
                let tx_end = ev.tx.last.then_some((ev.position.commit_lsn, ev.position));
                batch.opened.get_or_insert_with(Instant::now);
                batch.events += 1;
                batch.chunk.push(ev);
                if batch.chunk.len() >= config.chunk_events {
                    if let Err(e) = log.write(&batch.chunk).await {
                        break Err(e.into());
                    }
                    batch.chunk.clear();
                }
                let Some(end) = tx_end else { continue };
                batch.complete = Some(end);
            }
            Delivery::Watermark(watermark) => {
                // Everything before the watermark is in the batch (it comes between
                // transactions): committing the batch marks the log complete up to it, so
                // that a snapshot waiting on the log learns that nothing before it is
                // still to come. Watermarks that come in a burst share one commit.
                let mark = LogMark::before(watermark);
                if mark > stored {
                    batch.watermark = batch.watermark.max(Some(mark));
                    batch.opened.get_or_insert_with(Instant::now);
                }
                if batch.complete.is_none() && batch.watermark.is_none() {
                    continue;
                }
            }
        }
        // Close the batch when nothing else is ready, or it is big or old enough.
        let full = batch.events >= config.max_batch_events
            || batch
                .opened
                .is_some_and(|t| t.elapsed() >= config.max_batch_delay);
        if !full {
            match listener.try_next_delivery() {
                Some(Some(Ok(next))) => {
                    ready = Some(next);
                    continue;
                }
                Some(Some(Err(e))) => break Err(e.into()),
                Some(None) => break Err(AppendError::Source(Error::Stopped)),
                None => {}
            }
        }
        let events = batch.events as u64;
        match commit(log, &mut batch).await {
            Ok(Some(appended)) => {
                if let Some(counter) = &config.appended {
                    counter.fetch_add(events, Ordering::Relaxed);
                }
                stored = appended.mark;
                if let Some(position) = appended.ack {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break Ok(()),
                        replicated = log.replicated() => {
                            if let Err(e) = replicated {
                                break Err(e.into());
                            }
                        }
                    }
                    listener.ack(position);
                    *backoff = config.listener.reconnect_min;
                }
            }
            Ok(None) => {}
            Err(e) => break Err(e.into()),
        }
    };
    // An open store transaction (or unacknowledged publishes) holds only uncommitted work:
    // dropping it rolls back, and the slot was never confirmed past the last commit.
    listener.shutdown().await;
    result
}

/// Writes the batch and commits it with its mark: the last complete transaction's commit
/// LSN, or just below the batch's last watermark if that is higher.
async fn commit<L: LogWriter>(
    log: &mut L,
    batch: &mut Batch,
) -> Result<Option<Appended>, StoreError> {
    let complete = batch.complete.take();
    let watermark = batch.watermark.take();
    let Some(mark) = complete
        .map(|(lsn, _)| LogMark::through_commit(lsn))
        .max(watermark)
    else {
        return Ok(None);
    };
    log.write(&batch.chunk).await?;
    batch.chunk.clear();
    log.commit(mark).await?;
    tracing::debug!(through = %mark, events = batch.events, "batch appended");
    batch.events = 0;
    batch.opened = None;
    Ok(Some(Appended {
        mark,
        ack: complete.map(|(_, position)| position),
    }))
}
