//! Inputs are real PostgreSQL 15 output-function text, captured with
//! `SET datestyle=ISO; SET timezone=UTC; SET extra_float_digits=3;
//! SET intervalstyle=postgres` (the walsender session settings).
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use proptest::prelude::*;

use super::kind::TypeKind as K;
use super::*;

fn arr(element: K) -> K {
    K::Array {
        element: Box::new(element),
        delimiter: b',',
    }
}

fn decode(kind: &K, text: &str) -> Result<Value, ValueError> {
    decode_text(kind, Bytes::copy_from_slice(text.as_bytes()))
}

fn to_json(kind: &K, text: &str) -> String {
    let value = decode(kind, text).unwrap_or_else(|e| panic!("{kind:?} {text:?}: {e}"));
    serde_json::to_string(&value).unwrap()
}

/// `(type oid, text output, expected JSON)`; the OID goes through
/// `TypeKind::builtin`, so the table also checks the OID mapping.
fn check(cases: &[(u32, &str, &str)]) {
    for &(oid, text, want) in cases {
        let kind = TypeKind::builtin(oid).unwrap_or_else(|| panic!("oid {oid} not built in"));
        assert_eq!(to_json(&kind, text), want, "oid {oid}, text {text:?}");
    }
}

#[test]
fn builtin_oids() {
    let scalars = [
        (16, K::Bool),
        (20, K::Int),
        (21, K::Int),
        (23, K::Int),
        (26, K::Int),
        (28, K::Int),
        (29, K::Int),
        (700, K::Float),
        (701, K::Float),
        (1700, K::Numeric),
        (114, K::Json),
        (3802, K::Json),
        (1184, K::Timestamptz),
        (1114, K::Timestamp),
        (17, K::Bytea),
    ];
    for (oid, kind) in scalars {
        assert_eq!(TypeKind::builtin(oid), Some(kind), "oid {oid}");
    }
    assert_eq!(TypeKind::builtin(1082), Some(K::Date));
    // time, timetz, interval, text, varchar, bpchar, name, char, uuid,
    // inet, cidr, macaddr, money, xml, bit, varbit, int4range, tsvector,
    // xid8, pg_lsn, point, box, int2vector, unknown
    for oid in [
        1083, 1266, 1186, 25, 1043, 1042, 19, 18, 2950, 869, 650, 829, 790, 142, 1560, 1562, 3904,
        3614, 5069, 3220, 600, 603, 22, 705,
    ] {
        assert_eq!(TypeKind::builtin(oid), Some(K::Text), "oid {oid}");
    }
    let arrays = [
        (1000, K::Bool),
        (1001, K::Bytea),
        (1005, K::Int),
        (1007, K::Int),
        (1016, K::Int),
        (1028, K::Int),
        (1009, K::Text),
        (1015, K::Text),
        (1014, K::Text),
        (1021, K::Float),
        (1022, K::Float),
        (1231, K::Numeric),
        (1115, K::Timestamp),
        (1185, K::Timestamptz),
        (1182, K::Date),
        (1183, K::Text),
        (1270, K::Text),
        (1187, K::Text),
        (199, K::Json),
        (3807, K::Json),
        (2951, K::Text),
        (1041, K::Text),
        (651, K::Text),
        (1040, K::Text),
        (143, K::Text),
        (1017, K::Text),
        (3905, K::Text),
        (3911, K::Text),
        (6150, K::Text),
        (271, K::Text),
    ];
    for (oid, element) in arrays {
        assert_eq!(TypeKind::builtin(oid), Some(arr(element)), "oid {oid}");
    }
    assert_eq!(
        TypeKind::builtin(1020),
        Some(K::Array {
            element: Box::new(K::Text),
            delimiter: b';'
        })
    );
    // 0, first user OID, and an initdb-assigned (unstable) array OID.
    for oid in [0, 16384, 10052, u32::MAX] {
        assert_eq!(TypeKind::builtin(oid), None, "oid {oid}");
    }
}

#[test]
fn builtin_tables_are_sorted() {
    assert!(kind::SCALARS.windows(2).all(|w| w[0] < w[1]));
    assert!(kind::ARRAYS.windows(2).all(|w| w[0].0 < w[1].0));
    for &(array, element, _) in kind::ARRAYS {
        assert!(kind::SCALARS.binary_search(&element).is_ok(), "{array}");
    }
}

