//! Preparing and checking the source database: `waltap setup`, `waltap status`, and the
//! checks every listener runs when it starts.
//!
//! Owns the publication and slot life cycle and the preconditions of logical replication:
//! `wal_level`, the REPLICATION right, SELECT on the published tables, and the replica
//! identity of each table. Every problem is a [`SetupError`] whose message says how to fix
//! it. SQL identifiers are always quoted; values go as parameters.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::event::TableName;
use crate::pg::quote_ident;

/// What to prepare and check.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Name of the replication slot to check or create.
    pub slot: String,
    /// Name of the publication to check or create.
    pub publication: String,
    /// Tables the caller cares about; they must be published (and are when waltap creates
    /// the publication). Empty: every table of the publication.
    pub tables: Vec<TableName>,
    /// Create the publication if it does not exist (else a missing one is an error).
    pub create_publication: bool,
    /// Create the slot if it does not exist (else a missing one is an error).
    pub create_slot: bool,
    /// The slot is made by the replication connection itself and dies with it.
    pub temporary_slot: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+): standbys with
    /// `sync_replication_slots` keep a copy, so streaming can go on after a failover.
    pub failover_slot: bool,
    /// The slot's changes were consumed up to here (the event log's progress): a missing
    /// slot is then [`SetupError::SlotGone`], never created anew, since a new slot starts
    /// at the server's current position and would skip what was committed in between.
    pub consumed_through: Option<crate::lsn::Lsn>,
}

/// A precondition of logical replication does not hold.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The server's `wal_level` is not `logical`.
    #[error("wal_level is {actual:?}, but logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart Postgres")]
    WalLevel {
        /// The `wal_level` the server runs with.
        actual: String,
    },
    /// The server is older than PostgreSQL 14.
    #[error("PostgreSQL {version} is too old: waltap needs PostgreSQL 14 or later (pgoutput protocol 2: streaming of large transactions, logical messages)")]
    UnsupportedServer {
        /// The server's `server_version` setting.
        version: String,
    },
    /// The connecting role has neither the REPLICATION attribute nor superuser.
    #[error(
        "role {role:?} may not replicate: run ALTER ROLE {role} REPLICATION; (as a superuser)"
    )]
    NoReplicationRight {
        /// The connecting role.
        role: String,
    },
    /// The server is a hot standby of a version that cannot decode there.
    #[error("the database is a hot standby running PostgreSQL {version}: logical decoding on a standby needs PostgreSQL 16 or later; point waltap at the primary")]
    StandbyTooOld {
        /// The server's version.
        version: String,
    },
    /// The publication is missing on a hot standby, where it cannot be created.
    #[error("publication {publication:?} does not exist, and the database is a hot standby where it cannot be created: create it on the primary (waltap setup against the primary, or CREATE PUBLICATION {publication} FOR TABLE ...); it reaches the standby by replication")]
    PublicationOnStandby {
        /// The publication's name.
        publication: String,
    },
    /// The publication does not exist and creating it was not asked for.
    #[error("publication {publication:?} does not exist: run `waltap setup` or CREATE PUBLICATION {publication} FOR TABLE ...")]
    PublicationMissing {
        /// The publication's name.
        publication: String,
    },
    /// `CREATE PUBLICATION` failed (typically: the role does not own the tables).
    #[error("cannot create publication {publication:?}: {message} (create it as the table owner or a superuser: CREATE PUBLICATION {publication} FOR TABLE ...)")]
    CannotCreatePublication {
        /// The publication's name.
        publication: String,
        /// The server's error message.
        message: String,
    },
    /// A table named by the caller is unknown or ambiguous.
    #[error(transparent)]
    Table(#[from] crate::error::TableError),
    /// A table the caller asked for is not in the existing publication.
    #[error("table {table} is not in publication {publication:?}: run {statement}")]
    TableNotPublished {
        /// The table, schema-qualified.
        table: String,
        /// The publication's name.
        publication: String,
        /// The statement that adds it, every name quoted.
        statement: String,
    },
    /// The role cannot SELECT some published tables (needed for the initial state).
    #[error("role {role:?} lacks SELECT on published tables {tables}: run GRANT SELECT ON {tables} TO {role};")]
    NoSelect {
        /// The connecting role.
        role: String,
        /// The tables lacking SELECT, schema-qualified and comma-separated.
        tables: String,
    },
    /// The slot is missing although its changes were consumed before (see
    /// [`SetupOptions::consumed_through`]).
    #[error("replication slot {slot:?} does not exist on the source, but the event log holds its changes up to {consumed_through}: a new slot would begin at the server's current position and skip every change committed since then (after a failover, the new primary has the slot only if it was a failover slot, --failover, synchronized to this standby). Nothing was created; to accept the gap and go on from now, run again with --accept-slot-gap")]
    SlotGone {
        /// The slot's name.
        slot: String,
        /// Where its consumer got to.
        consumed_through: crate::lsn::Lsn,
    },
    /// The slot does not exist and creating it was not asked for.
    #[error("replication slot {slot:?} does not exist: run `waltap setup` to create it")]
    SlotMissing {
        /// The slot's name.
        slot: String,
    },
    /// The slot exists but was made for another output plugin.
    #[error("replication slot {slot:?} uses plugin {plugin:?}, not pgoutput: drop it or choose another --slot")]
    SlotWrongPlugin {
        /// The slot's name.
        slot: String,
        /// The slot's output plugin.
        plugin: String,
    },
    /// The slot exists but belongs to another database.
    #[error("replication slot {slot:?} belongs to database {database:?}, not {expected:?}: choose another --slot")]
    SlotOtherDatabase {
        /// The slot's name.
        slot: String,
        /// The database the slot belongs to.
        database: String,
        /// The database waltap is connected to.
        expected: String,
    },
    /// The slot was invalidated (`wal_status = 'lost'`): changes were lost.
    #[error("replication slot {slot:?} was invalidated (its WAL was removed, e.g. by max_slot_wal_keep_size): the changes since its last confirmed position were lost; drop it (SELECT pg_drop_replication_slot('{slot}')), run `waltap setup`, and re-read the current rows")]
    SlotLost {
        /// The slot's name.
        slot: String,
    },
    /// A failover slot was asked for on a server older than PostgreSQL 17.
    #[error(
        "failover slots need PostgreSQL 17 or later, the server runs {version}: drop --failover"
    )]
    FailoverUnsupported {
        /// The server's `server_version` setting.
        version: String,
    },
    /// Both a temporary and a failover slot were asked for.
    #[error("a temporary slot cannot be a failover slot: drop --failover or --temporary")]
    FailoverTemporary,
    /// Creating the slot failed.
    #[error("cannot create replication slot {slot:?}: {message}")]
    CannotCreateSlot {
        /// The slot's name.
        slot: String,
        /// The server's error message.
        message: String,
    },
    /// A catalog query failed.
    #[error("SQL error during setup")]
    Sql(#[from] tokio_postgres::Error),
}

