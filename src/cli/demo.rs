//! `waltap demo`: try waltap in one command, with nothing to set up.
//!
//! Starts a throwaway PostgreSQL ([`crate::dev::localpg`]), creates a sample `orders` table,
//! listens to it with a [`Listener`], makes a few changes on an ordinary SQL connection
//! and prints each resulting event as a JSON line on stdout, exactly as `waltap tail`
//! would. Progress goes to stderr, so stdout stays pure JSON for `jq` and friends. The
//! cluster is stopped and removed before `run` returns, and by the localpg watchdog if
//! the process dies first.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;

use crate::dev::localpg::{LocalPg, LocalPgOptions};
use crate::event::{Action, TableName};
use crate::pg::config::SourceConfig;
use crate::source::pipeline::{Listener, ListenerConfig};

/// Generous: on a loaded machine an event takes milliseconds, so hitting this means
/// something is broken, not slow.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

const CREATE_TABLE: &str = "
    CREATE TABLE orders (
        id bigserial PRIMARY KEY,
        customer text NOT NULL,
        amount numeric(10,2) NOT NULL,
        status text NOT NULL,
        items jsonb NOT NULL,
        tags text[] NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now()
    );
    -- Whole old rows: updates show `before` and `changed`, deletes the full row.
    ALTER TABLE orders REPLICA IDENTITY FULL;
";

const CUSTOMERS: [&str; 5] = ["ada", "grace", "linus", "margaret", "ken"];

/// Events printed, by action.
#[derive(Default)]
struct Counts {
    created: u64,
    updated: u64,
    deleted: u64,
    /// stdout was closed early (e.g. `waltap demo | head -3`).
    stdout_closed: bool,
}

impl Counts {
    fn total(&self) -> u64 {
        self.created + self.updated + self.deleted
    }
}

/// Runs the demo with `orders` sample orders.
pub async fn run(orders: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("waltap demo: starting a throwaway PostgreSQL (initdb in a temp directory)...");
    let pg = tokio::task::spawn_blocking(|| LocalPg::start(&LocalPgOptions::default()))
        .await?
        .context("cannot start a local PostgreSQL for the demo")?;

    // On Ctrl-C or SIGTERM the demo future is dropped, which stops the listener; the
    // cluster is then removed below like on any other outcome.
    let outcome = tokio::select! {
        result = demo(&pg, orders) => result.map(Some),
        _ = crate::cli::shutdown_signal() => Ok(None),
    };
    // Stopping the server waits on pg_ctl: keep it off the async workers.
    let removed = tokio::task::spawn_blocking(move || drop(pg)).await;

    let counts = outcome?;
    removed?;
    let secs = started.elapsed().as_secs_f64();
    match counts {
        Some(c) => eprintln!(
            "waltap demo: {} events ({} created, {} updated, {} deleted) in {secs:.1}s{}; \
             PostgreSQL stopped and removed",
            c.total(),
            c.created,
            c.updated,
            c.deleted,
            if c.stdout_closed {
                " (stdout closed early)"
            } else {
                ""
            },
        ),
        None => eprintln!("waltap demo: interrupted; PostgreSQL stopped and removed"),
    }
    Ok(())
}

async fn demo(pg: &LocalPg, orders: u32) -> anyhow::Result<Counts> {
    let url = pg.url("postgres");
    let source = SourceConfig::parse(&url)?;
    let mut sql = source
        .connect_sql()
        .await
        .with_context(|| format!("connecting to the demo PostgreSQL at {url}"))?;
    let version: String = sql.query_one("SHOW server_version", &[]).await?.get(0);
    eprintln!(
        "waltap demo: PostgreSQL {version} running at {url} (data in {})",
        pg.data_dir().display()
    );
    sql.batch_execute(CREATE_TABLE)
        .await
        .context("creating the sample table")?;

    let mut config = ListenerConfig::new(source);
    config.tables = vec![TableName::parse("public.orders")];
    let (slot, publication) = (config.slot.clone(), config.publication.clone());
    let mut listener = Listener::start(config).await?;
    let plan = if orders == 0 {
        "no orders to write (--orders 0)".to_string()
    } else {
        format!(
            "writing {orders} orders, paying them in one annotated transaction, deleting the last"
        )
    };
    eprintln!("waltap demo: listening on slot {slot:?}, publication {publication:?}; {plan}");

    let expected = write_changes(&mut sql, orders).await?;
    let counts = print_events(&mut listener, expected).await;
    listener.shutdown().await;
    counts
}

/// Makes the sample changes; returns how many events they produce.
async fn write_changes(sql: &mut tokio_postgres::Client, orders: u32) -> anyhow::Result<u64> {
    let mut expected = 0;
    // One transaction per order, as an application would write them.
    let insert = sql
        .prepare(
            "INSERT INTO orders (customer, amount, status, items, tags)
             VALUES ($1, $2::text::numeric, 'new', $3::text::jsonb, $4)",
        )
        .await?;
    for i in 0..u64::from(orders) {
        let customer = CUSTOMERS[i as usize % CUSTOMERS.len()];
        let amount = format!("{}.{:02}", 10 + (i * 7) % 90, (i * 37 + 99) % 100);
        let items = serde_json::json!([
            { "sku": format!("SKU-{:03}", 100 + i % 900), "qty": 1 + i % 3 },
        ])
        .to_string();
        let tags: Vec<&str> = if i % 2 == 0 {
            vec!["new-customer"]
        } else {
            vec!["gift", "express"]
        };
        expected += sql
            .execute(&insert, &[&customer, &amount, &items, &tags])
            .await
            .with_context(|| format!("inserting order {}", i + 1))?;
    }

    // The message is transactional, so it becomes `tx.annotations` on every event of
    // this transaction: who made the change and why.
    let tx = sql.transaction().await?;
    tx.execute(
        "SELECT pg_logical_emit_message(true, 'waltap', $1::text)",
        &[&r#"{"user":"demo","reason":"payment received"}"#],
    )
    .await
    .context("annotating the payment transaction")?;
    expected += tx
        .execute(
            "UPDATE orders SET status = 'paid' WHERE status = 'new'",
            &[],
        )
        .await
        .context("paying the orders")?;
    tx.commit().await?;

    expected += sql
        .execute(
            "DELETE FROM orders WHERE id = (SELECT max(id) FROM orders)",
            &[],
        )
        .await
        .context("deleting an order")?;
    Ok(expected)
}

/// Prints and acknowledges events until `expected` have arrived.
async fn print_events(listener: &mut Listener, expected: u64) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let stdout = std::io::stdout();
    while counts.total() < expected {
        let got = counts.total();
        let next = tokio::time::timeout(EVENT_TIMEOUT, listener.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "no event from the listener within {}s ({got} of {expected} received)",
                    EVENT_TIMEOUT.as_secs()
                )
            })?;
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                let failed = format!("the listener failed after {got} of {expected} events");
                return Err(anyhow::Error::new(e).context(failed));
            }
            None => bail!("the listener stopped after {got} of {expected} events"),
        };
        let mut out = stdout.lock();
        let written = serde_json::to_writer(&mut out, &event)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                counts.stdout_closed = true;
                return Ok(counts);
            }
            Err(e) => bail!("writing to stdout: {e}"),
        }
        listener.ack(event.position);
        match event.action {
            Action::Create => counts.created += 1,
            Action::Update => counts.updated += 1,
            Action::Delete => counts.deleted += 1,
            Action::Truncate => bail!("unexpected truncate event: the demo truncates nothing"),
        }
    }
    Ok(counts)
}
