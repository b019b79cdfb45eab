//! One function per message kind, each reading the fields in wire order.

use bytes::Bytes;

use super::reader::Reader;
use super::{
    Begin, Commit, CommitPrepared, DecodeError, Delete, Insert, LogicalMessage, Message, OldTuple,
    Origin, Prepare, Relation, RelationColumn, ReplicaIdentity, RollbackPrepared, StreamAbort,
    StreamCommit, StreamStart, Truncate, TupleColumn, TupleData, TypeInfo, Update,
};

/// Smallest encoding of a Relation column: flags, empty name (just the NUL), oid, typmod.
const MIN_RELATION_COLUMN: usize = 1 + 1 + 4 + 4;
/// Smallest encoding of a tuple column: the kind byte of `n` or `u`.
const MIN_TUPLE_COLUMN: usize = 1;

/// Display name and first protocol version of each top-level tag.
fn describe(tag: u8) -> Option<(&'static str, u32)> {
    Some(match tag {
        b'B' => ("Begin", 1),
        b'C' => ("Commit", 1),
        b'O' => ("Origin", 1),
        b'R' => ("Relation", 1),
        b'Y' => ("Type", 1),
        b'I' => ("Insert", 1),
        b'U' => ("Update", 1),
        b'D' => ("Delete", 1),
        b'T' => ("Truncate", 1),
        b'M' => ("Message", 1),
        b'S' => ("Stream Start", 2),
        b'E' => ("Stream Stop", 2),
        b'c' => ("Stream Commit", 2),
        b'A' => ("Stream Abort", 2),
        b'b' => ("Begin Prepare", 3),
        b'P' => ("Prepare", 3),
        b'K' => ("Commit Prepared", 3),
        b'r' => ("Rollback Prepared", 3),
        b'p' => ("Stream Prepare", 3),
        _ => return None,
    })
}

pub(super) fn message(
    buf: Bytes,
    protocol_version: u32,
    streaming_parallel: bool,
    in_stream: bool,
) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader::new(buf);
    let tag = r.u8("message tag")?;
    let (name, min_version) = describe(tag).ok_or(DecodeError::UnknownTag {
        context: "pgoutput message tag",
        tag,
    })?;
    if protocol_version < min_version {
        return Err(DecodeError::UnsupportedMessage {
            name,
            tag,
            min_version,
            protocol_version,
        });
    }
    let r = &mut r;
    let msg = match tag {
        b'B' => LogicalMessage::Begin(begin(r)?),
        b'C' => LogicalMessage::Commit(commit(r)?),
        b'O' => LogicalMessage::Origin(origin(r)?),
        b'R' => LogicalMessage::Relation(relation(r, in_stream)?),
        b'Y' => LogicalMessage::Type(type_info(r, in_stream)?),
        b'I' => LogicalMessage::Insert(insert(r, in_stream)?),
        b'U' => LogicalMessage::Update(update(r, in_stream)?),
        b'D' => LogicalMessage::Delete(delete(r, in_stream)?),
        b'T' => LogicalMessage::Truncate(truncate(r, in_stream)?),
        b'M' => LogicalMessage::Message(logical_message(r, in_stream)?),
        b'S' if in_stream => {
            return Err(DecodeError::UnexpectedStreamMessage { name, in_stream });
        }
        b'S' => LogicalMessage::StreamStart(stream_start(r)?),
        b'E' if !in_stream => {
            return Err(DecodeError::UnexpectedStreamMessage { name, in_stream });
        }
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit(stream_commit(r)?),
        b'A' => LogicalMessage::StreamAbort(stream_abort(r, streaming_parallel)?),
        b'b' => LogicalMessage::BeginPrepare(prepare(r, &BEGIN_PREPARE)?),
        b'P' => LogicalMessage::Prepare(prepare(r, &PREPARE)?),
        b'K' => LogicalMessage::CommitPrepared(commit_prepared(r)?),
        b'r' => LogicalMessage::RollbackPrepared(rollback_prepared(r)?),
        b'p' => LogicalMessage::StreamPrepare(prepare(r, &STREAM_PREPARE)?),
        _ => {
            return Err(DecodeError::UnknownTag {
                context: "pgoutput message tag",
                tag,
            })
        }
    };
    r.finish(name)?;
    Ok(msg)
}

/// The xid that data messages carry only inside a stream block.
fn stream_xid(
    r: &mut Reader,
    in_stream: bool,
    context: &'static str,
) -> Result<Option<u32>, DecodeError> {
    if in_stream {
        r.u32(context).map(Some)
    } else {
        Ok(None)
    }
}

fn begin(r: &mut Reader) -> Result<Begin, DecodeError> {
    Ok(Begin {
        final_lsn: r.lsn("Begin final_lsn")?,
        commit_time: r.i64("Begin commit_time")?,
        xid: r.u32("Begin xid")?,
    })
}

fn commit(r: &mut Reader) -> Result<Commit, DecodeError> {
    Ok(Commit {
        flags: r.u8("Commit flags")?,
        commit_lsn: r.lsn("Commit commit_lsn")?,
        end_lsn: r.lsn("Commit end_lsn")?,
        commit_time: r.i64("Commit commit_time")?,
    })
}

