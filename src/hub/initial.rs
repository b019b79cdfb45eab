//! A subscription that starts with an initial state: the task that reads the snapshot
//! while holding on to the changes that arrive meanwhile, then hands out the rows, the
//! `snapshotComplete` marker and the changes after it (method: [`crate::initial`]).
//! When the filter follows one row, the task ends with `completed`: `notFound` right
//! after the marker when the snapshot lacks the row, else the hub's first `deleted` that
//! comes after the snapshot.

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Command, CompletionReason, Direct, Fed, SubscriptionError, SubscriptionItem};
use crate::event::{Position, TableName};
use crate::filter::{CompiledFilter, TableSchema};
use crate::initial::{self, CommittedTx, Session, SnapshotError};
use crate::lsn::{Lsn, Watermark};
use crate::pg::config::SourceConfig;

/// How long the hub may take to pass a snapshot's watermark.
const WATERMARK_WAIT: Duration = Duration::from_secs(60);

pub(super) struct Job {
    pub hub: Direct,
    pub source: SourceConfig,
    pub table: TableSchema,
    pub published: initial::Published,
    pub filter: CompiledFilter,
    pub commands: mpsc::Sender<Command>,
    /// Changes held while the rows are read before the subscriber counts as lagging.
    pub buffer_limit: usize,
}

/// The subscription's end of the task.
pub(super) struct Handle {
    rx: mpsc::Receiver<Result<SubscriptionItem, SubscriptionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Handle {
    pub fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<SubscriptionItem, SubscriptionError>>> {
        self.rx.poll_recv(cx)
    }
}

pub(super) fn start(job: Job) -> Handle {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move {
        let mut run = Run {
            out: tx,
            held: VecDeque::new(),
            job,
        };
        if let Err(e) = run.run().await {
            let _ = run.out.send(Err(e)).await;
        }
    });
    Handle { rx, task }
}

/// Why the task stops early: an error to pass on, the subscriber went away, or the
/// subscription completed.
enum Stop {
    Failed(Box<SubscriptionError>),
    Gone,
    Completed,
}

impl From<SubscriptionError> for Stop {
    fn from(e: SubscriptionError) -> Stop {
        Stop::Failed(Box::new(e))
    }
}

impl From<SnapshotError> for Stop {
    fn from(e: SnapshotError) -> Stop {
        Stop::Failed(Box::new(e.into()))
    }
}

struct Run {
    job: Job,
    out: mpsc::Sender<Result<SubscriptionItem, SubscriptionError>>,
    /// Changes from the hub not yet handed out.
    held: VecDeque<SubscriptionItem>,
}

