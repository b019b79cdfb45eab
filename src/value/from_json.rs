//! Values rebuilt from their JSON form (the event format), for code that reads stored
//! events back and must compare them by type, such as a stream's filter over the log.
//!
//! The result compares as the value decoded from Postgres' text did: numbers, booleans
//! and bytes are rebuilt exactly; text-like values keep their text; timestamps keep the
//! ISO 8601 / RFC 3339 text of the event (the filter reads both spellings, and
//! serializing writes that text unchanged), so `serialize(from_json(k, serialize(v)))`
//! equals `serialize(v)`. JSON `null` is SQL NULL, also for `json` columns, whose
//! `null` document the event format cannot tell apart from NULL.

use base64::Engine;
use bytes::Bytes;
use serde_json::Value as Json;

use super::{Text, TypeKind, Value, ValueError};

impl Value {
    /// The value a column of `kind` had, from its JSON form in an event.
    pub fn from_json(kind: &TypeKind, json: &Json) -> Result<Value, ValueError> {
        if json.is_null() {
            return Ok(Value::Null);
        }
        let unexpected = |expected: &'static str| ValueError::UnexpectedJson {
            expected,
            got: super::snippet(json.to_string().as_bytes()),
        };
        let text = |s: &str| Text::new(Bytes::copy_from_slice(s.as_bytes()));
        match kind {
            TypeKind::Bool => json
                .as_bool()
                .map(Value::Bool)
                .ok_or_else(|| unexpected("a boolean")),
            TypeKind::Int => json
                .as_i64()
                .map(Value::Int)
                .ok_or_else(|| unexpected("an integer")),
            TypeKind::Float => match json {
                Json::Number(n) => n
                    .as_f64()
                    .map(Value::Float)
                    .ok_or_else(|| unexpected("a number")),
                Json::String(s) => match s.as_str() {
                    "NaN" => Ok(Value::Float(f64::NAN)),
                    "Infinity" => Ok(Value::Float(f64::INFINITY)),
                    "-Infinity" => Ok(Value::Float(f64::NEG_INFINITY)),
                    _ => Err(unexpected(
                        "a number, \"NaN\", \"Infinity\" or \"-Infinity\"",
                    )),
                },
                _ => Err(unexpected("a number")),
            },
            // Events carry numeric as an exact string; a number is taken as written.
            TypeKind::Numeric => match json {
                Json::String(s) => text(s).map(Value::Numeric),
                Json::Number(n) => text(&n.to_string()).map(Value::Numeric),
                _ => Err(unexpected("a decimal string")),
            },
            TypeKind::Text => json
                .as_str()
                .ok_or_else(|| unexpected("a string"))
                .and_then(text)
                .map(Value::Text),
            TypeKind::Json => text(&json.to_string()).map(Value::Json),
            TypeKind::Timestamptz | TypeKind::Timestamp => {
                let s = json
                    .as_str()
                    .ok_or_else(|| unexpected("a timestamp string"))?;
                let t = text(s)?;
                Ok(if *kind == TypeKind::Timestamptz {
                    Value::Timestamptz(t)
                } else {
                    Value::Timestamp(t)
                })
            }
            TypeKind::Date => json
                .as_str()
                .ok_or_else(|| unexpected("a date string"))
                .and_then(text)
                .map(Value::Date),
            TypeKind::Bytea => json
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .map(|b| Value::Bytea(Bytes::from(b)))
                .ok_or_else(|| unexpected("a base64 string")),
            TypeKind::Array { element, .. } => {
                if let Json::Object(bounded) = json {
                    return bounded_array(kind, bounded).ok_or_else(|| {
                        unexpected("an array, or {\"lowerBounds\": [...], \"values\": [...]}")
                    })?;
                }
                let items = json.as_array().ok_or_else(|| unexpected("an array"))?;
                array_items(kind, element, items).map(Value::Array)
            }
        }
    }
}

fn array_items(
    kind: &TypeKind,
    element: &TypeKind,
    items: &[Json],
) -> Result<Vec<Value>, ValueError> {
    items
        .iter()
        .map(|item| match item {
            // A nested array is a further dimension, unless the elements are json, which
            // may be arrays themselves.
            Json::Array(_) if *element != TypeKind::Json => Value::from_json(kind, item),
            _ => Value::from_json(element, item),
        })
        .collect()
}

