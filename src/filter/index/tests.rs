#![allow(clippy::unwrap_used)]

//! The index against brute force: for random filters and events, every member the index
//! leaves out is one whose filter skips the event (and whose followed row it leaves alone),
//! so evaluating only the candidates decides exactly as evaluating everyone.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value as Json};

use super::FilterIndex;
use crate::event::{Action, Event, Identity, Row};
use crate::filter::{ColumnSchema, CompiledFilter, Decision, Filter, TableSchema};
use crate::value::{Text, TypeKind, Value};

/// (column, type name, kind) of `public.t`; `id` is the primary key.
const COLUMNS: &[(&str, &str, TypeKind)] = &[
    ("id", "int8", TypeKind::Int),
    ("n", "int4", TypeKind::Int),
    ("name", "text", TypeKind::Text),
    ("code", "character", TypeKind::Text),
    ("uid", "uuid", TypeKind::Text),
    ("at", "timestamp with time zone", TypeKind::Timestamptz),
    ("f8", "float8", TypeKind::Float),
    ("active", "bool", TypeKind::Bool),
    ("amount", "numeric", TypeKind::Numeric),
    ("day", "date", TypeKind::Text),
];

fn schema(identity: Identity) -> TableSchema {
    TableSchema {
        schema: "public".into(),
        table: "t".into(),
        columns: COLUMNS
            .iter()
            .map(|(name, type_name, kind)| ColumnSchema {
                name: (*name).into(),
                type_name: (*type_name).into(),
                kind: kind.clone(),
            })
            .collect(),
        primary_key: vec!["id".into()],
        identity,
    }
}

