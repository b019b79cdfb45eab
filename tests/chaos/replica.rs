//! The model of one consumer: the table rebuilt from what it was given, and the
//! transactions it saw, checked item by item as they arrive and against the writers'
//! record at the end.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value as Json;

use super::writer::{Change, Record, SharedTable};

/// Where a consumer's view of the table starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    /// Before the first write: the table was empty, every transaction must arrive.
    Empty,
    /// Initial-state rows (or an export's), then the changes after them: the rebuilt table
    /// must equal the real one.
    Rows,
    /// "From now on": only the changes after some point; nothing to compare rows with
    /// until the consumer sees a row's change.
    Now,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading initial-state rows; `snapshotComplete` ends them.
    Rows,
    Changes,
}

pub struct Replica {
    pub name: String,
    /// Only rows of this writer pass the consumer's filter.
    pub filter_w: Option<i32>,
    base: Base,
    phase: Phase,
    rows: BTreeMap<i64, Json>,
    last_seq: Option<u64>,
    last_position: Option<String>,
    /// An at-least-once consumer came back: items up to what it already had are skipped
    /// once, until the first new one.
    resumed: bool,
    /// Transactions in the order seen: xid and changes.
    pub txs: Vec<(u32, Vec<Change>)>,
    /// The position of each of `txs`' first change.
    positions: Vec<String>,
    /// Index into `txs` where the current base began (changes before a reset do not count).
    txs_from: usize,
    pub items: u64,
    /// What the consumer last did, for reports (e.g. the cursor it passed).
    pub note: String,
    created_at: Duration,
    /// The columns DDL added: a row that lacks one reads its default.
    table: SharedTable,
}

impl Replica {
    /// `created_at`: when the stream was made, on the schedule's clock.
    pub fn new(
        name: String,
        filter_w: Option<i32>,
        base: Base,
        created_at: Duration,
        table: SharedTable,
    ) -> Replica {
        Replica {
            name,
            filter_w,
            base,
            phase: if base == Base::Rows {
                Phase::Rows
            } else {
                Phase::Changes
            },
            rows: BTreeMap::new(),
            last_seq: None,
            last_position: None,
            resumed: false,
            txs: Vec::new(),
            positions: Vec::new(),
            txs_from: 0,
            items: 0,
            note: String::new(),
            created_at,
            table,
        }
    }

    /// The transactions seen since the start or the last reset, with their positions.
    pub fn transactions(&self) -> Vec<super::subscribers::LogTx> {
        self.txs[self.txs_from..]
            .iter()
            .zip(&self.positions[self.txs_from..])
            .map(|((xid, changes), p)| (*xid, p.clone(), changes.clone()))
            .collect()
    }

    /// The stream starts over from the current rows (`reset` with initial state).
    pub fn restart_with_rows(&mut self) {
        self.base = Base::Rows;
        self.phase = Phase::Rows;
        self.rows.clear();
        self.last_seq = None;
        self.last_position = None;
        self.resumed = false;
        self.txs_from = self.txs.len();
    }

    /// Whether the initial state's rows are all in (`snapshotComplete` seen), or there
    /// were none to wait for.
    pub fn has_rows_phase_ended(&self) -> bool {
        self.phase == Phase::Changes
    }

    /// The consumer reconnects after items it may not have acknowledged.
    pub fn resume(&mut self) {
        self.resumed = true;
    }