#[test]
fn scalars() {
    check(&[
        (16, "t", "true"),
        (16, "f", "false"),
        (21, "32767", "32767"),
        (23, "-2147483648", "-2147483648"),
        (20, "-9223372036854775808", "-9223372036854775808"),
        (20, "9223372036854775807", "9223372036854775807"),
        (26, "4294967295", "4294967295"),
        (28, "123", "123"),
        (29, "5", "5"),
        (700, "1.1", "1.1"),
        (700, "3.4028235e+38", "3.4028235e+38"),
        (700, "1e-45", "1e-45"),
        (701, "0.1", "0.1"),
        (701, "1e+300", "1e+300"),
        (701, "1e-07", "1e-7"),
        (701, "-0", "-0.0"),
        (701, "123456789012", "123456789012.0"),
        (701, "1.2345678901234567e+19", "1.2345678901234567e+19"),
        (701, "NaN", r#""NaN""#),
        (701, "Infinity", r#""Infinity""#),
        (700, "-Infinity", r#""-Infinity""#),
        (1700, "1.50", r#""1.50""#),
        (1700, "NaN", r#""NaN""#),
        (1700, "Infinity", r#""Infinity""#),
        (1700, "-Infinity", r#""-Infinity""#),
        (1700, "-0.000001", r#""-0.000001""#),
        (
            1700,
            "10000000000000000000000000000000000000000",
            r#""10000000000000000000000000000000000000000""#,
        ),
        (1082, "2026-11-27", r#""2026-11-27""#),
        // Outside 1 to 9999 AD: ISO 8601 expanded years (sign, six digits or more).
        (1082, "0044-03-15 BC", r#""-000043-03-15""#),
        (1082, "0001-12-31 BC", r#""+000000-12-31""#),
        (1082, "0002-01-01 BC", r#""-000001-01-01""#),
        (1082, "4714-11-24 BC", r#""-004713-11-24""#),
        (1082, "0001-01-01", r#""0001-01-01""#),
        (1082, "9999-12-31", r#""9999-12-31""#),
        (1082, "10000-01-01", r#""+010000-01-01""#),
        (1082, "5874897-12-31", r#""+5874897-12-31""#),
        (1082, "infinity", r#""infinity""#),
        (1082, "-infinity", r#""-infinity""#),
        (1083, "10:00:00.5", r#""10:00:00.5""#),
        (1266, "10:00:00+05:30", r#""10:00:00+05:30""#),
        (
            1186,
            "1 year 2 mons -3 days +04:05:06.5",
            r#""1 year 2 mons -3 days +04:05:06.5""#,
        ),
        (
            2950,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
        ),
        (869, "192.168.0.1/24", r#""192.168.0.1/24""#),
        (790, "$12.34", r#""$12.34""#),
        (1042, "ab  ", r#""ab  ""#),
        (3904, "[1,5)", r#""[1,5)""#),
        (5069, "1", r#""1""#),
        (3614, "'a':1 'b':2", r#""'a':1 'b':2""#),
        (142, r#"<a x="1">t</a>"#, r#""<a x=\"1\">t</a>""#),
    ]);
}

#[test]
fn json_is_embedded_verbatim() {
    check(&[
        (
            114,
            r#"{"a": [1, 2.5e10, null], "b": "\u00e9 x"}"#,
            r#"{"a": [1, 2.5e10, null], "b": "\u00e9 x"}"#,
        ),
        (
            3802,
            r#"{"a": [1, 25000000000, null], "b": "é"}"#,
            r#"{"a": [1, 25000000000, null], "b": "é"}"#,
        ),
        (3802, r#""str""#, r#""str""#),
        (3802, "null", "null"),
        (114, "  [1 , 2 ] ", "  [1 , 2 ] "),
        (114, r#"{"a":1,"a":2}"#, r#"{"a":1,"a":2}"#),
        (114, "[1e99999]", "[1e99999]"),
        (114, r#""\ud800""#, r#""\ud800""#),
        (114, "1E+2", "1E+2"),
        (114, "-0.0e-0", "-0.0e-0"),
    ]);
}

/// serde_json stops at 128 levels; Postgres (and this module) do not.
#[test]
fn json_deeper_than_serde_json_limit() {
    // SELECT (repeat('[', 2000) || repeat(']', 2000))::jsonb
    let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    assert_eq!(to_json(&K::Json, &deep), deep);
    let deep_obj = format!("{}1{}", r#"{"k":["#.repeat(300), "]}".repeat(300));
    assert_eq!(to_json(&K::Json, &deep_obj), deep_obj);
    let unbalanced = format!("{}{}", "[".repeat(2000), "]".repeat(1999));
    assert!(matches!(
        decode(&K::Json, &unbalanced),
        Err(ValueError::InvalidJson(_))
    ));
}

#[test]
fn raw_json_token_is_honoured() {
    // Guards json::RAW_VALUE_TOKEN against a serde_json upgrade.
    let v = Value::Array(vec![Value::Json(Text::from_static(" {\"a\" : 1} "))]);
    assert_eq!(serde_json::to_string(&v).unwrap(), r#"[ {"a" : 1} ]"#);
    let tree = serde_json::to_value(&v).unwrap();
    assert_eq!(tree, serde_json::json!([{"a": 1}]));
}

/// Accept/reject verdicts observed from `SELECT '<text>'::json`.
#[test]
fn json_syntax_matches_postgres() {
    let accepted = [
        "1E+2",
        "-0.0e-0",
        r#""\/""#,
        "true ",
        r#""é😀""#,
        r#""\uD83D\uDE00""#,
        "0",
        "[]",
        "{}",
        "[[],{}]",
        r#"{"a":{"b":[true,false,null]}}"#,
        " \t\r\n1",
    ];
    let rejected = [
        "01",
        "1.",
        ".5",
        "+1",
        "-",
        "1e",
        "[1,]",
        r#"{"a":1,}"#,
        r#""\x""#,
        r#""\u00""#,
        " nul",
        "\"a\tb\"",
        "[]]",
        r#"{"a" 1}"#,
        "1 2",
        "",
        "[-]",
        "{,}",
        "TRUE",
        "[1",
        r#"{"a"}"#,
        r#"{1:2}"#,
        "\"",
        "\"\\",
        "[1,,2]",
        "\u{a0}1",
    ];
    for text in accepted {
        assert!(
            json::is_valid(text.as_bytes()),
            "{text:?} should be accepted"
        );
    }
    for text in rejected {
        assert!(
            !json::is_valid(text.as_bytes()),
            "{text:?} should be rejected"
        );
    }
}

#[test]
fn timestamptz() {
    check(&[
        (
            1184,
            "2026-11-27 10:00:00.123+00",
            r#""2026-11-27T10:00:00.123000Z""#,
        ),
        (
            1184,
            "2026-11-27 10:00:00+00",
            r#""2026-11-27T10:00:00.000000Z""#,
        ),
        (
            1184,
            "2026-11-27 10:00:00.999999+00",
            r#""2026-11-27T10:00:00.999999Z""#,
        ),
        (1184, "infinity", r#""infinity""#),
        (1184, "-infinity", r#""-infinity""#),
        (
            1184,
            "0044-03-15 12:00:00+00 BC",
            r#""-000043-03-15T12:00:00.000000Z""#,
        ),
        (
            1184,
            "0001-12-31 23:59:59.5+00 BC",
            r#""+000000-12-31T23:59:59.500000Z""#,
        ),
        (
            1184,
            "4713-11-24 00:00:00+00 BC",
            r#""-004712-11-24T00:00:00.000000Z""#,
        ),
        (
            1184,
            "0001-01-01 00:00:00+00",
            r#""0001-01-01T00:00:00.000000Z""#,
        ),
        (
            1184,
            "12345-01-01 00:00:00.000001+00",
            r#""+012345-01-01T00:00:00.000001Z""#,
        ),
        (
            1184,
            "294276-12-31 23:59:59.999999+00",
            r#""+294276-12-31T23:59:59.999999Z""#,
        ),
        // Not under TimeZone=UTC, but captured with other zones set.
        (
            1184,
            "2026-11-27 15:30:00.123+05:30",
            r#""2026-11-27T15:30:00.123000+05:30""#,
        ),
        (
            1184,
            "2026-11-27 02:00:00-08",
            r#""2026-11-27T02:00:00.000000-08:00""#,
        ),
        (
            1184,
            "1850-01-01 00:09:21+00:09:21",
            r#""1850-01-01 00:09:21+00:09:21""#,
        ),
        (
            1184,
            "1849-12-31 19:03:58.25-04:56:02",
            r#""1849-12-31 19:03:58.25-04:56:02""#,
        ),
        (
            1184,
            "0044-03-15 12:09:21+00:09:21 BC",
            r#""0044-03-15 12:09:21+00:09:21 BC""#,
        ),
    ]);
}

#[test]
fn timestamp() {
    check(&[
        (
            1114,
            "2026-11-27 10:00:00.5",
            r#""2026-11-27T10:00:00.500000""#,
        ),
        (
            1114,
            "2026-11-27 10:00:00",
            r#""2026-11-27T10:00:00.000000""#,
        ),
        (1114, "infinity", r#""infinity""#),
        (1114, "-infinity", r#""-infinity""#),
        (
            1114,
            "0044-03-15 12:00:00 BC",
            r#""-000043-03-15T12:00:00.000000""#,
        ),
        (
            1114,
            "12345-01-01 00:00:00.123456",
            r#""+012345-01-01T00:00:00.123456""#,
        ),
    ]);
}

#[test]
fn bad_timestamps() {
    let tz = [
        "2026-11-27 10:00:00",     // zone missing
        "2026-11-27T10:00:00+00",  // not DateStyle=ISO output
        "2026-11-27 10:00:00.+00", // empty fraction
        "2026-11-27 10:00:00.1234567+00",
        "2026-11-27 10:00:00+0",
        "2026-11-27 10:00:00+00:0",
        "26-11-27 10:00:00+00",
        "0000-01-01 00:00:00+00 BC", // no year 0 BC to map
        "Infinity",
        "",
    ];
    for text in tz {
        assert!(
            matches!(
                decode(&K::Timestamptz, text),
                Err(ValueError::InvalidTimestamp(_))
            ),
            "{text:?}"
        );
    }
    for text in [
        "2026-11-27 10:00:00+00",
        "2026-11-27",
        "2026-11-27 10:00:00 AD",
    ] {
        assert!(
            matches!(
                decode(&K::Timestamp, text),
                Err(ValueError::InvalidTimestamp(_))
            ),
            "{text:?}"
        );
    }
}

#[test]
fn bytea() {
    check(&[
        (17, r"\x0102ff", r#""AQL/""#),
        (17, r"\x", r#""""#),
        (17, r"\x616263", r#""YWJj""#),
        (17, r"\x00", r#""AA==""#),
        (17, r"\xDEADbeef", r#""3q2+7w==""#),
        // bytea_output=escape
        (17, r"\001\002\377\\", r#""AQL/XA==""#),
        (17, "abc", r#""YWJj""#),
        (17, "\\000\\351\\303\\251\"\\177 ", r#""AOnDqSJ/IA==""#),
        (17, "", r#""""#),
    ]);
    let Ok(Value::Bytea(b)) = decode(&K::Bytea, r"\x0102ff") else {
        panic!()
    };
    assert_eq!(&b[..], [1, 2, 255]);
}

#[test]
fn arrays() {
    check(&[
        (1007, "{1,2,NULL}", "[1,2,null]"),
        (1016, "{{1,2},{3,4}}", "[[1,2],[3,4]]"),
        (1007, "{{{1}},{{2}}}", "[[[1]],[[2]]]"),
        (1007, "{}", "[]"),
        // Lower bounds other than 1 are kept: an object instead of a bare array.
        (1005, "[0:1]={1,2}", r#"{"lowerBounds":[0],"values":[1,2]}"#),
        (
            1007,
            "[1:1][-1:0]={{5,6}}",
            r#"{"lowerBounds":[1,-1],"values":[[5,6]]}"#,
        ),
        (
            1009,
            r#"[-2147483648:-2147483647]={"a b",NULL}"#,
            r#"{"lowerBounds":[-2147483648],"values":["a b",null]}"#,
        ),
        (1007, "[1:2]={1,2}", "[1,2]"),
        (
            1009,
            r#"{a,"NULL",NULL,""," sp ","q\"uote","back\\slash","com,ma","{br}",ü😀中,"tab	nl
","null"}"#,
            r#"["a","NULL",null,""," sp ","q\"uote","back\\slash","com,ma","{br}","ü😀中","tab\tnl\n","null"]"#,
        ),
        (
            1009,
            r#"{{a,NULL},{"b c","\\"}}"#,
            r#"[["a",null],["b c","\\"]]"#,
        ),
        (
            1009,
            "{\u{1}\u{1f},\"a\\\\\",é}",
            r#"["\u0001\u001f","a\\","é"]"#,
        ),
        (1000, "{t,f,NULL}", "[true,false,null]"),
        (1001, r#"{"\\x01ff","\\x",NULL}"#, r#"["Af8=","",null]"#),
        (
            1021,
            "{1.5,NaN,-Infinity,1e-07}",
            r#"[1.5,"NaN","-Infinity",1e-7]"#,
        ),
        (1022, "{0.1,Infinity,NULL}", r#"[0.1,"Infinity",null]"#),
        (1231, "{1.50,NaN,NULL}", r#"["1.50","NaN",null]"#),
        (
            1115,
            r#"{"2026-11-27 10:00:00.5",infinity,"0044-03-15 12:00:00 BC"}"#,
            r#"["2026-11-27T10:00:00.500000","infinity","-000043-03-15T12:00:00.000000"]"#,
        ),
        (
            1185,
            r#"{"2026-11-27 10:00:00.123+00",-infinity,"12345-01-01 00:00:00+00"}"#,
            r#"["2026-11-27T10:00:00.123000Z","-infinity","+012345-01-01T00:00:00.000000Z"]"#,
        ),
        (
            1182,
            r#"{2026-11-27,infinity,"0044-03-15 BC"}"#,
            r#"["2026-11-27","infinity","-000043-03-15"]"#,
        ),
        (
            1183,
            "{10:00:00.5,24:00:00}",
            r#"["10:00:00.5","24:00:00"]"#,
        ),
        (1270, "{10:00:00+05:30}", r#"["10:00:00+05:30"]"#),
        (
            1187,
            r#"{"1 year 2 mons 3 days 04:05:06.5",-00:00:01}"#,
            r#"["1 year 2 mons 3 days 04:05:06.5","-00:00:01"]"#,
        ),
        (
            199,
            r#"{"{\"a\": [1, \"x,y\"]}","null",3}"#,
            r#"[{"a": [1, "x,y"]},null,3]"#,
        ),
        (
            3807,
            r#"{"{\"a\": \"q\\\\\", \"b\": 2}",[]}"#,
            r#"[{"a": "q\\", "b": 2},[]]"#,
        ),
        (
            2951,
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            r#"["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]"#,
        ),
        (1041, "{192.168.0.1/24,::1}", r#"["192.168.0.1/24","::1"]"#),
        (651, "{10.0.0.0/8}", r#"["10.0.0.0/8"]"#),
        (1028, "{4294967295,0}", "[4294967295,0]"),
        (1040, "{08:00:2b:01:02:03}", r#"["08:00:2b:01:02:03"]"#),
        (143, r#"{"<a x=\"1\">t</a>"}"#, r#"["<a x=\"1\">t</a>"]"#),
        (1017, r#"{"(1,2)","(-1.5,0)"}"#, r#"["(1,2)","(-1.5,0)"]"#),
        (
            1020,
            "{(1,1),(0,0);(3,3),(2,2)}",
            r#"["(1,1),(0,0)","(3,3),(2,2)"]"#,
        ),
        (
            3905,
            r#"{"[1,5)",empty,"(,4)"}"#,
            r#"["[1,5)","empty","(,4)"]"#,
        ),
        (
            3911,
            r#"{"[\"2026-01-01 00:00:00+00\",\"2026-02-01 00:00:00+00\")"}"#,
            r#"["[\"2026-01-01 00:00:00+00\",\"2026-02-01 00:00:00+00\")"]"#,
        ),
        (1015, "{ab,NULL}", r#"["ab",null]"#),
        (1014, r#"{"ab  "}"#, r#"["ab  "]"#),
        (1002, r#"{x,"\""}"#, r#"["x","\""]"#),
        (1003, "{nm}", r#"["nm"]"#),
        (1006, r#"{"1 2"}"#, r#"["1 2"]"#),
        (791, "{$12.34}", r#"["$12.34"]"#),
        (1561, "{101}", r#"["101"]"#),
        (3221, "{0/16B3748}", r#"["0/16B3748"]"#),
        (3643, r#"{"'a':1 'b':2"}"#, r#"["'a':1 'b':2"]"#),
        (271, "{1}", r#"["1"]"#),
    ]);
}

/// Every ASCII character (and some awkward strings) through `array_out`,
/// checked against Postgres' own `to_json` of the same array:
/// `SELECT a::text, to_json(a) FROM (SELECT array_agg(chr(i) || 'x' || chr(i))
/// || ARRAY[' lead', 'trail ', 'NuLl', '', NULL, E'\\"', '{,}', '😀"中',
/// E'\u00a0nbsp'] AS a FROM generate_series(1, 127) i) s`
#[test]
fn text_array_matches_postgres_to_json() {
    let array_out = "{\u{1}x\u{1},\u{2}x\u{2},\u{3}x\u{3},\u{4}x\u{4},\u{5}x\u{5},\u{6}x\u{6},\u{7}x\u{7},\u{8}x\u{8},\"\u{9}x\u{9}\",\"\u{a}x\u{a}\",\"\u{b}x\u{b}\",\"\u{c}x\u{c}\",\"\u{d}x\u{d}\",\u{e}x\u{e},\u{f}x\u{f},\u{10}x\u{10},\u{11}x\u{11},\u{12}x\u{12},\u{13}x\u{13},\u{14}x\u{14},\u{15}x\u{15},\u{16}x\u{16},\u{17}x\u{17},\u{18}x\u{18},\u{19}x\u{19},\u{1a}x\u{1a},\u{1b}x\u{1b},\u{1c}x\u{1c},\u{1d}x\u{1d},\u{1e}x\u{1e},\u{1f}x\u{1f},\" x \",!x!,\"\\\"x\\\"\",#x#,$x$,%x%,&x&,'x',(x(,)x),*x*,+x+,\",x,\",-x-,.x.,/x/,0x0,1x1,2x2,3x3,4x4,5x5,6x6,7x7,8x8,9x9,:x:,;x;,<x<,=x=,>x>,?x?,@x@,AxA,BxB,CxC,DxD,ExE,FxF,GxG,HxH,IxI,JxJ,KxK,LxL,MxM,NxN,OxO,PxP,QxQ,RxR,SxS,TxT,UxU,VxV,WxW,XxX,YxY,ZxZ,[x[,\"\\\\x\\\\\",]x],^x^,_x_,`x`,axa,bxb,cxc,dxd,exe,fxf,gxg,hxh,ixi,jxj,kxk,lxl,mxm,nxn,oxo,pxp,qxq,rxr,sxs,txt,uxu,vxv,wxw,xxx,yxy,zxz,\"{x{\",|x|,\"}x}\",~x~,\u{7f}x\u{7f},\" lead\",\"trail \",\"NuLl\",\"\",NULL,\"\\\\\\\"\",\"{,}\",\"😀\\\"中\",\u{a0}nbsp}";
    let pg_to_json = "[\"\\u0001x\\u0001\",\"\\u0002x\\u0002\",\"\\u0003x\\u0003\",\"\\u0004x\\u0004\",\"\\u0005x\\u0005\",\"\\u0006x\\u0006\",\"\\u0007x\\u0007\",\"\\bx\\b\",\"\\tx\\t\",\"\\nx\\n\",\"\\u000bx\\u000b\",\"\\fx\\f\",\"\\rx\\r\",\"\\u000ex\\u000e\",\"\\u000fx\\u000f\",\"\\u0010x\\u0010\",\"\\u0011x\\u0011\",\"\\u0012x\\u0012\",\"\\u0013x\\u0013\",\"\\u0014x\\u0014\",\"\\u0015x\\u0015\",\"\\u0016x\\u0016\",\"\\u0017x\\u0017\",\"\\u0018x\\u0018\",\"\\u0019x\\u0019\",\"\\u001ax\\u001a\",\"\\u001bx\\u001b\",\"\\u001cx\\u001c\",\"\\u001dx\\u001d\",\"\\u001ex\\u001e\",\"\\u001fx\\u001f\",\" x \",\"!x!\",\"\\\"x\\\"\",\"#x#\",\"$x$\",\"%x%\",\"&x&\",\"'x'\",\"(x(\",\")x)\",\"*x*\",\"+x+\",\",x,\",\"-x-\",\".x.\",\"/x/\",\"0x0\",\"1x1\",\"2x2\",\"3x3\",\"4x4\",\"5x5\",\"6x6\",\"7x7\",\"8x8\",\"9x9\",\":x:\",\";x;\",\"<x<\",\"=x=\",\">x>\",\"?x?\",\"@x@\",\"AxA\",\"BxB\",\"CxC\",\"DxD\",\"ExE\",\"FxF\",\"GxG\",\"HxH\",\"IxI\",\"JxJ\",\"KxK\",\"LxL\",\"MxM\",\"NxN\",\"OxO\",\"PxP\",\"QxQ\",\"RxR\",\"SxS\",\"TxT\",\"UxU\",\"VxV\",\"WxW\",\"XxX\",\"YxY\",\"ZxZ\",\"[x[\",\"\\\\x\\\\\",\"]x]\",\"^x^\",\"_x_\",\"`x`\",\"axa\",\"bxb\",\"cxc\",\"dxd\",\"exe\",\"fxf\",\"gxg\",\"hxh\",\"ixi\",\"jxj\",\"kxk\",\"lxl\",\"mxm\",\"nxn\",\"oxo\",\"pxp\",\"qxq\",\"rxr\",\"sxs\",\"txt\",\"uxu\",\"vxv\",\"wxw\",\"xxx\",\"yxy\",\"zxz\",\"{x{\",\"|x|\",\"}x}\",\"~x~\",\"\u{7f}x\u{7f}\",\" lead\",\"trail \",\"NuLl\",\"\",null,\"\\\\\\\"\",\"{,}\",\"😀\\\"中\",\"\u{a0}nbsp\"]";
    let ours: serde_json::Value = serde_json::from_str(&to_json(&arr(K::Text), array_out)).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(pg_to_json).unwrap();
    assert_eq!(ours, theirs);
}

/// Forms `array_in` accepts though `array_out` never prints them.
#[test]
fn arrays_lenient_input() {
    let text = arr(K::Text);
    let int = arr(K::Int);
    assert_eq!(to_json(&int, " { 1 , 2 } "), "[1,2]");
    assert_eq!(to_json(&int, "{ {1} , {2} }"), "[[1],[2]]");
    assert_eq!(to_json(&text, "{a b , null, Null}"), r#"["a b",null,null]"#);
    assert_eq!(
        to_json(&text, r#"{"a"b, a\,b, a\ }"#),
        r#"["ab","a,b","a "]"#
    );
    assert_eq!(to_json(&text, "{ \"\" }"), r#"[""]"#);
    assert_eq!(to_json(&int, "[1:2] = {1,2}"), "[1,2]");
}

#[test]
fn array_zero_copy() {
    let raw = Bytes::from_static(br#"{abc,"d e","f\"g"}"#);
    let Ok(Value::Array(items)) = decode_text(&arr(K::Text), raw.clone()) else {
        panic!()
    };
    let ptr = |v: &Value| match v {
        Value::Text(t) => t.as_bytes().as_ptr(),
        _ => panic!(),
    };
    assert_eq!(ptr(&items[0]), raw[1..].as_ptr());
    assert_eq!(ptr(&items[1]), raw[6..].as_ptr());
    assert_eq!(items[2], Value::Text(Text::from_static("f\"g")));
}

#[test]
fn unicode_and_escaping_in_text() {
    let cases = [
        // E'ctl\x01\x1fq"b\\'::text
        ("ctl\u{1}\u{1f}q\"b\\", r#""ctl\u0001\u001fq\"b\\""#),
        ("😀 中文 é", r#""😀 中文 é""#),
        ("tab\tnl\ncr\r", r#""tab\tnl\ncr\r""#),
        ("\u{7f}\u{2028}", "\"\u{7f}\u{2028}\""),
        ("", r#""""#),
    ];
    for (text, want) in cases {
        assert_eq!(to_json(&K::Text, text), want);
        let back: String = serde_json::from_str(want).unwrap();
        assert_eq!(back, text);
    }
}

#[test]
fn errors() {
    let int_arr = arr(K::Int);
    let cases: Vec<(K, &[u8], ValueError)> = vec![
        (K::Int, b"12a", ValueError::InvalidInt("12a".into())),
        (K::Int, b"", ValueError::InvalidInt("".into())),
        (
            K::Int,
            b"9223372036854775808",
            ValueError::InvalidInt("9223372036854775808".into()),
        ),
        (K::Int, b" 1", ValueError::InvalidInt(" 1".into())),
        (K::Int, b"1.0", ValueError::InvalidInt("1.0".into())),
        (K::Bool, b"yes", ValueError::InvalidBool("yes".into())),
        (K::Bool, b"T", ValueError::InvalidBool("T".into())),
        (K::Float, b"1.2.3", ValueError::InvalidFloat("1.2.3".into())),
        (
            K::Json,
            b"{\"a\":}",
            ValueError::InvalidJson("{\"a\":}".into()),
        ),
        (K::Json, b"", ValueError::InvalidJson("".into())),
        (
            K::Bytea,
            br"\x012",
            ValueError::InvalidBytea(r"\x012".into()),
        ),
        (K::Bytea, br"\xzz", ValueError::InvalidBytea(r"\xzz".into())),
        (K::Bytea, br"a\9", ValueError::InvalidBytea(r"a\9".into())),
        (K::Bytea, br"a\", ValueError::InvalidBytea(r"a\".into())),
        (K::Bytea, br"\400", ValueError::InvalidBytea(r"\400".into())),
        (K::Text, b"a\xffb", ValueError::InvalidUtf8),
        (K::Numeric, b"\xc3", ValueError::InvalidUtf8),
        (K::Json, b"\"\xc3\"", ValueError::InvalidUtf8),
        (
            int_arr.clone(),
            b"{1,x}",
            ValueError::InvalidInt("x".into()),
        ),
        (arr(K::Text), b"{a,\xff}", ValueError::InvalidUtf8),
    ];
    for (kind, raw, want) in cases {
        let got = decode_text(&kind, Bytes::copy_from_slice(raw));
        assert_eq!(got, Err(want), "{kind:?} {raw:?}");
    }
}

#[test]
fn array_errors() {
    let cases = [
        ("{1,2", "unterminated array"),
        ("{1,2,", "unterminated array"),
        (r#"{"a}"#, "unterminated quoted element"),
        (r#"{"a\"}"#, "unterminated quoted element"),
        ("{a\\", "backslash at end of input"),
        ("", "expected '{'"),
        ("1,2", "expected '{'"),
        ("{1,2}}", "junk after closing '}'"),
        ("{1,2} x", "junk after closing '}'"),
        ("{1,,2}", "empty unquoted element"),
        ("{1,}", "empty unquoted element"),
        ("{a{b}", "unexpected '{' inside element"),
        ("{1,{2}}", "unexpected '{' inside element"),
        ("{{1},2}", "expected '{'"),
        ("{{1}x}", "mixed sub-arrays and elements"),
        ("[1:2={1,2}", "malformed dimension bounds"),
        ("[1:2]{1,2}", "malformed dimension bounds"),
        ("[a:b]={1,2}", "malformed dimension bounds"),
        ("[1:2", "malformed dimension bounds"),
    ];
    for (text, reason) in cases {
        match decode(&arr(K::Text), text) {
            Err(ValueError::InvalidArray { text: t, reason: r }) => {
                assert_eq!((t.as_str(), r), (text, reason), "{text:?}");
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    let deep = format!("{}1{}", "{".repeat(100), "}".repeat(100));
    assert!(matches!(
        decode(&arr(K::Int), &deep),
        Err(ValueError::InvalidArray {
            reason: "too many dimensions",
            ..
        })
    ));
}

#[test]
fn error_messages_quote_and_truncate() {
    let long = "x".repeat(500);
    let err = decode(&K::Int, &long).unwrap_err().to_string();
    assert_eq!(err, format!("invalid integer \"{}...\"", "x".repeat(100)));
    let err = decode(&arr(K::Int), "{1,2").unwrap_err().to_string();
    assert_eq!(err, r#"invalid array "{1,2": unterminated array"#);
    let emoji = "😀".repeat(150);
    let err = decode(&K::Bool, &emoji).unwrap_err().to_string();
    assert_eq!(err, format!("invalid bool \"{}...\"", "😀".repeat(100)));
    assert_eq!(snippet(b"ab\xffc"), "ab\u{fffd}c");
}

#[test]
fn text_api() {
    let t = Text::new(Bytes::from_static("héllo".as_bytes())).unwrap();
    assert_eq!(t.as_str(), "héllo");
    assert_eq!(t.to_string(), "héllo");
    assert_eq!(t, Text::from_static("héllo"));
    assert_eq!(serde_json::to_string(&t).unwrap(), r#""héllo""#);
    assert_eq!(t.into_bytes(), Bytes::from_static("héllo".as_bytes()));
    assert_eq!(
        Text::new(Bytes::from_static(b"\xe2\x82")),
        Err(ValueError::InvalidUtf8)
    );
}

#[test]
fn hand_built_values_serialize() {
    let v = Value::Array(vec![
        Value::Null,
        Value::Float(f64::NEG_INFINITY),
        Value::Timestamptz(Text::from_static("not a timestamp")),
        Value::Bytea(Bytes::from_static(b"\xff\xfe")),
    ]);
    assert_eq!(
        serde_json::to_string(&v).unwrap(),
        r#"[null,"-Infinity","not a timestamp","//4="]"#
    );
}

// ---------------------------------------------------------------- proptests

fn every_kind() -> Vec<K> {
    let scalars = [
        K::Bool,
        K::Int,
        K::Float,
        K::Numeric,
        K::Text,
        K::Json,
        K::Timestamptz,
        K::Timestamp,
        K::Bytea,
    ];
    let mut kinds: Vec<K> = scalars.to_vec();
    kinds.extend(scalars.iter().cloned().map(arr));
    kinds.push(K::Array {
        element: Box::new(K::Text),
        delimiter: b';',
    });
    kinds.push(arr(arr(K::Int)));
    kinds
}

/// What `array_out` does to one element.
fn quote_like_postgres(s: &str, delimiter: char) -> String {
    let needs_quotes = s.is_empty()
        || s.eq_ignore_ascii_case("NULL")
        || s.chars().any(|c| {
            matches!(
                c,
                '"' | '\\' | '{' | '}' | ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'
            ) || c == delimiter
        });
    if !needs_quotes {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn array_literal(items: &[Option<String>], delimiter: char) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|item| match item {
            None => "NULL".to_owned(),
            Some(s) => quote_like_postgres(s, delimiter),
        })
        .collect();
    format!("{{{}}}", parts.join(&delimiter.to_string()))
}

fn expected(items: &[Option<String>]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|item| match item {
                None => Value::Null,
                Some(s) => Value::Text(Text::new(Bytes::from(s.clone())).unwrap()),
            })
            .collect(),
    )
}

/// Strings heavy in the characters the array syntax cares about.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a{}\",;\\\\ \tNULnul😀é\u{0}-\u{1f}]{0,12}",
        Just("NULL".to_owned()),
        Just("null".to_owned()),
        Just(String::new()),
    ]
}

/// JSON-ish and array-ish fragments, to get past the first byte of parsers.
fn structured_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            any::<u8>(),
            prop::sample::select(b"{}[]\":,;\\ -+.eE0123456789tfnulxNULLa=BC".to_vec()),
        ],
        0..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_never_panics(raw in prop_oneof![any::<Vec<u8>>(), structured_bytes()]) {
        for kind in every_kind() {
            if let Ok(value) = decode_text(&kind, Bytes::from(raw.clone())) {
                let json = serde_json::to_string(&value).unwrap();
                let mut direct = Vec::new();
                value.write_json(&mut direct);
                prop_assert_eq!(String::from_utf8(direct).unwrap(), json.clone());
                // Deep JSON is legal for us but not for serde_json's reader.
                if !matches!(kind, K::Json) || raw.len() < 100 {
                    serde_json::from_str::<serde_json::Value>(&json).unwrap();
                }
            }
        }
    }

    #[test]
    fn direct_writer_escapes_like_serde(s in prop_oneof![any::<String>(), tricky_string()]) {
        let mut direct = Vec::new();
        crate::value::write_str(&mut direct, &s);
        prop_assert_eq!(String::from_utf8(direct).unwrap(), serde_json::to_string(&s).unwrap());
        let value = Value::Float(f64::from_bits((s.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let mut direct = Vec::new();
        value.write_json(&mut direct);
        prop_assert_eq!(String::from_utf8(direct).unwrap(), serde_json::to_string(&value).unwrap());
    }

    #[test]
    fn text_arrays_round_trip(items in prop::collection::vec(prop::option::of(tricky_string()), 0..8)) {
        for delimiter in [',', ';'] {
            let literal = array_literal(&items, delimiter);
            let kind = K::Array { element: Box::new(K::Text), delimiter: delimiter as u8 };
            let got = decode(&kind, &literal);
            if items.is_empty() {
                prop_assert_eq!(got, Ok(Value::Array(vec![])));
            } else {
                prop_assert_eq!(got, Ok(expected(&items)), "{}", literal);
            }
        }
    }

    #[test]
    fn two_dimensional_arrays_round_trip(
        rows in prop::collection::vec(prop::collection::vec(prop::option::of(tricky_string()), 3), 1..4),
    ) {
        let literal = format!(
            "{{{}}}",
            rows.iter().map(|r| array_literal(r, ',')).collect::<Vec<_>>().join(",")
        );
        let want = Value::Array(rows.iter().map(|r| expected(r)).collect());
        prop_assert_eq!(decode(&arr(K::Text), &literal), Ok(want));
    }

    #[test]
    fn json_checker_agrees_with_serde_json(raw in structured_bytes()) {
        // Our checker relies on UTF-8 having been validated already.
        let raw = String::from_utf8_lossy(&raw).into_owned().into_bytes();
        let ours = json::is_valid(&raw);
        let theirs = serde_json::from_slice::<serde::de::IgnoredAny>(&raw).is_ok();
        prop_assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&raw));
    }

    #[test]
    fn json_documents_are_accepted(doc in any::<Vec<(String, Option<f64>, bool)>>()) {
        let tree: serde_json::Value = doc
            .iter()
            .map(|(k, n, b)| serde_json::json!({ k: [n, b, {"nested": [k]}] }))
            .collect();
        for text in [serde_json::to_string(&tree).unwrap(), serde_json::to_string_pretty(&tree).unwrap()] {
            prop_assert!(json::is_valid(text.as_bytes()), "{}", text);
        }
    }

    #[test]
    fn ints_round_trip(i in any::<i64>()) {
        prop_assert_eq!(decode(&K::Int, &i.to_string()), Ok(Value::Int(i)));
    }

    #[test]
    fn floats_round_trip(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
        let json = to_json(&K::Float, &format!("{f:e}"));
        prop_assert_eq!(json.parse::<f64>().unwrap(), f);
    }

    #[test]
    fn bytea_round_trips(data in any::<Vec<u8>>()) {
        use base64::Engine as _;
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        let want = format!("\"{}\"", STANDARD.encode(&data));
        prop_assert_eq!(to_json(&K::Bytea, &format!("\\x{hex}")), want.clone());
        // byteaout's escape format: printable ASCII except backslash as is.
        let escaped: String = data
            .iter()
            .map(|&b| match b {
                b'\\' => "\\\\".to_owned(),
                0x20..=0x7e => (b as char).to_string(),
                _ => format!("\\{b:03o}"),
            })
            .collect();
        prop_assert_eq!(to_json(&K::Bytea, &escaped), want);
    }

    #[test]
    fn timestamps_render(
        year in 1u32..300_000,
        (month, day, hour, minute, second) in (1u32..13, 1u32..29, 0u32..24, 0u32..60, 0u32..60),
        micros in 0u32..1_000_000,
        bc in any::<bool>(),
    ) {
        let mut frac = format!(".{micros:06}");
        while frac.ends_with('0') {
            frac.pop();
        }
        if frac == "." {
            frac.clear();
        }
        let bc_suffix = if bc { " BC" } else { "" };
        let text = format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}{frac}+00{bc_suffix}");
        let iso_year = match (bc, year) {
            (false, y) if y <= 9999 => format!("{y:04}"),
            (false, y) => format!("+{y:06}"),
            (true, 1) => "+000000".to_owned(),
            (true, y) => format!("-{:06}", y - 1),
        };
        let want = format!("\"{iso_year}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{micros:06}Z\"");
        prop_assert_eq!(to_json(&K::Timestamptz, &text), want);
    }
}
