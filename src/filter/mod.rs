//! Subscriber filters (README, "Filters and subscriptions"): which change events a subscription receives.
//!
//! This module owns the JSON form of a filter ([`Filter`], the same for Rust, the CLI's
//! `--filter` and HTTP), its validation against one table's columns and types
//! ([`Filter::compile`] -> [`CompiledFilter`]), and evaluation on [`Event`]s, including the
//! set-membership transitions (`appear` / `disappear` / `update`). It is pure: no I/O, no
//! async, and evaluation allocates nothing except for `json`/`jsonb` equality.
//!
//! # The JSON form
//!
//! ```json
//! {"create": {"plan": "pro"},
//!  "update": {"after": {"plan": {"in": ["pro", "team"]}}, "before": {"plan": "free"}},
//!  "delete": {},
//!  "fields": ["plan"],
//!  "truncate": true}
//! ```
//!
//! - No filter at all ([`CompiledFilter::accept_all`], or [`CompiledFilter::new`] with
//!   `None`) delivers every event, truncates included. Given a filter object, the keys `create` / `update` / `delete` select the
//!   actions delivered; with none of them, all three are. `{}` as a predicate is every row.
//! - `update` takes `after` and/or `before`; both must match when both are given;
//!   `"update": {}` is every update.
//! - `where` (without `transitions`) applies one predicate to the created row, the `after`
//!   row of an update and the deleted row. It cannot be combined with per-action keys.
//! - `{"where": P, "transitions": true}`: set-membership mode (below). `where` may be left
//!   out there: the set is then every row.
//! - `fields`: an update is delivered only when one of these columns changed (see below).
//!   In transitions mode it gates only `update` transitions: entering or leaving the set
//!   is always delivered.
//! - `truncate: true` adds truncate events, which a filter object otherwise leaves out.
//!   It adds to the actions selected; it does not select truncates alone.
//! - `null` for a top-level key, `update.after` or `update.before` is the same as leaving
//!   it out.
//!
//! A predicate is an object whose keys are column names or the combinators `AND` (an array
//! of predicates, or one), `OR` (an array) and `NOT` (a predicate or an array; `NOT [A, B]`
//! is `NOT A AND NOT B`). All keys of one object must hold. `AND: []` and `NOT: []` hold for
//! every row, `OR: []` for none. `AND`, `OR` and `NOT` are reserved: a column with one of
//! these exact names cannot be filtered on.
//!
//! A column's condition is a literal (equality; `null` means "is NULL") or an object of
//! operators, all of which must hold: `equals`, `not` (a literal or a nested condition),
//! `in` / `notIn` (arrays; a `null` element means "or is NULL" / "and is not NULL"), `lt`,
//! `lte`, `gt`, `gte`, `contains`, `startsWith`, `endsWith`, `isNull`. An empty operator
//! object is rejected. Unknown keys are errors everywhere.
//!
//! # NULL, missing values and three-valued logic
//!
//! Comparisons follow SQL (and Prisma): a NULL value matches `null` / `equals: null` /
//! `isNull: true` and `not: null` / `isNull: false` rule it out; any other comparison with
//! NULL is SQL's unknown, which is not a match, and stays unknown under `NOT`. So
//! `{"plan": {"not": "pro"}}`, `notIn` without a `null` element and `NOT {"plan": "pro"}`
//! do *not* select rows where `plan` is NULL, just as `plan <> 'pro'` does not.
//!
//! A value Postgres did not send (non-key columns of a key-only `before`/`deleted` row,
//! an unchanged TOASTed value without a before image, a column added or dropped since the
//! filter was compiled, an event value of an unexpected type) is *unknown*, never taken as
//! NULL. Evaluation tracks the set of truth values a predicate could have over all values
//! the missing columns might hold: `NOT` of an unknown stays unknown, `false AND unknown`
//! is false, `true OR unknown` is true. The rule for an unknown result is one, everywhere:
//! **deliver** (never silently drop what might match; the consumer sees the row, or the
//! key it may hold). In practice: a `create` or `update.after` is unknown only for an
//! unchanged TOAST column without a before image (its value did not change and may match)
//! or after a schema change; a key-only `delete` or `update.before` is unknown whenever the
//! predicate needs a non-key column. [`Filter::compile`] warns about the latter up front.
//!
//! Under REPLICA IDENTITY DEFAULT an update without a `before` row did not change the
//! key, so `update.before` (and the `before` side of transitions) reads primary-key
//! columns from the `after` row.
//!
//! # Comparisons by column type
//!
//! | type | operators | comparison |
//! |------|-----------|------------|
//! | int2/int4/int8/oid/xid/cid | equality, ordering | integers; literal a JSON integer or an integer string |
//! | float4/float8 | equality, ordering | as Postgres: NaN equals NaN and sorts above everything; literal a number or `"NaN"`/`"Infinity"`/`"-Infinity"` |
//! | numeric | equality, ordering | exact decimal, never through f64 (`0.1` = `0.10`); NaN above Infinity; literal a number or a decimal string (give literals beyond f64 precision as strings) |
//! | text, varchar, name, char, enums, domains and other user types | equality, ordering, `contains`/`startsWith`/`endsWith` | Unicode code points (Rust `str` order), case-sensitive: no collation; enums by label, not by declaration order |
//! | bpchar (`character(n)`) | as text | trailing spaces ignored, as Postgres does |
//! | uuid | equality, ordering | literal hyphenated or 32 hex digits, any case |
//! | timestamptz | equality, ordering | instants; literal RFC 3339 / ISO 8601 with an offset (`2026-01-01T00:00:00+02:00` = `2025-12-31 22:00:00Z`), `infinity`, `-infinity`; rounded to µs |
//! | timestamp | equality, ordering | wall-clock time; literal without offset, a bare date is midnight |
//! | date, time | equality, ordering | `YYYY-MM-DD` (BC, infinity), `HH:MM[:SS[.f]]` |
//! | timetz | equality, ordering | as Postgres: by UTC time, then by offset |
//! | bool | equality | |
//! | json, jsonb | equality | semantic JSON equality (key order and number spelling do not matter); parses the value, so it allocates. A `null` literal is SQL NULL: a JSON `null` document cannot be matched |
//! | bytea | equality | literal base64 (as events carry it) or `\x` hex |
//! | arrays | equality, `contains` | `equals` a JSON array (nested for more dimensions, NULL elements equal NULL); `contains` means "has this element" (Prisma's `has`), any dimension |
//! | interval, inet, ranges, geometric and other built-in types | equality | exact Postgres text form |
//!
//! "Equality" is `equals`, `not`, `in`, `notIn`, `isNull`; "ordering" is `lt`, `lte`, `gt`,
//! `gte`. An operator the type does not support, or a literal of the wrong type, is an
//! error at compile time naming the path, the column and its type.
//!
//! # `fields`
//!
//! An update passes when one of the listed columns is in the event's `changed` list. When
//! `changed` is absent (no full before image) waltap compares `before` and `after` values
//! where both are present, counts columns listed in `unchanged` and primary-key columns of
//! an update without a `before` row (the key did not change) as unchanged, and otherwise
//! delivers: it never drops an update whose listed column might have changed.
//!
//! # Transitions
//!
//! `{"where": P, "transitions": true}` labels each delivered event by membership of the
//! set P selects: a create in the set is `appear`; a delete of a row in the set is
//! `disappear`; an update is `update` (in before and after), `appear` (out, in) or
//! `disappear` (in, out); out/out is not delivered.
//!
//! Unknown membership counts as in (the "deliver" rule), with one exception. Without a
//! before image (REPLICA IDENTITY DEFAULT, and P reads non-key columns) the `before` side
//! is unknown: an update whose after row is in is reported as `update` (appear and update
//! both mean upsert; without the before image waltap cannot tell them apart, and reports
//! update), and one whose after row is out is *not* delivered, since reporting every
//! change outside the set as `disappear` would flood the consumer: waltap cannot see
//! `disappear` there, and [`CompiledFilter::warnings`] says so when the subscription is
//! made. A key-only delete whose membership is unknown is `disappear`: the consumer
//! removes the row if it holds it. Truncates come only with `truncate: true`, without a
//! transition label (every row left the set).

