//! The operator's console: a page at `/` and the JSON it polls, `GET /v1/console`.
//!
//! The page (`console/index.html`, `style.css`, `app.js`) is compiled into the binary and
//! served as one document: no build step, nothing fetched from elsewhere. It holds no
//! data, so it is served without a key; it asks for one, keeps it in the tab's
//! `sessionStorage`, and sends it as `Authorization: Bearer` with every poll.
//!
//! `/v1/console` is read at request time from Postgres and the process's counters, best
//! effort: a part that cannot be read (the database restarting) is `null` and named in
//! `unavailable`, so the page stays up and shows what it can. The one thing kept between
//! requests is the rate history ([`Live`]): the counters sampled when the console is
//! polled, at most once a second, for the last [`HISTORY`]; it starts empty with the
//! process, which the page recognises by `server.startedAt`. The streams' figures cost a
//! count of each backlog (up to [`BACKLOG_LIMIT`]), so they are read at most once every
//! [`STREAMS_TTL`], however many consoles are open.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use sha2::Digest as _;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::auth::Caller;
use super::error::ApiError;
use super::{health, AppState, Shared};
use crate::event::TableName;
use crate::log::leader::{LeaderInfo, MemberInfo};
use crate::log::streams::{self, StreamInfo};
use crate::log::StoreError;
use std::sync::atomic::Ordering;

/// How much rate history the console keeps.
pub const HISTORY: Duration = Duration::from_secs(300);

/// How long the streams' figures are reused: reading them counts each backlog.
pub const STREAMS_TTL: Duration = Duration::from_secs(5);

/// Each stream's backlog is counted up to this many events (shown as `1,000+` beyond; the age of the oldest pending event says more).
pub const BACKLOG_LIMIT: i64 = 1_000;

const PAGE: &str = include_str!("console/index.html");
const STYLE: &str = include_str!("console/style.css");
const SCRIPT: &str = include_str!("console/app.js");

/// The page with its style and script inlined, and a policy that allows exactly those
/// (their hashes), requests to this origin only, and no framing (a page a key is typed
/// into must not be framed by another site).
static DOCUMENT: LazyLock<(String, String)> = LazyLock::new(|| {
    let hash = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
    };
    let page = PAGE
        .replace("/*STYLE*/", STYLE)
        .replace("/*SCRIPT*/", SCRIPT);
    let policy = format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; connect-src 'self'; \
         img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        hash(STYLE),
        hash(SCRIPT)
    );
    (page, policy)
});

/// What the console needs between requests, kept with the metrics.
#[derive(Debug)]
pub struct Live {
    tables: Mutex<BTreeMap<String, i64>>,
    samples: Mutex<VecDeque<Sample>>,
    started: SystemTime,
    streams: StreamsCache,
}

/// The streams' figures and when they were read.
type StreamsCache = tokio::sync::Mutex<Option<(Instant, Arc<Vec<StreamPart>>)>>;

impl Default for Live {
    fn default() -> Self {
        Live {
            tables: Mutex::default(),
            samples: Mutex::default(),
            started: SystemTime::now(),
            streams: StreamsCache::default(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    events_in: u64,
    events_out: u64,
}

/// Events per second between two samples, at the later one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// Events appended to the log per second.
    pub events_in: f64,
    /// Change events delivered to clients per second.
    pub events_out: f64,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Live {
    pub(super) fn table_opened(&self, table: &str) {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        *tables.entry(table.to_owned()).or_default() += 1;
    }

    pub(super) fn table_closed(&self, table: &str) {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = tables.get_mut(table) {
            *n -= 1;
            if *n <= 0 {
                tables.remove(table);
            }
        }
    }

    fn tables(&self) -> BTreeMap<String, i64> {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the counters at `now` (unless the last sample is under a second old) and
    /// returns the rates of the last [`HISTORY`].
    fn sample(&self, now: f64, events_in: u64, events_out: u64) -> Vec<Rate> {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.back().is_none_or(|last| now - last.at >= 1.0) {
            samples.push_back(Sample {
                at: now,
                events_in,
                events_out,
            });
        }
        // One sample older than the window stays: the first rate in it needs a start.
        while samples.len() > 2 && samples[1].at < now - HISTORY.as_secs_f64() {
            samples.pop_front();
        }
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let dt = (b.at - a.at).max(1e-3);
                Rate {
                    at: b.at,
                    events_in: b.events_in.saturating_sub(a.events_in) as f64 / dt,
                    events_out: b.events_out.saturating_sub(a.events_out) as f64 / dt,
                }
            })
            .collect()
    }
}

/// `GET /`: the console page.
pub(super) async fn page() -> Response {
    let (page, policy) = &*DOCUMENT;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, policy.as_str()),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page.as_str(),
    )
        .into_response()
}

