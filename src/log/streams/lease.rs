//! The lease and acknowledgements a consumer shares with its reader: one consumer per
//! stream at a time, the cursor moved only forward and only by acknowledgements.

use super::cursor::*;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use crate::log::pool::{Conn, ConsumerPool};
use crate::log::StoreError;

/// Why a stream could not be leased: it is gone, or someone holds it.
pub(super) async fn busy_or_missing(store: &Client, name: &str) -> StoreError {
    let row = store
        .query_opt(
            "SELECT to_char(lease_expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
             FROM waltap.streams WHERE name = $1",
            &[&name],
        )
        .await;
    match row {
        Err(e) => StoreError::Sql {
            operation: "read a stream's lease",
            source: e,
        },
        Ok(None) => StoreError::NoSuchStream(name.to_owned()),
        Ok(Some(r)) => StoreError::StreamBusy {
            name: name.to_owned(),
            until: r.get::<_, Option<String>>(0).unwrap_or_default(),
        },
    }
}

/// What the consumer and its reader share: the lease and the progress of
/// acknowledgements, and the connection that [`StreamConsumer::ack`] uses.
///
/// Every statement takes a connection from the pool and returns it when done, never
/// holding one while waiting for another, so that consumers share a bounded pool; the
/// reader and acknowledgements never queue behind each other on one connection.
pub(super) struct Shared {
    pub(super) pool: ConsumerPool,
    pub(super) name: String,
    pub(super) holder: String,
    pub(super) lease: Duration,
    pub(super) state: Mutex<Progress>,
}

