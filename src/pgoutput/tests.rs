#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::lsn::Lsn;

// ---------------------------------------------------------------------------------------
// Test-only encoder
// ---------------------------------------------------------------------------------------

/// Builds wire bytes field by field, big-endian, the way the server writes them.
struct Enc(Vec<u8>);

impl Enc {
    fn tag(tag: u8) -> Self {
        Enc(vec![tag])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn lsn(mut self, v: Lsn) -> Self {
        self.0.extend_from_slice(&v.0.to_be_bytes());
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    fn str(self, s: &str) -> Self {
        self.raw(s.as_bytes()).u8(0)
    }
    fn opt_u32(self, v: Option<u32>) -> Self {
        match v {
            Some(v) => self.u32(v),
            None => self,
        }
    }
    fn tuple(self, t: &TupleData) -> Self {
        let mut e = self.i16(t.columns.len().try_into().unwrap());
        for c in &t.columns {
            e = match c {
                TupleColumn::Null => e.u8(b'n'),
                TupleColumn::UnchangedToast => e.u8(b'u'),
                TupleColumn::Text(b) => e.u8(b't').i32(b.len().try_into().unwrap()).raw(b),
                TupleColumn::Binary(b) => e.u8(b'b').i32(b.len().try_into().unwrap()).raw(b),
            };
        }
        e
    }
    fn old(self, o: &OldTuple) -> Self {
        match o {
            OldTuple::Key(t) => self.u8(b'K').tuple(t),
            OldTuple::Full(t) => self.u8(b'O').tuple(t),
        }
    }
    fn prepare(self, p: &Prepare) -> Self {
        self.lsn(p.prepare_lsn)
            .lsn(p.end_lsn)
            .i64(p.prepare_time)
            .u32(p.xid)
            .str(&p.gid)
    }
    fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// Encodes a message; optional fields (stream xid, parallel abort info) are written when
/// present, so the caller must pick values matching the decoder's state.
fn encode(msg: &LogicalMessage) -> Bytes {
    use LogicalMessage as L;
    match msg {
        L::Begin(m) => Enc::tag(b'B')
            .lsn(m.final_lsn)
            .i64(m.commit_time)
            .u32(m.xid),
        L::Commit(m) => Enc::tag(b'C')
            .u8(m.flags)
            .lsn(m.commit_lsn)
            .lsn(m.end_lsn)
            .i64(m.commit_time),
        L::Origin(m) => Enc::tag(b'O').lsn(m.commit_lsn).str(&m.name),
        L::Relation(m) => {
            let mut e = Enc::tag(b'R')
                .opt_u32(m.xid)
                .u32(m.id)
                .str(&m.namespace)
                .str(&m.name)
                .u8(match m.replica_identity {
                    ReplicaIdentity::Default => b'd',
                    ReplicaIdentity::Nothing => b'n',
                    ReplicaIdentity::Full => b'f',
                    ReplicaIdentity::Index => b'i',
                })
                .i16(m.columns.len().try_into().unwrap());
            for c in &m.columns {
                e = e
                    .u8(c.flags)
                    .str(&c.name)
                    .u32(c.type_oid)
                    .i32(c.type_modifier);
            }
            e
        }
        L::Type(m) => Enc::tag(b'Y')
            .opt_u32(m.xid)
            .u32(m.oid)
            .str(&m.namespace)
            .str(&m.name),
        L::Insert(m) => Enc::tag(b'I')
            .opt_u32(m.xid)
            .u32(m.relation_id)
            .u8(b'N')
            .tuple(&m.new),
        L::Update(m) => {
            let e = Enc::tag(b'U').opt_u32(m.xid).u32(m.relation_id);
            let e = match &m.old {
                Some(o) => e.old(o),
                None => e,
            };
            e.u8(b'N').tuple(&m.new)
        }
        L::Delete(m) => Enc::tag(b'D').opt_u32(m.xid).u32(m.relation_id).old(&m.old),
        L::Truncate(m) => {
            let mut e = Enc::tag(b'T')
                .opt_u32(m.xid)
                .i32(m.relation_ids.len().try_into().unwrap())
                .u8(m.options);
            for id in &m.relation_ids {
                e = e.u32(*id);
            }
            e
        }
        L::Message(m) => Enc::tag(b'M')
            .opt_u32(m.xid)
            .u8(u8::from(m.transactional))
            .lsn(m.lsn)
            .str(&m.prefix)
            .i32(m.content.len().try_into().unwrap())
            .raw(&m.content),
        L::StreamStart(m) => Enc::tag(b'S').u32(m.xid).u8(u8::from(m.first_segment)),
        L::StreamStop => Enc::tag(b'E'),
        L::StreamCommit(m) => Enc::tag(b'c')
            .u32(m.xid)
            .u8(m.flags)
            .lsn(m.commit_lsn)
            .lsn(m.end_lsn)
            .i64(m.commit_time),
        L::StreamAbort(m) => {
            let e = Enc::tag(b'A').u32(m.xid).u32(m.subxid);
            let e = match m.abort_lsn {
                Some(l) => e.lsn(l),
                None => e,
            };
            match m.abort_time {
                Some(t) => e.i64(t),
                None => e,
            }
        }
        L::BeginPrepare(p) => {
            assert_eq!(p.flags, 0, "Begin Prepare has no flags on the wire");
            Enc::tag(b'b').prepare(p)
        }
        L::Prepare(p) => Enc::tag(b'P').u8(p.flags).prepare(p),
        L::StreamPrepare(p) => Enc::tag(b'p').u8(p.flags).prepare(p),
        L::CommitPrepared(m) => Enc::tag(b'K')
            .u8(m.flags)
            .lsn(m.commit_lsn)
            .lsn(m.end_lsn)
            .i64(m.commit_time)
            .u32(m.xid)
            .str(&m.gid),
        L::RollbackPrepared(m) => Enc::tag(b'r')
            .u8(m.flags)
            .lsn(m.prepare_end_lsn)
            .lsn(m.rollback_end_lsn)
            .i64(m.prepare_time)
            .i64(m.rollback_time)
            .u32(m.xid)
            .str(&m.gid),
    }
    .bytes()
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn stream_start_bytes() -> Bytes {
    Enc::tag(b'S').u32(700).u8(1).bytes()
}

/// A decoder in the given state; entering a stream goes through a real Stream Start.
fn decoder(version: u32, parallel: bool, in_stream: bool) -> Decoder {
    let mut d = Decoder::new(version, parallel);
    if in_stream {
        d.decode(stream_start_bytes()).unwrap();
        assert!(d.in_stream());
    }
    d
}

fn dec(bytes: Bytes) -> Result<LogicalMessage, DecodeError> {
    Decoder::new(1, false).decode(bytes)
}

fn dec_v4_stream(bytes: Bytes) -> Result<LogicalMessage, DecodeError> {
    decoder(4, false, true).decode(bytes)
}

fn text(s: &str) -> TupleColumn {
    TupleColumn::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn bin(b: &[u8]) -> TupleColumn {
    TupleColumn::Binary(Bytes::copy_from_slice(b))
}

fn mixed_tuple() -> TupleData {
    TupleData {
        columns: vec![
            text("42"),
            TupleColumn::Null,
            TupleColumn::UnchangedToast,
            bin(&[0, 1, 2, 0xff]),
            text(""),
        ],
    }
}

/// Hand-built bytes for [`mixed_tuple`].
fn mixed_tuple_wire(e: Enc) -> Enc {
    e.i16(5)
        .u8(b't')
        .i32(2)
        .raw(b"42")
        .u8(b'n')
        .u8(b'u')
        .u8(b'b')
        .i32(4)
        .raw(&[0, 1, 2, 0xff])
        .u8(b't')
        .i32(0)
}

const LSN_A: Lsn = Lsn(0x16_B374_D848);
const LSN_B: Lsn = Lsn(0x16_B374_D900);

// ---------------------------------------------------------------------------------------
// One test per message kind, from hand-built bytes
// ---------------------------------------------------------------------------------------

#[test]
fn begin() {
    let b = Enc::tag(b'B').lsn(LSN_A).i64(-5).u32(0xdead_beef).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Begin(Begin {
            final_lsn: LSN_A,
            commit_time: -5,
            xid: 0xdead_beef,
        })
    );
}

#[test]
fn commit() {
    let b = Enc::tag(b'C').u8(0).lsn(LSN_A).lsn(LSN_B).i64(7).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: LSN_A,
            end_lsn: LSN_B,
            commit_time: 7,
        })
    );
}

#[test]
fn origin() {
    let b = Enc::tag(b'O').lsn(LSN_A).str("node_é").bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Origin(Origin {
            commit_lsn: LSN_A,
            name: "node_é".into(),
        })
    );
}

