#![allow(clippy::unwrap_used)]

//! Table-driven tests of filters: the JSON form, compile-time checks, evaluation by type,
//! three-valued unknowns, action selection, `fields` and transitions, on hand-built events.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value as Json};

use super::eval::Truth;
use super::*;
use crate::event::{Action, Event, Identity, Position, Row, TxInfo};
use crate::lsn::Lsn;
use crate::value::{Text, TypeKind, Value};

// ---- fixtures --------------------------------------------------------------------------

fn col(name: &str, type_name: &str, kind: TypeKind) -> ColumnSchema {
    ColumnSchema {
        name: name.into(),
        type_name: type_name.into(),
        kind,
    }
}

/// `public.t`: one column per type family, `id` the primary key. Type names are spelled
/// as `format_type` spells them, some as `pg_type.typname` does.
fn table_with(identity: Identity, primary_key: &[&str]) -> TableSchema {
    use TypeKind as K;
    TableSchema {
        schema: "public".into(),
        table: "t".into(),
        columns: vec![
            col("id", "integer", K::Int),
            col("small", "int2", K::Int),
            col("big", "bigint", K::Int),
            col("f4", "real", K::Float),
            col("f8", "double precision", K::Float),
            col("amount", "numeric", K::Numeric),
            col("name", "text", K::Text),
            col("code", "character", K::Text),
            col("uid", "uuid", K::Text),
            col("mood", "mood", K::Text),
            col("active", "boolean", K::Bool),
            col("at", "timestamp with time zone", K::Timestamptz),
            col("local", "timestamp", K::Timestamp),
            col("day", "date", K::Text),
            col("born", "date", K::Date),
            col("tod", "time without time zone", K::Text),
            col("toz", "timetz", K::Text),
            col("doc", "jsonb", K::Json),
            col("tags", "text[]", TypeKind::array_of(K::Text)),
            col("nums", "_int4", TypeKind::array_of(K::Int)),
            col("span", "interval", K::Text),
            col("raw", "bytea", K::Bytea),
            col("plan", "character varying", K::Text),
            col("email", "text", K::Text),
        ],
        primary_key: primary_key.iter().map(|k| k.to_string()).collect(),
        identity,
    }
}

fn table(identity: Identity) -> TableSchema {
    table_with(identity, &["id"])
}

fn names() -> Arc<[Arc<str>]> {
    table(Identity::Full)
        .columns
        .iter()
        .map(|c| Arc::from(c.name.as_str()))
        .collect()
}

/// A complete row: the given values, NULL elsewhere.
fn row(values: &[(&str, Value)]) -> Row {
    let names = names();
    let values = names
        .iter()
        .map(|n| {
            let v = values
                .iter()
                .find(|(k, _)| *k == &**n)
                .map(|(_, v)| v.clone());
            Some(v.unwrap_or(Value::Null))
        })
        .collect();
    Row { names, values }
}

/// A key-only row: only `id` was sent.
fn key_row(id: i64) -> Row {
    let names = names();
    let values = names
        .iter()
        .map(|n| (&**n == "id").then_some(Value::Int(id)))
        .collect();
    Row { names, values }
}