/// One published table and what it will send.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedTable {
    /// The table, schema-qualified.
    pub table: String,
    /// `default`, `full`, `index` or `nothing`.
    pub identity: String,
    /// Whether the table has a primary key (a `default` identity without one sends no
    /// key for updates and deletes).
    pub has_primary_key: bool,
    /// Whether the connecting role may SELECT from it.
    pub can_select: bool,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotState {
    /// The slot's name.
    pub name: String,
    /// Process id of the connection streaming from the slot; `None` when it is idle.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`; `None` while the slot holds no
    /// WAL position.
    pub wal_status: Option<String>,
    /// The last position the consumer confirmed, as `X/X`.
    pub confirmed_flush_lsn: Option<String>,
    /// The oldest position whose WAL the slot keeps, as `X/X`.
    pub restart_lsn: Option<String>,
    /// Bytes of WAL between the server's current position and `confirmed_flush_lsn`.
    pub lag_bytes: Option<i64>,
    /// Bytes of WAL the slot keeps on disk (from `restart_lsn`).
    pub retained_bytes: Option<i64>,
}

/// The outcome of [`prepare`], for `waltap setup` and `waltap status`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SetupReport {
    /// The server's `server_version_num` (e.g. 170002).
    pub server_version_num: i32,
    /// The database connected to.
    pub database: String,
    /// The connecting role.
    pub role: String,
    /// The publication's name.
    pub publication: String,
    /// Whether this run created the publication.
    pub publication_created: bool,
    /// Every table of the publication.
    pub tables: Vec<PublishedTable>,
    /// The slot's state; `None` for a temporary slot, which exists only while streaming.
    pub slot: Option<SlotState>,
    /// Whether this run created the slot.
    pub slot_created: bool,
    /// Problems that do not stop replication (missing replica identity, a slot that is
    /// not a failover slot, ...), each with how to fix it.
    pub warnings: Vec<String>,
}

