#![allow(clippy::unwrap_used)]

//! Table-driven tests of the [`Assembler`]: hand-built pgoutput messages in, events and
//! their JSON (the README's event format) out.

use super::*;

use bytes::Bytes;
use serde_json::{json, Value as Json};

use crate::pgoutput::{Begin, Commit, Delete, Insert, Message, RelationColumn, Truncate, Update};

const USERS: u32 = 16_400;
const ORDERS: u32 = 16_410;
const DOCS: u32 = 16_420;
/// `0/16B3748`
const LSN1: Lsn = Lsn(0x016B_3748);
/// `1/A0`
const LSN2: Lsn = Lsn(0x1_0000_00A0);
/// 2026-11-27T10:00:00.123456Z in µs since 2000-01-01.
const T0: i64 = 1_795_773_600_123_456 - crate::lsn::PG_EPOCH_OFFSET_MICROS;
const T0_TEXT: &str = "2026-11-27T10:00:00.123456Z";
const T0_UNIX_MS: u64 = 1_795_773_600_123;

const NUL: TupleColumn = TupleColumn::Null;
const TOAST: TupleColumn = TupleColumn::UnchangedToast;

// ---- message builders ----------------------------------------------------------------

fn col(name: &str, type_oid: u32, key: bool) -> RelationColumn {
    RelationColumn {
        flags: u8::from(key),
        name: name.into(),
        type_oid,
        type_modifier: -1,
    }
}

fn relation_msg(
    id: u32,
    name: &str,
    identity: ReplicaIdentity,
    columns: Vec<RelationColumn>,
) -> Relation {
    Relation {
        xid: None,
        id,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: identity,
        columns,
    }
}

fn relation(
    id: u32,
    name: &str,
    identity: ReplicaIdentity,
    columns: Vec<RelationColumn>,
) -> LogicalMessage {
    LogicalMessage::Relation(relation_msg(id, name, identity, columns))
}

/// `public.users (id int4 key, email text, plan text)`.
fn users(identity: ReplicaIdentity) -> LogicalMessage {
    relation(
        USERS,
        "users",
        identity,
        vec![
            col("id", 23, true),
            col("email", 25, false),
            col("plan", 25, false),
        ],
    )
}

/// `public.orders (id int8 key, total numeric)`.
fn orders() -> LogicalMessage {
    relation(
        ORDERS,
        "orders",
        ReplicaIdentity::Default,
        vec![col("id", 20, true), col("total", 1700, false)],
    )
}

/// `public.docs (id int4 key, body jsonb, score float8, scores float8[])`, REPLICA IDENTITY
/// FULL.
fn docs() -> LogicalMessage {
    relation(
        DOCS,
        "docs",
        ReplicaIdentity::Full,
        vec![
            col("id", 23, true),
            col("body", 3802, false),
            col("score", 701, false),
            col("scores", 1022, false),
        ],
    )
}

fn t(s: &str) -> TupleColumn {
    TupleColumn::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn tup(columns: Vec<TupleColumn>) -> TupleData {
    TupleData { columns }
}

/// A tuple of text columns.
fn txt(values: &[&str]) -> TupleData {
    tup(values.iter().map(|v| t(v)).collect())
}

fn begin_at(xid: u32, final_lsn: Lsn, commit_time: i64) -> LogicalMessage {
    LogicalMessage::Begin(Begin {
        final_lsn,
        commit_time,
        xid,
    })
}

fn begin(xid: u32, final_lsn: Lsn) -> LogicalMessage {
    begin_at(xid, final_lsn, T0)
}

fn end_of(commit_lsn: Lsn) -> Lsn {
    Lsn(commit_lsn.0 + 0x30)
}

fn commit(commit_lsn: Lsn) -> LogicalMessage {
    LogicalMessage::Commit(Commit {
        flags: 0,
        commit_lsn,
        end_lsn: end_of(commit_lsn),
        commit_time: T0,
    })
}

fn insert(relation_id: u32, new: TupleData) -> LogicalMessage {
    LogicalMessage::Insert(Insert {
        xid: None,
        relation_id,
        new,
    })
}

fn update(relation_id: u32, old: Option<OldTuple>, new: TupleData) -> LogicalMessage {
    LogicalMessage::Update(Update {
        xid: None,
        relation_id,
        old,
        new,
    })
}

fn delete(relation_id: u32, old: OldTuple) -> LogicalMessage {
    LogicalMessage::Delete(Delete {
        xid: None,
        relation_id,
        old,
    })
}

fn truncate(relation_ids: &[u32]) -> LogicalMessage {
    LogicalMessage::Truncate(Truncate {
        xid: None,
        options: 0,
        relation_ids: relation_ids.to_vec(),
    })
}

fn message(transactional: bool, prefix: &str, content: &str) -> LogicalMessage {
    LogicalMessage::Message(Message {
        xid: None,
        transactional,
        lsn: LSN1,
        prefix: prefix.into(),
        content: Bytes::copy_from_slice(content.as_bytes()),
    })
}

fn user_row(id: u32) -> LogicalMessage {
    insert(USERS, txt(&[&id.to_string(), "a@x.io", "free"]))
}

// ---- running -------------------------------------------------------------------------

fn run_with(
    asm: &mut Assembler,
    msgs: impl IntoIterator<Item = LogicalMessage>,
) -> Result<Vec<Output>, EventError> {
    let mut out = Vec::new();
    for msg in msgs {
        asm.handle(msg, &mut out)?;
    }
    Ok(out)
}

fn run(msgs: impl IntoIterator<Item = LogicalMessage>) -> Vec<Output> {
    run_with(&mut Assembler::new(AssemblerOptions::default()), msgs).unwrap()
}

/// The relations, then one transaction (xid 7421 at `LSN1`) with `changes`.
fn one_tx(relations: Vec<LogicalMessage>, changes: Vec<LogicalMessage>) -> Vec<Output> {
    let mut msgs = relations;
    msgs.push(begin(7421, LSN1));
    msgs.extend(changes);
    msgs.push(commit(LSN1));
    run(msgs)
}

fn events(out: &[Output]) -> Vec<&Event> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            Output::Commit { .. } | Output::Watermark(_) => None,
        })
        .collect()
}

