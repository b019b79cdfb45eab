//! Change events: the public data model and its JSON form (README, "Point it at your database").
//!
//! This module owns [`Event`] and its serialization, [`Position`] (the total order and
//! resume cursor) and the [`Assembler`] that turns decoded pgoutput messages into events:
//! the relation cache, value typing by type OID, REPLICA IDENTITY handling, unchanged
//! TOAST values, `changed`, transaction metadata and annotations. It does no I/O: type
//! OIDs it cannot type on its own are listed by [`Assembler::unresolved_types`] for the
//! caller to look up in the catalog.

mod assemble;
mod position;
mod shape;
mod time;
mod write;

use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

pub use assemble::{Assembler, AssemblerOptions, EventError, Output, TableName, WATERMARK_PREFIX};
pub use position::{ParsePositionError, Position, POSITION_LEN};
pub(crate) use shape::splice_stored;
pub use shape::{ColumnShape, SchemaChange, SchemaConflict};
pub(crate) use time::days_from_civil;
pub use time::rfc3339_micros;

use crate::lsn::Lsn;
use crate::value::Value;

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A row was inserted.
    Create,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
    /// The table was truncated (the event carries no row).
    Truncate,
}

/// How an update moved a row relative to a subscriber's filtered set (README, "Filters and subscriptions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    /// The row entered the set (a matching create, or an update from out to in).
    Appear,
    /// The row left the set (a delete of a matching row, or an update from in to out).
    Disappear,
    /// The row was in the set before and after.
    Update,
}

impl Transition {
    /// The JSON name (`appear`, `disappear`, `update`).
    pub fn name(self) -> &'static str {
        match self {
            Transition::Appear => "appear",
            Transition::Disappear => "disappear",
            Transition::Update => "update",
        }
    }
}

/// How much of the old row Postgres sends for the table (`REPLICA IDENTITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// The primary key only: `before` is null unless the key changed, `deleted` has the key.
    Default,
    /// Every column: full `before` and `deleted` rows.
    Full,
    /// The columns of a chosen unique index, like `default`.
    Index,
    /// Nothing: updates and deletes fail on the source when the table is published.
    Nothing,
}

impl Identity {
    /// The JSON name (`default`, `full`, `index`, `nothing`).
    pub fn name(self) -> &'static str {
        match self {
            Identity::Default => "default",
            Identity::Full => "full",
            Identity::Index => "index",
            Identity::Nothing => "nothing",
        }
    }
}

/// A row: the relation's column names and a value for each column that was sent.
///
/// A column is absent (`None`) when Postgres did not send it: non-key columns of a key-only
/// old row, or an unchanged TOASTed value without a before image.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Column names, in the table's order; shared by every row of the relation.
    pub names: Arc<[Arc<str>]>,
    /// One entry per name: the value, `None` when Postgres did not send it.
    pub values: Vec<Option<Value>>,
}

impl Row {
    /// The value of a column by name, if it was sent.
    pub fn get(&self, name: &str) -> Option<&Value> {
        let i = self.names.iter().position(|n| &**n == name)?;
        self.values.get(i)?.as_ref()
    }

    /// Deserializes the row into a user type through its JSON form.
    pub fn to_typed<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(serde_json::to_value(self)?)
    }
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.values.iter().filter(|v| v.is_some()).count();
        let mut map = s.serialize_map(Some(n))?;
        for (name, value) in self.names.iter().zip(&self.values) {
            if let Some(v) = value {
                map.serialize_entry(&**name, v)?;
            }
        }
        map.end()
    }
}

/// An LSN in Postgres's `X/Y` form, written without `fmt` machinery.
#[derive(Clone, Copy)]
struct LsnText(Lsn);

impl LsnText {
    fn encode(self, buf: &mut [u8; 17]) -> &str {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut len = 0;
        for half in [(self.0 .0 >> 32) as u32, self.0 .0 as u32] {
            if len > 0 {
                buf[len] = b'/';
                len += 1;
            }
            let digits = (8 - half.leading_zeros() as usize / 4).max(1);
            for i in (0..digits).rev() {
                buf[len] = HEX[((half >> (4 * i)) & 0xF) as usize];
                len += 1;
            }
        }
        std::str::from_utf8(&buf[..len]).unwrap_or_default()
    }
}

impl Serialize for LsnText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(LsnText(self.0).encode(&mut [0; 17]))
    }
}