#[test]
fn relation_with_several_columns() {
    let b = Enc::tag(b'R')
        .u32(16384)
        .str("")
        .str("users")
        .u8(b'i')
        .i16(3)
        .u8(1)
        .str("id")
        .u32(20)
        .i32(-1)
        .u8(0)
        .str("name")
        .u32(1043)
        .i32(68)
        .u8(0)
        .str("")
        .u32(3802)
        .i32(-1)
        .bytes();
    let LogicalMessage::Relation(r) = dec(b).unwrap() else {
        panic!("not a relation")
    };
    assert_eq!(
        r,
        Relation {
            xid: None,
            id: 16384,
            namespace: String::new(),
            name: "users".into(),
            replica_identity: ReplicaIdentity::Index,
            columns: vec![
                RelationColumn {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "name".into(),
                    type_oid: 1043,
                    type_modifier: 68,
                },
                RelationColumn {
                    flags: 0,
                    name: String::new(),
                    type_oid: 3802,
                    type_modifier: -1,
                },
            ],
        }
    );
    assert!(r.columns[0].is_key());
    assert!(!r.columns[1].is_key());
}

#[test]
fn relation_replica_identities() {
    for (byte, ri) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let b = Enc::tag(b'R')
            .u32(1)
            .str("public")
            .str("t")
            .u8(byte)
            .i16(0)
            .bytes();
        let LogicalMessage::Relation(r) = dec(b).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.replica_identity, ri);
        assert!(r.columns.is_empty());
    }
}

#[test]
fn relation_streamed_has_xid() {
    let b = Enc::tag(b'R')
        .u32(900)
        .u32(16384)
        .str("public")
        .str("t")
        .u8(b'd')
        .i16(1)
        .u8(1)
        .str("id")
        .u32(23)
        .i32(-1)
        .bytes();
    let LogicalMessage::Relation(r) = dec_v4_stream(b).unwrap() else {
        panic!("not a relation")
    };
    assert_eq!(r.xid, Some(900));
    assert_eq!(r.id, 16384);
    assert_eq!(r.columns.len(), 1);
}

#[test]
fn type_info() {
    let b = Enc::tag(b'Y').u32(50000).str("public").str("mood").bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Type(TypeInfo {
            xid: None,
            oid: 50000,
            namespace: "public".into(),
            name: "mood".into(),
        })
    );
    let b = Enc::tag(b'Y')
        .u32(9)
        .u32(50000)
        .str("public")
        .str("mood")
        .bytes();
    let LogicalMessage::Type(t) = dec_v4_stream(b).unwrap() else {
        panic!("not a type")
    };
    assert_eq!(t.xid, Some(9));
}

