//! A progress line on stderr for long copies (`export`, initial states): rows done, the
//! estimated total (`pg_class.reltuples`, so "~"), rate and time left.
//!
//! Shown only when stderr is a terminal, stdout is not (the rows go to a file or a pipe:
//! on one terminal the line would be torn apart by them) and `--quiet` was not given: a
//! pipe or a log file gets nothing. The line is redrawn in place (`\r`) at most every [`REDRAW`], and left
//! with its final figures and a newline by [`Progress::finish`]. Data never goes here:
//! stdout carries it.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Least time between two redraws.
pub const REDRAW: Duration = Duration::from_millis(200);

/// A progress line; all methods are no-ops when it is not shown.
pub struct Progress {
    shown: bool,
    label: String,
    state: Mutex<State>,
}

struct State {
    done: u64,
    estimate: Option<u64>,
    started: Instant,
    drawn: Option<Instant>,
    finished: bool,
}

impl Progress {
    /// A line for `label` (e.g. `export public.orders`), shown when stderr is a terminal,
    /// stdout is not, and not `quiet`.
    pub fn new(label: impl Into<String>, estimate: Option<u64>, quiet: bool) -> Progress {
        Progress {
            shown: !quiet && std::io::stderr().is_terminal() && !std::io::stdout().is_terminal(),
            label: label.into(),
            state: Mutex::new(State {
                done: 0,
                estimate,
                started: Instant::now(),
                drawn: None,
                finished: false,
            }),
        }
    }

    /// Whether anything is drawn.
    pub fn shown(&self) -> bool {
        self.shown
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `rows` more are done.
    pub fn add(&self, rows: u64) {
        if !self.shown {
            return;
        }
        let mut state = self.state();
        state.done += rows;
        self.redraw(&mut state, false);
    }

    /// Sets the count (for a copy reported elsewhere), and the estimate when known.
    pub fn set(&self, rows: u64, estimate: Option<u64>) {
        if !self.shown {
            return;
        }
        let mut state = self.state();
        state.done = rows;
        state.estimate = estimate.or(state.estimate);
        self.redraw(&mut state, false);
    }

    /// Draws the final figures and ends the line (once), if it was drawn at all.
    pub fn finish(&self) {
        if !self.shown {
            return;
        }
        let mut state = self.state();
        if !state.finished && state.drawn.is_some() {
            state.finished = true;
            self.redraw(&mut state, true);
        }
    }

    fn redraw(&self, state: &mut State, last: bool) {
        let now = Instant::now();
        if !last && state.drawn.is_some_and(|at| now - at < REDRAW) {
            return;
        }
        state.drawn = Some(now);
        let text = line(
            &self.label,
            state.done,
            state.estimate,
            now - state.started,
            last,
        );
        let mut err = std::io::stderr().lock();
        // `\x1b[K` clears what a longer previous line left.
        let _ = write!(err, "\r{text}\x1b[K{}", if last { "\n" } else { "" });
        let _ = err.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An error ends the copy early: the line is closed so that the message that
        // follows starts on its own line.
        let open = {
            let state = self.state();
            state.drawn.is_some() && !state.finished
        };
        if self.shown && open {
            eprintln!();
        }
    }
}

/// `12,345 of ~100,000 rows (12%) · 4,000 rows/s · about 22 s left`, or with `last`
/// `12,345 rows in 3.1 s (4,000 rows/s)`.
pub fn line(
    label: &str,
    done: u64,
    estimate: Option<u64>,
    elapsed: Duration,
    last: bool,
) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    if last {
        return format!(
            "{label}: {} rows in {} ({} rows/s)",
            grouped(done),
            seconds(secs),
            grouped(rate as u64)
        );
    }
    let mut out = format!("{label}: {}", grouped(done));
    // The estimate is the catalog's: rows written since it was taken can pass it.
    match estimate.filter(|&e| e > 0) {
        Some(total) if done <= total => {
            out += &format!(" of ~{} rows ({}%)", grouped(total), done * 100 / total);
            if rate > 0.0 && done > 0 {
                out += &format!(
                    " · {} rows/s · about {} left",
                    grouped(rate as u64),
                    seconds((total - done) as f64 / rate)
                );
            }
        }
        _ => {
            out += " rows";
            if rate > 0.0 {
                out += &format!(" · {} rows/s", grouped(rate as u64));
            }
        }
    }
    out
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as `0.4 s`, `12 s`, `3 min 5 s`, `2 h 10 min`.
pub fn seconds(s: f64) -> String {
    let whole = s.round() as u64;
    match whole {
        _ if s < 10.0 => format!("{s:.1} s"),
        0..=89 => format!("{whole} s"),
        90..=5399 => format!("{} min {} s", whole / 60, whole % 60),
        _ => format!("{} h {} min", whole / 3600, whole % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let t = Duration::from_secs(5);
        assert_eq!(
            line("export public.t", 20_000, Some(100_000), t, false),
            "export public.t: 20,000 of ~100,000 rows (20%) · 4,000 rows/s · about 20 s left"
        );
        // Past the estimate, or without one: no percentage, no time left.
        assert_eq!(
            line("x", 1_500, Some(1_000), t, false),
            "x: 1,500 rows · 300 rows/s"
        );
        assert_eq!(line("x", 0, None, Duration::ZERO, false), "x: 0 rows");
        assert_eq!(
            line(
                "x",
                1_234_567,
                Some(2_000_000),
                Duration::from_secs(100),
                true
            ),
            "x: 1,234,567 rows in 1 min 40 s (12,345 rows/s)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(seconds(0.42), "0.4 s");
        assert_eq!(seconds(42.0), "42 s");
        assert_eq!(seconds(185.0), "3 min 5 s");
        assert_eq!(seconds(7800.0), "2 h 10 min");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
    }
}
