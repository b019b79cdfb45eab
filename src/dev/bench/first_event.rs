//! Time to the first event: from spawning a child contender on a slot with a backlog to
//! the first byte it writes to stdout.
//!
//! Every child contender prints as soon as it has something: `waltap tail` its first JSON
//! line, `pg_recvlogical` the first message it received, the psycopg2 script a line at its
//! first decoded row change. So the figure covers process start, connecting, starting
//! replication and the server decoding the backlog's first transaction (which it sends
//! only once decoded whole), whatever the client.

use std::process::Stdio;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::contender::{
    child_command, program, psycopg2_args, recvlogical_args, stderr_of, tail_args, Contender, Slot,
    Tools, DRAIN_TIMEOUT,
};
use super::measure::Spread;

/// Row changes in the backlog each run starts on: enough that its first transaction
/// (1,000 inserted rows) is not the last.
pub const BACKLOG: u64 = 10_000;

/// Milliseconds from spawning `c` on `slot` to its first output.
pub async fn first_event(tools: &Tools, c: Contender, slot: &Slot<'_>) -> anyhow::Result<f64> {
    let args = match c {
        Contender::WaltapTail => tail_args(slot, None),
        Contender::Psycopg2 => psycopg2_args(tools, slot, u64::MAX)?,
        _ => recvlogical_args(c, slot, None),
    };
    let program = program(tools, c)?;
    let mut cmd = child_command(tools, program, &args, slot);
    cmd.stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(DRAIN_TIMEOUT, stdout.read(&mut first)).await;
    let elapsed = start.elapsed();
    child.kill().await?;
    match read {
        Ok(Ok(1)) => Ok(elapsed.as_secs_f64() * 1000.0),
        Ok(Ok(_)) => bail!(
            "{} exited before its first event: {}",
            program.display(),
            stderr_of(tools, slot)
        ),
        Ok(Err(e)) => Err(e).context("reading the contender's stdout"),
        Err(_) => bail!(
            "no event from {} within {DRAIN_TIMEOUT:?}",
            program.display()
        ),
    }
}

/// All runs of one contender.
#[derive(Debug, Clone, Serialize)]
pub struct FirstEvent {
    pub contender: Contender,
    pub runs_ms: Vec<f64>,
    pub ms: Option<Spread>,
}

impl FirstEvent {
    pub fn new(contender: Contender, runs_ms: Vec<f64>) -> FirstEvent {
        FirstEvent {
            contender,
            ms: Spread::of(runs_ms.iter().copied()),
            runs_ms,
        }
    }
}
