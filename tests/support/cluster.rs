//! The PostgreSQL server that tests talk to: `DATABASE_URL`'s, or a throwaway
//! local cluster ([`waltap::dev::localpg`]) with the test roles of `mod.rs`.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use waltap::dev::localpg::{url_encode, LocalPg, LocalPgOptions, LOCAL_HOST};

use super::{
    find_bindir, quote_literal, run_blocking, MD5_ROLE, PASSWORD_ROLE, SCRAM_ROLE, TLS_ROLE,
};

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The server shared by all tests of this process, started on first use.
///
/// Start-up is synchronous (std::process plus a private runtime), so it does not
/// matter which test's runtime gets here first, nor that it ends before others.
/// A failed start is remembered: every later test fails fast with the same reason.
pub fn cluster() -> &'static Cluster {
    match SHARED.get_or_init(Cluster::init_shared) {
        Ok(cluster) => cluster,
        Err(why) => panic!("test PostgreSQL unavailable: {why}"),
    }
}

/// A PostgreSQL server with `wal_level=logical`.
pub struct Cluster {
    host: String,
    port: u16,
    server_version_num: u32,
    pub(crate) endpoint: Endpoint,
    local: Option<LocalPg>,
    /// Made by [`Cluster::start_dedicated`]: the test may stop and restart it.
    dedicated: bool,
}

/// How to build connection URLs for a server.
#[derive(Clone)]
pub(crate) enum Endpoint {
    /// Our own cluster: superuser `postgres`, trusted over TCP from 127.0.0.1.
    Local { port: u16 },
    /// `DATABASE_URL`, split so that the user and database can be swapped while
    /// every other parameter (sslmode, options...) is kept. No `Debug`: it
    /// may hold a password.
    External {
        original: String,
        scheme: String,
        userinfo: Option<String>,
        hosts: String,
        query: String,
    },
}

impl Endpoint {
    pub(crate) fn url(&self, db: &str) -> String {
        match self {
            Endpoint::Local { port } => {
                format!("postgres://postgres@{LOCAL_HOST}:{port}/{}", url_encode(db))
            }
            Endpoint::External {
                scheme,
                userinfo,
                hosts,
                query,
                ..
            } => {
                let userinfo = userinfo
                    .as_ref()
                    .map(|u| format!("{u}@"))
                    .unwrap_or_default();
                format!("{scheme}://{userinfo}{hosts}/{}{query}", url_encode(db))
            }
        }
    }

    pub(crate) fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        let userinfo = format!("{}:{}", url_encode(user), url_encode(password));
        match self {
            Endpoint::Local { port } => {
                format!(
                    "postgres://{userinfo}@{LOCAL_HOST}:{port}/{}",
                    url_encode(db)
                )
            }
            Endpoint::External {
                scheme,
                hosts,
                query,
                ..
            } => format!("{scheme}://{userinfo}@{hosts}/{}{query}", url_encode(db)),
        }
    }

    /// Superuser URL to a database that always exists, for CREATE/DROP DATABASE.
    pub(crate) fn admin_url(&self) -> String {
        match self {
            Endpoint::Local { .. } => self.url("postgres"),
            Endpoint::External { original, .. } => original.clone(),
        }
    }

    fn parse_external(url: &str) -> Result<Endpoint, String> {
        let bad = || "DATABASE_URL must be a postgres:// or postgresql:// URL".to_string();
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(bad());
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        Ok(Endpoint::External {
            original: url.to_string(),
            scheme: scheme.to_string(),
            userinfo: userinfo.map(str::to_string),
            hosts: hosts.to_string(),
            query: query.to_string(),
        })
    }
}

impl Cluster {
    /// Host to connect to over TCP (for `DATABASE_URL`: its first host).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser URL to database `db`.
    pub fn url(&self, db: &str) -> String {
        self.endpoint.url(db)
    }

