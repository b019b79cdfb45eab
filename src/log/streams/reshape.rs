//! A table's columns changed in the middle of a persisted stream (docs/event-format.md,
//! "Schema changes"). The event log keeps the change with the first event of the table
//! after it; the reader, on reading that event, either queues a `schemaChange` item to
//! hand out before the next event it delivers, or, when the stream's filter reads a column
//! that is gone or whose values now have another JSON form, decides nothing more and ends
//! the consumer with [`StoreError::SchemaChanged`] once the events before the change are
//! handed out. The column types the filter reads rows with follow the change.
//!
//! The type check compares JSON forms (the types the consumer read when it opened, with
//! the new built-in type), not type OIDs: a consumer reopened after the change reads the
//! new types from the catalog, and must then pass the same stored change without ending
//! again.

use super::reader::Reader;
use super::*;
use crate::event::SchemaChange;

impl Reader {
    /// Takes the change an event read at `at` carries.
    pub(super) fn reshape(&mut self, change: &SchemaChange, at: Mark) -> Result<(), StoreError> {
        let types = self
            .types
            .iter_mut()
            .find(|t| *t.table.schema == *change.schema && *t.table.table == *change.table);
        if let (Some(filter), Some(types)) =
            (self.view.filter_for(&change.schema, &change.table), types)
        {
            if let Some(conflict) = types.conflict(change, filter.columns()) {
                tracing::info!(stream = %self.shared.name, table = %change.qualified(), %conflict, "stream consumer ends at a schema change");
                self.reshapes.push_back((at, Err(conflict)));
                return Ok(());
            }
            types.follow(change);
        }
        // Handed out before on an earlier connection when the consumer is past it.
        if at > self.delivered_through {
            self.reshapes.push_back((
                at,
                Ok(StreamItem::SchemaChange {
                    schema: change.schema.to_string(),
                    table: change.table.to_string(),
                    columns: change.columns.clone(),
                }),
            ));
        }
        Ok(())
    }

    /// A `schemaChange` item due before the next event. Reads the next event first: the
    /// page that brings it may bring its change too.
    pub(super) async fn next_reshape(&mut self) -> Option<Result<StreamItem, StoreError>> {
        if self.out.is_empty() {
            if let Err(e) = self.fill().await {
                self.failed = true;
                return Some(Err(e));
            }
        }
        let next = self.out.front().map(|ev| Mark::of(ev.position));
        let due = match self.reshapes.front()? {
            (_, Err(_)) => next.is_none_or(|n| n >= self.reshapes[0].0),
            (mark, Ok(_)) => next.is_some_and(|n| n >= *mark),
        };
        if !due {
            return None;
        }
        match self.reshapes.pop_front()?.1 {
            Ok(item) => Some(Ok(item)),
            Err(conflict) => {
                self.failed = true;
                Some(Err(StoreError::SchemaChanged(conflict)))
            }
        }
    }

    /// A schema change ends the consumer: nothing after it is read.
    pub(super) fn ending(&self) -> bool {
        self.reshapes.iter().any(|(_, r)| r.is_err())
    }
}
