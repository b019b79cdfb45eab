//! The event log on NATS JetStream (`waltap run --nats-url`), against a real `nats-server`
//! (one, or a three-node cluster on loopback) started by the test, and real `waltap run`
//! processes killed with SIGKILL.
//!
//! What must hold: the stream holds every committed change exactly once, in commit order,
//! under the documented subjects and headers, with the bytes `waltap tail` prints; the
//! slot is never confirmed past what JetStream acknowledged, whether waltap or a NATS
//! server dies.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::StreamMessage;
use serde_json::Value as Json;
use waltap::dev::nats::NatsServer;
use waltap::Position;

use crate::crash::{self, LoggedRow, Names, Record, Run, Shape, Writer};
use crate::support::{self, listen, TestDb};

pub(crate) const CATCH_UP: Duration = Duration::from_secs(120);

/// A fresh directory for a server's storage.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "waltap-nats-{}-{name}-{}",
        std::process::id(),
        ulid::Ulid::new()
    ));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Whether nats-server is here; a test without it is skipped, except under CI.
fn have_nats_server() -> bool {
    if waltap::dev::nats::binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "nats-server is missing (.ci/run installs Debian's nats-server)"
    );
    eprintln!("skipped: nats-server is not installed");
    false
}

pub(crate) async fn nats() -> Option<(NatsServer, PathBuf)> {
    if !have_nats_server() {
        return None;
    }
    let dir = scratch("single");
    let server = NatsServer::start(&dir).await.expect("nats-server starts");
    Some((server, dir))
}

pub(crate) async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    async_nats::jetstream::new(client)
}

/// Asks again until JetStream answers: a cluster that just lost or regained a node says
/// "temporarily unavailable" while it elects the stream's leader.
async fn answered<T, E: std::fmt::Display, Fut: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: asking again after: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Every message of the stream, in sequence order; empty while the stream does not exist.
async fn messages(url: &str, stream: &str) -> Vec<StreamMessage> {
    let js = jetstream(url).await;
    let Ok(stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let state = answered("stream info", || stream.get_info()).await.state;
    let mut out = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        out.push(answered(&format!("message {seq}"), || stream.get_raw_message(seq)).await);
    }
    out
}

/// The last message's event, if any (a cheap way to see how far the log got).
async fn last_event(url: &str, stream: &str) -> Option<Json> {
    let js = jetstream(url).await;
    let mut stream = js.get_stream(stream).await.ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    if last == 0 {
        return None;
    }
    let m = stream.get_raw_message(last).await.ok()?;
    serde_json::from_slice(&m.payload).ok()
}

/// The stream's last sequence (0 while it does not exist).
async fn stream_end(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut st) => st.info().await.map_or(0, |i| i.state.last_sequence),
        Err(_) => 0,
    }
}

fn header<K: async_nats::header::IntoHeaderName + Clone + std::fmt::Debug>(
    m: &StreamMessage,
    name: K,
) -> String {
    m.headers
        .get(name.clone())
        .unwrap_or_else(|| panic!("message {} has no {name:?} header", m.sequence))
        .as_str()
        .to_owned()
}

/// Decodes a subject token as the README documents the escaping (`%` + two hex digits).
fn unescape(token: &str) -> String {
    let bytes = token.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&token[i + 1..i + 3], 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8 name")
}

/// The stream as log rows for the exactly-once checks, after checking each message's
/// subject and headers against its body.
fn rows(messages: &[StreamMessage], prefix: &str, source: &str) -> Vec<LoggedRow> {
    messages
        .iter()
        .map(|m| {
            let ev: Json = serde_json::from_slice(&m.payload).expect("the body is JSON");
            let rest = m
                .subject
                .as_str()
                .strip_prefix(&format!("{prefix}."))
                .unwrap_or_else(|| panic!("subject {} outside {prefix}", m.subject));
            let tokens: Vec<&str> = rest.split('.').collect();
            assert_eq!(tokens.len(), 3, "subject {}", m.subject);
            assert_eq!(Some(tokens[2]), ev["action"].as_str(), "{}", m.subject);
            assert_eq!(
                header(m, async_nats::header::NATS_MESSAGE_ID),
                ev["id"].as_str().unwrap()
            );
            assert_eq!(header(m, "Waltap-Source"), source);
            let position: Position = header(m, "Waltap-Position").parse().unwrap();
            assert_eq!(ev["position"].as_str(), Some(position.to_string().as_str()));
            LoggedRow {
                lsn: position.commit_lsn.0 as i64,
                ordinal: position.ordinal as i32,
                schema: unescape(tokens[0]),
                table: unescape(tokens[1]),
                tx_last: ev["tx"]["last"].as_bool().unwrap(),
                event: ev,
            }
        })
        .collect()
}