/// The event's JSON; every event the tests look at also checks that the direct writer
/// (`Event::write_json`, what `waltap tail` prints) gives serde_json's bytes.
fn to_json(ev: &Event) -> Json {
    let mut direct = Vec::new();
    ev.write_json(&mut direct).unwrap();
    assert_eq!(
        String::from_utf8(direct).unwrap(),
        serde_json::to_string(ev).unwrap()
    );
    serde_json::to_value(ev).unwrap()
}

/// The event's JSON without `id`, `position` and `tx`.
fn body(ev: &Event) -> Json {
    let mut j = to_json(ev);
    let obj = j.as_object_mut().unwrap();
    for k in ["id", "position", "tx"] {
        assert!(obj.remove(k).is_some(), "{k} missing in {obj:?}");
    }
    j
}

fn tx_json(ev: &Event) -> Json {
    to_json(ev)["tx"].clone()
}

// ---- event shapes --------------------------------------------------------------------

#[test]
fn event_json_shapes() {
    use ReplicaIdentity::{Default as D, Full as F, Index as I};
    let key = |v: &[TupleColumn]| Some(OldTuple::Key(tup(v.to_vec())));
    let full = |v: &[TupleColumn]| Some(OldTuple::Full(tup(v.to_vec())));
    let head = |action: &str, identity: &str| json!({"action": action, "schema": "public", "table": "users", "identity": identity});
    let with = |mut base: Json, extra: Json| {
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    };
    let user = json!({"id": 7, "email": "a@x.io", "plan": "pro"});
    let cases: Vec<(&str, ReplicaIdentity, LogicalMessage, Json)> = vec![
        (
            "insert",
            D,
            insert(USERS, txt(&["7", "a@x.io", "pro"])),
            with(head("create", "default"), json!({"created": user})),
        ),
        (
            "insert with a null",
            F,
            insert(USERS, tup(vec![t("7"), NUL, t("pro")])),
            with(
                head("create", "full"),
                json!({"created": {"id": 7, "email": null, "plan": "pro"}}),
            ),
        ),
        (
            "update, default identity, key unchanged: before is null, no changed",
            D,
            update(USERS, None, txt(&["7", "a@x.io", "pro"])),
            with(
                head("update", "default"),
                json!({"before": null, "after": user}),
            ),
        ),
        (
            "update, default identity, key changed: before holds only the old key",
            D,
            update(
                USERS,
                key(&[t("6"), NUL, NUL]),
                txt(&["7", "a@x.io", "pro"]),
            ),
            with(
                head("update", "default"),
                json!({"before": {"id": 6}, "after": user}),
            ),
        ),
        (
            "update, index identity, key changed",
            I,
            update(
                USERS,
                key(&[t("6"), NUL, NUL]),
                txt(&["7", "a@x.io", "pro"]),
            ),
            with(
                head("update", "index"),
                json!({"before": {"id": 6}, "after": user}),
            ),
        ),
        (
            "update, index identity, no old tuple",
            I,
            update(USERS, None, txt(&["7", "a@x.io", "pro"])),
            with(
                head("update", "index"),
                json!({"before": null, "after": user}),
            ),
        ),
        (
            "update, full identity: whole before, changed",
            F,
            update(
                USERS,
                full(&[t("7"), t("a@x.io"), t("free")]),
                txt(&["7", "a@x.io", "pro"]),
            ),
            with(
                head("update", "full"),
                json!({"before": {"id": 7, "email": "a@x.io", "plan": "free"},
                       "after": user, "changed": ["plan"]}),
            ),
        ),
        (
            "update, full identity, nothing differs: changed is []",
            F,
            update(
                USERS,
                full(&[t("7"), t("a@x.io"), t("pro")]),
                txt(&["7", "a@x.io", "pro"]),
            ),
            with(
                head("update", "full"),
                json!({"before": user, "after": user, "changed": []}),
            ),
        ),
        (
            "update, full identity, several differ, null to value and key",
            F,
            update(
                USERS,
                full(&[t("6"), NUL, t("pro")]),
                txt(&["7", "a@x.io", "pro"]),
            ),
            with(
                head("update", "full"),
                json!({"before": {"id": 6, "email": null, "plan": "pro"},
                       "after": user, "changed": ["id", "email"]}),
            ),
        ),
        (
            "update, full identity, value to null",
            F,
            update(
                USERS,
                full(&[t("7"), t("a@x.io"), t("pro")]),
                tup(vec![t("7"), NUL, t("pro")]),
            ),
            with(
                head("update", "full"),
                json!({"before": user, "after": {"id": 7, "email": null, "plan": "pro"},
                       "changed": ["email"]}),
            ),
        ),
        (
            "delete, default identity: only the key",
            D,
            delete(USERS, OldTuple::Key(tup(vec![t("7"), NUL, NUL]))),
            with(head("delete", "default"), json!({"deleted": {"id": 7}})),
        ),
        (
            "delete, index identity: only the key",
            I,
            delete(USERS, OldTuple::Key(tup(vec![t("7"), NUL, NUL]))),
            with(head("delete", "index"), json!({"deleted": {"id": 7}})),
        ),
        (
            "delete, full identity: whole row",
            F,
            delete(USERS, OldTuple::Full(txt(&["7", "a@x.io", "pro"]))),
            with(head("delete", "full"), json!({"deleted": user})),
        ),
        (
            "delete, full identity: a null column is null, not absent",
            F,
            delete(USERS, OldTuple::Full(tup(vec![t("7"), NUL, t("pro")]))),
            with(
                head("delete", "full"),
                json!({"deleted": {"id": 7, "email": null, "plan": "pro"}}),
            ),
        ),
        (
            "truncate: no row fields",
            D,
            truncate(&[USERS]),
            head("truncate", "default"),
        ),
        // Unchanged TOAST values.
        (
            "toast, full identity: filled from before, not changed",
            F,
            update(
                USERS,
                full(&[t("7"), t("long text"), t("free")]),
                tup(vec![t("7"), TOAST, t("pro")]),
            ),
            with(
                head("update", "full"),
                json!({"before": {"id": 7, "email": "long text", "plan": "free"},
                       "after": {"id": 7, "email": "long text", "plan": "pro"},
                       "changed": ["plan"]}),
            ),
        ),
        (
            "toast, full identity, only the toasted column unchanged: changed is []",
            F,
            update(
                USERS,
                full(&[t("7"), t("long text"), t("free")]),
                tup(vec![t("7"), TOAST, t("free")]),
            ),
            with(
                head("update", "full"),
                json!({"before": {"id": 7, "email": "long text", "plan": "free"},
                       "after": {"id": 7, "email": "long text", "plan": "free"},
                       "changed": []}),
            ),
        ),
        (
            "toast, default identity, no old tuple: left out, listed as unchanged",
            D,
            update(USERS, None, tup(vec![t("7"), TOAST, t("pro")])),
            with(
                head("update", "default"),
                json!({"before": null, "after": {"id": 7, "plan": "pro"},
                       "unchanged": ["email"]}),
            ),
        ),
        (
            "toast, default identity, key changed: key-only before does not fill",
            D,
            update(
                USERS,
                key(&[t("6"), NUL, NUL]),
                tup(vec![t("7"), TOAST, TOAST]),
            ),
            with(
                head("update", "default"),
                json!({"before": {"id": 6}, "after": {"id": 7},
                       "unchanged": ["email", "plan"]}),
            ),
        ),
    ];
    for (name, identity, change, expected) in cases {
        let out = one_tx(vec![users(identity)], vec![change]);
        let evs = events(&out);
        assert_eq!(evs.len(), 1, "{name}");
        assert_eq!(body(evs[0]), expected, "{name}");
    }
}

