//! A predicate index over many subscribers' filters ([`FilterIndex`]): which of them an
//! event may reach, without evaluating them all.
//!
//! The index narrows; it never decides. For each event it returns *candidates*, a
//! superset of the members whose filter delivers the event (or, for a filter following
//! one row, whose row the event creates or removes), and the caller evaluates each
//! candidate's [`CompiledFilter`] exactly as before. So a filter means exactly what it
//! meant; the index only makes non-candidates free.
//!
//! How a filter is indexed, per action, on the row the action is judged by (the created
//! row; the `after` row of an update, and the `before` row too where it is read:
//! `update.before`, transitions, a filter that follows one row; the deleted row):
//!
//! - An equality or `in` on a column goes into a hash table per (table, action, column,
//!   value); `isNull: true` (or `null`) into the column's NULL list.
//! - `lt`/`lte`/`gt`/`gte` go into an interval tree per column; the bounds of one column
//!   ANDed together make one interval (`{"gte": 10, "lt": 20}` is `[10, 20)`).
//! - `AND` is indexed by one of its parts, the most selective (equality before ranges);
//!   `OR` by all of its alternatives, if each can be indexed.
//! - Anything else (`NOT`, `not`, `notIn`, `contains`, `startsWith`, `endsWith`,
//!   `isNull: false`, and comparisons on `numeric`, `json`/`jsonb` and array columns) cannot
//!   narrow: such a filter is a candidate for every event of its action and costs one
//!   evaluation per event, as it did before the index. So does a filter without conditions.
//!
//! A column the event did not carry (a key-only `before` row, an unchanged TOASTed value, a
//! value that does not compare, a column added after the filter was compiled) makes every
//! filter indexed on that column a candidate: evaluation delivers unknowns. A truncate
//! makes every filter of the table a candidate.
//!
//! Cost per event: one table lookup, then per indexed column of the table one hash lookup
//! and one tree descent (O(log n)), plus one evaluation per candidate. Members are removed
//! lazily: their entries are skipped, and rebuilt away once they outnumber the live ones.

mod keys;
mod ranges;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use super::eval::{Cmp, Expr, Mode, Test};
use super::typed::Family;
use super::CompiledFilter;
use crate::event::{Action, Event, Identity, Row};
use crate::value::Value;
use ranges::{Bound, Interval, Ranges};

/// Candidates for events among many members' filters; see the [module docs](self).
/// Members are small integers chosen by the caller (slab positions).
#[derive(Debug, Default)]
pub struct FilterIndex {
    /// schema -> table -> its filters.
    tables: HashMap<Box<str>, HashMap<Box<str>, TableIndex>>,
    /// What each member registered, kept to rebuild; `None` once removed.
    members: Vec<Option<Vec<Registration>>>,
    live: usize,
    /// Removed members whose entries are still in `tables`.
    dead: usize,
    /// Per member, the query that last emitted it: each candidate is emitted once.
    stamps: Vec<u32>,
    stamp: u32,
}

#[derive(Debug, Clone)]
struct Registration {
    schema: Box<str>,
    table: Box<str>,
    plan: Plan,
}

impl FilterIndex {
    /// Adds `member`'s filter for `schema.table` (call once per table of a member).
    pub fn insert(&mut self, member: usize, schema: &str, table: &str, filter: &CompiledFilter) {
        if self.members.len() <= member {
            self.members.resize_with(member + 1, || None);
            self.stamps.resize(member + 1, 0);
        }
        let registration = Registration {
            schema: schema.into(),
            table: table.into(),
            plan: Plan::of(filter),
        };
        self.place(member, &registration);
        let slot = &mut self.members[member];
        if slot.is_none() {
            self.live += 1;
        }
        slot.get_or_insert_with(Vec::new).push(registration);
    }

