//! The hub's subscribers, and how one event reaches them: through a [`FilterIndex`], so an
//! event costs an index lookup plus one evaluation per candidate, not one per subscriber.
//!
//! Every candidate goes through its [`FilteredView`] exactly as before; a subscriber left
//! out is one whose filter skips the event and whose view has nothing to do with it. The
//! one thing a view does with events it skips is closing a transaction (releasing the
//! events it held back for the numbering, completing a followed row): so at the end of a
//! transaction the views that took an event of it are fed the last event too.

use std::collections::HashMap;
use std::sync::Arc;

use super::{offer, CompletionReason, Fed, Subscriber, SubscriptionItem};
use crate::error::Error;
use crate::event::Event;
use crate::filter::FilterIndex;
use crate::lsn::Watermark;

#[derive(Default)]
pub(super) struct Subscribers {
    /// By member number (the index's), reused once freed.
    slots: Vec<Option<Subscriber>>,
    free: Vec<usize>,
    by_id: HashMap<u64, usize>,
    index: FilterIndex,
    /// Members fed an event of the open transaction, and a mark against listing one twice.
    open: Vec<usize>,
    in_open: Vec<bool>,
    candidates: Vec<usize>,
    out: Vec<Event>,
}

impl Subscribers {
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Takes a subscriber; only between transactions.
    pub(super) fn join(&mut self, sub: Subscriber) {
        let member = self.free.pop().unwrap_or(self.slots.len());
        if member == self.slots.len() {
            self.slots.push(None);
            self.in_open.push(false);
        }
        for (table, filter) in sub.view.tables() {
            self.index
                .insert(member, &table.schema, &table.table, filter);
        }
        self.by_id.insert(sub.id, member);
        self.slots[member] = Some(sub);
    }

    pub(super) fn remove(&mut self, id: u64) {
        if let Some(member) = self.by_id.remove(&id) {
            self.slots[member] = None;
            self.index.remove(member);
            self.free.push(member);
        }
    }

    fn remove_done(&mut self, members: impl IntoIterator<Item = usize>) {
        let done = |m: usize| self.slots.get(m)?.as_ref().filter(|s| s.done).map(|s| s.id);
        let ids: Vec<u64> = members.into_iter().filter_map(done).collect();
        for id in ids {
            self.remove(id);
        }
    }

    /// Offers `ev` to every subscriber it concerns.
    pub(super) fn event(&mut self, ev: &Event) {
        if let Some(change) = &ev.schema_change {
            for sub in self.slots.iter_mut().flatten() {
                super::schema::announce(sub, change);
            }
            self.remove_done(0..self.slots.len());
        }
        self.index.candidates(ev, &mut self.candidates);
        if ev.tx.last {
            for m in self.open.drain(..) {
                self.in_open[m] = false;
                self.candidates.push(m);
            }
            self.candidates.sort_unstable();
            self.candidates.dedup();
        }
        let mut finished = Vec::new();
        for &m in &self.candidates {
            let Some(sub) = self.slots.get_mut(m).and_then(Option::as_mut) else {
                continue;
            };
            let completed = sub.view.push(ev, &mut self.out);
            for e in self.out.drain(..) {
                offer(sub, Fed::Item(SubscriptionItem::Event(e)));
            }
            if let Some(position) = completed {
                let reason = CompletionReason::Deleted;
                offer(
                    sub,
                    Fed::Item(SubscriptionItem::Completed { reason, position }),
                );
                // One reading an initial state drops this completion when its
                // snapshot already misses the row, and goes on.
                sub.done |= !sub.watermarks;
            }
            if !ev.tx.last && !self.in_open[m] && (sub.view.holds_events() || sub.view.row_gone()) {
                self.in_open[m] = true;
                self.open.push(m);
            }
            if sub.done {
                finished.push(m);
            }
        }
        self.remove_done(finished);
    }

    /// Passes a watermark to the subscribers reading an initial state.
    pub(super) fn watermark(&mut self, lsn: Watermark) {
        for sub in self.slots.iter_mut().flatten().filter(|s| s.watermarks) {
            offer(sub, Fed::Watermark(lsn));
        }
        self.remove_done(0..self.slots.len());
    }

    /// Ends every subscription with `e` and forgets them all.
    pub(super) fn fail(&mut self, e: &Arc<Error>) {
        for sub in std::mem::take(self).slots.into_iter().flatten() {
            let _ = sub.tx.try_send(Err(e.clone()));
        }
    }
}