/// Waits until the stream ends with the writer's last committed transaction, complete.
async fn wait_until_appended(url: &str, stream: &str, record: &Record, run: Option<&Run>) {
    let last = record.committed.last().expect("something committed").xid;
    support::wait_for(
        "the writer's last transaction at the end of the JetStream stream",
        CATCH_UP,
        || async move {
            if let Some(run) = run {
                run.assert_alive("while catching up");
            }
            last_event(url, stream).await.is_some_and(|ev| {
                ev["tx"]["id"].as_u64() == Some(u64::from(last)) && ev["tx"]["last"] == true
            })
        },
    )
    .await;
}

pub(crate) fn nats_args<'a>(url: &'a str, stream: &'a str) -> Vec<&'a str> {
    vec!["--nats-url", url, "--nats-stream", stream]
}

#[tokio::test]
async fn events_reach_jetstream_with_escaped_subjects_headers_and_the_tail_bytes() {
    let Some((server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE SCHEMA \"my.app\";
             CREATE TABLE \"my.app\".\"Örder Items\" (id int PRIMARY KEY, note text);",
        )
        .await
        .unwrap();
    let table = "\"my.app\".Örder Items";
    let slot = db.unique_name("js_slot");
    let publication = db.unique_name("js_pub");
    let url = server.url();
    let stream = "T1";
    let run = Run::spawn_command(support::waltap(
        &db.url(),
        &[
            "run",
            "--table",
            table,
            "--slot",
            &slot,
            "--publication",
            &publication,
            "--nats-url",
            &url,
            "--nats-stream",
            stream,
            "--nats-subject-prefix",
            "cdc.test",
        ],
    ));
    // The slot exists once run has started; changes from then on are in the stream.
    support::wait_for("waltap run's slot", CATCH_UP, || {
        let (db, slot, run) = (&db, slot.clone(), &run);
        async move {
            run.assert_alive("while starting");
            listen::confirmed_flush(db, &slot).await.is_some()
        }
    })
    .await;
    // A second slot on the same publication shows what `tail` prints for the same changes.
    let mut tail = listen::config(&db, &[table]);
    tail.publication = publication.clone();
    listen::prepare_slot(&db, &tail).await;
    let mut listener = listen::start(tail).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO \"my.app\".\"Örder Items\" SELECT g, 'n' || g FROM generate_series(1, 50) g;
             UPDATE \"my.app\".\"Örder Items\" SET note = 'changed' WHERE id <= 10;
             DELETE FROM \"my.app\".\"Örder Items\" WHERE id > 45;",
        )
        .await
        .unwrap();
    let expected = listen::take(&mut listener, 65).await;
    support::wait_for("65 messages in the stream", CATCH_UP, || {
        let url = url.clone();
        async move { messages(&url, stream).await.len() >= 65 }
    })
    .await;
    let got = messages(&url, stream).await;
    assert_eq!(got.len(), 65);
    for (m, ev) in got.iter().zip(&expected) {
        let mut bytes = Vec::new();
        ev.write_json(&mut bytes).unwrap();
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            std::str::from_utf8(&bytes).unwrap(),
            "the body is what tail prints"
        );
        let subject = format!("cdc.test.my%2Eapp.%C3%96rder%20Items.{}", ev.action_name());
        assert_eq!(m.subject.as_str(), subject);
    }
    let rows = rows(&got, "cdc.test", &slot);
    assert!(rows
        .iter()
        .all(|r| r.schema == "my.app" && r.table == "Örder Items"));
    // A subscriber filters by table and action with ordinary subject wildcards.
    let js = jetstream(&url).await;
    let st = js.get_stream(stream).await.unwrap();
    let last_delete = st
        .get_last_raw_message_by_subject("cdc.test.my%2Eapp.%C3%96rder%20Items.delete")
        .await
        .expect("a delete under its subject");
    assert_eq!(last_delete.sequence, 65);
    run.sigkill("at the end").await;
    listener.shutdown().await;
    db.teardown().await;
}