    /// URL to `db` as `user` with `password`, over TCP.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        self.endpoint.url_as(user, password, db)
    }

    /// The server's self-signed certificate, to be trusted by TLS tests.
    /// `None` for `DATABASE_URL`, or when `openssl` was missing (then ssl=off).
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.local.as_ref()?.ca_cert_path()
    }

    /// True when this process created the cluster, so the test roles, the
    /// pg_hba rules and the certificate described in `mod.rs` exist.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Directory of the server binaries (`pg_recvlogical`, `psql`...), local only.
    pub fn bindir(&self) -> Option<&Path> {
        Some(self.local.as_ref()?.bindir())
    }

    /// Data directory, local only.
    pub fn data_dir(&self) -> Option<&Path> {
        Some(self.local.as_ref()?.data_dir())
    }

    /// e.g. 150018 for 15.18.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Starts a cluster of the caller's own, configured like the shared local
    /// one, with its own directory and port; it is stopped and removed on drop.
    ///
    /// `Err` only when no PostgreSQL binaries are found (e.g. CI that provides
    /// just `DATABASE_URL`): the test should print the reason and return.
    /// Any other failure panics.
    pub fn start_dedicated() -> Result<Cluster, String> {
        let bindir = find_bindir()?;
        Ok(Cluster::start_local(bindir, true)
            .unwrap_or_else(|why| panic!("starting a dedicated PostgreSQL: {why}")))
    }

    /// `pg_ctl restart -m immediate`: a crash followed by recovery. Dedicated only.
    pub fn restart_immediate(&self) {
        self.dedicated("restart_immediate")
            .restart_immediate()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint. Dedicated only.
    pub fn stop_immediate(&self) {
        self.dedicated("stop_immediate")
            .stop_immediate()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts a stopped dedicated cluster again, on the same port.
    pub fn start(&self) {
        self.dedicated("start")
            .start_again()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn dedicated(&self, what: &str) -> &LocalPg {
        match &self.local {
            Some(local) if self.dedicated => local,
            _ => panic!("{what} is only for clusters from Cluster::start_dedicated()"),
        }
    }

    fn init_shared() -> Result<Cluster, String> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Cluster::external(&url),
            _ => Cluster::start_local(find_bindir()?, false),
        }
    }

    fn external(url: &str) -> Result<Cluster, String> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("DATABASE_URL does not parse: {e}"))?;
        let endpoint = Endpoint::parse_external(url)?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let checked_where = format!("DATABASE_URL server {host}:{port}");
        let admin_url = endpoint.admin_url();
        let server_version_num = run_blocking(async move {
            let client = super::connect(&admin_url)
                .await
                .map_err(|e| format!("connecting to {checked_where}: {e}"))?;
            let wal_level = show(&client, "wal_level").await?;
            if wal_level != "logical" {
                return Err(format!(
                    "{checked_where} has wal_level={wal_level}; logical replication tests need \
                     wal_level=logical (set it in postgresql.conf or `-c wal_level=logical`, then restart)"
                ));
            }
            let version = show(&client, "server_version_num").await?;
            super::db::drop_leftovers(&client).await.map_err(|e| {
                format!("dropping leftovers of earlier runs on {checked_where}: {e}")
            })?;
            version
                .parse::<u32>()
                .map_err(|e| format!("server_version_num {version:?}: {e}"))
        })??;

        Ok(Cluster {
            host,
            port,
            server_version_num,
            endpoint,
            local: None,
            dedicated: false,
        })
    }

    fn start_local(bindir: PathBuf, dedicated: bool) -> Result<Cluster, String> {
        let server =
            LocalPg::start(&test_cluster_options(bindir)).map_err(|e| waltap::report(&e))?;
        if server.ca_cert_path().is_none() {
            eprintln!("waltap tests: `openssl` not found; test cluster runs without TLS");
        }
        let endpoint = Endpoint::Local {
            port: server.port(),
        };
        let url = server.url("postgres");
        let server_version_num = run_blocking(create_test_roles(url))??;
        Ok(Cluster {
            host: server.host().to_string(),
            port: server.port(),
            server_version_num,
            endpoint,
            local: Some(server),
            dedicated,
        })
    }
}

/// What the test roles need on top of the defaults: their pg_hba rules, SCRAM for
/// new passwords, and a certificate for the TLS-only role.
fn test_cluster_options(bindir: PathBuf) -> LocalPgOptions {
    // First match wins, so the role-specific lines precede the catch-all.
    let hba = [
        "local all all trust",
        &format!("hostssl all {} 127.0.0.1/32 scram-sha-256", TLS_ROLE.user),
        &format!("hostnossl all {} 127.0.0.1/32 reject", TLS_ROLE.user),
        &format!("host all {} 127.0.0.1/32 scram-sha-256", SCRAM_ROLE.user),
        &format!("host all {} 127.0.0.1/32 md5", MD5_ROLE.user),
        &format!("host all {} 127.0.0.1/32 password", PASSWORD_ROLE.user),
        "host all all 127.0.0.1/32 trust",
        "",
    ]
    .join("\n");
    LocalPgOptions {
        bindir: Some(bindir),
        extra_conf: vec!["password_encryption = 'scram-sha-256'".into()],
        hba: Some(hba),
        tls_certificate: true,
    }
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> Result<String, String> {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .map(|row| row.get(0))
        .map_err(|e| format!("SHOW {setting}: {e}"))
}

async fn create_test_roles(url: String) -> Result<u32, String> {
    let client = super::connect(&url)
        .await
        .map_err(|e| format!("connecting to the new cluster: {e}"))?;
    let create = |role: super::TestRole| {
        format!(
            "CREATE ROLE {} LOGIN REPLICATION PASSWORD {};",
            super::quote_ident(role.user),
            quote_literal(role.password)
        )
    };
    // One session: the md5 role needs password_encryption switched just for it.
    let sql = [
        "SET password_encryption = 'scram-sha-256';".to_string(),
        create(SCRAM_ROLE),
        create(TLS_ROLE),
        // pg_hba's `password` method accepts any stored form.
        create(PASSWORD_ROLE),
        "SET password_encryption = 'md5';".to_string(),
        create(MD5_ROLE),
    ]
    .concat();
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| format!("creating the test roles: {e}"))?;
    let version = show(&client, "server_version_num").await?;
    version
        .parse()
        .map_err(|e| format!("server_version_num {version:?}: {e}"))
}

/// A cluster that has our test roles, pg_hba rules and certificate: the shared
/// one if we started it, else (with `DATABASE_URL`) a dedicated one.
pub enum LocalCluster {
    Shared(&'static Cluster),
    Dedicated(Box<Cluster>),
}

impl LocalCluster {
    /// `Err` says why there is none (no server binaries next to a `DATABASE_URL`).
    pub fn get() -> Result<LocalCluster, String> {
        let shared = cluster();
        if shared.is_local() {
            Ok(LocalCluster::Shared(shared))
        } else {
            Cluster::start_dedicated().map(|c| LocalCluster::Dedicated(Box::new(c)))
        }
    }
}

impl Deref for LocalCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        match self {
            LocalCluster::Shared(cluster) => cluster,
            LocalCluster::Dedicated(cluster) => cluster,
        }
    }
}
