//! One consumer's view of the change stream ([`FilteredView`]): its tables, their filters,
//! and the per-consumer numbering of each transaction. Pure, like the rest of `filter`;
//! the hub applies it to live events and the event log's stream readers to stored ones.

use super::{CompiledFilter, Decision, PinnedRow};
use crate::event::{Event, Position, Row, TableName};

/// One consumer's view of the change stream: its tables and their filters applied, and
/// each transaction's `index`/`total`/`last` renumbered over the events it receives.
///
/// `R` is the row type of the events it passes on: [`Row`] for live events, which
/// [`FilteredView::push`] filters itself; any other (e.g. the JSON rows of the event log)
/// through [`FilteredView::push_decided`], where the caller has applied
/// [`FilteredView::filter_for`].
pub struct FilteredView<R = Row> {
    tables: Vec<(TableName, CompiledFilter)>,
    /// This consumer's events of the open transaction (only when its total is known,
    /// which bounds them by the listener's `max_buffered_events`).
    pending: Vec<Event<R>>,
    /// Of a transaction too large to count: the newest event, held until the next one (or
    /// the end of the transaction) tells whether it is the last.
    held: Option<Event<R>>,
    next_index: u32,
    /// The open transaction has removed the row a single-row filter follows.
    row_gone: bool,
}

impl<R> FilteredView<R> {
    /// The tables it reads, each with its filter.
    pub(crate) fn tables(&self) -> &[(TableName, CompiledFilter)] {
        &self.tables
    }

    /// Whether the one row its filter follows was deleted last.
    pub(crate) fn row_gone(&self) -> bool {
        self.row_gone
    }

    /// One table and its filter.
    pub fn new(table: TableName, filter: CompiledFilter) -> Self {
        FilteredView::for_tables(vec![(table, filter)])
    }

    /// A set of tables, each with its own filter; events of other tables are skipped.
    pub fn for_tables(tables: Vec<(TableName, CompiledFilter)>) -> Self {
        FilteredView {
            tables,
            pending: Vec::new(),
            held: None,
            next_index: 0,
            row_gone: false,
        }
    }

    /// The filter of `schema.table`, or `None` when the table is not in the view.
    pub fn filter_for(&self, schema: &str, table: &str) -> Option<&CompiledFilter> {
        self.tables
            .iter()
            .find(|(t, _)| t.schema == schema && t.table == table)
            .map(|(_, f)| f)
    }

    /// True when the view is one table whose filter pins one row by its whole primary key.
    pub fn single_row_key(&self) -> bool {
        matches!(self.tables.as_slice(), [(_, f)] if f.single_row_key())
    }

    /// True while events of an open transaction are held back, waiting for its end.
    pub fn holds_events(&self) -> bool {
        !self.pending.is_empty() || self.held.is_some()
    }

    /// Feeds the next event of the source's stream, already decided: `mine` is the event
    /// as this consumer receives it (transition set), `None` when it is skipped, and
    /// `tx_last` tells whether the source event ended its transaction. Appends to `out`
    /// the events this consumer may now receive, in order and renumbered.
    pub fn push_decided(&mut self, mine: Option<Event<R>>, tx_last: bool, out: &mut Vec<Event<R>>) {
        if let Some(mut mine) = mine {
            if mine.tx.total.is_some() {
                self.pending.push(mine);
            } else {
                mine.tx.index = self.next_index;
                mine.tx.last = false;
                self.next_index += 1;
                out.extend(self.held.replace(mine));
            }
        }
        if !tx_last {
            return;
        }
        // A transaction is counted for all its events or for none, so at most one of
        // `pending` and `held` has anything.
        let total = self.pending.len() as u32;
        for (i, mut e) in self.pending.drain(..).enumerate() {
            e.tx.index = i as u32;
            e.tx.total = Some(total);
            e.tx.last = i as u32 + 1 == total;
            out.push(e);
        }
        if let Some(mut last) = self.held.take() {
            last.tx.last = true;
            out.push(last);
        }
        self.next_index = 0;
    }
}

impl FilteredView<Row> {
    /// Feeds the next event of the listener's stream; appends to `out` the events this
    /// consumer may now receive, in order and renumbered.
    ///
    /// Returns the position of `ev` when it ends a transaction that left the row a
    /// single-row view follows deleted: the view is complete after the events in `out`
    /// (the rest of the transaction is delivered first, so its numbering holds, and a
    /// row deleted and created again within it is not gone).
    #[must_use = "a single-row view completes when this returns a position"]
    pub fn push(&mut self, ev: &Event, out: &mut Vec<Event>) -> Option<Position> {
        let mine = self.matching(ev);
        if self.single_row_key() {
            match self
                .filter_for(&ev.schema, &ev.table)
                .and_then(|f| f.pinned_row(ev))
            {
                Some(PinnedRow::Gone) => self.row_gone = true,
                Some(PinnedRow::Exists) => self.row_gone = false,
                None => {}
            }
        }
        self.push_decided(mine, ev.tx.last, out);
        (ev.tx.last && std::mem::take(&mut self.row_gone)).then_some(ev.position)
    }

    fn matching(&self, ev: &Event) -> Option<Event> {
        match self.filter_for(&ev.schema, &ev.table)?.evaluate(ev) {
            Decision::Skip => None,
            Decision::Deliver { transition } => {
                let mut ev = ev.clone();
                ev.transition = transition;
                Some(ev)
            }
        }
    }
}
