//! Where the source database is and how to reach it.
//!
//! [`SourceConfig`] is parsed once from a libpq-style URL or key=value string and serves both
//! the replication connection (our own protocol client) and ordinary SQL connections
//! (tokio-postgres). TLS options that tokio-postgres does not understand (`sslmode=verify-ca`,
//! `verify-full`, `sslrootcert`) are taken out here, so both paths share one TLS policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::{AsyncMessage, Notification};

use crate::pg::tls::{self, TlsError, TlsMode};

/// The configuration was not usable; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid database URL")]
    Url(#[source] tokio_postgres::Error),
    #[error(
        "invalid sslmode {0:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
    )]
    SslMode(String),
    #[error(
        "invalid target_session_attrs {0:?}: expected any, read-write, primary, read-only, standby or prefer-standby"
    )]
    SessionAttrs(String),
    #[error("the database URL names no user (add user=... or postgres://USER@host/db)")]
    NoUser,
    #[error("the database URL names no host")]
    NoHost,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A parsed connection string.
#[derive(Clone)]
pub struct SourceConfig {
    pg: tokio_postgres::Config,
    tls_mode: TlsMode,
    root_cert: Option<PathBuf>,
    /// When this is a hot standby: its primary, where what cannot be written on a standby
    /// (initial-state watermarks) is written.
    primary: Option<Arc<SourceConfig>>,
}

impl std::fmt::Debug for SourceConfig {
    // The password must never reach logs, so Debug prints only where we connect.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("target", &self.describe())
            .field("tls_mode", &self.tls_mode)
            .finish()
    }
}

