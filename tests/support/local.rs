//! A throwaway cluster of this process: initdb, configuration, pg_ctl, and
//! the watchdog that removes it whatever happens to the process.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

pub(crate) const LOCAL_HOST: &str = "127.0.0.1";
/// How long `pg_ctl -w` may wait for start, stop or crash recovery.
const PG_CTL_TIMEOUT_SECS: &str = "120";

static LOCAL_SEQ: AtomicU32 = AtomicU32::new(0);

/// Where `initdb`, `pg_ctl` and `postgres` are: `WALTAP_PG_BINDIR`, else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, String> {
    let usable = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("WALTAP_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if usable(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "WALTAP_PG_BINDIR={} lacks initdb, pg_ctl or postgres",
                dir.display()
            ))
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
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres): set DATABASE_URL, or \
         WALTAP_PG_BINDIR, or install the server (Debian: postgresql)"
            .to_string()
    })
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

fn free_port() -> Result<u16, String> {
    TcpListener::bind((LOCAL_HOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("finding a free port: {e}"))
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

/// The watchdog outlives the test process. It blocks reading a pipe whose write
/// end only the test process holds (std opens it close-on-exec, so no other child,
/// postgres included, inherits it); end of file means the process is gone,
/// whether it exited, panicked or was SIGKILLed. Unlike polling `kill -0 <pid>`
/// it reacts at once and cannot be fooled by pid reuse.
///
/// Arguments: base dir, data dir, then the pg_ctl stop command (already wrapped
/// in setpriv when we are root, since pg_ctl refuses root).
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

pub(crate) struct LocalServer {
    /// Everything of this cluster lives under here; removing it removes the cluster.
    base: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) bindir: PathBuf,
    /// (uid, gid) to run server programs as, when we are root.
    run_as: Option<(u32, u32)>,
    pub(crate) port: u16,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) dedicated: bool,
    watchdog: Mutex<Option<Child>>,
}

impl LocalServer {
    /// Creates, configures and starts a cluster under a new temp directory.
    pub(crate) fn create(bindir: PathBuf, dedicated: bool) -> Result<LocalServer, String> {
        let seq = LOCAL_SEQ.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("waltap-pg-{}-{seq}", std::process::id()));
        // Only possible after a SIGKILLed run with our pid whose watchdog was killed too.
        if base.exists() {
            fs::remove_dir_all(&base)
                .map_err(|e| format!("removing stale {}: {e}", base.display()))?;
        }
        fs::create_dir(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
        // The owner of a directory we just made is our effective uid; this
        // avoids libc::geteuid, which would need `unsafe` (forbidden by our lints).
        let is_root = fs::metadata(&base).map(|m| m.uid() == 0).unwrap_or(false);

        let mut server = LocalServer {
            data: base.join("data"),
            base,
            bindir,
            run_as: is_root.then(unprivileged_user),
            port: 0,
            ca: None,
            dedicated,
            watchdog: Mutex::new(None),
        };
        // From here on, any early return drops `server`, which stops and removes it.
        // The watchdog goes first so that even a kill during initdb leaves nothing.
        let watchdog = server.spawn_watchdog()?;
        *server.watchdog.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(watchdog);
        server.chown(&server.base)?;
        server.initdb()?;
        server.ca = server.make_certificate()?;
        server.write_config()?;
        server.first_start()?;

        Ok(server)
    }