pub(super) struct Progress {
    /// The persisted cursor.
    pub(super) acked: Mark,
    /// The last event handed out.
    pub(super) yielded: Option<Mark>,
    /// Through here, events were handed out to this stream's consumers (this one or
    /// earlier ones): acknowledgements may not go further.
    pub(super) delivered: Mark,
    /// Initial-state rows 1..this were handed out.
    pub(super) snapshot_delivered: i64,
    /// Set while the reader is caught up with nothing held back: every event up to here
    /// that the stream delivers has been handed out.
    pub(super) quiet_through: Option<Mark>,
    pub(super) renewed_at: Instant,
    /// The stream's initial state is not yet all acknowledged (its marker included).
    pub(super) snapshot_open: bool,
    /// The last row of the initial state acknowledged.
    pub(super) snapshot_acked: i64,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, Progress> {
        // The lock guards plain values and no code panics while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }

    pub(super) fn renewal_due(&self) -> bool {
        self.state().renewed_at.elapsed() >= self.lease / 3
    }

    /// The lease was not renewed: the stream was deleted, or another consumer holds it.
    pub(super) async fn lost(&self, client: &Client) -> StoreError {
        match busy_or_missing(client, &self.name).await {
            StoreError::StreamBusy { .. } => StoreError::LeaseLost {
                name: self.name.clone(),
            },
            other => other,
        }
    }

    pub(super) async fn renew(&self, client: &Client) -> Result<(), StoreError> {
        let started = Instant::now();
        let n = client
            .execute(
                "UPDATE waltap.streams SET lease_expires_at = now() + make_interval(secs => $3)
                 WHERE name = $1 AND lease_holder = $2",
                &[&self.name, &self.holder, &self.lease_secs()],
            )
            .await
            .map_err(StoreError::sql("renew a stream's lease"))?;
        if n == 0 {
            return Err(self.lost(client).await);
        }
        self.state().renewed_at = started;
        Ok(())
    }

    /// Moves the cursor forward to `to` (never back) and renews the lease, on `client`:
    /// the caller's own connection (see [`Shared`]).
    pub(super) async fn store_cursor(&self, client: &Conn, to: Mark) -> Result<(), StoreError> {
        let started = Instant::now();
        let statement = client
            .prepare_cached(
                "UPDATE waltap.streams SET
                     cursor_lsn = CASE WHEN ($3::int8, $4::int4) > (cursor_lsn, cursor_ordinal)
                                       THEN $3 ELSE cursor_lsn END,
                     cursor_ordinal = CASE WHEN ($3::int8, $4::int4) > (cursor_lsn, cursor_ordinal)
                                           THEN $4 ELSE cursor_ordinal END,
                     acked_at = now(),
                     lease_expires_at = now() + make_interval(secs => $5)
                 WHERE name = $1 AND lease_holder = $2
                 RETURNING cursor_lsn, cursor_ordinal",
            )
            .await
            .map_err(StoreError::sql("acknowledge"))?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &self.name,
                    &self.holder,
                    &to.lsn,
                    &to.ordinal,
                    &self.lease_secs(),
                ],
            )
            .await
            .map_err(StoreError::sql("acknowledge"))?;
        let Some(row) = row else {
            return Err(self.lost(client).await);
        };
        let mut state = self.state();
        state.acked = Mark {
            lsn: row.get(0),
            ordinal: row.get(1),
        };
        state.renewed_at = started;
        Ok(())
    }

    /// Refuses to acknowledge `to` when it lies beyond what the stream delivered (or, with
    /// `quiet`, beyond what the reader has read through without finding anything more).
    pub(super) fn check_delivered(&self, to: Mark, quiet: bool) -> Result<(), StoreError> {
        let state = self.state();
        let mut bound = state.acked.max(state.delivered);
        if quiet {
            bound = bound.max(state.quiet_through.unwrap_or(bound));
        }
        if to <= bound {
            return Ok(());
        }
        Err(StoreError::AheadOfDelivery {
            name: self.name.clone(),
            cursor: to.position().to_string(),
            delivered: bound.position().to_string(),
        })
    }

    /// As [`Shared::check_delivered`], for row `seq` of the initial state.
    pub(super) fn check_snapshot_delivered(&self, seq: u64) -> Result<i64, StoreError> {
        let delivered = self.state().snapshot_delivered;
        match i64::try_from(seq) {
            Ok(seq) if seq <= delivered => Ok(seq),
            _ => Err(StoreError::AheadOfDelivery {
                name: self.name.clone(),
                cursor: Cursor::Snapshot(seq).to_string(),
                delivered: Cursor::Snapshot(delivered.max(0) as u64).to_string(),
            }),
        }
    }

    /// Records, before they are handed out, that events through `to` and initial-state
    /// rows through `snapshot` are delivered (on the reader's connection).
    pub(super) async fn record_delivered(
        &self,
        to: Option<Mark>,
        snapshot: Option<i64>,
    ) -> Result<(), StoreError> {
        {
            let state = self.state();
            let more = to.is_some_and(|m| m > state.delivered)
                || snapshot.is_some_and(|n| n > state.snapshot_delivered);
            if !more {
                return Ok(());
            }
        }
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "UPDATE waltap.streams SET
                     (delivered_lsn, delivered_ordinal) = (
                         SELECT CASE WHEN $3::int8 IS NULL OR (delivered_lsn, delivered_ordinal) >= ($3, $4::int4)
                                     THEN delivered_lsn ELSE $3 END,
                                CASE WHEN $3::int8 IS NULL OR (delivered_lsn, delivered_ordinal) >= ($3, $4::int4)
                                     THEN delivered_ordinal ELSE $4 END),
                     snapshot_delivered = greatest(snapshot_delivered, coalesce($5::int8, 0))
                 WHERE name = $1 AND lease_holder = $2",
            )
            .await
            .map_err(StoreError::sql("record what a stream delivered"))?;
        let n = client
            .execute(
                &statement,
                &[
                    &self.name,
                    &self.holder,
                    &to.map(|m| m.lsn),
                    &to.map(|m| m.ordinal),
                    &snapshot,
                ],
            )
            .await
            .map_err(StoreError::sql("record what a stream delivered"))?;
        if n == 0 {
            return Err(self.lost(&client).await);
        }
        let mut state = self.state();
        if let Some(m) = to {
            state.delivered = state.delivered.max(m);
        }
        if let Some(seq) = snapshot {
            state.snapshot_delivered = state.snapshot_delivered.max(seq);
        }
        Ok(())
    }

    /// Acknowledges the initial state's rows up to `seq`, or with `None` all of it, its
    /// marker included: only then is the copy deleted, so that a consumer that has the
    /// last row but not the marker gets the marker again.
    pub(super) async fn ack_snapshot(
        &self,
        client: &Client,
        seq: Option<i64>,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let row = client
            .query_opt(
                "UPDATE waltap.streams SET
                     snapshot_acked = greatest(snapshot_acked, least(coalesce($3, snapshot_total), snapshot_total)),
                     snapshot_state = CASE WHEN $3 IS NULL THEN NULL ELSE snapshot_state END,
                     acked_at = now(),
                     lease_expires_at = now() + make_interval(secs => $4)
                 WHERE name = $1 AND lease_holder = $2
                 RETURNING snapshot_state, snapshot_acked",
                &[&self.name, &self.holder, &seq, &self.lease_secs()],
            )
            .await
            .map_err(StoreError::sql("acknowledge initial-state rows"))?;
        let Some(row) = row else {
            return Err(self.lost(client).await);
        };
        let open = row.get::<_, Option<String>>(0).is_some();
        if !open {
            client
                .execute(
                    "DELETE FROM waltap.snapshot_rows WHERE stream = $1",
                    &[&self.name],
                )
                .await
                .map_err(StoreError::sql("delete a delivered initial state"))?;
        }
        let mut state = self.state();
        state.snapshot_open = open;
        state.snapshot_acked = row.get(1);
        state.renewed_at = started;
        Ok(())
    }

    pub(super) async fn release(&self) {
        match self.pool.get().await {
            Ok(client) => release_lease(&client, &self.name, &self.holder).await,
            Err(e) => {
                tracing::debug!(stream = %self.name, error = %crate::error::report(&e), "lease not released; it expires");
            }
        }
    }
}

/// Gives up `holder`'s lease on stream `name` (if it still holds it); when that fails, the
/// lease expires on its own.
pub(super) async fn release_lease(client: &Conn, name: &str, holder: &str) {
    let statement = client
        .prepare_cached(
            "UPDATE waltap.streams SET lease_holder = NULL, lease_expires_at = NULL
             WHERE name = $1 AND lease_holder = $2",
        )
        .await;
    let result = match statement {
        Ok(statement) => client.execute(&statement, &[&name, &holder]).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(stream = %name, error = %crate::error::report(&e), "lease not released; it expires");
    }
}
