//! Latency: paced single-row commits, and how long each takes to reach a contender's
//! consumer (`clock_timestamp()` in the row to the consumer seeing it). Every latency run
//! yields the same [`Latency`].

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio_postgres::Client;

use super::contender::{
    child_command, listener_config, program, recvlogical_args, stderr_of, tail_args, walsender_pid,
    Contender, Slot, Tools, DRAIN_TIMEOUT, POLL,
};
use super::measure::{find_timestamp, now_unix_micros, percentile};
use super::workload;
use crate::source::pipeline::Listener;
use crate::value::Value;

/// End-to-end latency of the rows `pacer` writes, as `c` delivers them.
pub async fn latency(
    tools: &Tools,
    c: Contender,
    slot: &Slot<'_>,
    pacer: &Pacer<'_>,
) -> anyhow::Result<Latency> {
    let args = match c {
        Contender::WaltapListener => return listener_latency(slot, pacer).await,
        Contender::WaltapFollower => return super::follower::latency(slot, pacer).await,
        Contender::WaltapTail => tail_args(slot, None),
        _ => recvlogical_args(c, slot, None),
    };
    child_latency(tools, c, program(tools, c)?, args, slot, pacer).await
}

/// Writes paced single-row commits, then waits for the consumer to have seen them all.
pub struct Pacer<'a> {
    pub writer: &'a Client,
    pub rate: u32,
    pub duration: Duration,
}

impl Pacer<'_> {
    pub(super) async fn run(&self, arrivals: &Arrivals) -> anyhow::Result<workload::Paced> {
        let paced = workload::write_paced(self.writer, self.rate, self.duration).await?;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while arrivals.count() < paced.rows {
            if Instant::now() > deadline {
                bail!(
                    "{} of {} rows arrived within {DRAIN_TIMEOUT:?}",
                    arrivals.count(),
                    paced.rows
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(paced)
    }
}

/// Latencies in ms, recorded by the consumer as rows arrive.
#[derive(Default)]
pub(super) struct Arrivals(Mutex<Vec<f64>>);

impl Arrivals {
    pub(super) fn record(&self, inserted_at_unix_us: i64) {
        let ms = (now_unix_micros() - inserted_at_unix_us) as f64 / 1000.0;
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
    }

    fn count(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn into_sorted(self) -> Vec<f64> {
        let mut v = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        v.sort_by(f64::total_cmp);
        v
    }
}

/// End-to-end latency of one contender: commit (`clock_timestamp()` in the row) to the
/// consumer seeing the row.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub contender: Contender,
    pub commits: u64,
    pub commits_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Latency {
    pub(super) fn new(contender: Contender, paced: workload::Paced, arrivals: Arrivals) -> Latency {
        let sorted = arrivals.into_sorted();
        Latency {
            contender,
            commits: paced.rows,
            commits_per_sec: paced.rows as f64 / paced.secs,
            p50_ms: percentile(&sorted, 50.0),
            p90_ms: percentile(&sorted, 90.0),
            p99_ms: percentile(&sorted, 99.0),
            max_ms: sorted.last().copied(),
        }
    }
}

async fn child_latency(
    tools: &Tools,
    c: Contender,
    program: &Path,
    args: Vec<String>,
    slot: &Slot<'_>,
    pacer: &Pacer<'_>,
) -> anyhow::Result<Latency> {
    let mut cmd = child_command(tools, program, &args, slot);
    cmd.stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let arrivals = Arrivals::default();
    let paced = tokio::select! {
        paced = async {
            wait_streaming(&mut child, slot).await?;
            pacer.run(&arrivals).await
        } => paced?,
        read = read_arrivals(stdout, &arrivals) => bail!(
            "{} stopped early ({read:?}): {}", program.display(), stderr_of(tools, slot)
        ),
    };
    child.kill().await?;
    Ok(Latency::new(c, paced, arrivals))
}

/// Until its walsender is attached, so that no row waits for the connection.
async fn wait_streaming(child: &mut Child, slot: &Slot<'_>) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while walsender_pid(slot.observer, &slot.name).await?.is_none() {
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before streaming");
        }
        if Instant::now() > deadline {
            bail!("not streaming after {DRAIN_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Each output line with a timestamp in it is a row: binary pgoutput messages too, since
/// a timestamp's text holds no newline.
async fn read_arrivals(stdout: ChildStdout, arrivals: &Arrivals) -> std::io::Result<()> {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if let Some(at) = find_timestamp(&line) {
            arrivals.record(at);
        }
    }
}

async fn listener_latency(slot: &Slot<'_>, pacer: &Pacer<'_>) -> anyhow::Result<Latency> {
    let mut listener = Listener::start(listener_config(slot)?).await?;
    let arrivals = Arrivals::default();
    let paced = tokio::select! {
        paced = pacer.run(&arrivals) => paced,
        consumed = consume_arrivals(&mut listener, &arrivals) => Err(anyhow!("the listener stopped: {consumed:?}")),
    };
    listener.shutdown().await;
    Ok(Latency::new(Contender::WaltapListener, paced?, arrivals))
}

async fn consume_arrivals(listener: &mut Listener, arrivals: &Arrivals) -> anyhow::Result<()> {
    while let Some(event) = listener.next().await {
        let event = event?;
        if let Some(Value::Timestamptz(at)) = event.after().and_then(|row| row.get("at")) {
            if let Some(at) = find_timestamp(at.as_bytes()) {
                arrivals.record(at);
            }
        }
        listener.ack(event.position);
    }
    Ok(())
}