#[test]
fn typed_rows_keep_absent_and_null_apart() {
    let out = one_tx(
        vec![users(ReplicaIdentity::Default)],
        vec![
            update(
                USERS,
                Some(OldTuple::Key(tup(vec![t("6"), NUL, NUL]))),
                tup(vec![t("7"), TOAST, NUL]),
            ),
            delete(USERS, OldTuple::Key(tup(vec![t("7"), NUL, NUL]))),
        ],
    );
    let evs = events(&out);
    let (upd, del) = (evs[0], evs[1]);
    assert_eq!(upd.action, Action::Update);
    assert_eq!(upd.identity, Identity::Default);
    let before = upd.before().unwrap();
    assert_eq!(before.get("id"), Some(&Value::Int(6)));
    assert_eq!(
        before.get("email"),
        None,
        "K tuple non-key nulls are not values"
    );
    let after = upd.after().unwrap();
    assert_eq!(after.get("email"), None, "unchanged TOAST is absent");
    assert_eq!(
        after.get("plan"),
        Some(&Value::Null),
        "a real NULL is present"
    );
    assert_eq!(upd.unchanged, vec![Arc::<str>::from("email")]);
    assert_eq!(upd.changed, None);
    assert_eq!(del.after(), None);
    assert_eq!(del.before().unwrap().get("id"), Some(&Value::Int(7)));
    assert_eq!(del.qualified_table(), "public.users");

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Key {
        id: i32,
    }
    assert_eq!(
        del.before().unwrap().to_typed::<Key>().unwrap(),
        Key { id: 7 }
    );
}

