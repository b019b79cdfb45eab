//! High availability: several waltap processes on one source form a group with one leader.
//!
//! Leadership is decided in the store, with nothing beside Postgres:
//!
//! - **The lock.** Each member opens a dedicated store session and waits in
//!   `pg_advisory_lock(2004115824, key)`, where `key` is the FNV-1a hash (32 bits) of the
//!   slot name read as a signed integer ([`lock_key`]; the first number spells `wtap`).
//!   Postgres grants it to one session; that member leads, and reads the slot.
//! - **Losing it.** The lock ends with its session. A member that dies (SIGKILL, a crash)
//!   closes its socket and the lock passes at once. The session sends a heartbeat every
//!   fifth of the takeover timeout, and runs with `idle_session_timeout` set to that
//!   timeout (PostgreSQL 14 and later), so a paused or partitioned leader loses its
//!   session, and the lock, one takeover timeout after its last heartbeat; TCP keepalives
//!   on both ends (`tcp_keepalives_*`) end the session of a host that vanished within
//!   about the same time.
//! - **Fencing.** On taking the lock the new leader bumps the source's `term` in
//!   `waltap.progress`; every append transaction updates that row only where the term is
//!   still its own ([`crate::log::PgLog::fence`]), so a former leader that wakes up can
//!   never append after the takeover: its commit fails with
//!   [`crate::log::StoreError::Fenced`] and it steps down. Before that bump the new leader
//!   ends the former leader's appending sessions (`application_name`
//!   `waltap appender <key in hex>`), whose open transaction would hold up the
//!   progress row; Postgres ends any left idle in a transaction for
//!   [`IDLE_TRANSACTION_LIMIT`] anyway.
//! - **The slot.** Before reading the slot the new leader ends a walsender still holding
//!   it (the former leader's) with `pg_terminate_backend`.
//!
//! Followers wait on the lock; they serve HTTP meanwhile (streams read the log). Each
//! member names its leadership session (`application_name` [`MEMBER_APPLICATION_PREFIX`]
//! followed by `host:pid`), so that [`members`] lists the group from any session.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::log::append::{self, AppendError, AppenderConfig};
use crate::log::StoreError;
use crate::pg::config::SourceConfig;

/// The first number of every leadership lock (`wtap` in ASCII).
pub const LOCK_CLASS: i32 = 0x7774_6170;

/// How long a leader's store transaction may stay idle before Postgres ends it: the last
/// resort when the next leader cannot end a paused one's session itself. Long enough for
/// the pauses between the chunks of a huge source transaction.
pub const IDLE_TRANSACTION_LIMIT: Duration = Duration::from_secs(60);

/// The `application_name` of a member's leadership session starts with this, followed by
/// the member's name.
pub const MEMBER_APPLICATION_PREFIX: &str = "waltap member ";

/// The default of `--takeover-timeout`.
pub const DEFAULT_TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The term a leader appends under ([`AppenderConfig::leader`]).
#[derive(Debug, Clone, Copy)]
pub struct Term {
    /// The term's number; each takeover of the source's leadership takes the next one.
    pub term: i64,
    /// How long the leader's store transactions may stay idle before Postgres ends them.
    pub idle_limit: Duration,
}

/// How a member takes part in the group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// How long a leader that stopped answering (paused, partitioned, its host gone) keeps
    /// leadership. A leader that exits or is killed hands over at once.
    pub takeover_timeout: Duration,
    /// How this member is named in `waltap status` and the logs: `host:pid`.
    pub member: String,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            takeover_timeout: DEFAULT_TAKEOVER_TIMEOUT,
            member: member_name(),
        }
    }
}

/// This member's role, for health checks and metrics.
#[derive(Debug, Default)]
pub struct Membership {
    leader: AtomicBool,
    term: AtomicI64,
    takeovers: AtomicU64,
}