#[tokio::test]
async fn sigkill_run_twenty_times_jetstream_holds_every_change_exactly_once() {
    let Some((server, _dir)) = nats().await else {
        return;
    };
    let started = Instant::now();
    let seed = crash::seed() ^ 0x1e75;
    let db = TestDb::new().await;
    let names = Names::new(&db);
    let url = db.url();
    crash::create_schema_and_setup(&db, &names).await;
    let nats_url = server.url();
    let stream = "KILLS";
    let extra = nats_args(&nats_url, stream);

    let progress = Arc::new(crash::Progress::default());
    let writer = Writer::new(url.clone(), seed, false, 40).await;
    // Rollbacks among the random shapes; one bulk insert of 3,000 rows (beyond the
    // publisher's in-flight window) and one big mixed transaction.
    let shapes = crash::schedule(
        250,
        &[
            (60, Shape::BulkInsert(3_000)),
            (150, Shape::BigMixed(1_000)),
        ],
    );
    let total = shapes.len();
    let writer = tokio::spawn(writer.write_all(shapes, progress.clone()));
    let mut rng = support::prng::Prng::new(seed);
    let js = jetstream(&nats_url).await;
    let mut kills = 0;
    let mut cut_inside_a_transaction = 0;
    while kills < 20 || (!writer.is_finished() && kills < 40) {
        let run = Run::spawn_with(&url, &names, &extra);
        if rng.next() % 2 == 0 {
            // Anywhere: during start-up, while publishing, between batches.
            tokio::time::sleep(Duration::from_millis(rng.range(0, 500))).await;
        } else {
            // Once the stream grew by N messages (or 1.5 s, when the writer is idle):
            // often in the middle of a transaction's publishes.
            let base = stream_end(&js, stream).await;
            let n = rng.range(1, 1_500);
            let until = Instant::now() + Duration::from_millis(1_500);
            while Instant::now() < until && stream_end(&js, stream).await < base + n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        run.sigkill(&format!("(kill #{})", kills + 1)).await;
        kills += 1;
        if last_event(&nats_url, stream)
            .await
            .is_some_and(|ev| ev["tx"]["last"] == false)
        {
            cut_inside_a_transaction += 1;
        }
    }
    let record = writer.await.unwrap();
    assert_eq!(progress.done.load(Ordering::SeqCst), total);
    let run = Run::spawn_with(&url, &names, &extra);
    wait_until_appended(&nats_url, stream, &record, Some(&run)).await;
    run.sigkill("after catching up").await;
    let got = messages(&nats_url, stream).await;
    let summary = crash::verify_rows(&rows(&got, "waltap", &names.slot), &record);
    eprintln!(
        "jetstream sigkill test: {kills} kills ({cut_inside_a_transaction} left the stream \
         inside a transaction); the stream holds {} events of {} transactions exactly once \
         ({} rolled back absent); {:?}",
        summary.events,
        summary.transactions,
        record.rolled_back.len(),
        started.elapsed()
    );
    db.teardown().await;
}

#[tokio::test]
async fn a_three_node_cluster_losing_a_node_mid_workload_loses_and_doubles_nothing() {
    if !have_nats_server() {
        return;
    }
    let dir = scratch("cluster");
    let mut nodes = NatsServer::start_cluster(&dir, 3)
        .await
        .expect("a three-node cluster starts");
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let all = urls.join(",");
    let db = TestDb::new().await;
    let names = Names::new(&db);
    let url = db.url();
    crash::create_schema_and_setup(&db, &names).await;
    let stream = "REPLICATED";
    let mut extra = nats_args(&all, stream);
    extra.extend(["--nats-replicas", "3"]);
    let run = Run::spawn_with(&url, &names, &extra);

    let progress = Arc::new(crash::Progress::default());
    let writer = Writer::new(url.clone(), crash::seed() ^ 0xc1, false, 20).await;
    let shapes = crash::schedule(300, &[(100, Shape::BulkInsert(2_500))]);
    let writer = tokio::spawn(writer.write_all(shapes, progress.clone()));
    // Once a third of the workload is in, kill a node (perhaps the stream's leader or the
    // one waltap is connected to), and start it again once more has been written.
    support::wait_for("a third of the workload written", CATCH_UP, || {
        let p = progress.clone();
        async move { p.done.load(Ordering::SeqCst) >= 100 }
    })
    .await;
    let victim = (crash::seed() % 3) as usize;
    nodes[victim].kill();
    support::wait_for("two thirds of the workload written", CATCH_UP, || {
        let p = progress.clone();
        async move { p.done.load(Ordering::SeqCst) >= 200 }
    })
    .await;
    nodes[victim].restart().expect("the node starts again");
    let record = writer.await.unwrap();
    nodes[victim].wait_ready().await.expect("the node is back");
    let reader = urls[(victim + 1) % 3].clone();
    wait_until_appended(&reader, stream, &record, Some(&run)).await;
    run.sigkill("at the end").await;
    let got = messages(&reader, stream).await;
    let summary = crash::verify_rows(&rows(&got, "waltap", &names.slot), &record);
    eprintln!(
        "jetstream cluster test: node {victim} killed and restarted; {} events of {} transactions exactly once",
        summary.events, summary.transactions
    );
    // The restarted node holds the same stream.
    let js = jetstream(&urls[victim]).await;
    let mut st = js.get_stream(stream).await.unwrap();
    assert_eq!(st.info().await.unwrap().config.num_replicas, 3);
    db.teardown().await;
}

#[tokio::test]
async fn nats_down_at_start_and_mid_stream_never_confirms_an_unacknowledged_event() {
    let Some((mut server, _dir)) = nats().await else {
        return;
    };
    let db = TestDb::new().await;
    let names = Names::new(&db);
    let url = db.url();
    crash::create_schema_and_setup(&db, &names).await;
    let nats_url = server.url();
    let stream = "OUTAGE";
    let extra = nats_args(&nats_url, stream);
    let c = db.client().await;
    let confirmed = || async { listen::confirmed_flush(&db, &names.slot).await.unwrap() };
    let current_lsn = || async {
        let lsn: String = c
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        lsn.parse::<waltap::Lsn>().unwrap().0
    };

    // Down at start: waltap keeps retrying, says why, and confirms nothing.
    server.kill();
    let before = confirmed().await;
    let run = Run::spawn_with(&url, &names, &extra);
    c.batch_execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, 100) g")
        .await
        .unwrap();
    support::wait_for("the NATS connection error in the log", CATCH_UP, || async {
        run.assert_alive("while NATS is down");
        run.stderr()
            .contains("cannot connect to NATS at nats://127.0.0.1")
    })
    .await;
    assert_eq!(
        confirmed().await,
        before,
        "nothing confirmed while NATS is down"
    );
    server.restart().unwrap();
    server.wait_ready().await.unwrap();
    support::wait_for("100 events in the stream", CATCH_UP, || {
        let u = nats_url.clone();
        async move { messages(&u, stream).await.len() == 100 }
    })
    .await;

    // Down mid-stream: what was written meanwhile is neither confirmed nor lost.
    let appended_through = current_lsn().await;
    support::wait_for(
        "the slot confirmed past the first 100",
        CATCH_UP,
        || async { confirmed().await >= appended_through },
    )
    .await;
    let interruptions = run.stderr().matches("pipeline interrupted").count();
    server.kill();
    c.batch_execute("UPDATE items SET v = v + 1 WHERE id <= 40")
        .await
        .unwrap();
    let written_through = current_lsn().await;
    // Give the pipeline a chance to try (it must fail to publish and not confirm): wait
    // until it reported the failure.
    support::wait_for("the publish failure in the log", CATCH_UP, || async {
        run.assert_alive("while NATS is down mid-stream");
        run.stderr().matches("pipeline interrupted").count() > interruptions
    })
    .await;
    assert!(
        confirmed().await < written_through,
        "the slot was confirmed past changes JetStream never acknowledged"
    );
    server.restart().unwrap();
    server.wait_ready().await.unwrap();
    support::wait_for("140 events in the stream", CATCH_UP, || {
        let u = nats_url.clone();
        async move { messages(&u, stream).await.len() >= 140 }
    })
    .await;
    let got = messages(&nats_url, stream).await;
    assert_eq!(got.len(), 140, "each change once");
    let updates = got
        .iter()
        .filter(|m| m.subject.as_str() == "waltap.public.items.update")
        .count();
    assert_eq!(updates, 40);
    run.sigkill("at the end").await;
    db.teardown().await;
}