/// How long connecting to one host may take when the URL sets no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl SourceConfig {
    /// Parses a `postgres://` URL or a `key=value` string.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let (rest, own) = take_own_options(s)?;
        let (tls_mode, root_cert) = (own.tls_mode, own.root_cert);
        let mut pg: tokio_postgres::Config = rest.parse().map_err(ConfigError::Url)?;
        if let Some(attrs) = own.session_attrs {
            pg.target_session_attrs(attrs);
        }
        if pg.get_user().is_none() {
            let user = std::env::var("PGUSER").or_else(|_| std::env::var("USER"));
            match user {
                Ok(u) => {
                    pg.user(u);
                }
                Err(_) => return Err(ConfigError::NoUser),
            }
        }
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                pg.password(p);
            }
        }
        let tls_mode = if tls_mode == TlsMode::Require && root_cert.is_some() {
            TlsMode::VerifyCa
        } else {
            tls_mode
        };
        pg.ssl_mode(match tls_mode {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(SourceConfig {
            pg,
            tls_mode,
            root_cert,
            primary: None,
        })
    }

    /// This configuration with `primary` as its primary server: for a hot standby
    /// (PostgreSQL 16+), initial-state and export watermarks are written there, since a
    /// standby cannot write WAL. Ignored while this server is not in recovery.
    pub fn with_primary(mut self, primary: SourceConfig) -> Self {
        self.primary = Some(Arc::new(primary));
        self
    }

    /// The primary given with [`SourceConfig::with_primary`].
    pub fn primary(&self) -> Option<&SourceConfig> {
        self.primary.as_deref()
    }

    /// This configuration with TCP keepalives that give up on a silent peer after about
    /// `idle + interval * retries`, so that a connection to a vanished host errors out
    /// instead of waiting on the operating system's defaults (hours).
    pub fn with_keepalives(&self, idle: Duration, interval: Duration, retries: u32) -> Self {
        let mut config = self.clone();
        config
            .pg
            .keepalives(true)
            .keepalives_idle(idle)
            .keepalives_interval(interval)
            .keepalives_retries(retries);
        config
    }

    /// The tokio-postgres view of this configuration (for ordinary SQL).
    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// Whether and how connections use TLS (`sslmode`).
    pub fn tls_mode(&self) -> TlsMode {
        self.tls_mode
    }

    /// The role to connect as; empty when none was given.
    pub fn user(&self) -> &str {
        self.pg.get_user().unwrap_or_default()
    }

    /// The password, if one was given.
    pub fn password(&self) -> Option<&[u8]> {
        self.pg.get_password()
    }

    /// The database name (defaults to the user name, as in libpq).
    pub fn dbname(&self) -> &str {
        self.pg.get_dbname().unwrap_or_else(|| self.user())
    }

    /// The `application_name` the server shows for the connections (`waltap` by default).
    pub fn application_name(&self) -> &str {
        self.pg.get_application_name().unwrap_or("waltap")
    }

    /// How long one host may take to accept and authenticate a connection:
    /// `connect_timeout` of the URL (seconds, as in libpq), else
    /// 10 s. Unlike libpq, 0 does not mean "wait forever": a host
    /// that accepts TCP and never answers must not hang a command.
    pub fn connect_timeout(&self) -> Duration {
        self.pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// Host and port candidates, in order.
    pub fn targets(&self) -> Vec<(Host, u16)> {
        let ports = self.pg.get_ports();
        self.pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports
                    .get(i)
                    .or_else(|| ports.first())
                    .copied()
                    .unwrap_or(5432);
                (h.clone(), port)
            })
            .collect()
    }

    /// `user@host:port/db` (`host1:port1,host2:port2` for several hosts), for logs and
    /// error messages (never the password).
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .targets()
            .into_iter()
            .map(|(host, port)| match host {
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect();
        format!("{}@{}/{}", self.user(), hosts.join(","), self.dbname())
    }

    /// The rustls client configuration for this TLS mode (None when TLS is disabled).
    pub fn rustls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
        Ok(match self.tls_mode {
            TlsMode::Disable => None,
            mode => Some(tls::client_config(mode, self.root_cert.as_deref())?),
        })
    }

    /// Opens an ordinary SQL connection and drives it on a background task.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SqlConnectError> {
        self.connect_driven(None).await
    }

    /// As [`SourceConfig::connect_sql`], and hands over the connection's notifications
    /// (`LISTEN`). They are wake-up calls: when the receiver falls 16 behind, newer ones
    /// are dropped, since one pending wake-up already makes the reader look again. The
    /// receiver ends when the connection does.
    pub async fn connect_sql_listening(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::Receiver<Notification>), SqlConnectError> {
        let (tx, rx) = mpsc::channel(16);
        let client = self.connect_driven(Some(tx)).await?;
        Ok((client, rx))
    }

    async fn connect_driven(
        &self,
        notifications: Option<mpsc::Sender<Notification>>,
    ) -> Result<tokio_postgres::Client, SqlConnectError> {
        let mut pg = self.pg.clone();
        if pg.get_application_name().is_none() {
            pg.application_name("waltap");
        }
        let fail = |source| SqlConnectError::Postgres {
            target: self.describe(),
            source,
        };
        // tokio-postgres bounds only the TCP connect; the bound here also covers TLS and
        // the start-up exchange, with each host of the URL getting the full timeout.
        let timeout = self.connect_timeout() * self.targets().len().max(1) as u32;
        let timed_out = || SqlConnectError::Timeout {
            target: self.describe(),
            timeout: self.connect_timeout(),
        };
        let client = match self.rustls_config()? {
            Some(cfg) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*cfg).clone());
                let (client, conn) = tokio::time::timeout(timeout, pg.connect(connector))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(fail)?;
                tokio::spawn(drive(conn, notifications));
                client
            }
            None => {
                let (client, conn) =
                    tokio::time::timeout(timeout, pg.connect(tokio_postgres::NoTls))
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(fail)?;
                tokio::spawn(drive(conn, notifications));
                client
            }
        };
        Ok(client)
    }
}

async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notifications: Option<mpsc::Sender<Notification>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notifications {
                    let _ = tx.try_send(n);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %crate::error::report(&e), "SQL connection closed");
                return;
            }
            None => return,
        }
    }
}

/// An ordinary SQL connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SqlConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot connect to {target}")]
    Postgres {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {target}: no answer within {timeout:?} (connect_timeout)")]
    Timeout { target: String, timeout: Duration },
}

/// The options waltap reads itself, taken out of the URL.
struct OwnOptions {
    tls_mode: TlsMode,
    root_cert: Option<PathBuf>,
    session_attrs: Option<TargetSessionAttrs>,
}

