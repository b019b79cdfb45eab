//! From pgoutput messages to events: relation cache, typing, transaction bookkeeping.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Action, Event, Identity, Position, Row, TxInfo};
use crate::lsn::{Lsn, Watermark};
use crate::pgoutput::{
    LogicalMessage, OldTuple, Relation, ReplicaIdentity, TupleColumn, TupleData,
};
use crate::value::{decode_text, TypeKind, Value, ValueError};

/// `schema.table`, as users name tables on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// The schema (`public` when the user gave none).
    pub schema: String,
    /// The table's name within the schema.
    pub table: String,
}

impl TableName {
    /// `table` (schema `public`) or `schema.table`; double quotes keep dots and case.
    pub fn parse(s: &str) -> TableName {
        let parts = split_qualified(s);
        match parts.as_slice() {
            [schema, table] => TableName {
                schema: schema.clone(),
                table: table.clone(),
            },
            _ => TableName {
                schema: "public".into(),
                table: parts.concat(),
            },
        }
    }
}

impl TableName {
    /// As [`TableName::parse`], but refuses text that does not name exactly one table
    /// unambiguously: an empty part, more than two parts, or an unbalanced quote.
    pub fn parse_strict(s: &str) -> Result<TableName, String> {
        let balanced = s.chars().filter(|&c| c == '"').count() % 2 == 0;
        let parts = split_qualified(s);
        if !balanced || parts.len() > 2 || parts.iter().any(String::is_empty) {
            return Err(format!(
                "{s:?} is not a table name: use `table` or `schema.table`, double-quoting a part that holds a dot or a quote (`\"a.b\"`, `\"say \"\"hi\"\"\"`)"
            ));
        }
        Ok(TableName::parse(s))
    }
}

/// `schema.table`, a part double-quoted when it holds a dot or a quote, so that
/// [`TableName::parse`] reads back the same table.
impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn part(f: &mut std::fmt::Formatter<'_>, s: &str) -> std::fmt::Result {
            if s.contains(['.', '"']) {
                write!(f, "\"{}\"", s.replace('"', "\"\""))
            } else {
                f.write_str(s)
            }
        }
        part(f, &self.schema)?;
        f.write_str(".")?;
        part(f, &self.table)
    }
}

fn split_qualified(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push('"');
                }
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            c => {
                if let Some(p) = parts.last_mut() {
                    p.push(c);
                }
            }
        }
    }
    parts
}

/// A relation as the stream last described it.
#[derive(Debug, Clone)]
pub struct RelationInfo {
    pub schema: Arc<str>,
    pub table: Arc<str>,
    pub identity: Identity,
    pub names: Arc<[Arc<str>]>,
    pub kinds: Vec<TypeKind>,
    pub type_oids: Vec<u32>,
    pub key: Vec<bool>,
}

/// A message could not be turned into events. Every variant is definite: the stream is
/// not what Postgres promises, so going on could skip or invent changes.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("{table}: row has {got} columns but the relation has {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    #[error("{table}.{column} (type oid {type_oid})")]
    Value {
        table: String,
        column: String,
        type_oid: u32,
        #[source]
        source: ValueError,
    },
    #[error("{table}.{column}: binary value received, but binary mode was not requested")]
    BinaryValue { table: String, column: String },
    #[error("{table}.{column}: unchanged-TOAST marker outside the new row of an update")]
    UnexpectedToast { table: String, column: String },
    #[error("type oid {0} was not resolved before its relation arrived")]
    UnresolvedType(u32),
    #[error("{0} outside a transaction")]
    NoTransaction(&'static str),
    #[error("Begin inside an open transaction (xid {0})")]
    NestedBegin(u32),
    #[error("Commit LSN {commit} does not match the Begin's final LSN {begin}")]
    CommitMismatch { begin: Lsn, commit: Lsn },
    #[error("transaction has more than 2^32 changes")]
    TooManyChanges,
    #[error("{0} message received, but that mode was not requested")]
    Unsupported(&'static str),
}

/// What the assembler hands downstream, in stream order.
// Nearly every item is an Event; boxing it would cost an allocation per event to shrink
// the rare Commit.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Event(Event),
    /// The transaction is complete; confirming `end_lsn` covers all of it.
    Commit {
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        /// Events of the transaction handed out (after the table filter).
        events: u32,
    },
    /// A snapshot's watermark (see [`WATERMARK_PREFIX`]): every transaction whose commit
    /// LSN is below it has been handed out, none at or above it.
    Watermark(Watermark),
}

