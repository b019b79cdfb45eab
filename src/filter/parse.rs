//! The JSON form <-> [`Filter`]: shape checks with errors that name the path. Whether a
//! column exists or a literal fits its type is [`super::compile`]'s job.

use serde_json::{Map, Value as Json};

use super::{Condition, Filter, FilterError, Operators, Predicate, UpdateFilter};

const FILTER_KEYS: &str = "create, update, delete, where, transitions, fields, truncate";
const OPERATOR_KEYS: &str =
    "equals, not, in, notIn, lt, lte, gt, gte, contains, startsWith, endsWith, isNull";

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn malformed(path: &str, message: impl Into<String>) -> FilterError {
    FilterError::Malformed {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn object<'a>(v: &'a Json, path: &str, what: &str) -> Result<&'a Map<String, Json>, FilterError> {
    v.as_object()
        .ok_or_else(|| malformed(path, format!("expected {what}, got {}", kind_of(v))))
}

fn kind_of(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// `null` counts as absent for optional keys: clients often send it for "not set".
fn present(v: &Json) -> Option<&Json> {
    (!v.is_null()).then_some(v)
}

pub(super) fn filter(v: &Json) -> Result<Filter, FilterError> {
    let map = object(v, "", "a filter object")?;
    let mut f = Filter::default();
    for (key, value) in map {
        let Some(value) = present(value) else {
            continue;
        };
        let path = key.as_str();
        match path {
            "create" => f.create = Some(predicate(value, path)?),
            "update" => f.update = Some(update(value, path)?),
            "delete" => f.delete = Some(predicate(value, path)?),
            "where" => f.r#where = Some(predicate(value, path)?),
            "transitions" => f.transitions = boolean(value, path)?,
            "truncate" => f.truncate = boolean(value, path)?,
            "fields" => f.fields = Some(fields(value, path)?),
            _ => {
                return Err(malformed(
                    "",
                    format!("unknown key {key:?} (expected one of: {FILTER_KEYS})"),
                ))
            }
        }
    }
    Ok(f)
}

fn boolean(v: &Json, path: &str) -> Result<bool, FilterError> {
    v.as_bool()
        .ok_or_else(|| malformed(path, format!("expected true or false, got {}", kind_of(v))))
}

fn fields(v: &Json, path: &str) -> Result<Vec<String>, FilterError> {
    let items = v.as_array().ok_or_else(|| {
        malformed(
            path,
            format!("expected an array of column names, got {}", kind_of(v)),
        )
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str().map(str::to_owned).ok_or_else(|| {
                malformed(
                    &index(path, i),
                    format!("expected a column name, got {}", kind_of(item)),
                )
            })
        })
        .collect()
}

pub(super) fn update(v: &Json, path: &str) -> Result<UpdateFilter, FilterError> {
    let map = object(v, path, "an object with `after` and/or `before`")?;
    let mut u = UpdateFilter::default();
    for (key, value) in map {
        let Some(value) = present(value) else {
            continue;
        };
        match key.as_str() {
            "after" => u.after = Some(predicate(value, &join(path, key))?),
            "before" => u.before = Some(predicate(value, &join(path, key))?),
            _ => {
                return Err(malformed(
                    path,
                    format!("unknown key {key:?} (expected after, before)"),
                ))
            }
        }
    }
    Ok(u)
}

pub(super) fn predicate(v: &Json, path: &str) -> Result<Predicate, FilterError> {
    let map = object(v, path, "an object of column conditions and AND/OR/NOT")?;
    let mut p = Predicate::default();
    for (key, value) in map {
        let here = join(path, key);
        match key.as_str() {
            "AND" => p.and = Some(predicates(value, &here, true)?),
            "OR" => p.or = Some(predicates(value, &here, false)?),
            "NOT" => p.not = Some(predicates(value, &here, true)?),
            column => {
                p.columns
                    .insert(column.to_owned(), condition(value, &here)?);
            }
        }
    }
    Ok(p)
}

/// An array of predicates, or (for `AND` and `NOT`) a single one.
fn predicates(v: &Json, path: &str, single_ok: bool) -> Result<Vec<Predicate>, FilterError> {
    match v {
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| predicate(item, &index(path, i)))
            .collect(),
        Json::Object(_) if single_ok => Ok(vec![predicate(v, path)?]),
        _ => Err(malformed(
            path,
            format!(
                "expected an array of conditions{}, got {}",
                if single_ok {
                    " or one condition object"
                } else {
                    ""
                },
                kind_of(v)
            ),
        )),
    }
}

