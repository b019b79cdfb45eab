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

    pub fn failed(&self) -> bool {
        self.failure.lock().unwrap().is_some()
    }

    pub fn failure(&self) -> Option<(String, String, Duration)> {
        self.failure.lock().unwrap().clone()
    }

    /// The operations on `subject` and on the pipeline, and everything within two seconds
    /// before `at`: the part of the schedule that can explain a divergence.
    pub fn relevant(&self, subject: &str, at: Duration) -> String {
        let window = at.saturating_sub(Duration::from_secs(2))..=at;
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, line)| {
                line.starts_with(&format!("{subject}:"))
                    || line.starts_with("pipeline")
                    || window.contains(t)
            })
            .map(|(t, line)| format!("  {:>8.3}s {line}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
