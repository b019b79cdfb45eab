//! The fan-out contenders: a [`Hub`] started paused on the backlog, N subscribers, then
//! resumed. Two shapes of filter:
//!
//! - **key ranges**: `{"where": {"id": {"gte": a, "lt": b}}}`, N ranges splitting the key
//!   space, so every change reaches exactly one subscriber;
//! - **tenants**: `{"create": {"qty": k}}` for k = 0..N, the equality filter an
//!   application gives each of its users. `qty` holds 1,000 distinct values, so with
//!   N >= 1,000 every insert reaches one subscriber (and N - 1,000 stay idle); updates and
//!   deletes reach none. One more subscriber, `{"delete": {"id": {"gte": L}}}` on the last
//!   delete transaction, tells when the whole backlog has been read.
//!
//! Events/s and client CPU cover the catch-up only, from `resume` until the last event is
//! received: making N subscriptions (two catalog queries each) is set-up, timed apart, and
//! the memory it added is reported per subscriber.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::bail;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;

use super::contender::{listener_config, Slot};
use super::measure::{cpu_ticks, rss_kib, Proc};
use super::workload::{self, Shape};
use crate::filter::Filter;
use crate::hub::{Hub, HubConfig, SubscriptionItem};

/// Which filters the subscribers have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filters {
    KeyRanges,
    Tenants,
}

/// What the catch-up window of a fan-out run measured, beside the usual [`Measurement`]
/// (whose wall time and client CPU it replaces).
///
/// [`Measurement`]: super::Measurement
#[derive(Debug, Clone, Default, Serialize)]
pub struct FanoutWindow {
    pub subscribers: u64,
    /// Events the subscribers received, together.
    pub delivered: u64,
    pub setup_secs: f64,
    /// Resident memory added by making the subscriptions (each with its drain task), per
    /// subscriber: a lower bound, since the process reuses memory earlier runs freed.
    pub kib_per_idle_subscriber: Option<f64>,
    #[serde(skip)]
    pub(super) wall_secs: f64,
    #[serde(skip)]
    pub(super) cpu_ticks: Option<u64>,
}

/// Counts received events and wakes the run when the end condition is met.
struct Progress {
    delivered: AtomicU64,
    /// Events the sentinel (or, for key ranges, everyone) still waits for.
    remaining: AtomicU64,
    done: Notify,
}

impl Progress {
    fn received(&self, counts_for_end: bool) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if counts_for_end && self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }
}

/// One fan-out catch-up of `events` changes to `n` subscribers; the window is written to
/// `window` for the caller to fold into its measurement.
pub(super) async fn run(
    slot: &Slot<'_>,
    events: u64,
    n: u64,
    filters: Filters,
    window: &Mutex<FanoutWindow>,
) -> anyhow::Result<()> {
    let mut config = HubConfig::new(listener_config(slot)?);
    config.subscriber_queue = 100_000;
    // The backlog is already in the slot: it must wait for every subscriber.
    config.start_paused = true;
    let hub = Hub::start(config).await?;
    let shape = Shape::new(events);
    let (sentinel, remaining) = match filters {
        Filters::KeyRanges => (None, events),
        Filters::Tenants => {
            let (first, count) = last_delete_batch(shape)?;
            (Some(json!({"delete": {"id": {"gte": first}}})), count)
        }
    };
    let progress = Arc::new(Progress {
        delivered: AtomicU64::new(0),
        remaining: AtomicU64::new(remaining),
        done: Notify::new(),
    });
    let span = (shape.inserts / n).max(1) + 1;
    let rss_before = rss_kib(Proc::This);
    let setup = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let filter = match filters {
            Filters::KeyRanges => json!({"where": {"id": {"gte": i * span, "lt": (i + 1) * span}}}),
            Filters::Tenants => json!({"create": {"qty": i}}),
        };
        tasks.push(subscribe(&hub, filter, filters == Filters::KeyRanges, &progress).await?);
    }
    if let Some(filter) = sentinel {
        tasks.push(subscribe(&hub, filter, true, &progress).await?);
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    let rss_after = rss_kib(Proc::This);
    let cpu_before = cpu_ticks(Proc::This);
    let start = Instant::now();
    hub.resume().await?;
    while progress.remaining.load(Ordering::Acquire) > 0 {
        progress.done.notified().await;
    }
    let wall_secs = start.elapsed().as_secs_f64();
    let cpu = cpu_before.and_then(|b| Some(cpu_ticks(Proc::This)?.saturating_sub(b)));
    hub.shutdown().await;
    for t in tasks {
        let _ = t.await;
    }
    *window.lock().unwrap_or_else(|e| e.into_inner()) = FanoutWindow {
        subscribers: n,
        delivered: progress.delivered.load(Ordering::Relaxed),
        setup_secs,
        kib_per_idle_subscriber: rss_before
            .zip(rss_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / n as f64),
        wall_secs,
        cpu_ticks: cpu,
    };
    Ok(())
}

/// The first id and the number of rows of the workload's last delete transaction.
fn last_delete_batch(shape: Shape) -> anyhow::Result<(u64, u64)> {
    if shape.deletes == 0 {
        bail!("the tenant fan-out needs a workload with deletes (more changes)");
    }
    let first_deleted = shape.inserts - shape.deletes + 1;
    let per = workload::DELETES_PER_TX;
    let first = first_deleted + (shape.deletes - 1) / per * per;
    Ok((first, shape.inserts - first + 1))
}

/// A subscription drained by its own task, as an application would hold it.
async fn subscribe(
    hub: &Hub,
    filter: serde_json::Value,
    counts_for_end: bool,
    progress: &Arc<Progress>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let filter: Filter = serde_json::from_value(filter)?;
    let mut sub = hub.subscribe(workload::TABLE, Some(filter)).await?;
    let progress = progress.clone();
    Ok(tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            if let Ok(SubscriptionItem::Event(_)) = item {
                progress.received(counts_for_end);
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_delete_batch_ends_the_workload() {
        // 50,000 inserts, 20,000 deletes of ids 30,001..=50,000 in 100-row transactions.
        assert_eq!(
            last_delete_batch(Shape::new(100_000)).ok(),
            Some((49_901, 100))
        );
        // 1,000 inserts, 400 deletes of ids 601..=1,000.
        assert_eq!(last_delete_batch(Shape::new(2000)).ok(), Some((901, 100)));
        // 875 inserts, 350 deletes of ids 526..=875: the last transaction deletes 50.
        assert_eq!(
            last_delete_batch(Shape::new(1750)).map(|b| b.1).ok(),
            Some(50)
        );
    }
}