/// Checks every precondition, creating the publication and slot when asked to.
pub async fn prepare(client: &Client, opts: &SetupOptions) -> Result<SetupReport, SetupError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'),
                    current_setting('wal_level'), current_database(), current_user,
                    r.rolreplication OR r.rolsuper, pg_is_in_recovery()
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let version_num: i32 = row.get(0);
    let version: String = row.get(1);
    let wal_level: String = row.get(2);
    let database: String = row.get(3);
    let role: String = row.get(4);
    let can_replicate: bool = row.get(5);
    let standby: bool = row.get(6);
    if version_num < 140_000 {
        return Err(SetupError::UnsupportedServer { version });
    }
    if standby && version_num < 160_000 {
        return Err(SetupError::StandbyTooOld { version });
    }
    if wal_level != "logical" {
        return Err(SetupError::WalLevel { actual: wal_level });
    }
    if opts.failover_slot && opts.temporary_slot {
        return Err(SetupError::FailoverTemporary);
    }
    if opts.failover_slot && version_num < 170_000 {
        return Err(SetupError::FailoverUnsupported { version });
    }
    if !can_replicate {
        return Err(SetupError::NoReplicationRight { role });
    }
    for t in &opts.tables {
        table_exists(client, t).await?;
    }

    let mut publication_created = false;
    if !publication_exists(client, &opts.publication).await? {
        if standby {
            return Err(SetupError::PublicationOnStandby {
                publication: opts.publication.clone(),
            });
        }
        if !opts.create_publication {
            return Err(SetupError::PublicationMissing {
                publication: opts.publication.clone(),
            });
        }
        create_publication(client, &opts.publication, &opts.tables, version_num).await?;
        publication_created = true;
    }

    let tables = published_tables(client, &opts.publication).await?;
    for t in &opts.tables {
        let name = t.to_string();
        if !tables.iter().any(|p| p.table == name) {
            let why = crate::pg::catalog::not_published(client, &opts.publication, t).await?;
            if let crate::error::TableError::PartitionRoot(_) = why {
                return Err(why.into());
            }
            let statement = format!(
                "ALTER PUBLICATION {} ADD TABLE {}.{};",
                crate::pg::quote_ident(&opts.publication),
                crate::pg::quote_ident(&t.schema),
                crate::pg::quote_ident(&t.table),
            );
            return Err(SetupError::TableNotPublished {
                table: name,
                publication: opts.publication.clone(),
                statement,
            });
        }
    }
    let relevant: Vec<&PublishedTable> = tables
        .iter()
        .filter(|p| opts.tables.is_empty() || opts.tables.iter().any(|t| t.to_string() == p.table))
        .collect();
    let no_select: Vec<&str> = relevant
        .iter()
        .filter(|p| !p.can_select)
        .map(|p| p.table.as_str())
        .collect();
    if !no_select.is_empty() {
        return Err(SetupError::NoSelect {
            role,
            tables: no_select.join(", "),
        });
    }
    let mut warnings = Vec::new();
    let partial: Vec<&str> = relevant
        .iter()
        .filter(|p| p.identity != "full")
        .map(|p| p.table.as_str())
        .collect();
    if !partial.is_empty() {
        warnings.push(format!(
            "tables without REPLICA IDENTITY FULL send no before image for updates and only the key for deletes: {} (ALTER TABLE ... REPLICA IDENTITY FULL sends whole rows)",
            partial.join(", ")
        ));
    }
    let unkeyed: Vec<&str> = relevant
        .iter()
        .filter(|p| p.identity == "nothing" || (p.identity == "default" && !p.has_primary_key))
        .map(|p| p.table.as_str())
        .collect();
    if !unkeyed.is_empty() {
        warnings.push(format!(
            "tables without a replica identity: UPDATE and DELETE on them fail while they are published: {} (add a primary key or set REPLICA IDENTITY FULL)",
            unkeyed.join(", ")
        ));
    }
    if relevant.is_empty() {
        warnings.push(format!(
            "publication {:?} has no tables yet: no changes will arrive until tables are added",
            opts.publication
        ));
    }

    let mut slot_created = false;
    let mut slot = if opts.temporary_slot {
        None
    } else {
        slot_state(client, &opts.slot).await?
    };
    if let Some(s) = &slot {
        check_slot(client, &opts.slot, &database).await?;
        if opts.failover_slot && !slot_is_failover(client, &opts.slot).await? {
            warnings.push(format!(
                "replication slot {:?} exists but is not a failover slot: run ALTER_REPLICATION_SLOT {} (FAILOVER true) on a replication connection, or drop it and let waltap create it",
                opts.slot,
                quote_ident(&opts.slot)
            ));
        }
        if s.wal_status.as_deref() == Some("lost") {
            return Err(SetupError::SlotLost {
                slot: opts.slot.clone(),
            });
        }
    } else if !opts.temporary_slot {
        if let Some(consumed_through) = opts.consumed_through {
            return Err(SetupError::SlotGone {
                slot: opts.slot.clone(),
                consumed_through,
            });
        }
        if !opts.create_slot {
            return Err(SetupError::SlotMissing {
                slot: opts.slot.clone(),
            });
        }
        // The SQL function takes (name, plugin, temporary, two_phase, failover); its
        // fifth argument exists from 17 on, as does the replication command's FAILOVER.
        let sql = if opts.failover_slot {
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
        } else {
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
        };
        client
            .execute(sql, &[&opts.slot])
            .await
            .map_err(|e| SetupError::CannotCreateSlot {
                slot: opts.slot.clone(),
                message: db_message(&e),
            })?;
        slot_created = true;
        slot = slot_state(client, &opts.slot).await?;
    }

    if !opts.temporary_slot {
        warnings.extend(failover_warnings(client, opts, version_num).await?);
    }

    Ok(SetupReport {
        server_version_num: version_num,
        database,
        role,
        publication: opts.publication.clone(),
        publication_created,
        tables,
        slot,
        slot_created,
        warnings,
    })
}

