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
    let counter = LogCounter::new(slot.observer_db, &slot.name);
    in_process(
        tools,
        slot,
        events,
        timeout,
        append_until(config, events, || counter.count()),
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
    let counter = JetStreamCounter::connect(&server.url(), stream).await?;
    let count = || counter.count();
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

/// The appender fills the log first (not measured); then one consumer of a named stream on
/// the workload's tables reads all `events` from the log's start, acknowledging the last
/// event of each page it is handed, as an HTTP feed client would. Wall time and client CPU
/// are the read's alone; the walsender is not involved.
pub(super) async fn stream_reader(
    tools: &Tools,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    use futures::StreamExt;

    use crate::log::streams::{self, OpenOptions, StreamDef, StreamItem};

    let config = AppenderConfig::new(listener_config(slot)?);
    let store = config.store.clone();
    let counter = LogCounter::new(slot.observer_db, &slot.name);
    tokio::time::timeout(timeout, append_until(config, events, || counter.count()))
        .await
        .map_err(|_| anyhow::anyhow!("the log did not fill within {timeout:?}"))??;
    let tables: Vec<String> = slot
        .observer_db
        .query(
            "SELECT DISTINCT format('%I.%I', schema_name, table_name) FROM waltap.events
             WHERE source = $1",
            &[&slot.name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let name = format!("bench-{}", slot.name);
    let def = StreamDef {
        name: name.clone(),
        source: slot.name.clone(),
        tables,
        filter: None,
        initial_state: false,
        // Before every event: the whole log.
        from: Some(crate::event::Position::new(crate::lsn::Lsn::ZERO, 0)),
    };
    let client = store.connect_sql().await?;
    streams::create(&crate::log::EventLog::Postgres, &client, &client, &def).await?;

    let cpu_before = super::measure::cpu_ticks(super::measure::Proc::This);
    let start = std::time::Instant::now();
    let read = async {
        let mut consumer = streams::open(&store, &name, OpenOptions::default()).await?;
        let mut seen = 0u64;
        let mut since_ack = 0usize;
        while seen < events {
            match consumer.next().await {
                Some(Ok(StreamItem::Event(ev))) => {
                    seen += 1;
                    since_ack += 1;
                    if since_ack == streams::DEFAULT_PAGE_SIZE || seen == events {
                        consumer.ack(ev.position).await?;
                        since_ack = 0;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the consumer ended after {seen} events"),
            }
        }
        consumer.close().await;
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow::anyhow!("{events} events not read within {timeout:?}"))??;
    let wall_secs = start.elapsed().as_secs_f64();
    let client_ticks = cpu_before.and_then(|b| {
        Some(super::measure::cpu_ticks(super::measure::Proc::This)?.saturating_sub(b))
    });
    streams::delete(&client, &name).await?;
    Ok(Measurement {
        events,
        wall_secs,
        client_cpu_secs: tools.cpu_secs(client_ticks),
        walsender_cpu_secs: None,
        peak_rss_kib: None,
        fanout: None,
    })
}

/// How many events a JetStream log holds: one message per event, so the stream's last
/// sequence.
pub struct JetStreamCounter {
    js: async_nats::jetstream::Context,
    stream: String,
}

impl JetStreamCounter {
    /// A counter of `stream` on the NATS server at `url`.
    pub async fn connect(url: &str, stream: String) -> anyhow::Result<Self> {
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        Ok(JetStreamCounter { js, stream })
    }

    /// The events published so far (0 until the appender has connected and made the
    /// stream).
    pub async fn count(&self) -> u64 {
        match self.js.get_stream(&self.stream).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.last_sequence),
            Err(_) => 0,
        }
    }
}

/// Counts the events of a slot in `waltap.events` while the appender fills it, reading
/// only what was appended since the last count: a `count(*)` over the whole log every
/// poll scanned up to 100,000 rows each time, and that scan competed for the two cores
/// with the appender it measured.
pub struct LogCounter<'a> {
    /// A connection to the log's database.
    log: &'a tokio_postgres::Client,
    /// The source (slot) whose events are counted.
    source: &'a str,
    /// Events at commit positions below `from`, counted before.
    below: std::cell::Cell<u64>,
    /// The highest commit position seen: its transaction may still be growing (a large
    /// one spans several of the log's commits), so it is counted again each time.
    from: std::cell::Cell<i64>,
}

impl<'a> LogCounter<'a> {
    /// A counter of `source`'s events in the log that `log` is connected to.
    pub fn new(log: &'a tokio_postgres::Client, source: &'a str) -> Self {
        LogCounter {
            log,
            source,
            below: std::cell::Cell::new(0),
            from: std::cell::Cell::new(0),
        }
    }

    /// The events logged so far (0 until the appender has migrated and made the table).
    pub async fn count(&self) -> u64 {
        let rows = self
            .log
            .query(
                "SELECT commit_lsn, count(*) FROM waltap.events
                 WHERE source = $1 AND commit_lsn >= $2
                 GROUP BY commit_lsn ORDER BY commit_lsn",
                &[&self.source, &self.from.get()],
            )
            .await
            .unwrap_or_default();
        let mut counts: Vec<(i64, u64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect();
        let Some((last_lsn, last)) = counts.pop() else {
            return self.below.get();
        };
        let settled: u64 = counts.iter().map(|(_, n)| n).sum();
        self.below.set(self.below.get() + settled);
        self.from.set(last_lsn);
        self.below.get() + last
    }
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