/// Removes `sslmode`, `sslrootcert` and `target_session_attrs` from a URL or key=value
/// string, since tokio-postgres rejects the verify modes, does not know `sslrootcert`, and
/// knows only some of libpq's session attributes.
fn take_own_options(s: &str) -> Result<(String, OwnOptions), ConfigError> {
    let mut mode = None;
    let mut root = None;
    let mut session_attrs = None;
    let mut take = |key: &str, value: &str| -> Result<bool, ConfigError> {
        match key {
            // libpq's names; `primary` and `standby` go by whether the server is in hot
            // standby, which is what `read-write` and `read-only` check here for the
            // replication connection (and `prefer-standby` takes any server).
            "target_session_attrs" => {
                session_attrs = Some(match value {
                    "any" | "prefer-standby" => TargetSessionAttrs::Any,
                    "read-write" | "primary" => TargetSessionAttrs::ReadWrite,
                    "read-only" | "standby" => TargetSessionAttrs::ReadOnly,
                    other => return Err(ConfigError::SessionAttrs(other.to_owned())),
                });
                Ok(true)
            }
            "sslmode" => {
                mode = Some(match value {
                    "disable" => TlsMode::Disable,
                    "allow" | "prefer" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => return Err(ConfigError::SslMode(other.to_owned())),
                });
                Ok(true)
            }
            "sslrootcert" => {
                root = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        match s.split_once('?') {
            None => s.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, &percent_decode(v))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for pair in s.split_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k.trim(), v.trim_matches('\''))? {
                kept.push(pair);
            }
        }
        kept.join(" ")
    };
    Ok((
        rest,
        OwnOptions {
            tls_mode: mode.unwrap_or(TlsMode::Prefer),
            root_cert: root,
            session_attrs,
        },
    ))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `7d`, `12h`, `30m`, `45s`, `500ms`, `2w`, `1min` (as `SHOW` prints durations), or
/// plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = split_quantity(s, "duration", "7d, 12h, 30m, 45s")?;
    let seconds = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 7.0 * 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?}: use ms, s, m, h, d or w"
            ))
        }
    };
    Duration::try_from_secs_f64(n * seconds).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// `10GB`, `512MB`, `1GiB`, `100kB`, or plain bytes; KB/MB/GB/TB are powers of 1000,
/// KiB/MiB/GiB/TiB powers of 1024; case does not matter.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, unit) = split_quantity(s, "size", "10GB, 512MiB")?;
    let unit = unit.to_ascii_lowercase();
    let factor: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "unknown size unit in {s:?}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ))
        }
    };
    let bytes = n * factor;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Splits `1.5h` into its number and unit.
fn split_quantity<'a>(s: &'a str, what: &str, example: &str) -> Result<(f64, &'a str), String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n = number
        .parse()
        .map_err(|_| format!("invalid {what} {s:?}: expected e.g. {example}"))?;
    Ok((n, unit.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_session_attrs_take_libpq_names() {
        use tokio_postgres::config::TargetSessionAttrs as T;
        for (given, wanted) in [
            ("read-write", T::ReadWrite),
            ("primary", T::ReadWrite),
            ("read-only", T::ReadOnly),
            ("standby", T::ReadOnly),
            ("prefer-standby", T::Any),
            ("any", T::Any),
        ] {
            let url =
                format!("postgres://u@a:1,b:2/d?sslmode=disable&target_session_attrs={given}");
            let c = SourceConfig::parse(&url).expect("a valid URL");
            assert_eq!(c.pg().get_target_session_attrs(), wanted, "{given}");
            assert_eq!(c.describe(), "u@a:1,b:2/d");
            let kv = SourceConfig::parse(&format!(
                "host=a,b port=1,2 user=u dbname=d target_session_attrs={given}"
            ))
            .expect("valid key=value options");
            assert_eq!(kv.pg().get_target_session_attrs(), wanted, "{given}");
        }
        assert!(matches!(
            SourceConfig::parse("postgres://u@h/d?target_session_attrs=leader"),
            Err(ConfigError::SessionAttrs(v)) if v == "leader"
        ));
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("7 days").is_err());
        assert!(parse_duration("d").is_err());
        assert_eq!(parse_duration("1min"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512 kb"), Ok(512_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("-1GB").is_err());
    }

    #[test]
    fn url_tls_options_are_taken_out() {
        let c = SourceConfig::parse(
            "postgres://u:secret@db.example:6543/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.tls_mode(), TlsMode::VerifyFull);
        assert_eq!(
            c.root_cert.as_deref(),
            Some(std::path::Path::new("/tmp/ca.pem"))
        );
        assert_eq!(c.dbname(), "app");
        assert_eq!(c.application_name(), "x");
        assert_eq!(c.describe(), "u@db.example:6543/app");
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn key_value_form_and_require_with_root_means_verify() {
        let c = SourceConfig::parse("host=h user=u dbname=d sslmode=require sslrootcert=/x")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.tls_mode(), TlsMode::VerifyCa);
        assert!(matches!(
            SourceConfig::parse("postgres://u@h/d?sslmode=bogus"),
            Err(ConfigError::SslMode(_))
        ));
    }
}