/// Prefix of the non-transactional `pg_logical_emit_message` that an initial-state
/// snapshot writes right after taking its snapshot. Logical decoding outputs such a
/// message in WAL order with the commits, so when it arrives every transaction that
/// committed before it has arrived too: the point where a snapshot and the change stream
/// can be matched up.
pub const WATERMARK_PREFIX: &str = "waltap.watermark";

/// Assembler settings.
#[derive(Debug, Clone)]
pub struct AssemblerOptions {
    /// Events of one transaction held back to learn `tx.total`; past this they are handed
    /// out without it, so memory does not grow with the transaction.
    pub max_buffered_events: usize,
    /// Only these tables produce events (None: all published tables).
    pub tables: Option<HashSet<TableName>>,
    /// `pg_logical_emit_message` prefix whose JSON becomes `tx.annotations`.
    pub annotation_prefix: String,
    /// Schemas whose changes are never events: waltap's own `waltap` schema, so that the
    /// event log can never feed itself even if a publication includes it.
    pub excluded_schemas: Vec<String>,
}

impl Default for AssemblerOptions {
    fn default() -> Self {
        AssemblerOptions {
            max_buffered_events: 10_000,
            tables: None,
            annotation_prefix: "waltap".into(),
            excluded_schemas: vec!["waltap".into()],
        }
    }
}

struct OpenTx {
    xid: u32,
    commit_lsn: Lsn,
    committed_at: i64,
    next_ordinal: u32,
    next_index: u32,
    overflowed: bool,
    buffer: Vec<Event>,
    annotations: Option<Arc<serde_json::Value>>,
}

/// Turns the message sequence of one replication session into events.
pub struct Assembler {
    options: AssemblerOptions,
    relations: HashMap<u32, Arc<RelationInfo>>,
    /// Relations whose columns changed, until their next event carries the change.
    reshaped: HashMap<u32, Arc<super::SchemaChange>>,
    types: HashMap<u32, TypeKind>,
    tx: Option<OpenTx>,
}

impl Assembler {
    pub fn new(options: AssemblerOptions) -> Self {
        Assembler {
            options,
            relations: HashMap::new(),
            reshaped: HashMap::new(),
            types: HashMap::new(),
            tx: None,
        }
    }

    /// Forgets the session: relations are re-sent and open transactions replayed after a
    /// reconnect. Resolved types are kept (a type OID never changes meaning).
    pub fn reset(&mut self) {
        self.relations.clear();
        self.reshaped.clear();
        self.tx = None;
    }