#[test]
fn changed_compares_values_not_representations() {
    // jsonb, float NaN and arrays that are the same on both sides are not changed.
    let out = one_tx(
        vec![docs()],
        vec![
            update(
                DOCS,
                Some(OldTuple::Full(txt(&[
                    "1",
                    r#"{"a": [1, 2]}"#,
                    "NaN",
                    "{NaN,1}",
                ]))),
                txt(&["1", r#"{"a": [1, 2]}"#, "NaN", "{NaN,1}"]),
            ),
            update(
                DOCS,
                Some(OldTuple::Full(txt(&[
                    "1",
                    r#"{"a": [1, 2]}"#,
                    "NaN",
                    "{NaN,1}",
                ]))),
                txt(&["1", r#"{"a": [1, 3]}"#, "1.5", "{NaN,2}"]),
            ),
        ],
    );
    let evs = events(&out);
    assert_eq!(to_json(evs[0])["changed"], json!([]));
    assert_eq!(to_json(evs[0])["after"]["score"], json!("NaN"));
    assert_eq!(to_json(evs[0])["after"]["scores"], json!(["NaN", 1.0]));
    assert_eq!(
        to_json(evs[1])["changed"],
        json!(["body", "score", "scores"])
    );
}

// ---- transaction fields, positions, ids ----------------------------------------------

#[test]
fn tx_fields_and_positions() {
    let t1 = T0 + 876_544; // 2026-11-27T10:00:01.000000Z
    let out = run(vec![
        users(ReplicaIdentity::Default),
        begin(7421, LSN1),
        user_row(1),
        user_row(2),
        user_row(3),
        commit(LSN1),
        begin_at(7422, LSN2, t1),
        user_row(4),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: LSN2,
            end_lsn: end_of(LSN2),
            commit_time: t1,
        }),
    ]);
    // Outputs: three events, their Commit, one event, its Commit.
    assert!(matches!(
        out[3],
        Output::Commit { xid: 7421, commit_lsn: LSN1, end_lsn, events: 3 } if end_lsn == end_of(LSN1)
    ));
    assert!(matches!(
        out[5],
        Output::Commit { xid: 7422, commit_lsn: LSN2, end_lsn, events: 1 } if end_lsn == end_of(LSN2)
    ));
    assert_eq!(out.len(), 6);
    let evs = events(&out);
    let expected_tx = [
        json!({"id": 7421, "commitLsn": "0/16B3748", "committedAt": T0_TEXT,
               "index": 0, "total": 3, "last": false}),
        json!({"id": 7421, "commitLsn": "0/16B3748", "committedAt": T0_TEXT,
               "index": 1, "total": 3, "last": false}),
        json!({"id": 7421, "commitLsn": "0/16B3748", "committedAt": T0_TEXT,
               "index": 2, "total": 3, "last": true}),
        json!({"id": 7422, "commitLsn": "1/A0", "committedAt": "2026-11-27T10:00:01.000000Z",
               "index": 0, "total": 1, "last": true}),
    ];
    let expected_pos = [
        "00000000016B3748-0000000000",
        "00000000016B3748-0000000001",
        "00000000016B3748-0000000002",
        "00000001000000A0-0000000000",
    ];
    assert_eq!(evs.len(), 4);
    for (i, ev) in evs.iter().enumerate() {
        let j = to_json(ev);
        assert_eq!(j["tx"], expected_tx[i], "event {i}");
        assert_eq!(j["position"], json!(expected_pos[i]), "event {i}");
        assert_eq!(
            j["position"].as_str().unwrap().parse::<Position>().unwrap(),
            ev.position
        );
        assert_eq!(j["created"]["id"], json!(i + 1));
    }
    for w in evs.windows(2) {
        assert!(w[0].position < w[1].position);
        assert!(w[0].position.to_string() < w[1].position.to_string());
    }
}

#[test]
fn table_filter_keeps_ordinals_and_counts_delivered_events() {
    let changes = || {
        vec![
            orders(),
            users(ReplicaIdentity::Default),
            begin(7421, LSN1),
            insert(ORDERS, txt(&["1", "9.99"])),
            user_row(1),
            update(ORDERS, None, txt(&["1", "19.99"])),
            user_row(2),
            truncate(&[ORDERS, USERS]),
            commit(LSN1),
            // A transaction that touches only filtered-out tables still commits.
            begin(7422, LSN2),
            insert(ORDERS, txt(&["2", "1"])),
            commit(LSN2),
        ]
    };
    let mut filtered = Assembler::new(AssemblerOptions {
        tables: Some([TableName::parse("users")].into_iter().collect()),
        ..AssemblerOptions::default()
    });
    let out = run_with(&mut filtered, changes()).unwrap();
    let evs = events(&out);
    let got: Vec<(String, u32, u32, Option<u32>, bool)> = evs
        .iter()
        .map(|e| {
            (
                e.qualified_table(),
                e.position.ordinal,
                e.tx.index,
                e.tx.total,
                e.tx.last,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("public.users".into(), 1, 0, Some(3), false),
            ("public.users".into(), 3, 1, Some(3), false),
            ("public.users".into(), 5, 2, Some(3), true),
        ]
    );
    assert_eq!(evs[2].action, Action::Truncate);
    let commits: Vec<&Output> = out
        .iter()
        .filter(|o| matches!(o, Output::Commit { .. }))
        .collect();
    assert!(matches!(
        commits[0],
        Output::Commit {
            xid: 7421,
            events: 3,
            ..
        }
    ));
    assert!(matches!(
        commits[1],
        Output::Commit {
            xid: 7422,
            events: 0,
            ..
        }
    ));
    assert!(matches!(out.last(), Some(Output::Commit { xid: 7422, .. })));

    // Unfiltered, the same changes have the same positions and ids.
    let all = run(changes());
    let all_evs = events(&all);
    assert_eq!(all_evs.len(), 7);
    assert_eq!(
        all_evs
            .iter()
            .map(|e| e.position.ordinal)
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5, 0]
    );
    for ev in &evs {
        let same = all_evs.iter().find(|e| e.position == ev.position).unwrap();
        assert_eq!(same.id, ev.id);
        assert_eq!(same.table, ev.table);
    }
}

#[test]
fn ids_are_deterministic_distinct_and_time_based() {
    let input = || {
        vec![
            users(ReplicaIdentity::Default),
            begin(7421, LSN1),
            user_row(1),
            user_row(2),
            commit(LSN1),
            begin(7422, LSN2),
            user_row(3),
            delete(USERS, OldTuple::Key(tup(vec![t("3"), NUL, NUL]))),
            commit(LSN2),
        ]
    };
    let a = run(input());
    let b = run(input());
    assert_eq!(a, b, "same input, same output");
    let evs = events(&a);
    let ids: Vec<ulid::Ulid> = evs.iter().map(|e| e.id).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "ids are distinct");
    for (ev, id) in evs.iter().zip(&ids) {
        assert_eq!(*id, Event::make_id(T0, ev.position));
        assert_eq!(id.timestamp_ms(), T0_UNIX_MS);
        let text = to_json(ev)["id"].as_str().unwrap().to_owned();
        assert_eq!(text.len(), 26);
        assert_eq!(text.parse::<ulid::Ulid>().unwrap(), *id);
    }
    // Same commit time: ids sort like positions.
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

// ---- large transactions --------------------------------------------------------------

#[test]
fn large_transaction_streams_without_total() {
    let mut asm = Assembler::new(AssemblerOptions {
        max_buffered_events: 3,
        ..AssemblerOptions::default()
    });
    let mut out = Vec::new();
    asm.handle(users(ReplicaIdentity::Default), &mut out)
        .unwrap();
    asm.handle(begin(7421, LSN1), &mut out).unwrap();
    for i in 0..10 {
        asm.handle(user_row(i), &mut out).unwrap();
        // Memory stays bounded: at most 3 events held back.
        let handled = i as usize + 1;
        assert!(handled - out.len() <= 3, "after {handled}: {}", out.len());
    }
    let before_commit = out.len();
    assert!(before_commit > 0, "events come out before the Commit");
    assert!(out.iter().all(|o| matches!(o, Output::Event(_))));
    asm.handle(commit(LSN1), &mut out).unwrap();
    assert!(matches!(
        out.last(),
        Some(Output::Commit {
            xid: 7421,
            events: 10,
            ..
        })
    ));
    let evs = events(&out);
    assert_eq!(evs.len(), 10);
    assert_eq!(out.len(), 11, "the Commit comes after all events");
    for (i, ev) in evs.iter().enumerate() {
        let tx = tx_json(ev);
        assert_eq!(tx["index"], json!(i), "event {i}");
        assert_eq!(ev.position.ordinal as usize, i);
        assert_eq!(ev.tx.total, None);
        assert!(tx.get("total").is_none(), "event {i}: {tx}");
        assert_eq!(tx["last"], json!(i == 9), "event {i}");
    }
    assert_eq!(evs.iter().filter(|e| e.tx.last).count(), 1);
    assert!(!asm.in_transaction());
}

#[test]
fn buffer_bound_is_inclusive() {
    // (events, max_buffered_events, total present)
    let cases = [
        (3u32, 3usize, true),
        (4, 3, false),
        (1, 1, true),
        (2, 1, false),
        (2, 0, false),
    ];
    for (n, max, has_total) in cases {
        let mut asm = Assembler::new(AssemblerOptions {
            max_buffered_events: max,
            ..AssemblerOptions::default()
        });
        let mut msgs = vec![users(ReplicaIdentity::Default), begin(1, LSN1)];
        msgs.extend((0..n).map(user_row));
        msgs.push(commit(LSN1));
        let out = run_with(&mut asm, msgs).unwrap();
        let evs = events(&out);
        assert_eq!(evs.len(), n as usize);
        for ev in &evs {
            assert_eq!(ev.tx.total, has_total.then_some(n), "n={n} max={max}");
        }
        assert!(evs.last().unwrap().tx.last);
        assert_eq!(evs.iter().filter(|e| e.tx.last).count(), 1);
    }
}

// ---- annotations ---------------------------------------------------------------------

#[test]
fn annotations() {
    let ann = |c: &str| message(true, "waltap", c);
    let alice = r#"{"user": "alice", "why": "a"}"#;
    let cases: Vec<(&str, Vec<LogicalMessage>, Option<Json>)> = vec![
        (
            "before the changes",
            vec![ann(alice), user_row(1), user_row(2)],
            Some(json!({"user": "alice", "why": "a"})),
        ),
        (
            "after the changes",
            vec![user_row(1), user_row(2), ann(alice)],
            Some(json!({"user": "alice", "why": "a"})),
        ),
        (
            "between the changes",
            vec![user_row(1), ann(alice), user_row(2)],
            Some(json!({"user": "alice", "why": "a"})),
        ),
        (
            "two objects merge, later keys win",
            vec![
                ann(alice),
                user_row(1),
                ann(r#"{"request": "r1", "why": "b"}"#),
                user_row(2),
            ],
            Some(json!({"user": "alice", "request": "r1", "why": "b"})),
        ),
        (
            "another prefix is ignored",
            vec![
                message(true, "other", r#"{"x": 1}"#),
                user_row(1),
                user_row(2),
            ],
            None,
        ),
        (
            "another prefix next to ours",
            vec![
                message(true, "waltapx", r#"{"x": 1}"#),
                ann(alice),
                message(true, "", r#"{"y": 1}"#),
                user_row(1),
                user_row(2),
            ],
            Some(json!({"user": "alice", "why": "a"})),
        ),
        (
            "non-JSON content is kept as a string",
            vec![user_row(1), ann("deploy 42: fix"), user_row(2)],
            Some(json!("deploy 42: fix")),
        ),
        (
            "non-transactional message changes nothing",
            vec![message(false, "waltap", alice), user_row(1), user_row(2)],
            None,
        ),
    ];
    for (name, changes, expected) in cases {
        let mut msgs = vec![users(ReplicaIdentity::Default), begin(7421, LSN1)];
        msgs.extend(changes);
        msgs.push(commit(LSN1));
        // The annotation belongs to its transaction only.
        msgs.extend([begin(7422, LSN2), user_row(3), commit(LSN2)]);
        let out = run(msgs);
        let evs = events(&out);
        assert_eq!(evs.len(), 3, "{name}");
        for ev in &evs[..2] {
            let tx = tx_json(ev);
            assert_eq!(tx.get("annotations"), expected.as_ref(), "{name}");
        }
        assert!(
            tx_json(evs[2]).get("annotations").is_none(),
            "{name}: leaked"
        );
    }
}

#[test]
fn annotations_outside_a_transaction_and_in_a_large_one() {
    // A non-transactional message outside any transaction is fine and ignored.
    let mut asm = Assembler::new(AssemblerOptions::default());
    let out = run_with(&mut asm, [message(false, "waltap", r#"{"a": 1}"#)]).unwrap();
    assert!(out.is_empty());
    assert!(!asm.in_transaction());

    // In a transaction larger than the buffer, an annotation sent first reaches all events.
    let mut asm = Assembler::new(AssemblerOptions {
        max_buffered_events: 2,
        ..AssemblerOptions::default()
    });
    let mut msgs = vec![
        users(ReplicaIdentity::Default),
        begin(7421, LSN1),
        message(true, "waltap", r#"{"user": "bob"}"#),
    ];
    msgs.extend((0..7).map(user_row));
    msgs.push(commit(LSN1));
    let out = run_with(&mut asm, msgs).unwrap();
    let evs = events(&out);
    assert_eq!(evs.len(), 7);
    for ev in evs {
        assert_eq!(tx_json(ev)["annotations"], json!({"user": "bob"}));
    }
}

// ---- relation changes ----------------------------------------------------------------

#[test]
fn relation_change_mid_stream() {
    use ReplicaIdentity::Default as D;
    let v1 = relation(
        USERS,
        "users",
        D,
        vec![col("id", 23, true), col("name", 25, false)],
    );
    let v2 = relation(
        USERS,
        "users",
        D,
        vec![
            col("id", 23, true),
            col("name", 25, false),
            col("age", 23, false),
        ],
    );
    let v3 = relation(
        USERS,
        "users",
        D,
        vec![col("id", 23, true), col("age", 23, false)],
    );
    let v4 = relation(
        USERS,
        "users",
        D,
        vec![col("id", 23, true), col("age", 25, false)],
    );
    let v5 = relation(
        USERS,
        "people",
        D,
        vec![col("id", 23, true), col("age", 25, false)],
    );
    let mut asm = Assembler::new(AssemblerOptions::default());
    let out = run_with(
        &mut asm,
        vec![
            v1,
            begin(1, LSN1),
            insert(USERS, txt(&["1", "a"])),
            // Postgres sends the new shape inside the next transaction that uses it.
            v2,
            insert(USERS, txt(&["2", "b", "30"])),
            commit(LSN1),
            begin(2, LSN2),
            v3,
            insert(USERS, txt(&["3", "31"])),
            v4,
            insert(USERS, txt(&["4", "thirty"])),
            v5,
            update(USERS, None, txt(&["4", "forty"])),
            commit(LSN2),
        ],
    )
    .unwrap();
    let got: Vec<Json> = events(&out)
        .iter()
        .map(|e| {
            let j = to_json(e);
            json!([j["table"], j.get("created").or(j.get("after"))])
        })
        .collect();
    assert_eq!(
        got,
        vec![
            json!(["users", {"id": 1, "name": "a"}]),
            json!(["users", {"id": 2, "name": "b", "age": 30}]),
            json!(["users", {"id": 3, "age": 31}]),
            json!(["users", {"id": 4, "age": "thirty"}]),
            json!(["people", {"id": 4, "age": "forty"}]),
        ]
    );
    let rel = asm.relation(USERS).unwrap();
    assert_eq!(&*rel.table, "people");
    assert_eq!(rel.names.len(), 2);

    // A row of the old shape no longer fits.
    let err = run_with(
        &mut asm,
        [
            begin(3, Lsn(0x2_0000_0000)),
            insert(USERS, txt(&["5", "e", "50"])),
        ],
    )
    .unwrap_err();
    assert!(matches!(
        err,
        EventError::ColumnCount {
            expected: 2,
            got: 3,
            ..
        }
    ));
}

// ---- errors --------------------------------------------------------------------------

#[test]
fn errors_are_typed() {
    type Check = fn(&EventError) -> bool;
    /// Name, messages that succeed, the message that fails, what the error must be, words
    /// its text must contain.
    type Case = (
        &'static str,
        Vec<LogicalMessage>,
        LogicalMessage,
        Check,
        &'static [&'static str],
    );
    let users_tx = || vec![users(ReplicaIdentity::Default), begin(7421, LSN1)];
    let full_tx = || vec![users(ReplicaIdentity::Full), begin(7421, LSN1)];
    let cases: Vec<Case> = vec![
        (
            "change for an unknown relation",
            vec![begin(1, LSN1)],
            user_row(1),
            |e| matches!(e, EventError::UnknownRelation(USERS)),
            &["16400"],
        ),
        (
            "truncate of an unknown relation",
            users_tx(),
            truncate(&[USERS, 99]),
            |e| matches!(e, EventError::UnknownRelation(99)),
            &["99"],
        ),
        (
            "too few columns",
            users_tx(),
            insert(USERS, txt(&["1", "a"])),
            |e| {
                matches!(e, EventError::ColumnCount { table, expected: 3, got: 2 }
                    if table == "public.users")
            },
            &["public.users", "2", "3"],
        ),
        (
            "too many columns in an update",
            users_tx(),
            update(USERS, None, txt(&["1", "a", "b", "c"])),
            |e| {
                matches!(
                    e,
                    EventError::ColumnCount {
                        expected: 3,
                        got: 4,
                        ..
                    }
                )
            },
            &["public.users"],
        ),
        (
            "wrong width of a key tuple",
            users_tx(),
            delete(USERS, OldTuple::Key(tup(vec![t("1")]))),
            |e| {
                matches!(
                    e,
                    EventError::ColumnCount {
                        expected: 3,
                        got: 1,
                        ..
                    }
                )
            },
            &["public.users"],
        ),
        (
            "wrong width of an old full tuple",
            full_tx(),
            update(
                USERS,
                Some(OldTuple::Full(txt(&["1", "a"]))),
                txt(&["1", "a", "b"]),
            ),
            |e| {
                matches!(
                    e,
                    EventError::ColumnCount {
                        expected: 3,
                        got: 2,
                        ..
                    }
                )
            },
            &["public.users"],
        ),
        (
            "Commit without Begin",
            vec![],
            commit(LSN1),
            |e| matches!(e, EventError::NoTransaction(_)),
            &["Commit"],
        ),
        (
            "change without Begin",
            vec![users(ReplicaIdentity::Default)],
            user_row(1),
            |e| matches!(e, EventError::NoTransaction(_)),
            &["outside a transaction"],
        ),
        (
            "annotation without Begin",
            vec![],
            message(true, "waltap", "{}"),
            |e| matches!(e, EventError::NoTransaction(_)),
            &["Message"],
        ),
        (
            "nested Begin",
            vec![begin(7, LSN1)],
            begin(8, LSN2),
            |e| matches!(e, EventError::NestedBegin(7)),
            &["7"],
        ),
        (
            "Commit LSN differs from the Begin's final LSN",
            vec![begin(7, LSN1)],
            commit(LSN2),
            |e| {
                matches!(
                    e,
                    EventError::CommitMismatch {
                        begin: LSN1,
                        commit: LSN2
                    }
                )
            },
            &["0/16B3748", "1/A0"],
        ),
        (
            "Relation with an unregistered type",
            vec![],
            relation(
                USERS,
                "users",
                ReplicaIdentity::Default,
                vec![col("id", 23, true), col("mood", 16_385, false)],
            ),
            |e| matches!(e, EventError::UnresolvedType(16_385)),
            &["16385"],
        ),
        (
            "binary column",
            users_tx(),
            insert(
                USERS,
                tup(vec![
                    t("1"),
                    TupleColumn::Binary(Bytes::from_static(b"\x00")),
                    t("x"),
                ]),
            ),
            |e| {
                matches!(e, EventError::BinaryValue { table, column }
                    if table == "public.users" && column == "email")
            },
            &["public.users.email", "binary"],
        ),
        (
            "int4 column with text abc",
            users_tx(),
            insert(USERS, txt(&["abc", "a", "free"])),
            |e| {
                matches!(e, EventError::Value { table, column, type_oid: 23,
                    source: ValueError::InvalidInt(_) }
                    if table == "public.users" && column == "id")
            },
            &["public.users.id", "abc", "23"],
        ),
        (
            "invalid value in a key tuple",
            users_tx(),
            delete(USERS, OldTuple::Key(tup(vec![t("x7"), NUL, NUL]))),
            |e| matches!(e, EventError::Value { column, .. } if column == "id"),
            &["public.users.id", "x7"],
        ),
        (
            "invalid value in an old full tuple",
            full_tx(),
            update(
                USERS,
                Some(OldTuple::Full(txt(&["1.5", "a", "b"]))),
                txt(&["1", "a", "b"]),
            ),
            |e| matches!(e, EventError::Value { column, .. } if column == "id"),
            &["public.users.id", "1.5"],
        ),
        (
            "invalid jsonb",
            vec![docs(), begin(1, LSN1)],
            insert(DOCS, txt(&["1", "{nope", "1", "{}"])),
            |e| {
                matches!(e, EventError::Value { table, column, type_oid: 3802,
                    source: ValueError::InvalidJson(_) }
                    if table == "public.docs" && column == "body")
            },
            &["public.docs.body", "{nope"],
        ),
        (
            "invalid UTF-8 in a text column",
            users_tx(),
            insert(
                USERS,
                tup(vec![
                    t("1"),
                    TupleColumn::Text(Bytes::from_static(b"\xff\xfe")),
                    t("x"),
                ]),
            ),
            |e| {
                matches!(e, EventError::Value { column, source: ValueError::InvalidUtf8, .. }
                    if column == "email")
            },
            &["public.users.email", "UTF-8"],
        ),
        (
            "unchanged TOAST in an insert",
            users_tx(),
            insert(USERS, tup(vec![t("1"), TOAST, t("x")])),
            |e| {
                matches!(e, EventError::UnexpectedToast { table, column }
                    if table == "public.users" && column == "email")
            },
            &["public.users.email"],
        ),
        (
            "unchanged TOAST in an old full tuple",
            full_tx(),
            update(
                USERS,
                Some(OldTuple::Full(tup(vec![t("1"), TOAST, t("x")]))),
                txt(&["1", "a", "x"]),
            ),
            |e| matches!(e, EventError::UnexpectedToast { .. }),
            &["public.users.email"],
        ),
        (
            "unchanged TOAST in a deleted full row",
            full_tx(),
            delete(USERS, OldTuple::Full(tup(vec![t("1"), t("a"), TOAST]))),
            |e| matches!(e, EventError::UnexpectedToast { column, .. } if column == "plan"),
            &["public.users.plan"],
        ),
        (
            "streamed transaction",
            vec![],
            LogicalMessage::StreamStop,
            |e| matches!(e, EventError::Unsupported(_)),
            &["streaming"],
        ),
    ];
    for (name, setup, failing, check, words) in cases {
        let mut asm = Assembler::new(AssemblerOptions::default());
        let mut out = run_with(&mut asm, setup).unwrap_or_else(|e| panic!("{name}: setup: {e}"));
        let err = asm.handle(failing, &mut out).expect_err(name);
        assert!(check(&err), "{name}: {err:?}");
        let text = crate::error::report(&err);
        for w in words {
            assert!(text.contains(w), "{name}: {text:?} lacks {w:?}");
        }
        assert!(out.is_empty(), "{name}: nothing handed out");
    }
}

#[test]
fn unresolved_types_then_register_type() {
    let rel = relation_msg(
        USERS,
        "users",
        ReplicaIdentity::Default,
        vec![
            col("id", 23, true),
            col("mood", 16_390, false),
            col("moods", 16_385, false),
            col("again", 16_390, false),
            col("tags", 1009, false),
            col("level", 16_400, false),
        ],
    );
    let mut asm = Assembler::new(AssemblerOptions::default());
    assert_eq!(asm.unresolved_types(&rel), vec![16_385, 16_390, 16_400]);
    let mut out = Vec::new();
    let err = asm
        .handle(LogicalMessage::Relation(rel.clone()), &mut out)
        .unwrap_err();
    assert!(matches!(err, EventError::UnresolvedType(16_390)), "{err:?}");
    assert!(asm.relation(USERS).is_none());

    asm.register_type(16_390, TypeKind::Text); // an enum
    assert_eq!(asm.unresolved_types(&rel), vec![16_385, 16_400]);
    asm.register_type(16_385, TypeKind::array_of(TypeKind::Text)); // its array
    asm.register_type(16_400, TypeKind::Int); // a domain over int4
    assert!(asm.unresolved_types(&rel).is_empty());

    let out = run_with(
        &mut asm,
        [
            LogicalMessage::Relation(rel.clone()),
            begin(1, LSN1),
            insert(
                USERS,
                txt(&["1", "happy", "{happy,sad}", "sad", "{a,\"b c\"}", "3"]),
            ),
            commit(LSN1),
        ],
    )
    .unwrap();
    assert_eq!(
        to_json(events(&out)[0])["created"],
        json!({"id": 1, "mood": "happy", "moods": ["happy", "sad"], "again": "sad",
               "tags": ["a", "b c"], "level": 3})
    );

    // A reconnect forgets relations but keeps resolved types.
    asm.reset();
    assert!(asm.relation(USERS).is_none());
    assert!(asm.unresolved_types(&rel).is_empty());
}

// ---- values --------------------------------------------------------------------------

#[test]
fn values_render_as_designed() {
    // (column, type oid, text sent or NULL, expected JSON)
    let cases: Vec<(&str, u32, Option<&str>, Json)> = vec![
        ("id", 23, Some("1"), json!(1)),
        ("nothing", 23, None, Json::Null),
        ("nothing_text", 25, None, Json::Null),
        ("name", 25, Some("héllo \"q\"\n"), json!("héllo \"q\"\n")),
        ("small", 21, Some("-5"), json!(-5)),
        ("big", 20, Some("9223372036854775807"), json!(i64::MAX)),
        ("yes", 16, Some("t"), json!(true)),
        ("no", 16, Some("f"), json!(false)),
        ("amount", 1700, Some("12345.678900"), json!("12345.678900")),
        ("not_a_number", 1700, Some("NaN"), json!("NaN")),
        ("ratio", 701, Some("1.5"), json!(1.5)),
        ("nan", 701, Some("NaN"), json!("NaN")),
        ("neg_inf", 700, Some("-Infinity"), json!("-Infinity")),
        (
            "doc",
            3802,
            Some(r#"{"a": [1, 2], "b": {"c": null}}"#),
            json!({"a": [1, 2], "b": {"c": null}}),
        ),
        ("plain_json", 114, Some(r#"[1, "x"]"#), json!([1, "x"])),
        (
            "at",
            1184,
            Some("2026-11-27 10:00:00.123+00"),
            json!("2026-11-27T10:00:00.123000Z"),
        ),
        (
            "at_whole",
            1184,
            Some("2026-11-27 10:00:00+00"),
            json!("2026-11-27T10:00:00.000000Z"),
        ),
        (
            "local",
            1114,
            Some("2026-11-27 10:00:00.5"),
            json!("2026-11-27T10:00:00.500000"),
        ),
        ("day", 1082, Some("2026-11-27"), json!("2026-11-27")),
        (
            "uid",
            2950,
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ),
        ("addr", 869, Some("10.0.0.1/8"), json!("10.0.0.1/8")),
        (
            "span",
            1186,
            Some("1 day 02:00:00"),
            json!("1 day 02:00:00"),
        ),
        ("raw", 17, Some("\\x0102ff"), json!("AQL/")),
        ("ints", 1007, Some("{1,2,NULL}"), json!([1, 2, null])),
        ("grid", 1007, Some("{{1,2},{3,4}}"), json!([[1, 2], [3, 4]])),
        ("empty", 1007, Some("{}"), json!([])),
        (
            "texts",
            1009,
            Some(r#"{a,"b c",NULL}"#),
            json!(["a", "b c", null]),
        ),
        ("docs", 3807, Some(r#"{"{\"a\": 1}"}"#), json!([{"a": 1}])),
    ];
    let rel = relation(
        DOCS,
        "vals",
        ReplicaIdentity::Default,
        cases
            .iter()
            .map(|(name, oid, _, _)| col(name, *oid, *name == "id"))
            .collect(),
    );
    let row = tup(cases.iter().map(|(_, _, v, _)| v.map_or(NUL, t)).collect());
    let out = one_tx(vec![rel], vec![insert(DOCS, row)]);
    let created = to_json(events(&out)[0])["created"].clone();
    for (name, oid, text, expected) in &cases {
        assert_eq!(created[name], *expected, "{name} (oid {oid}) {text:?}");
    }
    assert_eq!(created.as_object().unwrap().len(), cases.len());
}

#[test]
fn table_names_display_as_text_that_reads_back() {
    let cases = [
        ("public", "orders", "public.orders"),
        ("My Schema", "We\"ird Tab", r#"My Schema."We""ird Tab""#),
        ("public", "a.b", r#"public."a.b""#),
        ("x.y", "z", r#""x.y".z"#),
    ];
    for (schema, table, text) in cases {
        let t = TableName {
            schema: schema.into(),
            table: table.into(),
        };
        assert_eq!(t.to_string(), text);
        assert_eq!(TableName::parse(text), t);
        assert_eq!(TableName::parse_strict(text), Ok(t));
    }
    assert_eq!(
        TableName::parse_strict("orders"),
        Ok(TableName::parse("public.orders"))
    );
    for ambiguous in ["public.a.b", "\"open", "a.", ".b", "", "\"\".t"] {
        assert!(TableName::parse_strict(ambiguous).is_err(), "{ambiguous:?}");
    }
}

/// A Relation message with other columns marks the table's next event, once, even when
/// it arrives in the middle of a transaction; one that repeats the shape marks nothing.
#[test]
fn changed_columns_mark_the_next_event_of_the_table() {
    let reshaped = relation(
        USERS,
        "users",
        ReplicaIdentity::Default,
        vec![
            col("id", 23, true),
            col("email", 25, false),
            col("age", 23, false),
        ],
    );
    let out = run([
        users(ReplicaIdentity::Default),
        orders(),
        begin(700, LSN1),
        insert(USERS, txt(&["1", "a@x", "free"])),
        users(ReplicaIdentity::Default),
        insert(USERS, txt(&["2", "b@x", "pro"])),
        reshaped,
        insert(ORDERS, txt(&["9", "1.00"])),
        insert(USERS, txt(&["3", "c@x", "30"])),
        insert(USERS, txt(&["4", "d@x", "40"])),
        commit(LSN1),
    ]);
    let evs = events(&out);
    let marks: Vec<bool> = evs.iter().map(|e| e.schema_change.is_some()).collect();
    assert_eq!(marks, [false, false, false, true, false]);
    let change = evs[3].schema_change.as_ref().unwrap();
    assert_eq!(change.qualified(), "public.users");
    let names = |cols: &[crate::event::ColumnShape]| -> Vec<String> {
        cols.iter().map(|c| c.name.to_string()).collect()
    };
    assert_eq!(names(&change.columns), ["id", "email", "age"]);
    assert_eq!(names(&change.previous), ["id", "email", "plan"]);
    // Never part of the event's JSON.
    assert!(to_json(evs[3]).get("schemaChange").is_none());
}
