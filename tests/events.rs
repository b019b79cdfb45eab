//! Events from a real server: every type, identities, TOAST, transactions, schema changes.

use serde_json::json;

use crate::support::listen::{self, take, take_json};
use crate::support::TestDb;

#[tokio::test]
async fn every_type_in_the_list_is_typed() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
         CREATE DOMAIN tags AS text[];
         CREATE TABLE types (
            id int8 PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
            f_nan float8, f_inf float8, n numeric, n_nan numeric, t text, vc varchar(10),
            ch char(3), u uuid, j json, jb jsonb, tstz timestamptz, ts timestamp, d date,
            tm time, ttz timetz, iv interval, by bytea, inet inet, m mood, dom posint,
            arr int4[], arr2 text[], nested int4[], tsarr timestamptz[], moods mood[],
            domarr tags, money money, nul text
         );
         ALTER TABLE types REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut l = listen::start(listen::config(&db, &["types"])).await;
    c.batch_execute(
        r#"INSERT INTO types VALUES (
            9007199254740993, true, -32768, 2147483647, -9223372036854775808, 1.5, 0.1,
            'NaN', '-Infinity', 123456789012345678901234567890.123456789, 'NaN',
            'héllo "wörld" \ 🎉 新', 'abc', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{"a": [1, 2.5, null]}', '{"b": {"c": true}}', '2026-11-27 10:00:00.123+02',
            '2026-11-27 10:00:00', '2026-11-27', '10:00:01.5', '10:00:00+02', '1 day 02:00:00',
            '\x00ff10', '192.168.0.1/24', 'happy', 42,
            '{1,NULL,3}', '{"a b","c\"d",NULL,"NULL"}', '{{1,2},{3,4}}',
            '{"2026-01-01 00:00:00+00"}', '{sad,happy}', '{x,y}', '12.34', NULL
        )"#,
    )
    .await
    .unwrap();
    let ev = take_json(&mut l).await;
    let row = &ev["created"];
    let expected = json!({
        "id": 9007199254740993i64, "b": true, "i2": -32768, "i4": 2147483647,
        "i8": -9223372036854775808i64, "f4": 1.5, "f8": 0.1, "f_nan": "NaN", "f_inf": "-Infinity",
        "n": "123456789012345678901234567890.123456789", "n_nan": "NaN",
        "t": "héllo \"wörld\" \\ 🎉 新", "vc": "abc", "ch": "ab ",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"a": [1, 2.5, null]}, "jb": {"b": {"c": true}},
        "tstz": "2026-11-27T08:00:00.123000Z", "ts": "2026-11-27T10:00:00.000000",
        "d": "2026-11-27", "tm": "10:00:01.5", "ttz": "10:00:00+02", "iv": "1 day 02:00:00",
        "by": "AP8Q", "inet": "192.168.0.1/24", "m": "happy", "dom": 42,
        "arr": [1, null, 3], "arr2": ["a b", "c\"d", null, "NULL"], "nested": [[1, 2], [3, 4]],
        "tsarr": ["2026-01-01T00:00:00.000000Z"], "moods": ["sad", "happy"],
        "domarr": ["x", "y"], "money": "$12.34", "nul": null
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&row[k], v, "column {k}: {}", row);
    }
    assert_eq!(
        row.as_object().unwrap().len(),
        expected.as_object().unwrap().len()
    );
    assert_eq!(ev["identity"], "full");
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn default_and_full_identity_for_update_and_delete() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE d (id int PRIMARY KEY, name text, plan text);
         CREATE TABLE f (id int PRIMARY KEY, name text, plan text);
         ALTER TABLE f REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut l = listen::start(listen::config(&db, &["d", "f"])).await;
    for t in ["d", "f"] {
        c.batch_execute(&format!(
            "INSERT INTO {t} VALUES (1, 'a', 'free');
             UPDATE {t} SET plan = 'pro' WHERE id = 1;
             UPDATE {t} SET id = 2 WHERE id = 1;
             DELETE FROM {t} WHERE id = 2;"
        ))
        .await
        .unwrap();
    }
    let evs = listen::json_all(&take(&mut l, 8).await);
    // DEFAULT: no before image unless the key changed, and then only the key.
    assert_eq!(evs[0]["action"], "create");
    assert_eq!(evs[1]["identity"], "default");
    assert_eq!(evs[1]["before"], serde_json::Value::Null);
    assert_eq!(
        evs[1]["after"],
        json!({"id": 1, "name": "a", "plan": "pro"})
    );
    assert!(evs[1].get("changed").is_none());
    assert_eq!(evs[2]["before"], json!({"id": 1}));
    assert_eq!(
        evs[2]["after"],
        json!({"id": 2, "name": "a", "plan": "pro"})
    );
    assert_eq!(evs[3]["deleted"], json!({"id": 2}));
    // FULL: whole rows and `changed`.
    assert_eq!(evs[5]["identity"], "full");
    assert_eq!(
        evs[5]["before"],
        json!({"id": 1, "name": "a", "plan": "free"})
    );
    assert_eq!(evs[5]["changed"], json!(["plan"]));
    assert_eq!(
        evs[6]["before"],
        json!({"id": 1, "name": "a", "plan": "pro"})
    );
    assert_eq!(evs[6]["changed"], json!(["id"]));
    assert_eq!(
        evs[7]["deleted"],
        json!({"id": 2, "name": "a", "plan": "pro"})
    );
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn toasted_values_unchanged_and_changed() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE td (id int PRIMARY KEY, big text, n int);
         CREATE TABLE tf (id int PRIMARY KEY, big text, n int);
         ALTER TABLE tf REPLICA IDENTITY FULL;
         ALTER TABLE td ALTER COLUMN big SET STORAGE EXTERNAL;
         ALTER TABLE tf ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await
    .unwrap();
    let mut l = listen::start(listen::config(&db, &["td", "tf"])).await;
    let big: String = (0..2000)
        .map(|i| format!("{:x}", i * 7919 % 65521))
        .collect();
    for t in ["td", "tf"] {
        c.execute(&format!("INSERT INTO {t} VALUES (1, $1, 0)"), &[&big])
            .await
            .unwrap();
        c.batch_execute(&format!("UPDATE {t} SET n = 1 WHERE id = 1"))
            .await
            .unwrap();
        c.batch_execute(&format!("UPDATE {t} SET big = 'small' WHERE id = 1"))
            .await
            .unwrap();
    }
    let evs = listen::json_all(&take(&mut l, 6).await);
    assert_eq!(evs[0]["created"]["big"], json!(big));
    // DEFAULT: the unchanged TOASTed value was not sent and is not guessed.
    assert_eq!(evs[1]["after"], json!({"id": 1, "n": 1}));
    assert_eq!(evs[1]["unchanged"], json!(["big"]));
    assert_eq!(evs[2]["after"]["big"], "small");
    assert!(evs[2].get("unchanged").is_none());
    // FULL: filled from the before image.
    assert_eq!(evs[4]["after"], json!({"id": 1, "big": big, "n": 1}));
    assert!(evs[4].get("unchanged").is_none());
    assert_eq!(evs[4]["changed"], json!(["n"]));
    assert_eq!(evs[5]["changed"], json!(["big"]));
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn transactions_index_total_last_annotations_and_rollback() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE o (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut l = listen::start(listen::config(&db, &["o"])).await;
    c.batch_execute(
        "BEGIN; INSERT INTO o VALUES (1, 'x'); ROLLBACK;
         BEGIN;
         SELECT pg_logical_emit_message(true, 'waltap', '{\"user\": \"ann\", \"request\": 7}');
         INSERT INTO o VALUES (2, 'a'), (3, 'b'); UPDATE o SET v = 'c' WHERE id = 2;
         COMMIT;
         INSERT INTO o VALUES (4, 'd');",
    )
    .await
    .unwrap();
    let evs = take(&mut l, 4).await;
    let js = listen::json_all(&evs);
    // The rolled-back insert of id 1 never appears: the first event is id 2.
    assert_eq!(js[0]["created"]["id"], 2);
    for (i, e) in js[..3].iter().enumerate() {
        assert_eq!(e["tx"]["index"], i);
        assert_eq!(e["tx"]["total"], 3);
        assert_eq!(e["tx"]["last"], i == 2);
        assert_eq!(e["tx"]["annotations"], json!({"user": "ann", "request": 7}));
        assert_eq!(e["tx"]["id"], js[0]["tx"]["id"]);
    }
    assert_eq!(js[3]["tx"]["total"], 1);
    assert_eq!(js[3]["tx"]["last"], true);
    assert!(js[3]["tx"].get("annotations").is_none());
    for w in evs.windows(2) {
        assert!(w[0].position < w[1].position);
        assert!(w[0].position.to_string() < w[1].position.to_string());
        assert_ne!(w[0].id, w[1].id);
    }
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn large_transaction_streams_with_bounded_buffer() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE big (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut cfg = listen::config(&db, &["big"]);
    cfg.max_buffered_events = 100;
    cfg.channel_capacity = 64;
    let mut l = listen::start(cfg).await;
    c.batch_execute("INSERT INTO big SELECT g FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    let evs = take(&mut l, 20000).await;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.tx.index as usize, i);
        assert_eq!(e.tx.total, None, "too large to count up front");
        assert_eq!(e.tx.last, i == 19999);
    }
    l.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn truncate_and_schema_changes_mid_stream() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE s (id int PRIMARY KEY, a text, b int)")
        .await
        .unwrap();
    let mut l = listen::start(listen::config(&db, &["s"])).await;
    c.batch_execute(
        "INSERT INTO s VALUES (1, 'x', 1);
         ALTER TABLE s ADD COLUMN c jsonb DEFAULT '{\"k\": 1}';
         INSERT INTO s VALUES (2, 'y', 2);
         ALTER TABLE s DROP COLUMN a;
         INSERT INTO s VALUES (3, 3);
         ALTER TABLE s ALTER COLUMN b TYPE text;
         INSERT INTO s VALUES (4, 'four');
         BEGIN; INSERT INTO s VALUES (5, '5'); ALTER TABLE s ADD COLUMN d bool; INSERT INTO s VALUES (6, '6', NULL, true); COMMIT;
         TRUNCATE s;",
    )
    .await
    .unwrap();
    let js = listen::json_all(&take(&mut l, 7).await);
    assert_eq!(js[0]["created"], json!({"id": 1, "a": "x", "b": 1}));
    assert_eq!(
        js[1]["created"],
        json!({"id": 2, "a": "y", "b": 2, "c": {"k": 1}})
    );
    assert_eq!(js[2]["created"], json!({"id": 3, "b": 3, "c": {"k": 1}}));
    assert_eq!(
        js[3]["created"],
        json!({"id": 4, "b": "four", "c": {"k": 1}})
    );
    assert_eq!(js[4]["created"], json!({"id": 5, "b": "5", "c": {"k": 1}}));
    assert_eq!(
        js[5]["created"],
        json!({"id": 6, "b": "6", "c": null, "d": true})
    );
    assert_eq!(js[6]["action"], "truncate");
    assert_eq!(js[6]["table"], "s");
    assert!(js[6].get("created").is_none());
    l.shutdown().await;
    db.teardown().await;
}
