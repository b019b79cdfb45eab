//! Proves the test harness itself: the cluster, per-test databases, slot
//! clean-up, the authentication set-up and dedicated clusters.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::support::{
    self, cluster, quote_ident, wait_for, Cluster, LocalCluster, TestDb, MD5_ROLE, PASSWORD_ROLE,
    SCRAM_ROLE, TLS_ROLE,
};

const WAIT: Duration = Duration::from_secs(20);

async fn database_exists(observer: &Client, name: &str) -> bool {
    observer
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("querying pg_database")
        .get::<_, i64>(0)
        == 1
}

async fn slot_state(observer: &Client, slot: &str) -> Option<bool> {
    observer
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("querying pg_replication_slots")
        .map(|row| row.get(0))
}

/// Skips (returns `None` after saying why) where no local cluster can be had.
fn local_cluster_or_skip(test: &str) -> Option<LocalCluster> {
    match LocalCluster::get() {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

#[tokio::test]
async fn shared_cluster_has_logical_wal_level() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("SHOW wal_level")
        .get(0);
    assert_eq!(wal_level, "logical");
    let version: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .expect("SHOW server_version_num")
        .get(0);
    assert_eq!(version, cluster().server_version_num().to_string());
    db.teardown().await;
}

#[tokio::test]
async fn test_dbs_are_distinct_and_teardown_drops_them() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name, b.name);
    let observer = b.client().await;
    assert!(database_exists(&observer, &a.name).await);
    assert!(database_exists(&observer, &b.name).await);

    let names = [
        a.unique_name("slot"),
        a.unique_name("slot"),
        b.unique_name("slot"),
    ];
    assert_ne!(names[0], names[1]);
    assert_ne!(names[0], names[2]);
    let long =
        a.unique_name("A Very-Long prefix, with punctuation, that cannot fit whole in 63 bytes");
    assert!(long.len() <= 63, "{long}");
    assert!(long
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));

    let a_name = a.name.clone();
    a.teardown().await;
    assert!(!database_exists(&observer, &a_name).await);
    assert!(database_exists(&observer, &b.name).await);
    drop(observer);
    b.teardown().await;
}

#[tokio::test]
async fn teardown_drops_logical_slots_even_when_active() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let idle_slot = db.unique_name("idle");
    let busy_slot = db.unique_name("busy");
    let publication = db.unique_name("pub");
    client
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION {} FOR TABLE t",
            quote_ident(&publication)
        ))
        .await
        .expect("creating a publication");
    for slot in [&idle_slot, &busy_slot] {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await
            .expect("creating a logical slot");
    }
    assert_eq!(slot_state(&client, &idle_slot).await, Some(false));

    // pg_recvlogical holds a walsender on the slot, which teardown must end.
    // With DATABASE_URL, local client binaries (if any) still do.
    let bindir = cluster()
        .bindir()
        .map(Path::to_path_buf)
        .or_else(|| support::find_bindir().ok())
        .filter(|dir| dir.join("pg_recvlogical").is_file());
    let mut receiver = bindir.map(|bindir| {
        tokio::process::Command::new(bindir.join("pg_recvlogical"))
            .arg("-d")
            .arg(db.url())
            .args([
                "--slot",
                &busy_slot,
                "--start",
                "--no-loop",
                "-f",
                "/dev/null",
            ])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={publication}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // It reports its (expected) termination on stderr.
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting pg_recvlogical")
    });
    if receiver.is_some() {
        wait_for("pg_recvlogical to activate its slot", WAIT, || async {
            slot_state(&client, &busy_slot).await == Some(true)
        })
        .await;
    } else {
        eprintln!("no local pg_recvlogical: teardown of an active slot not exercised");
    }
    drop(client);

    let name = db.name.clone();
    db.teardown().await;

    let observer = TestDb::new().await;
    let client = observer.client().await;
    assert_eq!(slot_state(&client, &idle_slot).await, None);
    assert_eq!(slot_state(&client, &busy_slot).await, None);
    assert!(!database_exists(&client, &name).await);
    if let Some(receiver) = receiver.as_mut() {
        let status = tokio::time::timeout(WAIT, receiver.wait())
            .await
            .expect("pg_recvlogical should exit once its walsender is gone")
            .expect("waiting for pg_recvlogical");
        assert!(!status.success());
    }
    drop(client);
    observer.teardown().await;
}

#[tokio::test]
async fn forgotten_teardown_is_done_on_drop() {
    let db = TestDb::new().await;
    let slot = db.unique_name("forgotten");
    db.client()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("creating a logical slot");
    let name = db.name.clone();
    drop(db);

    let observer = TestDb::new().await;
    let client = observer.client().await;
    assert!(!database_exists(&client, &name).await);
    assert_eq!(slot_state(&client, &slot).await, None);
    drop(client);
    observer.teardown().await;
}

