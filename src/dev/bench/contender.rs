//! The contenders: what each one runs, and how its catch-up is measured (its latency:
//! [`super::latency`]).
//!
//! Child contenders (`pg_recvlogical`, `waltap tail`) differ only in their command line:
//! one function builds each command, and one measures any child. The in-process
//! [`Listener`] has its own function. Every catch-up run yields the same [`Measurement`].

use std::convert::Infallible;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde::Serialize;
use tokio::process::Command;
use tokio_postgres::Client;

use super::fanout::{FanoutWindow, Filters};
use super::measure::{
    cpu_ticks, descendants, peak_rss_kib, read_gnu_time, reset_peak_rss, LastSeen, Proc,
    GNU_TIME_FORMAT,
};
use crate::pg::config::SourceConfig;
use crate::source::pipeline::{Listener, ListenerConfig};

/// How often a running contender's processes are sampled.
pub(super) const POLL: Duration = Duration::from_millis(5);

/// How long a latency consumer may take to show the last row once the writer is done (and
/// a child to start streaming).
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A way of reading the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// `pg_recvlogical` with pgoutput: raw protocol bytes, nothing decoded. The floor.
    RecvlogicalPgoutput,
    /// `pg_recvlogical` with test_decoding: the server formats text.
    RecvlogicalTestDecoding,
    /// A Python client with psycopg2's replication support, decoding every tuple and
    /// acknowledging each commit: the fastest known peer (`psycopg2_client.py`).
    Psycopg2,
    /// The `waltap tail` binary: JSON lines.
    WaltapTail,
    /// [`Listener`] in this process, with a consumer that counts and acknowledges.
    WaltapListener,
    /// The persisted path in this process: `waltap run`'s appender filling the event log.
    WaltapPersisted,
    /// The same appender with `--nats-url`: every event published to a JetStream stream
    /// on a `nats-server` (one node, file storage) started for the run.
    WaltapJetStream,
    /// A named stream's consumer reading the whole workload from the Postgres event log
    /// (filled by the appender first, outside the measurement), acknowledging each page.
    WaltapStreamReader,
    /// A [`Hub`] in this process with 1, 100, 1000 or 10000 subscribers whose filters split
    /// the key space, so every event reaches exactly one of them.
    WaltapFanout1,
    WaltapFanout100,
    WaltapFanout1000,
    WaltapFanout10000,
    /// A [`Hub`] with 1, 1000 or 10000 subscribers with an equality filter each
    /// ([`super::fanout`]).
    WaltapTenants1,
    WaltapTenants1000,
    WaltapTenants10000,
    /// A subscription on a follower of a group: fed from the event log the leader appends
    /// to ([`super::follower`]); latency only.
    WaltapFollower,
}

impl Contender {
    pub const ALL: [Contender; 16] = [
        Contender::RecvlogicalPgoutput,
        Contender::RecvlogicalTestDecoding,
        Contender::Psycopg2,
        Contender::WaltapTail,
        Contender::WaltapListener,
        Contender::WaltapPersisted,
        Contender::WaltapJetStream,
        Contender::WaltapStreamReader,
        Contender::WaltapFanout1,
        Contender::WaltapFanout100,
        Contender::WaltapFanout1000,
        Contender::WaltapFanout10000,
        Contender::WaltapTenants1,
        Contender::WaltapTenants1000,
        Contender::WaltapTenants10000,
        Contender::WaltapFollower,
    ];

    /// Whether the latency phase measures it (the catch-up-only paths are skipped there).
    pub fn measures_latency(self) -> bool {
        !matches!(
            self,
            Contender::WaltapPersisted
                | Contender::WaltapJetStream
                | Contender::WaltapStreamReader
                | Contender::Psycopg2
        ) && self.fanout().is_none()
    }

    /// Whether the first-event phase measures it: the child contenders, which print what
    /// they read.
    pub fn measures_first_event(self) -> bool {
        matches!(
            self,
            Contender::RecvlogicalPgoutput
                | Contender::RecvlogicalTestDecoding
                | Contender::Psycopg2
                | Contender::WaltapTail
        )
    }

    /// Whether it is another tool, not waltap: the peers waltap's runs are held against.
    pub fn is_peer(self) -> bool {
        matches!(
            self,
            Contender::RecvlogicalPgoutput
                | Contender::RecvlogicalTestDecoding
                | Contender::Psycopg2
        )
    }

    /// Whether the catch-up phase measures it.
    pub fn measures_catch_up(self) -> bool {
        !matches!(self, Contender::WaltapFollower)
    }

