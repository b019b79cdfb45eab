//! Type look-ups in the source's catalog, for column types that are not built in.
//!
//! pgoutput sends only a type's OID (and, for user types, its name). Whether a user type is
//! a domain over `int4`, an enum, or an array of some element decides its JSON form, so the
//! pipeline asks here before it accepts a relation that uses such a type.

use tokio_postgres::Client;

use crate::value::TypeKind;

/// Nesting bound for domains over domains and arrays of domains: the catalog cannot loop,
/// but a bound keeps a corrupt answer from recursing forever.
const MAX_DEPTH: usize = 16;

/// How values of type `oid` map to JSON, following domains to their base type and arrays
/// to their element type. Unknown OIDs and other user types (enums, composites, ranges)
/// map to their text form.
pub async fn resolve_type(client: &Client, oid: u32) -> Result<TypeKind, tokio_postgres::Error> {
    let stmt = client
        .prepare(
            "SELECT typtype::text, typbasetype, typelem, typcategory::text, typdelim::text
             FROM pg_type WHERE oid = $1",
        )
        .await?;
    // Arrays wrap from the outside in: remember the delimiters, then build the kind.
    let mut delimiters = Vec::new();
    let mut current = oid;
    for _ in 0..MAX_DEPTH {
        if let Some(kind) = TypeKind::builtin(current) {
            return Ok(wrap(kind, delimiters));
        }
        let Some(row) = client.query_opt(&stmt, &[&current]).await? else {
            return Ok(wrap(TypeKind::Text, delimiters));
        };
        let typtype: String = row.get(0);
        let base: u32 = row.get(1);
        let elem: u32 = row.get(2);
        let category: String = row.get(3);
        let delim: String = row.get(4);
        if typtype == "d" && base != 0 {
            current = base;
        } else if category == "A" && elem != 0 {
            delimiters.push(delim.bytes().next().unwrap_or(b','));
            current = elem;
        } else {
            return Ok(wrap(TypeKind::Text, delimiters));
        }
    }
    Ok(wrap(TypeKind::Text, delimiters))
}

fn wrap(mut kind: TypeKind, delimiters: Vec<u8>) -> TypeKind {
    for delimiter in delimiters.into_iter().rev() {
        kind = TypeKind::Array {
            element: Box::new(kind),
            delimiter,
        };
    }
    kind
}

/// A table's columns (in order, without dropped, system and generated columns), their
/// types, its primary key and replica identity; None when the table does not exist.
pub async fn table_schema(
    client: &Client,
    table: &crate::event::TableName,
) -> Result<Option<crate::filter::TableSchema>, tokio_postgres::Error> {
    table_schema_with(client, table, false).await
}

/// [`table_schema`], with the stored generated columns too when `generated`: those a
/// publication sends on PostgreSQL 18 (`publish_generated_columns = stored`, or a column
/// list naming them).
pub async fn table_schema_with(
    client: &Client,
    table: &crate::event::TableName,
    generated: bool,
) -> Result<Option<crate::filter::TableSchema>, tokio_postgres::Error> {
    let Some(rel) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.table],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = rel.get(0);
    let identity = match rel.get::<_, String>(1).as_str() {
        "f" => crate::event::Identity::Full,
        "i" => crate::event::Identity::Index,
        "n" => crate::event::Identity::Nothing,
        _ => crate::event::Identity::Default,
    };
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, NULL),
                    coalesce(a.attnum = ANY (i.indkey), false)
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
               -- pgoutput leaves generated columns out unless the publication sends the
               -- stored ones (18+): the caller says which.
               AND (a.attgenerated = '' OR ($2 AND a.attgenerated = 's'))
             ORDER BY a.attnum",
            &[&oid, &generated],
        )
        .await?;
    let mut columns = Vec::with_capacity(rows.len());
    let mut primary_key = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let type_oid: u32 = r.get(1);
        if r.get::<_, bool>(3) {
            primary_key.push(name.clone());
        }
        columns.push(crate::filter::ColumnSchema {
            name,
            type_name: r.get(2),
            kind: resolve_type(client, type_oid).await?,
        });
    }
    Ok(Some(crate::filter::TableSchema {
        schema: table.schema.clone(),
        table: table.table.clone(),
        columns,
        primary_key,
        identity,
    }))
}

/// Schemas whose tables are never delivered, published or not: the system catalogs and
/// waltap's own tables (the event log, streams, and their cursors).
pub const RESERVED_SCHEMAS: &[&str] = &["pg_catalog", "information_schema", "pg_toast", "waltap"];

/// Why `table` is not delivered, once [`is_published`] said so: a partitioned table whose
/// partitions are published without `publish_via_partition_root` gets its own error, as
/// a subscription to it would otherwise wait for changes that only arrive under the
/// partitions' names.
pub async fn not_published(
    client: &Client,
    publication: &str,
    table: &crate::event::TableName,
) -> Result<crate::error::TableError, tokio_postgres::Error> {
    let partitions_published = client
        .query_opt(
            "SELECT 1 FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_publication_tables pt ON pt.pubname = $1
             JOIN pg_namespace pn ON pn.nspname = pt.schemaname
             JOIN pg_class p ON p.relnamespace = pn.oid AND p.relname = pt.tablename
             WHERE n.nspname = $2 AND c.relname = $3 AND c.relkind = 'p'
               AND p.relispartition AND pg_partition_root(p.oid) = c.oid
             LIMIT 1",
            &[&publication, &table.schema, &table.table],
        )
        .await?
        .is_some();
    Ok(if partitions_published {
        crate::error::TableError::PartitionRoot(table.to_string())
    } else {
        crate::error::TableError::NotPublished(table.to_string())
    })
}

/// Whether `table` is one of `publication`'s tables (matched by schema and name, never by
/// a joined `schema.table` text, which is ambiguous when a name holds a dot) and outside
/// [`RESERVED_SCHEMAS`].
pub async fn is_published(
    client: &Client,
    publication: &str,
    table: &crate::event::TableName,
) -> Result<bool, tokio_postgres::Error> {
    if RESERVED_SCHEMAS.contains(&table.schema.as_str()) {
        return Ok(false);
    }
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.table],
        )
        .await?;
    Ok(row.is_some())
}
