//! What the schedule did, when: printed (the part that matters) when a check fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Trace {
    started: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    /// The first divergence: consumer, what, when.
    failure: Arc<Mutex<Option<(String, String, Duration)>>>,
}

impl Trace {
    pub fn new(started: Instant) -> Trace {
        Trace {
            started,
            lines: Arc::default(),
            failure: Arc::default(),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn log(&self, line: String) {
        tracing::debug!(target: "chaos", "{line}");
        self.lines
            .lock()
            .unwrap()
            .push((self.started.elapsed(), line));
    }

    /// Records a divergence (the first one wins) for `subject` (a consumer's name).
    pub fn fail(&self, subject: &str, what: String) {
        let at = self.started.elapsed();
        self.log(format!("{subject}: DIVERGENCE: {what}"));
        self.failure
            .lock()
            .unwrap()
            .get_or_insert((subject.to_owned(), what, at));
    }

    /// Lines marked `ANOMALY`: odd but not a divergence, worth a look.
    pub fn anomalies(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, line)| line.contains("ANOMALY"))
            .map(|(t, line)| format!("{:.3}s {line}", t.as_secs_f64()))
            .collect()
    }

    /// How often the schedule did what: a line for passing runs.
    pub fn counts(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let count = |what: &str| lines.iter().filter(|(_, l)| l.contains(what)).count();
        format!(
            "{} exports, {} streams, {} SIGKILLs and {} SIGSTOPs of the pipeline, {} SIGKILLs and {} \
             SIGSTOPs of a group's leader, {} disconnects, {} resets, \
             {} Postgres restarts ({} errors after them forgiven), {} truncates, {} columns added; {}",
            count("waltap export items"),
            count(": created "),
            count("pipeline: SIGKILL"),
            count("pipeline: SIGSTOP"),
            count("group: SIGKILL"),
            count("group: SIGSTOP"),
            count(": disconnect ("),
            count("reset"),
            count("postgres: restart"),
            count("after the Postgres crash"),
            count("TRUNCATE items committed"),
            count("ADD COLUMN"),
            ["writers: stopped", "catch-up: "]
                .map(|what| lines
                    .iter()
                    .rev()
                    .find(|(_, l)| l.starts_with(what))
                    .map(|(_, l)| l.as_str())
                    .unwrap_or_default())
                .join("; "),
        )
    }

    pub fn failed(&self) -> bool {
        self.failure.lock().unwrap().is_some()
    }

    pub fn failure(&self) -> Option<(String, String, Duration)> {
        self.failure.lock().unwrap().clone()
    }

    /// The operations of the schedule up to `at` (writers' commits are not in it: the
    /// report names the transactions that matter), and what happened to `subject` after.
    pub fn relevant(&self, subject: &str, at: Duration) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, line)| *t <= at || line.starts_with(&format!("{subject}:")))
            .map(|(t, line)| format!("  {:>8.3}s {line}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