    fn log(&self) -> PathBuf {
        self.base.join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A server program, as the server's user, with no PG* variables of ours
    /// leaking into it.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        // postgres complains if it cannot chdir back to an unreadable cwd.
        cmd.current_dir(&self.base).stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs `cmd` with its output in a file, never a pipe: a postmaster that
    /// pg_ctl forks could inherit a pipe and keep us waiting until it exits.
    fn run(&self, mut cmd: Command, what: &str) -> Result<(), String> {
        let out_path = self.base.join("command.out");
        let out =
            File::create(&out_path).map_err(|e| format!("creating {}: {e}", out_path.display()))?;
        let err = out.try_clone().map_err(|e| format!("{e}"))?;
        let status = cmd
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("{what}: cannot run: {e}"))?;
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed ({status}):\n{}\n--- server log (last lines) ---\n{}",
            fs::read_to_string(&out_path).unwrap_or_default().trim_end(),
            self.log_tail()
        ))
    }

    fn pg_ctl(&self, args: &[&str], last: Option<&Path>) -> Result<(), String> {
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

    pub(crate) fn pg_ctl_start(&self) -> Result<(), String> {
        self.pg_ctl(&["start", "-l"], Some(&self.log()))
    }

    pub(crate) fn restart_immediate(&self) -> Result<(), String> {
        self.pg_ctl(&["restart", "-m", "immediate", "-l"], Some(&self.log()))
    }

    pub(crate) fn stop_immediate(&self) -> Result<(), String> {
        self.pg_ctl(&["stop", "-m", "immediate"], None)
    }

    fn chown(&self, path: &Path) -> Result<(), String> {
        match self.run_as {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display())),
            None => Ok(()),
        }
    }

    fn spawn_watchdog(&self) -> Result<Child, String> {
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
            // Own process group: a Ctrl-C aimed at `cargo test` must not kill
            // the watchdog before it has cleaned up.
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.spawn()
            .map_err(|e| format!("spawning the cleanup watchdog: {e}"))
    }

    fn initdb(&self) -> Result<(), String> {
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

    /// A self-signed certificate for `localhost`/127.0.0.1. Without `openssl`
    /// the cluster runs with ssl=off and TLS tests skip.
    fn make_certificate(&self) -> Result<Option<PathBuf>, String> {
        if !on_path("openssl") {
            eprintln!("waltap tests: `openssl` not found; test cluster runs without TLS");
            return Ok(None);
        }
        let cert = self.base.join("server.crt");
        let key = self.base.join("server.key");
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // `req -x509` marks the certificate CA:TRUE by default, and webpki
        // (rustls) refuses a CA certificate as the server's own.
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
            .map_err(|e| format!("chmod {}: {e}", key.display()))?;
        Ok(Some(cert))
    }

    fn write_config(&self) -> Result<(), String> {
        let mut conf = vec![
            "\n# waltap test harness".to_string(),
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
            "password_encryption = 'scram-sha-256'".into(),
        ];
        match &self.ca {
            Some(cert) => conf.extend([
                "ssl = on".to_string(),
                format!("ssl_cert_file = {}", conf_str(cert)),
                format!("ssl_key_file = {}", conf_str(&self.base.join("server.key"))),
            ]),
            None => conf.push("ssl = off".into()),
        }
        self.append_conf(&conf.join("\n"))?;

        // First match wins, so the role-specific lines precede the catch-all.
        let hba = [
            "local all all trust",
            "hostssl all waltap_tls 127.0.0.1/32 scram-sha-256",
            "hostnossl all waltap_tls 127.0.0.1/32 reject",
            "host all waltap_scram 127.0.0.1/32 scram-sha-256",
            "host all waltap_md5 127.0.0.1/32 md5",
            "host all waltap_password 127.0.0.1/32 password",
            "host all all 127.0.0.1/32 trust",
            "",
        ]
        .join("\n");
        let hba_path = self.data.join("pg_hba.conf");
        fs::write(&hba_path, hba).map_err(|e| format!("writing {}: {e}", hba_path.display()))
    }

    fn append_conf(&self, text: &str) -> Result<(), String> {
        let path = self.data.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{text}"))
            .map_err(|e| format!("appending to {}: {e}", path.display()))
    }

    /// Another process may grab the port between our probe and the server's
    /// bind, so a lost race is retried with a new port (the last `port =` wins).
    fn first_start(&mut self) -> Result<(), String> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            self.append_conf(&format!("port = {}", self.port))?;
            let _ = fs::remove_file(self.log());
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(why) if attempt < 3 && why.contains("could not bind") => attempt += 1,
                Err(why) => return Err(why),
            }
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        // Failure just means it was not running.
        let _ = self.stop_immediate();
        let watchdog = self
            .watchdog
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut watchdog) = watchdog {
            // Closing its pipe makes the watchdog remove the directory; waiting
            // means that is done when drop returns, and reaps it.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}
