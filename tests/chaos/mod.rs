//! Random schedules over a real Postgres and real `waltap` processes, every consumer
//! checked against what the writers committed.
//!
//! A schedule: writers commit a random mix of transactions (single rows, dozens of rows,
//! savepoints rolled back or released, primary-key changes, annotations, transactions
//! large enough to be streamed, rollbacks, transactions held open across a moment); the
//! pipeline (`waltap run` or `waltap serve`, switching) fills the event log under SIGKILL
//! and SIGSTOP; streams are made from now on, with an initial state, or after an export's
//! position, with and without a filter, and consumed by `waltap stream tail`, SSE resuming
//! with `Last-Event-ID`, WebSocket acknowledging explicitly, the HTTP
//! feed and the Rust API, which disconnect, resume, go stale under a short retention and
//! start over with `reset` and an initial state. Ephemeral subscribers (filters, initial
//! states, transitions) come and go beside them. The event log itself is read too.
//!
//! Each consumer's [`replica::Replica`] checks every item as it arrives, and at the end
//! that it saw each selected transaction once, in commit order, with exactly its changes,
//! and (with rows to start from) that it rebuilt the table. A divergence fails the test
//! with the seed and the part of the schedule that explains it.
//!
//! Postgres itself crashes too (`pg_ctl restart -m immediate` of a cluster of the run's
//! own): writers learn from `chaos_txlog` whether a commit cut off made it, and every
//! consumer must still see each committed change once; errors of consumers and commands
//! are forgiven only in the minute after a crash. The schedule also truncates the table
//! (alone: writers wait) and adds columns with defaults, which the model fills in for rows
//! that lack them.
//!
//! `WALTAP_CHAOS_SEED=N` replays schedule N (as far as timing allows);
//! `WALTAP_CHAOS_SECONDS` bounds the run (default 90; `0` runs until a failure);
//! `WALTAP_CHAOS_SCHEDULE_SECONDS` is the length of one schedule (default 20);
//! `WALTAP_CHAOS_TRACE=1` prints the whole trace of passing schedules too;
//! `WALTAP_CHAOS_GROUP=1` makes every schedule a group's (HTTP consumers and subscribers
//! then connect to any member, moving between them as they reconnect);
//! `WALTAP_CHAOS_WITHOUT=op,op` leaves operations out: `kill`, `sigstop`, `disconnect`,
//! `watermarks`, `restart`, `truncate`, `ddl`,
//! `group` (schedules with more `serve` members, whose leader is killed or stopped),
//! `reset` (the schedule's own resets; stale cursors still reset), consumers `cli`, `feed`,
//! `api`, `sse`, `ws`, ephemeral subscribers `subscribe`, and streams `from-now`, `initial-state`, `export`.

mod consumers;
mod group;
mod http;
mod procs;
mod replica;
mod subscribers;
mod trace;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::prng::Prng;
use crate::support::{self, Cluster, TestDb};
use consumers::{Control, Ctx, SharedReplica, Via};
use group::Members;
use procs::{Env, Kind, Pipeline};
use replica::{Base, Replica};
use subscribers::{SharedSubscriber, Subscriber};
use trace::Trace;
use writer::{Record, SharedRecord, SharedTable, Writer};

const WRITERS: i32 = 3;
const MAX_STREAMS: usize = 10;
const MAX_ADDED_COLUMNS: usize = 3;
const MAX_SUBSCRIBERS: usize = 4;
/// How long consumers may go without receiving anything while they catch up once the
/// writers stop (a large initial state over the feed takes minutes on a loaded machine,
/// but it moves).
const CATCH_UP: Duration = Duration::from_secs(90);
/// How long catching up may take at all: a consumer stuck in a loop (re-delivering the
/// same initial state again and again) receives all the time.
const CATCH_UP_AT_MOST: Duration = Duration::from_secs(300);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos() {
    let replay = env_u64("WALTAP_CHAOS_SEED");
    let budget = env_u64("WALTAP_CHAOS_SECONDS").unwrap_or(90);
    let length = Duration::from_secs(env_u64("WALTAP_CHAOS_SCHEDULE_SECONDS").unwrap_or(20));
    let first = replay.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            % 1_000_000_000
    });
    let started = Instant::now();
    // A cluster of the run's own, which the schedules may crash; without server binaries
    // (only DATABASE_URL), the shared one, never restarted.
    let own = match tokio::task::spawn_blocking(Cluster::start_dedicated)
        .await
        .unwrap()
    {
        Ok(c) => Some(Arc::new(c)),
        Err(why) => {
            eprintln!("chaos: no cluster of its own, so no Postgres restarts: {why}");
            None
        }
    };
    for n in 0.. {
        let seed = first + n;
        eprintln!(
            "chaos: schedule {n}, WALTAP_CHAOS_SEED={seed} ({:.0}s into the run)",
            started.elapsed().as_secs_f64()
        );
        if let Err(report) = schedule(seed, length, own.clone()).await {
            panic!(
                "chaos: schedule {n} diverged after {:.0}s of chaos ({n} schedules passed before it)\n\
                 replay: WALTAP_CHAOS_SEED={seed} cargo test --test chaos\n{report}",
                started.elapsed().as_secs_f64()
            );
        }
        let out_of_time = budget > 0 && started.elapsed() >= Duration::from_secs(budget);
        if replay.is_some() || out_of_time {
            eprintln!("chaos: {} schedules passed", n + 1);
            return;
        }
    }
}

