//! A table's change of shape while events flow: the columns a Relation message describes,
//! compared with those the previous one described for the same relation.
//!
//! pgoutput sends a Relation message before the first change that uses a relation in a
//! session, and again after its definition changed. The assembler compares each new one
//! with the last it saw; when a column was added, dropped, renamed or changed its type, the
//! next event of that table carries a [`SchemaChange`], so every consumer can learn about
//! it before it sees a row of the new shape. The first Relation of a session is never a
//! change: there is nothing to compare it with.

use std::sync::Arc;

use serde::Serialize;

use super::assemble::RelationInfo;

/// One column as a Relation message describes it.
/// Serialized as `{"name": "plan", "typeOid": 25, "key": false}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnShape {
    /// The column's name.
    pub name: Arc<str>,
    /// The OID of its type (`pg_type.oid`): 23 is `int4`, 25 `text`, user types have
    /// their own.
    pub type_oid: u32,
    /// Part of the replica identity (the primary key by default).
    pub key: bool,
}

/// A table's new columns, and what they were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaChange {
    /// The table's schema.
    pub schema: Arc<str>,
    /// The table's name.
    pub table: Arc<str>,
    /// The columns from now on, in order.
    pub columns: Vec<ColumnShape>,
    /// The columns before the change, in order.
    pub previous: Vec<ColumnShape>,
}

/// Why a change of shape ends a subscription whose filter reads the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaConflict {
    /// A column the filter names is gone (dropped or renamed).
    #[error("column {column:?} of {table}, which the filter names, was dropped or renamed: subscribe again with a filter for the table's new columns")]
    ColumnDropped {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
    },
    /// A column the filter names has another type now.
    #[error("column {column:?} of {table}, which the filter names, changed its type (type oid {from} to {to}): subscribe again to have the filter checked against the new type")]
    TypeChanged {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
        /// Its type's OID before.
        from: u32,
        /// Its type's OID now.
        to: u32,
    },
}

impl Serialize for ColumnShape {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("name", &*self.name)?;
        map.serialize_entry("typeOid", &self.type_oid)?;
        map.serialize_entry("key", &self.key)?;
        map.end()
    }
}

fn shape(rel: &RelationInfo) -> Vec<ColumnShape> {
    rel.names
        .iter()
        .zip(&rel.type_oids)
        .zip(&rel.key)
        .map(|((name, &type_oid), &key)| ColumnShape {
            name: name.clone(),
            type_oid,
            key,
        })
        .collect()
}

impl SchemaChange {
    /// The change from `old` to `new`, when their columns (names, order or types) differ;
    /// `None` for a Relation message that only repeats the shape (or changes the replica
    /// identity alone).
    pub(crate) fn between(old: &RelationInfo, new: &RelationInfo) -> Option<Arc<SchemaChange>> {
        if old.names == new.names && old.type_oids == new.type_oids {
            return None;
        }
        Some(Arc::new(SchemaChange {
            schema: new.schema.clone(),
            table: new.table.clone(),
            columns: shape(new),
            previous: shape(old),
        }))
    }

    /// `schema.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Whether a filter reading `columns` still means what it meant: every column is
    /// still there with the type it had.
    pub fn conflict<'a>(
        &self,
        mut columns: impl Iterator<Item = &'a str>,
    ) -> Option<SchemaConflict> {
        columns.find_map(|column| {
            let now = self.columns.iter().find(|c| &*c.name == column);
            let before = self.previous.iter().find(|c| &*c.name == column);
            match (before, now) {
                (_, None) => Some(SchemaConflict::ColumnDropped {
                    table: self.qualified(),
                    column: column.to_owned(),
                }),
                (Some(b), Some(n)) if b.type_oid != n.type_oid => {
                    Some(SchemaConflict::TypeChanged {
                        table: self.qualified(),
                        column: column.to_owned(),
                        from: b.type_oid,
                        to: n.type_oid,
                    })
                }
                _ => None,
            }
        })
    }
}

/// Key under which the event log keeps an event's [`SchemaChange`] in the stored JSON,
/// for persisted streams reading it back. Delivered events never carry it: the `Event`
/// serializer writes no such key.
pub(crate) const STORED_KEY: &str = "schemaChange";