    /// Removes `member` and all its filters. Its number may be reused at once.
    pub fn remove(&mut self, member: usize) {
        if self
            .members
            .get_mut(member)
            .and_then(Option::take)
            .is_none()
        {
            return;
        }
        self.live -= 1;
        self.dead += 1;
        // A reused number would otherwise keep the old filter's entries: a candidate
        // too many, which evaluation turns down, but entries that only grow.
        if self.dead > self.live.max(64) {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.tables.clear();
        self.dead = 0;
        let members = std::mem::take(&mut self.members);
        for (member, regs) in members.iter().enumerate() {
            for r in regs.iter().flatten() {
                self.place(member, r);
            }
        }
        self.members = members;
    }

    fn place(&mut self, member: usize, r: &Registration) {
        let table = self
            .tables
            .entry(r.schema.clone())
            .or_default()
            .entry(r.table.clone())
            .or_default();
        table.everyone.push(member);
        table.create.add(member, &r.plan.create);
        table.update.add(member, &r.plan.update);
        table.delete.add(member, &r.plan.delete);
    }

    /// Replaces `out` with the members that `event` may concern, each once, in no
    /// particular order.
    pub fn candidates(&mut self, event: &Event, out: &mut Vec<usize>) {
        out.clear();
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.stamps.iter_mut().for_each(|s| *s = 0);
            self.stamp = 1;
        }
        let Some(table) = self
            .tables
            .get_mut(&*event.schema)
            .and_then(|t| t.get_mut(&*event.table))
        else {
            return;
        };
        let (stamps, stamp, members) = (&mut self.stamps, self.stamp, &self.members);
        let mut emit = |m: usize| {
            if stamps[m] != stamp && members[m].is_some() {
                stamps[m] = stamp;
                out.push(m);
            }
        };
        let after = Side {
            row: event.new.as_ref(),
            key_source: None,
        };
        let key_unchanged = event.action == Action::Update
            && event.old.is_none()
            && event.identity == Identity::Default;
        let before = Side {
            row: event.old.as_ref(),
            key_source: event.new.as_ref().filter(|_| key_unchanged),
        };
        let action = match event.action {
            Action::Truncate => {
                table.everyone.iter().for_each(|&m| emit(m));
                return;
            }
            Action::Create => &mut table.create,
            Action::Update => &mut table.update,
            Action::Delete => &mut table.delete,
        };
        action.always.iter().for_each(|&m| emit(m));
        action.after.collect(after, &mut emit);
        action.before.collect(before, &mut emit);
    }
}

/// The row a side of an action is judged by, as evaluation reads it: a missing `before`
/// of an update that kept its key takes key columns from `after`.
#[derive(Clone, Copy)]
struct Side<'e> {
    row: Option<&'e Row>,
    key_source: Option<&'e Row>,
}

#[derive(Debug, Default)]
struct TableIndex {
    /// Every member with a filter on the table: a truncate concerns them all.
    everyone: Vec<usize>,
    create: ActionIndex,
    update: ActionIndex,
    delete: ActionIndex,
}

#[derive(Debug, Default)]
struct ActionIndex {
    /// Candidates for every event of the action.
    always: Vec<usize>,
    after: SideIndex,
    before: SideIndex,
}

impl ActionIndex {
    fn add(&mut self, member: usize, target: &Target) {
        match target {
            Target::Never => {}
            Target::Always => self.always.push(member),
            Target::Probes { after, before } => {
                after.iter().for_each(|p| self.after.add(member, p));
                before.iter().for_each(|p| self.before.add(member, p));
            }
        }
    }
}

#[derive(Debug, Default)]
struct SideIndex {
    columns: Vec<ColumnIndex>,
}

/// The filters indexed on one column, as one compiled type reads it.
#[derive(Debug)]
struct ColumnIndex {
    column: Column,
    /// Every member indexed here: candidates when the value is unknown.
    members: Vec<usize>,
    equal: HashMap<Box<[u8]>, Vec<usize>>,
    null: Vec<usize>,
    ranges: Ranges,
    /// Where the column was last found in `Row::names`.
    hint: usize,
}

impl SideIndex {
    fn add(&mut self, member: usize, probe: &Probe) {
        let at = match self.columns.iter().position(|c| c.column == probe.column) {
            Some(at) => at,
            None => {
                self.columns.push(ColumnIndex {
                    column: probe.column.clone(),
                    members: Vec::new(),
                    equal: HashMap::new(),
                    null: Vec::new(),
                    ranges: Ranges::default(),
                    hint: 0,
                });
                self.columns.len() - 1
            }
        };
        let c = &mut self.columns[at];
        if c.members.last() != Some(&member) {
            c.members.push(member);
        }
        match &probe.test {
            ProbeTest::Equal(key) => c.equal.entry(key.clone()).or_default().push(member),
            ProbeTest::Null => c.null.push(member),
            ProbeTest::Range(lower, upper) => c.ranges.insert(Interval {
                lower: lower.clone(),
                upper: upper.clone(),
                member,
            }),
        }
    }