/// Literals per column, equal ones spelled differently included.
fn literals(column: usize) -> Vec<Json> {
    match COLUMNS[column].0 {
        "id" | "n" => vec![json!(-1), json!(0), json!(1), json!("2"), json!(3)],
        "name" => vec![json!(""), json!("a"), json!("ab"), json!("b")],
        "code" => vec![json!("a"), json!("a  "), json!("b")],
        "uid" => vec![
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("A0EEBC999C0B4EF8BB6D6BB9BD380A11"),
            json!("b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ],
        "at" => vec![
            json!("2026-01-01T00:00:00Z"),
            json!("2026-01-01T01:00:00+01:00"),
            json!("2026-01-02T00:00:00Z"),
        ],
        "f8" => vec![
            json!(-0.0),
            json!(0),
            json!(1.5),
            json!("NaN"),
            json!("Infinity"),
        ],
        "active" => vec![json!(true), json!(false)],
        "amount" => vec![json!("1.0"), json!(1), json!("2.5")],
        _ => vec![json!("2026-01-01"), json!("2026-01-02")],
    }
}

fn text(s: &str) -> Text {
    Text::new(Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

/// Event values per column, as Postgres would send them.
fn values(column: usize) -> Vec<Value> {
    let t = |s: &str| Value::Text(text(s));
    match COLUMNS[column].0 {
        "id" | "n" => (-1..=3).map(Value::Int).collect(),
        "name" => vec![t(""), t("a"), t("ab"), t("b"), t("c")],
        "code" => vec![t("a  "), t("b  "), t("ab ")],
        "uid" => vec![
            t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            t("b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ],
        "at" => vec![
            Value::Timestamptz(text("2026-01-01 00:00:00+00")),
            Value::Timestamptz(text("2026-01-02 00:00:00+00")),
            Value::Timestamptz(text("not a time")),
        ],
        "f8" => vec![
            Value::Float(0.0),
            Value::Float(-0.0),
            Value::Float(1.5),
            Value::Float(f64::NAN),
            Value::Float(f64::INFINITY),
        ],
        "active" => vec![Value::Bool(true), Value::Bool(false)],
        "amount" => vec![Value::Numeric(text("1.00")), Value::Numeric(text("2.5"))],
        _ => vec![t("2026-01-01"), t("2026-01-02"), t("2026-13-45")],
    }
}

fn lit(column: usize) -> impl Strategy<Value = Json> {
    prop::sample::select(literals(column))
}

/// A column condition: equality, operators, or NULL tests.
fn condition(column: usize) -> BoxedStrategy<Json> {
    let l = || lit(column);
    prop_oneof![
        l(),
        Just(Json::Null),
        l().prop_map(|v| json!({"equals": v})),
        (l(), l(), any::<bool>()).prop_map(|(a, b, null)| {
            let mut list = vec![a, b];
            if null {
                list.push(Json::Null);
            }
            json!({"in": list})
        }),
        (l(), l()).prop_map(|(a, b)| json!({"notIn": [a, b]})),
        l().prop_map(|v| json!({"not": v})),
        l().prop_map(|v| json!({"lt": v})),
        l().prop_map(|v| json!({"lte": v})),
        l().prop_map(|v| json!({"gt": v})),
        (l(), l()).prop_map(|(a, b)| json!({"gte": a, "lt": b})),
        any::<bool>().prop_map(|b| json!({"isNull": b})),
        Just(json!({"startsWith": "a"})),
    ]
    .boxed()
}

fn column_predicate() -> BoxedStrategy<Json> {
    prop::collection::vec(
        (0..COLUMNS.len()).prop_flat_map(|c| (Just(c), condition(c))),
        1..3,
    )
    .prop_map(|conds| {
        let mut o = serde_json::Map::new();
        for (c, cond) in conds {
            o.insert(COLUMNS[c].0.into(), cond);
        }
        Json::Object(o)
    })
    .boxed()
}

fn predicate() -> impl Strategy<Value = Json> {
    column_predicate().prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|ps| json!({"AND": ps})),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|ps| json!({"OR": ps})),
            inner.clone().prop_map(|p| json!({"NOT": p})),
            (inner.clone(), column_predicate()).prop_map(|(p, q)| {
                let mut q = q;
                q["OR"] = json!([p, {"n": 0}]);
                q
            }),
        ]
    })
}

fn filter() -> impl Strategy<Value = Option<Json>> {
    let p = predicate;
    prop_oneof![
        Just(None),
        Just(Some(json!({}))),
        (p(), any::<bool>()).prop_map(|(p, t)| Some(json!({"where": p, "truncate": t}))),
        p().prop_map(|p| Some(json!({"where": p, "transitions": true}))),
        (-1i64..4).prop_map(|id| Some(json!({"where": {"id": id}}))),
        (-1i64..4).prop_map(|id| Some(json!({"where": {"id": id}, "transitions": true}))),
        (p(), p(), p(), any::<bool>()).prop_map(|(c, a, b, fields)| {
            let mut f = json!({"create": c, "update": {"after": a, "before": b}});
            if fields {
                f["fields"] = json!(["n"]);
            }
            Some(f)
        }),
        (p(), p()).prop_map(|(a, d)| Some(json!({"update": {"after": a}, "delete": d}))),
        p().prop_map(|b| Some(json!({"update": {"before": b}}))),
    ]
}

/// A row over every column: a value, NULL, or not sent (`None`).
fn row() -> impl Strategy<Value = Vec<Option<Value>>> {
    let cells: Vec<BoxedStrategy<Option<Value>>> = (0..COLUMNS.len())
        .map(|c| {
            prop_oneof![
                4 => prop::sample::select(values(c)).prop_map(Some),
                1 => Just(Some(Value::Null)),
                1 => Just(None),
                // Another type than the column's, as after ALTER TABLE.
                1 => Just(Some(Value::Text(text("7")))),
            ]
            .boxed()
        })
        .collect();
    cells
}

fn names() -> Arc<[Arc<str>]> {
    COLUMNS.iter().map(|(n, ..)| Arc::from(*n)).collect()
}

fn make_row(values: Vec<Option<Value>>) -> Row {
    Row {
        names: names(),
        values,
    }
}

fn key_only(mut values: Vec<Option<Value>>) -> Row {
    for v in values.iter_mut().skip(1) {
        *v = None;
    }
    make_row(values)
}

fn event() -> impl Strategy<Value = Event> {
    (0u8..7, any::<bool>(), row(), row()).prop_map(|(shape, full, new, old)| {
        let identity = if full {
            Identity::Full
        } else {
            Identity::Default
        };
        let (action, new, old) = match shape {
            0 | 1 => (Action::Create, Some(make_row(new)), None),
            2 => (Action::Update, Some(make_row(new)), Some(make_row(old))),
            3 => (Action::Update, Some(make_row(new)), None),
            4 => (Action::Update, Some(make_row(new)), Some(key_only(old))),
            5 if full => (Action::Delete, None, Some(make_row(old))),
            5 => (Action::Delete, None, Some(key_only(old))),
            _ => (Action::Truncate, None, None),
        };
        Event {
            action,
            identity,
            new,
            old,
            ..event_template()
        }
    })
}

fn compile(f: &Option<Json>, identity: Identity) -> Option<CompiledFilter> {
    let f = match f {
        None => return Some(CompiledFilter::accept_all()),
        Some(j) => Filter::from_json(j).ok()?,
    };
    f.compile(&schema(identity)).ok()
}

/// Whether the event concerns the filter at all: delivered, or its followed row moved.
fn concerned(f: &CompiledFilter, ev: &Event) -> bool {
    f.evaluate(ev) != Decision::Skip || f.pinned_row(ev).is_some()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn indexed_candidates_decide_like_brute_force(
        filters in prop::collection::vec(filter(), 1..12),
        events in prop::collection::vec(event(), 1..8),
        removed in prop::collection::vec(any::<bool>(), 12),
        full in any::<bool>(),
    ) {
        let identity = if full { Identity::Full } else { Identity::Default };
        let compiled: Vec<(&Option<Json>, CompiledFilter)> = filters
            .iter()
            .filter_map(|f| Some((f, compile(f, identity)?)))
            .collect();
        let mut index = FilterIndex::default();
        for (m, (_, f)) in compiled.iter().enumerate() {
            index.insert(m, "public", "t", f);
        }
        // Another table's member is never a candidate for this one's events.
        index.insert(compiled.len(), "public", "other", &CompiledFilter::accept_all());
        for (m, gone) in removed.iter().enumerate().take(compiled.len()) {
            if *gone {
                index.remove(m);
            }
        }
        let mut candidates = Vec::new();
        for ev in &events {
            index.candidates(ev, &mut candidates);
            let mut sorted = candidates.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), candidates.len(), "a candidate twice");
            for (m, (json, f)) in compiled.iter().enumerate() {
                let live = !removed[m];
                let candidate = candidates.contains(&m);
                prop_assert!(live || !candidate, "removed member {} is a candidate", m);
                if live && !candidate {
                    prop_assert!(
                        !concerned(f, ev),
                        "filter {:?} left out but concerned by {:?}",
                        json,
                        ev
                    );
                }
            }
            prop_assert!(!candidates.contains(&compiled.len()));
        }
    }
}