/// What a failover of this server would do to the slot, when it has physical standbys.
async fn failover_warnings(
    client: &Client,
    opts: &SetupOptions,
    version_num: i32,
) -> Result<Vec<String>, SetupError> {
    // Physical standbys: streaming now, or holding a physical slot. A physical
    // walsender is connected to no database; a logical one is, also before it has
    // started on a slot (as the listener's own connection is while these checks run).
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_replication r
                     JOIN pg_stat_activity a ON a.pid = r.pid
                     WHERE a.datid IS NULL)
                  + (SELECT count(*) FROM pg_replication_slots
                     WHERE slot_type = 'physical' AND NOT active),
                    coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await?;
    let standbys: i64 = row.get(0);
    let standby_slots: String = row.get(1);
    if standbys == 0 {
        return Ok(Vec::new());
    }
    let mut warnings = Vec::new();
    if version_num < 170_000 {
        warnings.push(format!(
            "this server has physical standbys, but before PostgreSQL 17 they keep no copy of replication slot {:?}: after a failover the slot is gone and waltap run stops with an error naming the gap (upgrade to 17+ and use --failover to continue across failovers)",
            opts.slot
        ));
        return Ok(warnings);
    }
    let failover = slot_is_failover(client, &opts.slot).await?;
    if !failover && !opts.failover_slot {
        warnings.push(format!(
            "this server has physical standbys, but replication slot {:?} is not a failover slot: a promoted standby will not have it, and waltap run stops after a failover (create it with --failover and set sync_replication_slots = on on the standbys)",
            opts.slot
        ));
    }
    if failover && standby_slots.trim().is_empty() {
        warnings.push(
            "synchronized_standby_slots is empty: waltap may receive changes a standby has not received yet, and a standby promoted then would lack them or have the slot behind; set it to the standbys' physical slot names".to_owned(),
        );
    }
    Ok(warnings)
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

async fn table_exists(client: &Client, t: &TableName) -> Result<(), SetupError> {
    let found = catalog_query(
        client,
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        &[&t.schema, &t.table],
    )
    .await?;
    match found.first() {
        Some(_) => Ok(()),
        None => Err(crate::error::TableError::Missing(t.to_string()).into()),
    }
}

async fn publication_exists(client: &Client, name: &str) -> Result<bool, SetupError> {
    let rows = catalog_query(
        client,
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        &[name],
    )
    .await?;
    Ok(!rows.is_empty())
}

/// A catalog query with text parameters, in one round trip: parsed, bound and run
/// together, where `query` would first have the server describe the statement. Start-up
/// makes several before the first event, and over a network each round trip counts.
async fn catalog_query(
    client: &Client,
    sql: &str,
    params: &[&str],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
        .iter()
        .map(|p| (p as &(dyn ToSql + Sync), Type::TEXT))
        .collect();
    client.query_typed(sql, &typed).await
}