/// The transaction an event belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct TxInfo {
    /// The transaction id (`xid`) on the source.
    pub xid: u32,
    /// Where the transaction's commit record ends in the WAL.
    pub commit_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC.
    pub committed_at: i64,
    /// Place of the event among the events of the transaction this consumer receives.
    pub index: u32,
    /// Their number; absent when the transaction was too large to hold in memory.
    pub total: Option<u32>,
    /// Whether this is the transaction's last event this consumer receives.
    pub last: bool,
    /// JSON from `pg_logical_emit_message(true, 'waltap', ...)` in the transaction.
    pub annotations: Option<Arc<serde_json::Value>>,
}

impl Serialize for TxInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &self.xid)?;
        map.serialize_entry("commitLsn", &LsnText(self.commit_lsn))?;
        let mut buf = [0u8; time::RFC3339_LEN];
        match time::rfc3339_micros_into(self.committed_at, &mut buf) {
            Some(text) => map.serialize_entry("committedAt", text)?,
            None => map.serialize_entry("committedAt", &rfc3339_micros(self.committed_at))?,
        }
        map.serialize_entry("index", &self.index)?;
        if let Some(total) = self.total {
            map.serialize_entry("total", &total)?;
        }
        map.serialize_entry("last", &self.last)?;
        if let Some(a) = &self.annotations {
            map.serialize_entry("annotations", &**a)?;
        }
        map.end()
    }
}

/// One row change (or a truncate of one table).
///
/// `R` is the row type: [`Row`] (typed values by column) as delivered, or any serde type
/// after [`Event::into_typed`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event<R = Row> {
    /// ULID, the same for the same change on every delivery.
    pub id: ulid::Ulid,
    /// Where the change is in the source's history; what consumers acknowledge.
    pub position: Position,
    /// What happened to the row.
    pub action: Action,
    /// The table's schema.
    pub schema: Arc<str>,
    /// The table's name.
    pub table: Arc<str>,
    /// The table's replica identity: how much of the old row was sent.
    pub identity: Identity,
    /// `create`: the new row. `update`: the new row (`after`).
    pub new: Option<R>,
    /// `update`: the old row or key when sent (`before`). `delete`: the old row or key.
    pub old: Option<R>,
    /// `update` with a full before image: columns whose value differs.
    pub changed: Option<Vec<Arc<str>>>,
    /// `update`: TOASTed columns that did not change and could not be filled in.
    pub unchanged: Vec<Arc<str>>,
    /// Set by a subscription in transitions mode.
    pub transition: Option<Transition>,
    /// The transaction the change belongs to.
    pub tx: TxInfo,
    /// Set on the first event of a table after its columns changed (not serialized: the
    /// hub turns it into a `schemaChange` item for the table's subscribers).
    pub schema_change: Option<Arc<SchemaChange>>,
}

impl Event<Row> {
    /// The stable ULID for a change: its commit time in milliseconds, then the low 48 bits
    /// of the commit LSN and the ordinal, so it is unique, deterministic and time-sortable.
    pub fn make_id(committed_at: i64, position: Position) -> ulid::Ulid {
        let ms = time::unix_millis(committed_at) & ((1 << 48) - 1);
        let random = ((u128::from(position.commit_lsn.0) & ((1 << 48) - 1)) << 32)
            | u128::from(position.ordinal);
        ulid::Ulid::from_parts(ms, random)
    }

    /// The same event with its rows deserialized into `T` (through their JSON form, so `T`
    /// sees exactly the fields of the JSON event). Columns Postgres did not send are
    /// missing, so give such fields `#[serde(default)]` or make them `Option`.
    pub fn into_typed<T: serde::de::DeserializeOwned>(self) -> Result<Event<T>, serde_json::Error> {
        let new = self.new.as_ref().map(Row::to_typed).transpose()?;
        let old = self.old.as_ref().map(Row::to_typed).transpose()?;
        Ok(Event {
            id: self.id,
            position: self.position,
            action: self.action,
            schema: self.schema,
            table: self.table,
            identity: self.identity,
            new,
            old,
            changed: self.changed,
            unchanged: self.unchanged,
            transition: self.transition,
            tx: self.tx,
            schema_change: self.schema_change,
        })
    }
}

