//! Evaluation of a [`CompiledFilter`] on events: the hot path. It allocates nothing (except
//! to parse json/jsonb values for equality) and resolves column names through per-column
//! position hints checked against `Row::names` on every use, so a moved column (ALTER
//! TABLE) is found again without any shared cache to invalidate.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;

use super::typed::{self, Family, Lit};
use super::{CompiledFilter, Decision, PinnedRow, Transition};
use crate::event::{Action, Event, Identity, Row};
use crate::value::Value;

/// A column the filter reads.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) name: Box<str>,
    pub(super) family: Family,
    /// Part of the primary key: known in an update without a `before` row under
    /// REPLICA IDENTITY DEFAULT (the key did not change).
    pub(super) key: bool,
    /// Where the column was last found in `Row::names`.
    hint: AtomicUsize,
}

impl Slot {
    pub(super) fn new(name: &str, family: Family, key: bool, position: usize) -> Slot {
        Slot {
            name: name.into(),
            family,
            key,
            hint: AtomicUsize::new(position),
        }
    }

    fn position(&self, names: &[Arc<str>]) -> Option<usize> {
        let hint = self.hint.load(AtomicOrdering::Relaxed);
        if names.get(hint).is_some_and(|n| **n == *self.name) {
            return Some(hint);
        }
        let found = names.iter().position(|n| **n == *self.name)?;
        self.hint.store(found, AtomicOrdering::Relaxed);
        Some(found)
    }

    /// The column's value in `row`; `None` when it was not sent or does not exist.
    fn lookup<'r>(&self, row: &'r Row) -> Option<&'r Value> {
        let i = self.position(&row.names)?;
        row.values.get(i)?.as_ref()
    }
}

impl Clone for Slot {
    fn clone(&self) -> Slot {
        Slot::new(
            &self.name,
            self.family.clone(),
            self.key,
            self.hint.load(AtomicOrdering::Relaxed),
        )
    }
}

#[derive(Debug, Clone)]
pub(super) enum Mode {
    /// No filter.
    Everything,
    Actions(Box<Actions>),
    /// `where` without transitions.
    Where(Expr),
    Transitions(Expr),
}

/// Per-action predicates; `None` = action not delivered.
#[derive(Debug, Clone)]
pub(super) struct Actions {
    pub(super) create: Option<Expr>,
    pub(super) update: Option<UpdateExprs>,
    pub(super) delete: Option<Expr>,
}

#[derive(Debug, Clone)]
pub(super) struct UpdateExprs {
    pub(super) after: Option<Expr>,
    pub(super) before: Option<Expr>,
}

#[derive(Debug, Clone)]
pub(super) enum Expr {
    Const(bool),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Test { slot: usize, test: Test },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cmp {
    Eq,
    Lt,
    Lte,
    Gt,
    Gte,
}

#[derive(Debug, Clone)]
pub(super) enum Test {
    IsNull(bool),
    Cmp(Cmp, Lit),
    /// Non-empty, without NULLs (those become `IsNull`).
    In(Vec<Lit>),
    Contains(Box<str>),
    StartsWith(Box<str>),
    EndsWith(Box<str>),
    /// An array has the element.
    Has(Lit),
}

/// The set of SQL truth values a predicate may take over every value the missing columns
/// could hold: one bit each for TRUE, FALSE and NULL (SQL's unknown). A complete row gives
/// a single bit; a missing column gives several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Truth(u8);

impl Truth {
    const TRUE: Truth = Truth(1);
    const FALSE: Truth = Truth(2);
    const NULL: Truth = Truth(4);
    const TRUE_OR_FALSE: Truth = Truth(3);
    const ANY: Truth = Truth(7);

    fn of(b: bool) -> Truth {
        if b {
            Truth::TRUE
        } else {
            Truth::FALSE
        }
    }

    #[cfg(test)]
    pub(super) fn for_tests(bits: u8) -> Truth {
        Truth(bits)
    }

    fn has_true(self) -> bool {
        self.0 & 1 != 0
    }

    pub(super) fn not(self) -> Truth {
        Truth((self.0 & 4) | ((self.0 & 1) << 1) | ((self.0 & 2) >> 1))
    }

    /// Every `x AND y` for `x` in `self`, `y` in `other`, by SQL's table.
    pub(super) fn and(self, other: Truth) -> Truth {
        let (a, b) = (self.0, other.0);
        let t = a & b & 1;
        let f = (a | b) & 2;
        let null = (a & 4 != 0 && b & 5 != 0) || (b & 4 != 0 && a & 1 != 0);
        Truth(t | f | if null { 4 } else { 0 })
    }

    pub(super) fn or(self, other: Truth) -> Truth {
        self.not().and(other.not()).not()
    }
}

/// Whether a row is selected: certainly, certainly not, or it depends on what is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Yes,
    No,
    Maybe,
}

impl From<Truth> for Outcome {
    fn from(t: Truth) -> Outcome {
        if t == Truth::TRUE {
            Outcome::Yes
        } else if t.has_true() {
            Outcome::Maybe
        } else {
            Outcome::No
        }
    }
}