#[test]
fn narrow_filters_give_few_candidates() {
    let table = schema(Identity::Full);
    let mut index = FilterIndex::default();
    for k in 0..1000i64 {
        let span: Filter =
            serde_json::from_value(json!({"where": {"id": {"gte": k * 10, "lt": (k + 1) * 10}}}))
                .unwrap();
        index.insert(k as usize, "public", "t", &span.compile(&table).unwrap());
        let tenant: Filter = serde_json::from_value(json!({"create": {"n": k}})).unwrap();
        index.insert(
            1000 + k as usize,
            "public",
            "t",
            &tenant.compile(&table).unwrap(),
        );
    }
    let mut values: Vec<Option<Value>> = vec![None; COLUMNS.len()];
    values[0] = Some(Value::Int(4321));
    values[1] = Some(Value::Int(7));
    let ev = Event {
        action: Action::Create,
        new: Some(make_row(values)),
        ..event_template()
    };
    let mut out = Vec::new();
    index.candidates(&ev, &mut out);
    out.sort_unstable();
    assert_eq!(out, [432, 1007]);
}

fn event_template() -> Event {
    crate::filter::tests::event(Action::Truncate, Identity::Full, None, None)
}

/// Matching cost per event against N narrow filters, index plus exact evaluation of the
/// candidates, next to evaluating every filter (prints; asserts nothing about time):
/// `cargo test --release --lib filter::index::tests::bench -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_matching() {
    use std::hint::black_box;
    use std::time::Instant;
    const EVENTS: i64 = 200_000;
    let table = schema(Identity::Full);
    for n in [1i64, 100, 1000, 10_000] {
        let span = 50_000 / n + 1;
        let filters: Vec<CompiledFilter> = (0..n)
            .map(|k| {
                let f = json!({"where": {"id": {"gte": k * span, "lt": (k + 1) * span}}});
                Filter::from_json(&f).unwrap().compile(&table).unwrap()
            })
            .collect();
        let mut index = FilterIndex::default();
        for (m, f) in filters.iter().enumerate() {
            index.insert(m, "public", "t", f);
        }
        let events: Vec<Event> = (0..1000)
            .map(|i| {
                let mut values: Vec<Option<Value>> = vec![Some(Value::Null); COLUMNS.len()];
                values[0] = Some(Value::Int(i * 50));
                Event {
                    action: Action::Create,
                    new: Some(make_row(values)),
                    ..event_template()
                }
            })
            .collect();
        let mut out = Vec::new();
        let start = Instant::now();
        let mut delivered = 0;
        for i in 0..EVENTS {
            let ev = &events[(i % 1000) as usize];
            index.candidates(ev, &mut out);
            delivered += out
                .iter()
                .filter(|&&m| filters[m].evaluate(ev).is_deliver())
                .count();
        }
        let indexed = start.elapsed().as_nanos() as f64 / EVENTS as f64;
        let brute_events = (EVENTS / n).max(100);
        let start = Instant::now();
        for i in 0..brute_events {
            let ev = &events[(i % 1000) as usize];
            delivered += filters
                .iter()
                .filter(|f| f.evaluate(ev).is_deliver())
                .count();
        }
        let brute = start.elapsed().as_nanos() as f64 / brute_events as f64;
        black_box(delivered);
        println!(
            "{n:6} filters: indexed {indexed:8.1} ns/event, every filter {brute:10.1} ns/event"
        );
    }
}