#[test]
fn insert_with_mixed_tuple() {
    let b = mixed_tuple_wire(Enc::tag(b'I').u32(16384).u8(b'N')).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Insert(Insert {
            xid: None,
            relation_id: 16384,
            new: mixed_tuple(),
        })
    );
}

#[test]
fn insert_values_share_the_input_buffer() {
    let b = mixed_tuple_wire(Enc::tag(b'I').u32(1).u8(b'N')).bytes();
    let range = b.as_ptr_range();
    let LogicalMessage::Insert(i) = dec(b.clone()).unwrap() else {
        panic!("not an insert")
    };
    let TupleColumn::Binary(v) = &i.new.columns[3] else {
        panic!("not binary")
    };
    assert!(range.contains(&v.as_ptr()), "value was copied");
}

#[test]
fn update_with_key_old_tuple() {
    let key = TupleData {
        columns: vec![text("1"), TupleColumn::Null],
    };
    let e = Enc::tag(b'U')
        .u32(7)
        .u8(b'K')
        .i16(2)
        .u8(b't')
        .i32(1)
        .raw(b"1")
        .u8(b'n');
    let b = mixed_tuple_wire(e.u8(b'N')).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 7,
            old: Some(OldTuple::Key(key)),
            new: mixed_tuple(),
        })
    );
}

#[test]
fn update_with_full_old_tuple() {
    let old = TupleData {
        columns: vec![bin(b"x")],
    };
    let e = Enc::tag(b'U')
        .u32(7)
        .u8(b'O')
        .i16(1)
        .u8(b'b')
        .i32(1)
        .raw(b"x");
    let b = mixed_tuple_wire(e.u8(b'N')).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 7,
            old: Some(OldTuple::Full(old)),
            new: mixed_tuple(),
        })
    );
}

#[test]
fn update_without_old_tuple() {
    let b = mixed_tuple_wire(Enc::tag(b'U').u32(7).u8(b'N')).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 7,
            old: None,
            new: mixed_tuple(),
        })
    );
}

#[test]
fn delete_with_key_and_full() {
    let b = Enc::tag(b'D')
        .u32(7)
        .u8(b'K')
        .i16(1)
        .u8(b't')
        .i32(1)
        .raw(b"1")
        .bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Delete(Delete {
            xid: None,
            relation_id: 7,
            old: OldTuple::Key(TupleData {
                columns: vec![text("1")]
            }),
        })
    );
    let b = mixed_tuple_wire(Enc::tag(b'D').u32(7).u8(b'O')).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Delete(Delete {
            xid: None,
            relation_id: 7,
            old: OldTuple::Full(mixed_tuple()),
        })
    );
}

#[test]
fn truncate_with_several_relations() {
    let b = Enc::tag(b'T')
        .i32(3)
        .u8(3)
        .u32(1)
        .u32(2)
        .u32(u32::MAX)
        .bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Truncate(Truncate {
            xid: None,
            options: 3,
            relation_ids: vec![1, 2, u32::MAX],
        })
    );
    let b = Enc::tag(b'T').i32(0).u8(0).bytes();
    let LogicalMessage::Truncate(t) = dec(b).unwrap() else {
        panic!("not a truncate")
    };
    assert!(t.relation_ids.is_empty());
}

#[test]
fn message_transactional_and_not() {
    let b = Enc::tag(b'M')
        .u8(1)
        .lsn(LSN_A)
        .str("audit")
        .i32(3)
        .raw(b"a\0b")
        .bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Message(Message {
            xid: None,
            transactional: true,
            lsn: LSN_A,
            prefix: "audit".into(),
            content: Bytes::from_static(b"a\0b"),
        })
    );
    let b = Enc::tag(b'M').u8(0).lsn(LSN_B).str("").i32(0).bytes();
    assert_eq!(
        dec(b).unwrap(),
        LogicalMessage::Message(Message {
            xid: None,
            transactional: false,
            lsn: LSN_B,
            prefix: String::new(),
            content: Bytes::new(),
        })
    );
}

#[test]
fn streamed_data_messages_carry_xid() {
    let mut d = Decoder::new(2, false);
    assert_eq!(
        d.decode(Enc::tag(b'S').u32(900).u8(1).bytes()).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 900,
            first_segment: true,
        })
    );
    assert!(d.in_stream());

    let b = mixed_tuple_wire(Enc::tag(b'I').u32(900).u32(5).u8(b'N')).bytes();
    let LogicalMessage::Insert(i) = d.decode(b).unwrap() else {
        panic!("not an insert")
    };
    assert_eq!((i.xid, i.relation_id), (Some(900), 5));
    assert_eq!(i.new, mixed_tuple());

    let e = Enc::tag(b'U').u32(901).u32(5).u8(b'K').i16(1).u8(b'n');
    let LogicalMessage::Update(u) = d.decode(e.u8(b'N').i16(0).bytes()).unwrap() else {
        panic!("not an update")
    };
    assert_eq!((u.xid, u.relation_id), (Some(901), 5));
    assert!(matches!(u.old, Some(OldTuple::Key(_))));

    let b = Enc::tag(b'D').u32(900).u32(5).u8(b'O').i16(0).bytes();
    let LogicalMessage::Delete(x) = d.decode(b).unwrap() else {
        panic!("not a delete")
    };
    assert_eq!(x.xid, Some(900));

    let b = Enc::tag(b'T').u32(900).i32(2).u8(1).u32(5).u32(6).bytes();
    let LogicalMessage::Truncate(t) = d.decode(b).unwrap() else {
        panic!("not a truncate")
    };
    assert_eq!((t.xid, t.relation_ids), (Some(900), vec![5, 6]));

    let b = Enc::tag(b'M')
        .u32(900)
        .u8(1)
        .lsn(LSN_A)
        .str("p")
        .i32(1)
        .raw(b"z")
        .bytes();
    let LogicalMessage::Message(m) = d.decode(b).unwrap() else {
        panic!("not a message")
    };
    assert_eq!((m.xid, m.transactional), (Some(900), true));

    assert_eq!(
        d.decode(Enc::tag(b'E').bytes()).unwrap(),
        LogicalMessage::StreamStop
    );
    assert!(!d.in_stream());

    // Outside the block the same kind of message has no xid again.
    let b = Enc::tag(b'T').i32(1).u8(0).u32(5).bytes();
    let LogicalMessage::Truncate(t) = d.decode(b).unwrap() else {
        panic!("not a truncate")
    };
    assert_eq!(t.xid, None);
}