/// The console's JSON: everything the page shows.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Console {
    server: ServerPart,
    slot: Option<SlotPart>,
    log: LogPart,
    totals: Totals,
    rates: Vec<Rate>,
    /// `None` when the key may not see streams.
    streams: Option<Vec<StreamPart>>,
    subscribers: Vec<TableSubscribers>,
    group: GroupPart,
    /// The parts that could not be read now (the database restarting, ...).
    unavailable: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServerPart {
    member: String,
    role: &'static str,
    term: i64,
    /// When this process started (seconds since the Unix epoch): a new value means the
    /// server restarted and its counters began again.
    started_at: f64,
    now: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SlotPart {
    name: String,
    /// The pipeline streams from it now.
    connected: bool,
    wal_status: Option<String>,
    confirmed_position: Option<String>,
    restart_lsn: Option<String>,
    lag_bytes: Option<i64>,
    lag_seconds: Option<f64>,
    retained_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LogPart {
    bytes: Option<i64>,
    retention_age_seconds: Option<f64>,
    retention_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Totals {
    events_in: u64,
    events_out: u64,
    subscribers: i64,
    errors: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct StreamPart {
    #[serde(flatten)]
    info: StreamInfo,
    /// When the cursor last moved (RFC 3339, UTC); `None`: never since it was made.
    acked_at: Option<String>,
    /// Age of the oldest event after the cursor, of any table: retention deletes by age,
    /// and deleting any event after the cursor makes it stale.
    oldest_pending_seconds: Option<f64>,
    /// `ok`, `watch` (half the retention age used), `danger` (90 %), `stale` (events it
    /// had not acknowledged were deleted: it needs a reset) or `unbounded` (no retention).
    risk: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TableSubscribers {
    table: String,
    subscriptions: i64,
    /// Streams of this source that read the table, and of those the ones a consumer
    /// holds now.
    streams: usize,
    streams_held: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupPart {
    leader: Option<LeaderInfo>,
    members: Option<Vec<MemberInfo>>,
}

/// `GET /v1/console`.
pub(super) async fn status(
    State(state): State<Shared>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_key()?;
    let mut unavailable = Vec::new();
    let metrics = &state.metrics;
    let now = unix(SystemTime::now());
    let totals = Totals {
        events_in: metrics.events_in.load(Ordering::Relaxed),
        events_out: metrics.events_out.load(Ordering::Relaxed),
        subscribers: metrics.subscribers.load(Ordering::Relaxed),
        errors: metrics.errors.load(Ordering::Relaxed),
    };
    let rates = metrics
        .console
        .sample(now, totals.events_in, totals.events_out);
    let replication = health::replication(&state).await;
    let slot = match state.catalog_db().get().await {
        Ok(client) => crate::source::setup::slot_state(&client, &state.slot)
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    if slot.is_none() {
        unavailable.push("slot");
    }
    let slot = slot.map(|s| SlotPart {
        name: s.name,
        connected: replication.connected,
        wal_status: s.wal_status,
        confirmed_position: s.confirmed_flush_lsn,
        restart_lsn: s.restart_lsn,
        lag_bytes: s.lag_bytes,
        lag_seconds: replication.lag_seconds,
        retained_bytes: s.retained_bytes,
    });
    let store = state.store.get().await.ok();
    let (leader, members) = match &store {
        Some(client) => (
            crate::log::leader::current_leader(client, &state.slot)
                .await
                .ok()
                .flatten(),
            crate::log::leader::members(client, &state.slot).await.ok(),
        ),
        None => (None, None),
    };
    if members.is_none() {
        unavailable.push("group");
    }
    let visible = match caller.check_streams() {
        Ok(()) => match streams_cached(&state).await {
            Ok(all) => Some(
                all.iter()
                    .filter(|s| streams_readable(&caller, &s.info))
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
            Err(e) => {
                tracing::debug!(error = %crate::error::report(&e), "console: cannot read the streams");
                unavailable.push("streams");
                None
            }
        },
        Err(_) => None,
    };
    let subscribers = table_subscribers(&state, &caller, visible.as_deref());
    let membership = &metrics.membership;
    let body = Console {
        server: ServerPart {
            member: crate::log::leader::member_name(),
            role: membership.role(),
            term: membership.term(),
            started_at: unix(metrics.console.started),
            now,
        },
        slot,
        log: LogPart {
            bytes: replication.log_bytes,
            retention_age_seconds: state
                .retention
                .and_then(|r| r.max_age)
                .map(|d| d.as_secs_f64()),
            retention_bytes: state.retention.and_then(|r| r.max_bytes),
        },
        totals,
        rates,
        streams: visible,
        subscribers,
        group: GroupPart { leader, members },
        unavailable,
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

fn streams_readable(caller: &Caller, info: &StreamInfo) -> bool {
    info.tables
        .iter()
        .all(|t| caller.key.tables.allows(&TableName::parse(t)))
}

/// The source's streams as [`stream_parts`] read them, at most [`STREAMS_TTL`] ago: one
/// reading at a time, shared by every viewer, so that open consoles do not add up.
async fn streams_cached(state: &AppState) -> Result<Arc<Vec<StreamPart>>, StoreError> {
    let mut cache = state.metrics.console.streams.lock().await;
    if let Some((at, parts)) = &*cache {
        if at.elapsed() < STREAMS_TTL {
            return Ok(parts.clone());
        }
    }
    let client = state.store.get().await?;
    let parts = Arc::new(stream_parts(state, &client).await?);
    *cache = Some((Instant::now(), parts.clone()));
    Ok(parts)
}

/// The source's streams with what the console adds: last acknowledgement and risk.
async fn stream_parts(
    state: &AppState,
    client: &tokio_postgres::Client,
) -> Result<Vec<StreamPart>, StoreError> {
    let infos = streams::list_counting(
        state.consumer_pool.log(),
        client,
        Some(&state.slot),
        BACKLOG_LIMIT,
    )
    .await?;
    let rows = client
        .query(
            "SELECT s.name,
                    to_char(s.acked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    (SELECT extract(epoch FROM now() - e.appended_at)::float8
                     FROM waltap.events e
                     WHERE e.source = s.source
                       AND (e.commit_lsn, e.ordinal) > (s.cursor_lsn, s.cursor_ordinal)
                     ORDER BY e.commit_lsn, e.ordinal LIMIT 1),
                    coalesce((p.pruned_lsn, p.pruned_ordinal) > (s.cursor_lsn, s.cursor_ordinal), false)
             FROM waltap.streams s LEFT JOIN waltap.progress p ON p.source = s.source
             WHERE s.source = $1",
            &[&state.slot],
        )
        .await
        .map_err(StoreError::sql("read the streams' acknowledgements"))?;
    let mut extra: BTreeMap<String, (Option<String>, Option<f64>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let max_age = state.retention.and_then(|r| r.max_age);
    Ok(infos
        .into_iter()
        .map(|info| {
            let (acked_at, oldest, stale) = extra.remove(&info.name).unwrap_or_default();
            StreamPart {
                risk: risk(stale, oldest, max_age, state.retention.is_some()),
                info,
                acked_at,
                oldest_pending_seconds: oldest,
            }
        })
        .collect())
}

/// How close a stream is to losing events to retention.
fn risk(
    stale: bool,
    oldest_pending: Option<f64>,
    max_age: Option<Duration>,
    any_retention: bool,
) -> &'static str {
    if stale {
        return "stale";
    }
    if !any_retention {
        return "unbounded";
    }
    match (oldest_pending, max_age) {
        (Some(age), Some(max)) if age >= 0.9 * max.as_secs_f64() => "danger",
        (Some(age), Some(max)) if age >= 0.5 * max.as_secs_f64() => "watch",
        _ => "ok",
    }
}

/// Subscriptions open here by table, and the streams reading each table: the tables the
/// caller may read only.
fn table_subscribers(
    state: &AppState,
    caller: &Caller,
    streams: Option<&[StreamPart]>,
) -> Vec<TableSubscribers> {
    fn entry<'a>(
        by_table: &'a mut BTreeMap<String, TableSubscribers>,
        table: &str,
    ) -> &'a mut TableSubscribers {
        by_table
            .entry(table.to_owned())
            .or_insert_with(|| TableSubscribers {
                table: table.to_owned(),
                subscriptions: 0,
                streams: 0,
                streams_held: 0,
            })
    }
    let mut by_table = BTreeMap::new();
    for (table, n) in state.metrics.console.tables() {
        entry(&mut by_table, &table).subscriptions += n;
    }
    for s in streams.unwrap_or_default() {
        for table in &s.info.tables {
            let t = entry(&mut by_table, table);
            t.streams += 1;
            t.streams_held += usize::from(s.info.lease.is_some());
        }
    }
    by_table
        .into_values()
        .filter(|t| caller.key.tables.allows(&TableName::parse(&t.table)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rates_come_from_counter_deltas_over_the_window() {
        let live = Live::default();
        assert!(live.sample(1000.0, 0, 0).is_empty());
        // Under a second later: not sampled again.
        assert!(live.sample(1000.5, 5, 0).is_empty());
        let rates = live.sample(1002.0, 10, 4);
        assert_eq!(
            rates,
            vec![Rate {
                at: 1002.0,
                events_in: 5.0,
                events_out: 2.0
            }]
        );
        // Long after: the old samples fall out but for the one that starts the window.
        let rates = live.sample(2000.0, 20, 4);
        assert_eq!(rates.len(), 1);
        assert!((rates[0].events_in - 10.0 / 998.0).abs() < 1e-9);
    }

    #[test]
    fn table_counts_vanish_at_zero() {
        let live = Live::default();
        live.table_opened("public.a");
        live.table_opened("public.a");
        live.table_closed("public.a");
        assert_eq!(live.tables().get("public.a"), Some(&1));
        live.table_closed("public.a");
        assert!(live.tables().is_empty());
    }

    #[test]
    fn risk_levels() {
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(risk(true, None, None, false), "stale");
        assert_eq!(risk(false, Some(1e9), None, false), "unbounded");
        assert_eq!(risk(false, None, day, true), "ok");
        assert_eq!(risk(false, Some(50_000.0), day, true), "watch");
        assert_eq!(risk(false, Some(80_000.0), day, true), "danger");
        assert_eq!(risk(false, Some(1e9), None, true), "ok");
    }

    #[test]
    fn the_page_inlines_its_parts_and_allows_only_them() {
        let (page, policy) = &*DOCUMENT;
        assert!(!page.contains("/*STYLE*/") && !page.contains("/*SCRIPT*/"));
        assert!(page.contains(STYLE) && page.contains(SCRIPT));
        assert!(policy.contains("frame-ancestors 'none'"));
        // Nothing is loaded from elsewhere.
        assert!(!page.contains(" src=") && !page.contains("<link"));
    }
}
