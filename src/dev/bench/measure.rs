//! Measuring processes from the outside: CPU time and peak memory from `/proc` or GNU
//! `time`, spreads and percentiles, and the timestamps consumers print.
//!
//! Everything here reads files or runs programs: no `unsafe`, so no `getrusage`/`wait4`.
//! CPU figures come in clock ticks (`getconf CLK_TCK`, usually 100 per second) and GNU
//! `time` prints centiseconds, so one figure is only good to about 10 ms: runs are sized
//! to take seconds.

use crate::event::days_from_civil;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// A process as `/proc` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    Pid(u32),
    This,
}

impl Proc {
    fn file(self, name: &str) -> PathBuf {
        match self {
            Proc::Pid(pid) => PathBuf::from(format!("/proc/{pid}/{name}")),
            Proc::This => PathBuf::from(format!("/proc/self/{name}")),
        }
    }
}

/// Fields 3 and up of `/proc/<pid>/stat` (`stat[0]` is field 3, the state).
fn stat_fields(p: Proc) -> Option<Vec<u64>> {
    let stat = fs::read_to_string(p.file("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    // The state is a letter; 0 keeps the numbering.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User plus system CPU of the whole process (all its threads, dead ones included), in
/// clock ticks.
pub fn cpu_ticks(p: Proc) -> Option<u64> {
    let fields = stat_fields(p)?;
    Some(fields.get(14 - 3)? + fields.get(15 - 3)?)
}

/// Every live process below `pid`, children before grandchildren.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u64)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            Some((child, *stat_fields(Proc::Pid(child))?.get(4 - 3)?))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = u64::from(found[i]);
        found.extend(parents.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    found.split_off(1)
}

/// Peak resident set size (`VmHWM`) in KiB; `None` once the process has exited.
pub fn peak_rss_kib(p: Proc) -> Option<u64> {
    status_kib(p, "VmHWM:")
}

/// Resident memory now, in KiB.
pub fn rss_kib(p: Proc) -> Option<u64> {
    status_kib(p, "VmRSS:")
}

fn status_kib(p: Proc, field: &str) -> Option<u64> {
    let status = fs::read_to_string(p.file("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets this process's `VmHWM`, so the in-process contender's peak is its own and not
/// that of whatever ran before it. False where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Clock ticks per second (`getconf CLK_TCK`); 100, the Linux value, when unknown.
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The last values seen while polling a process that may exit at any moment: a read that
/// fails (the process is gone) keeps what was seen before.
#[derive(Debug, Default, Clone, Copy)]
pub struct LastSeen {
    pub cpu_ticks: Option<u64>,
    pub peak_rss_kib: Option<u64>,
}

impl LastSeen {
    pub fn sample(&mut self, p: Proc) {
        if let Some(t) = cpu_ticks(p) {
            self.cpu_ticks = Some(t);
        }
        if let Some(r) = peak_rss_kib(p) {
            self.peak_rss_kib = Some(r);
        }
    }
}

/// `/usr/bin/time` when it is GNU time (BSD and busybox versions lack `-f`/`-o`).
pub fn find_gnu_time() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/time");
    let out = Command::new(&path).arg("--version").output().ok()?;
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .contains("GNU")
        .then_some(path)
}

/// The format given to GNU time: user and system CPU seconds, maximum RSS in KiB.
pub const GNU_TIME_FORMAT: &str = "%U %S %M";

/// What GNU time wrote with [`GNU_TIME_FORMAT`]: (CPU seconds, max RSS KiB). It prefixes a
/// line when the command failed, so only the last line counts.
pub fn read_gnu_time(path: &Path) -> Option<(f64, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let mut fields = text.lines().last()?.split_whitespace();
    let user: f64 = fields.next()?.parse().ok()?;
    let sys: f64 = fields.next()?.parse().ok()?;
    let rss: u64 = fields.next()?.parse().ok()?;
    Some((user + sys, rss))
}

/// Median and range of a set of runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        let (min, max) = (*v.first()?, *v.last()?);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Spread { median, min, max })
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// Now, in µs since the Unix epoch.
pub fn now_unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The first timestamp with a zone in `text`, in µs since the Unix epoch. Accepts what
/// every contender prints: Postgres output (`2025-01-02 10:11:12.5+00`, `+05:30`, in
/// pgoutput tuples and test_decoding lines) and RFC 3339 (`2025-01-02T10:11:12.500000Z`,
/// waltap's JSON).
pub fn find_timestamp(text: &[u8]) -> Option<i64> {
    (0..text.len())
        .filter(|&i| text[i].is_ascii_digit())
        .find_map(|i| parse_timestamp(&text[i..]))
}

fn parse_timestamp(s: &[u8]) -> Option<i64> {
    let mut c = Cursor { s, at: 0 };
    let year = c.number(4)?;
    c.byte(b"-")?;
    let month = c.number(2)?;
    c.byte(b"-")?;
    let day = c.number(2)?;
    c.byte(b" T")?;
    let hour = c.number(2)?;
    c.byte(b":")?;
    let minute = c.number(2)?;
    c.byte(b":")?;
    let second = c.number(2)?;
    let mut micros = 0;
    if c.byte(b".").is_some() {
        let digits = c.run_of_digits();
        if digits.is_empty() {
            return None;
        }
        for i in 0..6 {
            micros = micros * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'));
        }
    }
    let offset = match c.byte(b"Z+-")? {
        b'Z' => 0,
        sign => {
            let mut secs = c.number(2)? * 3600;
            if c.byte(b":").is_some() {
                secs += c.number(2)? * 60;
                if c.byte(b":").is_some() {
                    secs += c.number(2)?;
                }
            }
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
    };
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && minute < 60
        && second < 61;
    if !valid {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some((secs - offset) * 1_000_000 + micros)
}

struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    /// Exactly `n` digits.
    fn number(&mut self, n: usize) -> Option<i64> {
        let digits = self.s.get(self.at..self.at + n)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.at += n;
        Some(digits.iter().fold(0, |v, d| v * 10 + i64::from(d - b'0')))
    }

    /// One byte out of `allowed`.
    fn byte(&mut self, allowed: &[u8]) -> Option<u8> {
        let b = *self.s.get(self.at)?;
        allowed.contains(&b).then(|| {
            self.at += 1;
            b
        })
    }

    fn run_of_digits(&mut self) -> &[u8] {
        let start = self.at;
        while self.s.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        &self.s[start..self.at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_735_812_672_000_000; // 2025-01-02 10:11:12 UTC

    #[test]
    fn timestamps_in_every_contenders_output() {
        let test_decoding =
            b"table public.bench_latency: INSERT: id[bigint]:7 at[timestamp with time zone]:'2025-01-02 10:11:12.345678+00'";
        assert_eq!(find_timestamp(test_decoding), Some(T + 345_678));
        let json = br#"{"position":"0000000001529190-0000000001","created":{"id":7,"at":"2025-01-02T10:11:12.500000Z"},"tx":{"committedAt":"2025-01-02T10:11:13.000000Z"}}"#;
        assert_eq!(find_timestamp(json), Some(T + 500_000));
        assert_eq!(
            find_timestamp(b"\x00\x01t\x00\x00\x00\x1d2025-01-02 15:41:12.5+05:30"),
            Some(T + 500_000)
        );
        assert_eq!(
            find_timestamp(b"2025-01-02 02:11:12-08"),
            Some(T),
            "whole seconds, negative offset"
        );
        assert_eq!(find_timestamp(b"2025-01-02 10:11:12"), None, "no zone");
        assert_eq!(find_timestamp(b"2025-13-02 10:11:12Z"), None);
        assert_eq!(find_timestamp(b"no time here"), None);
    }

    #[test]
    fn dates_before_and_after_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn spreads_and_percentiles() {
        assert_eq!(
            Spread::of([3.0, 1.0, 2.0]),
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(Spread::of([4.0, 1.0]).map(|s| s.median), Some(2.5));
        assert_eq!(Spread::of([]), None);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(50.0));
        assert_eq!(percentile(&sorted, 99.0), Some(99.0));
        assert_eq!(percentile(&sorted, 100.0), Some(100.0));
        assert_eq!(percentile(&sorted, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn own_process_is_measurable() {
        assert!(cpu_ticks(Proc::This).is_some());
        assert!(peak_rss_kib(Proc::This).is_some_and(|kib| kib > 0));
        let mut seen = LastSeen::default();
        seen.sample(Proc::This);
        seen.sample(Proc::Pid(u32::MAX));
        assert!(
            seen.cpu_ticks.is_some(),
            "a failed read keeps the last value"
        );
    }

    #[test]
    fn descendants_of_a_shell() {
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .expect("sh runs");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut below = descendants(sh.id());
        while below.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            below = descendants(sh.id());
        }
        assert_eq!(below.len(), 1, "the sleep");
        for pid in below.iter().chain([&sh.id()]) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = sh.wait();
    }
}