impl<R> Event<R> {
    /// The row for a create, the `after` row for an update.
    pub fn after(&self) -> Option<&R> {
        self.new.as_ref()
    }

    /// The `before` row of an update or the `deleted` row of a delete.
    pub fn before(&self) -> Option<&R> {
        self.old.as_ref()
    }

    /// `create`, `update`, `delete` or `truncate`.
    pub fn action_name(&self) -> &'static str {
        match self.action {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Truncate => "truncate",
        }
    }

    /// `schema.table`.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

impl<R: Serialize> Serialize for Event<R> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let mut id = [0u8; ulid::ULID_LEN];
        map.serialize_entry("id", &*self.id.array_to_str(&mut id))?;
        map.serialize_entry("position", &self.position)?;
        map.serialize_entry("action", &self.action)?;
        map.serialize_entry("schema", &*self.schema)?;
        map.serialize_entry("table", &*self.table)?;
        map.serialize_entry("identity", &self.identity)?;
        match self.action {
            Action::Create => map.serialize_entry("created", &self.new)?,
            Action::Update => {
                map.serialize_entry("before", &self.old)?;
                map.serialize_entry("after", &self.new)?;
                if let Some(changed) = &self.changed {
                    let names: Vec<&str> = changed.iter().map(|n| &**n).collect();
                    map.serialize_entry("changed", &names)?;
                }
                if !self.unchanged.is_empty() {
                    let names: Vec<&str> = self.unchanged.iter().map(|n| &**n).collect();
                    map.serialize_entry("unchanged", &names)?;
                }
            }
            Action::Delete => map.serialize_entry("deleted", &self.old)?,
            Action::Truncate => {}
        }
        if let Some(t) = self.transition {
            map.serialize_entry("transition", &t)?;
        }
        map.serialize_entry("tx", &self.tx)?;
        map.end()
    }
}

/// The JSON event as it is on the wire, for reading it back (event log, HTTP clients).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEvent<T> {
    id: String,
    position: Position,
    action: Action,
    schema: String,
    table: String,
    identity: Identity,
    created: Option<T>,
    before: Option<T>,
    after: Option<T>,
    deleted: Option<T>,
    changed: Option<Vec<String>>,
    #[serde(default)]
    unchanged: Vec<String>,
    transition: Option<Transition>,
    tx: WireTx,
    /// Only in the event log's stored form.
    #[serde(default)]
    schema_change: Option<shape::StoredChange>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTx {
    id: u32,
    commit_lsn: String,
    committed_at: String,
    index: u32,
    total: Option<u32>,
    last: bool,
    annotations: Option<serde_json::Value>,
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Event<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let w = WireEvent::<T>::deserialize(d)?;
        let id = w.id.parse::<ulid::Ulid>().map_err(D::Error::custom)?;
        let commit_lsn = w.tx.commit_lsn.parse::<Lsn>().map_err(D::Error::custom)?;
        let committed_at = time::parse_rfc3339_micros(&w.tx.committed_at)
            .ok_or_else(|| D::Error::custom("tx.committedAt is not an RFC 3339 UTC time"))?;
        let (new, old) = match w.action {
            Action::Create => (w.created, None),
            Action::Update => (w.after, w.before),
            Action::Delete => (None, w.deleted),
            Action::Truncate => (None, None),
        };
        let names = |v: Vec<String>| -> Vec<Arc<str>> { v.into_iter().map(Arc::from).collect() };
        let schema = Arc::from(w.schema);
        let table = Arc::from(w.table);
        let schema_change = w.schema_change.map(|c| c.into_change(&schema, &table));
        Ok(Event {
            id,
            position: w.position,
            action: w.action,
            schema,
            table,
            identity: w.identity,
            new,
            old,
            changed: w.changed.map(names),
            unchanged: names(w.unchanged),
            transition: w.transition,
            tx: TxInfo {
                xid: w.tx.id,
                commit_lsn,
                committed_at,
                index: w.tx.index,
                total: w.tx.total,
                last: w.tx.last,
                annotations: w.tx.annotations.map(Arc::new),
            },
            schema_change,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_matches_display() {
        for v in [
            0u64,
            1,
            0xF,
            0x10,
            0x16_B374_D848,
            0xFFFF_FFFF,
            1 << 32,
            u64::MAX,
        ] {
            let json = serde_json::to_string(&LsnText(Lsn(v))).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", Lsn(v)));
        }
    }
}
