//! Support code for integration tests: a real PostgreSQL with `wal_level=logical`.
//!
//! * [`cluster()`] is the one server shared by every test of this process. With
//!   `DATABASE_URL` set it is that server (checked for `wal_level=logical`);
//!   otherwise a throwaway cluster is created on first use and destroyed when
//!   the process ends, however it ends.
//! * [`TestDb`] is a fresh database per test; [`TestDb::unique_name`] gives slot
//!   and publication names that cannot collide with other tests or processes;
//!   [`TestDb::teardown`] drops the database and every slot that belongs to it.
//! * [`Cluster::start_dedicated`] is a private cluster for tests that restart or
//!   crash the server.
//! * [`wait_for`] replaces sleeps: poll a condition until it holds or time runs out.

// Each test module uses a different part of this API.
#![allow(dead_code)]

pub mod cluster;
pub mod db;
pub mod listen;
pub mod log;
pub mod prng;
pub mod workload;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use cluster::{cluster, Cluster, LocalCluster};
pub use db::TestDb;

/// [`waltap::dev::localpg::find_bindir`], or why not, with the alternative tests have.
pub fn find_bindir() -> Result<std::path::PathBuf, String> {
    waltap::dev::localpg::find_bindir()
        .map_err(|e| format!("{e}; or set DATABASE_URL to test against a running server"))
}

/// A login role that the local test cluster creates, and the password it has.
#[derive(Clone, Copy, Debug)]
pub struct TestRole {
    pub user: &'static str,
    pub password: &'static str,
}

/// SCRAM-stored password, authenticated with `scram-sha-256` over TCP.
pub const SCRAM_ROLE: TestRole = TestRole {
    user: "waltap_scram",
    password: "scram-test-pw",
};
/// Only accepted over TLS (`hostssl` ... `scram-sha-256`, `hostnossl` ... `reject`).
pub const TLS_ROLE: TestRole = TestRole {
    user: "waltap_tls",
    password: "tls-test-pw",
};
/// MD5-stored password, authenticated with `md5`.
pub const MD5_ROLE: TestRole = TestRole {
    user: "waltap_md5",
    password: "md5-test-pw",
};
/// Cleartext `password` authentication.
pub const PASSWORD_ROLE: TestRole = TestRole {
    user: "waltap_password",
    password: "cleartext-test-pw",
};

/// Quotes an SQL identifier, so test names can never be read as SQL.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes an SQL string literal (with `standard_conforming_strings`, the default).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Polls `f` until it returns true, backing off from 20 ms to 200 ms.
///
/// Panics naming `what` when `timeout` passes first, including when one call
/// of `f` itself hangs past the deadline.
/// The next item of a subscription or a stream consumer, which must come within `timeout`
/// and not be an error.
pub async fn next_item<S, T, E>(items: &mut S, timeout: Duration) -> T
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    T: std::fmt::Debug,
    E: std::fmt::Debug,
{
    use futures::StreamExt;
    match tokio::time::timeout(timeout, items.next()).await {
        Ok(Some(Ok(item))) => item,
        other => panic!("expected an item, got {other:?}"),
    }
}

pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.max(Duration::from_millis(1)), f()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!("timed out after {timeout:?} waiting for {what} (the check hung)"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay.min(left)).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A `tokio-postgres` TLS connector that trusts only the certificate at `ca`
/// (for the local cluster: [`Cluster::ca_cert_path`]) and checks the host name.
pub fn tls_connector(ca: &Path) -> tokio_postgres_rustls::MakeRustlsConnect {
    let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("reading {}: {e}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.unwrap_or_else(|e| panic!("parsing {}: {e}", ca.display()));
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("trusting {}: {e}", ca.display()));
    }
    // Explicit provider: the process-wide default is ambiguous if another
    // dependency ever enables a second rustls backend.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// Connects without TLS and drives the connection on the current runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    // Errors here are expected whenever a test or teardown kills the backend;
    // the client reports them on its next call anyway.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `fut` to completion on a fresh runtime in a thread of its own.
///
/// Needed wherever async work happens outside any runtime's control: the lazy
/// cluster start-up (first caller's runtime is just one test's, and nesting
/// `block_on` inside it panics) and `Drop`.
pub(crate) fn run_blocking<T, Fut>(fut: Fut) -> Result<T, String>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(fut))
            .map_err(|e| format!("building a tokio runtime: {e}"))
    })
    .join()
    .map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("background task panicked: {msg}")
    })?
}

/// Sends SIGTERM to a running child (through `kill`: the crate forbids `unsafe`).
pub fn sigterm(child: &tokio::process::Child) {
    signal(child, "TERM");
}

/// Sends `SIG<name>` (`TERM`, `STOP`, `CONT`...) to a running child.
pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("the child is running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Runs a command to completion (at most a minute) and returns what it did.
pub async fn output(mut cmd: tokio::process::Command) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("command finished in time")
        .expect("command runs")
}

/// Runs a command that must succeed and returns its stdout.
pub async fn run_ok(cmd: tokio::process::Command) -> String {
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The `waltap` binary with `args`, reading `url` as `DATABASE_URL`, quiet logs, no stdin,
/// stdout and stderr piped, killed if the test drops it.
pub fn waltap(url: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_waltap"));
    cmd.args(args)
        .env("DATABASE_URL", url)
        .env("WALTAP_LOG", "warn")
        .env("NO_COLOR", "1")
        .env_remove("WALTAP_STORE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The role (`leader`, `follower`...) the `/healthz` of the server at `base` reports;
/// `None` when it does not answer.
pub async fn healthz_role(base: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = r.json().await.ok()?;
    body["role"].as_str().map(str::to_owned)
}

/// The next line of a child's output, which must be JSON, within 60 s.
pub async fn json_line<R: tokio::io::AsyncBufRead + Unpin>(
    out: &mut tokio::io::Lines<R>,
) -> serde_json::Value {
    let line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("a line");
    serde_json::from_str(&line).unwrap()
}
