//! The latency of a subscription served by a follower of a group: the leader's pipeline
//! appends to the event log, and the subscription's hub is fed from the log's tail (as in
//! every `waltap serve` member), so each row goes slot -> log commit -> notification ->
//! log read -> subscriber. Both halves run in this process; across processes the path is
//! the same (the store is the only link between members).

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::contender::{listener_config, Contender, Slot};
use super::latency::{Arrivals, Latency, Pacer};
use super::measure::find_timestamp;
use crate::hub::{Hub, HubConfig, SubscriptionItem};
use crate::log::append::AppenderConfig;
use crate::value::Value;

/// End-to-end latency of the rows `pacer` writes, seen by a log-fed subscription.
pub(super) async fn latency(slot: &Slot<'_>, pacer: &Pacer<'_>) -> anyhow::Result<Latency> {
    let listener = listener_config(slot)?;
    let appender = AppenderConfig::new(listener.clone());
    let mut hub_config = HubConfig::new(listener);
    hub_config.feed = Some(crate::log::tail::feed(
        appender.store.clone(),
        slot.name.clone(),
        appender.listener.source.clone(),
    ));
    let stop = CancellationToken::new();
    let pipeline = tokio::spawn(crate::log::append::run(appender, stop.clone()));
    let hub = Hub::start(hub_config).await?;
    let mut subscription = hub.subscribe(super::workload::LATENCY_TABLE, None).await?;
    let arrivals = Arrivals::default();
    let consume = async {
        while let Some(item) = subscription.next().await {
            let SubscriptionItem::Event(event) = item? else {
                continue;
            };
            if let Some(Value::Timestamptz(at)) = event.after().and_then(|row| row.get("at")) {
                if let Some(at) = find_timestamp(at.as_bytes()) {
                    arrivals.record(at);
                }
            }
        }
        anyhow::Ok(())
    };
    let paced = tokio::select! {
        paced = pacer.run(&arrivals) => paced,
        consumed = consume => Err(anyhow::anyhow!("the subscription ended: {consumed:?}")),
    };
    drop(subscription);
    hub.shutdown().await;
    stop.cancel();
    pipeline.await??;
    Ok(Latency::new(Contender::WaltapFollower, paced?, arrivals))
}
