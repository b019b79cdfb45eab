//! The Postgres event log.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

use super::standby::StandbyWait;
use super::{LogWriter, StoreError, MIGRATIONS};
use crate::event::Event;
use crate::lsn::{LogMark, Lsn};
use crate::pg::config::SourceConfig;

/// The channel on which appends are announced; the payload is the source name.
pub const NOTIFY_CHANNEL: &str = "waltap_events";

/// The `application_name` of a group leader's appending session for `source`: short
/// enough for Postgres' 63 bytes whatever the slot's name.
pub fn appender_name(source: &str) -> String {
    let (_, key) = super::leader::lock_key(source);
    format!("waltap appender {:08x}", key as u32)
}

/// An event log in a Postgres database (the watched one by default).
///
/// Appends are pipelined one chunk deep: [`LogWriter::write`] sends a chunk's INSERT and
/// returns, so the next chunk is read and serialized while the server stores this one;
/// the next write, and every commit, first waits for it. All of a batch's statements run
/// in order on one connection inside one transaction, so a failure of any of them rolls
/// the whole batch back and nothing is confirmed past it.
pub struct PgLog {
    client: Arc<Client>,
    source: String,
    in_batch: bool,
    /// The leadership term this log appends under (see [`PgLog::fence`]).
    term: Option<i64>,
    /// The store server's failover standbys, once read ([`PgLog::watch_standbys`]).
    standbys: Option<StandbyWait>,
    /// The append statement, prepared on first use.
    insert: Option<Statement>,
    /// Column buffers for the next chunk, reused so that a batch costs no allocation per
    /// event beyond its JSON text.
    spare: Columns,
    /// The chunk whose INSERT was sent and not yet answered; its buffers come back with
    /// the answer.
    pending: Option<JoinHandle<(Columns, Result<u64, tokio_postgres::Error>)>>,
}

/// One chunk of events as the INSERT's parameter arrays.
#[derive(Default)]
struct Columns {
    lsns: Vec<i64>,
    ordinals: Vec<i32>,
    schemas: Vec<String>,
    tables: Vec<String>,
    lasts: Vec<bool>,
    bodies: Vec<String>,
}

impl Columns {
    fn clear(&mut self) {
        self.lsns.clear();
        self.ordinals.clear();
        self.schemas.clear();
        self.tables.clear();
        self.lasts.clear();
        self.bodies.clear();
    }
}

const INSERT: &str = "INSERT INTO waltap.events
                          (source, commit_lsn, ordinal, schema_name, table_name, tx_last, event)
                      SELECT $1, l, o, s, t, x, e::json
                      FROM unnest($2::int8[], $3::int4[], $4::text[], $5::text[], $6::bool[], $7::text[])
                           AS u(l, o, s, t, x, e)";

/// The SHA-256 of a migration's SQL, in hex: recorded when it is applied, so that an
/// applied migration edited afterwards is noticed instead of silently skipped.
fn migration_checksum(sql: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies the migrations that are not yet recorded, under an advisory lock so that
/// concurrent processes do not race, and refuses to run on a log whose applied
/// migrations differ from this waltap's ([`StoreError::MigrationChanged`]).
pub async fn migrate(client: &Client) -> Result<(), StoreError> {
    // Nearly always every migration is applied already: one read says so, instead of a
    // locked transaction and a query per migration on every call.
    if up_to_date(client).await {
        return Ok(());
    }
    // Under the lock too: two processes creating the schema at once would otherwise
    // collide on its name. Quiet: every member runs this at each start and takeover, and
    // "already exists, skipping" notices would fill its log.
    let created = client
        .batch_execute(
            "BEGIN;
             SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock(7272727272);
             CREATE SCHEMA IF NOT EXISTS waltap;
             CREATE TABLE IF NOT EXISTS waltap.migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());
             ALTER TABLE waltap.migrations ADD COLUMN IF NOT EXISTS checksum text;
             COMMIT;",
        )
        .await;
    if let Err(e) = created {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(StoreError::Sql {
            operation: "create the migrations table",
            source: e,
        });
    }
    for (version, sql) in MIGRATIONS {
        let checksum = migration_checksum(sql);
        let applied = client
            .query_opt(
                "SELECT checksum FROM waltap.migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(StoreError::sql("read applied migrations"))?;
        match applied.map(|row| row.get::<_, Option<String>>(0)) {
            Some(Some(recorded)) if recorded == checksum => continue,
            Some(Some(recorded)) => {
                return Err(StoreError::MigrationChanged {
                    version: *version,
                    recorded,
                    current: checksum,
                })
            }
            // Applied by a waltap that kept no checksums: this text is taken as what
            // was applied (the migrations were never edited before checksums existed).
            Some(None) => {
                client
                    .execute(
                        "UPDATE waltap.migrations SET checksum = $2
                         WHERE version = $1 AND checksum IS NULL",
                        &[version, &checksum],
                    )
                    .await
                    .map_err(StoreError::sql("record a migration's checksum"))?;
                continue;
            }
            None => {}
        }
        // Explicit BEGIN/COMMIT: one migration and its record commit together.
        let script = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7272727272);
             {sql}
             INSERT INTO waltap.migrations (version, checksum) VALUES ({version}, '{checksum}')
                 ON CONFLICT DO NOTHING;
             COMMIT;"
        );
        if let Err(e) = client.batch_execute(&script).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(StoreError::Sql {
                operation: "apply a migration",
                source: e,
            });
        }
        tracing::info!(version, "event log migration applied");
    }
    Ok(())
}