/// A stream and its consumer, as the schedule knows them.
struct Consumer {
    name: String,
    via: Via,
    replica: SharedReplica,
    control: mpsc::UnboundedSender<Control>,
}

/// One schedule from `seed`, `length` long, on `own` (which it may crash) or the shared
/// cluster; `Err` is the report of a divergence.
async fn schedule(seed: u64, length: Duration, own: Option<Arc<Cluster>>) -> Result<(), String> {
    let mut rng = Prng::new(seed);
    let db = match &own {
        Some(c) => TestDb::new_on(c).await,
        None => TestDb::new().await,
    };
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, w int NOT NULL, v int NOT NULL, note text);
             ALTER TABLE items REPLICA IDENTITY FULL;
             CREATE TABLE chaos_txlog (w int, seq bigint, xid bigint NOT NULL DEFAULT txid_current(),
                                       PRIMARY KEY (w, seq));",
        )
        .await
        .unwrap();
    let without: Vec<String> = std::env::var("WALTAP_CHAOS_WITHOUT")
        .unwrap_or_default()
        .split(',')
        .map(|op| op.trim().to_owned())
        .filter(|op| !op.is_empty())
        .collect();
    let env = Env {
        url: db.url(),
        slot: db.unique_name("chaos_slot"),
        publication: db.unique_name("chaos_pub"),
        retention_secs: rng.range(4, 15),
        group: (rng.percent() < 30 || std::env::var_os("WALTAP_CHAOS_GROUP").is_some())
            && !without.iter().any(|op| op == "group"),
    };
    // Slot first: every commit from here on reaches the log.
    // Small enough that the writers' large transactions are streamed before their commit.
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            support::quote_ident(&db.name)
        ))
        .await
        .unwrap();
    procs::run(&env, &["setup", "--table", "items"])
        .await
        .unwrap_or_else(|e| panic!("waltap setup: {e}"));
    audit_the_log(&db).await;
    let started = Instant::now();
    let trace = Trace::new(started);
    trace.log(format!("pipeline: retention {}s", env.retention_secs));
    let http = Arc::new(Mutex::new(None));
    let mut pipeline = Pipeline::start(&env, Kind::Serve, http.clone()).await;
    let member_urls = Arc::new(Mutex::new(Vec::new()));
    let members = match env.group {
        true => {
            let n = rng.range(1, 2) as usize;
            trace.log(format!("group: {n} more serve members"));
            Some(Members::start(&env, n, member_urls.clone()).await)
        }
        false => None,
    };
    let table = SharedTable::default();
    let ctx = Ctx {
        env: env.clone(),
        http: http.clone(),
        members: member_urls,
        turn: Arc::default(),
        trace: trace.clone(),
        stop: CancellationToken::new(),
        quiet: CancellationToken::new(),
        table: table.clone(),
        crashed: Arc::default(),
        without,
    };
    let log = Arc::new(Mutex::new(Replica::new(
        "event-log".into(),
        None,
        Base::Empty,
        Duration::ZERO,
        table.clone(),
    )));
    let mut tasks = vec![tokio::spawn(consumers::log_poller(
        ctx.clone(),
        log.clone(),
    ))];

    let stop_writers = CancellationToken::new();
    let mut records = Vec::new();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let writer = Writer::new(w, env.url.clone(), rng.next(), started, table.clone());
        records.push(writer.record());
        writers.push(tokio::spawn(writer.run(stop_writers.clone())));
    }
    // The schedule's own truncates: the last record.
    records.push(SharedRecord::default());

    let mut s = Schedule {
        streams: Vec::new(),
        made: 0,
        own,
        truncates: records.last().unwrap().clone(),
        added: 0,
        truncated: 0,
        subscribers: Vec::new(),
        members,
    };
    while started.elapsed() < length && !trace.failed() {
        if let Some(why) = exited(&mut pipeline, &mut s.members) {
            trace.fail("pipeline", why);
            break;
        }
        operate(&mut rng, &ctx, &mut pipeline, &mut s, &mut tasks).await;
        tokio::time::sleep(Duration::from_millis(rng.range(20, 300))).await;
    }
    let (streams, subscribers, mut members) = (s.streams, s.subscribers, s.members);

    stop_writers.cancel();
    ctx.quiet.cancel();
    trace.log("writers: stop".into());
    let mut live = Vec::new();
    for w in writers {
        live.push(w.await.expect("writer"));
    }
    pipeline.resume();
    if pipeline.kind == Kind::Run && streams.iter().any(|s| s.via.needs_http()) {
        // HTTP consumers need the server to catch up.
        pipeline.kill_and_restart(Kind::Serve, Duration::ZERO).await;
        trace.log("pipeline: serve, for the feeds to catch up".into());
    }
    let records: Vec<Record> = records
        .iter()
        .map(|r| std::mem::take(&mut *r.lock().unwrap()))
        .collect();
    trace.log(format!(
        "writers: stopped, {} transactions committed; cut off by a crash: {} committed, {} not",
        records.iter().map(|r| r.committed.len()).sum::<usize>(),
        records.iter().map(|r| r.interrupted[1]).sum::<usize>(),
        records.iter().map(|r| r.interrupted[0]).sum::<usize>(),
    ));
    let all: Vec<SharedReplica> = std::iter::once(log.clone())
        .chain(streams.iter().map(|s| s.replica.clone()))
        .collect();
    let table = table_rows(&db).await;
    let writer_of: HashMap<u32, usize> = records
        .iter()
        .enumerate()
        .flat_map(|(w, r)| r.committed.iter().map(move |t| (t.xid, w)))
        .collect();
    // The subscribers' truth: the event log's transactions in commit order, with positions.
    // A divergence (not mere lag) fails at once.
    let check_subscribers = |complete: bool| -> Vec<(String, String)> {
        let txs = log.lock().unwrap().transactions();
        let mut behind = Vec::new();
        for s in &subscribers {
            let s = s.lock().unwrap();
            match s.check(&txs, &writer_of, records.len(), complete) {
                Ok(()) => {}
                Err((true, why)) => behind.push((s.name.clone(), why)),
                Err((false, why)) => trace.fail(&s.name, why),
            }
            if let Some(why) = complete.then(|| s.rows_behind(&records, &table)).flatten() {
                behind.push((s.name.clone(), why));
            }
        }
        behind
    };
    let (catching_up, mut last_behind) = (Instant::now(), Vec::new());
    let (mut deadline, mut received) = (catching_up + CATCH_UP, 0);
    while !trace.failed() {
        let now_received: u64 = all.iter().map(|r| r.lock().unwrap().items).sum::<u64>()
            + subscribers
                .iter()
                .map(|s| s.lock().unwrap().items)
                .sum::<u64>();
        if now_received != received {
            (deadline, received) = (Instant::now() + CATCH_UP, now_received);
        }
        if let Some(why) = exited(&mut pipeline, &mut members) {
            trace.fail("pipeline", why);
            break;
        }
        let mut behind: Vec<(String, String)> = all
            .iter()
            .map(|r| r.lock().unwrap())
            .filter(|r| !r.caught_up(&records, &table))
            .map(|r| (r.name.clone(), r.status(&table)))
            .collect();
        if behind.is_empty() {
            behind = check_subscribers(true);
        }
        if behind.is_empty() {
            trace.log(format!(
                "catch-up: {:.1}s, the last behind: {last_behind:?}",
                catching_up.elapsed().as_secs_f64()
            ));
            break;
        }
        last_behind = behind.iter().map(|(name, _)| name.clone()).collect();
        let why = if Instant::now() > deadline {
            format!("nothing received for {CATCH_UP:?}")
        } else if catching_up.elapsed() > CATCH_UP_AT_MOST {
            format!("still behind after {CATCH_UP_AT_MOST:?}")
        } else {
            String::new()
        };
        if !why.is_empty() {
            for (name, status) in &behind {
                trace.fail(name, format!("did not catch up: {why}: {status}"));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    if let Some((subject, _, _)) = trace.failure() {
        // Which transaction went missing or came twice, if the writers' record tells.
        let failed = all.iter().find(|r| r.lock().unwrap().name == subject);
        if let Some(Err(why)) =
            failed.map(|r| r.lock().unwrap().check_transactions(&records, false))
        {
            trace.log(format!("{subject}: against the writers' record: {why}"));
        }
        if let Some(r) = failed {
            let status = r.lock().unwrap().status(&table);
            trace.log(format!("{subject}: where it was: {status}"));
        }
    } else {
        check_writers(&records, &live, &table);
        for (name, what) in check_subscribers(true).into_iter().take(1) {
            trace.fail(&name, what);
        }
        for r in &all {
            let r = r.lock().unwrap();
            if let Err(what) = r.verify(&records, &table) {
                trace.fail(&r.name, what);
                break;
            }
        }
    }
    pipeline.shutdown().await;
    if let Some(m) = members {
        m.shutdown().await;
    }
    db.teardown().await;
    match trace.failure() {
        None => {
            let items: u64 = all.iter().map(|r| r.lock().unwrap().items).sum();
            eprintln!(
                "chaos: seed {seed} passed: {} transactions, {} consumers, {items} items checked",
                records.iter().map(|r| r.committed.len()).sum::<usize>(),
                all.len()
            );
            eprintln!("chaos: {}", trace.counts());
            if std::env::var_os("WALTAP_CHAOS_TRACE").is_some() {
                eprintln!("{}", trace.relevant("", Duration::MAX));
            }
            for sub in &subscribers {
                let sub = sub.lock().unwrap();
                eprintln!(
                    "chaos: {} (filter w = {:?}, transitions on v = {:?}, initial state {}): {} items, sessions: {}",
                    sub.name,
                    sub.filter_w,
                    sub.transitions,
                    sub.initial_state || sub.transitions.is_some(),
                    sub.items,
                    sub.endings()
                );
            }
            for line in trace.anomalies() {
                eprintln!("chaos: {line}");
            }
            Ok(())
        }
        Some((subject, what, at)) => Err(format!(
            "{subject} diverged at {:.3}s: {what}\ntrace (operations on {subject}, on the \
             pipeline, and everything in the 2 s before):\n{}",
            at.as_secs_f64(),
            trace.relevant(&subject, at)
        )),
    }
}

/// Why the pipeline or a group member ended by itself, if one did: a divergence.
fn exited(pipeline: &mut Pipeline, members: &mut Option<Members>) -> Option<String> {
    pipeline
        .exited()
        .or_else(|| members.as_mut().and_then(Members::exited))
}

/// Copies every event appended to the log into `chaos_log`, which retention does not
/// touch: the event log consumer reads it, so a short retention cannot hide a lost event.
async fn audit_the_log(db: &TestDb) {
    let c = db.client().await;
    waltap::log::migrate(&c).await.unwrap();
    c.batch_execute(
        "CREATE TABLE chaos_log (LIKE waltap.events);
         CREATE INDEX ON chaos_log (source, commit_lsn, ordinal);
         CREATE FUNCTION chaos_copy() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO chaos_log SELECT NEW.*; RETURN NULL; END $$;
         CREATE TRIGGER chaos_copy AFTER INSERT ON waltap.events
           FOR EACH ROW EXECUTE FUNCTION chaos_copy();",
    )
    .await
    .unwrap();
}

/// The writers' own model must match the table, or the record is not the truth.
fn check_writers(records: &[Record], live: &[Vec<i32>], table: &BTreeMap<i64, Json>) {
    let _ = records;
    let mut want: Vec<i64> = live.iter().flatten().map(|&id| id as i64).collect();
    want.sort_unstable();
    let have: Vec<i64> = table.keys().copied().collect();
    assert_eq!(
        have, want,
        "the writers' model of the table is wrong (harness bug)"
    );
}

/// The table as JSON rows by id, with every column (those DDL added too).
async fn table_rows(db: &TestDb) -> BTreeMap<i64, Json> {
    db.client()
        .await
        .query("SELECT row_to_json(i)::text FROM items i", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let row: Json = serde_json::from_str(r.get(0)).unwrap();
            (row["id"].as_i64().unwrap(), row)
        })
        .collect()
}

/// What the schedule made and may crash.
struct Schedule {
    streams: Vec<Consumer>,
    /// Streams made (or tried): names are never reused, even of a create a crash cut off.
    made: usize,
    own: Option<Arc<Cluster>>,
    /// The record of the schedule's truncates.
    truncates: SharedRecord,
    /// Columns added (or tried).
    added: usize,
    /// Truncates tried: their numbers in `chaos_txlog`.
    truncated: i64,
    subscribers: Vec<SharedSubscriber>,
    /// Group mode: the members besides the pipeline.
    members: Option<Members>,
}

/// One random operation on waltap, Postgres or the table.
async fn operate(
    rng: &mut Prng,
    ctx: &Ctx,
    pipeline: &mut Pipeline,
    s: &mut Schedule,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let trace = &ctx.trace;
    let on = |op: &str| ctx.allows(op);
    let streams = &mut s.streams;
    match rng.range(0, 999) {
        0..=39 if on("restart") && s.own.is_some() => {
            let cluster = s.own.clone().unwrap();
            trace.log("postgres: restart -m immediate".into());
            *ctx.crashed.lock().unwrap() = Some(Instant::now());
            tokio::task::spawn_blocking(move || cluster.restart_immediate())
                .await
                .unwrap();
            // Forgiveness counts from when it is back.
            *ctx.crashed.lock().unwrap() = Some(Instant::now());
            trace.log("postgres: back after the restart".into());
            return;
        }
        40..=79 if on("truncate") => {
            let (ctx, record) = (ctx.clone(), s.truncates.clone());
            s.truncated += 1;
            let seq = s.truncated;
            tasks.push(tokio::spawn(async move {
                ctx.trace.log("table: TRUNCATE items".into());
                let started = ctx.trace.started();
                let what = writer::truncate(&ctx.env.url, &ctx.table, &record, seq, started).await;
                ctx.trace.log(format!("table: TRUNCATE items {what}"));
            }));
            return;
        }
        80..=109 if on("ddl") && s.added < MAX_ADDED_COLUMNS => {
            let (ctx, n) = (ctx.clone(), s.added);
            s.added += 1;
            tasks.push(tokio::spawn(async move {
                let what = writer::add_column(&ctx.env.url, &ctx.table, n).await;
                ctx.trace.log(format!("table: {what}"));
            }));
            return;
        }
        110..=169 if on("subscribe") && s.subscribers.len() < MAX_SUBSCRIBERS => {
            // A third filter on `w`, a third on `v` with transitions, a third none.
            let (filter_w, transitions) = match rng.percent() {
                0..=32 => (Some(rng.range(0, WRITERS as u64 - 1) as i32), None),
                33..=65 => (None, Some((rng.percent() < 50, rng.range(1, 2) as i64))),
                _ => (None, None),
            };
            let initial_state = rng.percent() < 50;
            let sub = Arc::new(Mutex::new(Subscriber {
                name: format!("sub{}", s.subscribers.len()),
                filter_w,
                initial_state,
                transitions,
                table: ctx.table.clone(),
                sessions: Vec::new(),
                items: 0,
            }));
            trace.log(format!(
                "sub{}: GET /v1/subscribe over SSE, filter w = {filter_w:?}, transitions on v (>=, bound) = {transitions:?}, initialState {initial_state}",
                s.subscribers.len()
            ));
            s.subscribers.push(sub.clone());
            tasks.push(tokio::spawn(subscribers::subscribe(
                ctx.clone(),
                sub,
                rng.next(),
            )));
            return;
        }
        _ => {}
    }
    match rng.percent() {
        0..=29 if streams.len() < MAX_STREAMS => {
            let n = s.made;
            s.made += 1;
            if let Some(c) = create_stream(rng, ctx, n, tasks).await {
                streams.push(c);
            }
        }
        30..=49 if s.members.is_some() && rng.percent() < 70 => {
            group_op(rng, trace, pipeline, s.members.as_mut().unwrap()).await;
        }
        30..=39 if on("kill") => {
            // Mostly `serve`: the HTTP consumers and subscribers need it.
            let kind = if rng.percent() < 30 {
                Kind::Run
            } else {
                Kind::Serve
            };
            let down = Duration::from_millis(rng.range(0, 1500));
            trace.log(format!(
                "pipeline: SIGKILL {:?}, {kind:?} starts after {down:?}",
                pipeline.kind
            ));
            pipeline.kill_and_restart(kind, down).await;
        }
        40..=49 if on("sigstop") => {
            let frozen = Duration::from_millis(rng.range(100, 2000));
            trace.log(format!(
                "pipeline: SIGSTOP {:?} for {frozen:?}",
                pipeline.kind
            ));
            pipeline.pause();
            tokio::time::sleep(frozen).await;
            pipeline.resume();
        }
        50..=74 if !streams.is_empty() && on("disconnect") => {
            let c = &streams[rng.range(0, streams.len() as u64 - 1) as usize];
            let down = Duration::from_millis(rng.range(0, 3000) * rng.range(1, 4));
            trace.log(format!("{}: disconnect ({:?}) for {down:?}", c.name, c.via));
            let _ = c.control.send(Control::Disconnect(down));
        }
        75..=84 if !streams.is_empty() && on("reset") => {
            let c = &streams[rng.range(0, streams.len() as u64 - 1) as usize];
            trace.log(format!(
                "{}: reset with initial state ({:?})",
                c.name, c.via
            ));
            let _ = c.control.send(Control::ResetWithRows);
        }
        85..=91 if on("watermarks") => {
            // A burst of bare snapshot watermarks, back to back, in the background: what
            // many initial states starting at once write, cheaply. Commits land right
            // after (and exactly at) a watermark, where the log once lost a transaction.
            let (ctx, burst) = (ctx.clone(), Duration::from_millis(rng.range(500, 3000)));
            tasks.push(tokio::spawn(async move {
                let Ok(c) = support::connect(&ctx.env.url).await else {
                    return;
                };
                let until = Instant::now() + burst;
                let mut n = 0u64;
                while Instant::now() < until && !ctx.stop.is_cancelled() {
                    let sql = "SELECT pg_logical_emit_message(false, 'waltap.watermark', 'chaos')";
                    if c.batch_execute(sql).await.is_err() {
                        break;
                    }
                    n += 1;
                }
                ctx.trace.log(format!("watermarks: {n} in {burst:?}"));
            }));
        }
        92..=99 if on("export") => {
            // In the background, several at once: each writes a watermark among the
            // writers' commits, which the event log must pass without losing one.
            let (ctx, n) = (ctx.clone(), rng.next() % 1000);
            tasks.push(tokio::spawn(async move {
                ctx.trace.log(format!("export-{n}: waltap export items"));
                match procs::run(&ctx.env, &["export", "items"]).await {
                    Ok(out) => {
                        let last = out.lines().last().unwrap_or_default().to_owned();
                        ctx.trace.log(format!("export-{n}: done, {last}"));
                    }
                    Err(e) if e.contains("did not finish") => {
                        ctx.trace.fail(&format!("export-{n}"), e)
                    }
                    Err(e) => ctx.trace.log(format!("export-{n}: failed: {e}")),
                }
            }));
        }
        _ => {}
    }
}

/// SIGKILL (and a new member) or SIGSTOP (now and then past the takeover timeout) of
/// whichever member leads; the pipeline's when none of the others does.
async fn group_op(rng: &mut Prng, trace: &Trace, pipeline: &mut Pipeline, members: &mut Members) {
    let kill = rng.percent() < 50;
    let (down, frozen) = (
        Duration::from_millis(rng.range(0, 1500)),
        Duration::from_millis(rng.range(500, 6000)),
    );
    match members.leader().await {
        Some(i) if kill => {
            trace.log(format!(
                "group: SIGKILL the leader, member {i}; a new one after {down:?}"
            ));
            members.kill(i, down).await;
        }
        Some(i) => {
            trace.log(format!(
                "group: SIGSTOP the leader, member {i}, for {frozen:?}"
            ));
            members.pause(i, frozen).await;
        }
        None if kill => {
            trace.log(format!(
                "group: SIGKILL the pipeline ({:?}), which leads; serve starts after {down:?}",
                pipeline.kind
            ));
            pipeline.kill_and_restart(Kind::Serve, down).await;
        }
        None => {
            trace.log(format!(
                "group: SIGSTOP the pipeline ({:?}), which leads, for {frozen:?}",
                pipeline.kind
            ));
            pipeline.pause();
            tokio::time::sleep(frozen).await;
            pipeline.resume();
        }
    }
}

/// A new stream from now, from the current rows, or after an export's position; with or
/// without a filter; and its consumer.
async fn create_stream(
    rng: &mut Prng,
    ctx: &Ctx,
    n: usize,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<Consumer> {
    let name = format!("s{n}");
    let filter_w = (rng.percent() < 30).then(|| rng.range(0, WRITERS as u64 - 1) as i32);
    // Truncates too: they empty the consumer's copy of the table, filtered or not.
    let filter = filter_w.map(|w| json!({"where": {"w": w}, "truncate": true}).to_string());
    let vias: Vec<Via> = [
        ("cli", Via::Cli),
        ("feed", Via::Feed),
        ("api", Via::Api),
        ("sse", Via::Sse),
        ("ws", Via::Ws),
    ]
    .into_iter()
    .filter(|(op, _)| ctx.allows(op))
    .map(|(_, via)| via)
    .collect();
    let hows: Vec<u64> = ["from-now", "initial-state", "export"]
        .iter()
        .enumerate()
        .filter(|(_, op)| ctx.allows(op))
        .map(|(i, _)| i as u64)
        .collect();
    if vias.is_empty() || hows.is_empty() {
        return None;
    }
    let via = vias[rng.range(0, vias.len() as u64 - 1) as usize];
    let mut args = vec!["stream", "create", &name, "--table", "items"];
    if let Some(f) = &filter {
        args.extend(["--filter", f]);
    }
    let how = hows[rng.range(0, hows.len() as u64 - 1) as usize];
    let (base, exported, from) = match how {
        0 => (Base::Now, Vec::new(), String::new()),
        1 => {
            args.push("--initial-state");
            (Base::Rows, Vec::new(), String::new())
        }
        _ => {
            let mut export = vec!["export", "items"];
            if let Some(f) = &filter {
                export.extend(["--filter", f]);
            }
            ctx.trace.log(format!("{name}: waltap export items"));
            let out = match procs::run(&ctx.env, &export).await {
                Ok(out) => out,
                Err(e) if e.contains("did not finish") => {
                    ctx.trace.fail(&name, e);
                    return None;
                }
                Err(e) => {
                    ctx.trace.log(format!("{name}: export failed: {e}"));
                    return None;
                }
            };
            let lines: Vec<Json> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let position = lines.last().and_then(|l| l["position"].as_str());
            let Some(position) = position.map(str::to_owned) else {
                ctx.trace
                    .fail(&name, format!("export ended without a position: {out}"));
                return None;
            };
            (Base::Rows, lines, position)
        }
    };
    if !from.is_empty() {
        args.extend(["--from", &from]);
    }
    let what = format!(
        "{}{}, consumed via {via:?}",
        ["from now", "with initial state", "after an export"][how as usize],
        filter
            .as_deref()
            .map(|f| format!(", filter {f}"))
            .unwrap_or_default(),
    );
    let created_at = ctx.trace.elapsed();
    if let Err(e) = procs::run(&ctx.env, &args).await {
        // After a crash the stream may exist half made: its name is not used again.
        ctx.forgive(&name, format!("stream create failed: {e}"));
        return None;
    }
    ctx.trace.log(format!(
        "{name}: created {what}{}",
        if from.is_empty() {
            String::new()
        } else {
            format!(" (export of {} rows, position {from})", exported.len() - 1)
        }
    ));
    let mut replica = Replica::new(name.clone(), filter_w, base, created_at, ctx.table.clone());
    for line in &exported {
        if let Err(what) = replica.apply(line) {
            ctx.trace.fail(&name, format!("export: {what}"));
            return None;
        }
    }
    let replica = Arc::new(Mutex::new(replica));
    let (control, rx) = mpsc::unbounded_channel();
    tasks.push(tokio::spawn(consumers::consume(
        ctx.clone(),
        name.clone(),
        via,
        replica.clone(),
        rx,
        rng.next(),
    )));
    Some(Consumer {
        name,
        via,
        replica,
        control,
    })
}