/// The row a predicate reads. `key_source` stands in for primary-key columns when `row`
/// is absent (the `before` of an update that did not change the key).
#[derive(Clone, Copy)]
struct View<'a> {
    row: Option<&'a Row>,
    key_source: Option<&'a Row>,
}

impl<'a> View<'a> {
    fn after(event: &'a Event) -> View<'a> {
        View {
            row: event.new.as_ref(),
            key_source: None,
        }
    }

    fn before(event: &'a Event) -> View<'a> {
        let key_unchanged = event.action == Action::Update
            && event.old.is_none()
            && event.identity == Identity::Default;
        View {
            row: event.old.as_ref(),
            key_source: if key_unchanged {
                event.new.as_ref()
            } else {
                None
            },
        }
    }

    fn get(&self, slot: &Slot) -> Option<&'a Value> {
        match (self.row, self.key_source) {
            (Some(row), _) => slot.lookup(row),
            (None, Some(row)) if slot.key => slot.lookup(row),
            _ => None,
        }
    }
}

fn deliver(transition: Option<Transition>) -> Decision {
    Decision::Deliver { transition }
}

impl CompiledFilter {
    /// What to do with `event`, an event of the table the filter was compiled for.
    pub fn evaluate(&self, event: &Event) -> Decision {
        if let Mode::Everything = self.mode {
            return deliver(None);
        }
        if event.action == Action::Truncate {
            return if self.truncate {
                deliver(None)
            } else {
                Decision::Skip
            };
        }
        match &self.mode {
            Mode::Everything => deliver(None),
            Mode::Actions(a) => self.by_action(
                event,
                a.create.as_ref(),
                a.update.as_ref(),
                a.delete.as_ref(),
            ),
            Mode::Where(expr) => {
                let update = UpdateRef {
                    after: Some(expr),
                    before: None,
                };
                self.by_action(event, Some(expr), Some(update), Some(expr))
            }
            Mode::Transitions(expr) => self.transition(event, expr),
        }
    }

    /// What `event`, an event of the filter's table, does to the row a
    /// [`CompiledFilter::single_row_key`] filter follows, whether or not the event is
    /// delivered (under `where`, an update moving the key away is not); `None` for other
    /// filters and for events that leave the row as it was. An update that may have
    /// changed the key without telling the old one (REPLICA IDENTITY USING INDEX on other
    /// columns) is not taken as the row leaving.
    pub fn pinned_row(&self, event: &Event) -> Option<PinnedRow> {
        let (true, Mode::Where(expr) | Mode::Transitions(expr)) = (self.single_row_key, &self.mode)
        else {
            return None;
        };
        let is_pinned = |view| Outcome::from(self.eval(expr, view)) == Outcome::Yes;
        let is_other = |view| Outcome::from(self.eval(expr, view)) == Outcome::No;
        match event.action {
            Action::Truncate => Some(PinnedRow::Gone),
            Action::Delete => is_pinned(View::before(event)).then_some(PinnedRow::Gone),
            Action::Create => is_pinned(View::after(event)).then_some(PinnedRow::Exists),
            Action::Update => {
                let (before, after) = (View::before(event), View::after(event));
                if is_pinned(after) {
                    Some(PinnedRow::Exists)
                } else if is_pinned(before) && is_other(after) {
                    Some(PinnedRow::Gone)
                } else {
                    None
                }
            }
        }
    }

    fn by_action<'e, U: Into<UpdateRef<'e>>>(
        &self,
        event: &Event,
        create: Option<&Expr>,
        update: Option<U>,
        delete: Option<&Expr>,
    ) -> Decision {
        let selected = match event.action {
            Action::Create => create.is_some_and(|e| self.admits(e, View::after(event))),
            Action::Delete => delete.is_some_and(|e| self.admits(e, View::before(event))),
            Action::Update => update.is_some_and(|u| {
                let u = u.into();
                u.after.is_none_or(|e| self.admits(e, View::after(event)))
                    && u.before.is_none_or(|e| self.admits(e, View::before(event)))
                    && self.fields_may_have_changed(event)
            }),
            Action::Truncate => false,
        };
        if selected {
            deliver(None)
        } else {
            Decision::Skip
        }
    }

    fn transition(&self, event: &Event, expr: &Expr) -> Decision {
        let outcome = |view| Outcome::from(self.eval(expr, view));
        let transition = match event.action {
            Action::Create => match outcome(View::after(event)) {
                Outcome::No => return Decision::Skip,
                Outcome::Yes | Outcome::Maybe => Transition::Appear,
            },
            Action::Delete => match outcome(View::before(event)) {
                Outcome::No => return Decision::Skip,
                Outcome::Yes | Outcome::Maybe => Transition::Disappear,
            },
            Action::Update => {
                let after = outcome(View::after(event));
                let before = outcome(View::before(event));
                match (before, after) {
                    (Outcome::Yes, Outcome::No) => Transition::Disappear,
                    // Without a before image a row leaving the set looks like any
                    // change outside it: the compile-time warning says so.
                    (Outcome::No | Outcome::Maybe, Outcome::No) => return Decision::Skip,
                    (Outcome::No, Outcome::Yes | Outcome::Maybe) => Transition::Appear,
                    (Outcome::Yes | Outcome::Maybe, Outcome::Yes | Outcome::Maybe) => {
                        if !self.fields_may_have_changed(event) {
                            return Decision::Skip;
                        }
                        Transition::Update
                    }
                }
            }
            Action::Truncate => return Decision::Skip,
        };
        deliver(Some(transition))
    }

