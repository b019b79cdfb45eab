//! Placing a snapshot among the changes: the one algorithm behind every initial state
//! (a subscription's, a stream's, `waltap export`'s), over any change feed that can say
//! which transactions it holds.
//!
//! The loop: note the join point (the feed holds every commit at or before it), take a
//! snapshot with its watermark, check that no transaction the snapshot misses committed
//! at or before the join ([`check_joined`]), wait until the feed passes the watermark,
//! then find the position after which the feed holds only what the snapshot lacks
//! ([`settle`]). A snapshot that matches no position is dropped and another taken, at
//! most [`MAX_ATTEMPTS`] times.

use super::{check_joined, settle, CommittedTx, Session, SnapshotError, MAX_ATTEMPTS};
use crate::event::{Position, TableName};
use crate::lsn::{Lsn, Watermark};
use crate::pg::config::SourceConfig;

/// A change stream a snapshot is placed in: the hub's live feed, or the event log.
pub(crate) trait ChangeFeed {
    /// What the feed's own operations fail with; snapshot failures convert into it.
    type Error: From<SnapshotError>;

    /// The join point for the next attempt: the feed holds every commit at or before it
    /// (`None`: before every commit).
    async fn join_point(&mut self) -> Result<Option<Position>, Self::Error>;

    /// The most recent commits at or before `joined`, as `(xid, commit LSN)`.
    async fn commits_through(
        &mut self,
        joined: Option<Position>,
    ) -> Result<Vec<(u32, Lsn)>, Self::Error>;

    /// Returns once the feed holds every transaction that commits before `watermark`.
    async fn pass(&mut self, watermark: Watermark) -> Result<(), Self::Error>;

    /// The transactions after `joined` that commit before `watermark`, in commit order,
    /// each with the position of its last event (of the tables the snapshot reads).
    async fn commits_between(
        &mut self,
        joined: Option<Position>,
        watermark: Watermark,
    ) -> Result<Vec<CommittedTx>, Self::Error>;
}

/// Takes snapshots of `source` (locking `tables`, which it will read) until one matches a
/// position of `feed`; returns it open, with that position (`None`: before every change of
/// the feed).
pub(crate) async fn place<F: ChangeFeed>(
    source: &SourceConfig,
    tables: &[TableName],
    feed: &mut F,
) -> Result<(Session, Option<Position>), F::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let joined = feed.join_point().await?;
        let session = Session::begin(source, tables).await?;
        let outcome = match check_joined(&session.xids, &feed.commits_through(joined).await?) {
            Err(e) => Err(e),
            Ok(()) => {
                feed.pass(session.watermark).await?;
                let txs = feed.commits_between(joined, session.watermark).await?;
                settle(&session.xids, joined, &txs)
            }
        };
        match outcome {
            Ok(at) => return Ok((session, at)),
            Err(e @ SnapshotError::Unsettled { .. }) if attempt < MAX_ATTEMPTS => {
                tracing::debug!(error = %crate::error::report(&e), attempt, "the snapshot matches no position of the changes; taking another");
                session.finish().await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