    /// Checks one item and applies it.
    pub fn apply(&mut self, item: &Json) -> Result<(), String> {
        self.items += 1;
        match item["type"].as_str() {
            Some("initialized") => return Ok(()),
            Some("snapshotComplete") => {
                if self.phase != Phase::Rows {
                    if self.resumed {
                        return Ok(());
                    }
                    return Err(format!(
                        "snapshotComplete outside an initial state (a second marker?): {item}"
                    ));
                }
                self.phase = Phase::Changes;
                self.last_position = item["position"].as_str().map(str::to_owned);
                return Ok(());
            }
            // A column was added (the schedule's DDL): the control item comes before the
            // first event of the new shape and must describe the harness's table.
            Some("schemaChange") => {
                if item["table"] != "items" || !item["columns"].is_array() {
                    return Err(format!(
                        "schemaChange for another table or without columns: {item}"
                    ));
                }
                return Ok(());
            }
            Some(other) => return Err(format!("unexpected item type {other:?}: {item}")),
            None => {}
        }
        if item["action"] == "snapshot" {
            return self.apply_row(item);
        }
        let position = item["position"]
            .as_str()
            .ok_or_else(|| format!("change without a position: {item}"))?
            .to_owned();
        if self.phase != Phase::Changes {
            return Err(format!("a change before snapshotComplete: {item}"));
        }
        if self
            .last_position
            .as_ref()
            .is_some_and(|last| position <= *last)
        {
            if self.resumed {
                return Ok(());
            }
            return Err(format!(
                "position {position} not after the previous {:?} (repeated or out of order): {item}",
                self.last_position
            ));
        }
        self.resumed = false;
        self.last_position = Some(position.clone());
        let xid = item["tx"]["id"]
            .as_u64()
            .ok_or_else(|| format!("change without tx.id: {item}"))? as u32;
        let change = self.apply_change(item)?;
        let since_reset = self.txs.len() > self.txs_from;
        match self.txs.last_mut() {
            Some((last, changes)) if *last == xid && since_reset => changes.push(change),
            _ => {
                self.txs.push((xid, vec![change]));
                self.positions.push(position);
            }
        }
        Ok(())
    }

    fn apply_row(&mut self, item: &Json) -> Result<(), String> {
        if self.phase != Phase::Rows {
            if self.resumed {
                return Ok(());
            }
            return Err(format!(
                "an initial-state row after snapshotComplete (re-delivered?): {item}"
            ));
        }
        if let Some(seq) = item["seq"].as_u64() {
            if self.last_seq.is_some_and(|last| seq <= last) {
                if self.resumed {
                    return Ok(());
                }
                return Err(format!(
                    "row seq {seq} not after the previous {:?}: {item}",
                    self.last_seq
                ));
            }
            self.last_seq = Some(seq);
        }
        self.resumed = false;
        let row = item["row"].clone();
        self.check_filter(&row, item)?;
        let id = id_of(&row, item)?;
        if self.rows.insert(id, row).is_some() {
            return Err(format!("initial-state row {id} delivered twice: {item}"));
        }
        Ok(())
    }

    fn apply_change(&mut self, item: &Json) -> Result<Change, String> {
        let strict = self.base != Base::Now;
        match item["action"].as_str() {
            Some("create") => {
                let row = &item["created"];
                self.check_filter(row, item)?;
                let id = id_of(row, item)?;
                if self.rows.insert(id, row.clone()).is_some() {
                    return Err(format!(
                        "create of row {id}, which the consumer has: {item}"
                    ));
                }
                Ok(("create", id as i32))
            }
            Some("update") => {
                let (before, after) = (&item["before"], &item["after"]);
                self.check_filter(after, item)?;
                let old = id_of(before, item)?;
                self.matches(old, before, strict, item)?;
                self.rows.remove(&old);
                let new = id_of(after, item)?;
                if self.rows.insert(new, after.clone()).is_some() {
                    return Err(format!("update onto row {new}, which exists: {item}"));
                }
                Ok(("update", new as i32))
            }
            Some("truncate") => {
                self.rows.clear();
                Ok(("truncate", 0))
            }
            Some("delete") => {
                let row = &item["deleted"];
                self.check_filter(row, item)?;
                let id = id_of(row, item)?;
                self.matches(id, row, strict, item)?;
                self.rows.remove(&id);
                Ok(("delete", id as i32))
            }
            other => Err(format!("unexpected action {other:?}: {item}")),
        }
    }

