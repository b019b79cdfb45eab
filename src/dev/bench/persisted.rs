//! The persisted-path contenders: `waltap run`'s appender in the benchmark process, filling
//! the Postgres event log or a JetStream stream, measured until the log holds every event
//! of the workload.

use std::future::Future;
use std::time::Duration;

use super::contender::{in_process, listener_config, Measurement, Slot, Tools, POLL};
use crate::log::append::AppenderConfig;

/// The appender fills `waltap.events` until it holds all `events` of this slot.
pub(super) async fn postgres_log(
    tools: &Tools,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    let config = AppenderConfig::new(listener_config(slot)?);
    let count = || async {
        // The log table exists once the appender has migrated.
        slot.observer_db
            .query_one(
                "SELECT count(*) FROM waltap.events WHERE source = $1",
                &[&slot.name],
            )
            .await
            .map_or(0, |row| row.get::<_, i64>(0) as u64)
    };
    in_process(
        tools,
        slot,
        events,
        timeout,
        append_until(config, events, count),
    )
    .await
}

/// The appender publishes to a JetStream stream on a `nats-server` of its own until the
/// stream holds all `events`. The server starts before the clock does.
pub(super) async fn jetstream(
    tools: &Tools,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    let dir = std::env::temp_dir().join(format!("waltap-bench-nats-{}", slot.name));
    let _ = std::fs::remove_dir_all(&dir);
    let server = crate::dev::nats::NatsServer::start(&dir).await?;
    let mut config = AppenderConfig::new(listener_config(slot)?);
    let js_config = crate::log::jetstream::JetStreamConfig::parse(&server.url())?;
    let stream = js_config.stream.clone();
    config.jetstream = Some(js_config);
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await?);
    let count = || async {
        // The stream exists once the appender has connected.
        match js.get_stream(&stream).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.last_sequence),
            Err(_) => 0,
        }
    };
    let measured = in_process(
        tools,
        slot,
        events,
        timeout,
        append_until(config, events, count),
    )
    .await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    measured
}

/// Runs the appender until `count` reports `events` (or the appender stops by itself),
/// then stops it and returns its outcome.
async fn append_until<F, Fut>(
    config: AppenderConfig,
    events: u64,
    mut count: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = u64>,
{
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(crate::log::append::run(config, cancel.clone()));
    while !task.is_finished() && count().await < events {
        tokio::time::sleep(POLL * 4).await;
    }
    cancel.cancel();
    task.await??;
    Ok(())
}