    fn collect(&mut self, side: Side<'_>, emit: &mut impl FnMut(usize)) {
        for c in &mut self.columns {
            let row = match (side.row, side.key_source) {
                (Some(row), _) => Some(row),
                (None, Some(row)) if c.column.key => Some(row),
                _ => None,
            };
            let value = row.and_then(|row| c.lookup(row));
            let key = match value {
                None => None,
                Some(Value::Null) => {
                    c.null.iter().for_each(|&m| emit(m));
                    continue;
                }
                Some(v) => keys::value_key(&c.column.family, v),
            };
            let Some(key) = key else {
                // Unknown, or not comparable: evaluation delivers it, so all are candidates.
                c.members.iter().for_each(|&m| emit(m));
                continue;
            };
            let key = key.bytes();
            if !c.equal.is_empty() {
                if let Some(members) = c.equal.get(key) {
                    members.iter().for_each(|&m| emit(m));
                }
            }
            if !c.ranges.is_empty() {
                c.ranges.stab(key, emit);
            }
        }
    }
}

impl ColumnIndex {
    fn lookup<'r>(&mut self, row: &'r Row) -> Option<&'r Value> {
        let name = &*self.column.name;
        let at = match row.names.get(self.hint) {
            Some(n) if **n == *name => self.hint,
            _ => {
                self.hint = row.names.iter().position(|n| **n == *name)?;
                self.hint
            }
        };
        row.values.get(at)?.as_ref()
    }
}

/// A column as a filter reads it: by name, compared as `family`, and whether it is part
/// of the primary key (read from `after` when an update kept its key and sent no `before`).
#[derive(Debug, Clone, PartialEq)]
struct Column {
    name: Box<str>,
    family: Family,
    key: bool,
}

#[derive(Debug, Clone)]
struct Probe {
    column: Column,
    test: ProbeTest,
}

#[derive(Debug, Clone)]
enum ProbeTest {
    Equal(Box<[u8]>),
    Null,
    Range(Bound, Bound),
}

/// What can make a filter deliver an event of one action.
#[derive(Debug, Clone)]
enum Target {
    Never,
    Always,
    /// A candidate when one of these holds on its side's row.
    Probes {
        after: Vec<Probe>,
        before: Vec<Probe>,
    },
}

/// Per action, what makes a filter a candidate.
#[derive(Debug, Clone)]
struct Plan {
    create: Target,
    update: Target,
    delete: Target,
}

/// Necessary conditions on one row for an expression to admit it.
enum Access {
    Never,
    Always,
    /// At least one holds.
    Any(Vec<Probe>),
}

impl Plan {
    fn of(f: &CompiledFilter) -> Plan {
        let on = |expr: Option<&Expr>| expr.map_or(Access::Always, |e| access(f, e));
        match &f.mode {
            Mode::Everything => Plan {
                create: Target::Always,
                update: Target::Always,
                delete: Target::Always,
            },
            Mode::Actions(a) => Plan {
                create: a
                    .create
                    .as_ref()
                    .map_or(Target::Never, |e| after(on(Some(e)))),
                // Both sides must admit: one is enough to narrow by, the better one.
                update: a.update.as_ref().map_or(Target::Never, |u| {
                    let (a, b) = (on(u.after.as_ref()), on(u.before.as_ref()));
                    match (a, b) {
                        (Access::Never, _) | (_, Access::Never) => Target::Never,
                        (Access::Always, b) => before(b),
                        (a, Access::Always) => after(a),
                        (Access::Any(a), Access::Any(b)) if b.len() < a.len() => {
                            before(Access::Any(b))
                        }
                        (a, _) => after(a),
                    }
                }),
                delete: a
                    .delete
                    .as_ref()
                    .map_or(Target::Never, |e| before(on(Some(e)))),
            },
            Mode::Where(e) => Plan {
                create: after(access(f, e)),
                // A filter following one row also watches updates moving the key away.
                update: match f.single_row_key {
                    true => either(access(f, e), access(f, e)),
                    false => after(access(f, e)),
                },
                delete: before(access(f, e)),
            },
            Mode::Transitions(e) => Plan {
                create: after(access(f, e)),
                update: either(access(f, e), access(f, e)),
                delete: before(access(f, e)),
            },
        }
    }
}

fn after(a: Access) -> Target {
    either(a, Access::Never)
}

fn before(b: Access) -> Target {
    either(Access::Never, b)
}