    /// The old row an update or delete names must be the one the consumer has.
    fn matches(&self, id: i64, old: &Json, strict: bool, item: &Json) -> Result<(), String> {
        match self.rows.get(&id) {
            Some(have) if self.filled(have) == self.filled(old) => Ok(()),
            Some(have) => Err(format!(
                "the old row differs from the consumer's copy {have} (a change lost or doubled): {item}"
            )),
            None if strict => Err(format!(
                "a change of row {id}, which the consumer does not have (a create lost?): {item}"
            )),
            None => Ok(()),
        }
    }

    /// `row` with every column DDL added that it lacks, at its default: a row the consumer
    /// got before an `ADD COLUMN` reads the default afterwards.
    fn filled(&self, row: &Json) -> Json {
        filled(&self.table, row)
    }

    fn check_filter(&self, row: &Json, item: &Json) -> Result<(), String> {
        match self.filter_w {
            Some(w) if row["w"].as_i64() != Some(w as i64) => {
                Err(format!("a row the filter w = {w} excludes: {item}"))
            }
            _ => Ok(()),
        }
    }

    /// Where the consumer is, for a report.
    pub fn status(&self, table: &BTreeMap<i64, Json>) -> String {
        let rows_check = match self.base {
            Base::Rows => self.check_rows(table).err().unwrap_or_default(),
            _ => String::new(),
        };
        format!(
            "{rows_check}; {} items; {:?} phase, {} rows, last seq {:?}, last position {:?}, {} transactions \
             since the start or reset; {}",
            self.items,
            self.phase,
            self.rows.len(),
            self.last_seq,
            self.last_position,
            self.txs.len() - self.txs_from,
            self.note
        )
    }

    /// True once the consumer is where the writers stopped: with rows to start from, it
    /// has the table (`table`, which no longer changes); otherwise it has the last
    /// transaction of every writer it selects that committed after the stream was made.
    pub fn caught_up(&self, records: &[Record], table: &BTreeMap<i64, Json>) -> bool {
        if self.base == Base::Rows {
            return self.phase == Phase::Changes && self.check_rows(table).is_ok();
        }
        let seen: HashMap<u32, ()> = self.txs[self.txs_from..]
            .iter()
            .map(|(x, _)| (*x, ()))
            .collect();
        records.iter().enumerate().all(|(w, r)| {
            !self.selects(w, records.len())
                || r.committed
                    .last()
                    .is_none_or(|last| seen.contains_key(&last.xid) || last.at < self.created_at)
        })
    }

    /// Whether the consumer gets record `w`'s transactions: the last record is the
    /// schedule's truncates, which every filter selects (`"truncate": true`).
    fn selects(&self, w: usize, records: usize) -> bool {
        w + 1 == records || self.filter_w.is_none_or(|f| f as usize == w)
    }

    /// The final check: every selected transaction after the start, once, in each writer's
    /// commit order, with exactly its changes; and the rebuilt table equals `table`.
    pub fn verify(&self, records: &[Record], table: &BTreeMap<i64, Json>) -> Result<(), String> {
        self.check_transactions(records, true)?;
        self.check_rows(table)
    }

