//! What clients need to know of a table's columns: their JSON form (for `waltap types`)
//! and which are `int8`, which a request may ask to receive as strings (`int8=string`):
//! JavaScript numbers hold integers exactly only up to 2^53.
//!
//! The column types are read when a delivery connection opens; a column that becomes
//! `int8` later (`ALTER TABLE ... TYPE bigint`) is sent as a number until the client
//! reconnects.

use std::collections::{HashMap, HashSet};

use serde_json::Value as Json;
use tokio_postgres::Client;

use crate::event::TableName;

/// `int8` and, for the generated types, what every column holds.
const INT8: u32 = 20;

/// One column of a table, types followed through domains and arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub nullable: bool,
    /// The OID of the scalar type under domains and arrays (`int8` for `bigint[]` and for
    /// a domain over `bigint`).
    pub base_type: u32,
    /// `format_type` of that scalar type (`bigint`, `text`, an enum's name).
    pub base_name: String,
    /// Array nesting: 0 for a scalar, 1 for `int[]`, 2 for `int[][]`.
    pub dims: usize,
    /// The labels of an enum, in their order; empty for other types.
    pub labels: Vec<String>,
}

/// The columns of `table` in order (without dropped, system and generated ones, as
/// pgoutput sends them), or `None` when the table does not exist.
pub async fn describe(
    client: &Client,
    table: &TableName,
) -> Result<Option<Vec<Column>>, tokio_postgres::Error> {
    // Domains and arrays are unwrapped in the query (bounded depth): the last step of each
    // column's walk is its scalar type. An array's declared dimensions (`attndims`) are
    // not enforced by Postgres, so at least one level is assumed for an array type.
    let rows = client
        .query(
            "WITH RECURSIVE walk(attnum, oid, arrays, depth) AS (
                 SELECT a.attnum, a.atttypid, 0, 0
                 FROM pg_attribute a
                 JOIN pg_class c ON c.oid = a.attrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
                   AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
               UNION ALL
                 SELECT w.attnum,
                        CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END,
                        w.arrays + CASE WHEN t.typtype = 'd' THEN 0 ELSE 1 END,
                        w.depth + 1
                 FROM walk w JOIN pg_type t ON t.oid = w.oid
                 WHERE w.depth < 16
                   AND ((t.typtype = 'd' AND t.typbasetype <> 0)
                        OR (t.typcategory = 'A' AND t.typelem <> 0))
             ),
             scalar AS (
                 SELECT DISTINCT ON (attnum) attnum, oid, arrays
                 FROM walk ORDER BY attnum, depth DESC
             )
             SELECT a.attname::text, NOT a.attnotnull, s.oid, format_type(s.oid, NULL),
                    greatest(a.attndims, s.arrays)::int4,
                    coalesce((SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                              FROM pg_enum e WHERE e.enumtypid = s.oid), '{}')
             FROM scalar s
             JOIN pg_attribute a ON a.attnum = s.attnum
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
             ORDER BY a.attnum",
            &[&table.schema, &table.table],
        )
        .await?;
    if rows.is_empty() {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema, &table.table],
            )
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(
        rows.into_iter()
            .map(|r| Column {
                name: r.get(0),
                nullable: r.get(1),
                base_type: r.get(2),
                base_name: r.get(3),
                dims: usize::try_from(r.get::<_, i32>(4)).unwrap_or(0),
                labels: r.get(5),
            })
            .collect(),
    ))
}

impl Column {
    pub fn is_int8(&self) -> bool {
        self.base_type == INT8
    }
}

/// How a request wants `int8` values: JSON numbers (the default) or decimal strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Int8Form {
    #[default]
    Number,
    String,
}

/// The `int8` columns of the tables a connection delivers, by table: their values are
/// rewritten as strings in every row of an item.
#[derive(Debug, Clone, Default)]
pub struct Int8Strings {
    columns: HashMap<(String, String), HashSet<String>>,
}

/// The keys of an item that hold rows.
const ROW_KEYS: &[&str] = &["created", "before", "after", "deleted", "row"];

impl Int8Strings {
    /// Reads the `int8` columns of `tables`; an empty set (nothing to rewrite) for
    /// [`Int8Form::Number`].
    pub async fn load(
        client: &Client,
        form: Int8Form,
        tables: &[TableName],
    ) -> Result<Int8Strings, tokio_postgres::Error> {
        let mut columns = HashMap::new();
        if form == Int8Form::String {
            for t in tables {
                let int8: HashSet<String> = describe(client, t)
                    .await?
                    .unwrap_or_default()
                    .into_iter()
                    .filter(Column::is_int8)
                    .map(|c| c.name)
                    .collect();
                columns.insert((t.schema.clone(), t.table.clone()), int8);
            }
        }
        Ok(Int8Strings { columns })
    }

    pub fn is_empty(&self) -> bool {
        self.columns.values().all(HashSet::is_empty)
    }

    /// Rewrites the `int8` values of an item's rows (a change or an initial-state row;
    /// control items have no rows) as strings.
    pub fn apply(&self, item: &mut Json) {
        let table = (
            item.get("schema").and_then(Json::as_str),
            item.get("table").and_then(Json::as_str),
        );
        let (Some(schema), Some(table)) = table else {
            return;
        };
        let Some(int8) = self.columns.get(&(schema.to_owned(), table.to_owned())) else {
            return;
        };
        for key in ROW_KEYS {
            if let Some(Json::Object(row)) = item.get_mut(*key) {
                for (name, value) in row.iter_mut() {
                    if int8.contains(name) {
                        stringify(value);
                    }
                }
            }
        }
    }
}

/// Numbers (also inside arrays, and the elements of an array with lower bounds, not its
/// bounds) become their decimal text; `null` stays.
fn stringify(value: &mut Json) {
    match value {
        Json::Number(n) => *value = Json::String(n.to_string()),
        Json::Array(items) => items.iter_mut().for_each(stringify),
        Json::Object(bounded) => bounded.get_mut("values").into_iter().for_each(stringify),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn int8_values_become_strings_in_every_row_of_their_table() {
        let mut columns = HashMap::new();
        columns.insert(
            ("public".to_owned(), "orders".to_owned()),
            HashSet::from(["big".to_owned(), "bigs".to_owned()]),
        );
        let exact = Int8Strings { columns };
        let mut item = json!({
            "schema": "public", "table": "orders", "action": "update",
            "before": {"big": 9007199254740993_i64, "id": 1},
            "after": {"big": null, "bigs": [[1, 2], [3, null]], "id": 1},
        });
        exact.apply(&mut item);
        assert_eq!(item["before"], json!({"big": "9007199254740993", "id": 1}));
        assert_eq!(
            item["after"],
            json!({"big": null, "bigs": [["1", "2"], ["3", null]], "id": 1})
        );
        let mut bounded = json!({
            "schema": "public", "table": "orders", "action": "create",
            "created": {"bigs": {"lowerBounds": [0], "values": [5, null]}},
        });
        exact.apply(&mut bounded);
        assert_eq!(
            bounded["created"]["bigs"],
            json!({"lowerBounds": [0], "values": ["5", null]})
        );
        let mut other = json!({"schema": "public", "table": "users", "row": {"big": 1}});
        exact.apply(&mut other);
        assert_eq!(other["row"]["big"], 1);
    }
}
