//! The benchmark's report: what ran where (machine, versions, settings), the figures, and
//! their Markdown rendering. The JSON form is the serde form of [`Report`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use serde::Serialize;
use tokio_postgres::Client;

use super::contender::{Contender, Measurement};
use super::fanout::{FanoutWindow, Filters};
use super::first_event::{FirstEvent, BACKLOG};
use super::latency::Latency;
use super::measure::Spread;
use super::workload::{Shape, DELETES_PER_TX, INSERTS_PER_TX, UPDATES_PER_TX};
use crate::Identity;

/// Everything one benchmark run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub machine: Machine,
    pub versions: Versions,
    pub settings: Settings,
    pub workloads: Vec<Workload>,
    pub catch_up: Vec<CatchUp>,
    pub first_event: Vec<FirstEvent>,
    pub latency: Vec<Latency>,
    pub not_available: Vec<NotAvailable>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_mib: Option<u64>,
    pub kernel: String,
    /// `/proc/loadavg` before and after: the machine may be shared.
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn collect() -> Machine {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = read("/proc/meminfo").lines().find_map(|l| {
            let kib: u64 = l
                .strip_prefix("MemTotal:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()?;
            Some(kib / 1024)
        });
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_mib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            load_before: load_average(),
            load_after: String::new(),
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    /// Crate version and, when built from a git checkout, `git describe`.
    pub waltap: String,
    /// `--version` of the binary `waltap tail` ran, and its path.
    pub waltap_tail_binary: Option<String>,
    pub postgres: String,
    pub pg_recvlogical: Option<String>,
}

impl Versions {
    pub async fn collect(
        sql: &Client,
        recvlogical: Option<&Path>,
        waltap_bin: Option<&Path>,
    ) -> anyhow::Result<Versions> {
        let git = command_output(
            Command::new("git")
                .args(["describe", "--always", "--dirty"])
                .current_dir(env!("CARGO_MANIFEST_DIR")),
        );
        let waltap = match git {
            Some(g) => format!("{} ({g})", env!("CARGO_PKG_VERSION")),
            None => env!("CARGO_PKG_VERSION").to_string(),
        };
        let version_of = |bin: &Path| command_output(Command::new(bin).arg("--version"));
        Ok(Versions {
            waltap,
            waltap_tail_binary: waltap_bin.map(|bin| {
                let v = version_of(bin).unwrap_or_else(|| "unknown version".into());
                format!("{v}, {}", bin.display())
            }),
            postgres: sql.query_one("SHOW server_version", &[]).await?.get(0),
            pg_recvlogical: recvlogical.and_then(version_of),
        })
    }
}

fn command_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Server settings that change what decoding costs.
pub const PG_SETTINGS: [&str; 7] = [
    "wal_level",
    "fsync",
    "synchronous_commit",
    "shared_buffers",
    "logical_decoding_work_mem",
    "wal_sender_timeout",
    "max_wal_size",
];

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub changes: u64,
    pub shape: Shape,
    pub inserts_per_tx: u64,
    pub updates_per_tx: u64,
    pub deletes_per_tx: u64,
    pub runs: usize,
    pub slots: &'static str,
    pub latency_rate: u32,
    pub latency_secs: f64,
    pub client_cpu_source: String,
    pub clk_tck: u64,
    pub postgres: BTreeMap<String, String>,
}

pub async fn postgres_settings(sql: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    let names: Vec<String> = PG_SETTINGS.map(String::from).into();
    let rows = sql
        .query(
            "SELECT name, current_setting(name) FROM unnest($1::text[]) AS name",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The catch-up workload of one replica identity, written once before its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub identity: Identity,
    pub secs: f64,
    pub wal_bytes: i64,
    pub endpos: String,
}

/// All runs of one contender on one identity, with their summaries.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUp {
    pub identity: Identity,
    pub contender: Contender,
    pub runs: Vec<Measurement>,
    pub events_per_sec: Option<Spread>,
    pub client_cpu_us_per_event: Option<Spread>,
    pub walsender_cpu_us_per_event: Option<Spread>,
    pub peak_rss_mib: Option<Spread>,
}