    /// Every selected transaction once, in each writer's commit order, with exactly its
    /// changes; `complete`: through each writer's last.
    pub fn check_transactions(&self, records: &[Record], complete: bool) -> Result<(), String> {
        let mut index = HashMap::new();
        for (w, r) in records.iter().enumerate() {
            for (i, t) in r.committed.iter().enumerate() {
                index.insert(t.xid, (w, i));
            }
        }
        let rolled_back: HashMap<u32, usize> = records
            .iter()
            .enumerate()
            .flat_map(|(w, r)| r.rolled_back.iter().map(move |x| (*x, w)))
            .collect();
        let mut next: Vec<Option<usize>> = vec![None; records.len()];
        if self.base == Base::Empty {
            next = vec![Some(0); records.len()];
        }
        for (xid, changes) in &self.txs[self.txs_from..] {
            let Some(&(w, i)) = index.get(xid) else {
                let what = if rolled_back.contains_key(xid) {
                    "rolled back"
                } else {
                    "not committed by any writer"
                };
                return Err(format!("transaction {xid} is {what}, yet delivered"));
            };
            if !self.selects(w, records.len()) {
                return Err(format!("transaction {xid} of writer {w} passed the filter"));
            }
            let t = &records[w].committed[i];
            match next[w] {
                Some(n) if i < n => {
                    return Err(format!(
                        "transaction {xid} (writer {w} #{i}) delivered again after #{}",
                        n - 1
                    ))
                }
                Some(n) if i > n => {
                    let lost = &records[w].committed[n];
                    return Err(format!(
                        "writer {w}'s transaction #{n} (xid {}, {}, committed at {:?}, {} changes) \
                         is missing: the consumer went from #{} to #{i} (xid {xid})",
                        lost.xid,
                        lost.shape,
                        lost.at,
                        lost.changes.len(),
                        n as i64 - 1
                    ));
                }
                _ => {}
            }
            next[w] = Some(i + 1);
            let (mut got, mut want) = (changes.clone(), t.changes.clone());
            got.sort_unstable();
            want.sort_unstable();
            if got != want {
                return Err(format!(
                    "transaction {xid} (writer {w} #{i}, {}): delivered {}, committed {}",
                    t.shape,
                    summary(changes),
                    summary(&t.changes)
                ));
            }
        }
        for (w, r) in records.iter().enumerate() {
            if let (Some(n), true) = (next[w], complete && self.selects(w, records.len())) {
                if n != r.committed.len() {
                    return Err(format!(
                        "writer {w}: the consumer stopped at #{n} of {}",
                        r.committed.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The rebuilt table equals `table` (for consumers with rows to start from).
    fn check_rows(&self, table: &BTreeMap<i64, Json>) -> Result<(), String> {
        if self.base == Base::Now {
            return Ok(());
        }
        let want: BTreeMap<i64, Json> = table
            .iter()
            .filter(|(_, row)| {
                self.filter_w
                    .is_none_or(|w| row["w"].as_i64() == Some(w as i64))
            })
            .map(|(id, row)| (*id, self.filled(row)))
            .collect();
        let have: BTreeMap<i64, Json> = self
            .rows
            .iter()
            .map(|(id, row)| (*id, self.filled(row)))
            .collect();
        if want != have {
            let missing: Vec<_> = want
                .keys()
                .filter(|k| !have.contains_key(k))
                .take(5)
                .collect();
            let extra: Vec<_> = have
                .keys()
                .filter(|k| !want.contains_key(k))
                .take(5)
                .collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| have.get(k).is_some_and(|h| h != *v))
                .take(3)
                .map(|(k, v)| format!("{k}: table {v}, consumer {}", have[k]))
                .collect();
            return Err(format!(
                "the rebuilt table differs: {} rows vs {} in the table; missing {missing:?}, \
                 extra {extra:?}, different {differ:?}",
                have.len(),
                want.len()
            ));
        }
        if self.phase != Phase::Changes {
            return Err("every row, but no snapshotComplete".into());
        }
        Ok(())
    }
}

fn id_of(row: &Json, item: &Json) -> Result<i64, String> {
    row["id"]
        .as_i64()
        .ok_or_else(|| format!("row without id: {item}"))
}

/// Counts per action, and the first and last change: enough to see what a transaction lost.
fn summary(changes: &[Change]) -> String {
    let count = |a: &str| changes.iter().filter(|c| c.0 == a).count();
    format!(
        "{} changes ({} creates, {} updates, {} deletes; first {:?}, last {:?})",
        changes.len(),
        count("create"),
        count("update"),
        count("delete"),
        changes.first(),
        changes.last()
    )
}

/// `row` with every column DDL added to `table` that it lacks, at its default.
pub fn filled(table: &SharedTable, row: &Json) -> Json {
    let mut row = row.clone();
    if let Some(map) = row.as_object_mut() {
        for (name, default) in table.added.lock().unwrap().iter() {
            map.entry(name.clone()).or_insert_with(|| default.clone());
        }
    }
    row
}
