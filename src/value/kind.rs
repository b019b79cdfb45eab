//! Type OID -> [`TypeKind`] mapping for the types built into PostgreSQL.
//!
//! The tables below were generated from the `pg_type` catalog of a freshly
//! initdb'd PostgreSQL 15 cluster. Only OIDs below 10000 are listed: those are
//! hand-assigned in `pg_type.dat` and stable across releases, while OIDs at or
//! above 10000 (e.g. array types of some catalog row types, information_schema
//! domains) are assigned during initdb and can differ between versions.
//!
//! ```sql
//! -- SCALARS: every built-in type that is not itself an array type
//! SELECT oid, typname FROM pg_type
//!  WHERE oid < 10000 AND oid NOT IN (SELECT typarray FROM pg_type WHERE typarray <> 0);
//! -- ARRAYS: the array delimiter is the *element* type's typdelim
//! SELECT a.oid, e.oid, e.typdelim, e.typname FROM pg_type a
//!   JOIN pg_type e ON e.typarray = a.oid WHERE a.oid < 10000 AND e.oid < 10000;
//! ```

/// How a column's text form maps to JSON.
///
/// Only types whose JSON form differs from "the text as a JSON string" get a
/// variant of their own; everything else (date, time, interval, uuid, ranges,
/// enums, composites, ...) is [`TypeKind::Text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// `bool`: `t`/`f` -> JSON `true`/`false`.
    Bool,
    /// `int2`, `int4`, `int8`, `oid`, `xid`, `cid` -> JSON integer.
    Int,
    /// `float4`, `float8` -> JSON number; non-finite values as strings.
    Float,
    /// `numeric` -> JSON string holding the exact text.
    Numeric,
    /// Anything else -> JSON string holding the exact text.
    Text,
    /// `json`, `jsonb` -> embedded verbatim as nested JSON.
    Json,
    /// `timestamptz` -> RFC 3339 string with 6 fraction digits.
    Timestamptz,
    /// `timestamp` -> ISO 8601 string with 6 fraction digits, no zone.
    Timestamp,
    /// `date` -> ISO 8601 `YYYY-MM-DD`, expanded years outside 1 to 9999 AD.
    Date,
    /// `bytea` -> standard base64 string.
    Bytea,
    /// Any array type; multi-dimensional arrays nest.
    Array {
        /// How each element maps.
        element: Box<TypeKind>,
        /// The element type's `typdelim` (`;` for `box`, `,` for all others).
        delimiter: u8,
    },
}

impl TypeKind {
    /// Built-in type OIDs (scalars and their arrays). `None` for OIDs that are
    /// not built in (user types such as enums, domains, composites and
    /// extension types); callers typically treat those as [`TypeKind::Text`].
    pub fn builtin(oid: u32) -> Option<TypeKind> {
        if let Some(kind) = scalar(oid) {
            return Some(kind);
        }
        let idx = ARRAYS.binary_search_by_key(&oid, |&(a, _, _)| a).ok()?;
        let (_, element, delimiter) = ARRAYS[idx];
        Some(TypeKind::Array {
            element: Box::new(scalar(element)?),
            delimiter,
        })
    }

    /// Array of `element` using the default `,` delimiter, e.g. for arrays
    /// of user-defined types.
    pub fn array_of(element: TypeKind) -> TypeKind {
        TypeKind::Array {
            element: Box::new(element),
            delimiter: b',',
        }
    }
}

fn scalar(oid: u32) -> Option<TypeKind> {
    let kind = match oid {
        16 => TypeKind::Bool,
        20 | 21 | 23 | 26 | 28 | 29 => TypeKind::Int,
        700 | 701 => TypeKind::Float,
        1700 => TypeKind::Numeric,
        114 | 3802 => TypeKind::Json,
        1184 => TypeKind::Timestamptz,
        1114 => TypeKind::Timestamp,
        1082 => TypeKind::Date,
        17 => TypeKind::Bytea,
        _ => {
            SCALARS.binary_search(&oid).ok()?;
            TypeKind::Text
        }
    };
    Some(kind)
}

/// Every built-in non-array type, sorted (binary searched).
pub(super) const SCALARS: &[u32] = &[
    16,   // bool
    17,   // bytea
    18,   // char
    19,   // name
    20,   // int8
    21,   // int2
    22,   // int2vector
    23,   // int4
    24,   // regproc
    25,   // text
    26,   // oid
    27,   // tid
    28,   // xid
    29,   // cid
    30,   // oidvector
    32,   // pg_ddl_command
    71,   // pg_type
    75,   // pg_attribute
    81,   // pg_proc
    83,   // pg_class
    114,  // json
    142,  // xml
    194,  // pg_node_tree
    269,  // table_am_handler
    325,  // index_am_handler
    600,  // point
    601,  // lseg
    602,  // path
    603,  // box
    604,  // polygon
    628,  // line
    650,  // cidr
    700,  // float4
    701,  // float8
    705,  // unknown
    718,  // circle
    774,  // macaddr8
    790,  // money
    829,  // macaddr
    869,  // inet
    1033, // aclitem
    1042, // bpchar
    1043, // varchar
    1082, // date
    1083, // time
    1114, // timestamp
    1184, // timestamptz
    1186, // interval
    1248, // pg_database
    1266, // timetz
    1560, // bit
    1562, // varbit
    1700, // numeric
    1790, // refcursor
    2202, // regprocedure
    2203, // regoper
    2204, // regoperator
    2205, // regclass
    2206, // regtype
    2249, // record
    2275, // cstring
    2276, // any
    2277, // anyarray
    2278, // void
    2279, // trigger
    2280, // language_handler
    2281, // internal
    2283, // anyelement
    2776, // anynonarray
    2842, // pg_authid
    2843, // pg_auth_members
    2950, // uuid
    2970, // txid_snapshot
    3115, // fdw_handler
    3220, // pg_lsn
    3310, // tsm_handler
    3361, // pg_ndistinct
    3402, // pg_dependencies
    3500, // anyenum
    3614, // tsvector
    3615, // tsquery
    3642, // gtsvector
    3734, // regconfig
    3769, // regdictionary
    3802, // jsonb
    3831, // anyrange
    3838, // event_trigger
    3904, // int4range
    3906, // numrange
    3908, // tsrange
    3910, // tstzrange
    3912, // daterange
    3926, // int8range
    4066, // pg_shseclabel
    4072, // jsonpath
    4089, // regnamespace
    4096, // regrole
    4191, // regcollation
    4451, // int4multirange
    4532, // nummultirange
    4533, // tsmultirange
    4534, // tstzmultirange
    4535, // datemultirange
    4536, // int8multirange
    4537, // anymultirange
    4538, // anycompatiblemultirange
    4600, // pg_brin_bloom_summary
    4601, // pg_brin_minmax_multi_summary
    5017, // pg_mcv_list
    5038, // pg_snapshot
    5069, // xid8
    5077, // anycompatible
    5078, // anycompatiblearray
    5079, // anycompatiblenonarray
    5080, // anycompatiblerange
    6101, // pg_subscription
];