fn origin(r: &mut Reader) -> Result<Origin, DecodeError> {
    Ok(Origin {
        commit_lsn: r.lsn("Origin commit_lsn")?,
        name: r.string("Origin name")?,
    })
}

fn relation(r: &mut Reader, in_stream: bool) -> Result<Relation, DecodeError> {
    let xid = stream_xid(r, in_stream, "Relation xid")?;
    let id = r.u32("Relation id")?;
    let namespace = r.string("Relation namespace")?;
    let name = r.string("Relation name")?;
    let replica_identity = match r.u8("Relation replica_identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        tag => {
            return Err(DecodeError::UnknownTag {
                context: "Relation replica_identity",
                tag,
            })
        }
    };
    let ncols = r.len_i16("Relation column count")?;
    let mut columns = Vec::with_capacity(r.capacity_for(ncols, MIN_RELATION_COLUMN));
    for _ in 0..ncols {
        columns.push(RelationColumn {
            flags: r.u8("Relation column flags")?,
            name: r.string("Relation column name")?,
            type_oid: r.u32("Relation column type_oid")?,
            type_modifier: r.i32("Relation column type_modifier")?,
        });
    }
    Ok(Relation {
        xid,
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn type_info(r: &mut Reader, in_stream: bool) -> Result<TypeInfo, DecodeError> {
    Ok(TypeInfo {
        xid: stream_xid(r, in_stream, "Type xid")?,
        oid: r.u32("Type oid")?,
        namespace: r.string("Type namespace")?,
        name: r.string("Type name")?,
    })
}

fn tuple(r: &mut Reader) -> Result<TupleData, DecodeError> {
    let ncols = r.len_i16("TupleData column count")?;
    let mut columns = Vec::with_capacity(r.capacity_for(ncols, MIN_TUPLE_COLUMN));
    for _ in 0..ncols {
        let column = match r.u8("TupleData column kind")? {
            b'n' => TupleColumn::Null,
            b'u' => TupleColumn::UnchangedToast,
            b't' => {
                let len = r.len_i32("TupleData text value length")?;
                TupleColumn::Text(r.bytes(len, "TupleData text value")?)
            }
            b'b' => {
                let len = r.len_i32("TupleData binary value length")?;
                TupleColumn::Binary(r.bytes(len, "TupleData binary value")?)
            }
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "TupleData column kind",
                    tag,
                })
            }
        };
        columns.push(column);
    }
    Ok(TupleData { columns })
}

fn insert(r: &mut Reader, in_stream: bool) -> Result<Insert, DecodeError> {
    let xid = stream_xid(r, in_stream, "Insert xid")?;
    let relation_id = r.u32("Insert relation_id")?;
    match r.u8("Insert new tuple marker")? {
        b'N' => {}
        tag => {
            return Err(DecodeError::UnknownTag {
                context: "Insert new tuple marker",
                tag,
            })
        }
    }
    Ok(Insert {
        xid,
        relation_id,
        new: tuple(r)?,
    })
}

fn update(r: &mut Reader, in_stream: bool) -> Result<Update, DecodeError> {
    let xid = stream_xid(r, in_stream, "Update xid")?;
    let relation_id = r.u32("Update relation_id")?;
    let (old, marker) = match r.u8("Update tuple marker")? {
        b'K' => (
            Some(OldTuple::Key(tuple(r)?)),
            r.u8("Update new tuple marker")?,
        ),
        b'O' => (
            Some(OldTuple::Full(tuple(r)?)),
            r.u8("Update new tuple marker")?,
        ),
        other => (None, other),
    };
    if marker != b'N' {
        return Err(DecodeError::UnknownTag {
            context: if old.is_some() {
                "Update new tuple marker"
            } else {
                "Update tuple marker"
            },
            tag: marker,
        });
    }
    Ok(Update {
        xid,
        relation_id,
        old,
        new: tuple(r)?,
    })
}

fn delete(r: &mut Reader, in_stream: bool) -> Result<Delete, DecodeError> {
    let xid = stream_xid(r, in_stream, "Delete xid")?;
    let relation_id = r.u32("Delete relation_id")?;
    let old = match r.u8("Delete old tuple marker")? {
        b'K' => OldTuple::Key(tuple(r)?),
        b'O' => OldTuple::Full(tuple(r)?),
        tag => {
            return Err(DecodeError::UnknownTag {
                context: "Delete old tuple marker",
                tag,
            })
        }
    };
    Ok(Delete {
        xid,
        relation_id,
        old,
    })
}

fn truncate(r: &mut Reader, in_stream: bool) -> Result<Truncate, DecodeError> {
    let xid = stream_xid(r, in_stream, "Truncate xid")?;
    let nrels = r.len_i32("Truncate relation count")?;
    let options = r.u8("Truncate options")?;
    // The ids have a fixed size, so a lying count is caught before reserving anything.
    r.ensure(nrels.saturating_mul(4), "Truncate relation_ids")?;
    let mut relation_ids = Vec::with_capacity(nrels);
    for _ in 0..nrels {
        relation_ids.push(r.u32("Truncate relation_ids")?);
    }
    Ok(Truncate {
        xid,
        options,
        relation_ids,
    })
}

