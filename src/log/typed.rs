//! Stored events with typed values again: the log keeps each event as JSON, and a filter
//! (a stream's, or the hub's subscribers' when it is fed from the log) needs the values
//! typed by their columns. The types come from the watched database's catalog.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value as Json;

use crate::event::{Event, Row, SchemaChange, SchemaConflict, TableName};
use crate::filter::TableSchema;
use crate::value::{TypeKind, Value};

/// One table's columns and their types, in the table's order.
pub(crate) struct TableTypes {
    pub(crate) table: TableName,
    names: Arc<[Arc<str>]>,
    kinds: Vec<TypeKind>,
}

impl TableTypes {
    pub(crate) fn new(table: TableName, schema: TableSchema) -> TableTypes {
        TableTypes {
            table,
            names: schema
                .columns
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            kinds: schema.columns.into_iter().map(|c| c.kind).collect(),
        }
    }

    /// A column the event lacks stays absent (unknown to the filter, never NULL), and so
    /// does one whose JSON does not fit the type read at open (the column changed type
    /// since): the filter delivers what it cannot decide.
    pub(crate) fn row(&self, json: &Json) -> Row {
        let values = self
            .names
            .iter()
            .zip(&self.kinds)
            .map(|(name, kind)| {
                let v = json.get(&**name)?;
                Value::from_json(kind, v).ok()
            })
            .collect();
        Row {
            names: self.names.clone(),
            values,
        }
    }

    /// The event with typed rows, and no transition yet (a filter decides it).
    pub(crate) fn typed(&self, ev: &Event<Json>) -> Event<Row> {
        map_rows(ev, |json| self.row(json))
    }

    /// [`TableTypes::typed`] for rows kept as the log's JSON text (a stream's): each row is
    /// parsed only to be filtered.
    pub(crate) fn typed_raw(&self, ev: &Event<Box<RawValue>>) -> Event<Row> {
        map_rows(ev, |raw| {
            // The text was checked as JSON when the event was read.
            let json = serde_json::from_str(raw.get()).unwrap_or(Json::Null);
            self.row(&json)
        })
    }

    /// [`TableTypes::typed`], except that nothing of the stored event is lost: when a
    /// value does not fit its column's type or a column is unknown (the table changed
    /// since the types were read), the row holds the stored JSON as it is. For events
    /// that are delivered, not only filtered.
    pub(crate) fn typed_exact(&self, ev: &Event<Json>) -> Event<Row> {
        let mut typed = self.typed(ev);
        for (row, json) in [(&mut typed.new, &ev.new), (&mut typed.old, &ev.old)] {
            if let (Some(row), Some(json)) = (row.as_mut(), json) {
                if !self.fits(row, json) {
                    *row = as_json(json);
                }
            }
        }
        typed
    }

    /// An event of a table whose types are unknown (it was dropped): every value as the
    /// stored JSON.
    pub(crate) fn untyped(ev: &Event<Json>) -> Event<Row> {
        map_rows(ev, as_json)
    }

    /// Whether the typed row holds every value of the stored one.
    fn fits(&self, row: &Row, json: &Json) -> bool {
        let Json::Object(map) = json else {
            return false;
        };
        map.len() == row.values.iter().filter(|v| v.is_some()).count()
    }

    /// Whether every column the event's rows hold is one of these (else the table gained
    /// a column since the types were read).
    pub(crate) fn covers(&self, ev: &Event<Json>) -> bool {
        [&ev.new, &ev.old]
            .into_iter()
            .flatten()
            .all(|row| match row {
                Json::Object(map) => map.keys().all(|k| self.names.iter().any(|n| **n == **k)),
                _ => true,
            })
    }
}