impl PgLog {
    /// Connects to the store, applies migrations, and writes for `source` (the slot name).
    pub async fn open(store: &SourceConfig, source: &str) -> Result<PgLog, StoreError> {
        let client = store.connect_sql().await?;
        migrate(&client).await?;
        Ok(PgLog {
            client: Arc::new(client),
            source: source.to_owned(),
            in_batch: false,
            term: None,
            standbys: None,
            insert: None,
            spare: Columns::default(),
            pending: None,
        })
    }

    /// Reads the store server's failover standbys (`synchronized_standby_slots`): from now
    /// on [`LogWriter::replicated`] waits until they flushed each commit. Returns whether
    /// there are any.
    pub(crate) async fn watch_standbys(&mut self) -> Result<bool, StoreError> {
        let standbys = StandbyWait::read(&self.client).await?;
        let any = !standbys.is_empty();
        self.standbys = Some(standbys);
        Ok(any)
    }

    /// Records the publication the source is read through (see
    /// the initial-state copy). A source without progress gets a mark before
    /// everything.
    pub async fn record_publication(&mut self, publication: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "INSERT INTO waltap.progress (source, commit_lsn, publication) VALUES ($1, 0, $2)
                 ON CONFLICT (source) DO UPDATE SET publication = excluded.publication",
                &[&self.source, &publication],
            )
            .await
            .map_err(StoreError::sql("record the source's publication"))?;
        Ok(())
    }

    /// Appends only while `term` is the source's current leadership term: each commit
    /// checks it on the progress row, inside its transaction, and fails with
    /// [`StoreError::Fenced`] once another member took over. The session is named
    /// `application_name` `waltap appender <key>` of the source, so that the next leader can end it should this
    /// process be paused or cut off with a transaction open; as a last resort, Postgres
    /// ends a store transaction left idle longer than `idle_limit`.
    pub async fn fence(
        &mut self,
        term: i64,
        idle_limit: std::time::Duration,
    ) -> Result<(), StoreError> {
        let ms = idle_limit
            .as_millis()
            .clamp(1, i32::MAX as u128)
            .to_string();
        self.client
            .execute(
                "SELECT set_config('idle_in_transaction_session_timeout', $1, false),
                        set_config('application_name', $2, false)",
                &[&ms, &appender_name(&self.source)],
            )
            .await
            .map_err(StoreError::sql("limit idle transactions"))?;
        self.term = Some(term);
        Ok(())
    }

    /// The underlying connection, for reads.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Whether every migration is recorded with this waltap's checksum (false when unsure:
/// the full check then decides).
async fn up_to_date(client: &Client) -> bool {
    let Ok(rows) = client
        .query("SELECT version, checksum FROM waltap.migrations", &[])
        .await
    else {
        return false;
    };
    MIGRATIONS.iter().all(|(version, sql)| {
        let checksum = migration_checksum(sql);
        rows.iter().any(|r| {
            r.get::<_, i32>(0) == *version
                && r.get::<_, Option<String>>(1).as_deref() == Some(checksum.as_str())
        })
    })
}