#[test]
fn stream_start_later_segment() {
    let b = Enc::tag(b'S').u32(3).u8(0).bytes();
    assert_eq!(
        Decoder::new(2, false).decode(b).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 3,
            first_segment: false,
        })
    );
}

#[test]
fn stream_commit() {
    let b = Enc::tag(b'c')
        .u32(900)
        .u8(0)
        .lsn(LSN_A)
        .lsn(LSN_B)
        .i64(99)
        .bytes();
    assert_eq!(
        Decoder::new(2, false).decode(b).unwrap(),
        LogicalMessage::StreamCommit(StreamCommit {
            xid: 900,
            flags: 0,
            commit_lsn: LSN_A,
            end_lsn: LSN_B,
            commit_time: 99,
        })
    );
}

#[test]
fn stream_abort_without_parallel_fields() {
    let b = Enc::tag(b'A').u32(900).u32(901).bytes();
    let want = LogicalMessage::StreamAbort(StreamAbort {
        xid: 900,
        subxid: 901,
        abort_lsn: None,
        abort_time: None,
    });
    assert_eq!(Decoder::new(2, false).decode(b.clone()).unwrap(), want);
    // v4 without streaming='parallel' still omits them.
    assert_eq!(Decoder::new(4, false).decode(b.clone()).unwrap(), want);
    // A parallel decoder must not accept the short form.
    assert!(matches!(
        Decoder::new(4, true).decode(b),
        Err(DecodeError::UnexpectedEof {
            context: "Stream Abort abort_lsn",
            ..
        })
    ));
}

#[test]
fn stream_abort_with_parallel_fields() {
    let b = Enc::tag(b'A').u32(900).u32(900).lsn(LSN_A).i64(-1).bytes();
    assert_eq!(
        Decoder::new(4, true).decode(b.clone()).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 900,
            subxid: 900,
            abort_lsn: Some(LSN_A),
            abort_time: Some(-1),
        })
    );
    assert!(matches!(
        Decoder::new(4, false).decode(b),
        Err(DecodeError::TrailingBytes { count: 16, .. })
    ));
}

fn sample_prepare(flags: u8) -> Prepare {
    Prepare {
        flags,
        prepare_lsn: LSN_A,
        end_lsn: LSN_B,
        prepare_time: 12345,
        xid: 77,
        gid: "pg_gid_1".into(),
    }
}

#[test]
fn begin_prepare() {
    let b = Enc::tag(b'b')
        .lsn(LSN_A)
        .lsn(LSN_B)
        .i64(12345)
        .u32(77)
        .str("pg_gid_1")
        .bytes();
    assert_eq!(
        Decoder::new(3, false).decode(b).unwrap(),
        LogicalMessage::BeginPrepare(sample_prepare(0))
    );
}

#[test]
fn prepare_and_stream_prepare() {
    for (tag, wrap) in [
        (
            b'P',
            LogicalMessage::Prepare as fn(Prepare) -> LogicalMessage,
        ),
        (b'p', LogicalMessage::StreamPrepare),
    ] {
        let b = Enc::tag(tag)
            .u8(0)
            .lsn(LSN_A)
            .lsn(LSN_B)
            .i64(12345)
            .u32(77)
            .str("pg_gid_1")
            .bytes();
        assert_eq!(
            Decoder::new(3, false).decode(b).unwrap(),
            wrap(sample_prepare(0))
        );
    }
}

#[test]
fn commit_prepared() {
    let b = Enc::tag(b'K')
        .u8(0)
        .lsn(LSN_A)
        .lsn(LSN_B)
        .i64(5)
        .u32(77)
        .str("g")
        .bytes();
    assert_eq!(
        Decoder::new(3, false).decode(b).unwrap(),
        LogicalMessage::CommitPrepared(CommitPrepared {
            flags: 0,
            commit_lsn: LSN_A,
            end_lsn: LSN_B,
            commit_time: 5,
            xid: 77,
            gid: "g".into(),
        })
    );
}