    /// Whether a transaction is open (Begin seen, Commit not yet).
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Column type OIDs of `rel` that need a catalog look-up before [`Self::handle`].
    pub fn unresolved_types(&self, rel: &Relation) -> Vec<u32> {
        let mut out: Vec<u32> = rel
            .columns
            .iter()
            .map(|c| c.type_oid)
            .filter(|oid| TypeKind::builtin(*oid).is_none() && !self.types.contains_key(oid))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Records how a non-built-in type maps to JSON (domain base, enum, user array...).
    pub fn register_type(&mut self, oid: u32, kind: TypeKind) {
        self.types.insert(oid, kind);
    }

    /// The cached relation with this OID.
    #[cfg(test)]
    pub fn relation(&self, id: u32) -> Option<&Arc<RelationInfo>> {
        self.relations.get(&id)
    }

    fn kind_of(&self, oid: u32) -> Option<TypeKind> {
        TypeKind::builtin(oid).or_else(|| self.types.get(&oid).cloned())
    }

    /// Feeds one message; completed events and commits are appended to `out`.
    pub fn handle(&mut self, msg: LogicalMessage, out: &mut Vec<Output>) -> Result<(), EventError> {
        match msg {
            LogicalMessage::Begin(b) => {
                if let Some(tx) = &self.tx {
                    return Err(EventError::NestedBegin(tx.xid));
                }
                self.tx = Some(OpenTx {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    committed_at: b.commit_time,
                    next_ordinal: 0,
                    next_index: 0,
                    overflowed: false,
                    buffer: Vec::new(),
                    annotations: None,
                });
            }
            LogicalMessage::Commit(c) => {
                let mut tx = self.tx.take().ok_or(EventError::NoTransaction("Commit"))?;
                if tx.commit_lsn != c.commit_lsn {
                    return Err(EventError::CommitMismatch {
                        begin: tx.commit_lsn,
                        commit: c.commit_lsn,
                    });
                }
                let total = (!tx.overflowed).then_some(tx.next_index);
                if let Some(last) = tx.buffer.last_mut() {
                    last.tx.last = true;
                }
                for mut ev in tx.buffer.drain(..) {
                    ev.tx.total = total;
                    ev.tx.annotations.clone_from(&tx.annotations);
                    out.push(Output::Event(ev));
                }
                out.push(Output::Commit {
                    xid: tx.xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    events: tx.next_index,
                });
            }
            LogicalMessage::Relation(r) => {
                let info = self.relation_info(&r)?;
                let change = self
                    .relations
                    .get(&r.id)
                    .and_then(|old| super::SchemaChange::between(old, &info));
                if let Some(change) = change {
                    // A change not yet announced is replaced: the columns of the next event
                    // are what counts, and `previous` stays the shape consumers last saw.
                    let change = match self.reshaped.remove(&r.id) {
                        Some(pending) => Arc::new(super::SchemaChange {
                            previous: pending.previous.clone(),
                            ..(*change).clone()
                        }),
                        None => change,
                    };
                    self.reshaped.insert(r.id, change);
                }
                self.relations.insert(r.id, Arc::new(info));
            }
            LogicalMessage::Insert(i) => {
                let rel = self.rel(i.relation_id)?;
                let ev = |tx: &OpenTx, pos| -> Result<Event, EventError> {
                    let (new, _) = build_row(&rel, &i.new, None)?;
                    Ok(new_event(tx, &rel, pos, Action::Create, Some(new), None))
                };
                self.push_change(i.relation_id, &rel, ev, out)?;
            }
            LogicalMessage::Update(u) => {
                let rel = self.rel(u.relation_id)?;
                let ev = |tx: &OpenTx, pos| -> Result<Event, EventError> {
                    let (old, full_before) = match &u.old {
                        None => (None, false),
                        Some(OldTuple::Key(t)) => (Some(build_key_row(&rel, t)?), false),
                        Some(OldTuple::Full(t)) => (Some(build_row(&rel, t, None)?.0), true),
                    };
                    // A key-only old row still fills an unchanged TOASTed key column.
                    let fill = old.as_ref();
                    let (new, unchanged) = build_row(&rel, &u.new, Some(fill))?;
                    let changed = full_before.then(|| changed_columns(&rel, old.as_ref(), &new));
                    let mut ev = new_event(tx, &rel, pos, Action::Update, Some(new), old);
                    ev.changed = changed;
                    ev.unchanged = unchanged;
                    Ok(ev)
                };
                self.push_change(u.relation_id, &rel, ev, out)?;
            }
            LogicalMessage::Delete(d) => {
                let rel = self.rel(d.relation_id)?;
                let ev = |tx: &OpenTx, pos| -> Result<Event, EventError> {
                    let old = match &d.old {
                        OldTuple::Key(t) => build_key_row(&rel, t)?,
                        OldTuple::Full(t) => build_row(&rel, t, None)?.0,
                    };
                    Ok(new_event(tx, &rel, pos, Action::Delete, None, Some(old)))
                };
                self.push_change(d.relation_id, &rel, ev, out)?;
            }
            LogicalMessage::Truncate(t) => {
                for id in t.relation_ids {
                    let rel = self.rel(id)?;
                    let ev = |tx: &OpenTx, pos| -> Result<Event, EventError> {
                        Ok(new_event(tx, &rel, pos, Action::Truncate, None, None))
                    };
                    self.push_change(id, &rel, ev, out)?;
                }
            }
            LogicalMessage::Message(m) => {
                if !m.transactional && m.prefix == WATERMARK_PREFIX {
                    out.push(Output::Watermark(Watermark::at(m.lsn)));
                } else if m.transactional && m.prefix == self.options.annotation_prefix {
                    let tx = self
                        .tx
                        .as_mut()
                        .ok_or(EventError::NoTransaction("Message"))?;
                    let value = match serde_json::from_slice::<serde_json::Value>(&m.content) {
                        Ok(v) => v,
                        Err(e) => {
                            // The application's annotation is malformed; keep its text rather
                            // than drop it, so the problem is visible downstream.
                            tracing::warn!(xid = tx.xid, error = %e, "annotation is not JSON");
                            serde_json::Value::String(String::from_utf8_lossy(&m.content).into())
                        }
                    };
                    tx.annotations = Some(Arc::new(merge_annotations(
                        tx.annotations.as_deref(),
                        value,
                    )));
                }
            }
            // Type messages only name the type; its JSON mapping comes from the catalog.
            LogicalMessage::Type(_) | LogicalMessage::Origin(_) => {}
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => return Err(EventError::Unsupported("streaming")),
            LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_)
            | LogicalMessage::StreamPrepare(_) => return Err(EventError::Unsupported("two-phase")),
        }
        Ok(())
    }

