//! Cursors: where a consumer of a stream stands, in the text form clients hold and in
//! the `(commit_lsn, ordinal)` form the store compares.

use super::TX_END;

use serde::Serialize;

use crate::event::Position;
use crate::hub::SubscriptionItem;
use crate::log::StoreError;
use crate::lsn::Lsn;

/// Where a consumer of a stream is: after a change ([`Position`]), or, while the stream
/// hands out its initial state, after row `seq` of it. Text form: the position, or
/// `snapshot-<seq>` (what the server uses as SSE `id` and feed `cursor`).
///
/// A stream with an initial state orders its cursors as: `snapshot-1` .. `snapshot-N`
/// (its rows), then the position `P` of its `snapshotComplete` marker, then the changes
/// after `P`. Acknowledging `P` or a later change acknowledges the whole initial state,
/// marker included; a position before `P` (held from before a reset) changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// A change (or the `snapshotComplete` marker) at this position.
    Position(Position),
    /// Row `n` of the initial state (`snapshot-<n>`, from 1).
    Snapshot(u64),
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cursor::Position(p) => p.fmt(f),
            Cursor::Snapshot(seq) => write!(f, "snapshot-{seq}"),
        }
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Cursor, String> {
        match s.strip_prefix("snapshot-") {
            Some(seq) => seq
                .parse()
                .map(Cursor::Snapshot)
                .map_err(|_| format!("invalid cursor {s:?}: snapshot-<row number> expected")),
            None => s
                .parse()
                .map(Cursor::Position)
                .map_err(|e: crate::event::ParsePositionError| e.to_string()),
        }
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Cursor {
    /// The cursor a client holds after `item`, if the item moves it. `initialized` moves
    /// none: it says where the consumer resumes, which is what the client already holds,
    /// and while a stream hands out its initial state its position is the marker's (after
    /// the rows), so passing it back would skip them.
    pub fn after<R>(item: &SubscriptionItem<R>) -> Option<Cursor> {
        match item {
            SubscriptionItem::Event(ev) => Some(Cursor::Position(ev.position)),
            SubscriptionItem::Snapshot(row) => row.seq.map(Cursor::Snapshot),
            SubscriptionItem::SnapshotComplete { position } => position.map(Cursor::Position),
            SubscriptionItem::Completed { position, .. } => Some(Cursor::Position(*position)),
            SubscriptionItem::Initialized { .. } | SubscriptionItem::SchemaChange { .. } => None,
        }
    }
}

/// A position as the store keeps it: `(commit_lsn, ordinal)`, compared in that order.
/// Unlike [`Position`] it can stand before every event of a transaction (ordinal -1) and
/// after all of them ([`TX_END`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Mark {
    pub(crate) lsn: i64,
    pub(crate) ordinal: i32,
}

impl Mark {
    pub(crate) fn position(self) -> Position {
        Position::new(Lsn(self.lsn as u64), self.ordinal.max(0) as u32)
    }

    pub(crate) fn of(p: Position) -> Mark {
        Mark {
            lsn: p.commit_lsn.0 as i64,
            ordinal: i32::try_from(p.ordinal).unwrap_or(TX_END),
        }
    }

    /// Where a consumer whose cursor is `self` reads on after, in either log: the cursor
    /// itself when its event ends its transaction (`ends_tx`) or it is a transaction's
    /// end, else just before its transaction, which the consumer then reads again so
    /// that its events keep the numbers the consumer saw.
    pub(crate) fn read_after(self, ends_tx: bool) -> Mark {
        if ends_tx || self.ordinal == TX_END {
            self
        } else {
            Mark {
                lsn: self.lsn,
                ordinal: -1,
            }
        }
    }

    /// [`Mark::of`] for a position from a client: LSNs at or above 2^63 are beyond any
    /// log (and would wrap around in the store's `bigint`).
    pub(super) fn checked(p: Position) -> Result<Mark, StoreError> {
        if i64::try_from(p.commit_lsn.0).is_err() {
            return Err(StoreError::BeyondLog(
                p.to_string(),
                "7FFFFFFF/FFFFFFFF".into(),
            ));
        }
        Ok(Mark::of(p))
    }
}
