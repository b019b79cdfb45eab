//! Copies of streams' initial states under way in this process, and how far each is, for
//! whoever wants to show it (a stream's info, the console, the command line's progress
//! line). The copy itself is one store transaction (made by the stream's first consumer):
//! until it commits no other session can count its rows, so the copier reports here.
//!
//! Invariant: an entry exists exactly while the copy's `Copying` guard lives; it is
//! keyed by stream name, so two stores with a stream of the same name in one process
//! would share an entry (a display matter only: nothing reads it to decide anything).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use crate::event::TableName;

/// Rows read, the estimate, and the start, by stream name.
type Copies = BTreeMap<String, (u64, Option<u64>, Instant)>;

static COPIES: Mutex<Copies> = Mutex::new(BTreeMap::new());

/// How far a copy is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyProgress {
    /// Rows read so far (before the filter).
    pub rows: u64,
    /// The tables' rows as the catalog estimates them (`pg_class.reltuples`); `None`
    /// when a table was never analyzed.
    pub estimated_rows: Option<u64>,
    /// Seconds since the copy started.
    pub seconds: f64,
}

/// The copy of stream `name`'s initial state, if this process is making it now.
pub fn copy_progress(name: &str) -> Option<CopyProgress> {
    let copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
    copies
        .get(name)
        .map(|&(rows, estimated_rows, started)| CopyProgress {
            rows,
            estimated_rows,
            seconds: started.elapsed().as_secs_f64(),
        })
}

/// A copy in progress, registered until dropped.
pub(crate) struct Copying(String);

impl Copying {
    pub(crate) fn start(name: &str, estimated_rows: Option<u64>) -> Copying {
        let mut copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
        copies.insert(name.to_owned(), (0, estimated_rows, Instant::now()));
        Copying(name.to_owned())
    }

    /// `rows` more were read.
    pub(crate) fn add(&self, rows: u64) {
        let mut copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = copies.get_mut(&self.0) {
            entry.0 += rows;
        }
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        let mut copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
        copies.remove(&self.0);
    }
}

/// The rows of `tables` as the catalog of the watched database estimates them
/// (`reltuples`, kept by VACUUM and ANALYZE); `None` when one was never analyzed or the
/// catalog cannot be read. Cheap: no table is scanned.
pub async fn estimate_rows(catalog: &Client, tables: &[TableName]) -> Option<u64> {
    let (schemas, names): (Vec<&str>, Vec<&str>) = tables
        .iter()
        .map(|t| (t.schema.as_str(), t.table.as_str()))
        .unzip();
    let row = catalog
        .query_one(
            "SELECT sum(greatest(c.reltuples, 0))::int8, count(*), bool_and(c.reltuples >= 0)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            &[&schemas, &names],
        )
        .await
        .ok()?;
    let (sum, found, analyzed): (Option<i64>, i64, Option<bool>) =
        (row.get(0), row.get(1), row.get(2));
    (found == tables.len() as i64 && analyzed == Some(true)).then(|| sum.unwrap_or(0).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_listed_while_it_runs() {
        let name = "copies-unit-test";
        assert_eq!(copy_progress(name), None);
        let copying = Copying::start(name, Some(10));
        copying.add(3);
        copying.add(4);
        let p = copy_progress(name).expect("listed");
        assert_eq!((p.rows, p.estimated_rows), (7, Some(10)));
        drop(copying);
        assert_eq!(copy_progress(name), None);
    }
}
