//! Ephemeral subscribers: `GET /v1/subscribe` over SSE, with or without a filter, which
//! disconnect at random and subscribe again. At most once, from now on: each session must
//! see, after its `initialized` marker, every selected transaction the event log holds
//! after the marker's position, in commit order, with no gap, until it ends, and it may end
//! only with a typed error item (or with the server it talked to gone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value as Json};

use super::consumers::Ctx;
use super::http::{sse_client, sse_get, SseReader};
use super::replica::{Base, Replica};
use super::writer::{Change, SharedTable};
use crate::support::prng::Prng;

/// One subscription, from `initialized` to its end.
#[derive(Default)]
pub struct Session {
    /// The `initialized` marker's position; with an initial state, `snapshotComplete`'s.
    pub from: String,
    /// With an initial state: the table rebuilt from its rows and the changes after them
    /// (each update's and delete's old row must be the copy's, each create new to it).
    pub rows: Option<Replica>,
    /// Transactions in the order seen: xid, first position, changes.
    pub txs: Vec<(u32, String, Vec<Change>)>,
    /// How it ended: an error item's code, or the connection; `None` while open.
    pub ended: Option<String>,
}

pub struct Subscriber {
    pub name: String,
    pub filter_w: Option<i32>,
    /// Sessions ask for the current rows first (`initialState=true`).
    pub initial_state: bool,
    /// The columns DDL added, for the sessions' copies.
    pub table: SharedTable,
    pub sessions: Vec<Session>,
    pub items: u64,
}

pub type SharedSubscriber = Arc<Mutex<Subscriber>>;

/// A transaction of the event log: xid, first position, changes.
pub type LogTx = (u32, String, Vec<Change>);

impl Subscriber {
    /// Checks one item of the open session.
    fn apply(&mut self, item: &Json) -> Result<(), String> {
        self.items += 1;
        let session = self.sessions.last_mut().unwrap();
        if item["type"] == "initialized" {
            if !session.from.is_empty() {
                return Err(format!("a second initialized marker: {item}"));
            }
            session.from = item["position"]
                .as_str()
                .ok_or_else(|| format!("initialized without a position: {item}"))?
                .to_owned();
            return Ok(());
        }
        if session.from.is_empty() {
            return Err(format!("an item before initialized: {item}"));
        }
        if let Some(rows) = &mut session.rows {
            rows.apply(item)?;
            if item["type"] == "snapshotComplete" {
                session.from = item["position"]
                    .as_str()
                    .ok_or_else(|| format!("snapshotComplete without a position: {item}"))?
                    .to_owned();
            }
            if !rows.has_rows_phase_ended() {
                return Ok(());
            }
            if item["type"] == "snapshotComplete" {
                return Ok(());
            }
        }
        // A column was added (the schedule's DDL): announced before the first event of
        // the new shape.
        if item["type"] == "schemaChange" && item["table"] == "items" {
            return Ok(());
        }
        if item["type"].is_string() {
            return Err(format!("unexpected item: {item}"));
        }
        let position = item["position"]
            .as_str()
            .ok_or_else(|| format!("change without a position: {item}"))?;
        let last = session.txs.last().map_or(&session.from, |t| &t.1);
        let xid = item["tx"]["id"]
            .as_u64()
            .ok_or_else(|| format!("change without tx.id: {item}"))? as u32;
        if position <= last.as_str() && session.txs.last().is_none_or(|t| t.0 != xid) {
            return Err(format!("position {position} not after {last}: {item}"));
        }
        let (action, row) = match item["action"].as_str() {
            Some("create") => ("create", &item["created"]),
            Some("update") => ("update", &item["after"]),
            Some("delete") => ("delete", &item["deleted"]),
            Some("truncate") => ("truncate", &Json::Null),
            _ => return Err(format!("unexpected action: {item}")),
        };
        if let (Some(w), false) = (self.filter_w, action == "truncate") {
            if row["w"].as_i64() != Some(w as i64) {
                return Err(format!("a row the filter w = {w} excludes: {item}"));
            }
        }
        let change = (action, row["id"].as_i64().unwrap_or(0) as i32);
        match session.txs.last_mut() {
            Some(t) if t.0 == xid => t.2.push(change),
            _ => session.txs.push((xid, position.to_owned(), vec![change])),
        }
        Ok(())
    }

