//! The replication client against a real server: authentication methods, TLS, commands.

use waltap::dev::replication::{ReplicationConnection, ReplicationError};
use waltap::SourceConfig;

use crate::support::listen::{self, take_json};
use crate::support::{LocalCluster, TestDb, MD5_ROLE, PASSWORD_ROLE, SCRAM_ROLE, TLS_ROLE};

fn local() -> Option<LocalCluster> {
    match LocalCluster::get() {
        Ok(c) => Some(c),
        Err(why) => {
            eprintln!("skipped: needs a local cluster with test roles: {why}");
            None
        }
    }
}

async fn connect(url: &str) -> Result<ReplicationConnection, ReplicationError> {
    ReplicationConnection::connect(&SourceConfig::parse(url).unwrap()).await
}

#[tokio::test]
async fn scram_md5_and_cleartext_passwords_authenticate() {
    let Some(cluster) = local() else { return };
    let db = TestDb::new_on(&cluster).await;
    for role in [SCRAM_ROLE, MD5_ROLE, PASSWORD_ROLE] {
        let url = format!("{}?sslmode=disable", db.url_as(role.user, role.password));
        let mut conn = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", role.user));
        let id = conn.identify_system().await.unwrap();
        assert!(!id.system_id.is_empty());
        assert_eq!(id.dbname.as_deref(), Some(db.name.as_str()));
        assert!(conn.server_version_num() >= 140_000);
    }
    db.teardown().await;
}

#[tokio::test]
async fn wrong_password_is_a_clear_definite_error() {
    let Some(cluster) = local() else { return };
    let db = TestDb::new_on(&cluster).await;
    let url = format!(
        "{}?sslmode=disable",
        db.url_as(SCRAM_ROLE.user, "not-the-password")
    );
    let err = match connect(&url).await {
        Ok(_) => panic!("connected with a wrong password"),
        Err(e) => e,
    };
    assert!(matches!(err, ReplicationError::Auth { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("waltap_scram") && msg.contains("password"),
        "{msg}"
    );
    assert!(
        !msg.contains("not-the-password"),
        "the password never appears: {msg}"
    );
    assert!(!err.is_transient());

    // The same through the listener, which checks the source over SQL first.
    let cfg = listen::config_for_url(&db, &url, &[]);
    let err = match waltap::Listener::start(cfg).await {
        Ok(_) => panic!("listener started with a wrong password"),
        Err(e) => e,
    };
    let told = waltap::report(&err);
    assert!(told.contains("password"), "{told}");
    db.teardown().await;
}

#[tokio::test]
async fn tls_require_and_verify_full_work_and_plain_tcp_is_refused() {
    let Some(cluster) = local() else { return };
    let Some(ca) = cluster.ca_cert_path() else {
        eprintln!("skipped: the cluster has no certificate");
        return;
    };
    let db = TestDb::new_on(&cluster).await;
    let base = db.url_as(TLS_ROLE.user, TLS_ROLE.password);
    for query in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    ] {
        let mut conn = connect(&format!("{base}?{query}"))
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        conn.identify_system().await.unwrap();
    }
    // pg_hba rejects this role without TLS.
    assert!(connect(&format!("{base}?sslmode=disable")).await.is_err());
    // An untrusted root fails verification instead of falling back.
    let err = connect(&format!("{base}?sslmode=verify-full")).await;
    assert!(
        matches!(err, Err(ReplicationError::Tls(_))),
        "{:?}",
        err.err()
    );
    db.teardown().await;
}

#[tokio::test]
async fn listener_streams_over_tls_as_an_unprivileged_replication_role() {
    let Some(cluster) = local() else { return };
    if cluster.ca_cert_path().is_none() {
        return;
    }
    let db = TestDb::new_on(&cluster).await;
    let c = db.client().await;
    let url = format!(
        "{}?sslmode=require",
        db.url_as(TLS_ROLE.user, TLS_ROLE.password)
    );
    let cfg = listen::config_for_url(&db, &url, &["secure"]);
    // The role neither owns the table nor may create publications: an admin prepares them.
    c.batch_execute(&format!(
        "CREATE TABLE secure (id int PRIMARY KEY, s text);
         GRANT SELECT ON secure TO {role};
         CREATE PUBLICATION {publication} FOR TABLE secure;",
        role = TLS_ROLE.user,
        publication = crate::support::quote_ident(&cfg.publication),
    ))
    .await
    .unwrap();
    let mut l = listen::start(cfg).await;
    c.batch_execute("INSERT INTO secure VALUES (1, 'over tls')")
        .await
        .unwrap();
    let ev = take_json(&mut l).await;
    assert_eq!(ev["created"]["s"], "over tls");
    l.shutdown().await;
    c.batch_execute(&format!("REVOKE ALL ON secure FROM {}", TLS_ROLE.user))
        .await
        .unwrap();
    db.teardown().await;
}

#[tokio::test]
async fn missing_rights_and_settings_are_reported_with_the_fix() {
    let Some(cluster) = local() else { return };
    let db = TestDb::new_on(&cluster).await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE hidden (id int PRIMARY KEY)")
        .await
        .unwrap();
    // A role with REPLICATION but no SELECT on the table it asks for.
    let url = format!(
        "{}?sslmode=disable",
        db.url_as(SCRAM_ROLE.user, SCRAM_ROLE.password)
    );
    let cfg = listen::config_for_url(&db, &url, &["hidden"]);
    c.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE hidden",
        crate::support::quote_ident(&cfg.publication)
    ))
    .await
    .unwrap();
    let err = match waltap::Listener::start(cfg).await {
        Ok(_) => panic!("started without SELECT"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("GRANT SELECT ON public.hidden"), "{err}");
    // A table that is not published.
    let mut cfg = listen::config(&db, &["hidden"]);
    cfg.publication = db.unique_name("pub");
    c.batch_execute(&format!(
        "CREATE TABLE other (id int); CREATE PUBLICATION {} FOR TABLE other",
        crate::support::quote_ident(&cfg.publication)
    ))
    .await
    .unwrap();
    let err = match waltap::Listener::start(cfg).await {
        Ok(_) => panic!("started on an unpublished table"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("ALTER PUBLICATION"), "{err}");
    db.teardown().await;
}