/// Following a stream's tables through schema changes (`streams::reshape`).
impl TableTypes {
    /// Whether the filter reading `columns` still fits the table after `change`.
    pub(crate) fn conflict<'a>(
        &self,
        change: &SchemaChange,
        mut columns: impl Iterator<Item = &'a str>,
    ) -> Option<SchemaConflict> {
        columns.find_map(|column| {
            let Some(now) = change.columns.iter().find(|c| &*c.name == column) else {
                return Some(SchemaConflict::ColumnDropped {
                    table: change.qualified(),
                    column: column.to_owned(),
                });
            };
            let had = self.kind_of(column)?;
            let before = change.previous.iter().find(|c| &*c.name == column)?;
            // A type that is not built in keeps the form the consumer read it with.
            let form = TypeKind::builtin(now.type_oid)?;
            (form != *had).then(|| SchemaConflict::TypeChanged {
                table: change.qualified(),
                column: column.to_owned(),
                from: before.type_oid,
                to: now.type_oid,
            })
        })
    }

    fn kind_of(&self, column: &str) -> Option<&TypeKind> {
        let i = self.names.iter().position(|n| &**n == column)?;
        self.kinds.get(i)
    }

    /// Reads rows with the table's new columns from now on.
    pub(crate) fn follow(&mut self, change: &SchemaChange) {
        let kinds = change
            .columns
            .iter()
            .map(|c| {
                TypeKind::builtin(c.type_oid)
                    .or_else(|| self.kind_of(&c.name).cloned())
                    .unwrap_or(TypeKind::Text)
            })
            .collect();
        self.names = change.columns.iter().map(|c| c.name.clone()).collect();
        self.kinds = kinds;
    }
}

/// A stored row as it is: each value embedded as JSON, in the stored order.
fn as_json(json: &Json) -> Row {
    let Json::Object(map) = json else {
        return Row {
            names: Arc::from(Vec::new()),
            values: Vec::new(),
        };
    };
    Row {
        names: map.keys().map(|k| Arc::from(k.as_str())).collect(),
        values: map
            .values()
            .map(|v| Value::from_json(&TypeKind::Json, v).ok())
            .collect(),
    }
}

/// The event with each row made by `row`, and no transition.
fn map_rows<R>(ev: &Event<R>, row: impl Fn(&R) -> Row) -> Event<Row> {
    Event {
        id: ev.id,
        position: ev.position,
        action: ev.action,
        schema: ev.schema.clone(),
        table: ev.table.clone(),
        identity: ev.identity,
        new: ev.new.as_ref().map(&row),
        old: ev.old.as_ref().map(&row),
        changed: ev.changed.clone(),
        unchanged: ev.unchanged.clone(),
        transition: None,
        tx: ev.tx.clone(),
        schema_change: ev.schema_change.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::event::Identity;
    use crate::filter::ColumnSchema;

    fn types() -> TableTypes {
        let column = |name: &str, kind| ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            kind,
        };
        TableTypes::new(
            TableName::parse("orders"),
            TableSchema {
                schema: "public".into(),
                table: "orders".into(),
                columns: vec![column("id", TypeKind::Int), column("note", TypeKind::Text)],
                primary_key: vec!["id".into()],
                identity: Identity::Default,
            },
        )
    }

    /// A stored event as the log holds it (keys in the stored order).
    fn stored(row: Json) -> Event<Json> {
        let mut ev: Event<Json> = serde_json::from_value(serde_json::json!({
            "id": "01J00000000000000000000000", "position": "0000000001000000-0000000000",
            "action": "create", "schema": "public", "table": "orders", "identity": "default",
            "tx": {"id": 7, "commitLsn": "0/16B3748", "committedAt": "2026-01-01T00:00:00.000000Z", "index": 0, "last": true}
        }))
        .unwrap();
        ev.new = Some(row);
        ev
    }

    fn json_of(ev: &Event<Row>) -> Json {
        serde_json::to_value(ev.new.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn rows_are_typed_in_the_tables_order() {
        let ev = stored(serde_json::json!({"note": "hi", "id": 3}));
        let typed = types().typed_exact(&ev);
        let row = typed.new.as_ref().unwrap();
        assert_eq!(&*row.names[0], "id");
        assert_eq!(row.get("id"), Some(&Value::Int(3)));
        assert_eq!(json_of(&typed), serde_json::json!({"id": 3, "note": "hi"}));
    }

    #[test]
    fn values_that_no_longer_fit_their_types_are_kept_as_stored() {
        let t = types();
        // `id` changed type since the types were read; `extra` was added.
        for row in [
            serde_json::json!({"id": "not a number", "note": "x"}),
            serde_json::json!({"id": 1, "note": "x", "extra": [1, 2]}),
        ] {
            let ev = stored(row.clone());
            assert!(!t.covers(&ev) || row["id"].is_string());
            assert_eq!(json_of(&t.typed_exact(&ev)), row);
        }
        let untyped = TableTypes::untyped(&stored(serde_json::json!({"a": null})));
        assert_eq!(json_of(&untyped), serde_json::json!({"a": null}));
    }
}