    /// For a fan-out contender: its subscribers and their filters.
    pub fn fanout(self) -> Option<(u64, Filters)> {
        match self {
            Contender::WaltapFanout1 => Some((1, Filters::KeyRanges)),
            Contender::WaltapFanout100 => Some((100, Filters::KeyRanges)),
            Contender::WaltapFanout1000 => Some((1000, Filters::KeyRanges)),
            Contender::WaltapFanout10000 => Some((10_000, Filters::KeyRanges)),
            Contender::WaltapTenants1 => Some((1, Filters::Tenants)),
            Contender::WaltapTenants1000 => Some((1000, Filters::Tenants)),
            Contender::WaltapTenants10000 => Some((10_000, Filters::Tenants)),
            _ => None,
        }
    }

    /// The name on the command line and in JSON.
    pub fn key(self) -> &'static str {
        match self {
            Contender::RecvlogicalPgoutput => "recvlogical-pgoutput",
            Contender::RecvlogicalTestDecoding => "recvlogical-test-decoding",
            Contender::Psycopg2 => "psycopg2",
            Contender::WaltapTail => "waltap-tail",
            Contender::WaltapListener => "waltap-listener",
            Contender::WaltapPersisted => "waltap-persisted",
            Contender::WaltapJetStream => "waltap-jetstream",
            Contender::WaltapStreamReader => "waltap-stream-reader",
            Contender::WaltapFanout1 => "waltap-fanout-1",
            Contender::WaltapFanout100 => "waltap-fanout-100",
            Contender::WaltapFanout1000 => "waltap-fanout-1000",
            Contender::WaltapFanout10000 => "waltap-fanout-10000",
            Contender::WaltapTenants1 => "waltap-tenants-1",
            Contender::WaltapTenants1000 => "waltap-tenants-1000",
            Contender::WaltapTenants10000 => "waltap-tenants-10000",
            Contender::WaltapFollower => "waltap-follower",
        }
    }

    pub fn parse(key: &str) -> Option<Contender> {
        Contender::ALL.into_iter().find(|c| c.key() == key)
    }

    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Contender::RecvlogicalPgoutput => "pg_recvlogical, pgoutput (floor)",
            Contender::RecvlogicalTestDecoding => "pg_recvlogical, test_decoding",
            Contender::Psycopg2 => "psycopg2 + pgoutput (Python, tuples decoded)",
            Contender::WaltapTail => "waltap tail > /dev/null",
            Contender::WaltapListener => "waltap Listener (in-process)",
            Contender::WaltapPersisted => "waltap run: appended to the event log",
            Contender::WaltapJetStream => "waltap run: appended to JetStream",
            Contender::WaltapStreamReader => "named stream read from the event log",
            Contender::WaltapFanout1 => "waltap subscribe, 1 filtered subscriber",
            Contender::WaltapFanout100 => "waltap subscribe, 100 filtered subscribers",
            Contender::WaltapFanout1000 => "waltap subscribe, 1000 filtered subscribers",
            Contender::WaltapFanout10000 => "waltap subscribe, 10000 filtered subscribers",
            Contender::WaltapTenants1 => "waltap subscribe, 1 tenant (equality) subscriber",
            Contender::WaltapTenants1000 => "waltap subscribe, 1000 tenant subscribers",
            Contender::WaltapTenants10000 => "waltap subscribe, 10000 tenant subscribers",
            Contender::WaltapFollower => "waltap serve follower: subscription fed from the log",
        }
    }

    /// The output plugin of its slots.
    pub fn plugin(self) -> &'static str {
        match self {
            Contender::RecvlogicalTestDecoding => "test_decoding",
            _ => "pgoutput",
        }
    }

    /// A slot name for it (`[a-z0-9_]`), unique per `what`.
    pub fn slot_name(self, what: &str) -> String {
        format!("{}_{what}", self.key().replace('-', "_"))
    }
}

/// The programs the contenders need and how their costs are read.
#[derive(Debug, Clone)]
pub struct Tools {
    pub recvlogical: Option<PathBuf>,
    pub waltap_bin: Option<PathBuf>,
    /// Child CPU and RSS from GNU time when set, else from polling `/proc/<pid>`.
    pub gnu_time: Option<PathBuf>,
    /// `python3`, when it can import psycopg2 (for [`Contender::Psycopg2`]).
    pub python_psycopg2: Option<PathBuf>,
    pub clk_tck: u64,
    /// Where each child's stderr (and GNU time's report) goes, named after its slot.
    pub logs: PathBuf,
}

