//! [`Filter`] + [`TableSchema`] -> [`CompiledFilter`]: every column resolved, every
//! operator checked against its column's type, every literal typed, and the limits the
//! table's REPLICA IDENTITY puts on the filter turned into warnings.

use serde_json::Value as Json;

use super::eval::{Actions, Cmp, Expr, Mode, Slot, Test, UpdateExprs};
use super::parse::{index, join};
use super::typed::{self, Family, Lit, Op};
use super::{CompiledFilter, Condition, Filter, FilterError, Operators, Predicate, TableSchema};
use crate::event::Identity;

pub(super) fn compile(filter: &Filter, table: &TableSchema) -> Result<CompiledFilter, FilterError> {
    let mut c = Compiler {
        table,
        slots: Vec::new(),
    };
    let has_actions = filter.create.is_some() || filter.update.is_some() || filter.delete.is_some();
    if filter.transitions && has_actions {
        return Err(malformed(
            "transitions",
            "set-membership mode takes `where`, not create/update/delete",
        ));
    }
    if filter.r#where.is_some() && has_actions {
        return Err(malformed(
            "where",
            "cannot be combined with create/update/delete: `where` applies to every action",
        ));
    }
    let every = Predicate::default();
    let mode = if filter.transitions {
        Mode::Transitions(c.predicate(filter.r#where.as_ref().unwrap_or(&every), "where")?)
    } else if let Some(p) = &filter.r#where {
        Mode::Where(c.predicate(p, "where")?)
    } else if !has_actions {
        Mode::Actions(Box::new(Actions {
            create: Some(Expr::Const(true)),
            update: Some(UpdateExprs {
                after: None,
                before: None,
            }),
            delete: Some(Expr::Const(true)),
        }))
    } else {
        let create = filter.create.as_ref().map(|p| c.predicate(p, "create"));
        let update = filter.update.as_ref().map(|u| -> Result<_, FilterError> {
            Ok(UpdateExprs {
                after: u
                    .after
                    .as_ref()
                    .map(|p| c.predicate(p, "update.after"))
                    .transpose()?,
                before: u
                    .before
                    .as_ref()
                    .map(|p| c.predicate(p, "update.before"))
                    .transpose()?,
            })
        });
        Mode::Actions(Box::new(Actions {
            create: create.transpose()?,
            update: update.transpose()?,
            delete: filter
                .delete
                .as_ref()
                .map(|p| c.predicate(p, "delete"))
                .transpose()?,
        }))
    };
    let fields = match &filter.fields {
        Some(names) if names.is_empty() => {
            return Err(malformed(
                "fields",
                "expected at least one column name (an empty list would deliver no update)",
            ))
        }
        Some(names) => Some(
            names
                .iter()
                .enumerate()
                .map(|(i, name)| c.slot(name, &index("fields", i)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let warnings = warnings(table, &mode, fields.as_deref(), &c.slots);
    let single_row_key = single_row_key(&mode, &c.slots, table);
    Ok(CompiledFilter {
        mode,
        slots: c.slots,
        fields,
        truncate: filter.truncate,
        warnings,
        single_row_key,
    })
}

fn malformed(path: &str, message: &str) -> FilterError {
    FilterError::Malformed {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

/// A literal as it appears in an error message: compact JSON, cut short.
fn shown(v: &Json) -> String {
    const MAX_CHARS: usize = 80;
    let text = v.to_string();
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

struct Compiler<'t> {
    table: &'t TableSchema,
    slots: Vec<Slot>,
}

fn and(mut items: Vec<Expr>) -> Expr {
    if items.len() == 1 {
        items.pop().unwrap_or(Expr::Const(true))
    } else {
        Expr::And(items)
    }
}

impl Compiler<'_> {
    /// The slot of a column, created on first use.
    fn slot(&mut self, name: &str, path: &str) -> Result<usize, FilterError> {
        if let Some(i) = self.slots.iter().position(|s| &*s.name == name) {
            return Ok(i);
        }
        let columns = &self.table.columns;
        let Some(position) = columns.iter().position(|c| c.name == name) else {
            return Err(FilterError::UnknownColumn {
                table: self.table.qualified(),
                column: name.to_owned(),
                path: path.to_owned(),
                available: columns.iter().map(|c| c.name.clone()).collect(),
            });
        };
        let column = &columns[position];
        let family = Family::of(&column.kind, &column.type_name);
        let key = self.table.primary_key.iter().any(|k| k == name);
        self.slots.push(Slot::new(name, family, key, position));
        Ok(self.slots.len() - 1)
    }

    fn predicate(&mut self, p: &Predicate, path: &str) -> Result<Expr, FilterError> {
        let mut all = Vec::new();
        for (column, condition) in &p.columns {
            let here = join(path, column);
            let slot = self.slot(column, &here)?;
            all.push(self.condition(slot, condition, &here)?);
        }
        if let Some(ps) = &p.and {
            let here = join(path, "AND");
            for (i, q) in ps.iter().enumerate() {
                all.push(self.predicate(q, &index(&here, i))?);
            }
        }
        if let Some(ps) = &p.or {
            let here = join(path, "OR");
            let alternatives = ps
                .iter()
                .enumerate()
                .map(|(i, q)| self.predicate(q, &index(&here, i)))
                .collect::<Result<Vec<_>, _>>()?;
            all.push(Expr::Or(alternatives));
        }
        if let Some(ps) = &p.not {
            let here = join(path, "NOT");
            for (i, q) in ps.iter().enumerate() {
                all.push(Expr::Not(Box::new(self.predicate(q, &index(&here, i))?)));
            }
        }
        Ok(and(all))
    }

    fn condition(&mut self, slot: usize, c: &Condition, path: &str) -> Result<Expr, FilterError> {
        match c {
            Condition::Equals(v) => self.equals(slot, v, path),
            Condition::Operators(ops) => self.operators(slot, ops, path),
        }
    }

    fn operators(&mut self, slot: usize, ops: &Operators, path: &str) -> Result<Expr, FilterError> {
        let mut all = Vec::new();
        if let Some(v) = &ops.equals {
            let here = join(path, "equals");
            self.check_op(slot, Op::Equals, &here)?;
            all.push(self.equals(slot, v, &here)?);
        }
        if let Some(c) = &ops.not {
            let here = join(path, "not");
            self.check_op(slot, Op::Not, &here)?;
            all.push(match c {
                Condition::Equals(Json::Null) => test(slot, Test::IsNull(false)),
                c => Expr::Not(Box::new(self.condition(slot, c, &here)?)),
            });
        }
        if let Some(list) = &ops.r#in {
            let here = join(path, "in");
            self.check_op(slot, Op::In, &here)?;
            all.push(self.one_of(slot, list, &here)?);
        }
        if let Some(list) = &ops.not_in {
            let here = join(path, "notIn");
            self.check_op(slot, Op::NotIn, &here)?;
            all.push(Expr::Not(Box::new(self.one_of(slot, list, &here)?)));
        }
        let ordered = [
            (&ops.lt, Op::Lt, Cmp::Lt),
            (&ops.lte, Op::Lte, Cmp::Lte),
            (&ops.gt, Op::Gt, Cmp::Gt),
            (&ops.gte, Op::Gte, Cmp::Gte),
        ];
        for (v, op, cmp) in ordered {
            if let Some(v) = v {
                let here = join(path, op.name());
                self.check_op(slot, op, &here)?;
                let lit = self.literal(slot, v, &here)?;
                all.push(test(slot, Test::Cmp(cmp, lit)));
            }
        }
        if let Some(v) = &ops.contains {
            let here = join(path, "contains");
            self.check_op(slot, Op::Contains, &here)?;
            let t = match &self.slots[slot].family {
                Family::Array(elem) => {
                    let elem = (**elem).clone();
                    Test::Has(self.typed(slot, &elem, v, &here)?)
                }
                _ => Test::Contains(self.string(slot, v, &here)?),
            };
            all.push(test(slot, t));
        }
        if let Some(s) = &ops.starts_with {
            let here = join(path, "startsWith");
            self.check_op(slot, Op::StartsWith, &here)?;
            all.push(test(slot, Test::StartsWith(s.as_str().into())));
        }
        if let Some(s) = &ops.ends_with {
            let here = join(path, "endsWith");
            self.check_op(slot, Op::EndsWith, &here)?;
            all.push(test(slot, Test::EndsWith(s.as_str().into())));
        }
        if let Some(want) = ops.is_null {
            self.check_op(slot, Op::IsNull, &join(path, "isNull"))?;
            all.push(test(slot, Test::IsNull(want)));
        }
        if all.is_empty() {
            return Err(malformed(
                path,
                "expected at least one operator (equals, not, in, notIn, lt, lte, gt, gte, \
                 contains, startsWith, endsWith, isNull)",
            ));
        }
        Ok(and(all))
    }

    fn equals(&mut self, slot: usize, v: &Json, path: &str) -> Result<Expr, FilterError> {
        if v.is_null() {
            return Ok(test(slot, Test::IsNull(true)));
        }
        let lit = self.literal(slot, v, path)?;
        Ok(test(slot, Test::Cmp(Cmp::Eq, lit)))
    }

    /// `in`: a `null` element stands for "or is NULL", so that `notIn` with one means
    /// "and is not NULL" rather than SQL's never-true `NOT IN (..., NULL)`.
    fn one_of(&mut self, slot: usize, list: &[Json], path: &str) -> Result<Expr, FilterError> {
        let mut lits = Vec::with_capacity(list.len());
        let mut null = false;
        for (i, v) in list.iter().enumerate() {
            if v.is_null() {
                null = true;
            } else {
                lits.push(self.literal(slot, v, &index(path, i))?);
            }
        }
        let values = if lits.is_empty() {
            Expr::Const(false)
        } else {
            test(slot, Test::In(lits))
        };
        Ok(if null {
            Expr::Or(vec![values, test(slot, Test::IsNull(true))])
        } else {
            values
        })
    }

    fn check_op(&self, slot: usize, op: Op, path: &str) -> Result<(), FilterError> {
        let s = &self.slots[slot];
        if s.family.supports(op) {
            return Ok(());
        }
        Err(FilterError::OperatorType {
            path: path.to_owned(),
            operator: op.name().to_owned(),
            column: s.name.to_string(),
            type_name: self.type_name(slot).to_owned(),
            supported: s.family.supported().to_vec(),
        })
    }

    fn type_name(&self, slot: usize) -> &str {
        let name = &self.slots[slot].name;
        self.table
            .columns
            .iter()
            .find(|c| *c.name == **name)
            .map_or("?", |c| c.type_name.as_str())
    }

    fn literal(&self, slot: usize, v: &Json, path: &str) -> Result<Lit, FilterError> {
        let family = self.slots[slot].family.clone();
        self.typed(slot, &family, v, path)
    }

    /// `v` typed as `family` (the column's, or its element's for array `contains`).
    fn typed(
        &self,
        slot: usize,
        family: &Family,
        v: &Json,
        path: &str,
    ) -> Result<Lit, FilterError> {
        let lit = if v.is_null() {
            None
        } else {
            typed::literal(family, v)
        };
        lit.ok_or_else(|| self.bad_literal(slot, family.expected(), v, path))
    }

    fn string(&self, slot: usize, v: &Json, path: &str) -> Result<Box<str>, FilterError> {
        v.as_str()
            .map(Into::into)
            .ok_or_else(|| self.bad_literal(slot, "a string".into(), v, path))
    }

    fn bad_literal(&self, slot: usize, expected: String, v: &Json, path: &str) -> FilterError {
        FilterError::BadLiteral {
            path: path.to_owned(),
            expected: format!(
                "{expected} for column {:?} ({})",
                &*self.slots[slot].name,
                self.type_name(slot)
            ),
            got: shown(v),
        }
    }
}

fn test(slot: usize, test: Test) -> Expr {
    Expr::Test { slot, test }
}

/// Slots an expression reads.
fn read_slots(expr: &Expr, out: &mut Vec<usize>) {
    match expr {
        Expr::Const(_) => {}
        Expr::And(items) | Expr::Or(items) => items.iter().for_each(|e| read_slots(e, out)),
        Expr::Not(inner) => read_slots(inner, out),
        Expr::Test { slot, .. } => {
            if !out.contains(slot) {
                out.push(*slot);
            }
        }
    }
}

/// Names of the columns `expr` reads that a key-only row of `identity` may lack.
fn beyond_key(expr: &Expr, slots: &[Slot], identity: Identity) -> Vec<String> {
    let mut read = Vec::new();
    read_slots(expr, &mut read);
    read.iter()
        .filter_map(|&i| slots.get(i))
        .filter(|s| !(identity == Identity::Default && s.key))
        .map(|s| s.name.to_string())
        .collect()
}

fn identity_name(identity: Identity) -> &'static str {
    match identity {
        Identity::Default => "DEFAULT",
        Identity::Full => "FULL",
        Identity::Index => "USING INDEX",
        Identity::Nothing => "NOTHING",
    }
}

/// What the table's REPLICA IDENTITY hides from this filter. Under FULL nothing; under
/// NOTHING the source refuses updates and deletes, so nothing to say either.
fn warnings(
    table: &TableSchema,
    mode: &Mode,
    fields: Option<&[usize]>,
    slots: &[Slot],
) -> Vec<String> {
    let identity = table.identity;
    if matches!(identity, Identity::Full | Identity::Nothing) {
        return Vec::new();
    }
    let name = table.qualified();
    let ident = identity_name(identity);
    let fix = format!("ALTER TABLE {name} REPLICA IDENTITY FULL");
    let key = if identity == Identity::Default {
        "the primary key"
    } else {
        "the replica identity index columns"
    };
    let mut out = Vec::new();
    let delete_warning = |at: &str, cols: &[String]| {
        format!(
            "{at}: table {name} has REPLICA IDENTITY {ident}, so deleted rows carry only {key}: \
             the condition on {} cannot be checked, and every delete it might match is \
             delivered ({fix} to filter deletes exactly)",
            cols.join(", ")
        )
    };
    match mode {
        Mode::Everything => {}
        Mode::Transitions(expr) => {
            let cols = beyond_key(expr, slots, identity);
            if !cols.is_empty() {
                out.push(format!(
                    "transitions: table {name} has REPLICA IDENTITY {ident}, so updates carry no \
                     before image of {}: waltap cannot see `disappear` when an update moves a \
                     row out of the set (such updates are not delivered), reports a row moving \
                     in as `update` (appear and update both mean upsert), and reports every \
                     delete the condition might match as `disappear` (remove the row if you \
                     hold it). {fix} to see every transition",
                    cols.join(", ")
                ));
            }
        }
        Mode::Where(expr) => {
            let cols = beyond_key(expr, slots, identity);
            if !cols.is_empty() {
                out.push(delete_warning("where", &cols));
            }
        }
        Mode::Actions(actions) => {
            if let Some(before) = actions.update.as_ref().and_then(|u| u.before.as_ref()) {
                let cols = beyond_key(before, slots, identity);
                if !cols.is_empty() {
                    out.push(format!(
                        "update.before: table {name} has REPLICA IDENTITY {ident}, so the \
                         before image holds at most {key}: the condition on {} cannot be \
                         checked, and updates are delivered when the rest of the filter \
                         matches ({fix} to filter on the before image)",
                        cols.join(", ")
                    ));
                }
            }
            if let Some(delete) = &actions.delete {
                let cols = beyond_key(delete, slots, identity);
                if !cols.is_empty() {
                    out.push(delete_warning("delete", &cols));
                }
            }
        }
    }
    if let Some(fields) = fields {
        let cols: Vec<String> = fields
            .iter()
            .filter_map(|&i| slots.get(i))
            .filter(|s| !(identity == Identity::Default && s.key))
            .map(|s| s.name.to_string())
            .collect();
        if !cols.is_empty() {
            out.push(format!(
                "fields: table {name} has REPLICA IDENTITY {ident}, so waltap cannot tell \
                 whether {} changed: such updates are delivered unless the column is reported \
                 unchanged ({fix} to filter by changed columns)",
                cols.join(", ")
            ));
        }
    }
    out
}

/// Whether `expr` is nothing but equality tests on primary-key columns, ANDed, naming
/// every key column: it selects one row (or none) and says nothing else about it.
fn pins_key(expr: &Expr, key_slots: &[usize]) -> bool {
    let mut pinned = Vec::new();
    only_key_pins(expr, key_slots, &mut pinned) && key_slots.iter().all(|k| pinned.contains(k))
}

fn only_key_pins(expr: &Expr, key_slots: &[usize], out: &mut Vec<usize>) -> bool {
    let slot = match expr {
        Expr::And(items) => return items.iter().all(|e| only_key_pins(e, key_slots, out)),
        Expr::Test {
            slot,
            test: Test::Cmp(Cmp::Eq, _),
        } => slot,
        Expr::Test {
            slot,
            test: Test::In(lits),
        } if lits.len() == 1 => slot,
        _ => return false,
    };
    out.push(*slot);
    key_slots.contains(slot)
}

/// A pure pin: `where` (with or without transitions) and nothing but the whole primary
/// key in it. Another condition could hide the row while it exists, and a filter by
/// action does not follow every change of the row, so neither completes.
fn single_row_key(mode: &Mode, slots: &[Slot], table: &TableSchema) -> bool {
    if table.primary_key.is_empty() {
        return false;
    }
    // A key column the filter never reads has no slot: then nothing pins it.
    let mut key_slots = Vec::new();
    for k in &table.primary_key {
        match slots.iter().position(|s| *s.name == **k) {
            Some(i) => key_slots.push(i),
            None => return false,
        }
    }
    match mode {
        Mode::Where(expr) | Mode::Transitions(expr) => pins_key(expr, &key_slots),
        Mode::Everything | Mode::Actions(_) => false,
    }
}
