//! Ephemeral subscribers: `GET /v1/subscribe` over SSE, with or without a filter, which
//! disconnect at random and subscribe again. At most once, from now on: each session must
//! see, after its `initialized` marker, every selected transaction the event log holds
//! after the marker's position, in commit order, with no gap, until it ends, and it may end
//! only with a typed error item (or with the server it talked to gone). Half of them ask
//! for an initial state: such a session also rebuilds the table ([`Replica`]). A third
//! filter on `v` with `"transitions": true` (and an initial state): such a session
//! rebuilds the filtered set from the `appear` / `update` / `disappear` labels
//! ([`TransitionSet`]), each label checked against the old and new rows.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value as Json};

use super::consumers::Ctx;
use super::http::{sse_client, sse_get, SseReader};
use super::replica::{filled, Base, Replica};
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
    /// With transitions: the filtered set rebuilt from the labels.
    pub set: Option<TransitionSet>,
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
    /// A filter on `v` with transitions instead of one on `w`: (`gte`, else `lt`; the
    /// bound). Such sessions always start with the current rows.
    pub transitions: Option<(bool, i64)>,
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
        if let Some(set) = &mut session.set {
            return set.apply(item);
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
            // A transitions session is checked by its set (which log transactions touch
            // its rows depends on their values, not on the writer).
            if s.from.is_empty() || s.set.is_some() {
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
        if let Some(set) = &s.set {
            return (s.ended.is_none() && !set.caught_up(table)).then(|| {
                format!(
                    "session {} (transitions): {}",
                    self.sessions.len() - 1,
                    set.status(table)
                )
            });
        }
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
    let (name, filter_w, transitions) = {
        let s = sub.lock().unwrap();
        (s.name.clone(), s.filter_w, s.transitions)
    };
    let initial_state = sub.lock().unwrap().initial_state || transitions.is_some();
    let filter = match transitions {
        Some((gte, bound)) => Some(
            json!({"where": {"v": {if gte { "gte" } else { "lt" }: bound}},
                   "transitions": true, "truncate": true})
            .to_string(),
        ),
        None => filter_w.map(|w| json!({"where": {"w": w}, "truncate": true}).to_string()),
    };
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
            let set = transitions.map(|bound| TransitionSet::new(bound, s.table.clone()));
            let rows = (s.initial_state && set.is_none()).then(|| {
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
                set,
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

/// A subscription with `"transitions": true` on `v >= bound` (or `v < bound`): the set of
/// rows the filter selects, rebuilt from the initial state and the labels. Each label must
/// agree with the old and new rows (an `appear` comes from outside the set, ...), each old
/// row must be the copy's, and at the end the set must be the table's selected rows.
pub struct TransitionSet {
    gte: bool,
    bound: i64,
    rows: BTreeMap<i64, Json>,
    complete: bool,
    table: SharedTable,
}

impl TransitionSet {
    fn new((gte, bound): (bool, i64), table: SharedTable) -> TransitionSet {
        TransitionSet {
            gte,
            bound,
            rows: BTreeMap::new(),
            complete: false,
            table,
        }
    }

    fn selects(&self, row: &Json) -> Result<bool, String> {
        let v = row["v"]
            .as_i64()
            .ok_or_else(|| format!("a row without v: {row}"))?;
        Ok(if self.gte {
            v >= self.bound
        } else {
            v < self.bound
        })
    }

    fn id(row: &Json) -> Result<i64, String> {
        row["id"]
            .as_i64()
            .ok_or_else(|| format!("a row without id: {row}"))
    }

    /// `row` must be in the set as the copy has it.
    fn take(&mut self, row: &Json, item: &Json) -> Result<(), String> {
        let id = Self::id(row)?;
        match self.rows.remove(&id) {
            Some(have) if filled(&self.table, &have) == filled(&self.table, row) => Ok(()),
            Some(have) => Err(format!("the old row differs from the copy {have}: {item}")),
            None => Err(format!("row {id} is not in the set: {item}")),
        }
    }

    fn put(&mut self, row: &Json, item: &Json) -> Result<(), String> {
        if !self.selects(row)? {
            return Err(format!("a row outside the filter enters the set: {item}"));
        }
        if self.rows.insert(Self::id(row)?, row.clone()).is_some() {
            return Err(format!("a row the set has already enters it: {item}"));
        }
        Ok(())
    }

    fn apply(&mut self, item: &Json) -> Result<(), String> {
        match item["type"].as_str() {
            Some("initialized") | Some("schemaChange") => return Ok(()),
            Some("snapshotComplete") if !self.complete => {
                self.complete = true;
                return Ok(());
            }
            Some(_) => return Err(format!("unexpected item: {item}")),
            None => {}
        }
        let action = item["action"].as_str().unwrap_or_default();
        if action == "snapshot" {
            if self.complete {
                return Err(format!("a row after snapshotComplete: {item}"));
            }
            return self.put(&item["row"], item);
        }
        if !self.complete {
            return Err(format!("a change before snapshotComplete: {item}"));
        }
        let (before, after) = (&item["before"], &item["after"]);
        match (action, item["transition"].as_str()) {
            ("truncate", _) => self.rows.clear(),
            ("create", Some("appear")) => self.put(&item["created"], item)?,
            ("update", Some("appear")) if !self.selects(before)? => self.put(after, item)?,
            ("update", Some("update")) if self.selects(before)? => {
                self.take(before, item)?;
                self.put(after, item)?;
            }
            ("update", Some("disappear")) if !self.selects(after)? => self.take(before, item)?,
            ("delete", Some("disappear")) => self.take(&item["deleted"], item)?,
            _ => return Err(format!("a label that does not fit the rows: {item}")),
        }
        Ok(())
    }

    fn expected(&self, table: &BTreeMap<i64, Json>) -> BTreeMap<i64, Json> {
        table
            .iter()
            .filter(|(_, row)| self.selects(row).unwrap_or(false))
            .map(|(id, row)| (*id, filled(&self.table, row)))
            .collect()
    }

    fn got(&self) -> BTreeMap<i64, Json> {
        self.rows
            .iter()
            .map(|(id, row)| (*id, filled(&self.table, row)))
            .collect()
    }

    fn caught_up(&self, table: &BTreeMap<i64, Json>) -> bool {
        self.complete && self.got() == self.expected(table)
    }

    fn status(&self, table: &BTreeMap<i64, Json>) -> String {
        let (got, want) = (self.got(), self.expected(table));
        let missing: Vec<&i64> = want
            .keys()
            .filter(|id| !got.contains_key(id))
            .take(5)
            .collect();
        let extra: Vec<&i64> = got
            .keys()
            .filter(|id| !want.contains_key(id))
            .take(5)
            .collect();
        format!(
            "filter v {} {}: {} rows against {} in the table; missing {missing:?}, extra {extra:?}",
            if self.gte { ">=" } else { "<" },
            self.bound,
            got.len(),
            want.len()
        )
    }
}