/// `(array oid, element oid, delimiter)`, sorted by array oid (binary searched).
pub(super) const ARRAYS: &[(u32, u32, u8)] = &[
    (143, 142, b','),   // xml[]
    (199, 114, b','),   // json[]
    (210, 71, b','),    // pg_type[]
    (270, 75, b','),    // pg_attribute[]
    (271, 5069, b','),  // xid8[]
    (272, 81, b','),    // pg_proc[]
    (273, 83, b','),    // pg_class[]
    (629, 628, b','),   // line[]
    (651, 650, b','),   // cidr[]
    (719, 718, b','),   // circle[]
    (775, 774, b','),   // macaddr8[]
    (791, 790, b','),   // money[]
    (1000, 16, b','),   // bool[]
    (1001, 17, b','),   // bytea[]
    (1002, 18, b','),   // char[]
    (1003, 19, b','),   // name[]
    (1005, 21, b','),   // int2[]
    (1006, 22, b','),   // int2vector[]
    (1007, 23, b','),   // int4[]
    (1008, 24, b','),   // regproc[]
    (1009, 25, b','),   // text[]
    (1010, 27, b','),   // tid[]
    (1011, 28, b','),   // xid[]
    (1012, 29, b','),   // cid[]
    (1013, 30, b','),   // oidvector[]
    (1014, 1042, b','), // bpchar[]
    (1015, 1043, b','), // varchar[]
    (1016, 20, b','),   // int8[]
    (1017, 600, b','),  // point[]
    (1018, 601, b','),  // lseg[]
    (1019, 602, b','),  // path[]
    (1020, 603, b';'),  // box[]
    (1021, 700, b','),  // float4[]
    (1022, 701, b','),  // float8[]
    (1027, 604, b','),  // polygon[]
    (1028, 26, b','),   // oid[]
    (1034, 1033, b','), // aclitem[]
    (1040, 829, b','),  // macaddr[]
    (1041, 869, b','),  // inet[]
    (1115, 1114, b','), // timestamp[]
    (1182, 1082, b','), // date[]
    (1183, 1083, b','), // time[]
    (1185, 1184, b','), // timestamptz[]
    (1187, 1186, b','), // interval[]
    (1231, 1700, b','), // numeric[]
    (1263, 2275, b','), // cstring[]
    (1270, 1266, b','), // timetz[]
    (1561, 1560, b','), // bit[]
    (1563, 1562, b','), // varbit[]
    (2201, 1790, b','), // refcursor[]
    (2207, 2202, b','), // regprocedure[]
    (2208, 2203, b','), // regoper[]
    (2209, 2204, b','), // regoperator[]
    (2210, 2205, b','), // regclass[]
    (2211, 2206, b','), // regtype[]
    (2287, 2249, b','), // record[]
    (2949, 2970, b','), // txid_snapshot[]
    (2951, 2950, b','), // uuid[]
    (3221, 3220, b','), // pg_lsn[]
    (3643, 3614, b','), // tsvector[]
    (3644, 3642, b','), // gtsvector[]
    (3645, 3615, b','), // tsquery[]
    (3735, 3734, b','), // regconfig[]
    (3770, 3769, b','), // regdictionary[]
    (3807, 3802, b','), // jsonb[]
    (3905, 3904, b','), // int4range[]
    (3907, 3906, b','), // numrange[]
    (3909, 3908, b','), // tsrange[]
    (3911, 3910, b','), // tstzrange[]
    (3913, 3912, b','), // daterange[]
    (3927, 3926, b','), // int8range[]
    (4073, 4072, b','), // jsonpath[]
    (4090, 4089, b','), // regnamespace[]
    (4097, 4096, b','), // regrole[]
    (4192, 4191, b','), // regcollation[]
    (5039, 5038, b','), // pg_snapshot[]
    (6150, 4451, b','), // int4multirange[]
    (6151, 4532, b','), // nummultirange[]
    (6152, 4533, b','), // tsmultirange[]
    (6153, 4534, b','), // tstzmultirange[]
    (6155, 4535, b','), // datemultirange[]
    (6157, 4536, b','), // int8multirange[]
];