    /// Selected, or cannot be ruled out.
    fn admits(&self, expr: &Expr, view: View<'_>) -> bool {
        self.eval(expr, view).has_true()
    }

    fn eval(&self, expr: &Expr, view: View<'_>) -> Truth {
        match expr {
            Expr::Const(b) => Truth::of(*b),
            Expr::And(items) => {
                let mut acc = Truth::TRUE;
                for item in items {
                    acc = acc.and(self.eval(item, view));
                    if acc == Truth::FALSE {
                        break;
                    }
                }
                acc
            }
            Expr::Or(items) => {
                let mut acc = Truth::FALSE;
                for item in items {
                    acc = acc.or(self.eval(item, view));
                    if acc == Truth::TRUE {
                        break;
                    }
                }
                acc
            }
            Expr::Not(inner) => self.eval(inner, view).not(),
            Expr::Test { slot, test } => match self.slots.get(*slot) {
                Some(slot) => check(slot, test, view.get(slot)),
                None => Truth::ANY,
            },
        }
    }

    /// `fields`: false only when no listed column can have changed.
    fn fields_may_have_changed(&self, event: &Event) -> bool {
        let Some(fields) = &self.fields else {
            return true;
        };
        if let Some(changed) = &event.changed {
            return fields
                .iter()
                .filter_map(|&i| self.slots.get(i))
                .any(|slot| changed.iter().any(|c| **c == *slot.name));
        }
        let before = View::before(event);
        let after = View::after(event);
        fields
            .iter()
            .filter_map(|&i| self.slots.get(i))
            .any(|slot| {
                if event.unchanged.iter().any(|c| **c == *slot.name) {
                    return false;
                }
                match (before.get(slot), after.get(slot)) {
                    (Some(b), Some(a)) => !b.same(a),
                    _ => true,
                }
            })
    }
}

/// The update predicates, borrowed from either mode.
#[derive(Clone, Copy)]
struct UpdateRef<'e> {
    after: Option<&'e Expr>,
    before: Option<&'e Expr>,
}

impl<'e> From<&'e UpdateExprs> for UpdateRef<'e> {
    fn from(u: &'e UpdateExprs) -> UpdateRef<'e> {
        UpdateRef {
            after: u.after.as_ref(),
            before: u.before.as_ref(),
        }
    }
}

/// One column test. A missing value could be anything, NULL included; a value this filter
/// cannot compare (another type after ALTER TABLE, unparsable text) likewise.
fn check(slot: &Slot, test: &Test, value: Option<&Value>) -> Truth {
    let Some(value) = value else {
        return match test {
            Test::IsNull(_) => Truth::TRUE_OR_FALSE,
            _ => Truth::ANY,
        };
    };
    if let Value::Null = value {
        return match test {
            Test::IsNull(want) => Truth::of(*want),
            _ => Truth::NULL,
        };
    }
    let family = &slot.family;
    let result = match test {
        Test::IsNull(want) => Some(!*want),
        Test::Cmp(cmp, lit) => match cmp {
            Cmp::Eq => typed::equal(family, value, lit),
            Cmp::Lt => typed::order(family, value, lit).map(|o| o.is_lt()),
            Cmp::Lte => typed::order(family, value, lit).map(|o| o.is_le()),
            Cmp::Gt => typed::order(family, value, lit).map(|o| o.is_gt()),
            Cmp::Gte => typed::order(family, value, lit).map(|o| o.is_ge()),
        },
        Test::In(lits) => {
            let mut result = Some(false);
            for lit in lits {
                match typed::equal(family, value, lit) {
                    Some(true) => {
                        result = Some(true);
                        break;
                    }
                    Some(false) => {}
                    None => result = None,
                }
            }
            result
        }
        Test::Contains(s) => typed::text(family, value).map(|t| t.contains(&**s)),
        Test::StartsWith(s) => {
            typed::text_bytes(family, value).map(|t| t.starts_with(s.as_bytes()))
        }
        Test::EndsWith(s) => typed::text_bytes(family, value).map(|t| t.ends_with(s.as_bytes())),
        Test::Has(lit) => match (family, value) {
            (Family::Array(elem), Value::Array(items))
            | (Family::Array(elem), Value::BoundedArray { values: items, .. }) => {
                typed::array_has(elem, items, lit)
            }
            _ => None,
        },
    };
    result.map_or(Truth::ANY, Truth::of)
}