impl Tools {
    /// Why `c` cannot run here, if it cannot.
    pub fn missing(&self, c: Contender) -> Option<String> {
        match c {
            Contender::RecvlogicalPgoutput | Contender::RecvlogicalTestDecoding
                if self.recvlogical.is_none() =>
            {
                Some("pg_recvlogical not found next to the server binaries".into())
            }
            Contender::WaltapTail if self.waltap_bin.is_none() => {
                Some("no waltap binary given".into())
            }
            Contender::Psycopg2 if self.python_psycopg2.is_none() => {
                Some("python3 with psycopg2 not found (pip install psycopg2-binary)".into())
            }
            Contender::WaltapJetStream if crate::dev::nats::binary().is_none() => {
                Some("nats-server not found (Debian package nats-server)".into())
            }
            _ => None,
        }
    }

    pub(super) fn cpu_secs(&self, ticks: Option<u64>) -> Option<f64> {
        ticks.map(|t| t as f64 / self.clk_tck as f64)
    }
}

/// The slot a contender reads, and a connection to watch it with.
pub struct Slot<'a> {
    pub url: &'a str,
    pub name: String,
    pub publication: &'a str,
    pub observer: &'a Client,
    /// A connection to the slot's own database (where the event log is written).
    pub observer_db: &'a Client,
}

impl<'a> Slot<'a> {
    /// A slot of the benchmark's publication.
    pub fn new(url: &'a str, name: String, observer: &'a Client, observer_db: &'a Client) -> Self {
        Slot {
            url,
            name,
            publication: super::PUBLICATION,
            observer,
            observer_db,
        }
    }
}

/// One catch-up run. The wall time runs from spawning the child (or calling
/// `Listener::start`) to its exit (or `shutdown` returning), so connection set-up counts.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub events: u64,
    pub wall_secs: f64,
    /// User + system CPU of the client process.
    pub client_cpu_secs: Option<f64>,
    /// User + system CPU of the walsender serving it, over its whole life.
    pub walsender_cpu_secs: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    /// Fan-out contenders: the catch-up window (`wall_secs` and the client CPU are its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout: Option<FanoutWindow>,
}

impl Measurement {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.wall_secs
    }

    pub fn client_cpu_us_per_event(&self) -> Option<f64> {
        Some(self.client_cpu_secs? * 1e6 / self.events as f64)
    }

    pub fn walsender_cpu_us_per_event(&self) -> Option<f64> {
        Some(self.walsender_cpu_secs? * 1e6 / self.events as f64)
    }
}

/// Reads `events` changes from the slot, up to WAL position `endpos`.
pub async fn catch_up(
    tools: &Tools,
    c: Contender,
    slot: &Slot<'_>,
    events: u64,
    endpos: &str,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    let args = match c {
        Contender::WaltapListener => return listener_catch_up(tools, slot, events, timeout).await,
        Contender::WaltapPersisted => {
            return super::persisted::postgres_log(tools, slot, events, timeout).await
        }
        Contender::WaltapJetStream => {
            return super::persisted::jetstream(tools, slot, events, timeout).await
        }
        Contender::WaltapStreamReader => {
            return super::persisted::stream_reader(tools, slot, events, timeout).await
        }
        _ if c.fanout().is_some() => return fanout_catch_up(tools, c, slot, events, timeout).await,
        Contender::WaltapTail => tail_args(slot, Some(events)),
        Contender::Psycopg2 => psycopg2_args(tools, slot, events)?,
        _ => recvlogical_args(c, slot, Some(endpos)),
    };
    child_catch_up(tools, program(tools, c)?, args, slot, events, timeout).await
}

pub(super) fn program(tools: &Tools, c: Contender) -> anyhow::Result<&Path> {
    let path = match c {
        Contender::WaltapTail => tools.waltap_bin.as_deref(),
        Contender::Psycopg2 => tools.python_psycopg2.as_deref(),
        _ => tools.recvlogical.as_deref(),
    };
    path.ok_or_else(|| anyhow!("{}: {}", c.key(), tools.missing(c).unwrap_or_default()))
}

/// Without `endpos` it streams until killed.
pub(super) fn recvlogical_args(c: Contender, slot: &Slot<'_>, endpos: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = [
        "-d",
        slot.url,
        "--slot",
        &slot.name,
        "--start",
        "-f",
        "-",
        // No fsync of stdout, no retrying: a failure must end the run.
        "-F",
        "0",
        "--no-loop",
    ]
    .map(String::from)
    .into();
    if c.plugin() == "pgoutput" {
        args.extend([
            "-o".into(),
            "proto_version=2".into(),
            "-o".into(),
            format!("publication_names={}", slot.publication),
        ]);
    }
    if let Some(lsn) = endpos {
        args.extend(["--endpos".into(), lsn.into()]);
    }
    args
}