/// `{"lowerBounds": [...], "values": [...]}` -> [`Value::BoundedArray`]; `None` when the
/// object is not of that shape.
fn bounded_array(
    kind: &TypeKind,
    object: &serde_json::Map<String, Json>,
) -> Option<Result<Value, ValueError>> {
    let TypeKind::Array { element, .. } = kind else {
        return None;
    };
    if object.len() != 2 {
        return None;
    }
    let lower_bounds = object
        .get(super::LOWER_BOUNDS_KEY)?
        .as_array()?
        .iter()
        .map(|b| b.as_i64().and_then(|b| i32::try_from(b).ok()))
        .collect::<Option<Vec<i32>>>()?;
    let items = object.get(super::VALUES_KEY)?.as_array()?;
    Some(
        array_items(kind, element, items).map(|values| Value::BoundedArray {
            lower_bounds,
            values,
        }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn round_trip(kind: &TypeKind, pg_text: &str) {
        let decoded = super::super::decode_text(kind, Bytes::copy_from_slice(pg_text.as_bytes()))
            .unwrap_or_else(|e| panic!("{kind:?} {pg_text:?}: {e}"));
        let json = serde_json::to_value(&decoded).unwrap();
        let rebuilt = Value::from_json(kind, &json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(
            serde_json::to_value(&rebuilt).unwrap(),
            json,
            "{kind:?} {pg_text:?}"
        );
        // Timestamps keep the event's spelling, json its re-serialized text, and NaN is
        // unequal to itself: for those the JSON comparison above is the check.
        let respelled = |k: &TypeKind| {
            matches!(
                k,
                TypeKind::Timestamptz | TypeKind::Timestamp | TypeKind::Date | TypeKind::Json
            )
        };
        let exact = match kind {
            TypeKind::Array { element, .. } => !respelled(element),
            k => !respelled(k),
        };
        if exact && !matches!(decoded, Value::Float(f) if f.is_nan()) {
            assert_eq!(rebuilt, decoded, "{kind:?} {pg_text:?}");
        }
    }

    #[test]
    fn json_form_rebuilds_the_value() {
        let int_array = TypeKind::array_of(TypeKind::Int);
        let json_array = TypeKind::array_of(TypeKind::Json);
        for (kind, text) in [
            (TypeKind::Bool, "t"),
            (TypeKind::Int, "-9223372036854775808"),
            (TypeKind::Float, "1.5"),
            (TypeKind::Float, "NaN"),
            (TypeKind::Float, "-Infinity"),
            (TypeKind::Numeric, "123456789012345678901234567890.10"),
            (TypeKind::Text, "caf\u{e9} \"quoted\""),
            (TypeKind::Json, r#"{"a": [1, {"b": null}]}"#),
            (TypeKind::Timestamptz, "2026-11-27 10:00:00.123456+00"),
            (TypeKind::Timestamp, "2026-11-27 10:00:00.5"),
            (TypeKind::Bytea, "\\x00ff10"),
            (int_array.clone(), "{{1,NULL},{3,4}}"),
            (json_array, r#"{"[1,2]","{\"k\": 3}",NULL}"#),
            (TypeKind::array_of(int_array.clone()), "{}"),
            // Edge values: expanded years, infinities, lower bounds.
            (TypeKind::Date, "0097-02-16 BC"),
            (TypeKind::Date, "5874897-12-31"),
            (TypeKind::Date, "-infinity"),
            (TypeKind::Timestamptz, "294276-12-31 23:59:59.999999+00"),
            (TypeKind::Timestamp, "0001-01-01 00:00:00 BC"),
            (TypeKind::Timestamp, "infinity"),
            (int_array.clone(), "[0:1]={1,2}"),
            (int_array, "[-3:-2][1:1]={{1},{NULL}}"),
            (
                TypeKind::array_of(TypeKind::Date),
                "[5:5]={\"0097-02-16 BC\"}",
            ),
        ] {
            round_trip(&kind, text);
        }
    }

    #[test]
    fn null_and_mismatches() {
        assert_eq!(
            Value::from_json(&TypeKind::Int, &Json::Null),
            Ok(Value::Null)
        );
        assert!(matches!(
            Value::from_json(&TypeKind::Int, &serde_json::json!("7")),
            Err(ValueError::UnexpectedJson {
                expected: "an integer",
                ..
            })
        ));
        assert!(Value::from_json(&TypeKind::Bytea, &serde_json::json!("not base64!")).is_err());
        assert!(
            Value::from_json(&TypeKind::array_of(TypeKind::Bool), &serde_json::json!([1])).is_err()
        );
    }
}