impl Run {
    async fn run(&mut self) -> Result<(), SubscriptionError> {
        match self.initial_state().await {
            Ok(()) => {}
            Err(Stop::Gone | Stop::Completed) => return Ok(()),
            Err(Stop::Failed(e)) => return Err(*e),
        }
        // Live: pass the hub's queue on.
        loop {
            let item = std::future::poll_fn(|cx| self.job.hub.poll_item(cx)).await;
            match item {
                Some(Ok(item)) => {
                    let last = matches!(item, SubscriptionItem::Completed { .. });
                    if self.out.send(Ok(item)).await.is_err() || last {
                        return Ok(());
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    }

    async fn initial_state(&mut self) -> Result<(), Stop> {
        let joined = match self.next_fed().await? {
            Fed::Item(item @ SubscriptionItem::Initialized { position: Some(p) }) => {
                self.emit(item).await?;
                p
            }
            _ => {
                return Err(SnapshotError::Protocol(
                    "the hub's first item is not the marker with its position".into(),
                )
                .into())
            }
        };
        let (mut session, after) = self.settle(joined).await?;
        let mut rows = session
            .table(
                &self.job.table,
                &self.job.published,
                initial::DEFAULT_CHUNK_ROWS,
            )
            .await?;
        let mut found = false;
        while let Some(chunk) = rows.next_chunk().await? {
            for row in chunk {
                if row.admitted_by(&self.job.filter, self.job.table.identity) {
                    found = true;
                    self.emit(SubscriptionItem::Snapshot(row)).await?;
                }
            }
        }
        session.finish().await?;
        self.emit(SubscriptionItem::SnapshotComplete {
            position: Some(after),
        })
        .await?;
        if !found && self.job.filter.single_row_key() {
            let reason = CompletionReason::NotFound;
            let position = after;
            self.emit(SubscriptionItem::Completed { reason, position })
                .await?;
            return Err(Stop::Completed);
        }
        // The changes the snapshot already holds are dropped, and so is a completion it
        // already reflects; their transactions are whole (`after` ends one), so the
        // numbering of those that remain is untouched.
        while let Some(item) = self.held.pop_front() {
            let position = match &item {
                SubscriptionItem::Event(ev) => Some(ev.position),
                SubscriptionItem::Completed { position, .. } => Some(*position),
                _ => None,
            };
            if position.is_some_and(|p| p <= after) {
                continue;
            }
            let last = matches!(item, SubscriptionItem::Completed { .. });
            // Holds what the hub sends meanwhile behind it, so the hub's queue does not
            // fill while the backlog drains.
            self.emit(item).await?;
            if last {
                return Err(Stop::Completed);
            }
        }
        Ok(())
    }

    /// Takes snapshots until one matches a position of the change stream; returns it open
    /// with that position.
    async fn settle(&mut self, joined: Position) -> Result<(Session, Position), Stop> {
        let source = self.job.source.clone();
        let table = TableName {
            schema: self.job.table.schema.clone(),
            table: self.job.table.table.clone(),
        };
        let mut feed = HubFeed { run: self, joined };
        let (session, after) = initial::place(&source, &[table], &mut feed).await?;
        Ok((session, after.unwrap_or(joined)))
    }

    async fn wait_for_watermark(&mut self, watermark: Watermark) -> Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + WATERMARK_WAIT;
        loop {
            let fed = tokio::time::timeout_at(deadline, self.next_fed())
                .await
                .map_err(|_| SnapshotError::WatermarkTimeout {
                    watermark,
                    seconds: WATERMARK_WAIT.as_secs(),
                })??;
            match fed {
                Fed::Watermark(w) if w >= watermark => return Ok(()),
                Fed::Watermark(_) => {}
                Fed::Item(item) => self.hold(item)?,
                Fed::Ended(conflict) => {
                    return Err(SubscriptionError::SchemaChanged(conflict).into())
                }
            }
        }
    }

    fn hold(&mut self, item: SubscriptionItem) -> Result<(), Stop> {
        hold(&mut self.held, self.job.buffer_limit, item)
    }

    /// The next item or watermark from the hub.
    async fn next_fed(&mut self) -> Result<Fed, Stop> {
        match self.job.hub.rx.recv().await {
            Some(Ok(fed)) => Ok(fed),
            Some(Err(e)) => Err(SubscriptionError::Source(e).into()),
            None => Err(self.ended()),
        }
    }

    /// Hands out an item, holding the hub's changes meanwhile so that its queue never
    /// fills while the subscriber reads the rows and the backlog.
    async fn emit(&mut self, item: SubscriptionItem) -> Result<(), Stop> {
        let out = self.out.clone();
        loop {
            tokio::select! {
                permit = out.reserve() => {
                    let permit = permit.map_err(|_| Stop::Gone)?;
                    permit.send(Ok(item));
                    return Ok(());
                }
                fed = self.job.hub.rx.recv() => match fed {
                    Some(Ok(Fed::Item(change))) => hold(&mut self.held, self.job.buffer_limit, change)?,
                    Some(Ok(Fed::Watermark(_))) => {}
                    Some(Ok(Fed::Ended(conflict))) => {
                        return Err(SubscriptionError::SchemaChanged(conflict).into())
                    }
                    Some(Err(e)) => return Err(SubscriptionError::Source(e).into()),
                    None => return Err(self.ended()),
                },
            }
        }
    }

    /// Why the hub closed the queue: lagging, or the hub stopped.
    fn ended(&self) -> Stop {
        self.job
            .hub
            .ended()
            .unwrap_or(SubscriptionError::HubStopped)
            .into()
    }
}

/// The hub's live feed as the change feed a snapshot is placed in: it joined at the
/// subscription's `initialized` position and holds what arrives after it.
struct HubFeed<'a> {
    run: &'a mut Run,
    joined: Position,
}

impl initial::ChangeFeed for HubFeed<'_> {
    type Error = Stop;

    async fn join_point(&mut self) -> Result<Option<Position>, Stop> {
        Ok(Some(self.joined))
    }

    /// The hub remembers the most recent commits it decoded.
    async fn commits_through(&mut self, joined: Option<Position>) -> Result<Vec<(u32, Lsn)>, Stop> {
        let (reply, answer) = oneshot::channel();
        self.run
            .job
            .commands
            .send(Command::Recent(reply))
            .await
            .map_err(|_| SubscriptionError::HubStopped)?;
        let recent = answer.await.map_err(|_| SubscriptionError::HubStopped)?;
        let through = joined.map_or(Lsn(0), |p| p.commit_lsn);
        Ok(recent
            .into_iter()
            .filter(|(_, lsn)| *lsn <= through)
            .collect())
    }

    async fn pass(&mut self, watermark: Watermark) -> Result<(), Stop> {
        self.run.wait_for_watermark(watermark).await
    }

    async fn commits_between(
        &mut self,
        _joined: Option<Position>,
        watermark: Watermark,
    ) -> Result<Vec<CommittedTx>, Stop> {
        Ok(committed(&self.run.held, watermark))
    }
}

fn hold(
    held: &mut VecDeque<SubscriptionItem>,
    limit: usize,
    item: SubscriptionItem,
) -> Result<(), Stop> {
    if held.len() >= limit {
        return Err(SubscriptionError::Lagged { queue: limit }.into());
    }
    held.push_back(item);
    Ok(())
}

/// The transactions among the held changes that were decoded before `watermark`, each
/// with the position of its last event. A transaction committing exactly at the watermark
/// comes after it.
fn committed(held: &VecDeque<SubscriptionItem>, watermark: Watermark) -> Vec<CommittedTx> {
    let mut txs: Vec<CommittedTx> = Vec::new();
    for item in held {
        let SubscriptionItem::Event(ev) = item else {
            continue;
        };
        if !watermark.follows_commit(ev.position.commit_lsn) {
            break;
        }
        match txs.last_mut() {
            Some(t) if t.last.commit_lsn == ev.position.commit_lsn => t.last = ev.position,
            _ => txs.push(CommittedTx {
                xid: ev.tx.xid,
                last: ev.position,
            }),
        }
    }
    txs
}