/// The script, written next to the logs, and its arguments.
pub(super) fn psycopg2_args(
    tools: &Tools,
    slot: &Slot<'_>,
    events: u64,
) -> anyhow::Result<Vec<String>> {
    let script = tools.logs.join("psycopg2_client.py");
    std::fs::write(&script, include_str!("psycopg2_client.py"))
        .with_context(|| format!("writing {}", script.display()))?;
    Ok(vec![
        script.display().to_string(),
        slot.url.to_owned(),
        slot.name.clone(),
        slot.publication.to_owned(),
        events.to_string(),
    ])
}

/// `python3` on the PATH, if it imports psycopg2.
pub fn find_python_psycopg2() -> Option<PathBuf> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import psycopg2, psycopg2.extras"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| PathBuf::from("python3"))
}

/// Without `limit` it streams until killed.
pub(super) fn tail_args(slot: &Slot<'_>, limit: Option<u64>) -> Vec<String> {
    let mut args: Vec<String> = [
        "tail",
        "--database-url",
        slot.url,
        "--slot",
        &slot.name,
        "--publication",
        slot.publication,
        "--no-create",
    ]
    .map(String::from)
    .into();
    if let Some(n) = limit {
        args.extend(["--limit".into(), n.to_string()]);
    }
    args
}

pub(super) fn child_command(
    tools: &Tools,
    program: &Path,
    args: &[String],
    slot: &Slot<'_>,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("WALTAP_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(tools, &slot.name, "stderr"))
        .kill_on_drop(true);
    cmd
}

fn log_file(tools: &Tools, slot: &str, ext: &str) -> Stdio {
    File::create(tools.logs.join(format!("{slot}.{ext}"))).map_or(Stdio::null(), Stdio::from)
}

pub(super) fn stderr_of(tools: &Tools, slot: &Slot<'_>) -> String {
    std::fs::read_to_string(tools.logs.join(format!("{}.stderr", slot.name))).unwrap_or_default()
}

async fn child_catch_up(
    tools: &Tools,
    program: &Path,
    args: Vec<String>,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    let time_report = tools.logs.join(format!("{}.time", slot.name));
    let mut cmd = match &tools.gnu_time {
        Some(time) => {
            let mut cmd = child_command(tools, time, &[], slot);
            cmd.args(["-f", GNU_TIME_FORMAT, "-o"])
                .arg(&time_report)
                .arg("--")
                .arg(program)
                .args(&args);
            cmd
        }
        None => child_command(tools, program, &args, slot),
    };
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let mut tree = KillTree(child.id());
    let mut watch = Watch {
        observer: slot.observer,
        slot: &slot.name,
        client_pid: child.id().filter(|_| tools.gnu_time.is_none()),
        walsender_pid: None,
        client: LastSeen::default(),
        walsender: LastSeen::default(),
    };
    let status = tokio::select! {
        status = child.wait() => status?,
        never = watch.run() => match never {},
        _ = tokio::time::sleep(timeout) => bail!("{} did not finish within {timeout:?}", program.display()),
    };
    let wall_secs = start.elapsed().as_secs_f64();
    tree.0 = None;
    if !status.success() {
        bail!(
            "{} exited with {status}: {}",
            program.display(),
            stderr_of(tools, slot)
        );
    }
    let (client_cpu_secs, peak_rss_kib) = match &tools.gnu_time {
        Some(_) => read_gnu_time(&time_report)
            .map(|(cpu, rss)| (Some(cpu), Some(rss)))
            .ok_or_else(|| anyhow!("no GNU time report in {}", time_report.display()))?,
        None => (
            tools.cpu_secs(watch.client.cpu_ticks),
            watch.client.peak_rss_kib,
        ),
    };
    Ok(Measurement {
        events,
        wall_secs,
        client_cpu_secs,
        walsender_cpu_secs: tools.cpu_secs(watch.walsender.cpu_ticks),
        peak_rss_kib,
        fanout: None,
    })
}

/// Samples a running child contender and its walsender until dropped. A walsender is a
/// fresh process per connection, so its CPU since birth is the cost of this run.
struct Watch<'a> {
    observer: &'a Client,
    slot: &'a str,
    client_pid: Option<u32>,
    walsender_pid: Option<u32>,
    client: LastSeen,
    walsender: LastSeen,
}