impl Membership {
    /// Whether this member leads its group now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The term this member leads or last led (0: never).
    pub fn term(&self) -> i64 {
        self.term.load(Ordering::Relaxed)
    }

    /// How many times this member became the leader.
    pub fn takeovers(&self) -> u64 {
        self.takeovers.load(Ordering::Relaxed)
    }

    /// `leader` or `follower`.
    pub fn role(&self) -> &'static str {
        if self.is_leader() {
            "leader"
        } else {
            "follower"
        }
    }
}

/// `host:pid` of this process.
pub fn member_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

/// The advisory lock of a source: `(LOCK_CLASS, fnv1a32(slot))`.
pub fn lock_key(slot: &str) -> (i32, i32) {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in slot.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (LOCK_CLASS, hash as i32)
}

/// Runs as a member of the group until cancelled: waits for leadership, appends while
/// leading, steps down when leadership is lost and waits again. Returns the definite
/// error that stopped it, if any.
pub async fn run(
    appender: AppenderConfig,
    group: GroupConfig,
    membership: Arc<Membership>,
    cancel: CancellationToken,
) -> Result<(), AppendError> {
    let slot = appender.listener.slot.clone();
    let mut backoff = appender.listener.reconnect_min;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let lock = match Lock::acquire(&appender.store, &slot, &group, &cancel).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(slot = %slot, error = %e, retry_in = ?backoff, "cannot contend for leadership; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(appender.listener.reconnect_max);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        backoff = appender.listener.reconnect_min;
        membership.term.store(lock.term, Ordering::Relaxed);
        membership.takeovers.fetch_add(1, Ordering::Relaxed);
        membership.leader.store(true, Ordering::Relaxed);
        tracing::info!(slot = %slot, term = lock.term, member = %group.member, "became the leader");
        let mut config = appender.clone();
        config.leader = Some(Term {
            term: lock.term,
            idle_limit: IDLE_TRANSACTION_LIMIT.max(group.takeover_timeout),
        });
        let stop = cancel.child_token();
        let mut task = std::pin::pin!(append::run(config, stop.clone()));
        let outcome = tokio::select! {
            result = &mut task => result.map_err(|e| match e {
                AppendError::Store(fenced @ StoreError::Fenced { .. }) => Ok(fenced.to_string()),
                other => Err(other),
            }),
            reason = lock.watch(&slot, group.takeover_timeout) => {
                stop.cancel();
                let _ = task.await;
                Err(Ok(reason))
            }
        };
        membership.leader.store(false, Ordering::Relaxed);
        // Dropping the session releases the lock for the next leader.
        drop(lock);
        match outcome {
            Ok(()) => {
                tracing::info!(slot = %slot, member = %group.member, "stepping down: shutting down; leadership released");
                return Ok(());
            }
            Err(Ok(reason)) => {
                tracing::warn!(slot = %slot, member = %group.member, reason = %reason, "stepping down");
            }
            Err(Err(e)) => return Err(e),
        }
    }
}

/// A held leadership lock: the store session that holds it.
struct Lock {
    client: Client,
    term: i64,
}

