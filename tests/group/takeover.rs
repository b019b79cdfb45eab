//! Takeovers: SIGKILL (over and over), SIGSTOP past the takeover timeout then SIGCONT,
//! SIGTERM, and Postgres restarted under the group.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use super::{
    appended_after, assert_log_is, change_of, progress, Change, Group, Member, Writer, PATIENCE,
};
use crate::server::{Sse, ADMIN};
use crate::support::{self, Cluster, TestDb};

/// How many times the leader is killed (`WALTAP_GROUP_KILLS`, default 20).
fn kills() -> usize {
    std::env::var("WALTAP_GROUP_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// A test database with the group's tables, slot and publication, and `n` members.
pub(super) async fn start(n: usize) -> (TestDb, Group, tokio_postgres::Client, Vec<Member>) {
    let db = TestDb::new().await;
    let g = Group::setup(&db).await;
    let c = db.client().await;
    let mut members = Vec::with_capacity(n);
    for _ in 0..n {
        members.push(g.member().await);
    }
    (db, g, c, members)
}

/// The source's current leadership term.
async fn term(c: &tokio_postgres::Client, slot: &str) -> i64 {
    c.query_one(
        "SELECT term FROM waltap.progress WHERE source = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .get(0)
}

/// Checks that no member exited by itself, then kills them all.
pub(super) async fn finish(db: TestDb, mut members: Vec<Member>) {
    for m in members.iter_mut() {
        m.assert_alive();
    }
    for m in members {
        m.sigkill().await;
    }
    db.teardown().await;
}

/// Runs the writer until `stop`, with one bulk transaction of 3,000 rows early on.
fn spawn_writer(
    url: String,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Change>> {
    tokio::spawn(async move {
        let mut w = Writer::new(&url, seed).await;
        while !stop.load(Ordering::Relaxed) {
            let bulk = (w.transactions == 40).then_some(3000);
            w.transaction(bulk).await;
        }
        // A few after the last takeover, so that the final leader appends too.
        for _ in 0..5 {
            w.transaction(None).await;
        }
        w.committed
    })
}

/// Reads stream `all` through the pull feed of any member but the leader (whose lease
/// would outlive a SIGKILL of it by the lease time), moving to another on any failure,
/// until `want` holds a count and that many changes came.
fn spawn_consumer(
    urls: Arc<Mutex<Vec<String>>>,
    leader: Arc<Mutex<String>>,
    want: Arc<Mutex<Option<usize>>>,
) -> tokio::task::JoinHandle<(Vec<Change>, usize)> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let (mut got, mut cursor, mut moves) = (Vec::new(), None::<String>, 0usize);
        let mut k = 0usize;
        let mut last_url = String::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while want.lock().unwrap().is_none_or(|n| got.len() < n) {
            assert!(
                Instant::now() < deadline,
                "the consumer got {} changes",
                got.len()
            );
            let url = {
                let urls = urls.lock().unwrap();
                let leader = leader.lock().unwrap().clone();
                let candidates: Vec<&String> = urls.iter().filter(|u| **u != leader).collect();
                k += 1;
                candidates[k % candidates.len()].clone()
            };
            let mut req = http
                .get(format!("{url}/v1/streams/all/events"))
                .query(&[("limit", "1000"), ("wait", "1")])
                .bearer_auth(ADMIN)
                .timeout(Duration::from_secs(10));
            if let Some(c) = &cursor {
                req = req.query(&[("cursor", c)]);
            }
            let Ok(r) = req.send().await else { continue };
            if r.status() != 200 {
                // stream_busy while a killed member's lease runs out; try another.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let Ok(body) = r.json::<Json>().await else {
                continue;
            };
            if url != last_url {
                moves += 1;
                last_url = url;
            }
            for ev in body["events"].as_array().unwrap() {
                got.push(change_of(ev));
            }
            cursor = body["cursor"].as_str().map(str::to_owned);
        }
        (got, moves)
    })
}

#[tokio::test]
async fn leader_killed_repeatedly_loses_nothing() {
    let (db, g, c, mut members) = start(3).await;
    let first = g.leader(&members).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/streams", members[first].url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "all", "table": "items"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);

    let urls = Arc::new(Mutex::new(
        members.iter().map(|m| m.url.clone()).collect::<Vec<_>>(),
    ));
    let leader_url = Arc::new(Mutex::new(members[first].url.clone()));
    let want = Arc::new(Mutex::new(None));
    let consumer = spawn_consumer(urls.clone(), leader_url.clone(), want.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(g.url.clone(), 0x4A11, stop.clone());

    let mut takeovers = Vec::new();
    for kill in 0..kills() {
        let leader = g.leader(&members).await;
        *leader_url.lock().unwrap() = members[leader].url.clone();
        // Kill mid-stream: right after the leader appended.
        let mark = progress(&c, &g.slot).await;
        appended_after(&c, &g.slot, mark).await;
        let mark = progress(&c, &g.slot).await;
        for m in members.iter_mut() {
            m.assert_alive();
        }
        let victim = members.remove(leader);
        let killed_at = Instant::now();
        victim.sigkill().await;
        let next = g.leader(&members).await;
        let elected = killed_at.elapsed();
        let appending = appended_after(&c, &g.slot, mark).await + elected;
        eprintln!(
            "kill {kill}: member {} led by {elected:?}, appended by {appending:?}",
            members[next].url
        );
        takeovers.push(appending);
        *leader_url.lock().unwrap() = members[next].url.clone();
        members.push(g.member().await);
        *urls.lock().unwrap() = members.iter().map(|m| m.url.clone()).collect();
    }
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    *want.lock().unwrap() = Some(committed.len());
    assert_log_is(&c, &g.slot, &committed).await;
    let (streamed, moves) = tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("the stream consumer got every change")
        .unwrap();
    assert_eq!(
        streamed.len(),
        committed.len(),
        "changes read from the stream"
    );
    assert!(
        streamed == committed,
        "the stream differs from the writer's record"
    );
    takeovers.sort();
    if let (Some(median), Some(max)) = (takeovers.get(takeovers.len() / 2), takeovers.last()) {
        eprintln!(
            "SIGKILL takeovers: {} kills, {} changes, stream moved {moves} times; first append by the new leader: median {median:?}, max {max:?}",
            takeovers.len(),
            committed.len()
        );
    }
    finish(db, members).await;
}

#[tokio::test]
async fn paused_leader_is_fenced_and_steps_down() {
    let (db, g, c, members) = start(2).await;
    let paused = g.leader(&members).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(g.url.clone(), 0x57, stop.clone());
    appended_after(&c, &g.slot, progress(&c, &g.slot).await).await;

    let mark = progress(&c, &g.slot).await;
    let stopped = Instant::now();
    support::signal(&members[paused].child, "STOP");
    let other = 1 - paused;
    support::wait_for("the other member to take over", PATIENCE, || async {
        members[other].role().await.as_deref() == Some("leader")
    })
    .await;
    let elected = stopped.elapsed();
    let appending = appended_after(&c, &g.slot, mark).await + elected;
    eprintln!("SIGSTOP takeover: led by {elected:?}, appended by {appending:?}");
    let taken = term(&c, &g.slot).await;
    support::signal(&members[paused].child, "CONT");
    support::wait_for("the paused member to step down", PATIENCE, || async {
        members[paused].log().contains("stepping down")
            && members[paused].role().await.as_deref() == Some("follower")
    })
    .await;
    for line in members[paused].log().lines() {
        if line.contains("stepping down") {
            eprintln!("the paused member: {line}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    assert_log_is(&c, &g.slot, &committed).await;
    let now = term(&c, &g.slot).await;
    assert_eq!(now, taken, "the resumed member took leadership back");
    assert_eq!(members[other].role().await.as_deref(), Some("leader"));
    finish(db, members).await;
}

#[tokio::test]
async fn sigterm_hands_over_and_follower_subscriptions_see_everything() {
    let (db, g, c, mut members) = start(2).await;
    let leader = g.leader(&members).await;
    let follower = 1 - leader;
    let http = reqwest::Client::new();
    let mut sse = Sse::open(
        http.get(format!(
            "{}/v1/subscribe?table=items",
            members[follower].url
        ))
        .bearer_auth(ADMIN),
    )
    .await;
    sse.expect("initialized").await;
    // Read as it comes: a subscriber that falls behind by its queue is cut off.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let subscription = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(frame) = sse.next().await {
                if frame.event == "change" {
                    seen.lock().unwrap().push(change_of(&frame.data));
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(g.url.clone(), 0x7E, stop.clone());
    appended_after(&c, &g.slot, progress(&c, &g.slot).await).await;
    let mark = progress(&c, &g.slot).await;
    // Two members, each with a subscription hub, one holding a subscription: the source
    // serves one walsender, the leader's.
    let walsenders: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE backend_type = 'walsender' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(walsenders, 1, "one walsender per group");

    let mut old = members.remove(leader);
    let asked = Instant::now();
    support::sigterm(&old.child);
    support::wait_for("the follower to take over", PATIENCE, || async {
        members[0].role().await.as_deref() == Some("leader")
    })
    .await;
    let elected = asked.elapsed();
    let appending = appended_after(&c, &g.slot, mark).await + elected;
    eprintln!("SIGTERM handover: led by {elected:?}, appended by {appending:?}");
    // `waltap status` names the new leader.
    let report: Json =
        serde_json::from_str(&support::run_ok(g.waltap(&["status", "--json"])).await).unwrap();
    let pid = members[0].child.id().unwrap();
    assert_eq!(report["leader"]["active"], true, "{report}");
    assert!(
        report["leader"]["member"]
            .as_str()
            .is_some_and(|m| m.ends_with(&format!(":{pid}"))),
        "{report}"
    );
    assert!(report["leader"]["since"].is_string(), "{report}");
    let status = tokio::time::timeout(PATIENCE, old.child.wait())
        .await
        .expect("the old leader exits")
        .unwrap();
    assert!(status.success(), "exit {status:?}: {}", old.log());

    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    assert_log_is(&c, &g.slot, &committed).await;
    support::wait_for("the subscription to see every change", PATIENCE, || async {
        seen.lock().unwrap().len() >= committed.len() || subscription.is_finished()
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen == committed,
        "the follower's subscription got {} changes of {} (or others); its logs:\n{}",
        seen.len(),
        committed.len(),
        members[0].log()
    );
    finish(db, members).await;
}

#[tokio::test]
async fn group_survives_a_postgres_restart() {
    let cluster = match tokio::task::spawn_blocking(Cluster::start_dedicated)
        .await
        .unwrap()
    {
        Ok(c) => Arc::new(c),
        Err(why) => {
            eprintln!("skipped group_survives_a_postgres_restart: {why}");
            return;
        }
    };
    let db = TestDb::new_on(&cluster).await;
    let g = Group::setup(&db).await;
    let members: Vec<Member> = vec![g.member().await, g.member().await];
    g.leader(&members).await;
    let mut writer = Writer::new(&g.url, 0xB007).await;
    for _ in 0..30 {
        writer.transaction(None).await;
    }
    assert_log_is(&db.client().await, &g.slot, &writer.committed).await;
    let restart = cluster.clone();
    tokio::task::spawn_blocking(move || restart.restart_immediate())
        .await
        .unwrap();
    writer.reconnect(&g.url).await;
    writer.transaction(Some(2000)).await;
    for _ in 0..30 {
        writer.transaction(None).await;
    }
    let c = db.client().await;
    assert_log_is(&c, &g.slot, &writer.committed).await;
    g.leader(&members).await;
    finish(db, members).await;
}

/// An initial-state subscription on a follower, made while the writer runs and kept
/// across a SIGTERM handover: its rows plus the changes after its `snapshotComplete`
/// rebuild the table exactly (the follower's hub reads the log, so the snapshot is placed
/// by the log's progress mark, written by whichever member leads).
#[tokio::test]
async fn follower_initial_state_subscription_rebuilds_the_table_across_a_handover() {
    let (db, g, c, mut members) = start(2).await;
    let leader = g.leader(&members).await;
    let follower = 1 - leader;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(g.url.clone(), 0x1D, stop.clone());
    appended_after(&c, &g.slot, progress(&c, &g.slot).await).await;

    let http = reqwest::Client::new();
    let mut sse = Sse::open(
        http.get(format!("{}/v1/subscribe", members[follower].url))
            .query(&[("table", "items"), ("initialState", "true")])
            .bearer_auth(ADMIN),
    )
    .await;
    sse.expect("initialized").await;
    let ids = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let subscription = {
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut live = false;
            while let Some(f) = sse.next().await {
                let id = |v: &Json| v["id"].as_i64().unwrap() as i32;
                let mut ids = ids.lock().unwrap();
                match f.event.as_str() {
                    "snapshot" => assert!(!live && ids.insert(id(&f.data["row"])), "{f:?}"),
                    "snapshotComplete" => live = true,
                    "change" => {
                        let (action, changed) = change_of(&f.data);
                        let fits = match action.as_str() {
                            "create" => ids.insert(changed),
                            "delete" => ids.remove(&changed),
                            _ => ids.contains(&changed),
                        };
                        assert!(live && fits, "{action} {changed} does not fit: {f:?}");
                    }
                    other => panic!("unexpected {other}: {f:?}"),
                }
            }
        })
    };

    let mut old = members.remove(leader);
    support::sigterm(&old.child);
    support::wait_for("the follower to take over", PATIENCE, || async {
        members[0].role().await.as_deref() == Some("leader")
    })
    .await;
    assert!(tokio::time::timeout(PATIENCE, old.child.wait())
        .await
        .expect("the old leader exits")
        .unwrap()
        .success());
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let table = || async {
        c.query("SELECT id FROM items ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<std::collections::BTreeSet<i32>>()
    };
    let want = table().await;
    support::wait_for(
        "the subscription to rebuild the table",
        PATIENCE,
        || async { *ids.lock().unwrap() == want || subscription.is_finished() },
    )
    .await;
    assert!(!subscription.is_finished(), "the subscription ended early");
    assert_eq!(*ids.lock().unwrap(), want);
    finish(db, members).await;
}