mod compile;
mod decimal;
mod eval;
mod index;
mod parse;
mod temporal;
mod typed;
mod view;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::event::Transition;
pub use index::FilterIndex;
pub use view::FilteredView;

use crate::event::Identity;
use crate::value::TypeKind;

#[cfg(doc)]
use crate::event::Event;

/// A subscriber filter in its plain-data form; (de)serializes as the JSON form described
/// in the README's "Filters and subscriptions" section. Build one from JSON with
/// [`Filter::from_json`], `str::parse` or serde; check it against a table with
/// [`Filter::compile`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    /// `create`: the inserts delivered, by their new row.
    pub create: Option<Predicate>,
    /// `update`: the updates delivered, by their row after and before.
    pub update: Option<UpdateFilter>,
    /// `delete`: the deletes delivered, by the deleted row (or its key).
    pub delete: Option<Predicate>,
    /// `where`: one predicate for every action; not combinable with the per-action keys.
    pub r#where: Option<Predicate>,
    /// `transitions`: set-membership mode on `where` (rows entering, leaving and
    /// changing inside the set).
    pub transitions: bool,
    /// `fields`: an update is delivered only when one of these columns changed.
    pub fields: Option<Vec<String>>,
    /// `truncate`: also deliver truncate events.
    pub truncate: bool,
}