pub(super) fn condition(v: &Json, path: &str) -> Result<Condition, FilterError> {
    let Json::Object(map) = v else {
        return Ok(Condition::Equals(v.clone()));
    };
    let mut ops = Operators::default();
    for (key, value) in map {
        let here = join(path, key);
        match key.as_str() {
            "equals" => ops.equals = Some(value.clone()),
            "not" => ops.not = Some(condition(value, &here)?),
            "in" => ops.r#in = Some(list(value, &here)?),
            "notIn" => ops.not_in = Some(list(value, &here)?),
            "lt" => ops.lt = Some(value.clone()),
            "lte" => ops.lte = Some(value.clone()),
            "gt" => ops.gt = Some(value.clone()),
            "gte" => ops.gte = Some(value.clone()),
            "contains" => ops.contains = Some(value.clone()),
            "startsWith" => ops.starts_with = Some(string(value, &here)?),
            "endsWith" => ops.ends_with = Some(string(value, &here)?),
            "isNull" => ops.is_null = Some(boolean(value, &here)?),
            _ => {
                return Err(malformed(
                    path,
                    format!("unknown operator {key:?} (expected one of: {OPERATOR_KEYS})"),
                ))
            }
        }
    }
    Ok(Condition::Operators(Box::new(ops)))
}

fn list(v: &Json, path: &str) -> Result<Vec<Json>, FilterError> {
    v.as_array()
        .cloned()
        .ok_or_else(|| malformed(path, format!("expected an array, got {}", kind_of(v))))
}

fn string(v: &Json, path: &str) -> Result<String, FilterError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| malformed(path, format!("expected a string, got {}", kind_of(v))))
}

pub(super) fn filter_to_json(f: &Filter) -> Json {
    let mut map = Map::new();
    if let Some(p) = &f.create {
        map.insert("create".into(), predicate_to_json(p));
    }
    if let Some(u) = &f.update {
        map.insert("update".into(), update_to_json(u));
    }
    if let Some(p) = &f.delete {
        map.insert("delete".into(), predicate_to_json(p));
    }
    if let Some(p) = &f.r#where {
        map.insert("where".into(), predicate_to_json(p));
    }
    if f.transitions {
        map.insert("transitions".into(), Json::Bool(true));
    }
    if let Some(fields) = &f.fields {
        let names = fields.iter().map(|n| Json::String(n.clone())).collect();
        map.insert("fields".into(), Json::Array(names));
    }
    if f.truncate {
        map.insert("truncate".into(), Json::Bool(true));
    }
    Json::Object(map)
}

pub(super) fn update_to_json(u: &UpdateFilter) -> Json {
    let mut map = Map::new();
    if let Some(p) = &u.after {
        map.insert("after".into(), predicate_to_json(p));
    }
    if let Some(p) = &u.before {
        map.insert("before".into(), predicate_to_json(p));
    }
    Json::Object(map)
}

pub(super) fn predicate_to_json(p: &Predicate) -> Json {
    let mut map = Map::new();
    for (column, c) in &p.columns {
        map.insert(column.clone(), condition_to_json(c));
    }
    let all = |ps: &[Predicate]| Json::Array(ps.iter().map(predicate_to_json).collect());
    if let Some(ps) = &p.and {
        map.insert("AND".into(), all(ps));
    }
    if let Some(ps) = &p.or {
        map.insert("OR".into(), all(ps));
    }
    if let Some(ps) = &p.not {
        map.insert("NOT".into(), all(ps));
    }
    Json::Object(map)
}

pub(super) fn condition_to_json(c: &Condition) -> Json {
    match c {
        // An object literal would read back as operators.
        Condition::Equals(v @ Json::Object(_)) => {
            let mut map = Map::new();
            map.insert("equals".into(), v.clone());
            Json::Object(map)
        }
        Condition::Equals(v) => v.clone(),
        Condition::Operators(ops) => operators_to_json(ops),
    }
}

pub(super) fn operators_to_json(ops: &Operators) -> Json {
    let mut map = Map::new();
    let mut put = |key: &str, v: Option<Json>| {
        if let Some(v) = v {
            map.insert(key.into(), v);
        }
    };
    put("equals", ops.equals.clone());
    put("not", ops.not.as_ref().map(condition_to_json));
    put("in", ops.r#in.clone().map(Json::Array));
    put("notIn", ops.not_in.clone().map(Json::Array));
    put("lt", ops.lt.clone());
    put("lte", ops.lte.clone());
    put("gt", ops.gt.clone());
    put("gte", ops.gte.clone());
    put("contains", ops.contains.clone());
    put("startsWith", ops.starts_with.clone().map(Json::String));
    put("endsWith", ops.ends_with.clone().map(Json::String));
    put("isNull", ops.is_null.map(Json::Bool));
    Json::Object(map)
}
