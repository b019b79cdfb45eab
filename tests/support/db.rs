//! One fresh database per test, and the clean-up of everything tied to it.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::cluster::{cluster, Cluster, Endpoint};
use super::{connect, quote_ident, run_blocking};

/// Every database, slot and publication a test creates is named
/// `waltap_t_<pid>_<n>...`, so leftovers can be traced to their process.
const NAME_PREFIX: &str = "waltap_t_";
/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_IDENT: usize = 63;
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A database of one test's own. Call [`TestDb::teardown`] at the end; if a
/// test forgets (or panics first), `Drop` does the same clean-up synchronously.
pub struct TestDb {
    /// `waltap_t_<pid>_<n>`.
    pub name: String,
    endpoint: Endpoint,
    server_version_num: u32,
    names_issued: AtomicU32,
    torn_down: bool,
}

impl TestDb {
    /// A new database on the shared [`cluster()`].
    pub async fn new() -> TestDb {
        TestDb::new_on(cluster()).await
    }

    /// A new database on `cluster`, e.g. a dedicated one. Tear it down (or drop
    /// it) before the cluster is dropped.
    pub async fn new_on(cluster: &Cluster) -> TestDb {
        let name = format!(
            "{NAME_PREFIX}{}_{}",
            std::process::id(),
            DB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&cluster.endpoint.admin_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to {}:{} as admin: {e}",
                    cluster.host(),
                    cluster.port()
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDb {
            name,
            endpoint: cluster.endpoint.clone(),
            server_version_num: cluster.server_version_num(),
            names_issued: AtomicU32::new(0),
            torn_down: false,
        }
    }

    /// Superuser URL to this database.
    pub fn url(&self) -> String {
        self.endpoint.url(&self.name)
    }

    /// URL to this database as another role (see `SCRAM_ROLE` etc.).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        self.endpoint.url_as(user, password, &self.name)
    }

    /// A superuser client of this database; its connection runs on the
    /// current runtime.
    pub async fn client(&self) -> Client {
        connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to database {}: {e}", self.name))
    }

    /// A slot or publication name unique to this database and call:
    /// `<db name>_<prefix>_<n>`, only `[a-z0-9_]`, at most 63 bytes (the
    /// prefix is cleaned and shortened to fit). Slots named like this are
    /// dropped by teardown even when they are physical or in another database.
    pub fn unique_name(&self, prefix: &str) -> String {
        let n = self
            .names_issued
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let room = MAX_IDENT - self.name.len() - n.len() - 2;
        let prefix: String = prefix
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '_'
                }
            })
            .take(room)
            .collect();
        format!("{}_{prefix}_{n}", self.name)
    }

    /// Ends walsenders on this database, drops its replication slots (and any
    /// slot named by [`TestDb::unique_name`]), then the database itself.
    pub async fn teardown(mut self) {
        self.torn_down = true;
        let result = drop_database(
            self.endpoint.admin_url(),
            self.name.clone(),
            self.server_version_num,
        )
        .await;
        if let Err(why) = result {
            panic!("tearing down database {}: {why}", self.name);
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        // Never panic here: this may run while a failed test unwinds.
        let fut = drop_database(
            self.endpoint.admin_url(),
            self.name.clone(),
            self.server_version_num,
        );
        let result = run_blocking(fut).and_then(|r| r);
        if let Err(why) = result {
            eprintln!(
                "waltap tests: could not clean up database {} on drop: {why}",
                self.name
            );
        }
    }
}

async fn drop_database(
    admin_url: String,
    name: String,
    server_version_num: u32,
) -> Result<(), String> {
    let admin = connect(&admin_url)
        .await
        .map_err(|e| format!("connecting as admin: {e}"))?;
    drop_database_with(
        &admin,
        &name,
        server_version_num,
        Instant::now() + TEARDOWN_TIMEOUT,
    )
    .await
}

async fn drop_database_with(
    admin: &Client,
    name: &str,
    server_version_num: u32,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        drop_slots(admin, Some(name), &format!("{name}_"), deadline).await?;
        // WITH (FORCE) ends remaining sessions itself; before 13 we do it.
        let sql = if server_version_num >= 130000 {
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name))
        } else {
            terminate(
                admin,
                "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            .await?;
            format!("DROP DATABASE IF EXISTS {}", quote_ident(name))
        };
        match admin.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            // A slot created meanwhile, or a session that outlived its
            // termination: go round again.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("DROP DATABASE: {e}")),
        }
    }
}