impl CatchUp {
    pub fn new(identity: Identity, contender: Contender, runs: Vec<Measurement>) -> CatchUp {
        CatchUp {
            identity,
            contender,
            events_per_sec: Spread::of(runs.iter().map(Measurement::events_per_sec)),
            client_cpu_us_per_event: Spread::of(
                runs.iter().filter_map(Measurement::client_cpu_us_per_event),
            ),
            walsender_cpu_us_per_event: Spread::of(
                runs.iter()
                    .filter_map(Measurement::walsender_cpu_us_per_event),
            ),
            peak_rss_mib: Spread::of(
                runs.iter()
                    .filter_map(|m| Some(m.peak_rss_kib? as f64 / 1024.0)),
            ),
            runs,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NotAvailable {
    pub contender: String,
    pub reason: String,
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let (m, v, s) = (&self.machine, &self.versions, &self.settings);
        let _ = writeln!(md, "# waltap benchmark\n");
        let _ = writeln!(
            md,
            "Generated {}. Ratios, not absolute times, carry over to other machines.\n",
            self.generated_at
        );
        let _ = writeln!(
            md,
            "- Machine: {} CPUs ({}), {} MiB memory, Linux {}; load average {} before, {} after",
            m.nproc,
            m.cpu_model,
            m.memory_mib.map_or("?".into(), |x| x.to_string()),
            m.kernel,
            m.load_before,
            m.load_after
        );
        let _ = writeln!(
            md,
            "- Versions: waltap {}; PostgreSQL {}; {}; tail binary: {}",
            v.waltap,
            v.postgres,
            v.pg_recvlogical.as_deref().unwrap_or("no pg_recvlogical"),
            v.waltap_tail_binary.as_deref().unwrap_or("none")
        );
        let settings: Vec<String> = s.postgres.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(md, "- Server settings: {}", settings.join(", "));
        let _ = writeln!(
            md,
            "- Workload per identity: {} row changes: {} inserts ({INSERTS_PER_TX} per \
             transaction), {} single-row updates ({UPDATES_PER_TX} per transaction), {} deletes \
             ({DELETES_PER_TX} per transaction); columns int8 (key), int4, text, numeric, \
             timestamptz, jsonb, bool",
            s.changes, s.shape.inserts, s.shape.updates, s.shape.deletes
        );
        let _ = writeln!(
            md,
            "- Runs: {} per contender and identity; {}",
            s.runs, s.slots
        );
        let _ = writeln!(
            md,
            "- CPU: client from {}, walsender from /proc/<pid>/stat; {} ticks/s",
            s.client_cpu_source, s.clk_tck
        );
        for w in &self.workloads {
            let _ = writeln!(
                md,
                "- Writing the {} workload took {:.1} s and {:.1} MiB of WAL",
                identity_name(w.identity),
                w.secs,
                w.wal_bytes as f64 / 1048576.0
            );
        }
        for identity in [Identity::Default, Identity::Full] {
            self.catch_up_table(&mut md, identity);
        }
        for identity in [Identity::Default, Identity::Full] {
            self.fanout_table(&mut md, identity);
        }
        self.first_event_table(&mut md);
        self.latency_table(&mut md);
        if !self.not_available.is_empty() {
            let _ = writeln!(md, "\n## Not available\n");
            for n in &self.not_available {
                let _ = writeln!(md, "- {}: {}", n.contender, n.reason);
            }
        }
        md
    }

    fn catch_up_table(&self, md: &mut String, identity: Identity) {
        let rows: Vec<&CatchUp> = self
            .catch_up
            .iter()
            .filter(|c| c.identity == identity)
            .collect();
        if rows.is_empty() {
            return;
        }
        let floor = rows
            .iter()
            .find(|c| c.contender == Contender::RecvlogicalPgoutput);
        let median = |s: &Option<Spread>| s.map(|s| s.median);
        let ratio = |x: Option<f64>, of: Option<f64>| match (x, of) {
            (Some(x), Some(of)) if of > 0.0 => format!("{:.2}×", x / of),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "\n## Catch-up, REPLICA IDENTITY {}\n\n\
             Median of {} runs (min–max); spread = max / min; × = ratio to the pg_recvlogical \
             pgoutput floor's median (for \"min ×\", the slowest run's).\n\n\
             | contender | events/s | min–max | spread | × floor | min × floor | client CPU µs/event | × floor | walsender CPU µs/event | × floor | peak RSS MiB |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            identity_name(identity).to_uppercase(),
            self.settings.runs
        );
        for c in &rows {
            let floor_of = |f: fn(&CatchUp) -> &Option<Spread>| floor.and_then(|fl| median(f(fl)));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.contender.label(),
                num(median(&c.events_per_sec), 0),
                c.events_per_sec
                    .map_or("–".into(), |s| format!("{:.0}–{:.0}", s.min, s.max)),
                c.events_per_sec
                    .filter(|s| s.min > 0.0)
                    .map_or("–".into(), |s| format!("{:.2}", s.max / s.min)),
                ratio(median(&c.events_per_sec), floor_of(|f| &f.events_per_sec)),
                ratio(
                    c.events_per_sec.map(|s| s.min),
                    floor_of(|f| &f.events_per_sec)
                ),
                num(median(&c.client_cpu_us_per_event), 2),
                ratio(
                    median(&c.client_cpu_us_per_event),
                    floor_of(|f| &f.client_cpu_us_per_event)
                ),
                num(median(&c.walsender_cpu_us_per_event), 2),
                ratio(
                    median(&c.walsender_cpu_us_per_event),
                    floor_of(|f| &f.walsender_cpu_us_per_event)
                ),
                num(median(&c.peak_rss_mib), 1),
            );
        }
        let peer = rows
            .iter()
            .filter(|c| c.contender.is_peer())
            .filter_map(|c| Some((c.contender, c.events_per_sec?.median)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let Some((peer, peer_median)) = peer.filter(|(_, m)| *m > 0.0) else {
            return;
        };
        let _ = writeln!(
            md,
            "\nSlowest run ÷ the fastest peer's median ({}, {peer_median:.0} events/s):\n",
            peer.label()
        );
        for c in rows.iter().filter(|c| !c.contender.is_peer()) {
            if let Some(s) = c.events_per_sec {
                let _ = writeln!(md, "- {}: {:.2}×", c.contender.label(), s.min / peer_median);
            }
        }
    }

    /// The fan-out contenders against one subscriber with the same kind of filter.
    fn fanout_table(&self, md: &mut String, identity: Identity) {
        let rows: Vec<(&CatchUp, u64, Filters)> = self
            .catch_up
            .iter()
            .filter(|c| c.identity == identity)
            .filter_map(|c| c.contender.fanout().map(|(n, f)| (c, n, f)))
            .collect();
        if rows.is_empty() {
            return;
        }
        let median_of = |c: &CatchUp, f: fn(&FanoutWindow) -> Option<f64>| {
            Spread::of(c.runs.iter().filter_map(|m| f(m.fanout.as_ref()?))).map(|s| s.median)
        };
        let _ = writeln!(
            md,
            "\n## Fan-out, REPLICA IDENTITY {}\n\n\
             Catch-up window only (from `resume` to the last event), medians; × = ratio to \
             one subscriber with the same kind of filter. Set-up (making the subscriptions) \
             is apart; the RSS it added is a lower bound, as memory freed by earlier runs \
             is reused.\n\n\
             | contender | events/s | × 1 subscriber | client CPU µs/event | delivered | set-up s | RSS growth KiB per subscriber (lower bound) |\n\
             |---|---:|---:|---:|---:|---:|---:|",
            identity_name(identity).to_uppercase(),
        );
        for &(c, n, filters) in &rows {
            let base = rows
                .iter()
                .find(|(_, bn, bf)| *bn == 1 && *bf == filters)
                .and_then(|(b, ..)| b.events_per_sec.map(|s| s.median));
            let eps = c.events_per_sec.map(|s| s.median);
            let ratio = match (eps, base) {
                (Some(x), Some(b)) if b > 0.0 => format!("{:.2}×", x / b),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.contender.label(),
                num(eps, 0),
                ratio,
                num(c.client_cpu_us_per_event.map(|s| s.median), 2),
                num(median_of(c, |w| Some(w.delivered as f64)), 0),
                num(median_of(c, |w| Some(w.setup_secs)), 2),
                match n {
                    1 => "–".into(),
                    _ => num(median_of(c, |w| w.kib_per_idle_subscriber), 1),
                },
            );
        }
    }

    fn first_event_table(&self, md: &mut String) {
        if self.first_event.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "\n## Time to the first event\n\n\
             From spawning the contender on a slot with a backlog of {BACKLOG} changes (the \
             workload above, REPLICA IDENTITY DEFAULT) to its first output; {} runs.\n\n\
             | contender | median ms | min–max ms |\n\
             |---|---:|---:|",
            self.settings.runs
        );
        for f in &self.first_event {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                f.contender.label(),
                num(f.ms.map(|s| s.median), 1),
                f.ms.map_or("–".into(), |s| format!("{:.1}–{:.1}", s.min, s.max)),
            );
        }
    }

    fn latency_table(&self, md: &mut String) {
        if self.latency.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "\n## End-to-end latency\n\n\
             Single-row commits at {}/s for {:.0} s; from `clock_timestamp()` in the row to \
             the consumer reading it.\n\n\
             | contender | commits | commits/s | p50 ms | p90 ms | p99 ms | max ms |\n\
             |---|---:|---:|---:|---:|---:|---:|",
            self.settings.latency_rate, self.settings.latency_secs
        );
        for l in &self.latency {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} |",
                l.contender.label(),
                l.commits,
                l.commits_per_sec,
                num(l.p50_ms, 2),
                num(l.p90_ms, 2),
                num(l.p99_ms, 2),
                num(l.max_ms, 2)
            );
        }
    }
}

pub fn identity_name(identity: Identity) -> &'static str {
    match identity {
        Identity::Full => "full",
        _ => "default",
    }
}

fn num(x: Option<f64>, decimals: usize) -> String {
    x.map_or("–".into(), |x| format!("{x:.decimals$}"))
}