    fn rel(&self, id: u32) -> Result<Arc<RelationInfo>, EventError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or(EventError::UnknownRelation(id))
    }

    fn relation_info(&self, r: &Relation) -> Result<RelationInfo, EventError> {
        let kinds = r
            .columns
            .iter()
            .map(|c| {
                self.kind_of(c.type_oid)
                    .ok_or(EventError::UnresolvedType(c.type_oid))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RelationInfo {
            schema: Arc::from(if r.namespace.is_empty() {
                "pg_catalog"
            } else {
                r.namespace.as_str()
            }),
            table: Arc::from(r.name.as_str()),
            identity: match r.replica_identity {
                ReplicaIdentity::Default => Identity::Default,
                ReplicaIdentity::Full => Identity::Full,
                ReplicaIdentity::Index => Identity::Index,
                ReplicaIdentity::Nothing => Identity::Nothing,
            },
            names: r
                .columns
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            kinds,
            type_oids: r.columns.iter().map(|c| c.type_oid).collect(),
            key: r.columns.iter().map(|c| c.is_key()).collect(),
        })
    }

    fn wanted(&self, rel: &RelationInfo) -> bool {
        if self
            .options
            .excluded_schemas
            .iter()
            .any(|s| **s == *rel.schema)
        {
            return false;
        }
        match &self.options.tables {
            None => true,
            Some(set) => set.contains(&TableName {
                schema: rel.schema.to_string(),
                table: rel.table.to_string(),
            }),
        }
    }

    /// Gives the change its ordinal (counted over all changes, so positions do not depend
    /// on the table filter), builds it if wanted, and buffers or hands it out.
    fn push_change(
        &mut self,
        relation_id: u32,
        rel: &RelationInfo,
        build: impl FnOnce(&OpenTx, Position) -> Result<Event, EventError>,
        out: &mut Vec<Output>,
    ) -> Result<(), EventError> {
        let wanted = self.wanted(rel);
        let max = self.options.max_buffered_events.max(1);
        let tx = self
            .tx
            .as_mut()
            .ok_or(EventError::NoTransaction("row change"))?;
        let ordinal = tx.next_ordinal;
        tx.next_ordinal = ordinal.checked_add(1).ok_or(EventError::TooManyChanges)?;
        if !wanted {
            return Ok(());
        }
        let mut ev = build(tx, Position::new(tx.commit_lsn, ordinal))?;
        ev.schema_change = self.reshaped.remove(&relation_id);
        tx.next_index += 1;
        tx.buffer.push(ev);
        if tx.buffer.len() > max {
            // Keep the newest event back: only the Commit tells whether it is the last.
            tx.overflowed = true;
            let keep = tx.buffer.pop();
            for mut ev in tx.buffer.drain(..) {
                ev.tx.annotations.clone_from(&tx.annotations);
                out.push(Output::Event(ev));
            }
            tx.buffer.extend(keep);
        }
        Ok(())
    }
}

