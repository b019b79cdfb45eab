//! What the benchmark writes: the catch-up workload (inserts, updates and deletes on a
//! table of mixed column types) and the paced single-row commits of the latency test.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::time::MissedTickBehavior;
use tokio_postgres::Client;

use crate::Identity;

/// Rows per insert transaction, single-row updates per transaction, rows per delete
/// transaction.
pub const INSERTS_PER_TX: u64 = 1000;
pub const UPDATES_PER_TX: u64 = 10;
pub const DELETES_PER_TX: u64 = 100;

pub const TABLE: &str = "bench_rows";
pub const LATENCY_TABLE: &str = "bench_latency";

/// How a number of row changes splits into updates (3/10), deletes (1/5) and inserts (the
/// rest, 1/2). Inserts outnumber updates and deletes together, so updates and deletes
/// never touch the same row or miss one: every change is exactly one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

impl Shape {
    pub fn new(changes: u64) -> Shape {
        let updates = changes * 3 / 10;
        let deletes = changes / 5;
        Shape {
            inserts: changes - updates - deletes,
            updates,
            deletes,
        }
    }

    pub fn changes(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }
}

/// The catch-up table: one column of each common type, an int8 key.
pub fn create_table_sql(identity: Identity) -> String {
    let identity = match identity {
        Identity::Full => "FULL",
        _ => "DEFAULT",
    };
    format!(
        "CREATE TABLE {TABLE} (
            id int8 PRIMARY KEY,
            qty int4 NOT NULL,
            label text NOT NULL,
            price numeric(12,2) NOT NULL,
            updated_at timestamptz NOT NULL,
            attrs jsonb NOT NULL,
            active bool NOT NULL
        );
        ALTER TABLE {TABLE} REPLICA IDENTITY {identity};"
    )
}

/// Inserts, then updates, then deletes, each in transactions of the fixed sizes above.
/// Updates touch the first rows and deletes remove the last, so no change is a no-op.
pub async fn run(client: &Client, shape: Shape) -> anyhow::Result<()> {
    let insert = client
        .prepare(&format!(
            "INSERT INTO {TABLE} (id, qty, label, price, updated_at, attrs, active)
             SELECT g, (g % 1000)::int4, 'item ' || g || ' ' || md5(g::text),
                    round((g % 100000) / 100.0, 2),
                    timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second',
                    jsonb_build_object('sku', 'S-' || g, 'tags', jsonb_build_array('red', 'xl'),
                                       'weight', g % 50),
                    g % 2 = 0
             FROM generate_series($1::int8, $2::int8) AS g"
        ))
        .await?;
    for (first, last) in batches(1, shape.inserts, INSERTS_PER_TX) {
        client
            .execute(&insert, &[&first, &last])
            .await
            .context("inserting")?;
    }
    // One simple-query round trip per transaction, as an application would batch it.
    for (first, last) in batches(1, shape.updates, UPDATES_PER_TX) {
        let updates: String = (first..=last)
            .map(|id| {
                format!(
                    "UPDATE {TABLE} SET qty = qty + 1, price = price + 0.01, \
                     updated_at = now(), active = NOT active WHERE id = {id};"
                )
            })
            .collect();
        client
            .batch_execute(&format!("BEGIN;{updates}COMMIT;"))
            .await
            .context("updating")?;
    }
    let first_deleted = shape.inserts - shape.deletes + 1;
    for (first, last) in batches(first_deleted, shape.deletes, DELETES_PER_TX) {
        client
            .execute(
                &format!("DELETE FROM {TABLE} WHERE id BETWEEN $1 AND $2"),
                &[&first, &last],
            )
            .await
            .context("deleting")?;
    }
    Ok(())
}

/// Inclusive id ranges of at most `per` ids covering `count` ids from `start`.
fn batches(start: u64, count: u64, per: u64) -> impl Iterator<Item = (i64, i64)> {
    let end = start + count;
    (start..end)
        .step_by(per as usize)
        .map(move |first| (first as i64, ((first + per).min(end) - 1) as i64))
}

/// The latency table: the insert time comes from the server's clock at insert.
pub fn create_latency_table_sql() -> String {
    format!(
        "CREATE TABLE {LATENCY_TABLE} (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT clock_timestamp()
        )"
    )
}

/// What the paced writer managed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Paced {
    pub rows: u64,
    pub secs: f64,
}

/// Single-row commits at `rate` per second for `duration`. A commit that takes longer
/// than its slot skips the slots it missed rather than bursting to catch up, so commits
/// stay spaced and the achieved rate is reported instead.
pub async fn write_paced(client: &Client, rate: u32, duration: Duration) -> anyhow::Result<Paced> {
    let insert = client
        .prepare(&format!("INSERT INTO {LATENCY_TABLE} DEFAULT VALUES"))
        .await?;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut rows = 0;
    while start.elapsed() < duration {
        ticks.tick().await;
        client
            .execute(&insert, &[])
            .await
            .context("latency insert")?;
        rows += 1;
    }
    Ok(Paced {
        rows,
        secs: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_adds_up_to_the_changes() {
        let s = Shape::new(100_000);
        assert_eq!((s.inserts, s.updates, s.deletes), (50_000, 30_000, 20_000));
        for n in [0, 1, 3, 7, 2001, 99_999] {
            let s = Shape::new(n);
            assert_eq!(s.changes(), n);
            assert!(s.updates + s.deletes <= s.inserts);
        }
    }

    #[test]
    fn batches_cover_the_range_exactly() {
        let b: Vec<_> = batches(1, 2500, 1000).collect();
        assert_eq!(b, [(1, 1000), (1001, 2000), (2001, 2500)]);
        assert_eq!(batches(5, 0, 10).count(), 0);
    }
}