impl Watch<'_> {
    async fn run(&mut self) -> Infallible {
        loop {
            if self.walsender_pid.is_none() {
                self.walsender_pid = walsender_pid(self.observer, self.slot).await.ok().flatten();
            }
            if let Some(pid) = self.walsender_pid {
                self.walsender.sample(Proc::Pid(pid));
            }
            if let Some(pid) = self.client_pid {
                self.client.sample(Proc::Pid(pid));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The pid of the walsender reading `slot`, once one does.
pub(super) async fn walsender_pid(observer: &Client, slot: &str) -> anyhow::Result<Option<u32>> {
    let row = observer
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .and_then(|pid| u32::try_from(pid).ok()))
}

/// Kills a child and everything it started (GNU time's child) unless disarmed: a failed
/// or timed-out run must not leave a reader attached to the slot.
struct KillTree(Option<u32>);

impl Drop for KillTree {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let mut pids = descendants(pid);
            pids.push(pid);
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .args(pids.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub(super) fn listener_config(slot: &Slot<'_>) -> anyhow::Result<ListenerConfig> {
    let mut config = ListenerConfig::new(SourceConfig::parse(slot.url)?);
    config.slot = slot.name.clone();
    config.publication = slot.publication.to_string();
    config.create_slot = false;
    config.create_publication = false;
    Ok(config)
}

async fn listener_catch_up(
    tools: &Tools,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    let work = async {
        let mut listener = Listener::start(listener_config(slot)?).await?;
        let mut seen = 0;
        while seen < events {
            let event = listener
                .next()
                .await
                .ok_or_else(|| anyhow!("the listener stopped after {seen} events"))??;
            seen += 1;
            listener.ack(event.position);
        }
        listener.shutdown().await;
        anyhow::Ok(())
    };
    in_process(tools, slot, events, timeout, work).await
}

/// Measures an in-process path: `work` runs until every event is handled.
pub(super) async fn in_process(
    tools: &Tools,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Measurement> {
    let own_peak = reset_peak_rss();
    let cpu_before = cpu_ticks(Proc::This);
    let start = Instant::now();
    let walsender = std::sync::Arc::new(Mutex::new(None));
    let watch = {
        let walsender = walsender.clone();
        async move {
            loop {
                // The walsender appears once the path has started; its CPU is read at the end.
                if let Ok(Some(pid)) = walsender_pid(slot.observer, &slot.name).await {
                    *walsender.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
                }
                tokio::time::sleep(POLL * 10).await;
            }
        }
    };
    let mut walsender_ticks = None;
    tokio::time::timeout(timeout, async {
        tokio::select! {
            r = work => r,
            () = watch => Err(anyhow!("the walsender watch ended")),
        }
    })
    .await
    .map_err(|_| anyhow!("{events} events not handled within {timeout:?}"))??;
    if let Some(pid) = *walsender.lock().unwrap_or_else(|e| e.into_inner()) {
        walsender_ticks = cpu_ticks(Proc::Pid(pid));
    }
    let wall_secs = start.elapsed().as_secs_f64();
    let client_ticks = cpu_before.and_then(|b| Some(cpu_ticks(Proc::This)?.saturating_sub(b)));
    Ok(Measurement {
        events,
        wall_secs,
        client_cpu_secs: tools.cpu_secs(client_ticks),
        walsender_cpu_secs: tools.cpu_secs(walsender_ticks),
        peak_rss_kib: peak_rss_kib(Proc::This).filter(|_| own_peak),
        fanout: None,
    })
}

/// A fan-out run, measured over its catch-up window (see [`super::fanout`]).
async fn fanout_catch_up(
    tools: &Tools,
    c: Contender,
    slot: &Slot<'_>,
    events: u64,
    timeout: Duration,
) -> anyhow::Result<Measurement> {
    let (n, filters) = c
        .fanout()
        .ok_or_else(|| anyhow!("{} is no fan-out", c.key()))?;
    let window = Mutex::new(FanoutWindow::default());
    let work = super::fanout::run(slot, events, n, filters, &window);
    let mut m = in_process(tools, slot, events, timeout, work).await?;
    let window = window.into_inner().unwrap_or_else(|e| e.into_inner());
    m.wall_secs = window.wall_secs;
    m.client_cpu_secs = tools.cpu_secs(window.cpu_ticks);
    m.fanout = Some(window);
    Ok(m)
}