impl Lock {
    /// Waits for the source's lock and takes the next term; `None` when cancelled first.
    async fn acquire(
        store: &SourceConfig,
        slot: &str,
        group: &GroupConfig,
        cancel: &CancellationToken,
    ) -> Result<Option<Lock>, StoreError> {
        let timeout = group.takeover_timeout.max(Duration::from_secs(2));
        let retries = (timeout.as_secs() as u32).saturating_sub(1).max(1);
        let second = Duration::from_secs(1);
        let client = store
            .with_keepalives(second, second, retries)
            .connect_sql()
            .await?;
        crate::log::migrate(&client).await?;
        // Named so that anyone can list the group's members: the sessions holding or
        // waiting for the lock ([`members`]).
        let name = format!("{MEMBER_APPLICATION_PREFIX}{}", group.member);
        if let Err(e) = client
            .execute("SELECT set_config('application_name', $1, false)", &[&name])
            .await
        {
            tracing::debug!(error = %crate::pg::error::pg_error_text(&e), "cannot name the leadership session");
        }
        // The server's side of the same bound: it notices a vanished member by its
        // keepalives, and a silent one (paused) by the idle timeout.
        client
            .batch_execute(&format!(
                "SET tcp_keepalives_idle = 1; SET tcp_keepalives_interval = 1;
                 SET tcp_keepalives_count = {retries};"
            ))
            .await
            .map_err(StoreError::sql("set the leadership session's keepalives"))?;
        let idle_ms = group
            .takeover_timeout
            .as_millis()
            .clamp(1, i32::MAX as u128);
        if let Err(e) = client
            .execute(
                "SELECT set_config('idle_session_timeout', $1, false)",
                &[&idle_ms.to_string()],
            )
            .await
        {
            tracing::warn!(error = %crate::pg::error::pg_error_text(&e), "the store cannot end silent sessions (idle_session_timeout needs PostgreSQL 14): a paused leader keeps leadership until it resumes or its host is gone");
        }
        let (class, key) = lock_key(slot);
        tracing::info!(slot = %slot, member = %group.member, "waiting for leadership");
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&class, &key];
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            locked = client.execute("SELECT pg_advisory_lock($1, $2)", &params) => {
                locked.map_err(StoreError::sql("take the leadership lock"))?;
            }
        }
        // A former leader paused or cut off with a store transaction open would hold up
        // the progress row (and the rows it inserted) until Postgres ends it.
        let former = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1 AND datname = current_database()",
                &[&crate::log::postgres::appender_name(slot)],
            )
            .await;
        match former {
            Ok(rows) if !rows.is_empty() => {
                tracing::info!(slot = %slot, sessions = rows.len(), "ended the former leader's appending sessions");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(slot = %slot, error = %crate::pg::error::pg_error_text(&e), "cannot end the former leader's appending sessions; an open one holds up this takeover until Postgres ends it (idle_in_transaction_session_timeout)");
            }
        }
        let term: i64 = client
            .query_one(
                "INSERT INTO waltap.progress (source, commit_lsn, term, leader, leader_since)
                 VALUES ($1, 0, 1, $2, now())
                 ON CONFLICT (source) DO UPDATE
                 SET term = waltap.progress.term + 1, leader = excluded.leader, leader_since = now()
                 RETURNING term",
                &[&slot, &group.member],
            )
            .await
            .map_err(StoreError::sql("take the next leadership term"))?
            .get(0);
        Ok(Some(Lock { client, term }))
    }

    /// Heartbeats until leadership is lost; returns why.
    async fn watch(&self, slot: &str, timeout: Duration) -> String {
        let period = (timeout / 5).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(period).await;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
            let beat = self.client.query_opt(
                "SELECT term FROM waltap.progress WHERE source = $1",
                &params,
            );
            match tokio::time::timeout(timeout / 2, beat).await {
                Err(_) => {
                    return format!(
                        "the store did not answer the leadership heartbeat within {:?}",
                        timeout / 2
                    )
                }
                Ok(Err(e)) => {
                    return format!(
                        "the leadership session ended: {}",
                        crate::pg::error::pg_error_text(&e)
                    )
                }
                Ok(Ok(row)) => {
                    let current: Option<i64> = row.map(|r| r.get(0));
                    if current != Some(self.term) {
                        return format!(
                            "another member took over (term {})",
                            current.unwrap_or_default()
                        );
                    }
                }
            }
        }
    }
}