/// A candidate when `a` may hold on the after row or `b` on the before row.
fn either(a: Access, b: Access) -> Target {
    match (a, b) {
        (Access::Always, _) | (_, Access::Always) => Target::Always,
        (Access::Never, Access::Never) => Target::Never,
        (a, b) => {
            let probes = |x| match x {
                Access::Any(p) => p,
                _ => Vec::new(),
            };
            Target::Probes {
                after: probes(a),
                before: probes(b),
            }
        }
    }
}

/// Necessary conditions for `expr` to admit a row (its truth may be TRUE).
fn access(f: &CompiledFilter, expr: &Expr) -> Access {
    match expr {
        Expr::Const(true) => Access::Always,
        Expr::Const(false) => Access::Never,
        Expr::Not(_) => Access::Always,
        Expr::Test { slot, test } => f.slots.get(*slot).map_or(Access::Always, |s| {
            let column = Column {
                name: s.name.clone(),
                family: s.family.clone(),
                key: s.key,
            };
            test_access(column, test)
        }),
        // TRUE is possible only if it is for some alternative.
        Expr::Or(items) => {
            let mut probes = Vec::new();
            for item in items {
                match access(f, item) {
                    Access::Always => return Access::Always,
                    Access::Never => {}
                    Access::Any(p) => probes.extend(p),
                }
            }
            if probes.is_empty() {
                Access::Never
            } else {
                Access::Any(probes)
            }
        }
        // TRUE is possible only if it is for every part: any one part narrows.
        Expr::And(items) => {
            let mut choices: Vec<Vec<Probe>> = Vec::new();
            for item in items {
                match access(f, item) {
                    Access::Never => return Access::Never,
                    Access::Always => {}
                    Access::Any(p) => merge_range(&mut choices, p),
                }
            }
            choices
                .into_iter()
                .min_by_key(|p| {
                    (
                        p.len(),
                        p.iter().any(|p| matches!(p.test, ProbeTest::Range(..))),
                    )
                })
                .map_or(Access::Always, Access::Any)
        }
    }
}

/// Adds `probes` to the choices of an AND; a single range joins a single range of the same
/// column, so `gte` and `lt` make one interval.
fn merge_range(choices: &mut Vec<Vec<Probe>>, probes: Vec<Probe>) {
    let single_range = |p: &[Probe]| match p {
        [Probe {
            column,
            test: ProbeTest::Range(lower, upper),
        }] => Some((column.clone(), lower.clone(), upper.clone())),
        _ => None,
    };
    if let Some((column, lower, upper)) = single_range(&probes) {
        let same = choices
            .iter_mut()
            .find(|c| single_range(c).is_some_and(|(other, ..)| other == column));
        if let Some(
            [Probe {
                test: ProbeTest::Range(l, u),
                ..
            }],
        ) = same.map(Vec::as_mut_slice)
        {
            *l = ranges::max_lower(std::mem::replace(l, Bound::Unbounded), lower);
            *u = ranges::min_upper(std::mem::replace(u, Bound::Unbounded), upper);
            return;
        }
    }
    choices.push(probes);
}

fn test_access(column: Column, test: &Test) -> Access {
    let family = &column.family;
    let probe = |test| {
        Access::Any(vec![Probe {
            column: column.clone(),
            test,
        }])
    };
    match test {
        Test::IsNull(true) => probe(ProbeTest::Null),
        Test::Cmp(Cmp::Eq, lit) => match keys::lit_key(family, lit) {
            Some(k) => probe(ProbeTest::Equal(k)),
            None => Access::Always,
        },
        Test::In(lits) => {
            let keys: Option<Vec<_>> = lits.iter().map(|l| keys::lit_key(family, l)).collect();
            match keys {
                Some(keys) => Access::Any(
                    keys.into_iter()
                        .map(|k| Probe {
                            column: column.clone(),
                            test: ProbeTest::Equal(k),
                        })
                        .collect(),
                ),
                None => Access::Always,
            }
        }
        Test::Cmp(cmp, lit) if keys::order_indexed(family) => {
            let Some(k) = keys::lit_key(family, lit) else {
                return Access::Always;
            };
            let (lower, upper) = match cmp {
                Cmp::Lt => (Bound::Unbounded, Bound::Excl(k)),
                Cmp::Lte => (Bound::Unbounded, Bound::Incl(k)),
                Cmp::Gt => (Bound::Excl(k), Bound::Unbounded),
                Cmp::Gte => (Bound::Incl(k), Bound::Unbounded),
                Cmp::Eq => (Bound::Incl(k.clone()), Bound::Incl(k)),
            };
            probe(ProbeTest::Range(lower, upper))
        }
        _ => Access::Always,
    }
}
