//! Placing an initial state's snapshot among the events of the JetStream log: the same
//! method as over the Postgres log ([`crate::initial::place`]), with the stream as the
//! change feed.
//!
//! Invariants:
//!
//! - the join point is where the stream ends before the snapshot is taken: after its last
//!   message's transaction, or (when a crash cut the stream inside a transaction) before
//!   that transaction, which is not all in yet;
//! - the log holds every transaction that commits below a watermark once a message at or
//!   past the watermark is stored (the writer publishes in commit order), or once the
//!   writer recorded the watermark's mark in the bucket (the source was idle: no message
//!   came after it);
//! - events the stream's limits discarded after the join point fail the placement
//!   ([`JetStreamError::SnapshotGap`]) instead of placing the snapshot on a partial log,
//!   and so does a message the server holds but did not deliver in time (a transient
//!   error: the next consumer copies again).

use std::time::Duration;

use super::read::xid_of;
use super::{JetStreamError, JetStreamReader};
use crate::event::{Position, TableName};
use crate::initial::{self, ChangeFeed, CommittedTx, Session, SnapshotError};
use crate::log::initial::{JOIN_LOOKBACK, WATERMARK_WAIT};
use crate::log::streams::{Mark, TX_END};
use crate::log::StoreError;
use crate::lsn::{Lsn, Watermark};
use crate::pg::config::SourceConfig;

/// How often [`ChangeFeed::pass`] looks at the stream's end and the bucket again.
const RECHECK: Duration = Duration::from_millis(50);

/// Messages read per page while placing a snapshot.
const PAGE: usize = 1024;

/// Takes a snapshot of `watched` and finds the position among the events of `tables` in
/// the JetStream log after which every event is one the snapshot does not contain.
/// Returns the open snapshot and that position (`None`: before every event).
pub(crate) async fn settle(
    log: &JetStreamReader,
    watched: &SourceConfig,
    tables: &[TableName],
) -> Result<(Session, Option<Position>), StoreError> {
    let mut feed = StreamFeed { log, tables };
    initial::place(watched, tables, &mut feed).await
}

/// The JetStream log of one source as the change feed a snapshot is placed in.
struct StreamFeed<'a> {
    log: &'a JetStreamReader,
    tables: &'a [TableName],
}

impl StreamFeed<'_> {
    fn gap(&self) -> StoreError {
        StoreError::JetStream(JetStreamError::SnapshotGap {
            slot: self.log.source().to_owned(),
        })
    }
}

fn after(joined: Option<Position>) -> Mark {
    joined.map_or(Mark { lsn: 0, ordinal: 0 }, Mark::of)
}

impl ChangeFeed for StreamFeed<'_> {
    type Error = StoreError;

    async fn join_point(&mut self) -> Result<Option<Position>, StoreError> {
        let Some(head) = self.log.head().await? else {
            return Err(StoreError::JetStream(JetStreamError::EndUnknown {
                slot: self.log.source().to_owned(),
            }));
        };
        Ok(match head {
            Mark { lsn: 0, .. } => None,
            Mark { lsn, ordinal } if ordinal == TX_END => {
                Some(Position::new(Lsn(lsn as u64), TX_END as u32))
            }
            // Inside a transaction: every one before it is in, not this one yet.
            Mark { lsn, .. } => Some(Position::new(Lsn(lsn as u64 - 1), TX_END as u32)),
        })
    }

    async fn commits_through(
        &mut self,
        joined: Option<Position>,
    ) -> Result<Vec<(u32, Lsn)>, StoreError> {
        match joined {
            None => Ok(Vec::new()),
            Some(p) => {
                self.log
                    .commits_before(Mark::of(p), JOIN_LOOKBACK as u64)
                    .await
            }
        }
    }

    async fn pass(&mut self, watermark: Watermark) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + WATERMARK_WAIT;
        loop {
            let by_messages = self
                .log
                .head()
                .await?
                .is_some_and(|head| head.lsn as u64 >= watermark.lsn().0);
            if by_messages
                || self
                    .log
                    .watermark_mark()
                    .await?
                    .is_some_and(|m| m.reached(watermark))
            {
                return Ok(());
            }
            if tokio::time::Instant::now() + RECHECK > deadline {
                return Err(SnapshotError::WatermarkTimeout {
                    watermark,
                    seconds: WATERMARK_WAIT.as_secs(),
                }
                .into());
            }
            tokio::time::sleep(RECHECK).await;
        }
    }

    async fn commits_between(
        &mut self,
        joined: Option<Position>,
        watermark: Watermark,
    ) -> Result<Vec<CommittedTx>, StoreError> {
        let after = after(joined);
        let mut follower = self.log.follow(after, self.tables).await?;
        let mut txs: Vec<CommittedTx> = Vec::new();
        'read: loop {
            let page = follower.page(PAGE, None).await?;
            if page.gap_through.is_some_and(|gap| gap > after) {
                return Err(self.gap());
            }
            if page.events.is_empty() {
                follower.check_read_all()?;
                break;
            }
            for stored in page.events {
                // Commit LSN strictly below the watermark: one at it comes after.
                if stored.at.lsn as u64 >= watermark.lsn().0 {
                    break 'read;
                }
                let Some(body) = &stored.body else { continue };
                let last = stored.at.position();
                match txs.last_mut() {
                    Some(tx) if tx.last.commit_lsn == last.commit_lsn => tx.last = last,
                    _ => txs.push(CommittedTx {
                        last,
                        xid: xid_of(body, stored.at)?,
                    }),
                }
            }
        }
        Ok(txs)
    }
}