#[tokio::test]
async fn a_stream_of_another_source_is_refused() {
    let Some((server, _dir)) = nats().await else {
        return;
    };
    let js = jetstream(&server.url()).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "THEIRS".into(),
        subjects: vec!["waltap.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("waltap.public.items.create", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let db = TestDb::new().await;
    let names = Names::new(&db);
    crash::create_schema_and_setup(&db, &names).await;
    let nats_url = server.url();
    let mut cmd = support::waltap(
        &db.url(),
        &[
            "run",
            "--table",
            "items",
            "--slot",
            &names.slot,
            "--publication",
            &names.publication,
        ],
    );
    cmd.args(nats_args(&nats_url, "THEIRS"));
    let out = tokio::time::timeout(CATCH_UP, support::output(cmd))
        .await
        .expect("waltap run stops by itself");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ends with message 1, which has no Waltap-Source header"),
        "{stderr}"
    );
    db.teardown().await;
}

#[tokio::test]
async fn a_group_of_two_publishes_through_leader_kills_exactly_once() {
    let Some((server, _dir)) = nats().await else {
        return;
    };
    let seed = crash::seed() ^ 0x9209;
    let db = TestDb::new().await;
    let names = Names::new(&db);
    let url = db.url();
    crash::create_schema_and_setup(&db, &names).await;
    let nats_url = server.url();
    let stream = "GROUP";
    let mut extra = nats_args(&nats_url, stream);
    extra.extend(["--takeover-timeout", "1s"]);
    let progress = Arc::new(crash::Progress::default());
    let writer = Writer::new(url.clone(), seed, false, 20).await;
    let shapes = crash::schedule(200, &[(80, Shape::BulkInsert(2_500))]);
    let writer = tokio::spawn(writer.write_all(shapes, progress.clone()));
    // Two members on one slot: whichever leads publishes; the other takes over when the
    // leader is killed, and a replacement joins.
    let mut members = vec![
        Run::spawn_with(&url, &names, &extra),
        Run::spawn_with(&url, &names, &extra),
    ];
    let mut rng = support::prng::Prng::new(seed);
    let mut kills = 0;
    while kills < 8 || !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.range(100, 700))).await;
        let victim = members.remove((rng.next() % 2) as usize);
        victim
            .sigkill(&format!("(group kill #{})", kills + 1))
            .await;
        kills += 1;
        members.push(Run::spawn_with(&url, &names, &extra));
    }
    let record = writer.await.unwrap();
    wait_until_appended(&nats_url, stream, &record, None).await;
    for m in members {
        m.sigkill("at the end").await;
    }
    let got = messages(&nats_url, stream).await;
    let summary = crash::verify_rows(&rows(&got, "waltap", &names.slot), &record);
    eprintln!(
        "jetstream group test: {kills} member kills; {} events of {} transactions exactly once",
        summary.events, summary.transactions
    );
    db.teardown().await;
}
