//! What an operator watches: counters kept in atomics, the rest read from Postgres when
//! scraped, rendered in the Prometheus text format by hand (a handful of series does not
//! need a metrics crate).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::pg::PoolStatus;

/// Counters and gauges updated on the hot path (relaxed atomics: each is independent).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events appended to the log by the pipeline (shared with the appender).
    pub events_in: Arc<AtomicU64>,
    /// Change events written to clients, all delivery modes.
    pub events_out: AtomicU64,
    /// Open delivery connections (SSE, WebSocket, pending long polls).
    pub subscribers: AtomicI64,
    /// Error responses and error items sent.
    pub errors: AtomicU64,
    /// This process's role in its group (shared with the group member task).
    pub membership: Arc<crate::log::leader::Membership>,
    /// Open subscriptions by table, and the counters' recent history (the console).
    pub console: super::console::Live,
}

/// One open delivery connection, counted while it lives.
pub struct SubscriberGauge(Arc<Metrics>);

impl SubscriberGauge {
    pub fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.subscribers.fetch_add(1, Ordering::Relaxed);
        SubscriberGauge(metrics.clone())
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open subscription to a table, counted by table while it lives (and as a
/// subscriber).
pub struct TableGauge {
    _all: SubscriberGauge,
    metrics: Arc<Metrics>,
    table: String,
}

impl TableGauge {
    pub fn new(metrics: &Arc<Metrics>, table: String) -> Self {
        metrics.console.table_opened(&table);
        TableGauge {
            _all: SubscriberGauge::new(metrics),
            metrics: metrics.clone(),
            table,
        }
    }
}

impl Drop for TableGauge {
    fn drop(&mut self) {
        self.metrics.console.table_closed(&self.table);
    }
}

/// What the scrape reads from Postgres; `None` when it could not be read.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replication {
    pub connected: bool,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub log_bytes: Option<i64>,
}

impl Metrics {
    pub fn render(&self, replication: &Replication, pool: PoolStatus) -> String {
        let mut out = String::with_capacity(1024);
        let mut series = |name: &str, kind: &str, help: &str, value: Option<String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if let Some(v) = value {
                let _ = writeln!(out, "{name} {v}");
            }
        };
        let n = |a: &AtomicU64| Some(a.load(Ordering::Relaxed).to_string());
        series(
            "waltap_replication_connected",
            "gauge",
            "1 while the pipeline's replication slot is streaming",
            Some(u8::from(replication.connected).to_string()),
        );
        series(
            "waltap_replication_lag_bytes",
            "gauge",
            "WAL bytes between the server's current position and the slot's confirmed position",
            replication.lag_bytes.map(|v| v.to_string()),
        );
        series(
            "waltap_replication_lag_seconds",
            "gauge",
            "0 when caught up, else seconds since the newest logged event was committed",
            replication.lag_seconds.map(|v| format!("{v:.3}")),
        );
        series(
            "waltap_log_bytes",
            "gauge",
            "size of the event log table on disk",
            replication.log_bytes.map(|v| v.to_string()),
        );
        series(
            "waltap_events_in_total",
            "counter",
            "events appended to the event log",
            n(&self.events_in),
        );
        series(
            "waltap_events_out_total",
            "counter",
            "change events delivered to clients",
            n(&self.events_out),
        );
        series(
            "waltap_subscribers",
            "gauge",
            "open delivery connections",
            Some(self.subscribers.load(Ordering::Relaxed).to_string()),
        );
        series(
            "waltap_errors_total",
            "counter",
            "error responses and error items sent",
            n(&self.errors),
        );
        for (name, help, value) in [
            ("waltap_store_pool_max", "connections the log's pool may open", pool.max_size),
            ("waltap_store_pool_open", "connections the log's pool holds open", pool.size),
            ("waltap_store_pool_idle", "open pool connections not in use", pool.available),
            (
                "waltap_store_pool_waiting",
                "statements waiting for a pool connection (persistently above 0: raise --store-pool-size)",
                pool.waiting,
            ),
        ] {
            series(name, "gauge", help, Some(value.to_string()));
        }
        let group = &self.membership;
        series(
            "waltap_leader",
            "gauge",
            "1 while this process leads its group (reads the slot and appends), else 0",
            Some(u8::from(group.is_leader()).to_string()),
        );
        series(
            "waltap_leader_term",
            "gauge",
            "the leadership term this process holds or last held (0: never led)",
            Some(group.term().to_string()),
        );
        series(
            "waltap_takeovers_total",
            "counter",
            "times this process became the leader of its group",
            Some(group.takeovers().to_string()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn renders_every_series_once() {
        let m = Metrics::default();
        m.events_out.fetch_add(3, Ordering::Relaxed);
        let text = m.render(
            &Replication {
                connected: true,
                lag_bytes: Some(10),
                lag_seconds: None,
                log_bytes: Some(8192),
            },
            PoolStatus {
                max_size: 16,
                size: 3,
                available: 1,
                waiting: 0,
            },
        );
        assert!(text.contains("\nwaltap_store_pool_open 3\n"), "{text}");
        assert!(text.contains("\nwaltap_events_out_total 3\n"), "{text}");
        assert!(text.contains("\nwaltap_replication_lag_bytes 10\n"));
        assert!(!text.contains("\nwaltap_replication_lag_seconds "));
        assert_eq!(text.matches("# TYPE").count(), 15);
    }
}