fn new_event(
    tx: &OpenTx,
    rel: &RelationInfo,
    position: Position,
    action: Action,
    new: Option<Row>,
    old: Option<Row>,
) -> Event {
    Event {
        id: Event::make_id(tx.committed_at, position),
        position,
        action,
        schema: rel.schema.clone(),
        table: rel.table.clone(),
        identity: rel.identity,
        new,
        old,
        changed: None,
        unchanged: Vec::new(),
        transition: None,
        tx: TxInfo {
            xid: tx.xid,
            commit_lsn: tx.commit_lsn,
            committed_at: tx.committed_at,
            index: tx.next_index,
            total: None,
            last: false,
            annotations: None,
        },
        schema_change: None,
    }
}

fn check_width(rel: &RelationInfo, t: &TupleData) -> Result<(), EventError> {
    if t.columns.len() != rel.names.len() {
        return Err(EventError::ColumnCount {
            table: format!("{}.{}", rel.schema, rel.table),
            expected: rel.names.len(),
            got: t.columns.len(),
        });
    }
    Ok(())
}

fn decode_column(rel: &RelationInfo, i: usize, col: &TupleColumn) -> Result<Value, EventError> {
    match col {
        TupleColumn::Null => Ok(Value::Null),
        TupleColumn::Text(b) => {
            decode_text(&rel.kinds[i], b.clone()).map_err(|source| EventError::Value {
                table: format!("{}.{}", rel.schema, rel.table),
                column: rel.names[i].to_string(),
                type_oid: rel.type_oids[i],
                source,
            })
        }
        TupleColumn::Binary(_) => Err(EventError::BinaryValue {
            table: format!("{}.{}", rel.schema, rel.table),
            column: rel.names[i].to_string(),
        }),
        TupleColumn::UnchangedToast => Err(EventError::UnexpectedToast {
            table: format!("{}.{}", rel.schema, rel.table),
            column: rel.names[i].to_string(),
        }),
    }
}

/// Builds a whole row. With `fill = Some(before)` (the new row of an update), unchanged
/// TOAST columns are taken from the full before image when there is one, otherwise left
/// out and reported by name.
fn build_row(
    rel: &RelationInfo,
    t: &TupleData,
    fill: Option<Option<&Row>>,
) -> Result<(Row, Vec<Arc<str>>), EventError> {
    check_width(rel, t)?;
    let mut values = Vec::with_capacity(t.columns.len());
    let mut unchanged = Vec::new();
    for (i, col) in t.columns.iter().enumerate() {
        match (col, fill) {
            (TupleColumn::UnchangedToast, Some(before)) => {
                match before.and_then(|b| b.values.get(i).cloned().flatten()) {
                    Some(v) => values.push(Some(v)),
                    None => {
                        unchanged.push(rel.names[i].clone());
                        values.push(None);
                    }
                }
            }
            _ => values.push(Some(decode_column(rel, i, col)?)),
        }
    }
    Ok((
        Row {
            names: rel.names.clone(),
            values,
        },
        unchanged,
    ))
}

/// A `K` tuple is full width with nulls in the non-key columns; those nulls mean "not
/// sent", so only key columns are kept.
fn build_key_row(rel: &RelationInfo, t: &TupleData) -> Result<Row, EventError> {
    check_width(rel, t)?;
    let mut values = Vec::with_capacity(t.columns.len());
    for (i, col) in t.columns.iter().enumerate() {
        values.push(if rel.key[i] {
            Some(decode_column(rel, i, col)?)
        } else {
            None
        });
    }
    Ok(Row {
        names: rel.names.clone(),
        values,
    })
}

fn changed_columns(rel: &RelationInfo, before: Option<&Row>, after: &Row) -> Vec<Arc<str>> {
    let Some(before) = before else {
        return Vec::new();
    };
    rel.names
        .iter()
        .zip(before.values.iter().zip(&after.values))
        .filter(|(_, (b, a))| match (b, a) {
            (Some(b), Some(a)) => !b.same(a),
            (b, a) => b != a,
        })
        .map(|(n, _)| n.clone())
        .collect()
}

/// Several annotation messages in one transaction: objects merge (later keys win), any
/// other JSON replaces what was there.
fn merge_annotations(
    prev: Option<&serde_json::Value>,
    next: serde_json::Value,
) -> serde_json::Value {
    match (prev, next) {
        (Some(serde_json::Value::Object(a)), serde_json::Value::Object(b)) => {
            let mut merged = a.clone();
            merged.extend(b);
            serde_json::Value::Object(merged)
        }
        (_, next) => next,
    }
}

#[cfg(test)]
mod tests;