async fn current_user(url: &str) -> Result<String, tokio_postgres::Error> {
    let client = support::connect(url).await?;
    Ok(client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0))
}

#[tokio::test]
async fn password_roles_authenticate_over_tcp() {
    let Some(cluster) = local_cluster_or_skip("password_roles_authenticate_over_tcp") else {
        return;
    };
    for role in [SCRAM_ROLE, MD5_ROLE, PASSWORD_ROLE] {
        let url = cluster.url_as(role.user, role.password, "postgres");
        let user = current_user(&url)
            .await
            .unwrap_or_else(|e| panic!("{} with its password: {e}", role.user));
        assert_eq!(user, role.user);

        let wrong = cluster.url_as(role.user, "not-the-password", "postgres");
        let err = current_user(&wrong)
            .await
            .expect_err("a wrong password must be refused");
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_PASSWORD),
            "{}: {err}",
            role.user
        );
    }

    let client = support::connect(&cluster.url("postgres"))
        .await
        .expect("superuser connection");
    let stored: String = client
        .query_one(
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = $1",
            &[&MD5_ROLE.user],
        )
        .await
        .expect("reading pg_authid")
        .get(0);
    assert_eq!(
        stored, "md5",
        "the md5 role must have an md5-stored password"
    );
}

#[tokio::test]
async fn tls_role_needs_tls_and_trusts_generated_cert() {
    let Some(cluster) = local_cluster_or_skip("tls_role_needs_tls_and_trusts_generated_cert")
    else {
        return;
    };
    let Some(ca) = cluster.ca_cert_path() else {
        eprintln!("skipping tls test: the cluster has no certificate (openssl missing)");
        return;
    };
    let url = format!(
        "{}?sslmode=require",
        cluster.url_as(TLS_ROLE.user, TLS_ROLE.password, "postgres")
    );
    let (client, connection) = tokio_postgres::connect(&url, support::tls_connector(ca))
        .await
        .expect("waltap_tls over TLS");
    tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("reading pg_stat_ssl")
        .get(0);
    assert!(ssl);

    let plain = cluster.url_as(TLS_ROLE.user, TLS_ROLE.password, "postgres");
    let err = tokio_postgres::connect(&plain, NoTls)
        .await
        .map(|_| ())
        .expect_err("waltap_tls without TLS must be rejected");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
}

fn postmaster_pid(data_dir: &Path) -> u32 {
    let pid_file =
        std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("reading postmaster.pid");
    pid_file
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("postmaster.pid starts with the pid")
}

/// Zombies count as gone: whoever adopted the postmaster reaps it, not us.
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn dedicated_cluster_restarts_and_vanishes_on_drop() {
    let dedicated = match Cluster::start_dedicated() {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipping dedicated_cluster_restarts_and_vanishes_on_drop: {why}");
            return;
        }
    };
    assert!(dedicated.is_local());
    let data_dir = dedicated
        .data_dir()
        .expect("a local cluster has a data dir")
        .to_path_buf();
    let base = data_dir
        .parent()
        .expect("data dir has a parent")
        .to_path_buf();
    if cluster().is_local() {
        assert_ne!(dedicated.port(), cluster().port());
    }

    let db = TestDb::new_on(&dedicated).await;
    let client = db.client().await;
    client
        .simple_query("SELECT 1")
        .await
        .expect("before restart");
    let first_pid = postmaster_pid(&data_dir);

    dedicated.restart_immediate();
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "a crash restart must end existing sessions"
    );
    let second_pid = postmaster_pid(&data_dir);
    assert_ne!(first_pid, second_pid);
    let client = db.client().await;
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("after restart")
        .get(0);
    assert_eq!(wal_level, "logical");

    dedicated.stop_immediate();
    assert!(support::connect(&db.url()).await.is_err());
    dedicated.start();
    db.client()
        .await
        .simple_query("SELECT 1")
        .await
        .expect("after start");
    drop(client);
    db.teardown().await;

    let pid = postmaster_pid(&data_dir);
    drop(dedicated);
    assert!(!base.exists(), "{} must be removed on drop", base.display());
    wait_for("the dedicated postmaster to exit", WAIT, || async {
        !process_running(pid)
    })
    .await;
}

#[test]
fn quote_ident_doubles_quotes() {
    assert_eq!(quote_ident("plain"), "\"plain\"");
    assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    assert_eq!(support::quote_literal("it's"), "'it''s'");
}