/// A change as the event log stores it (the table is the event's).
#[derive(serde::Deserialize)]
pub(crate) struct StoredChange {
    columns: Vec<StoredColumn>,
    previous: Vec<StoredColumn>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredColumn {
    name: String,
    type_oid: u32,
    key: bool,
}

impl StoredChange {
    pub(crate) fn into_change(self, schema: &Arc<str>, table: &Arc<str>) -> Arc<SchemaChange> {
        let shapes = |cols: Vec<StoredColumn>| -> Vec<ColumnShape> {
            cols.into_iter()
                .map(|c| ColumnShape {
                    name: Arc::from(c.name),
                    type_oid: c.type_oid,
                    key: c.key,
                })
                .collect()
        };
        Arc::new(SchemaChange {
            schema: schema.clone(),
            table: table.clone(),
            columns: shapes(self.columns),
            previous: shapes(self.previous),
        })
    }
}

impl SchemaChange {
    /// Appends the change to an event's JSON object text (`{...}` -> `{..., "schemaChange":
    /// {"columns": [...], "previous": [...]}}`), as the event log stores it.
    pub(crate) fn append_to_stored(&self, body: &mut String) -> Result<(), serde_json::Error> {
        splice_stored(body, &self.stored_json()?);
        Ok(())
    }

    /// The change as the event log stores it: `{"columns": [...], "previous": [...]}`.
    pub(crate) fn stored_json(&self) -> Result<String, serde_json::Error> {
        #[derive(Serialize)]
        struct Stored<'a> {
            columns: &'a [ColumnShape],
            previous: &'a [ColumnShape],
        }
        serde_json::to_string(&Stored {
            columns: &self.columns,
            previous: &self.previous,
        })
    }
}

/// Adds a stored change ([`SchemaChange::stored_json`]) to an event's JSON object text, so
/// that the event parses back with its change.
pub(crate) fn splice_stored(body: &mut String, change: &str) {
    if body.ends_with('}') {
        body.pop();
        body.push_str(",\"");
        body.push_str(STORED_KEY);
        body.push_str("\":");
        body.push_str(change);
        body.push('}');
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::event::Identity;

    fn rel(columns: &[(&str, u32)]) -> RelationInfo {
        RelationInfo {
            schema: "public".into(),
            table: "t".into(),
            identity: Identity::Default,
            names: columns.iter().map(|(n, _)| Arc::from(*n)).collect(),
            kinds: Vec::new(),
            type_oids: columns.iter().map(|(_, t)| *t).collect(),
            key: columns.iter().map(|(n, _)| *n == "id").collect(),
        }
    }

    #[test]
    fn only_column_changes_count() {
        let old = rel(&[("id", 23), ("plan", 25)]);
        assert_eq!(SchemaChange::between(&old, &old.clone()), None);
        let added =
            SchemaChange::between(&old, &rel(&[("id", 23), ("plan", 25), ("n", 20)])).unwrap();
        assert_eq!(added.columns.len(), 3);
        assert_eq!(added.previous.len(), 2);
        assert_eq!(added.conflict(["plan", "id"].into_iter()), None);
        let dropped = SchemaChange::between(&old, &rel(&[("id", 23)])).unwrap();
        assert!(matches!(
            dropped.conflict(["id", "plan"].into_iter()),
            Some(SchemaConflict::ColumnDropped { column, .. }) if column == "plan"
        ));
        assert_eq!(dropped.conflict(["id"].into_iter()), None);
        let retyped = SchemaChange::between(&old, &rel(&[("id", 20), ("plan", 25)])).unwrap();
        assert_eq!(
            retyped.conflict(["id"].into_iter()),
            Some(SchemaConflict::TypeChanged {
                table: "public.t".into(),
                column: "id".into(),
                from: 23,
                to: 20
            })
        );
        // The event log's form reads back as the same change.
        let mut body = r#"{"id":"x"}"#.to_owned();
        retyped.append_to_stored(&mut body).unwrap();
        let stored: serde_json::Value = serde_json::from_str(&body).unwrap();
        let back: StoredChange = serde_json::from_value(stored[STORED_KEY].clone()).unwrap();
        assert_eq!(*back.into_change(&retyped.schema, &retyped.table), *retyped);
        assert_eq!(
            retyped.conflict(["id"].into_iter()).unwrap().to_string(),
            "column \"id\" of public.t, which the filter names, changed its type (type oid 23 to 20): subscribe again to have the filter checked against the new type"
        );
    }
}