/// The `update` key: conditions on the row after and before the change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpdateFilter {
    pub after: Option<Predicate>,
    pub before: Option<Predicate>,
}

/// A condition on a row: every column condition and every combinator must hold. The
/// default (no keys) holds for every row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Predicate {
    pub columns: BTreeMap<String, Condition>,
    /// `AND`: all hold.
    pub and: Option<Vec<Predicate>>,
    /// `OR`: at least one holds; an empty list holds for no row.
    pub or: Option<Vec<Predicate>>,
    /// `NOT`: none holds.
    pub not: Option<Vec<Predicate>>,
}

/// What one column must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// A bare literal: equality, or "is NULL" for `null`.
    Equals(serde_json::Value),
    /// An operator object; every operator given must hold.
    Operators(Box<Operators>),
}

/// The operators of a column condition; `None` = not given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Operators {
    pub equals: Option<serde_json::Value>,
    pub not: Option<Condition>,
    pub r#in: Option<Vec<serde_json::Value>>,
    pub not_in: Option<Vec<serde_json::Value>>,
    pub lt: Option<serde_json::Value>,
    pub lte: Option<serde_json::Value>,
    pub gt: Option<serde_json::Value>,
    pub gte: Option<serde_json::Value>,
    /// Substring for text columns; an element for array columns.
    pub contains: Option<serde_json::Value>,
    pub starts_with: Option<String>,
    pub ends_with: Option<String>,
    pub is_null: Option<bool>,
}

impl Filter {
    /// Parses the JSON form, with errors that name the offending path.
    pub fn from_json(value: &serde_json::Value) -> Result<Filter, FilterError> {
        parse::filter(value)
    }

    /// The JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        parse::filter_to_json(self)
    }

    /// Validates the filter against `table` and prepares it for evaluation.
    pub fn compile(&self, table: &TableSchema) -> Result<CompiledFilter, FilterError> {
        compile::compile(self, table)
    }
}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Filter, FilterError> {
        let value: serde_json::Value =
            serde_json::from_str(s).map_err(|e| FilterError::Malformed {
                path: String::new(),
                message: format!("invalid JSON: {e}"),
            })?;
        parse::filter(&value)
    }
}

impl Serialize for Filter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

// Through `serde_json::Value` so that every input format gets the same path-naming
// errors as `from_json`.
impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Filter, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        parse::filter(&value).map_err(serde::de::Error::custom)
    }
}

impl Predicate {
    /// Parses one predicate; `path` prefixes error paths (e.g. `"where"`).
    pub fn from_json(value: &serde_json::Value, path: &str) -> Result<Predicate, FilterError> {
        parse::predicate(value, path)
    }

    /// The JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        parse::predicate_to_json(self)
    }
}

impl Serialize for Predicate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Predicate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Predicate, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        parse::predicate(&value, "").map_err(serde::de::Error::custom)
    }
}

impl Serialize for UpdateFilter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        parse::update_to_json(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for UpdateFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UpdateFilter, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        parse::update(&value, "update").map_err(serde::de::Error::custom)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        parse::condition_to_json(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Condition, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        parse::condition(&value, "").map_err(serde::de::Error::custom)
    }
}

impl Serialize for Operators {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        parse::operators_to_json(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Operators {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Operators, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match parse::condition(&value, "").map_err(serde::de::Error::custom)? {
            Condition::Operators(ops) => Ok(*ops),
            Condition::Equals(_) => Err(serde::de::Error::custom("expected an operator object")),
        }
    }
}

/// A table as the filter sees it, read from the catalog when the subscription is made.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchema {
    pub schema: String,
    pub table: String,
    pub columns: Vec<ColumnSchema>,
    pub primary_key: Vec<String>,
    pub identity: Identity,
}