    /// Every session against the event log `log` (`writer_of`: xid to record index, the
    /// last record being the truncates): from the first selected transaction after its
    /// marker, each one in order and none left out (the last one of a session that ended
    /// may be cut short); an open one through the log's end when `complete`.
    /// `Err((waiting could help, what))`.
    pub fn check(
        &self,
        log: &[LogTx],
        writer_of: &HashMap<u32, usize>,
        records: usize,
        complete: bool,
    ) -> Result<(), (bool, String)> {
        let diverged = |what: String| Err((false, what));
        let selected: Vec<&LogTx> = log
            .iter()
            .filter(|(xid, _, _)| {
                writer_of.get(xid).is_some_and(|&w| {
                    w + 1 == records || self.filter_w.is_none_or(|f| f as usize == w)
                })
            })
            .collect();
        for (n, s) in self.sessions.iter().enumerate() {
            if s.from.is_empty() {
                continue;
            }
            let k = selected.partition_point(|t| t.1 <= s.from);
            for (j, (xid, position, changes)) in s.txs.iter().enumerate() {
                let Some(want) = selected.get(k + j) else {
                    return Err((
                        true,
                        format!(
                            "session {n} (from {}): transaction {xid} at {position} is not in \
                             the log (yet) after its #{j}",
                            s.from
                        ),
                    ));
                };
                if want.0 != *xid {
                    return diverged(format!(
                        "session {n} (from {}): its #{j} is transaction {xid} at {position}, \
                         the log's next selected is {} at {} (a gap or a stranger)",
                        s.from, want.0, want.1
                    ));
                }
                let (mut got, mut expected) = (changes.clone(), want.2.clone());
                got.sort_unstable();
                expected.sort_unstable();
                // A session that ended (the subscriber left, the server cut it off) may
                // have stopped inside its last transaction.
                let cut_short = s.ended.is_some()
                    && j + 1 == s.txs.len()
                    && changes.len() < want.2.len()
                    && want.2.starts_with(changes);
                if got != expected && !cut_short {
                    return diverged(format!(
                        "session {n}: transaction {xid} delivered {} changes, the log holds {}",
                        got.len(),
                        expected.len()
                    ));
                }
            }
            if complete && s.ended.is_none() && k + s.txs.len() != selected.len() {
                return Err((
                    true,
                    format!(
                    "session {n} (from {}), still open, has {} of the {} selected transactions \
                     after its marker",
                    s.from,
                    s.txs.len(),
                    selected.len() - k
                ),
                ));
            }
        }
        Ok(())
    }

    /// At the end: an open session with an initial state whose copy is not yet the
    /// table (`table`, which no longer changes), and where it is.
    pub fn rows_behind(
        &self,
        records: &[super::writer::Record],
        table: &std::collections::BTreeMap<i64, Json>,
    ) -> Option<String> {
        let s = self.sessions.last()?;
        let rows = s.rows.as_ref()?;
        if s.ended.is_some() || rows.caught_up(records, table) {
            return None;
        }
        Some(format!(
            "session {} (initial state): {}",
            self.sessions.len() - 1,
            rows.status(table)
        ))
    }

    /// How the sessions ended, for the report.
    pub fn endings(&self) -> String {
        let mut ends: HashMap<&str, usize> = HashMap::new();
        for s in &self.sessions {
            *ends
                .entry(s.ended.as_deref().unwrap_or("open"))
                .or_default() += 1;
        }
        let mut ends: Vec<String> = ends.iter().map(|(k, v)| format!("{v} {k}")).collect();
        ends.sort();
        ends.join(", ")
    }
}

/// Subscribes again and again until the schedule ends, each session cut after a random
/// while by the subscriber itself (or by the server, with an error item).
pub async fn subscribe(ctx: Ctx, sub: SharedSubscriber, seed: u64) {
    let mut rng = Prng::new(seed);
    let http = sse_client();
    let (name, filter_w, initial_state) = {
        let s = sub.lock().unwrap();
        (s.name.clone(), s.filter_w, s.initial_state)
    };
    let filter = filter_w.map(|w| json!({"where": {"w": w}, "truncate": true}).to_string());
    while !ctx.stop.is_cancelled() && !ctx.trace.failed() {
        let Some(base) = ctx.server().await else {
            return;
        };
        let mut req = sse_get(&http, format!("{base}/v1/subscribe")).query(&[("table", "items")]);
        if initial_state {
            req = req.query(&[("initialState", "true")]);
        }
        if let Some(f) = &filter {
            req = req.query(&[("filter", f)]);
        }
        let r = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                // Refused before it began (the source reconnecting, the server stopping):
                // no session, nothing to check.
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                ctx.trace
                    .log(format!("{name}: subscribe answered {status}: {body}"));
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        {
            let mut s = sub.lock().unwrap();
            let rows = s.initial_state.then(|| {
                Replica::new(
                    name.clone(),
                    filter_w,
                    Base::Rows,
                    Duration::ZERO,
                    s.table.clone(),
                )
            });
            s.sessions.push(Session {
                rows,
                ..Session::default()
            });
        }
        let mut events = SseReader::new(r);
        let life = tokio::time::sleep(Duration::from_millis(rng.range(500, 15_000)));
        tokio::pin!(life);
        let ended = loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(ev) => {
                        let Some(item) = ev.json(&ctx, &name) else {
                            return;
                        };
                        if item["type"] == "error" {
                            break item["error"]["code"].as_str().unwrap_or("untyped error").to_owned();
                        }
                        let applied = sub.lock().unwrap().apply(&item);
                        if let Err(what) = applied {
                            ctx.trace.fail(&name, what);
                            return;
                        }
                    }
                    None => {
                        // Only a server that is gone may end a subscription without saying
                        // why (a SIGKILL takes its URL away before it strikes).
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if ctx.is_up(&base) {
                            ctx.trace.fail(&name, "the subscription ended without an error item, \
                                the server still up".into());
                            return;
                        }
                        break "connection closed (the server gone)".to_owned();
                    }
                },
                _ = &mut life, if !ctx.quiet.is_cancelled() => break "the subscriber left".to_owned(),
                _ = ctx.stop.cancelled() => return,
            }
        };
        drop(events);
        {
            let mut s = sub.lock().unwrap();
            let n = s.sessions.len() - 1;
            let session = s.sessions.last_mut().unwrap();
            ctx.trace.log(format!(
                "{name}: session {n} (from {:?}, {} transactions) ended: {ended}",
                session.from,
                session.txs.len()
            ));
            session.ended = Some(ended);
        }
        tokio::time::sleep(Duration::from_millis(rng.range(0, 2000))).await;
    }
}