/// The progress mark of `source`'s log (`None`: no member has appended or led yet).
pub(crate) async fn progress(client: &Client, source: &str) -> Result<Option<LogMark>, StoreError> {
    let row = client
        .query_opt(
            "SELECT commit_lsn FROM waltap.progress WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(StoreError::sql("read progress"))?;
    Ok(row.map(|r| LogMark::from_stored(Lsn(r.get::<_, i64>(0) as u64))))
}

impl LogWriter for PgLog {
    async fn progress(&mut self) -> Result<Option<LogMark>, StoreError> {
        progress(&self.client, &self.source).await
    }

    async fn replicated(&mut self) -> Result<(), StoreError> {
        match &self.standbys {
            Some(standbys) => standbys.until_flushed(&self.client).await,
            None => Ok(()),
        }
    }

    async fn write(&mut self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.begin().await?;
        let insert = match &self.insert {
            Some(statement) => statement.clone(),
            None => {
                let statement = self.client.prepare(INSERT).await;
                let statement = match statement {
                    Ok(statement) => statement,
                    Err(e) => {
                        self.abort().await;
                        return Err(StoreError::Sql {
                            operation: "prepare the append",
                            source: e,
                        });
                    }
                };
                self.insert.insert(statement).clone()
            }
        };
        // Serialized while the previous chunk's INSERT is still running.
        let mut columns = std::mem::take(&mut self.spare);
        columns.clear();
        for ev in events {
            columns.lsns.push(ev.position.commit_lsn.0 as i64);
            columns.ordinals.push(ev.position.ordinal as i32);
            columns.schemas.push(ev.schema.to_string());
            columns.tables.push(ev.table.to_string());
            columns.lasts.push(ev.tx.last);
            let serialize_error = |source| StoreError::Serialize {
                position: ev.position,
                source,
            };
            let mut body = serde_json::to_string(ev).map_err(serialize_error)?;
            if let Some(change) = &ev.schema_change {
                // Kept with the event for persisted streams (never delivered as part of it).
                change
                    .append_to_stored(&mut body)
                    .map_err(serialize_error)?;
            }
            columns.bodies.push(body);
        }
        self.settle().await?;
        let client = self.client.clone();
        let source = self.source.clone();
        self.pending = Some(tokio::spawn(async move {
            let result = client
                .execute(
                    &insert,
                    &[
                        &source,
                        &columns.lsns,
                        &columns.ordinals,
                        &columns.schemas,
                        &columns.tables,
                        &columns.lasts,
                        &columns.bodies,
                    ],
                )
                .await;
            (columns, result)
        }));
        Ok(())
    }

    async fn commit(&mut self, through: LogMark) -> Result<(), StoreError> {
        self.begin().await?;
        self.settle().await?;
        let lsn = through.lsn().0 as i64;
        let term = self.term;
        let result = async {
            // Under a term, the row lock this UPDATE takes orders it against the next
            // leader's bump of the term: either this batch commits first (and the next
            // leader reads its mark), or this UPDATE sees the new term and matches nothing.
            let updated = match term {
                Some(term) => {
                    self.client
                        .execute(
                            "UPDATE waltap.progress
                             SET commit_lsn = greatest(commit_lsn, $2), updated_at = now()
                             WHERE source = $1 AND term = $3",
                            &[&self.source, &lsn, &term],
                        )
                        .await?
                }
                None => {
                    self.client
                        .execute(
                            "INSERT INTO waltap.progress (source, commit_lsn) VALUES ($1, $2)
                             ON CONFLICT (source) DO UPDATE
                             SET commit_lsn = greatest(waltap.progress.commit_lsn, excluded.commit_lsn),
                                 updated_at = now()",
                            &[&self.source, &lsn],
                        )
                        .await?
                }
            };
            if updated == 0 {
                return Ok(false);
            }
            self.client
                .execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &self.source])
                .await?;
            self.client.batch_execute("COMMIT").await.map(|()| true)
        }
        .await;
        self.in_batch = false;
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(StoreError::Fenced {
                    source_name: self.source.clone(),
                    term: term.unwrap_or_default(),
                })
            }
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(StoreError::Sql {
                    operation: "commit a batch",
                    source: e,
                })
            }
        }
    }
}

impl PgLog {
    /// Opens the batch's store transaction unless it is open.
    async fn begin(&mut self) -> Result<(), StoreError> {
        if !self.in_batch {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(StoreError::sql("begin a batch"))?;
            self.in_batch = true;
        }
        Ok(())
    }

    /// Waits for the chunk in flight; on its failure the batch is rolled back.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let failure = match pending.await {
            Ok((columns, Ok(_))) => {
                self.spare = columns;
                return Ok(());
            }
            Ok((_, Err(e))) => StoreError::Sql {
                operation: "append events",
                source: e,
            },
            Err(e) => StoreError::AppendTask(e),
        };
        self.abort().await;
        Err(failure)
    }

    async fn abort(&mut self) {
        if let Some(pending) = self.pending.take() {
            // Its statement runs before the ROLLBACK on the same connection anyway.
            let _ = pending.await;
        }
        if self.in_batch {
            let _ = self.client.batch_execute("ROLLBACK").await;
            self.in_batch = false;
        }
    }
}
