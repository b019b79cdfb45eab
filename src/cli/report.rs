//! Readable output for people: the summary of `waltap setup` and `waltap status` (what is
//! fine, what needs fixing and the SQL that fixes it) and the table of `waltap stream
//! list`. `--json` prints the reports these are made from instead; nothing here is meant
//! to be parsed.

use std::fmt::Write as _;

use crate::event::TableName;
use crate::log::leader::LeaderInfo;
use crate::log::streams::StreamInfo;
use crate::pg::quote_ident;
use crate::source::setup::{PublishedTable, SetupReport};

const OK: &str = "✓";
const FIX: &str = "!";

/// `schema.table` quoted for SQL.
fn sql_name(table: &str) -> String {
    let t = TableName::parse(table);
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table))
}

/// Bytes as `512 B`, `3.2 MB`.
fn bytes(n: i64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

/// Collects lines and counts what is fine and what needs fixing.
#[derive(Default)]
struct Summary {
    out: String,
    fine: usize,
    to_fix: usize,
}

impl Summary {
    fn heading(&mut self, text: &str) {
        let _ = writeln!(self.out, "\n{text}");
    }

    fn fine(&mut self, text: &str) {
        self.fine += 1;
        let _ = writeln!(self.out, "  {OK} {text}");
    }

    fn note(&mut self, text: &str) {
        let _ = writeln!(self.out, "    {text}");
    }

    /// A problem, and the statement or command that fixes it.
    fn fix(&mut self, text: &str, how: &str) {
        self.to_fix += 1;
        let _ = writeln!(self.out, "  {FIX} {text}");
        if !how.is_empty() {
            let _ = writeln!(self.out, "      fix: {how}");
        }
    }
}

/// What a table sends, and how to make it send whole rows.
fn table_line(s: &mut Summary, t: &PublishedTable) {
    let name = &t.table;
    let full = format!("ALTER TABLE {} REPLICA IDENTITY FULL;", sql_name(name));
    match t.identity.as_str() {
        "full" => s.fine(&format!("{name}: whole rows before and after each change")),
        "nothing" => s.fix(
            &format!("{name}: no replica identity: UPDATE and DELETE on it fail while it is published"),
            &full,
        ),
        "default" if !t.has_primary_key => s.fix(
            &format!("{name}: no primary key, so no replica identity: UPDATE and DELETE on it fail while it is published"),
            &format!("add a primary key, or {full}"),
        ),
        identity => s.fix(
            &format!("{name}: replica identity {identity}: updates carry no before image, deletes only the key"),
            &full,
        ),
    }
    if !t.can_select {
        s.fix(
            &format!("{name}: this role may not read it (initial state and export need SELECT)"),
            &format!("GRANT SELECT ON {} TO <role>;", sql_name(name)),
        );
    }
}

/// The summary of a setup or status report; `leader` when the status read the group.
pub fn summary(report: &SetupReport, leader: Option<&Option<LeaderInfo>>) -> String {
    let mut s = Summary::default();
    let version = report.server_version_num;
    let _ = writeln!(
        s.out,
        "database {:?} as role {:?} on PostgreSQL {}.{}",
        report.database,
        report.role,
        version / 10_000,
        version % 10_000
    );
    s.heading(&format!("Publication {:?}", report.publication));
    if report.publication_created {
        s.fine("created now");
    }
    if report.tables.is_empty() {
        s.fix(
            "it has no tables: no changes arrive until tables are added",
            &format!(
                "ALTER PUBLICATION {} ADD TABLE <schema.table>;",
                quote_ident(&report.publication)
            ),
        );
    }
    for t in &report.tables {
        table_line(&mut s, t);
    }
    match &report.slot {
        None => {}
        Some(slot) => {
            s.heading(&format!("Slot {:?}", slot.name));
            if report.slot_created {
                s.fine("created now");
            }
            match slot.active_pid {
                Some(pid) => s.fine(&format!("streaming (walsender pid {pid})")),
                None => s.fix(
                    "not streaming: no waltap run or serve reads it, and the server keeps its WAL meanwhile",
                    "start `waltap run` or `waltap serve` (or drop the slot: waltap setup --drop)",
                ),
            }
            match slot.wal_status.as_deref() {
                Some("reserved") | None => {}
                Some("extended") => s.fix(
                    "it holds more WAL than max_wal_size (wal_status extended)",
                    "let waltap catch up; check that it runs and keeps up",
                ),
                Some(other) => s.fix(
                    &format!(
                        "its WAL may be removed soon (wal_status {other}): changes would be lost"
                    ),
                    "let waltap catch up now, or raise max_slot_wal_keep_size",
                ),
            }
            let mut figures = Vec::new();
            if let Some(lag) = slot.lag_bytes {
                figures.push(format!("{} behind the server", bytes(lag)));
            }
            if let Some(kept) = slot.retained_bytes {
                figures.push(format!("{} of WAL retained", bytes(kept)));
            }
            if let Some(at) = &slot.confirmed_flush_lsn {
                figures.push(format!("confirmed up to {at}"));
            }
            if !figures.is_empty() {
                s.note(&figures.join(", "));
            }
        }
    }
    if let Some(leader) = leader {
        s.heading("Group");
        match leader {
            None => s.note("no member has led this slot yet (no waltap run or serve on it with this event log)"),
            Some(l) => {
                let who = l.member.as_deref().unwrap_or("an unnamed member");
                let since = l.since.as_deref().map(|t| format!(" since {t}")).unwrap_or_default();
                if l.active {
                    s.fine(&format!("leader {who}, term {}{since}", l.term));
                } else {
                    s.fix(
                        &format!("no member holds leadership now (the last was {who}, term {})", l.term),
                        "start `waltap run` or `waltap serve` for this slot",
                    );
                }
            }
        }
    }
    // Warnings the checks above do not already cover (a slot that is not a failover
    // slot, ...), as the checks worded them.
    let covered = ["REPLICA IDENTITY", "replica identity", "has no tables yet"];
    let other: Vec<&String> = report
        .warnings
        .iter()
        .filter(|w| !covered.iter().any(|c| w.contains(c)))
        .collect();
    if !other.is_empty() {
        s.heading("Warnings");
        for w in other {
            s.fix(w, "");
        }
    }
    let _ = write!(
        s.out,
        "\n{} fine, {} to fix{}",
        s.fine,
        s.to_fix,
        if s.to_fix == 0 {
            "\n"
        } else {
            " (see fix: above)\n"
        }
    );
    s.out
}

/// The streams as a table, one line each.
pub fn stream_table(streams: &[StreamInfo]) -> String {
    if streams.is_empty() {
        return "no streams\n".to_owned();
    }
    let header = [
        "NAME",
        "TABLES",
        "CURSOR",
        "BACKLOG",
        "HELD BY",
        "INITIAL STATE",
    ];
    let rows: Vec<[String; 6]> = streams
        .iter()
        .map(|s| {
            let initial = match &s.initial_state {
                None => "-".to_owned(),
                Some(i) if i.state == "ready" => {
                    format!("{} of {} rows acknowledged", i.acknowledged, i.rows)
                }
                Some(i) => i.state.to_owned(),
            };
            [
                s.name.clone(),
                s.tables.join(","),
                s.cursor.to_string(),
                format!("{}{}", s.backlog, if s.backlog_capped { "+" } else { "" }),
                s.lease
                    .as_ref()
                    .map_or("-".to_owned(), |l| l.holder.clone()),
                initial,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::source::setup::SlotState;

    fn report() -> SetupReport {
        SetupReport {
            server_version_num: 170_002,
            database: "app".into(),
            role: "waltap".into(),
            publication: "waltap".into(),
            publication_created: false,
            tables: vec![
                PublishedTable {
                    table: "public.orders".into(),
                    identity: "full".into(),
                    has_primary_key: true,
                    can_select: true,
                },
                PublishedTable {
                    table: "public.Users".into(),
                    identity: "default".into(),
                    has_primary_key: false,
                    can_select: false,
                },
            ],
            slot: Some(SlotState {
                name: "waltap".into(),
                active_pid: None,
                wal_status: Some("reserved".into()),
                confirmed_flush_lsn: Some("0/16B3748".into()),
                restart_lsn: Some("0/16B3700".into()),
                lag_bytes: Some(3 * 1024 * 1024),
                retained_bytes: Some(512),
            }),
            slot_created: false,
            warnings: vec![
                "tables without REPLICA IDENTITY FULL send ...".into(),
                "replication slot \"waltap\" exists but is not a failover slot: run ...".into(),
            ],
        }
    }

    #[test]
    fn the_summary_says_what_is_fine_and_how_to_fix_the_rest() {
        let text = summary(&report(), Some(&None));
        assert!(
            text.starts_with("database \"app\" as role \"waltap\" on PostgreSQL 17.2\n"),
            "{text}"
        );
        assert!(text.contains("  ✓ public.orders: whole rows"), "{text}");
        assert!(text.contains("fix: add a primary key, or ALTER TABLE \"public\".\"Users\" REPLICA IDENTITY FULL;"), "{text}");
        assert!(
            text.contains("fix: GRANT SELECT ON \"public\".\"Users\" TO <role>;"),
            "{text}"
        );
        assert!(text.contains("! not streaming"), "{text}");
        assert!(
            text.contains("3.0 MB behind the server, 512 B of WAL retained"),
            "{text}"
        );
        assert!(text.contains("no member has led this slot yet"), "{text}");
        // The failover warning is shown as it is; the identity one is covered above.
        assert!(text.contains("not a failover slot"), "{text}");
        assert!(!text.contains("send ..."), "{text}");
        assert!(
            text.ends_with("1 fine, 4 to fix (see fix: above)\n"),
            "{text}"
        );
    }

    #[test]
    fn stream_tables_align() {
        assert_eq!(stream_table(&[]), "no streams\n");
        let info = StreamInfo {
            name: "billing".into(),
            source: "waltap".into(),
            tables: vec!["public.orders".into()],
            filter: None,
            cursor: "0000000001000000-0000000003".parse().unwrap(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            lease: None,
            backlog: 12,
            backlog_capped: false,
            initial_state: None,
        };
        let text = stream_table(&[info]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("NAME     TABLES         CURSOR"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("billing  public.orders  0000000001000000-0000000003  12"),
            "{text}"
        );
        assert_eq!(lines[0].find("BACKLOG"), lines[1].find("12"));
    }
}
