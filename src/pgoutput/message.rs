//! The pgoutput messages, one struct per message kind, as they are on the wire.
//!
//! Field names follow the PostgreSQL "Logical Replication Message Formats" docs. Times are
//! microseconds since 2000-01-01 00:00:00 UTC (the Postgres epoch), as sent. Column values
//! are [`Bytes`] slices of the received buffer: decoding copies no row data.

use bytes::Bytes;

use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(Message),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(Prepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

impl LogicalMessage {
    /// The (sub)transaction xid that changes carry inside a stream block: `Some` only for
    /// Insert, Update, Delete, Truncate and Message decoded there.
    pub fn change_xid(&self) -> Option<u32> {
        match self {
            LogicalMessage::Insert(m) => m.xid,
            LogicalMessage::Update(m) => m.xid,
            LogicalMessage::Delete(m) => m.xid,
            LogicalMessage::Truncate(m) => m.xid,
            LogicalMessage::Message(m) => m.xid,
            _ => None,
        }
    }
}

/// `B`: start of a committed transaction (sent when it commits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record (equals the Commit's `commit_lsn`).
    pub final_lsn: Lsn,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is handled.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// `O`: the transaction came from another node through a replication origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `R`: the shape of a table, sent before its first change in a session and after changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Present only inside a streamed transaction (protocol v2+).
    pub xid: Option<u32>,
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// `relreplident` of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelationColumn {
    /// Whether the column is part of the key sent in `K` old tuples.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// `Y`: namespace and name of a non-built-in type used by a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub xid: Option<u32>,
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// `I`: a new row.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub new: TupleData,
}

/// `U`: a changed row. `old` is `K` (key columns only, others null) or `O` (whole row),
/// absent when the table's identity is DEFAULT and no key column changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

/// `D`: a removed row.
#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub old: OldTuple,
}

/// The old row of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// `K`: identity key columns; the other columns are sent as nulls and mean nothing.
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

/// `T`: tables truncated together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    /// Bit 1: CASCADE; bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relation_ids: Vec<u32>,
}

/// `M`: a message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// `S`: a chunk of an in-progress transaction starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

/// `c`: a streamed transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// `A`: a streamed transaction (`subxid == xid`) or one of its subtransactions aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// Sent only with `streaming 'parallel'` (protocol v4).
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<i64>,
}

/// `b`, `P` and `p`: two-phase begin/prepare (protocol v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Always 0 for `b`; the flags byte of `P`/`p`.
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// `K`: a prepared transaction committed (protocol v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// `r`: a prepared transaction rolled back (protocol v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: i64,
    pub rollback_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// A row as sent: one entry per column of the relation, in relation order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TupleData {
    pub columns: Vec<TupleColumn>,
}

/// One column value of a [`TupleData`].
#[derive(Debug, Clone, PartialEq)]
pub enum TupleColumn {
    /// `n`
    Null,
    /// `u`: an unchanged TOASTed value that was not sent (only in the new row of an update).
    UnchangedToast,
    /// `t`: the type's text output, in the session's client encoding (UTF-8).
    Text(Bytes),
    /// `b`: the type's binary send format.
    Binary(Bytes),
}