/// Drops the slots of database `db` and those whose name starts with
/// `name_prefix`, ending whatever walsender holds them first.
async fn drop_slots(
    admin: &Client,
    db: Option<&str>,
    name_prefix: &str,
    deadline: Instant,
) -> Result<(), String> {
    // left() rather than LIKE: `_` in the prefix would be a wildcard.
    const SLOTS: &str = "SELECT slot_name::text, active_pid FROM pg_replication_slots \
                         WHERE database = $1 OR left(slot_name::text, length($2)) = $2";
    let db = db.unwrap_or("");
    loop {
        let slots = admin
            .query(SLOTS, &[&db, &name_prefix])
            .await
            .map_err(|e| format!("listing replication slots: {e}"))?;
        if slots.is_empty() {
            return Ok(());
        }
        terminate(
            admin,
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'walsender'",
            db,
        )
        .await?;
        let mut busy = Vec::new();
        for slot in &slots {
            let slot_name: String = slot.get(0);
            let active_pid: Option<i32> = slot.get(1);
            if let Some(pid) = active_pid {
                admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map_err(|e| format!("terminating pid {pid} holding slot {slot_name}: {e}"))?;
            }
            match admin
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {}
                // Terminated walsenders release their slot a moment later.
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => busy.push(slot_name),
                Err(e) => return Err(format!("dropping slot {slot_name}: {e}")),
            }
        }
        if !busy.is_empty() && Instant::now() >= deadline {
            return Err(format!(
                "slots still in use after {TEARDOWN_TIMEOUT:?}: {busy:?}"
            ));
        }
        if !busy.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Terminates the backends whose pids `pids_sql` (taking `$1 = arg`) selects.
async fn terminate(admin: &Client, pids_sql: &str, arg: &str) -> Result<(), String> {
    let sql = format!("SELECT pg_terminate_backend(pid) FROM ({pids_sql}) AS doomed WHERE pid <> pg_backend_pid()");
    admin
        .execute(&sql, &[&arg])
        .await
        .map(|_| ())
        .map_err(|e| format!("terminating backends: {e}"))
}

/// With `DATABASE_URL` nothing removes what killed test runs left behind:
/// drop databases and slots named `waltap_t_<pid>_...` whose process is gone.
/// Our own pid counts as gone, since this runs before we create anything (the
/// pid can be a reused one, e.g. in a fresh container).
pub(crate) async fn drop_leftovers(admin: &Client) -> Result<(), String> {
    let deadline = Instant::now() + TEARDOWN_TIMEOUT;
    let stale = |name: &str| match leftover_pid(name) {
        Some(pid) => pid == std::process::id() || !process_alive(pid),
        None => false,
    };
    let version: String = admin
        .query_one("SHOW server_version_num", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let version: u32 = version.parse().unwrap_or(0);

    let dbs = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE left(datname::text, length($1)) = $1",
            &[&NAME_PREFIX],
        )
        .await
        .map_err(|e| format!("listing databases: {e}"))?;
    for db in dbs {
        let name: String = db.get(0);
        if stale(&name) {
            eprintln!("waltap tests: dropping leftover database {name}");
            drop_database_with(admin, &name, version, deadline)
                .await
                .map_err(|e| format!("database {name}: {e}"))?;
        }
    }

    let slots = admin
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE left(slot_name::text, length($1)) = $1",
            &[&NAME_PREFIX],
        )
        .await
        .map_err(|e| format!("listing replication slots: {e}"))?;
    for slot in slots {
        let name: String = slot.get(0);
        if stale(&name) {
            eprintln!("waltap tests: dropping leftover replication slot {name}");
            drop_slots(admin, None, &name, deadline).await?;
        }
    }
    Ok(())
}

/// The pid in `waltap_t_<pid>_...`.
fn leftover_pid(name: &str) -> Option<u32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('_')
        .next()?
        .parse()
        .ok()
}

fn process_alive(pid: u32) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new("/proc").join(pid.to_string()).exists();
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(true)
}
