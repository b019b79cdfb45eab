//! Failover safety of the appender: the source slot is confirmed only after the event
//! log's commit reached the store's failover standbys. (A slot that vanished under a log
//! with history is refused where slots are made: `setup::SetupOptions::consumed_through`.)
//!
//! Why the wait is needed: with `synchronized_standby_slots` the primary sends a change to
//! waltap only once the standbys have it, and a standby syncs the slot's confirmed
//! position only once it has the WAL up to that position. The log's commit, though, comes
//! *after* the change it stores. Without the wait, a standby could hold a slot confirmed
//! past a change and lack the log commit holding it; promoted, it would never send the
//! change again. Invariant kept here: when the slot is confirmed at `C`, every standby
//! named in the store server's `synchronized_standby_slots` has flushed the log commit
//! holding the changes up to `C`.
//!
//! The setting is read once per pipeline session (PostgreSQL 17+; older servers have no
//! such standbys and nothing is waited for).

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use crate::log::StoreError;

/// The store server's failover standbys, as physical slot names.
pub(crate) struct StandbyWait {
    slots: Vec<String>,
}

/// After this long without the standbys confirming, the wait is logged as a warning (the
/// pipeline keeps waiting: confirming earlier could lose changes in a failover).
const WARN_AFTER: Duration = Duration::from_secs(10);

impl StandbyWait {
    /// Reads `synchronized_standby_slots` of the store's server.
    pub(crate) async fn read(store: &Client) -> Result<StandbyWait, StoreError> {
        let row = store
            .query_one(
                "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
                &[],
            )
            .await
            .map_err(StoreError::sql("read synchronized_standby_slots"))?;
        let setting: String = row.get(0);
        Ok(StandbyWait {
            slots: parse_slot_list(&setting),
        })
    }

    /// Whether there is anything to wait for.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Returns once every standby slot has flushed the store's WAL as of now (which
    /// includes the commit just made on `store`).
    pub(crate) async fn until_flushed(&self, store: &Client) -> Result<(), StoreError> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut warned = false;
        let mut pause = Duration::from_millis(1);
        let row = store
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(StoreError::sql("read the store's WAL position"))?;
        let target: String = row.get(0);
        loop {
            let row = store
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots
                     WHERE slot_name = ANY($1) AND restart_lsn >= $2::text::pg_lsn",
                    &[&self.slots, &target],
                )
                .await
                .map_err(StoreError::sql("read the standby slots' positions"))?;
            let flushed: i64 = row.get(0);
            if flushed as usize >= self.slots.len() {
                return Ok(());
            }
            if !warned && started.elapsed() >= WARN_AFTER {
                warned = true;
                tracing::warn!(
                    standby_slots = ?self.slots,
                    position = %target,
                    "waiting for the standbys in synchronized_standby_slots to flush the event log's commit before confirming the source slot (is a standby down, or a slot missing?)"
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// The GUC is a comma-separated list of names, optionally double-quoted.
fn parse_slot_list(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_slot_list;

    #[test]
    fn slot_lists_parse_like_the_server() {
        assert!(parse_slot_list("").is_empty());
        assert_eq!(parse_slot_list("sb1"), vec!["sb1"]);
        assert_eq!(parse_slot_list(" sb1 , \"Sb 2\""), vec!["sb1", "Sb 2"]);
    }
}
