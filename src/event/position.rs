//! Event positions: the total order of changes and the resume cursor.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::lsn::Lsn;

/// Where a change sits in the total order: its transaction's commit LSN, then its ordinal
/// among the transaction's row changes. Identical for the same change on every delivery.
///
/// Its text form is fixed width (`00000000016B3748-0000000002`: 16 hex digits, a dash,
/// 10 decimal digits), so comparing two positions as strings gives their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Where the change's transaction commit record ends in the WAL.
    pub commit_lsn: Lsn,
    /// The change's place among all row changes of its transaction, from 0 (counted
    /// before any filter, so it is the same for every consumer).
    pub ordinal: u32,
}

impl Position {
    /// The position of change `ordinal` of the transaction committed at `commit_lsn`.
    pub fn new(commit_lsn: Lsn, ordinal: u32) -> Self {
        Position {
            commit_lsn,
            ordinal,
        }
    }
}

/// The ordinal of a position that stands after every event of its transaction (an `int4`
/// like the ordinals the event log stores).
const TX_END: u32 = i32::MAX as u32;

impl Position {
    /// The position before every transaction that commits at or after `lsn`: where a
    /// consumer stands that streams from `lsn` and has received nothing yet. (A
    /// transaction may commit exactly at a slot's confirmed point, so the position is
    /// one byte below it, after every event committed there.)
    pub fn before_lsn(lsn: Lsn) -> Position {
        match lsn.0.checked_sub(1) {
            Some(below) => Position::new(Lsn(below), TX_END),
            None => Position::new(Lsn::ZERO, 0),
        }
    }
}

/// Length of a position's text form.
pub const POSITION_LEN: usize = 27;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

impl Position {
    /// Writes the text form into `buf` without going through `fmt` (this runs for every
    /// event delivered).
    pub fn encode<'a>(&self, buf: &'a mut [u8; POSITION_LEN]) -> &'a str {
        let lsn = self.commit_lsn.0;
        for (i, b) in buf[..16].iter_mut().enumerate() {
            *b = HEX[((lsn >> (60 - 4 * i)) & 0xF) as usize];
        }
        buf[16] = b'-';
        let mut n = self.ordinal;
        for b in buf[17..].iter_mut().rev() {
            *b = b'0' + (n % 10) as u8;
            n /= 10;
        }
        // Only ASCII digits, hex letters and a dash were written.
        std::str::from_utf8(buf).unwrap_or_default()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}-{:010}", self.commit_lsn.0, self.ordinal)
    }
}

/// The text is not a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {0:?}: expected 16 hex digits, '-', 10 digits")]
pub struct ParsePositionError(pub String);

impl FromStr for Position {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError(s.to_owned());
        let (lsn, ord) = s.split_once('-').ok_or_else(err)?;
        if lsn.len() != 16 || ord.len() != 10 || !ord.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        Ok(Position {
            commit_lsn: Lsn(u64::from_str_radix(lsn, 16).map_err(|_| err())?),
            ordinal: ord.parse().map_err(|_| err())?,
        })
    }
}

impl Serialize for Position {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; POSITION_LEN];
        s.serialize_str(self.encode(&mut buf))
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_order_is_position_order() {
        let a = Position::new(Lsn(0x16B3748), 2);
        assert_eq!(a.to_string(), "00000000016B3748-0000000002");
        let mut buf = [0u8; POSITION_LEN];
        for p in [
            a,
            Position::new(Lsn(u64::MAX), u32::MAX),
            Position::new(Lsn(0), 0),
        ] {
            assert_eq!(p.encode(&mut buf), p.to_string());
        }
        assert_eq!(a.to_string().parse::<Position>(), Ok(a));
        let ps = [
            Position::new(Lsn(1), 0),
            Position::new(Lsn(1), 10),
            Position::new(Lsn(0xA), 1),
            Position::new(Lsn(u64::MAX), u32::MAX),
        ];
        for w in ps.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_string() < w[1].to_string());
        }
        let start = Position::before_lsn(Lsn(0x16B3748));
        assert!(start < Position::new(Lsn(0x16B3748), 0));
        assert!(start > Position::new(Lsn(0x16B3747), i32::MAX as u32 - 1));
        assert_eq!(start.to_string(), "00000000016B3747-2147483647");
        assert_eq!(Position::before_lsn(Lsn::ZERO), Position::new(Lsn::ZERO, 0));
        assert!("0-1".parse::<Position>().is_err());
        assert!("00000000016B3748-00000000x2".parse::<Position>().is_err());
        assert!("00000000016B3748-9999999999".parse::<Position>().is_err());
    }
}
