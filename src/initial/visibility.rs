//! Which committed transactions a database snapshot sees, and where in the change stream
//! the snapshot therefore sits. Pure: no I/O.

use crate::event::Position;
use crate::lsn::Lsn;

use super::SnapshotError;

/// A `pg_snapshot` (`xmin:xmax:xip,...`, 64-bit transaction ids): a transaction is visible
/// when it is below `xmin`, or below `xmax` and not in `xip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidSnapshot {
    pub xmin: u64,
    pub xmax: u64,
    /// Sorted.
    pub xip: Vec<u64>,
}

impl XidSnapshot {
    /// Parses the text form `pg_current_snapshot()` prints.
    pub fn parse(text: &str) -> Result<XidSnapshot, SnapshotError> {
        let bad = || SnapshotError::Protocol(format!("unreadable pg_snapshot {text:?}"));
        let mut parts = text.trim().splitn(3, ':');
        let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok()).ok_or_else(bad);
        let xmin = num(parts.next())?;
        let xmax = num(parts.next())?;
        let mut xip = Vec::new();
        for x in parts
            .next()
            .ok_or_else(bad)?
            .split(',')
            .filter(|s| !s.is_empty())
        {
            xip.push(x.parse::<u64>().map_err(|_| bad())?);
        }
        if xmin > xmax {
            return Err(bad());
        }
        xip.sort_unstable();
        Ok(XidSnapshot { xmin, xmax, xip })
    }

    /// The 64-bit id of a 32-bit `xid` as pgoutput sends it: the one nearest below this
    /// snapshot's `xmax` (a transaction that committed was running within 2^31 ids of it).
    fn widen(&self, xid: u32) -> u64 {
        let epoch = self.xmax >> 32;
        let candidate = (epoch << 32) | u64::from(xid);
        if candidate > self.xmax && epoch > 0 {
            candidate - (1 << 32)
        } else {
            candidate
        }
    }

    /// Whether a committed transaction with this (top-level) xid is visible: its changes
    /// are in what the snapshot reads.
    pub fn sees(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        full < self.xmin || (full < self.xmax && self.xip.binary_search(&full).is_err())
    }

    /// Whether the transaction was still running when the snapshot was taken.
    pub fn running(&self, xid: u32) -> bool {
        self.xip.binary_search(&self.widen(xid)).is_ok()
    }
}

/// One committed transaction of the change stream: its id and the position of its last
/// event (of those that matter to the consumer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommittedTx {
    pub xid: u32,
    pub last: Position,
}

/// Where a snapshot sits in the change stream: the position after which every change is
/// one the snapshot does not contain.
///
/// `txs` are the transactions after `joined` (the position from which the consumer holds
/// the changes) up to the snapshot's watermark, in commit order. Those the snapshot sees
/// must all come before those it does not: then the answer is the last event of the last
/// seen one (or `joined`). Commit order and visibility order can differ for transactions
/// committing at the very moment the snapshot is taken; then there is no such position and
/// the caller takes a new snapshot ([`SnapshotError::Unsettled`]).
pub fn settle(
    snapshot: &XidSnapshot,
    joined: Option<Position>,
    txs: &[CommittedTx],
) -> Result<Option<Position>, SnapshotError> {
    let seen = txs.iter().take_while(|t| snapshot.sees(t.xid)).count();
    if let Some(late) = txs[seen..].iter().find(|t| snapshot.sees(t.xid)) {
        return Err(SnapshotError::Unsettled { xid: late.xid });
    }
    Ok(txs[..seen].last().map(|t| t.last).or(joined))
}

/// Checks that no transaction the snapshot does not see had committed at or before the
/// point the consumer joined (its changes would be in neither the snapshot nor the changes
/// after it). `before_join` are the commits up to that point that are still known.
pub fn check_joined(
    snapshot: &XidSnapshot,
    before_join: &[(u32, Lsn)],
) -> Result<(), SnapshotError> {
    match before_join.iter().find(|(xid, _)| snapshot.running(*xid)) {
        Some((xid, _)) => Err(SnapshotError::Unsettled { xid: *xid }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pos(lsn: u64, ordinal: u32) -> Position {
        Position::new(Lsn(lsn), ordinal)
    }

    #[test]
    fn parses_and_sees() {
        let s = XidSnapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99) && s.sees(100) && s.sees(102) && s.sees(104));
        assert!(!s.sees(101) && !s.sees(103) && !s.sees(105) && !s.sees(200));
        assert!(s.running(101) && !s.running(102));
        assert_eq!(XidSnapshot::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        for bad in ["", "1", "1:2", "x:2:", "3:2:", "1:2:a"] {
            assert!(XidSnapshot::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn widens_across_an_epoch() {
        let base = 5u64 << 32;
        let s = XidSnapshot::parse(&format!("{}:{}:{}", base - 10, base + 10, base - 5)).unwrap();
        assert!(s.sees((base - 20) as u32), "previous epoch, below xmin");
        assert!(!s.sees((base - 5) as u32), "previous epoch, running");
        assert!(s.sees((base + 3) as u32), "this epoch, finished");
        assert!(!s.sees((base + 10) as u32), "at xmax");
    }

    #[test]
    fn settles_where_visibility_is_a_prefix() {
        let s = XidSnapshot::parse("10:20:12,15").unwrap();
        let tx = |xid, lsn| CommittedTx {
            xid,
            last: pos(lsn, 0),
        };
        let joined = Some(pos(50, 3));
        assert_eq!(settle(&s, joined, &[]).unwrap(), joined);
        assert_eq!(
            settle(
                &s,
                joined,
                &[tx(11, 60), tx(13, 70), tx(12, 80), tx(25, 90)]
            )
            .unwrap(),
            Some(pos(70, 0))
        );
        assert_eq!(settle(&s, joined, &[tx(15, 60)]).unwrap(), joined);
        assert!(matches!(
            settle(&s, joined, &[tx(11, 60), tx(12, 70), tx(13, 80)]),
            Err(SnapshotError::Unsettled { xid: 13 })
        ));
        assert!(check_joined(&s, &[(11, Lsn(40)), (13, Lsn(45))]).is_ok());
        assert!(check_joined(&s, &[(15, Lsn(45))]).is_err());
    }
}