#[test]
fn rollback_prepared() {
    let b = Enc::tag(b'r')
        .u8(0)
        .lsn(LSN_A)
        .lsn(LSN_B)
        .i64(5)
        .i64(6)
        .u32(77)
        .str("g")
        .bytes();
    assert_eq!(
        Decoder::new(3, false).decode(b).unwrap(),
        LogicalMessage::RollbackPrepared(RollbackPrepared {
            flags: 0,
            prepare_end_lsn: LSN_A,
            rollback_end_lsn: LSN_B,
            prepare_time: 5,
            rollback_time: 6,
            xid: 77,
            gid: "g".into(),
        })
    );
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[test]
fn empty_input() {
    assert_eq!(
        dec(Bytes::new()),
        Err(DecodeError::UnexpectedEof {
            context: "message tag",
            need: 1,
            have: 0,
        })
    );
}

#[test]
fn unknown_top_level_tags() {
    // 'N' and 'n' are valid only inside tuples; 'X' and 0 never.
    for tag in [b'N', b'n', b'X', 0, 0xff] {
        assert_eq!(
            Decoder::new(4, true).decode(Bytes::copy_from_slice(&[tag, 0, 0])),
            Err(DecodeError::UnknownTag {
                context: "pgoutput message tag",
                tag,
            })
        );
    }
}

#[test]
fn messages_newer_than_the_protocol_version() {
    for tag in [b'S', b'E', b'c', b'A'] {
        assert!(matches!(
            Decoder::new(1, false).decode(Bytes::copy_from_slice(&[tag])),
            Err(DecodeError::UnsupportedMessage {
                min_version: 2,
                protocol_version: 1,
                ..
            })
        ));
    }
    for tag in [b'b', b'P', b'K', b'r', b'p'] {
        for version in [1, 2] {
            let err = Decoder::new(version, false)
                .decode(Bytes::copy_from_slice(&[tag]))
                .unwrap_err();
            assert!(
                matches!(err, DecodeError::UnsupportedMessage { min_version: 3, .. }),
                "{err}"
            );
        }
    }
}

#[test]
fn nested_stream_start_and_stray_stream_stop() {
    let mut d = decoder(2, false, true);
    assert_eq!(
        d.decode(stream_start_bytes()),
        Err(DecodeError::UnexpectedStreamMessage {
            name: "Stream Start",
            in_stream: true,
        })
    );
    assert!(d.in_stream());

    let mut d = Decoder::new(2, false);
    assert_eq!(
        d.decode(Enc::tag(b'E').bytes()),
        Err(DecodeError::UnexpectedStreamMessage {
            name: "Stream Stop",
            in_stream: false,
        })
    );
    assert!(!d.in_stream());
}

#[test]
fn failed_stream_messages_leave_state_alone() {
    let mut d = Decoder::new(2, false);
    assert!(d.decode(Enc::tag(b'S').u32(1).bytes()).is_err());
    assert!(!d.in_stream());
    assert!(d.decode(Enc::tag(b'S').u32(1).u8(1).u8(0).bytes()).is_err());
    assert!(!d.in_stream());

    let mut d = decoder(2, false, true);
    assert_eq!(
        d.decode(Enc::tag(b'E').u8(0).bytes()),
        Err(DecodeError::TrailingBytes {
            context: "Stream Stop",
            count: 1,
        })
    );
    assert!(d.in_stream());
}

#[test]
fn bad_replica_identity() {
    let b = Enc::tag(b'R')
        .u32(1)
        .str("s")
        .str("t")
        .u8(b'x')
        .i16(0)
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::UnknownTag {
            context: "Relation replica_identity",
            tag: b'x',
        })
    );
}

#[test]
fn bad_tuple_markers() {
    let cases: [(Bytes, &str, u8); 5] = [
        (
            Enc::tag(b'I').u32(1).u8(b'K').i16(0).bytes(),
            "Insert new tuple marker",
            b'K',
        ),
        (
            Enc::tag(b'U').u32(1).u8(b'X').i16(0).bytes(),
            "Update tuple marker",
            b'X',
        ),
        (
            Enc::tag(b'U')
                .u32(1)
                .u8(b'K')
                .i16(0)
                .u8(b'O')
                .i16(0)
                .bytes(),
            "Update new tuple marker",
            b'O',
        ),
        (
            Enc::tag(b'D').u32(1).u8(b'N').i16(0).bytes(),
            "Delete old tuple marker",
            b'N',
        ),
        (
            Enc::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').bytes(),
            "TupleData column kind",
            b'x',
        ),
    ];
    for (b, context, tag) in cases {
        assert_eq!(dec(b), Err(DecodeError::UnknownTag { context, tag }));
    }
}

#[test]
fn trailing_bytes() {
    let b = Enc::tag(b'B').lsn(LSN_A).i64(0).u32(1).u8(0).u8(0).bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::TrailingBytes {
            context: "Begin",
            count: 2,
        })
    );
    let b = mixed_tuple_wire(Enc::tag(b'I').u32(1).u8(b'N'))
        .u8(b'n')
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::TrailingBytes {
            context: "Insert",
            count: 1,
        })
    );
}

#[test]
fn negative_lengths() {
    let cases: [(Bytes, &str, i32); 5] = [
        (
            Enc::tag(b'I').u32(1).u8(b'N').i16(-1).bytes(),
            "TupleData column count",
            -1,
        ),
        (
            Enc::tag(b'I')
                .u32(1)
                .u8(b'N')
                .i16(1)
                .u8(b't')
                .i32(-2)
                .bytes(),
            "TupleData text value length",
            -2,
        ),
        (
            Enc::tag(b'I')
                .u32(1)
                .u8(b'N')
                .i16(1)
                .u8(b'b')
                .i32(i32::MIN)
                .bytes(),
            "TupleData binary value length",
            i32::MIN,
        ),
        (
            Enc::tag(b'T').i32(-1).u8(0).bytes(),
            "Truncate relation count",
            -1,
        ),
        (
            Enc::tag(b'M').u8(0).lsn(LSN_A).str("p").i32(-1).bytes(),
            "Message content length",
            -1,
        ),
    ];
    for (b, context, len) in cases {
        assert_eq!(dec(b), Err(DecodeError::NegativeLength { context, len }));
    }
    let b = Enc::tag(b'R')
        .u32(1)
        .str("s")
        .str("t")
        .u8(b'd')
        .i16(i16::MIN)
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::NegativeLength {
            context: "Relation column count",
            len: -32768,
        })
    );
}

