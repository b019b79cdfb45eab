//! Retention of the event log: deleting a source's oldest events by age and/or size.
//!
//! Invariants:
//!
//! - only a prefix of the source's log is deleted, oldest first, so "every event at or
//!   below the pruned mark is gone" holds, and the mark (`waltap.progress.pruned_lsn`,
//!   `pruned_ordinal`) moves in the same transaction as each deletion: a stream reading in
//!   one snapshot either sees the events or the mark that makes its cursor stale, never a
//!   silent gap;
//! - by age alone, no event appended less than `max_age` ago is deleted; with a size bound
//!   too, the oldest events go until the rest fits, whatever their age;
//! - deletions end at transaction boundaries, so that a stream resuming inside a
//!   transaction finds it whole; only a transaction larger than a chunk is cut;
//! - each chunk is its own short transaction, so appends and readers are not held up.
//!
//! Size is the stored size of the events' JSON (`pg_column_size`, after compression),
//! without row and index overhead; measuring it reads the source's whole log.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::streams::Mark;
use super::StoreError;
use crate::event::Position;
use crate::pg::config::SourceConfig;

/// Events examined and deleted per transaction.
const CHUNK: i64 = 5_000;

/// What to keep of a source's log, and how often `waltap run` enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delete events appended longer ago than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest events while the source's events take more than this.
    pub max_bytes: Option<u64>,
    /// Time between runs.
    pub interval: Duration,
}

/// What one [`prune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// How many events it deleted.
    pub events: u64,
    /// The new pruned mark, when anything was deleted.
    pub through: Option<Position>,
}

/// Deletes `source`'s oldest events by `max_age` and/or `max_bytes` (see the module doc).
pub async fn prune(
    client: &mut Client,
    source: &str,
    max_age: Option<Duration>,
    max_bytes: Option<u64>,
) -> Result<Pruned, StoreError> {
    let mut done = Pruned::default();
    if max_age.is_none() && max_bytes.is_none() {
        return Ok(done);
    }
    let mut to_free: i64 = match max_bytes {
        None => 0,
        Some(max) => {
            let total: i64 = client
                .query_one(
                    "SELECT coalesce(sum(pg_column_size(event)), 0)::int8
                     FROM waltap.events WHERE source = $1",
                    &[&source],
                )
                .await
                .map_err(StoreError::sql("measure the log"))?
                .get(0);
            total.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX))
        }
    };
    let age_secs = max_age.map(|a| a.as_secs_f64());
    loop {
        let rows = client
            .query(
                "SELECT commit_lsn, ordinal, tx_last, pg_column_size(event)::int8,
                        coalesce(appended_at < now() - make_interval(secs => $2), false)
                 FROM waltap.events WHERE source = $1
                 ORDER BY commit_lsn, ordinal LIMIT $3",
                &[&source, &age_secs, &CHUNK],
            )
            .await
            .map_err(StoreError::sql("read the oldest events"))?;
        // The longest prefix of deletable events that ends a transaction.
        let mut bound = None;
        let mut freed = 0i64;
        let mut freed_at_bound = 0i64;
        let mut whole_chunk = true;
        let mut inside_tx = false;
        for row in &rows {
            let old: bool = row.get(4);
            // Over the size bound, a transaction begun is deleted whole.
            let by_size = freed < to_free || (inside_tx && max_bytes.is_some());
            if !old && !by_size {
                whole_chunk = false;
                break;
            }
            freed += row.get::<_, i64>(3);
            let tx_last: bool = row.get(2);
            inside_tx = !tx_last;
            if tx_last {
                bound = Some(Mark {
                    lsn: row.get(0),
                    ordinal: row.get(1),
                });
                freed_at_bound = freed;
            }
        }
        if bound.is_none() && whole_chunk && rows.len() as i64 == CHUNK {
            // One transaction fills the chunk: cut it rather than never prune it.
            if let Some(row) = rows.last() {
                bound = Some(Mark {
                    lsn: row.get(0),
                    ordinal: row.get(1),
                });
                freed_at_bound = freed;
            }
        }
        let Some(bound) = bound else {
            return Ok(done);
        };
        let tx = client
            .transaction()
            .await
            .map_err(StoreError::sql("begin pruning"))?;
        let deleted = tx
            .execute(
                "DELETE FROM waltap.events
                 WHERE source = $1 AND (commit_lsn, ordinal) <= ($2, $3)",
                &[&source, &bound.lsn, &bound.ordinal],
            )
            .await
            .map_err(StoreError::sql("delete old events"))?;
        tx.execute(
            "UPDATE waltap.progress SET pruned_lsn = $2, pruned_ordinal = $3
             WHERE source = $1 AND (pruned_lsn, pruned_ordinal) < ($2, $3)",
            &[&source, &bound.lsn, &bound.ordinal],
        )
        .await
        .map_err(StoreError::sql("record the pruned mark"))?;
        tx.commit()
            .await
            .map_err(StoreError::sql("commit pruning"))?;
        to_free -= freed_at_bound;
        done.events += deleted;
        done.through = Some(bound.position());
        tracing::debug!(source, through = %bound.position(), deleted, "pruned the event log");
    }
}

/// Prunes `source` every `policy.interval` until cancelled, over a connection of its own
/// (reconnecting after failures, which it logs).
pub async fn run(
    store: SourceConfig,
    source: String,
    policy: Retention,
    cancel: CancellationToken,
) {
    let mut client: Option<Client> = None;
    loop {
        if client.is_none() {
            match store.connect_sql().await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(source, error = %crate::error::report(&e), "retention cannot connect")
                }
            }
        }
        if let Some(c) = client.as_mut() {
            match prune(c, &source, policy.max_age, policy.max_bytes).await {
                Ok(p) if p.events > 0 => {
                    tracing::info!(source, events = p.events, through = ?p.through.map(|t| t.to_string()), "retention pruned the event log");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(source, error = %crate::error::report(&e), "retention failed; retrying at the next interval");
                    if e.is_transient() {
                        client = None;
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(policy.interval) => {}
        }
    }
}
