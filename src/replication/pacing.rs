//! Read pacing while catching up: wait until the socket holds a full window.
//!
//! Why reads are paced at all: the walsender sends each change as its own CopyData
//! message and tries to flush it at once. While our receive window is open, every such
//! `send()` crosses the whole TCP stack to us (on loopback, in the walsender's own time);
//! while the window is closed, a send only appends to its socket's queue, and the queued
//! data later reaches us in a few large segments. The walsender is the slowest part of a
//! catch-up, so its cost per send decides the events per second.
//!
//! Why the wait adapts instead of being a fixed pause (measured, see docs/benchmarks.md):
//! a fixed pause is bistable. When the walsender is fast, the window fills within the
//! pause, its sends stay cheap and it stays fast; when it is slow (a cold start, a busy
//! core), the window does not fill within the pause, its sends stay expensive and it
//! stays slow: the same catch-up ran at either about 280k or about 140k events/s with
//! nothing else different (reads of 42 KiB against 15 KiB). Waiting for the socket's own
//! signal, that it holds as much as it can, puts every run on the fast side.
//!
//! Invariants: the wait never exceeds [`MAX_WAIT`] per read and stops as soon as the queue
//! stops growing (the server has nothing more to send for now: it is decoding a large
//! transaction, or caught up), so pacing can delay a change by at most [`MAX_WAIT`] and
//! only while catching up. The wait blocks the thread on purpose: arriving data must not
//! wake it, or each send would cost a wake-up again.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// The longest a read is held back.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(2);

/// Until a read shows how much the socket holds, a queue this large counts as full.
const FIRST_FULL: usize = 16 * 1024;

/// Asks the socket how many bytes it holds and waits for it to fill.
pub(crate) struct Pacer {
    /// A duplicate of the connection's socket descriptor, only asked `FIONREAD`.
    probe: OwnedFd,
    /// The largest read so far: about what the socket holds when our window is closed.
    largest_read: usize,
    /// How the waits ended and how long they took, logged when the connection closes.
    tally: Tally,
}

#[derive(Default)]
struct Tally {
    reads: u64,
    full: u64,
    paused: u64,
    limit: u64,
    waited: Duration,
}

impl Pacer {
    /// A pacer for the socket behind `fd`; `None` when the descriptor cannot be duplicated
    /// (the connection then reads unpaced).
    pub(crate) fn new(fd: &impl AsFd) -> Option<Pacer> {
        match fd.as_fd().try_clone_to_owned() {
            Ok(probe) => Some(Pacer {
                probe,
                largest_read: 0,
                tally: Tally::default(),
            }),
            Err(e) => {
                tracing::debug!(error = %e, "reads are not paced: the socket could not be duplicated");
                None
            }
        }
    }

    /// Records a read's size.
    pub(crate) fn read(&mut self, n: usize) {
        self.largest_read = self.largest_read.max(n);
        self.tally.reads += 1;
    }

    /// What counts as a full queue: nine tenths of the largest read (a closed window
    /// leaves some slack below the largest).
    fn full(&self) -> usize {
        if self.largest_read == 0 {
            FIRST_FULL
        } else {
            self.largest_read * 9 / 10
        }
    }

    /// Blocks until the socket holds a full window, or holds the same nonzero amount at
    /// two checks `step` apart (the server paused), or [`MAX_WAIT`] passed.
    pub(crate) fn wait(&mut self, step: Duration) -> WaitEnd {
        let start = Instant::now();
        let end = self.wait_from(start, step);
        self.tally.waited += start.elapsed();
        match end {
            WaitEnd::Full => self.tally.full += 1,
            WaitEnd::Paused => self.tally.paused += 1,
            WaitEnd::Limit => self.tally.limit += 1,
            WaitEnd::Unknown => {}
        }
        end
    }

    fn wait_from(&self, start: Instant, step: Duration) -> WaitEnd {
        let full = u64::try_from(self.full()).unwrap_or(u64::MAX);
        let mut last = None;
        loop {
            std::thread::sleep(step);
            let Ok(queued) = rustix::io::ioctl_fionread(&self.probe) else {
                return WaitEnd::Unknown;
            };
            if queued >= full {
                return WaitEnd::Full;
            }
            if queued > 0 && last == Some(queued) {
                return WaitEnd::Paused;
            }
            if start.elapsed() >= MAX_WAIT {
                return WaitEnd::Limit;
            }
            last = Some(queued);
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        let t = &self.tally;
        tracing::debug!(
            reads = t.reads,
            largest_read = self.largest_read,
            full = t.full,
            paused = t.paused,
            limit = t.limit,
            waited_ms = t.waited.as_millis() as u64,
            "read pacing"
        );
    }
}

/// Why [`Pacer::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The socket holds a full window.
    Full,
    /// The queue stopped growing: the server has nothing more to send for now.
    Paused,
    /// [`MAX_WAIT`] passed.
    Limit,
    /// The socket could not be asked.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_wait_ends_when_the_queue_is_full_or_stops_growing() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        let mut pacer = Pacer::new(&a).expect("pacer");
        let step = Duration::from_micros(100);
        assert_eq!(pacer.wait(step), WaitEnd::Limit, "nothing arrives");
        b.write_all(b"xyz").expect("write");
        assert_eq!(
            pacer.wait(step),
            WaitEnd::Paused,
            "a few bytes that do not grow"
        );
        b.write_all(&[0; FIRST_FULL]).expect("write");
        assert_eq!(
            pacer.wait(step),
            WaitEnd::Full,
            "more than the first guess of a window"
        );
        // Once a larger read was seen, the same queue is no longer a full one.
        pacer.read(4 * FIRST_FULL);
        assert_eq!(pacer.wait(step), WaitEnd::Paused);
    }
}