#[test]
fn invalid_utf8_and_missing_nul() {
    let b = Enc::tag(b'O')
        .lsn(LSN_A)
        .raw(&[b'a', 0xc3, 0x28, 0])
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::InvalidUtf8 {
            context: "Origin name"
        })
    );
    let b = Enc::tag(b'R')
        .u32(1)
        .str("s")
        .raw(&[0xff, 0])
        .u8(b'd')
        .i16(0)
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::InvalidUtf8 {
            context: "Relation name"
        })
    );
    let b = Enc::tag(b'O').lsn(LSN_A).raw(b"abc").bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::MissingNul {
            context: "Origin name"
        })
    );
}

#[test]
fn huge_counts_in_tiny_buffers() {
    // Column count 32767 with only three bytes behind it.
    let b = Enc::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(i16::MAX)
        .raw(b"nnn")
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::UnexpectedEof {
            context: "TupleData column kind",
            need: 1,
            have: 0,
        })
    );
    let b = Enc::tag(b'R')
        .u32(1)
        .str("s")
        .str("t")
        .u8(b'd')
        .i16(i16::MAX)
        .raw(b"\x01a")
        .bytes();
    assert!(matches!(dec(b), Err(DecodeError::MissingNul { .. })));
    let b = Enc::tag(b'T').i32(i32::MAX).u8(0).u32(1).bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::UnexpectedEof {
            context: "Truncate relation_ids",
            need: 4 * i32::MAX as usize,
            have: 4,
        })
    );
    let b = Enc::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(i32::MAX)
        .raw(b"ab")
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::UnexpectedEof {
            context: "TupleData text value",
            need: i32::MAX as usize,
            have: 2,
        })
    );
    let b = Enc::tag(b'M')
        .u8(0)
        .lsn(LSN_A)
        .str("p")
        .i32(i32::MAX)
        .bytes();
    assert_eq!(
        dec(b),
        Err(DecodeError::UnexpectedEof {
            context: "Message content",
            need: i32::MAX as usize,
            have: 0,
        })
    );
}

#[test]
fn capacity_is_bounded_by_remaining_bytes() {
    // What the decoder reserves before a loop; the loops themselves stop at the first
    // short read, so this bound is what keeps a lying count from costing memory.
    let r = reader::Reader::new(Bytes::from_static(b"nnn"));
    assert_eq!(r.capacity_for(32767, 1), 3);
    assert_eq!(r.capacity_for(32767, 10), 0);
    assert_eq!(r.capacity_for(2, 1), 2);
    assert_eq!(r.capacity_for(usize::MAX, 0), 3);
}

#[test]
fn error_messages_name_message_and_field() {
    let err = dec(Enc::tag(b'B').lsn(LSN_A).bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput message truncated in Begin commit_time: need 8 more bytes, have 0"
    );
    let err = dec(Bytes::from_static(b"X")).unwrap_err();
    assert_eq!(err.to_string(), "unknown pgoutput message tag 'X'");
    let err = dec(Bytes::from_static(b"\x01")).unwrap_err();
    assert_eq!(err.to_string(), "unknown pgoutput message tag 0x01");
    let err = dec(Bytes::from_static(b"S")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput Stream Start message 'S' needs protocol version 2, \
         but this session uses version 1"
    );
    let err = Decoder::new(2, false)
        .decode(Enc::tag(b'E').bytes())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput Stream Stop received outside a streamed transaction block"
    );
}

// ---------------------------------------------------------------------------------------
// Every valid message, cut short anywhere, is an end-of-input error
// ---------------------------------------------------------------------------------------

/// A message and the decoder state it is valid in.
#[derive(Debug, Clone)]
struct Case {
    version: u32,
    parallel: bool,
    in_stream: bool,
    msg: LogicalMessage,
}

impl Case {
    fn decoder(&self) -> Decoder {
        decoder(self.version, self.parallel, self.in_stream)
    }
}

fn samples() -> Vec<Case> {
    let v1 = |msg| Case {
        version: 1,
        parallel: false,
        in_stream: false,
        msg,
    };
    let streamed = |msg| Case {
        version: 4,
        parallel: true,
        in_stream: true,
        msg,
    };
    let v4 = |msg| Case {
        version: 4,
        parallel: true,
        in_stream: false,
        msg,
    };
    let relation = Relation {
        xid: None,
        id: 1,
        namespace: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![
            RelationColumn {
                flags: 1,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            },
            RelationColumn {
                flags: 0,
                name: "v".into(),
                type_oid: 25,
                type_modifier: -1,
            },
        ],
    };
    let update = Update {
        xid: None,
        relation_id: 1,
        old: Some(OldTuple::Full(mixed_tuple())),
        new: mixed_tuple(),
    };
    let message = Message {
        xid: None,
        transactional: true,
        lsn: LSN_A,
        prefix: "pfx".into(),
        content: Bytes::from_static(b"hello"),
    };
    let truncate = Truncate {
        xid: None,
        options: 1,
        relation_ids: vec![1, 2, 3],
    };
    use LogicalMessage as L;
    vec![
        v1(L::Begin(Begin {
            final_lsn: LSN_A,
            commit_time: 1,
            xid: 2,
        })),
        v1(L::Commit(Commit {
            flags: 0,
            commit_lsn: LSN_A,
            end_lsn: LSN_B,
            commit_time: 3,
        })),
        v1(L::Origin(Origin {
            commit_lsn: LSN_A,
            name: "o".into(),
        })),
        v1(L::Relation(relation.clone())),
        streamed(L::Relation(Relation {
            xid: Some(9),
            ..relation
        })),
        v1(L::Type(TypeInfo {
            xid: None,
            oid: 1,
            namespace: "n".into(),
            name: "t".into(),
        })),
        v1(L::Insert(Insert {
            xid: None,
            relation_id: 1,
            new: mixed_tuple(),
        })),
        v1(L::Update(update.clone())),
        v1(L::Update(Update {
            old: Some(OldTuple::Key(mixed_tuple())),
            ..update.clone()
        })),
        v1(L::Update(Update {
            old: None,
            ..update.clone()
        })),
        streamed(L::Update(Update {
            xid: Some(9),
            ..update
        })),
        v1(L::Delete(Delete {
            xid: None,
            relation_id: 1,
            old: OldTuple::Key(mixed_tuple()),
        })),
        v1(L::Truncate(truncate.clone())),
        streamed(L::Truncate(Truncate {
            xid: Some(9),
            ..truncate
        })),
        v1(L::Message(message.clone())),
        streamed(L::Message(Message {
            xid: Some(9),
            ..message
        })),
        v4(L::StreamStart(StreamStart {
            xid: 9,
            first_segment: true,
        })),
        streamed(L::StreamStop),
        v4(L::StreamCommit(StreamCommit {
            xid: 9,
            flags: 0,
            commit_lsn: LSN_A,
            end_lsn: LSN_B,
            commit_time: 4,
        })),
        v4(L::StreamAbort(StreamAbort {
            xid: 9,
            subxid: 10,
            abort_lsn: Some(LSN_A),
            abort_time: Some(5),
        })),
        Case {
            parallel: false,
            ..v4(L::StreamAbort(StreamAbort {
                xid: 9,
                subxid: 10,
                abort_lsn: None,
                abort_time: None,
            }))
        },
        v4(L::BeginPrepare(sample_prepare(0))),
        v4(L::Prepare(sample_prepare(0))),
        v4(L::StreamPrepare(sample_prepare(0))),
        v4(L::CommitPrepared(CommitPrepared {
            flags: 0,
            commit_lsn: LSN_A,
            end_lsn: LSN_B,
            commit_time: 6,
            xid: 7,
            gid: "g".into(),
        })),
        v4(L::RollbackPrepared(RollbackPrepared {
            flags: 0,
            prepare_end_lsn: LSN_A,
            rollback_end_lsn: LSN_B,
            prepare_time: 6,
            rollback_time: 7,
            xid: 8,
            gid: "g".into(),
        })),
    ]
}