fn text(s: &str) -> Text {
    Text::new(Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

fn t(s: &str) -> Value {
    Value::Text(text(s))
}

fn num(s: &str) -> Value {
    Value::Numeric(text(s))
}

fn tstz(s: &str) -> Value {
    Value::Timestamptz(text(s))
}

fn ts(s: &str) -> Value {
    Value::Timestamp(text(s))
}

fn doc(s: &str) -> Value {
    Value::Json(text(s))
}

fn int(i: i64) -> Value {
    Value::Int(i)
}

fn float(f: f64) -> Value {
    Value::Float(f)
}

fn arr(items: Vec<Value>) -> Value {
    Value::Array(items)
}

/// Also the index's tests' fixture.
pub(super) fn event(
    action: Action,
    identity: Identity,
    new: Option<Row>,
    old: Option<Row>,
) -> Event {
    Event {
        id: ulid::Ulid::nil(),
        position: Position::new(Lsn(1), 0),
        action,
        schema: "public".into(),
        table: "t".into(),
        identity,
        new,
        old,
        changed: None,
        unchanged: Vec::new(),
        transition: None,
        tx: TxInfo {
            xid: 1,
            commit_lsn: Lsn(1),
            committed_at: 0,
            index: 0,
            total: None,
            last: true,
            annotations: None,
        },
        schema_change: None,
    }
}

fn create(r: Row) -> Event {
    event(Action::Create, Identity::Full, Some(r), None)
}

fn update_full(before: Row, after: Row) -> Event {
    let changed = names()
        .iter()
        .zip(before.values.iter().zip(&after.values))
        .filter(|(_, (b, a))| b != a)
        .map(|(n, _)| n.clone())
        .collect();
    let mut ev = event(Action::Update, Identity::Full, Some(after), Some(before));
    ev.changed = Some(changed);
    ev
}

/// An update under REPLICA IDENTITY DEFAULT that kept the key: no `before`, no `changed`.
fn update_default(after: Row) -> Event {
    event(Action::Update, Identity::Default, Some(after), None)
}

fn delete_full(before: Row) -> Event {
    event(Action::Delete, Identity::Full, None, Some(before))
}

fn delete_key(id: i64) -> Event {
    event(Action::Delete, Identity::Default, None, Some(key_row(id)))
}

fn truncate() -> Event {
    event(Action::Truncate, Identity::Full, None, None)
}

fn compile_on(filter: Json, schema: &TableSchema) -> CompiledFilter {
    let f = Filter::from_json(&filter).unwrap();
    f.compile(schema)
        .unwrap_or_else(|e| panic!("{filter}: {e}"))
}

fn compile(filter: Json) -> CompiledFilter {
    compile_on(filter, &table(Identity::Full))
}

/// The message of the error from parsing or compiling `filter`.
fn rejection(filter: Json) -> String {
    let result = Filter::from_json(&filter).and_then(|f| f.compile(&table(Identity::Full)));
    match result {
        Ok(_) => panic!("{filter} was accepted"),
        Err(e) => e.to_string(),
    }
}

fn delivered(f: &CompiledFilter, ev: &Event) -> bool {
    f.evaluate(ev).is_deliver()
}

fn transition(f: &CompiledFilter, ev: &Event) -> Option<Transition> {
    match f.evaluate(ev) {
        Decision::Skip => None,
        Decision::Deliver { transition } => Some(transition.unwrap()),
    }
}

const DELIVER: Decision = Decision::Deliver { transition: None };

/// Whether a create whose `column` holds `value` passes `{"create": {column: condition}}`.
fn create_matches(column: &str, value: Value, condition: &Json) -> bool {
    let f = compile(json!({ "create": { column: condition } }));
    delivered(&f, &create(row(&[(column, value)])))
}

fn check_cases(cases: Vec<(&str, Value, Json, bool)>) {
    for (column, value, condition, want) in cases {
        assert_eq!(
            create_matches(column, value.clone(), &condition),
            want,
            "{column} = {value:?} with {condition}"
        );
    }
}

// ---- operators by type family --------------------------------------------------------

#[test]
fn integers() {
    check_cases(vec![
        ("id", int(7), json!(7), true),
        ("id", int(7), json!(8), false),
        ("id", int(7), json!({"equals": 7}), true),
        ("id", int(7), json!({"not": 7}), false),
        ("id", int(7), json!({"not": 8}), true),
        ("id", int(7), json!({"in": [1, 7]}), true),
        ("id", int(7), json!({"in": [1, 2]}), false),
        ("id", int(7), json!({"notIn": [1, 7]}), false),
        ("id", int(7), json!({"notIn": [1, 2]}), true),
        ("id", int(7), json!({"lt": 8}), true),
        ("id", int(7), json!({"lt": 7}), false),
        ("id", int(7), json!({"lte": 7}), true),
        ("id", int(7), json!({"gt": 6}), true),
        ("id", int(7), json!({"gt": 7}), false),
        ("id", int(7), json!({"gte": 8}), false),
        ("id", int(7), json!({"gt": 6, "lt": 8}), true),
        ("id", int(7), json!({"gt": 6, "lt": 7}), false),
        ("id", int(7), json!("7"), true),
        ("id", int(7), json!(7.0), true),
        ("id", int(7), json!({"isNull": false}), true),
        ("small", int(-3), json!({"lt": 0}), true),
        ("small", int(-3), json!({"gte": -3}), true),
        // Beyond f64's exact integers: strings keep int8 exact.
        (
            "big",
            int(9_007_199_254_740_993),
            json!("9007199254740993"),
            true,
        ),
        (
            "big",
            int(9_007_199_254_740_993),
            json!({"gt": "9007199254740992"}),
            true,
        ),
        ("big", int(i64::MIN), json!({"lt": i64::MIN + 1}), true),
    ]);
}

#[test]
fn floats_follow_postgres_nan_rules() {
    check_cases(vec![
        ("f8", float(1.5), json!(1.5), true),
        ("f8", float(1.5), json!({"gt": 1}), true),
        ("f8", float(1.5), json!({"lt": "Infinity"}), true),
        ("f8", float(1.5), json!({"gt": "-Infinity"}), true),
        ("f8", float(f64::NAN), json!("NaN"), true),
        ("f8", float(f64::NAN), json!({"equals": "nan"}), true),
        ("f8", float(f64::NAN), json!({"not": "NaN"}), false),
        ("f8", float(f64::NAN), json!({"gt": 1e308}), true),
        ("f8", float(f64::NAN), json!({"gt": "Infinity"}), true),
        ("f8", float(f64::NAN), json!({"lt": "NaN"}), false),
        ("f8", float(f64::NAN), json!({"lte": "NaN"}), true),
        ("f8", float(f64::NAN), json!({"in": [1, "NaN"]}), true),
        ("f8", float(f64::INFINITY), json!({"lt": "NaN"}), true),
        ("f8", float(f64::INFINITY), json!("Infinity"), true),
        ("f8", float(f64::NEG_INFINITY), json!({"lt": -1e308}), true),
        ("f8", float(-0.0), json!(0), true),
        ("f8", float(1.0), json!({"gt": "NaN"}), false),
        // float4 arrives as its shortest decimal text, parsed as f64.
        ("f4", float(0.1), json!(0.1), true),
        ("f4", float(0.1), json!({"lt": 0.2}), true),
    ]);
}

#[test]
fn numeric_compares_exactly() {
    let big = "123456789012345678901234567890";
    check_cases(vec![
        ("amount", num("0.10"), json!("0.1"), true),
        ("amount", num("0.10"), json!(0.1), true),
        (
            "amount",
            num("0.10"),
            json!({"gt": "0.09999999999999999999999"}),
            true,
        ),
        (
            "amount",
            num("0.10"),
            json!({"lt": "0.10000000000000000000001"}),
            true,
        ),
        ("amount", num(&format!("{big}.1")), json!({"gt": big}), true),
        (
            "amount",
            num(&format!("{big}.1")),
            json!({"equals": format!("{big}.10")}),
            true,
        ),
        (
            "amount",
            num(&format!("{big}.1")),
            json!({"lt": format!("{big}.1000001")}),
            true,
        ),
        (
            "amount",
            num(&format!("{big}.1")),
            json!(format!("{big}.0")),
            false,
        ),
        ("amount", num("-1.5"), json!({"lt": "-1.4"}), true),
        ("amount", num("-1.5"), json!({"lt": -1.5}), false),
        ("amount", num("-1.5"), json!({"gt": "-1.50001"}), true),
        ("amount", num("-1.5"), json!({"gt": 0}), false),
        ("amount", num("0"), json!("-0.000"), true),
        ("amount", num("0.000"), json!(0), true),
        ("amount", num("1000"), json!(1e3), true),
        ("amount", num("1000"), json!("1E+3"), true),
        ("amount", num("0.0015"), json!("1.5e-3"), true),
        ("amount", num("100"), json!({"gt": 99.99}), true),
        ("amount", num("99.99"), json!({"gte": "99.990"}), true),
        ("amount", num("NaN"), json!({"gt": "Infinity"}), true),
        ("amount", num("NaN"), json!("nan"), true),
        ("amount", num("Infinity"), json!({"gt": "1e30"}), true),
        ("amount", num("Infinity"), json!({"lt": "NaN"}), true),
        ("amount", num("-Infinity"), json!({"lt": -1e300}), true),
        ("amount", num("-Infinity"), json!({"equals": "-inf"}), true),
        ("amount", num("12.5"), json!({"in": ["12.50", 13]}), true),
    ]);
}

#[test]
fn text_by_code_point_case_sensitive() {
    let hello = "héllo wörld";
    check_cases(vec![
        ("name", t(hello), json!(hello), true),
        ("name", t(hello), json!({"contains": "ö"}), true),
        ("name", t(hello), json!({"contains": "Ö"}), false),
        ("name", t(hello), json!({"startsWith": "hé"}), true),
        ("name", t(hello), json!({"startsWith": "he"}), false),
        ("name", t(hello), json!({"endsWith": "wörld"}), true),
        ("name", t(hello), json!({"gt": "hello"}), true),
        ("name", t(hello), json!({"lt": "i"}), true),
        ("name", t("z"), json!({"lt": "é"}), true),
        ("name", t("Z"), json!({"lt": "a"}), true),
        ("name", t("😀"), json!({"gt": "\u{fffd}"}), true),
        ("name", t(""), json!({"startsWith": ""}), true),
        ("name", t("b"), json!({"not": {"in": ["a", "c"]}}), true),
        ("name", t("b"), json!({"not": {"startsWith": "b"}}), false),
        ("plan", t("pro"), json!({"in": ["pro", "team"]}), true),
        ("plan", t("free"), json!({"in": ["pro", "team"]}), false),
        // bpchar: padding does not count, as in Postgres.
        ("code", t("ab   "), json!("ab"), true),
        ("code", t("ab   "), json!("ab "), true),
        ("code", t("ab   "), json!({"endsWith": "b"}), true),
        ("code", t("ab   "), json!({"lt": "ab!"}), true),
        // Enums compare by label.
        ("mood", t("happy"), json!("happy"), true),
        ("mood", t("happy"), json!({"in": ["sad", "ok"]}), false),
        ("mood", t("happy"), json!({"startsWith": "ha"}), true),
        ("mood", t("happy"), json!({"gt": "angry"}), true),
    ]);
}

#[test]
fn uuid_literals_in_any_spelling() {
    let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    check_cases(vec![
        ("uid", t(u), json!(u), true),
        (
            "uid",
            t(u),
            json!("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            true,
        ),
        ("uid", t(u), json!("a0eebc999c0b4ef8bb6d6bb9bd380a11"), true),
        (
            "uid",
            t(u),
            json!("{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),
            true,
        ),
        (
            "uid",
            t(u),
            json!("b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            false,
        ),
        (
            "uid",
            t(u),
            json!({"gt": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a10"}),
            true,
        ),
    ]);
}

#[test]
fn booleans() {
    check_cases(vec![
        ("active", Value::Bool(true), json!(true), true),
        ("active", Value::Bool(true), json!(false), false),
        ("active", Value::Bool(true), json!({"not": true}), false),
        ("active", Value::Bool(false), json!({"not": true}), true),
        ("active", Value::Bool(true), json!({"in": [true]}), true),
    ]);
}

#[test]
fn timestamptz_as_instants() {
    let at = "2025-12-31 22:00:00+00";
    check_cases(vec![
        ("at", tstz(at), json!("2026-01-01T00:00:00+02:00"), true),
        ("at", tstz(at), json!("2025-12-31T22:00:00Z"), true),
        ("at", tstz(at), json!("2025-12-31 22:00:00z"), true),
        ("at", tstz(at), json!("2025-12-31T17:00:00-0500"), true),
        ("at", tstz(at), json!("2025-12-31T22:00:00.000001Z"), false),
        (
            "at",
            tstz(at),
            json!({"lt": "2025-12-31T22:00:00.000001Z"}),
            true,
        ),
        (
            "at",
            tstz(at),
            json!({"gt": "2025-12-31T17:00:00-05:00"}),
            false,
        ),
        (
            "at",
            tstz(at),
            json!({"gte": "2025-12-31T17:00:00-05:00"}),
            true,
        ),
        (
            "at",
            tstz("2026-11-27 10:00:00.123+00"),
            json!("2026-11-27T10:00:00.123Z"),
            true,
        ),
        (
            "at",
            tstz("2026-11-27 10:00:00.123+00"),
            json!("2026-11-27T15:30:00.123+05:30"),
            true,
        ),
        // Literals round to microseconds, as Postgres input does.
        (
            "at",
            tstz("2026-11-27 10:00:00.123+00"),
            json!("2026-11-27T10:00:00.1229996Z"),
            true,
        ),
        (
            "at",
            tstz("2026-11-27 10:00:00+05:30"),
            json!("2026-11-27T04:30:00Z"),
            true,
        ),
        (
            "at",
            tstz("infinity"),
            json!({"gt": "294276-12-31T23:59:59Z"}),
            true,
        ),
        (
            "at",
            tstz("-infinity"),
            json!({"lt": "0001-01-01T00:00:00Z"}),
            true,
        ),
        ("at", tstz("infinity"), json!("infinity"), true),
        (
            "at",
            tstz("0044-03-15 10:00:00+00 BC"),
            json!({"lt": "0001-01-01T00:00:00Z"}),
            true,
        ),
        (
            "at",
            tstz("0044-03-15 10:00:00+00 BC"),
            json!("-0043-03-15T10:00:00Z"),
            true,
        ),
        (
            "at",
            tstz("2024-02-29 00:00:00+00"),
            json!({"gt": "2024-02-28T23:59:59.999999Z"}),
            true,
        ),
    ]);
}

#[test]
fn timestamp_date_time() {
    check_cases(vec![
        (
            "local",
            ts("2026-11-27 10:00:00.5"),
            json!("2026-11-27T10:00:00.5"),
            true,
        ),
        (
            "local",
            ts("2026-11-27 10:00:00.5"),
            json!("2026-11-27 10:00:00.500000"),
            true,
        ),
        (
            "local",
            ts("2026-11-27 10:00:00.5"),
            json!({"gt": "2026-11-27T10:00:00.45"}),
            true,
        ),
        (
            "local",
            ts("2026-11-27 10:00:00.5"),
            json!({"gte": "2026-11-27"}),
            true,
        ),
        (
            "local",
            ts("2026-11-27 10:00:00.5"),
            json!({"lt": "2026-11-28"}),
            true,
        ),
        (
            "local",
            ts("12026-01-01 00:00:00"),
            json!({"gt": "9999-12-31T23:59:59"}),
            true,
        ),
        ("day", t("2026-11-27"), json!("2026-11-27"), true),
        ("day", t("2026-11-27"), json!({"gt": "2026-02-28"}), true),
        ("day", t("2026-11-27"), json!({"lt": "2026-11-27"}), false),
        ("day", t("0044-03-15 BC"), json!({"lt": "0001-01-01"}), true),
        ("day", t("infinity"), json!({"gt": "9999-12-31"}), true),
        ("tod", t("10:00:00.5"), json!({"gt": "10:00"}), true),
        ("tod", t("10:00:00.5"), json!("10:00:00.500"), true),
        ("tod", t("10:00:00.5"), json!({"lt": "09:59:59"}), false),
        ("tod", t("24:00:00"), json!({"gt": "23:59:59.999999"}), true),
        // timetz: equal only with the same offset, ordered by UTC time first.
        ("toz", t("10:00:00+02"), json!("10:00:00+02:00"), true),
        ("toz", t("10:00:00+02"), json!("08:00:00+00"), false),
        ("toz", t("10:00:00+02"), json!({"gt": "07:59:59+00"}), true),
        ("toz", t("10:00:00+02"), json!({"lt": "08:00:01Z"}), true),
    ]);
}

/// Values beyond RFC 3339 compare by what they mean, whether spelled as Postgres sends
/// them or as events write them (the log's filters read the latter).
#[test]
fn edge_values_in_both_spellings() {
    let date = |s: &str| Value::Date(text(s));
    let bounded = || Value::BoundedArray {
        lower_bounds: vec![0],
        values: vec![int(1), int(2)],
    };
    check_cases(vec![
        ("born", date("0097-02-16 BC"), json!("-000096-02-16"), true),
        ("born", date("-000096-02-16"), json!("0097-02-16 BC"), true),
        (
            "born",
            date("-000096-02-16"),
            json!({"lt": "0001-01-01"}),
            true,
        ),
        ("born", date("+000000-12-31"), json!("0001-12-31 BC"), true),
        (
            "born",
            date("+5874897-12-31"),
            json!({"gt": "9999-12-31"}),
            true,
        ),
        (
            "born",
            date("+010000-01-01"),
            json!({"lt": "+010000-01-02"}),
            true,
        ),
        (
            "born",
            date("infinity"),
            json!({"gt": "+5874897-12-31"}),
            true,
        ),
        (
            "born",
            date("-infinity"),
            json!({"lt": "-004713-11-24"}),
            true,
        ),
        (
            "at",
            tstz("+294276-12-31T23:59:59.999999Z"),
            json!({"gt": "9999-12-31T23:59:59Z"}),
            true,
        ),
        (
            "at",
            tstz("+294276-12-31T23:59:59.999999Z"),
            json!("294276-12-31 23:59:59.999999+00"),
            true,
        ),
        (
            "at",
            tstz("-000096-02-16T00:00:00.000000Z"),
            json!("0097-02-16 00:00:00+00 BC"),
            true,
        ),
        (
            "local",
            ts("+000000-01-01T00:00:00.000000"),
            json!({"lt": "0001-01-01T00:00:00"}),
            true,
        ),
        (
            "at",
            tstz("infinity"),
            json!({"gt": "+294276-12-31T23:59:59Z"}),
            true,
        ),
        // A bounded array is never equal to a literal (whose lower bounds are all 1, and
        // Postgres compares bounds), but its elements are searched as any array's.
        ("nums", bounded(), json!([1, 2]), false),
        ("nums", bounded(), json!({"contains": 2}), true),
        ("nums", bounded(), json!({"contains": 3}), false),
    ]);
}

#[test]
fn json_semantic_equality() {
    let d = r#"{"a": 1, "b": [1, 2.0], "c": {"x": null}}"#;
    check_cases(vec![
        (
            "doc",
            doc(d),
            json!({"equals": {"c": {"x": null}, "b": [1, 2], "a": 1.0}}),
            true,
        ),
        ("doc", doc(d), json!({"equals": {"a": 1}}), false),
        ("doc", doc(d), json!({"not": {"equals": {"a": 1}}}), true),
        ("doc", doc(d), json!({"isNull": false}), true),
        ("doc", doc("[1, 2]"), json!([1, 2]), true),
        ("doc", doc("[1, 2]"), json!([2, 1]), false),
        ("doc", doc(r#""x""#), json!("x"), true),
        ("doc", doc("3"), json!({"in": [1, 3.0]}), true),
        ("doc", Value::Null, json!(null), true),
    ]);
}

#[test]
fn arrays_equal_and_contain() {
    let tags = || arr(vec![t("a"), t("b")]);
    let nums = || arr(vec![int(1), Value::Null, int(3)]);
    let grid = || arr(vec![arr(vec![int(1), int(2)]), arr(vec![int(3), int(4)])]);
    check_cases(vec![
        ("tags", tags(), json!(["a", "b"]), true),
        ("tags", tags(), json!(["b", "a"]), false),
        ("tags", tags(), json!(["a"]), false),
        ("tags", tags(), json!({"equals": ["a", "b"]}), true),
        ("tags", tags(), json!({"contains": "b"}), true),
        ("tags", tags(), json!({"contains": "c"}), false),
        ("tags", tags(), json!({"not": {"contains": "c"}}), true),
        ("tags", arr(vec![]), json!([]), true),
        ("nums", nums(), json!([1, null, 3]), true),
        ("nums", nums(), json!([1, 2, 3]), false),
        ("nums", nums(), json!({"contains": 3}), true),
        ("nums", nums(), json!({"contains": 2}), false),
        ("nums", nums(), json!({"in": [[1], [1, null, 3]]}), true),
        ("nums", grid(), json!([[1, 2], [3, 4]]), true),
        ("nums", grid(), json!([1, 2, 3, 4]), false),
        ("nums", grid(), json!({"contains": 4}), true),
    ]);
}

#[test]
fn opaque_and_bytea_types() {
    check_cases(vec![
        ("span", t("1 day 02:00:00"), json!("1 day 02:00:00"), true),
        ("span", t("1 day 02:00:00"), json!("26:00:00"), false),
        (
            "span",
            t("1 day 02:00:00"),
            json!({"notIn": ["1 day"]}),
            true,
        ),
        (
            "raw",
            Value::Bytea(Bytes::from_static(b"hi")),
            json!("aGk="),
            true,
        ),
        (
            "raw",
            Value::Bytea(Bytes::from_static(b"hi")),
            json!("\\x6869"),
            true,
        ),
        (
            "raw",
            Value::Bytea(Bytes::from_static(b"hi")),
            json!("aGE="),
            false,
        ),
    ]);
}

#[test]
fn null_values_follow_sql() {
    check_cases(vec![
        ("name", Value::Null, json!(null), true),
        ("name", Value::Null, json!({"equals": null}), true),
        ("name", Value::Null, json!({"isNull": true}), true),
        ("name", Value::Null, json!({"isNull": false}), false),
        ("name", Value::Null, json!({"not": null}), false),
        ("name", t("x"), json!({"not": null}), true),
        ("name", t("x"), json!({"isNull": true}), false),
        ("name", t("x"), json!(null), false),
        // `plan <> 'x'` does not select NULL rows; neither does NOT (plan = 'x').
        ("name", Value::Null, json!({"not": "x"}), false),
        ("name", Value::Null, json!("x"), false),
        ("name", Value::Null, json!({"lt": "x"}), false),
        ("name", Value::Null, json!({"startsWith": ""}), false),
        ("name", Value::Null, json!({"notIn": ["a"]}), false),
        // A null element in a list: "or is NULL" / "and is not NULL".
        ("name", Value::Null, json!({"in": ["a", null]}), true),
        ("name", t("b"), json!({"in": ["a", null]}), false),
        ("name", t("a"), json!({"in": ["a", null]}), true),
        ("name", Value::Null, json!({"notIn": ["a", null]}), false),
        ("name", t("b"), json!({"notIn": ["a", null]}), true),
        ("name", Value::Null, json!({"in": [null]}), true),
        // Empty lists: nothing is in them, everything is outside.
        ("name", t("a"), json!({"in": []}), false),
        ("name", Value::Null, json!({"notIn": []}), true),
        (
            "nums",
            arr(vec![Value::Null]),
            json!({"contains": 1}),
            false,
        ),
    ]);
}

#[test]
fn and_or_not() {
    let r = || row(&[("id", int(7)), ("plan", t("pro")), ("email", t("a@x.io"))]);
    let cases = [
        (
            json!({"OR": [{"plan": "free"}, {"email": {"endsWith": "@x.io"}}]}),
            true,
        ),
        (json!({"OR": [{"plan": "free"}, {"id": 8}]}), false),
        (json!({"AND": [{"plan": "pro"}, {"id": {"gt": 10}}]}), false),
        (json!({"AND": [{"plan": "pro"}, {"id": {"lt": 10}}]}), true),
        (json!({"AND": {"plan": "pro"}}), true),
        (json!({"NOT": {"plan": "free"}}), true),
        (json!({"NOT": [{"plan": "free"}, {"id": 7}]}), false),
        (json!({"NOT": [{"plan": "free"}, {"id": 8}]}), true),
        (json!({"NOT": []}), true),
        (json!({"OR": []}), false),
        (json!({"AND": []}), true),
        (json!({}), true),
        (
            json!({"plan": "pro", "OR": [{"id": 1}, {"id": 7}], "NOT": {"email": {"contains": "y"}}}),
            true,
        ),
        (
            json!({"NOT": {"OR": [{"id": 1}, {"NOT": {"plan": "pro"}}]}}),
            true,
        ),
        (
            json!({"OR": [{"AND": [{"id": 7}, {"plan": "free"}]}, {"AND": [{"id": 7}, {"plan": "pro"}]}]}),
            true,
        ),
        // SQL NULL inside combinators: NOT (NULL = 'pro') is not true.
        (json!({"NOT": {"name": "pro"}}), false),
        (json!({"OR": [{"name": "pro"}, {"id": 7}]}), true),
        (json!({"NOT": {"AND": [{"name": "pro"}, {"id": 8}]}}), true),
    ];
    for (predicate, want) in cases {
        let f = compile(json!({ "create": predicate }));
        assert_eq!(delivered(&f, &create(r())), want, "{predicate}");
    }
}

// ---- three-valued logic --------------------------------------------------------------

/// The truth-set operations agree with SQL's tables applied to every combination.
#[test]
fn truth_sets_lift_sql_logic() {
    // 0 = TRUE, 1 = FALSE, 2 = NULL, as bits 1, 2, 4.
    let sql_and = |x: u8, y: u8| match (x, y) {
        (1, _) | (_, 1) => 1,
        (0, 0) => 0,
        _ => 2,
    };
    let sql_or = |x: u8, y: u8| match (x, y) {
        (0, _) | (_, 0) => 0,
        (1, 1) => 1,
        _ => 2,
    };
    let sql_not = |x: u8| [1, 0, 2][usize::from(x)];
    let lift2 = |a: u8, b: u8, op: &dyn Fn(u8, u8) -> u8| {
        let mut out = 0;
        for x in 0..3 {
            for y in 0..3 {
                if a & (1 << x) != 0 && b & (1 << y) != 0 {
                    out |= 1 << op(x, y);
                }
            }
        }
        out
    };
    for a in 1..8u8 {
        let not = (0..3)
            .filter(|x| a & (1 << x) != 0)
            .fold(0, |acc, x| acc | (1 << sql_not(x)));
        assert_eq!(Truth::for_tests(a).not(), Truth::for_tests(not), "NOT {a}");
        for b in 1..8u8 {
            assert_eq!(
                Truth::for_tests(a).and(Truth::for_tests(b)),
                Truth::for_tests(lift2(a, b, &sql_and)),
                "{a} AND {b}"
            );
            assert_eq!(
                Truth::for_tests(a).or(Truth::for_tests(b)),
                Truth::for_tests(lift2(a, b, &sql_or)),
                "{a} OR {b}"
            );
        }
    }
}

#[test]
fn key_only_rows_are_unknown_beyond_the_key() {
    let on =
        |predicate: Json| compile_on(json!({ "delete": predicate }), &table(Identity::Default));
    let cases = [
        (json!({"plan": "pro"}), true),
        (json!({"id": 7}), true),
        (json!({"id": 8}), false),
        (json!({"id": 8, "plan": "pro"}), false),
        (json!({"id": 7, "plan": "pro"}), true),
        (json!({"OR": [{"id": 7}, {"plan": "x"}]}), true),
        (json!({"OR": [{"id": 8}, {"plan": "x"}]}), true),
        (json!({"NOT": {"plan": "pro"}}), true),
        (json!({"NOT": {"OR": [{"id": 7}, {"plan": "x"}]}}), false),
        (json!({"plan": {"isNull": true}}), true),
        (json!({"plan": {"isNull": false}}), true),
        (json!({"plan": {"in": []}}), false),
        (json!({"NOT": {"plan": {"notIn": []}}}), false),
    ];
    for (predicate, want) in cases {
        assert_eq!(
            delivered(&on(predicate.clone()), &delete_key(7)),
            want,
            "{predicate}"
        );
    }
    // With the full row the same filter decides.
    let f = compile(json!({"delete": {"plan": "pro"}}));
    assert!(!delivered(
        &f,
        &delete_full(row(&[("id", int(7)), ("plan", t("free"))]))
    ));
    assert!(delivered(
        &f,
        &delete_full(row(&[("id", int(7)), ("plan", t("pro"))]))
    ));
}

#[test]
fn unchanged_toast_is_unknown_and_delivered() {
    let mut after = row(&[("id", int(7)), ("plan", t("pro"))]);
    let doc_index = names().iter().position(|n| &**n == "doc").unwrap();
    after.values[doc_index] = None;
    let mut ev = update_default(after);
    ev.unchanged = vec!["doc".into()];
    let deliver = [
        json!({"update": {"after": {"doc": {"equals": {"a": 1}}}}}),
        json!({"update": {"after": {"doc": {"isNull": true}}}}),
        json!({"update": {"after": {"NOT": {"doc": {"equals": {"a": 1}}}}}}),
        json!({"where": {"doc": {"not": null}, "plan": "pro"}}),
    ];
    for f in deliver {
        assert!(delivered(&compile(f.clone()), &ev), "{f}");
    }
    let skip = [
        json!({"update": {"after": {"doc": {"equals": {"a": 1}}, "id": 8}}}),
        json!({"where": {"doc": {"not": null}, "plan": "free"}}),
    ];
    for f in skip {
        assert!(!delivered(&compile(f.clone()), &ev), "{f}");
    }
}

#[test]
fn columns_moved_or_dropped_by_alter_table() {
    let f = compile(json!({"create": {"plan": "pro", "id": {"gt": 1}}}));
    // Columns reordered and one dropped: names are re-resolved.
    let names: Arc<[Arc<str>]> = vec![Arc::from("plan"), Arc::from("id")].into();
    let moved = |plan: &str| Row {
        names: names.clone(),
        values: vec![Some(t(plan)), Some(int(7))],
    };
    assert!(delivered(&f, &create(moved("pro"))));
    assert!(!delivered(&f, &create(moved("free"))));
    assert!(delivered(
        &f,
        &create(row(&[("id", int(7)), ("plan", t("pro"))]))
    ));
    // `plan` gone: unknown, delivered unless the rest rules the row out.
    let without: Arc<[Arc<str>]> = vec![Arc::from("id")].into();
    let gone = |id| Row {
        names: without.clone(),
        values: vec![Some(int(id))],
    };
    assert!(delivered(&f, &create(gone(7))));
    assert!(!delivered(&f, &create(gone(0))));
    // A value of another type (ALTER COLUMN TYPE) is unknown too.
    let retyped = row(&[("id", t("7")), ("plan", t("pro"))]);
    assert!(delivered(&f, &create(retyped)));
}

// ---- actions -------------------------------------------------------------------------

#[test]
fn action_keys_select_actions() {
    let pro = || row(&[("id", int(7)), ("plan", t("pro"))]);
    let events = [
        create(pro()),
        update_full(pro(), pro()),
        delete_full(pro()),
        truncate(),
    ];
    let cases = [
        (json!({"create": {}}), [true, false, false, false]),
        (json!({"update": {}}), [false, true, false, false]),
        (json!({"delete": {}}), [false, false, true, false]),
        (
            json!({"create": {}, "delete": {}}),
            [true, false, true, false],
        ),
        (json!({}), [true, true, true, false]),
        (json!({"create": null}), [true, true, true, false]),
        (json!({"truncate": true}), [true, true, true, true]),
        (
            json!({"create": {}, "truncate": true}),
            [true, false, false, true],
        ),
        (json!({"where": {}}), [true, true, true, false]),
        (
            json!({"where": {}, "truncate": true}),
            [true, true, true, true],
        ),
        (
            json!({"create": {"plan": "free"}, "update": {}}),
            [false, true, false, false],
        ),
    ];
    for (filter, want) in cases {
        let f = compile(filter.clone());
        let got = events.each_ref().map(|ev| delivered(&f, ev));
        assert_eq!(got, want, "{filter}");
    }
    let all = CompiledFilter::accept_all();
    for ev in &events {
        assert_eq!(all.evaluate(ev), DELIVER);
    }
    assert!(all.warnings().is_empty() && !all.single_row_key() && !all.transitions());
    assert_eq!(
        CompiledFilter::new(None, &table(Identity::Default))
            .unwrap()
            .evaluate(&truncate()),
        DELIVER
    );
}

#[test]
fn create_update_delete_predicates() {
    let f = compile(json!({
        "create": {"plan": "pro"},
        "update": {"after": {"plan": {"in": ["pro", "team"]}, "email": {"endsWith": "@x.io"}}},
        "delete": {"plan": "pro"},
    }));
    let r =
        |plan: &str, email: &str| row(&[("id", int(7)), ("plan", t(plan)), ("email", t(email))]);
    assert_eq!(f.evaluate(&create(r("pro", "a@x.io"))), DELIVER);
    assert_eq!(f.evaluate(&create(r("free", "a@x.io"))), Decision::Skip);
    assert!(delivered(
        &f,
        &update_full(r("free", "a@x.io"), r("team", "a@x.io"))
    ));
    assert!(!delivered(
        &f,
        &update_full(r("free", "a@x.io"), r("team", "a@y.io"))
    ));
    assert!(delivered(&f, &delete_full(r("pro", "b@y.io"))));
    assert!(!delivered(&f, &delete_full(r("free", "b@y.io"))));
    assert!(!delivered(&f, &truncate()));
}

#[test]
fn update_before_and_after() {
    let r = |id, plan: &str| row(&[("id", int(id)), ("plan", t(plan))]);
    let both = compile(json!({"update": {"before": {"plan": "free"}, "after": {"plan": "pro"}}}));
    assert!(delivered(&both, &update_full(r(7, "free"), r(7, "pro"))));
    assert!(!delivered(&both, &update_full(r(7, "pro"), r(7, "pro"))));
    assert!(!delivered(&both, &update_full(r(7, "free"), r(7, "team"))));
    let before = compile(json!({"update": {"before": {"plan": "free"}}}));
    assert!(delivered(&before, &update_full(r(7, "free"), r(7, "team"))));
    assert!(!delivered(
        &before,
        &update_full(r(7, "team"), r(7, "free"))
    ));

    // REPLICA IDENTITY DEFAULT, key unchanged: no before row, the key is the after's.
    let default = table(Identity::Default);
    let by_key = |id: i64| compile_on(json!({"update": {"before": {"id": id}}}), &default);
    assert!(delivered(&by_key(7), &update_default(r(7, "pro"))));
    assert!(!delivered(&by_key(8), &update_default(r(7, "pro"))));
    let by_plan = compile_on(json!({"update": {"before": {"plan": "free"}}}), &default);
    assert!(delivered(&by_plan, &update_default(r(7, "pro"))));
    // The key changed: the before row holds the old key only.
    let moved = event(
        Action::Update,
        Identity::Default,
        Some(r(7, "pro")),
        Some(key_row(6)),
    );
    assert!(delivered(&by_key(6), &moved));
    assert!(!delivered(&by_key(7), &moved));
    assert!(delivered(&by_plan, &moved));
}

#[test]
fn where_applies_to_every_action() {
    let f = compile(json!({"where": {"plan": "pro"}}));
    let r = |plan: &str| row(&[("id", int(7)), ("plan", t(plan))]);
    assert_eq!(f.evaluate(&create(r("pro"))), DELIVER);
    assert_eq!(f.evaluate(&create(r("free"))), Decision::Skip);
    assert_eq!(f.evaluate(&update_full(r("free"), r("pro"))), DELIVER);
    assert_eq!(
        f.evaluate(&update_full(r("pro"), r("free"))),
        Decision::Skip
    );
    assert_eq!(f.evaluate(&delete_full(r("pro"))), DELIVER);
    assert_eq!(f.evaluate(&delete_full(r("free"))), Decision::Skip);
    assert_eq!(f.evaluate(&truncate()), Decision::Skip);
    assert!(!f.transitions());
}

#[test]
fn fields_gate_updates() {
    let r = |id, plan: &str, email: &str| {
        row(&[("id", int(id)), ("plan", t(plan)), ("email", t(email))])
    };
    let plan = compile(json!({"fields": ["plan"]}));
    let email_or_plan = compile(json!({"fields": ["email", "plan"]}));
    let changes_plan = update_full(r(7, "free", "a"), r(7, "pro", "a"));
    let changes_email = update_full(r(7, "pro", "a"), r(7, "pro", "b"));
    assert!(delivered(&plan, &changes_plan));
    assert!(!delivered(&plan, &changes_email));
    assert!(delivered(&email_or_plan, &changes_email));
    // Other actions pass.
    assert!(delivered(&plan, &create(r(7, "pro", "a"))));
    assert!(delivered(&plan, &delete_full(r(7, "pro", "a"))));
    // Combined with an update predicate: both must pass.
    let both = compile(json!({"update": {"after": {"plan": "pro"}}, "fields": ["email"]}));
    assert!(delivered(&both, &changes_email));
    assert!(!delivered(&both, &changes_plan));

    // No `changed` (no full before image): unknown is delivered...
    let default = table(Identity::Default);
    let on = |fields: Json| compile_on(json!({ "fields": fields }), &default);
    let ev = update_default(r(7, "pro", "a"));
    assert!(delivered(&on(json!(["plan"])), &ev));
    // ...but a key column did not change when there is no before row...
    assert!(!delivered(&on(json!(["id"])), &ev));
    // ...and a column reported unchanged did not change.
    let mut toast = ev.clone();
    toast.unchanged = vec!["doc".into()];
    assert!(!delivered(&on(json!(["doc"])), &toast));
    assert!(delivered(&on(json!(["doc", "plan"])), &toast));
    // The key changed: both sides present, compared.
    let moved = event(
        Action::Update,
        Identity::Default,
        Some(r(7, "pro", "a")),
        Some(key_row(6)),
    );
    assert!(delivered(&on(json!(["id"])), &moved));
    let kept = event(
        Action::Update,
        Identity::Default,
        Some(r(7, "pro", "a")),
        Some(key_row(7)),
    );
    assert!(!delivered(&on(json!(["id"])), &kept));
    // Both values present without `changed`: compared, NaN equal to NaN.
    let nan = |x: f64| row(&[("id", int(7)), ("f8", float(x))]);
    let same = event(
        Action::Update,
        Identity::Index,
        Some(nan(f64::NAN)),
        Some(nan(f64::NAN)),
    );
    assert!(!delivered(&on(json!(["f8"])), &same));
    let differ = event(
        Action::Update,
        Identity::Index,
        Some(nan(1.0)),
        Some(nan(f64::NAN)),
    );
    assert!(delivered(&on(json!(["f8"])), &differ));
}

// ---- transitions ---------------------------------------------------------------------

#[test]
fn transitions_with_full_before_image() {
    let f = compile(json!({"where": {"plan": {"in": ["pro", "team"]}}, "transitions": true}));
    assert!(f.transitions());
    assert!(f.warnings().is_empty());
    let r = |plan: &str| row(&[("id", int(7)), ("plan", t(plan))]);
    use Transition::*;
    let cases = [
        (create(r("pro")), Some(Appear)),
        (create(r("free")), None),
        (delete_full(r("team")), Some(Disappear)),
        (delete_full(r("free")), None),
        (update_full(r("free"), r("pro")), Some(Appear)),
        (update_full(r("pro"), r("free")), Some(Disappear)),
        (update_full(r("pro"), r("team")), Some(Update)),
        (update_full(r("free"), r("basic")), None),
        (truncate(), None),
    ];
    for (ev, want) in &cases {
        assert_eq!(transition(&f, ev), *want, "{:?}", ev.action);
    }
    let with_truncate =
        compile(json!({"where": {"plan": "pro"}, "transitions": true, "truncate": true}));
    assert_eq!(with_truncate.evaluate(&truncate()), DELIVER);
    // Without `where` the set is every row.
    let every = compile(json!({"transitions": true}));
    assert_eq!(transition(&every, &create(r("x"))), Some(Appear));
    assert_eq!(
        transition(&every, &update_full(r("x"), r("y"))),
        Some(Update)
    );
    assert_eq!(transition(&every, &delete_full(r("x"))), Some(Disappear));
}

#[test]
fn transitions_with_fields_gate_only_updates() {
    let f = compile(json!({"where": {"plan": "pro"}, "transitions": true, "fields": ["email"]}));
    let r =
        |plan: &str, email: &str| row(&[("id", int(7)), ("plan", t(plan)), ("email", t(email))]);
    use Transition::*;
    assert_eq!(
        transition(&f, &update_full(r("pro", "a"), r("pro", "b"))),
        Some(Update)
    );
    assert_eq!(
        transition(&f, &update_full(r("pro", "a"), r("pro", "a"))),
        None
    );
    assert_eq!(
        transition(&f, &update_full(r("free", "a"), r("pro", "a"))),
        Some(Appear)
    );
    assert_eq!(
        transition(&f, &update_full(r("pro", "a"), r("free", "a"))),
        Some(Disappear)
    );
}

#[test]
fn transitions_without_before_image() {
    let default = table(Identity::Default);
    let f = compile_on(
        json!({"where": {"plan": "pro"}, "transitions": true}),
        &default,
    );
    let r = |id, plan: &str| row(&[("id", int(id)), ("plan", t(plan))]);
    use Transition::*;
    assert_eq!(transition(&f, &create(r(7, "pro"))), Some(Appear));
    // Appear and update both mean upsert: reported as update.
    assert_eq!(transition(&f, &update_default(r(7, "pro"))), Some(Update));
    // Leaving the set cannot be seen.
    assert_eq!(transition(&f, &update_default(r(7, "free"))), None);
    // A key-only delete might have been in the set.
    assert_eq!(transition(&f, &delete_key(7)), Some(Disappear));
    let [w] = f.warnings() else {
        panic!("{:?}", f.warnings())
    };
    for part in [
        "transitions",
        "public.t",
        "DEFAULT",
        "`disappear`",
        "upsert",
        "REPLICA IDENTITY FULL",
    ] {
        assert!(w.contains(part), "{part} in {w}");
    }

    // A set defined by the key alone is fully visible: no warning.
    let by_key = compile_on(json!({"where": {"id": 7}, "transitions": true}), &default);
    assert!(by_key.warnings().is_empty());
    assert_eq!(
        transition(&by_key, &update_default(r(7, "x"))),
        Some(Update)
    );
    assert_eq!(transition(&by_key, &update_default(r(8, "x"))), None);
    let into = event(
        Action::Update,
        Identity::Default,
        Some(r(7, "x")),
        Some(key_row(6)),
    );
    assert_eq!(transition(&by_key, &into), Some(Appear));
    let out = event(
        Action::Update,
        Identity::Default,
        Some(r(8, "x")),
        Some(key_row(7)),
    );
    assert_eq!(transition(&by_key, &out), Some(Disappear));
    assert_eq!(transition(&by_key, &delete_key(7)), Some(Disappear));
    assert_eq!(transition(&by_key, &delete_key(8)), None);
}

// ---- warnings and single_row_key -----------------------------------------------------

#[test]
fn warnings_name_what_identity_hides() {
    let default = table(Identity::Default);
    let warned = |filter: Json| compile_on(filter, &default).warnings().to_vec();
    let none = [
        json!({}),
        json!({"delete": {"id": 1}}),
        json!({"update": {"before": {"id": 1}, "after": {"plan": "x"}}}),
        json!({"create": {"plan": "x"}}),
        json!({"fields": ["id"]}),
    ];
    for f in none {
        assert_eq!(warned(f.clone()), Vec::<String>::new(), "{f}");
    }
    let some = [
        (
            json!({"delete": {"plan": "x", "id": 1}}),
            ["delete:", "plan", "only the primary key"],
        ),
        (
            json!({"update": {"before": {"email": "x"}}}),
            ["update.before:", "email", "at most the primary key"],
        ),
        (
            json!({"where": {"plan": "x"}}),
            ["where:", "plan", "deleted rows"],
        ),
        (
            json!({"fields": ["plan", "id"]}),
            ["fields:", "whether plan changed", "unchanged"],
        ),
    ];
    for (f, parts) in some {
        let w = warned(f.clone());
        assert_eq!(w.len(), 1, "{f}: {w:?}");
        for part in parts {
            assert!(w[0].contains(part), "{f}: {part} in {}", w[0]);
        }
        assert!(
            w[0].contains("public.t has REPLICA IDENTITY DEFAULT"),
            "{}",
            w[0]
        );
    }
    // FULL hides nothing.
    let full = compile(
        json!({"delete": {"plan": "x"}, "update": {"before": {"plan": "x"}}, "fields": ["plan"]}),
    );
    assert!(full.warnings().is_empty());
    let index = compile_on(json!({"delete": {"id": 1}}), &table(Identity::Index));
    assert!(
        index.warnings()[0].contains("replica identity index"),
        "{:?}",
        index.warnings()
    );
}

#[test]
fn single_row_key() {
    let cases = [
        (json!({"where": {"id": 7}}), true),
        (json!({"where": {"id": {"equals": 7}}}), true),
        (json!({"where": {"id": {"in": [7]}}}), true),
        (json!({"where": {"AND": [{"id": 7}]}}), true),
        (json!({"where": {"id": 7}, "transitions": true}), true),
        (json!({"where": {"id": 7}, "fields": ["name"]}), true),
        (json!({"where": {"id": {"in": [7, 8]}}}), false),
        (json!({"where": {"id": {"gt": 7}}}), false),
        (json!({"where": {"id": {"not": 7}}}), false),
        (json!({"where": {"id": {"isNull": true}}}), false),
        (json!({"where": {"OR": [{"id": 7}]}}), false),
        (json!({"where": {"NOT": {"id": 7}}}), false),
        // Not a pure pin: the row may exist without matching.
        (json!({"where": {"AND": [{"id": 7}, {"name": "x"}]}}), false),
        (json!({"where": {"id": 7, "name": "x"}}), false),
        (json!({"where": {"name": "pro"}}), false),
        // A filter by action does not follow every change of the row.
        (json!({"create": {"id": 7}, "delete": {"id": 7}}), false),
        (json!({"update": {"after": {"id": 7}}}), false),
        (json!({}), false),
        (json!({"transitions": true}), false),
    ];
    for (filter, want) in cases {
        assert_eq!(compile(filter.clone()).single_row_key(), want, "{filter}");
    }
    let composite = table_with(Identity::Full, &["id", "name"]);
    let on_composite = |f: Json| compile_on(f, &composite).single_row_key();
    assert!(!on_composite(json!({"where": {"id": 7}})));
    assert!(on_composite(json!({"where": {"id": 7, "name": "x"}})));
    assert!(on_composite(
        json!({"where": {"AND": [{"name": {"equals": "x"}}, {"AND": [{"id": 7}]}]}})
    ));
    assert!(!on_composite(
        json!({"where": {"id": 7, "name": {"in": ["x", "y"]}}})
    ));
    assert!(!on_composite(
        json!({"where": {"OR": [{"id": 7, "name": "x"}]}})
    ));
    assert!(!on_composite(
        json!({"where": {"id": 7, "name": "x", "big": 1}})
    ));
    let keyless = table_with(Identity::Full, &[]);
    assert!(!compile_on(json!({"where": {"id": 7}}), &keyless).single_row_key());
}

#[test]
fn pinned_row_follows_the_row_by_its_key() {
    use PinnedRow::{Exists, Gone};
    let pin = compile(json!({"where": {"id": 7}}));
    let seven = || row(&[("id", int(7)), ("name", t("a"))]);
    let eight = || row(&[("id", int(8)), ("name", t("a"))]);
    let cases = [
        (delete_full(seven()), Some(Gone)),
        (delete_key(7), Some(Gone)),
        (delete_key(8), None),
        (truncate(), Some(Gone)),
        (create(seven()), Some(Exists)),
        (create(eight()), None),
        // The key moved away: the pinned row no longer exists.
        (update_full(seven(), eight()), Some(Gone)),
        (update_full(eight(), seven()), Some(Exists)),
        (update_full(eight(), eight()), None),
        (update_full(seven(), seven()), Some(Exists)),
        // REPLICA IDENTITY DEFAULT: the key did not change.
        (update_default(seven()), Some(Exists)),
        (update_default(eight()), None),
        // ... or it did, and Postgres sent the old key.
        (
            event(
                Action::Update,
                Identity::Default,
                Some(eight()),
                Some(key_row(7)),
            ),
            Some(Gone),
        ),
    ];
    for (ev, want) in cases {
        assert_eq!(pin.pinned_row(&ev), want, "{ev:?}");
    }
    let transitions = compile(json!({"where": {"id": 7}, "transitions": true}));
    assert_eq!(transitions.pinned_row(&delete_key(7)), Some(Gone));
    // Other filters follow no row.
    for f in [
        json!({"where": {"id": {"gt": 7}}}),
        json!({"delete": {"id": 7}}),
    ] {
        assert_eq!(compile(f.clone()).pinned_row(&delete_key(7)), None, "{f}");
    }
    // An update under an index identity that may have moved the key without saying so.
    let index = compile_on(json!({"where": {"id": 7}}), &table(Identity::Index));
    let unknown_before = event(Action::Update, Identity::Index, Some(eight()), None);
    assert_eq!(index.pinned_row(&unknown_before), None);
}

// ---- rejections ----------------------------------------------------------------------

#[test]
fn unknown_columns_are_named_with_the_table_columns() {
    let msg = rejection(json!({"create": {"nope": 1}}));
    assert!(
        msg.starts_with(
            "create.nope: table public.t has no column \"nope\" (its columns: id, small, big,"
        ),
        "{msg}"
    );
    assert!(msg.ends_with("plan, email)"), "{msg}");
    let err = Filter::from_json(&json!({"update": {"after": {"OR": [{"id": 1}, {"x": 2}]}}}))
        .unwrap()
        .compile(&table(Identity::Full))
        .unwrap_err();
    match err {
        FilterError::UnknownColumn {
            table,
            column,
            path,
            available,
        } => {
            assert_eq!((table.as_str(), column.as_str()), ("public.t", "x"));
            assert_eq!(path, "update.after.OR[1].x");
            assert_eq!(available.len(), 24);
        }
        other => panic!("{other:?}"),
    }
    assert!(rejection(json!({"fields": ["plan", "nope"]}))
        .starts_with("fields[1]: table public.t has no column \"nope\""));
}

#[test]
fn operators_must_fit_the_type() {
    let cases = [
        (
            json!({"create": {"active": {"lt": true}}}),
            "create.active.lt: operator `lt` does not apply to column \"active\" of type boolean \
             (boolean supports: equals, not, in, notIn, isNull)",
        ),
        (
            json!({"update": {"after": {"id": {"startsWith": "1"}}}}),
            "update.after.id.startsWith: operator `startsWith` does not apply to column \"id\" of \
             type integer (integer supports: equals, not, in, notIn, lt, lte, gt, gte, isNull)",
        ),
        (
            json!({"where": {"at": {"contains": "2026"}}}),
            "where.at.contains: operator `contains` does not apply to column \"at\" of type \
             timestamp with time zone",
        ),
        (json!({"delete": {"doc": {"lt": 1}}}), "delete.doc.lt: operator `lt` does not apply to column \"doc\" of type jsonb"),
        (json!({"create": {"active": {"not": {"gt": true}}}}), "create.active.not.gt: operator `gt`"),
        (json!({"create": {"tags": {"gt": ["a"]}}}), "create.tags.gt: operator `gt` does not apply to column \"tags\" of type text[]"),
        (json!({"create": {"tags": {"startsWith": "a"}}}), "create.tags.startsWith: operator `startsWith`"),
        (json!({"create": {"span": {"lt": "1 day"}}}), "create.span.lt: operator `lt` does not apply to column \"span\" of type interval"),
        (json!({"create": {"uid": {"contains": "a0"}}}), "create.uid.contains: operator `contains` does not apply to column \"uid\" of type uuid"),
        (json!({"create": {"raw": {"endsWith": "a"}}}), "create.raw.endsWith: operator `endsWith`"),
    ];
    for (filter, want) in cases {
        let msg = rejection(filter.clone());
        assert!(msg.starts_with(want), "{filter}:\n{msg}\nwant\n{want}");
    }
}

#[test]
fn literals_must_fit_the_type() {
    let cases = [
        (
            json!({"create": {"id": "abc"}}),
            "create.id: expected an integer (a JSON integer or an integer string) for column \
             \"id\" (integer), got \"abc\"",
        ),
        (json!({"create": {"id": 1.5}}), "create.id: expected an integer"),
        (json!({"create": {"id": {"in": [1, "x"]}}}), "create.id.in[1]: expected an integer"),
        (json!({"create": {"id": {"lt": null}}}), "create.id.lt: expected an integer (a JSON integer or an integer string) for column \"id\" (integer), got null"),
        (json!({"create": {"f8": "fast"}}), "create.f8: expected a number"),
        (json!({"create": {"amount": "12,5"}}), "create.amount: expected a number or a decimal string (e.g. \"12.50\", \"NaN\") for column \"amount\" (numeric), got \"12,5\""),
        (json!({"create": {"amount": true}}), "create.amount: expected a number or a decimal string"),
        (json!({"create": {"amount": "1e9999999"}}), "create.amount: expected a number"),
        (json!({"create": {"at": "2026-13-01T00:00:00Z"}}), "create.at: expected a timestamp with a UTC offset (RFC 3339, e.g. \"2026-01-01T00:00:00Z\") for column \"at\" (timestamp with time zone), got \"2026-13-01T00:00:00Z\""),
        (json!({"create": {"at": "2026-01-01T00:00:00"}}), "create.at: expected a timestamp with a UTC offset"),
        (json!({"create": {"at": "2026-02-30T00:00:00Z"}}), "create.at: expected a timestamp"),
        (json!({"create": {"at": "2026-01-01T25:00:00Z"}}), "create.at: expected a timestamp"),
        (json!({"create": {"at": 1_700_000_000}}), "create.at: expected a timestamp"),
        (json!({"create": {"local": "2026-01-01T00:00:00Z"}}), "create.local: expected a timestamp without time zone"),
        (json!({"create": {"day": "2026-1-1"}}), "create.day: expected a date"),
        (json!({"create": {"tod": "10h"}}), "create.tod: expected a time"),
        (json!({"create": {"toz": "10:00:00"}}), "create.toz: expected a time with a UTC offset"),
        (json!({"create": {"uid": "xyz"}}), "create.uid: expected a UUID string"),
        (json!({"create": {"active": "yes"}}), "create.active: expected true or false for column \"active\" (boolean), got \"yes\""),
        (json!({"create": {"name": 5}}), "create.name: expected a string for column \"name\" (text), got 5"),
        (json!({"create": {"name": {"contains": 1}}}), "create.name.contains: expected a string"),
        (json!({"create": {"nums": {"contains": "x"}}}), "create.nums.contains: expected an integer"),
        (json!({"create": {"nums": {"contains": null}}}), "create.nums.contains: expected an integer"),
        (json!({"create": {"nums": [1, "x"]}}), "create.nums: expected an array (elements: an integer"),
        (json!({"create": {"nums": 1}}), "create.nums: expected an array"),
        (json!({"create": {"raw": "***"}}), "create.raw: expected a base64 string"),
        (json!({"create": {"span": 5}}), "create.span: expected a string in Postgres's text form"),
    ];
    for (filter, want) in cases {
        let msg = rejection(filter.clone());
        assert!(msg.starts_with(want), "{filter}:\n{msg}\nwant\n{want}");
    }
    // Long literals are cut in messages.
    let long = rejection(json!({"create": {"id": "9".repeat(200)}}));
    assert!(long.ends_with("...") && long.len() < 250, "{long}");
}

#[test]
fn malformed_shapes_name_their_path() {
    let cases = [
        (json!([]), "filter: expected a filter object, got an array"),
        (json!({"updat": {}}), "filter: unknown key \"updat\" (expected one of: create, update, delete, where, transitions, fields, truncate)"),
        (json!({"update": {"after": {"plan": {"in": "pro"}}}}), "update.after.plan.in: expected an array, got a string"),
        (json!({"create": {"plan": {"notIn": {}}}}), "create.plan.notIn: expected an array, got an object"),
        (json!({"create": {"plan": {"isNull": "yes"}}}), "create.plan.isNull: expected true or false, got a string"),
        (json!({"create": {"plan": {"startsWith": 1}}}), "create.plan.startsWith: expected a string, got a number"),
        (json!({"create": {"plan": {"endsWith": null}}}), "create.plan.endsWith: expected a string, got null"),
        (json!({"create": {"plan": {"like": "x"}}}), "create.plan: unknown operator \"like\" (expected one of: equals, not, in, notIn, lt, lte, gt, gte, contains, startsWith, endsWith, isNull)"),
        (json!({"create": {"plan": {"not": {"has": 1}}}}), "create.plan.not: unknown operator \"has\""),
        (json!({"create": {"OR": {"plan": "x"}}}), "create.OR: expected an array of conditions, got an object"),
        (json!({"create": {"AND": "x"}}), "create.AND: expected an array of conditions or one condition object, got a string"),
        (json!({"create": {"AND": [1]}}), "create.AND[0]: expected an object of column conditions and AND/OR/NOT, got a number"),
        (json!({"create": {"NOT": [{"OR": [{"plan": {"in": 1}}]}]}}), "create.NOT[0].OR[0].plan.in: expected an array, got a number"),
        (json!({"create": 5}), "create: expected an object of column conditions and AND/OR/NOT, got a number"),
        (json!({"where": []}), "where: expected an object"),
        (json!({"update": {"afterr": {}}}), "update: unknown key \"afterr\" (expected after, before)"),
        (json!({"update": []}), "update: expected an object with `after` and/or `before`, got an array"),
        (json!({"update": {"before": 1}}), "update.before: expected an object"),
        (json!({"transitions": "yes"}), "transitions: expected true or false, got a string"),
        (json!({"truncate": 1}), "truncate: expected true or false, got a number"),
        (json!({"fields": "plan"}), "fields: expected an array of column names, got a string"),
        (json!({"fields": ["plan", 1]}), "fields[1]: expected a column name, got a number"),
        // Checked at compile time.
        (json!({"where": {}, "create": {}}), "where: cannot be combined with create/update/delete"),
        (json!({"transitions": true, "update": {}}), "transitions: set-membership mode takes `where`"),
        (json!({"create": {"plan": {}}}), "create.plan: expected at least one operator"),
        (json!({"create": {"plan": {"not": {}}}}), "create.plan.not: expected at least one operator"),
        (json!({"fields": []}), "fields: expected at least one column name"),
    ];
    for (filter, want) in cases {
        let msg = rejection(filter.clone());
        assert!(msg.starts_with(want), "{filter}:\n{msg}\nwant\n{want}");
    }
    let bad_json = "{\"create\": ".parse::<Filter>().unwrap_err().to_string();
    assert!(
        bad_json.starts_with("filter: invalid JSON: EOF"),
        "{bad_json}"
    );
    // serde carries the same messages (the HTTP and config paths).
    let via_serde =
        serde_json::from_value::<Filter>(json!({"update": {"after": {"plan": {"in": "pro"}}}}))
            .unwrap_err()
            .to_string();
    assert_eq!(
        via_serde,
        "update.after.plan.in: expected an array, got a string"
    );
}

// ---- the JSON form -------------------------------------------------------------------

#[test]
fn json_form_round_trips() {
    let filters = [
        json!({}),
        json!({"create": {"plan": "pro"}, "update": {"after": {"plan": {"in": ["pro", "team"]}, "email": {"endsWith": "@x.io"}}}, "delete": {}}),
        json!({"update": {"before": {"plan": "free"}, "after": {}}, "fields": ["plan", "email"], "truncate": true}),
        json!({"where": {"OR": [{"id": 1}, {"NOT": [{"plan": null}]}], "AND": [{"id": {"gt": 0, "lte": 9}}]}, "transitions": true}),
        json!({"where": {"name": {"not": {"contains": "x", "startsWith": "a", "isNull": false}, "notIn": ["a", null], "equals": "b", "lt": "z", "gte": "a"}}}),
        json!({"create": {"doc": {"equals": {"a": [1, {"b": null}]}}, "tags": ["a", "b"]}}),
    ];
    for j in filters {
        let f = Filter::from_json(&j).unwrap();
        assert_eq!(f.to_json(), j);
        let text = serde_json::to_string(&f).unwrap();
        assert_eq!(text.parse::<Filter>().unwrap(), f);
        assert_eq!(serde_json::from_str::<Filter>(&text).unwrap(), f);
        f.compile(&table(Identity::Full)).unwrap();
    }
    // Shorthands normalize: a single AND/NOT object becomes a list; null keys drop.
    let f: Filter =
        serde_json::from_value(json!({"create": {"AND": {"id": 1}}, "delete": null})).unwrap();
    assert_eq!(f.to_json(), json!({"create": {"AND": [{"id": 1}]}}));
    // An object literal built in Rust is written with `equals`, so it reads back the same.
    let mut p = Predicate::default();
    p.columns
        .insert("doc".into(), Condition::Equals(json!({"a": 1})));
    assert_eq!(p.to_json(), json!({"doc": {"equals": {"a": 1}}}));
    assert_eq!(
        Predicate::from_json(&p.to_json(), "").unwrap().to_json(),
        p.to_json()
    );
    assert_eq!(
        serde_json::to_value(Transition::Disappear).unwrap(),
        json!("disappear")
    );
}

#[test]
fn rust_built_filters_compile_the_same() {
    let mut after = Predicate::default();
    after.columns.insert(
        "plan".into(),
        Condition::Operators(Box::new(Operators {
            r#in: Some(vec![json!("pro"), json!("team")]),
            ..Operators::default()
        })),
    );
    let f = Filter {
        update: Some(UpdateFilter {
            after: Some(after),
            before: None,
        }),
        ..Filter::default()
    };
    assert_eq!(
        f,
        Filter::from_json(&json!({"update": {"after": {"plan": {"in": ["pro", "team"]}}}}))
            .unwrap()
    );
    let c = f.compile(&table(Identity::Full)).unwrap();
    let r = |plan: &str| row(&[("id", int(1)), ("plan", t(plan))]);
    assert!(delivered(&c, &update_full(r("free"), r("team"))));
    assert!(!delivered(&c, &create(r("team"))));
}

// ---- micro-benchmark -----------------------------------------------------------------

/// `cargo test --release --lib filter::tests::bench -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_evaluate() {
    use std::hint::black_box;
    use std::time::Instant;
    const N: u32 = 1_000_000;
    let r = |plan: &str, amount: &str| {
        row(&[
            ("id", int(7)),
            ("name", t("Ada Lovelace")),
            ("plan", t(plan)),
            ("email", t("ada@x.io")),
            ("amount", num(amount)),
            ("at", tstz("2026-11-27 10:00:00.123456+00")),
            ("active", Value::Bool(true)),
        ])
    };
    let cases = [
        (
            "create, one equality",
            json!({"create": {"plan": "pro"}}),
            create(r("pro", "10")),
        ),
        (
            "create, in + endsWith + numeric gt",
            json!({"create": {"plan": {"in": ["pro", "team"]}, "email": {"endsWith": "@x.io"}, "amount": {"gt": "9.99"}}}),
            create(r("team", "120.50")),
        ),
        (
            "create, timestamptz range",
            json!({"create": {"at": {"gte": "2026-11-01T00:00:00Z", "lt": "2026-12-01T00:00:00+01:00"}}}),
            create(r("pro", "10")),
        ),
        (
            "update, OR/NOT, miss",
            json!({"update": {"after": {"OR": [{"plan": "team"}, {"NOT": {"active": true}}]}}}),
            update_full(r("free", "1"), r("pro", "1")),
        ),
        (
            "update, transitions + fields",
            json!({"where": {"plan": {"in": ["pro", "team"]}}, "transitions": true, "fields": ["plan"]}),
            update_full(r("free", "1"), r("pro", "1")),
        ),
        ("no filter", json!(null), create(r("pro", "10"))),
    ];
    for (label, filter, ev) in cases {
        let f = if filter.is_null() {
            CompiledFilter::accept_all()
        } else {
            compile(filter)
        };
        let want = !label.ends_with("miss");
        assert_eq!(delivered(&f, &ev), want, "{label}");
        let start = Instant::now();
        for _ in 0..N {
            black_box(f.evaluate(black_box(&ev)));
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(N);
        println!("{label:40} {ns:7.1} ns/event");
    }
}

// ---- exactness properties ------------------------------------------------------------

mod properties {
    use std::cmp::Ordering;

    use proptest::prelude::*;

    use super::super::decimal::{cmp, parse_literal, parse_plain};

    /// `mantissa / 10^scale` written as `numeric_out` would, padded with `pad` zeros.
    fn decimal_text(mantissa: i64, scale: u32, pad: usize) -> String {
        let digits = mantissa.unsigned_abs().to_string();
        let scale = scale as usize;
        let digits = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = digits.split_at(digits.len() - scale);
        let sign = if mantissa < 0 { "-" } else { "" };
        let zeros = "0".repeat(pad);
        if scale == 0 && pad == 0 {
            format!("{sign}{int}")
        } else {
            format!("{sign}{int}.{frac}{zeros}")
        }
    }

    fn exact(mantissa: i64, scale: u32) -> i128 {
        i128::from(mantissa) * 10i128.pow(12 - scale)
    }

    proptest! {
        #[test]
        fn numeric_order_is_exact(
            a in any::<i64>(), sa in 0u32..12, pa in 0usize..3,
            b in any::<i64>(), sb in 0u32..12, pb in 0usize..3,
        ) {
            let (ta, tb) = (decimal_text(a, sa, pa), decimal_text(b, sb, pb));
            let want = exact(a, sa).cmp(&exact(b, sb));
            let plain = cmp(parse_plain(ta.as_bytes()).unwrap(), parse_plain(tb.as_bytes()).unwrap());
            prop_assert_eq!(plain, want, "{} vs {}", ta, tb);
            let lit = parse_literal(&tb).unwrap();
            prop_assert_eq!(cmp(parse_plain(ta.as_bytes()).unwrap(), lit.view()), want);
        }

        #[test]
        fn exponent_literals_equal_their_plain_form(m in any::<i64>(), scale in 0u32..12, k in 0u32..20) {
            let plain = parse_literal(&decimal_text(m, scale, 0)).unwrap();
            let scaled = parse_literal(&format!("{m}e-{scale}")).unwrap();
            prop_assert_eq!(cmp(scaled.view(), plain.view()), Ordering::Equal);
            let padded = parse_literal(&format!("{m}0000E-{}", scale + 4)).unwrap();
            prop_assert_eq!(padded, scaled);
            let zeros = "0".repeat(k as usize);
            let big = format!("{m}{zeros}");
            let grown = parse_literal(&format!("{m}e+{k}")).unwrap();
            prop_assert_eq!(cmp(parse_plain(big.as_bytes()).unwrap(), grown.view()), Ordering::Equal);
        }
    }
}