fn logical_message(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    let xid = stream_xid(r, in_stream, "Message xid")?;
    let flags = r.u8("Message flags")?;
    let lsn = r.lsn("Message lsn")?;
    let prefix = r.string("Message prefix")?;
    let len = r.len_i32("Message content length")?;
    Ok(Message {
        xid,
        transactional: flags & 1 != 0,
        lsn,
        prefix,
        content: r.bytes(len, "Message content")?,
    })
}

fn stream_start(r: &mut Reader) -> Result<StreamStart, DecodeError> {
    Ok(StreamStart {
        xid: r.u32("Stream Start xid")?,
        first_segment: r.u8("Stream Start first_segment")? != 0,
    })
}

fn stream_commit(r: &mut Reader) -> Result<StreamCommit, DecodeError> {
    Ok(StreamCommit {
        xid: r.u32("Stream Commit xid")?,
        flags: r.u8("Stream Commit flags")?,
        commit_lsn: r.lsn("Stream Commit commit_lsn")?,
        end_lsn: r.lsn("Stream Commit end_lsn")?,
        commit_time: r.i64("Stream Commit commit_time")?,
    })
}

fn stream_abort(r: &mut Reader, streaming_parallel: bool) -> Result<StreamAbort, DecodeError> {
    let xid = r.u32("Stream Abort xid")?;
    let subxid = r.u32("Stream Abort subxid")?;
    let (abort_lsn, abort_time) = if streaming_parallel {
        (
            Some(r.lsn("Stream Abort abort_lsn")?),
            Some(r.i64("Stream Abort abort_time")?),
        )
    } else {
        (None, None)
    };
    Ok(StreamAbort {
        xid,
        subxid,
        abort_lsn,
        abort_time,
    })
}

/// Field names for error contexts of the three messages that share the Prepare layout.
struct PrepareFields {
    flags: Option<&'static str>,
    prepare_lsn: &'static str,
    end_lsn: &'static str,
    prepare_time: &'static str,
    xid: &'static str,
    gid: &'static str,
}

/// `b` has no flags byte; its struct gets `flags: 0`.
const BEGIN_PREPARE: PrepareFields = PrepareFields {
    flags: None,
    prepare_lsn: "Begin Prepare prepare_lsn",
    end_lsn: "Begin Prepare end_lsn",
    prepare_time: "Begin Prepare prepare_time",
    xid: "Begin Prepare xid",
    gid: "Begin Prepare gid",
};

const PREPARE: PrepareFields = PrepareFields {
    flags: Some("Prepare flags"),
    prepare_lsn: "Prepare prepare_lsn",
    end_lsn: "Prepare end_lsn",
    prepare_time: "Prepare prepare_time",
    xid: "Prepare xid",
    gid: "Prepare gid",
};

const STREAM_PREPARE: PrepareFields = PrepareFields {
    flags: Some("Stream Prepare flags"),
    prepare_lsn: "Stream Prepare prepare_lsn",
    end_lsn: "Stream Prepare end_lsn",
    prepare_time: "Stream Prepare prepare_time",
    xid: "Stream Prepare xid",
    gid: "Stream Prepare gid",
};

fn prepare(r: &mut Reader, f: &PrepareFields) -> Result<Prepare, DecodeError> {
    Ok(Prepare {
        flags: match f.flags {
            Some(context) => r.u8(context)?,
            None => 0,
        },
        prepare_lsn: r.lsn(f.prepare_lsn)?,
        end_lsn: r.lsn(f.end_lsn)?,
        prepare_time: r.i64(f.prepare_time)?,
        xid: r.u32(f.xid)?,
        gid: r.string(f.gid)?,
    })
}

fn commit_prepared(r: &mut Reader) -> Result<CommitPrepared, DecodeError> {
    Ok(CommitPrepared {
        flags: r.u8("Commit Prepared flags")?,
        commit_lsn: r.lsn("Commit Prepared commit_lsn")?,
        end_lsn: r.lsn("Commit Prepared end_lsn")?,
        commit_time: r.i64("Commit Prepared commit_time")?,
        xid: r.u32("Commit Prepared xid")?,
        gid: r.string("Commit Prepared gid")?,
    })
}

fn rollback_prepared(r: &mut Reader) -> Result<RollbackPrepared, DecodeError> {
    Ok(RollbackPrepared {
        flags: r.u8("Rollback Prepared flags")?,
        prepare_end_lsn: r.lsn("Rollback Prepared prepare_end_lsn")?,
        rollback_end_lsn: r.lsn("Rollback Prepared rollback_end_lsn")?,
        prepare_time: r.i64("Rollback Prepared prepare_time")?,
        rollback_time: r.i64("Rollback Prepared rollback_time")?,
        xid: r.u32("Rollback Prepared xid")?,
        gid: r.string("Rollback Prepared gid")?,
    })
}