#[test]
fn samples_round_trip() {
    for case in samples() {
        let bytes = encode(&case.msg);
        assert_eq!(case.decoder().decode(bytes).unwrap(), case.msg);
    }
}

#[test]
fn truncated_at_every_offset() {
    for case in samples() {
        let bytes = encode(&case.msg);
        for cut in 0..bytes.len() {
            let mut d = case.decoder();
            let err = d.decode(bytes.slice(..cut)).unwrap_err();
            // A string cut before its NUL is reported as such; it is the same condition.
            assert!(
                matches!(
                    err,
                    DecodeError::UnexpectedEof { .. } | DecodeError::MissingNul { .. }
                ),
                "{:?} cut at {cut}: {err:?}",
                case.msg
            );
            assert_eq!(d.in_stream(), case.in_stream);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";

fn arb_string() -> BoxedStrategy<String> {
    // Postgres strings cannot hold NUL; \PC excludes it along with other controls.
    "\\PC{0,8}".boxed()
}

fn arb_bytes() -> BoxedStrategy<Bytes> {
    proptest::collection::vec(any::<u8>(), 0..16)
        .prop_map(Bytes::from)
        .boxed()
}

fn arb_lsn() -> BoxedStrategy<Lsn> {
    any::<u64>().prop_map(Lsn).boxed()
}

fn arb_tuple() -> BoxedStrategy<TupleData> {
    let column = prop_oneof![
        Just(TupleColumn::Null),
        Just(TupleColumn::UnchangedToast),
        arb_bytes().prop_map(TupleColumn::Text),
        arb_bytes().prop_map(TupleColumn::Binary),
    ];
    proptest::collection::vec(column, 0..6)
        .prop_map(|columns| TupleData { columns })
        .boxed()
}

fn arb_old() -> BoxedStrategy<OldTuple> {
    prop_oneof![
        arb_tuple().prop_map(OldTuple::Key),
        arb_tuple().prop_map(OldTuple::Full),
    ]
    .boxed()
}

fn arb_prepare(with_flags: bool) -> BoxedStrategy<Prepare> {
    (
        any::<u8>(),
        arb_lsn(),
        arb_lsn(),
        any::<i64>(),
        any::<u32>(),
        arb_string(),
    )
        .prop_map(
            move |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Prepare {
                flags: if with_flags { flags } else { 0 },
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            },
        )
        .boxed()
}

/// Any message valid for a decoder in this state.
fn arb_message(version: u32, parallel: bool, in_stream: bool) -> BoxedStrategy<LogicalMessage> {
    use LogicalMessage as L;
    let xid = || -> BoxedStrategy<Option<u32>> {
        if in_stream {
            any::<u32>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        }
    };
    let relation_column = (any::<u8>(), arb_string(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    let replica_identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ];
    let mut kinds: Vec<BoxedStrategy<LogicalMessage>> = vec![
        (arb_lsn(), any::<i64>(), any::<u32>())
            .prop_map(|(final_lsn, commit_time, xid)| {
                L::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            })
            .boxed(),
        (any::<u8>(), arb_lsn(), arb_lsn(), any::<i64>())
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                L::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            })
            .boxed(),
        (arb_lsn(), arb_string())
            .prop_map(|(commit_lsn, name)| L::Origin(Origin { commit_lsn, name }))
            .boxed(),
        (
            xid(),
            any::<u32>(),
            arb_string(),
            arb_string(),
            replica_identity,
            proptest::collection::vec(relation_column, 0..5),
        )
            .prop_map(|(xid, id, namespace, name, replica_identity, columns)| {
                L::Relation(Relation {
                    xid,
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            })
            .boxed(),
        (xid(), any::<u32>(), arb_string(), arb_string())
            .prop_map(|(xid, oid, namespace, name)| {
                L::Type(TypeInfo {
                    xid,
                    oid,
                    namespace,
                    name,
                })
            })
            .boxed(),
        (xid(), any::<u32>(), arb_tuple())
            .prop_map(|(xid, relation_id, new)| {
                L::Insert(Insert {
                    xid,
                    relation_id,
                    new,
                })
            })
            .boxed(),
        (
            xid(),
            any::<u32>(),
            proptest::option::of(arb_old()),
            arb_tuple(),
        )
            .prop_map(|(xid, relation_id, old, new)| {
                L::Update(Update {
                    xid,
                    relation_id,
                    old,
                    new,
                })
            })
            .boxed(),
        (xid(), any::<u32>(), arb_old())
            .prop_map(|(xid, relation_id, old)| {
                L::Delete(Delete {
                    xid,
                    relation_id,
                    old,
                })
            })
            .boxed(),
        (
            xid(),
            any::<u8>(),
            proptest::collection::vec(any::<u32>(), 0..8),
        )
            .prop_map(|(xid, options, relation_ids)| {
                L::Truncate(Truncate {
                    xid,
                    options,
                    relation_ids,
                })
            })
            .boxed(),
        (xid(), any::<bool>(), arb_lsn(), arb_string(), arb_bytes())
            .prop_map(|(xid, transactional, lsn, prefix, content)| {
                L::Message(Message {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            })
            .boxed(),
    ];
    if version >= 2 {
        if in_stream {
            kinds.push(Just(L::StreamStop).boxed());
        } else {
            kinds.push(
                (any::<u32>(), any::<bool>())
                    .prop_map(|(xid, first_segment)| {
                        L::StreamStart(StreamStart { xid, first_segment })
                    })
                    .boxed(),
            );
        }
        kinds.push(
            (
                any::<u32>(),
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
            )
                .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_time)| {
                    L::StreamCommit(StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                })
                .boxed(),
        );
        kinds.push(
            (any::<u32>(), any::<u32>(), arb_lsn(), any::<i64>())
                .prop_map(move |(xid, subxid, lsn, time)| {
                    L::StreamAbort(StreamAbort {
                        xid,
                        subxid,
                        abort_lsn: parallel.then_some(lsn),
                        abort_time: parallel.then_some(time),
                    })
                })
                .boxed(),
        );
    }
    if version >= 3 {
        kinds.push(arb_prepare(false).prop_map(L::BeginPrepare).boxed());
        kinds.push(arb_prepare(true).prop_map(L::Prepare).boxed());
        kinds.push(arb_prepare(true).prop_map(L::StreamPrepare).boxed());
        kinds.push(
            (
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
                any::<u32>(),
                arb_string(),
            )
                .prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                    L::CommitPrepared(CommitPrepared {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                        xid,
                        gid,
                    })
                })
                .boxed(),
        );
        kinds.push(
            (
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
                any::<i64>(),
                any::<u32>(),
                arb_string(),
            )
                .prop_map(
                    |(
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_time,
                        rollback_time,
                        xid,
                        gid,
                    )| {
                        L::RollbackPrepared(RollbackPrepared {
                            flags,
                            prepare_end_lsn,
                            rollback_end_lsn,
                            prepare_time,
                            rollback_time,
                            xid,
                            gid,
                        })
                    },
                )
                .boxed(),
        );
    }
    proptest::strategy::Union::new(kinds).boxed()
}

fn arb_case() -> impl Strategy<Value = Case> {
    (1u32..=4, any::<bool>(), any::<bool>()).prop_flat_map(|(version, parallel, stream)| {
        // Streams exist from protocol 2 on, and 'parallel' only with protocol 4.
        let in_stream = stream && version >= 2;
        let parallel = parallel && version >= 4;
        arb_message(version, parallel, in_stream).prop_map(move |msg| Case {
            version,
            parallel,
            in_stream,
            msg,
        })
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
    Set(usize, u8),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        // Length and count fields are where lying values hurt most.
        (
            any::<usize>(),
            prop::sample::select(vec![0u8, 0x7f, 0x80, 0xff])
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
        Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
        Mutation::Remove(i) if len > 0 => {
            bytes.remove(i % len);
        }
        Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
        Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
        _ => {}
    }
}

fn arb_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        // Most random first bytes are unknown tags; also reach each message's body.
        (
            prop::sample::select(TAGS),
            proptest::collection::vec(any::<u8>(), 0..511)
        )
            .prop_map(|(tag, mut rest)| {
                rest.insert(0, tag);
                rest
            }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        version in 1u32..=4,
        parallel in any::<bool>(),
        stream in any::<bool>(),
        input in arb_input(),
    ) {
        let in_stream = stream && version >= 2;
        let mut d = decoder(version, parallel, in_stream);
        if d.decode(Bytes::from(input)).is_err() {
            prop_assert_eq!(d.in_stream(), in_stream);
        }
    }

    #[test]
    fn generated_messages_round_trip(case in arb_case()) {
        let mut d = case.decoder();
        let decoded = d.decode(encode(&case.msg));
        prop_assert_eq!(decoded.as_ref(), Ok(&case.msg));
        let expect_stream = match case.msg {
            LogicalMessage::StreamStart(_) => true,
            LogicalMessage::StreamStop => false,
            _ => case.in_stream,
        };
        prop_assert_eq!(d.in_stream(), expect_stream);
    }

    #[test]
    fn mutated_messages_never_panic(
        case in arb_case(),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut bytes = encode(&case.msg).to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let mut d = case.decoder();
        if d.decode(Bytes::from(bytes)).is_err() {
            prop_assert_eq!(d.in_stream(), case.in_stream);
        }
    }
}