/// Without a table list the publication covers the user's schemas (PG15+) so that tables
/// created later are included, and never waltap's own `waltap` schema.
async fn create_publication(
    client: &Client,
    name: &str,
    tables: &[TableName],
    version_num: i32,
) -> Result<(), SetupError> {
    let target = if !tables.is_empty() {
        let list: Vec<String> = tables
            .iter()
            .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table)))
            .collect();
        // A partitioned table asked for by name is wanted under its name: its partitions'
        // changes are published as the root's (without the option they would arrive
        // under each partition's name, and nothing under the name asked for).
        let partitioned = client
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN unnest($1::text[], $2::text[]) AS t(s, r) ON n.nspname = t.s AND c.relname = t.r
                 WHERE c.relkind = 'p'",
                &[
                    &tables.iter().map(|t| t.schema.as_str()).collect::<Vec<_>>(),
                    &tables.iter().map(|t| t.table.as_str()).collect::<Vec<_>>(),
                ],
            )
            .await?
            .get::<_, i64>(0)
            > 0;
        let options = if partitioned {
            " WITH (publish_via_partition_root = true)"
        } else {
            ""
        };
        format!("FOR TABLE {}{options}", list.join(", "))
    } else if version_num >= 150_000 {
        let rows = client
            .query(
                "SELECT nspname FROM pg_namespace
                 WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'waltap')
                   AND nspname NOT LIKE 'pg\\_temp\\_%' AND nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
                 ORDER BY nspname",
                &[],
            )
            .await?;
        let schemas: Vec<String> = rows
            .iter()
            .map(|r| quote_ident(&r.get::<_, String>(0)))
            .collect();
        format!("FOR TABLES IN SCHEMA {}", schemas.join(", "))
    } else {
        "FOR ALL TABLES".to_owned()
    };
    let sql = format!("CREATE PUBLICATION {} {target}", quote_ident(name));
    tracing::info!(publication = name, "creating publication");
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| SetupError::CannotCreatePublication {
            publication: name.to_owned(),
            message: db_message(&e),
        })
}

/// The tables of a publication with their identity and our right to read them.
pub async fn published_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<PublishedTable>, SetupError> {
    let rows = catalog_query(
        client,
        "SELECT pt.schemaname::text, pt.tablename::text,
                    CASE c.relreplident WHEN 'd' THEN 'default' WHEN 'f' THEN 'full'
                         WHEN 'i' THEN 'index' ELSE 'nothing' END,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    has_table_privilege(c.oid, 'SELECT')
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = $1
             ORDER BY 1, 2",
        &[publication],
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| PublishedTable {
            // The same text a table named on the command line gives (a part with a dot
            // or a quote double-quoted), so that the two compare.
            table: crate::event::TableName {
                schema: r.get(0),
                table: r.get(1),
            }
            .to_string(),
            identity: r.get(2),
            has_primary_key: r.get(3),
            can_select: r.get(4),
        })
        .collect())
}

/// The slot's state, or None when it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, SetupError> {
    let row = catalog_query(
        client,
        "SELECT active_pid, wal_status, confirmed_flush_lsn::text, restart_lsn::text,
                    (w.lsn - confirmed_flush_lsn)::int8, (w.lsn - restart_lsn)::int8
             FROM pg_replication_slots,
                  -- A standby has no WAL of its own: its position is what it replayed.
                  LATERAL (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                       ELSE pg_current_wal_lsn() END AS lsn) w
             WHERE slot_name = $1",
        &[slot],
    )
    .await?
    .pop();
    Ok(row.map(|r| SlotState {
        name: slot.to_owned(),
        active_pid: r.get(0),
        wal_status: r.get(1),
        confirmed_flush_lsn: r.get(2),
        restart_lsn: r.get(3),
        lag_bytes: r.get(4),
        retained_bytes: r.get(5),
    }))
}

/// `pg_replication_slots.failover` (PostgreSQL 17+).
pub async fn slot_is_failover(client: &Client, slot: &str) -> Result<bool, SetupError> {
    let row = catalog_query(
        client,
        "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
        &[slot],
    )
    .await?
    .pop();
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

async fn check_slot(client: &Client, slot: &str, database: &str) -> Result<(), SetupError> {
    let row = catalog_query(
        client,
        "SELECT coalesce(plugin, ''), coalesce(database, '') FROM pg_replication_slots
         WHERE slot_name = $1",
        &[slot],
    )
    .await?
    .pop()
    // Dropped since it was looked up a moment ago.
    .ok_or_else(|| SetupError::SlotMissing {
        slot: slot.to_owned(),
    })?;
    let plugin: String = row.get(0);
    let db: String = row.get(1);
    if plugin != "pgoutput" {
        return Err(SetupError::SlotWrongPlugin {
            slot: slot.to_owned(),
            plugin,
        });
    }
    if db != database {
        return Err(SetupError::SlotOtherDatabase {
            slot: slot.to_owned(),
            database: db,
            expected: database.to_owned(),
        });
    }
    Ok(())
}

/// Drops the slot (waiting for it to be released briefly is the caller's business).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, SetupError> {
    Ok(client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        > 0)
}