/// One column: its name, its type's name (`int4`, `text`, `mood`, `_int4`; the
/// `format_type` spelling such as `character varying(20)` works too) and how its values
/// are typed.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSchema {
    pub name: String,
    pub type_name: String,
    pub kind: TypeKind,
}

impl TableSchema {
    /// `schema.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Why a filter was rejected. `path` locates the problem in the JSON form
/// (`update.after.plan.in[1]`); an empty path is the filter itself.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The JSON is not a filter: wrong shape, unknown key, empty operator object.
    #[error("{}: {message}", at(.path))]
    Malformed {
        /// Where in the filter.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A predicate names a column the table does not have.
    #[error(
        "{}: table {table} has no column {column:?} (its columns: {})",
        at(.path),
        .available.join(", ")
    )]
    UnknownColumn {
        /// The table, schema-qualified.
        table: String,
        /// The column named.
        column: String,
        /// Where in the filter.
        path: String,
        /// The table's columns.
        available: Vec<String>,
    },
    /// An operator does not apply to the column's type (e.g. `contains` on an integer).
    #[error(
        "{}: operator `{operator}` does not apply to column {column:?} of type {type_name} \
         ({type_name} supports: {})",
        at(.path),
        .supported.join(", ")
    )]
    OperatorType {
        /// Where in the filter.
        path: String,
        /// The operator used.
        operator: String,
        /// The column.
        column: String,
        /// The column's Postgres type.
        type_name: String,
        /// The operators that type supports.
        supported: Vec<&'static str>,
    },
    /// A literal does not fit the column's type.
    #[error("{}: expected {expected}, got {got}", at(.path))]
    BadLiteral {
        /// Where in the filter.
        path: String,
        /// What the column's type accepts.
        expected: String,
        /// The literal given.
        got: String,
    },
}

fn at(path: &str) -> &str {
    if path.is_empty() {
        "filter"
    } else {
        path
    }
}

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Skip,
    /// `transition` is set in transitions mode (except for truncates).
    Deliver {
        transition: Option<Transition>,
    },
}

/// What an event does to the row a [`CompiledFilter::single_row_key`] filter follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedRow {
    /// The row no longer exists: deleted, truncated, or its key updated to another value.
    Gone,
    /// The row exists (again): created, or another row's key updated to the pinned one.
    Exists,
}

impl Decision {
    pub fn is_deliver(&self) -> bool {
        matches!(self, Decision::Deliver { .. })
    }
}

/// A filter checked against its table, ready for [`CompiledFilter::evaluate`].
///
/// Column names are resolved to positions once and re-resolved on their own when the
/// table's columns move (ALTER TABLE); evaluation takes `&self` and is safe to share
/// between threads.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    mode: eval::Mode,
    slots: Vec<eval::Slot>,
    /// Slot indices of `fields`.
    fields: Option<Vec<usize>>,
    truncate: bool,
    warnings: Vec<String>,
    single_row_key: bool,
}

impl CompiledFilter {
    /// No filter: every event of the table, truncates included.
    pub fn accept_all() -> CompiledFilter {
        CompiledFilter {
            mode: eval::Mode::Everything,
            slots: Vec::new(),
            fields: None,
            truncate: true,
            warnings: Vec::new(),
            single_row_key: false,
        }
    }

    /// A subscription's filter: `None` (no filter) is [`CompiledFilter::accept_all`],
    /// which unlike `{}` also delivers truncates.
    pub fn new(
        filter: Option<&Filter>,
        table: &TableSchema,
    ) -> Result<CompiledFilter, FilterError> {
        match filter {
            Some(f) => f.compile(table),
            None => Ok(CompiledFilter::accept_all()),
        }
    }

    /// What the subscriber should know before the first event: limits that the table's
    /// REPLICA IDENTITY puts on this filter.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// True when the filter is `where` with an equality on every primary-key column, ANDed,
    /// and nothing else: it follows one row, and a subscription with it completes once
    /// that row is gone ([`CompiledFilter::pinned_row`]).
    pub fn single_row_key(&self) -> bool {
        self.single_row_key
    }

    /// The columns the filter reads, each once.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| &*s.name)
    }

    /// True in set-membership mode, where delivered row events carry a [`Transition`].
    pub fn transitions(&self) -> bool {
        matches!(self.mode, eval::Mode::Transitions(_))
    }
}