/// Ends the walsender that still holds `slot` (a former leader's, which may be paused or
/// cut off) and waits up to 5 s for the slot to be free, looking every 20 ms because a
/// takeover waits on it. Starting the replication retries anyway while the slot is
/// still in use.
pub async fn free_slot(source: &SourceConfig, slot: &str) -> Result<(), StoreError> {
    let client = source.connect_sql().await?;
    for _ in 0..250 {
        let active: Option<i32> = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(StoreError::sql("look up the slot's walsender"))?
            .and_then(|r| r.get(0));
        let Some(pid) = active else { return Ok(()) };
        tracing::info!(slot = %slot, pid, "ending the walsender that still holds the slot");
        if let Err(e) = client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
        {
            // Not allowed (another role): the replication start retries while the slot
            // is in use, until its holder lets go.
            tracing::warn!(slot = %slot, pid, error = %crate::pg::error::pg_error_text(&e), "cannot end the walsender holding the slot");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Who leads a source, as the store records it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderInfo {
    /// `host:pid` of the member that took the current term.
    pub member: Option<String>,
    /// The current term (from 1; a source no member has led has no `LeaderInfo`).
    pub term: i64,
    /// When it took the term (RFC 3339, UTC).
    pub since: Option<String>,
    /// Whether a member holds the leadership lock now (false: no member is running, or a
    /// takeover is under way).
    pub active: bool,
}

/// Reads who leads `slot` from the store; `None` when no member ever led it.
pub async fn current_leader(client: &Client, slot: &str) -> Result<Option<LeaderInfo>, StoreError> {
    let (class, key) = lock_key(slot);
    let row = client
        .query_opt(
            "SELECT p.term, p.leader,
                    to_char(p.leader_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    EXISTS (SELECT 1 FROM pg_locks l
                            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                              AND l.database = (SELECT oid FROM pg_database
                                                WHERE datname = current_database())
                              AND l.classid = $2::int4::oid AND l.objid = ($3::int4::int8 & 4294967295)::oid)
             FROM waltap.progress p WHERE p.source = $1 AND p.term > 0",
            &[&slot, &class, &key],
        )
        .await
        .map_err(StoreError::sql("read the source's leader"))?;
    Ok(row.map(|r| LeaderInfo {
        term: r.get(0),
        member: r.get(1),
        since: r.get(2),
        active: r.get(3),
    }))
}

/// A process of the group, as the store sees its leadership session.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    /// `host:pid` (cut to what `application_name` holds), or the session's client
    /// address for a member too old to name itself.
    pub member: String,
    /// Whether it holds the lock (leads) rather than waits for it.
    pub leader: bool,
    /// When its leadership session started (RFC 3339, UTC).
    pub since: Option<String>,
}

/// The members of `slot`'s group now: the store sessions holding or waiting for its
/// lock, the leader first. Seeing other roles' sessions needs `pg_read_all_stats`.
pub async fn members(client: &Client, slot: &str) -> Result<Vec<MemberInfo>, StoreError> {
    let (class, key) = lock_key(slot);
    let rows = client
        .query(
            "SELECT coalesce(substr(a.application_name, length($3) + 1), a.client_addr::text, 'pid ' || l.pid),
                    l.granted,
                    to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                  AND starts_with(a.application_name, $3)
             WHERE l.locktype = 'advisory' AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = $1::int4::oid AND l.objid = ($2::int4::int8 & 4294967295)::oid
             ORDER BY l.granted DESC, a.backend_start",
            &[&class, &key, &MEMBER_APPLICATION_PREFIX],
        )
        .await
        .map_err(StoreError::sql("read the group's members"))?;
    Ok(rows
        .iter()
        .map(|r| MemberInfo {
            member: r.get(0),
            leader: r.get(1),
            since: r.get(2),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable() {
        // Documented in the README: changing them splits a group during an upgrade.
        assert_eq!(lock_key(""), (LOCK_CLASS, 0x811c_9dc5_u32 as i32));
        assert_eq!(lock_key("waltap"), lock_key("waltap"));
        assert_ne!(lock_key("waltap"), lock_key("waltap2"));
        assert_eq!(LOCK_CLASS, 2_004_115_824);
    }
}
