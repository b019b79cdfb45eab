//! Log sequence numbers, and the kinds of position built from them.
//!
//! An [`Lsn`] is a byte position in the write-ahead log. It is displayed the way Postgres
//! displays it (`16/B374D848`: high and low 32 bits in hex) and ordered numerically. `0/0`
//! means "no position" on the wire (Relation and Type messages carry it), so code that
//! tracks progress must take maxima and never treat `0/0` as a step back.
//!
//! Several kinds of LSN meet in waltap, and they must never be compared as if they were
//! one kind: WAL records are contiguous, so the *end* of one record is the *start* of the
//! next, and a position of one kind can equal a position of another kind that lies on
//! the other side of it.
//!
//! | kind | what it is | type |
//! |---|---|---|
//! | commit LSN | start of a transaction's commit record (pgoutput `Begin.final_lsn`, `Commit.commit_lsn`; an event's `tx.commitLsn`): orders transactions | `Lsn` inside [`crate::event::Position`] |
//! | end LSN | end of a commit record (`Commit.end_lsn`): confirming the slot there means the transaction is not sent again | `Lsn` (pipeline only) |
//! | watermark | end of a non-transactional logical message (what `pg_logical_emit_message` returns and decoding reports): transactions with a commit LSN *below* it are decoded before it, those at or above it after it, and a commit can start exactly at it | [`Watermark`] |
//! | log mark | the event log's progress: every transaction with a commit LSN *at or below* it is in the log | [`LogMark`] |
//! | position | a change's place in the total order (commit LSN, ordinal): events, cursors, `from`, `snapshotComplete`, the pruned mark | [`crate::event::Position`] |
//!
//! A watermark turns into a log mark only through [`LogMark::before`], and a commit LSN
//! is tested against either only through their methods, which say which side of the
//! boundary it falls on.

use std::fmt;
use std::str::FromStr;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Now, in microseconds since 2000-01-01 UTC, as the protocol's clock fields want it.
pub fn pg_now_micros() -> i64 {
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    since_unix - PG_EPOCH_OFFSET_MICROS
}

/// A WAL position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// Whether this is `0/0`.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// A snapshot's watermark: the end of its non-transactional logical message record.
///
/// Decoding hands the message out after every transaction whose commit record starts
/// before it and before every transaction whose commit record starts at or after it. The
/// record that follows the message starts exactly at the watermark, so a transaction can
/// commit *at* the watermark and still come after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(Lsn);

impl Watermark {
    /// The watermark whose message record ends at `end` (what `pg_logical_emit_message`
    /// returns, and the LSN pgoutput reports for the message).
    pub fn at(end: Lsn) -> Watermark {
        Watermark(end)
    }

    /// The end of the message record.
    pub fn lsn(self) -> Lsn {
        self.0
    }

    /// Whether the transaction committing at `commit_lsn` is decoded before the watermark
    /// (its commit record starts before the message's record ends).
    pub fn follows_commit(self, commit_lsn: Lsn) -> bool {
        commit_lsn < self.0
    }
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The event log's progress mark: every source transaction whose commit LSN is at or
/// below it is in the log, and the log holds no transaction above it.
///
/// Stored in `waltap.progress.commit_lsn`. It moves forward only: to the commit LSN of
/// the last transaction appended, or to just below a watermark once every transaction
/// before that watermark is appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogMark(Lsn);

impl LogMark {
    /// Nothing is in the log yet.
    pub const NONE: LogMark = LogMark(Lsn::ZERO);

    /// The mark after appending the transaction that committed at `commit_lsn` (and every
    /// one before it).
    pub fn through_commit(commit_lsn: Lsn) -> LogMark {
        LogMark(commit_lsn)
    }

    /// The mark once every transaction decoded before `watermark` is appended: commit
    /// LSNs below the watermark, and not one that starts at it.
    pub fn before(watermark: Watermark) -> LogMark {
        LogMark(Lsn(watermark.0 .0.saturating_sub(1)))
    }

    /// The stored form (`waltap.progress.commit_lsn`).
    pub fn from_stored(lsn: Lsn) -> LogMark {
        LogMark(lsn)
    }

    /// The greatest commit LSN the mark covers, as stored and as the log's positions use it.
    pub fn lsn(self) -> Lsn {
        self.0
    }

    /// The position after every event of the transactions the mark covers.
    pub fn last_position(self) -> crate::event::Position {
        crate::event::Position::before_lsn(Lsn(self.0 .0.saturating_add(1)))
    }

    /// Whether the transaction that committed at `commit_lsn` is already in the log.
    pub fn holds(self, commit_lsn: Lsn) -> bool {
        commit_lsn <= self.0
    }

    /// Whether every transaction decoded before `watermark` is in the log.
    pub fn reached(self, watermark: Watermark) -> bool {
        self >= LogMark::before(watermark)
    }
}

impl fmt::Display for LogMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `X/Y` (two hex numbers of at most 8 digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            let lsn = Lsn(v);
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
    }

    /// The boundary that lost a transaction: a commit whose record starts where the
    /// watermark's message ends comes after the watermark, so the mark the watermark gives
    /// must not hold it.
    #[test]
    fn a_commit_at_the_watermark_follows_it() {
        let w = Watermark::at(Lsn(0x1CDA_7458));
        assert!(!w.follows_commit(Lsn(0x1CDA_7458)));
        assert!(w.follows_commit(Lsn(0x1CDA_7457)));
        let mark = LogMark::before(w);
        assert!(!mark.holds(Lsn(0x1CDA_7458)));
        assert!(mark.holds(Lsn(0x1CDA_71B0)));
        assert!(mark.reached(w));
        assert!(!LogMark::through_commit(Lsn(0x1CDA_7000)).reached(w));
        assert!(LogMark::through_commit(Lsn(0x1CDA_7458)).reached(w));
        assert_eq!(LogMark::before(Watermark::at(Lsn::ZERO)), LogMark::NONE);
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "/", "1/", "/1", "g/1", "1/2/3", "123456789/0", "-1/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s}");
        }
    }
}
