//! A table's columns changed while subscribers follow it: each subscriber of the table is
//! told with a `schemaChange` item before the first event of the new shape, unless its
//! filter reads a column that is gone or has another type, in which case it ends with
//! [`super::SubscriptionError::SchemaChanged`] rather than evaluate against values that no
//! longer mean what the filter was checked for. Subscribers of other tables are untouched.

use super::{offer, Fed, Subscriber, SubscriptionItem};
use crate::event::SchemaChange;

/// Tells `sub` about `change` if it follows the table; ends it when its filter conflicts.
pub(super) fn announce(sub: &mut Subscriber, change: &SchemaChange) {
    let Some(filter) = sub.view.filter_for(&change.schema, &change.table) else {
        return;
    };
    match change.conflict(filter.columns()) {
        Some(conflict) => {
            tracing::info!(table = %change.qualified(), subscriber = sub.id, %conflict, "subscription ended by a schema change");
            offer(sub, Fed::Ended(conflict));
            sub.done = true;
        }
        None => offer(
            sub,
            Fed::Item(SubscriptionItem::SchemaChange {
                schema: change.schema.to_string(),
                table: change.table.to_string(),
                columns: change.columns.clone(),
            }),
        ),
    }
}
